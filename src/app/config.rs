//! Command line and environment: one clap definition, every serve setting also settable by env.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// jobsvc: a gRPC job service with tenant isolation and a resumable change stream.
#[derive(Debug, Parser)]
#[command(name = "jobsvc", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC server (the default when no command is given).
    Serve(Box<ServeArgs>),
    /// Print a JWT signed with the configured secret (HS256), or with a private key
    /// (--signing-key: ES256, RS256 or EdDSA, with its kid).
    Token(TokenArgs),
    /// Manage static API keys (`x-api-key`) for internal services.
    #[command(subcommand, name = "api-key")]
    ApiKey(ApiKeyCommand),
    /// Write jobs to stdout as JSON lines (one `jobs` row per line, every column).
    Export(ExportArgs),
    /// Read JSON lines (as `export` writes them) from stdin into jobs; jobs that already
    /// exist are skipped, so running it again is safe.
    Import(ImportArgs),
}

/// The database `export` and `import` work on.
#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// PostgreSQL URL; without it, the private PostgreSQL of the data directory (used while
    /// `jobsvc serve` runs on it, started for the command otherwise).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Directory of the private PostgreSQL.
    #[arg(long, env = "JOBSVC_DATA_DIR", default_value = ".jobsvc")]
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Only jobs in these statuses (pending, running, completed, failed, cancelled); repeatable.
    #[arg(long = "status")]
    pub statuses: Vec<String>,
    /// Only jobs of this agent.
    #[arg(long)]
    pub agent: Option<String>,
    /// Only jobs of this user.
    #[arg(long)]
    pub user: Option<uuid::Uuid>,
    /// Only jobs created after this time (RFC 3339).
    #[arg(long)]
    pub created_after: Option<chrono::DateTime<chrono::Utc>>,
    /// Only jobs created before this time (RFC 3339).
    #[arg(long)]
    pub created_before: Option<chrono::DateTime<chrono::Utc>>,
    /// Resume an interrupted export: only jobs whose id sorts after this one (the id on the
    /// last complete line written).
    #[arg(long)]
    pub after_id: Option<uuid::Uuid>,
}

/// What a job may hold, for `serve` and for `import` alike.
#[derive(Debug, Clone, Args)]
pub struct JobLimitArgs {
    /// Largest `job_data` or `result` accepted, in bytes of JSON.
    #[arg(long, env = "JOBSVC_MAX_JOB_DATA_BYTES", default_value_t = 1 << 20)]
    pub max_job_data_bytes: usize,

    /// The most a job may hold: job_data, result and error_message together, in bytes of
    /// encoded protobuf (a Struct can be five times its JSON). At most --max-message-bytes
    /// less 256 KiB, so every job fits in a response with room to spare.
    #[arg(long, env = "JOBSVC_MAX_JOB_BYTES", default_value_t = 3 << 20)]
    pub max_job_bytes: usize,

    /// Deepest nesting of objects and lists accepted in `job_data` or `result`.
    #[arg(long, env = "JOBSVC_MAX_JOB_DATA_DEPTH", default_value_t = 32)]
    pub max_job_data_depth: usize,
}

impl JobLimitArgs {
    pub(crate) fn limits(&self) -> crate::api::convert::JsonLimits {
        crate::api::convert::JsonLimits {
            max_bytes: self.max_job_data_bytes,
            max_depth: self.max_job_data_depth,
            max_job_bytes: self.max_job_bytes,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// The limits the service applies, applied to every imported job (a line past them is
    /// refused with its line number).
    #[command(flatten)]
    pub job_limits: JobLimitArgs,
    /// Jobs per INSERT statement.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u16).range(1..=5000))]
    pub batch_size: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the JWT secret and the embedded database live; shared by `serve` and `token`.
#[derive(Debug, Clone, Args)]
pub struct SecretArgs {
    /// HS256 secret that signs caller tokens, at least 32 bytes. Without it (and without
    /// DATABASE_URL) a secret is generated once and kept in the data directory. Prefer the
    /// environment or --jwt-secret-file: a command-line flag shows in the process list.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// A file holding the HS256 secret (at least 32 bytes; surrounding whitespace ignored).
    #[arg(long, env = "JOBSVC_JWT_SECRET_FILE", conflicts_with = "jwt_secret")]
    pub jwt_secret_file: Option<PathBuf>,

    /// Secrets accepted besides the current one, during a rotation (repeatable; in the
    /// environment, comma-separated): callers' tokens and the page and resume tokens signed
    /// with them still verify. Nothing is signed with them. See docs/operations.md.
    #[arg(
        long = "jwt-previous-secret",
        env = "JWT_PREVIOUS_SECRETS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub jwt_previous_secrets: Vec<String>,

    /// Directory for the embedded PostgreSQL and the generated secret.
    #[arg(long, env = "JOBSVC_DATA_DIR", default_value = ".jobsvc")]
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address of the gRPC listener.
    #[arg(long, env = "JOBSVC_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// PostgreSQL URL. Without it jobsvc starts a private PostgreSQL under the data directory.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    #[command(flatten)]
    pub secret: SecretArgs,

    /// Database connections for writes and the service role's calls.
    #[arg(long, env = "JOBSVC_POOL_SIZE", default_value_t = 16)]
    pub pool_size: usize,

    /// Database connections for users' reads (GetJob, ListJobs, ListJobEvents, GetStats),
    /// whose session role is `authenticated`.
    #[arg(long, env = "JOBSVC_USER_READ_POOL_SIZE", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub user_read_pool_size: u32,

    /// Shared connections that carry the service role's GetJob calls, pipelined (0: each
    /// call checks a connection out of the pool). By default one per two CPU cores of this
    /// machine, from one to eight: on two cores, one lane took a GetJob for 18 µs of PostgreSQL's
    /// CPU, two for 26 and four for 35, the backends waking each other.
    #[arg(long, env = "JOBSVC_READ_LANES", value_parser = clap::value_parser!(u32).range(0..=64))]
    pub read_lanes: Option<u32>,

    /// Log line format; verbosity comes from RUST_LOG (default "info").
    #[arg(long, env = "JOBSVC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Accepted token audiences (repeatable; comma-separated in the environment). When set, a
    /// token's `aud` must name one of them; a token without `aud` passes only as the service
    /// role (Supabase's legacy service keys have none). Supabase's user tokens say
    /// `authenticated`. Unset: not checked.
    #[arg(
        long = "jwt-audience",
        env = "JOBSVC_JWT_AUDIENCE",
        value_delimiter = ','
    )]
    pub jwt_audiences: Vec<String>,

    /// Accepted token issuers (repeatable; comma-separated in the environment). When set,
    /// `iss` must be one of them. Supabase: `https://<ref>.supabase.co/auth/v1` for user
    /// tokens, `supabase` for its legacy keys. Unset: not checked.
    #[arg(long = "jwt-issuer", env = "JOBSVC_JWT_ISSUER", value_delimiter = ',')]
    pub jwt_issuers: Vec<String>,

    /// Refuse anonymous sign-ins (`is_anonymous: true`) with PERMISSION_DENIED; by default
    /// they are users like any other.
    #[arg(long, env = "JOBSVC_REFUSE_ANONYMOUS")]
    pub refuse_anonymous: bool,

    /// A JWK set URL whose keys verify ES256, RS256 and EdDSA tokens (Supabase:
    /// https://<ref>.supabase.co/auth/v1/.well-known/jwks.json). Fetched at start (the server is
    /// NOT_SERVING until it is), kept as its Cache-Control says (10 min by default), fetched
    /// again when a token names an unknown kid (at most once per --jwks-refetch-interval).
    #[arg(long, env = "JOBSVC_JWKS_URL", conflicts_with = "jwks_file")]
    pub jwks_url: Option<String>,

    /// A JWK set file, used as --jwks-url is; re-read when it changes.
    #[arg(long, env = "JOBSVC_JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,

    /// The least time between two fetches of --jwks-url.
    #[arg(long, env = "JOBSVC_JWKS_REFETCH_INTERVAL", default_value = "30s", value_parser = parse_positive)]
    pub jwks_refetch_interval: Duration,

    /// A file of API keys (SHA-256 hashes, each with `service_role` or `user <uuid>`; see
    /// `jobsvc api-key create`) admitted in the `x-api-key` header; re-read when it changes.
    #[arg(long, env = "JOBSVC_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,

    /// Verified tokens remembered (each is still checked against its expiry on every use);
    /// 0 verifies every call's token.
    #[arg(long, env = "JOBSVC_VERIFIED_TOKEN_CACHE", default_value_t = 4096)]
    pub verified_token_cache: usize,

    /// Clock leeway for token `exp` and `nbf`, at most 60 s.
    #[arg(long, env = "JOBSVC_JWT_LEEWAY", default_value = "30s", value_parser = parse_leeway)]
    pub jwt_leeway: Duration,

    #[command(flatten)]
    pub job_limits: JobLimitArgs,

    /// A browser origin (scheme://host[:port]) allowed to call over gRPC-Web from another
    /// origin (repeatable; comma-separated in the environment). None by default: gRPC-Web from
    /// the same origin, and every non-browser client, need none.
    #[arg(
        long = "cors-allow-origin",
        env = "JOBSVC_CORS_ALLOW_ORIGIN",
        value_delimiter = ','
    )]
    pub cors_allow_origins: Vec<String>,

    /// Do not serve the dashboard at `/` (it is served by default, on the gRPC port).
    #[arg(long, env = "JOBSVC_NO_UI")]
    pub no_ui: bool,

    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "JOBSVC_MAX_MESSAGE_BYTES", default_value_t = 4 << 20)]
    pub max_message_bytes: usize,

    /// Most concurrent HTTP/2 streams (calls) on one connection.
    #[arg(long, env = "JOBSVC_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    pub max_concurrent_streams: u32,

    /// Most unary calls working at once; more wait in a queue (see --max-queued-calls).
    #[arg(long, env = "JOBSVC_MAX_CONCURRENT_CALLS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_calls: u32,

    /// Most unary calls waiting for one of the working places; beyond that, calls are
    /// refused at once with RESOURCE_EXHAUSTED (OVERLOADED).
    #[arg(long, env = "JOBSVC_MAX_QUEUED_CALLS", default_value_t = 256)]
    pub max_queued_calls: u32,

    /// A queued call that has not started within this is refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "JOBSVC_QUEUE_TIMEOUT", default_value = "250ms", value_parser = parse_positive)]
    pub queue_timeout: Duration,

    /// Interval of HTTP/2 keepalive pings to clients.
    #[arg(long, env = "JOBSVC_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Duration,

    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, env = "JOBSVC_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,

    /// An idle StreamJobUpdates stream gets a heartbeat (with a fresh resume token) this often.
    #[arg(long, env = "JOBSVC_STREAM_HEARTBEAT", default_value = "15s", value_parser = parse_positive)]
    pub stream_heartbeat: Duration,

    /// How long the change history (job events, resume points) is kept; at least 24h.
    #[arg(long, env = "JOBSVC_EVENT_RETENTION", default_value = "7d", value_parser = parse_retention)]
    pub event_retention: Duration,

    /// How often the change feed polls the history for changes no notification announced
    /// (plain SQL writes, lost notifications).
    #[arg(long, env = "JOBSVC_FEED_POLL_INTERVAL", default_value = "200ms", value_parser = parse_positive)]
    pub feed_poll_interval: Duration,

    /// The first retry's delay of a worker's failed attempt (a job may set its own).
    #[arg(long, env = "JOBSVC_RETRY_INITIAL_BACKOFF", default_value = "1s", value_parser = parse_positive)]
    pub retry_initial_backoff: Duration,

    /// Each further retry waits this many times longer than the one before.
    #[arg(long, env = "JOBSVC_RETRY_BACKOFF_MULTIPLIER", default_value_t = 2.0, value_parser = parse_multiplier)]
    pub retry_backoff_multiplier: f64,

    /// The longest delay before a retry.
    #[arg(long, env = "JOBSVC_RETRY_MAX_BACKOFF", default_value = "1h", value_parser = parse_positive)]
    pub retry_max_backoff: Duration,

    /// How often expired leases are looked for (a lease ends at most this long after it
    /// expires).
    #[arg(long, env = "JOBSVC_LEASE_SWEEP_INTERVAL", default_value = "250ms", value_parser = parse_positive)]
    pub lease_sweep_interval: Duration,

    /// Move RUNNING jobs that started longer ago than this to FAILED (e.g. 2h); off when unset.
    #[arg(long, env = "JOBSVC_RUNNING_TIMEOUT", value_parser = parse_positive)]
    pub running_timeout: Option<Duration>,

    /// How often the running-timeout sweeper looks.
    #[arg(long, env = "JOBSVC_SWEEP_INTERVAL", default_value = "30s", value_parser = parse_positive)]
    pub sweep_interval: Duration,

    /// Delete completed jobs this long after they finished (e.g. 30d); kept forever when unset.
    #[arg(long, env = "JOBSVC_RETAIN_COMPLETED", value_parser = parse_positive)]
    pub retain_completed: Option<Duration>,

    /// Delete failed jobs this long after they finished (e.g. 90d); kept forever when unset.
    #[arg(long, env = "JOBSVC_RETAIN_FAILED", value_parser = parse_positive)]
    pub retain_failed: Option<Duration>,

    /// Delete cancelled jobs this long after they finished; kept forever when unset.
    #[arg(long, env = "JOBSVC_RETAIN_CANCELLED", value_parser = parse_positive)]
    pub retain_cancelled: Option<Duration>,

    /// How often the retention policy runs.
    #[arg(long, env = "JOBSVC_RETENTION_INTERVAL", default_value = "10m", value_parser = parse_positive)]
    pub retention_interval: Duration,

    /// Serve Prometheus metrics (text format, at /metrics) on this address; off when unset. A
    /// bare port (`9464`) binds 127.0.0.1: other hosts reach the metrics only when the
    /// address says so (`0.0.0.0:9464`).
    #[arg(long, env = "JOBSVC_METRICS_LISTEN", value_parser = parse_listen)]
    pub metrics_listen: Option<SocketAddr>,

    /// Database calls slower than this are logged as warnings and counted.
    #[arg(long, env = "JOBSVC_SLOW_QUERY_THRESHOLD", default_value = "1s", value_parser = parse_positive)]
    pub slow_query_threshold: Duration,

    /// PEM certificate chain for TLS on the gRPC port (with --tls-key); plaintext when unset.
    #[arg(long, env = "JOBSVC_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for TLS on the gRPC port (with --tls-cert).
    #[arg(long, env = "JOBSVC_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Fault injection for tests: every Nth committed write answers UNAVAILABLE, as if its
    /// response had been lost after the commit. 0 (the default) never.
    #[arg(long, default_value_t = 0, hide = true)]
    pub fault_drop_every: u64,

    /// CreateJob statements in flight at once; creates arriving meanwhile share the next
    /// statement and commit. 0 (the default): a quarter of the pool.
    #[arg(
        long,
        env = "JOBSVC_CREATE_BATCH_WORKERS",
        default_value_t = 0,
        hide = true
    )]
    pub create_batch_workers: usize,

    /// UpdateStatus / CancelJob statements in flight at once; moves arriving meanwhile share
    /// the next statement and commit. 0 (the default): a quarter of the pool.
    #[arg(
        long,
        env = "JOBSVC_UPDATE_BATCH_WORKERS",
        default_value_t = 0,
        hide = true
    )]
    pub update_batch_workers: usize,

    /// Events queued for one stream before it has to catch up from the history instead
    /// (tests make it small to exercise that path).
    #[arg(
        long,
        env = "JOBSVC_STREAM_QUEUE_EVENTS",
        default_value_t = 4096,
        hide = true
    )]
    pub stream_queue_events: usize,

    /// StreamJobUpdates streams one user may hold open at once (RESOURCE_EXHAUSTED
    /// TOO_MANY_STREAMS past it). The service role is bounded by --max-streams only.
    #[arg(long, env = "JOBSVC_MAX_STREAMS_PER_USER", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_user: u32,

    /// StreamJobUpdates streams open at once on this server, all callers together.
    #[arg(long, env = "JOBSVC_MAX_STREAMS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams: u32,

    /// WaitJob calls one user may have waiting at once.
    #[arg(long, env = "JOBSVC_MAX_WAITS_PER_USER", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_waits_per_user: u32,

    /// WaitJob calls waiting at once on this server, all callers together.
    #[arg(long, env = "JOBSVC_MAX_WAITS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_waits: u32,

    /// Streams of one user reading their `include_existing` snapshot at once (the server
    /// reads at most 16 at once in all).
    #[arg(long, env = "JOBSVC_MAX_SNAPSHOTS_PER_USER", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_snapshots_per_user: u32,
}

impl ServeArgs {
    /// The serve settings from the environment and defaults alone (for `jobsvc` with no command).
    pub fn from_env() -> Result<Self, clap::Error> {
        Self::parse_args(["jobsvc"])
    }

    /// The serve settings from these arguments (the first is the program name), the
    /// environment and defaults.
    pub fn parse_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            args: ServeArgs,
        }
        Only::try_parse_from(args).map(|o| o.args)
    }
}

#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Print a new random key (first line: give it to the service) and its line for
    /// --api-key-file (second line: the server keeps only the key's hash).
    Create {
        /// The key speaks for this user; without it, for the service role.
        #[arg(long)]
        user: Option<uuid::Uuid>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TokenRole {
    #[value(name = "service_role")]
    ServiceRole,
    #[value(name = "authenticated")]
    Authenticated,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The role the token grants.
    #[arg(long, value_enum, required_unless_present = "print_jwks")]
    pub role: Option<TokenRole>,

    /// The user the token speaks for (required for `authenticated`).
    #[arg(long)]
    pub sub: Option<uuid::Uuid>,

    /// How long the token is valid, e.g. 1h, 30m, 7d.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,

    /// Sign with this private key instead of the HS256 secret: a PEM (P-256, Ed25519 or RSA)
    /// or a private JWK. The algorithm is the key's (ES256, EdDSA, RS256).
    #[arg(long)]
    pub signing_key: Option<PathBuf>,

    /// The kid the token names (the id the JWK set publishes the key under); a JWK's own
    /// kid by default.
    #[arg(long, requires = "signing_key")]
    pub kid: Option<String>,

    /// Print the public JWK set of --signing-key (for --jwks-file) instead of a token.
    #[arg(long, requires = "signing_key")]
    pub print_jwks: bool,

    #[command(flatten)]
    pub secret: SecretArgs,
}

fn parse_leeway(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d > Duration::from_secs(60) {
        return Err("the leeway is at most 60s".into());
    }
    Ok(d)
}

/// `host:port`, or a bare port on 127.0.0.1.
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse()
        .map_err(|_| format!("{s:?} is not host:port (or a bare port, on 127.0.0.1)"))
}

fn parse_multiplier(s: &str) -> Result<f64, String> {
    let m: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(1.0..=10.0).contains(&m) {
        return Err("the backoff multiplier is from 1.0 to 10.0".into());
    }
    Ok(m)
}

fn parse_positive(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

fn parse_retention(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(24 * 3600) {
        return Err("the history is kept at least 24h (resume tokens are valid that long)".into());
    }
    Ok(d)
}
