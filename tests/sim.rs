//! Integration tests of the Auth API simulator over real HTTP and HTTPS on 127.0.0.1.

#[path = "common/sim.rs"]
mod sim_fixture;

use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use sim_fixture::{unix_now, SimFixture, SimProcess, TestKey};
use tm_agent::jose::{self, Jwk};
use tm_agent::sim::{FaultKind, FaultSpec, FaultTarget, KeyRegistration, SimConfig};

struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

async fn post(client: &Client, url: &str, body: &Value) -> Answer {
    let r = client.post(url).json(body).send().await.expect("send");
    answer(r).await
}

async fn post_raw(client: &Client, url: &str, body: &str) -> Answer {
    let r = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("send");
    answer(r).await
}

async fn get(client: &Client, url: &str) -> Answer {
    answer(client.get(url).send().await.expect("send")).await
}

async fn answer(r: reqwest::Response) -> Answer {
    let status = r.status();
    let headers = r.headers().clone();
    let text = r.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer {
        status,
        headers,
        body,
    }
}

fn mint_url(base: &str) -> String {
    format!("{base}/v1/auth/api-key/token")
}

fn refresh_url(base: &str) -> String {
    format!("{base}/v1/auth/token/refresh")
}

fn jwks_url(base: &str) -> String {
    format!("{base}/.well-known/jwks.json")
}

/// Asserts an error envelope: status, type, message containing `msg`, a request id equal
/// to the `X-Request-Id` header, and a Date header.
fn assert_envelope(a: &Answer, status: u16, kind: &str, msg: &str) {
    assert_eq!(a.status.as_u16(), status, "body: {}", a.body);
    assert_eq!(a.body["type"], kind, "body: {}", a.body);
    let m = a.body["message"].as_str().expect("message");
    assert!(m.contains(msg), "message {m:?} should contain {msg:?}");
    let rid = a.body["request_id"].as_str().expect("request_id");
    assert!(!rid.is_empty());
    assert_eq!(a.headers["x-request-id"].to_str().unwrap(), rid);
    assert!(a.headers.contains_key("date"));
}

fn decode_part(part: &str) -> Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("b64url")).expect("JSON")
}

/// Header and claims of a JWT (unverified).
fn jwt_parts(token: &str) -> (Value, Value) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "compact JWT");
    (decode_part(parts[0]), decode_part(parts[1]))
}

/// Verifies an access token against a JWKS document the way a client must: find the
/// key by `kid`, check alg, verify ES256 over `header.claims`.
fn verify_with_jwks(token: &str, jwks: &Value) -> Result<Value, String> {
    let (header, claims) = jwt_parts(token);
    if header["alg"] != "ES256" {
        return Err("alg".into());
    }
    let kid = header["kid"].as_str().ok_or("no kid")?;
    let jwk_json = jwks["keys"]
        .as_array()
        .ok_or("no keys")?
        .iter()
        .find(|k| k["kid"] == kid)
        .ok_or_else(|| format!("kid {kid} not in JWKS"))?;
    let jwk: Jwk = serde_json::from_value(jwk_json.clone()).map_err(|e| e.to_string())?;
    let vk: VerifyingKey = jwk.to_verifying_key().map_err(|e| e.to_string())?;
    let (signing_input, sig) = token.rsplit_once('.').ok_or("no sig")?;
    let sig = Signature::from_slice(&URL_SAFE_NO_PAD.decode(sig).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    vk.verify(signing_input.as_bytes(), &sig)
        .map_err(|_| "bad signature".to_string())?;
    Ok(claims)
}

fn assert_token_response(a: &Answer, access_ttl: i64) {
    assert_eq!(a.status, StatusCode::OK, "body: {}", a.body);
    assert_eq!(a.body["token_type"], "Bearer");
    let exp_text = a.body["expires_in"]
        .as_str()
        .expect("expires_in is a string");
    let exp = time::OffsetDateTime::parse(exp_text, &time::format_description::well_known::Rfc3339)
        .expect("RFC 3339");
    let (_, claims) = jwt_parts(a.body["access_token"].as_str().unwrap());
    assert_eq!(claims["exp"].as_i64().unwrap(), exp.unix_timestamp());
    let iat = claims["iat"].as_i64().unwrap();
    assert_eq!(exp.unix_timestamp() - iat, access_ttl);
    assert!(a.body["refresh_token"].as_str().unwrap().split('.').count() == 3);
}

#[tokio::test]
async fn mint_over_http_and_https_and_verify_with_jwks() {
    let sim = SimFixture::start().await;
    let key = TestKey::random();
    sim.register(&key);
    let client = sim.client();

    let a = post(
        &client,
        &mint_url(&sim.handle.http_url()),
        &key.mint_body(unix_now()),
    )
    .await;
    assert_token_response(&a, 900);
    assert_eq!(a.headers["cache-control"], "no-store");
    assert!(httpdate::parse_http_date(a.headers["date"].to_str().unwrap()).is_ok());

    // HTTPS, trusting only the CA the simulator wrote.
    let b = post(
        &client,
        &mint_url(&sim.handle.https_url()),
        &key.mint_body(unix_now()),
    )
    .await;
    assert_token_response(&b, 900);
    let jwks = get(&client, &jwks_url(&sim.handle.https_url())).await;
    assert_eq!(jwks.status, StatusCode::OK);
    let keys = jwks.body["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    for field in ["kty", "crv", "x", "y", "kid", "alg", "use"] {
        assert!(keys[0][field].is_string(), "JWK lacks {field}");
    }
    assert_eq!(keys[0]["alg"], "ES256");
    assert_eq!(keys[0]["use"], "sig");

    let token = b.body["access_token"].as_str().unwrap();
    let (header, _) = jwt_parts(token);
    assert_eq!(header["typ"], "JWT");
    assert_eq!(header["kid"], keys[0]["kid"]);
    let claims = verify_with_jwks(token, &jwks.body).expect("verifies");
    assert_eq!(claims["iss"], "https://sim.truemarkets.local");
    assert!(claims["sub"].as_str().unwrap().contains('@'));
    assert!(tm_agent::sim::is_uuid(claims["uid"].as_str().unwrap()));
    assert!(claims["jti"].is_string());
    assert!(claims.get("tm").is_none(), "personal key has no org");
    // A plain client without the CA must refuse the certificate.
    let untrusting = Client::builder().no_proxy().build().unwrap();
    assert!(untrusting
        .get(jwks_url(&sim.handle.https_url()))
        .send()
        .await
        .is_err());

    let c = sim.handle.counters();
    assert_eq!((c.mints, c.jwks_fetches), (2, 1));
}

#[tokio::test]
async fn org_key_tokens_carry_organization_id() {
    let key = TestKey::random();
    let config = SimConfig {
        keys: vec![key.registration().with_org("org-42")],
        issuer: "https://issuer.test".into(),
        ..SimConfig::default()
    };
    let sim = SimFixture::start_with(config).await;
    let a = post(
        &sim.client(),
        &mint_url(&sim.handle.http_url()),
        &key.mint_body(unix_now()),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let (_, claims) = jwt_parts(a.body["access_token"].as_str().unwrap());
    assert_eq!(claims["tm"]["organization_id"], "org-42");
    assert_eq!(claims["tm.organization_id"], "org-42");
    assert_eq!(claims["iss"], "https://issuer.test");
}

#[tokio::test]
async fn mint_rejections_have_exact_status_and_envelope() {
    let sim = SimFixture::start().await;
    let key = TestKey::random();
    sim.register(&key);
    let revoked = TestKey::random();
    sim.register(&revoked);
    sim.handle.revoke_key(&revoked.key_id).unwrap();
    let unknown = TestKey::random();
    let client = sim.client();
    let url = mint_url(&sim.handle.http_url());
    let now = unix_now();
    let kid = &key.key_id;
    let good = key.sign(now);

    // DER signature, base64url.
    let msg = format!("{kid}.{now}");
    let sig: Signature = p256::ecdsa::signature::Signer::sign(&key.signing_key, msg.as_bytes());
    let der = URL_SAFE_NO_PAD.encode(sig.to_der().as_bytes());
    // Standard alphabet: find a timestamp whose signature has '-' or '_' in it.
    let (std_ts, std_sig) = (now - 10..=now + 10)
        .map(|ts| (ts, key.sign(ts)))
        .find(|(_, s)| s.contains('-') || s.contains('_'))
        .expect("some signature uses - or _");
    let std_sig = std_sig.replace('-', "+").replace('_', "/");
    // Wrong key: a valid signature by another key.
    let wrong = TestKey {
        key_id: kid.clone(),
        signing_key: unknown.signing_key.clone(),
    };

    let cases: Vec<(String, u16, &str, &str)> = vec![
        (
            json!({"key_id": kid, "timestamp": now, "signature": der}).to_string(),
            400,
            "bad_request",
            "DER",
        ),
        (
            json!({"key_id": kid, "timestamp": now, "signature": format!("{good}==")}).to_string(),
            400,
            "bad_request",
            "without padding",
        ),
        (
            json!({"key_id": kid, "timestamp": std_ts, "signature": std_sig}).to_string(),
            400,
            "bad_request",
            "base64url alphabet",
        ),
        (
            json!({"key_id": kid, "timestamp": now, "signature": &good[..80]}).to_string(),
            400,
            "bad_request",
            "64 bytes",
        ),
        (
            json!({"key_id": kid, "timestamp": now.to_string(), "signature": good}).to_string(),
            400,
            "bad_request",
            "integer",
        ),
        (
            format!(r#"{{"key_id":"{kid}","timestamp":{now}.0,"signature":"{good}"}}"#),
            400,
            "bad_request",
            "integer",
        ),
        (
            format!(r#"{{"key_id":"{kid}","timestamp":{now}.5,"signature":"{good}"}}"#),
            400,
            "bad_request",
            "integer",
        ),
        (
            json!({"timestamp": now, "signature": good}).to_string(),
            400,
            "bad_request",
            "missing field `key_id`",
        ),
        (
            json!({"key_id": kid, "signature": good}).to_string(),
            400,
            "bad_request",
            "missing field `timestamp`",
        ),
        (
            json!({"key_id": kid, "timestamp": now}).to_string(),
            400,
            "bad_request",
            "missing field `signature`",
        ),
        (
            json!({"key_id": "not-a-uuid", "timestamp": now, "signature": good}).to_string(),
            400,
            "bad_request",
            "UUID",
        ),
        ("{not json".to_string(), 400, "bad_request", "JSON"),
        (
            unknown.mint_body(now).to_string(),
            401,
            "unauthenticated",
            "unknown key_id",
        ),
        (
            revoked.mint_body(now).to_string(),
            401,
            "unauthenticated",
            "key revoked",
        ),
        (
            key.mint_body(now - 45).to_string(),
            401,
            "unauthenticated",
            "timestamp out of window",
        ),
        (
            key.mint_body(now + 45).to_string(),
            401,
            "unauthenticated",
            "timestamp out of window",
        ),
        (
            wrong.mint_body(now).to_string(),
            401,
            "unauthenticated",
            "invalid signature",
        ),
        // A valid signature over another timestamp.
        (
            json!({"key_id": kid, "timestamp": now, "signature": key.sign(now - 1)}).to_string(),
            401,
            "unauthenticated",
            "invalid signature",
        ),
    ];
    for (body, status, kind, msg) in &cases {
        let a = post_raw(&client, &url, body).await;
        assert_envelope(&a, *status, kind, msg);
    }
    let c = sim.handle.counters();
    assert_eq!(c.mints, 0);
    assert_eq!(c.rejected("bad_request"), 12);
    assert_eq!(c.rejected("unknown_key"), 1);
    assert_eq!(c.rejected("key_revoked"), 1);
    assert_eq!(c.rejected("timestamp_out_of_window"), 2);
    assert_eq!(c.rejected("invalid_signature"), 2);
    assert_eq!(c.requests.mint, cases.len() as u64);

    // Replay rejection, switched on through the admin API.
    let admin = format!("{}/_sim/replay", sim.handle.http_url());
    assert_eq!(
        post(&client, &admin, &json!({"enabled": true}))
            .await
            .status,
        StatusCode::OK
    );
    let body = key.mint_body(unix_now());
    assert_eq!(post(&client, &url, &body).await.status, StatusCode::OK);
    let again = post(&client, &url, &body).await;
    assert_envelope(&again, 401, "unauthenticated", "replay");
    sim.handle.set_reject_replay(false);
    assert_eq!(post(&client, &url, &body).await.status, StatusCode::OK);
}

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_the_family() {
    let sim = SimFixture::start().await;
    let key = TestKey::random();
    sim.register(&key);
    let client = sim.client();
    let base = sim.handle.http_url();

    let first = post(&client, &mint_url(&base), &key.mint_body(unix_now())).await;
    let rt1 = first.body["refresh_token"].as_str().unwrap().to_string();
    let second = post(&client, &refresh_url(&base), &json!({"refresh_token": rt1})).await;
    assert_token_response(&second, 900);
    let rt2 = second.body["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(rt1, rt2);
    let third = post(&client, &refresh_url(&base), &json!({"refresh_token": rt2})).await;
    assert_eq!(third.status, StatusCode::OK);
    let rt3 = third.body["refresh_token"].as_str().unwrap().to_string();

    // Reusing a spent token: 401 and the family is revoked, newest token included.
    let reuse = post(&client, &refresh_url(&base), &json!({"refresh_token": rt1})).await;
    assert_envelope(&reuse, 401, "unauthenticated", "already used");
    let newest = post(&client, &refresh_url(&base), &json!({"refresh_token": rt3})).await;
    assert_envelope(&newest, 401, "unauthenticated", "revoked");

    // Malformed and foreign tokens.
    let a = post(&client, &refresh_url(&base), &json!({})).await;
    assert_envelope(&a, 400, "bad_request", "refresh_token");
    let a = post(&client, &refresh_url(&base), &json!({"refresh_token": 5})).await;
    assert_envelope(&a, 400, "bad_request", "string");
    let access = first.body["access_token"].as_str().unwrap();
    let a = post(
        &client,
        &refresh_url(&base),
        &json!({"refresh_token": access}),
    )
    .await;
    assert_envelope(&a, 401, "unauthenticated", "invalid refresh token");

    // Revoke-all through the admin API.
    let fresh = post(&client, &mint_url(&base), &key.mint_body(unix_now())).await;
    let r = post(
        &client,
        &format!("{base}/_sim/refresh-tokens/revoke-all"),
        &json!({}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let a = post(
        &client,
        &refresh_url(&base),
        &json!({"refresh_token": fresh.body["refresh_token"]}),
    )
    .await;
    assert_envelope(&a, 401, "unauthenticated", "revoked");

    let c = sim.handle.counters();
    assert_eq!(c.refreshes, 2);
    assert_eq!(c.rejected("refresh_reused"), 1);
    assert_eq!(c.rejected("refresh_revoked"), 2);
}

#[tokio::test]
async fn short_ttls_expire_refresh_tokens_and_clock_offset_moves_date() {
    let sim = SimFixture::start().await;
    let key = TestKey::random();
    sim.register(&key);
    let client = sim.client();
    let base = sim.handle.http_url();

    let ttl = post(
        &client,
        &format!("{base}/_sim/ttl"),
        &json!({"access_secs": 3, "refresh_secs": 3}),
    )
    .await;
    assert_eq!(
        ttl.body,
        json!({"access_ttl_secs": 3, "refresh_ttl_secs": 3})
    );
    let a = post(&client, &mint_url(&base), &key.mint_body(unix_now())).await;
    assert_token_response(&a, 3);

    // Move the simulator's clock 1 h ahead instead of sleeping.
    let clock = post(
        &client,
        &format!("{base}/_sim/clock"),
        &json!({"offset_secs": 3600}),
    )
    .await;
    assert_eq!(clock.body["offset_secs"], 3600);
    let expired = post(
        &client,
        &refresh_url(&base),
        &json!({"refresh_token": a.body["refresh_token"]}),
    )
    .await;
    assert_envelope(&expired, 401, "unauthenticated", "refresh token expired");
    let date = httpdate::parse_http_date(expired.headers["date"].to_str().unwrap()).unwrap();
    let date_unix = date
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (date_unix - (unix_now() + 3600)).abs() <= 2,
        "Date follows the offset"
    );

    // Our own clock is now out of the simulator's window; its clock is in it.
    let skewed = post(&client, &mint_url(&base), &key.mint_body(unix_now())).await;
    assert_envelope(&skewed, 401, "unauthenticated", "timestamp out of window");
    let synced = post(&client, &mint_url(&base), &key.mint_body(sim.handle.now())).await;
    assert_eq!(synced.status, StatusCode::OK);
    sim.handle.set_clock_offset(-7200).unwrap();
    let behind = get(&client, &jwks_url(&base)).await;
    let d = httpdate::parse_http_date(behind.headers["date"].to_str().unwrap()).unwrap();
    let d = d.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((d - (unix_now() - 7200)).abs() <= 2);
}

#[tokio::test]
async fn jwks_rotation_keeps_old_key_during_grace_and_foreign_keys_fail() {
    let sim = SimFixture::start().await;
    let key = TestKey::random();
    sim.register(&key);
    let client = sim.client();
    let base = sim.handle.https_url();

    let old = post(&client, &mint_url(&base), &key.mint_body(unix_now())).await;
    let old_token = old.body["access_token"].as_str().unwrap().to_string();
    let kid1 = sim.handle.current_kid();

    let rot = post(
        &client,
        &format!("{base}/_sim/jwks/rotate"),
        &json!({"grace_secs": 60}),
    )
    .await;
    assert_eq!(rot.status, StatusCode::OK);
    assert_eq!(rot.body["previous_kid"], kid1.as_str());
    let kid2 = rot.body["kid"].as_str().unwrap().to_string();
    assert_ne!(kid1, kid2);

    let jwks = get(&client, &jwks_url(&base)).await.body;
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, vec![kid2.as_str(), kid1.as_str()]);
    verify_with_jwks(&old_token, &jwks).expect("old token verifies during grace");
    let new = post(&client, &mint_url(&base), &key.mint_body(unix_now())).await;
    let new_token = new.body["access_token"].as_str().unwrap();
    assert_eq!(jwt_parts(new_token).0["kid"], kid2.as_str());
    verify_with_jwks(new_token, &jwks).expect("new token verifies");

    // Rotation with no grace: kid2 disappears at once; kid1 keeps its 60 s.
    let info = sim.handle.rotate_jwks(Some(Duration::ZERO)).unwrap();
    let jwks = sim.handle.jwks();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
    assert!(verify_with_jwks(new_token, &jwks)
        .unwrap_err()
        .contains("not in JWKS"));
    assert_eq!(jwks["keys"][0]["kid"], info.kid.as_str());

    // Foreign key: its own kid (unknown to the JWKS), then the published kid.
    let r = post(
        &client,
        &format!("{base}/_sim/foreign-key"),
        &json!({"count": 1}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let f = post(&client, &mint_url(&base), &key.mint_body(unix_now())).await;
    let jwks = get(&client, &jwks_url(&base)).await.body;
    let err = verify_with_jwks(f.body["access_token"].as_str().unwrap(), &jwks).unwrap_err();
    assert!(err.contains("not in JWKS"), "{err}");
    sim.handle.sign_with_foreign_key(1, true);
    let f = post(&client, &mint_url(&base), &key.mint_body(unix_now())).await;
    let err = verify_with_jwks(f.body["access_token"].as_str().unwrap(), &jwks).unwrap_err();
    assert_eq!(err, "bad signature");
    let normal = post(&client, &mint_url(&base), &key.mint_body(unix_now())).await;
    verify_with_jwks(normal.body["access_token"].as_str().unwrap(), &jwks)
        .expect("foreign mode ended");
    assert_eq!(sim.handle.counters().foreign_tokens, 2);
}

#[tokio::test]
async fn status_faults_target_endpoints_and_429_has_retry_after() {
    let sim = SimFixture::start().await;
    let key = TestKey::random();
    sim.register(&key);
    let client = sim.client();
    let base = sim.handle.http_url();

    let r = post(
        &client,
        &format!("{base}/_sim/faults"),
        &json!({"kind": "status", "status": 503, "count": 2, "target": "mint"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // Not the mint endpoint: unaffected.
    assert_eq!(get(&client, &jwks_url(&base)).await.status, StatusCode::OK);
    for _ in 0..2 {
        let a = post(&client, &mint_url(&base), &key.mint_body(unix_now())).await;
        assert_envelope(&a, 503, "unavailable", "unavailable");
    }
    let ok = post(&client, &mint_url(&base), &key.mint_body(unix_now())).await;
    assert_eq!(ok.status, StatusCode::OK);

    sim.handle
        .inject_fault(FaultSpec::status(429, FaultTarget::Refresh, 1))
        .unwrap();
    let a = post(
        &client,
        &refresh_url(&base),
        &json!({"refresh_token": ok.body["refresh_token"]}),
    )
    .await;
    assert_envelope(&a, 429, "rate_limited", "too many");
    assert_eq!(a.headers["retry-after"], "1");
    // The refresh token was not consumed by the faulted request.
    let a = post(
        &client,
        &refresh_url(&base),
        &json!({"refresh_token": ok.body["refresh_token"]}),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);

    let r = post(
        &client,
        &format!("{base}/_sim/faults"),
        &json!({"kind": "status", "status": 500, "rate": 1.0, "target": "jwks"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    for _ in 0..3 {
        assert_envelope(
            &get(&client, &jwks_url(&base)).await,
            500,
            "internal",
            "internal",
        );
    }
    let listed = get(&client, &format!("{base}/_sim/faults")).await;
    assert_eq!(listed.body["faults"].as_array().unwrap().len(), 1);
    let del = client
        .delete(format!("{base}/_sim/faults"))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), StatusCode::OK);
    assert_eq!(get(&client, &jwks_url(&base)).await.status, StatusCode::OK);

    let c = sim.handle.counters();
    assert_eq!(c.faults("status_503"), 2);
    assert_eq!(c.faults("status_429"), 1);
    assert_eq!(c.faults("status_500"), 3);
    assert_eq!(c.faults_total(), 6);
}

#[tokio::test]
async fn reset_hang_and_latency_faults() {
    let sim = SimFixture::start().await;
    let key = TestKey::random();
    sim.register(&key);
    let client = sim.client();
    let base = sim.handle.http_url();

    // Reset: no answer at all, over HTTP and over HTTPS.
    sim.handle
        .inject_fault(FaultSpec::next(FaultKind::Reset, FaultTarget::All, 2))
        .unwrap();
    for b in [&base, &sim.handle.https_url()] {
        let err = client.get(jwks_url(b)).send().await.expect_err("reset");
        assert!(!err.is_timeout(), "{err:?}");
        assert!(err.status().is_none());
    }
    assert_eq!(get(&client, &jwks_url(&base)).await.status, StatusCode::OK);

    // Hang: held past the client's timeout.
    sim.handle
        .inject_fault(FaultSpec::next(
            FaultKind::Hang(Duration::from_secs(30)),
            FaultTarget::Mint,
            1,
        ))
        .unwrap();
    let started = Instant::now();
    let err = client
        .post(mint_url(&base))
        .json(&key.mint_body(unix_now()))
        .timeout(Duration::from_millis(400))
        .send()
        .await
        .expect_err("hang");
    assert!(err.is_timeout(), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // Latency: answered normally, late.
    let r = post(
        &client,
        &format!("{base}/_sim/faults"),
        &json!({"kind": "latency", "ms": 300, "target": "mint"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let started = Instant::now();
    let a = post(&client, &mint_url(&base), &key.mint_body(unix_now())).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(300));
    let started = Instant::now();
    post(&client, &mint_url(&base), &key.mint_body(unix_now())).await;
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "latency was for 1 request"
    );

    let c = sim.handle.counters();
    assert_eq!(
        (c.faults("reset"), c.faults("hang"), c.faults("latency")),
        (2, 1, 1)
    );
    // Shutdown ends the hanging connection promptly.
    tokio::time::timeout(Duration::from_secs(5), sim.handle.shutdown())
        .await
        .expect("shutdown is prompt");
}

#[tokio::test]
async fn counters_and_admin_routes() {
    let sim = SimFixture::start().await;
    let key = TestKey::random();
    let client = sim.client();
    let base = sim.handle.http_url();

    // Register through the admin API with a PEM public key.
    let reg = post(
        &client,
        &format!("{base}/_sim/keys"),
        &json!({"key_id": key.key_id, "public_key": jose::public_key_pem(&key.verifying_key()), "org_id": "o-1"}),
    )
    .await;
    assert_eq!(reg.status, StatusCode::OK, "{}", reg.body);
    assert_eq!(reg.body["org_id"], "o-1");
    assert_eq!(
        post(&client, &mint_url(&base), &key.mint_body(unix_now()))
            .await
            .status,
        StatusCode::OK
    );
    let revoke = post(
        &client,
        &format!("{base}/_sim/keys/{}/revoke", key.key_id),
        &json!({}),
    )
    .await;
    assert_eq!(revoke.body["revoked"], true);
    assert_envelope(
        &post(&client, &mint_url(&base), &key.mint_body(unix_now())).await,
        401,
        "unauthenticated",
        "key revoked",
    );

    // Unknown routes, wrong methods, bad admin input.
    assert_envelope(
        &get(&client, &format!("{base}/v1/auth/nope")).await,
        404,
        "not_found",
        "",
    );
    let wrong = get(&client, &mint_url(&base)).await;
    assert_envelope(&wrong, 405, "method_not_allowed", "POST");
    assert_eq!(wrong.headers["allow"], "POST");
    assert_envelope(
        &get(&client, &format!("{base}/_sim/nope")).await,
        404,
        "not_found",
        "",
    );
    assert_envelope(
        &post(
            &client,
            &format!("{base}/_sim/faults"),
            &json!({"kind": "boom"}),
        )
        .await,
        400,
        "bad_request",
        "unknown kind",
    );
    // A huge `secs` once panicked the admin handler (Duration::from_secs_f64).
    assert_envelope(
        &post(
            &client,
            &format!("{base}/_sim/faults"),
            &json!({"kind": "hang", "secs": 1e300}),
        )
        .await,
        400,
        "bad_request",
        "secs",
    );
    assert_envelope(
        &post(
            &client,
            &format!("{base}/_sim/ttl"),
            &json!({"access_secs": 0}),
        )
        .await,
        400,
        "bad_request",
        "access TTL",
    );
    let state = get(&client, &format!("{base}/_sim/state")).await;
    assert_eq!(state.body["keys"][0]["key_id"], key.key_id.as_str());

    let counters = get(&client, &format!("{base}/_sim/counters")).await.body;
    let c = sim.handle.counters();
    assert_eq!(serde_json::to_value(&c).unwrap(), counters);
    assert_eq!(c.mints, 1);
    assert_eq!(c.requests.mint, 2);
    assert_eq!(c.requests.other, 2);
    assert_eq!(c.rejected("key_revoked"), 1);
    assert!(c.requests.admin >= 6);
    let reset = client
        .delete(format!("{base}/_sim/counters"))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), StatusCode::OK);
    let after = sim.handle.counters();
    assert_eq!((after.mints, after.requests.mint), (0, 0));
}

#[test]
fn cli_help_explains_itself() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tm-auth-sim"))
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "simulator of the True Markets Auth API",
        "--register",
        "--register-org",
        "--cert-out",
        "--ready-file",
        "--clock-offset",
        "/_sim/faults",
        "EXAMPLE",
    ] {
        assert!(text.contains(needle), "--help lacks {needle:?}");
    }
}

#[tokio::test]
async fn cli_registers_pem_jwk_and_bundle_files() {
    let dir = tempfile::tempdir().unwrap();
    let pem_key = TestKey::random();
    let jwk_key = TestKey::random();
    let bundle_key = TestKey::random();
    let org_key = TestKey::random();
    let pem_path = dir.path().join("pem.pub");
    std::fs::write(&pem_path, jose::public_key_pem(&pem_key.verifying_key())).unwrap();
    let jwk_path = dir.path().join("key.jwk");
    std::fs::write(
        &jwk_path,
        serde_json::to_string(&Jwk::from_verifying_key(&jwk_key.verifying_key())).unwrap(),
    )
    .unwrap();
    let bundle_path = dir.path().join("bundle.json");
    let j = Jwk::from_verifying_key(&bundle_key.verifying_key());
    let bundle = json!({
        "key_id": bundle_key.key_id, "label": "bot", "fingerprint": "fp",
        "created_at": "2026-01-01T00:00:00Z", "algorithm": "ES256",
        "private_key": {"kty": "EC", "crv": "P-256", "x": j.x, "y": j.y,
                        "d": URL_SAFE_NO_PAD.encode(bundle_key.signing_key.to_bytes())},
    });
    std::fs::write(&bundle_path, bundle.to_string()).unwrap();
    let org_path = dir.path().join("org.pem");
    std::fs::write(&org_path, jose::public_key_pem(&org_key.verifying_key())).unwrap();

    let sim = SimProcess::spawn(&[
        "--register".into(),
        format!("{}={}", pem_key.key_id, pem_path.display()),
        "--register".into(),
        format!("{}={}", jwk_key.key_id, jwk_path.display()),
        "--register".into(),
        bundle_path.display().to_string(),
        "--register-org".into(),
        format!("{}={}:org-7", org_key.key_id, org_path.display()),
        "--access-ttl".into(),
        "3".into(),
    ]);
    assert!(sim.ready.http.starts_with("http://127.0.0.1:"));
    assert!(sim.ready.https.starts_with("https://127.0.0.1:"));
    assert_eq!(sim.ready.ca_file.as_deref(), Some(sim.ca_file.as_path()));
    let client = sim_fixture::client_for(&sim.ca_file);
    for key in [&pem_key, &jwk_key, &bundle_key, &org_key] {
        let a = post(
            &client,
            &mint_url(&sim.ready.https),
            &key.mint_body(unix_now()),
        )
        .await;
        assert_token_response(&a, 3);
    }
    let a = post(
        &client,
        &mint_url(&sim.ready.http),
        &org_key.mint_body(unix_now()),
    )
    .await;
    let (_, claims) = jwt_parts(a.body["access_token"].as_str().unwrap());
    assert_eq!(claims["tm"]["organization_id"], "org-7");
    let counters = get(&client, &format!("{}/_sim/counters", sim.ready.http)).await;
    assert_eq!(counters.body["mints"], 5);

    // A bad key file makes the binary fail with a clear message.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tm-auth-sim"))
        .args([
            "--register",
            &format!(
                "{}={}",
                pem_key.key_id,
                dir.path().join("missing").display()
            ),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read key file"));
}

#[test]
fn background_fixture_works_from_sync_code() {
    let key = TestKey::random();
    let sim = sim_fixture::BackgroundSim::start(SimConfig {
        keys: vec![KeyRegistration::new(
            key.key_id.clone(),
            key.verifying_key(),
        )],
        ..SimConfig::default()
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = sim_fixture::client_for(&sim.ca_file);
    let a = rt.block_on(post(
        &client,
        &mint_url(&sim.handle.https_url()),
        &key.mint_body(unix_now()),
    ));
    assert_eq!(a.status, StatusCode::OK);
    drop(sim);
}

/// The independent proof: a Python client using the `cryptography` package, signing the
/// way the official SDKs do, mints and refreshes against the simulator.
#[tokio::test]
async fn python_sdk_style_client_mints_and_refreshes() {
    let have = std::process::Command::new("python3")
        .args(["-c", "import cryptography"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have {
        eprintln!("\n!!!!! SKIPPED python_sdk_style_client_mints_and_refreshes: python3 with the `cryptography` package is not available !!!!!\n");
        return;
    }
    let sim = SimFixture::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pem_out = dir.path().join("python-key.pub.pem");
    let key_id = TestKey::random().key_id;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sim_python_client.py");
    let (base, id, pem_path) = (sim.handle.http_url(), key_id.clone(), pem_out.clone());
    // Blocking child on the blocking pool, so the simulator keeps serving meanwhile.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(script)
            .arg(base)
            .arg(id)
            .arg(pem_path)
            .output()
    })
    .await
    .expect("join")
    .expect("run python client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert_eq!(lines[0]["step"], "mint");
    assert_eq!(lines[0]["status"], 200);
    assert_eq!(lines[1]["step"], "refresh");
    assert_eq!(lines[1]["status"], 200);
    // The PEM it wrote is the key the simulator registered.
    let pem = std::fs::read_to_string(&pem_out).unwrap();
    let vk = jose::parse_public_key(&pem).unwrap();
    let registered = sim.handle.keys();
    assert_eq!(registered.len(), 1);
    assert_eq!(
        registered[0].thumbprint,
        Jwk::from_verifying_key(&vk).thumbprint()
    );
    let c = sim.handle.counters();
    assert_eq!((c.mints, c.refreshes), (1, 1));
}
