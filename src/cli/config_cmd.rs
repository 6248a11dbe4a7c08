//! `trackgate config validate FILE` and `trackgate config example`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use crate::config::Config;

/// `trackgate config …`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check a configuration file; on error, name the field at fault.
    Validate {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Print a configuration with every field at its default.
    Example,
}

pub(super) fn run(cmd: &ConfigCommand) -> ExitCode {
    match cmd {
        ConfigCommand::Validate { file } => match Config::load(file) {
            // The key file too, when it is there (a config is often checked before one
            // is made): `serve` refuses one without this and next month's data keys.
            Ok(c) if c.keys.key_file.exists() => match super::serve::load_keys(&c) {
                Ok(_) => {
                    println!("{}: ok (key file included)", file.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    ExitCode::from(2)
                }
            },
            Ok(c) => {
                println!(
                    "{}: ok (key file {} not found: not checked)",
                    file.display(),
                    c.keys.key_file.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                ExitCode::from(2)
            }
        },
        ConfigCommand::Example => match toml::to_string_pretty(&Config::default()) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("trackgate config example: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
