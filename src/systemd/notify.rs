//! The sd_notify(3) sender: tells systemd when the agent is ready, what it is doing, that it
//! is reloading or stopping, and that it is still alive (the watchdog).
//!
//! Owns: parsing `NOTIFY_SOCKET` (a path, or `@name` for an abstract socket), `WATCHDOG_USEC`
//! and `WATCHDOG_PID`; formatting the datagrams (`READY=1`, `STATUS=…`, `RELOADING=1` +
//! `MONOTONIC_USEC=…`, `STOPPING=1`, `WATCHDOG=1`, `EXTEND_TIMEOUT_USEC=…`); and
//! [`StatusLine`], the one-line per-profile summary shown by `systemctl status`.
//! Not owned here: socket activation (`LISTEN_FDS`, in `systemd.rs`), and the decision of
//! *when* the agent is ready or healthy (the daemon passes that in).
//!
//! Written on `std` rather than on the `sd-notify` crate: the protocol is one datagram per
//! message, `std` has safe abstract socket addresses, and owning the ~100 lines lets the
//! sender be non-blocking, sanitize `STATUS=` text, and be tested against a socket the test
//! binds itself (no environment variables, so tests run in parallel).
//!
//! Threading: a [`Notifier`] is cheap to clone (an `Arc` around one unbound, non-blocking
//! `UnixDatagram`) and may be used from any thread or task. A send never blocks: when
//! systemd's queue is full the message is dropped and an error returned (systemd is then
//! far behind anyway; the next watchdog ping or status line will get through). When
//! `NOTIFY_SOCKET` is unset (not under systemd, or `Type=simple`), every method is a no-op
//! that returns `Ok(())`.

use std::ffi::OsStr;
use std::fmt;
use std::future::Future;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest `STATUS=` text sent; longer texts are cut at a character boundary.
pub const MAX_STATUS_LEN: usize = 1024;

/// Why a notification could not be set up or sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `NOTIFY_SOCKET` is neither an absolute path nor `@abstract-name`.
    #[error("NOTIFY_SOCKET={0:?} is neither an absolute path nor an abstract socket name (@name)")]
    BadAddress(String),
    /// `WATCHDOG_USEC` is not a positive integer.
    #[error("WATCHDOG_USEC={0:?} is not a positive number of microseconds")]
    BadWatchdogUsec(String),
    /// `WATCHDOG_PID` is not a process id.
    #[error("WATCHDOG_PID={0:?} is not a process id")]
    BadWatchdogPid(String),
    /// The local datagram socket could not be created.
    #[error("cannot create a datagram socket for sd_notify: {0}")]
    Socket(#[source] io::Error),
    /// systemd's socket refused the message (gone, or its queue is full).
    #[error("cannot send {what} to the systemd notify socket {addr}: {source}")]
    Send {
        what: &'static str,
        addr: String,
        #[source]
        source: io::Error,
    },
}

/// Sends sd_notify messages to systemd, or does nothing when not under systemd.
#[derive(Clone, Debug, Default)]
pub struct Notifier {
    target: Option<Arc<Target>>,
    watchdog: Option<Duration>,
}

#[derive(Debug)]
struct Target {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// `NOTIFY_SOCKET` as given, for error messages.
    shown: String,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier::default()
    }

    /// From the environment systemd sets for a `Type=notify` service: `NOTIFY_SOCKET`,
    /// `WATCHDOG_USEC`, `WATCHDOG_PID`. Unset `NOTIFY_SOCKET`: a disabled notifier.
    /// The variables are left in place (removing them is unsound once threads run); with
    /// `NotifyAccess=main`, systemd ignores messages from any child that inherits them.
    pub fn from_env() -> Result<Notifier, NotifyError> {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        let notifier = match socket.as_deref() {
            None => return Ok(Notifier::disabled()),
            Some(s) if s.is_empty() => return Ok(Notifier::disabled()),
            Some(s) => Notifier::connect(s)?,
        };
        let watchdog = watchdog_timeout(usec.as_deref(), pid.as_deref(), std::process::id())?;
        Ok(notifier.with_watchdog(watchdog))
    }

    /// A notifier for an explicit `NOTIFY_SOCKET` value: an absolute path
    /// (`/run/systemd/notify`) or `@name` for a socket in the abstract namespace.
    /// No watchdog; see [`Notifier::with_watchdog`].
    pub fn connect(notify_socket: &OsStr) -> Result<Notifier, NotifyError> {
        let shown = notify_socket.to_string_lossy().into_owned();
        let bytes = notify_socket.as_bytes();
        let addr = match bytes.first() {
            Some(b'@') if bytes.len() > 1 => SocketAddr::from_abstract_name(&bytes[1..]),
            Some(b'/') => SocketAddr::from_pathname(Path::new(notify_socket)),
            _ => return Err(NotifyError::BadAddress(shown)),
        }
        .map_err(|_| NotifyError::BadAddress(shown.clone()))?;
        let socket = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
        socket.set_nonblocking(true).map_err(NotifyError::Socket)?;
        Ok(Notifier {
            target: Some(Arc::new(Target {
                socket,
                addr,
                shown,
            })),
            watchdog: None,
        })
    }

    /// The same notifier with this watchdog timeout (systemd's `WatchdogSec=`).
    pub fn with_watchdog(mut self, timeout: Option<Duration>) -> Notifier {
        self.watchdog = timeout;
        self
    }

    /// Whether messages go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// systemd's watchdog timeout for this process, if it expects pings.
    pub fn watchdog_timeout(&self) -> Option<Duration> {
        self.watchdog.filter(|_| self.is_enabled())
    }

    /// How often to send `WATCHDOG=1`: half the timeout, as sd_watchdog_enabled(3) advises.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog_timeout().map(|t| t / 2)
    }

    /// `READY=1`: startup is complete (send it once every profile is served).
    pub fn ready(&self) -> Result<(), NotifyError> {
        self.send("READY=1", "READY=1")
    }

    /// `READY=1` and a status line in one datagram.
    pub fn ready_with_status(&self, status: &str) -> Result<(), NotifyError> {
        self.send(
            "READY=1",
            &format!("READY=1\n{}", status_assignment(status)),
        )
    }

    /// `STATUS=…`: the one line `systemctl status` shows. Newlines and other control
    /// characters become spaces (a newline would start another assignment).
    pub fn status(&self, status: &str) -> Result<(), NotifyError> {
        self.send("STATUS", &status_assignment(status))
    }

    /// `RELOADING=1` with `MONOTONIC_USEC=` (systemd 253+ matches it against the time of
    /// the reload request; 252 ignores it). Send [`Notifier::ready`] when the reload is
    /// done.
    pub fn reloading(&self) -> Result<(), NotifyError> {
        self.send("RELOADING=1", &reloading_message(monotonic_usec()))
    }

    /// `STOPPING=1`: shutdown has begun.
    pub fn stopping(&self) -> Result<(), NotifyError> {
        self.send("STOPPING=1", "STOPPING=1")
    }

    /// `WATCHDOG=1`: still alive. Send only while the agent really works (see
    /// [`Notifier::run_watchdog`]).
    pub fn watchdog(&self) -> Result<(), NotifyError> {
        self.send("WATCHDOG=1", "WATCHDOG=1")
    }

    /// `EXTEND_TIMEOUT_USEC=…`: ask for this much more time from now to finish starting
    /// (or stopping), e.g. while the Auth API is slow to hand out the first token.
    pub fn extend_timeout(&self, by: Duration) -> Result<(), NotifyError> {
        self.send(
            "EXTEND_TIMEOUT_USEC",
            &format!("EXTEND_TIMEOUT_USEC={}", by.as_micros()),
        )
    }

    /// Sends `WATCHDOG=1` every [`Notifier::watchdog_interval`] (half of `WatchdogSec=`) for
    /// as long as `healthy()` answers `true` within half that interval. When it answers
    /// `false` or not in time, the ping is skipped, so a wedged signer or a stuck event loop
    /// makes systemd restart the agent after `WatchdogSec=`. The check's own limit keeps
    /// two pings of a healthy agent at most three quarters of `WatchdogSec=` apart: with
    /// the whole interval, a slow check could put one just at the deadline. Returns at once when there is no watchdog; otherwise
    /// runs until dropped (spawn it, or select! it against the shutdown token).
    pub async fn run_watchdog<F, Fut>(&self, mut healthy: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let Some(period) = self.watchdog_interval() else {
            return;
        };
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let limit = period / 2;
            match tokio::time::timeout(limit, healthy()).await {
                Ok(true) => {
                    if let Err(e) = self.watchdog() {
                        tracing::warn!(error = %e, "watchdog ping not delivered");
                    }
                }
                Ok(false) => tracing::warn!("agent unhealthy: watchdog ping withheld"),
                Err(_) => tracing::warn!(
                    after_ms = limit.as_millis() as u64,
                    "health check did not answer: watchdog ping withheld"
                ),
            }
        }
    }

    /// Sends one raw message (newline-separated `KEY=VALUE` assignments).
    pub fn send(&self, what: &'static str, message: &str) -> Result<(), NotifyError> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        target
            .socket
            .send_to_addr(message.as_bytes(), &target.addr)
            .map(|_| ())
            .map_err(|source| NotifyError::Send {
                what,
                addr: target.shown.clone(),
                source,
            })
    }
}

/// The watchdog timeout for process `own_pid` from `WATCHDOG_USEC` and `WATCHDOG_PID`, as
/// sd_watchdog_enabled(3) reads them: none when `WATCHDOG_USEC` is unset, or when
/// `WATCHDOG_PID` is set and names another process (the variables were inherited).
pub fn watchdog_timeout(
    watchdog_usec: Option<&str>,
    watchdog_pid: Option<&str>,
    own_pid: u32,
) -> Result<Option<Duration>, NotifyError> {
    let Some(usec) = watchdog_usec else {
        return Ok(None);
    };
    if let Some(pid) = watchdog_pid {
        let pid: u32 = pid
            .trim()
            .parse()
            .map_err(|_| NotifyError::BadWatchdogPid(pid.to_owned()))?;
        if pid != own_pid {
            return Ok(None);
        }
    }
    match usec.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(Some(Duration::from_micros(n))),
        _ => Err(NotifyError::BadWatchdogUsec(usec.to_owned())),
    }
}

/// `STATUS=<text>` with control characters replaced and the length capped.
fn status_assignment(text: &str) -> String {
    let mut out = String::with_capacity(7 + text.len().min(MAX_STATUS_LEN));
    out.push_str("STATUS=");
    let mut len = 0;
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        len += c.len_utf8();
        if len > MAX_STATUS_LEN {
            break;
        }
        out.push(c);
    }
    out
}

fn reloading_message(monotonic_usec: Option<u64>) -> String {
    match monotonic_usec {
        Some(us) => format!("RELOADING=1\nMONOTONIC_USEC={us}"),
        None => "RELOADING=1".to_owned(),
    }
}

/// CLOCK_MONOTONIC in microseconds, which is what `std::time::Instant` reads on Linux.
/// `std` exposes no raw value and this crate has no syscall crate or `unsafe`, so it is
/// read from `Instant`'s `Debug` form (`Instant { tv_sec: 12, tv_nsec: 345 }`). That form
/// is not a stable API: if it ever changes, this returns `None` and `MONOTONIC_USEC=` is
/// left out, which systemd accepts (a unit test notices the change).
fn monotonic_usec() -> Option<u64> {
    parse_instant_debug(&format!("{:?}", Instant::now()))
}

fn parse_instant_debug(debug: &str) -> Option<u64> {
    let field = |name: &str| -> Option<u64> {
        let rest = &debug[debug.find(name)? + name.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    let secs = field("tv_sec: ")?;
    let nanos = field("tv_nsec: ")?;
    if nanos >= 1_000_000_000 {
        return None;
    }
    secs.checked_mul(1_000_000)?.checked_add(nanos / 1_000)
}

/// One profile's state as a short status text, e.g. `prod: token valid 54m` or
/// `uat: auth API unreachable, retrying in 8s`. Join several with [`join_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusLine<'a> {
    /// The profile name.
    pub profile: &'a str,
    /// How long the current access token stays valid, if there is one.
    pub token_valid_for: Option<Duration>,
    /// What went wrong last, in words fit for an operator (no secrets).
    pub error: Option<&'a str>,
    /// When the next attempt is due.
    pub retry_in: Option<Duration>,
}

impl fmt::Display for StatusLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.profile)?;
        match (self.error, self.token_valid_for) {
            (Some(error), _) => f.write_str(error)?,
            (None, Some(valid)) => write!(f, "token valid {}", short_duration(valid))?,
            (None, None) => f.write_str("no token yet")?,
        }
        if let Some(retry) = self.retry_in {
            write!(f, ", retrying in {}", short_duration(retry))?;
        }
        if let (Some(_), Some(valid)) = (self.error, self.token_valid_for) {
            write!(f, " (token valid {})", short_duration(valid))?;
        }
        Ok(())
    }
}

/// Several profiles' status lines as one `STATUS=` text, separated by `"; "`.
pub fn join_status<'a>(lines: impl IntoIterator<Item = StatusLine<'a>>) -> String {
    lines
        .into_iter()
        .map(|l| l.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// `8s`, `1m30s`, `54m`, `2h5m`: whole seconds below ten minutes, whole minutes above
/// (rounded down, so a token is never shown as valid longer than it is).
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=599 if s % 60 != 0 => format!("{}m{}s", s / 60, s % 60),
        60..=3599 => format!("{}m", s / 60),
        _ if (s / 60) % 60 == 0 => format!("{}h", s / 3600),
        _ => format!("{}h{}m", s / 3600, (s / 60) % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    /// A bound receiving socket in a fresh temp dir, and a notifier aimed at it.
    fn pair() -> (tempfile::TempDir, UnixDatagram, Notifier) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier::connect(path.as_os_str()).unwrap();
        (dir, rx, n)
    }

    fn recv(rx: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = rx.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    fn pending(rx: &UnixDatagram) -> Vec<String> {
        rx.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = rx.recv(&mut buf) {
            out.push(String::from_utf8(buf[..n].to_vec()).unwrap());
        }
        out
    }

    #[test]
    fn sends_exact_datagrams_to_a_path_socket() {
        let (_dir, rx, n) = pair();
        assert!(n.is_enabled());
        n.ready().unwrap();
        assert_eq!(recv(&rx), "READY=1");
        n.status("prod: token valid 54m").unwrap();
        assert_eq!(recv(&rx), "STATUS=prod: token valid 54m");
        n.ready_with_status("serving").unwrap();
        assert_eq!(recv(&rx), "READY=1\nSTATUS=serving");
        n.stopping().unwrap();
        assert_eq!(recv(&rx), "STOPPING=1");
        n.watchdog().unwrap();
        assert_eq!(recv(&rx), "WATCHDOG=1");
        n.extend_timeout(Duration::from_secs(90)).unwrap();
        assert_eq!(recv(&rx), "EXTEND_TIMEOUT_USEC=90000000");
        n.send("raw", "FDSTORE=0").unwrap();
        assert_eq!(recv(&rx), "FDSTORE=0");
    }

    #[test]
    fn reloading_carries_a_monotonic_timestamp() {
        let (_dir, rx, n) = pair();
        let before = monotonic_usec().expect("Instant's Debug form changed: fix parse");
        n.reloading().unwrap();
        let msg = recv(&rx);
        let after = monotonic_usec().unwrap();
        let (first, second) = msg.split_once('\n').unwrap();
        assert_eq!(first, "RELOADING=1");
        let us: u64 = second
            .strip_prefix("MONOTONIC_USEC=")
            .unwrap()
            .parse()
            .unwrap();
        assert!(before <= us && us <= after, "{before} <= {us} <= {after}");
        assert_eq!(reloading_message(None), "RELOADING=1");
    }

    #[test]
    fn monotonic_usec_tracks_instant() {
        let t0 = Instant::now();
        let a = monotonic_usec().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let b = monotonic_usec().unwrap();
        let elapsed = t0.elapsed().as_micros() as u64;
        assert!(
            b - a >= 20_000 && b - a <= elapsed + 1_000,
            "{a} {b} {elapsed}"
        );
        assert_eq!(
            parse_instant_debug("Instant { tv_sec: 12, tv_nsec: 345678 }"),
            Some(12_000_345)
        );
        assert_eq!(parse_instant_debug("Instant { t: 5 }"), None);
        assert_eq!(
            parse_instant_debug("Instant { tv_sec: 1, tv_nsec: 1000000000 }"),
            None
        );
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!(
            "tm-agent-notify-test-{}-{:?}",
            std::process::id(),
            Instant::now()
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier::connect(OsStr::new(&format!("@{name}"))).unwrap();
        n.ready().unwrap();
        assert_eq!(recv(&rx), "READY=1");
    }

    #[test]
    fn status_text_cannot_inject_assignments() {
        let (_dir, rx, n) = pair();
        n.status("oops\nREADY=1\r\tx").unwrap();
        assert_eq!(recv(&rx), "STATUS=oops READY=1  x");
        let long = "é".repeat(MAX_STATUS_LEN);
        n.status(&long).unwrap();
        let got = recv(&rx);
        let text = got.strip_prefix("STATUS=").unwrap();
        assert_eq!(text.len(), MAX_STATUS_LEN);
        assert!(text.chars().all(|c| c == 'é'));
    }

    #[test]
    fn disabled_notifier_is_a_no_op() {
        let n = Notifier::disabled();
        assert!(!n.is_enabled());
        n.ready().unwrap();
        n.status("x").unwrap();
        n.reloading().unwrap();
        n.stopping().unwrap();
        n.watchdog().unwrap();
        let n = n.with_watchdog(Some(Duration::from_secs(30)));
        assert_eq!(n.watchdog_interval(), None, "no socket, no pings");
    }

    #[test]
    fn bad_addresses_are_rejected() {
        for bad in ["", "@", "relative/path", "vsock:2:1234"] {
            let e = Notifier::connect(OsStr::new(bad)).unwrap_err();
            assert!(matches!(e, NotifyError::BadAddress(_)), "{bad}: {e}");
        }
        let too_long = format!("/{}", "x".repeat(200));
        assert!(matches!(
            Notifier::connect(OsStr::new(&too_long)),
            Err(NotifyError::BadAddress(_))
        ));
    }

    #[test]
    fn send_failure_is_reported_not_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone");
        let n = Notifier::connect(path.as_os_str()).unwrap();
        let e = n.ready().unwrap_err();
        assert!(e.to_string().contains("READY=1"), "{e}");
        // A full queue answers at once instead of blocking the caller.
        let (_dir, _rx, n) = pair();
        let started = Instant::now();
        let mut refused = false;
        for _ in 0..100_000 {
            if n.watchdog().is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused, "a receiver that never reads must fill up");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn watchdog_env_parsing() {
        let own = 4242;
        assert_eq!(watchdog_timeout(None, None, own).unwrap(), None);
        assert_eq!(
            watchdog_timeout(Some("30000000"), None, own).unwrap(),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_timeout(Some("30000000"), Some("4242"), own).unwrap(),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_timeout(Some("30000000"), Some("1"), own).unwrap(),
            None,
            "inherited from a parent: not ours"
        );
        assert!(matches!(
            watchdog_timeout(Some("0"), None, own),
            Err(NotifyError::BadWatchdogUsec(_))
        ));
        assert!(matches!(
            watchdog_timeout(Some("soon"), None, own),
            Err(NotifyError::BadWatchdogUsec(_))
        ));
        assert!(matches!(
            watchdog_timeout(Some("1"), Some("me"), own),
            Err(NotifyError::BadWatchdogPid(_))
        ));
        let (_dir, _rx, n) = pair();
        let n = n.with_watchdog(Some(Duration::from_secs(30)));
        assert_eq!(n.watchdog_timeout(), Some(Duration::from_secs(30)));
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(15)));
    }

    #[tokio::test(start_paused = true)]
    async fn watchdog_pings_only_while_healthy() {
        let (_dir, rx, n) = pair();
        let n = n.with_watchdog(Some(Duration::from_secs(2)));
        // Ticks at 0s, 1s, 2s, 3s, 4s, 5s; a check has 0.5 s. The check at 1s says no; the
        // one at 2s answers yes after 0.7 s, too late (a ping then would be 2.7 s after the
        // last one, near systemd's deadline); the one at 3s never answers: pings at 0s, 4s
        // and 5s.
        let mut calls = 0;
        let run = n.run_watchdog(|| {
            calls += 1;
            let call = calls;
            async move {
                match call {
                    2 => false,
                    3 => {
                        tokio::time::sleep(Duration::from_millis(700)).await;
                        true
                    }
                    4 => std::future::pending().await,
                    _ => true,
                }
            }
        });
        let _ = tokio::time::timeout(Duration::from_millis(5_200), run).await;
        assert_eq!(pending(&rx), ["WATCHDOG=1"; 3]);
    }

    #[tokio::test]
    async fn no_watchdog_returns_at_once() {
        let (_dir, rx, n) = pair();
        n.run_watchdog(|| async { true }).await;
        Notifier::disabled()
            .with_watchdog(Some(Duration::from_secs(1)))
            .run_watchdog(|| async { true })
            .await;
        assert!(pending(&rx).is_empty());
    }

    #[test]
    fn status_lines() {
        let line = |profile, valid: Option<u64>, error, retry: Option<u64>| {
            StatusLine {
                profile,
                token_valid_for: valid.map(Duration::from_secs),
                error,
                retry_in: retry.map(Duration::from_secs),
            }
            .to_string()
        };
        assert_eq!(
            line("prod", Some(54 * 60 + 59), None, None),
            "prod: token valid 54m"
        );
        assert_eq!(
            line("uat", None, Some("auth API unreachable"), Some(8)),
            "uat: auth API unreachable, retrying in 8s"
        );
        assert_eq!(
            line("prod", Some(600), Some("auth API returned 503"), Some(90)),
            "prod: auth API returned 503, retrying in 1m30s (token valid 10m)"
        );
        assert_eq!(line("dev", None, None, None), "dev: no token yet");
        assert_eq!(
            line("dev", None, None, Some(1)),
            "dev: no token yet, retrying in 1s"
        );
        let joined = join_status([
            StatusLine {
                profile: "prod",
                token_valid_for: Some(Duration::from_secs(3300)),
                error: None,
                retry_in: None,
            },
            StatusLine {
                profile: "uat",
                token_valid_for: None,
                error: Some("auth API unreachable"),
                retry_in: Some(Duration::from_millis(8_400)),
            },
        ]);
        assert_eq!(
            joined,
            "prod: token valid 55m; uat: auth API unreachable, retrying in 8s"
        );
    }

    #[test]
    fn short_durations() {
        let s = |secs| short_duration(Duration::from_secs(secs));
        assert_eq!(s(0), "0s");
        assert_eq!(s(59), "59s");
        assert_eq!(s(60), "1m");
        assert_eq!(s(90), "1m30s");
        assert_eq!(s(599), "9m59s");
        assert_eq!(s(601), "10m");
        assert_eq!(s(3599), "59m");
        assert_eq!(s(3600), "1h");
        assert_eq!(s(3600 + 5 * 60 + 7), "1h5m");
        assert_eq!(short_duration(Duration::from_millis(900)), "0s");
    }
}
