//! What a load run measured: counters, and ACK latency in HDR histograms.
//!
//! Latency is recorded in microseconds from the moment a batch was *scheduled* (not
//! sent) to its confirmation, so a gateway that stalls the sender shows up as latency
//! (no coordinated omission). Two histograms: one for the whole run, one for the current
//! sampling interval (taken and reset by whoever prints live figures).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency a histogram tracks; longer ones are clamped to it.
const MAX_TRACKED_US: u64 = 600_000_000;

/// Live counters, shared by every simulated device and whoever reports them.
#[derive(Debug)]
pub struct FleetStats {
    pub connected: AtomicUsize,
    pub fixes_sent: AtomicU64,
    pub frames_sent: AtomicU64,
    /// Fixes the gateway confirmed (CCE/CCC `<n>` replies).
    pub fixes_acked: AtomicU64,
    pub batches_confirmed: AtomicU64,
    /// Fixes sent again after a connection dropped with them unconfirmed.
    pub fixes_resent: AtomicU64,
    pub connect_errors: AtomicU64,
    /// Connections lost (read/write errors, EOF, ACK timeouts) after they were up.
    pub disconnects: AtomicU64,
    pub ack_timeouts: AtomicU64,
    total: Mutex<Histogram<u64>>,
    interval: Mutex<Histogram<u64>>,
    /// Batches due from `steady_from` on (the run without its warm-up).
    steady: Mutex<Histogram<u64>>,
    steady_from: std::sync::OnceLock<std::time::Instant>,
}

impl Default for FleetStats {
    fn default() -> Self {
        FleetStats {
            connected: AtomicUsize::new(0),
            fixes_sent: AtomicU64::new(0),
            frames_sent: AtomicU64::new(0),
            fixes_acked: AtomicU64::new(0),
            batches_confirmed: AtomicU64::new(0),
            fixes_resent: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            ack_timeouts: AtomicU64::new(0),
            total: Mutex::new(new_histogram()),
            interval: Mutex::new(new_histogram()),
            steady: Mutex::new(new_histogram()),
            steady_from: std::sync::OnceLock::new(),
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    // 3 significant figures from 1 µs to 10 min: a fixed size, no allocation per sample.
    #[allow(clippy::expect_used)] // constant bounds, checked by the tests
    Histogram::new_with_bounds(1, MAX_TRACKED_US, 3).expect("valid histogram bounds")
}

/// Percentiles of one histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

impl FleetStats {
    /// Batches due before `t` (connections still opening: the warm-up) stay out of
    /// [`FleetStats::steady_latency`]. Set once; later calls are ignored.
    pub fn steady_from(&self, t: std::time::Instant) {
        let _ = self.steady_from.set(t);
    }

    /// One confirmed batch of `fixes` that fell due at `due` (latency: from then to now).
    pub fn record_ack(&self, fixes: usize, due: std::time::Instant) {
        self.record_ack_after(fixes, due, due.elapsed());
    }

    fn record_ack_after(&self, fixes: usize, due: std::time::Instant, latency: Duration) {
        self.fixes_acked.fetch_add(fixes as u64, Ordering::Relaxed);
        self.batches_confirmed.fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, MAX_TRACKED_US);
        let steady = self.steady_from.get().is_none_or(|from| due >= *from);
        let hists: &[&Mutex<Histogram<u64>>] = if steady {
            &[&self.total, &self.interval, &self.steady]
        } else {
            &[&self.total, &self.interval]
        };
        for h in hists {
            if let Ok(mut h) = h.lock() {
                // In bounds by the clamp above, so this cannot fail.
                let _ = h.record(us);
            }
        }
    }

    /// Latency since the last call (and reset the interval histogram).
    pub fn take_interval(&self) -> Latency {
        match self.interval.lock() {
            Ok(mut h) => {
                let l = Latency::of(&h);
                h.reset();
                l
            }
            Err(_) => Latency::default(),
        }
    }

    /// Latency of the batches due after the warm-up (all of them without one).
    pub fn steady_latency(&self) -> Latency {
        self.steady
            .lock()
            .map(|h| Latency::of(&h))
            .unwrap_or_default()
    }

    /// Latency over the whole run.
    pub fn total_latency(&self) -> Latency {
        self.total
            .lock()
            .map(|h| Latency::of(&h))
            .unwrap_or_default()
    }

    /// The whole run's latency distribution as (percentile, ms) points, for a CDF plot.
    pub fn cdf(&self) -> Vec<(f64, f64)> {
        let Ok(h) = self.total.lock() else {
            return Vec::new();
        };
        if h.is_empty() {
            return Vec::new();
        }
        h.iter_quantiles(2)
            .map(|v| {
                (
                    v.quantile_iterated_to() * 100.0,
                    v.value_iterated_to() as f64 / 1000.0,
                )
            })
            .collect()
    }

    /// The counters, read once.
    pub fn counters(&self) -> Counters {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            connected: self.connected.load(Ordering::Relaxed) as u64,
            fixes_sent: r(&self.fixes_sent),
            frames_sent: r(&self.frames_sent),
            fixes_acked: r(&self.fixes_acked),
            batches_confirmed: r(&self.batches_confirmed),
            fixes_resent: r(&self.fixes_resent),
            connect_errors: r(&self.connect_errors),
            disconnects: r(&self.disconnects),
            ack_timeouts: r(&self.ack_timeouts),
        }
    }
}

/// A reading of [`FleetStats`]' counters.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    pub connected: u64,
    pub fixes_sent: u64,
    pub frames_sent: u64,
    pub fixes_acked: u64,
    pub batches_confirmed: u64,
    pub fixes_resent: u64,
    pub connect_errors: u64,
    pub disconnects: u64,
    pub ack_timeouts: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_recorded_latencies() {
        let s = FleetStats::default();
        for ms in 1..=1000u64 {
            s.record_ack_after(2, std::time::Instant::now(), Duration::from_millis(ms));
        }
        let l = s.take_interval();
        assert_eq!(l.count, 1000);
        // HDR with 3 significant figures: within 0.1 %.
        assert!((l.p50_ms - 500.0).abs() <= 0.5, "{l:?}");
        assert!((l.p99_ms - 990.0).abs() <= 1.0, "{l:?}");
        assert!((l.max_ms - 1000.0).abs() <= 1.0, "{l:?}");
        assert_eq!(s.counters().fixes_acked, 2000);
        // The interval histogram was reset; the total one was not.
        assert_eq!(s.take_interval().count, 0);
        assert_eq!(s.total_latency().count, 1000);
        let cdf = s.cdf();
        assert!(cdf.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        assert!(cdf.last().is_some_and(|&(q, _)| q >= 99.9));
    }

    #[test]
    fn absurd_latencies_are_clamped_not_lost() {
        let s = FleetStats::default();
        s.record_ack_after(1, std::time::Instant::now(), Duration::from_secs(100_000));
        s.record_ack_after(1, std::time::Instant::now(), Duration::ZERO);
        let l = s.total_latency();
        assert_eq!(l.count, 2);
        assert!(l.max_ms >= 599_000.0);
    }

    #[test]
    fn the_warm_up_stays_out_of_the_steady_latency_only() {
        let s = FleetStats::default();
        let t0 = std::time::Instant::now();
        s.steady_from(t0 + Duration::from_secs(2));
        // Due during the warm-up: a 1 s SYN retry.
        s.record_ack_after(1, t0, Duration::from_secs(1));
        for _ in 0..99 {
            s.record_ack_after(1, t0 + Duration::from_secs(3), Duration::from_millis(5));
        }
        assert_eq!(s.total_latency().count, 100);
        assert!(s.total_latency().max_ms >= 999.0);
        let steady = s.steady_latency();
        assert_eq!(steady.count, 99);
        assert!(steady.max_ms < 6.0, "{steady:?}");
        assert_eq!(s.counters().fixes_acked, 100, "counted either way");
    }
}
