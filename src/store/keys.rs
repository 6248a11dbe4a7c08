//! Every Redis key and hash-field name of the data model (DESIGN §5): the only place a
//! `tg:` literal appears.
//!
//! Every key of a device carries its pseudonym as the hash tag `{P}`, so a device's keys
//! land in one Redis Cluster slot and can be written in one pipeline or script.

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

/// `tg:{P}:meta`, owner, retention override, last seen, key version.
pub fn meta_key(p: &Pseudonym) -> String {
    format!("tg:{{{p}}}:meta")
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
