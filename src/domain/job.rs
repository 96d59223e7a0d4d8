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
}

/// What a move adds to a job, and the most the job may hold (protobuf-encoded bytes of
/// job_data, result and error_message together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeCheck {
    pub added: i64,
    pub limit: i64,
}
