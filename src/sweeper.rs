//! The long-running-job sweeper: RUNNING jobs that started longer ago than `--running-timeout`
//! are moved to FAILED with an error message saying why, in batches of one compare-and-set
//! statement each (`jobs_fail_stale_running`, migration 2026-11-25-000007), so a job that
//! completed meanwhile is never overwritten. Off unless the timeout is set; every replica may
//! run it.
use std::sync::Arc;
use std::time::Duration;

use diesel::sql_types::{BigInt, Integer, Interval};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use tokio::sync::watch;

use crate::db::PgPool;
use crate::error::Result;
use crate::feed::Feed;

const BATCH: i32 = 500;

#[derive(diesel::QueryableByName)]
struct Failed {
    #[diesel(sql_type = BigInt)]
    failed: i64,
}

/// One batch; returns how many jobs it failed.
pub async fn sweep_batch(
    conn: &mut AsyncPgConnection,
    timeout: Duration,
    max_rows: i32,
) -> Result<i64> {
    let us = i64::try_from(timeout.as_micros()).unwrap_or(i64::MAX);
    let row: Failed = diesel::sql_query("SELECT jobs_fail_stale_running($1, $2) AS failed")
        .bind::<Interval, _>(diesel::pg::data_types::PgInterval::from_microseconds(us))
        .bind::<Integer, _>(max_rows)
        .get_result(conn)
        .await?;
    Ok(row.failed)
}

/// Sweeps every `interval` until shutdown.
pub async fn run(
    pool: PgPool,
    feed: Arc<Feed>,
    timeout: Option<Duration>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(timeout) = timeout else { return };
    loop {
        let result: Result<i64> = async {
            let mut total = 0;
            loop {
                let mut conn = pool.get().await?;
                let n = sweep_batch(&mut conn, timeout, BATCH).await?;
                total += n;
                if n < i64::from(BATCH) || *shutdown.borrow() {
                    return Ok(total);
                }
            }
        }
        .await;
        match result {
            Ok(0) => {}
            Ok(n) => {
                // Streams and waiters learn at once.
                feed.committed();
                tracing::warn!(
                    jobs = n,
                    ?timeout,
                    "sweeper: failed jobs running past the timeout"
                );
            }
            Err(e) => tracing::warn!(error = %e, "sweeper: sweep failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}
