//! Domain values to messages: jobs, history entries, statistics and a stream's deliveries
//! (with their resume tokens, signed here).
use chrono::{DateTime, Utc};
use prost_types::Timestamp;
use uuid::Uuid;

use super::json::JsonColumn;
use crate::api::tokens::TokenKey;
use crate::db::events::HistoryRow;
use crate::db::stats::Counts;
use crate::domain::{Caller, Job, JobStatus};
use crate::feed::follow::{Delivery, ResumePoint};
use crate::pb;
use crate::pb::job_update::Event as Update;

pub fn status_to_pb(s: JobStatus) -> pb::JobStatus {
    match s {
        JobStatus::Pending => pb::JobStatus::Pending,
        JobStatus::Running => pb::JobStatus::Running,
        JobStatus::Completed => pb::JobStatus::Completed,
        JobStatus::Failed => pb::JobStatus::Failed,
        JobStatus::Cancelled => pb::JobStatus::Cancelled,
    }
}

pub fn timestamp(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// A job as the wire shows it.
pub fn job_to_pb<J: JsonColumn>(row: Job<J>) -> pb::Job {
    pb::Job {
        id: row.id.to_string(),
        user_id: row.user_id.map(|u| u.to_string()).unwrap_or_default(),
        agent_identifier: row.agent_identifier,
        status: status_to_pb(row.status) as i32,
        job_data: Some(row.job_data.map(J::into_struct).unwrap_or_default()),
        result: row.result.map(J::into_value),
        error_message: row.error_message.unwrap_or_default(),
        created_at: Some(timestamp(row.created_at)),
        updated_at: Some(timestamp(row.updated_at)),
        started_at: row.started_at.map(timestamp),
        completed_at: row.completed_at.map(timestamp),
        version: row.version,
        priority: row.priority,
        run_after: row.run_after.map(timestamp),
        attempt: row.attempt,
        max_attempts: row.max_attempts,
        lease_expire_time: row.lease_expires_at.map(timestamp),
        worker_id: row.worker_id.unwrap_or_default(),
        progress: row.progress.map(J::into_value),
    }
}

/// A claimed job and its lease.
pub fn claimed_to_pb(job: Job) -> pb::ClaimedJob {
    let lease_id = job.lease_id.map(|l| l.to_string()).unwrap_or_default();
    pb::ClaimedJob {
        job: Some(job_to_pb(job)),
        lease_id,
    }
}

/// A page of messages from `rows`, in order, ending early when the next one would take the
/// page past `budget` bytes (always at least one, which the size limit keeps under the
/// budget). Returns the messages, the cursor of the last one, and whether rows were left out
/// for the budget: then the page needs a next-page token even if the rows were its last.
pub fn fill_page<R, M: prost::Message, C>(
    rows: impl IntoIterator<Item = R>,
    budget: usize,
    mut convert: impl FnMut(R) -> (M, C),
) -> (Vec<M>, Option<C>, bool) {
    let mut messages = Vec::new();
    let mut last = None;
    let mut bytes = 0;
    for row in rows {
        let (message, cursor) = convert(row);
        // The message as a repeated field: a tag and a length besides its bytes.
        let len = message.encoded_len() + 6;
        if !messages.is_empty() && bytes + len > budget {
            return (messages, last, true);
        }
        bytes += len;
        messages.push(message);
        last = Some(cursor);
    }
    (messages, last, false)
}

/// One entry of a job's history (ListJobEvents).
pub fn history_to_pb(job_id: Uuid, row: HistoryRow) -> pb::JobEvent {
    pb::JobEvent {
        version: row.version,
        status: status_to_pb(row.status) as i32,
        occurred_at: Some(timestamp(row.occurred_at)),
        error_message: row.error_message.unwrap_or_default(),
        job_id: job_id.to_string(),
    }
}

/// GetStats's figures.
pub fn stats_to_pb(c: Counts, oldest_pending: Option<DateTime<Utc>>) -> pb::JobStats {
    pb::JobStats {
        total: c.total,
        pending: c.pending,
        running: c.running,
        completed: c.completed,
        failed: c.failed,
        cancelled: c.cancelled,
        avg_processing_seconds: c.avg_processing_seconds,
        oldest_pending_created_at: oldest_pending.map(timestamp),
    }
}

/// What a stream sends, as the message the client receives, its resume token signed now for
/// `caller` (only they can resume from it).
pub fn delivery_to_pb(delivery: Delivery, tokens: &TokenKey, caller: &Caller) -> pb::JobUpdate {
    let token = |p: &ResumePoint| tokens.resume_token_with_skip(caller, p.at, p.skip.as_ref());
    let (resume_token, event) = match delivery {
        Delivery::Existing(job) => (String::new(), Update::Job(job_to_pb(*job))),
        Delivery::Change(event, resume) => {
            // The feed's copy is shared with the other subscribers it matched.
            let job = std::sync::Arc::try_unwrap(event).map_or_else(|e| e.job.clone(), |e| e.job);
            (token(&resume), Update::Job(job_to_pb(job)))
        }
        Delivery::Synced(resume) => (token(&resume), Update::Synced(pb::StreamSynced {})),
        Delivery::Heartbeat(resume) => (token(&resume), Update::Heartbeat(pb::StreamHeartbeat {})),
    };
    pb::JobUpdate {
        resume_token,
        event: Some(event),
    }
}
