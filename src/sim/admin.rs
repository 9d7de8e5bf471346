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
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
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

fn bad(message: &str, request_id: &str) -> Resp {
    envelope(StatusCode::BAD_REQUEST, "bad_request", message, request_id)
}

fn parse<T: DeserializeOwned>(body: &[u8], request_id: &str) -> Result<T, Resp> {
    serde_json::from_slice(body).map_err(|e| bad(&format!("bad admin JSON: {e}"), request_id))
}

/// An empty body counts as `{}` for endpoints whose fields are all optional.
fn parse_opt<T: DeserializeOwned + Default>(body: &[u8], request_id: &str) -> Result<T, Resp> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        parse(body, request_id)
    }
}

fn ok(v: Value) -> Resp {
    json_response(StatusCode::OK, &v)
}

fn from_sim(e: SimError, request_id: &str) -> Resp {
    bad(&e.to_string(), request_id)
}

pub(crate) fn handle(ctx: &Ctx, method: &Method, path: &str, body: &[u8], rid: &str) -> Resp {
    let segs: Vec<&str> = path
        .trim_start_matches("/_sim")
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let result = match (method, segs.as_slice()) {
        (&Method::GET, ["state"]) => Ok(ok(lock(&ctx.state).snapshot())),
        (&Method::GET, ["keys"]) => Ok(ok(json!({"keys": lock(&ctx.state).keys()}))),
        (&Method::POST, ["keys"]) => register(ctx, body, rid),
        (&Method::POST, ["keys", key_id, "revoke"]) => lock(&ctx.state)
            .revoke_key(key_id)
            .map(|info| ok(json!(info)))
            .map_err(|e| from_sim(e, rid)),
        (&Method::POST, ["ttl"]) => set_ttl(ctx, body, rid),
        (&Method::POST, ["clock"]) => parse::<ClockBody>(body, rid).and_then(|b| {
            let mut st = lock(&ctx.state);
            st.set_clock_offset(b.offset_secs)
                .map_err(|e| from_sim(e, rid))?;
            Ok(ok(json!({"offset_secs": st.clock_offset(), "now": st.now_unix()})))
        }),
        (&Method::GET, ["faults"]) => Ok(ok(json!({"faults": lock(&ctx.state).faults.list()}))),
        (&Method::POST, ["faults"]) => parse::<Value>(body, rid).and_then(|v| {
            let spec = FaultSpec::from_json(&v).map_err(|e| from_sim(e, rid))?;
            let id = lock(&ctx.state)
                .faults
                .add(spec)
                .map_err(|e| from_sim(e, rid))?;
            Ok(ok(json!({"id": id})))
        }),
        (&Method::DELETE, ["faults"]) => {
            lock(&ctx.state).faults.clear();
            Ok(ok(json!({"cleared": true})))
        }
        (&Method::POST, ["jwks", "rotate"]) => parse_opt::<RotateBody>(body, rid).and_then(|b| {
            lock(&ctx.state)
                .rotate_jwks(b.grace_secs.map(Duration::from_secs))
                .map(|info| ok(json!(info)))
                .map_err(|e| from_sim(e, rid))
        }),
        (&Method::POST, ["refresh-tokens", "revoke-all"]) => {
            let n = lock(&ctx.state).revoke_all_refresh();
            Ok(ok(json!({"revoked_families": n})))
        }
        (&Method::POST, ["foreign-key"]) => parse::<ForeignBody>(body, rid).map(|b| {
            lock(&ctx.state).set_foreign(b.count, b.same_kid);
            ok(json!({"count": b.count, "same_kid": b.same_kid}))
        }),
        (&Method::POST, ["replay"]) => parse::<ReplayBody>(body, rid).map(|b| {
            lock(&ctx.state).set_reject_replay(b.enabled);
            ok(json!({"enabled": b.enabled}))
        }),
        (&Method::GET, ["counters"]) => Ok(ok(json!(lock(&ctx.state).counters))),
        (&Method::DELETE, ["counters"]) | (&Method::POST, ["counters", "reset"]) => {
            lock(&ctx.state).counters = Default::default();
            Ok(ok(json!({"reset": true})))
        }
        _ => Err(envelope(
            StatusCode::NOT_FOUND,
            "not_found",
            "unknown admin route (see tm-auth-sim --help)",
            rid,
        )),
    };
    result.unwrap_or_else(|resp| resp)
}

fn register(ctx: &Ctx, body: &[u8], rid: &str) -> Result<Resp, Resp> {
    let b: RegisterBody = parse(body, rid)?;
    let text = match &b.public_key {
        Value::String(s) => s.clone(),
        Value::Object(_) => b.public_key.to_string(),
        _ => {
            return Err(bad(
                "`public_key` must be a PEM/hex string or a JWK/bundle object",
                rid,
            ))
        }
    };
    let mut reg =
        KeyRegistration::from_text(b.key_id.as_deref(), &text).map_err(|e| from_sim(e, rid))?;
    reg.org_id = b.org_id;
    reg.sub = b.sub;
    reg.uid = b.uid;
    let info = lock(&ctx.state)
        .register(reg)
        .map_err(|e| from_sim(e, rid))?;
    Ok(ok(json!(info)))
}

fn set_ttl(ctx: &Ctx, body: &[u8], rid: &str) -> Result<Resp, Resp> {
    let b: TtlBody = parse(body, rid)?;
    let mut st = lock(&ctx.state);
    if let Some(s) = b.access_secs {
        st.set_access_ttl(Duration::from_secs(s))
            .map_err(|e| from_sim(e, rid))?;
    }
    if let Some(s) = b.refresh_secs {
        st.set_refresh_ttl(Duration::from_secs(s))
            .map_err(|e| from_sim(e, rid))?;
    }
    let snap = st.snapshot();
    Ok(ok(json!({
        "access_ttl_secs": snap["access_ttl_secs"],
        "refresh_ttl_secs": snap["refresh_ttl_secs"],
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_peers_are_allowed() {
        let allowed = ["127.0.0.1:1", "127.8.9.10:2", "[::1]:3", "[::ffff:127.0.0.1]:4"];
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
