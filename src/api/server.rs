//! The gRPC server as a function of (listener, state, shutdown): the binary and the tests
//! share it. Health, reflection (v1 and v1alpha), explicit HTTP/2 limits, graceful shutdown.
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use super::health::monitor_health;
use super::service::JobSvc;
use super::state::AppState;
use crate::pb;
use crate::pb::job_service_server::JobServiceServer;

/// A client that does not finish its TLS handshake within this is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/2 and message limits, all set explicitly rather than left to tonic's defaults.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_concurrent_streams: u32,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// TLS certificate and key for the gRPC port; plaintext when `None`.
    pub tls: Option<tonic::transport::Identity>,
    /// Browser origins allowed to call (gRPC-Web with CORS); none by default.
    pub cors_origins: Vec<http::HeaderValue>,
    /// Serve the dashboard at `/`.
    pub ui: bool,
}

impl Limits {
    /// Streams a client may reset (or make us reset) before the connection is closed: the
    /// guard against rapid-reset floods.
    const MAX_RESET_STREAMS: usize = 64;
    const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
}

/// Serves until `shutdown` resolves, then stops accepting, tells long calls to return, and
/// waits for in-flight calls to finish.
pub async fn run(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown_tx: watch::Sender<bool>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let monitor = tokio::spawn(monitor_health(
        reporter,
        state.pool.clone(),
        state.db_health.clone(),
        state.auth.ready(),
        state.metrics.clone(),
        state.shutdown.clone(),
    ));

    let reflection_v1 = reflection()
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("the embedded descriptor sets are valid");

    let jobs = JobServiceServer::new(JobSvc::new(state.clone()))
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes);

    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down: no new calls, finishing in-flight ones");
        let _ = shutdown_tx.send(true);
    };

    // Small writes go out at once: with Nagle's algorithm on, a response written in two
    // parts waited for the client's delayed ACK, about 40 ms per call under load. (The
    // builder's own `tcp_nodelay` applies only to listeners it binds itself.)
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = Server::builder();
    if let Some(identity) = limits.tls.clone() {
        builder = builder.tls_config(
            tonic::transport::ServerTlsConfig::new()
                .identity(identity)
                .timeout(TLS_HANDSHAKE_TIMEOUT),
        )?;
    }
    let result = builder
        // gRPC-Web (browsers, over HTTP/1.1 or HTTP/2) on the same listener: translated to
        // gRPC at the edge, so every call goes through the same authentication, admission,
        // limits and metrics. HTTP/1.1 is accepted for it.
        .accept_http1(true)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_max_pending_accept_reset_streams(Some(Limits::MAX_RESET_STREAMS))
        .http2_max_local_error_reset_streams(Some(Limits::MAX_RESET_STREAMS))
        .http2_max_header_list_size(Limits::MAX_HEADER_LIST_BYTES)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .layer(super::ui::UiLayer { enabled: limits.ui })
        .layer(super::cors::BrowserCorsLayer::new(&limits.cors_origins))
        .layer(tonic_web::GrpcWebLayer::new())
        .layer(tower::util::MapResponseLayer::new(move |r| {
            oversized_request_answer(r, limits.max_message_bytes)
        }))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(jobs)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    monitor.abort();
    result
}

/// tonic refuses a request larger than the message limit itself, from its length prefix and
/// before any codec sees it, with OUT_OF_RANGE and no ErrorInfo. gRPC's convention (grpc-go,
/// grpc-java) is RESOURCE_EXHAUSTED; this rewrites that one answer to RESOURCE_EXHAUSTED
/// `MESSAGE_TOO_LARGE` with ErrorInfo, like every other refusal here. tonic has no hook for
/// it, and the status travels in the trailers (or in the headers of a trailers-only
/// response), hence a map of both on the way out.
fn oversized_request_answer(
    response: http::Response<tonic::body::Body>,
    limit: usize,
) -> http::Response<tonic::body::Body> {
    let (mut parts, body) = response.into_parts();
    rewrite_oversized(&mut parts.headers, limit);
    let body = tonic::body::Body::new(OversizedTrailers { inner: body, limit });
    http::Response::from_parts(parts, body)
}

fn rewrite_oversized(headers: &mut http::HeaderMap, limit: usize) {
    // tonic's message, as it percent-encodes it into the header.
    const TONIC_MESSAGE: &str = "Error,%20decoded%20message%20length%20too%20large";
    let oversized = headers.get("grpc-status").is_some_and(|v| v == "11")
        && headers
            .get("grpc-message")
            .is_some_and(|m| m.as_bytes().starts_with(TONIC_MESSAGE.as_bytes()));
    if oversized {
        let status = crate::error::Error::ResourceExhausted {
            reason: "MESSAGE_TOO_LARGE",
            message: format!(
                "the request is larger than the server's limit of {limit} bytes; \
                 send smaller job_data or result"
            ),
        }
        .into_status("");
        headers.remove("grpc-message");
        // Replaces grpc-status and adds the message and the details (ErrorInfo).
        let _ = status.add_header(headers);
    }
}

/// A response body whose trailers go through [`rewrite_oversized`].
struct OversizedTrailers {
    inner: tonic::body::Body,
    limit: usize,
}

impl http_body::Body for OversizedTrailers {
    type Data = prost::bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            std::task::Poll::Ready(Some(Ok(frame))) => match frame.into_trailers() {
                Ok(mut trailers) => {
                    rewrite_oversized(&mut trailers, this.limit);
                    std::task::Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
                }
                Err(frame) => std::task::Poll::Ready(Some(Ok(frame))),
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Reflection knows our service, health, both reflection versions (so `grpcurl list` shows
/// them) and google.rpc's error details (so grpcurl decodes ErrorInfo).
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
}
