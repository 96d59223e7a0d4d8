//! jobsvc: a gRPC job service.
//!
//! # The house
//! One folder per concern; each `mod.rs` says what lives there and what it may import. The
//! imports only point down this list (checked by `scripts/check-layers`):
//! - [`app`]: the binary's wiring: configuration, `serve`, the other commands, logging, the
//!   private PostgreSQL, the metrics endpoint.
//! - [`api`]: the gRPC edge: server, per-call telemetry, the JobService RPCs, authentication,
//!   admission, tokens, and the only conversion between proto messages and domain values.
//! - [`tasks`]: background work: the sweeper, retention, history pruning, the stats fold.
//! - [`feed`]: the change feed: the history reader, the subscriber registry, wake-ups between
//!   replicas, and the task behind each stream.
//! - [`db`]: the pool, scoped row-level-security transactions, prepared statements, the batch
//!   writers, and all SQL.
//! - [`domain`]: job states and transitions, the validated inputs, callers, positions.
//! - [`error`], [`metrics`], [`pb`]: the one error type, the metrics registry, the generated
//!   protobuf code; shared by all of the above.
//!
//! # A write, hop by hop: CreateJob
//! 1. `api::service::JobSvc::create_job`: `api::call::CallRecord::start` opens the call's span;
//!    `JobSvc::admit` refuses it while the database is down and takes an admission place
//!    (`api::admission::Admission::enter`); `db::DbHealth::guard` abandons it if the
//!    database goes down meanwhile.
//! 2. `api::auth::Authenticator::authenticate` turns the bearer token into a
//!    `domain::Caller`; `api::convert::request` validates the fields into a `domain::NewJob`.
//! 3. `db::batch::Creates::create` queues it; a worker (or the call itself, when alone) writes
//!    it with concurrent creates of the same caller: `db::scoped::scoped` then
//!    `db::jobs::insert_many` (or `insert`), one statement and one commit, under the caller's
//!    row-level-security context. The `jobs` triggers append the change to `job_events` and
//!    the stats rollup in the same transaction.
//! 4. `JobSvc::committed` wakes the feed (`feed::Feed::committed`), after the commit.
//! 5. `api::convert::reply::job_to_pb` builds the reply; `CallRecord::finish` logs and counts it.
//!
//! # A change reaching a subscriber: StreamJobUpdates
//! 1. `api::service::JobSvc::stream_job_updates` authenticates, validates a
//!    `domain::WatchFilter` (`api::convert::request::watch_filter`), and starts a
//!    `feed::follow::StreamTask`, which subscribes (`feed::Feed::subscribe`) before it reads
//!    anything, so nothing slips between the two.
//! 2. A commit anywhere (this process, another replica via `feed::wake::listen_loop`, plain
//!    SQL found by the poll) wakes `feed::reader::read_loop`, which reads `job_events`
//!    (`db::events::read`) and hands each `feed::Event` (a domain `Job`) to the matching
//!    subscribers (`feed::registry::Registry::dispatch`), never waiting on any of them.
//! 3. The stream's task takes it from its queue (`StreamTask::offer`; after an overflow it
//!    catches up from the history itself) and sends a `feed::follow::Delivery`.
//! 4. On its way to the client, `api::convert::reply::delivery_to_pb` makes the message and
//!    signs its resume token (`api::tokens::TokenKey`): conversion happens only for what
//!    matched.
pub mod api;
pub mod app;
pub mod db;
pub mod domain;
pub mod error;
pub mod feed;
pub(crate) mod metrics;
pub mod pb;
pub(crate) mod tasks;
