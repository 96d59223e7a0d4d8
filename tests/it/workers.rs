//! Workers: ClaimJobs under a lease, Heartbeat, retries with backoff, and completion fenced by
//! the lease, over real sockets against real PostgreSQL (two replicas where it matters).
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jobsvc::pb::{self, JobStatus as S};
use tonic::Code;
use uuid::Uuid;

use crate::harness::{self, Client, TestServer, assert_err, eventually};

fn secs(s: f64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: s.trunc() as i64,
        nanos: (s.fract() * 1e9) as i32,
    }
}

fn claim_req(
    agent: &str,
    max: i32,
    lease_s: f64,
    wait_s: f64,
    worker: &str,
) -> pb::ClaimJobsRequest {
    pb::ClaimJobsRequest {
        agent_identifier: agent.into(),
        max_jobs: max,
        lease_duration: Some(secs(lease_s)),
        wait: (wait_s > 0.0).then(|| secs(wait_s)),
        worker_id: worker.into(),
        user_id: String::new(),
    }
}

async fn claim(c: &mut Client, req: pb::ClaimJobsRequest) -> Vec<pb::ClaimedJob> {
    c.claim_jobs(req).await.expect("claim").into_inner().jobs
}

fn finish(id: &str, lease: &str, status: S) -> pb::UpdateStatusRequest {
    pb::UpdateStatusRequest {
        id: id.into(),
        status: status as i32,
        lease_id: lease.into(),
        ..Default::default()
    }
}

fn retried(agent: &str, max_attempts: i32, backoff_s: f64) -> pb::CreateJobRequest {
    pb::CreateJobRequest {
        agent_identifier: agent.into(),
        max_attempts,
        initial_backoff: Some(secs(backoff_s)),
        ..Default::default()
    }
}

fn status_of(j: &pb::Job) -> S {
    S::try_from(j.status).unwrap()
}

/// The ErrorInfo metadata of a status.
fn info(status: &tonic::Status) -> HashMap<String, String> {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .error_info()
        .expect("an ErrorInfo")
        .metadata
        .clone()
}

/// Exactly once: 2,000 jobs, 32 workers over two replicas, none failing: every job is
/// claimed once and completed once, none twice, none left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_is_claimed_and_completed_exactly_once() {
    const JOBS: usize = 2000;
    const WORKERS: usize = 32;
    let pg = harness::shared_pg().await;
    let url = harness::fresh_database(&pg).await;
    let a = TestServer::start_on(&url, &[]).await;
    let b = TestServer::start_on(&url, &[]).await;
    let mut svc = a.service().await;
    let mut made = Vec::new();
    let mut pending: Vec<_> = (0..JOBS).collect();
    while !pending.is_empty() {
        let batch: Vec<_> = pending.drain(..pending.len().min(50)).collect();
        let calls = batch.iter().map(|_| {
            let mut c = svc.clone();
            async move {
                c.create_job(harness::create("once"))
                    .await
                    .unwrap()
                    .into_inner()
            }
        });
        made.extend(futures_util::future::join_all(calls).await);
    }
    assert_eq!(made.len(), JOBS);

    let claimed: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let completed = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let server = if w % 2 == 0 { &a } else { &b };
        let mut c = server.service().await;
        let claimed = claimed.clone();
        let completed = completed.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let jobs = claim(&mut c, claim_req("once", 10, 30.0, 0.5, &format!("w{w}"))).await;
                if jobs.is_empty() {
                    if completed.load(Ordering::SeqCst) >= JOBS {
                        return;
                    }
                    continue;
                }
                for cj in jobs {
                    let job = cj.job.unwrap();
                    assert_eq!(job.attempt, 1, "a job claimed again");
                    *claimed.lock().unwrap().entry(job.id.clone()).or_default() += 1;
                    let mut req = finish(&job.id, &cj.lease_id, S::Completed);
                    req.result = Some(prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(format!("w{w}"))),
                    });
                    let done = c
                        .update_status(req)
                        .await
                        .expect("completion under the lease");
                    assert_eq!(status_of(done.get_ref()), S::Completed);
                    completed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    tokio::time::timeout(
        Duration::from_secs(240),
        futures_util::future::join_all(workers),
    )
    .await
    .expect("the workers finish")
    .into_iter()
    .for_each(|r| r.expect("a worker task"));
    let claimed = claimed.lock().unwrap().clone();
    assert_eq!(claimed.len(), JOBS, "every job claimed");
    assert!(claimed.values().all(|n| *n == 1), "a job claimed twice");
    assert_eq!(completed.load(Ordering::SeqCst), JOBS);
    let stats = svc
        .get_stats(pb::GetStatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (stats.completed, stats.pending, stats.running),
        (JOBS as i64, 0, 0)
    );
    // Each job's history: created, claimed, completed, nothing else.
    for job in made.iter().take(50) {
        let events = harness::history(&mut svc, &job.id).await;
        let statuses: Vec<i32> = events.iter().map(|e| e.status).collect();
        assert_eq!(
            statuses,
            vec![S::Pending as i32, S::Running as i32, S::Completed as i32]
        );
    }
    a.stop().await;
    b.stop().await;
}

/// Workers that claim and vanish: every job is retried up to max_attempts, then FAILED, with
/// exact attempt counts and a message saying the lease expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_workers_leases_expire_into_retries_then_failure() {
    let server = TestServer::start().await;
    let mut c = server.service().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            c.create_job(retried("vanish", 3, 0.1))
                .await
                .unwrap()
                .into_inner()
                .id,
        );
    }
    let started = Instant::now();
    let mut claims = 0;
    while claims < 15 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{claims} claims so far"
        );
        let jobs = claim(&mut c, claim_req("vanish", 10, 1.0, 3.0, "ghost")).await;
        for cj in &jobs {
            let job = cj.job.as_ref().unwrap();
            assert!(
                job.attempt >= 1 && job.attempt <= 3,
                "attempt {}",
                job.attempt
            );
            if job.attempt > 1 {
                assert!(
                    job.error_message.starts_with(&format!(
                        "lease expired on attempt {} of 3",
                        job.attempt - 1
                    )),
                    "{}",
                    job.error_message
                );
            }
        }
        claims += jobs.len();
        // ... and the worker vanishes: no heartbeat, no completion.
    }
    for id in &ids {
        let id = id.clone();
        let mut c2 = c.clone();
        eventually(Duration::from_secs(10), "the last lease expired", || {
            let id = id.clone();
            let mut c2 = c2.clone();
            async move {
                let job = c2
                    .get_job(pb::GetJobRequest { id })
                    .await
                    .unwrap()
                    .into_inner();
                status_of(&job) == S::Failed
            }
        })
        .await;
        let job = c2
            .get_job(pb::GetJobRequest { id })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((job.attempt, job.max_attempts), (3, 3));
        assert!(
            job.error_message
                .starts_with("lease expired on attempt 3 of 3"),
            "{}",
            job.error_message
        );
        assert!(job.lease_expire_time.is_none());
        assert_eq!(job.worker_id, "ghost");
    }
    server.stop().await;
}

/// A zombie (a worker whose lease expired and whose job was taken over) can neither
/// heartbeat nor complete; the new attempt's result stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_cannot_complete_the_job_it_lost() {
    let server = TestServer::start().await;
    let mut c = server.service().await;
    let made = c
        .create_job(retried("zombie", 2, 0.0))
        .await
        .unwrap()
        .into_inner();
    let first = claim(&mut c, claim_req("zombie", 1, 1.0, 0.0, "zombie")).await;
    assert_eq!(first.len(), 1);
    // The lease expires; the retry is ready at once (no backoff) and another worker takes it.
    let second = claim(&mut c, claim_req("zombie", 1, 30.0, 10.0, "heir")).await;
    assert_eq!(second.len(), 1);
    let heir = second[0].job.as_ref().unwrap();
    assert_eq!((heir.id.as_str(), heir.attempt), (made.id.as_str(), 2));
    assert_ne!(first[0].lease_id, second[0].lease_id);

    let beat = c
        .heartbeat(pb::HeartbeatRequest {
            id: made.id.clone(),
            lease_id: first[0].lease_id.clone(),
            ..Default::default()
        })
        .await;
    let status = beat.as_ref().unwrap_err().clone();
    assert_err(beat, Code::FailedPrecondition, "LEASE_LOST");
    assert_eq!(info(&status).get("attempt").map(String::as_str), Some("2"));
    let mut zombie_done = finish(&made.id, &first[0].lease_id, S::Completed);
    zombie_done.result = Some(prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue("zombie".into())),
    });
    let refused = c.update_status(zombie_done).await;
    let status = refused.as_ref().unwrap_err().clone();
    assert_err(refused, Code::FailedPrecondition, "LEASE_LOST");
    let meta = info(&status);
    assert_eq!(meta.get("status").map(String::as_str), Some("running"));
    assert_eq!(meta.get("attempt").map(String::as_str), Some("2"));

    let mut heir_done = finish(&made.id, &second[0].lease_id, S::Completed);
    heir_done.result = Some(prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue("heir".into())),
    });
    let done = c
        .update_status(heir_done.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status_of(&done), S::Completed);
    // A repeat of the heir's completion (its answer lost) returns the job unchanged.
    let again = c.update_status(heir_done).await.unwrap().into_inner();
    assert_eq!(again.version, done.version);
    // The zombie, now too late for anything.
    assert_err(
        c.update_status(finish(&made.id, &first[0].lease_id, S::Failed))
            .await,
        Code::FailedPrecondition,
        "LEASE_LOST",
    );
    let job = c
        .get_job(pb::GetJobRequest { id: made.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        job.result.and_then(|v| v.kind),
        Some(prost_types::value::Kind::StringValue("heir".into()))
    );
    server.stop().await;
}

/// 1,000 races of the lease sweeper against a heartbeat or a completion of a lease that has
/// just expired: never both applied. Each job ends either renewed/completed (and the worker
/// heard OK) or retried (and the worker heard LEASE_LOST).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_racing_heartbeats_and_completions_never_both_win() {
    use diesel_async::RunQueryDsl;
    const GROUPS: usize = 20;
    const PER_GROUP: usize = 50;
    let server = TestServer::start_on(
        &harness::fresh_database(&*harness::shared_pg().await).await,
        // The test runs the sweeps itself, in the races.
        &["--lease-sweep-interval", "1h"],
    )
    .await;
    let mut c = server.service().await;
    let mut admin = jobsvc::db::connect(&server.db_url).await.unwrap();
    let mut outcomes: HashMap<&str, usize> = HashMap::new();
    for group in 0..GROUPS {
        let agent = format!("race-{group}");
        let calls = (0..PER_GROUP).map(|_| {
            let mut c = c.clone();
            let agent = agent.clone();
            async move { c.create_job(retried(&agent, 2, 3600.0)).await.unwrap() }
        });
        futures_util::future::join_all(calls).await;
        let jobs = claim(
            &mut c,
            claim_req(&agent, PER_GROUP as i32, 30.0, 0.0, "racer"),
        )
        .await;
        assert_eq!(jobs.len(), PER_GROUP);
        // Every lease of the group has just expired (plain SQL: not a change).
        diesel::sql_query(
            "UPDATE jobs SET lease_expires_at = now() - interval '1 millisecond' \
             WHERE agent_identifier = $1",
        )
        .bind::<diesel::sql_types::Text, _>(&agent)
        .execute(&mut admin)
        .await
        .unwrap();
        // The sweep's connection is open before the race, so both sides start together.
        let mut sweeper = jobsvc::db::connect(&server.db_url).await.unwrap();
        let sweep = async {
            diesel::sql_query(
                "SELECT jobs_expire_leases(interval '1 hour', 2.0, interval '1 hour', 1000)",
            )
            .execute(&mut sweeper)
            .await
            .unwrap();
        };
        let racers = jobs.into_iter().enumerate().map(|(i, cj)| {
            let mut c = c.clone();
            async move {
                let job = cj.job.unwrap();
                let answer = match i % 2 {
                    0 => c
                        .heartbeat(pb::HeartbeatRequest {
                            id: job.id.clone(),
                            lease_id: cj.lease_id.clone(),
                            ..Default::default()
                        })
                        .await
                        .map(|_| ()),
                    _ => c
                        .update_status(finish(&job.id, &cj.lease_id, S::Completed))
                        .await
                        .map(|_| ()),
                };
                (i % 2, job.id, answer)
            }
        });
        // Half the groups give the sweeper a head start of a few hundred microseconds.
        let head_start = Duration::from_micros(if group % 2 == 0 { 0 } else { 300 });
        let (answers, ()) = tokio::join!(
            async {
                tokio::time::sleep(head_start).await;
                futures_util::future::join_all(racers).await
            },
            sweep
        );
        // Whatever is left expired is swept now, so every job has its final answer.
        diesel::sql_query(
            "SELECT jobs_expire_leases(interval '1 hour', 2.0, interval '1 hour', 1000)",
        )
        .execute(&mut admin)
        .await
        .unwrap();
        for (kind, id, answer) in answers {
            let job = c
                .get_job(pb::GetJobRequest { id: id.clone() })
                .await
                .unwrap()
                .into_inner();
            let status = status_of(&job);
            match (kind, &answer) {
                (0, Ok(())) => {
                    // The heartbeat won: the lease was renewed, the sweeper left it alone.
                    assert_eq!(status, S::Running, "{id}: renewed but swept");
                    *outcomes.entry("heartbeat won").or_default() += 1;
                }
                (1, Ok(())) => {
                    assert_eq!(status, S::Completed, "{id}: completed but swept");
                    *outcomes.entry("completion won").or_default() += 1;
                }
                (_, Err(e)) => {
                    assert_eq!(harness::reason(e), "LEASE_LOST", "{id}: {e:?}");
                    assert_eq!(status, S::Pending, "{id}: refused but not retried");
                    assert!(
                        job.error_message
                            .starts_with("lease expired on attempt 1 of 2")
                    );
                    *outcomes.entry("sweeper won").or_default() += 1;
                }
                _ => unreachable!(),
            }
        }
    }
    let total: usize = outcomes.values().sum();
    assert_eq!(total, GROUPS * PER_GROUP);
    eprintln!("race outcomes: {outcomes:?}");
    server.stop().await;
}

/// Cancelled while running: the next heartbeat says cancel_requested, completion is refused,
/// and the job stays CANCELLED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_the_worker_on_its_next_heartbeat() {
    let server = TestServer::start().await;
    let mut c = server.service().await;
    let made = c
        .create_job(harness::create("cancel"))
        .await
        .unwrap()
        .into_inner();
    let cj = claim(&mut c, claim_req("cancel", 1, 30.0, 0.0, "w"))
        .await
        .remove(0);
    let beat = |c: &mut Client| {
        let req = pb::HeartbeatRequest {
            id: made.id.clone(),
            lease_id: cj.lease_id.clone(),
            ..Default::default()
        };
        let mut c = c.clone();
        async move { c.heartbeat(req).await }
    };
    let before = beat(&mut c).await.unwrap().into_inner();
    assert!(!before.cancel_requested && before.lease_expire_time.is_some());
    c.cancel_job(pb::CancelJobRequest {
        id: made.id.clone(),
    })
    .await
    .unwrap();
    let after = beat(&mut c).await.unwrap().into_inner();
    assert!(after.cancel_requested && after.lease_expire_time.is_none());
    assert_err(
        c.update_status(finish(&made.id, &cj.lease_id, S::Completed))
            .await,
        Code::FailedPrecondition,
        "LEASE_LOST",
    );
    let job = c
        .get_job(pb::GetJobRequest { id: made.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status_of(&job), S::Cancelled);
    server.stop().await;
}

/// Higher priority is claimed first; a job is never claimed before its run_after, and a
/// waiting claim takes it when it comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_first_and_never_before_run_after() {
    let server = TestServer::start().await;
    let mut c = server.service().await;
    let make = |priority: i32, run_after: Option<prost_types::Timestamp>| {
        let mut c = c.clone();
        async move {
            c.create_job(pb::CreateJobRequest {
                agent_identifier: "order".into(),
                priority,
                run_after,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let low = make(-5, None).await;
    let mid = make(0, None).await;
    let high = make(5, None).await;
    let later_at = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let later = make(1000, Some(jobsvc::api::convert::timestamp(later_at))).await;
    let got = claim(&mut c, claim_req("order", 10, 30.0, 0.0, "w")).await;
    let order: Vec<&str> = got
        .iter()
        .map(|cj| cj.job.as_ref().unwrap().id.as_str())
        .collect();
    assert_eq!(
        order,
        vec![high.id.as_str(), mid.id.as_str(), low.id.as_str()]
    );
    // The future job: not before its time, and a waiting claim is woken for it by a timer.
    let got = claim(&mut c, claim_req("order", 10, 30.0, 5.0, "w")).await;
    let now = chrono::Utc::now();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].job.as_ref().unwrap().id, later.id);
    assert!(now >= later_at, "claimed {} early", later_at - now);
    server.stop().await;
}

/// A waiting ClaimJobs returns within 50 ms of a matching create on another replica (the
/// median of five), and empty at its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_claim_is_woken_by_a_create_on_another_replica() {
    let pg = harness::shared_pg().await;
    let url = harness::fresh_database(&pg).await;
    let a = TestServer::start_on(&url, &[]).await;
    let b = TestServer::start_on(&url, &[]).await;
    let mut on_a = a.service().await;
    let mut on_b = b.service().await;
    // Empty at the deadline.
    let started = Instant::now();
    assert!(
        claim(&mut on_a, claim_req("poll", 1, 30.0, 0.5, "w"))
            .await
            .is_empty()
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(3),
        "{waited:?}"
    );

    let mut delays = Vec::new();
    for _ in 0..5 {
        let mut waiter = on_a.clone();
        let waiting = tokio::spawn(async move {
            (
                claim(&mut waiter, claim_req("poll", 1, 30.0, 10.0, "w")).await,
                Instant::now(),
            )
        });
        tokio::time::sleep(Duration::from_millis(300)).await; // the claim is waiting
        let made = on_b
            .create_job(harness::create("poll"))
            .await
            .unwrap()
            .into_inner();
        let created = Instant::now();
        let (got, returned) = waiting.await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].job.as_ref().unwrap().id, made.id);
        delays.push(returned.saturating_duration_since(created));
    }
    delays.sort();
    assert!(
        delays[2] < Duration::from_millis(50),
        "create-to-claim: {delays:?}"
    );
    assert!(
        delays[4] < Duration::from_secs(1),
        "create-to-claim: {delays:?}"
    );
    a.stop().await;
    b.stop().await;
}

/// A user's claim never returns another user's job; the service role may claim one user's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_claim_takes_only_its_own_jobs() {
    let server = TestServer::start().await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let mut svc = server.service().await;
    for owner in [alice, bob, alice, bob] {
        let mut req = harness::create("shared-agent");
        req.user_id = owner.to_string();
        svc.create_job(req).await.unwrap();
    }
    let mut a = server.user(alice).await;
    let got = claim(&mut a, claim_req("shared-agent", 10, 30.0, 0.0, "alice")).await;
    assert_eq!(got.len(), 2);
    assert!(
        got.iter()
            .all(|cj| cj.job.as_ref().unwrap().user_id == alice.to_string())
    );
    // Naming another user is refused.
    let mut req = claim_req("shared-agent", 10, 30.0, 0.0, "alice");
    req.user_id = bob.to_string();
    assert_err(
        a.claim_jobs(req).await,
        Code::PermissionDenied,
        "USER_MISMATCH",
    );
    // Alice cannot heartbeat or complete Bob's job, even with its lease.
    let mut req = claim_req("shared-agent", 10, 30.0, 0.0, "svc");
    req.user_id = bob.to_string();
    let bobs = claim(&mut svc, req).await;
    assert_eq!(bobs.len(), 2);
    assert!(
        bobs.iter()
            .all(|cj| cj.job.as_ref().unwrap().user_id == bob.to_string())
    );
    let stolen = &bobs[0];
    assert_err(
        a.heartbeat(pb::HeartbeatRequest {
            id: stolen.job.as_ref().unwrap().id.clone(),
            lease_id: stolen.lease_id.clone(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "JOB_NOT_FOUND",
    );
    assert_err(
        a.update_status(finish(
            &stolen.job.as_ref().unwrap().id,
            &stolen.lease_id,
            S::Completed,
        ))
        .await,
        Code::NotFound,
        "JOB_NOT_FOUND",
    );
    server.stop().await;
}

/// A worker's failure with attempts left is retried after a backoff, keeping its message;
/// no_retry fails for good; a release does not count the attempt; heartbeats extend the lease
/// without writing history, progress shows; the stats follow every move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_retry_with_backoff_releases_are_free_and_heartbeats_are_not_changes() {
    let server = TestServer::start().await;
    let mut c = server.service().await;
    let made = c
        .create_job(retried("retry", 3, 0.3))
        .await
        .unwrap()
        .into_inner();
    let cj = claim(&mut c, claim_req("retry", 1, 30.0, 0.0, "w1"))
        .await
        .remove(0);
    let claimed = cj.job.clone().unwrap();
    assert_eq!((claimed.attempt, status_of(&claimed)), (1, S::Running));
    assert!(claimed.lease_expire_time.is_some() && claimed.started_at.is_some());

    // Heartbeats: the lease moves, the version and history do not.
    let history_before = harness::history(&mut c, &made.id).await.len();
    let beat = c
        .heartbeat(pb::HeartbeatRequest {
            id: made.id.clone(),
            lease_id: cj.lease_id.clone(),
            lease_duration: Some(secs(120.0)),
            progress: None,
        })
        .await
        .unwrap()
        .into_inner();
    let new_expiry = beat.lease_expire_time.unwrap();
    assert!(new_expiry.seconds >= claimed.lease_expire_time.unwrap().seconds + 80);
    let now_job = c
        .get_job(pb::GetJobRequest {
            id: made.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(now_job.version, claimed.version);
    assert_eq!(
        harness::history(&mut c, &made.id).await.len(),
        history_before
    );
    // Progress is a change (at most one a second): it shows on the job and in the history.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.heartbeat(pb::HeartbeatRequest {
        id: made.id.clone(),
        lease_id: cj.lease_id.clone(),
        lease_duration: None,
        progress: Some(prost_types::Value {
            kind: Some(prost_types::value::Kind::NumberValue(0.5)),
        }),
    })
    .await
    .unwrap();
    let with_progress = c
        .get_job(pb::GetJobRequest {
            id: made.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(with_progress.version, claimed.version + 1);
    assert_eq!(
        with_progress.progress.and_then(|v| v.kind),
        Some(prost_types::value::Kind::NumberValue(0.5))
    );
    assert_eq!(
        harness::history(&mut c, &made.id).await.len(),
        history_before + 1
    );

    // A failure with attempts left: back to PENDING, run_after ahead, message kept.
    let mut failed = finish(&made.id, &cj.lease_id, S::Failed);
    failed.error_message = "flaky upstream".into();
    let back = c.update_status(failed.clone()).await.unwrap().into_inner();
    assert_eq!(status_of(&back), S::Pending);
    assert_eq!(back.error_message, "flaky upstream");
    assert!(back.lease_expire_time.is_none() && back.completed_at.is_none());
    let run_after = back.run_after.expect("a retry has a run_after");
    let delay = chrono::DateTime::from_timestamp(run_after.seconds, run_after.nanos as u32)
        .unwrap()
        - chrono::DateTime::from_timestamp(
            back.updated_at.unwrap().seconds,
            back.updated_at.unwrap().nanos as u32,
        )
        .unwrap();
    assert!(
        (250..=350).contains(&delay.num_milliseconds()),
        "the first retry waits the job's initial backoff +/-10%: {delay}"
    );
    // Its retry of the same move (a lost answer) is answered with the job unchanged.
    let again = c.update_status(failed).await.unwrap().into_inner();
    assert_eq!(again.version, back.version);
    let stats = c
        .get_stats(pb::GetStatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((stats.pending, stats.running, stats.failed), (1, 0, 0));

    // Not claimable before run_after; then attempt 2, handed back: not counted.
    let cj2 = claim(&mut c, claim_req("retry", 1, 30.0, 5.0, "w2"))
        .await
        .remove(0);
    assert_eq!(cj2.job.as_ref().unwrap().attempt, 2);
    let released = c
        .update_status(finish(&made.id, &cj2.lease_id, S::Pending))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((status_of(&released), released.attempt), (S::Pending, 1));
    assert!(released.run_after.is_none(), "a release is ready at once");
    let cj3 = claim(&mut c, claim_req("retry", 1, 30.0, 0.0, "w3"))
        .await
        .remove(0);
    assert_eq!(cj3.job.as_ref().unwrap().attempt, 2);
    // no_retry: failed for good, attempts left or not.
    let mut final_fail = finish(&made.id, &cj3.lease_id, S::Failed);
    final_fail.no_retry = true;
    final_fail.error_message = "bad input, no point retrying".into();
    let done = c.update_status(final_fail).await.unwrap().into_inner();
    assert_eq!(status_of(&done), S::Failed);
    assert!(done.completed_at.is_some());
    let stats = c
        .get_stats(pb::GetStatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((stats.pending, stats.running, stats.failed), (0, 0, 1));
    server.stop().await;
}

/// The workers' input that needs a job to answer (malformed fields are in the bad-input
/// corpus, `bad_input::corpus_of_malformed_requests_gets_exact_codes_and_reasons`): each gets
/// its exact code and reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_worker_input_gets_its_code_and_reason() {
    let server = TestServer::start().await;
    let mut c = server.service().await;
    let made = c
        .create_job(harness::create("bad"))
        .await
        .unwrap()
        .into_inner();
    // max_jobs 0 means 1 (the contract).
    assert_eq!(
        claim(&mut c, claim_req("bad", 0, 30.0, 0.0, ""))
            .await
            .len(),
        1
    );
    // An unknown or malformed lease is a lease the job does not hold.
    for lease in [Uuid::new_v4().to_string(), "not-a-lease".to_string()] {
        assert_err(
            c.update_status(finish(&made.id, &lease, S::Completed))
                .await,
            Code::FailedPrecondition,
            "LEASE_LOST",
        );
        assert_err(
            c.heartbeat(pb::HeartbeatRequest {
                id: made.id.clone(),
                lease_id: lease.clone(),
                ..Default::default()
            })
            .await,
            Code::FailedPrecondition,
            "LEASE_LOST",
        );
    }
    assert_err(
        c.update_status(finish(&made.id, &Uuid::new_v4().to_string(), S::Running))
            .await,
        Code::FailedPrecondition,
        "INVALID_TRANSITION",
    );
    server.stop().await;
}

/// A stream filtered by `worker_id` carries the changes of the jobs that worker claimed last,
/// and no other worker's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_follows_one_workers_jobs() {
    let server = TestServer::start().await;
    let mut c = server.service().await;
    let mut stream = c
        .stream_job_updates(pb::StreamJobUpdatesRequest {
            worker_id: "w1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let synced = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(
        synced.event,
        Some(pb::job_update::Event::Synced(_))
    ));
    c.create_job(harness::create("followed")).await.unwrap();
    c.create_job(harness::create("followed")).await.unwrap();
    let other = claim(&mut c, claim_req("followed", 1, 30.0, 0.0, "w2"))
        .await
        .remove(0);
    let mine = claim(&mut c, claim_req("followed", 1, 30.0, 0.0, "w1"))
        .await
        .remove(0);
    let update = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match update.event {
        Some(pb::job_update::Event::Job(job)) => {
            assert_eq!(job.id, mine.job.as_ref().unwrap().id);
            assert_eq!(job.worker_id, "w1");
        }
        other => panic!("expected w1's claim, got {other:?}"),
    }
    // w2's job moves; w1's stream stays quiet until w1's job moves.
    c.update_status(finish(
        &other.job.as_ref().unwrap().id,
        &other.lease_id,
        S::Completed,
    ))
    .await
    .unwrap();
    c.update_status(finish(
        &mine.job.as_ref().unwrap().id,
        &mine.lease_id,
        S::Completed,
    ))
    .await
    .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match next.event {
        Some(pb::job_update::Event::Job(job)) => {
            assert_eq!(job.id, mine.job.as_ref().unwrap().id);
            assert_eq!(job.status, S::Completed as i32);
        }
        other => panic!("expected w1's completion, got {other:?}"),
    }
    server.stop().await;
}
