//! The JWT secret: from `JWT_SECRET`, `--jwt-secret-file`, or the file kept in the data
//! directory (made on first use). Every source is checked on every read: a secret shorter than
//! [`MIN_SECRET_BYTES`] after trimming (an empty file left by a crash or a full disk, say)
//! would let anyone sign service_role tokens, so jobsvc refuses to start with it.
use std::io::Write;
use std::path::{Path, PathBuf};

use super::AppError;
use super::config::SecretArgs;

const SECRET_FILE: &str = "jwt_secret";
/// The shortest secret accepted: 256 bits, as HS256 wants.
pub(super) const MIN_SECRET_BYTES: usize = 32;

/// The secret, checked; `create` makes the data directory's file when no source has one.
pub(super) fn secret(args: &SecretArgs, create: bool) -> Result<Vec<u8>, AppError> {
    if let Some(s) = &args.jwt_secret {
        if secret_in_argv() {
            tracing::warn!(
                "the JWT secret was given as --jwt-secret, which every local user can read in the \
                 process list: use JWT_SECRET or --jwt-secret-file"
            );
        }
        return checked(
            s.as_bytes(),
            "JWT_SECRET (or --jwt-secret)",
            "set a longer one",
        );
    }
    if let Some(path) = &args.jwt_secret_file {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read the JWT secret file {}: {e}", path.display()))?;
        return checked(
            &bytes,
            &path.display().to_string(),
            "write a longer secret into it",
        );
    }
    let path = args.data_dir.join(SECRET_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => checked(
            &bytes,
            &path.display().to_string(),
            "delete it and start `jobsvc serve` to make a new one (tokens signed with the old \
             secret stop working), or write one into it: \
             head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => create_secret(&path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
            "no JWT_SECRET set and no {} yet: pass --data-dir DIR (where `jobsvc serve` keeps its \
             data, ./.jobsvc by default), start `jobsvc serve` once, or set JWT_SECRET",
            path.display()
        )
        .into()),
        Err(e) => Err(format!("cannot read the JWT secret file {}: {e}", path.display()).into()),
    }
}

/// The previous secrets of a rotation, each checked as the current one is.
pub(super) fn previous_secrets(args: &SecretArgs) -> Result<Vec<Vec<u8>>, AppError> {
    if !args.jwt_previous_secrets.is_empty() && secret_in_argv() {
        tracing::warn!(
            "a JWT secret was given on the command line, which every local user can read in \
             the process list: use JWT_PREVIOUS_SECRETS"
        );
    }
    args.jwt_previous_secrets
        .iter()
        .map(|s| {
            checked(
                s.as_bytes(),
                "JWT_PREVIOUS_SECRETS (or --jwt-previous-secret)",
                "each previous secret is a secret that was current",
            )
        })
        .collect()
}

/// The trimmed secret, if it is long enough; else an error naming `source` and the repair.
fn checked(bytes: &[u8], source: &str, repair: &str) -> Result<Vec<u8>, AppError> {
    let trimmed = bytes.trim_ascii();
    if trimmed.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "the JWT secret from {source} is {} bytes; it must be at least {MIN_SECRET_BYTES}: \
             {repair}",
            trimmed.len()
        )
        .into());
    }
    Ok(trimmed.to_vec())
}

/// Whether `--jwt-secret` or `--jwt-previous-secret` (not `--jwt-secret-file`) is on the
/// command line.
fn secret_in_argv() -> bool {
    std::env::args_os().any(|a| {
        let a = a.to_string_lossy();
        ["--jwt-secret", "--jwt-previous-secret"]
            .iter()
            .any(|flag| a == *flag || a.starts_with(&format!("{flag}=")))
    })
}

/// Makes the data directory's secret: written to a temporary file, flushed to disk, then
/// linked into place (which fails if another process made it meanwhile: then that one is
/// used), and the directory flushed, so a crash leaves either no file or a whole one.
fn create_secret(path: &Path) -> Result<Vec<u8>, AppError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for a secret: {e}"))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = temporary_path(path);
    write_private(&tmp, hex.as_bytes())?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            std::fs::File::open(dir)?.sync_all()?;
            Ok(hex.into_bytes())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let bytes = std::fs::read(path)?;
            checked(
                &bytes,
                &path.display().to_string(),
                "delete it and start again",
            )
        }
        Err(e) => Err(format!("cannot create {}: {e}", path.display()).into()),
    }
}

fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Writes `content` to a new file only the owner can read, and flushes it to disk.
pub(super) fn write_private(path: &Path, content: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(content)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path) -> SecretArgs {
        SecretArgs {
            jwt_secret: None,
            jwt_secret_file: None,
            jwt_previous_secrets: Vec::new(),
            data_dir: dir.to_owned(),
        }
    }

    #[test]
    fn an_empty_or_short_secret_file_is_refused_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(SECRET_FILE);
        for content in ["", "\n", "   \n", "short-secret", &"x".repeat(31)] {
            std::fs::write(&file, content).unwrap();
            for create in [false, true] {
                let err = secret(&args(dir.path()), create).unwrap_err().to_string();
                assert!(err.contains(&file.display().to_string()), "{err}");
                assert!(err.contains("at least 32"), "{err}");
            }
        }
        std::fs::write(&file, format!("{}\n", "s".repeat(32))).unwrap();
        assert_eq!(secret(&args(dir.path()), false).unwrap(), b"s".repeat(32));
    }

    #[test]
    fn every_source_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args(dir.path());
        a.jwt_secret = Some(" ".repeat(40));
        assert!(secret(&a, true).is_err());
        let file = dir.path().join("secret-file");
        std::fs::write(&file, "").unwrap();
        let mut a = args(dir.path());
        a.jwt_secret_file = Some(file.clone());
        let err = secret(&a, true).unwrap_err().to_string();
        assert!(err.contains(&file.display().to_string()), "{err}");
        // Neither made a data-directory secret.
        assert!(!dir.path().join(SECRET_FILE).exists());
    }

    #[test]
    fn a_made_secret_is_whole_private_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let made = secret(&args(&data), true).unwrap();
        assert_eq!(made.len(), 64);
        let file = data.join(SECRET_FILE);
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(secret(&args(&data), false).unwrap(), made);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&data).unwrap().count(), 1);
    }
}
