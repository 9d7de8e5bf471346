//! Fixtures for end-to-end tests of the real `tm-agent` binary run as a daemon: a child
//! process guard that collects output and is killed on drop, a config file writer, a key
//! generated in a SoftHSM token through the CLI, the CLI client run as a process, an
//! sd_notify receiver the test binds itself, and bounded polling.
//!
//! Only std, `tm_agent`'s public client, and the SoftHSM fixture: the simulator is wired in by
//! the test file (it passes URLs and the CA file in), so that every test binary that includes
//! `common` still compiles.
//!
//! Threading: each [`Proc`] has one reader thread per piped stream and each
//! [`NotifyListener`] one receiving thread; all stop on their own when the stream closes or
//! the fixture is dropped.
#![allow(dead_code)]

use std::io::{BufRead as _, BufReader, Read as _};
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use p256::ecdsa::VerifyingKey;
use p256::pkcs8::DecodePublicKey as _;

use super::softhsm::{SoftHsm, MODULE};

/// The agent binary under test.
pub const AGENT: &str = env!("CARGO_BIN_EXE_tm-agent");

/// Environment variables that would change how the agent or the CLI behaves if the test
/// runner happened to have them (e.g. when run under systemd).
pub const HOSTILE_ENV: &[&str] = &[
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "CREDENTIALS_DIRECTORY",
    "JOURNAL_STREAM",
    "TM_AGENT_SOCK",
    "TM_AGENT_PROFILE",
    "RUST_LOG",
    "PKCS11SPY",
    "PKCS11SPY_OUTPUT",
];

/// Removes [`HOSTILE_ENV`] from `cmd`.
pub fn clean_env(cmd: &mut Command) -> &mut Command {
    for name in HOSTILE_ENV {
        cmd.env_remove(name);
    }
    cmd
}

/// The uid of this test process (from `/proc/self`, which the process owns; no libc).
pub fn uid() -> u32 {
    std::fs::metadata("/proc/self")
        .expect("stat /proc/self")
        .uid()
}

/// Generates a P-256 key labelled `label` in the fixture's token with `tm-agent key
/// generate`, and returns its public key as `tm-agent key public` prints it.
pub fn generate_key(hsm: &SoftHsm, label: &str) -> VerifyingKey {
    let key_cmd = |args: &[&str]| {
        let mut cmd = hsm.command(AGENT);
        clean_env(&mut cmd)
            .arg("key")
            .args(args)
            .args(["--module", MODULE, "--token-label", &hsm.label])
            .arg("--pin-file")
            .arg(&hsm.pin_file)
            .stdin(Stdio::null())
            .output()
            .expect("run tm-agent key")
    };
    let out = key_cmd(&["generate", "--label", label]);
    assert_success(&out, "tm-agent key generate");
    let out = key_cmd(&["public", "--key-label", label]);
    let pem = assert_success(&out, "tm-agent key public");
    VerifyingKey::from_public_key_pem(&pem).expect("key public prints a PEM public key")
}

/// The uncompressed SEC1 point of `key` (what `ring` verifies with).
pub fn uncompressed(key: &VerifyingKey) -> Vec<u8> {
    key.to_encoded_point(false).as_bytes().to_vec()
}

/// Asserts that `out` is a success and returns its stdout.
#[track_caller]
pub fn assert_success(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("UTF-8 output")
}

/// A config file for `tm-agent run`/`check`: one PKCS#11 key in a SoftHSM token and one
/// profile named [`AgentConfig::PROFILE`] against an Auth API at `base_url`.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub socket: PathBuf,
    /// The PKCS#11 module (SoftHSM, or pkcs11-spy in front of it).
    pub module: PathBuf,
    pub token_label: String,
    pub key_label: String,
    /// The `pin = …` value as TOML, e.g. `{ file = "/x/pin" }`.
    pub pin: String,
    pub key_id: String,
    pub base_url: String,
    pub ca_file: Option<PathBuf>,
    pub log_level: String,
    /// Extra lines for `[agent]`.
    pub agent_extra: String,
    /// Extra lines for `[profiles.p]`.
    pub profile_extra: String,
    /// The `[[access]]` tables (or anything else appended at the end).
    pub access: String,
}

impl AgentConfig {
    /// The profile's name.
    pub const PROFILE: &'static str = "p";

    /// A config for the fixture's token and key `key_label` (PIN from its pin file),
    /// socket `socket`, API at `base_url` trusting `ca_file`; every op (and `stamp`) for
    /// this process's uid; short backoff so that tests recover quickly.
    pub fn new(
        hsm: &SoftHsm,
        key_label: &str,
        socket: &Path,
        key_id: &str,
        base_url: &str,
        ca_file: Option<&Path>,
    ) -> AgentConfig {
        AgentConfig {
            socket: socket.to_path_buf(),
            module: PathBuf::from(MODULE),
            token_label: hsm.label.clone(),
            key_label: key_label.to_string(),
            pin: format!("{{ file = {} }}", toml_str(&hsm.pin_file)),
            key_id: key_id.to_string(),
            base_url: base_url.to_string(),
            ca_file: ca_file.map(Path::to_path_buf),
            log_level: "debug".into(),
            agent_extra: String::new(),
            profile_extra: "backoff_min_secs = 0.2\nbackoff_max_secs = 1\n".into(),
            access: access_rule(uid(), &["*"]) + &access_rule(uid(), &["sign_challenge", "stamp"]),
        }
    }

    /// The TOML text.
    pub fn to_toml(&self) -> String {
        let ca = self
            .ca_file
            .as_ref()
            .map(|p| format!("ca_file = {}\n", toml_str(p)))
            .unwrap_or_default();
        format!(
            r#"[agent]
log_level = "{log_level}"
shutdown_grace_secs = 3
{agent_extra}
[socket]
path = {socket}
mode = 0o660

[keys.k]
backend = "pkcs11"
module = {module}
token_label = "{token}"
key_label = "{key}"
pin = {pin}
sessions = 2

[profiles.{profile}]
key = "k"
key_id = "{key_id}"
base_url = "{base_url}"
{ca}connect_timeout_secs = 2
request_timeout_secs = 5
{profile_extra}
{access}"#,
            log_level = self.log_level,
            agent_extra = self.agent_extra,
            socket = toml_str(&self.socket),
            module = toml_str(&self.module),
            token = self.token_label,
            key = self.key_label,
            pin = self.pin,
            profile = Self::PROFILE,
            key_id = self.key_id,
            base_url = self.base_url,
            profile_extra = self.profile_extra,
            access = self.access,
        )
    }

    /// Writes the TOML text to `path` and returns `path`.
    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.to_toml()).expect("write config");
        path.to_path_buf()
    }
}

/// An `[[access]]` table granting `ops` on every profile to `uid` (`["*"]`: every op but
/// `sign_challenge` and `stamp`).
pub fn access_rule(uid: u32, ops: &[&str]) -> String {
    let ops = if ops == ["*"] {
        "\"*\"".to_string()
    } else {
        format!(
            "[{}]",
            ops.iter()
                .map(|o| format!("\"{o}\""))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    format!("\n[[access]]\nuid = {uid}\nops = {ops}\nprofiles = \"*\"\n")
}

/// A path as a TOML basic string.
pub fn toml_str(path: &Path) -> String {
    let s = path.to_str().expect("UTF-8 path");
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A child process whose stdout lines and stderr text are collected by reader threads; it
/// is killed (SIGKILL) and reaped on drop, so a failing test leaks no process. When the test
/// is panicking, drop prints what the process wrote.
pub struct Proc {
    pub name: String,
    child: Child,
    spawned: Instant,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` with stdin null (unless the caller set it), stdout and stderr piped.
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let spawned = Instant::now();
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {name}: {e}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            let lines = Arc::clone(&stdout);
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    match line {
                        Ok(line) => lines.lock().unwrap().push(line),
                        Err(_) => break,
                    }
                }
            }));
        }
        if let Some(mut err) = child.stderr.take() {
            let text = Arc::clone(&stderr);
            readers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                loop {
                    match err.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => text
                            .lock()
                            .unwrap()
                            .push_str(&String::from_utf8_lossy(&buf[..n])),
                    }
                }
            }));
        }
        Proc {
            name: name.to_string(),
            child,
            spawned,
            stdout,
            stderr,
            readers,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// When the process was spawned.
    pub fn spawned(&self) -> Instant {
        self.spawned
    }

    /// Sends `signal` (`TERM`, `HUP`, …) with kill(1).
    pub fn signal(&self, signal: &str) {
        send_signal(self.pid(), signal);
    }

    /// SIGTERM, then a clean exit (status 0) within 5 s; its stderr if not.
    pub fn stop_cleanly(&mut self) {
        self.signal("TERM");
        let code = self.expect_exit(Duration::from_secs(5));
        assert_eq!(
            code,
            0,
            "{} did not stop cleanly:\n{}",
            self.name,
            self.stderr()
        );
    }

    /// The stdout lines so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// The stderr text so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The exit status, if the process has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Waits at most `timeout` for the process to exit, then for its output to be read.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while self.try_status().is_none() {
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.join_readers();
        self.status
    }

    /// Waits for exit (at most `timeout`) and returns the exit code; panics with the
    /// process's output if it does not exit or dies of a signal.
    #[track_caller]
    pub fn expect_exit(&mut self, timeout: Duration) -> i32 {
        match self.wait_exit(timeout) {
            Some(status) => status.code().unwrap_or_else(|| {
                panic!(
                    "{} died of a signal ({status}); stderr:\n{}",
                    self.name,
                    self.stderr()
                )
            }),
            None => panic!(
                "{} did not exit within {timeout:?}; stderr:\n{}",
                self.name,
                self.stderr()
            ),
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
        self.join_readers();
    }

    fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }

    /// Waits until `condition` holds, failing early (with the output) when the process exits.
    #[track_caller]
    pub fn wait_while_running(
        &mut self,
        timeout: Duration,
        what: &str,
        mut condition: impl FnMut(&Proc) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            if condition(self) {
                return;
            }
            if let Some(status) = self.try_status() {
                self.join_readers();
                panic!(
                    "{} exited ({status}) before {what}; stderr:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not reach {what} within {timeout:?}; stderr:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- {} (pid {}, {:?}) stdout ---\n{}\n--- {} stderr ---\n{}",
                self.name,
                self.child.id(),
                self.status,
                self.stdout_lines().join("\n"),
                self.name,
                self.stderr()
            );
        }
    }
}

/// Sends `signal` to `pid` with kill(1) (no `unsafe`, no syscall crate).
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill(1)");
    assert!(status.success(), "kill -{signal} {pid} failed: {status}");
}

/// A command that runs the agent: `tm-agent run --config <config>` with the fixture's
/// `SOFTHSM2_CONF` and a clean environment.
pub fn agent_command(hsm: &SoftHsm, config: &Path) -> Command {
    let mut cmd = hsm.command(AGENT);
    clean_env(&mut cmd)
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null());
    cmd
}

/// Starts the agent and waits until its socket answers `ping` (at most `timeout`).
pub fn start_agent(hsm: &SoftHsm, config: &Path, socket: &Path, timeout: Duration) -> Proc {
    let mut agent = Proc::spawn("tm-agent run", &mut agent_command(hsm, config));
    wait_for_ping(&mut agent, socket, timeout);
    agent
}

/// Waits until `socket` answers `ping`, failing early when `agent` exits.
#[track_caller]
pub fn wait_for_ping(agent: &mut Proc, socket: &Path, timeout: Duration) {
    agent.wait_while_running(timeout, "answering ping", |_| ping(socket));
}

/// Whether the agent at `socket` answers `ping` (through the library's blocking client).
pub fn ping(socket: &Path) -> bool {
    match tm_agent::client::Client::connect(socket) {
        Ok(mut client) => {
            let _ = client.set_timeout(Some(Duration::from_secs(2)));
            client.ping().is_ok()
        }
        Err(_) => false,
    }
}

/// Runs the CLI client: `tm-agent <args…> --socket <socket>`, stdin from `stdin`.
pub fn cli(socket: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new(AGENT);
    clean_env(&mut cmd).args(args).arg("--socket").arg(socket);
    output_with_stdin(&mut cmd, stdin)
}

/// Runs `cmd` to its end with stdout and stderr collected; `stdin` is written to its
/// standard input (closed after), or it has none.
pub fn output_with_stdin(cmd: &mut Command, stdin: Option<&[u8]>) -> Output {
    use std::io::Write as _;
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn the command");
    if let Some(bytes) = stdin {
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(bytes)
            .expect("write stdin");
    }
    child.wait_with_output().expect("wait for the command")
}

/// Runs the CLI client and returns its stdout; panics with the output on failure.
#[track_caller]
pub fn cli_ok(socket: &Path, args: &[&str]) -> String {
    assert_success(
        &cli(socket, args, None),
        &format!("tm-agent {}", args.join(" ")),
    )
}

/// Polls `condition` every 25 ms for at most `timeout`; returns whether it came true.
pub fn poll(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// One sd_notify datagram as received.
#[derive(Debug, Clone)]
pub struct Notification {
    pub at: Instant,
    pub text: String,
}

impl Notification {
    /// Whether the datagram carries the assignment `line` (e.g. `READY=1`).
    pub fn has(&self, line: &str) -> bool {
        self.text.lines().any(|l| l == line)
    }

    /// The `STATUS=` value, if any.
    pub fn status(&self) -> Option<&str> {
        self.text.lines().find_map(|l| l.strip_prefix("STATUS="))
    }
}

/// Called on the receiving thread with each datagram as it arrives.
pub type NotifyHook = Box<dyn Fn(&str) + Send>;

/// A `NOTIFY_SOCKET` the test binds: a datagram socket in its own temp dir, with a thread
/// that records every datagram with its arrival time.
pub struct NotifyListener {
    pub path: PathBuf,
    messages: Arc<Mutex<Vec<Notification>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl NotifyListener {
    pub fn bind() -> NotifyListener {
        Self::bind_with(Box::new(|_| {}))
    }

    /// Binds and calls `hook` with each datagram on arrival (before it is recorded).
    pub fn bind_with(hook: NotifyHook) -> NotifyListener {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let messages = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let messages = Arc::clone(&messages);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = socket.recv(&mut buf) {
                        let at = Instant::now();
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        hook(&text);
                        messages.lock().unwrap().push(Notification { at, text });
                    }
                }
            })
        };
        NotifyListener {
            path,
            messages,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// Every datagram so far, in arrival order.
    pub fn messages(&self) -> Vec<Notification> {
        self.messages.lock().unwrap().clone()
    }

    /// The first datagram (at index `from` or later) carrying `line`.
    pub fn find(&self, from: usize, line: &str) -> Option<(usize, Notification)> {
        self.messages()
            .into_iter()
            .enumerate()
            .skip(from)
            .find(|(_, n)| n.has(line))
    }

    /// Waits until a datagram at index `from` or later carries `line`; returns it and its
    /// index. Fails early, with the agent's output, when `agent` exits.
    #[track_caller]
    pub fn wait_for(
        &self,
        agent: &mut Proc,
        from: usize,
        line: &str,
        timeout: Duration,
    ) -> (usize, Notification) {
        agent.wait_while_running(timeout, &format!("sending {line}"), |_| {
            self.find(from, line).is_some()
        });
        self.find(from, line).expect("just found")
    }

    /// How many datagrams carry `line`.
    pub fn count(&self, line: &str) -> usize {
        self.messages().iter().filter(|n| n.has(line)).count()
    }

    /// The arrival times of the datagrams carrying `line`.
    pub fn times(&self, line: &str) -> Vec<Instant> {
        self.messages()
            .iter()
            .filter(|n| n.has(line))
            .map(|n| n.at)
            .collect()
    }

    /// Every `STATUS=` value so far.
    pub fn statuses(&self) -> Vec<String> {
        self.messages()
            .iter()
            .filter_map(|n| n.status().map(str::to_string))
            .collect()
    }

    /// The datagrams, one per line, for failure messages.
    pub fn transcript(&self) -> String {
        let messages = self.messages();
        let start = messages.first().map(|m| m.at);
        messages
            .iter()
            .map(|m| {
                format!(
                    "+{:>6} ms  {}",
                    start.map_or(0, |s| m.at.duration_since(s).as_millis()),
                    m.text.replace('\n', " | ")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for NotifyListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
