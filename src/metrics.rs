//! Prometheus metrics: one registry per server (no process-global recorder, so several
//! servers in one process, as in the tests, each count only their own traffic). The endpoint
//! that serves them is `crate::app::metrics_http`.
//!
//! May import: nothing of ours.
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub method: &'static str,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabels {
    /// `accepted` or `refused`.
    pub outcome: &'static str,
    /// The refusal's ErrorInfo reason (`TOKEN_EXPIRED`, `TOKEN_INVALID`,
    /// `TOKEN_WRONG_AUDIENCE`, ...); empty when accepted.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JwksLabels {
    /// `ok` or `failed`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExpiryLabels {
    /// `retried` or `failed`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: String,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Every metric jobsvc exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<MethodLabels, Counter>,
    pub responses: Family<CodeLabels, Counter>,
    pub latency: Family<MethodLabels, Histogram, fn() -> Histogram>,
    pub open_streams: Gauge,
    pub feed_delay: Histogram,
    pub feed_lag_seconds: Gauge<f64, AtomicU64>,
    pub feed_subscribers: Gauge,
    pub pool_connections: Gauge,
    pub pool_idle: Gauge,
    pub pool_max: Gauge,
    pub pool_waiting: Gauge,
    pub jobs: Family<StatusLabels, Gauge>,
    pub slow_queries: Counter,
    pub auth: Family<AuthLabels, Counter>,
    pub jwks_fetches: Family<JwksLabels, Counter>,
    pub jwks_keys: Gauge,
    pub database_up: Gauge,
    pub create_batch_rows: Histogram,
    pub update_batch_rows: Histogram,
    pub heartbeat_batch_rows: Histogram,
    pub claims: Counter,
    pub jobs_claimed: Counter,
    pub claim_latency: Histogram,
    pub lease_expiries: Family<ExpiryLabels, Counter>,
    pub retries: Counter,
    pub releases: Counter,
    /// Synced from the log writer's own count ([`Metrics::count_dropped_log_lines`]) at each
    /// scrape.
    log_lines_dropped: Counter,
    log_writer: OnceLock<Arc<AtomicU64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("jobsvc");
        let requests = Family::<MethodLabels, Counter>::default();
        registry.register(
            "rpc_requests",
            "JobService calls started, by method",
            requests.clone(),
        );
        let responses = Family::<CodeLabels, Counter>::default();
        registry.register(
            "rpc_responses",
            "JobService calls answered, by method and gRPC code (OK included)",
            responses.clone(),
        );
        let latency = Family::<MethodLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "rpc_duration_seconds",
            "Time from a call's arrival to its answer (for streams: to the stream's start)",
            latency.clone(),
        );
        let open_streams = Gauge::default();
        registry.register(
            "open_streams",
            "StreamJobUpdates streams open now",
            open_streams.clone(),
        );
        let feed_delay = latency_histogram();
        registry.register(
            "feed_delay_seconds",
            "From a change's statement start (updated_at) to its dispatch by this process's feed",
            feed_delay.clone(),
        );
        let feed_lag_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "feed_lag_seconds",
            "Delay of the last change the feed dispatched (0 when nothing waits)",
            feed_lag_seconds.clone(),
        );
        let feed_subscribers = Gauge::default();
        registry.register(
            "feed_subscribers",
            "Streams and waiters subscribed to the change feed now",
            feed_subscribers.clone(),
        );
        let pool_connections = Gauge::default();
        registry.register(
            "pool_connections",
            "Database connections open in the pool",
            pool_connections.clone(),
        );
        let pool_idle = Gauge::default();
        registry.register(
            "pool_idle_connections",
            "Pool connections not in use",
            pool_idle.clone(),
        );
        let pool_max = Gauge::default();
        registry.register(
            "pool_max_connections",
            "Largest pool size",
            pool_max.clone(),
        );
        let pool_waiting = Gauge::default();
        registry.register(
            "pool_waiting_calls",
            "Calls waiting for a pool connection",
            pool_waiting.clone(),
        );
        let jobs = Family::<StatusLabels, Gauge>::default();
        registry.register(
            "jobs",
            "Jobs by status (all users), from the stats rollup",
            jobs.clone(),
        );
        let slow_queries = Counter::default();
        registry.register(
            "slow_database_calls",
            "Database calls slower than the slow-query threshold",
            slow_queries.clone(),
        );
        let auth = Family::<AuthLabels, Counter>::default();
        registry.register(
            "auth_checks",
            "Calls' tokens checked, by outcome and the refusal's reason",
            auth.clone(),
        );
        let jwks_fetches = Family::<JwksLabels, Counter>::default();
        registry.register(
            "jwks_fetches",
            "Loads of the JWK set (fetches of --jwks-url, reads of --jwks-file), by outcome",
            jwks_fetches.clone(),
        );
        let jwks_keys = Gauge::default();
        registry.register(
            "jwks_keys",
            "Usable keys in the JWK set now in use",
            jwks_keys.clone(),
        );
        let database_up = Gauge::default();
        registry.register(
            "database_up",
            "1 while the database answers the health monitor's pings, else 0 (calls fail fast)",
            database_up.clone(),
        );
        let create_batch_rows = Histogram::new([1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]);
        registry.register(
            "create_batch_rows",
            "CreateJob requests written per statement (natural batching)",
            create_batch_rows.clone(),
        );
        let update_batch_rows = Histogram::new([1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]);
        registry.register(
            "update_batch_rows",
            "UpdateStatus and CancelJob moves written per statement (natural batching)",
            update_batch_rows.clone(),
        );
        let heartbeat_batch_rows = Histogram::new([1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]);
        registry.register(
            "heartbeat_batch_rows",
            "Heartbeats written per statement (natural batching)",
            heartbeat_batch_rows.clone(),
        );
        let claims = Counter::default();
        registry.register(
            "claims",
            "ClaimJobs statements run (a waiting call may run several)",
            claims.clone(),
        );
        let jobs_claimed = Counter::default();
        registry.register(
            "jobs_claimed",
            "Jobs taken by ClaimJobs",
            jobs_claimed.clone(),
        );
        let claim_latency = Histogram::new(exponential_buckets(0.0005, 2.0, 20));
        registry.register(
            "claim_latency_seconds",
            "From a job becoming ready (created, or its run_after) to its claim",
            claim_latency.clone(),
        );
        let lease_expiries = Family::<ExpiryLabels, Counter>::default();
        registry.register(
            "lease_expiries",
            "Leases that ended without a heartbeat, by what became of the job",
            lease_expiries.clone(),
        );
        let retries = Counter::default();
        registry.register(
            "retries",
            "Failed attempts sent back to pending with a backoff (by a worker or an expired lease)",
            retries.clone(),
        );
        let releases = Counter::default();
        registry.register(
            "releases",
            "Claims handed back by their worker (UpdateStatus PENDING with the lease)",
            releases.clone(),
        );
        let log_lines_dropped = Counter::default();
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because the log reader fell behind (the writer's buffer was full)",
            log_lines_dropped.clone(),
        );
        Metrics {
            log_lines_dropped,
            log_writer: OnceLock::new(),
            registry,
            requests,
            responses,
            latency,
            open_streams,
            feed_delay,
            feed_lag_seconds,
            feed_subscribers,
            pool_connections,
            pool_idle,
            pool_max,
            pool_waiting,
            jobs,
            slow_queries,
            auth,
            jwks_fetches,
            jwks_keys,
            database_up,
            create_batch_rows,
            update_batch_rows,
            heartbeat_batch_rows,
            claims,
            jobs_claimed,
            claim_latency,
            lease_expiries,
            retries,
            releases,
        }
    }

    /// A call started.
    pub fn call_started(&self, method: &'static str) {
        self.requests.get_or_create(&MethodLabels { method }).inc();
    }

    /// A call answered with `code` after `elapsed`.
    pub fn call_finished(&self, method: &'static str, code: tonic::Code, elapsed: Duration) {
        self.responses
            .get_or_create(&CodeLabels {
                method,
                code: format!("{code:?}"),
            })
            .inc();
        self.latency
            .get_or_create(&MethodLabels { method })
            .observe(elapsed.as_secs_f64());
    }

    /// Sets the five status gauges (all of them, zeros included).
    pub fn set_jobs(&self, by_status: [(&str, i64); 5]) {
        for (status, n) in by_status {
            self.jobs
                .get_or_create(&StatusLabels {
                    status: status.into(),
                })
                .set(n);
        }
    }

    /// Reports the lines that the log writer `serve` set up dropped (its handle's count).
    pub fn count_dropped_log_lines(&self, writer: Arc<AtomicU64>) {
        let _ = self.log_writer.set(writer);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        if let Some(dropped) = self.log_writer.get() {
            self.log_lines_dropped.inner().store(
                dropped.load(std::sync::atomic::Ordering::Relaxed),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Keeps a gauge raised while alive (an open stream), so it always returns to zero.
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
