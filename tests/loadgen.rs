//! The load generator against a real gateway and redis-server: what it reports as
//! confirmed is stored, and what was not confirmed is sent again after a reconnect.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio_util::sync::CancellationToken;
use trackgate::loadgen::fleet::{self, FleetConfig, FleetStats};
use trackgate::pseudonym::KeyRing;

const IMEI_BASE: u64 = 351_000_000_000_000;

async fn stored(redis: &RedisServer, keys: &KeyRing, devices: usize) -> usize {
    let mut conn = redis.conn().await;
    let mut total = 0;
    for i in 0..devices {
        let p = pseudonym(keys, &format!("{:015}", IMEI_BASE + i as u64));
        total += stream_len(&mut conn, &p).await;
    }
    total
}

fn cce_fleet(addr: std::net::SocketAddr, devices: usize) -> FleetConfig {
    let mut c = FleetConfig::new(addr, devices);
    c.imei_base = IMEI_BASE;
    c.report_interval = Duration::from_millis(100);
    c.start_spread = Duration::from_millis(100);
    c.outage_probability = 0.0;
    c.cce_share = 1.0;
    c.batch_fixes = 5;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_confirmed_fix_is_stored_and_every_batch_is_timed_from_spread_sources() {
    let redis = RedisServer::start();
    let (gw, keys) = start_gateway(test_config(&redis)).await;
    let devices = 40;
    let stats = Arc::new(FleetStats::default());
    let stop = CancellationToken::new();
    let mut config = cce_fleet(gw.tracker_addrs[0], devices);
    // Spread over two loopback source addresses, as a 100k-connection run does.
    config.route.sources = vec![[127, 0, 0, 2].into(), [127, 0, 0, 3].into()];
    let run = tokio::spawn(fleet::run(config, stats.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    run.await.unwrap();

    let c = stats.counters();
    // 40 devices × 10 sends/s × 2 s × 5 fixes, give or take the ramp and the edges.
    assert!(c.fixes_sent >= 2_000, "{c:?}");
    assert_eq!(
        c.fixes_acked, c.fixes_sent,
        "drained: every batch confirmed {c:?}"
    );
    assert_eq!(c.batches_confirmed, c.frames_sent, "{c:?}");
    assert_eq!(
        c.disconnects + c.connect_errors + c.fixes_resent,
        0,
        "{c:?}"
    );
    assert_eq!(stats.total_latency().count, c.batches_confirmed);
    assert_eq!(stored(&redis, &keys, devices).await as u64, c.fixes_acked);
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconfirmed_batches_are_resent_after_a_reconnect_and_nothing_is_lost() {
    let redis = RedisServer::start();
    let (gw, keys) = start_gateway(test_config(&redis)).await;
    let devices = 10;
    let mut config = cce_fleet(gw.tracker_addrs[0], devices);
    config.ack_timeout = Duration::from_millis(800);
    let stats = Arc::new(FleetStats::default());
    let stop = CancellationToken::new();
    let run = tokio::spawn(fleet::run(config, stats.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Redis stalls: confirmations stop, devices give up on their connections and
    // reconnect, keeping every unconfirmed record.
    redis.freeze();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = stats.counters();
    assert!(during.ack_timeouts > 0, "{during:?}");
    redis.thaw();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    run.await.unwrap();

    let c = stats.counters();
    assert!(c.fixes_resent > 0, "{c:?}");
    assert!(c.fixes_acked > during.fixes_acked, "recovered: {c:?}");
    // Resent records may be stored twice (the first copy was written after the device
    // gave up on it), never zero times.
    let distinct_sent = c.fixes_sent - c.fixes_resent;
    let in_redis = stored(&redis, &keys, devices).await as u64;
    assert!(
        in_redis >= distinct_sent,
        "{in_redis} stored < {distinct_sent} distinct fixes sent: {c:?}"
    );
    assert!(in_redis <= c.fixes_sent, "{in_redis} stored > sent: {c:?}");
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aaa_only_realistic_fleet_stores_one_fix_per_report_on_its_simulated_clock() {
    use redis::AsyncCommands;
    use trackgate::loadgen::realistic::SimulatedTime;
    use trackgate::store::{F_TIME, fixes_key};

    let redis = RedisServer::start();
    let (gw, keys) = start_gateway(test_config(&redis)).await;
    let devices = 10;
    let per_device = 20u64;
    let mut config = FleetConfig::new(gw.tracker_addrs[0], devices);
    config.imei_base = IMEI_BASE;
    config.report_interval = Duration::from_millis(20);
    config.start_spread = Duration::from_millis(20);
    config.aaa_only = true;
    config.max_frames = Some(devices as u64 * per_device);
    let now = jiff::Timestamp::now();
    config.simulated = Some(SimulatedTime::ending_at(
        now,
        Duration::from_secs(30),
        Some(per_device),
    ));
    let stats = Arc::new(FleetStats::default());
    let stop = CancellationToken::new();
    let run = tokio::spawn(fleet::run(config, stats.clone(), stop.clone()));
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the fleet stops after --max-frames")
        .unwrap();

    let c = stats.counters();
    assert_eq!(c.fixes_sent, c.frames_sent, "one fix per frame: {c:?}");
    assert!(c.frames_sent >= devices as u64 * per_device, "{c:?}");
    assert_eq!(c.batches_confirmed, 0, "no CCE batches: {c:?}");
    eventually(Duration::from_secs(10), "every report stored", || async {
        stored(&redis, &keys, devices).await as u64 == c.frames_sent
    })
    .await;

    let mut conn = redis.conn().await;
    let p = pseudonym(&keys, &format!("{IMEI_BASE:015}"));
    let r: redis::streams::StreamRangeReply = conn.xrange_all(fixes_key(&p)).await.unwrap();
    let times: Vec<i64> = r
        .ids
        .iter()
        .filter_map(|e| redis::from_redis_value(e.map.get(F_TIME)?.clone()).ok())
        .collect();
    assert!(times.len() as u64 >= per_device, "{times:?}");
    // Its share of the run's reports starts that many intervals back and ends about now;
    // reports beyond its share (the fleet stops once all frames are sent) are held at
    // now, never in the future.
    let share = &times[..per_device as usize];
    assert!(
        share.windows(2).all(|w| w[1] - w[0] == 30),
        "fix times 30 s apart: {times:?}"
    );
    assert_eq!(
        share[0],
        now.as_second() - 30 * per_device as i64,
        "{times:?}"
    );
    let latest = jiff::Timestamp::now().as_second();
    assert!(times.iter().all(|&t| t <= latest), "{times:?}");
    gw.shutdown();
    gw.wait().await;
}
