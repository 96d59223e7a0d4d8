//! Operations: the metrics endpoint after known traffic, and TLS on the gRPC port.
use std::time::Duration;

use jobsvc::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use crate::harness::{Bearer, TestServer, eventually, fresh_database, service_token, shared_pg};

/// One GET of the metrics endpoint; the body.
pub async fn scrape(port: u16) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_once("\r\n\r\n").unwrap().1.to_owned()
}

/// The value of the sample line `name{labels}` (labels as rendered), if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn metrics_report_known_traffic() {
    let pg = shared_pg().await;
    let url = fresh_database(&pg).await;
    let port = crate::harness::free_addr().port();
    let listen = format!("127.0.0.1:{port}");
    let server = TestServer::start_on(&url, &["--metrics-listen", &listen]).await;
    let mut c = server.service().await;
    for _ in 0..3 {
        c.create_job(pb::CreateJobRequest {
            agent_identifier: "m".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let missing = c
        .get_job(pb::GetJobRequest {
            id: uuid::Uuid::new_v4().to_string(),
        })
        .await;
    assert_eq!(missing.unwrap_err().code(), Code::NotFound);
    let stream = c
        .stream_job_updates(pb::StreamJobUpdatesRequest::default())
        .await
        .unwrap()
        .into_inner();

    let text = scrape(port).await;
    assert_eq!(
        sample(&text, r#"jobsvc_rpc_requests_total{method="CreateJob"}"#),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"jobsvc_rpc_responses_total{method="CreateJob",code="Ok"}"#
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"jobsvc_rpc_responses_total{method="GetJob",code="NotFound"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"jobsvc_rpc_duration_seconds_count{method="CreateJob"}"#
        ),
        Some(3.0)
    );
    assert_eq!(sample(&text, "jobsvc_open_streams"), Some(1.0));
    assert_eq!(sample(&text, "jobsvc_pool_max_connections"), Some(8.0));
    // Jobs by status come from the rollup, refreshed with the fold (every 5 s); every status
    // is there, zeros included.
    eventually(Duration::from_secs(15), "jobs gauges", || async {
        let t = scrape(port).await;
        sample(&t, r#"jobsvc_jobs{status="pending"}"#) == Some(3.0)
            && sample(&t, r#"jobsvc_jobs{status="failed"}"#) == Some(0.0)
    })
    .await;
    // A call the client abandons (its deadline passes) is still logged and counted.
    let pending = c.create_job(pb::CreateJobRequest {
        agent_identifier: "m".into(),
        ..Default::default()
    });
    let id = pending.await.unwrap().into_inner().id;
    let mut wait = tonic::Request::new(pb::WaitJobRequest {
        id,
        timeout: Some(prost_types::Duration {
            seconds: 60,
            nanos: 0,
        }),
    });
    wait.set_timeout(Duration::from_millis(300));
    assert!(c.wait_job(wait).await.is_err());
    eventually(
        Duration::from_secs(5),
        "the abandoned call to be counted",
        || async {
            sample(
                &scrape(port).await,
                r#"jobsvc_rpc_responses_total{method="WaitJob",code="Cancelled"}"#,
            ) == Some(1.0)
        },
    )
    .await;
    // A client that goes away is noticed at once: the gauge returns to zero.
    drop(stream);
    drop(c);
    eventually(Duration::from_secs(2), "the stream to close", || async {
        sample(&scrape(port).await, "jobsvc_open_streams") == Some(0.0)
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn tls_serves_with_a_certificate_and_refuses_plaintext() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let pg = shared_pg().await;
    let url = fresh_database(&pg).await;
    let server = TestServer::start_on(
        &url,
        &[
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
        ],
    )
    .await;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(cert.cert.pem()))
        .domain_name("localhost");
    let channel =
        tonic::transport::Channel::from_shared(format!("https://localhost:{}", server.addr.port()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .expect("a TLS connection");
    let mut c = pb::job_service_client::JobServiceClient::with_interceptor(
        channel,
        Bearer::new(Some(&service_token())),
    );
    let job = c
        .create_job(pb::CreateJobRequest {
            agent_identifier: "tls".into(),
            ..Default::default()
        })
        .await
        .expect("a call over TLS")
        .into_inner();
    assert_eq!(job.version, 1);
    // Plaintext HTTP/2 to the TLS port does not get through: the connection or the call fails.
    let plain = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await;
    if let Ok(channel) = plain {
        let mut c = pb::job_service_client::JobServiceClient::with_interceptor(
            channel,
            Bearer::new(Some(&service_token())),
        );
        let err = c
            .get_job(pb::GetJobRequest { id: job.id })
            .await
            .expect_err("plaintext is refused");
        assert_ne!(err.code(), Code::Ok);
    }
    server.stop().await;
}

#[tokio::test]
async fn retention_deletes_only_finished_jobs_past_their_age() {
    use diesel_async::RunQueryDsl;
    let pg = shared_pg().await;
    let url = fresh_database(&pg).await;
    let mut conn = jobsvc::db::connect(&url).await.unwrap();
    // (agent, status, finished how long ago, how many): 2,500 old completed jobs take three
    // batches.
    let rows = [
        ("old-completed", "completed", "40 days", 2500),
        ("new-completed", "completed", "1 day", 10),
        ("old-failed", "failed", "100 days", 10),
        ("old-cancelled", "cancelled", "2 days", 10),
        ("old-pending", "pending", "", 10),
        ("old-running", "running", "", 10),
    ];
    for (agent, status, ago, n) in rows {
        let finished = if ago.is_empty() {
            "NULL".to_string()
        } else {
            format!("now() - interval '{ago}'")
        };
        diesel::sql_query(format!(
            "INSERT INTO jobs (agent_identifier, status, created_at, completed_at) \
             SELECT '{agent}', '{status}', now() - interval '200 days', {finished} \
             FROM generate_series(1, {n})"
        ))
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let server = TestServer::start_on(
        &url,
        &[
            "--retain-completed",
            "30d",
            "--retain-cancelled",
            "1d",
            "--retention-interval",
            "200ms",
        ],
    )
    .await;
    #[derive(diesel::QueryableByName, Debug, PartialEq)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::Text)]
        agent_identifier: String,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let counts = || async {
        let mut conn = jobsvc::db::connect(&url).await.unwrap();
        diesel::sql_query("SELECT agent_identifier, count(*) AS n FROM jobs GROUP BY 1 ORDER BY 1")
            .load::<Count>(&mut conn)
            .await
            .unwrap()
    };
    eventually(
        Duration::from_secs(20),
        "the old finished jobs to go",
        || async {
            counts()
                .await
                .iter()
                .all(|c| !c.agent_identifier.starts_with("old-c"))
        },
    )
    .await;
    let left: Vec<(String, i64)> = counts()
        .await
        .into_iter()
        .map(|c| (c.agent_identifier, c.n))
        .collect();
    assert_eq!(
        left,
        [
            ("new-completed".to_string(), 10),
            ("old-failed".to_string(), 10),
            ("old-pending".to_string(), 10),
            ("old-running".to_string(), 10),
        ]
    );
    // The rollup followed the deletes: GetStats still agrees with the table.
    let stats = server
        .service()
        .await
        .get_stats(pb::GetStatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((stats.total, stats.completed, stats.cancelled), (40, 10, 0));
    server.stop().await;
}

/// `jobsvc export` then `jobsvc import` into an empty database, then export again: the two
/// files are byte for byte the same, importing twice adds nothing, statistics agree, and an
/// export resumed after an id continues exactly there.
#[tokio::test]
async fn export_and_import_round_trip_100000_jobs() {
    use diesel_async::RunQueryDsl;
    use std::process::Stdio;
    let pg = shared_pg().await;
    let (a, b) = (fresh_database(&pg).await, fresh_database(&pg).await);
    let mut conn = jobsvc::db::connect(&a).await.unwrap();
    // Every shape: owners and none, each status, nested and non-ASCII JSON, results, errors,
    // request ids, NULL timestamps, versions above 1.
    diesel::sql_query(
        "INSERT INTO jobs (user_id, agent_identifier, status, job_data, result, error_message,
                           created_at, started_at, completed_at, request_id)
         SELECT CASE WHEN i % 3 = 0 THEN NULL ELSE md5(i::text)::uuid END,
                'agent-' || (i % 7),
                (ARRAY['pending','running','completed','failed','cancelled']::job_status[])[1 + i % 5],
                jsonb_build_object('i', i, 'nested', jsonb_build_object('arr', jsonb_build_array(i, 'x', NULL, 1.5)),
                                   'text', 'ünïcødé ✓ \"quoted\" \\\\ back'),
                CASE WHEN i % 5 = 2 THEN to_jsonb(i * 1.25) END,
                CASE WHEN i % 5 = 3 THEN 'boom ' || i END,
                now() - make_interval(secs => i),
                CASE WHEN i % 5 IN (1, 2) THEN now() - make_interval(secs => i) + interval '1 second' END,
                CASE WHEN i % 5 IN (2, 3, 4) THEN now() - make_interval(secs => i) + interval '2.123456 seconds' END,
                CASE WHEN i % 11 = 0 THEN 'req-' || i END
         FROM generate_series(1, 100000) AS i",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    diesel::sql_query(
        "UPDATE jobs SET job_data = job_data || '{\"touched\": true}' WHERE agent_identifier = 'agent-3'",
    )
    .execute(&mut conn)
    .await
    .unwrap();

    let jobsvc = env!("CARGO_BIN_EXE_jobsvc");
    let export = |url: String, extra: Vec<String>| async move {
        let out = tokio::process::Command::new(jobsvc)
            .args(["export", "--database-url", &url])
            .args(extra)
            .stderr(Stdio::piped())
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let import = |url: String, input: Vec<u8>| async move {
        let mut child = tokio::process::Command::new(jobsvc)
            .args(["import", "--database-url", &url])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            stdin.write_all(&input).await.unwrap();
        });
        let out = child.wait_with_output().await.unwrap();
        writer.await.unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stderr).unwrap()
    };

    // A backup pointed at a directory without a database fails instead of writing nothing.
    let missing = tokio::process::Command::new(jobsvc)
        .args(["export", "--data-dir", "/nonexistent/jobsvc-data"])
        .env_remove("DATABASE_URL")
        .output()
        .await
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no private PostgreSQL"));

    let first = export(a.clone(), vec![]).await;
    assert_eq!(first.iter().filter(|&&c| c == b'\n').count(), 100_000);
    let said = import(b.clone(), first.clone()).await;
    assert!(said.contains("100000 inserted, 0 already there"), "{said}");
    let again = import(b.clone(), first.clone()).await;
    assert!(
        again.contains("0 inserted, 100000 already there"),
        "{again}"
    );
    let second = export(b.clone(), vec![]).await;
    assert!(first == second, "the round trip changed the data");

    // Statistics (from the rollup the insert triggers keep) agree.
    #[derive(diesel::QueryableByName, PartialEq, Debug)]
    struct Stats {
        #[diesel(sql_type = diesel::sql_types::Text)]
        s: String,
    }
    let stats = |url: String| async move {
        let mut c = jobsvc::db::connect(&url).await.unwrap();
        diesel::sql_query("SELECT row_to_json(v)::text AS s FROM job_stats v")
            .get_result::<Stats>(&mut c)
            .await
            .unwrap()
    };
    assert_eq!(stats(a.clone()).await, stats(b.clone()).await);

    // Resuming after the 50,000th id continues exactly there.
    let text = String::from_utf8(first).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let id: serde_json::Value = serde_json::from_str(lines[49_999]).unwrap();
    let rest = export(
        a,
        vec!["--after-id".into(), id["id"].as_str().unwrap().into()],
    )
    .await;
    assert_eq!(
        String::from_utf8(rest).unwrap(),
        lines[50_000..].join("\n") + "\n"
    );
}

/// Statements stay prepared on pooled connections, and PostgreSQL refuses a prepared
/// statement whose result shape changed. A migration that adds a column to `jobs` (run by a
/// newer replica) must not break a running server's calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_under_a_running_server_breaks_none_of_its_calls() {
    use diesel_async::RunQueryDsl;
    let pg = shared_pg().await;
    let url = fresh_database(&pg).await;
    // One connection, so every call below reuses the statements prepared before the change.
    let server = TestServer::start_on(&url, &["--pool-size", "1"]).await;
    let user = uuid::Uuid::new_v4();
    let service = server.service().await;
    let owner = server.user(user).await;
    let exercise = |mut c: crate::harness::Client, mut s: crate::harness::Client| async move {
        let job = c
            .create_job(pb::CreateJobRequest {
                agent_identifier: "shape".into(),
                ..Default::default()
            })
            .await
            .expect("create")
            .into_inner();
        s.get_job(pb::GetJobRequest { id: job.id.clone() })
            .await
            .expect("get");
        c.list_jobs(pb::ListJobsRequest::default())
            .await
            .expect("list");
        s.list_jobs(pb::ListJobsRequest::default())
            .await
            .expect("list as the service role");
        c.update_status(pb::UpdateStatusRequest {
            id: job.id.clone(),
            status: pb::JobStatus::Running as i32,
            ..Default::default()
        })
        .await
        .expect("update");
        c.cancel_job(pb::CancelJobRequest { id: job.id })
            .await
            .expect("cancel");
    };
    exercise(owner.clone(), service.clone()).await;
    let mut conn = jobsvc::db::connect(&url).await.unwrap();
    diesel::sql_query("ALTER TABLE jobs ADD COLUMN added_later int")
        .execute(&mut conn)
        .await
        .unwrap();
    exercise(owner, service).await;
    server.stop().await;
}

/// Pooled connections left idle are closed (the pool hands out the one used last, so under a
/// light load the others would otherwise sit unused until a NAT or proxy dropped them), a
/// connection in use is not, and the pool opens a new one on demand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pooled_connections_are_closed_and_reopened_on_demand() {
    use diesel_async::SimpleAsyncConnection;
    let server = TestServer::start().await;
    let pool = jobsvc::db::pool(&server.db_url, 2).unwrap();
    let (a, b) = (pool.get().await.unwrap(), pool.get().await.unwrap());
    drop((a, b));
    assert_eq!(pool.status().size, 2);
    assert_eq!(jobsvc::db::retire_idle(&pool, Duration::from_secs(60)), 0);
    let mut held = pool.get().await.unwrap();
    assert_eq!(jobsvc::db::retire_idle(&pool, Duration::ZERO), 1);
    held.batch_execute("SELECT 1").await.unwrap();
    drop(held);
    assert_eq!(pool.status().size, 1);
    let (mut a, mut b) = (pool.get().await.unwrap(), pool.get().await.unwrap());
    a.batch_execute("SELECT 1").await.unwrap();
    b.batch_execute("SELECT 1").await.unwrap();
    assert_eq!(pool.status().size, 2);
    server.stop().await;
}

/// The log is written by a thread of its own: a log reader that stops reading (here, a pipe
/// nobody reads, which fills at 64 KiB) holds up no call. Past the writer's buffer of 2 MiB
/// (about 10,000 lines), lines are dropped and counted in the metrics. Written to a pipe, the log carries no
/// terminal colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_reader_holds_up_no_call() {
    let pg = shared_pg().await;
    let url = fresh_database(&pg).await;
    let addr = crate::harness::free_addr();
    let metrics = crate::harness::free_addr();
    let mut child =
        crate::harness::jobsvc_binary(&url, addr, &["--metrics-listen", &metrics.to_string()])
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("running the jobsvc binary");
    // Held open and not read until the calls are done.
    let mut log = child.stderr.take().unwrap();
    eventually(Duration::from_secs(30), "jobsvc listening", || async {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await;
    let client = crate::harness::client_on(crate::harness::lazy_channel(addr), &service_token());
    // Each call logs a line: 20,000 calls overflow the pipe and then the writer's buffer.
    const CALLERS: usize = 8;
    const CALLS: usize = 20_000;
    let callers = (0..CALLERS).map(|_| {
        let mut client = client.clone();
        tokio::spawn(async move {
            for _ in 0..CALLS / CALLERS {
                let missing = client
                    .get_job(pb::GetJobRequest {
                        id: uuid::Uuid::new_v4().to_string(),
                    })
                    .await;
                assert_eq!(missing.unwrap_err().code(), Code::NotFound);
            }
        })
    });
    tokio::time::timeout(
        Duration::from_secs(240),
        futures_util::future::try_join_all(callers),
    )
    .await
    .expect("20,000 calls answered within 240 s while nobody reads the log")
    .unwrap();
    // At most 2 MiB of lines (some 10,000) wait in the buffer and a few hundred in the pipe;
    // the rest were dropped, and counted.
    let dropped = sample(
        &scrape(metrics.port()).await,
        "jobsvc_log_lines_dropped_total",
    )
    .expect("the dropped-lines counter is exported");
    assert!(
        dropped >= 2_500.0,
        "{dropped} lines counted as dropped of 20,000"
    );

    let mut head = vec![0; 16 * 1024];
    tokio::time::timeout(Duration::from_secs(30), log.read_exact(&mut head))
        .await
        .expect("16 KiB of log within 30 s")
        .unwrap();
    let head = String::from_utf8_lossy(&head);
    assert!(head.contains("method=\"GetJob\""), "{head}");
    assert!(
        !head.contains('\x1b'),
        "colour codes in a piped log: {head}"
    );
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

/// The slow-call threshold and its counter belong to each server's pool, not to the process:
/// two servers in one process, one counting every call as slow and one counting none, each
/// report only their own. (With a process-wide setting, the first server to start decided
/// for both.)
#[tokio::test]
async fn two_servers_in_one_process_count_their_own_slow_calls() {
    let pg = shared_pg().await;
    let metrics_of = |port: u16| format!("127.0.0.1:{port}");
    let (quiet_port, eager_port) = (
        crate::harness::free_addr().port(),
        crate::harness::free_addr().port(),
    );
    // The one that counts nothing starts first.
    let quiet = TestServer::start_on(
        &fresh_database(&pg).await,
        &[
            "--metrics-listen",
            &metrics_of(quiet_port),
            "--slow-query-threshold",
            "1h",
        ],
    )
    .await;
    let eager = TestServer::start_on(
        &fresh_database(&pg).await,
        &[
            "--metrics-listen",
            &metrics_of(eager_port),
            "--slow-query-threshold",
            "1ns",
        ],
    )
    .await;
    for server in [&quiet, &eager] {
        let mut c = server.service().await;
        for _ in 0..5 {
            let missing = c
                .get_job(pb::GetJobRequest {
                    id: uuid::Uuid::new_v4().to_string(),
                })
                .await;
            assert_eq!(missing.unwrap_err().code(), Code::NotFound);
        }
    }
    const SLOW: &str = "jobsvc_slow_database_calls_total";
    assert_eq!(sample(&scrape(eager_port).await, SLOW), Some(5.0));
    assert_eq!(sample(&scrape(quiet_port).await, SLOW), Some(0.0));
    quiet.stop().await;
    eager.stop().await;
}

/// The metrics port serves `GET /metrics` and nothing else, and a bare port binds loopback
/// only.
#[tokio::test]
async fn the_metrics_port_answers_only_metrics_and_binds_loopback_by_default() {
    let pg = shared_pg().await;
    let url = fresh_database(&pg).await;
    let port = crate::harness::free_addr().port();
    let server = TestServer::start_on(&url, &["--metrics-listen", &port.to_string()]).await;
    async fn status_of(port: u16, request: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.lines().next().unwrap_or_default().to_owned()
    }
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    // A first call: the server (and so its metrics port) is up.
    server
        .service()
        .await
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap();
    assert!(scrape(port).await.contains("jobsvc_rpc_requests"));
    for path in ["/", "/metrics/x", "/debug/pprof", "/favicon.ico"] {
        assert_eq!(
            status_of(port, &get(path)).await,
            "HTTP/1.1 404 Not Found",
            "{path}"
        );
    }
    assert_eq!(
        status_of(
            port,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .await,
        "HTTP/1.1 405 Method Not Allowed"
    );
    // Bound to 127.0.0.1 only, not to every address: 127.0.0.2, another address of the
    // loopback interface, does not reach it.
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.2", port))
            .await
            .is_err(),
        "the metrics port answered on 127.0.0.2"
    );
    server.stop().await;
}

/// An empty secret file (a crash or a full disk during the first start) is never used as an
/// HMAC key: `jobsvc token` and `jobsvc serve` refuse it and name the file.
#[tokio::test]
async fn an_empty_secret_file_stops_token_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwt_secret");
    std::fs::write(&file, "").unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let runs: [&[&str]; 2] = [
        &["token", "--role", "service_role", "--data-dir", data_dir],
        &["serve", "--data-dir", data_dir, "--listen", "127.0.0.1:0"],
    ];
    for args in runs {
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new(env!("CARGO_BIN_EXE_jobsvc"))
                .args(args)
                .env_remove("JWT_SECRET")
                .env_remove("DATABASE_URL")
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("jobsvc exits")
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted an empty secret");
        assert!(out.stdout.is_empty(), "{args:?} printed a token");
        assert!(
            stderr.contains(&file.display().to_string()) && stderr.contains("at least 32"),
            "{args:?}: {stderr}"
        );
    }
    // Nothing was started: no database directory next to the file.
    assert!(!dir.path().join("pg").exists());
}

/// `jobsvc serve` with no DATABASE_URL keeps its PostgreSQL private, even in a folder every
/// local account can traverse: the socket's directory is its owner's alone, every connection
/// needs a password, the log is private, and the service itself is not a superuser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_private_database_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let folder = tempfile::tempdir().unwrap();
    std::fs::set_permissions(folder.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = folder.path().join("data");
    let addr = crate::harness::free_addr();
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobsvc"))
        .args(["serve", "--listen", &addr.to_string(), "--data-dir"])
        .arg(&data)
        .env_remove("JWT_SECRET")
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let secret = || std::fs::read_to_string(data.join("jwt_secret")).unwrap_or_default();
    eventually(
        Duration::from_secs(60),
        "the private server answers",
        || {
            let secret = secret();
            async move {
                if secret.trim().len() < 32 {
                    return false;
                }
                let token = jobsvc::api::auth::issue(
                    secret.trim().as_bytes(),
                    "service_role",
                    None,
                    Duration::from_secs(60),
                );
                let Ok(channel) = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect()
                    .await
                else {
                    return false;
                };
                let mut c = pb::job_service_client::JobServiceClient::with_interceptor(
                    channel,
                    Bearer::new(Some(&token)),
                );
                c.list_jobs(pb::ListJobsRequest::default()).await.is_ok()
            }
        },
    )
    .await;

    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let socket_dir = data.join("pg");
    assert_eq!(mode(&socket_dir), 0o700, "the socket's directory");
    assert_eq!(mode(&socket_dir.join("data")), 0o700, "the data directory");
    assert_eq!(mode(&socket_dir.join("postgres.log")), 0o600, "the log");
    for file in ["jwt_secret", "pg_superuser_password", "pg_password"] {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
    }
    let socket = format!("host={} port=5432 dbname=jobsvc", socket_dir.display());
    const WHO: &str = "SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user";
    let psql = |user: &str, password: Option<String>, query: &str| {
        let mut cmd = std::process::Command::new("psql");
        cmd.arg(format!("{socket} user={user}"))
            .args(["-w", "-XAtc", query])
            .env_remove("PGPASSWORD");
        if let Some(p) = password {
            cmd.env("PGPASSWORD", p);
        }
        cmd.output().unwrap()
    };
    // No password, no connection, even for the account that owns it.
    let out = psql("postgres", None, WHO);
    assert!(
        !out.status.success(),
        "a connection without a password was let in"
    );
    // The service's own role is not a superuser.
    let password = std::fs::read_to_string(data.join("pg_password")).unwrap();
    let out = psql("jobsvc", Some(password.trim().into()), WHO);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "jobsvc|f");
    // And every connection of the running server is that role's.
    let superuser = std::fs::read_to_string(data.join("pg_superuser_password")).unwrap();
    let out = psql(
        "postgres",
        Some(superuser.trim().into()),
        "SELECT string_agg(DISTINCT usename, ',') FROM pg_stat_activity \
         WHERE datname = 'jobsvc' AND pid <> pg_backend_pid()",
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "jobsvc");
    // Another local account cannot reach the socket at all.
    if nix_is_root() {
        let out = std::process::Command::new("runuser")
            .args(["-u", "nobody", "--", "psql"])
            .arg(format!("{socket} user=postgres"))
            .args(["-w", "-XAtc", "SELECT 1"])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "another account reached the database"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("ermission denied"), "{err}");
    }
    let _ = server.kill().await;
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

/// `jobsvc import` applies the service's own checks to every line and names the line it
/// refuses: what the API would never accept cannot come in through a backup either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_refuses_what_the_service_would_and_names_the_line() {
    let pg = shared_pg().await;
    let url = fresh_database(&pg).await;
    let good = r#"{"id": "6f1d0d52-5a8d-4a5b-9a64-0d1a7f3f0a01", "agent_identifier": "ok", "status": "pending", "job_data": {"a": 1}}"#;
    let zeros = vec!["0"; 300_000].join(",");
    let cases: Vec<(String, &str)> = vec![
        (
            r#"{"agent_identifier": "a\u0007b", "status": "pending", "job_data": {}}"#.into(),
            "agent_identifier",
        ),
        (
            r#"{"agent_identifier": "a\u202eb", "status": "pending", "job_data": {}}"#.into(),
            "invisible",
        ),
        (
            r#"{"agent_identifier": "ok", "status": "sleeping", "job_data": {}}"#.into(),
            "status",
        ),
        (
            format!(r#"{{"agent_identifier": "ok", "status": "pending", "job_data": {{"z": [{zeros}]}}}}"#),
            "PAYLOAD_TOO_LARGE",
        ),
        (
            format!(
                r#"{{"agent_identifier": "ok", "status": "pending", "job_data": {}1{}}}"#,
                r#"{"a":"#.repeat(40),
                "}".repeat(40)
            ),
            "deeper",
        ),
        (
            r#"{"agent_identifier": "ok", "status": "failed", "job_data": {}, "error_message": "x\u0000"}"#.into(),
            "U+0000",
        ),
        ("[1, 2]".into(), "not a JSON object"),
    ];
    for (bad, says) in cases {
        let input = format!("{good}\n\n{bad}\n");
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobsvc"))
            .args(["import", "--database-url", &url])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input.as_bytes()).await.unwrap();
        drop(stdin);
        let out = child.wait_with_output().await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "imported: {bad:.80}");
        assert!(
            stderr.contains("line 3") && stderr.contains(says),
            "for {bad:.80}: {stderr}"
        );
    }
    // The refused lines wrote nothing: the good line of the same batch did not go in either.
    let mut conn = jobsvc::db::connect(&url).await.unwrap();
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let count: Count = diesel_async::RunQueryDsl::get_result(
        diesel::sql_query("SELECT count(*) AS n FROM jobs"),
        &mut conn,
    )
    .await
    .unwrap();
    assert_eq!(count.n, 0);
}
