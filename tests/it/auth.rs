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
            "TOKEN_BAD_SIGNATURE",
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

/// A user's reads run on connections whose session role is `authenticated`, with the user's
/// claims sent in front of the statement and no transaction: a read that forgets its own
/// user filter (`scope` None) still sees only the user's jobs. On one connection used by
/// alice, then bob, then alice again, nobody reads under the claims of the one before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_read_is_backed_by_row_level_security_without_a_transaction() {
    let server = TestServer::start().await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let mut svc = server.service().await;
    let mut ids = std::collections::HashMap::new();
    for user in [alice, bob] {
        let job = svc
            .create_job(pb::CreateJobRequest {
                agent_identifier: "h".into(),
                user_id: user.to_string(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        ids.insert(user, job.id.parse::<Uuid>().unwrap());
    }
    // One connection, so every read below reuses it.
    let pool = jobsvc::db::user_read_pool(&server.db_url, 1).unwrap();
    let read = |reader: Uuid, owner: Uuid| {
        let pool = pool.clone();
        let id = ids[&owner];
        async move {
            let mut db = jobsvc::db::user_read(&pool, reader, None).await.unwrap();
            // No application filter: only row-level security narrows it.
            let row = db.exec(|c| jobsvc::db::jobs::get(c, None, id)).await;
            db.finish(row).await.unwrap().map(|job| job.user_id)
        }
    };
    for (reader, owner) in [
        (alice, alice),
        (alice, bob),
        (bob, alice),
        (bob, bob),
        (alice, bob),
    ] {
        let seen = read(reader, owner).await;
        let expected = (reader == owner).then_some(Some(owner));
        assert_eq!(seen, expected, "{reader} reading {owner}'s job");
    }
    // And the session itself is the user role: even a statement that sets no claims at all
    // sees no job.
    let conn = pool.get().await.unwrap();
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    use diesel_async::RunQueryDsl;
    let mut c: &diesel_async::AsyncPgConnection = &conn;
    diesel_async::SimpleAsyncConnection::batch_execute(
        &mut c,
        "SELECT set_config('request.jwt.claims', '', false)",
    )
    .await
    .unwrap();
    let all: Vec<Count> = diesel::sql_query("SELECT count(*) AS n FROM jobs")
        .load(&mut c)
        .await
        .unwrap();
    assert_eq!(all[0].n, 0);
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
    let short = || jobsvc::api::auth::issue(SECRET.as_bytes(), "authenticated", Some(user), TTL);
    const TTL: Duration = Duration::from_secs(5);
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

    let issued = tokio::time::Instant::now();
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
    tokio::time::sleep_until(issued + TTL + Duration::from_secs(1)).await;
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

/// Tokens as a current Supabase project issues them: with the audience and issuers
/// configured, a user token carrying every Supabase claim works end to end (create, list,
/// stream), and so does a legacy service key (iss `supabase`, no aud); a wrong audience or
/// issuer is UNAUTHENTICATED with its reason, and anonymous sign-ins are refused when the
/// flag says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supabase_shaped_tokens_audience_issuer_and_anonymous_users() {
    let pg = harness::shared_pg().await;
    let url = harness::fresh_database(&pg).await;
    const ISSUER: &str = "https://abcdefghijklmnop.supabase.co/auth/v1";
    let metrics_port = crate::harness::free_addr().port().to_string();
    let server = TestServer::start_on(
        &url,
        &[
            "--metrics-listen",
            &metrics_port,
            "--jwt-audience",
            "authenticated",
            "--jwt-issuer",
            ISSUER,
            "--jwt-issuer",
            "supabase",
            "--refuse-anonymous",
        ],
    )
    .await;
    let now = chrono::Utc::now().timestamp();
    let user = Uuid::new_v4();
    let hs256 = serde_json::json!({"alg": "HS256", "typ": "JWT"});
    let user_claims = |aud: &str, iss: &str, anonymous: bool| {
        serde_json::json!({
            "iss": iss, "aud": aud, "sub": user.to_string(), "role": "authenticated",
            "exp": now + 600, "iat": now, "aal": "aal1",
            "session_id": Uuid::new_v4().to_string(), "is_anonymous": anonymous,
            "email": "someone@example.com", "app_metadata": {"provider": "email"},
        })
    };
    let token = sign(
        hs256.clone(),
        user_claims("authenticated", ISSUER, false),
        SECRET.as_bytes(),
    );
    let mut c = server.client(Some(&token)).await;
    let made = c
        .create_job(pb::CreateJobRequest {
            agent_identifier: "supabase".into(),
            ..Default::default()
        })
        .await
        .expect("a Supabase user token creates")
        .into_inner();
    assert_eq!(made.user_id, user.to_string());
    let listed = c
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.jobs.len(), 1);
    assert_eq!(harness::first_existing(&mut c).await.id, made.id);

    // Supabase's legacy service key: iss "supabase", no aud, no sub.
    let legacy = sign(
        hs256.clone(),
        serde_json::json!({"iss": "supabase", "role": "service_role", "exp": now + 600, "iat": now}),
        SECRET.as_bytes(),
    );
    assert_eq!(
        crate::harness::all_jobs(&mut server.client(Some(&legacy)).await)
            .await
            .len(),
        1
    );

    let refused: [(serde_json::Value, Code, &str); 4] = [
        (
            user_claims("anon", ISSUER, false),
            Code::Unauthenticated,
            "TOKEN_WRONG_AUDIENCE",
        ),
        (
            user_claims("authenticated", "https://other.supabase.co/auth/v1", false),
            Code::Unauthenticated,
            "TOKEN_WRONG_ISSUER",
        ),
        (
            serde_json::json!({"sub": user.to_string(), "role": "authenticated", "exp": now + 600, "iss": ISSUER}),
            Code::Unauthenticated,
            "TOKEN_WRONG_AUDIENCE",
        ),
        (
            user_claims("authenticated", ISSUER, true),
            Code::PermissionDenied,
            "ANONYMOUS_NOT_ALLOWED",
        ),
    ];
    for (claims, code, reason) in refused {
        let token = sign(hs256.clone(), claims, SECRET.as_bytes());
        let answer = server
            .client(Some(&token))
            .await
            .list_jobs(pb::ListJobsRequest::default())
            .await;
        assert_err(answer, code, reason);
    }
    // Each check is counted by outcome and reason.
    let text = crate::ops::scrape(metrics_port.parse().unwrap()).await;
    for (series, n) in [
        (
            r#"jobsvc_auth_checks_total{outcome="refused",reason="TOKEN_WRONG_AUDIENCE"}"#,
            2.0,
        ),
        (
            r#"jobsvc_auth_checks_total{outcome="refused",reason="TOKEN_WRONG_ISSUER"}"#,
            1.0,
        ),
        (
            r#"jobsvc_auth_checks_total{outcome="refused",reason="ANONYMOUS_NOT_ALLOWED"}"#,
            1.0,
        ),
    ] {
        assert_eq!(crate::ops::sample(&text, series), Some(n), "{series}");
    }
    assert!(
        crate::ops::sample(
            &text,
            r#"jobsvc_auth_checks_total{outcome="accepted",reason=""}"#
        ) >= Some(4.0)
    );
    server.stop().await;
}

/// A rotation of the JWT secret across two replicas, as docs/operations.md's runbook does it
/// (add the new secret as previous everywhere, swap, then remove the old): callers' tokens
/// signed with either secret keep working throughout, and a page token, a resume token and
/// a waiting WaitJob taken before the rotation go on after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_across_two_replicas_loses_no_caller_and_no_cursor() {
    const OLD: &str = "old-secret-old-secret-old-secret-0001";
    const NEW: &str = "new-secret-new-secret-new-secret-0002";
    let pg = harness::shared_pg().await;
    let url = harness::fresh_database(&pg).await;
    let user = Uuid::new_v4();
    let token = |secret: &str| {
        jobsvc::api::auth::issue(
            secret.as_bytes(),
            "authenticated",
            Some(user),
            Duration::from_secs(3600),
        )
    };
    let (old_token, new_token) = (token(OLD), token(NEW));
    let a = TestServer::start_with_secret(&url, OLD, &[]).await;
    let b = TestServer::start_with_secret(&url, OLD, &[]).await;

    // Before: three jobs, a page token, a resume token and a waiting WaitJob, all under OLD.
    let mut ca = a.client(Some(&old_token)).await;
    let mut made = Vec::new();
    for _ in 0..3 {
        made.push(
            ca.create_job(harness::create("rot"))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let page = ca
        .list_jobs(pb::ListJobsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut stream = ca
        .stream_job_updates(pb::StreamJobUpdatesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let resume = loop {
        let u = stream.message().await.unwrap().unwrap();
        if matches!(u.event, Some(pb::job_update::Event::Synced(_))) {
            break u.resume_token;
        }
    };
    drop(stream);
    let waited = {
        let mut cb = b.client(Some(&old_token)).await;
        let id = made[0].id.clone();
        tokio::spawn(async move {
            cb.wait_job(pb::WaitJobRequest {
                id,
                timeout: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
            })
            .await
        })
    };

    // 1. Add NEW as previous everywhere, one replica at a time.
    let previous = |s: &str| vec!["--jwt-previous-secret".to_string(), s.to_string()];
    let start = |secret: &'static str, extra: Vec<String>| {
        let url = url.clone();
        async move {
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            TestServer::start_with_secret(&url, secret, &extra).await
        }
    };
    a.stop().await;
    let a = start(OLD, previous(NEW)).await;
    // Mid-rotation, both secrets work on the restarted replica; the other still runs OLD.
    for t in [&old_token, &new_token] {
        assert_eq!(
            harness::all_jobs(&mut a.client(Some(t)).await).await.len(),
            3
        );
    }
    b.stop().await;
    let b = start(OLD, previous(NEW)).await;
    // The wait was cut by its replica's restart: it answered with the job as it was.
    let answer = waited
        .await
        .unwrap()
        .expect("the wait answers, not UNAUTHENTICATED");
    assert_eq!(answer.into_inner().status, S::Pending as i32);

    // 2. Swap: NEW is current, OLD previous.
    a.stop().await;
    let a = start(NEW, previous(OLD)).await;
    b.stop().await;
    let b = start(NEW, previous(OLD)).await;
    for server in [&a, &b] {
        for t in [&old_token, &new_token] {
            let mut c = server.client(Some(t)).await;
            assert_eq!(
                harness::all_jobs(&mut c).await.len(),
                3,
                "no UNAUTHENTICATED"
            );
            // The page token taken before the rotation goes on.
            let next = c
                .list_jobs(pb::ListJobsRequest {
                    page_size: 1,
                    page_token: page.next_page_token.clone(),
                    ..Default::default()
                })
                .await
                .expect("the page token survives the rotation")
                .into_inner();
            assert_eq!(next.jobs.len(), 1);
            assert_ne!(next.jobs[0].id, page.jobs[0].id);
        }
    }
    // The resume token taken before the rotation delivers what happened since.
    let mut cb = b.client(Some(&new_token)).await;
    cb.cancel_job(pb::CancelJobRequest {
        id: made[1].id.clone(),
    })
    .await
    .unwrap();
    let mut resumed = cb
        .stream_job_updates(pb::StreamJobUpdatesRequest {
            resume_token: resume,
            ..Default::default()
        })
        .await
        .expect("the resume token survives the rotation")
        .into_inner();
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(pb::job_update::Event::Job(j)) =
                resumed.message().await.unwrap().unwrap().event
            {
                return j;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(got.id, made[1].id);
    assert_eq!(got.status, S::Cancelled as i32);

    // 3. Remove OLD: only then are OLD's tokens refused.
    a.stop().await;
    let a = start(NEW, vec![]).await;
    let refused = a
        .client(Some(&old_token))
        .await
        .list_jobs(pb::ListJobsRequest::default())
        .await;
    assert_err(refused, Code::Unauthenticated, "TOKEN_BAD_SIGNATURE");
    assert_eq!(
        harness::all_jobs(&mut a.client(Some(&new_token)).await)
            .await
            .len(),
        3
    );
    a.stop().await;
    b.stop().await;
}
