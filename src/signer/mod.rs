//! Signers: the private-key math, behind an async [`Handle`].
//!
//! Owns the [`Signer`] trait that each backend ([`pkcs11`], [`piv`], [`soft`]) implements, and
//! the actor that runs them: one or more named OS threads, each owning one backend worker
//! (e.g. a PKCS#11 session), fed by one bounded queue that every worker receives from
//! (crossbeam's MPMC channel: a job wakes one idle worker and only that one, where a shared
//! `Mutex<Receiver>` also woke the next worker in line on every job). The async side
//! ([`Handle`]) hashes the message on the host, enqueues the digest with a oneshot reply,
//! answers `Busy` when the queue is full and `Timeout` when the reply is late. Workers skip
//! requests whose caller has gone or whose deadline has passed. Blocking hardware calls never
//! run on the tokio runtime. Under load, with a key that signs in under a millisecond, a
//! worker holds a few finished replies back and sends them together (fewer wake-ups of tokio
//! workers; see [`run_worker`]); it never waits for work, or stops, with a reply held.
//!
//! The agent's own challenges (a token manager's mint, [`Handle::sign_challenge_for_token`])
//! have a small queue of their own that workers empty first: a burst of client signatures
//! that fills the clients' queue must not keep the agent from minting the token that every
//! client of the profile waits for.
//!
//! Health is published on a `watch` channel (state changes only); counters are atomics.
//! This module never imports `server` or `token`.
//!
//! Exit: a worker thread ends, closing its session, once every `Handle` is dropped. A
//! process must not exit while one is still inside the hardware library: SoftHSM's static
//! destructors then free what the thread is using (a segfault at exit was seen). So every
//! command that opened keys calls [`wait_for_workers`] after dropping its handles.

pub mod pin;
pub mod piv;
pub mod pkcs11;
pub mod soft;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use tokio::sync::{oneshot, watch};

use crate::jose;

/// The message signed by the start-up self-test.
const PROBE_MESSAGE: &[u8] = b"tm-agent signer self-test";

/// One backend worker: owns its hardware session and signs SHA-256 digests.
///
/// Called only on its own actor thread, so it may block and hold `!Sync` state.
pub trait Signer: Send + 'static {
    /// Signs `digest` (the SHA-256 of the message) with the private key. The signature may be
    /// high-S; the [`Handle`] normalizes it. Backends recover from lost sessions themselves
    /// (reopen, log in again, retry once) before returning an error.
    fn sign_digest(&mut self, digest: &[u8; 32]) -> Result<Signature, SignerError>;
}

/// What a key is and where it lives: reported by `status` and `public_key`.
#[derive(Debug, Clone)]
pub struct KeyInfo {
    /// `pkcs11`, `piv` or `soft`.
    pub backend: &'static str,
    /// Human-readable location, e.g. `token "prod-hsm" key "tm-prod"`. No secrets.
    pub location: String,
    /// False for the `soft` backend.
    pub hardware_backed: bool,
    pub public_key: VerifyingKey,
}

/// Errors of signing, carrying hardware facts as data. Messages say what to do next and
/// never contain PINs, keys or signatures.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error(
        "signer queue is full ({depth} waiting): retry shortly or raise `agent.sign_queue_depth`"
    )]
    Busy { depth: usize },
    #[error("signer did not answer within {0:?}: the HSM or card may be wedged")]
    Timeout(Duration),
    #[error("signer unavailable: {0}")]
    Unavailable(String),
    #[error("signer has shut down")]
    Closed,
    #[error("wrong PIN{}: check the PIN source; tm-agent will not retry it", tries_hint(*.tries_left))]
    WrongPin { tries_left: Option<u32> },
    #[error("PIN is locked: unblock it with the PUK or SO PIN, then restart tm-agent")]
    PinLocked,
    /// The token takes no login until a person acts (one PIN try left, PIN expired, user
    /// PIN not initialized): tm-agent does not try.
    #[error("PIN not usable: {0}")]
    PinUnusable(String),
    #[error(transparent)]
    Pin(#[from] pin::PinError),
    #[error("PKCS#11 {func} failed: {rv}{}", hint_suffix(hint))]
    Pkcs11 {
        func: &'static str,
        rv: String,
        hint: &'static str,
    },
    /// A YubiKey PIV operation failed (not a transport problem: those are `Unavailable`).
    #[error("YubiKey {op} failed: {error}{}", hint_suffix(hint))]
    Piv {
        op: &'static str,
        error: String,
        hint: &'static str,
    },
    #[error("key not found: {0}")]
    KeyNotFound(String),
    /// Key management refused to overwrite: the label or id is taken.
    #[error("key already exists: {0}")]
    KeyExists(String),
    #[error("key is not ECDSA P-256: {0}")]
    NotP256(String),
    #[error("signer self-test failed: {0}")]
    SelfTest(String),
    #[error("cannot open key: {0}")]
    Open(String),
}

fn tries_hint(tries: Option<u32>) -> String {
    match tries {
        Some(1) => " (1 try left before the PIN locks)".into(),
        Some(n) => format!(" ({n} tries left)"),
        None => String::new(),
    }
}

fn hint_suffix(hint: &str) -> String {
    if hint.is_empty() {
        String::new()
    } else {
        format!(": {hint}")
    }
}

impl SignerError {
    /// The stable wire error code (see `proto/PROTOCOL.md`).
    pub fn wire_code(&self) -> crate::protocol::ErrorCode {
        use crate::protocol::ErrorCode;
        match self {
            SignerError::Busy { .. } => ErrorCode::Busy,
            SignerError::Timeout(_) => ErrorCode::Timeout,
            SignerError::Unavailable(_) | SignerError::Closed => ErrorCode::Unavailable,
            _ => ErrorCode::SignerError,
        }
    }
}

/// Tuning of the actor.
#[derive(Debug, Clone)]
pub struct ActorOptions {
    /// Requests that may wait in the queue before callers get `Busy`.
    pub queue_depth: usize,
    /// How long a caller waits for its signature.
    pub timeout: Duration,
    /// Thread name prefix, e.g. `signer-prod`.
    pub name: String,
}

impl Default for ActorOptions {
    fn default() -> Self {
        ActorOptions {
            queue_depth: 256,
            timeout: Duration::from_secs(5),
            name: "signer".into(),
        }
    }
}

/// Health of a signer, published on a `watch` channel when it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthState {
    Healthy,
    /// The last request failed; the reason is safe to show.
    Failing(String),
}

/// A snapshot of a signer's health and counters.
#[derive(Debug, Clone)]
pub struct Health {
    pub state: HealthState,
    pub last_ok: Option<SystemTime>,
    pub signatures: u64,
    pub errors: u64,
}

/// Where a job's result goes.
type Reply = oneshot::Sender<Result<Signature, SignerError>>;

struct Job {
    digest: [u8; 32],
    deadline: Instant,
    reply: Reply,
}

struct Shared {
    info: KeyInfo,
    health: watch::Sender<HealthState>,
    last_ok: Mutex<Option<SystemTime>>,
    signatures: AtomicU64,
    errors: AtomicU64,
    /// Jobs the workers have finished (signed, failed or skipped): their progress. A job a
    /// worker is stuck in never counts.
    finished: AtomicU64,
    /// `finished` as [`Handle::watchdog_check`] last saw it.
    watchdog_seen: AtomicU64,
    options: ActorOptions,
}

impl Shared {
    /// Publishes `next` to health subscribers if it differs from the current state.
    fn set_health(&self, next: HealthState) {
        self.health.send_if_modified(|state| {
            let changed = *state != next;
            *state = next;
            changed
        });
    }
}

/// The async front of a signer actor. Cheap to clone; the threads stop when the last
/// `Handle` is dropped (the queue closes) after finishing the job at hand.
#[derive(Clone)]
pub struct Handle {
    queue: Sender<Job>,
    /// The agent's own challenges: served before `queue`.
    ahead: Sender<Job>,
    shared: Arc<Shared>,
}

/// Room in the queue of the agent's own challenges: each token manager has at most one
/// signature in flight, and a few profiles may share a key.
const AHEAD_DEPTH: usize = 16;

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("backend", &self.shared.info.backend)
            .field("location", &self.shared.info.location)
            .finish()
    }
}

impl Handle {
    /// Starts one named thread per worker, then runs the self-test: signs a probe through
    /// every worker and verifies it with `info.public_key`. Blocking; call before serving.
    pub fn spawn(
        info: KeyInfo,
        workers: Vec<Box<dyn Signer>>,
        options: ActorOptions,
    ) -> Result<Handle, SignerError> {
        if workers.is_empty() {
            return Err(SignerError::Open("no signer workers".into()));
        }
        let (health, _) = watch::channel(HealthState::Healthy);
        let shared = Arc::new(Shared {
            info,
            health,
            last_ok: Mutex::new(None),
            signatures: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            watchdog_seen: AtomicU64::new(0),
            options,
        });
        let digest = jose::sha256(PROBE_MESSAGE);
        let (queue, rx) = crossbeam_channel::bounded::<Job>(shared.options.queue_depth);
        let (ahead, ahead_rx) = crossbeam_channel::bounded::<Job>(AHEAD_DEPTH);
        for (index, mut worker) in workers.into_iter().enumerate() {
            // Self-test each worker before it joins the pool, so a bad session is found now.
            let sig = worker.sign_digest(&digest)?;
            if shared.info.public_key.verify(PROBE_MESSAGE, &sig).is_err() {
                return Err(SignerError::SelfTest(format!(
                    "worker {index}: the probe signature does not verify with the key's public key \
                     (is the public key object paired with this private key?)"
                )));
            }
            let jobs = Jobs {
                ahead: ahead_rx.clone(),
                queue: rx.clone(),
            };
            let shared = Arc::clone(&shared);
            let live = LiveWorker::start();
            std::thread::Builder::new()
                .name(format!("{}-{index}", shared.options.name))
                .spawn(move || {
                    run_worker(worker, jobs, shared); // drops the worker: its session closes
                    drop(live);
                })
                .map_err(|e| SignerError::Open(format!("cannot start signer thread: {e}")))?;
        }
        *lock(&shared.last_ok) = Some(SystemTime::now());
        Ok(Handle {
            queue,
            ahead,
            shared,
        })
    }

    /// Signs `message` (hashed here with SHA-256). Returns a low-S signature.
    pub async fn sign(&self, message: &[u8]) -> Result<Signature, SignerError> {
        self.sign_digest(jose::sha256(message)).await
    }

    /// Signs a precomputed SHA-256 digest. Returns a low-S signature.
    pub async fn sign_digest(&self, digest: [u8; 32]) -> Result<Signature, SignerError> {
        let depth = self.shared.options.queue_depth;
        self.sign_on(&self.queue, digest, || SignerError::Busy { depth })
            .await
    }

    /// Enqueues `digest` on `lane` (`full` is the answer when it is full) and waits for the
    /// signature.
    async fn sign_on(
        &self,
        lane: &Sender<Job>,
        digest: [u8; 32],
        full: impl FnOnce() -> SignerError,
    ) -> Result<Signature, SignerError> {
        let timeout = self.shared.options.timeout;
        let (reply, rx) = oneshot::channel();
        let job = Job {
            digest,
            deadline: Instant::now() + timeout,
            reply,
        };
        match lane.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(full()),
            Err(TrySendError::Disconnected(_)) => return Err(SignerError::Closed),
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result.map(jose::normalize_low_s),
            Ok(Err(_)) => Err(SignerError::Closed),
            Err(_) => {
                let err = SignerError::Timeout(timeout);
                // Shown by `status` until a signature succeeds again.
                self.shared
                    .set_health(HealthState::Failing(err.to_string()));
                Err(err)
            }
        }
    }

    /// For a watchdog that calls this at intervals (one caller per handle): true while the
    /// workers make progress, i.e. finished a job since the previous call, or, with no job
    /// waiting, sign a probe in time. False when jobs wait and none was finished since the
    /// previous call, or the probe goes unanswered: the workers are wedged (inside the HSM,
    /// say). A full queue is no answer: a signer that only says `busy` is as wedged as one
    /// that says nothing.
    pub async fn watchdog_check(&self) -> bool {
        let finished = self.shared.finished.load(Ordering::Acquire);
        let seen = self.shared.watchdog_seen.swap(finished, Ordering::AcqRel);
        if finished != seen {
            return true;
        }
        if !self.queue.is_empty() || !self.ahead.is_empty() {
            return false;
        }
        // Any other answer, even an error from a missing token, came from a worker; `busy`
        // means the queue filled up since the look above, and the next call judges by
        // progress.
        let alive = !matches!(
            self.sign(b"tm-agent watchdog probe").await,
            Err(SignerError::Timeout(_) | SignerError::Closed)
        );
        if alive {
            // The probe's own job is no progress for the next call to see.
            let finished = self.shared.finished.load(Ordering::Acquire);
            self.shared.watchdog_seen.store(finished, Ordering::Release);
        }
        alive
    }

    /// Signs the Auth API challenge `{key_id}.{timestamp}` and returns the request body.
    pub async fn sign_challenge(
        &self,
        key_id: &str,
        timestamp: i64,
    ) -> Result<jose::ChallengeBody, SignerError> {
        let depth = self.shared.options.queue_depth;
        self.challenge_on(&self.queue, key_id, timestamp, || SignerError::Busy {
            depth,
        })
        .await
    }

    /// [`Handle::sign_challenge`] for the agent's own token manager: the job goes to the
    /// queue that workers empty first, so clients' requests (however many wait) neither
    /// delay it nor leave it `busy`.
    pub async fn sign_challenge_for_token(
        &self,
        key_id: &str,
        timestamp: i64,
    ) -> Result<jose::ChallengeBody, SignerError> {
        // Each token manager has one job in flight: a full queue means the workers have not
        // taken the last ones (they stay queued after their callers time out).
        let wedged = || {
            SignerError::Unavailable(format!(
                "the key has not taken the agent's last {AHEAD_DEPTH} signing jobs: the HSM or \
                 card may be wedged (see `tm-agent status`)"
            ))
        };
        self.challenge_on(&self.ahead, key_id, timestamp, wedged)
            .await
    }

    /// Signs the challenge `{key_id}.{timestamp}` through `lane` and returns the request body.
    async fn challenge_on(
        &self,
        lane: &Sender<Job>,
        key_id: &str,
        timestamp: i64,
        full: impl FnOnce() -> SignerError,
    ) -> Result<jose::ChallengeBody, SignerError> {
        let message = jose::challenge_message(key_id, timestamp);
        let sig = self
            .sign_on(lane, jose::sha256(message.as_bytes()), full)
            .await?;
        Ok(jose::ChallengeBody {
            key_id: key_id.to_string(),
            timestamp,
            signature: jose::encode_es256(&sig),
        })
    }

    /// A Turnkey API stamp over `payload`'s bytes, exactly as received.
    pub async fn stamp(&self, payload: &[u8]) -> Result<String, SignerError> {
        let sig = self.sign(payload).await?;
        Ok(jose::turnkey_stamp(&self.shared.info.public_key, &sig))
    }

    /// The key's public key.
    pub fn public_key(&self) -> &VerifyingKey {
        &self.shared.info.public_key
    }

    /// What the key is and where it lives.
    pub fn info(&self) -> &KeyInfo {
        &self.shared.info
    }

    /// A receiver of health state changes.
    pub fn subscribe_health(&self) -> watch::Receiver<HealthState> {
        self.shared.health.subscribe()
    }

    /// The current health and counters.
    pub fn health(&self) -> Health {
        Health {
            state: self.shared.health.borrow().clone(),
            last_ok: *lock(&self.shared.last_ok),
            signatures: self.shared.signatures.load(Ordering::Relaxed),
            errors: self.shared.errors.load(Ordering::Relaxed),
        }
    }
}

/// Threads of the process that may be inside a key's library: signer worker threads until
/// their session is dropped, and key openings ([`LiveWorker::opening`]) until they return;
/// with a condvar signalled as each one finishes.
static LIVE_WORKERS: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

/// Counts one thread that may be inside a key's library, until it is dropped.
pub struct LiveWorker;

impl LiveWorker {
    fn start() -> LiveWorker {
        *lock(&LIVE_WORKERS.0) += 1;
        LiveWorker
    }

    /// Held for the whole of opening a key (load, login, sessions, self-test) on a thread
    /// that the caller might stop waiting for: [`wait_for_workers`] then waits for it too.
    pub fn opening() -> LiveWorker {
        LiveWorker::start()
    }
}

impl Drop for LiveWorker {
    fn drop(&mut self) {
        let (count, finished) = &LIVE_WORKERS;
        let mut count = lock(count);
        *count = count.saturating_sub(1);
        finished.notify_all();
    }
}

/// Waits, at most `limit`, until every signer worker thread in the process has finished
/// and closed its session. Call it after the last [`Handle`] is dropped (workers finish
/// the job at hand, then stop), before the process exits. Returns false if some are still
/// busy after `limit` (e.g. a wedged HSM call); the caller says so and exits anyway.
pub fn wait_for_workers(limit: Duration) -> bool {
    let (count, finished) = &LIVE_WORKERS;
    let guard = lock(count);
    let (guard, _) = finished
        .wait_timeout_while(guard, limit, |live| *live > 0)
        .unwrap_or_else(|p| p.into_inner());
    *guard == 0
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these short locks leaves plain data behind: keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A worker's two queues: the agent's own challenges, then the clients'.
struct Jobs {
    ahead: Receiver<Job>,
    queue: Receiver<Job>,
}

impl Jobs {
    /// A job that is waiting now, the agent's first.
    fn waiting(&self) -> Option<Job> {
        self.ahead
            .try_recv()
            .or_else(|_| self.queue.try_recv())
            .ok()
    }

    /// How many jobs wait.
    fn len(&self) -> usize {
        self.ahead.len() + self.queue.len()
    }

    /// The next job, the agent's first, waiting for one; `None` once every `Handle` is
    /// dropped (both queues close together).
    fn next(&self) -> Option<Job> {
        crossbeam_channel::select_biased! {
            recv(self.ahead) -> job => job.ok(),
            recv(self.queue) -> job => job.ok(),
        }
    }
}

/// The most replies a worker holds back while more jobs wait (see [`run_worker`]).
const HELD_REPLIES_MAX: usize = 8;

/// A worker holds a reply back only after a signature quicker than this (see [`run_worker`]).
/// Unit tests use 40 ms, so that a test thread preempted on a busy machine still counts as
/// quick; their slow signatures take 50 ms or more.
const QUICK_SIGNATURE: Duration = if cfg!(test) {
    Duration::from_millis(40)
} else {
    Duration::from_millis(1)
};

/// Finished jobs' replies that a worker holds back to send together. Sending a reply wakes
/// its tokio task, and waking a parked tokio worker from this thread costs a syscall and a
/// cross-CPU wake-up; the wakes of a batch cost about one, since the first worker woken
/// takes the other tasks too.
#[derive(Default)]
struct HeldReplies(Vec<(Reply, Result<Signature, SignerError>)>);

impl HeldReplies {
    fn send_all(&mut self) {
        for (reply, result) in self.0.drain(..) {
            let _ = reply.send(result);
        }
    }
}

/// Takes jobs until the queues close. A reply is held back while more jobs wait than are
/// held (at most [`HELD_REPLIES_MAX`]) and goes out with the others; all go out before the
/// worker waits for work, so a lone request is answered at once, and so is each of a few.
/// Under load (16 clients on 1 session) waking tokio workers took about 9% of this
/// thread's time, profiled; with the replies batched, more of it is spent signing, and the
/// clients held back are fewer than the jobs still ahead of the worker, so it never waits
/// for them. Only quick keys hold replies: after a signature that took [`QUICK_SIGNATURE`]
/// or more (a YubiKey takes 50-200 ms, a network HSM milliseconds) every held reply goes
/// out, since the next signature would hold them as long to save a wake-up of a few µs.
/// The price in a failure: a reply held back behind a `C_Sign` that hangs reaches its
/// caller late, or as `timeout`, with the jobs queued behind it.
fn run_worker(mut worker: Box<dyn Signer>, jobs: Jobs, shared: Arc<Shared>) {
    let mut held = HeldReplies::default();
    loop {
        let job = match jobs.waiting() {
            Some(job) => job,
            None => {
                held.send_all();
                match jobs.next() {
                    Some(job) => job,
                    None => break,
                }
            }
        };
        let started = Instant::now();
        let result = if job.reply.is_closed() {
            None // the caller has gone: don't spend the HSM on it
        } else if started >= job.deadline {
            // Its caller is giving up this instant: it hears `timeout`, not a closed signer.
            Some(Err(SignerError::Timeout(shared.options.timeout)))
        } else {
            Some(sign(worker.as_mut(), &job.digest, &shared))
        };
        shared.finished.fetch_add(1, Ordering::Release);
        if let Some(result) = result {
            held.0.push((job.reply, result));
            let quick = started.elapsed() < QUICK_SIGNATURE;
            if !quick || held.0.len() >= HELD_REPLIES_MAX.min(jobs.len()) {
                held.send_all();
            }
        }
    }
    held.send_all();
}

/// Signs one job's digest and records the outcome in the counters and the health state.
fn sign(
    worker: &mut dyn Signer,
    digest: &[u8; 32],
    shared: &Shared,
) -> Result<Signature, SignerError> {
    let result = worker.sign_digest(digest);
    match &result {
        Ok(_) => {
            shared.signatures.fetch_add(1, Ordering::Relaxed);
            *lock(&shared.last_ok) = Some(SystemTime::now());
            shared.set_health(HealthState::Healthy);
        }
        Err(err) => {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            let reason = err.to_string();
            // Logged when signing starts failing, not per failure: a removed token fails every
            // request at once (each with its own "next attempt in …"), and clients retrying
            // in a loop must not flood the log. `status` has the count and the last reason.
            let was_failing = matches!(*shared.health.borrow(), HealthState::Failing(_));
            if !was_failing {
                tracing::warn!(signer = %shared.options.name, error = %reason, "signing failed");
            }
            shared.set_health(HealthState::Failing(reason));
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;
    use std::sync::atomic::AtomicUsize;

    /// The test key and its `KeyInfo`.
    fn test_key() -> (SigningKey, KeyInfo) {
        let key = SigningKey::from_slice(&[3u8; 32]).unwrap();
        let info = KeyInfo {
            backend: "soft",
            location: "test".into(),
            hardware_backed: false,
            public_key: *key.verifying_key(),
        };
        (key, info)
    }

    struct Slow {
        key: SigningKey,
        delay: Duration,
        calls: Arc<AtomicUsize>,
    }

    impl Signer for Slow {
        fn sign_digest(&mut self, digest: &[u8; 32]) -> Result<Signature, SignerError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(self.delay);
            soft::sign_prehash(&self.key, digest)
        }
    }

    fn slow_handle(delay: Duration, opts: ActorOptions) -> (Handle, Arc<AtomicUsize>) {
        let (key, info) = test_key();
        let calls = Arc::new(AtomicUsize::new(0));
        let worker = Slow {
            key,
            delay,
            calls: Arc::clone(&calls),
        };
        (
            Handle::spawn(info, vec![Box::new(worker)], opts).unwrap(),
            calls,
        )
    }

    #[tokio::test]
    async fn full_queue_answers_busy() {
        let opts = ActorOptions {
            queue_depth: 1,
            timeout: Duration::from_secs(5),
            name: "t".into(),
        };
        let (h, _) = slow_handle(Duration::from_millis(300), opts);
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let h = h.clone();
            tasks.push(tokio::spawn(async move { h.sign(b"m").await }));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut busy = 0;
        for t in tasks {
            if let Err(SignerError::Busy { .. }) = t.await.unwrap() {
                busy += 1;
            }
        }
        assert!(busy >= 1, "expected at least one busy answer");
    }

    #[tokio::test]
    async fn late_reply_times_out_and_abandoned_jobs_are_skipped() {
        let opts = ActorOptions {
            queue_depth: 8,
            timeout: Duration::from_millis(100),
            name: "t".into(),
        };
        let (h, calls) = slow_handle(Duration::from_millis(250), opts);
        let before = calls.load(Ordering::SeqCst); // the self-test
        let first = h.sign(b"a");
        let second = h.sign(b"b");
        let (a, b) = tokio::join!(first, second);
        assert!(matches!(a, Err(SignerError::Timeout(_))));
        assert!(matches!(b, Err(SignerError::Timeout(_))));
        tokio::time::sleep(Duration::from_millis(400)).await;
        // The second job's caller had gone by the time the worker was free: skipped.
        assert_eq!(calls.load(Ordering::SeqCst) - before, 1);
        assert_eq!(h.health().errors, 0);
    }

    #[tokio::test]
    async fn signatures_are_low_s_and_verify() {
        let (h, _) = slow_handle(Duration::ZERO, ActorOptions::default());
        for i in 0..32 {
            let msg = format!("key.{i}");
            let sig = h.sign(msg.as_bytes()).await.unwrap();
            assert!(sig.normalize_s().is_none());
            h.public_key().verify(msg.as_bytes(), &sig).unwrap();
        }
        assert_eq!(h.health().signatures, 32);
    }

    /// Signs the self-test and one probe, then blocks in every later call until `release`
    /// is dropped.
    struct Wedged {
        key: SigningKey,
        calls: usize,
        release: std::sync::mpsc::Receiver<()>,
    }

    impl Signer for Wedged {
        fn sign_digest(&mut self, digest: &[u8; 32]) -> Result<Signature, SignerError> {
            self.calls += 1;
            if self.calls > 2 {
                let _ = self.release.recv();
            }
            soft::sign_prehash(&self.key, digest)
        }
    }

    #[tokio::test]
    async fn the_watchdog_sees_a_wedged_worker_behind_a_full_queue_and_not_a_slow_one() {
        let (key, info) = test_key();
        let (release, rx) = std::sync::mpsc::channel();
        let worker = Wedged {
            key,
            calls: 0,
            release: rx,
        };
        let opts = ActorOptions {
            queue_depth: 4,
            timeout: Duration::from_millis(100),
            name: "t".into(),
        };
        let h = Handle::spawn(info, vec![Box::new(worker)], opts).unwrap();
        assert!(h.watchdog_check().await, "idle: the probe is answered");
        // The worker wedges on the next job; callers time out and the queue fills up.
        let mut answers = Vec::new();
        for _ in 0..8 {
            answers.push(h.sign(b"m").await);
        }
        assert!(matches!(answers[0], Err(SignerError::Timeout(_))));
        assert!(answers
            .iter()
            .any(|a| matches!(a, Err(SignerError::Busy { .. }))));
        assert!(matches!(h.health().state, HealthState::Failing(_)));
        // Nothing finished since the last check (the worker is stuck in its job), and jobs
        // wait: wedged, though every caller hears `busy`.
        assert!(!h.watchdog_check().await);
        assert!(!h.watchdog_check().await);
        drop(release);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(h.watchdog_check().await, "working again");

        // A slow signer with a long queue is alive as long as it takes jobs.
        let opts = ActorOptions {
            queue_depth: 64,
            timeout: Duration::from_secs(5),
            name: "t".into(),
        };
        let (h, _) = slow_handle(Duration::from_millis(30), opts);
        let load: Vec<_> = (0..20)
            .map(|_| {
                let h = h.clone();
                tokio::spawn(async move { h.sign(b"m").await })
            })
            .collect();
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(h.watchdog_check().await);
        }
        for task in load {
            task.await.unwrap().unwrap();
        }
    }

    /// Signs after `delay`, recording the digests in the order it signed them.
    struct Recording {
        key: SigningKey,
        delay: Duration,
        signed: Arc<Mutex<Vec<[u8; 32]>>>,
    }

    impl Signer for Recording {
        fn sign_digest(&mut self, digest: &[u8; 32]) -> Result<Signature, SignerError> {
            std::thread::sleep(self.delay);
            lock(&self.signed).push(*digest);
            soft::sign_prehash(&self.key, digest)
        }
    }

    #[tokio::test]
    async fn the_agents_own_challenges_go_ahead_of_a_full_client_queue() {
        let (key, info) = test_key();
        let signed = Arc::new(Mutex::new(Vec::new()));
        let worker = Recording {
            key,
            delay: Duration::from_millis(100),
            signed: Arc::clone(&signed),
        };
        let opts = ActorOptions {
            queue_depth: 2,
            timeout: Duration::from_secs(5),
            name: "t".into(),
        };
        let h = Handle::spawn(info, vec![Box::new(worker)], opts).unwrap();
        // One client job in the worker's hands, two waiting: the clients' queue is full.
        let mut clients = Vec::new();
        for i in 0..3u8 {
            let h = h.clone();
            clients.push(tokio::spawn(async move { h.sign(&[i]).await }));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(matches!(
            h.sign(b"late").await,
            Err(SignerError::Busy { .. })
        ));
        let body = h
            .sign_challenge_for_token("kid", 1_700_000_000)
            .await
            .unwrap();
        let message = jose::challenge_message("kid", 1_700_000_000);
        let sig = jose::decode_es256(&body.signature).unwrap();
        h.public_key().verify(message.as_bytes(), &sig).unwrap();
        for task in clients {
            task.await.unwrap().unwrap();
        }
        // Signed right after the job at hand, before the clients that waited.
        let order = lock(&signed).clone();
        let challenge = jose::sha256(message.as_bytes());
        assert_eq!(order.len(), 5, "self-test, 3 clients, the challenge");
        assert_eq!(order[1], jose::sha256(&[0]));
        assert_eq!(order[2], challenge);
    }

    /// Behind a wedged worker the agent's own queue fills with jobs whose callers timed out;
    /// then the agent hears that the key is not taking jobs, not a `busy` that points at
    /// `sign_queue_depth` (which does not size that queue).
    #[tokio::test]
    async fn a_full_queue_of_the_agents_own_jobs_says_the_key_is_wedged() {
        let (key, info) = test_key();
        let (release, rx) = std::sync::mpsc::channel();
        let worker = Wedged {
            key,
            calls: 1, // no watchdog probe here: wedge on the first job after the self-test
            release: rx,
        };
        let opts = ActorOptions {
            queue_depth: 4,
            timeout: Duration::from_millis(20),
            name: "t".into(),
        };
        let h = Handle::spawn(info, vec![Box::new(worker)], opts).unwrap();
        let mut last = None;
        for _ in 0..=AHEAD_DEPTH + 1 {
            last = Some(h.sign_challenge_for_token("kid", 1).await.unwrap_err());
        }
        let err = last.unwrap();
        assert!(matches!(err, SignerError::Unavailable(_)), "{err}");
        assert!(err.to_string().contains("may be wedged"), "{err}");
        drop(release);
    }

    /// Signs the self-test, then answers each job with `answer` once `permits` gives it a
    /// permit (at once when one is waiting: a quick signature, whatever the build profile);
    /// `entered` counts the jobs it has started.
    struct Gated {
        key: SigningKey,
        answer: Option<Signature>,
        entered: Arc<AtomicUsize>,
        permits: std::sync::mpsc::Receiver<()>,
    }

    impl Signer for Gated {
        fn sign_digest(&mut self, digest: &[u8; 32]) -> Result<Signature, SignerError> {
            let Some(answer) = self.answer else {
                let probe = soft::sign_prehash(&self.key, digest)?;
                self.answer = Some(probe);
                return Ok(probe);
            };
            self.entered.fetch_add(1, Ordering::SeqCst);
            let _ = self.permits.recv();
            Ok(answer)
        }
    }

    /// Polls `done` every millisecond for at most 5 s.
    async fn wait_until(what: &str, done: impl Fn() -> bool) {
        for _ in 0..5000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("timed out waiting until {what}");
    }

    #[tokio::test]
    async fn replies_are_held_back_while_more_jobs_wait_after_quick_signatures_only() {
        let (key, info) = test_key();
        let entered = Arc::new(AtomicUsize::new(0));
        let (permit, permits) = std::sync::mpsc::channel();
        let worker = Gated {
            key,
            answer: None,
            entered: Arc::clone(&entered),
            permits,
        };
        let h = Handle::spawn(info, vec![Box::new(worker)], ActorOptions::default()).unwrap();
        let answered = Arc::new(AtomicUsize::new(0));
        const JOBS: usize = 32;
        let tasks: Vec<_> = (0..JOBS)
            .map(|i| {
                let (h, answered) = (h.clone(), Arc::clone(&answered));
                tokio::spawn(async move {
                    let result = h.sign(format!("m{i}").as_bytes()).await;
                    answered.fetch_add(1, Ordering::SeqCst);
                    result
                })
            })
            .collect();
        // The worker is in job 1; the other 31 wait.
        wait_until("all jobs are queued", || {
            entered.load(Ordering::SeqCst) == 1 && h.queue.len() == JOBS - 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await; // job 1 is slow
                                                             // Gives `n` permits, and waits until the worker is in job `job` (so it has decided
                                                             // about every reply before it) and the answers settle; job `job` is then slow.
        let run_to = |n: usize, job: usize| {
            (0..n).for_each(|_| permit.send(()).unwrap());
            let entered = Arc::clone(&entered);
            async move {
                wait_until("the worker reaches the job", || {
                    entered.load(Ordering::SeqCst) == job
                })
                .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };

        // Job 1 waited for its permit: a slow signature, whose reply goes out at once
        // although 30 jobs wait.
        run_to(1, 2).await;
        assert_eq!(answered.load(Ordering::SeqCst), 1, "after a slow signature");
        // Job 2 is slow too (out at once); jobs 3 and 4 are quick: held while 28 wait.
        run_to(3, 5).await;
        assert_eq!(answered.load(Ordering::SeqCst), 2, "quick replies are held");
        // Job 5 is slow: it takes 3 and 4 out with it. Jobs 6 to 13 are quick: at the
        // eighth held reply they go out although 19 jobs wait.
        run_to(9, 14).await;
        assert_eq!(answered.load(Ordering::SeqCst), 13, "out at the cap");

        // The rest: each finished job's reply goes out by the time the queue is empty,
        // without any later job to push it out.
        (14..=JOBS).for_each(|_| permit.send(()).unwrap());
        wait_until("every reply is sent", || {
            answered.load(Ordering::SeqCst) == JOBS
        })
        .await;
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(h.health().signatures, JOBS as u64);
    }

    #[test]
    fn self_test_rejects_a_mismatched_public_key() {
        let (key, mut info) = test_key();
        let other = SigningKey::from_slice(&[4u8; 32]).unwrap();
        info.public_key = *other.verifying_key();
        let worker = Slow {
            key,
            delay: Duration::ZERO,
            calls: Arc::new(AtomicUsize::new(0)),
        };
        let err = Handle::spawn(info, vec![Box::new(worker)], ActorOptions::default()).unwrap_err();
        assert!(matches!(err, SignerError::SelfTest(_)));
    }
}
