//! Every Redis key and hash-field name of the data model (DESIGN §5): the only place a
//! `tg:` literal appears.
//!
//! Every key of a device carries its pseudonym as the hash tag `{P}`, so a device's keys
//! land in one Redis Cluster slot and can be written in one pipeline or script.

use sha2::{Digest, Sha256};

use crate::pseudonym::Pseudonym;

/// `tg:{P}:fixes`, the device's live tail: one stream entry per recent fix, entry id =
/// receive time (see [`crate::store::fix`]); fixes older than `storage.compact_after_s`
/// move to [`hist_key`].
pub fn fixes_key(p: &Pseudonym) -> String {
    format!("tg:{{{p}}}:fixes")
}

/// `tg:{P}:hist`, the device's sealed history: a sorted set of compressed chunks
/// ([`crate::store::chunk`]), score = the first row's time (s), member = the chunk. Chunks
/// never overlap in time, so score order is time order, and the retention sweep and range
/// reads go by score without an index.
pub fn hist_key(p: &Pseudonym) -> String {
    format!("tg:{{{p}}}:hist")
}

/// `tg:{P}:seen`, the resend digests of the fixes in the live tail (a set of integers):
/// the append script stores a fix whose digest is there no second time; sealing removes
/// the digests of the entries it seals.
pub fn seen_key(p: &Pseudonym) -> String {
    format!("tg:{{{p}}}:seen")
}

/// Pattern matching every history set (for the sweeper's SCAN).
pub const HIST_PATTERN: &str = "tg:{*}:hist";

/// The compactor's lease: one gateway compacts per interval.
pub const COMPACT_LEASE_KEY: &str = "tg:{compact}:lease";
/// Set once a compaction pass found no history chunk in clear (written before payloads
/// were sealed at rest): later gateways skip that scan.
pub const CLEAR_CHUNKS_SEALED_KEY: &str = "tg:{compact}:clear_chunks_sealed";

/// `tg:{P}:meta`, owner, retention override, last seen, key version.
pub fn meta_key(p: &Pseudonym) -> String {
    format!("tg:{{{p}}}:meta")
}

/// `tg:{P}:state`, the device's collection state (`crate::collection`): `paused` or
/// `blocked`; absent = active. No TTL.
pub fn state_key(p: &Pseudonym) -> String {
    format!("tg:{{{p}}}:state")
}

/// `tg:{P}:tomb`, purge cutoffs (issue 5).
pub fn tomb_key(p: &Pseudonym) -> String {
    format!("tg:{{{p}}}:tomb")
}

/// `tg:{P}:late`, index of the fixes delivered late (taken more than a sweep interval
/// before they were received): sorted set, score = fix time (s), member = stream entry
/// id. Trimming goes by receive time (entry ids); these would outlive their fix time's
/// retention by their delay, so the sweeper deletes them by fix time from here.
pub fn late_key(p: &Pseudonym) -> String {
    format!("tg:{{{p}}}:late")
}

/// Pattern matching every fixes stream (for the sweeper's SCAN).
pub const FIXES_PATTERN: &str = "tg:{*}:fixes";

/// Tombstone ([`tomb_key`]) field of a range purge's cutoff: `r:<from_s>:<to_s>` (fix
/// times, inclusive); its value is the cutoff in ms. A complete purge's is field `all`.
pub fn tomb_range_field(from_s: i64, to_s: i64) -> String {
    format!("r:{from_s}:{to_s}")
}

/// `tg:{P}:owner`, the owning customer id, under the device's pseudonym for every key
/// version. No TTL: ownership outlives the location data.
pub fn owner_key(p: &Pseudonym) -> String {
    format!("tg:{{{p}}}:owner")
}

/// `tg:{P}:owner_since`: when the device last changed hands (Unix ms). Its owner sees
/// nothing received or taken before: that is a previous owner's history. Absent for a
/// device that never had another owner (its first owner sees the whole retention). It
/// expires after the longest retention, when everything older is gone anyway.
pub fn owner_since_key(p: &Pseudonym) -> String {
    format!("tg:{{{p}}}:owner_since")
}

/// `tg:customer:<id>`, a customer's record (hash; fields `CUSTOMER_*`).
pub fn customer_key(id: &str) -> String {
    format!("tg:customer:{id}")
}

/// Customer record field: display name (set first: its presence means the customer exists).
pub const CUSTOMER_NAME: &str = "name";
/// Customer record field: IANA time zone of the purge deadline.
pub const CUSTOMER_TZ: &str = "tz";
/// Customer record field: weekend days, comma-separated `mon`…`sun`.
pub const CUSTOMER_WEEKEND: &str = "weekend";
/// Customer record field: holidays, comma-separated dates.
pub const CUSTOMER_HOLIDAYS: &str = "holidays";
/// Customer record field: the agreed retention in seconds, if not the default.
pub const CUSTOMER_RETENTION_S: &str = "retention_s";

/// `tg:customer:<id>:tokens`, hash: token id → SHA-256 of the token secret.
pub fn tokens_key(id: &str) -> String {
    format!("tg:customer:{id}:tokens")
}

/// The audit stream: hash-chained lines of privacy actions, with their own retention.
pub const AUDIT_KEY: &str = "tg:audit";

/// The sweeper's lease (one slot of its own in a cluster).
pub const SWEEP_LEASE_KEY: &str = "tg:{sweep}:lease";

/// `tg:{purge}:<rest>`: the purge bookkeeping, all under the hash tag `{purge}` so that
/// its transactions stay in one cluster slot.
pub fn purge_key(rest: &str) -> String {
    format!("tg:{{purge}}:{rest}")
}

/// Ids of purges not yet completed.
pub const PURGE_PENDING_KEY: &str = "tg:{purge}:pending";
/// Hash: whether purges completed since Redis' files were last rewritten, and when the
/// last rewrite started and ended (`crate::disk`).
pub const PURGE_DISK_KEY: &str = "tg:{purge}:disk";
/// Lease of the gateway that rewrites Redis' files after purges.
pub const PURGE_DISK_LEASE_KEY: &str = "tg:{purge}:disk_lease";
/// Stream of purge events (requested, completed).
pub const PURGE_JOURNAL_KEY: &str = "tg:{purge}:journal";
/// Ids of completed purges whose `purge.completed` audit line may not be written yet
/// (`tg:audit` is another slot, so it cannot share the completing `MULTI`): the worker
/// writes what a crash left out.
pub const PURGE_UNAUDITED_KEY: &str = "tg:{purge}:unaudited";
/// The same for `purge.requested` (journaled with the request). A set of its own: a
/// gateway of the previous version reads [`PURGE_UNAUDITED_KEY`] as completed purges only.
pub const PURGE_UNAUDITED_REQUESTS_KEY: &str = "tg:{purge}:unaudited_requests";

/// `tg:{purge}:<id>`, one purge's record.
pub fn purge_record_key(id: &str) -> String {
    purge_key(id)
}

/// `tg:{purge}:idem:<customer>:<SHA-256 of the key>`: the purge an idempotency key of a
/// customer names (the key itself is not stored).
pub fn purge_idem_key(customer: &str, key: &str) -> String {
    purge_key(&format!(
        "idem:{customer}:{}",
        hex::encode(Sha256::digest(key.as_bytes()))
    ))
}

/// Prefix of the purge bookkeeping before it moved under the `{purge}` hash tag (for
/// Redis Cluster): `tg:purge:pending`, `tg:purge:journal`, `tg:purge:<id>`,
/// `tg:purge:idem:…`.
pub const LEGACY_PURGE_PREFIX: &str = "tg:purge:";

/// The key `redis-benchmark` appends to when the bench measures the server's ceiling:
/// shaped like a device's tail, `__rand_int__` replaced per request.
pub const BENCH_FIXES_KEY: &str = "tg:{bench:__rand_int__}:fixes";

/// One page of a SCAN over every key matching `pattern` of type `kind` (`stream`,
/// `zset`): (next cursor, keys); cursor 0 starts and a returned 0 ends. Single node only:
/// the sweeper scans each cluster primary through
/// [`crate::redis_conn::RedisConn::scan_page`].
pub async fn scan_keys<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    cursor: u64,
    pattern: &str,
    kind: &str,
) -> redis::RedisResult<(u64, Vec<String>)> {
    redis::cmd("SCAN")
        .arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(500)
        .arg("TYPE")
        .arg(kind)
        .query_async(conn)
        .await
}

/// The pseudonym inside a `tg:{P}:…` key.
pub fn pseudonym_of_key(key: &str) -> Option<Pseudonym> {
    let inner = key.strip_prefix("tg:{")?.split_once('}')?.0;
    Pseudonym::parse(inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_hash_tag() {
        let p = Pseudonym::parse("p1_abcdefghijklmnopqrstuvwxyz").unwrap();
        assert_eq!(fixes_key(&p), "tg:{p1_abcdefghijklmnopqrstuvwxyz}:fixes");
        assert_eq!(meta_key(&p), "tg:{p1_abcdefghijklmnopqrstuvwxyz}:meta");
        assert_eq!(pseudonym_of_key(&fixes_key(&p)), Some(p));
        assert_eq!(pseudonym_of_key("tg:{nope}:fixes"), None);
    }
}
