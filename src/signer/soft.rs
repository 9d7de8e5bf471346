//! The `soft` backend: a software key from the website's key bundle or a PEM file.
//!
//! For development and for migrating a key into hardware only: the key sits in this
//! process's memory, which is exactly what tm-agent exists to avoid, so opening one logs a
//! loud warning. Each worker holds its own copy of the key (zeroized on drop by `p256`).

use std::path::Path;

use p256::ecdsa::signature::hazmat::PrehashSigner as _;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::DecodePrivateKey as _;
use zeroize::Zeroizing;

use super::{KeyInfo, Signer, SignerError};
use crate::jose;

/// A software signing worker.
pub struct SoftSigner {
    key: SigningKey,
}

impl Signer for SoftSigner {
    fn sign_digest(&mut self, digest: &[u8; 32]) -> Result<Signature, SignerError> {
        sign_prehash(&self.key, digest)
    }
}

/// Signs a SHA-256 digest with a software key.
pub fn sign_prehash(key: &SigningKey, digest: &[u8; 32]) -> Result<Signature, SignerError> {
    key.sign_prehash(digest)
        .map_err(|e| SignerError::Open(format!("software signing failed: {e}")))
}

/// Loads a software key from `path`: the website's JSON key bundle, a PKCS#8 PEM
/// (`BEGIN PRIVATE KEY`) or a SEC1 PEM (`BEGIN EC PRIVATE KEY`).
pub fn load_key(path: &Path) -> Result<SigningKey, SignerError> {
    let text =
        Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            SignerError::Open(format!("cannot read key file {}: {e}", path.display()))
        })?);
    parse_key(&text).map_err(|why| SignerError::Open(format!("{}: {why}", path.display())))
}

fn parse_key(text: &str) -> Result<SigningKey, String> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') {
        let bundle = jose::parse_key_bundle(trimmed).map_err(|e| e.to_string())?;
        return Ok(SigningKey::from(&bundle.secret));
    }
    if trimmed.contains("BEGIN PRIVATE KEY") {
        return SigningKey::from_pkcs8_pem(trimmed)
            .map_err(|_| "not a P-256 PKCS#8 private key".to_string());
    }
    if trimmed.contains("BEGIN EC PRIVATE KEY") {
        return p256::SecretKey::from_sec1_pem(trimmed)
            .map(|sk| SigningKey::from(&sk))
            .map_err(|_| "not a P-256 SEC1 private key".to_string());
    }
    Err("expected a key bundle JSON, a PKCS#8 PEM or an EC PRIVATE KEY PEM".into())
}

/// The workers and key description for a software key, `workers` copies of it.
pub fn open(key: SigningKey, location: String, workers: usize) -> (KeyInfo, Vec<Box<dyn Signer>>) {
    tracing::warn!(
        key = %location,
        "SOFTWARE KEY: this key is NOT hardware-backed; its private key is in tm-agent's memory. \
         Use it only for development or to migrate the key into an HSM or YubiKey."
    );
    let info = KeyInfo {
        backend: "soft",
        location,
        hardware_backed: false,
        public_key: *key.verifying_key(),
    };
    let workers = (0..workers.max(1))
        .map(|_| Box::new(SoftSigner { key: key.clone() }) as Box<dyn Signer>)
        .collect();
    (info, workers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::pkcs8::{EncodePrivateKey as _, LineEnding};

    #[test]
    fn parses_pkcs8_sec1_and_bundle() {
        let sk = SigningKey::from_slice(&[5u8; 32]).unwrap();
        let pkcs8 = sk.to_pkcs8_pem(LineEnding::LF).unwrap();
        assert_eq!(parse_key(&pkcs8).unwrap(), sk);
        let sec1 = p256::SecretKey::from(&sk)
            .to_sec1_pem(LineEnding::LF)
            .unwrap();
        assert_eq!(parse_key(&sec1).unwrap(), sk);
        let jwk = jose::Jwk::from_verifying_key(sk.verifying_key());
        let bundle = serde_json::json!({
            "key_id": "0b9b3f3e-8d4c-4c1e-9f1a-2b3c4d5e6f70", "private_key": {"kty": "EC", "crv": "P-256", "x": jwk.x, "y": jwk.y,
            "d": jose::b64url(&sk.to_bytes())}
        });
        assert_eq!(parse_key(&bundle.to_string()).unwrap(), sk);
        assert!(parse_key("hello").is_err());
    }
}
