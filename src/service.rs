//! JobService: each RPC reads top to bottom: authenticate, validate, one database call, notify,
//! reply.
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::Stream;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use uuid::Uuid;

use crate::auth::{Authenticator, Caller};
use crate::convert::{self, JsonLimits};
use crate::db::jobs::{ListFilter, NewJob, StatusChange};
use crate::db::models::JobRow;
use crate::db::{self, PgPool};
use crate::domain::{JobStatus, Transition, transition};
use crate::error::{Error, Result};
use crate::feed::{Feed, Filter, Subscription};
use crate::metrics::Metrics;
use crate::pb;
use crate::stream::{self, Start};
use crate::tokens::{self, Fingerprint, PageCursor, TokenKey};

/// WaitJob re-reads the job when the change feed shows a change to it; this re-read is only a
/// safety net for a feed that cannot read the history.
const WAIT_REREAD_INTERVAL: Duration = Duration::from_secs(5);
const WAIT_DEFAULT: Duration = Duration::from_secs(30);
const WAIT_MAX: Duration = Duration::from_secs(300);
/// A compare-and-set that loses a race is re-diagnosed with a fresh read at most this often.
const CAS_ATTEMPTS: usize = 5;

/// Everything a call needs, shared by all calls.
pub struct AppState {
    pub pool: PgPool,
    /// For connections outside the pool (a stream's snapshot).
    pub database_url: Arc<str>,
    pub auth: Authenticator,
    pub limits: JsonLimits,
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
    /// Tests only: every Nth committed write answers UNAVAILABLE (0: never).
    pub fault_drop_every: u64,
    pub fault_counter: std::sync::atomic::AtomicU64,
    /// Whether the database answers: calls fail fast while it does not.
    pub db_health: db::health::DbHealth,
    /// CreateJob's writer: concurrent creates share statements and commits.
    pub creates: crate::batch::Creates,
    /// UpdateStatus's and CancelJob's writer: concurrent moves share statements and commits.
    pub updates: crate::batch::Updates,
    /// The limit on unary calls working and waiting at once.
    pub admission: crate::admission::Admission,
    /// Flips to true when the server starts shutting down: long calls return early.
    pub shutdown: watch::Receiver<bool>,
}

#[derive(Clone)]
pub struct JobSvc {
    state: Arc<AppState>,
}

impl JobSvc {
    pub fn new(state: Arc<AppState>) -> Self {
        JobSvc { state }
    }

    fn authenticate<T>(&self, request: &Request<T>) -> Result<Caller> {
        let caller = self.state.auth.authenticate(request.metadata())?;
        tracing::Span::current().record("role", caller.role_name());
        Ok(caller)
    }

    /// Fault injection for tests (`--fault-drop-every N`): every Nth committed write answers
    /// UNAVAILABLE as if its response had been lost after the commit, the ambiguous outcome
    /// clients must handle by retrying with the same request_id / expected status.
    fn inject_lost_response(&self) -> Result<()> {
        let every = self.state.fault_drop_every;
        if every > 0
            && self
                .state
                .fault_counter
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                % every
                == every - 1
        {
            return Err(Error::Unavailable(
                "injected fault: response dropped after commit".into(),
            ));
        }
        Ok(())
    }

    /// Runs a call's work: refused at once while the database is down, abandoned if it goes
    /// down meanwhile, and (when `admit`) counted against the concurrency limit.
    async fn run<T>(&self, admit: bool, work: impl Future<Output = Result<T>>) -> Result<T> {
        self.state.db_health.check()?;
        let _permit = match admit {
            true => Some(self.state.admission.enter().await?),
            false => None,
        };
        self.state.db_health.guard(work).await
    }

    /// A write committed: the feed reads it now and wakes the other replicas.
    fn notify(&self) {
        self.state.feed.committed();
    }

    /// Moves a job through the compare-and-set, then tells retry, forbidden move and version
    /// mismatch apart from the row the statement saw.
    async fn apply_change(&self, caller: &Caller, mut change: StatusChange) -> Result<JobRow> {
        for _ in 0..CAS_ATTEMPTS {
            let (row, back) = self.state.updates.apply(*caller, change).await?;
            change = back;
            let row = row.ok_or(Error::JobNotFound(change.id))?;
            if row.written {
                self.notify();
                self.inject_lost_response()?;
                return Ok(row.job);
            }
            match transition(row.job.status, change.target) {
                Transition::AlreadyDone => return Ok(row.job),
                Transition::Forbidden => {
                    return Err(Error::InvalidTransition {
                        current: row.job.status,
                        requested: change.target,
                    });
                }
                Transition::Apply => match change.expected_version {
                    Some(expected) if expected != row.job.version => {
                        return Err(Error::VersionMismatch {
                            expected,
                            actual: row.job.version,
                        });
                    }
                    // The statement's snapshot predates a concurrent move: read again.
                    _ => continue,
                },
            }
        }
        Err(Error::Conflict)
    }

    async fn get(&self, caller: &Caller, id: Uuid) -> Result<JobRow> {
        let scope = caller.user();
        let mut db = db::scoped(&self.state.pool, caller).await?;
        let row = db.run(|c| db::jobs::get(c, scope, id)).await;
        db.finish(row).await?.ok_or(Error::JobNotFound(id))
    }
}

/// One call's bookkeeping: request id, span, timer, metrics, and the one log line at the end.
struct Call {
    method: &'static str,
    request_id: String,
    span: tracing::Span,
    started: Instant,
    metrics: Arc<Metrics>,
    /// Set by `finish`; a call dropped before (the client cancelled, or its deadline passed)
    /// is still logged and counted, as CANCELLED.
    finished: bool,
}

impl Drop for Call {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let _enter = self.span.enter();
        let elapsed = self.started.elapsed();
        self.metrics
            .call_finished(self.method, tonic::Code::Cancelled, elapsed);
        tracing::info!(
            method = self.method,
            code = "Cancelled",
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            "call"
        );
    }
}

impl Call {
    fn start<T>(method: &'static str, request: &Request<T>, metrics: &Arc<Metrics>) -> Self {
        metrics.call_started(method);
        let request_id = request
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| {
                !v.is_empty()
                    && v.len() <= 64
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
            .map(str::to_owned)
            .unwrap_or_else(|| Uuid::new_v4().to_string());
        let span = tracing::info_span!(
            "rpc",
            method,
            request_id = %request_id,
            role = tracing::field::Empty
        );
        Call {
            method,
            request_id,
            span,
            started: Instant::now(),
            metrics: metrics.clone(),
            finished: false,
        }
    }

    /// Logs the call and turns the result into the gRPC answer.
    fn finish<T>(mut self, result: Result<T>) -> Result<Response<T>, Status> {
        self.finished = true;
        let _enter = self.span.enter();
        let elapsed = self.started.elapsed();
        let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
        match result {
            Ok(body) => {
                self.metrics
                    .call_finished(self.method, tonic::Code::Ok, elapsed);
                tracing::info!(method = self.method, code = "OK", elapsed_ms, "call");
                let mut response = Response::new(body);
                if let Ok(v) = self.request_id.parse() {
                    response.metadata_mut().insert("x-request-id", v);
                }
                Ok(response)
            }
            Err(e) => {
                let status = e.into_status(&self.request_id);
                self.metrics
                    .call_finished(self.method, status.code(), elapsed);
                tracing::info!(
                    method = self.method,
                    code = ?status.code(),
                    elapsed_ms,
                    "call"
                );
                Err(status)
            }
        }
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::JobUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl pb::job_service_server::JobService for JobSvc {
    async fn create_job(
        &self,
        request: Request<pb::CreateJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let call = Call::start("CreateJob", &request, &self.state.metrics);
        let result = self
            .run(true, async {
                let caller = self.authenticate(&request)?;
                let msg = request.into_inner();
                let owner =
                    caller.resolve_user(convert::parse_optional_uuid("user_id", &msg.user_id)?)?;
                let new = NewJob {
                    owner,
                    agent_identifier: convert::validate_agent_identifier(
                        "agent_identifier",
                        &msg.agent_identifier,
                    )?,
                    job_data: match msg.job_data {
                        Some(s) => convert::struct_to_json("job_data", s, self.state.limits)?,
                        None => serde_json::json!({}),
                    },
                    request_id: convert::validate_request_id(&msg.request_id)?,
                };
                let (row, new) = self.state.creates.create(caller, new).await?;
                if row.written {
                    self.notify();
                    self.inject_lost_response()?;
                } else if row.job.agent_identifier != new.agent_identifier
                    || row.job.job_data.as_ref() != Some(&new.job_data)
                {
                    return Err(Error::IdempotencyKeyReused {
                        request_id: new.request_id.clone().unwrap_or_default(),
                    });
                }
                Ok(convert::job_to_pb(row.job))
            })
            .instrument(call.span.clone())
            .await;
        call.finish(result)
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let call = Call::start("GetJob", &request, &self.state.metrics);
        let result = self
            .run(true, async {
                let caller = self.authenticate(&request)?;
                let id = convert::parse_uuid("id", &request.get_ref().id)?;
                Ok(convert::job_to_pb(self.get(&caller, id).await?))
            })
            .instrument(call.span.clone())
            .await;
        call.finish(result)
    }

    async fn update_status(
        &self,
        request: Request<pb::UpdateStatusRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let call = Call::start("UpdateStatus", &request, &self.state.metrics);
        let result = self
            .run(true, async {
                let caller = self.authenticate(&request)?;
                let msg = request.into_inner();
                let change = StatusChange {
                    id: convert::parse_uuid("id", &msg.id)?,
                    target: convert::parse_status("status", msg.status)?,
                    result: msg
                        .result
                        .map(|v| convert::value_to_json("result", v, self.state.limits))
                        .transpose()?,
                    error_message: convert::validate_error_message(&msg.error_message)?,
                    expected_version: msg.expected_version,
                };
                Ok(convert::job_to_pb(
                    self.apply_change(&caller, change).await?,
                ))
            })
            .instrument(call.span.clone())
            .await;
        call.finish(result)
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let call = Call::start("CancelJob", &request, &self.state.metrics);
        let result = self
            .run(true, async {
                let caller = self.authenticate(&request)?;
                let change = StatusChange {
                    id: convert::parse_uuid("id", &request.get_ref().id)?,
                    target: JobStatus::Cancelled,
                    result: None,
                    error_message: None,
                    expected_version: None,
                };
                Ok(convert::job_to_pb(
                    self.apply_change(&caller, change).await?,
                ))
            })
            .instrument(call.span.clone())
            .await;
        call.finish(result)
    }

    async fn wait_job(
        &self,
        request: Request<pb::WaitJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let call = Call::start("WaitJob", &request, &self.state.metrics);
        let result = self
            .run(false, async {
                let caller = self.authenticate(&request)?;
                let msg = request.into_inner();
                let id = convert::parse_uuid("id", &msg.id)?;
                let timeout = match msg.timeout {
                    None => WAIT_DEFAULT,
                    Some(d) => convert::parse_duration("timeout", d)?.min(WAIT_MAX),
                };
                let deadline = tokio::time::Instant::now() + timeout;
                // Subscribe before the first read, so a change between the two is not missed.
                let (mut changes, _) = self.state.feed.subscribe(Filter {
                    job_ids: [id].into(),
                    ..Default::default()
                });
                let mut shutdown = self.state.shutdown.clone();
                loop {
                    let job = self.get(&caller, id).await?;
                    let now = tokio::time::Instant::now();
                    if job.status.is_terminal() || now >= deadline || *shutdown.borrow() {
                        return Ok(convert::job_to_pb(job));
                    }
                    let wake = (now + WAIT_REREAD_INTERVAL).min(deadline);
                    tokio::select! {
                        _ = wait_for_change(&mut changes) => {}
                        _ = tokio::time::sleep_until(wake) => {}
                        _ = shutdown.changed() => {}
                    }
                }
            })
            .instrument(call.span.clone())
            .await;
        call.finish(result)
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let call = Call::start("ListJobs", &request, &self.state.metrics);
        let result = self
            .run(true, async {
                let caller = self.authenticate(&request)?;
                let mut msg = request.into_inner();
                let page_size = convert::page_size(msg.page_size)?;
                let page_token = std::mem::take(&mut msg.page_token);
                let Some(filter) = list_filter(&caller, msg, self.state.limits)? else {
                    return Ok(pb::ListJobsResponse::default());
                };
                let fingerprint = list_fingerprint(&filter);
                let after = match page_token.as_str() {
                    "" => None,
                    token => Some(self.state.tokens.open_page_token(token, &fingerprint)?),
                };
                let plans = match filter.plan_depends_on_values() {
                    true => db::Plans::Custom,
                    false => db::Plans::Generic,
                };
                let mut db = db::scoped_with_plans(&self.state.pool, &caller, plans).await?;
                let rows = db
                    .run(|c| db::jobs::list(c, &filter, after, page_size + 1))
                    .await;
                let mut rows = db.finish(rows).await?;
                let next_page_token = if rows.len() as i64 > page_size {
                    rows.truncate(page_size as usize);
                    let last = rows.last().expect("page_size is at least 1");
                    let cursor = PageCursor {
                        created_at: last.created_at,
                        id: last.id,
                    };
                    self.state.tokens.page_token(&fingerprint, cursor)
                } else {
                    String::new()
                };
                Ok(pb::ListJobsResponse {
                    jobs: rows.into_iter().map(convert::job_to_pb).collect(),
                    next_page_token,
                })
            })
            .instrument(call.span.clone())
            .await;
        call.finish(result)
    }

    async fn list_job_events(
        &self,
        request: Request<pb::ListJobEventsRequest>,
    ) -> Result<Response<pb::ListJobEventsResponse>, Status> {
        let call = Call::start("ListJobEvents", &request, &self.state.metrics);
        let result = self
            .run(true, async {
                let caller = self.authenticate(&request)?;
                let msg = request.into_inner();
                let job_id = convert::parse_uuid("job_id", &msg.job_id)?;
                let page_size = convert::page_size(msg.page_size)?;
                let after = match msg.page_token.as_str() {
                    "" => 0,
                    token => self.state.tokens.open_events_page_token(token, job_id)?,
                };
                let scope = caller.user();
                let mut db = db::scoped(&self.state.pool, &caller).await?;
                let rows = db
                    .run(|c| async move {
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
                let next_page_token = if rows.len() as i64 > page_size {
                    rows.truncate(page_size as usize);
                    let last = rows.last().expect("page_size is at least 1");
                    self.state.tokens.events_page_token(job_id, last.version)
                } else {
                    String::new()
                };
                Ok(pb::ListJobEventsResponse {
                    events: rows
                        .into_iter()
                        .map(|r| pb::JobEvent {
                            version: r.version,
                            status: convert::status_to_pb(r.status) as i32,
                            occurred_at: Some(convert::timestamp(r.occurred_at)),
                            error_message: r.error_message.unwrap_or_default(),
                            job_id: job_id.to_string(),
                        })
                        .collect(),
                    next_page_token,
                })
            })
            .instrument(call.span.clone())
            .await;
        call.finish(result)
    }

    type StreamJobUpdatesStream = UpdateStream;

    async fn stream_job_updates(
        &self,
        request: Request<pb::StreamJobUpdatesRequest>,
    ) -> Result<Response<Self::StreamJobUpdatesStream>, Status> {
        let call = Call::start("StreamJobUpdates", &request, &self.state.metrics);
        let request_id = call.request_id.clone();
        let result = self
            .run(false, async {
                let caller = self.authenticate(&request)?;
                let msg = request.into_inner();
                let filter = stream_filter(&caller, &msg)?;
                // A resume token wins over include_existing: a client may send the same request
                // again with the token it got, and then wants the changes, not a new snapshot.
                let start = match msg.resume_token.as_str() {
                    "" if msg.include_existing => Start::Existing,
                    "" => Start::Now,
                    token => {
                        let (at, skip) = self.state.tokens.open_resume_token(token)?;
                        stream::check_resumable(&self.state.pool, at).await?;
                        Start::Resume(at, skip)
                    }
                };
                let rx = stream::Stream {
                    pool: self.state.pool.clone(),
                    database_url: self.state.database_url.clone(),
                    snapshot_slots: self.state.snapshot_slots.clone(),
                    feed: self.state.feed.clone(),
                    caller,
                    filter,
                    start,
                    heartbeat: self.state.stream_heartbeat,
                    shutdown: self.state.shutdown.clone(),
                    request_id,
                    open: crate::metrics::GaugeGuard::new(&self.state.metrics.open_streams),
                }
                .start()
                .await?;
                Ok(Box::pin(ReceiverStream::new(rx).map(|r| r.map(|u| *u))) as UpdateStream)
            })
            .instrument(call.span.clone())
            .await;
        call.finish(result)
    }

    async fn get_stats(
        &self,
        request: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::JobStats>, Status> {
        let call = Call::start("GetStats", &request, &self.state.metrics);
        let result = self
            .run(true, async {
                let caller = self.authenticate(&request)?;
                let msg = request.into_inner();
                let user =
                    caller.resolve_user(convert::parse_optional_uuid("user_id", &msg.user_id)?)?;
                let agent = match msg.agent_identifier.as_str() {
                    "" => None,
                    a => Some(convert::validate_agent_identifier("agent_identifier", a)?),
                };
                let mut db = db::scoped(&self.state.pool, &caller).await?;
                let figures = db.run(|c| db::stats::get(c, user, agent.as_deref())).await;
                let (c, oldest) = db.finish(figures).await?;
                Ok(pb::JobStats {
                    total: c.total,
                    pending: c.pending,
                    running: c.running,
                    completed: c.completed,
                    failed: c.failed,
                    cancelled: c.cancelled,
                    avg_processing_seconds: c.avg_processing_seconds,
                    oldest_pending_created_at: oldest.map(convert::timestamp),
                })
            })
            .instrument(call.span.clone())
            .await;
        call.finish(result)
    }
}

/// The validated filter of a ListJobs request (`None` when it can match nothing); a user's
/// scope is always the user itself.
fn list_filter(
    caller: &Caller,
    msg: pb::ListJobsRequest,
    limits: JsonLimits,
) -> Result<Option<ListFilter>> {
    let statuses = msg
        .statuses
        .iter()
        .map(|s| convert::parse_status("statuses", *s))
        .collect::<Result<Vec<_>>>()?;
    let mut statuses = statuses;
    statuses.sort();
    statuses.dedup();
    let mut filter = ListFilter {
        user: caller.resolve_user(convert::parse_optional_uuid("user_id", &msg.user_id)?)?,
        statuses,
        agent_identifier: match msg.agent_identifier.as_str() {
            "" => None,
            a => Some(convert::validate_agent_identifier("agent_identifier", a)?),
        },
        created_after: msg
            .created_after
            .map(|t| convert::parse_timestamp("created_after", t))
            .transpose()?,
        created_before: msg
            .created_before
            .map(|t| convert::parse_timestamp("created_before", t))
            .transpose()?,
        job_data_contains: msg
            .job_data_contains
            .map(|s| convert::struct_to_json("job_data_contains", s, limits))
            .transpose()?,
        running_longer_than_us: msg
            .running_longer_than
            .map(|d| {
                convert::parse_duration("running_longer_than", d)
                    .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
            })
            .transpose()?,
    };
    // running_longer_than already means status = RUNNING: a status list either excludes
    // RUNNING (nothing matches) or adds nothing. Folding it keeps the planner from counting
    // the status condition twice and misjudging the row count.
    if filter.running_longer_than_us.is_some() && !filter.statuses.is_empty() {
        if !filter.statuses.contains(&JobStatus::Running) {
            return Ok(None);
        }
        filter.statuses.clear();
    }
    Ok(Some(filter))
}

/// What a page token is bound to: the effective filter, the caller's scope included.
fn list_fingerprint(f: &ListFilter) -> Fingerprint {
    let canonical = serde_json::json!({
        "user": f.user,
        "statuses": f.statuses.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        "agent": f.agent_identifier,
        "after": f.created_after.map(|t| t.timestamp_micros()),
        "before": f.created_before.map(|t| t.timestamp_micros()),
        "contains": f.job_data_contains,
        "running_longer_than_us": f.running_longer_than_us,
    });
    tokens::fingerprint(canonical.to_string().as_bytes())
}

/// The validated filter of a StreamJobUpdates request; a user's scope is always the user.
fn stream_filter(caller: &Caller, msg: &pb::StreamJobUpdatesRequest) -> Result<Filter> {
    if msg.job_ids.len() > stream::MAX_JOB_IDS {
        return Err(Error::invalid(
            "job_ids",
            "TOO_MANY_JOB_IDS",
            format!(
                "job_ids holds {} ids; at most {} (leave it empty to follow every job)",
                msg.job_ids.len(),
                stream::MAX_JOB_IDS
            ),
        ));
    }
    let mut statuses = msg
        .statuses
        .iter()
        .map(|s| convert::parse_status("statuses", *s))
        .collect::<Result<Vec<_>>>()?;
    statuses.sort();
    statuses.dedup();
    Ok(Filter {
        job_ids: msg
            .job_ids
            .iter()
            .map(|id| convert::parse_uuid("job_ids", id))
            .collect::<Result<_>>()?,
        statuses,
        agent_identifier: match msg.agent_identifier.as_str() {
            "" => None,
            a => Some(convert::validate_agent_identifier("agent_identifier", a)?),
        },
        user: caller.resolve_user(convert::parse_optional_uuid("user_id", &msg.user_id)?)?,
    })
}

/// Resolves when the feed carries a change to the job (from any replica or plain SQL); never
/// once the feed is gone (the caller's re-read timer still runs).
async fn wait_for_change(sub: &mut Subscription) {
    if sub.recv().await.is_none() {
        std::future::pending::<()>().await;
    }
}
