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
//! Live, it takes the feed's batches; when it falls behind the feed's ring (its client reads
//! slowly, so sends block), it catches up from the history at its own pace and rejoins.
//! Messages go through a small channel to tonic: when the client goes away, tonic drops the
//! receiver and the task sees it at once, whatever it is waiting for.
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use tonic::Status;
use uuid::Uuid;

use crate::auth::Caller;
use crate::db::events::{self, JobsFilter, Position, Snapshot};
use crate::db::{self, PgPool};
use crate::domain::JobStatus;
use crate::error::{Error, Result};
use crate::feed::{Batch, Event, Feed, READ_LIMIT};
use crate::pb;
use crate::pb::job_update::Event as Update;

/// Messages buffered between a stream's task and tonic.
const CHANNEL_CAPACITY: usize = 16;
/// Jobs per statement of the initial snapshot.
const SNAPSHOT_PAGE: i64 = 500;
/// At most this many `job_ids` in one request.
pub const MAX_JOB_IDS: usize = 1000;

/// What a stream delivers: every field set must match the job's new state.
#[derive(Debug, Clone, Default)]
pub struct StreamFilter {
    pub job_ids: HashSet<Uuid>,
    pub statuses: Vec<JobStatus>,
    pub agent_identifier: Option<String>,
    /// The effective owner scope: always the user itself for a user's stream.
    pub user: Option<Uuid>,
}

impl StreamFilter {
    pub fn matches(&self, e: &Event) -> bool {
        (self.job_ids.is_empty() || self.job_ids.contains(&e.id))
            && (self.statuses.is_empty() || self.statuses.contains(&e.status))
            && self
                .agent_identifier
                .as_deref()
                .is_none_or(|a| a == e.job.agent_identifier)
            && self.user.is_none_or(|u| e.user_id == Some(u))
    }

    fn jobs_filter(&self) -> JobsFilter {
        JobsFilter {
            job_ids: self.job_ids.iter().copied().collect(),
            statuses: self.statuses.clone(),
            agent_identifier: self.agent_identifier.clone(),
            user: self.user,
        }
    }
}

/// Where a stream starts.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    Now,
    Existing,
    Resume(Position),
}

/// Everything one stream needs.
pub struct Stream {
    pub pool: PgPool,
    pub feed: Arc<Feed>,
    pub caller: Caller,
    pub filter: StreamFilter,
    pub start: Start,
    pub heartbeat: Duration,
    pub shutdown: watch::Receiver<bool>,
    pub request_id: String,
}

type Tx = mpsc::Sender<Result<pb::JobUpdate, Status>>;

/// Checks a resume position against the pruned history: OUT_OF_RANGE when events after it
/// may be gone.
pub async fn check_resumable(pool: &PgPool, at: Position) -> Result<()> {
    let mut conn = pool.get().await?;
    let pruned = events::pruned_through(&mut conn).await?;
    if at < pruned {
        return Err(Error::OutOfRange {
            reason: "RESUME_TOKEN_EXPIRED",
            message: "resume_token is older than the kept history; list the jobs again and \
                      start a new stream without a token"
                .into(),
        });
    }
    Ok(())
}

impl Stream {
    /// Starts the stream's task; the receiver is the gRPC response stream.
    pub fn spawn(self) -> mpsc::Receiver<Result<pb::JobUpdate, Status>> {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        tokio::spawn(async move {
            let request_id = self.request_id.clone();
            let result = tokio::select! {
                r = self.run(&tx) => r,
                // The client went away: stop at once, whatever the task was waiting for.
                _ = tx.closed() => Ok(()),
            };
            match result {
                Ok(()) => tracing::debug!(request_id, "stream ended"),
                Err(e) => {
                    tracing::info!(request_id, reason = e.reason(), "stream ended with error");
                    let _ = tx.send(Err(e.into_status(&request_id))).await;
                }
            }
        });
        rx
    }

    async fn run(self, tx: &Tx) -> Result<()> {
        let (mut rx, published) = self.feed.subscribe();
        let mut state = Cursor {
            at: published,
            skip: None,
        };
        match self.start {
            Start::Now => {
                // "From now" is exact: changes committed before this call are skipped even
                // if the feed has not published them yet.
                let mut conn = self.pool.get().await?;
                let snapshot = events::snapshot(&mut conn).await?;
                state.advance(Position::below(snapshot.xmin));
                state.skip = Some(snapshot);
            }
            Start::Existing => {
                let snapshot = self.send_existing(tx).await?;
                // Everything below xmin is in the snapshot; above it, what the snapshot sees.
                state.at = Position::below(snapshot.xmin);
                state.skip = Some(snapshot);
            }
            Start::Resume(at) => {
                state.at = at;
                self.catch_up(tx, &mut state).await?;
            }
        }
        self.send(tx, Update::Synced(pb::StreamSynced {}), &state)
            .await?;

        let expiry = expiry_instant(self.caller.expires_at());
        let mut shutdown = self.shutdown.clone();
        let mut next_heartbeat = Instant::now() + self.heartbeat;
        loop {
            tokio::select! {
                batch = rx.recv() => match batch {
                    Ok(batch) => {
                        if self.deliver(tx, &batch, &mut state).await? {
                            next_heartbeat = Instant::now() + self.heartbeat;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::debug!(request_id = self.request_id, missed, "stream behind the feed; catching up from the history");
                        rx = self.feed.subscribe().0;
                        self.catch_up(tx, &mut state).await?;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Err(shutting_down()),
                },
                _ = tokio::time::sleep_until(next_heartbeat) => {
                    // Everything published up to `p` is in `rx` already: take it, then stand at `p`.
                    let p = self.feed.published();
                    loop {
                        match rx.try_recv() {
                            Ok(batch) => { self.deliver(tx, &batch, &mut state).await?; }
                            Err(broadcast::error::TryRecvError::Lagged(_)) => {
                                rx = self.feed.subscribe().0;
                                self.catch_up(tx, &mut state).await?;
                            }
                            Err(_) => break,
                        }
                    }
                    state.advance(p);
                    self.send(tx, Update::Heartbeat(pb::StreamHeartbeat {}), &state).await?;
                    next_heartbeat = Instant::now() + self.heartbeat;
                }
                _ = tokio::time::sleep_until(expiry) => {
                    return Err(Error::unauthenticated(
                        "TOKEN_EXPIRED",
                        "the token expired; reconnect with a fresh token and the last resume_token",
                    ));
                }
                _ = shutdown.changed() => return Err(shutting_down()),
            }
        }
    }

    /// Sends the matching jobs as they are in one snapshot; returns that snapshot.
    async fn send_existing(&self, tx: &Tx) -> Result<Snapshot> {
        let mut db = db::scoped_snapshot(&self.pool, &self.caller).await?;
        let result = async {
            let snapshot = events::snapshot(db.conn()).await?;
            let filter = self.filter.jobs_filter();
            let mut after = None;
            loop {
                let page = events::existing_jobs(db.conn(), &filter, after, SNAPSHOT_PAGE).await?;
                let full = page.len() as i64 == SNAPSHOT_PAGE;
                after = page.last().map(|j| j.id);
                for job in page {
                    let update = pb::JobUpdate {
                        resume_token: String::new(),
                        event: Some(Update::Job(crate::convert::job_to_pb(job))),
                    };
                    tx.send(Ok(update)).await.map_err(|_| client_gone())?;
                }
                if !full {
                    return Ok(snapshot);
                }
            }
        }
        .await;
        db.finish(result).await
    }

    /// Reads the history from the cursor up to the horizon, sending what matches.
    async fn catch_up(&self, tx: &Tx, state: &mut Cursor) -> Result<()> {
        let mut conn = self.pool.get().await?;
        loop {
            let read = events::read(&mut conn, state.at, READ_LIMIT, self.filter.user).await?;
            let full = read.events.len() as i64 == READ_LIMIT;
            let events: Vec<Event> = read
                .events
                .into_iter()
                .map(|row| Event::new(row, &self.feed.tokens))
                .collect();
            let end = match events.last() {
                Some(last) if full => last.position,
                _ => state.at.max(Position::below(read.horizon)),
            };
            self.deliver(tx, &Batch { events, end }, state).await?;
            if !full {
                return Ok(());
            }
        }
    }

    /// Sends the batch's events that are new to this stream and match; returns whether it
    /// sent any.
    async fn deliver(&self, tx: &Tx, batch: &Batch, state: &mut Cursor) -> Result<bool> {
        let mut sent = false;
        for event in &batch.events {
            if event.position <= state.at {
                continue;
            }
            state.at = event.position;
            if state.already_seen(event) || !self.filter.matches(event) {
                continue;
            }
            let update = pb::JobUpdate {
                resume_token: event.resume_token.clone(),
                event: Some(Update::Job(event.job.clone())),
            };
            tx.send(Ok(update)).await.map_err(|_| client_gone())?;
            sent = true;
        }
        state.advance(batch.end);
        Ok(sent)
    }

    async fn send(&self, tx: &Tx, event: Update, state: &Cursor) -> Result<()> {
        let update = pb::JobUpdate {
            resume_token: self.feed.tokens.resume_token(state.at),
            event: Some(event),
        };
        tx.send(Ok(update)).await.map_err(|_| client_gone())
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

    fn already_seen(&self, event: &Event) -> bool {
        self.skip.as_ref().is_some_and(|s| s.sees(event.writer_xid))
    }
}

fn expiry_instant(expires_at: i64) -> Instant {
    let now = chrono::Utc::now().timestamp();
    let secs = expires_at.saturating_sub(now).max(0);
    // Far enough to never fire (a year), for tokens without a practical expiry.
    let secs = secs.min(365 * 24 * 3600) as u64;
    Instant::now() + Duration::from_secs(secs)
}

fn shutting_down() -> Error {
    Error::ShuttingDown
}

/// The send failed because the receiver is gone: the client left. Never reaches a client.
fn client_gone() -> Error {
    Error::Internal("client went away".into())
}
