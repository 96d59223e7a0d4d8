//! Wake-ups between replicas: a commit here sends one NOTIFY per burst; a NOTIFY from another
//! replica wakes this process's reader. A lost wake-up only delays: the reader still polls.
use std::sync::Arc;
use std::time::Duration;

use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::StreamExt;
use tokio::sync::watch;

use super::hub::Feed;
use crate::db;
use crate::error::Result;

/// The NOTIFY channel replicas wake each other on. The payload is always empty: it only says
/// "read the history".
pub const CHANNEL: &str = "jobsvc_feed";
/// `application_name` of the listener connection (what an operator sees in pg_stat_activity).
pub const LISTENER_NAME: &str = "jobsvc: feed listener";

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// At most one NOTIFY per this interval: under a steady stream of commits the other
/// replicas are woken 100 times a second, not once per commit.
const NOTIFY_MIN_INTERVAL: Duration = Duration::from_millis(10);
// The NOTIFY statement. A transaction that notifies takes an xid and writes a commit
// record; its durability is worthless (a lost wake-up only delays, the poll still finds the
// change), so it does not wait for the WAL flush.
const NOTIFY_SQL: &str = "BEGIN; SET LOCAL synchronous_commit = off; NOTIFY jobsvc_feed; COMMIT";

/// Wakes the reader on every NOTIFY from another replica; reconnects with backoff and makes
/// the reader catch up after each (re)connect, so a lost notification only delays.
pub(super) async fn listen_loop(
    feed: Arc<Feed>,
    database_url: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let result: Result<()> = async {
            let mut conn = db::connect_named(&database_url, LISTENER_NAME).await?;
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

/// Sends one NOTIFY per burst of local commits (at most one per `NOTIFY_MIN_INTERVAL`),
/// outside any write transaction.
/// Its own connection, not a pooled one: after a failure inside the BEGIN ... COMMIT batch
/// the connection may be left in a transaction, and it is dropped, never handed to a caller.
pub(super) async fn notify_loop(
    feed: Arc<Feed>,
    database_url: String,
    mut shutdown: watch::Receiver<bool>,
) {
    use diesel_async::SimpleAsyncConnection;
    let mut conn: Option<AsyncPgConnection> = None;
    loop {
        tokio::select! {
            _ = feed.committed.notified() => {}
            _ = shutdown.changed() => return,
        }
        let next = tokio::time::Instant::now() + NOTIFY_MIN_INTERVAL;
        let result: Result<()> = async {
            if conn.is_none() {
                conn = Some(db::connect_named(&database_url, "jobsvc: feed notifier").await?);
            }
            conn.as_mut()
                .expect("connected above")
                .batch_execute(NOTIFY_SQL)
                .await?;
            Ok(())
        }
        .await;
        if result.is_err() {
            conn = None;
        }
        tokio::time::sleep_until(next).await;
        if let Err(e) = result {
            // The others still find the change by polling.
            tracing::debug!(error = %e, "change feed: NOTIFY failed");
        }
    }
}
