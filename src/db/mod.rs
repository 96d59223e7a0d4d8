//! The database: pool, migrations, and the one way to run statements on behalf of a caller.
//!
//! All SQL lives below this module; every query function takes a connection so the caller of
//! the function owns the transaction.
pub mod events;
pub mod health;
pub mod jobs;
pub mod models;
pub mod schema;
pub mod stats;

use std::time::Duration;

use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use crate::auth::{Caller, Role};
use crate::error::{Error, Result};

pub type PgPool = Pool<AsyncPgConnection>;
pub type PgConn = Object<AsyncPgConnection>;

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// How long a call waits for a pooled connection (or a new one) before answering UNAVAILABLE.
const POOL_TIMEOUT: Duration = Duration::from_secs(2);

/// A pool whose waits, connects and health checks are all bounded, so an unreachable database
/// turns into fast UNAVAILABLE answers rather than hanging calls.
pub fn pool(database_url: &str, size: usize) -> Result<PgPool> {
    // No `SELECT 1` on every checkout (a whole extra round trip per call): a connection whose
    // server went away is already known closed and discarded by the pool's broken check,
    // and the health monitor pings the database on its own schedule.
    let mut config = ManagerConfig::default();
    config.recycling_method = RecyclingMethod::Fast;
    let manager =
        AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(database_url, config);
    // Last in, first out: a lone caller keeps getting the connection it just used, whose
    // server process has its caches warm. First in, first out (deadpool's default) rotated
    // every call through the whole pool, and a backend's statement then ran a third slower.
    Pool::builder(manager)
        .max_size(size.max(1))
        .queue_mode(deadpool::managed::QueueMode::Lifo)
        .wait_timeout(Some(POOL_TIMEOUT))
        .create_timeout(Some(POOL_TIMEOUT))
        .recycle_timeout(Some(POOL_TIMEOUT))
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .map_err(|e| Error::Internal(Box::new(e)))
}

/// Pooled connections unused for this long are closed (by the health monitor, see
/// [`retire_idle`]); the pool opens new ones on demand.
pub const MAX_IDLE: Duration = Duration::from_secs(300);

/// Closes the pooled connections idle for `max_idle` or longer. The pool hands out the
/// connection used last, so under a light load the others sit unused, and a connection that
/// a NAT, a proxy or the server's `idle_session_timeout` dropped meanwhile would only be
/// found broken by the call that gets it after the next burst.
pub fn retire_idle(pool: &PgPool, max_idle: Duration) -> usize {
    pool.retain(|_, metrics| metrics.last_used() < max_idle)
        .removed
        .len()
}

/// Applies pending migrations under an advisory lock, so replicas starting together take turns.
pub async fn migrate(database_url: &str) -> Result<()> {
    use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
    let url = database_url.to_owned();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let mut conn: AsyncConnectionWrapper<AsyncPgConnection> =
            <AsyncConnectionWrapper<AsyncPgConnection> as diesel::Connection>::establish(&url)
                .map_err(|e| Error::Unavailable(Box::new(e)))?;
        use diesel::RunQueryDsl;
        diesel::sql_query("SELECT pg_advisory_lock(7316134021)").execute(&mut conn)?;
        let result = conn
            .run_pending_migrations(MIGRATIONS)
            .map(|applied| {
                for m in applied {
                    tracing::info!(migration = %m, "applied migration");
                }
            })
            .map_err(Error::Internal);
        diesel::sql_query("SELECT pg_advisory_unlock(7316134021)").execute(&mut conn)?;
        result
    })
    .await
    .map_err(|e| Error::Internal(Box::new(e)))?
}

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

/// Calls slower than this are logged and counted (`--slow-query-threshold`). Process-wide:
/// one server per process in production; tests share the default.
static SLOW: std::sync::OnceLock<(Duration, std::sync::Arc<crate::metrics::Metrics>)> =
    std::sync::OnceLock::new();

/// Sets the slow-call threshold and where slow calls are counted (the first call wins).
pub fn set_slow_threshold(threshold: Duration, metrics: std::sync::Arc<crate::metrics::Metrics>) {
    let _ = SLOW.set((threshold, metrics));
}

/// A connection checked out on behalf of one caller; see [`scoped`].
pub struct Scoped {
    /// `None` only once dropped.
    conn: Option<PgConn>,
    /// `BEGIN` and the caller's settings, not yet sent: they go out with the first statement.
    begin: Option<String>,
    /// Whether a transaction may be open on the server: set before `BEGIN` is sent, cleared
    /// once `COMMIT` or `ROLLBACK` has completed. A `Scoped` dropped while it is set (a call
    /// cancelled half-way, a `COMMIT` that failed) takes its connection out of the pool rather
    /// than hand an open transaction, with a user's role and claims, to the next caller.
    open: bool,
    started: std::time::Instant,
}

/// Checks out a connection on behalf of `caller`.
///
/// A user's statements run inside one transaction as role `authenticated` with
/// `request.jwt.claims` set (exactly what PostgREST does), so row-level security filters them
/// even if a query forgot its own `user_id` filter. The role and claims are set with
/// `set_config(.., true)`: they end with the transaction and never leak to the next user of a
/// pooled connection. `BEGIN` and the settings travel with the first statement, in the same
/// round trip (see [`Scoped::run`]).
/// The service role gets the connection as is: it sees every row, and a single statement
/// needs no transaction.
pub async fn scoped(pool: &PgPool, caller: &Caller) -> Result<Scoped> {
    begin_scoped(pool, caller, None).await
}

/// How the statements of a [`scoped_with_plans`] transaction are planned: PostgreSQL's
/// `plan_cache_mode`, set for that transaction only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plans {
    /// Each execution planned for its actual values: for statements such as ListJobs with a
    /// status or time filter, whose best index depends on how selective the bound values are
    /// (a cached generic plan would walk the wrong index).
    Custom,
    /// The cached generic plan from the first execution on. For statements that one index
    /// serves the same way whatever the values, which PostgreSQL would otherwise keep planning
    /// afresh: a first page of ListJobs by owner costs twice as much as a custom plan under
    /// `LIMIT $n` as under `LIMIT 51`, so the automatic choice never settles on the generic
    /// one, and planning took as long as running it.
    Generic,
}

/// Like [`scoped`], but always in a transaction whose statements are planned as `plans`
/// says. The setting travels with `BEGIN`.
pub async fn scoped_with_plans(pool: &PgPool, caller: &Caller, plans: Plans) -> Result<Scoped> {
    begin_scoped(pool, caller, Some(plans)).await
}

/// `BEGIN` of a REPEATABLE READ, READ ONLY transaction on behalf of `caller` (with the
/// PostgREST-style settings for a user): every statement of it reads one snapshot. For a
/// connection of its own (a stream's snapshot of the existing jobs).
pub fn snapshot_begin_sql(caller: &Caller) -> String {
    const BEGIN: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY";
    match caller.role() {
        Role::Service => BEGIN.to_owned(),
        Role::User(user) => rls_begin_sql(user).replacen("BEGIN", BEGIN, 1),
    }
}

async fn begin_scoped(pool: &PgPool, caller: &Caller, plans: Option<Plans>) -> Result<Scoped> {
    let conn = pool.get().await?;
    let plans = plans.map(|p| match p {
        Plans::Custom => "; SET LOCAL plan_cache_mode = force_custom_plan",
        Plans::Generic => "; SET LOCAL plan_cache_mode = force_generic_plan",
    });
    let begin = match (caller.role(), plans) {
        (Role::Service, None) => None,
        (Role::Service, Some(plans)) => Some(format!("BEGIN{plans}")),
        (Role::User(user), None) => Some(rls_begin_sql(user)),
        (Role::User(user), Some(plans)) => Some(format!("{}{plans}", rls_begin_sql(user))),
    };
    Ok(Scoped {
        conn: Some(conn),
        begin,
        open: false,
        started: std::time::Instant::now(),
    })
}

impl Scoped {
    /// Runs `statements` on the connection. The first time, the caller's `BEGIN` and settings
    /// are sent in the same flight as the first statement instead of a round trip ahead of it:
    /// for a user's call that is two round trips instead of three.
    ///
    /// The order on the wire is what makes this safe. The `BEGIN` is queued when it is first
    /// polled, which is before `statements` is, and both share one connection, which the
    /// server reads in order; a statement that first has to be prepared only sends later. If
    /// the `BEGIN` fails, its error is the answer and whatever the statements returned is
    /// dropped. The `COMMIT` is not sent ahead the same way: a statement still being prepared
    /// would run after it, outside the transaction.
    pub async fn run<'s, T, F>(
        &'s mut self,
        statements: impl FnOnce(&'s AsyncPgConnection) -> F,
    ) -> Result<T>
    where
        F: Future<Output = Result<T>>,
    {
        let begin = self.begin.take();
        if begin.is_some() {
            self.open = true;
        }
        let conn: &'s AsyncPgConnection = self.conn.as_deref().expect("present until dropped");
        let Some(sql) = begin else {
            return statements(conn).await;
        };
        let begin = async {
            let mut conn = conn;
            conn.batch_execute(&sql).await
        };
        // `join` polls its first future first, every time.
        let (begun, result) = futures_util::future::join(begin, statements(conn)).await;
        begun?;
        result
    }

    /// Commits after success, rolls back after failure, and passes `result` on. A call
    /// slower than the threshold is logged (in the call's span: method and request id; never
    /// the statement's values) and counted.
    pub async fn finish<T>(mut self, result: Result<T>) -> Result<T> {
        let result = self.end(result).await;
        let elapsed = self.started.elapsed();
        if let Some((threshold, metrics)) = SLOW.get()
            && elapsed >= *threshold
        {
            metrics.slow_queries.inc();
            tracing::warn!(
                elapsed_ms = elapsed.as_secs_f64() * 1000.0,
                "slow database call"
            );
        }
        result
    }

    async fn end<T>(&mut self, result: Result<T>) -> Result<T> {
        if !self.open {
            return result;
        }
        let mut conn: &AsyncPgConnection = self.conn.as_deref().expect("present until dropped");
        match result {
            Ok(value) => {
                conn.batch_execute("COMMIT").await?;
                self.open = false;
                Ok(value)
            }
            Err(e) => {
                // A failed rollback leaves `open` set, and the connection is discarded.
                if conn.batch_execute("ROLLBACK").await.is_ok() {
                    self.open = false;
                }
                Err(e)
            }
        }
    }
}

impl Drop for Scoped {
    fn drop(&mut self) {
        if self.open
            && let Some(conn) = self.conn.take()
        {
            // Out of the pool, and closed when dropped here.
            drop(deadpool::managed::Object::take(conn));
        }
    }
}

/// `BEGIN` plus the PostgREST-style settings for one user. The only interpolated value is a
/// parsed UUID (hex digits and dashes), so there is nothing to escape.
fn rls_begin_sql(user: uuid::Uuid) -> String {
    format!(
        "BEGIN; SELECT set_config('role', 'authenticated', true), \
         set_config('request.jwt.claims', '{{\"sub\":\"{user}\",\"role\":\"authenticated\"}}', true)"
    )
}

#[derive(diesel::QueryableByName)]
struct BatchCount {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// Runs one of the batch maintenance functions (history pruning, retention, the sweeper)
/// batch after batch, each a short statement on a pooled connection given back in between,
/// until a batch comes back short of `max_rows` or shutdown starts; returns the total.
/// `sql` takes the age as `$1` (an interval), the batch size as `$2` and, when `status` is
/// given, that status as `$3`, and names its count `n`.
pub async fn run_batches(
    pool: &PgPool,
    sql: &str,
    status: Option<crate::domain::JobStatus>,
    age: Duration,
    max_rows: i32,
    shutdown: &tokio::sync::watch::Receiver<bool>,
) -> Result<i64> {
    use diesel::sql_types::{Integer, Interval, Text};
    use diesel_async::RunQueryDsl;
    let age = diesel::pg::data_types::PgInterval::from_microseconds(
        i64::try_from(age.as_micros()).unwrap_or(i64::MAX),
    );
    let mut total = 0;
    loop {
        let mut query = diesel::sql_query(sql)
            .into_boxed::<diesel::pg::Pg>()
            .bind::<Interval, _>(age)
            .bind::<Integer, _>(max_rows);
        if let Some(status) = status {
            query = query.bind::<Text, _>(status.as_str());
        }
        let n = {
            let mut conn = pool.get().await?;
            query.get_result::<BatchCount>(&mut conn).await?.n
        };
        total += n;
        if n < i64::from(max_rows) || *shutdown.borrow() {
            return Ok(total);
        }
        // Let other work in between batches.
        tokio::task::yield_now().await;
    }
}

/// A connection attempt that takes longer is abandoned (a database behind a partition would
/// otherwise hold it until TCP gives up).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects once, outside the pool (for tools and tests).
pub async fn connect(database_url: &str) -> Result<AsyncPgConnection> {
    match tokio::time::timeout(CONNECT_TIMEOUT, AsyncPgConnection::establish(database_url)).await {
        Ok(conn) => conn.map_err(|e| Error::Unavailable(Box::new(e))),
        Err(_) => Err(Error::Unavailable(
            "connecting to the database timed out".into(),
        )),
    }
}

/// Connects once, outside the pool, naming the connection in `pg_stat_activity` (so operators
/// and tests can tell the feed's, the monitor's and the pool's connections apart).
pub async fn connect_named(database_url: &str, name: &'static str) -> Result<AsyncPgConnection> {
    use diesel_async::SimpleAsyncConnection;
    let mut conn = connect(database_url).await?;
    // `name` is a constant of ours, with no quote in it.
    conn.batch_execute(&format!("SET application_name = '{name}'"))
        .await?;
    Ok(conn)
}
