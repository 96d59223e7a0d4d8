//! The dashboard: a static page and its script bundle, embedded in the binary and served on
//! the gRPC port at `/` (off with `--no-ui`). The page talks gRPC-Web to the same origin, so
//! it needs no CORS and no proxy.
//!
//! The bundle is built from `clients/web/dashboard/` by esbuild and committed
//! (`npm --prefix clients/web run check:dashboard` proves it fresh in CI), so `cargo build`
//! needs no Node. A hand-written layer rather than a router crate: four fixed GET paths
//! answered from memory are all it does; everything else goes on to gRPC untouched.
use std::convert::Infallible;
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use prost::bytes::Bytes;
use tower::{Layer, Service};

const INDEX: &[u8] = include_bytes!("../../clients/web/dashboard/index.html");
const SCRIPT: &[u8] = include_bytes!("../../clients/web/dashboard/dist/dashboard.js");
const STYLE: &[u8] = include_bytes!("../../clients/web/dashboard/dashboard.css");

/// What the page may load and reach: its own origin only, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

/// The embedded file at `path`, with its content type.
fn file(path: &str) -> Option<(&'static [u8], &'static str)> {
    match path {
        "/" | "/index.html" => Some((INDEX, "text/html; charset=utf-8")),
        "/dashboard.js" => Some((SCRIPT, "text/javascript; charset=utf-8")),
        "/dashboard.css" => Some((STYLE, "text/css; charset=utf-8")),
        _ => None,
    }
}

fn answer(body: &'static [u8], content_type: &'static str) -> Response<tonic::body::Body> {
    let mut response = Response::new(tonic::body::Body::new(
        http_body_util::Full::new(Bytes::from_static(body)).map_err(|e: Infallible| match e {}),
    ));
    *response.status_mut() = StatusCode::OK;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Revalidated on every load: a new server version shows at once.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

/// Serves the dashboard's files (when `enabled`) in front of the gRPC services.
#[derive(Clone, Copy)]
pub struct UiLayer {
    pub enabled: bool,
}

impl<S> Layer<S> for UiLayer {
    type Service = Ui<S>;

    fn layer(&self, inner: S) -> Ui<S> {
        Ui {
            inner,
            enabled: self.enabled,
        }
    }
}

#[derive(Clone)]
pub struct Ui<S> {
    inner: S,
    enabled: bool,
}

impl<S, B> Service<Request<B>> for Ui<S>
where
    S: Service<Request<B>, Response = Response<tonic::body::Body>>,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if self.enabled
            && request.method() == Method::GET
            && let Some((body, content_type)) = file(request.uri().path())
        {
            return Either::Left(ready(Ok(answer(body, content_type))));
        }
        Either::Right(self.inner.call(request))
    }
}
