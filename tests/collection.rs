//! Collection control per device (issue 16 item 3): a customer pauses and resumes its own
//! devices (frames still acknowledged, nothing stored), the operator blocks one (its
//! connections are closed once it identifies itself), a purge request can pause; every
//! change reaches open connections within `retention.owner_refresh_s` and is audited.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use common::gwproc::http;
use common::*;
use serde_json::{Value, json};
use trackgate::pseudonym::Imei;
use trackgate::registry::{Customer, Registry};

const ADMIN: &str = "admin-token-for-collection";
const REFRESH: Duration = Duration::from_millis(1300);

/// Stream length of the device, after a moment for any write in flight.
async fn stored(redis: &RedisServer, p: &trackgate::pseudonym::Pseudonym) -> usize {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = redis.conn().await;
    stream_len(&mut c, p).await
}

/// A gateway (owners and states looked up every second, an admin token) and customer
/// `acme` owning device `imei(n)`.
struct Acme {
    redis: RedisServer,
    gw: trackgate::gateway::Gateway,
    keys: std::sync::Arc<trackgate::pseudonym::KeyRing>,
    api: std::net::SocketAddr,
    reg: Registry<redis::aio::MultiplexedConnection>,
    token: String,
    id: String,
    p: trackgate::pseudonym::Pseudonym,
}

impl Acme {
    async fn start(n: u32) -> Acme {
        let redis = RedisServer::start();
        let mut config = test_config(&redis);
        config.retention.owner_refresh_s = 1;
        config.apply_env(|k| (k == "TRACKGATE_ADMIN_TOKEN").then(|| ADMIN.into()));
        let (gw, keys) = start_gateway(config).await;
        let api = gw.http_addr.unwrap();
        let reg = Registry::new(redis.conn().await, 365 * 86400);
        reg.add_customer(&Customer::new("acme", "ACME", "UTC"))
            .await
            .unwrap();
        let (_, token) = reg.issue_token("acme").await.unwrap();
        let id = imei(n);
        reg.assign(&Imei::new(&id).unwrap(), "acme", &keys)
            .await
            .unwrap();
        let p = pseudonym(&keys, &id);
        Acme {
            redis,
            gw,
            keys,
            api,
            reg,
            token,
            id,
            p,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_device_is_acknowledged_not_stored_and_a_blocked_one_is_cut_off() {
    let Acme {
        redis,
        gw,
        api,
        token,
        id,
        p,
        ..
    } = Acme::start(1300).await;
    let auth = format!("Bearer {token}");
    let admin = format!("Bearer {ADMIN}");
    let set = |who: String, path: &'static str, state: &'static str| {
        let id = id.clone();
        async move {
            http(
                api,
                "POST",
                path,
                &[("Authorization", &who)],
                Some(&json!({"imei": id, "state": state})),
            )
            .await
            .unwrap()
        }
    };

    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    t.send(&cce_frame(&id, &[fix_at(now_s(), 0), fix_at(now_s(), 1)]))
        .await;
    assert!(t.reply(Duration::from_secs(10)).await.is_some());
    assert_eq!(stored(&redis, &p).await, 2);

    // Paused: the open connection follows within the refresh; frames are confirmed,
    // nothing is stored.
    let (status, body) = set(auth.clone(), "/v1/devices/state", "paused").await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(REFRESH).await;
    t.send(&cce_frame(&id, &[fix_at(now_s(), 2), fix_at(now_s(), 3)]))
        .await;
    let reply = t.reply(Duration::from_secs(10)).await;
    assert!(
        reply.is_some_and(|r| r.contains(",CCE,")),
        "paused frames are confirmed"
    );
    assert_eq!(stored(&redis, &p).await, 2, "nothing stored while paused");
    let (_, metrics) = common::gwproc::http_get(api, "/metrics").await.unwrap();
    // The registry is the test process's: other tests here may have counted too.
    let paused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("trackgate_fixes_not_stored_total{reason=\"paused\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(paused >= 2, "counted: {paused}");

    // Resumed: stored again.
    let (status, _) = set(auth.clone(), "/v1/devices/state", "active").await;
    assert_eq!(status, 200);
    tokio::time::sleep(REFRESH).await;
    t.send(&cce_frame(&id, &[fix_at(now_s(), 4)])).await;
    assert!(t.reply(Duration::from_secs(10)).await.is_some());
    assert_eq!(stored(&redis, &p).await, 3);

    // Blocking is the operator's: a customer can neither set nor lift it.
    let (status, body) = set(auth.clone(), "/v1/devices/state", "blocked").await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = set(admin.clone(), "/v1/admin/devices/state", "blocked").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = set(auth.clone(), "/v1/devices/state", "active").await;
    assert_eq!(status, 403, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["code"], "blocked_by_admin");
    tokio::time::sleep(REFRESH).await;
    t.send(&cce_frame(&id, &[fix_at(now_s(), 5)])).await;
    assert!(
        t.closed_within(Duration::from_secs(5)).await,
        "the open connection is closed"
    );
    let mut again = Tracker::connect(gw.tracker_addrs[0]).await;
    again.send(&cce_frame(&id, &[fix_at(now_s(), 6)])).await;
    assert!(
        again.closed_within(Duration::from_secs(5)).await,
        "a new one too"
    );
    assert_eq!(stored(&redis, &p).await, 3);

    // Every change is in the audit trail.
    let (_, audit) = http(
        api,
        "GET",
        "/v1/audit?count=100",
        &[("Authorization", &admin)],
        None,
    )
    .await
    .unwrap();
    for action in ["device.pause", "device.resume", "device.state"] {
        assert!(audit.contains(action), "{action} audited: {audit}");
    }
    assert!(!audit.contains(&id), "no IMEI in the audit trail");
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_request_can_pause_the_device() {
    let Acme {
        redis,
        gw,
        keys,
        api,
        reg,
        token,
        id,
        p,
    } = Acme::start(1301).await;
    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    t.send(&cce_frame(&id, &[fix_at(now_s(), 0)])).await;
    assert!(t.reply(Duration::from_secs(10)).await.is_some());
    let (status, body) = http(
        api,
        "POST",
        "/v1/purges",
        &[("Authorization", &format!("Bearer {token}"))],
        Some(&json!({"imei": id, "pause": true})),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(stored(&redis, &p).await, 0, "purged");
    tokio::time::sleep(REFRESH).await;
    t.send(&cce_frame(&id, &[fix_at(now_s(), 1)])).await;
    assert!(
        t.reply(Duration::from_secs(10)).await.is_some(),
        "still confirmed"
    );
    assert_eq!(
        stored(&redis, &p).await,
        0,
        "and not stored: the device is paused"
    );
    // The pause was this owner's: for a new owner the device is collected again.
    reg.add_customer(&Customer::new("newco", "NewCo", "UTC"))
        .await
        .unwrap();
    reg.assign(&Imei::new(&id).unwrap(), "newco", &keys)
        .await
        .unwrap();
    tokio::time::sleep(REFRESH).await;
    t.send(&cce_frame(&id, &[fix_at(now_s(), 2)])).await;
    assert!(t.reply(Duration::from_secs(10)).await.is_some());
    assert_eq!(stored(&redis, &p).await, 1, "stored for the new owner");
    gw.shutdown();
    gw.wait().await;
}
