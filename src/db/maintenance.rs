//! The batch maintenance functions of the schema (history pruning, retention, the sweeper),
//! called batch after batch by the background tasks.
use std::time::Duration;

use super::PgPool;
use crate::error::Result;

#[derive(diesel::QueryableByName)]
struct BatchCount {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// Runs one of the batch maintenance functions (history pruning, retention, the sweeper)
/// batch after batch, each a short statement on a pooled connection given back in between,
/// until a batch comes back short of `max_rows` or shutdown starts; returns the total.
/// `sql` takes the age as `$1` (an interval), the batch size as `$2` and, when `status` is
/// given, that status as `$3`, and names its count `n`.
pub async fn repeat_batches(
    pool: &PgPool,
    sql: &str,
    status: Option<crate::domain::JobStatus>,
    age: Duration,
    max_rows: i32,
    shutdown: &tokio::sync::watch::Receiver<bool>,
) -> Result<i64> {
    use diesel::sql_types::{Integer, Interval, Text};
    use diesel_async::RunQueryDsl;
    let age = diesel::pg::data_types::PgInterval::from_microseconds(
        i64::try_from(age.as_micros()).unwrap_or(i64::MAX),
    );
    let mut total = 0;
    loop {
        let mut query = diesel::sql_query(sql)
            .into_boxed::<diesel::pg::Pg>()
            .bind::<Interval, _>(age)
            .bind::<Integer, _>(max_rows);
        if let Some(status) = status {
            query = query.bind::<Text, _>(status.as_str());
        }
        let n = {
            let mut conn = pool.get().await?;
            query.get_result::<BatchCount>(&mut conn).await?.n
        };
        total += n;
        if n < i64::from(max_rows) || *shutdown.borrow() {
            return Ok(total);
        }
        // Let other work in between batches.
        tokio::task::yield_now().await;
    }
}
