//! `tm-agent bench --busy-poll`: one connection whose ends never sleep while they wait.
//!
//! On this kind of VM a thread that sleeps in `epoll_wait` or `read` until a peer's bytes
//! arrive costs a wake-up of its vCPU on each round trip (docs/performance.md). With
//! `--busy-poll` the load generator's one connection and the servers the bench starts itself
//! (the echo baseline, `--inline-server 1`) spin on non-blocking sockets instead, so a round
//! trip carries no wake-up at their ends. The agent does not busy-poll: against it, only the
//! client spins.
//!
//! Owns [`SpinServer`] (a busy-polling line server on a temporary socket, serving one
//! connection at a time through a [`LineHandler`]) and [`drive`] (the busy-polling client).
//! Threads: a server runs on one thread of its own (`bench-spin-TAG`) that owns its handler
//! and gives it back at [`SpinServer::finish`]; [`drive`] spins on the calling thread, which
//! must not be a runtime worker. One spinning thread per end: with more, on 2 vCPUs, the
//! spinners take the CPU from each other.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;

use super::{contains, Sample, TempDir, Template, Window};

/// The longest request line a server or the client takes (the agent's own limit).
const MAX_LINE: usize = 64 * 1024;

/// How long after the end of its window the client still waits for a reply.
const GIVE_UP: std::time::Duration = std::time::Duration::from_secs(10);

/// Answers one request line; `reply` is empty on entry and must end with `\n`.
pub trait LineHandler: Send + 'static {
    fn answer(&mut self, line: &[u8], reply: &mut Vec<u8>);
}

/// The echo baseline: each line back as it came.
pub struct Echo;

impl LineHandler for Echo {
    fn answer(&mut self, line: &[u8], reply: &mut Vec<u8>) {
        reply.extend_from_slice(line);
    }
}

/// A busy-polling line server on a temporary socket; see the module docs.
pub struct SpinServer<H: LineHandler> {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<H>>,
    /// Removed after the thread has stopped (fields drop after `Drop::drop`).
    _dir: TempDir,
}

impl<H: LineHandler> SpinServer<H> {
    /// Binds a socket in a new temporary directory and starts serving it with `handler`.
    pub fn start(tag: &str, handler: H) -> anyhow::Result<SpinServer<H>> {
        let dir = TempDir::new(tag)?;
        let path = dir.path.join(format!("{tag}.sock"));
        let listener =
            UnixListener::bind(&path).with_context(|| format!("cannot bind {}", path.display()))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(format!("bench-spin-{tag}"))
            .spawn(move || {
                let mut handler = handler;
                serve(&listener, &stopping, &mut handler);
                handler
            })
            .context("cannot start a busy-polling server thread")?;
        Ok(SpinServer {
            path,
            stop,
            thread: Some(thread),
            _dir: dir,
        })
    }

    /// The server's socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops the server and gives its handler back (`None` if the thread panicked).
    pub fn finish(mut self) -> Option<H> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl<H: LineHandler> Drop for SpinServer<H> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serves one connection at a time until `stop`. Between connections it yields the CPU
/// rather than spinning hard: only a round trip's wait is on the measured path.
fn serve(listener: &UnixListener, stop: &AtomicBool, handler: &mut impl LineHandler) {
    let mut buf = vec![0u8; MAX_LINE];
    let mut reply = Vec::with_capacity(256);
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                if stream.set_nonblocking(true).is_ok() {
                    let stopped = || stop.load(Ordering::Relaxed);
                    answer_lines(stream, &stopped, handler, &mut buf, &mut reply);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::yield_now(),
            Err(_) => return,
        }
    }
}

/// Answers each complete line of `stream` in order until it closes, fails, sends a line
/// longer than `buf`, or `stopped()`.
fn answer_lines(
    mut stream: UnixStream,
    stopped: &dyn Fn() -> bool,
    handler: &mut impl LineHandler,
    buf: &mut [u8],
    reply: &mut Vec<u8>,
) {
    let mut filled = 0;
    loop {
        let n = match read_spinning(&mut stream, &mut buf[filled..], stopped) {
            Ok(n) if n > 0 => n,
            _ => return,
        };
        let mut start = 0;
        for end in filled..filled + n {
            if buf[end] == b'\n' {
                reply.clear();
                handler.answer(&buf[start..=end], reply);
                if write_spinning(&mut stream, reply, stopped).is_err() {
                    return;
                }
                start = end + 1;
            }
        }
        filled += n;
        buf.copy_within(start..filled, 0);
        filled -= start;
        if filled == buf.len() {
            return; // a line longer than the agent would take
        }
    }
}

/// Reads what is there, spinning until something is (0 at end of stream). An empty `buf`
/// or `stopped()` ends it with 0 too.
fn read_spinning(
    stream: &mut UnixStream,
    buf: &mut [u8],
    stopped: &dyn Fn() -> bool,
) -> std::io::Result<usize> {
    if buf.is_empty() {
        return Ok(0);
    }
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                if stopped() {
                    return Ok(0);
                }
                std::hint::spin_loop();
            }
            other => return other,
        }
    }
}

/// Writes all of `bytes`, spinning while the socket's buffer is full (until `stopped()`).
fn write_spinning(
    stream: &mut UnixStream,
    mut bytes: &[u8],
    stopped: &dyn Fn() -> bool,
) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match stream.write(bytes) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                if stopped() {
                    return Err(ErrorKind::TimedOut.into());
                }
                std::hint::spin_loop();
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The busy-polling client: one connection to `socket`, one request in flight, over
/// `window`. Blocks (spinning) for the whole window: call it off the runtime. A server that
/// stops answering is given up [`GIVE_UP`] after the window's end, rather than spun on for
/// ever.
pub fn drive(
    socket: &Path,
    template: &Template,
    window: Window,
    check_replies: bool,
) -> anyhow::Result<Sample> {
    drive_until(
        socket,
        template,
        window,
        check_replies,
        window.end + GIVE_UP,
    )
}

/// [`drive`], giving up on a reply at `give_up`.
fn drive_until(
    socket: &Path,
    template: &Template,
    window: Window,
    check_replies: bool,
    give_up: Instant,
) -> anyhow::Result<Sample> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    stream.set_nonblocking(true)?;
    let late = || Instant::now() >= give_up;
    let mut out = Vec::with_capacity(256);
    let mut reply = vec![0u8; MAX_LINE];
    let mut sample = Sample::with_capacity(256 * 1024);
    let mut id = 0u64;
    loop {
        let t0 = Instant::now();
        if t0 >= window.end {
            return Ok(sample);
        }
        id += 1;
        out.clear();
        template.render(id, &mut out);
        write_spinning(&mut stream, &out, &late)?;
        let mut filled = 0;
        while filled == 0 || reply[filled - 1] != b'\n' {
            let n = read_spinning(&mut stream, &mut reply[filled..], &late)?;
            if n == 0 && late() {
                anyhow::bail!("no reply long after the end of the run: is the server hung?");
            }
            if n == 0 {
                anyhow::bail!("the server closed the connection (or sent a line over 64 KiB)");
            }
            filled += n;
        }
        let done = Instant::now();
        sample.record(&window, t0, done, || {
            !check_replies || contains(&reply[..filled], b"\"ok\":true")
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead as _;

    /// Counts lines and answers each with its number, to see lines split across reads and
    /// several lines in one read.
    struct Numbered(usize);

    impl LineHandler for Numbered {
        fn answer(&mut self, line: &[u8], reply: &mut Vec<u8>) {
            self.0 += 1;
            reply.extend_from_slice(format!("{} {}", self.0, line.len()).as_bytes());
            reply.push(b'\n');
        }
    }

    #[test]
    fn spin_server_answers_whole_lines_in_order_and_gives_its_handler_back() {
        let server = SpinServer::start("test", Numbered(0)).unwrap();
        let mut client = UnixStream::connect(server.path()).unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut reader = std::io::BufReader::new(client.try_clone().unwrap());
        client.write_all(b"ab").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        client.write_all(b"c\nd\nef\n").unwrap();
        let mut lines = Vec::new();
        for _ in 0..3 {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            lines.push(line);
        }
        assert_eq!(lines, ["1 4\n", "2 2\n", "3 3\n"]);
        drop((client, reader));
        let path = server.path().to_path_buf();
        let handler = server.finish().unwrap();
        assert_eq!(handler.0, 3);
        assert!(!path.exists(), "the socket outlived the server");
    }

    #[test]
    fn spin_server_drops_a_line_over_the_limit() {
        let server = SpinServer::start("test-long", Echo).unwrap();
        let mut client = UnixStream::connect(server.path()).unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        // The server closes at the limit; it may do so while this write is still going.
        let _ = client.write_all(&vec![b'x'; MAX_LINE + 1]);
        let mut rest = Vec::new();
        let read = client.read_to_end(&mut rest);
        assert!(rest.is_empty(), "no echo of a part of the line");
        assert!(read.is_ok() || read.unwrap_err().kind() == ErrorKind::ConnectionReset);
        assert!(server.finish().is_some());
    }

    #[test]
    fn busy_polling_client_against_the_echo_server() {
        let server = SpinServer::start("test-echo", Echo).unwrap();
        let template = Template::new(super::super::BenchOp::Ping, None);
        // Long enough for more than 10 round trips even when other tests take a CPU and
        // each round trip waits for a time slice.
        let window = Window {
            measure_from: Instant::now(),
            end: Instant::now() + std::time::Duration::from_secs(1),
        };
        let sample = drive(server.path(), &template, window, false).unwrap();
        assert!(
            sample.latencies_ns.len() > 10,
            "{}",
            sample.latencies_ns.len()
        );
        assert_eq!(sample.errors, 0);
        // Echoed lines are not replies: checking them counts each as an error.
        let window = Window {
            measure_from: Instant::now(),
            end: Instant::now() + std::time::Duration::from_millis(500),
        };
        let sample = drive(server.path(), &template, window, true).unwrap();
        assert!(!sample.latencies_ns.is_empty());
        assert_eq!(sample.errors, sample.latencies_ns.len() as u64);
        assert!(server.finish().is_some());
    }

    /// A server that reads but never answers: the client gives up instead of spinning on.
    #[test]
    fn busy_polling_client_gives_up_on_a_silent_server() {
        let dir = TempDir::new("test-silent").unwrap();
        let path = dir.path.join("silent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let silent = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink);
        });
        let template = Template::new(super::super::BenchOp::Ping, None);
        let now = Instant::now();
        // The window outlasts any pause before the first request, so that one is sent.
        let window = Window {
            measure_from: now,
            end: now + std::time::Duration::from_secs(1),
        };
        let give_up = now + std::time::Duration::from_millis(1300);
        let Err(err) = drive_until(&path, &template, window, false, give_up) else {
            panic!("a silent server gave replies");
        };
        assert!(Instant::now() >= give_up);
        assert!(err.to_string().contains("hung"), "{err}");
        silent.join().unwrap();
    }
}
