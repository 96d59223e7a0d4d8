//! The one mapping from [`Error`] to a gRPC status.
//!
//! Every status carries a `google.rpc.ErrorInfo` (domain `jobsvc`, a stable reason) so programs
//! in any language can branch on it. Database and internal details are logged here, with the
//! call's request id, and never sent to the client.
use std::collections::HashMap;

use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::Error;

/// The `ErrorInfo.domain` of every error.
pub const DOMAIN: &str = "jobsvc";

impl Error {
    pub(crate) fn code(&self) -> Code {
        match self {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::Unauthenticated { .. } => Code::Unauthenticated,
            Error::PermissionDenied { .. } => Code::PermissionDenied,
            Error::JobNotFound(_) => Code::NotFound,
            Error::InvalidTransition { .. } | Error::LeaseLost { .. } => Code::FailedPrecondition,
            Error::VersionMismatch { .. } => Code::Aborted,
            Error::IdempotencyKeyReused { .. } => Code::AlreadyExists,
            Error::ResourceExhausted { .. } => Code::ResourceExhausted,
            Error::OutOfRange { .. } => Code::OutOfRange,
            Error::ShuttingDown => Code::Unavailable,
            Error::Conflict => Code::Aborted,
            Error::Unavailable(_) | Error::NotReady { .. } => Code::Unavailable,
            Error::Internal(_) => Code::Internal,
        }
    }

    /// The status sent to the client. Internal details stay in the log, tied to `request_id`.
    pub(crate) fn into_status(self, request_id: &str) -> tonic::Status {
        let code = self.code();
        let reason = self.reason();
        let mut metadata = HashMap::new();
        let message = match &self {
            Error::Unavailable(source) => {
                tracing::warn!(error = %source, "database unavailable");
                format!("database unavailable, retry with backoff (request id {request_id})")
            }
            Error::Internal(source) => {
                tracing::error!(error = %source, "internal error");
                format!("internal error (request id {request_id})")
            }
            Error::InvalidTransition { current, requested } => {
                metadata.insert("current_status".into(), current.as_str().into());
                metadata.insert("requested_status".into(), requested.as_str().into());
                self.to_string()
            }
            Error::LeaseLost { status, attempt } => {
                metadata.insert("status".into(), status.as_str().into());
                metadata.insert("attempt".into(), attempt.to_string());
                self.to_string()
            }
            Error::VersionMismatch { expected, actual } => {
                metadata.insert("expected_version".into(), expected.to_string());
                metadata.insert("actual_version".into(), actual.to_string());
                self.to_string()
            }
            Error::InvalidArgument { field, .. } => {
                metadata.insert("field".into(), (*field).into());
                self.to_string()
            }
            _ => self.to_string(),
        };
        let mut details = ErrorDetails::with_error_info(reason, DOMAIN, metadata);
        if let Error::InvalidArgument { field, message, .. } = &self {
            details.add_bad_request_violation(*field, message.clone());
        }
        tonic::Status::with_error_details(code, message, details)
    }
}
