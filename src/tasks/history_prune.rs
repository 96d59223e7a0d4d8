//! Pruning of the change history: events older than the retention window (`--event-retention`)
//! are deleted in batches (`job_events_prune`, migration 2026-11-25-000005). Resume tokens older
//! than what is kept are answered OUT_OF_RANGE.
use std::time::Duration;

use tokio::sync::watch;

use crate::db::{self, PgPool};

/// The first prune runs this long after start, then every `PRUNE_INTERVAL`.
const PRUNE_FIRST: Duration = Duration::from_secs(60);
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);
const PRUNE_BATCH: i32 = 10_000;

/// Deletes history older than the retention window, in batches.
pub async fn run(pool: PgPool, retention: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut delay = PRUNE_FIRST;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
        delay = PRUNE_INTERVAL;
        let result = db::maintenance::repeat_batches(
            &pool,
            "SELECT job_events_prune($1, $2) AS n",
            None,
            retention,
            PRUNE_BATCH,
            &shutdown,
        )
        .await;
        match result {
            Ok(0) => {}
            Ok(n) => tracing::info!(events = n, "change feed: pruned history"),
            Err(e) => tracing::warn!(error = %e, "change feed: pruning failed"),
        }
    }
}
