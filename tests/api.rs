//! The customer API over HTTP: auth, owner-only purges (same 404 for foreign and unknown
//! devices), receipts, idempotency, and 503 when the journal is unreachable.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use redis::AsyncCommands;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trackgate::pseudonym::Imei;
use trackgate::registry::{Customer, Registry};

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> (u16, String, Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status: u16 = out[9..12].parse().unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (
        status,
        head.to_owned(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_api_is_owner_only_and_idempotent() {
    let redis = RedisServer::start();
    let (gw, keys) = start_gateway(test_config(&redis)).await;
    let api = gw.http_addr.unwrap();
    let reg = Registry::new(redis.conn().await, 365 * 86400);
    reg.add_customer(&Customer::new("acme", "ACME", "Europe/Berlin"))
        .await
        .unwrap();
    reg.add_customer(&Customer::new("rival", "Rival", "America/New_York"))
        .await
        .unwrap();
    let (_, acme) = reg.issue_token("acme").await.unwrap();
    let (_, rival) = reg.issue_token("rival").await.unwrap();
    let id = imei(90);
    reg.assign(&Imei::new(&id).unwrap(), "acme", &keys)
        .await
        .unwrap();
    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    t.send(&ccc_frame(&id, &[fix_at(now_s(), 0), fix_at(now_s(), 1)]))
        .await;
    assert!(t.reply(Duration::from_secs(10)).await.is_some());
    let p = pseudonym(&keys, &id);
    let mut conn = redis.conn().await;
    let acme_auth = format!("Bearer {acme}");
    let rival_auth = format!("Bearer {rival}");
    let body = serde_json::json!({ "imei": id });

    let (status, _, _) = http(api, "POST", "/v1/purges", &[], Some(&body)).await;
    assert_eq!(status, 401);
    let (status, head, problem) = http(
        api,
        "POST",
        "/v1/purges",
        &[("Authorization", &rival_auth)],
        Some(&body),
    )
    .await;
    assert_eq!(status, 404, "a foreign device looks unknown");
    assert!(
        head.to_ascii_lowercase()
            .contains("application/problem+json")
    );
    assert_eq!(problem["code"], "not_found");
    let unknown = serde_json::json!({ "imei": imei(91) });
    let (status2, _, problem2) = http(
        api,
        "POST",
        "/v1/purges",
        &[("Authorization", &rival_auth)],
        Some(&unknown),
    )
    .await;
    assert_eq!(
        (status2, &problem2),
        (404, &problem),
        "same answer for unknown devices"
    );
    assert_eq!(stream_len(&mut conn, &p).await, 2, "nothing deleted");
    let (status, _, p400) = http(
        api,
        "POST",
        "/v1/purges",
        &[("Authorization", &acme_auth)],
        Some(&serde_json::json!({"imei": "12"})),
    )
    .await;
    assert_eq!((status, p400["code"].as_str()), (400, Some("bad_imei")));

    let headers = [
        ("Authorization", acme_auth.as_str()),
        ("Idempotency-Key", "k1"),
    ];
    let (status, _, receipt) = http(api, "POST", "/v1/purges", &headers, Some(&body)).await;
    assert_eq!(status, 200, "{receipt}");
    assert_eq!(receipt["state"], "completed");
    assert_eq!(receipt["deleted_fixes"], 2);
    assert!(receipt["deadline"].as_str().unwrap() > receipt["requested_at"].as_str().unwrap());
    assert_eq!(stream_len(&mut conn, &p).await, 0);
    let (_, _, again) = http(api, "POST", "/v1/purges", &headers, Some(&body)).await;
    assert_eq!(
        again["id"], receipt["id"],
        "same idempotency key, same purge"
    );

    let path = format!("/v1/purges/{}", receipt["id"].as_str().unwrap());
    let (status, _, fetched) =
        http(api, "GET", &path, &[("Authorization", &acme_auth)], None).await;
    assert_eq!((status, &fetched["id"]), (200, &receipt["id"]));
    let (status, _, _) = http(api, "GET", &path, &[("Authorization", &rival_auth)], None).await;
    assert_eq!(status, 404);

    let audit: redis::streams::StreamRangeReply = conn.xrange_all("tg:audit").await.unwrap();
    let outcomes: Vec<String> = audit
        .ids
        .iter()
        .map(|e| redis::from_redis_value::<String>(e.map["outcome"].clone()).unwrap())
        .collect();
    assert!(
        outcomes.iter().filter(|o| *o == "denied").count() >= 2,
        "{outcomes:?}"
    );
    let dump = format!("{:?}", audit.ids);
    assert!(!dump.contains(&id), "no raw IMEI in the audit trail");

    // Journal unreachable: a clear, retryable refusal.
    redis.freeze();
    let (status, head, problem) = http(
        api,
        "POST",
        "/v1/purges",
        &[("Authorization", &acme_auth)],
        Some(&body),
    )
    .await;
    redis.thaw();
    assert_eq!(status, 503, "{problem}");
    assert!(head.to_ascii_lowercase().contains("retry-after"));
    gw.shutdown();
    gw.wait().await;
}
