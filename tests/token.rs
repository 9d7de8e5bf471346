//! The token manager end to end: a soft-signer `signer::Handle`, the real `auth_api::Client`
//! and the Auth API simulator (`tm_agent::sim`) over real HTTP and HTTPS on 127.0.0.1, in
//! real time. Each test has its own simulator instance, so the harness runs them in
//! parallel; durations are short (3 s access tokens) to keep the file under a minute.
//!
//! Handed-out tokens are checked independently of the agent's JWT code: the test decodes
//! the payload and verifies the ES256 signature against the simulator's JWKS with p256.

#[path = "common/sim.rs"]
mod sim_fixture;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use sim_fixture::{SimFixture, TestKey};
use tm_agent::auth_api::{self, ApiSettings};
use tm_agent::protocol::WireError;
use tm_agent::signer;
use tm_agent::sim::{FaultKind, FaultSpec, FaultTarget, SimConfig, SimHandle, DEFAULT_ISSUER};
use tm_agent::token::{AccessToken, Manager, TokenError, TokenSettings};
use tokio_util::sync::CancellationToken;

struct Rig {
    sim: SimFixture,
    manager: Manager,
    cancel: CancellationToken,
    started: Instant,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Via {
    Http,
    Https,
}

fn settings(key_id: &str) -> TokenSettings {
    TokenSettings {
        backoff_min: Duration::from_millis(250),
        backoff_max: Duration::from_secs(2),
        renew_timeout: Duration::from_secs(5),
        issuer: Some(DEFAULT_ISSUER.to_string()),
        ..TokenSettings::new(key_id)
    }
}

async fn rig(config: SimConfig, via: Via, tweak: impl FnOnce(&mut TokenSettings)) -> Rig {
    let sim = SimFixture::start_with(config).await;
    let key = TestKey::random();
    sim.register(&key);
    let (info, workers) = signer::soft::open(key.signing_key.clone(), "test key".into(), 1);
    let handle =
        signer::Handle::spawn(info, workers, signer::ActorOptions::default()).expect("soft signer");
    let api = match via {
        Via::Http => ApiSettings::custom(format!("{}/v1/auth", sim.handle.http_url())),
        Via::Https => ApiSettings {
            ca_file: Some(sim.ca_file.clone()),
            ..ApiSettings::custom(format!("{}/v1/auth", sim.handle.https_url()))
        },
    };
    let client = auth_api::Client::new(&api).expect("client");
    let mut s = settings(&key.key_id);
    tweak(&mut s);
    s.validate().expect("valid settings");
    let cancel = CancellationToken::new();
    let manager = Manager::start(s, handle, client, cancel.clone());
    Rig {
        sim,
        manager,
        cancel,
        started: Instant::now(),
    }
}

fn ttl_config(ttl: Duration) -> SimConfig {
    SimConfig {
        access_ttl: ttl,
        ..SimConfig::default()
    }
}

/// Verifies `token` with the simulator's published JWKS (independently of `token::jwt`)
/// and returns its `exp` (server clock, Unix seconds).
fn check_with_sim_jwks(sim: &SimHandle, token: &str) -> Result<f64, String> {
    check_with_keys(sim, &[], token)
}

/// As [`check_with_sim_jwks`], also accepting keys the simulator published earlier
/// (`earlier`: JWKS documents), as a token issued before a rotation is still genuine.
fn check_with_keys(
    sim: &SimHandle,
    earlier: &[serde_json::Value],
    token: &str,
) -> Result<f64, String> {
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err("not three parts".into());
    }
    let header: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(parts[0])
            .map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let payload: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(parts[1])
            .map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let kid = header["kid"].as_str().ok_or("no kid")?;
    let mut docs = earlier.to_vec();
    docs.push(sim.jwks());
    let jwk = docs
        .iter()
        .filter_map(|d| d["keys"].as_array())
        .flatten()
        .find(|k| k["kid"] == kid)
        .ok_or("kid not published")?
        .clone();
    let coord = |name: &str| URL_SAFE_NO_PAD.decode(jwk[name].as_str().unwrap_or_default());
    let mut sec1 = vec![4u8];
    sec1.extend(coord("x").map_err(|e| e.to_string())?);
    sec1.extend(coord("y").map_err(|e| e.to_string())?);
    let vk = VerifyingKey::from_sec1_bytes(&sec1).map_err(|e| e.to_string())?;
    let sig = Signature::from_slice(
        &URL_SAFE_NO_PAD
            .decode(parts[2])
            .map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    vk.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
        .map_err(|_| "signature does not verify".to_string())?;
    payload["exp"].as_f64().ok_or_else(|| "no exp".into())
}

fn unix_now_f64() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Calls `token(None)` in a loop until stopped, asserting that every token handed out is
/// unexpired (by `expires_at` and by its JWT `exp` on the simulator's clock) and verifies
/// with the simulator's JWKS. Returns (calls, distinct tokens, failed calls).
fn hammer(
    manager: Manager,
    sim: SimHandle,
    earlier: Vec<serde_json::Value>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, usize, u64)> {
    tokio::spawn(async move {
        let mut calls = 0u64;
        let mut failed = 0u64;
        let mut seen = HashSet::new();
        while !stop.load(Ordering::Relaxed) {
            calls += 1;
            match manager.token(None).await {
                Ok(t) => {
                    assert!(t.expires_at > SystemTime::now(), "expired token handed out");
                    let exp = check_with_keys(&sim, &earlier, &t.token)
                        .unwrap_or_else(|e| panic!("handed-out token fails verification: {e}"));
                    let server_now = unix_now_f64() + sim.clock_offset() as f64;
                    assert!(exp > server_now, "JWT exp {exp} not after {server_now}");
                    seen.insert(t.token.to_string());
                }
                Err(_) => failed += 1,
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (calls, seen.len(), failed)
    })
}

/// (seconds since start, `mint` | `refresh` | `withdrawn`, the token published).
type Timeline = Arc<Mutex<Vec<(f64, String, Option<Arc<AccessToken>>)>>>;

/// Records every published token (with the event that produced it) until stopped.
fn record(rig: &Rig) -> Timeline {
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut rx = rig.manager.subscribe();
    let manager = rig.manager.clone();
    let started = rig.started;
    let out = Arc::clone(&log);
    tokio::spawn(async move {
        let (mut mints, mut refreshes) = (0, 0);
        while rx.changed().await.is_ok() {
            let tok = rx.borrow_and_update().clone();
            let st = manager.status();
            let event = if st.mints > mints {
                "mint"
            } else if st.refreshes > refreshes {
                "refresh"
            } else if tok.is_none() {
                "withdrawn"
            } else {
                "?"
            };
            (mints, refreshes) = (st.mints, st.refreshes);
            out.lock()
                .unwrap()
                .push((started.elapsed().as_secs_f64(), event.to_string(), tok));
        }
    });
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_mint_over_http_and_https() {
    for via in [Via::Http, Via::Https] {
        let rig = rig(SimConfig::default(), via, |_| {}).await;
        let t = rig
            .manager
            .wait_ready(Duration::from_secs(5))
            .await
            .expect("first token");
        check_with_sim_jwks(&rig.sim.handle, &t.token).expect("verifies");
        let left = t.expires_at.duration_since(SystemTime::now()).unwrap();
        assert!(left > Duration::from_secs(890) && left <= Duration::from_secs(900));
        let c = rig.sim.handle.counters();
        assert_eq!((c.mints, c.refreshes, c.jwks_fetches), (1, 0, 1));
        let st = rig.manager.status();
        assert_eq!(st.mints, 1);
        assert!(st.last_mint.is_some() && st.next_refresh.is_some());
        assert_eq!(st.consecutive_failures, 0);
        // Answered from memory afterwards.
        let again = rig.manager.token(None).await.unwrap();
        assert!(Arc::ptr_eq(&t, &again));
        assert_eq!(rig.sim.handle.counters().requests.mint, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_without_the_simulator_ca_is_refused() {
    let sim = SimFixture::start().await;
    let key = TestKey::random();
    sim.register(&key);
    let base = format!("{}/v1/auth", sim.handle.https_url());
    let client = auth_api::Client::new(&ApiSettings::custom(base)).unwrap();
    let err = client.jwks().await.unwrap_err();
    assert_eq!(err.code(), "transport", "{err}");
    assert_eq!(sim.handle.counters().requests.jwks, 0);
    // The error envelope and the request id come through typed.
    let plain = format!("{}/v1/auth", sim.handle.http_url());
    let client = auth_api::Client::new(&ApiSettings::custom(plain)).unwrap();
    let body = tm_agent::jose::ChallengeBody {
        key_id: key.key_id.clone(),
        timestamp: sim_fixture::unix_now(),
        signature: key.sign(sim_fixture::unix_now() - 1000),
    };
    match client.mint(&body).await.unwrap_err() {
        auth_api::ApiError::Unauthorized {
            message,
            request_id,
        } => {
            assert_eq!(message, "invalid signature");
            assert!(request_id.is_some());
        }
        other => panic!("{other:?}"),
    }
    let jwks = client.jwks().await.unwrap();
    assert_eq!(jwks.keys.len(), 1);
    assert!(client.clock().offset_ms().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_refresh_over_many_rotations_never_hands_out_an_expired_token() {
    let rig = rig(ttl_config(Duration::from_secs(3)), Via::Https, |_| {}).await;
    let log = record(&rig);
    rig.manager
        .wait_ready(Duration::from_secs(5))
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let hammers: Vec<_> = (0..2)
        .map(|_| {
            hammer(
                rig.manager.clone(),
                rig.sim.handle.clone(),
                Vec::new(),
                Arc::clone(&stop),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(15)).await;
    stop.store(true, Ordering::Relaxed);
    let mut calls = 0;
    for h in hammers {
        let (c, distinct, failed) = h.await.expect("hammer task");
        assert_eq!(failed, 0, "token(None) failed during steady-state rotation");
        assert!(distinct >= 6, "only {distinct} distinct tokens seen");
        calls += c;
    }
    let c = rig.sim.handle.counters();
    assert_eq!(c.mints, 1, "{c:?}");
    assert!((8..=16).contains(&c.refreshes), "{c:?}");
    assert_eq!(
        c.rejected("refresh_reused"),
        0,
        "a refresh token was used twice"
    );
    assert_eq!(c.rejections.values().sum::<u64>(), 0, "{c:?}");
    let st = rig.manager.status();
    assert_eq!(st.consecutive_failures, 0);
    let log = log.lock().unwrap().clone();
    let mut timeline = String::new();
    for (at, event, tok) in log.iter() {
        let life = tok
            .as_ref()
            .map(|t| {
                t.expires_at
                    .duration_since(t.received_at)
                    .unwrap_or_default()
                    .as_secs_f64()
            })
            .unwrap_or_default();
        timeline.push_str(&format!("  t={at:6.3}s {event:8} lifetime={life:.3}s\n"));
    }
    eprintln!(
        "timeline ({calls} token() calls, {} refreshes):\n{timeline}",
        c.refreshes
    );
    // Refreshes land near 2/3 of the life. 3 s tokens carry a whole-second `exp`, and the
    // agent converts it to the local clock conservatively (the `Date` header has whole
    // seconds too), so a token counts as lasting ~1.9 s, occasionally ~0.9 s when the
    // server's second ticked between issuing the token and stamping `Date`.
    for pair in log.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!((0.5..=2.3).contains(&gap), "refresh after {gap:.3} s");
    }
}

/// A rig with 30 s tokens (HTTP), its first token, and 4.5 s gone since: asking then for
/// [`FORCES_RENEWAL`] forces a renewal. 30 s tokens last ~28.9 s on the local clock
/// (whole-second exp, conservative Date conversion), and 25.5 s is under 90% of a life.
async fn rig_with_a_token_4_5_s_old(
    tweak: impl FnOnce(&mut TokenSettings),
) -> (Rig, Arc<AccessToken>) {
    let rig = rig(ttl_config(Duration::from_secs(30)), Via::Http, tweak).await;
    let first = rig
        .manager
        .wait_ready(Duration::from_secs(5))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(4500)).await;
    (rig, first)
}

/// See [`rig_with_a_token_4_5_s_old`].
const FORCES_RENEWAL: Duration = Duration::from_millis(25_500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_refresh_family_and_refresh_401_remint() {
    let (rig, first) = rig_with_a_token_4_5_s_old(|_| {}).await;
    // The family is revoked server-side (as after a detected reuse).
    assert_eq!(rig.sim.handle.revoke_all_refresh_tokens(), 1);
    let t = rig
        .manager
        .token(Some(FORCES_RENEWAL))
        .await
        .expect("re-minted");
    assert!(t.token != first.token, "a new token");
    check_with_sim_jwks(&rig.sim.handle, &t.token).unwrap();
    let c = rig.sim.handle.counters();
    assert_eq!(c.rejected("refresh_revoked"), 1, "{c:?}");
    assert_eq!((c.mints, c.refreshes), (2, 0), "{c:?}");
    let st = rig.manager.status();
    assert_eq!((st.mints, st.refreshes, st.consecutive_failures), (2, 0, 0));
    assert_eq!(c.rejected("refresh_reused"), 0);
}

/// A refresh that the server carries out but whose answer never arrives (the connection drops
/// after the rotation): the refresh token may be spent, so the agent never sends it again
/// (the server would see a reuse and revoke the family, an alarm for its operators) and
/// mints a new pair instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_whose_answer_is_lost_after_the_rotation_recovers_by_minting() {
    let (rig, first) = rig_with_a_token_4_5_s_old(|s| {
        s.backoff_max = Duration::from_secs(1);
    })
    .await;
    let sim = &rig.sim.handle;
    sim.inject_fault(FaultSpec::next(
        FaultKind::LoseAnswer,
        FaultTarget::Refresh,
        1,
    ))
    .unwrap();
    // The first try loses its answer; a caller may hear an error while the agent backs off,
    // then gets the new token.
    let deadline = Instant::now() + Duration::from_secs(10);
    let t = loop {
        match rig.manager.token(Some(FORCES_RENEWAL)).await {
            Ok(t) => break t,
            Err(e) => {
                assert!(Instant::now() < deadline, "no new token in 10 s: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(t.token != first.token, "a new token");
    check_with_sim_jwks(sim, &t.token).unwrap();
    let c = sim.counters();
    assert_eq!(c.faults("lose_answer"), 1, "{c:?}");
    // The lost refresh took effect on the server, and nothing was sent again.
    assert_eq!(c.refreshes, 1, "{c:?}");
    assert_eq!(c.rejected("refresh_reused"), 0, "{c:?}");
    assert_eq!(c.mints, 2, "{c:?}");
    let st = rig.manager.status();
    assert_eq!((st.mints, st.refreshes, st.consecutive_failures), (2, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_storm_backs_off_without_a_hot_loop_and_recovers_within_one_step() {
    let rig = rig(ttl_config(Duration::from_secs(20)), Via::Http, |s| {
        s.backoff_min = Duration::from_millis(250);
        s.backoff_max = Duration::from_secs(4);
    })
    .await;
    rig.manager
        .wait_ready(Duration::from_secs(5))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let sim = &rig.sim.handle;
    let before = sim.counters().requests;
    let fault = FaultSpec::rate(
        FaultKind::Status {
            status: 503,
            retry_after_secs: None,
        },
        FaultTarget::All,
        1.0,
    );
    sim.inject_fault(fault).unwrap();
    let storm_start = Instant::now();
    // Ask for more than is left: the renewal fails, the caller hears why at once.
    let err = rig
        .manager
        .token(Some(Duration::from_secs(16)))
        .await
        .unwrap_err();
    assert_eq!(err.wire_code().as_str(), "unavailable", "{err}");
    assert!(err.to_string().contains("server_error"), "{err}");
    // A token is valid, just not for 16 s more: the error says so, not "no valid token".
    match &err {
        TokenError::ShortOfMinTtl { expires_in, .. } => {
            assert!(*expires_in > Duration::ZERO && *expires_in < Duration::from_secs(16));
        }
        other => panic!("expected ShortOfMinTtl, got {other:?}"),
    }
    let wire = WireError::from_token(&err, "prod");
    assert!(
        wire.message.contains("short of the min_ttl") && !wire.message.contains("no valid"),
        "{}",
        wire.message
    );
    // The valid token is still served during the storm.
    assert!(rig.manager.token(None).await.is_ok());
    tokio::time::sleep(Duration::from_secs(8)).await;
    let during = sim.counters();
    let storm = storm_start.elapsed();
    sim.clear_faults();
    let cleared = Instant::now();
    let attempts =
        (during.requests.refresh + during.requests.mint) - (before.refresh + before.mint);
    let st = rig.manager.status();
    eprintln!(
        "503 storm of {:.1} s: {attempts} API requests ({} refresh, {} mint), {} faults served, \
         consecutive_failures={}",
        storm.as_secs_f64(),
        during.requests.refresh - before.refresh,
        during.requests.mint - before.mint,
        during.faults("status_503"),
        st.consecutive_failures
    );
    // Steps 0.25, 0.5, 1, 2, 4, 4 s with full jitter: about log2(8 s / 0.25 s) + 2 requests.
    assert!(
        (3..=14).contains(&attempts),
        "{attempts} requests in the storm"
    );
    assert_eq!(st.last_error_code.as_deref(), Some("server_error"));
    // Recovery within one backoff step (4 s cap) after the storm.
    let mut rx = rig.manager.subscribe();
    tokio::time::timeout(
        Duration::from_millis(4500),
        rx.wait_for(|t| {
            t.as_ref()
                .is_some_and(|t| t.received_at > SystemTime::now() - cleared.elapsed())
        }),
    )
    .await
    .expect("recovered within one backoff step")
    .unwrap();
    eprintln!(
        "recovered {:.2} s after the storm",
        cleared.elapsed().as_secs_f64()
    );
    let st = rig.manager.status();
    assert_eq!(st.consecutive_failures, 0);
    assert_eq!(st.refreshes, 1, "the refresh token survived the storm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_a_token_life_answers_unavailable_then_recovers() {
    let rig = rig(ttl_config(Duration::from_secs(3)), Via::Https, |s| {
        s.backoff_max = Duration::from_secs(1);
    })
    .await;
    rig.manager
        .wait_ready(Duration::from_secs(5))
        .await
        .unwrap();
    let sim = &rig.sim.handle;
    sim.inject_fault(FaultSpec::rate(FaultKind::Reset, FaultTarget::All, 1.0))
        .unwrap();
    let mut rx = rig.manager.subscribe();
    tokio::time::timeout(Duration::from_secs(4), rx.wait_for(|t| t.is_none()))
        .await
        .expect("token withdrawn at expiry")
        .unwrap();
    let err = rig.manager.token(None).await.unwrap_err();
    assert_eq!(err.wire_code().as_str(), "unavailable", "{err}");
    assert_eq!(
        rig.manager.status().last_error_code.as_deref(),
        Some("transport")
    );
    sim.clear_faults();
    let t0 = Instant::now();
    let t = rig.manager.token(None).await;
    let t = match t {
        Ok(t) => t,
        // The caller may land in a backoff gap; the next step is at most 1 s away.
        Err(_) => rig
            .manager
            .wait_ready(Duration::from_secs(3))
            .await
            .expect("recovered"),
    };
    assert!(t.expires_at > SystemTime::now());
    check_with_sim_jwks(sim, &t.token).unwrap();
    assert!(t0.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_clock_40_s_ahead_resyncs_and_mints() {
    let config = SimConfig {
        clock_offset_secs: 40,
        access_ttl: Duration::from_secs(6),
        ..SimConfig::default()
    };
    let rig = rig(config, Via::Http, |_| {}).await;
    let t = rig
        .manager
        .wait_ready(Duration::from_secs(5))
        .await
        .unwrap();
    let c = rig.sim.handle.counters();
    assert_eq!(c.rejected("timestamp_out_of_window"), 1, "{c:?}");
    assert_eq!(c.mints, 1);
    let st = rig.manager.status();
    assert!((39..=41).contains(&st.clock_offset_secs), "{st:?}");
    // expires_at is on the local clock (about 6 s from now), not 40 s later. Up to 1 s of
    // the 6 is lost to the whole-second `exp`, up to 1 s more to the 1 s resolution of the
    // `Date` header (converted conservatively), and some to the time since the mint: a
    // token left with 3.9 s was seen under load, so the floor is 3 s.
    let left = t.expires_at.duration_since(SystemTime::now()).unwrap();
    assert!(
        left > Duration::from_secs(3) && left < Duration::from_secs(6),
        "{left:?}"
    );
    let skew = rig
        .manager
        .server_now()
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(skew > Duration::from_secs(38), "{skew:?}");

    // The server's clock jumps back by 80 s and the refresh family is revoked: the scheduled
    // refresh is refused, and the mint after it already uses the clock learned from that
    // refusal's Date (no second timestamp rejection).
    rig.sim.handle.set_clock_offset(-40).unwrap();
    rig.sim.handle.revoke_all_refresh_tokens();
    let mut rx = rig.manager.subscribe();
    let manager = rig.manager.clone();
    tokio::time::timeout(
        Duration::from_secs(8),
        rx.wait_for(|_| manager.status().mints == 2),
    )
    .await
    .expect("re-minted on the new server clock")
    .unwrap();
    let c = rig.sim.handle.counters();
    assert_eq!(c.mints, 2, "{c:?}");
    assert_eq!(c.rejected("refresh_revoked"), 1, "{c:?}");
    assert_eq!(c.rejected("timestamp_out_of_window"), 1, "{c:?}");
    assert!((-41..=-39).contains(&rig.manager.status().clock_offset_secs));
    let t = rig.manager.token(None).await.unwrap();
    let exp = check_with_sim_jwks(&rig.sim.handle, &t.token).unwrap();
    assert!(exp > unix_now_f64() - 40.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_rotation_keeps_tokens_verifying() {
    let rig = rig(ttl_config(Duration::from_secs(3)), Via::Https, |_| {}).await;
    rig.manager
        .wait_ready(Duration::from_secs(5))
        .await
        .unwrap();
    let sim = &rig.sim.handle;
    let old_kid = sim.current_kid();
    let stop = Arc::new(AtomicBool::new(false));
    let before_rotation = vec![sim.jwks()];
    let h = hammer(
        rig.manager.clone(),
        sim.clone(),
        before_rotation,
        Arc::clone(&stop),
    );
    // No grace: the old key leaves the JWKS at once.
    let info = sim.rotate_jwks(Some(Duration::ZERO)).unwrap();
    assert_ne!(info.kid, old_kid);
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    let (_, distinct, _failed) = h.await.unwrap();
    assert!(distinct >= 2);
    let t = rig.manager.token(None).await.unwrap();
    let header: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(t.token.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["kid"], info.kid.as_str());
    let c = sim.counters();
    assert_eq!(
        c.jwks_fetches, 2,
        "one fetch at start, one for the new kid: {c:?}"
    );
    assert_eq!(rig.manager.status().consecutive_failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_signed_by_a_foreign_key_are_never_handed_out() {
    for same_kid in [true, false] {
        let sim = SimFixture::start_with(SimConfig::default()).await;
        // The first three access tokens are forged; the manager must reject each.
        sim.handle.sign_with_foreign_key(3, same_kid);
        let key = TestKey::random();
        sim.register(&key);
        let (info, workers) = signer::soft::open(key.signing_key.clone(), "test".into(), 1);
        let handle = signer::Handle::spawn(info, workers, signer::ActorOptions::default()).unwrap();
        let client = auth_api::Client::new(&ApiSettings::custom(format!(
            "{}/v1/auth",
            sim.handle.http_url()
        )))
        .unwrap();
        let cancel = CancellationToken::new();
        let manager = Manager::start(settings(&key.key_id), handle, client, cancel.clone());
        let mut rx = manager.subscribe();
        let published = tokio::spawn(async move {
            let mut all = Vec::new();
            while rx.changed().await.is_ok() {
                if let Some(t) = rx.borrow_and_update().clone() {
                    all.push(t);
                }
            }
            all
        });
        let t = manager
            .wait_ready(Duration::from_secs(10))
            .await
            .expect("a genuine token after the forged ones");
        check_with_sim_jwks(&sim.handle, &t.token).expect("genuine");
        let c = sim.handle.counters();
        assert_eq!(c.foreign_tokens, 3, "{c:?}");
        let st = manager.status();
        if same_kid {
            // A known kid whose signature fails: the pair is dropped, the next attempt mints.
            assert_eq!((c.mints, c.refreshes), (4, 0), "{c:?}");
            assert_eq!((st.mints, st.refreshes), (1, 0), "{st:?}");
            assert_eq!(
                st.last_error_code.as_deref(),
                Some("invalid_token"),
                "{st:?}"
            );
        } else {
            // Unknown kids: the first two refetch the JWKS (at start, then for the kid) and
            // fail the check; the third comes within jwks_min_refetch of that refetch, so it
            // waits unchecked and its pair's refresh token brings the genuine token.
            assert_eq!((c.mints, c.refreshes), (3, 1), "{c:?}");
            assert_eq!((st.mints, st.refreshes), (0, 1), "{st:?}");
            assert_eq!(
                st.last_error_code.as_deref(),
                Some("jwks_pending"),
                "{st:?}"
            );
        }
        assert!(c.jwks_fetches <= 2, "JWKS refetch is rate-limited: {c:?}");
        cancel.cancel();
        drop(manager);
        for t in published.await.unwrap() {
            check_with_sim_jwks(&sim.handle, &t.token).expect("only genuine tokens published");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_callers_cause_exactly_one_renewal() {
    let rig = rig(ttl_config(Duration::from_secs(30)), Via::Https, |_| {}).await;
    rig.manager
        .wait_ready(Duration::from_secs(5))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let sim = &rig.sim.handle;
    sim.inject_fault(FaultSpec::next(
        FaultKind::Latency(Duration::from_millis(300)),
        FaultTarget::Refresh,
        1,
    ))
    .unwrap();
    let before = sim.counters();
    let want = Duration::from_millis(25_500);
    let remaining = rig.manager.token(None).await.unwrap().expires_at;
    assert!(remaining.duration_since(SystemTime::now()).unwrap() < want);
    let callers: Vec<_> = (0..100)
        .map(|_| {
            let m = rig.manager.clone();
            tokio::spawn(async move { m.token(Some(want)).await })
        })
        .collect();
    let mut distinct = HashSet::new();
    for c in callers {
        let t = c.await.unwrap().expect("token");
        assert!(t.expires_at.duration_since(SystemTime::now()).unwrap() >= want);
        distinct.insert(t.token.to_string());
    }
    let after = sim.counters();
    assert_eq!(distinct.len(), 1);
    assert_eq!(
        after.requests.refresh - before.requests.refresh,
        1,
        "{after:?}"
    );
    assert_eq!(after.requests.mint - before.requests.mint, 0, "{after:?}");
    assert_eq!(after.refreshes, 1);
}

/// The simulator's refresh endpoint answers 503 (its mint endpoint works): the agent keeps
/// retrying its refresh token while the access token is valid, then mints once it has
/// expired instead of leaving every client without a token until refreshes work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_outage_falls_back_to_a_mint_once_the_token_expired() {
    let rig = rig(ttl_config(Duration::from_secs(3)), Via::Http, |s| {
        s.backoff_min = Duration::from_millis(200);
        s.backoff_max = Duration::from_millis(500);
    })
    .await;
    let first = rig
        .manager
        .wait_ready(Duration::from_secs(5))
        .await
        .unwrap();
    let sim = &rig.sim.handle;
    let fault = FaultSpec::rate(
        FaultKind::Status {
            status: 503,
            retry_after_secs: None,
        },
        FaultTarget::Refresh,
        1.0,
    );
    sim.inject_fault(fault).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while sim.counters().mints < 2 {
        assert!(
            Instant::now() < deadline,
            "no mint in 10 s: {:?}",
            sim.counters()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = sim.counters();
    assert!(
        c.faults("status_503") >= 1,
        "refreshes were tried first: {c:?}"
    );
    assert_eq!(c.refreshes, 0, "{c:?}");
    assert!(
        SystemTime::now() >= first.expires_at,
        "minted only once the token had expired"
    );
    let t = rig.manager.token(None).await.unwrap();
    assert_ne!(t.token, first.token);
    check_with_sim_jwks(sim, &t.token).unwrap();
}
