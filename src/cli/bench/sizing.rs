//! What one run's figures mean for a deployment: Redis memory for a fleet's retained
//! history, and devices per gateway core and per Redis core. Nothing here is measured;
//! every figure is computed from the realistic fleet's memory step
//! ([`super::memory::RedisMemory`]), and the summary says which.

use serde::Serialize;

use super::memory::{CpuCost, RedisMemory, STEADY_PASSES};
use crate::config::{DEFAULT_TTL_S, StorageConfig};

/// Devices one memory row is for.
pub(crate) const FLEET_DEVICES: u64 = 10_000;
/// Report intervals of the memory rows, seconds.
pub(crate) const INTERVALS_S: [u64; 3] = [10, 30, 60];
/// Report interval the per-core figures are for, seconds.
pub(crate) const CORE_INTERVAL_S: u64 = 30;

/// Redis memory for [`FLEET_DEVICES`] devices over the default retention at one interval.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MemoryRow {
    pub interval_s: u64,
    pub fixes_per_device: u64,
    pub redis_gib: f64,
}

/// Devices one core keeps up with at [`CORE_INTERVAL_S`].
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CoreRow {
    /// CPU per 1,000 fixes: storing them plus compacting them.
    pub gateway_ms_per_1000: f64,
    pub redis_ms_per_1000: f64,
    /// Of which compaction (the steady-state pass if measured, else sealing all at once).
    pub gateway_compaction_ms_per_1000: f64,
    pub redis_compaction_ms_per_1000: f64,
    pub gateway_devices_per_core: f64,
    pub redis_devices_per_core: f64,
}

/// The sizing table of a run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Sizing {
    /// Sealed Redis bytes per fix every memory row uses.
    pub bytes_per_fix: f64,
    pub retention_days: u64,
    pub devices: u64,
    pub memory: Vec<MemoryRow>,
    /// The live tail's extra share at [`CORE_INTERVAL_S`]: the last
    /// `compact_after_s + compact_interval_s` of fixes are stream entries, not chunks.
    pub tail_share_at_30_s: f64,
    pub cores: CoreRow,
}

impl Sizing {
    /// The table for the realistic fleet's figures.
    pub(crate) fn from_realistic(m: &RedisMemory) -> Sizing {
        let memory = INTERVALS_S
            .iter()
            .map(|&interval_s| {
                let fixes_per_device = DEFAULT_TTL_S / interval_s;
                MemoryRow {
                    interval_s,
                    fixes_per_device,
                    redis_gib: (FLEET_DEVICES * fixes_per_device) as f64 * m.bytes_per_fix
                        / f64::from(1u32 << 30),
                }
            })
            .collect();
        let storage = StorageConfig::default();
        // The tail holds what is not due yet, and what is due but does not fill a chunk
        // yet: half a chunk on average.
        let tail_fixes = (storage.compact_after_s + storage.compact_interval_s) as f64
            / CORE_INTERVAL_S as f64
            + storage.chunk_max_fixes as f64 / 2.0;
        let history = (DEFAULT_TTL_S / CORE_INTERVAL_S) as f64 * m.bytes_per_fix;
        Sizing {
            bytes_per_fix: m.bytes_per_fix,
            retention_days: DEFAULT_TTL_S / 86_400,
            devices: FLEET_DEVICES,
            memory,
            tail_share_at_30_s: tail_fixes * (m.tail_bytes_per_fix - m.bytes_per_fix).max(0.0)
                / history.max(1.0),
            cores: cores(&m.ingest, &compaction_cost(m)),
        }
    }
}

/// Compaction's CPU per fix: sealing it once (measured sealing everything at once, per
/// fix sealed), plus the passes that look at the device meanwhile (per fix that arrived).
fn compaction_cost(m: &RedisMemory) -> CpuCost {
    let per_fix = |c: &CpuCost| {
        let n = c.fixes.max(1) as f64;
        (c.gateway_cpu_s / n, c.redis_cpu_s / n)
    };
    let (mut gateway, mut redis) = per_fix(&m.seal);
    if let Some(p) = &m.steady_pass {
        let (g, r) = per_fix(&p.cost);
        gateway += g;
        redis += r;
    }
    const FIXES: u64 = 1_000_000;
    CpuCost {
        fixes: FIXES,
        wall_s: 0.0,
        gateway_cpu_s: gateway * FIXES as f64,
        redis_cpu_s: redis * FIXES as f64,
    }
}

/// Devices per core from the CPU per fix of storing and of compacting.
fn cores(ingest: &CpuCost, compaction: &CpuCost) -> CoreRow {
    let gateway = ingest.gateway_ms_per_1000() + compaction.gateway_ms_per_1000();
    let redis = ingest.redis_ms_per_1000() + compaction.redis_ms_per_1000();
    // A device sends one fix per interval; a fix costs ms_per_1000 × 1e-6 CPU seconds.
    let per_core = |ms_per_1000: f64| CORE_INTERVAL_S as f64 / (ms_per_1000 * 1e-6).max(1e-12);
    CoreRow {
        gateway_ms_per_1000: gateway,
        redis_ms_per_1000: redis,
        gateway_compaction_ms_per_1000: compaction.gateway_ms_per_1000(),
        redis_compaction_ms_per_1000: compaction.redis_ms_per_1000(),
        gateway_devices_per_core: per_core(gateway),
        redis_devices_per_core: per_core(redis),
    }
}

/// The summary's sizing section, saying what each figure is derived from. `idle_kib`:
/// RSS per idle TCP connection, when this run measured it.
pub(crate) fn summary_section(z: &Sizing, ms: &[RedisMemory], idle_kib: Option<f64>) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let Some(m) = ms
        .iter()
        .find(|m| m.fleet == super::memory::MemoryFleet::AaaRealistic)
    else {
        return s;
    };
    let _ = writeln!(
        s,
        "\n## Sizing\n\nComputed from the figures of the {} above; nothing in this section \
         is measured on its own.\n",
        m.fleet.name()
    );
    let heads: Vec<String> = z
        .memory
        .iter()
        .map(|r| format!("{} s", r.interval_s))
        .collect();
    let _ = writeln!(
        s,
        "| Redis for {} devices, {} days, reporting every | {} |",
        group(z.devices),
        z.retention_days,
        heads.join(" | ")
    );
    let _ = writeln!(s, "|---|{}", "---|".repeat(z.memory.len()));
    let cells: Vec<String> = z.memory.iter().map(|r| group(r.fixes_per_device)).collect();
    let _ = writeln!(s, "| fixes per device | {} |", cells.join(" | "));
    let cells: Vec<String> = z
        .memory
        .iter()
        .map(|r| format!("**{:.1} GiB**", r.redis_gib))
        .collect();
    let _ = writeln!(s, "| Redis memory | {} |", cells.join(" | "));
    let _ = writeln!(
        s,
        "\nDerived: devices × ({} days ÷ interval) × {:.2} B, the realistic fleet's sealed bytes \
         per fix (`used_memory` growth over {} fixes, {} per device: the per-device keys are \
         spread over fewer fixes than in {} days, so this leans high). The live tail, the last \
         `compact_after_s` + `compact_interval_s` of fixes and half a chunk's worth waiting to \
         fill one, as stream entries at {:.1} B, adds {:.2} % at 30 s. Not included: Redis's baseline (a few MiB), replicas (each one the \
         same again), allocator fragmentation (`mem_fragmentation_ratio`), and headroom for an \
         AOF rewrite or a replica's full sync.\n",
        z.retention_days,
        z.bytes_per_fix,
        group(m.fixes_stored),
        group(m.fixes_stored / m.devices.max(1)),
        z.retention_days,
        m.tail_bytes_per_fix,
        z.tail_share_at_30_s * 100.0
    );
    let c = &z.cores;
    let compaction = if m.steady_pass.is_some() {
        "its sealing plus steady compaction passes"
    } else {
        "its sealing all at once"
    };
    let compaction_row = compaction.trim_start_matches("its ");
    let _ = writeln!(
        s,
        "| Reporting every {CORE_INTERVAL_S} s | Gateway | Redis |\n|---|---|---|\n\
         | CPU per 1,000 fixes: storing | {:.2} ms | {:.2} ms |\n\
         | … compacting ({compaction_row}) | {:.2} ms | {:.2} ms |\n\
         | … in all | {:.2} ms | {:.2} ms |\n\
         | **devices per core** | **{}** | **{}** |",
        c.gateway_ms_per_1000 - c.gateway_compaction_ms_per_1000,
        c.redis_ms_per_1000 - c.redis_compaction_ms_per_1000,
        c.gateway_compaction_ms_per_1000,
        c.redis_compaction_ms_per_1000,
        c.gateway_ms_per_1000,
        c.redis_ms_per_1000,
        group(c.gateway_devices_per_core.round() as u64),
        group(c.redis_devices_per_core.round() as u64),
    );
    let _ = writeln!(
        s,
        "\nDerived: {CORE_INTERVAL_S} s ÷ CPU seconds per fix (storing + compacting), from the \
         CPU table above: the realistic fleet stored at {} fixes/s offered over {} \
         connections, and {compaction}. A core fully busy is assumed; keep headroom for \
         bursts (devices reconnecting after an outage send their cached fixes at once). \
         Caveats: a real fleet sends the same rate over far more connections, each rarely, \
         so every frame costs its own wakeup and read and Redis pipelines carry fewer fixes: \
         treat these as upper bounds and check them at the real rate before buying hardware.\n",
        group(m.offered_fixes_per_s.round() as u64),
        group(m.devices),
    );
    if let Some(p) = &m.steady_pass {
        let _ = writeln!(
            s,
            "Compaction: a pass looks at every device (three cheap commands) and seals one \
             once its due fixes fill a chunk (`chunk_max_fixes`) or have waited \
             `seal_max_wait_s`, so each fix is read from the tail and encoded into a chunk \
             about once (the sealing cost per fix, measured sealing everything at once); \
             the passes in between cost their looking, spread over the fixes that arrive \
             meanwhile ({} passes measured; each device's newest chunk held {:.0} rows).\n",
            STEADY_PASSES, p.newest_chunk_rows
        );
    }
    match idle_kib {
        Some(kib) => {
            let _ = writeln!(
                s,
                "Memory may bind a gateway first: {kib:.1} KiB of RSS per idle TCP connection \
                 (this run) is {:.1} GiB per million devices.",
                kib * 1e6 / 1024.0 / 1024.0
            );
        }
        None => {
            let _ = writeln!(
                s,
                "Memory may bind a gateway first: see the full bench's RSS per idle \
                 connection (about 7 KiB: 6.7 GiB per million devices)."
            );
        }
    }
    s
}

/// `1234567` → `1,234,567`.
pub(crate) fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::memory::{MemoryFleet, SteadyPass};
    use super::*;

    fn cost(fixes: u64, gateway_cpu_s: f64, redis_cpu_s: f64) -> CpuCost {
        CpuCost {
            fixes,
            wall_s: 1.0,
            gateway_cpu_s,
            redis_cpu_s,
        }
    }

    #[test]
    fn memory_rows_are_devices_times_retained_fixes_times_bytes() {
        let m = RedisMemory {
            fleet: MemoryFleet::AaaRealistic,
            offered_fixes_per_s: 20_000.0,
            fixes_stored: 1_000_000,
            devices: 1000,
            used_memory_delta_bytes: 16e6,
            bytes_per_fix: 16.0,
            tail_bytes_per_fix: 64.0,
            sealed_fixes: 1_000_000,
            seal_seconds: 1.0,
            column_bytes_per_fix: Vec::new(),
            // 10 µs of gateway and 5 µs of Redis per stored fix.
            ingest: cost(1_000_000, 10.0, 5.0),
            seal: cost(1_000_000, 1.0, 1.0),
            // 2 and 5 µs per fix for compacting at steady state.
            steady_pass: Some(SteadyPass {
                cost: cost(2000, 0.004, 0.010),
                newest_chunk_rows: 200.0,
            }),
        };
        let s = Sizing::from_realistic(&m);
        // 30 s: 259,200 fixes per device × 10,000 devices × 16 B.
        let at_30 = &s.memory[1];
        assert_eq!((at_30.interval_s, at_30.fixes_per_device), (30, 259_200));
        let gib = 259_200.0 * 10_000.0 * 16.0 / 1024f64.powi(3);
        assert!((at_30.redis_gib - gib).abs() < 1e-9, "{}", at_30.redis_gib);
        assert!((s.memory[0].redis_gib - 3.0 * gib).abs() < 1e-6);
        // Gateway: 10 µs storing + 1 sealing + 2 looking = 13 µs per fix, one fix per
        // 30 s: 2.31 million devices per core; Redis: 5 + 1 + 5 = 11 µs, 2.73 million.
        assert!((s.cores.gateway_ms_per_1000 - 13.0).abs() < 1e-9);
        assert!((s.cores.gateway_devices_per_core - 30.0 / 13e-6).abs() < 1.0);
        assert!((s.cores.redis_devices_per_core - 30.0 / 11e-6).abs() < 1.0);
        // (900 + 300) s ÷ 30 s + 128 (half a chunk) = 168 tail fixes × 48 B extra over
        // 259,200 × 16 B.
        let share = 168.0 * 48.0 / (259_200.0 * 16.0);
        assert!((s.tail_share_at_30_s - share).abs() < 1e-12);
        let text = summary_section(&s, &[m], None);
        assert!(
            text.contains("| fixes per device | 777,600 | 259,200 | 129,600 |"),
            "{text}"
        );
        assert!(text.contains("**2,307,692** | **2,727,273**"), "{text}");
    }
}
