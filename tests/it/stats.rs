//! GetStats: exact figures for every scope after concurrent random traffic, equal to SQL over
//! the jobs table, to the origin's job_stats view and to get_job_stats(user).
use diesel_async::RunQueryDsl;
use jobsvc::pb::{self, JobStatus as S};
use tonic::Code;
use uuid::Uuid;

use crate::harness::{TestServer, assert_err};

#[derive(diesel::QueryableByName, Debug)]
struct Truth {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    total: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pending: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    running: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    completed: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    failed: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    cancelled: i64,
    #[diesel(sql_type = diesel::sql_types::Double)]
    avg: f64,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>)]
    oldest: Option<chrono::DateTime<chrono::Utc>>,
}

fn expect(t: &Truth) -> pb::JobStats {
    pb::JobStats {
        total: t.total,
        pending: t.pending,
        running: t.running,
        completed: t.completed,
        failed: t.failed,
        cancelled: t.cancelled,
        avg_processing_seconds: t.avg,
        oldest_pending_created_at: t.oldest.map(jobsvc::api::convert::timestamp),
    }
}

async fn truth(conn: &mut diesel_async::AsyncPgConnection, where_clause: &str) -> Truth {
    diesel::sql_query(format!(
        "SELECT count(*) AS total,
                count(*) FILTER (WHERE status = 'pending') AS pending,
                count(*) FILTER (WHERE status = 'running') AS running,
                count(*) FILTER (WHERE status = 'completed') AS completed,
                count(*) FILTER (WHERE status = 'failed') AS failed,
                count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
                coalesce(avg(extract(epoch FROM completed_at - started_at))
                         FILTER (WHERE status = 'completed'), 0)::float8 AS avg,
                min(created_at) FILTER (WHERE status = 'pending') AS oldest
         FROM jobs WHERE {where_clause}"
    ))
    .get_result(conn)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_are_exact_for_every_scope_after_concurrent_traffic() {
    let server = TestServer::start().await;
    let users: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    let agents = ["alpha", "beta", "gamma"];

    // 16 concurrent callers, each creating jobs and moving them at random.
    let mut tasks = Vec::new();
    for worker in 0..16u64 {
        let c = if worker % 5 == 4 {
            server.service().await
        } else {
            server.user(users[worker as usize % 4]).await
        };
        tasks.push(tokio::spawn(async move {
            let mut c = c;
            let mut rng = worker.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            for _ in 0..25 {
                let agent = agents[(next() % 3) as usize];
                let job = c
                    .create_job(pb::CreateJobRequest {
                        agent_identifier: agent.into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let path: &[S] = match next() % 6 {
                    0 => &[],
                    1 => &[S::Running],
                    2 | 3 => &[S::Running, S::Completed],
                    4 => &[S::Failed],
                    _ => &[S::Running, S::Cancelled],
                };
                for s in path {
                    c.update_status(pb::UpdateStatusRequest {
                        id: job.id.clone(),
                        status: *s as i32,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Plain SQL counts too: move some jobs to another agent and owner, delete a few.
    let mut conn = jobsvc::db::connect(&server.db_url).await.unwrap();
    diesel::sql_query(format!(
        "UPDATE jobs SET agent_identifier = 'gamma', user_id = '{}' WHERE id IN
           (SELECT id FROM jobs WHERE agent_identifier = 'alpha' ORDER BY id LIMIT 10)",
        users[0]
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    diesel::sql_query(
        "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs ORDER BY id DESC LIMIT 7)",
    )
    .execute(&mut conn)
    .await
    .unwrap();

    let mut svc = server.service().await;
    let mut scopes: Vec<(String, String, String)> =
        vec![(String::new(), String::new(), "TRUE".into())];
    for a in agents {
        scopes.push((String::new(), a.into(), format!("agent_identifier = '{a}'")));
    }
    for u in &users {
        scopes.push((u.to_string(), String::new(), format!("user_id = '{u}'")));
        for a in agents {
            scopes.push((
                u.to_string(),
                a.into(),
                format!("user_id = '{u}' AND agent_identifier = '{a}'"),
            ));
        }
    }
    for (user_id, agent, where_clause) in &scopes {
        let got = svc
            .get_stats(pb::GetStatsRequest {
                user_id: user_id.clone(),
                agent_identifier: agent.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let want = truth(&mut conn, where_clause).await;
        assert_eq!(got, expect(&want), "scope {where_clause}");
    }
    let all = truth(&mut conn, "TRUE").await;
    assert_eq!(all.total, 16 * 25 - 7);

    // The origin's view and function agree.
    #[derive(diesel::QueryableByName)]
    struct View {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        total_jobs: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        completed_jobs: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        cancelled_jobs: i64,
        #[diesel(sql_type = diesel::sql_types::Double)]
        avg: f64,
    }
    let view: View = diesel::sql_query(
        "SELECT total_jobs, completed_jobs, cancelled_jobs, coalesce(avg_processing_time, 0)::float8 AS avg FROM job_stats",
    )
    .get_result(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        (
            view.total_jobs,
            view.completed_jobs,
            view.cancelled_jobs,
            view.avg
        ),
        (all.total, all.completed, all.cancelled, all.avg)
    );
    for u in &users {
        #[derive(diesel::QueryableByName)]
        struct F {
            #[diesel(sql_type = diesel::sql_types::Jsonb)]
            f: serde_json::Value,
        }
        let f: F = diesel::sql_query(format!("SELECT get_job_stats('{u}')::jsonb AS f"))
            .get_result(&mut conn)
            .await
            .unwrap();
        let t = truth(&mut conn, &format!("user_id = '{u}'")).await;
        let n = |k: &str| f.f[k].as_i64().unwrap();
        assert_eq!(
            (
                n("total"),
                n("pending"),
                n("running"),
                n("completed"),
                n("failed"),
                n("cancelled")
            ),
            (
                t.total,
                t.pending,
                t.running,
                t.completed,
                t.failed,
                t.cancelled
            )
        );
        let avg = f.f["avg_processing_time"].as_f64().unwrap_or(0.0);
        assert!((avg - t.avg).abs() < 1e-9, "{avg} vs {}", t.avg);
    }

    // A user gets its own figures, and may not ask for another's.
    let mut cu = server.user(users[1]).await;
    let own = cu
        .get_stats(pb::GetStatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        own,
        expect(&truth(&mut conn, &format!("user_id = '{}'", users[1])).await)
    );
    assert_err(
        cu.get_stats(pb::GetStatsRequest {
            user_id: users[2].to_string(),
            ..Default::default()
        })
        .await,
        Code::PermissionDenied,
        "USER_MISMATCH",
    );
    // An empty scope is zeros with no oldest pending job.
    let none = svc
        .get_stats(pb::GetStatsRequest {
            agent_identifier: "nobody".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(none, pb::JobStats::default());
    server.stop().await;
}
