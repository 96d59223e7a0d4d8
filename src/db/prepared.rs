//! Statements kept prepared per connection (see [`Prepared`]).
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};

/// A hand-written statement (`sql_query` with bound values) that each connection keeps
/// prepared: `diesel::sql_query(..).bind(..).prepared().load(conn)`.
///
/// diesel never caches `sql_query` statements, since it cannot know that their text is one
/// of a few. Uncached, every call pays a Parse/Describe round trip and a Close besides its
/// Execute, and PostgreSQL parses and plans the text anew each time: under GetJob load that
/// was a quarter of the database's CPU and twice the round trips. Every statement marked
/// here has one of a bounded set of texts (values are always bound, never interpolated), so
/// the per-connection cache stays bounded. diesel has no public switch for this, hence the
/// wrapper: it only answers "safe to cache" and passes everything else to the query.
pub struct Prepared<Q>(Q);

pub trait PreparedExt: Sized {
    /// See [`Prepared`]: only for statements whose text comes from a bounded set.
    fn prepared(self) -> Prepared<Self> {
        Prepared(self)
    }
}

impl<Q: QueryFragment<Pg>> PreparedExt for Q {}

impl<Q: QueryFragment<Pg>> QueryFragment<Pg> for Prepared<Q> {
    fn walk_ast<'b>(&'b self, pass: AstPass<'_, 'b, Pg>) -> diesel::QueryResult<()> {
        self.0.walk_ast(pass)
    }

    fn is_safe_to_cache_prepared(&self, _: &Pg) -> diesel::QueryResult<bool> {
        Ok(true)
    }
}

impl<Q> QueryId for Prepared<Q> {
    type QueryId = ();
    // No static id: the cache keys these statements by their SQL text and bind types.
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: Query> Query for Prepared<Q> {
    type SqlType = Q::SqlType;
}
