//! Signing tokens with a private key (for `jobsvc token`, tests and development): ES256,
//! RS256 or EdDSA, from a PEM (PKCS#8, or PKCS#1 for RSA) or a private JWK, with the key's
//! `kid` in the header; and the public JWK set a server verifies them with.
//!
//! jsonwebtoken reads PEM and DER but not private JWKs, so a private JWK is turned into the
//! DER it reads here: a fixed PKCS#8 frame around the key for P-256 and Ed25519, and a
//! PKCS#1 sequence of integers for RSA. That is the whole of the ASN.1 this needs, so it is
//! written out rather than taken from an ASN.1 crate.
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::Value;

/// A private key ready to sign, with its algorithm and kid.
pub struct SigningKey {
    pub alg: Algorithm,
    pub kid: String,
    key: EncodingKey,
}

impl SigningKey {
    /// Reads a PEM or a private JWK. The algorithm is the key's: ES256 for P-256, RS256 for
    /// RSA, EdDSA for Ed25519. `kid` overrides the JWK's own; a PEM needs one.
    pub fn parse(text: &str, kid: Option<&str>) -> Result<SigningKey, String> {
        let text = text.trim();
        let (alg, key, own_kid) = match text.starts_with('{') {
            true => from_jwk(text)?,
            false => from_pem(text.as_bytes())?,
        };
        let kid = kid
            .map(str::to_owned)
            .or(own_kid)
            .ok_or("a PEM key needs --kid (the id the JWK set publishes it under)")?;
        Ok(SigningKey { alg, kid, key })
    }

    /// Signs `claims` with the key's algorithm and kid.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key)
            .expect("signing with a key that was read and checked cannot fail")
    }

    /// The public half, as a JWK set a server can load with --jwks-file.
    pub fn public_set(&self) -> Result<JwkSet, String> {
        let mut jwk = Jwk::from_encoding_key(&self.key, self.alg)
            .map_err(|e| format!("cannot derive the public key: {e}"))?;
        jwk.common.key_id = Some(self.kid.clone());
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        jwk.common.key_algorithm = Some(match self.alg {
            Algorithm::ES256 => KeyAlgorithm::ES256,
            Algorithm::RS256 => KeyAlgorithm::RS256,
            _ => KeyAlgorithm::EdDSA,
        });
        Ok(JwkSet { keys: vec![jwk] })
    }
}

fn from_pem(pem: &[u8]) -> Result<(Algorithm, EncodingKey, Option<String>), String> {
    if let Ok(key) = EncodingKey::from_ec_pem(pem) {
        return Ok((Algorithm::ES256, key, None));
    }
    if let Ok(key) = EncodingKey::from_ed_pem(pem) {
        return Ok((Algorithm::EdDSA, ed25519_v1(key), None));
    }
    if let Ok(key) = EncodingKey::from_rsa_pem(pem) {
        return Ok((Algorithm::RS256, key, None));
    }
    Err(
        "not a private key jobsvc can sign with: a PEM of a P-256, Ed25519 or RSA private key \
         (PKCS#8, or PKCS#1 for RSA), or a private JWK"
            .into(),
    )
}

fn from_jwk(text: &str) -> Result<(Algorithm, EncodingKey, Option<String>), String> {
    let jwk: Value = serde_json::from_str(text).map_err(|e| format!("not a JWK: {e}"))?;
    let field = |name: &str| -> Result<Vec<u8>, String> {
        let v = jwk
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("the JWK has no {name:?} (a private JWK is needed)"))?;
        URL_SAFE_NO_PAD
            .decode(v.trim_end_matches('='))
            .map_err(|_| format!("the JWK's {name:?} is not base64url"))
    };
    let kid = jwk.get("kid").and_then(Value::as_str).map(str::to_owned);
    let kty = jwk.get("kty").and_then(Value::as_str).unwrap_or("");
    let crv = jwk.get("crv").and_then(Value::as_str).unwrap_or("");
    let (alg, key) = match (kty, crv) {
        ("EC", "P-256") => {
            let (d, x, y) = (field("d")?, field("x")?, field("y")?);
            if d.len() != 32 || x.len() != 32 || y.len() != 32 {
                return Err("a P-256 JWK's d, x and y are 32 bytes each".into());
            }
            // PKCS#8 PrivateKeyInfo { v1, ecPublicKey/prime256v1, ECPrivateKey { 1, d, [1] pub } }
            let mut der = hex_bytes(
                "308187020100301306072a8648ce3d020106082a8648ce3d030107046d306b0201010420",
            );
            der.extend_from_slice(&d);
            der.extend_from_slice(&hex_bytes("a14403420004"));
            der.extend_from_slice(&x);
            der.extend_from_slice(&y);
            (Algorithm::ES256, EncodingKey::from_ec_der(&der))
        }
        ("OKP", "Ed25519") => {
            let d = field("d")?;
            if d.len() != 32 {
                return Err("an Ed25519 JWK's d is 32 bytes".into());
            }
            // PKCS#8 PrivateKeyInfo { v0, Ed25519, OCTET STRING { OCTET STRING d } }
            let mut der = hex_bytes(ED25519_V1);
            der.extend_from_slice(&d);
            (Algorithm::EdDSA, EncodingKey::from_ed_der(&der))
        }
        ("RSA", _) => {
            // PKCS#1 RSAPrivateKey ::= SEQUENCE { 0, n, e, d, p, q, dp, dq, qi }
            let mut body = der_integer(&[0]);
            for name in ["n", "e", "d", "p", "q", "dp", "dq", "qi"] {
                body.extend(der_integer(&field(name)?));
            }
            let mut der = vec![0x30];
            der.extend(der_length(body.len()));
            der.extend(body);
            (Algorithm::RS256, EncodingKey::from_rsa_der(&der))
        }
        _ => {
            return Err(format!(
                "a JWK of kty {kty:?} crv {crv:?}: jobsvc signs with EC P-256, OKP Ed25519 or RSA"
            ));
        }
    };
    // A key that cannot sign fails here, with a message, not at the first token.
    let probe = jsonwebtoken::encode(&Header::new(alg), &serde_json::json!({}), &key);
    probe.map_err(|e| format!("the JWK is not a usable private key: {e}"))?;
    Ok((alg, key, kid))
}

/// The PKCS#8 frame of an Ed25519 seed (version 1, no public key).
const ED25519_V1: &str = "302e020100300506032b657004220420";

/// An Ed25519 key in PKCS#8 version 1. OpenSSL and aws-lc also write version 2 (the public key
/// appended), which signs the same but from which jsonwebtoken cannot derive the public JWK;
/// the seed sits at the same place in both.
fn ed25519_v1(key: EncodingKey) -> EncodingKey {
    let der = key.as_bytes();
    let v2_head = hex_bytes("020101300506032b657004220420");
    if der.len() > 48 && der.get(2..16) == Some(&v2_head[..]) {
        let mut v1 = hex_bytes(ED25519_V1);
        v1.extend_from_slice(&der[16..48]);
        return EncodingKey::from_ed_der(&v1);
    }
    key
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("a constant of hex digits"))
        .collect()
}

/// A DER INTEGER of an unsigned big-endian number.
fn der_integer(bytes: &[u8]) -> Vec<u8> {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    let mut value = bytes[start..].to_vec();
    if value.first().is_none_or(|b| b & 0x80 != 0) {
        value.insert(0, 0);
    }
    let mut out = vec![0x02];
    out.extend(der_length(value.len()));
    out.extend(value);
    out
}

fn der_length(len: usize) -> Vec<u8> {
    match len {
        0..0x80 => vec![len as u8],
        _ => {
            let bytes: Vec<u8> = len
                .to_be_bytes()
                .into_iter()
                .skip_while(|b| *b == 0)
                .collect();
            let mut out = vec![0x80 | bytes.len() as u8];
            out.extend(bytes);
            out
        }
    }
}
