//! Access tokens per profile: mint, scheduled refresh, backoff, single-flight renewal, JWKS
//! verification.
//!
//! Owns: one background task per profile (a key + key_id + environment) that holds the
//! refresh token (it never leaves that task), mints at start, refreshes at a jittered point
//! of each token's life, falls back to minting when a refresh is refused, backs off with full
//! jitter on transient failures, verifies every access token against the JWKS before
//! publishing it on a `watch` channel, and keeps a [`TokenStatus`] record.
//!
//! Threading: [`Manager`] is a cheap, cloneable handle. [`Manager::token`] answers from the
//! `watch` without touching I/O while the current token is valid for the asked `min_ttl`;
//! otherwise it posts a renewal demand and waits for the task's next outcome, so any number
//! of callers share one renewal (single-flight). The task sleeps until its next deadline
//! (`sleep_until`) or a demand, never polls. The two std mutexes (status, demand) are held
//! for a copy only, never across `.await`. Shutdown: cancel the `CancellationToken`. If the
//! task ends any other way (a panic), a drop guard still marks the manager stopped,
//! withdraws the token and wakes waiting callers, who then get `unavailable` at once, and
//! [`Manager::failed`] resolves (the daemon then exits for its service manager to restart it).
//!
//! Clocks: challenge timestamps and JWT `exp` checks use the server clock (local + offset
//! learned from `Date` headers, see [`auth_api::ServerClock`]); `expires_at` handed out is
//! converted to the local clock; sleeping uses tokio's monotonic clock.

pub mod jwt;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rand::Rng as _;
use secrecy::SecretString;
use serde::Deserialize;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::auth_api::{self, secs, ApiError, ServerClock, TokenPair, TransportKind};
use crate::jose;
use crate::signer;

/// An access token as handed to clients. `Debug` never shows the token.
#[derive(Clone)]
pub struct AccessToken {
    /// The JWT, sent as `Authorization: Bearer <token>`.
    pub token: Arc<str>,
    /// The earlier of `expires_in` and the JWT `exp`, on the local clock.
    pub expires_at: SystemTime,
    /// When the agent received it (local clock).
    pub received_at: SystemTime,
}

impl AccessToken {
    /// Time left before expiry, zero if expired.
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.expires_at.duration_since(now).unwrap_or_default()
    }

    /// Whole life as received: what a fresh token can offer at best.
    pub fn lifetime(&self) -> Duration {
        self.expires_at
            .duration_since(self.received_at)
            .unwrap_or_default()
    }

    /// Whether this token answers a request for at least `need` of remaining life at
    /// `now`: it has not expired, and has `need` left, where a `need` beyond 90% of its
    /// whole lifetime counts as 90% of it (no renewal could do much better, and such
    /// callers cause at most one renewal per tenth of a token's life).
    pub fn serves(&self, need: Duration, now: SystemTime) -> bool {
        let remaining = self.remaining(now);
        !remaining.is_zero() && remaining >= need.min(self.lifetime().mul_f64(0.9))
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Why no token could be handed out.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no valid access token: {0}")]
    Unavailable(String),
    /// A token is valid, but for less than the `min_ttl` asked for, and renewals fail.
    #[error("the access token expires in {} s, short of the min_ttl asked for, and renewing it failed: {reason}", .expires_in.as_secs())]
    ShortOfMinTtl {
        expires_in: Duration,
        /// When the next renewal is due, if one is scheduled.
        retry_in: Option<Duration>,
        /// The renewal failure, for the log.
        reason: String,
    },
    /// No token is valid, and renewals fail.
    #[error("no valid access token, and renewing it failed: {reason}")]
    RenewalFailing {
        /// When the next renewal is due, if one is scheduled.
        retry_in: Option<Duration>,
        /// The renewal failure, for the log.
        reason: String,
    },
    #[error("token renewal did not finish within {0:?}")]
    Timeout(Duration),
}

impl TokenError {
    /// The stable wire error code.
    pub fn wire_code(&self) -> crate::protocol::ErrorCode {
        match self {
            TokenError::Unavailable(_)
            | TokenError::ShortOfMinTtl { .. }
            | TokenError::RenewalFailing { .. } => crate::protocol::ErrorCode::Unavailable,
            TokenError::Timeout(_) => crate::protocol::ErrorCode::Timeout,
        }
    }
}

/// State of a profile's token machinery, for `status`.
#[derive(Debug, Clone, Default)]
pub struct TokenStatus {
    pub expires_at: Option<SystemTime>,
    pub last_mint: Option<SystemTime>,
    pub last_refresh: Option<SystemTime>,
    /// The next scheduled attempt: a refresh, or a retry while backing off.
    pub next_refresh: Option<SystemTime>,
    pub consecutive_failures: u32,
    /// A stable code such as `unauthorized`, `server_error`, `transport`, `invalid_token`,
    /// `signer_error`.
    pub last_error_code: Option<String>,
    /// A human-readable, secret-free message.
    pub last_error: Option<String>,
    /// Server clock minus local clock, learned from `Date`.
    pub clock_offset_secs: i64,
    /// Successful mints and refreshes since start.
    pub mints: u64,
    pub refreshes: u64,
}

/// Token policy of one profile. Durations are seconds (integer or fractional) in config
/// files; every field but `key_id` has a default (see [`TokenSettings::default`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSettings {
    /// The API key's id (UUID), as issued when the public key was registered.
    pub key_id: String,
    /// Refresh at this fraction of a token's lifetime (default 0.66).
    #[serde(default = "d_fraction")]
    pub refresh_at_fraction: f64,
    /// ± relative jitter on the refresh point (default 0.1 = ±10%).
    #[serde(default = "d_jitter")]
    pub jitter: f64,
    /// Refresh no later than this before expiry (default 120 s; clamped to a third of the
    /// lifetime for very short-lived tokens).
    #[serde(default = "d_refresh_before", with = "secs")]
    pub refresh_before_expiry: Duration,
    /// First backoff step (default 0.5 s), doubled per consecutive failure...
    #[serde(default = "d_backoff_min", with = "secs")]
    pub backoff_min: Duration,
    /// ...up to this (default 60 s). Delays are drawn uniformly below the step (full jitter).
    #[serde(default = "d_backoff_max", with = "secs")]
    pub backoff_max: Duration,
    /// How long a `token` request may wait for a renewal (default 10 s).
    #[serde(default = "d_renew_timeout", with = "secs")]
    pub renew_timeout: Duration,
    /// When set, access tokens must carry this `iss`.
    #[serde(default)]
    pub issuer: Option<String>,
    /// An unknown `kid` refetches the JWKS at most this often (default 10 s).
    #[serde(default = "d_jwks_refetch", with = "secs")]
    pub jwks_min_refetch: Duration,
    /// The cached JWKS is refetched when older than this (default 3600 s), so removed keys
    /// stop verifying.
    #[serde(default = "d_jwks_max_age", with = "secs")]
    pub jwks_max_age: Duration,
}

fn d_fraction() -> f64 {
    0.66
}
fn d_jitter() -> f64 {
    0.1
}
fn d_refresh_before() -> Duration {
    Duration::from_secs(120)
}
fn d_backoff_min() -> Duration {
    Duration::from_millis(500)
}
fn d_backoff_max() -> Duration {
    Duration::from_secs(60)
}
fn d_renew_timeout() -> Duration {
    Duration::from_secs(10)
}
fn d_jwks_refetch() -> Duration {
    Duration::from_secs(10)
}
fn d_jwks_max_age() -> Duration {
    Duration::from_secs(3600)
}

impl Default for TokenSettings {
    fn default() -> Self {
        TokenSettings {
            key_id: String::new(),
            refresh_at_fraction: d_fraction(),
            jitter: d_jitter(),
            refresh_before_expiry: d_refresh_before(),
            backoff_min: d_backoff_min(),
            backoff_max: d_backoff_max(),
            renew_timeout: d_renew_timeout(),
            issuer: None,
            jwks_min_refetch: d_jwks_refetch(),
            jwks_max_age: d_jwks_max_age(),
        }
    }
}

impl TokenSettings {
    /// Defaults with this key_id.
    pub fn new(key_id: impl Into<String>) -> Self {
        TokenSettings {
            key_id: key_id.into(),
            ..TokenSettings::default()
        }
    }

    /// Every problem with the settings, one message each.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.key_id.trim().is_empty() {
            problems.push("key_id is empty: set the API key's id from the API Keys page".into());
        }
        if !(self.refresh_at_fraction > 0.0 && self.refresh_at_fraction < 1.0) {
            problems.push(format!(
                "refresh_at_fraction {} must be between 0 and 1 (exclusive)",
                self.refresh_at_fraction
            ));
        }
        if !(0.0..=0.5).contains(&self.jitter) {
            problems.push(format!(
                "refresh_jitter {} must be between 0 and 0.5",
                self.jitter
            ));
        }
        if self.backoff_min.is_zero() {
            problems.push("backoff_min_secs must be above 0".into());
        }
        if self.backoff_max < self.backoff_min {
            problems.push("backoff_max_secs must be at least backoff_min_secs".into());
        }
        if self.renew_timeout.is_zero() {
            problems.push("renew_timeout_secs must be above 0".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// When to refresh a token of `lifetime`, counted from its receipt. `unit` in [-1, 1] picks
/// the jitter. The refresh happens at `fraction ± jitter` of the lifetime but never later
/// than `refresh_before_expiry` before expiry; that margin is clamped to a third of the
/// lifetime so that short-lived tokens (seconds, in tests) are not refreshed at once.
pub(crate) fn refresh_delay(lifetime: Duration, s: &TokenSettings, unit: f64) -> Duration {
    let factor = (s.refresh_at_fraction * (1.0 + s.jitter * unit.clamp(-1.0, 1.0))).clamp(0.0, 1.0);
    let jittered = lifetime.mul_f64(factor);
    let margin = s.refresh_before_expiry.min(lifetime / 3);
    let latest = lifetime.saturating_sub(margin);
    jittered
        .min(latest)
        .max(Duration::from_millis(100).min(latest))
}

/// The longest wait before retrying after the key (not the API) failed a signature.
pub const SIGNER_RETRY_MAX: Duration = Duration::from_secs(2);

/// The longest `Retry-After` honoured (unless `backoff_max` is longer).
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(60);

/// Delay before retry number `failures` (1 = after the first failure): full jitter below
/// `min(backoff_max, backoff_min * 2^(failures-1))`, `unit` in [0, 1]; never shorter than a
/// server's `Retry-After`, itself capped at [`RETRY_AFTER_MAX`] (or `backoff_max` if
/// longer): one answer that says "come back in an hour" must not leave every client
/// without a token for that long after the API is back.
pub(crate) fn backoff_delay(
    failures: u32,
    s: &TokenSettings,
    unit: f64,
    retry_after: Option<Duration>,
) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let step = s
        .backoff_min
        .checked_mul(1u32 << exp)
        .unwrap_or(s.backoff_max)
        .min(s.backoff_max);
    let jittered = step
        .mul_f64(unit.clamp(0.0, 1.0))
        .max(Duration::from_millis(10));
    let server = retry_after
        .unwrap_or_default()
        .min(s.backoff_max.max(RETRY_AFTER_MAX));
    jittered.max(server)
}

/// The Auth API as the manager needs it; implemented by [`auth_api::Client`] and by test
/// fakes.
pub(crate) trait Api: Send + Sync + 'static {
    fn mint(
        &self,
        body: &jose::ChallengeBody,
    ) -> impl Future<Output = Result<TokenPair, ApiError>> + Send;
    fn refresh(
        &self,
        refresh_token: &SecretString,
    ) -> impl Future<Output = Result<TokenPair, ApiError>> + Send;
    fn jwks(&self) -> impl Future<Output = Result<auth_api::Jwks, ApiError>> + Send;
    fn clock(&self) -> &ServerClock;
}

impl Api for auth_api::Client {
    fn mint(
        &self,
        body: &jose::ChallengeBody,
    ) -> impl Future<Output = Result<TokenPair, ApiError>> + Send {
        auth_api::Client::mint(self, body)
    }
    fn refresh(
        &self,
        refresh_token: &SecretString,
    ) -> impl Future<Output = Result<TokenPair, ApiError>> + Send {
        auth_api::Client::refresh(self, refresh_token)
    }
    fn jwks(&self) -> impl Future<Output = Result<auth_api::Jwks, ApiError>> + Send {
        auth_api::Client::jwks(self)
    }
    fn clock(&self) -> &ServerClock {
        auth_api::Client::clock(self)
    }
}

/// What the last renewal attempt came to; published to waiting callers.
#[derive(Debug, Clone, Default)]
struct Outcome {
    seq: u64,
    /// `(code, message)` of a failure.
    error: Option<(String, String)>,
    /// While backing off: when the next attempt runs.
    retry_at: Option<Instant>,
}

/// A caller's wish for a renewal, merged across callers.
#[derive(Debug, Clone, Copy)]
struct Demand {
    requested: Instant,
    /// The token must be valid at least until this (local clock).
    until: SystemTime,
}

struct Shared {
    settings: TokenSettings,
    clock: ServerClock,
    current: watch::Sender<Option<Arc<AccessToken>>>,
    outcomes: watch::Sender<Outcome>,
    status: Mutex<TokenStatus>,
    demand: Mutex<Option<Demand>>,
    wake: Notify,
    stopped: AtomicBool,
    /// Cancelled when the worker panicked: see [`Manager::failed`].
    failed: CancellationToken,
}

/// The message of the `stopped` outcome after an orderly stop.
const STOPPED: &str = "the token manager has stopped";

impl Shared {
    /// Marks the manager stopped, withdraws the token and wakes every waiting caller with a
    /// `stopped` outcome. `stopped` is set first, so a waiter woken by the outcome sees it.
    /// Must not panic: it also runs while a panic unwinds (see [`StopGuard`]).
    fn stop(&self, message: &str) {
        self.stopped.store(true, Ordering::Release);
        self.current.send_replace(None);
        self.outcomes.send_modify(|o| {
            o.seq += 1;
            o.error = Some(("stopped".into(), message.into()));
            o.retry_at = None;
        });
    }
}

/// Stops the manager however the worker's task ends: after cancellation (orderly, also
/// when the runtime drops the task before it saw the cancellation, as at the daemon's
/// exit), on a panic (tokio drops a panicking task's future while unwinding; without this
/// nothing would ever tell the callers, who would wait for outcomes that never come), or
/// when the runtime drops the task uncancelled.
struct StopGuard {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    /// `run` ended by cancellation.
    orderly: bool,
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        let panicked = std::thread::panicking();
        if !panicked && (self.orderly || self.cancel.is_cancelled()) {
            self.shared.stop(STOPPED);
            tracing::info!("token manager stopped");
            return;
        }
        let message = if panicked {
            "the token manager failed (internal error, see the agent's log); restart the agent"
        } else {
            "the token manager ended unexpectedly; restart the agent"
        };
        {
            let mut s = lock(&self.shared.status);
            s.last_error_code = Some("internal".into());
            s.last_error = Some(message.into());
            s.next_refresh = None;
        }
        self.shared.stop(message);
        if panicked {
            tracing::error!(
                key_id = %self.shared.settings.key_id,
                "token task panicked: the profile's token is withdrawn and token requests \
                 answer `unavailable` until the agent is restarted"
            );
            self.shared.failed.cancel();
        } else {
            // Only a runtime shutting down drops a spawned task uncancelled.
            tracing::debug!(
                key_id = %self.shared.settings.key_id,
                "token task dropped without cancellation (runtime shutting down)"
            );
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data behind short locks: a panic elsewhere leaves it usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The largest `min_ttl` a caller may ask for; more is treated as this (tokens live
/// minutes to hours, and `usable` caps the ask at 90% of a token's life anyway).
const MAX_MIN_TTL: Duration = Duration::from_secs(86_400);

/// Far enough to mean "never" for a deadline (as tokio's own far future: ~30 years).
const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `at + d` without the panic of `+` on overflow: durations here come from clients, the
/// config or the server (token lifetimes), so an absurd one must saturate, not abort.
fn instant_after(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .or_else(|| at.checked_add(FAR))
        .unwrap_or(at)
}

/// As [`instant_after`], for the wall clock.
fn time_after(at: SystemTime, d: Duration) -> SystemTime {
    at.checked_add(d)
        .or_else(|| at.checked_add(FAR))
        .unwrap_or(at)
}

/// The handle of one profile's token manager. Cheap to clone.
#[derive(Clone)]
pub struct Manager {
    current: watch::Receiver<Option<Arc<AccessToken>>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("key_id", &self.shared.settings.key_id)
            .finish()
    }
}

impl Manager {
    /// Starts the profile's background task on the current tokio runtime; it mints at once.
    /// `settings` should have passed [`TokenSettings::validate`]. The task stops when
    /// `cancel` is cancelled; the current token is withdrawn then.
    pub fn start(
        settings: TokenSettings,
        signer: signer::Handle,
        api: auth_api::Client,
        cancel: CancellationToken,
    ) -> Manager {
        Manager::start_with(settings, signer, api, cancel)
    }

    pub(crate) fn start_with<A: Api>(
        settings: TokenSettings,
        signer: signer::Handle,
        api: A,
        cancel: CancellationToken,
    ) -> Manager {
        let (current_tx, current) = watch::channel(None);
        let (outcomes, _) = watch::channel(Outcome::default());
        let shared = Arc::new(Shared {
            clock: api.clock().clone(),
            settings,
            current: current_tx,
            outcomes,
            status: Mutex::new(TokenStatus::default()),
            demand: Mutex::new(None),
            wake: Notify::new(),
            stopped: AtomicBool::new(false),
            failed: CancellationToken::new(),
        });
        let span = tracing::info_span!("token", key_id = %shared.settings.key_id);
        let worker = Worker {
            shared: Arc::clone(&shared),
            api,
            signer,
            refresh: None,
            keys: jwt::KeySet::default(),
            keys_fetched: None,
            last_kid_refetch: None,
            failures: 0,
            next_attempt: None,
            expiry: None,
            last_success: None,
            seq: 0,
            cancel,
        };
        tokio::spawn(worker.run().instrument(span));
        Manager { current, shared }
    }

    /// Resolves if the background task panicked (a bug). The manager cannot mint again
    /// then; the daemon exits so that its service manager restarts it. Never resolves
    /// after an orderly stop.
    pub async fn failed(&self) {
        self.shared.failed.cancelled().await;
    }

    /// The current token if it is valid for at least `min_ttl` (default: valid at all);
    /// otherwise waits (at most `renew_timeout`) for one shared renewal.
    ///
    /// A `min_ttl` beyond 90% of a token's whole lifetime is capped there (no renewal could
    /// do better), and a token renewed after the call began is returned even if it falls
    /// short of `min_ttl`. Never returns an expired token.
    pub async fn token(&self, min_ttl: Option<Duration>) -> Result<Arc<AccessToken>, TokenError> {
        // Capped here, before any clock arithmetic: `min_ttl` comes straight from a client.
        let need = min_ttl.unwrap_or_default().min(MAX_MIN_TTL);
        if let Some(tok) = self.usable(need) {
            return Ok(tok);
        }
        self.renew_and_wait(need).await
    }

    /// The current token if it serves a request for `need`, from memory.
    fn usable(&self, need: Duration) -> Option<Arc<AccessToken>> {
        let tok = self.current.borrow().clone()?;
        tok.serves(need, SystemTime::now()).then_some(tok)
    }

    async fn renew_and_wait(&self, need: Duration) -> Result<Arc<AccessToken>, TokenError> {
        if self.shared.stopped.load(Ordering::Acquire) {
            return Err(self.stopped_error());
        }
        let timeout = self.shared.settings.renew_timeout;
        let deadline = instant_after(Instant::now(), timeout);
        let mut outcomes = self.shared.outcomes.subscribe();
        if let Some(err) = self.hopeless(&outcomes.borrow_and_update(), deadline) {
            return Err(err);
        }
        // A renewal or a stop that finished between the check in `token` and the line above
        // is marked seen now, and would never wake this call: look once more before asking.
        if self.shared.stopped.load(Ordering::Acquire) {
            return Err(self.stopped_error());
        }
        if let Some(tok) = self.usable(need) {
            return Ok(tok);
        }
        {
            let mut demand = lock(&self.shared.demand);
            let mine = Demand {
                requested: Instant::now(),
                until: time_after(SystemTime::now(), need),
            };
            *demand = Some(match *demand {
                Some(d) => Demand {
                    requested: d.requested.max(mine.requested),
                    until: d.until.max(mine.until),
                },
                None => mine,
            });
        }
        self.shared.wake.notify_one();
        loop {
            match tokio::time::timeout_at(deadline, outcomes.changed()).await {
                Err(_) => return Err(TokenError::Timeout(timeout)),
                Ok(Err(_)) => return Err(self.stopped_error()),
                Ok(Ok(())) => {}
            }
            let outcome = outcomes.borrow_and_update().clone();
            if let Some(tok) = self.usable(need) {
                return Ok(tok);
            }
            if outcome.error.is_none() {
                // A renewal finished after our demand: its token is the freshest there is.
                if let Some(tok) = self.usable(Duration::ZERO) {
                    return Ok(tok);
                }
            }
            if self.shared.stopped.load(Ordering::Acquire) {
                return Err(self.stopped_error());
            }
            if let Some((code, message)) = outcome.error {
                // Don't hold the caller through a series of retries: say what is wrong.
                let retry_in = outcome
                    .retry_at
                    .map(|at| at.saturating_duration_since(Instant::now()));
                let next = retry_in
                    .map(|wait| format!("; next attempt in {:.1} s", wait.as_secs_f64()))
                    .unwrap_or_default();
                return Err(self.short_of(
                    format!("token renewal failed ({code}: {message}){next}"),
                    retry_in,
                ));
            }
        }
    }

    /// Why a stopped manager has no token: the stop's own message when it is published.
    fn stopped_error(&self) -> TokenError {
        let message = match &self.shared.outcomes.borrow().error {
            Some((code, message)) if code == "stopped" => message.clone(),
            _ => STOPPED.into(),
        };
        TokenError::Unavailable(message)
    }

    /// A failure whose next retry is beyond our deadline: say so now instead of timing out.
    fn hopeless(&self, outcome: &Outcome, deadline: Instant) -> Option<TokenError> {
        let (code, message) = outcome.error.as_ref()?;
        let retry_at = outcome.retry_at?;
        if retry_at <= deadline {
            return None;
        }
        let wait = retry_at.saturating_duration_since(Instant::now());
        Some(self.short_of(
            format!(
                "token renewal failing ({code}: {message}); next attempt in {:.1} s",
                wait.as_secs_f64()
            ),
            Some(wait),
        ))
    }

    /// The error for a renewal that failed: `ShortOfMinTtl` while a token is still valid
    /// (for less than the caller asked), `RenewalFailing` when none is.
    fn short_of(&self, reason: String, retry_in: Option<Duration>) -> TokenError {
        match self.usable(Duration::ZERO) {
            Some(tok) => TokenError::ShortOfMinTtl {
                expires_in: tok.remaining(SystemTime::now()),
                retry_in,
                reason,
            },
            None => TokenError::RenewalFailing { retry_in, reason },
        }
    }

    /// Waits until the first token is there (or `timeout` passes, or the manager stops).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<Arc<AccessToken>, TokenError> {
        let mut rx = self.current.clone();
        let mut outcomes = self.shared.outcomes.subscribe();
        let stopped = &self.shared.stopped;
        let waited = tokio::time::timeout(timeout, async {
            tokio::select! {
                tok = rx.wait_for(|t| t.is_some()) => tok.ok().and_then(|t| t.clone()),
                _ = outcomes.wait_for(|_| stopped.load(Ordering::Acquire)) => None,
            }
        })
        .await;
        if let Ok(Some(tok)) = waited {
            return Ok(tok);
        }
        if self.shared.stopped.load(Ordering::Acquire) {
            return Err(self.stopped_error());
        }
        let status = self.status();
        match (status.last_error_code, status.last_error) {
            (Some(code), Some(msg)) => Err(TokenError::Unavailable(format!("{code}: {msg}"))),
            _ => Err(TokenError::Timeout(timeout)),
        }
    }

    /// Receives each new token (rotation) as it arrives; `None` when the token expired with
    /// no replacement, or the manager stopped.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<AccessToken>>> {
        self.current.clone()
    }

    /// A status snapshot.
    pub fn status(&self) -> TokenStatus {
        let mut status = lock(&self.shared.status).clone();
        let offset_ms = self.shared.clock.offset_ms().unwrap_or(0);
        status.clock_offset_secs = (offset_ms as f64 / 1000.0).round() as i64;
        status
    }

    /// The server's clock as learned from `Date` headers (local clock + offset).
    pub fn server_now(&self) -> SystemTime {
        self.shared.clock.server_now()
    }

    /// The settings in force.
    pub fn settings(&self) -> &TokenSettings {
        &self.shared.settings
    }
}

/// Why an attempt failed, secret-free.
#[derive(Debug)]
struct Failure {
    code: &'static str,
    message: String,
    retry_after: Option<Duration>,
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        let retry_after = match &e {
            ApiError::RateLimited { retry_after } | ApiError::Server { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        };
        Failure {
            code: e.code(),
            message: e.to_string(),
            retry_after,
        }
    }
}

impl From<signer::SignerError> for Failure {
    fn from(e: signer::SignerError) -> Self {
        Failure {
            code: "signer_error",
            message: format!("cannot sign the challenge: {e}"),
            retry_after: None,
        }
    }
}

impl From<jwt::JwtError> for Failure {
    fn from(e: jwt::JwtError) -> Self {
        Failure {
            code: "invalid_token",
            message: e.to_string(),
            retry_after: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Minted,
    Refreshed,
}

/// A refresh token, with the expiry (local clock) of the access token that came with it:
/// past that, a refresh endpoint that keeps failing is given up for a mint.
struct HeldRefresh {
    token: SecretString,
    pair_expires: SystemTime,
}

impl HeldRefresh {
    fn pair_expired(&self) -> bool {
        self.pair_expires <= SystemTime::now()
    }
}

/// The background task of one profile. Owns the refresh token.
struct Worker<A: Api> {
    shared: Arc<Shared>,
    api: A,
    signer: signer::Handle,
    refresh: Option<HeldRefresh>,
    keys: jwt::KeySet,
    keys_fetched: Option<Instant>,
    /// The last refetch caused by an unknown `kid` (rate-limited).
    last_kid_refetch: Option<Instant>,
    failures: u32,
    /// The next scheduled refresh or, while backing off, retry.
    next_attempt: Option<Instant>,
    /// When the current token expires (monotonic estimate), to withdraw it then.
    expiry: Option<Instant>,
    /// When the last good token was accepted.
    last_success: Option<Instant>,
    seq: u64,
    cancel: CancellationToken,
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl<A: Api> Worker<A> {
    async fn run(mut self) {
        let mut guard = StopGuard {
            shared: Arc::clone(&self.shared),
            cancel: self.cancel.clone(),
            orderly: false,
        };
        let cancel = self.cancel.clone();
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = async {
                self.attempt().await;
                loop {
                    let deadline = match (self.next_attempt, self.expiry) {
                        (Some(a), Some(e)) => Some(a.min(e)),
                        (a, e) => a.or(e),
                    };
                    tokio::select! {
                        _ = sleep_until_opt(deadline) => self.on_deadline().await,
                        _ = self.shared.wake.notified() => self.on_demand().await,
                    }
                }
            } => {}
        }
        guard.orderly = true;
    }

    async fn on_deadline(&mut self) {
        let now = Instant::now();
        if self.expiry.is_some_and(|e| e <= now) {
            self.expiry = None;
            let expired = self
                .shared
                .current
                .borrow()
                .as_ref()
                .is_some_and(|t| t.expires_at <= SystemTime::now());
            if expired {
                self.shared.current.send_replace(None);
                tracing::warn!("access token expired with no replacement");
                if self.failures > 0 && self.refresh.as_ref().is_some_and(HeldRefresh::pair_expired)
                {
                    // Renewals have been failing with this refresh token kept for a retry:
                    // mint now rather than after the back-off and one more failed refresh.
                    self.refresh = None;
                    self.next_attempt = Some(now);
                    tracing::info!("refreshes failing and the access token expired: minting now");
                }
            } else if let Some(t) = self.shared.current.borrow().as_ref() {
                // The wall clock and the monotonic one disagree: look again later.
                self.expiry = Some(instant_after(now, t.remaining(SystemTime::now())));
            }
        }
        if self.next_attempt.is_some_and(|a| a <= now) {
            self.attempt().await;
        }
    }

    async fn on_demand(&mut self) {
        let Some(demand) = lock(&self.shared.demand).take() else {
            return;
        };
        if self.last_success.is_some_and(|s| s >= demand.requested) {
            return; // a token arrived after the demand was made
        }
        let satisfied = self
            .shared
            .current
            .borrow()
            .as_ref()
            .is_some_and(|t| t.expires_at >= demand.until);
        if satisfied {
            return;
        }
        if self.failures > 0 && self.next_attempt.is_some_and(|a| a > Instant::now()) {
            return; // backing off: the scheduled retry will serve the demand
        }
        tracing::debug!("renewal on demand");
        self.attempt().await;
    }

    async fn attempt(&mut self) {
        let result = self.renew().await;
        let now = Instant::now();
        let error = match result {
            Ok((token, kind)) => {
                self.failures = 0;
                self.last_success = Some(now);
                let lifetime = token.lifetime();
                let unit = rand::thread_rng().gen_range(-1.0..=1.0);
                let delay = refresh_delay(lifetime, &self.shared.settings, unit);
                // A token's life is the server's say: saturate, never overflow.
                self.next_attempt = Some(instant_after(now, delay));
                self.expiry = Some(instant_after(now, token.remaining(SystemTime::now())));
                let next_refresh = time_after(SystemTime::now(), delay);
                {
                    let mut s = lock(&self.shared.status);
                    s.expires_at = Some(token.expires_at);
                    s.next_refresh = Some(next_refresh);
                    s.consecutive_failures = 0;
                    match kind {
                        Kind::Minted => {
                            s.last_mint = Some(token.received_at);
                            s.mints += 1;
                        }
                        Kind::Refreshed => {
                            s.last_refresh = Some(token.received_at);
                            s.refreshes += 1;
                        }
                    }
                }
                tracing::info!(
                    event = if kind == Kind::Minted {
                        "minted"
                    } else {
                        "refreshed"
                    },
                    lifetime_s = lifetime.as_secs_f64(),
                    refresh_in_s = delay.as_secs_f64(),
                    "access token {}",
                    if kind == Kind::Minted {
                        "minted"
                    } else {
                        "refreshed"
                    }
                );
                self.shared.current.send_replace(Some(token));
                None
            }
            Err(failure) => {
                self.failures = self.failures.saturating_add(1);
                let unit = rand::thread_rng().gen_range(0.0..=1.0);
                let mut delay = backoff_delay(
                    self.failures,
                    &self.shared.settings,
                    unit,
                    failure.retry_after,
                );
                if failure.code == "signer_error" {
                    // The key, not the API, failed: the signer backs off on its own and
                    // refuses fast meanwhile, so retrying often costs nothing, and a token
                    // follows within seconds once the key answers again.
                    delay = delay.min(SIGNER_RETRY_MAX);
                }
                self.next_attempt = Some(instant_after(now, delay));
                let new_error = {
                    let mut s = lock(&self.shared.status);
                    let new_error = s.last_error_code.as_deref() != Some(failure.code);
                    s.consecutive_failures = self.failures;
                    s.last_error_code = Some(failure.code.to_string());
                    s.last_error = Some(failure.message.clone());
                    s.next_refresh = Some(time_after(SystemTime::now(), delay));
                    new_error
                };
                // A warning at 1, 2, 4, 8, … consecutive failures and whenever the error
                // changes; the others at debug level. A key down for an hour (retried every
                // 2 s) warns a dozen times, not 1,800; `status` has the count and last error.
                let warn_again_at = self
                    .failures
                    .saturating_add(1)
                    .checked_next_power_of_two()
                    .unwrap_or(u32::MAX);
                macro_rules! renewal_failed {
                    ($level:ident) => {
                        tracing::$level!(
                            code = failure.code,
                            error = %failure.message,
                            failures = self.failures,
                            retry_in_s = delay.as_secs_f64(),
                            warn_again_at,
                            "token renewal failed"
                        )
                    };
                }
                if self.failures.is_power_of_two() || new_error {
                    renewal_failed!(warn);
                } else {
                    renewal_failed!(debug);
                }
                Some((failure.code.to_string(), failure.message))
            }
        };
        self.seq += 1;
        let retry_at = error.as_ref().and(self.next_attempt);
        self.shared.outcomes.send_replace(Outcome {
            seq: self.seq,
            error,
            retry_at,
        });
    }

    /// Refresh if we hold a refresh token, else (or when it is refused) mint.
    async fn renew(&mut self) -> Result<(Arc<AccessToken>, Kind), Failure> {
        if let Some(held) = self.refresh.take() {
            match self.api.refresh(&held.token).await {
                Ok(pair) => return self.accept(pair, Kind::Refreshed).await,
                Err(e @ (ApiError::Unauthorized { .. } | ApiError::BadRequest { .. })) => {
                    tracing::info!(
                        code = e.code(),
                        error = %e,
                        "refresh token refused; minting with a fresh signature"
                    );
                }
                Err(
                    e @ (ApiError::Protocol(_)
                    | ApiError::Transport {
                        kind: TransportKind::Timeout | TransportKind::Other,
                        ..
                    }),
                ) => {
                    // An answer that did not parse, or none after the request went out: the
                    // server may have rotated the refresh token already. Sent again, it would
                    // be a reuse, which revokes the family and alarms the API's operators; so
                    // it is dropped, and the next attempt mints.
                    return Err(e.into());
                }
                Err(e) => {
                    // Never reached the server (no connection), or refused without using it
                    // (5xx, 429): the same refresh token still works, and is tried again
                    // while the access token that came with it is valid. Once that one has
                    // expired, waiting on the refresh endpoint leaves every client without a
                    // token though minting may work: the next attempt mints.
                    if !held.pair_expired() {
                        self.refresh = Some(held);
                    } else {
                        tracing::info!(
                            code = e.code(),
                            "refresh failing and the access token has expired: minting next"
                        );
                    }
                    return Err(e.into());
                }
            }
        }
        self.mint().await
    }

    fn server_timestamp(&self) -> i64 {
        let now = self.shared.clock.server_now();
        now.duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }

    async fn mint(&mut self) -> Result<(Arc<AccessToken>, Kind), Failure> {
        let key_id = self.shared.settings.key_id.clone();
        let mut resynced = false;
        loop {
            let timestamp = self.server_timestamp();
            let body = self
                .signer
                .sign_challenge_for_token(&key_id, timestamp)
                .await?;
            match self.api.mint(&body).await {
                Ok(pair) => return self.accept(pair, Kind::Minted).await,
                Err(ApiError::Unauthorized {
                    message,
                    request_id,
                }) if !resynced => {
                    // Only a 401 about the clock, or whose `Date` moved the server clock
                    // we signed by, is worth a second signature: with the offset known and
                    // unchanged, the timestamp was right however far the local clock is off.
                    let offset_ms = self.shared.clock.offset_ms().unwrap_or(0);
                    let moved = (self.server_timestamp() - timestamp).abs() > 25;
                    if auth_api::mentions_clock(&message) || moved {
                        resynced = true;
                        tracing::warn!(
                            clock_offset_ms = offset_ms,
                            "mint refused for its timestamp; retrying once on the server clock from Date"
                        );
                        continue;
                    }
                    return Err(ApiError::Unauthorized {
                        message,
                        request_id,
                    }
                    .into());
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Keeps the refresh token of a pair whose access token is held back (its JWKS check is
    /// pending), with that access token's expiry on the server's clock.
    fn hold_refresh_token(&mut self, token: SecretString, expires_at: SystemTime) {
        self.refresh = Some(HeldRefresh {
            token,
            pair_expires: self.shared.clock.to_local(expires_at),
        });
    }

    /// Verifies a received pair and turns it into the token to hand out. On success the
    /// pair's refresh token becomes ours.
    async fn accept(
        &mut self,
        pair: TokenPair,
        kind: Kind,
    ) -> Result<(Arc<AccessToken>, Kind), Failure> {
        let parsed = jwt::parse(&pair.access_token)?;
        let stale = self
            .keys_fetched
            .is_none_or(|t| t.elapsed() >= self.shared.settings.jwks_max_age);
        // An unknown kid (e.g. after a key rotation) refetches, but at most once per
        // `jwks_min_refetch`, so a stream of forged tokens cannot hammer the JWKS.
        let unknown = !self.keys.contains(&parsed.kid)
            && self
                .last_kid_refetch
                .is_none_or(|t| t.elapsed() >= self.shared.settings.jwks_min_refetch);
        let mut fetched = false;
        if stale || unknown {
            match self.api.jwks().await {
                Ok(jwks) => {
                    self.keys = jwt::KeySet::from_jwks(&jwks.keys);
                    self.keys_fetched = Some(Instant::now());
                    if unknown && !stale {
                        // Only a fetch that happened counts against the rate limit: after a
                        // failed one, the next attempt (after its back-off) fetches again.
                        self.last_kid_refetch = Some(Instant::now());
                    }
                    fetched = true;
                    tracing::info!(keys = self.keys.len(), "JWKS fetched");
                }
                Err(e) if self.keys.contains(&parsed.kid) => {
                    // The keys we hold know this token's signer: check it with them, and
                    // fetch again at the next renewal. A JWKS outage must not become a
                    // token outage.
                    tracing::warn!(
                        error = %e,
                        "cannot refresh the JWKS; checking the token with the keys held"
                    );
                }
                Err(e) => {
                    // The pair came from the API over TLS; only its check is pending.
                    self.hold_refresh_token(pair.refresh_token, pair.expires_at);
                    let mut failure = Failure::from(e);
                    failure.message = format!("cannot fetch the JWKS: {}", failure.message);
                    return Err(failure);
                }
            }
        }
        if !fetched && !self.keys.contains(&parsed.kid) {
            // The JWKS held predates this kid and was fetched too recently to fetch again:
            // the token cannot be checked yet, which says nothing against the pair. Keep its
            // refresh token, and check again at the next attempt.
            self.hold_refresh_token(pair.refresh_token, pair.expires_at);
            return Err(Failure {
                code: "jwks_pending",
                message: format!(
                    "the access token's kid is not in the JWKS held, which is fetched again at \
                     most every {} s: checking at the next attempt",
                    self.shared.settings.jwks_min_refetch.as_secs()
                ),
                retry_after: None,
            });
        }
        let clock = &self.shared.clock;
        self.keys.verify(
            &parsed,
            clock.server_now(),
            self.shared.settings.issuer.as_deref(),
        )?;
        let received_at = SystemTime::now();
        let mut expires_at = clock.to_local(pair.expires_at.min(parsed.exp));
        // The server's clock is learned from `Date` headers, and one wrong header would move
        // `exp` on the local clock. The token's own lifetime (`exp - iat`, both from one
        // clock) counted from now, when it arrived, bounds it.
        let life = parsed
            .iat
            .and_then(|iat| parsed.exp.duration_since(iat).ok());
        if let Some(end) = life.and_then(|life| received_at.checked_add(life)) {
            expires_at = expires_at.min(end);
        }
        if expires_at <= received_at {
            return Err(Failure {
                code: "invalid_token",
                message: "access token arrived already expired (expires_in in the past)".into(),
                retry_after: None,
            });
        }
        self.refresh = Some(HeldRefresh {
            token: pair.refresh_token,
            pair_expires: expires_at,
        });
        Ok((
            Arc::new(AccessToken {
                token: pair.access_token,
                expires_at,
                received_at,
            }),
            kind,
        ))
    }
}

#[cfg(test)]
mod tests;
