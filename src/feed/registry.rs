//! The subscribers of one process, indexed by their most selective filter field (job ids,
//! agent, user), so an event wakes only the subscribers it may concern, whatever their number.
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
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
    pub(super) lagged: Arc<AtomicBool>,
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
            match entry.tx.try_send(event.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    entry.lagged.store(true, Ordering::Release);
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
    lagged: Arc<AtomicBool>,
    registry: Arc<Mutex<Registry>>,
}

impl Subscription {
    pub(super) fn new(
        id: u64,
        rx: mpsc::Receiver<Arc<Event>>,
        lagged: Arc<AtomicBool>,
        registry: Arc<Mutex<Registry>>,
    ) -> Self {
        Subscription {
            id,
            rx,
            lagged,
            registry,
        }
    }

    /// The next matching event; `None` once the feed is gone.
    pub async fn recv(&mut self) -> Option<Arc<Event>> {
        self.rx.recv().await
    }

    /// A queued event, if any, without waiting.
    pub fn try_recv(&mut self) -> Option<Arc<Event>> {
        self.rx.try_recv().ok()
    }

    /// Whether events were dropped because the queue was full (and clears the mark): the
    /// subscriber must catch up from the history from its last position. Events dispatched
    /// after this call are queued again.
    pub fn take_lagged(&self) -> bool {
        self.lagged.swap(false, Ordering::AcqRel)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.registry.lock().unwrap().remove(self.id);
    }
}
