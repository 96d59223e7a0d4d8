//! The one way to run statements on behalf of a caller: a connection from the pool, scoped to
//! the caller's row-level-security context, with its transaction and its slow-call report.
use std::sync::Arc;
use std::time::Duration;

use diesel_async::{AsyncPgConnection, SimpleAsyncConnection};

use super::pool::{PgConn, PgPool, SlowCalls};
use crate::domain::{Caller, Role};
use crate::error::Result;

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
    /// Where a slow call is reported (the pool's watch, if any).
    slow: Option<Arc<SlowCalls>>,
}

/// Checks out a connection on behalf of `caller`.
///
/// A user's statements run inside one transaction as role `authenticated` with
/// `request.jwt.claims` set (exactly what PostgREST does), so row-level security filters them
/// even if a query forgot its own `user_id` filter. The role and claims are set with
/// `set_config(.., true)`: they end with the transaction and never leak to the next user of a
/// pooled connection. `BEGIN` and the settings travel with the first statement, in the same
/// round trip (see [`Scoped::exec`]).
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
    Ok(Scoped::new(pool, conn, begin))
}

/// A read-only transaction on behalf of `caller` (with the PostgREST-style settings for a
/// user, so row-level security backs up the statement's own filters) whose statements are
/// cancelled by the server after `timeout`: for reads whose cost a caller chooses, such as a
/// stream catching up from an old resume token.
pub async fn scoped_read(pool: &PgPool, caller: &Caller, timeout: Duration) -> Result<Scoped> {
    let conn = pool.get().await?;
    let begin = match caller.role() {
        Role::Service => "BEGIN".to_owned(),
        Role::User(user) => rls_begin_sql(user),
    };
    let begin = format!(
        "{}; SET LOCAL statement_timeout = {}",
        begin.replacen("BEGIN", "BEGIN READ ONLY", 1),
        timeout.as_millis().max(1)
    );
    Ok(Scoped::new(pool, conn, Some(begin)))
}

impl Scoped {
    fn new(pool: &PgPool, conn: PgConn, begin: Option<String>) -> Self {
        Scoped {
            conn: Some(conn),
            begin,
            open: false,
            started: std::time::Instant::now(),
            slow: pool.slow_calls(),
        }
    }

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
    pub async fn exec<'s, T, F>(
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
        if let Some(slow) = &self.slow
            && elapsed >= slow.threshold
        {
            slow.counter.inc();
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
