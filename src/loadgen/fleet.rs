//! A simulated fleet: devices that drive plausible routes and talk to a gateway the way
//! Meitrack trackers do. Used by `trackgate demo` and `trackgate loadgen`.
//!
//! Each device keeps one connection open (reconnecting with backoff) and, on an
//! open-loop schedule ([`Pacer`]), sends either an AAA report or a CCE batch of cached
//! fixes. It does not wait for a confirmation before its next send; CCE batches stay in
//! its [`Outbox`] until the gateway's `CCE,<n>` reply confirms them, and are sent again
//! after a reconnect otherwise, like the real firmware. Now and then a device loses
//! coverage: it then caches its fixes and sends them as one batch when it is back. The
//! time from a batch falling due to its confirmation is the ACK latency reported.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trackgate_protocols::encode::{self, aaa_payload, cce_payload};
use trackgate_protocols::{Cell, Direction, Fix};

use super::net::Route;
use super::outbox::Outbox;
use super::pacer::Pacer;
use super::realistic::{Readings, SimulatedTime};
pub use super::stats::FleetStats;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Gateway address(es), source addresses and TLS.
    pub route: Route,
    pub devices: usize,
    /// Time between two sends of one device (its report interval).
    pub report_interval: Duration,
    /// Chance per report of losing coverage (then 5–20 fixes are cached and sent as a batch).
    pub outage_probability: f64,
    /// Chance per send of a CCE batch of `batch_fixes` fixes instead of an AAA report.
    pub cce_share: f64,
    /// Fixes in a scheduled CCE batch.
    pub batch_fixes: usize,
    /// Most fixes in one CCE frame when sending cached records.
    pub max_batch_fixes: usize,
    /// Most records a device caches while it cannot send (the oldest are dropped beyond).
    pub cache_capacity_fixes: usize,
    /// Connect, send one AAA report (so the gateway binds the connection) and stay silent.
    pub idle: bool,
    /// Every report is one AAA frame (no CCE batches, no coverage gaps); reports that fell
    /// due while the device could not send go out one frame each.
    pub aaa_only: bool,
    /// Devices report like real ones on this simulated clock (see
    /// [`super::realistic`]); `None`: wall-clock times and readings drawn afresh per fix.
    pub simulated: Option<SimulatedTime>,
    /// The first connections are spread evenly over this time.
    pub start_spread: Duration,
    /// Stop after this many frames in all (`None`: until cancelled).
    pub max_frames: Option<u64>,
    /// IMEIs are `imei_base + index` (15 digits; keep the fake `35…` prefix).
    pub imei_base: u64,
    pub seed: u64,
    /// Time to wait for a batch confirmation before reconnecting.
    pub ack_timeout: Duration,
    /// After the stop, time to wait for the confirmations of batches already sent.
    pub drain_timeout: Duration,
}

impl FleetConfig {
    pub fn new(gateway: std::net::SocketAddr, devices: usize) -> Self {
        FleetConfig {
            route: Route::plain(gateway),
            devices,
            report_interval: Duration::from_secs(1),
            outage_probability: 0.02,
            cce_share: 0.0,
            batch_fixes: 10,
            // ≈ 70 B per fix: 16 fixes stay well inside the gateway's default 2 KiB frame cap.
            max_batch_fixes: 16,
            cache_capacity_fixes: 1000,
            idle: false,
            aaa_only: false,
            simulated: None,
            start_spread: Duration::from_secs(1),
            max_frames: None,
            imei_base: 350_000_000_000_000,
            seed: 1,
            ack_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// Run the fleet until `stop` fires (or `max_frames` were sent); returns when every
/// device has hung up.
pub async fn run(config: FleetConfig, stats: Arc<FleetStats>, stop: CancellationToken) {
    let tracker = TaskTracker::new();
    let config = Arc::new(config);
    let start = Instant::now();
    for i in 0..config.devices {
        let device = Device::new(&config, i);
        let offset = config
            .start_spread
            .mul_f64(i as f64 / config.devices.max(1) as f64);
        tracker.spawn(device.run(start + offset, config.clone(), stats.clone(), stop.clone()));
    }
    tracker.close();
    tracker.wait().await;
}

/// `n` consecutive fixes of one simulated vehicle, one second apart: plausible values in
/// every field a Meitrack AAA report carries (for benches and tests).
pub fn sample_fixes(seed: u64, n: usize) -> Vec<Fix<'static>> {
    let mut config = FleetConfig::new(([127, 0, 0, 1], 0).into(), 1);
    config.seed = seed;
    let mut d = Device::new(&config, 0);
    (0..n).map(|_| d.step(Duration::from_secs(1))).collect()
}

/// A vehicle on a random but smooth route.
struct Device {
    index: usize,
    imei: String,
    rng: SmallRng,
    lat: f64,
    lon: f64,
    heading_deg: f64,
    speed_kmh: f64,
    mileage_m: f64,
    started: Instant,
    outage_left: u32,
    /// Realistic mode: the simulated clock and slowly changing readings.
    realistic: Option<Readings>,
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
        let mut d = Device {
            index,
            imei: format!("{:015}", config.imei_base + index as u64),
            lat: lat + rng.random_range(-0.05..0.05),
            lon: lon + rng.random_range(-0.05..0.05),
            heading_deg: rng.random_range(0.0..360.0),
            speed_kmh: rng.random_range(20.0..90.0),
            mileage_m: rng.random_range(0.0..200_000_000.0),
            started: Instant::now(),
            outage_left: 0,
            realistic: None,
            rng,
        };
        // Drawn after everything else: the default fleet's draws stay as they were.
        if let Some(time) = &config.simulated {
            d.realistic = Some(Readings::new(&mut d.rng, time, index, config.devices));
            d.mileage_m = Readings::odometer_m(&mut d.rng);
        }
        d
    }

    /// Move for `dt` (realistic devices: one simulated interval) and return the fix at the
    /// new position.
    fn step(&mut self, dt: Duration) -> Fix<'static> {
        let Some(mut readings) = self.realistic.take() else {
            return self.step_drawn(dt);
        };
        self.travel(readings.interval());
        let mut fix = self.motion_fix();
        readings.report(&mut self.rng, &mut fix, Timestamp::now());
        self.realistic = Some(readings);
        fix
    }

    /// The default fleet's fix: wall-clock time, readings drawn afresh.
    fn step_drawn(&mut self, dt: Duration) -> Fix<'static> {
        self.travel(dt);
        let now =
            Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH);
        Fix {
            time: Some(now),
            altitude_m: Some(self.rng.random_range(0..600)),
            satellites: Some(self.rng.random_range(5..14)),
            hdop_x10: Some(self.rng.random_range(6..20)),
            gsm_signal: Some(self.rng.random_range(10..31)),
            runtime_s: Some(self.started.elapsed().as_secs()),
            cell: Some(Cell {
                mcc: 262,
                mnc: 1,
                lac: 0x2f1c,
                cell_id: self.rng.random_range(1000..60000),
            }),
            ..self.motion_fix()
        }
    }

    /// Position, speed, course and odometer as they are now; the rest is the caller's.
    fn motion_fix(&self) -> Fix<'static> {
        Fix {
            event: Some(35),
            valid: Some(true),
            lat_e6: Some((self.lat * 1e6).round() as i32),
            lon_e6: Some((self.lon * 1e6).round() as i32),
            speed_kmh_x10: Some((self.speed_kmh.round() as u32) * 10),
            course_deg: Some(self.heading_deg as u16),
            mileage_m: Some(self.mileage_m as u64),
            inputs: Some(u8::from(self.speed_kmh > 0.0)),
            outputs: Some(0),
            ..Fix::default()
        }
    }

    /// Turn, speed up or slow down a little, and drive on for `dt`.
    fn travel(&mut self, dt: Duration) {
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
    }

    async fn run(
        mut self,
        first_connect: Instant,
        config: Arc<FleetConfig>,
        stats: Arc<FleetStats>,
        stop: CancellationToken,
    ) {
        tokio::select! {
            () = tokio::time::sleep_until(first_connect.into()) => {}
            () = stop.cancelled() => return,
        }
        // The schedule starts at the first connection and runs on through reconnects: a
        // device keeps recording fixes while it cannot send them.
        let mut pacer = Pacer::new(Instant::now(), config.report_interval);
        let outbox = Mutex::new(Outbox::new(config.cache_capacity_fixes));
        let mut backoff = Duration::from_millis(200);
        while !stop.is_cancelled() {
            let tcp = tokio::select! {
                s = config.route.connect_tcp(self.index) => s,
                () = stop.cancelled() => return,
            };
            let session = match tcp {
                Err(_) => None,
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    match &config.route.tls {
                        None => Some(
                            self.session(tcp, &outbox, &mut pacer, &config, &stats, &stop)
                                .await,
                        ),
                        Some(tls) => {
                            let handshake = Route::tls_handshake(tls, tcp);
                            match tokio::time::timeout(config.ack_timeout, handshake).await {
                                Ok(Ok(s)) => Some(
                                    self.session(s, &outbox, &mut pacer, &config, &stats, &stop)
                                        .await,
                                ),
                                _ => None,
                            }
                        }
                    }
                }
            };
            match session {
                None => {
                    stats.connect_errors.fetch_add(1, Ordering::Relaxed);
                }
                Some(result) => {
                    backoff = Duration::from_millis(200);
                    if result.is_err() {
                        stats.disconnects.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            let again = lock(&outbox).requeue();
            if stop.is_cancelled() {
                return; // stopped: nothing is sent again
            }
            stats
                .fixes_resent
                .fetch_add(again as u64, Ordering::Relaxed);
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// One connection's life. `Ok` after a stop (and the drain of confirmations); `Err`
    /// means the connection failed and the device reconnects.
    async fn session<S>(
        &mut self,
        stream: S,
        outbox: &Mutex<Outbox>,
        pacer: &mut Pacer,
        config: &FleetConfig,
        stats: &FleetStats,
        stop: &CancellationToken,
    ) -> std::io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin,
    {
        stats.connected.fetch_add(1, Ordering::Relaxed);
        let (rd, mut wr) = tokio::io::split(stream);
        let reader = read_acks(rd, outbox, config, stats, stop);
        let writer = self.write_loop(&mut wr, outbox, pacer, config, stats, stop);
        tokio::pin!(reader, writer);
        let result = tokio::select! {
            r = &mut reader => r,
            w = &mut writer => match w {
                // Stopped: collect the confirmations of what was sent.
                Ok(()) => tokio::time::timeout(config.drain_timeout, &mut reader)
                    .await
                    .unwrap_or(Ok(())),
                Err(e) => Err(e),
            },
        };
        stats.connected.fetch_sub(1, Ordering::Relaxed);
        result
    }

    async fn write_loop<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        outbox: &Mutex<Outbox>,
        pacer: &mut Pacer,
        config: &FleetConfig,
        stats: &FleetStats,
        stop: &CancellationToken,
    ) -> std::io::Result<()> {
        let mut out = Vec::with_capacity(1024);
        let interval = config.report_interval;
        // Records from before (a dropped connection, an outage): send them first.
        self.flush(wr, &mut out, outbox, Instant::now(), config, stats)
            .await?;
        if config.idle {
            let fix = self.step(interval);
            self.send_aaa(wr, &mut out, &fix, stats).await?;
            stop.cancelled().await;
            return Ok(());
        }
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(pacer.due().into()) => {}
                () = stop.cancelled() => return Ok(()),
            }
            let due = pacer.take();
            // Sends that fell due while this device could not send (disconnected, or held
            // up by the gateway): the device recorded a fix for each and sends them now as
            // one batch, latency counted from the first one's due time (AAA-only: one
            // report each).
            let missed = pacer.overdue(Instant::now());
            if config.aaa_only {
                self.send_reports(wr, &mut out, pacer, missed, interval, stats)
                    .await?;
                if sent_enough(config, stats) {
                    stop.cancel();
                }
                continue;
            }
            for _ in 0..missed {
                pacer.take();
                let fix = self.step(interval);
                lock(outbox).hold(fix);
            }
            let fix = self.step(interval);
            if self.outage_left == 0 && chance(&mut self.rng, config.outage_probability) {
                self.outage_left = self.rng.random_range(5..20);
            }
            if self.outage_left > 0 {
                lock(outbox).hold(fix);
                self.outage_left -= 1;
                if self.outage_left == 0 {
                    // Coverage is back.
                    self.flush(wr, &mut out, outbox, due, config, stats).await?;
                }
            } else if lock(outbox).pending() > 0 || chance(&mut self.rng, config.cce_share) {
                let mut batch = vec![fix];
                if missed == 0 {
                    for _ in 1..config.batch_fixes {
                        batch.push(self.step(interval / config.batch_fixes.max(1) as u32));
                    }
                }
                {
                    let mut o = lock(outbox);
                    for f in batch {
                        o.hold(f);
                    }
                }
                self.flush(wr, &mut out, outbox, due, config, stats).await?;
            } else {
                self.send_aaa(wr, &mut out, &fix, stats).await?;
            }
            if sent_enough(config, stats) {
                stop.cancel();
            }
        }
    }

    /// The report due now and the `missed` ones before it, one AAA frame each.
    async fn send_reports<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        out: &mut Vec<u8>,
        pacer: &mut Pacer,
        missed: u64,
        interval: Duration,
        stats: &FleetStats,
    ) -> std::io::Result<()> {
        for i in 0..=missed {
            if i > 0 {
                pacer.take();
            }
            let fix = self.step(interval);
            self.send_aaa(wr, out, &fix, stats).await?;
        }
        Ok(())
    }

    async fn send_aaa<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        out: &mut Vec<u8>,
        fix: &Fix<'static>,
        stats: &FleetStats,
    ) -> std::io::Result<()> {
        let mut payload = Vec::with_capacity(160);
        aaa_payload(fix, &mut payload).map_err(std::io::Error::other)?;
        out.clear();
        encode::frame(
            Direction::DeviceToServer,
            b'A',
            &self.imei,
            b"AAA",
            &payload,
            out,
        )
        .map_err(std::io::Error::other)?;
        wr.write_all(out).await?;
        stats.frames_sent.fetch_add(1, Ordering::Relaxed);
        stats.fixes_sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Send every pending record as CCE batches of at most `max_batch_fixes`.
    async fn flush<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        out: &mut Vec<u8>,
        outbox: &Mutex<Outbox>,
        due: Instant,
        config: &FleetConfig,
        stats: &FleetStats,
    ) -> std::io::Result<()> {
        let mut payload = Vec::with_capacity(1024);
        loop {
            out.clear();
            payload.clear();
            let n = {
                let mut o = lock(outbox);
                let batch = o.next_batch(config.max_batch_fixes);
                if batch.is_empty() {
                    return Ok(());
                }
                cce_payload(
                    &batch,
                    u32::try_from(o.pending()).unwrap_or(u32::MAX),
                    &mut payload,
                )
                .map_err(std::io::Error::other)?;
                encode::frame(
                    Direction::DeviceToServer,
                    b'C',
                    &self.imei,
                    b"CCE",
                    &payload,
                    out,
                )
                .map_err(std::io::Error::other)?;
                let n = batch.len();
                // In flight before it is written: the reply cannot overtake the record.
                o.sent(due, batch);
                n
            };
            wr.write_all(out).await?;
            stats.frames_sent.fetch_add(1, Ordering::Relaxed);
            stats.fixes_sent.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// Whether the fleet has sent its `max_frames`.
fn sent_enough(config: &FleetConfig, stats: &FleetStats) -> bool {
    config
        .max_frames
        .is_some_and(|max| stats.frames_sent.load(Ordering::Relaxed) >= max)
}

/// A draw that is true with probability `p` (never panics: NaN or ≤ 0 is never, ≥ 1 always).
fn chance(rng: &mut SmallRng, p: f64) -> bool {
    rng.random::<f64>() < p
}

/// The outbox lock is never held across an await and nothing panics under it; a poisoned
/// lock still holds consistent data.
fn lock(outbox: &Mutex<Outbox>) -> std::sync::MutexGuard<'_, Outbox> {
    outbox
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Longest reply line accepted from the gateway.
const MAX_REPLY_BYTES: usize = 256;

/// Read the gateway's replies; each `CCE`/`CCC` confirmation settles the oldest batch in
/// flight. Fails on EOF, a garbled reply, or a batch unconfirmed for `ack_timeout`;
/// returns `Ok` once stopped and nothing is in flight.
async fn read_acks<R: AsyncRead + Unpin>(
    rd: R,
    outbox: &Mutex<Outbox>,
    config: &FleetConfig,
    stats: &FleetStats,
    stop: &CancellationToken,
) -> std::io::Result<()> {
    let mut rd = BufReader::with_capacity(512, rd);
    let mut line = Vec::with_capacity(64);
    let mut stopping = false;
    loop {
        let deadline = {
            let o = lock(outbox);
            if stopping && o.unconfirmed() == 0 {
                return Ok(());
            }
            o.oldest_sent().unwrap_or_else(Instant::now) + config.ack_timeout
        };
        tokio::select! {
            r = rd.fill_buf() => {
                let buf = r?;
                if buf.is_empty() {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                let (take, complete) = match buf.iter().position(|&b| b == b'\n') {
                    Some(i) => (i + 1, true),
                    None => (buf.len(), false),
                };
                line.extend_from_slice(&buf[..take]);
                rd.consume(take);
                if line.len() > MAX_REPLY_BYTES {
                    return Err(std::io::ErrorKind::InvalidData.into());
                }
                if complete {
                    if is_batch_confirmation(&line)
                        && let Some(batch) = lock(outbox).confirmed()
                    {
                        stats.record_ack(batch.fixes.len(), batch.due);
                    }
                    line.clear();
                }
            }
            () = tokio::time::sleep_until(deadline.into()) => {
                if lock(outbox).oldest_sent().is_some_and(|s| s.elapsed() >= config.ack_timeout) {
                    stats.ack_timeouts.fetch_add(1, Ordering::Relaxed);
                    return Err(std::io::ErrorKind::TimedOut.into()); // resend after reconnect
                }
            }
            () = stop.cancelled(), if !stopping => stopping = true,
        }
    }
}

/// `@@…,<imei>,CCE,<n>*XX\r\n` (or CCC): the reply that confirms a batch.
fn is_batch_confirmation(line: &[u8]) -> bool {
    line.starts_with(b"@@")
        && (line.windows(5).any(|w| w == b",CCE,") || line.windows(5).any(|w| w == b",CCC,"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_stay_on_the_globe_and_move() {
        let cfg = FleetConfig::new(([127, 0, 0, 1], 1).into(), 1);
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

    #[test]
    fn a_realistic_report_decodes_to_what_the_device_sent() -> Result<(), String> {
        use trackgate_protocols::{Framer, Scan, decode};
        let mut cfg = FleetConfig::new(([127, 0, 0, 1], 1).into(), 4);
        cfg.simulated = Some(SimulatedTime::ending_at(
            Timestamp::now(),
            Duration::from_secs(30),
            Some(100),
        ));
        let mut d = Device::new(&cfg, 3);
        let framer = Framer::new(Direction::DeviceToServer, 4096);
        for _ in 0..100 {
            let fix = d.step(Duration::from_millis(1));
            let (mut payload, mut frame) = (Vec::new(), Vec::new());
            aaa_payload(&fix, &mut payload).map_err(|e| e.to_string())?;
            encode::frame(
                Direction::DeviceToServer,
                b'A',
                &d.imei,
                b"AAA",
                &payload,
                &mut frame,
            )
            .map_err(|e| e.to_string())?;
            let Scan::Frame(f) = framer.scan(&frame) else {
                return Err("no frame".into());
            };
            let back = decode(&f).map_err(|e| e.to_string())?;
            let got = back.fixes.first().ok_or("no fix")?;
            assert_eq!(got.time, fix.time);
            assert_eq!(got.cell, fix.cell);
            assert_eq!(got.analog, fix.analog);
            assert_eq!(
                (got.altitude_m, got.mileage_m, got.runtime_s),
                (fix.altitude_m, fix.mileage_m, fix.runtime_s)
            );
        }
        let m = d.mileage_m;
        assert!((100e6..400e6).contains(&m), "odometer {m}");
        Ok(())
    }

    #[test]
    fn a_full_batch_fits_the_gateways_default_frame_cap()
    -> Result<(), trackgate_protocols::EncodeError> {
        let cfg = FleetConfig::new(([127, 0, 0, 1], 1).into(), 1);
        let mut d = Device::new(&cfg, 0);
        let fixes: Vec<_> = (0..cfg.max_batch_fixes)
            .map(|_| d.step(Duration::from_secs(1)))
            .collect();
        let mut payload = Vec::new();
        cce_payload(&fixes, 999, &mut payload)?;
        let mut out = Vec::new();
        encode::frame(
            Direction::DeviceToServer,
            b'C',
            &d.imei,
            b"CCE",
            &payload,
            &mut out,
        )?;
        assert!(
            out.len() <= trackgate_protocols::DEFAULT_MAX_FRAME_BYTES,
            "{} bytes",
            out.len()
        );
        Ok(())
    }
}
