//! `trackgate tail`: the reference consumer of the live tail (docs/storage-format.md).
//! Follows one device's tail streams (every key version) with `XREAD BLOCK` and prints
//! each new fix as a JSON line, as export writes it, with its stable `fix_id`. The IMEI
//! is read from standard input, never from the command line (process lists and shell
//! histories keep arguments); it only ever exists in memory here.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::admin::ConfigArg;
use crate::config::Config;
use crate::pseudonym::{Imei, KeyRing, Pseudonym};
use crate::store::{fixes_key, row::Row};

/// A stream entry as Redis sends it: id, then field and value alternating.
type RawEntry = (String, Vec<Vec<u8>>);

/// `trackgate tail`
#[derive(Debug, Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Follow this pseudonym (repeat for several); without it, one IMEI is read from
    /// standard input and followed under every key version.
    #[arg(long)]
    pub pseudonym: Vec<String>,
    /// Print the fixes already in the tail first (default: only new ones).
    #[arg(long)]
    pub from_start: bool,
    /// Stop after this many fixes (default: follow until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
    /// How long one read waits for new fixes, in ms, before it looks again.
    #[arg(long, default_value_t = 1000)]
    pub block_ms: u64,
}

/// Run `trackgate tail`.
pub(super) fn run(args: &TailArgs) -> ExitCode {
    let rt = match super::runtime("tail", "tg-tail") {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(follow(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trackgate tail: {e}");
            ExitCode::from(2)
        }
    }
}

fn devices(args: &TailArgs, keys: &KeyRing) -> Result<Vec<Pseudonym>, String> {
    if !args.pseudonym.is_empty() {
        return args
            .pseudonym
            .iter()
            .map(|p| Pseudonym::parse(p).ok_or_else(|| format!("not a pseudonym: {p}")))
            .collect();
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("reading the IMEI from standard input: {e}"))?;
    let imei = Imei::new(line.trim()).ok_or("standard input holds no valid IMEI")?;
    Ok(keys.all_pseudonyms(&imei))
}

async fn follow(args: &TailArgs) -> Result<(), String> {
    let config = Config::load(&args.config.config).map_err(|e| e.to_string())?;
    let tolerance = config.storage.future_tolerance_s();
    // The key file: IMEIs become pseudonyms, and sealed payloads open with its data keys.
    let keys = KeyRing::load(&config.keys.key_file).map_err(|e| e.to_string())?;
    let devices = devices(args, &keys)?;
    let mut conn = crate::redis_conn::connect(&config.redis).map_err(|e| e.to_string())?;
    // Where each key is read from: its start, or its newest entry now (`$` would skip
    // what arrives while another key is being read).
    let mut last = Vec::with_capacity(devices.len());
    for p in &devices {
        let newest: Vec<RawEntry> = if args.from_start {
            Vec::new()
        } else {
            redis::cmd("XREVRANGE")
                .arg(fixes_key(p))
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?
        };
        last.push(
            newest
                .into_iter()
                .next()
                .map_or("0-0".to_string(), |(id, _)| id),
        );
    }
    let block = args.block_ms.max(1) / devices.len().max(1) as u64;
    let mut printed = 0u64;
    let out = std::io::stdout();
    loop {
        for (p, after) in devices.iter().zip(last.iter_mut()) {
            // One key per read: a device's key versions may sit on different cluster
            // slots.
            let reply: Option<Vec<(String, Vec<RawEntry>)>> = redis::cmd("XREAD")
                .arg("BLOCK")
                .arg(block.max(1))
                .arg("STREAMS")
                .arg(fixes_key(p))
                .arg(after.as_str())
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            for (id, flat) in reply.into_iter().flatten().flat_map(|(_, e)| e) {
                let fields: Vec<(String, Vec<u8>)> = flat
                    .chunks_exact(2)
                    .map(|kv| (String::from_utf8_lossy(&kv[0]).into_owned(), kv[1].clone()))
                    .collect();
                if let Ok(row) = Row::from_entry(&id, &fields, tolerance, keys.vault(), p) {
                    let mut rec = row.to_json();
                    rec.insert("fix_id".into(), serde_json::json!(id));
                    let mut lock = out.lock();
                    writeln!(lock, "{}", serde_json::Value::Object(rec))
                        .and_then(|()| lock.flush())
                        .map_err(|e| e.to_string())?;
                    printed += 1;
                    if args.count.is_some_and(|c| printed >= c) {
                        return Ok(());
                    }
                }
                *after = id;
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
