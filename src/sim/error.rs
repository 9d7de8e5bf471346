//! Errors of the simulator's own machinery: starting, binding, certificates, registration
//! and admin input. HTTP rejections of API requests are not errors here: they are answers,
//! modelled by `state::Reject`.
//!
//! Plain data, `Send + Sync`: usable from any thread.

use std::net::SocketAddr;
use std::path::PathBuf;

/// What went wrong inside the simulator (not an API-level rejection).
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot listen for {scheme} on {addr}: {source} (is the port in use? use port 0 for an ephemeral one)")]
    Bind {
        scheme: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot generate the self-signed TLS certificate: {0}")]
    Certificate(String),
    #[error("TLS server configuration failed: {0}")]
    Tls(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read key file {path}: {source}")]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid key registration: {0}")]
    Registration(String),
    #[error("invalid fault: {0}")]
    Fault(String),
    #[error("invalid setting: {0}")]
    Setting(String),
    /// Returned by the request handler so that hyper drops the connection without an
    /// answer (the reset and hang faults).
    #[error("connection dropped on purpose (injected fault)")]
    InjectedDrop,
    #[error("simulator runtime error: {0}")]
    Runtime(String),
}
