//! The gRPC health service follows the database and the keys: SERVING while the database
//! answers and the signing keys are loaded (a JWK set URL fetched once), NOT_SERVING otherwise
//! and once shutdown starts. The same loop samples the pool's gauges.
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use super::service::JobSvc;
use crate::db::PgPool;
use crate::db::health::DbHealth;
use crate::metrics::Metrics;
use crate::pb::job_service_server::JobServiceServer;

/// Pool gauges are sampled this often (health follows the database monitor at once).
const POOL_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// SERVING while the database answers (as the health monitor last saw it) and the keys are
/// loaded, NOT_SERVING otherwise and once shutdown starts, for "" and jobs.v1.JobService.
/// Also samples the pool.
pub(super) async fn monitor_health(
    reporter: HealthReporter,
    pool: PgPool,
    mut db_health: DbHealth,
    mut keys_ready: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last: Option<ServingStatus> = None;
    loop {
        let s = pool.status();
        metrics.pool_connections.set(s.size as i64);
        metrics.pool_idle.set(s.available as i64);
        metrics.pool_max.set(s.max_size as i64);
        metrics.pool_waiting.set(s.waiting as i64);
        let up = db_health.is_up();
        metrics.database_up.set(i64::from(up));
        let status = match up && *keys_ready.borrow_and_update() && !*shutdown.borrow() {
            true => ServingStatus::Serving,
            false => ServingStatus::NotServing,
        };
        if last != Some(status) {
            reporter.set_service_status("", status).await;
            reporter
                .set_service_status(
                    <JobServiceServer<JobSvc> as tonic::server::NamedService>::NAME,
                    status,
                )
                .await;
            last = Some(status);
        }
        if *shutdown.borrow() {
            // Reported NOT_SERVING above; nothing more to watch.
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(POOL_SAMPLE_INTERVAL) => {}
            _ = db_health.changed() => {}
            Ok(()) = keys_ready.changed() => {}
            _ = shutdown.changed() => {}
        }
    }
}
