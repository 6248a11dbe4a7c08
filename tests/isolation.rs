//! Tenant isolation on every API route: customer A never reads, purges or learns the
//! existence of customer B's devices and purges, and gets the same answer for "not
//! yours" as for "does not exist". The routes are enumerated from `docs/openapi.json`:
//! a new route without a case here fails this test.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::gwproc::http;
use common::*;
use serde_json::{Value, json};
use trackgate::pseudonym::Imei;
use trackgate::registry::{Customer, Registry};

/// (method, path template) of every documented operation.
fn documented_routes() -> BTreeSet<(String, String)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out = BTreeSet::new();
    for (p, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                out.insert((method.to_uppercase(), p.clone()));
            }
        }
    }
    out
}

struct Probe {
    api: SocketAddr,
    covered: BTreeSet<(String, String)>,
    rows: Vec<Value>,
}

impl Probe {
    /// A's request on B's resource and on a resource that does not exist: refused
    /// alike (status and body), never a success.
    async fn same_refusal(
        &mut self,
        route: (&str, &str),
        auth: &str,
        foreign: (&str, Option<Value>),
        missing: (&str, Option<Value>),
    ) -> u16 {
        let headers = [("Authorization", auth)];
        let a = http(self.api, route.0, foreign.0, &headers, foreign.1.as_ref())
            .await
            .unwrap();
        let b = http(self.api, route.0, missing.0, &headers, missing.1.as_ref())
            .await
            .unwrap();
        assert!(
            !(200..300).contains(&a.0),
            "{} {}: A got B's resource: {a:?}",
            route.0,
            foreign.0
        );
        assert_eq!(
            a, b,
            "{} {}: 'not yours' and 'does not exist' must look the same",
            route.0, route.1
        );
        self.covered
            .insert((route.0.to_owned(), route.1.to_owned()));
        self.rows
            .push(json!({"method": route.0, "route": route.1, "status": a.0}));
        a.0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_lets_a_customer_see_or_touch_another_customers_data() {
    let redis = RedisServer::start();
    let mut config = test_config(&redis);
    config.http.auth_failures_per_minute = 10_000; // this test is not about the limiter
    config
        .apply_env(|k| (k == "TRACKGATE_ADMIN_TOKEN").then(|| "admin-token-for-isolation".into()));
    let (gw, keys) = start_gateway(config).await;
    let api = gw.http_addr.unwrap();
    let reg = Registry::new(redis.conn().await, 365 * 86400);
    for (id, name) in [("acme", "ACME"), ("rival", "Rival")] {
        reg.add_customer(&Customer::new(id, name, "UTC"))
            .await
            .unwrap();
    }
    let (_, a_token) = reg.issue_token("acme").await.unwrap();
    let (b_tid, b_token) = reg.issue_token("rival").await.unwrap();
    let a = format!("Bearer {a_token}");
    let b = format!("Bearer {b_token}");

    // B owns two devices with data; one of them B purges (a receipt A must not see).
    let (b_dev, b_dev2, nobody) = (imei(1100), imei(1101), imei(1199));
    for d in [&b_dev, &b_dev2] {
        reg.assign(&Imei::new(d).unwrap(), "rival", &keys)
            .await
            .unwrap();
        let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
        t.send(&ccc_frame(d, &[fix_at(now_s(), 0), fix_at(now_s(), 1)]))
            .await;
        assert!(t.reply(Duration::from_secs(10)).await.is_some());
    }
    let (status, body) = http(
        api,
        "POST",
        "/v1/purges",
        &[("Authorization", &b)],
        Some(&json!({"imei": b_dev2})),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let b_purge: Value = serde_json::from_str(&body).unwrap();
    let b_purge_id = b_purge["id"].as_str().unwrap().to_owned();
    // An id of the same shape that does not exist.
    let missing_purge_id: String = b_purge_id
        .chars()
        .map(|c| match c {
            '0'..='8' => char::from(c as u8 + 1),
            '9' => '0',
            'a'..='e' => char::from(c as u8 + 1),
            'f' => 'a',
            other => other,
        })
        .collect();
    assert_ne!(missing_purge_id, b_purge_id);

    let mut p = Probe {
        api,
        covered: BTreeSet::new(),
        rows: Vec::new(),
    };
    // Customer routes: A on B's device / purge vs on nothing.
    let s = p
        .same_refusal(
            ("POST", "/v1/purges"),
            &a,
            ("/v1/purges", Some(json!({"imei": b_dev}))),
            ("/v1/purges", Some(json!({"imei": nobody}))),
        )
        .await;
    assert_eq!(s, 404);
    let range = |imei: &str| json!({"imei": imei, "from": "2000-01-01T00:00:00Z", "to": "2099-01-01T00:00:00Z"});
    p.same_refusal(
        ("POST", "/v1/purges"),
        &a,
        ("/v1/purges", Some(range(&b_dev))),
        ("/v1/purges", Some(range(&nobody))),
    )
    .await;
    let s = p
        .same_refusal(
            ("GET", "/v1/purges/{id}"),
            &a,
            (&format!("/v1/purges/{b_purge_id}"), None),
            (&format!("/v1/purges/{missing_purge_id}"), None),
        )
        .await;
    assert_eq!(s, 404);
    for extra in [
        json!({}),
        json!({"format": "csv"}),
        json!({"format": "geojson"}),
        json!({"from": "2000-01-01T00:00:00Z", "to": "2100-01-01T00:00:00Z"}),
    ] {
        let body = |imei: &str| {
            let mut b = extra.clone();
            b["imei"] = imei.into();
            Some(b)
        };
        let s = p
            .same_refusal(
                ("POST", "/v1/exports"),
                &a,
                ("/v1/exports", body(&b_dev)),
                ("/v1/exports", body(&nobody)),
            )
            .await;
        assert_eq!(s, 404);
    }
    // Admin routes: a customer token is no admin token, whatever the target.
    let s = p
        .same_refusal(
            ("GET", "/v1/audit"),
            &a,
            ("/v1/audit?count=100", None),
            ("/v1/audit", None),
        )
        .await;
    assert_eq!(s, 401);
    p.same_refusal(
        ("POST", "/v1/admin/customers"),
        &a,
        (
            "/v1/admin/customers",
            Some(json!({"id": "rival", "name": "x", "tz": "UTC"})),
        ),
        (
            "/v1/admin/customers",
            Some(json!({"id": "nobody", "name": "x", "tz": "UTC"})),
        ),
    )
    .await;
    p.same_refusal(
        ("PUT", "/v1/admin/customers/{id}/holidays"),
        &a,
        (
            "/v1/admin/customers/rival/holidays",
            Some(json!(["2026-12-24"])),
        ),
        (
            "/v1/admin/customers/nobody/holidays",
            Some(json!(["2026-12-24"])),
        ),
    )
    .await;
    p.same_refusal(
        ("POST", "/v1/admin/customers/{id}/tokens"),
        &a,
        ("/v1/admin/customers/rival/tokens", None),
        ("/v1/admin/customers/nobody/tokens", None),
    )
    .await;
    p.same_refusal(
        ("DELETE", "/v1/admin/customers/{id}/tokens/{tid}"),
        &a,
        (&format!("/v1/admin/customers/rival/tokens/{b_tid}"), None),
        ("/v1/admin/customers/nobody/tokens/00000000", None),
    )
    .await;
    p.same_refusal(
        ("POST", "/v1/admin/owners/assign"),
        &a,
        (
            "/v1/admin/owners/assign",
            Some(json!({"imei": b_dev, "customer": "acme"})),
        ),
        (
            "/v1/admin/owners/assign",
            Some(json!({"imei": nobody, "customer": "acme"})),
        ),
    )
    .await;
    p.same_refusal(
        ("POST", "/v1/admin/owners/unassign"),
        &a,
        ("/v1/admin/owners/unassign", Some(json!({"imei": b_dev}))),
        ("/v1/admin/owners/unassign", Some(json!({"imei": nobody}))),
    )
    .await;
    for state in ["active", "paused", "blocked"] {
        p.same_refusal(
            ("POST", "/v1/admin/devices/state"),
            &a,
            (
                "/v1/admin/devices/state",
                Some(json!({"imei": b_dev, "state": state})),
            ),
            (
                "/v1/admin/devices/state",
                Some(json!({"imei": nobody, "state": state})),
            ),
        )
        .await;
    }
    // A pausing or resuming B's device: the same 404 as a device that does not exist.
    for state in ["paused", "active"] {
        let s = p
            .same_refusal(
                ("POST", "/v1/devices/state"),
                &a,
                (
                    "/v1/devices/state",
                    Some(json!({"imei": b_dev, "state": state})),
                ),
                (
                    "/v1/devices/state",
                    Some(json!({"imei": nobody, "state": state})),
                ),
            )
            .await;
        assert_eq!(s, 404);
    }
    let s = p
        .same_refusal(
            ("POST", "/v1/purges"),
            &a,
            ("/v1/purges", Some(json!({"imei": b_dev, "pause": true}))),
            ("/v1/purges", Some(json!({"imei": nobody, "pause": true}))),
        )
        .await;
    assert_eq!(s, 404);

    // Every documented route has a case.
    let documented = documented_routes();
    let missing: Vec<_> = documented.difference(&p.covered).collect();
    assert!(
        missing.is_empty(),
        "routes without an isolation case: {missing:?}"
    );

    // Nothing of B's changed: data, owner, token, purge receipt.
    let mut conn = redis.conn().await;
    assert_eq!(stream_len(&mut conn, &pseudonym(&keys, &b_dev)).await, 2);
    assert_eq!(
        trackgate::collection::state_of(&mut conn, &[pseudonym(&keys, &b_dev)])
            .await
            .unwrap(),
        trackgate::collection::Collection::Active,
        "A could not pause or block B's device"
    );
    let (status, body) = http(
        api,
        "POST",
        "/v1/exports",
        &[("Authorization", &b)],
        Some(&json!({"imei": b_dev})),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "B still owns its device and its token works");
    assert_eq!(body.lines().count(), 2);
    let (status, _) = http(
        api,
        "GET",
        &format!("/v1/purges/{b_purge_id}"),
        &[("Authorization", &b)],
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert!(
        reg.customer("nobody").await.unwrap().is_none(),
        "no customer created"
    );
    results::record(
        "isolation",
        &json!({"routes": documented.len(), "cases": p.rows}),
    );
    gw.shutdown();
    gw.wait().await;
}
