//! Retention of finished jobs: a background task deletes, per terminal status, the jobs that
//! finished longer ago than the configured age, in batches of one short statement each
//! (`jobs_prune_finished`, migration 2026-11-25-000006), so no lock is held for long and
//! concurrent writers are skipped rather than waited for. Every replica may run it.
use std::time::Duration;

use diesel::sql_types::{BigInt, Integer, Interval, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use tokio::sync::watch;

use crate::db::PgPool;
use crate::domain::JobStatus;
use crate::error::Result;

/// Jobs deleted per statement.
const BATCH: i32 = 1000;

/// How long finished jobs are kept, per status; `None` keeps them forever.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub completed: Option<Duration>,
    pub failed: Option<Duration>,
    pub cancelled: Option<Duration>,
}

impl Policy {
    fn rules(&self) -> impl Iterator<Item = (JobStatus, Duration)> {
        [
            (JobStatus::Completed, self.completed),
            (JobStatus::Failed, self.failed),
            (JobStatus::Cancelled, self.cancelled),
        ]
        .into_iter()
        .filter_map(|(s, d)| d.map(|d| (s, d)))
    }

    pub fn is_empty(&self) -> bool {
        self.rules().next().is_none()
    }
}

#[derive(diesel::QueryableByName)]
struct Deleted {
    #[diesel(sql_type = BigInt)]
    deleted: i64,
}

/// One batch for one status; returns how many jobs were deleted.
pub async fn prune_batch(
    conn: &mut AsyncPgConnection,
    status: JobStatus,
    keep: Duration,
    max_rows: i32,
) -> Result<i64> {
    let us = i64::try_from(keep.as_micros()).unwrap_or(i64::MAX);
    let row: Deleted =
        diesel::sql_query("SELECT jobs_prune_finished($1::job_status, $2, $3) AS deleted")
            .bind::<Text, _>(status.as_str())
            .bind::<Interval, _>(diesel::pg::data_types::PgInterval::from_microseconds(us))
            .bind::<Integer, _>(max_rows)
            .get_result(conn)
            .await?;
    Ok(row.deleted)
}

/// Applies the policy once, batch after batch until nothing is left; returns the total.
pub async fn prune(
    pool: &PgPool,
    policy: &Policy,
    shutdown: &watch::Receiver<bool>,
) -> Result<i64> {
    let mut total = 0;
    for (status, keep) in policy.rules() {
        loop {
            let mut conn = pool.get().await?;
            let n = prune_batch(&mut conn, status, keep, BATCH).await?;
            drop(conn);
            total += n;
            if n < i64::from(BATCH) || *shutdown.borrow() {
                break;
            }
            // Let other work in between batches.
            tokio::task::yield_now().await;
        }
    }
    Ok(total)
}

/// Runs the policy every `interval` until shutdown.
pub async fn run(
    pool: PgPool,
    policy: Policy,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    if policy.is_empty() {
        return;
    }
    loop {
        match prune(&pool, &policy, &shutdown).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "retention: deleted finished jobs"),
            Err(e) => tracing::warn!(error = %e, "retention: pruning failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}
