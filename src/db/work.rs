//! Statements of the workers' path (migration 2026-12-06-000011): claims, heartbeats, the next
//! ready time of an agent's jobs, and the lease sweeper's batch. Completion with a lease is a
//! compare-and-set like any other move (`super::jobs::compare_and_set_many`).
use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Bool, Double, Jsonb, Nullable, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::PreparedExt;
use crate::domain::{Beat, Claim, Job, JobStatus, RetryPolicy};
use crate::error::Result;

// One statement: the ready jobs of one agent (in the claim index's order), locked with SKIP
// LOCKED so that concurrent claims take different jobs without waiting, each moved to RUNNING
// under a new lease. `jobs.status = 'pending'` again in the UPDATE: a row locked after it
// changed is re-checked as it is now.
#[rustfmt::skip]
const CLAIM_SQL: &str = concat!("
WITH ready AS (
    SELECT id FROM jobs
    WHERE status = 'pending' AND agent_identifier = $1 AND ($2::uuid IS NULL OR user_id = $2)
      AND coalesce(run_after, created_at) <= now()
    ORDER BY priority DESC, coalesce(run_after, created_at), id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE jobs SET
    status = 'running',
    started_at = coalesce(jobs.started_at, now()),
    attempt = jobs.attempt + 1,
    lease_id = gen_random_uuid(),
    lease_duration = $4 * interval '1 microsecond',
    lease_expires_at = now() + $4 * interval '1 microsecond',
    worker_id = $5
FROM ready
WHERE jobs.id = ready.id AND jobs.status = 'pending'
RETURNING ", job_columns!("jobs"));

/// Claims up to `claim.max_jobs` ready jobs; returns them highest priority first, then oldest.
pub async fn claim(mut conn: &AsyncPgConnection, claim: &Claim) -> Result<Vec<Job>> {
    let mut jobs: Vec<Job> = diesel::sql_query(CLAIM_SQL)
        .bind::<Text, _>(&claim.agent_identifier)
        .bind::<Nullable<diesel::sql_types::Uuid>, _>(claim.user)
        .bind::<BigInt, _>(claim.max_jobs)
        .bind::<BigInt, _>(claim.lease_us)
        .bind::<Nullable<Text>, _>(claim.worker_id.as_deref())
        .prepared()
        .load(&mut conn)
        .await?;
    jobs.sort_by(|a, b| {
        let ready = |j: &Job| j.run_after.unwrap_or(j.created_at);
        b.priority
            .cmp(&a.priority)
            .then(ready(a).cmp(&ready(b)))
            .then(a.id.cmp(&b.id))
    });
    Ok(jobs)
}

#[derive(diesel::QueryableByName)]
struct NextReady {
    #[diesel(sql_type = Nullable<Timestamptz>)]
    at: Option<DateTime<Utc>>,
}

/// When the next of the agent's pending jobs becomes ready (the earliest future
/// `run_after`), if any: a waiting claim sleeps until then.
pub async fn next_ready(
    mut conn: &AsyncPgConnection,
    agent_identifier: &str,
    user: Option<Uuid>,
) -> Result<Option<DateTime<Utc>>> {
    let row: NextReady = diesel::sql_query(
        "SELECT min(run_after) AS at FROM jobs \
         WHERE status = 'pending' AND agent_identifier = $1 \
           AND ($2::uuid IS NULL OR user_id = $2) AND run_after > now()",
    )
    .bind::<Text, _>(agent_identifier)
    .bind::<Nullable<diesel::sql_types::Uuid>, _>(user)
    .prepared()
    .get_result(&mut conn)
    .await?;
    Ok(row.at)
}

/// What a heartbeat found: the job's state, and whether the lease was extended.
#[derive(Debug, Clone, diesel::QueryableByName)]
pub struct BeatRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    pub id: Uuid,
    #[diesel(sql_type = crate::db::schema::sql_types::JobStatus)]
    pub status: JobStatus,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pub attempt: i32,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// The lease was the job's and is now extended.
    #[diesel(sql_type = Bool)]
    pub written: bool,
    /// The job's lease is (or was last) the one the heartbeat named.
    #[diesel(sql_type = Bool)]
    pub same_lease: bool,
}

// Many heartbeats in one statement (natural batching, as creates and moves): each extends its
// lease while the job is RUNNING under it. Only lease_expires_at and progress are set, so the
// row's version stays (no history event, see the migration) unless progress changed and the
// job's last change is a second old. Rows not extended come back as they are, for the answer.
#[rustfmt::skip]
const BEAT_MANY_SQL: &str = "
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::int8[], $4::jsonb[])
        AS t(id, lease_id, lease_us, progress)
), upd AS (
    UPDATE jobs SET
        lease_expires_at = now() + coalesce(i.lease_us * interval '1 microsecond',
                                            jobs.lease_duration, interval '60 seconds'),
        progress = CASE WHEN i.progress IS NULL THEN jobs.progress ELSE i.progress END
    FROM input i
    WHERE jobs.id = i.id AND jobs.lease_id = i.lease_id AND jobs.status = 'running'
      AND ($5::uuid IS NULL OR jobs.user_id = $5)
    RETURNING jobs.id, jobs.status, jobs.attempt, jobs.lease_expires_at
)
SELECT id, status, attempt, lease_expires_at, true AS written, true AS same_lease FROM upd
UNION ALL
SELECT j.id, j.status, j.attempt, j.lease_expires_at, false, j.lease_id IS NOT DISTINCT FROM i.lease_id
FROM input i JOIN jobs j ON j.id = i.id
WHERE ($5::uuid IS NULL OR j.user_id = $5) AND i.id NOT IN (SELECT id FROM upd)";

/// Applies `beats` (distinct job ids) in one statement, in `scope`; one row per job found.
pub async fn heartbeat_many(
    mut conn: &AsyncPgConnection,
    scope: Option<Uuid>,
    beats: &[&Beat],
) -> Result<Vec<BeatRow>> {
    let ids: Vec<Uuid> = beats.iter().map(|b| b.id).collect();
    let leases: Vec<Uuid> = beats.iter().map(|b| b.lease_id).collect();
    let lease_us: Vec<Option<i64>> = beats.iter().map(|b| b.lease_us).collect();
    let progress: Vec<Option<&serde_json::Value>> =
        beats.iter().map(|b| b.progress.as_ref()).collect();
    Ok(diesel::sql_query(BEAT_MANY_SQL)
        .bind::<Array<diesel::sql_types::Uuid>, _>(ids)
        .bind::<Array<diesel::sql_types::Uuid>, _>(leases)
        .bind::<Array<Nullable<BigInt>>, _>(lease_us)
        .bind::<Array<Nullable<Jsonb>>, _>(progress)
        .bind::<Nullable<diesel::sql_types::Uuid>, _>(scope)
        .prepared()
        .load(&mut conn)
        .await?)
}

#[derive(diesel::QueryableByName)]
struct Expired {
    #[diesel(sql_type = BigInt)]
    retried: i64,
    #[diesel(sql_type = BigInt)]
    failed: i64,
}

/// One batch of the lease sweeper (`jobs_expire_leases`): how many expired leases were
/// retried and how many failed for good.
pub async fn expire_leases(
    mut conn: &AsyncPgConnection,
    policy: RetryPolicy,
    max_rows: i32,
) -> Result<(i64, i64)> {
    let row: Expired = diesel::sql_query(
        "SELECT retried, failed FROM jobs_expire_leases($1 * interval '1 microsecond', $2, \
         $3 * interval '1 microsecond', $4)",
    )
    .bind::<BigInt, _>(policy.initial_us)
    .bind::<Double, _>(policy.multiplier)
    .bind::<BigInt, _>(policy.max_us)
    .bind::<diesel::sql_types::Integer, _>(max_rows)
    .prepared()
    .get_result(&mut conn)
    .await?;
    Ok((row.retried, row.failed))
}
