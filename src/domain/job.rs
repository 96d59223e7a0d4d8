//! A job as stored, and the validated writes that create and move one.
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use super::JobStatus;
use crate::db::schema::jobs;

/// A job as stored: one row of `jobs`. `J` is how its JSON columns are held: as
/// `serde_json::Value` to work with them, or as the database's own text
/// (`crate::db::models::JsonText`) when they only go out on the wire (a ListJobs page).
#[derive(Debug, Clone, PartialEq, Queryable, QueryableByName, Selectable)]
// No `check_for_backend`: its generated check cannot name the type parameter.
#[diesel(table_name = jobs)]
pub struct Job<J = serde_json::Value> {
    pub id: Uuid,
    pub user_id: Option<Uuid>,
    pub agent_identifier: String,
    pub status: JobStatus,
    pub job_data: Option<J>,
    pub result: Option<J>,
    pub error_message: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub version: i64,
    pub request_id: Option<String>,
    /// Workers: claimed highest first.
    pub priority: i32,
    /// Not claimable before this time.
    pub run_after: Option<DateTime<Utc>>,
    /// Claims so far.
    pub attempt: i32,
    pub max_attempts: i32,
    /// The first retry's delay for this job, when it sets its own.
    pub initial_backoff: Option<diesel::pg::data_types::PgInterval>,
    /// The lease of the current (or last) claim: a capability, never shown on a Job.
    pub lease_id: Option<Uuid>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub worker_id: Option<String>,
    pub progress: Option<J>,
}

/// A validated job to create.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// The owning user; `None` for a job owned by no user (service role only).
    pub owner: Option<Uuid>,
    pub agent_identifier: String,
    pub job_data: serde_json::Value,
    pub request_id: Option<String>,
    /// `job_data`'s protobuf-encoded size as a field of a job (kept with the row, for the
    /// size check of later moves).
    pub job_data_bytes: i32,
    pub priority: i32,
    pub run_after: Option<DateTime<Utc>>,
    pub max_attempts: i32,
    /// The first retry's delay for this job, in microseconds; None: the server's default.
    pub initial_backoff_us: Option<i64>,
}

/// A validated status change.
#[derive(Debug, Clone)]
pub struct StatusChange {
    pub id: Uuid,
    pub target: JobStatus,
    pub result: Option<serde_json::Value>,
    pub error_message: Option<String>,
    pub expected_version: Option<i64>,
    /// For a move that stores a result or an error message: the job must stay within the
    /// size limit with them, or the move does not apply.
    pub size: Option<SizeCheck>,
    /// A worker's move: it applies only while the job is RUNNING under this lease.
    pub lease: Option<LeaseMove>,
}

/// What a worker's move ([`StatusChange::lease`]) carries besides its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseMove {
    pub lease_id: Uuid,
    /// A FAILED move fails for good, whatever attempts are left.
    pub no_retry: bool,
}

/// How a failed attempt is retried: the first delay (unless the job sets its own), the
/// factor per attempt, and the most.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub initial_us: i64,
    pub multiplier: f64,
    pub max_us: i64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_us: 1_000_000,
            multiplier: 2.0,
            max_us: 3_600_000_000,
        }
    }
}

/// A claim: which jobs, for whom, and the lease they get.
#[derive(Debug, Clone)]
pub struct Claim {
    pub agent_identifier: String,
    /// Only this user's jobs (always the user itself for a user's claim).
    pub user: Option<Uuid>,
    pub max_jobs: i64,
    pub lease_us: i64,
    pub worker_id: Option<String>,
}

/// A heartbeat: extend `lease_id` on job `id` (by `lease_us`, else the claim's), store
/// `progress` when set.
#[derive(Debug, Clone)]
pub struct Beat {
    pub id: Uuid,
    pub lease_id: Uuid,
    pub lease_us: Option<i64>,
    pub progress: Option<serde_json::Value>,
}

/// What a move adds to a job, and the most the job may hold (protobuf-encoded bytes of
/// job_data, result and error_message together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeCheck {
    pub added: i64,
    pub limit: i64,
}

/// Whether a job whose lease ended in `status` ended by the move `target` of that lease: a
/// retry of a move whose answer was lost gets the job unchanged.
pub fn made_by_lease(target: JobStatus, status: JobStatus) -> bool {
    match target {
        // FAILED with attempts left went back to PENDING.
        JobStatus::Failed => matches!(status, JobStatus::Failed | JobStatus::Pending),
        other => other == status,
    }
}

/// Whether an existing job is the one a repeated CreateJob (same request_id) asks for.
pub fn same_create(job: &Job, new: &NewJob) -> bool {
    let backoff_us = job
        .initial_backoff
        .map(|i| i.microseconds + (i64::from(i.days) + i64::from(i.months) * 30) * 86_400_000_000);
    job.agent_identifier == new.agent_identifier
        && job.job_data.as_ref() == Some(&new.job_data)
        && job.priority == new.priority
        && job.run_after == new.run_after
        && job.max_attempts == new.max_attempts
        && backoff_us == new.initial_backoff_us
}
