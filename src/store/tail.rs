//! Reading a device's live tail (`tg:{P}:fixes`): entries in receive order, as rows.

use redis::aio::ConnectionLike;

use super::keys::fixes_key;
use super::row::{Row, RowError};
use crate::pseudonym::Pseudonym;

/// A tail entry as stored: id and (field, value) pairs.
pub type Entry = (String, Vec<(String, Vec<u8>)>);

/// Up to `count` tail entries of `p` from `start` to `end` (XRANGE bounds: `-`, `+`,
/// `<ms>`, `<id>`, `(<id>`).
pub async fn range<C: ConnectionLike + Send>(
    conn: &mut C,
    p: &Pseudonym,
    start: &str,
    end: &str,
    count: usize,
) -> redis::RedisResult<Vec<Entry>> {
    // Read as plain arrays: the streams reply type builds a map per entry, which cost
    // more than the rest of sealing.
    let reply: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
        .arg(fixes_key(p))
        .arg(start)
        .arg(end)
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await?;
    Ok(reply
        .into_iter()
        .map(|(id, flat)| {
            let mut fields = Vec::with_capacity(flat.len() / 2);
            let mut it = flat.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                fields.push((String::from_utf8_lossy(&k).into_owned(), v));
            }
            (id, fields)
        })
        .collect())
}

/// `entry` as a row; an entry that cannot be read is counted
/// (`trackgate_tail_entry_errors_total` by kind and `role`) and logged without
/// identifiers.
pub fn row_of(entry: &Entry, future_tolerance_s: i64, role: &'static str) -> Result<Row, RowError> {
    Row::from_entry(&entry.0, &entry.1, future_tolerance_s).inspect_err(|e| {
        metrics::counter!(crate::metrics::TAIL_ENTRY_ERRORS, "kind" => e.label(), "role" => role)
            .increment(1);
        tracing::warn!(error = %e, role, "live-tail entry cannot be read; skipped");
    })
}
