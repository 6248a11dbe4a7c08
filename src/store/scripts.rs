//! The data model's Lua scripts (`scripts/*.lua`), loaded one way, each with one typed
//! call. A device's script keys all carry the device's `{P}` tag, so it runs on the
//! device's cluster shard.
//!
//! Every call goes out as `EVALSHA` and falls back to loading the script on `NOSCRIPT`
//! (redis-rs' `invoke_async`), except the append script: the writer pipelines many of its
//! calls per node, so [`append`] only adds an `EVALSHA` to a pipeline, and the writer
//! loads the script ([`load_append`]) up front and again after a `NOSCRIPT`.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{FromRedisValue, ParsingError, Value};

use super::fix::{FieldValue, StoredFix};
use super::keys::{
    fixes_key, hist_key, late_key, meta_key, owner_key, owner_since_key, seen_key, tomb_key,
    tomb_range_field,
};
use crate::pseudonym::Pseudonym;

/// One script of `scripts/`, hashed once.
type Lua = LazyLock<Arc<redis::Script>>;

macro_rules! lua {
    ($file:literal) => {
        LazyLock::new(|| Arc::new(redis::Script::new(include_str!($file))))
    };
}

static SEAL: Lua = lua!("scripts/seal.lua");
static APPEND: Lua = lua!("scripts/append.lua");
static PURGE_ALL: Lua = lua!("scripts/purge_all.lua");
static PURGE_RANGE_MARK: Lua = lua!("scripts/purge_range_mark.lua");
static PURGE_RANGE_CHUNK: Lua = lua!("scripts/purge_range_chunk.lua");
static SWEEP_STREAM: Lua = lua!("scripts/sweep_stream.lua");
static ASSIGN: Lua = lua!("scripts/assign.lua");
static UNASSIGN: Lua = lua!("scripts/unassign.lua");
static DROP_EMPTY_STREAM: Lua = lua!("scripts/drop_empty_stream.lua");
static AUDIT_APPEND: Lua = lua!("scripts/audit_append.lua");
static LEASE_RELEASE: Lua = lua!("scripts/lease_release.lua");
static COLLECTION_SET: Lua = lua!("scripts/collection_set.lua");

/// Set `p`'s collection state to `state` (`active`, `paused`, `blocked`); unless
/// `override_block`, a blocked device stays blocked (false). See
/// `scripts/collection_set.lua`.
pub async fn collection_set<C: ConnectionLike + Send>(
    conn: &mut C,
    p: &Pseudonym,
    state: &str,
    override_block: bool,
) -> redis::RedisResult<bool> {
    let n: i64 = COLLECTION_SET
        .key(super::keys::state_key(p))
        .arg(state)
        .arg(if override_block { "1" } else { "0" })
        .invoke_async(conn)
        .await?;
    Ok(n == 1)
}
static DISK_DONE: Lua = lua!("scripts/disk_done.lua");

/// Give up lease `key` if `holder` still holds it (see `scripts/lease_release.lua`).
pub async fn lease_release<C: ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
    holder: &str,
) -> redis::RedisResult<bool> {
    let n: i64 = LEASE_RELEASE
        .key(key)
        .arg(holder)
        .invoke_async(conn)
        .await?;
    Ok(n == 1)
}

/// Record that the rewrite of Redis' files started at `epoch` ended at `end_ms`, unless a
/// later one is recorded (see `scripts/disk_done.lua`).
pub async fn disk_done<C: ConnectionLike + Send>(
    conn: &mut C,
    epoch: i64,
    end_ms: i64,
) -> redis::RedisResult<bool> {
    let n: i64 = DISK_DONE
        .key(super::keys::PURGE_DISK_KEY)
        .arg(epoch)
        .arg(end_ms)
        .invoke_async(conn)
        .await?;
    Ok(n == 1)
}

/// Append an audit line with hash `h` chained to `prev` (see `scripts/audit_append.lua`)
/// if the stream's last line still has hash `prev`; false when another line came first.
pub async fn audit_append<C: ConnectionLike + Send>(
    conn: &mut C,
    prev: &str,
    h: &str,
    fields: &[(&str, &str)],
) -> redis::RedisResult<bool> {
    let mut call = AUDIT_APPEND.key(super::keys::AUDIT_KEY);
    call.arg(prev).arg(h);
    for (k, v) in fields {
        call.arg(*k).arg(*v);
    }
    let applied: i64 = call.invoke_async(conn).await?;
    Ok(applied == 1)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// One atomic change of a device's stored rows (see `scripts/seal.lua`).
#[derive(Debug, Default)]
pub struct Swap {
    /// Tail entries (ids, ascending) whose rows the new chunks hold.
    pub tail_ids: Vec<String>,
    /// Their resend digests, which the tail no longer needs to recognise.
    pub seen_digests: Vec<i64>,
    /// History chunks the new chunks replace, as read.
    pub old_chunks: Vec<Vec<u8>>,
    /// New chunks: (score = first row's time, chunk).
    pub new_chunks: Vec<(i64, Vec<u8>)>,
    /// When `tail_ids` are the tail's oldest entries, all of them: the id after the last
    /// of them. The script then checks that the first id is still first and that no
    /// entry at or after it was ever removed, and trims the prefix, instead of checking
    /// and deleting every id (Redis ≥ 7.0).
    pub prefix: Option<String>,
}

/// Apply `swap` to `p`'s tail and history if everything it removes is still there; false
/// on a conflict (nothing changed: read again).
pub async fn swap<C: ConnectionLike + Send>(
    conn: &mut C,
    p: &Pseudonym,
    swap: &Swap,
) -> redis::RedisResult<bool> {
    let mut call = SEAL.key(fixes_key(p));
    call.key(hist_key(p)).key(late_key(p)).key(seen_key(p));
    match &swap.prefix {
        Some(after) => call.arg("1").arg(after.as_str()),
        None => call.arg("").arg(""),
    };
    call.arg(swap.tail_ids.len()).arg(&swap.tail_ids);
    call.arg(swap.seen_digests.len());
    call.arg(&swap.seen_digests);
    call.arg(swap.old_chunks.len());
    for c in &swap.old_chunks {
        call.arg(c.as_slice());
    }
    for (score, c) in &swap.new_chunks {
        call.arg(*score).arg(c.as_slice());
    }
    let applied: i64 = call.invoke_async(conn).await?;
    Ok(applied == 1)
}

/// What one append call carries besides its frames (see `scripts/append.lua`).
#[derive(Debug, Clone, Copy)]
pub struct AppendBatch<'a> {
    /// Given at the first send and kept for every retry: the script recognises a replay
    /// by it (the device's last applied batch id).
    pub batch_id: &'a str,
    /// The writer's clock (Unix ms): last seen, trim cutoff and expiry go by it.
    pub now_ms: i64,
    /// Trim and expiry at most this often per device.
    pub upkeep: Duration,
    /// A fix taken more than this before it was received goes into the late index.
    pub late_after: Duration,
}

/// One frame's fixes in an append call.
#[derive(Debug, Clone, Copy)]
pub struct AppendFrame<'a> {
    /// When the gateway read the frame (Unix ms): purge cutoffs compare against it.
    pub received_ms: i64,
    /// The device's retention (the call trims and expires by the longest of its frames).
    pub ttl: Duration,
    pub fixes: &'a [StoredFix],
}

/// What an append call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// The call was applied.
    Written {
        /// Entries written.
        written: u64,
        /// Entries a purge's tombstone refused (in flight at the purge, or taken before a
        /// complete purge's cutoff): confirmed to the device, stored nowhere.
        purged: u64,
        /// Fixes the tail already held (a resend after a lost ACK): not written again.
        resent: u64,
    },
    /// The batch id was the device's last one: a replay, nothing written.
    Replay,
}

impl Appended {
    /// Fixes this call added to the tail.
    pub fn written(self) -> u64 {
        match self {
            Appended::Written { written, .. } => written,
            Appended::Replay => 0,
        }
    }
}

impl FromRedisValue for Appended {
    fn from_redis_value(v: Value) -> Result<Self, ParsingError> {
        if let Value::Int(-1) = v {
            return Ok(Appended::Replay);
        }
        let (written, purged, resent) = <(u64, u64, u64)>::from_redis_value(v)?;
        Ok(Appended::Written {
            written,
            purged,
            resent,
        })
    }
}

/// Add `p`'s append call over `frames` (all of that device's, in order) to `pipe`, as an
/// `EVALSHA`: the script must be loaded ([`load_append`]), or the call fails with
/// `NOSCRIPT`. Its reply reads as [`Appended`].
pub fn append<'a, F>(pipe: &mut redis::Pipeline, p: &Pseudonym, batch: &AppendBatch<'_>, frames: F)
where
    F: IntoIterator<Item = AppendFrame<'a>> + Clone,
{
    let ttl_ms = frames
        .clone()
        .into_iter()
        .map(|j| i64::try_from(j.ttl.as_millis()).unwrap_or(i64::MAX))
        .max()
        .unwrap_or(0);
    // Sized up front: the command is built arg by arg, and growing its buffers as it goes
    // was a visible share of the gateway's profile (realloc + memmove).
    let (mut args, mut bytes) = (14, 200 + batch.batch_id.len());
    for job in frames.clone() {
        args += 3;
        for fix in job.fixes {
            args += 2 + fix.arg_count();
            bytes += 56
                + fix
                    .fields
                    .iter()
                    .map(|(_, v)| 24 + v.len_hint())
                    .sum::<usize>();
        }
    }
    let late_after_ms = millis(batch.late_after);
    let mut cmd = redis::Cmd::with_capacity(args, bytes);
    cmd.arg("EVALSHA")
        .arg(APPEND.get_hash())
        .arg(5)
        .arg(fixes_key(p))
        .arg(meta_key(p))
        .arg(tomb_key(p))
        .arg(late_key(p))
        .arg(seen_key(p))
        .arg(batch.batch_id)
        .arg(ttl_ms)
        .arg(batch.now_ms.saturating_sub(ttl_ms))
        .arg(batch.now_ms)
        .arg(p.key_version())
        .arg(millis(batch.upkeep))
        .arg(late_after_ms);
    for job in frames {
        let words: usize = job.fixes.iter().map(|f| 2 + f.arg_count()).sum();
        // The script's own test, per fix: fix time (ms) < received - late-after.
        let late_before_ms = job.received_ms.saturating_sub(late_after_ms);
        let late = job.fixes.iter().any(|f| {
            f.fix_time_s
                .is_some_and(|t| t.saturating_mul(1000) < late_before_ms)
        });
        cmd.arg(job.received_ms).arg(u8::from(late)).arg(words);
        for fix in job.fixes {
            cmd.arg(fix.arg_count());
            match fix.resend_digest() {
                Some(d) => cmd.arg(d),
                None => cmd.arg(""),
            };
            for (name, value) in &fix.fields {
                cmd.arg(*name);
                match value {
                    FieldValue::Int(i) => cmd.arg(*i),
                    FieldValue::Text(t) => cmd.arg(t.as_str()),
                    FieldValue::Bytes(b) => cmd.arg(b.as_slice()),
                };
            }
        }
    }
    pipe.add_command(cmd);
}

/// `SCRIPT LOAD` the append script (on a cluster, on every primary), so that the calls
/// [`append`] adds find it.
pub async fn load_append<C: ConnectionLike>(conn: &mut C) -> redis::RedisResult<()> {
    APPEND.prepare_invoke().load_async(conn).await.map(|_| ())
}

/// Complete purge of `p` (see `scripts/purge_all.lua`): tail, history, metadata, late
/// index and resend digests go; the tombstone's `all` cutoff rises to `cutoff_ms` (never
/// falls), every fix taken at or before `taken_until_ms` is refused whenever it arrives
/// (the device's cache), and the tombstone lives at least `tomb_ttl`. Returns the fixes
/// deleted.
pub async fn purge_all<C: ConnectionLike + Send>(
    conn: &mut C,
    p: &Pseudonym,
    cutoff_ms: i64,
    taken_until_ms: i64,
    tomb_ttl: Duration,
) -> redis::RedisResult<u64> {
    /// A receive cutoff past any write (Lua numbers are doubles: exact below 2^53).
    const NEVER_MS: i64 = (1 << 53) - 1;
    PURGE_ALL
        .key(fixes_key(p))
        .key(meta_key(p))
        .key(tomb_key(p))
        .key(late_key(p))
        .key(hist_key(p))
        .key(seen_key(p))
        .arg(cutoff_ms)
        .arg(tomb_ttl.as_millis() as u64)
        .arg(taken_until_ms.div_euclid(1000).max(0))
        .arg(NEVER_MS)
        .invoke_async::<u64>(conn)
        .await
}

/// Record the cutoff of a range purge of `p` over fix times `from_s..=to_s` in its
/// tombstone (see `scripts/purge_range_mark.lua`): it only ever rises; the tombstone
/// lives at least `tomb_ttl`.
pub async fn purge_range_mark<C: ConnectionLike + Send>(
    conn: &mut C,
    p: &Pseudonym,
    (from_s, to_s): (i64, i64),
    cutoff_ms: i64,
    tomb_ttl: Duration,
) -> redis::RedisResult<()> {
    let _: i64 = PURGE_RANGE_MARK
        .key(tomb_key(p))
        .arg(tomb_range_field(from_s, to_s))
        .arg(cutoff_ms)
        .arg(tomb_ttl.as_millis() as u64)
        .invoke_async(conn)
        .await?;
    Ok(())
}

/// One step of a range purge over a device's tail (see `scripts/purge_range_chunk.lua`).
#[derive(Debug, Clone, Copy)]
pub struct RangeStep<'a> {
    /// Where the step starts: an XRANGE bound, `<id>` inclusive or `(<id>` exclusive.
    pub start: &'a str,
    /// Where the purge's scan ends: an XRANGE bound.
    pub end: &'a str,
    /// At most this many entries examined.
    pub count: usize,
    /// The purge's fix-time range (s, inclusive).
    pub from_s: i64,
    pub to_s: i64,
}

/// What one range purge step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeStepDone {
    /// The last entry examined: the next step starts after it. `None`: nothing left.
    pub last: Option<String>,
    /// Entries deleted (fix time in the range).
    pub deleted: u64,
}

/// Delete the entries of `p`'s tail whose fix time is in the range, among those `step`
/// examines.
pub async fn purge_range_step<C: ConnectionLike + Send>(
    conn: &mut C,
    p: &Pseudonym,
    step: &RangeStep<'_>,
) -> redis::RedisResult<RangeStepDone> {
    let (last, deleted): (String, u64) = PURGE_RANGE_CHUNK
        .key(fixes_key(p))
        .arg(step.start)
        .arg(step.count)
        .arg(step.from_s)
        .arg(step.to_s)
        .arg(step.end)
        .invoke_async(conn)
        .await?;
    Ok(RangeStepDone {
        last: (!last.is_empty()).then_some(last),
        deleted,
    })
}

/// One step of the retention sweep over a device's tail (see `scripts/sweep_stream.lua`).
#[derive(Debug, Clone, Copy)]
pub struct SweepStep<'a> {
    /// The tail stream as the sweep found it (`tg:{P}:fixes` of the device).
    pub tail: &'a str,
    /// Entries received before this (ms; entry ids) go.
    pub min_id_ms: i64,
    /// Late-delivered entries taken before this (s, exclusive) go.
    pub fix_cutoff_s: i64,
    /// At most this many late index members per step.
    pub late_chunk: u64,
}

/// What one sweep step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Tail entries removed (trimmed by receive time, or late and past their fix time).
    pub removed: u64,
    /// Late index members taken: the step's `late_chunk` means more may be left.
    pub late_taken: u64,
}

/// Trim `p`'s tail by receive time, then delete up to a chunk of its late deliveries by
/// fix time.
pub async fn sweep_stream<C: ConnectionLike + Send>(
    conn: &mut C,
    p: &Pseudonym,
    step: &SweepStep<'_>,
) -> redis::RedisResult<Swept> {
    let (removed, late_taken): (u64, u64) = SWEEP_STREAM
        .key(step.tail)
        .key(late_key(p))
        .arg(step.min_id_ms)
        .arg(step.fix_cutoff_s)
        .arg(step.late_chunk)
        .invoke_async(conn)
        .await?;
    Ok(Swept {
        removed,
        late_taken,
    })
}

/// How a change of owner marks the device's history (see `scripts/assign.lua`).
#[derive(Debug, Clone, Copy)]
pub struct OwnerChange {
    /// When (Unix ms): the new `owner_since`, if it moves.
    pub now_ms: i64,
    /// How long an `owner_since` mark matters (the longest retention).
    pub since_ttl_ms: u64,
}

/// Make `customer` the owner of `p`; a change from another owner (or after an
/// unassignment) moves `owner_since` to now. Assigning the same owner again changes
/// nothing.
pub async fn assign_owner<C: ConnectionLike + Send>(
    conn: &mut C,
    p: &Pseudonym,
    customer: &str,
    change: OwnerChange,
) -> redis::RedisResult<()> {
    let _: i64 = ASSIGN
        .key(owner_key(p))
        .key(owner_since_key(p))
        .arg(customer)
        .arg(change.now_ms)
        .arg(change.since_ttl_ms)
        .invoke_async(conn)
        .await?;
    Ok(())
}

/// Remove `p`'s owner, if any, moving `owner_since` to now for whoever comes next (see
/// `scripts/unassign.lua`).
pub async fn unassign_owner<C: ConnectionLike + Send>(
    conn: &mut C,
    p: &Pseudonym,
    change: OwnerChange,
) -> redis::RedisResult<()> {
    let _: i64 = UNASSIGN
        .key(owner_key(p))
        .key(owner_since_key(p))
        .arg(change.now_ms)
        .arg(change.since_ttl_ms)
        .invoke_async(conn)
        .await?;
    Ok(())
}

/// Delete the stream `key` if it is empty, atomically (an entry appended meanwhile keeps
/// it); see `scripts/drop_empty_stream.lua`. True if it was deleted.
pub async fn drop_empty_stream<C: ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
) -> redis::RedisResult<bool> {
    let deleted: i64 = DROP_EMPTY_STREAM.key(key).invoke_async(conn).await?;
    Ok(deleted == 1)
}
