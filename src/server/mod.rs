//! The Unix-socket server: listener, connections, peer credentials, shutdown.
//!
//! Owns: [`serve`] (the accept loop), the shared [`State`] (profiles, access rules, counters),
//! the per-connection protocol engine (`conn`), the clean close of a connection (`linger`:
//! the client reads EOF after its answers, never a reset), and the listening socket's life
//! cycle ([`listener`]: safe creation, stale-socket replacement, socket activation).
//!
//! Threading: everything runs on the tokio runtime. One task per connection does the
//! reading, the inline answers (`ping`, `token` from memory, `public_key`, `status`, errors)
//! and all the writing; requests that wait (`sign_challenge`, `stamp`, a `token` that needs a
//! renewal, `watch`) run as their own tasks and hand their reply lines back to the
//! connection task over a bounded channel. All tasks are tracked by one `TaskTracker`, so
//! [`serve`] returns only after every connection has finished. The access rules sit in a
//! `tokio::sync::watch` channel: each connection caches what they grant its peer and
//! re-reads them only when they changed (never holding the channel's lock across
//! `.await`); each `watch` stream also wakes on a change and ends, with `forbidden`, when
//! its peer lost access.

mod conn;
mod linger;
pub mod listener;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::authz::Rules;
use crate::protocol::{self, ErrorCode, Op};
use crate::signer::Handle;
use crate::token::{AccessToken, Manager, TokenError, TokenStatus};

pub(crate) use conn::write_err;
pub use conn::{parse_request, Unparsed};
pub use listener::{Listener, ListenerError, SocketSettings};

/// A boxed, sendable future (what [`TokenSource::token`] returns).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the server needs from a profile's token machinery. Implemented by
/// [`token::Manager`](crate::token::Manager); tests may supply their own.
pub trait TokenSource: Send + Sync + 'static {
    /// The current token (`None` while there is no valid one), updated on each rotation.
    fn subscribe(&self) -> watch::Receiver<Option<Arc<AccessToken>>>;
    /// A token valid for at least `min_ttl`, waiting for one shared renewal if needed.
    fn token(
        &self,
        min_ttl: Option<Duration>,
    ) -> BoxFuture<'_, Result<Arc<AccessToken>, TokenError>>;
    /// A status snapshot.
    fn status(&self) -> TokenStatus;
    /// The Auth API's clock as the agent knows it.
    fn server_now(&self) -> SystemTime;
}

impl TokenSource for Manager {
    fn subscribe(&self) -> watch::Receiver<Option<Arc<AccessToken>>> {
        Manager::subscribe(self)
    }
    fn token(
        &self,
        min_ttl: Option<Duration>,
    ) -> BoxFuture<'_, Result<Arc<AccessToken>, TokenError>> {
        Box::pin(Manager::token(self, min_ttl))
    }
    fn status(&self) -> TokenStatus {
        Manager::status(self)
    }
    fn server_now(&self) -> SystemTime {
        Manager::server_now(self)
    }
}

/// One profile served by the agent: a key, its API key_id, and its tokens.
#[derive(Clone)]
pub struct Profile {
    pub name: String,
    /// The API key id the key is registered under; the only key_id `sign_challenge` signs.
    pub key_id: String,
    pub signer: Handle,
    pub tokens: Arc<dyn TokenSource>,
}

impl Profile {
    pub fn new(
        name: impl Into<String>,
        key_id: impl Into<String>,
        signer: Handle,
        tokens: impl TokenSource,
    ) -> Profile {
        Profile {
            name: name.into(),
            key_id: key_id.into(),
            signer,
            tokens: Arc::new(tokens),
        }
    }
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profile")
            .field("name", &self.name)
            .field("key_id", &self.key_id)
            .field("signer", &self.signer)
            .finish_non_exhaustive()
    }
}

/// Server tuning (the `[server]` table of the config). Defaults in [`Default`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Connections served at once; one more is answered `busy` and closed.
    pub max_connections: usize,
    /// Connections one uid may hold at once (default: three quarters of `max_connections`,
    /// rounded up), so that no single user, authorized or not, can take every slot from the
    /// others.
    pub max_connections_per_uid: Option<usize>,
    /// Requests waiting on a signer or a renewal, plus `watch` streams, per connection;
    /// one more is answered `busy`.
    pub max_in_flight: usize,
    /// A connection with nothing in flight and no bytes received for this long is closed.
    #[serde(rename = "idle_timeout_secs", with = "secs")]
    pub idle_timeout: Duration,
    /// A line must be complete this long after its first byte arrived, or the connection
    /// is closed (a client trickling bytes cannot hold resources).
    #[serde(rename = "line_timeout_secs", with = "secs")]
    pub line_timeout: Duration,
    /// A reply that cannot be written for this long (the client does not read) closes the
    /// connection.
    #[serde(rename = "write_timeout_secs", with = "secs")]
    pub write_timeout: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            max_connections: 1024,
            max_connections_per_uid: None,
            max_in_flight: 64,
            idle_timeout: Duration::from_secs(300),
            line_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
        }
    }
}

impl ServerSettings {
    /// The connections one uid may hold at once.
    pub fn per_uid_limit(&self) -> usize {
        self.max_connections_per_uid
            .unwrap_or(self.max_connections - self.max_connections / 4)
            .max(1)
    }
}

mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = u64::deserialize(d)?;
        if secs == 0 {
            return Err(serde::de::Error::custom("must be at least 1 second"));
        }
        Ok(Duration::from_secs(secs))
    }
}

/// Why a [`State`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("profile `{0}` is defined twice")]
    DuplicateProfile(String),
    #[error("settings: {0}")]
    Settings(String),
}

/// Agent-wide counters (atomics; relaxed ordering is enough for statistics).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    requests: [AtomicU64; Op::ALL.len()],
    errors: [AtomicU64; ErrorCode::ALL.len()],
    connections_total: AtomicU64,
    connections_open: AtomicU64,
    connections_rejected: AtomicU64,
}

impl Counters {
    fn request(&self, op: Op) {
        self.requests[op.index()].fetch_add(1, Ordering::Relaxed);
    }

    fn error(&self, code: ErrorCode) {
        self.errors[code.index()].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> protocol::Counters {
        protocol::Counters {
            connections: protocol::ConnectionCounters {
                open: self.connections_open.load(Ordering::Relaxed),
                total: self.connections_total.load(Ordering::Relaxed),
                rejected: self.connections_rejected.load(Ordering::Relaxed),
            },
            requests: Op::ALL
                .iter()
                .map(|op| {
                    (
                        op.as_str().to_owned(),
                        self.requests[op.index()].load(Ordering::Relaxed),
                    )
                })
                .collect::<BTreeMap<_, _>>(),
            errors: ErrorCode::ALL
                .iter()
                .map(|c| {
                    (
                        c.as_str().to_owned(),
                        self.errors[c.index()].load(Ordering::Relaxed),
                    )
                })
                .collect::<BTreeMap<_, _>>(),
        }
    }
}

/// One connection counted against its peer's uid (see [`State::admit_uid`]).
struct UidSlot {
    state: Arc<State>,
    uid: u32,
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut by_uid = self.state.by_uid.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = by_uid.get_mut(&self.uid) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                by_uid.remove(&self.uid);
            }
        }
    }
}

/// The agent-wide budget for audit records of refused and failed requests: a token bucket of
/// [`RefusalAudit::BURST`] records refilled at [`RefusalAudit::PER_SEC`] a second. It is
/// global, so a client cannot earn a fresh allowance by reconnecting. Refusals over the
/// budget are counted, and the count is logged with the next record that is written.
#[derive(Debug)]
pub(crate) struct RefusalAudit {
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
    suppressed: u64,
}

impl RefusalAudit {
    pub(crate) const BURST: u32 = 100;
    pub(crate) const PER_SEC: u32 = 10;

    fn new(now: Instant) -> Self {
        RefusalAudit {
            bucket: Mutex::new(Bucket {
                tokens: f64::from(Self::BURST),
                refilled: now,
                suppressed: 0,
            }),
        }
    }

    /// May a refusal be audited at `now`? `Some(n)`: yes, and `n` refusals were left out
    /// since the last record written; `None`: no (it is counted).
    pub(crate) fn admit(&self, now: Instant) -> Option<u64> {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let earned =
            now.saturating_duration_since(b.refilled).as_secs_f64() * f64::from(Self::PER_SEC);
        b.tokens = (b.tokens + earned).min(f64::from(Self::BURST));
        b.refilled = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Some(std::mem::take(&mut b.suppressed))
        } else {
            b.suppressed += 1;
            None
        }
    }
}

struct ProfileEntry {
    profile: Profile,
    /// The `public_key` result, rendered once.
    public_key_json: Box<[u8]>,
}

/// Everything the connections share: profiles, access rules, settings, counters.
pub struct State {
    profiles: Vec<ProfileEntry>,
    /// The access rules in force; a reload sends new ones.
    rules: watch::Sender<Arc<Rules>>,
    settings: ServerSettings,
    counters: Counters,
    refusal_audit: RefusalAudit,
    /// Open connections by peer uid (entries removed at zero).
    by_uid: Mutex<HashMap<u32, usize>>,
    started_at: SystemTime,
    started: Instant,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field(
                "profiles",
                &self
                    .profiles
                    .iter()
                    .map(|p| &p.profile.name)
                    .collect::<Vec<_>>(),
            )
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl State {
    /// Builds the shared state. Profiles are few; they are looked up by a linear scan.
    pub fn new(
        profiles: Vec<Profile>,
        rules: Rules,
        settings: ServerSettings,
    ) -> Result<Arc<State>, StateError> {
        if settings.max_connections == 0 || settings.max_in_flight == 0 {
            return Err(StateError::Settings(
                "max_connections and max_in_flight must be at least 1".into(),
            ));
        }
        if settings
            .max_connections_per_uid
            .is_some_and(|n| n == 0 || n > settings.max_connections)
        {
            return Err(StateError::Settings(
                "max_connections_per_uid must be between 1 and max_connections".into(),
            ));
        }
        let mut entries: Vec<ProfileEntry> = Vec::with_capacity(profiles.len());
        for profile in profiles {
            if entries.iter().any(|e| e.profile.name == profile.name) {
                return Err(StateError::DuplicateProfile(profile.name));
            }
            let public_key_json = conn::render_public_key(&profile).into_boxed_slice();
            entries.push(ProfileEntry {
                profile,
                public_key_json,
            });
        }
        Ok(Arc::new(State {
            profiles: entries,
            rules: watch::Sender::new(Arc::new(rules)),
            settings,
            counters: Counters::default(),
            refusal_audit: RefusalAudit::new(Instant::now()),
            by_uid: Mutex::new(HashMap::new()),
            started_at: SystemTime::now(),
            started: Instant::now(),
        }))
    }

    /// Counts a connection of `uid` while the guard lives, or None when that uid already
    /// holds [`ServerSettings::per_uid_limit`] connections.
    fn admit_uid(self: &Arc<Self>, uid: u32) -> Option<UidSlot> {
        let mut by_uid = self.by_uid.lock().unwrap_or_else(|p| p.into_inner());
        let count = by_uid.entry(uid).or_insert(0);
        if *count >= self.settings.per_uid_limit() {
            return None;
        }
        *count += 1;
        Some(UidSlot {
            state: Arc::clone(self),
            uid,
        })
    }

    /// Writes an audit record of a refused or failed request (`record`) if the agent-wide
    /// budget for them allows (`RefusalAudit`), so that no client can flood the log; the
    /// first record written after some were left out says how many.
    fn audit_within_budget(&self, record: impl FnOnce()) {
        let Some(suppressed) = self.refusal_audit.admit(Instant::now()) else {
            return;
        };
        if suppressed > 0 {
            tracing::warn!(
                target: "audit",
                suppressed,
                "refused or failed requests left out of the audit log (over its budget of {} a \
                 second)",
                RefusalAudit::PER_SEC
            );
        }
        record();
    }

    /// Replaces the access rules (SIGHUP). Connections pick them up at their next request;
    /// running `watch` streams re-check at once and end with `forbidden` if their peer may
    /// no longer watch that profile.
    pub fn reload_rules(&self, rules: Rules) {
        self.rules.send_replace(Arc::new(rules));
    }

    /// The rules, with notice of every reload.
    fn subscribe_rules(&self) -> watch::Receiver<Arc<Rules>> {
        self.rules.subscribe()
    }

    /// The profiles, in configuration order.
    pub fn profiles(&self) -> impl Iterator<Item = &Profile> {
        self.profiles.iter().map(|e| &e.profile)
    }

    fn profile_index(&self, name: &str) -> Option<usize> {
        self.profiles.iter().position(|e| e.profile.name == name)
    }

    /// The settings in force.
    pub fn settings(&self) -> &ServerSettings {
        &self.settings
    }

    /// Agent-wide counters, as `status` reports them.
    pub fn counters(&self) -> protocol::Counters {
        self.counters.snapshot()
    }
}

/// Serves connections from `listener` until `shutdown` is cancelled, then stops accepting,
/// lets in-flight requests finish, ends `watch` streams (each gets an `end` event), waits
/// for every connection to close (each lingers at most 250 ms for its client to close its
/// end, so that the client reads EOF after its answers) and returns. The socket file, if
/// this process created it, is removed as soon as accepting stops.
///
/// Errors: only a failure of the listening socket itself; connection errors are logged.
pub async fn serve(
    listener: Listener,
    state: Arc<State>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(state.settings.max_connections));
    let rejected_lingering = Arc::new(Semaphore::new(linger::REJECTED_LINGERING));
    tracing::info!(
        socket = %listener.describe(),
        profiles = state.profiles.len(),
        max_connections = state.settings.max_connections,
        "listening"
    );
    // Transient accept failures in a row (out of file descriptors, say).
    let mut failed_accepts: u32 = 0;
    let result = loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(err) if is_transient_accept_error(&err) => {
                // A warning at 1, 2, 4, 8, … failures in a row, the others at debug level:
                // at the fd limit this retries 10 times a second for as long as it lasts.
                failed_accepts = failed_accepts.saturating_add(1);
                if failed_accepts.is_power_of_two() {
                    tracing::warn!(error = %err, failed_accepts, "accept failed; pausing briefly");
                } else {
                    tracing::debug!(error = %err, failed_accepts, "accept failed; pausing briefly");
                }
                // Out of file descriptors: give connections a moment to close.
                tokio::select! {
                    _ = shutdown.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionAborted => continue,
            Err(err) => break Err(err),
        };
        if failed_accepts > 0 {
            tracing::info!(failed_accepts, "accepting connections again");
            failed_accepts = 0;
        }
        state
            .counters
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        match Arc::clone(&slots).try_acquire_owned() {
            Ok(permit) => {
                tracker.spawn(conn::run(
                    stream,
                    Arc::clone(&state),
                    shutdown.child_token(),
                    shutdown.clone(),
                    tracker.clone(),
                    permit,
                ));
            }
            Err(_) => {
                state
                    .counters
                    .connections_rejected
                    .fetch_add(1, Ordering::Relaxed);
                state.counters.error(ErrorCode::Busy);
                conn::reject(
                    stream,
                    state.settings.max_connections,
                    &rejected_lingering,
                    &tracker,
                );
            }
        }
    };
    // No new client waits on a server that is going: closing the listener removes the socket
    // file (if this process created it), so a client started now fails at once with
    // "cannot connect" instead of hanging in the backlog until the drain ends. A
    // socket-activated listener stays open in systemd, which queues connections for the
    // next start.
    drop(listener);
    tracker.close();
    if let Err(err) = &result {
        tracing::error!(error = %err, "listener failed; closing connections");
        shutdown.cancel();
    }
    tracker.wait().await;
    tracing::info!("server stopped");
    result
}

fn is_transient_accept_error(err: &std::io::Error) -> bool {
    // EMFILE (24), ENFILE (23), ENOBUFS (105), ENOMEM (12)
    matches!(err.raw_os_error(), Some(24 | 23 | 105 | 12))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quarter_of_the_connections_stays_for_other_users_by_default() {
        let limit = |max, per_uid| {
            ServerSettings {
                max_connections: max,
                max_connections_per_uid: per_uid,
                ..ServerSettings::default()
            }
            .per_uid_limit()
        };
        assert_eq!(
            [1, 2, 4, 1024, 4096].map(|max| limit(max, None)),
            [1, 2, 3, 768, 3072]
        );
        assert_eq!(limit(1024, Some(5)), 5);
    }

    #[test]
    fn refusal_audit_is_a_token_bucket_that_reports_what_it_left_out() {
        let t0 = Instant::now();
        let budget = RefusalAudit::new(t0);
        for _ in 0..RefusalAudit::BURST {
            assert_eq!(budget.admit(t0), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(budget.admit(t0), None);
        }
        // One record's worth of time later: one more, with the count of those left out.
        let later = t0 + Duration::from_secs(1) / RefusalAudit::PER_SEC;
        assert_eq!(budget.admit(later), Some(5));
        assert_eq!(budget.admit(later), None);
        // A long quiet spell refills up to the burst, no further.
        let much_later = later + Duration::from_secs(3600);
        for _ in 0..RefusalAudit::BURST {
            assert_eq!(budget.admit(much_later).map(|_| ()), Some(()));
        }
        assert_eq!(budget.admit(much_later), None);
    }
}
