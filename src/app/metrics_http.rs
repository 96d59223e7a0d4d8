//! The metrics endpoint (`--metrics-listen`): a few lines of hyper (already in the tree
//! through tonic) rather than a web framework. It answers every GET with the text exposition
//! format.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::metrics::Metrics;

/// Concurrent connections to the metrics endpoint.
const MAX_CONNECTIONS: usize = 16;

/// Serves the metrics as text on `listener` until `shutdown` flips.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioIo, TokioTimer};
    // A scrape is one small request: few connections, and none may linger.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let metrics = metrics.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let answer = answer(&req, &metrics);
                async move { answer }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = tokio::time::timeout(Duration::from_secs(30), conn) => {}
                _ = stop.changed() => {}
            }
        });
    }
}

/// `GET /metrics` (or `HEAD`) gets the metrics; any other path is 404 and any other method 405,
/// so the port serves nothing else by accident.
fn answer(
    req: &http::Request<hyper::body::Incoming>,
    metrics: &Metrics,
) -> http::Result<http::Response<http_body_util::Full<hyper::body::Bytes>>> {
    use http::{Method, StatusCode};
    let plain = |status: StatusCode, text: &'static str| {
        http::Response::builder()
            .status(status)
            .header("content-type", "text/plain; charset=utf-8")
            .body(http_body_util::Full::new(hyper::body::Bytes::from(text)))
    };
    if req.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: the metrics are at /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET /metrics\n");
    }
    http::Response::builder()
        .header(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
        .body(http_body_util::Full::new(hyper::body::Bytes::from(
            metrics.render(),
        )))
}

/// Binds the metrics port (so a bad address fails at start, not later).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
