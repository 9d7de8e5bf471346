//! `tm-agent check`: validates a config file, then probes every key (PIN, probe signature)
//! and every profile's Auth API (reachability, JWKS, clock offset, and with `--mint` a real
//! mint whose token is verified against the JWKS), and prints a readable summary.
//!
//! Read-only towards the HSM (no keys are created) and sends no traffic beyond what a mint
//! needs. Exits non-zero when anything fails; the PIN and config exit codes match `run`.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;

use crate::auth_api::{self, ApiError};
use crate::config::{Config, DEFAULT_CONFIG};
use crate::jose::Jwk;
use crate::signer::Handle;
use crate::token::jwt;

/// `tm-agent check` options.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// The configuration file.
    #[arg(long, short = 'c', value_name = "FILE", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Also mint a token per profile (one real request to the Auth API).
    #[arg(long)]
    pub mint: bool,
}

/// Runs the check; prints to `out`. Returns the exit code.
pub async fn run(args: CheckArgs, out: &mut (dyn Write + Send)) -> u8 {
    let loaded = match Config::load(&args.config) {
        Ok(loaded) => loaded,
        Err(e) => {
            let _ = writeln!(out, "config   FAIL  {e}");
            // As `run`: NSS that did not answer may answer on the next try.
            return if e.may_pass_on_retry() {
                super::EXIT_FAILURE
            } else {
                super::EXIT_CONFIG
            };
        }
    };
    let config = loaded.config;
    let _ = writeln!(
        out,
        "config   ok    {} ({} key(s), {} profile(s), {} access rule(s))",
        args.config.display(),
        config.keys.len(),
        config.profiles.len(),
        loaded.rules.len()
    );
    let mut code = 0u8;
    let mut handles = std::collections::BTreeMap::new();
    for (name, key) in &config.keys {
        let key = key.clone();
        let options = config.agent.actor_options(name);
        let opened = tokio::task::spawn_blocking(move || super::run::open_key(&key, options)).await;
        match opened {
            Ok(Ok(handle)) => {
                let info = handle.info();
                let _ = writeln!(
                    out,
                    "key      ok    {name}: {} {}{}, probe signature verified, thumbprint {}",
                    info.backend,
                    info.location,
                    if info.hardware_backed {
                        ""
                    } else {
                        " (NOT hardware-backed)"
                    },
                    Jwk::from_verifying_key(&info.public_key).thumbprint()
                );
                handles.insert(name.clone(), handle);
            }
            Ok(Err(e)) => {
                let _ = writeln!(out, "key      FAIL  {name}: {e}");
                code = super::worst(code, super::signer_exit_code(&e));
            }
            Err(e) => {
                let _ = writeln!(out, "key      FAIL  {name}: {e}");
                code = super::worst(code, super::EXIT_FAILURE);
            }
        }
    }
    for (name, p) in &config.profiles {
        let client = match auth_api::Client::new(&p.api_settings()) {
            Ok(client) => client,
            Err(e) => {
                let _ = writeln!(out, "api      FAIL  {name}: {e}");
                // `run` exits 78 on the same error: the config points at something unusable.
                let exit = if matches!(e, ApiError::Config(_)) {
                    super::EXIT_CONFIG
                } else {
                    super::EXIT_FAILURE
                };
                code = super::worst(code, exit);
                continue;
            }
        };
        let endpoints = client.endpoints().clone();
        let jwks = match client.jwks().await {
            Ok(jwks) => jwks,
            Err(e) => {
                let _ = writeln!(
                    out,
                    "api      FAIL  {name}: {} unreachable: {e}",
                    endpoints.jwks
                );
                code = super::worst(code, super::EXIT_FAILURE);
                continue;
            }
        };
        let offset = client.clock().offset_ms().unwrap_or(0);
        let _ = writeln!(
            out,
            "api      ok    {name}: {} answers, JWKS has {} key(s), server clock {:+.1} s from ours{}",
            endpoints.jwks,
            jwks.keys.len(),
            offset as f64 / 1000.0,
            if offset.abs() > 20_000 { " (more than 20 s: fix NTP; the API allows ±30 s)" } else { "" }
        );
        if !args.mint {
            continue;
        }
        let Some(handle) = handles.get(&p.key) else {
            let _ = writeln!(out, "mint     SKIP  {name}: key {} did not open", p.key);
            continue;
        };
        match mint_once(handle, &client, &p.key_id, &jwks, p.issuer.as_deref()).await {
            Ok(valid_for) => {
                let _ = writeln!(
                    out,
                    "mint     ok    {name}: token verified against the JWKS, valid {} s",
                    valid_for.as_secs()
                );
            }
            Err(message) => {
                let _ = writeln!(out, "mint     FAIL  {name}: {message}");
                code = super::worst(code, super::EXIT_FAILURE);
            }
        }
    }
    let _ = writeln!(
        out,
        "{}",
        if code == 0 {
            "all checks passed"
        } else {
            "some checks failed"
        }
    );
    code
}

/// Signs a challenge at the server's time, mints, and verifies the access token.
async fn mint_once(
    handle: &Handle,
    client: &auth_api::Client,
    key_id: &str,
    jwks: &auth_api::Jwks,
    issuer: Option<&str>,
) -> Result<Duration, String> {
    let now = client.clock().server_now();
    let ts = now
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs() as i64;
    let body = handle
        .sign_challenge(key_id, ts)
        .await
        .map_err(|e| format!("signing failed: {e}"))?;
    let pair = client.mint(&body).await.map_err(|e| match e {
        ApiError::Unauthorized { .. } => {
            format!("{e} (is key_id right, and is the public key registered for it?)")
        }
        other => other.to_string(),
    })?;
    let parsed =
        jwt::parse(&pair.access_token).map_err(|e| format!("access token unreadable: {e}"))?;
    jwt::KeySet::from_jwks(&jwks.keys)
        .verify(&parsed, client.clock().server_now(), issuer)
        .map_err(|e| format!("access token fails the JWKS check: {e}"))?;
    Ok(pair
        .expires_at
        .duration_since(SystemTime::now())
        .unwrap_or_default())
}
