//! Retention of finished jobs: a background task deletes, per terminal status, the jobs that
//! finished longer ago than the configured age, in batches of one short statement each
//! (`jobs_prune_finished`, migration 2026-11-25-000006), so no lock is held for long and
//! concurrent writers are skipped rather than waited for. Every replica may run it.
use std::time::Duration;

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

/// Applies the policy once, batch after batch until nothing is left; returns the total.
pub async fn prune(
    pool: &PgPool,
    policy: &Policy,
    shutdown: &watch::Receiver<bool>,
) -> Result<i64> {
    let mut total = 0;
    for (status, keep) in policy.rules() {
        total += crate::db::maintenance::repeat_batches(
            pool,
            "SELECT jobs_prune_finished($3::job_status, $1, $2) AS n",
            Some(status),
            keep,
            BATCH,
            shutdown,
        )
        .await?;
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
