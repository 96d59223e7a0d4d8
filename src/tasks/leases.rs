//! The lease sweeper: a leased RUNNING job whose lease expired without a heartbeat goes back
//! to PENDING with a backoff (attempts left) or to FAILED with an error message saying the
//! lease expired on attempt N of M. Each batch is one compare-and-set statement
//! (`jobs_expire_leases`, migration 2026-12-06-000011) that skips rows another transaction
//! holds and re-checks the lease on the row as it is, so a heartbeat, completion or cancel
//! that won the race is never overridden. Every replica runs it; SKIP LOCKED keeps them apart.
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::db::PgPool;
use crate::domain::RetryPolicy;
use crate::feed::Feed;
use crate::metrics::{ExpiryLabels, Metrics};

const BATCH: i32 = 500;

/// Sweeps every `interval` until shutdown.
pub async fn run(
    pool: PgPool,
    feed: Arc<Feed>,
    metrics: Arc<Metrics>,
    retry: RetryPolicy,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        loop {
            let batch = async {
                let conn = pool.get().await?;
                crate::db::work::expire_leases(&conn, retry, BATCH).await
            }
            .await;
            match batch {
                Ok((0, 0)) => break,
                Ok((retried, failed)) => {
                    // Waiting claims, streams and waiters learn at once.
                    feed.committed();
                    let count = |outcome, n: i64| {
                        metrics
                            .lease_expiries
                            .get_or_create(&ExpiryLabels { outcome })
                            .inc_by(n as u64)
                    };
                    count("retried", retried);
                    count("failed", failed);
                    metrics.retries.inc_by(retried as u64);
                    tracing::info!(retried, failed, "leases expired without a heartbeat");
                    if retried + failed < i64::from(BATCH) || *shutdown.borrow() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease sweep failed");
                    break;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}
