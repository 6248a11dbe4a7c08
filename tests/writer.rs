//! The Redis writers (`trackgate::sink`) on a real redis-server: what a writer holds while
//! Redis cannot take its writes, the order a device's jobs reach its stream in after
//! retries, and the bound beyond which connections are pushed back. (That a failing
//! cluster shard holds back only its own devices is in `tests/cluster.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use common::*;
use tokio::sync::oneshot;
use trackgate::config::RedisConfig;
use trackgate::pseudonym::{KeyRing, Pseudonym};
use trackgate::sink::WriteJob;
use trackgate::store::StoredFix;
use trackgate::store::vault::Vault;
use trackgate_protocols::MessageKind;

const LONG: Duration = Duration::from_secs(15);

/// A job of one fix whose mileage marker is `1000 + i`.
fn job(device: &Pseudonym, i: i32) -> (WriteJob, oneshot::Receiver<()>) {
    let (tx, rx) = oneshot::channel();
    let job = WriteJob {
        device: device.clone(),
        fixes: vec![StoredFix::from_fix(MessageKind::Aaa, &fix_at(now_s(), i))],
        received_ms: jiff::Timestamp::now().as_millisecond(),
        ttl: Duration::from_secs(3600),
        done: Some(tx),
    };
    (job, rx)
}

fn one_writer(redis: &RedisServer) -> RedisConfig {
    let mut cfg = test_config(redis).redis;
    cfg.writers = 1;
    cfg
}

/// Jobs of one device submitted while Redis is frozen (the first one sent and timed out,
/// so retried under its batch id; the later ones queued behind it) reach the stream once
/// each, in the order they were read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_s_jobs_wait_behind_its_failed_one_and_keep_their_order() {
    let redis = RedisServer::start();
    let cfg = one_writer(&redis);
    let writers = start_writers(&cfg);
    let keys = KeyRing::ephemeral();
    let p = pseudonym(&keys, &imei(1));
    let (warm, warm_done) = job(&p, 0);
    writers.sink.submit(warm).await.unwrap();
    warm_done.await.unwrap();

    redis.freeze();
    let mut dones = Vec::new();
    for i in 1..=6 {
        let (j, done) = job(&p, i);
        writers.sink.submit(j).await.unwrap();
        dones.push(done);
        // Spread over several attempts: some jobs arrive while the first is retried.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    for d in &mut dones {
        assert!(
            d.try_recv().is_err(),
            "nothing confirmed while Redis is frozen"
        );
    }
    redis.thaw();
    for d in dones {
        tokio::time::timeout(LONG, d).await.unwrap().unwrap();
    }
    let mut conn = redis.conn().await;
    assert_eq!(
        stored_mileages(&mut conn, &Vault::empty(), &p).await,
        (1000..=1006).collect::<Vec<i64>>(),
        "each fix once, in the order read"
    );
}

/// A writer takes at most `held_max_jobs` jobs off its queue while Redis does not answer;
/// with the queue full too, the next submit waits (connections stop reading). Every job is
/// written once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_holds_at_most_held_max_jobs_then_pushes_back() {
    let redis = RedisServer::start();
    let mut cfg = one_writer(&redis);
    cfg.queue_depth_jobs = 2;
    cfg.held_max_jobs = 3;
    let writers = start_writers(&cfg);
    let keys = KeyRing::ephemeral();
    let devices: Vec<Pseudonym> = (10..16).map(|n| pseudonym(&keys, &imei(n))).collect();
    let (warm, warm_done) = job(&devices[0], 0);
    writers.sink.submit(warm).await.unwrap();
    warm_done.await.unwrap();

    redis.freeze();
    let mut dones = Vec::new();
    for p in &devices[..5] {
        let (j, done) = job(p, 1);
        tokio::time::timeout(Duration::from_secs(2), writers.sink.submit(j))
            .await
            .expect("room: held by the writer or queued")
            .unwrap();
        dones.push(done);
    }
    let (sixth, sixth_done) = job(&devices[5], 1);
    let sink = writers.sink.clone();
    let blocked = tokio::spawn(async move { sink.submit(sixth).await });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        !blocked.is_finished(),
        "3 held + 2 queued: the sixth job waits for room"
    );
    redis.thaw();
    tokio::time::timeout(LONG, blocked)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    dones.push(sixth_done);
    for d in dones {
        tokio::time::timeout(LONG, d).await.unwrap().unwrap();
    }
    let mut conn = redis.conn().await;
    for (n, p) in devices.iter().enumerate() {
        let want: Vec<i64> = if n == 0 { vec![1000, 1001] } else { vec![1001] };
        assert_eq!(
            stored_mileages(&mut conn, &Vault::empty(), p).await,
            want,
            "device {n}"
        );
    }
}

/// Retention upkeep on the write path: the first write trims and sets the expiry to
/// TTL + upkeep interval; writes within the interval leave it alone (it already covers
/// their TTL); a changed TTL (the owner's agreed retention) applies at the next write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_pushed_out_once_per_upkeep_interval_and_follows_a_ttl_change() {
    use redis::AsyncCommands;
    use trackgate::store::{fixes_key, meta_key};
    let redis = RedisServer::start();
    let cfg = one_writer(&redis);
    let writers = start_writers(&cfg); // upkeep interval: 60 s
    let keys = KeyRing::ephemeral();
    let p = pseudonym(&keys, &imei(30));
    let mut conn = redis.conn().await;
    let write = |i: i32, ttl: Duration| {
        let sink = writers.sink.clone();
        let p = p.clone();
        async move {
            let (mut j, done) = job(&p, i);
            j.ttl = ttl;
            sink.submit(j).await.unwrap();
            tokio::time::timeout(LONG, done).await.unwrap().unwrap();
        }
    };
    let hour = Duration::from_secs(3600);
    write(0, hour).await;
    let pttl: i64 = conn.pttl(fixes_key(&p)).await.unwrap();
    assert!(
        pttl > 3_600_000 && pttl <= 3_660_000,
        "TTL + upkeep interval: {pttl} ms"
    );
    let ue: i64 = conn.hget(meta_key(&p), "ue").await.unwrap();

    tokio::time::sleep(Duration::from_millis(1100)).await;
    write(1, hour).await;
    let ue_after: i64 = conn.hget(meta_key(&p), "ue").await.unwrap();
    assert_eq!(ue_after, ue, "within the interval: no upkeep");
    let pttl: i64 = conn.pttl(fixes_key(&p)).await.unwrap();
    assert!(pttl < 3_659_000, "expiry not pushed out again: {pttl} ms");

    let short = Duration::from_secs(600);
    write(2, short).await;
    let pttl: i64 = conn.pttl(fixes_key(&p)).await.unwrap();
    assert!(
        pttl > 600_000 && pttl <= 660_000,
        "a changed TTL applies at once: {pttl} ms"
    );
    let tt: i64 = conn.hget(meta_key(&p), "tt").await.unwrap();
    assert_eq!(tt, 600_000);
    assert_eq!(
        stored_mileages(&mut conn, &Vault::empty(), &p).await,
        vec![1000, 1001, 1002]
    );
}
