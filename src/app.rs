//! Wiring for the binary: config to a running server, and the `token` command.
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::{self, Authenticator};
use crate::config::{LogFormat, SecretArgs, ServeArgs, TokenArgs, TokenRole};
use crate::convert::JsonLimits;
use crate::embedded_pg::{EmbeddedPg, PgOptions};
use crate::service::AppState;
use crate::{db, server};

pub type AppError = Box<dyn std::error::Error + Send + Sync>;

const SECRET_FILE: &str = "jwt_secret";
const EMBEDDED_DB: &str = "jobsvc";

/// Lines the log writer holds for a reader that has fallen behind: about 4 s of calls at
/// 4,000 calls/s. The buffer is allocated up front (32 bytes a line), so the crate's default
/// of 128,000 lines added 4 MB to the idle server.
const LOG_BUFFER_LINES: usize = 16_384;

/// Logs to stderr through a writer thread (tracing-appender's non-blocking writer): a call
/// never waits on a slow or stalled log reader, which would hold up a runtime worker and every
/// call on it. If the reader falls [`LOG_BUFFER_LINES`] behind, new lines are dropped rather
/// than calls held up, and counted (`jobsvc_log_lines_dropped_total`). Colours only when
/// stderr is a terminal. Keep the guard until exit: dropping it flushes what is buffered
/// (waiting for the writer up to about a second).
pub fn init_tracing(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .finish(std::io::stderr());
    let _ = crate::metrics::LOG_LINES_DROPPED.set(writer.error_counter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    guard
}

/// The secret from config, else the one kept in the data directory (made on first use).
fn secret(args: &SecretArgs, create: bool) -> Result<Vec<u8>, AppError> {
    if let Some(s) = &args.jwt_secret {
        if s.len() < 32 {
            return Err("JWT_SECRET must be at least 32 characters".into());
        }
        return Ok(s.as_bytes().to_vec());
    }
    let path = args.data_dir.join(SECRET_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(s.trim().as_bytes().to_vec()),
        Err(_) if create => {
            std::fs::create_dir_all(&args.data_dir)?;
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for a secret: {e}"))?;
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            write_private(&path, &hex)?;
            Ok(hex.into_bytes())
        }
        Err(_) => Err(format!(
            "no JWT_SECRET set and no {} yet (start `jobsvc serve` once, or set JWT_SECRET)",
            path.display()
        )
        .into()),
    }
}

fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(content.as_bytes())
}

/// `jobsvc token`: prints a signed token.
pub fn print_token(args: TokenArgs) -> Result<(), AppError> {
    let secret = secret(&args.secret, false)?;
    let token = match args.role {
        TokenRole::ServiceRole => auth::issue(&secret, "service_role", args.sub, args.ttl),
        TokenRole::Authenticated => {
            let sub = args.sub.ok_or("--role authenticated needs --sub UUID")?;
            auth::issue(&secret, "authenticated", Some(sub), args.ttl)
        }
    };
    println!("{token}");
    Ok(())
}

/// The database of `export` / `import`: DATABASE_URL, or the private PostgreSQL of the data
/// directory (reached on its socket while `serve` runs, else started for the command and
/// returned so the caller stops it).
async fn command_database(
    db_args: &crate::config::DbArgs,
    create: bool,
) -> Result<(String, Option<EmbeddedPg>), AppError> {
    if let Some(url) = &db_args.database_url {
        return Ok((url.clone(), None));
    }
    // A backup run from the wrong directory must fail, not back up a new empty database.
    if !create && !db_args.data_dir.join("pg/data/PG_VERSION").exists() {
        return Err(format!(
            "no private PostgreSQL in {}: pass --data-dir (where `jobsvc serve` keeps it) or --database-url",
            db_args.data_dir.display()
        )
        .into());
    }
    let pg = EmbeddedPg::init(&db_args.data_dir, PgOptions::default())?;
    let url = pg.url(EMBEDDED_DB);
    if db::connect(&url).await.is_ok() {
        return Ok((url, None));
    }
    pg.start().await?;
    pg.ensure_database(EMBEDDED_DB).await?;
    Ok((url, Some(pg)))
}

/// `jobsvc export`.
pub async fn export(args: crate::config::ExportArgs) -> Result<(), AppError> {
    let filter = crate::transfer::ExportFilter {
        statuses: args
            .statuses
            .iter()
            .map(|s| {
                crate::domain::JobStatus::parse(s).ok_or_else(|| {
                    format!(
                        "unknown status {s:?}: pending, running, completed, failed or cancelled"
                    )
                })
            })
            .collect::<Result<_, _>>()?,
        agent_identifier: args.agent.clone(),
        user: args.user,
        created_after: args.created_after,
        created_before: args.created_before,
        after_id: args.after_id,
    };
    let (url, pg) = command_database(&args.db, false).await?;
    let result = async {
        // No migrations here: a backup changes nothing, and may run as a read-only role.
        let mut conn = db::connect(&url).await?;
        let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout());
        let n = crate::transfer::export(&mut conn, &filter, &mut out).await?;
        eprintln!("exported {n} jobs");
        Ok::<_, AppError>(())
    }
    .await;
    if let Some(pg) = pg {
        pg.stop().await;
    }
    result
}

/// `jobsvc import`.
pub async fn import(args: crate::config::ImportArgs) -> Result<(), AppError> {
    let (url, pg) = command_database(&args.db, true).await?;
    let result = async {
        db::migrate(&url).await?;
        let mut conn = db::connect(&url).await?;
        let input = tokio::io::BufReader::new(tokio::io::stdin());
        let done = crate::transfer::import(&mut conn, input, args.batch_size.into()).await?;
        eprintln!(
            "read {} jobs: {} inserted, {} already there",
            done.read, done.inserted, done.skipped
        );
        Ok::<_, AppError>(())
    }
    .await;
    if let Some(pg) = pg {
        pg.stop().await;
    }
    result
}

/// `jobsvc serve`: database, migrations, server, until SIGINT or SIGTERM.
pub async fn serve(args: ServeArgs) -> Result<(), AppError> {
    let _log_writer = init_tracing(args.log_format);
    let mut embedded = None;
    let (database_url, secret) = match &args.database_url {
        Some(url) => {
            if args.secret.jwt_secret.is_none() {
                return Err(
                    "JWT_SECRET is required with DATABASE_URL (replicas must share it)".into(),
                );
            }
            (url.clone(), secret(&args.secret, false)?)
        }
        None => {
            let pg = EmbeddedPg::init(&args.secret.data_dir, PgOptions::default())?;
            pg.start().await?;
            pg.ensure_database(EMBEDDED_DB).await?;
            tracing::info!(socket_dir = %pg.socket_dir().display(), "private PostgreSQL running");
            let url = pg.url(EMBEDDED_DB);
            embedded = Some(pg);
            (url, secret(&args.secret, true)?)
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
        run_server(&args, &database_url, &secret, listener, shutdown_signal()).await
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
    let pool = db::pool(database_url, args.pool_size)?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let tokens = crate::tokens::TokenKey::derive(secret);
    let metrics = Arc::new(crate::metrics::Metrics::new());
    db::set_slow_threshold(args.slow_query_threshold, metrics.clone());
    if let Some(addr) = args.metrics_listen {
        let listener = crate::metrics::bind(addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "metrics listening");
        tokio::spawn(crate::metrics::serve(
            listener,
            metrics.clone(),
            shutdown_rx.clone(),
        ));
    }
    let feed = crate::feed::Feed::start(
        pool.clone(),
        database_url.to_owned(),
        tokens.clone(),
        crate::feed::FeedConfig {
            poll_interval: args.feed_poll_interval,
            retention: args.event_retention,
            queue_events: args.stream_queue_events,
        },
        metrics.clone(),
        shutdown_rx.clone(),
    )
    .await?;
    let db_health =
        db::health::DbHealth::start(database_url.to_owned(), pool.clone(), shutdown_rx.clone());
    let state = Arc::new(AppState {
        pool: pool.clone(),
        database_url: database_url.into(),
        auth: Authenticator::new(secret, args.jwt_leeway),
        limits: JsonLimits {
            max_bytes: args.max_job_data_bytes,
            max_depth: args.max_job_data_depth,
        },
        tokens,
        feed,
        stream_heartbeat: args.stream_heartbeat,
        metrics: metrics.clone(),
        snapshot_slots: Arc::new(tokio::sync::Semaphore::new(
            crate::stream::SNAPSHOT_CONNECTIONS,
        )),
        creates: crate::batch::Creates::start(
            pool.clone(),
            batch_workers(args.create_batch_workers, args.pool_size),
            db_health.clone(),
            metrics.clone(),
        ),
        updates: crate::batch::Updates::start(
            pool.clone(),
            batch_workers(args.update_batch_workers, args.pool_size),
            db_health.clone(),
            metrics.clone(),
        ),
        db_health,
        admission: crate::admission::Admission::new(
            args.max_concurrent_calls as usize,
            args.max_queued_calls as usize,
            args.queue_timeout,
        ),
        fault_drop_every: args.fault_drop_every,
        fault_counter: Default::default(),
        shutdown: shutdown_rx,
    });
    tokio::spawn(crate::sweeper::run(
        state.pool.clone(),
        state.feed.clone(),
        args.running_timeout,
        args.sweep_interval,
        state.shutdown.clone(),
    ));
    tokio::spawn(crate::retention::run(
        state.pool.clone(),
        crate::retention::Policy {
            completed: args.retain_completed,
            failed: args.retain_failed,
            cancelled: args.retain_cancelled,
        },
        args.retention_interval,
        state.shutdown.clone(),
    ));
    tracing::info!(addr = %listener.local_addr()?, "jobsvc listening");
    let limits = server::Limits {
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

/// Batch workers of one kind: as configured, or by default a quarter of the pool.
fn batch_workers(configured: usize, pool_size: usize) -> usize {
    match configured {
        0 => (pool_size / 4).max(1),
        n => n,
    }
}
