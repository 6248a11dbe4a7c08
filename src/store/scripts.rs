//! The data model's Lua scripts (`scripts/*.lua`), loaded one way, each with one typed
//! call. A script's keys all carry the device's `{P}` tag, so it runs on the device's
//! cluster shard.

use std::sync::{Arc, LazyLock};

use redis::aio::ConnectionLike;

use super::keys::{fixes_key, hist_key, late_key, seen_key};
use crate::pseudonym::Pseudonym;

static SEAL: LazyLock<Arc<redis::Script>> =
    LazyLock::new(|| Arc::new(redis::Script::new(include_str!("scripts/seal.lua"))));

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
