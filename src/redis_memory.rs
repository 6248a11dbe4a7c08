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
//! * **Out of memory.** Under `noeviction`, a full Redis refuses writes (`OOM` error
//!   replies). The writers keep retrying with backoff (nothing is acknowledged, nothing
//!   dropped), and [`OomWatch`] turns the refusals of all writers into one episode:
//!   logged once when it starts (warning, with the devices and jobs waiting) and once
//!   when it ends (info, with how long it lasted and how many attempts were refused),
//!   shown by `trackgate_redis_oom` (0/1) and `trackgate_redis_oom_refused_total`, and
//!   by `/readyz` (503 `redis_oom`) while it lasts.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

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

/// The out-of-memory episodes of all writers (see the module docs). Cheap when nothing is
/// refused: only refusals and the writes of refused devices take its lock.
#[derive(Debug)]
pub struct OomWatch {
    active: AtomicBool,
    episode: Mutex<Episode>,
    /// An episode ends once every refused call has been written and nothing has been
    /// refused for this long: a Redis at the edge of `maxmemory` that takes one write and
    /// refuses the next stays one episode.
    settle: Duration,
}

#[derive(Debug, Default)]
struct Episode {
    since: Option<Instant>,
    last_refused: Option<Instant>,
    /// Device calls refused and not yet written (nor given up), across writers.
    devices: usize,
    /// Jobs (frames) in those calls.
    jobs: usize,
    peak_devices: usize,
    peak_jobs: usize,
    /// Attempts refused during the episode.
    refused: u64,
}

/// What one node pipeline met with, for [`OomWatch::record`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OomTally {
    /// Calls refused with `OOM` (every attempt counts).
    pub refused: usize,
    /// Of those, calls refused for the first time: devices now waiting, and their jobs.
    pub new_devices: usize,
    pub new_jobs: usize,
    /// Calls written (or given up, which is logged on its own) that had been refused
    /// before: no longer waiting.
    pub done_devices: usize,
    pub done_jobs: usize,
}

impl OomWatch {
    /// `settle`: how long nothing may be refused before an episode ends (from the
    /// configuration: twice `redis.retry_backoff_max_ms`, in which every waiting device
    /// has retried).
    pub fn new(settle: Duration) -> Self {
        OomWatch {
            active: AtomicBool::new(false),
            episode: Mutex::new(Episode::default()),
            settle,
        }
    }

    /// True while an episode lasts (`/readyz`).
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Count what a pipeline met with; start an episode at the first refusal. `error`:
    /// one of the refusals, for the log line.
    pub fn record(&self, t: OomTally, error: Option<&redis::RedisError>, now: Instant) {
        if t == OomTally::default() {
            return;
        }
        metrics::counter!(m::REDIS_OOM_REFUSED).increment(t.refused as u64);
        let Ok(mut ep) = self.episode.lock() else {
            return;
        };
        ep.devices = (ep.devices + t.new_devices).saturating_sub(t.done_devices);
        ep.jobs = (ep.jobs + t.new_jobs).saturating_sub(t.done_jobs);
        ep.peak_devices = ep.peak_devices.max(ep.devices);
        ep.peak_jobs = ep.peak_jobs.max(ep.jobs);
        if t.refused > 0 {
            ep.refused += t.refused as u64;
            ep.last_refused = Some(now);
            if ep.since.is_none() {
                ep.since = Some(now);
                self.active.store(true, Ordering::Release);
                metrics::gauge!(m::REDIS_OOM).set(1.0);
                tracing::warn!(
                    devices_waiting = ep.devices,
                    jobs_waiting = ep.jobs,
                    error = %error.map(ToString::to_string).unwrap_or_default(),
                    "Redis is out of memory (maxmemory reached): writes are refused and retried with backoff; nothing is acknowledged or dropped meanwhile. Free memory or raise maxmemory"
                );
            }
        }
        self.end_if_due(&mut ep, now);
    }

    /// When the current episode may end, if nothing is waiting any more (a writer wakes
    /// then and calls [`OomWatch::poll`]).
    pub fn end_due(&self) -> Option<Instant> {
        let ep = self.episode.lock().ok()?;
        if ep.since.is_none() || ep.devices > 0 {
            return None;
        }
        ep.last_refused.map(|t| t + self.settle)
    }

    /// End the episode if it is over.
    pub fn poll(&self, now: Instant) {
        if !self.active() {
            return;
        }
        if let Ok(mut ep) = self.episode.lock() {
            self.end_if_due(&mut ep, now);
        }
    }

    fn end_if_due(&self, ep: &mut Episode, now: Instant) {
        let Some(since) = ep.since else {
            return;
        };
        let quiet = ep.last_refused.is_none_or(|t| now >= t + self.settle);
        if ep.devices > 0 || !quiet {
            return;
        }
        tracing::info!(
            lasted_ms = u64::try_from(now.duration_since(since).as_millis()).unwrap_or(u64::MAX),
            refused_attempts = ep.refused,
            devices_peak = ep.peak_devices,
            jobs_peak = ep.peak_jobs,
            "Redis accepts writes again: the out-of-memory episode is over"
        );
        *ep = Episode::default();
        self.active.store(false, Ordering::Release);
        metrics::gauge!(m::REDIS_OOM).set(0.0);
    }
}

impl From<&RedisConfig> for OomWatch {
    fn from(r: &RedisConfig) -> Self {
        OomWatch::new(Duration::from_millis(
            r.retry_backoff_max_ms.saturating_mul(2),
        ))
    }
}

/// `OOM` error reply: Redis is at `maxmemory` and refuses writes.
pub fn is_oom(e: &redis::RedisError) -> bool {
    e.code() == Some("OOM")
}

/// Why `/readyz` says no, as far as Redis memory goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReady {
    /// Redis refuses writes for want of memory.
    Oom,
    /// A primary runs an evicting policy that is not allowed.
    EvictingPolicy,
}

impl NotReady {
    /// The word `/readyz` answers with.
    pub fn label(self) -> &'static str {
        match self {
            NotReady::Oom => "redis_oom",
            NotReady::EvictingPolicy => "redis_evicting_policy",
        }
    }

    /// `/readyz`'s answer: the label, then what it means.
    pub fn body(self) -> &'static str {
        match self {
            NotReady::Oom => {
                "redis_oom: Redis refuses writes (maxmemory reached); they are retried\n"
            }
            NotReady::EvictingPolicy => {
                "redis_evicting_policy: Redis would delete data when full (maxmemory-policy)\n"
            }
        }
    }
}

/// What `/readyz` reads: the writers' episodes and the policy checks.
#[derive(Debug, Clone)]
pub struct MemoryStatus {
    pub oom: std::sync::Arc<OomWatch>,
    pub policy: std::sync::Arc<PolicyWatch>,
}

impl MemoryStatus {
    /// The first reason not to be ready, if any.
    pub fn not_ready(&self) -> Option<NotReady> {
        if self.oom.active() {
            Some(NotReady::Oom)
        } else if self.policy.refused() {
            Some(NotReady::EvictingPolicy)
        } else {
            None
        }
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

    fn oom_error() -> redis::RedisError {
        redis::make_extension_error(
            "OOM".into(),
            Some("command not allowed when used memory > 'maxmemory'.".into()),
        )
    }

    #[test]
    fn oom_replies_are_recognised() {
        assert!(is_oom(&oom_error()));
        let other = redis::make_extension_error("BUSY".into(), None);
        assert!(!is_oom(&other));
    }

    #[test]
    fn an_oom_episode_lasts_until_every_refused_call_is_written_and_redis_stays_quiet() {
        let w = OomWatch::new(Duration::from_millis(400));
        let t0 = Instant::now();
        assert!(!w.active());
        let refused = |devices, jobs| OomTally {
            refused: devices,
            new_devices: devices,
            new_jobs: jobs,
            ..OomTally::default()
        };
        w.record(refused(3, 5), Some(&oom_error()), t0);
        assert!(w.active());
        assert_eq!(w.end_due(), None, "devices are waiting");
        // Retries refused again: not new devices.
        let again = OomTally {
            refused: 3,
            ..OomTally::default()
        };
        w.record(again, None, t0 + Duration::from_millis(100));
        // Two of them written, one still waiting.
        let some = OomTally {
            done_devices: 2,
            done_jobs: 3,
            ..OomTally::default()
        };
        w.record(some, None, t0 + Duration::from_millis(200));
        assert!(w.active());
        let rest = OomTally {
            done_devices: 1,
            done_jobs: 2,
            ..OomTally::default()
        };
        w.record(rest, None, t0 + Duration::from_millis(300));
        assert!(w.active(), "quiet for only 200 ms");
        assert_eq!(w.end_due(), Some(t0 + Duration::from_millis(500)));
        // A refusal within the settle time continues the same episode.
        w.record(refused(1, 1), None, t0 + Duration::from_millis(450));
        w.poll(t0 + Duration::from_millis(900));
        assert!(w.active(), "one device still waits");
        let last = OomTally {
            done_devices: 1,
            done_jobs: 1,
            ..OomTally::default()
        };
        w.record(last, None, t0 + Duration::from_millis(500));
        w.poll(t0 + Duration::from_millis(849));
        assert!(w.active());
        w.poll(t0 + Duration::from_millis(850));
        assert!(!w.active(), "over");
        assert_eq!(w.end_due(), None);
    }

    #[test]
    fn readiness_names_the_reason() {
        let status = MemoryStatus {
            oom: std::sync::Arc::new(OomWatch::new(Duration::from_millis(1))),
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
        let t = OomTally {
            refused: 1,
            new_devices: 1,
            new_jobs: 1,
            ..OomTally::default()
        };
        status.oom.record(t, None, Instant::now());
        assert_eq!(status.not_ready().map(NotReady::label), Some("redis_oom"));
        for r in [NotReady::Oom, NotReady::EvictingPolicy] {
            assert!(r.body().starts_with(r.label()));
        }
    }
}
