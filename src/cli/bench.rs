//! `tm-agent bench`: a load generator for a running agent, and the other measurements that
//! `scripts/bench.sh` puts next to it (see `docs/performance.md`).
//!
//! The default mode: N connections each send one op (`token`, `sign_challenge` or `ping`)
//! back to back (or with a pipeline window) for a bounded duration after a warm-up, and
//! every round trip's latency is recorded. Then the same load runs against a bare
//! Unix-socket echo server that the bench starts itself on a temporary socket (its own
//! runtime, its own threads), so results read as ratios to the cheapest possible round trip
//! on this machine.
//!
//! The other modes, one at a time:
//! - `--raw-pkcs11 --config FILE`: in-process signing with the agent's key through the
//!   PKCS#11 backend's workers directly (`C_SignInit` + `C_Sign`, no actor, no socket), on
//!   `-c` threads each with its own session: the floor the agent's `sign_challenge` is
//!   compared with.
//! - `--inline-server SESSIONS --config FILE`: the same load against a bare socket server
//!   that signs each request on the thread that read it, one thread per session
//!   (`inline_server`): the floor of any socket-served signer on this machine, echo + sign.
//! - `--ssh-agent SOCK`: the same load shape against an OpenSSH agent (its wire protocol:
//!   sign requests with the first ECDSA P-256 identity), for comparison.
//! - `--idle N --pid PID`: holds N idle connections (each answered one `ping`) for the
//!   duration and reads the agent's resident memory (`VmRSS`) before and while they are open.
//! - `--startup --config FILE`: starts `tm-agent run` on that config `--runs` times and
//!   measures spawn → first `ping` and spawn → first `token`, next to the `ready after_ms`
//!   that the agent logs.
//!
//! Threads: the load runs on a tokio runtime with `--threads` workers; the echo server on a
//! second runtime; `--raw-pkcs11` on plain threads. Everything stops by itself at the
//! deadline; durations are capped.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Args, ValueEnum};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

mod busy_poll;
mod inline_server;
pub use inline_server::InlineServer;

/// The longest run allowed, in seconds (warm-up included).
pub const MAX_SECS: u64 = 300;

/// `tm-agent bench` options.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// The agent's socket [default: $TM_AGENT_SOCK, else /run/tm-agent/agent.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The profile for `token` and `sign_challenge` [default: $TM_AGENT_PROFILE, else the
    /// only profile you may use]
    #[arg(long, short = 'p', value_name = "NAME")]
    pub profile: Option<String>,
    /// The op to send.
    #[arg(long, value_enum, default_value_t = BenchOp::Token)]
    pub op: BenchOp,
    /// Concurrent connections.
    #[arg(long, short = 'c', default_value_t = 32)]
    pub connections: usize,
    /// Measured seconds (at most 300 with the warm-up).
    #[arg(long, short = 'd', default_value_t = 5)]
    pub duration: u64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1)]
    pub warmup: u64,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 1)]
    pub pipeline: usize,
    /// Skip the echo baseline.
    #[arg(long)]
    pub no_baseline: bool,
    /// Worker threads of the load generator (and of the echo server).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// One connection (-c 1, --pipeline 1) whose client spins on its socket instead of
    /// sleeping until the reply comes; the echo baseline and --inline-server 1 spin too
    /// (the agent does not). Shows what the wake-ups cost on this machine; burns a CPU.
    #[arg(long)]
    pub busy_poll: bool,
}

impl Default for BenchArgs {
    fn default() -> Self {
        BenchArgs {
            socket: None,
            profile: None,
            op: BenchOp::Token,
            connections: 32,
            duration: 5,
            warmup: 1,
            pipeline: 1,
            no_baseline: false,
            threads: 2,
            json: false,
            busy_poll: false,
        }
    }
}

/// The op the bench sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BenchOp {
    Token,
    #[value(alias = "sign_challenge")]
    SignChallenge,
    Ping,
}

/// One run's results.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    /// Round trips completed in the measured window.
    pub requests: u64,
    /// Replies that were errors (or lines that were not replies).
    pub errors: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub op: BenchOp,
    pub connections: usize,
    pub pipeline: usize,
    /// The client (and the echo baseline) busy-polled: `--busy-poll`.
    pub busy_poll: bool,
    pub agent: Measurement,
    pub baseline: Option<Measurement>,
}

impl BenchReport {
    /// Agent p50 latency / echo p50 latency.
    pub fn p50_ratio(&self) -> Option<f64> {
        self.baseline
            .as_ref()
            .map(|b| self.agent.p50_us / b.p50_us.max(0.001))
    }

    /// Agent throughput / echo throughput.
    pub fn throughput_ratio(&self) -> Option<f64> {
        self.baseline
            .as_ref()
            .map(|b| self.agent.per_second / b.per_second.max(0.001))
    }
}

/// `tm-agent bench`: the load options, and the other modes.
#[derive(Debug, Clone, Args)]
pub struct BenchCommand {
    #[command(flatten)]
    pub load: BenchArgs,
    #[command(flatten)]
    pub modes: ModeArgs,
}

/// The measurements other than the load against the agent (at most one at a time).
#[derive(Debug, Clone, Default, Args)]
pub struct ModeArgs {
    /// Sign in-process with the key of --config through the PKCS#11 backend directly
    /// (C_SignInit + C_Sign, no actor, no socket) on -c threads, each with its own session.
    #[arg(long, requires = "config")]
    pub raw_pkcs11: bool,
    /// Sign in-process with the key of --config through a signer Handle (the agent's actor)
    /// with this many sessions, from -c concurrent tasks: the actor's hand-off without the
    /// socket.
    #[arg(long, value_name = "SESSIONS", requires = "config")]
    pub handle: Option<usize>,
    /// Load a bare socket server that signs with the key of --config on the thread that
    /// reads each request, with this many sessions (one thread each): the floor of any
    /// socket-served signer, to compare `sign_challenge` and --raw-pkcs11 with.
    #[arg(long, value_name = "SESSIONS", requires = "config")]
    pub inline_server: Option<usize>,
    /// Load an OpenSSH agent at this socket instead: sign requests with its first ECDSA
    /// P-256 identity, -c connections.
    #[arg(long, value_name = "SOCK")]
    pub ssh_agent: Option<PathBuf>,
    /// Hold this many idle connections to the agent (each answered one ping) for the
    /// duration, and report the resident memory of --pid before and while they are open.
    #[arg(long, value_name = "N", requires = "pid")]
    pub idle: Option<usize>,
    /// Start `tm-agent run --config FILE` --runs times; measure spawn → first ping and
    /// spawn → first token (the config's socket must not be in use).
    #[arg(long, requires = "config")]
    pub startup: bool,
    /// The agent config (--raw-pkcs11: where the key is; --startup: what to run).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The key of --config for --raw-pkcs11 [default: the only pkcs11 key].
    #[arg(long, value_name = "NAME")]
    pub key: Option<String>,
    /// The agent's process id, for --idle.
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
    /// Agent starts for --startup.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
}

enum Mode {
    Agent,
    RawPkcs11,
    Handle(usize),
    InlineServer(usize),
    SshAgent(PathBuf),
    Idle(usize),
    Startup,
}

impl ModeArgs {
    fn mode(&self) -> anyhow::Result<Mode> {
        let mut modes = Vec::new();
        if self.raw_pkcs11 {
            modes.push(Mode::RawPkcs11);
        }
        if let Some(sessions) = self.handle {
            modes.push(Mode::Handle(sessions));
        }
        if let Some(sessions) = self.inline_server {
            modes.push(Mode::InlineServer(sessions));
        }
        if let Some(sock) = &self.ssh_agent {
            modes.push(Mode::SshAgent(sock.clone()));
        }
        if let Some(n) = self.idle {
            modes.push(Mode::Idle(n));
        }
        if self.startup {
            modes.push(Mode::Startup);
        }
        match modes.len() {
            0 => Ok(Mode::Agent),
            1 => Ok(modes.remove(0)),
            _ => {
                bail!(
                    "give at most one of --raw-pkcs11, --handle, --inline-server, --ssh-agent, \
                     --idle, --startup"
                )
            }
        }
    }
}

/// Runs the bench as the CLI does: builds its runtime, prints the report. Returns the exit
/// code (non-zero if any request failed).
pub fn run(command: BenchCommand) -> anyhow::Result<i32> {
    let args = command.load;
    let failed = |errors: u64| {
        if errors > 0 {
            crate::client::exit::FAILURE
        } else {
            crate::client::exit::OK
        }
    };
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads.max(1))
            .enable_all()
            .build()
            .context("cannot start the bench runtime")
    };
    let mut out = std::io::stdout().lock();
    let mode = command.modes.mode()?;
    if args.busy_poll && !matches!(mode, Mode::Agent | Mode::InlineServer(1)) {
        bail!("--busy-poll applies to the load against the agent and to --inline-server 1");
    }
    match mode {
        Mode::Agent => {
            let report = runtime()?.block_on(bench(&args))?;
            if args.json {
                print_json(&mut out, &report)?;
            } else {
                print_report(&mut out, &report, &args)?;
            }
            Ok(failed(report.agent.errors))
        }
        Mode::RawPkcs11 => {
            let report = raw_pkcs11(&args, &command.modes)?;
            print_raw_report(&mut out, &args, &report)?;
            Ok(failed(report.measurement.errors))
        }
        Mode::Handle(sessions) => {
            let report = runtime()?.block_on(through_handle(sessions, &args, &command.modes))?;
            print_raw_report(&mut out, &args, &report)?;
            Ok(failed(report.measurement.errors))
        }
        Mode::InlineServer(sessions) => {
            let report = runtime()?.block_on(inline(sessions, &args, &command.modes))?;
            print_raw_report(&mut out, &args, &report)?;
            Ok(failed(report.measurement.errors))
        }
        Mode::SshAgent(sock) => {
            let report = runtime()?.block_on(ssh_agent(&sock, &args))?;
            print_single_report(
                &mut out,
                &args,
                &report,
                &report.label(),
                &report.measurement,
            )?;
            Ok(failed(report.measurement.errors))
        }
        Mode::Idle(n) => {
            let pid = command.modes.pid.context("--idle needs --pid")?;
            let report = runtime()?.block_on(idle(n, pid, &args))?;
            if args.json {
                print_json(&mut out, &report)?;
            } else {
                report.print(&mut out)?;
            }
            Ok(crate::client::exit::OK)
        }
        Mode::Startup => {
            let config = command
                .modes
                .config
                .as_deref()
                .context("--startup needs --config")?;
            let report = startup(config, command.modes.runs)?;
            if args.json {
                print_json(&mut out, &report)?;
            } else {
                report.print(&mut out)?;
            }
            Ok(crate::client::exit::OK)
        }
    }
}

fn print_json(out: &mut dyn std::io::Write, value: &impl Serialize) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

/// Runs the load against the agent (and the echo baseline unless disabled).
pub async fn bench(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    check_load_args(args)?;
    let socket = crate::client::socket_path(args.socket.as_deref());
    let profile = match args.op {
        BenchOp::Ping => None,
        _ => Some(resolve_profile(&socket, args.profile.clone()).await?),
    };
    let template = Template::new(args.op, profile.as_deref());
    // One request first, so that a wrong profile or a refusal is reported clearly.
    check_once(&socket, &template).await?;

    let agent = load(
        &socket,
        &template,
        args,
        true,
        Window::new(Instant::now(), args),
    )
    .await?;
    let baseline = if args.no_baseline {
        None
    } else {
        let window = Window::new(Instant::now(), args);
        let m = if args.busy_poll {
            let echo = busy_poll::SpinServer::start("echo", busy_poll::Echo)?;
            let m = load(echo.path(), &template, args, false, window).await;
            // Joins the spinning thread: not on a runtime worker.
            super::blocking(move || echo.finish()).await?;
            m
        } else {
            let echo = EchoServer::start(args.threads.max(1))?;
            let m = load(&echo.path, &template, args, false, window).await;
            drop(echo);
            m
        };
        Some(m?)
    };
    Ok(BenchReport {
        op: args.op,
        connections: args.connections,
        pipeline: args.pipeline,
        busy_poll: args.busy_poll,
        agent,
        baseline,
    })
}

fn check_load_args(args: &BenchArgs) -> anyhow::Result<()> {
    if args.connections == 0 || args.connections > 4096 {
        bail!("--connections must be between 1 and 4096");
    }
    if args.pipeline == 0 || args.pipeline > 1024 {
        bail!("--pipeline must be between 1 and 1024");
    }
    if args.busy_poll && (args.connections != 1 || args.pipeline != 1) {
        bail!(
            "--busy-poll measures one connection with one request in flight: give -c 1 \
             (spinning clients would take the CPUs from each other and from the server)"
        );
    }
    check_duration(args)
}

fn check_duration(args: &BenchArgs) -> anyhow::Result<()> {
    if args.duration == 0 || args.duration + args.warmup > MAX_SECS {
        bail!("--duration must be at least 1 and duration + warmup at most {MAX_SECS} seconds");
    }
    Ok(())
}

async fn resolve_profile(
    socket: &std::path::Path,
    given: Option<String>,
) -> anyhow::Result<String> {
    if let Some(p) = given.or_else(|| {
        std::env::var(super::client::PROFILE_ENV)
            .ok()
            .filter(|p| !p.is_empty())
    }) {
        return Ok(p);
    }
    let mut client = crate::client::AsyncClient::connect(socket).await?;
    let status = client
        .status(None)
        .await
        .context("cannot list profiles: give --profile")?;
    match status.profiles.as_slice() {
        [only] => Ok(only.name.clone()),
        _ => bail!(
            "give --profile (the agent shows you {} profiles)",
            status.profiles.len()
        ),
    }
}

async fn check_once(socket: &std::path::Path, template: &Template) -> anyhow::Result<()> {
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "cannot connect to {}: is tm-agent running?",
            socket.display()
        )
    })?;
    let (rd, mut wr) = stream.into_split();
    let mut line = Vec::new();
    template.render(1, &mut line);
    wr.write_all(&line).await?;
    let mut reply = Vec::new();
    BufReader::new(rd).read_until(b'\n', &mut reply).await?;
    let reply: crate::protocol::Response<serde_json::Value> =
        serde_json::from_slice(&reply).context("the agent's reply is not a protocol line")?;
    if let Some(err) = reply.error {
        bail!(
            "the agent refused the bench's request: {} ({})",
            err.message,
            err.code
        );
    }
    Ok(())
}

/// A request line with a variable id.
#[derive(Clone)]
struct Template {
    prefix: Vec<u8>,
    suffix: Vec<u8>,
}

impl Template {
    fn new(op: BenchOp, profile: Option<&str>) -> Template {
        let op = match op {
            BenchOp::Token => "token",
            BenchOp::SignChallenge => "sign_challenge",
            BenchOp::Ping => "ping",
        };
        let mut suffix = format!(",\"op\":\"{op}\"").into_bytes();
        if let Some(p) = profile {
            suffix.extend_from_slice(b",\"profile\":");
            suffix.extend_from_slice(&serde_json::to_vec(p).unwrap_or_default());
        }
        suffix.extend_from_slice(b"}\n");
        Template {
            prefix: b"{\"v\":1,\"id\":".to_vec(),
            suffix,
        }
    }

    fn render(&self, id: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(itoa::Buffer::new().format(id).as_bytes());
        out.extend_from_slice(&self.suffix);
    }
}

/// One load task's round trips inside the measured window.
struct Sample {
    latencies_ns: Vec<u32>,
    errors: u64,
}

impl Sample {
    fn with_capacity(capacity: usize) -> Sample {
        Sample {
            latencies_ns: Vec::with_capacity(capacity),
            errors: 0,
        }
    }

    /// Counts a round trip from `t0` to `done` if it lies inside the window (`ok` checks
    /// the answer, only then).
    fn record(&mut self, window: &Window, t0: Instant, done: Instant, ok: impl FnOnce() -> bool) {
        if t0 >= window.measure_from && done <= window.end {
            self.latencies_ns.push(nanos(done.duration_since(t0)));
            if !ok() {
                self.errors += 1;
            }
        }
    }
}

/// The measured part of a run: `--warmup` seconds after its start, then `--duration`.
#[derive(Clone, Copy)]
struct Window {
    measure_from: Instant,
    end: Instant,
}

impl Window {
    fn new(start: Instant, args: &BenchArgs) -> Window {
        let measure_from = start + Duration::from_secs(args.warmup);
        Window {
            measure_from,
            end: measure_from + Duration::from_secs(args.duration),
        }
    }

    /// The summary of every task's sample over the window.
    fn measure(&self, samples: Vec<Sample>) -> Measurement {
        let mut latencies = Vec::new();
        let mut errors = 0;
        for sample in samples {
            latencies.extend_from_slice(&sample.latencies_ns);
            errors += sample.errors;
        }
        let seconds = self.end.saturating_duration_since(self.measure_from);
        summarize(latencies, errors, seconds.as_secs_f64())
    }
}

/// Waits for every load task; a task that panicked or failed fails the run.
async fn join_samples(
    mut tasks: tokio::task::JoinSet<std::io::Result<Sample>>,
) -> anyhow::Result<Vec<Sample>> {
    let mut samples = Vec::with_capacity(tasks.len());
    while let Some(joined) = tasks.join_next().await {
        samples.push(joined.context("a load task panicked")??);
    }
    Ok(samples)
}

/// Drives `-c` connections to `socket` over `window` (which starts when it is made: make it
/// just before).
async fn load(
    socket: &std::path::Path,
    template: &Template,
    args: &BenchArgs,
    check_replies: bool,
    window: Window,
) -> anyhow::Result<Measurement> {
    if args.busy_poll {
        let (socket, template) = (socket.to_path_buf(), template.clone());
        let sample =
            super::blocking(move || busy_poll::drive(&socket, &template, window, check_replies))
                .await??;
        return Ok(window.measure(vec![sample]));
    }
    let mut streams = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        streams.push(
            UnixStream::connect(socket)
                .await
                .with_context(|| format!("cannot connect to {}", socket.display()))?,
        );
    }
    let template = std::sync::Arc::new(template.clone());
    let mut tasks = tokio::task::JoinSet::new();
    for stream in streams {
        let template = std::sync::Arc::clone(&template);
        let pipeline = args.pipeline;
        tasks.spawn(async move { drive(stream, &template, pipeline, window, check_replies).await });
    }
    Ok(window.measure(join_samples(tasks).await?))
}

/// Percentiles (nearest rank) and the rate of one run's latencies.
fn summarize(mut latencies: Vec<u32>, errors: u64, seconds: f64) -> Measurement {
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * latencies.len() as f64).ceil() as usize;
        latencies[rank.clamp(1, latencies.len()) - 1] as f64 / 1000.0
    };
    Measurement {
        requests: latencies.len() as u64,
        errors,
        seconds,
        per_second: latencies.len() as f64 / seconds,
        p50_us: pct(50.0),
        p90_us: pct(90.0),
        p99_us: pct(99.0),
        p999_us: pct(99.9),
        max_us: latencies.last().map(|l| *l as f64 / 1000.0).unwrap_or(0.0),
    }
}

async fn drive(
    stream: UnixStream,
    template: &Template,
    pipeline: usize,
    window: Window,
    check_replies: bool,
) -> std::io::Result<Sample> {
    let (rd, mut wr) = stream.into_split();
    let mut reader = BufReader::with_capacity(64 * 1024, rd);
    let mut sent: VecDeque<Instant> = VecDeque::with_capacity(pipeline);
    let mut out = Vec::with_capacity(256 * pipeline);
    let mut reply = Vec::with_capacity(4096);
    let mut sample = Sample::with_capacity(64 * 1024);
    let mut id = 0u64;
    loop {
        let now = Instant::now();
        if now >= window.end {
            break;
        }
        out.clear();
        while sent.len() < pipeline {
            id += 1;
            template.render(id, &mut out);
            sent.push_back(now);
        }
        if !out.is_empty() {
            wr.write_all(&out).await?;
        }
        reply.clear();
        if reader.read_until(b'\n', &mut reply).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        let done = Instant::now();
        let Some(t0) = sent.pop_front() else { continue };
        sample.record(&window, t0, done, || {
            !check_replies || contains(&reply, b"\"ok\":true")
        });
    }
    Ok(sample)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A bare echo server on a temporary socket, on its own runtime thread(s).
struct EchoServer {
    path: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Removed after the server has stopped (fields drop after `Drop::drop`).
    _dir: TempDir,
}

impl EchoServer {
    fn start(threads: usize) -> anyhow::Result<EchoServer> {
        let dir = TempDir::new("echo")?;
        let path = dir.path.join("echo.sock");
        let std_listener = std::os::unix::net::UnixListener::bind(&path)
            .with_context(|| format!("cannot bind {}", path.display()))?;
        std_listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("bench-echo")
            .enable_io()
            .build()
            .context("cannot start the echo runtime")?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-echo".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = UnixListener::from_std(std_listener) else {
                        return;
                    };
                    let accept = async {
                        while let Ok((mut stream, _)) = listener.accept().await {
                            tokio::spawn(async move {
                                let mut buf = vec![0u8; 64 * 1024];
                                loop {
                                    match stream.read(&mut buf).await {
                                        Ok(0) | Err(_) => break,
                                        Ok(n) => {
                                            if stream.write_all(&buf[..n]).await.is_err() {
                                                break;
                                            }
                                        }
                                    }
                                }
                            });
                        }
                    };
                    tokio::select! {
                        _ = stopped => {}
                        _ = accept => {}
                    }
                });
                runtime.shutdown_background();
            })
            .context("cannot start the echo thread")?;
        Ok(EchoServer {
            path,
            stop: Some(stop),
            thread: Some(thread),
            _dir: dir,
        })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// --raw-pkcs11: the in-process floor of signing

/// In-process signing through the PKCS#11 backend's workers (or a signer Handle), without
/// the agent.
#[derive(Debug, Clone, Serialize)]
pub struct RawReport {
    /// `raw_pkcs11`, `handle` or `inline_server`.
    pub mode: &'static str,
    /// Sessions: threads for `raw_pkcs11` and `inline_server`, actor workers for `handle`.
    pub threads: usize,
    /// Concurrent callers (= threads for `raw_pkcs11`).
    pub clients: usize,
    /// Where the key is (no secrets).
    pub location: String,
    /// `inline_server` with `--busy-poll`: the server and the client spun on their sockets.
    pub busy_poll: bool,
    pub measurement: Measurement,
    /// `inline_server`: `C_SignInit` + `C_Sign` alone, timed by the server threads (the rate
    /// is theirs together; `errors` stays 0, the load counts them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sign_in_server: Option<Measurement>,
}

impl RawReport {
    fn label(&self) -> String {
        if self.mode == "handle" {
            format!("handle {}s", self.threads)
        } else if self.mode == "inline_server" && self.busy_poll {
            format!("inline {}s spin", self.threads)
        } else if self.mode == "inline_server" {
            format!("inline server {}s", self.threads)
        } else {
            format!("raw pkcs11 {}t", self.threads)
        }
    }
}

/// The `[keys.NAME]` PKCS#11 settings of `config`: `key`, or the only PKCS#11 key.
fn pkcs11_settings(
    config: &crate::config::Config,
    key: Option<&str>,
) -> anyhow::Result<crate::signer::pkcs11::Pkcs11Settings> {
    use crate::config::KeyConfig;
    let mut keys = config.keys.iter().filter_map(|(name, k)| match k {
        KeyConfig::Pkcs11(settings) => Some((name, settings)),
        _ => None,
    });
    match key {
        Some(wanted) => keys
            .find(|(name, _)| name.as_str() == wanted)
            .map(|(_, s)| s.clone())
            .with_context(|| format!("the config has no pkcs11 key called {wanted}")),
        None => match (keys.next(), keys.next()) {
            (Some((_, s)), None) => Ok(s.clone()),
            (None, _) => bail!("the config has no pkcs11 key"),
            (Some(_), Some(_)) => bail!("the config has several pkcs11 keys: give --key"),
        },
    }
}

/// The PKCS#11 settings of the key of --config for a mode (`flag`) that opens it with
/// `sessions` sessions, once that count is checked.
fn session_settings(
    modes: &ModeArgs,
    flag: &str,
    sessions: usize,
) -> anyhow::Result<crate::signer::pkcs11::Pkcs11Settings> {
    let max = crate::signer::pkcs11::MAX_SESSIONS;
    if sessions == 0 || sessions > max {
        bail!("{flag} takes 1 to {max} sessions");
    }
    let path = modes
        .config
        .as_deref()
        .with_context(|| format!("{flag} needs --config"))?;
    let loaded = crate::config::Config::load(path)?;
    pkcs11_settings(&loaded.config, modes.key.as_deref())
}

/// Signs back to back on `-c` threads, each owning one backend worker (its own session).
fn raw_pkcs11(args: &BenchArgs, modes: &ModeArgs) -> anyhow::Result<RawReport> {
    use crate::signer::pkcs11;
    use p256::ecdsa::signature::hazmat::PrehashVerifier as _;

    check_duration(args)?;
    // One session per thread, -c threads.
    let threads = args.connections;
    let settings = session_settings(modes, "--raw-pkcs11 (-c)", threads)?;
    let (info, workers) = pkcs11::open(&settings, threads).context("cannot open the key")?;
    let public_key = info.public_key;

    // Every thread signs once and checks the signature before the clock starts.
    let window = Window::new(Instant::now() + Duration::from_millis(100), args);
    let joined: Vec<_> = std::thread::scope(|scope| {
        let running: Vec<_> = workers
            .into_iter()
            .enumerate()
            .map(|(index, mut worker)| {
                scope.spawn(move || -> anyhow::Result<Sample> {
                    let digest = crate::jose::sha256(format!("bench.{index}").as_bytes());
                    let probe = worker.sign_digest(&digest)?;
                    public_key
                        .verify_prehash(&digest, &probe)
                        .context("a raw signature does not verify")?;
                    let mut sample = Sample::with_capacity(64 * 1024);
                    loop {
                        let t0 = Instant::now();
                        if t0 >= window.end {
                            break;
                        }
                        let result = worker.sign_digest(&digest);
                        sample.record(&window, t0, Instant::now(), || result.is_ok());
                    }
                    Ok(sample)
                })
            })
            .collect();
        running.into_iter().map(|t| t.join()).collect()
    });
    let mut samples = Vec::with_capacity(joined.len());
    for sample in joined {
        samples.push(sample.map_err(|_| anyhow::anyhow!("a signing thread panicked"))??);
    }
    Ok(RawReport {
        mode: "raw_pkcs11",
        threads,
        clients: threads,
        location: info.location,
        busy_poll: false,
        measurement: window.measure(samples),
        sign_in_server: None,
    })
}

/// Signs back to back from `-c` tasks through a signer Handle with `sessions` workers.
async fn through_handle(
    sessions: usize,
    args: &BenchArgs,
    modes: &ModeArgs,
) -> anyhow::Result<RawReport> {
    use crate::signer::{pkcs11, ActorOptions, Handle};

    check_load_args(args)?;
    let settings = session_settings(modes, "--handle", sessions)?;
    let options = ActorOptions {
        queue_depth: args.connections.max(ActorOptions::default().queue_depth),
        name: "bench-signer".into(),
        ..ActorOptions::default()
    };
    let handle = super::blocking(move || -> Result<Handle, crate::signer::SignerError> {
        let (info, workers) = pkcs11::open(&settings, sessions)?;
        Handle::spawn(info, workers, options)
    })
    .await?
    .context("cannot open the key")?;
    let location = handle.info().location.clone();

    let window = Window::new(Instant::now(), args);
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..args.connections {
        let handle = handle.clone();
        tasks.spawn(async move {
            let message = format!("bench.{index}");
            let mut sample = Sample::with_capacity(16 * 1024);
            loop {
                let t0 = Instant::now();
                if t0 >= window.end {
                    break;
                }
                let result = handle.sign(message.as_bytes()).await;
                sample.record(&window, t0, Instant::now(), || result.is_ok());
            }
            Ok(sample)
        });
    }
    Ok(RawReport {
        mode: "handle",
        threads: sessions,
        clients: args.connections,
        location,
        busy_poll: false,
        measurement: window.measure(join_samples(tasks).await?),
        sign_in_server: None,
    })
}

/// The load of `-c` connections against an [`InlineServer`] with `sessions` sessions of the
/// key of --config.
async fn inline(sessions: usize, args: &BenchArgs, modes: &ModeArgs) -> anyhow::Result<RawReport> {
    use crate::signer::pkcs11;

    check_load_args(args)?;
    let settings = session_settings(modes, "--inline-server", sessions)?;
    let (info, workers) = super::blocking(move || pkcs11::open(&settings, sessions))
        .await?
        .context("cannot open the key")?;
    let location = info.location.clone();
    // The server times the signatures of the load's own window.
    let window = Window::new(Instant::now(), args);
    let busy_poll = args.busy_poll;
    let server = super::blocking(move || {
        InlineServer::start(&info, workers, window.measure_from..window.end, busy_poll)
    })
    .await??;
    let template = Template::new(BenchOp::SignChallenge, Some("inline"));
    let measured = load(server.path(), &template, args, true, window).await;
    // Joining the server's threads blocks: not on a runtime worker.
    let nanos = super::blocking(move || server.finish()).await?;
    let seconds = window.end.saturating_duration_since(window.measure_from);
    Ok(RawReport {
        mode: "inline_server",
        threads: sessions,
        clients: args.connections,
        location,
        busy_poll,
        measurement: measured?,
        sign_in_server: Some(summarize(nanos, 0, seconds.as_secs_f64())),
    })
}

fn nanos(d: Duration) -> u32 {
    d.as_nanos().min(u32::MAX as u128) as u32
}

// ---------------------------------------------------------------------------------------
// --ssh-agent: the same load against an OpenSSH agent

const SSH_AGENT_FAILURE: u8 = 5;
const SSH_AGENTC_REQUEST_IDENTITIES: u8 = 11;
const SSH_AGENT_IDENTITIES_ANSWER: u8 = 12;
const SSH_AGENTC_SIGN_REQUEST: u8 = 13;
const SSH_AGENT_SIGN_RESPONSE: u8 = 14;
/// The longest agent message read (OpenSSH's own cap is 256 KiB).
const SSH_MAX_MESSAGE: usize = 256 * 1024;

/// The load against an OpenSSH agent.
#[derive(Debug, Clone, Serialize)]
pub struct SshAgentReport {
    /// `ssh_agent`.
    pub mode: &'static str,
    pub connections: usize,
    pub pipeline: usize,
    /// The identity's comment, as the agent lists it.
    pub key: String,
    pub measurement: Measurement,
}

impl SshAgentReport {
    fn label(&self) -> String {
        "ssh-agent".into()
    }
}

/// One agent message: length, type, body.
fn ssh_message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(5 + body.len());
    m.extend_from_slice(&(body.len() as u32 + 1).to_be_bytes());
    m.push(kind);
    m.extend_from_slice(body);
    m
}

fn ssh_put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// Reads one message into `buf` (type byte first) and returns its type.
async fn ssh_read<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<u8> {
    let mut len = [0u8; 4];
    reader.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > SSH_MAX_MESSAGE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("an ssh-agent message of {len} bytes"),
        ));
    }
    buf.resize(len, 0);
    reader.read_exact(buf).await?;
    Ok(buf[0])
}

/// A cursor over the SSH wire encoding.
struct SshReader<'a>(&'a [u8]);

impl<'a> SshReader<'a> {
    fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_be_bytes(*head))
    }

    fn string(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()? as usize;
        if len > self.0.len() {
            return None;
        }
        let (s, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(s)
    }
}

/// The first `ecdsa-sha2-nistp256` identity of the agent: its key blob and comment.
fn ssh_pick_identity(answer: &[u8]) -> anyhow::Result<(Vec<u8>, String)> {
    let mut r = SshReader(answer);
    let count = r.u32().context("a malformed identities answer")?;
    let mut types = Vec::new();
    for _ in 0..count {
        let blob = r.string().context("a malformed identities answer")?;
        let comment = r.string().context("a malformed identities answer")?;
        let kind = SshReader(blob).string().unwrap_or_default();
        if kind == b"ecdsa-sha2-nistp256" {
            return Ok((blob.to_vec(), String::from_utf8_lossy(comment).into_owned()));
        }
        types.push(String::from_utf8_lossy(kind).into_owned());
    }
    bail!(
        "the ssh-agent holds no ECDSA P-256 key ({} identities: {}); add it with `ssh-add -s MODULE`",
        count,
        types.join(", ")
    )
}

async fn ssh_agent(sock: &Path, args: &BenchArgs) -> anyhow::Result<SshAgentReport> {
    check_load_args(args)?;
    let connect = || async {
        UnixStream::connect(sock)
            .await
            .with_context(|| format!("cannot connect to the ssh-agent at {}", sock.display()))
    };
    let mut first = connect().await?;
    first
        .write_all(&ssh_message(SSH_AGENTC_REQUEST_IDENTITIES, &[]))
        .await?;
    let mut buf = Vec::new();
    let kind = ssh_read(&mut first, &mut buf).await?;
    if kind != SSH_AGENT_IDENTITIES_ANSWER {
        bail!("the ssh-agent answered message type {kind} to a request for identities");
    }
    let (blob, comment) = ssh_pick_identity(&buf[1..])?;
    // A challenge-sized message, as `sign_challenge` signs: `<key_id>.<timestamp>`.
    let data = crate::jose::challenge_message(
        "00000000-0000-4000-8000-000000000000",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0),
    );
    let mut body = Vec::with_capacity(blob.len() + data.len() + 16);
    ssh_put_string(&mut body, &blob);
    ssh_put_string(&mut body, data.as_bytes());
    body.extend_from_slice(&0u32.to_be_bytes()); // flags
    let request = std::sync::Arc::new(ssh_message(SSH_AGENTC_SIGN_REQUEST, &body));
    // One signature first, so that a refusal is reported clearly.
    first.write_all(&request).await?;
    match ssh_read(&mut first, &mut buf).await? {
        SSH_AGENT_SIGN_RESPONSE => {}
        SSH_AGENT_FAILURE => bail!("the ssh-agent refused to sign with {comment}"),
        other => bail!("the ssh-agent answered message type {other} to a sign request"),
    }
    drop(first);

    let mut streams = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        streams.push(connect().await?);
    }
    let window = Window::new(Instant::now(), args);
    let mut tasks = tokio::task::JoinSet::new();
    for stream in streams {
        let request = std::sync::Arc::clone(&request);
        let pipeline = args.pipeline;
        tasks.spawn(async move { drive_ssh(stream, &request, pipeline, window).await });
    }
    Ok(SshAgentReport {
        mode: "ssh_agent",
        connections: args.connections,
        pipeline: args.pipeline,
        key: comment,
        measurement: window.measure(join_samples(tasks).await?),
    })
}

async fn drive_ssh(
    stream: UnixStream,
    request: &[u8],
    pipeline: usize,
    window: Window,
) -> std::io::Result<Sample> {
    let (rd, mut wr) = stream.into_split();
    let mut reader = BufReader::with_capacity(16 * 1024, rd);
    let mut sent: VecDeque<Instant> = VecDeque::with_capacity(pipeline);
    let mut out = Vec::with_capacity(request.len() * pipeline);
    let mut reply = Vec::with_capacity(512);
    let mut sample = Sample::with_capacity(16 * 1024);
    loop {
        let now = Instant::now();
        if now >= window.end {
            break;
        }
        out.clear();
        while sent.len() < pipeline {
            out.extend_from_slice(request);
            sent.push_back(now);
        }
        if !out.is_empty() {
            wr.write_all(&out).await?;
        }
        let kind = ssh_read(&mut reader, &mut reply).await?;
        let done = Instant::now();
        let Some(t0) = sent.pop_front() else { continue };
        sample.record(&window, t0, done, || kind == SSH_AGENT_SIGN_RESPONSE);
    }
    Ok(sample)
}

// ---------------------------------------------------------------------------------------
// --idle: resident memory with N idle connections

/// The agent's resident memory with N idle connections.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    /// `idle`.
    pub mode: &'static str,
    pub connections: usize,
    pub pid: u32,
    /// `VmRSS` before the bench connects.
    pub rss_before_kib: u64,
    /// `VmRSS` once every connection is open and has been answered a `ping`.
    pub rss_open_kib: u64,
    /// The highest `VmRSS` sampled (every 100 ms) while the connections were held.
    pub rss_held_max_kib: u64,
    /// `VmRSS` a second after the connections were closed.
    pub rss_after_close_kib: u64,
    /// Open connections as the agent's `status` counts them while held (the status
    /// request's own connection included).
    pub agent_open_connections: Option<u64>,
    /// Seconds the connections were held.
    pub held_secs: f64,
}

impl IdleReport {
    fn print(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let mib = |kib: u64| kib as f64 / 1024.0;
        writeln!(
            out,
            "pid {}: VmRSS {:.1} MiB before; {:.1} MiB with {} idle connections open ({:.1} MiB \
             max over {:.1} s; the agent counts {} open); {:.1} MiB after they closed",
            self.pid,
            mib(self.rss_before_kib),
            mib(self.rss_open_kib),
            self.connections,
            mib(self.rss_held_max_kib),
            self.held_secs,
            self.agent_open_connections
                .map(|n| n.to_string())
                .unwrap_or_else(|| "?".into()),
            mib(self.rss_after_close_kib),
        )
    }
}

/// `VmRSS` of `pid` in KiB, from `/proc/<pid>/status`.
pub fn vm_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))
}

async fn idle(n: usize, pid: u32, args: &BenchArgs) -> anyhow::Result<IdleReport> {
    check_duration(args)?;
    if n == 0 || n > 10_000 {
        bail!("--idle takes 1 to 10000 connections");
    }
    let socket = crate::client::socket_path(args.socket.as_deref());
    let rss_before_kib = vm_rss_kib(pid)?;
    let ping = Template::new(BenchOp::Ping, None);
    let mut line = Vec::new();
    ping.render(1, &mut line);
    let mut held = Vec::with_capacity(n);
    let mut reply = Vec::with_capacity(64);
    for _ in 0..n {
        let stream = UnixStream::connect(&socket)
            .await
            .with_context(|| format!("cannot connect to {}", socket.display()))?;
        let mut stream = BufReader::new(stream);
        stream.get_mut().write_all(&line).await?;
        reply.clear();
        stream.read_until(b'\n', &mut reply).await?;
        if !contains(&reply, b"\"ok\":true") {
            bail!(
                "connection {} was not answered: {}",
                held.len() + 1,
                String::from_utf8_lossy(&reply).trim()
            );
        }
        held.push(stream);
    }
    let rss_open_kib = vm_rss_kib(pid)?;
    let agent_open_connections = match crate::client::AsyncClient::connect(&socket).await {
        Ok(mut client) => client
            .status(None)
            .await
            .ok()
            .map(|s| s.counters.connections.open),
        Err(_) => None,
    };
    let since = Instant::now();
    let until = since + Duration::from_secs(args.duration);
    let mut rss_held_max_kib = rss_open_kib;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        rss_held_max_kib = rss_held_max_kib.max(vm_rss_kib(pid)?);
    }
    let held_secs = since.elapsed().as_secs_f64();
    drop(held);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after_close_kib = vm_rss_kib(pid)?;
    Ok(IdleReport {
        mode: "idle",
        connections: n,
        pid,
        rss_before_kib,
        rss_open_kib,
        rss_held_max_kib,
        rss_after_close_kib,
        agent_open_connections,
        held_secs,
    })
}

// ---------------------------------------------------------------------------------------
// --startup: spawn → first ping, spawn → first token

/// One start of the agent.
#[derive(Debug, Clone, Serialize)]
pub struct StartupRun {
    /// Spawn → first `ping` answered.
    pub ping_ms: f64,
    /// Spawn → first `token` answered with a token.
    pub token_ms: f64,
    /// The `ready after_ms=…` the agent logged (counted from after its config was loaded).
    pub logged_ready_ms: Option<u64>,
}

/// `--runs` starts of the agent.
#[derive(Debug, Clone, Serialize)]
pub struct StartupReport {
    /// `startup`.
    pub mode: &'static str,
    pub runs: Vec<StartupRun>,
    pub median_ping_ms: f64,
    pub median_token_ms: f64,
    pub median_logged_ready_ms: Option<f64>,
}

impl StartupReport {
    fn print(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        for (i, r) in self.runs.iter().enumerate() {
            writeln!(
                out,
                "run {}: spawn → ping {:.1} ms, spawn → token {:.1} ms, logged ready after_ms={}",
                i + 1,
                r.ping_ms,
                r.token_ms,
                r.logged_ready_ms
                    .map(|m| m.to_string())
                    .unwrap_or_else(|| "?".into())
            )?;
        }
        writeln!(
            out,
            "median of {}: spawn → ping {:.1} ms, spawn → token {:.1} ms, logged ready {}",
            self.runs.len(),
            self.median_ping_ms,
            self.median_token_ms,
            self.median_logged_ready_ms
                .map(|m| format!("{m:.0} ms"))
                .unwrap_or_else(|| "?".into())
        )
    }
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 0 {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

/// Starts the agent `runs` times, one after the other, each stopped with SIGTERM.
fn startup(config: &Path, runs: usize) -> anyhow::Result<StartupReport> {
    if runs == 0 || runs > 100 {
        bail!("--runs must be between 1 and 100");
    }
    let loaded = crate::config::Config::load(config)?;
    let socket = loaded.config.socket.path.clone();
    let profile = loaded
        .config
        .profiles
        .keys()
        .next()
        .cloned()
        .context("the config has no profile")?;
    if crate::client::Client::connect(&socket).is_ok() {
        bail!(
            "an agent already answers on {}: give --startup a config with its own socket",
            socket.display()
        );
    }
    let exe = std::env::current_exe().context("cannot find the tm-agent executable")?;
    let dir = TempDir::new("startup")?;
    let mut results = Vec::with_capacity(runs);
    for run in 0..runs {
        let log = dir.path.join(format!("agent-{run}.log"));
        results.push(start_once(&exe, config, &socket, &profile, &log)?);
    }
    let logged: Vec<f64> = results
        .iter()
        .filter_map(|r| r.logged_ready_ms.map(|m| m as f64))
        .collect();
    Ok(StartupReport {
        mode: "startup",
        median_ping_ms: median(results.iter().map(|r| r.ping_ms).collect()).unwrap_or(0.0),
        median_token_ms: median(results.iter().map(|r| r.token_ms).collect()).unwrap_or(0.0),
        median_logged_ready_ms: median(logged),
        runs: results,
    })
}

fn start_once(
    exe: &Path,
    config: &Path,
    socket: &Path,
    profile: &str,
    log: &Path,
) -> anyhow::Result<StartupRun> {
    let file =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let t0 = Instant::now();
    let mut child = std::process::Command::new(exe)
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let measured = wait_ready(&mut child, t0, socket, profile);
    stop(&mut child);
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let (ping, token) = measured.with_context(|| {
        format!(
            "the agent did not become ready; its log:\n{}",
            text.trim_end()
        )
    })?;
    let logged_ready_ms = text
        .lines()
        .filter(|l| l.contains(" ready ") || l.contains("\"ready\""))
        .find_map(|l| {
            let rest = &l[l.find("after_ms")? + "after_ms".len()..];
            let digits: String = rest
                .trim_start_matches(['=', ':', '"', ' '])
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            digits.parse().ok()
        });
    Ok(StartupRun {
        ping_ms: ping.as_secs_f64() * 1000.0,
        token_ms: token.as_secs_f64() * 1000.0,
        logged_ready_ms,
    })
}

/// Polls the socket every millisecond until a `ping` and then a `token` succeed.
fn wait_ready(
    child: &mut std::process::Child,
    t0: Instant,
    socket: &Path,
    profile: &str,
) -> anyhow::Result<(Duration, Duration)> {
    let limit = Duration::from_secs(20);
    let mut ping = None;
    let mut last_error = String::from("no answer");
    while t0.elapsed() < limit {
        if let Some(status) = child.try_wait()? {
            bail!("the agent exited with {status}");
        }
        if let Ok(mut client) = crate::client::Client::connect(socket) {
            client.set_timeout(Some(limit))?;
            match client.ping() {
                Ok(()) => {
                    let at = ping.get_or_insert_with(|| t0.elapsed());
                    match client.token(profile, None) {
                        Ok(_) => return Ok((*at, t0.elapsed())),
                        Err(e) => last_error = e.to_string(),
                    }
                }
                Err(e) => last_error = e.to_string(),
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    bail!("no token within {limit:?}: {last_error}")
}

/// SIGTERM (a clean shutdown removes the socket), then SIGKILL after 10 s.
fn stop(child: &mut std::process::Child) {
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A private temporary directory, removed on drop.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new(tag: &str) -> anyhow::Result<TempDir> {
        use std::os::unix::fs::DirBuilderExt as _;
        let path = std::env::temp_dir().join(format!(
            "tm-agent-bench-{tag}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn fmt_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2}ms", us / 1000.0)
    } else {
        format!("{us:.0}µs")
    }
}

/// Prints a report of one measurement: all of it as JSON with `--json`, else the table row.
fn print_single_report(
    out: &mut dyn std::io::Write,
    args: &BenchArgs,
    report: &impl Serialize,
    label: &str,
    m: &Measurement,
) -> anyhow::Result<()> {
    if args.json {
        print_json(out, report)
    } else {
        Ok(print_single(out, label, m, args)?)
    }
}

/// A signing report (raw, handle, inline server), with the signatures timed inside the
/// inline server when there are some.
fn print_raw_report(
    out: &mut dyn std::io::Write,
    args: &BenchArgs,
    report: &RawReport,
) -> anyhow::Result<()> {
    print_single_report(out, args, report, &report.label(), &report.measurement)?;
    if let (false, Some(signing)) = (args.json, &report.sign_in_server) {
        print_row(out, "  C_Sign inside", signing)?;
    }
    Ok(())
}

/// Prints one measurement without a baseline (the other load modes).
fn print_single(
    out: &mut dyn std::io::Write,
    label: &str,
    m: &Measurement,
    args: &BenchArgs,
) -> std::io::Result<()> {
    writeln!(
        out,
        "{label}: concurrency={} duration={}s warmup={}s",
        args.connections, args.duration, args.warmup
    )?;
    print_header(out)?;
    print_row(out, label, m)
}

fn print_header(out: &mut dyn std::io::Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<14} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "", "requests", "req/s", "p50", "p90", "p99", "p99.9", "max", "errors"
    )
}

fn print_row(out: &mut dyn std::io::Write, name: &str, m: &Measurement) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<14} {:>10} {:>10.0} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        name,
        m.requests,
        m.per_second,
        fmt_us(m.p50_us),
        fmt_us(m.p90_us),
        fmt_us(m.p99_us),
        fmt_us(m.p999_us),
        fmt_us(m.max_us),
        m.errors
    )
}

/// Prints the human-readable report.
pub fn print_report(
    out: &mut dyn std::io::Write,
    r: &BenchReport,
    args: &BenchArgs,
) -> std::io::Result<()> {
    writeln!(
        out,
        "op={:?} connections={} pipeline={} duration={}s warmup={}s threads={}{}",
        r.op,
        r.connections,
        r.pipeline,
        args.duration,
        args.warmup,
        args.threads,
        if r.busy_poll {
            " busy-poll (the client and the echo spin; the agent does not)"
        } else {
            ""
        }
    )?;
    print_header(out)?;
    print_row(out, "agent", &r.agent)?;
    if let Some(b) = &r.baseline {
        print_row(out, "echo baseline", b)?;
        writeln!(
            out,
            "agent/echo: throughput {:.2}x, p50 {:.2}x, p99 {:.2}x",
            r.throughput_ratio().unwrap_or(0.0),
            r.p50_ratio().unwrap_or(0.0),
            r.agent.p99_us / b.p99_us.max(0.001)
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_renders_a_valid_request() {
        let t = Template::new(BenchOp::Token, Some("pr\"od"));
        let mut line = Vec::new();
        t.render(42, &mut line);
        let raw: crate::protocol::RawRequest = serde_json::from_slice(&line).unwrap();
        let req = raw.validate().unwrap();
        assert_eq!(req.id, 42);
        assert_eq!(req.body.profile(), Some("pr\"od"));
    }

    fn identity(kind: &str, comment: &str) -> Vec<u8> {
        let mut blob = Vec::new();
        ssh_put_string(&mut blob, kind.as_bytes());
        ssh_put_string(&mut blob, b"key material");
        let mut out = Vec::new();
        ssh_put_string(&mut out, &blob);
        ssh_put_string(&mut out, comment.as_bytes());
        out
    }

    #[test]
    fn ssh_agent_identities_pick_the_p256_key() {
        let mut answer = 2u32.to_be_bytes().to_vec();
        answer.extend(identity("ssh-ed25519", "other"));
        answer.extend(identity("ecdsa-sha2-nistp256", "tm-demo-key"));
        let (blob, comment) = ssh_pick_identity(&answer).unwrap();
        assert_eq!(comment, "tm-demo-key");
        assert_eq!(SshReader(&blob).string(), Some(&b"ecdsa-sha2-nistp256"[..]));

        let mut only_ed25519 = 1u32.to_be_bytes().to_vec();
        only_ed25519.extend(identity("ssh-ed25519", "other"));
        let err = ssh_pick_identity(&only_ed25519).unwrap_err().to_string();
        assert!(err.contains("ssh-ed25519"), "{err}");

        let truncated = 1u32.to_be_bytes().to_vec();
        assert!(ssh_pick_identity(&truncated).is_err());
    }

    #[test]
    fn ssh_messages_are_length_prefixed() {
        assert_eq!(
            ssh_message(SSH_AGENTC_REQUEST_IDENTITIES, &[]),
            vec![0, 0, 0, 1, 11]
        );
    }

    #[test]
    fn percentiles_and_medians() {
        let m = summarize((1..=1000).map(|i| i * 1000).collect(), 0, 2.0);
        assert_eq!(m.requests, 1000);
        assert_eq!(m.per_second, 500.0);
        assert_eq!(m.p50_us, 500.0);
        assert_eq!(m.p99_us, 990.0);
        assert_eq!(m.max_us, 1000.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(Vec::new()), None);
    }

    #[test]
    fn reads_its_own_resident_memory() {
        assert!(vm_rss_kib(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn one_mode_at_a_time() {
        let both = ModeArgs {
            raw_pkcs11: true,
            startup: true,
            ..ModeArgs::default()
        };
        assert!(both.mode().is_err());
        assert!(matches!(ModeArgs::default().mode(), Ok(Mode::Agent)));
    }
}
