//! Fixtures shared by the integration tests: the SoftHSM token fixture ([`softhsm`]) and
//! verification helpers that deliberately do not use the crate's own encoders (`jose`), so
//! that a bug there cannot make a test agree with itself.
//!
//! Threading: plain functions; each test owns its fixture.
#![allow(dead_code)]

pub mod agent;
pub mod daemon;
pub mod softhsm;

/// Decodes base64url without padding; written here on purpose instead of using `jose` or
/// the `base64` crate that `jose` uses. Panics on anything else (tests only).
pub fn b64url_decode(text: &str) -> Vec<u8> {
    fn value(c: u8) -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'-' => 62,
            b'_' => 63,
            other => panic!("not base64url: {:?}", other as char),
        }
    }
    let bytes = text.as_bytes();
    assert_ne!(bytes.len() % 4, 1, "impossible base64 length");
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= value(c) << (18 - 6 * i);
        }
        let produced = chunk.len() - 1;
        for i in 0..produced {
            out.push((acc >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// DER `ECDSA-Sig-Value` of a raw `r || s` signature, encoded here by hand.
pub fn raw_to_der_by_hand(raw: &[u8]) -> Vec<u8> {
    assert_eq!(raw.len(), 64);
    fn integer(bytes: &[u8]) -> Vec<u8> {
        let mut v: Vec<u8> = bytes.iter().copied().skip_while(|&b| b == 0).collect();
        if v.is_empty() || v[0] & 0x80 != 0 {
            v.insert(0, 0);
        }
        let mut out = vec![0x02, v.len() as u8];
        out.extend(v);
        out
    }
    let mut body = integer(&raw[..32]);
    body.extend(integer(&raw[32..]));
    let mut out = vec![0x30, body.len() as u8];
    out.extend(body);
    out
}

/// Verifies a raw `r || s` signature with `ring` (an implementation independent of `p256`)
/// and, through a hand-made DER encoding, with ring's ASN.1 verifier too.
pub fn ring_verify_raw(uncompressed_point: &[u8], message: &[u8], raw: &[u8]) {
    use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_FIXED};
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, uncompressed_point)
        .verify(message, raw)
        .expect("ring: raw r||s signature verifies");
    let der = raw_to_der_by_hand(raw);
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, uncompressed_point)
        .verify(message, &der)
        .expect("ring: DER signature verifies");
}

/// Verifies a DER signature with `ring`.
pub fn ring_verify_der(uncompressed_point: &[u8], message: &[u8], der: &[u8]) {
    use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, uncompressed_point)
        .verify(message, der)
        .expect("ring: DER signature verifies");
}

/// A website-style API key bundle for `key` (JSON), built here without `jose`.
pub fn bundle_json(key: &p256::ecdsa::SigningKey, key_id: &str) -> String {
    let point = key.verifying_key().to_encoded_point(false);
    let enc = |b: &[u8]| b64url_encode(b);
    serde_json::json!({
        "key_id": key_id,
        "label": "test bot",
        "fingerprint": "fp",
        "created_at": "2026-01-01T00:00:00Z",
        "algorithm": "ES256",
        "private_key": {
            "kty": "EC", "crv": "P-256",
            "x": enc(point.x().expect("x")),
            "y": enc(point.y().expect("y")),
            "d": enc(&key.to_bytes()),
        }
    })
    .to_string()
}

/// base64url without padding, by hand.
pub fn b64url_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let mut acc = 0u32;
        for (i, &b) in chunk.iter().enumerate() {
            acc |= u32::from(b) << (16 - 8 * i);
        }
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((acc >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[test]
fn hand_made_base64_round_trips() {
    for len in 0..70 {
        let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
        assert_eq!(b64url_decode(&b64url_encode(&data)), data);
    }
}
