//! Who is calling: a bearer JWT becomes a [`Caller`], and nothing else decides who may see what.
//!
//! Tokens have the shape Supabase issues: HS256 with the configured secret (the algorithm is
//! pinned: a token naming any other, `none` included, is refused), `exp` required, `nbf`
//! checked, both with a small explicit leeway; `role` is `authenticated` (with the user's UUID
//! in `sub`) or `service_role`.
//!
//! During a rotation the previous secrets verify too ([`Authenticator::with_previous`]), so
//! replicas restarted one by one accept each other's callers. When configured, `aud` and `iss`
//! are checked ([`ClaimsPolicy`]); anonymous sign-ins (`is_anonymous`) are users unless
//! refused.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::Value;
use tonic::metadata::MetadataMap;
use uuid::Uuid;

use crate::domain::{Caller, Role};
use crate::error::{Error, Result};

/// What a token's claims must say besides its role and lifetime.
#[derive(Debug, Clone, Default)]
pub struct ClaimsPolicy {
    /// When not empty, a token that carries `aud` must name one of these. A token without
    /// `aud` is accepted only for the service role (Supabase's legacy service keys have none).
    pub audiences: Vec<String>,
    /// When not empty, `iss` must be one of these (Supabase: `https://<ref>.supabase.co/auth/v1`
    /// for user tokens, `supabase` for the legacy keys).
    pub issuers: Vec<String>,
    /// Refuse anonymous sign-ins (`is_anonymous: true`) with PERMISSION_DENIED.
    pub refuse_anonymous: bool,
}

/// Verifies bearer tokens.
#[derive(Clone)]
pub struct Authenticator {
    /// The current secret first, then the previous ones (during a rotation).
    keys: Vec<DecodingKey>,
    policy: ClaimsPolicy,
    validation: Validation,
    /// Added to every token's expiry.
    leeway_secs: i64,
    verified: Arc<Mutex<HashMap<Box<str>, Caller>>>,
}

/// Tokens verified at most this many at a time are remembered; then the memory starts over.
///
/// A client sends the same token on every call until it expires, and verifying one (parsing
/// its header and claims, keying an HMAC) was 5% of the service's CPU under load and 25 µs of
/// every call at one caller. A remembered token is still checked against its expiry on every
/// use. Written by hand rather than taken from a cache crate: a map that is cleared when full
/// is all this needs (a client holds one token at a time, and a clear costs each client one
/// verification).
const VERIFIED_TOKENS: usize = 4096;

impl Authenticator {
    pub fn new(secret: &[u8], leeway: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.leeway = leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // Supabase tokens carry `aud: authenticated`; jobsvc does not use audiences.
        validation.validate_aud = false;
        validation.required_spec_claims = ["exp".to_string()].into_iter().collect();
        Authenticator {
            keys: vec![DecodingKey::from_secret(secret)],
            policy: ClaimsPolicy::default(),
            validation,
            leeway_secs: leeway.as_secs() as i64,
            verified: Arc::default(),
        }
    }

    /// Also accepts tokens signed with these secrets: the ones being rotated out (or in).
    pub fn with_previous(mut self, secrets: &[Vec<u8>]) -> Self {
        self.keys
            .extend(secrets.iter().map(|s| DecodingKey::from_secret(s)));
        self
    }

    /// Checks `aud`, `iss` and `is_anonymous` as `policy` says.
    pub fn with_policy(mut self, policy: ClaimsPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Reads `authorization: Bearer <JWT>` from call metadata.
    pub(crate) fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller> {
        let header = metadata.get("authorization").ok_or_else(|| {
            Error::unauthenticated(
                "TOKEN_MISSING",
                "missing metadata `authorization: Bearer <JWT>`",
            )
        })?;
        let header = header.to_str().map_err(|_| bad_token("not ASCII"))?;
        let token = header
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .ok_or_else(|| {
                Error::unauthenticated(
                    "TOKEN_MISSING",
                    "authorization metadata must be `Bearer <JWT>`",
                )
            })?;
        self.verify(token)
    }

    /// Verifies one token string (or finds it verified before and not yet expired).
    pub fn verify(&self, token: &str) -> Result<Caller> {
        let now = jsonwebtoken::get_current_timestamp() as i64;
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        match verified.get(token) {
            Some(caller) if caller.expires_at() >= now => return Ok(*caller),
            // Expired: verified again below, which gives the expiry its own answer.
            Some(_) => {
                verified.remove(token);
            }
            None => {}
        }
        drop(verified);
        let caller = self.verify_signed(token)?;
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= VERIFIED_TOKENS {
            verified.clear();
        }
        verified.insert(token.into(), caller);
        Ok(caller)
    }

    /// Checks a token's signature (against the current secret, then the previous ones) and
    /// its claims.
    fn verify_signed(&self, token: &str) -> Result<Caller> {
        let mut decoded = Err(jsonwebtoken::errors::ErrorKind::InvalidSignature.into());
        for key in &self.keys {
            decoded = jsonwebtoken::decode::<HashMap<String, Value>>(token, key, &self.validation);
            match &decoded {
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => continue,
                _ => break,
            }
        }
        let data = decoded.map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => {
                Error::unauthenticated("TOKEN_EXPIRED", "the token has expired; get a new one")
            }
            ErrorKind::ImmatureSignature => Error::unauthenticated(
                "TOKEN_NOT_YET_VALID",
                "the token is not valid yet (nbf is in the future)",
            ),
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                bad_token("only HS256 tokens are accepted")
            }
            ErrorKind::InvalidSignature => bad_token("bad signature"),
            ErrorKind::MissingRequiredClaim(c) => bad_token(&format!("missing claim {c}")),
            _ => bad_token("malformed"),
        })?;
        let claims = data.claims;
        self.check_policy(&claims)?;
        let expires_at = claims
            .get("exp")
            .and_then(Value::as_i64)
            .ok_or_else(|| bad_token("exp must be a number"))?;
        let role = claims.get("role").and_then(Value::as_str).unwrap_or("");
        let role = match role {
            "service_role" => Role::Service,
            "authenticated" => {
                let sub = claims
                    .get("sub")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad_token("an authenticated token needs `sub`"))?;
                let user = Uuid::parse_str(sub).map_err(|_| bad_token("`sub` is not a UUID"))?;
                Role::User(user)
            }
            other => {
                return Err(Error::denied(
                    "ROLE_NOT_ALLOWED",
                    format!(
                        "role {other:?} may not use jobsvc; use an authenticated or service_role token"
                    ),
                ));
            }
        };
        Ok(Caller::new(
            role,
            expires_at.saturating_add(self.leeway_secs),
        ))
    }
}

impl Authenticator {
    /// `aud`, `iss` and `is_anonymous`, as the policy says.
    fn check_policy(&self, claims: &HashMap<String, Value>) -> Result<()> {
        let policy = &self.policy;
        if !policy.issuers.is_empty() {
            let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
            if !policy.issuers.iter().any(|i| i == iss) {
                return Err(Error::unauthenticated(
                    "TOKEN_WRONG_ISSUER",
                    format!("the token's issuer {iss:?} is not one this server accepts"),
                ));
            }
        }
        if !policy.audiences.is_empty() {
            let named: Vec<&str> = match claims.get("aud") {
                Some(Value::String(a)) => vec![a.as_str()],
                Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            };
            let service = claims.get("role").and_then(Value::as_str) == Some("service_role");
            let fits = match named.is_empty() {
                // Supabase's legacy service keys carry no audience.
                true => service && claims.get("aud").is_none(),
                false => named
                    .iter()
                    .any(|a| policy.audiences.iter().any(|w| w == a)),
            };
            if !fits {
                return Err(Error::unauthenticated(
                    "TOKEN_WRONG_AUDIENCE",
                    "the token's audience is not one this server accepts",
                ));
            }
        }
        if policy.refuse_anonymous && claims.get("is_anonymous") == Some(&Value::Bool(true)) {
            return Err(Error::denied(
                "ANONYMOUS_NOT_ALLOWED",
                "anonymous sign-ins may not use this server; sign in first",
            ));
        }
        Ok(())
    }
}

fn bad_token(why: &str) -> Error {
    Error::unauthenticated("TOKEN_INVALID", format!("invalid token: {why}"))
}

/// Signs a token in the shape Supabase issues (for `jobsvc token`, tests and the walk-through).
pub fn issue(secret: &[u8], role: &str, sub: Option<Uuid>, ttl: Duration) -> String {
    let now = chrono::Utc::now().timestamp();
    let mut claims = serde_json::json!({
        "role": role,
        "iat": now,
        "exp": now + ttl.as_secs() as i64,
    });
    if let Some(sub) = sub {
        claims["sub"] = Value::String(sub.to_string());
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("HS256 signing with an in-memory key cannot fail")
}
