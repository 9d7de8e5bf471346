//! The Rust client for the agent's socket, in two flavours: [`Client`] (blocking, std) and
//! [`AsyncClient`] (tokio). Used by the CLI, the tests and any Rust trading process.
//!
//! Owns: finding the socket (`--socket`, `$TM_AGENT_SOCK`, [`DEFAULT_SOCKET`]), framing
//! requests with the [`crate::protocol`] types, matching replies by id, and turning error
//! replies into [`ClientError`] with the CLI's exit codes.
//!
//! Both flavours send one request at a time per connection (open more connections for
//! parallelism: they are cheap); `watch` turns a connection into a stream of tokens.
//! A client is used from one thread or task at a time (`&mut self`); nothing is shared.

use std::io::{self, BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

use crate::protocol::{
    self, Body, ErrorCode, Event, PingResult, PublicKeyResult, Request, Response,
    SignChallengeResult, StampResult, StatusResult, TokenResult,
};

/// The socket path used when neither `--socket` nor `$TM_AGENT_SOCK` is given.
pub const DEFAULT_SOCKET: &str = "/run/tm-agent/agent.sock";

/// The environment variable naming the socket.
pub const SOCKET_ENV: &str = "TM_AGENT_SOCK";

/// How long a request may take by default (a `token` may wait for a renewal).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Replies longer than this are refused (the agent's replies are a few KiB).
const MAX_REPLY: u64 = 1024 * 1024;

/// The socket to use: `explicit`, else `$TM_AGENT_SOCK`, else [`DEFAULT_SOCKET`].
pub fn socket_path(explicit: Option<&Path>) -> PathBuf {
    if let Some(path) = explicit {
        return path.to_path_buf();
    }
    match std::env::var_os(SOCKET_ENV) {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(DEFAULT_SOCKET),
    }
}

/// CLI exit codes (documented in `proto/PROTOCOL.md`).
pub mod exit {
    pub const OK: i32 = 0;
    /// An unexpected failure: lost connection, malformed reply, a bug.
    pub const FAILURE: i32 = 1;
    /// Wrong command-line usage (clap's convention).
    pub const USAGE: i32 = 2;
    /// The agent cannot be reached (not running, or no permission on the socket).
    pub const CONNECT: i32 = 3;
    /// The agent refused: `forbidden`.
    pub const FORBIDDEN: i32 = 4;
    /// Temporarily impossible: `unavailable`, `busy`, `timeout`, or no reply in time.
    pub const TEMPORARY: i32 = 5;
    /// Any other error reply: `bad_request`, `unknown_profile`, `unsupported_version`,
    /// `signer_error`, `internal`.
    pub const AGENT: i32 = 6;
}

/// What went wrong talking to the agent. Messages say what to do next.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {}: {}", path.display(), connect_hint(source))]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("lost the connection to the agent: {0}")]
    Io(#[from] io::Error),
    #[error("the agent did not answer within {0:?}: it may be overloaded; retry")]
    Timeout(Duration),
    #[error("unexpected reply from the agent: {0}")]
    Protocol(String),
    #[error("{}", agent_message(*code, message))]
    Agent { code: ErrorCode, message: String },
}

fn connect_hint(err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => format!(
            "{err}: is tm-agent running? (systemctl status tm-agent; or set --socket / ${SOCKET_ENV})"
        ),
        io::ErrorKind::PermissionDenied => format!(
            "{err}: your user may not open the socket; ask for it to be added to the socket's group"
        ),
        _ => err.to_string(),
    }
}

fn agent_message(code: ErrorCode, message: &str) -> String {
    match code {
        ErrorCode::Forbidden if message.starts_with("permission denied") => message.to_owned(),
        // Not an access rule: a request the agent refuses to sign whoever asks.
        ErrorCode::Forbidden => format!("refused by the agent: {message} ({code})"),
        _ => format!("{message} ({code})"),
    }
}

impl ClientError {
    /// The error code of an error reply.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Agent { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The CLI exit code for this error (see [`exit`]).
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Connect { .. } => exit::CONNECT,
            ClientError::Io(_) | ClientError::Protocol(_) => exit::FAILURE,
            ClientError::Timeout(_) => exit::TEMPORARY,
            ClientError::Agent { code, .. } => match code {
                ErrorCode::Forbidden => exit::FORBIDDEN,
                ErrorCode::Unavailable | ErrorCode::Busy | ErrorCode::Timeout => exit::TEMPORARY,
                _ => exit::AGENT,
            },
        }
    }
}

/// One line of a `watch` stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Token(TokenResult),
    /// The agent is shutting down; the stream is over.
    End {
        reason: String,
    },
}

fn encode(id: u64, body: Body<'_>) -> Vec<u8> {
    let request = Request { id, body };
    // Serializing a request into memory cannot fail.
    let mut line = serde_json::to_vec(&request.to_raw()).unwrap_or_default();
    line.push(b'\n');
    line
}

fn decode<T: DeserializeOwned>(id: u64, line: &[u8]) -> Result<T, ClientError> {
    let reply: Response<serde_json::Value> = serde_json::from_slice(line)
        .map_err(|e| ClientError::Protocol(format!("not a reply line ({e})")))?;
    check_id(id, &reply)?;
    into_result(reply)
}

/// Whether `reply` answers request `sent`: its own reply, or an error with a null `id`,
/// which the agent sends about the connection rather than a request (`busy` at the
/// connection cap, a line it could not read) and which ends whatever was asked.
fn check_id(sent: u64, reply: &Response<serde_json::Value>) -> Result<(), ClientError> {
    match reply.id {
        Some(id) if id == sent => Ok(()),
        None if !reply.ok => Ok(()),
        got => Err(ClientError::Protocol(format!(
            "reply for request {got:?}, expected {sent}"
        ))),
    }
}

fn into_result<T: DeserializeOwned>(reply: Response<serde_json::Value>) -> Result<T, ClientError> {
    if reply.ok {
        let result = reply
            .result
            .ok_or_else(|| ClientError::Protocol("a success reply without `result`".into()))?;
        serde_json::from_value(result)
            .map_err(|e| ClientError::Protocol(format!("unexpected result ({e})")))
    } else {
        let error = reply
            .error
            .ok_or_else(|| ClientError::Protocol("an error reply without `error`".into()))?;
        Err(ClientError::Agent {
            code: error.code,
            message: error.message.into_owned(),
        })
    }
}

fn decode_event(id: u64, line: &[u8]) -> Result<WatchEvent, ClientError> {
    let reply: Response<serde_json::Value> = serde_json::from_slice(line)
        .map_err(|e| ClientError::Protocol(format!("not a reply line ({e})")))?;
    check_id(id, &reply)?;
    match reply.event {
        Some(Event::End) => {
            let end: protocol::WatchEnd = into_result(reply)?;
            Ok(WatchEvent::End { reason: end.reason })
        }
        _ => into_result(reply).map(WatchEvent::Token),
    }
}

fn out_of_step() -> ClientError {
    ClientError::Io(io::Error::new(
        io::ErrorKind::NotConnected,
        "an earlier request on this connection failed or timed out, and its reply may still \
         arrive: connect again",
    ))
}

fn oversize() -> ClientError {
    ClientError::Protocol(format!("a reply longer than {MAX_REPLY} bytes"))
}

/// A blocking connection to the agent.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    timeout: Option<Duration>,
    /// A call failed between sending and reading its whole reply: the reply may still come
    /// and would be read as the next call's, so the connection is not used again.
    out_of_step: bool,
}

impl Client {
    /// Connects to the socket at `path`, with [`DEFAULT_TIMEOUT`] per request.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let writer = stream.try_clone()?;
        let mut client = Client {
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
            timeout: None,
            out_of_step: false,
        };
        client.set_timeout(Some(DEFAULT_TIMEOUT))?;
        Ok(client)
    }

    /// How long to wait for each reply (`None`: forever).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.reader.get_ref().set_read_timeout(timeout)?;
        self.writer.set_write_timeout(timeout)?;
        self.timeout = timeout;
        Ok(())
    }

    /// Sends one request and returns its result. After a timeout or a broken reply, the
    /// connection refuses further calls: connect again.
    pub fn call<T: DeserializeOwned>(&mut self, body: Body<'_>) -> Result<T, ClientError> {
        if self.out_of_step {
            return Err(out_of_step());
        }
        self.out_of_step = true;
        let id = self.send(body)?;
        let line = self.read_line()?;
        let result = decode(id, &line);
        self.out_of_step = matches!(result, Err(ClientError::Protocol(_)));
        result
    }

    fn send(&mut self, body: Body<'_>) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        self.writer
            .write_all(&encode(id, body))
            .map_err(|e| self.io(e))?;
        Ok(id)
    }

    fn read_line(&mut self) -> Result<Vec<u8>, ClientError> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_REPLY)
            .read_until(b'\n', &mut line)
            .map_err(|e| self.io(e))?;
        if n == 0 {
            return Err(ClientError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the agent closed the connection",
            )));
        }
        if line.last() != Some(&b'\n') {
            return Err(oversize());
        }
        Ok(line)
    }

    fn io(&self, err: io::Error) -> ClientError {
        match (err.kind(), self.timeout) {
            (io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut, Some(t)) => {
                ClientError::Timeout(t)
            }
            _ => ClientError::Io(err),
        }
    }

    /// Checks that the agent answers.
    pub fn ping(&mut self) -> Result<(), ClientError> {
        self.call::<PingResult>(Body::Ping).map(|_| ())
    }

    /// Turns the connection into a stream of tokens: the current one, then each rotation.
    /// Waits for events without a timeout.
    pub fn watch(mut self, profile: &str) -> Result<Watch, ClientError> {
        let id = self.send(Body::Watch {
            profile: profile.into(),
        })?;
        self.set_timeout(None)?;
        Ok(Watch {
            client: self,
            id,
            done: false,
        })
    }
}

/// A blocking `watch` stream; ends after an `end` event or an error.
#[derive(Debug)]
pub struct Watch {
    client: Client,
    id: u64,
    done: bool,
}

impl Iterator for Watch {
    type Item = Result<WatchEvent, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let event = self
            .client
            .read_line()
            .and_then(|line| decode_event(self.id, &line));
        self.done = !matches!(event, Ok(WatchEvent::Token(_)));
        Some(event)
    }
}

/// A tokio connection to the agent.
pub struct AsyncClient {
    reader: tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    next_id: u64,
    timeout: Option<Duration>,
    /// The last reply line: it may hold a token, a signature or a stamp.
    line: Vec<u8>,
    /// As [`Client`]'s; also set when a call's future was dropped before its reply was read.
    out_of_step: bool,
}

/// By hand: `line` (the last reply) and the read buffer may hold a token or a signature.
impl std::fmt::Debug for AsyncClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncClient")
            .field("next_id", &self.next_id)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl AsyncClient {
    /// Connects to the socket at `path`, with [`DEFAULT_TIMEOUT`] per request.
    pub async fn connect(path: impl AsRef<Path>) -> Result<AsyncClient, ClientError> {
        let path = path.as_ref();
        let stream = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (reader, writer) = stream.into_split();
        Ok(AsyncClient {
            reader: tokio::io::BufReader::new(reader),
            writer,
            next_id: 1,
            timeout: Some(DEFAULT_TIMEOUT),
            line: Vec::new(),
            out_of_step: false,
        })
    }

    /// How long to wait for each reply (`None`: forever).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// Sends one request and returns its result. After a timeout, a broken reply or a call
    /// dropped half-way, the connection refuses further calls: connect again.
    pub async fn call<T: DeserializeOwned>(&mut self, body: Body<'_>) -> Result<T, ClientError> {
        if self.out_of_step {
            return Err(out_of_step());
        }
        self.out_of_step = true;
        let id = self.send(body).await?;
        self.read_line().await?;
        let result = decode(id, &self.line);
        self.out_of_step = matches!(result, Err(ClientError::Protocol(_)));
        result
    }

    async fn send(&mut self, body: Body<'_>) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let line = encode(id, body);
        with_timeout(self.timeout, self.writer.write_all(&line)).await?;
        Ok(id)
    }

    async fn read_line(&mut self) -> Result<(), ClientError> {
        self.line.clear();
        let reader = &mut self.reader;
        let line = &mut self.line;
        let read = async {
            let mut limited = tokio::io::AsyncReadExt::take(reader, MAX_REPLY);
            limited.read_until(b'\n', line).await
        };
        let n = with_timeout(self.timeout, read).await?;
        if n == 0 {
            return Err(ClientError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the agent closed the connection",
            )));
        }
        if self.line.last() != Some(&b'\n') {
            return Err(oversize());
        }
        Ok(())
    }

    /// Checks that the agent answers.
    pub async fn ping(&mut self) -> Result<(), ClientError> {
        self.call::<PingResult>(Body::Ping).await.map(|_| ())
    }

    /// Turns the connection into a stream of tokens (see [`AsyncWatch::next`]).
    pub async fn watch(mut self, profile: &str) -> Result<AsyncWatch, ClientError> {
        let id = self
            .send(Body::Watch {
                profile: profile.into(),
            })
            .await?;
        self.timeout = None;
        Ok(AsyncWatch {
            client: self,
            id,
            done: false,
        })
    }
}

/// The ops with a plain result, written once for both flavours: each entry gives the
/// method, its arguments, its result type and the request it sends; `ops!` makes the
/// blocking method on [`Client`] and the `async` one on [`AsyncClient`].
macro_rules! ops {
    ($(
        $(#[$doc:meta])*
        fn $name:ident($($arg:ident: $ty:ty),*) -> $result:ty = $body:expr;
    )*) => {
        impl Client {
            $(
                $(#[$doc])*
                pub fn $name(&mut self, $($arg: $ty),*) -> Result<$result, ClientError> {
                    self.call($body)
                }
            )*
        }

        impl AsyncClient {
            $(
                $(#[$doc])*
                pub async fn $name(&mut self, $($arg: $ty),*) -> Result<$result, ClientError> {
                    self.call($body).await
                }
            )*
        }
    };
}

ops! {
    /// A token valid for at least `min_ttl` seconds (default: valid).
    fn token(profile: &str, min_ttl: Option<u64>) -> TokenResult =
        Body::Token { profile: profile.into(), min_ttl };

    /// The signed body for `POST /api-key/token` (timestamp chosen by the agent if `None`).
    fn sign_challenge(profile: &str, timestamp: Option<i64>) -> SignChallengeResult =
        Body::SignChallenge { profile: profile.into(), timestamp, key_id: None };

    /// A Turnkey stamp over `payload` (a JSON object, signed exactly as given).
    fn stamp(profile: &str, payload: &str) -> StampResult =
        Body::Stamp { profile: profile.into(), payload: payload.into() };

    /// The profile's public key (PEM, JWK, compressed hex, thumbprint).
    fn public_key(profile: &str) -> PublicKeyResult =
        Body::PublicKey { profile: profile.into() };

    /// The agent's status (only the profiles this user may see).
    fn status(profile: Option<&str>) -> StatusResult =
        Body::Status { profile: profile.map(Into::into) };
}

/// A tokio `watch` stream.
#[derive(Debug)]
pub struct AsyncWatch {
    client: AsyncClient,
    id: u64,
    done: bool,
}

impl AsyncWatch {
    /// The next event; `None` after an `end` event or an error.
    pub async fn next(&mut self) -> Option<Result<WatchEvent, ClientError>> {
        if self.done {
            return None;
        }
        let event = match self.client.read_line().await {
            Ok(()) => decode_event(self.id, &self.client.line),
            Err(e) => Err(e),
        };
        self.done = !matches!(event, Ok(WatchEvent::Token(_)));
        Some(event)
    }
}

async fn with_timeout<T>(
    timeout: Option<Duration>,
    fut: impl std::future::Future<Output = io::Result<T>>,
) -> Result<T, ClientError> {
    match timeout {
        None => Ok(fut.await?),
        Some(t) => match tokio::time::timeout(t, fut).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(ClientError::Timeout(t)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply that comes after the timeout is never read as the next call's.
    #[test]
    fn after_a_timeout_the_connection_refuses_calls_instead_of_reading_stale_replies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slow.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            let late = "{\"v\":1,\"id\":1,\"ok\":true,\"result\":{\"version\":\"x\"}}\n";
            (&stream).write_all(late.as_bytes()).unwrap();
            // Answers the next request too, if one comes (it must not).
            line.clear();
            reader.read_line(&mut line).unwrap_or(0)
        });
        let mut client = Client::connect(&path).unwrap();
        client
            .set_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        assert!(matches!(client.ping(), Err(ClientError::Timeout(_))));
        std::thread::sleep(Duration::from_millis(400));
        let again = client.ping().unwrap_err();
        assert!(again.to_string().contains("connect again"), "{again}");
        drop(client);
        assert_eq!(server.join().unwrap(), 0, "the refused call sent nothing");
    }

    #[test]
    fn socket_path_prefers_explicit() {
        assert_eq!(
            socket_path(Some(Path::new("/x.sock"))),
            PathBuf::from("/x.sock")
        );
    }

    #[test]
    fn exit_codes_follow_error_codes() {
        let agent = |code| ClientError::Agent {
            code,
            message: "m".into(),
        };
        assert_eq!(agent(ErrorCode::Forbidden).exit_code(), exit::FORBIDDEN);
        assert_eq!(agent(ErrorCode::Busy).exit_code(), exit::TEMPORARY);
        assert_eq!(agent(ErrorCode::UnknownProfile).exit_code(), exit::AGENT);
        assert_eq!(agent(ErrorCode::Unknown).exit_code(), exit::AGENT);
        let connect = ClientError::Connect {
            path: "/nope".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert_eq!(connect.exit_code(), exit::CONNECT);
        assert!(connect.to_string().contains("is tm-agent running?"));
    }

    #[tokio::test]
    async fn debug_never_shows_the_last_reply() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let (reader, writer) = a.into_split();
        let client = AsyncClient {
            reader: tokio::io::BufReader::new(reader),
            writer,
            next_id: 3,
            timeout: None,
            line: br#"{"id":2,"ok":true,"result":{"access_token":"eyJ-SECRET"}}"#.to_vec(),
            out_of_step: false,
        };
        let text = format!("{client:?}");
        assert!(
            !text.contains("SECRET") && text.contains("next_id: 3"),
            "{text}"
        );
    }

    #[test]
    fn decodes_replies_and_errors() {
        let ok = br#"{"id":3,"ok":true,"result":{"pong":true}}"#;
        assert_eq!(
            decode::<PingResult>(3, ok).unwrap(),
            PingResult { pong: true }
        );
        assert!(matches!(
            decode::<PingResult>(4, ok),
            Err(ClientError::Protocol(_))
        ));
        let err = br#"{"id":3,"ok":false,"error":{"code":"forbidden","message":"permission denied by the agent: no"}}"#;
        let e = decode::<PingResult>(3, err).unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Forbidden));
        assert_eq!(e.to_string(), "permission denied by the agent: no");
        let err = br#"{"id":3,"ok":false,"error":{"code":"forbidden","message":"this agent signs only profile `p`'s own key_id"}}"#;
        let e = decode::<PingResult>(3, err).unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Forbidden));
        assert_eq!(
            e.to_string(),
            "refused by the agent: this agent signs only profile `p`'s own key_id (forbidden)"
        );
    }
}
