//! ListJobs: filters against SQL ground truth, keyset paging under concurrent inserts, token
//! misuse, and visibility.
use std::collections::HashSet;
use std::time::Duration;

use diesel_async::RunQueryDsl;
use jobsvc::pb::{self, JobStatus as S};
use tonic::Code;
use uuid::Uuid;

use crate::harness::{Client, TestServer, assert_err};

/// Every page of a listing, following next_page_token.
async fn list_all(c: &mut Client, mut req: pb::ListJobsRequest) -> Vec<pb::Job> {
    let mut out = Vec::new();
    for _ in 0..10_000 {
        let page = c.list_jobs(req.clone()).await.unwrap().into_inner();
        assert!(
            page.jobs.len() as i32
                <= if req.page_size == 0 {
                    50
                } else {
                    req.page_size
                }
        );
        out.extend(page.jobs);
        if page.next_page_token.is_empty() {
            return out;
        }
        req.page_token = page.next_page_token;
    }
    panic!("paging did not end");
}

#[derive(diesel::QueryableByName)]
struct Id {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
}

/// The ids SQL returns for a WHERE clause, newest first.
async fn truth(server: &TestServer, where_clause: &str) -> Vec<String> {
    let mut conn = jobsvc::db::connect(&server.db_url).await.unwrap();
    let rows: Vec<Id> = diesel::sql_query(format!(
        "SELECT id FROM jobs WHERE {where_clause} ORDER BY created_at DESC, id DESC"
    ))
    .load(&mut conn)
    .await
    .unwrap();
    rows.into_iter().map(|r| r.id.to_string()).collect()
}

fn ids(jobs: &[pb::Job]) -> Vec<String> {
    jobs.iter().map(|j| j.id.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_filter_matches_sql_ground_truth() {
    let server = TestServer::start().await;
    let users = [Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4()];
    // 600 jobs: 3 users (and some owned by no one), 4 agents, every status, varied job_data,
    // created over 60 days (some sharing one timestamp, to exercise the id tie-break).
    let mut conn = jobsvc::db::connect(&server.db_url).await.unwrap();
    diesel::sql_query(format!(
        "INSERT INTO jobs (user_id, agent_identifier, status, job_data, created_at, started_at, completed_at)
         SELECT CASE WHEN i % 10 = 9 THEN NULL ELSE (ARRAY['{}','{}','{}']::uuid[])[1 + i % 3] END,
                'agent-' || (i % 4),
                (ARRAY['pending','running','completed','failed','cancelled']::job_status[])[1 + (i / 3) % 5],
                jsonb_build_object('kind', 'k' || (i % 7), 'n', i % 5, 'tags', jsonb_build_array('t' || (i % 3))),
                now() - make_interval(mins => (i / 2) * 137),
                CASE WHEN (i / 3) % 5 IN (1, 2) THEN now() - make_interval(hours => i % 48) END,
                CASE WHEN (i / 3) % 5 >= 2 THEN now() END
         FROM generate_series(1, 600) AS i",
        users[0], users[1], users[2]
    ))
    .execute(&mut conn)
    .await
    .unwrap();

    let mut svc = server.service().await;
    let contains = |v: serde_json::Value| Some(jobsvc::api::convert::json_to_struct(v));
    let day_ago = prost_types::Timestamp {
        seconds: chrono::Utc::now().timestamp() - 86_400 * 20,
        nanos: 0,
    };
    let week_ago = prost_types::Timestamp {
        seconds: chrono::Utc::now().timestamp() - 86_400 * 40,
        nanos: 500_000_000,
    };
    let base = pb::ListJobsRequest {
        page_size: 37,
        ..Default::default()
    };
    let u0 = users[0].to_string();
    let cases: Vec<(&str, pb::ListJobsRequest, String)> = vec![
        ("no filter", base.clone(), "TRUE".into()),
        (
            "one status",
            pb::ListJobsRequest { statuses: vec![S::Running as i32], ..base.clone() },
            "status = 'running'".into(),
        ),
        (
            "several statuses",
            pb::ListJobsRequest { statuses: vec![S::Failed as i32, S::Pending as i32, S::Failed as i32], ..base.clone() },
            "status IN ('failed', 'pending')".into(),
        ),
        (
            "agent",
            pb::ListJobsRequest { agent_identifier: "agent-2".into(), ..base.clone() },
            "agent_identifier = 'agent-2'".into(),
        ),
        (
            "user",
            pb::ListJobsRequest { user_id: u0.clone(), ..base.clone() },
            format!("user_id = '{u0}'"),
        ),
        (
            "created_after",
            pb::ListJobsRequest { created_after: Some(day_ago), ..base.clone() },
            format!("created_at > to_timestamp({})", day_ago.seconds),
        ),
        (
            "created window",
            pb::ListJobsRequest { created_after: Some(week_ago), created_before: Some(day_ago), ..base.clone() },
            format!("created_at > to_timestamp({}.5) AND created_at < to_timestamp({})", week_ago.seconds, day_ago.seconds),
        ),
        (
            "job_data_contains",
            pb::ListJobsRequest { job_data_contains: contains(serde_json::json!({"kind": "k3"})), ..base.clone() },
            "job_data @> '{\"kind\": \"k3\"}'".into(),
        ),
        (
            "job_data_contains nested array",
            pb::ListJobsRequest { job_data_contains: contains(serde_json::json!({"tags": ["t1"], "n": 2})), ..base.clone() },
            "job_data @> '{\"tags\": [\"t1\"], \"n\": 2}'".into(),
        ),
        (
            "running_longer_than",
            pb::ListJobsRequest { running_longer_than: Some(prost_types::Duration { seconds: 3600 * 24, nanos: 0 }), ..base.clone() },
            "status = 'running' AND started_at < now() - interval '24 hours'".into(),
        ),
        (
            "running_longer_than with RUNNING among statuses",
            pb::ListJobsRequest {
                running_longer_than: Some(prost_types::Duration { seconds: 3600 * 12, nanos: 0 }),
                statuses: vec![S::Failed as i32, S::Running as i32],
                ..base.clone()
            },
            "status = 'running' AND started_at < now() - interval '12 hours'".into(),
        ),
        (
            "running_longer_than without RUNNING among statuses",
            pb::ListJobsRequest {
                running_longer_than: Some(prost_types::Duration { seconds: 60, nanos: 0 }),
                statuses: vec![S::Pending as i32],
                ..base.clone()
            },
            "FALSE".into(),
        ),
        (
            "everything combined",
            pb::ListJobsRequest {
                statuses: vec![S::Running as i32, S::Completed as i32],
                agent_identifier: "agent-1".into(),
                user_id: u0.clone(),
                created_after: Some(week_ago),
                job_data_contains: contains(serde_json::json!({"tags": ["t0"]})),
                ..base.clone()
            },
            format!(
                "status IN ('running', 'completed') AND agent_identifier = 'agent-1' AND user_id = '{u0}'
                 AND created_at > to_timestamp({}.5) AND job_data @> '{{\"tags\": [\"t0\"]}}'",
                week_ago.seconds
            ),
        ),
    ];
    for (name, req, where_clause) in cases {
        let got = ids(&list_all(&mut svc, req).await);
        let want = truth(&server, &where_clause).await;
        assert!(
            !want.is_empty() || name.contains("without RUNNING"),
            "{name}: the case selects something"
        );
        assert_eq!(got, want, "{name}");
    }

    // A user sees exactly its own jobs, whatever it filters by.
    let mut cu = server.user(users[1]).await;
    let got = ids(&list_all(&mut cu, base.clone()).await);
    assert_eq!(
        got,
        truth(&server, &format!("user_id = '{}'", users[1])).await
    );
    let got = ids(&list_all(
        &mut cu,
        pb::ListJobsRequest {
            statuses: vec![S::Pending as i32],
            ..base.clone()
        },
    )
    .await);
    assert_eq!(
        got,
        truth(
            &server,
            &format!("user_id = '{}' AND status = 'pending'", users[1])
        )
        .await
    );
    assert_err(
        cu.list_jobs(pb::ListJobsRequest {
            user_id: u0.clone(),
            ..base.clone()
        })
        .await,
        Code::PermissionDenied,
        "USER_MISMATCH",
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_never_repeats_or_skips_while_jobs_are_created() {
    let server = TestServer::start().await;
    let user = Uuid::new_v4();
    let mut conn = jobsvc::db::connect(&server.db_url).await.unwrap();
    // 1,234 jobs, many sharing a created_at (ties broken by id).
    diesel::sql_query(format!(
        "INSERT INTO jobs (user_id, agent_identifier, created_at)
         SELECT '{user}', 'a', now() - make_interval(secs => i / 3) FROM generate_series(1, 1234) AS i"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    let existing = truth(&server, "TRUE").await;
    assert_eq!(existing.len(), 1234);

    // Another task keeps creating jobs for the same user while we page.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let mut c = server.user(user).await;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut made = 0;
            while !std::sync::atomic::AtomicBool::load(&stop, std::sync::atomic::Ordering::Relaxed)
                && made < 2000
            {
                c.create_job(pb::CreateJobRequest {
                    agent_identifier: "a".into(),
                    ..Default::default()
                })
                .await
                .unwrap();
                made += 1;
            }
            made
        })
    };
    let mut c = server.user(user).await;
    let mut req = pb::ListJobsRequest {
        page_size: 100,
        ..Default::default()
    };
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page = c.list_jobs(req.clone()).await.unwrap().into_inner();
        pages += 1;
        seen.extend(page.jobs);
        if page.next_page_token.is_empty() {
            break;
        }
        req.page_token = page.next_page_token;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let made = writer.await.unwrap();
    assert!(made > 0, "jobs were created during paging");
    assert!(pages >= 13);

    // Newest first, no repeats, and every job that existed at the start exactly once.
    let keys: Vec<(i64, i32, String)> = seen
        .iter()
        .map(|j| {
            let t = j.created_at.unwrap();
            (t.seconds, t.nanos, j.id.clone())
        })
        .collect();
    assert!(
        keys.windows(2).all(|w| w[0] > w[1]),
        "strictly newest first"
    );
    let seen_ids: HashSet<String> = ids(&seen).into_iter().collect();
    assert_eq!(seen_ids.len(), seen.len(), "no job repeated");
    for id in &existing {
        assert!(
            seen_ids.contains(id),
            "job {id} that existed at the start was skipped"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_tokens_and_sizes_are_checked() {
    let server = TestServer::start().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let mut ca = server.user(a).await;
    let mut cb = server.user(b).await;
    for _ in 0..5 {
        ca.create_job(pb::CreateJobRequest {
            agent_identifier: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        cb.create_job(pb::CreateJobRequest {
            agent_identifier: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let first = ca
        .list_jobs(pb::ListJobsRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.jobs.len(), 2);
    let token = first.next_page_token.clone();
    assert!(!token.is_empty());

    let with = |token: &str| pb::ListJobsRequest {
        page_size: 2,
        page_token: token.into(),
        ..Default::default()
    };
    // The same token works again (tokens are stateless) and gives the same next page.
    let p2 = ca.list_jobs(with(&token)).await.unwrap().into_inner();
    assert_eq!(
        ids(&p2.jobs),
        ids(&ca.list_jobs(with(&token)).await.unwrap().into_inner().jobs)
    );
    // Another filter, or another user, with this token: refused.
    let mut other_filter = with(&token);
    other_filter.agent_identifier = "x".into();
    assert_err(
        ca.list_jobs(other_filter).await,
        Code::InvalidArgument,
        "PAGE_TOKEN_FILTER_MISMATCH",
    );
    assert_err(
        cb.list_jobs(with(&token)).await,
        Code::InvalidArgument,
        "PAGE_TOKEN_FILTER_MISMATCH",
    );
    // Forged and tampered tokens: refused.
    let mut tampered = token.clone().into_bytes();
    let i = tampered.len() / 2;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    for bad in [
        String::from_utf8(tampered).unwrap(),
        "garbage".into(),
        "A".repeat(1000),
        "😀".into(),
    ] {
        assert_err(
            ca.list_jobs(with(&bad)).await,
            Code::InvalidArgument,
            "INVALID_PAGE_TOKEN",
        );
    }
    // page_size: negative refused, 0 means 50, huge is clamped to 1000.
    assert_err(
        ca.list_jobs(pb::ListJobsRequest {
            page_size: -1,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "INVALID_PAGE_SIZE",
    );
    let mut svc = server.service().await;
    let mut conn = jobsvc::db::connect(&server.db_url).await.unwrap();
    diesel::sql_query(
        "INSERT INTO jobs (agent_identifier) SELECT 'bulk' FROM generate_series(1, 1100)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let page = svc
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.jobs.len(), 50);
    let page = svc
        .list_jobs(pb::ListJobsRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.jobs.len(), 1000);
    assert!(!page.next_page_token.is_empty());
    // Bad filter values.
    assert_err(
        svc.list_jobs(pb::ListJobsRequest {
            statuses: vec![0],
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "INVALID_STATUS",
    );
    assert_err(
        svc.list_jobs(pb::ListJobsRequest {
            user_id: "nope".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "INVALID_UUID",
    );
    assert_err(
        svc.list_jobs(pb::ListJobsRequest {
            running_longer_than: Some(prost_types::Duration {
                seconds: -5,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "INVALID_DURATION",
    );
    assert_err(
        svc.list_jobs(pb::ListJobsRequest {
            created_after: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: -1,
            }),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "INVALID_TIMESTAMP",
    );
    server.stop().await;
}

/// Pages filtered only by owner reuse one cached plan (PostgreSQL on its own would plan every
/// one afresh: under `LIMIT $n` the generic plan looks twice as dear); pages with a status
/// filter are planned for their values every time. Read off the connection's own prepared
/// statements, for a user (row-level security) and for the service role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_only_pages_keep_one_plan_and_filtered_pages_are_planned_each_time() {
    use jobsvc::db::{self, Plans};
    use jobsvc::domain::ListFilter;
    let server = TestServer::start().await;
    let user = Uuid::new_v4();
    let mut svc = server.service().await;
    for _ in 0..3 {
        svc.create_job(pb::CreateJobRequest {
            agent_identifier: "a".into(),
            user_id: user.to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let pool = db::pool(&server.db_url, 1).unwrap();
    let auth =
        jobsvc::api::auth::Authenticator::new(crate::harness::SECRET.as_bytes(), Duration::ZERO);
    let callers = [
        auth.verify(&crate::harness::user_token(user)).unwrap(),
        auth.verify(&crate::harness::service_token()).unwrap(),
    ];
    let owner_only = ListFilter {
        user: Some(user),
        ..Default::default()
    };
    let by_status = ListFilter {
        user: Some(user),
        statuses: vec![jobsvc::domain::JobStatus::Pending],
        ..Default::default()
    };
    for (filter, plans) in [(&owner_only, Plans::Generic), (&by_status, Plans::Custom)] {
        assert_eq!(plans == Plans::Custom, filter.plan_depends_on_values());
        for caller in &callers {
            for _ in 0..8 {
                let mut scoped = db::scoped_with_plans(&pool, caller, plans).await.unwrap();
                let rows = scoped.exec(|c| db::jobs::list(c, filter, None, 51)).await;
                assert_eq!(scoped.finish(rows).await.unwrap().len(), 3);
            }
        }
    }
    #[derive(diesel::QueryableByName, Debug)]
    struct Plan {
        #[diesel(sql_type = diesel::sql_types::Text)]
        statement: String,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        generic_plans: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        custom_plans: i64,
    }
    let mut conn = pool.get().await.unwrap();
    let plans: Vec<Plan> = diesel::sql_query(
        "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements \
         WHERE statement LIKE 'SELECT id, %ORDER BY created_at DESC, id DESC LIMIT%'",
    )
    .load(&mut conn)
    .await
    .unwrap();
    assert_eq!(plans.len(), 2, "{plans:?}");
    for p in &plans {
        let (generic, custom) = match p.statement.contains("status =") {
            false => (16, 0),
            true => (0, 16),
        };
        assert_eq!(
            (p.generic_plans, p.custom_plans),
            (generic, custom),
            "{p:?}"
        );
    }
    server.stop().await;
}
