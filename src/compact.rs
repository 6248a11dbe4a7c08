//! Compaction: fixes received longer ago than `storage.compact_after_s` leave the live
//! tail and are sealed into compressed history chunks (DESIGN §5).
//!
//! Invariants:
//! * **Atomic.** A device's seal is one script call (`store/scripts/seal.lua`) that deletes
//!   the tail entries and adds the chunks holding them, and only if every tail entry and
//!   every chunk it replaces is still there: a purge, the sweeper or another gateway that
//!   got there first turns it into a no-op, read again next pass. A `kill -9` at any
//!   point leaves either the old or the new state, never a fix lost or stored twice.
//! * **Chunks never overlap in time.** A row goes into the chunk whose time span holds it,
//!   or into the gap between two chunks (topping up the one before when it has room), so
//!   score order is time order for every reader.
//! * **Exactly once.** A resent fix (same fix time and content, see
//!   [`Row::is_resend_of`]) meets its first copy in the same chunk and is dropped there.
//! * **Bounded.** At most `compact_device_max_fixes` per device and
//!   `compact_pass_max_fixes` per pass; one gateway per pass (lease `tg:{compact}:lease`,
//!   as for the retention sweep).

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use redis::aio::ConnectionLike;
use tokio_util::sync::CancellationToken;

use crate::config::StorageConfig;
use crate::metrics as m;
use crate::pseudonym::Pseudonym;
use crate::redis_conn::RedisConn;
use crate::store::hist::{self, StoredChunk};
use crate::store::row::Row;
use crate::store::scripts::{self, Swap};
use crate::store::vault::Vault;
use crate::store::{
    CLEAR_CHUNKS_SEALED_KEY, COMPACT_LEASE_KEY, FIXES_PATTERN, HIST_PATTERN, pseudonym_of_key, tail,
};

/// Compaction settings, from `[storage]`.
#[derive(Debug, Clone)]
pub struct Compaction {
    pub after: Duration,
    /// A device whose due entries do not fill a chunk is sealed anyway once its oldest
    /// entry is this old (each chunk is then written about once, not rewritten for every
    /// few fixes).
    pub seal_max_wait: Duration,
    pub interval: Duration,
    pub chunk_max_fixes: usize,
    pub device_max_fixes: usize,
    pub pass_max_fixes: u64,
    pub future_tolerance_s: i64,
    /// Keys asked for per SCAN call.
    pub scan_count: usize,
    /// The data keys chunks are sealed with (and old ones opened with).
    pub vault: Arc<Vault>,
}

impl Compaction {
    /// Settings from `[storage]`, sealing with `vault`.
    pub fn new(s: &StorageConfig, vault: Arc<Vault>) -> Self {
        Compaction {
            after: Duration::from_secs(s.compact_after_s),
            seal_max_wait: Duration::from_secs(s.seal_max_wait_s),
            interval: Duration::from_secs(s.compact_interval_s),
            chunk_max_fixes: s.chunk_max_fixes,
            device_max_fixes: s.compact_device_max_fixes,
            pass_max_fixes: s.compact_pass_max_fixes,
            future_tolerance_s: s.future_tolerance_s(),
            scan_count: 500,
            vault,
        }
    }
}

/// What sealing one device did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    /// Tail entries moved into history.
    pub fixes: u64,
    /// Of those, resends of a fix already stored, dropped.
    pub deduplicated: u64,
    /// The tail or a chunk changed meanwhile: nothing done, try again.
    pub conflict: bool,
    /// The device has more due entries than one call takes.
    pub more: bool,
}

/// Where a run of rows goes: merged with `chunk` (if any) into new chunks.
struct Group {
    chunk: Option<StoredChunk>,
    rows: Vec<Row>,
}

/// The chunk with the greatest first time at or before `t`, and the first time of the
/// chunk after `t` (if any).
async fn neighbours<C: ConnectionLike + Send>(
    conn: &mut C,
    p: &Pseudonym,
    t: i64,
) -> redis::RedisResult<(Option<StoredChunk>, Option<i64>)> {
    let before = hist::chunks_before(conn, p, t, 0, 1)
        .await?
        .into_iter()
        .next();
    let after = hist::chunks_by_score(conn, p, &format!("({t}"), "+inf", 0, 1)
        .await?
        .into_iter()
        .next();
    let next_first = match after {
        // A chunk whose header is damaged: its score still bounds the gap.
        Some(c) => Some(c.header.map(|h| h.first).unwrap_or(t.saturating_add(1))),
        None => None,
    };
    Ok((before, next_first))
}

impl Compaction {
    /// Whether a tail whose oldest entry was received at `first_ms` has waited
    /// `seal_max_wait`.
    fn overdue_since(&self, first_ms: i64, now_ms: i64) -> bool {
        let wait_ms = i64::try_from(self.seal_max_wait.as_millis()).unwrap_or(i64::MAX);
        first_ms <= now_ms.saturating_sub(wait_ms)
    }
}

/// Whether the oldest of `entries` was received more than `seal_max_wait` ago.
fn overdue(entries: &[tail::Entry], s: &Compaction, now_ms: i64) -> bool {
    entries
        .first()
        .and_then(|e| crate::store::row::parse_id(&e.0))
        .is_some_and(|(ms, _)| s.overdue_since(ms, now_ms))
}

/// How many of `p`'s tail entries to read for sealing, or `None` when none is due yet: a
/// device is sealed once its due entries fill a chunk, or its oldest entry has waited
/// `seal_max_wait`. One cheap command decides, on most passes, that a device waits:
/// `XINFO STREAM` gives the tail's length and its first and last ids, hence the share of
/// it that is due (reading the entries to count them cost more than sealing them), and
/// the count of entries ever removed from it, which the seal checks (see [`Swap`]).
async fn due_entries<C: ConnectionLike + Send>(
    conn: &mut C,
    p: &Pseudonym,
    s: &Compaction,
    now_ms: i64,
    end_ms: i64,
    budget: usize,
) -> redis::RedisResult<Option<(usize, tail::Info)>> {
    let id_ms = |id: &Option<String>| {
        id.as_deref()
            .and_then(crate::store::row::parse_id)
            .map(|(ms, _)| ms)
    };
    let Some(info) = tail::info(conn, p).await? else {
        return Ok(None);
    };
    let Some(first_ms) = id_ms(&info.first_id) else {
        return Ok(None);
    };
    if first_ms > end_ms {
        return Ok(None);
    }
    let take = budget.min(s.device_max_fixes).max(1);
    if s.overdue_since(first_ms, now_ms) {
        return Ok(Some((take, info)));
    }
    if info.len < s.chunk_max_fixes as u64 {
        return Ok(None);
    }
    // Long enough: is a chunk's worth of it due? The newest id gives the due share.
    let last_ms = id_ms(&info.last_id).unwrap_or(first_ms);
    let due = if last_ms <= end_ms {
        info.len
    } else {
        let share = (end_ms - first_ms) as f64 / (last_ms - first_ms).max(1) as f64;
        (info.len as f64 * share) as u64
    };
    Ok((due >= s.chunk_max_fixes as u64).then_some((take, info)))
}

/// Seal `p`'s tail entries received before `now_ms − after` (at most `budget`), once
/// they fill a chunk or the oldest has waited `seal_max_wait`.
pub async fn seal_device<C: ConnectionLike + Send>(
    conn: &mut C,
    p: &Pseudonym,
    s: &Compaction,
    now_ms: i64,
    budget: usize,
) -> redis::RedisResult<Sealed> {
    let end_ms = now_ms.saturating_sub(i64::try_from(s.after.as_millis()).unwrap_or(i64::MAX));
    if end_ms < 0 {
        return Ok(Sealed::default());
    }
    let Some((take, info)) = due_entries(conn, p, s, now_ms, end_ms, budget).await? else {
        return Ok(Sealed::default());
    };
    let mut entries = tail::range(conn, p, "-", &end_ms.to_string(), take).await?;
    let more = entries.len() == take;
    if !more && entries.len() > s.chunk_max_fixes && !overdue(&entries, s, now_ms) {
        // Whole chunks now; the rest waits for the next one to fill.
        entries.truncate(entries.len() / s.chunk_max_fixes * s.chunk_max_fixes);
    } else if entries.len() < s.chunk_max_fixes && !overdue(&entries, s, now_ms) {
        return Ok(Sealed::default());
    }
    let mut ids = Vec::with_capacity(entries.len());
    let mut rows = Vec::with_capacity(entries.len());
    for e in &entries {
        // An entry that cannot be read stays in the tail (the sweeper trims it by its
        // receive time); it is counted and logged.
        if let Ok(r) = tail::row_of(e, &s.vault, p, s.future_tolerance_s, "compaction") {
            ids.push(e.0.clone());
            rows.push(r);
        }
    }
    if rows.is_empty() {
        return Ok(Sealed {
            more,
            ..Sealed::default()
        });
    }
    let rows_read = rows.len();
    rows.sort_by_key(Row::order_key);
    let seen_digests = rows.iter().filter_map(Row::resend_digest).collect();
    let groups = group_rows(conn, p, rows, s.chunk_max_fixes).await?;
    let mut swap = Swap {
        tail_ids: ids,
        seen_digests,
        ..Swap::default()
    };
    let mut deduplicated = 0;
    for g in groups {
        let mut merged = g.rows;
        if let Some(c) = g.chunk {
            // A damaged chunk is left alone; the new rows go beside it.
            if let Ok(old) = c.rows(&s.vault, "compaction") {
                merged.extend(old);
                swap.old_chunks.push(c.bytes);
            }
        }
        merged.sort_by_key(Row::order_key);
        deduplicated += hist::dedup_sorted(&mut merged);
        match hist::encode_chunks(&s.vault, p, &merged, s.chunk_max_fixes) {
            Ok(chunks) => swap.new_chunks.extend(chunks),
            // No data key for these rows' month or any later one (the key file was not
            // extended ahead): they stay in the tail, counted and logged, until it is.
            Err(e) => {
                metrics::counter!(m::CHUNK_ERRORS, "kind" => e.label(), "role" => "compaction")
                    .increment(1);
                tracing::error!(error = %e, "cannot seal a chunk; its fixes stay in the live tail");
                return Ok(Sealed::default());
            }
        }
    }
    // Every entry read became a row, and they are the tail's oldest: the seal trims that
    // prefix (`XTRIM MINID`) if none of them was removed since (the script checks), instead
    // of deleting the entries one id at a time (`XDEL`, ~2 µs an entry).
    if rows_read == entries.len() {
        swap.prefix = entries
            .last()
            .and_then(|e| tail::Info::id_after(&e.0))
            // `max-deleted-entry-id`, which the script checks, came with entries-added
            // (Redis 7.0).
            .filter(|_| info.removed.is_some());
    }
    let fixes = swap.tail_ids.len() as u64;
    if !scripts::swap(conn, p, &swap).await? {
        return Ok(Sealed {
            conflict: true,
            more,
            ..Sealed::default()
        });
    }
    Ok(Sealed {
        fixes,
        deduplicated: deduplicated as u64,
        conflict: false,
        more,
    })
}

/// Assign sorted `rows` to the chunks their times fall in, or to the gaps between chunks
/// (joining the chunk before a gap while it has room).
async fn group_rows<C: ConnectionLike + Send>(
    conn: &mut C,
    p: &Pseudonym,
    mut rows: Vec<Row>,
    chunk_max: usize,
) -> redis::RedisResult<Vec<Group>> {
    let mut groups = Vec::new();
    while let Some(first) = rows.first() {
        let t = first.time;
        let (before, next_first) = neighbours(conn, p, t).await?;
        let covering = before
            .as_ref()
            .and_then(|c| c.header.as_ref().ok())
            .filter(|h| h.last >= t)
            .map(|h| h.last);
        let (limit, chunk) = match covering {
            // Inside a chunk's span: merge with it, up to its end.
            Some(last) => (Some(last), before),
            // In the gap after `before`: up to the next chunk; top `before` up if it has
            // room (it then ends before the next chunk still).
            None => {
                let room = before
                    .as_ref()
                    .and_then(|c| c.header.as_ref().ok())
                    .is_some_and(|h| h.count < chunk_max);
                (next_first.map(|n| n - 1), if room { before } else { None })
            }
        };
        let cut = limit.map_or(rows.len(), |l| rows.partition_point(|r| r.time <= l));
        let rest = rows.split_off(cut.max(1));
        // The chunk the previous group merges with, met again from the gap after it:
        // one group (a chunk is replaced once).
        match groups.last_mut() {
            Some(Group {
                chunk: Some(prev),
                rows: prev_rows,
            }) if chunk.as_ref().is_some_and(|c| c.bytes == prev.bytes) => prev_rows.extend(rows),
            _ => groups.push(Group { chunk, rows }),
        }
        rows = rest;
    }
    Ok(groups)
}

/// One compaction pass over every device (every primary of a cluster), within the
/// pass budget. Returns the tail entries sealed.
pub async fn compact_once(conn: &RedisConn, s: &Compaction) -> redis::RedisResult<u64> {
    let now_ms = jiff::Timestamp::now().as_millisecond();
    let mut budget = s.pass_max_fixes;
    let mut sealed = 0u64;
    let mut keyed = conn.clone();
    'targets: for target in conn.scan_targets().await? {
        let mut cursor = 0u64;
        loop {
            let (next, keys) = conn
                .scan_page(&target, cursor, FIXES_PATTERN, s.scan_count, "stream")
                .await?;
            for key in keys {
                let Some(p) = pseudonym_of_key(&key) else {
                    continue;
                };
                loop {
                    if budget == 0 {
                        break 'targets;
                    }
                    let take = usize::try_from(budget).unwrap_or(usize::MAX);
                    let out = seal_device(&mut keyed, &p, s, now_ms, take).await?;
                    sealed += out.fixes;
                    budget = budget.saturating_sub(out.fixes.max(1));
                    metrics::counter!(m::FIXES_SEALED).increment(out.fixes);
                    metrics::counter!(m::FIXES_DEDUPLICATED).increment(out.deduplicated);
                    if out.conflict {
                        metrics::counter!(m::COMPACTION_CONFLICTS).increment(1);
                    }
                    if out.conflict || !out.more || out.fixes == 0 {
                        break;
                    }
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(sealed)
}

/// Seal every tail entry there is now, whatever its age (the bench's steady state, a
/// maintenance run): passes until one seals nothing more. Returns the entries sealed.
pub async fn seal_everything(
    conn: &RedisConn,
    storage: &StorageConfig,
    vault: Arc<Vault>,
) -> redis::RedisResult<u64> {
    let s = Compaction {
        after: Duration::ZERO,
        seal_max_wait: Duration::ZERO,
        ..Compaction::new(storage, vault)
    };
    let mut total = 0;
    loop {
        let n = compact_once(conn, &s).await?;
        total += n;
        if n == 0 {
            return Ok(total);
        }
    }
}

/// Seal every history chunk still in clear (written before payloads were sealed at rest:
/// an upgraded store) under its month's data key, each in one atomic swap; a chunk that
/// changed meanwhile, or cannot be decoded, is left (counted, next run). Once a run finds
/// none, [`CLEAR_CHUNKS_SEALED_KEY`] is set and later runs return at once. Returns the
/// chunks sealed.
pub async fn seal_clear_chunks(conn: &RedisConn, s: &Compaction) -> redis::RedisResult<u64> {
    let mut keyed = conn.clone();
    let done: bool = keyed.exists(CLEAR_CHUNKS_SEALED_KEY).await?;
    if done {
        return Ok(0);
    }
    let mut sealed = 0u64;
    // Chunks that changed meanwhile (tried again next run) and chunks that cannot be
    // decoded (never will be: they do not keep the marker from being set).
    let (mut left, mut damaged) = (0u64, 0u64);
    for target in conn.scan_targets().await? {
        let mut cursor = 0u64;
        loop {
            let (next, keys) = conn
                .scan_page(&target, cursor, HIST_PATTERN, s.scan_count, "zset")
                .await?;
            for key in keys {
                let Some(p) = pseudonym_of_key(&key) else {
                    continue;
                };
                let clear: Vec<StoredChunk> =
                    hist::chunks_by_score(&mut keyed, &p, "-inf", "+inf", 0, usize::MAX)
                        .await?
                        .into_iter()
                        .filter(|c| c.bytes.first() == Some(&crate::store::chunk::VERSION))
                        .collect();
                for c in clear {
                    let Ok(rows) = c.rows(&s.vault, "compaction") else {
                        damaged += 1;
                        continue;
                    };
                    let Ok(new_chunks) =
                        hist::encode_chunks(&s.vault, &p, &rows, crate::store::chunk::MAX_ROWS)
                    else {
                        left += 1;
                        continue;
                    };
                    let swap = Swap {
                        old_chunks: vec![c.bytes],
                        new_chunks,
                        ..Swap::default()
                    };
                    if scripts::swap(&mut keyed, &p, &swap).await? {
                        sealed += 1;
                    } else {
                        left += 1;
                    }
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    if left == 0 {
        let _: () = keyed.set(CLEAR_CHUNKS_SEALED_KEY, 1).await?;
    }
    if sealed > 0 || left > 0 || damaged > 0 {
        tracing::info!(
            sealed,
            left,
            damaged,
            "history chunks written in clear sealed at rest (damaged ones stay as they are)"
        );
    }
    Ok(sealed)
}

/// Compact every `s.interval` until `stop`, when this gateway (`instance`) holds the
/// compaction lease (a pass is idempotent: stopping half-way loses nothing). Each pass
/// first seals chunks left in clear by an older version ([`seal_clear_chunks`]; at once
/// once none is left).
pub async fn run_compactor(
    conn: RedisConn,
    s: Compaction,
    instance: String,
    stop: CancellationToken,
) {
    let s = &s;
    let instance = instance.as_str();
    crate::periodic::every(s.interval, stop, || {
        let mut conn = conn.clone();
        async move {
            let lease = crate::retention::Lease {
                key: COMPACT_LEASE_KEY,
                skipped: m::COMPACTIONS_SKIPPED,
                job: "compaction",
            };
            if !lease.take(&mut conn, instance, s.interval).await {
                return;
            }
            if let Err(e) = seal_clear_chunks(&conn, s).await {
                tracing::warn!(error = %e, "sealing chunks left in clear failed; will retry next interval");
            }
            match compact_once(&conn, s).await {
                Ok(sealed) => {
                    metrics::counter!(m::COMPACTIONS).increment(1);
                    if sealed > 0 {
                        tracing::info!(sealed, "compaction sealed fixes into history");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "compaction pass failed; will retry next interval")
                }
            }
        }
    })
    .await;
}
