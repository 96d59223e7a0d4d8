//! The change feed inside one process: one reader of the history (`job_events`) publishes
//! batches of events to every subscriber (streams and WaitJob) through a bounded broadcast
//! ring. A subscriber that falls behind the ring is not waited for: it notices (`Lagged`) and
//! catches up from the history on its own, so it never slows the others or the writers.
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
use std::sync::Arc;
use std::time::Duration;

use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::StreamExt;
use tokio::sync::{Notify, broadcast, watch};
use uuid::Uuid;

use crate::convert;
use crate::db::events::{self, EventRow, Position};
use crate::db::{self, PgPool};
use crate::domain::JobStatus;
use crate::error::Result;
use crate::pb;
use crate::tokens::TokenKey;

/// The NOTIFY channel replicas wake each other on. The payload is always empty: it only says
/// "read the history".
pub const CHANNEL: &str = "jobsvc_feed";
/// Events per read of the history.
pub const READ_LIMIT: i64 = 1000;
/// While committed events wait above the horizon for an older transaction, the reader looks
/// again after this, doubling up to the poll interval.
const PENDING_RECHECK: Duration = Duration::from_millis(2);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The first prune runs this long after start, then every `PRUNE_INTERVAL`.
const PRUNE_FIRST: Duration = Duration::from_secs(60);
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);
const PRUNE_BATCH: i32 = 10_000;

/// One committed change, prepared once for every subscriber.
#[derive(Debug)]
pub struct Event {
    pub position: Position,
    /// The transaction that made the change (for skipping what a snapshot already shows).
    pub writer_xid: i64,
    pub id: Uuid,
    pub user_id: Option<Uuid>,
    pub status: JobStatus,
    /// The whole job just after the change.
    pub job: pb::Job,
    /// The resume token of this event's position.
    pub resume_token: String,
}

impl Event {
    pub fn new(row: EventRow, tokens: &TokenKey) -> Self {
        let position = row.position();
        Event {
            position,
            writer_xid: row.writer_xid,
            id: row.job.id,
            user_id: row.job.user_id,
            status: row.job.status,
            job: convert::job_to_pb(row.job),
            resume_token: tokens.resume_token(position),
        }
    }
}

/// Events the reader published together, and the position the feed reached with them.
#[derive(Debug)]
pub struct Batch {
    pub events: Vec<Event>,
    pub end: Position,
}

/// Settings of the feed.
#[derive(Debug, Clone)]
pub struct FeedConfig {
    pub poll_interval: Duration,
    pub retention: Duration,
    /// Batches the ring holds; a subscriber further behind catches up from the history.
    pub ring_batches: usize,
}

/// The process's feed: subscribe to it, and tell it about commits.
pub struct Feed {
    batches: broadcast::Sender<Arc<Batch>>,
    /// The position the reader has published up to. Always updated after the batch that
    /// reached it was sent, so a subscriber that reads this and then drains its receiver has
    /// seen every event up to it.
    position: watch::Receiver<Position>,
    wake: Notify,
    committed: Notify,
    pub tokens: TokenKey,
}

impl Feed {
    /// Starts the reader, the listener, the notifier and the pruner. The feed starts at the
    /// database's current horizon: history before it is reached by resuming, not live.
    pub async fn start(
        pool: PgPool,
        database_url: String,
        tokens: TokenKey,
        config: FeedConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Feed>> {
        let mut conn = db::connect(&database_url).await?;
        let start = Position::below(
            events::read(&mut conn, Position::MAX, 1, None)
                .await?
                .horizon,
        );
        let (position_tx, position) = watch::channel(start);
        let feed = Arc::new(Feed {
            batches: broadcast::channel(config.ring_batches.max(1)).0,
            position,
            wake: Notify::new(),
            committed: Notify::new(),
            tokens,
        });
        tokio::spawn(read_loop(
            feed.clone(),
            conn,
            database_url.clone(),
            position_tx,
            config.poll_interval,
            shutdown.clone(),
        ));
        tokio::spawn(listen_loop(feed.clone(), database_url, shutdown.clone()));
        tokio::spawn(notify_loop(feed.clone(), pool.clone(), shutdown.clone()));
        tokio::spawn(prune_loop(pool, config.retention, shutdown));
        Ok(feed)
    }

    /// A receiver of every batch published from now on, and the position it starts after.
    pub fn subscribe(&self) -> (broadcast::Receiver<Arc<Batch>>, Position) {
        let rx = self.batches.subscribe();
        // Read after subscribing: every batch beyond this position reaches `rx`.
        let at = *self.position.borrow();
        (rx, at)
    }

    /// The position published so far; see the field's comment for how to use it.
    pub fn published(&self) -> Position {
        *self.position.borrow()
    }

    /// A change committed through this process: read it now, and wake the other replicas.
    pub fn committed(&self) {
        self.wake.notify_one();
        self.committed.notify_one();
    }

    /// Subscribers on this process (for metrics and tests).
    pub fn subscribers(&self) -> usize {
        self.batches.receiver_count()
    }
}

/// Reads the history from the published position and publishes what it finds, whenever
/// woken and at least every `poll`.
async fn read_loop(
    feed: Arc<Feed>,
    conn: AsyncPgConnection,
    database_url: String,
    position_tx: watch::Sender<Position>,
    poll: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conn = Some(conn);
    let mut backoff = BACKOFF_MIN;
    let mut recheck = PENDING_RECHECK;
    loop {
        let at = *position_tx.borrow();
        let delay = match drain(&feed, &mut conn, &database_url, at, &position_tx).await {
            Ok(pending) => {
                backoff = BACKOFF_MIN;
                if pending {
                    let d = recheck;
                    recheck = (recheck * 2).min(poll);
                    d
                } else {
                    recheck = PENDING_RECHECK;
                    poll
                }
            }
            Err(e) => {
                conn = None;
                tracing::warn!(error = %e, retry_in = ?backoff, "change feed: reading the history failed");
                let d = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                d
            }
        };
        tokio::select! {
            _ = feed.wake.notified() => {}
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Reads until caught up with the horizon; returns whether events wait above it.
async fn drain(
    feed: &Feed,
    conn: &mut Option<AsyncPgConnection>,
    database_url: &str,
    mut at: Position,
    position_tx: &watch::Sender<Position>,
) -> Result<bool> {
    if conn.is_none() {
        *conn = Some(db::connect(database_url).await?);
    }
    let c = conn.as_mut().expect("connected above");
    loop {
        let read = events::read(c, at, READ_LIMIT, None).await?;
        let full = read.events.len() as i64 == READ_LIMIT;
        let end = match read.events.last() {
            Some(last) if full => last.position(),
            _ => at.max(Position::below(read.horizon)),
        };
        if !read.events.is_empty() {
            let events = read
                .events
                .into_iter()
                .map(|row| Event::new(row, &feed.tokens))
                .collect();
            // No receivers is fine.
            let _ = feed.batches.send(Arc::new(Batch { events, end }));
        }
        if end > at {
            position_tx.send_replace(end);
            at = end;
        }
        if !full {
            return Ok(read.pending);
        }
    }
}

/// Wakes the reader on every NOTIFY from another replica; reconnects with backoff and makes
/// the reader catch up after each (re)connect, so a lost notification only delays.
async fn listen_loop(feed: Arc<Feed>, database_url: String, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let result: Result<()> = async {
            let mut conn = db::connect(&database_url).await?;
            diesel::sql_query(format!("LISTEN {CHANNEL}"))
                .execute(&mut conn)
                .await?;
            backoff = BACKOFF_MIN;
            feed.wake.notify_one();
            let mut notifications = std::pin::pin!(conn.notifications_stream());
            loop {
                tokio::select! {
                    n = notifications.next() => match n {
                        Some(Ok(_)) => feed.wake.notify_one(),
                        Some(Err(e)) => return Err(e.into()),
                        None => return Ok(()),
                    },
                    _ = shutdown.changed() => return Ok(()),
                }
            }
        }
        .await;
        if *shutdown.borrow() {
            return;
        }
        match result {
            Ok(()) => tracing::warn!("change feed: listener connection closed; reconnecting"),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "change feed: listener failed")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Sends one NOTIFY per burst of local commits, outside any write transaction.
async fn notify_loop(feed: Arc<Feed>, pool: PgPool, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = feed.committed.notified() => {}
            _ = shutdown.changed() => return,
        }
        let result: Result<()> = async {
            let mut conn = pool.get().await?;
            diesel::sql_query(format!("NOTIFY {CHANNEL}"))
                .execute(&mut conn)
                .await?;
            Ok(())
        }
        .await;
        if let Err(e) = result {
            // The others still find the change by polling.
            tracing::debug!(error = %e, "change feed: NOTIFY failed");
        }
    }
}

/// Deletes history older than the retention window, in batches.
async fn prune_loop(pool: PgPool, retention: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut delay = PRUNE_FIRST;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
        delay = PRUNE_INTERVAL;
        let mut total = 0;
        let result: Result<()> = async {
            let mut conn = pool.get().await?;
            loop {
                let n = events::prune(&mut conn, retention, PRUNE_BATCH).await?;
                total += n;
                if n == 0 || *shutdown.borrow() {
                    return Ok(());
                }
            }
        }
        .await;
        match result {
            Ok(()) if total > 0 => tracing::info!(events = total, "change feed: pruned history"),
            Ok(()) => {}
            Err(e) => tracing::warn!(error = %e, "change feed: pruning failed"),
        }
    }
}
