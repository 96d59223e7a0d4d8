//! The domain: what a job is, who may touch it, and the validated inputs every layer speaks.
//!
//! - [`status`]: [`JobStatus`] and the one transition table.
//! - [`job`]: a job as stored ([`Job`]), and the validated writes ([`NewJob`], [`StatusChange`]).
//! - [`filter`]: the three kinds of filter, one name each: [`ListFilter`] (a ListJobs page),
//!   [`WatchFilter`] (what a stream or a waiter follows) and [`ExportFilter`] (`jobsvc export`).
//! - [`caller`]: who is calling ([`Caller`], [`Role`]), as the API edge established it.
//! - [`position`]: points in the change history ([`Position`], [`Snapshot`]) and in a page
//!   sequence ([`PageCursor`]).
//!
//! May import: nothing of ours but the schema types it maps to (`crate::db::schema`). Nothing
//! here knows about gRPC, SQL text or tasks; everything else may import it.
pub mod caller;
pub mod filter;
pub mod job;
pub mod position;
pub mod status;

pub use caller::{Caller, Role};
pub use filter::{ExportFilter, ListFilter, WatchFilter};
pub use job::{Beat, Claim, Job, LeaseMove, NewJob, RetryPolicy, SizeCheck, StatusChange};
pub use position::{PageCursor, Position, Snapshot};
pub use status::{JobStatus, Transition, transition};
