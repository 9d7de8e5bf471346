//! Unit tests of the token manager: pure schedule/backoff math (paused clock where time
//! matters) and the state machine against a tiny in-memory fake of the Auth API (real time,
//! sub-second to a few seconds). The real simulator over HTTP is exercised in
//! `tests/token.rs`.

use super::*;
use p256::ecdsa::SigningKey;
use std::collections::HashSet;
use std::sync::atomic::AtomicU32;

// ---------- pure logic ----------

#[test]
fn refresh_point_defaults_and_clamps() {
    let s = TokenSettings::new("k");
    let hour = Duration::from_secs(3600);
    // 2/3 of an hour, ±10%.
    assert_eq!(refresh_delay(hour, &s, 0.0), hour.mul_f64(0.66));
    assert_eq!(refresh_delay(hour, &s, 1.0), hour.mul_f64(0.66 * 1.1));
    assert_eq!(refresh_delay(hour, &s, -1.0), hour.mul_f64(0.66 * 0.9));
    // Never later than 2 min before expiry: a 400 s token refreshes at 280 s at the latest
    // (not at 0.66 * 1.1 * 400 = 290 s).
    let l = Duration::from_secs(400);
    assert_eq!(refresh_delay(l, &s, 1.0), Duration::from_secs(280));
    // ... and the margin is at most a third of the life: 300 s → 200 s at the latest.
    assert_eq!(
        refresh_delay(Duration::from_secs(300), &s, 1.0),
        Duration::from_secs(200)
    );
    // Short test TTLs: the 2 min margin clamps to a third of the life, never "now".
    let three = Duration::from_secs(3);
    let d = refresh_delay(three, &s, 1.0);
    assert_eq!(d, Duration::from_secs(2));
    let d = refresh_delay(three, &s, -1.0);
    assert!(
        d > Duration::from_millis(1700) && d < Duration::from_secs(2),
        "{d:?}"
    );
    assert!(refresh_delay(Duration::ZERO, &s, 0.0).is_zero());
}

#[test]
fn backoff_is_exponential_full_jitter_capped_and_honours_retry_after() {
    let s = TokenSettings::new("k");
    let step = |n| backoff_delay(n, &s, 1.0, None);
    assert_eq!(step(1), Duration::from_millis(500));
    assert_eq!(step(2), Duration::from_secs(1));
    assert_eq!(step(4), Duration::from_secs(4));
    assert_eq!(step(8), Duration::from_secs(60));
    assert_eq!(step(u32::MAX), Duration::from_secs(60));
    assert_eq!(
        backoff_delay(3, &s, 0.5, None),
        Duration::from_secs(1),
        "full jitter: uniform below the step"
    );
    assert_eq!(backoff_delay(1, &s, 0.0, None), Duration::from_millis(10));
    assert_eq!(
        backoff_delay(1, &s, 0.1, Some(Duration::from_secs(7))),
        Duration::from_secs(7)
    );
    // A Retry-After beyond RETRY_AFTER_MAX (here also backoff_max) waits that long.
    assert_eq!(
        backoff_delay(1, &s, 0.1, Some(Duration::from_secs(86_400))),
        Duration::from_secs(60)
    );
}

/// Drives the backoff schedule on tokio's paused clock: a 60 s outage costs a number of
/// attempts logarithmic in its length, not a hot loop.
#[tokio::test(start_paused = true)]
async fn backoff_schedule_over_a_storm_on_the_paused_clock() {
    let s = TokenSettings::new("k");
    let storm = Duration::from_secs(60);
    let start = Instant::now();
    let mut worst = 0;
    for _trial in 0..50 {
        let t0 = Instant::now();
        let mut failures = 0;
        while t0.elapsed() < storm {
            failures += 1;
            let unit = rand::thread_rng().gen_range(0.0..=1.0);
            tokio::time::sleep(backoff_delay(failures, &s, unit, None)).await;
        }
        worst = worst.max(failures);
    }
    assert!(worst <= 20, "{worst} attempts in 60 s");
    assert!(start.elapsed() >= storm * 50);
}

#[test]
fn settings_defaults_toml_and_validation() {
    let s: TokenSettings = toml::from_str("key_id = \"abc\"").unwrap();
    assert_eq!(s, TokenSettings::new("abc"));
    assert_eq!(s.refresh_at_fraction, 0.66);
    assert_eq!(s.backoff_min, Duration::from_millis(500));
    s.validate().unwrap();
    let s: TokenSettings = toml::from_str(
        "key_id = \"abc\"\nbackoff_min = 0.25\nbackoff_max = 4\nrenew_timeout = 2.5\nissuer = \"tm\"",
    )
    .unwrap();
    assert_eq!(s.backoff_min, Duration::from_millis(250));
    assert_eq!(s.backoff_max, Duration::from_secs(4));
    assert_eq!(s.renew_timeout, Duration::from_millis(2500));
    assert!(toml::from_str::<TokenSettings>("key_id = \"a\"\nrefresh_in = 3").is_err());
    assert!(toml::from_str::<TokenSettings>("refresh_at_fraction = 0.5").is_err());
    let bad = TokenSettings {
        key_id: " ".into(),
        refresh_at_fraction: 1.5,
        jitter: 0.9,
        backoff_min: Duration::from_secs(2),
        backoff_max: Duration::from_secs(1),
        ..TokenSettings::default()
    };
    assert_eq!(bad.validate().unwrap_err().len(), 4);
}

#[test]
fn access_token_debug_is_redacted() {
    let t = AccessToken {
        token: Arc::from("eyJsecret.x.y"),
        expires_at: SystemTime::now(),
        received_at: SystemTime::now(),
    };
    assert!(!format!("{t:?}").contains("eyJ"));
}

// ---------- the state machine against an in-memory fake ----------

#[derive(Default)]
struct Counters {
    mint_calls: AtomicU32,
    refresh_calls: AtomicU32,
    /// Refresh calls with a refresh token that was not live (spent or revoked).
    refused_refreshes: AtomicU32,
    jwks_calls: AtomicU32,
}

struct FakeState {
    issuer: SigningKey,
    kid: String,
    ttl: Duration,
    /// Server clock minus local clock, reported as if by `Date`.
    server_offset_ms: i64,
    /// Added to what `Date` reports (a wrong header; the tokens keep the true clock).
    date_lie_ms: i64,
    /// Errors returned (in order) by the next mint/refresh calls.
    script: Vec<ApiError>,
    /// While set, every mint/refresh fails with a 503.
    outage: bool,
    /// Sign access tokens with a key that is not in the JWKS.
    foreign: bool,
    /// Live refresh tokens.
    live: HashSet<String>,
    serial: u64,
    latency: Duration,
    /// The next mint/refresh panics (a bug in the API client, say).
    panic: bool,
    /// Replaces the `exp` claim of issued access tokens.
    exp_claim: Option<serde_json::Value>,
    /// While set, the JWKS answers 503.
    jwks_down: bool,
    /// While set, refreshes answer 503 (mints still work).
    refresh_down: bool,
}

#[derive(Clone)]
struct Fake {
    clock: ServerClock,
    state: Arc<Mutex<FakeState>>,
    n: Arc<Counters>,
}

impl Fake {
    fn new(ttl: Duration) -> Fake {
        Fake {
            clock: ServerClock::default(),
            state: Arc::new(Mutex::new(FakeState {
                issuer: SigningKey::from_slice(&[9; 32]).unwrap(),
                kid: "k1".into(),
                ttl,
                server_offset_ms: 0,
                date_lie_ms: 0,
                script: Vec::new(),
                outage: false,
                foreign: false,
                live: HashSet::new(),
                serial: 0,
                latency: Duration::from_millis(20),
                panic: false,
                exp_claim: None,
                jwks_down: false,
                refresh_down: false,
            })),
            n: Arc::new(Counters::default()),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut FakeState) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    fn issue(&self, st: &mut FakeState) -> TokenPair {
        st.serial += 1;
        let server_now = auth_api::shift(SystemTime::now(), st.server_offset_ms);
        let iat_secs = server_now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let exp = server_now + st.ttl;
        let exp_secs = exp
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let key = if st.foreign {
            SigningKey::from_slice(&[8; 32]).unwrap()
        } else {
            st.issuer.clone()
        };
        let access = jwt::sign_for_test(
            &key,
            &st.kid,
            &serde_json::json!({
                "exp": st.exp_claim.clone().unwrap_or(exp_secs.into()),
                "iat": iat_secs,
                "iss": "fake",
                "n": st.serial
            }),
        );
        let refresh = format!("rt-{}", st.serial);
        st.live.insert(refresh.clone());
        TokenPair {
            access_token: Arc::from(access),
            refresh_token: SecretString::from(refresh),
            expires_at: exp,
            token_type: "Bearer".into(),
        }
    }

    /// Latency, then `Date`, then the scripted failure if any.
    async fn front(&self) -> Result<(), ApiError> {
        let latency = self.with(|s| s.latency);
        tokio::time::sleep(latency).await;
        let offset = self.with(|s| s.server_offset_ms + s.date_lie_ms);
        self.clock.set_offset_ms(offset);
        if self.with(|s| std::mem::take(&mut s.panic)) {
            panic!("fake Auth API client bug (expected by this test)");
        }
        self.with(|s| {
            if s.outage {
                return Err(ApiError::Server {
                    status: 503,
                    message: "Service Unavailable".into(),
                    retry_after: None,
                });
            }
            if s.script.is_empty() {
                Ok(())
            } else {
                Err(s.script.remove(0))
            }
        })
    }
}

impl Api for Fake {
    async fn mint(&self, body: &jose::ChallengeBody) -> Result<TokenPair, ApiError> {
        self.n.mint_calls.fetch_add(1, Ordering::SeqCst);
        self.front().await?;
        self.with(|s| {
            let server_now = auth_api::shift(SystemTime::now(), s.server_offset_ms)
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
            if (server_now - body.timestamp).abs() > 30 {
                return Err(ApiError::Unauthorized {
                    message: "timestamp outside the allowed window".into(),
                    request_id: None,
                });
            }
            Ok(self.issue(s))
        })
    }

    async fn refresh(&self, refresh_token: &SecretString) -> Result<TokenPair, ApiError> {
        use secrecy::ExposeSecret as _;
        self.n.refresh_calls.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = self.front().await {
            // An answer that does not parse came after the server did the work: spent.
            if matches!(e, ApiError::Protocol(_)) {
                self.with(|s| s.live.remove(refresh_token.expose_secret()));
            }
            return Err(e);
        }
        self.with(|s| {
            if s.refresh_down {
                return Err(ApiError::Server {
                    status: 503,
                    message: "Service Unavailable".into(),
                    retry_after: None,
                });
            }
            if !s.live.remove(refresh_token.expose_secret()) {
                self.n.refused_refreshes.fetch_add(1, Ordering::SeqCst);
                return Err(ApiError::Unauthorized {
                    message: "refresh token revoked".into(),
                    request_id: None,
                });
            }
            Ok(self.issue(s))
        })
    }

    async fn jwks(&self) -> Result<auth_api::Jwks, ApiError> {
        self.n.jwks_calls.fetch_add(1, Ordering::SeqCst);
        if self.with(|s| s.jwks_down) {
            return Err(ApiError::Server {
                status: 503,
                message: "Service Unavailable".into(),
                retry_after: None,
            });
        }
        let (key, kid) = self.with(|s| (s.issuer.clone(), s.kid.clone()));
        let mut jwk = jose::Jwk::from_verifying_key(key.verifying_key());
        jwk.kid = Some(kid);
        Ok(auth_api::Jwks {
            keys: vec![jwk],
            skipped: 0,
        })
    }

    fn clock(&self) -> &ServerClock {
        &self.clock
    }
}

fn signer() -> signer::Handle {
    let key = SigningKey::from_slice(&[7; 32]).unwrap();
    let (info, workers) = signer::soft::open(key, "test".into(), 1);
    signer::Handle::spawn(info, workers, signer::ActorOptions::default()).unwrap()
}

fn settings() -> TokenSettings {
    TokenSettings {
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_millis(400),
        renew_timeout: Duration::from_secs(3),
        ..TokenSettings::new("key-1")
    }
}

fn start(fake: &Fake, settings: TokenSettings) -> (Manager, CancellationToken) {
    let cancel = CancellationToken::new();
    let m = Manager::start_with(settings, signer(), fake.clone(), cancel.clone());
    (m, cancel)
}

/// A `Date` header 5 minutes behind moves the server clock the agent learns, but the token's
/// own `exp - iat`, counted from its arrival, still bounds how long it is handed out.
#[tokio::test]
async fn a_wrong_date_header_cannot_stretch_a_token_past_its_life() {
    let fake = Fake::new(Duration::from_secs(2));
    fake.with(|s| s.date_lie_ms = -300_000);
    let (m, cancel) = start(&fake, settings());
    let t = m.wait_ready(Duration::from_secs(5)).await.unwrap();
    let left = t
        .expires_at
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    assert!(
        left <= Duration::from_secs(2),
        "{left:?} left of a 2 s token"
    );
    cancel.cancel();
}

#[tokio::test]
async fn mints_at_start_then_refreshes_on_schedule_never_serving_expired() {
    let fake = Fake::new(Duration::from_millis(1500));
    let (m, cancel) = start(&fake, settings());
    let first = m.wait_ready(Duration::from_secs(3)).await.unwrap();
    assert!(first.expires_at > SystemTime::now());
    let stop = Instant::now() + Duration::from_millis(4000);
    let mut seen = HashSet::new();
    while Instant::now() < stop {
        let t = m.token(None).await.unwrap();
        assert!(t.expires_at > SystemTime::now(), "expired token handed out");
        seen.insert(t.token.to_string());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = m.status();
    assert_eq!(st.mints, 1);
    assert!(st.refreshes >= 3, "{st:?}");
    assert!(seen.len() >= 4);
    assert_eq!(fake.n.jwks_calls.load(Ordering::SeqCst), 1, "JWKS cached");
    assert!(st.last_mint.is_some() && st.last_refresh.is_some() && st.next_refresh.is_some());
    cancel.cancel();
    let mut rx = m.subscribe();
    rx.wait_for(|t| t.is_none()).await.unwrap();
    assert_eq!(
        m.token(None).await.unwrap_err().wire_code().as_str(),
        "unavailable"
    );
}

#[tokio::test]
async fn hundred_callers_share_one_renewal() {
    let fake = Fake::new(Duration::from_secs(3));
    fake.with(|s| s.latency = Duration::from_millis(150));
    let (m, _cancel) = start(&fake, settings());
    m.wait_ready(Duration::from_secs(3)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before = m.token(None).await.unwrap();
    let want = Duration::from_millis(2600);
    assert!(before.remaining(SystemTime::now()) < want);
    let calls = (0..100).map(|_| {
        let m = m.clone();
        tokio::spawn(async move { m.token(Some(want)).await })
    });
    let mut tokens = HashSet::new();
    for c in calls.collect::<Vec<_>>() {
        let t = c.await.unwrap().unwrap();
        // The fake's 3 s tokens last ~2.25 s here (latency, expiry conversion margin).
        assert!(t.remaining(SystemTime::now()) >= Duration::from_millis(1900));
        tokens.insert(t.token.to_string());
    }
    assert_eq!(tokens.len(), 1);
    assert_eq!(fake.n.refresh_calls.load(Ordering::SeqCst), 1);
    assert_eq!(fake.n.mint_calls.load(Ordering::SeqCst), 1);
    // A min_ttl above a fresh token's whole life is capped: answered from memory.
    let t = m.token(Some(Duration::from_secs(3600))).await.unwrap();
    assert_eq!(&*t.token, tokens.iter().next().unwrap().as_str());
    assert_eq!(fake.n.refresh_calls.load(Ordering::SeqCst), 1);
}

/// What the server's answer from memory and the manager both use: a `min_ttl` beyond 90%
/// of the token's lifetime counts as 90%; an expired token serves nothing.
#[test]
fn a_token_serves_min_ttl_up_to_nine_tenths_of_its_life() {
    let now = SystemTime::now();
    let token = AccessToken {
        token: Arc::from("t"),
        expires_at: now + Duration::from_secs(950),
        received_at: now - Duration::from_secs(50),
    };
    assert!(token.serves(Duration::ZERO, now));
    assert!(token.serves(Duration::from_secs(900), now));
    // 95% of the lifetime asked, 90% (900 s) is all a renewal guarantees: served.
    assert!(token.serves(Duration::from_secs(950), now));
    assert!(token.serves(Duration::from_secs(3600), now));
    // With less than 90% of the life left, a large ask is not served.
    let later = now + Duration::from_secs(100);
    assert!(!token.serves(Duration::from_secs(3600), later));
    assert!(token.serves(Duration::from_secs(800), later));
    assert!(!token.serves(Duration::ZERO, now + Duration::from_secs(951)));
}

/// A JWKS that cannot be fetched when the cached one is due for a refresh does not stop
/// renewals while the cached keys know the token's `kid`.
#[tokio::test]
async fn a_jwks_outage_does_not_stop_renewals_signed_by_a_known_key() {
    let fake = Fake::new(Duration::from_millis(1500));
    let settings = TokenSettings {
        jwks_max_age: Duration::from_millis(200),
        ..settings()
    };
    let (m, _cancel) = start(&fake, settings);
    let first = m.wait_ready(Duration::from_secs(3)).await.unwrap();
    fake.with(|s| s.jwks_down = true);
    let jwks_before = fake.n.jwks_calls.load(Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let t = m.token(None).await.unwrap();
        if t.token != first.token {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no renewal during the JWKS outage"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(fake.n.jwks_calls.load(Ordering::SeqCst) > jwks_before);
    assert_eq!(m.status().consecutive_failures, 0);
}

/// The API rotates its signing key twice, faster than the JWKS may be refetched for an
/// unknown kid, and once while the JWKS cannot be fetched: the tokens that cannot be
/// checked yet are not handed out, but their refresh tokens are kept, so no attempt falls
/// back to a fresh mint, and the last one is accepted once the JWKS lists its key.
#[tokio::test]
async fn key_rotations_faster_than_the_jwks_refetch_keep_the_refresh_token() {
    let fake = Fake::new(Duration::from_millis(1500));
    let settings = TokenSettings {
        jwks_min_refetch: Duration::from_secs(3),
        ..settings()
    };
    let (m, _cancel) = start(&fake, settings);
    let first = m.wait_ready(Duration::from_secs(3)).await.unwrap();
    let rotate = |n: u8| {
        fake.with(|s| {
            s.issuer = SigningKey::from_slice(&[20 + n; 32]).unwrap();
            s.kid = format!("k{n}");
        })
    };
    let wait_for_new = |old: Arc<AccessToken>, limit: Duration| {
        let m = m.clone();
        async move {
            let deadline = Instant::now() + limit;
            let mut codes = HashSet::new();
            loop {
                if let Some(code) = m.status().last_error_code {
                    codes.insert(code);
                }
                if let Some(t) = m.subscribe().borrow().clone() {
                    if t.token != old.token {
                        return (t, codes);
                    }
                }
                assert!(Instant::now() < deadline, "no new token; errors {codes:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // A first rotation: the unknown kid refetches the JWKS at once.
    rotate(2);
    let (second, _) = wait_for_new(first, Duration::from_secs(3)).await;
    // A second one right after: within jwks_min_refetch, so checking waits.
    rotate(3);
    let (third, codes) = wait_for_new(second, Duration::from_secs(8)).await;
    assert!(codes.contains("jwks_pending"), "{codes:?}");
    // A third one while the JWKS is down: the failed fetch does not count against the
    // rate limit, and the pair waits too.
    fake.with(|s| s.jwks_down = true);
    rotate(4);
    // Past the 3 s of jwks_min_refetch, so that fetches are tried (and fail) meanwhile.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    fake.with(|s| s.jwks_down = false);
    let (_, codes) = wait_for_new(third, Duration::from_secs(8)).await;
    assert!(codes.contains("server_error"), "{codes:?}");
    assert_eq!(
        fake.n.mint_calls.load(Ordering::SeqCst),
        1,
        "no attempt fell back to a mint"
    );
    assert_eq!(fake.n.refused_refreshes.load(Ordering::SeqCst), 0);
}

/// A refresh answer that does not parse (a 200 with a broken body) came after the server
/// rotated the refresh token: the old one is never sent again; the next renewal mints.
#[tokio::test]
async fn a_refresh_answer_that_does_not_parse_spends_the_refresh_token() {
    let fake = Fake::new(Duration::from_millis(1500));
    let (m, _cancel) = start(&fake, settings());
    m.wait_ready(Duration::from_secs(3)).await.unwrap();
    fake.with(|s| s.script.push(ApiError::Protocol("truncated body".into())));
    let deadline = Instant::now() + Duration::from_secs(5);
    while fake.n.mint_calls.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "no second mint");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fake.n.refresh_calls.load(Ordering::SeqCst), 1);
    assert_eq!(fake.n.refused_refreshes.load(Ordering::SeqCst), 0);
    assert!(m.token(None).await.is_ok());
}

#[tokio::test]
async fn refused_refresh_remints_with_a_fresh_signature() {
    let fake = Fake::new(Duration::from_secs(3));
    let (m, _cancel) = start(&fake, settings());
    m.wait_ready(Duration::from_secs(3)).await.unwrap();
    fake.with(|s| s.live.clear()); // the family is revoked
    tokio::time::sleep(Duration::from_millis(600)).await;
    let t = m.token(Some(Duration::from_millis(2600))).await;
    assert!(t.is_ok(), "{t:?}");
    assert_eq!(fake.n.refresh_calls.load(Ordering::SeqCst), 1);
    assert_eq!(fake.n.mint_calls.load(Ordering::SeqCst), 2);
    let st = m.status();
    assert_eq!((st.mints, st.refreshes, st.consecutive_failures), (2, 0, 0));
}

/// A refresh endpoint that answers 503 while minting works: the refresh token is kept (and
/// retried) while the access token is valid; once that has expired, the agent mints rather
/// than leave its clients without a token until the refresh endpoint is back.
#[tokio::test]
async fn a_failing_refresh_endpoint_falls_back_to_a_mint_once_the_token_expired() {
    let fake = Fake::new(Duration::from_millis(1500));
    let (m, _cancel) = start(&fake, settings());
    let first = m.wait_ready(Duration::from_secs(3)).await.unwrap();
    fake.with(|s| s.refresh_down = true);
    let deadline = Instant::now() + Duration::from_secs(6);
    while fake.n.mint_calls.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "no mint after the token expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Refreshes were tried first, until the token expired.
    assert!(fake.n.refresh_calls.load(Ordering::SeqCst) >= 2);
    assert!(SystemTime::now() >= first.expires_at);
    let t = m.token(None).await.unwrap();
    assert_ne!(t.token, first.token);
    assert_eq!(fake.n.refused_refreshes.load(Ordering::SeqCst), 0);
}

/// The fallback does not wait out the back-off: when the token expires while refreshes are
/// failing, the agent mints at once (not after one more back-off and one more refresh).
#[tokio::test]
async fn the_fallback_mint_comes_when_the_token_expires_not_after_the_back_off() {
    let fake = Fake::new(Duration::from_millis(1500));
    let mut s = settings();
    s.backoff_min = Duration::from_secs(4);
    s.backoff_max = Duration::from_secs(4);
    let (m, _cancel) = start(&fake, s);
    let first = m.wait_ready(Duration::from_secs(3)).await.unwrap();
    fake.with(|s| s.refresh_down = true);
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.n.mint_calls.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "no mint");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let late = SystemTime::now()
        .duration_since(first.expires_at)
        .unwrap_or_default();
    assert!(
        late < Duration::from_millis(500),
        "minted {late:?} after the token expired"
    );
}

/// A soft signer that fails while `down` is set (a removed token, say).
struct Flaky {
    key: SigningKey,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl signer::Signer for Flaky {
    fn sign_digest(
        &mut self,
        digest: &[u8; 32],
    ) -> Result<p256::ecdsa::Signature, signer::SignerError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(signer::SignerError::Unavailable(
                "the token is gone (test)".into(),
            ));
        }
        signer::soft::sign_prehash(&self.key, digest)
    }
}

/// When the key, not the API, failed a mint, the retry comes within SIGNER_RETRY_MAX
/// whatever the back-off has grown to: a token follows within seconds of the key's return,
/// not after a back-off of up to a minute.
#[tokio::test]
async fn a_mint_the_key_failed_is_retried_soon_whatever_the_back_off() {
    let fake = Fake::new(Duration::from_secs(2));
    let key = SigningKey::from_slice(&[7; 32]).unwrap();
    let (info, _) = signer::soft::open(key.clone(), "test".into(), 1);
    let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker = Flaky {
        key,
        down: Arc::clone(&down),
    };
    let handle = signer::Handle::spawn(
        info,
        vec![Box::new(worker)],
        signer::ActorOptions::default(),
    )
    .unwrap();
    let mut s = settings();
    s.backoff_min = Duration::from_secs(20);
    s.backoff_max = Duration::from_secs(20);
    let cancel = CancellationToken::new();
    let m = Manager::start_with(s, handle, fake.clone(), cancel.clone());
    m.wait_ready(Duration::from_secs(3)).await.unwrap();
    // The key goes away and the refresh family is revoked: the next renewal must mint.
    down.store(true, Ordering::SeqCst);
    fake.with(|s| s.live.clear());
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.status().last_error_code.as_deref() != Some("signer_error") {
        assert!(
            Instant::now() < deadline,
            "no signer failure: {:?}",
            m.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    down.store(false, Ordering::SeqCst);
    let back = Instant::now();
    let t = m.wait_ready(Duration::from_secs(5)).await;
    assert!(
        t.is_ok(),
        "no token within 5 s of the key's return: {:?}",
        m.status()
    );
    assert!(
        back.elapsed() <= SIGNER_RETRY_MAX + Duration::from_millis(500),
        "token {:?} after the key came back",
        back.elapsed()
    );
    cancel.cancel();
}

#[tokio::test]
async fn server_errors_back_off_then_recover() {
    let fake = Fake::new(Duration::from_secs(3));
    let (m, _cancel) = start(&fake, settings());
    m.wait_ready(Duration::from_secs(3)).await.unwrap();
    fake.with(|s| s.outage = true);
    let before = fake.n.refresh_calls.load(Ordering::SeqCst);
    // min_ttl beyond the remaining life forces a renewal, which fails and backs off; the
    // caller hears why at once.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let res = m.token(Some(Duration::from_millis(2600))).await;
    assert_eq!(res.unwrap_err().wire_code().as_str(), "unavailable");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let during = fake.n.refresh_calls.load(Ordering::SeqCst) - before;
    // 100 ms → 400 ms steps, full jitter: no hot loop in 1.2 s.
    assert!((2..=40).contains(&during), "{during} attempts");
    let st = m.status();
    assert_eq!(st.last_error_code.as_deref(), Some("server_error"));
    assert!(st.consecutive_failures >= 2);
    // Still handing out the valid token meanwhile.
    assert!(m.token(None).await.is_ok());
    fake.with(|s| s.outage = false);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let st = m.status();
    assert_eq!(st.consecutive_failures, 0, "{st:?}");
    assert_eq!(st.refreshes, 1);
}

#[tokio::test]
async fn outage_past_expiry_withdraws_the_token_then_recovers() {
    let fake = Fake::new(Duration::from_millis(1200));
    let (m, _cancel) = start(&fake, settings());
    m.wait_ready(Duration::from_secs(3)).await.unwrap();
    fake.with(|s| s.outage = true);
    let mut rx = m.subscribe();
    tokio::time::timeout(Duration::from_secs(3), rx.wait_for(|t| t.is_none()))
        .await
        .unwrap()
        .unwrap();
    let err = m.token(None).await.unwrap_err();
    assert!(matches!(
        err,
        TokenError::Unavailable(_) | TokenError::RenewalFailing { .. } | TokenError::Timeout(_)
    ));
    fake.with(|s| s.outage = false);
    let t = m.token(None).await.unwrap();
    assert!(t.expires_at > SystemTime::now());
}

#[tokio::test]
async fn clock_skew_resyncs_once_from_date() {
    let fake = Fake::new(Duration::from_secs(30));
    fake.with(|s| s.server_offset_ms = 40_000);
    let (m, _cancel) = start(&fake, settings());
    let t = m.wait_ready(Duration::from_secs(3)).await.unwrap();
    assert_eq!(fake.n.mint_calls.load(Ordering::SeqCst), 2);
    // expires_at is on the local clock: about 30 s from now, not 70.
    let left = t.remaining(SystemTime::now());
    assert!(
        left > Duration::from_secs(28) && left <= Duration::from_secs(30),
        "{left:?}"
    );
    assert_eq!(m.status().clock_offset_secs, 40);
    let skew = m
        .server_now()
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    assert!(skew > Duration::from_secs(39));
}

/// With the server clock 2 min ahead, known and unchanged, a 401 that is not about the
/// clock (a revoked key) is not retried as if it were.
#[tokio::test]
async fn a_401_with_a_known_far_clock_offset_is_not_taken_for_skew() {
    let fake = Fake::new(Duration::from_millis(1500));
    fake.with(|s| s.server_offset_ms = 120_000);
    let (m, _cancel) = start(&fake, settings());
    m.wait_ready(Duration::from_secs(3)).await.unwrap();
    let mints = fake.n.mint_calls.load(Ordering::SeqCst);
    fake.with(|s| {
        for message in ["refresh token revoked", "api key revoked"] {
            s.script.push(ApiError::Unauthorized {
                message: message.into(),
                request_id: None,
            });
        }
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while m.status().last_error_code.as_deref() != Some("unauthorized") {
        assert!(
            Instant::now() < deadline,
            "the revoked key was never reported"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        fake.n.mint_calls.load(Ordering::SeqCst),
        mints + 1,
        "one mint for the refused refresh, not retried"
    );
}

#[tokio::test]
async fn a_key_unknown_to_the_api_is_not_retried_in_a_hot_loop() {
    let fake = Fake::new(Duration::from_secs(30));
    fake.with(|s| {
        for _ in 0..50 {
            s.script.push(ApiError::Unauthorized {
                message: "unknown api key".into(),
                request_id: Some("r".into()),
            });
        }
    });
    let (m, _cancel) = start(&fake, settings());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let calls = fake.n.mint_calls.load(Ordering::SeqCst);
    assert!(calls <= 20, "{calls}");
    let st = m.status();
    assert_eq!(st.last_error_code.as_deref(), Some("unauthorized"));
    assert!(st.last_error.unwrap().contains("registered"));
}

#[tokio::test]
async fn foreign_signed_tokens_are_never_handed_out() {
    let fake = Fake::new(Duration::from_secs(30));
    fake.with(|s| s.foreign = true);
    let (m, _cancel) = start(&fake, settings());
    let err = m.token(None).await.unwrap_err();
    assert!(matches!(
        err,
        TokenError::Unavailable(_) | TokenError::RenewalFailing { .. } | TokenError::Timeout(_)
    ));
    assert!(m.subscribe().borrow().is_none());
    let st = m.status();
    assert_eq!(st.last_error_code.as_deref(), Some("invalid_token"));
    assert!(st.consecutive_failures >= 1);
    // The unknown-kid refetch is rate-limited: one fetch at start, none per failure.
    assert!(fake.n.jwks_calls.load(Ordering::SeqCst) <= 2);
    fake.with(|s| s.foreign = false);
    let t = m.token(None).await.unwrap();
    assert!(t.expires_at > SystemTime::now());
}

#[tokio::test]
async fn issuer_is_enforced_when_configured() {
    let fake = Fake::new(Duration::from_secs(30));
    let (m, _cancel) = start(
        &fake,
        TokenSettings {
            issuer: Some("someone-else".into()),
            ..settings()
        },
    );
    assert!(m.wait_ready(Duration::from_millis(500)).await.is_err());
    assert_eq!(m.status().last_error_code.as_deref(), Some("invalid_token"));
}

#[tokio::test]
async fn rate_limit_retry_after_is_honoured() {
    let fake = Fake::new(Duration::from_secs(30));
    fake.with(|s| {
        s.script.push(ApiError::RateLimited {
            retry_after: Some(Duration::from_secs(1)),
        })
    });
    let (m, _cancel) = start(&fake, settings());
    tokio::time::sleep(Duration::from_millis(800)).await;
    // backoff_max is 400 ms here, but the server asked for 1 s.
    assert_eq!(fake.n.mint_calls.load(Ordering::SeqCst), 1);
    let st = m.status();
    assert_eq!(st.last_error_code.as_deref(), Some("rate_limited"));
    let t = m.wait_ready(Duration::from_secs(2)).await.unwrap();
    assert!(t.expires_at > SystemTime::now());
    assert_eq!(fake.n.mint_calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn renewal_waits_are_bounded_by_renew_timeout() {
    let fake = Fake::new(Duration::from_secs(30));
    fake.with(|s| s.latency = Duration::from_secs(5));
    let (m, _cancel) = start(
        &fake,
        TokenSettings {
            renew_timeout: Duration::from_millis(300),
            ..settings()
        },
    );
    let t0 = Instant::now();
    let err = m.token(None).await.unwrap_err();
    assert_eq!(err.wire_code().as_str(), "timeout");
    assert!(t0.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn rate_limit_retry_after_of_a_503_is_honoured() {
    let fake = Fake::new(Duration::from_secs(30));
    fake.with(|s| {
        s.script.push(ApiError::Server {
            status: 503,
            message: "maintenance".into(),
            retry_after: Some(Duration::from_secs(1)),
        })
    });
    let (m, _cancel) = start(&fake, settings());
    tokio::time::sleep(Duration::from_millis(800)).await;
    // backoff_max is 400 ms here, but the server asked for 1 s.
    assert_eq!(fake.n.mint_calls.load(Ordering::SeqCst), 1);
    assert_eq!(m.status().last_error_code.as_deref(), Some("server_error"));
    m.wait_ready(Duration::from_secs(2)).await.unwrap();
    assert_eq!(fake.n.mint_calls.load(Ordering::SeqCst), 2);
}

/// `min_ttl` comes from clients: `Duration::MAX` once panicked in `SystemTime + Duration`.
#[tokio::test]
async fn a_huge_min_ttl_neither_panics_nor_spins() {
    let fake = Fake::new(Duration::from_secs(30));
    fake.with(|s| s.latency = Duration::from_millis(100));
    let (m, _cancel) = start(&fake, settings());
    // No token yet: this takes the renewal path, where the demand is dated.
    let t = m.token(Some(Duration::MAX)).await.unwrap();
    assert!(t.expires_at > SystemTime::now());
    // A token in hand: answered from memory (the ask is capped at 90% of its life)...
    let again = m.token(Some(Duration::MAX)).await.unwrap();
    assert!(again.expires_at > SystemTime::now());
    let u = m.token(Some(Duration::from_secs(u64::MAX))).await.unwrap();
    assert!(u.expires_at > SystemTime::now());
    // ... and the manager is alive and well afterwards.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!m.shared.stopped.load(Ordering::Acquire));
    assert!(m.token(None).await.is_ok());
    assert!(
        fake.n.mint_calls.load(Ordering::SeqCst) + fake.n.refresh_calls.load(Ordering::SeqCst) <= 3
    );
}

/// A panic in the worker (here: in the API client) must not leave callers waiting for
/// outcomes that never come: they hear `unavailable` at once, and the token is withdrawn.
#[tokio::test]
async fn a_panicking_worker_answers_unavailable_at_once() {
    let patient = || TokenSettings {
        renew_timeout: Duration::from_secs(10),
        ..settings()
    };
    // Mid-life: a caller is waiting for a renewal when the task panics.
    let fake = Fake::new(Duration::from_secs(3));
    let (m, _cancel) = start(&fake, patient());
    m.wait_ready(Duration::from_secs(3)).await.unwrap();
    fake.with(|s| s.panic = true);
    // As in `hundred_callers_share_one_renewal`: a min_ttl the current token cannot meet.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let t0 = Instant::now();
    let err = m
        .token(Some(Duration::from_millis(2600)))
        .await
        .unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(err.wire_code().as_str(), "unavailable", "{err}");
    assert!(err.to_string().contains("internal error"), "{err}");
    assert!(m.subscribe().borrow().is_none(), "token not withdrawn");
    // Later callers, with or without min_ttl, too.
    let t0 = Instant::now();
    assert_eq!(
        m.token(None).await.unwrap_err().wire_code().as_str(),
        "unavailable"
    );
    assert!(t0.elapsed() < Duration::from_millis(100));
    let st = m.status();
    assert_eq!(st.last_error_code.as_deref(), Some("internal"));
    assert_eq!(st.next_refresh, None);
    // The daemon hears of it (and exits for systemd to restart it).
    tokio::time::timeout(Duration::from_secs(1), m.failed())
        .await
        .expect("failed() resolves after a panic");

    // At start: the very first mint panics; wait_ready does not sit out its timeout.
    let fake = Fake::new(Duration::from_secs(30));
    fake.with(|s| s.panic = true);
    let (m, _cancel) = start(&fake, patient());
    let t0 = Instant::now();
    let err = m.wait_ready(Duration::from_secs(10)).await.unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(err.wire_code().as_str(), "unavailable", "{err}");
    assert_eq!(
        m.token(None).await.unwrap_err().wire_code().as_str(),
        "unavailable"
    );
}

/// An orderly stop answers `unavailable` to a caller already waiting for a renewal.
#[tokio::test]
async fn cancellation_wakes_waiting_callers() {
    let fake = Fake::new(Duration::from_secs(30));
    fake.with(|s| s.latency = Duration::from_secs(5));
    let (m, cancel) = start(
        &fake,
        TokenSettings {
            renew_timeout: Duration::from_secs(10),
            ..settings()
        },
    );
    let waiter = tokio::spawn({
        let m = m.clone();
        async move { m.token(None).await }
    });
    let failed = tokio::spawn({
        let m = m.clone();
        async move { m.failed().await }
    });
    let ready = tokio::spawn({
        let m = m.clone();
        async move { m.wait_ready(Duration::from_secs(10)).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    cancel.cancel();
    let err = waiter.await.unwrap().unwrap_err();
    assert_eq!(err.wire_code().as_str(), "unavailable");
    assert!(err.to_string().contains("stopped"), "{err}");
    assert_eq!(
        ready.await.unwrap().unwrap_err().wire_code().as_str(),
        "unavailable"
    );
    assert!(t0.elapsed() < Duration::from_secs(1));
    // An orderly stop is not a failure: the daemon must not exit with an error for it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !failed.is_finished(),
        "failed() resolved after an orderly stop"
    );
    failed.abort();
}

/// An `exp` of 1e300 once panicked the worker (before the signature check), killing the
/// profile's refresh for good. Now it is an invalid token like any other.
#[tokio::test]
async fn an_absurd_exp_is_an_invalid_token_not_a_dead_worker() {
    let fake = Fake::new(Duration::from_secs(30));
    fake.with(|s| s.exp_claim = Some(serde_json::json!(1e300)));
    let (m, _cancel) = start(&fake, settings());
    let err = m.wait_ready(Duration::from_millis(500)).await.unwrap_err();
    assert_eq!(err.wire_code().as_str(), "unavailable", "{err}");
    let st = m.status();
    assert_eq!(st.last_error_code.as_deref(), Some("invalid_token"));
    assert!(st.last_error.unwrap().contains("exp"));
    assert!(!m.shared.stopped.load(Ordering::Acquire));
    fake.with(|s| s.exp_claim = None);
    let t = m.wait_ready(Duration::from_secs(3)).await.unwrap();
    assert!(t.expires_at > SystemTime::now());
}
