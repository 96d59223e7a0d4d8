//! The one reader of the history per process: reads `job_events` from the published position
//! and dispatches what it finds, whenever woken and at least every poll interval.
use std::sync::Arc;
use std::time::Duration;

use diesel_async::AsyncPgConnection;
use tokio::sync::watch;

use super::event::Event;
use super::hub::Feed;
use crate::db;
use crate::db::events;
use crate::domain::Position;
use crate::error::{Error, Result};

/// While committed events wait above the horizon for an older transaction, the reader looks
/// again after this, doubling up to the poll interval.
const PENDING_RECHECK: Duration = Duration::from_millis(2);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A read of the history that takes longer is abandoned with its connection (a half-open
/// connection would otherwise freeze the feed until TCP gives up).
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Events per read of the history.
pub const READ_LIMIT: i64 = 1000;

/// Reads the history from the published position and publishes what it finds, whenever
/// woken and at least every `poll`.
pub(super) async fn read_loop(
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
        // With nobody subscribed, commits need no read: a subscriber starts from the history
        // at the published position, however old. So an idle reader only keeps the position
        // fresh every poll, and wakes for the first subscriber (not for every commit, which
        // under load would mean hundreds of reads a second for no one).
        let idle = feed.registry.lock().unwrap().entries.is_empty();
        if idle {
            tokio::select! {
                _ = feed.subscribed.notified() => {}
                _ = tokio::time::sleep(poll.max(delay)) => {}
                _ = shutdown.changed() => return,
            }
        } else {
            tokio::select! {
                _ = feed.wake.notified() => {}
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return,
            }
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
        *conn = Some(db::connect_named(database_url, "jobsvc: feed reader").await?);
    }
    let c = conn.as_mut().expect("connected above");
    loop {
        // With nobody subscribed, only the horizon matters: a new subscriber always starts
        // from the history, never from what the reader held.
        let idle = feed.registry.lock().unwrap().entries.is_empty();
        let limit = if idle { 0 } else { READ_LIMIT };
        let read = tokio::time::timeout(READ_TIMEOUT, events::read(&*c, at, limit, None))
            .await
            .map_err(|_| Error::Unavailable("change feed read timed out".into()))??;
        if read.horizon < at.xid || read.tail < at {
            // The history went back (a restore, a failover to a replica that was behind, a
            // crash that lost asynchronously committed plain SQL writes): positions past what
            // the database holds mean nothing here.
            tracing::warn!(
                horizon = read.horizon,
                position = at.xid,
                tail = read.tail.xid,
                "change feed: the database's history went back; restarting at its tail"
            );
            at = read.tail;
            position_tx.send_replace(at);
            continue;
        }
        if idle {
            let registry = feed.registry.lock().unwrap();
            if !registry.entries.is_empty() {
                // Someone subscribed during the read: its events must be dispatched.
                continue;
            }
            // Published under the lock, so a subscriber that comes next starts from the
            // history at or after this point.
            let end = at.max(read.tail);
            if end > at {
                position_tx.send_replace(end);
            }
            feed.metrics.feed_lag_seconds.set(0.0);
            feed.metrics.feed_subscribers.set(0);
            return Ok(read.pending);
        }
        let full = read.more;
        let end = match read.events.last() {
            Some(last) if full => last.position(),
            _ => at.max(read.tail),
        };
        let now = chrono::Utc::now();
        let mut lag = 0.0;
        if !read.events.is_empty() {
            let events: Vec<Arc<Event>> = read
                .events
                .into_iter()
                .map(|row| {
                    lag = (now - row.job.updated_at).as_seconds_f64().max(0.0);
                    feed.metrics.feed_delay.observe(lag);
                    Arc::new(Event::from(row))
                })
                .collect();
            let mut registry = feed.registry.lock().unwrap();
            for event in &events {
                registry.dispatch(event);
            }
        }
        feed.metrics.feed_lag_seconds.set(lag);
        feed.metrics
            .feed_subscribers
            .set(feed.registry.lock().unwrap().entries.len() as i64);
        if end > at {
            position_tx.send_replace(end);
            at = end;
        }
        if !full {
            return Ok(read.pending);
        }
    }
}
