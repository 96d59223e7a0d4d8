//! `jobsvc export` and `jobsvc import` (their statements are in `crate::db::transfer`): jobs as JSON lines, one `jobs` row per line with every
//! column, exactly as PostgreSQL renders it (`row_to_json`) and reads it back
//! (`jsonb_populate_recordset`), so a round trip changes nothing.
//!
//! Export reads one REPEATABLE READ snapshot in keyset pages by id (constant memory; a
//! read-only transaction takes no transaction id, so it does not hold back the change feed)
//! and can resume after the last id it wrote (`--after-id`; the resumed part is a new
//! snapshot). Import inserts in batches of one statement each, skipping rows whose id already
//! exists: running it again, or after an interruption, is safe and adds nothing twice. A
//! different job with the same owner and request_id as an existing one is an error, not a
//! silent skip. Inserted rows go through
//! the triggers, so statistics and history stay exact.
use std::io::{IsTerminal, Write};
use std::time::Duration;

use diesel_async::AsyncPgConnection;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::AsyncBufReadExt;

use crate::db::transfer as sql;
use crate::domain::ExportFilter;
use crate::error::{Error, Result};

const PAGE: i64 = 1000;

fn progress(what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix} {pos} jobs ({per_sec}) {elapsed}")
            .expect("a valid template"),
    );
    bar.set_prefix(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Writes the matching jobs to `out`, one JSON object per line, in id order; returns how many.
pub async fn export(
    conn: &mut AsyncPgConnection,
    filter: &ExportFilter,
    out: &mut (dyn Write + Send),
) -> Result<u64> {
    let bar = progress("exported");
    let mut written = 0u64;
    let mut after = filter.after_id;
    // The connection is the command's own: on an error it is dropped with its transaction.
    sql::begin_export(conn).await?;
    loop {
        let page = sql::export_page(conn, filter, after, PAGE).await?;
        for row in &page {
            // The line and its newline in one write: an interruption leaves whole
            // lines, or a last line without its newline.
            let mut line = Vec::with_capacity(row.line.len() + 1);
            line.extend_from_slice(row.line.as_bytes());
            line.push(b'\n');
            out.write_all(&line)
                .map_err(|e| Error::Internal(Box::new(e)))?;
        }
        written += page.len() as u64;
        bar.set_position(written);
        match page.last() {
            Some(last) if page.len() as i64 == PAGE => after = Some(last.id),
            _ => break,
        }
    }
    out.flush().map_err(|e| Error::Internal(Box::new(e)))?;
    sql::commit(conn).await?;
    bar.finish_and_clear();
    Ok(written)
}

/// What an import did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    pub read: u64,
    pub inserted: u64,
    /// Lines whose job (by id) already existed.
    pub skipped: u64,
}

/// Reads JSON lines from `input` and inserts the jobs, `batch` per statement.
pub async fn import(
    conn: &mut AsyncPgConnection,
    input: impl tokio::io::AsyncBufRead + Unpin,
    batch: usize,
) -> Result<Imported> {
    let bar = progress("imported");
    let mut lines = input.lines();
    let mut done = Imported::default();
    // The lines go to PostgreSQL as text, untouched: parsing them into serde_json values and
    // back would round numbers (jsonb keeps numeric exactly, `2.50` stays `2.50`).
    let mut pending: Vec<String> = Vec::with_capacity(batch);
    let mut line_no = 0u64;
    loop {
        let line = lines
            .next_line()
            .await
            .map_err(|e| Error::Internal(Box::new(e)))?;
        if let Some(line) = &line {
            line_no += 1;
            if line.trim().is_empty() {
                continue;
            }
            let not_object =
                || Error::Internal(format!("line {line_no}: not a JSON object").into());
            if !line.trim_start().starts_with('{') {
                return Err(not_object());
            }
            serde_json::from_str::<serde::de::IgnoredAny>(line).map_err(|_| not_object())?;
            pending.push(line.clone());
        }
        if pending.len() >= batch || (line.is_none() && !pending.is_empty()) {
            let n = pending.len() as u64;
            let rows = format!("[{}]", pending.join(","));
            pending.clear();
            let inserted = sql::import_rows(conn, rows)
                .await
                .map_err(|e| Error::Internal(format!("lines up to {line_no}: {e}").into()))?;
            done.read += n;
            done.inserted += inserted as u64;
            done.skipped += n - inserted as u64;
            bar.set_position(done.read);
        }
        if line.is_none() {
            break;
        }
    }
    bar.finish_and_clear();
    Ok(done)
}
