//! Faults inflicted on real processes while writers and streams run: database restarts (fast
//! and immediate), killed change-feed listener connections, network blackholes between jobsvc
//! and PostgreSQL, and `kill -9` of jobsvc itself.
//!
//! Afterwards: every acknowledged write is in the database; every job's history is exactly
//! pending, running, completed (no transition lost or applied twice); every stream, directly
//! or resumed from its last token, delivered every change of its scope exactly once and
//! nothing of anyone else's; calls during an outage answered UNAVAILABLE within 2 s and none
//! hung; health said NOT_SERVING during each outage and SERVING after.
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jobsvc::pb::{self, JobStatus as S, job_update::Event as U};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use uuid::Uuid;

use crate::harness::{
    self, Client, TestServer, eventually, fresh_database, health, new_cluster, new_durable_cluster,
    shared_pg, update,
};
use crate::proxy::{FaultProxy, Mode};

const AGENT: &str = "fault";
/// An UNAVAILABLE answer during an outage must come within this.
const FAIL_FAST: Duration = Duration::from_secs(2);
/// A call that takes longer counts as hung.
const HANG: Duration = Duration::from_secs(10);
/// Writers and streams per workload: one writer and one stream per user, plus one stream of
/// the service role over every user's jobs.
const USERS: usize = 3;

fn client(addr: SocketAddr, token: &str) -> Client {
    harness::client_on(harness::lazy_channel(addr), token)
}

async fn await_health(addr: SocketAddr, want: ServingStatus, within: Duration) {
    eventually(within, &format!("health {want:?}"), || async {
        health(addr).await == Some(want)
    })
    .await;
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    /// Writes answered OK.
    acked: AtomicU64,
    /// Acknowledged jobs and their owners.
    jobs: Mutex<HashMap<String, String>>,
    unavailable: AtomicU64,
    slowest_unavailable: Mutex<Duration>,
    /// Any answer other than OK or UNAVAILABLE, and any call that hung.
    unexpected: Mutex<Vec<String>>,
    /// Calls cut off by the server process dying (the client library's own errors, not
    /// answers); only expected where the test kills jobsvc.
    cut_off: AtomicU64,
    server_dies: bool,
}

impl Tally {
    /// Whether `s` is a call cut off by the server's death rather than an answer: the client
    /// library's transport error (it has a source; answers from the server have none).
    fn cut_off(&self, s: &tonic::Status) -> bool {
        let cut = self.server_dies && std::error::Error::source(s).is_some();
        if cut {
            self.cut_off.fetch_add(1, Relaxed);
        }
        cut
    }

    fn unexpected(&self, what: String) {
        let mut all = self.unexpected.lock().unwrap();
        if all.len() < 5 {
            eprintln!("unexpected: {what}");
        }
        all.push(what);
    }
}

/// Calls until OK, retrying UNAVAILABLE with backoff; records every other answer (and
/// retries it too, so one surprise does not stop the workload).
async fn until_ok<T, F, Fut>(tally: &Tally, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut backoff = Duration::from_millis(20);
    loop {
        let started = Instant::now();
        match timeout(HANG, call()).await {
            Ok(Ok(r)) => return r.into_inner(),
            Ok(Err(s)) if s.code() == Code::Unavailable => {
                tally.unavailable.fetch_add(1, Relaxed);
                let took = started.elapsed();
                let mut slowest = tally.slowest_unavailable.lock().unwrap();
                *slowest = (*slowest).max(took);
            }
            Ok(Err(s)) if tally.cut_off(&s) => {}
            Ok(Err(s)) => tally.unexpected(format!("{s:?}")),
            Err(_) => tally.unexpected(format!("a call hung for {HANG:?}")),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// One user's writer: create (with a request_id), running, completed (each with the version
/// it expects), ten jobs a second, every step retried until acknowledged.
async fn writer(
    addr: SocketAddr,
    user: Uuid,
    w: usize,
    tally: Arc<Tally>,
    stop: watch::Receiver<bool>,
) {
    let c = client(addr, &harness::user_token(user));
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0.. {
        tick.tick().await;
        if *stop.borrow() {
            return;
        }
        let req = pb::CreateJobRequest {
            agent_identifier: AGENT.into(),
            request_id: format!("w{w}-{n}"),
            ..Default::default()
        };
        let job = until_ok(&tally, || {
            let (mut c, req) = (c.clone(), req.clone());
            async move { c.create_job(req).await }
        })
        .await;
        tally
            .jobs
            .lock()
            .unwrap()
            .insert(job.id.clone(), user.to_string());
        tally.acked.fetch_add(1, Relaxed);
        for (status, from_version) in [(S::Running, 1), (S::Completed, 2)] {
            let mut req = update(&job.id, status);
            req.expected_version = Some(from_version);
            let moved = until_ok(&tally, || {
                let (mut c, req) = (c.clone(), req.clone());
                async move { c.update_status(req).await }
            })
            .await;
            if moved.version != from_version + 1 {
                tally.unexpected(format!("{status:?} answered version {}", moved.version));
            }
            tally.acked.fetch_add(1, Relaxed);
        }
    }
}

/// What one stream delivered.
#[derive(Default)]
struct Seen {
    /// Deliveries per (job id, version).
    events: Mutex<HashMap<(String, i64), u32>>,
    /// Jobs of other users (a user's stream must see none).
    foreign: Mutex<Vec<String>>,
    /// The last resume token (set once the stream is synced).
    token: Mutex<String>,
    reopened: AtomicU64,
}

/// Follows the workload's jobs: the service role over everyone's, or one user over its own;
/// on UNAVAILABLE it resumes from its last token.
async fn follow(
    addr: SocketAddr,
    token: String,
    user: Option<Uuid>,
    seen: Arc<Seen>,
    tally: Arc<Tally>,
) {
    let c = client(addr, &token);
    loop {
        let req = pb::StreamJobUpdatesRequest {
            agent_identifier: AGENT.into(),
            resume_token: seen.token.lock().unwrap().clone(),
            ..Default::default()
        };
        let mut stream = until_ok(&tally, || {
            let (mut c, req) = (c.clone(), req.clone());
            async move { c.stream_job_updates(req).await }
        })
        .await;
        loop {
            match stream.message().await {
                Ok(Some(u)) => {
                    if let Some(U::Job(j)) = u.event {
                        if user.is_some_and(|u| j.user_id != u.to_string()) {
                            seen.foreign.lock().unwrap().push(j.id.clone());
                        }
                        *seen
                            .events
                            .lock()
                            .unwrap()
                            .entry((j.id, j.version))
                            .or_default() += 1;
                    }
                    if !u.resume_token.is_empty() {
                        *seen.token.lock().unwrap() = u.resume_token;
                    }
                }
                Ok(None) => {
                    tally.unexpected("a stream ended without a status".into());
                    break;
                }
                Err(s) if s.code() == Code::Unavailable || tally.cut_off(&s) => break,
                Err(s) => {
                    tally.unexpected(format!("stream: {s:?}"));
                    break;
                }
            }
        }
        seen.reopened.fetch_add(1, Relaxed);
    }
}

/// Writers on `write_addr` and streams on `stream_addr`, running until [`Workload::finish`].
struct Workload {
    tally: Arc<Tally>,
    users: Vec<Uuid>,
    streams: Vec<(Option<Uuid>, Arc<Seen>)>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    followers: Vec<JoinHandle<()>>,
}

impl Workload {
    /// Opens the streams, waits until each is synced, then starts the writers.
    async fn start(write_addr: SocketAddr, stream_addr: SocketAddr, server_dies: bool) -> Self {
        let tally = Arc::new(Tally {
            server_dies,
            ..Default::default()
        });
        let users: Vec<Uuid> = (0..USERS).map(|_| Uuid::new_v4()).collect();
        let mut streams = vec![(None, Arc::new(Seen::default()))];
        streams.extend(users.iter().map(|u| (Some(*u), Arc::new(Seen::default()))));
        let followers = streams
            .iter()
            .map(|(user, seen)| {
                let token = match user {
                    None => harness::service_token(),
                    Some(u) => harness::user_token(*u),
                };
                tokio::spawn(follow(
                    stream_addr,
                    token,
                    *user,
                    seen.clone(),
                    tally.clone(),
                ))
            })
            .collect();
        for (_, seen) in &streams {
            eventually(Duration::from_secs(15), "a synced stream", || async {
                !seen.token.lock().unwrap().is_empty()
            })
            .await;
        }
        let (stop, stopped) = watch::channel(false);
        let tasks = users
            .iter()
            .enumerate()
            .map(|(w, u)| tokio::spawn(writer(write_addr, *u, w, tally.clone(), stopped.clone())))
            .collect();
        Workload {
            tally,
            users,
            streams,
            stop,
            tasks,
            followers,
        }
    }

    /// Waits until `n` more writes are acknowledged (the service works again).
    async fn progress(&self, n: u64, within: Duration) {
        let from = self.tally.acked.load(Relaxed);
        eventually(within, &format!("{n} more acknowledged writes"), || async {
            self.tally.acked.load(Relaxed) >= from + n
        })
        .await;
    }

    /// Stops the writers (each finishes the job it is moving) and checks everything.
    async fn finish(self, db_url: &str) {
        self.stop.send_replace(true);
        let tally = &self.tally;
        for t in self.tasks {
            if timeout(Duration::from_secs(60), t).await.is_err() {
                let n = tally.unexpected.lock().unwrap().len();
                panic!("a writer did not finish its last job within 60 s; {n} unexpected answers");
            }
        }
        let unexpected = tally.unexpected.lock().unwrap().clone();
        assert!(unexpected.is_empty(), "unexpected answers: {unexpected:#?}");
        let slowest = *tally.slowest_unavailable.lock().unwrap();
        assert!(
            slowest < FAIL_FAST,
            "an UNAVAILABLE answer took {slowest:?} (of {})",
            tally.unavailable.load(Relaxed)
        );

        // The database: every acknowledged job, each exactly pending -> running -> completed.
        let acked = tally.jobs.lock().unwrap().clone();
        let history = histories(db_url).await;
        assert_eq!(
            history.keys().collect::<HashSet<_>>(),
            acked.keys().collect::<HashSet<_>>(),
            "the jobs in the database are exactly the acknowledged ones (one per request_id)"
        );
        for (id, (owner, steps)) in &history {
            assert_eq!(owner, &acked[id], "job {id} kept its owner");
            assert_eq!(
                steps,
                &[
                    (1, "pending".to_owned()),
                    (2, "running".into()),
                    (3, "completed".into())
                ],
                "job {id}: one event per transition, none lost or repeated"
            );
        }

        // Every stream: all of its scope's events, once each, nothing else.
        for (user, seen) in &self.streams {
            let want: HashSet<(String, i64)> = history
                .iter()
                .filter(|(_, (owner, _))| user.is_none_or(|u| *owner == u.to_string()))
                .flat_map(|(id, (_, steps))| steps.iter().map(move |(v, _)| (id.clone(), *v)))
                .collect();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let missing: Vec<_> = {
                    let got = seen.events.lock().unwrap();
                    want.iter()
                        .filter(|k| !got.contains_key(*k))
                        .cloned()
                        .collect()
                };
                if missing.is_empty() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "stream {user:?} (reopened {} times) misses {} of {} events, e.g. {:?}",
                    seen.reopened.load(Relaxed),
                    missing.len(),
                    want.len(),
                    &missing[..missing.len().min(5)]
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let got = seen.events.lock().unwrap();
            let extra: Vec<_> = got.keys().filter(|k| !want.contains(*k)).collect();
            assert!(extra.is_empty(), "stream {user:?} delivered {extra:?}");
            let repeated: Vec<_> = got.iter().filter(|(_, n)| **n > 1).collect();
            assert!(repeated.is_empty(), "stream {user:?} repeated {repeated:?}");
            assert!(seen.foreign.lock().unwrap().is_empty());
        }
        for f in self.followers {
            f.abort();
        }
        eprintln!(
            "workload: {} jobs, {} writes acknowledged, {} UNAVAILABLE answers (slowest {slowest:?}), {} calls cut off, streams reopened {:?}, users {}",
            acked.len(),
            tally.acked.load(Relaxed),
            tally.unavailable.load(Relaxed),
            tally.cut_off.load(Relaxed),
            self.streams
                .iter()
                .map(|(_, s)| s.reopened.load(Relaxed))
                .collect::<Vec<_>>(),
            self.users.len(),
        );
    }
}

/// Each workload job's owner and (version, status) history, straight from the database.
async fn histories(db_url: &str) -> HashMap<String, (String, Vec<(i64, String)>)> {
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        id: String,
        #[diesel(sql_type = diesel::sql_types::Text)]
        owner: String,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        version: i64,
        #[diesel(sql_type = diesel::sql_types::Text)]
        status: String,
    }
    use diesel_async::RunQueryDsl;
    let mut conn = jobsvc::db::connect(db_url).await.unwrap();
    let rows: Vec<Row> = diesel::sql_query(
        "SELECT j.id::text AS id, j.user_id::text AS owner, e.version, e.status::text AS status \
         FROM jobs j LEFT JOIN job_events e ON e.job_id = j.id \
         WHERE j.agent_identifier = 'fault' ORDER BY j.id, e.feed_xid, e.seq",
    )
    .load(&mut conn)
    .await
    .unwrap();
    let mut out: HashMap<String, (String, Vec<(i64, String)>)> = HashMap::new();
    for r in rows {
        out.entry(r.id)
            .or_insert_with(|| (r.owner, Vec::new()))
            .1
            .push((r.version, r.status));
    }
    out
}

/// Ten restarts of PostgreSQL, alternating fast (`pg_ctl stop -m fast`) and immediate (crash
/// recovery on start), each right in the middle of the load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_restarts_lose_nothing() {
    // Synchronous commit: with it off, an immediate shutdown loses the last acknowledged
    // commits (this test caught that before it used a durable cluster).
    let pg = new_durable_cluster("restarts").await;
    let url = fresh_database(&pg).await;
    let server = TestServer::start_on(&url, &[]).await;
    let load = Workload::start(server.addr, server.addr, false).await;
    for round in 0..10 {
        load.progress(30, Duration::from_secs(30)).await;
        if round % 2 == 0 {
            pg.stop().await;
        } else {
            pg.stop_immediate().await;
        }
        await_health(
            server.addr,
            ServingStatus::NotServing,
            Duration::from_secs(3),
        )
        .await;
        pg.start().await.unwrap();
        await_health(server.addr, ServingStatus::Serving, Duration::from_secs(5)).await;
    }
    load.progress(30, Duration::from_secs(30)).await;
    load.finish(&url).await;
    server.stop().await;
    pg.stop().await;
}

/// The `application_name` jobsvc gives its change-feed listener connections.
/// The backends of this database whose `application_name` is `name`.
async fn backend_pids(conn: &mut diesel_async::AsyncPgConnection, name: &str) -> Vec<i32> {
    #[derive(diesel::QueryableByName)]
    struct Pid {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        pid: i32,
    }
    use diesel_async::RunQueryDsl;
    let rows: Vec<Pid> = diesel::sql_query(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()",
    )
    .bind::<diesel::sql_types::Text, _>(name)
    .load(conn)
    .await
    .unwrap();
    rows.into_iter().map(|r| r.pid).collect()
}

/// Terminates these backends, as an operator's `pg_terminate_backend` or a crash would.
async fn terminate_backends(conn: &mut diesel_async::AsyncPgConnection, pids: &[i32]) {
    use diesel_async::RunQueryDsl;
    for pid in pids {
        diesel::sql_query("SELECT pg_terminate_backend($1)")
            .bind::<diesel::sql_types::Integer, _>(*pid)
            .execute(&mut *conn)
            .await
            .unwrap();
    }
}

/// Writers on replica A, streams on replica B, whose poll is 60 s: B learns of A's commits
/// only by NOTIFY. Fifty times, both listener connections are terminated in the middle of
/// the load; each time B must reconnect and catch up what it missed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_listener_connections_lose_nothing() {
    let pg = shared_pg().await;
    let url = fresh_database(&pg).await;
    let a = TestServer::start_on(&url, &[]).await;
    let b = TestServer::start_on(&url, &["--feed-poll-interval", "60s"]).await;
    let load = Workload::start(a.addr, b.addr, false).await;
    let mut admin = jobsvc::db::connect(&url).await.unwrap();
    for _ in 0..50 {
        load.progress(6, Duration::from_secs(30)).await;
        let before = backend_pids(&mut admin, jobsvc::feed::LISTENER_NAME).await;
        assert_eq!(before.len(), 2, "one listener per replica");
        terminate_backends(&mut admin, &before).await;
        eventually(
            Duration::from_secs(10),
            "both listeners reconnected",
            || async {
                let now = backend_pids(
                    &mut jobsvc::db::connect(&url).await.unwrap(),
                    jobsvc::feed::LISTENER_NAME,
                )
                .await;
                now.len() == 2 && now.iter().all(|p| !before.contains(p))
            },
        )
        .await;
    }
    load.progress(6, Duration::from_secs(30)).await;
    assert_eq!(health(b.addr).await, Some(ServingStatus::Serving));
    load.finish(&url).await;
    a.stop().await;
    b.stop().await;
}

/// Twenty blackholes of 10 s between jobsvc and PostgreSQL (every byte held, both ways, as a
/// partition or a hung server looks to a client), and a few resets of every connection. During
/// each blackhole health says NOT_SERVING and a call answers UNAVAILABLE within 2 s; after it,
/// the load goes on. Then a slow network (100 ms each way per packet) is not an outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholes_fail_fast_and_lose_nothing() {
    let pg = new_cluster("blackholes").await;
    let url = fresh_database(&pg).await;
    let upstream: SocketAddr = format!("127.0.0.1:{}", pg.port()).parse().unwrap();
    let proxy = FaultProxy::start(upstream).await;
    let server = TestServer::start_on(&proxy.url(&url, upstream), &[]).await;
    let load = Workload::start(server.addr, server.addr, false).await;
    let mut probe = server.service().await;
    let mut user = server.user(Uuid::new_v4()).await;
    // Not the workload's agent: the final check reads the workload's jobs by agent.
    let probe_job = probe
        .create_job(pb::CreateJobRequest {
            agent_identifier: "fault-probe".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    for round in 0..20 {
        load.progress(15, Duration::from_secs(30)).await;
        proxy.set(Mode::Blackhole);
        let started = Instant::now();
        await_health(
            server.addr,
            ServingStatus::NotServing,
            Duration::from_secs(3),
        )
        .await;
        let asked = Instant::now();
        let status = probe
            .get_stats(pb::GetStatsRequest::default())
            .await
            .expect_err("no answer from a blackholed database");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(asked.elapsed() < FAIL_FAST);
        // Hold the blackhole for 10 s in all, then let the bytes through again.
        tokio::time::sleep_until(started + Duration::from_secs(10)).await;
        if round % 5 == 4 {
            proxy.reset_all();
        }
        proxy.set(Mode::Pass);
        await_health(server.addr, ServingStatus::Serving, Duration::from_secs(5)).await;
        // The reads' own connections (the service role's lanes, the users' read pool) were
        // let go with the outage: reads answer at once, not from a connection stuck on the
        // blackholed socket.
        let read = timeout(
            FAIL_FAST,
            probe.get_job(pb::GetJobRequest {
                id: probe_job.clone(),
            }),
        )
        .await
        .expect("GetJob hung after the outage");
        assert_eq!(
            read.expect("GetJob after the outage").into_inner().id,
            probe_job
        );
        timeout(FAIL_FAST, user.list_jobs(pb::ListJobsRequest::default()))
            .await
            .expect("a user's ListJobs hung after the outage")
            .expect("a user's ListJobs after the outage");
    }
    proxy.set(Mode::Delay(Duration::from_millis(100)));
    let from = load.tally.acked.load(Relaxed);
    load.progress(15, Duration::from_secs(30)).await;
    assert_eq!(health(server.addr).await, Some(ServingStatus::Serving));
    assert!(load.tally.acked.load(Relaxed) > from);
    proxy.set(Mode::Pass);
    load.progress(15, Duration::from_secs(30)).await;
    load.finish(&url).await;
    server.stop().await;
    pg.stop().await;
}

/// `kill -9` of the jobsvc process in the middle of the load, then a new process on the same
/// address: nothing it acknowledged is lost, and the streams resume from their tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_jobsvc_loses_nothing_committed() {
    let pg = shared_pg().await;
    let url = fresh_database(&pg).await;
    let addr = harness::free_addr();
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        harness::jobsvc_binary(&url, addr, &[])
            .stderr(std::fs::File::create(dir.path().join("jobsvc.log")).unwrap())
            .spawn()
            .expect("running the jobsvc binary")
    };
    let mut child = start();
    await_health(addr, ServingStatus::Serving, Duration::from_secs(30)).await;
    let load = Workload::start(addr, addr, true).await;
    for _ in 0..3 {
        load.progress(60, Duration::from_secs(30)).await;
        child.start_kill().unwrap();
        child.wait().await.unwrap();
        child = start();
        await_health(addr, ServingStatus::Serving, Duration::from_secs(30)).await;
    }
    load.progress(60, Duration::from_secs(30)).await;
    load.finish(&url).await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

/// The service role's GetJob calls share pipelined connections (lanes). Terminating those
/// connections under load costs at most the calls in flight on them (answered with an
/// error, never hung); the lanes are replaced and every later call succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_lane_connections_are_replaced() {
    let pg = shared_pg().await;
    let url = fresh_database(&pg).await;
    let server = TestServer::start_on(&url, &["--read-lanes", "2"]).await;
    let svc = server.service().await;
    let id = svc
        .clone()
        .create_job(pb::CreateJobRequest {
            agent_identifier: AGENT.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    let get_many = |n: usize| {
        let (svc, id) = (svc.clone(), id.clone());
        async move {
            let calls = (0..n).map(|_| {
                let (mut svc, id) = (svc.clone(), id.clone());
                async move {
                    timeout(HANG, svc.get_job(pb::GetJobRequest { id }))
                        .await
                        .expect("a GetJob hung")
                        .map(|r| r.into_inner().id)
                }
            });
            futures_util::future::join_all(calls).await
        }
    };
    for answer in get_many(64).await {
        assert_eq!(answer.unwrap(), id);
    }
    let mut admin = jobsvc::db::connect(&url).await.unwrap();
    for round in 0..5 {
        let lanes = backend_pids(&mut admin, jobsvc::db::LANE_NAME).await;
        assert!(!lanes.is_empty(), "round {round}: the lanes are open");
        let load = tokio::spawn(get_many(200));
        terminate_backends(&mut admin, &lanes).await;
        // Calls in flight on a killed lane may fail, with UNAVAILABLE (retry with backoff);
        // none hangs (get_many times out).
        let answers = load.await.unwrap();
        let failed: Vec<Code> = answers
            .iter()
            .filter_map(|a| a.as_ref().err().map(|s| s.code()))
            .collect();
        eprintln!(
            "round {round}: {} of 200 calls failed with their lane",
            failed.len()
        );
        assert!(
            failed.iter().all(|c| *c == Code::Unavailable),
            "round {round}: {failed:?}"
        );
        // Once the lanes are replaced, every call succeeds.
        eventually(
            Duration::from_secs(10),
            "GetJob succeeds again",
            || async move { get_many(8).await.iter().all(|a| a.is_ok()) },
        )
        .await;
        for answer in get_many(200).await {
            assert_eq!(
                answer.unwrap(),
                id,
                "round {round}: after the lanes were replaced"
            );
        }
    }
    server.stop().await;
}
