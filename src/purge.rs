//! Purges: a customer's deletion request, honoured at once by a fast path and in every
//! case by the deadline of one business day (DESIGN §7).
//!
//! 1. **Journal first.** A request is written to `tg:{purge}:<id>` (hash), the pending set
//!    `tg:{purge}:pending` and the event stream `tg:{purge}:journal` in one transaction before
//!    anything else. If that fails the request is refused (the caller retries); once it
//!    succeeds the purge cannot be lost: a worker finishes any pending purge, also after a
//!    restart.
//! 2. **Fast path.** Then the purge runs at once, per pseudonym of the device (every key
//!    version): a complete purge unlinks the stream and metadata and records the cutoff in
//!    the tombstone; a range purge records the range cutoff, then deletes exactly the
//!    entries whose fix time is in the range. The tombstone makes the append script refuse
//!    any fix received at or before the cutoff that was still in flight, on every gateway.
//! 3. **Receipt.** id, state, counts, cutoff, deadline, completed_at.
//!
//! No raw IMEI is stored: the record holds pseudonyms only.
//!
//! **Redis Cluster.** The bookkeeping keys share the hash tag `{purge}`, so the journal
//! transactions (`MULTI` over record, pending set, journal, idempotency key) stay in one
//! slot; purges are rare, so that one slot is never hot. The per-device steps run one
//! script per pseudonym, whose keys share the device's `{P}` tag: each lands on the
//! device's shard, where the tombstone and the append script meet atomically whichever
//! gateway wrote the fix.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use redis::AsyncCommands;
use redis::aio::ConnectionLike;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::audit::{self, AuditEvent};
use crate::config::PurgeConfig;
use crate::pseudonym::Pseudonym;
use crate::registry::Customer;
use crate::store::fixes_key;
use crate::store::hist;
use crate::store::keys::{PURGE_DISK_KEY, purge_idem_key as idem_key, purge_key};
use crate::store::scripts::{self, RangeStep, RangeStepDone};
use crate::store::vault::Vault;

pub use crate::store::keys::{
    LEGACY_PURGE_PREFIX as LEGACY_PREFIX, PURGE_JOURNAL_KEY as JOURNAL_KEY,
    PURGE_PENDING_KEY as PENDING_KEY, PURGE_UNAUDITED_KEY as UNAUDITED_KEY,
    PURGE_UNAUDITED_REQUESTS_KEY as UNAUDITED_REQUESTS_KEY, purge_record_key as record_key,
};

/// The two audit lines of a purge that are owed until written.
#[derive(Debug, Clone, Copy)]
enum AuditLine {
    Requested,
    Completed,
}

impl AuditLine {
    /// The set of purges owed this line.
    fn owed_key(self) -> &'static str {
        match self {
            AuditLine::Requested => UNAUDITED_REQUESTS_KEY,
            AuditLine::Completed => UNAUDITED_KEY,
        }
    }

    /// The record field (ms) the grace before the worker writes the line counts from.
    fn since_field(self) -> &'static str {
        match self {
            AuditLine::Requested => "requested_ms",
            AuditLine::Completed => "completed_ms",
        }
    }
}

/// Whether a purge record (`tg:{purge}:<id>`) is for the same devices and range as `req`.
fn same_request(record: &HashMap<String, String>, req: &PurgeRequest) -> bool {
    let mut stored: Vec<&str> = record
        .get("devices")
        .map(|d| d.split(',').collect())
        .unwrap_or_default();
    let mut asked: Vec<&str> = req.pseudonyms.iter().map(|p| p.as_str()).collect();
    stored.sort_unstable();
    asked.sort_unstable();
    let range = (
        record.get("from_s").and_then(|v| v.parse::<i64>().ok()),
        record.get("to_s").and_then(|v| v.parse::<i64>().ok()),
    );
    let asked_range = req.range.map_or((None, None), |(f, t)| {
        (Some(f.as_second()), Some(t.as_second()))
    });
    stored == asked && range == asked_range
}

/// Purge problems.
#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    /// The request could not be journaled; nothing was done. Retry.
    #[error("purge journal unavailable: {0}")]
    Unavailable(redis::RedisError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("deadline: {0}")]
    Calendar(#[from] crate::calendar::CalendarError),
    #[error("invalid range: from must not be after to")]
    Range,
    /// The idempotency key names an earlier purge of other devices or another range.
    #[error("idempotency key already used for purge {0} of other devices or another range")]
    IdempotencyConflict(String),
}

/// A purge's state and outcome, as the customer sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Receipt {
    pub id: String,
    /// `pending` or `completed`.
    pub state: String,
    /// `device` (everything) or `range` (fix times from..=to).
    pub scope: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub from: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub to: Option<Timestamp>,
    #[schema(value_type = String, format = DateTime)]
    pub requested_at: Timestamp,
    /// Fixes received at or before this instant are gone for good once completed.
    #[schema(value_type = String, format = DateTime)]
    pub cutoff: Timestamp,
    /// One business day after the request, in the customer's time zone.
    #[schema(value_type = String, format = DateTime)]
    pub deadline: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub completed_at: Option<Timestamp>,
    /// When the purged data was also gone from the AOF and RDB of every Redis primary and
    /// replica (the end of the first rewrite that started after completion); absent until
    /// then.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub disk_rewritten_at: Option<Timestamp>,
    pub deleted_fixes: u64,
    #[serde(skip)]
    #[schema(ignore)]
    pub customer: String,
}

/// What to purge.
#[derive(Debug, Clone)]
pub struct PurgeRequest {
    /// The device's pseudonyms under every key version.
    pub pseudonyms: Vec<Pseudonym>,
    /// Fix-time range (inclusive); `None` purges the whole device.
    pub range: Option<(Timestamp, Timestamp)>,
    pub idempotency_key: Option<String>,
}

/// Runs purges against Redis.
#[derive(Debug, Clone)]
pub struct Purger<C> {
    conn: C,
    /// How long tombstones live: the longest retention, so no in-flight or retried write
    /// from before a purge can outlive it.
    tomb_ttl: Duration,
    /// Move bookkeeping from the old key layout before the first pass (single server).
    migrate_legacy: bool,
    /// Limits and margins (`[purge]` in the configuration).
    config: PurgeConfig,
    /// Opens and seals the history chunks a range purge rewrites (none without
    /// [`Purger::with_vault`]: a sealed chunk reaching into the range then goes whole).
    vault: Arc<Vault>,
}

fn ts_ms(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH)
}

impl<C: ConnectionLike + Clone + Send + Sync> Purger<C> {
    pub fn new(conn: C, tomb_ttl: Duration) -> Self {
        Purger {
            conn,
            tomb_ttl,
            migrate_legacy: false,
            config: PurgeConfig::default(),
            vault: Arc::new(Vault::empty()),
        }
    }

    /// Rewrite sealed history chunks with these data keys.
    pub fn with_vault(mut self, vault: Arc<Vault>) -> Self {
        self.vault = vault;
        self
    }

    /// Use these limits and margins instead of the defaults. Among them
    /// `clock_skew_margin_ms`: in-flight fixes received up to that long after a purge's
    /// cutoff are refused too, since the cutoff is this gateway's clock and a fix's
    /// receive time another gateway's. The receipt still shows the requested cutoff.
    pub fn with_config(mut self, config: &PurgeConfig) -> Self {
        self.config = config.clone();
        self
    }

    fn ms(v: u64) -> i64 {
        i64::try_from(v).unwrap_or(i64::MAX)
    }

    /// Have the worker move purges kept under the old key layout (see
    /// [`migrate_legacy_keys`]) before its first pass. Single server only: the old layout
    /// never ran on a cluster.
    pub fn with_legacy_migration(mut self) -> Self {
        self.migrate_legacy = true;
        self
    }

    /// Journal a purge for `customer`, then run the fast path. A fast path that fails
    /// leaves the purge pending for the worker; the receipt says so.
    pub async fn request(
        &self,
        customer: &Customer,
        req: &PurgeRequest,
    ) -> Result<Receipt, PurgeError> {
        let id = self.journal(customer, req).await?;
        if let Err(e) = self.run(&id, true).await {
            tracing::warn!(purge = %id, error = %e, "purge fast path failed; the worker will finish it");
        }
        self.receipt(&id)
            .await?
            .ok_or(PurgeError::Redis(redis::RedisError::from((
                redis::ErrorKind::Client,
                "purge record vanished",
            ))))
    }

    /// Only journal the purge (durably pending); returns its id. An idempotency key seen
    /// before returns the earlier purge's id.
    pub async fn journal(
        &self,
        customer: &Customer,
        req: &PurgeRequest,
    ) -> Result<String, PurgeError> {
        if let Some((from, to)) = req.range {
            if from > to {
                return Err(PurgeError::Range);
            }
        }
        let mut conn = self.conn.clone();
        if let Some(k) = &req.idempotency_key {
            let existing: Option<String> = conn
                .get(idem_key(&customer.id, k))
                .await
                .map_err(PurgeError::Unavailable)?;
            if let Some(id) = existing {
                let earlier: HashMap<String, String> = conn
                    .hgetall(record_key(&id))
                    .await
                    .map_err(PurgeError::Unavailable)?;
                if earlier.is_empty() || same_request(&earlier, req) {
                    return Ok(id);
                }
                return Err(PurgeError::IdempotencyConflict(id));
            }
        }
        let now = Timestamp::now();
        let deadline = customer.calendar()?.deadline(now)?;
        let id = hex::encode(rand::random::<[u8; 12]>());
        let devices: Vec<&str> = req.pseudonyms.iter().map(|p| p.as_str()).collect();
        let mut fields: Vec<(&str, String)> = vec![
            ("customer", customer.id.clone()),
            ("state", "pending".into()),
            ("devices", devices.join(",")),
            ("requested_ms", now.as_millisecond().to_string()),
            ("cutoff_ms", now.as_millisecond().to_string()),
            ("deadline_ms", deadline.as_millisecond().to_string()),
            ("deleted", "0".into()),
        ];
        if let Some((from, to)) = req.range {
            fields.push(("from_s", from.as_second().to_string()));
            fields.push(("to_s", to.as_second().to_string()));
        }
        let mut tx = redis::pipe();
        tx.atomic()
            .hset_multiple(record_key(&id), &fields)
            .ignore()
            .sadd(PENDING_KEY, &id)
            .ignore()
            .sadd(UNAUDITED_REQUESTS_KEY, &id)
            .ignore()
            .xadd(
                JOURNAL_KEY,
                "*",
                &[("id", id.as_str()), ("event", "requested")],
            )
            .ignore();
        if let Some(k) = &req.idempotency_key {
            tx.cmd("SET")
                .arg(idem_key(&customer.id, k))
                .arg(&id)
                .arg("EX")
                .arg(7 * 24 * 3600)
                .ignore();
        }
        let _: () = tx
            .query_async(&mut conn)
            .await
            .map_err(PurgeError::Unavailable)?;
        // The request is journaled and marked owed its audit line; a failure here leaves
        // the line to the worker.
        if let Err(e) = self
            .write_audit_line(&mut conn, &id, AuditLine::Requested)
            .await
        {
            tracing::warn!(purge = %id, error = %e, "purge.requested audit line left to the worker");
        }
        Ok(id)
    }

    /// The receipt of purge `id`.
    pub async fn receipt(&self, id: &str) -> Result<Option<Receipt>, PurgeError> {
        if id.len() != 24 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let mut conn = self.conn.clone();
        let h: HashMap<String, String> = conn.hgetall(record_key(id)).await?;
        let Some(customer) = h.get("customer") else {
            return Ok(None);
        };
        let ms = |k: &str| h.get(k).and_then(|v| v.parse::<i64>().ok());
        let s = |k: &str| {
            h.get(k)
                .and_then(|v| v.parse::<i64>().ok())
                .and_then(|v| Timestamp::from_second(v).ok())
        };
        let from = s("from_s");
        let disk_rewritten_at = crate::disk::rewritten_at(&mut conn, &record_key(id), &h)
            .await?
            .map(ts_ms);
        Ok(Some(Receipt {
            id: id.into(),
            state: h.get("state").cloned().unwrap_or_default(),
            scope: if from.is_some() { "range" } else { "device" }.into(),
            from,
            to: s("to_s"),
            requested_at: ts_ms(ms("requested_ms").unwrap_or(0)),
            cutoff: ts_ms(ms("cutoff_ms").unwrap_or(0)),
            deadline: ts_ms(ms("deadline_ms").unwrap_or(0)),
            completed_at: ms("completed_ms").map(ts_ms),
            disk_rewritten_at,
            deleted_fixes: h.get("deleted").and_then(|v| v.parse().ok()).unwrap_or(0),
            customer: customer.clone(),
        }))
    }

    /// Carry out purge `id` (idempotent: safe to run again after a crash half-way). The
    /// fast path (`fast`) may leave a range purge of a long stream pending after deleting
    /// what it can find quickly; the worker's run completes it.
    pub async fn run(&self, id: &str, fast: bool) -> Result<(), PurgeError> {
        let mut conn = self.conn.clone();
        let h: HashMap<String, String> = conn.hgetall(record_key(id)).await?;
        if h.get("state").map(String::as_str) != Some("pending") {
            return Ok(());
        }
        let cutoff_ms: i64 = h.get("cutoff_ms").and_then(|v| v.parse().ok()).unwrap_or(0);
        let tomb_cutoff_ms = cutoff_ms.saturating_add(Self::ms(self.config.clock_skew_margin_ms));
        let range = match (h.get("from_s"), h.get("to_s")) {
            (Some(a), Some(b)) => {
                Some((a.parse::<i64>().unwrap_or(0), b.parse::<i64>().unwrap_or(0)))
            }
            _ => None,
        };
        let mut deleted: u64 = h.get("deleted").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut partial = false;
        let devices: Vec<Pseudonym> = h
            .get("devices")
            .map(|d| d.split(',').filter_map(Pseudonym::parse).collect())
            .unwrap_or_default();
        for p in &devices {
            deleted += match range {
                None => {
                    scripts::purge_all(&mut conn, p, tomb_cutoff_ms, cutoff_ms, self.tomb_ttl)
                        .await?
                }
                Some((from, to)) => {
                    let (n, whole) = self
                        .purge_range(&mut conn, p, tomb_cutoff_ms, from, to, fast)
                        .await?;
                    partial |= !whole;
                    n
                }
            };
        }
        if partial {
            // Record what the fast path did; the worker finishes.
            let _: () = conn
                .hset(record_key(id), "deleted", deleted.to_string())
                .await?;
            return Ok(());
        }
        let now = Timestamp::now();
        let mut tx = redis::pipe();
        tx.atomic()
            .hset_multiple(
                record_key(id),
                &[
                    ("state", "completed".to_string()),
                    ("deleted", deleted.to_string()),
                    ("completed_ms", now.as_millisecond().to_string()),
                ],
            )
            .ignore()
            .srem(PENDING_KEY, id)
            .ignore()
            .sadd(UNAUDITED_KEY, id)
            .ignore()
            .xadd(JOURNAL_KEY, "*", &[("id", id), ("event", "completed")])
            .ignore()
            // Redis' files still hold it: the next disk rewrite (`crate::disk`) is owed.
            .hset_nx(PURGE_DISK_KEY, crate::disk::F_DIRTY, now.as_millisecond())
            .ignore();
        let _: () = tx.query_async(&mut conn).await?;
        metrics::counter!(crate::metrics::PURGES_COMPLETED).increment(1);
        // Which rewrite of Redis' files covers it (`crate::disk`); without this (a crash
        // right here) the receipt never claims the files were rewritten.
        if let Err(e) =
            crate::disk::purge_completed(&mut conn, &record_key(id), now.as_millisecond()).await
        {
            tracing::warn!(purge = %id, error = %e, "purge's disk-rewrite epoch not recorded");
        }
        self.write_audit_line(&mut conn, id, AuditLine::Completed)
            .await
    }

    /// Append audit line `line` of purge `id` (from its record: `purge.completed` only
    /// once it is completed), then take the purge off the line's owed set.
    async fn write_audit_line(
        &self,
        conn: &mut C,
        id: &str,
        line: AuditLine,
    ) -> Result<(), PurgeError> {
        let h: HashMap<String, String> = conn.hgetall(record_key(id)).await?;
        let field = |k: &str| h.get(k).map_or("", String::as_str);
        let (due, action, outcome, detail) = match line {
            AuditLine::Requested => (
                h.contains_key("customer"),
                "purge.requested",
                "pending",
                format!("purge {id}"),
            ),
            AuditLine::Completed => (
                field("state") == "completed",
                "purge.completed",
                "ok",
                format!("purge {id}: {} fixes deleted", field("deleted")),
            ),
        };
        if due {
            audit::append(
                conn,
                &AuditEvent {
                    actor: &format!("customer:{}", field("customer")),
                    action,
                    devices: field("devices"),
                    outcome,
                    detail: &detail,
                },
            )
            .await?;
        }
        let _: () = conn.srem(line.owed_key(), id).await?;
        Ok(())
    }

    /// Write the audit lines that purges are still owed (a crash or a Redis blip between
    /// the journaling or the completion and its audit append), once their own gateway had
    /// time to. One line that cannot be written does not hold up the others.
    async fn audit_owed(&self, conn: &mut C) -> Result<usize, PurgeError> {
        let mut owed = Vec::new();
        for line in [AuditLine::Requested, AuditLine::Completed] {
            let ids: Vec<String> = conn.smembers(line.owed_key()).await?;
            owed.extend(ids.into_iter().map(|id| (id, line)));
        }
        let now_ms = Timestamp::now().as_millisecond();
        let mut written = 0;
        let mut first_error = None;
        for (id, line) in &owed {
            // A damaged timestamp is no reason to owe the line forever: it counts as old.
            let when: Option<String> = conn.hget(record_key(id), line.since_field()).await?;
            let when = when.and_then(|t| t.parse::<i64>().ok());
            if when.is_some_and(|t| now_ms - t < Self::ms(self.config.audit_grace_ms)) {
                continue;
            }
            let result = self.write_audit_line(conn, id, *line).await;
            match result {
                Ok(()) => written += 1,
                Err(e) => {
                    tracing::warn!(purge = %id, error = %e, "owed purge audit line not written");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) if written == 0 => Err(e),
            _ => Ok(written),
        }
    }

    /// Range purge of one stream; returns (deleted, whether the whole stream was done).
    async fn purge_range(
        &self,
        conn: &mut C,
        p: &Pseudonym,
        cutoff_ms: i64,
        from_s: i64,
        to_s: i64,
        fast: bool,
    ) -> Result<(u64, bool), PurgeError> {
        // First the mark: from now on no in-flight fix in the range can be written.
        scripts::purge_range_mark(conn, p, (from_s, to_s), cutoff_ms, self.tomb_ttl).await?;
        // Fix time is not ordered by entry id (devices deliver cached fixes late), so an
        // exact purge examines the whole stream. A long stream's fast path only examines
        // the ids around the range.
        let len: u64 = conn.xlen(fixes_key(p)).await?;
        let whole = !fast || len <= self.config.fast_full_scan_max_entries;
        let margin_ms = Self::ms(self.config.fast_window_margin_ms);
        let (mut start, end) = if whole {
            ("-".to_string(), "+".to_string())
        } else {
            (
                format!("{}-0", (from_s * 1000).saturating_sub(margin_ms).max(0)),
                format!("{}", (to_s * 1000 + 999).saturating_add(margin_ms)),
            )
        };
        let mut deleted = 0u64;
        loop {
            let step = RangeStep {
                start: &start,
                end: &end,
                count: self.config.range_chunk_entries,
                from_s,
                to_s,
            };
            let RangeStepDone { last, deleted: n } =
                scripts::purge_range_step(conn, p, &step).await?;
            deleted += n;
            let Some(last) = last else {
                break;
            };
            start = format!("({last}");
        }
        deleted += self.purge_history_range(conn, p, from_s, to_s).await?;
        Ok((deleted, whole))
    }

    /// Range purge of one device's history chunks: every row whose fix time is in
    /// `[from_s, to_s]` (survivors of a chunk rewritten). Chunks that changed meanwhile
    /// (sealed, swept) are read again, a bounded number of times. A damaged chunk whose
    /// header reaches into the range goes whole: none of it can be read anyway, and what
    /// it holds of the range must go (counted and logged); one whose header cannot be read
    /// stays (counted).
    async fn purge_history_range(
        &self,
        conn: &mut C,
        p: &Pseudonym,
        from_s: i64,
        to_s: i64,
    ) -> Result<u64, PurgeError> {
        const ATTEMPTS: usize = 8;
        let mut deleted = 0;
        for _ in 0..ATTEMPTS {
            let chunks: Vec<_> =
                hist::chunks_by_score(conn, p, "-inf", &to_s.to_string(), 0, usize::MAX)
                    .await?
                    .into_iter()
                    .filter(|c| {
                        c.header
                            .as_ref()
                            .map_or(true, |h| h.displaced() || h.last >= from_s)
                    })
                    .collect();
            let out = hist::drop_rows(
                conn,
                &self.vault,
                p,
                chunks,
                "purge",
                |r| r.fix_time_s.is_some_and(|t| (from_s..=to_s).contains(&t)),
                |h| h.first <= to_s && (h.last >= from_s || h.displaced()),
            )
            .await?;
            deleted += out.rows;
            if out.conflicts == 0 {
                return Ok(deleted);
            }
        }
        Err(PurgeError::Redis(redis::RedisError::from((
            redis::ErrorKind::Client,
            "history kept changing during a range purge; the worker retries",
        ))))
    }

    /// Finish pending purges every `interval` until `stop`; counts overdue ones.
    pub async fn run_worker(self, interval: Duration, stop: CancellationToken) {
        let migrated = std::sync::atomic::AtomicBool::new(!self.migrate_legacy);
        crate::periodic::every(interval, stop, || async {
            // A full scan for old-layout keys once; after that, on every pass, the cheap
            // check for a pending set an older gateway (in a rolling upgrade) may still
            // have written since.
            let legacy_pending = self.migrate_legacy
                && migrated.load(std::sync::atomic::Ordering::Relaxed)
                && {
                    let mut conn = self.conn.clone();
                    let n: redis::RedisResult<u64> =
                        conn.exists(format!("{LEGACY_PREFIX}pending")).await;
                    n.map_or(true, |n| n > 0)
                };
            if legacy_pending || !migrated.load(std::sync::atomic::Ordering::Relaxed) {
                let mut conn = self.conn.clone();
                match migrate_legacy_keys(&mut conn).await {
                    Ok(moved) => {
                        if moved > 0 {
                            tracing::info!(keys = moved, "moved purge bookkeeping from the old key layout (tg:purge:*)");
                        }
                        migrated.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => {
                        // Pending purges under the old keys would be missed: no pass yet.
                        tracing::warn!(error = %e, "could not check for purges under the old key layout; retrying next interval");
                        return;
                    }
                }
            }
            if let Err(e) = self.work_once().await {
                tracing::warn!(error = %e, "purge worker pass failed; retrying next interval");
            }
        })
        .await;
    }

    /// One pass over the pending purges.
    pub async fn work_once(&self) -> Result<usize, PurgeError> {
        let mut conn = self.conn.clone();
        // An unreachable audit stream must not stop the purges themselves.
        match self.audit_owed(&mut conn).await {
            Ok(0) => {}
            Ok(owed) => {
                tracing::warn!(
                    purges = owed,
                    "wrote purge audit lines a crash or a Redis blip had left out"
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, "owed purge audit lines not written; retrying next pass")
            }
        }
        let pending: Vec<String> = conn.smembers(PENDING_KEY).await?;
        let now = Timestamp::now();
        let mut overdue = 0u64;
        let mut done = 0;
        for id in &pending {
            match self.run(id, false).await {
                Ok(()) => done += 1,
                Err(e) => {
                    if let Some(r) = self.receipt(id).await.ok().flatten() {
                        if r.deadline < now {
                            overdue += 1;
                            tracing::error!(purge = %id, deadline = %r.deadline, error = %e, "purge overdue");
                        }
                    }
                }
            }
        }
        metrics::gauge!(crate::metrics::PURGES_OVERDUE).set(overdue as f64);
        Ok(done)
    }
}

/// Move purge bookkeeping written by a gateway of the old key layout to the current keys,
/// so that a purge still pending under the old keys is finished (by the deadline) and its
/// receipt and idempotency key still answer. Records and idempotency keys are renamed
/// (`RENAMENX`, keeping their expiry; a name already taken is left alone and logged), the
/// journal is appended to the current one, the pending ids are added to the current set
/// last, so the worker never sees an id whose record has not moved. Safe to run again
/// after a crash half-way (journal events may then appear twice). Single server only.
/// Returns the keys moved.
pub async fn migrate_legacy_keys<C: ConnectionLike + Send + Sync>(
    conn: &mut C,
) -> redis::RedisResult<usize> {
    let pattern = format!("{LEGACY_PREFIX}*");
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(500)
            .query_async(conn)
            .await?;
        keys.extend(page);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let old_pending = format!("{LEGACY_PREFIX}pending");
    let old_journal = format!("{LEGACY_PREFIX}journal");
    let mut moved = 0;
    for key in &keys {
        let Some(rest) = key.strip_prefix(LEGACY_PREFIX) else {
            continue;
        };
        if *key == old_pending || *key == old_journal {
            continue;
        }
        let target = purge_key(rest);
        let renamed: bool = redis::cmd("RENAMENX")
            .arg(key)
            .arg(&target)
            .query_async(conn)
            .await?;
        if renamed {
            moved += 1;
        } else {
            tracing::warn!(key = %key, "purge key of the old layout not moved: the new name is taken");
        }
    }
    if keys.contains(&old_journal) {
        let entries: redis::streams::StreamRangeReply = conn.xrange_all(&old_journal).await?;
        for e in &entries.ids {
            // The entry id was the event's time: kept as a field.
            let mut fields: Vec<(String, Vec<u8>)> =
                vec![("legacy_id".into(), e.id.clone().into())];
            for (k, v) in &e.map {
                fields.push((k.clone(), redis::from_redis_value(v.clone())?));
            }
            fields.sort();
            let _: String = conn.xadd(JOURNAL_KEY, "*", &fields).await?;
            // Entry by entry, not the whole key: an old gateway may still be appending.
            let _: u64 = conn.xdel(&old_journal, &[e.id.as_str()]).await?;
        }
        // Gone once empty (atomically: an entry appended meanwhile keeps it).
        scripts::drop_empty_stream(conn, &old_journal).await?;
        moved += 1;
    }
    if keys.contains(&old_pending) {
        // Id by id, and never the whole set: an old gateway may still be adding purges
        // (a rolling upgrade). A record that arrived after the SCAN is moved here first,
        // so the worker never sees an id without its record.
        let ids: Vec<String> = conn.smembers(&old_pending).await?;
        for id in &ids {
            let old_record = format!("{LEGACY_PREFIX}{id}");
            let exists: bool = conn.exists(&old_record).await?;
            if exists {
                let renamed: bool = redis::cmd("RENAMENX")
                    .arg(&old_record)
                    .arg(record_key(id))
                    .query_async(conn)
                    .await?;
                if !renamed {
                    tracing::warn!(key = %old_record, "purge record of the old layout not moved: the new name is taken");
                }
            }
            let _: () = conn.sadd(PENDING_KEY, id).await?;
            let _: () = conn.srem(&old_pending, id).await?;
        }
        moved += 1;
    }
    Ok(moved)
}
