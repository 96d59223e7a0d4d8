//! The dashboard jobsvc serves at `/`: its files (and `--no-ui`), and the page itself in a real
//! Chromium (headless, driven by `clients/web/dashboard/e2e.mjs` through puppeteer-core) while
//! this test changes jobs over gRPC and asks what the page shows.
use std::path::Path;
use std::time::Duration;

use jobsvc::pb::{self, JobStatus as S};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};
use uuid::Uuid;

use crate::deps;
use crate::harness::{self, TestServer, user_token};

/// The page, its script and its style are served with a strict policy; `--no-ui` turns them
/// off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_files_are_served_at_the_root() {
    let server = TestServer::start().await;
    let get = |path: &'static str, addr| async move {
        reqwest::get(format!("http://{addr}{path}")).await.unwrap()
    };
    let page = get("/", server.addr).await;
    assert_eq!(page.status(), 200);
    let h = page.headers().clone();
    assert!(h["content-type"].to_str().unwrap().starts_with("text/html"));
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    assert_eq!(h["x-content-type-options"], "nosniff");
    let html = page.text().await.unwrap();
    assert!(html.contains("dashboard.js"), "{html}");
    let script = get("/dashboard.js", server.addr).await;
    assert!(
        script.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    assert!(script.bytes().await.unwrap().len() > 1000);
    server.stop().await;

    let pg = harness::shared_pg().await;
    let url = harness::fresh_database(&pg).await;
    let bare = TestServer::start_on(&url, &["--no-ui"]).await;
    let page = get("/", bare.addr).await;
    assert!(
        !page
            .headers()
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap().starts_with("text/html"))
    );
    bare.stop().await;
}

/// The browser driver: one JSON command a line in, one JSON answer a line out.
struct Browser {
    child: Child,
    stdin: ChildStdin,
    out: Lines<BufReader<ChildStdout>>,
}

impl Browser {
    async fn open(addr: std::net::SocketAddr, token: &str) -> Browser {
        deps::ensure();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let shots = root.join("target/dashboard-shots");
        let mut child = tokio::process::Command::new("node")
            .arg("clients/web/dashboard/e2e.mjs")
            .current_dir(root)
            .env("PATH", deps::path_with_venv())
            .env("JOBSVC_URL", format!("http://{addr}"))
            .env("JOBSVC_TOKEN", token)
            .env("JOBSVC_SCREENSHOTS", &shots)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs the browser driver");
        let stdin = child.stdin.take().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut browser = Browser { child, stdin, out };
        let ready = browser.line(Duration::from_secs(60)).await;
        assert_eq!(ready["event"], "ready", "the page did not load: {ready}");
        browser
    }

    async fn line(&mut self, within: Duration) -> Value {
        let line = tokio::time::timeout(within, self.out.next_line())
            .await
            .expect("the browser driver answers in time")
            .unwrap()
            .expect("the browser driver is running");
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"))
    }

    /// Sends a command; returns its answer, which must be ok.
    async fn ok(&mut self, cmd: Value) -> Value {
        let answer = self.send(cmd.clone()).await;
        assert_eq!(answer["ok"], true, "{cmd} -> {answer}");
        answer
    }

    async fn send(&mut self, cmd: Value) -> Value {
        let wait = cmd["timeout_ms"].as_u64().unwrap_or(5000);
        self.stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .await
            .unwrap();
        self.line(Duration::from_millis(wait + 30_000)).await
    }

    async fn quit(mut self) {
        let _ = self.send(json!({"cmd": "quit"})).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

fn rows(answer: &Value) -> Vec<String> {
    answer["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

/// A user signs in and sees its jobs; creates and moves made over gRPC show within 2 s; a
/// cancel from the page takes; another user's jobs never appear; the page resumes after its
/// server went away and shows a change made meanwhile; screenshots of the list and a detail;
/// and the time from commit to the page over 100 changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_follows_a_users_jobs_live_in_chromium() {
    let pg = harness::shared_pg().await;
    let url = harness::fresh_database(&pg).await;
    let server = TestServer::start_on(&url, &[]).await;
    let addr = server.addr;
    let (me, other) = (Uuid::new_v4(), Uuid::new_v4());
    let mut svc = server.service().await;
    let create_for = |owner: Uuid, agent: &str| pb::CreateJobRequest {
        agent_identifier: agent.into(),
        user_id: owner.to_string(),
        job_data: Some(jobsvc::api::convert::json_to_struct(
            json!({"document": "report.pdf", "pages": 12}),
        )),
        ..Default::default()
    };
    let mut mine = Vec::new();
    for agent in ["summarizer", "translator", "summarizer"] {
        mine.push(
            svc.create_job(create_for(me, agent))
                .await
                .unwrap()
                .into_inner()
                .id,
        );
    }
    let theirs = svc
        .create_job(create_for(other, "summarizer"))
        .await
        .unwrap()
        .into_inner()
        .id;

    let mut page = Browser::open(addr, &user_token(me)).await;
    page.ok(json!({"cmd": "signin", "timeout_ms": 15000})).await;
    let listed = page.ok(json!({"cmd": "wait_list"})).await;
    let shown = rows(&listed);
    for id in &mine {
        assert!(shown.contains(id), "{id} not listed: {shown:?}");
    }
    assert!(!shown.contains(&theirs), "another user's job is shown");

    // A job created and moved over gRPC shows each change within 2 s.
    let job = svc
        .create_job(create_for(me, "summarizer"))
        .await
        .unwrap()
        .into_inner();
    page.ok(json!({"cmd": "wait_row", "id": job.id, "timeout_ms": 2000}))
        .await;
    for status in [S::Running, S::Completed] {
        let mut req = harness::update(&job.id, status);
        if status == S::Completed {
            req.result = Some(jobsvc::api::convert::json_to_value(
                json!({"summary": "ok"}),
            ));
        }
        svc.update_status(req).await.unwrap();
        page.ok(json!({"cmd": "wait_row", "id": job.id, "status": status.as_str_name(), "timeout_ms": 2000}))
            .await;
    }
    // Another user's new job never appears, while mine do.
    let theirs_new = svc
        .create_job(create_for(other, "summarizer"))
        .await
        .unwrap()
        .into_inner()
        .id;
    let mine_new = svc
        .create_job(create_for(me, "translator"))
        .await
        .unwrap()
        .into_inner()
        .id;
    let listed = page
        .ok(json!({"cmd": "wait_row", "id": mine_new, "timeout_ms": 2000}))
        .await;
    let _ = listed;
    let shown = rows(&page.ok(json!({"cmd": "rows"})).await);
    assert!(!shown.contains(&theirs_new) && !shown.contains(&theirs));

    // The detail of the completed job: its data, result and history.
    let detail = page
        .ok(json!({"cmd": "open_detail", "id": job.id, "timeout_ms": 5000}))
        .await;
    let history = detail["detail"]["history"].as_array().unwrap().len();
    assert!(history >= 3, "{detail}");
    page.ok(json!({"cmd": "screenshot", "name": "detail"}))
        .await;
    page.ok(json!({"cmd": "close_detail"})).await;
    page.ok(json!({"cmd": "screenshot", "name": "list"})).await;

    // Cancel from the page.
    let cancelled = page
        .ok(json!({"cmd": "cancel", "id": mine[0], "timeout_ms": 5000}))
        .await;
    assert!(
        cancelled["status"].as_str().unwrap().contains("CANCELLED"),
        "{cancelled}"
    );
    let got = svc
        .get_job(pb::GetJobRequest {
            id: mine[0].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.status, S::Cancelled as i32);

    // The server goes away; a change is made meanwhile (through another replica); the page
    // resumes from its last resume token once a server answers at the same address again.
    server.stop().await;
    let other_replica = TestServer::start_on(&url, &[]).await;
    let meanwhile = other_replica
        .service()
        .await
        .create_job(create_for(me, "summarizer"))
        .await
        .unwrap()
        .into_inner()
        .id;
    let back = TestServer::start_at(&url, addr, &[]).await;
    page.ok(json!({"cmd": "wait_conn", "state": "live", "timeout_ms": 30000}))
        .await;
    page.ok(json!({"cmd": "wait_row", "id": meanwhile, "timeout_ms": 10000}))
        .await;

    // Commit to page, over 100 changes: each job's created_at (its transaction's start, a
    // little before the commit: the figure errs long) against the time the page first showed
    // it, on the same machine's clock.
    let mut svc = back.service().await;
    let mut committed = Vec::new();
    for _ in 0..100 {
        let made = svc
            .create_job(create_for(me, "latency"))
            .await
            .unwrap()
            .into_inner();
        let t = made.created_at.unwrap();
        committed.push((made.id, t.seconds as f64 * 1e3 + f64::from(t.nanos) / 1e6));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let last = committed.last().unwrap().0.clone();
    page.ok(json!({"cmd": "wait_row", "id": last, "timeout_ms": 5000}))
        .await;
    let shown = page.ok(json!({"cmd": "shown"})).await;
    let mut delays: Vec<f64> = committed
        .iter()
        .filter_map(|(id, at)| shown["shown"][format!("{id}:1")].as_f64().map(|s| s - at))
        .collect();
    assert_eq!(delays.len(), 100, "every change was shown");
    delays.sort_by(|a, b| a.total_cmp(b));
    let report = format!(
        "commit to page over 100 changes: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        delays[49], delays[98], delays[99]
    );
    eprintln!("{report}");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let _ = std::fs::write(root.join("target/dashboard-shots/latency.txt"), &report);

    let privacy = page.ok(json!({"cmd": "privacy"})).await;
    assert_eq!(privacy["token_in_url"], false, "{privacy}");
    assert_eq!(privacy["token_in_local_storage"], false, "{privacy}");
    assert_eq!(privacy["token_in_console"], false, "{privacy}");
    let errors = page.ok(json!({"cmd": "errors"})).await;
    assert!(
        errors["page_errors"].as_array().unwrap().is_empty(),
        "page errors: {errors}"
    );
    page.quit().await;
    back.stop().await;
    other_replica.stop().await;
}
