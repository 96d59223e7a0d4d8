//! Per-call telemetry: the request id, the span, the timer, the metrics, and the one log line
//! at the end of every call.
use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::error::Result;
use crate::metrics::Metrics;

/// One call's bookkeeping: request id, span, timer, metrics, and the one log line at the end.
pub(crate) struct CallRecord {
    method: &'static str,
    pub(crate) request_id: String,
    pub(crate) span: tracing::Span,
    started: Instant,
    metrics: Arc<Metrics>,
    /// Set by `finish`; a call dropped before (the client cancelled, or its deadline passed)
    /// is still logged and counted, as CANCELLED.
    finished: bool,
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let _enter = self.span.enter();
        let elapsed = self.started.elapsed();
        self.metrics
            .call_finished(self.method, tonic::Code::Cancelled, elapsed);
        tracing::info!(
            method = self.method,
            code = "Cancelled",
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            "call"
        );
    }
}

impl CallRecord {
    pub(crate) fn start<T>(
        method: &'static str,
        request: &Request<T>,
        metrics: &Arc<Metrics>,
    ) -> Self {
        metrics.call_started(method);
        let request_id = request
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| {
                !v.is_empty()
                    && v.len() <= 64
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
            .map(str::to_owned)
            .unwrap_or_else(|| Uuid::new_v4().to_string());
        let span = tracing::info_span!(
            "rpc",
            method,
            request_id = %request_id,
            role = tracing::field::Empty
        );
        CallRecord {
            method,
            request_id,
            span,
            started: Instant::now(),
            metrics: metrics.clone(),
            finished: false,
        }
    }

    /// Logs the call and turns the result into the gRPC answer.
    pub(crate) fn finish<T>(mut self, result: Result<T>) -> Result<Response<T>, Status> {
        self.finished = true;
        let _enter = self.span.enter();
        let elapsed = self.started.elapsed();
        let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
        match result {
            Ok(body) => {
                self.metrics
                    .call_finished(self.method, tonic::Code::Ok, elapsed);
                tracing::info!(method = self.method, code = "OK", elapsed_ms, "call");
                let mut response = Response::new(body);
                if let Ok(v) = self.request_id.parse() {
                    response.metadata_mut().insert("x-request-id", v);
                }
                Ok(response)
            }
            Err(e) => {
                let status = e.into_status(&self.request_id);
                self.metrics
                    .call_finished(self.method, status.code(), elapsed);
                tracing::info!(
                    method = self.method,
                    code = ?status.code(),
                    elapsed_ms,
                    "call"
                );
                Err(status)
            }
        }
    }
}
