//! HTTP client of the True Markets Auth API (see `reference/auth-api.md`).
//!
//! Owns: the endpoint URLs of an environment (production, UAT or a custom base URL; the JWKS
//! sits at the host root, not under `/v1/auth`), the reqwest client (rustls, optional extra
//! CA, connect and total timeouts, `User-Agent: tm-agent/<version>`), the three calls
//! (`mint`, `refresh`, `jwks`), the mapping of HTTP outcomes to typed [`ApiError`]s with
//! stable [`ApiError::code`]s, and the server clock offset learned from every response's
//! `Date` header ([`ServerClock`]).
//!
//! Threading: [`Client`] is cheap to clone and safe to share between tasks; the clock offset
//! lives in atomics. Nothing here retries or sleeps: the token manager owns policy.
//!
//! Secrets: token bodies are read into a zeroized buffer and go straight into
//! [`TokenPair`], whose `Debug` is redacted; error messages never contain the response body
//! and server-provided messages are scrubbed of anything that looks like a JWT.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, ACCEPT, CONTENT_TYPE, DATE, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::jose;

/// Production Auth API base URL.
pub const PRODUCTION_BASE_URL: &str = "https://api.truemarkets.co/v1/auth";
/// Production JWKS (at the host root).
pub const PRODUCTION_JWKS_URL: &str = "https://api.truemarkets.co/.well-known/jwks.json";
/// UAT (sandbox) Auth API base URL.
pub const UAT_BASE_URL: &str = "https://api.uat.truemarkets.co/v1/auth";
/// UAT JWKS (by analogy with production).
pub const UAT_JWKS_URL: &str = "https://api.uat.truemarkets.co/.well-known/jwks.json";

/// The largest response body accepted; real ones are a few KiB.
const MAX_BODY: usize = 256 * 1024;
/// The body buffer's first size when the response gives no `Content-Length` (a token
/// response is 1–3 KiB).
const BODY_CAPACITY: usize = 8 * 1024;
/// Half the `Date` header's resolution plus a round trip's worth of slack.
const DATE_UNCERTAINTY_MS: i64 = 600;
/// Server messages are cut to this many characters before they reach logs or status.
const MAX_MESSAGE: usize = 300;

/// A named Auth API environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Production,
    Uat,
}

/// Where and how to reach the Auth API. Durations are in seconds (integer or fractional).
///
/// Either `environment` or `base_url` (not both); with neither, production.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    /// `production` or `uat`.
    #[serde(default)]
    pub environment: Option<Environment>,
    /// A custom base URL such as `https://auth.example/v1/auth` (simulator, staging).
    #[serde(default)]
    pub base_url: Option<String>,
    /// The JWKS URL; default: the base URL's scheme and authority + `/.well-known/jwks.json`.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// A PEM file with extra CA certificates to trust (added to the built-in roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// TCP + TLS connect timeout.
    #[serde(default = "default_connect_timeout", with = "secs")]
    pub connect_timeout: Duration,
    /// Whole-request timeout (connect, send, response, body).
    #[serde(default = "default_timeout", with = "secs")]
    pub timeout: Duration,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(3)
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            environment: None,
            base_url: None,
            jwks_url: None,
            ca_file: None,
            connect_timeout: default_connect_timeout(),
            timeout: default_timeout(),
        }
    }
}

impl ApiSettings {
    /// Settings for a custom base URL (e.g. a simulator) with the default JWKS location.
    pub fn custom(base_url: impl Into<String>) -> Self {
        ApiSettings {
            base_url: Some(base_url.into()),
            ..ApiSettings::default()
        }
    }

    /// The resolved endpoint URLs, or what is wrong with the settings.
    pub fn endpoints(&self) -> Result<Endpoints, ApiError> {
        let (base, default_jwks) = match (&self.environment, &self.base_url) {
            (Some(_), Some(_)) => {
                return Err(ApiError::Config(
                    "set either `environment` or `base_url`, not both".into(),
                ))
            }
            (Some(Environment::Uat), None) => (UAT_BASE_URL.to_string(), Some(UAT_JWKS_URL)),
            (Some(Environment::Production), None) | (None, None) => {
                (PRODUCTION_BASE_URL.to_string(), Some(PRODUCTION_JWKS_URL))
            }
            (None, Some(base)) => (base.clone(), None),
        };
        let base = parse_http_url("base_url", &base)?;
        let jwks = match (&self.jwks_url, default_jwks) {
            (Some(url), _) => parse_http_url("jwks_url", url)?,
            (None, Some(url)) => parse_http_url("jwks_url", url)?,
            (None, None) => derive_jwks_url(&base)?,
        };
        let join = |suffix: &str| {
            let text = format!("{}/{suffix}", base.as_str().trim_end_matches('/'));
            parse_http_url("base_url", &text)
        };
        Ok(Endpoints {
            mint: join("api-key/token")?,
            refresh: join("token/refresh")?,
            jwks,
        })
    }
}

/// The three URLs the agent calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub mint: Url,
    pub refresh: Url,
    pub jwks: Url,
}

fn parse_http_url(what: &str, text: &str) -> Result<Url, ApiError> {
    let url = Url::parse(text)
        .map_err(|e| ApiError::Config(format!("{what} {text:?} is not a URL: {e}")))?;
    if url.scheme() != "https" && url.scheme() != "http" {
        return Err(ApiError::Config(format!(
            "{what} {text:?} must be an https:// URL (http:// only for a loopback test server)"
        )));
    }
    if url.host_str().is_none() {
        return Err(ApiError::Config(format!("{what} {text:?} has no host")));
    }
    // Tokens and refresh tokens travel in these requests: in clear text only to this
    // machine (a local simulator), never over a network.
    if url.scheme() == "http" && !is_loopback(&url) {
        return Err(ApiError::Config(format!(
            "{what} {text:?} uses plain http:// to a non-loopback host: use https:// \
             (http:// is allowed only for 127.0.0.0/8, ::1 and localhost)"
        )));
    }
    Ok(url)
}

fn derive_jwks_url(base: &Url) -> Result<Url, ApiError> {
    let mut url = base.clone();
    url.set_path("/.well-known/jwks.json");
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

/// Durations as seconds in config files: an integer or a fraction (`0.5`).
pub mod secs {
    use serde::{Deserialize as _, Deserializer, Serializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(|_| {
            serde::de::Error::custom(format!(
                "{secs} is not a valid duration in seconds (must be finite and >= 0)"
            ))
        })
    }

    pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(value.as_secs_f64())
    }
}

/// What went wrong talking to the Auth API. Messages never contain tokens or signatures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error(
        "Auth API rejected the request as malformed (HTTP {status}): {message}{}",
        rid(request_id)
    )]
    BadRequest {
        status: u16,
        message: String,
        request_id: Option<String>,
    },
    #[error(
        "Auth API refused the credentials (HTTP 401): {message}{}{}",
        rid(request_id),
        unauthorized_hint(message)
    )]
    Unauthorized {
        message: String,
        request_id: Option<String>,
    },
    #[error("Auth API rate limit (HTTP 429){}", retry_hint(*retry_after))]
    RateLimited { retry_after: Option<Duration> },
    #[error("Auth API server error (HTTP {status}): {message}{}", retry_hint(*retry_after))]
    Server {
        status: u16,
        message: String,
        /// `Retry-After` of a 503 (unavailable for a known time, e.g. maintenance).
        retry_after: Option<Duration>,
    },
    #[error("cannot reach the Auth API ({kind}): {detail}")]
    Transport { kind: TransportKind, detail: String },
    #[error("unexpected Auth API response: {0}")]
    Protocol(String),
    #[error("Auth API settings: {0}")]
    Config(String),
}

/// The flavour of a transport failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    Connect,
    Timeout,
    /// Reset, closed mid-response, TLS failure after connect, ...
    Other,
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TransportKind::Connect => "connect",
            TransportKind::Timeout => "timeout",
            TransportKind::Other => "connection",
        })
    }
}

fn rid(request_id: &Option<String>) -> String {
    request_id
        .as_deref()
        .map(|r| format!(" (request_id {r})"))
        .unwrap_or_default()
}

fn retry_hint(retry_after: Option<Duration>) -> String {
    retry_after
        .map(|d| format!("; retry after {} s", d.as_secs_f64().ceil()))
        .unwrap_or_default()
}

fn unauthorized_hint(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    if m.contains("key") && (m.contains("unknown") || m.contains("not found")) {
        "; key_id unknown to the API: was the public key registered for this environment?"
    } else if mentions_clock(&m) {
        "; the timestamp was outside the API's window: check the clock (tm-agent resyncs from the Date header)"
    } else {
        ""
    }
}

/// Whether a 401 message points at the challenge timestamp rather than the key.
pub fn mentions_clock(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    ["timestamp", "clock", "window", "skew", "expired challenge"]
        .iter()
        .any(|w| m.contains(w))
}

impl ApiError {
    /// A stable code for status and logs.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { .. } => "bad_request",
            ApiError::Unauthorized { .. } => "unauthorized",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Server { .. } => "server_error",
            ApiError::Transport { .. } => "transport",
            ApiError::Protocol(_) => "protocol",
            ApiError::Config(_) => "config",
        }
    }

    /// Transient: worth retrying the same request after a backoff.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ApiError::RateLimited { .. } | ApiError::Server { .. } | ApiError::Transport { .. }
        )
    }

    fn from_reqwest(err: reqwest::Error) -> ApiError {
        let kind = if err.is_timeout() {
            TransportKind::Timeout
        } else if err.is_connect() {
            TransportKind::Connect
        } else {
            TransportKind::Other
        };
        // The chain names the URL and the OS/TLS cause; neither holds a secret.
        let mut detail = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(cause) = source {
            detail.push_str(": ");
            detail.push_str(&cause.to_string());
            source = cause.source();
        }
        ApiError::Transport { kind, detail }
    }
}

/// A fresh access/refresh pair. `Debug` shows neither token.
pub struct TokenPair {
    /// The JWT for `Authorization: Bearer`.
    pub access_token: Arc<str>,
    /// Rotating: only the newest one is good. Never leaves the token manager.
    pub refresh_token: SecretString,
    /// `expires_in` (an RFC 3339 time despite its name) on the server's clock; a
    /// seconds-form `expires_in` is counted from the server's `now`.
    pub expires_at: SystemTime,
    /// Always `Bearer` in practice.
    pub token_type: String,
}

impl std::fmt::Debug for TokenPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenPair")
            .field("access_token", &"<redacted>")
            .field("refresh_token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .field("token_type", &self.token_type)
            .finish()
    }
}

/// The JWKS document: the EC P-256 keys in it. Keys of other types are skipped, not errors.
#[derive(Debug, Clone, Default)]
pub struct Jwks {
    pub keys: Vec<jose::Jwk>,
    /// Entries that were not EC JWKs (e.g. RSA): counted for diagnostics.
    pub skipped: usize,
}

/// The server's clock as learned from `Date` headers: server time minus local time.
///
/// Shared by clones of a [`Client`]; lock-free. `Date` has 1 s resolution, so the offset is
/// estimated at the middle of that second and is good to about ±0.5 s plus latency.
#[derive(Debug, Clone, Default)]
pub struct ServerClock {
    inner: Arc<ClockInner>,
}

#[derive(Debug, Default)]
struct ClockInner {
    offset_ms: AtomicI64,
    known: AtomicBool,
}

impl ServerClock {
    /// Server minus local clock in milliseconds, once any response has carried a `Date`.
    pub fn offset_ms(&self) -> Option<i64> {
        self.inner
            .known
            .load(Ordering::Acquire)
            .then(|| self.inner.offset_ms.load(Ordering::Acquire))
    }

    /// Local clock + offset (the local clock until a `Date` has been seen).
    pub fn server_now(&self) -> SystemTime {
        shift(SystemTime::now(), self.offset_ms().unwrap_or(0))
    }

    /// Converts a server-clock time (such as a token's expiry) to the local clock, erring
    /// early: `Date` only has whole seconds, so the offset may be up to half a second (plus
    /// the round trip) too small, and an expiry must never be placed after the real one.
    pub fn to_local(&self, server_time: SystemTime) -> SystemTime {
        match self.offset_ms() {
            Some(offset) => shift(
                server_time,
                offset.saturating_add(DATE_UNCERTAINTY_MS).saturating_neg(),
            ),
            None => server_time,
        }
    }

    /// Records a `Date` header received at local time `received`.
    pub fn observe(&self, date: SystemTime, received: SystemTime) {
        let date_ms = signed_ms(date).saturating_add(500);
        self.set_offset_ms(date_ms.saturating_sub(signed_ms(received)));
    }

    /// Sets the offset directly (tests, or a config override).
    pub fn set_offset_ms(&self, offset_ms: i64) {
        self.inner.offset_ms.store(offset_ms, Ordering::Release);
        self.inner.known.store(true, Ordering::Release);
    }

    fn observe_headers(&self, headers: &HeaderMap) {
        let received = SystemTime::now();
        if let Some(date) = headers
            .get(DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok())
        {
            self.observe(date, received);
        }
    }
}

/// Milliseconds since the epoch, negative before it.
fn signed_ms(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// `t` moved by `ms` milliseconds (either direction).
pub fn shift(t: SystemTime, ms: i64) -> SystemTime {
    let d = Duration::from_millis(ms.unsigned_abs());
    if ms >= 0 {
        t.checked_add(d).unwrap_or(t)
    } else {
        t.checked_sub(d).unwrap_or(t)
    }
}

/// The Auth API client. Cheap to clone; share one per environment.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    endpoints: Endpoints,
    clock: ServerClock,
}

impl Client {
    /// Builds the client: resolves URLs, loads the extra CA, sets timeouts and User-Agent.
    pub fn new(settings: &ApiSettings) -> Result<Client, ApiError> {
        let endpoints = settings.endpoints()?;
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .user_agent(concat!("tm-agent/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(path) = &settings.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                ApiError::Config(format!("cannot read ca_file {}: {e}", path.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                ApiError::Config(format!("ca_file {} is not PEM: {e}", path.display()))
            })?;
            if certs.is_empty() {
                return Err(ApiError::Config(format!(
                    "ca_file {} holds no certificate",
                    path.display()
                )));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        if is_loopback(&endpoints.mint) {
            // A proxy from the environment must never see loopback test traffic.
            builder = builder.no_proxy();
        }
        let http = builder
            .build()
            .map_err(|e| ApiError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Client {
            http,
            endpoints,
            clock: ServerClock::default(),
        })
    }

    /// The URLs in use.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// The server clock learned from this client's responses.
    pub fn clock(&self) -> &ServerClock {
        &self.clock
    }

    /// `POST {base}/api-key/token` with a signed challenge.
    pub async fn mint(&self, body: &jose::ChallengeBody) -> Result<TokenPair, ApiError> {
        let hint = body.key_id.len() + body.signature.len() + 64;
        let json = secret_json(body, hint)?;
        let bytes = self.post(self.endpoints.mint.clone(), json).await?;
        parse_pair(&bytes, self.clock.server_now())
    }

    /// `POST {base}/token/refresh`. The old refresh token must not be used again after this.
    pub async fn refresh(&self, refresh_token: &SecretString) -> Result<TokenPair, ApiError> {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            refresh_token: &'a str,
        }
        let token = refresh_token.expose_secret();
        let json = secret_json(
            &Body {
                refresh_token: token,
            },
            token.len() + 32,
        )?;
        let bytes = self.post(self.endpoints.refresh.clone(), json).await?;
        parse_pair(&bytes, self.clock.server_now())
    }

    /// `GET` the JWKS.
    pub async fn jwks(&self) -> Result<Jwks, ApiError> {
        let req = self
            .http
            .get(self.endpoints.jwks.clone())
            .header(ACCEPT, "application/json");
        // The JWKS is a static document, often served from a cache (or from another host
        // with `jwks_url`): its `Date` may be stale, and is not the clock that `expires_in`
        // and `exp` are measured against. Only mint and refresh answers set the clock.
        let bytes = self.send(req, false).await?;
        parse_jwks(&bytes)
    }

    /// The body (holding a refresh token or a signature) is handed over without a copy:
    /// `Bytes::from_owner` makes the `Zeroizing` buffer the owner of the bytes, so it is
    /// wiped once reqwest and hyper let go of it. What they and rustls copy while writing
    /// it out (their buffers, the TLS plaintext) is beyond our reach and is not wiped.
    async fn post(
        &self,
        url: Url,
        body: Zeroizing<Vec<u8>>,
    ) -> Result<Zeroizing<Vec<u8>>, ApiError> {
        let req = self
            .http
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json")
            .body(bytes::Bytes::from_owner(body));
        self.send(req, true).await
    }

    /// Sends, learns the clock from the `Date` header when `learn_clock`, reads the body
    /// (capped, zeroized) and maps non-2xx to errors.
    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        learn_clock: bool,
    ) -> Result<Zeroizing<Vec<u8>>, ApiError> {
        let mut resp = req.send().await.map_err(ApiError::from_reqwest)?;
        if learn_clock {
            self.clock.observe_headers(resp.headers());
        }
        let status = resp.status();
        // An HTTP-date `Retry-After` is on the server's clock.
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, self.clock.server_now()));
        // Sized once from Content-Length where given: each growth of the buffer would leave
        // a partial copy of the tokens in freed memory.
        let capacity = resp
            .content_length()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(BODY_CAPACITY)
            .min(MAX_BODY);
        let mut body = Zeroizing::new(Vec::with_capacity(capacity));
        while let Some(chunk) = resp.chunk().await.map_err(ApiError::from_reqwest)? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(ApiError::Protocol(format!(
                    "HTTP {} response body larger than {MAX_BODY} bytes",
                    status.as_u16()
                )));
            }
            body.extend_from_slice(&chunk);
        }
        if status.is_success() {
            Ok(body)
        } else {
            Err(error_from_response(status, retry_after, &body))
        }
    }
}

/// 127.0.0.0/8, ::1 or `localhost` (the URL parser has already lowercased domain names
/// and normalised IP literals; IPv6 ones come bracketed).
/// `value` as JSON in a zeroized buffer, allocated once at `hint` bytes (enough for the
/// usual, escape-free content) so that growing it leaves no partial copies in freed memory.
fn secret_json(value: &impl serde::Serialize, hint: usize) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    let mut buf = Zeroizing::new(Vec::with_capacity(hint));
    serde_json::to_writer(&mut *buf, value).map_err(|e| ApiError::Protocol(e.to_string()))?;
    Ok(buf)
}

fn is_loopback(url: &Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `Retry-After`: delta-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    request_id: Option<String>,
}

/// Maps a non-2xx response to an error. The body is read only for the error envelope.
pub(crate) fn error_from_response(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
) -> ApiError {
    let envelope: Option<Envelope> = serde_json::from_slice(body).ok();
    let (message, request_id) = match envelope {
        Some(env) => {
            let text = match (env.message, env.kind) {
                (Some(m), _) => m,
                (None, Some(k)) => k,
                (None, None) => status_text(status),
            };
            (scrub(&text), env.request_id.map(|r| scrub(&r)))
        }
        None => (status_text(status), None),
    };
    match status.as_u16() {
        401 | 403 => ApiError::Unauthorized {
            message,
            request_id,
        },
        429 => ApiError::RateLimited { retry_after },
        // Retry-After only has a defined meaning on a 503 among the 5xx (RFC 9110 §10.2.3).
        503 => ApiError::Server {
            status: 503,
            message,
            retry_after,
        },
        s if s >= 500 => ApiError::Server {
            status: s,
            message,
            retry_after: None,
        },
        s => ApiError::BadRequest {
            status: s,
            message,
            request_id,
        },
    }
}

fn status_text(status: StatusCode) -> String {
    status
        .canonical_reason()
        .unwrap_or("no error message")
        .to_string()
}

/// Cuts a server-provided message and masks anything that looks like a credential: a JWT,
/// or a long run of token characters (a signature or an opaque refresh token that the
/// server repeats back). Such messages reach the log and `status`. Whitespace of any kind
/// separates words, as a space does; control characters and `is_invisible` ones are
/// dropped from the result. Each word is judged
/// twice, as it is and without the characters that print as nothing or break a run of token
/// characters (controls, zero-width and other non-ASCII characters), so that such
/// characters inside a credential cannot hide it.
pub fn scrub(text: &str) -> String {
    let spaced: String = text
        .chars()
        .map(|c| if c.is_whitespace() { ' ' } else { c })
        .collect();
    let masked: Vec<&str> = spaced
        .split(' ')
        .map(|word| {
            let bare: String = word.chars().filter(char::is_ascii_graphic).collect();
            if looks_secret(word) || looks_secret(&bare) {
                "<redacted>"
            } else {
                word
            }
        })
        .collect();
    let joined = masked.join(" ");
    let mut out: String = joined
        .chars()
        .filter(|c| !c.is_control() && !is_invisible(*c))
        .take(MAX_MESSAGE)
        .collect();
    if joined.chars().count() > MAX_MESSAGE {
        out.push('…');
    }
    out
}

/// Characters that print as nothing or reorder what follows them (zero-width, joiners,
/// bidirectional overrides and isolates, the BOM, the soft hyphen): dropped from a server's
/// message, so that the line it lands in reads as it is.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{ad}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}'
    )
}

/// A word of a server message that may be a credential: it holds a JWT (`eyJ…`, or three
/// dot-separated parts), or a run of base64/base64url characters of 24 or more with upper-
/// and lower-case letters and digits (a signature, an opaque token; not a UUID, a URL or a
/// word), or a run of 32 or more hex digits.
fn looks_secret(word: &str) -> bool {
    let jwt_like = word
        .split(|c: char| !(c.is_ascii_alphanumeric() || "-_.".contains(c)))
        .any(|run| run.matches('.').count() >= 2 && run.len() > 40);
    if word.contains("eyJ") || jwt_like {
        return true;
    }
    word.split(|c: char| !(c.is_ascii_alphanumeric() || "-_+/=~".contains(c)))
        .any(|run| {
            let has = |f: fn(&char) -> bool| run.chars().any(|c| f(&c));
            let mixed = has(char::is_ascii_uppercase)
                && has(char::is_ascii_lowercase)
                && has(char::is_ascii_digit);
            (run.len() >= 24 && mixed)
                || (run.len() >= 32 && run.chars().all(|c| c.is_ascii_hexdigit()))
        })
}

/// Describes a serde error by position only: its text may quote the (secret) input.
fn json_error(what: &str, e: &serde_json::Error) -> ApiError {
    ApiError::Protocol(format!(
        "{what} is not the expected JSON ({:?} error at line {} column {})",
        e.classify(),
        e.line(),
        e.column()
    ))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ExpiresIn {
    /// What the API sends: an RFC 3339 time.
    Time(String),
    /// Tolerated in case the API ever follows OAuth and sends seconds.
    Seconds(u64),
}

/// Parses a token response; `server_now` (the server clock, just updated from this
/// response's `Date`) anchors a seconds-form `expires_in`, so that `expires_at` is on the
/// server clock in both forms, like the JWT `exp`, and is converted to local time once.
pub(crate) fn parse_pair(body: &[u8], server_now: SystemTime) -> Result<TokenPair, ApiError> {
    // Zeroizing: on every refusal below, and for the access token's copy into its `Arc`,
    // the parsed tokens are wiped when dropped, not left in freed memory.
    #[derive(Deserialize)]
    struct Raw {
        access_token: Zeroizing<String>,
        refresh_token: Zeroizing<String>,
        expires_in: ExpiresIn,
        #[serde(default)]
        token_type: Option<String>,
    }
    let mut raw: Raw =
        serde_json::from_slice(body).map_err(|e| json_error("token response", &e))?;
    let expires_at = match raw.expires_in {
        ExpiresIn::Time(text) => parse_rfc3339(&text)?,
        ExpiresIn::Seconds(secs) => server_now
            .checked_add(Duration::from_secs(secs))
            .ok_or_else(|| ApiError::Protocol(format!("expires_in {secs} s is out of range")))?,
    };
    if raw.access_token.is_empty() || raw.refresh_token.is_empty() {
        return Err(ApiError::Protocol(
            "token response has an empty token".into(),
        ));
    }
    let token_type = raw.token_type.unwrap_or_else(|| "Bearer".into());
    if !token_type.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::Protocol(format!(
            "token_type {:?} is not Bearer",
            scrub(&token_type)
        )));
    }
    Ok(TokenPair {
        access_token: Arc::from(raw.access_token.as_str()),
        // Moved, not copied (serde sized the string to its content).
        refresh_token: SecretString::from(std::mem::take(&mut *raw.refresh_token)),
        expires_at,
        token_type,
    })
}

/// Parses an RFC 3339 date-time (`expires_in`).
pub fn parse_rfc3339(text: &str) -> Result<SystemTime, ApiError> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(SystemTime::from)
        .map_err(|_| {
            ApiError::Protocol(format!(
                "expires_in {:?} is not an RFC 3339 time",
                scrub(text)
            ))
        })
}

pub(crate) fn parse_jwks(body: &[u8]) -> Result<Jwks, ApiError> {
    #[derive(Deserialize)]
    struct Raw {
        keys: Vec<serde_json::Value>,
    }
    let raw: Raw = serde_json::from_slice(body).map_err(|e| json_error("JWKS", &e))?;
    let mut jwks = Jwks::default();
    for value in raw.keys {
        match serde_json::from_value::<jose::Jwk>(value) {
            Ok(jwk) => jwks.keys.push(jwk),
            Err(_) => jwks.skipped += 1,
        }
    }
    Ok(jwks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    /// The mint, refresh and JWKS URLs of `settings`.
    fn urls(settings: &ApiSettings) -> [String; 3] {
        let ep = settings.endpoints().unwrap();
        [ep.mint, ep.refresh, ep.jwks].map(String::from)
    }

    #[test]
    fn environment_urls() {
        assert_eq!(
            urls(&ApiSettings::default()),
            [
                "https://api.truemarkets.co/v1/auth/api-key/token",
                "https://api.truemarkets.co/v1/auth/token/refresh",
                "https://api.truemarkets.co/.well-known/jwks.json",
            ]
        );
        let uat = ApiSettings {
            environment: Some(Environment::Uat),
            ..ApiSettings::default()
        };
        assert_eq!(
            urls(&uat),
            [
                "https://api.uat.truemarkets.co/v1/auth/api-key/token",
                "https://api.uat.truemarkets.co/v1/auth/token/refresh",
                "https://api.uat.truemarkets.co/.well-known/jwks.json",
            ]
        );
    }

    #[test]
    fn custom_base_derives_jwks_at_host_root() {
        assert_eq!(
            urls(&ApiSettings::custom("http://127.0.0.1:8443/v1/auth/")),
            [
                "http://127.0.0.1:8443/v1/auth/api-key/token",
                "http://127.0.0.1:8443/v1/auth/token/refresh",
                "http://127.0.0.1:8443/.well-known/jwks.json",
            ]
        );
        let custom = ApiSettings {
            jwks_url: Some("https://keys.example/jwks".into()),
            ..ApiSettings::custom("https://auth.example/v1/auth")
        };
        assert_eq!(
            custom.endpoints().unwrap().jwks.as_str(),
            "https://keys.example/jwks"
        );
        let both = ApiSettings {
            environment: Some(Environment::Production),
            ..ApiSettings::custom("https://auth.example")
        };
        assert!(matches!(both.endpoints(), Err(ApiError::Config(_))));
        assert!(ApiSettings::custom("ftp://x/y").endpoints().is_err());
    }

    #[test]
    fn settings_deserialize_with_seconds_and_reject_unknown_fields() {
        let s: ApiSettings =
            toml::from_str("environment = \"uat\"\nconnect_timeout = 1.5\ntimeout = 20\n").unwrap();
        assert_eq!(s.environment, Some(Environment::Uat));
        assert_eq!(s.connect_timeout, Duration::from_millis(1500));
        assert_eq!(s.timeout, Duration::from_secs(20));
        assert!(toml::from_str::<ApiSettings>("bogus = 1").is_err());
        assert!(toml::from_str::<ApiSettings>("timeout = -1").is_err());
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    /// The spellings of one instant a server may send: fractional seconds, lower-case
    /// separators, other offsets (RFC 3339 also allows a space for the `T`).
    #[test]
    fn expires_in_takes_every_rfc_3339_spelling() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_553_445);
        for text in [
            "2030-01-02T03:04:05Z",
            "2030-01-02T03:04:05+00:00",
            "2030-01-02t03:04:05z",
            "2030-01-02 03:04:05Z",
            "2030-01-02T05:04:05+02:00",
            "2030-01-01T22:34:05-04:30",
        ] {
            assert_eq!(parse_rfc3339(text).unwrap(), at, "{text}");
        }
        assert_eq!(
            parse_rfc3339("2030-01-02T03:04:05.250Z").unwrap(),
            at + Duration::from_millis(250)
        );
        assert_eq!(
            parse_rfc3339("2030-01-02T03:04:05.123456789+00:00").unwrap(),
            at + Duration::from_nanos(123_456_789)
        );
        for bad in ["2030-01-02T03:04:05", "1893553445", "2030-01-02"] {
            assert!(parse_rfc3339(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn server_messages_lose_what_looks_like_a_credential() {
        let sig = "vZxhz9TAZ49SoMP06Xb0NVwqAD3p9D96Ced8YRJJ7DxTtepQHh8BAHD4oYZE_0V8z0ydH2cqWdDqSNOW73XYDw";
        let rt = "rt_Q2hhbmdlTWVQbGVhc2U3ZmE5YjE0NzI";
        let hex = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let jwt = "eyJhbGciOiJFUzI1NiJ9.eyJleHAiOjF9.c2ln";
        let text =
            format!("signature does not verify: {sig}; refresh token {rt} revoked ({hex}) {jwt}");
        let out = scrub(&text);
        for secret in [sig, rt, hex, jwt] {
            assert!(!out.contains(secret), "{out}");
        }
        assert_eq!(out.matches("<redacted>").count(), 4, "{out}");
        // What helps a reader stays: ids, URLs, ordinary words, a challenge message.
        let plain = "key_id 8e524529-cbd8-49c8-a28d-a35de5580f69 unknown at \
                     https://api.truemarkets.com/v1/auth/api-key/token: timestamp 1796027037 \
                     is outside the allowed window (request_id req_7f3a)";
        assert_eq!(scrub(plain), plain);
    }

    /// Characters that print as nothing or split a run of token characters cannot hide a
    /// credential from the masking; whitespace of any kind still separates words.
    #[test]
    fn invisible_characters_cannot_split_a_credential_past_the_mask() {
        let sig = "vZxhz9TAZ49SoMP06Xb0NVwqAD3p9D96Ced8YRJJ7DxTtepQHh8BAHD4oYZE_0V8z0ydH2cqWdDqSNOW73XYDw";
        for splitter in ['\u{7}', '\u{200b}', '\u{feff}', '\u{ad}', 'é'] {
            let split: String = sig
                .chars()
                .enumerate()
                .flat_map(|(i, c)| (i % 20 == 19).then_some(splitter).into_iter().chain([c]))
                .collect();
            let text = format!("bad signature e{splitter}yJhbGciOiJFUzI1NiJ9 {split} at\tnoon");
            let out = scrub(&text);
            assert_eq!(
                out, "bad signature <redacted> <redacted> at noon",
                "{splitter:?}"
            );
        }
        // A key id after a tab stays readable: the tab separates, it does not join.
        let id = "key\t0B9B3F3E-8D4C-4C1E-9F1A-2B3C4D5E6F70 unknown";
        assert_eq!(
            scrub(id),
            "key 0B9B3F3E-8D4C-4C1E-9F1A-2B3C4D5E6F70 unknown"
        );
        assert_eq!(scrub("clé\u{1} inconnue"), "clé inconnue");
        // Nothing invisible and nothing that reorders the line is left in it.
        let spoof = "key \u{202e}dekovern\u{202c} ok\u{200b} \u{2066}x\u{2069}\u{feff}\u{ad}";
        assert_eq!(scrub(spoof), "key dekovern ok x");
    }

    #[test]
    fn pair_parsing_is_strict_about_expires_in_and_redacts() {
        let body = br#"{"access_token":"eyJa.b.c","refresh_token":"eyJr.s.t","expires_in":"2030-01-02T03:04:05Z","token_type":"Bearer"}"#;
        let pair = parse_pair(body, SystemTime::now()).unwrap();
        assert_eq!(
            pair.expires_at,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_553_445)
        );
        let dbg = format!("{pair:?}");
        assert!(!dbg.contains("eyJ"), "{dbg}");
        let bad =
            br#"{"access_token":"eyJsecret.x.y","refresh_token":"r","expires_in":"tomorrow"}"#;
        let err = parse_pair(bad, SystemTime::now()).unwrap_err();
        assert_eq!(err.code(), "protocol");
        // A type error must not quote the token it choked on.
        let wrong = br#"{"access_token":7,"refresh_token":"eyJsecret.x.y","expires_in":"x"}"#;
        let err = parse_pair(wrong, SystemTime::now()).unwrap_err();
        assert!(!err.to_string().contains("eyJ"), "{err}");
    }

    #[test]
    fn seconds_form_expires_in_counts_from_the_server_clock() {
        let server_now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let body = br#"{"access_token":"a.b.c","refresh_token":"r","expires_in":900}"#;
        let pair = parse_pair(body, server_now).unwrap();
        assert_eq!(pair.expires_at, server_now + Duration::from_secs(900));
        // to_local then applies the offset once: 40 s ahead → 40 s (+ slack) earlier locally.
        let clock = ServerClock::default();
        clock.set_offset_ms(40_000);
        assert_eq!(
            clock.to_local(pair.expires_at),
            server_now + Duration::from_secs(900) - Duration::from_millis(40_600)
        );
    }

    #[test]
    fn huge_expires_in_is_a_protocol_error_not_a_panic() {
        let now = SystemTime::now();
        for expires_in in [
            "18446744073709551615",
            "9223372036854775807",
            "1e300",
            "-1",
            r#""+999999-01-01T00:00:00Z""#,
        ] {
            let body = format!(
                r#"{{"access_token":"a.b.c","refresh_token":"r","expires_in":{expires_in}}}"#
            );
            let err = parse_pair(body.as_bytes(), now).unwrap_err();
            assert_eq!(err.code(), "protocol", "{expires_in}: {err}");
        }
    }

    #[test]
    fn secret_json_is_written_in_one_allocation() {
        let token = format!("eyJ{}", "x".repeat(900));
        let hint = token.len() + 32;
        let json = secret_json(&serde_json::json!({ "refresh_token": token }), hint).unwrap();
        assert_eq!(
            json.capacity(),
            hint,
            "the buffer grew: copies were left behind"
        );
        assert_eq!(&json[..21], br#"{"refresh_token":"eyJ"#);
    }

    #[test]
    fn plain_http_only_to_loopback() {
        for ok in [
            "http://127.0.0.1:8080/v1/auth",
            "http://127.9.8.7/v1/auth",
            "http://localhost:1/v1/auth",
            "http://LOCALHOST/v1/auth",
            "http://[::1]:9/v1/auth",
            "https://auth.example/v1/auth",
        ] {
            let ep = ApiSettings::custom(ok).endpoints();
            assert!(ep.is_ok(), "{ok}: {ep:?}");
        }
        for bad in [
            "http://auth.example/v1/auth",
            "http://10.0.0.1/v1/auth",
            "http://[::ffff:10.0.0.1]/v1/auth",
            "http://localhost.evil.example/v1/auth",
            "http://0.0.0.0/v1/auth",
        ] {
            match ApiSettings::custom(bad).endpoints() {
                Err(ApiError::Config(m)) => assert!(m.contains("use https://"), "{m}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        // The JWKS URL is held to the same rule.
        let s = ApiSettings {
            jwks_url: Some("http://keys.example/jwks".into()),
            ..ApiSettings::custom("https://auth.example/v1/auth")
        };
        assert!(matches!(s.endpoints(), Err(ApiError::Config(_))));
    }

    #[test]
    fn error_envelope_mapping() {
        let body =
            br#"{"type":"unauthenticated","message":"invalid signature","request_id":"r-1"}"#;
        match error_from_response(StatusCode::UNAUTHORIZED, None, body) {
            ApiError::Unauthorized {
                message,
                request_id,
            } => {
                assert_eq!(message, "invalid signature");
                assert_eq!(request_id.as_deref(), Some("r-1"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            error_from_response(StatusCode::BAD_REQUEST, None, b"{}").code(),
            "bad_request"
        );
        assert_eq!(
            error_from_response(StatusCode::SERVICE_UNAVAILABLE, None, b"<html>").code(),
            "server_error"
        );
        let e = error_from_response(
            StatusCode::TOO_MANY_REQUESTS,
            Some(Duration::from_secs(3)),
            b"",
        );
        assert!(matches!(e, ApiError::RateLimited { retry_after: Some(d) } if d.as_secs() == 3));
        let e = error_from_response(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(Duration::from_secs(4)),
            b"",
        );
        assert!(
            matches!(e, ApiError::Server { status: 503, retry_after: Some(d), .. } if d.as_secs() == 4)
        );
        assert!(e.to_string().contains("retry after 4 s"), "{e}");
        let e = error_from_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            Some(Duration::from_secs(4)),
            b"",
        );
        assert!(
            matches!(
                e,
                ApiError::Server {
                    retry_after: None,
                    ..
                }
            ),
            "{e:?}"
        );
        let leak = br#"{"message":"bad token eyJhbGciOi.eyJzdWIi.sig here"}"#;
        let e = error_from_response(StatusCode::UNAUTHORIZED, None, leak);
        assert!(!e.to_string().contains("eyJ"), "{e}");
    }

    #[test]
    fn clock_offset_from_date() {
        let clock = ServerClock::default();
        assert_eq!(clock.offset_ms(), None);
        let local = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_250);
        let date = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_040);
        clock.observe(date, local);
        // Midpoint of the Date second: 40.5 s - 0.25 s.
        assert_eq!(clock.offset_ms(), Some(40_250));
        let server = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        // Expiries convert conservatively (half a second early, plus slack).
        assert_eq!(
            clock.to_local(server),
            server - Duration::from_millis(40_250 + 600)
        );
    }

    /// A one-shot HTTP server on 127.0.0.1 answering every connection with `response`.
    async fn canned(response: &'static str) -> (String, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let mut buf = vec![0u8; 8192];
                let _ = sock.read(&mut buf).await;
                if response == "HANG" {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                } else if response == "RESET" {
                    drop(sock);
                    continue;
                } else {
                    let _ = sock.write_all(response.as_bytes()).await;
                }
            }
        });
        (format!("http://{addr}/v1/auth"), task)
    }

    fn body() -> jose::ChallengeBody {
        jose::ChallengeBody {
            key_id: "k".into(),
            timestamp: 1,
            signature: "s".into(),
        }
    }

    #[tokio::test]
    async fn http_error_mapping_over_loopback() {
        let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(100));
        let resp: &'static str = Box::leak(
            format!(
                "HTTP/1.1 429 Too Many Requests\r\nDate: {date}\r\nRetry-After: 5\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .into_boxed_str(),
        );
        let (url, _t) = canned(resp).await;
        let client = Client::new(&ApiSettings::custom(url)).unwrap();
        let err = client.mint(&body()).await.unwrap_err();
        assert!(
            matches!(err, ApiError::RateLimited { retry_after: Some(d) } if d.as_secs() == 5),
            "{err:?}"
        );
        let offset = client.clock().offset_ms().unwrap();
        assert!((98_000..=102_000).contains(&offset), "{offset}");

        let ok: &'static str = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 107\r\nConnection: close\r\n\r\n{\"access_token\":\"a.b.c\",\"refresh_token\":\"r\",\"expires_in\":\"2030-01-02T03:04:05+00:00\",\"token_type\":\"Bearer\"}";
        assert_eq!(ok.split("\r\n\r\n").nth(1).unwrap().len(), 107);
        let (url, _t) = canned(ok).await;
        let client = Client::new(&ApiSettings::custom(url)).unwrap();
        let pair = client
            .refresh(&SecretString::from("r".to_string()))
            .await
            .unwrap();
        assert_eq!(&*pair.access_token, "a.b.c");

        let (url, _t) = canned("RESET").await;
        let client = Client::new(&ApiSettings::custom(url)).unwrap();
        let err = client.jwks().await.unwrap_err();
        assert_eq!(err.code(), "transport", "{err}");

        let (url, _t) = canned("HANG").await;
        let settings = ApiSettings {
            timeout: Duration::from_millis(300),
            ..ApiSettings::custom(url)
        };
        let client = Client::new(&settings).unwrap();
        let err = client.mint(&body()).await.unwrap_err();
        assert!(
            matches!(
                err,
                ApiError::Transport {
                    kind: TransportKind::Timeout,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_huge_expires_in_over_http_is_a_protocol_error() {
        let body = r#"{"access_token":"a.b.c","refresh_token":"r","expires_in":18446744073709551615,"token_type":"Bearer"}"#;
        let resp: &'static str = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        let (url, _t) = canned(resp).await;
        let client = Client::new(&ApiSettings::custom(url)).unwrap();
        let err = client
            .refresh(&SecretString::from("r".to_string()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "protocol", "{err}");
    }

    #[tokio::test]
    async fn connect_refused_is_transport_connect() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let client = Client::new(&ApiSettings::custom(format!("http://{addr}/v1/auth"))).unwrap();
        let err = client.jwks().await.unwrap_err();
        assert!(
            matches!(
                err,
                ApiError::Transport {
                    kind: TransportKind::Connect,
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
