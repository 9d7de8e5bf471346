//! The `tm-agent` command line, one file per subcommand group. Only `key` exists so far; the
//! daemon (`run`), the client operations and `check` join the [`Command`] enum later.
//!
//! Owns argument parsing (clap derive), what is printed, and the mapping of failures to exit
//! codes. Uses `anyhow`; the library modules below keep their typed errors, which end up in
//! the printed cause chain. Runs on the tokio runtime that `main` builds; blocking work
//! (PKCS#11 calls, PIN prompts, reading stdin) goes through `spawn_blocking`.

pub mod key;

use clap::{Parser, Subcommand};

use crate::signer::SignerError;

/// Exit code of every failure without a more specific code.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code of a command line that clap rejects (clap's own convention).
pub const EXIT_USAGE: u8 = 2;
/// Exit code when the PIN is wrong, locked, or cannot be read.
pub const EXIT_PIN: u8 = 3;

/// tm-agent: keeps the True Markets API key in an HSM and signs with it.
#[derive(Debug, Parser)]
#[command(name = "tm-agent", version, about, long_about = None)]
pub struct Cli {
    /// Log filter in tracing's EnvFilter syntax (default: $RUST_LOG, else "warn"). Logs go
    /// to standard error.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommand groups.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage and use the API key directly, without the daemon: generate, import, list,
    /// public, sign-challenge, stamp.
    Key(key::KeyArgs),
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Key(args) => key::run(args).await,
    }
}

/// The exit code for a failure: [`EXIT_PIN`] for PIN problems, [`EXIT_FAILURE`] otherwise.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(SignerError::WrongPin { .. } | SignerError::PinLocked | SignerError::Pin(_)) =
            cause.downcast_ref::<SignerError>()
        {
            return EXIT_PIN;
        }
    }
    EXIT_FAILURE
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

    #[test]
    fn pin_failures_have_their_own_exit_code() {
        let err = anyhow::Error::new(SignerError::WrongPin { tries_left: None })
            .context("cannot open the key");
        assert_eq!(exit_code(&err), EXIT_PIN);
        let err = anyhow::anyhow!("something else");
        assert_eq!(exit_code(&err), EXIT_FAILURE);
        let mut out = Vec::new();
        print_error(
            &anyhow::Error::new(SignerError::PinLocked).context("top"),
            &mut out,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("error: top\n  caused by: PIN is locked"));
    }
}
