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

use crate::api::convert::{self, JsonLimits, size};
use crate::db::transfer as sql;
use crate::domain::{ExportFilter, JobStatus};
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

/// Checks one line as the API checks a job: what the service would refuse is not imported
/// either (an agent name with control characters, JSON too deep or too large, a job past the
/// size limit), so nothing imported can break a call that meets it.
fn check_line(line: &str, limits: JsonLimits) -> Result<()> {
    use serde_json::Value as Json;
    let not_object = || Error::invalid("line", "NOT_A_JOB", "not a JSON object");
    if !line.trim_start().starts_with('{') {
        return Err(not_object());
    }
    // Parsed only to be checked: the line itself goes to PostgreSQL untouched.
    let row: serde_json::Map<String, Json> =
        serde_json::from_str(line).map_err(|e| match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => not_object(),
            _ => Error::invalid("line", "PAYLOAD_TOO_DEEP", format!("unreadable: {e}")),
        })?;
    let text = |field: &'static str| match row.get(field) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(Error::invalid(
            field,
            "NOT_A_JOB",
            format!("{field} must be a string"),
        )),
    };
    convert::validate_agent_identifier(
        "agent_identifier",
        text("agent_identifier")?.unwrap_or(""),
    )?;
    if let Some(status) = text("status")?
        && JobStatus::parse(status).is_none()
    {
        return Err(Error::invalid(
            "status",
            "INVALID_STATUS",
            format!("status {status:?} is not pending, running, completed, failed or cancelled"),
        ));
    }
    for field in ["id", "user_id"] {
        if let Some(id) = text(field)? {
            convert::parse_uuid(field, id)?;
        }
    }
    convert::validate_request_id(text("request_id")?.unwrap_or(""))?;
    let error_message = convert::validate_error_message(text("error_message")?.unwrap_or(""))?;
    let empty = Json::Object(Default::default());
    let job_data = row
        .get("job_data")
        .filter(|v| !v.is_null())
        .unwrap_or(&empty);
    if !job_data.is_object() {
        return Err(Error::invalid(
            "job_data",
            "NOT_A_JOB",
            "job_data must be an object",
        ));
    }
    convert::check_json("job_data", job_data, limits)?;
    let result = row.get("result").filter(|v| !v.is_null());
    if let Some(result) = result {
        convert::check_json("result", result, limits)?;
    }
    let job_data_bytes = size::job_data_field_len(job_data);
    // The recorded size goes in as it is written: it must be the true one, or the size check
    // of later moves would trust a wrong figure.
    match row.get("job_data_bytes") {
        None | Some(Json::Null) => {}
        Some(n) if n.as_u64() == Some(job_data_bytes as u64) => {}
        Some(n) => {
            return Err(Error::invalid(
                "job_data_bytes",
                "JOB_DATA_BYTES_MISMATCH",
                format!(
                    "job_data_bytes is {n}, but job_data measures {job_data_bytes}: drop the field or correct it"
                ),
            ));
        }
    }
    let bytes = job_data_bytes + size::outcome_fields_len(result, error_message.as_deref());
    if bytes > limits.max_job_bytes {
        return Err(convert::payload_too_large("job_data", bytes, limits));
    }
    Ok(())
}

/// Reads JSON lines from `input` and inserts the jobs, `batch` per statement.
pub async fn import(
    conn: &mut AsyncPgConnection,
    input: impl tokio::io::AsyncBufRead + Unpin,
    batch: usize,
    limits: JsonLimits,
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
            check_line(line, limits).map_err(|e| {
                let reason = e.reason();
                Error::invalid("line", reason, format!("line {line_no}: {e} ({reason})"))
            })?;
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
