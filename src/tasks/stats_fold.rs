//! The stats rollup kept compact: its per-writer rows are merged every few seconds. Every
//! replica may run it (concurrent folds skip each other). Also refreshes the jobs-by-status
//! gauges from the rollup.
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::db::{self, PgPool};
use crate::metrics::Metrics;

/// How often the stats rollup's per-writer rows are merged (a few hundred rows at most
/// accumulate in between; reads stay exact either way).
const FOLD_INTERVAL: Duration = Duration::from_secs(5);

/// Keeps the stats rollup compact. Every replica may run it: concurrent folds skip each other.
/// Also refreshes the jobs-by-status gauges from the rollup.
pub async fn run(pool: PgPool, metrics: Arc<Metrics>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(FOLD_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
        let result = async {
            let mut conn = pool.get().await?;
            db::stats::fold(&mut conn).await?;
            let (c, _) = db::stats::get(&conn, None, None).await?;
            metrics.set_jobs([
                ("pending", c.pending),
                ("running", c.running),
                ("completed", c.completed),
                ("failed", c.failed),
                ("cancelled", c.cancelled),
            ]);
            Ok::<_, crate::error::Error>(())
        }
        .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "stats fold skipped");
        }
    }
}
