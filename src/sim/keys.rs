//! Registered API keys: what a key registration carries, how key files are read (PEM public
//! key, JWK, or the website's key bundle), and the per-key identity (`sub`, `uid`, org) that
//! access tokens carry.
//!
//! Pure data and parsing; the registry itself lives in `state::SimState` behind its mutex.

use std::path::Path;

use p256::ecdsa::VerifyingKey;
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use super::error::SimError;
use crate::jose::{self, is_uuid};

/// A public key to register under an API `key_id`, with the identity its tokens carry.
#[derive(Clone)]
pub struct KeyRegistration {
    /// The API key id (a UUID), as clients send it in `key_id`.
    pub key_id: String,
    /// The P-256 public key that verifies the key's challenge signatures.
    pub public_key: VerifyingKey,
    /// Set for organization keys: access tokens then carry `tm.organization_id`.
    pub org_id: Option<String>,
    /// The token `sub`; default `apikey-<first 8 of key_id>@sim.truemarkets.local`.
    pub sub: Option<String>,
    /// The token `uid`; default a UUID derived from the key id (stable across restarts).
    pub uid: Option<String>,
}

impl std::fmt::Debug for KeyRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRegistration")
            .field("key_id", &self.key_id)
            .field(
                "public_key",
                &jose::public_key_compressed_hex(&self.public_key),
            )
            .field("org_id", &self.org_id)
            .finish()
    }
}

impl KeyRegistration {
    /// A personal (non-organization) key.
    pub fn new(key_id: impl Into<String>, public_key: VerifyingKey) -> Self {
        KeyRegistration {
            key_id: key_id.into(),
            public_key,
            org_id: None,
            sub: None,
            uid: None,
        }
    }

    /// Marks the key as an organization key.
    pub fn with_org(mut self, org_id: impl Into<String>) -> Self {
        self.org_id = Some(org_id.into());
        self
    }

    /// Parses key material: a PEM public key (SPKI), a JWK (JSON object), SEC1 hex, or the
    /// website's key bundle JSON (whose own `key_id` is used when `key_id` is `None`; if
    /// both are given they must agree). Only the public part of a bundle is kept.
    pub fn from_text(key_id: Option<&str>, text: &str) -> Result<Self, SimError> {
        let trimmed = text.trim();
        let (bundle_id, vk) = if trimmed.starts_with('{') && is_bundle(trimmed) {
            let bundle = jose::parse_key_bundle(trimmed)
                .map_err(|e| SimError::Registration(e.to_string()))?;
            (Some(bundle.key_id.clone()), bundle.verifying_key())
        } else {
            let vk = jose::parse_public_key(trimmed)
                .map_err(|e| SimError::Registration(e.to_string()))?;
            (None, vk)
        };
        let key_id = match (key_id, bundle_id) {
            (Some(given), Some(inside)) if !given.eq_ignore_ascii_case(&inside) => {
                return Err(SimError::Registration(format!(
                    "key_id {given} does not match the bundle's key_id {inside}"
                )))
            }
            (Some(given), _) => given.to_string(),
            (None, Some(inside)) => inside,
            (None, None) => {
                return Err(SimError::Registration(
                    "a key_id is needed (only a key bundle carries its own)".into(),
                ))
            }
        };
        if !is_uuid(&key_id) {
            return Err(SimError::Registration(format!(
                "key_id {key_id:?} is not a UUID"
            )));
        }
        Ok(KeyRegistration::new(key_id, vk))
    }

    /// Reads a key file (see [`KeyRegistration::from_text`]).
    pub fn from_file(key_id: Option<&str>, path: &Path) -> Result<Self, SimError> {
        let text = std::fs::read_to_string(path).map_err(|source| SimError::ReadKey {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_text(key_id, &text)
    }
}

fn is_bundle(json: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(json)
        .map(|v| v.get("private_key").is_some())
        .unwrap_or(false)
}

/// What the simulator knows about a registered key (no key material beyond the public JWK
/// thumbprint).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegisteredKeyInfo {
    pub key_id: String,
    pub sub: String,
    pub uid: String,
    pub org_id: Option<String>,
    pub revoked: bool,
    /// RFC 7638 thumbprint of the registered public key.
    pub thumbprint: String,
}

/// A key in the registry.
#[derive(Clone)]
pub(crate) struct RegisteredKey {
    pub info: RegisteredKeyInfo,
    pub public_key: VerifyingKey,
}

impl RegisteredKey {
    pub(crate) fn from_registration(reg: KeyRegistration) -> Result<Self, SimError> {
        if !is_uuid(&reg.key_id) {
            return Err(SimError::Registration(format!(
                "key_id {:?} is not a UUID",
                reg.key_id
            )));
        }
        let key_id = reg.key_id.to_ascii_lowercase();
        let sub = reg.sub.unwrap_or_else(|| default_sub(&key_id));
        let uid = reg.uid.unwrap_or_else(|| derived_uuid("uid", &key_id));
        if let Some(org) = &reg.org_id {
            if org.trim().is_empty() {
                return Err(SimError::Registration("org_id is empty".into()));
            }
        }
        Ok(RegisteredKey {
            info: RegisteredKeyInfo {
                thumbprint: jose::Jwk::from_verifying_key(&reg.public_key).thumbprint(),
                key_id,
                sub,
                uid,
                org_id: reg.org_id,
                revoked: false,
            },
            public_key: reg.public_key,
        })
    }
}

fn default_sub(key_id: &str) -> String {
    let short: String = key_id.chars().take(8).collect();
    format!("apikey-{short}@sim.truemarkets.local")
}

/// A stable UUID (version 4 layout) derived from `label` and `input`.
fn derived_uuid(label: &str, input: &str) -> String {
    let digest = Sha256::digest(format!("{label}:{input}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    format_uuid(bytes)
}

/// A random UUID v4.
pub(crate) fn random_uuid() -> String {
    format_uuid(rand::random::<[u8; 16]>())
}

fn format_uuid(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;

    const KID: &str = "0b9b3f3e-8d4c-4c1e-9f1a-2b3c4d5e6f70";

    fn vk() -> VerifyingKey {
        *SigningKey::from_slice(&[3u8; 32]).unwrap().verifying_key()
    }

    #[test]
    fn random_uuids_have_the_shape() {
        assert!(is_uuid(&random_uuid()));
    }

    #[test]
    fn parses_pem_jwk_and_bundle() {
        let pem = jose::public_key_pem(&vk());
        assert_eq!(
            KeyRegistration::from_text(Some(KID), &pem)
                .unwrap()
                .public_key,
            vk()
        );
        let jwk = serde_json::to_string(&jose::Jwk::from_verifying_key(&vk())).unwrap();
        assert_eq!(
            KeyRegistration::from_text(Some(KID), &jwk)
                .unwrap()
                .public_key,
            vk()
        );
        let sk = SigningKey::from_slice(&[3u8; 32]).unwrap();
        let j = jose::Jwk::from_verifying_key(&vk());
        let bundle = serde_json::json!({"key_id": KID, "private_key": {
            "kty": "EC", "crv": "P-256", "x": j.x, "y": j.y, "d": jose::b64url(&sk.to_bytes())}})
        .to_string();
        let reg = KeyRegistration::from_text(None, &bundle).unwrap();
        assert_eq!(reg.key_id, KID);
        assert_eq!(reg.public_key, vk());
        let other = "11111111-2222-4333-8444-555555555555";
        assert!(KeyRegistration::from_text(Some(other), &bundle).is_err());
        assert!(KeyRegistration::from_text(None, &pem).is_err());
        assert!(KeyRegistration::from_text(Some("nope"), &pem).is_err());
    }

    #[test]
    fn identity_defaults_are_stable() {
        let a = RegisteredKey::from_registration(KeyRegistration::new(KID, vk())).unwrap();
        let b = RegisteredKey::from_registration(KeyRegistration::new(KID, vk())).unwrap();
        assert_eq!(a.info.uid, b.info.uid);
        assert!(is_uuid(&a.info.uid));
        assert!(a.info.sub.contains('@'));
        assert_eq!(a.info.org_id, None);
    }
}
