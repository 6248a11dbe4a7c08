//! A Redis that would delete data when full is not served: `serve` refuses an evicting
//! `maxmemory-policy` (unless explicitly allowed), notices a policy that turns evicting
//! later, checks every cluster primary, and goes on (warning) where `CONFIG` is not
//! permitted. What a full Redis under `noeviction` does to the write path is a fault test
//! (`tests/faults.rs`).
//!
//! The gateway runs as a `trackgate serve` process (`common::gwproc`), so its exit status
//! and log lines are what an operator sees.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use common::gwproc::{GatewayOptions, GatewayProcess};
use common::*;

/// Lines of the gateway's log that contain `needle`.
fn log_lines(gw: &GatewayProcess, needle: &str) -> Vec<String> {
    gw.log()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_an_evicting_redis_and_names_the_policy_and_the_fix() {
    let redis = RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    let (status, log) =
        GatewayProcess::start_refused(GatewayOptions::new(&redis.url()), Duration::from_secs(20))
            .await;
    assert!(!status.success(), "exit status {status}; log: {log}");
    assert!(log.contains("allkeys-lru"), "{log}");
    assert!(
        log.contains("CONFIG SET maxmemory-policy noeviction"),
        "{log}"
    );
    assert!(log.contains("redis.allow_evicting_policy"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_override_starts_on_an_evicting_redis_with_a_warning_and_a_gauge() {
    let redis = RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    let mut opts = GatewayOptions::new(&redis.url());
    opts.redis = "allow_evicting_policy = true\n".into();
    let gw = GatewayProcess::start(opts).await;
    let warned = log_lines(&gw, "allow_evicting_policy");
    assert_eq!(warned.len(), 1, "one warning at start: {warned:?}");
    assert!(warned[0].contains("WARN") && warned[0].contains("allkeys-lru"));
    assert_eq!(gw.metric("trackgate_redis_evicting_policy").await, 1.0);
    assert_eq!(gw.get("/readyz").await.map(|(s, _)| s), Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_refuses_config_is_served_with_a_warning() {
    // Managed services rename or disable CONFIG.
    let redis = RedisServer::start_with(&["--rename-command", "CONFIG", ""]);
    let gw = GatewayProcess::start(GatewayOptions::new(&redis.url())).await;
    let warned = log_lines(&gw, "could not check Redis' maxmemory-policy");
    assert_eq!(warned.len(), 1, "{}", gw.log());
    assert!(warned[0].contains("WARN"));
    assert_eq!(gw.get("/readyz").await.map(|(s, _)| s), Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_turns_evicting_while_serving_makes_the_gateway_not_ready() {
    let redis = RedisServer::start();
    let mut opts = GatewayOptions::new(&redis.url());
    opts.redis = "policy_check_interval_s = 1\n".into();
    let gw = GatewayProcess::start(opts).await;
    assert_eq!(gw.get("/readyz").await.map(|(s, _)| s), Some(200));
    let mut conn = redis.conn().await;

    config_set(&mut conn, "maxmemory-policy", "volatile-lru").await;
    eventually(
        Duration::from_secs(10),
        "/readyz: redis_evicting_policy",
        || async {
            gw.get("/readyz")
                .await
                .is_some_and(|(s, b)| s == 503 && b.contains("redis_evicting_policy"))
        },
    )
    .await;
    let errors = log_lines(&gw, "ERROR");
    assert_eq!(errors.len(), 1, "logged once: {errors:?}");
    assert!(errors[0].contains("volatile-lru"));

    config_set(&mut conn, "maxmemory-policy", "noeviction").await;
    eventually(Duration::from_secs(10), "/readyz: ready again", || async {
        gw.get("/readyz").await.map(|(s, _)| s) == Some(200)
    })
    .await;
    assert_eq!(gw.metric("trackgate_redis_evicting_policy").await, 0.0);
}

/// In cluster mode every primary is asked: one evicting primary among three is enough to
/// refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cluster_primary_is_checked() {
    let backend = Backend::cluster();
    let Backend::Cluster(cluster) = &backend else {
        unreachable!()
    };
    let port = cluster.primary_of("some-key");
    let node = cluster.nodes.iter().find(|n| n.port == port).unwrap();
    let client = redis::Client::open(node.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    config_set(&mut c, "maxmemory-policy", "allkeys-random").await;

    let keys = std::sync::Arc::new(trackgate::pseudonym::KeyRing::ephemeral());
    let refused = trackgate::gateway::Gateway::start(backend.config(), keys.clone()).await;
    let e = refused.map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("allkeys-random"), "{e}");
    assert!(e.contains(&format!(":{port}")), "names the node: {e}");

    config_set(&mut c, "maxmemory-policy", "noeviction").await;
    let (gw, _) = start_gateway(backend.config()).await;
    gw.shutdown();
    gw.wait().await;
}
