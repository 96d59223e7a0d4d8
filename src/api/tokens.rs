//! Opaque, signed tokens handed to clients: ListJobs page tokens, ListJobEvents page tokens
//! and StreamJobUpdates resume tokens.
//!
//! A token is `base64url(payload || tag)`, where the tag is HMAC-SHA256 over the payload with
//! a key derived from the JWT secret (so every replica sharing the secret accepts the others'
//! tokens), truncated to 16 bytes. The payload starts with a kind byte, so a token of one kind
//! never parses as another. Between payload and tag stands the signing key's id: during a
//! rotation of the JWT secret, tokens signed under a previous secret still open
//! ([`TokenKey::with_previous`]), so no cursor is lost in a rolling restart. Page tokens carry
//! the time they were issued and expire after
//! [`PAGE_TOKEN_TTL`]; resume tokens carry the caller's scope (the user, or the service role),
//! so a token taken from one user's stream is refused on another's.
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::domain::{Caller, PageCursor, Position, Role, Snapshot};
use crate::error::{Error, Result};

type HmacSha256 = hmac::Hmac<Sha256>;

const TAG_LEN: usize = 16;
/// Bytes of the key id every token carries.
const KEY_ID_LEN: usize = 4;
// Kinds 1 to 4 were the first round's formats (no expiry, no scope); they are refused.
const KIND_RESUME: u8 = 5;
const KIND_RESUME_SNAPSHOT: u8 = 6;
const KIND_PAGE: u8 = 7;
const KIND_EVENTS_PAGE: u8 = 8;
/// A resume token carries at most this many in-progress xids of its snapshot; a larger
/// snapshot (rare: that many concurrent writers) is left out, and resuming may then repeat
/// changes the stream's snapshot already showed (at least once, as the contract allows).
const MAX_SNAPSHOT_XIDS: usize = 64;
/// Longest token accepted before decoding anything (a page token is 87 characters, a resume
/// token with a full snapshot about 790).
const MAX_TOKEN_CHARS: usize = 1024;
/// Page tokens (ListJobs, ListJobEvents) are refused this long after they were issued.
pub(crate) const PAGE_TOKEN_TTL_SECS: i64 = 24 * 3600;
/// The bytes that bind a resume token to its caller: a tag, then the user's id (zeros for the
/// service role).
const SCOPE_LEN: usize = 17;

/// Signs and verifies tokens.
#[derive(Clone)]
pub struct TokenKey {
    /// The current key first (it signs), then the previous secrets' (they only open).
    keys: Vec<SigningKey>,
}

#[derive(Clone)]
struct SigningKey {
    key: [u8; 32],
    /// Names the key in the tokens it signs.
    id: [u8; KEY_ID_LEN],
}

impl SigningKey {
    /// The token key of a JWT secret (a separate key, never the secret itself).
    fn derive(secret: &[u8]) -> Self {
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(b"jobsvc token key v1");
        let mut key = [0u8; 32];
        key.copy_from_slice(&mac.finalize().into_bytes());
        let digest = Sha256::digest([&key[..], b"key id"].concat());
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        SigningKey { key, id }
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length")
    }
}

/// A digest of a request's filter; a page token is only valid with the filter it was made for.
pub(crate) type Fingerprint = [u8; 16];

pub(crate) fn fingerprint(canonical: &[u8]) -> Fingerprint {
    let digest = Sha256::digest(canonical);
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

/// Whose stream a resume token belongs to.
fn scope(caller: &Caller) -> [u8; SCOPE_LEN] {
    let mut out = [0u8; SCOPE_LEN];
    if let Role::User(user) = caller.role() {
        out[0] = 1;
        out[1..].copy_from_slice(user.as_bytes());
    }
    out
}

/// Reads big-endian words out of a payload.
struct Words<'a>(&'a [u8]);

impl Words<'_> {
    fn i64_at(&self, i: usize) -> Option<i64> {
        Some(i64::from_be_bytes(self.0.get(i..i + 8)?.try_into().ok()?))
    }
}

impl TokenKey {
    /// Derives the token key from the JWT secret (a separate key, never the secret itself).
    pub fn derive(secret: &[u8]) -> Self {
        TokenKey {
            keys: vec![SigningKey::derive(secret)],
        }
    }

    /// Also opens the tokens signed under these JWT secrets (a rotation's previous ones).
    pub fn with_previous(mut self, secrets: &[Vec<u8>]) -> Self {
        self.keys
            .extend(secrets.iter().map(|s| SigningKey::derive(s)));
        self
    }

    /// `payload || key id || tag`, the tag over the first two, by the current key.
    fn seal(&self, payload: &[u8]) -> String {
        let signer = &self.keys[0];
        let mut bytes = Vec::with_capacity(payload.len() + KEY_ID_LEN + TAG_LEN);
        bytes.extend_from_slice(payload);
        bytes.extend_from_slice(&signer.id);
        let mut mac = signer.mac();
        mac.update(&bytes);
        let tag = mac.finalize().into_bytes();
        bytes.extend_from_slice(&tag[..TAG_LEN]);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The payload of a token one of the keys signed, or `None` for anything else.
    fn open(&self, token: &str) -> Option<Vec<u8>> {
        if token.len() > MAX_TOKEN_CHARS {
            return None;
        }
        let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
        let split = bytes.len().checked_sub(TAG_LEN)?;
        let (signed, tag) = bytes.split_at(split);
        let payload_len = signed.len().checked_sub(KEY_ID_LEN)?;
        let id = &signed[payload_len..];
        let key = self.keys.iter().find(|k| k.id[..] == *id)?;
        let mut mac = key.mac();
        mac.update(signed);
        mac.verify_truncated_left(tag).ok()?;
        Some(signed[..payload_len].to_vec())
    }

    pub(crate) fn page_token(&self, filter: &Fingerprint, cursor: PageCursor) -> String {
        self.page_token_issued(filter, cursor, Utc::now().timestamp())
    }

    fn page_token_issued(&self, filter: &Fingerprint, cursor: PageCursor, issued: i64) -> String {
        let mut payload = Vec::with_capacity(49);
        payload.push(KIND_PAGE);
        payload.extend_from_slice(filter);
        payload.extend_from_slice(&cursor.created_at.timestamp_micros().to_be_bytes());
        payload.extend_from_slice(cursor.id.as_bytes());
        payload.extend_from_slice(&issued.to_be_bytes());
        self.seal(&payload)
    }

    /// The cursor of a page token, checked against the filter it is used with and its age.
    pub(crate) fn open_page_token(&self, token: &str, filter: &Fingerprint) -> Result<PageCursor> {
        let invalid = || {
            Error::invalid(
                "page_token",
                "INVALID_PAGE_TOKEN",
                "page_token is not a token this service issued; start again with an empty page_token",
            )
        };
        let payload = self.open(token).ok_or_else(invalid)?;
        if payload.len() != 49 || payload[0] != KIND_PAGE {
            return Err(invalid());
        }
        if payload[1..17] != filter[..] {
            return Err(Error::invalid(
                "page_token",
                "PAGE_TOKEN_FILTER_MISMATCH",
                "page_token was issued for a different filter; send the same filter fields as the first page",
            ));
        }
        let words = Words(&payload);
        check_age(words.i64_at(41).ok_or_else(invalid)?)?;
        let micros = words.i64_at(17).ok_or_else(invalid)?;
        let created_at = DateTime::<Utc>::from_timestamp_micros(micros).ok_or_else(invalid)?;
        let id = Uuid::from_slice(&payload[25..41]).map_err(|_| invalid())?;
        Ok(PageCursor { created_at, id })
    }

    /// A stream position as `caller`'s resume token.
    pub fn resume_token(&self, caller: &Caller, at: Position) -> String {
        self.resume_token_with_skip(caller, at, None)
    }

    /// A stream position plus the snapshot whose changes the stream already showed (its
    /// initial jobs, or "now"), while that still matters: resuming skips them too.
    pub(crate) fn resume_token_with_skip(
        &self,
        caller: &Caller,
        at: Position,
        skip: Option<&Snapshot>,
    ) -> String {
        let skip = skip.filter(|s| s.in_progress.len() <= MAX_SNAPSHOT_XIDS);
        let mut payload = Vec::with_capacity(
            1 + SCOPE_LEN + 16 + skip.map_or(0, |s| 18 + 8 * s.in_progress.len()),
        );
        payload.push(match skip {
            None => KIND_RESUME,
            Some(_) => KIND_RESUME_SNAPSHOT,
        });
        payload.extend_from_slice(&scope(caller));
        for v in [at.xid, at.seq] {
            payload.extend_from_slice(&v.to_be_bytes());
        }
        if let Some(s) = skip {
            for v in [s.xmin, s.xmax] {
                payload.extend_from_slice(&v.to_be_bytes());
            }
            payload.extend_from_slice(&(s.in_progress.len() as u16).to_be_bytes());
            for x in &s.in_progress {
                payload.extend_from_slice(&x.to_be_bytes());
            }
        }
        self.seal(&payload)
    }

    /// The position of `caller`'s resume token, and the snapshot to keep skipping if it
    /// carries one (not yet checked against the pruned history).
    pub(crate) fn open_resume_token(
        &self,
        token: &str,
        caller: &Caller,
    ) -> Result<(Position, Option<Snapshot>)> {
        let invalid = || {
            Error::invalid(
                "resume_token",
                "INVALID_RESUME_TOKEN",
                "resume_token is not a token this service issued to this caller; start again without one",
            )
        };
        let payload = self.open(token).ok_or_else(invalid)?;
        let kind = payload.first().copied();
        if !matches!(kind, Some(KIND_RESUME | KIND_RESUME_SNAPSHOT))
            || payload.get(1..1 + SCOPE_LEN) != Some(&scope(caller)[..])
        {
            return Err(invalid());
        }
        let words = Words(&payload);
        let base = 1 + SCOPE_LEN;
        let at = Position {
            xid: words.i64_at(base).ok_or_else(invalid)?,
            seq: words.i64_at(base + 8).ok_or_else(invalid)?,
        };
        let skip = match kind {
            Some(KIND_RESUME) if payload.len() == base + 16 => None,
            Some(KIND_RESUME_SNAPSHOT) if payload.len() >= base + 34 => {
                let n = u16::from_be_bytes([payload[base + 32], payload[base + 33]]) as usize;
                if n > MAX_SNAPSHOT_XIDS || payload.len() != base + 34 + 8 * n {
                    return Err(invalid());
                }
                let in_progress = (0..n)
                    .map(|k| words.i64_at(base + 34 + 8 * k))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(invalid)?;
                Some(Snapshot {
                    xmin: words.i64_at(base + 16).ok_or_else(invalid)?,
                    xmax: words.i64_at(base + 24).ok_or_else(invalid)?,
                    in_progress,
                })
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
        self.events_page_token_issued(job_id, version, Utc::now().timestamp())
    }

    fn events_page_token_issued(&self, job_id: Uuid, version: i64, issued: i64) -> String {
        let mut payload = Vec::with_capacity(33);
        payload.push(KIND_EVENTS_PAGE);
        payload.extend_from_slice(job_id.as_bytes());
        payload.extend_from_slice(&version.to_be_bytes());
        payload.extend_from_slice(&issued.to_be_bytes());
        self.seal(&payload)
    }

    /// The last version of a ListJobEvents page token, checked against the job it is used for
    /// and its age.
    pub(crate) fn open_events_page_token(&self, token: &str, job_id: Uuid) -> Result<i64> {
        let invalid = || {
            Error::invalid(
                "page_token",
                "INVALID_PAGE_TOKEN",
                "page_token is not a token this service issued for this job; start again with an empty page_token",
            )
        };
        let payload = self.open(token).ok_or_else(invalid)?;
        if payload.len() != 33
            || payload[0] != KIND_EVENTS_PAGE
            || payload[1..17] != job_id.as_bytes()[..]
        {
            return Err(invalid());
        }
        let words = Words(&payload);
        check_age(words.i64_at(25).ok_or_else(invalid)?)?;
        words.i64_at(17).ok_or_else(invalid)
    }
}

/// A page token older than [`PAGE_TOKEN_TTL_SECS`] (or issued in the future) is refused.
fn check_age(issued: i64) -> Result<()> {
    let age = Utc::now().timestamp().saturating_sub(issued);
    if !(-60..=PAGE_TOKEN_TTL_SECS).contains(&age) {
        return Err(Error::invalid(
            "page_token",
            "PAGE_TOKEN_EXPIRED",
            "page_token has expired (page tokens last 24 hours); start again with an empty page_token",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> Caller {
        Caller::new(Role::Service, i64::MAX)
    }

    fn user(id: Uuid) -> Caller {
        Caller::new(Role::User(id), i64::MAX)
    }

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
        let me = service();
        let token = key.resume_token(&me, at);
        assert_eq!(key.open_resume_token(&token, &me).unwrap(), (at, None));
        let snap = Snapshot {
            xmin: 100,
            xmax: 120,
            in_progress: vec![101, 117],
        };
        let with = key.resume_token_with_skip(&me, at, Some(&snap));
        assert_eq!(
            key.open_resume_token(&with, &me).unwrap(),
            (at, Some(snap.clone()))
        );
        let big = Snapshot {
            in_progress: (0..1000).collect(),
            ..snap
        };
        // Too many in-progress xids: the token falls back to the plain position.
        assert_eq!(
            key.open_resume_token(&key.resume_token_with_skip(&me, at, Some(&big)), &me)
                .unwrap(),
            (at, None)
        );
        let job = Uuid::new_v4();
        let page = key.events_page_token(job, 7);
        assert_eq!(key.open_events_page_token(&page, job).unwrap(), 7);
        // Kinds never cross, and a page token is bound to its job.
        assert_eq!(
            key.open_resume_token(&page, &me).unwrap_err().reason(),
            "INVALID_RESUME_TOKEN"
        );
        assert!(key.open_events_page_token(&token, job).is_err());
        assert!(key.open_events_page_token(&page, Uuid::new_v4()).is_err());
        let f = fingerprint(b"filter");
        assert!(key.open_page_token(&token, &f).is_err());
        for junk in ["", "x", &"A".repeat(600)] {
            assert_eq!(
                key.open_resume_token(junk, &me).unwrap_err().reason(),
                "INVALID_RESUME_TOKEN"
            );
        }
    }

    /// A resume token is its caller's: another user, the service role, or a user for the
    /// service's token are all refused, with or without a snapshot.
    #[test]
    fn resume_tokens_are_bound_to_their_caller() {
        let key = TokenKey::derive(b"secret-secret-secret-secret-secret");
        let at = Position { xid: 10, seq: 2 };
        let (alice, bob) = (user(Uuid::new_v4()), user(Uuid::new_v4()));
        let nil_user = user(Uuid::nil());
        let snap = Snapshot {
            xmin: 1,
            xmax: 9,
            in_progress: vec![3],
        };
        for owner in [alice, bob, service(), nil_user] {
            for token in [
                key.resume_token(&owner, at),
                key.resume_token_with_skip(&owner, at, Some(&snap)),
            ] {
                for other in [alice, bob, service(), nil_user] {
                    let opened = key.open_resume_token(&token, &other);
                    if other == owner {
                        assert_eq!(opened.unwrap().0, at);
                    } else {
                        assert_eq!(opened.unwrap_err().reason(), "INVALID_RESUME_TOKEN");
                    }
                }
            }
        }
    }

    /// Page tokens last 24 hours, for ListJobs and ListJobEvents alike.
    #[test]
    fn page_tokens_expire_after_a_day() {
        let key = TokenKey::derive(b"secret-secret-secret-secret-secret");
        let f = fingerprint(b"filter");
        let cursor = PageCursor {
            created_at: DateTime::from_timestamp_micros(1_764_000_000_123_456).unwrap(),
            id: Uuid::new_v4(),
        };
        let now = Utc::now().timestamp();
        let job = Uuid::new_v4();
        for (issued, fresh) in [
            (now - 10, true),
            (now - PAGE_TOKEN_TTL_SECS + 60, true),
            (now - PAGE_TOKEN_TTL_SECS - 1, false),
            (now - 30 * 24 * 3600, false),
            (now + 3600, false),
        ] {
            let page = key.open_page_token(&key.page_token_issued(&f, cursor, issued), &f);
            let events =
                key.open_events_page_token(&key.events_page_token_issued(job, 3, issued), job);
            if fresh {
                assert_eq!(page.unwrap(), cursor);
                assert_eq!(events.unwrap(), 3);
            } else {
                assert_eq!(page.unwrap_err().reason(), "PAGE_TOKEN_EXPIRED");
                assert_eq!(events.unwrap_err().reason(), "PAGE_TOKEN_EXPIRED");
            }
        }
    }

    /// During a rotation, tokens signed under a previous secret still open, and new tokens
    /// are signed under the current one, which the old replicas (holding it as previous)
    /// open too. A key that is neither opens nothing, and the key id cannot be swapped.
    #[test]
    fn tokens_survive_a_rotation_of_the_secret() {
        let (old, new) = (
            b"old-secret-old-secret-old-secret!".to_vec(),
            b"new-secret-new-secret-new-secret!".to_vec(),
        );
        let before = TokenKey::derive(&old);
        let adding = TokenKey::derive(&old).with_previous(std::slice::from_ref(&new));
        let swapped = TokenKey::derive(&new).with_previous(std::slice::from_ref(&old));
        let after = TokenKey::derive(&new);
        let me = service();
        let at = Position { xid: 5, seq: 1 };
        let f = fingerprint(b"filter");
        let cursor = PageCursor {
            created_at: DateTime::from_timestamp_micros(1_764_000_000_000_000).unwrap(),
            id: Uuid::new_v4(),
        };
        for signer in [&before, &adding] {
            let resume = signer.resume_token(&me, at);
            let page = signer.page_token(&f, cursor);
            for reader in [&before, &adding, &swapped] {
                assert_eq!(reader.open_resume_token(&resume, &me).unwrap().0, at);
                assert_eq!(reader.open_page_token(&page, &f).unwrap(), cursor);
            }
            assert!(after.open_resume_token(&resume, &me).is_err());
        }
        let resume = swapped.resume_token(&me, at);
        for reader in [&adding, &swapped, &after] {
            assert_eq!(reader.open_resume_token(&resume, &me).unwrap().0, at);
        }
        assert!(before.open_resume_token(&resume, &me).is_err());
        // The old key's id on the new key's token: the tag no longer matches.
        let mut bytes = URL_SAFE_NO_PAD.decode(&resume).unwrap();
        let id_at = bytes.len() - TAG_LEN - KEY_ID_LEN;
        bytes[id_at..id_at + KEY_ID_LEN].copy_from_slice(&before.keys[0].id);
        assert!(
            swapped
                .open_resume_token(&URL_SAFE_NO_PAD.encode(bytes), &me)
                .is_err()
        );
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
                    prop_assert!(key.open_resume_token(&t, &service()).is_err());
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
                let (got, skip) = key.open_resume_token(&key.resume_token_with_skip(&service(), at, Some(&snap)), &service()).unwrap();
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
