//! The soak test, kept out of the default run (`#[ignore]`): 1,000 streams across 100 users
//! for 15 minutes at 100 transitions a second against the jobsvc binary. Zero missed events,
//! zero events of another user, no event twice, and the server's memory flat.
//!
//! Run it with `scripts/soak` (SOAK_MINUTES=N for a shorter or longer run).
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jobsvc::pb::{self, JobStatus as S, job_update::Event as U};
use tokio::time::{Instant, timeout};
use tonic::transport::Channel;
use uuid::Uuid;

use crate::harness::{self, Client, eventually, fresh_database, shared_pg, update};

const USERS: usize = 100;
const STREAMS_PER_USER: usize = 10;
const TRANSITIONS_PER_SECOND: u64 = 100;
const CONNECTIONS: usize = 10;

#[derive(Default)]
struct Received {
    /// (job id, version) delivered to this stream, with how often.
    events: Mutex<HashMap<(String, i64), u32>>,
    foreign: AtomicU64,
    errors: Mutex<Vec<String>>,
    synced: AtomicU64,
}

async fn follow(c: Client, user: Uuid, got: Arc<Received>, latencies: Arc<Mutex<Vec<f64>>>) {
    let mut c = c;
    let mut stream = match c
        .stream_job_updates(pb::StreamJobUpdatesRequest::default())
        .await
    {
        Ok(s) => s.into_inner(),
        Err(s) => {
            got.errors.lock().unwrap().push(format!("open: {s:?}"));
            return;
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(u)) => match u.event {
                Some(U::Job(j)) => {
                    if j.user_id != user.to_string() {
                        got.foreign.fetch_add(1, Relaxed);
                    }
                    if let Some(t) = j.updated_at {
                        let at =
                            chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32).unwrap();
                        let ms = (chrono::Utc::now() - at).as_seconds_f64() * 1000.0;
                        latencies.lock().unwrap().push(ms);
                    }
                    *got.events
                        .lock()
                        .unwrap()
                        .entry((j.id, j.version))
                        .or_default() += 1;
                }
                Some(U::Synced(_)) => {
                    got.synced.fetch_add(1, Relaxed);
                }
                _ => {}
            },
            Ok(None) => return,
            Err(s) => {
                got.errors.lock().unwrap().push(format!("{s:?}"));
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a 15-minute soak: run with scripts/soak"]
async fn soak_1000_streams_100_users() {
    let minutes: f64 = std::env::var("SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(15.0);
    let duration = Duration::from_secs_f64(minutes * 60.0);
    let pg = shared_pg().await;
    let url = fresh_database(&pg).await;
    let addr = harness::free_addr();
    let mut child = harness::jobsvc_binary(&url, addr, &[]).spawn().unwrap();
    let pid = child.id().unwrap();
    let channels: Vec<Channel> = (0..CONNECTIONS)
        .map(|_| harness::lazy_channel(addr))
        .collect();
    let users: Vec<Uuid> = (0..USERS).map(|_| Uuid::new_v4()).collect();
    let client = |i: usize, user: Uuid| -> Client {
        harness::client_on(
            channels[i % CONNECTIONS].clone(),
            &harness::user_token(user),
        )
    };
    eventually(Duration::from_secs(30), "jobsvc answering", || {
        let mut c = client(0, users[0]);
        async move { c.get_stats(pb::GetStatsRequest::default()).await.is_ok() }
    })
    .await;
    let rss_idle = harness::rss_kb(pid);

    let latencies = Arc::new(Mutex::new(Vec::new()));
    let mut streams = Vec::new();
    for (u, user) in users.iter().enumerate() {
        for s in 0..STREAMS_PER_USER {
            let got = Arc::new(Received::default());
            tokio::spawn(follow(
                client(u * STREAMS_PER_USER + s, *user),
                *user,
                got.clone(),
                latencies.clone(),
            ));
            streams.push((*user, got));
        }
    }
    eventually(Duration::from_secs(60), "1,000 synced streams", || async {
        streams.iter().all(|(_, g)| g.synced.load(Relaxed) == 1)
    })
    .await;
    let rss_streams = harness::rss_kb(pid);

    // 100 transitions a second: each user moves one job a step (create, running, completed)
    // every second, the users a hundredth of a second apart.
    let started = Instant::now();
    let period = Duration::from_secs(USERS as u64) / TRANSITIONS_PER_SECOND as u32;
    let writers: Vec<_> = users
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let mut c = client(i, *u);
            let first = started + period * i as u32 / USERS as u32;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(first, period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut job: Option<(String, S)> = None;
                let mut n = 0u64;
                while started.elapsed() < duration {
                    tick.tick().await;
                    job = match job.take() {
                        None => {
                            let j = c.create_job(harness::create("soak")).await.unwrap();
                            Some((j.into_inner().id, S::Pending))
                        }
                        Some((id, S::Pending)) => {
                            c.update_status(update(&id, S::Running)).await.unwrap();
                            Some((id, S::Running))
                        }
                        Some((id, _)) => {
                            c.update_status(update(&id, S::Completed)).await.unwrap();
                            None
                        }
                    };
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut rss_samples = Vec::new();
    while started.elapsed() < duration {
        rss_samples.push((started.elapsed().as_secs(), harness::rss_kb(pid)));
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    let mut transitions = 0u64;
    for w in writers {
        transitions += w.await.unwrap();
    }
    rss_samples.push((started.elapsed().as_secs(), harness::rss_kb(pid)));
    let rate = transitions as f64 / started.elapsed().as_secs_f64();

    // Everything each stream should have: its user's events, from the database.
    let want = events_by_user(&url).await;
    let total: usize = want.values().map(HashSet::len).sum();
    let deadline = Instant::now() + Duration::from_secs(60);
    for (user, got) in &streams {
        let want = &want[&user.to_string()];
        loop {
            let have = got.events.lock().unwrap().len();
            let errors = got.errors.lock().unwrap().clone();
            assert!(errors.is_empty(), "stream of {user} failed: {errors:?}");
            if have >= want.len() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "a stream of {user} has {have} of {} events",
                want.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut missed = 0;
    let mut repeated = 0;
    let mut extra = 0;
    let mut foreign = 0;
    for (user, got) in &streams {
        let want = &want[&user.to_string()];
        let got_events = got.events.lock().unwrap();
        missed += want.iter().filter(|k| !got_events.contains_key(*k)).count();
        extra += got_events.keys().filter(|k| !want.contains(*k)).count();
        repeated += got_events.values().filter(|n| **n > 1).count();
        foreign += got.foreign.load(Relaxed);
    }
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
    let first_minute: Vec<u64> = rss_samples
        .iter()
        .filter(|(t, _)| *t < 60)
        .map(|(_, r)| *r)
        .collect();
    let rss_early = *first_minute.iter().max().unwrap();
    let rss_late = rss_samples.last().unwrap().1;
    let rss_peak = rss_samples.iter().map(|(_, r)| *r).max().unwrap();
    eprintln!(
        "soak: {minutes} min, {transitions} transitions ({rate:.1}/s), {total} events to {} streams \
         ({} deliveries): missed {missed}, repeated {repeated}, extra {extra}, cross-user {foreign}; \
         commit-to-stream p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; server RSS idle {rss_idle} kB, \
         with streams {rss_streams} kB, first minute max {rss_early} kB, last {rss_late} kB, peak {rss_peak} kB",
        streams.len(),
        lat.len(),
        pct(0.5),
        pct(0.99),
        lat[lat.len() - 1],
    );
    eprintln!("soak: RSS samples (s, kB): {rss_samples:?}");
    assert_eq!((missed, repeated, extra, foreign), (0, 0, 0, 0));
    // Flat: the end within 10% (plus 4 MB of allocator slack) of the first minute's peak.
    assert!(
        rss_late <= rss_early + rss_early / 10 + 4096,
        "memory grew: {rss_early} kB in the first minute, {rss_late} kB at the end"
    );
    child.start_kill().unwrap();
    let _ = timeout(Duration::from_secs(10), child.wait()).await;
}

/// Every event's (job id, version), by owner.
async fn events_by_user(url: &str) -> HashMap<String, HashSet<(String, i64)>> {
    use diesel_async::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        owner: String,
        #[diesel(sql_type = diesel::sql_types::Text)]
        id: String,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        version: i64,
    }
    let mut conn = jobsvc::db::connect(url).await.unwrap();
    let rows: Vec<Row> = diesel::sql_query(
        "SELECT user_id::text AS owner, job_id::text AS id, version FROM job_events",
    )
    .load(&mut conn)
    .await
    .unwrap();
    let mut out: HashMap<String, HashSet<(String, i64)>> = HashMap::new();
    for r in rows {
        out.entry(r.owner).or_default().insert((r.id, r.version));
    }
    out
}
