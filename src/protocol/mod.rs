//! The wire protocol's types, mirroring `proto/PROTOCOL.md` and `proto/v1.schema.json`.
//!
//! Owns: the request shape ([`RawRequest`], exactly what is on the wire, and its validated form
//! [`Request`]), the response envelope ([`Response`]), every op's result type, the stable
//! [`ErrorCode`]s and the sans-IO line codec ([`codec::LineBuffer`], 64 KiB cap).
//! Used by the server and by the client alike, so both sides agree by construction.
//!
//! Depends on `serde` only: the JSON encoding itself (`serde_json`) is done by the callers.
//! No I/O, no threads, no locks here.

pub mod codec;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks (`"v"` in every request).
pub const VERSION: u64 = 1;

/// The longest line accepted, in bytes, not counting the terminating newline.
pub const MAX_LINE: usize = 64 * 1024;

/// The allowed distance between a `sign_challenge` timestamp and the Auth API's clock, in
/// seconds (the API's own window).
pub const TIMESTAMP_WINDOW_SECS: i64 = 30;

/// The ops of protocol version 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Ping,
    Token,
    Watch,
    SignChallenge,
    Stamp,
    PublicKey,
    Status,
}

impl Op {
    /// Every op, in a stable order (also the order of counters in `status`).
    pub const ALL: [Op; 7] = [
        Op::Ping,
        Op::Token,
        Op::Watch,
        Op::SignChallenge,
        Op::Stamp,
        Op::PublicKey,
        Op::Status,
    ];

    /// The op's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Ping => "ping",
            Op::Token => "token",
            Op::Watch => "watch",
            Op::SignChallenge => "sign_challenge",
            Op::Stamp => "stamp",
            Op::PublicKey => "public_key",
            Op::Status => "status",
        }
    }

    /// The op named `name`, if any.
    pub fn from_name(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.as_str() == name)
    }

    /// A dense index (0..7), for counters and bit sets.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The stable error codes. Clients must treat a code they do not know as `internal`
/// (deserialization maps it to [`ErrorCode::Unknown`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed JSON, missing or misplaced fields, an oversize line, a stale timestamp.
    BadRequest,
    /// `v` is not a version this agent speaks.
    UnsupportedVersion,
    /// The access rules do not allow this peer this op on this profile.
    Forbidden,
    /// No such profile (only said to peers that may use the name).
    UnknownProfile,
    /// The agent cannot serve this right now (no valid token, signer down).
    Unavailable,
    /// The agent is overloaded (signer queue full, too many connections): retry shortly.
    Busy,
    /// The signer or a token renewal took too long.
    Timeout,
    /// The HSM or card refused or failed the signature.
    SignerError,
    /// A bug or an unexpected failure inside the agent.
    Internal,
    /// A code from a newer agent that this client does not know.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// Every code the server may send, in a stable order (also the order of counters).
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::BadRequest,
        ErrorCode::UnsupportedVersion,
        ErrorCode::Forbidden,
        ErrorCode::UnknownProfile,
        ErrorCode::Unavailable,
        ErrorCode::Busy,
        ErrorCode::Timeout,
        ErrorCode::SignerError,
        ErrorCode::Internal,
    ];

    /// The code's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::UnknownProfile => "unknown_profile",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Busy => "busy",
            ErrorCode::Timeout => "timeout",
            ErrorCode::SignerError => "signer_error",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }

    /// The code named `name`; unknown names map to [`ErrorCode::Unknown`].
    pub fn from_name(name: &str) -> ErrorCode {
        ErrorCode::ALL
            .into_iter()
            .find(|c| c.as_str() == name)
            .unwrap_or(ErrorCode::Unknown)
    }

    /// A dense index (0..9; `Unknown` shares `internal`'s), for counters.
    pub fn index(self) -> usize {
        match self {
            ErrorCode::Unknown => ErrorCode::Internal as usize,
            code => code as usize,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request exactly as it is on the wire: one flat object, every field optional here so
/// that a bad request can still be answered with its `id` and a precise message.
/// [`RawRequest::validate`] turns it into a [`Request`].
///
/// Unknown fields are refused (`bad_request`): a typo such as `min_tll` must not silently
/// change what is asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRequest<'a> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub op: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<Cow<'a, str>>,
    /// `token`: the least remaining lifetime wanted, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_ttl: Option<u64>,
    /// `sign_challenge`: Unix seconds; default: the Auth API's clock as the agent knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<i64>,
    /// `sign_challenge`: if given, must be the profile's own key_id.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<Cow<'a, str>>,
    /// `stamp`: the Turnkey payload, signed as its UTF-8 bytes.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Cow<'a, str>>,
}

/// Only the `id` and `v` of a request, read when the full parse failed so that the error
/// reply can still carry the id, and a line of another version is told so (it may carry
/// fields that v1 does not know). Lenient where the full parse is strict: the first `id`
/// and `v` count, later ones (which made the full parse fail) and other fields are skipped.
#[derive(Debug, Default)]
pub struct IdOnly {
    pub id: Option<u64>,
    pub v: Option<serde_json::Value>,
}

impl<'de> Deserialize<'de> for IdOnly {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = IdOnly;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<IdOnly, A::Error> {
                use serde::de::IgnoredAny;
                let mut out = IdOnly::default();
                let mut seen_id = false;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    match key.as_ref() {
                        "id" if !seen_id => {
                            seen_id = true;
                            let id: serde_json::Value = map.next_value()?;
                            out.id = id.as_u64();
                        }
                        "v" if out.v.is_none() => out.v = Some(map.next_value()?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(out)
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

impl IdOnly {
    /// The version the line names, when it is a number other than this agent's.
    pub fn other_version(&self) -> Option<u64> {
        self.v.as_ref()?.as_u64().filter(|v| *v != VERSION)
    }
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub id: u64,
    pub body: Body<'a>,
}

/// A validated request's op and arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body<'a> {
    Ping,
    Token {
        profile: Cow<'a, str>,
        min_ttl: Option<u64>,
    },
    Watch {
        profile: Cow<'a, str>,
    },
    SignChallenge {
        profile: Cow<'a, str>,
        timestamp: Option<i64>,
        key_id: Option<Cow<'a, str>>,
    },
    Stamp {
        profile: Cow<'a, str>,
        payload: Cow<'a, str>,
    },
    PublicKey {
        profile: Cow<'a, str>,
    },
    Status {
        profile: Option<Cow<'a, str>>,
    },
}

impl Body<'_> {
    /// The op of this body.
    pub fn op(&self) -> Op {
        match self {
            Body::Ping => Op::Ping,
            Body::Token { .. } => Op::Token,
            Body::Watch { .. } => Op::Watch,
            Body::SignChallenge { .. } => Op::SignChallenge,
            Body::Stamp { .. } => Op::Stamp,
            Body::PublicKey { .. } => Op::PublicKey,
            Body::Status { .. } => Op::Status,
        }
    }

    /// The profile named by the request, if any.
    pub fn profile(&self) -> Option<&str> {
        match self {
            Body::Ping => None,
            Body::Status { profile } => profile.as_deref(),
            Body::Token { profile, .. }
            | Body::Watch { profile }
            | Body::SignChallenge { profile, .. }
            | Body::Stamp { profile, .. }
            | Body::PublicKey { profile } => Some(profile),
        }
    }
}

/// The message of an `unsupported_version` error for a request with `v` = `v`.
pub fn unsupported_version_message(v: u64) -> String {
    format!("protocol version {v} is not supported; this agent speaks v1")
}

/// Why a parsed request is not a valid one. The message is safe to send to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    /// The request's id, when it had a usable one.
    pub id: Option<u64>,
    pub code: ErrorCode,
    pub message: String,
}

impl<'a> RawRequest<'a> {
    /// Checks the version, the op and that exactly the op's fields are present.
    pub fn validate(self) -> Result<Request<'a>, RequestError> {
        let id = self.id;
        let fail = |code, message: String| RequestError { id, code, message };
        let Some(id) = self.id else {
            return Err(fail(
                ErrorCode::BadRequest,
                "`id` is required (an unsigned integer)".into(),
            ));
        };
        match self.v {
            Some(VERSION) => {}
            Some(other) => {
                return Err(fail(
                    ErrorCode::UnsupportedVersion,
                    unsupported_version_message(other),
                ))
            }
            None => {
                return Err(fail(
                    ErrorCode::BadRequest,
                    "`v` is required (this agent speaks v1)".into(),
                ))
            }
        }
        let Some(op_name) = self.op else {
            return Err(fail(ErrorCode::BadRequest, "`op` is required".into()));
        };
        let Some(op) = Op::from_name(&op_name) else {
            return Err(fail(
                ErrorCode::BadRequest,
                format!(
                    "unknown op `{}`; known ops: ping, token, watch, sign_challenge, stamp, \
                     public_key, status",
                    excerpt(&op_name, 64)
                ),
            ));
        };
        // Fields that do not belong to the op are refused rather than ignored.
        let present = [
            ("profile", self.profile.is_some()),
            ("min_ttl", self.min_ttl.is_some()),
            ("timestamp", self.timestamp.is_some()),
            ("key_id", self.key_id.is_some()),
            ("payload", self.payload.is_some()),
        ];
        let allowed: &[&str] = match op {
            Op::Ping => &[],
            Op::Token => &["profile", "min_ttl"],
            Op::Watch | Op::PublicKey | Op::Status => &["profile"],
            Op::SignChallenge => &["profile", "timestamp", "key_id"],
            Op::Stamp => &["profile", "payload"],
        };
        if let Some((field, _)) = present
            .iter()
            .find(|(field, set)| *set && !allowed.contains(field))
        {
            return Err(fail(
                ErrorCode::BadRequest,
                format!("field `{field}` is not valid for op `{op}`"),
            ));
        }
        let needs_profile = !matches!(op, Op::Ping | Op::Status);
        let profile = match self.profile {
            Some(p) if p.is_empty() => {
                return Err(fail(
                    ErrorCode::BadRequest,
                    "`profile` must not be empty".into(),
                ))
            }
            Some(p) => Some(p),
            None if needs_profile => {
                return Err(fail(
                    ErrorCode::BadRequest,
                    format!("`profile` is required for op `{op}`"),
                ))
            }
            None => None,
        };
        let body = match op {
            Op::Ping => Body::Ping,
            Op::Status => Body::Status { profile },
            _ => {
                // needs_profile held above, so `profile` is Some here.
                let profile = profile.unwrap_or_default();
                match op {
                    Op::Token => Body::Token {
                        profile,
                        min_ttl: self.min_ttl,
                    },
                    Op::Watch => Body::Watch { profile },
                    Op::PublicKey => Body::PublicKey { profile },
                    Op::SignChallenge => Body::SignChallenge {
                        profile,
                        timestamp: self.timestamp,
                        key_id: self.key_id,
                    },
                    _ => Body::Stamp {
                        profile,
                        payload: self.payload.ok_or_else(|| {
                            fail(
                                ErrorCode::BadRequest,
                                "`payload` is required for op `stamp`".into(),
                            )
                        })?,
                    },
                }
            }
        };
        Ok(Request { id, body })
    }
}

impl<'a> Request<'a> {
    /// The wire form of this request (with `v` set).
    pub fn to_raw(&self) -> RawRequest<'a> {
        let mut raw = RawRequest {
            v: Some(VERSION),
            id: Some(self.id),
            op: Some(Cow::Borrowed(self.body.op().as_str())),
            ..RawRequest::default()
        };
        match &self.body {
            Body::Ping => {}
            Body::Token { profile, min_ttl } => {
                raw.profile = Some(profile.clone());
                raw.min_ttl = *min_ttl;
            }
            Body::Watch { profile } | Body::PublicKey { profile } => {
                raw.profile = Some(profile.clone())
            }
            Body::Status { profile } => raw.profile = profile.clone(),
            Body::SignChallenge {
                profile,
                timestamp,
                key_id,
            } => {
                raw.profile = Some(profile.clone());
                raw.timestamp = *timestamp;
                raw.key_id = key_id.clone();
            }
            Body::Stamp { profile, payload } => {
                raw.profile = Some(profile.clone());
                raw.payload = Some(payload.clone());
            }
        }
        raw
    }
}

/// How much of a client's own text (a profile or op name, a field name quoted by the JSON
/// parser) is echoed in an error message or an audit record, in characters.
pub const ECHO_MAX: usize = 128;

/// Client-supplied text made safe to echo in an error message or a log record: at most
/// `max` characters, each control or other non-printable character escaped the way
/// [`char::escape_debug`] does (`\n`, `\u{2028}`), and `…` appended when cut. A newline in a
/// client's input can then never start a line of its own in the agent's log (under
/// journald, a forged entry with a priority of the client's choosing).
pub fn excerpt(text: &str, max: usize) -> Cow<'_, str> {
    let escaped = |c: char| !matches!(c, '"' | '\'' | '\\') && c.escape_debug().len() > 1;
    if !text.chars().any(escaped) && text.chars().nth(max).is_none() {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len().min(max) + 3);
    let mut used = 0;
    for c in text.chars() {
        let width = if escaped(c) {
            c.escape_debug().len()
        } else {
            1
        };
        if used + width > max {
            out.push('…');
            break;
        }
        if escaped(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
        used += width;
    }
    Cow::Owned(out)
}

/// Cuts `text` to at most `max` bytes on a character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The kind of a `watch` stream line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// A token: the current one first, then one per rotation. `result` is a [`TokenResult`].
    Token,
    /// The stream's last line: the agent is shutting down. `result` is a [`WatchEnd`].
    End,
}

/// The error object of a failed reply: a stable code and a message safe to show the
/// client. The one mapping from the agent's internal errors to these is in `crate::error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub code: ErrorCode,
    pub message: Cow<'static, str>,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        WireError {
            code,
            message: message.into(),
        }
    }
}

/// A reply line. `id` is null only when the request's id could not be read (e.g. the line
/// was not JSON) or when the agent refuses a connection before reading anything.
/// Clients must ignore fields they do not know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response<T> {
    pub id: Option<u64>,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<Event>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<WireError>,
}

/// `ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingResult {
    pub pong: bool,
}

/// `token` (and each `watch` event).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenResult {
    /// The JWT, to send as `Authorization: Bearer <access_token>`.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Expiry, Unix seconds.
    pub expires_at: i64,
    /// Expiry, RFC 3339 UTC.
    pub expires_at_rfc3339: String,
}

impl fmt::Debug for TokenResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenResult")
            .field("access_token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// `sign_challenge`: exactly the body of `POST /api-key/token`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignChallengeResult {
    pub key_id: String,
    pub timestamp: i64,
    /// base64url (no padding) of the raw 64-byte `r || s`.
    pub signature: String,
}

impl fmt::Debug for SignChallengeResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignChallengeResult")
            .field("key_id", &self.key_id)
            .field("timestamp", &self.timestamp)
            .field("signature", &"<redacted>")
            .finish()
    }
}

/// `stamp`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StampResult {
    /// The Turnkey `X-Stamp` value.
    pub stamp: String,
}

impl fmt::Debug for StampResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StampResult { stamp: <redacted> }")
    }
}

/// A public EC P-256 JWK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicJwk {
    pub kty: String,
    pub crv: String,
    pub x: String,
    pub y: String,
}

/// `public_key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKeyResult {
    pub key_id: String,
    /// SubjectPublicKeyInfo PEM.
    pub pem: String,
    pub jwk: PublicJwk,
    /// Compressed SEC1 point, lowercase hex (the Turnkey `publicKey`).
    pub hex: String,
    /// RFC 7638 JWK thumbprint, base64url.
    pub thumbprint: String,
}

/// `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusResult {
    /// The agent's version.
    pub version: String,
    /// The protocol version (1).
    pub protocol: u64,
    /// Start time, Unix seconds.
    pub started_at: i64,
    pub uptime_secs: u64,
    /// Only the profiles this peer may query.
    pub profiles: Vec<ProfileStatus>,
    pub counters: Counters,
}

/// One profile in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileStatus {
    pub name: String,
    pub key_id: String,
    /// `pkcs11`, `piv` or `soft`.
    pub backend: String,
    pub location: String,
    pub hardware_backed: bool,
    pub key: KeyHealth,
    pub token: TokenState,
}

/// A signer's health in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyHealth {
    /// `ok` or `failing`.
    pub state: String,
    pub error: Option<String>,
    /// Last successful signature, Unix seconds.
    pub last_ok: Option<i64>,
    pub signatures: u64,
    pub errors: u64,
}

/// A profile's token machinery in `status` (times are Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenState {
    /// A valid token is held right now.
    pub valid: bool,
    pub expires_at: Option<i64>,
    pub next_refresh: Option<i64>,
    pub last_mint: Option<i64>,
    pub last_refresh: Option<i64>,
    pub consecutive_failures: u32,
    pub last_error_code: Option<String>,
    pub last_error: Option<String>,
    /// The Auth API's clock minus the local clock, in seconds.
    pub clock_offset_secs: i64,
}

/// Agent-wide counters in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub connections: ConnectionCounters,
    /// Requests by op name (every op listed, zeros included).
    pub requests: BTreeMap<String, u64>,
    /// Error replies by code (every code listed, zeros included).
    pub errors: BTreeMap<String, u64>,
}

/// Connection counters in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionCounters {
    pub open: u64,
    pub total: u64,
    /// Turned away at the connection cap.
    pub rejected: u64,
}

/// The `result` of a `watch` stream's `end` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEnd {
    /// `shutdown`.
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Request<'_>, RequestError> {
        serde_json::from_str::<RawRequest>(line).unwrap().validate()
    }

    #[test]
    fn the_id_of_a_line_the_full_parse_refuses_is_still_found() {
        let probe = |line: &str| {
            assert!(serde_json::from_str::<RawRequest>(line).is_err(), "{line}");
            serde_json::from_str::<IdOnly>(line).unwrap()
        };
        for line in [
            r#"{"v":1,"v":2,"id":3,"op":"ping"}"#,
            r#"{"v":1,"id":3,"op":"ping","v":1}"#,
            r#"{"id":3,"id":4,"v":1,"op":"ping"}"#,
            r#"{"id":3,"v":1,"op":"ping","extra":{"a":[1,2,{"b":null}]}}"#,
        ] {
            let p = probe(line);
            assert_eq!(p.id, Some(3), "{line}");
            assert_eq!(p.other_version(), None, "{line}");
        }
        let p = probe(r#"{"v":2,"v":1,"id":"x","op":"ping"}"#);
        assert_eq!((p.id, p.other_version()), (None, Some(2)));
    }

    #[test]
    fn validates_each_op() {
        assert_eq!(
            parse(r#"{"v":1,"id":7,"op":"token","profile":"prod"}"#).unwrap(),
            Request {
                id: 7,
                body: Body::Token {
                    profile: "prod".into(),
                    min_ttl: None
                }
            }
        );
        assert_eq!(
            parse(r#"{"v":1,"id":1,"op":"ping"}"#).unwrap().body,
            Body::Ping
        );
        assert_eq!(
            parse(r#"{"v":1,"id":1,"op":"status"}"#).unwrap().body,
            Body::Status { profile: None }
        );
        let stamp = parse(r#"{"v":1,"id":2,"op":"stamp","profile":"p","payload":"a\"b"}"#);
        assert_eq!(
            stamp.unwrap().body,
            Body::Stamp {
                profile: "p".into(),
                payload: "a\"b".into()
            }
        );
    }

    #[test]
    fn refuses_with_precise_codes() {
        let e = parse(r#"{"v":2,"id":3,"op":"ping"}"#).unwrap_err();
        assert_eq!((e.id, e.code), (Some(3), ErrorCode::UnsupportedVersion));
        let e = parse(r#"{"v":1,"id":3,"op":"fly"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("unknown op `fly`"));
        let e = parse(r#"{"v":1,"id":3,"op":"token"}"#).unwrap_err();
        assert!(e.message.contains("`profile` is required"));
        let e = parse(r#"{"v":1,"id":3,"op":"ping","payload":"x"}"#).unwrap_err();
        assert!(e.message.contains("`payload` is not valid for op `ping`"));
        let e = parse(r#"{"v":1,"id":3,"op":"stamp","profile":"p"}"#).unwrap_err();
        assert!(e.message.contains("`payload` is required"));
        let e = parse(r#"{"v":1,"op":"ping"}"#).unwrap_err();
        assert_eq!(e.id, None);
        assert!(serde_json::from_str::<RawRequest>(r#"{"v":1,"id":1,"op":"ping","x":1}"#).is_err());
    }

    #[test]
    fn request_round_trips_through_raw() {
        let req = Request {
            id: 9,
            body: Body::SignChallenge {
                profile: "p".into(),
                timestamp: Some(1_700_000_000),
                key_id: None,
            },
        };
        let line = serde_json::to_string(&req.to_raw()).unwrap();
        assert_eq!(
            line,
            r#"{"v":1,"id":9,"op":"sign_challenge","profile":"p","timestamp":1700000000}"#
        );
        assert_eq!(parse(&line).unwrap(), req);
    }

    #[test]
    fn unknown_error_codes_are_tolerated() {
        let e: WireError = serde_json::from_str(r#"{"code":"brand_new","message":"m"}"#).unwrap();
        assert_eq!(e.code, ErrorCode::Unknown);
        assert_eq!(ErrorCode::from_name("busy"), ErrorCode::Busy);
        for code in ErrorCode::ALL {
            assert_eq!(
                serde_json::to_string(&code).unwrap(),
                format!("\"{}\"", code.as_str())
            );
            assert!(code.index() < ErrorCode::ALL.len());
        }
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }

    #[test]
    fn excerpt_escapes_control_characters_and_bounds_the_length() {
        assert!(matches!(excerpt("prod", 10), Cow::Borrowed("prod")));
        assert_eq!(excerpt("a\"b'c\\é", 10), "a\"b'c\\é");
        assert_eq!(excerpt("x\n<0>audit: forged", 64), "x\\n<0>audit: forged");
        assert_eq!(
            excerpt("a\r\u{2028}\u{1b}[31m", 64),
            "a\\r\\u{2028}\\u{1b}[31m"
        );
        assert_eq!(excerpt("abcdef", 3), "abc…");
        assert_eq!(
            excerpt("ab\ncd", 3),
            "ab…",
            "an escape is never cut in half"
        );
        let long = "y\n".repeat(40_000);
        let short = excerpt(&long, ECHO_MAX);
        assert!(short.chars().count() <= ECHO_MAX + 1 && !short.contains('\n'));
        let e = parse(r#"{"v":1,"id":3,"op":"fly\n<0>forged"}"#).unwrap_err();
        assert!(e.message.contains("`fly\\n<0>forged`"), "{}", e.message);
    }
}
