//! The bodies of the fuzz targets: each takes arbitrary bytes, feeds them to one parser of
//! untrusted input the way the agent does, and panics when a property that must hold for
//! every input is broken. `fuzz/` runs them under libFuzzer (`cargo fuzz`, see its README);
//! `tests/fuzz_smoke.rs` runs them in CI over the seeds in `fuzz/seeds/` and mutations of
//! them, so that they keep compiling and keep holding.
//!
//! | target | input | properties |
//! | --- | --- | --- |
//! | [`request_stream`] | a client's byte stream | framing agrees with a model for every chunking; a parsed request survives a round trip; a refusal is a well-formed reply line, short, with the request's id |
//! | [`api_response`] | an Auth API response body | no token of a token response, and nothing that looks like a JWT, in an error or `Debug`; no control character in an error |
//! | [`jwt`] | an access token | a token signed by the key never fails as a bad signature; errors stay short |
//! | [`config`] | a config file | parse and validate never panic |
//! | [`key_material`] | key bundles, public keys, signatures, stamps | encodings round-trip; no private scalar in an error or `Debug` |
//!
//! No state and no I/O; every function can run on any thread. Not part of the agent's
//! behaviour: nothing else calls these.

use std::time::{Duration, SystemTime};

use crate::auth_api;
use crate::config::Config;
use crate::jose;
use crate::protocol::codec::LineBuffer;
use crate::protocol::ErrorCode;
use crate::server::parse_request;
use crate::token::jwt;

/// The longest error message a refused request may get back, in characters: a parser
/// message cut to 400 (`WireError::invalid_json`) or [`crate::protocol::ECHO_MAX`] characters
/// of the client's input, and the fixed text around them. Not bytes: a character of the
/// input may take four.
const REFUSAL_MAX: usize = 512;

/// The longest JWT error, in characters: two fields of at most 64 characters of the token
/// (`kid`, `iss`), each character Debug-escaped to at most 10 (`\u{10ffff}`), and fixed text.
const JWT_ERROR_MAX: usize = 2 * 64 * 10 + 200;

/// A client's byte stream: `data[0]` picks the line cap (255: the agent's 64 KiB), `data[1]`
/// seeds the read sizes, and the rest is what the client sends.
pub fn request_stream(data: &[u8]) {
    let [cap, seed, stream @ ..] = data else {
        return;
    };
    let max_line = match cap {
        255 => crate::protocol::MAX_LINE,
        n => usize::from(*n) * 4,
    };
    let expected = frame_model(stream, max_line);
    let (lines, too_long) = frame_in_chunks(stream, max_line, u64::from(*seed));
    assert_eq!(
        (&lines, too_long),
        (&expected.0, expected.1),
        "framing differs from the model (cap {max_line}, seed {seed})"
    );
    for line in &lines {
        check_request_line(line);
    }
}

/// What the framing must yield: the lines up to the first one over the cap, each without
/// its `\n` and one `\r` before it, empty ones skipped, and whether a line was over the cap
/// (a trailing partial line counts once it is over the cap, a final `\r` aside).
fn frame_model(stream: &[u8], max_line: usize) -> (Vec<Vec<u8>>, bool) {
    let mut lines = Vec::new();
    let mut parts = stream.split(|&b| b == b'\n').peekable();
    while let Some(part) = parts.next() {
        let complete = parts.peek().is_some();
        let line = match part {
            [rest @ .., b'\r'] => rest,
            line => line,
        };
        if line.len() > max_line {
            return (lines, true);
        }
        if complete && !line.is_empty() {
            lines.push(line.to_vec());
        }
    }
    (lines, false)
}

/// Feeds `stream` to a [`LineBuffer`] in reads of 1 to 37 bytes (sizes from `seed`), as the
/// connection task does, taking every complete line after each read.
fn frame_in_chunks(stream: &[u8], max_line: usize, seed: u64) -> (Vec<Vec<u8>>, bool) {
    let mut buffer = LineBuffer::new(max_line);
    let mut lines = Vec::new();
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut rest = stream;
    while !rest.is_empty() {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let spare = buffer.spare();
        assert!(
            !spare.is_empty(),
            "the line buffer offered no room to read into"
        );
        let n = (1 + rng % 37).min(rest.len() as u64) as usize;
        let n = n.min(spare.len());
        spare[..n].copy_from_slice(&rest[..n]);
        buffer.filled(n);
        rest = &rest[n..];
        loop {
            match buffer.next_line() {
                Ok(Some(line)) => lines.push(line.to_vec()),
                Ok(None) => break,
                Err(_) => return (lines, true),
            }
        }
    }
    (lines, false)
}

/// One line through the agent's request parser.
fn check_request_line(line: &[u8]) {
    match parse_request(line) {
        Ok(request) => {
            let again = serde_json::to_vec(&request.to_raw()).expect("a request serializes");
            let reparsed = parse_request(&again).unwrap_or_else(|bad| {
                panic!("a valid request did not parse again: {:?}", bad.error)
            });
            assert_eq!(reparsed, request, "a request changed in a round trip");
        }
        Err(bad) => {
            assert!(
                matches!(
                    bad.error.code,
                    ErrorCode::BadRequest | ErrorCode::UnsupportedVersion
                ),
                "a line was refused with {:?} before any peer or state was looked at",
                bad.error.code
            );
            let mut out = Vec::new();
            crate::server::write_err(&mut out, bad.id, &bad.error);
            let reply = out
                .strip_suffix(b"\n")
                .expect("a reply line ends with a newline");
            assert!(!reply.contains(&b'\n'), "a reply line holds a newline");
            let value: serde_json::Value =
                serde_json::from_slice(reply).expect("a refusal is a JSON reply line");
            assert_eq!(value["id"].as_u64(), bad.id);
            assert_eq!(value["ok"], serde_json::Value::Bool(false));
            assert_eq!(
                value["error"]["code"].as_str(),
                Some(bad.error.code.as_str())
            );
            let chars = bad.error.message.chars().count();
            assert!(
                chars <= REFUSAL_MAX,
                "a refusal echoes {chars} characters: {:?}",
                bad.error.message
            );
        }
    }
}

/// An Auth API response: `data[0]` picks the HTTP status (0: a 200 read as a token
/// response and as a JWKS), the rest is the body.
pub fn api_response(data: &[u8]) {
    const STATUSES: [u16; 10] = [400, 401, 403, 404, 409, 429, 500, 502, 503, 504];
    let [pick, body @ ..] = data else {
        return;
    };
    let server_now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    if *pick == 0 {
        let secrets = token_strings(body);
        let shown = match auth_api::parse_pair(body, server_now) {
            Ok(pair) => format!("{pair:?}"),
            Err(err) => {
                let shown = format!("{err} / {err:?}");
                assert_no_control(&err.to_string());
                shown
            }
        };
        for secret in &secrets {
            assert!(
                !shown.contains(secret.as_str()),
                "a token from the response body is shown: {shown}"
            );
        }
        if let Ok(jwks) = auth_api::parse_jwks(body) {
            jwt::KeySet::from_jwks(&jwks.keys);
        }
        return;
    }
    let status = STATUSES[usize::from(*pick) % STATUSES.len()];
    let status = reqwest::StatusCode::from_u16(status).expect("a valid status");
    let err = auth_api::error_from_response(status, Some(Duration::from_secs(1)), body);
    let shown = err.to_string();
    assert_no_control(&shown);
    // As a reader sees it: characters that print as nothing or that split a run of token
    // characters (zero-width, non-ASCII) cannot hide a JWT.
    let seen: String = format!("{shown} {err:?}")
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .collect();
    assert!(
        !seen.contains("eyJ"),
        "a JWT-like word from a server's error reaches its message: {shown:?}"
    );
}

/// The access and refresh tokens of a token response body, when they look like credentials
/// ([`looks_like_a_credential`]) and appear nowhere else in it (a `token_type` equal to the
/// token is shown, as any `token_type` is).
fn token_strings(body: &[u8]) -> Vec<String> {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(body) else {
        return Vec::new();
    };
    let others: Vec<&str> = map
        .iter()
        .filter(|(k, _)| *k != "access_token" && *k != "refresh_token")
        .filter_map(|(_, v)| v.as_str())
        .collect();
    ["access_token", "refresh_token"]
        .iter()
        .filter_map(|k| map.get(*k)?.as_str())
        .filter(|s| looks_like_a_credential(s) && !others.iter().any(|o| o.contains(*s)))
        .map(str::to_owned)
        .collect()
}

/// 12 or more token characters with a letter and a digit among them: no fixed text of an
/// error or a `Debug` holds such a word, so finding one there means it came from the input.
fn looks_like_a_credential(s: &str) -> bool {
    s.len() >= 12
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~+/=".contains(&b))
        && s.bytes().any(|b| b.is_ascii_digit())
        && s.bytes().any(|b| b.is_ascii_alphabetic())
}

fn assert_no_control(text: &str) {
    assert!(
        !text.chars().any(char::is_control),
        "a control character in an error message (log injection): {text:?}"
    );
}

/// An access token as the token manager reads it, verified against a fixed key. Input that
/// starts with `!` is `<header JSON>\n<payload JSON>`, signed here with that key, so that the
/// checks after the signature are reached too: such a token never fails as a bad signature.
pub fn jwt(data: &[u8]) {
    let (token, signed) = match data {
        [b'!', rest @ ..] => {
            let split = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
            let (header, payload) = rest.split_at(split);
            let payload = payload.get(1..).unwrap_or_default();
            let input = format!("{}.{}", jose::b64url(header), jose::b64url(payload));
            let sig: p256::ecdsa::Signature =
                p256::ecdsa::signature::Signer::sign(&fixed_key(), input.as_bytes());
            (format!("{input}.{}", jose::encode_es256(&sig)), true)
        }
        _ => match std::str::from_utf8(data) {
            Ok(text) => (text.to_owned(), false),
            Err(_) => return,
        },
    };
    let keys = jwt::KeySet::from_jwks(&[fixed_jwk()]);
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let result = jwt::parse(&token).and_then(|parsed| keys.verify(&parsed, now, Some("issuer")));
    if let Err(err) = result {
        assert!(
            !(signed && matches!(err, jwt::JwtError::BadSignature(_))),
            "a token signed by the key failed its signature check"
        );
        let shown = err.to_string();
        let chars = shown.chars().count();
        assert!(chars <= JWT_ERROR_MAX, "a JWT error of {chars} characters");
    }
}

fn fixed_key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::from_slice(&[7; 32]).expect("a valid scalar")
}

/// The JWK of [`fixed_key`], `kid` "k".
fn fixed_jwk() -> jose::Jwk {
    let mut jwk = jose::Jwk::from_verifying_key(fixed_key().verifying_key());
    jwk.kid = Some("k".into());
    jwk
}

/// A config file: parsed and, when it parses, validated, as `run` and `check` do before they
/// touch the system.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse(text) {
        let _ = config.validate();
    }
}

/// Key material from files and the wire: `data[0]` picks the parser, the rest is its input.
pub fn key_material(data: &[u8]) {
    let [pick, input @ ..] = data else {
        return;
    };
    match pick % 4 {
        0 => {
            if let Ok(raw) = jose::der_to_raw(input) {
                let der = jose::raw_to_der(&raw).expect("r || s re-encodes as DER");
                assert_eq!(jose::der_to_raw(&der).ok(), Some(raw), "DER round trip");
            }
            let _ = jose::signature_from_raw(input);
        }
        1 => {
            let Ok(text) = std::str::from_utf8(input) else {
                return;
            };
            if let Ok(sig) = jose::decode_es256(text) {
                // The encoding is always low-S; a low-S input comes back as it was.
                let low = jose::normalize_low_s(sig);
                assert_eq!(
                    jose::decode_es256(&jose::encode_es256(&sig)).ok(),
                    Some(low)
                );
                if low == sig {
                    assert_eq!(jose::encode_es256(&sig), text, "ES256 round trip");
                }
            }
            let _ = jose::decode_turnkey_stamp(text);
        }
        2 => {
            let Ok(text) = std::str::from_utf8(input) else {
                return;
            };
            if let Ok(key) = jose::parse_public_key(text) {
                let pem = jose::public_key_pem(&key);
                assert_eq!(
                    jose::parse_public_key(&pem).ok(),
                    Some(key),
                    "PEM round trip"
                );
                let jwk = jose::Jwk::from_verifying_key(&key);
                assert_eq!(jwk.to_verifying_key().ok(), Some(key), "JWK round trip");
            }
        }
        _ => {
            let Ok(text) = std::str::from_utf8(input) else {
                return;
            };
            let private = bundle_private_key(text);
            let shown = match jose::parse_key_bundle(text) {
                Ok(bundle) => {
                    let d = bundle.private_scalar();
                    let shown = format!("{bundle:?}");
                    // `key_id` and `label` are shown as given, whatever they hold.
                    let given = format!("{} {:?}", bundle.key_id, bundle.label);
                    for encoded in [hex::encode(*d), jose::b64url(&*d)] {
                        assert!(
                            !shown.contains(&encoded) || given.contains(&encoded),
                            "a bundle's Debug shows its key"
                        );
                    }
                    shown
                }
                Err(err) => format!("{err} / {err:?}"),
            };
            if let Some(d) = private {
                assert!(
                    !shown.contains(&d),
                    "a bundle's private key is shown: {shown}"
                );
            }
        }
    }
}

/// The `private_key.d` string of a key bundle, when it looks like a credential
/// ([`looks_like_a_credential`]) and appears nowhere else in the text.
fn bundle_private_key(text: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    let d = value.get("private_key")?.get("d")?.as_str()?;
    let once = text.matches(d).count() == 1;
    (looks_like_a_credential(d) && once).then(|| d.to_owned())
}
