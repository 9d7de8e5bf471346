//! The `tm-agent` binary: parses the command line and hands over to `tm_agent::cli`, which
//! sets up logging and the runtime each command needs and maps failures to exit codes.

use std::process::ExitCode;

use clap::Parser as _;
use tm_agent::cli::{self, Cli};

fn main() -> ExitCode {
    ExitCode::from(cli::main(Cli::parse()))
}
