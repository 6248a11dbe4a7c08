//! Reading and writing a device's history chunks (`tg:{P}:hist`): range reads by time,
//! and turning sorted rows into chunks that never overlap in time.

use redis::aio::ConnectionLike;

use super::chunk::{self, ChunkError, Header};
use super::keys::hist_key;
use super::row::Row;
use super::scripts::{self, Swap};
use super::vault::{Month, Purpose, Vault};
use crate::pseudonym::Pseudonym;

/// A chunk as read from Redis: its device, its bytes (the member, also its identity for
/// a swap) and its header (in clear also when the chunk is sealed), or why the header
/// cannot be read.
#[derive(Debug, Clone)]
pub struct StoredChunk {
    pub p: Pseudonym,
    pub bytes: Vec<u8>,
    pub header: Result<Header, ChunkError>,
}

impl StoredChunk {
    pub fn new(p: Pseudonym, bytes: Vec<u8>) -> Self {
        let header = chunk::header(&bytes);
        StoredChunk { p, bytes, header }
    }

    /// The chunk's rows, opened with `vault` if it is sealed; a damaged chunk, or one
    /// whose data key is gone, is counted (`trackgate_chunk_errors_total` by kind) and
    /// logged, without identifiers, by the caller's `role`.
    pub fn rows(&self, vault: &Vault, role: &'static str) -> Result<Vec<Row>, ChunkError> {
        open(vault, &self.p, &self.bytes).inspect_err(|e| {
            metrics::counter!(crate::metrics::CHUNK_ERRORS, "kind" => e.label(), "role" => role)
                .increment(1);
            tracing::warn!(error = %e, role, "history chunk cannot be decoded; skipped");
        })
    }
}

/// The rows of chunk `bytes` of device `p`: a sealed chunk is opened with `vault` and must
/// say inside what its clear header says; a clear (version 1) chunk, written before
/// payloads were sealed, is decoded as it is.
pub fn open(vault: &Vault, p: &Pseudonym, bytes: &[u8]) -> Result<Vec<Row>, ChunkError> {
    if bytes.first() != Some(&chunk::VERSION_SEALED) {
        return chunk::decode(bytes);
    }
    let (h, head, envelope) = chunk::split_sealed(bytes)?;
    let plain = vault.open(Purpose::Chunk, p, head, envelope)?;
    let inner = chunk::header(&plain)?;
    if (inner.flags, inner.count, inner.first, inner.last) != (h.flags, h.count, h.first, h.last) {
        return Err(ChunkError::Header);
    }
    chunk::decode(&plain)
}

/// Seal a version-1 chunk `plain` of device `p` whose rows are data of `month`.
pub fn seal(
    vault: &Vault,
    p: &Pseudonym,
    month: Month,
    plain: &[u8],
) -> Result<Vec<u8>, ChunkError> {
    let mut out = chunk::sealed_header(plain)?;
    let head = out.clone();
    out.reserve(plain.len() + super::vault::OVERHEAD);
    vault.seal_into(Purpose::Chunk, p, &head, month, plain, &mut out)?;
    Ok(out)
}

/// The month (UTC) a row's time falls in: what seals it.
fn month_of(time: i64) -> Month {
    Month::of_unix(time).unwrap_or(Month(0))
}

/// Chunks whose score (first row's time) lies in `[min, max]` (Redis score bounds such as
/// `-inf`, `(123`, `456`), in time order, at most `count` (`usize::MAX`: all) from
/// `offset`.
pub async fn chunks_by_score<C: ConnectionLike + Send>(
    conn: &mut C,
    p: &Pseudonym,
    min: &str,
    max: &str,
    offset: usize,
    count: usize,
) -> redis::RedisResult<Vec<StoredChunk>> {
    chunks_in(conn, p, (min, max), false, offset, count).await
}

/// The last chunk starting at or before `max` (score), if any, and those before it,
/// newest first: at most `count` from `offset`.
pub async fn chunks_before<C: ConnectionLike + Send>(
    conn: &mut C,
    p: &Pseudonym,
    max: i64,
    offset: usize,
    count: usize,
) -> redis::RedisResult<Vec<StoredChunk>> {
    chunks_in(conn, p, (&max.to_string(), "-inf"), true, offset, count).await
}

/// `ZRANGE hist <bounds> BYSCORE [REV] LIMIT offset count`.
async fn chunks_in<C: ConnectionLike + Send>(
    conn: &mut C,
    p: &Pseudonym,
    (from, to): (&str, &str),
    rev: bool,
    offset: usize,
    count: usize,
) -> redis::RedisResult<Vec<StoredChunk>> {
    let mut cmd = redis::cmd("ZRANGE");
    cmd.arg(hist_key(p)).arg(from).arg(to).arg("BYSCORE");
    if rev {
        cmd.arg("REV");
    }
    let members: Vec<Vec<u8>> = cmd
        .arg("LIMIT")
        .arg(offset)
        .arg(i64::try_from(count).unwrap_or(-1))
        .query_async(conn)
        .await?;
    Ok(members
        .into_iter()
        .map(|b| StoredChunk::new(p.clone(), b))
        .collect())
}

/// Drop every row that is the resend of an earlier one (same fix time and content; see
/// [`Row::is_resend_of`]) from `rows`, sorted by [`Row::order_key`]; keeps the first
/// received. Returns how many were dropped.
pub fn dedup_sorted(rows: &mut Vec<Row>) -> usize {
    let before = rows.len();
    let mut kept: Vec<Row> = Vec::with_capacity(rows.len());
    let mut group_start = 0;
    for r in rows.drain(..) {
        if kept.last().is_none_or(|l| l.time != r.time) {
            group_start = kept.len();
        }
        if !kept[group_start..].iter().any(|k| r.is_resend_of(k)) {
            kept.push(r);
        }
    }
    *rows = kept;
    before - rows.len()
}

/// Cut sorted rows of device `p` into chunks of at most `max_rows` rows, only between
/// rows of different times, so chunks never overlap in time (a run of more than
/// [`chunk::MAX_ROWS`] rows of one second, which no tracker sends, is cut anyway), and at
/// every change of month, so each chunk is sealed with its own month's data key. Returns
/// (score, sealed chunk) pairs; `Err` when `vault` has no key for a month of the rows.
pub fn encode_chunks(
    vault: &Vault,
    p: &Pseudonym,
    rows: &[Row],
    max_rows: usize,
) -> Result<Vec<(i64, Vec<u8>)>, ChunkError> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < rows.len() {
        let month = month_of(rows[start].time);
        let month_end = rows[start..]
            .iter()
            .position(|r| month_of(r.time) != month)
            .map_or(rows.len(), |i| start + i);
        let mut end = (start + max_rows).min(month_end);
        // Move the cut back to a change of time, or forward if one time fills the chunk.
        if end < month_end && rows[end].time == rows[end - 1].time {
            let t = rows[end].time;
            let back = rows[start..end].iter().rposition(|r| r.time != t);
            end = match back {
                Some(i) => start + i + 1,
                None => rows[end..month_end]
                    .iter()
                    .position(|r| r.time != t)
                    .map_or(month_end, |i| end + i)
                    .min(start + chunk::MAX_ROWS),
            };
        }
        let part = &rows[start..end];
        out.push((part[0].time, seal(vault, p, month, &chunk::encode(part))?));
        start = end;
    }
    Ok(out)
}

/// What [`drop_rows`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    /// Rows deleted.
    pub rows: u64,
    /// Chunks that changed meanwhile (a seal, another purge): read them again.
    pub conflicts: u64,
    /// Chunks that cannot be decoded and were left as they are.
    pub damaged: u64,
}

/// Delete from `chunks` (of `p`) every row `doomed` says, rewriting a chunk that keeps
/// some rows and removing one that keeps none. A chunk that cannot be decoded goes whole
/// if its header says every row in it is doomed (`whole`), else stays (counted in
/// [`Dropped::damaged`]). Each chunk is one atomic swap, a no-op if the chunk changed
/// meanwhile (counted in [`Dropped::conflicts`]: the caller reads again).
pub async fn drop_rows<C: ConnectionLike + Send>(
    conn: &mut C,
    vault: &Vault,
    p: &Pseudonym,
    chunks: Vec<StoredChunk>,
    role: &'static str,
    doomed: impl Fn(&Row) -> bool,
    whole: impl Fn(&Header) -> bool,
) -> redis::RedisResult<Dropped> {
    let mut out = Dropped::default();
    for c in chunks {
        let (new_chunks, n) = match (c.rows(vault, role), &c.header) {
            (Ok(rows), _) => {
                let before = rows.len();
                let kept: Vec<Row> = rows.into_iter().filter(|r| !doomed(r)).collect();
                if kept.len() == before {
                    continue;
                }
                // The survivors were sealed before: a key for their month is held.
                let Ok(new) = encode_chunks(vault, p, &kept, chunk::MAX_ROWS) else {
                    out.damaged += 1;
                    continue;
                };
                (new, before - kept.len())
            }
            (Err(_), Ok(h)) if whole(h) => (Vec::new(), h.count),
            (Err(_), _) => {
                out.damaged += 1;
                continue;
            }
        };
        let swap = Swap {
            old_chunks: vec![c.bytes],
            new_chunks,
            ..Swap::default()
        };
        if scripts::swap(conn, p, &swap).await? {
            out.rows += n as u64;
        } else {
            out.conflicts += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::row::VALUES;

    fn row(time: i64, recv_ms: i64, v: i64) -> Row {
        Row {
            recv_ms,
            seq: 0,
            time,
            fix_time_s: Some(time),
            kind: 0,
            values: [Some(v); VALUES],
            extras: None,
        }
    }

    fn ring() -> crate::pseudonym::KeyRing {
        crate::pseudonym::KeyRing::ephemeral()
    }

    fn device(s: &str) -> Pseudonym {
        Pseudonym::parse(&format!("p1_{}", s.repeat(26))).unwrap_or_else(|| unreachable!())
    }

    #[test]
    fn chunks_are_cut_between_times_only() -> Result<(), ChunkError> {
        let (ring, p) = (ring(), device("a"));
        let rows: Vec<Row> = [1, 2, 2, 2, 3, 4]
            .iter()
            .enumerate()
            .map(|(i, &t)| row(t, i as i64, i as i64))
            .collect();
        let chunks = encode_chunks(ring.vault(), &p, &rows, 2)?;
        let spans: Vec<(i64, i64)> = chunks
            .iter()
            .map(|(_, b)| chunk::header(b).map(|h| (h.first, h.last)))
            .collect::<Result<_, _>>()?;
        assert_eq!(spans, [(1, 1), (2, 2), (3, 4)]);
        let back: Vec<Row> = chunks
            .iter()
            .map(|(_, b)| open(ring.vault(), &p, b))
            .collect::<Result<Vec<_>, _>>()?
            .concat();
        assert_eq!(back, rows);
        Ok(())
    }

    #[test]
    fn chunks_are_cut_at_months_and_sealed_with_their_months_key() -> Result<(), ChunkError> {
        let (ring, p) = (ring(), device("a"));
        let this = Month::now();
        let t = this.next().start_unix();
        let rows: Vec<Row> = [t - 2, t - 1, t, t + 1]
            .iter()
            .enumerate()
            .map(|(i, &t)| row(t, i as i64, i as i64))
            .collect();
        let chunks = encode_chunks(ring.vault(), &p, &rows, 100)?;
        let months: Vec<Option<Month>> = chunks
            .iter()
            .map(|(_, b)| {
                chunk::split_sealed(b)
                    .ok()
                    .and_then(|(_, _, e)| Vault::month_of(e))
            })
            .collect();
        assert_eq!(months, [Some(this), Some(this.next())]);
        Ok(())
    }

    #[test]
    fn losing_a_month_key_loses_that_month_only() -> Result<(), ChunkError> {
        let this = Month::now();
        let last = Month(this.0 - 1);
        let secrets = [[7u8; 32], [9u8; 32]];
        let both = Vault::new([(last, 1, &secrets[0][..]), (this, 1, &secrets[1][..])])
            .map_err(|_| ChunkError::Header)?;
        let p = device("a");
        let t = this.start_unix();
        let rows: Vec<Row> = [t - 120, t - 60, t, t + 60]
            .iter()
            .enumerate()
            .map(|(i, &t)| row(t, i as i64, i as i64))
            .collect();
        let chunks = encode_chunks(&both, &p, &rows, 100)?;
        assert_eq!(chunks.len(), 2, "one chunk a month");
        let without_last =
            Vault::new([(this, 1, &secrets[1][..])]).map_err(|_| ChunkError::Header)?;
        let read: Vec<Result<usize, ChunkError>> = chunks
            .iter()
            .map(|(_, b)| open(&without_last, &p, b).map(|r| r.len()))
            .collect();
        assert!(
            matches!(read[0], Err(ChunkError::Sealed(_))),
            "last month is gone"
        );
        assert_eq!(read[1], Ok(2), "this month reads");
        Ok(())
    }

    #[test]
    fn a_sealed_chunk_holds_no_clear_value_and_opens_only_for_its_device_and_header()
    -> Result<(), ChunkError> {
        let (ring, p) = (ring(), device("a"));
        let rows = vec![row(100, 1, 51_500_123), row(101, 2, 51_500_456)];
        let plain = chunk::encode(&rows);
        let (_, sealed) = encode_chunks(ring.vault(), &p, &rows, 100)?.remove(0);
        assert_eq!(chunk::header(&sealed)?.count, 2, "the header is in clear");
        let body = &plain[chunk::sealed_header(&plain)?.len()..];
        assert!(
            !sealed
                .windows(body.len().min(8))
                .any(|w| body.starts_with(w))
        );
        assert!(
            matches!(
                open(ring.vault(), &device("b"), &sealed),
                Err(ChunkError::Sealed(super::super::vault::VaultError::Forged))
            ),
            "moved to another device"
        );
        // A header edited in clear (here: the count) no longer matches the envelope.
        let mut edited = sealed.clone();
        edited[2] = 1;
        assert!(open(ring.vault(), &p, &edited).is_err());
        assert!(
            matches!(
                open(crate::pseudonym::KeyRing::ephemeral().vault(), &p, &sealed),
                Err(ChunkError::Sealed(_))
            ),
            "another key file's keys"
        );
        Ok(())
    }

    #[test]
    fn a_resent_fix_is_kept_once() {
        let mut rows = vec![row(1, 10, 5), row(1, 20, 6), row(1, 30, 5), row(2, 40, 5)];
        assert_eq!(dedup_sorted(&mut rows), 1);
        let recvs: Vec<i64> = rows.iter().map(|r| r.recv_ms).collect();
        assert_eq!(recvs, [10, 20, 40], "the first received copy stays");
    }
}
