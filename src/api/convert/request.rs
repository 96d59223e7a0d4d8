//! Requests to domain values: every field validated, with a reason a program can act on and
//! a message a person can.
use prost_types::Timestamp;
use uuid::Uuid;

use super::json::{JsonLimits, nul_error, struct_to_json, value_to_json};
use super::size;
use crate::api::tokens::{Fingerprint, fingerprint};
use crate::domain::{
    Beat, Caller, Claim, JobStatus, LeaseMove, ListFilter, NewJob, Role, SizeCheck, StatusChange,
    WatchFilter,
};
use crate::error::{Error, Result};
use crate::pb;

pub const MAX_AGENT_IDENTIFIER_CHARS: usize = 255;
pub const MAX_REQUEST_ID_CHARS: usize = 128;
pub const MAX_ERROR_MESSAGE_BYTES: usize = 64 * 1024;
/// At most this many `job_ids` in one StreamJobUpdates request.
pub const MAX_JOB_IDS: usize = 1000;

/// A required UUID field.
pub fn parse_uuid(field: &'static str, s: &str) -> Result<Uuid> {
    if s.is_empty() {
        return Err(Error::invalid(
            field,
            "MISSING_FIELD",
            format!("{field} is required"),
        ));
    }
    Uuid::try_parse(s).map_err(|_| {
        Error::invalid(
            field,
            "INVALID_UUID",
            format!("{field} must be a UUID such as 123e4567-e89b-12d3-a456-426614174000"),
        )
    })
}

/// An optional UUID field: empty means unset.
pub fn parse_optional_uuid(field: &'static str, s: &str) -> Result<Option<Uuid>> {
    if s.is_empty() {
        Ok(None)
    } else {
        parse_uuid(field, s).map(Some)
    }
}

pub fn validate_agent_identifier(field: &'static str, s: &str) -> Result<String> {
    let chars = s.chars().count();
    if chars == 0 || chars > MAX_AGENT_IDENTIFIER_CHARS {
        return Err(Error::invalid(
            field,
            "INVALID_AGENT_IDENTIFIER",
            format!("{field} must be 1 to {MAX_AGENT_IDENTIFIER_CHARS} characters, got {chars}"),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(Error::invalid(
            field,
            "INVALID_AGENT_IDENTIFIER",
            format!("{field} must not contain control characters"),
        ));
    }
    if let Some((at, c)) = s.chars().enumerate().find(|(_, c)| is_invisible(*c)) {
        return Err(Error::invalid(
            field,
            "INVALID_AGENT_IDENTIFIER",
            format!(
                "{field} must not contain invisible or bidirectional-control characters \
                 (U+{:04X} at character {at}): they make different agents look the same",
                c as u32
            ),
        ));
    }
    Ok(s.to_owned())
}

/// Characters that show as nothing, or reorder what follows: bidirectional controls
/// (U+061C, U+200E/F, U+202A-E, U+2066-9), zero-width and joiner characters (U+200B-D, U+2060,
/// U+FEFF), the other invisible format characters of Unicode's Cf category, and the
/// blank fillers that render as nothing. Two agent names that differ only by these look the
/// same in a log or a dashboard.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'
            | '\u{1160}'
            | '\u{17B4}'
            | '\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E007F}'
    )
}

/// An optional idempotency key: empty means none.
pub fn validate_request_id(s: &str) -> Result<Option<String>> {
    if s.is_empty() {
        return Ok(None);
    }
    if s.chars().count() > MAX_REQUEST_ID_CHARS {
        return Err(Error::invalid(
            "request_id",
            "INVALID_REQUEST_ID",
            format!("request_id must be at most {MAX_REQUEST_ID_CHARS} characters"),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(Error::invalid(
            "request_id",
            "INVALID_REQUEST_ID",
            "request_id must not contain control characters",
        ));
    }
    Ok(Some(s.to_owned()))
}

pub fn validate_error_message(s: &str) -> Result<Option<String>> {
    if s.is_empty() {
        return Ok(None);
    }
    if s.len() > MAX_ERROR_MESSAGE_BYTES {
        return Err(Error::invalid(
            "error_message",
            "PAYLOAD_TOO_LARGE",
            format!("error_message must be at most {MAX_ERROR_MESSAGE_BYTES} bytes"),
        ));
    }
    if s.contains('\0') {
        return Err(nul_error("error_message"));
    }
    Ok(Some(s.to_owned()))
}

/// A target status: JOB_STATUS_UNSPECIFIED and unknown numbers are refused.
pub fn parse_status(field: &'static str, raw: i32) -> Result<JobStatus> {
    match pb::JobStatus::try_from(raw) {
        Ok(pb::JobStatus::Pending) => Ok(JobStatus::Pending),
        Ok(pb::JobStatus::Running) => Ok(JobStatus::Running),
        Ok(pb::JobStatus::Completed) => Ok(JobStatus::Completed),
        Ok(pb::JobStatus::Failed) => Ok(JobStatus::Failed),
        Ok(pb::JobStatus::Cancelled) => Ok(JobStatus::Cancelled),
        Ok(pb::JobStatus::Unspecified) | Err(_) => Err(Error::invalid(
            field,
            "INVALID_STATUS",
            format!(
                "{field} must be one of JOB_STATUS_PENDING, _RUNNING, _COMPLETED, _FAILED, _CANCELLED (got {raw})"
            ),
        )),
    }
}

pub const DEFAULT_PAGE_SIZE: i64 = 50;
pub const MAX_PAGE_SIZE: i64 = 1000;

/// `page_size`: 0 means the default, larger than the maximum is clamped, negative is refused.
pub fn page_size(raw: i32) -> Result<i64> {
    match raw {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n < 0 => Err(Error::invalid(
            "page_size",
            "INVALID_PAGE_SIZE",
            format!("page_size must not be negative (got {n}); 0 means {DEFAULT_PAGE_SIZE}"),
        )),
        n => Ok(i64::from(n).min(MAX_PAGE_SIZE)),
    }
}

/// The range of `google.protobuf.Timestamp`, 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z,
/// in Unix seconds. PostgreSQL holds all of it; chrono holds more, which the database refuses.
const TIMESTAMP_SECONDS: std::ops::RangeInclusive<i64> = -62_135_596_800..=253_402_300_799;

/// A timestamp within protobuf's range (years 1 to 9999).
pub fn parse_timestamp(field: &'static str, t: Timestamp) -> Result<chrono::DateTime<chrono::Utc>> {
    let nanos = u32::try_from(t.nanos).ok().filter(|n| *n < 1_000_000_000);
    nanos
        .filter(|_| TIMESTAMP_SECONDS.contains(&t.seconds))
        .and_then(|n| chrono::DateTime::from_timestamp(t.seconds, n))
        .ok_or_else(|| {
            Error::invalid(
                field,
                "INVALID_TIMESTAMP",
                format!(
                    "{field} must be a timestamp from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z \
                     with nanos in 0..1e9 (got {}s {}ns)",
                    t.seconds, t.nanos
                ),
            )
        })
}

/// The longest `running_longer_than`: a century. Beyond it the database cannot compute
/// `now() - running_longer_than` (its timestamps start in 4713 BC), and no job runs that long.
pub const MAX_AGE: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 24 * 3600);

/// A non-negative duration of at most `max`.
pub fn parse_bounded_duration(
    field: &'static str,
    d: prost_types::Duration,
    max: std::time::Duration,
) -> Result<std::time::Duration> {
    let d = parse_duration(field, d)?;
    if d > max {
        return Err(Error::invalid(
            field,
            "INVALID_DURATION",
            format!(
                "{field} must be at most {}s (got {}s)",
                max.as_secs(),
                d.as_secs()
            ),
        ));
    }
    Ok(d)
}

/// A non-negative duration.
pub fn parse_duration(
    field: &'static str,
    d: prost_types::Duration,
) -> Result<std::time::Duration> {
    std::time::Duration::try_from(d).map_err(|_| {
        Error::invalid(
            field,
            "INVALID_DURATION",
            format!("{field} must be a non-negative duration"),
        )
    })
}

/// A CreateJob request as the job to create. A job_data that would take the job past the size
/// limit by itself is refused here, before anything is written.
pub fn new_job(caller: &Caller, msg: pb::CreateJobRequest, limits: JsonLimits) -> Result<NewJob> {
    let owner = resolve_user(caller, parse_optional_uuid("user_id", &msg.user_id)?)?;
    let agent_identifier = validate_agent_identifier("agent_identifier", &msg.agent_identifier)?;
    let job_data = match msg.job_data {
        Some(s) => struct_to_json("job_data", s, limits)?,
        None => serde_json::json!({}),
    };
    let job_data_bytes = size::job_data_field_len(&job_data);
    if job_data_bytes > limits.max_job_bytes {
        return Err(payload_too_large("job_data", job_data_bytes, limits));
    }
    if !PRIORITIES.contains(&msg.priority) {
        return Err(Error::invalid(
            "priority",
            "INVALID_PRIORITY",
            format!(
                "priority must be from {} to {} (got {})",
                PRIORITIES.start(),
                PRIORITIES.end(),
                msg.priority
            ),
        ));
    }
    let max_attempts = match msg.max_attempts {
        0 => 1,
        n if ATTEMPTS.contains(&n) => n,
        n => {
            return Err(Error::invalid(
                "max_attempts",
                "INVALID_MAX_ATTEMPTS",
                format!(
                    "max_attempts must be from {} to {} (got {n}; 0 means 1: no retry)",
                    ATTEMPTS.start(),
                    ATTEMPTS.end()
                ),
            ));
        }
    };
    let initial_backoff_us = msg
        .initial_backoff
        .map(|d| parse_bounded_duration("initial_backoff", d, MAX_BACKOFF))
        .transpose()?
        .map(|d| d.as_micros() as i64);
    Ok(NewJob {
        owner,
        agent_identifier,
        job_data,
        request_id: validate_request_id(&msg.request_id)?,
        job_data_bytes: i32::try_from(job_data_bytes).unwrap_or(i32::MAX),
        priority: msg.priority,
        run_after: msg
            .run_after
            .map(|t| parse_timestamp("run_after", t).map(to_micros))
            .transpose()?,
        max_attempts,
        initial_backoff_us,
    })
}

/// Job priorities: higher is claimed first.
pub const PRIORITIES: std::ops::RangeInclusive<i32> = -1000..=1000;
/// `max_attempts`.
pub const ATTEMPTS: std::ops::RangeInclusive<i32> = 1..=100;
/// The longest per-job `initial_backoff`.
pub const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(3600);
/// `max_jobs` of one claim.
pub const MAX_CLAIM: i32 = 100;
/// Lease durations: at least a second, at most an hour.
pub const LEASES: std::ops::RangeInclusive<std::time::Duration> =
    std::time::Duration::from_secs(1)..=std::time::Duration::from_secs(3600);
/// A lease's length when the claim names none.
pub const DEFAULT_LEASE: std::time::Duration = std::time::Duration::from_secs(60);
/// The longest a claim waits.
pub const MAX_CLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
/// The largest `progress` a heartbeat may store (encoded), so that a job always fits in a
/// response (the job size limit leaves room for it).
pub const MAX_PROGRESS_BYTES: usize = 64 << 10;

/// The database keeps microseconds: a time compared with a stored one (a repeated create's
/// `run_after`) is cut to them first.
fn to_micros(t: chrono::DateTime<chrono::Utc>) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

/// A lease length within [`LEASES`].
fn parse_lease(field: &'static str, d: prost_types::Duration) -> Result<std::time::Duration> {
    let d = parse_duration(field, d)?;
    if !LEASES.contains(&d) {
        return Err(Error::invalid(
            field,
            "INVALID_DURATION",
            format!(
                "{field} must be from 1s to 3600s (got {:.3}s)",
                d.as_secs_f64()
            ),
        ));
    }
    Ok(d)
}

/// A lease as a request names it: an opaque string that jobsvc made from a UUID. Any other
/// string is a lease no job holds (LEASE_LOST, answered by the move), never malformed input.
fn parse_lease_id(s: &str) -> Uuid {
    Uuid::parse_str(s).unwrap_or(Uuid::nil())
}

/// A worker's label: as an agent identifier (1..255 printable characters), or empty.
fn validate_worker_id(s: &str) -> Result<Option<String>> {
    if s.is_empty() {
        return Ok(None);
    }
    validate_agent_identifier("worker_id", s)
        .map(Some)
        .map_err(|e| Error::invalid("worker_id", "INVALID_WORKER_ID", e.to_string()))
}

/// A ClaimJobs request as a claim, and how long it may wait.
pub fn claim(caller: &Caller, msg: &pb::ClaimJobsRequest) -> Result<(Claim, std::time::Duration)> {
    let agent_identifier = validate_agent_identifier("agent_identifier", &msg.agent_identifier)?;
    let max_jobs = match msg.max_jobs {
        0 => 1,
        n if (1..=MAX_CLAIM).contains(&n) => n,
        n => {
            return Err(Error::invalid(
                "max_jobs",
                "INVALID_MAX_JOBS",
                format!("max_jobs must be from 1 to {MAX_CLAIM} (got {n}; 0 means 1)"),
            ));
        }
    };
    let lease = match msg.lease_duration {
        Some(d) => parse_lease("lease_duration", d)?,
        None => DEFAULT_LEASE,
    };
    let wait = match msg.wait {
        Some(d) => parse_bounded_duration("wait", d, MAX_CLAIM_WAIT)?,
        None => std::time::Duration::ZERO,
    };
    Ok((
        Claim {
            agent_identifier,
            user: resolve_user(caller, parse_optional_uuid("user_id", &msg.user_id)?)?,
            max_jobs: i64::from(max_jobs),
            lease_us: lease.as_micros() as i64,
            worker_id: validate_worker_id(&msg.worker_id)?,
        },
        wait,
    ))
}

/// A Heartbeat request as a beat.
pub fn beat(msg: pb::HeartbeatRequest, limits: JsonLimits) -> Result<Beat> {
    let id = parse_uuid("id", &msg.id)?;
    if msg.lease_id.is_empty() {
        return Err(Error::invalid(
            "lease_id",
            "MISSING_FIELD",
            "lease_id is required: the lease_id ClaimJobs returned with the job",
        ));
    }
    let progress = msg
        .progress
        .map(|v| value_to_json("progress", v, limits))
        .transpose()?;
    if let Some(p) = &progress {
        let bytes = size::value_len(p);
        if bytes > MAX_PROGRESS_BYTES {
            return Err(Error::invalid(
                "progress",
                "PAYLOAD_TOO_LARGE",
                format!(
                    "progress is {bytes} bytes encoded; at most {MAX_PROGRESS_BYTES}: report a \
                     summary, keep the rest in the result"
                ),
            ));
        }
    }
    Ok(Beat {
        id,
        lease_id: parse_lease_id(&msg.lease_id),
        lease_us: msg
            .lease_duration
            .map(|d| parse_lease("lease_duration", d))
            .transpose()?
            .map(|d| d.as_micros() as i64),
        progress,
    })
}

/// An UpdateStatus request as a move. A move that stores a result (to COMPLETED) or an error
/// message (to FAILED) carries what they add, so the compare-and-set applies it only while
/// the job stays within the size limit.
pub fn status_change(msg: pb::UpdateStatusRequest, limits: JsonLimits) -> Result<StatusChange> {
    let target = parse_status("status", msg.status)?;
    let result = msg
        .result
        .map(|v| value_to_json("result", v, limits))
        .transpose()?;
    let error_message = validate_error_message(&msg.error_message)?;
    let stored_result = result.as_ref().filter(|_| target == JobStatus::Completed);
    let stored_message = error_message
        .as_deref()
        .filter(|_| target == JobStatus::Failed);
    let added = size::outcome_fields_len(stored_result, stored_message);
    let stores = stored_result.is_some() || stored_message.is_some();
    if added > limits.max_job_bytes {
        let field = if stored_result.is_some() {
            "result"
        } else {
            "error_message"
        };
        return Err(payload_too_large(field, added, limits));
    }
    let lease = match msg.lease_id.as_str() {
        "" if msg.no_retry => {
            return Err(Error::invalid(
                "no_retry",
                "MISSING_FIELD",
                "no_retry applies to a worker's move: send the lease_id of the claim with it",
            ));
        }
        "" => None,
        lease_id => Some(LeaseMove {
            lease_id: parse_lease_id(lease_id),
            no_retry: msg.no_retry,
        }),
    };
    if lease.is_some() && target == JobStatus::Running {
        return Err(Error::InvalidTransition {
            current: JobStatus::Running,
            requested: JobStatus::Running,
        });
    }
    Ok(StatusChange {
        id: parse_uuid("id", &msg.id)?,
        target,
        result,
        error_message,
        expected_version: msg.expected_version,
        size: stores.then_some(SizeCheck {
            added: added as i64,
            limit: limits.max_job_bytes as i64,
        }),
        lease,
    })
}

/// INVALID_ARGUMENT `PAYLOAD_TOO_LARGE`: what a job would hold with `field`, against the limit.
pub fn payload_too_large(field: &'static str, bytes: usize, limits: JsonLimits) -> Error {
    Error::invalid(
        field,
        "PAYLOAD_TOO_LARGE",
        format!(
            "with this {field} the job would hold {bytes} bytes (job_data, result and \
             error_message together, encoded as protobuf); the limit is {} \
             (--max-job-bytes): send less, or keep large payloads elsewhere and pass a reference",
            limits.max_job_bytes
        ),
    )
}

/// Resolves a request's `user_id` field against the caller: a user may only name itself
/// (empty means itself); the service role may name anyone, or nobody (`None`).
pub fn resolve_user(caller: &Caller, requested: Option<Uuid>) -> Result<Option<Uuid>> {
    match (caller.role(), requested) {
        (Role::Service, r) => Ok(r),
        (Role::User(me), None) => Ok(Some(me)),
        (Role::User(me), Some(r)) if r == me => Ok(Some(me)),
        (Role::User(_), Some(_)) => Err(Error::denied(
            "USER_MISMATCH",
            "user_id names another user; an authenticated caller may only act for itself",
        )),
    }
}

/// The validated filter of a ListJobs request (`None` when it can match nothing); a user's
/// scope is always the user itself.
pub fn list_filter(
    caller: &Caller,
    msg: pb::ListJobsRequest,
    limits: JsonLimits,
) -> Result<Option<ListFilter>> {
    let statuses = msg
        .statuses
        .iter()
        .map(|s| parse_status("statuses", *s))
        .collect::<Result<Vec<_>>>()?;
    let mut statuses = statuses;
    statuses.sort();
    statuses.dedup();
    let mut filter = ListFilter {
        user: resolve_user(caller, parse_optional_uuid("user_id", &msg.user_id)?)?,
        statuses,
        agent_identifier: match msg.agent_identifier.as_str() {
            "" => None,
            a => Some(validate_agent_identifier("agent_identifier", a)?),
        },
        created_after: msg
            .created_after
            .map(|t| parse_timestamp("created_after", t))
            .transpose()?,
        created_before: msg
            .created_before
            .map(|t| parse_timestamp("created_before", t))
            .transpose()?,
        job_data_contains: msg
            .job_data_contains
            .map(|s| {
                // Larger than any job may hold: it could match nothing.
                let json = struct_to_json("job_data_contains", s, limits)?;
                match size::job_data_field_len(&json) {
                    n if n > limits.max_job_bytes => {
                        Err(payload_too_large("job_data_contains", n, limits))
                    }
                    _ => Ok(json),
                }
            })
            .transpose()?,
        running_longer_than_us: msg
            .running_longer_than
            .map(|d| {
                parse_bounded_duration("running_longer_than", d, MAX_AGE)
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
pub fn list_fingerprint(f: &ListFilter) -> Fingerprint {
    let canonical = serde_json::json!({
        "user": f.user,
        "statuses": f.statuses.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        "agent": f.agent_identifier,
        "after": f.created_after.map(|t| t.timestamp_micros()),
        "before": f.created_before.map(|t| t.timestamp_micros()),
        "contains": f.job_data_contains,
        "running_longer_than_us": f.running_longer_than_us,
    });
    fingerprint(canonical.to_string().as_bytes())
}

/// The validated filter of a StreamJobUpdates request; a user's scope is always the user.
pub fn watch_filter(caller: &Caller, msg: &pb::StreamJobUpdatesRequest) -> Result<WatchFilter> {
    if msg.job_ids.len() > MAX_JOB_IDS {
        return Err(Error::invalid(
            "job_ids",
            "TOO_MANY_JOB_IDS",
            format!(
                "job_ids holds {} ids; at most {} (leave it empty to follow every job)",
                msg.job_ids.len(),
                MAX_JOB_IDS
            ),
        ));
    }
    let mut statuses = msg
        .statuses
        .iter()
        .map(|s| parse_status("statuses", *s))
        .collect::<Result<Vec<_>>>()?;
    statuses.sort();
    statuses.dedup();
    Ok(WatchFilter {
        job_ids: msg
            .job_ids
            .iter()
            .map(|id| parse_uuid("job_ids", id))
            .collect::<Result<_>>()?,
        statuses,
        agent_identifier: match msg.agent_identifier.as_str() {
            "" => None,
            a => Some(validate_agent_identifier("agent_identifier", a)?),
        },
        user: resolve_user(caller, parse_optional_uuid("user_id", &msg.user_id)?)?,
        worker_id: validate_worker_id(&msg.worker_id)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Request fields: no input panics; the answer is a value or a documented reason.
        #[test]
        fn any_string_field_is_parsed_or_refused(s in "\\PC{0,40}|.{0,300}") {
            let _ = parse_uuid("id", &s);
            let _ = validate_agent_identifier("agent_identifier", &s);
            let _ = validate_request_id(&s);
            let _ = validate_error_message(&s);
        }

        #[test]
        fn any_timestamp_or_duration_is_parsed_or_refused(secs in any::<i64>(), nanos in any::<i32>()) {
            let _ = parse_timestamp("t", Timestamp { seconds: secs, nanos });
            let _ = parse_duration("d", prost_types::Duration { seconds: secs, nanos });
        }
    }
}
