//! jobsvc-bench: load against jobsvc beside the same work done by pgbench, in one run.
//!
//! Starts a private PostgreSQL and a jobsvc server in a process of its own (nothing to set up),
//! loads data when a scenario needs it, warms up, then drives N concurrent callers for a fixed
//! time and reports throughput and latency percentiles; for scenarios with a database equivalent it runs
//! pgbench on the same database with the same concurrency and prints the ratio.
//! `--json` prints one object per scenario per line.
mod cpu;
mod h2load;
mod stream;
mod work;

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use diesel_async::RunQueryDsl;
use jobsvc::app::config::ServeArgs;
use jobsvc::app::embedded_pg::{EmbeddedPg, PgOptions};
use jobsvc::pb;
use jobsvc::pb::job_service_client::JobServiceClient;
use prost::Message;
use tonic::transport::Channel;
use uuid::Uuid;

/// The JWT secret of the server the bench starts (`--jwt-secret` when given).
const DEFAULT_SECRET: &str = "bench-secret-0123456789-0123456789-abcdef";
static SECRET: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The secret the callers' tokens are signed with.
fn secret() -> &'static str {
    SECRET.get().map_or(DEFAULT_SECRET, String::as_str)
}

/// The P-256 key of `--token-alg es256`: for benchmarks only, published here on purpose (it
/// signs tokens for a server the bench starts on its own database, and nothing else).
const BENCH_ES256_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgsfKA8BClrJzrhAkM
Nm1nH2yQkLYcQWalqb8Xy7eLzR+hRANCAAQ0g3bASfiGrdhp1LQ/ohbNp1/He3ne
k+5FqKsa8LQCBY8yC0CX/1kCQ92+btElSB9AGAERO2k7k3DICXs8+vCi
-----END PRIVATE KEY-----
";

/// How callers' tokens are signed and verified (`--token-alg`, `--verified-token-cache`).
struct TokenSetup {
    es256: Option<jobsvc::api::auth::sign::SigningKey>,
    /// `--verified-token-cache` of the server the bench starts, when given.
    verified_cache: Option<usize>,
}
static TOKENS: std::sync::OnceLock<TokenSetup> = std::sync::OnceLock::new();

/// A caller's token: HS256 with the secret, or ES256 with the bench key (`--token-alg`).
fn caller_token(role: &str, sub: Option<Uuid>) -> String {
    let ttl = Duration::from_secs(3600);
    match TOKENS.get().and_then(|t| t.es256.as_ref()) {
        Some(key) => key.sign(&jobsvc::api::auth::claims(role, sub, ttl)),
        None => jobsvc::api::auth::issue(secret().as_bytes(), role, sub, ttl),
    }
}
const SCENARIOS: &[&str] = &[
    "create",
    "create-idempotent",
    "create-rls",
    "update",
    "lifecycle",
    "get",
    "get-rls",
    "list-first",
    "list-deep",
    "stats",
    "stats-user",
    "mixed",
    "work",
    "dispatch",
    "heartbeat",
    "fanout",
];

#[derive(Parser, Debug)]
#[command(about = "Benchmark jobsvc against pgbench on the same database")]
struct Args {
    /// Scenario name, or `all` (every scenario, fanout last): create, create-idempotent (with
    /// a request_id), create-rls (as a user), update (UpdateStatus alone), lifecycle (create,
    /// running, completed), get, get-rls, list-first, list-deep, stats (GetStats, all jobs),
    /// stats-user (one user), mixed (60% list, 25% update, 15% create), work (workers claiming
    /// and completing 200,000 jobs, beside a pgbench twin), dispatch (create-to-claim latency
    /// at 100 and 1,000 creates/s), heartbeat (1,000 leases heartbeating: the write path's
    /// cost), fanout (the change
    /// feed, also called `stream`: write throughput with subscribers, commit-to-subscriber
    /// latency with 1 and 1,000 subscribers, fan-out limit, memory per stream, raw
    /// LISTEN/NOTIFY; its own report). Not in `all`: stream-memory (the fanout report's
    /// server memory figures alone). Several names, comma-separated, run in one set-up.
    #[arg(long, default_value = "all")]
    scenario: String,
    /// Concurrent callers (and pgbench clients).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Measured time per scenario.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Warm-up time per scenario (not measured).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Jobs loaded for the list scenarios, spread over 1,000 users.
    #[arg(long, default_value_t = 1_000_000)]
    jobs: i64,
    /// One JSON object per scenario per line instead of a table.
    #[arg(long)]
    json: bool,
    /// Where the private PostgreSQL and the server's log live (wiped at start).
    #[arg(long, default_value = "target/bench-pg")]
    data_dir: std::path::PathBuf,
    /// Server connection pool size.
    #[arg(long, default_value_t = 16)]
    pool_size: usize,
    /// Use this PostgreSQL database instead of starting a private one. The bench migrates it,
    /// loads jobs into it and runs pgbench on it: point it only at a database that may take
    /// them. The fanout scenario needs `track_commit_timestamp = on` there.
    #[arg(long)]
    database_url: Option<String>,
    /// Drive this running jobsvc (host:port) instead of starting one; needs --database-url
    /// (its database) and --jwt-secret (its secret). --pool-size is then the server's own.
    #[arg(long, requires = "database_url", requires = "jwt_secret")]
    server: Option<std::net::SocketAddr>,
    /// The JWT secret to sign the callers' tokens with (and of the server the bench starts).
    #[arg(long)]
    jwt_secret: Option<String>,
    /// Disable the stats rollup triggers (to measure what they cost the write path; GetStats
    /// figures are then wrong).
    #[arg(long)]
    without_rollups: bool,
    /// How callers' tokens are signed: hs256 (the secret), or es256 (a P-256 key the server
    /// it starts verifies through --jwks-file), to measure what verification costs.
    #[arg(long, default_value = "hs256", value_parser = ["hs256", "es256"])]
    token_alg: String,
    /// The server's --verified-token-cache (0: every call verifies its token: the cold case).
    #[arg(long)]
    verified_token_cache: Option<usize>,
    /// The callers of the unary scenarios (create, get, get-rls, list-first, list-deep,
    /// stats-user): this bench's Rust client, or nghttp2's h2load (`apt-get install
    /// nghttp2-client`), which replays one encoded request and leaves the CPU to the server.
    #[arg(long, default_value = "rust", value_parser = ["rust", "h2load"])]
    client: String,
}

/// Turns off the stats rollup triggers (`--without-rollups`).
const DISABLE_ROLLUPS: &str = "ALTER TABLE jobs DISABLE TRIGGER jobs_stats_rollup_insert, \
     DISABLE TRIGGER jobs_stats_rollup_update, DISABLE TRIGGER jobs_stats_rollup_delete";

/// The UUID of bench user `i` (also computable in SQL for pgbench).
fn user(i: u64) -> Uuid {
    Uuid::parse_str(&format!("00000000-0000-0000-0000-{i:012}")).unwrap()
}
const USER_SQL: &str = "('00000000-0000-0000-0000-' || lpad(:u::text, 12, '0'))::uuid";

struct Env {
    without_rollups: bool,
    /// The server under test when the bench started it; stopped when the bench ends. (Before
    /// `pg`: on an error path the fields drop in order, and the server goes first.)
    server: Option<tokio::process::Child>,
    /// The private PostgreSQL, unless `--database-url`.
    pg: Option<EmbeddedPg>,
    url: String,
    addr: std::net::SocketAddr,
    /// `--data-dir`: the private PostgreSQL and the servers' logs.
    data_dir: std::path::PathBuf,
    loaded_jobs: i64,
    /// The next free number for [`load_pending`].
    next_pending: u64,
}

#[derive(Default)]
struct Outcome {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    errors: u64,
    /// The same work by pgbench, for scenarios that have a database twin.
    pgbench: Option<Pgbench>,
    /// CPU per call by part, over the measured phase (µs).
    cpu_us: Option<cpu::Split>,
}

/// One pgbench run.
struct Pgbench {
    tps: f64,
    /// Median latency (ms).
    p50_ms: f64,
    /// CPU per transaction by part (µs).
    cpu_us: Option<cpu::Split>,
}

/// The hidden first argument that makes this binary the server under test (see [`spawn_server`]).
const SERVE: &str = "__serve";

/// The server binary's allocator (`src/main.rs` says why): this binary is also the server
/// it measures.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    if std::env::args().nth(1).as_deref() == Some(SERVE) {
        // The same entry point and runtime as the `jobsvc` binary's `serve`.
        let serve = ServeArgs::parse_args(std::env::args().skip(1)).unwrap_or_else(|e| e.exit());
        return jobsvc::app::serve(serve).await;
    }
    let args = Args::parse();
    if let Some(s) = &args.jwt_secret {
        let _ = SECRET.set(s.clone());
    }
    let es256 = match args.token_alg.as_str() {
        "es256" => Some(jobsvc::api::auth::sign::SigningKey::parse(
            BENCH_ES256_KEY,
            Some("bench-es256"),
        )?),
        _ => None,
    };
    let _ = TOKENS.set(TokenSetup {
        es256,
        verified_cache: args.verified_token_cache,
    });
    // `all`, one name, or a comma-separated list (run in that order, in one set-up).
    let mut names: Vec<&str> = Vec::new();
    for name in args.scenario.split(',') {
        match name {
            "all" => names.extend(SCENARIOS),
            "stream" => names.push("fanout"),
            n if SCENARIOS.contains(&n) || n == "stream-memory" => names.push(n),
            n => {
                return Err(format!(
                    "unknown scenario {n}; one of {SCENARIOS:?}, stream-memory or all"
                )
                .into());
            }
        }
    }
    let mut env = start(&args, names.contains(&"fanout")).await?;
    if !args.json {
        println!(
            "{:<12} {:>10} {:>9} {:>9} {:>9} {:>12} {:>12} {:>7}",
            "scenario", "rps", "p50 ms", "p99 ms", "p999 ms", "pgbench tps", "pgb p50 ms", "ratio"
        );
    }
    for name in names {
        if name == "fanout" {
            stream::run(&args, &env).await?;
            continue;
        }
        if name == "stream-memory" {
            stream::memory(&env).await?;
            continue;
        }
        match name {
            "work" => {
                work::work(&args, &env).await?;
                continue;
            }
            "dispatch" => {
                work::dispatch(&args, &env).await?;
                continue;
            }
            "heartbeat" => {
                work::heartbeat(&args, &env).await?;
                continue;
            }
            _ => {}
        }
        let o = run_scenario(&args, &mut env, name).await?;
        let pgbench_tps = o.pgbench.as_ref().map(|p| p.tps);
        let pgbench_p50_ms = o.pgbench.as_ref().map(|p| p.p50_ms);
        let ratio = pgbench_tps.map(|t| o.rps / t);
        if args.json {
            let line = serde_json::json!({
                "scenario": name, "concurrency": args.concurrency, "rps": o.rps,
                "p50_ms": o.p50_ms, "p99_ms": o.p99_ms, "p999_ms": o.p999_ms, "errors": o.errors,
                "pgbench_tps": pgbench_tps, "pgbench_p50_ms": pgbench_p50_ms, "ratio": ratio,
                "cpu_us_per_call": o.cpu_us.map(cpu::Split::to_json),
                "pgbench_cpu_us_per_call": o.pgbench.and_then(|p| p.cpu_us).map(cpu::Split::to_json),
            });
            println!("{line}");
        } else {
            let opt =
                |v: Option<f64>, p: usize| v.map(|v| format!("{v:.p$}")).unwrap_or("-".into());
            println!(
                "{:<12} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>12} {:>12} {:>7}",
                name,
                o.rps,
                o.p50_ms,
                o.p99_ms,
                o.p999_ms,
                opt(pgbench_tps, 0),
                opt(pgbench_p50_ms, 2),
                opt(ratio, 2)
            );
        }
    }
    if let Some(server) = env.server.take() {
        stop_server(server).await;
    }
    if let Some(pg) = &env.pg {
        pg.stop().await;
    }
    Ok(())
}

/// Starts a jobsvc server on `url` in a process of its own, as it runs in production: its own
/// runtime and threads, apart from the load generator's, and its call log written (to
/// `server.log` in `log_dir`). The process is this binary, re-executed with [`SERVE`], so the
/// bench never runs a stale or missing `jobsvc` binary. The database URL and the secret go in
/// its environment, not on its command line, where any local user could read them. Returns
/// once the server answers.
pub(crate) async fn spawn_server(
    url: &str,
    pool_size: &str,
    log_dir: &std::path::Path,
) -> Result<(tokio::process::Child, std::net::SocketAddr), Box<dyn std::error::Error + Send + Sync>>
{
    // A port free a moment ago; the check below notices a server that could not take it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    std::fs::create_dir_all(log_dir)?;
    let log_path = log_dir.join("server.log");
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    // Only the settings given here: an operator's JOBSVC_* (metrics port, TLS) would break it.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("JOBSVC_") {
            command.env_remove(key);
        }
    }
    command.args([
        SERVE,
        "--listen",
        &addr.to_string(),
        "--pool-size",
        pool_size,
    ]);
    if let Some(tokens) = TOKENS.get() {
        if let Some(key) = &tokens.es256 {
            let path = log_dir.join("bench-jwks.json");
            std::fs::write(&path, serde_json::to_string(&key.public_set()?)?)?;
            command.arg("--jwks-file").arg(path);
        }
        if let Some(n) = tokens.verified_cache {
            command.args(["--verified-token-cache", &n.to_string()]);
        }
    }
    let mut child = command
        .env("DATABASE_URL", url)
        .env("JWT_SECRET", secret())
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path)?)
        .kill_on_drop(true)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if let Some(status) = child.try_wait()? {
            return Err(format!("the server exited ({status}); see {}", log_path.display()).into());
        }
        if Instant::now() > deadline {
            return Err(format!("the server did not start; see {}", log_path.display()).into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((child, addr))
}

/// Stops a server from [`spawn_server`] as an operator would (SIGTERM: it finishes its calls
/// and flushes its log), and kills it if it has not exited within 10 s.
pub(crate) async fn stop_server(mut child: tokio::process::Child) {
    if let Some(pid) = child.id() {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

async fn start(
    args: &Args,
    commit_timestamps: bool,
) -> Result<Env, Box<dyn std::error::Error + Send + Sync>> {
    let _ = std::fs::remove_dir_all(&args.data_dir);
    let (pg, url) = match &args.database_url {
        Some(url) => {
            if commit_timestamps {
                let mut conn = jobsvc::db::connect(url).await?;
                #[derive(diesel::QueryableByName)]
                struct Setting {
                    #[diesel(sql_type = diesel::sql_types::Text)]
                    track_commit_timestamp: String,
                }
                let on: Vec<Setting> = diesel::sql_query("SHOW track_commit_timestamp")
                    .load(&mut conn)
                    .await?;
                if on
                    .as_slice()
                    .first()
                    .map(|s| s.track_commit_timestamp.as_str())
                    != Some("on")
                {
                    return Err("fanout measures commit-to-subscriber latency from commit \
                                timestamps: set track_commit_timestamp = on on that PostgreSQL \
                                and restart it"
                        .into());
                }
            }
            (None, url.clone())
        }
        None => {
            let pg = EmbeddedPg::init(
                &args.data_dir,
                PgOptions {
                    tcp_port: Some(0),
                    durable: true,
                    max_connections: 300,
                },
            )?;
            pg.start().await?;
            if commit_timestamps {
                // Commit timestamps, for commit-to-subscriber latency.
                let mut conn = jobsvc::db::connect(&pg.url("postgres")).await?;
                diesel::sql_query("ALTER SYSTEM SET track_commit_timestamp = on")
                    .execute(&mut conn)
                    .await?;
                drop(conn);
                pg.stop().await;
                pg.start().await?;
            }
            pg.ensure_database("bench").await?;
            let url = pg.url("bench");
            (Some(pg), url)
        }
    };
    jobsvc::db::migrate(&url).await?;
    if args.without_rollups {
        let mut conn = jobsvc::db::connect(&url).await?;
        diesel::sql_query(DISABLE_ROLLUPS)
            .execute(&mut conn)
            .await?;
    }
    let (server, addr) = match args.server {
        Some(addr) => (None, addr),
        None => {
            let pool = args.pool_size.to_string();
            let (child, addr) = spawn_server(&url, &pool, &args.data_dir).await?;
            if let Some(pid) = child.id() {
                let _ = cpu::SERVER_PID.set(pid);
            }
            (Some(child), addr)
        }
    };
    Ok(Env {
        without_rollups: args.without_rollups,
        pg,
        url,
        addr,
        server,
        data_dir: args.data_dir.clone(),
        loaded_jobs: 0,
        next_pending: 1,
    })
}

/// `n` jobs over users 1..=1000 and 10 agents, created over 90 days, ~300-byte job_data.
async fn load(env: &mut Env, n: i64) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    if env.loaded_jobs >= n {
        return Ok(());
    }
    eprintln!("loading {n} jobs ...");
    let t = Instant::now();
    let mut conn = jobsvc::db::connect(&env.url).await?;
    // Bulk load with the triggers off, then rebuild the rollup once: the same end state as
    // row-by-row writes, in a fraction of the time.
    diesel::sql_query("ALTER TABLE jobs DISABLE TRIGGER USER")
        .execute(&mut conn)
        .await?;
    diesel::sql_query(format!(
        "INSERT INTO jobs (user_id, agent_identifier, status, job_data, created_at, started_at, completed_at)
         SELECT ('00000000-0000-0000-0000-' || lpad((1 + i % 1000)::text, 12, '0'))::uuid,
                'agent-' || (i % 10),
                (ARRAY['completed','completed','completed','failed','pending','running','cancelled']::job_status[])[1 + i % 7],
                jsonb_build_object('kind', 'k' || (i % 20), 'priority', 1 + i % 5, 'region', 'r' || (i % 5),
                                   'payload', repeat('x', 220)),
                now() - make_interval(secs => (i * 7776000.0 / {n})),
                now() - make_interval(secs => (i * 7776000.0 / {n})) + interval '1 second',
                now() - make_interval(secs => (i * 7776000.0 / {n})) + interval '5 seconds'
         FROM generate_series(1, {n}) AS i"
    ))
    .execute(&mut conn)
    .await?;
    diesel::sql_query("ALTER TABLE jobs ENABLE TRIGGER USER")
        .execute(&mut conn)
        .await?;
    if env.without_rollups {
        diesel::sql_query(DISABLE_ROLLUPS)
            .execute(&mut conn)
            .await?;
    }
    diesel::sql_query("SELECT job_stats_rebuild()")
        .execute(&mut conn)
        .await?;
    diesel::sql_query("VACUUM ANALYZE jobs")
        .execute(&mut conn)
        .await?;
    env.loaded_jobs = n;
    eprintln!("loaded in {:.1}s", t.elapsed().as_secs_f64());
    Ok(())
}

/// The id of updatable bench job `n` (also computable in SQL for pgbench).
fn pending_id(n: u64) -> String {
    format!("00000000-0000-0000-0001-{n:012}")
}
const PENDING_ID_SQL: &str = "('00000000-0000-0000-0001-' || lpad(:n::text, 12, '0'))::uuid";

/// `n` more pending jobs with ids from [`pending_id`], over users 1..=1000, for the update
/// scenarios (each can move once to running and once to completed); returns the first number.
async fn load_pending(
    env: &mut Env,
    n: u64,
) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
    let from = env.next_pending;
    env.next_pending += n;
    let mut conn = jobsvc::db::connect(&env.url).await?;
    diesel::sql_query(format!(
        "INSERT INTO jobs (id, user_id, agent_identifier, job_data)
         SELECT ('00000000-0000-0000-0001-' || lpad(i::text, 12, '0'))::uuid,
                ('00000000-0000-0000-0000-' || lpad((1 + i % 1000)::text, 12, '0'))::uuid,
                'bench', '{{}}'
         FROM generate_series({from}, {}) AS i",
        from + n - 1
    ))
    .execute(&mut conn)
    .await?;
    diesel::sql_query("VACUUM ANALYZE jobs")
        .execute(&mut conn)
        .await?;
    Ok(from)
}

/// Caller `w`'s `i`th UpdateStatus on the jobs from `first`: each job of the caller's own
/// slice moves to running, then to completed.
async fn update_call(mut c: Client, first: u64, concurrency: usize, w: usize, i: u64) -> bool {
    let n = first + w as u64 + (i / 2) * concurrency as u64;
    let status = if i.is_multiple_of(2) {
        pb::JobStatus::Running
    } else {
        pb::JobStatus::Completed
    };
    c.update_status(pb::UpdateStatusRequest {
        id: pending_id(n),
        status: status as i32,
        ..Default::default()
    })
    .await
    .is_ok()
}

/// The pgbench twin of one UpdateStatus: the same compare-and-set on a random pending job of
/// its own range.
fn pgbench_update(from: u64, to: u64) -> String {
    format!(
        "\\set n random({from}, {to})\n\
         UPDATE jobs SET status = 'running', started_at = now() WHERE id = {PENDING_ID_SQL} AND status = 'pending' RETURNING *;\n"
    )
}

/// The pgbench twin of one CreateJob (the ~300-byte job_data of [`create_call`]).
const PGBENCH_INSERT: &str = "INSERT INTO jobs (user_id, agent_identifier, job_data) VALUES \
     ('00000000-0000-0000-0000-000000000001', 'bench', \
     '{\"kind\": \"k1\", \"priority\": 3, \"payload\": \"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}') RETURNING *;\n";

type Client = JobServiceClient<tonic::service::interceptor::InterceptedService<Channel, Auth>>;

#[derive(Clone)]
struct Auth(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);
impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        Ok(r)
    }
}

async fn client(addr: std::net::SocketAddr, role: &str, sub: Option<Uuid>) -> Client {
    let token = caller_token(role, sub);
    // One HTTP/2 connection per caller, as independent services would have.
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    JobServiceClient::with_interceptor(channel, Auth(format!("Bearer {token}").parse().unwrap()))
}

/// Jobs of `agent` (to check that a create run made the rows it counted).
async fn count_agent(
    env: &Env,
    agent: &str,
) -> Result<i64, Box<dyn std::error::Error + Send + Sync>> {
    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = jobsvc::db::connect(&env.url).await?;
    let n: N = diesel::sql_query("SELECT count(*) AS n FROM jobs WHERE agent_identifier = $1")
        .bind::<diesel::sql_types::Text, _>(agent)
        .get_result(&mut conn)
        .await?;
    Ok(n.n)
}

/// One CreateJob with a ~300-byte job_data (and `request_id`, if not empty).
async fn create_call(mut c: Client, agent: String, request_id: String) -> bool {
    c.create_job(pb::CreateJobRequest {
        agent_identifier: agent,
        job_data: Some(jobsvc::api::convert::json_to_struct(
            serde_json::json!({"kind": "k1", "priority": 3, "payload": "x".repeat(250)}),
        )),
        request_id,
        ..Default::default()
    })
    .await
    .is_ok()
}

/// A job's whole life: CreateJob, then UpdateStatus to running and to completed.
async fn lifecycle_call(mut c: Client) -> bool {
    let Ok(job) = c
        .create_job(pb::CreateJobRequest {
            agent_identifier: "bench".into(),
            ..Default::default()
        })
        .await
    else {
        return false;
    };
    let id = job.into_inner().id;
    for status in [pb::JobStatus::Running, pb::JobStatus::Completed] {
        let req = pb::UpdateStatusRequest {
            id: id.clone(),
            status: status as i32,
            ..Default::default()
        };
        if c.update_status(req).await.is_err() {
            return false;
        }
    }
    true
}

/// Drives `call` from `concurrency` tasks for warm-up plus duration; returns measured latencies.
async fn drive<F, Fut>(args: &Args, make: F) -> Outcome
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let make = Arc::new(make);
    // Progress on stderr (stdout stays the table or the JSON lines); also a marker for
    // attaching a profiler to the measured part only.
    eprintln!(
        "jobsvc: warming up {:?}, then measuring {:?}",
        args.warmup, args.duration
    );
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let cpu = tokio::spawn(async move {
        let me = std::process::id();
        tokio::time::sleep_until(measure_from.into()).await;
        let first = tokio::task::spawn_blocking(move || cpu::snapshot(me))
            .await
            .ok()?;
        tokio::time::sleep_until(end.into()).await;
        let last = tokio::task::spawn_blocking(move || cpu::snapshot(me))
            .await
            .ok()?;
        Some(last.since(&first))
    });
    let mut tasks = Vec::new();
    for worker in 0..args.concurrency {
        let make = make.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut i = 0u64;
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let ok = make(worker, i).await;
                i += 1;
                if t >= measure_from {
                    if ok {
                        lat.push(t.elapsed().as_micros() as u32);
                    } else {
                        errors += 1;
                    }
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await.unwrap();
        all.extend(lat);
        errors += e;
    }
    all.sort_unstable();
    let pct = |p: f64| {
        if all.is_empty() {
            0.0
        } else {
            all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as f64 / 1000.0
        }
    };
    let cpu_us = cpu
        .await
        .ok()
        .flatten()
        .and_then(|split| split.per_call_us(all.len() as f64));
    Outcome {
        cpu_us,
        rps: all.len() as f64 / args.duration.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        p999_ms: pct(0.999),
        errors,
        ..Default::default()
    }
}

/// Runs pgbench with `script` on the bench database. The median latency comes from pgbench's
/// per-transaction log (its summary has only the mean).
fn pgbench(env: &Env, args: &Args, script: &str) -> Option<Pgbench> {
    let bin = EmbeddedPg::find_bin_dir().ok()?.join("pgbench");
    eprintln!("pgbench: measuring {:?}", args.duration);
    let file = std::env::temp_dir().join(format!("jobsvc-bench-{}.sql", std::process::id()));
    std::fs::write(&file, script).ok()?;
    let logs = std::env::temp_dir().join(format!("jobsvc-bench-{}-log", std::process::id()));
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs).ok()?;
    let child = Command::new(bin)
        .args([
            "-n",
            "-M",
            "prepared",
            "-c",
            &args.concurrency.to_string(),
            "-j",
            "2",
            "-T",
        ])
        .arg(args.duration.as_secs().max(1).to_string())
        .arg("-f")
        .arg(&file)
        .arg("-l")
        .arg(format!("--log-prefix={}", logs.join("pgbench").display()))
        // The database by URL, in the environment rather than on the command line (a password
        // in it would show in `ps`); libpq takes a URI wherever it takes a database name.
        .env("PGDATABASE", &env.url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    // CPU by part, from half a second in (its connections made) to half a second before its
    // end (before they close): pgbench's run is `-T` seconds from its start, with no warm-up.
    let duration = Duration::from_secs(args.duration.as_secs().max(1));
    let measured = cpu::over_run(child.id(), Duration::ZERO, duration);
    let out = child.wait_with_output().ok()?;
    // Each log line: client, transaction number, latency in microseconds, ...
    let mut latencies: Vec<u64> = Vec::new();
    for entry in std::fs::read_dir(&logs).ok()?.flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        latencies.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok()),
        );
    }
    let _ = std::fs::remove_dir_all(&logs);
    latencies.sort_unstable();
    let median = latencies
        .get(latencies.len() / 2)
        .map(|us| *us as f64 / 1000.0);
    let text = String::from_utf8_lossy(&out.stdout);
    let grab = |prefix: &str| {
        text.lines().find(|l| l.starts_with(prefix)).and_then(|l| {
            l.split(['=', ' '])
                .filter_map(|w| w.trim().parse::<f64>().ok())
                .next()
        })
    };
    let tps = grab("tps")?;
    Some(Pgbench {
        tps,
        p50_ms: median.or_else(|| grab("latency average")).unwrap_or(0.0),
        cpu_us: measured.and_then(|(split, window)| split.per_call_us(tps * window)),
    })
}

async fn run_scenario(
    args: &Args,
    env: &mut Env,
    name: &str,
) -> Result<Outcome, Box<dyn std::error::Error + Send + Sync>> {
    let addr = env.addr;
    // One client per caller, made before the clock starts.
    let mut clients = Vec::new();
    for w in 0..args.concurrency {
        let c = match name {
            "create" | "create-idempotent" | "update" | "lifecycle" | "get" | "stats" | "mixed" => {
                client(addr, "service_role", None).await
            }
            _ => client(addr, "authenticated", Some(user(1 + (w as u64 % 1000)))).await,
        };
        clients.push(c);
    }
    let clients = Arc::new(clients);
    let mut outcome;
    match name {
        "create" | "create-rls" => {
            if args.client == "h2load" {
                let token = match name {
                    "create" => caller_token("service_role", None),
                    _ => caller_token("authenticated", Some(user(1))),
                };
                let req = pb::CreateJobRequest {
                    agent_identifier: "bench-h2load".into(),
                    job_data: Some(jobsvc::api::convert::json_to_struct(
                        serde_json::json!({"kind": "k1", "priority": 3, "payload": "x".repeat(250)}),
                    )),
                    ..Default::default()
                };
                let before = count_agent(env, "bench-h2load").await?;
                let run =
                    h2load::run(args, addr, "CreateJob", &token, &req.encode_to_vec(), 100.0)?;
                let made = count_agent(env, "bench-h2load").await? - before;
                // Every counted reply is a row (h2load counts warm-up replies too, not in `succeeded`).
                if made < run.succeeded as i64 {
                    return Err(format!(
                        "h2load counted {} creates but {made} rows were made",
                        run.succeeded
                    )
                    .into());
                }
                outcome = run.outcome();
            } else {
                let c = clients.clone();
                outcome = drive(args, move |w, _| {
                    create_call(c[w].clone(), "bench".into(), String::new())
                })
                .await;
            }
            outcome.pgbench = pgbench(env, args, PGBENCH_INSERT);
        }
        "create-idempotent" => {
            let c = clients.clone();
            outcome = drive(args, move |w, i| {
                create_call(c[w].clone(), "bench".into(), format!("w{w}-{i}"))
            })
            .await;
            // The same insert with a unique request_id, through the same conflict arbiter.
            let script = PGBENCH_INSERT
                .replace("(user_id, agent_identifier, job_data)", "(user_id, agent_identifier, job_data, request_id)")
                .replace(
                    "\"}') RETURNING *;",
                    "\"}', 'p' || :client_id || '-' || :r) ON CONFLICT (user_id, request_id) WHERE request_id IS NOT NULL DO NOTHING RETURNING *;",
                );
            let script = format!("\\set r random(1, 1000000000000)\n{script}");
            outcome.pgbench = pgbench(env, args, &script);
        }
        "update" => {
            // Enough pending jobs for every caller's two moves per job, then as many again for
            // pgbench's random picks.
            let per_run = 200_000;
            let first = load_pending(env, 2 * per_run).await?;
            let c = clients.clone();
            let concurrency = args.concurrency;
            outcome = drive(args, move |w, i| {
                update_call(c[w].clone(), first, concurrency, w, i)
            })
            .await;
            let script = pgbench_update(first + per_run, first + 2 * per_run - 1);
            outcome.pgbench = pgbench(env, args, &script);
        }
        "mixed" => {
            load(env, args.jobs).await?;
            let per_run = 100_000;
            let first = load_pending(env, 2 * per_run).await?;
            let c = clients.clone();
            let concurrency = args.concurrency;
            outcome = drive(args, move |w, i| {
                let c = c[w].clone();
                async move {
                    match i % 20 {
                        // 60%: the first page of one user's jobs.
                        0..12 => {
                            let mut c = c;
                            c.list_jobs(pb::ListJobsRequest {
                                page_size: 50,
                                user_id: user(1 + (w as u64 * 7 + i) % 1000).to_string(),
                                ..Default::default()
                            })
                            .await
                            .is_ok()
                        }
                        // 25%: a move of one of the caller's own pending jobs.
                        12..17 => {
                            update_call(c, first, concurrency, w, i / 20 * 5 + i % 20 - 12).await
                        }
                        // 15%: a create.
                        _ => create_call(c, "bench".into(), String::new()).await,
                    }
                }
            })
            .await;
            let update = pgbench_update(first + per_run, first + 2 * per_run - 1);
            let update = update.lines().nth(1).unwrap_or_default();
            let script = format!(
                "\\set r random(1, 100)\n\\set u random(1, 1000)\n\\set n random({}, {})\n\
                 \\if :r <= 60\n\
                 SELECT * FROM jobs WHERE user_id = {USER_SQL} ORDER BY created_at DESC, id DESC LIMIT 51;\n\
                 \\elif :r <= 85\n{update}\n\\else\n{PGBENCH_INSERT}\\endif\n",
                first + per_run,
                first + 2 * per_run - 1
            );
            outcome.pgbench = pgbench(env, args, &script);
        }
        "lifecycle" => {
            let c = clients.clone();
            outcome = drive(args, move |w, _| lifecycle_call(c[w].clone())).await;
            // The same three statements, one transaction each, as pgbench does them.
            let script = "INSERT INTO jobs (agent_identifier, job_data) VALUES ('bench', '{}') RETURNING id \\gset\n\
                 UPDATE jobs SET status = 'running', started_at = now() WHERE id = :id AND status = 'pending' RETURNING *;\n\
                 UPDATE jobs SET status = 'completed', completed_at = now() WHERE id = :id AND status = 'running' RETURNING *;\n";
            outcome.pgbench = pgbench(env, args, script);
        }
        "get" | "get-rls" => {
            // One job per caller, owned by that caller's user.
            let mut ids = Vec::new();
            for (w, c) in clients.iter().enumerate() {
                let mut c = c.clone();
                let req = pb::CreateJobRequest {
                    agent_identifier: "bench".into(),
                    user_id: if name == "get" {
                        user(1 + (w as u64 % 1000)).to_string()
                    } else {
                        String::new()
                    },
                    ..Default::default()
                };
                ids.push(c.create_job(req).await?.into_inner().id);
            }
            let ids = Arc::new(ids);
            if args.client == "h2load" {
                let token = match name {
                    "get" => caller_token("service_role", None),
                    _ => caller_token("authenticated", Some(user(1))),
                };
                let req = pb::GetJobRequest { id: ids[0].clone() };
                outcome = h2load::run(args, addr, "GetJob", &token, &req.encode_to_vec(), 100.0)?
                    .outcome();
            } else {
                let c = clients.clone();
                let shared = ids.clone();
                outcome = drive(args, move |w, _| {
                    let mut c = c[w].clone();
                    let id = shared[w].clone();
                    async move { c.get_job(pb::GetJobRequest { id }).await.is_ok() }
                })
                .await;
            }
            let script = format!("SELECT * FROM jobs WHERE id = '{}';\n", ids[0]);
            outcome.pgbench = pgbench(env, args, &script);
        }
        "list-first" | "list-deep" => {
            load(env, args.jobs).await?;
            // For the deep page: a cursor half-way down each user's list.
            let deep: HashMap<usize, String> = if name == "list-deep" {
                let mut m = HashMap::new();
                // Half-way down: one page of half the user's jobs (at most 1000 per page).
                let half = ((args.jobs / 1000 / 2) as i32).clamp(1, 1000);
                for (w, c) in clients.iter().enumerate() {
                    let mut c = c.clone();
                    let req = pb::ListJobsRequest {
                        page_size: half,
                        ..Default::default()
                    };
                    m.insert(w, c.list_jobs(req).await?.into_inner().next_page_token);
                }
                m
            } else {
                HashMap::new()
            };
            let deep = Arc::new(deep);
            if args.client == "h2load" {
                // Caller 0's user, and its page.
                let token = caller_token("authenticated", Some(user(1)));
                let req = pb::ListJobsRequest {
                    page_size: 50,
                    page_token: deep.get(&0).cloned().unwrap_or_default(),
                    ..Default::default()
                };
                outcome =
                    h2load::run(args, addr, "ListJobs", &token, &req.encode_to_vec(), 5000.0)?
                        .outcome();
            } else {
                let c = clients.clone();
                outcome = drive(args, move |w, _| {
                    let mut c = c[w].clone();
                    let page_token = deep.get(&w).cloned().unwrap_or_default();
                    async move {
                        c.list_jobs(pb::ListJobsRequest {
                            page_size: 50,
                            page_token,
                            ..Default::default()
                        })
                        .await
                        .is_ok()
                    }
                })
                .await;
            }
            // Jobs are spread evenly over 90 days, so half-way down is 45 days ago.
            let keyset = if name == "list-deep" {
                "AND (created_at, id) < (now() - interval '45 days', 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid) "
            } else {
                ""
            };
            let script = format!(
                "\\set u random(1, 1000)\n\
                 SELECT * FROM jobs WHERE user_id = {USER_SQL} {keyset}ORDER BY created_at DESC, id DESC LIMIT 51;\n"
            );
            outcome.pgbench = pgbench(env, args, &script);
        }
        "stats" | "stats-user" => {
            load(env, args.jobs).await?;
            if args.client == "h2load" {
                let token = match name {
                    "stats" => caller_token("service_role", None),
                    _ => caller_token("authenticated", Some(user(1))),
                };
                let req = pb::GetStatsRequest::default();
                outcome = h2load::run(args, addr, "GetStats", &token, &req.encode_to_vec(), 10.0)?
                    .outcome();
            } else {
                let c = clients.clone();
                outcome = drive(args, move |w, _| {
                    let mut c = c[w].clone();
                    async move { c.get_stats(pb::GetStatsRequest::default()).await.is_ok() }
                })
                .await;
            }
            // The same figures the plain way: the origin's job_stats view (an aggregate over
            // jobs) for all jobs, get_job_stats(user) for one user.
            let script = if name == "stats" {
                "SELECT * FROM job_stats;\n".to_string()
            } else {
                format!("\\set u random(1, 1000)\nSELECT get_job_stats({USER_SQL});\n")
            };
            outcome.pgbench = pgbench(env, args, &script);
        }
        _ => unreachable!(),
    }
    Ok(outcome)
}
