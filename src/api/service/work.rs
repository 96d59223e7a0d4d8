//! The workers' RPCs: ClaimJobs (with its long-poll) and Heartbeat; and what a worker's
//! UpdateStatus needs besides the common path (a retried move recognised, its metrics).
use std::time::Duration;

use chrono::Utc;
use tokio::time::Instant;

use super::JobSvc;
use crate::api::convert;
use crate::db;
use crate::domain::{Caller, Claim, Job, JobStatus, StatusChange, WatchFilter};
use crate::error::{Error, Result};
use crate::pb;

/// A waiting claim looks again this often even when nothing woke it: a safety net for a feed
/// that cannot read the history (it is woken by the change itself otherwise).
const CLAIM_REREAD_INTERVAL: Duration = Duration::from_secs(5);

impl JobSvc {
    /// Counts a worker's applied move: a retry (FAILED sent back to PENDING) or a release.
    pub(super) fn count_worker_move(&self, change: &StatusChange, job: &Job) {
        if job.status == JobStatus::Pending {
            match change.target {
                JobStatus::Pending => {
                    self.state.metrics.releases.inc();
                    // Handed back, ready at once: a waiting claim here takes it now.
                    self.state.claim_wakes.ready(job);
                }
                _ => {
                    self.state.metrics.retries.inc();
                }
            }
        }
    }

    /// A job this server created: a waiting claim here takes it now, if it is ready.
    pub(super) fn created(&self, job: &Job) {
        if job.run_after.is_none_or(|t| t <= Utc::now()) {
            self.state.claim_wakes.ready(job);
        }
    }

    /// One claim statement, counted.
    async fn claim_once(&self, caller: &Caller, claim: &Claim) -> Result<Vec<Job>> {
        let mut db = db::scoped(&self.state.pool, caller).await?;
        let jobs = db.exec(|c| db::work::claim(c, claim)).await;
        let jobs = db.finish(jobs).await?;
        let metrics = &self.state.metrics;
        metrics.claims.inc();
        if !jobs.is_empty() {
            metrics.jobs_claimed.inc_by(jobs.len() as u64);
            let now = Utc::now();
            for job in &jobs {
                let ready = job.run_after.unwrap_or(job.created_at).max(job.created_at);
                let waited = (now - ready).to_std().unwrap_or_default();
                metrics.claim_latency.observe(waited.as_secs_f64());
            }
            self.committed()?;
        }
        Ok(jobs)
    }

    /// ClaimJobs: claims at once, or waits (woken by the change feed when a matching job is
    /// created, retried or handed back, and by a timer for the next `run_after`) until a
    /// claim takes something or `wait` passes.
    pub(super) async fn claim_jobs(
        &self,
        caller: Caller,
        msg: pb::ClaimJobsRequest,
    ) -> Result<pb::ClaimJobsResponse> {
        let (claim, wait) = convert::claim(&caller, &msg)?;
        let answer = |jobs: Vec<Job>| pb::ClaimJobsResponse {
            jobs: jobs.into_iter().map(convert::claimed_to_pb).collect(),
        };
        if wait.is_zero() {
            // An immediate claim is a unary call like any other: it takes an admission place
            // (a waiting one is held to the caller's waits instead).
            let _permit = self.state.admission.enter().await?;
            return Ok(answer(self.claim_once(&caller, &claim).await?));
        }
        let now = Instant::now();
        let deadline = now + wait;
        let expires = now + caller.valid_for();
        let _waiting = self.state.caller_limits.waits.enter(&caller)?;
        // Subscribe before the first claim, so a job made ready between the two is not missed.
        let (mut changes, _) = self.state.feed.subscribe(WatchFilter {
            statuses: vec![JobStatus::Pending],
            agent_identifier: Some(claim.agent_identifier.clone()),
            user: claim.user,
            ..Default::default()
        });
        let lane = self.state.claim_wakes.lane(&claim.agent_identifier);
        let mut shutdown = self.state.shutdown.clone();
        loop {
            let jobs = self.claim_once(&caller, &claim).await?;
            let now = Instant::now();
            if !jobs.is_empty() || now >= deadline || *shutdown.borrow() {
                return Ok(answer(jobs));
            }
            if now >= expires {
                return Err(Error::token_expired());
            }
            // A job whose run_after comes before the deadline wakes this call by a timer.
            let next_ready = {
                let mut db = db::scoped(&self.state.pool, &caller).await?;
                let at = db
                    .exec(|c| db::work::next_ready(c, &claim.agent_identifier, claim.user))
                    .await;
                db.finish(at).await?
            };
            let timer = next_ready
                .map(|at| (at - Utc::now()).to_std().unwrap_or_default())
                .map_or(deadline, |d| now + d + Duration::from_millis(1));
            let wake = (now + CLAIM_REREAD_INTERVAL)
                .min(deadline)
                .min(expires)
                .min(timer);
            // Woken by a matching change that no other waiting claim of this server took
            // (one waiter per ready job, not all of them), by the timer, or by shutdown.
            loop {
                tokio::select! {
                    event = changes.recv() => match event {
                        Some(event) if self.state.claim_wakes.first(&event) => break,
                        Some(_) => continue,
                        None => tokio::time::sleep_until(wake).await,
                    },
                    _ = lane.notified() => break,
                    _ = tokio::time::sleep_until(wake) => break,
                    _ = shutdown.changed() => break,
                }
                break;
            }
        }
    }

    /// Heartbeat: extends the lease (and stores progress); a cancelled job answers with
    /// `cancel_requested`; any other lease that is no longer the job's is LEASE_LOST.
    pub(super) async fn heartbeat(
        &self,
        caller: Caller,
        msg: pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatResponse> {
        let beat = convert::beat(msg, self.state.limits)?;
        let id = beat.id;
        let reports = beat.progress.is_some();
        let row = self
            .state
            .beats
            .beat(caller, beat)
            .await?
            .ok_or(Error::JobNotFound(id))?;
        if row.written {
            if reports {
                // A progress change may be a change (a history event): streams learn now.
                self.state.feed.committed();
            }
            return Ok(pb::HeartbeatResponse {
                lease_expire_time: row.lease_expires_at.map(convert::timestamp),
                cancel_requested: false,
            });
        }
        if row.same_lease && row.status == JobStatus::Cancelled {
            return Ok(pb::HeartbeatResponse {
                lease_expire_time: None,
                cancel_requested: true,
            });
        }
        Err(Error::LeaseLost {
            status: row.status,
            attempt: row.attempt,
        })
    }
}
