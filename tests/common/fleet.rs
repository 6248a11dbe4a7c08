//! A test-side device driver: N simulated trackers send CCE batches of fixes with unique
//! fix times, keep every batch until it is confirmed, reconnect and resend what is
//! unconfirmed (as real trackers do with their cache), and record exactly which fixes
//! were ACKed. [`verify`] then compares that record with what Redis holds.
//!
//! Independent of `src/loadgen` on purpose: the suite checks the gateway, not itself.

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use redis::AsyncCommands;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use trackgate::pseudonym::KeyRing;

use super::{cce_frame, fix_at, imei, pseudonym};

#[derive(Clone, Debug)]
pub struct FleetConfig {
    pub devices: u32,
    /// `imei(first_imei + i)` for device i.
    pub first_imei: u32,
    pub fixes_per_batch: usize,
    /// Unconfirmed batches a device sends before it waits.
    pub window: usize,
    /// Pause between two batches of one device.
    pub interval: Duration,
    /// A device that hears no confirmation this long drops the connection, reconnects
    /// and resends everything unconfirmed.
    pub reply_timeout: Duration,
    /// Devices that never wait for confirmations (they write until the socket blocks):
    /// the gateway must stop reading them, not buffer them.
    pub flooders: u32,
}

impl FleetConfig {
    /// Fixes per second the fleet offers (flooders excluded).
    pub fn offered_fixes_per_s(&self) -> f64 {
        f64::from(self.devices) * self.fixes_per_batch as f64 / self.interval.as_secs_f64()
    }
}

/// Live counters, readable while the fleet runs.
#[derive(Debug, Default)]
pub struct Counters {
    pub sent_fixes: AtomicU64,
    pub acked_fixes: AtomicU64,
    pub reconnects: AtomicU64,
    /// Bytes the flooders managed to write (stops growing when the gateway stops reading).
    pub flood_bytes: AtomicU64,
}

/// What one device did.
#[derive(Debug, Default, Clone)]
pub struct DeviceLog {
    pub imei: String,
    /// Fix times sent at least once.
    pub sent: BTreeSet<i64>,
    /// Fix times the gateway confirmed.
    pub acked: BTreeSet<i64>,
    pub resent_batches: u64,
    /// Fixes still unconfirmed when the device stopped (it would keep them).
    pub unacked_at_end: usize,
}

pub struct Fleet {
    stop: Arc<AtomicBool>,
    pub counters: Arc<Counters>,
    tasks: Vec<JoinHandle<DeviceLog>>,
    pub config: FleetConfig,
    started: Instant,
}

impl Fleet {
    pub fn start(addr: SocketAddr, config: FleetConfig) -> Fleet {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let mut tasks = Vec::new();
        // Fix times start two days back, one second apart per device: unique per device
        // and well inside retention.
        let base = Timestamp::now().as_second() - 2 * 86_400;
        for i in 0..config.devices {
            tasks.push(tokio::spawn(device(
                addr,
                config.clone(),
                imei(config.first_imei + i),
                base,
                counters.clone(),
                stop.clone(),
            )));
        }
        for i in 0..config.flooders {
            tasks.push(tokio::spawn(flooder(
                addr,
                config.clone(),
                imei(config.first_imei + config.devices + i),
                base,
                counters.clone(),
                stop.clone(),
            )));
        }
        Fleet {
            stop,
            counters,
            tasks,
            config,
            started: Instant::now(),
        }
    }

    pub fn acked(&self) -> u64 {
        self.counters.acked_fixes.load(Ordering::SeqCst)
    }

    /// Wait until `n` more fixes have been confirmed (panics after `wait`).
    pub async fn wait_acked_more(&self, n: u64, wait: Duration) {
        let target = self.acked() + n;
        let deadline = Instant::now() + wait;
        while self.acked() < target {
            assert!(
                Instant::now() < deadline,
                "fleet: {} of {target} fixes confirmed after {wait:?}",
                self.acked()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stop sending; devices wait up to [`DRAIN`] for outstanding confirmations.
    /// Returns the logs and how long the fleet ran.
    pub async fn stop(self) -> (Vec<DeviceLog>, Duration) {
        let ran = self.started.elapsed();
        self.stop.store(true, Ordering::SeqCst);
        let mut logs = Vec::new();
        for t in self.tasks {
            logs.push(t.await.unwrap());
        }
        (logs, ran)
    }
}

/// Drain time devices wait for confirmations after the stop.
const DRAIN: Duration = Duration::from_secs(10);

struct Batch {
    times: Vec<i64>,
    frame: Vec<u8>,
}

fn new_batch(imei: &str, base: i64, seq: &mut i64, n: usize) -> Batch {
    let times: Vec<i64> = (0..n as i64).map(|k| base + *seq + k).collect();
    let fixes: Vec<_> = times
        .iter()
        .map(|&t| fix_at(Timestamp::from_second(t).unwrap(), (t % 100_000) as i32))
        .collect();
    *seq += n as i64;
    Batch {
        frame: cce_frame(imei, &fixes),
        times,
    }
}

/// Parse the record count of a `@@…,CCE,<n>*XX\r\n` confirmation.
fn confirmed_count(line: &[u8]) -> Option<usize> {
    let s = std::str::from_utf8(line).ok()?;
    let rest = &s[s.find(",CCE,")? + 5..];
    rest[..rest.find('*')?].parse().ok()
}

/// Pop the complete reply lines from `buf`.
fn lines(buf: &mut Vec<u8>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
        out.push(buf.drain(..end + 2).collect());
    }
    out
}

async fn device(
    addr: SocketAddr,
    cfg: FleetConfig,
    imei: String,
    base: i64,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) -> DeviceLog {
    let mut log = DeviceLog {
        imei: imei.clone(),
        ..DeviceLog::default()
    };
    let mut seq = 0i64;
    let mut unacked: VecDeque<Batch> = VecDeque::new();
    let mut conn: Option<(TcpStream, Vec<u8>)> = None;
    let mut written = 0usize; // unconfirmed batches already written on this connection
    let mut waiting_since = Instant::now();
    let mut next_send = Instant::now();
    let mut drain_deadline: Option<Instant> = None;
    let mut chunk = vec![0u8; 4096];
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        if stopping && drain_deadline.is_none() {
            drain_deadline = Some(Instant::now() + DRAIN);
        }
        if stopping && (unacked.is_empty() || drain_deadline.is_some_and(|d| Instant::now() > d)) {
            break;
        }
        if conn.is_none() {
            match tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    conn = Some((s, Vec::new()));
                    written = 0;
                    waiting_since = Instant::now();
                    if !unacked.is_empty() {
                        log.resent_batches += unacked.len() as u64;
                        counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let Some((s, buf)) = conn.as_mut() else {
            continue;
        };
        // Resend what this connection has not carried yet, then maybe one new batch.
        let mut failed = false;
        while written < unacked.len() {
            if s.write_all(&unacked[written].frame).await.is_err() {
                failed = true;
                break;
            }
            written += 1;
        }
        if !failed && !stopping && unacked.len() < cfg.window && Instant::now() >= next_send {
            let b = new_batch(&imei, base, &mut seq, cfg.fixes_per_batch);
            log.sent.extend(b.times.iter().copied());
            counters
                .sent_fixes
                .fetch_add(b.times.len() as u64, Ordering::Relaxed);
            if unacked.is_empty() {
                waiting_since = Instant::now();
            }
            let ok = s.write_all(&b.frame).await.is_ok();
            unacked.push_back(b);
            if ok {
                written += 1;
            } else {
                failed = true;
            }
            next_send = Instant::now() + cfg.interval;
        }
        if failed {
            conn = None;
            continue;
        }
        let wait = if unacked.len() < cfg.window && !stopping {
            next_send
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        } else {
            Duration::from_millis(100)
        };
        match tokio::time::timeout(wait, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                conn = None;
                continue;
            }
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                for line in lines(buf) {
                    let Some(k) = confirmed_count(&line) else {
                        panic!("unexpected reply {:?}", String::from_utf8_lossy(&line));
                    };
                    let b = unacked
                        .pop_front()
                        .expect("a confirmation for a batch that was sent");
                    assert_eq!(k, b.times.len(), "confirmation counts the batch");
                    written -= 1;
                    log.acked.extend(b.times.iter().copied());
                    counters.acked_fixes.fetch_add(k as u64, Ordering::SeqCst);
                    waiting_since = Instant::now();
                }
            }
            Err(_) => {}
        }
        if !unacked.is_empty() && waiting_since.elapsed() > cfg.reply_timeout {
            conn = None; // give up on this connection; resend on the next
        }
    }
    log.unacked_at_end = unacked.iter().map(|b| b.times.len()).sum();
    log
}

/// A device that writes batches as fast as the socket takes them, never waiting for
/// confirmations (but recording them). No reconnects: what it has not had confirmed when
/// the connection ends is simply not claimed.
async fn flooder(
    addr: SocketAddr,
    cfg: FleetConfig,
    imei: String,
    base: i64,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) -> DeviceLog {
    let mut log = DeviceLog {
        imei: imei.clone(),
        ..DeviceLog::default()
    };
    let Ok(s) = TcpStream::connect(addr).await else {
        return log;
    };
    let (mut rd, mut wr) = s.into_split();
    let inflight: Arc<Mutex<VecDeque<Vec<i64>>>> = Arc::default();
    let sent: Arc<Mutex<BTreeSet<i64>>> = Arc::default();
    let writer = {
        let inflight = inflight.clone();
        let sent = sent.clone();
        let stop = stop.clone();
        let counters = counters.clone();
        let imei = imei.clone();
        tokio::spawn(async move {
            let mut seq = 0i64;
            while !stop.load(Ordering::SeqCst) {
                let b = new_batch(&imei, base, &mut seq, cfg.fixes_per_batch);
                inflight.lock().unwrap().push_back(b.times.clone());
                sent.lock().unwrap().extend(b.times.iter().copied());
                counters
                    .sent_fixes
                    .fetch_add(b.times.len() as u64, Ordering::Relaxed);
                // Blocks while the gateway does not read: that is the point.
                if wr.write_all(&b.frame).await.is_err() {
                    break;
                }
                counters
                    .flood_bytes
                    .fetch_add(b.frame.len() as u64, Ordering::Relaxed);
            }
            wr
        })
    };
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 4096];
    let mut drain_deadline: Option<Instant> = None;
    loop {
        if stop.load(Ordering::SeqCst) {
            let d = *drain_deadline.get_or_insert_with(|| Instant::now() + DRAIN);
            if Instant::now() > d || (writer.is_finished() && inflight.lock().unwrap().is_empty()) {
                break;
            }
        }
        match tokio::time::timeout(Duration::from_millis(100), rd.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                for line in lines(&mut buf) {
                    let k = confirmed_count(&line).expect("a CCE confirmation");
                    let times = inflight.lock().unwrap().pop_front().expect("sent batch");
                    assert_eq!(k, times.len());
                    log.acked.extend(times);
                    counters.acked_fixes.fetch_add(k as u64, Ordering::SeqCst);
                }
            }
            Err(_) => {}
        }
    }
    stop.store(true, Ordering::SeqCst);
    // The writer may be stuck on a full socket: give it a moment, then abandon it.
    let abort = writer.abort_handle();
    if tokio::time::timeout(Duration::from_secs(1), writer)
        .await
        .is_err()
    {
        abort.abort();
    }
    log.sent = sent.lock().unwrap().clone();
    log.unacked_at_end = inflight.lock().unwrap().iter().map(Vec::len).sum();
    log
}

/// Fleet results checked against Redis.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub devices: usize,
    pub sent: usize,
    pub acked: usize,
    /// Distinct fixes stored.
    pub stored: usize,
    /// Stored rows, tail entries and sealed history rows (stored + duplicates).
    pub entries: usize,
    /// ACKed fixes missing from Redis: must be 0.
    pub lost: usize,
    /// Entries beyond the first for one fix time (a resent batch that had been stored).
    pub duplicates: usize,
    /// Stored fixes never sent (must be 0).
    pub phantom: usize,
    pub resent_batches: u64,
    pub unacked_at_end: usize,
}

impl Outcome {
    pub fn json(&self) -> Value {
        json!({
            "devices": self.devices,
            "sent": self.sent,
            "acked": self.acked,
            "stored": self.stored,
            "entries": self.entries,
            "lost": self.lost,
            "duplicates": self.duplicates,
            "phantom": self.phantom,
            "resent_batches": self.resent_batches,
            "unacked_at_end": self.unacked_at_end,
        })
    }
}

/// Read every device's stream and compare with what the devices were told.
pub async fn verify(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &KeyRing,
    logs: &[DeviceLog],
) -> Outcome {
    let mut o = Outcome {
        devices: logs.len(),
        ..Outcome::default()
    };
    for log in logs {
        let p = pseudonym(keys, &log.imei);
        let key = trackgate::store::fixes_key(&p);
        let mut stored = BTreeSet::new();
        let mut entries = 0usize;
        let mut tail_ids = std::collections::HashSet::new();
        let mut start = "-".to_string();
        loop {
            // Paged: a flooder's stream can be long.
            let page: redis::streams::StreamRangeReply =
                conn.xrange_count(&key, &start, "+", 2000).await.unwrap();
            for e in &page.ids {
                let t: i64 = redis::from_redis_value(e.map["t"].clone()).unwrap();
                tail_ids.insert(e.id.clone());
                if !stored.insert(t) {
                    o.duplicates += 1;
                }
            }
            entries += page.ids.len();
            match page.ids.last() {
                Some(last) if page.ids.len() == 2000 => start = format!("({}", last.id),
                _ => break,
            }
        }
        // Sealed history: every row of every chunk, read after the tail. A gateway still
        // running may have sealed a row since the tail was read: the same row (its entry
        // id) seen twice is one stored row.
        let chunks: Vec<Vec<u8>> = conn
            .zrange(trackgate::store::hist_key(&p), 0, -1)
            .await
            .unwrap();
        for c in &chunks {
            for row in trackgate::store::hist::open(keys.vault(), &p, c).unwrap() {
                if tail_ids.contains(&row.id()) {
                    continue;
                }
                entries += 1;
                if !stored.insert(row.fix_time_s.unwrap()) {
                    o.duplicates += 1;
                }
            }
        }
        o.entries += entries;
        o.sent += log.sent.len();
        o.acked += log.acked.len();
        o.stored += stored.len();
        o.lost += log.acked.difference(&stored).count();
        o.phantom += stored.difference(&log.sent).count();
        o.resent_batches += log.resent_batches;
        o.unacked_at_end += log.unacked_at_end;
    }
    o
}
