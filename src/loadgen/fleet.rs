//! A simulated fleet: devices that drive plausible routes and talk to a gateway the way
//! Meitrack trackers do. Used by `trackgate demo` and the load generator.
//!
//! Each device keeps one connection open (reconnecting with backoff), sends an AAA report
//! per interval while it has coverage, and now and then loses coverage for a while: it
//! then caches its fixes and, back in coverage, sends them as one CCE batch and waits for
//! the `CCE,<n>` confirmation before deleting them from its cache, like the real firmware.
//! The time from sending a batch to its confirmation is the ACK latency reported.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trackgate_protocols::encode::{self, aaa_payload, cce_payload};
use trackgate_protocols::{Cell, Direction, Fix};

/// What to simulate.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub gateway: SocketAddr,
    pub devices: usize,
    /// Time between two fixes of one device.
    pub report_interval: Duration,
    /// Chance per report of losing coverage (then 5–20 fixes are cached).
    pub outage_probability: f64,
    /// IMEIs are `imei_base + index` (15 digits; keep the fake `35…` prefix).
    pub imei_base: u64,
    pub seed: u64,
    /// Time to wait for a batch confirmation before reconnecting.
    pub ack_timeout: Duration,
}

impl FleetConfig {
    pub fn new(gateway: SocketAddr, devices: usize) -> Self {
        FleetConfig {
            gateway,
            devices,
            report_interval: Duration::from_secs(1),
            outage_probability: 0.02,
            imei_base: 350_000_000_000_000,
            seed: 1,
            ack_timeout: Duration::from_secs(30),
        }
    }
}

/// Live counters, shared with whoever prints them.
#[derive(Debug, Default)]
pub struct FleetStats {
    pub connected: AtomicUsize,
    pub fixes_sent: AtomicU64,
    pub frames_sent: AtomicU64,
    pub batches_confirmed: AtomicU64,
    pub connect_errors: AtomicU64,
    pub ack_timeouts: AtomicU64,
    ack_micros: std::sync::Mutex<Vec<u32>>,
}

impl FleetStats {
    fn record_ack(&self, d: Duration) {
        if let Ok(mut v) = self.ack_micros.lock() {
            v.push(u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
        }
    }

    /// ACK latency percentiles (p50, p99) since the last call, and the sample count.
    pub fn take_ack_percentiles(&self) -> Option<(Duration, Duration, usize)> {
        let mut v = self.ack_micros.lock().ok()?;
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let pick = |q: f64| {
            let i = ((v.len() as f64 - 1.0) * q).round() as usize;
            Duration::from_micros(u64::from(v[i.min(v.len() - 1)]))
        };
        let out = (pick(0.50), pick(0.99), v.len());
        v.clear();
        Some(out)
    }
}

/// Run the fleet until `stop` fires; returns when every device has hung up.
pub async fn run(config: FleetConfig, stats: Arc<FleetStats>, stop: CancellationToken) {
    let tracker = TaskTracker::new();
    for i in 0..config.devices {
        let device = Device::new(&config, i);
        tracker.spawn(device.run(config.clone(), stats.clone(), stop.clone()));
    }
    tracker.close();
    tracker.wait().await;
}

/// A vehicle on a random but smooth route.
struct Device {
    imei: String,
    rng: SmallRng,
    lat: f64,
    lon: f64,
    heading_deg: f64,
    speed_kmh: f64,
    mileage_m: f64,
    started: Instant,
    cached: Vec<Fix<'static>>,
    outage_left: u32,
}

/// Cities the routes start from (lat, lon).
const CITIES: [(f64, f64); 6] = [
    (48.137, 11.575),
    (52.520, 13.405),
    (-33.868, 151.209),
    (40.713, -74.006),
    (-23.550, -46.633),
    (1.352, 103.820),
];

impl Device {
    fn new(config: &FleetConfig, index: usize) -> Device {
        let mut rng = SmallRng::seed_from_u64(config.seed.wrapping_mul(1_000_003) ^ index as u64);
        let (lat, lon) = CITIES[index % CITIES.len()];
        Device {
            imei: format!("{:015}", config.imei_base + index as u64),
            lat: lat + rng.random_range(-0.05..0.05),
            lon: lon + rng.random_range(-0.05..0.05),
            heading_deg: rng.random_range(0.0..360.0),
            speed_kmh: rng.random_range(20.0..90.0),
            mileage_m: rng.random_range(0.0..200_000_000.0),
            started: Instant::now(),
            cached: Vec::new(),
            outage_left: 0,
            rng,
        }
    }

    /// Move for `dt` and return the fix at the new position.
    fn step(&mut self, dt: Duration) -> Fix<'static> {
        let secs = dt.as_secs_f64();
        self.heading_deg =
            (self.heading_deg + self.rng.random_range(-15.0..15.0)).rem_euclid(360.0);
        self.speed_kmh = (self.speed_kmh + self.rng.random_range(-5.0..5.0)).clamp(0.0, 130.0);
        let dist_m = self.speed_kmh / 3.6 * secs;
        let rad = self.heading_deg.to_radians();
        self.lat = (self.lat + dist_m * rad.cos() / 111_320.0).clamp(-89.0, 89.0);
        let lon_scale = 111_320.0 * self.lat.to_radians().cos().max(0.01);
        self.lon = (self.lon + dist_m * rad.sin() / lon_scale + 540.0).rem_euclid(360.0) - 180.0;
        self.mileage_m += dist_m;
        let now =
            Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH);
        Fix {
            event: Some(35),
            time: Some(now),
            valid: Some(true),
            lat_e6: Some((self.lat * 1e6).round() as i32),
            lon_e6: Some((self.lon * 1e6).round() as i32),
            speed_kmh_x10: Some((self.speed_kmh.round() as u32) * 10),
            course_deg: Some(self.heading_deg as u16),
            altitude_m: Some(self.rng.random_range(0..600)),
            satellites: Some(self.rng.random_range(5..14)),
            hdop_x10: Some(self.rng.random_range(6..20)),
            gsm_signal: Some(self.rng.random_range(10..31)),
            mileage_m: Some(self.mileage_m as u64),
            runtime_s: Some(self.started.elapsed().as_secs()),
            cell: Some(Cell {
                mcc: 262,
                mnc: 1,
                lac: 0x2f1c,
                cell_id: self.rng.random_range(1000..60000),
            }),
            inputs: Some(u8::from(self.speed_kmh > 0.0)),
            outputs: Some(0),
            ..Fix::default()
        }
    }

    async fn run(mut self, config: FleetConfig, stats: Arc<FleetStats>, stop: CancellationToken) {
        // Spread the first reports over one interval, like a fleet that was already running.
        let offset = self
            .rng
            .random_range(0..config.report_interval.as_millis().max(1) as u64);
        let mut backoff = Duration::from_millis(200);
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(offset)) => {}
            () = stop.cancelled() => return,
        }
        while !stop.is_cancelled() {
            let stream = tokio::select! {
                s = TcpStream::connect(config.gateway) => s,
                () = stop.cancelled() => return,
            };
            match stream {
                Ok(s) => {
                    backoff = Duration::from_millis(200);
                    stats.connected.fetch_add(1, Ordering::Relaxed);
                    let _ = self.session(s, &config, &stats, &stop).await;
                    stats.connected.fetch_sub(1, Ordering::Relaxed);
                }
                Err(_) => {
                    stats.connect_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// One connection's life; `Err` means reconnect.
    async fn session(
        &mut self,
        mut s: TcpStream,
        config: &FleetConfig,
        stats: &FleetStats,
        stop: &CancellationToken,
    ) -> std::io::Result<()> {
        let mut tick = tokio::time::interval(config.report_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut out = Vec::with_capacity(1024);
        let mut payload = Vec::with_capacity(1024);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return Ok(()),
            }
            let fix = self.step(config.report_interval);
            if self.outage_left == 0 && self.rng.random_bool(config.outage_probability) {
                self.outage_left = self.rng.random_range(5..20);
            }
            if self.outage_left > 0 {
                self.cached.push(fix);
                self.outage_left -= 1;
                if self.outage_left > 0 {
                    continue;
                }
                // Coverage is back: send the cache as one batch and wait for the ACK.
                payload.clear();
                out.clear();
                cce_payload(&self.cached, 0, &mut payload).map_err(std::io::Error::other)?;
                encode::frame(
                    Direction::DeviceToServer,
                    b'C',
                    &self.imei,
                    b"CCE",
                    &payload,
                    &mut out,
                )
                .map_err(std::io::Error::other)?;
                let sent = Instant::now();
                s.write_all(&out).await?;
                stats.frames_sent.fetch_add(1, Ordering::Relaxed);
                stats
                    .fixes_sent
                    .fetch_add(self.cached.len() as u64, Ordering::Relaxed);
                match tokio::time::timeout(config.ack_timeout, read_reply(&mut s)).await {
                    Ok(Ok(reply)) if reply.contains(",CCE,") => {
                        stats.record_ack(sent.elapsed());
                        stats.batches_confirmed.fetch_add(1, Ordering::Relaxed);
                        self.cached.clear();
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {
                        stats.ack_timeouts.fetch_add(1, Ordering::Relaxed);
                        return Err(std::io::ErrorKind::TimedOut.into()); // resend after reconnect
                    }
                }
            } else {
                payload.clear();
                out.clear();
                aaa_payload(&fix, &mut payload).map_err(std::io::Error::other)?;
                encode::frame(
                    Direction::DeviceToServer,
                    b'A',
                    &self.imei,
                    b"AAA",
                    &payload,
                    &mut out,
                )
                .map_err(std::io::Error::other)?;
                s.write_all(&out).await?;
                stats.frames_sent.fetch_add(1, Ordering::Relaxed);
                stats.fixes_sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Read one `@@…\r\n` reply.
async fn read_reply(s: &mut TcpStream) -> std::io::Result<String> {
    let mut line = Vec::with_capacity(64);
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        if s.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        line.push(byte[0]);
        if line.len() > 256 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_stay_on_the_globe_and_move() {
        let cfg = FleetConfig::new("127.0.0.1:1".parse().unwrap(), 1);
        let mut d = Device::new(&cfg, 0);
        let first = d.step(Duration::from_secs(1));
        let mut last = first.clone();
        for _ in 0..10_000 {
            last = d.step(Duration::from_secs(10));
            assert!(last.lat_e6.unwrap().abs() <= 90_000_000);
            assert!(last.lon_e6.unwrap().abs() <= 180_000_000);
        }
        assert_ne!(first.lat_e6, last.lat_e6);
        assert!(last.mileage_m > first.mileage_m);
        assert!(d.imei.starts_with("35") && d.imei.len() == 15);
    }
}
