//! HTTP endpoints: `/metrics` (Prometheus), `/healthz` (the process is up), `/readyz`
//! (Redis answers, has room for writes, runs no forbidden eviction policy, and the gateway
//! is not shutting down: a load balancer should only send devices to a ready gateway).

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::redis_conn::RedisConn;
use crate::redis_memory::MemoryStatus;

#[derive(Clone)]
struct ApiState {
    redis: RedisConn,
    memory: MemoryStatus,
    prometheus: Option<PrometheusHandle>,
    shutdown: CancellationToken,
}

/// The router; serve it with `axum::serve`. `/readyz` turns 503 once `shutdown` fires,
/// so a load balancer stops sending devices to a draining gateway, and while `memory`
/// reports Redis out of memory (`redis_oom`) or on a forbidden eviction policy
/// (`redis_evicting_policy`).
pub fn router(
    redis: RedisConn,
    memory: MemoryStatus,
    prometheus: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(ApiState {
            redis,
            memory,
            prometheus,
            shutdown,
        })
}

async fn metrics(State(s): State<ApiState>) -> (StatusCode, String) {
    match &s.prometheus {
        Some(h) => (StatusCode::OK, h.render()),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed\n".into(),
        ),
    }
}

async fn readyz(State(mut s): State<ApiState>) -> (StatusCode, &'static str) {
    if s.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    if let Some(why) = s.memory.not_ready() {
        return (StatusCode::SERVICE_UNAVAILABLE, why.body());
    }
    let cmd = redis::cmd("PING");
    let ping = cmd.query_async::<String>(&mut s.redis);
    match tokio::time::timeout(Duration::from_secs(1), ping).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready\n"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "redis unreachable\n"),
    }
}
