//! Storage v2 (DESIGN §5): the live tail sealed into compressed history chunks. What is
//! sealed exports exactly as it did from the tail, in time order; purges, the TTL and
//! resends stay exact inside chunks; sealing is atomic against a racing change.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use common::*;
use jiff::Timestamp;
use redis::AsyncCommands;
use trackgate::compact::{Compaction, seal_device};
use trackgate::export::{ExportQuery, Format};
use trackgate::pseudonym::{KeyRing, Pseudonym};
use trackgate::store::{chunk, fixes_key, hist, hist_key, seen_key};
use trackgate_protocols::{ExtraKey, ExtraValue, Fix};

const DAY: Duration = Duration::from_secs(86_400);

/// Seal everything received so far, at once (no `compact_after_s` wait).
fn seal_now(keys: &KeyRing) -> Compaction {
    Compaction {
        vault: keys.vault().clone(),
        after: Duration::ZERO,
        seal_max_wait: Duration::ZERO,
        interval: Duration::from_secs(1),
        chunk_max_fixes: 16,
        device_max_fixes: 10_000,
        pass_max_fixes: 1_000_000,
        future_tolerance_s: 86_400,
        scan_count: 100,
    }
}

async fn seal_all(
    conn: &mut trackgate::redis_conn::RedisConn,
    keys: &KeyRing,
    p: &Pseudonym,
) -> u64 {
    let mut sealed = 0;
    loop {
        let now = Timestamp::now().as_millisecond() + 1;
        let out = seal_device(conn, p, &seal_now(keys), now, 10_000)
            .await
            .unwrap();
        assert!(!out.conflict, "nothing races this seal");
        sealed += out.fixes;
        if !out.more {
            return sealed;
        }
    }
}

/// The device's export as NDJSON lines.
async fn export(
    conn: &trackgate::redis_conn::RedisConn,
    keys: &KeyRing,
    p: &Pseudonym,
) -> Vec<String> {
    let q = ExportQuery {
        pseudonyms: vec![p.clone()],
        from: None,
        to: None,
        ttl: DAY,
        owned_since_ms: None,
        format: Format::Ndjson,
        chunk_entries: 7,
        future_tolerance_s: 86_400,
        vault: keys.vault().clone(),
    };
    common::export_lines(conn, q).await
}

/// A fix that varies in every field kind a tracker sends: moving position, analog
/// noise, a changing cell, occasional extras.
fn varied_fix(time: Timestamp, i: i32) -> Fix<'static> {
    let mut f = fix_at(time, i * 731);
    f.speed_kmh_x10 = Some((30 + (i * 37) % 40) as u32 * 10);
    f.course_deg = Some(((i * 13) % 360) as u16);
    f.analog.battery_mv = Some((4100 + (i * 7) % 50) as u32);
    f.analog.adc_raw[0] = Some((i * 97 % 1024) as u32);
    if i % 5 == 0 {
        f.cell = None;
    }
    if i % 3 == 0 {
        f.push_extra(
            ExtraKey::Named("battery_pct"),
            ExtraValue::Int(90 - i64::from(i % 9)),
        );
    }
    f
}

/// Send `frames` from one tracker, each confirmed or at least read, then wait until the
/// device's tail holds `expect` entries.
async fn send_all(
    gw: &trackgate::gateway::Gateway,
    frames: &[Vec<u8>],
    conn: &mut trackgate::redis_conn::RedisConn,
    p: &Pseudonym,
    expect: u64,
) {
    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    for f in frames {
        t.send(f).await;
    }
    wait_tail_len(conn, p, expect, Duration::from_secs(10), "all fixes stored").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_history_exports_exactly_what_the_tail_did_in_time_order() {
    let redis = Backend::from_env();
    let (gw, keys) = start_gateway(redis.config()).await;
    let id = imei(500);
    let p = pseudonym(&keys, &id);
    let mut conn = redis.conn();
    let base = now_s().as_second() - 3_600;
    let at = |s: i64| Timestamp::from_second(base + s).unwrap();
    let mut frames = Vec::new();
    // On-time reports, then a cached batch of older fixes delivered late, then more.
    for i in 0..40 {
        frames.push(aaa_frame(
            &id,
            &varied_fix(at(1_200 + i64::from(i) * 30), i),
        ));
    }
    let cached: Vec<Fix<'static>> = (0..16)
        .map(|i| varied_fix(at(i64::from(i) * 30), 100 + i))
        .collect();
    frames.push(cce_frame(&id, &cached));
    for i in 40..50 {
        frames.push(aaa_frame(
            &id,
            &varied_fix(at(1_200 + i64::from(i) * 30), i),
        ));
    }
    send_all(&gw, &frames, &mut conn, &p, 66).await;

    let before = export(&conn, &keys, &p).await;
    assert_eq!(before.len(), 66);
    let times: Vec<String> = before
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["time"].to_string())
        .collect();
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted, "export is in fix-time order");

    // The receive-order reading of the tail (what export returned before history
    // existed) holds the same records.
    let raw: redis::streams::StreamRangeReply = conn.xrange_all(fixes_key(&p)).await.unwrap();
    let mut v1: Vec<String> = raw
        .ids
        .iter()
        .map(|e| {
            let fields: Vec<(String, Vec<u8>)> = e
                .map
                .iter()
                .map(|(k, v)| (k.clone(), redis::from_redis_value(v.clone()).unwrap()))
                .collect();
            serde_json::Value::Object(trackgate::export::entry_json(
                &e.id,
                &fields,
                keys.vault(),
                &p,
            ))
            .to_string()
        })
        .collect();
    v1.sort();
    let mut v2 = before.clone();
    v2.sort();
    assert_eq!(v1, v2, "same records as the tail's own reading");

    assert_eq!(seal_all(&mut conn, &keys, &p).await, 66);
    assert_eq!(
        conn.xlen::<_, u64>(fixes_key(&p)).await.unwrap(),
        0,
        "tail sealed"
    );
    let chunks: Vec<Vec<u8>> = conn.zrange(hist_key(&p), 0, -1).await.unwrap();
    assert!(chunks.len() >= 66 / 16, "{} chunks", chunks.len());
    let spans: Vec<(i64, i64)> = chunks
        .iter()
        .map(|c| chunk::header(c).map(|h| (h.first, h.last)).unwrap())
        .collect();
    assert!(
        spans.windows(2).all(|w| w[0].1 < w[1].0),
        "chunks never overlap in time: {spans:?}"
    );
    assert_eq!(
        export(&conn, &keys, &p).await,
        before,
        "identical after sealing"
    );
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_resent_after_a_lost_ack_is_stored_once() {
    let redis = Backend::from_env();
    let (gw, keys) = start_gateway(redis.config()).await;
    let id = imei(501);
    let p = pseudonym(&keys, &id);
    let mut conn = redis.conn();
    let base = now_s().as_second() - 600;
    let batch: Vec<Fix<'static>> = (0..10)
        .map(|i| varied_fix(Timestamp::from_second(base + i64::from(i) * 30).unwrap(), i))
        .collect();
    let frame = cce_frame(&id, &batch);
    for _ in 0..2 {
        // The device never saw the first ACK: it sends the batch again, on a new
        // connection, and this time gets its confirmation.
        let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
        t.send(&frame).await;
        let reply = t.reply(Duration::from_secs(10)).await.expect("confirmed");
        assert!(reply.contains(",CCE,10*"), "{reply}");
    }
    let in_tail: u64 = conn.xlen(fixes_key(&p)).await.unwrap();
    assert_eq!(in_tail, 10, "the tail holds each fix once");
    assert_eq!(
        export(&conn, &keys, &p).await.len(),
        10,
        "export shows each fix once"
    );

    seal_all(&mut conn, &keys, &p).await;
    // Sent again after sealing: the tail takes it, sealing drops it.
    send_all(&gw, std::slice::from_ref(&frame), &mut conn, &p, 10).await;
    assert_eq!(
        export(&conn, &keys, &p).await.len(),
        10,
        "export shows each fix once"
    );
    seal_all(&mut conn, &keys, &p).await;
    let chunks: Vec<Vec<u8>> = conn.zrange(hist_key(&p), 0, -1).await.unwrap();
    let rows: usize = chunks
        .iter()
        .map(|c| hist::open(keys.vault(), &p, c).unwrap().len())
        .sum();
    assert_eq!(rows, 10, "stored once after sealing");
    assert_eq!(export(&conn, &keys, &p).await.len(), 10);
    let seen: bool = conn.exists(seen_key(&p)).await.unwrap();
    assert!(!seen, "sealing forgot the sealed fixes' digests");
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_fixes_are_sealed_into_the_chunk_their_time_falls_in() {
    let redis = Backend::from_env();
    let (gw, keys) = start_gateway(redis.config()).await;
    let id = imei(502);
    let p = pseudonym(&keys, &id);
    let mut conn = redis.conn();
    let base = now_s().as_second() - 7_200;
    let at = |s: i64| Timestamp::from_second(base + s).unwrap();
    let frames: Vec<Vec<u8>> = (0..48)
        .map(|i| aaa_frame(&id, &varied_fix(at(i * 60 + 30), i as i32)))
        .collect();
    send_all(&gw, &frames, &mut conn, &p, 48).await;
    seal_all(&mut conn, &keys, &p).await;
    let before: Vec<Vec<u8>> = conn.zrange(hist_key(&p), 0, -1).await.unwrap();
    // A cached batch that falls between and inside the sealed chunks.
    let late: Vec<Fix<'static>> = (0..8)
        .map(|i| varied_fix(at(i64::from(i) * 360), 900 + i))
        .collect();
    send_all(&gw, &[cce_frame(&id, &late)], &mut conn, &p, 8).await;
    seal_all(&mut conn, &keys, &p).await;
    let after: Vec<Vec<u8>> = conn.zrange(hist_key(&p), 0, -1).await.unwrap();
    let spans: Vec<(i64, i64)> = after
        .iter()
        .map(|c| chunk::header(c).map(|h| (h.first, h.last)).unwrap())
        .collect();
    assert!(spans.windows(2).all(|w| w[0].1 < w[1].0), "{spans:?}");
    let rows: usize = after
        .iter()
        .map(|c| hist::open(keys.vault(), &p, c).unwrap().len())
        .sum();
    assert_eq!(rows, 56);
    // Each full chunk a late row lands in splits once; no late row gets a chunk alone.
    assert!(
        after.len() <= 2 * before.len() + 1,
        "late rows join existing chunks: {} then {}: {spans:?}",
        before.len(),
        after.len()
    );
    let lines = export(&conn, &keys, &p).await;
    assert_eq!(lines.len(), 56);
    let times: Vec<String> = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["time"].to_string())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "time order");
    gw.shutdown();
    gw.wait().await;
}

/// A purge of `p` (fix times `range`, or everything) by a customer of its own.
async fn purge(
    keys: &KeyRing,
    conn: &trackgate::redis_conn::RedisConn,
    p: &Pseudonym,
    range: Option<(i64, i64)>,
) -> trackgate::purge::Receipt {
    let customer = trackgate::registry::Customer::new("acme", "ACME", "Europe/Berlin");
    let added = trackgate::registry::Registry::new(conn.clone(), 365 * 86_400)
        .add_customer(&customer)
        .await;
    assert!(
        matches!(
            added,
            Ok(()) | Err(trackgate::registry::RegistryError::Exists(_))
        ),
        "{added:?}"
    );
    let at = |s: i64| Timestamp::from_second(s).unwrap();
    trackgate::purge::Purger::new(conn.clone(), DAY)
        .with_vault(keys.vault().clone())
        .request(
            &customer,
            &trackgate::purge::PurgeRequest {
                pseudonyms: vec![p.clone()],
                range: range.map(|(from, to)| (at(from), at(to))),
                idempotency_key: None,
            },
        )
        .await
        .unwrap()
}

/// Send `n` on-time AAA fixes one minute apart ending `ago_s` ago, and seal them.
async fn sealed_device(
    gw: &trackgate::gateway::Gateway,
    keys: &KeyRing,
    conn: &mut trackgate::redis_conn::RedisConn,
    p: &Pseudonym,
    id: &str,
    start_s: i64,
    n: i64,
) {
    let frames: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            aaa_frame(
                id,
                &varied_fix(Timestamp::from_second(start_s + i * 60).unwrap(), i as i32),
            )
        })
        .collect();
    send_all(gw, &frames, conn, p, n as u64).await;
    assert_eq!(seal_all(conn, keys, p).await, n as u64);
}

/// Fix times (s) of every row of the device's history.
async fn history_times(
    conn: &mut trackgate::redis_conn::RedisConn,
    keys: &KeyRing,
    p: &Pseudonym,
) -> Vec<i64> {
    let chunks: Vec<Vec<u8>> = conn.zrange(hist_key(p), 0, -1).await.unwrap();
    chunks
        .iter()
        .flat_map(|c| hist::open(keys.vault(), p, c).unwrap())
        .map(|r| r.fix_time_s.unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_purge_deletes_exactly_the_fixes_in_range_inside_chunks() {
    let redis = Backend::from_env();
    let (gw, keys) = start_gateway(redis.config()).await;
    let id = imei(503);
    let p = pseudonym(&keys, &id);
    let mut conn = redis.conn();
    let start = now_s().as_second() - 7_200;
    sealed_device(&gw, &keys, &mut conn, &p, &id, start, 60).await;
    // A range that cuts through chunks of 16 on both ends.
    let (from, to) = (start + 10 * 60, start + 40 * 60);
    let receipt = purge(&keys, &conn, &p, Some((from, to))).await;
    assert_eq!(receipt.state, "completed");
    assert_eq!(receipt.deleted_fixes, 31, "minutes 10 to 40 inclusive");
    let expected: Vec<i64> = (0..60)
        .map(|i| start + i * 60)
        .filter(|t| !(from..=to).contains(t))
        .collect();
    assert_eq!(
        history_times(&mut conn, &keys, &p).await,
        expected,
        "survivors rewritten"
    );
    assert_eq!(export(&conn, &keys, &p).await.len(), 29);

    // A complete purge takes the history with it.
    let receipt = purge(&keys, &conn, &p, None).await;
    assert_eq!(receipt.deleted_fixes, 29);
    assert!(!conn.exists::<_, bool>(hist_key(&p)).await.unwrap());
    assert!(export(&conn, &keys, &p).await.is_empty());
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_trims_history_by_time_across_a_chunk_boundary_with_the_current_retention() {
    let redis = Backend::from_env();
    let (gw, keys) = start_gateway(redis.config()).await;
    let id = imei(504);
    let p = pseudonym(&keys, &id);
    let mut conn = redis.conn();
    let start = now_s().as_second() - 3_000;
    sealed_device(&gw, &keys, &mut conn, &p, &id, start, 40).await;
    // The device went quiet; the retention is then lowered to 20 minutes: the sweep
    // applies it without any new write from the device.
    let mut cfg = redis.config().retention;
    cfg.ttl_s = 1_200;
    let retention = trackgate::retention::Retention::new(&cfg).with_vault(keys.vault().clone());
    let trimmed = trackgate::retention::sweep_once(&conn, &retention)
        .await
        .unwrap();
    let cutoff = now_s().as_second() - 1_200;
    let left = history_times(&mut conn, &keys, &p).await;
    assert!(
        !left.is_empty() && left.iter().all(|t| *t >= cutoff - 2),
        "{left:?}"
    );
    assert_eq!(
        trimmed as usize + left.len(),
        40,
        "exactly the expired ones"
    );
    let expected_left = (0..40).filter(|i| start + i * 60 >= cutoff).count();
    assert!(
        left.len().abs_diff(expected_left) <= 1,
        "{} left, {expected_left} expected",
        left.len()
    );
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_written_by_the_previous_version_is_sealed_by_a_new_gateway() {
    let redis = Backend::from_env();
    let id = imei(505);
    let keys = std::sync::Arc::new(trackgate::pseudonym::KeyRing::ephemeral());
    let p = pseudonym(&keys, &id);
    let mut conn = redis.conn();
    // The previous version's layout: one tail entry per fix (t, d, x), no resend digests,
    // no history.
    let base = now_s().as_second() - 1_800;
    for i in 0..40 {
        let fix = varied_fix(Timestamp::from_second(base + i * 30).unwrap(), i as i32);
        let stored =
            trackgate::store::StoredFix::from_fix(trackgate_protocols::MessageKind::Aaa, &fix);
        let mut cmd = redis::cmd("XADD");
        cmd.arg(fixes_key(&p)).arg("*");
        for (name, value) in &stored.fields {
            cmd.arg(*name);
            match value {
                trackgate::store::FieldValue::Int(v) => cmd.arg(*v),
                trackgate::store::FieldValue::Text(t) => cmd.arg(t.as_str()),
                trackgate::store::FieldValue::Bytes(b) => cmd.arg(b.as_slice()),
            };
        }
        let _: String = cmd.query_async(&mut conn).await.unwrap();
    }
    let before = export(&conn, &keys, &p).await;
    assert_eq!(before.len(), 40);

    // A new gateway, sealing after a second.
    let mut cfg = redis.config();
    cfg.storage.compact_after_s = 1;
    cfg.storage.compact_interval_s = 1;
    cfg.storage.seal_max_wait_s = 1;
    let gw = trackgate::gateway::Gateway::start(cfg, keys.clone())
        .await
        .unwrap();
    wait_tail_len(&conn, &p, 0, Duration::from_secs(15), "the old tail sealed").await;
    assert!(conn.exists::<_, bool>(hist_key(&p)).await.unwrap());
    assert_eq!(
        export(&conn, &keys, &p).await,
        before,
        "reads the same after sealing"
    );
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_chunk_is_counted_and_skipped_and_the_others_still_serve() {
    let redis = Backend::from_env();
    let (gw, keys) = start_gateway(redis.config()).await;
    let id = imei(506);
    let p = pseudonym(&keys, &id);
    let mut conn = redis.conn();
    let start = now_s().as_second() - 7_200;
    sealed_device(&gw, &keys, &mut conn, &p, &id, start, 48).await;
    let chunks: Vec<Vec<u8>> = conn.zrange(hist_key(&p), 0, -1).await.unwrap();
    assert_eq!(chunks.len(), 3);
    // The middle chunk's bytes are damaged (a bit flip past its header), a stray member
    // has an unknown codec version, another is cut short.
    let mut flipped = chunks[1].clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0xff;
    let _: () = conn.zrem(hist_key(&p), &chunks[1]).await.unwrap();
    let h = chunk::header(&chunks[1]).unwrap();
    let _: () = conn.zadd(hist_key(&p), &flipped, h.first).await.unwrap();
    let _: () = conn
        .zadd(hist_key(&p), &b"\x09garbage"[..], start + 30 * 60)
        .await
        .unwrap();
    let _: () = conn
        .zadd(hist_key(&p), &chunks[0][..10], start + 100 * 60)
        .await
        .unwrap();
    let lines = export(&conn, &keys, &p).await;
    assert_eq!(lines.len(), 32, "the two intact chunks export whole");

    // A range purge through the first chunk and into the damaged one completes: the
    // damaged chunk goes whole (nothing of it can be read), the others stay.
    let receipt = purge(&keys, &conn, &p, Some((start, start + 20 * 60))).await;
    assert_eq!(receipt.state, "completed");
    assert_eq!(
        receipt.deleted_fixes, 32,
        "16 readable, 16 in the damaged chunk"
    );
    assert_eq!(export(&conn, &keys, &p).await.len(), 16, "the last chunk");
    let (_, metrics) = common::gwproc::http_get(gw.http_addr.unwrap(), "/metrics")
        .await
        .unwrap();
    let shown: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("trackgate_chunk_errors_total"))
        .collect();
    for kind in ["version", "truncated"] {
        assert!(
            shown
                .iter()
                .any(|l| l.contains(&format!("kind=\"{kind}\"")) && l.contains("role=\"export\"")),
            "{kind} counted on export: {shown:?}"
        );
    }
    assert!(
        shown.iter().any(|l| l.contains("role=\"purge\"")),
        "counted on purge too: {shown:?}"
    );
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_consumer_sees_a_fix_within_a_second_of_its_ack() {
    let redis = Backend::from_env();
    let (gw, keys) = start_gateway(redis.config()).await;
    let id = imei(507);
    let p = pseudonym(&keys, &id);
    let key = fixes_key(&p);
    // The documented interface (docs/storage-format.md): XREAD BLOCK on the tail.
    let consumer = {
        let mut conn = redis.conn();
        let key = key.clone();
        tokio::spawn(async move {
            let opts = redis::streams::StreamReadOptions::default().block(5_000);
            let r: redis::streams::StreamReadReply =
                conn.xread_options(&[&key], &["$"], &opts).await.unwrap();
            (
                std::time::Instant::now(),
                r.keys.first().map_or(0, |k| k.ids.len()),
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    t.send(&cce_frame(&id, &[varied_fix(now_s(), 1)])).await;
    t.reply(Duration::from_secs(5)).await.expect("confirmed");
    let acked = std::time::Instant::now();
    let (seen, n) = consumer.await.unwrap();
    assert_eq!(n, 1);
    let after_ack = seen.saturating_duration_since(acked);
    assert!(
        after_ack <= Duration::from_secs(1),
        "{after_ack:?} after the ACK"
    );
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trackgate_tail_prints_a_devices_new_fixes_as_json_lines() {
    use std::io::{BufRead, Write};
    if !standalone_only("trackgate_tail_prints_a_devices_new_fixes_as_json_lines") {
        return;
    }
    let redis = RedisServer::start();
    let gw =
        common::gwproc::GatewayProcess::start(common::gwproc::GatewayOptions::new(&redis.url()))
            .await;
    let id = imei(508);
    let mut tail = std::process::Command::new(env!("CARGO_BIN_EXE_trackgate"))
        .args(["tail", "--count", "2", "--block-ms", "200", "--config"])
        .arg(gw.dir().join("trackgate.toml"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The IMEI goes in on standard input, never on the command line.
    writeln!(tail.stdin.take().unwrap(), "{id}").unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut t = Tracker::connect(gw.tracker).await;
    let base = now_s().as_second();
    t.send(&cce_frame(
        &id,
        &[
            varied_fix(Timestamp::from_second(base - 30).unwrap(), 1),
            varied_fix(Timestamp::from_second(base).unwrap(), 2),
        ],
    ))
    .await;
    t.reply(Duration::from_secs(5)).await.expect("confirmed");
    let out = tokio::task::spawn_blocking(move || {
        let lines: Vec<String> = std::io::BufReader::new(tail.stdout.take().unwrap())
            .lines()
            .map_while(Result::ok)
            .collect();
        (tail.wait().unwrap(), lines)
    });
    let (status, lines) = tokio::time::timeout(Duration::from_secs(10), out)
        .await
        .expect("tail stops after two fixes")
        .unwrap();
    assert!(status.success());
    assert_eq!(lines.len(), 2, "{lines:?}");
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["fix_id"].as_str().is_some_and(|i| i.contains('-')), "{l}");
        assert_eq!(v["type"], "CCE");
        assert!(!l.contains(&id), "no IMEI in the output");
    }
}
