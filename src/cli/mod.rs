//! The `tm-agent` command line, one file per subcommand group: the daemon (`run`), `check`,
//! key management (`key`), the client operations (`token`, `sign`, … in `client`) and the
//! load generator (`bench`).
//!
//! Owns argument parsing (clap derive), what is printed, and the mapping of failures to exit
//! codes. Uses `anyhow`; the library modules below keep their typed errors, which end up in
//! the printed cause chain. Each command builds the runtime it needs: the daemon its own
//! (after taking systemd's socket), the client commands none (blocking socket I/O).
//!
//! Exit codes: 0 success; 1 failure; 2 usage; client commands 3–6 (see `proto/PROTOCOL.md`);
//! 77 a PIN problem and 78 an unusable config (`run`, `check`, `key`: the systemd unit does
//! not restart on these, so a wrong PIN is never retried by restarts).

pub mod bench;
pub mod check;
pub mod client;
pub mod key;
pub mod logging;
pub mod run;

use clap::{Parser, Subcommand};

use crate::signer::SignerError;

/// Exit code of every failure without a more specific code.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code of a command line that clap rejects (clap's own convention).
pub const EXIT_USAGE: u8 = 2;
/// Exit code when the PIN is wrong, locked, or cannot be read (the systemd unit's
/// `RestartPreventExitStatus=` keeps restarts from burning PIN tries).
pub const EXIT_PIN: u8 = 77;
/// Exit code when the configuration is unusable (not restarted by systemd either).
pub const EXIT_CONFIG: u8 = 78;

/// A command line that clap accepts but that does not make sense (two PIN sources, a flag
/// of another backend, a malformed id): exits [`EXIT_USAGE`], like clap's own refusals.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A config file that a command cannot use (`key --config`): exits [`EXIT_CONFIG`], like
/// `run` and `check` on a bad config.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UnusableConfig(pub String);

/// Returns a [`UsageError`] from the enclosing function, formatted like `format!`.
macro_rules! usage_bail {
    ($($arg:tt)*) => {
        return Err($crate::cli::UsageError(format!($($arg)*)).into())
    };
}
pub(crate) use usage_bail;

/// tm-agent: keeps the True Markets API key in an HSM, signs with it, and hands out fresh
/// access tokens to the processes on this machine.
#[derive(Debug, Parser)]
#[command(name = "tm-agent", version, about, long_about = None)]
pub struct Cli {
    /// Log filter in tracing's EnvFilter syntax (default: $RUST_LOG, else "warn"). Logs go
    /// to standard error. `run` takes its level from the config file instead.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (the daemon): signers, token refresh, the Unix socket.
    Run(run::RunArgs),
    /// Validate a config file, then probe every key and every Auth API.
    Check(check::CheckArgs),
    /// Manage and use the API key directly, without the daemon: generate, import, list,
    /// public, sign-challenge, stamp; on a YubiKey also attest, protect-management-key.
    Key(Box<key::KeyArgs>),
    #[command(flatten)]
    Client(client::ClientCommand),
    /// Load generator: N connections × an op against a running agent, with a bare
    /// Unix-socket echo baseline; also raw PKCS#11 signing, ssh-agent, idle memory and
    /// start-up measurements (scripts/bench.sh runs them all).
    Bench(bench::BenchCommand),
}

/// Runs the parsed command line and returns the process exit code.
pub fn main(cli: Cli) -> u8 {
    let code = dispatch(cli);
    // Every runtime, and with it every signer `Handle`, is gone: let the signer threads
    // close their sessions before the process exits (see `signer::wait_for_workers`).
    if !crate::signer::wait_for_workers(WORKERS_EXIT_LIMIT) {
        tracing::warn!(
            limit_ms = WORKERS_EXIT_LIMIT.as_millis() as u64,
            "a signer thread is still inside the key's library (a wedged HSM or card?); \
             exiting without it"
        );
    }
    code
}

/// How long the process waits at exit for signer threads to close their sessions.
const WORKERS_EXIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(3);

fn dispatch(cli: Cli) -> u8 {
    if let Command::Run(args) = cli.command {
        return run::main(args);
    }
    let filter = cli
        .log
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "warn".into());
    if let Err(e) = logging::init(&filter, crate::config::LogFormat::Text) {
        eprintln!("tm-agent: {e}");
        return EXIT_USAGE;
    }
    if matches!(cli.command, Command::Key(_) | Command::Check(_)) {
        // They read PINs, and `key import` a private key (see `crate::hardening`).
        keep_memory_private();
    }
    match cli.command {
        Command::Run(_) => unreachable_run(),
        Command::Client(command) => u8::try_from(client::run(command)).unwrap_or(EXIT_FAILURE),
        Command::Bench(args) => match bench::run(args) {
            Ok(code) => u8::try_from(code).unwrap_or(EXIT_FAILURE),
            Err(err) => fail(&err),
        },
        Command::Key(args) => on_runtime(async move { key::run(*args).await.map(|()| 0) }),
        Command::Check(args) => on_runtime(async move {
            let mut out = std::io::stdout();
            Ok(check::run(args, &mut out).await)
        }),
    }
}

/// Marks the process not dumpable (`crate::hardening`); a refusal is logged, not fatal: the
/// command still works, only without that protection.
pub(crate) fn keep_memory_private() {
    if let Err(e) = crate::hardening::keep_memory_private() {
        tracing::warn!("{e}");
    }
}

fn unreachable_run() -> u8 {
    // `run` returned above; kept as a value rather than a panic.
    EXIT_FAILURE
}

/// Runs `work` on a fresh multi-threaded runtime; prints a failure and maps it to a code.
fn on_runtime<F>(work: F) -> u8
where
    F: std::future::Future<Output = anyhow::Result<u8>>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return EXIT_FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(code) => code,
        Err(err) => fail(&err),
    }
}

fn fail(err: &anyhow::Error) -> u8 {
    print_error(err, &mut std::io::stderr());
    exit_code(err)
}

/// The exit code for a failure: [`EXIT_USAGE`] for a command line that makes no sense,
/// [`EXIT_PIN`] for PIN problems, [`EXIT_CONFIG`] for an unusable config (the file, or what
/// it points at: a socket directory or group, a `ca_file`), [`EXIT_FAILURE`] otherwise. The
/// one mapping for every command.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if cause.downcast_ref::<UsageError>().is_some() {
            return EXIT_USAGE;
        }
        if let Some(e) = cause.downcast_ref::<SignerError>() {
            return signer_exit_code(e);
        }
        if cause.downcast_ref::<crate::config::ConfigError>().is_some()
            || cause.downcast_ref::<UnusableConfig>().is_some()
        {
            return EXIT_CONFIG;
        }
        if let Some(e) = cause.downcast_ref::<crate::server::ListenerError>() {
            return if e.is_config_problem() {
                EXIT_CONFIG
            } else {
                EXIT_FAILURE
            };
        }
        if let Some(crate::auth_api::ApiError::Config(_)) =
            cause.downcast_ref::<crate::auth_api::ApiError>()
        {
            return EXIT_CONFIG;
        }
    }
    EXIT_FAILURE
}

/// The exit status after another failure (`current` 0: none yet): the first failure's,
/// except that a PIN problem ([`EXIT_PIN`]) wins over any other, since systemd does not
/// restart it and a restart would send the wrong PIN again. `run` and `check` agree.
pub fn worst(current: u8, new: u8) -> u8 {
    if current == 0 || (new == EXIT_PIN && current != EXIT_PIN) {
        new
    } else {
        current
    }
}

/// [`EXIT_PIN`] for a wrong, locked or unreadable PIN, else [`EXIT_FAILURE`].
pub fn signer_exit_code(err: &SignerError) -> u8 {
    match err {
        SignerError::WrongPin { .. }
        | SignerError::PinLocked
        | SignerError::PinUnusable(_)
        | SignerError::Pin(_) => EXIT_PIN,
        _ => EXIT_FAILURE,
    }
}

/// Prints `error: …` and every cause below it, one per line, to `out`.
pub fn print_error(err: &anyhow::Error, out: &mut dyn std::io::Write) {
    let _ = writeln!(out, "error: {err}");
    for cause in err.chain().skip(1) {
        let _ = writeln!(out, "  caused by: {cause}");
    }
}

/// Runs blocking work (hardware calls, prompts) off the async runtime's workers.
pub(crate) async fn blocking<T, F>(f: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow::anyhow!("a blocking task failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// As for `run`, a PIN problem decides the status over any other failure, whichever key
    /// comes first; otherwise the first failure does.
    #[test]
    fn a_pin_problem_decides_the_exit_status() {
        assert_eq!(worst(0, EXIT_FAILURE), EXIT_FAILURE);
        assert_eq!(worst(EXIT_FAILURE, EXIT_PIN), EXIT_PIN);
        assert_eq!(worst(EXIT_PIN, EXIT_FAILURE), EXIT_PIN);
        assert_eq!(worst(0, 0), 0);
    }

    #[test]
    fn pin_failures_have_their_own_exit_code() {
        let err = anyhow::Error::new(SignerError::WrongPin { tries_left: None })
            .context("cannot open the key");
        assert_eq!(exit_code(&err), EXIT_PIN);
        let err = anyhow::anyhow!("something else");
        assert_eq!(exit_code(&err), EXIT_FAILURE);
        // What a restart cannot fix is a config problem (78, not restarted by the unit).
        let no_dir = crate::server::ListenerError::NoDir {
            dir: "/run/tm-agent".into(),
        };
        assert_eq!(
            exit_code(&anyhow::Error::new(no_dir).context("socket")),
            EXIT_CONFIG
        );
        let not_in_group = crate::server::ListenerError::NotInGroup { gid: 5 };
        assert_eq!(exit_code(&anyhow::Error::new(not_in_group)), EXIT_CONFIG);
        let in_use = crate::server::ListenerError::InUse {
            path: "/run/tm-agent/agent.sock".into(),
        };
        assert_eq!(exit_code(&anyhow::Error::new(in_use)), EXIT_FAILURE);
        let ca = crate::auth_api::ApiError::Config("ca_file is not PEM".into());
        assert_eq!(
            exit_code(&anyhow::Error::new(ca).context("profile p")),
            EXIT_CONFIG
        );
        let mut out = Vec::new();
        print_error(
            &anyhow::Error::new(SignerError::PinLocked).context("top"),
            &mut out,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("error: top\n  caused by: PIN is locked"));
    }
}
