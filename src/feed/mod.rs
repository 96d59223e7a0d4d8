//! The change feed inside one process: one reader of the history (`job_events`) hands each
//! event to the subscribers (streams and WaitJob) whose filter it matches. Subscribers are
//! indexed by their most selective filter field (job ids, agent, user), so an event wakes
//! only the subscribers it may concern, whatever their number. Each subscriber has a bounded
//! queue; when it is full the reader drops the event for that subscriber and marks it
//! lagged, never waiting: the subscriber then catches up from the history on its own, so a
//! slow one never slows the others or the writers.
//!
//! What wakes the reader:
//! - a commit through this process ([`Feed::committed`]), at once;
//! - a NOTIFY on [`CHANNEL`] from another replica (one listener connection per process,
//!   reconnecting with backoff; after every reconnect the reader catches up);
//! - its own poll of the history every `poll_interval`, which finds plain SQL writes and
//!   anything a lost notification would have announced.
//!
//! NOTIFY is sent after commits, never inside a write transaction (a transaction that issued
//! NOTIFY holds a database-wide lock through its commit), and at most one at a time per
//! process: commits that land while one is being sent share the next.
//!
//! The feed carries domain rows ([`Event`] holds a [`Job`]); the API layer converts an event
//! into a message only once a subscriber's filter has matched it.
//!
//! - [`registry`]: subscribers indexed by their most selective filter field, and dispatch.
//! - [`reader`]: the one reader of the history.
//! - [`wake`]: wake-ups between replicas (LISTEN/NOTIFY).
//! - [`follow`]: one StreamJobUpdates stream's task: snapshot, catch-up, live, heartbeats.
//! - [`once`]: one waiting claim per change, not all of them.
//!
//! May import: [`crate::domain`], [`crate::error`], [`crate::db`], [`crate::metrics`]. Never
//! the API layer: what a stream sends leaves here as domain values ([`follow::Delivery`]).
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::db;
use crate::db::events;
use crate::domain::Position;
use crate::error::Result;
use crate::metrics::Metrics;

mod event;
pub(crate) mod follow;
mod hub;
pub(crate) mod limits;
mod once;
mod reader;
mod registry;
mod wake;

pub(crate) use hub::Feed;
pub(crate) use once::WakeOnce;
pub(crate) use registry::Subscription;
pub use wake::{CHANNEL, LISTENER_NAME};

/// Settings of the feed.
#[derive(Debug, Clone)]
pub struct FeedConfig {
    pub poll_interval: Duration,
    /// Events a subscriber's queue holds; one further behind catches up from the history.
    pub queue_events: usize,
}

impl Feed {
    /// Starts the reader, the listener and the notifier. The feed starts at the database's
    /// current horizon: history before it is reached by resuming, not live.
    pub async fn start(
        database_url: String,
        config: FeedConfig,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Feed>> {
        let conn = db::connect_named(&database_url, "jobsvc: feed reader").await?;
        let start = events::read(&conn, Position::MAX, 1, None).await?.tail;
        let (position_tx, position) = watch::channel(start);
        let feed = Arc::new(Feed {
            registry: Arc::default(),
            queue_events: config.queue_events.max(1),
            position,
            wake: Notify::new(),
            subscribed: Notify::new(),
            committed: Notify::new(),
            metrics,
        });
        tokio::spawn(reader::read_loop(
            feed.clone(),
            conn,
            database_url.clone(),
            position_tx,
            config.poll_interval,
            shutdown.clone(),
        ));
        tokio::spawn(wake::listen_loop(
            feed.clone(),
            database_url.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(wake::notify_loop(feed.clone(), database_url, shutdown));
        Ok(feed)
    }
}
