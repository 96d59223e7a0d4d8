//! Per-caller limits on what a caller holds open: streams, waiting WaitJobs, and snapshots of
//! existing jobs being read. One user holding hundreds of streams would otherwise take the
//! server's memory, pool and snapshot connections from every other tenant. Each limit is per
//! user and global; the service role (the operator's own services) is bounded by the global
//! figure only.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use crate::domain::{Caller, Role};
use crate::error::{Error, Result};

/// One kind of thing a caller holds open, counted per user and in all.
#[derive(Debug)]
pub struct Limit {
    /// What is counted, for the message ("open streams").
    what: &'static str,
    /// The flag that sets `per_user`, for the message.
    flag: &'static str,
    per_user: usize,
    total: usize,
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    total: usize,
    by_user: HashMap<Uuid, usize>,
}

/// A place taken under a [`Limit`], given back when dropped.
#[derive(Debug)]
pub struct Slot {
    limit: Arc<Limit>,
    user: Option<Uuid>,
}

impl Limit {
    pub fn new(what: &'static str, flag: &'static str, per_user: usize, total: usize) -> Arc<Self> {
        Arc::new(Limit {
            what,
            flag,
            per_user: per_user.max(1),
            total: total.max(1),
            held: Mutex::default(),
        })
    }

    /// Takes a place for `caller`, or RESOURCE_EXHAUSTED `TOO_MANY_STREAMS` at once.
    pub fn enter(self: &Arc<Self>, caller: &Caller) -> Result<Slot> {
        let user = match caller.role() {
            Role::User(u) => Some(u),
            Role::Service => None,
        };
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.total >= self.total {
            return Err(Error::ResourceExhausted {
                reason: "TOO_MANY_STREAMS",
                message: format!(
                    "the server holds {} {} in all, its limit; retry with backoff",
                    self.total, self.what
                ),
            });
        }
        if let Some(u) = user {
            let mine = held.by_user.entry(u).or_default();
            if *mine >= self.per_user {
                return Err(Error::ResourceExhausted {
                    reason: "TOO_MANY_STREAMS",
                    message: format!(
                        "this user holds {} {}, the limit per user ({}); close some first",
                        self.per_user, self.what, self.flag
                    ),
                });
            }
            *mine += 1;
        }
        held.total += 1;
        Ok(Slot {
            limit: self.clone(),
            user,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.limit.held.lock().unwrap_or_else(|e| e.into_inner());
        held.total -= 1;
        if let Some(u) = self.user
            && let Some(n) = held.by_user.get_mut(&u)
        {
            *n -= 1;
            if *n == 0 {
                held.by_user.remove(&u);
            }
        }
    }
}

/// The limits of one server.
#[derive(Debug, Clone)]
pub struct CallerLimits {
    /// Open StreamJobUpdates streams.
    pub streams: Arc<Limit>,
    /// WaitJob calls waiting.
    pub waits: Arc<Limit>,
    /// Streams reading their `include_existing` snapshot.
    pub snapshots: Arc<Limit>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_counted_per_user_and_in_all_and_given_back() {
        let limit = Limit::new("open streams", "--max-streams-per-user", 2, 3);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let user = |u| Caller::new(Role::User(u), i64::MAX);
        let a1 = limit.enter(&user(a)).unwrap();
        let _a2 = limit.enter(&user(a)).unwrap();
        let refused = limit.enter(&user(a)).unwrap_err();
        assert_eq!(refused.reason(), "TOO_MANY_STREAMS");
        assert!(refused.to_string().contains("--max-streams-per-user"));
        let _b1 = limit.enter(&user(b)).unwrap();
        // Three in all: the global limit holds for the service role and everyone else.
        assert!(limit.enter(&user(b)).is_err());
        assert!(limit.enter(&Caller::new(Role::Service, i64::MAX)).is_err());
        drop(a1);
        let _b2 = limit.enter(&user(b)).unwrap();
        assert_eq!(limit.held.lock().unwrap().by_user[&a], 1);
    }
}
