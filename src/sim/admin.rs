//! The admin API under `/_sim/`: drives the same state as `SimHandle` (keys, TTLs, clock,
//! faults, JWKS rotation, refresh revocation, foreign-key tokens, replay, counters).
//! Only loopback peers get answers; others get 403 (checked in `http` before this runs).
//!
//! Threading: synchronous handlers called from connection tasks; each takes the state lock
//! once, briefly.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::SimError;
use super::fault::FaultSpec;
use super::http::{envelope, json_response, Ctx, Resp};
use super::keys::KeyRegistration;
use super::state::lock;

/// True for loopback peers (127.0.0.0/8, ::1, and IPv4-mapped loopback).
pub(crate) fn peer_allowed(peer: SocketAddr) -> bool {
    match peer.ip() {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    #[serde(default)]
    key_id: Option<String>,
    /// PEM or SEC1 hex as a string, or a JWK / key bundle as a JSON object or string.
    public_key: Value,
    #[serde(default)]
    org_id: Option<String>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    uid: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TtlBody {
    #[serde(default)]
    access_secs: Option<u64>,
    #[serde(default)]
    refresh_secs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClockBody {
    offset_secs: i64,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    #[serde(default)]
    grace_secs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ForeignBody {
    count: u32,
    #[serde(default)]
    same_kid: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    enabled: bool,
}

/// Why an admin request failed; every success is a 200 with a JSON body.
enum AdminError {
    Bad(String),
    NotFound,
}

impl From<SimError> for AdminError {
    fn from(e: SimError) -> Self {
        AdminError::Bad(e.to_string())
    }
}

type AdminResult = Result<Value, AdminError>;

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, AdminError> {
    serde_json::from_slice(body).map_err(|e| AdminError::Bad(format!("bad admin JSON: {e}")))
}

/// An empty body counts as `{}` for endpoints whose fields are all optional.
fn parse_opt<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, AdminError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        parse(body)
    }
}

pub(crate) fn handle(ctx: &Ctx, method: &Method, path: &str, body: &[u8], rid: &str) -> Resp {
    match route(ctx, method, path, body) {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(AdminError::Bad(m)) => envelope(StatusCode::BAD_REQUEST, "bad_request", &m, rid),
        Err(AdminError::NotFound) => envelope(
            StatusCode::NOT_FOUND,
            "not_found",
            "unknown admin route (see tm-auth-sim --help)",
            rid,
        ),
    }
}

fn route(ctx: &Ctx, method: &Method, path: &str, body: &[u8]) -> AdminResult {
    let segs: Vec<&str> = path
        .trim_start_matches("/_sim")
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    match (method, segs.as_slice()) {
        (&Method::GET, ["state"]) => Ok(lock(&ctx.state).snapshot()),
        (&Method::GET, ["keys"]) => Ok(json!({"keys": lock(&ctx.state).keys()})),
        (&Method::POST, ["keys"]) => register(ctx, body),
        (&Method::POST, ["keys", key_id, "revoke"]) => {
            Ok(json!(lock(&ctx.state).revoke_key(key_id)?))
        }
        (&Method::POST, ["ttl"]) => set_ttl(ctx, body),
        (&Method::POST, ["clock"]) => {
            let b: ClockBody = parse(body)?;
            let mut st = lock(&ctx.state);
            st.set_clock_offset(b.offset_secs)?;
            Ok(json!({"offset_secs": st.clock_offset(), "now": st.now_unix()}))
        }
        (&Method::GET, ["faults"]) => Ok(json!({"faults": lock(&ctx.state).faults.list()})),
        (&Method::POST, ["faults"]) => {
            let spec = FaultSpec::from_json(&parse::<Value>(body)?)?;
            let id = lock(&ctx.state).faults.add(spec)?;
            Ok(json!({"id": id}))
        }
        (&Method::DELETE, ["faults"]) => {
            lock(&ctx.state).faults.clear();
            Ok(json!({"cleared": true}))
        }
        (&Method::POST, ["jwks", "rotate"]) => {
            let b: RotateBody = parse_opt(body)?;
            let info = lock(&ctx.state).rotate_jwks(b.grace_secs.map(Duration::from_secs))?;
            Ok(json!(info))
        }
        (&Method::POST, ["refresh-tokens", "revoke-all"]) => {
            let n = lock(&ctx.state).revoke_all_refresh();
            Ok(json!({"revoked_families": n}))
        }
        (&Method::POST, ["foreign-key"]) => {
            let b: ForeignBody = parse(body)?;
            lock(&ctx.state).set_foreign(b.count, b.same_kid);
            Ok(json!({"count": b.count, "same_kid": b.same_kid}))
        }
        (&Method::POST, ["replay"]) => {
            let b: ReplayBody = parse(body)?;
            lock(&ctx.state).set_reject_replay(b.enabled);
            Ok(json!({"enabled": b.enabled}))
        }
        (&Method::GET, ["counters"]) => Ok(json!(lock(&ctx.state).counters)),
        (&Method::DELETE, ["counters"]) | (&Method::POST, ["counters", "reset"]) => {
            lock(&ctx.state).counters = Default::default();
            Ok(json!({"reset": true}))
        }
        _ => Err(AdminError::NotFound),
    }
}

fn register(ctx: &Ctx, body: &[u8]) -> AdminResult {
    let b: RegisterBody = parse(body)?;
    let text = match &b.public_key {
        Value::String(s) => s.clone(),
        Value::Object(_) => b.public_key.to_string(),
        _ => {
            return Err(AdminError::Bad(
                "`public_key` must be a PEM/hex string or a JWK/bundle object".into(),
            ))
        }
    };
    let mut reg = KeyRegistration::from_text(b.key_id.as_deref(), &text)?;
    reg.org_id = b.org_id;
    reg.sub = b.sub;
    reg.uid = b.uid;
    Ok(json!(lock(&ctx.state).register(reg)?))
}

fn set_ttl(ctx: &Ctx, body: &[u8]) -> AdminResult {
    let b: TtlBody = parse(body)?;
    let mut st = lock(&ctx.state);
    if let Some(s) = b.access_secs {
        st.set_access_ttl(Duration::from_secs(s))?;
    }
    if let Some(s) = b.refresh_secs {
        st.set_refresh_ttl(Duration::from_secs(s))?;
    }
    let snap = st.snapshot();
    Ok(json!({
        "access_ttl_secs": snap["access_ttl_secs"],
        "refresh_ttl_secs": snap["refresh_ttl_secs"],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_peers_are_allowed() {
        let allowed = [
            "127.0.0.1:1",
            "127.8.9.10:2",
            "[::1]:3",
            "[::ffff:127.0.0.1]:4",
        ];
        for a in allowed {
            assert!(peer_allowed(a.parse().unwrap()), "{a}");
        }
        let refused = [
            "10.0.0.1:1",
            "192.168.1.2:2",
            "0.0.0.0:3",
            "[::]:4",
            "[fe80::1]:5",
            "[::ffff:10.0.0.1]:6",
            "[2001:db8::1]:7",
        ];
        for a in refused {
            assert!(!peer_allowed(a.parse().unwrap()), "{a}");
        }
    }
}
