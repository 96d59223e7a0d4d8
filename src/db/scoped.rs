//! The one way to run statements on behalf of a caller: a connection from the pool, scoped to
//! the caller's row-level-security context, with its transaction and its slow-call report;
//! or, for reads, a connection of the user-read pool ([`user_read`]) or a shared lane
//! ([`lane`]).
use std::sync::Arc;
use std::time::Duration;

use diesel_async::{AsyncPgConnection, SimpleAsyncConnection};

use super::pool::{PgConn, PgPool, SlowCalls};
use crate::domain::{Caller, Role};
use crate::error::Result;

/// A connection used on behalf of one caller; see [`scoped`], [`user_read`] and [`lane`].
pub struct Scoped {
    /// `None` only once dropped.
    conn: Option<Conn>,
    /// SQL not yet sent that goes out with the first statement, in the same flight: `BEGIN`
    /// and the caller's settings, or a user read's claims.
    begin: Option<String>,
    /// Whether `begin` opens a transaction (a user read's claims do not).
    transaction: bool,
    /// Set when `begin` failed: the connection's settings are unknown (a user read's
    /// connection may still hold the previous user's claims), so no statement may run on it
    /// again, and it leaves the pool when dropped.
    broken: bool,
    /// Whether a transaction may be open on the server: set before `BEGIN` is sent, cleared
    /// once `COMMIT` or `ROLLBACK` has completed. A `Scoped` dropped while it is set (a call
    /// cancelled half-way, a `COMMIT` that failed) takes its connection out of the pool rather
    /// than hand an open transaction, with a user's role and claims, to the next caller.
    open: bool,
    started: std::time::Instant,
    /// Where a slow call is reported (the pool's watch, if any).
    slow: Option<Arc<SlowCalls>>,
}

/// The connection a [`Scoped`] runs on: its own for the call, or a lane shared with others.
// A pooled connection is held inline (as before lanes): boxing it would cost every call an
// allocation to save a few hundred bytes of a value that lives for one call.
#[allow(clippy::large_enum_variant)]
enum Conn {
    Own(PgConn),
    Lane(Arc<PgConn>, Arc<Lane>),
}

impl std::ops::Deref for Conn {
    type Target = AsyncPgConnection;

    fn deref(&self) -> &AsyncPgConnection {
        match self {
            Conn::Own(conn) => conn,
            Conn::Lane(conn, _) => conn,
        }
    }
}

// The connections' names, as constants and inside their setup SQL.
macro_rules! lane_name {
    () => {
        "jobsvc-lane"
    };
}
macro_rules! user_reads_name {
    () => {
        "jobsvc-user-reads"
    };
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
    Ok(Scoped::new(pool, Conn::Own(conn), begin, true))
}

/// Checks out a connection of the user-read pool (see [`user_read_pool`]) for `user`'s
/// reads: single statements, no transaction. The user's claims (and the planning mode) are
/// set for the session by the first flight, in front of the first statement, so a user read
/// is one round trip where `BEGIN` .. `COMMIT` took two.
///
/// Row-level security stays the backstop: the connection's session role is `authenticated`
/// from the moment it was opened, so a statement on it sees only the rows the claims allow,
/// whatever its own filter says. The claims are set before every call's first statement
/// (on the same connection, which the server reads in order), and a call whose settings
/// fail has its statements' results dropped, so no statement is answered under another
/// user's claims.
pub async fn user_read(pool: &PgPool, user: uuid::Uuid, plans: Option<Plans>) -> Result<Scoped> {
    let conn = pool.get().await?;
    let plans = match plans {
        None => "auto",
        Some(Plans::Custom) => "force_custom_plan",
        Some(Plans::Generic) => "force_generic_plan",
    };
    // The only interpolated values are a parsed UUID and constants: nothing to escape.
    let settings = format!(
        "SELECT set_config('request.jwt.claims', '{{\"sub\":\"{user}\",\"role\":\"authenticated\"}}', false), \
         set_config('plan_cache_mode', '{plans}', false)"
    );
    Ok(Scoped::new(pool, Conn::Own(conn), Some(settings), false))
}

/// Opens the connections of a user-read pool: each runs as role `authenticated` for its
/// whole session (see [`user_read`]).
pub fn user_read_pool(database_url: &str, size: usize) -> Result<PgPool> {
    super::pool::pool_with_setup(database_url, size, |conn| {
        Box::pin(async move {
            let mut conn = conn;
            conn.batch_execute(concat!(
                "SET ROLE authenticated; SET application_name = '",
                user_reads_name!(),
                "'"
            ))
            .await
        })
    })
}

/// Shared connections for the service role's point reads (GetJob): many calls use one at
/// once, and their statements are pipelined: tokio-postgres writes every queued statement
/// in one go and PostgreSQL answers them in order. A connection per call cost a wake-up of
/// a PostgreSQL backend per call, and most of the database's CPU under GetJob load went to
/// those: a lane cut the database's CPU per GetJob to about a third.
///
/// Only single statements that are short whatever their values go on a lane (a long one
/// would hold up every call queued behind it), never a transaction. A lane whose statement
/// fails is retired: its connection goes back to the lanes' own pool once its last call is
/// done, and the pool checks it before anyone gets it again.
pub struct Lanes {
    pool: PgPool,
    lanes: Vec<Arc<Lane>>,
    next: std::sync::atomic::AtomicUsize,
}

/// The `application_name` of the lanes' connections, and of the user-read pool's (as
/// `pg_stat_activity` shows them).
pub const LANE_NAME: &str = lane_name!();
pub const USER_READS_NAME: &str = user_reads_name!();

/// One lane: the connection it shares, if it has one now, and when a call last took it.
pub struct Lane {
    state: std::sync::Mutex<LaneState>,
    /// Held while the lane gets a connection, so that its other calls wait for that one
    /// rather than each asking the pool for its own.
    filling: tokio::sync::Mutex<()>,
}

struct LaneState {
    conn: Option<Arc<PgConn>>,
    /// See [`Lanes::retire_idle`].
    last_used: std::time::Instant,
}

impl Lane {
    fn state(&self) -> std::sync::MutexGuard<'_, LaneState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lane's connection, if it has one, noting the use.
    fn use_current(&self) -> Option<Arc<PgConn>> {
        let mut state = self.state();
        state.last_used = std::time::Instant::now();
        state.conn.clone()
    }

    /// The lane's connection, taken from `pool` if it has none.
    async fn conn(&self, pool: &PgPool) -> Result<Arc<PgConn>> {
        if let Some(conn) = self.use_current() {
            return Ok(conn);
        }
        let _filling = self.filling.lock().await;
        if let Some(conn) = self.use_current() {
            return Ok(conn);
        }
        let conn = Arc::new(pool.get().await?);
        self.state().conn = Some(conn.clone());
        Ok(conn)
    }

    /// Takes `conn` out of service, if it is still this lane's connection.
    fn retire(&self, conn: &Arc<PgConn>) {
        let mut state = self.state();
        if state.conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            state.conn = None;
        }
    }
}

impl Lanes {
    /// `count` lanes over their own connections (none: every read checks a connection out).
    pub fn new(database_url: &str, count: usize) -> Result<Self> {
        Ok(Lanes {
            // Room for a retired lane's connection to finish its calls while its successor
            // is already at work.
            pool: super::pool::pool_with_setup(database_url, 2 * count.max(1), |conn| {
                Box::pin(async move {
                    let mut conn = conn;
                    conn.batch_execute(concat!("SET application_name = '", lane_name!(), "'"))
                        .await
                })
            })?,
            lanes: (0..count)
                .map(|_| {
                    Arc::new(Lane {
                        state: std::sync::Mutex::new(LaneState {
                            conn: None,
                            last_used: std::time::Instant::now(),
                        }),
                        filling: Default::default(),
                    })
                })
                .collect(),
            next: Default::default(),
        })
    }

    fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }

    /// Retires the lanes no call has taken for `max_idle`, and closes the lanes' pooled
    /// connections idle that long: as for the pool (see [`super::retire_idle`]), a
    /// connection a NAT, a proxy or `idle_session_timeout` dropped meanwhile must not wait
    /// for the next burst of calls to be found broken.
    pub fn retire_idle(&self, max_idle: std::time::Duration) {
        for lane in &self.lanes {
            let mut state = lane.state();
            if state.last_used.elapsed() >= max_idle {
                state.conn = None;
            }
        }
        super::retire_idle(&self.pool, max_idle);
    }

    /// Takes every lane's connection out of service (the database went away or came back):
    /// the next call on each lane gets a new one.
    pub fn retire_all(&self) {
        for lane in &self.lanes {
            lane.state().conn = None;
        }
        self.pool.retain(|_, _| false);
    }
}

/// A lane for one short statement of the service role (see [`Lanes`]); with no lanes
/// configured, a connection of `pool` as [`scoped`] gives it.
pub async fn lane(lanes: &Lanes, pool: &PgPool) -> Result<Scoped> {
    if lanes.is_empty() {
        return Ok(Scoped::new(pool, Conn::Own(pool.get().await?), None, false));
    }
    let i = lanes
        .next
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        % lanes.lanes.len();
    let lane = &lanes.lanes[i];
    let conn = lane.conn(&lanes.pool).await?;
    Ok(Scoped::new(
        pool,
        Conn::Lane(conn, lane.clone()),
        None,
        false,
    ))
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
    Ok(Scoped::new(pool, Conn::Own(conn), Some(begin), true))
}

impl Scoped {
    fn new(pool: &PgPool, conn: Conn, begin: Option<String>, transaction: bool) -> Self {
        Scoped {
            conn: Some(conn),
            begin,
            transaction,
            broken: false,
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
        if self.broken {
            return Err(crate::error::Error::Unavailable(
                "this connection's settings failed; it is not used again".into(),
            ));
        }
        let begin = self.begin.take();
        if begin.is_some() && self.transaction {
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
        if let Err(e) = begun {
            self.broken = true;
            return Err(e.into());
        }
        result
    }

    /// Commits after success, rolls back after failure, and passes `result` on. A call
    /// slower than the threshold is logged (in the call's span: method and request id; never
    /// the statement's values) and counted.
    pub async fn finish<T>(mut self, result: Result<T>) -> Result<T> {
        let result = self.end(result).await;
        if result.is_err()
            && let Some(Conn::Lane(conn, lane)) = &self.conn
        {
            lane.retire(conn);
        }
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
        if (self.open || self.broken)
            && let Some(Conn::Own(conn)) = self.conn.take()
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
