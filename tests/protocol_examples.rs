//! The golden transcripts in `proto/examples/*.jsonl`: every line validates against
//! `proto/v1.schema.json`, round-trips through the `tm_agent::protocol` types unchanged, and
//! each file replays against a live agent with the same outcome (ids, ok, event, error
//! codes, result fields).
//!
//! Transcript lines: `{"comment": …}`; `{"send": request}`; `{"send_invalid": value}` (a
//! request that breaks the schema on purpose; a string is sent verbatim); `{"recv": reply}`;
//! `{"agent": "rotate" | "shutdown"}` (harness actions). Example times pretend it is
//! [`EXAMPLE_NOW`]; request timestamps are shifted to the real clock when replayed.
//!
//! The schema is checked by a small validator of the JSON Schema subset the file uses (it
//! refuses any keyword it does not know, so the subset cannot silently grow). The full
//! `jsonschema` crate would add ~66 crates and ~80 s to a cold test build on a 2-core machine.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::agent::{root_rule, TestAgent};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use tm_agent::protocol::{
    self, Op, PingResult, PublicKeyResult, RawRequest, Response, SignChallengeResult, StampResult,
    StatusResult, TokenResult, WatchEnd,
};

const EXAMPLE_NOW: i64 = 1_767_225_600;

fn proto_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("proto")
}

fn schema() -> Value {
    let text = std::fs::read_to_string(proto_dir().join("v1.schema.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn transcripts() -> Vec<(String, Vec<Value>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(proto_dir().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "examples missing: {files:?}");
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let lines = text
                .lines()
                .enumerate()
                .map(|(n, l)| {
                    serde_json::from_str(l)
                        .unwrap_or_else(|e| panic!("{}:{}: not JSON: {e}", path.display(), n + 1))
                })
                .collect();
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                lines,
            )
        })
        .collect()
}

// ---- a validator for the JSON Schema subset used by v1.schema.json ----

fn resolve<'a>(root: &'a Value, reference: &str) -> &'a Value {
    let name = reference
        .strip_prefix("#/$defs/")
        .unwrap_or_else(|| panic!("unsupported $ref {reference}"));
    &root["$defs"][name]
}

fn is_type(v: &Value, ty: &str) -> bool {
    match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        other => panic!("unsupported type {other}"),
    }
}

fn as_i128(v: &Value) -> Option<i128> {
    v.as_i64()
        .map(i128::from)
        .or_else(|| v.as_u64().map(i128::from))
}

fn check(root: &Value, schema: &Value, v: &Value, at: &str, errors: &mut Vec<String>) {
    let Some(obj) = schema.as_object() else {
        panic!("schema at {at} is not an object")
    };
    for (key, rule) in obj {
        match key.as_str() {
            "$schema" | "$id" | "title" | "description" | "$defs" => {}
            "$ref" => check(root, resolve(root, rule.as_str().unwrap()), v, at, errors),
            "type" => {
                let ok = match rule {
                    Value::String(t) => is_type(v, t),
                    Value::Array(ts) => ts.iter().any(|t| is_type(v, t.as_str().unwrap())),
                    _ => panic!("bad type rule"),
                };
                if !ok {
                    errors.push(format!("{at}: {v} is not of type {rule}"));
                }
            }
            "const" => {
                if v != rule {
                    errors.push(format!("{at}: {v} != const {rule}"));
                }
            }
            "enum" => {
                if !rule.as_array().unwrap().contains(v) {
                    errors.push(format!("{at}: {v} not in {rule}"));
                }
            }
            "required" => {
                if let Some(o) = v.as_object() {
                    for name in rule.as_array().unwrap() {
                        if !o.contains_key(name.as_str().unwrap()) {
                            errors.push(format!("{at}: missing {name}"));
                        }
                    }
                }
            }
            "properties" => {
                if let Some(o) = v.as_object() {
                    for (name, sub) in rule.as_object().unwrap() {
                        if let Some(value) = o.get(name) {
                            check(root, sub, value, &format!("{at}.{name}"), errors);
                        }
                    }
                }
            }
            "additionalProperties" => {
                if let Some(o) = v.as_object() {
                    let known = obj
                        .get("properties")
                        .and_then(Value::as_object)
                        .map(|p| p.keys().cloned().collect::<BTreeSet<_>>())
                        .unwrap_or_default();
                    for (name, value) in o {
                        if known.contains(name) {
                            continue;
                        }
                        match rule {
                            Value::Bool(false) => {
                                errors.push(format!("{at}: unexpected property {name}"))
                            }
                            Value::Bool(true) => {}
                            sub => check(root, sub, value, &format!("{at}.{name}"), errors),
                        }
                    }
                }
            }
            "items" => {
                if let Some(items) = v.as_array() {
                    for (i, item) in items.iter().enumerate() {
                        check(root, rule, item, &format!("{at}[{i}]"), errors);
                    }
                }
            }
            "minimum" | "maximum" => {
                if let (Some(x), Some(limit)) = (as_i128(v), as_i128(rule)) {
                    let bad = if key == "minimum" {
                        x < limit
                    } else {
                        x > limit
                    };
                    if bad {
                        errors.push(format!("{at}: {x} violates {key} {limit}"));
                    }
                }
            }
            "minLength" | "maxLength" => {
                if let Some(s) = v.as_str() {
                    let n = s.chars().count() as u64;
                    let limit = rule.as_u64().unwrap();
                    let bad = if key == "minLength" {
                        n < limit
                    } else {
                        n > limit
                    };
                    if bad {
                        errors.push(format!("{at}: length {n} violates {key} {limit}"));
                    }
                }
            }
            "oneOf" | "anyOf" => {
                let passing = rule
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|sub| {
                        let mut e = Vec::new();
                        check(root, sub, v, at, &mut e);
                        e.is_empty()
                    })
                    .count();
                let ok = if key == "oneOf" {
                    passing == 1
                } else {
                    passing >= 1
                };
                if !ok {
                    errors.push(format!("{at}: {passing} alternatives of {key} match {v}"));
                }
            }
            other => panic!("unsupported schema keyword `{other}` at {at}"),
        }
    }
}

fn validate(root: &Value, def: &str, v: &Value) -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    check(
        root,
        &json!({ "$ref": format!("#/$defs/{def}") }),
        v,
        "$",
        &mut errors,
    );
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

// ---- round trips ----

fn round_trip<T: Serialize + DeserializeOwned>(v: &Value) -> Result<(), String> {
    let typed: T = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    if &back == v {
        Ok(())
    } else {
        Err(format!("round trip changed the line:\n  {v}\n  {back}"))
    }
}

fn round_trip_reply(op: Option<Op>, v: &Value) -> Result<(), String> {
    match (v["event"].as_str(), op) {
        (Some("token"), _) => round_trip::<Response<TokenResult>>(v),
        (Some("end"), _) => round_trip::<Response<WatchEnd>>(v),
        (Some(other), _) => Err(format!("unknown event {other}")),
        (None, _) if v["ok"] == json!(false) => round_trip::<Response<PingResult>>(v),
        (None, Some(Op::Ping)) => round_trip::<Response<PingResult>>(v),
        (None, Some(Op::Token)) => round_trip::<Response<TokenResult>>(v),
        (None, Some(Op::SignChallenge)) => round_trip::<Response<SignChallengeResult>>(v),
        (None, Some(Op::Stamp)) => round_trip::<Response<StampResult>>(v),
        (None, Some(Op::PublicKey)) => round_trip::<Response<PublicKeyResult>>(v),
        (None, Some(Op::Status)) => round_trip::<Response<StatusResult>>(v),
        (None, other) => Err(format!("no request known for this reply ({other:?})")),
    }
}

#[test]
fn every_example_line_validates_and_round_trips() {
    let schema = schema();
    let mut checked = 0;
    for (file, lines) in transcripts() {
        let mut ops: HashMap<u64, Op> = HashMap::new();
        for (n, line) in lines.iter().enumerate() {
            let at = format!("{file}:{}", n + 1);
            let obj = line
                .as_object()
                .unwrap_or_else(|| panic!("{at}: not an object"));
            assert_eq!(obj.len(), 1, "{at}: one key per transcript line");
            let (kind, value) = obj.iter().next().unwrap();
            match kind.as_str() {
                "comment" | "agent" => {}
                "send" => {
                    validate(&schema, "request", value).unwrap_or_else(|e| panic!("{at}: {e:?}"));
                    let text = value.to_string();
                    let raw: RawRequest = serde_json::from_str(&text).unwrap();
                    let request = raw
                        .validate()
                        .unwrap_or_else(|e| panic!("{at}: {}", e.message));
                    let back = serde_json::to_value(request.to_raw()).unwrap();
                    assert_eq!(&back, value, "{at}: request round trip");
                    ops.insert(request.id, request.body.op());
                }
                "send_invalid" => {
                    if !value.is_string() {
                        assert!(
                            validate(&schema, "request", value).is_err(),
                            "{at}: send_invalid passes the schema"
                        );
                        let text = value.to_string();
                        let raw = serde_json::from_str::<RawRequest>(&text);
                        assert!(
                            raw.map(|r| r.validate().is_err()).unwrap_or(true),
                            "{at}: send_invalid is accepted by the protocol types"
                        );
                    }
                }
                "recv" => {
                    validate(&schema, "response", value).unwrap_or_else(|e| panic!("{at}: {e:?}"));
                    let op = value["id"].as_u64().and_then(|id| ops.get(&id).copied());
                    round_trip_reply(op, value).unwrap_or_else(|e| panic!("{at}: {e}"));
                }
                other => panic!("{at}: unknown transcript line kind {other}"),
            }
            // Every protocol line also validates against the schema's root.
            if kind == "send" || kind == "recv" {
                let mut errors = Vec::new();
                check(&schema, &schema, value, "$", &mut errors);
                assert!(errors.is_empty(), "{at}: root schema: {errors:?}");
                checked += 1;
            }
        }
    }
    assert!(checked >= 30, "only {checked} protocol lines checked");
}

#[test]
fn the_validator_rejects_what_it_should() {
    let schema = schema();
    let ok = json!({"v":1,"id":1,"op":"token","profile":"prod"});
    assert!(validate(&schema, "request", &ok).is_ok());
    for bad in [
        json!({"v":1,"id":1,"op":"token"}),
        json!({"v":1,"id":1,"op":"token","profile":"prod","x":1}),
        json!({"v":2,"id":1,"op":"ping"}),
        json!({"v":1,"id":-1,"op":"ping"}),
        json!({"v":1,"id":1,"op":"stamp","profile":"p"}),
        json!({"v":1,"id":1,"op":"token","profile":""}),
    ] {
        assert!(validate(&schema, "request", &bad).is_err(), "{bad}");
    }
    for bad in [
        json!({"id":1,"ok":true,"result":{"pong":false}}),
        json!({"id":1,"ok":true}),
        json!({"id":1,"ok":false,"error":{"code":"nope","message":"m"}}),
        json!({"id":1,"ok":true,"event":"end","result":{"pong":true}}),
        json!({"id":1,"ok":true,"result":{"key_id":"k","timestamp":1,"signature":"short"}}),
    ] {
        assert!(validate(&schema, "response", &bad).is_err(), "{bad}");
    }
}

#[test]
fn a_null_optional_field_is_absent_for_the_schema_and_the_agent_alike() {
    let schema = schema();
    let request = |v: &Value| {
        let text = v.to_string();
        let raw: RawRequest = serde_json::from_str(&text).unwrap();
        raw.validate()
            .map(|r| serde_json::to_value(r.to_raw()).unwrap())
            .map_err(|e| e.message)
    };
    for (with_null, without) in [
        (
            json!({"v":1,"id":1,"op":"token","profile":"p","min_ttl":null}),
            json!({"v":1,"id":1,"op":"token","profile":"p"}),
        ),
        (
            json!({"v":1,"id":1,"op":"sign_challenge","profile":"p","timestamp":null,"key_id":null}),
            json!({"v":1,"id":1,"op":"sign_challenge","profile":"p"}),
        ),
        (
            json!({"v":1,"id":1,"op":"status","profile":null}),
            json!({"v":1,"id":1,"op":"status"}),
        ),
    ] {
        validate(&schema, "request", &with_null).unwrap_or_else(|e| panic!("{with_null}: {e:?}"));
        assert_eq!(request(&with_null), request(&without), "{with_null}");
        assert!(request(&without).is_ok(), "{without}");
    }
    // A required field given as null is a missing one, for both.
    let bad = json!({"v":1,"id":1,"op":"token","profile":null});
    assert!(validate(&schema, "request", &bad).is_err());
    assert!(request(&bad).is_err());
}

/// The shape of a reply, for comparing an example with a live agent's answer.
fn shape(v: &Value) -> Value {
    let keys = |x: &Value| {
        x.as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    json!({
        "id": v["id"],
        "ok": v["ok"],
        "event": v.get("event"),
        "code": v["error"]["code"],
        "result_keys": keys(&v["result"]),
    })
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn examples_replay_against_a_live_agent() {
    for (file, lines) in transcripts() {
        let agent = TestAgent::builder()
            .profiles(&["prod", "uat"])
            .rules(vec![
                root_rule("*", "*"),
                root_rule("sign_challenge", "*"),
                root_rule("stamp", "uat"),
            ])
            .start();
        let stream = UnixStream::connect(&agent.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        for (n, line) in lines.iter().enumerate() {
            let at = format!("{file}:{}", n + 1);
            let (kind, value) = line.as_object().unwrap().iter().next().unwrap();
            match kind.as_str() {
                "comment" => {}
                "agent" => match value.as_str().unwrap() {
                    "rotate" => {
                        agent.tokens("prod").rotate();
                    }
                    "shutdown" => agent.stop().unwrap(),
                    other => panic!("{at}: unknown agent action {other}"),
                },
                "send" | "send_invalid" => {
                    let text = match value {
                        Value::String(s) => s.clone(),
                        v => {
                            let mut v = v.clone();
                            if let Some(ts) = v.get("timestamp").and_then(Value::as_i64) {
                                v["timestamp"] = json!(unix_now() + (ts - EXAMPLE_NOW));
                            }
                            v.to_string()
                        }
                    };
                    writer.write_all(text.as_bytes()).unwrap();
                    writer.write_all(b"\n").unwrap();
                }
                "recv" => {
                    let mut reply = String::new();
                    reader.read_line(&mut reply).unwrap();
                    let live: Value = serde_json::from_str(&reply)
                        .unwrap_or_else(|e| panic!("{at}: live reply {reply:?}: {e}"));
                    assert_eq!(shape(&live), shape(value), "{at}: live reply {live}");
                    let schema = schema();
                    validate(&schema, "response", &live)
                        .unwrap_or_else(|e| panic!("{at}: live reply off-schema: {e:?}"));
                }
                other => panic!("{at}: unknown kind {other}"),
            }
        }
        let _ = protocol::VERSION;
    }
}

/// The signatures in the examples are real: every `sign_challenge` result verifies over
/// `{key_id}.{timestamp}` with the public key that the examples' `public_key` reply gives
/// for that key_id (ring, raw r||s) and is low-S, so a client author can check their
/// verifier on them.
#[test]
fn example_signatures_verify_with_the_example_public_key() {
    let all: Vec<Value> = transcripts()
        .into_iter()
        .flat_map(|(_, lines)| lines)
        .filter_map(|l| l.get("recv").cloned())
        .collect();
    let points: HashMap<String, Vec<u8>> = all
        .iter()
        .filter_map(|r| {
            let jwk = r["result"].get("jwk")?;
            let coord = |c: &str| common::b64url_decode(jwk[c].as_str().unwrap());
            let mut point = vec![4u8];
            point.extend(coord("x"));
            point.extend(coord("y"));
            Some((r["result"]["key_id"].as_str()?.to_owned(), point))
        })
        .collect();
    let mut checked = 0;
    for r in &all {
        let result = &r["result"];
        let (Some(key_id), Some(ts), Some(sig)) = (
            result["key_id"].as_str(),
            result["timestamp"].as_i64(),
            result["signature"].as_str(),
        ) else {
            continue;
        };
        let point = points
            .get(key_id)
            .unwrap_or_else(|| panic!("no public_key example for {key_id}"));
        let raw = common::b64url_decode(sig);
        common::ring_verify_raw(point, format!("{key_id}.{ts}").as_bytes(), &raw);
        let parsed = p256::ecdsa::Signature::from_slice(&raw).unwrap();
        assert!(parsed.normalize_s().is_none(), "not low-S: {sig}");
        checked += 1;
    }
    assert!(checked >= 2, "sign_challenge examples checked: {checked}");
}
