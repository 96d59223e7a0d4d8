//! One waiter per change: a change that makes a job ready reaches every waiting claim of its
//! agent (each holds a subscription), but only the first to see it acts on it. Without this,
//! every create would wake every waiting worker into a claim statement, and all but one would
//! find nothing: with 16 workers waiting, 16 statements per job.
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use uuid::Uuid;

use super::event::Event;
use crate::domain::Job;

/// The changes remembered (a ring): far more than can be in flight between a change's
/// delivery and its waiters' reading it.
const REMEMBERED: usize = 1 << 16;

/// A change: a job and its version.
type Change = (Uuid, i64);
/// The changes remembered, as a set and in their order (the oldest leaves first).
type Seen = (HashSet<Change>, VecDeque<Change>);

/// Lanes kept before the unused ones are dropped.
const LANES: usize = 1024;

#[derive(Default)]
pub struct WakeOnce {
    /// Changes already acted on: (job, version).
    seen: Mutex<Seen>,
    /// Per agent: wakes one waiting claim of this server when a job of the agent becomes
    /// ready through this server (a create, a hand-back), before the feed has read it.
    lanes: Mutex<HashMap<String, Arc<Notify>>>,
}

impl WakeOnce {
    /// True for the first caller with this change, false for every later one.
    pub fn first(&self, event: &Event) -> bool {
        self.first_of(event.job.id, event.job.version)
    }

    /// The lane of an agent's waiting claims.
    pub fn lane(&self, agent: &str) -> Arc<Notify> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        if lanes.len() >= LANES && !lanes.contains_key(agent) {
            lanes.retain(|_, lane| Arc::strong_count(lane) > 1);
        }
        lanes.entry(agent.to_owned()).or_default().clone()
    }

    /// A job this server just made ready (committed): one waiting claim of its agent claims
    /// now, without waiting for the feed, and the feed's event of the same change wakes no one
    /// else.
    pub fn ready(&self, job: &Job) {
        // Most creates have no claim waiting here: then nothing is remembered (the path of
        // every create stays one map lookup).
        let lane = {
            let lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
            match lanes.get(&job.agent_identifier) {
                Some(lane) if Arc::strong_count(lane) > 1 => lane.clone(),
                _ => return,
            }
        };
        if self.first_of(job.id, job.version) {
            lane.notify_one();
        }
    }

    fn first_of(&self, job: Uuid, version: i64) -> bool {
        let key = (job, version);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let (set, order) = &mut *seen;
        if !set.insert(key) {
            return false;
        }
        order.push_back(key);
        if order.len() > REMEMBERED
            && let Some(old) = order.pop_front()
        {
            set.remove(&old);
        }
        true
    }
}
