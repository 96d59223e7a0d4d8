//! The running-timeout sweeper: stale RUNNING jobs become FAILED with a reason, and a job that
//! an agent completes at the same moment is never overwritten.
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use diesel_async::RunQueryDsl;
use jobsvc::pb::{self, JobStatus as S};
use tonic::Code;

use crate::harness::{TestServer, create, eventually, fresh_database, history, shared_pg, update};

#[tokio::test]
async fn the_sweeper_fails_stale_jobs_and_never_overwrites_a_completion() {
    let pg = shared_pg().await;
    let url = fresh_database(&pg).await;
    // Agents talk to A; B, on the same database, runs the sweeper.
    let a = TestServer::start_on(&url, &[]).await;
    let mut c = a.service().await;
    let mut ids = Vec::new();
    for _ in 0..300 {
        let job = c.create_job(create("stale")).await.unwrap().into_inner();
        c.update_status(update(&job.id, S::Running)).await.unwrap();
        ids.push(job.id);
    }
    let fresh = c.create_job(create("fresh")).await.unwrap().into_inner();
    c.update_status(update(&fresh.id, S::Running))
        .await
        .unwrap();
    // The 300 started two hours ago (as far as the database knows).
    let mut conn = jobsvc::db::connect(&url).await.unwrap();
    diesel::sql_query(
        "UPDATE jobs SET started_at = now() - interval '2 hours' WHERE agent_identifier = 'stale'",
    )
    .execute(&mut conn)
    .await
    .unwrap();

    // Agents complete them; once a sixth are done, the sweeper starts and races the rest.
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for chunk in ids.chunks(75) {
        let mut c = a.service().await;
        let chunk = chunk.to_vec();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut outcome = HashMap::new();
            for id in chunk {
                let r = c.update_status(update(&id, S::Completed)).await;
                done.fetch_add(1, Ordering::Relaxed);
                let ok = match r {
                    Ok(_) => true,
                    Err(s) => {
                        assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
                        false
                    }
                };
                outcome.insert(id, ok);
            }
            outcome
        }));
    }
    eventually(Duration::from_secs(30), "50 completions", || {
        let n = AtomicUsize::load(&done, Ordering::Relaxed);
        async move { n >= 50 }
    })
    .await;
    let b = TestServer::start_on(
        &url,
        &["--running-timeout", "1h", "--sweep-interval", "20ms"],
    )
    .await;
    let mut completed_by_agent = HashMap::new();
    for t in tasks {
        completed_by_agent.extend(t.await.unwrap());
    }
    // Eventually every stale job is finished one way or the other.
    eventually(Duration::from_secs(15), "every stale job to finish", || async {
        let mut conn = jobsvc::db::connect(&url).await.unwrap();
        #[derive(diesel::QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        diesel::sql_query("SELECT count(*) AS n FROM jobs WHERE status = 'running' AND agent_identifier = 'stale'")
            .get_result::<N>(&mut conn)
            .await
            .unwrap()
            .n
            == 0
    })
    .await;

    let mut swept = 0;
    for id in &ids {
        let job = c
            .get_job(pb::GetJobRequest { id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        let history: Vec<i32> = history(&mut c, id).await.iter().map(|e| e.status).collect();
        if completed_by_agent[id] {
            // An acknowledged completion stands: one terminal move, never overwritten.
            assert_eq!(job.status, S::Completed as i32, "{job:?}");
        } else {
            assert_eq!(job.status, S::Failed as i32, "{job:?}");
            assert!(job.error_message.starts_with("timed out"), "{job:?}");
            swept += 1;
        }
        // pending, running, (the started_at rewrite: running), then exactly one terminal move.
        let terminal = history
            .iter()
            .filter(|s| ![S::Pending as i32, S::Running as i32].contains(s))
            .count();
        assert_eq!(terminal, 1, "{id}: {history:?}");
        assert_eq!(history.last(), Some(&job.status));
    }
    assert!(swept > 0, "the sweeper took part in the race");
    assert!(swept < ids.len(), "and so did the agents");
    // A job running for less than the timeout is left alone.
    let fresh = c
        .get_job(pb::GetJobRequest { id: fresh.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fresh.status, S::Running as i32);
    a.stop().await;
    b.stop().await;
}
