//! The customer API over HTTP: auth, owner-only purges (same 404 for foreign and unknown
//! devices), receipts, idempotency, and 503 when the journal is unreachable.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use redis::AsyncCommands;
use serde_json::Value;
use trackgate::pseudonym::Imei;
use trackgate::registry::{Customer, Registry};

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> (u16, String, Value) {
    let (status, head, body) = common::gwproc::http_full(addr, method, path, headers, body)
        .await
        .expect("the API answers");
    (
        status,
        head,
        serde_json::from_str(&body).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_api_is_owner_only_and_idempotent() {
    if !standalone_only("purge_api_is_owner_only_and_idempotent") {
        return;
    }
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

/// `POST /v1/exports` with `body`: (response head, body; chunked bodies decoded).
async fn export_as(api: SocketAddr, body: Value, auth: String) -> (String, String) {
    let (_, head, body) = common::gwproc::http_full(
        api,
        "POST",
        "/v1/exports",
        &[("Authorization", &auth)],
        Some(&body),
    )
    .await
    .unwrap();
    (head, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_formats_parse_and_respect_owner_range_and_ttl() {
    let redis = Backend::from_env();
    let mut config = redis.config();
    config.retention.ttl_s = 5;
    config.retention.sweep_interval_s = 3600; // the sweeper must not be what hides old data
    let (gw, keys) = start_gateway(config).await;
    let api = gw.http_addr.unwrap();
    let reg = Registry::new(redis.conn(), 365 * 86400);
    reg.add_customer(&Customer::new("acme", "ACME", "UTC"))
        .await
        .unwrap();
    reg.add_customer(&Customer::new("rival", "Rival", "UTC"))
        .await
        .unwrap();
    let (_, acme) = reg.issue_token("acme").await.unwrap();
    let (_, rival) = reg.issue_token("rival").await.unwrap();
    let id = imei(92);
    reg.assign(&Imei::new(&id).unwrap(), "acme", &keys)
        .await
        .unwrap();
    let now = now_s().as_second();
    // Fix times now-4, now-1, now: after 1.6 s only the first is past the 5 s TTL.
    let fixes: Vec<_> = [4, 1, 0]
        .iter()
        .map(|&ago| fix_at(jiff::Timestamp::from_second(now - ago).unwrap(), ago as i32))
        .collect();
    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    t.send(&cce_frame(&id, &fixes)).await;
    assert!(t.reply(Duration::from_secs(10)).await.is_some());

    let auth = format!("Bearer {acme}");
    // The IMEI goes in the body (never in the URL).
    let export = |format: &str, auth: String| {
        let body = serde_json::json!({"imei": id, "format": format});
        async move { export_as(api, body, auth).await }
    };

    let (head, body) = export("ndjson", auth.clone()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["lat"], 48.137158);
    assert_eq!(lines[0]["type"], "CCE");
    assert!(lines[0]["time"].as_str().unwrap().ends_with('Z'));

    let (_, csv) = export("csv", auth.clone()).await;
    let rows: Vec<&str> = csv.lines().collect();
    assert!(
        rows[0].starts_with("time,received_at,type,event,valid,lat,lon"),
        "{}",
        rows[0]
    );
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[1].split(',').count(), rows[0].split(',').count());

    let (head, geo) = export("geojson", auth.clone()).await;
    assert!(head.to_ascii_lowercase().contains("application/geo+json"));
    let fc: Value = serde_json::from_str(&geo).unwrap();
    assert_eq!(fc["type"], "FeatureCollection");
    assert_eq!(fc["features"].as_array().unwrap().len(), 3);
    assert_eq!(fc["features"][0]["geometry"]["coordinates"][0], 11.57612);

    // Fix-time range (inclusive).
    let from = jiff::Timestamp::from_second(now - 1).unwrap();
    let ranged_body = serde_json::json!({"imei": id, "from": from, "to": from});
    let (_, ranged) = export_as(api, ranged_body, auth.clone()).await;
    assert_eq!(ranged.lines().count(), 1);

    // Not the owner: the same 404 as an unknown device.
    let (head, _) = export("ndjson", format!("Bearer {rival}")).await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    // A fix whose fix time is past the TTL is not returned, though it is still stored
    // (the key itself expires TTL after the last write; the sweeper has not run).
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let mut conn = redis.conn();
    assert_eq!(
        stream_len(&mut conn, &pseudonym(&keys, &id)).await,
        3,
        "still physically there"
    );
    let (_, late) = export("ndjson", auth.clone()).await;
    assert_eq!(late.lines().count(), 2, "{late}");

    // The device changes hands: its history stays the previous owner's.
    let device = Imei::new(&id).unwrap();
    reg.assign(&device, "rival", &keys).await.unwrap();
    let rival_auth = format!("Bearer {rival}");
    let (head, none) = export("ndjson", rival_auth.clone()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(
        none.lines().count(),
        0,
        "acme's history is not rival's: {none}"
    );
    let (head, _) = export("ndjson", auth.clone()).await;
    assert!(
        head.starts_with("HTTP/1.1 404"),
        "and no longer acme's to read"
    );
    // Fix times are whole seconds: one taken in the second of the sale is not exported.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    t.send(&cce_frame(&id, &[fix_at(now_s(), 7)])).await;
    assert!(t.reply(Duration::from_secs(10)).await.is_some());
    let (_, mine) = export("ndjson", rival_auth.clone()).await;
    assert_eq!(
        mine.lines().count(),
        1,
        "what arrived since the sale: {mine}"
    );
    // Assigning the same owner again keeps what they had.
    reg.assign(&device, "rival", &keys).await.unwrap();
    let (_, still) = export("ndjson", rival_auth).await;
    assert_eq!(still.lines().count(), 1, "{still}");
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_and_export_cli_clients() {
    let redis = Backend::from_env();
    let (gw, keys) = start_gateway(redis.config()).await;
    let api = format!("http://{}", gw.http_addr.unwrap());
    let reg = Registry::new(redis.conn(), 365 * 86400);
    reg.add_customer(&Customer::new("acme", "ACME", "UTC"))
        .await
        .unwrap();
    let (_, token) = reg.issue_token("acme").await.unwrap();
    let id = imei(93);
    reg.assign(&Imei::new(&id).unwrap(), "acme", &keys)
        .await
        .unwrap();
    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    t.send(&ccc_frame(&id, &[fix_at(now_s(), 0), fix_at(now_s(), 1)]))
        .await;
    assert!(t.reply(Duration::from_secs(10)).await.is_some());

    let run = |args: Vec<String>, token: String| {
        let api = api.clone();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_trackgate"))
                .args(args)
                .env("TRACKGATE_API", api)
                .env("TRACKGATE_TOKEN", token)
                .output()
                .await
                .unwrap()
        }
    };
    let out = run(
        vec![
            "export".into(),
            "--imei".into(),
            id.clone(),
            "--format".into(),
            "csv".into(),
        ],
        token.clone(),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        3,
        "header + 2 rows"
    );

    let out = run(
        vec!["purge".into(), "--imei".into(), id.clone()],
        "tgk.acme.00000000.bad".into(),
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));

    let out = run(
        vec![
            "purge".into(),
            "--imei".into(),
            id.clone(),
            "--idempotency-key".into(),
            "cli-1".into(),
        ],
        token.clone(),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let receipt: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (receipt["state"].as_str(), receipt["deleted_fixes"].as_u64()),
        (Some("completed"), Some(2))
    );
    let out = run(
        vec![
            "purge".into(),
            "--status".into(),
            receipt["id"].as_str().unwrap().into(),
        ],
        token.clone(),
    )
    .await;
    assert!(out.status.success());
    let again: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(again["id"], receipt["id"]);
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_manages_customers_tokens_devices_and_shows_the_audit() {
    let redis = Backend::from_env();
    let mut config = redis.config();
    config.apply_env(|k| {
        (k == "TRACKGATE_ADMIN_TOKEN").then(|| "admin-secret-for-tests".to_string())
    });
    let (gw, _keys) = start_gateway(config).await;
    let api = gw.http_addr.unwrap();
    let admin = [("Authorization", "Bearer admin-secret-for-tests")];
    let customer = serde_json::json!({"id": "acme", "name": "ACME", "tz": "Europe/Berlin", "weekend": ["sat", "sun"], "holidays": ["2026-12-25"]});

    let (status, _, _) = http(
        api,
        "POST",
        "/v1/admin/customers",
        &[("Authorization", "Bearer nope")],
        Some(&customer),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _, _) = http(api, "POST", "/v1/admin/customers", &admin, Some(&customer)).await;
    assert_eq!(status, 201);
    let (status, _, _) = http(api, "POST", "/v1/admin/customers", &admin, Some(&customer)).await;
    assert_eq!(status, 409);
    let (status, _, _) = http(
        api,
        "PUT",
        "/v1/admin/customers/acme/holidays",
        &admin,
        Some(&serde_json::json!(["2026-12-24", "2026-12-25"])),
    )
    .await;
    assert_eq!(status, 204);
    let (status, _, issued) =
        http(api, "POST", "/v1/admin/customers/acme/tokens", &admin, None).await;
    assert_eq!(status, 201);
    let token = issued["token"].as_str().unwrap().to_owned();
    let id = imei(94);
    let (status, _, _) = http(
        api,
        "POST",
        "/v1/admin/owners/assign",
        &admin,
        Some(&serde_json::json!({"imei": id, "customer": "acme"})),
    )
    .await;
    assert_eq!(status, 204);

    // The customer token works on the customer API, not on the admin API.
    let auth = format!("Bearer {token}");
    let (status, _, receipt) = http(
        api,
        "POST",
        "/v1/purges",
        &[("Authorization", &auth)],
        Some(&serde_json::json!({"imei": id})),
    )
    .await;
    assert_eq!(status, 200, "{receipt}");
    let (status, _, _) = http(api, "GET", "/v1/audit", &[("Authorization", &auth)], None).await;
    assert_eq!(status, 401);

    let (status, _, audit) = http(api, "GET", "/v1/audit?count=50", &admin, None).await;
    assert_eq!(status, 200);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    for a in [
        "customer.add",
        "customer.holidays",
        "token.issue",
        "device.assign",
        "purge.requested",
        "purge.completed",
    ] {
        assert!(actions.contains(&a), "{a} missing from {actions:?}");
    }
    assert!(
        !audit.to_string().contains(&id),
        "no raw IMEI in the audit trail"
    );

    let tid = issued["id"].as_str().unwrap();
    let (status, _, _) = http(
        api,
        "DELETE",
        &format!("/v1/admin/customers/acme/tokens/{tid}"),
        &admin,
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, _, _) = http(
        api,
        "POST",
        "/v1/purges",
        &[("Authorization", &auth)],
        Some(&serde_json::json!({"imei": id})),
    )
    .await;
    assert_eq!(status, 401, "revoked");
    let (status, _, _) = http(
        api,
        "POST",
        "/v1/admin/owners/unassign",
        &admin,
        Some(&serde_json::json!({"imei": id})),
    )
    .await;
    assert_eq!(status, 204);
    // The routes that took the IMEI in the URL (logged by every proxy) are gone and
    // name their successors.
    for (method, path) in [
        ("GET", format!("/v1/devices/{id}/fixes?format=csv")),
        ("PUT", format!("/v1/admin/devices/{id}/owner")),
        ("DELETE", format!("/v1/admin/devices/{id}/owner")),
    ] {
        let (status, _, problem) = http(api, method, &path, &admin, None).await;
        assert_eq!(
            (status, problem["code"].as_str()),
            (410, Some("imei_in_url")),
            "{method} {path}"
        );
        assert!(problem["detail"].as_str().unwrap().contains("body"));
    }
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_are_rate_limited_per_address() {
    let redis = Backend::from_env();
    let mut config = redis.config();
    config.http.auth_failures_per_minute = 5;
    let (gw, _keys) = start_gateway(config).await;
    let api = gw.http_addr.unwrap();
    let body = serde_json::json!({ "imei": imei(96) });
    let bad = [("Authorization", "Bearer tgk.acme.00000000.wrong")];
    for _ in 0..5 {
        let (status, _, _) = http(api, "POST", "/v1/purges", &bad, Some(&body)).await;
        assert_eq!(status, 401);
    }
    let (status, head, problem) = http(api, "POST", "/v1/purges", &bad, Some(&body)).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (429, Some("rate_limited"))
    );
    assert!(head.to_ascii_lowercase().contains("retry-after"));
    // Health and metrics are not behind the limit.
    let (status, _, _) = http(api, "GET", "/healthz", &[], None).await;
    assert_eq!(status, 200);
    gw.shutdown();
    gw.wait().await;
}
