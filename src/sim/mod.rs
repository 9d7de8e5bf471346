//! `tm-auth-sim`: a simulator of the True Markets Auth API (`reference/auth-api.md`) with
//! fault injection, for testing the agent and any other client against real HTTP and HTTPS
//! on loopback.
//!
//! It serves `POST /v1/auth/api-key/token`, `POST /v1/auth/token/refresh` and
//! `GET /.well-known/jwks.json` like the real service (strict request checks, ES256 JWTs,
//! rotating refresh tokens, a JWKS with `kid` and rotation grace, a `Date` header from its
//! possibly offset clock), plus an admin API under `/_sim/` for loopback clients.
//!
//! Start it in-process with [`Simulator::start`] (inside a tokio runtime); the returned
//! [`SimHandle`] gives the URLs and the CA certificate and drives the same state as the admin
//! API. The `tm-auth-sim` binary wraps it (see [`cli`]).
//!
//! Independence: the simulator shares only encodings with the agent (`jose`); its check of
//! request signatures is its own (`verify`), so an agent bug cannot be mirrored here.
//!
//! Threading: the whole mutable state sits in one `Arc<Mutex<state::SimState>>` taken in
//! short synchronous sections, never across `.await`. Listener and connection tasks live on
//! one `TaskTracker` and stop on one `CancellationToken` (on [`SimHandle::shutdown`], or when
//! the last handle is dropped).

mod admin;
mod api;
pub mod cli;
mod counters;
mod error;
mod fault;
mod http;
mod keys;
mod reject;
mod state;
mod tls;
mod tokens;
mod verify;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use p256::ecdsa::VerifyingKey;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::jose::is_uuid;
pub use counters::{Counters, RequestCounts};
pub use error::SimError;
pub use fault::{Endpoint, FaultKind, FaultSpec, FaultTarget, FaultTrigger};
pub use keys::{KeyRegistration, RegisteredKeyInfo};
pub use state::RotateInfo;

use state::{lock, Shared, SimState};

/// Default `iss` of issued tokens.
pub const DEFAULT_ISSUER: &str = "https://sim.truemarkets.local";

/// How the simulator starts. `SimConfig::default()` listens on ephemeral loopback ports.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Plain HTTP listen address (port 0 for an ephemeral port).
    pub http_addr: SocketAddr,
    /// HTTPS listen address (port 0 for an ephemeral port).
    pub https_addr: SocketAddr,
    /// Where to write the CA certificate (PEM) that signs the HTTPS certificate.
    pub cert_out: Option<PathBuf>,
    /// `iss` of issued tokens.
    pub issuer: String,
    /// Access token lifetime (default 15 min).
    pub access_ttl: Duration,
    /// Refresh token lifetime (default 24 h).
    pub refresh_ttl: Duration,
    /// How long a rotated-out JWKS key stays published (default 60 s).
    pub jwks_grace: Duration,
    /// Seconds added to the wall clock (negative: behind).
    pub clock_offset_secs: i64,
    /// Allowed |timestamp - now| in seconds (the API's is 30).
    pub timestamp_window_secs: u64,
    /// Refuse a second mint with the same (key_id, timestamp, signature).
    pub reject_replay: bool,
    /// Keys registered at start.
    pub keys: Vec<KeyRegistration>,
    /// Cap on open connections (both listeners together).
    pub max_connections: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        let lo = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        SimConfig {
            http_addr: lo,
            https_addr: lo,
            cert_out: None,
            issuer: DEFAULT_ISSUER.to_string(),
            access_ttl: Duration::from_secs(900),
            refresh_ttl: Duration::from_secs(86_400),
            jwks_grace: Duration::from_secs(60),
            clock_offset_secs: 0,
            timestamp_window_secs: 30,
            reject_replay: false,
            keys: Vec::new(),
            max_connections: 1024,
        }
    }
}

/// Where a running simulator can be reached; what `--ready-file` contains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ReadyInfo {
    /// e.g. `http://127.0.0.1:40123` (auth base: `{http}/v1/auth`).
    pub http: String,
    /// e.g. `https://127.0.0.1:40124`.
    pub https: String,
    /// The CA certificate file, if one was written.
    pub ca_file: Option<PathBuf>,
    pub pid: u32,
}

/// The entry point.
pub struct Simulator;

impl Simulator {
    /// Binds both listeners, makes the TLS identity (writing the CA to `cert_out` if set),
    /// registers the configured keys and starts serving on the current tokio runtime.
    pub async fn start(config: SimConfig) -> Result<SimHandle, SimError> {
        let state = SimState::new(&config)?;
        let tls = tls::generate()?;
        if let Some(path) = &config.cert_out {
            write_atomic(path, tls.ca_pem.as_bytes())?;
        }
        let http = bind("http", config.http_addr).await?;
        let https = bind("https", config.https_addr).await?;
        let http_addr = local_addr("http", &http, config.http_addr)?;
        let https_addr = local_addr("https", &https, config.https_addr)?;

        let shared: Shared = Arc::new(Mutex::new(state));
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let conns = Arc::new(Semaphore::new(config.max_connections.max(1)));
        let ctx = http::Ctx {
            state: shared.clone(),
            cancel: cancel.clone(),
        };
        http::spawn_listener(ctx.clone(), http, None, tracker.clone(), conns.clone());
        http::spawn_listener(ctx, https, Some(tls.acceptor), tracker.clone(), conns);
        tracing::info!(%http_addr, %https_addr, "tm-auth-sim listening");
        Ok(SimHandle {
            inner: Arc::new(Inner {
                state: shared,
                http_addr,
                https_addr,
                ca_pem: tls.ca_pem,
                ca_path: config.cert_out,
                cancel,
                tracker,
            }),
        })
    }
}

async fn bind(scheme: &'static str, addr: SocketAddr) -> Result<TcpListener, SimError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| SimError::Bind {
            scheme,
            addr,
            source,
        })
}

fn local_addr(
    scheme: &'static str,
    l: &TcpListener,
    addr: SocketAddr,
) -> Result<SocketAddr, SimError> {
    l.local_addr().map_err(|source| SimError::Bind {
        scheme,
        addr,
        source,
    })
}

/// Writes `bytes` to `path` through a temporary file and a rename, so readers never see a
/// half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SimError> {
    let err = |source| SimError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

struct Inner {
    state: Shared,
    http_addr: SocketAddr,
    https_addr: SocketAddr,
    ca_pem: String,
    ca_path: Option<PathBuf>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A running simulator. Cheap to clone; the methods that change state are synchronous (no
/// runtime needed) and take effect for the next request. Dropping the last clone stops it.
#[derive(Clone)]
pub struct SimHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("http", &self.inner.http_addr)
            .field("https", &self.inner.https_addr)
            .finish()
    }
}

impl SimHandle {
    pub fn http_addr(&self) -> SocketAddr {
        self.inner.http_addr
    }

    pub fn https_addr(&self) -> SocketAddr {
        self.inner.https_addr
    }

    /// `http://127.0.0.1:PORT` (no trailing slash). The auth base is `{url}/v1/auth`.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.inner.http_addr)
    }

    /// `https://127.0.0.1:PORT` (trust [`SimHandle::ca_cert_pem`]).
    pub fn https_url(&self) -> String {
        format!("https://{}", self.inner.https_addr)
    }

    /// The CA certificate (PEM) that signed the HTTPS server certificate.
    pub fn ca_cert_pem(&self) -> &str {
        &self.inner.ca_pem
    }

    /// Where the CA certificate was written (`SimConfig::cert_out`).
    pub fn ca_path(&self) -> Option<&Path> {
        self.inner.ca_path.as_deref()
    }

    /// What `--ready-file` holds.
    pub fn ready_info(&self) -> ReadyInfo {
        ReadyInfo {
            http: self.http_url(),
            https: self.https_url(),
            ca_file: self.inner.ca_path.clone(),
            pid: std::process::id(),
        }
    }

    /// Registers (or replaces) a key.
    pub fn register_key(&self, reg: KeyRegistration) -> Result<RegisteredKeyInfo, SimError> {
        lock(&self.inner.state).register(reg)
    }

    /// Registers a personal key from its public key.
    pub fn register_verifying_key(
        &self,
        key_id: &str,
        key: &VerifyingKey,
    ) -> Result<RegisteredKeyInfo, SimError> {
        self.register_key(KeyRegistration::new(key_id, *key))
    }

    /// Revokes a key: mints and refreshes for it answer 401 `key revoked`.
    pub fn revoke_key(&self, key_id: &str) -> Result<RegisteredKeyInfo, SimError> {
        lock(&self.inner.state).revoke_key(key_id)
    }

    pub fn keys(&self) -> Vec<RegisteredKeyInfo> {
        lock(&self.inner.state).keys()
    }

    /// Lifetime of access tokens issued from now on (>= 1 s).
    pub fn set_access_ttl(&self, ttl: Duration) -> Result<(), SimError> {
        lock(&self.inner.state).set_access_ttl(ttl)
    }

    /// Lifetime of refresh tokens issued from now on (>= 1 s).
    pub fn set_refresh_ttl(&self, ttl: Duration) -> Result<(), SimError> {
        lock(&self.inner.state).set_refresh_ttl(ttl)
    }

    /// Shifts the simulator's clock (seconds; negative = behind the wall clock).
    pub fn set_clock_offset(&self, secs: i64) -> Result<(), SimError> {
        lock(&self.inner.state).set_clock_offset(secs)
    }

    pub fn clock_offset(&self) -> i64 {
        lock(&self.inner.state).clock_offset()
    }

    /// The simulator's clock, Unix seconds.
    pub fn now(&self) -> i64 {
        lock(&self.inner.state).now_unix()
    }

    /// Adds a fault; returns its id.
    pub fn inject_fault(&self, spec: FaultSpec) -> Result<u64, SimError> {
        lock(&self.inner.state).faults.add(spec)
    }

    pub fn clear_faults(&self) {
        lock(&self.inner.state).faults.clear()
    }

    /// Makes a new JWKS signing key current; the old one stays published for `grace`
    /// (default: the configured grace).
    pub fn rotate_jwks(&self, grace: Option<Duration>) -> Result<RotateInfo, SimError> {
        lock(&self.inner.state).rotate_jwks(grace)
    }

    /// The `kid` of the key signing access tokens now.
    pub fn current_kid(&self) -> String {
        lock(&self.inner.state).current_kid()
    }

    /// The JWKS document as served.
    pub fn jwks(&self) -> serde_json::Value {
        lock(&self.inner.state).jwks()
    }

    /// Revokes every refresh-token family issued so far; returns how many.
    pub fn revoke_all_refresh_tokens(&self) -> usize {
        lock(&self.inner.state).revoke_all_refresh()
    }

    /// The next `count` access tokens are signed by a key not in the JWKS, with that key's
    /// own `kid` or (`same_kid`) the published current `kid`.
    pub fn sign_with_foreign_key(&self, count: u32, same_kid: bool) {
        lock(&self.inner.state).set_foreign(count, same_kid)
    }

    /// Refuse a second mint with an identical (key_id, timestamp, signature).
    pub fn set_reject_replay(&self, on: bool) {
        lock(&self.inner.state).set_reject_replay(on)
    }

    pub fn counters(&self) -> Counters {
        lock(&self.inner.state).counters.clone()
    }

    pub fn reset_counters(&self) {
        lock(&self.inner.state).counters = Counters::default();
    }

    /// The admin API's `GET /_sim/state` document.
    pub fn snapshot(&self) -> serde_json::Value {
        lock(&self.inner.state).snapshot()
    }

    /// Stops accepting, ends hanging requests, lets in-flight answers finish and waits for
    /// every connection task.
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
    }
}
