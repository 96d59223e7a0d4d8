//! Static API keys for internal services that hold no JWT: sent as `x-api-key`, listed in
//! `--api-key-file` only as SHA-256 hashes, each mapped to the service role or to one user.
//!
//! The file, one key a line (`#` starts a comment):
//!
//! ```text
//! # sha256 of the key (hex)                                        who
//! 6d0f3c...e1                                                      service_role
//! 9a41b7...07                                                      user 6f1e2c1a-...-...
//! ```
//!
//! `jobsvc api-key create` prints a new key and its line. The server never holds a key, only
//! its hash; a presented key is hashed and compared with every line in constant time (no early
//! exit, no comparison that stops at the first differing byte), so neither the position of a
//! match nor a shared prefix shows in the time an answer takes. The file is re-read when it
//! changes, so a key is added or revoked without a restart.
use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use tokio::sync::watch;
use uuid::Uuid;

use super::watched;
use crate::domain::Role;

/// What every generated key starts with, so one found in a file or a log is recognised.
pub const KEY_PREFIX: &str = "jobsvc_sk_";

/// The keys of the file now in use.
#[derive(Clone)]
pub struct ApiKeys {
    current: watch::Receiver<(Arc<KeyTable>, u64)>,
}

/// One version of the file.
#[derive(Debug, Default)]
pub struct KeyTable {
    entries: Vec<([u8; 32], Role)>,
}

impl KeyTable {
    /// Parses the file; any bad line fails the whole version (with its line number), so a
    /// typo never silently drops a key.
    pub fn parse(text: &str) -> Result<KeyTable, String> {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let at = |why: &str| format!("line {}: {why}", i + 1);
            let mut words = line.split_whitespace();
            let hash = words.next().unwrap_or("");
            let hash = decode_hex(hash)
                .ok_or_else(|| at("the first word must be a SHA-256 hash in hex (64 digits)"))?;
            let role = match (words.next(), words.next(), words.next()) {
                (Some("service_role"), None, None) => Role::Service,
                (Some("user"), Some(id), None) => Role::User(
                    Uuid::parse_str(id).map_err(|_| at("`user` must be followed by a UUID"))?,
                ),
                _ => return Err(at("after the hash: `service_role` or `user <uuid>`")),
            };
            entries.push((hash, role));
        }
        Ok(KeyTable { entries })
    }

    /// The role of a presented key, comparing its hash with every line in constant time.
    pub fn find(&self, presented: &str) -> Option<Role> {
        let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = subtle::Choice::from(0);
        let mut index = 0u32;
        for (i, (line, _)) in self.entries.iter().enumerate() {
            let same = line.ct_eq(&hash);
            index.conditional_assign(&(i as u32), same);
            found |= same;
        }
        bool::from(found).then(|| self.entries[index as usize].1)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn decode_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new random key and the line that admits it (for `jobsvc api-key create`).
pub fn create(user: Option<Uuid>) -> (String, String) {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).expect("the OS random source is available");
    let key = format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(secret));
    let who = match user {
        Some(u) => format!("user {u}"),
        None => "service_role".to_string(),
    };
    let line = format!("{} {who}", hex(&Sha256::digest(key.as_bytes())));
    (key, line)
}

impl ApiKeys {
    /// Reads the file now (a bad file fails the start) and again whenever it changes (a bad
    /// new version keeps the last good one, and says why in the log).
    pub fn start(path: PathBuf, shutdown: watch::Receiver<bool>) -> Result<ApiKeys, String> {
        let what = path.display().to_string();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read --api-key-file {what}: {e}"))?;
        let table = KeyTable::parse(&text).map_err(|e| format!("--api-key-file {what}: {e}"))?;
        tracing::info!(file = %what, keys = table.len(), "API keys loaded");
        let (tx, rx) = watch::channel((Arc::new(table), 0));
        watched::spawn(
            path,
            move |read| {
                let parsed = read
                    .map_err(|e| format!("cannot read it: {e}"))
                    .and_then(|b| String::from_utf8(b).map_err(|_| "not UTF-8".to_string()))
                    .and_then(|t| KeyTable::parse(&t));
                match parsed {
                    Ok(table) => {
                        tracing::info!(file = %what, keys = table.len(), "API keys re-read");
                        tx.send_modify(|(t, version)| {
                            *t = Arc::new(table);
                            *version += 1;
                        });
                    }
                    Err(why) => tracing::warn!(
                        file = %what,
                        error = %why,
                        "the API key file could not be used; the last good keys stay in use"
                    ),
                }
            },
            shutdown,
        );
        Ok(ApiKeys { current: rx })
    }

    pub fn find(&self, presented: &str) -> Option<Role> {
        self.current.borrow().0.find(presented)
    }

    /// Changes whenever the file does.
    pub fn version(&self) -> u64 {
        self.current.borrow().1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_keys_are_found_by_their_line_and_only_by_it() {
        let user = Uuid::new_v4();
        let (service_key, service_line) = create(None);
        let (user_key, user_line) = create(Some(user));
        assert!(service_key.starts_with(KEY_PREFIX));
        let table = KeyTable::parse(&format!(
            "# keys\n{service_line}\n\n{user_line}  # the agent\n"
        ))
        .unwrap();
        assert_eq!(table.len(), 2);
        assert_eq!(table.find(&service_key), Some(Role::Service));
        assert_eq!(table.find(&user_key), Some(Role::User(user)));
        // One character off at either end, or the hash itself, is no key.
        let mut last = service_key.clone();
        let end = last.pop().unwrap();
        last.push(if end == 'A' { 'B' } else { 'A' });
        assert_eq!(table.find(&last), None);
        assert_eq!(table.find(&format!("x{}", &service_key[1..])), None);
        assert_eq!(table.find(&service_line[..64]), None);
        assert_eq!(table.find(""), None);
    }

    #[test]
    fn a_bad_line_names_itself() {
        let (_, line) = create(None);
        let err = KeyTable::parse(&format!("{line}\nabc service_role\n")).unwrap_err();
        assert!(err.starts_with("line 2: "), "{err}");
        let err = KeyTable::parse(&format!("{} admin\n", &line[..64])).unwrap_err();
        assert!(err.contains("service_role"), "{err}");
        let err = KeyTable::parse(&format!("{} user bob\n", &line[..64])).unwrap_err();
        assert!(err.contains("UUID"), "{err}");
    }
}
