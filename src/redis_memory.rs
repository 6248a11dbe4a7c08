//! Redis running out of room, without losing or leaking anything.
//!
//! * **Policy.** Under any `maxmemory-policy` but `noeviction`, a full Redis makes room by
//!   deleting keys: acknowledged history, purge tombstones (a purged device's in-flight
//!   fixes would then be stored after all) and purge bookkeeping. So `serve` checks the
//!   policy of every primary before it accepts a device and refuses to start on an
//!   evicting one, unless `redis.allow_evicting_policy` says the operator accepts that
//!   (then it warns, and the gauge `trackgate_redis_evicting_policy` shows it). The check
//!   runs again every `redis.policy_check_interval_s` (the connection gives no signal
//!   when it reconnects to a restarted or failed-over server); a policy that turns
//!   evicting later makes `/readyz` answer 503 `redis_evicting_policy` and is logged as
//!   an error once. A server that refuses `CONFIG GET` (renamed or disabled `CONFIG`, an
//!   ACL without `+config|get`, as managed services do) cannot be checked: that is
//!   logged as a warning and the gateway goes on.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use crate::config::RedisConfig;
use crate::metrics as m;
use crate::redis_conn::{RedisConn, ScanTarget};

/// What the gateway does about one server's `maxmemory-policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyVerdict {
    /// `noeviction`: a full Redis refuses writes, which are retried; nothing is deleted.
    Safe,
    /// An evicting policy, not allowed: refuse to start (not ready once running).
    Refuse,
    /// An evicting policy the operator allowed (`redis.allow_evicting_policy`): go on,
    /// loudly.
    Allowed,
}

/// The verdict on `policy` (as `CONFIG GET maxmemory-policy` answers it). Anything but
/// `noeviction` evicts: the `allkeys-*` policies any key, the `volatile-*` ones every
/// key with an expiry, which is every key of a device.
pub fn policy_verdict(policy: &str, allow_evicting: bool) -> PolicyVerdict {
    if policy.trim().eq_ignore_ascii_case("noeviction") {
        PolicyVerdict::Safe
    } else if allow_evicting {
        PolicyVerdict::Allowed
    } else {
        PolicyVerdict::Refuse
    }
}

/// What one look at every primary found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyCheck {
    /// Every primary runs `noeviction`.
    NoEviction,
    /// A primary runs this evicting policy (the first one found).
    Evicting { node: String, policy: String },
    /// A primary refused `CONFIG GET` with this error reply (and none was found evicting).
    Unchecked { node: String, reason: String },
}

/// Ask every primary for its `maxmemory-policy`. `Err`: Redis could not be asked (not
/// reachable, timed out): try again later.
pub async fn check_policy(conn: &RedisConn) -> redis::RedisResult<PolicyCheck> {
    let mut unchecked = None;
    for target in conn.scan_targets().await? {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg("maxmemory-policy");
        let reply = match conn.query_on(&target, cmd).await {
            Ok(v) => v,
            Err(e) if is_refusal(&e) => {
                unchecked.get_or_insert(PolicyCheck::Unchecked {
                    node: target.to_string(),
                    reason: e.to_string(),
                });
                continue;
            }
            Err(e) => return Err(e),
        };
        let policy = policy_of(reply, &target)?;
        if policy_verdict(&policy, false) != PolicyVerdict::Safe {
            return Ok(PolicyCheck::Evicting {
                node: target.to_string(),
                policy,
            });
        }
    }
    Ok(unchecked.unwrap_or(PolicyCheck::NoEviction))
}

/// The value of a `CONFIG GET maxmemory-policy` reply (`[name, value]`, or a map).
fn policy_of(reply: redis::Value, target: &ScanTarget) -> redis::RedisResult<String> {
    let pairs: std::collections::HashMap<String, String> = redis::from_redis_value(reply)?;
    pairs.get("maxmemory-policy").cloned().ok_or_else(|| {
        redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "CONFIG GET maxmemory-policy answered without the policy",
            target.to_string(),
        ))
    })
}

/// An error reply that means "you may not ask" (unknown command, no permission), as
/// opposed to a server that is busy, loading or unreachable (ask again later).
fn is_refusal(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    match e.kind() {
        ErrorKind::Server(ServerErrorKind::ResponseError | ServerErrorKind::NoPerm) => true,
        ErrorKind::Extension => !matches!(e.code(), Some("LOADING" | "BUSY" | "OOM")),
        _ => false,
    }
}

/// An evicting `maxmemory-policy` that the configuration does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "maxmemory-policy is {policy} on Redis {node}: when full, Redis deletes keys to make \
     room, acknowledged fixes and purge tombstones included. Set `CONFIG SET \
     maxmemory-policy noeviction` on every primary (and `maxmemory-policy noeviction` in \
     redis.conf, so a restart keeps it), or set redis.allow_evicting_policy = true to \
     accept losing data"
)]
pub struct EvictingPolicy {
    pub node: String,
    pub policy: String,
}

/// The policy seen last, so that each change is logged once (not every interval).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Seen {
    NotYet = 0,
    NoEviction = 1,
    Evicting = 2,
    Unchecked = 3,
}

impl Seen {
    fn from_u8(v: u8) -> Seen {
        match v {
            1 => Seen::NoEviction,
            2 => Seen::Evicting,
            3 => Seen::Unchecked,
            _ => Seen::NotYet,
        }
    }
}

/// The `maxmemory-policy` checks of one gateway: at start ([`PolicyWatch::at_start`])
/// and every `redis.policy_check_interval_s` ([`PolicyWatch::run`]).
#[derive(Debug)]
pub struct PolicyWatch {
    allow_evicting: bool,
    interval: Duration,
    /// Longest wait for one check (connect + answer).
    timeout: Duration,
    seen: AtomicU8,
    /// An evicting policy is in force that the configuration does not allow.
    refused: AtomicBool,
}

impl From<&RedisConfig> for PolicyWatch {
    fn from(r: &RedisConfig) -> Self {
        PolicyWatch {
            allow_evicting: r.allow_evicting_policy,
            interval: Duration::from_secs(r.policy_check_interval_s),
            timeout: Duration::from_millis(
                r.connect_timeout_ms.saturating_add(r.response_timeout_ms),
            ),
            seen: AtomicU8::new(Seen::NotYet as u8),
            refused: AtomicBool::new(false),
        }
    }
}

impl PolicyWatch {
    /// The start check: `Err` if a primary runs an evicting policy that is not allowed
    /// (`serve` then refuses to start). A Redis that cannot be reached yet is checked by
    /// [`PolicyWatch::run`] once it answers.
    pub async fn at_start(&self, conn: &RedisConn) -> Result<(), EvictingPolicy> {
        match self.check(conn, true).await {
            Some(Err(e)) => Err(e),
            Some(Ok(())) => Ok(()),
            None => {
                tracing::warn!(
                    "could not reach Redis to check its maxmemory-policy; checked once it answers"
                );
                Ok(())
            }
        }
    }

    /// Check again every interval until `stop`; every second while no check has reached
    /// Redis yet (a gateway started before its Redis learns the policy at once).
    pub async fn run(
        self: std::sync::Arc<Self>,
        conn: RedisConn,
        stop: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let unseen = Seen::from_u8(self.seen.load(Ordering::Acquire)) == Seen::NotYet;
            let wait = if unseen {
                self.interval.min(Duration::from_secs(1))
            } else {
                self.interval
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => return,
            }
            tokio::select! {
                // An unreachable Redis is the writers' and `/readyz`'s business.
                _ = self.check(&conn, false) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// True while a primary runs an evicting policy that is not allowed (`/readyz`).
    pub fn refused(&self) -> bool {
        self.refused.load(Ordering::Acquire)
    }

    /// One check, logged when its outcome differs from the last one. `None`: Redis
    /// could not be asked.
    async fn check(&self, conn: &RedisConn, at_start: bool) -> Option<Result<(), EvictingPolicy>> {
        let found = match tokio::time::timeout(self.timeout, check_policy(conn)).await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "maxmemory-policy check failed; retrying next interval");
                return None;
            }
            Err(_) => return None,
        };
        Some(self.observe(found, at_start))
    }

    /// Record what a check found: gauge, readiness, one log line per change (at start,
    /// a refusal is the caller's to report: `serve` exits with it).
    fn observe(&self, found: PolicyCheck, at_start: bool) -> Result<(), EvictingPolicy> {
        let (seen, result) = match &found {
            PolicyCheck::NoEviction => (Seen::NoEviction, Ok(())),
            PolicyCheck::Unchecked { .. } => (Seen::Unchecked, Ok(())),
            PolicyCheck::Evicting { node, policy } => {
                match policy_verdict(policy, self.allow_evicting) {
                    PolicyVerdict::Refuse => (
                        Seen::Evicting,
                        Err(EvictingPolicy {
                            node: node.clone(),
                            policy: policy.clone(),
                        }),
                    ),
                    PolicyVerdict::Allowed | PolicyVerdict::Safe => (Seen::Evicting, Ok(())),
                }
            }
        };
        metrics::gauge!(m::REDIS_EVICTING_POLICY).set(f64::from(u8::from(seen == Seen::Evicting)));
        self.refused.store(result.is_err(), Ordering::Release);
        let before = Seen::from_u8(self.seen.swap(seen as u8, Ordering::AcqRel));
        if before != seen && !(at_start && result.is_err()) {
            log_policy(&found, &result);
        }
        result
    }
}

/// The one log line for a new policy finding.
fn log_policy(found: &PolicyCheck, result: &Result<(), EvictingPolicy>) {
    match (found, result) {
        (PolicyCheck::NoEviction, _) => {
            tracing::info!("Redis maxmemory-policy is noeviction on every primary")
        }
        (PolicyCheck::Unchecked { node, reason }, _) => tracing::warn!(
            node = %node,
            error = %reason,
            "could not check Redis' maxmemory-policy (CONFIG GET refused; managed services often rename or disable CONFIG): make sure it is noeviction, or a full Redis deletes acknowledged data"
        ),
        (PolicyCheck::Evicting { node, policy }, Ok(())) => tracing::warn!(
            node = %node,
            policy = %policy,
            "Redis runs an evicting maxmemory-policy, allowed by redis.allow_evicting_policy: when full it deletes acknowledged fixes and purge tombstones"
        ),
        (PolicyCheck::Evicting { .. }, Err(e)) => {
            tracing::error!("{e}; /readyz answers 503 redis_evicting_policy until it is fixed");
        }
    }
}

/// Why `/readyz` says no, as far as Redis memory goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReady {
    /// A primary runs an evicting policy that is not allowed.
    EvictingPolicy,
}

impl NotReady {
    /// The word `/readyz` answers with.
    pub fn label(self) -> &'static str {
        match self {
            NotReady::EvictingPolicy => "redis_evicting_policy",
        }
    }

    /// `/readyz`'s answer: the label, then what it means.
    pub fn body(self) -> &'static str {
        match self {
            NotReady::EvictingPolicy => {
                "redis_evicting_policy: Redis would delete data when full (maxmemory-policy)\n"
            }
        }
    }
}

/// What `/readyz` reads: the policy checks.
#[derive(Debug, Clone)]
pub struct MemoryStatus {
    pub policy: std::sync::Arc<PolicyWatch>,
}

impl MemoryStatus {
    /// The first reason not to be ready, if any.
    pub fn not_ready(&self) -> Option<NotReady> {
        self.policy.refused().then_some(NotReady::EvictingPolicy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_noeviction_is_safe() {
        assert_eq!(policy_verdict("noeviction", false), PolicyVerdict::Safe);
        assert_eq!(policy_verdict("NoEviction\n", true), PolicyVerdict::Safe);
        for p in [
            "allkeys-lru",
            "allkeys-lfu",
            "allkeys-random",
            "volatile-lru",
            "volatile-lfu",
            "volatile-random",
            "volatile-ttl",
            "some-future-policy",
            "",
        ] {
            assert_eq!(policy_verdict(p, false), PolicyVerdict::Refuse, "{p}");
            assert_eq!(policy_verdict(p, true), PolicyVerdict::Allowed, "{p}");
        }
    }

    fn watch(allow: bool) -> PolicyWatch {
        let r = RedisConfig {
            allow_evicting_policy: allow,
            ..RedisConfig::default()
        };
        PolicyWatch::from(&r)
    }

    #[test]
    fn an_evicting_policy_refuses_unless_allowed_and_a_refused_config_does_not() {
        let evicting = PolicyCheck::Evicting {
            node: "server".into(),
            policy: "allkeys-lru".into(),
        };
        let w = watch(false);
        let e = w.observe(evicting.clone(), true).unwrap_err();
        assert!(e.to_string().contains("allkeys-lru"), "{e}");
        assert!(
            e.to_string()
                .contains("CONFIG SET maxmemory-policy noeviction")
        );
        assert!(e.to_string().contains("redis.allow_evicting_policy"));
        assert!(w.refused());
        w.observe(PolicyCheck::NoEviction, false).unwrap();
        assert!(!w.refused(), "fixed on the server: ready again");

        let allowed = watch(true);
        allowed.observe(evicting, true).unwrap();
        assert!(!allowed.refused());

        let managed = watch(false);
        managed
            .observe(
                PolicyCheck::Unchecked {
                    node: "server".into(),
                    reason: "ERR unknown command 'CONFIG'".into(),
                },
                true,
            )
            .unwrap();
        assert!(!managed.refused());
    }

    #[test]
    fn readiness_names_the_reason() {
        let status = MemoryStatus {
            policy: std::sync::Arc::new(watch(false)),
        };
        assert_eq!(status.not_ready(), None);
        let evicting = PolicyCheck::Evicting {
            node: "server".into(),
            policy: "volatile-ttl".into(),
        };
        let _ = status.policy.observe(evicting, false);
        assert_eq!(
            status.not_ready().map(NotReady::label),
            Some("redis_evicting_policy")
        );
        let r = NotReady::EvictingPolicy;
        assert!(r.body().starts_with(r.label()));
    }
}
