//! Command line of the `tm-auth-sim` binary: flags, their mapping to [`SimConfig`], and the
//! run loop (start, publish the ready info, wait for SIGINT/SIGTERM, shut down).
//!
//! Runs on the binary's tokio runtime; holds no state of its own.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use super::{write_atomic, KeyRegistration, SimConfig, SimError, Simulator, DEFAULT_ISSUER};

const AFTER_HELP: &str = "\
ENDPOINTS (like the real Auth API):
  POST /v1/auth/api-key/token   {key_id, timestamp, signature}  -> access/refresh tokens
  POST /v1/auth/token/refresh   {refresh_token}                 -> a new pair (rotating)
  GET  /.well-known/jwks.json                                   -> ES256 keys with kid

ADMIN API (loopback clients only; JSON bodies; others get 403):
  GET    /_sim/state                      settings, keys, faults, current kid
  GET    /_sim/keys                       registered keys
  POST   /_sim/keys                       {key_id?, public_key: PEM|JWK|bundle, org_id?, sub?, uid?}
  POST   /_sim/keys/{key_id}/revoke
  POST   /_sim/ttl                        {access_secs?, refresh_secs?}
  POST   /_sim/clock                      {offset_secs}            (+ ahead, - behind)
  POST   /_sim/faults                     {kind, target?, count? | rate?, ...}
           kind status: {status: 500|503|429|..., retry_after_secs?}  (429 gets Retry-After)
           kind hang:   {secs | ms}   hold the connection unanswered, then drop it
           kind reset:  {}            drop the connection without an answer (TCP RST)
           kind latency:{secs | ms}   delay the normal answer
           kind lose_answer: {}       do the work (mint, rotate), then drop the connection
           target: mint | refresh | jwks | all (default); count N (default 1) or rate 0..1
  GET    /_sim/faults                     active faults
  DELETE /_sim/faults                     clear all faults
  POST   /_sim/jwks/rotate                {grace_secs?}  new signing key; old one kept for grace
  POST   /_sim/refresh-tokens/revoke-all
  POST   /_sim/foreign-key                {count, same_kid?}  next tokens signed by an unpublished key
  POST   /_sim/replay                     {enabled}
  GET    /_sim/counters                   mints, refreshes, jwks fetches, rejections, faults
  DELETE /_sim/counters                   reset counters (also POST /_sim/counters/reset)

READY INFO (stdout line and --ready-file):
  {\"http\":\"http://127.0.0.1:PORT\",\"https\":\"https://127.0.0.1:PORT\",\"ca_file\":\"...\",\"pid\":N}

EXAMPLE:
  tm-auth-sim --http 127.0.0.1:0 --https 127.0.0.1:8443 --cert-out /tmp/sim-ca.pem \\
      --ready-file /tmp/sim.json --register 0b9b3f3e-8d4c-4c1e-9f1a-2b3c4d5e6f70=key.pub.pem \\
      --access-ttl 30
  curl -s -X POST http://127.0.0.1:PORT/_sim/faults -d '{\"kind\":\"status\",\"status\":503,\"count\":2,\"target\":\"mint\"}'

Logs go to stderr (RUST_LOG, default info); tokens and keys are never logged.";

/// tm-auth-sim: a local simulator of the True Markets Auth API, with fault injection.
///
/// Serves the Auth API's mint, refresh and JWKS endpoints over HTTP and HTTPS on loopback,
/// checks ES256 request signatures strictly like the real service, issues ES256 JWTs and
/// rotating refresh tokens, and lets tests break things on purpose through an admin API.
/// HTTPS uses a certificate from a CA made at start; trust the CA written by --cert-out.
#[derive(Debug, Parser)]
#[command(name = "tm-auth-sim", version, after_long_help = AFTER_HELP)]
pub struct SimArgs {
    /// Plain HTTP listen address (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub http: SocketAddr,

    /// HTTPS listen address (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub https: SocketAddr,

    /// Write the CA certificate (PEM) that signs the HTTPS certificate here; use it as the
    /// client's ca_file. Default: a file in the temp dir, named in the ready info.
    #[arg(long, value_name = "PATH")]
    pub cert_out: Option<PathBuf>,

    /// When listening, write {"http","https","ca_file","pid"} as JSON here (atomically).
    /// The same line is printed on stdout.
    #[arg(long, value_name = "PATH")]
    pub ready_file: Option<PathBuf>,

    /// Register a key: KEY_ID=PATH where PATH holds a PEM public key, a JWK, or the
    /// website's key bundle JSON (a bundle may be given as PATH alone). Repeatable.
    #[arg(long, value_name = "[KEY_ID=]PATH")]
    pub register: Vec<String>,

    /// Register an organization key: [KEY_ID=]PATH:ORG_ID. Its access tokens carry
    /// tm.organization_id = ORG_ID. Repeatable.
    #[arg(long, value_name = "[KEY_ID=]PATH:ORG_ID")]
    pub register_org: Vec<String>,

    /// The iss claim of issued tokens.
    #[arg(long, value_name = "URL", default_value = DEFAULT_ISSUER)]
    pub issuer: String,

    /// Access token lifetime in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 900)]
    pub access_ttl: u64,

    /// Refresh token lifetime in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 86_400)]
    pub refresh_ttl: u64,

    /// Seconds a rotated-out JWKS key stays published.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub jwks_grace: u64,

    /// Offset of the simulator's clock from the wall clock in seconds (negative: behind).
    /// Moves the timestamp window, token times and the Date header.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub clock_offset: i64,

    /// Allowed distance of a request timestamp from the simulator's clock, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timestamp_window: u64,

    /// Refuse a repeated identical (key_id, timestamp, signature) with 401.
    #[arg(long)]
    pub reject_replay: bool,
}

/// Splits `[KEY_ID=]PATH`: the prefix is a key id only if it is a UUID.
fn split_key_spec(spec: &str) -> (Option<&str>, &Path) {
    match spec.split_once('=') {
        Some((id, path)) if super::is_uuid(id) => (Some(id), Path::new(path)),
        _ => (None, Path::new(spec)),
    }
}

impl SimArgs {
    /// The simulator configuration these flags describe (reads the key files).
    pub fn to_config(&self) -> Result<SimConfig, SimError> {
        let mut keys = Vec::new();
        for spec in &self.register {
            let (id, path) = split_key_spec(spec);
            keys.push(KeyRegistration::from_file(id, path)?);
        }
        for spec in &self.register_org {
            let (rest, org) = spec.rsplit_once(':').ok_or_else(|| {
                SimError::Registration(format!(
                    "--register-org {spec:?}: expected [KEY_ID=]PATH:ORG_ID"
                ))
            })?;
            let (id, path) = split_key_spec(rest);
            keys.push(KeyRegistration::from_file(id, path)?.with_org(org));
        }
        let cert_out = self.cert_out.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("tm-auth-sim-{}-ca.pem", std::process::id()))
        });
        Ok(SimConfig {
            http_addr: self.http,
            https_addr: self.https,
            cert_out: Some(cert_out),
            issuer: self.issuer.clone(),
            access_ttl: Duration::from_secs(self.access_ttl),
            refresh_ttl: Duration::from_secs(self.refresh_ttl),
            jwks_grace: Duration::from_secs(self.jwks_grace),
            clock_offset_secs: self.clock_offset,
            timestamp_window_secs: self.timestamp_window,
            reject_replay: self.reject_replay,
            keys,
            ..SimConfig::default()
        })
    }
}

/// Runs the simulator until SIGINT or SIGTERM.
pub async fn run(args: SimArgs) -> Result<(), SimError> {
    let config = args.to_config()?;
    let handle = Simulator::start(config).await?;
    let ready = serde_json::to_string(&handle.ready_info())
        .map_err(|e| SimError::Runtime(e.to_string()))?;
    if let Some(path) = &args.ready_file {
        write_atomic(path, format!("{ready}\n").as_bytes())?;
    }
    println!("{ready}");
    wait_for_signal().await?;
    tracing::info!("shutting down");
    handle.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> Result<(), SimError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| SimError::Runtime(format!("SIGTERM: {e}")))?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.map_err(|e| SimError::Runtime(format!("SIGINT: {e}"))),
        _ = term.recv() => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_specs() {
        let id = "0b9b3f3e-8d4c-4c1e-9f1a-2b3c4d5e6f70";
        assert_eq!(
            split_key_spec(&format!("{id}=/a/b.pem")),
            (Some(id), Path::new("/a/b.pem"))
        );
        assert_eq!(
            split_key_spec("/x=y/b.json"),
            (None, Path::new("/x=y/b.json"))
        );
    }

    #[test]
    fn parses_flags() {
        let a = SimArgs::try_parse_from([
            "tm-auth-sim",
            "--clock-offset",
            "-45",
            "--access-ttl",
            "3",
            "--reject-replay",
        ])
        .unwrap();
        assert_eq!(a.clock_offset, -45);
        let c = a.to_config().unwrap();
        assert_eq!(c.access_ttl, Duration::from_secs(3));
        assert!(c.reject_replay);
        assert!(c.http_addr.ip().is_loopback());
    }
}
