//! `jobsvc serve`: the private PostgreSQL or `DATABASE_URL`, migrations, and every part of the
//! service started and wired together until shutdown.
use std::io::Write;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use super::config::ServeArgs;
use super::embedded_pg::{EmbeddedPg, PgOptions};
use super::{AppError, EMBEDDED_DB, metrics_http, secret, telemetry};
use crate::api::admission::Admission;
use crate::api::auth::api_keys::ApiKeys;
use crate::api::auth::jwks::{Jwks, JwksConfig, JwksSource};
use crate::api::auth::{self, Authenticator, ClaimsPolicy};
use crate::api::fault::LostResponses;
use crate::api::server::{self, Limits};
use crate::api::state::AppState;
use crate::api::tokens::TokenKey;
use crate::db;
use crate::db::batch::{Beats, Creates, Updates};
use crate::db::health::DbHealth;
use crate::domain::RetryPolicy;
use crate::feed::follow;
use crate::feed::limits::{CallerLimits, Limit};
use crate::feed::{Feed, FeedConfig};
use crate::metrics::Metrics;
use crate::tasks;

/// `jobsvc serve`: database, migrations, server, until SIGINT or SIGTERM.
pub async fn serve(args: ServeArgs) -> Result<(), AppError> {
    let log_writer = telemetry::init_tracing(args.log_format);
    let mut embedded = None;
    let (database_url, secret) = match &args.database_url {
        Some(url) => {
            if args.secret.jwt_secret.is_none() && args.secret.jwt_secret_file.is_none() {
                return Err(
                    "JWT_SECRET (or --jwt-secret-file) is required with DATABASE_URL \
                            (replicas must share it)"
                        .into(),
                );
            }
            (url.clone(), secret::secret(&args.secret, false)?)
        }
        None => {
            // The secret first: a bad one stops the start before anything runs.
            let secret = secret::secret(&args.secret, true)?;
            let pg = EmbeddedPg::init(&args.secret.data_dir, PgOptions::default())?;
            pg.start().await?;
            let url = pg.service_url(EMBEDDED_DB).await?;
            tracing::info!(socket_dir = %pg.socket_dir().display(), "private PostgreSQL running");
            embedded = Some(pg);
            (url, secret)
        }
    };

    let result = async {
        db::migrate(&database_url).await?;
        let listener = TcpListener::bind(args.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
        if embedded.is_some() {
            print_banner(listener.local_addr()?, &secret);
        }
        let metrics = Arc::new(Metrics::new());
        metrics.count_dropped_log_lines(log_writer.dropped.clone());
        start(
            &args,
            &database_url,
            &secret,
            listener,
            shutdown_signal(),
            metrics,
        )
        .await
    }
    .await;
    if let Some(pg) = embedded {
        pg.stop().await;
        tracing::info!("private PostgreSQL stopped");
    }
    result
}

/// Serves an already-migrated database on `listener` until `shutdown` resolves.
pub async fn run_server(
    args: &ServeArgs,
    database_url: &str,
    secret: &[u8],
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    let metrics = Arc::new(Metrics::new());
    start(args, database_url, secret, listener, shutdown, metrics).await
}

/// [`run_server`], reporting to `metrics`: the pool, the feed, the writers, the background
/// tasks and the server, wired together.
/// What a page leaves under the message limit for the response's own framing.
const PAGE_HEADROOM: usize = 64 << 10;
/// What a job leaves under the message limit: its other fields (an agent name of up to 1 KB,
/// ids, times) and the page's framing.
const JOB_HEADROOM: usize = 256 << 10;

/// The most read lanes the default gives (one per two cores): a lane serves tens of thousands
/// of reads a second, and each holds a database connection.
const MAX_DEFAULT_LANES: usize = 8;

async fn start(
    args: &ServeArgs,
    database_url: &str,
    secret: &[u8],
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    metrics: Arc<Metrics>,
) -> Result<(), AppError> {
    if args.job_limits.max_job_bytes + JOB_HEADROOM > args.max_message_bytes {
        return Err(format!(
            "--max-job-bytes ({}) must leave {JOB_HEADROOM} bytes under --max-message-bytes ({}): \
             a job must always fit in a response",
            args.job_limits.max_job_bytes, args.max_message_bytes
        )
        .into());
    }
    let pool = db::pool(database_url, args.pool_size)?
        .watch_slow_calls(args.slow_query_threshold, metrics.slow_queries.clone());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let previous = secret::previous_secrets(&args.secret)?;
    let tokens = TokenKey::derive(secret).with_previous(&previous);
    if let Some(addr) = args.metrics_listen {
        let listener = metrics_http::bind(addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "metrics listening");
        tokio::spawn(metrics_http::serve(
            listener,
            metrics.clone(),
            shutdown_rx.clone(),
        ));
    }
    let feed = Feed::start(
        database_url.to_owned(),
        FeedConfig {
            poll_interval: args.feed_poll_interval,
            queue_events: args.stream_queue_events,
        },
        metrics.clone(),
        shutdown_rx.clone(),
    )
    .await?;
    let user_reads = db::user_read_pool(database_url, args.user_read_pool_size as usize)?
        .watch_slow_calls(args.slow_query_threshold, metrics.slow_queries.clone());
    let lanes = args.read_lanes.map_or_else(
        || {
            std::thread::available_parallelism()
                .map_or(1, |cores| cores.get() / 2)
                .clamp(1, MAX_DEFAULT_LANES)
        },
        |n| n as usize,
    );
    let lanes = Arc::new(db::Lanes::new(database_url, lanes)?);
    let db_health = DbHealth::start(
        database_url.to_owned(),
        vec![pool.clone(), user_reads.clone()],
        lanes.clone(),
        shutdown_rx.clone(),
    );
    let mut authenticator = Authenticator::new(secret, args.jwt_leeway)
        .with_previous(&previous)
        .with_policy(ClaimsPolicy {
            audiences: args.jwt_audiences.clone(),
            issuers: args.jwt_issuers.clone(),
            refuse_anonymous: args.refuse_anonymous,
        })
        .with_verified_capacity(args.verified_token_cache);
    let jwks_source = match (&args.jwks_url, &args.jwks_file) {
        (Some(url), _) => Some(JwksSource::Url(url.clone())),
        (None, Some(path)) => Some(JwksSource::File(path.clone())),
        (None, None) => None,
    };
    if let Some(source) = jwks_source {
        let config = JwksConfig {
            source,
            refetch_interval: args.jwks_refetch_interval,
        };
        authenticator =
            authenticator.with_jwks(Jwks::start(config, metrics.clone(), shutdown_rx.clone())?);
    }
    if let Some(path) = &args.api_key_file {
        authenticator =
            authenticator.with_api_keys(ApiKeys::start(path.clone(), shutdown_rx.clone())?);
    }
    let retry = RetryPolicy {
        initial_us: micros(args.retry_initial_backoff),
        multiplier: args.retry_backoff_multiplier,
        max_us: micros(args.retry_max_backoff),
    };
    let state = Arc::new(AppState {
        pool: pool.clone(),
        user_reads,
        lanes,
        database_url: database_url.into(),
        auth: authenticator,
        limits: args.job_limits.limits(),
        max_page_bytes: args.max_message_bytes.saturating_sub(PAGE_HEADROOM),
        tokens,
        feed,
        stream_heartbeat: args.stream_heartbeat,
        metrics: metrics.clone(),
        snapshot_slots: Arc::new(tokio::sync::Semaphore::new(follow::SNAPSHOT_CONNECTIONS)),
        catch_up_slots: Arc::new(tokio::sync::Semaphore::new(follow::CATCH_UP_CONCURRENCY)),
        caller_limits: CallerLimits {
            streams: Limit::new(
                "open streams",
                "--max-streams-per-user",
                args.max_streams_per_user as usize,
                args.max_streams as usize,
            ),
            waits: Limit::new(
                "waiting WaitJob calls",
                "--max-waits-per-user",
                args.max_waits_per_user as usize,
                args.max_waits as usize,
            ),
            snapshots: Limit::new(
                "streams reading their existing jobs",
                "--max-snapshots-per-user",
                args.max_snapshots_per_user as usize,
                // In all, the snapshot connections bound them (a stream waits for one).
                args.max_streams as usize,
            ),
        },
        creates: Creates::start(
            pool.clone(),
            batch_workers(args.create_batch_workers, args.pool_size),
            db_health.clone(),
            metrics.clone(),
        ),
        updates: Updates::start(
            pool.clone(),
            batch_workers(args.update_batch_workers, args.pool_size),
            db_health.clone(),
            metrics.clone(),
            retry,
        ),
        claim_wakes: Default::default(),
        beats: Beats::start(
            pool.clone(),
            batch_workers(args.update_batch_workers, args.pool_size),
            db_health.clone(),
            metrics.clone(),
        ),
        db_health,
        admission: Admission::new(
            args.max_concurrent_calls as usize,
            args.max_queued_calls as usize,
            args.queue_timeout,
        ),
        lost_responses: LostResponses::every(args.fault_drop_every),
        shutdown: shutdown_rx,
    });
    tokio::spawn(tasks::sweeper::run(
        state.pool.clone(),
        state.feed.clone(),
        args.running_timeout,
        args.sweep_interval,
        state.shutdown.clone(),
    ));
    tokio::spawn(tasks::leases::run(
        state.pool.clone(),
        state.feed.clone(),
        state.metrics.clone(),
        retry,
        args.lease_sweep_interval,
        state.shutdown.clone(),
    ));
    tokio::spawn(tasks::retention::run(
        state.pool.clone(),
        tasks::retention::Policy {
            completed: args.retain_completed,
            failed: args.retain_failed,
            cancelled: args.retain_cancelled,
        },
        args.retention_interval,
        state.shutdown.clone(),
    ));
    tokio::spawn(tasks::history_prune::run(
        state.pool.clone(),
        args.event_retention,
        state.shutdown.clone(),
    ));
    tokio::spawn(tasks::stats_fold::run(
        state.pool.clone(),
        state.metrics.clone(),
        state.shutdown.clone(),
    ));
    tracing::info!(addr = %listener.local_addr()?, "jobsvc listening");
    let cors_origins = args
        .cors_allow_origins
        .iter()
        .map(|o| {
            http::HeaderValue::from_str(o.trim_end_matches('/'))
                .map_err(|_| format!("--cors-allow-origin {o:?} is not a valid origin"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let limits = Limits {
        cors_origins,
        ui: !args.no_ui,
        max_message_bytes: args.max_message_bytes,
        max_concurrent_streams: args.max_concurrent_streams,
        keepalive_interval: args.keepalive_interval,
        keepalive_timeout: args.keepalive_timeout,
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(tonic::transport::Identity::from_pem(
                std::fs::read(cert).map_err(|e| format!("reading {}: {e}", cert.display()))?,
                std::fs::read(key).map_err(|e| format!("reading {}: {e}", key.display()))?,
            )),
            _ => None,
        },
    };
    server::run(listener, state, shutdown_tx, limits, shutdown).await?;
    tracing::info!("jobsvc stopped");
    Ok(())
}

/// A ready token and grpcurl line on stdout (never in the log) for the embedded quick start.
fn print_banner(addr: std::net::SocketAddr, secret: &[u8]) {
    let token = auth::issue(
        secret,
        "service_role",
        None,
        std::time::Duration::from_secs(24 * 3600),
    );
    let banner = format!(
        "\njobsvc is serving on {addr} with a private PostgreSQL.\n\
         A service_role token valid for 24h (make more with `jobsvc token --role service_role`):\n\n\
         export TOKEN={token}\n\n\
         Try:\n  grpcurl -plaintext -H \"authorization: Bearer $TOKEN\" -d '{{\"agent_identifier\":\"demo\"}}' {addr} jobs.v1.JobService/CreateJob\n\n"
    );
    // Best effort: a closed stdout (a pipe whose reader left) must not stop the server.
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(banner.as_bytes()).and_then(|_| out.flush());
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn micros(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Batch workers of one kind: as configured, or by default a quarter of the pool.
fn batch_workers(configured: usize, pool_size: usize) -> usize {
    match configured {
        0 => (pool_size / 4).max(1),
        n => n,
    }
}
