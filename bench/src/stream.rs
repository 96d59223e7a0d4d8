//! `--scenario stream`: the change feed under load, beside raw LISTEN/NOTIFY on the same
//! database.
//!
//! - Write throughput (CreateJob, and the create/running/completed lifecycle) with live
//!   subscribers divided by the same without: 10 subscribers to every change, and 1,000
//!   subscribers each following an agent nobody writes (filtered out by the feed's index,
//!   none delivered). Three alternating rounds, medians.
//! - Commit-to-subscriber latency at a paced 1,000 changes/s: with 1 subscriber to every
//!   change, and with 1,000 subscribers each following one of 1,000 agents the writer
//!   round-robins (1,000 deliveries/s in all). Latency is the subscriber's wall clock at
//!   receipt minus the creating transaction's commit timestamp (`track_commit_timestamp`,
//!   the same machine's clock).
//! - The most changes/s delivered to 1,000 subscribers of every change without falling
//!   behind (p99 latency under 1 s and every change delivered), by doubling the rate.
//! - Server memory per idle stream: a separate `jobsvc` process, its RSS before and after
//!   opening 1,000 idle streams.
//! - Raw LISTEN/NOTIFY latency on the same database at 1,000 notifications/s.
//!
//! Subscribers run in the bench process, on the same 2 cores as the server and PostgreSQL:
//! the receiving side's cost is in every figure.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use diesel_async::RunQueryDsl;
use futures_util::StreamExt;
use jobsvc::pb;
use jobsvc::pb::job_service_client::JobServiceClient;
use jobsvc::pb::job_update::Event as U;
use tokio::sync::watch;
use tonic::transport::Channel;

use super::{
    Args, Auth, Client, Env, client, create_call, drive, lifecycle_call, secret, spawn_server,
    stop_server,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Streams per HTTP/2 connection (the server allows 256).
const STREAMS_PER_CONNECTION: usize = 100;

pub async fn run(args: &Args, env: &Env) -> Result<(), BoxError> {
    let mut report = serde_json::Map::new();
    let mut put = |k: &str, v: serde_json::Value| {
        eprintln!("{k}: {v}");
        report.insert(k.into(), v);
    };

    // 1. Write throughput with and without subscribers: the three set-ups alternate, three
    //    rounds, medians (the machine's noise between runs is larger than the effect).
    let setups: [(&str, usize, Option<&str>); 3] = [
        ("no_subscribers", 0, None),
        ("10_all", 10, None),
        ("1000_filtered", 1000, Some("nobody")),
    ];
    let mut create: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut life: HashMap<&str, Vec<f64>> = HashMap::new();
    for round in 0..3 {
        for (label, n, agent) in setups {
            let subs = Subscribers::open(env.addr, n, |_| pb::StreamJobUpdatesRequest {
                agent_identifier: agent.unwrap_or_default().into(),
                ..Default::default()
            })
            .await?;
            let c = create_rps(args, env).await;
            let l = lifecycle_rps(args, env).await;
            eprintln!(
                "  round {round} {label}: create {c:.0}/s, lifecycle {l:.0}/s, delivered {}",
                subs.delivered()
            );
            subs.close().await;
            create.entry(label).or_default().push(c);
            life.entry(label).or_default().push(l);
        }
    }
    let base_create = median(&create["no_subscribers"]);
    let base_life = median(&life["no_subscribers"]);
    for (label, _, _) in setups {
        let (c, l) = (median(&create[label]), median(&life[label]));
        put(&format!("create_rps_{label}"), c.into());
        put(&format!("lifecycle_rps_{label}"), l.into());
        if label != "no_subscribers" {
            put(&format!("create_ratio_{label}"), (c / base_create).into());
            put(&format!("lifecycle_ratio_{label}"), (l / base_life).into());
        }
    }

    // 2. Latency at 1,000 changes/s.
    let one = Subscribers::open(env.addr, 1, |_| Default::default()).await?;
    let (rate, lat) = paced(env, 1000.0, args.duration, &one, 1.0, |n| {
        format!("bench-{}", n % 10)
    })
    .await;
    put("latency_1_sub_rate", rate.into());
    put("latency_1_sub_p50_ms", lat.p50.into());
    put("latency_1_sub_p99_ms", lat.p99.into());
    put("latency_1_sub_delivered_share", lat.delivered_share.into());
    one.close().await;
    let per_agent = Subscribers::open(env.addr, 1000, |i| pb::StreamJobUpdatesRequest {
        agent_identifier: format!("agent-{i}"),
        ..Default::default()
    })
    .await?;
    let (rate, lat) = paced(env, 1000.0, args.duration, &per_agent, 1.0, |n| {
        format!("agent-{}", n % 1000)
    })
    .await;
    put("latency_1000_subs_rate", rate.into());
    put("latency_1000_subs_p50_ms", lat.p50.into());
    put("latency_1000_subs_p99_ms", lat.p99.into());
    put(
        "latency_1000_subs_delivered_share",
        lat.delivered_share.into(),
    );
    per_agent.close().await;

    // 3. Fan-out limit: 1,000 subscribers of every change.
    let all = Subscribers::open(env.addr, 1000, |_| Default::default()).await?;
    let mut best = 0.0;
    let mut rate = 25.0;
    while rate <= 3200.0 {
        let (achieved, lat) = paced(env, rate, Duration::from_secs(5), &all, 1000.0, |_| {
            "fan".into()
        })
        .await;
        eprintln!(
            "  fan-out {rate} changes/s: achieved {achieved:.0}, p50 {:.1} ms, p99 {:.1} ms, delivered {:.4}",
            lat.p50, lat.p99, lat.delivered_share
        );
        put(
            &format!("fanout_1000_subs_at_{rate}_p99_ms"),
            lat.p99.into(),
        );
        if lat.p99 >= 1000.0 || lat.delivered_share < 1.0 {
            break;
        }
        best = f64::max(best, achieved);
        if achieved < rate * 0.8 {
            // The machine cannot create faster while delivering: that is the limit.
            break;
        }
        rate *= 2.0;
    }
    all.close().await;
    put("fanout_1000_subs_max_changes_per_s", best.into());
    put(
        "fanout_1000_subs_max_deliveries_per_s",
        (best * 1000.0).into(),
    );

    // 4. Memory per idle stream, in a separate server process.
    match memory_per_stream(env, 1000).await {
        Ok((idle, bytes)) => {
            put("server_idle_rss_bytes", idle.into());
            put("server_bytes_per_idle_stream", bytes.into());
        }
        Err(e) => eprintln!("memory per stream: {e}"),
    }

    // 5. Raw LISTEN/NOTIFY.
    let (p50, p99) = listen_notify(env, 1000.0, args.duration).await?;
    put("listen_notify_p50_ms", p50.into());
    put("listen_notify_p99_ms", p99.into());

    println!("{}", serde_json::Value::Object(report));
    Ok(())
}

async fn create_rps(args: &Args, env: &Env) -> f64 {
    let clients = clients(env, args.concurrency).await;
    drive(args, move |w, _| {
        create_call(clients[w].clone(), "bench".into(), String::new())
    })
    .await
    .rps
}

async fn lifecycle_rps(args: &Args, env: &Env) -> f64 {
    let clients = clients(env, args.concurrency).await;
    drive(args, move |w, _| lifecycle_call(clients[w].clone()))
        .await
        .rps
}

async fn clients(env: &Env, n: usize) -> Arc<Vec<Client>> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(client(env.addr, "service_role", None).await);
    }
    Arc::new(v)
}

/// (job id, received at in µs since the epoch) samples of one subscriber.
type Sink = Arc<Mutex<Vec<(u128, u64)>>>;

/// Open streams, each drained by its own task that records latencies while `recording`.
struct Subscribers {
    delivered: Arc<AtomicU64>,
    recording: watch::Sender<bool>,
    /// One sample sink per subscriber (uncontended locks): (job id, received at, µs since
    /// the epoch).
    samples: Vec<Sink>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stop: watch::Sender<bool>,
}

impl Subscribers {
    async fn open(
        addr: std::net::SocketAddr,
        n: usize,
        request: impl Fn(usize) -> pb::StreamJobUpdatesRequest,
    ) -> Result<Self, BoxError> {
        let token = jobsvc::api::auth::issue(
            secret().as_bytes(),
            "service_role",
            None,
            Duration::from_secs(24 * 3600),
        );
        let auth = Auth(format!("Bearer {token}").parse()?);
        let delivered = Arc::new(AtomicU64::new(0));
        let (recording, recording_rx) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut samples = Vec::new();
        let mut channel = None;
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(n.max(1));
        for i in 0..n {
            if i % STREAMS_PER_CONNECTION == 0 {
                channel = Some(
                    Channel::from_shared(format!("http://{addr}"))?
                        .connect()
                        .await?,
                );
            }
            let mut c = JobServiceClient::with_interceptor(
                channel.clone().expect("made above"),
                auth.clone(),
            );
            let req = request(i);
            let delivered = delivered.clone();
            let recording = recording_rx.clone();
            let mut stop = stop_rx.clone();
            let ready = ready_tx.clone();
            let sink = Arc::new(Mutex::new(Vec::new()));
            samples.push(sink.clone());
            tasks.push(tokio::spawn(async move {
                let Ok(resp) = c.stream_job_updates(req).await else {
                    return;
                };
                let mut s = resp.into_inner();
                loop {
                    tokio::select! {
                        m = s.message() => match m {
                            Ok(Some(u)) => match u.event {
                                Some(U::Job(j)) => {
                                    delivered.fetch_add(1, Ordering::Relaxed);
                                    if *recording.borrow() {
                                        let id = uuid::Uuid::parse_str(&j.id).map_or(0, |u| u.as_u128());
                                        sink.lock().unwrap().push((id, now_micros()));
                                    }
                                }
                                Some(U::Synced(_)) => { let _ = ready.send(()).await; }
                                _ => {}
                            },
                            _ => return,
                        },
                        _ = stop.changed() => return,
                    }
                }
            }));
        }
        for _ in 0..n {
            ready_rx.recv().await;
        }
        Ok(Subscribers {
            delivered,
            recording,
            samples,
            tasks,
            stop,
        })
    }

    fn delivered(&self) -> u64 {
        AtomicU64::load(&self.delivered, Ordering::Relaxed)
    }

    async fn close(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }

    fn record(&self) {
        let _ = self.recording.send(true);
    }

    /// Stops recording and takes every sample.
    fn take(&self) -> Vec<(u128, u64)> {
        let _ = self.recording.send(false);
        let mut all = Vec::new();
        for s in &self.samples {
            all.append(&mut s.lock().unwrap());
        }
        all
    }
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// Commit time (µs since the epoch) of the transaction that created each job
/// (`track_commit_timestamp` is on in the bench cluster; created jobs are never updated in
/// these runs, so the row's xmin is the creating transaction).
async fn commit_times(env: &Env, ids: Vec<uuid::Uuid>) -> HashMap<u128, u64> {
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Uuid)]
        id: uuid::Uuid,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        at: i64,
    }
    let Ok(mut conn) = jobsvc::db::connect(&env.url).await else {
        return HashMap::new();
    };
    let rows: Vec<Row> = diesel::sql_query(
        "SELECT id, (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1000000)::int8 AS at \
         FROM jobs WHERE id = ANY($1)",
    )
    .bind::<diesel::sql_types::Array<diesel::sql_types::Uuid>, _>(ids)
    .load(&mut conn)
    .await
    .unwrap_or_default();
    rows.into_iter()
        .map(|r| (r.id.as_u128(), r.at as u64))
        .collect()
}

struct Latency {
    p50: f64,
    p99: f64,
    delivered_share: f64,
}

/// Creates jobs at `rate` per second for `duration` (agent chosen by `agent(n)`), with the
/// subscribers recording, each change going to `fan_out` of them; returns the achieved rate
/// and what the subscribers saw.
async fn paced(
    env: &Env,
    rate: f64,
    duration: Duration,
    subs: &Subscribers,
    fan_out: f64,
    agent: impl Fn(u64) -> String + Send + Sync + 'static,
) -> (f64, Latency) {
    const WORKERS: usize = 128;
    let clients = clients(env, WORKERS).await;
    let agent = Arc::new(agent);
    let before = subs.delivered();
    subs.record();
    let created = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let c = clients[w].clone();
        let agent = agent.clone();
        let created = created.clone();
        tasks.push(tokio::spawn(async move {
            // Staggered, so the workers together tick evenly rather than in bursts.
            let first =
                tokio::time::Instant::from_std(started) + Duration::from_secs_f64(w as f64 / rate);
            let mut tick =
                tokio::time::interval_at(first, Duration::from_secs_f64(WORKERS as f64 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = w as u64;
            while started.elapsed() < duration {
                tick.tick().await;
                if create_call(c.clone(), agent(n), String::new()).await {
                    created.fetch_add(1, Ordering::Relaxed);
                }
                n += WORKERS as u64;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let achieved =
        AtomicU64::load(&created, Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    // Everything created must arrive: wait up to 2 s for the stragglers.
    let expected = AtomicU64::load(&created, Ordering::Relaxed) as f64 * fan_out;
    let deadline = Instant::now() + Duration::from_secs(2);
    while ((subs.delivered() - before) as f64) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let delivered = (subs.delivered() - before) as f64;
    let samples = subs.take();
    let ids: std::collections::HashSet<u128> = samples.iter().map(|(id, _)| *id).collect();
    let committed = commit_times(env, ids.into_iter().map(uuid::Uuid::from_u128).collect()).await;
    let lat: Vec<u32> = samples
        .iter()
        .filter_map(|(id, at)| committed.get(id).map(|c| at.saturating_sub(*c) as u32))
        .collect();
    (
        achieved,
        Latency {
            p50: pct(&lat, 0.50),
            p99: pct(&lat, 0.99),
            delivered_share: if expected > 0.0 {
                delivered / expected
            } else {
                1.0
            },
        },
    )
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn pct(sorted_or_not: &[u32], p: f64) -> f64 {
    if sorted_or_not.is_empty() {
        return 0.0;
    }
    let mut v = sorted_or_not.to_vec();
    v.sort_unstable();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)] as f64 / 1000.0
}

/// Part 4 of the report alone (scenario `stream-memory`).
pub async fn memory(env: &Env) -> Result<(), BoxError> {
    let (idle, bytes) = memory_per_stream(env, 1000).await?;
    let report = serde_json::json!({
        "server_idle_rss_bytes": idle,
        "server_bytes_per_idle_stream": bytes,
    });
    println!("{report}");
    Ok(())
}

/// The RSS of a separate, idle `jobsvc serve`, and its growth per idle stream.
async fn memory_per_stream(env: &Env, n: usize) -> Result<(u64, f64), BoxError> {
    let (child, addr) = spawn_server(&env.url, "16", &env.data_dir.join("idle-server")).await?;
    let pid = child.id().ok_or("no pid")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_bytes(pid)?;
    let subs = Subscribers::open(addr, n, |_| pb::StreamJobUpdatesRequest {
        agent_identifier: "idle".into(),
        ..Default::default()
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_bytes(pid)?;
    subs.close().await;
    stop_server(child).await;
    Ok((before, (after.saturating_sub(before)) as f64 / n as f64))
}

fn rss_bytes(pid: u32) -> Result<u64, BoxError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or("no VmRSS")?;
    Ok(kb * 1024)
}

/// NOTIFY at `rate` per second from one connection, LISTEN on another: p50 and p99 ms.
async fn listen_notify(env: &Env, rate: f64, duration: Duration) -> Result<(f64, f64), BoxError> {
    let mut listener = jobsvc::db::connect(&env.url).await?;
    diesel::sql_query("LISTEN bench_latency")
        .execute(&mut listener)
        .await?;
    let mut sender = jobsvc::db::connect(&env.url).await?;
    let expected = (rate * duration.as_secs_f64()) as usize;
    let receiver = tokio::spawn(async move {
        let mut lat = Vec::new();
        let mut stream = std::pin::pin!(listener.notifications_stream());
        while lat.len() < expected {
            match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
                Ok(Some(Ok(n))) => {
                    let sent: u128 = n.payload.parse().unwrap_or(0);
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap()
                        .as_micros();
                    lat.push(now.saturating_sub(sent) as u32);
                }
                _ => break,
            }
        }
        lat
    });
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    for _ in 0..expected {
        tick.tick().await;
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros();
        diesel::sql_query(format!("SELECT pg_notify('bench_latency', '{now}')"))
            .execute(&mut sender)
            .await?;
    }
    let lat = receiver.await?;
    Ok((pct(&lat, 0.5), pct(&lat, 0.99)))
}
