//! Purges against a real redis-server: complete purge while the device keeps sending,
//! in-flight writes refused by the tombstone, exact range purge, rotated keys,
//! journaling when Redis is down, idempotency, and the worker after a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use jiff::Timestamp;
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;
use trackgate::config::PurgeConfig;
use trackgate::pseudonym::{Imei, KeyRing};
use trackgate::purge::{PurgeError, PurgeRequest, Purger};
use trackgate::registry::{Customer, Registry};
use trackgate::sink::WriteJob;
use trackgate::store::{StoredFix, fixes_key};
use trackgate_protocols::MessageKind;

const LONG: Duration = Duration::from_secs(10);
const TOMB_TTL: Duration = Duration::from_secs(3600);

async fn customer<C>(conn: C) -> Customer
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    let reg = Registry::new(conn, 365 * 86400);
    let c = Customer::new("acme", "ACME Logistics", "Europe/Berlin");
    reg.add_customer(&c).await.unwrap();
    c
}

/// A purge of everything of one device, without an idempotency key.
fn whole_device(p: &trackgate::pseudonym::Pseudonym) -> PurgeRequest {
    PurgeRequest {
        pseudonyms: vec![p.clone()],
        range: None,
        idempotency_key: None,
    }
}

/// Fix times (Unix s) of the entries in a stream.
async fn fix_times<C: redis::aio::ConnectionLike + Send + Sync>(
    conn: &mut C,
    key: &str,
) -> Vec<i64> {
    let r: redis::streams::StreamRangeReply = conn.xrange_all(key).await.unwrap();
    r.ids
        .iter()
        .map(|e| redis::from_redis_value::<i64>(e.map["t"].clone()).unwrap())
        .collect()
}

fn entry_ms(id: &str) -> i64 {
    id.split_once('-').unwrap().0.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_purge_while_the_device_keeps_sending() {
    let redis = Backend::from_env();
    let (gw, keys) = start_gateway(redis.config()).await;
    let c = customer(redis.conn()).await;
    let id = imei(70);
    let p = pseudonym(&keys, &id);
    let mut conn = redis.conn();

    let stop = CancellationToken::new();
    let sender = {
        let (addr, id, stop) = (gw.tracker_addrs[0], id.clone(), stop.clone());
        tokio::spawn(async move {
            let mut t = Tracker::connect(addr).await;
            let mut i = 0;
            while !stop.is_cancelled() {
                t.send(&aaa_frame(&id, &fix_at(now_s(), i))).await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    eventually(LONG, "some fixes stored", || {
        let (mut conn, p) = (conn.clone(), p.clone());
        async move { stream_len(&mut conn, &p).await > 20 }
    })
    .await;

    let purger = Purger::new(conn.clone(), TOMB_TTL);
    let req = PurgeRequest {
        pseudonyms: keys.all_pseudonyms(&Imei::new(&id).unwrap()),
        range: None,
        idempotency_key: None,
    };
    let receipt = purger.request(&c, &req).await.unwrap();
    assert_eq!(receipt.state, "completed");
    assert!(receipt.deleted_fixes > 20);
    assert!(receipt.deadline > receipt.requested_at);

    // The device keeps sending; new fixes are stored once the clock-skew margin has
    // passed, none from before the cutoff is.
    past_skew_margin(&receipt).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    sender.await.unwrap();
    let cutoff = receipt.cutoff.as_millisecond();
    let after: redis::streams::StreamRangeReply = conn.xrange_all(fixes_key(&p)).await.unwrap();
    assert!(!after.ids.is_empty(), "reporting continues after a purge");
    let margin = PurgeConfig::default().clock_skew_margin_ms as i64;
    for e in &after.ids {
        assert!(
            entry_ms(&e.id) > cutoff + margin,
            "entry {} is not newer than the cutoff and its clock-skew margin",
            e.id
        );
    }
    let journal: redis::streams::StreamRangeReply = conn
        .xrange_all(trackgate::purge::JOURNAL_KEY)
        .await
        .unwrap();
    assert_eq!(journal.ids.len(), 2, "requested + completed");
    let audit: redis::streams::StreamRangeReply = conn.xrange_all("tg:audit").await.unwrap();
    assert!(audit.ids.len() >= 2);
    assert_eq!(purger.receipt(&receipt.id).await.unwrap().unwrap(), receipt);
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_fixes_received_before_the_cutoff_are_refused() {
    let redis = Backend::from_env();
    let c = customer(redis.conn()).await;
    let keys = KeyRing::ephemeral();
    let id = Imei::new(&imei(71)).unwrap();
    let p = keys.pseudonym(&id);
    let conn = redis.conn();
    let mut cfg = redis.config().redis;
    cfg.writers = 1;
    let writers = start_writers(&cfg);

    // Gateways' clocks may be up to a second apart.
    let purger = Purger::new(conn.clone(), TOMB_TTL).with_config(&PurgeConfig {
        clock_skew_margin_ms: SKEW.as_millis() as u64,
        ..PurgeConfig::default()
    });
    let receipt = purger.request(&c, &whole_device(&p)).await.unwrap();
    let cutoff = receipt.cutoff.as_millisecond();
    // A write job read before the purge but reaching Redis after it (queued or retried).
    // Its fix is taken after the purge's second (what was taken before it is refused
    // whenever it arrives): here only the receive time decides.
    let taken = Timestamp::from_second(receipt.cutoff.as_second() + 2).unwrap();
    let job = |received_ms: i64, i: i32| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let fix = StoredFix::from_fix(MessageKind::Aaa, &fix_at(taken, i));
        (
            WriteJob {
                device: p.clone(),
                fixes: vec![fix],
                received_ms,
                ttl: Duration::from_secs(3600),
                done: Some(tx),
            },
            rx,
        )
    };
    let skew_ms = SKEW.as_millis() as i64;
    let (late, late_done) = job(cutoff - 50, 0);
    // Read before the purge by a gateway whose clock is up to SKEW ahead.
    let (ahead, ahead_done) = job(cutoff + skew_ms - 50, 1);
    let (fresh, fresh_done) = job(cutoff + skew_ms + 50, 2);
    for j in [late, ahead, fresh] {
        writers.sink.submit(j).await.unwrap();
    }
    for done in [late_done, ahead_done, fresh_done] {
        done.await.unwrap();
    }
    let mut conn = redis.conn();
    assert_eq!(
        stream_len(&mut conn, &p).await,
        1,
        "only the fix received after the cutoff and the clock-skew margin"
    );
}

const SKEW: Duration = Duration::from_millis(1000);

/// [`past_purge_margin`] for `receipt`, with the default margin.
async fn past_skew_margin(receipt: &trackgate::purge::Receipt) {
    let margin_ms = PurgeConfig::default().clock_skew_margin_ms;
    past_purge_margin(receipt.cutoff.as_millisecond(), margin_ms).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_purge_deletes_exactly_the_range() {
    let redis = Backend::from_env();
    let (gw, keys) = start_gateway(redis.config()).await;
    let c = customer(redis.conn()).await;
    let id = imei(72);
    let p = pseudonym(&keys, &id);
    let base = now_s().as_second() - 3600;
    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    // 60 fixes one minute apart, delivered out of order in batches like a cached device.
    let times: Vec<i64> = (0..60).map(|i| base + i * 60).collect();
    for chunk in times.chunks(7).rev() {
        let fixes: Vec<_> = chunk
            .iter()
            .map(|&s| fix_at(Timestamp::from_second(s).unwrap(), 0))
            .collect();
        t.send(&cce_frame(&id, &fixes)).await;
        assert!(t.reply(LONG).await.is_some());
    }
    let mut conn = redis.conn();
    assert_eq!(stream_len(&mut conn, &p).await, 60);

    let (from, to) = (base + 10 * 60, base + 19 * 60); // fixes 10..=19, inclusive
    let purger = Purger::new(conn.clone(), TOMB_TTL);
    let receipt = purger
        .request(
            &c,
            &PurgeRequest {
                pseudonyms: keys.all_pseudonyms(&Imei::new(&id).unwrap()),
                range: Some((
                    Timestamp::from_second(from).unwrap(),
                    Timestamp::from_second(to).unwrap(),
                )),
                idempotency_key: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (
            receipt.state.as_str(),
            receipt.scope.as_str(),
            receipt.deleted_fixes
        ),
        ("completed", "range", 10)
    );
    let mut left = fix_times(&mut conn, &fixes_key(&p)).await;
    left.sort_unstable();
    let want: Vec<i64> = times
        .iter()
        .copied()
        .filter(|&s| s < from || s > to)
        .collect();
    assert_eq!(left, want);

    // A cached fix inside the range read after the purge (and its clock-skew margin) is
    // new data: stored. (One read before the purge is refused: see
    // in_flight_range_fixes_are_refused.)
    past_skew_margin(&receipt).await;
    t.send(&cce_frame(
        &id,
        &[fix_at(Timestamp::from_second(from + 30).unwrap(), 0)],
    ))
    .await;
    assert!(t.reply(LONG).await.is_some());
    assert_eq!(
        stream_len(&mut conn, &p).await,
        51,
        "read after the purge: new data, stored"
    );
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_covers_every_key_version() {
    let redis = Backend::from_env();
    let c = customer(redis.conn()).await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("keys.toml");
    KeyRing::generate(&key_file).unwrap();
    let id = imei(73);
    let imei_v = Imei::new(&id).unwrap();

    // Data written under key version 1 …
    let ring1 = Arc::new(KeyRing::load(&key_file).unwrap());
    let gw = trackgate::gateway::Gateway::start(redis.config(), ring1.clone())
        .await
        .unwrap();
    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    t.send(&ccc_frame(&id, &[fix_at(now_s(), 0)])).await;
    assert!(t.reply(LONG).await.is_some());
    gw.shutdown();
    gw.wait().await;
    // … and, after rotation, under version 2.
    KeyRing::rotate(&key_file, Some(Timestamp::UNIX_EPOCH)).unwrap();
    let ring2 = Arc::new(KeyRing::load(&key_file).unwrap());
    let gw = trackgate::gateway::Gateway::start(redis.config(), ring2.clone())
        .await
        .unwrap();
    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    t.send(&ccc_frame(&id, &[fix_at(now_s(), 1), fix_at(now_s(), 2)]))
        .await;
    assert!(t.reply(LONG).await.is_some());

    let all = ring2.all_pseudonyms(&imei_v);
    assert_eq!(all.len(), 2);
    let mut conn = redis.conn();
    assert_eq!(stream_len(&mut conn, &all[0]).await, 1);
    assert_eq!(stream_len(&mut conn, &all[1]).await, 2);
    let purger = Purger::new(conn.clone(), TOMB_TTL);
    let r = purger
        .request(
            &c,
            &PurgeRequest {
                pseudonyms: all.clone(),
                range: None,
                idempotency_key: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(r.deleted_fixes, 3);
    for p in &all {
        assert_eq!(stream_len(&mut conn, p).await, 0);
    }
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_means_refused_never_lost_and_the_worker_finishes_journaled_purges() {
    if !standalone_only(
        "redis_down_means_refused_never_lost_and_the_worker_finishes_journaled_purges",
    ) {
        return;
    }
    let redis = RedisServer::start();
    let c = customer(redis.conn().await).await;
    let keys = KeyRing::ephemeral();
    let p = keys.pseudonym(&Imei::new(&imei(74)).unwrap());
    let req = PurgeRequest {
        pseudonyms: vec![p.clone()],
        range: None,
        idempotency_key: Some("req-1".into()),
    };

    // Redis unreachable: refused with a retryable error, nothing recorded.
    let cfg = {
        let mut c = test_config(&redis).redis;
        c.response_timeout_ms = 300;
        c
    };
    let down = Purger::new(trackgate::redis_conn::connect(&cfg).unwrap(), TOMB_TTL);
    redis.freeze();
    let refused = down.request(&c, &req).await;
    assert!(
        matches!(refused, Err(PurgeError::Unavailable(_))),
        "{refused:?}"
    );
    redis.thaw();
    let mut conn = redis.conn().await;
    let pending: Vec<String> = conn.smembers(trackgate::purge::PENDING_KEY).await.unwrap();
    assert!(pending.is_empty());

    // Journaled, then the process "dies" before the fast path: a new worker finishes it.
    let first = Purger::new(conn.clone(), TOMB_TTL);
    let id = first.journal(&c, &req).await.unwrap();
    drop(first);
    assert_eq!(
        Purger::new(conn.clone(), TOMB_TTL)
            .receipt(&id)
            .await
            .unwrap()
            .unwrap()
            .state,
        "pending"
    );
    let restarted = Purger::new(conn.clone(), TOMB_TTL);
    assert_eq!(restarted.work_once().await.unwrap(), 1);
    let done = restarted.receipt(&id).await.unwrap().unwrap();
    assert_eq!(done.state, "completed");
    assert!(done.completed_at.is_some());

    // The same idempotency key gives the same purge, not a second one.
    let again = restarted.request(&c, &req).await.unwrap();
    assert_eq!(again.id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_range_fixes_are_refused_others_kept() {
    let redis = Backend::from_env();
    let c = customer(redis.conn()).await;
    let keys = KeyRing::ephemeral();
    let p = keys.pseudonym(&Imei::new(&imei(75)).unwrap());
    let conn = redis.conn();
    let cfg = redis.config().redis;
    let writers = start_writers(&cfg);
    let base = now_s().as_second() - 600;
    let purger = Purger::new(conn.clone(), TOMB_TTL);
    let range = (
        Timestamp::from_second(base).unwrap(),
        Timestamp::from_second(base + 100).unwrap(),
    );
    let receipt = purger
        .request(
            &c,
            &PurgeRequest {
                pseudonyms: vec![p.clone()],
                range: Some(range),
                idempotency_key: None,
            },
        )
        .await
        .unwrap();
    let before = receipt.cutoff.as_millisecond() - 50;
    let mut waits = Vec::new();
    for fix_s in [base + 50, base + 500] {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let fix = StoredFix::from_fix(
            MessageKind::Aaa,
            &fix_at(Timestamp::from_second(fix_s).unwrap(), 0),
        );
        let job = WriteJob {
            device: p.clone(),
            fixes: vec![fix],
            received_ms: before,
            ttl: Duration::from_secs(3600),
            done: Some(tx),
        };
        writers.sink.submit(job).await.unwrap();
        waits.push(rx);
    }
    for w in waits {
        w.await.unwrap();
    }
    let mut conn = redis.conn();
    assert_eq!(fix_times(&mut conn, &fixes_key(&p)).await, vec![base + 500]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overdue_purges_raise_the_metric() {
    let redis = Backend::from_env();
    let (gw, _keys) = start_gateway(redis.config()).await; // installs the metrics recorder
    let c = customer(redis.conn()).await;
    let keys = KeyRing::ephemeral();
    let p = keys.pseudonym(&Imei::new(&imei(76)).unwrap());
    let mut conn = redis.conn();
    // A key of the wrong type makes the purge fail until someone repairs it.
    let _: () = conn.set(fixes_key(&p), "not a stream").await.unwrap();
    let purger = Purger::new(conn.clone(), TOMB_TTL);
    let req = whole_device(&p);
    let id = purger.journal(&c, &req).await.unwrap();
    let _: () = conn
        .hset(trackgate::purge::record_key(&id), "deadline_ms", 1000)
        .await
        .unwrap();
    assert_eq!(purger.work_once().await.unwrap(), 0);
    let metrics = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(gw.http_addr.unwrap())
            .await
            .unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    assert!(metrics.contains("trackgate_purges_overdue 1"), "{metrics}");
    // Repaired: the worker completes it.
    let _: () = conn.del(fixes_key(&p)).await.unwrap();
    assert_eq!(purger.work_once().await.unwrap(), 1);
    assert_eq!(
        purger.receipt(&id).await.unwrap().unwrap().state,
        "completed"
    );
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_stream_range_purge_fast_path_then_worker_finishes_exactly() {
    use trackgate::store::FieldValue;
    // Small limits keep the stream short; several chunks per scan are still exercised.
    let config = PurgeConfig {
        fast_full_scan_max_entries: 2_000,
        range_chunk_entries: 300,
        ..PurgeConfig::default()
    };
    let redis = Backend::from_env();
    let c = customer(redis.conn()).await;
    let keys = KeyRing::ephemeral();
    let p = keys.pseudonym(&Imei::new(&imei(77)).unwrap());
    let mut conn = redis.conn();
    // One fix per 10 s, received on time, plus one fix from inside the range that was
    // delivered hours late (its entry id is far outside the range).
    let n = config.fast_full_scan_max_entries as i64 + 500;
    let start_s = now_s().as_second() - n * 10 - 7200;
    let entry = |id_ms: i64, fix_s: i64| {
        let s = StoredFix::from_fix(
            MessageKind::Aaa,
            &fix_at(Timestamp::from_second(fix_s).unwrap(), 0),
        );
        let mut cmd = redis::cmd("XADD");
        cmd.arg(fixes_key(&p)).arg(format!("{id_ms}-0"));
        for (k, v) in &s.fields {
            cmd.arg(*k);
            match v {
                FieldValue::Int(i) => cmd.arg(*i),
                FieldValue::Text(t) => cmd.arg(t.as_str()),
                FieldValue::Bytes(b) => cmd.arg(b.as_slice()),
            };
        }
        cmd
    };
    let mut pipe = redis::pipe();
    for i in 0..n {
        pipe.add_command(entry((start_s + i * 10) * 1000, start_s + i * 10))
            .ignore();
    }
    let (from, to) = (start_s + 1000 * 10, start_s + 1099 * 10); // 100 fixes
    pipe.add_command(entry((start_s + n * 10 + 3600) * 1000, from + 5))
        .ignore();
    let _: () = pipe.query_async(&mut conn).await.unwrap();

    let purger = Purger::new(conn.clone(), TOMB_TTL).with_config(&config);
    let range = (
        Timestamp::from_second(from).unwrap(),
        Timestamp::from_second(to).unwrap(),
    );
    let r = purger
        .request(
            &c,
            &PurgeRequest {
                pseudonyms: vec![p.clone()],
                range: Some(range),
                idempotency_key: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (r.state.as_str(), r.deleted_fixes),
        ("pending", 100),
        "fast path: the on-time fixes"
    );
    assert_eq!(purger.work_once().await.unwrap(), 1);
    let done = purger.receipt(&r.id).await.unwrap().unwrap();
    assert_eq!(
        (done.state.as_str(), done.deleted_fixes),
        ("completed", 101),
        "worker: the late one too"
    );
    // Count server-side (a long XRANGE reply is slow to ship to the test).
    let (total, in_range): (i64, i64) = redis::Script::new(
        r"local n, hit = 0, 0
          for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
            n = n + 1
            local t = tonumber(e[2][2])
            if t >= tonumber(ARGV[1]) and t <= tonumber(ARGV[2]) then hit = hit + 1 end
          end
          return {n, hit}",
    )
    .key(fixes_key(&p))
    .arg(from)
    .arg(to)
    .invoke_async(&mut conn)
    .await
    .unwrap();
    assert_eq!((total, in_range), (n - 100, 0));
}

/// What a gateway of the old key layout leaves behind: three fixes received a minute
/// before a purge whose fast path never ran, the purge pending under `tg:purge:*`, its
/// journal line and idempotency key (`req-1`). Returns the purge id.
async fn write_legacy_pending_purge(
    conn: &mut trackgate::redis_conn::RedisConn,
    c: &Customer,
    p: &trackgate::pseudonym::Pseudonym,
) -> &'static str {
    use sha2::{Digest, Sha256};
    use trackgate::purge::LEGACY_PREFIX;
    let now_ms = Timestamp::now().as_millisecond();
    // Fixes received a minute before the purge, which never ran its fast path.
    for i in 0..3 {
        let _: String = conn
            .xadd(
                fixes_key(p),
                format!("{}-0", now_ms - 60_000 + i),
                &[("t", "1"), ("d", "x")],
            )
            .await
            .unwrap();
    }
    let id = "0123456789abcdef01234567";
    let fields = [
        ("customer", c.id.clone()),
        ("state", "pending".into()),
        ("devices", p.as_str().to_string()),
        ("requested_ms", now_ms.to_string()),
        ("cutoff_ms", now_ms.to_string()),
        ("deadline_ms", (now_ms + 86_400_000).to_string()),
        ("deleted", "0".into()),
    ];
    let idem = format!(
        "{LEGACY_PREFIX}idem:{}:{}",
        c.id,
        hex::encode(Sha256::digest(b"req-1"))
    );
    let _: () = redis::pipe()
        .hset_multiple(format!("{LEGACY_PREFIX}{id}"), &fields)
        .sadd(format!("{LEGACY_PREFIX}pending"), id)
        .xadd(
            format!("{LEGACY_PREFIX}journal"),
            "*",
            &[("id", id), ("event", "requested")],
        )
        .set(&idem, id)
        .query_async(conn)
        .await
        .unwrap();

    id
}

/// A purge still pending under the old key layout (`tg:purge:*`, before the `{purge}`
/// hash tag) is moved by the worker, finished, and its receipt and idempotency key answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_pending_under_the_old_key_layout_is_moved_and_finished() {
    use trackgate::purge::{LEGACY_PREFIX, migrate_legacy_keys};
    if !standalone_only("a_purge_pending_under_the_old_key_layout_is_moved_and_finished") {
        return;
    }
    let redis = Backend::from_env();
    let c = customer(redis.conn()).await;
    let keys = KeyRing::ephemeral();
    let p = keys.pseudonym(&Imei::new(&imei(78)).unwrap());
    let mut conn = redis.conn();
    let id = write_legacy_pending_purge(&mut conn, &c, &p).await;

    assert_eq!(migrate_legacy_keys(&mut conn).await.unwrap(), 4);
    let left: Vec<String> = conn.keys(format!("{LEGACY_PREFIX}*")).await.unwrap();
    assert!(left.is_empty(), "old keys left: {left:?}");
    let purger = Purger::new(redis.conn(), TOMB_TTL);
    assert_eq!(
        purger.work_once().await.unwrap(),
        1,
        "the worker finishes it"
    );
    assert_eq!(
        stream_len(&mut conn, &p).await,
        0,
        "the device's fixes are gone"
    );
    let receipt = purger.receipt(id).await.unwrap().expect("receipt");
    assert_eq!(receipt.state, "completed");
    let again = purger
        .request(
            &c,
            &PurgeRequest {
                pseudonyms: vec![p.clone()],
                range: None,
                idempotency_key: Some("req-1".into()),
            },
        )
        .await
        .unwrap();
    assert_eq!(again.id, id, "the idempotency key still answers");
    let journal: redis::streams::StreamRangeReply = conn
        .xrange_all(trackgate::purge::JOURNAL_KEY)
        .await
        .unwrap();
    assert_eq!(journal.ids.len(), 2, "requested (moved) + completed");
    assert_eq!(
        migrate_legacy_keys(&mut conn).await.unwrap(),
        0,
        "idempotent"
    );
}

/// In a rolling upgrade an old gateway may leave a purge pending under the old layout
/// after the new worker's first pass: the worker still picks it up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_left_by_an_old_gateway_after_start_up_is_still_finished() {
    if !standalone_only("a_purge_left_by_an_old_gateway_after_start_up_is_still_finished") {
        return;
    }
    let redis = Backend::from_env();
    let c = customer(redis.conn()).await;
    let p = KeyRing::ephemeral().pseudonym(&Imei::new(&imei(79)).unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = Purger::new(redis.conn(), TOMB_TTL).with_legacy_migration();
    let running = tokio::spawn(worker.run_worker(Duration::from_millis(100), stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await; // past its first pass
    let mut conn = redis.conn();
    let id = write_legacy_pending_purge(&mut conn, &c, &p).await;
    let purger = Purger::new(redis.conn(), TOMB_TTL);
    eventually(
        Duration::from_secs(10),
        "the old gateway's purge finished",
        || {
            let purger = purger.clone();
            async move {
                purger
                    .receipt(id)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|r| r.state == "completed")
            }
        },
    )
    .await;
    assert_eq!(stream_len(&mut conn, &p).await, 0);
    stop.cancel();
    running.await.unwrap();
}

/// Audit lines of `action` about purge `id`.
async fn audit_lines(mut conn: trackgate::redis_conn::RedisConn, action: &str, id: &str) -> usize {
    let r: redis::streams::StreamRangeReply =
        conn.xrange_all(trackgate::audit::AUDIT_KEY).await.unwrap();
    r.ids
        .iter()
        .filter(|e| {
            e.get::<String>("action").as_deref() == Some(action)
                && e.get::<String>("detail").is_some_and(|d| d.contains(id))
        })
        .count()
}

/// Move purge `id`'s `field` (ms) two minutes back: past the grace the worker leaves its
/// own gateway before writing an owed audit line.
async fn past_audit_grace(conn: &mut trackgate::redis_conn::RedisConn, id: &str, field: &str) {
    let long_ago = Timestamp::now().as_millisecond() - 120_000;
    let _: () = conn
        .hset(trackgate::purge::record_key(id), field, long_ago)
        .await
        .unwrap();
}

/// The `purge.requested` audit line goes to another slot than the journal: a Redis blip
/// or a crash between the two must not lose it either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_request_whose_audit_line_was_lost_gets_it_from_the_worker() {
    use trackgate::audit::AUDIT_KEY;
    use trackgate::purge::{UNAUDITED_KEY, UNAUDITED_REQUESTS_KEY};
    let redis = Backend::from_env();
    let c = customer(redis.conn()).await;
    let p = KeyRing::ephemeral().pseudonym(&Imei::new(&imei(78)).unwrap());
    let mut conn = redis.conn();
    let purger = Purger::new(redis.conn(), TOMB_TTL);
    // The audit stream refuses appends while the request is journaled.
    let _: () = conn.set(AUDIT_KEY, "not a stream").await.unwrap();
    let id = purger.journal(&c, &whole_device(&p)).await.unwrap();
    let owed: Vec<String> = conn.smembers(UNAUDITED_REQUESTS_KEY).await.unwrap();
    assert_eq!(owed.as_slice(), std::slice::from_ref(&id));
    let completed_owed: Vec<String> = conn.smembers(UNAUDITED_KEY).await.unwrap();
    assert!(
        completed_owed.is_empty(),
        "a previous version's worker reads this set as completed purges only"
    );
    let _: () = conn.del(AUDIT_KEY).await.unwrap();
    purger.work_once().await.unwrap();
    assert_eq!(
        audit_lines(conn.clone(), "purge.requested", &id).await,
        0,
        "left to the requesting gateway within its minute"
    );
    past_audit_grace(&mut conn, &id, "requested_ms").await;
    purger.work_once().await.unwrap();
    assert_eq!(audit_lines(conn.clone(), "purge.requested", &id).await, 1);
    let owed: Vec<String> = conn.smembers(UNAUDITED_REQUESTS_KEY).await.unwrap();
    assert!(owed.is_empty(), "{owed:?}");
}

/// The `purge.completed` audit line goes to another slot than the completion itself: a
/// crash between the two must not lose it. The worker writes what is owed, once the
/// completing gateway has had its minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_purge_whose_audit_line_was_lost_gets_it_from_the_worker() {
    use trackgate::purge::UNAUDITED_KEY;
    let redis = Backend::from_env();
    let c = customer(redis.conn()).await;
    let p = KeyRing::ephemeral().pseudonym(&Imei::new(&imei(77)).unwrap());
    let mut conn = redis.conn();
    let purger = Purger::new(redis.conn(), TOMB_TTL);
    let req = whole_device(&p);
    let receipt = purger.request(&c, &req).await.unwrap();
    assert_eq!(receipt.state, "completed");
    let completed_lines =
        |conn, id: String| async move { audit_lines(conn, "purge.completed", &id).await };
    assert_eq!(completed_lines(conn.clone(), receipt.id.clone()).await, 1);
    let owed: Vec<String> = conn.smembers(UNAUDITED_KEY).await.unwrap();
    assert!(owed.is_empty(), "{owed:?}");

    // As after a crash right after the completion: owed, and recent.
    let _: () = conn.sadd(UNAUDITED_KEY, &receipt.id).await.unwrap();
    purger.work_once().await.unwrap();
    assert_eq!(
        completed_lines(conn.clone(), receipt.id.clone()).await,
        1,
        "left to the completing gateway within its minute"
    );
    past_audit_grace(&mut conn, &receipt.id, "completed_ms").await;
    purger.work_once().await.unwrap();
    assert_eq!(completed_lines(conn.clone(), receipt.id.clone()).await, 2);
    let owed: Vec<String> = conn.smembers(UNAUDITED_KEY).await.unwrap();
    assert!(owed.is_empty(), "{owed:?}");
}

/// An idempotency key answers for the request it was first given with, not for another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_reused_for_another_request_is_refused() {
    let redis = Backend::from_env();
    let c = customer(redis.conn()).await;
    let keys = KeyRing::ephemeral();
    let purger = Purger::new(redis.conn(), TOMB_TTL);
    let req = |n: u32, range: Option<(Timestamp, Timestamp)>| PurgeRequest {
        pseudonyms: vec![keys.pseudonym(&Imei::new(&imei(n)).unwrap())],
        range,
        idempotency_key: Some("order-17".into()),
    };
    let first = purger.request(&c, &req(85, None)).await.unwrap();
    let again = purger.request(&c, &req(85, None)).await.unwrap();
    assert_eq!(again.id, first.id, "the same request: the same purge");
    let other_device = purger.request(&c, &req(86, None)).await;
    assert!(
        matches!(&other_device, Err(PurgeError::IdempotencyConflict(id)) if *id == first.id),
        "{other_device:?}"
    );
    let day = Timestamp::from_second(1_700_000_000).unwrap();
    let other_range = purger.request(&c, &req(85, Some((day, day)))).await;
    assert!(
        matches!(other_range, Err(PurgeError::IdempotencyConflict(_))),
        "{other_range:?}"
    );
}

/// Owed audit lines that cannot be written (the audit stream unreachable) must not stop
/// the worker from carrying out the pending purges themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_audit_stream_does_not_stop_pending_purges() {
    use trackgate::audit::AUDIT_KEY;
    use trackgate::purge::{UNAUDITED_KEY, record_key};
    let redis = Backend::from_env();
    let c = customer(redis.conn()).await;
    let p = KeyRing::ephemeral().pseudonym(&Imei::new(&imei(76)).unwrap());
    let mut conn = redis.conn();
    for i in 0..3 {
        let _: String = conn
            .xadd(
                fixes_key(&p),
                "*",
                &[("t", i.to_string()), ("d", "x".into())],
            )
            .await
            .unwrap();
    }
    let purger = Purger::new(redis.conn(), TOMB_TTL);
    let id = purger.journal(&c, &whole_device(&p)).await.unwrap();
    // An audit line owed from long ago, and an audit stream that refuses appends.
    let _: () = conn
        .sadd(UNAUDITED_KEY, "0123456789abcdef00000000")
        .await
        .unwrap();
    let _: () = conn
        .hset_multiple(
            record_key("0123456789abcdef00000000"),
            &[("state", "completed"), ("completed_ms", "1")],
        )
        .await
        .unwrap();
    let _: () = conn.del(AUDIT_KEY).await.unwrap();
    let _: () = conn.set(AUDIT_KEY, "not a stream").await.unwrap();
    let _ = purger.work_once().await;
    assert_eq!(
        stream_len(&mut conn, &p).await,
        0,
        "the purge was carried out"
    );
    let receipt = purger.receipt(&id).await.unwrap().expect("receipt");
    assert_eq!(receipt.state, "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_purge_also_refuses_the_devices_cache_sent_after_it() {
    let redis = Backend::from_env();
    let (gw, keys) = start_gateway(redis.config()).await;
    let c = customer(redis.conn()).await;
    let id = imei(79);
    let p = pseudonym(&keys, &id);
    let mut conn = redis.conn();
    let before = now_s();
    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    t.send(&aaa_frame(&id, &fix_at(before, 0))).await;
    let key = fixes_key(&p);
    eventually(LONG, "the fix stored", || {
        let mut conn = conn.clone();
        let key = key.clone();
        async move { conn.xlen::<_, u64>(&key).await.unwrap() == 1 }
    })
    .await;
    let purger = Purger::new(conn.clone(), TOMB_TTL);
    let receipt = purger.request(&c, &whole_device(&p)).await.unwrap();
    assert_eq!(receipt.state, "completed");
    past_skew_margin(&receipt).await;
    // The device's cache, taken before the purge, arrives after it (a reconnect after a
    // coverage gap), with one fix taken after it.
    let after = Timestamp::from_second(now_s().as_second() + 1).unwrap();
    let cache = [
        fix_at(Timestamp::from_second(before.as_second() - 60).unwrap(), 1),
        fix_at(before, 2),
        fix_at(after, 3),
    ];
    t.send(&cce_frame(&id, &cache)).await;
    let reply = t.reply(LONG).await.expect("confirmed");
    assert!(
        reply.contains(",CCE,3*"),
        "the device may drop all three: {reply}"
    );
    let times = fix_times(&mut conn, &key).await;
    assert_eq!(
        times,
        [after.as_second()],
        "only the fix taken after the purge"
    );
    let (_, metrics) = common::gwproc::http_get(gw.http_addr.unwrap(), "/metrics")
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("trackgate_fixes_not_stored_total")
                && l.contains("reason=\"purged\"")),
        "counted"
    );
    gw.shutdown();
    gw.wait().await;
}
