//! The gRPC edge: where requests come in, callers are authenticated, inputs validated into
//! domain values, and domain values converted back into messages.
//!
//! - [`server`]: the server as a function of (listener, state, shutdown): HTTP/2 limits,
//!   health, reflection, graceful shutdown. [`health`] keeps the health service current.
//! - [`service`]: the JobService RPCs; each reads authenticate, validate, one database call,
//!   commit, notify, reply. [`state`] is what every call shares.
//! - [`call`]: per-call telemetry (request id, span, metrics, the one log line).
//! - [`convert`]: the only place proto messages are built and read.
//! - [`auth`]: bearer JWT to [`crate::domain::Caller`]. [`tokens`]: signed page and resume
//!   tokens. [`admission`]: load shedding. [`codec`]: undecodable requests answered as
//!   INVALID_ARGUMENT. [`status`]: the one mapping from [`crate::error::Error`] to a status.
//!   [`fault`]: the test hook that loses responses after commit. [`ui`]: the dashboard's
//!   files, served at `/`.
//!
//! May import: everything below it ([`crate::domain`], [`crate::error`], [`crate::db`],
//! [`crate::feed`], [`crate::metrics`], [`crate::pb`]); nothing imports it but the app.
pub(crate) mod admission;
pub mod auth;
pub(crate) mod call;
pub(crate) mod codec;
pub mod convert;
pub(crate) mod cors;
pub(crate) mod fault;
pub(crate) mod health;
pub(crate) mod server;
pub(crate) mod service;
pub(crate) mod state;
pub(crate) mod status;
pub mod tokens;
pub(crate) mod ui;
