//! The audit trail: an append-only stream `tg:audit` of privacy actions (purge requested
//! and completed, export, ownership change, token issued or revoked). Entries name the
//! actor, the action, the device by pseudonym(s) and the outcome; never a raw IMEI.
//!
//! **Tamper-evident.** Each line carries `ts` (ms), its fields, `prev` (the hash of the
//! line before it) and `h` = hex SHA-256 over a domain tag, `prev` and every field as
//! length-prefixed name and value, in the order of [`FIELDS`]. A line is appended by a
//! script that checks the stream's last `h` is still the `prev` it was hashed with
//! (gateways racing retry), so the chain has no forks. [`verify`] recomputes it and names
//! the first line that does not match (an edited, inserted or removed line).
//!
//! **Bounded.** The sweeper trims lines older than `audit.retention_s` (default 400 days);
//! the chain then starts at the first line kept (its `prev` is the anchor). Archive with
//! `trackgate audit export` before they go.

use redis::aio::ConnectionLike;
use sha2::{Digest, Sha256};

pub use crate::store::keys::AUDIT_KEY;

/// One audit line.
#[derive(Debug, Clone)]
pub struct AuditEvent<'a> {
    /// `customer:<id>` or `admin`.
    pub actor: &'a str,
    /// e.g. `purge.requested`, `purge.completed`, `export`, `device.assign`.
    pub action: &'a str,
    /// Pseudonyms, comma-separated (empty when not about a device).
    pub devices: &'a str,
    /// `ok`, `denied`, `pending`, `failed`.
    pub outcome: &'a str,
    /// Free text without personal data (ids, counts).
    pub detail: &'a str,
}

/// The hashed fields of a line, in hash order.
pub const FIELDS: [&str; 6] = ["ts", "actor", "action", "devices", "outcome", "detail"];

/// Hex SHA-256 of a line: `prev` and its fields (`(name, value)` in [`FIELDS`] order).
pub fn line_hash(prev: &str, fields: &[(&str, &str)]) -> String {
    let mut h = Sha256::new();
    h.update(b"trackgate-audit/1\0");
    for part in std::iter::once(("prev", prev)).chain(fields.iter().copied()) {
        for b in [part.0.as_bytes(), part.1.as_bytes()] {
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        }
    }
    hex::encode(h.finalize())
}

/// How often a gateway hashes a line again because another one's line came first.
const APPEND_ATTEMPTS: usize = 32;

/// Append `event`, chained to the last line. Callers treat a failure as the action's
/// failure: an action that cannot be audited is not carried out silently.
pub async fn append<C: ConnectionLike + Send>(
    conn: &mut C,
    event: &AuditEvent<'_>,
) -> redis::RedisResult<()> {
    for _ in 0..APPEND_ATTEMPTS {
        let raw: Vec<(String, Vec<String>)> = redis::cmd("XREVRANGE")
            .arg(AUDIT_KEY)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(conn)
            .await?;
        let last = lines_of(raw);
        let prev = last
            .first()
            .and_then(|(_, f)| f.iter().find(|(k, _)| k == "h"))
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let ts = jiff::Timestamp::now().as_millisecond().to_string();
        let fields = [
            ("ts", ts.as_str()),
            ("actor", event.actor),
            ("action", event.action),
            ("devices", event.devices),
            ("outcome", event.outcome),
            ("detail", event.detail),
        ];
        let h = line_hash(&prev, &fields);
        if crate::store::scripts::audit_append(conn, &prev, &h, &fields).await? {
            return Ok(());
        }
    }
    Err(redis::RedisError::from((
        redis::ErrorKind::Client,
        "audit stream kept changing; line not appended",
    )))
}

/// One audit line as stored: id and (field, value) pairs.
pub type Line = (String, Vec<(String, String)>);

/// What [`verify`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Lines read.
    pub lines: u64,
    /// Lines before the first chained one (written before the chain existed).
    pub unchained: u64,
    /// The first line whose `prev` or `h` does not match, and why.
    pub first_break: Option<(String, &'static str)>,
}

/// Check the chain over `lines` (in stream order), continuing from `state` (a page at a
/// time): each chained line's `prev` must be the line before it's `h`, and its `h` what
/// its fields hash to. The first chained line's `prev` is taken as given (older lines
/// may have been trimmed by retention).
pub fn verify(lines: &[Line], state: &mut Verified, last_h: &mut Option<String>) {
    for (id, fields) in lines {
        state.lines += 1;
        if state.first_break.is_some() {
            continue;
        }
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let (Some(prev), Some(h)) = (get("prev"), get("h")) else {
            match last_h {
                None => state.unchained += 1,
                Some(_) => {
                    state.first_break =
                        Some((id.clone(), "line without a hash after chained lines"))
                }
            }
            continue;
        };
        if last_h.as_deref().is_some_and(|l| l != prev) {
            state.first_break = Some((id.clone(), "prev is not the hash of the line before"));
            continue;
        }
        let values: Vec<(&str, &str)> = FIELDS
            .iter()
            .map(|k| (*k, get(k).unwrap_or_default()))
            .collect();
        if line_hash(prev, &values) != h {
            state.first_break = Some((id.clone(), "fields do not hash to h"));
            continue;
        }
        *last_h = Some(h.to_string());
    }
}

/// Up to `count` lines after `after` (`-` for the first), in stream order.
pub async fn page<C: ConnectionLike + Send>(
    conn: &mut C,
    after: &str,
    count: usize,
) -> redis::RedisResult<Vec<Line>> {
    let raw: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(AUDIT_KEY)
        .arg(after)
        .arg("+")
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await?;
    Ok(lines_of(raw))
}

/// Stream entries (id, flat field/value list) as lines.
fn lines_of(raw: Vec<(String, Vec<String>)>) -> Vec<Line> {
    raw.into_iter()
        .map(|(id, flat)| {
            let pairs = flat
                .chunks_exact(2)
                .map(|kv| (kv[0].clone(), kv[1].clone()))
                .collect();
            (id, pairs)
        })
        .collect()
}

/// Remove lines older than `retention` (`XTRIM MINID`, exact); returns how many.
pub async fn trim<C: ConnectionLike + Send>(
    conn: &mut C,
    retention: std::time::Duration,
) -> redis::RedisResult<u64> {
    let now = jiff::Timestamp::now().as_millisecond();
    let cutoff = now.saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
    redis::cmd("XTRIM")
        .arg(AUDIT_KEY)
        .arg("MINID")
        .arg(cutoff.max(0))
        .query_async(conn)
        .await
}

/// Append a successful admin action (actor `admin`).
pub async fn admin<C: ConnectionLike + Send>(
    conn: &mut C,
    action: &str,
    devices: &str,
    detail: &str,
) -> redis::RedisResult<()> {
    append(
        conn,
        &AuditEvent {
            actor: "admin",
            action,
            devices,
            outcome: "ok",
            detail,
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(prev: &str, n: u32) -> Line {
        let ts = n.to_string();
        let fields = [
            ("ts", ts.as_str()),
            ("actor", "admin"),
            ("action", "export"),
            ("devices", "p1_x"),
            ("outcome", "ok"),
            ("detail", ""),
        ];
        let h = line_hash(prev, &fields);
        let mut pairs: Vec<(String, String)> = vec![("prev".into(), prev.into()), ("h".into(), h)];
        pairs.extend(fields.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        (format!("{n}-0"), pairs)
    }

    fn chain(n: u32) -> Vec<Line> {
        let mut out: Vec<Line> = Vec::new();
        for i in 0..n {
            let prev = out
                .last()
                .and_then(|(_, f)| f.iter().find(|(k, _)| k == "h"))
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            out.push(line(&prev, i));
        }
        out
    }

    fn check(lines: &[Line]) -> Verified {
        let mut v = Verified::default();
        verify(lines, &mut v, &mut None);
        v
    }

    #[test]
    fn an_intact_chain_verifies_also_after_its_head_was_trimmed() {
        let c = chain(5);
        assert_eq!(check(&c).first_break, None);
        assert_eq!(check(&c[2..]).first_break, None, "trimmed by retention");
        let old: Line = ("0-1".into(), vec![("actor".into(), "admin".into())]);
        let with_old = [vec![old], c.clone()].concat();
        let v = check(&with_old);
        assert_eq!((v.unchained, v.first_break), (1, None));
    }

    #[test]
    fn an_edited_removed_or_inserted_line_is_the_first_break() {
        let c = chain(5);
        let mut edited = c.clone();
        edited[2]
            .1
            .iter_mut()
            .find(|(k, _)| k == "detail")
            .unwrap()
            .1 = "changed".into();
        assert_eq!(
            check(&edited).first_break,
            Some(("2-0".into(), "fields do not hash to h"))
        );
        let removed = [&c[..2], &c[3..]].concat();
        assert_eq!(
            check(&removed).first_break,
            Some(("3-0".into(), "prev is not the hash of the line before"))
        );
        let mut inserted = c.clone();
        inserted.insert(3, ("2-5".into(), vec![("actor".into(), "admin".into())]));
        assert_eq!(
            check(&inserted).first_break,
            Some(("2-5".into(), "line without a hash after chained lines"))
        );
    }
}
