//! A file re-read when it changes: the JWK set of `--jwks-file` and the keys of
//! `--api-key-file`.
//!
//! Polled (a `stat` a second) rather than watched with inotify: a stat is nothing next to the
//! calls it serves, it sees a file replaced by rename (how secrets are mounted and rotated:
//! Kubernetes swaps a symlink) as well as one rewritten in place, and it works on every
//! filesystem. A watcher crate would add a thread and its own failure modes for no gain here.
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

/// How often a watched file is looked at.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// What identifies one version of a file: its change time, modification time and length.
fn stamp(meta: &std::fs::Metadata) -> (Option<SystemTime>, u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.modified().ok(), meta.len(), meta.ino())
}

/// Calls `changed` with the file's new contents (or why it could not be read) each time it
/// changes after `first` (the contents read at start), until `shutdown`.
pub fn spawn(
    path: PathBuf,
    mut changed: impl FnMut(std::io::Result<Vec<u8>>) + Send + 'static,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last = std::fs::metadata(&path).ok().as_ref().map(stamp);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
            let now = match tokio::fs::metadata(&path).await {
                Ok(meta) => Some(stamp(&meta)),
                Err(e) => {
                    if last.is_some() {
                        changed(Err(e));
                    }
                    last = None;
                    continue;
                }
            };
            if now != last {
                last = now;
                changed(tokio::fs::read(&path).await);
            }
        }
    });
}
