//! Reading a device's live tail (`tg:{P}:fixes`): entries in receive order, as rows.

use redis::aio::ConnectionLike;

use super::keys::fixes_key;
use super::row::{Row, RowError};
use super::vault::Vault;
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

/// `entry` (of device `p`) as a row, its payload opened with `vault` if sealed; an entry
/// that cannot be read (damaged, or its data key is gone) is counted
/// (`trackgate_tail_entry_errors_total` by kind and `role`) and logged without
/// identifiers.
pub fn row_of(
    entry: &Entry,
    vault: &Vault,
    p: &Pseudonym,
    future_tolerance_s: i64,
    role: &'static str,
) -> Result<Row, RowError> {
    Row::from_entry(&entry.0, &entry.1, future_tolerance_s, vault, p).inspect_err(|e| {
        metrics::counter!(crate::metrics::TAIL_ENTRY_ERRORS, "kind" => e.label(), "role" => role)
            .increment(1);
        tracing::warn!(error = %e, role, "live-tail entry cannot be read; skipped");
    })
}

/// What `XINFO STREAM` tells of a device's tail, without reading its entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// Entries now in the tail.
    pub len: u64,
    /// The oldest and newest entry ids.
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    /// Entries ever removed from this stream (`entries-added − length`; Redis ≥ 7.0, else
    /// `None`). It only grows while the stream lives, so an unchanged count between a read
    /// and a write means nothing read was removed meanwhile.
    pub removed: Option<u64>,
}

impl Info {
    /// The first id after `id` (`<ms>-<seq + 1>`): `XTRIM MINID` with it removes `id` and
    /// everything before.
    pub fn id_after(id: &str) -> Option<String> {
        let (ms, seq) = super::row::parse_id(id)?;
        Some(format!("{ms}-{}", seq.checked_add(1)?))
    }
}

/// `p`'s tail as `XINFO STREAM` describes it; `None` when there is no tail.
pub async fn info<C: ConnectionLike + Send>(
    conn: &mut C,
    p: &Pseudonym,
) -> redis::RedisResult<Option<Info>> {
    use redis::Value;
    let reply: redis::RedisResult<Value> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(fixes_key(p))
        .query_async(conn)
        .await;
    let reply = match reply {
        Ok(v) => v,
        // The server's answer for a missing key.
        Err(e) if e.to_string().contains("no such key") => return Ok(None),
        Err(e) => return Err(e),
    };
    let pairs: Vec<(Value, Value)> = match reply {
        Value::Array(flat) => {
            let mut it = flat.into_iter();
            std::iter::from_fn(|| Some((it.next()?, it.next()?))).collect()
        }
        Value::Map(m) => m,
        _ => return Ok(None),
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let int = |v: &Value| match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        other => text(other).and_then(|s| s.parse().ok()),
    };
    let entry_id = |v: &Value| match v {
        Value::Array(e) => e.first().and_then(text),
        _ => None,
    };
    let (mut len, mut added, mut first_id, mut last_id) = (None, None, None, None);
    for (k, v) in &pairs {
        match text(k).as_deref() {
            Some("length") => len = int(v),
            Some("entries-added") => added = int(v),
            Some("first-entry") => first_id = entry_id(v),
            Some("last-entry") => last_id = entry_id(v),
            _ => {}
        }
    }
    let Some(len) = len else { return Ok(None) };
    Ok(Some(Info {
        len,
        first_id,
        last_id,
        removed: added.and_then(|a| a.checked_sub(len)),
    }))
}
