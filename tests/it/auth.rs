//! Who may call and what they may reach: token checks, roles, tenant isolation in the
//! application and in row-level security.
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jobsvc::pb::{self, JobStatus as S};
use tonic::Code;
use uuid::Uuid;

use crate::harness::{self, SECRET, TestServer, assert_err};

fn sign(header: serde_json::Value, claims: serde_json::Value, secret: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let h = B64.encode(header.to_string());
    let c = B64.encode(claims.to_string());
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(format!("{h}.{c}").as_bytes());
    let sig = B64.encode(mac.finalize().into_bytes());
    format!("{h}.{c}.{sig}")
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_unauthenticated_and_other_roles_denied() {
    let server = TestServer::start().await;
    let user = Uuid::new_v4().to_string();
    let hs256 = serde_json::json!({"alg": "HS256", "typ": "JWT"});
    let good = |claims: serde_json::Value| sign(hs256.clone(), claims, SECRET.as_bytes());
    let unsigned = |alg: &str| {
        format!(
            "{}.{}.",
            B64.encode(serde_json::json!({"alg": alg, "typ": "JWT"}).to_string()),
            B64.encode(serde_json::json!({"role": "service_role", "exp": now() + 600}).to_string())
        )
    };
    let cases: Vec<(&str, Option<String>, Code, &str)> = vec![
        ("no token", None, Code::Unauthenticated, "TOKEN_MISSING"),
        (
            "not bearer",
            Some("Basic abc".into()),
            Code::Unauthenticated,
            "TOKEN_MISSING",
        ),
        (
            "garbage",
            Some("Bearer not.a.jwt".into()),
            Code::Unauthenticated,
            "TOKEN_INVALID",
        ),
        (
            "wrong secret",
            Some(sign(
                hs256.clone(),
                serde_json::json!({"role": "service_role", "exp": now() + 600}),
                b"another-secret-another-secret-0000",
            )),
            Code::Unauthenticated,
            "TOKEN_INVALID",
        ),
        (
            "alg none",
            Some(unsigned("none")),
            Code::Unauthenticated,
            "TOKEN_INVALID",
        ),
        (
            "alg NoNe",
            Some(unsigned("NoNe")),
            Code::Unauthenticated,
            "TOKEN_INVALID",
        ),
        (
            "alg HS512",
            Some(sign(
                serde_json::json!({"alg": "HS512"}),
                serde_json::json!({"role": "service_role", "exp": now() + 600}),
                SECRET.as_bytes(),
            )),
            Code::Unauthenticated,
            "TOKEN_INVALID",
        ),
        (
            "expired",
            Some(good(
                serde_json::json!({"role": "service_role", "exp": now() - 3600}),
            )),
            Code::Unauthenticated,
            "TOKEN_EXPIRED",
        ),
        (
            "no exp",
            Some(good(serde_json::json!({"role": "service_role"}))),
            Code::Unauthenticated,
            "TOKEN_INVALID",
        ),
        (
            "string exp",
            Some(good(
                serde_json::json!({"role": "service_role", "exp": "9999999999"}),
            )),
            Code::Unauthenticated,
            "TOKEN_INVALID",
        ),
        (
            "not yet valid",
            Some(good(
                serde_json::json!({"role": "service_role", "exp": now() + 7200, "nbf": now() + 3600}),
            )),
            Code::Unauthenticated,
            "TOKEN_NOT_YET_VALID",
        ),
        (
            "sub not a uuid",
            Some(good(
                serde_json::json!({"role": "authenticated", "sub": "bob", "exp": now() + 600}),
            )),
            Code::Unauthenticated,
            "TOKEN_INVALID",
        ),
        (
            "authenticated without sub",
            Some(good(
                serde_json::json!({"role": "authenticated", "exp": now() + 600}),
            )),
            Code::Unauthenticated,
            "TOKEN_INVALID",
        ),
        (
            "anon",
            Some(good(
                serde_json::json!({"role": "anon", "exp": now() + 600}),
            )),
            Code::PermissionDenied,
            "ROLE_NOT_ALLOWED",
        ),
        (
            "no role",
            Some(good(serde_json::json!({"sub": user, "exp": now() + 600}))),
            Code::PermissionDenied,
            "ROLE_NOT_ALLOWED",
        ),
    ];
    let channel = server.channel().await;
    for (name, token, code, reason) in cases {
        let mut client = pb::job_service_client::JobServiceClient::new(channel.clone());
        let mut req = tonic::Request::new(pb::GetJobRequest {
            id: Uuid::new_v4().to_string(),
        });
        if let Some(t) = &token {
            let value = if t.starts_with("Bearer ") || t.starts_with("Basic ") {
                t.clone()
            } else {
                format!("Bearer {t}")
            };
            req.metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        let status = client.get_job(req).await.expect_err(name);
        assert_eq!(status.code(), code, "{name}: {status:?}");
        assert_eq!(harness::reason(&status), reason, "{name}");
    }
    // Within the leeway an expired token still works; the right token works.
    let mut c = server
        .client(Some(&good(
            serde_json::json!({"role": "service_role", "exp": now() - 5}),
        )))
        .await;
    c.create_job(pb::CreateJobRequest {
        agent_identifier: "a".into(),
        ..Default::default()
    })
    .await
    .expect("token expired 5 s ago is inside the 30 s leeway");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_only_reach_their_own_jobs() {
    let server = TestServer::start().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let mut ca = server.user(a).await;
    let mut cb = server.user(b).await;
    let mut svc = server.service().await;

    let job_a = ca
        .create_job(pb::CreateJobRequest {
            agent_identifier: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job_a.user_id, a.to_string(), "a user's job is its own");
    let same_user = ca
        .create_job(pb::CreateJobRequest {
            agent_identifier: "x".into(),
            user_id: a.to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(same_user.user_id, a.to_string());

    // B cannot see or touch A's job: it does not exist for B.
    let id = job_a.id.clone();
    assert_err(
        cb.get_job(pb::GetJobRequest { id: id.clone() }).await,
        Code::NotFound,
        "JOB_NOT_FOUND",
    );
    assert_err(
        cb.update_status(pb::UpdateStatusRequest {
            id: id.clone(),
            status: S::Running as i32,
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "JOB_NOT_FOUND",
    );
    assert_err(
        cb.cancel_job(pb::CancelJobRequest { id: id.clone() }).await,
        Code::NotFound,
        "JOB_NOT_FOUND",
    );
    assert_err(
        cb.wait_job(pb::WaitJobRequest {
            id: id.clone(),
            timeout: None,
        })
        .await,
        Code::NotFound,
        "JOB_NOT_FOUND",
    );
    assert_eq!(
        ca.get_job(pb::GetJobRequest { id: id.clone() })
            .await
            .unwrap()
            .into_inner()
            .version,
        1,
        "nothing B tried changed the job"
    );
    // B naming A as owner is refused.
    assert_err(
        cb.create_job(pb::CreateJobRequest {
            agent_identifier: "x".into(),
            user_id: a.to_string(),
            ..Default::default()
        })
        .await,
        Code::PermissionDenied,
        "USER_MISMATCH",
    );

    // The service role reaches every job and creates for anyone, or no one.
    svc.get_job(pb::GetJobRequest { id: id.clone() })
        .await
        .unwrap();
    let for_b = svc
        .create_job(pb::CreateJobRequest {
            agent_identifier: "x".into(),
            user_id: b.to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(for_b.user_id, b.to_string());
    cb.get_job(pb::GetJobRequest {
        id: for_b.id.clone(),
    })
    .await
    .expect("B sees the job made for it");
    let nobody = svc
        .create_job(pb::CreateJobRequest {
            agent_identifier: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(nobody.user_id, "");
    assert_err(
        ca.get_job(pb::GetJobRequest {
            id: nobody.id.clone(),
        })
        .await,
        Code::NotFound,
        "JOB_NOT_FOUND",
    );
    svc.update_status(pb::UpdateStatusRequest {
        id: id.clone(),
        status: S::Running as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    server.stop().await;
}

/// Row-level security is the second wall: a statement with no user filter at all, run in a
/// user's database context, still returns only that user's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unscoped_sql_in_a_user_context_sees_only_that_user() {
    use diesel_async::RunQueryDsl;
    let server = TestServer::start().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let mut svc = server.service().await;
    for owner in [a, a, b, b, b] {
        svc.create_job(pb::CreateJobRequest {
            agent_identifier: "x".into(),
            user_id: owner.to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    svc.create_job(pb::CreateJobRequest {
        agent_identifier: "x".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    let pool = jobsvc::db::pool(&server.db_url, 2).unwrap();
    let auth = jobsvc::api::auth::Authenticator::new(SECRET.as_bytes(), Duration::from_secs(0));
    let rows_for = |token: String| {
        let pool = pool.clone();
        let caller = auth.verify(&token).unwrap();
        async move {
            let mut db = jobsvc::db::scoped(&pool, &caller).await.unwrap();
            let rows = db
                .exec(|mut c| async move {
                    Ok(diesel::sql_query("SELECT * FROM jobs")
                        .load::<jobsvc::domain::Job>(&mut c)
                        .await?)
                })
                .await;
            db.finish(rows).await.unwrap()
        }
    };
    let seen = rows_for(harness::user_token(a)).await;
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|r| r.user_id == Some(a)));
    let seen = rows_for(harness::user_token(b)).await;
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|r| r.user_id == Some(b)));
    assert_eq!(rows_for(harness::service_token()).await.len(), 6);

    // The settings end with the transaction: the pooled connection is clean afterwards.
    let mut conn = pool.get().await.unwrap();
    assert_eq!(identity(&mut conn).await, ("postgres".to_string(), None));
    server.stop().await;
}

/// The database role and claims a connection's next statement runs with.
async fn identity(conn: &mut diesel_async::AsyncPgConnection) -> (String, Option<String>) {
    use diesel_async::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Who {
        #[diesel(sql_type = diesel::sql_types::Text)]
        role: String,
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
        claims: Option<String>,
    }
    let who: Who = diesel::sql_query(
        "SELECT current_user::text AS role, nullif(current_setting('request.jwt.claims', true), '') AS claims",
    )
    .get_result(conn)
    .await
    .unwrap();
    (who.role, who.claims)
}

/// A user's `BEGIN` and claims travel with the first statement. A call that gives up while
/// that statement runs leaves the transaction open on its connection, and that connection must
/// never serve the next caller: the pool's only connection is a fresh one afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_call_cancelled_mid_statement_hands_no_transaction_to_the_next_caller() {
    use diesel_async::RunQueryDsl;
    let server = TestServer::start().await;
    let pool = jobsvc::db::pool(&server.db_url, 1).unwrap();
    let auth = jobsvc::api::auth::Authenticator::new(SECRET.as_bytes(), Duration::from_secs(0));
    let caller = auth.verify(&harness::user_token(Uuid::new_v4())).unwrap();
    let mut db = jobsvc::db::scoped(&pool, &caller).await.unwrap();
    let slow = db.exec(|mut c| async move {
        diesel::sql_query("SELECT pg_sleep(3)")
            .execute(&mut c)
            .await?;
        Ok(())
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(300), slow)
            .await
            .is_err(),
        "the statement should still be running when the caller gives up"
    );
    drop(db);
    let mut conn = pool.get().await.unwrap();
    assert_eq!(identity(&mut conn).await, ("postgres".to_string(), None));
    server.stop().await;
}

/// A token is verified once and then remembered, but never past its expiry: once `exp` (plus
/// the leeway, here none) is behind, the same token gets TOKEN_EXPIRED.
#[tokio::test]
async fn a_remembered_token_still_expires() {
    let auth = jobsvc::api::auth::Authenticator::new(SECRET.as_bytes(), Duration::from_secs(0));
    let token = jobsvc::api::auth::issue(
        SECRET.as_bytes(),
        "service_role",
        None,
        Duration::from_secs(1),
    );
    auth.verify(&token).unwrap();
    auth.verify(&token).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let refused = loop {
        match auth.verify(&token) {
            Err(e) => break e,
            Ok(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Ok(_) => panic!("a token 1 s from expiry was still accepted 5 s later"),
        }
    };
    assert!(
        matches!(
            refused,
            jobsvc::error::Error::Unauthenticated {
                reason: "TOKEN_EXPIRED",
                ..
            }
        ),
        "{refused:?}"
    );
}

/// A caller without a valid token learns nothing about the database: with PostgreSQL down, a
/// service caller hears UNAVAILABLE, and a call with no token or a forged one still hears
/// UNAUTHENTICATED (authentication comes before the health check and admission).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_comes_before_the_database_status() {
    let pg = crate::harness::new_cluster("auth-first").await;
    let url = crate::harness::fresh_database(&pg).await;
    let server = TestServer::start_on(&url, &[]).await;
    let service = server.service().await;
    // The server is up and has reached the database once.
    service
        .clone()
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap();
    pg.stop().await;
    crate::harness::eventually(
        Duration::from_secs(10),
        "the server sees the database down",
        || {
            let mut service = service.clone();
            async move {
                let answer = service
                    .get_job(pb::GetJobRequest {
                        id: Uuid::new_v4().to_string(),
                    })
                    .await;
                matches!(answer, Err(s) if s.code() == Code::Unavailable)
            }
        },
    )
    .await;
    let forged = jobsvc::api::auth::issue(
        b"another-secret-another-secret-another",
        "service_role",
        None,
        Duration::from_secs(60),
    );
    for token in [None, Some(forged.as_str()), Some("not.a.jwt")] {
        let mut c = server.client(token).await;
        let answer = c
            .get_job(pb::GetJobRequest {
                id: Uuid::new_v4().to_string(),
            })
            .await;
        assert_eq!(
            answer.unwrap_err().code(),
            Code::Unauthenticated,
            "token {token:?}"
        );
        let answer = c.list_jobs(pb::ListJobsRequest::default()).await;
        assert_eq!(answer.unwrap_err().code(), Code::Unauthenticated);
    }
    server.stop().await;
}

/// The change history a user's stream catches up from is read in the user's row-level-security
/// scope: even a read that forgets its own user filter (as a bug in the stream's filter
/// would) returns only the user's events, while positions stay global.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_history_read_is_backed_by_row_level_security() {
    let server = TestServer::start().await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let mut svc = server.service().await;
    for user in [alice, bob, bob] {
        let job = svc
            .create_job(pb::CreateJobRequest {
                agent_identifier: "h".into(),
                user_id: user.to_string(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        svc.update_status(pb::UpdateStatusRequest {
            id: job.id,
            status: S::Running as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let pool = jobsvc::db::pool(&server.db_url, 2).unwrap();
    let auth = jobsvc::api::auth::Authenticator::new(SECRET.as_bytes(), Duration::from_secs(0));
    let read_all = |token: String| {
        let pool = pool.clone();
        let caller = auth.verify(&token).unwrap();
        async move {
            let mut db = jobsvc::db::scoped_read(&pool, &caller, Duration::from_secs(5))
                .await
                .unwrap();
            // No user filter in the statement: only row-level security narrows it.
            let read = db
                .exec(|c| {
                    jobsvc::db::events::read(c, jobsvc::domain::Position::default(), 100, None)
                })
                .await;
            db.finish(read).await.unwrap()
        }
    };
    let alices = read_all(harness::user_token(alice)).await;
    assert_eq!(alices.events.len(), 2, "alice's create and move");
    assert!(alices.events.iter().all(|e| e.job.user_id == Some(alice)));
    let everything = read_all(harness::service_token()).await;
    assert_eq!(everything.events.len(), 6);
    // The position a reader stands at afterwards is the same for both.
    assert_eq!(alices.tail, everything.tail);
    server.stop().await;
}

/// A token's lifetime holds for long calls too: a WaitJob whose token expires before its job
/// finishes (and before its timeout) ends with UNAUTHENTICATED, and a stream whose token
/// expires while it is still sending the existing jobs ends there, before `synced`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiry_ends_waits_and_snapshots() {
    let pg = harness::shared_pg().await;
    let url = harness::fresh_database(&pg).await;
    let server = TestServer::start_on(&url, &["--jwt-leeway", "0s"]).await;
    let user = Uuid::new_v4();
    let short = || {
        jobsvc::api::auth::issue(
            SECRET.as_bytes(),
            "authenticated",
            Some(user),
            Duration::from_secs(2),
        )
    };
    let mut svc = server.service().await;
    // Enough existing jobs (4.8 MB, more than HTTP/2's windows hold) that a client which does
    // not read holds the snapshot open.
    let payload =
        jobsvc::api::convert::json_to_struct(serde_json::json!({ "pad": "p".repeat(12_000) }));
    let mut first = None;
    for _ in 0..400 {
        let job = svc
            .create_job(pb::CreateJobRequest {
                agent_identifier: "slow".into(),
                user_id: user.to_string(),
                job_data: Some(payload.clone()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        first.get_or_insert(job);
    }
    let job = first.unwrap();

    let mut c = server.client(Some(&short())).await;
    let started = tokio::time::Instant::now();
    let waited = tokio::time::timeout(
        Duration::from_secs(30),
        c.wait_job(pb::WaitJobRequest {
            id: job.id.clone(),
            timeout: Some(prost_types::Duration {
                seconds: 120,
                nanos: 0,
            }),
        }),
    )
    .await
    .expect("the wait ends with its token, not its timeout");
    assert_err(waited, Code::Unauthenticated, "TOKEN_EXPIRED");
    assert!(started.elapsed() < Duration::from_secs(30));

    let mut c = server.client(Some(&short())).await;
    let mut stream = c
        .stream_job_updates(pb::StreamJobUpdatesRequest {
            include_existing: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The client reads nothing until its token has expired (this idle time is the test's
    // subject, not a wait for a condition), then everything that is left.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let end = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stream.message().await {
                Ok(Some(u)) => assert!(
                    !matches!(u.event, Some(pb::job_update::Event::Synced(_))),
                    "the snapshot finished after the token expired"
                ),
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the stream ends");
    assert_eq!(end.code(), Code::Unauthenticated);
    assert_eq!(harness::reason(&end), "TOKEN_EXPIRED");
    server.stop().await;
}
