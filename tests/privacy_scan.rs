//! The raw IMEI never reaches Redis (keys, DUMP of every key, values, or any command
//! sent), the logs (at every level, including error paths), or the metrics; API tokens
//! are stored only as hashes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_imeis_appear_nowhere() {
    let logs = Captured::default();
    let sink = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .init();

    let redis = RedisServer::start();
    // Record every command Redis receives.
    let mut monitor = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "MONITOR"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("redis-cli on PATH");
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (gw, _keys) = start_gateway(test_config(&redis)).await;
    let imeis: Vec<String> = (0..4).map(|n| imei(500 + n)).collect();
    let now = now_s();
    for id in &imeis {
        let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
        t.send(&aaa_frame(id, &fix_at(now, 0))).await;
        t.send(&cce_frame(id, &[fix_at(now, 1), fix_at(now, 2)]))
            .await;
        assert!(t.reply(Duration::from_secs(10)).await.is_some());
        // Error paths log too: a broken checksum, a foreign IMEI, an undecodable payload.
        let mut bad = ccc_frame(id, &[fix_at(now, 3)]);
        let n = bad.len();
        bad[n - 3] = if bad[n - 3] == b'0' { b'1' } else { b'0' };
        t.send(&bad).await;
        t.send(&ccc_frame(&imei(999), &[fix_at(now, 4)])).await;
        let mut junk_payload = Vec::new();
        trackgate_protocols::encode::frame(
            trackgate_protocols::Direction::DeviceToServer,
            b'A',
            id,
            b"AAA",
            b"not,a,report",
            &mut junk_payload,
        )
        .unwrap();
        t.send(&junk_payload).await;
        t.send(&ccc_frame(id, &[fix_at(now, 5)])).await;
        assert!(t.reply(Duration::from_secs(10)).await.is_some());
    }
    let metrics_text = {
        let http = gw.http_addr.unwrap();
        let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    gw.shutdown();
    gw.wait().await;

    // Everything stored: every key (SCAN), its DUMP (uncompressed) and its values.
    let mut conn = redis.conn().await;
    let (keys, stored) = redis_scan::everything(&mut conn).await;
    assert!(keys.len() >= 8, "streams and metas of 4 devices: {keys:?}");
    let stored = String::from_utf8_lossy(&stored).into_owned();
    let _ = monitor.kill();
    let monitored = {
        let out = monitor.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();

    assert!(monitored.contains("EVALSHA"), "MONITOR saw the writes");
    assert!(logs.contains("frame rejected"), "error paths were logged");
    assert!(metrics_text.contains("trackgate_frames_total"));
    for id in imeis.iter().chain([&imei(999)]) {
        for (what, text) in [
            ("redis data", &stored),
            ("redis commands", &monitored),
            ("logs", &logs),
            ("metrics", &metrics_text),
        ] {
            assert!(!text.contains(id.as_str()), "raw IMEI found in {what}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_tokens_are_stored_only_hashed() {
    use trackgate::registry::{Customer, Registry};
    let redis = RedisServer::start();
    let admin_token = "admin-secret-never-stored-0123456789";
    let mut config = test_config(&redis);
    config.apply_env(|k| (k == "TRACKGATE_ADMIN_TOKEN").then(|| admin_token.to_string()));
    let (gw, _keys) = start_gateway(config).await;
    let api = gw.http_addr.unwrap();
    let reg = Registry::new(redis.conn().await, 365 * 86400);
    reg.add_customer(&Customer::new("acme", "ACME", "UTC"))
        .await
        .unwrap();
    let (_, cli_token) = reg.issue_token("acme").await.unwrap();
    let admin_auth = format!("Bearer {admin_token}");
    let (status, body) = common::gwproc::http(
        api,
        "POST",
        "/v1/admin/customers/acme/tokens",
        &[("Authorization", &admin_auth)],
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 201, "{body}");
    let issued: serde_json::Value = serde_json::from_str(&body).unwrap();
    let api_token = issued["token"].as_str().unwrap().to_owned();
    // Both tokens work (so they are stored in some form) …
    for token in [&cli_token, &api_token] {
        let (status, _) = common::gwproc::http(
            api,
            "POST",
            "/v1/exports",
            &[("Authorization", &format!("Bearer {token}"))],
            Some(&serde_json::json!({"imei": imei(1)})),
        )
        .await
        .unwrap();
        assert_eq!(status, 404, "authenticated (unknown device), not 401");
    }
    gw.shutdown();
    gw.wait().await;

    // … but only as hashes: no token, no secret part of one, anywhere in Redis.
    let mut conn = redis.conn().await;
    let (keys, stored) = redis_scan::everything(&mut conn).await;
    assert!(!keys.is_empty());
    for token in [cli_token.as_str(), api_token.as_str(), admin_token] {
        let secret = token.rsplit('.').next().unwrap();
        assert!(secret.len() >= 32, "{token}: a secret part");
        assert!(
            !redis_scan::contains(&stored, token.as_bytes()),
            "raw token in Redis"
        );
        assert!(
            !redis_scan::contains(&stored, secret.as_bytes()),
            "a token's secret in Redis"
        );
    }
    // Positive control: the scan does see what is stored (the customer record).
    assert!(redis_scan::contains(&stored, b"ACME"));
}
