//! Issue 8: the same behaviour on a standalone Redis and on a Redis Cluster (3 primaries +
//! 3 replicas started by the test), several gateways against one backend, and failover
//! with `WAIT 1` losing no acknowledged fix.
//!
//! Parameterised over both backends: ingest + ACK, purge and export through two gateways
//! (with the tombstone refusing a fix in flight on the other instance), the retention
//! sweep and its lease.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use redis::AsyncCommands;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use trackgate::gateway::Gateway;
use trackgate::pseudonym::{Imei, KeyRing, Pseudonym};
use trackgate::redis_conn::RedisConn;
use trackgate::registry::{Customer, Registry};
use trackgate::retention::{Retention, SWEEP_LEASE_KEY, sweep_once, try_lease};
use trackgate::sink::{self, WriteJob};
use trackgate::store::{StoredFix, fixes_key, meta_key};
use trackgate_protocols::MessageKind;

const LONG: Duration = Duration::from_secs(15);

async fn xlen(conn: &mut RedisConn, p: &Pseudonym) -> usize {
    conn.xlen(fixes_key(p)).await.unwrap()
}

/// Mileage values (the tests' per-fix marker) stored in a device's stream.
async fn mileages(conn: &mut RedisConn, keys: &KeyRing, p: &Pseudonym) -> HashSet<i64> {
    stored_mileages(conn, keys.vault(), p)
        .await
        .into_iter()
        .collect()
}

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: &str,
    body: Option<&Value>,
) -> (u16, String) {
    common::gwproc::http(addr, method, path, &[("Authorization", auth)], body)
        .await
        .expect("the API answers")
}

// ---------------------------------------------------------------------------------------
// Ingest: many devices (so many slots, every shard), ACK only after the write.

async fn ingest(backend: Backend) {
    let (gw, keys) = start_gateway(backend.config()).await;
    let mut conn = backend.conn();
    let devices: Vec<String> = (0..30).map(|n| imei(800 + n)).collect();
    let mut tasks = Vec::new();
    for id in devices.clone() {
        let addr = gw.tracker_addrs[0];
        tasks.push(tokio::spawn(async move {
            let mut t = Tracker::connect(addr).await;
            let fixes: Vec<_> = (0..3).map(|i| fix_at(now_s(), i)).collect();
            t.send(&cce_frame(&id, &fixes)).await;
            let r = t.reply(LONG).await.expect("CCE confirmed");
            assert!(r.contains(",CCE,3*"), "{r}");
            t.send(&ccc_frame(&id, &[fix_at(now_s(), 3)])).await;
            let r = t.reply(LONG).await.expect("CCC confirmed");
            assert!(r.contains(",CCC,"), "{r}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for id in &devices {
        let p = pseudonym(&keys, id);
        assert_eq!(xlen(&mut conn, &p).await, 4, "{}", backend.name());
        let kv: Option<String> = conn.hget(meta_key(&p), "kv").await.unwrap();
        assert!(kv.is_some(), "meta written beside the stream");
    }
    if let Backend::Cluster(c) = &backend {
        let shards: HashSet<u16> = devices
            .iter()
            .map(|id| c.primary_of(&fixes_key(&pseudonym(&keys, id))))
            .collect();
        assert_eq!(shards.len(), 3, "the devices spread over every shard");
    }
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_standalone() {
    ingest(Backend::standalone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_cluster() {
    ingest(Backend::cluster()).await;
}

// ---------------------------------------------------------------------------------------
// Two gateway instances: a device talks to B, its customer to A; the purge on A beats a
// fix still in flight on B.

async fn purge_and_export_across_instances(backend: Backend) {
    let keys = Arc::new(KeyRing::ephemeral());
    let a = Gateway::start(backend.config(), keys.clone())
        .await
        .unwrap();
    let b = Gateway::start(backend.config(), keys.clone())
        .await
        .unwrap();
    let conn = backend.conn();
    let reg = Registry::new(conn.clone(), 365 * 86400);
    let customer = Customer::new("acme", "ACME", "Europe/Berlin");
    reg.add_customer(&customer).await.unwrap();
    let (_, token) = reg.issue_token("acme").await.unwrap();
    let auth = format!("Bearer {token}");
    let id = imei(850);
    let imei_v = Imei::new(&id).unwrap();
    reg.assign(&imei_v, "acme", &keys).await.unwrap();
    let p = keys.pseudonym(&imei_v);

    let mut t = Tracker::connect(b.tracker_addrs[0]).await;
    let fixes: Vec<_> = (0..4).map(|i| fix_at(now_s(), i)).collect();
    t.send(&cce_frame(&id, &fixes)).await;
    assert!(t.reply(LONG).await.is_some());

    // Export on A sees what B wrote.
    let export = serde_json::json!({ "imei": id, "format": "ndjson" });
    let (status, body) = http(
        a.http_addr.unwrap(),
        "POST",
        "/v1/exports",
        &auth,
        Some(&export),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.lines().count(), 4, "{}: {body}", backend.name());

    // A write job B read before the purge but that reaches Redis after it.
    let mut cfg = backend.config().redis;
    cfg.writers = 1;
    let upkeep = sink::Upkeep::from(&backend.config().retention);
    let oom = std::sync::Arc::new(trackgate::redis_memory::OomWatch::from(&cfg));
    let in_flight = sink::start(conn.clone(), &cfg, upkeep, CancellationToken::new(), oom);

    let purge = serde_json::json!({ "imei": id });
    let (status, receipt) = http(
        a.http_addr.unwrap(),
        "POST",
        "/v1/purges",
        &auth,
        Some(&purge),
    )
    .await;
    assert_eq!(status, 200, "{receipt}");
    let receipt: Value = serde_json::from_str(&receipt).unwrap();
    assert_eq!(receipt["state"], "completed");
    assert_eq!(receipt["deleted_fixes"], 4);
    let cutoff_ms = receipt["cutoff"]
        .as_str()
        .unwrap()
        .parse::<jiff::Timestamp>()
        .unwrap()
        .as_millisecond();

    let (tx, rx) = tokio::sync::oneshot::channel();
    in_flight
        .sink
        .submit(WriteJob {
            device: p.clone(),
            fixes: vec![StoredFix::from_fix(MessageKind::Aaa, &fix_at(now_s(), 9))],
            received_ms: cutoff_ms - 20,
            ttl: Duration::from_secs(3600),
            done: Some(tx),
        })
        .await
        .unwrap();
    rx.await.unwrap();
    let mut c = conn.clone();
    assert_eq!(
        xlen(&mut c, &p).await,
        0,
        "the tombstone refused the late fix"
    );

    // Export and receipt on B: nothing left, completed.
    let (status, body) = http(
        b.http_addr.unwrap(),
        "POST",
        "/v1/exports",
        &auth,
        Some(&export),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body.lines().count(), 0, "{body}");
    let rid = receipt["id"].as_str().unwrap();
    let (status, r) = http(
        b.http_addr.unwrap(),
        "GET",
        &format!("/v1/purges/{rid}"),
        &auth,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(r.contains("\"completed\""), "{r}");

    // New fixes received after the purge (and its clock-skew margin) are stored again.
    past_purge_margin(cutoff_ms, backend.config().purge.clock_skew_margin_ms).await;
    t.send(&ccc_frame(&id, &[fix_at(now_s(), 10)])).await;
    assert!(t.reply(LONG).await.is_some());
    assert_eq!(xlen(&mut c, &p).await, 1);
    for gw in [a, b] {
        gw.shutdown();
        gw.wait().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_and_export_across_instances_standalone() {
    purge_and_export_across_instances(Backend::standalone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_and_export_across_instances_cluster() {
    purge_and_export_across_instances(Backend::cluster()).await;
}

// ---------------------------------------------------------------------------------------
// Retention: the sweep reaches streams on every shard; one gateway sweeps per interval.

async fn sweep_and_lease(backend: Backend) {
    let mut conn = backend.conn();
    let keys = KeyRing::ephemeral();
    let now_ms = jiff::Timestamp::now().as_millisecond();
    let devices: Vec<Pseudonym> = (0..24)
        .map(|n| keys.pseudonym(&Imei::new(&imei(870 + n)).unwrap()))
        .collect();
    for p in &devices {
        // Two entries past a 2 s TTL, one fresh.
        for (i, at) in [now_ms - 9000, now_ms - 8000, now_ms].iter().enumerate() {
            let _: String = conn
                .xadd(fixes_key(p), format!("{at}-0"), &[("t", i)])
                .await
                .unwrap();
        }
        let _: () = conn.hset(meta_key(p), "tt", 2000).await.unwrap();
    }
    let cfg = trackgate::config::RetentionConfig {
        ttl_s: 2,
        ..Default::default()
    };
    let trimmed = sweep_once(&conn, &Retention::new(&cfg)).await.unwrap();
    assert_eq!(trimmed, 48, "{}", backend.name());
    for p in &devices {
        assert_eq!(xlen(&mut conn, p).await, 1);
    }

    // The lease: the first instance gets it, the second skips, and it frees in time.
    let lease = Duration::from_millis(300);
    assert!(
        try_lease(&mut conn, SWEEP_LEASE_KEY, "gw-a", lease)
            .await
            .unwrap()
    );
    assert!(
        !try_lease(&mut conn, SWEEP_LEASE_KEY, "gw-b", lease)
            .await
            .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        try_lease(&mut conn, SWEEP_LEASE_KEY, "gw-b", lease)
            .await
            .unwrap()
    );
}

/// `XTRIM` calls so far, summed over every primary (`INFO commandstats`).
fn xtrim_calls(cluster: &RedisCluster) -> u64 {
    cluster
        .seed_urls()
        .into_iter()
        .filter_map(|u| redis::Client::open(u).ok()?.get_connection().ok())
        .map(|mut c| {
            let info: String = redis::cmd("INFO")
                .arg("commandstats")
                .query(&mut c)
                .unwrap_or_default();
            let role: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut c)
                .unwrap_or_default();
            if !role.contains("role:master") {
                return 0;
            }
            info.lines()
                .find_map(|l| l.strip_prefix("cmdstat_xtrim:calls="))
                .and_then(|v| v.split(',').next()?.parse().ok())
                .unwrap_or(0)
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_sweep_once_per_interval() {
    let backend = Backend::cluster();
    let Backend::Cluster(cluster) = &backend else {
        unreachable!()
    };
    let mut conn = backend.conn();
    let keys = KeyRing::ephemeral();
    const STREAMS: u64 = 20;
    for n in 0..STREAMS as u32 {
        let p = keys.pseudonym(&Imei::new(&imei(700 + n)).unwrap());
        let _: String = conn.xadd(fixes_key(&p), "*", &[("t", 1)]).await.unwrap();
    }
    let before = xtrim_calls(cluster);
    let mut config = backend.config();
    config.retention.sweep_interval_s = 1;
    let keys = Arc::new(KeyRing::ephemeral());
    let a = Gateway::start(config.clone(), keys.clone()).await.unwrap();
    let b = Gateway::start(config, keys).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    for gw in [a, b] {
        gw.shutdown();
        gw.wait().await;
    }
    // Ticks at about 0, 1, 2, 3 s on each gateway: one sweep per tick with the lease
    // (4 × STREAMS trims), two without it (8 × STREAMS).
    let sweeps = (xtrim_calls(cluster) - before) as f64 / STREAMS as f64;
    eprintln!("two gateways, 3.5 s, 1 s interval: {sweeps} sweeps");
    assert!(
        (2.0..=5.0).contains(&sweeps),
        "{sweeps} sweeps of every stream in 3.5 s by two gateways"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_and_lease_standalone() {
    sweep_and_lease(Backend::standalone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_and_lease_cluster() {
    sweep_and_lease(Backend::cluster()).await;
}

// ---------------------------------------------------------------------------------------
// Failover: kill a primary while devices keep sending through two gateways, one with
// `WAIT 1` and one without. Without WAIT the writers follow the promoted replica within
// seconds. With WAIT the promoted replica has no replica of its own, so acknowledgements
// are withheld until the old primary is back as its replica; then they flow again, and
// every fix ever acknowledged is still there.

/// A device sending CCC frames of 2 fixes, waiting for each confirmation; returns the
/// mileage markers acknowledged and when (since `t0`) each frame was confirmed.
fn device(
    addr: SocketAddr,
    id: String,
    stop: CancellationToken,
    t0: std::time::Instant,
) -> tokio::task::JoinHandle<(String, Vec<i64>, Vec<Duration>)> {
    tokio::spawn(async move {
        let mut t = Tracker::connect(addr).await;
        let mut acked: Vec<i64> = Vec::new();
        let mut confirmed_at = Vec::new();
        let mut i = 0i32;
        while !stop.is_cancelled() {
            let fixes = [fix_at(now_s(), i), fix_at(now_s(), i + 1)];
            t.send(&ccc_frame(&id, &fixes)).await;
            let r = t.reply(Duration::from_secs(40)).await.expect("confirmed");
            assert!(r.contains(",CCC,"), "{r}");
            acked.extend([1000 + i64::from(i), 1001 + i64::from(i)]);
            confirmed_at.push(t0.elapsed());
            i += 2;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (id, acked, confirmed_at)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_with_wait_loses_no_acknowledged_fix() {
    let mut backend = Backend::cluster();
    let keys = Arc::new(KeyRing::ephemeral());
    let mut waiting = backend.config();
    waiting.redis.wait_replicas = 1;
    waiting.redis.wait_timeout_ms = 500;
    let gw_wait = Gateway::start(waiting, keys.clone()).await.unwrap();
    let gw_plain = Gateway::start(backend.config(), keys.clone())
        .await
        .unwrap();
    let Backend::Cluster(cluster) = &mut backend else {
        unreachable!()
    };
    let shard = |c: &RedisCluster, id: &str| c.primary_of(&fixes_key(&pseudonym(&keys, id)));
    let victim = shard(cluster, &imei(900));
    // Devices on the victim's shard only, so what is measured is that shard's failover.
    let on_victim: Vec<String> = (900..960)
        .map(imei)
        .filter(|id| shard(cluster, id) == victim)
        .take(8)
        .collect();
    assert!(on_victim.len() >= 4);
    let (with_wait, without_wait) = on_victim.split_at(on_victim.len() / 2);

    let t0 = std::time::Instant::now();
    let stop = CancellationToken::new();
    let mut waited = Vec::new();
    let mut plain = Vec::new();
    for id in with_wait {
        waited.push(device(
            gw_wait.tracker_addrs[0],
            id.clone(),
            stop.clone(),
            t0,
        ));
    }
    for id in without_wait {
        plain.push(device(
            gw_plain.tracker_addrs[0],
            id.clone(),
            stop.clone(),
            t0,
        ));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.node_mut(victim).kill();
    let killed_at = t0.elapsed();
    // Failover takes ~node timeout (1 s) + election.
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.node_mut(victim).restart();
    let restarted_at = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.cancel();
    let join = |tasks: Vec<tokio::task::JoinHandle<_>>| async move {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    };
    let waited = join(waited).await;
    let plain = join(plain).await;
    cluster.wait_ok(Duration::from_secs(20));
    assert_ne!(shard(cluster, &with_wait[0]), victim, "a replica took over");

    let mut conn = backend.conn();
    for (id, acked, at) in &plain {
        let during = at
            .iter()
            .filter(|t| **t > killed_at && **t < restarted_at)
            .count();
        assert!(
            during > 5,
            "{id}: without WAIT, writes resumed on the promoted replica ({during} frames)"
        );
        let _ = acked;
    }
    let mut total = 0;
    for (id, acked, at) in &waited {
        let stored = mileages(&mut conn, &keys, &pseudonym(&keys, id)).await;
        let lost: Vec<&i64> = acked.iter().filter(|m| !stored.contains(m)).collect();
        assert!(lost.is_empty(), "{id}: acknowledged but lost: {lost:?}");
        let after = at.iter().filter(|t| **t > restarted_at).count();
        assert!(
            after > 5,
            "{id}: with WAIT, acknowledgements flow again ({after} frames)"
        );
        total += acked.len();
    }
    eprintln!(
        "failover: {total} fixes acknowledged with WAIT 1, none lost; killed at {killed_at:?}, restarted at {restarted_at:?}"
    );
    for gw in [gw_wait, gw_plain] {
        gw.shutdown();
        gw.wait().await;
    }
}

// ---------------------------------------------------------------------------------------
// WAIT on a standalone primary with one replica: no ACK while the replica cannot confirm.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_withholds_the_ack_until_a_replica_has_the_write() {
    let primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(&primary);
    let mut config = test_config(&primary);
    config.redis.wait_replicas = 1;
    config.redis.wait_timeout_ms = 200;
    let (gw, keys) = start_gateway(config).await;
    let id = imei(990);
    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    t.send(&ccc_frame(&id, &[fix_at(now_s(), 0)])).await;
    assert!(
        t.reply(LONG).await.is_some(),
        "confirmed with the replica up"
    );

    replica.freeze();
    t.send(&ccc_frame(&id, &[fix_at(now_s(), 1)])).await;
    assert_eq!(
        t.reply(Duration::from_millis(1500)).await,
        None,
        "no ACK while no replica confirms"
    );
    replica.thaw();
    assert!(t.reply(LONG).await.is_some(), "confirmed once it does");
    let mut conn = primary.conn().await;
    assert_eq!(
        stream_len(&mut conn, &pseudonym(&keys, &id)).await,
        2,
        "written once"
    );
    let mut rc = replica.conn().await;
    assert_eq!(
        stream_len(&mut rc, &pseudonym(&keys, &id)).await,
        2,
        "and replicated"
    );
    gw.shutdown();
    gw.wait().await;
}

// ---------------------------------------------------------------------------------------
// A shard that cannot satisfy `WAIT` holds back only its own devices: one writer carries
// every device, one shard's replica is frozen, and devices on the other shards keep
// getting their ACKs; the frozen shard's devices get theirs once the replica is back, and
// every fix is stored once.

/// Devices connected to a gateway, each confirmed once: (IMEI, tracker).
type Fleet = Vec<(String, Tracker<tokio::net::TcpStream>)>;

/// From the IMEIs numbered `range`: `stalled` devices on the shard of the first and
/// `healthy` devices on the two others, each connected to `addr` and confirmed once.
/// Returns the first shard's primary and both fleets.
async fn two_fleets(
    cluster: &RedisCluster,
    keys: &KeyRing,
    addr: SocketAddr,
    range: std::ops::Range<u32>,
    stalled: usize,
    healthy: usize,
) -> (u16, Fleet, Fleet) {
    let shard = |id: &str| cluster.primary_of(&fixes_key(&pseudonym(keys, id)));
    let ids: Vec<String> = range.map(imei).collect();
    let primary = shard(&ids[0]);
    let pick = |on: bool, n: usize| -> Vec<String> {
        ids.iter()
            .filter(|id| (shard(id) == primary) == on)
            .take(n)
            .cloned()
            .collect()
    };
    // The healthy devices alternate between the two other shards (the first ones alone
    // could all land on one of them: the keys, and so the slots, are new every run).
    let mut others_by_shard: std::collections::BTreeMap<u16, Vec<String>> = Default::default();
    for id in pick(false, usize::MAX) {
        others_by_shard.entry(shard(&id)).or_default().push(id);
    }
    let mut healthy_ids = Vec::new();
    for i in 0.. {
        let round: Vec<&String> = others_by_shard.values().filter_map(|v| v.get(i)).collect();
        if round.is_empty() || healthy_ids.len() >= healthy {
            break;
        }
        healthy_ids.extend(round.into_iter().cloned());
    }
    healthy_ids.truncate(healthy);
    let stalled_ids = pick(true, stalled);
    assert_eq!(stalled_ids.len(), stalled, "enough devices on one shard");
    let others: HashSet<u16> = healthy_ids.iter().map(|id| shard(id)).collect();
    assert_eq!(
        others.len(),
        2,
        "the healthy devices span both other shards"
    );
    let mut fleets = (Vec::new(), Vec::new());
    for (ids, fleet) in [(&stalled_ids, &mut fleets.0), (&healthy_ids, &mut fleets.1)] {
        for id in ids {
            let mut t = Tracker::connect(addr).await;
            t.send(&ccc_frame(id, &[fix_at(now_s(), 0)])).await;
            assert!(
                t.reply(LONG).await.is_some(),
                "{id}: confirmed before the freeze"
            );
            fleet.push((id.clone(), t));
        }
    }
    (primary, fleets.0, fleets.1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_without_its_replica_holds_back_only_its_own_devices() {
    let mut backend = Backend::cluster();
    let keys = Arc::new(KeyRing::ephemeral());
    let mut config = backend.config();
    config.redis.wait_replicas = 1;
    config.redis.wait_timeout_ms = 300;
    config.redis.writers = 1; // every device on one writer: the worst case
    let gw = Gateway::start(config, keys.clone()).await.unwrap();
    let Backend::Cluster(cluster) = &mut backend else {
        unreachable!()
    };
    let (stalled_primary, mut stalled, mut healthy) =
        two_fleets(cluster, &keys, gw.tracker_addrs[0], 700..760, 3, 6).await;

    let replica = cluster.replica_of(stalled_primary);
    cluster.node_mut(replica).freeze();
    for (id, t) in &mut stalled {
        t.send(&ccc_frame(id, &[fix_at(now_s(), 1)])).await;
    }
    // Several rounds while the stalled shard's writes are retried (each retry waits
    // out its WAIT): the other shards' devices are confirmed all along.
    for round in 1..=5 {
        for (id, t) in &mut healthy {
            t.send(&ccc_frame(id, &[fix_at(now_s(), round)])).await;
            assert!(
                t.reply(Duration::from_secs(2)).await.is_some(),
                "{id}: confirmed in round {round} although another shard cannot replicate"
            );
        }
    }
    for (id, t) in &mut stalled {
        assert_eq!(
            t.reply(Duration::from_millis(200)).await,
            None,
            "{id}: not confirmed while its shard's replica is frozen"
        );
    }
    cluster.node_mut(replica).thaw();
    for (id, t) in &mut stalled {
        assert!(
            t.reply(Duration::from_secs(30)).await.is_some(),
            "{id}: confirmed once the replica is back"
        );
    }
    let mut conn = backend.conn();
    for (id, _) in &stalled {
        assert_eq!(
            xlen(&mut conn, &pseudonym(&keys, id)).await,
            2,
            "{id}: written once"
        );
    }
    for (id, _) in &healthy {
        assert_eq!(
            xlen(&mut conn, &pseudonym(&keys, id)).await,
            6,
            "{id}: written once"
        );
    }
    gw.shutdown();
    gw.wait().await;
}

/// The same, with more held for the failing shard than the writer-wide bound: the writer
/// closes that node's slots (its devices' connections stop being read) and keeps taking
/// the other shards' jobs; everything is written once the replica is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_shard_beyond_the_held_bound_is_gated_not_the_others() {
    let mut backend = Backend::cluster();
    let keys = Arc::new(KeyRing::ephemeral());
    let mut config = backend.config();
    config.redis.wait_replicas = 1;
    config.redis.wait_timeout_ms = 300;
    config.redis.writers = 1;
    config.redis.held_max_jobs = 12;
    config.redis.node_held_max_jobs = 4;
    let gw = Gateway::start(config, keys.clone()).await.unwrap();
    let Backend::Cluster(cluster) = &mut backend else {
        unreachable!()
    };
    let (stalled_primary, mut stalled, mut healthy) =
        two_fleets(cluster, &keys, gw.tracker_addrs[0], 800..900, 6, 6).await;

    let replica = cluster.replica_of(stalled_primary);
    cluster.node_mut(replica).freeze();
    // 6 devices x 4 frames = 24 jobs for the failing shard, twice the writer-wide bound.
    for round in 1..=4 {
        for (id, t) in &mut stalled {
            t.send(&ccc_frame(id, &[fix_at(now_s(), round)])).await;
        }
        for (id, t) in &mut healthy {
            t.send(&ccc_frame(id, &[fix_at(now_s(), round)])).await;
            assert!(
                t.reply(Duration::from_secs(3)).await.is_some(),
                "{id}: confirmed in round {round} while the other shard holds more than the bound"
            );
        }
    }
    cluster.node_mut(replica).thaw();
    for (id, t) in &mut stalled {
        for round in 1..=4 {
            assert!(
                t.reply(Duration::from_secs(30)).await.is_some(),
                "{id}: frame {round} confirmed once the replica is back"
            );
        }
    }
    let mut conn = backend.conn();
    for (id, _) in stalled.iter().chain(&healthy) {
        assert_eq!(
            xlen(&mut conn, &pseudonym(&keys, id)).await,
            5,
            "{id}: each fix once"
        );
    }
    gw.shutdown();
    gw.wait().await;
}

// ---------------------------------------------------------------------------------------
// Resharding: a device's slot moves to another primary while it keeps sending; the
// writers follow (ASK/TRYAGAIN while it moves, MOVED after: fetch the slot map again) and
// nothing acknowledged is lost.

fn node_id(port: u16) -> String {
    let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_connection()
        .unwrap();
    redis::cmd("CLUSTER").arg("MYID").query(&mut c).unwrap()
}

/// Move `slot` from primary `from` to primary `to` (the steps of `redis-cli --cluster
/// reshard`, for one slot).
fn migrate_slot(cluster: &RedisCluster, slot: i64, from: u16, to: u16) {
    let conn = |port: u16| {
        redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_connection()
            .unwrap()
    };
    let (from_id, to_id) = (node_id(from), node_id(to));
    let (mut src, mut dst) = (conn(from), conn(to));
    let setslot = |c: &mut redis::Connection, state: &str, id: &str| {
        let _: () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg(state)
            .arg(id)
            .query(c)
            .unwrap();
    };
    setslot(&mut dst, "IMPORTING", &from_id);
    setslot(&mut src, "MIGRATING", &to_id);
    loop {
        let keys: Vec<String> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(100)
            .query(&mut src)
            .unwrap();
        if keys.is_empty() {
            break;
        }
        let _: () = redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(to)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .query(&mut src)
            .unwrap();
    }
    for n in cluster
        .nodes
        .iter()
        .filter(|n| n.port == from || n.port == to)
    {
        setslot(&mut conn(n.port), "NODE", &to_id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_follow_a_resharded_slot() {
    let backend = Backend::cluster();
    let (gw, keys) = start_gateway(backend.config()).await;
    let Backend::Cluster(cluster) = &backend else {
        unreachable!()
    };
    let id = imei(980);
    let key = fixes_key(&pseudonym(&keys, &id));
    let from = cluster.primary_of(&key);
    // Another primary: the one serving some other key.
    let to = (0..1000)
        .map(|n| cluster.primary_of(&format!("probe{n}")))
        .find(|p| *p != from)
        .unwrap();
    let stop = CancellationToken::new();
    let t0 = std::time::Instant::now();
    let sender = device(gw.tracker_addrs[0], id.clone(), stop.clone(), t0);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut c = redis::Client::open(format!("redis://127.0.0.1:{from}"))
        .unwrap()
        .get_connection()
        .unwrap();
    let slot: i64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(&key)
        .query(&mut c)
        .unwrap();
    migrate_slot(cluster, slot, from, to);
    let moved_at = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let (_, acked, at) = sender.await.unwrap();
    assert_eq!(cluster.primary_of(&key), to, "the slot moved");
    let after = at.iter().filter(|t| **t > moved_at).count();
    assert!(
        after > 5,
        "writes continued on the new primary ({after} frames)"
    );
    let stored = mileages(&mut backend.conn(), &keys, &pseudonym(&keys, &id)).await;
    let lost: Vec<&i64> = acked.iter().filter(|m| !stored.contains(m)).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    gw.shutdown();
    gw.wait().await;
}

// ---------------------------------------------------------------------------------------
// Sizing measurement (docs/scaling.md), not a check: run on demand with
//   cargo test --release --test cluster measure_scaling -- --ignored --nocapture
// Env: TG_MEASURE_BACKEND=cluster|standalone, TG_MEASURE_DEVICES (per gateway),
// TG_MEASURE_INTERVAL_MS, TG_MEASURE_SECONDS. Two gateways (in this process) each get
// their own simulated fleet (in a separate runtime, so its CPU is counted apart).

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds of this process's threads, split into (fleet threads, the rest).
fn thread_cpu_s() -> (f64, f64) {
    let tick = 100.0; // USER_HZ
    let (mut fleet, mut rest) = (0.0, 0.0);
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = &stat[open + 1..close];
        let f: Vec<&str> = stat[close + 2..].split(' ').collect();
        let cpu = (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / tick;
        if name.starts_with("fleet") {
            fleet += cpu;
        } else {
            rest += cpu;
        }
    }
    (fleet, rest)
}

/// Per primary (used_memory bytes, CPU seconds), and the replicas' CPU seconds in all.
fn redis_usage(backend: &Backend) -> (Vec<u64>, Vec<f64>, f64) {
    let urls: Vec<String> = match backend {
        Backend::Standalone(r) => vec![r.url()],
        Backend::Cluster(c) => c.seed_urls(),
    };
    let (mut mem, mut cpu, mut replicas) = (Vec::new(), Vec::new(), 0.0);
    for u in urls {
        let mut c = redis::Client::open(u).unwrap().get_connection().unwrap();
        let info: String = redis::cmd("INFO").arg("all").query(&mut c).unwrap();
        let field = |k: &str| -> f64 {
            info.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0.0)
        };
        let used = field("used_cpu_sys:") + field("used_cpu_user:");
        if !info.contains("role:master") {
            replicas += used;
            continue;
        }
        mem.push(field("used_memory:") as u64);
        cpu.push(used);
    }
    (mem, cpu, replicas)
}

async fn fixes_written(http: SocketAddr) -> f64 {
    let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.lines()
        .find_map(|l| l.strip_prefix("trackgate_fixes_written_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement for docs/scaling.md; run on demand"]
async fn measure_scaling() {
    use trackgate::loadgen::fleet::{self, FleetConfig, FleetStats};
    let backend = match std::env::var("TG_MEASURE_BACKEND").as_deref() {
        Ok("standalone") => Backend::standalone(),
        _ => Backend::cluster(),
    };
    let devices = env_u64("TG_MEASURE_DEVICES", 1000) as usize;
    let interval = Duration::from_millis(env_u64("TG_MEASURE_INTERVAL_MS", 200));
    let seconds = env_u64("TG_MEASURE_SECONDS", 20);
    let wait = env_u64("TG_MEASURE_WAIT", 0) as u32;
    let keys = Arc::new(KeyRing::ephemeral());
    let mut gws = Vec::new();
    for _ in 0..2 {
        let mut config = backend.config();
        config.redis.wait_replicas = wait;
        config.redis.wait_timeout_ms = 500;
        gws.push(Gateway::start(config, keys.clone()).await.unwrap());
    }
    let fleet_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("fleet")
        .enable_all()
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let stats = Arc::new(FleetStats::default());
    let mut fleets = Vec::new();
    for (g, gw) in gws.iter().enumerate() {
        let mut fc = FleetConfig::new(gw.tracker_addrs[0], devices);
        fc.report_interval = interval;
        fc.imei_base = 350_000_000_000_000 + (g as u64) * 1_000_000;
        fc.seed = g as u64 + 1;
        fleets.push(fleet_rt.spawn(fleet::run(fc, stats.clone(), stop.clone())));
    }
    let http = gws[0].http_addr.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await; // connect, create every stream
    let (mem0, rcpu0, repl0) = redis_usage(&backend);
    let (fcpu0, gcpu0) = thread_cpu_s();
    let c0 = stats.counters();
    let w0 = fixes_written(http).await;
    let _ = stats.take_interval(); // latency of the window only
    let t0 = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let w1 = fixes_written(http).await;
    let el = t0.elapsed().as_secs_f64();
    let (fcpu1, gcpu1) = thread_cpu_s();
    let (mem1, rcpu1, repl1) = redis_usage(&backend);
    let acks = stats.take_interval();
    let c1 = stats.counters();
    stop.cancel();
    for f in fleets {
        let _ = f.await;
    }
    let fixes = w1 - w0;
    let rate = fixes / el;
    let shards = mem1.len();
    let redis_cpu: Vec<f64> = rcpu1
        .iter()
        .zip(&rcpu0)
        .map(|(a, b)| (a - b) / el)
        .collect();
    let mem_growth: i64 = mem1.iter().sum::<u64>() as i64 - mem0.iter().sum::<u64>() as i64;
    let gw_cpu = (gcpu1 - gcpu0) / el;
    println!(
        "backend={} shards={shards} gateways=2 devices={} interval_ms={} wait_replicas={wait} window_s={el:.1}",
        backend.name(),
        2 * devices,
        interval.as_millis()
    );
    println!(
        "stored fixes/s (both gateways): {rate:.0}; sent {:.2} fixes per frame",
        (c1.fixes_sent - c0.fixes_sent) as f64 / (c1.frames_sent - c0.frames_sent).max(1) as f64
    );
    println!(
        "gateway process CPU (2 gateways + test harness, not the fleet): {gw_cpu:.2} cores -> {:.0} fixes/s per gateway core",
        rate / gw_cpu.max(1e-9)
    );
    println!("fleet CPU: {:.2} cores", (fcpu1 - fcpu0) / el);
    for (i, c) in redis_cpu.iter().enumerate() {
        println!(
            "shard {i}: CPU {c:.2} cores, ~{:.0} fixes/s per shard core",
            (rate / shards as f64) / c.max(1e-9)
        );
    }
    println!("replicas CPU: {:.2} cores in all", (repl1 - repl0) / el);
    println!(
        "redis memory growth: {:.1} B per fix (all primaries, {} fixes)",
        mem_growth as f64 / fixes.max(1.0),
        fixes
    );
    println!(
        "ACK latency from due time: p50 {:.1} ms, p99 {:.1} ms ({} batches)",
        acks.p50_ms, acks.p99_ms, acks.count
    );
    // One full sweep over every stream (nothing to trim: the cost of looking).
    let swept = std::time::Instant::now();
    let retention = Retention::new(&trackgate::config::RetentionConfig::default());
    sweep_once(&backend.conn(), &retention).await.unwrap();
    println!(
        "retention sweep over {} streams: {:?}",
        2 * devices,
        swept.elapsed()
    );
    for gw in gws {
        gw.shutdown();
        gw.wait().await;
    }
    fleet_rt.shutdown_background();
}
