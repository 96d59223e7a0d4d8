//! Statements on the change history `job_events` (migration 2026-11-25-000005): the feed's
//! reads in (feed_xid, seq) order below the horizon, the snapshot of existing jobs a stream
//! starts from, ListJobEvents, and pruning.
use chrono::{DateTime, Utc};
use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Bool, Integer, Nullable, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::PreparedExt;
use crate::domain::{Job, JobStatus, Position, Snapshot, WatchFilter};
use crate::error::{Error, Result};

/// One event: a job as it was just after one committed change.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub feed_xid: i64,
    pub seq: i64,
    /// The id of the transaction that made the change.
    pub writer_xid: i64,
    /// Its JSON and message in bytes of text (what it weighs in a queue).
    pub bytes: usize,
    pub job: Job,
}

impl EventRow {
    pub fn position(&self) -> Position {
        Position {
            xid: self.feed_xid,
            seq: self.seq,
        }
    }
}

/// What one read of the feed returned.
#[derive(Debug)]
pub struct Read {
    /// Events after the cursor, in feed order.
    pub events: Vec<EventRow>,
    /// The horizon of the read: when fewer than `limit` events came back, everything below
    /// it has been read.
    pub horizon: i64,
    /// Committed events wait at or above the horizon for an older transaction to end.
    pub pending: bool,
    /// Where a reader that has read everything below the horizon stands: the last event
    /// below it (`job_events_tail`, migration 000008). Positions are such tails, never the
    /// horizon itself, whose transaction ids crash recovery may hand out again.
    pub tail: Position,
    /// The read stopped at `limit` events or [`READ_BYTES`]: read again from the last event.
    /// Otherwise everything below the horizon has been read.
    pub more: bool,
}

/// One row of [`READ_SQL`]: the horizon, and an event unless there was none (the LEFT JOIN's
/// one row of NULLs), hence every event column nullable.
#[derive(diesel::QueryableByName)]
struct ReadRow {
    #[diesel(sql_type = BigInt)]
    horizon: i64,
    #[diesel(sql_type = Bool)]
    pending: bool,
    #[diesel(sql_type = BigInt)]
    tail_xid: i64,
    #[diesel(sql_type = BigInt)]
    tail_seq: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    feed_xid: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    seq: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    writer_xid: Option<i64>,
    #[diesel(sql_type = Nullable<diesel::sql_types::Uuid>)]
    id: Option<Uuid>,
    #[diesel(sql_type = Nullable<diesel::sql_types::Uuid>)]
    user_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<Text>)]
    agent_identifier: Option<String>,
    #[diesel(sql_type = Nullable<crate::db::schema::sql_types::JobStatus>)]
    status: Option<JobStatus>,
    #[diesel(sql_type = Nullable<Text>)]
    job_data: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    result: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    error_message: Option<String>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    created_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    updated_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    started_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    completed_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<BigInt>)]
    version: Option<i64>,
    #[diesel(sql_type = Nullable<Integer>)]
    priority: Option<i32>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    run_after: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Integer>)]
    attempt: Option<i32>,
    #[diesel(sql_type = Nullable<Integer>)]
    max_attempts: Option<i32>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    lease_expires_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Text>)]
    worker_id: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    progress: Option<String>,
    /// The event's JSON and message, in bytes of text.
    #[diesel(sql_type = Nullable<Integer>)]
    bytes: Option<i32>,
    /// The running total of `bytes` in this read, this event included.
    #[diesel(sql_type = Nullable<BigInt>)]
    upto: Option<i64>,
}

/// jsonb as text to JSON. jsonb holds what serde_json cannot (numbers beyond f64, nesting
/// deeper than 128, both writable by plain SQL); one such row must not stop the feed for
/// everyone, so it is delivered with a marker in place of the value, and logged.
fn lenient_json(text: &str, column: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| {
        tracing::warn!(column, error = %e, "change feed: a value cannot be represented as JSON");
        serde_json::json!({ "jobsvc_error": format!("{column} cannot be represented as JSON") })
    })
}

impl ReadRow {
    fn into_event(self) -> Option<EventRow> {
        Some(EventRow {
            feed_xid: self.feed_xid?,
            seq: self.seq?,
            writer_xid: self.writer_xid.unwrap_or(self.feed_xid?),
            bytes: self.bytes.unwrap_or(0).max(0) as usize,
            job: Job {
                id: self.id?,
                user_id: self.user_id,
                agent_identifier: self.agent_identifier?,
                status: self.status?,
                job_data: self.job_data.map(|t| lenient_json(&t, "job_data")),
                result: self.result.map(|t| lenient_json(&t, "result")),
                error_message: self.error_message,
                created_at: self.created_at?,
                updated_at: self.updated_at?,
                started_at: self.started_at,
                completed_at: self.completed_at,
                version: self.version?,
                request_id: None,
                priority: self.priority.unwrap_or(0),
                run_after: self.run_after,
                attempt: self.attempt.unwrap_or(0),
                max_attempts: self.max_attempts.unwrap_or(1),
                initial_backoff: None,
                lease_id: None,
                lease_expires_at: self.lease_expires_at,
                worker_id: self.worker_id,
                progress: self.progress.map(|t| lenient_json(&t, "progress")),
            },
        })
    }
}

fn read_sql(for_user: bool) -> String {
    READ_SQL.replace("{user}", if for_user { "AND e.user_id = $4" } else { "" })
}

#[derive(diesel::QueryableByName)]
struct PlanLine {
    #[diesel(sql_type = Text)]
    #[diesel(column_name = "QUERY PLAN")]
    line: String,
}

/// The plan PostgreSQL picks for a user's [`read`] after `after`, as `EXPLAIN` prints it: for
/// operators and tests, to see that the user's index serves it.
pub async fn explain_read(
    mut conn: &AsyncPgConnection,
    after: Position,
    user: Uuid,
) -> Result<String> {
    let lines: Vec<PlanLine> = diesel::sql_query(format!("EXPLAIN {}", read_sql(true)))
        .bind::<Text, _>(after.xid.to_string())
        .bind::<BigInt, _>(after.seq)
        .bind::<BigInt, _>(1000)
        .bind::<diesel::sql_types::Uuid, _>(user)
        .load(&mut conn)
        .await?;
    Ok(lines
        .into_iter()
        .map(|l| l.line)
        .collect::<Vec<_>>()
        .join("\n"))
}

// One statement, so the horizon and the events come from one snapshot: the horizon
// pg_snapshot_xmin(pg_current_snapshot()) is the statement's own (pg_current_snapshot() is the
// active snapshot). Every transaction below it has ended, and those that committed are
// visible to this statement, so no event can later appear at a position this read passed.
// The LEFT JOIN returns the horizon even when there is no event. `{user}` is empty or
// "AND e.user_id = $4".
const READ_SQL: &str = "
SELECT h.horizon::text::int8 AS horizon,
       EXISTS (SELECT 1 FROM job_events x WHERE x.feed_xid >= h.horizon) AS pending,
       tail.tail_xid, tail.tail_seq,
       e.*
FROM (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS horizon) h
CROSS JOIN LATERAL job_events_tail(h.horizon) tail(tail_xid, tail_seq)
LEFT JOIN LATERAL (
    SELECT * FROM (
        SELECT e.feed_xid::text::int8 AS feed_xid, e.seq, e.writer_xid::text::int8 AS writer_xid,
               e.job_id AS id, e.user_id,
               e.agent_identifier, e.status, e.job_data::text AS job_data, e.result::text AS result,
               e.error_message, e.created_at,
               e.updated_at, e.started_at, e.completed_at, e.version,
               e.priority, e.run_after, e.attempt, e.max_attempts, e.lease_expires_at,
               e.worker_id, e.progress::text AS progress,
               s.bytes, sum(s.bytes) OVER (ORDER BY e.feed_xid, e.seq) AS upto
        FROM job_events e
        CROSS JOIN LATERAL (SELECT coalesce(octet_length(e.job_data::text), 0)
                                   + coalesce(octet_length(e.result::text), 0)
                                   + coalesce(octet_length(e.error_message), 0)
                                   + coalesce(octet_length(e.progress::text), 0) AS bytes) s
        WHERE (e.feed_xid, e.seq) > ($1::text::xid8, $2) AND e.feed_xid < h.horizon {user}
        ORDER BY e.feed_xid, e.seq
        LIMIT $3
    ) w
    WHERE w.upto - w.bytes < 33554432
) e ON true";

/// The JSON a read of the history returns at most (as text, [`READ_SQL`]'s last condition),
/// besides its first event however large: a burst of large jobs is read in several pieces,
/// not held in memory whole.
pub const READ_BYTES: i64 = 32 << 20;

/// Events after `after` and below the horizon, in feed order, at most `limit`; only `user`'s
/// when set (served by the index `job_events_user_position`, so it costs what the user's own
/// events cost; callers apply visibility themselves too, and a user's read runs under
/// row-level security).
pub async fn read(
    mut conn: &AsyncPgConnection,
    after: Position,
    limit: i64,
    user: Option<Uuid>,
) -> Result<Read> {
    let mut query = diesel::sql_query(read_sql(user.is_some()))
        .into_boxed::<diesel::pg::Pg>()
        .bind::<Text, _>(after.xid.to_string())
        .bind::<BigInt, _>(after.seq)
        .bind::<BigInt, _>(limit);
    if let Some(user) = user {
        query = query.bind::<diesel::sql_types::Uuid, _>(user);
    }
    let rows: Vec<ReadRow> = query.prepared().load(&mut conn).await?;
    let (horizon, pending, tail) = rows
        .as_slice()
        .first()
        .map(|r| {
            let tail = Position {
                xid: r.tail_xid,
                seq: r.tail_seq,
            };
            (r.horizon, r.pending, tail)
        })
        .ok_or_else(|| Error::Internal("feed read returned no row".into()))?;
    Ok(Read {
        // Stopped by the limit, or by the byte budget (then the last event's running total
        // reached it; a further read finds out whether anything was left).
        more: limit > 0
            && (rows.iter().filter(|r| r.seq.is_some()).count() as i64 == limit
                || rows
                    .last()
                    .and_then(|r| r.upto)
                    .is_some_and(|upto| upto >= READ_BYTES)),
        events: rows.into_iter().filter_map(ReadRow::into_event).collect(),
        horizon,
        pending,
        tail,
    })
}

#[derive(diesel::QueryableByName)]
struct SnapshotText {
    #[diesel(sql_type = Text)]
    snapshot: String,
    #[diesel(sql_type = BigInt)]
    tail_xid: i64,
    #[diesel(sql_type = BigInt)]
    tail_seq: i64,
}

/// The current transaction's snapshot; in a REPEATABLE READ transaction, the one every
/// statement of it reads.
/// Also returns the tail below the snapshot's xmin (`job_events_tail`, migration 000008):
/// where a stream starting from this snapshot stands.
pub async fn snapshot(conn: &mut AsyncPgConnection) -> Result<(Snapshot, Position)> {
    let row: SnapshotText = diesel::sql_query(
        "SELECT pg_current_snapshot()::text AS snapshot, t.feed_xid AS tail_xid, t.seq AS tail_seq \
         FROM job_events_tail(pg_snapshot_xmin(pg_current_snapshot())) t",
    )
    .prepared()
    .get_result(conn)
    .await?;
    let snapshot = Snapshot::parse(&row.snapshot)
        .ok_or_else(|| Error::Internal(format!("unparsable snapshot {:?}", row.snapshot).into()))?;
    Ok((
        snapshot,
        Position {
            xid: row.tail_xid,
            seq: row.tail_seq,
        },
    ))
}

/// A job of a snapshot page, and the running total of the page's JSON up to it.
#[derive(diesel::QueryableByName)]
struct ExistingRow {
    #[diesel(embed)]
    job: Job,
    #[diesel(sql_type = BigInt)]
    upto: i64,
}

/// A page of the jobs matching `filter`, in id order, after `after`: at most `limit` jobs and
/// [`READ_BYTES`] of JSON (besides its first job). Also says whether the page was cut short
/// (read again after its last job).
pub async fn existing_jobs(
    conn: &mut AsyncPgConnection,
    filter: &WatchFilter,
    after: Option<Uuid>,
    limit: i64,
) -> Result<(Vec<Job>, bool)> {
    let mut sql = String::from(
        "SELECT * FROM (SELECT jobs.*, b.bytes, sum(b.bytes) OVER (ORDER BY id) AS upto \
         FROM jobs CROSS JOIN LATERAL (SELECT coalesce(octet_length(job_data::text), 0) \
             + coalesce(octet_length(result::text), 0) \
             + coalesce(octet_length(error_message), 0) AS bytes) b WHERE TRUE",
    );
    let mut n = 0;
    let mut next = || {
        n += 1;
        n
    };
    if !filter.job_ids.is_empty() {
        sql += &format!(" AND id = ANY(${}::uuid[])", next());
    }
    if !filter.statuses.is_empty() {
        sql += &format!(" AND status = ANY(${}::job_status[])", next());
    }
    if filter.agent_identifier.is_some() {
        sql += &format!(" AND agent_identifier = ${}", next());
    }
    if filter.user.is_some() {
        sql += &format!(" AND user_id = ${}", next());
    }
    if after.is_some() {
        sql += &format!(" AND id > ${}", next());
    }
    sql += &format!(
        " ORDER BY id LIMIT ${}) page WHERE page.upto - page.bytes < {READ_BYTES}",
        next()
    );
    let mut query = diesel::sql_query(sql).into_boxed::<diesel::pg::Pg>();
    if !filter.job_ids.is_empty() {
        query = query.bind::<Array<diesel::sql_types::Uuid>, _>(
            filter.job_ids.iter().copied().collect::<Vec<_>>(),
        );
    }
    if !filter.statuses.is_empty() {
        let labels: Vec<&'static str> = filter.statuses.iter().map(|s| s.as_str()).collect();
        query = query.bind::<Array<Text>, _>(labels);
    }
    if let Some(agent) = &filter.agent_identifier {
        query = query.bind::<Text, _>(agent.clone());
    }
    if let Some(user) = filter.user {
        query = query.bind::<diesel::sql_types::Uuid, _>(user);
    }
    if let Some(id) = after {
        query = query.bind::<diesel::sql_types::Uuid, _>(id);
    }
    // Not kept prepared: a stream's first pages, rare, and their best plan depends on the
    // filter's values (a cached generic plan could walk the wrong index).
    let rows: Vec<ExistingRow> = query.bind::<BigInt, _>(limit).load(conn).await?;
    // Stopped by the limit, or by the byte budget (see [`Read::more`]).
    let more = rows.len() as i64 == limit || rows.last().is_some_and(|r| r.upto >= READ_BYTES);
    Ok((rows.into_iter().map(|r| r.job).collect(), more))
}

#[derive(diesel::QueryableByName)]
struct PrunedRow {
    #[diesel(sql_type = BigInt)]
    feed_xid: i64,
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = BigInt)]
    next_xid: i64,
}

/// The range a resume point must lie in: not below the pruning watermark (those events may
/// be gone), and not beyond the database's next transaction id (a token from another
/// timeline, e.g. from before a restore).
pub async fn resumable_range(conn: &mut AsyncPgConnection) -> Result<(Position, i64)> {
    let row: PrunedRow = diesel::sql_query(
        "SELECT feed_xid::text::int8 AS feed_xid, seq, \
                pg_snapshot_xmax(pg_current_snapshot())::text::int8 AS next_xid \
         FROM job_events_pruned",
    )
    .prepared()
    .get_result(conn)
    .await?;
    let pruned = Position {
        xid: row.feed_xid,
        seq: row.seq,
    };
    Ok((pruned, row.next_xid))
}

/// One entry of a job's history, for ListJobEvents.
#[derive(Debug, Clone, diesel::QueryableByName)]
pub struct HistoryRow {
    #[diesel(sql_type = BigInt)]
    pub version: i64,
    #[diesel(sql_type = crate::db::schema::sql_types::JobStatus)]
    pub status: JobStatus,
    #[diesel(sql_type = Timestamptz)]
    pub occurred_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Text>)]
    pub error_message: Option<String>,
}

/// A page of one job's history, oldest first, after version `after`: only while the job
/// exists and, with `scope`, belongs to that user now (isolation in the application as well
/// as in row-level security).
pub async fn history(
    mut conn: &AsyncPgConnection,
    scope: Option<Uuid>,
    job_id: Uuid,
    after: i64,
    limit: i64,
) -> Result<Vec<HistoryRow>> {
    Ok(diesel::sql_query(
        "SELECT version, status, occurred_at, error_message FROM job_events \
         WHERE job_id = $1 AND version > $2 \
           AND EXISTS (SELECT 1 FROM jobs j WHERE j.id = $1 AND ($3::uuid IS NULL OR j.user_id = $3)) \
         ORDER BY version LIMIT $4",
    )
    .bind::<diesel::sql_types::Uuid, _>(job_id)
    .bind::<BigInt, _>(after)
    .bind::<Nullable<diesel::sql_types::Uuid>, _>(scope)
    .bind::<BigInt, _>(limit)
    .prepared().load(&mut conn)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_read_statement_stops_at_the_byte_budget() {
        assert!(READ_SQL.contains(&format!("w.upto - w.bytes < {READ_BYTES}\n")));
    }
}
