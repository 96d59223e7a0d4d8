//! Natural batching of CreateJob and UpdateStatus.
//!
//! One row per commit cannot go faster than the database's commits, and every statement on
//! `jobs` also pays for its statement-level triggers (the change history and the stats
//! rollups). So these writes go through queues, each served by a few workers: a worker takes
//! the first waiting call and every other one waiting behind it (up to [`MAX_BATCH`]) and
//! writes them with one statement and one commit. A lone call finds a worker idle and goes
//! alone, at single-row latency; under load, the calls that arrive while statements are in
//! flight share the next one. Each batch keeps row-level security: calls of different
//! callers are written in separate statements, each in its caller's scope.
//!
//! Hand-written because the batching needs our statements (the insert that returns existing
//! rows for reused request_ids, the compare-and-set that returns the rows it did not move)
//! and our scoping; the generic batching crates only collect items.
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;

use futures_util::future::{BoxFuture, FutureExt};
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{Mutex, Semaphore, mpsc, oneshot};
use uuid::Uuid;

use super::health::DbHealth;
use super::models::WrittenRow;
use super::work::BeatRow;
use crate::db::{self, PgPool};
use crate::domain::{Beat, Caller, NewJob, RetryPolicy, StatusChange};
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// Most calls written by one statement.
pub const MAX_BATCH: usize = 100;

/// A call waiting for its write: the work comes back with the answer.
struct Item<T, R> {
    caller: Caller,
    work: T,
    reply: oneshot::Sender<(Result<R>, T)>,
}

impl<T, R> Item<T, R> {
    fn answer(self, result: Result<R>) {
        let _ = self.reply.send((result, self.work));
    }
}

/// The database went away during a batch: every item of it hears so.
fn answer_unavailable<T, R>(
    items: impl IntoIterator<Item = Item<T, R>>,
    cause: &dyn std::fmt::Display,
) {
    let message = cause.to_string();
    for item in items {
        item.answer(Err(Error::Unavailable(message.clone().into())));
    }
}

type WriteFn<T, R> = dyn Fn(Vec<Item<T, R>>) -> BoxFuture<'static, ()> + Send + Sync;

/// A queue of one kind of write and its workers.
struct Queue<T, R> {
    tx: mpsc::Sender<Item<T, R>>,
    /// One permit per batch in flight, taken by a worker for each batch it writes, or by a
    /// lone call that writes itself (see [`Queue::submit`]).
    slots: Arc<Semaphore>,
    write: Arc<WriteFn<T, R>>,
    rows: Histogram,
}

impl<T, R> Clone for Queue<T, R> {
    fn clone(&self) -> Self {
        Queue {
            tx: self.tx.clone(),
            slots: self.slots.clone(),
            write: self.write.clone(),
            rows: self.rows.clone(),
        }
    }
}

impl<T: Send + 'static, R: Send + 'static> Queue<T, R> {
    /// `workers` batches in flight at most; `write` writes one caller's batch and answers
    /// each item. A batch in flight when the database stops answering is abandoned (its
    /// callers get UNAVAILABLE), as a call's own work would be.
    fn start<W, F>(workers: usize, health: DbHealth, rows: Histogram, write: W) -> Self
    where
        W: Fn(Vec<Item<T, R>>) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        // Bounded by the admission limit in practice; the capacity only avoids a second bound.
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        let rx = Arc::new(Mutex::new(rx));
        let write: Arc<WriteFn<T, R>> = Arc::new(move |items| write(items).boxed());
        let slots = Arc::new(Semaphore::new(workers.max(1)));
        for _ in 0..workers.max(1) {
            tokio::spawn(worker(
                rx.clone(),
                slots.clone(),
                health.clone(),
                rows.clone(),
                write.clone(),
            ));
        }
        Queue {
            tx,
            slots,
            write,
            rows,
        }
    }

    /// Queues `work` for `caller` and waits for its answer; gives `work` back.
    ///
    /// A call that finds nothing queued and a batch slot free writes itself, in its own
    /// task: at one caller, the hand-over to a worker and back cost two task wake-ups, a
    /// tenth of a lone call's latency. Under load the slots are taken and calls queue up.
    async fn submit(&self, caller: Caller, work: T) -> Result<(R, T)> {
        let (reply, answer) = oneshot::channel();
        let item = Item {
            caller,
            work,
            reply,
        };
        // The slot is taken only when nothing is queued, and never held while queueing
        // (a full queue would then wait on the slot its worker needs).
        let slot = match self.tx.capacity() == self.tx.max_capacity() {
            true => self.slots.try_acquire().ok(),
            false => None,
        };
        match slot {
            Some(_slot) => {
                self.rows.observe(1.0);
                (self.write)(vec![item]).await;
            }
            None => self.tx.send(item).await.map_err(|_| Error::ShuttingDown)?,
        }
        // No answer: the batch was abandoned because the database stopped answering.
        let (result, work) = answer.await.map_err(|_| {
            Error::Unavailable("the database stopped answering during the call".into())
        })?;
        Ok((result?, work))
    }
}

async fn worker<T, R>(
    queue: Arc<Mutex<mpsc::Receiver<Item<T, R>>>>,
    slots: Arc<Semaphore>,
    health: DbHealth,
    rows: Histogram,
    write: Arc<WriteFn<T, R>>,
) {
    loop {
        let mut batch = Vec::new();
        let _slot;
        {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else {
                return;
            };
            // Calls that arrive while every slot is busy join this batch.
            _slot = slots.acquire().await.expect("the slots are never closed");
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => break,
                }
            }
        }
        // A caller that gave up (cancelled, deadline, database lost) is not written: it got
        // an answer already, and may retry.
        batch.retain(|item| !item.reply.is_closed());
        // One statement per caller, each in that caller's row-level-security scope; the
        // callers' statements run side by side.
        let mut groups: Vec<Vec<Item<T, R>>> = Vec::new();
        for item in batch {
            match groups
                .iter_mut()
                .find(|g| g[0].caller.role() == item.caller.role())
            {
                Some(group) => group.push(item),
                None => groups.push(vec![item]),
            }
        }
        let writes = groups.into_iter().map(|group| {
            rows.observe(group.len() as f64);
            write(group)
        });
        // Abandoned when the database stops answering: the replies are dropped, so every
        // caller hears UNAVAILABLE.
        let _ = health
            .guard(async {
                futures_util::future::join_all(writes).await;
                Ok(())
            })
            .await;
    }
}

/// CreateJob's writer.
#[derive(Clone)]
pub struct Creates(Queue<NewJob, WrittenRow>);

impl Creates {
    pub fn start(pool: PgPool, workers: usize, health: DbHealth, metrics: Arc<Metrics>) -> Self {
        let rows = metrics.create_batch_rows.clone();
        Creates(Queue::start(workers, health, rows, move |items| {
            write_creates(pool.clone(), items)
        }))
    }

    /// Inserts `job` for `caller`, or returns the job its request_id already created; gives
    /// `job` back.
    pub async fn create(&self, caller: Caller, job: NewJob) -> Result<(WrittenRow, NewJob)> {
        self.0.submit(caller, job).await
    }
}

/// UpdateStatus's (and CancelJob's) writer.
#[derive(Clone)]
pub struct Updates(Queue<StatusChange, Option<WrittenRow>>);

impl Updates {
    /// `retry`: how a worker's failed attempt is retried.
    pub fn start(
        pool: PgPool,
        workers: usize,
        health: DbHealth,
        metrics: Arc<Metrics>,
        retry: RetryPolicy,
    ) -> Self {
        let rows = metrics.update_batch_rows.clone();
        Updates(Queue::start(workers, health, rows, move |items| {
            write_updates(pool.clone(), items, retry)
        }))
    }

    /// One compare-and-set attempt (see [`db::jobs::compare_and_set_status`]) for `caller`;
    /// gives `change` back.
    pub async fn apply(
        &self,
        caller: Caller,
        change: StatusChange,
    ) -> Result<(Option<WrittenRow>, StatusChange)> {
        self.0.submit(caller, change).await
    }
}

/// Writes one caller's compare-and-sets and answers each.
async fn write_updates(
    pool: PgPool,
    mut items: Vec<Item<StatusChange, Option<WrittenRow>>>,
    retry: RetryPolicy,
) {
    let caller = items[0].caller;
    if items.len() == 1 {
        let item = items.pop().expect("one item");
        let result = update_one(&pool, &item.caller, &item.work, retry).await;
        item.answer(result);
        return;
    }
    // A job twice in the batch: its first move goes in the statement, the others after it,
    // one by one, as if they had arrived later.
    let mut seen = HashSet::new();
    let (mut batch, later): (Vec<_>, Vec<_>) = items
        .into_iter()
        .partition(|item| seen.insert(item.work.id));
    // Concurrent batches lock their jobs in one order, so they cannot deadlock on each other.
    batch.sort_by_key(|item| item.work.id);
    let written = async {
        let changes: Vec<&StatusChange> = batch.iter().map(|item| &item.work).collect();
        let mut db = db::scoped(&pool, &caller).await?;
        let rows = db
            .exec(|c| db::jobs::compare_and_set_many(c, caller.user(), &changes, retry))
            .await;
        db.finish(rows).await
    }
    .await;
    match written {
        Ok(rows) => {
            let mut by_id: HashMap<Uuid, WrittenRow> =
                rows.into_iter().map(|row| (row.job.id, row)).collect();
            for item in batch {
                let row = by_id.remove(&item.work.id);
                item.answer(Ok(row));
            }
        }
        Err(Error::Unavailable(e)) => {
            answer_unavailable(batch.into_iter().chain(later), &e);
            return;
        }
        Err(e) => {
            // Not the database going away: one move may be at fault, so each goes alone and
            // gets its own answer.
            tracing::debug!(error = %e, "batched update failed; writing one by one");
            for item in batch {
                let result = update_one(&pool, &item.caller, &item.work, retry).await;
                item.answer(result);
            }
        }
    }
    for item in later {
        let result = update_one(&pool, &item.caller, &item.work, retry).await;
        item.answer(result);
    }
}

async fn update_one(
    pool: &PgPool,
    caller: &Caller,
    change: &StatusChange,
    retry: RetryPolicy,
) -> Result<Option<WrittenRow>> {
    let mut db = db::scoped(pool, caller).await?;
    let row = match change.lease {
        // A worker's move: only the batched statement knows leases and retries.
        Some(_) => {
            db.exec(|c| async move {
                let rows =
                    db::jobs::compare_and_set_many(c, caller.user(), &[change], retry).await?;
                Ok(rows.into_iter().next())
            })
            .await
        }
        None => {
            db.exec(|c| db::jobs::compare_and_set_status(c, caller.user(), change))
                .await
        }
    };
    db.finish(row).await
}

/// Heartbeat's writer: heartbeats are the hottest write a worker makes, so concurrent ones
/// share a statement as creates and moves do.
#[derive(Clone)]
pub struct Beats(Queue<Beat, Option<BeatRow>>);

impl Beats {
    pub fn start(pool: PgPool, workers: usize, health: DbHealth, metrics: Arc<Metrics>) -> Self {
        let rows = metrics.heartbeat_batch_rows.clone();
        Beats(Queue::start(workers, health, rows, move |items| {
            write_beats(pool.clone(), items)
        }))
    }

    /// Extends a lease (and stores progress) for `caller`; `None`: no such job in scope.
    pub async fn beat(&self, caller: Caller, beat: Beat) -> Result<Option<BeatRow>> {
        Ok(self.0.submit(caller, beat).await?.0)
    }
}

/// Writes one caller's heartbeats and answers each.
async fn write_beats(pool: PgPool, items: Vec<Item<Beat, Option<BeatRow>>>) {
    let caller = items[0].caller;
    // A job twice in the batch: its first heartbeat goes in the statement, the others after.
    let mut seen = HashSet::new();
    let (batch, later): (Vec<_>, Vec<_>) = items
        .into_iter()
        .partition(|item| seen.insert(item.work.id));
    for round in [batch, later] {
        if round.is_empty() {
            continue;
        }
        let mut round = round;
        round.sort_by_key(|item| item.work.id);
        let written = async {
            let beats: Vec<&Beat> = round.iter().map(|item| &item.work).collect();
            let mut db = db::scoped(&pool, &caller).await?;
            let rows = db
                .exec(|c| db::work::heartbeat_many(c, caller.user(), &beats))
                .await;
            db.finish(rows).await
        }
        .await;
        match written {
            Ok(rows) => {
                let mut by_id: HashMap<Uuid, BeatRow> =
                    rows.into_iter().map(|row| (row.id, row)).collect();
                for item in round {
                    let row = by_id.remove(&item.work.id);
                    item.answer(Ok(row));
                }
            }
            Err(e) => {
                let message = e.to_string();
                for item in round {
                    item.answer(Err(match &e {
                        Error::Unavailable(_) => Error::Unavailable(message.clone().into()),
                        _ => Error::Internal(message.clone().into()),
                    }));
                }
            }
        }
    }
}

/// Writes one caller's creates and answers each.
async fn write_creates(pool: PgPool, mut items: Vec<Item<NewJob, WrittenRow>>) {
    let pool = &pool;
    if items.len() == 1 {
        let item = items.pop().expect("one item");
        let result = insert_one(pool, &item.caller, &item.work).await;
        item.answer(result);
        return;
    }
    // A request_id twice in the batch: the first is written, the others get its row.
    let mut first_of: HashMap<(Option<Uuid>, String), usize> = HashMap::new();
    let mut duplicate_of: Vec<Option<usize>> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let first = item
            .work
            .request_id
            .as_ref()
            .and_then(|r| first_of.get(&(item.work.owner, r.clone())).copied());
        if first.is_none()
            && let Some(r) = &item.work.request_id
        {
            first_of.insert((item.work.owner, r.clone()), i);
        }
        duplicate_of.push(first);
    }
    let ids: Vec<Uuid> = items.iter().map(|_| Uuid::new_v4()).collect();
    let mut unique: Vec<(Uuid, &NewJob)> = items
        .iter()
        .zip(&ids)
        .zip(&duplicate_of)
        .filter(|(_, dup)| dup.is_none())
        .map(|((item, id), _)| (*id, &item.work))
        .collect();
    // Concurrent batches take their request_ids in one order, so they cannot deadlock on
    // each other's uncommitted rows.
    unique.sort_by(|(_, a), (_, b)| (a.owner, &a.request_id).cmp(&(b.owner, &b.request_id)));
    let caller = items[0].caller;
    let written = async {
        let mut db = db::scoped(pool, &caller).await?;
        let rows = db.exec(|c| db::jobs::insert_many(c, &unique)).await;
        db.finish(rows).await
    }
    .await;
    let rows = match written {
        Ok(rows) => rows,
        Err(Error::Unavailable(e)) => {
            answer_unavailable(items, &e);
            return;
        }
        Err(e) => {
            // Not the database going away: one create may be at fault, so each goes alone
            // and gets its own answer.
            tracing::debug!(error = %e, "batched create failed; writing one by one");
            for item in items {
                let result = insert_one(pool, &item.caller, &item.work).await;
                item.answer(result);
            }
            return;
        }
    };
    let mut by_id: HashMap<Uuid, WrittenRow> = HashMap::new();
    let mut by_request: HashMap<(Option<Uuid>, String), WrittenRow> = HashMap::new();
    for row in rows {
        if row.written {
            by_id.insert(row.job.id, row);
        } else if let Some(r) = row.job.request_id.clone() {
            by_request.insert((row.job.user_id, r), row);
        }
    }
    let mut answers: Vec<Option<WrittenRow>> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let key = item.work.request_id.clone().map(|r| (item.work.owner, r));
        let answer = match duplicate_of[i] {
            Some(first) => answers[first].clone().map(|mut row| {
                row.written = false;
                row
            }),
            None => by_id
                .remove(&ids[i])
                .or_else(|| key.and_then(|k| by_request.get(&k).cloned())),
        };
        answers.push(answer);
    }
    for (item, answer) in items.into_iter().zip(answers) {
        let result = match answer {
            Some(row) => Ok(row),
            // Its request_id was taken by a create that committed during the statement.
            None => existing(pool, &item.caller, &item.work).await,
        };
        item.answer(result);
    }
}

async fn insert_one(pool: &PgPool, caller: &Caller, job: &NewJob) -> Result<WrittenRow> {
    let mut db = db::scoped(pool, caller).await?;
    let row = db.exec(|c| db::jobs::insert(c, job)).await;
    db.finish(row).await
}

async fn existing(pool: &PgPool, caller: &Caller, job: &NewJob) -> Result<WrittenRow> {
    let mut db = db::scoped(pool, caller).await?;
    let row = db.exec(|c| db::jobs::by_request_id(c, job)).await;
    db.finish(row).await
}
