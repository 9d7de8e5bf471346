//! `tm-agent bench --inline-server SESSIONS`: the floor of any signer served over a Unix
//! socket on this machine.
//!
//! A bare server on a temporary socket. Each of its threads owns one session of the key (one
//! backend worker) and serves its share of the connections, dealt out round-robin at accept,
//! on its own single-threaded runtime. A request line is hashed (SHA-256), signed, normalized
//! to low-S and answered on the thread that read it, as `{"ok":true,"signature":"…"}`: no
//! JSON parsing, no authorization, no audit, no hand-off between threads. So a request costs
//! the bare echo's round trip plus one `C_SignInit` + `C_Sign`, and a session never idles
//! while a request waits for it. No agent design can do better with as many sessions; the
//! agent does not work this way on purpose, since a `C_Sign` that hangs here stalls every
//! connection of its thread (DESIGN.md keeps signing on the signer's own threads).
//!
//! Each thread also times its own `C_SignInit` + `C_Sign` calls that start inside the
//! measured window ([`InlineServer::finish`]): a signature made right after a wake-up, next
//! to `--raw-pkcs11`'s back-to-back loop.
//!
//! With `--busy-poll` (one session, one connection) the server is a [`SpinServer`] instead:
//! the same signing per line, on one thread that spins on its socket rather than sleeping.
//!
//! Threads: one per session (`bench-inline-N`); the acceptor runs on session 0's runtime.
//! A thread's connections share its worker through an `Rc<RefCell<…>>`, borrowed only while
//! signing and never across an `.await`. Dropping the server stops the threads (their
//! workers close the sessions) and removes the socket.

use std::cell::RefCell;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use anyhow::Context as _;
use p256::ecdsa::signature::hazmat::PrehashVerifier as _;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use super::busy_poll::{LineHandler, SpinServer};
use super::TempDir;
use crate::signer::{KeyInfo, Signer};

type Inbox = mpsc::UnboundedSender<std::os::unix::net::UnixStream>;

/// The running server; see the module docs.
pub struct InlineServer(Serving);

enum Serving {
    Threads(Threaded),
    /// `--busy-poll`: one session on one thread that spins on its connection.
    Spinning(SpinServer<LineSigner>),
}

impl InlineServer {
    /// Starts one thread per worker (with `busy_poll`, exactly one worker, on a thread that
    /// busy-polls its connection). Each worker first signs a probe that must verify with
    /// `info`'s public key. Signatures that start within `timed` are timed.
    pub fn start(
        info: &KeyInfo,
        workers: Vec<Box<dyn Signer>>,
        timed: Range<Instant>,
        busy_poll: bool,
    ) -> anyhow::Result<InlineServer> {
        if workers.is_empty() {
            anyhow::bail!("the inline server needs at least one session");
        }
        let mut workers = workers;
        let probe = crate::jose::sha256(b"tm-agent bench inline probe");
        for worker in &mut workers {
            let signature = worker.sign_digest(&probe)?;
            info.public_key
                .verify_prehash(&probe, &signature)
                .context("a probe signature of the inline server does not verify")?;
        }
        if !busy_poll {
            return Ok(InlineServer(Serving::Threads(Threaded::start(
                workers, timed,
            )?)));
        }
        let Some(worker) = workers.pop().filter(|_| workers.is_empty()) else {
            anyhow::bail!("a busy-polling inline server has one session (--inline-server 1)");
        };
        let signer = LineSigner {
            worker,
            timings: Timings::new(timed),
        };
        Ok(InlineServer(Serving::Spinning(SpinServer::start(
            "inline", signer,
        )?)))
    }

    /// The server's socket.
    pub fn path(&self) -> &Path {
        match &self.0 {
            Serving::Threads(threaded) => &threaded.path,
            Serving::Spinning(spinning) => spinning.path(),
        }
    }

    /// Stops the server and returns the durations (ns) of the signatures timed, all threads
    /// together, unsorted.
    pub fn finish(self) -> Vec<u32> {
        match self.0 {
            Serving::Threads(threaded) => threaded.finish(),
            Serving::Spinning(spinning) => spinning
                .finish()
                .map(|signer| signer.timings.nanos)
                .unwrap_or_default(),
        }
    }
}

/// One thread per session, each on its own single-threaded runtime.
struct Threaded {
    path: PathBuf,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<Vec<u32>>>,
    /// Removed after the threads have stopped (fields drop after `Drop::drop`).
    _dir: TempDir,
}

impl Threaded {
    fn start(workers: Vec<Box<dyn Signer>>, timed: Range<Instant>) -> anyhow::Result<Threaded> {
        let dir = TempDir::new("inline")?;
        let path = dir.path.join("inline.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path)
            .with_context(|| format!("cannot bind {}", path.display()))?;
        listener.set_nonblocking(true)?;

        let (inboxes, receivers): (Vec<Inbox>, Vec<_>) =
            workers.iter().map(|_| mpsc::unbounded_channel()).unzip();
        let mut acceptor = Some((listener, inboxes));
        let mut server = Threaded {
            path,
            stops: Vec::new(),
            threads: Vec::new(),
            _dir: dir,
        };
        for (index, (worker, inbox)) in workers.into_iter().zip(receivers).enumerate() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .context("cannot start an inline server runtime")?;
            let (stop, stopped) = oneshot::channel();
            let accepting = acceptor.take();
            let timed = timed.clone();
            let thread = std::thread::Builder::new()
                .name(format!("bench-inline-{index}"))
                .spawn(move || {
                    let local = tokio::task::LocalSet::new();
                    let timings = Rc::new(RefCell::new(Timings::new(timed)));
                    let served = serve(worker, inbox, accepting, stopped, Rc::clone(&timings));
                    local.block_on(&runtime, served);
                    drop(local);
                    Rc::try_unwrap(timings)
                        .map(|t| t.into_inner().nanos)
                        .unwrap_or_default()
                })
                .context("cannot start an inline server thread")?;
            server.stops.push(stop);
            server.threads.push(thread);
        }
        Ok(server)
    }

    fn finish(mut self) -> Vec<u32> {
        self.stop();
        let mut nanos = Vec::new();
        for thread in self.threads.drain(..) {
            nanos.extend(thread.join().unwrap_or_default());
        }
        nanos
    }

    fn stop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
    }
}

impl Drop for Threaded {
    fn drop(&mut self) {
        self.stop();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// One thread's signing times.
struct Timings {
    window: Range<Instant>,
    nanos: Vec<u32>,
}

impl Timings {
    fn new(window: Range<Instant>) -> Timings {
        Timings {
            window,
            nanos: Vec::with_capacity(64 * 1024),
        }
    }

    fn record(&mut self, t0: Instant, done: Instant) {
        if self.window.contains(&t0) {
            let nanos = done.duration_since(t0).as_nanos();
            self.nanos.push(nanos.min(u128::from(u32::MAX)) as u32);
        }
    }
}

/// One session's thread: accepts (session 0 only), takes its connections from `inbox` and
/// answers them until `stopped`.
async fn serve(
    worker: Box<dyn Signer>,
    mut inbox: mpsc::UnboundedReceiver<std::os::unix::net::UnixStream>,
    accepting: Option<(std::os::unix::net::UnixListener, Vec<Inbox>)>,
    stopped: oneshot::Receiver<()>,
    timings: Rc<RefCell<Timings>>,
) {
    let worker = Rc::new(RefCell::new(worker));
    let accept = async move {
        let Some((listener, inboxes)) = accepting else {
            return std::future::pending::<()>().await;
        };
        let Ok(listener) = UnixListener::from_std(listener) else {
            return;
        };
        for next in (0..inboxes.len()).cycle() {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            if let Ok(stream) = stream.into_std() {
                let _ = inboxes[next].send(stream);
            }
        }
    };
    let connections = async {
        while let Some(stream) = inbox.recv().await {
            if let Ok(stream) = UnixStream::from_std(stream) {
                let timings = Rc::clone(&timings);
                tokio::task::spawn_local(answer(stream, Rc::clone(&worker), timings));
            }
        }
    };
    tokio::select! {
        _ = stopped => {}
        _ = accept => {}
        _ = connections => {}
    }
}

/// Answers one connection's lines in order until it closes.
async fn answer(
    stream: UnixStream,
    worker: Rc<RefCell<Box<dyn Signer>>>,
    timings: Rc<RefCell<Timings>>,
) {
    let (rd, mut wr) = stream.into_split();
    let mut reader = BufReader::with_capacity(64 * 1024, rd);
    let mut line = Vec::with_capacity(256);
    let mut reply = Vec::with_capacity(256);
    loop {
        line.clear();
        reply.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        sign_line(
            &mut **worker.borrow_mut(),
            &mut timings.borrow_mut(),
            &line,
            &mut reply,
        );
        if wr.write_all(&reply).await.is_err() {
            return;
        }
    }
}

/// Signs `line`'s SHA-256 with `worker`, timing the signature, and puts the reply line in
/// `reply` (empty on entry).
fn sign_line(worker: &mut dyn Signer, timings: &mut Timings, line: &[u8], reply: &mut Vec<u8>) {
    let digest = crate::jose::sha256(line);
    let t0 = Instant::now();
    let signed = worker.sign_digest(&digest);
    timings.record(t0, Instant::now());
    match signed {
        Ok(signature) => {
            let signature = crate::jose::normalize_low_s(signature);
            reply.extend_from_slice(b"{\"ok\":true,\"signature\":\"");
            reply.extend_from_slice(crate::jose::encode_es256(&signature).as_bytes());
            reply.extend_from_slice(b"\"}\n");
        }
        Err(_) => reply.extend_from_slice(b"{\"ok\":false}\n"),
    }
}

/// The busy-polling server's one session.
struct LineSigner {
    worker: Box<dyn Signer>,
    timings: Timings,
}

impl LineHandler for LineSigner {
    fn answer(&mut self, line: &[u8], reply: &mut Vec<u8>) {
        sign_line(&mut *self.worker, &mut self.timings, line, reply);
    }
}
