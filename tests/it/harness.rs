//! Test harness: one private PostgreSQL per test binary (never the machine's own), a fresh
//! database per test, the real server on port 0, and generated gRPC clients over real sockets.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use jobsvc::app::config::ServeArgs;
use jobsvc::app::embedded_pg::{EmbeddedPg, PgOptions};
use jobsvc::pb::job_service_client::JobServiceClient;
use tokio::net::TcpListener;
use tokio::sync::{OnceCell, oneshot};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use uuid::Uuid;

pub const SECRET: &str = "test-secret-0123456789-0123456789-abcdef";

static PG: OnceCell<Arc<EmbeddedPg>> = OnceCell::const_new();

/// Removes clusters left by earlier runs whose process is gone.
fn clean_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("jobsvc-test-")
            && let Ok(pid) = pid.parse::<i32>()
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A new private cluster under the temp directory, listening on a free loopback port. Not
/// durable (no fsync, asynchronous commit): fast, but a crash of PostgreSQL may lose the last
/// acknowledged commits; see [`new_durable_cluster`].
pub async fn new_cluster(tag: &str) -> EmbeddedPg {
    cluster(tag, false).await
}

/// Like [`new_cluster`], but with the default durability settings (synchronous commit), for
/// tests that crash PostgreSQL and then count acknowledged commits.
pub async fn new_durable_cluster(tag: &str) -> EmbeddedPg {
    cluster(tag, true).await
}

async fn cluster(tag: &str, durable: bool) -> EmbeddedPg {
    init_logs();
    // PostgreSQL's server binaries, installed by the test run itself where they are missing.
    crate::deps::ensure();
    let dir = std::env::temp_dir()
        .join(format!("jobsvc-test-{}", std::process::id()))
        .join(tag);
    let _ = std::fs::remove_dir_all(&dir);
    let pg = EmbeddedPg::init(
        &dir,
        PgOptions {
            tcp_port: Some(0),
            durable,
            max_connections: 400,
        },
    )
    .expect("a private PostgreSQL (is PostgreSQL installed? see README)");
    pg.start().await.expect("starting the private PostgreSQL");
    pg
}

/// Server logs in test output, filtered by TEST_LOG (e.g. TEST_LOG=debug); silent by default.
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TEST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// The cluster shared by every test of this binary.
pub async fn shared_pg() -> Arc<EmbeddedPg> {
    init_logs();
    PG.get_or_init(|| async {
        clean_stale_dirs();
        Arc::new(new_cluster("shared").await)
    })
    .await
    .clone()
}

/// A fresh, migrated database on `pg`; returns its URL.
pub async fn fresh_database(pg: &EmbeddedPg) -> String {
    let name = format!("t_{}", Uuid::new_v4().simple());
    pg.ensure_database(&name)
        .await
        .expect("creating a test database");
    let url = pg.url(&name);
    jobsvc::db::migrate(&url)
        .await
        .expect("migrating the test database");
    url
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub db_url: String,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// A server on its own database of the shared cluster.
    pub async fn start() -> Self {
        let pg = shared_pg().await;
        let url = fresh_database(&pg).await;
        Self::start_on(&url, &[]).await
    }

    /// A server on an existing, migrated database, with extra `serve` flags.
    pub async fn start_on(db_url: &str, extra: &[&str]) -> Self {
        Self::start_with_secret(db_url, SECRET, extra).await
    }

    /// A server whose current JWT secret is `secret` (for rotations).
    pub async fn start_with_secret(db_url: &str, secret: &str, extra: &[&str]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_listening(db_url, secret, listener, extra).await
    }

    /// A server on `addr` (a restart where clients look for the last one).
    pub async fn start_at(db_url: &str, addr: SocketAddr, extra: &[&str]) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        Self::start_listening(db_url, SECRET, listener, extra).await
    }

    async fn start_listening(
        db_url: &str,
        secret: &str,
        listener: TcpListener,
        extra: &[&str],
    ) -> Self {
        let mut argv = vec!["jobsvc", "--database-url", db_url, "--jwt-secret", secret];
        if !extra.contains(&"--pool-size") {
            argv.extend(["--pool-size", "8"]);
        }
        argv.extend_from_slice(extra);
        let args = ServeArgs::parse_args(argv).expect("test serve arguments");
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let url = db_url.to_owned();
        let secret = secret.to_owned();
        let handle = tokio::spawn(async move {
            jobsvc::app::run_server(&args, &url, secret.as_bytes(), listener, async {
                let _ = stopped.await;
            })
            .await
            .expect("server runs");
        });
        TestServer {
            addr,
            db_url: db_url.to_owned(),
            stop: Some(stop),
            handle: Some(handle),
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connecting to the test server")
    }

    /// A JobService client sending `token` (or none).
    pub async fn client(&self, token: Option<&str>) -> Client {
        JobServiceClient::with_interceptor(self.channel().await, Bearer::new(token))
    }

    pub async fn service(&self) -> Client {
        self.client(Some(&service_token())).await
    }

    pub async fn user(&self, user: Uuid) -> Client {
        self.client(Some(&user_token(user))).await
    }

    /// Graceful shutdown; waits for the server task to end.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(30), h)
                .await
                .expect("server stops within 30 s")
                .expect("server task ends cleanly");
        }
    }
}

pub type Client = JobServiceClient<InterceptedService<Channel, Bearer>>;

/// A CreateJob request for `agent` with no data.
pub fn create(agent: &str) -> jobsvc::pb::CreateJobRequest {
    jobsvc::pb::CreateJobRequest {
        agent_identifier: agent.into(),
        ..Default::default()
    }
}

/// Every job the client may see (up to 1,000: one page).
pub async fn all_jobs(c: &mut Client) -> Vec<jobsvc::pb::Job> {
    c.list_jobs(jobsvc::pb::ListJobsRequest {
        page_size: 1000,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .jobs
}

/// A job's history (the first 50 events).
pub async fn history(c: &mut Client, id: &str) -> Vec<jobsvc::pb::JobEvent> {
    c.list_job_events(jobsvc::pb::ListJobEventsRequest {
        job_id: id.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .events
}

/// An UpdateStatus request moving job `id` to `status`.
pub fn update(id: &str, status: jobsvc::pb::JobStatus) -> jobsvc::pb::UpdateStatusRequest {
    jobsvc::pb::UpdateStatusRequest {
        id: id.into(),
        status: status as i32,
        ..Default::default()
    }
}

#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Self {
        Bearer(token.map(|t| format!("Bearer {t}").parse().unwrap()))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub fn service_token() -> String {
    jobsvc::api::auth::issue(
        SECRET.as_bytes(),
        "service_role",
        None,
        Duration::from_secs(3600),
    )
}

pub fn user_token(user: Uuid) -> String {
    jobsvc::api::auth::issue(
        SECRET.as_bytes(),
        "authenticated",
        Some(user),
        Duration::from_secs(3600),
    )
}

/// Polls `check` every 50 ms until it holds, failing after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The ErrorInfo reason of a status (panics if there is none: every error must carry one).
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    let details = status.get_error_details();
    let info = details
        .error_info()
        .unwrap_or_else(|| panic!("status without ErrorInfo: {status:?}"));
    assert_eq!(info.domain, "jobsvc");
    info.reason.clone()
}

/// Asserts a call failed with `code` and ErrorInfo `reason`.
#[track_caller]
pub fn assert_err<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
    code: tonic::Code,
    want_reason: &str,
) -> tonic::Status {
    let status = result.expect_err("call should fail");
    assert_eq!(status.code(), code, "unexpected code: {status:?}");
    assert_eq!(
        reason(&status),
        want_reason,
        "unexpected reason: {status:?}"
    );
    assert!(!status.message().is_empty());
    status
}

/// A channel to `addr` that connects when first used, and reconnects after the server
/// restarts (for servers that are not a [`TestServer`], or that go away).
pub fn lazy_channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy()
}

/// A JobService client on `channel` sending `token`.
pub fn client_on(channel: Channel, token: &str) -> Client {
    JobServiceClient::with_interceptor(channel, Bearer::new(Some(token)))
}

/// A free loopback address (for a server started later on it).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `jobsvc serve` (the real binary) on `db_url` and `addr`, with `extra` flags; killed when
/// dropped. Warnings go to stderr unless the caller redirects it.
pub fn jobsvc_binary(db_url: &str, addr: SocketAddr, extra: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobsvc"));
    cmd.args(["serve", "--database-url", db_url, "--jwt-secret", SECRET])
        .args(["--listen", &addr.to_string()])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// The resident memory of process `pid`, in kB.
pub fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// The health service's answer for jobs.v1.JobService (None: no answer within 2 s).
pub async fn health(
    addr: SocketAddr,
) -> Option<tonic_health::pb::health_check_response::ServingStatus> {
    let mut h = tonic_health::pb::health_client::HealthClient::new(lazy_channel(addr));
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        h.check(tonic_health::pb::HealthCheckRequest {
            service: "jobs.v1.JobService".into(),
        }),
    )
    .await
    .ok()?
    .ok()?;
    tonic_health::pb::health_check_response::ServingStatus::try_from(r.into_inner().status).ok()
}

/// The first job a stream with `include_existing` sends (within 10 s).
pub async fn first_existing(c: &mut Client) -> jobsvc::pb::Job {
    let mut stream = c
        .stream_job_updates(jobsvc::pb::StreamJobUpdatesRequest {
            include_existing: true,
            ..Default::default()
        })
        .await
        .expect("the stream opens")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a first message within 10 s")
        .expect("the stream is healthy")
        .expect("the stream is open");
    match first.event {
        Some(jobsvc::pb::job_update::Event::Job(job)) => job,
        other => panic!("the first message is not an existing job: {other:?}"),
    }
}
