//! Fast-path purge latency for one device holding 90 days at one fix per 10 s (777,600
//! fixes): complete purge and a one-day range purge, each on a fresh copy of the stream,
//! against a redis-server this bench starts itself. A load benchmark (not criterion):
//! each sample needs a fresh 777,600-entry stream, so samples are few and reported as
//! percentiles.
//!
//! `cargo bench --bench purge` (TRACKGATE_PURGE_SAMPLES to change the sample count).

#![allow(clippy::expect_used, clippy::unwrap_used)] // bench set-up fails loudly

use std::time::{Duration, Instant};

use jiff::Timestamp;
use trackgate::loadgen::fleet::sample_fixes;
use trackgate::pseudonym::{Imei, KeyRing};
use trackgate::purge::{PurgeRequest, Purger};
use trackgate::redis_child::RedisChild;
use trackgate::registry::Customer;
use trackgate::store::{FieldValue, StoredFix, fixes_key};
use trackgate_protocols::{Fix, MessageKind};

const FIXES: i64 = 777_600;
const STEP_MS: i64 = 10_000;
const TEMPLATE: &str = "bench:template";

/// A plausible fix at Unix second `t` (positions from the simulated fleet's route).
fn fix(route: &[Fix<'static>], t: i64, i: i64) -> Fix<'static> {
    let mut f = route[i as usize % route.len()].clone();
    f.time = Timestamp::from_second(t).ok();
    f
}

fn pct(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort_unstable();
    samples[((samples.len() as f64 - 1.0) * q).round() as usize]
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` / listing: nothing to run
    }
    let samples: usize = std::env::var("TRACKGATE_PURGE_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let redis = RedisChild::start().await.expect("redis-server");
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();

    // The template stream: 90 days ending now, entry ids = receive times.
    let start_ms = Timestamp::now().as_millisecond() - FIXES * STEP_MS;
    let route = sample_fixes(9, 10_000);
    let filled = Instant::now();
    for chunk in (0..FIXES).collect::<Vec<_>>().chunks(10_000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            let ms = start_ms + i * STEP_MS;
            let s = StoredFix::from_fix(MessageKind::Aaa, &fix(&route, ms / 1000, i));
            let cmd = pipe.cmd("XADD").arg(TEMPLATE).arg(format!("{ms}-0"));
            for (k, v) in &s.fields {
                cmd.arg(*k);
                match v {
                    FieldValue::Int(n) => cmd.arg(*n),
                    FieldValue::Text(t) => cmd.arg(t.as_str()),
                    FieldValue::Bytes(b) => cmd.arg(b.as_slice()),
                };
            }
            cmd.ignore();
        }
        let _: () = pipe.query_async(&mut conn).await.unwrap();
    }
    let mem: String = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(TEMPLATE)
        .query_async(&mut conn)
        .await
        .map(|v: i64| v.to_string())
        .unwrap_or_default();
    println!(
        "template: {FIXES} fixes in {:.1?}, MEMORY USAGE {mem} B",
        filled.elapsed()
    );

    let keys = KeyRing::ephemeral();
    let p = keys.pseudonym(&Imei::new("350000000000001").unwrap());
    let customer = Customer::new("bench", "Bench", "UTC");
    let purger = Purger::new(conn.clone(), Duration::from_secs(90 * 86400));
    let day_from = Timestamp::from_second((start_ms + 45 * 86_400_000) / 1000).unwrap();
    let day_to = Timestamp::from_second(day_from.as_second() + 86_399).unwrap();

    for (name, range) in [
        ("complete", None),
        ("one-day range", Some((day_from, day_to))),
    ] {
        let mut lat = Vec::with_capacity(samples);
        let mut finish = Vec::with_capacity(samples);
        let (mut fast_deleted, mut deleted) = (0, 0);
        for _ in 0..samples {
            let _: () = redis::cmd("COPY")
                .arg(TEMPLATE)
                .arg(fixes_key(&p))
                .arg("REPLACE")
                .query_async(&mut conn)
                .await
                .unwrap();
            let req = PurgeRequest {
                pseudonyms: vec![p.clone()],
                range,
                idempotency_key: None,
            };
            let t = Instant::now();
            let r = purger.request(&customer, &req).await.unwrap();
            lat.push(t.elapsed());
            fast_deleted = r.deleted_fixes;
            // A long stream's range purge is finished by the worker (within the deadline).
            let t = Instant::now();
            purger.work_once().await.unwrap();
            finish.push(t.elapsed());
            let done = purger.receipt(&r.id).await.unwrap().unwrap();
            assert_eq!(done.state, "completed");
            deleted = done.deleted_fixes;
        }
        let (p50, p99, max) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99), pct(&mut lat, 1.0));
        let worker_p50 = pct(&mut finish, 0.5);
        println!(
            "purge {name:>14}: fast path p50 {p50:>9.2?} p99 {p99:>9.2?} max {max:>9.2?} (deleted {fast_deleted}); \
             completed: {deleted} of {FIXES} deleted, worker pass p50 {worker_p50:.2?} ({samples} samples, incl. journal + audit)"
        );
    }
    redis.stop().await;
}
