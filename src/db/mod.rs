//! The database: the pool, scoped row-level-security transactions, prepared statements, row
//! types, the batch writers, and all SQL.
//!
//! - [`pool`]: the pool ([`PgPool`], with its slow-call watch), one-off connections, migrations.
//! - [`scoped`]: [`scoped`] checks out a connection on behalf of a caller; a user's statements
//!   run as role `authenticated` with the user's claims, so row-level security is the backstop.
//! - [`prepared`]: statements each connection keeps prepared.
//! - [`batch`]: natural batching of creates and moves (concurrent calls share a statement).
//! - [`jobs`], [`events`], [`stats`], [`transfer`]: the statements, by table and purpose; each
//!   takes a connection, so the caller owns the transaction.
//! - [`work`]: the workers' statements: claims, heartbeats, the lease sweeper's batch.
//! - [`health`]: whether the database answers, so calls fail fast while it does not.
//! - [`maintenance`]: the batch maintenance functions the background tasks call.
//! - [`models`], [`schema`]: row types and the SQL mappings of domain types.
//!
//! May import: [`crate::domain`], [`crate::error`], [`crate::metrics`]. Never the API, the
//! feed, the tasks or the app: they call down into this, never the reverse.
pub(crate) mod batch;
pub mod events;
pub(crate) mod health;
// `job_columns!` is defined in `jobs` and used by `work`.
#[macro_use]
pub mod jobs;
pub(crate) mod maintenance;
pub mod models;
mod pool;
mod prepared;
pub(crate) mod schema;
mod scoped;
pub(crate) mod stats;
pub(crate) mod transfer;
pub mod work;

pub use pool::{
    MAX_IDLE, MIGRATIONS, PgConn, PgPool, connect, connect_named, migrate, pool, retire_idle,
};
pub use prepared::PreparedExt;
pub use scoped::{
    LANE_NAME, Lanes, Plans, Scoped, USER_READS_NAME, lane, scoped, scoped_read, scoped_with_plans,
    snapshot_begin_sql, user_read, user_read_pool,
};
