//! Rows as they come out of PostgreSQL beyond the domain's [`Job`], and the SQL mappings of
//! domain types (the `job_status` enum, jsonb read as text).
use diesel::deserialize::{self, FromSql};
use diesel::pg::{Pg, PgValue};
use diesel::prelude::*;
use diesel::serialize::{self, IsNull, Output, ToSql};
use std::io::Write;

use super::schema::sql_types;
use crate::domain::{Job, JobStatus};

/// A job row plus whether this statement wrote it (insert or compare-and-set).
#[derive(Debug, Clone, QueryableByName)]
pub(crate) struct WrittenRow {
    #[diesel(embed)]
    pub job: Job,
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

/// A jsonb value as the database's own JSON text, unparsed: for rows whose JSON only goes out
/// on the wire (the jobs of a ListJobs page), which the API layer reads straight into protobuf
/// values without building a `serde_json::Value` tree first.
#[derive(Debug, Clone, PartialEq, diesel::deserialize::FromSqlRow)]
pub struct JsonText(pub Vec<u8>);

// jsonb's binary format is a version byte (1), then the document as text.
impl FromSql<diesel::sql_types::Jsonb, Pg> for JsonText {
    fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
        match value.as_bytes().split_first() {
            Some((1, text)) => Ok(JsonText(text.to_vec())),
            _ => Err("unsupported jsonb binary format version".into()),
        }
    }
}
