//! GetStats from the `job_stats_rollup` table (migration 2026-11-25-000002): counts and the
//! processing-time sum are kept exact by statement-level triggers in every writing
//! transaction, so reading them costs a few index rows, not a scan of `jobs`.
use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Double, Nullable, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::PreparedExt;
use crate::error::Result;

#[derive(Debug, Clone, PartialEq, diesel::QueryableByName)]
pub struct Counts {
    #[diesel(sql_type = BigInt)]
    pub total: i64,
    #[diesel(sql_type = BigInt)]
    pub pending: i64,
    #[diesel(sql_type = BigInt)]
    pub running: i64,
    #[diesel(sql_type = BigInt)]
    pub completed: i64,
    #[diesel(sql_type = BigInt)]
    pub failed: i64,
    #[diesel(sql_type = BigInt)]
    pub cancelled: i64,
    #[diesel(sql_type = Double)]
    pub avg_processing_seconds: f64,
}

#[derive(diesel::QueryableByName)]
struct Oldest {
    #[diesel(sql_type = Nullable<Timestamptz>)]
    oldest: Option<DateTime<Utc>>,
}

const COUNTS_SELECT: &str = "
SELECT coalesce(sum(jobs), 0)::int8 AS total,
       coalesce(sum(jobs) FILTER (WHERE status = 'pending'), 0)::int8 AS pending,
       coalesce(sum(jobs) FILTER (WHERE status = 'running'), 0)::int8 AS running,
       coalesce(sum(jobs) FILTER (WHERE status = 'completed'), 0)::int8 AS completed,
       coalesce(sum(jobs) FILTER (WHERE status = 'failed'), 0)::int8 AS failed,
       coalesce(sum(jobs) FILTER (WHERE status = 'cancelled'), 0)::int8 AS cancelled,
       coalesce(sum(processing_seconds) / nullif(sum(processing_count), 0), 0)::float8
           AS avg_processing_seconds
FROM job_stats_rollup";

// A SECURITY DEFINER function that applies the jobs policies itself and branches to four
// statically planned index lookups: under row-level security a plain min() could not use the
// partial indexes (enum equality is not leakproof).
const OLDEST_SELECT: &str = "SELECT job_oldest_pending($1::uuid, $2::text) AS oldest";

/// The WHERE clause of the counts for a scope.
fn scope_clause(user: Option<Uuid>, agent: Option<&str>) -> &'static str {
    match (user, agent) {
        (None, None) => "",
        (Some(_), None) => " WHERE user_id = $1",
        (None, Some(_)) => " WHERE agent_identifier = $1",
        (Some(_), Some(_)) => " WHERE user_id = $1 AND agent_identifier = $2",
    }
}

/// Figures for all jobs (`user` None), one user's, optionally for one agent. The oldest
/// pending job is read first: inside a transaction, jobs before rollup is the lock order the
/// triggers use. (A user's figures are two statements without a transaction: the oldest
/// pending job and the counts may be a moment apart, as any two reads are.)
/// The counts use one fixed statement text per scope, so each has its own cached plan on its
/// own index (a nullable-parameter clause would defeat the index in a generic plan).
pub async fn get(
    mut conn: &AsyncPgConnection,
    user: Option<Uuid>,
    agent: Option<&str>,
) -> Result<(Counts, Option<DateTime<Utc>>)> {
    let oldest: Oldest = diesel::sql_query(OLDEST_SELECT)
        .bind::<Nullable<diesel::sql_types::Uuid>, _>(user)
        .bind::<Nullable<Text>, _>(agent)
        .prepared()
        .get_result(&mut conn)
        .await?;
    let counts_sql = format!("{COUNTS_SELECT}{}", scope_clause(user, agent));
    let mut counts_q = diesel::sql_query(counts_sql).into_boxed::<diesel::pg::Pg>();
    if let Some(u) = user {
        counts_q = counts_q.bind::<diesel::sql_types::Uuid, _>(u);
    }
    if let Some(a) = agent {
        counts_q = counts_q.bind::<Text, _>(a.to_owned());
    }
    let counts: Counts = counts_q.prepared().get_result(&mut conn).await?;
    Ok((counts, oldest.oldest))
}

/// Merges the per-writer shard rows of the rollup into one row per group.
pub async fn fold(conn: &mut AsyncPgConnection) -> Result<()> {
    diesel::sql_query("SELECT job_stats_fold()")
        .execute(conn)
        .await?;
    Ok(())
}
