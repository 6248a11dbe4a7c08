//! Hard retention of location history (DESIGN §6).
//!
//! Three mechanisms, each covering the others' gaps:
//! 1. **At ingest** a fix whose fix time is already older than the device's TTL is dropped
//!    (counted), so late cached batches never extend history past its lifetime.
//! 2. **On write** the append script trims the stream by `MINID ~ now − TTL` (once per
//!    device per batch; approximate, cheap) and moves the key's expiry to now + TTL, so a
//!    silent device's stream disappears whole.
//! 3. **The sweeper** trims every device exactly every `sweep_interval_s`, with the
//!    device's retention as it is now (looked up, not taken from its last write, so a
//!    lowered one reaches quiet devices too): the live tail by `MINID now − TTL`, its late
//!    deliveries by fix time, the history chunks by row time. A fix is physically gone by
//!    TTL + sweep interval at the latest.
//!
//! **Several gateways** share one Redis (or cluster): each sweep first takes a lease
//! (`SET tg:{sweep}:lease <instance> NX PX <90 % of the interval>`), so of N gateways one
//! sweeps per interval and the others skip. The lease is not released after a sweep: it
//! expires just before the holder's next tick, so the holder tends to keep it and the
//! others keep missing it; if the holder dies another gateway takes over within one
//! interval (data is then physically gone by TTL + 2 sweep intervals at worst). In
//! cluster mode the sweep SCANs every primary in turn.
//!
//! The entry ID (receive time) is what trimming compares; read paths additionally filter
//! on both receive time and fix time, so nothing older than the TTL is ever returned.

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use redis::aio::ConnectionLike;
use tokio_util::sync::CancellationToken;

use crate::config::RetentionConfig;
use crate::metrics as m;
use crate::pseudonym::Pseudonym;
use crate::redis_conn::RedisConn;
use crate::registry::owner_key;
use crate::store::hist;
use crate::store::keys::{CUSTOMER_RETENTION_S, customer_key};
use crate::store::scripts::{self, SweepStep};
use crate::store::vault::Vault;
use crate::store::{FIXES_PATTERN, HIST_PATTERN, pseudonym_of_key};

pub use crate::store::keys::SWEEP_LEASE_KEY;

/// The retention policy: a default, and the period agreed with the device's owner.
#[derive(Debug, Clone)]
pub struct Retention {
    default_ttl: Duration,
    max_customer_ttl: Duration,
    /// The sweeper's batch sizes (`retention.sweep_scan_count`,
    /// `retention.sweep_late_chunk_entries`).
    sweep_scan_count: usize,
    sweep_late_chunk: u64,
    /// `storage.future_fix_tolerance_s`: how far past its receipt a row's time may lie.
    future_tolerance_s: i64,
    /// Opens and seals the history chunks the sweeper rewrites (none without
    /// [`Retention::with_vault`]: a sealed chunk is then only removed whole).
    vault: Arc<Vault>,
    /// `audit.retention_s`: the sweeper trims older audit lines (`None`: never).
    audit_retention: Option<Duration>,
}

impl Retention {
    pub fn new(config: &RetentionConfig) -> Self {
        Retention {
            default_ttl: Duration::from_secs(config.ttl_s),
            max_customer_ttl: Duration::from_secs(config.max_customer_ttl_s),
            sweep_scan_count: config.sweep_scan_count,
            sweep_late_chunk: config.sweep_late_chunk_entries,
            future_tolerance_s: crate::config::StorageConfig::default().future_tolerance_s(),
            vault: Arc::new(Vault::empty()),
            audit_retention: None,
        }
    }

    /// Trim audit lines older than `audit.retention_s` on every sweep.
    pub fn with_audit(mut self, audit: &crate::config::AuditConfig) -> Self {
        self.audit_retention =
            (audit.retention_s > 0).then(|| Duration::from_secs(audit.retention_s));
        self
    }

    /// Rewrite sealed history chunks with these data keys.
    pub fn with_vault(mut self, vault: Arc<Vault>) -> Self {
        self.vault = vault;
        self
    }

    /// Use `storage.future_fix_tolerance_s` (the sweeper reads history chunks up to that
    /// far past the cutoff).
    pub fn with_future_tolerance(mut self, storage: &crate::config::StorageConfig) -> Self {
        self.future_tolerance_s = storage.future_tolerance_s();
        self
    }

    /// The hook every write and read path asks: how long may this device's fixes live?
    /// The owner's agreed `retention_s` (bounded by `max_customer_ttl_s`), else the
    /// default. `owners` are the device's pseudonyms under every key version, newest
    /// first: ownership is recorded per version, and a device assigned before a key
    /// rotation has its owner only under the older ones. A Redis error is an error, not
    /// the default (which may be longer than what the owner agreed to): the caller
    /// decides (ingest applies [`Retention::provisional_ttl`] and looks again soon).
    pub async fn ttl_for<C: ConnectionLike + Send + Sync>(
        &self,
        conn: &mut C,
        owners: &[Pseudonym],
    ) -> redis::RedisResult<Duration> {
        for p in owners {
            let owner: Option<String> = conn.get(owner_key(p)).await?;
            if let Some(customer) = owner {
                return self.ttl_for_customer(conn, &customer).await;
            }
        }
        Ok(self.default_ttl)
    }

    /// TTL for a device owned by `customer` (an error if Redis cannot say).
    pub async fn ttl_for_customer<C: ConnectionLike + Send + Sync>(
        &self,
        conn: &mut C,
        customer: &str,
    ) -> redis::RedisResult<Duration> {
        let agreed: Option<u64> = conn
            .hget(customer_key(customer), CUSTOMER_RETENTION_S)
            .await?;
        Ok(match agreed {
            Some(s) if s > 0 => Duration::from_secs(s).min(self.max_customer_ttl),
            _ => self.default_ttl,
        })
    }

    /// The retention to write with while a device's own is unknown (its lookup failed):
    /// the longest one could have, so that nothing is dropped at ingest nor trimmed from
    /// its history on a guess. Corrected by the first successful lookup, whose write
    /// trims to the real one.
    pub fn provisional_ttl(&self) -> Duration {
        self.default_ttl.max(self.max_customer_ttl)
    }

    pub fn default_ttl(&self) -> Duration {
        self.default_ttl
    }

    /// True if a fix taken at `fix_time_s` is already past `ttl` at `now_s`.
    pub fn expired_at_ingest(&self, fix_time_s: Option<i64>, ttl: Duration, now_s: i64) -> bool {
        let ttl_s = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        fix_time_s.is_some_and(|t| t < now_s.saturating_sub(ttl_s))
    }
}

/// Sweep every `interval` until `stop` fires (a sweep is idempotent: stopping half-way
/// loses nothing), when this gateway (`instance`) holds the sweep lease.
pub async fn run_sweeper(
    conn: RedisConn,
    retention: Retention,
    interval: Duration,
    instance: String,
    stop: CancellationToken,
) {
    let retention = &retention;
    let instance = instance.as_str();
    crate::periodic::every(interval, stop, || {
        let mut conn = conn.clone();
        async move {
            let lease = Lease {
                key: SWEEP_LEASE_KEY,
                skipped: m::RETENTION_SWEEPS_SKIPPED,
                job: "retention sweep",
            };
            if !lease.take(&mut conn, instance, interval).await {
                return;
            }
            match sweep_once(&conn, retention).await {
                Ok(trimmed) => {
                    metrics::counter!(m::RETENTION_SWEEPS).increment(1);
                    if trimmed > 0 {
                        tracing::info!(trimmed, "retention sweep removed expired fixes");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "retention sweep failed; will retry next interval")
                }
            }
        }
    })
    .await;
}

/// A lease that lets one gateway per interval run a background job (the sweep,
/// compaction).
#[derive(Debug, Clone, Copy)]
pub struct Lease {
    pub key: &'static str,
    /// Counter of the ticks skipped because another gateway held it.
    pub skipped: &'static str,
    /// The job's name in log lines.
    pub job: &'static str,
}

impl Lease {
    /// Take the lease for this tick of `interval`; false (counted, or logged when Redis
    /// cannot say) if this gateway does not hold it and skips the tick.
    pub async fn take<C: ConnectionLike + Send + Sync>(
        &self,
        conn: &mut C,
        instance: &str,
        interval: Duration,
    ) -> bool {
        match try_lease(conn, self.key, instance, lease_for(interval)).await {
            Ok(true) => true,
            Ok(false) => {
                metrics::counter!(self.skipped).increment(1);
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, job = self.job, "lease unavailable; will retry next interval");
                false
            }
        }
    }
}

/// The lease lasts 90 % of the interval: it has expired by the holder's next tick (ticks
/// do not drift much), and a sweep longer than that just overlaps harmlessly.
pub fn lease_for(interval: Duration) -> Duration {
    (interval * 9 / 10).max(Duration::from_millis(1))
}

/// Take the lease `key` (the sweep's, the compactor's) for `ttl` if nobody holds it; true
/// if `instance` now holds it.
pub async fn try_lease<C: ConnectionLike + Send + Sync>(
    conn: &mut C,
    key: &str,
    instance: &str,
    ttl: Duration,
) -> redis::RedisResult<bool> {
    let set: Option<String> = redis::cmd("SET")
        .arg(key)
        .arg(instance)
        .arg("NX")
        .arg("PX")
        .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
        .query_async(conn)
        .await?;
    Ok(set.is_some())
}

/// Trim every device's tail and history (on every primary, in cluster mode) to its
/// retention exactly: the tail by receive time and, for fixes delivered late, by fix time;
/// the history by row time. The retention is looked up now for each device (its owner's
/// agreement, else the default), not taken from its last write, so a lowered one reaches
/// quiet devices too. Returns the fixes removed.
pub async fn sweep_once(conn: &RedisConn, retention: &Retention) -> redis::RedisResult<u64> {
    let now_ms = jiff::Timestamp::now().as_millisecond();
    let mut trimmed = 0u64;
    let mut keyed = conn.clone();
    for target in conn.scan_targets().await? {
        for (pattern, kind) in [(FIXES_PATTERN, "stream"), (HIST_PATTERN, "zset")] {
            let mut cursor: u64 = 0;
            loop {
                let (next, keys) = conn
                    .scan_page(&target, cursor, pattern, retention.sweep_scan_count, kind)
                    .await?;
                for key in keys {
                    let Some(p) = pseudonym_of_key(&key) else {
                        continue;
                    };
                    let ttl = retention
                        .ttl_for(&mut keyed, std::slice::from_ref(&p))
                        .await?;
                    let cutoff_ms = now_ms - i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
                    trimmed += match kind {
                        "stream" => sweep_tail(&mut keyed, &key, &p, cutoff_ms, retention).await?,
                        _ => sweep_history(&mut keyed, &p, cutoff_ms, retention).await?,
                    };
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
    }
    metrics::counter!(m::RETENTION_TRIMMED).increment(trimmed);
    if let Some(keep) = retention.audit_retention {
        let mut c = conn.clone();
        let lines = crate::audit::trim(&mut c, keep).await?;
        if lines > 0 {
            tracing::info!(lines, "audit lines past audit.retention_s trimmed");
        }
    }
    Ok(trimmed)
}

/// Trim one tail: by receive time (entry ids), then the late deliveries by fix time; the
/// same cutoff as at ingest: fix time (s) < (now − ttl) (s).
async fn sweep_tail(
    conn: &mut RedisConn,
    key: &str,
    p: &Pseudonym,
    cutoff_ms: i64,
    retention: &Retention,
) -> redis::RedisResult<u64> {
    let mut trimmed = 0;
    loop {
        let step = SweepStep {
            tail: key,
            min_id_ms: cutoff_ms,
            fix_cutoff_s: cutoff_ms.div_euclid(1000),
            late_chunk: retention.sweep_late_chunk,
        };
        let scripts::Swept {
            removed: n,
            late_taken: late,
        } = scripts::sweep_stream(conn, p, &step).await?;
        trimmed += n;
        if late < retention.sweep_late_chunk {
            return Ok(trimmed);
        }
    }
}

/// Trim one history: every row whose time is before the cutoff, or that was received
/// before it. Only chunks that start before the cutoff plus the future-fix tolerance can
/// hold one (a row's time is at most that far past its receipt): those are read, the
/// expired whole ones removed, a straddling one rewritten. A chunk that changed meanwhile
/// is left to the next sweep.
async fn sweep_history(
    conn: &mut RedisConn,
    p: &Pseudonym,
    cutoff_ms: i64,
    retention: &Retention,
) -> redis::RedisResult<u64> {
    let cutoff_s = cutoff_ms.div_euclid(1000);
    let max = format!("({}", cutoff_s.saturating_add(retention.future_tolerance_s));
    let chunks = hist::chunks_by_score(conn, p, "-inf", &max, 0, usize::MAX).await?;
    let out = hist::drop_rows(
        conn,
        &retention.vault,
        p,
        chunks,
        "retention",
        |r| r.time < cutoff_s || r.recv_ms < cutoff_ms,
        |h| h.last < cutoff_s,
    )
    .await?;
    Ok(out.rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_at_ingest_uses_fix_time() {
        let r = Retention::new(&RetentionConfig::default());
        let ttl = Duration::from_secs(100);
        assert!(r.expired_at_ingest(Some(899), ttl, 1000));
        assert!(!r.expired_at_ingest(Some(900), ttl, 1000));
        assert!(!r.expired_at_ingest(None, ttl, 1000), "no fix time: kept");
    }
}
