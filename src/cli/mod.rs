//! Command line: one subcommand per tool, each in its own module.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod admin;
mod audit;
mod bench;
mod client;
mod config_cmd;
mod decode;
mod demo;
mod keys;
mod loadgen;
mod serve;
mod tail;

pub use admin::{CustomerCommand, DeviceCommand, TokenCommand};
pub use bench::BenchArgs;
pub use client::{ExportArgs, PurgeArgs};
pub use config_cmd::ConfigCommand;
pub use decode::DecodeArgs;
pub use demo::DemoArgs;
pub use keys::KeysCommand;
pub use loadgen::LoadgenArgs;
pub use serve::ServeArgs;
pub use tail::TailArgs;

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
    /// Run the gateway.
    Serve(ServeArgs),
    /// Run Redis, the gateway and a simulated fleet on this machine, with live stats.
    Demo(DemoArgs),
    /// Simulate a fleet of trackers against a running gateway (loopback only by default).
    Loadgen(LoadgenArgs),
    /// Measure this machine: Redis ceiling, sustained rate, latency, memory (writes a report).
    Bench(BenchArgs),
    /// Decode Meitrack frames to JSON Lines (one object per fix).
    Decode(DecodeArgs),
    /// Configuration file tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Pseudonymization key file tools.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Customer administration (direct to Redis).
    #[command(subcommand)]
    Customer(CustomerCommand),
    /// API tokens of customers.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Device ownership.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Ask the API to purge a device (or a fix-time range), or show a purge's receipt.
    Purge(PurgeArgs),
    /// Download a device's history from the API.
    Export(ExportArgs),
    /// Follow a device's new fixes in its live tail (Redis), as JSON lines: the reference
    /// consumer of docs/storage-format.md. The IMEI is read from standard input.
    Tail(TailArgs),
    /// The audit trail: verify its hash chain, export it for archiving.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
}

/// Run a parsed command line; the exit code is the process's.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve(args) => serve::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Loadgen(args) => loadgen::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Decode(args) => decode::run(&args),
        Command::Config(cmd) => config_cmd::run(&cmd),
        Command::Keys(cmd) => keys::run(&cmd),
        Command::Audit(cmd) => audit::run(&cmd),
        Command::Customer(cmd) => admin::customer(&cmd),
        Command::Token(cmd) => admin::token(&cmd),
        Command::Device(cmd) => admin::device(&cmd),
        Command::Purge(args) => client::purge(&args),
        Command::Export(args) => client::export(&args),
        Command::Tail(args) => tail::run(&args),
    }
}

/// The multi-thread runtime of a subcommand, its threads named `thread_name` (so profiles,
/// e.g. `perf report --sort comm`, tell the gateway and the load generator apart). On
/// failure the error is printed and the exit code returned.
fn runtime(command: &str, thread_name: &str) -> Result<tokio::runtime::Runtime, ExitCode> {
    runtime_with_threads(command, thread_name, None)
}

/// [`runtime`] with `threads` worker threads (`None`: one per CPU).
fn runtime_with_threads(
    command: &str,
    thread_name: &str,
    threads: Option<usize>,
) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        b.worker_threads(n.max(1));
    }
    b.enable_all()
        .thread_name(thread_name)
        .build()
        .map_err(|e| {
            eprintln!("trackgate {command}: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

/// Entries across all fixes streams (SCAN + XLEN; for demo- and bench-sized data).
async fn count_stored_fixes(
    conn: &mut redis::aio::MultiplexedConnection,
) -> redis::RedisResult<u64> {
    use crate::store::{FIXES_PATTERN, HIST_PATTERN, chunk, scan_keys};
    let mut total = 0u64;
    for (pattern, kind) in [(FIXES_PATTERN, "stream"), (HIST_PATTERN, "zset")] {
        let mut cursor = 0u64;
        loop {
            let (next, keys) = scan_keys(conn, cursor, pattern, kind).await?;
            // SCAN pages may be empty; an empty pipeline is an error to redis-rs.
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for k in &keys {
                    match kind {
                        "stream" => pipe.cmd("XLEN").arg(k),
                        _ => pipe.cmd("ZRANGE").arg(k).arg(0).arg(-1),
                    };
                }
                total += match kind {
                    "stream" => pipe
                        .query_async::<Vec<u64>>(conn)
                        .await?
                        .iter()
                        .sum::<u64>(),
                    _ => pipe
                        .query_async::<Vec<Vec<Vec<u8>>>>(conn)
                        .await?
                        .iter()
                        .flatten()
                        .filter_map(|c| chunk::header(c).ok())
                        .map(|h| h.count as u64)
                        .sum(),
                };
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(total)
}

/// Bytes per column over every history chunk in Redis (decoded and encoded again one
/// column at a time), largest first: where the bytes of a sealed fix go.
async fn chunk_column_bytes(
    conn: &mut redis::aio::MultiplexedConnection,
    key_file: &std::path::Path,
) -> Result<Vec<(String, u64)>, String> {
    use crate::store::{HIST_PATTERN, chunk, hist, pseudonym_of_key, scan_keys};
    let ring = crate::pseudonym::KeyRing::load(key_file).map_err(|e| e.to_string())?;
    let mut sums: Vec<(String, u64)> = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, keys) = scan_keys(conn, cursor, HIST_PATTERN, "zset")
            .await
            .map_err(|e| e.to_string())?;
        for k in keys {
            let chunks: Vec<Vec<u8>> = redis::cmd("ZRANGE")
                .arg(&k)
                .arg(0)
                .arg(-1)
                .query_async(conn)
                .await
                .map_err(|e| e.to_string())?;
            let Some(p) = pseudonym_of_key(&k) else {
                continue;
            };
            for rows in chunks
                .iter()
                .filter_map(|c| hist::open(ring.vault(), &p, c).ok())
            {
                for (i, (name, n)) in chunk::column_sizes(&rows).into_iter().enumerate() {
                    match sums.get_mut(i) {
                        Some(s) => s.1 += n as u64,
                        None => sums.push((name.to_string(), n as u64)),
                    }
                }
            }
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    sums.sort_by_key(|s| std::cmp::Reverse(s.1));
    Ok(sums)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    /// SCAN pages can be empty (here: every page, as only other keys exist); counting must
    /// not send an empty pipeline (the bench's memory step once failed on that).
    #[tokio::test]
    async fn counting_fixes_survives_empty_scan_pages() {
        let redis = crate::redis_child::RedisChild::start().await.unwrap();
        let client = redis::Client::open(redis.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let p = crate::pseudonym::Pseudonym::parse("p1_abcdefghijklmnopqrstuvwxyz").unwrap();
        let tail = crate::store::fixes_key(&p);
        let mut pipe = redis::pipe();
        for i in 0..2000 {
            pipe.cmd("SET").arg(format!("other:{i}")).arg(1).ignore();
        }
        pipe.cmd("XADD")
            .arg(&tail)
            .arg("*")
            .arg("d")
            .arg("x")
            .ignore();
        let _: () = pipe.query_async(&mut conn).await.unwrap();
        assert_eq!(super::count_stored_fixes(&mut conn).await.unwrap(), 1);
        let _: () = redis::cmd("DEL")
            .arg(&tail)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(super::count_stored_fixes(&mut conn).await.unwrap(), 0);
        redis.stop().await;
    }
}
