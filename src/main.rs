//! The `tm-agent` binary: parses the command line, sets up logging, builds the tokio runtime,
//! runs the command and turns its failure into an exit code (see `cli::exit_code`). All the
//! work lives in the library (`tm_agent::cli`).

use std::process::ExitCode;

use clap::Parser as _;
use tm_agent::cli::{self, Cli};
use tm_agent::signer::piv;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log.as_deref());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(cli::EXIT_FAILURE);
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            cli::print_error(&err, &mut std::io::stderr());
            ExitCode::from(cli::exit_code(&err))
        }
    }
}

/// Logs to standard error; `--log` wins over `$RUST_LOG`, the default is warnings. Whatever
/// is asked for, the `yubikey` and `pcsc` crates stay at WARN: their TRACE output carries
/// every APDU, PINs included (`piv::capped_log_filter`).
fn init_tracing(filter: Option<&str>) {
    let wanted = match filter {
        Some(f) => f.to_string(),
        None => std::env::var(EnvFilter::DEFAULT_ENV).unwrap_or_else(|_| "warn".into()),
    };
    let filter = EnvFilter::try_new(piv::capped_log_filter(&wanted))
        .unwrap_or_else(|_| EnvFilter::new(piv::capped_log_filter("warn")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
