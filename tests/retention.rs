//! Hard TTL (DESIGN §6) with a TTL of seconds: expired fixes are refused at ingest, an
//! active device's stream is trimmed by the sweeper, a silent device's keys vanish.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use common::*;
use redis::AsyncCommands;
use trackgate::store::{fixes_key, meta_key};

const TTL_S: u64 = 2;
const SWEEP_S: u64 = 1;

fn config(redis: &Backend) -> trackgate::config::Config {
    let mut c = redis.config();
    c.retention.ttl_s = TTL_S;
    c.retention.sweep_interval_s = SWEEP_S;
    c
}

fn id_ms(id: &str) -> i64 {
    id.split_once('-').unwrap().0.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixes_older_than_the_ttl_are_dropped_at_ingest_but_confirmed() {
    let redis = Backend::from_env();
    let (gw, keys) = start_gateway(config(&redis)).await;
    let id = imei(40);
    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    let old = jiff::Timestamp::from_second(now_s().as_second() - 60).unwrap();
    t.send(&cce_frame(&id, &[fix_at(old, 0), fix_at(now_s(), 1)]))
        .await;
    let reply = t.reply(Duration::from_secs(10)).await.expect("confirmed");
    assert!(
        reply.contains(",CCE,2*"),
        "the device may delete both records: {reply}"
    );
    let mut conn = redis.conn();
    assert_eq!(
        stream_len(&mut conn, &pseudonym(&keys, &id)).await,
        1,
        "only the fresh fix"
    );
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_stream_is_trimmed_and_silent_device_vanishes() {
    let redis = Backend::from_env();
    let (gw, keys) = start_gateway(config(&redis)).await;
    let active = imei(41);
    let silent = imei(42);
    let mut a = Tracker::connect(gw.tracker_addrs[0]).await;
    let mut s = Tracker::connect(gw.tracker_addrs[0]).await;
    s.send(&ccc_frame(&silent, &[fix_at(now_s(), 0)])).await;
    assert!(s.reply(Duration::from_secs(10)).await.is_some());
    let mut conn = redis.conn();
    let sp = pseudonym(&keys, &silent);
    assert!(conn.exists::<_, bool>(fixes_key(&sp)).await.unwrap());

    // The active device reports every 250 ms for TTL + 2 sweeps, so its key never expires.
    let ap = pseudonym(&keys, &active);
    let started = std::time::Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(TTL_S + 2 * SWEEP_S + 1) {
        a.send(&ccc_frame(&active, &[fix_at(now_s(), i)])).await;
        assert!(a.reply(Duration::from_secs(10)).await.is_some());
        i += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Physically gone: no entry older than TTL + sweep interval is left in the raw stream.
    let now_ms = jiff::Timestamp::now().as_millisecond();
    let entries: redis::streams::StreamRangeReply = conn.xrange_all(fixes_key(&ap)).await.unwrap();
    assert!(!entries.ids.is_empty());
    let oldest = id_ms(&entries.ids[0].id);
    let bound = ((TTL_S + SWEEP_S) * 1000) as i64 + 300; // + scheduling slack
    assert!(
        now_ms - oldest <= bound,
        "oldest entry is {} ms old",
        now_ms - oldest
    );
    assert!(entries.ids.len() < i as usize, "older entries were removed");

    // The silent device's keys expired whole.
    assert!(!conn.exists::<_, bool>(fixes_key(&sp)).await.unwrap());
    assert!(!conn.exists::<_, bool>(meta_key(&sp)).await.unwrap());
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owners_agreed_retention_applies() {
    use trackgate::pseudonym::Imei;
    use trackgate::registry::Registry;
    let redis = Backend::from_env();
    let mut c = redis.config();
    c.retention.ttl_s = 3600; // default: an hour
    c.retention.ingest_upkeep_interval_s = 1;
    let (gw, keys) = start_gateway(c).await;
    let reg = Registry::new(redis.conn(), 365 * 86400);
    brief_customer(&reg).await;
    let id = imei(43);
    reg.assign(&Imei::new(&id).unwrap(), "brief", &keys)
        .await
        .unwrap();

    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    let old = jiff::Timestamp::from_second(now_s().as_second() - 30).unwrap();
    t.send(&cce_frame(&id, &[fix_at(old, 0), fix_at(now_s(), 1)]))
        .await;
    assert!(t.reply(Duration::from_secs(10)).await.is_some());
    let p = pseudonym(&keys, &id);
    let mut conn = redis.conn();
    assert_eq!(
        stream_len(&mut conn, &p).await,
        1,
        "30 s old is past the agreed 3 s"
    );
    let pttl: i64 = conn.pttl(fixes_key(&p)).await.unwrap();
    assert!(
        pttl > 0 && pttl <= 3000 + 1000,
        "stream expires with the agreed retention (+ the upkeep interval): {pttl} ms"
    );
    let tt: i64 = conn.hget(meta_key(&p), "tt").await.unwrap();
    assert_eq!(tt, 3000);
    gw.shutdown();
    gw.wait().await;
}

/// A customer "brief" with a three-second retention agreement.
async fn brief_customer<C>(reg: &trackgate::registry::Registry<C>)
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync,
{
    let mut short = trackgate::registry::Customer::new("brief", "Brief Ltd", "UTC");
    short.retention_s = Some(3); // agreed: three seconds
    reg.add_customer(&short).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agreed_retention_survives_a_key_rotation() {
    use trackgate::pseudonym::{Imei, KeyRing};
    use trackgate::registry::Registry;
    let redis = Backend::from_env();
    let mut c = redis.config();
    c.retention.ttl_s = 3600;
    let reg = Registry::new(redis.conn(), 365 * 86400);
    brief_customer(&reg).await;
    // Assigned while only key version 1 existed: its owner is recorded under v1 only.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.toml");
    KeyRing::generate(&file).unwrap();
    let id = imei(44);
    let dev = Imei::new(&id).unwrap();
    reg.assign(&dev, "brief", &KeyRing::load(&file).unwrap())
        .await
        .unwrap();
    KeyRing::rotate(&file, None).unwrap();
    let keys = std::sync::Arc::new(KeyRing::load(&file).unwrap());
    c.validate().unwrap();
    let gw = trackgate::gateway::Gateway::start(c, keys.clone())
        .await
        .unwrap();

    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    let old = jiff::Timestamp::from_second(now_s().as_second() - 30).unwrap();
    t.send(&cce_frame(&id, &[fix_at(old, 0), fix_at(now_s(), 1)]))
        .await;
    assert!(t.reply(Duration::from_secs(10)).await.is_some());
    let p = keys.pseudonym(&dev);
    assert_eq!(p.key_version(), 2, "written under the new key");
    let mut conn = redis.conn();
    assert_eq!(
        stream_len(&mut conn, &p).await,
        1,
        "the 30 s old fix is past the agreed 3 s, not kept for the 1 h default"
    );
    let tt: i64 = conn.hget(meta_key(&p), "tt").await.unwrap();
    assert_eq!(tt, 3000);
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_owners_retention_reaches_an_open_connection() {
    use trackgate::pseudonym::Imei;
    use trackgate::registry::Registry;
    let redis = Backend::from_env();
    let mut c = redis.config();
    c.retention.ttl_s = 3600;
    c.retention.ingest_upkeep_interval_s = 1;
    c.retention.owner_refresh_s = 1;
    let (gw, keys) = start_gateway(c).await;
    let reg = Registry::new(redis.conn(), 365 * 86400);
    brief_customer(&reg).await;
    let id = imei(45);
    let p = pseudonym(&keys, &id);
    let mut conn = redis.conn();
    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    t.send(&cce_frame(&id, &[fix_at(now_s(), 0)])).await;
    assert!(t.reply(Duration::from_secs(10)).await.is_some());
    let tt: i64 = conn.hget(meta_key(&p), "tt").await.unwrap();
    assert_eq!(tt, 3_600_000, "no owner yet: the default");

    // The device is sold to a customer with a shorter agreement; it stays connected.
    reg.assign(&Imei::new(&id).unwrap(), "brief", &keys)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    t.send(&cce_frame(&id, &[fix_at(now_s(), 1)])).await;
    assert!(t.reply(Duration::from_secs(10)).await.is_some());
    let tt: i64 = conn.hget(meta_key(&p), "tt").await.unwrap();
    assert_eq!(tt, 3000, "the owner's agreement, without a reconnect");
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_unknown_at_connect_is_provisional_and_corrected_by_the_next_frame() {
    use trackgate::pseudonym::Imei;
    use trackgate::registry::Registry;
    if !standalone_only(
        "a_retention_unknown_at_connect_is_provisional_and_corrected_by_the_next_frame",
    ) {
        return;
    }
    let redis = RedisServer::start();
    let mut c = test_config(&redis);
    c.retention.ttl_s = 3600;
    c.retention.ingest_upkeep_interval_s = 1;
    c.retention.lookup_timeout_ms = 200;
    let (gw, keys) = start_gateway(c).await;
    let reg = Registry::new(redis.conn().await, 365 * 86400);
    brief_customer(&reg).await;
    let id = imei(46);
    reg.assign(&Imei::new(&id).unwrap(), "brief", &keys)
        .await
        .unwrap();
    let p = pseudonym(&keys, &id);
    let mut conn = redis.conn().await;

    // Redis does not answer while the device identifies itself: its retention cannot be
    // looked up, the frame is kept (provisional retention) and written once Redis is back.
    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    redis.freeze();
    t.send(&cce_frame(&id, &[fix_at(now_s(), 0)])).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    redis.thaw();
    assert!(t.reply(Duration::from_secs(10)).await.is_some());
    let tt: i64 = conn.hget(meta_key(&p), "tt").await.unwrap();
    assert_eq!(
        tt,
        365 * 86_400_000,
        "provisional: the longest retention a device can have (nothing dropped or trimmed on a guess)"
    );
    // The next frame finds the agreement; the stream follows it from then on.
    t.send(&cce_frame(&id, &[fix_at(now_s(), 1)])).await;
    assert!(t.reply(Duration::from_secs(10)).await.is_some());
    let tt: i64 = conn.hget(meta_key(&p), "tt").await.unwrap();
    assert_eq!(tt, 3000, "corrected without a reconnect");
    let pttl: i64 = conn.pttl(fixes_key(&p)).await.unwrap();
    assert!(
        pttl <= 3000 + 1000,
        "the stream's expiry follows: {pttl} ms"
    );
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fix_delivered_late_is_swept_by_its_fix_time() {
    use trackgate::store::late_key;
    let redis = Backend::from_env();
    let mut c = config(&redis);
    c.retention.ttl_s = 3;
    c.retention.sweep_interval_s = 1; // and so: late = taken over 1 s before receipt
    let (gw, keys) = start_gateway(c).await;
    let id = imei(47);
    let p = pseudonym(&keys, &id);
    let mut conn = redis.conn();
    let now = now_s();
    let two_s_ago = jiff::Timestamp::from_second(now.as_second() - 2).unwrap();
    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    // Cached during a coverage gap: taken 2 s ago, received now with a fresh fix.
    t.send(&cce_frame(&id, &[fix_at(two_s_ago, 1), fix_at(now, 2)]))
        .await;
    assert!(t.reply(Duration::from_secs(10)).await.is_some());
    assert_eq!(stream_len(&mut conn, &p).await, 2);
    let indexed: u64 = conn.zcard(late_key(&p)).await.unwrap();
    assert_eq!(indexed, 1, "only the late one is indexed");
    // Both were received at once, so trimming by receive time would remove both at
    // once, 3 s from now; the late one goes about 2 s earlier, by its fix time.
    eventually(Duration::from_secs(5), "the late fix swept alone", || {
        let mut conn = conn.clone();
        let p = p.clone();
        async move { stream_len(&mut conn, &p).await == 1 }
    })
    .await;
    assert_eq!(
        stored_mileages(&mut conn, keys.vault(), &p).await,
        vec![1002],
        "the fresh one stays"
    );
    let indexed: u64 = conn.zcard(late_key(&p)).await.unwrap();
    assert_eq!(indexed, 0);
    gw.shutdown();
    gw.wait().await;
}
