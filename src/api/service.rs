//! JobService: each RPC reads top to bottom: authenticate, validate, one database call, notify,
//! reply.
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::SemaphorePermit;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use uuid::Uuid;

mod work;

use super::call::CallRecord;
use super::convert;
use super::state::AppState;
use crate::db;
use crate::domain::{
    Caller, Job, JobStatus, PageCursor, Role, StatusChange, Transition, WatchFilter, job,
    transition,
};
use crate::error::{Error, Result};
use crate::feed::Subscription;
use crate::feed::follow::{self, Start, StreamTask};
use crate::metrics::{AuthLabels, GaugeGuard};
use crate::pb;

/// WaitJob re-reads the job when the change feed shows a change to it; this re-read is only a
/// safety net for a feed that cannot read the history.
const WAIT_REREAD_INTERVAL: Duration = Duration::from_secs(5);
const WAIT_DEFAULT: Duration = Duration::from_secs(30);
const WAIT_MAX: Duration = Duration::from_secs(300);
/// A compare-and-set that loses a race is re-diagnosed with a fresh read at most this often.
const CAS_ATTEMPTS: usize = 5;

#[derive(Clone)]
pub struct JobSvc {
    state: Arc<AppState>,
}

impl JobSvc {
    pub fn new(state: Arc<AppState>) -> Self {
        JobSvc { state }
    }

    async fn authenticate<T>(&self, request: &Request<T>) -> Result<Caller> {
        let checked = self.state.auth.authenticate(request.metadata()).await;
        let labels = match &checked {
            Ok(_) => AuthLabels {
                outcome: "accepted",
                reason: "",
            },
            Err(e) => AuthLabels {
                outcome: "refused",
                reason: e.reason(),
            },
        };
        self.state.metrics.auth.get_or_create(&labels).inc();
        let caller = checked?;
        tracing::Span::current().record("role", caller.role_name());
        Ok(caller)
    }

    /// One unary call, whole: its record (span, metrics, log line), authentication, then the
    /// `work` of the authenticated caller, admitted ([`Self::admit`]) and guarded.
    async fn unary<T, R, Fut>(
        &self,
        method: &'static str,
        request: Request<T>,
        admit: bool,
        work: impl FnOnce(Caller, Request<T>) -> Fut,
    ) -> Result<Response<R>, Status>
    where
        Fut: Future<Output = Result<R>>,
    {
        let call = CallRecord::start(method, &request, &self.state.metrics);
        let result = async {
            let caller = self.authenticate(&request).await?;
            let _permit = self.admit(admit).await?;
            // Made in place here, not handed to an async fn: see DbHealth::guard.
            self.state.db_health.guard(work(caller, request)).await
        }
        .instrument(call.span.clone())
        .await;
        call.finish(result)
    }

    /// Lets an authenticated caller's work start: refused at once while the database is down,
    /// and (when `admit`) a place under the concurrency limit, held while the permit lives.
    /// Callers authenticate first (cheap, and cached): a call without a valid token takes no
    /// admission place and learns nothing about the database. The work itself then runs
    /// under [`crate::db::DbHealth::guard`].
    async fn admit(&self, admit: bool) -> Result<Option<SemaphorePermit<'_>>> {
        self.state.db_health.check()?;
        Ok(match admit {
            true => Some(self.state.admission.enter().await?),
            false => None,
        })
    }

    /// A write committed: the feed reads it now and wakes the other replicas. With the test
    /// hook configured, the answer may be the lost response instead.
    fn committed(&self) -> Result<()> {
        self.state.feed.committed();
        match &self.state.lost_responses {
            Some(hook) => hook.after_commit(),
            None => Ok(()),
        }
    }

    /// Moves a job through the compare-and-set, then tells retry, forbidden move and version
    /// mismatch apart from the row the statement saw.
    async fn apply_change(&self, caller: &Caller, mut change: StatusChange) -> Result<Job> {
        for _ in 0..CAS_ATTEMPTS {
            let (row, back) = self.state.updates.apply(*caller, change).await?;
            change = back;
            let row = row.ok_or(Error::JobNotFound(change.id))?;
            if row.written {
                if change.lease.is_some() {
                    self.count_worker_move(&change, &row.job);
                }
                self.committed()?;
                return Ok(row.job);
            }
            if let Some(lease) = change.lease {
                // A worker's move: only its own lease may end the job.
                let job = &row.job;
                let ours = job.lease_id == Some(lease.lease_id);
                if !ours || job.status != JobStatus::Running {
                    if ours && job::made_by_lease(change.target, job.status) {
                        // A retry of the move this lease made (its answer was lost).
                        return Ok(row.job);
                    }
                    return Err(Error::LeaseLost {
                        status: job.status,
                        attempt: job.attempt,
                    });
                }
            }
            // A worker's move is from RUNNING under its lease (the table has no RUNNING ->
            // PENDING): the transition is its own.
            let verdict = match change.lease {
                Some(_) => Transition::Apply,
                None => transition(row.job.status, change.target),
            };
            match verdict {
                Transition::AlreadyDone => return Ok(row.job),
                Transition::Forbidden => {
                    return Err(Error::InvalidTransition {
                        current: row.job.status,
                        requested: change.target,
                    });
                }
                Transition::Apply => {
                    if let Some(expected) = change.expected_version
                        && expected != row.job.version
                    {
                        return Err(Error::VersionMismatch {
                            expected,
                            actual: row.job.version,
                        });
                    }
                    self.check_size(&change, &row.job)?;
                    // The statement's snapshot predates a concurrent move: read again.
                }
            }
        }
        Err(Error::Conflict)
    }

    /// The job would grow past the size limit with this result or message.
    fn check_size(&self, change: &StatusChange, job: &Job) -> Result<()> {
        if let Some(size) = change.size {
            let empty = serde_json::json!({});
            let held = convert::size::job_data_field_len(job.job_data.as_ref().unwrap_or(&empty))
                + size.added as usize;
            if held > self.state.limits.max_job_bytes {
                let field = match change.target {
                    JobStatus::Completed => "result",
                    _ => "error_message",
                };
                return Err(convert::payload_too_large(field, held, self.state.limits));
            }
        }
        Ok(())
    }

    /// A connection for `caller`'s reads: for a user, one of the user-read pool, whose
    /// session runs as `authenticated` with the user's claims sent in front of the first
    /// statement ([`db::user_read`]: one round trip, row-level security the backstop); for
    /// the service role, one of the pool (in a transaction only when `plans` needs one).
    async fn reader(&self, caller: &Caller, plans: Option<db::Plans>) -> Result<db::Scoped> {
        match (caller.role(), plans) {
            (Role::User(user), plans) => db::user_read(&self.state.user_reads, user, plans).await,
            (Role::Service, Some(plans)) => {
                db::scoped_with_plans(&self.state.pool, caller, plans).await
            }
            (Role::Service, None) => db::scoped(&self.state.pool, caller).await,
        }
    }

    async fn get(&self, caller: &Caller, id: Uuid) -> Result<Job> {
        let scope = caller.user();
        // The service role's read by primary key is short whatever the id: it shares a lane.
        let mut db = match caller.role() {
            Role::Service => db::lane(&self.state.lanes, &self.state.pool).await?,
            Role::User(_) => self.reader(caller, None).await?,
        };
        let row = db.exec(|c| db::jobs::get(c, scope, id)).await;
        db.finish(row).await?.ok_or(Error::JobNotFound(id))
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::JobUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl pb::job_service_server::JobService for JobSvc {
    async fn create_job(
        &self,
        request: Request<pb::CreateJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.unary("CreateJob", request, true, |caller, request| async move {
            let new = convert::new_job(&caller, request.into_inner(), self.state.limits)?;
            let (row, new) = self.state.creates.create(caller, new).await?;
            if row.written {
                self.created(&row.job);
                self.committed()?;
            } else if !job::same_create(&row.job, &new) {
                return Err(Error::IdempotencyKeyReused {
                    request_id: new.request_id.clone().unwrap_or_default(),
                });
            }
            Ok(convert::job_to_pb(row.job))
        })
        .await
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.unary("GetJob", request, true, |caller, request| async move {
            let id = convert::parse_uuid("id", &request.get_ref().id)?;
            Ok(convert::job_to_pb(self.get(&caller, id).await?))
        })
        .await
    }

    async fn update_status(
        &self,
        request: Request<pb::UpdateStatusRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.unary(
            "UpdateStatus",
            request,
            true,
            |caller, request| async move {
                let change = convert::status_change(request.into_inner(), self.state.limits)?;
                Ok(convert::job_to_pb(
                    self.apply_change(&caller, change).await?,
                ))
            },
        )
        .await
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.unary("CancelJob", request, true, |caller, request| async move {
            let change = StatusChange {
                id: convert::parse_uuid("id", &request.get_ref().id)?,
                target: JobStatus::Cancelled,
                result: None,
                error_message: None,
                expected_version: None,
                size: None,
                lease: None,
            };
            Ok(convert::job_to_pb(
                self.apply_change(&caller, change).await?,
            ))
        })
        .await
    }

    async fn wait_job(
        &self,
        request: Request<pb::WaitJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.unary("WaitJob", request, false, |caller, request| async move {
            let msg = request.into_inner();
            let id = convert::parse_uuid("id", &msg.id)?;
            let timeout = match msg.timeout {
                None => WAIT_DEFAULT,
                Some(d) => convert::parse_duration("timeout", d)?.min(WAIT_MAX),
            };
            let deadline = tokio::time::Instant::now() + timeout;
            let expires = tokio::time::Instant::now() + caller.valid_for();
            let _waiting = self.state.caller_limits.waits.enter(&caller)?;
            // Subscribe before the first read, so a change between the two is not missed.
            let (mut changes, _) = self.state.feed.subscribe(WatchFilter {
                job_ids: [id].into(),
                ..Default::default()
            });
            let mut shutdown = self.state.shutdown.clone();
            loop {
                let job = self.get(&caller, id).await?;
                let now = tokio::time::Instant::now();
                if job.status.is_terminal() {
                    return Ok(convert::job_to_pb(job));
                }
                // A wait outlives neither the caller's token nor its timeout.
                if now >= expires {
                    return Err(Error::token_expired());
                }
                if now >= deadline || *shutdown.borrow() {
                    return Ok(convert::job_to_pb(job));
                }
                let wake = (now + WAIT_REREAD_INTERVAL).min(deadline).min(expires);
                tokio::select! {
                    _ = wait_for_change(&mut changes) => {}
                    _ = tokio::time::sleep_until(wake) => {}
                    _ = shutdown.changed() => {}
                }
            }
        })
        .await
    }

    async fn claim_jobs(
        &self,
        request: Request<pb::ClaimJobsRequest>,
    ) -> Result<Response<pb::ClaimJobsResponse>, Status> {
        // Not admitted: a claim may wait (as WaitJob does); its statements are short.
        self.unary("ClaimJobs", request, false, |caller, request| async move {
            self.claim_jobs(caller, request.into_inner()).await
        })
        .await
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.unary("Heartbeat", request, true, |caller, request| async move {
            self.heartbeat(caller, request.into_inner()).await
        })
        .await
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.unary("ListJobs", request, true, |caller, request| async move {
            let mut msg = request.into_inner();
            let page_size = convert::page_size(msg.page_size)?;
            let page_token = std::mem::take(&mut msg.page_token);
            let Some(filter) = convert::list_filter(&caller, msg, self.state.limits)? else {
                return Ok(pb::ListJobsResponse::default());
            };
            let fingerprint = convert::list_fingerprint(&filter);
            let after = match page_token.as_str() {
                "" => None,
                token => Some(self.state.tokens.open_page_token(token, &fingerprint)?),
            };
            let plans = match filter.plan_depends_on_values() {
                true => db::Plans::Custom,
                false => db::Plans::Generic,
            };
            let mut db = self.reader(&caller, Some(plans)).await?;
            let rows = db
                .exec(|c| db::jobs::list(c, &filter, after, page_size + 1))
                .await;
            let mut rows = db.finish(rows).await?;
            let more = rows.len() as i64 > page_size;
            rows.truncate(page_size as usize);
            let (jobs, last, cut) = convert::fill_page(rows, self.state.max_page_bytes, |row| {
                let cursor = PageCursor {
                    created_at: row.created_at,
                    id: row.id,
                };
                (convert::job_to_pb(row), cursor)
            });
            let next_page_token = match last {
                Some(cursor) if more || cut => self.state.tokens.page_token(&fingerprint, cursor),
                _ => String::new(),
            };
            Ok(pb::ListJobsResponse {
                jobs,
                next_page_token,
            })
        })
        .await
    }

    async fn list_job_events(
        &self,
        request: Request<pb::ListJobEventsRequest>,
    ) -> Result<Response<pb::ListJobEventsResponse>, Status> {
        self.unary(
            "ListJobEvents",
            request,
            true,
            |caller, request| async move {
                let msg = request.into_inner();
                let job_id = convert::parse_uuid("job_id", &msg.job_id)?;
                let page_size = convert::page_size(msg.page_size)?;
                let after = match msg.page_token.as_str() {
                    "" => 0,
                    token => self.state.tokens.open_events_page_token(token, job_id)?,
                };
                let scope = caller.user();
                let mut db = self.reader(&caller, None).await?;
                let rows = db
                    .exec(|c| async move {
                        let rows =
                            db::events::history(c, scope, job_id, after, page_size + 1).await?;
                        // No history at all: tell a job that does not exist (for this caller)
                        // apart.
                        if rows.is_empty()
                            && after == 0
                            && db::jobs::get(c, scope, job_id).await?.is_none()
                        {
                            return Err(Error::JobNotFound(job_id));
                        }
                        Ok(rows)
                    })
                    .await;
                let mut rows = db.finish(rows).await?;
                let more = rows.len() as i64 > page_size;
                rows.truncate(page_size as usize);
                let (events, last, cut) =
                    convert::fill_page(rows, self.state.max_page_bytes, |row| {
                        let version = row.version;
                        (convert::history_to_pb(job_id, row), version)
                    });
                let next_page_token = match last {
                    Some(version) if more || cut => {
                        self.state.tokens.events_page_token(job_id, version)
                    }
                    _ => String::new(),
                };
                Ok(pb::ListJobEventsResponse {
                    events,
                    next_page_token,
                })
            },
        )
        .await
    }

    type StreamJobUpdatesStream = UpdateStream;

    async fn stream_job_updates(
        &self,
        request: Request<pb::StreamJobUpdatesRequest>,
    ) -> Result<Response<Self::StreamJobUpdatesStream>, Status> {
        let call = CallRecord::start("StreamJobUpdates", &request, &self.state.metrics);
        let request_id = call.request_id.clone();
        let result = async {
            let caller = self.authenticate(&request).await?;
            self.state
                .db_health
                .guard(async {
                    let msg = request.into_inner();
                    let filter = convert::watch_filter(&caller, &msg)?;
                    // A resume token wins over include_existing: a client may send the same request
                    // again with the token it got, and then wants the changes, not a new snapshot.
                    let start = match msg.resume_token.as_str() {
                        "" if msg.include_existing => Start::Existing,
                        "" => Start::Now,
                        token => {
                            let (at, skip) = self.state.tokens.open_resume_token(token, &caller)?;
                            // Boxed: its pool wait and query would otherwise add to the size of
                            // every stream call's future, this rare path or not.
                            Box::pin(follow::check_resumable(&self.state.pool, at)).await?;
                            Start::Resume(at, skip)
                        }
                    };
                    let open = self.state.caller_limits.streams.enter(&caller)?;
                    let deliveries = StreamTask {
                        pool: self.state.pool.clone(),
                        database_url: self.state.database_url.clone(),
                        snapshot_slots: self.state.snapshot_slots.clone(),
                        snapshots_per_caller: self.state.caller_limits.snapshots.clone(),
                        catch_up_slots: self.state.catch_up_slots.clone(),
                        feed: self.state.feed.clone(),
                        caller,
                        filter,
                        start,
                        heartbeat: self.state.stream_heartbeat,
                        shutdown: self.state.shutdown.clone(),
                        request_id: request_id.clone(),
                    }
                    .start(GaugeGuard::new(&self.state.metrics.open_streams), open)
                    .await?;
                    let state = self.state.clone();
                    let updates = ReceiverStream::new(deliveries).map(move |d| match d {
                        Ok(d) => Ok(convert::delivery_to_pb(*d, &state.tokens, &caller)),
                        Err(e) => Err(e.into_status(&request_id)),
                    });
                    Ok(updates)
                })
                .await
        }
        .instrument(call.span.clone())
        .await;
        let (response, mut log) = call.finish_stream(result)?;
        Ok(response.map(|updates| {
            Box::pin(updates.map(move |update| {
                log.sent(&update);
                update
            })) as UpdateStream
        }))
    }

    async fn get_stats(
        &self,
        request: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::JobStats>, Status> {
        self.unary("GetStats", request, true, |caller, request| async move {
            let msg = request.into_inner();
            let user = convert::resolve_user(
                &caller,
                convert::parse_optional_uuid("user_id", &msg.user_id)?,
            )?;
            let agent = match msg.agent_identifier.as_str() {
                "" => None,
                a => Some(convert::validate_agent_identifier("agent_identifier", a)?),
            };
            let mut db = self.reader(&caller, None).await?;
            let figures = db.exec(|c| db::stats::get(c, user, agent.as_deref())).await;
            let (counts, oldest) = db.finish(figures).await?;
            Ok(convert::stats_to_pb(counts, oldest))
        })
        .await
    }
}

/// Resolves when the feed carries a change to the job (from any replica or plain SQL); never
/// once the feed is gone (the caller's re-read timer still runs).
async fn wait_for_change(sub: &mut Subscription) {
    if sub.recv().await.is_none() {
        std::future::pending::<()>().await;
    }
}
