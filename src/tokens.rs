//! Opaque, signed tokens handed to clients (page tokens; resume tokens later).
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

use crate::error::{Error, Result};

type HmacSha256 = hmac::Hmac<Sha256>;

const TAG_LEN: usize = 16;
const KIND_PAGE: u8 = 1;
/// Longest token accepted before decoding anything (a page token is 76 characters).
const MAX_TOKEN_CHARS: usize = 512;

/// Signs and verifies tokens.
#[derive(Clone)]
pub struct TokenKey {
    key: [u8; 32],
}

/// Where the next page starts: after this (created_at, id) in newest-first order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageCursor {
    pub created_at: DateTime<Utc>,
    pub id: Uuid,
}

/// A digest of a request's filter; a page token is only valid with the filter it was made for.
pub type Fingerprint = [u8; 16];

pub fn fingerprint(canonical: &[u8]) -> Fingerprint {
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

    pub fn page_token(&self, filter: &Fingerprint, cursor: PageCursor) -> String {
        let mut payload = Vec::with_capacity(41);
        payload.push(KIND_PAGE);
        payload.extend_from_slice(filter);
        payload.extend_from_slice(&cursor.created_at.timestamp_micros().to_be_bytes());
        payload.extend_from_slice(cursor.id.as_bytes());
        self.seal(&payload)
    }

    /// The cursor of a page token, checked against the filter it is used with.
    pub fn open_page_token(&self, token: &str, filter: &Fingerprint) -> Result<PageCursor> {
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
}
