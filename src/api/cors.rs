//! CORS, for browsers only. A request that carries no `Origin` (every client that is not a
//! browser) skips tower-http's CORS layer: that layer adds `Vary: origin,
//! access-control-request-method, access-control-request-headers` to every answer, built
//! anew each time, which was three more headers for h2 to encode and four allocations on
//! every call. Browsers send `Origin` with every cross-origin request and preflight (and
//! with every POST), so they still get the whole policy.
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Either;
use http::{HeaderName, HeaderValue, Request, Response};
use tower::{Layer, Service};
use tower_http::cors::{AllowOrigin, Cors, CorsLayer};

/// CORS for browsers on other origins: the configured origins only (no wildcard: a token
/// travels in a header, and an open policy would let any page that holds one call), the
/// preflight answered, and the gRPC status headers exposed so that a browser client can read
/// the status, its message and its ErrorInfo.
fn policy(origins: &[HeaderValue]) -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins.iter().cloned()))
        .allow_methods([http::Method::POST, http::Method::OPTIONS])
        .allow_headers([
            http::header::CONTENT_TYPE,
            http::header::AUTHORIZATION,
            HeaderName::from_static("x-api-key"),
            HeaderName::from_static("x-grpc-web"),
            HeaderName::from_static("x-user-agent"),
            HeaderName::from_static("grpc-timeout"),
            HeaderName::from_static("x-request-id"),
        ])
        .expose_headers([
            tonic::Status::GRPC_STATUS,
            tonic::Status::GRPC_MESSAGE,
            tonic::Status::GRPC_STATUS_DETAILS,
            HeaderName::from_static("x-request-id"),
        ])
        .max_age(Duration::from_secs(600))
}

/// [`policy`] for the requests with an `Origin` header; the others go straight on.
#[derive(Clone)]
pub struct BrowserCorsLayer {
    cors: CorsLayer,
}

impl BrowserCorsLayer {
    pub fn new(origins: &[HeaderValue]) -> Self {
        BrowserCorsLayer {
            cors: policy(origins),
        }
    }
}

impl<S: Clone> Layer<S> for BrowserCorsLayer {
    type Service = BrowserCors<S>;

    fn layer(&self, inner: S) -> BrowserCors<S> {
        BrowserCors {
            cors: self.cors.layer(inner.clone()),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct BrowserCors<S> {
    cors: Cors<S>,
    inner: S,
}

impl<S, B, R> Service<Request<B>> for BrowserCors<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    R: Default,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = Either<<Cors<S> as Service<Request<B>>>::Future, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        // Either may take the request: both must be ready.
        if self.inner.poll_ready(cx)?.is_pending() {
            return Poll::Pending;
        }
        self.cors.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if request.headers().contains_key(http::header::ORIGIN) {
            Either::Left(self.cors.call(request))
        } else {
            Either::Right(self.inner.call(request))
        }
    }
}
