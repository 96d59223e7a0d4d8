//! The JWK set that asymmetric tokens are verified against, kept current: fetched from
//! `--jwks-url` (as Supabase publishes it at `/auth/v1/.well-known/jwks.json`) or read from
//! `--jwks-file`.
//!
//! - A URL is fetched at start; until one fetch succeeds there are no keys, asymmetric tokens
//!   get UNAVAILABLE, and the health service says NOT_SERVING (never "accept everything").
//! - The set is kept as long as the response's `Cache-Control: max-age` says (10 min without
//!   one), but at least the refetch interval, then fetched again.
//! - A token naming an unknown `kid` asks for a fetch at once (a key moving from standby to
//!   current), at most once per refetch interval (30 s), however many such tokens arrive.
//! - A failed fetch keeps the last good set; the failure goes to the log and to
//!   `jobsvc_jwks_fetches_total{outcome="failed"}`.
//! - A file is re-read when it changes; an unreadable new version keeps the last good set.
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::keys::{KeySet, MAX_SET_BYTES};
use super::watched;
use crate::metrics::{JwksLabels, Metrics};

/// Where the JWK set comes from.
#[derive(Debug, Clone)]
pub enum JwksSource {
    Url(String),
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct JwksConfig {
    pub source: JwksSource,
    /// The least time between two fetches of a URL (a flood of unknown kids causes one).
    pub refetch_interval: Duration,
}

/// A fetched set is kept this long when the response says nothing.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(600);
/// ... and at most this long, whatever it says.
const LONGEST_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// One fetch may take this long.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Before the first good fetch, retries start this soon and double up to the refetch interval.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// A caller whose token names an unknown kid waits at most this long for the fetch it asked.
const UNKNOWN_KID_WAIT: Duration = Duration::from_secs(5);

/// The current set (None until the first load) and how many loads were tried, so a caller
/// that asked for a fetch can wait for its end.
#[derive(Clone, Default)]
struct Current {
    set: Option<Arc<KeySet>>,
    /// Bumped whenever the set's contents change: the verified-token memory starts over.
    version: u64,
    attempts: u64,
}

/// The JWK set, shared by every call.
#[derive(Clone)]
pub struct Jwks {
    current: watch::Receiver<Current>,
    gate: Option<Arc<Gate>>,
}

/// The rate limit on fetches, shared by the fetching task and the callers that ask for one.
struct Gate {
    interval: Duration,
    last_fetch: Mutex<Option<Instant>>,
    wake: Notify,
}

impl Gate {
    /// True (and the fetch is asked for) when the last fetch began an interval ago or more.
    fn ask(&self) -> bool {
        let last = *self.last_fetch.lock().unwrap_or_else(|e| e.into_inner());
        let due = last.is_none_or(|t| t.elapsed() >= self.interval);
        if due {
            self.wake.notify_one();
        }
        due
    }

    fn started(&self) {
        *self.last_fetch.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    fn since_last(&self) -> Duration {
        let last = *self.last_fetch.lock().unwrap_or_else(|e| e.into_inner());
        last.map_or(Duration::MAX, |t| t.elapsed())
    }
}

impl Jwks {
    /// Starts keeping the set current. A file must load now (a typo in a path fails the
    /// start); a URL is fetched in the background, and [`Jwks::ready`] turns true on its
    /// first success.
    pub fn start(
        config: JwksConfig,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Jwks, String> {
        let (tx, rx) = watch::channel(Current::default());
        match config.source {
            JwksSource::File(path) => {
                let bytes = std::fs::read(&path)
                    .map_err(|e| format!("cannot read --jwks-file {}: {e}", path.display()))?;
                let what = path.display().to_string();
                let loaded =
                    KeySet::parse(&bytes).map_err(|e| format!("--jwks-file {what}: {e}"))?;
                install(&tx, &what, Ok(loaded), &metrics);
                watched::spawn(
                    path,
                    move |read| {
                        let parsed = read
                            .map_err(|e| format!("cannot read it: {e}"))
                            .and_then(|b| KeySet::parse(&b));
                        install(&tx, &what, parsed, &metrics);
                    },
                    shutdown,
                );
                Ok(Jwks {
                    current: rx,
                    gate: None,
                })
            }
            JwksSource::Url(url) => {
                let client = reqwest::Client::builder()
                    .timeout(FETCH_TIMEOUT)
                    .connect_timeout(FETCH_TIMEOUT / 2)
                    .build()
                    .map_err(|e| format!("cannot build the JWKS client: {e}"))?;
                let gate = Arc::new(Gate {
                    interval: config.refetch_interval,
                    last_fetch: Mutex::new(None),
                    wake: Notify::new(),
                });
                tokio::spawn(keep_fetching(
                    client,
                    url,
                    gate.clone(),
                    tx,
                    metrics,
                    shutdown,
                ));
                Ok(Jwks {
                    current: rx,
                    gate: Some(gate),
                })
            }
        }
    }

    /// The keys, once loaded.
    pub fn keys(&self) -> Option<Arc<KeySet>> {
        self.current.borrow().set.clone()
    }

    /// Changes whenever the set's contents do.
    pub fn version(&self) -> u64 {
        self.current.borrow().version
    }

    /// Turns true once the set is loaded (and stays true: a later failure keeps the set).
    pub fn ready(&self) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(self.current.borrow().set.is_some());
        let mut current = self.current.clone();
        tokio::spawn(async move {
            while current.borrow_and_update().set.is_none() {
                tokio::select! {
                    changed = current.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
            let _ = tx.send(true);
        });
        rx
    }

    /// A token named a kid the set does not hold: fetch again if the rate limit allows, and
    /// wait (briefly) for that fetch. True when a fetch ended meanwhile, so the kid is worth
    /// looking up again.
    pub async fn refetch_for_unknown_kid(&self) -> bool {
        let Some(gate) = &self.gate else {
            return false;
        };
        let mut current = self.current.clone();
        let before = current.borrow_and_update().attempts;
        if !gate.ask() {
            return false;
        }
        tokio::time::timeout(UNKNOWN_KID_WAIT, current.wait_for(|c| c.attempts > before))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Puts a newly loaded set in place (when its contents differ), or keeps the last one and
/// reports why the new one could not be used.
fn install(
    tx: &watch::Sender<Current>,
    what: &str,
    loaded: Result<super::keys::Loaded, String>,
    metrics: &Metrics,
) {
    let outcome = match loaded {
        Ok(loaded) => {
            for warning in &loaded.warnings {
                tracing::warn!(source = what, "JWK set: {warning}");
            }
            let set = loaded.set;
            tx.send_modify(|c| {
                let same = c.set.as_ref().is_some_and(|old| old.same_keys(&set));
                if !same {
                    tracing::info!(source = what, kids = ?set.kids(), "JWK set loaded");
                    metrics.jwks_keys.set(set.len() as i64);
                    c.set = Some(Arc::new(set));
                    c.version += 1;
                }
                c.attempts += 1;
            });
            "ok"
        }
        Err(why) => {
            tracing::warn!(
                source = what,
                error = %why,
                "the JWK set could not be loaded; the last good set stays in use"
            );
            tx.send_modify(|c| c.attempts += 1);
            "failed"
        }
    };
    metrics
        .jwks_fetches
        .get_or_create(&JwksLabels { outcome })
        .inc();
}

/// Fetches `url` at start, when the cached set goes stale, and when a caller asks (an
/// unknown kid), never twice within the gate's interval.
async fn keep_fetching(
    client: reqwest::Client,
    url: String,
    gate: Arc<Gate>,
    tx: watch::Sender<Current>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut retry = FIRST_RETRY;
    loop {
        gate.started();
        let next = match fetch(&client, &url).await {
            Ok((body, max_age)) => {
                let parsed = KeySet::parse(&body);
                let ok = parsed.is_ok();
                install(&tx, &url, parsed, &metrics);
                match ok {
                    true => max_age.clamp(gate.interval, LONGEST_MAX_AGE.max(gate.interval)),
                    false => gate.interval,
                }
            }
            Err(why) => {
                install(&tx, &url, Err(why), &metrics);
                gate.interval
            }
        };
        // Until the first set arrives, try again soon (the server is NOT_SERVING meanwhile).
        let next = match tx.borrow().set.is_some() {
            true => next,
            false => {
                let r = retry.min(gate.interval);
                retry = (retry * 2).min(gate.interval);
                r
            }
        };
        let deadline = Instant::now() + next;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                _ = gate.wake.notified() => {
                    // Asked for by a caller: honoured once the interval has passed.
                    if gate.since_last() >= gate.interval {
                        break;
                    }
                }
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }
}

/// One GET: the body (at most [`MAX_SET_BYTES`]) and how long it may be kept.
async fn fetch(client: &reqwest::Client, url: &str) -> Result<(Vec<u8>, Duration), String> {
    let mut response = client
        .get(url)
        .header(http::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| format!("fetch failed: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("the server answered {}", response.status()));
    }
    let max_age = response
        .headers()
        .get(http::header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .map_or(DEFAULT_MAX_AGE, max_age);
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("reading the body failed: {e}"))?
    {
        if body.len() + chunk.len() > MAX_SET_BYTES {
            return Err(format!("the JWK set is over {MAX_SET_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, max_age))
}

/// How long a `Cache-Control` value lets the set be kept: its `max-age`, nothing for
/// `no-store`/`no-cache`, the default otherwise. Read by hand: `max-age` is all that matters
/// here, and a cache-semantics crate would model a whole HTTP cache.
fn max_age(value: &str) -> Duration {
    let mut age = None;
    for directive in value.split(',').map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-store" || lower == "no-cache" {
            return Duration::ZERO;
        }
        if let Some(secs) = lower.strip_prefix("max-age=") {
            age = secs
                .trim_matches('"')
                .parse::<u64>()
                .ok()
                .map(Duration::from_secs);
        }
    }
    age.unwrap_or(DEFAULT_MAX_AGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_gives_the_set_its_lifetime() {
        assert_eq!(max_age("public, max-age=600"), Duration::from_secs(600));
        assert_eq!(max_age("max-age=30, public"), Duration::from_secs(30));
        assert_eq!(max_age("MAX-AGE=\"5\""), Duration::from_secs(5));
        assert_eq!(max_age("no-store"), Duration::ZERO);
        assert_eq!(max_age("public"), DEFAULT_MAX_AGE);
        assert_eq!(max_age("max-age=soon"), DEFAULT_MAX_AGE);
    }
}
