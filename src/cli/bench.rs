//! `tm-agent bench`: a load generator for a running agent.
//!
//! N connections each send one op (`token`, `sign_challenge` or `ping`) back to back (or with
//! a pipeline window) for a bounded duration after a warm-up, and every round trip's latency
//! is recorded. Then the same load runs against a bare Unix-socket echo server that the
//! bench starts itself on a temporary socket (its own runtime, its own threads), so results
//! read as ratios to the cheapest possible round trip on this machine.
//!
//! Threads: the load runs on a tokio runtime with `--threads` workers; the echo server on a
//! second runtime. Everything stops by itself at the deadline; durations are capped.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Args, ValueEnum};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

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
        }
    }
}

/// The op the bench sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BenchOp {
    Token,
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

/// Runs the bench as the CLI does: builds its runtime, prints the report. Returns the exit
/// code (non-zero if any request failed).
pub fn run(args: BenchArgs) -> anyhow::Result<i32> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .context("cannot start the bench runtime")?;
    let report = runtime.block_on(bench(&args))?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        use std::io::Write as _;
        writeln!(out)?;
    } else {
        print_report(&mut out, &report, &args)?;
    }
    Ok(if report.agent.errors > 0 {
        crate::client::exit::FAILURE
    } else {
        crate::client::exit::OK
    })
}

/// Runs the load against the agent (and the echo baseline unless disabled).
pub async fn bench(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    if args.connections == 0 || args.connections > 4096 {
        bail!("--connections must be between 1 and 4096");
    }
    if args.pipeline == 0 || args.pipeline > 1024 {
        bail!("--pipeline must be between 1 and 1024");
    }
    if args.duration == 0 || args.duration + args.warmup > MAX_SECS {
        bail!("--duration must be at least 1 and duration + warmup at most {MAX_SECS} seconds");
    }
    let socket = crate::client::socket_path(args.socket.as_deref());
    let profile = match args.op {
        BenchOp::Ping => None,
        _ => Some(resolve_profile(&socket, args.profile.clone()).await?),
    };
    let template = Template::new(args.op, profile.as_deref());
    // One request first, so that a wrong profile or a refusal is reported clearly.
    check_once(&socket, &template).await?;

    let agent = load(&socket, &template, args, true).await?;
    let baseline = if args.no_baseline {
        None
    } else {
        let echo = EchoServer::start(args.threads.max(1))?;
        let m = load(&echo.path, &template, args, false).await;
        drop(echo);
        Some(m?)
    };
    Ok(BenchReport {
        op: args.op,
        connections: args.connections,
        pipeline: args.pipeline,
        agent,
        baseline,
    })
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

struct Sample {
    latencies_ns: Vec<u32>,
    errors: u64,
}

async fn load(
    socket: &std::path::Path,
    template: &Template,
    args: &BenchArgs,
    check_replies: bool,
) -> anyhow::Result<Measurement> {
    let mut streams = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        streams.push(
            UnixStream::connect(socket)
                .await
                .with_context(|| format!("cannot connect to {}", socket.display()))?,
        );
    }
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(args.warmup);
    let end = measure_from + Duration::from_secs(args.duration);
    let template = std::sync::Arc::new(Template {
        prefix: template.prefix.clone(),
        suffix: template.suffix.clone(),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for stream in streams {
        let template = std::sync::Arc::clone(&template);
        let pipeline = args.pipeline;
        tasks.spawn(async move {
            drive(
                stream,
                &template,
                pipeline,
                measure_from,
                end,
                check_replies,
            )
            .await
        });
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    while let Some(joined) = tasks.join_next().await {
        let sample = joined.context("a load task panicked")??;
        latencies.extend_from_slice(&sample.latencies_ns);
        errors += sample.errors;
    }
    let seconds = end.saturating_duration_since(measure_from).as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * latencies.len() as f64).ceil() as usize;
        latencies[rank.clamp(1, latencies.len()) - 1] as f64 / 1000.0
    };
    Ok(Measurement {
        requests: latencies.len() as u64,
        errors,
        seconds,
        per_second: latencies.len() as f64 / seconds,
        p50_us: pct(50.0),
        p90_us: pct(90.0),
        p99_us: pct(99.0),
        p999_us: pct(99.9),
        max_us: latencies.last().map(|l| *l as f64 / 1000.0).unwrap_or(0.0),
    })
}

async fn drive(
    stream: UnixStream,
    template: &Template,
    pipeline: usize,
    measure_from: Instant,
    end: Instant,
    check_replies: bool,
) -> std::io::Result<Sample> {
    let (rd, mut wr) = stream.into_split();
    let mut reader = BufReader::with_capacity(64 * 1024, rd);
    let mut sent: VecDeque<Instant> = VecDeque::with_capacity(pipeline);
    let mut out = Vec::with_capacity(256 * pipeline);
    let mut reply = Vec::with_capacity(4096);
    let mut latencies = Vec::with_capacity(64 * 1024);
    let mut errors = 0;
    let mut id = 0u64;
    loop {
        let now = Instant::now();
        if now >= end {
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
        if t0 >= measure_from && done <= end {
            let ns = done.duration_since(t0).as_nanos().min(u32::MAX as u128) as u32;
            latencies.push(ns);
            if check_replies && !contains(&reply, b"\"ok\":true") {
                errors += 1;
            }
        }
    }
    Ok(Sample {
        latencies_ns: latencies,
        errors,
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A bare echo server on a temporary socket, on its own runtime thread(s).
struct EchoServer {
    path: PathBuf,
    dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoServer {
    fn start(threads: usize) -> anyhow::Result<EchoServer> {
        use std::os::unix::fs::DirBuilderExt as _;
        let dir = std::env::temp_dir().join(format!(
            "tm-agent-bench-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("echo.sock");
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
            dir,
            stop: Some(stop),
            thread: Some(thread),
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
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn fmt_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2}ms", us / 1000.0)
    } else {
        format!("{us:.0}µs")
    }
}

/// Prints the human-readable report.
pub fn print_report(
    out: &mut dyn std::io::Write,
    r: &BenchReport,
    args: &BenchArgs,
) -> std::io::Result<()> {
    writeln!(
        out,
        "op={:?} connections={} pipeline={} duration={}s warmup={}s threads={}",
        r.op, r.connections, r.pipeline, args.duration, args.warmup, args.threads
    )?;
    writeln!(
        out,
        "{:<14} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "", "requests", "req/s", "p50", "p90", "p99", "p99.9", "max", "errors"
    )?;
    let mut row = |name: &str, m: &Measurement| {
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
    };
    row("agent", &r.agent)?;
    if let Some(b) = &r.baseline {
        row("echo baseline", b)?;
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
}
