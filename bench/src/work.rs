//! The workers' scenarios, each with its own report (one JSON object per line with --json):
//!
//! - `work`: `--concurrency` workers (64), each claiming up to 10 jobs with `wait` and then
//!   completing each with its lease, over 200,000 pre-loaded pending jobs; worked jobs/s beside
//!   a pgbench twin doing the same SQL on the same database (a SKIP LOCKED claim of 10, then
//!   one UPDATE per completion), its jobs/s counted in the database.
//! - `dispatch`: create-to-claim latency with 16 workers waiting in ClaimJobs, at 100 and at
//!   1,000 creates/s. Latency: the worker's wall clock when the claim answers, minus the job's
//!   `created_at` (the creating transaction's start, the same machine's clock).
//! - `heartbeat`: 1,000 leased jobs heartbeating once a second; what it costs the write path
//!   (CreateJob throughput with the heartbeats running, divided by the same without), and the
//!   heartbeats' own latency.
//!
//! Every client runs in the bench process, on the same 2 cores as the server and PostgreSQL.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jobsvc::pb;

use super::{Args, Client, Env, client, create_call, drive};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Pre-loaded pending jobs of `work` (and as many again for its pgbench twin).
const WORK_JOBS: i64 = 200_000;

fn secs(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn claim_req(agent: &str, max_jobs: i32, wait: Duration, worker: usize) -> pb::ClaimJobsRequest {
    pb::ClaimJobsRequest {
        agent_identifier: agent.into(),
        max_jobs,
        lease_duration: Some(secs(Duration::from_secs(60))),
        wait: Some(secs(wait)),
        worker_id: format!("bench-{worker}"),
        user_id: String::new(),
    }
}

fn complete(id: String, lease_id: String) -> pb::UpdateStatusRequest {
    pb::UpdateStatusRequest {
        id,
        status: pb::JobStatus::Completed as i32,
        lease_id,
        ..Default::default()
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn emit(args: &Args, scenario: &str, fields: serde_json::Value) {
    let mut line = serde_json::json!({ "scenario": scenario });
    if let (Some(map), Some(extra)) = (line.as_object_mut(), fields.as_object()) {
        map.extend(extra.clone());
    }
    match args.json {
        true => println!("{line}"),
        false => println!("{scenario}: {fields}"),
    }
}

/// Loads `n` pending jobs of `agent` (through the triggers: history and rollups as real
/// creates would leave them).
async fn load_agent(env: &Env, agent: &str, n: i64) -> Result<(), BoxError> {
    use diesel_async::RunQueryDsl;
    let mut conn = jobsvc::db::connect(&env.url).await?;
    diesel::sql_query(format!(
        "INSERT INTO jobs (agent_identifier, job_data) \
         SELECT '{agent}', jsonb_build_object('n', i) FROM generate_series(1, {n}) AS i"
    ))
    .execute(&mut conn)
    .await?;
    diesel::sql_query("VACUUM ANALYZE jobs")
        .execute(&mut conn)
        .await?;
    Ok(())
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

async fn completed_of(env: &Env, agent: &str) -> Result<i64, BoxError> {
    use diesel_async::RunQueryDsl;
    let mut conn = jobsvc::db::connect(&env.url).await?;
    let c: Count = diesel::sql_query(
        "SELECT count(*) AS n FROM jobs WHERE agent_identifier = $1 AND status = 'completed'",
    )
    .bind::<diesel::sql_types::Text, _>(agent)
    .get_result(&mut conn)
    .await?;
    Ok(c.n)
}

/// `work`: claim 10 with wait, complete each with its lease; beside its pgbench twin.
pub async fn work(args: &Args, env: &Env) -> Result<(), BoxError> {
    eprintln!("work: loading {WORK_JOBS} pending jobs for jobsvc and as many for pgbench ...");
    load_agent(env, "work", WORK_JOBS).await?;
    load_agent(env, "work-pgbench", WORK_JOBS).await?;
    let mut clients = Vec::new();
    for _ in 0..args.concurrency {
        clients.push(client(env.addr, "service_role", None).await);
    }
    let clients = Arc::new(clients);
    let worked = Arc::new(AtomicU64::new(0));
    let counted = worked.clone();
    // Jobs completed in the measured window: the count at its start and at its end.
    let window = {
        let worked = worked.clone();
        let (warmup, duration) = (args.warmup, args.duration);
        tokio::spawn(async move {
            tokio::time::sleep(warmup).await;
            let first = worked.load(Ordering::Relaxed);
            tokio::time::sleep(duration).await;
            worked.load(Ordering::Relaxed) - first
        })
    };
    let outcome = drive(args, move |w, _| {
        let mut c: Client = clients[w].clone();
        let worked = counted.clone();
        async move {
            let Ok(claimed) = c
                .claim_jobs(claim_req("work", 10, Duration::from_secs(1), w))
                .await
            else {
                return false;
            };
            // A worker finishes its jobs one after another (the work itself takes no time
            // here); the server batches completions across workers.
            let mut all_ok = true;
            for cj in claimed.into_inner().jobs {
                let id = cj.job.map(|j| j.id).unwrap_or_default();
                match c.update_status(complete(id, cj.lease_id)).await {
                    Ok(_) => {
                        worked.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => all_ok = false,
                }
            }
            all_ok
        }
    })
    .await;
    let jobs_per_s = window.await? as f64 / args.duration.as_secs_f64();
    let claims_per_s = outcome.rps;

    // The twin: the same claim statement (10, SKIP LOCKED) and one UPDATE per completion.
    let before = completed_of(env, "work-pgbench").await?;
    let mut script = String::from(
        "WITH ready AS (SELECT id FROM jobs WHERE status = 'pending' AND agent_identifier = 'work-pgbench' \
         AND coalesce(run_after, created_at) <= now() \
         ORDER BY priority DESC, coalesce(run_after, created_at), id LIMIT 10 FOR UPDATE SKIP LOCKED), \
         claimed AS (UPDATE jobs SET status = 'running', started_at = coalesce(jobs.started_at, now()), \
         attempt = jobs.attempt + 1, lease_id = gen_random_uuid(), lease_duration = interval '60 seconds', \
         lease_expires_at = now() + interval '60 seconds', worker_id = 'pgbench' FROM ready \
         WHERE jobs.id = ready.id AND jobs.status = 'pending' RETURNING jobs.id, jobs.lease_id) \
         SELECT coalesce(array_agg(id)::text, '{}') AS ids, coalesce(array_agg(lease_id)::text, '{}') AS leases FROM claimed \\gset\n",
    );
    for k in 1..=10 {
        script.push_str(&format!(
            "UPDATE jobs SET status = 'completed', completed_at = now(), lease_expires_at = NULL \
             WHERE id = (:ids::uuid[])[{k}] AND status = 'running' AND lease_id = (:leases::uuid[])[{k}] RETURNING id;\n"
        ));
    }
    let twin = super::pgbench(env, args, &script);
    let after = completed_of(env, "work-pgbench").await?;
    let twin_jobs_per_s = (after - before) as f64 / args.duration.as_secs_f64();
    emit(
        args,
        "work",
        serde_json::json!({
            "workers": args.concurrency,
            "jobs_per_s": jobs_per_s,
            "claims_per_s": claims_per_s,
            "claim_and_complete_p50_ms": outcome.p50_ms,
            "claim_and_complete_p99_ms": outcome.p99_ms,
            "errors": outcome.errors,
            "pgbench_jobs_per_s": twin_jobs_per_s,
            "pgbench_scripts_per_s": twin.as_ref().map(|t| t.tps),
            "ratio": jobs_per_s / twin_jobs_per_s,
        }),
    );
    Ok(())
}

/// `dispatch`: create-to-claim latency with workers waiting, at 100 and 1,000 creates/s.
pub async fn dispatch(args: &Args, env: &Env) -> Result<(), BoxError> {
    const WAITING: usize = 16;
    for rate in [100u64, 1000] {
        let agent = format!("dispatch-{rate}");
        let latencies: Arc<Mutex<Vec<f64>>> = Arc::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut workers = Vec::new();
        for w in 0..WAITING {
            let mut c = client(env.addr, "service_role", None).await;
            let latencies = latencies.clone();
            let stop = stop.clone();
            let agent = agent.clone();
            workers.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(got) = c
                        .claim_jobs(claim_req(&agent, 10, Duration::from_secs(2), w))
                        .await
                    else {
                        continue;
                    };
                    let now = chrono::Utc::now();
                    for cj in got.into_inner().jobs {
                        let job = cj.job.unwrap_or_default();
                        if let Some(t) = &job.created_at {
                            let created =
                                chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32)
                                    .unwrap_or(now);
                            let ms = (now - created).num_microseconds().unwrap_or(0) as f64 / 1e3;
                            latencies.lock().unwrap().push(ms);
                        }
                        let mut c2 = c.clone();
                        tokio::spawn(async move {
                            let _ = c2.update_status(complete(job.id, cj.lease_id)).await;
                        });
                    }
                }
            }));
        }
        // Beside the workers, one stream of the same jobs: the change feed's own delivery
        // latency, to tell it from the claim's.
        let streamed: Arc<Mutex<Vec<f64>>> = Arc::default();
        {
            let mut c = client(env.addr, "service_role", None).await;
            let streamed = streamed.clone();
            let agent = agent.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let Ok(stream) = c
                    .stream_job_updates(pb::StreamJobUpdatesRequest {
                        agent_identifier: agent,
                        statuses: vec![pb::JobStatus::Pending as i32],
                        ..Default::default()
                    })
                    .await
                else {
                    return;
                };
                let mut stream = stream.into_inner();
                while let Ok(Some(update)) = stream.message().await {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    if let Some(pb::job_update::Event::Job(job)) = update.event
                        && let Some(t) = job.created_at
                    {
                        let now = chrono::Utc::now();
                        let created = chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32)
                            .unwrap_or(now);
                        streamed
                            .lock()
                            .unwrap()
                            .push((now - created).num_microseconds().unwrap_or(0) as f64 / 1e3);
                    }
                }
            });
        }
        // Let every worker reach its wait.
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Enough creators that each one's pace (a create every creators/rate seconds) stays
        // longer than a create takes under this load.
        let creators = if rate >= 1000 { 32usize } else { 8 };
        let creator_clients = {
            let mut v = Vec::new();
            for _ in 0..creators {
                v.push(client(env.addr, "service_role", None).await);
            }
            v
        };
        let period = Duration::from_secs_f64(creators as f64 / rate as f64);
        let measure = args.duration;
        let warm = args.warmup;
        let mut tasks = Vec::new();
        let started = Instant::now();
        for c in creator_clients {
            let agent = agent.clone();
            let latencies = latencies.clone();
            let streamed = streamed.clone();
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut warmed = false;
                while started.elapsed() < warm + measure {
                    tick.tick().await;
                    if !warmed && started.elapsed() >= warm {
                        latencies.lock().unwrap().clear();
                        streamed.lock().unwrap().clear();
                        warmed = true;
                    }
                    let _ = create_call(c.clone(), agent.clone(), String::new()).await;
                }
            }));
        }
        for t in tasks {
            t.await?;
        }
        // The last jobs are claimed within a moment.
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            let _ = tokio::time::timeout(Duration::from_secs(5), w).await;
        }
        let mut l = latencies.lock().unwrap().clone();
        l.sort_by(|a, b| a.total_cmp(b));
        let mut st = streamed.lock().unwrap().clone();
        st.sort_by(|a, b| a.total_cmp(b));
        emit(
            args,
            "dispatch",
            serde_json::json!({
                "creates_per_s": rate,
                "achieved_creates_per_s": l.len() as f64 / measure.as_secs_f64(),
                "waiting_workers": WAITING,
                "claimed": l.len(),
                "p50_ms": percentile(&l, 0.5),
                "p99_ms": percentile(&l, 0.99),
                "max_ms": l.last().copied().unwrap_or(f64::NAN),
                "stream_p50_ms": percentile(&st, 0.5),
                "stream_p99_ms": percentile(&st, 0.99),
            }),
        );
    }
    Ok(())
}

/// CreateJob throughput from `--concurrency` callers.
async fn create_rps(args: &Args, env: &Env) -> super::Outcome {
    let mut clients = Vec::new();
    for _ in 0..args.concurrency {
        clients.push(client(env.addr, "service_role", None).await);
    }
    let clients = Arc::new(clients);
    drive(args, move |w, _| {
        create_call(clients[w].clone(), "bench".into(), String::new())
    })
    .await
}

/// `heartbeat`: 1,000 leased jobs heartbeating once a second; CreateJob throughput with and
/// without them.
pub async fn heartbeat(args: &Args, env: &Env) -> Result<(), BoxError> {
    const LEASED: usize = 1000;
    load_agent(env, "heartbeat", LEASED as i64).await?;
    let mut c = client(env.addr, "service_role", None).await;
    let mut leases = Vec::new();
    while leases.len() < LEASED {
        let got = c
            .claim_jobs(claim_req("heartbeat", 100, Duration::ZERO, 0))
            .await?
            .into_inner()
            .jobs;
        if got.is_empty() {
            break;
        }
        leases.extend(
            got.into_iter()
                .map(|cj| (cj.job.unwrap_or_default().id, cj.lease_id)),
        );
    }
    let without = create_rps(args, env).await;
    // The heartbeats: 1,000 tasks over 10 connections, each beating once a second, spread.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let beat_lat: Arc<Mutex<Vec<f64>>> = Arc::default();
    let beat_errors = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::new();
    for _ in 0..10 {
        conns.push(client(env.addr, "service_role", None).await);
    }
    let mut beaters = Vec::new();
    for (i, (id, lease)) in leases.iter().cloned().enumerate() {
        let mut c = conns[i % conns.len()].clone();
        let stop = stop.clone();
        let lat = beat_lat.clone();
        let errors = beat_errors.clone();
        beaters.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_micros((i as u64 * 997) % 1_000_000)).await;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let t = Instant::now();
                let ok = c
                    .heartbeat(pb::HeartbeatRequest {
                        id: id.clone(),
                        lease_id: lease.clone(),
                        ..Default::default()
                    })
                    .await
                    .is_ok();
                match ok {
                    true => lat.lock().unwrap().push(t.elapsed().as_secs_f64() * 1e3),
                    false => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    beat_lat.lock().unwrap().clear();
    let with = create_rps(args, env).await;
    stop.store(true, Ordering::Relaxed);
    for b in beaters {
        let _ = tokio::time::timeout(Duration::from_secs(5), b).await;
    }
    let mut l = beat_lat.lock().unwrap().clone();
    l.sort_by(|a, b| a.total_cmp(b));
    emit(
        args,
        "heartbeat",
        serde_json::json!({
            "leased_jobs": leases.len(),
            "heartbeats_per_s": l.len() as f64 / (args.warmup + args.duration).as_secs_f64(),
            "heartbeat_p50_ms": percentile(&l, 0.5),
            "heartbeat_p99_ms": percentile(&l, 0.99),
            "heartbeat_errors": beat_errors.load(Ordering::Relaxed),
            "create_rps_without": without.rps,
            "create_rps_with": with.rps,
            "create_ratio": with.rps / without.rps,
        }),
    );
    Ok(())
}
