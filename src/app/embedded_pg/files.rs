//! The passwords of the private PostgreSQL, kept in the data directory next to the JWT secret,
//! and its client authentication.
use std::fs;
use std::path::Path;

use super::error::{PgError, io};

/// Where the superuser's password is kept, in the data directory.
pub(super) const SUPERUSER_PASSWORD_FILE: &str = "pg_superuser_password";
/// Where the service role's password is kept, in the data directory.
pub(super) const SERVICE_PASSWORD_FILE: &str = "pg_password";
/// The role jobsvc connects as.
pub(super) const SERVICE_ROLE: &str = "jobsvc";
/// Every connection, on the socket or on loopback, authenticates with a password.
pub(super) const PG_HBA: &str = "# Written by jobsvc: every connection authenticates with scram-sha-256.\n\
local all all scram-sha-256\n\
host all all 127.0.0.1/32 scram-sha-256\n\
host all all ::1/128 scram-sha-256\n";

/// Whether a `pg_hba.conf` lets any connection in without a password (`trust`).
pub(super) fn trusts(hba: &Path) -> bool {
    fs::read_to_string(hba)
        .unwrap_or_default()
        .lines()
        .any(|line| {
            let line = line.split('#').next().unwrap_or("");
            line.split_whitespace().any(|word| word == "trust")
        })
}

/// 32 random bytes as hex.
pub(super) fn new_password() -> Result<String, PgError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| PgError::Failed(format!("no randomness for a password: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A file only its owner can read or write, flushed to disk.
pub(super) fn write_private(path: &Path, content: &str) -> Result<(), PgError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io(format!("creating {}", path.display())))?;
    f.write_all(content.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(io(format!("writing {}", path.display())))
}
