//! Simulator fixtures for integration tests, all on 127.0.0.1 with ephemeral ports:
//!
//! - [`SimFixture`]: the simulator in-process on the test's own tokio runtime (async tests).
//! - [`BackgroundSim`]: the simulator on its own runtime thread (sync tests, or tests whose
//!   runtime must not host it); stopped and joined on drop.
//! - [`SimProcess`]: the `tm-auth-sim` binary as a child process, found through its ready
//!   file; killed on drop.
//! - [`TestKey`]: a P-256 API key that signs challenges exactly as the official SDKs do,
//!   with p256 and base64 directly (not through `tm_agent::jose`).
//!
//! Include it with `#[path = "common/sim.rs"] mod sim_fixture;` (or `pub mod sim;` from a
//! `tests/common/mod.rs`). Every fixture writes the CA certificate to a temp dir
//! (`ca_file`) so that clients can trust the HTTPS listener.
#![allow(dead_code)]

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use tempfile::TempDir;
use tm_agent::sim::{KeyRegistration, ReadyInfo, SimConfig, SimHandle, Simulator};

/// A test API key.
pub struct TestKey {
    pub key_id: String,
    pub signing_key: SigningKey,
}

impl TestKey {
    /// A fresh random key with a random UUID key id.
    pub fn random() -> Self {
        TestKey {
            key_id: random_key_id(),
            signing_key: SigningKey::random(&mut rand::rngs::OsRng),
        }
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        *self.signing_key.verifying_key()
    }

    /// ES256 over `{key_id}.{timestamp}`: raw r||s, base64url without padding.
    pub fn sign(&self, timestamp: i64) -> String {
        let msg = format!("{}.{}", self.key_id, timestamp);
        let sig: Signature = self.signing_key.sign(msg.as_bytes());
        URL_SAFE_NO_PAD.encode(sig.to_bytes())
    }

    /// A correct mint body for `timestamp`.
    pub fn mint_body(&self, timestamp: i64) -> serde_json::Value {
        serde_json::json!({
            "key_id": self.key_id,
            "timestamp": timestamp,
            "signature": self.sign(timestamp),
        })
    }

    pub fn registration(&self) -> KeyRegistration {
        KeyRegistration::new(self.key_id.clone(), self.verifying_key())
    }
}

/// A random key_id in UUID form (version 4, variant 1).
pub fn random_key_id() -> String {
    let h = hex::encode(rand::random::<[u8; 16]>());
    format!(
        "{}-{}-4{}-8{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// Unix seconds from the test machine's clock.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// An HTTP client for the simulator: no proxies (loopback only), 10 s timeout, trusting
/// the CA in `ca_file` for HTTPS.
pub fn client_for(ca_file: &Path) -> reqwest::Client {
    let pem = std::fs::read(ca_file).expect("read CA file");
    let ca = reqwest::Certificate::from_pem(&pem).expect("CA PEM");
    reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(ca)
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .expect("reqwest client")
}

/// The simulator in-process on the current tokio runtime.
pub struct SimFixture {
    pub handle: SimHandle,
    pub ca_file: PathBuf,
    _dir: TempDir,
}

impl SimFixture {
    pub async fn start() -> Self {
        Self::start_with(SimConfig::default()).await
    }

    /// Starts with `config`; `cert_out` is replaced by a temp file.
    pub async fn start_with(mut config: SimConfig) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_file = dir.path().join("sim-ca.pem");
        config.cert_out = Some(ca_file.clone());
        let handle = Simulator::start(config).await.expect("start simulator");
        SimFixture {
            handle,
            ca_file,
            _dir: dir,
        }
    }

    pub fn client(&self) -> reqwest::Client {
        client_for(&self.ca_file)
    }

    /// Registers `key` (personal key).
    pub fn register(&self, key: &TestKey) {
        self.handle
            .register_key(key.registration())
            .expect("register key");
    }
}

/// The simulator on a dedicated runtime thread; usable from synchronous code.
pub struct BackgroundSim {
    pub handle: SimHandle,
    pub ca_file: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    _dir: TempDir,
}

impl BackgroundSim {
    pub fn start(mut config: SimConfig) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_file = dir.path().join("sim-ca.pem");
        config.cert_out = Some(ca_file.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("tm-auth-sim".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let handle = Simulator::start(config).await.expect("start simulator");
                    let _ = tx.send(handle.clone());
                    let _ = stop_rx.await;
                    handle.shutdown().await;
                });
            })
            .expect("spawn simulator thread");
        let handle = rx.recv().expect("simulator started");
        BackgroundSim {
            handle,
            ca_file,
            stop: Some(stop_tx),
            thread: Some(thread),
            _dir: dir,
        }
    }
}

impl Drop for BackgroundSim {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The `tm-auth-sim` binary as a child process.
pub struct SimProcess {
    pub child: Child,
    pub ready: ReadyInfo,
    pub ca_file: PathBuf,
    pub dir: TempDir,
}

impl SimProcess {
    /// Spawns the binary with `--ready-file`, `--cert-out` (in a temp dir) and `args`, and
    /// returns once it is listening (it prints its ready line on stdout then).
    pub fn spawn(args: &[String]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ready_file = dir.path().join("ready.json");
        let ca_file = dir.path().join("sim-ca.pem");
        let mut child = Command::new(env!("CARGO_BIN_EXE_tm-auth-sim"))
            .arg("--ready-file")
            .arg(&ready_file)
            .arg("--cert-out")
            .arg(&ca_file)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tm-auth-sim");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read ready line");
        if line.trim().is_empty() {
            let status = child.wait().expect("wait");
            panic!("tm-auth-sim exited before it was ready: {status}");
        }
        let from_stdout: ReadyInfo = serde_json::from_str(line.trim()).expect("ready line JSON");
        let from_file: ReadyInfo =
            serde_json::from_str(&std::fs::read_to_string(&ready_file).expect("ready file"))
                .expect("ready file JSON");
        assert_eq!(from_stdout, from_file);
        SimProcess {
            child,
            ready: from_file,
            ca_file,
            dir,
        }
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
