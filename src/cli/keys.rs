//! `trackgate keys generate|rotate|months|prune|list FILE`: the key file (pseudonym keys
//! and the data keys of payloads at rest, one per month).

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
    /// Add the data keys of this month and the next ones the file lacks (run it monthly,
    /// e.g. from cron; `serve` refuses to start without this and next month's key).
    Months {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Months after this one to hold keys for.
        #[arg(long, default_value_t = crate::pseudonym::MONTHS_AHEAD)]
        ahead: u16,
    },
    /// Destroy the data keys of months past the longest retention of `--config`
    /// (crypto-shredding: those months cannot be read from any copy any more).
    Prune {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// The gateway configuration whose retention (and `keys.data_key_grace_s`) decides.
        #[arg(long, value_name = "CONFIG")]
        config: PathBuf,
    },
    /// Print the key versions and data-key months held (never a secret).
    List {
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
        KeysCommand::Months { file, ahead } => {
            KeyRing::add_data_months(file, *ahead).map(|added| {
                let months: Vec<String> = added.iter().map(|m| m.to_string()).collect();
                match months.is_empty() {
                    true => println!("{}: every data key up to {ahead} months ahead is there", file.display()),
                    false => println!(
                        "{}: data keys added for {}; restart gateways to use them",
                        file.display(),
                        months.join(", ")
                    ),
                }
            })
        }
        KeysCommand::Prune { file, config } => match crate::config::Config::load(config) {
            Err(e) => {
                eprintln!("trackgate keys: {}: {e}", config.display());
                return ExitCode::from(2);
            }
            Ok(c) => KeyRing::prune_data_months(file, c.data_key_keep()).map(|gone| {
                let months: Vec<String> = gone.iter().map(|m| m.to_string()).collect();
                match months.is_empty() {
                    true => println!("{}: no data key is past the longest retention", file.display()),
                    false => println!(
                        "{}: data keys destroyed for {} (also remove older copies of this file); restart gateways",
                        file.display(),
                        months.join(", ")
                    ),
                }
            }),
        },
        KeysCommand::List { file } => KeyRing::load(file).map(|ring| {
            let versions: Vec<String> = ring.versions().iter().map(|v| v.to_string()).collect();
            let months: Vec<String> = ring.vault().months().iter().map(|m| m.to_string()).collect();
            println!("pseudonym key versions: {}", versions.join(", "));
            println!("data key months: {}", months.join(", "));
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
