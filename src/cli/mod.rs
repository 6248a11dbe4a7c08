//! Command line: one subcommand per tool, each in its own module.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod decode;

pub use decode::DecodeArgs;

/// trackgate: privacy-first ingest gateway for Meitrack GPS trackers.
#[derive(Debug, Parser)]
#[command(name = "trackgate", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Decode Meitrack frames to JSON Lines (one object per fix).
    Decode(DecodeArgs),
}

/// Run a parsed command line; the exit code is the process's.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Decode(args) => decode::run(&args),
    }
}
