//! `trackgate keys generate|rotate FILE`: the pseudonymization key file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use crate::pseudonym::KeyRing;

/// `trackgate keys …`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key file with one random key (owner-readable only; never overwrites).
    Generate {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Add a new key version; new writes use it, old ones stay for export and purge.
    Rotate {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

pub(super) fn run(cmd: &KeysCommand) -> ExitCode {
    let result = match cmd {
        KeysCommand::Generate { file } => KeyRing::generate(file).map(|()| {
            println!("{}: key version 1 written", file.display());
        }),
        KeysCommand::Rotate { file } => KeyRing::rotate(file, None).map(|v| {
            println!(
                "{}: key version {v} added; restart gateways to use it",
                file.display()
            );
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trackgate keys: {e}");
            ExitCode::from(2)
        }
    }
}
