//! Natural batching of CreateJob: concurrent creates of several callers, with request_ids
//! repeated inside and across batches, share statements yet each gets exactly its own answer.
use std::collections::{HashMap, HashSet};

use jobsvc::pb;
use tonic::Code;
use uuid::Uuid;

use crate::harness::{Client, TestServer, all_jobs, fresh_database, reason, shared_pg};
use crate::ops::{sample, scrape};

/// A server with one writer for the batched kind `workers_flag` (every call that arrives while
/// a statement is in flight joins the next), room for every call to queue, and metrics on the
/// returned port; clients of 3 users (0..3) and of the service role (3).
async fn one_writer(workers_flag: &str) -> (TestServer, u16, Vec<Uuid>, Vec<Client>) {
    let pg = shared_pg().await;
    let url = fresh_database(&pg).await;
    let port = crate::harness::free_addr().port();
    let server = TestServer::start_on(
        &url,
        &[
            workers_flag,
            "1",
            "--max-queued-calls",
            "1000",
            "--queue-timeout",
            "30s",
            "--metrics-listen",
            &format!("127.0.0.1:{port}"),
        ],
    )
    .await;
    let users: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let mut clients = Vec::new();
    for caller in 0..4 {
        clients.push(match caller {
            3 => server.service().await,
            u => server.user(users[u]).await,
        });
    }
    (server, port, users, clients)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_share_statements_and_each_gets_its_own_answer() {
    let (server, port, users, clients) = one_writer("--create-batch-workers").await;
    let mut tasks = Vec::new();
    // 3 users and the service role, 100 creates each, all at once. Every fifth create reuses
    // one of 4 request_ids (the same payload); one in ten of those sends another payload.
    for (caller, c) in clients.iter().enumerate() {
        for i in 0..100 {
            let mut c = c.clone();
            tasks.push(tokio::spawn(async move {
                let (request_id, agent) = match i % 5 {
                    0 if i % 50 == 0 => (format!("shared-{}", i % 4), "other".to_owned()),
                    0 => (format!("shared-{}", i % 4), "same".to_owned()),
                    _ => (String::new(), format!("a{i}")),
                };
                let r = c
                    .create_job(pb::CreateJobRequest {
                        agent_identifier: agent.clone(),
                        request_id: request_id.clone(),
                        ..Default::default()
                    })
                    .await;
                (caller, request_id, agent, r)
            }));
        }
    }
    let mut by_key: HashMap<(usize, String), HashSet<String>> = HashMap::new();
    let mut plain = 0;
    let mut reused = 0;
    for t in tasks {
        let (caller, request_id, agent, r) = t.await.unwrap();
        match r {
            Ok(job) => {
                let job = job.into_inner();
                assert_eq!(
                    job.agent_identifier, agent,
                    "each create gets its own job back"
                );
                if request_id.is_empty() {
                    plain += 1;
                } else {
                    by_key
                        .entry((caller, request_id))
                        .or_default()
                        .insert(job.id);
                }
            }
            Err(s) => {
                // Only a reused request_id with another payload may be refused, if its first
                // use had the other payload.
                assert_eq!(s.code(), Code::AlreadyExists, "{s:?}");
                assert_eq!(reason(&s), "IDEMPOTENCY_KEY_REUSED");
                reused += 1;
            }
        }
    }
    assert_eq!(plain, 4 * 80);
    assert_eq!(by_key.len(), 4 * 4, "every caller used 4 request_ids");
    assert!(
        by_key.values().all(|ids| ids.len() == 1),
        "one job per caller and request_id: {by_key:?}"
    );
    // Per caller, shared-0 and shared-2 each had one create with the other payload: either it
    // was refused, or (if it came first) the four with the same payload were.
    assert!((4 * 2..=4 * 8).contains(&reused), "{reused} refused");
    // The database agrees: 80 plain jobs and 4 request_id jobs per caller.
    let mut service = server.service().await;
    let jobs = all_jobs(&mut service).await;
    assert_eq!(jobs.len(), 4 * (80 + 4));
    for u in &users {
        assert_eq!(
            jobs.iter().filter(|j| j.user_id == u.to_string()).count(),
            84
        );
    }
    // And statements were shared: fewer statements than creates.
    let text = scrape(port).await;
    let statements = sample(&text, "jobsvc_create_batch_rows_count").unwrap();
    let rows = sample(&text, "jobsvc_create_batch_rows_sum").unwrap();
    assert_eq!(rows, 400.0);
    assert!(
        statements < rows,
        "{statements} statements for {rows} creates"
    );
    eprintln!("{rows} creates in {statements} statements");
    server.stop().await;
}

/// Natural batching of UpdateStatus: concurrent moves of several callers, each job moved
/// twice at once, share statements, and every job still moves exactly once per step, in its
/// owner's scope only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_moves_share_statements_and_each_job_moves_once() {
    let (server, port, _users, clients) = one_writer("--update-batch-workers").await;
    // 30 jobs per caller (the service role's owned by no user).
    let mut jobs: Vec<(usize, pb::Job)> = Vec::new();
    for (caller, c) in clients.iter().enumerate() {
        for i in 0..30 {
            let job = c
                .clone()
                .create_job(pb::CreateJobRequest {
                    agent_identifier: format!("a{i}"),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            jobs.push((caller, job));
        }
    }
    let moves = |step: usize| {
        let mut tasks = Vec::new();
        for (n, (caller, job)) in jobs.iter().enumerate() {
            // Every job twice at once (once with its version), and each user's job also by
            // the next user, who must not find it.
            let status = match (step, n % 2) {
                (0, _) => pb::JobStatus::Running,
                (_, 0) => pb::JobStatus::Completed,
                _ => pb::JobStatus::Failed,
            };
            let mut attempts = vec![(*caller, Some(job.version + step as i64)), (*caller, None)];
            if *caller < 3 {
                attempts.push(((*caller + 1) % 3, None));
            }
            for (who, expected_version) in attempts {
                let mut c = clients[who].clone();
                let req = pb::UpdateStatusRequest {
                    id: job.id.clone(),
                    status: status as i32,
                    result: Some(prost_types::Value {
                        kind: Some(prost_types::value::Kind::NumberValue(n as f64)),
                    }),
                    error_message: format!("e{n}"),
                    expected_version,
                    ..Default::default()
                };
                let owner = *caller;
                tasks.push(tokio::spawn(async move {
                    (owner, who, status, c.update_status(req).await)
                }));
            }
        }
        tasks
    };
    let mut total = 0;
    for step in 0..2 {
        for t in moves(step) {
            let (owner, who, status, r) = t.await.unwrap();
            total += 1;
            if owner == who {
                let job = r.expect("the owner's moves succeed (applied or already done)");
                assert_eq!(job.into_inner().status, status as i32);
            } else {
                let s = r.expect_err("another user's job is not found");
                assert_eq!(s.code(), Code::NotFound, "{s:?}");
            }
        }
    }
    // The history of every job: created, one move to running, one to its end; the right
    // result or error message.
    let mut service = clients[3].clone();
    for (n, (_, job)) in jobs.iter().enumerate() {
        let events = service
            .list_job_events(pb::ListJobEventsRequest {
                job_id: job.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .events;
        let end = match n % 2 {
            0 => pb::JobStatus::Completed,
            _ => pb::JobStatus::Failed,
        };
        let statuses: Vec<i32> = events.iter().map(|e| e.status).collect();
        assert_eq!(
            statuses,
            vec![
                pb::JobStatus::Pending as i32,
                pb::JobStatus::Running as i32,
                end as i32
            ],
            "job {n}"
        );
        let now = service
            .get_job(pb::GetJobRequest { id: job.id.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(now.version, 3);
        match end {
            pb::JobStatus::Completed => assert_eq!(
                now.result.and_then(|v| v.kind),
                Some(prost_types::value::Kind::NumberValue(n as f64))
            ),
            _ => assert_eq!(now.error_message, format!("e{n}")),
        }
    }
    // Statements were shared: fewer statements than moves.
    let text = scrape(port).await;
    let statements = sample(&text, "jobsvc_update_batch_rows_count").unwrap();
    let rows = sample(&text, "jobsvc_update_batch_rows_sum").unwrap();
    assert_eq!(rows, total as f64);
    assert!(
        statements < rows,
        "{statements} statements for {rows} moves"
    );
    eprintln!("{rows} moves in {statements} statements");
    server.stop().await;
}
