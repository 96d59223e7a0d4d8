//! Whether the database answers, known within about a second, so that calls fail fast while it
//! does not.
//!
//! A pool alone cannot tell: a connection whose packets vanish (a network partition, a hung
//! server) hangs its statement until TCP gives up, minutes later. So one monitor pings the
//! database on a connection of its own (outside the pool, so a busy pool is not mistaken
//! for a lost database) every [`PING_INTERVAL`]. A ping that fails or takes longer than
//! [`PING_TIMEOUT`] marks the database down; while it is down, new calls answer UNAVAILABLE
//! at once and calls already waiting on it are abandoned with UNAVAILABLE. The first ping that
//! answers again marks it up.
//!
//! A lost connection alone is not an outage: a ping that fails with an error is retried at once
//! on a new connection (its backend may merely have been terminated), within the same timeout.
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use diesel_async::{AsyncPgConnection, SimpleAsyncConnection};
use tokio::sync::watch;

use super::{Lanes, PgPool};
use crate::error::{Error, Result};

/// How often the monitor pings.
pub const PING_INTERVAL: Duration = Duration::from_millis(250);
/// A ping (with a reconnect if needed) that takes longer marks the database down. With the
/// interval, an outage is noticed within a second.
pub const PING_TIMEOUT: Duration = Duration::from_millis(750);

/// The database's reachability as last seen by the monitor; cheap to clone and to query.
#[derive(Clone)]
pub struct DbHealth {
    up: watch::Receiver<bool>,
}

impl DbHealth {
    /// Starts the monitor for `database_url`; it stops on shutdown. The database counts as up
    /// until a ping says otherwise (the server has just migrated it). When it changes either
    /// way, the idle connections of `pools` are closed and `lanes` are retired: a connection
    /// abandoned mid-statement during an outage may still wait on a dead socket, and must not
    /// serve the next call.
    pub fn start(
        database_url: String,
        pools: Vec<PgPool>,
        lanes: Arc<Lanes>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let (tx, rx) = watch::channel(true);
        tokio::spawn(monitor(database_url, pools, lanes, tx, shutdown));
        DbHealth { up: rx }
    }

    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// Err(UNAVAILABLE) while the database is down.
    pub fn check(&self) -> Result<()> {
        if self.is_up() {
            Ok(())
        } else {
            Err(Error::Unavailable("the database is not answering".into()))
        }
    }

    /// Resolves when the database goes down (never, while it stays up).
    pub async fn lost(&self) {
        let mut up = self.up.clone();
        if up.wait_for(|up| !*up).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Resolves on every change of reachability; returns the new state.
    pub async fn changed(&mut self) -> Option<bool> {
        self.up.changed().await.ok()?;
        Some(*self.up.borrow_and_update())
    }

    /// Runs `work` unless the database is down, and abandons it with UNAVAILABLE if the
    /// database goes down meanwhile.
    ///
    /// A future of its own rather than an `async fn`: an `async fn` that takes a future by
    /// value and awaits it keeps that future twice in its state (rust-lang/rust#62958), and
    /// every call's work passes through here, so each call's future (which tonic boxes) was
    /// twice its work's size or more.
    pub fn guard<F>(&self, work: F) -> Guarded<F, impl Future<Output = ()> + '_> {
        Guarded {
            refused: self.check().err(),
            work,
            lost: self.lost(),
        }
    }
}

pin_project_lite::pin_project! {
    /// See [`DbHealth::guard`].
    pub struct Guarded<F, L> {
        refused: Option<Error>,
        #[pin]
        work: F,
        #[pin]
        lost: L,
    }
}

impl<T, F, L> Future for Guarded<F, L>
where
    F: Future<Output = Result<T>>,
    L: Future<Output = ()>,
{
    type Output = Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let this = self.project();
        if let Some(e) = this.refused.take() {
            return Poll::Ready(Err(e));
        }
        // The work first: an answer that is ready wins over an outage noticed meanwhile.
        if let Poll::Ready(result) = this.work.poll(cx) {
            return Poll::Ready(result);
        }
        match this.lost.poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Error::Unavailable(
                "the database stopped answering during the call".into(),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

async fn monitor(
    database_url: String,
    pools: Vec<PgPool>,
    lanes: Arc<Lanes>,
    up: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conn: Option<AsyncPgConnection> = None;
    loop {
        let answered = tokio::time::timeout(PING_TIMEOUT, ping(&database_url, &mut conn))
            .await
            .unwrap_or_else(|_| Err(Error::Unavailable("ping timed out".into())));
        if answered.is_err() {
            // A connection stuck mid-ping must not be reused.
            conn = None;
        }
        let now_up = answered.is_ok();
        if up.send_if_modified(|was| std::mem::replace(was, now_up) != now_up) {
            for pool in &pools {
                pool.retain(|_, _| false);
            }
            lanes.retire_all();
            match &answered {
                Ok(()) => tracing::info!("database answering again"),
                Err(e) => tracing::warn!(error = %e, "database not answering: calls fail fast"),
            }
        } else {
            for pool in &pools {
                super::retire_idle(pool, super::MAX_IDLE);
            }
            lanes.retire_idle(super::MAX_IDLE);
        }
        tokio::select! {
            _ = tokio::time::sleep(PING_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// `SELECT 1` on the monitor's connection; on an error, once more on a new connection.
async fn ping(database_url: &str, conn: &mut Option<AsyncPgConnection>) -> Result<()> {
    if let Some(c) = conn.as_mut()
        && c.batch_execute("SELECT 1").await.is_ok()
    {
        return Ok(());
    }
    *conn = None;
    let mut c = super::connect_named(database_url, "jobsvc: health monitor").await?;
    c.batch_execute("SELECT 1").await?;
    *conn = Some(c);
    Ok(())
}
