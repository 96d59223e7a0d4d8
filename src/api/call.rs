//! Per-call telemetry: the request id, the span, the timer, the metrics, and the one log line
//! at the end of every call.
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Code, Request, Response, Status};
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
        let elapsed = self.started.elapsed();
        self.metrics
            .call_finished(self.method, Code::Cancelled, elapsed);
        self.log_line(Code::Cancelled, elapsed, None);
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
        let elapsed = self.started.elapsed();
        let answer = self.answer(result, elapsed);
        let code = answer.as_ref().map_or_else(Status::code, |_| Code::Ok);
        self.log_line(code, elapsed, None);
        answer
    }

    /// For a stream: counts the call as answered now (its duration in the metrics is to the
    /// stream's start), and logs it once, when the stream ends (see [`StreamLog`]). A stream
    /// that could not start is logged at once, as any call.
    pub(crate) fn finish_stream<T>(
        mut self,
        result: Result<T>,
    ) -> Result<(Response<T>, StreamLog), Status> {
        self.finished = true;
        let elapsed = self.started.elapsed();
        match self.answer(result, elapsed) {
            Ok(response) => Ok((
                response,
                StreamLog {
                    call: self,
                    messages: 0,
                    ended: Code::Cancelled,
                },
            )),
            Err(status) => {
                self.log_line(status.code(), elapsed, None);
                Err(status)
            }
        }
    }

    /// Counts the answer in the metrics and makes it the gRPC answer.
    fn answer<T>(&self, result: Result<T>, elapsed: Duration) -> Result<Response<T>, Status> {
        match result {
            Ok(body) => {
                self.metrics.call_finished(self.method, Code::Ok, elapsed);
                let mut response = Response::new(body);
                if let Ok(mut v) = self.request_id.parse::<MetadataValue<Ascii>>() {
                    // Sent as never indexed (HPACK): every call's id is new, and indexed ids
                    // filled each connection's header table, where the encoder compared the
                    // next reply's id with every one of them (5% of a GetJob's server CPU).
                    v.set_sensitive(true);
                    response.metadata_mut().insert("x-request-id", v);
                }
                Ok(response)
            }
            Err(e) => {
                let status = {
                    let _enter = self.span.enter();
                    e.into_status(&self.request_id)
                };
                self.metrics
                    .call_finished(self.method, status.code(), elapsed);
                Err(status)
            }
        }
    }

    /// The one log line of a call, in its span: the code as tonic names it (`Ok`,
    /// `FailedPrecondition`), the time in milliseconds to the microsecond, and for a stream
    /// the messages it sent.
    fn log_line(&self, code: Code, elapsed: Duration, messages: Option<u64>) {
        let _enter = self.span.enter();
        let elapsed_ms = elapsed.as_micros() as f64 / 1000.0;
        match messages {
            None => tracing::info!(method = self.method, code = ?code, elapsed_ms, "call"),
            Some(messages) => {
                tracing::info!(method = self.method, code = ?code, elapsed_ms, messages, "stream ended")
            }
        }
    }
}

/// A stream's log line, written once when tonic drops the stream: the client went away
/// (`Cancelled`), or the stream ended with the code of its last message.
pub(crate) struct StreamLog {
    call: CallRecord,
    messages: u64,
    ended: Code,
}

impl StreamLog {
    /// Notes a message on its way to the client.
    pub(crate) fn sent<T>(&mut self, message: &Result<T, Status>) {
        match message {
            Ok(_) => self.messages += 1,
            Err(status) => self.ended = status.code(),
        }
    }
}

impl Drop for StreamLog {
    fn drop(&mut self) {
        let elapsed = self.call.started.elapsed();
        self.call.log_line(self.ended, elapsed, Some(self.messages));
    }
}
