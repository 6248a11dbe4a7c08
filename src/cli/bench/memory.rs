//! The Redis memory step of `trackgate bench`: bytes per stored fix in the live tail and
//! at steady state (sealed into history chunks), by chunk column, for each simulated
//! fleet, and the CPU time the gateway and Redis spend storing and sealing those fixes.
//!
//! Two fleets of 1,000 devices: the load generator's default (CCE batches of 16, readings
//! drawn afresh on every fix, wall-clock times: what the other steps run) and a realistic
//! one (one AAA report per fix, readings that change slowly, fix times 30 s apart on a
//! simulated clock; see [`crate::loadgen::realistic`]). CPU time is read from
//! `/proc/<pid>/stat` for the gateway process and from `INFO cpu` for Redis. Sealing runs
//! in this process (`compact::seal_everything`), so this process's CPU time is the
//! gateway's share of it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::procs::{GatewayProc, cpu_seconds, redis_cpu_seconds, redis_info, run_loadgen};
use crate::config::{Config, StorageConfig};
use crate::loadgen::report::LoadReport;
use crate::metrics as m;

/// Devices of every memory run.
const DEVICES: usize = 1000;
/// Fixes per CCE batch of the default fleet here (the most one frame holds).
const CCE_BATCH: usize = 16;

/// A simulated fleet whose storage is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum MemoryFleet {
    /// The load generator's default fleet, in CCE batches of 16.
    Cce,
    /// One AAA report per fix from devices that report like real ones, every 30 s.
    AaaRealistic,
}

impl MemoryFleet {
    /// Every fleet, in the order they are measured and reported.
    pub(crate) const ALL: [MemoryFleet; 2] = [MemoryFleet::Cce, MemoryFleet::AaaRealistic];

    /// Simulated report interval of the realistic fleet, seconds.
    pub(crate) const REALISTIC_INTERVAL_S: u64 = 30;

    /// Short name, for table headings.
    pub(crate) fn name(self) -> &'static str {
        match self {
            MemoryFleet::Cce => "bench fleet (CCE)",
            MemoryFleet::AaaRealistic => "realistic fleet (AAA, 30 s)",
        }
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            MemoryFleet::Cce => "bench fleet: CCE batches of 16, readings drawn per fix",
            MemoryFleet::AaaRealistic => "realistic fleet: one AAA report per fix, every 30 s",
        }
    }

    /// Load generator arguments: `fixes` fixes at `rate` fixes/s in all.
    fn load(self, target: SocketAddr, rate: f64, fixes: u64) -> Vec<String> {
        match self {
            MemoryFleet::Cce => {
                let mut load = super::cce_load(target, DEVICES, CCE_BATCH, rate);
                load.extend([
                    "--max-frames".into(),
                    fixes.div_ceil(CCE_BATCH as u64).to_string(),
                ]);
                load
            }
            MemoryFleet::AaaRealistic => {
                let interval_s = DEVICES as f64 / rate.max(1.0);
                vec![
                    "--target".into(),
                    target.to_string(),
                    "--devices".into(),
                    DEVICES.to_string(),
                    "--interval-s".into(),
                    format!("{interval_s:.6}"),
                    "--aaa-only".into(),
                    "--sim-interval-s".into(),
                    Self::REALISTIC_INTERVAL_S.to_string(),
                    "--max-frames".into(),
                    fixes.to_string(),
                    "--ramp-s".into(),
                    format!("{:.3}", interval_s.min(2.0)),
                ]
            }
        }
    }

    /// The realistic fleet's history is sent within a minute although its fix times reach
    /// back hours: the gateway would index those fixes as late deliveries (a real device
    /// reporting live never is one, and sealing empties the index anyway). So the late
    /// threshold (`retention.sweep_interval_s`) is raised above the simulated span.
    fn configure(self, config: &mut Config, fixes: u64) {
        if self == MemoryFleet::AaaRealistic {
            let span_s = fixes.div_ceil(DEVICES as u64) * Self::REALISTIC_INTERVAL_S;
            let r = &mut config.retention;
            r.sweep_interval_s = r.sweep_interval_s.max(span_s + 3600);
        }
    }
}

/// CPU time spent on a number of fixes, by the gateway and by Redis.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub(crate) struct CpuCost {
    pub fixes: u64,
    pub wall_s: f64,
    pub gateway_cpu_s: f64,
    pub redis_cpu_s: f64,
}

impl CpuCost {
    pub(crate) fn gateway_ms_per_1000(&self) -> f64 {
        self.gateway_cpu_s * 1e6 / self.fixes.max(1) as f64
    }

    pub(crate) fn redis_ms_per_1000(&self) -> f64 {
        self.redis_cpu_s * 1e6 / self.fixes.max(1) as f64
    }
}

/// CPU readings at the start of a phase.
struct Meter {
    gateway_pid: u32,
    at: Instant,
    gateway_s: f64,
    redis_s: f64,
}

impl Meter {
    async fn start(gateway_pid: u32, conn: &mut redis::aio::MultiplexedConnection) -> Meter {
        Meter {
            gateway_pid,
            at: Instant::now(),
            gateway_s: cpu_seconds(gateway_pid).unwrap_or(0.0),
            redis_s: redis_cpu_seconds(conn).await,
        }
    }

    async fn stop(self, conn: &mut redis::aio::MultiplexedConnection, fixes: u64) -> CpuCost {
        CpuCost {
            fixes,
            wall_s: self.at.elapsed().as_secs_f64(),
            gateway_cpu_s: cpu_seconds(self.gateway_pid).unwrap_or(0.0) - self.gateway_s,
            redis_cpu_s: redis_cpu_seconds(conn).await - self.redis_s,
        }
    }
}

/// What one fleet's fixes cost Redis.
#[derive(Debug, Serialize)]
pub(crate) struct RedisMemory {
    pub fleet: MemoryFleet,
    /// Rate the load generator offered while storing, fixes/s.
    pub offered_fixes_per_s: f64,
    pub fixes_stored: u64,
    pub devices: u64,
    pub used_memory_delta_bytes: f64,
    /// At steady state: after compaction sealed the tail into history chunks.
    pub bytes_per_fix: f64,
    /// Before compaction, every fix a live-tail stream entry.
    pub tail_bytes_per_fix: f64,
    /// Fixes compaction sealed, and how long that took (one pass, in-process).
    pub sealed_fixes: u64,
    pub seal_seconds: f64,
    /// Chunk bytes per sealed fix by column, largest first.
    pub column_bytes_per_fix: Vec<(String, f64)>,
    /// Storing the fixes: the gateway process and Redis, from the first connection until
    /// the gateway has written the last fix.
    pub ingest: CpuCost,
    /// Sealing them all at once: this process (the gateway's work) and Redis.
    pub seal: CpuCost,
    /// Steady-state compaction passes: one compaction interval's reports per device (10 at
    /// 30 s and the default 300 s interval) arrive, and a pass runs, as in a running
    /// gateway every interval; its cost is per fix that arrived. Realistic fleet only.
    pub steady_pass: Option<SteadyPass>,
}

/// Compaction passes of a gateway that has been running for a while.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct SteadyPass {
    pub cost: CpuCost,
    /// Rows of each device's newest chunk before the passes, on average (for the
    /// summary: chunks sealed whole hold `chunk_max_fixes`).
    pub newest_chunk_rows: f64,
}

/// Measure `fleet`: store `fixes` at `rate` fixes/s, read the tail, seal, read again.
pub(crate) async fn measure(
    fleet: MemoryFleet,
    fixes: u64,
    rate: f64,
    redis_url: &str,
    work: &Path,
    conn: &mut redis::aio::MultiplexedConnection,
) -> Result<RedisMemory, String> {
    super::flush(conn).await?;
    let before = redis_info(conn, "used_memory").await.unwrap_or(0.0);
    let (load, ingest) = store(fleet, fixes, rate, redis_url, work, conn).await?;
    let tail_stored = super::super::count_stored_fixes(conn)
        .await
        .map_err(|e| e.to_string())?;
    let tail_delta = redis_info(conn, "used_memory").await.unwrap_or(0.0) - before;
    let seal = seal(redis_url, work, conn, Sealing::Everything).await?;
    let stored = super::super::count_stored_fixes(conn)
        .await
        .map_err(|e| e.to_string())?;
    let delta = redis_info(conn, "used_memory").await.unwrap_or(0.0) - before;
    let column_bytes_per_fix: Vec<(String, f64)> =
        super::super::chunk_column_bytes(conn, &work.join("keys.json"))
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|(name, n)| (name, n as f64 / stored.max(1) as f64))
            .collect();
    let top: Vec<String> = column_bytes_per_fix
        .iter()
        .take(8)
        .map(|(n, b)| format!("{n} {b:.2}"))
        .collect();
    eprintln!("  {}", fleet.label());
    eprintln!("  chunk bytes per fix by column: {}", top.join(", "));
    eprintln!(
        "  {stored} fixes stored ({} sent): tail {:.1} B per fix; sealed ({} in {:.1} s) {:.1} MiB, {:.1} B per fix",
        load.totals.fixes_sent,
        tail_delta / tail_stored.max(1) as f64,
        seal.fixes,
        seal.wall_s,
        delta / 1024.0 / 1024.0,
        delta / stored.max(1) as f64
    );
    let steady_pass = match fleet {
        MemoryFleet::AaaRealistic => Some(steady_pass(fleet, rate, redis_url, work, conn).await?),
        MemoryFleet::Cce => None,
    };
    print_cpu(&ingest, &seal, steady_pass.as_ref().map(|p| &p.cost));
    Ok(RedisMemory {
        fleet,
        offered_fixes_per_s: rate,
        fixes_stored: stored,
        devices: DEVICES as u64,
        used_memory_delta_bytes: delta,
        bytes_per_fix: delta / stored.max(1) as f64,
        tail_bytes_per_fix: tail_delta / tail_stored.max(1) as f64,
        sealed_fixes: seal.fixes,
        seal_seconds: seal.wall_s,
        column_bytes_per_fix,
        ingest,
        seal,
        steady_pass,
    })
}

fn print_cpu(ingest: &CpuCost, seal: &CpuCost, steady: Option<&CpuCost>) {
    let mut phases = vec![("store", ingest), ("seal all", seal)];
    phases.extend(steady.map(|s| ("steady pass", s)));
    let text: Vec<String> = phases
        .iter()
        .map(|(what, c)| {
            format!(
                "{what} {:.2}/{:.2}",
                c.gateway_ms_per_1000(),
                c.redis_ms_per_1000()
            )
        })
        .collect();
    eprintln!(
        "  CPU ms per 1,000 fixes, gateway/Redis: {}",
        text.join(", ")
    );
}

/// Run a gateway and the fleet until `fixes` are stored; the CPU time that took.
async fn store(
    fleet: MemoryFleet,
    fixes: u64,
    rate: f64,
    redis_url: &str,
    work: &Path,
    conn: &mut redis::aio::MultiplexedConnection,
) -> Result<(LoadReport, CpuCost), String> {
    let gw = GatewayProc::start_with(redis_url, work, None, DEVICES + 100, |c| {
        fleet.configure(c, fixes)
    })
    .await?;
    let meter = Meter::start(gw.pid().unwrap_or(0), conn).await;
    let load = run_loadgen(
        &fleet.load(gw.tracker, rate, fixes),
        &work.join("memory.json"),
    )
    .await;
    let load = match load {
        Ok(l) => l,
        Err(e) => {
            gw.stop().await;
            return Err(e);
        }
    };
    drained(&gw, load.totals.fixes_sent).await;
    let cost = meter.stop(conn, load.totals.fixes_sent).await;
    gw.stop().await;
    Ok((load, cost))
}

/// Wait until the gateway has written `sent` fixes (AAA reports are not confirmed to the
/// device, so the load generator can finish before they are stored), or until its count
/// has stood still for 2 s.
async fn drained(gw: &GatewayProc, sent: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = (-1.0, Instant::now());
    while Instant::now() < deadline {
        let written = gw.metric(m::FIXES_WRITTEN).await.unwrap_or(0.0);
        if written >= sent as f64 {
            return;
        }
        if written > last.0 {
            last = (written, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(2) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How much of the tail one [`seal`] call seals.
#[derive(Debug, Clone, Copy)]
enum Sealing {
    /// Passes until none seals anything (a pass takes at most `compact_pass_max_fixes`).
    Everything,
    /// One pass, as a running gateway makes every `compact_interval_s` (each pass scans
    /// every device, so the empty pass that ends `Everything` would count twice).
    OnePass,
}

/// Seal the tail in this process with the gateway's compaction code, whatever its age.
async fn seal(
    redis_url: &str,
    work: &Path,
    conn: &mut redis::aio::MultiplexedConnection,
    how: Sealing,
) -> Result<CpuCost, String> {
    // The gateway's key file ([`GatewayProc`]): chunks are sealed with its data keys.
    let vault = crate::pseudonym::KeyRing::load(&work.join("keys.json"))
        .map_err(|e| e.to_string())?
        .vault()
        .clone();
    let store = crate::redis_conn::connect(&crate::config::RedisConfig {
        url: redis_url.to_string(),
        response_timeout_ms: 120_000,
        ..crate::config::RedisConfig::default()
    })
    .map_err(|e| e.to_string())?;
    let storage = StorageConfig::default();
    let meter = Meter::start(std::process::id(), conn).await;
    let sealed = match how {
        Sealing::Everything => crate::compact::seal_everything(&store, &storage, vault).await,
        Sealing::OnePass => {
            let pass = crate::compact::Compaction {
                after: Duration::ZERO,
                ..crate::compact::Compaction::new(&storage, vault)
            };
            crate::compact::compact_once(&store, &pass).await
        }
    }
    .map_err(|e| e.to_string())?;
    Ok(meter.stop(conn, sealed).await)
}

/// One compaction interval's reports per device on top of what is sealed, then sealed:
/// the cost of compaction in a gateway that has been running for a while.
async fn steady_pass(
    fleet: MemoryFleet,
    rate: f64,
    redis_url: &str,
    work: &Path,
    conn: &mut redis::aio::MultiplexedConnection,
) -> Result<SteadyPass, String> {
    let newest_chunk_rows = newest_chunk_rows(conn).await.map_err(|e| e.to_string())?;
    let per_device = StorageConfig::default()
        .compact_interval_s
        .div_ceil(MemoryFleet::REALISTIC_INTERVAL_S);
    let mut cost = CpuCost::default();
    // A pass takes well under a second: a few of them, so that one stall of a busy box
    // does not make the figure.
    for _ in 0..STEADY_PASSES {
        let (_, _) = store(
            fleet,
            per_device * DEVICES as u64,
            rate,
            redis_url,
            work,
            conn,
        )
        .await?;
        let pass = seal(redis_url, work, conn, Sealing::OnePass).await?;
        // A device is sealed once its due fixes fill a chunk (or have waited
        // `seal_max_wait_s`): these passes mostly look and wait, and what they cost is
        // spread over the fixes that arrived meanwhile (sealing them, later, is the
        // `seal` cost per fix).
        cost = CpuCost {
            fixes: cost.fixes + per_device * DEVICES as u64,
            wall_s: cost.wall_s + pass.wall_s,
            gateway_cpu_s: cost.gateway_cpu_s + pass.gateway_cpu_s,
            redis_cpu_s: cost.redis_cpu_s + pass.redis_cpu_s,
        };
    }
    Ok(SteadyPass {
        cost,
        newest_chunk_rows,
    })
}

/// Steady compaction passes measured (their costs are added up).
pub(crate) const STEADY_PASSES: usize = 3;

/// Mean row count of every device's newest history chunk.
async fn newest_chunk_rows(
    conn: &mut redis::aio::MultiplexedConnection,
) -> redis::RedisResult<f64> {
    use crate::store::{HIST_PATTERN, chunk, scan_keys};
    let (mut rows, mut devices) = (0usize, 0usize);
    let mut cursor = 0u64;
    loop {
        let (next, keys) = scan_keys(conn, cursor, HIST_PATTERN, "zset").await?;
        for k in keys {
            let newest: Vec<Vec<u8>> = redis::cmd("ZRANGE")
                .arg(&k)
                .arg(-1)
                .arg(-1)
                .query_async(conn)
                .await?;
            if let Some(h) = newest.first().and_then(|c| chunk::header(c).ok()) {
                rows += h.count;
                devices += 1;
            }
        }
        if next == 0 {
            return Ok(rows as f64 / devices.max(1) as f64);
        }
        cursor = next;
    }
}

/// The summary's section on memory per fix: both fleets, by column, and the CPU time.
pub(crate) fn summary_section(ms: &[RedisMemory]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## Redis memory per fix\n\n\
         Each fleet: {} devices storing through a gateway process; Redis `used_memory` \
         growth over the fixes stored, first with every fix a live-tail stream entry, then \
         after `compact::seal_everything` sealed them all into history chunks. Sealed is the \
         steady state: a running gateway seals every fix received more than \
         `storage.compact_after_s` (15 min) ago.\n\n\
         | Fleet | Fixes stored | Offered fixes/s | Live tail B/fix | Sealed B/fix | Sealing all took |\n\
         |---|---|---|---|---|---|",
        super::sizing::group(DEVICES as u64)
    );
    for m in ms {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.1} | **{:.1}** | {:.1} s |",
            m.fleet.label(),
            super::sizing::group(m.fixes_stored),
            super::sizing::group(m.offered_fixes_per_s.round() as u64),
            m.tail_bytes_per_fix,
            m.bytes_per_fix,
            m.seal_seconds
        );
    }
    s.push_str(&columns_table(ms));
    s.push_str(&cpu_table(ms));
    s
}

/// Sealed bytes per fix by chunk column, one column of the table per fleet.
fn columns_table(ms: &[RedisMemory]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n### Sealed bytes per fix by chunk column\n\n\
         Each chunk decoded and encoded again one column at a time; what the columns do not \
         account for is Redis's own overhead (sorted-set entries, keys, allocator rounding). \
         `recv_ms`, the gateway's receive time, follows this bench's schedule, not a field \
         fleet's: the realistic fleet's reports of one device arrive {:.3} s apart here (its \
         {} devices at the offered rate), not 30 s.\n",
        ms.iter()
            .find(|m| m.fleet == MemoryFleet::AaaRealistic)
            .map_or(0.0, |m| DEVICES as f64 / m.offered_fixes_per_s.max(1.0)),
        super::sizing::group(DEVICES as u64)
    );
    let head: Vec<&str> = ms.iter().map(|m| m.fleet.name()).collect();
    let _ = writeln!(s, "| Column | {} |", head.join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(ms.len()));
    let mut names: Vec<(&str, f64)> = Vec::new();
    for (name, b) in ms.iter().flat_map(|m| &m.column_bytes_per_fix) {
        match names.iter_mut().find(|(n, _)| n == name) {
            Some(e) => e.1 = e.1.max(*b),
            None => names.push((name, *b)),
        }
    }
    names.sort_by(|a, b| b.1.total_cmp(&a.1));
    let of = |m: &RedisMemory, name: &str| {
        m.column_bytes_per_fix
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0.0, |(_, b)| *b)
    };
    // Columns a fleet never fills cost their presence byte per chunk: summed as one row.
    let (shown, rest): (Vec<_>, Vec<_>) = names.iter().partition(|(_, b)| *b >= 0.05);
    for (name, _) in &shown {
        let cells: Vec<String> = ms.iter().map(|m| format!("{:.2}", of(m, name))).collect();
        let _ = writeln!(s, "| {name} | {} |", cells.join(" | "));
    }
    if !rest.is_empty() {
        let cells: Vec<String> = ms
            .iter()
            .map(|m| format!("{:.2}", rest.iter().map(|(n, _)| of(m, n)).sum::<f64>()))
            .collect();
        let _ = writeln!(
            s,
            "| {} other columns (under 0.05 B each) | {} |",
            rest.len(),
            cells.join(" | ")
        );
    }
    let sums: Vec<f64> = ms
        .iter()
        .map(|m| m.column_bytes_per_fix.iter().map(|(_, b)| b).sum())
        .collect();
    let cells: Vec<String> = sums.iter().map(|b| format!("**{b:.2}**")).collect();
    let _ = writeln!(s, "| all columns | {} |", cells.join(" | "));
    let cells: Vec<String> = ms
        .iter()
        .zip(&sums)
        .map(|(m, b)| format!("{:.2}", m.bytes_per_fix - b))
        .collect();
    let _ = writeln!(s, "| Redis overhead | {} |", cells.join(" | "));
    s
}

/// CPU time per 1,000 fixes of each phase.
fn cpu_table(ms: &[RedisMemory]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n### CPU per 1,000 fixes\n\n\
         Gateway: the `trackgate serve` process while it stores (`/proc/<pid>/stat` utime + \
         stime, from the first connection until it has written the last fix); while sealing, \
         this process, which runs the gateway's compaction code in-process. Redis: `INFO cpu` \
         (`used_cpu_user` + `used_cpu_sys`) over the same time.\n\n\
         | Fleet | Phase | Fixes | Wall s | Gateway ms | Redis ms |\n\
         |---|---|---|---|---|---|"
    );
    for m in ms {
        let steady = m.steady_pass.map(|p| {
            (
                format!(
                    "steady compaction passes ({STEADY_PASSES} in all): one interval's reports \
                     per device arrive, then a pass looks at every device (sealing one only \
                     once a chunk is due; newest chunks of {:.0} rows on average), per fix \
                     that arrived",
                    p.newest_chunk_rows
                ),
                p.cost,
            )
        });
        let mut phases = vec![("store", &m.ingest), ("seal all at once", &m.seal)];
        if let Some((what, cost)) = &steady {
            phases.push((what, cost));
        }
        for (phase, c) in phases {
            let _ = writeln!(
                s,
                "| {} | {phase} | {} | {:.1} | {:.2} | {:.2} |",
                m.fleet.name(),
                super::sizing::group(c.fixes),
                c.wall_s,
                c.gateway_ms_per_1000(),
                c.redis_ms_per_1000()
            );
        }
    }
    s
}
