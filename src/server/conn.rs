//! One connection: framing, dispatch, authorization, audit, timeouts, replies.
//!
//! One task per connection owns the socket. It reads, answers what it can from memory
//! straight into its output buffer (`ping`, `token` while the current token is fresh enough,
//! `public_key`, `status`, every refusal), and writes the buffer once per read, so a burst
//! of pipelined requests becomes one write; once 256 KiB of output is waiting it writes
//! before answering the rest, so the buffer stays bounded whatever the client pipelines. Requests that must wait (`sign_challenge`,
//! `stamp`, a `token` that needs a renewal, `watch`) are spawned as tasks, each holding a
//! permit of the connection's in-flight budget and a sender of the bounded reply channel;
//! the connection task writes their lines as they come, in completion order.
//!
//! Timeouts: a partial line must complete within `line_timeout` of its first byte; a
//! connection with nothing in flight is closed after `idle_timeout` without input; a write
//! that cannot finish within `write_timeout` closes the connection. One `Sleep` serves all
//! three and is re-armed only when it fires.
//!
//! Ending: on EOF the task stops reading, ends its `watch` streams, delivers the replies of
//! requests still in flight and closes. On shutdown it does the same, and each `watch`
//! stream gets a final `end` event. A `watch` stream also ends, with `forbidden`, when a
//! reload of the access rules withdraws it (it wakes on the reload; no polling). Every close
//! the agent decides on (EOF, shutdown, an oversize line, a line or idle timeout) goes
//! through [`linger::close`] once the owed lines are written, so the client reads EOF, not
//! a reset, even with requests of its own left unread; only a client that is gone or stuck
//! (a write failed or timed out, a vanished peer) is dropped at once. A connection over the
//! cap ([`reject`]) gets its `busy` line and the same close, without ever making the accept
//! loop wait. Nothing here blocks the runtime; no lock is held across an `.await`.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{linger, Profile, State};
use crate::authz::{Grants, PeerCred, Rules};
use crate::error::WireError;
use crate::jose;
use crate::protocol::{self, codec::LineBuffer, Body, ErrorCode, Op, RawRequest};
use crate::signer::SignerError;
use crate::token::AccessToken;

/// Buffered requests are answered until this much output is waiting; then it is written
/// before the rest are answered. Without the cap, 64 KiB of pipelined `status` requests
/// would build megabytes of replies per connection before the first byte is written.
const OUT_HIGH_WATER: usize = 256 * 1024;

/// The longest executable path written into an audit record, in characters.
const EXE_MAX: usize = 200;

/// Answers a connection over the cap with one error line and closes it, never waiting:
/// with a `lingering` permit the close ([`linger::close`]) runs as a small tracked task;
/// without one (a flood of connections over the cap), what the client already sent is
/// discarded and the socket dropped at once, so the lingering sockets stay few.
pub(super) fn reject(
    stream: UnixStream,
    max: usize,
    lingering: &Arc<Semaphore>,
    tracker: &TaskTracker,
) {
    let line = format!(
        "{{\"id\":null,\"ok\":false,\"error\":{{\"code\":\"busy\",\"message\":\"the agent is \
         serving its maximum of {max} connections: retry shortly\"}}}}\n"
    );
    // Best effort, never waits: a fresh socket's send buffer has room for one short line.
    let _ = stream.try_write(line.as_bytes());
    match Arc::clone(lingering).try_acquire_owned() {
        Ok(permit) => {
            tracker.spawn(async move {
                let (rd, wr) = stream.into_split();
                linger::close(rd, wr).await;
                drop(permit);
            });
        }
        Err(_) => linger::discard_ready(&stream),
    }
}

/// The peer, as needed for audit records (shared with request tasks).
struct Peer {
    cred: PeerCred,
    exe: OnceLock<String>,
    /// By profile index: a token has been handed out on this connection (by `token` or a
    /// `watch` stream), so its audit record is written.
    token_handed_out: Box<[AtomicBool]>,
}

impl Peer {
    /// Marks profile `index`'s first token on this connection as handed out: true the
    /// first time, when that token's audit record is due.
    fn first_token(&self, index: usize) -> bool {
        self.token_handed_out
            .get(index)
            .is_some_and(|flag| !flag.swap(true, Ordering::Relaxed))
    }

    /// The peer's executable, for audit records. The peer chose its name: escaped and cut
    /// like any client-supplied text.
    fn exe(&self) -> &str {
        self.exe.get_or_init(|| match self.cred.exe() {
            Some(path) => protocol::excerpt(&path.display().to_string(), EXE_MAX).into_owned(),
            None => "?".into(),
        })
    }

    fn audit(&self, op: Op, profile: Option<&str>, result: &str) {
        self.audit_with(op, profile, result, Detail::None);
    }

    fn audit_with(&self, op: Op, profile: Option<&str>, result: &str, detail: Detail) {
        let pid = self.cred.pid.unwrap_or(0);
        let (timestamp, payload) = match detail {
            Detail::None => (None, None),
            Detail::Timestamp(t) => (Some(t), None),
            Detail::PayloadSha256(digest) => (None, Some(hex::encode(digest))),
        };
        let payload_sha256 = payload.as_deref();
        // The client names the profile: a refused request may carry anything there.
        let profile = protocol::excerpt(profile.unwrap_or("-"), protocol::ECHO_MAX);
        let profile = profile.as_ref();
        if result == "ok" {
            tracing::info!(
                target: "audit",
                uid = self.cred.uid,
                gid = self.cred.gid,
                pid,
                exe = self.exe(),
                op = op.as_str(),
                profile,
                timestamp,
                payload_sha256,
                result,
                "request"
            );
        } else {
            tracing::warn!(
                target: "audit",
                uid = self.cred.uid,
                gid = self.cred.gid,
                pid,
                exe = self.exe(),
                op = op.as_str(),
                profile,
                timestamp,
                payload_sha256,
                result,
                "request"
            );
        }
    }
}

/// What an audit record says about a signature beyond op and profile: what was signed,
/// without handing the record a credential.
#[derive(Debug, Clone, Copy)]
enum Detail {
    None,
    /// The `sign_challenge` timestamp (with the profile, it names the message signed).
    Timestamp(i64),
    /// SHA-256 of a `stamp` payload; the payload itself stays out of the log.
    PayloadSha256([u8; 32]),
}

/// The token last seen for one profile, with its `result` object rendered once.
struct TokenSlot {
    rx: tokio::sync::watch::Receiver<Option<Arc<AccessToken>>>,
    current: Option<(Arc<AccessToken>, Vec<u8>)>,
}

struct Conn {
    state: Arc<State>,
    peer: Arc<Peer>,
    grants: Grants,
    /// The rules `grants` was computed from; marked changed on a reload.
    rules: tokio::sync::watch::Receiver<Arc<Rules>>,
    /// `None` once the connection stops taking requests.
    replies: Option<mpsc::Sender<Vec<u8>>>,
    in_flight: Arc<Semaphore>,
    /// Cancelled to end this connection's `watch` streams.
    streams: CancellationToken,
    /// Cancelled when the client is gone: pending requests are dropped, so their signer
    /// jobs are skipped. (Shutdown does not cancel these: they finish.)
    requests: CancellationToken,
    /// The server's shutdown token (to tell `watch` streams why they end).
    shutdown: CancellationToken,
    tracker: TaskTracker,
    tokens: Vec<Option<TokenSlot>>,
    /// The most output buffered at once (reported when the connection closes).
    peak_out: usize,
}

pub(super) async fn run(
    stream: UnixStream,
    state: Arc<State>,
    cancel: CancellationToken,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    _slot: OwnedSemaphorePermit,
) {
    let cred = match stream.peer_cred() {
        Ok(c) => PeerCred {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
        },
        Err(err) => {
            tracing::warn!(error = %err, "cannot read peer credentials; closing the connection");
            return;
        }
    };
    let Some(_uid_slot) = state.admit_uid(cred.uid) else {
        state
            .counters
            .connections_rejected
            .fetch_add(1, Ordering::Relaxed);
        state.counters.error(ErrorCode::Busy);
        let limit = state.settings.per_uid_limit();
        // A refusal like any other: a client retrying in a loop must not flood the log.
        state.audit_within_budget(|| {
            tracing::warn!(
                uid = cred.uid,
                pid = cred.pid.unwrap_or(0),
                limit,
                "connection refused: its user holds the most connections one user may"
            );
        });
        let err = WireError::new(
            ErrorCode::Busy,
            format!(
                "your user already holds {limit} connections to the agent, the most one user \
                 may: close some, or ask for server.max_connections_per_uid to be raised"
            ),
        );
        let mut line = Vec::new();
        write_err(&mut line, None, &err);
        let (rd, mut wr) = stream.into_split();
        let written = tokio::time::timeout(state.settings.write_timeout, wr.write_all(&line)).await;
        if matches!(written, Ok(Ok(()))) {
            linger::close(rd, wr).await;
        }
        return;
    };
    state
        .counters
        .connections_open
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut rules = state.subscribe_rules();
    let grants = rules.borrow_and_update().grants(&cred);
    let settings = state.settings.clone();
    let (tx, rx) = mpsc::channel(settings.max_in_flight.max(8));
    let mut conn = Conn {
        tokens: (0..state.profiles.len()).map(|_| None).collect(),
        state: Arc::clone(&state),
        peer: Arc::new(Peer {
            cred,
            exe: OnceLock::new(),
            token_handed_out: (0..state.profiles.len())
                .map(|_| AtomicBool::new(false))
                .collect(),
        }),
        grants,
        rules,
        replies: Some(tx),
        in_flight: Arc::new(Semaphore::new(settings.max_in_flight)),
        streams: cancel.child_token(),
        requests: CancellationToken::new(),
        shutdown,
        tracker,
        peak_out: 0,
    };
    tracing::debug!(uid = cred.uid, pid = cred.pid, "connection opened");
    let (mut rd, mut wr) = stream.into_split();
    let end = conn.serve(&mut rd, &mut wr, rx, &cancel, &settings).await;
    // Every owed line is written. A client that is gone or stuck has its requests
    // cancelled: drop it now; any other gets EOF rather than a reset.
    let closed = if conn.requests.is_cancelled() {
        "dropped"
    } else {
        linger::close(rd, wr).await.as_str()
    };
    tracing::debug!(
        uid = cred.uid,
        pid = cred.pid,
        reason = end,
        closed,
        peak_output_bytes = conn.peak_out,
        "connection closed"
    );
    state
        .counters
        .connections_open
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
}

impl Conn {
    /// The connection's main loop. Returns why it ended (for the debug log).
    async fn serve(
        &mut self,
        rd: &mut OwnedReadHalf,
        wr: &mut OwnedWriteHalf,
        mut rx: mpsc::Receiver<Vec<u8>>,
        cancel: &CancellationToken,
        settings: &super::ServerSettings,
    ) -> &'static str {
        let mut lines = LineBuffer::new(protocol::MAX_LINE);
        let mut out: Vec<u8> = Vec::with_capacity(1024);
        let mut reading = true;
        let mut end = "client closed";
        // The idle clock: the last bytes read or reply written (a reply is the end of some
        // in-flight work, so "idle" counts from when the connection last did anything).
        let mut last_activity = Instant::now();
        // When the oldest incomplete line began; a line completed since the bookkeeping
        // below last ran means any partial line now buffered is a newer one.
        let mut partial_since: Option<Instant> = None;
        let mut completed_lines = false;
        let timer = tokio::time::sleep(settings.line_timeout.min(settings.idle_timeout));
        tokio::pin!(timer);
        let cancelled = cancel.cancelled();
        tokio::pin!(cancelled);

        loop {
            // Complete lines left unanswered because enough output was waiting.
            let mut more_lines = false;
            if reading {
                // Answer the complete lines that are buffered, up to OUT_HIGH_WATER of output.
                loop {
                    if out.len() > OUT_HIGH_WATER {
                        more_lines = true;
                        break;
                    }
                    match lines.next_line() {
                        Ok(Some(line)) => {
                            completed_lines = true;
                            self.handle_line(line, &mut out);
                        }
                        Ok(None) => break,
                        Err(too_long) => {
                            self.refuse(
                                &mut out,
                                None,
                                None,
                                WireError::bad_request(format!(
                                    "{too_long}: requests are limited to 64 KiB a line; closing"
                                )),
                            );
                            reading = false;
                            end = "line too long";
                            break;
                        }
                    }
                }
                if reading && !more_lines {
                    let now = Instant::now();
                    partial_since = match (lines.has_partial(), partial_since) {
                        (true, Some(since)) if !completed_lines => Some(since),
                        (true, _) => {
                            // A new partial line: make sure the timer fires by its deadline.
                            let deadline = tokio::time::Instant::from(now + settings.line_timeout);
                            if timer.deadline() > deadline {
                                timer.as_mut().reset(deadline);
                            }
                            Some(now)
                        }
                        (false, _) => None,
                    };
                    completed_lines = false;
                }
            }
            if !reading && self.replies.is_some() {
                self.stop_taking_requests();
            }
            // Pick up replies that are ready, then write everything in one go.
            while let Ok(line) = rx.try_recv() {
                out.extend_from_slice(&line);
            }
            if !out.is_empty() {
                self.peak_out = self.peak_out.max(out.len());
                match tokio::time::timeout(settings.write_timeout, wr.write_all(&out)).await {
                    Ok(Ok(())) => {
                        out.clear();
                        last_activity = Instant::now();
                    }
                    Ok(Err(_)) => return self.abort("write failed"),
                    Err(_) => return self.abort("write timed out"),
                }
                if out.capacity() > 64 * 1024 {
                    out = Vec::with_capacity(1024);
                }
            }
            if more_lines {
                // The rest of the buffered requests, before waiting for anything new.
                continue;
            }
            if !reading && self.replies.is_none() && rx.is_closed() && rx.is_empty() {
                return end;
            }

            tokio::select! {
                biased;
                _ = &mut cancelled, if reading => {
                    reading = false;
                    end = "shutdown";
                }
                line = rx.recv() => match line {
                    Some(line) => out.extend_from_slice(&line),
                    // Every sender is gone: nothing more will come.
                    None => return end,
                },
                read = rd.read(lines.spare()), if reading => match read {
                    Ok(0) => {
                        reading = false;
                        // EOF is also what a half-close (`shutdown(SHUT_WR)`, socat, nc -N)
                        // looks like, and those clients still read their replies. A peer that
                        // closed completely shows as hung up for writing: drop its requests.
                        let busy = self.in_flight.available_permits() < settings.max_in_flight;
                        if busy && peer_hung_up(wr) {
                            self.requests.cancel();
                            end = "client vanished";
                        }
                    }
                    Ok(n) => {
                        lines.filled(n);
                        last_activity = Instant::now();
                    }
                    Err(_) => {
                        reading = false;
                        end = "read failed";
                    }
                },
                _ = &mut timer, if reading => {
                    let now = Instant::now();
                    let idle = self.in_flight.available_permits() == settings.max_in_flight;
                    let partial_deadline = partial_since.map(|t| t + settings.line_timeout);
                    let idle_deadline = idle.then(|| last_activity + settings.idle_timeout);
                    if partial_deadline.is_some_and(|d| d <= now) {
                        self.refuse(
                            &mut out,
                            None,
                            None,
                            WireError::bad_request(format!(
                                "incomplete line: a request must arrive within {} s of its first \
                                 byte; closing",
                                settings.line_timeout.as_secs()
                            )),
                        );
                        reading = false;
                        end = "partial line timeout";
                    } else if idle_deadline.is_some_and(|d| d <= now) {
                        reading = false;
                        end = "idle timeout";
                    } else {
                        let next = [partial_deadline, idle_deadline]
                            .into_iter()
                            .flatten()
                            .min()
                            .unwrap_or(now + settings.idle_timeout);
                        timer.as_mut().reset(next.into());
                    }
                }
            }
        }
    }

    /// No more requests: end `watch` streams, let other in-flight requests finish.
    fn stop_taking_requests(&mut self) {
        self.replies = None;
        self.streams.cancel();
    }

    /// The client is gone or stuck: drop everything.
    fn abort(&mut self, why: &'static str) -> &'static str {
        self.stop_taking_requests();
        self.requests.cancel();
        why
    }

    /// Runs a request that waits, as its own task: its reply line goes to the connection
    /// task; if the client goes away first, the work is dropped (and audited as such).
    fn spawn_request(
        &self,
        permit: OwnedSemaphorePermit,
        replies: mpsc::Sender<Vec<u8>>,
        audit: Option<(Op, String, Detail)>,
        work: impl std::future::Future<Output = Vec<u8>> + Send + 'static,
    ) {
        let cancel = self.requests.clone();
        let peer = Arc::clone(&self.peer);
        self.tracker.spawn(async move {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    if let Some((op, profile, detail)) = audit {
                        peer.audit_with(op, Some(&profile), "cancelled", detail);
                    }
                }
                line = work => {
                    let _ = replies.send(line).await;
                }
            }
            drop(permit);
        });
    }

    fn handle_line(&mut self, line: &[u8], out: &mut Vec<u8>) {
        let request = match parse_request(line) {
            Ok(request) => request,
            Err(bad) => return self.refuse(out, bad.id, None, bad.error),
        };
        let id = request.id;
        let op = request.body.op();
        self.state.counters.request(op);
        self.refresh_grants();
        let profile_name = request.body.profile();
        if !self.grants.allows(op, profile_name) {
            let err = WireError::forbidden(op.as_str(), profile_name);
            return self.refuse(out, Some(id), Some((op, profile_name)), err);
        }
        let index = match profile_name {
            None => None,
            Some(name) => match self.state.profile_index(name) {
                Some(index) => Some(index),
                None => {
                    let err = WireError::unknown_profile(name);
                    return self.refuse(out, Some(id), Some((op, profile_name)), err);
                }
            },
        };
        match (request.body, index) {
            (Body::Ping, _) => write_ok(out, id, None, br#"{"pong":true}"#),
            (Body::Token { min_ttl, .. }, Some(index)) => self.token(out, id, index, min_ttl),
            (Body::PublicKey { .. }, Some(index)) => {
                let json = &self.state.profiles[index].public_key_json;
                write_ok(out, id, None, json);
            }
            (Body::Status { .. }, index) => self.status(out, id, index),
            (Body::Watch { .. }, Some(index)) => self.watch(out, id, index),
            (
                Body::SignChallenge {
                    timestamp, key_id, ..
                },
                Some(index),
            ) => self.sign_challenge(out, id, index, timestamp, key_id),
            (Body::Stamp { payload, .. }, Some(index)) => self.stamp(out, id, index, payload),
            // validate() guarantees a profile for every other op.
            (_, None) => self.refuse(out, Some(id), None, WireError::internal()),
        }
    }

    fn refresh_grants(&mut self) {
        // The sender lives in `State`, which outlives every connection.
        if self.rules.has_changed().unwrap_or(false) {
            self.grants = self.rules.borrow_and_update().grants(&self.peer.cred);
        }
    }

    /// Writes an error reply and audits it, within the agent-wide budget for refusal
    /// records (`State::refusal_audit`), so that no client can flood the log: as a refused
    /// op when `what` is given, else as a malformed request.
    fn refuse(
        &mut self,
        out: &mut Vec<u8>,
        id: Option<u64>,
        what: Option<(Op, Option<&str>)>,
        err: WireError,
    ) {
        self.state.counters.error(err.code);
        self.state.audit_within_budget(|| match what {
            Some((op, profile)) => self.peer.audit(op, profile, err.code.as_str()),
            None => tracing::warn!(
                target: "audit",
                uid = self.peer.cred.uid,
                gid = self.peer.cred.gid,
                pid = self.peer.cred.pid.unwrap_or(0),
                exe = self.peer.exe(),
                result = err.code.as_str(),
                // Never Display: the message may echo (escaped) client input, and a
                // `&str` field is escaped by every formatter in use (text, JSON).
                reason = err.message.as_ref(),
                "malformed request"
            ),
        });
        write_err(out, id, &err);
    }

    fn profile(&self, index: usize) -> &Profile {
        &self.state.profiles[index].profile
    }

    /// Takes an in-flight permit and a reply sender, or answers `busy`.
    fn begin_task(
        &mut self,
        out: &mut Vec<u8>,
        id: u64,
        op: Op,
        profile: &str,
    ) -> Option<(OwnedSemaphorePermit, mpsc::Sender<Vec<u8>>)> {
        let replies = self.replies.clone()?;
        match Arc::clone(&self.in_flight).try_acquire_owned() {
            Ok(permit) => Some((permit, replies)),
            Err(_) => {
                let err = WireError::new(
                    ErrorCode::Busy,
                    format!(
                        "too many requests in flight on this connection (at most {}): wait for \
                         replies or open another connection",
                        self.state.settings.max_in_flight
                    ),
                );
                self.refuse(out, Some(id), Some((op, Some(profile))), err);
                None
            }
        }
    }

    fn token(&mut self, out: &mut Vec<u8>, id: u64, index: usize, min_ttl: Option<u64>) {
        let min_ttl = min_ttl.map(Duration::from_secs);
        let slot = self.tokens[index].get_or_insert_with(|| TokenSlot {
            rx: self.state.profiles[index].profile.tokens.subscribe(),
            current: None,
        });
        if slot.current.is_none() || slot.rx.has_changed().unwrap_or(false) {
            let latest = slot.rx.borrow_and_update().clone();
            slot.current = latest.map(|token| {
                let json = render_token(&token);
                (token, json)
            });
        }
        if let Some((token, json)) = &slot.current {
            if fresh_enough(token, min_ttl, SystemTime::now()) {
                write_ok(out, id, None, json);
                if self.peer.first_token(index) {
                    let name = &self.state.profiles[index].profile.name;
                    self.peer.audit(Op::Token, Some(name), "ok");
                }
                return;
            }
        }
        // No token fresh enough in memory: wait for the manager's shared renewal.
        let name = self.profile(index).name.clone();
        let Some((permit, replies)) = self.begin_task(out, id, Op::Token, &name) else {
            return;
        };
        let tokens = Arc::clone(&self.profile(index).tokens);
        let state = Arc::clone(&self.state);
        let peer = Arc::clone(&self.peer);
        // A request dropped because its client left handed nothing out: no record.
        self.spawn_request(permit, replies, None, async move {
            let mut line = Vec::new();
            match tokens.token(min_ttl).await {
                Ok(token) => {
                    write_ok(&mut line, id, None, &render_token(&token));
                    if peer.first_token(index) {
                        peer.audit(Op::Token, Some(&name), "ok");
                    }
                }
                Err(err) => {
                    // Every waiter of a failed renewal fails at once, and the token manager
                    // logs the renewal's failure itself: these records share the budget of
                    // refusals.
                    tracing::debug!(profile = %name, error = %err, "token request failed");
                    let wire = WireError::from_token(&err, &name);
                    state.counters.error(wire.code);
                    state.audit_within_budget(|| {
                        peer.audit(Op::Token, Some(&name), wire.code.as_str());
                    });
                    write_err(&mut line, Some(id), &wire);
                }
            }
            line
        });
    }

    fn sign_challenge(
        &mut self,
        out: &mut Vec<u8>,
        id: u64,
        index: usize,
        timestamp: Option<i64>,
        key_id: Option<Cow<'_, str>>,
    ) {
        let state = Arc::clone(&self.state);
        let profile = &state.profiles[index].profile;
        let name = profile.name.as_str();
        if let Some(asked) = key_id {
            if asked != profile.key_id {
                let err = WireError::new(
                    ErrorCode::Forbidden,
                    format!(
                        "this agent signs only profile `{name}`'s own key_id ({}); omit `key_id` \
                         or use the right profile",
                        profile.key_id
                    ),
                );
                return self.refuse(out, Some(id), Some((Op::SignChallenge, Some(name))), err);
            }
        }
        let now = unix_secs(profile.tokens.server_now());
        let timestamp = timestamp.unwrap_or(now);
        let skew = timestamp.saturating_sub(now);
        if skew.unsigned_abs() > protocol::TIMESTAMP_WINDOW_SECS.unsigned_abs() {
            let err = WireError::bad_request(format!(
                "timestamp {timestamp} is {skew:+} s from the Auth API's clock as the agent \
                 knows it; the API accepts ±{} s: omit `timestamp` and the agent picks it",
                protocol::TIMESTAMP_WINDOW_SECS
            ));
            return self.refuse(out, Some(id), Some((Op::SignChallenge, Some(name))), err);
        }
        let signer = profile.signer.clone();
        let key_id = profile.key_id.clone();
        // Lazy: nothing is signed unless the task gets its in-flight permit.
        let sign = async move {
            let body = signer.sign_challenge(&key_id, timestamp).await?;
            Ok(to_json(&protocol::SignChallengeResult {
                key_id: body.key_id,
                timestamp: body.timestamp,
                signature: body.signature,
            }))
        };
        let detail = Detail::Timestamp(timestamp);
        self.spawn_signature(out, id, index, Op::SignChallenge, detail, sign);
    }

    fn stamp(&mut self, out: &mut Vec<u8>, id: u64, index: usize, payload: Cow<'_, str>) {
        if !is_json_object(&payload) {
            let name = self.profile(index).name.clone();
            let err = WireError::new(
                ErrorCode::Forbidden,
                "`stamp` signs only Turnkey activity payloads, which are JSON objects; this \
                 payload is not one, and the agent does not sign arbitrary data",
            );
            return self.refuse(out, Some(id), Some((Op::Stamp, Some(&name))), err);
        }
        let detail = Detail::PayloadSha256(jose::sha256(payload.as_bytes()));
        let payload = payload.into_owned();
        let signer = self.profile(index).signer.clone();
        let sign = async move {
            let stamp = signer.stamp(payload.as_bytes()).await?;
            Ok(to_json(&protocol::StampResult { stamp }))
        };
        self.spawn_signature(out, id, index, Op::Stamp, detail, sign);
    }

    /// Runs a signature for the client (`sign_challenge`, `stamp`) as a task. `sign` yields
    /// the `result` object. Every outcome is audit-logged with `detail`: `ok` and `cancelled`
    /// (the client left first) always, the error code within the refusals' budget.
    fn spawn_signature(
        &mut self,
        out: &mut Vec<u8>,
        id: u64,
        index: usize,
        op: Op,
        detail: Detail,
        sign: impl std::future::Future<Output = Result<Vec<u8>, SignerError>> + Send + 'static,
    ) {
        let name = self.profile(index).name.clone();
        let Some((permit, replies)) = self.begin_task(out, id, op, &name) else {
            return;
        };
        let state = Arc::clone(&self.state);
        let peer = Arc::clone(&self.peer);
        let audit = Some((op, name.clone(), detail));
        self.spawn_request(permit, replies, audit, async move {
            let mut line = Vec::new();
            match sign.await {
                Ok(result) => {
                    write_ok(&mut line, id, None, &result);
                    peer.audit_with(op, Some(&name), "ok", detail);
                }
                Err(err) => {
                    let wire = WireError::from_signer(&err);
                    state.counters.error(wire.code);
                    // Nothing was signed for the client: like a refusal, the record (and the
                    // warning, but for a full queue, which is load, not a fault) shares the
                    // budget that keeps a client in a loop from flooding the log.
                    state.audit_within_budget(|| {
                        if !matches!(err, SignerError::Busy { .. }) {
                            tracing::warn!(profile = %name, op = op.as_str(), error = %err, "signing failed");
                        }
                        peer.audit_with(op, Some(&name), wire.code.as_str(), detail);
                    });
                    write_err(&mut line, Some(id), &wire);
                }
            }
            line
        });
    }

    fn watch(&mut self, out: &mut Vec<u8>, id: u64, index: usize) {
        let name = self.profile(index).name.clone();
        let Some((permit, replies)) = self.begin_task(out, id, Op::Watch, &name) else {
            return;
        };
        let mut rx = self.profile(index).tokens.subscribe();
        let streams = self.streams.clone();
        let shutdown = self.shutdown.clone();
        // As seen by this request's access check: any reload since is a change.
        let mut rules = self.rules.clone();
        let state = Arc::clone(&self.state);
        let peer = Arc::clone(&self.peer);
        self.tracker.spawn(async move {
            let mut sent: Option<Arc<AccessToken>> = None;
            let mut rules_changed = false;
            let mut rules_open = true;
            loop {
                // Before anything is sent: a reload may have withdrawn this stream.
                if std::mem::take(&mut rules_changed) || rules.has_changed().unwrap_or(false) {
                    let allowed = rules
                        .borrow_and_update()
                        .grants(&peer.cred)
                        .allows(Op::Watch, Some(&name));
                    if !allowed {
                        let err = WireError::new(
                            ErrorCode::Forbidden,
                            format!(
                                "permission denied by the agent: the access rules were reloaded \
                                 and your user may no longer use `watch` on profile `{name}`; \
                                 the stream ends"
                            ),
                        );
                        state.counters.error(err.code);
                        peer.audit(Op::Watch, Some(&name), err.code.as_str());
                        let mut line = Vec::new();
                        write_err(&mut line, Some(id), &err);
                        let _ = replies.send(line).await;
                        break;
                    }
                }
                let latest = rx.borrow_and_update().clone();
                if let Some(token) = latest {
                    let new = sent.as_ref().is_none_or(|s| !Arc::ptr_eq(s, &token));
                    if new && fresh_enough(&token, None, SystemTime::now()) {
                        let mut line = Vec::new();
                        write_ok(&mut line, id, Some("token"), &render_token(&token));
                        if replies.send(line).await.is_err() {
                            break;
                        }
                        if sent.is_none() {
                            // Each stream's first token is audited (as `watch`), and stands
                            // for the connection's first token of the profile.
                            peer.first_token(index);
                            peer.audit(Op::Watch, Some(&name), "ok");
                        }
                        sent = Some(token);
                    }
                }
                tokio::select! {
                    biased;
                    _ = streams.cancelled() => {
                        if shutdown.is_cancelled() {
                            let mut line = Vec::new();
                            let end = protocol::WatchEnd { reason: "shutdown".into() };
                            write_ok(&mut line, id, Some("end"), &to_json(&end));
                            let _ = replies.send(line).await;
                        }
                        break;
                    }
                    // Never fails while `state` is held; if it did, stop listening to it.
                    changed = rules.changed(), if rules_open => match changed {
                        Ok(()) => rules_changed = true,
                        Err(_) => rules_open = false,
                    },
                    changed = rx.changed() => if changed.is_err() {
                        let mut line = Vec::new();
                        let err = WireError::new(
                            ErrorCode::Unavailable,
                            format!("the token source of profile `{name}` has stopped"),
                        );
                        state.counters.error(err.code);
                        peer.audit(Op::Watch, Some(&name), err.code.as_str());
                        write_err(&mut line, Some(id), &err);
                        let _ = replies.send(line).await;
                        break;
                    },
                }
            }
            drop(permit);
        });
    }

    fn status(&mut self, out: &mut Vec<u8>, id: u64, only: Option<usize>) {
        let state = &self.state;
        let profiles = state
            .profiles
            .iter()
            .enumerate()
            .filter(|(i, _)| only.is_none_or(|o| o == *i))
            .filter(|(_, e)| self.grants.allows(Op::Status, Some(&e.profile.name)))
            .map(|(_, e)| profile_status(&e.profile))
            .collect();
        let result = protocol::StatusResult {
            version: env!("CARGO_PKG_VERSION").into(),
            protocol: protocol::VERSION,
            started_at: unix_secs(state.started_at),
            uptime_secs: state.started.elapsed().as_secs(),
            profiles,
            counters: state.counters.snapshot(),
        };
        write_ok(out, id, None, &to_json(&result));
    }
}

/// True if the peer has closed its end completely (EPOLLHUP), as opposed to only its write
/// side. Polls once; never waits.
fn peer_hung_up(wr: &tokio::net::unix::OwnedWriteHalf) -> bool {
    let ready = std::pin::pin!(wr.ready(tokio::io::Interest::WRITABLE));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::future::Future::poll(ready, &mut cx) {
        std::task::Poll::Ready(Ok(ready)) => ready.is_write_closed(),
        std::task::Poll::Ready(Err(_)) => true,
        std::task::Poll::Pending => false,
    }
}

fn profile_status(p: &Profile) -> protocol::ProfileStatus {
    let info = p.signer.info();
    let health = p.signer.health();
    let tokens = p.tokens.status();
    let valid = p
        .tokens
        .subscribe()
        .borrow()
        .as_ref()
        .is_some_and(|t| fresh_enough(t, None, SystemTime::now()));
    let (state, error) = match health.state {
        crate::signer::HealthState::Healthy => ("ok".to_owned(), None),
        crate::signer::HealthState::Failing(why) => ("failing".to_owned(), Some(why)),
    };
    protocol::ProfileStatus {
        name: p.name.clone(),
        key_id: p.key_id.clone(),
        backend: info.backend.to_owned(),
        location: info.location.clone(),
        hardware_backed: info.hardware_backed,
        key: protocol::KeyHealth {
            state,
            error,
            last_ok: health.last_ok.map(unix_secs),
            signatures: health.signatures,
            errors: health.errors,
        },
        token: protocol::TokenState {
            valid,
            expires_at: tokens.expires_at.map(unix_secs),
            next_refresh: tokens.next_refresh.map(unix_secs),
            last_mint: tokens.last_mint.map(unix_secs),
            last_refresh: tokens.last_refresh.map(unix_secs),
            consecutive_failures: tokens.consecutive_failures,
            last_error_code: tokens.last_error_code,
            last_error: tokens.last_error,
            clock_offset_secs: tokens.clock_offset_secs,
        },
    }
}

/// A request line refused before anything else is looked at: the id to answer with, when
/// one could be read, and the error (`bad_request` or `unsupported_version`).
#[derive(Debug)]
pub struct Unparsed {
    pub id: Option<u64>,
    pub error: WireError,
}

/// Reads one request line (without its newline) as the agent does: one JSON object, v1, a
/// known op with exactly its fields. Pure: no peer, no state; the fuzz targets call it too.
pub fn parse_request(line: &[u8]) -> Result<protocol::Request<'_>, Unparsed> {
    // serde would also read a struct from a JSON array, by position.
    if !starts_as_object(line) {
        return Err(Unparsed {
            id: None,
            error: WireError::bad_request("a request is one JSON object on one line"),
        });
    }
    let raw: RawRequest<'_> = match serde_json::from_slice(line) {
        Ok(raw) => raw,
        Err(err) => {
            let probe = serde_json::from_slice::<protocol::IdOnly>(line).ok();
            let error = match probe.as_ref().and_then(protocol::IdOnly::other_version) {
                Some(v) => WireError::unsupported_version(v),
                None => WireError::invalid_json(&err),
            };
            return Err(Unparsed {
                id: probe.and_then(|p| p.id),
                error,
            });
        }
    };
    raw.validate().map_err(|err| Unparsed {
        id: err.id,
        error: WireError::new(err.code, err.message),
    })
}

/// True if `text` is one JSON object, as every Turnkey activity payload is. `stamp` signs
/// nothing else: in particular not `{key_id}.{timestamp}`, whose signature would mint
/// tokens for any time the client chose, outliving a revocation of its access.
fn is_json_object(text: &str) -> bool {
    starts_as_object(text.as_bytes()) && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
}

/// True if the first byte after JSON whitespace opens an object.
fn starts_as_object(bytes: &[u8]) -> bool {
    bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// True if `token` stays valid for at least `min_ttl` (default: is valid at all).
/// The manager's own test (`AccessToken::serves`, 90% cap included), so that the answer
/// from memory here agrees with what a renewal could give.
fn fresh_enough(token: &AccessToken, min_ttl: Option<Duration>, now: SystemTime) -> bool {
    token.serves(min_ttl.unwrap_or_default(), now)
}

/// The `public_key` result of a profile.
pub(super) fn render_public_key(p: &Profile) -> Vec<u8> {
    let key = p.signer.public_key();
    let jwk = jose::Jwk::from_verifying_key(key);
    let result = protocol::PublicKeyResult {
        key_id: p.key_id.clone(),
        pem: jose::public_key_pem(key),
        thumbprint: jwk.thumbprint(),
        jwk: protocol::PublicJwk {
            kty: jwk.kty,
            crv: jwk.crv,
            x: jwk.x,
            y: jwk.y,
        },
        hex: jose::public_key_compressed_hex(key),
    };
    to_json(&result)
}

fn render_token(token: &AccessToken) -> Vec<u8> {
    let result = protocol::TokenResult {
        access_token: token.token.to_string(),
        token_type: "Bearer".into(),
        expires_at: unix_secs(token.expires_at),
        expires_at_rfc3339: rfc3339(token.expires_at),
    };
    to_json(&result)
}

fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain structs into memory cannot fail.
    serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec())
}

/// Unix seconds (negative before 1970).
pub(crate) fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn rfc3339(t: SystemTime) -> String {
    let secs = unix_secs(t);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|dt| {
            dt.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// `{"id":<id>,"ok":true[,"event":"<event>"],"result":<result>}\n`
fn write_ok(out: &mut Vec<u8>, id: u64, event: Option<&str>, result: &[u8]) {
    out.extend_from_slice(b"{\"id\":");
    out.extend_from_slice(itoa::Buffer::new().format(id).as_bytes());
    out.extend_from_slice(b",\"ok\":true,");
    if let Some(event) = event {
        out.extend_from_slice(b"\"event\":\"");
        out.extend_from_slice(event.as_bytes());
        out.extend_from_slice(b"\",");
    }
    out.extend_from_slice(b"\"result\":");
    out.extend_from_slice(result);
    out.extend_from_slice(b"}\n");
}

/// `{"id":<id|null>,"ok":false,"error":{"code":"<code>","message":"<message>"}}\n`
pub(crate) fn write_err(out: &mut Vec<u8>, id: Option<u64>, err: &WireError) {
    out.extend_from_slice(b"{\"id\":");
    match id {
        Some(id) => out.extend_from_slice(itoa::Buffer::new().format(id).as_bytes()),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"ok\":false,\"error\":{\"code\":\"");
    out.extend_from_slice(err.code.as_str().as_bytes());
    out.extend_from_slice(b"\",\"message\":");
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, err.message.as_ref());
    out.extend_from_slice(b"}}\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_are_valid_json_in_wire_order() {
        let mut out = Vec::new();
        write_ok(&mut out, 7, None, br#"{"pong":true}"#);
        write_ok(&mut out, 8, Some("token"), br#"{"a":1}"#);
        write_err(&mut out, None, &WireError::bad_request("bad \"x\"\n"));
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], r#"{"id":7,"ok":true,"result":{"pong":true}}"#);
        assert_eq!(
            lines[1],
            r#"{"id":8,"ok":true,"event":"token","result":{"a":1}}"#
        );
        let v: serde_json::Value = serde_json::from_str(lines[2]).unwrap();
        assert_eq!(v["id"], serde_json::Value::Null);
        assert_eq!(v["error"]["code"], "bad_request");
        assert_eq!(v["error"]["message"], "bad \"x\"\n");
    }

    #[test]
    fn stamp_payloads_must_be_json_objects() {
        for ok in [r#"{}"#, r#" {"type":"ACTIVITY","n":[1,{"a":null}]} "#] {
            assert!(is_json_object(ok), "{ok}");
        }
        for bad in [
            "0b6d2f8e-7c1a-4e3b-9a5d-000000000000.1999999999",
            "x",
            "",
            "[1]",
            "\"{}\"",
            "{",
            "{} {}",
            "{}x",
            r#"{"a":}"#,
        ] {
            assert!(!is_json_object(bad), "{bad}");
        }
    }

    #[test]
    fn freshness_honours_min_ttl_capped_at_nine_tenths_of_the_lifetime() {
        let now = SystemTime::now();
        // Halfway through a 100 s life.
        let token = AccessToken {
            token: "t".into(),
            expires_at: now + Duration::from_secs(50),
            received_at: now - Duration::from_secs(50),
        };
        assert!(fresh_enough(&token, None, now));
        assert!(fresh_enough(&token, Some(Duration::from_secs(50)), now));
        assert!(!fresh_enough(&token, Some(Duration::from_secs(51)), now));
        assert!(!fresh_enough(&token, Some(Duration::from_secs(3600)), now));
        assert!(!fresh_enough(&token, None, now + Duration::from_secs(50)));
        // Just received: any ask beyond 90 s is what a renewal could give at best.
        let fresh = AccessToken {
            token: "t".into(),
            expires_at: now + Duration::from_secs(100),
            received_at: now,
        };
        assert!(fresh_enough(&fresh, Some(Duration::from_secs(3600)), now));
        assert!(!fresh_enough(
            &fresh,
            Some(Duration::from_secs(95)),
            now + Duration::from_secs(11)
        ));
    }

    #[test]
    fn rfc3339_is_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20Z");
        assert_eq!(unix_secs(t), 1_700_000_000);
    }
}
