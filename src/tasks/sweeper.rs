//! The long-running-job sweeper: RUNNING jobs that started longer ago than `--running-timeout`
//! are moved to FAILED with an error message saying why, in batches of one compare-and-set
//! statement each (`jobs_fail_stale_running`, migration 2026-11-25-000007), so a job that
//! completed meanwhile is never overwritten. Off unless the timeout is set; every replica may
//! run it.
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::db::PgPool;
use crate::feed::Feed;

const BATCH: i32 = 500;

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
        let result = crate::db::maintenance::repeat_batches(
            &pool,
            "SELECT jobs_fail_stale_running($1, $2) AS n",
            None,
            timeout,
            BATCH,
            &shutdown,
        )
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
