//! The connection pool (with the slow-call watch that travels with it), one-off connections
//! outside it, and migrations.
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use diesel::QueryResult;
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::{AsyncConnection, AsyncPgConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use futures_util::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;

use crate::error::{Error, Result};

pub type PgConn = Object<AsyncPgConnection>;

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// The pool calls check their connections out of. Dereferences to deadpool's pool; what it
/// adds is the slow-call watch of [`PgPool::watch_slow_calls`], which every scoped
/// transaction taken from it reports to.
#[derive(Clone)]
pub struct PgPool {
    inner: Pool<AsyncPgConnection>,
    slow: Option<Arc<SlowCalls>>,
}

/// Database calls slower than `threshold` are logged and counted in `counter`. It belongs to
/// one pool, so two servers in one process (as in the tests) each count only their own.
#[derive(Debug)]
pub struct SlowCalls {
    pub threshold: Duration,
    pub counter: Counter,
}

impl PgPool {
    /// Logs and counts the scoped calls slower than `threshold` (`--slow-query-threshold`).
    pub fn watch_slow_calls(mut self, threshold: Duration, counter: Counter) -> Self {
        self.slow = Some(Arc::new(SlowCalls { threshold, counter }));
        self
    }

    pub(crate) fn slow_calls(&self) -> Option<Arc<SlowCalls>> {
        self.slow.clone()
    }
}

impl Deref for PgPool {
    type Target = Pool<AsyncPgConnection>;

    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

/// How long a call waits for a pooled connection (or a new one) before answering UNAVAILABLE.
const POOL_TIMEOUT: Duration = Duration::from_secs(2);

/// A pool whose waits, connects and health checks are all bounded, so an unreachable database
/// turns into fast UNAVAILABLE answers rather than hanging calls.
pub fn pool(database_url: &str, size: usize) -> Result<PgPool> {
    build(database_url, size, ManagerConfig::default())
}

/// What a new connection of a [`pool_with_setup`] runs before the pool hands it out.
pub(crate) type Setup = for<'c> fn(&'c AsyncPgConnection) -> BoxFuture<'c, QueryResult<()>>;

/// Like [`pool`], but every new connection first runs `setup` (a session setting that all
/// its users rely on).
pub(crate) fn pool_with_setup(database_url: &str, size: usize, setup: Setup) -> Result<PgPool> {
    let mut config = ManagerConfig::default();
    config.custom_setup = Box::new(move |url| {
        Box::pin(async move {
            let conn = AsyncPgConnection::establish(url).await?;
            setup(&conn)
                .await
                .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
            Ok(conn)
        })
    });
    build(database_url, size, config)
}

fn build(
    database_url: &str,
    size: usize,
    mut config: ManagerConfig<AsyncPgConnection>,
) -> Result<PgPool> {
    // No `SELECT 1` on every checkout (a whole extra round trip per call): a connection whose
    // server went away is already known closed and discarded by the pool's broken check,
    // and the health monitor pings the database on its own schedule.
    config.recycling_method = RecyclingMethod::Fast;
    let manager =
        AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(database_url, config);
    // Last in, first out: a lone caller keeps getting the connection it just used, whose
    // server process has its caches warm. First in, first out (deadpool's default) rotated
    // every call through the whole pool, and a backend's statement then ran a third slower.
    let inner = Pool::builder(manager)
        .max_size(size.max(1))
        .queue_mode(deadpool::managed::QueueMode::Lifo)
        .wait_timeout(Some(POOL_TIMEOUT))
        .create_timeout(Some(POOL_TIMEOUT))
        .recycle_timeout(Some(POOL_TIMEOUT))
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .map_err(|e| Error::Internal(Box::new(e)))?;
    Ok(PgPool { inner, slow: None })
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
