//! The JWT secret: from the configuration, else the one kept in the data directory (made on
//! first use).
use std::io::Write;
use std::path::Path;

use super::AppError;
use super::config::SecretArgs;

const SECRET_FILE: &str = "jwt_secret";

/// The secret from config, else the one kept in the data directory (made on first use).
pub(super) fn secret(args: &SecretArgs, create: bool) -> Result<Vec<u8>, AppError> {
    if let Some(s) = &args.jwt_secret {
        if s.len() < 32 {
            return Err("JWT_SECRET must be at least 32 characters".into());
        }
        return Ok(s.as_bytes().to_vec());
    }
    let path = args.data_dir.join(SECRET_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(s.trim().as_bytes().to_vec()),
        Err(_) if create => {
            std::fs::create_dir_all(&args.data_dir)?;
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for a secret: {e}"))?;
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            write_private(&path, &hex)?;
            Ok(hex.into_bytes())
        }
        Err(_) => Err(format!(
            "no JWT_SECRET set and no {} yet (start `jobsvc serve` once, or set JWT_SECRET)",
            path.display()
        )
        .into()),
    }
}

fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(content.as_bytes())
}
