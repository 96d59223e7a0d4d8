//! Rows as they come out of PostgreSQL, and the `job_status` enum's wire format.
use chrono::{DateTime, Utc};
use diesel::deserialize::{self, FromSql};
use diesel::pg::{Pg, PgValue};
use diesel::prelude::*;
use diesel::serialize::{self, IsNull, Output, ToSql};
use std::io::Write;
use uuid::Uuid;

use super::schema::{jobs, sql_types};
use crate::domain::JobStatus;

/// One row of `jobs`. `J` is how its JSON columns are read: as `serde_json::Value` to work
/// with them, or as [`crate::convert::PbJson`] when they only go out as protobuf (the jobs of
/// a ListJobs page).
#[derive(Debug, Clone, PartialEq, Queryable, QueryableByName, Selectable)]
// No `check_for_backend`: its generated check cannot name the type parameter.
#[diesel(table_name = jobs)]
pub struct JobRow<J = serde_json::Value> {
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

/// A job row plus whether this statement wrote it (insert or compare-and-set).
#[derive(Debug, Clone, QueryableByName)]
pub struct WrittenRow {
    #[diesel(embed)]
    pub job: JobRow,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub written: bool,
}

// The enum travels as its label, in both text and binary format.
impl ToSql<sql_types::JobStatus, Pg> for JobStatus {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
        out.write_all(self.as_str().as_bytes())?;
        Ok(IsNull::No)
    }
}

impl FromSql<sql_types::JobStatus, Pg> for JobStatus {
    fn from_sql(bytes: PgValue<'_>) -> deserialize::Result<Self> {
        let s = std::str::from_utf8(bytes.as_bytes())?;
        JobStatus::parse(s).ok_or_else(|| format!("unknown job_status {s:?}").into())
    }
}

// How a ListJobs page reads its JSON columns (see `crate::convert::PbJson`). jsonb's binary
// format is a version byte (1), then the document as text.
impl FromSql<diesel::sql_types::Jsonb, Pg> for crate::convert::PbJson {
    fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
        match value.as_bytes().split_first() {
            Some((1, text)) => Ok(serde_json::from_slice(text)?),
            _ => Err("unsupported jsonb binary format version".into()),
        }
    }
}
