//! What every call shares: the pool, the feed, the writers, the limits and the keys.
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::admission::Admission;
use super::auth::Authenticator;
use super::convert::JsonLimits;
use super::fault::LostResponses;
use super::tokens::TokenKey;
use crate::db::batch::{Beats, Creates, Updates};
use crate::db::health::DbHealth;
use crate::db::{Lanes, PgPool};
use crate::feed::limits::CallerLimits;
use crate::feed::{Feed, WakeOnce};
use crate::metrics::Metrics;

/// Everything a call needs, shared by all calls.
pub struct AppState {
    pub pool: PgPool,
    /// Users' reads: connections whose session role is `authenticated` (`db::user_read`).
    pub user_reads: PgPool,
    /// The service role's point reads: shared, pipelined connections (`db::Lanes`).
    pub lanes: Arc<Lanes>,
    /// For connections outside the pool (a stream's snapshot).
    pub database_url: Arc<str>,
    pub auth: Authenticator,
    pub limits: JsonLimits,
    /// The most a page of ListJobs or ListJobEvents holds, in encoded bytes: under the
    /// message limit, so no page is too large to send.
    pub max_page_bytes: usize,
    /// Signs page and resume tokens.
    pub tokens: TokenKey,
    /// The change feed: every committed change, from every replica and plain SQL.
    pub feed: Arc<Feed>,
    /// Heartbeat interval of idle streams.
    pub stream_heartbeat: Duration,
    /// What the metrics endpoint reports.
    pub metrics: Arc<Metrics>,
    /// Bounds the connections that `include_existing` snapshots open outside the pool.
    pub snapshot_slots: Arc<tokio::sync::Semaphore>,
    /// Bounds the catch-up reads of streams running at once.
    pub catch_up_slots: Arc<tokio::sync::Semaphore>,
    /// What one caller, and all together, may hold open: streams, waits, snapshots.
    pub caller_limits: CallerLimits,
    /// Tests only: answers some committed writes as if the response had been lost.
    pub lost_responses: Option<LostResponses>,
    /// Whether the database answers: calls fail fast while it does not.
    pub db_health: DbHealth,
    /// CreateJob's writer: concurrent creates share statements and commits.
    pub creates: Creates,
    /// UpdateStatus's and CancelJob's writer: concurrent moves share statements and commits.
    pub updates: Updates,
    /// Heartbeat's writer: concurrent heartbeats share statements and commits.
    pub beats: Beats,
    /// Which waiting claim acts on a change (one per change).
    pub claim_wakes: WakeOnce,
    /// The limit on unary calls working and waiting at once.
    pub admission: Admission,
    /// Flips to true when the server starts shutting down: long calls return early.
    pub shutdown: watch::Receiver<bool>,
}
