//! Property-based API testing with schemathesis (PyPI) against `/openapi.json` of a live
//! gateway: no generated request may produce a server error (5xx other than the
//! documented 503), and responses must match the schema.
//!
//! Needs `schemathesis` on PATH (`.ci/run` installs it with pip).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use common::*;
use trackgate::pseudonym::Imei;
use trackgate::registry::{Customer, Registry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_errors() {
    let redis = RedisServer::start();
    let mut config = test_config(&redis);
    // Every admin call with a customer token is a failed authentication: keep the rate
    // limit out of the way (it has its own test).
    config.http.auth_failures_per_minute = 1_000_000;
    // Mount the admin routes too (schemathesis calls them with a customer token: 401s).
    config.apply_env(|k| {
        (k == "TRACKGATE_ADMIN_TOKEN").then(|| "admin-secret-for-tests".to_string())
    });
    let (gw, keys) = start_gateway(config).await;
    let reg = Registry::new(redis.conn().await, 365 * 86400);
    reg.add_customer(&Customer::new("acme", "ACME", "Europe/Berlin"))
        .await
        .unwrap();
    let (_, token) = reg.issue_token("acme").await.unwrap();
    reg.assign(&Imei::new(&imei(95)).unwrap(), "acme", &keys)
        .await
        .unwrap();
    let url = format!("http://{}/openapi.json", gw.http_addr.unwrap());
    let auth = format!("Authorization: Bearer {token}");
    // Its caches and reports go to a temp dir, not the source tree.
    let scratch = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new("schemathesis")
        .current_dir(scratch.path())
        .args([
            "run",
            &url,
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance",
        ])
        .args([
            "--header",
            &auth,
            "--max-examples",
            "40",
            "--generation-deterministic",
        ])
        .args(["--request-timeout", "10"])
        .output()
        .await
        .expect("schemathesis on PATH (python3 -m pip install schemathesis)");
    let text = String::from_utf8_lossy(&out.stdout);
    // The summary (visible with --nocapture): operations, cases, failures.
    let tail: Vec<&str> = text.lines().rev().take(12).collect();
    println!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    assert!(
        text.contains("3 ") || text.contains("operations"),
        "no operations tested?\n{text}"
    );
    assert!(
        out.status.success(),
        "schemathesis failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    gw.shutdown();
    gw.wait().await;
}
