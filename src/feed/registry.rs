//! The subscribers of one process, indexed by their most selective filter field (job ids,
//! agent, user), so an event wakes only the subscribers it may concern, whatever their number.
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use uuid::Uuid;

use super::event::Event;
use crate::domain::WatchFilter;

/// Where a subscription is indexed: its most selective filter field.
#[derive(Debug, Clone)]
pub(super) enum Key {
    Jobs(Vec<Uuid>),
    Agent(String),
    User(Uuid),
    Any,
}

impl Key {
    pub(super) fn of(f: &WatchFilter) -> Key {
        if !f.job_ids.is_empty() {
            Key::Jobs(f.job_ids.iter().copied().collect())
        } else if let Some(a) = &f.agent_identifier {
            Key::Agent(a.clone())
        } else if let Some(u) = f.user {
            Key::User(u)
        } else {
            Key::Any
        }
    }
}

pub(super) struct Entry {
    pub(super) filter: WatchFilter,
    pub(super) key: Key,
    pub(super) tx: mpsc::Sender<Arc<Event>>,
    pub(super) queue: Arc<QueueState>,
}

/// The most JSON (in bytes of text) one subscriber's queue holds, besides one event however
/// large: past it the subscriber is marked lagged and catches up from the history in
/// bounded reads, as past its event limit.
pub(super) const QUEUE_BYTES: usize = 16 << 20;

/// What the feed and one subscriber share about its queue.
#[derive(Debug, Default)]
pub(super) struct QueueState {
    /// Events were dropped for it (its queue was full, in events or bytes).
    lagged: AtomicBool,
    /// The bytes of the events in its queue.
    bytes: AtomicUsize,
}

/// The subscribers of one process, indexed for dispatch.
#[derive(Default)]
pub(super) struct Registry {
    next_id: u64,
    pub(super) entries: HashMap<u64, Entry>,
    any: HashSet<u64>,
    by_job: HashMap<Uuid, HashSet<u64>>,
    by_agent: HashMap<String, HashSet<u64>>,
    by_user: HashMap<Uuid, HashSet<u64>>,
}

impl Registry {
    pub(super) fn insert(&mut self, entry: Entry) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        match &entry.key {
            Key::Jobs(jobs) => {
                for j in jobs {
                    self.by_job.entry(*j).or_default().insert(id);
                }
            }
            Key::Agent(a) => {
                self.by_agent.entry(a.clone()).or_default().insert(id);
            }
            Key::User(u) => {
                self.by_user.entry(*u).or_default().insert(id);
            }
            Key::Any => {
                self.any.insert(id);
            }
        }
        self.entries.insert(id, entry);
        id
    }

    pub(super) fn remove(&mut self, id: u64) {
        let Some(entry) = self.entries.remove(&id) else {
            return;
        };
        fn drop_from<K: std::hash::Hash + Eq>(m: &mut HashMap<K, HashSet<u64>>, k: K, id: u64) {
            if let Some(set) = m.get_mut(&k) {
                set.remove(&id);
                if set.is_empty() {
                    m.remove(&k);
                }
            }
        }
        match entry.key {
            Key::Jobs(jobs) => {
                for j in jobs {
                    drop_from(&mut self.by_job, j, id);
                }
            }
            Key::Agent(a) => drop_from(&mut self.by_agent, a, id),
            Key::User(u) => drop_from(&mut self.by_user, u, id),
            Key::Any => {
                self.any.remove(&id);
            }
        }
    }

    /// Hands `event` to every subscriber it matches, without ever waiting.
    pub(super) fn dispatch(&mut self, event: &Arc<Event>) {
        let mut gone = Vec::new();
        let candidates = self
            .any
            .iter()
            .chain(self.by_job.get(&event.job.id).into_iter().flatten())
            .chain(
                self.by_agent
                    .get(&event.job.agent_identifier)
                    .into_iter()
                    .flatten(),
            )
            .chain(
                event
                    .job
                    .user_id
                    .and_then(|u| self.by_user.get(&u))
                    .into_iter()
                    .flatten(),
            );
        for id in candidates {
            let Some(entry) = self.entries.get(id) else {
                continue;
            };
            if !entry.filter.matches(&event.job) {
                continue;
            }
            let queued = entry.queue.bytes.load(Ordering::Acquire);
            if queued > 0 && queued + event.bytes > QUEUE_BYTES {
                entry.queue.lagged.store(true, Ordering::Release);
                continue;
            }
            entry.queue.bytes.fetch_add(event.bytes, Ordering::AcqRel);
            match entry.tx.try_send(event.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    entry.queue.bytes.fetch_sub(event.bytes, Ordering::AcqRel);
                    entry.queue.lagged.store(true, Ordering::Release);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => gone.push(*id),
            }
        }
        for id in gone {
            self.remove(id);
        }
    }
}

/// One subscriber's end: the matching events in feed order, and whether some were dropped.
pub struct Subscription {
    id: u64,
    rx: mpsc::Receiver<Arc<Event>>,
    queue: Arc<QueueState>,
    registry: Arc<Mutex<Registry>>,
}

impl Subscription {
    pub(super) fn new(
        id: u64,
        rx: mpsc::Receiver<Arc<Event>>,
        queue: Arc<QueueState>,
        registry: Arc<Mutex<Registry>>,
    ) -> Self {
        Subscription {
            id,
            rx,
            queue,
            registry,
        }
    }

    /// The next matching event; `None` once the feed is gone.
    pub async fn recv(&mut self) -> Option<Arc<Event>> {
        let event = self.rx.recv().await?;
        Some(self.taken(event))
    }

    /// A queued event, if any, without waiting.
    pub fn try_recv(&mut self) -> Option<Arc<Event>> {
        let event = self.rx.try_recv().ok()?;
        Some(self.taken(event))
    }

    fn taken(&self, event: Arc<Event>) -> Arc<Event> {
        self.queue.bytes.fetch_sub(event.bytes, Ordering::AcqRel);
        event
    }

    /// Whether events were dropped because the queue was full (and clears the mark): the
    /// subscriber must catch up from the history from its last position. Events dispatched
    /// after this call are queued again.
    pub fn take_lagged(&self) -> bool {
        self.queue.lagged.swap(false, Ordering::AcqRel)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.registry.lock().unwrap().remove(self.id);
    }
}
