//! The HTTP(S) front: listeners, the TLS handshake, one hyper HTTP/1.1 connection per task,
//! routing, and the headers every answer carries (`Date` from the simulator's clock,
//! `X-Request-Id`).
//!
//! Threading: each listener runs an accept loop task and each connection its own task, all
//! on one `TaskTracker` and stopped by one `CancellationToken`; a semaphore caps open
//! connections. Handlers touch the state only through short `state::lock` sections.
//! A handler that returns `Err` makes hyper drop the connection; the `ResetIo` wrapper then
//! closes the socket with `SO_LINGER` 0 so the peer sees a TCP reset, not a clean close.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::error::SimError;
use super::fault::Endpoint;
use super::keys::random_uuid;
use super::state::{lock, Shared};
use super::{admin, api};

/// Request bodies above this are refused (no real request comes close).
const MAX_BODY: usize = 64 * 1024;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) type Body = Full<Bytes>;
pub(crate) type Resp = Response<Body>;

/// What every handler gets: the state and the shutdown signal.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub state: Shared,
    pub cancel: CancellationToken,
}

impl Ctx {
    /// Sleeps for `d` unless the simulator shuts down first (then returns false).
    pub(crate) async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.cancel.cancelled() => false,
        }
    }
}

/// A JSON answer.
pub(crate) fn json_response(status: StatusCode, body: &impl Serialize) -> Resp {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The API's error envelope `{"type", "message", "request_id"}`.
pub(crate) fn envelope(status: StatusCode, kind: &str, message: &str, request_id: &str) -> Resp {
    json_response(
        status,
        &serde_json::json!({"type": kind, "message": message, "request_id": request_id}),
    )
}

/// Starts the accept loop of one listener (`tls` set for HTTPS).
pub(crate) fn spawn_listener(
    ctx: Ctx,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    tracker: TaskTracker,
    conns: Arc<Semaphore>,
) {
    tracker
        .clone()
        .spawn(accept_loop(ctx, listener, tls, tracker, conns));
}

async fn accept_loop(
    ctx: Ctx,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    tracker: TaskTracker,
    conns: Arc<Semaphore>,
) {
    loop {
        let permit = tokio::select! {
            _ = ctx.cancel.cancelled() => return,
            p = conns.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = ctx.cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Typically EMFILE: wait a little rather than spin on the error.
                    tracing::warn!(error = %e, "accept failed");
                    if !ctx.sleep(Duration::from_millis(100)).await {
                        return;
                    }
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let drop_flag = Arc::new(AtomicBool::new(false));
        let io = ResetIo {
            inner: tcp,
            drop_now: drop_flag.clone(),
        };
        let ctx = ctx.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            let _permit = permit;
            match tls {
                None => serve(ctx, io, peer, drop_flag).await,
                Some(acceptor) => {
                    let hs = tokio::select! {
                        _ = ctx.cancel.cancelled() => return,
                        r = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(io)) => r,
                    };
                    match hs {
                        Ok(Ok(stream)) => serve(ctx, stream, peer, drop_flag).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

async fn serve<IO>(ctx: Ctx, io: IO, peer: SocketAddr, drop_flag: Arc<AtomicBool>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc_ctx = ctx.clone();
    let service = service_fn(move |req| {
        let ctx = svc_ctx.clone();
        let drop_flag = drop_flag.clone();
        async move { route(ctx, req, peer, drop_flag).await }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // The Date header comes from the simulator's (offset) clock instead.
        .auto_date_header(false);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let res = tokio::select! {
        r = conn.as_mut() => r,
        _ = ctx.cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = res {
        tracing::debug!(%peer, error = %e, "connection ended");
    }
}

async fn route(
    ctx: Ctx,
    req: Request<Incoming>,
    peer: SocketAddr,
    drop_flag: Arc<AtomicBool>,
) -> Result<Resp, SimError> {
    let request_id = random_uuid();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let started = Instant::now();
    match dispatch(&ctx, req, peer, &request_id).await {
        Ok(mut resp) => {
            let date = httpdate::fmt_http_date(lock(&ctx.state).now_system());
            let headers = resp.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&date) {
                headers.insert(header::DATE, v);
            }
            if let Ok(v) = HeaderValue::from_str(&request_id) {
                headers.insert("x-request-id", v);
            }
            tracing::info!(
                %peer, %method, path, status = resp.status().as_u16(), request_id,
                elapsed_ms = started.elapsed().as_millis() as u64, "request"
            );
            Ok(resp)
        }
        Err(e) => {
            drop_flag.store(true, Ordering::SeqCst);
            tracing::info!(%peer, %method, path, request_id, reason = %e, "connection dropped");
            Err(e)
        }
    }
}

async fn dispatch(
    ctx: &Ctx,
    req: Request<Incoming>,
    peer: SocketAddr,
    request_id: &str,
) -> Result<Resp, SimError> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    if path == "/_sim" || path.starts_with("/_sim/") {
        lock(&ctx.state).counters.requests.admin += 1;
        if !admin::peer_allowed(peer) {
            return Ok(envelope(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the simulator admin API only answers loopback clients",
                request_id,
            ));
        }
        let Some(body) = read_body(req.into_body()).await? else {
            return Ok(too_large(request_id));
        };
        return Ok(admin::handle(ctx, &method, &path, &body, request_id));
    }
    let (endpoint, allowed) = match path.as_str() {
        "/v1/auth/api-key/token" => (Endpoint::Mint, Method::POST),
        "/v1/auth/token/refresh" => (Endpoint::Refresh, Method::POST),
        "/.well-known/jwks.json" => (Endpoint::Jwks, Method::GET),
        _ => {
            lock(&ctx.state).counters.requests.other += 1;
            return Ok(envelope(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint",
                request_id,
            ));
        }
    };
    if method != allowed {
        lock(&ctx.state).counters.requests.other += 1;
        let mut resp = envelope(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            &format!("use {allowed}"),
            request_id,
        );
        if let Ok(v) = HeaderValue::from_str(allowed.as_str()) {
            resp.headers_mut().insert(header::ALLOW, v);
        }
        return Ok(resp);
    }
    let Some(body) = read_body(req.into_body()).await? else {
        lock(&ctx.state).counters.request(endpoint);
        return Ok(too_large(request_id));
    };
    api::handle(ctx, endpoint, &body, request_id).await
}

fn too_large(request_id: &str) -> Resp {
    envelope(
        StatusCode::PAYLOAD_TOO_LARGE,
        "bad_request",
        "request body too large",
        request_id,
    )
}

/// The whole body, or `None` if it exceeds `MAX_BODY`.
async fn read_body(body: Incoming) -> Result<Option<Bytes>, SimError> {
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(Some(collected.to_bytes())),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Ok(None),
        Err(e) => Err(SimError::Runtime(format!("reading request body: {e}"))),
    }
}

/// A TCP stream that, once `drop_now` is set, refuses further writes and is closed with
/// `SO_LINGER` 0 (an RST) when dropped.
struct ResetIo {
    inner: TcpStream,
    drop_now: Arc<AtomicBool>,
}

impl ResetIo {
    fn dropping(&self) -> bool {
        self.drop_now.load(Ordering::SeqCst)
    }
}

fn reset_err() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "injected connection drop")
}

impl Drop for ResetIo {
    fn drop(&mut self) {
        if self.dropping() {
            let _ = self.inner.set_zero_linger();
        }
    }
}

impl AsyncRead for ResetIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResetIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.dropping() {
            return Poll::Ready(Err(reset_err()));
        }
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.dropping() {
            return Poll::Ready(Err(reset_err()));
        }
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.dropping() {
            return Poll::Ready(Err(reset_err()));
        }
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.dropping() {
            return Poll::Ready(Err(reset_err()));
        }
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
