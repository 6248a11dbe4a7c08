//! Payloads at rest (DESIGN §9, issue 17): history chunks are sealed with the month's data
//! key; what Redis holds of them (and so its AOF, RDB and replicas) carries no coordinate
//! in any encoding; a chunk whose key is gone, or that was tampered with, is a typed error
//! that does not stop the device's other chunks; the key file's data keys are managed by
//! `trackgate keys` and `serve` refuses to run without this and next month's.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use redis::AsyncCommands;
use trackgate::compact::{Compaction, compact_once};
use trackgate::config::StorageConfig;
use trackgate::export::{ExportQuery, Format};
use trackgate::pseudonym::{KeyRing, Pseudonym};
use trackgate::store::vault::{Month, Vault, VaultError};
use trackgate::store::{chunk, fixes_key, hist, hist_key};

const LAT0: i32 = 51_512_345;
const LON0: i32 = -123_456;

/// 40 AAA reports of one device, a minute apart, at distinctive coordinates.
async fn stored_device(
    gw: &trackgate::gateway::Gateway,
    conn: &trackgate::redis_conn::RedisConn,
    keys: &KeyRing,
    n: u32,
) -> Pseudonym {
    let id = imei(800 + n);
    let p = pseudonym(keys, &id);
    let start = now_s().as_second() - 3_600;
    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    for i in 0..40 {
        let mut f = fix_at(jiff::Timestamp::from_second(start + i * 60).unwrap(), 0);
        f.lat_e6 = Some(LAT0 + i as i32 * 7);
        f.lon_e6 = Some(LON0 - i as i32 * 5);
        t.send(&aaa_frame(&id, &f)).await;
    }
    wait_tail_len(conn, &p, 40, Duration::from_secs(10), "all fixes stored").await;
    p
}

/// Seal everything now, in chunks of at most 16 rows.
async fn seal(conn: &trackgate::redis_conn::RedisConn, vault: Arc<Vault>) {
    let s = Compaction {
        after: Duration::ZERO,
        seal_max_wait: Duration::ZERO,
        chunk_max_fixes: 16,
        ..Compaction::new(&StorageConfig::default(), vault)
    };
    while compact_once(conn, &s).await.unwrap() > 0 {}
}

/// Every byte form a coordinate could take in a chunk: decimal text, the 1e-6 integer as
/// text, LEB128 of it and of its zigzag, the codec's odd token, little-endian i32/i64.
fn needles(v: i32) -> Vec<Vec<u8>> {
    let leb = |mut x: u64| {
        let mut out = Vec::new();
        loop {
            let b = (x & 0x7f) as u8;
            x >>= 7;
            if x == 0 {
                out.push(b);
                return out;
            }
            out.push(b | 0x80);
        }
    };
    let zz = ((i64::from(v) << 1) ^ (i64::from(v) >> 63)) as u64;
    vec![
        format!("{:.6}", f64::from(v) / 1e6).into_bytes(),
        v.to_string().into_bytes(),
        leb(v as u32 as u64),
        leb(zz),
        leb(((zz - 1) << 1) | 1),
        v.to_le_bytes().to_vec(),
        i64::from(v).to_le_bytes().to_vec(),
    ]
}

fn contains_any(hay: &[u8], values: &[i32]) -> bool {
    values
        .iter()
        .flat_map(|v| needles(*v))
        .any(|n| hay.windows(n.len()).any(|w| w == n.as_slice()))
}

async fn device_export(
    conn: &trackgate::redis_conn::RedisConn,
    vault: Arc<Vault>,
    p: &Pseudonym,
) -> Vec<String> {
    let q = ExportQuery {
        pseudonyms: vec![p.clone()],
        from: None,
        to: None,
        ttl: Duration::from_secs(90 * 86_400),
        owned_since_ms: None,
        format: Format::Ndjson,
        chunk_entries: 100,
        future_tolerance_s: 300,
        vault,
    };
    common::export_lines(conn, q).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_history_holds_no_coordinate_and_dies_with_its_month_key() {
    let redis = RedisServer::start();
    let mut c = redis.conn().await;
    // DUMP and RDB compress long strings (LZF), which would hide clear bytes from a scan;
    // the AOF records every write from the gateway's start on (after the scratch entry
    // below).
    config_set(&mut c, "rdbcompression", "no").await;
    let (gw, keys) = start_gateway(test_config(&redis)).await;
    let conn = trackgate::redis_conn::connect(&test_config(&redis).redis).unwrap();
    let lats: Vec<i32> = (0..40).map(|i| LAT0 + i * 7).collect();
    let lons: Vec<i32> = (0..40).map(|i| LON0 - i * 5).collect();

    // The scan sees clear values in a DUMP: a clear tail entry of the same fix can fail it.
    let mut clear = fix_at(now_s(), 0);
    clear.lat_e6 = Some(LAT0);
    let clear =
        trackgate::store::StoredFix::from_fix(trackgate_protocols::MessageKind::Aaa, &clear);
    let d = clear
        .fields
        .iter()
        .find_map(|(n, v)| match v {
            trackgate::store::FieldValue::Bytes(b) if *n == "d" => Some(b.clone()),
            _ => None,
        })
        .unwrap();
    let _: () = c.xadd("scratch", "*", &[("d", d)]).await.unwrap();
    let scratch: Vec<u8> = redis::cmd("DUMP")
        .arg("scratch")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        contains_any(&scratch, &[LAT0]),
        "the scan sees a DUMP's clear values"
    );
    let _: () = c.del("scratch").await.unwrap();
    config_set(&mut c, "appendonly", "yes").await;

    // Every key's DUMP while the fixes are in the live tail, then once they are sealed.
    let p = stored_device(&gw, &conn, &keys, 1).await;
    let dump_all = |mut c: redis::aio::MultiplexedConnection| async move {
        let keys: Vec<String> = c.keys("*").await.unwrap();
        let mut all = Vec::new();
        for k in keys {
            let d: Vec<u8> = redis::cmd("DUMP")
                .arg(&k)
                .query_async(&mut c)
                .await
                .unwrap();
            all.extend(d);
        }
        all
    };
    let tail_dumps = dump_all(c.clone()).await;
    assert!(
        !contains_any(&tail_dumps, &lats) && !contains_any(&tail_dumps, &lons),
        "a coordinate in a DUMP of the live tail"
    );
    seal(&conn, keys.vault().clone()).await;
    let tail: u64 = c.xlen(fixes_key(&p)).await.unwrap();
    assert_eq!(tail, 0, "everything sealed");

    // The scan finds coordinates in a clear chunk of the same rows: it can fail.
    let members: Vec<Vec<u8>> = c.zrange(hist_key(&p), 0, -1).await.unwrap();
    assert!(members.len() >= 3, "{} chunks", members.len());
    let rows: Vec<_> = members
        .iter()
        .flat_map(|m| hist::open(keys.vault(), &p, m).unwrap())
        .collect();
    assert_eq!(rows.len(), 40);
    assert!(
        contains_any(&chunk::encode(&rows), &lats[..1]),
        "the scan sees clear chunks"
    );

    // What Redis holds: the members, every key's DUMP, the RDB and the AOF.
    let _: () = redis::cmd("SAVE").query_async(&mut c).await.unwrap();
    let rdb = std::fs::read(redis.dir().join("dump.rdb")).unwrap();
    let mut aof = Vec::new();
    for f in std::fs::read_dir(redis.dir().join("appendonlydir")).unwrap() {
        aof.extend(std::fs::read(f.unwrap().path()).unwrap());
    }
    assert!(
        aof.len() > 10_000,
        "the AOF recorded the writes: {} bytes",
        aof.len()
    );
    let all_dumps = dump_all(c.clone()).await;
    for (what, bytes) in [
        ("members", members.concat()),
        ("DUMP", all_dumps),
        ("RDB", rdb),
        ("AOF", aof),
    ] {
        assert!(!contains_any(&bytes, &lats), "a latitude in the {what}");
        assert!(!contains_any(&bytes, &lons), "a longitude in the {what}");
    }

    // With the key file's keys, the export reads them back.
    let lines = device_export(&conn, keys.vault().clone(), &p).await;
    assert_eq!(lines.len(), 40);
    assert!(lines[0].contains("51.512345"), "{}", lines[0]);

    // A copy restored elsewhere after the month's key was destroyed: nothing opens.
    let month = Month::now();
    let pruned = Vault::new([]).unwrap();
    for m in &members {
        let e = hist::open(&pruned, &p, m).unwrap_err();
        assert!(
            matches!(e, chunk::ChunkError::Sealed(VaultError::KeyGone { month: m, .. }) if m >= month),
            "{e:?}"
        );
    }
    // A copy of the RDB file (a backup, a stolen disk) loaded into another server.
    let mut copy = RedisServer::start();
    copy.kill();
    std::fs::copy(redis.dir().join("dump.rdb"), copy.dir().join("dump.rdb")).unwrap();
    copy.restart();
    let mut cc = copy.conn().await;
    let copied: u64 = cc.zcard(hist_key(&p)).await.unwrap();
    assert_eq!(copied as usize, members.len(), "the copy holds the history");
    let copy_conn = trackgate::redis_conn::connect(&test_config(&copy).redis).unwrap();
    assert!(
        device_export(&copy_conn, Arc::new(Vault::new([]).unwrap()), &p)
            .await
            .is_empty(),
        "no row of the copy can be read without the key"
    );
    assert_eq!(
        device_export(&copy_conn, keys.vault().clone(), &p)
            .await
            .len(),
        40,
        "the same copy with the key: every row"
    );
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_or_moved_chunk_is_an_error_and_the_other_chunks_still_export() {
    let redis = RedisServer::start();
    let (gw, keys) = start_gateway(test_config(&redis)).await;
    let conn = trackgate::redis_conn::connect(&test_config(&redis).redis).unwrap();
    let p = stored_device(&gw, &conn, &keys, 2).await;
    let q = stored_device(&gw, &conn, &keys, 3).await;
    seal(&conn, keys.vault().clone()).await;
    let mut c = redis.conn().await;
    let chunks: Vec<(Vec<u8>, f64)> = c.zrange_withscores(hist_key(&p), 0, -1).await.unwrap();
    assert!(chunks.len() >= 3);
    // One byte of the second chunk's ciphertext flipped in place.
    let (victim, score) = chunks[1].clone();
    let mut bad = victim.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x40;
    let _: () = c.zrem(hist_key(&p), &victim).await.unwrap();
    let _: () = c.zadd(hist_key(&p), &bad, score).await.unwrap();
    let lost = hist::open(keys.vault(), &p, &victim).unwrap().len();
    assert!(matches!(
        hist::open(keys.vault(), &p, &bad),
        Err(chunk::ChunkError::Sealed(VaultError::Forged))
    ));
    assert_eq!(
        device_export(&conn, keys.vault().clone(), &p).await.len(),
        40 - lost,
        "the other chunks export"
    );
    // Another device's chunk copied into this device's history does not open here.
    let theirs: Vec<(Vec<u8>, f64)> = c.zrange_withscores(hist_key(&q), 0, 0).await.unwrap();
    let _: () = c
        .zadd(hist_key(&p), &theirs[0].0, theirs[0].1 + 0.5)
        .await
        .unwrap();
    assert!(matches!(
        hist::open(keys.vault(), &p, &theirs[0].0),
        Err(chunk::ChunkError::Sealed(VaultError::Forged))
    ));
    assert_eq!(
        device_export(&conn, keys.vault().clone(), &p).await.len(),
        40 - lost,
        "nothing of the other device shows up"
    );
    gw.shutdown();
    gw.wait().await;
}

fn trackgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_trackgate"))
        .args(args)
        .output()
        .unwrap()
}

/// `trackgate keys prune KEY_FILE --config CONFIG`.
fn keys_prune(key_file: &std::path::Path, config: &std::path::Path) -> std::process::Output {
    trackgate(&[
        "keys",
        "prune",
        key_file.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ])
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn data_keys_are_made_ahead_required_to_serve_and_pruned_past_the_retention() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[listeners]]\nbind = \"127.0.0.1:{}\"\n[redis]\nurl = \"redis://127.0.0.1:{}\"\n[keys]\nkey_file = \"{}\"\n",
            free_port(),
            free_port(),
            keys.display()
        ),
    )
    .unwrap();
    let (now, next) = (Month::now(), Month::now().next());

    // A key file of the previous version: pseudonym keys only.
    std::fs::write(
        &keys,
        format!(
            "[[key]]\nversion = 1\nnot_before = \"2026-01-01T00:00:00Z\"\nsecret_hex = \"{}\"\n",
            "ab".repeat(32)
        ),
    )
    .unwrap();
    for args in [
        vec!["config", "validate", cfg.to_str().unwrap()],
        vec!["serve", "--config", cfg.to_str().unwrap()],
    ] {
        let o = trackgate(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        let t = text(&o);
        assert!(
            t.contains(&format!("no data key for {now} and {next}"))
                && t.contains("trackgate keys months"),
            "{args:?} names what is missing and the fix: {t}"
        );
    }
    let o = trackgate(&["keys", "months", keys.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(&now.to_string()), "{}", text(&o));
    let o = trackgate(&["config", "validate", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));

    // A month long past every retention is destroyed by prune; this one stays.
    let mut file = std::fs::read_to_string(&keys).unwrap();
    file.push_str(&format!(
        "\n[[data_key]]\nmonth = \"2020-01\"\nversion = 1\nsecret_hex = \"{}\"\n",
        "cd".repeat(32)
    ));
    std::fs::write(&keys, file).unwrap();
    let listed = text(&trackgate(&["keys", "list", keys.to_str().unwrap()]));
    assert!(
        listed.contains("2020-01") && !listed.contains(&"cd".repeat(32)),
        "{listed}"
    );
    let o = keys_prune(&keys, &cfg);
    assert!(
        o.status.success() && text(&o).contains("2020-01"),
        "{}",
        text(&o)
    );
    let listed = text(&trackgate(&["keys", "list", keys.to_str().unwrap()]));
    assert!(!listed.contains("2020-01"), "{listed}");
    assert!(
        listed.contains(&now.to_string()) && listed.contains(&next.to_string()),
        "{listed}"
    );
    let ring = KeyRing::load(&keys).unwrap();
    assert!(ring.check_data_months(now).is_ok());
}

/// The `e` (sealed payload) and `t` (fix time) values of a device's tail entries.
async fn tail_values(conn: &mut redis::aio::MultiplexedConnection, p: &Pseudonym) -> Vec<Vec<u8>> {
    let r: redis::streams::StreamRangeReply = conn.xrange_all(fixes_key(p)).await.unwrap();
    r.ids
        .iter()
        .flat_map(|e| {
            ["e", "t"]
                .iter()
                .filter_map(|f| redis::from_redis_value::<Vec<u8>>(e.map.get(*f)?.clone()).ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every byte of the AOF files and the RDB of `redis`.
fn files_of(redis: &RedisServer) -> Vec<u8> {
    let mut all = std::fs::read(redis.dir().join("dump.rdb")).unwrap_or_default();
    if let Ok(dir) = std::fs::read_dir(redis.dir().join("appendonlydir")) {
        for f in dir {
            all.extend(std::fs::read(f.unwrap().path()).unwrap());
        }
    }
    all
}

fn holds(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_purge_leaves_the_aof_and_rdb_and_its_receipt_says_when() {
    let redis = RedisServer::start();
    let replica = RedisServer::start_replica_of(&redis);
    let mut c = redis.conn().await;
    for server in [&redis, &replica] {
        let mut c = server.conn().await;
        for (name, value) in [
            ("rdbcompression", "no"),
            ("appendonly", "yes"),
            ("save", "3600 1"),
        ] {
            config_set(&mut c, name, value).await;
        }
    }
    let mut cfg = test_config(&redis);
    cfg.purge.disk_rewrite_interval_s = 1;
    cfg.purge.worker_interval_s = 1;
    let (gw, keys) = start_gateway(cfg).await;
    let conn = trackgate::redis_conn::connect(&test_config(&redis).redis).unwrap();
    let gone = stored_device(&gw, &conn, &keys, 4).await;
    let kept = stored_device(&gw, &conn, &keys, 5).await;
    let gone_values = tail_values(&mut c, &gone).await;
    let kept_values = tail_values(&mut c, &kept).await;
    let envelopes: Vec<&Vec<u8>> = gone_values.iter().filter(|v| v.len() > 31).collect();
    assert_eq!(envelopes.len(), 40);
    for server in [&redis, &replica] {
        // The replica has applied every write before its snapshot.
        let mut sc = server.conn().await;
        let _: () = redis::cmd("WAIT")
            .arg(1)
            .arg(5000)
            .query_async(&mut c)
            .await
            .unwrap();
        let _: () = redis::cmd("SAVE").query_async(&mut sc).await.unwrap();
        let before = files_of(server);
        assert!(
            envelopes.iter().all(|e| holds(&before, e)),
            "the files hold the device's writes before the purge"
        );
    }

    let customer = trackgate::registry::Customer::new("acme", "ACME", "Europe/Berlin");
    trackgate::registry::Registry::new(conn.clone(), 365 * 86_400)
        .add_customer(&customer)
        .await
        .unwrap();
    let purger = trackgate::purge::Purger::new(conn.clone(), Duration::from_secs(86_400))
        .with_vault(keys.vault().clone());
    let receipt = purger
        .request(
            &customer,
            &trackgate::purge::PurgeRequest {
                pseudonyms: vec![gone.clone()],
                range: None,
                idempotency_key: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(receipt.state, "completed");
    assert!(receipt.disk_rewritten_at.is_none(), "not yet rewritten");
    let mut done = None;
    for _ in 0..200 {
        let r = purger.receipt(&receipt.id).await.unwrap().unwrap();
        if let Some(at) = r.disk_rewritten_at {
            done = Some(at);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let disk: std::collections::HashMap<String, String> =
        c.hgetall("tg:{purge}:disk").await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("persistence")
        .query_async(&mut c)
        .await
        .unwrap();
    let done = done.unwrap_or_else(|| {
        panic!("the receipt says when the files were rewritten: {disk:?} {info}")
    });
    assert!(done >= receipt.completed_at.unwrap());

    let after = files_of(&redis);
    for e in &envelopes {
        assert!(
            !holds(&after, e),
            "a purged fix's ciphertext is still in Redis' files"
        );
    }
    for t in gone_values.iter().filter(|v| v.len() <= 12) {
        assert!(
            !holds(&after, t),
            "a purged fix's clear fix time is still in Redis' files"
        );
    }
    let kept_envelopes: Vec<&Vec<u8>> = kept_values.iter().filter(|v| v.len() > 31).collect();
    assert!(
        kept_envelopes.iter().all(|e| holds(&after, e)),
        "the other device's data is still there"
    );
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_is_a_hash_chain_that_names_its_first_break_and_is_bounded() {
    let redis = RedisServer::start();
    let conn = trackgate::redis_conn::connect(&test_config(&redis).redis).unwrap();
    // A line from before the chain existed (previous version): kept, counted, not a break.
    let mut c = redis.conn().await;
    let _: () = c
        .xadd(
            trackgate::audit::AUDIT_KEY,
            "*",
            &[("actor", "admin"), ("action", "old")],
        )
        .await
        .unwrap();
    // Two gateways appending at once: one chain, no fork.
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let mut conn = conn.clone();
            tokio::spawn(async move {
                for i in 0..25 {
                    let detail = format!("writer {w} line {i}");
                    trackgate::audit::append(
                        &mut conn,
                        &trackgate::audit::AuditEvent {
                            actor: "admin",
                            action: "test",
                            devices: "",
                            outcome: "ok",
                            detail: &detail,
                        },
                    )
                    .await
                    .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        format!(
            "[redis]\nurl = \"{}\"\n[keys]\nkey_file = \"unused\"\n",
            redis.url()
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let o = trackgate(&["audit", "verify", "--config", cfg]);
    assert!(
        o.status.success() && text(&o).contains("intact: 51 lines (1 from before the chain)"),
        "{}",
        text(&o)
    );
    let exported = trackgate(&["audit", "export", "--config", cfg]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&exported.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 51);
    assert!(
        lines[1]["h"].as_str().is_some_and(|h| h.len() == 64),
        "{}",
        lines[1]
    );
    assert_eq!(lines[2]["prev"], lines[1]["h"]);

    // A line removed from the middle: the line after it is the first break.
    let victim = lines[20]["id"].as_str().unwrap();
    let _: () = c
        .xdel(trackgate::audit::AUDIT_KEY, &[victim])
        .await
        .unwrap();
    let o = trackgate(&["audit", "verify", "--config", cfg]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let next = lines[21]["id"].as_str().unwrap();
    assert!(
        text(&o).contains(&format!("broken at line {next}: prev is not the hash")),
        "{}",
        text(&o)
    );

    // Retention trims the oldest lines (the break with them); what is left verifies.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut conn2 = conn.clone();
    trackgate::audit::append(
        &mut conn2,
        &trackgate::audit::AuditEvent {
            actor: "admin",
            action: "test",
            devices: "",
            outcome: "ok",
            detail: "after",
        },
    )
    .await
    .unwrap();
    let trimmed = trackgate::audit::trim(&mut conn2, Duration::from_millis(10))
        .await
        .unwrap();
    assert_eq!(trimmed, 50, "every line but the newest");
    let o = trackgate(&["audit", "verify", "--config", cfg]);
    assert!(
        o.status.success() && text(&o).contains("intact: 1 lines"),
        "{}",
        text(&o)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_an_older_version_left_in_clear_are_sealed_in_place_and_read_the_same() {
    let redis = RedisServer::start();
    let (gw, keys) = start_gateway(test_config(&redis)).await;
    let conn = trackgate::redis_conn::connect(&test_config(&redis).redis).unwrap();
    let p = stored_device(&gw, &conn, &keys, 6).await;
    // Seal, then turn the chunks back into what a previous version wrote: clear ones.
    seal(&conn, keys.vault().clone()).await;
    let mut c = redis.conn().await;
    let sealed: Vec<(Vec<u8>, f64)> = c.zrange_withscores(hist_key(&p), 0, -1).await.unwrap();
    for (m, score) in &sealed {
        let plain = chunk::encode(&hist::open(keys.vault(), &p, m).unwrap());
        let _: () = c.zrem(hist_key(&p), m).await.unwrap();
        let _: () = c.zadd(hist_key(&p), plain, *score).await.unwrap();
    }
    let before = device_export(&conn, keys.vault().clone(), &p).await;
    assert_eq!(before.len(), 40, "clear chunks are read");
    // The gateway's own first pass found nothing in clear and said so; a store upgraded
    // from the previous version has no such marker.
    let marker: bool = c.exists("tg:{compact}:clear_chunks_sealed").await.unwrap();
    assert!(marker);
    let _: () = c.del("tg:{compact}:clear_chunks_sealed").await.unwrap();
    let s = Compaction::new(&StorageConfig::default(), keys.vault().clone());
    let n = trackgate::compact::seal_clear_chunks(&conn, &s)
        .await
        .unwrap();
    assert_eq!(n as usize, sealed.len());
    let members: Vec<Vec<u8>> = c.zrange(hist_key(&p), 0, -1).await.unwrap();
    assert!(
        members.iter().all(|m| m[0] == chunk::VERSION_SEALED),
        "every chunk sealed"
    );
    assert_eq!(device_export(&conn, keys.vault().clone(), &p).await, before);
    assert_eq!(
        trackgate::compact::seal_clear_chunks(&conn, &s)
            .await
            .unwrap(),
        0,
        "nothing left: later runs stop at the marker"
    );
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_keys_prune_an_rdb_copy_of_a_past_month_cannot_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("keys.toml");
    KeyRing::generate(&key_file).unwrap();
    // Last month's key, as `keys months` made it a month ago.
    let last = Month(Month::now().0 - 1);
    let mut file = std::fs::read_to_string(&key_file).unwrap();
    file.push_str(&format!(
        "\n[[data_key]]\nmonth = \"{last}\"\nversion = 1\nsecret_hex = \"{}\"\n",
        "5a".repeat(32)
    ));
    std::fs::write(&key_file, file).unwrap();
    let keys = Arc::new(KeyRing::load(&key_file).unwrap());

    // A device's fixes from the end of last month and from this one, sealed.
    let redis = RedisServer::start();
    let gw = trackgate::gateway::Gateway::start(test_config(&redis), keys.clone())
        .await
        .unwrap();
    let conn = trackgate::redis_conn::connect(&test_config(&redis).redis).unwrap();
    let id = imei(810);
    let p = pseudonym(&keys, &id);
    let this_start = Month::now().start_unix();
    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    let times: Vec<i64> = (0..10)
        .map(|i| this_start - 3_600 + i * 600)
        .filter(|s| *s < now_s().as_second())
        .collect();
    for (i, s) in times.iter().enumerate() {
        let f = fix_at(jiff::Timestamp::from_second(*s).unwrap(), i as i32);
        t.send(&aaa_frame(&id, &f)).await;
    }
    let n = times.len() as u64;
    wait_tail_len(&conn, &p, n, Duration::from_secs(10), "all fixes stored").await;
    seal(&conn, keys.vault().clone()).await;
    let in_last = times.iter().filter(|s| **s < this_start).count();
    assert_eq!(
        device_export(&conn, keys.vault().clone(), &p).await.len(),
        times.len()
    );

    // An RDB copy, then `trackgate keys prune` with a retention that last month is past.
    let mut c = redis.conn().await;
    let _: () = redis::cmd("SAVE").query_async(&mut c).await.unwrap();
    let mut copy = RedisServer::start();
    copy.kill();
    std::fs::copy(redis.dir().join("dump.rdb"), copy.dir().join("dump.rdb")).unwrap();
    copy.restart();
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        format!(
            "[redis]\nurl = \"{}\"\n[keys]\nkey_file = \"{}\"\ndata_key_grace_s = 0\n[retention]\nttl_s = 1\nmax_customer_ttl_s = 1\nsweep_interval_s = 1\n",
            copy.url(),
            key_file.display()
        ),
    )
    .unwrap();
    let o = keys_prune(&key_file, &cfg);
    assert!(
        o.status.success() && text(&o).contains(&last.to_string()),
        "{}",
        text(&o)
    );
    let pruned = KeyRing::load(&key_file).unwrap();
    let copy_conn = trackgate::redis_conn::connect(&test_config(&copy).redis).unwrap();
    let read = device_export(&copy_conn, pruned.vault().clone(), &p).await;
    assert_eq!(
        read.len(),
        times.len() - in_last,
        "the copy gives up this month's fixes only: {in_last} of last month are gone"
    );
    assert!(in_last > 0);
    gw.shutdown();
    gw.wait().await;
}
