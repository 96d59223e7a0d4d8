//! The change feed inside one process: one reader of the history (`job_events`) hands each
//! event to the subscribers (streams and WaitJob) whose filter it matches. Subscribers are
//! indexed by their most selective filter field (job ids, agent, user), so an event wakes
//! only the subscribers it may concern, whatever their number. Each subscriber has a bounded
//! queue; when it is full the reader drops the event for that subscriber and marks it
//! lagged, never waiting: the subscriber then catches up from the history on its own, so a
//! slow one never slows the others or the writers.
//!
//! What wakes the reader:
//! - a commit through this process ([`Feed::committed`]), at once;
//! - a NOTIFY on [`CHANNEL`] from another replica (one listener connection per process,
//!   reconnecting with backoff; after every reconnect the reader catches up);
//! - its own poll of the history every `poll_interval`, which finds plain SQL writes and
//!   anything a lost notification would have announced.
//!
//! NOTIFY is sent after commits, never inside a write transaction (a transaction that issued
//! NOTIFY holds a database-wide lock through its commit), and at most one at a time per
//! process: commits that land while one is being sent share the next.
use std::sync::Arc;
use std::time::Duration;

use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{Notify, mpsc, watch};
use uuid::Uuid;

use crate::convert;
use crate::db::events::{self, EventRow, Position};
use crate::db::{self, PgPool};
use crate::domain::JobStatus;
use crate::error::{Error, Result};
use crate::pb;
use crate::tokens::TokenKey;

/// The NOTIFY channel replicas wake each other on. The payload is always empty: it only says
/// "read the history".
pub const CHANNEL: &str = "jobsvc_feed";
/// `application_name` of the listener connection (what an operator sees in pg_stat_activity).
pub const LISTENER_NAME: &str = "jobsvc: feed listener";
/// Events per read of the history.
pub const READ_LIMIT: i64 = 1000;
/// While committed events wait above the horizon for an older transaction, the reader looks
/// again after this, doubling up to the poll interval.
const PENDING_RECHECK: Duration = Duration::from_millis(2);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// A read of the history that takes longer is abandoned with its connection (a half-open
/// connection would otherwise freeze the feed until TCP gives up).
const READ_TIMEOUT: Duration = Duration::from_secs(30);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The first prune runs this long after start, then every `PRUNE_INTERVAL`.
const PRUNE_FIRST: Duration = Duration::from_secs(60);
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);
const PRUNE_BATCH: i32 = 10_000;
/// At most one NOTIFY per this interval: under a steady stream of commits the other
/// replicas are woken 100 times a second, not once per commit.
const NOTIFY_MIN_INTERVAL: Duration = Duration::from_millis(10);
// The NOTIFY statement. A transaction that notifies takes an xid and writes a commit
// record; its durability is worthless (a lost wake-up only delays, the poll still finds the
// change), so it does not wait for the WAL flush.
const NOTIFY_SQL: &str = "BEGIN; SET LOCAL synchronous_commit = off; NOTIFY jobsvc_feed; COMMIT";

/// One committed change, prepared once for every subscriber.
#[derive(Debug)]
pub struct Event {
    pub position: Position,
    /// The transaction that made the change (for skipping what a snapshot already shows).
    pub writer_xid: i64,
    pub id: Uuid,
    pub user_id: Option<Uuid>,
    pub status: JobStatus,
    /// The whole job just after the change.
    pub job: pb::Job,
    /// The resume token of this event's position.
    pub resume_token: String,
}

impl Event {
    pub fn new(row: EventRow, tokens: &TokenKey) -> Self {
        let position = row.position();
        Event {
            position,
            writer_xid: row.writer_xid,
            id: row.job.id,
            user_id: row.job.user_id,
            status: row.job.status,
            job: convert::job_to_pb(row.job),
            resume_token: tokens.resume_token(position),
        }
    }
}

/// What a subscriber receives: every field set must match the job's new state.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub job_ids: HashSet<Uuid>,
    pub statuses: Vec<JobStatus>,
    pub agent_identifier: Option<String>,
    /// The effective owner scope: always the user itself for a user's subscription.
    pub user: Option<Uuid>,
}

impl Filter {
    pub fn matches(&self, e: &Event) -> bool {
        (self.job_ids.is_empty() || self.job_ids.contains(&e.id))
            && (self.statuses.is_empty() || self.statuses.contains(&e.status))
            && self
                .agent_identifier
                .as_deref()
                .is_none_or(|a| a == e.job.agent_identifier)
            && self.user.is_none_or(|u| e.user_id == Some(u))
    }
}

/// Where a subscription is indexed: its most selective filter field.
#[derive(Debug, Clone)]
enum Key {
    Jobs(Vec<Uuid>),
    Agent(String),
    User(Uuid),
    Any,
}

impl Key {
    fn of(f: &Filter) -> Key {
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

struct Entry {
    filter: Filter,
    key: Key,
    tx: mpsc::Sender<Arc<Event>>,
    lagged: Arc<AtomicBool>,
}

/// The subscribers of one process, indexed for dispatch.
#[derive(Default)]
struct Registry {
    next_id: u64,
    entries: HashMap<u64, Entry>,
    any: HashSet<u64>,
    by_job: HashMap<Uuid, HashSet<u64>>,
    by_agent: HashMap<String, HashSet<u64>>,
    by_user: HashMap<Uuid, HashSet<u64>>,
}

impl Registry {
    fn insert(&mut self, entry: Entry) -> u64 {
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

    fn remove(&mut self, id: u64) {
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
    fn dispatch(&mut self, event: &Arc<Event>) {
        let mut gone = Vec::new();
        let candidates = self
            .any
            .iter()
            .chain(self.by_job.get(&event.id).into_iter().flatten())
            .chain(
                self.by_agent
                    .get(&event.job.agent_identifier)
                    .into_iter()
                    .flatten(),
            )
            .chain(
                event
                    .user_id
                    .and_then(|u| self.by_user.get(&u))
                    .into_iter()
                    .flatten(),
            );
        for id in candidates {
            let Some(entry) = self.entries.get(id) else {
                continue;
            };
            if !entry.filter.matches(event) {
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
    feed: Arc<Feed>,
}

impl Subscription {
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
        self.feed.registry.lock().unwrap().remove(self.id);
    }
}

/// Settings of the feed.
#[derive(Debug, Clone)]
pub struct FeedConfig {
    pub poll_interval: Duration,
    pub retention: Duration,
    /// Events a subscriber's queue holds; one further behind catches up from the history.
    pub queue_events: usize,
}

/// The process's feed: subscribe to it, and tell it about commits.
pub struct Feed {
    registry: Mutex<Registry>,
    queue_events: usize,
    /// The position the reader has published up to. Always updated after the events below
    /// it were dispatched, so a subscriber that reads this and then drains its queue has seen
    /// every matching event up to it.
    position: watch::Receiver<Position>,
    wake: Notify,
    /// A first subscriber arrived: an idle reader reads again at once.
    subscribed: Notify,
    committed: Notify,
    pub tokens: TokenKey,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Feed {
    /// Starts the reader, the listener, the notifier and the pruner. The feed starts at the
    /// database's current horizon: history before it is reached by resuming, not live.
    pub async fn start(
        pool: PgPool,
        database_url: String,
        tokens: TokenKey,
        config: FeedConfig,
        metrics: Arc<crate::metrics::Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Feed>> {
        let mut conn = db::connect_named(&database_url, "jobsvc: feed reader").await?;
        let start = events::read(&mut conn, Position::MAX, 1, None).await?.tail;
        let (position_tx, position) = watch::channel(start);
        let feed = Arc::new(Feed {
            registry: Mutex::new(Registry::default()),
            queue_events: config.queue_events.max(1),
            position,
            wake: Notify::new(),
            subscribed: Notify::new(),
            committed: Notify::new(),
            tokens,
            metrics,
        });
        tokio::spawn(read_loop(
            feed.clone(),
            conn,
            database_url.clone(),
            position_tx,
            config.poll_interval,
            shutdown.clone(),
        ));
        tokio::spawn(listen_loop(
            feed.clone(),
            database_url.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(notify_loop(feed.clone(), database_url, shutdown.clone()));
        tokio::spawn(prune_loop(pool, config.retention, shutdown));
        Ok(feed)
    }

    /// Subscribes to the events matching `filter` from now on. The returned position was
    /// read after subscribing, but an event just above it may have been dispatched before:
    /// every caller starts from the history (a snapshot, a catch-up or a re-read).
    pub fn subscribe(self: &Arc<Self>, filter: Filter) -> (Subscription, Position) {
        let (tx, rx) = mpsc::channel(self.queue_events);
        let lagged = Arc::new(AtomicBool::new(false));
        let key = Key::of(&filter);
        let id = self.registry.lock().unwrap().insert(Entry {
            filter,
            key,
            tx,
            lagged: lagged.clone(),
        });
        let at = *self.position.borrow();
        self.subscribed.notify_one();
        let sub = Subscription {
            id,
            rx,
            lagged,
            feed: self.clone(),
        };
        (sub, at)
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

    /// Subscribers on this process (for metrics and tests).
    pub fn subscribers(&self) -> usize {
        self.registry.lock().unwrap().entries.len()
    }
}

/// Reads the history from the published position and publishes what it finds, whenever
/// woken and at least every `poll`.
async fn read_loop(
    feed: Arc<Feed>,
    conn: AsyncPgConnection,
    database_url: String,
    position_tx: watch::Sender<Position>,
    poll: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conn = Some(conn);
    let mut backoff = BACKOFF_MIN;
    let mut recheck = PENDING_RECHECK;
    loop {
        let at = *position_tx.borrow();
        let delay = match drain(&feed, &mut conn, &database_url, at, &position_tx).await {
            Ok(pending) => {
                backoff = BACKOFF_MIN;
                if pending {
                    let d = recheck;
                    recheck = (recheck * 2).min(poll);
                    d
                } else {
                    recheck = PENDING_RECHECK;
                    poll
                }
            }
            Err(e) => {
                conn = None;
                tracing::warn!(error = %e, retry_in = ?backoff, "change feed: reading the history failed");
                let d = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                d
            }
        };
        // With nobody subscribed, commits need no read: a subscriber starts from the history
        // at the published position, however old. So an idle reader only keeps the position
        // fresh every poll, and wakes for the first subscriber (not for every commit, which
        // under load would mean hundreds of reads a second for no one).
        let idle = feed.registry.lock().unwrap().entries.is_empty();
        if idle {
            tokio::select! {
                _ = feed.subscribed.notified() => {}
                _ = tokio::time::sleep(poll.max(delay)) => {}
                _ = shutdown.changed() => return,
            }
        } else {
            tokio::select! {
                _ = feed.wake.notified() => {}
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Reads until caught up with the horizon; returns whether events wait above it.
async fn drain(
    feed: &Feed,
    conn: &mut Option<AsyncPgConnection>,
    database_url: &str,
    mut at: Position,
    position_tx: &watch::Sender<Position>,
) -> Result<bool> {
    if conn.is_none() {
        *conn = Some(db::connect_named(database_url, "jobsvc: feed reader").await?);
    }
    let c = conn.as_mut().expect("connected above");
    loop {
        // With nobody subscribed, only the horizon matters: a new subscriber always starts
        // from the history, never from what the reader held.
        let idle = feed.registry.lock().unwrap().entries.is_empty();
        let limit = if idle { 0 } else { READ_LIMIT };
        let read = tokio::time::timeout(READ_TIMEOUT, events::read(c, at, limit, None))
            .await
            .map_err(|_| Error::Unavailable("change feed read timed out".into()))??;
        if read.horizon < at.xid || read.tail < at {
            // The history went back (a restore, a failover to a replica that was behind, a
            // crash that lost asynchronously committed plain SQL writes): positions past what
            // the database holds mean nothing here.
            tracing::warn!(
                horizon = read.horizon,
                position = at.xid,
                tail = read.tail.xid,
                "change feed: the database's history went back; restarting at its tail"
            );
            at = read.tail;
            position_tx.send_replace(at);
            continue;
        }
        if idle {
            let registry = feed.registry.lock().unwrap();
            if !registry.entries.is_empty() {
                // Someone subscribed during the read: its events must be dispatched.
                continue;
            }
            // Published under the lock, so a subscriber that comes next starts from the
            // history at or after this point.
            let end = at.max(read.tail);
            if end > at {
                position_tx.send_replace(end);
            }
            feed.metrics.feed_lag_seconds.set(0.0);
            feed.metrics.feed_subscribers.set(0);
            return Ok(read.pending);
        }
        let full = read.events.len() as i64 == READ_LIMIT;
        let end = match read.events.last() {
            Some(last) if full => last.position(),
            _ => at.max(read.tail),
        };
        let now = chrono::Utc::now();
        let mut lag = 0.0;
        if !read.events.is_empty() {
            let events: Vec<Arc<Event>> = read
                .events
                .into_iter()
                .map(|row| {
                    lag = (now - row.job.updated_at).as_seconds_f64().max(0.0);
                    feed.metrics.feed_delay.observe(lag);
                    Arc::new(Event::new(row, &feed.tokens))
                })
                .collect();
            let mut registry = feed.registry.lock().unwrap();
            for event in &events {
                registry.dispatch(event);
            }
        }
        feed.metrics.feed_lag_seconds.set(lag);
        feed.metrics
            .feed_subscribers
            .set(feed.registry.lock().unwrap().entries.len() as i64);
        if end > at {
            position_tx.send_replace(end);
            at = end;
        }
        if !full {
            return Ok(read.pending);
        }
    }
}

/// Wakes the reader on every NOTIFY from another replica; reconnects with backoff and makes
/// the reader catch up after each (re)connect, so a lost notification only delays.
async fn listen_loop(feed: Arc<Feed>, database_url: String, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let result: Result<()> = async {
            let mut conn = db::connect_named(&database_url, LISTENER_NAME).await?;
            diesel::sql_query(format!("LISTEN {CHANNEL}"))
                .execute(&mut conn)
                .await?;
            backoff = BACKOFF_MIN;
            feed.wake.notify_one();
            let mut notifications = std::pin::pin!(conn.notifications_stream());
            loop {
                tokio::select! {
                    n = notifications.next() => match n {
                        Some(Ok(_)) => feed.wake.notify_one(),
                        Some(Err(e)) => return Err(e.into()),
                        None => return Ok(()),
                    },
                    _ = shutdown.changed() => return Ok(()),
                }
            }
        }
        .await;
        if *shutdown.borrow() {
            return;
        }
        match result {
            Ok(()) => tracing::warn!("change feed: listener connection closed; reconnecting"),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "change feed: listener failed")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Sends one NOTIFY per burst of local commits (at most one per `NOTIFY_MIN_INTERVAL`),
/// outside any write transaction.
/// Its own connection, not a pooled one: after a failure inside the BEGIN ... COMMIT batch
/// the connection may be left in a transaction, and it is dropped, never handed to a caller.
async fn notify_loop(feed: Arc<Feed>, database_url: String, mut shutdown: watch::Receiver<bool>) {
    use diesel_async::SimpleAsyncConnection;
    let mut conn: Option<AsyncPgConnection> = None;
    loop {
        tokio::select! {
            _ = feed.committed.notified() => {}
            _ = shutdown.changed() => return,
        }
        let next = tokio::time::Instant::now() + NOTIFY_MIN_INTERVAL;
        let result: Result<()> = async {
            if conn.is_none() {
                conn = Some(db::connect_named(&database_url, "jobsvc: feed notifier").await?);
            }
            conn.as_mut()
                .expect("connected above")
                .batch_execute(NOTIFY_SQL)
                .await?;
            Ok(())
        }
        .await;
        if result.is_err() {
            conn = None;
        }
        tokio::time::sleep_until(next).await;
        if let Err(e) = result {
            // The others still find the change by polling.
            tracing::debug!(error = %e, "change feed: NOTIFY failed");
        }
    }
}

/// Deletes history older than the retention window, in batches.
async fn prune_loop(pool: PgPool, retention: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut delay = PRUNE_FIRST;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
        delay = PRUNE_INTERVAL;
        let result = db::run_batches(
            &pool,
            "SELECT job_events_prune($1, $2) AS n",
            None,
            retention,
            PRUNE_BATCH,
            &shutdown,
        )
        .await;
        match result {
            Ok(0) => {}
            Ok(n) => tracing::info!(events = n, "change feed: pruned history"),
            Err(e) => tracing::warn!(error = %e, "change feed: pruning failed"),
        }
    }
}
