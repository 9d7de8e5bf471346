//! The simulator's own, independent check of a mint request: strict parsing of the JSON body,
//! strict base64url decoding of the signature, and ES256 verification over the exact bytes
//! `{key_id}.{timestamp}`.
//!
//! Deliberately does not call `jose::decode_es256` or any other agent verification helper:
//! if the agent's encoder and decoder shared a bug, a shared check would agree with it.
//! Pure functions; callable from any thread (callers verify outside the state lock).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use serde_json::Value;

use super::reject::Reject;
use crate::jose::is_uuid;

/// The base64url text of a 64-byte value without padding is exactly 86 characters.
const SIGNATURE_B64_LEN: usize = 86;

/// A syntactically valid mint request.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct MintRequest {
    /// As sent: the signed message uses these exact characters.
    pub key_id: String,
    pub timestamp: i64,
    pub signature: [u8; 64],
}

/// Parses the body of `POST /v1/auth/api-key/token`. Anything malformed is a 400.
pub(crate) fn parse_mint(body: &[u8]) -> Result<MintRequest, Reject> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|_| Reject::BadRequest("request body is not valid JSON".into()))?;
    let obj = value
        .as_object()
        .ok_or_else(|| Reject::BadRequest("request body must be a JSON object".into()))?;
    let key_id = match obj.get("key_id") {
        None | Some(Value::Null) => return Err(missing("key_id")),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(Reject::BadRequest("`key_id` must be a string".into())),
    };
    if !is_uuid(&key_id) {
        return Err(Reject::BadRequest("`key_id` must be a UUID".into()));
    }
    let timestamp = match obj.get("timestamp") {
        None | Some(Value::Null) => return Err(missing("timestamp")),
        // `as_i64` is None for floats (even 1700000000.0) and for integers past i64.
        Some(Value::Number(n)) => n.as_i64().ok_or_else(not_integer)?,
        Some(_) => return Err(not_integer()),
    };
    let signature = match obj.get("signature") {
        None | Some(Value::Null) => return Err(missing("signature")),
        Some(Value::String(s)) => decode_signature(s)?,
        Some(_) => return Err(Reject::BadRequest("`signature` must be a string".into())),
    };
    Ok(MintRequest {
        key_id,
        timestamp,
        signature,
    })
}

fn missing(field: &str) -> Reject {
    Reject::BadRequest(format!("missing field `{field}`"))
}

fn not_integer() -> Reject {
    Reject::BadRequest("`timestamp` must be an integer (Unix seconds)".into())
}

/// Strict base64url without padding, exactly 64 bytes (raw `r || s`).
pub(crate) fn decode_signature(text: &str) -> Result<[u8; 64], Reject> {
    if text.contains('=') {
        return Err(Reject::BadRequest(
            "`signature` must be base64url without padding".into(),
        ));
    }
    if text.contains('+') || text.contains('/') {
        return Err(Reject::BadRequest(
            "`signature` must use the base64url alphabet ('-' and '_', not '+' and '/')".into(),
        ));
    }
    // The engine rejects non-zero trailing bits, so each signature has exactly one text.
    let raw = URL_SAFE_NO_PAD
        .decode(text.as_bytes())
        .map_err(|_| Reject::BadRequest("`signature` is not valid base64url".into()))?;
    if raw.len() != 64 || text.len() != SIGNATURE_B64_LEN {
        let hint = if raw.first() == Some(&0x30) && (8..=72).contains(&raw.len()) {
            " (looks like DER; ES256 wants raw r||s)"
        } else {
            ""
        };
        return Err(Reject::BadRequest(format!(
            "`signature` must be 64 bytes (raw r||s), got {} bytes{hint}",
            raw.len()
        )));
    }
    let mut out = [0u8; 64];
    out.copy_from_slice(&raw);
    Ok(out)
}

/// ES256 verification of `raw` (r || s) over the UTF-8 bytes `{key_id}.{timestamp}`.
/// High-S signatures are accepted, as common server stacks do (the Python SDK does not
/// normalize S).
pub(crate) fn verify_challenge(
    key: &VerifyingKey,
    key_id: &str,
    timestamp: i64,
    raw: &[u8; 64],
) -> bool {
    let Ok(sig) = Signature::from_slice(raw) else {
        // r or s is zero or not below the group order.
        return false;
    };
    let message = format!("{key_id}.{timestamp}");
    key.verify(message.as_bytes(), &sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Signer as _;
    use p256::ecdsa::SigningKey;

    const KID: &str = "0b9b3f3e-8d4c-4c1e-9f1a-2b3c4d5e6f70";

    fn sk() -> SigningKey {
        SigningKey::from_slice(&[5u8; 32]).unwrap()
    }

    fn body(ts: &str, sig: &str) -> Vec<u8> {
        format!(r#"{{"key_id":"{KID}","timestamp":{ts},"signature":"{sig}"}}"#).into_bytes()
    }

    fn good_sig(ts: i64) -> String {
        let s: Signature = sk().sign(format!("{KID}.{ts}").as_bytes());
        URL_SAFE_NO_PAD.encode(s.to_bytes())
    }

    #[test]
    fn good_request_verifies() {
        let req = parse_mint(&body("1700000000", &good_sig(1_700_000_000))).unwrap();
        assert_eq!(req.timestamp, 1_700_000_000);
        assert!(verify_challenge(
            sk().verifying_key(),
            &req.key_id,
            req.timestamp,
            &req.signature
        ));
        assert!(!verify_challenge(
            sk().verifying_key(),
            &req.key_id,
            req.timestamp + 1,
            &req.signature
        ));
    }

    #[test]
    fn high_s_is_accepted() {
        let s: Signature = sk().sign(format!("{KID}.5").as_bytes());
        let low = s.normalize_s().unwrap_or(s);
        let high = Signature::from_scalars(low.r(), -*low.s().as_ref()).unwrap();
        let raw: [u8; 64] = high.to_bytes().into();
        assert!(verify_challenge(sk().verifying_key(), KID, 5, &raw));
    }

    #[test]
    fn malformed_requests_are_bad_requests() {
        let sig = good_sig(1);
        let cases: Vec<Vec<u8>> = vec![
            b"not json".to_vec(),
            b"[]".to_vec(),
            body("\"1\"", &sig),
            body("1.0", &sig),
            body("1e3", &sig),
            body("99999999999999999999", &sig),
            body("1", &format!("{sig}==")),
            body("1", &sig[..85]),
            body("1", &format!("{sig}AA")),
            format!(r#"{{"timestamp":1,"signature":"{sig}"}}"#).into_bytes(),
            format!(r#"{{"key_id":"{KID}","signature":"{sig}"}}"#).into_bytes(),
            format!(r#"{{"key_id":"{KID}","timestamp":1}}"#).into_bytes(),
            format!(r#"{{"key_id":"abc","timestamp":1,"signature":"{sig}"}}"#).into_bytes(),
            format!(r#"{{"key_id":7,"timestamp":1,"signature":"{sig}"}}"#).into_bytes(),
        ];
        for c in cases {
            match parse_mint(&c) {
                Err(Reject::BadRequest(_)) => {}
                other => panic!("{}: {:?}", String::from_utf8_lossy(&c), other.is_ok()),
            }
        }
    }

    #[test]
    fn der_and_standard_alphabet_are_refused() {
        let s: Signature = sk().sign(b"x");
        let der = URL_SAFE_NO_PAD.encode(s.to_der().as_bytes());
        match decode_signature(&der) {
            Err(Reject::BadRequest(m)) => assert!(m.contains("DER"), "{m}"),
            _ => panic!("DER accepted"),
        }
        assert!(decode_signature(&"+".repeat(86)).is_err());
        assert!(decode_signature(&"/".repeat(86)).is_err());
        // Non-zero trailing bits: the last char of 86 carries 2 unused bits.
        let mut t = URL_SAFE_NO_PAD.encode([0u8; 64]);
        t.pop();
        t.push('B');
        assert!(decode_signature(&t).is_err());
    }
}
