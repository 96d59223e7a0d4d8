//! One error type for the whole service, with its stable reasons, and the one place that reads
//! database errors (which of them mean "unavailable"). Its one mapping to a gRPC status is in
//! `crate::api::status`.
//!
//! May import: [`crate::domain`].
use uuid::Uuid;

use crate::domain::JobStatus;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is malformed; `field` names it for `BadRequest`.
    #[error("{message}")]
    InvalidArgument {
        field: &'static str,
        reason: &'static str,
        message: String,
    },
    #[error("{message}")]
    Unauthenticated {
        reason: &'static str,
        message: String,
    },
    #[error("{message}")]
    PermissionDenied {
        reason: &'static str,
        message: String,
    },
    #[error("job {0} not found")]
    JobNotFound(Uuid),
    #[error("job is {} and cannot move to {}", .current.as_str(), .requested.as_str())]
    InvalidTransition {
        current: JobStatus,
        requested: JobStatus,
    },
    /// A worker's lease is no longer the job's (expired and taken over, or the job ended).
    #[error(
        "the lease is no longer this job's (the job is now {} at attempt {attempt}): stop working \
         on it", .status.as_str()
    )]
    LeaseLost { status: JobStatus, attempt: i32 },
    #[error(
        "job is at version {actual}, not the expected version {expected}; re-read it and retry"
    )]
    VersionMismatch { expected: i64, actual: i64 },
    #[error(
        "request_id {request_id:?} was already used for a different job; use a new request_id for a new job"
    )]
    IdempotencyKeyReused { request_id: String },
    /// A compare-and-set kept losing races with concurrent writers.
    #[error("the job changed concurrently several times; retry the call")]
    Conflict,
    #[error("{message}")]
    ResourceExhausted {
        reason: &'static str,
        message: String,
    },
    /// A position that no longer exists (a resume token older than the kept history).
    #[error("{message}")]
    OutOfRange {
        reason: &'static str,
        message: String,
    },
    /// The server is stopping; the client reconnects (to another replica).
    #[error("the server is shutting down; reconnect (with the last resume_token for a stream)")]
    ShuttingDown,
    /// A part the server needs is not there yet (the signing keys of a JWK set not fetched):
    /// retry with backoff.
    #[error("{message}")]
    NotReady {
        reason: &'static str,
        message: String,
    },
    /// The database cannot be reached; retry with backoff.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] BoxError),
    #[error("internal error: {0}")]
    Internal(#[source] BoxError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(field: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field,
            reason,
            message: message.into(),
        }
    }

    pub fn unauthenticated(reason: &'static str, message: impl Into<String>) -> Self {
        Error::Unauthenticated {
            reason,
            message: message.into(),
        }
    }

    /// The caller's token expired during a long call (a stream, a wait).
    pub fn token_expired() -> Self {
        Error::unauthenticated(
            "TOKEN_EXPIRED",
            "the token expired; call again with a fresh token (a stream: with its last resume_token)",
        )
    }

    pub fn denied(reason: &'static str, message: impl Into<String>) -> Self {
        Error::PermissionDenied {
            reason,
            message: message.into(),
        }
    }

    /// The stable `ErrorInfo.reason` of this error.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidArgument { reason, .. }
            | Error::Unauthenticated { reason, .. }
            | Error::PermissionDenied { reason, .. }
            | Error::ResourceExhausted { reason, .. }
            | Error::OutOfRange { reason, .. }
            | Error::NotReady { reason, .. } => reason,
            Error::JobNotFound(_) => "JOB_NOT_FOUND",
            Error::InvalidTransition { .. } => "INVALID_TRANSITION",
            Error::LeaseLost { .. } => "LEASE_LOST",
            Error::VersionMismatch { .. } => "VERSION_MISMATCH",
            Error::IdempotencyKeyReused { .. } => "IDEMPOTENCY_KEY_REUSED",
            Error::ShuttingDown => "SHUTTING_DOWN",
            Error::Conflict => "CONCURRENT_UPDATE",
            Error::Unavailable(_) => "DATABASE_UNAVAILABLE",
            Error::Internal(_) => "INTERNAL",
        }
    }
}

/// Messages of PostgreSQL errors that mean "the server is going away or not there yet" rather
/// than "this statement is wrong". diesel does not expose SQLSTATE for these, so the text is
/// the only signal; this is the one place that reads it.
const UNAVAILABLE_MESSAGES: &[&str] = &[
    "terminating connection",
    "the database system is",
    "connection to server",
    "server closed the connection",
    "no connection to the server",
    "could not connect",
    "connection closed",
];

impl From<diesel::result::Error> for Error {
    fn from(e: diesel::result::Error) -> Self {
        use diesel::result::DatabaseErrorKind as K;
        use diesel::result::Error as D;
        match &e {
            D::DatabaseError(K::ClosedConnection | K::UnableToSendCommand, _) => {
                Error::Unavailable(Box::new(e))
            }
            D::DatabaseError(_, info)
                if UNAVAILABLE_MESSAGES
                    .iter()
                    .any(|m| info.message().contains(m)) =>
            {
                Error::Unavailable(Box::new(e))
            }
            D::BrokenTransactionManager => Error::Unavailable(Box::new(e)),
            _ => Error::Internal(Box::new(e)),
        }
    }
}

impl From<diesel_async::pooled_connection::deadpool::PoolError> for Error {
    fn from(e: diesel_async::pooled_connection::deadpool::PoolError) -> Self {
        Error::Unavailable(Box::new(e))
    }
}
