//! Open-loop pacing: when each send of a device is due.
//!
//! The k-th send is due at `start + k × interval`, whatever happened before. A sender
//! that was held up (slow gateway, full socket) does not push its later sends back: they
//! fall due on time and the delay shows up as ACK latency, measured from the due time.
//! A closed-loop generator (next send after the last ACK) would instead quietly lower
//! its offered rate and hide the gateway's stall.

use std::time::{Duration, Instant};

/// One device's schedule.
#[derive(Debug, Clone)]
pub struct Pacer {
    start: Instant,
    interval: Duration,
    issued: u64,
}

impl Pacer {
    pub fn new(start: Instant, interval: Duration) -> Pacer {
        Pacer {
            start,
            interval: interval.max(Duration::from_micros(1)),
            issued: 0,
        }
    }

    /// When the next send is due.
    pub fn due(&self) -> Instant {
        let nanos = self
            .interval
            .as_nanos()
            .saturating_mul(u128::from(self.issued));
        self.start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Take the next due slot; returns its due time.
    pub fn take(&mut self) -> Instant {
        let due = self.due();
        self.issued += 1;
        due
    }

    /// Sends that are due at `now` and not taken yet.
    pub fn overdue(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.start).as_nanos();
        let due_by_now = elapsed / self.interval.as_nanos() + 1;
        u64::try_from(due_by_now)
            .unwrap_or(u64::MAX)
            .saturating_sub(self.issued)
    }

    pub fn issued(&self) -> u64 {
        self.issued
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_times_do_not_drift_with_late_takes() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0, Duration::from_millis(100));
        for k in 0..1000u64 {
            assert_eq!(p.take(), t0 + Duration::from_millis(100 * k));
        }
        assert_eq!(p.due(), t0 + Duration::from_secs(100));
        assert_eq!(p.issued(), 1000);
    }

    #[test]
    fn a_stalled_sender_owes_every_missed_send() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0, Duration::from_millis(250));
        assert_eq!(p.overdue(t0), 1, "the first send is due at once");
        p.take();
        assert_eq!(p.overdue(t0 + Duration::from_millis(249)), 0);
        // Held up for 10 s: 40 sends fell due meanwhile, none was dropped from the schedule.
        assert_eq!(p.overdue(t0 + Duration::from_secs(10)), 40);
        for _ in 0..40 {
            p.take();
        }
        assert_eq!(p.overdue(t0 + Duration::from_secs(10)), 0);
        assert_eq!(p.due(), t0 + Duration::from_millis(250 * 41));
    }

    #[test]
    fn offered_rate_is_devices_over_interval() {
        // 1,000 devices at 0.5 s each: 2,000 sends due per second of schedule.
        let t0 = Instant::now();
        let pacers: Vec<Pacer> = (0..1000)
            .map(|_| Pacer::new(t0, Duration::from_millis(500)))
            .collect();
        let at = t0 + Duration::from_millis(9_999);
        let due: u64 = pacers.iter().map(|p| p.overdue(at)).sum();
        assert_eq!(due, 1000 * 20);
    }
}
