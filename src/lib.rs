//! jobsvc: a gRPC job service.
//!
//! Module map, in the order a request meets them:
//! - [`server`]: the tonic server (health, reflection, HTTP/2 limits, graceful shutdown).
//! - [`admission`]: load shedding (the limit on unary calls working and queued).
//! - [`service`]: JobService; each RPC authenticates, validates, runs one database call, replies.
//! - [`batch`]: natural batching of CreateJob (concurrent creates share a statement).
//! - [`auth`]: bearer JWT to [`auth::Caller`]; nothing else decides who may see what.
//! - [`convert`]: the only place proto and domain types meet; request validation.
//! - [`domain`]: job states and the transition table.
//! - [`db`]: pool, migrations, all SQL, and row-level-security scoping per caller.
//! - [`feed`]: the change feed of one process (history reader, NOTIFY listener, fan-out).
//! - [`stream`]: one StreamJobUpdates stream: snapshot, catch-up, live, heartbeats.
//! - [`tokens`]: opaque signed page and resume tokens.
//! - [`metrics`]: Prometheus metrics and their optional endpoint.
//! - [`retention`]: background deletion of finished jobs past their configured age.
//! - [`transfer`]: `jobsvc export` / `import` as JSON lines.
//! - [`sweeper`]: RUNNING jobs past `--running-timeout` become FAILED.
//! - [`error`]: one error type and its one mapping to gRPC status with ErrorInfo.
//! - [`embedded_pg`]: the private PostgreSQL used when no DATABASE_URL is given.
//! - [`app`] and [`config`]: wiring for the `jobsvc` binary.
//!
//! Data path of a write: service -> convert (validate) -> db (one statement, under the
//! caller's RLS context for users; a trigger appends the change to the history) -> commit ->
//! wake the feed -> convert back to proto. The feed reads the history and fans the change out
//! to streams and waiters on every replica.
pub mod admission;
pub mod app;
pub mod auth;
pub mod batch;
pub mod codec;
pub mod config;
pub mod convert;
pub mod db;
pub mod domain;
pub mod embedded_pg;
pub mod error;
pub mod feed;
pub mod metrics;
pub mod pb;
pub mod retention;
pub mod server;
pub mod service;
pub mod stream;
pub mod sweeper;
pub mod tokens;
pub mod transfer;
