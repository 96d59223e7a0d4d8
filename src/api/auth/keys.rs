//! A JWK set, checked at load: the public keys that may sign callers' tokens, each with the
//! one algorithm it is used with.
//!
//! The algorithm is the key's, never the token's: a key's `alg` (or, where the set leaves it
//! out, the one its type and curve allow) is the only algorithm it verifies, and a token whose
//! header names another is refused. Symmetric (`oct`) keys are never taken from a set (a
//! published set is public), RSA keys under 2048 bits are refused, and a key without a `kid`
//! cannot be chosen, so it is left out. A key that is left out is named in the load's
//! warnings, not silently dropped.
use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

/// The smallest RSA modulus accepted.
pub const MIN_RSA_BITS: usize = 2048;
/// The largest JWK set read (Supabase's holds a handful of keys, each well under 1 KiB).
pub const MAX_SET_BYTES: usize = 1 << 20;

/// One public key and the one algorithm it verifies.
pub struct VerifyKey {
    pub alg: Algorithm,
    pub key: DecodingKey,
    /// The JWK as published, to tell whether a new set holds the same keys.
    raw: Value,
}

/// Keys by `kid`.
#[derive(Default)]
pub struct KeySet {
    keys: HashMap<String, VerifyKey>,
}

/// A set as loaded: the usable keys, and why each other key was left out.
pub struct Loaded {
    pub set: KeySet,
    pub warnings: Vec<String>,
}

impl KeySet {
    /// Parses a JWK set (`{"keys": [...]}`). Fails only when the document is not a JWK set;
    /// keys that cannot be used are left out with a warning.
    pub fn parse(bytes: &[u8]) -> Result<Loaded, String> {
        if bytes.len() > MAX_SET_BYTES {
            return Err(format!(
                "the JWK set is {} bytes; at most {MAX_SET_BYTES} are read",
                bytes.len()
            ));
        }
        let doc: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        let list = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("not a JWK set: no \"keys\" array")?;
        let mut set = KeySet::default();
        let mut warnings = Vec::new();
        for (i, raw) in list.iter().enumerate() {
            let kid = raw.get("kid").and_then(Value::as_str).unwrap_or("");
            let name = match kid.is_empty() {
                true => format!("key #{i}"),
                false => format!("key {kid:?}"),
            };
            match usable(raw) {
                Ok(key) if set.keys.contains_key(kid) => {
                    drop(key);
                    warnings.push(format!("{name} left out: its kid is used twice in the set"));
                }
                Ok(key) => {
                    set.keys.insert(kid.to_owned(), key);
                }
                Err(why) => warnings.push(format!("{name} left out: {why}")),
            }
        }
        Ok(Loaded { set, warnings })
    }

    pub fn get(&self, kid: &str) -> Option<&VerifyKey> {
        self.keys.get(kid)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether `other` holds exactly these keys (a refetch that changed nothing).
    pub fn same_keys(&self, other: &KeySet) -> bool {
        self.keys.len() == other.keys.len()
            && self
                .keys
                .iter()
                .all(|(kid, k)| other.keys.get(kid).is_some_and(|o| o.raw == k.raw))
    }

    /// The kids, sorted (for logs and tests).
    pub fn kids(&self) -> Vec<&str> {
        let mut kids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        kids.sort_unstable();
        kids
    }
}

/// One key of a set, checked: a `kid`, a signing use, a public asymmetric key, and an
/// algorithm that fits its type.
fn usable(raw: &Value) -> Result<VerifyKey, String> {
    let jwk: Jwk = serde_json::from_value(raw.clone()).map_err(|e| format!("not a JWK: {e}"))?;
    if jwk.common.key_id.as_deref().unwrap_or("").is_empty() {
        return Err("it has no kid, so no token can name it".into());
    }
    if let Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_)) = &jwk.common.public_key_use {
        return Err("its use is not \"sig\"".into());
    }
    let inferred = match &jwk.algorithm {
        AlgorithmParameters::OctetKey(_) => {
            return Err(
                "a symmetric (oct) key: HS256 secrets come from JWT_SECRET and \
                 --jwt-previous-secret, never from a published set"
                    .into(),
            );
        }
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return Err(format!("curve {:?} is not supported", ec.curve)),
        },
        AlgorithmParameters::RSA(rsa) => {
            let bits = modulus_bits(&rsa.n)?;
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "an RSA key of {bits} bits; at least {MIN_RSA_BITS} are required"
                ));
            }
            Algorithm::RS256
        }
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => Algorithm::EdDSA,
            _ => return Err(format!("curve {:?} is not supported", okp.curve)),
        },
        _ => return Err("an unknown key type".into()),
    };
    let alg = match jwk.common.key_algorithm {
        None => inferred,
        Some(named) => fitting(named, inferred)?,
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("unreadable: {e}"))?;
    Ok(VerifyKey {
        alg,
        key,
        raw: raw.clone(),
    })
}

/// The key's own `alg`, if its type can be used with it.
fn fitting(named: KeyAlgorithm, inferred: Algorithm) -> Result<Algorithm, String> {
    let alg = match named {
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        other => {
            return Err(format!(
                "alg {other:?} is not a signature algorithm jobsvc verifies"
            ));
        }
    };
    let rsa = |a: Algorithm| {
        matches!(
            a,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
        )
    };
    match alg == inferred || (rsa(alg) && rsa(inferred)) {
        true => Ok(alg),
        false => Err(format!(
            "alg {alg:?} does not fit its key type ({inferred:?})"
        )),
    }
}

/// The size of an RSA modulus (`n`, base64url) in bits.
fn modulus_bits(n: &str) -> Result<usize, String> {
    let bytes = URL_SAFE_NO_PAD
        .decode(n.trim_end_matches('='))
        .map_err(|_| "its modulus is not base64url".to_string())?;
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    let significant = &bytes[first..];
    Ok(match significant.first() {
        None => 0,
        Some(top) => significant.len() * 8 - top.leading_zeros() as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rsa_jwk(kid: &str, modulus_bytes: usize) -> Value {
        let mut n = vec![0xc5u8; modulus_bytes];
        n[modulus_bytes - 1] = 0x01;
        serde_json::json!({"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig",
            "n": URL_SAFE_NO_PAD.encode(&n), "e": "AQAB"})
    }

    #[test]
    fn weak_symmetric_and_mismatched_keys_are_left_out_with_a_reason() {
        let set = serde_json::json!({"keys": [
            rsa_jwk("weak", 128),
            rsa_jwk("strong", 256),
            {"kty": "oct", "kid": "shared", "k": "c2VjcmV0"},
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "alg": "ES256",
             "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty": "OKP", "crv": "Ed25519",
             "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed-ok",
             "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
        ]});
        let loaded = KeySet::parse(set.to_string().as_bytes()).unwrap();
        assert_eq!(loaded.set.kids(), vec!["ed-ok", "strong"]);
        assert_eq!(loaded.set.get("ed-ok").unwrap().alg, Algorithm::EdDSA);
        assert_eq!(loaded.set.get("strong").unwrap().alg, Algorithm::RS256);
        let all = loaded.warnings.join("\n");
        assert!(
            all.contains("\"weak\" left out: an RSA key of 1024 bits"),
            "{all}"
        );
        assert!(all.contains("\"shared\" left out: a symmetric"), "{all}");
        assert!(
            all.contains("\"ed\" left out: alg ES256 does not fit"),
            "{all}"
        );
        assert!(all.contains("key #4 left out: it has no kid"), "{all}");
    }

    #[test]
    fn a_document_that_is_not_a_set_is_an_error() {
        assert!(KeySet::parse(b"{}").is_err());
        assert!(KeySet::parse(b"not json").is_err());
        assert!(KeySet::parse(br#"{"keys": []}"#).unwrap().set.is_empty());
    }
}
