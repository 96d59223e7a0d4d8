//! StreamJobUpdates: one task per stream, fed by the process's [`Feed`].
//!
//! A stream keeps a cursor (a feed [`Position`]): every event at or below it has been either
//! sent or found not to match. It starts
//! - from a resume token: caught up from the history, then live;
//! - with `include_existing`: after the matching jobs of one REPEATABLE READ snapshot, at
//!   that snapshot's xmin, skipping the events whose writer the snapshot already sees (they
//!   are in it); no gap, no duplicate;
//! - otherwise: from now, exactly: like `include_existing` with no jobs sent, so a change
//!   committed before the call is never delivered, one committed after always is.
//!
//! Live, it takes the matching events the feed queues for it; when the queue overflowed
//! (its client reads slowly, so sends block), it catches up from the history at its own pace
//! and goes on with the queue, skipping what it already sent.
//! What it sends are [`Delivery`] values, domain jobs with the point to resume from; the API
//! layer turns each into a message (and signs its resume token) on its way to the client.
//! They go through a small channel to tonic: when the client goes away, tonic drops the
//! receiver and the task sees it at once, whatever it is waiting for.
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::event::Event;
use super::hub::Feed;
use super::limits::{Limit, Slot};
use super::reader::READ_LIMIT;
use super::registry::Subscription;
use crate::db::events;
use crate::db::{self, PgPool};
use crate::domain::{Caller, Job, Position, Snapshot, WatchFilter};
use crate::error::{Error, Result};
use crate::metrics::GaugeGuard;

/// Snapshots of `include_existing` read at once per process (each on its own connection); a
/// stream waits up to `SNAPSHOT_WAIT` for a turn, then ends with RESOURCE_EXHAUSTED.
pub const SNAPSHOT_CONNECTIONS: usize = 16;
const SNAPSHOT_WAIT: Duration = Duration::from_secs(10);

/// Messages buffered between a stream's task and tonic.
const CHANNEL_CAPACITY: usize = 16;
/// A client that reads none of the initial snapshot for this long ends its stream.
const SNAPSHOT_STALL: Duration = Duration::from_secs(30);
/// How long the last message (the error that ends a stream) waits for a slow client.
const FINAL_SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Jobs per statement of the initial snapshot.
const SNAPSHOT_PAGE: i64 = 500;
/// The longest a stream may take to send its initial jobs, however steadily its client reads:
/// a snapshot's REPEATABLE READ transaction holds back vacuum and a snapshot connection.
const SNAPSHOT_DEADLINE: Duration = Duration::from_secs(300);
/// Catch-up reads of the history (a stream resuming, or one that fell behind) that run at once
/// per process: a burst of resumed streams takes at most this many pooled connections.
pub const CATCH_UP_CONCURRENCY: usize = 4;
/// The database cancels a catch-up read that takes longer (its index keeps it short).
const CATCH_UP_STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a stream starts.
#[derive(Debug, Clone)]
pub enum Start {
    Now,
    Existing,
    /// From a resume token: its position, and the snapshot it still skips, if any.
    Resume(Position, Option<Snapshot>),
}

/// What a stream sends, before the API layer makes a message of it.
#[derive(Debug)]
pub enum Delivery {
    /// A job of the initial snapshot (`include_existing`). It carries no resume point: a
    /// client that reconnects mid-snapshot starts over.
    Existing(Box<Job>),
    /// A committed change that matched, and where the stream stands just after it.
    Change(Arc<Event>, ResumePoint),
    /// The live feed is attached: from here on nothing is missed.
    Synced(ResumePoint),
    /// Nothing happened for a heartbeat interval; the resume point moves on.
    Heartbeat(ResumePoint),
}

/// Where a client that reconnects resumes: a position, and the snapshot whose changes it
/// still skips (those its initial jobs, or "now", already reflect).
#[derive(Debug, Clone)]
pub struct ResumePoint {
    pub at: Position,
    pub skip: Option<Snapshot>,
}

/// Everything one stream needs.
pub struct StreamTask {
    pub pool: PgPool,
    /// For the snapshot of `include_existing`, read on a connection of its own...
    pub database_url: Arc<str>,
    /// ...of which at most `SNAPSHOT_CONNECTIONS` are open at once...
    pub snapshot_slots: Arc<tokio::sync::Semaphore>,
    /// ...and a few per user.
    pub snapshots_per_caller: Arc<Limit>,
    /// Bounds the catch-up reads running at once ([`CATCH_UP_CONCURRENCY`]).
    pub catch_up_slots: Arc<tokio::sync::Semaphore>,
    pub feed: Arc<Feed>,
    pub caller: Caller,
    pub filter: WatchFilter,
    pub start: Start,
    pub heartbeat: Duration,
    pub shutdown: watch::Receiver<bool>,
    pub request_id: String,
}

/// Deliveries travel boxed: a channel allocates its first block of slots up front, and a
/// 296-byte update in each of 32 slots was 9.5 KB of every idle stream's memory. The error
/// that ends a stream travels as such, for the API layer to answer.
pub type Deliveries = mpsc::Receiver<Result<Box<Delivery>, Error>>;
type Tx = mpsc::Sender<Result<Box<Delivery>, Error>>;

/// Checks a resume position against the kept history: OUT_OF_RANGE when events after it
/// may be gone, or when it is not a position of this database's history at all.
pub async fn check_resumable(pool: &PgPool, at: Position) -> Result<()> {
    let mut conn = pool.get().await?;
    let (pruned, next_xid) = events::resumable_range(&mut conn).await?;
    if at < pruned || at.xid > next_xid {
        return Err(Error::OutOfRange {
            reason: "RESUME_TOKEN_EXPIRED",
            message: "resume_token is older than the kept history (or from another database); \
                      list the jobs again and start a new stream without a token"
                .into(),
        });
    }
    Ok(())
}

impl StreamTask {
    /// Subscribes (and, starting from now, takes the snapshot that defines "now") before the
    /// call answers, then runs the stream in its own task; the receiver is the gRPC response
    /// stream.
    /// `open` counts the stream as open, and `slot` holds its place under the caller's limit,
    /// until its task ends.
    pub async fn start(self, open: GaugeGuard, slot: Slot) -> Result<Deliveries> {
        let (sub, published) = self.feed.subscribe(self.filter.clone());
        let mut state = Cursor {
            at: published,
            skip: None,
        };
        if let Start::Now = self.start {
            // "From now" is exact: a change committed before this call is skipped even if
            // the feed has not published it yet; one committed after the call returned is
            // always delivered.
            let mut conn = self.pool.get().await?;
            let (snapshot, tail) = Box::pin(events::snapshot(&mut conn)).await?;
            state.advance(tail);
            state.skip = Some(snapshot);
        }
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        tokio::spawn(async move {
            let _open = (open, slot);
            let request_id = self.request_id.clone();
            // The token's expiry ends the stream wherever it is: sending the existing jobs,
            // catching up, or live.
            let expiry = tokio::time::sleep(self.caller.valid_for());
            let result = tokio::select! {
                r = self.follow(&tx, sub, state) => r,
                _ = expiry => Err(Error::token_expired()),
                // The client went away: stop at once, whatever the task was waiting for.
                _ = tx.closed() => Ok(()),
            };
            match result {
                Ok(()) => tracing::debug!(request_id, "stream ended"),
                // Nobody to tell (and nothing went wrong on our side).
                Err(_) if tx.is_closed() => tracing::debug!(request_id, "client went away"),
                Err(e) => {
                    tracing::info!(request_id, reason = e.reason(), "stream ended with error");
                    // A client that does not read does not keep the task.
                    let _ = tx.send_timeout(Err(e), FINAL_SEND_TIMEOUT).await;
                }
            }
        });
        Ok(rx)
    }

    /// Sends until the client leaves, the token expires or the server shuts down.
    ///
    /// This future is the stream's task, alive as long as the stream: the database reads
    /// (the initial jobs, catching up, the resume check) are boxed, so that an idle stream
    /// does not keep room for them (4.9 KB a task before, 2.2 KB after).
    async fn follow(self, tx: &Tx, mut sub: Subscription, mut state: Cursor) -> Result<()> {
        match self.start {
            Start::Now => {}
            Start::Existing => {
                let (snapshot, tail) = Box::pin(self.send_existing(tx)).await?;
                // Everything below xmin is in the snapshot; above it, what the snapshot sees.
                state.advance(tail);
                state.skip = Some(snapshot);
            }
            Start::Resume(at, ref skip) => {
                state.at = at;
                state.skip = skip.clone();
                Box::pin(self.catch_up(tx, &mut state)).await?;
                // A prune between the call's check and the first read would leave a gap.
                Box::pin(check_resumable(&self.pool, at)).await?;
            }
        }
        self.send(tx, Delivery::Synced(state.resume_point()))
            .await?;

        let mut shutdown = self.shutdown.clone();
        let mut next_heartbeat = Instant::now() + self.heartbeat;
        loop {
            // Events were dropped while the queue was full: take them from the history.
            if sub.take_lagged() {
                tracing::debug!(
                    request_id = self.request_id,
                    "stream behind the feed; catching up from the history"
                );
                Box::pin(self.catch_up(tx, &mut state)).await?;
            }
            tokio::select! {
                event = sub.recv() => match event {
                    Some(event) => {
                        if self.offer(tx, &event, &mut state).await? {
                            next_heartbeat = Instant::now() + self.heartbeat;
                        }
                    }
                    None => return Err(shutting_down()),
                },
                _ = tokio::time::sleep_until(next_heartbeat) => {
                    self.settle(tx, &mut sub, &mut state).await?;
                    self.send(tx, Delivery::Heartbeat(state.resume_point())).await?;
                    next_heartbeat = Instant::now() + self.heartbeat;
                }
                _ = shutdown.changed() => return Err(shutting_down()),
            }
        }
    }

    /// Moves the cursor to the feed's published position: everything matching below it is
    /// in the queue (or, after a lag, in the history), so take that first.
    async fn settle(&self, tx: &Tx, sub: &mut Subscription, state: &mut Cursor) -> Result<()> {
        let p = self.feed.published();
        while let Some(event) = sub.try_recv() {
            self.offer(tx, &event, state).await?;
        }
        if sub.take_lagged() {
            Box::pin(self.catch_up(tx, state)).await?;
        }
        state.advance(p);
        Ok(())
    }

    /// Sends the matching jobs as they are in one snapshot; returns that snapshot and its
    /// tail (where the stream then stands). The
    /// snapshot's transaction runs on a connection of its own, not the pool's (a client that
    /// reads slowly must not hold a pooled connection), and a client that stops reading for
    /// `SNAPSHOT_STALL` ends the stream rather than keep that transaction open.
    async fn send_existing(&self, tx: &Tx) -> Result<(Snapshot, Position)> {
        let _mine = self.snapshots_per_caller.enter(&self.caller)?;
        tokio::time::timeout(SNAPSHOT_DEADLINE, self.send_snapshot(tx))
            .await
            .unwrap_or_else(|_| {
                Err(Error::ResourceExhausted {
                    reason: "STREAM_TOO_SLOW",
                    message: format!(
                        "the initial jobs took longer than {}s to send; narrow the filter, or \
                         list the jobs and start the stream without include_existing",
                        SNAPSHOT_DEADLINE.as_secs()
                    ),
                })
            })
    }

    async fn send_snapshot(&self, tx: &Tx) -> Result<(Snapshot, Position)> {
        use diesel_async::SimpleAsyncConnection;
        let _slot =
            tokio::time::timeout(SNAPSHOT_WAIT, self.snapshot_slots.clone().acquire_owned())
                .await
                .ok()
                .and_then(|r| r.ok())
                .ok_or_else(|| Error::ResourceExhausted {
                    reason: "OVERLOADED",
                    message: format!(
                        "too many streams are reading their initial jobs; retry with backoff \
                     (at most {SNAPSHOT_CONNECTIONS} at once per server)"
                    ),
                })?;
        let mut conn = db::connect(&self.database_url).await?;
        conn.batch_execute(&db::snapshot_begin_sql(&self.caller))
            .await?;
        let (snapshot, tail) = events::snapshot(&mut conn).await?;
        let mut after = None;
        loop {
            let (page, full) =
                events::existing_jobs(&mut conn, &self.filter, after, SNAPSHOT_PAGE).await?;
            after = page.last().map(|j| j.id);
            for job in page {
                let existing = Box::new(Delivery::Existing(Box::new(job)));
                match tx.send_timeout(Ok(existing), SNAPSHOT_STALL).await {
                    Ok(()) => {}
                    Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                        return Err(Error::ResourceExhausted {
                            reason: "STREAM_TOO_SLOW",
                            message: format!(
                                "the client read nothing of the initial jobs for {}s; read \
                                 the stream continuously, or narrow the filter",
                                SNAPSHOT_STALL.as_secs()
                            ),
                        });
                    }
                    Err(mpsc::error::SendTimeoutError::Closed(_)) => return Err(client_gone()),
                }
            }
            if !full {
                conn.batch_execute("COMMIT").await?;
                return Ok((snapshot, tail));
            }
        }
    }

    /// Reads the history from the cursor up to the horizon, sending what matches. Each page
    /// is read in the caller's row-level-security scope (the statement's own user filter has
    /// the database's behind it), with a statement timeout, under the process's catch-up
    /// limit; the pooled connection is given back before the page is sent.
    async fn catch_up(&self, tx: &Tx, state: &mut Cursor) -> Result<()> {
        loop {
            let read = {
                let _turn = self
                    .catch_up_slots
                    .acquire()
                    .await
                    .map_err(|_| shutting_down())?;
                let mut db =
                    db::scoped_read(&self.pool, &self.caller, CATCH_UP_STATEMENT_TIMEOUT).await?;
                let at = state.at;
                let user = self.filter.user;
                let read = db.exec(|c| events::read(c, at, READ_LIMIT, user)).await;
                db.finish(read).await?
            };
            let full = read.more;
            for row in read.events {
                self.offer(tx, &Arc::new(Event::from(row)), state).await?;
            }
            if !full {
                state.advance(read.tail);
                return Ok(());
            }
        }
    }

    /// Sends `event` if it is new to this stream, matches, and is not in the stream's
    /// snapshot; returns whether it was sent.
    async fn offer(&self, tx: &Tx, event: &Arc<Event>, state: &mut Cursor) -> Result<bool> {
        if event.position <= state.at {
            return Ok(false);
        }
        state.advance(event.position);
        if state.already_seen(event) || !self.filter.matches(&event.job) {
            return Ok(false);
        }
        // While the stream skips its snapshot, its resume points must carry that snapshot.
        let resume = ResumePoint {
            at: event.position,
            skip: state.skip.clone(),
        };
        self.send(tx, Delivery::Change(event.clone(), resume))
            .await?;
        Ok(true)
    }

    async fn send(&self, tx: &Tx, delivery: Delivery) -> Result<()> {
        tx.send(Ok(Box::new(delivery)))
            .await
            .map_err(|_| client_gone())
    }
}

/// A stream's position, and the snapshot whose changes it must not send again.
struct Cursor {
    at: Position,
    skip: Option<Snapshot>,
}

impl Cursor {
    fn advance(&mut self, to: Position) {
        self.at = self.at.max(to);
        // Past the snapshot's xmax nothing it saw can come up any more.
        if self
            .skip
            .as_ref()
            .is_some_and(|s| self.at >= Position::below(s.xmax))
        {
            self.skip = None;
        }
    }

    fn resume_point(&self) -> ResumePoint {
        ResumePoint {
            at: self.at,
            skip: self.skip.clone(),
        }
    }

    fn already_seen(&self, event: &Event) -> bool {
        self.skip.as_ref().is_some_and(|s| s.sees(event.writer_xid))
    }
}

fn shutting_down() -> Error {
    Error::ShuttingDown
}

/// The send failed because the receiver is gone: the client left. Never reaches a client.
fn client_gone() -> Error {
    Error::Internal("client went away".into())
}
