//! Who is calling: a bearer JWT (or a service's `x-api-key`) becomes a [`Caller`], and nothing
//! else decides who may see what.
//!
//! - **HS256** tokens (Supabase's legacy scheme) verify with the configured secret, and during
//!   a rotation with the previous ones too ([`Authenticator::with_previous`]), so replicas
//!   restarted one by one accept each other's callers. A token without a `kid` is tried only
//!   against these secrets.
//! - **ES256, RS256, EdDSA** tokens (how Supabase signs today) name their key with `kid` and
//!   verify against a JWK set ([`jwks`], [`keys`]). The algorithm is the key's, never the
//!   token's: `alg: none` is never accepted, an HS256 token whose `kid` names a published key
//!   is refused, and no published key is ever used as an HMAC secret.
//! - `exp` is required and `nbf` checked, both with a small explicit leeway; `role` is
//!   `authenticated` (with the user's UUID in `sub`) or `service_role`. When configured, `aud`
//!   and `iss` are checked ([`ClaimsPolicy`]); anonymous sign-ins (`is_anonymous`) are users
//!   unless refused.
//! - **API keys** ([`api_keys`]) admit internal services by a static key in `x-api-key`.
pub mod api_keys;
pub mod jwks;
pub mod keys;
pub mod sign;
mod watched;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::Value;
use tonic::metadata::MetadataMap;
use uuid::Uuid;

use self::api_keys::ApiKeys;
use self::jwks::Jwks;
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

/// Verifies bearer tokens and API keys.
#[derive(Clone)]
pub struct Authenticator {
    /// The current HS256 secret first, then the previous ones (during a rotation).
    secrets: Vec<DecodingKey>,
    /// The published keys of asymmetric tokens, when configured.
    jwks: Option<Jwks>,
    api_keys: Option<ApiKeys>,
    policy: ClaimsPolicy,
    /// One validation per algorithm accepted: the algorithm is pinned to the key's.
    validations: Vec<(Algorithm, Validation)>,
    /// Added to every token's expiry.
    leeway_secs: i64,
    verified: Arc<Mutex<Verified>>,
    /// Tokens remembered at most; 0 verifies every call (to measure what verification costs).
    verified_capacity: usize,
}

/// Tokens verified before, and the version of the keys they were verified under: when the
/// keys change (a JWK set refetched without a revoked key, an API key file rewritten), the
/// memory starts over, so no token outlives its key.
#[derive(Default)]
struct Verified {
    keys_version: u64,
    tokens: HashMap<Box<str>, Caller>,
}

/// Tokens verified at most this many at a time are remembered; then the memory starts over.
///
/// A client sends the same token on every call until it expires, and verifying one (parsing
/// its header and claims, keying an HMAC; for ES256 an elliptic-curve verification) was 5% of
/// the service's CPU under load and 25 µs of every call at one caller. A remembered token is
/// still checked against its expiry on every use. Written by hand rather than taken from a
/// cache crate: a map that is cleared when full is all this needs (a client holds one token at
/// a time, and a clear costs each client one verification).
pub const VERIFIED_TOKENS: usize = 4096;

/// The algorithms a token may be verified with: HS256 with the secrets, the rest only with a
/// published key of that algorithm.
const ACCEPTED: [Algorithm; 10] = [
    Algorithm::HS256,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::EdDSA,
];

impl Authenticator {
    pub fn new(secret: &[u8], leeway: Duration) -> Self {
        let validations = ACCEPTED
            .iter()
            .map(|alg| {
                let mut validation = Validation::new(*alg);
                validation.algorithms = vec![*alg];
                validation.leeway = leeway.as_secs();
                validation.validate_exp = true;
                validation.validate_nbf = true;
                // Checked by [`Self::check_policy`], which knows Supabase's legacy keys.
                validation.validate_aud = false;
                validation.required_spec_claims = ["exp".to_string()].into_iter().collect();
                (*alg, validation)
            })
            .collect();
        Authenticator {
            secrets: vec![DecodingKey::from_secret(secret)],
            jwks: None,
            api_keys: None,
            policy: ClaimsPolicy::default(),
            validations,
            leeway_secs: leeway.as_secs() as i64,
            verified: Arc::default(),
            verified_capacity: VERIFIED_TOKENS,
        }
    }

    /// Also accepts tokens signed with these secrets: the ones being rotated out (or in).
    pub fn with_previous(mut self, secrets: &[Vec<u8>]) -> Self {
        self.secrets
            .extend(secrets.iter().map(|s| DecodingKey::from_secret(s)));
        self
    }

    /// Checks `aud`, `iss` and `is_anonymous` as `policy` says.
    pub fn with_policy(mut self, policy: ClaimsPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Verifies asymmetric tokens against this JWK set.
    pub fn with_jwks(mut self, jwks: Jwks) -> Self {
        self.jwks = Some(jwks);
        self
    }

    /// Admits the keys of this file in `x-api-key`.
    pub fn with_api_keys(mut self, keys: ApiKeys) -> Self {
        self.api_keys = Some(keys);
        self
    }

    /// Remembers at most `capacity` verified tokens (0: verify every call).
    pub fn with_verified_capacity(mut self, capacity: usize) -> Self {
        self.verified_capacity = capacity;
        self
    }

    /// Turns true once every key source is loaded (a JWK set URL fetched once); the health
    /// service is NOT_SERVING until then.
    pub fn ready(&self) -> tokio::sync::watch::Receiver<bool> {
        match &self.jwks {
            Some(jwks) => jwks.ready(),
            None => tokio::sync::watch::channel(true).1,
        }
    }

    /// Reads `x-api-key: <key>` or `authorization: Bearer <JWT>` from call metadata. A token
    /// naming a `kid` the JWK set lacks asks for the set again (rate-limited) and waits
    /// briefly for it: a key just promoted from standby is accepted on first use.
    pub(crate) async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller> {
        if let Some(key) = metadata.get("x-api-key") {
            if metadata.contains_key("authorization") {
                return Err(Error::unauthenticated(
                    "CREDENTIALS_AMBIGUOUS",
                    "send either `x-api-key` or `authorization`, not both",
                ));
            }
            return self.api_key(key.to_str().unwrap_or(""));
        }
        let header = metadata.get("authorization").ok_or_else(|| {
            Error::unauthenticated(
                "TOKEN_MISSING",
                "missing metadata `authorization: Bearer <JWT>` (or `x-api-key` for a service key)",
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
        match self.verify(token) {
            Err(e) if e.reason() == UNKNOWN_KEY => match &self.jwks {
                Some(jwks) if jwks.refetch_for_unknown_kid().await => self.verify(token),
                _ => Err(e),
            },
            checked => checked,
        }
    }

    fn api_key(&self, presented: &str) -> Result<Caller> {
        let role = self.api_keys.as_ref().and_then(|k| k.find(presented));
        match role {
            // A key lives until it is removed from the file.
            Some(role) => Ok(Caller::new(role, i64::MAX)),
            None => Err(Error::unauthenticated(
                "API_KEY_INVALID",
                match self.api_keys {
                    Some(_) => "the x-api-key is not one this server accepts",
                    None => "this server accepts no API keys (it has no --api-key-file)",
                },
            )),
        }
    }

    /// The version of every key source together: it changes whenever one of them does.
    fn keys_version(&self) -> u64 {
        let jwks = self.jwks.as_ref().map_or(0, Jwks::version);
        let api = self.api_keys.as_ref().map_or(0, ApiKeys::version);
        jwks.wrapping_add(api << 32)
    }

    /// Verifies one token string (or finds it verified before, under the same keys, and not
    /// yet expired).
    pub fn verify(&self, token: &str) -> Result<Caller> {
        if self.verified_capacity == 0 {
            return self.verify_signed(token);
        }
        let now = jsonwebtoken::get_current_timestamp() as i64;
        let version = self.keys_version();
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.keys_version != version {
            verified.tokens.clear();
            verified.keys_version = version;
        }
        match verified.tokens.get(token) {
            Some(caller) if caller.expires_at() >= now => return Ok(*caller),
            // Expired: verified again below, which gives the expiry its own answer.
            Some(_) => {
                verified.tokens.remove(token);
            }
            None => {}
        }
        drop(verified);
        let caller = self.verify_signed(token)?;
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.keys_version == version {
            if verified.tokens.len() >= self.verified_capacity {
                verified.tokens.clear();
            }
            verified.tokens.insert(token.into(), caller);
        }
        Ok(caller)
    }

    /// Checks a token's signature (HS256 against the secrets, anything else against the key
    /// its `kid` names) and its claims.
    fn verify_signed(&self, token: &str) -> Result<Caller> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| {
            bad_token("unreadable header, or an algorithm jobsvc does not accept (`none` never is)")
        })?;
        let decoded = match header.alg {
            Algorithm::HS256 => {
                let names_published = match (&header.kid, self.jwks_keys()) {
                    (Some(kid), Some(keys)) => keys.get(kid).is_some(),
                    _ => false,
                };
                if names_published {
                    return Err(bad_token(
                        "an HS256 token names a published asymmetric key; \
                         the algorithm is the key's, never the token's",
                    ));
                }
                let validation = self.validation(Algorithm::HS256);
                let mut decoded = Err(ErrorKind::InvalidSignature.into());
                for key in &self.secrets {
                    decoded =
                        jsonwebtoken::decode::<HashMap<String, Value>>(token, key, validation);
                    match &decoded {
                        Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => continue,
                        _ => break,
                    }
                }
                decoded
            }
            alg if alg != Algorithm::HS384 && alg != Algorithm::HS512 => {
                let kid = header.kid.as_deref().ok_or_else(|| {
                    bad_token(&format!("a {alg:?} token must name its key with `kid`"))
                })?;
                let Some(jwks) = &self.jwks else {
                    return Err(bad_token(&format!(
                        "this server has no JWK set (--jwks-url, --jwks-file), so it accepts \
                         no {alg:?} tokens"
                    )));
                };
                let keys = jwks.keys().ok_or_else(|| Error::NotReady {
                    reason: "SIGNING_KEYS_UNAVAILABLE",
                    message: "the server has not loaded its JWK set yet; retry with backoff".into(),
                })?;
                let key = keys.get(kid).ok_or_else(|| {
                    Error::unauthenticated(
                        UNKNOWN_KEY,
                        format!("the token's key {kid:?} is not in the server's JWK set"),
                    )
                })?;
                if key.alg != alg {
                    return Err(bad_token(&format!(
                        "the token says {alg:?} but its key {kid:?} is an {:?} key",
                        key.alg
                    )));
                }
                jsonwebtoken::decode::<HashMap<String, Value>>(
                    token,
                    &key.key,
                    self.validation(key.alg),
                )
            }
            _ => return Err(bad_token("of the HMAC algorithms only HS256 is accepted")),
        };
        let data = decoded.map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => {
                Error::unauthenticated("TOKEN_EXPIRED", "the token has expired; get a new one")
            }
            ErrorKind::ImmatureSignature => Error::unauthenticated(
                "TOKEN_NOT_YET_VALID",
                "the token is not valid yet (nbf is in the future)",
            ),
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                bad_token("the algorithm does not match the key")
            }
            ErrorKind::InvalidSignature => Error::unauthenticated(
                "TOKEN_BAD_SIGNATURE",
                "invalid token: bad signature (signed with a key this server does not hold)",
            ),
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

    fn jwks_keys(&self) -> Option<Arc<keys::KeySet>> {
        self.jwks.as_ref().and_then(Jwks::keys)
    }

    fn validation(&self, alg: Algorithm) -> &Validation {
        &self
            .validations
            .iter()
            .find(|(a, _)| *a == alg)
            .expect("a validation is built for every accepted algorithm")
            .1
    }
}

/// The reason of a token whose `kid` the JWK set lacks (a refetch may find it).
const UNKNOWN_KEY: &str = "TOKEN_UNKNOWN_KEY";

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

/// The claims of a token in the shape Supabase issues (`role`, `iat`, `exp`, `sub` for a user).
pub fn claims(role: &str, sub: Option<Uuid>, ttl: Duration) -> Value {
    let now = chrono::Utc::now().timestamp();
    let mut claims = serde_json::json!({
        "role": role,
        "iat": now,
        "exp": now + ttl.as_secs() as i64,
    });
    if let Some(sub) = sub {
        claims["sub"] = Value::String(sub.to_string());
    }
    claims
}

/// Signs a token in the shape Supabase issues (for `jobsvc token`, tests and the walk-through).
pub fn issue(secret: &[u8], role: &str, sub: Option<Uuid>, ttl: Duration) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(role, sub, ttl),
        &EncodingKey::from_secret(secret),
    )
    .expect("HS256 signing with an in-memory key cannot fail")
}
