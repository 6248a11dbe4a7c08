//! End-to-end ingest against a real redis-server: ACK only after the write, backpressure,
//! Redis outages, shutdown, connection limits and timeouts.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use common::*;
use redis::AsyncCommands;
use trackgate::store::fixes_key;

const SHORT: Duration = Duration::from_millis(700);
const LONG: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aaa_cce_ccc_are_stored_and_batches_acknowledged() {
    let redis = Backend::from_env();
    let (gw, keys) = start_gateway(redis.config()).await;
    let id = imei(1);
    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    let now = now_s();

    t.send(&aaa_frame(&id, &fix_at(now, 0))).await;
    let fixes: Vec<_> = (0..5).map(|i| fix_at(now, i)).collect();
    t.send(&cce_frame(&id, &fixes)).await;
    let reply = t.reply(LONG).await.expect("CCE confirmation");
    assert!(
        reply.starts_with("@@A") && reply.contains(&format!(",{id},CCE,5*")),
        "{reply}"
    );
    t.send(&ccc_frame(&id, &fixes[..3])).await;
    let reply = t.reply(LONG).await.expect("CCC confirmation");
    assert!(reply.contains(",CCC,3*"), "{reply}");

    // Every fix is in the device's stream by the time its batch is confirmed: 1 + 5 + 3.
    let p = pseudonym(&keys, &id);
    let mut conn = redis.conn();
    assert_eq!(stream_len(&mut conn, &p).await, 9);
    let entries: redis::streams::StreamRangeReply = conn.xrange_all(fixes_key(&p)).await.unwrap();
    let first = &entries.ids[0];
    let fields: Vec<(String, Vec<u8>)> = first
        .map
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                redis::from_redis_value::<Vec<u8>>(v.clone()).unwrap(),
            )
        })
        .collect();
    let mut names: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable(); // the reply is a map: no order
    assert_eq!(names, ["e", "t"], "fix time and the sealed payload");
    let rec = trackgate::export::entry_json(&first.id, &fields, keys.vault(), &p);
    assert_eq!(rec["lat"], 48.137154);
    assert_eq!(rec["type"], "AAA");
    assert_eq!(rec["time"], now.to_string());
    let ttl_ms: i64 = conn.pttl(fixes_key(&p)).await.unwrap();
    assert!(ttl_ms > 0, "the stream carries an expiry");
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_is_withheld_while_redis_is_frozen_and_nothing_is_lost() {
    if !standalone_only("ack_is_withheld_while_redis_is_frozen_and_nothing_is_lost") {
        return;
    }
    let redis = RedisServer::start();
    let (gw, keys) = start_gateway(test_config(&redis)).await;
    let id = imei(2);
    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    let now = now_s();
    // Warm up: the connection to Redis exists before the freeze.
    t.send(&cce_frame(&id, &[fix_at(now, 0)])).await;
    assert!(t.reply(LONG).await.is_some());

    redis.freeze();
    let batch: Vec<_> = (1..=4).map(|i| fix_at(now, i)).collect();
    t.send(&cce_frame(&id, &batch)).await;
    t.send(&aaa_frame(&id, &fix_at(now, 9))).await;
    // Several response timeouts and retries pass; the device must hear nothing.
    assert_eq!(
        t.reply(Duration::from_millis(1500)).await,
        None,
        "no ACK before Redis confirms"
    );
    redis.thaw();
    let reply = t.reply(LONG).await.expect("ACK after Redis is back");
    assert!(reply.contains(",CCE,4*"), "{reply}");

    // Exactly once: the timed-out attempts ran on the server after the thaw too, yet the
    // stream holds each fix once (1 warm-up + 4 + 1 AAA).
    let p = pseudonym(&keys, &id);
    let mut conn = redis.conn().await;
    eventually(LONG, "AAA written", || {
        let mut conn = conn.clone();
        let p = p.clone();
        async move { stream_len(&mut conn, &p).await >= 6 }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stream_len(&mut conn, &p).await, 6);
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_resume_after_redis_restart() {
    if !standalone_only("writes_resume_after_redis_restart") {
        return;
    }
    let mut redis = RedisServer::start();
    let (gw, keys) = start_gateway(test_config(&redis)).await;
    let id = imei(3);
    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    let now = now_s();
    t.send(&ccc_frame(&id, &[fix_at(now, 0)])).await;
    assert!(t.reply(LONG).await.is_some());

    redis.restart(); // empty again, and the append script is gone
    t.send(&ccc_frame(&id, &[fix_at(now, 1), fix_at(now, 2)]))
        .await;
    let reply = t.reply(LONG).await.expect("ACK after reconnect");
    assert!(reply.contains(",CCC,2*"), "{reply}");
    let mut conn = redis.conn().await;
    assert_eq!(stream_len(&mut conn, &pseudonym(&keys, &id)).await, 2);
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_writes_and_acknowledges_what_was_read() {
    let redis = Backend::from_env();
    let mut config = redis.config();
    config.redis.batch_max_delay_ms = 50;
    let (gw, keys) = start_gateway(config).await;
    let now = now_s();
    let mut trackers = Vec::new();
    for n in 0..5 {
        let id = imei(100 + n);
        let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
        for i in 0..20 {
            t.send(&aaa_frame(&id, &fix_at(now, i))).await;
        }
        t.send(&cce_frame(&id, &[fix_at(now, 99)])).await;
        trackers.push((id, t));
    }
    // Let the gateway read the bytes, then stop it at once.
    tokio::time::sleep(Duration::from_millis(100)).await;
    gw.shutdown();
    for (_, t) in &mut trackers {
        let reply = t
            .reply(LONG)
            .await
            .expect("pending confirmation still sent");
        assert!(reply.contains(",CCE,1*"), "{reply}");
        assert!(t.closed_within(LONG).await, "closed after draining");
    }
    gw.wait().await;
    let mut conn = redis.conn();
    for (id, _) in &trackers {
        assert_eq!(
            stream_len(&mut conn, &pseudonym(&keys, id)).await,
            21,
            "all 21 fixes stored"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_rejects_the_excess_and_keeps_serving() {
    let redis = Backend::from_env();
    let mut config = redis.config();
    config.limits.max_connections = 2;
    let (gw, _keys) = start_gateway(config).await;
    let addr = gw.tracker_addrs[0];
    let now = now_s();
    let mut a = Tracker::connect(addr).await;
    let mut b = Tracker::connect(addr).await;
    a.send(&ccc_frame(&imei(10), &[fix_at(now, 0)])).await;
    b.send(&ccc_frame(&imei(11), &[fix_at(now, 0)])).await;
    assert!(a.reply(LONG).await.is_some() && b.reply(LONG).await.is_some());

    let mut c = Tracker::connect(addr).await;
    assert!(
        c.closed_within(LONG).await,
        "third connection is closed at once"
    );

    a.send(&ccc_frame(&imei(10), &[fix_at(now, 1)])).await;
    assert!(
        a.reply(LONG).await.is_some(),
        "existing devices keep being served"
    );
    drop(b);
    // A slot frees up: a new device gets in.
    eventually(
        LONG,
        "a new connection is served after one closed",
        || async {
            let mut d = Tracker::connect(addr).await;
            d.send(&ccc_frame(&imei(12), &[fix_at(now, 0)])).await;
            d.reply(SHORT).await.is_some()
        },
    )
    .await;
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_clients_are_closed() {
    let redis = Backend::from_env();
    let mut config = redis.config();
    config.limits.handshake_timeout_s = 1;
    config.limits.idle_timeout_s = 2;
    let (gw, _keys) = start_gateway(config).await;
    let addr = gw.tracker_addrs[0];

    let mut silent = Tracker::connect(addr).await;
    let started = std::time::Instant::now();
    assert!(silent.closed_within(Duration::from_secs(5)).await);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "not before the handshake timeout: {waited:?}"
    );

    // Half a frame never finishes: that is not activity.
    let mut slow = Tracker::connect(addr).await;
    slow.send(b"$$A100,35000").await;
    assert!(slow.closed_within(Duration::from_secs(5)).await);

    let mut idle = Tracker::connect(addr).await;
    idle.send(&ccc_frame(&imei(20), &[fix_at(now_s(), 0)]))
        .await;
    assert!(idle.reply(LONG).await.is_some());
    let started = std::time::Instant::now();
    assert!(idle.closed_within(Duration::from_secs(6)).await);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1800),
        "idle timeout, not handshake: {waited:?}"
    );
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_are_survived_then_the_connection_is_closed() {
    let redis = Backend::from_env();
    let mut config = redis.config();
    config.limits.max_consecutive_bad_frames = 3;
    let (gw, keys) = start_gateway(config).await;
    let id = imei(30);
    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    let now = now_s();
    let mut corrupt = ccc_frame(&id, &[fix_at(now, 0)]);
    let cs = corrupt.len() - 3;
    corrupt[cs] = if corrupt[cs] == b'0' { b'1' } else { b'0' }; // break the checksum

    t.send(b"garbage before the first frame").await;
    t.send(&corrupt).await;
    t.send(&ccc_frame(&id, &[fix_at(now, 1)])).await;
    assert!(
        t.reply(LONG).await.is_some(),
        "a single bad frame is survived"
    );
    // Another IMEI on a bound connection is refused.
    t.send(&ccc_frame(&imei(31), &[fix_at(now, 2)])).await;
    assert_eq!(t.reply(SHORT).await, None);
    let mut conn = redis.conn();
    assert_eq!(stream_len(&mut conn, &pseudonym(&keys, &imei(31))).await, 0);

    // The gateway may close before the last of these arrive: a failed write is expected.
    for _ in 0..4 {
        if t.try_send(&corrupt).await.is_err() {
            break;
        }
    }
    assert!(
        t.closed_within(LONG).await,
        "closed after max_consecutive_bad_frames"
    );
    assert_eq!(stream_len(&mut conn, &pseudonym(&keys, &id)).await, 1);
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identified_device_sending_endless_junk_is_closed() {
    let redis = Backend::from_env();
    let mut config = redis.config();
    config.limits.max_junk_bytes = 4096;
    let (gw, _keys) = start_gateway(config).await;
    let id = imei(40);
    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    t.send(&ccc_frame(&id, &[fix_at(now_s(), 0)])).await;
    assert!(t.reply(LONG).await.is_some(), "identified and served");
    // Junk under the limit between frames is survived ...
    t.send(&[b'#'; 3000]).await;
    t.send(&ccc_frame(&id, &[fix_at(now_s(), 1)])).await;
    assert!(
        t.reply(LONG).await.is_some(),
        "a frame resets the junk count"
    );
    // ... endless junk is not: the slot is freed long before the idle timeout.
    for _ in 0..16 {
        if t.try_send(&[b'#'; 1024]).await.is_err() {
            break;
        }
    }
    assert!(t.closed_within(SHORT * 4).await, "closed for junk");
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_follow_redis() {
    if !standalone_only("health_endpoints_follow_redis") {
        return;
    }
    let redis = RedisServer::start();
    let (gw, _keys) = start_gateway(test_config(&redis)).await;
    let http = gw.http_addr.expect("http bound");
    let get = |path: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
    assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
    let metrics = get("/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    redis.freeze();
    assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
    redis.thaw();
    assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_buffered_at_shutdown_are_still_stored() {
    if !standalone_only("frames_buffered_at_shutdown_are_still_stored") {
        return;
    }
    let redis = RedisServer::start();
    let mut config = test_config(&redis);
    config.limits.max_inflight_frames = 1;
    let (gw, keys) = start_gateway(config).await;
    let id = imei(50);
    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    let now = now_s();
    t.send(&ccc_frame(&id, &[fix_at(now, 0)])).await;
    assert!(t.reply(LONG).await.is_some());

    redis.freeze();
    // Five reports in one write: the gateway reads them in one go but, with one frame in
    // flight at most, still holds four in its read buffer when shutdown starts.
    let burst: Vec<u8> = (1..=5)
        .flat_map(|i| aaa_frame(&id, &fix_at(now, i)))
        .collect();
    t.send(&burst).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    gw.shutdown();
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.thaw();
    gw.wait().await;
    let mut conn = redis.conn().await;
    assert_eq!(stream_len(&mut conn, &pseudonym(&keys, &id)).await, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_broken_device_key_does_not_stall_the_others() {
    let redis = Backend::from_env();
    let mut config = redis.config();
    config.redis.writers = 1; // both devices share the writer
    let (gw, keys) = start_gateway(config).await;
    let broken = imei(51);
    let healthy = imei(52);
    let mut conn = redis.conn();
    // A tombstone that is not a number: the append script fails for this device only.
    let _: () = conn
        .set(
            trackgate::store::tomb_key(&pseudonym(&keys, &broken)),
            "not-a-number",
        )
        .await
        .unwrap();
    let now = now_s();
    let mut b = Tracker::connect(gw.tracker_addrs[0]).await;
    let mut h = Tracker::connect(gw.tracker_addrs[0]).await;
    b.send(&ccc_frame(&broken, &[fix_at(now, 0)])).await;
    h.send(&ccc_frame(&healthy, &[fix_at(now, 0)])).await;
    assert!(
        h.reply(LONG).await.is_some(),
        "the healthy device is confirmed"
    );
    assert_eq!(
        b.reply(Duration::from_secs(2)).await,
        None,
        "the broken one never is"
    );
    h.send(&ccc_frame(&healthy, &[fix_at(now, 1)])).await;
    assert!(h.reply(LONG).await.is_some(), "and the writer keeps going");
    assert_eq!(stream_len(&mut conn, &pseudonym(&keys, &broken)).await, 0);
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_device_frees_its_slot_while_redis_is_down() {
    if !standalone_only("a_gone_device_frees_its_slot_while_redis_is_down") {
        return;
    }
    let redis = RedisServer::start();
    let mut config = test_config(&redis);
    config.limits.max_connections = 2;
    let (gw, keys) = start_gateway(config).await;
    let addr = gw.tracker_addrs[0];
    let now = now_s();
    redis.freeze();
    for n in 0..2 {
        let mut t = Tracker::connect(addr).await;
        t.send(&cce_frame(&imei(60 + n), &[fix_at(now, 0)])).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(t); // the device gives up waiting and hangs up
    }
    // Still frozen: the departed devices' writes are pending, yet their slots come free
    // (before the fix they were held until Redis answered).
    eventually(
        LONG,
        "a new device gets a slot while Redis is still down",
        || async {
            let mut third = Tracker::connect(addr).await;
            !third.closed_within(SHORT).await
        },
    )
    .await;
    redis.thaw();
    // What the departed devices sent is still written.
    let mut conn = redis.conn().await;
    for n in 0..2 {
        let p = pseudonym(&keys, &imei(60 + n));
        eventually(LONG, "fixes of a departed device written", || {
            let mut conn = conn.clone();
            let p = p.clone();
            async move { stream_len(&mut conn, &p).await == 1 }
        })
        .await;
    }
    assert_eq!(stream_len(&mut conn, &pseudonym(&keys, &imei(60))).await, 1);
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_redis_does_not_confirm_in_time_frees_the_connection_slot() {
    if !standalone_only("a_frame_redis_does_not_confirm_in_time_frees_the_connection_slot") {
        return;
    }
    let redis = RedisServer::start();
    let mut config = test_config(&redis);
    config.limits.max_connections = 1;
    // Reading pauses after one unanswered frame: the connection then sees neither the
    // device's hang-up nor its idleness, only the ACK wait bound.
    config.limits.max_inflight_frames = 1;
    config.limits.ack_wait_timeout_s = 1;
    config.retention.lookup_timeout_ms = 200; // the first frame gets queued in time
    let (gw, keys) = start_gateway(config).await;
    let addr = gw.tracker_addrs[0];
    let id = imei(70);
    let now = now_s();
    redis.freeze();
    let mut t = Tracker::connect(addr).await;
    t.send(&cce_frame(&id, &[fix_at(now, 0)])).await;
    t.send(&cce_frame(&id, &[fix_at(now, 1)])).await;
    assert!(
        t.closed_within(Duration::from_secs(5)).await,
        "closed once the oldest frame waited limits.ack_wait_timeout_s"
    );
    assert_eq!(t.reply(SHORT).await, None, "and never acknowledged");
    // The only slot is free again while Redis is still down.
    let mut next = Tracker::connect(addr).await;
    assert!(
        !next.closed_within(SHORT).await,
        "a new device gets the slot"
    );
    redis.thaw();
    // The frame that was queued is still written.
    let conn = redis.conn().await;
    let p = pseudonym(&keys, &id);
    eventually(LONG, "the queued fix written", || {
        let mut conn = conn.clone();
        let p = p.clone();
        async move { stream_len(&mut conn, &p).await >= 1 }
    })
    .await;
    gw.shutdown();
    gw.wait().await;
}
