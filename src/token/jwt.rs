//! JWT (JWS compact) parsing and ES256 verification against a JWKS.
//!
//! Owns: splitting `header.payload.signature`, the header and claims the agent reads
//! (`alg`, `kid`, `exp`, `iss`), the set of verifying keys by `kid` built from a JWKS, and
//! the ES256 check (SHA-256 + raw `r || s` over `header.payload`, with p256 directly).
//!
//! Pure and synchronous: no I/O, no clocks (callers pass "now"). Errors never quote the
//! token or its signature.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use p256::ecdsa::signature::hazmat::PrehashVerifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use serde::Deserialize;

use crate::jose;

/// Why a token was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("access token is not a JWS compact token: {0}")]
    Malformed(&'static str),
    #[error("access token alg {0:?} is not ES256")]
    UnsupportedAlg(String),
    #[error("access token header has no kid")]
    MissingKid,
    #[error("access token kid {0:?} is not in the JWKS")]
    UnknownKid(String),
    #[error("access token signature does not verify with JWKS key {0:?}")]
    BadSignature(String),
    #[error("access token has no numeric exp claim")]
    MissingExp,
    #[error("access token exp claim is out of range")]
    InvalidExp,
    #[error("access token expired (exp is {0} s in the past on the server clock)")]
    Expired(u64),
    #[error("access token iss {found:?} is not the configured issuer {expected:?}")]
    WrongIssuer {
        expected: String,
        found: Option<String>,
    },
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

#[derive(Deserialize)]
struct RawClaims {
    #[serde(default)]
    exp: Option<f64>,
    /// Not required; any value that is not a usable number is ignored.
    #[serde(default)]
    iat: Option<serde_json::Value>,
    #[serde(default)]
    iss: Option<String>,
}

/// A parsed, not yet verified token.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub kid: String,
    /// `exp` on the server's clock.
    pub exp: SystemTime,
    /// `iat` on the server's clock, when the token has a usable one.
    pub iat: Option<SystemTime>,
    pub iss: Option<String>,
    signing_input_digest: [u8; 32],
    signature: Signature,
}

/// Parses a compact JWS, insisting on ES256, a `kid` and a numeric `exp`.
pub fn parse(token: &str) -> Result<Parsed, JwtError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("expected three dot-separated parts"));
    };
    let header_bytes =
        jose::b64url_decode(h).map_err(|_| JwtError::Malformed("header is not base64url"))?;
    let header: Header = serde_json::from_slice(&header_bytes)
        .map_err(|_| JwtError::Malformed("header is not a JSON object with alg"))?;
    if header.alg != "ES256" {
        return Err(JwtError::UnsupportedAlg(
            header.alg.chars().take(16).collect(),
        ));
    }
    let kid = header
        .kid
        .filter(|k| !k.is_empty())
        .ok_or(JwtError::MissingKid)?;
    let payload_bytes =
        jose::b64url_decode(p).map_err(|_| JwtError::Malformed("payload is not base64url"))?;
    let claims: RawClaims = serde_json::from_slice(&payload_bytes)
        .map_err(|_| JwtError::Malformed("payload is not a JSON object"))?;
    // `exp` is read before the signature is checked, so it is attacker-controlled here:
    // any value must give an error, never a panic.
    let exp = claims.exp.ok_or(JwtError::MissingExp)?;
    let exp = unix_time(exp).ok_or(JwtError::InvalidExp)?;
    let iat = claims
        .iat
        .as_ref()
        .and_then(serde_json::Value::as_f64)
        .and_then(unix_time);
    let raw_sig =
        jose::b64url_decode(s).map_err(|_| JwtError::Malformed("signature is not base64url"))?;
    let signature = jose::signature_from_raw(&raw_sig)
        .map_err(|_| JwtError::Malformed("signature is not 64 bytes r || s"))?;
    let signing_input = &token[..h.len() + 1 + p.len()];
    Ok(Parsed {
        kid,
        exp,
        iat,
        iss: claims.iss,
        signing_input_digest: jose::sha256(signing_input.as_bytes()),
        signature,
    })
}

/// Unix seconds as a time; None for what no time is (negative, NaN, beyond the clock).
fn unix_time(secs: f64) -> Option<SystemTime> {
    Duration::try_from_secs_f64(secs)
        .ok()
        .and_then(|d| SystemTime::UNIX_EPOCH.checked_add(d))
}

/// Verifying keys by `kid`: the usable (EC P-256, ES256 or unspecified alg, `sig` or
/// unspecified use) keys of a JWKS.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, VerifyingKey>,
}

impl KeySet {
    /// Builds the set; keys without a `kid` or of another kind are ignored.
    pub fn from_jwks(jwks: &[jose::Jwk]) -> KeySet {
        let keys = jwks
            .iter()
            .filter(|k| k.alg.as_deref().is_none_or(|a| a == "ES256"))
            .filter(|k| k.use_.as_deref().is_none_or(|u| u == "sig"))
            .filter_map(|k| {
                let kid = k.kid.clone().filter(|kid| !kid.is_empty())?;
                Some((kid, k.to_verifying_key().ok()?))
            })
            .collect();
        KeySet { keys }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// Checks the signature with the key named by `kid`, then `exp` against `server_now`
    /// and `iss` against `issuer` when one is configured.
    pub fn verify(
        &self,
        token: &Parsed,
        server_now: SystemTime,
        issuer: Option<&str>,
    ) -> Result<(), JwtError> {
        let key = self
            .keys
            .get(&token.kid)
            .ok_or_else(|| JwtError::UnknownKid(token.kid.chars().take(64).collect()))?;
        // ES256 = ECDSA P-256 over SHA-256(signing input), computed once in `parse`.
        key.verify_prehash(&token.signing_input_digest, &token.signature)
            .map_err(|_| JwtError::BadSignature(token.kid.chars().take(64).collect()))?;
        if token.exp <= server_now {
            let past = server_now
                .duration_since(token.exp)
                .unwrap_or_default()
                .as_secs();
            return Err(JwtError::Expired(past));
        }
        if let Some(expected) = issuer {
            if token.iss.as_deref() != Some(expected) {
                return Err(JwtError::WrongIssuer {
                    expected: expected.to_string(),
                    found: token.iss.as_ref().map(|s| s.chars().take(64).collect()),
                });
            }
        }
        Ok(())
    }
}

/// Test helper: an ES256 JWT signed with `key` (also used by the token manager's tests).
#[cfg(test)]
pub fn sign_for_test(
    key: &p256::ecdsa::SigningKey,
    kid: &str,
    claims: &serde_json::Value,
) -> String {
    use p256::ecdsa::signature::Signer as _;
    let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": kid});
    let input = format!(
        "{}.{}",
        jose::b64url(header.to_string().as_bytes()),
        jose::b64url(claims.to_string().as_bytes())
    );
    let sig: Signature = key.sign(input.as_bytes());
    format!("{input}.{}", jose::encode_es256(&sig))
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_slice(&[n; 32]).unwrap()
    }

    fn jwk(k: &SigningKey, kid: &str) -> jose::Jwk {
        let mut j = jose::Jwk::from_verifying_key(k.verifying_key());
        j.kid = Some(kid.into());
        j.alg = Some("ES256".into());
        j
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn verifies_es256_with_kid_exp_and_issuer() {
        let k = key(5);
        let set = KeySet::from_jwks(&[jwk(&k, "a")]);
        let t = sign_for_test(
            &k,
            "a",
            &serde_json::json!({"exp": 2000, "iss": "tm", "sub": "x"}),
        );
        let p = parse(&t).unwrap();
        assert_eq!(p.exp, at(2000));
        set.verify(&p, at(1000), Some("tm")).unwrap();
        set.verify(&p, at(1000), None).unwrap();
        assert!(matches!(
            set.verify(&p, at(1000), Some("other")),
            Err(JwtError::WrongIssuer { .. })
        ));
        assert_eq!(set.verify(&p, at(2001), None), Err(JwtError::Expired(1)));
    }

    #[test]
    fn rejects_foreign_key_unknown_kid_and_tampering() {
        let good = key(5);
        let foreign = key(6);
        let set = KeySet::from_jwks(&[jwk(&good, "a")]);
        let claims = serde_json::json!({"exp": 2000});
        let forged = parse(&sign_for_test(&foreign, "a", &claims)).unwrap();
        assert!(matches!(
            set.verify(&forged, at(1), None),
            Err(JwtError::BadSignature(_))
        ));
        let unknown = parse(&sign_for_test(&good, "b", &claims)).unwrap();
        assert_eq!(
            set.verify(&unknown, at(1), None),
            Err(JwtError::UnknownKid("b".into()))
        );
        // Change the payload, keep the signature.
        let t = sign_for_test(&good, "a", &claims);
        let mut parts: Vec<&str> = t.split('.').collect();
        let other = jose::b64url(br#"{"exp":9999}"#);
        parts[1] = &other;
        let tampered = parse(&parts.join(".")).unwrap();
        assert!(matches!(
            set.verify(&tampered, at(1), None),
            Err(JwtError::BadSignature(_))
        ));
    }

    #[test]
    fn parse_rejections() {
        let k = key(5);
        assert!(matches!(parse("a.b"), Err(JwtError::Malformed(_))));
        assert!(matches!(parse("a.b.c.d"), Err(JwtError::Malformed(_))));
        let none_alg = format!(
            "{}.{}.",
            jose::b64url(br#"{"alg":"none","kid":"a"}"#),
            jose::b64url(br#"{"exp":5}"#)
        );
        assert!(matches!(parse(&none_alg), Err(JwtError::UnsupportedAlg(_))));
        let hs = format!(
            "{}.{}.AAAA",
            jose::b64url(br#"{"alg":"HS256","kid":"a"}"#),
            jose::b64url(br#"{"exp":5}"#)
        );
        assert!(matches!(parse(&hs), Err(JwtError::UnsupportedAlg(_))));
        let no_kid = {
            use p256::ecdsa::signature::Signer as _;
            let input = format!(
                "{}.{}",
                jose::b64url(br#"{"alg":"ES256"}"#),
                jose::b64url(br#"{"exp":5}"#)
            );
            let sig: Signature = k.sign(input.as_bytes());
            format!("{input}.{}", jose::encode_es256(&sig))
        };
        assert_eq!(parse(&no_kid).unwrap_err(), JwtError::MissingKid);
        let no_exp = sign_for_test(&k, "a", &serde_json::json!({"sub": "x"}));
        assert_eq!(parse(&no_exp).unwrap_err(), JwtError::MissingExp);
    }

    #[test]
    fn out_of_range_exp_is_rejected_without_panicking() {
        let k = key(5);
        // 1e300 once panicked in Duration::from_secs_f64, before the signature check.
        for exp in [
            serde_json::json!(1e300),
            serde_json::json!(f64::MAX),
            serde_json::json!(1.8446744073709552e19),
            serde_json::json!(u64::MAX),
            serde_json::json!(-1),
            serde_json::json!(-1e300),
        ] {
            let t = sign_for_test(&k, "a", &serde_json::json!({ "exp": exp }));
            assert_eq!(parse(&t).unwrap_err(), JwtError::InvalidExp, "exp {exp}");
        }
        // Unsigned garbage gets the same answer: nothing is trusted before verification.
        let forged = format!(
            "{}.{}.AAAA",
            jose::b64url(br#"{"alg":"ES256","kid":"a"}"#),
            jose::b64url(br#"{"exp":1e300}"#)
        );
        assert_eq!(parse(&forged).unwrap_err(), JwtError::InvalidExp);
    }

    #[test]
    fn keyset_skips_unusable_keys() {
        let k = key(5);
        let mut rs = jwk(&k, "rs");
        rs.alg = Some("RS256".into());
        let mut enc = jwk(&k, "enc");
        enc.use_ = Some("enc".into());
        let mut nokid = jwk(&k, "");
        nokid.kid = None;
        let set = KeySet::from_jwks(&[rs, enc, nokid, jwk(&k, "ok")]);
        assert_eq!(set.len(), 1);
        assert!(set.contains("ok"));
    }
}
