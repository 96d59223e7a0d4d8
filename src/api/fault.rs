//! The fault hook of the ambiguous-commit tests (`--fault-drop-every N`, hidden): every Nth
//! committed write answers UNAVAILABLE as if its response had been lost after the commit, the
//! ambiguous outcome clients must handle by retrying with the same request_id or expected
//! status. Off unless configured; called from one place, `JobSvc::committed`. It stays in the
//! release binary because those tests drive the real one.
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Loses the response of every `every`th committed write.
#[derive(Debug)]
pub struct LostResponses {
    every: u64,
    writes: AtomicU64,
}

impl LostResponses {
    /// `None` (no hook at all) for 0, the default.
    pub fn every(every: u64) -> Option<Self> {
        (every > 0).then(|| LostResponses {
            every,
            writes: AtomicU64::new(0),
        })
    }

    /// After a commit: the answer the client gets in place of the committed write's.
    pub fn after_commit(&self) -> Result<()> {
        if self.writes.fetch_add(1, Ordering::Relaxed) % self.every == self.every - 1 {
            return Err(Error::Unavailable(
                "injected fault: response dropped after commit".into(),
            ));
        }
        Ok(())
    }
}
