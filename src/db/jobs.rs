//! Statements on `jobs`. Each takes a connection (the caller owns any transaction) and the
//! caller's user scope: `Some(user)` adds `user_id = user` to every statement, so isolation
//! holds in the application as well as in row-level security.
use diesel::sql_types::{Array, BigInt, Bool, Double, Integer, Jsonb, Nullable, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::PreparedExt;
use super::models::{JsonText, WrittenRow};
use crate::domain::{Job, ListFilter, NewJob, PageCursor, RetryPolicy, StatusChange};
use crate::error::Result;

/// The columns of a job row ([`Job`]), named rather than `*`: statements stay prepared on
/// their connections (see [`super::Prepared`]), and PostgreSQL refuses to run a prepared
/// statement whose result shape changed, so `*` would break running replicas on the next
/// migration that adds a column. With a table alias: `job_columns!("j")`.
#[rustfmt::skip] // one line per SQL clause reads better than one per token
macro_rules! job_columns {
    () => {
        "id, user_id, agent_identifier, status, job_data, result, error_message, created_at, \
         updated_at, started_at, completed_at, version, request_id, priority, run_after, \
         attempt, max_attempts, initial_backoff, lease_id, lease_expires_at, worker_id, progress"
    };
    ($t:literal) => {
        concat!(
            $t, ".id, ", $t, ".user_id, ", $t, ".agent_identifier, ", $t, ".status, ",
            $t, ".job_data, ", $t, ".result, ", $t, ".error_message, ", $t, ".created_at, ",
            $t, ".updated_at, ", $t, ".started_at, ", $t, ".completed_at, ", $t, ".version, ",
            $t, ".request_id, ", $t, ".priority, ", $t, ".run_after, ", $t, ".attempt, ",
            $t, ".max_attempts, ", $t, ".initial_backoff, ", $t, ".lease_id, ",
            $t, ".lease_expires_at, ", $t, ".worker_id, ", $t, ".progress"
        )
    };
}

// One statement: insert unless the owner already used this request_id; then return either the
// new row (written) or the existing one. The arbiter is the partial unique index
// jobs_owner_request_id_key, which treats a NULL owner as one owner. `{owner}` is filled by
// [`owner_match`], so the lookup of the existing row is an index condition on that index.
#[rustfmt::skip]
const INSERT_SQL: &str = concat!("
WITH ins AS (
    INSERT INTO jobs (user_id, agent_identifier, job_data, request_id, job_data_bytes, priority,
                      run_after, max_attempts, initial_backoff)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::int8 * interval '1 microsecond')
    ON CONFLICT (user_id, request_id) WHERE request_id IS NOT NULL DO NOTHING
    RETURNING ", job_columns!(), "
)
SELECT ins.*, true AS written FROM ins
UNION ALL
SELECT ", job_columns!("j"), ", false FROM jobs j
WHERE $4 IS NOT NULL AND j.request_id = $4 AND {owner}
  AND NOT EXISTS (SELECT 1 FROM ins)");

// The existing row for an owner's request_id, read with a fresh snapshot: used when the row
// that won the conflict committed after the insert statement's snapshot was taken.
#[rustfmt::skip]
const BY_REQUEST_ID_SQL: &str = concat!("
SELECT ", job_columns!("j"), ", false AS written FROM jobs j
WHERE j.request_id = $2 AND {owner}");

/// The owner condition of the request_id lookups, as jobs_owner_request_id_key can serve it
/// (`IS NOT DISTINCT FROM` would walk the whole index).
fn owner_match(owner: Option<Uuid>) -> &'static str {
    match owner {
        Some(_) => "j.user_id = $1",
        None => "j.user_id IS NULL AND $1::uuid IS NULL",
    }
}

/// Inserts a job, or returns the job this owner's `request_id` already created.
pub(crate) async fn insert(mut conn: &AsyncPgConnection, job: &NewJob) -> Result<WrittenRow> {
    let owner = owner_match(job.owner);
    let rows: Vec<WrittenRow> = diesel::sql_query(INSERT_SQL.replace("{owner}", owner))
        .bind::<Nullable<diesel::sql_types::Uuid>, _>(job.owner)
        .bind::<Text, _>(&job.agent_identifier)
        .bind::<Jsonb, _>(&job.job_data)
        .bind::<Nullable<Text>, _>(job.request_id.as_deref())
        .bind::<Integer, _>(job.job_data_bytes)
        .bind::<Integer, _>(job.priority)
        .bind::<Nullable<Timestamptz>, _>(job.run_after)
        .bind::<Integer, _>(job.max_attempts)
        .bind::<Nullable<BigInt>, _>(job.initial_backoff_us)
        .prepared()
        .load(&mut conn)
        .await?;
    if let Some(row) = rows.into_iter().next() {
        return Ok(row);
    }
    // Only reachable with a request_id whose first job committed during our statement.
    by_request_id(conn, job).await
}

// Many creates in one statement (natural batching, see `super::batch`): the same insert as
// INSERT_SQL for every row of the arrays, each row's job id chosen by the caller so that
// inserted rows map back to their requests; rows whose owner already used the request_id
// come back from the lookups (one per kind of owner, each an index condition on
// jobs_owner_request_id_key). One statement text for every batch size, so it is prepared once.
#[rustfmt::skip]
const INSERT_MANY_SQL: &str = concat!("
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::jsonb[], $5::text[], $6::int4[],
                         $7::int4[], $8::timestamptz[], $9::int4[], $10::int8[])
        AS t(id, user_id, agent_identifier, job_data, request_id, job_data_bytes, priority,
             run_after, max_attempts, initial_backoff_us)
), ins AS (
    INSERT INTO jobs (id, user_id, agent_identifier, job_data, request_id, job_data_bytes,
                      priority, run_after, max_attempts, initial_backoff)
    SELECT id, user_id, agent_identifier, job_data, request_id, job_data_bytes, priority,
           run_after, max_attempts, initial_backoff_us * interval '1 microsecond' FROM input
    ON CONFLICT (user_id, request_id) WHERE request_id IS NOT NULL DO NOTHING
    RETURNING ", job_columns!(), "
)
SELECT ins.*, true AS written FROM ins
UNION ALL
SELECT ", job_columns!("j"), ", false FROM input i JOIN jobs j ON j.user_id = i.user_id AND j.request_id = i.request_id
WHERE i.request_id IS NOT NULL AND i.id NOT IN (SELECT id FROM ins)
UNION ALL
SELECT ", job_columns!("j"), ", false FROM input i JOIN jobs j ON j.user_id IS NULL AND j.request_id = i.request_id
WHERE i.request_id IS NOT NULL AND i.user_id IS NULL AND i.id NOT IN (SELECT id FROM ins)");

/// Inserts `jobs` (with the given new ids) in one statement; returns the rows written and the
/// existing rows of request_ids already used, in no particular order. A job whose request_id
/// was taken by a transaction that committed during the statement has no row here (see
/// [`by_request_id`]). The request_ids of `jobs` must be distinct per owner.
pub(crate) async fn insert_many(
    mut conn: &AsyncPgConnection,
    jobs: &[(Uuid, &NewJob)],
) -> Result<Vec<WrittenRow>> {
    let ids: Vec<Uuid> = jobs.iter().map(|(id, _)| *id).collect();
    let owners: Vec<Option<Uuid>> = jobs.iter().map(|(_, j)| j.owner).collect();
    let agents: Vec<&str> = jobs
        .iter()
        .map(|(_, j)| j.agent_identifier.as_str())
        .collect();
    let data: Vec<&serde_json::Value> = jobs.iter().map(|(_, j)| &j.job_data).collect();
    let request_ids: Vec<Option<&str>> =
        jobs.iter().map(|(_, j)| j.request_id.as_deref()).collect();
    let sizes: Vec<i32> = jobs.iter().map(|(_, j)| j.job_data_bytes).collect();
    let priorities: Vec<i32> = jobs.iter().map(|(_, j)| j.priority).collect();
    let run_after: Vec<Option<chrono::DateTime<chrono::Utc>>> =
        jobs.iter().map(|(_, j)| j.run_after).collect();
    let max_attempts: Vec<i32> = jobs.iter().map(|(_, j)| j.max_attempts).collect();
    let backoffs: Vec<Option<i64>> = jobs.iter().map(|(_, j)| j.initial_backoff_us).collect();
    let rows = diesel::sql_query(INSERT_MANY_SQL)
        .bind::<Array<diesel::sql_types::Uuid>, _>(ids)
        .bind::<Array<Nullable<diesel::sql_types::Uuid>>, _>(owners)
        .bind::<Array<Text>, _>(agents)
        .bind::<Array<Jsonb>, _>(data)
        .bind::<Array<Nullable<Text>>, _>(request_ids)
        .bind::<Array<Integer>, _>(sizes)
        .bind::<Array<Integer>, _>(priorities)
        .bind::<Array<Nullable<Timestamptz>>, _>(run_after)
        .bind::<Array<Integer>, _>(max_attempts)
        .bind::<Array<Nullable<BigInt>>, _>(backoffs)
        .prepared()
        .load(&mut conn)
        .await?;
    Ok(rows)
}

/// The existing job of an owner's request_id (after a conflict with a concurrent insert).
pub(crate) async fn by_request_id(
    mut conn: &AsyncPgConnection,
    job: &NewJob,
) -> Result<WrittenRow> {
    let owner = owner_match(job.owner);
    let row: WrittenRow = diesel::sql_query(BY_REQUEST_ID_SQL.replace("{owner}", owner))
        .bind::<Nullable<diesel::sql_types::Uuid>, _>(job.owner)
        .bind::<Nullable<Text>, _>(job.request_id.as_deref())
        .prepared()
        .get_result(&mut conn)
        .await?;
    Ok(row)
}

/// One job, if it exists and the scope may see it.
pub async fn get(
    mut conn: &AsyncPgConnection,
    scope: Option<Uuid>,
    id: Uuid,
) -> Result<Option<Job>> {
    let rows: Vec<Job> = diesel::sql_query(concat!(
        "SELECT ",
        job_columns!(),
        " FROM jobs WHERE id = $1 AND ($2::uuid IS NULL OR user_id = $2)"
    ))
    .bind::<diesel::sql_types::Uuid, _>(id)
    .bind::<Nullable<diesel::sql_types::Uuid>, _>(scope)
    .prepared()
    .load(&mut conn)
    .await?;
    Ok(rows.into_iter().next())
}

// The compare-and-set: the move happens only from an allowed state (and at the expected
// version), timestamps come from the database clock, and the jobs_touch trigger bumps
// `version` and `updated_at`. When nothing was written the same statement returns the row as
// its snapshot saw it, so the caller can tell "not found", "retry", "forbidden" and "version
// mismatch" apart without a second round trip.
#[rustfmt::skip]
const CAS_SQL: &str = concat!("
WITH upd AS (
    UPDATE jobs SET
        status = $2::job_status,
        started_at = CASE WHEN $2 = 'running' THEN now() ELSE started_at END,
        completed_at = CASE WHEN $2 IN ('completed', 'failed', 'cancelled') THEN now() ELSE completed_at END,
        result = CASE WHEN $2 = 'completed' THEN $3 ELSE result END,
        error_message = CASE WHEN $2 = 'failed' THEN $4 WHEN $2 = 'completed' THEN NULL ELSE error_message END,
        lease_id = CASE WHEN $2 = 'running' THEN NULL ELSE lease_id END,
        lease_expires_at = NULL
    WHERE id = $1
      AND status = ANY($5::job_status[])
      AND ($6::bigint IS NULL OR version = $6)
      AND ($7::uuid IS NULL OR user_id = $7)
      AND ($8::int8 IS NULL OR coalesce(job_data_bytes, job_data_field_len(job_data)) + $8 <= $9)
    RETURNING ", job_columns!(), "
)
SELECT upd.*, true AS written FROM upd
UNION ALL
SELECT ", job_columns!("j"), ", false FROM jobs j
WHERE j.id = $1 AND ($7::uuid IS NULL OR j.user_id = $7) AND NOT EXISTS (SELECT 1 FROM upd)");

/// Attempts one compare-and-set move. `None`: no such job in scope. `Some(row)` with
/// `written = false`: the move did not apply, and `row` is the job as the statement saw it.
pub(crate) async fn compare_and_set_status(
    mut conn: &AsyncPgConnection,
    scope: Option<Uuid>,
    change: &StatusChange,
) -> Result<Option<WrittenRow>> {
    let allowed: Vec<&str> = change
        .target
        .allowed_from()
        .iter()
        .map(|s| s.as_str())
        .collect();
    let rows: Vec<WrittenRow> = diesel::sql_query(CAS_SQL)
        .bind::<diesel::sql_types::Uuid, _>(change.id)
        .bind::<Text, _>(change.target.as_str())
        .bind::<Nullable<Jsonb>, _>(change.result.as_ref())
        .bind::<Nullable<Text>, _>(change.error_message.as_deref())
        .bind::<Array<Text>, _>(allowed)
        .bind::<Nullable<BigInt>, _>(change.expected_version)
        .bind::<Nullable<diesel::sql_types::Uuid>, _>(scope)
        .bind::<Nullable<BigInt>, _>(change.size.map(|s| s.added))
        .bind::<Nullable<BigInt>, _>(change.size.map(|s| s.limit))
        .prepared()
        .load(&mut conn)
        .await?;
    Ok(rows.into_iter().next())
}

// Many compare-and-sets in one statement (natural batching, see `super::batch`): the same
// move as CAS_SQL for every row of the arrays, in one caller's scope. Each row's allowed
// previous statuses travel as a comma-separated list (arrays of arrays cannot be unnested
// per row). Rows whose move did not apply come back as the statement saw them. The job ids
// must be distinct: UPDATE ... FROM applies at most one input row to a job.
//
// A worker's move (a row with a lease_id) applies only while the job is RUNNING under that
// lease, and the lease ends with it. FAILED with attempts left (and no no_retry) goes back to
// PENDING with run_after = now + backoff ($10 initial µs unless the job sets its own, $11
// factor, $12 most µs); PENDING hands the job back at once, without counting the attempt.
#[rustfmt::skip]
const CAS_MANY_SQL: &str = concat!("
WITH input AS (
    SELECT t.*, (t.lease_id IS NOT NULL AND t.target = 'failed' AND NOT t.no_retry) AS may_retry,
           (t.lease_id IS NOT NULL AND t.target = 'pending') AS release
    FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::text[], $5::text[], $6::int8[],
                $8::int8[], $9::int8[], $13::uuid[], $14::bool[])
        AS t(id, target, result, error_message, allowed, expected_version, added_bytes, max_bytes,
             lease_id, no_retry)
), upd AS (
    UPDATE jobs SET
        status = (CASE WHEN i.may_retry AND jobs.attempt < jobs.max_attempts THEN 'pending'
                       ELSE i.target END)::job_status,
        started_at = CASE WHEN i.target = 'running' THEN now() ELSE jobs.started_at END,
        completed_at = CASE WHEN i.target IN ('completed', 'failed', 'cancelled')
                                 AND NOT (i.may_retry AND jobs.attempt < jobs.max_attempts)
                            THEN now() ELSE jobs.completed_at END,
        result = CASE WHEN i.target = 'completed' THEN i.result ELSE jobs.result END,
        error_message = CASE WHEN i.target = 'failed' THEN i.error_message
                             WHEN i.target = 'completed' THEN NULL
                             ELSE jobs.error_message END,
        run_after = CASE WHEN i.may_retry AND jobs.attempt < jobs.max_attempts
                         THEN now() + jobs_retry_delay(jobs.attempt,
                                          coalesce(jobs.initial_backoff, $10 * interval '1 microsecond'),
                                          $11, $12 * interval '1 microsecond')
                         WHEN i.release THEN NULL
                         ELSE jobs.run_after END,
        attempt = CASE WHEN i.release THEN greatest(jobs.attempt - 1, 0) ELSE jobs.attempt END,
        lease_id = CASE WHEN i.target = 'running' THEN NULL ELSE jobs.lease_id END,
        lease_expires_at = NULL
    FROM input i
    WHERE jobs.id = i.id
      AND CASE WHEN i.lease_id IS NULL
               THEN jobs.status = ANY(string_to_array(i.allowed, ',')::job_status[])
               ELSE jobs.status = 'running' AND jobs.lease_id = i.lease_id
                    AND i.target IN ('completed', 'failed', 'cancelled', 'pending') END
      AND (i.expected_version IS NULL OR jobs.version = i.expected_version)
      AND ($7::uuid IS NULL OR jobs.user_id = $7)
      AND (i.added_bytes IS NULL
           OR coalesce(jobs.job_data_bytes, job_data_field_len(jobs.job_data)) + i.added_bytes <= i.max_bytes)
    RETURNING ", job_columns!("jobs"), "
)
SELECT upd.*, true AS written FROM upd
UNION ALL
SELECT ", job_columns!("j"), ", false FROM input i JOIN jobs j ON j.id = i.id
WHERE ($7::uuid IS NULL OR j.user_id = $7) AND i.id NOT IN (SELECT id FROM upd)");

/// Attempts the compare-and-set `changes` (distinct job ids) in one statement; returns one
/// row per job found in scope, as [`compare_and_set_status`] would, in no particular order.
/// `retry` says how a worker's failed attempt is retried.
pub(crate) async fn compare_and_set_many(
    mut conn: &AsyncPgConnection,
    scope: Option<Uuid>,
    changes: &[&StatusChange],
    retry: RetryPolicy,
) -> Result<Vec<WrittenRow>> {
    let ids: Vec<Uuid> = changes.iter().map(|c| c.id).collect();
    let targets: Vec<&str> = changes.iter().map(|c| c.target.as_str()).collect();
    let results: Vec<Option<&serde_json::Value>> =
        changes.iter().map(|c| c.result.as_ref()).collect();
    let messages: Vec<Option<&str>> = changes.iter().map(|c| c.error_message.as_deref()).collect();
    let allowed: Vec<String> = changes
        .iter()
        .map(|c| {
            let labels: Vec<&str> = c.target.allowed_from().iter().map(|s| s.as_str()).collect();
            labels.join(",")
        })
        .collect();
    let versions: Vec<Option<i64>> = changes.iter().map(|c| c.expected_version).collect();
    let added: Vec<Option<i64>> = changes.iter().map(|c| c.size.map(|s| s.added)).collect();
    let limits: Vec<Option<i64>> = changes.iter().map(|c| c.size.map(|s| s.limit)).collect();
    let leases: Vec<Option<Uuid>> = changes
        .iter()
        .map(|c| c.lease.map(|l| l.lease_id))
        .collect();
    let no_retry: Vec<bool> = changes
        .iter()
        .map(|c| c.lease.is_some_and(|l| l.no_retry))
        .collect();
    Ok(diesel::sql_query(CAS_MANY_SQL)
        .bind::<Array<diesel::sql_types::Uuid>, _>(ids)
        .bind::<Array<Text>, _>(targets)
        .bind::<Array<Nullable<Jsonb>>, _>(results)
        .bind::<Array<Nullable<Text>>, _>(messages)
        .bind::<Array<Text>, _>(allowed)
        .bind::<Array<Nullable<BigInt>>, _>(versions)
        .bind::<Nullable<diesel::sql_types::Uuid>, _>(scope)
        .bind::<Array<Nullable<BigInt>>, _>(added)
        .bind::<Array<Nullable<BigInt>>, _>(limits)
        .bind::<BigInt, _>(retry.initial_us)
        .bind::<Double, _>(retry.multiplier)
        .bind::<BigInt, _>(retry.max_us)
        .bind::<Array<Nullable<diesel::sql_types::Uuid>>, _>(leases)
        .bind::<Array<Bool>, _>(no_retry)
        .prepared()
        .load(&mut conn)
        .await?)
}

/// One page of jobs, newest first (`created_at` desc, `id` desc), strictly after `after`.
///
/// The statement is assembled from the filters that are set, so the planner sees only real
/// predicates; the keyset condition is a row comparison that the
/// `(…, created_at DESC, id DESC)` indexes of migration 2026-11-25-000003 serve directly.
/// When [`ListFilter::plan_depends_on_values`], run it with [`super::Plans::Custom`] (a
/// transaction begun by [`super::scoped_with_plans`], or a user's [`super::user_read`]): a
/// generic plan ignores how selective the bound values are; otherwise with
/// [`super::Plans::Generic`].
pub async fn list(
    mut conn: &AsyncPgConnection,
    filter: &ListFilter,
    after: Option<PageCursor>,
    limit: i64,
) -> Result<Vec<Job<JsonText>>> {
    use diesel::sql_types::Interval;
    let mut sql = String::from(concat!("SELECT ", job_columns!(), " FROM jobs WHERE TRUE"));
    let mut n = 0;
    let mut next = || {
        n += 1;
        n
    };
    if filter.user.is_some() {
        sql += &format!(" AND user_id = ${}", next());
    }
    // One status is written as `status = $n`: PostgreSQL 15 walks the
    // (status, created_at, id) index in order only for equality, not for `= ANY`.
    match filter.statuses.len() {
        0 => {}
        1 => sql += &format!(" AND status = ${}::job_status", next()),
        _ => sql += &format!(" AND status = ANY(${}::job_status[])", next()),
    }
    if filter.agent_identifier.is_some() {
        sql += &format!(" AND agent_identifier = ${}", next());
    }
    if filter.created_after.is_some() {
        sql += &format!(" AND created_at > ${}", next());
    }
    if filter.created_before.is_some() {
        sql += &format!(" AND created_at < ${}", next());
    }
    if filter.job_data_contains.is_some() {
        sql += &format!(" AND job_data @> ${}", next());
    }
    if filter.running_longer_than_us.is_some() {
        sql += &format!(
            " AND status = 'running' AND started_at < now() - ${}",
            next()
        );
    }
    if after.is_some() {
        let (a, b) = (next(), next());
        sql += &format!(" AND (created_at, id) < (${a}, ${b})");
    }
    sql += &format!(" ORDER BY created_at DESC, id DESC LIMIT ${}", next());

    let mut query = diesel::sql_query(sql).into_boxed::<diesel::pg::Pg>();
    if let Some(user) = filter.user {
        query = query.bind::<diesel::sql_types::Uuid, _>(user);
    }
    match filter.statuses.as_slice() {
        [] => {}
        [one] => query = query.bind::<Text, _>(one.as_str()),
        many => {
            let labels: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
            query = query.bind::<Array<Text>, _>(labels);
        }
    }
    if let Some(agent) = &filter.agent_identifier {
        query = query.bind::<Text, _>(agent.clone());
    }
    if let Some(t) = filter.created_after {
        query = query.bind::<Timestamptz, _>(t);
    }
    if let Some(t) = filter.created_before {
        query = query.bind::<Timestamptz, _>(t);
    }
    if let Some(j) = &filter.job_data_contains {
        query = query.bind::<Jsonb, _>(j.clone());
    }
    if let Some(us) = filter.running_longer_than_us {
        query =
            query.bind::<Interval, _>(diesel::pg::data_types::PgInterval::from_microseconds(us));
    }
    if let Some(c) = after {
        query = query
            .bind::<Timestamptz, _>(c.created_at)
            .bind::<diesel::sql_types::Uuid, _>(c.id);
    }
    query = query.bind::<BigInt, _>(limit);
    Ok(query.prepared().load(&mut conn).await?)
}
