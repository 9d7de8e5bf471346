//! Byte-exact encodings of the True Markets Auth API (see `reference/auth-api.md`).
//!
//! Owns: the challenge message `{key_id}.{timestamp}`, ES256 signatures as raw `r || s`
//! (low-S) in base64url without padding, DER <-> raw conversion, public key encodings (PEM
//! SPKI, JWK with its RFC 7638 thumbprint, compressed SEC1 hex), the Turnkey API stamp, and
//! the parser of the website's API key bundle.
//!
//! Pure functions with no I/O and no shared state: callable from any thread. Shared by the
//! agent and the simulator (`sim`), which is why nothing here verifies a request: the
//! simulator keeps its own verification path.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::{EncodePublicKey as _, LineEnding};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

/// Length of an ES256 signature in raw `r || s` form.
pub const RAW_SIGNATURE_LEN: usize = 64;

/// The Turnkey signature scheme for P-256 API keys.
pub const TURNKEY_SCHEME: &str = "SIGNATURE_SCHEME_TK_API_P256";

/// Errors of this module: every one says what input was wrong.
#[derive(Debug, thiserror::Error)]
pub enum JoseError {
    #[error("not a valid DER ECDSA signature: {0}")]
    BadDerSignature(String),
    #[error("a raw ES256 signature is 64 bytes (r || s), got {0}")]
    BadRawSignatureLength(usize),
    #[error("signature is not valid base64url without padding")]
    BadBase64,
    #[error("not a P-256 public key: {0}")]
    BadPublicKey(String),
    #[error("key bundle is not valid JSON or lacks a field: {0}")]
    BundleFormat(String),
    #[error(
        "key bundle holds an unsupported key ({0}); tm-agent only handles EC P-256 keys for ES256"
    )]
    BundleUnsupported(String),
    #[error("key bundle has no private key scalar `d`: it cannot be imported (download the bundle again from the API Keys page)")]
    BundleMissingPrivate,
    #[error("key bundle private key is invalid: {0}")]
    BundleBadPrivate(String),
    #[error("key bundle public key (x, y) does not match its private key `d`")]
    BundleKeyMismatch,
}

/// The exact bytes that the Auth API expects to be signed: `{key_id}.{timestamp}`.
pub fn challenge_message(key_id: &str, timestamp: i64) -> String {
    format!("{key_id}.{timestamp}")
}

/// SHA-256 of `msg`: the host-side hash that HSMs (with `CKM_ECDSA`) and PIV cards sign.
pub fn sha256(msg: &[u8]) -> [u8; 32] {
    Sha256::digest(msg).into()
}

/// Normalizes a signature to low-S form (s <= n/2), as JOSE verifiers commonly require.
pub fn normalize_low_s(sig: Signature) -> Signature {
    sig.normalize_s().unwrap_or(sig)
}

/// Parses a raw 64-byte `r || s` signature.
pub fn signature_from_raw(raw: &[u8]) -> Result<Signature, JoseError> {
    if raw.len() != RAW_SIGNATURE_LEN {
        return Err(JoseError::BadRawSignatureLength(raw.len()));
    }
    Signature::from_slice(raw).map_err(|e| JoseError::BadDerSignature(e.to_string()))
}

/// Converts a DER `ECDSA-Sig-Value` (as PIV cards and some HSMs return) to a signature.
pub fn der_to_signature(der: &[u8]) -> Result<Signature, JoseError> {
    Signature::from_der(der).map_err(|e| JoseError::BadDerSignature(e.to_string()))
}

/// DER -> raw `r || s` (64 bytes, each half left-padded to 32 bytes).
pub fn der_to_raw(der: &[u8]) -> Result<[u8; RAW_SIGNATURE_LEN], JoseError> {
    Ok(der_to_signature(der)?.to_bytes().into())
}

/// Raw `r || s` -> DER.
pub fn raw_to_der(raw: &[u8]) -> Result<Vec<u8>, JoseError> {
    Ok(signature_from_raw(raw)?.to_der().as_bytes().to_vec())
}

/// The signature as the Auth API wants it: low-S raw `r || s`, base64url, no padding (86 chars).
pub fn encode_es256(sig: &Signature) -> String {
    URL_SAFE_NO_PAD.encode(normalize_low_s(*sig).to_bytes())
}

/// Decodes an ES256 signature in base64url without padding. Strict: padding, standard
/// base64 alphabet or a length other than 64 bytes are rejected.
pub fn decode_es256(text: &str) -> Result<Signature, JoseError> {
    let raw = URL_SAFE_NO_PAD
        .decode(text.as_bytes())
        .map_err(|_| JoseError::BadBase64)?;
    signature_from_raw(&raw)
}

/// base64url without padding.
pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes base64url without padding.
pub fn b64url_decode(text: &str) -> Result<Vec<u8>, JoseError> {
    URL_SAFE_NO_PAD
        .decode(text.as_bytes())
        .map_err(|_| JoseError::BadBase64)
}

/// The body of `POST /api-key/token`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChallengeBody {
    pub key_id: String,
    pub timestamp: i64,
    pub signature: String,
}

impl std::fmt::Debug for ChallengeBody {
    // A fresh signature is a credential for the API's time window: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChallengeBody")
            .field("key_id", &self.key_id)
            .field("timestamp", &self.timestamp)
            .field("signature", &"<redacted>")
            .finish()
    }
}

/// Public key as PEM (SubjectPublicKeyInfo): what one pastes into the API Keys page.
pub fn public_key_pem(key: &VerifyingKey) -> String {
    // Encoding a valid P-256 point as SPKI cannot fail; fall back to an empty string rather
    // than panic if the pkcs8 crate ever disagrees.
    key.to_public_key_pem(LineEnding::LF).unwrap_or_default()
}

/// Public key as SPKI DER.
pub fn public_key_spki_der(key: &VerifyingKey) -> Vec<u8> {
    key.to_public_key_der()
        .map(|d| d.as_bytes().to_vec())
        .unwrap_or_default()
}

/// Parses a public key from PEM (SPKI), from SEC1 bytes given as hex (compressed or not),
/// or from a JWK JSON object.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, JoseError> {
    use p256::pkcs8::DecodePublicKey as _;
    let trimmed = text.trim();
    if trimmed.starts_with("-----BEGIN") {
        return VerifyingKey::from_public_key_pem(trimmed)
            .map_err(|e| JoseError::BadPublicKey(e.to_string()));
    }
    if trimmed.starts_with('{') {
        let jwk: Jwk = serde_json::from_str(trimmed)
            .map_err(|e| JoseError::BadPublicKey(format!("JWK: {e}")))?;
        return jwk.to_verifying_key();
    }
    let bytes = hex::decode(trimmed).map_err(|e| JoseError::BadPublicKey(e.to_string()))?;
    VerifyingKey::from_sec1_bytes(&bytes).map_err(|e| JoseError::BadPublicKey(e.to_string()))
}

/// Compressed SEC1 point (33 bytes) as lowercase hex: Turnkey's `publicKey`.
pub fn public_key_compressed_hex(key: &VerifyingKey) -> String {
    hex::encode(key.to_encoded_point(true).as_bytes())
}

/// Uncompressed SEC1 point (65 bytes, `04 || x || y`).
pub fn public_key_uncompressed(key: &VerifyingKey) -> Vec<u8> {
    key.to_encoded_point(false).as_bytes().to_vec()
}

/// A public JSON Web Key (EC P-256).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    pub crv: String,
    pub x: String,
    pub y: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    #[serde(default, rename = "use", skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
}

impl Jwk {
    /// The JWK of `key` with no `kid`.
    pub fn from_verifying_key(key: &VerifyingKey) -> Self {
        let point = key.to_encoded_point(false);
        // An uncompressed point of a valid key always has both coordinates.
        let x = point.x().map(|x| b64url(x)).unwrap_or_default();
        let y = point.y().map(|y| b64url(y)).unwrap_or_default();
        Jwk {
            kty: "EC".into(),
            crv: "P-256".into(),
            x,
            y,
            kid: None,
            alg: None,
            use_: None,
        }
    }

    /// RFC 7638 thumbprint: SHA-256 over the required members in lexicographic order, b64url.
    pub fn thumbprint(&self) -> String {
        let canonical = format!(
            r#"{{"crv":"{}","kty":"{}","x":"{}","y":"{}"}}"#,
            self.crv, self.kty, self.x, self.y
        );
        b64url(&sha256(canonical.as_bytes()))
    }

    /// The P-256 verifying key this JWK describes.
    pub fn to_verifying_key(&self) -> Result<VerifyingKey, JoseError> {
        if self.kty != "EC" || self.crv != "P-256" {
            return Err(JoseError::BadPublicKey(format!(
                "JWK kty={} crv={}, expected EC P-256",
                self.kty, self.crv
            )));
        }
        let x = b64url_decode(&self.x)?;
        let y = b64url_decode(&self.y)?;
        if x.len() != 32 || y.len() != 32 {
            return Err(JoseError::BadPublicKey(
                "JWK x and y must be 32 bytes each".into(),
            ));
        }
        let mut sec1 = Vec::with_capacity(65);
        sec1.push(4);
        sec1.extend_from_slice(&x);
        sec1.extend_from_slice(&y);
        VerifyingKey::from_sec1_bytes(&sec1).map_err(|e| JoseError::BadPublicKey(e.to_string()))
    }
}

/// The JSON inside a Turnkey stamp, in the field order Turnkey's own clients emit.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnkeyStamp {
    #[serde(rename = "publicKey")]
    pub public_key: String,
    pub signature: String,
    pub scheme: String,
}

/// By hand: the signature is a credential for the payload it was made over.
impl std::fmt::Debug for TurnkeyStamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnkeyStamp")
            .field("public_key", &self.public_key)
            .field("signature", &"<redacted>")
            .field("scheme", &self.scheme)
            .finish()
    }
}

/// Builds a Turnkey API stamp from the key and a signature over the payload's UTF-8 bytes:
/// base64url_nopad(JSON{publicKey: compressed hex, signature: DER hex, scheme}).
pub fn turnkey_stamp(key: &VerifyingKey, sig: &Signature) -> String {
    let stamp = TurnkeyStamp {
        public_key: public_key_compressed_hex(key),
        signature: hex::encode(normalize_low_s(*sig).to_der().as_bytes()),
        scheme: TURNKEY_SCHEME.to_string(),
    };
    // Serializing three strings cannot fail.
    b64url(serde_json::to_string(&stamp).unwrap_or_default().as_bytes())
}

/// Decodes a Turnkey stamp back into its fields (for tests and the `stamp` CLI's checks).
pub fn decode_turnkey_stamp(stamp: &str) -> Result<TurnkeyStamp, JoseError> {
    let json = b64url_decode(stamp)?;
    serde_json::from_slice(&json).map_err(|e| JoseError::BundleFormat(e.to_string()))
}

/// The API key bundle file that the website's API Keys page can hand out.
pub struct KeyBundle {
    pub key_id: String,
    pub label: Option<String>,
    pub fingerprint: Option<String>,
    pub created_at: Option<String>,
    /// The private scalar, zeroized on drop.
    pub secret: p256::SecretKey,
}

impl KeyBundle {
    /// The public key of the bundle's private key.
    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey::from(&p256::ecdsa::SigningKey::from(&self.secret))
    }

    /// The private scalar `d` as 32 big-endian bytes (zeroized on drop), for import.
    pub fn private_scalar(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.secret.to_bytes().into())
    }
}

impl std::fmt::Debug for KeyBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyBundle")
            .field("key_id", &self.key_id)
            .field("label", &self.label)
            .field("private_key", &"<redacted>")
            .finish()
    }
}

#[derive(Deserialize)]
struct RawBundle {
    key_id: String,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    fingerprint: Option<String>,
    #[serde(default)]
    created_at: Option<String>,
    #[serde(default)]
    algorithm: Option<String>,
    private_key: RawBundleKey,
}

#[derive(Deserialize)]
struct RawBundleKey {
    kty: String,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
    #[serde(default)]
    d: Option<Zeroizing<String>>,
}

/// A UUID in its canonical `8-4-4-4-12` hex form, either case (API key ids). The version
/// nibble is not checked: key ids are whatever the API issued.
pub fn is_uuid(s: &str) -> bool {
    let bytes = s.as_bytes();
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Parses the website's API key bundle. Anything but an EC P-256 key for ES256 is refused
/// with a message that names what was found; error texts never contain key material.
pub fn parse_key_bundle(json: &str) -> Result<KeyBundle, JoseError> {
    let raw: RawBundle = serde_json::from_str(json).map_err(|e| {
        // serde_json's message may quote a fragment of the input: keep only its position.
        JoseError::BundleFormat(format!(
            "line {} column {} ({:?})",
            e.line(),
            e.column(),
            e.classify()
        ))
    })?;
    if let Some(alg) = &raw.algorithm {
        if alg != "ES256" {
            return Err(JoseError::BundleUnsupported(format!("algorithm {alg}")));
        }
    }
    if raw.private_key.kty != "EC" {
        return Err(JoseError::BundleUnsupported(format!(
            "kty {}",
            raw.private_key.kty
        )));
    }
    match raw.private_key.crv.as_deref() {
        Some("P-256") => {}
        Some(other) => return Err(JoseError::BundleUnsupported(format!("curve {other}"))),
        None => return Err(JoseError::BundleFormat("private_key.crv is missing".into())),
    }
    let d = raw
        .private_key
        .d
        .as_ref()
        .ok_or(JoseError::BundleMissingPrivate)?;
    let d_bytes = Zeroizing::new(
        URL_SAFE_NO_PAD
            .decode(d.as_bytes())
            .map_err(|_| JoseError::BundleBadPrivate("d is not base64url".into()))?,
    );
    if d_bytes.len() != 32 {
        return Err(JoseError::BundleBadPrivate(format!(
            "d is {} bytes, expected 32",
            d_bytes.len()
        )));
    }
    let secret = p256::SecretKey::from_slice(&d_bytes)
        .map_err(|_| JoseError::BundleBadPrivate("d is not a valid P-256 scalar".into()))?;
    if !is_uuid(&raw.key_id) {
        return Err(JoseError::BundleFormat(
            "key_id is not a UUID (the API's key ids look like 0b9b3f3e-8d4c-4c1e-9f1a-2b3c4d5e6f70)"
                .into(),
        ));
    }
    let bundle = KeyBundle {
        key_id: raw.key_id,
        label: raw.label,
        fingerprint: raw.fingerprint,
        created_at: raw.created_at,
        secret,
    };
    if let (Some(x), Some(y)) = (&raw.private_key.x, &raw.private_key.y) {
        let stated = Jwk {
            kty: "EC".into(),
            crv: "P-256".into(),
            x: x.clone(),
            y: y.clone(),
            kid: None,
            alg: None,
            use_: None,
        };
        if stated != Jwk::from_verifying_key(&bundle.verifying_key()) {
            return Err(JoseError::BundleKeyMismatch);
        }
    }
    Ok(bundle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::{Signer as _, Verifier as _};
    use p256::ecdsa::SigningKey;

    fn key() -> SigningKey {
        SigningKey::from_slice(&[7u8; 32]).unwrap()
    }

    #[test]
    fn turnkey_stamp_debug_hides_the_signature() {
        let sig: Signature = key().sign(b"{}");
        let stamp = decode_turnkey_stamp(&turnkey_stamp(key().verifying_key(), &sig)).unwrap();
        let text = format!("{stamp:?}");
        assert!(!text.contains(&stamp.signature), "{text}");
        assert!(
            text.contains(&stamp.public_key) && text.contains("<redacted>"),
            "{text}"
        );
    }

    #[test]
    fn challenge_message_is_key_id_dot_timestamp() {
        assert_eq!(
            challenge_message("1f0c5e2a-0000-4000-8000-000000000001", 1_700_000_000),
            "1f0c5e2a-0000-4000-8000-000000000001.1700000000"
        );
    }

    #[test]
    fn es256_is_86_chars_low_s_and_verifies() {
        let sk = key();
        let msg = b"abc.123";
        let sig: Signature = sk.sign(msg);
        let text = encode_es256(&sig);
        assert_eq!(text.len(), 86);
        assert!(!text.contains('='));
        let back = decode_es256(&text).unwrap();
        assert!(back.normalize_s().is_none(), "must be low-S");
        sk.verifying_key().verify(msg, &back).unwrap();
    }

    #[test]
    fn high_s_is_normalized() {
        let sk = key();
        let sig: Signature = sk.sign(b"x");
        let low = normalize_low_s(sig);
        // Build the high-S twin: s' = n - s.
        let (r, s) = (low.r(), low.s());
        let high = Signature::from_scalars(r, -*s.as_ref()).unwrap();
        assert_ne!(high, low);
        assert_eq!(normalize_low_s(high), low);
        assert_eq!(encode_es256(&high), encode_es256(&low));
    }

    #[test]
    fn der_raw_round_trip() {
        let sig: Signature = key().sign(b"payload");
        let der = raw_to_der(&sig.to_bytes()).unwrap();
        assert_eq!(der[0], 0x30);
        assert_eq!(der_to_raw(&der).unwrap(), <[u8; 64]>::from(sig.to_bytes()));
        assert!(raw_to_der(&[0u8; 63]).is_err());
        assert!(der_to_raw(&[0x30, 0x02, 0x01]).is_err());
    }

    #[test]
    fn decode_es256_is_strict() {
        let sig: Signature = key().sign(b"m");
        let good = encode_es256(&sig);
        assert!(decode_es256(&format!("{good}==")).is_err());
        assert!(decode_es256(&good[..85]).is_err());
        let der_b64 = b64url(sig.to_der().as_bytes());
        assert!(decode_es256(&der_b64).is_err());
    }

    #[test]
    fn jwk_and_thumbprint_match_rfc7638_example_shape() {
        let vk = *key().verifying_key();
        let jwk = Jwk::from_verifying_key(&vk);
        assert_eq!(jwk.kty, "EC");
        assert_eq!(jwk.crv, "P-256");
        assert_eq!(jwk.x.len(), 43);
        assert_eq!(jwk.to_verifying_key().unwrap(), vk);
        let tp = jwk.thumbprint();
        assert_eq!(tp.len(), 43);
        // The thumbprint ignores optional members.
        let mut with_kid = jwk.clone();
        with_kid.kid = Some("k".into());
        assert_eq!(with_kid.thumbprint(), tp);
    }

    #[test]
    fn public_key_encodings_parse_back() {
        let vk = *key().verifying_key();
        let pem = public_key_pem(&vk);
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"));
        assert_eq!(parse_public_key(&pem).unwrap(), vk);
        let hex_c = public_key_compressed_hex(&vk);
        assert_eq!(hex_c.len(), 66);
        assert!(hex_c.starts_with("02") || hex_c.starts_with("03"));
        assert_eq!(parse_public_key(&hex_c).unwrap(), vk);
        let jwk = serde_json::to_string(&Jwk::from_verifying_key(&vk)).unwrap();
        assert_eq!(parse_public_key(&jwk).unwrap(), vk);
    }

    #[test]
    fn turnkey_stamp_decodes_and_verifies() {
        let sk = key();
        let payload = r#"{"type":"ACTIVITY_TYPE_SIGN_TRANSACTION"}"#;
        let sig: Signature = sk.sign(payload.as_bytes());
        let stamp = turnkey_stamp(sk.verifying_key(), &sig);
        let fields = decode_turnkey_stamp(&stamp).unwrap();
        assert_eq!(fields.scheme, TURNKEY_SCHEME);
        let pk = hex::decode(&fields.public_key).unwrap();
        assert_eq!(pk.len(), 33);
        let der = hex::decode(&fields.signature).unwrap();
        let parsed = Signature::from_der(&der).unwrap();
        VerifyingKey::from_sec1_bytes(&pk)
            .unwrap()
            .verify(payload.as_bytes(), &parsed)
            .unwrap();
        assert_eq!(fields.signature, fields.signature.to_lowercase());
    }

    fn bundle_json(kty: &str, crv: &str, with_d: bool, alg: Option<&str>) -> String {
        let sk = key();
        let jwk = Jwk::from_verifying_key(sk.verifying_key());
        let d = b64url(&sk.to_bytes());
        let mut pk = serde_json::json!({"kty": kty, "crv": crv, "x": jwk.x, "y": jwk.y});
        if with_d {
            pk["d"] = d.into();
        }
        let mut b = serde_json::json!({
            "key_id": "0b9b3f3e-8d4c-4c1e-9f1a-2b3c4d5e6f70",
            "label": "bot", "fingerprint": "fp", "created_at": "2026-01-01T00:00:00Z",
            "private_key": pk,
        });
        if let Some(a) = alg {
            b["algorithm"] = a.into();
        }
        b.to_string()
    }

    #[test]
    fn bundle_parses_with_and_without_algorithm() {
        for alg in [Some("ES256"), None] {
            let b = parse_key_bundle(&bundle_json("EC", "P-256", true, alg)).unwrap();
            assert_eq!(b.key_id, "0b9b3f3e-8d4c-4c1e-9f1a-2b3c4d5e6f70");
            assert_eq!(b.verifying_key(), *key().verifying_key());
            assert!(!format!("{b:?}").contains(&b64url(&key().to_bytes())));
        }
    }

    #[test]
    fn bundle_rejects_rsa_p384_missing_d_and_mismatch() {
        assert!(matches!(
            parse_key_bundle(&bundle_json("RSA", "P-256", true, None)),
            Err(JoseError::BundleUnsupported(_))
        ));
        assert!(matches!(
            parse_key_bundle(&bundle_json("EC", "P-384", true, None)),
            Err(JoseError::BundleUnsupported(_))
        ));
        assert!(matches!(
            parse_key_bundle(&bundle_json("EC", "P-256", true, Some("ES384"))),
            Err(JoseError::BundleUnsupported(_))
        ));
        assert!(matches!(
            parse_key_bundle(&bundle_json("EC", "P-256", false, None)),
            Err(JoseError::BundleMissingPrivate)
        ));
        let other = SigningKey::from_slice(&[9u8; 32]).unwrap();
        let mut v: serde_json::Value =
            serde_json::from_str(&bundle_json("EC", "P-256", true, None)).unwrap();
        v["private_key"]["d"] = b64url(&other.to_bytes()).into();
        assert!(matches!(
            parse_key_bundle(&v.to_string()),
            Err(JoseError::BundleKeyMismatch)
        ));
        // The key id is printed back in commands to run: it must be a UUID, nothing else.
        for key_id in [
            "",
            "prod key",
            "0b9b3f3e-8d4c-4c1e-9f1a-2b3c4d5e6f70; rm -rf /",
        ] {
            let mut v: serde_json::Value =
                serde_json::from_str(&bundle_json("EC", "P-256", true, None)).unwrap();
            v["key_id"] = key_id.into();
            let err = parse_key_bundle(&v.to_string()).unwrap_err();
            assert!(err.to_string().contains("key_id is not a UUID"), "{err}");
        }
    }

    #[test]
    fn uuids_are_canonical_8_4_4_4_12_hex_either_case() {
        const KID: &str = "0b9b3f3e-8d4c-4c1e-9f1a-2b3c4d5e6f70";
        assert!(is_uuid(KID));
        assert!(is_uuid(&KID.to_uppercase()));
        assert!(!is_uuid("0b9b3f3e8d4c4c1e9f1a2b3c4d5e6f70"));
        assert!(!is_uuid("0b9b3f3e-8d4c-4c1e-9f1a-2b3c4d5e6f7g"));
        assert!(!is_uuid("0b9b3f3e-8d4c-4c1e-9f1a2-b3c4d5e6f70"));
        assert!(!is_uuid(""));
    }

    #[test]
    fn bundle_error_never_echoes_the_secret() {
        let json = bundle_json("EC", "P-256", true, None);
        let broken = json.replacen('}', "", 1);
        let err = parse_key_bundle(&broken).unwrap_err().to_string();
        assert!(!err.contains(&b64url(&key().to_bytes())));
    }
}
