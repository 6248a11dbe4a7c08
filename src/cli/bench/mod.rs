//! `trackgate bench`: the gateway against the physical ceiling of this box, in one run.
//!
//! 1. Its own `redis-server`; `redis-benchmark` XADD of a fix-sized value to random
//!    streams, pipelined and not: the ceiling.
//! 2. The gateway and the load generator as separate processes; the offered load is
//!    ramped (CCE batches, every fix confirmed) to the highest rate at which confirmations
//!    keep up with p99 ACK latency under the limit; reported as a ratio to the ceiling.
//! 3. ACK latency at half that rate with many connections.
//! 4. Gateway RSS per idle connection (plain TCP and TLS).
//! 5. Redis bytes per stored fix from `INFO memory`, in the live tail and sealed, for the
//!    bench fleet and a realistic one, with the CPU time of storing and sealing them; a
//!    sizing table computed from those figures (`memory.rs`, `sizing.rs`).
//! 6. Decode throughput against a checksum-only pass over the same bytes.
//!
//! Writes `<out>/<timestamp>/report.json`, `summary.md` and SVG plots. Machines are noisy,
//! so every figure that matters is a ratio to a baseline measured in the same run.

mod ceiling;
mod memory;
mod plot;
mod procs;
mod ramp;
mod sizing;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use trackgate_protocols::{Direction, Framer, Scan, checksum, decode, encode};

use self::ceiling::Ceiling;
use self::memory::{MemoryFleet, RedisMemory};
use self::procs::{GatewayProc, run_loadgen, spawn_loadgen};
use self::ramp::Step;
use self::sizing::Sizing;
use crate::loadgen::fleet::sample_fixes;
use crate::loadgen::report::LoadReport;
use crate::metrics as m;
use crate::redis_child::RedisChild;
use crate::store::{FieldValue, StoredFix};

/// Arguments of `trackgate bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Results go to `<out>/<UTC timestamp>/`.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// A small, fast run (a minute or two) to check the set-up; figures are not for sizing.
    #[arg(long)]
    pub quick: bool,
    /// Seconds per ramp step.
    #[arg(long, default_value_t = 10.0)]
    pub step_s: f64,
    /// Devices during the ramp.
    #[arg(long, default_value_t = 1000)]
    pub ramp_devices: usize,
    /// Fixes per CCE batch during the ramp and the latency run.
    #[arg(long, default_value_t = 10)]
    pub batch_fixes: usize,
    /// First offered rate of the ramp, fixes per second.
    #[arg(long, default_value_t = 5000.0)]
    pub start_fixes_per_s: f64,
    /// A step passes while the p99 ACK latency stays under this.
    #[arg(long, default_value_t = 100.0)]
    pub p99_limit_ms: f64,
    /// Connections for the latency run at half the highest sustained rate.
    #[arg(long, default_value_t = 10_000)]
    pub latency_connections: usize,
    /// Seconds of the latency run.
    #[arg(long, default_value_t = 30.0)]
    pub latency_s: f64,
    /// Idle plain-TCP connection counts to measure memory at.
    #[arg(long = "idle-connections", num_args = 1.., default_values_t = [10_000usize, 100_000])]
    pub idle_connections: Vec<usize>,
    /// Idle TLS connections to measure memory at.
    #[arg(long, default_value_t = 10_000)]
    pub tls_idle_connections: usize,
    /// Fixes to store for the Redis bytes-per-fix figures, per fleet (the bench fleet's
    /// CCE batches, then the realistic AAA-only fleet reporting every 30 s).
    #[arg(long, default_value_t = 1_000_000)]
    pub memory_fixes: u64,
    /// Only the Redis bytes-per-fix step (tail, then sealed history, for both fleets, with
    /// the CPU time of storing and sealing) and the sizing table computed from it.
    #[arg(long)]
    pub memory_only: bool,
}

/// Everything a run measured.
#[derive(Debug, Default, Serialize)]
pub(crate) struct BenchReport {
    pub started_at: String,
    pub machine: Machine,
    pub ceiling: Ceiling,
    pub ramp: Vec<Step>,
    /// Highest confirmed rate of a passing ramp step.
    pub max_sustained_fixes_per_s: f64,
    /// That rate over the pipelined XADD ceiling (goal ≥ 0.6).
    pub ratio_to_ceiling: f64,
    pub ratio_to_unpipelined: f64,
    pub latency_run: Option<LatencyRun>,
    pub idle: Vec<IdleMemory>,
    /// One entry per fleet ([`MemoryFleet::ALL`]).
    pub redis_memory: Vec<RedisMemory>,
    /// Computed from the realistic fleet's figures.
    pub sizing: Option<Sizing>,
    pub decode: DecodeSpeed,
    pub notes: Vec<String>,
}

/// Where the figures come from.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub mem_total_gib: f64,
    pub kernel: String,
    pub redis_version: String,
    pub fd_hard_limit: u64,
    /// `/proc/loadavg` when the run started and when it ended: other work on the box.
    pub loadavg_start: String,
    pub loadavg_end: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct LatencyRun {
    pub connections: usize,
    pub offered_fixes_per_s: f64,
    pub acked_fixes_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub reconnects: u64,
    pub connect_errors: u64,
}

#[derive(Debug, Serialize)]
pub(crate) struct IdleMemory {
    pub connections: usize,
    pub tls: bool,
    /// Connections the gateway reported open when RSS was read.
    pub open: u64,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    pub bytes_per_connection: f64,
    /// Why it was not measured, if it was not.
    pub skipped: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct DecodeSpeed {
    pub bytes: usize,
    pub frames: usize,
    pub checksum_bytes_per_s: f64,
    pub decode_bytes_per_s: f64,
    pub decode_frames_per_s: f64,
    /// decode / checksum-only, same bytes, same run.
    pub ratio: f64,
}

pub(super) fn run(args: &BenchArgs) -> ExitCode {
    let rt = match super::runtime("bench", "tg-bench") {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    // On Ctrl-C/SIGTERM the run is dropped, and with it every child process it started
    // (redis-server, gateways, load generators are all killed on drop): nothing is left
    // running behind an interrupted benchmark.
    let interruptible = async {
        tokio::select! {
            r = bench(args) => r,
            () = crate::gateway::termination_signal() => Err("interrupted".to_string()),
        }
    };
    match rt.block_on(interruptible) {
        Ok(dir) => {
            println!("report: {}", dir.join("summary.md").display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("trackgate bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Scale the knobs down for `--quick`.
fn effective(args: &BenchArgs) -> BenchArgs {
    if !args.quick {
        return BenchArgs {
            out: args.out.clone(),
            idle_connections: args.idle_connections.clone(),
            ..*args
        };
    }
    BenchArgs {
        out: args.out.clone(),
        quick: true,
        step_s: 5.0,
        ramp_devices: 200,
        latency_connections: 1000,
        latency_s: 8.0,
        idle_connections: vec![1000],
        tls_idle_connections: 500,
        memory_fixes: 50_000,
        ..*args
    }
}

async fn bench(args: &BenchArgs) -> Result<PathBuf, String> {
    let args = &effective(args);
    let stamp = jiff::Timestamp::now()
        .strftime("%Y%m%dT%H%M%SZ")
        .to_string();
    let dir = args.out.join(&stamp);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let redis = RedisChild::start().await?;
    let client = redis::Client::open(redis.url()).map_err(|e| e.to_string())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    // FLUSHALL of millions of entries and SCANs over them take seconds.
    conn.set_response_timeout(Duration::from_secs(120));
    let mut report = BenchReport {
        started_at: jiff::Timestamp::now().to_string(),
        machine: machine(&mut conn).await,
        ..BenchReport::default()
    };

    say("decode vs checksum-only");
    report.decode = decode_speed();
    if args.memory_only {
        redis_memory(
            &mut report,
            args,
            MEMORY_RATE,
            &redis.url(),
            work.path(),
            &mut conn,
        )
        .await?;
        return finish(report, args, &dir, redis).await;
    }

    say("ceiling: redis-benchmark XADD");
    report.ceiling = measure_ceiling(redis.port, args.quick).await?;
    flush(&mut conn).await?;

    say("ramp: highest rate with p99 ACK latency under the limit");
    let (steps, best_run) = ramp_up(args, &redis.url(), work.path()).await?;
    report.max_sustained_fixes_per_s = ramp::best_pass(&steps)
        .map(|s| s.acked_fixes_per_s)
        .unwrap_or(0.0);
    report.ratio_to_ceiling =
        report.max_sustained_fixes_per_s / report.ceiling.xadd_pipelined_per_s.max(1.0);
    report.ratio_to_unpipelined =
        report.max_sustained_fixes_per_s / report.ceiling.xadd_unpipelined_per_s.max(1.0);
    plot::ramp(
        &steps,
        report.ceiling.xadd_pipelined_per_s,
        &dir.join("ramp.svg"),
    )?;
    report.ramp = steps;
    if let Some(r) = &best_run {
        plot::throughput(
            r,
            "Highest passing ramp step",
            &dir.join("ramp-best-throughput.svg"),
        )?;
        save(r, &dir.join("ramp-best-load.json"))?;
    }
    flush(&mut conn).await?;

    if report.max_sustained_fixes_per_s > 0.0 {
        say("latency at half the sustained rate");
        let rate = report.max_sustained_fixes_per_s / 2.0;
        let r = latency_run(args, rate, &redis.url(), work.path()).await?;
        plot::throughput(
            &r,
            &format!(
                "{} connections at {rate:.0} fixes/s offered",
                args.latency_connections
            ),
            &dir.join("throughput.svg"),
        )?;
        plot::latency(
            &r,
            "ACK latency per second (p50, p99)",
            &dir.join("latency.svg"),
        )?;
        plot::cdf(&r, "ACK latency distribution", &dir.join("latency-cdf.svg"))?;
        save(&r, &dir.join("latency-load.json"))?;
        eprintln!(
            "  {} connections, {:.0} fixes/s offered: p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms",
            args.latency_connections,
            r.offered.fixes_per_s,
            r.latency.p50_ms,
            r.latency.p99_ms,
            r.latency.p999_ms
        );
        report.latency_run = Some(LatencyRun {
            connections: args.latency_connections,
            offered_fixes_per_s: r.offered.fixes_per_s,
            acked_fixes_per_s: r.totals.fixes_acked as f64 / r.duration_s.max(1e-6),
            p50_ms: r.latency.p50_ms,
            p99_ms: r.latency.p99_ms,
            p999_ms: r.latency.p999_ms,
            max_ms: r.latency.max_ms,
            reconnects: r.totals.disconnects,
            connect_errors: r.totals.connect_errors,
        });
        flush(&mut conn).await?;
    }

    say("memory per idle connection");
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((0, 0));
    // Each side holds one descriptor per connection; beyond the hard limit, measure at the
    // most this machine allows instead (and say why the asked-for count was skipped).
    let most = usize::try_from(hard.saturating_sub(200) / 1000 * 1000).unwrap_or(0);
    let mut counts = args.idle_connections.clone();
    if counts.iter().any(|&n| n as u64 + 64 > hard) && most > 0 && !counts.contains(&most) {
        counts.push(most);
    }
    for n in counts {
        report
            .idle
            .push(idle_memory(n, false, hard, &redis.url(), work.path()).await?);
    }
    report.idle.push(
        idle_memory(
            args.tls_idle_connections,
            true,
            hard,
            &redis.url(),
            work.path(),
        )
        .await?,
    );
    flush(&mut conn).await?;

    let rate = (report.max_sustained_fixes_per_s * 0.8).clamp(2000.0, MEMORY_RATE);
    redis_memory(
        &mut report,
        args,
        rate,
        &redis.url(),
        work.path(),
        &mut conn,
    )
    .await?;

    finish(report, args, &dir, redis).await
}

/// Write the report and stop the bench's Redis.
async fn finish(
    mut report: BenchReport,
    args: &BenchArgs,
    dir: &Path,
    redis: RedisChild,
) -> Result<PathBuf, String> {
    report.machine.loadavg_end = loadavg();
    report.notes = notes(&report, args);
    let json = serde_json::to_vec_pretty(&report).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("report.json"), json).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("summary.md"), summary(&report, args)).map_err(|e| e.to_string())?;
    redis.stop().await;
    Ok(dir.to_path_buf())
}

/// The load generator's own report of a run, kept beside the plots drawn from it.
fn save(r: &LoadReport, path: &Path) -> Result<(), String> {
    let json = serde_json::to_vec_pretty(r).map_err(|e| e.to_string())?;
    std::fs::write(path, json).map_err(|e| format!("{}: {e}", path.display()))
}

fn say(what: &str) {
    eprintln!("trackgate bench: {what}");
}

async fn flush(conn: &mut redis::aio::MultiplexedConnection) -> Result<(), String> {
    redis::cmd("FLUSHALL")
        .query_async::<()>(conn)
        .await
        .map_err(|e| e.to_string())
}

async fn machine(conn: &mut redis::aio::MultiplexedConnection) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(conn)
        .await
        .unwrap_or_default();
    Machine {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_default(),
        mem_total_gib: meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0 / 1024.0),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        redis_version: info
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .unwrap_or_default()
            .trim()
            .to_string(),
        fd_hard_limit: rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |l| l.1),
        loadavg_start: loadavg(),
        loadavg_end: String::new(),
    }
}

/// Bytes of the packed `d` value of a typical stored fix.
fn stored_value_bytes() -> usize {
    let fixes = sample_fixes(7, 100);
    let total: usize = fixes
        .iter()
        .map(|f| {
            StoredFix::from_fix(trackgate_protocols::MessageKind::Cce, f)
                .fields
                .iter()
                .map(|(_, v)| match v {
                    FieldValue::Bytes(b) => b.len(),
                    _ => 0,
                })
                .sum::<usize>()
        })
        .sum();
    total / fixes.len().max(1)
}

async fn measure_ceiling(port: u16, quick: bool) -> Result<Ceiling, String> {
    let value_bytes = stored_value_bytes();
    let value = "x".repeat(value_bytes);
    let clients = 50;
    let mut rps = [0.0; 2];
    for (i, (pipeline, requests)) in [(64u32, 2_000_000u64), (1, 200_000)].iter().enumerate() {
        let requests = if quick { requests / 10 } else { *requests };
        let out = tokio::process::Command::new("redis-benchmark")
            .args(ceiling::args(port, requests, *pipeline, clients, &value))
            .output()
            .await
            .map_err(|e| format!("redis-benchmark: {e} (install redis-tools)"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        rps[i] = ceiling::parse_rps(&text)
            .ok_or_else(|| format!("redis-benchmark printed no result: {text}"))?;
    }
    Ok(Ceiling {
        value_bytes,
        xadd_pipelined_per_s: rps[0],
        xadd_unpipelined_per_s: rps[1],
        clients,
    })
}

/// Load generator arguments for `devices` sending CCE batches at `rate` fixes/s in all.
fn cce_load(target: std::net::SocketAddr, devices: usize, batch: usize, rate: f64) -> Vec<String> {
    let interval_s = devices as f64 * batch as f64 / rate.max(1.0);
    [
        "--target".to_string(),
        target.to_string(),
        "--devices".into(),
        devices.to_string(),
        "--interval-s".into(),
        format!("{interval_s:.6}"),
        "--cce-share".into(),
        "1".into(),
        "--batch-fixes".into(),
        batch.to_string(),
        "--ramp-s".into(),
        format!("{:.3}", interval_s.min(2.0)),
    ]
    .into()
}

async fn ramp_up(
    args: &BenchArgs,
    redis_url: &str,
    work: &Path,
) -> Result<(Vec<Step>, Option<LoadReport>), String> {
    let gw = GatewayProc::start(redis_url, work, None, args.ramp_devices + 100).await?;
    let mut steps: Vec<Step> = Vec::new();
    let mut best: Option<LoadReport> = None;
    let mut rate = args.start_fixes_per_s;
    let max_steps = if args.quick { 4 } else { 18 };
    loop {
        let mut load = cce_load(gw.tracker, args.ramp_devices, args.batch_fixes, rate);
        load.extend([
            "--duration-s".into(),
            args.step_s.to_string(),
            "--warmup-s".into(),
            ramp::WARMUP_S.to_string(),
        ]);
        let r = run_loadgen(&load, &work.join("step.json")).await?;
        let step = ramp::judge(&r, args.p99_limit_ms);
        eprintln!(
            "  offered {:>9.0}/s  confirmed {:>9.0}/s  p50 {:>7.1} ms  p99 {:>7.1} ms  {}",
            step.offered_fixes_per_s,
            step.acked_fixes_per_s,
            step.p50_ms,
            step.p99_ms,
            if step.passed { "pass" } else { "FAIL" }
        );
        if step.passed
            && ramp::best_pass(&steps).is_none_or(|b| step.acked_fixes_per_s > b.acked_fixes_per_s)
        {
            best = Some(r);
        }
        steps.push(step);
        match ramp::next_rate(&steps, 1.5, max_steps) {
            Some(next) => rate = next,
            None => break,
        }
    }
    gw.stop().await;
    Ok((steps, best))
}

async fn latency_run(
    args: &BenchArgs,
    rate: f64,
    redis_url: &str,
    work: &Path,
) -> Result<LoadReport, String> {
    let n = args.latency_connections;
    let gw = GatewayProc::start(redis_url, work, None, n + 100).await?;
    let mut load = cce_load(gw.tracker, n, args.batch_fixes, rate);
    // Connect the fleet over a few seconds, not all at once.
    let ramp_s = (n as f64 / 2000.0).max(1.0);
    load.truncate(load.len() - 2);
    load.extend([
        "--ramp-s".into(),
        format!("{ramp_s:.1}"),
        "--duration-s".into(),
        (args.latency_s + ramp_s).to_string(),
    ]);
    let r = run_loadgen(&load, &work.join("latency.json")).await;
    gw.stop().await;
    r
}

async fn idle_memory(
    n: usize,
    tls: bool,
    fd_hard: u64,
    redis_url: &str,
    work: &Path,
) -> Result<IdleMemory, String> {
    let skipped = |why: String| IdleMemory {
        connections: n,
        tls,
        open: 0,
        rss_before_bytes: 0,
        rss_after_bytes: 0,
        bytes_per_connection: 0.0,
        skipped: Some(why),
    };
    if (n as u64 + 64) > fd_hard {
        let why = format!(
            "{n} connections need {} descriptors in the gateway process; RLIMIT_NOFILE's hard \
             limit here is {fd_hard} and cannot be raised (no CAP_SYS_RESOURCE)",
            n + 64
        );
        eprintln!(
            "  {n} idle{}: skipped: {why}",
            if tls { " TLS" } else { "" }
        );
        return Ok(skipped(why));
    }
    let certs = if tls {
        Some(procs::self_signed(work)?)
    } else {
        None
    };
    let gw = GatewayProc::start(redis_url, work, certs.clone(), n + 100).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = gw.rss_bytes().unwrap_or(0);
    let mut load: Vec<String> = vec![
        "--target".into(),
        gw.tracker.to_string(),
        "--devices".into(),
        n.to_string(),
        "--idle".into(),
        "--ramp-s".into(),
        format!("{:.1}", (n as f64 / 2000.0).max(1.0)),
        "--duration-s".into(),
        "600".into(),
    ];
    if let Some((cert, _)) = &certs {
        load.extend(["--tls-ca".into(), cert.display().to_string()]);
    }
    let report = work.join("idle.json");
    let mut child = spawn_loadgen(&load, &report)?;
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut open = 0.0;
    while Instant::now() < deadline {
        open = gw.metric(m::CONNECTIONS_OPEN).await.unwrap_or(0.0);
        if open as usize >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Let the first reports be written and buffers settle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = gw.rss_bytes().unwrap_or(0);
    let _ = child.kill().await;
    gw.stop().await;
    let per = after.saturating_sub(before) as f64 / open.max(1.0);
    eprintln!(
        "  {n} idle{}: {open:.0} open, RSS {} → {} KiB: {:.0} B per connection",
        if tls { " TLS" } else { "" },
        before / 1024,
        after / 1024,
        per
    );
    Ok(IdleMemory {
        connections: n,
        tls,
        open: open as u64,
        rss_before_bytes: before,
        rss_after_bytes: after,
        bytes_per_connection: per,
        skipped: None,
    })
}

/// Offered rate of the memory step, fixes/s: a load the two-core box carries with the
/// gateway, Redis and the load generator on it, so CPU per fix is not that of a backlog.
const MEMORY_RATE: f64 = 20_000.0;

/// The memory step for every fleet, and the sizing table from the realistic one.
async fn redis_memory(
    report: &mut BenchReport,
    args: &BenchArgs,
    rate: f64,
    redis_url: &str,
    work: &Path,
    conn: &mut redis::aio::MultiplexedConnection,
) -> Result<(), String> {
    for fleet in MemoryFleet::ALL {
        say(&format!("Redis bytes per stored fix, {}", fleet.label()));
        let m = memory::measure(fleet, args.memory_fixes, rate, redis_url, work, conn).await?;
        report.redis_memory.push(m);
    }
    report.sizing = report
        .redis_memory
        .iter()
        .find(|m| m.fleet == MemoryFleet::AaaRealistic)
        .map(Sizing::from_realistic);
    Ok(())
}

/// Decode (scan + decode every frame) against a checksum-only pass over the same bytes:
/// AAA reports and 16-fix CCE batches of the simulated fleet, in the mix of a device
/// that is mostly in coverage.
fn decode_speed() -> DecodeSpeed {
    let fixes = sample_fixes(3, 4096);
    let mut stream = Vec::new();
    let mut payload = Vec::new();
    let mut frames = 0;
    for (i, f) in fixes.iter().enumerate() {
        payload.clear();
        let imei = format!("{:015}", 350_000_000_000_000u64 + (i % 100) as u64);
        let ok = if i % 8 == 0 && i + 16 <= fixes.len() {
            encode::cce_payload(&fixes[i..i + 16], 0, &mut payload).is_ok()
                && encode::frame(
                    Direction::DeviceToServer,
                    b'C',
                    &imei,
                    b"CCE",
                    &payload,
                    &mut stream,
                )
                .is_ok()
        } else {
            encode::aaa_payload(f, &mut payload).is_ok()
                && encode::frame(
                    Direction::DeviceToServer,
                    b'A',
                    &imei,
                    b"AAA",
                    &payload,
                    &mut stream,
                )
                .is_ok()
        };
        frames += usize::from(ok);
    }
    let framer = Framer::new(Direction::DeviceToServer, 4096);
    let time = |f: &dyn Fn() -> usize| {
        // Best of five runs of ≥ 200 ms each.
        (0..5)
            .map(|_| {
                let t = Instant::now();
                let mut passes = 0u32;
                while t.elapsed() < Duration::from_millis(200) {
                    std::hint::black_box(f());
                    passes += 1;
                }
                t.elapsed().as_secs_f64() / f64::from(passes)
            })
            .fold(f64::INFINITY, f64::min)
    };
    let sum = time(&|| usize::from(checksum(std::hint::black_box(&stream))));
    let dec = time(&|| {
        let mut buf = std::hint::black_box(stream.as_slice());
        let mut n = 0;
        while let Scan::Frame(f) = framer.scan(buf) {
            n += decode(&f).map_or(0, |m| m.fixes.len());
            buf = buf.get(f.len()..).unwrap_or_default();
        }
        n
    });
    DecodeSpeed {
        bytes: stream.len(),
        frames,
        checksum_bytes_per_s: stream.len() as f64 / sum,
        decode_bytes_per_s: stream.len() as f64 / dec,
        decode_frames_per_s: frames as f64 / dec,
        ratio: sum / dec,
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn notes(r: &BenchReport, args: &BenchArgs) -> Vec<String> {
    let mut n = Vec::new();
    if !args.memory_only {
        n.push(
            "Gateway, load generator and redis-server share this machine's cores; the load \
             generator's own CPU is taken from the gateway's budget, so the ratio to the ceiling \
             is a lower bound for a gateway on its own box."
                .to_string(),
        );
        if r.ratio_to_ceiling < 0.6 {
            n.push(format!(
                "Ratio to the pipelined XADD ceiling is {:.2}, under the 0.6 goal.",
                r.ratio_to_ceiling
            ));
        }
    }
    for m in r.redis_memory.iter().filter(|m| m.bytes_per_fix > 48.0) {
        n.push(format!(
            "Redis memory per fix of the {} is {:.0} B, over the 48 B goal.",
            m.fleet.label(),
            m.bytes_per_fix
        ));
    }
    n
}

fn summary(r: &BenchReport, args: &BenchArgs) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(s, "# trackgate bench, {}", r.started_at);
    let _ = writeln!(
        s,
        "\nMachine: {} CPUs ({}), {:.0} GiB, Linux {}, Redis {}, fd hard limit {}; \
         load average {} at the start, {} at the end.{}{}\n",
        m.cpus,
        m.cpu_model,
        m.mem_total_gib,
        m.kernel,
        m.redis_version,
        m.fd_hard_limit,
        m.loadavg_start,
        m.loadavg_end,
        if args.quick {
            " **Quick run: not for sizing.**"
        } else {
            ""
        },
        if args.memory_only {
            " Memory step only (`--memory-only`): no ceiling, ramp, latency or idle runs."
        } else {
            ""
        }
    );
    s.push_str(&summary_table(r, args));
    if !r.ramp.is_empty() {
        s.push_str(&ramp_section(r));
    }
    if !r.redis_memory.is_empty() {
        s.push_str(&memory::summary_section(&r.redis_memory));
    }
    if let Some(sizing) = &r.sizing {
        let idle_kib = r
            .idle
            .iter()
            .find(|i| !i.tls && i.skipped.is_none())
            .map(|i| i.bytes_per_connection / 1024.0);
        s.push_str(&sizing::summary_section(sizing, &r.redis_memory, idle_kib));
    }
    if !r.notes.is_empty() {
        let _ = writeln!(s, "\n## Notes\n");
    }
    for n in &r.notes {
        let _ = writeln!(s, "- {n}");
    }
    if !args.memory_only {
        let _ = writeln!(
            s,
            "\nPlots: `ramp.svg`, `throughput.svg`, `latency.svg`, `latency-cdf.svg` (the load \
             generator's reports behind them: `ramp-best-load.json`, `latency-load.json`).\n\n\
             ![ramp](ramp.svg)\n\n![throughput](throughput.svg)\n\n![latency](latency.svg)\n\n![cdf](latency-cdf.svg)"
        );
    }
    s
}

/// The headline table: one row per measure.
fn summary_table(r: &BenchReport, args: &BenchArgs) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| Measure | Result | Baseline (same run) | Ratio | Goal |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    let c = &r.ceiling;
    if !args.memory_only {
        let _ = writeln!(
            s,
            "| Highest sustained rate (p99 ACK < {:.0} ms) | {:.0} fixes/s | XADD -P 64: {:.0}/s | {:.2} | ≥ 0.6 |",
            args.p99_limit_ms,
            r.max_sustained_fixes_per_s,
            c.xadd_pipelined_per_s,
            r.ratio_to_ceiling
        );
        let _ = writeln!(
            s,
            "| (same) | | XADD unpipelined: {:.0}/s | {:.2} | |",
            c.xadd_unpipelined_per_s, r.ratio_to_unpipelined
        );
    }
    if let Some(l) = &r.latency_run {
        let _ = writeln!(
            s,
            "| ACK latency, {} connections at {:.0} fixes/s | p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms | | | |",
            l.connections, l.offered_fixes_per_s, l.p50_ms, l.p99_ms, l.p999_ms
        );
    }
    for i in &r.idle {
        let what = format!(
            "RSS per idle {} connection, {}",
            if i.tls { "TLS" } else { "TCP" },
            i.connections
        );
        match &i.skipped {
            Some(why) => {
                let _ = writeln!(s, "| {what} | not measured: {why} | | | |");
            }
            None => {
                let _ = writeln!(
                    s,
                    "| {what} | {:.2} KiB | | | {} |",
                    i.bytes_per_connection / 1024.0,
                    if i.tls { "" } else { "≤ 8 KiB" }
                );
            }
        }
    }
    for mem in &r.redis_memory {
        let baseline = if c.value_bytes > 0 {
            format!("value alone: {} B", c.value_bytes)
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "| Redis memory per stored fix, sealed, {} ({} fixes, {} devices) | {:.1} B (live tail {:.1} B) | {baseline} | | ≤ 48 B |",
            mem.fleet.label(),
            sizing::group(mem.fixes_stored),
            sizing::group(mem.devices),
            mem.bytes_per_fix,
            mem.tail_bytes_per_fix
        );
    }
    let d = &r.decode;
    let _ = writeln!(
        s,
        "| Decode (scan + decode), {} frames | {:.0} MiB/s, {:.0} frames/s | checksum only: {:.0} MiB/s | {:.3} | |",
        d.frames,
        d.decode_bytes_per_s / 1048576.0,
        d.decode_frames_per_s,
        d.checksum_bytes_per_s / 1048576.0,
        d.ratio
    );
    s
}

fn ramp_section(r: &BenchReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## Ramp\n\nRate and latency of each step after its first {:.0} s (connections opening).\n\n| Offered fixes/s | Confirmed fixes/s | p50 ms | p99 ms | |",
        ramp::WARMUP_S
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    for st in &r.ramp {
        let _ = writeln!(
            s,
            "| {:.0} | {:.0} | {:.1} | {:.1} | {} |",
            st.offered_fixes_per_s,
            st.acked_fixes_per_s,
            st.p50_ms,
            st.p99_ms,
            if st.passed { "pass" } else { "fail" }
        );
    }
    s
}
