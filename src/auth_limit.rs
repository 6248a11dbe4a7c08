//! Rate limit on failed authentication, per client IP: after `max_failures` answers of
//! 401 within one minute, that address gets 429 (with `Retry-After`) until the minute is
//! over, without the token even being checked. Guessing tokens is slowed to a crawl; an
//! address whose clients do not fail is never affected.
//!
//! The table of addresses is bounded (`max_tracked_ips`): when full, expired windows are
//! dropped, and if none have expired the table is cleared (failing open for counting, not
//! for authentication: tokens are still checked).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;

const WINDOW: Duration = Duration::from_secs(60);

/// Shared failure counters.
#[derive(Debug, Clone)]
pub struct AuthLimit {
    inner: Arc<Mutex<HashMap<IpAddr, (Instant, u32)>>>,
    max_failures: u32,
    max_tracked_ips: usize,
}

impl AuthLimit {
    pub fn new(max_failures_per_minute: u32, max_tracked_ips: usize) -> Self {
        AuthLimit {
            inner: Arc::new(Mutex::new(HashMap::new())),
            max_failures: max_failures_per_minute,
            max_tracked_ips,
        }
    }

    /// Seconds until `ip` may try again, if it is blocked now.
    fn blocked(&self, ip: IpAddr, now: Instant) -> Option<u64> {
        let map = self.inner.lock().ok()?;
        let &(start, n) = map.get(&ip)?;
        let left = WINDOW
            .checked_sub(now.duration_since(start))
            .filter(|d| !d.is_zero())?;
        (n >= self.max_failures).then(|| left.as_secs().max(1))
    }

    fn record_failure(&self, ip: IpAddr, now: Instant) {
        let Ok(mut map) = self.inner.lock() else {
            return;
        };
        if map.len() >= self.max_tracked_ips && !map.contains_key(&ip) {
            map.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
            if map.len() >= self.max_tracked_ips {
                map.clear();
            }
        }
        let entry = map.entry(ip).or_insert((now, 0));
        if now.duration_since(entry.0) >= WINDOW {
            *entry = (now, 0);
        }
        entry.1 += 1;
    }
}

/// Middleware: refuse blocked addresses, count 401 answers.
pub async fn layer(State(limit): State<AuthLimit>, request: Request, next: Next) -> Response {
    let ip = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let now = Instant::now();
    if let Some(retry) = ip.and_then(|ip| limit.blocked(ip, now)) {
        metrics::counter!(crate::metrics::AUTH_RATE_LIMITED).increment(1);
        let mut r = crate::api_v1::problem(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "Too many failed authentications; retry later",
            None,
        );
        if let Ok(v) = HeaderValue::from_str(&retry.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return r;
    }
    let response = next.run(request).await;
    if response.status() == StatusCode::UNAUTHORIZED {
        if let Some(ip) = ip {
            limit.record_failure(ip, now);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_the_limit_within_the_window_only() {
        let l = AuthLimit::new(3, 10);
        let ip: IpAddr = [127, 0, 0, 9].into();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.blocked(ip, t0), None);
            l.record_failure(ip, t0);
        }
        assert!(l.blocked(ip, t0).is_some());
        assert_eq!(l.blocked(ip, t0 + WINDOW), None, "the window ends");
        let other: IpAddr = [127, 0, 0, 10].into();
        assert_eq!(l.blocked(other, t0), None, "per address");
    }

    #[test]
    fn the_table_is_bounded() {
        let l = AuthLimit::new(1, 4);
        let t0 = Instant::now();
        for i in 0..100u8 {
            l.record_failure([10, 0, 0, i].into(), t0);
        }
        assert!(l.inner.lock().map(|m| m.len()).unwrap_or(0) <= 4);
    }
}
