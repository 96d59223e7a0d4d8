//! The three kinds of filter, one name each: what a ListJobs page holds ([`ListFilter`]),
//! what a stream or a waiter follows ([`WatchFilter`]), and what `jobsvc export` writes
//! ([`ExportFilter`]). Each is validated at the edge; in each, `user` is the effective owner
//! scope, always the user itself for a user's request.
use std::collections::HashSet;

use uuid::Uuid;

use super::{Job, JobStatus};

/// A validated ListJobs filter. `user` is the effective scope (always set for users).
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub user: Option<Uuid>,
    pub statuses: Vec<JobStatus>,
    pub agent_identifier: Option<String>,
    pub created_after: Option<chrono::DateTime<chrono::Utc>>,
    pub created_before: Option<chrono::DateTime<chrono::Utc>>,
    pub job_data_contains: Option<serde_json::Value>,
    /// Microseconds: RUNNING jobs whose `started_at` is older than this (database clock).
    pub running_longer_than_us: Option<i64>,
}

impl ListFilter {
    /// Whether the best plan depends on the bound values: a status, agent, time or job_data
    /// filter can make another index the right one. The owner filter alone (or none) is
    /// always served by the same index in the same order, so a cached generic plan is as good
    /// as a fresh one and saves planning every page (a quarter of the database's CPU for
    /// first pages).
    pub fn plan_depends_on_values(&self) -> bool {
        !self.statuses.is_empty()
            || self.agent_identifier.is_some()
            || self.created_after.is_some()
            || self.created_before.is_some()
            || self.job_data_contains.is_some()
            || self.running_longer_than_us.is_some()
    }
}

/// What a stream (StreamJobUpdates) or a waiter (WaitJob) follows: every field set must match
/// the job's new state.
#[derive(Debug, Clone, Default)]
pub struct WatchFilter {
    pub job_ids: HashSet<Uuid>,
    pub statuses: Vec<JobStatus>,
    pub agent_identifier: Option<String>,
    /// The effective owner scope: always the user itself for a user's subscription.
    pub user: Option<Uuid>,
    /// Only jobs last claimed by this worker.
    pub worker_id: Option<String>,
}

impl WatchFilter {
    /// Whether `job`, as it is after a change, is one this filter follows.
    pub fn matches<J>(&self, job: &Job<J>) -> bool {
        (self.job_ids.is_empty() || self.job_ids.contains(&job.id))
            && (self.statuses.is_empty() || self.statuses.contains(&job.status))
            && self
                .agent_identifier
                .as_deref()
                .is_none_or(|a| a == job.agent_identifier)
            && self.user.is_none_or(|u| job.user_id == Some(u))
            && self
                .worker_id
                .as_deref()
                .is_none_or(|w| job.worker_id.as_deref() == Some(w))
    }
}

/// Which jobs to export.
#[derive(Debug, Clone, Default)]
pub struct ExportFilter {
    pub statuses: Vec<JobStatus>,
    pub agent_identifier: Option<String>,
    pub user: Option<Uuid>,
    pub created_after: Option<chrono::DateTime<chrono::Utc>>,
    pub created_before: Option<chrono::DateTime<chrono::Utc>>,
    /// Resume: only ids after this one (the last line of an interrupted export).
    pub after_id: Option<Uuid>,
}
