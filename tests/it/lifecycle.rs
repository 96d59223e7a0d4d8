//! Jobs through their lifecycle: every move, every forbidden move, retries, versions,
//! idempotent creation, races, WaitJob, and JSON fidelity.
use std::time::Duration;

use jobsvc::pb::{self, JobStatus as S};
use prost_types::value::Kind;
use tonic::Code;

use crate::harness::{Client, TestServer, assert_err, create, update};

fn ts(t: &Option<prost_types::Timestamp>) -> Option<(i64, i32)> {
    t.as_ref().map(|t| (t.seconds, t.nanos))
}

/// A new job moved along the shortest path to `status`.
async fn job_in(client: &mut Client, status: S) -> pb::Job {
    let job = client
        .create_job(create("agent"))
        .await
        .unwrap()
        .into_inner();
    let path: &[S] = match status {
        S::Pending => &[],
        S::Running => &[S::Running],
        S::Completed => &[S::Running, S::Completed],
        S::Failed => &[S::Failed],
        S::Cancelled => &[S::Cancelled],
        S::Unspecified => unreachable!(),
    };
    let mut job = job;
    for s in path {
        job = client
            .update_status(update(&job.id, *s))
            .await
            .unwrap()
            .into_inner();
    }
    assert_eq!(job.status, status as i32);
    job
}

const STATES: [S; 5] = [
    S::Pending,
    S::Running,
    S::Completed,
    S::Failed,
    S::Cancelled,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_moves_set_timestamps_and_versions() {
    let server = TestServer::start().await;
    let mut c = server.service().await;

    let job = c.create_job(create("agent")).await.unwrap().into_inner();
    assert_eq!(job.status, S::Pending as i32);
    assert_eq!(job.version, 1);
    assert!(job.started_at.is_none() && job.completed_at.is_none() && job.result.is_none());
    assert_eq!(job.created_at, job.updated_at);

    let running = c
        .update_status(update(&job.id, S::Running))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((running.status, running.version), (S::Running as i32, 2));
    assert!(running.started_at.is_some() && running.completed_at.is_none());
    assert!(ts(&running.updated_at) > ts(&job.updated_at));

    let mut done = update(&job.id, S::Completed);
    done.result = Some(prost_types::Value {
        kind: Some(Kind::StringValue("ok".into())),
    });
    done.error_message = "ignored unless FAILED".into();
    let completed = c.update_status(done).await.unwrap().into_inner();
    assert_eq!(
        (completed.status, completed.version),
        (S::Completed as i32, 3)
    );
    assert_eq!(completed.started_at, running.started_at);
    assert!(ts(&completed.completed_at) >= ts(&completed.started_at));
    assert_eq!(
        completed.result.unwrap().kind,
        Some(Kind::StringValue("ok".into()))
    );
    assert_eq!(completed.error_message, "");

    // PENDING -> FAILED stores the error message and completed_at, never started_at.
    let job = c.create_job(create("agent")).await.unwrap().into_inner();
    let mut fail = update(&job.id, S::Failed);
    fail.error_message = "boom".into();
    let failed = c.update_status(fail).await.unwrap().into_inner();
    assert_eq!(failed.error_message, "boom");
    assert!(failed.started_at.is_none() && failed.completed_at.is_some());
    // RUNNING -> FAILED and RUNNING/PENDING -> CANCELLED.
    let running = job_in(&mut c, S::Running).await;
    let failed = c
        .update_status(update(&running.id, S::Failed))
        .await
        .unwrap()
        .into_inner();
    assert!(failed.started_at.is_some() && failed.completed_at.is_some());
    let running = job_in(&mut c, S::Running).await;
    let cancelled = c
        .cancel_job(pb::CancelJobRequest {
            id: running.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (cancelled.status, cancelled.version),
        (S::Cancelled as i32, 3)
    );
    assert!(cancelled.completed_at.is_some());
    let pending = job_in(&mut c, S::Pending).await;
    let cancelled = c
        .update_status(update(&pending.id, S::Cancelled))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.status, S::Cancelled as i32);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_forbidden_move_is_failed_precondition_and_retries_are_no_ops() {
    let server = TestServer::start().await;
    let mut c = server.service().await;
    let allowed = |from: S, to: S| {
        matches!(
            (from, to),
            (S::Pending, S::Running)
                | (S::Running, S::Completed)
                | (S::Pending | S::Running, S::Failed | S::Cancelled)
        )
    };
    let mut forbidden = 0;
    for from in STATES {
        for to in STATES {
            let job = job_in(&mut c, from).await;
            let result = c.update_status(update(&job.id, to)).await;
            if allowed(from, to) {
                assert_eq!(result.unwrap().into_inner().status, to as i32);
            } else if from == to && from != S::Pending {
                // The move already made: the job comes back unchanged.
                assert_eq!(result.unwrap().into_inner(), job, "{from:?} -> {to:?}");
            } else {
                forbidden += 1;
                let status = assert_err(result, Code::FailedPrecondition, "INVALID_TRANSITION");
                let name = |s: S| {
                    s.as_str_name()
                        .trim_start_matches("JOB_STATUS_")
                        .to_lowercase()
                };
                assert!(
                    status.message().contains(&name(from)) && status.message().contains(&name(to)),
                    "message names both states: {}",
                    status.message()
                );
                let after = c
                    .get_job(pb::GetJobRequest { id: job.id.clone() })
                    .await
                    .unwrap();
                assert_eq!(after.into_inner(), job, "a refused move writes nothing");
            }
        }
    }
    assert_eq!(forbidden, 15);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expected_version_guards_and_retries_ignore_it() {
    let server = TestServer::start().await;
    let mut c = server.service().await;
    let job = c.create_job(create("agent")).await.unwrap().into_inner();

    let mut stale = update(&job.id, S::Running);
    stale.expected_version = Some(7);
    let status = assert_err(
        c.update_status(stale).await,
        Code::Aborted,
        "VERSION_MISMATCH",
    );
    assert!(status.message().contains('7') && status.message().contains('1'));

    let mut right = update(&job.id, S::Running);
    right.expected_version = Some(1);
    let running = c.update_status(right.clone()).await.unwrap().into_inner();
    assert_eq!(running.version, 2);
    // The client's retry carries the version it read before its first try: still fine.
    let retried = c.update_status(right).await.unwrap().into_inner();
    assert_eq!(retried, running);
    // A forbidden move wins over a version mismatch.
    let mut back = update(&job.id, S::Pending);
    back.expected_version = Some(99);
    assert_err(
        c.update_status(back).await,
        Code::FailedPrecondition,
        "INVALID_TRANSITION",
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_is_idempotent_per_caller() {
    let server = TestServer::start().await;
    let user = uuid::Uuid::new_v4();
    let mut c = server.user(user).await;
    let mut req = create("agent");
    req.request_id = "req-1".into();
    req.job_data = Some(harness_struct(serde_json::json!({"a": 1})));
    let first = c.create_job(req.clone()).await.unwrap().into_inner();
    let second = c.create_job(req.clone()).await.unwrap().into_inner();
    assert_eq!(first, second, "the same request_id returns the same job");

    let mut changed = req.clone();
    changed.job_data = Some(harness_struct(serde_json::json!({"a": 2})));
    assert_err(
        c.create_job(changed).await,
        Code::AlreadyExists,
        "IDEMPOTENCY_KEY_REUSED",
    );
    let mut other_agent = req.clone();
    other_agent.agent_identifier = "other".into();
    assert_err(
        c.create_job(other_agent).await,
        Code::AlreadyExists,
        "IDEMPOTENCY_KEY_REUSED",
    );

    // Another caller's identical key is its own.
    let mut c2 = server.user(uuid::Uuid::new_v4()).await;
    let theirs = c2.create_job(req.clone()).await.unwrap().into_inner();
    assert_ne!(theirs.id, first.id);

    // Racing the same key: one job.
    let mut req = create("agent");
    req.request_id = "race".into();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut c = c.clone();
        let req = req.clone();
        tasks.push(tokio::spawn(async move {
            c.create_job(req).await.unwrap().into_inner().id
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap());
    }
    assert_eq!(
        ids.len(),
        1,
        "concurrent creates with one request_id made one job"
    );
    server.stop().await;
}

pub fn harness_struct(v: serde_json::Value) -> prost_types::Struct {
    jobsvc::api::convert::json_to_struct(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_have_one_winner_per_move() {
    let server = TestServer::start().await;
    let c = server.service().await;
    for round in 0..3 {
        let job = c
            .clone()
            .create_job(create("agent"))
            .await
            .unwrap()
            .into_inner();
        let mut tasks = Vec::new();
        for i in 0..50 {
            let mut c = c.clone();
            let id = job.id.clone();
            // Half race to RUNNING, half to COMPLETED; some with the version they read.
            let target = if i % 2 == 0 { S::Running } else { S::Completed };
            tasks.push(tokio::spawn(async move {
                let mut req = update(&id, target);
                if i % 3 == 0 {
                    req.expected_version = Some(if target == S::Running { 1 } else { 2 });
                }
                match c.update_status(req).await {
                    Ok(j) => Some(j.into_inner().version),
                    Err(e) => {
                        assert!(
                            matches!(e.code(), Code::FailedPrecondition | Code::Aborted),
                            "round {round}: {e:?}"
                        );
                        None
                    }
                }
            }));
        }
        let mut versions = Vec::new();
        for t in tasks {
            if let Some(v) = t.await.unwrap() {
                versions.push(v);
            }
        }
        let end = c
            .clone()
            .get_job(pb::GetJobRequest { id: job.id.clone() })
            .await
            .unwrap()
            .into_inner();
        // Every answer is a version that existed; no move was applied twice or lost.
        assert!(versions.iter().all(|v| (2..=3).contains(v)), "{versions:?}");
        assert!(
            versions.contains(&2),
            "RUNNING was applied once and returned"
        );
        if end.status == S::Completed as i32 {
            assert_eq!(end.version, 3, "two moves, two version steps");
            assert!(end.started_at.is_some() && end.completed_at.is_some());
        } else {
            assert_eq!((end.status, end.version), (S::Running as i32, 2));
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_job_returns_on_terminal_state_or_timeout() {
    let server = TestServer::start().await;
    let mut c = server.service().await;
    let job = c.create_job(create("agent")).await.unwrap().into_inner();

    // Times out with the job as it is.
    let waited = c
        .wait_job(pb::WaitJobRequest {
            id: job.id.clone(),
            timeout: Some(prost_types::Duration {
                seconds: 0,
                nanos: 200_000_000,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(waited.status, S::Pending as i32);

    // Woken by a completion from another client.
    let waiter = {
        let mut c = c.clone();
        let id = job.id.clone();
        tokio::spawn(async move {
            c.wait_job(pb::WaitJobRequest {
                id,
                timeout: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
            })
            .await
            .unwrap()
            .into_inner()
        })
    };
    c.update_status(update(&job.id, S::Running)).await.unwrap();
    let done = c
        .update_status(update(&job.id, S::Completed))
        .await
        .unwrap()
        .into_inner();
    let waited = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("WaitJob returned after the job completed")
        .unwrap();
    assert_eq!(waited, done);

    // A change by plain SQL (not through this process) is seen by re-reading.
    let job = c.create_job(create("agent")).await.unwrap().into_inner();
    let waiter = {
        let mut c = c.clone();
        let id = job.id.clone();
        tokio::spawn(async move {
            c.wait_job(pb::WaitJobRequest { id, timeout: None })
                .await
                .unwrap()
                .into_inner()
        })
    };
    {
        use diesel_async::RunQueryDsl;
        let mut conn = jobsvc::db::connect(&server.db_url).await.unwrap();
        diesel::sql_query(format!(
            "UPDATE jobs SET status = 'cancelled', completed_at = now() WHERE id = '{}'",
            job.id
        ))
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let waited = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((waited.status, waited.version), (S::Cancelled as i32, 2));

    let neg = c
        .wait_job(pb::WaitJobRequest {
            id: job.id.clone(),
            timeout: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
        })
        .await;
    assert_err(neg, Code::InvalidArgument, "INVALID_DURATION");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_data_round_trips_exactly() {
    let server = TestServer::start().await;
    let mut c = server.service().await;
    let data = serde_json::json!({
        "int": 42, "neg": -3, "float": 0.125, "big": 9007199254740992i64, "t": true, "f": false,
        "nothing": null, "emoji": "🦀 ünïcödé", "日本語キー": {"list": [1, "2", [3.5], {"x": null}]},
        "empty": {}, "none": []
    });
    let mut req = create("agent");
    req.job_data = Some(harness_struct(data.clone()));
    let job = c.create_job(req).await.unwrap().into_inner();
    let fetched = c
        .get_job(pb::GetJobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    let limits = jobsvc::api::convert::JsonLimits {
        max_bytes: 1 << 20,
        max_depth: 32,
        max_job_bytes: 3 << 20,
    };
    let back = jobsvc::api::convert::struct_to_json("job_data", fetched.job_data.unwrap(), limits)
        .unwrap();
    assert_eq!(back, data);

    // The stored JSON is the same document, as SQL sees it.
    use diesel_async::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Same {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        same: bool,
    }
    let mut conn = jobsvc::db::connect(&server.db_url).await.unwrap();
    let same: Same = diesel::sql_query("SELECT job_data = $1 AS same FROM jobs WHERE id = $2")
        .bind::<diesel::sql_types::Jsonb, _>(&data)
        .bind::<diesel::sql_types::Uuid, _>(uuid::Uuid::parse_str(&job.id).unwrap())
        .get_result(&mut conn)
        .await
        .unwrap();
    assert!(same.same);

    // A result of every JSON kind survives COMPLETED.
    let running = job_in(&mut c, S::Running).await;
    for (i, v) in [
        serde_json::json!(null),
        serde_json::json!([1, {"a": "b"}]),
        serde_json::json!(2.5),
    ]
    .into_iter()
    .enumerate()
    {
        let job = if i == 0 {
            running.clone()
        } else {
            job_in(&mut c, S::Running).await
        };
        let mut req = update(&job.id, S::Completed);
        req.result = Some(jobsvc::api::convert::json_to_value(v.clone()));
        let done = c.update_status(req).await.unwrap().into_inner();
        let back =
            jobsvc::api::convert::value_to_json("result", done.result.unwrap(), limits).unwrap();
        assert_eq!(back, v);
    }
    server.stop().await;
}
