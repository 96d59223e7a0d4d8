//! Ambiguous commits: the server commits, then the answer is lost (injected: every third
//! committed write answers UNAVAILABLE). Clients retry with the same request_id, and the same
//! target status; the database ends with exactly one job per request_id and exactly one
//! version step per transition.
use std::collections::HashSet;

use jobsvc::pb::{self, JobStatus as S};
use tonic::Code;

use crate::harness::{TestServer, all_jobs, fresh_database, history, shared_pg, update};

/// Answers lost after a commit, seen by the clients of this test.
static LOST: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Retries `call` while it answers UNAVAILABLE (at most 20 times).
async fn retry<T, F, Fut>(mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    for _ in 0..20 {
        match call().await {
            Ok(r) => return r.into_inner(),
            Err(s) if s.code() == Code::Unavailable => {
                LOST.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            Err(s) => panic!("unexpected answer: {s:?}"),
        }
    }
    panic!("still unavailable after 20 tries");
}

#[tokio::test]
async fn retried_writes_after_lost_answers_apply_exactly_once() {
    let pg = shared_pg().await;
    let url = fresh_database(&pg).await;
    let server = TestServer::start_on(&url, &["--fault-drop-every", "3"]).await;
    let mut tasks = Vec::new();
    for w in 0..4 {
        let c = server.service().await;
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..25 {
                let req = pb::CreateJobRequest {
                    agent_identifier: "amb".into(),
                    request_id: format!("w{w}-{i}"),
                    ..Default::default()
                };
                let job = retry(|| {
                    let (mut c, req) = (c.clone(), req.clone());
                    async move { c.create_job(req).await }
                })
                .await;
                assert_eq!(job.version, 1);
                for (status, version) in [(S::Running, 2), (S::Completed, 3)] {
                    let moved = retry(|| {
                        let (mut c, req) = (c.clone(), update(&job.id, status));
                        async move { c.update_status(req).await }
                    })
                    .await;
                    // A retry of a move that did commit returns the job as it is: unchanged.
                    assert_eq!((moved.status, moved.version), (status as i32, version));
                }
                ids.push(job.id);
            }
            ids
        }));
    }
    let mut ids = HashSet::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    assert_eq!(ids.len(), 100, "one job per request_id");
    // Every third of the 300 committed writes lost its answer (retries commit nothing new).
    assert_eq!(LOST.load(std::sync::atomic::Ordering::Relaxed), 100);
    let mut c = server.service().await;
    let listed = all_jobs(&mut c).await;
    assert_eq!(listed.len(), 100, "no job created twice");
    for job in listed {
        assert_eq!((job.status, job.version), (S::Completed as i32, 3));
        let history: Vec<(i64, i32)> = history(&mut c, &job.id)
            .await
            .iter()
            .map(|e| (e.version, e.status))
            .collect();
        assert_eq!(
            history,
            vec![
                (1, S::Pending as i32),
                (2, S::Running as i32),
                (3, S::Completed as i32)
            ],
            "exactly one step per transition"
        );
    }
    server.stop().await;
}
