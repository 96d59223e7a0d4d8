//! The product from outside Rust: the Python and Node.js example programs and workers, and the
//! README's grpcurl walk-throughs, run against a live server. Each exits non-zero on any wrong answer.
//! Their packages (the venv in `target/clients-venv`, node_modules) come from
//! `scripts/test-deps`, which `deps::ensure` runs first.
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::deps;
use crate::harness::{TestServer, service_token};

/// Runs `program` (a path in this repository when it has a `/`) from the repository root, with
/// the venv's bin directory (python, grpcurl) first on PATH.
async fn run(program: &str, args: &[&str]) {
    deps::ensure();
    let server = TestServer::start().await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = if program.contains('/') {
        root.join(program)
    } else {
        PathBuf::from(program)
    };
    let child = tokio::process::Command::new(&exe)
        .args(args)
        .current_dir(root)
        .env("PATH", deps::path_with_venv())
        .env("JOBSVC_ADDR", server.addr.to_string())
        .env("JOBSVC_TOKEN", service_token())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), child)
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish within 120 s"))
        .unwrap_or_else(|e| {
            panic!("cannot run {program}: {e} (scripts/test-deps sets the clients up, see README)")
        });
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}\n(missing packages? run scripts/test-deps)",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    server.stop().await;
}

#[tokio::test]
async fn the_python_example_runs_green() {
    run(
        "target/clients-venv/bin/python",
        &["clients/python/example.py"],
    )
    .await;
}

#[tokio::test]
async fn the_node_example_runs_green() {
    run("node", &["clients/node/example.js"]).await;
}

#[tokio::test]
async fn the_python_worker_runs_green() {
    run(
        "target/clients-venv/bin/python",
        &["clients/python/worker.py"],
    )
    .await;
}

#[tokio::test]
async fn the_node_worker_runs_green() {
    run("node", &["clients/node/worker.js"]).await;
}

/// The browser client (`clients/web`, TypeScript over gRPC-Web) calls every RPC once.
#[tokio::test]
async fn the_web_client_calls_every_rpc_over_grpc_web() {
    run(
        "npm",
        &["--prefix", "clients/web", "run", "--silent", "smoke"],
    )
    .await;
}

#[tokio::test]
async fn the_readme_grpcurl_walkthrough_runs_green() {
    run("scripts/walkthrough", &[]).await;
}
