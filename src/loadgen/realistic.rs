//! Devices that report like real ones in the field (`trackgate loadgen --sim-interval-s`):
//! what the storage footprint of a fleet depends on.
//!
//! The default fleet draws altitude, satellites, HDOP, GSM signal and cell id afresh on
//! every fix and stamps fixes with the wall clock, which costs history chunks far more
//! bytes than a real tracker does. Here instead:
//! * fix times advance by the simulated report interval per report, whatever the real
//!   send rate, starting far enough back that the last report is about now (never
//!   further back than [`MAX_SPAN`], inside the default retention) and never in the future;
//! * altitude is a slow random walk; satellites, HDOP and GSM signal change now and then
//!   by one step; the serving cell changes every few dozen reports (28-bit LTE cell ids);
//! * odometer (a large, realistic reading) and run time advance with the simulated time;
//! * an analog input and the battery and external power readings carry small noise.
//!
//! Position, speed and course move as in the default fleet (the caller's job).

use std::time::Duration;

use jiff::Timestamp;
use rand::Rng;
use rand::rngs::SmallRng;
use trackgate_protocols::{Analog, Cell, Fix};

/// Furthest back a simulated history starts: a day inside the default retention, so no
/// fix is dropped as expired on arrival.
pub const MAX_SPAN: Duration = Duration::from_secs(crate::config::DEFAULT_TTL_S - 24 * 3600);

/// Cell ids are drawn from this base upwards (28-bit E-UTRAN cell identities).
const CELL_ID_BASE: u32 = 0x1A2_B3C0;
/// … and this far above it.
const CELL_ID_SPREAD: u32 = 0x4_0000;

/// The simulated clock of a fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimulatedTime {
    /// How far a device's fix time advances per report (its report interval in the field).
    pub interval: Duration,
    /// Fix time of device 0's first report; device `i` of `n` starts `i / n` of an
    /// interval later, so the fleet's reports do not share their seconds.
    pub first_fix: Timestamp,
}

impl SimulatedTime {
    /// Reports every `interval`, starting `reports_per_device` intervals before `now` (at
    /// most [`MAX_SPAN`] back; that far when the number of reports is open).
    pub fn ending_at(
        now: Timestamp,
        interval: Duration,
        reports_per_device: Option<u64>,
    ) -> SimulatedTime {
        let span = reports_per_device.map_or(MAX_SPAN, |n| {
            interval
                .saturating_mul(u32::try_from(n).unwrap_or(u32::MAX))
                .min(MAX_SPAN)
        });
        let span = jiff::SignedDuration::try_from(span).unwrap_or(jiff::SignedDuration::ZERO);
        SimulatedTime {
            interval,
            first_fix: now.checked_sub(span).unwrap_or(now),
        }
    }

    /// First fix time of device `index` of `devices`, in milliseconds.
    fn first_ms(&self, index: usize, devices: usize) -> i64 {
        let offset = self.interval.as_millis() * index as u128 / devices.max(1) as u128;
        self.first_fix
            .as_millisecond()
            .saturating_add(i64::try_from(offset).unwrap_or(0))
    }
}

/// One device's slowly changing readings and its simulated clock.
#[derive(Debug, Clone)]
pub struct Readings {
    interval: Duration,
    next_fix_ms: i64,
    altitude_m: f64,
    satellites: u8,
    hdop_x10: u16,
    gsm_signal: u8,
    cell_id: u32,
    /// Reports until the next handover.
    cell_left: u32,
    runtime_s: f64,
    adc_raw: f64,
    battery_raw: f64,
    power_raw: f64,
}

impl Readings {
    /// Device `index` of `devices` on the clock `time`.
    pub fn new(rng: &mut SmallRng, time: &SimulatedTime, index: usize, devices: usize) -> Self {
        Readings {
            interval: time.interval,
            next_fix_ms: time.first_ms(index, devices),
            altitude_m: rng.random_range(20.0..600.0),
            satellites: rng.random_range(7..13),
            hdop_x10: rng.random_range(7..15),
            gsm_signal: rng.random_range(14..29),
            cell_id: CELL_ID_BASE + rng.random_range(0..CELL_ID_SPREAD),
            cell_left: rng.random_range(1..60),
            runtime_s: rng.random_range(1.0e6..3.0e7),
            adc_raw: rng.random_range(400.0..900.0),
            // Meitrack counts: battery ≈ 4.1 V, external power ≈ 13.6 V.
            battery_raw: rng.random_range(500.0..520.0),
            power_raw: rng.random_range(1030.0..1070.0),
        }
    }

    /// A starting odometer reading, metres: a vehicle with years on the road.
    pub fn odometer_m(rng: &mut SmallRng) -> f64 {
        rng.random_range(100_000_000.0..400_000_000.0)
    }

    /// How far the simulated clock moves per report.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Advance one report and fill in its time and readings (`fix` carries the position,
    /// motion and odometer).
    pub fn report(&mut self, rng: &mut SmallRng, fix: &mut Fix<'static>, now: Timestamp) {
        let step_s = self.interval.as_secs_f64();
        let t_ms = self.next_fix_ms.min(now.as_millisecond());
        self.next_fix_ms = self
            .next_fix_ms
            .saturating_add(i64::try_from(self.interval.as_millis()).unwrap_or(i64::MAX));
        self.wander(rng);
        self.runtime_s += step_s;
        fix.time = Some(Timestamp::from_second(t_ms.div_euclid(1000)).unwrap_or(now));
        fix.altitude_m = Some(self.altitude_m.round() as i32);
        fix.satellites = Some(self.satellites);
        fix.hdop_x10 = Some(self.hdop_x10);
        fix.gsm_signal = Some(self.gsm_signal);
        fix.runtime_s = Some(self.runtime_s as u64);
        fix.cell = Some(Cell {
            mcc: 262,
            mnc: 1,
            lac: 0x2f1c,
            cell_id: self.cell_id,
        });
        let noisy = |rng: &mut SmallRng, v: f64, by: f64| (v + rng.random_range(-by..=by)).round();
        fix.analog = Analog {
            adc_raw: [Some(noisy(rng, self.adc_raw, 3.0) as u32), None, None],
            battery_raw: Some(noisy(rng, self.battery_raw, 2.0) as u32),
            power_raw: Some(noisy(rng, self.power_raw, 4.0) as u32),
            ..Analog::default()
        };
    }

    /// The slow changes between two reports.
    fn wander(&mut self, rng: &mut SmallRng) {
        self.altitude_m = (self.altitude_m + rng.random_range(-3.0..3.0)).clamp(-50.0, 3000.0);
        if rng.random_bool(0.08) {
            self.satellites = step(rng, self.satellites.into(), 4, 16) as u8;
        }
        if rng.random_bool(0.08) {
            self.hdop_x10 = step(rng, self.hdop_x10.into(), 6, 40) as u16;
        }
        if rng.random_bool(0.1) {
            self.gsm_signal = step(rng, self.gsm_signal.into(), 5, 31) as u8;
        }
        self.cell_left = self.cell_left.saturating_sub(1);
        if self.cell_left == 0 {
            self.cell_id = CELL_ID_BASE + rng.random_range(0..CELL_ID_SPREAD);
            self.cell_left = rng.random_range(20..60);
        }
        self.adc_raw = (self.adc_raw + rng.random_range(-1.0..1.0)).clamp(0.0, 4095.0);
    }
}

/// One step up or down, kept within `lo..=hi`.
fn step(rng: &mut SmallRng, v: i64, lo: i64, hi: i64) -> i64 {
    let d = if rng.random_bool(0.5) { 1 } else { -1 };
    (v + d).clamp(lo, hi)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn reports(n: usize, now: Timestamp) -> Vec<Fix<'static>> {
        let time = SimulatedTime::ending_at(now, Duration::from_secs(30), Some(n as u64));
        let mut rng = SmallRng::seed_from_u64(5);
        let mut r = Readings::new(&mut rng, &time, 0, 1);
        (0..n)
            .map(|_| {
                let mut f = Fix::default();
                r.report(&mut rng, &mut f, now);
                f
            })
            .collect()
    }

    #[test]
    fn fix_times_advance_by_the_interval_and_the_last_is_about_now() {
        let now = Timestamp::from_second(1_800_000_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let fixes = reports(1000, now);
        let times: Vec<i64> = fixes
            .iter()
            .filter_map(|f| f.time)
            .map(|t| t.as_second())
            .collect();
        assert!(times.windows(2).all(|w| w[1] - w[0] == 30), "{times:?}");
        let last = *times.last().unwrap_or(&0);
        assert_eq!(now.as_second() - last, 30);
    }

    #[test]
    fn a_long_history_starts_inside_the_retention_and_never_runs_into_the_future() {
        let now = Timestamp::from_second(1_800_000_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let open = SimulatedTime::ending_at(now, Duration::from_secs(30), None);
        assert_eq!(
            now.as_second() - open.first_fix.as_second(),
            MAX_SPAN.as_secs() as i64
        );
        let mut rng = SmallRng::seed_from_u64(1);
        let short = SimulatedTime::ending_at(now, Duration::from_secs(30), Some(2));
        let mut r = Readings::new(&mut rng, &short, 0, 1);
        let mut f = Fix::default();
        for _ in 0..5 {
            r.report(&mut rng, &mut f, now);
        }
        assert_eq!(f.time, Some(now));
    }

    #[test]
    fn readings_change_slowly_and_the_cell_every_few_dozen_reports() {
        let now = Timestamp::from_second(1_800_000_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let fixes = reports(3000, now);
        let mut changes = [0usize; 4];
        for w in fixes.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            let alt = (a.altitude_m.unwrap_or(0) - b.altitude_m.unwrap_or(0)).abs();
            assert!(alt <= 4, "altitude jumps {alt} m");
            let sats = i32::from(a.satellites.unwrap_or(0)) - i32::from(b.satellites.unwrap_or(0));
            assert!(sats.abs() <= 1);
            changes[0] += usize::from(sats != 0);
            changes[1] += usize::from(a.hdop_x10 != b.hdop_x10);
            changes[2] += usize::from(a.gsm_signal != b.gsm_signal);
            changes[3] += usize::from(a.cell != b.cell);
            let cell = b.cell.unwrap_or_default().cell_id;
            assert!((CELL_ID_BASE..CELL_ID_BASE + CELL_ID_SPREAD).contains(&cell));
        }
        // About 8, 8 and 10 % of reports change satellites, HDOP and signal (less where a
        // bound holds them); a handover every 20–60 reports.
        for (what, n) in ["satellites", "hdop", "gsm"].iter().zip(&changes[..3]) {
            assert!((60..=400).contains(n), "{what} changed {n} times in 3000");
        }
        assert!((40..=160).contains(&changes[3]), "{} handovers", changes[3]);
        let last = fixes.last().cloned().unwrap_or_default();
        assert!(last.analog.battery_raw.is_some() && last.analog.power_raw.is_some());
        assert!(last.runtime_s > fixes[0].runtime_s);
    }
}
