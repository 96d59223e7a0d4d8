//! The statements of `jobsvc export` and `jobsvc import` (the commands are in
//! `crate::app::transfer`): jobs as PostgreSQL renders them (`row_to_json`) and reads them
//! back (`jsonb_populate_recordset`), so a round trip changes nothing.
use diesel::sql_types::{BigInt, Nullable, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use uuid::Uuid;

use crate::domain::ExportFilter;
use crate::error::Result;

/// One exported job: its id (for the next page) and its row as a JSON object.
#[derive(diesel::QueryableByName)]
pub struct ExportLine {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    pub id: Uuid,
    #[diesel(sql_type = Text)]
    pub line: String,
}

/// Starts the one snapshot an export reads. Read-only: it takes no transaction id, so it does
/// not hold back the change feed.
pub async fn begin_export(conn: &mut AsyncPgConnection) -> Result<()> {
    Ok(conn
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await?)
}

pub async fn commit(conn: &mut AsyncPgConnection) -> Result<()> {
    Ok(conn.batch_execute("COMMIT").await?)
}

/// Up to `limit` jobs matching `filter` whose id sorts after `after`, in id order.
pub async fn export_page(
    conn: &mut AsyncPgConnection,
    filter: &ExportFilter,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<ExportLine>> {
    Ok(diesel::sql_query(
        "SELECT j.id, row_to_json(j)::text AS line FROM jobs j \
         WHERE ($1::uuid IS NULL OR j.id > $1) \
           AND (cardinality($2::text[]) = 0 OR j.status::text = ANY($2)) \
           AND ($3::text IS NULL OR j.agent_identifier = $3) \
           AND ($4::uuid IS NULL OR j.user_id = $4) \
           AND ($5::timestamptz IS NULL OR j.created_at > $5) \
           AND ($6::timestamptz IS NULL OR j.created_at < $6) \
         ORDER BY j.id LIMIT $7",
    )
    .bind::<Nullable<diesel::sql_types::Uuid>, _>(after)
    .bind::<diesel::sql_types::Array<Text>, _>(
        filter
            .statuses
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>(),
    )
    .bind::<Nullable<Text>, _>(filter.agent_identifier.as_deref())
    .bind::<Nullable<diesel::sql_types::Uuid>, _>(filter.user)
    .bind::<Nullable<Timestamptz>, _>(filter.created_after)
    .bind::<Nullable<Timestamptz>, _>(filter.created_before)
    .bind::<BigInt, _>(limit)
    .load(conn)
    .await?)
}

#[derive(diesel::QueryableByName)]
struct Inserted {
    #[diesel(sql_type = BigInt)]
    inserted: i64,
}

/// Inserts the jobs of `rows` (a JSON array of `jobs` rows) in one statement, skipping ids
/// that already exist; returns how many were inserted. The error is diesel's, so the caller
/// can say which lines it concerns.
pub async fn import_rows(
    conn: &mut AsyncPgConnection,
    rows: String,
) -> Result<i64, diesel::result::Error> {
    let inserted: Inserted = diesel::sql_query(
        "WITH ins AS ( \
             INSERT INTO jobs SELECT * FROM jsonb_populate_recordset(NULL::jobs, $1::jsonb) \
             ON CONFLICT (id) DO NOTHING RETURNING 1) \
         SELECT count(*) AS inserted FROM ins",
    )
    .bind::<Text, _>(rows)
    .get_result(conn)
    .await?;
    Ok(inserted.inserted)
}
