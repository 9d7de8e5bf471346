//! Token issuance: the ES256 issuer keys (the published key set with rotation and grace),
//! the foreign key used to sign tokens the JWKS cannot verify, and compact JWT signing and
//! checking.
//!
//! Plain data owned by `state::SimState` and mutated only under its lock; the functions
//! themselves are pure. Private keys never leave this module except as signatures.

use std::time::{Duration, Instant};

use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use serde_json::Value;

use crate::jose::{self, Jwk};

/// An ES256 key the simulator signs with; `kid` is its RFC 7638 thumbprint.
pub(crate) struct IssuerKey {
    pub kid: String,
    key: SigningKey,
}

impl IssuerKey {
    pub(crate) fn generate() -> Self {
        let key = SigningKey::random(&mut rand::rngs::OsRng);
        let kid = Jwk::from_verifying_key(key.verifying_key()).thumbprint();
        IssuerKey { kid, key }
    }

    pub(crate) fn verifying_key(&self) -> VerifyingKey {
        *self.key.verifying_key()
    }

    /// The public JWK as published: kty, crv, x, y, kid, alg ES256, use sig.
    pub(crate) fn jwk(&self) -> Jwk {
        let mut jwk = Jwk::from_verifying_key(self.key.verifying_key());
        jwk.kid = Some(self.kid.clone());
        jwk.alg = Some("ES256".into());
        jwk.use_ = Some("sig".into());
        jwk
    }

    /// Signs `claims` as a compact JWT with header `{alg: ES256, typ: JWT, kid}`.
    /// `kid` is normally `self.kid`; the foreign-key mode may borrow the published one.
    pub(crate) fn sign_jwt(&self, kid: &str, claims: &Value) -> String {
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": kid});
        let signing_input = format!(
            "{}.{}",
            jose::b64url(header.to_string().as_bytes()),
            jose::b64url(claims.to_string().as_bytes())
        );
        let sig: Signature = self.key.sign(signing_input.as_bytes());
        format!("{signing_input}.{}", jose::b64url(&sig.to_bytes()))
    }
}

/// Checks a compact JWT's ES256 signature with `key` and returns its header and claims.
pub(crate) fn verify_jwt(key: &VerifyingKey, token: &str) -> Option<(Value, Value)> {
    let mut parts = token.split('.');
    let (h, c, s) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let sig = Signature::from_slice(&jose::b64url_decode(s).ok()?).ok()?;
    key.verify(format!("{h}.{c}").as_bytes(), &sig).ok()?;
    let header = serde_json::from_slice(&jose::b64url_decode(h).ok()?).ok()?;
    let claims = serde_json::from_slice(&jose::b64url_decode(c).ok()?).ok()?;
    Some((header, claims))
}

/// The access-token signing keys: the current one plus retired ones still published until
/// their grace period ends (measured on the monotonic clock, unaffected by clock offset).
pub(crate) struct KeySet {
    current: IssuerKey,
    retired: Vec<(IssuerKey, Instant)>,
}

impl KeySet {
    pub(crate) fn new() -> Self {
        KeySet {
            current: IssuerKey::generate(),
            retired: Vec::new(),
        }
    }

    pub(crate) fn current(&self) -> &IssuerKey {
        &self.current
    }

    /// Makes a fresh key current; the old one stays published for `grace`.
    /// Returns (new kid, previous kid).
    pub(crate) fn rotate(&mut self, grace: Duration, now: Instant) -> (String, String) {
        let old = std::mem::replace(&mut self.current, IssuerKey::generate());
        let previous = old.kid.clone();
        self.retired.push((old, now + grace));
        self.prune(now);
        (self.current.kid.clone(), previous)
    }

    fn prune(&mut self, now: Instant) {
        self.retired.retain(|(_, until)| *until > now);
    }

    /// The published keys, current first.
    pub(crate) fn published(&mut self, now: Instant) -> Vec<Jwk> {
        self.prune(now);
        std::iter::once(&self.current)
            .chain(self.retired.iter().map(|(k, _)| k))
            .map(IssuerKey::jwk)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_round_trip_and_tamper() {
        let k = IssuerKey::generate();
        let t = k.sign_jwt(&k.kid, &serde_json::json!({"sub": "a"}));
        let (h, c) = verify_jwt(&k.verifying_key(), &t).unwrap();
        assert_eq!(h["kid"], k.kid.as_str());
        assert_eq!(h["alg"], "ES256");
        assert_eq!(c["sub"], "a");
        let other = IssuerKey::generate();
        assert!(verify_jwt(&other.verifying_key(), &t).is_none());
        assert!(verify_jwt(&k.verifying_key(), &format!("{t}.x")).is_none());
    }

    #[test]
    fn rotation_keeps_old_key_for_grace() {
        let mut ks = KeySet::new();
        let t0 = Instant::now();
        let (new, old) = ks.rotate(Duration::from_secs(60), t0);
        assert_ne!(new, old);
        let kids: Vec<_> = ks.published(t0).into_iter().filter_map(|j| j.kid).collect();
        assert_eq!(kids, vec![new.clone(), old.clone()]);
        let later = t0 + Duration::from_secs(61);
        let kids: Vec<_> = ks
            .published(later)
            .into_iter()
            .filter_map(|j| j.kid)
            .collect();
        assert_eq!(kids, vec![new]);
    }
}
