//! The `outboxd` command line: parses arguments and runs one subcommand.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = outboxd::cli::Cli::parse();
    let code = outboxd::cli::main(cli);
    ExitCode::from(code.clamp(0, 255) as u8)
}
