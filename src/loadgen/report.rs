//! The record of a load run: what was offered, what came back, and how it went over
//! time. Written as JSON by `trackgate loadgen --report-json` and read back by
//! `trackgate bench`, which runs the load generator as its own process.

use serde::{Deserialize, Serialize};

use super::stats::{Counters, Latency};

/// One sampling interval (normally one second).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    /// Seconds since the run started (end of the interval).
    pub t_s: f64,
    pub connected: u64,
    pub fixes_sent_per_s: f64,
    pub fixes_acked_per_s: f64,
    pub frames_per_s: f64,
    /// ACK latency of the batches confirmed in this interval.
    pub ack_count: u64,
    pub ack_p50_ms: f64,
    pub ack_p99_ms: f64,
}

/// What a run was asked to do.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Offered {
    pub devices: u64,
    pub report_interval_s: f64,
    pub cce_share: f64,
    pub batch_fixes: u64,
    pub tls: bool,
    pub idle: bool,
    /// One AAA report per send (`--aaa-only`).
    #[serde(default)]
    pub aaa_only: bool,
    /// Simulated report interval of realistic devices (`--sim-interval-s`).
    #[serde(default)]
    pub sim_interval_s: Option<f64>,
    /// Fixes per second the schedule offers (devices / interval × mean fixes per send).
    pub fixes_per_s: f64,
}

/// A whole run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LoadReport {
    pub offered: Offered,
    pub duration_s: f64,
    pub totals: Counters,
    pub latency: Latency,
    /// Latency of the batches due after the first `warmup_s` seconds (connections
    /// opening); the same as `latency` without a warm-up.
    #[serde(default)]
    pub latency_steady: Latency,
    #[serde(default)]
    pub warmup_s: f64,
    pub timeline: Vec<Sample>,
    /// (percentile, ms) points of the whole run's ACK latency distribution.
    pub latency_cdf: Vec<(f64, f64)>,
}

impl Offered {
    /// Mean fixes per second the schedule offers.
    pub fn rate(devices: usize, interval_s: f64, cce_share: f64, batch_fixes: usize) -> f64 {
        let share = cce_share.clamp(0.0, 1.0);
        let per_send = (1.0 - share) + share * batch_fixes.max(1) as f64;
        devices as f64 / interval_s.max(1e-6) * per_send
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offered_rate_counts_batches() {
        assert_eq!(Offered::rate(1000, 10.0, 0.0, 10), 100.0);
        assert_eq!(Offered::rate(1000, 10.0, 1.0, 10), 1000.0);
        assert_eq!(Offered::rate(100, 1.0, 0.5, 3), 200.0);
    }

    #[test]
    fn a_report_reads_back() -> Result<(), serde_json::Error> {
        let r = LoadReport {
            duration_s: 3.5,
            timeline: vec![Sample {
                t_s: 1.0,
                ack_p99_ms: 2.5,
                ..Sample::default()
            }],
            latency_cdf: vec![(50.0, 1.0), (99.0, 2.0)],
            ..LoadReport::default()
        };
        let back: LoadReport = serde_json::from_str(&serde_json::to_string(&r)?)?;
        assert_eq!(back, r);
        Ok(())
    }
}
