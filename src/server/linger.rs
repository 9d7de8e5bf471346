//! Closing a connection so that the client reads a clean EOF, never a reset.
//!
//! When a Unix stream socket is closed with bytes still in its receive buffer, Linux ends
//! the peer's stream with `ECONNRESET` after the lines already sent, and a client that
//! reads to the end (`read_to_string`, `readAll`) loses those lines. So every close the
//! agent decides on (shutdown, an oversize line, a line or idle timeout, the connection
//! cap) goes through [`close`]: the caller has written every line it owes; `close` shuts
//! down the write side (the client reads EOF after the last line) and discards what the
//! client still sends until it closes, for at most [`LINGER`] and [`LINGER_BYTES`], then
//! the socket is dropped. Both bounds hold whatever the client does, and agent shutdown
//! waits at most [`LINGER`] longer for them.
//!
//! Everything waits on the socket's readiness under one tokio timeout: no polling, no
//! locks. [`discard_ready`] is the synchronous, never-waiting variant for the accept loop.

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// How long a closing connection waits for the client to close its end.
pub(super) const LINGER: Duration = Duration::from_millis(250);

/// The most a closing connection reads and discards (a client that floods the socket is
/// cut off here, even before [`LINGER`]).
pub(super) const LINGER_BYTES: usize = 1024 * 1024;

/// Connections turned away at the cap that may linger at once (each holds a descriptor
/// for up to [`LINGER`]); beyond that, [`discard_ready`] is all they get.
pub(super) const REJECTED_LINGERING: usize = 64;

/// How a [`close`] ended (for the connection's debug record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Closed {
    /// The client closed its end (or it had already): a clean EOF on both sides.
    Eof,
    /// The client kept its end open for [`LINGER`].
    Timeout,
    /// The client sent more than [`LINGER_BYTES`] after the agent stopped reading.
    ByteCap,
    /// The socket failed (the client is gone).
    Error,
}

impl Closed {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Closed::Eof => "eof",
            Closed::Timeout => "linger timeout",
            Closed::ByteCap => "linger byte cap",
            Closed::Error => "socket error",
        }
    }
}

/// Shuts down the write side, then discards input until the client closes, [`LINGER`]
/// passes or [`LINGER_BYTES`] have been read, whichever comes first. Write every line owed
/// before calling this; the socket closes when the halves are dropped on return.
pub(super) async fn close(mut rd: OwnedReadHalf, mut wr: OwnedWriteHalf) -> Closed {
    if wr.shutdown().await.is_err() {
        return Closed::Error;
    }
    // On the heap, and only now: an array here would live in every connection task's
    // future for the task's whole life (8 KiB × 1,000 idle connections = 8 MiB of RSS).
    let mut buf = vec![0u8; 8 * 1024];
    let mut discarded = 0;
    let drain = async {
        while discarded < LINGER_BYTES {
            match rd.read(&mut buf).await {
                Ok(0) => return Closed::Eof,
                Ok(n) => discarded += n,
                Err(_) => return Closed::Error,
            }
        }
        Closed::ByteCap
    };
    tokio::time::timeout(LINGER, drain)
        .await
        .unwrap_or(Closed::Timeout)
}

/// Discards what the client has already sent, without waiting (at most [`LINGER_BYTES`]),
/// so that dropping the socket right after ends the client's stream with EOF unless more
/// arrives in between. For the accept loop, which must never wait on one client.
pub(super) fn discard_ready(stream: &UnixStream) {
    let mut buf = [0u8; 8 * 1024];
    let mut discarded = 0;
    while discarded < LINGER_BYTES {
        match stream.try_read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => discarded += n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// What the client reads after the agent side's `close`: its stream, to the end.
    async fn read_to_end(client: &mut UnixStream) -> std::io::Result<Vec<u8>> {
        let mut all = Vec::new();
        client.read_to_end(&mut all).await.map(|_| all)
    }

    #[tokio::test]
    async fn unread_input_is_drained_and_the_client_reads_the_answer_then_eof() {
        let (agent, mut client) = UnixStream::pair().unwrap();
        client.write_all(&[b'x'; 100_000]).await.unwrap();
        let (rd, mut wr) = agent.into_split();
        wr.write_all(b"answer\n").await.unwrap();
        let closing = tokio::spawn(close(rd, wr));
        assert_eq!(read_to_end(&mut client).await.unwrap(), b"answer\n");
        drop(client);
        assert_eq!(closing.await.unwrap(), Closed::Eof);
    }

    #[tokio::test]
    async fn a_client_that_keeps_its_end_open_is_waited_for_only_briefly() {
        let (agent, mut client) = UnixStream::pair().unwrap();
        let (rd, wr) = agent.into_split();
        let started = Instant::now();
        let closing = tokio::spawn(close(rd, wr));
        // The client sees EOF at once, keeps sending, never closes.
        assert_eq!(read_to_end(&mut client).await.unwrap(), b"");
        let sender = tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_millis(10));
            loop {
                interval.tick().await;
                if client.write_all(b"more").await.is_err() {
                    return;
                }
            }
        });
        assert_eq!(closing.await.unwrap(), Closed::Timeout);
        let waited = started.elapsed();
        assert!(waited >= LINGER && waited < LINGER * 4, "{waited:?}");
        // The agent side is closed now: the sender's writes fail and it ends.
        sender.await.unwrap();
    }

    #[tokio::test]
    async fn a_flooding_client_is_cut_off_at_the_byte_cap() {
        let (agent, mut client) = UnixStream::pair().unwrap();
        let (rd, wr) = agent.into_split();
        let flood = tokio::spawn(async move {
            let chunk = vec![b'x'; 64 * 1024];
            while client.write_all(&chunk).await.is_ok() {}
        });
        let started = Instant::now();
        assert_eq!(close(rd, wr).await, Closed::ByteCap);
        assert!(started.elapsed() < LINGER, "{:?}", started.elapsed());
        flood.await.unwrap();
    }

    #[tokio::test]
    async fn discard_ready_takes_what_is_there_without_waiting() {
        let (agent, mut client) = UnixStream::pair().unwrap();
        client.write_all(b"request\n").await.unwrap();
        agent.readable().await.unwrap();
        discard_ready(&agent);
        drop(agent);
        assert_eq!(read_to_end(&mut client).await.unwrap(), b"");
    }
}
