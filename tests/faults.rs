//! Fault tests with real processes under steady load (issue 7): Redis killed (-9) and
//! restarted with AOF `appendfsync always`, the gateway killed (-9) and restarted,
//! Redis stalled (SIGSTOP) for 10 s, Redis unreachable at start-up, Redis out of memory
//! (`maxmemory` reached under `noeviction`) until it is raised.
//!
//! The gateway runs as a separate `trackgate serve` process; a simulated fleet
//! (`common::fleet`) records exactly which fixes were confirmed, and every test ends by
//! checking that each confirmed fix is in Redis. With `TRACKGATE_RELIABILITY_OUT` set,
//! each test writes its figures there for RELIABILITY.md (`scripts/reliability.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::fleet::{Fleet, FleetConfig, Outcome, verify};
use common::gwproc::{GatewayOptions, GatewayProcess};
use common::*;
use serde_json::json;

fn load(first_imei: u32) -> FleetConfig {
    FleetConfig {
        devices: 20,
        first_imei,
        fixes_per_batch: 10,
        window: 2,
        interval: Duration::from_millis(200),
        reply_timeout: Duration::from_secs(5),
        flooders: 0,
    }
}

/// Soak mode (`TRACKGATE_SOAK_S=<seconds>`): hold the load that long around each fault.
fn steady() -> Duration {
    std::env::var("TRACKGATE_SOAK_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(2), Duration::from_secs)
}

fn check_and_record(
    name: &str,
    fault: &str,
    cfg: &FleetConfig,
    ran: Duration,
    o: &Outcome,
    extra: serde_json::Value,
) {
    eprintln!("{name}: {o:?} ran {ran:?} {extra}");
    let mut v = json!({
        "test": name,
        "fault": fault,
        "devices": cfg.devices + cfg.flooders,
        "offered_fixes_per_s": cfg.offered_fixes_per_s(),
        "ran_s": (ran.as_secs_f64() * 10.0).round() / 10.0,
        "outcome": o.json(),
    });
    v["extra"] = extra;
    results::record(&format!("fault-{name}"), &v);
    assert!(o.acked > 0, "the load got through at all");
    assert_eq!(o.lost, 0, "every ACKed fix is in Redis");
    assert_eq!(o.phantom, 0, "nothing stored that was never sent");
    assert_eq!(o.duplicates, 0, "a resent fix is stored once");
    // Whatever is not stored is still held (unconfirmed) by its device.
    assert!(
        o.sent - o.stored <= o.unacked_at_end,
        "{} fixes neither stored nor held by their device",
        o.sent - o.stored - o.unacked_at_end
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_kill9_with_aof_loses_no_acked_fix() {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let gw = GatewayProcess::start(GatewayOptions::new(&redis.url())).await;
    let cfg = load(10_000);
    let fleet = Fleet::start(gw.tracker, cfg.clone());
    fleet.wait_acked_more(300, Duration::from_secs(30)).await;
    tokio::time::sleep(steady()).await;

    let before = fleet.acked();
    let t0 = Instant::now();
    redis.kill(); // SIGKILL: no shutdown, no last fsync
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.restart(); // the same port and dir: the AOF is replayed
    let restarted_after = t0.elapsed();
    fleet.wait_acked_more(300, Duration::from_secs(30)).await;
    let recovered_after = t0.elapsed();
    tokio::time::sleep(steady()).await;
    let (logs, ran) = fleet.stop().await;

    let mut conn = redis.conn().await;
    let o = verify(&mut conn, &gw.keys, &logs).await;
    check_and_record(
        "redis_kill9",
        "Redis kill -9 + restart (AOF always)",
        &cfg,
        ran,
        &o,
        json!({
            "acked_before_kill": before,
            "redis_down_ms": restarted_after.as_millis() as u64,
            "recovered_ms": recovered_after.as_millis() as u64,
        }),
    );
    assert!(
        o.acked as u64 > before,
        "confirmations resumed after the restart"
    );
    assert!(
        gw.log().contains("redis write failed"),
        "the outage was seen and retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_kill9_and_restart_devices_resend_and_lose_nothing() {
    let redis = RedisServer::start();
    let mut gw = GatewayProcess::start(GatewayOptions::new(&redis.url())).await;
    let cfg = load(20_000);
    let fleet = Fleet::start(gw.tracker, cfg.clone());
    fleet.wait_acked_more(300, Duration::from_secs(30)).await;
    tokio::time::sleep(steady()).await;

    // Worst case: kill the gateway with writes in flight. Redis is paused for a moment so
    // every device has unconfirmed batches at the kill (its pipelines, already sent, run
    // when Redis resumes: stored but never confirmed, so resent and stored twice).
    redis.freeze();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before = fleet.acked();
    gw.kill9();
    redis.thaw();
    tokio::time::sleep(Duration::from_millis(500)).await; // devices find nobody home
    let t0 = Instant::now();
    gw.restart().await;
    fleet.wait_acked_more(300, Duration::from_secs(30)).await;
    let recovered_after = t0.elapsed();
    tokio::time::sleep(steady()).await;
    let reconnects = fleet.counters.reconnects.load(Ordering::Relaxed);
    let (logs, ran) = fleet.stop().await;

    let mut conn = redis.conn().await;
    let o = verify(&mut conn, &gw.keys, &logs).await;
    check_and_record(
        "gateway_kill9",
        "gateway kill -9 + restart",
        &cfg,
        ran,
        &o,
        json!({
            "acked_before_kill": before,
            "reconnects_with_resend": reconnects,
            "recovered_ms": recovered_after.as_millis() as u64,
        }),
    );
    assert!(
        o.resent_batches > 0,
        "devices had unconfirmed batches at the kill and resent them"
    );
    assert!(o.acked as u64 > before);
}

/// History chunks of every device.
async fn history_chunks(redis: &RedisServer) -> u64 {
    let mut conn = redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(trackgate::store::HIST_PATTERN)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut n = 0;
    for k in keys {
        n += redis::cmd("ZCARD")
            .arg(k)
            .query_async::<u64>(&mut conn)
            .await
            .unwrap();
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_kill9_during_compaction_loses_and_duplicates_nothing() {
    let redis = RedisServer::start();
    // Seal after a second, one tail entry per script call: a pass never ends while the
    // fleet sends, so every kill lands in the middle of one.
    let mut opts = GatewayOptions::new(&redis.url());
    opts.storage = "compact_after_s = 1\ncompact_interval_s = 1\nchunk_max_fixes = 16\n\
                    compact_device_max_fixes = 1\nseal_max_wait_s = 1\n"
        .into();
    let mut gw = GatewayProcess::start(opts).await;
    let cfg = load(25_000);
    let fleet = Fleet::start(gw.tracker, cfg.clone());
    fleet.wait_acked_more(300, Duration::from_secs(30)).await;
    let mut kills = 0;
    let mut chunks_at_kills = vec![0];
    for pause_ms in [3_000u64, 2_300, 1_500] {
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        chunks_at_kills.push(history_chunks(&redis).await);
        // Writes in flight at the kill: stored, never confirmed, resent after restart.
        redis.freeze();
        tokio::time::sleep(Duration::from_millis(300)).await;
        gw.kill9();
        redis.thaw();
        kills += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
        gw.restart().await;
        fleet.wait_acked_more(100, Duration::from_secs(30)).await;
    }
    tokio::time::sleep(steady()).await;
    let (logs, ran) = fleet.stop().await;
    // What the last process left in the tail is sealed by one more, clean pass.
    let store = trackgate::redis_conn::connect(&test_config(&redis).redis).unwrap();
    trackgate::compact::seal_everything(
        &store,
        &trackgate::config::StorageConfig::default(),
        gw.keys.vault().clone(),
    )
    .await
    .unwrap();

    let mut conn = redis.conn().await;
    let o = verify(&mut conn, &gw.keys, &logs).await;
    assert!(
        o.resent_batches > 0,
        "devices resent what was stored unconfirmed"
    );
    check_and_record(
        "gateway_kill9_compaction",
        "gateway kill -9 during compaction, 3 times",
        &cfg,
        ran,
        &o,
        json!({ "kills": kills }),
    );
    assert!(
        chunks_at_kills.windows(2).all(|w| w[0] < w[1]),
        "compaction was sealing when each kill came: chunks {chunks_at_kills:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stalled_10s_memory_bounded_nothing_acked_early_full_recovery() {
    let redis = RedisServer::start();
    let gw = GatewayProcess::start(GatewayOptions::new(&redis.url())).await;
    let cfg = FleetConfig {
        reply_timeout: Duration::from_secs(60), // patient devices: they wait out the stall
        window: 4,
        flooders: 4,
        ..load(30_000)
    };
    let fleet = Fleet::start(gw.tracker, cfg.clone());
    fleet.wait_acked_more(300, Duration::from_secs(30)).await;
    let mut rss_before = 0;
    let settle = Instant::now() + steady();
    while Instant::now() < settle {
        rss_before = rss_before.max(gw.rss_kib());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    redis.freeze();
    let t0 = Instant::now();
    // Confirmations Redis gave before the freeze may still be on their way: 300 ms.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let acked_at_freeze = fleet.acked();
    let mut rss_peak = 0;
    let mut flood_mid = 0;
    while t0.elapsed() < Duration::from_secs(10) {
        rss_peak = rss_peak.max(gw.rss_kib());
        if flood_mid == 0 && t0.elapsed() >= Duration::from_secs(5) {
            flood_mid = fleet.counters.flood_bytes.load(Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let acked_at_thaw = fleet.acked();
    let flood_end = fleet.counters.flood_bytes.load(Ordering::Relaxed);
    let readyz_frozen = gw.get("/readyz").await.map(|(s, _)| s);
    redis.thaw();
    let t1 = Instant::now();
    fleet.wait_acked_more(300, Duration::from_secs(30)).await;
    let recovered_after = t1.elapsed();
    tokio::time::sleep(steady()).await;
    let (logs, ran) = fleet.stop().await;

    let mut conn = redis.conn().await;
    let o = verify(&mut conn, &gw.keys, &logs).await;
    let growth_kib = rss_peak.saturating_sub(rss_before);
    check_and_record(
        "redis_stall",
        "Redis SIGSTOP 10 s + SIGCONT",
        &cfg,
        ran,
        &o,
        json!({
            "acked_during_stall": acked_at_thaw - acked_at_freeze,
            "rss_before_kib": rss_before,
            "rss_peak_stall_kib": rss_peak,
            "flood_bytes_last_5s_of_stall": flood_end - flood_mid,
            "recovered_ms": recovered_after.as_millis() as u64,
        }),
    );
    assert_eq!(
        acked_at_thaw, acked_at_freeze,
        "nothing is confirmed while Redis cannot confirm it"
    );
    assert_ne!(readyz_frozen, Some(200), "not ready while Redis is stalled");
    assert!(
        growth_kib < 16 * 1024,
        "memory bounded during the stall: grew {growth_kib} KiB"
    );
    // Backpressure: the flooders' sockets stopped being read (kernel buffers full), so
    // what they could write in the second half of the stall is small.
    assert!(
        flood_end - flood_mid < 256 * 1024,
        "gateway kept reading flooders during the stall: {} bytes",
        flood_end - flood_mid
    );
    assert!(
        o.acked as u64 > acked_at_thaw,
        "full recovery after SIGCONT"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unreachable_at_startup_gateway_not_ready_then_recovers() {
    let mut redis = RedisServer::unstarted(free_port());
    let gw = GatewayProcess::start(GatewayOptions::new(&redis.url())).await;
    assert_eq!(gw.get("/healthz").await.map(|(s, _)| s), Some(200));
    assert_eq!(
        gw.get("/readyz").await.map(|(s, _)| s),
        Some(503),
        "not ready without Redis"
    );
    let cfg = load(40_000);
    let fleet = Fleet::start(gw.tracker, cfg.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fleet.acked(), 0, "nothing confirmed without Redis");
    let sent_while_down = fleet.counters.sent_fixes.load(Ordering::Relaxed);
    assert!(sent_while_down > 0);

    let t0 = Instant::now();
    redis.restart(); // first start
    eventually(Duration::from_secs(15), "/readyz turns 200", || async {
        gw.get("/readyz").await.map(|(s, _)| s) == Some(200)
    })
    .await;
    let ready_after = t0.elapsed();
    fleet.wait_acked_more(300, Duration::from_secs(30)).await;
    let recovered_after = t0.elapsed();
    tokio::time::sleep(steady()).await;
    let (logs, ran) = fleet.stop().await;

    let mut conn = redis.conn().await;
    let o = verify(&mut conn, &gw.keys, &logs).await;
    check_and_record(
        "redis_absent_at_start",
        "Redis unreachable at start-up",
        &cfg,
        ran,
        &o,
        json!({
            "sent_while_down": sent_while_down,
            "ready_ms": ready_after.as_millis() as u64,
            "recovered_ms": recovered_after.as_millis() as u64,
        }),
    );
    // What the devices sent while Redis was absent got stored once it came.
    let first = &logs[0];
    let p = pseudonym(&gw.keys, &first.imei);
    assert!(stream_len(&mut conn, &p).await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_out_of_memory_holds_writes_back_logs_one_episode_and_loses_no_acked_fix() {
    let redis = RedisServer::start_with(&["--maxmemory-policy", "noeviction"]);
    let gw = GatewayProcess::start(GatewayOptions::new(&redis.url())).await;
    let cfg = FleetConfig {
        interval: Duration::from_millis(100), // fills the room below in about a second
        reply_timeout: Duration::from_secs(60), // patient devices: they wait it out
        ..load(50_000)
    };
    let fleet = Fleet::start(gw.tracker, cfg.clone());
    fleet.wait_acked_more(300, Duration::from_secs(30)).await;

    // A small maxmemory, 256 KiB above what is used now.
    let mut conn = redis.conn().await;
    let used = info_u64(&mut conn, "memory", "used_memory").await;
    config_set(&mut conn, "maxmemory", &(used + 256 * 1024).to_string()).await;
    let t0 = Instant::now();
    eventually(Duration::from_secs(20), "/readyz: redis_oom", || async {
        gw.get("/readyz")
            .await
            .is_some_and(|(s, b)| s == 503 && b.contains("redis_oom"))
    })
    .await;
    let full_after = t0.elapsed();
    assert_eq!(gw.metric("trackgate_redis_oom").await, 1.0);
    tokio::time::sleep(steady()).await; // every device retries, several times
    let refused = gw.metric("trackgate_redis_oom_refused_total").await;
    assert!(
        refused >= f64::from(cfg.devices),
        "the devices' writes were refused and retried: {refused}"
    );
    let acked_while_full = fleet.acked();

    // Room again: the held writes go through, and the episode ends.
    let t1 = Instant::now();
    config_set(&mut conn, "maxmemory", "0").await;
    fleet.wait_acked_more(300, Duration::from_secs(20)).await;
    let recovered_after = t1.elapsed();
    eventually(Duration::from_secs(10), "/readyz: ready again", || async {
        gw.get("/readyz").await.map(|(s, _)| s) == Some(200)
    })
    .await;
    assert_eq!(gw.metric("trackgate_redis_oom").await, 0.0);
    tokio::time::sleep(steady()).await;
    let (logs, ran) = fleet.stop().await;

    let o = verify(&mut conn, &gw.keys, &logs).await;
    let log = gw.log();
    let lines =
        |needle: &str| -> Vec<&str> { log.lines().filter(|l| l.contains(needle)).collect() };
    let started = lines("out of memory");
    let ended = lines("out-of-memory episode is over");
    check_and_record(
        "redis_oom",
        "Redis out of memory (maxmemory reached, noeviction) until raised",
        &cfg,
        ran,
        &o,
        json!({
            "full_after_ms": full_after.as_millis() as u64,
            "oom_refused_attempts": refused,
            "recovered_ms": recovered_after.as_millis() as u64,
            "oom_log_lines": started.len() + ended.len(),
        }),
    );
    assert!(o.acked as u64 > acked_while_full, "writing resumed");
    // One line when the episode starts, one when it ends: not one per device or retry.
    assert_eq!(started.len(), 1, "{started:?}");
    assert!(started[0].contains("WARN") && started[0].contains("devices_waiting"));
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert!(ended[0].contains("INFO") && ended[0].contains("lasted_ms"));
    assert!(
        lines("OOM").len() <= 1,
        "the refusals themselves are not logged: {:?}",
        lines("OOM")
    );
}
