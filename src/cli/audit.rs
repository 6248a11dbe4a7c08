//! `trackgate audit verify|export --config FILE`: check the audit trail's hash chain, and
//! write its lines out for archiving (before `audit.retention_s` trims them).

use std::io::Write as _;
use std::process::ExitCode;

use clap::Subcommand;

use super::admin::ConfigArg;
use crate::audit::{self, Verified};
use crate::config::Config;

/// `trackgate audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute the hash chain of every line; report the first line that breaks it
    /// (exit status 1).
    Verify {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print every line (id, fields, `prev` and `h`) as JSON lines, oldest first.
    Export {
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// Lines read per call.
const PAGE: usize = 1000;

pub(super) fn run(cmd: &AuditCommand) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trackgate audit: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(go(cmd)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("trackgate audit: {e}");
            ExitCode::from(2)
        }
    }
}

async fn go(cmd: &AuditCommand) -> Result<ExitCode, String> {
    let (AuditCommand::Verify { config } | AuditCommand::Export { config }) = cmd;
    let config = Config::load(&config.config).map_err(|e| e.to_string())?;
    let mut conn = crate::redis_conn::connect(&config.redis).map_err(|e| e.to_string())?;
    let mut state = Verified::default();
    let mut last_h = None;
    let mut after = "-".to_string();
    let out = std::io::stdout();
    loop {
        let lines = audit::page(&mut conn, &after, PAGE)
            .await
            .map_err(|e| e.to_string())?;
        match cmd {
            AuditCommand::Verify { .. } => audit::verify(&lines, &mut state, &mut last_h),
            AuditCommand::Export { .. } => {
                let mut lock = out.lock();
                for (id, fields) in &lines {
                    let mut m = serde_json::Map::new();
                    m.insert("id".into(), id.clone().into());
                    for (k, v) in fields {
                        m.insert(k.clone(), v.clone().into());
                    }
                    writeln!(lock, "{}", serde_json::Value::Object(m))
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        match lines.last() {
            Some((id, _)) if lines.len() == PAGE => after = format!("({id}"),
            _ => break,
        }
    }
    if let AuditCommand::Verify { .. } = cmd {
        return Ok(match &state.first_break {
            None => {
                println!(
                    "audit trail intact: {} lines ({} from before the chain)",
                    state.lines, state.unchained
                );
                ExitCode::SUCCESS
            }
            Some((id, why)) => {
                println!(
                    "audit trail broken at line {id}: {why} ({} lines read)",
                    state.lines
                );
                ExitCode::from(1)
            }
        });
    }
    Ok(ExitCode::SUCCESS)
}
