//! The process's feed as its users see it: subscribe to it, and tell it about commits.
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc, watch};

use super::registry::{Entry, Key, QueueState, Registry, Subscription};
use crate::domain::{Position, WatchFilter};
use crate::metrics::Metrics;

/// The process's feed: subscribe to it, and tell it about commits.
pub struct Feed {
    pub(super) registry: Arc<Mutex<Registry>>,
    pub(super) queue_events: usize,
    /// The position the reader has published up to. Always updated after the events below
    /// it were dispatched, so a subscriber that reads this and then drains its queue has seen
    /// every matching event up to it.
    pub(super) position: watch::Receiver<Position>,
    pub(super) wake: Notify,
    /// A first subscriber arrived: an idle reader reads again at once.
    pub(super) subscribed: Notify,
    pub(super) committed: Notify,
    pub(super) metrics: Arc<Metrics>,
}

impl Feed {
    /// Subscribes to the events matching `filter` from now on. The returned position was
    /// read after subscribing, but an event just above it may have been dispatched before:
    /// every caller starts from the history (a snapshot, a catch-up or a re-read).
    pub fn subscribe(self: &Arc<Self>, filter: WatchFilter) -> (Subscription, Position) {
        let (tx, rx) = mpsc::channel(self.queue_events);
        let queue = Arc::new(QueueState::default());
        let key = Key::of(&filter);
        let id = self.registry.lock().unwrap().insert(Entry {
            filter,
            key,
            tx,
            queue: queue.clone(),
        });
        let at = *self.position.borrow();
        self.subscribed.notify_one();
        (Subscription::new(id, rx, queue, self.registry.clone()), at)
    }

    /// The position published so far; see the field's comment for how to use it.
    pub fn published(&self) -> Position {
        *self.position.borrow()
    }

    /// A change committed through this process: read it now, and wake the other replicas.
    pub fn committed(&self) {
        self.wake.notify_one();
        self.committed.notify_one();
    }
}
