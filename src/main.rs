use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = trackgate::cli::Cli::parse();
    trackgate::cli::run(cli)
}
