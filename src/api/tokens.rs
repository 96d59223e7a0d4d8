//! Opaque, signed tokens handed to clients: ListJobs page tokens, ListJobEvents page tokens
//! and StreamJobUpdates resume tokens.
//!
//! A token is `base64url(payload || tag)`, where the tag is HMAC-SHA256 over the payload with
//! a key derived from the JWT secret (so every replica sharing the secret accepts the others'
//! tokens), truncated to 16 bytes. The payload starts with a kind byte, so a token of one kind
//! never parses as another.
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::domain::{PageCursor, Position, Snapshot};
use crate::error::{Error, Result};

type HmacSha256 = hmac::Hmac<Sha256>;

const TAG_LEN: usize = 16;
const KIND_PAGE: u8 = 1;
const KIND_RESUME: u8 = 2;
const KIND_EVENTS_PAGE: u8 = 3;
const KIND_RESUME_SNAPSHOT: u8 = 4;
/// A resume token carries at most this many in-progress xids of its snapshot; a larger
/// snapshot (rare: that many concurrent writers) is left out, and resuming may then repeat
/// changes the stream's snapshot already showed (at least once, as the contract allows).
const MAX_SNAPSHOT_XIDS: usize = 64;
/// Longest token accepted before decoding anything (a page token is 76 characters, a resume
/// token with a full snapshot about 770).
const MAX_TOKEN_CHARS: usize = 1024;

/// Signs and verifies tokens.
#[derive(Clone)]
pub struct TokenKey {
    key: [u8; 32],
}

/// A digest of a request's filter; a page token is only valid with the filter it was made for.
pub(crate) type Fingerprint = [u8; 16];

pub(crate) fn fingerprint(canonical: &[u8]) -> Fingerprint {
    let digest = Sha256::digest(canonical);
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

impl TokenKey {
    /// Derives the token key from the JWT secret (a separate key, never the secret itself).
    pub fn derive(secret: &[u8]) -> Self {
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(b"jobsvc token key v1");
        let mut key = [0u8; 32];
        key.copy_from_slice(&mac.finalize().into_bytes());
        TokenKey { key }
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length")
    }

    fn seal(&self, payload: &[u8]) -> String {
        let mut mac = self.mac();
        mac.update(payload);
        let tag = mac.finalize().into_bytes();
        let mut bytes = payload.to_vec();
        bytes.extend_from_slice(&tag[..TAG_LEN]);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The payload of a token this key signed, or `None` for anything else.
    fn open(&self, token: &str) -> Option<Vec<u8>> {
        if token.len() > MAX_TOKEN_CHARS {
            return None;
        }
        let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
        let split = bytes.len().checked_sub(TAG_LEN)?;
        let (payload, tag) = bytes.split_at(split);
        let mut mac = self.mac();
        mac.update(payload);
        mac.verify_truncated_left(tag).ok()?;
        Some(payload.to_vec())
    }

    pub(crate) fn page_token(&self, filter: &Fingerprint, cursor: PageCursor) -> String {
        let mut payload = Vec::with_capacity(41);
        payload.push(KIND_PAGE);
        payload.extend_from_slice(filter);
        payload.extend_from_slice(&cursor.created_at.timestamp_micros().to_be_bytes());
        payload.extend_from_slice(cursor.id.as_bytes());
        self.seal(&payload)
    }

    /// The cursor of a page token, checked against the filter it is used with.
    pub(crate) fn open_page_token(&self, token: &str, filter: &Fingerprint) -> Result<PageCursor> {
        let invalid = || {
            Error::invalid(
                "page_token",
                "INVALID_PAGE_TOKEN",
                "page_token is not a token this service issued; start again with an empty page_token",
            )
        };
        let payload = self.open(token).ok_or_else(invalid)?;
        if payload.len() != 41 || payload[0] != KIND_PAGE {
            return Err(invalid());
        }
        if payload[1..17] != filter[..] {
            return Err(Error::invalid(
                "page_token",
                "PAGE_TOKEN_FILTER_MISMATCH",
                "page_token was issued for a different filter; send the same filter fields as the first page",
            ));
        }
        let micros = i64::from_be_bytes(payload[17..25].try_into().expect("8 bytes"));
        let created_at = DateTime::<Utc>::from_timestamp_micros(micros).ok_or_else(invalid)?;
        let id = Uuid::from_slice(&payload[25..41]).map_err(|_| invalid())?;
        Ok(PageCursor { created_at, id })
    }

    /// A stream position as a resume token.
    pub fn resume_token(&self, at: Position) -> String {
        let mut payload = Vec::with_capacity(17);
        payload.push(KIND_RESUME);
        payload.extend_from_slice(&at.xid.to_be_bytes());
        payload.extend_from_slice(&at.seq.to_be_bytes());
        self.seal(&payload)
    }

    /// A stream position plus the snapshot whose changes the stream already showed (its
    /// initial jobs, or "now"), while that still matters: resuming skips them too.
    pub(crate) fn resume_token_with_skip(&self, at: Position, skip: Option<&Snapshot>) -> String {
        let Some(s) = skip.filter(|s| s.in_progress.len() <= MAX_SNAPSHOT_XIDS) else {
            return self.resume_token(at);
        };
        let mut payload = Vec::with_capacity(35 + 8 * s.in_progress.len());
        payload.push(KIND_RESUME_SNAPSHOT);
        for v in [at.xid, at.seq, s.xmin, s.xmax] {
            payload.extend_from_slice(&v.to_be_bytes());
        }
        payload.extend_from_slice(&(s.in_progress.len() as u16).to_be_bytes());
        for x in &s.in_progress {
            payload.extend_from_slice(&x.to_be_bytes());
        }
        self.seal(&payload)
    }

    /// The position of a resume token, and the snapshot to keep skipping if it carries one
    /// (not yet checked against the pruned history).
    pub(crate) fn open_resume_token(&self, token: &str) -> Result<(Position, Option<Snapshot>)> {
        let invalid = || {
            Error::invalid(
                "resume_token",
                "INVALID_RESUME_TOKEN",
                "resume_token is not a token this service issued; start again without one",
            )
        };
        let payload = self.open(token).ok_or_else(invalid)?;
        let word = |i: usize| -> Option<i64> {
            Some(i64::from_be_bytes(payload.get(i..i + 8)?.try_into().ok()?))
        };
        let (at, skip) = match payload.first() {
            Some(&KIND_RESUME) if payload.len() == 17 => (
                Position {
                    xid: word(1).ok_or_else(invalid)?,
                    seq: word(9).ok_or_else(invalid)?,
                },
                None,
            ),
            Some(&KIND_RESUME_SNAPSHOT) if payload.len() >= 35 => {
                let n = u16::from_be_bytes([payload[33], payload[34]]) as usize;
                if n > MAX_SNAPSHOT_XIDS || payload.len() != 35 + 8 * n {
                    return Err(invalid());
                }
                let in_progress = (0..n)
                    .map(|k| word(35 + 8 * k))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(invalid)?;
                let snapshot = Snapshot {
                    xmin: word(17).ok_or_else(invalid)?,
                    xmax: word(25).ok_or_else(invalid)?,
                    in_progress,
                };
                let at = Position {
                    xid: word(1).ok_or_else(invalid)?,
                    seq: word(9).ok_or_else(invalid)?,
                };
                (at, Some(snapshot))
            }
            _ => return Err(invalid()),
        };
        if at.xid < 0 || at.seq < 0 {
            return Err(invalid());
        }
        Ok((at, skip))
    }

    /// A ListJobEvents page token: the job it belongs to and the last version returned.
    pub(crate) fn events_page_token(&self, job_id: Uuid, version: i64) -> String {
        let mut payload = Vec::with_capacity(25);
        payload.push(KIND_EVENTS_PAGE);
        payload.extend_from_slice(job_id.as_bytes());
        payload.extend_from_slice(&version.to_be_bytes());
        self.seal(&payload)
    }

    /// The last version of a ListJobEvents page token, checked against the job it is used for.
    pub(crate) fn open_events_page_token(&self, token: &str, job_id: Uuid) -> Result<i64> {
        let invalid = || {
            Error::invalid(
                "page_token",
                "INVALID_PAGE_TOKEN",
                "page_token is not a token this service issued for this job; start again with an empty page_token",
            )
        };
        let payload = self.open(token).ok_or_else(invalid)?;
        if payload.len() != 25
            || payload[0] != KIND_EVENTS_PAGE
            || payload[1..17] != job_id.as_bytes()[..]
        {
            return Err(invalid());
        }
        Ok(i64::from_be_bytes(
            payload[17..25].try_into().expect("8 bytes"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_refuse_tampering() {
        let key = TokenKey::derive(b"secret-secret-secret-secret-secret");
        let f = fingerprint(b"filter");
        let cursor = PageCursor {
            created_at: DateTime::from_timestamp_micros(1_764_000_000_123_456).unwrap(),
            id: Uuid::new_v4(),
        };
        let token = key.page_token(&f, cursor);
        assert_eq!(key.open_page_token(&token, &f).unwrap(), cursor);
        let other = fingerprint(b"other filter");
        assert_eq!(
            key.open_page_token(&token, &other).unwrap_err().reason(),
            "PAGE_TOKEN_FILTER_MISMATCH"
        );
        // Any flipped character is refused.
        let bytes = token.as_bytes();
        for i in 0..bytes.len() {
            let mut t = bytes.to_vec();
            t[i] = if t[i] == b'A' { b'B' } else { b'A' };
            let t = String::from_utf8(t).unwrap();
            if t != token {
                assert!(key.open_page_token(&t, &f).is_err(), "tampered at {i}");
            }
        }
        let stranger = TokenKey::derive(b"another-secret-another-secret-000");
        assert_eq!(
            stranger.open_page_token(&token, &f).unwrap_err().reason(),
            "INVALID_PAGE_TOKEN"
        );
        for junk in ["", "!!!", "AAAA", &"A".repeat(600)] {
            assert_eq!(
                key.open_page_token(junk, &f).unwrap_err().reason(),
                "INVALID_PAGE_TOKEN"
            );
        }
    }

    #[test]
    fn resume_and_event_page_tokens_round_trip_and_stay_apart() {
        let key = TokenKey::derive(b"secret-secret-secret-secret-secret");
        let at = Position {
            xid: 123_456,
            seq: 789,
        };
        let token = key.resume_token(at);
        assert_eq!(key.open_resume_token(&token).unwrap(), (at, None));
        let snap = Snapshot {
            xmin: 100,
            xmax: 120,
            in_progress: vec![101, 117],
        };
        let with = key.resume_token_with_skip(at, Some(&snap));
        assert_eq!(
            key.open_resume_token(&with).unwrap(),
            (at, Some(snap.clone()))
        );
        let big = Snapshot {
            in_progress: (0..1000).collect(),
            ..snap
        };
        // Too many in-progress xids: the token falls back to the plain position.
        assert_eq!(
            key.open_resume_token(&key.resume_token_with_skip(at, Some(&big)))
                .unwrap(),
            (at, None)
        );
        let job = Uuid::new_v4();
        let page = key.events_page_token(job, 7);
        assert_eq!(key.open_events_page_token(&page, job).unwrap(), 7);
        // Kinds never cross, and a page token is bound to its job.
        assert_eq!(
            key.open_resume_token(&page).unwrap_err().reason(),
            "INVALID_RESUME_TOKEN"
        );
        assert!(key.open_events_page_token(&token, job).is_err());
        assert!(key.open_events_page_token(&page, Uuid::new_v4()).is_err());
        let f = fingerprint(b"filter");
        assert!(key.open_page_token(&token, &f).is_err());
        for junk in ["", "x", &"A".repeat(600)] {
            assert_eq!(
                key.open_resume_token(junk).unwrap_err().reason(),
                "INVALID_RESUME_TOKEN"
            );
        }
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// No string, and no signed-looking byte string, ever opens as a token unless
            /// this key made it; none panics.
            #[test]
            fn arbitrary_tokens_are_refused(s in ".{0,1200}", bytes in prop::collection::vec(any::<u8>(), 0..900)) {
                let key = TokenKey::derive(b"secret-secret-secret-secret-secret");
                let f = fingerprint(b"filter");
                let job = Uuid::nil();
                for t in [s, URL_SAFE_NO_PAD.encode(&bytes)] {
                    prop_assert!(key.open_page_token(&t, &f).is_err());
                    prop_assert!(key.open_resume_token(&t).is_err());
                    prop_assert!(key.open_events_page_token(&t, job).is_err());
                }
            }

            /// Every position (and snapshot) round-trips through a resume token.
            #[test]
            fn resume_tokens_round_trip(xid in 0i64.., seq in 0i64.., xmin in any::<i64>(), xmax in any::<i64>(),
                                        xips in prop::collection::vec(any::<i64>(), 0..70)) {
                let key = TokenKey::derive(b"secret-secret-secret-secret-secret");
                let at = Position { xid, seq };
                let snap = Snapshot { xmin, xmax, in_progress: xips };
                let (got, skip) = key.open_resume_token(&key.resume_token_with_skip(at, Some(&snap))).unwrap();
                prop_assert_eq!(got, at);
                if snap.in_progress.len() <= MAX_SNAPSHOT_XIDS {
                    prop_assert_eq!(skip, Some(snap));
                } else {
                    prop_assert_eq!(skip, None);
                }
            }
        }
    }
}
