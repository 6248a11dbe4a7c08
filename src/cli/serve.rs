//! `trackgate serve --config FILE`: run the gateway until SIGTERM/Ctrl-C.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;

use crate::config::Config;
use crate::gateway::{Gateway, termination_signal};
use crate::pseudonym::KeyRing;

/// Arguments of `trackgate serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML).
    #[arg(long, short, value_name = "FILE")]
    pub config: PathBuf,
}

/// The key file of `config`, refused unless it holds data keys for this month and the
/// next (payloads are sealed with them; DESIGN §9). Data keys that should have been
/// destroyed are the gateway's warning and metric (`trackgate_data_keys_overdue`).
pub(super) fn load_keys(config: &Config) -> Result<KeyRing, String> {
    let keys = KeyRing::load(&config.keys.key_file).map_err(|e| e.to_string())?;
    keys.check_data_months(crate::store::vault::Month::now())
        .map_err(|e| format!("{}: {e}", config.keys.key_file.display()))?;
    Ok(keys)
}

pub(super) fn run(args: &ServeArgs) -> ExitCode {
    init_logging();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("trackgate serve: {}: {e}", args.config.display());
            return ExitCode::from(2);
        }
    };
    let keys = match load_keys(&config) {
        Ok(k) => Arc::new(k),
        Err(e) => {
            eprintln!("trackgate serve: {e}");
            return ExitCode::from(2);
        }
    };
    // Room for every allowed connection (the default soft limit is often 1024).
    let connections: usize = config.limits.max_connections;
    if let Err(e) = crate::fd_limit::ensure(connections) {
        tracing::warn!("{e}; connections beyond the limit will fail to be accepted");
    }
    let rt = match super::runtime("serve", "tg-gateway") {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let gateway = match Gateway::start(config, keys).await {
            Ok(g) => g,
            Err(e) => {
                eprintln!("trackgate serve: {e}");
                return ExitCode::FAILURE;
            }
        };
        termination_signal().await;
        gateway.shutdown();
        gateway.wait().await;
        ExitCode::SUCCESS
    })
}

/// `tracing` to stderr; `RUST_LOG` filters (default `info`).
pub(crate) fn init_logging() {
    init_logging_at("info");
}

/// Warnings and errors only unless `RUST_LOG` says otherwise (the demo prints its own
/// stats on stdout).
pub(crate) fn init_logging_quiet() {
    init_logging_at("warn");
}

fn init_logging_at(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
