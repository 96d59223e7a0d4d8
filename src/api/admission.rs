//! Load shedding: a bound on the unary calls that work at once, and on those that wait.
//!
//! Past the point where the database is saturated, more concurrent calls add only queueing:
//! every call gets slower and memory grows with the queue. So at most `max_concurrent` calls
//! run; up to `max_queued` more wait, each for at most `queue_timeout`; any other call is
//! refused at once with RESOURCE_EXHAUSTED `OVERLOADED` (retry with backoff). A refused call
//! costs a few microseconds and holds nothing, so latency for admitted calls stays that of a
//! saturated database, and recovers as soon as the load drops.
//!
//! Long-lived calls (WaitJob, StreamJobUpdates) are not counted here: they hold no database
//! connection while they wait, and have limits of their own.
//!
//! tower's `ConcurrencyLimit` + `LoadShed` would do the counting, but they sit below tonic's
//! routing (so they would count streams and health checks too) and answer without our
//! ErrorInfo; this is a semaphore and a counter.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::error::{Error, Result};

pub struct Admission {
    running: Semaphore,
    queued: AtomicUsize,
    max_queued: usize,
    queue_timeout: Duration,
}

/// Decrements the queue count however the wait ends (including the call being dropped).
struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    pub fn new(max_concurrent: usize, max_queued: usize, queue_timeout: Duration) -> Self {
        Admission {
            running: Semaphore::new(max_concurrent.max(1)),
            queued: AtomicUsize::new(0),
            max_queued,
            queue_timeout,
        }
    }

    /// A permit to run, held until the call answers; or RESOURCE_EXHAUSTED.
    pub async fn enter(&self) -> Result<SemaphorePermit<'_>> {
        if let Ok(permit) = self.running.try_acquire() {
            return Ok(permit);
        }
        if self.queued.fetch_add(1, Ordering::Relaxed) >= self.max_queued {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(overloaded());
        }
        let _queued = Queued(&self.queued);
        match tokio::time::timeout(self.queue_timeout, self.running.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(overloaded()),
        }
    }
}

fn overloaded() -> Error {
    Error::ResourceExhausted {
        reason: "OVERLOADED",
        message: "the server is at its limit of concurrent calls; retry with backoff".into(),
    }
}
