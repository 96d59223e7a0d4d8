//! The foundation: health follows the database, migrations revert and re-apply, the binary
//! serves from its embedded PostgreSQL and keeps data across restarts.
use std::time::Duration;

use diesel_async::AsyncPgConnection;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_migrations::MigrationHarness;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::harness::{self, TestServer};
use jobsvc::pb;

async fn health(server: &TestServer, service: &str) -> Option<ServingStatus> {
    let mut client = HealthClient::new(server.channel().await);
    let resp = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(resp.into_inner().status).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_database() {
    // Its own cluster: this test stops the database.
    let pg = harness::new_cluster("health").await;
    let url = harness::fresh_database(&pg).await;
    let server = TestServer::start_on(&url, &[]).await;
    for service in ["", "jobs.v1.JobService"] {
        harness::eventually(Duration::from_secs(5), "SERVING", || async {
            health(&server, service).await == Some(ServingStatus::Serving)
        })
        .await;
    }

    pg.stop().await;
    harness::eventually(
        Duration::from_secs(5),
        "NOT_SERVING after the database stopped",
        || async {
            health(&server, "").await == Some(ServingStatus::NotServing)
                && health(&server, "jobs.v1.JobService").await == Some(ServingStatus::NotServing)
        },
    )
    .await;
    // Calls during the outage fail fast with UNAVAILABLE, never hang.
    let mut client = server.service().await;
    let started = std::time::Instant::now();
    let err = client
        .create_job(pb::CreateJobRequest {
            agent_identifier: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert_eq!(harness::reason(&err), "DATABASE_UNAVAILABLE");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    pg.start().await.unwrap();
    harness::eventually(
        Duration::from_secs(5),
        "SERVING after the database returned",
        || async { health(&server, "").await == Some(ServingStatus::Serving) },
    )
    .await;
    // And the pool recovered: calls work again without a restart.
    harness::eventually(Duration::from_secs(5), "CreateJob works again", || {
        let mut client = client.clone();
        async move {
            client
                .create_job(pb::CreateJobRequest {
                    agent_identifier: "a".into(),
                    ..Default::default()
                })
                .await
                .is_ok()
        }
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_apply_revert_and_reapply() {
    let pg = harness::shared_pg().await;
    let name = format!("m_{}", uuid::Uuid::new_v4().simple());
    pg.ensure_database(&name).await.unwrap();
    let url = pg.url(&name);
    let objects = tokio::task::spawn_blocking(move || {
        use diesel::RunQueryDsl;
        let mut conn: AsyncConnectionWrapper<AsyncPgConnection> =
            <AsyncConnectionWrapper<AsyncPgConnection> as diesel::Connection>::establish(&url)
                .unwrap();
        #[derive(diesel::QueryableByName, Debug, PartialEq)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        // Objects of ours in the database: tables, views, functions, types, policies, indexes.
        let census = |conn: &mut AsyncConnectionWrapper<AsyncPgConnection>| -> i64 {
            diesel::sql_query(
                "SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                          WHERE n.nspname IN ('public', 'auth') AND c.relname <> '__diesel_schema_migrations'
                            AND c.relname NOT LIKE '__diesel_schema_migrations%')
                      + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                          WHERE n.nspname IN ('public', 'auth'))
                      + (SELECT count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                          WHERE n.nspname IN ('public', 'auth') AND t.typtype = 'e')
                      + (SELECT count(*) FROM pg_policies) AS n",
            )
            .get_result::<Count>(conn)
            .unwrap()
            .n
        };
        let before = census(&mut conn);
        let applied = conn.run_pending_migrations(jobsvc::db::MIGRATIONS).unwrap();
        assert!(applied.len() >= 2);
        let full = census(&mut conn);
        conn.revert_all_migrations(jobsvc::db::MIGRATIONS).unwrap();
        let reverted = census(&mut conn);
        conn.run_pending_migrations(jobsvc::db::MIGRATIONS).unwrap();
        let again = census(&mut conn);
        // The schema works after the round trip: RLS, trigger and the stats function.
        diesel::sql_query("INSERT INTO jobs (agent_identifier) VALUES ('x')")
            .execute(&mut conn)
            .unwrap();
        diesel::sql_query("UPDATE jobs SET status = 'running'")
            .execute(&mut conn)
            .unwrap();
        (before, full, reverted, again)
    })
    .await
    .unwrap();
    let (before, full, reverted, again) = objects;
    assert!(
        full > before + 20,
        "migrations created objects: {before} -> {full}"
    );
    assert_eq!(
        reverted, before,
        "every down.sql removes what its up.sql made"
    );
    assert_eq!(again, full, "re-applying gives the same schema");
}

/// The real binary: embedded PostgreSQL, a printed token that works, SIGTERM stops it cleanly
/// (PostgreSQL too), and a second start finds the data of the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_embedded_and_keeps_data_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join(".jobsvc");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");

    let start = || {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobsvc"));
        cmd.env_remove("DATABASE_URL")
            .env_remove("JWT_SECRET")
            .env("JOBSVC_DATA_DIR", &data_dir)
            .env("JOBSVC_LISTEN", &addr)
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("jobsvc.log")).unwrap())
            .kill_on_drop(true);
        cmd.spawn().expect("running the jobsvc binary")
    };
    async fn read_token(child: &mut tokio::process::Child) -> String {
        use tokio::io::AsyncBufReadExt;
        let stdout = child.stdout.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let token = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(t) = line.strip_prefix("export TOKEN=") {
                    return t.to_owned();
                }
            }
            panic!("jobsvc exited without printing a token");
        })
        .await
        .expect("jobsvc printed a token within 60 s");
        // Keep reading, as a terminal would.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        token
    }
    async fn stop(mut child: tokio::process::Child) {
        let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .expect("jobsvc stops within 30 s of SIGTERM")
            .unwrap();
        assert!(status.success(), "clean exit: {status:?}");
    }
    let connect = |token: String| {
        let addr = addr.clone();
        async move {
            let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            pb::job_service_client::JobServiceClient::with_interceptor(
                channel,
                harness::Bearer::new(Some(&token)),
            )
        }
    };

    let mut first = start();
    let token = read_token(&mut first).await;
    let mut client = connect(token).await;
    let job = client
        .create_job(pb::CreateJobRequest {
            agent_identifier: "persist".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    stop(first).await;
    let postmaster = data_dir.join("pg/data/postmaster.pid");
    harness::eventually(
        Duration::from_secs(10),
        "PostgreSQL stopped with jobsvc",
        || async { !postmaster.exists() },
    )
    .await;

    let mut second = start();
    let token = read_token(&mut second).await;
    let mut client = connect(token).await;
    let again = client
        .get_job(pb::GetJobRequest { id: job.id.clone() })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the job survived the restart: {e:?}\n{}",
                std::fs::read_to_string(dir.path().join("jobsvc.log")).unwrap_or_default()
            )
        })
        .into_inner();
    assert_eq!(again, job);
    stop(second).await;
}
