//! Natural batching of CreateJob.
//!
//! One row per commit cannot go faster than the database's commits. So creates go through a
//! queue served by a few workers: a worker takes the first waiting create and every other one
//! waiting behind it (up to [`MAX_BATCH`]) and writes them with one statement and one commit.
//! A lone create finds a worker idle and goes alone, at single-row latency; under load, the
//! creates that arrive while statements are in flight share the next one. Each batch keeps
//! row-level security: creates of different callers are written in separate statements, each
//! in its caller's scope.
//!
//! Hand-written because the batching needs our statement (the insert that returns existing
//! rows for reused request_ids) and our scoping; the generic batching crates only collect
//! items.
use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};
use uuid::Uuid;

use crate::auth::Caller;
use crate::db::health::DbHealth;
use crate::db::jobs::NewJob;
use crate::db::models::WrittenRow;
use crate::db::{self, PgPool};
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// Most creates written by one statement.
pub const MAX_BATCH: usize = 100;

struct Item {
    caller: Caller,
    job: NewJob,
    reply: oneshot::Sender<(Result<WrittenRow>, NewJob)>,
}

#[derive(Clone)]
pub struct Creates {
    queue: mpsc::Sender<Item>,
}

impl Creates {
    /// `workers` batches in flight at most. A batch in flight when the database stops
    /// answering is abandoned (its callers get UNAVAILABLE), as a call's own work would be.
    pub fn start(pool: PgPool, workers: usize, health: DbHealth, metrics: Arc<Metrics>) -> Self {
        // Bounded by the admission limit in practice; the capacity only avoids a second bound.
        let (queue, rx) = mpsc::channel(4 * MAX_BATCH);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..workers.max(1) {
            tokio::spawn(worker(
                pool.clone(),
                rx.clone(),
                health.clone(),
                metrics.clone(),
            ));
        }
        Creates { queue }
    }

    /// Inserts `job` for `caller`, or returns the job its request_id already created; gives
    /// `job` back.
    pub async fn create(&self, caller: Caller, job: NewJob) -> Result<(WrittenRow, NewJob)> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Item { caller, job, reply })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        // No answer: the batch was abandoned because the database stopped answering.
        let (result, job) = answer.await.map_err(|_| {
            Error::Unavailable("the database stopped answering during the call".into())
        })?;
        Ok((result?, job))
    }
}

async fn worker(
    pool: PgPool,
    queue: Arc<Mutex<mpsc::Receiver<Item>>>,
    health: DbHealth,
    metrics: Arc<Metrics>,
) {
    loop {
        let mut batch = Vec::new();
        {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else {
                return;
            };
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
        let mut groups: Vec<Vec<Item>> = Vec::new();
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
            metrics.create_batch_rows.observe(group.len() as f64);
            write(&pool, group)
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

/// Writes one caller's creates and answers each.
async fn write(pool: &PgPool, mut items: Vec<Item>) {
    if items.len() == 1 {
        let item = items.pop().expect("one item");
        let result = insert_one(pool, &item.caller, &item.job).await;
        let _ = item.reply.send((result, item.job));
        return;
    }
    // A request_id twice in the batch: the first is written, the others get its row.
    let mut first_of: HashMap<(Option<Uuid>, String), usize> = HashMap::new();
    let mut duplicate_of: Vec<Option<usize>> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let first = item
            .job
            .request_id
            .as_ref()
            .and_then(|r| first_of.get(&(item.job.owner, r.clone())).copied());
        if first.is_none()
            && let Some(r) = &item.job.request_id
        {
            first_of.insert((item.job.owner, r.clone()), i);
        }
        duplicate_of.push(first);
    }
    let ids: Vec<Uuid> = items.iter().map(|_| Uuid::new_v4()).collect();
    let mut unique: Vec<(Uuid, &NewJob)> = items
        .iter()
        .zip(&ids)
        .zip(&duplicate_of)
        .filter(|(_, dup)| dup.is_none())
        .map(|((item, id), _)| (*id, &item.job))
        .collect();
    // Concurrent batches take their request_ids in one order, so they cannot deadlock on
    // each other's uncommitted rows.
    unique.sort_by(|(_, a), (_, b)| (a.owner, &a.request_id).cmp(&(b.owner, &b.request_id)));
    let caller = items[0].caller;
    let written = async {
        let mut db = db::scoped(pool, &caller).await?;
        let rows = db::jobs::insert_many(db.conn(), &unique).await;
        db.finish(rows).await
    }
    .await;
    let rows = match written {
        Ok(rows) => rows,
        Err(Error::Unavailable(e)) => {
            let message = e.to_string();
            for item in items {
                let e = Error::Unavailable(message.clone().into());
                let _ = item.reply.send((Err(e), item.job));
            }
            return;
        }
        Err(e) => {
            // Not the database going away: one create may be at fault, so each goes alone
            // and gets its own answer.
            tracing::debug!(error = %e, "batched create failed; writing one by one");
            for item in items {
                let result = insert_one(pool, &item.caller, &item.job).await;
                let _ = item.reply.send((result, item.job));
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
        let key = item.job.request_id.clone().map(|r| (item.job.owner, r));
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
            None => existing(pool, &item.caller, &item.job).await,
        };
        let _ = item.reply.send((result, item.job));
    }
}

async fn insert_one(pool: &PgPool, caller: &Caller, job: &NewJob) -> Result<WrittenRow> {
    let mut db = db::scoped(pool, caller).await?;
    let row = db::jobs::insert(db.conn(), job).await;
    db.finish(row).await
}

async fn existing(pool: &PgPool, caller: &Caller, job: &NewJob) -> Result<WrittenRow> {
    let mut db = db::scoped(pool, caller).await?;
    let row = db::jobs::by_request_id(db.conn(), job).await;
    db.finish(row).await
}
