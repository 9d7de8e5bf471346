//! `tm-agent run`: the daemon. Assembles signers, token managers and the server from the
//! config, talks to systemd, and handles signals.
//!
//! Start-up order: take the socket systemd passed (before any thread exists, since it edits
//! the environment), load and validate the config, install logging, mark the process not
//! dumpable (`crate::hardening`), then on the runtime:
//! open every key (blocking, off the runtime's workers) with its self-test, start one token
//! manager per profile (each mints at once), start serving, and send `READY=1` once every
//! profile is ready (a verified token, or for `ready_when = "signer"` a healthy key).
//!
//! Signals: SIGTERM/SIGINT → `STOPPING=1`, stop accepting, finish in-flight requests (at
//! most `shutdown_grace_secs`), end `watch` streams, then stop the token managers; exit 0.
//! SIGHUP → `RELOADING=1`, re-read the file, apply `[[access]]` and `agent.log_level` (other
//! changes need a restart and are reported as such), `READY=1`.
//! The watchdog pings only while the runtime and every signer answer a probe. A token
//! manager that panics (a bug: it cannot mint again) makes the daemon exit with status 1,
//! for systemd's `Restart=on-failure` to start a fresh one.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use clap::Args;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use super::logging::{self, FilterHandle};
use super::{exit_code, EXIT_CONFIG};
use crate::auth_api;
use crate::config::{Config, KeyConfig, LogFormat, ReadyWhen, DEFAULT_CONFIG};
use crate::server::{self, listener::Listener, Profile, State};
use crate::signer::{self, Handle, SignerError};
use crate::systemd::notify::{join_status, Notifier, StatusLine};
use crate::token::Manager;

/// `tm-agent run` options.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The configuration file.
    #[arg(long, short = 'c', value_name = "FILE", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Log format [default: the config's agent.log_format].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

/// Runs the daemon to completion and returns the process exit code.
pub fn main(args: RunArgs) -> u8 {
    let activated = match crate::systemd::take_activated_listener() {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("tm-agent: {e}");
            return EXIT_CONFIG;
        }
    };
    let loaded = match Config::load(&args.config) {
        Ok(loaded) => loaded,
        Err(e) if e.may_pass_on_retry() => {
            // Not 78: systemd (RestartPreventExitStatus=78) would never try again, and the
            // directory service may just not be up yet.
            eprintln!("tm-agent: {e}\n(NSS did not answer: exiting with status 1 to be restarted)");
            return super::EXIT_FAILURE;
        }
        Err(e) => {
            eprintln!("tm-agent: {e}");
            return EXIT_CONFIG;
        }
    };
    let format = args.log_format.unwrap_or(loaded.config.agent.log_format);
    let filter = match logging::init(&loaded.config.agent.log_level, format) {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("tm-agent: {e}");
            return EXIT_CONFIG;
        }
    };
    // Before any PIN is read or token held (see `crate::hardening`).
    super::keep_memory_private();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(loaded.config.agent.worker_threads)
        .enable_all()
        .thread_name("tm-agent-rt")
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tm-agent: cannot start the async runtime: {e}");
            return super::EXIT_FAILURE;
        }
    };
    let daemon = Daemon {
        config_path: args.config,
        filter,
        notifier: Notifier::from_env().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "NOTIFY_SOCKET unusable: not talking to systemd");
            Notifier::disabled()
        }),
    };
    let result = runtime.block_on(daemon.run(loaded, activated));
    // Signer threads and blocking tasks must not hold the process up once we are done.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => 0,
        Err(err) => {
            tracing::error!(error = %format!("{err:#}"), "tm-agent stops");
            super::print_error(&err, &mut std::io::stderr());
            exit_code(&err)
        }
    }
}

struct Daemon {
    config_path: PathBuf,
    filter: FilterHandle,
    notifier: Notifier,
}

/// One running profile: what the server needs plus what readiness and status read.
struct RunningProfile {
    name: String,
    manager: Manager,
    ready_when: ReadyWhen,
}

impl Daemon {
    async fn run(
        self,
        loaded: crate::config::Loaded,
        activated: Option<std::os::unix::net::UnixListener>,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        // SIGHUP's default action ends the process: caught from the start, a reload asked
        // for while the keys open waits for the loop below instead of killing the agent.
        // (SIGTERM keeps its default until then: a stop during a long key opening ends the
        // process at once, rather than after the opening.)
        let mut hup = signal(SignalKind::hangup()).context("cannot catch SIGHUP")?;
        let config = loaded.config;
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            config = %self.config_path.display(),
            // The runtime's own count, so the log shows what `agent.worker_threads` did.
            worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
            "tm-agent starting"
        );
        let _ = self.notifier.status("opening keys");
        let handles = open_keys(&config).await?;
        let tokens_cancel = CancellationToken::new();
        let mut running = Vec::new();
        let mut profiles = Vec::new();
        for (name, p) in &config.profiles {
            let handle = handles
                .get(&p.key)
                .with_context(|| format!("profile {name}: key {} is not open", p.key))?
                .clone();
            let client = auth_api::Client::new(&p.api_settings())
                .with_context(|| format!("profile {name}: cannot set up the Auth API client"))?;
            let manager = Manager::start(
                p.token_settings(),
                handle.clone(),
                client,
                tokens_cancel.child_token(),
            );
            profiles.push(Profile::new(name, &p.key_id, handle, manager.clone()));
            running.push(RunningProfile {
                name: name.clone(),
                manager,
                ready_when: p.ready_when,
            });
        }

        let listener = match activated {
            Some(std_listener) => {
                Listener::from_std(std_listener).context("cannot use the socket from systemd")?
            }
            None => Listener::bind(&config.socket)?,
        };
        tracing::info!(socket = listener.describe(), "listening");
        let state = State::new(profiles, loaded.rules, config.server.clone())?;
        let shutdown = CancellationToken::new();
        let mut server_task = tokio::spawn(server::serve(
            listener,
            Arc::clone(&state),
            shutdown.clone(),
        ));

        let running = Arc::new(running);
        let watchdog = tokio::spawn(watchdog(self.notifier.clone(), handles.clone()));
        // Set once READY=1 has gone out: a reload before that is no systemd reload.
        let ready = Arc::new(AtomicBool::new(false));
        let status = tokio::spawn(report_status(
            self.notifier.clone(),
            Arc::clone(&running),
            started,
            Arc::clone(&ready),
        ));

        // A token manager that panicked cannot mint again: exit non-zero so that systemd
        // (Restart=on-failure) starts a fresh agent, rather than answer `unavailable`.
        let mut failures = tokio::task::JoinSet::new();
        for p in running.iter() {
            let (name, manager) = (p.name.clone(), p.manager.clone());
            failures.spawn(async move {
                manager.failed().await;
                name
            });
        }

        let mut term = signal(SignalKind::terminate()).context("cannot catch SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot catch SIGINT")?;
        // Why the agent stops: a signal or a failed token manager (both drain the server
        // first), or the server itself ending (nothing left to drain).
        let (reason, failure) = loop {
            tokio::select! {
                _ = term.recv() => break ("SIGTERM", None),
                _ = int.recv() => break ("SIGINT", None),
                _ = hup.recv() => self.reload(&state, ready.load(Ordering::Acquire)),
                Some(Ok(name)) = failures.join_next() => {
                    break ("token manager failure", Some(anyhow::anyhow!(
                        "profile {name}: the token manager failed (an internal error, logged \
                         above); exiting so that the service manager restarts tm-agent"
                    )));
                }
                result = &mut server_task => {
                    let _ = self.notifier.stopping();
                    return Err(match result {
                        Ok(Ok(())) => anyhow::anyhow!("the server stopped on its own"),
                        Ok(Err(e)) => anyhow::Error::new(e).context("the server failed"),
                        Err(e) => anyhow::anyhow!("the server task failed: {e}"),
                    });
                }
            }
        };
        let _ = self.notifier.stopping();
        status.abort();
        watchdog.abort();
        tracing::info!(reason, "shutting down: finishing in-flight requests");
        shutdown.cancel();
        let grace = Duration::from_secs(config.agent.shutdown_grace_secs);
        match tokio::time::timeout(grace, &mut server_task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "server ended with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "server task failed"),
            Err(_) => {
                tracing::warn!(
                    grace_secs = grace.as_secs(),
                    "in-flight requests did not finish in time"
                );
                server_task.abort();
            }
        }
        // Token managers stop last, so watch clients got their `end` while tokens were valid.
        tokens_cancel.cancel();
        if let Some(failure) = failure {
            return Err(failure);
        }
        tracing::info!("tm-agent stopped");
        Ok(())
    }

    /// SIGHUP: re-read the file; apply access rules and the log level. Once the agent has
    /// said READY=1 (`ready`), the reload is framed by RELOADING=1 and READY=1, as
    /// `Type=notify-reload` expects; before that, READY=1 stays for when the agent is ready.
    fn reload(&self, state: &State, ready: bool) {
        if ready {
            let _ = self.notifier.reloading();
        }
        match Config::load(&self.config_path) {
            Ok(loaded) => {
                let count = loaded.rules.len();
                state.reload_rules(loaded.rules);
                if let Err(e) = self.filter.set(&loaded.config.agent.log_level) {
                    tracing::warn!(error = %e, "log level not changed");
                }
                tracing::info!(
                    rules = count,
                    "reloaded [[access]] and agent.log_level (changes to keys, profiles, \
                     socket and server settings take effect on restart)"
                );
            }
            Err(e) => tracing::error!(
                error = %e,
                "reload failed: keeping the previous access rules and log level"
            ),
        }
        if ready {
            let _ = self.notifier.ready();
        }
    }
}

/// Opens every key named by a profile, in parallel, each with its self-test.
async fn open_keys(config: &Config) -> anyhow::Result<BTreeMap<String, Handle>> {
    let mut tasks = tokio::task::JoinSet::new();
    for (name, key) in &config.keys {
        if !config.profiles.values().any(|p| &p.key == name) {
            continue;
        }
        let (name, key) = (name.clone(), key.clone());
        let options = config.agent.actor_options(&name);
        tasks.spawn_blocking(move || {
            // Should the daemon leave before this returns (the join failed), the guard
            // keeps the exit from running under it (see `signer::wait_for_workers`).
            let _opening = signer::LiveWorker::opening();
            let result = open_key(&key, options);
            (name, result)
        });
    }
    // Every opening is waited for, even after one failed: a PIN problem of one key must
    // decide the exit status (77, which systemd does not restart) over another key's
    // failure (1, restarted), or each restart would send the wrong PIN again.
    let mut opened = Vec::new();
    // The failure that decides the exit status, with its code (see `cli::worst`).
    let mut failed: Option<(u8, anyhow::Error)> = None;
    while let Some(joined) = tasks.join_next().await {
        let (name, result) = joined.context("a key-opening task failed")?;
        match result {
            Ok(handle) => opened.push((name, handle)),
            Err(e) => {
                let code = super::signer_exit_code(&e);
                let e = anyhow::Error::new(e).context(format!("cannot open key {name}"));
                let current = failed.as_ref().map_or(0, |(c, _)| *c);
                if super::worst(current, code) == current {
                    tracing::error!(key = %name, error = %format!("{e:#}"), "key not opened");
                } else if let Some((_, earlier)) = failed.replace((code, e)) {
                    tracing::error!(error = %format!("{earlier:#}"), "key not opened");
                }
            }
        }
    }
    if let Some((_, e)) = failed {
        return Err(e);
    }
    let mut handles = BTreeMap::new();
    for (name, handle) in opened {
        let info = handle.info();
        tracing::info!(
            key = %name,
            backend = info.backend,
            location = %info.location,
            hardware_backed = info.hardware_backed,
            thumbprint = %crate::jose::Jwk::from_verifying_key(&info.public_key).thumbprint(),
            "key open, self-test passed"
        );
        handles.insert(name, handle);
    }
    Ok(handles)
}

/// Opens one key and starts its actor (blocking: hardware calls and the self-test).
pub(crate) fn open_key(
    key: &KeyConfig,
    options: signer::ActorOptions,
) -> Result<Handle, SignerError> {
    let (info, workers) = match key {
        KeyConfig::Pkcs11(settings) => signer::pkcs11::open(settings, 0)?,
        // One worker: one owner of the card.
        KeyConfig::Piv(settings) => signer::piv::open(settings)?,
        KeyConfig::Soft(soft) => {
            let signing_key = signer::soft::load_key(&soft.key_file)?;
            signer::soft::open(signing_key, soft.key_file.display().to_string(), 1)
        }
    };
    Handle::spawn(info, workers, options)
}

/// Pings the watchdog while every signer answers a probe in time. The keys are checked
/// at once, so that the check takes as long as the slowest key, not the sum of them.
async fn watchdog(notifier: Notifier, handles: BTreeMap<String, Handle>) {
    notifier
        .run_watchdog(|| {
            let mut checks = tokio::task::JoinSet::new();
            for (name, handle) in &handles {
                let (name, handle) = (name.clone(), handle.clone());
                checks.spawn(async move { (name, handle.watchdog_check().await) });
            }
            // Dropping the set (the check ran out of time) aborts the checks still running.
            async move {
                let mut healthy = true;
                while let Some(checked) = checks.join_next().await {
                    match checked {
                        Ok((_, true)) => {}
                        Ok((name, false)) => {
                            tracing::error!(
                                key = %name,
                                "signer does not answer (wedged in the HSM or card?)"
                            );
                            healthy = false;
                        }
                        Err(_) => healthy = false,
                    }
                }
                healthy
            }
        })
        .await;
}

/// Sends `READY=1` once every profile is ready, then keeps `STATUS=` current: on every
/// token change and at least every 30 s (the "valid 54m" figure ages); every second while
/// some profile is not ready or failing, since a failed renewal is not a token change and
/// the error and its "retrying in" figure would otherwise show up to 30 s late.
async fn report_status(
    notifier: Notifier,
    profiles: Arc<Vec<RunningProfile>>,
    started: Instant,
    ready_sent: Arc<AtomicBool>,
) {
    let mut receivers: Vec<_> = profiles.iter().map(|p| p.manager.subscribe()).collect();
    loop {
        let all_ready = profiles.iter().all(|p| match p.ready_when {
            ReadyWhen::Signer => true,
            ReadyWhen::Token => p
                .manager
                .status()
                .expires_at
                .is_some_and(|e| e > SystemTime::now()),
        });
        let text = status_text(&profiles);
        if all_ready && !ready_sent.load(Ordering::Acquire) {
            let _ = notifier.ready_with_status(&text);
            ready_sent.store(true, Ordering::Release);
            tracing::info!(
                after_ms = started.elapsed().as_millis() as u64,
                status = %text,
                "ready"
            );
        } else {
            let _ = notifier.status(&text);
        }
        let failing = profiles
            .iter()
            .any(|p| p.manager.status().consecutive_failures > 0);
        let period = if all_ready && !failing { 30 } else { 1 };
        let changes = any_changed(&mut receivers);
        tokio::select! {
            _ = changes => {}
            _ = tokio::time::sleep(Duration::from_secs(period)) => {}
        }
    }
}

/// Resolves when any of the watch receivers sees a change (or closes).
async fn any_changed<T: Send + Sync + 'static>(receivers: &mut [tokio::sync::watch::Receiver<T>]) {
    let mut set = tokio::task::JoinSet::new();
    for rx in receivers.iter() {
        let mut rx = rx.clone();
        rx.mark_unchanged();
        set.spawn(async move {
            let _ = rx.changed().await;
        });
    }
    if set.join_next().await.is_none() {
        std::future::pending::<()>().await;
    }
    for rx in receivers.iter_mut() {
        rx.mark_unchanged();
    }
}

/// The `STATUS=` text: one clause per profile.
fn status_text(profiles: &[RunningProfile]) -> String {
    let now = SystemTime::now();
    let states: Vec<_> = profiles
        .iter()
        .map(|p| {
            let s = p.manager.status();
            let valid = s
                .expires_at
                .and_then(|e| e.duration_since(now).ok())
                .filter(|d| !d.is_zero());
            let retry = if s.consecutive_failures > 0 {
                s.next_refresh.and_then(|n| n.duration_since(now).ok())
            } else {
                None
            };
            let error = (s.consecutive_failures > 0)
                .then(|| describe_error(s.last_error_code.as_deref(), s.last_error.as_deref()));
            (p.name.as_str(), valid, error, retry)
        })
        .collect();
    join_status(
        states
            .iter()
            .map(|(profile, valid, error, retry)| StatusLine {
                profile,
                token_valid_for: *valid,
                error: error.as_deref(),
                retry_in: *retry,
            }),
    )
}

/// A short operator-facing phrase for a token failure code.
fn describe_error(code: Option<&str>, message: Option<&str>) -> String {
    match code {
        Some("transport") => "auth API unreachable".into(),
        Some("server_error") => "auth API failing (5xx)".into(),
        Some("rate_limited") => "auth API rate-limits us".into(),
        Some("unauthorized") => format!("auth API refused the key: {}", message.unwrap_or("")),
        Some("invalid_token") => "auth API sent a token that fails JWKS checks".into(),
        Some("jwks_pending") => "auth API's new signing key not in its JWKS yet".into(),
        Some("signer_error") => "key cannot sign".into(),
        Some(other) => other.replace('_', " "),
        None => "failing".into(),
    }
}
