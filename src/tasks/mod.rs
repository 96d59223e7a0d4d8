//! Background work, each a loop that runs until shutdown; every replica may run each one.
//!
//! - [`sweeper`]: RUNNING jobs (never leased) past `--running-timeout` become FAILED.
//! - [`leases`]: leases that expired without a heartbeat end: the job is retried or FAILED.
//! - [`retention`]: finished jobs past their configured age are deleted.
//! - [`history_prune`]: the change history past `--event-retention` is deleted.
//! - [`stats_fold`]: the stats rollup is kept compact; the jobs gauges follow it.
//!
//! May import: [`crate::domain`], [`crate::error`], [`crate::db`], [`crate::feed`] (to wake
//! subscribers after a sweep), [`crate::metrics`]. Never the API layer or the app.
pub mod history_prune;
pub mod leases;
pub mod retention;
pub mod stats_fold;
pub mod sweeper;
