//! Agent fixture: a server on a temporary socket, in-process, on its own runtime thread,
//! with soft-signer profiles, a scriptable token source, given access rules and settings,
//! and its own log buffer (every runtime thread logs into it).

#![allow(dead_code)]

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use p256::ecdsa::SigningKey;
use tm_agent::authz::{AccessRule, Rules};
use tm_agent::server::{
    self, BoxFuture, Listener, Profile, ServerSettings, SocketSettings, State, TokenSource,
};
use tm_agent::signer::{self, soft, ActorOptions, Handle};
use tm_agent::token::{AccessToken, TokenError, TokenStatus};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A token source the test drives: `rotate()` publishes a new token; `token()` renews
/// (mints a new one) when the current one is not fresh enough, unless `fail` is set.
#[derive(Clone)]
pub struct FakeTokens {
    inner: Arc<FakeInner>,
}

struct FakeInner {
    name: String,
    tx: watch::Sender<Option<Arc<AccessToken>>>,
    serial: Mutex<u64>,
    fail: Mutex<bool>,
    lifetime: Duration,
}

impl FakeTokens {
    pub fn new(name: &str, lifetime: Duration) -> FakeTokens {
        let (tx, _) = watch::channel(None);
        let fake = FakeTokens {
            inner: Arc::new(FakeInner {
                name: name.to_owned(),
                tx,
                serial: Mutex::new(0),
                fail: Mutex::new(false),
                lifetime,
            }),
        };
        fake.rotate();
        fake
    }

    /// Publishes a new token and returns it. Tokens look like JWTs and are unique.
    pub fn rotate(&self) -> String {
        let mut serial = self.inner.serial.lock().unwrap();
        *serial += 1;
        let token = format!(
            "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ0ZXN0In0.SECRET-{}-{}",
            self.inner.name, *serial
        );
        let now = SystemTime::now();
        self.inner.tx.send_replace(Some(Arc::new(AccessToken {
            token: token.clone().into(),
            expires_at: now + self.inner.lifetime,
            received_at: now,
        })));
        token
    }

    /// Withdraws the token (as when it expired and could not be renewed).
    pub fn clear(&self) {
        self.inner.tx.send_replace(None);
    }

    /// Makes renewals fail.
    pub fn set_failing(&self, fail: bool) {
        *self.inner.fail.lock().unwrap() = fail;
    }

    pub fn current(&self) -> Option<String> {
        self.inner.tx.borrow().as_ref().map(|t| t.token.to_string())
    }
}

impl TokenSource for FakeTokens {
    fn subscribe(&self) -> watch::Receiver<Option<Arc<AccessToken>>> {
        self.inner.tx.subscribe()
    }

    fn token(
        &self,
        min_ttl: Option<Duration>,
    ) -> BoxFuture<'_, Result<Arc<AccessToken>, TokenError>> {
        Box::pin(async move {
            let now = SystemTime::now();
            let current = self.inner.tx.borrow().clone();
            if let Some(t) = current {
                let left = t.expires_at.duration_since(now).unwrap_or_default();
                if left > Duration::ZERO && min_ttl.is_none_or(|m| left >= m) {
                    return Ok(t);
                }
            }
            if *self.inner.fail.lock().unwrap() {
                return Err(TokenError::Unavailable(
                    "simulated API outage (HTTP 503)".into(),
                ));
            }
            if min_ttl.is_some_and(|m| m > self.inner.lifetime) {
                return Err(TokenError::Unavailable(
                    "min_ttl beyond token lifetime".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.rotate();
            Ok(self.inner.tx.borrow().clone().expect("just rotated"))
        })
    }

    fn status(&self) -> TokenStatus {
        TokenStatus {
            expires_at: self.inner.tx.borrow().as_ref().map(|t| t.expires_at),
            next_refresh: Some(SystemTime::now() + Duration::from_secs(60)),
            ..TokenStatus::default()
        }
    }

    fn server_now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A shared in-memory log sink.
#[derive(Clone, Default)]
pub struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl LogBuffer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = LogBuffer;
    fn make_writer(&'a self) -> LogBuffer {
        self.clone()
    }
}

pub const KEY_ID_PREFIX: &str = "0b6d2f8e-7c1a-4e3b-9a5d-00000000000";

/// The soft key of test profile number `n`.
pub fn test_key(n: u8) -> SigningKey {
    SigningKey::from_slice(&[n + 1; 32]).unwrap()
}

/// How to build a test agent.
pub struct AgentBuilder {
    pub profiles: Vec<String>,
    pub rules: Vec<AccessRule>,
    pub settings: ServerSettings,
    pub socket_mode: u32,
    pub dir_mode: u32,
    pub token_lifetime: Duration,
    /// Every signature takes at least this long (simulates an HSM).
    pub sign_delay: Duration,
    /// Profiles with a token source of their own (e.g. a real `token::Manager`), built on
    /// the agent's runtime from the profile's signer.
    pub custom: Vec<CustomProfile>,
}

/// Makes a profile's token source from its signer, on the agent's runtime.
pub type TokenFactory = Box<dyn FnOnce(Handle) -> Arc<dyn TokenSource> + Send>;

/// A profile with its own key, key_id and token source.
pub struct CustomProfile {
    pub name: String,
    pub key: SigningKey,
    pub key_id: String,
    pub tokens: TokenFactory,
}

/// A soft signer that takes its time, like an HSM.
struct SlowSigner {
    inner: Box<dyn signer::Signer>,
    delay: Duration,
}

impl signer::Signer for SlowSigner {
    fn sign_digest(
        &mut self,
        digest: &[u8; 32],
    ) -> Result<p256::ecdsa::Signature, signer::SignerError> {
        std::thread::sleep(self.delay);
        self.inner.sign_digest(digest)
    }
}

impl Default for AgentBuilder {
    fn default() -> Self {
        AgentBuilder {
            profiles: vec!["prod".into()],
            rules: vec![root_rule("*", "*"), root_signing_rule()],
            settings: ServerSettings::default(),
            socket_mode: 0o660,
            dir_mode: 0o700,
            token_lifetime: Duration::from_secs(900),
            sign_delay: Duration::ZERO,
            custom: Vec::new(),
        }
    }
}

/// A rule for uid 0 (tests run as root).
pub fn root_rule(ops: &str, profiles: &str) -> AccessRule {
    let text = format!(
        "uid = 0\nops = {}\nprofiles = {}",
        selector(ops),
        selector(profiles)
    );
    toml::from_str(&text).unwrap()
}

/// `"*"` grants neither `sign_challenge` nor `stamp`: they must be named.
fn root_signing_rule() -> AccessRule {
    root_rule("sign_challenge,stamp", "*")
}

fn selector(s: &str) -> String {
    if s == "*" {
        "\"*\"".into()
    } else {
        format!(
            "[{}]",
            s.split(',')
                .map(|x| format!("\"{x}\""))
                .collect::<Vec<_>>()
                .join(",")
        )
    }
}

/// A running test agent.
pub struct TestAgent {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state: Arc<State>,
    pub tokens: Vec<(String, FakeTokens)>,
    pub logs: LogBuffer,
    shutdown: CancellationToken,
    done: Mutex<std::sync::mpsc::Receiver<io::Result<()>>>,
}

impl AgentBuilder {
    pub fn profiles(mut self, names: &[&str]) -> Self {
        self.profiles = names.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn rules(mut self, rules: Vec<AccessRule>) -> Self {
        self.rules = rules;
        self
    }

    pub fn settings(mut self, settings: ServerSettings) -> Self {
        self.settings = settings;
        self
    }

    pub fn start(self) -> TestAgent {
        use std::os::unix::fs::PermissionsExt as _;
        let logs = LogBuffer::default();
        let dispatch = tracing::Dispatch::new(
            tracing_subscriber::fmt()
                .with_writer(logs.clone())
                .with_ansi(false)
                .with_max_level(tracing::Level::DEBUG)
                .finish(),
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(self.dir_mode))
            .unwrap();
        let socket = dir.path().join("agent.sock");

        let mut profiles = Vec::new();
        let mut tokens = Vec::new();
        for (n, name) in self.profiles.iter().enumerate() {
            let (info, workers) = tracing::dispatcher::with_default(&dispatch, || {
                soft::open(test_key(n as u8), format!("test key {n}"), 2)
            });
            let delay = self.sign_delay;
            let workers = workers
                .into_iter()
                .map(|inner| Box::new(SlowSigner { inner, delay }) as Box<dyn signer::Signer>)
                .collect();
            let handle: Handle = Handle::spawn(
                info,
                workers,
                ActorOptions {
                    name: format!("signer-{name}"),
                    ..ActorOptions::default()
                },
            )
            .unwrap();
            let fake = FakeTokens::new(name, self.token_lifetime);
            tokens.push((name.clone(), fake.clone()));
            profiles.push(Profile::new(
                name.clone(),
                format!("{KEY_ID_PREFIX}{n}"),
                handle,
                fake,
            ));
        }
        let rules = Rules::compile(&self.rules).unwrap();
        let settings = self.settings;
        let custom = self.custom;
        let shutdown = CancellationToken::new();

        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (done_tx, done) = std::sync::mpsc::channel();
        {
            let shutdown = shutdown.clone();
            let socket = socket.clone();
            let mode = self.socket_mode;
            let dispatch = dispatch.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .on_thread_start(move || {
                        // Keep this runtime's threads logging into the agent's buffer.
                        std::mem::forget(tracing::dispatcher::set_default(&dispatch));
                    })
                    .build()
                    .unwrap();
                let result = runtime.block_on(async move {
                    for c in custom {
                        let (info, workers) = soft::open(c.key, format!("key of {}", c.name), 1);
                        let handle = Handle::spawn(info, workers, ActorOptions::default()).unwrap();
                        profiles.push(Profile {
                            name: c.name,
                            key_id: c.key_id,
                            signer: handle.clone(),
                            tokens: (c.tokens)(handle),
                        });
                    }
                    let state = State::new(profiles, rules, settings).unwrap();
                    let listener = Listener::bind(&SocketSettings {
                        path: socket,
                        mode,
                        group: None,
                    });
                    let listener = match listener {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return Ok(());
                        }
                    };
                    let _ = ready_tx.send(Ok(Arc::clone(&state)));
                    server::serve(listener, state, shutdown).await
                });
                let _ = done_tx.send(result);
            });
        }
        let state = ready_rx.recv().unwrap().expect("listener");
        TestAgent {
            dir,
            socket,
            state,
            tokens,
            logs,
            shutdown,
            done: Mutex::new(done),
        }
    }
}

impl TestAgent {
    pub fn builder() -> AgentBuilder {
        AgentBuilder::default()
    }

    pub fn start_default() -> TestAgent {
        AgentBuilder::default().start()
    }

    pub fn tokens(&self, profile: &str) -> &FakeTokens {
        &self.tokens.iter().find(|(n, _)| n == profile).unwrap().1
    }

    pub fn client(&self) -> tm_agent::client::Client {
        tm_agent::client::Client::connect(&self.socket).unwrap()
    }

    /// Starts the shutdown (as SIGTERM does) without waiting for it.
    pub fn begin_stop(&self) {
        self.shutdown.cancel();
    }

    /// Cancels the server and waits (bounded) for `serve` to return.
    pub fn stop(&self) -> io::Result<()> {
        self.shutdown.cancel();
        self.done
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(10))
            .expect("serve did not return within 10 s of shutdown")
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Ok(done) = self.done.lock() {
            let _ = done.recv_timeout(Duration::from_secs(10));
        }
    }
}

/// Keeps `signer` imported for tests that need its types.
pub type SignerError = signer::SignerError;
