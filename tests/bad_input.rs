//! Bad input (issue 7): every class in `tests/bad_input/*.hex` is replayed against a
//! gateway process and must get its typed rejection and metric (read from `/metrics`),
//! never a panic, never unbounded memory. Plus slowloris and idle connections cut off by
//! the timeouts, and a connection flood above the cap refused fast while the devices
//! already connected keep being served.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::fleet::{Fleet, FleetConfig, verify};
use common::gwproc::{GatewayOptions, GatewayProcess};
use common::*;
use serde_json::json;
use tokio::io::AsyncWriteExt;

/// The corpus's IMEI (fake) and a valid frame from it that asks for a reply.
const CORPUS_IMEI: &str = "350000000000099";
const PROBE: &[u8] = b"$$z27,350000000000099,AAC,1*B9\r\n";

struct Case {
    file: String,
    class: String,
    expect: String,
    stays_open: bool,
    repeat: Duration,
    eof: bool,
    bytes: Vec<u8>,
}

fn corpus() -> Vec<Case> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad_input");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "hex"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).unwrap();
            let header = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
                    .map(str::to_owned)
            };
            let hex: String = text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
                .collect();
            Case {
                file: p.file_name().unwrap().to_string_lossy().into_owned(),
                class: header("class").expect("class"),
                expect: header("expect").expect("expect"),
                stays_open: match header("connection").as_deref() {
                    Some("open") => true,
                    Some("closed") => false,
                    other => panic!("{}: connection {other:?}", p.display()),
                },
                repeat: Duration::from_secs(header("repeat_s").map_or(0, |s| s.parse().unwrap())),
                eof: header("eof").as_deref() == Some("yes"),
                bytes: hex::decode(hex).unwrap(),
            }
        })
        .collect()
}

fn short_timeouts(redis: &RedisServer) -> GatewayOptions {
    let mut o = GatewayOptions::new(&redis.url());
    o.limits = "handshake_timeout_s = 2\nidle_timeout_s = 3\nshutdown_grace_s = 5\n".into();
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_class_gets_its_typed_rejection_and_metric() {
    let redis = RedisServer::start();
    let mut gw = GatewayProcess::start(short_timeouts(&redis)).await;
    let cases = corpus();
    assert!(cases.len() >= 12, "one file per class at least");
    let rss_start = gw.rss_kib();
    let mut rss_peak = rss_start;
    let mut rows = Vec::new();
    for case in &cases {
        let before = gw.metric(&case.expect).await;
        let mut t = Tracker::connect(gw.tracker).await;
        let mut sent = 0usize;
        if case.repeat > Duration::ZERO {
            // Endless input: keep sending until the gateway hangs up (or time is up).
            let until = Instant::now() + case.repeat;
            while Instant::now() < until {
                if t.stream.write_all(&case.bytes).await.is_err() {
                    break;
                }
                sent += case.bytes.len();
                rss_peak = rss_peak.max(gw.rss_kib());
            }
        } else {
            t.send(&case.bytes).await;
            sent = case.bytes.len();
        }
        if case.eof {
            t.stream.shutdown().await.unwrap();
        }
        if case.stays_open {
            t.send(PROBE).await;
            // A CCE batch with a bad record is still confirmed first (the device counts
            // every record it sent; otherwise it would resend the batch forever).
            let mut replies = Vec::new();
            while let Some(r) = t.reply(Duration::from_secs(5)).await {
                let done = r.contains(",AAC,1*");
                replies.push(r);
                if done {
                    break;
                }
            }
            assert!(
                replies.last().is_some_and(|r| r.contains(",AAC,1*")),
                "{}: the connection survives and is still served: {replies:?}",
                case.file
            );
        } else {
            let started = Instant::now();
            assert!(
                t.closed_within(Duration::from_secs(6)).await,
                "{}: the gateway closes the connection",
                case.file
            );
            assert!(started.elapsed() < Duration::from_secs(4), "{}", case.file);
        }
        let mut after = before;
        let deadline = Instant::now() + Duration::from_secs(5);
        while after <= before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            after = gw.metric(&case.expect).await;
        }
        assert!(
            after > before,
            "{} ({}): {} did not grow ({before} -> {after})",
            case.file,
            case.class,
            case.expect
        );
        rss_peak = rss_peak.max(gw.rss_kib());
        rows.push(json!({
            "file": case.file,
            "class": case.class,
            "metric": case.expect,
            "metric_delta": after - before,
            "connection": if case.stays_open { "kept, still served" } else { "closed" },
            "bytes_sent": sent,
        }));
    }
    assert!(gw.alive(), "the gateway survived the corpus");
    assert_eq!(gw.get("/healthz").await.map(|(s, _)| s), Some(200));
    let log = gw.log();
    assert!(!log.contains("panicked"), "no panic: {log}");
    assert!(log.contains("frame rejected"), "rejections are logged");
    assert!(
        log.contains("unknown command"),
        "the unknown command is logged"
    );
    assert!(!log.contains(CORPUS_IMEI), "logs carry no IMEI");
    let metrics = gw.get("/metrics").await.unwrap().1;
    assert!(!metrics.contains(CORPUS_IMEI), "metrics carry no IMEI");
    let growth = rss_peak.saturating_sub(rss_start);
    assert!(growth < 16 * 1024, "memory bounded: grew {growth} KiB");
    results::record(
        "bad-input",
        &json!({ "cases": rows, "rss_start_kib": rss_start, "rss_peak_kib": rss_peak }),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_idle_connections_are_cut_off_by_the_timeouts() {
    let redis = RedisServer::start();
    let gw = GatewayProcess::start(short_timeouts(&redis)).await;
    let frame = aaa_frame(&imei(700), &fix_at(now_s(), 0));
    // 1 byte/s from a device that never identified itself: the handshake timeout (2 s).
    let drip = |mut t: Tracker<tokio::net::TcpStream>, frame: Vec<u8>| async move {
        let started = Instant::now();
        for b in frame {
            if t.stream.write_all(&[b]).await.is_err() {
                break;
            }
            if t.closed_within(Duration::from_secs(1)).await {
                return started.elapsed();
            }
        }
        panic!("slowloris never cut off");
    };
    let anonymous = tokio::spawn(drip(Tracker::connect(gw.tracker).await, frame.clone()));
    // The same from an identified device: the idle timeout (3 s); a half frame is not
    // activity.
    let mut known = Tracker::connect(gw.tracker).await;
    known
        .send(&cce_frame(&imei(701), &[fix_at(now_s(), 0)]))
        .await;
    assert!(known.reply(Duration::from_secs(5)).await.is_some());
    let known_frame = cce_frame(&imei(701), &[fix_at(now_s(), 1)]);
    let identified = tokio::spawn(drip(known, known_frame));
    // And one that just goes quiet.
    let mut idle = Tracker::connect(gw.tracker).await;
    idle.send(&cce_frame(&imei(702), &[fix_at(now_s(), 0)]))
        .await;
    assert!(idle.reply(Duration::from_secs(5)).await.is_some());
    let quiet = Instant::now();
    assert!(idle.closed_within(Duration::from_secs(6)).await);
    let idle_after = quiet.elapsed();

    let anonymous_after = anonymous.await.unwrap();
    let identified_after = identified.await.unwrap();
    assert!(
        (Duration::from_millis(1500)..Duration::from_secs(4)).contains(&anonymous_after),
        "{anonymous_after:?}"
    );
    assert!(
        (Duration::from_millis(2500)..Duration::from_secs(5)).contains(&identified_after),
        "{identified_after:?}"
    );
    assert!(
        (Duration::from_millis(2500)..Duration::from_secs(5)).contains(&idle_after),
        "{idle_after:?}"
    );
    let m = gw.get("/metrics").await.unwrap().1;
    let closed = |reason: &str| {
        common::gwproc::metric_value(
            &m,
            &format!("trackgate_connections_closed_total{{reason=\"{reason}\""),
        )
    };
    assert!(closed("handshake_timeout") >= 1.0);
    assert!(closed("idle_timeout") >= 2.0);
    results::record(
        "slowloris",
        &json!({
            "slowloris_unidentified_closed_s": anonymous_after.as_secs_f64(),
            "slowloris_identified_closed_s": identified_after.as_secs_f64(),
            "idle_closed_s": idle_after.as_secs_f64(),
        }),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_flood_above_the_cap_is_refused_fast_while_devices_are_served() {
    let redis = RedisServer::start();
    let mut opts = short_timeouts(&redis);
    opts.limits.push_str("max_connections = 10\n");
    let gw = GatewayProcess::start(opts).await;
    let cfg = FleetConfig {
        devices: 5,
        first_imei: 800,
        fixes_per_batch: 5,
        window: 1,
        interval: Duration::from_millis(50),
        reply_timeout: Duration::from_secs(5),
        flooders: 0,
    };
    let fleet = Fleet::start(gw.tracker, cfg);
    fleet.wait_acked_more(50, Duration::from_secs(20)).await;

    const FLOOD: usize = 300;
    let acked_before = fleet.acked();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..FLOOD {
        let addr = gw.tracker;
        tasks.push(tokio::spawn(async move {
            let Ok(s) = tokio::net::TcpStream::connect(addr).await else {
                return Some(Duration::ZERO); // refused outright counts as refused
            };
            let mut t = Tracker::new(s);
            let opened = Instant::now();
            // Held open and silent: only the gateway can end it.
            t.closed_within(Duration::from_secs(5))
                .await
                .then(|| opened.elapsed())
        }));
    }
    let mut times: Vec<Duration> = Vec::new();
    for t in tasks {
        times.push(t.await.unwrap().expect("every flood connection is closed"));
    }
    let flood_s = started.elapsed();
    times.sort();
    let fast = times
        .iter()
        .filter(|d| **d < Duration::from_millis(1000))
        .count();
    let p50 = times[times.len() / 2];
    let acked_during = fleet.acked() - acked_before;
    let (logs, _) = fleet.stop().await;
    let o = verify(&mut redis.conn().await, &gw.keys, &logs).await;
    let rejected = gw
        .metric("trackgate_connections_rejected_total{reason=\"max_connections\"")
        .await;
    results::record(
        "flood",
        &json!({
            "flood_connections": FLOOD,
            "cap": 10,
            "refused_within_1000ms": fast,
            "p50_close_ms": p50.as_millis() as u64,
            "rejected_metric": rejected,
            "fleet_acked_during_flood": acked_during,
            "fleet_lost": o.lost,
            "flood_s": flood_s.as_secs_f64(),
        }),
    );
    // At most the 5 free slots hold a flood connection until the handshake timeout.
    assert!(fast >= FLOOD - 5, "{fast} of {FLOOD} refused fast");
    assert!(rejected >= (FLOOD - 5) as f64, "counted: {rejected}");
    assert!(acked_during > 0, "existing devices kept being served");
    assert_eq!(o.lost, 0);
}
