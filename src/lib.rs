//! tm-agent: a hardware-backed signing and token agent for the True Markets API.
//!
//! The API key (ECDSA P-256) lives in a PKCS#11 HSM or a YubiKey PIV slot; the agent signs
//! `<key_id>.<timestamp>` challenges and keeps fresh access tokens for client processes on
//! the machine. See `DESIGN.md` for the architecture and `proto/PROTOCOL.md` for the wire
//! protocol.
#![forbid(unsafe_code)]

pub mod auth_api;
pub mod authz;
pub mod cli;
pub mod client;
pub mod config;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod hardening;
pub mod jose;
pub mod protocol;
pub mod server;
pub mod signer;
pub mod sim;
pub mod systemd;
pub mod token;
