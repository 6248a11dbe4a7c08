//! Reading and writing a device's history chunks (`tg:{P}:hist`): range reads by time,
//! and turning sorted rows into chunks that never overlap in time.

use redis::aio::ConnectionLike;

use super::chunk::{self, ChunkError, Header};
use super::keys::hist_key;
use super::row::Row;
use super::scripts::{self, Swap};
use crate::pseudonym::Pseudonym;

/// A chunk as read from Redis: its bytes (the member, also its identity for a swap) and
/// its header, or why the header cannot be read.
#[derive(Debug, Clone)]
pub struct StoredChunk {
    pub bytes: Vec<u8>,
    pub header: Result<Header, ChunkError>,
}

impl StoredChunk {
    fn new(bytes: Vec<u8>) -> Self {
        let header = chunk::header(&bytes);
        StoredChunk { bytes, header }
    }

    /// The chunk's rows; a damaged chunk is counted (`trackgate_chunk_errors_total` by
    /// kind) and logged, without identifiers, by the caller's `role`.
    pub fn rows(&self, role: &'static str) -> Result<Vec<Row>, ChunkError> {
        chunk::decode(&self.bytes).inspect_err(|e| {
            metrics::counter!(crate::metrics::CHUNK_ERRORS, "kind" => e.label(), "role" => role)
                .increment(1);
            tracing::warn!(error = %e, role, "history chunk cannot be decoded; skipped");
        })
    }
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
    Ok(members.into_iter().map(StoredChunk::new).collect())
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

/// Cut sorted rows into chunks of at most `max_rows` rows, only between rows of different
/// times, so chunks never overlap in time (a run of more than [`chunk::MAX_ROWS`] rows of
/// one second, which no tracker sends, is cut anyway). Returns (score, chunk) pairs.
pub fn encode_chunks(rows: &[Row], max_rows: usize) -> Vec<(i64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < rows.len() {
        let mut end = (start + max_rows).min(rows.len());
        // Move the cut back to a change of time, or forward if one time fills the chunk.
        if end < rows.len() && rows[end].time == rows[end - 1].time {
            let t = rows[end].time;
            let back = rows[start..end].iter().rposition(|r| r.time != t);
            end = match back {
                Some(i) => start + i + 1,
                None => rows[end..]
                    .iter()
                    .position(|r| r.time != t)
                    .map_or(rows.len(), |i| end + i)
                    .min(start + chunk::MAX_ROWS),
            };
        }
        let part = &rows[start..end];
        out.push((part[0].time, chunk::encode(part)));
        start = end;
    }
    out
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
    p: &Pseudonym,
    chunks: Vec<StoredChunk>,
    role: &'static str,
    doomed: impl Fn(&Row) -> bool,
    whole: impl Fn(&Header) -> bool,
) -> redis::RedisResult<Dropped> {
    let mut out = Dropped::default();
    for c in chunks {
        let (new_chunks, n) = match (c.rows(role), &c.header) {
            (Ok(rows), _) => {
                let before = rows.len();
                let kept: Vec<Row> = rows.into_iter().filter(|r| !doomed(r)).collect();
                if kept.len() == before {
                    continue;
                }
                (encode_chunks(&kept, chunk::MAX_ROWS), before - kept.len())
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

    #[test]
    fn chunks_are_cut_between_times_only() -> Result<(), ChunkError> {
        let rows: Vec<Row> = [1, 2, 2, 2, 3, 4]
            .iter()
            .enumerate()
            .map(|(i, &t)| row(t, i as i64, i as i64))
            .collect();
        let chunks = encode_chunks(&rows, 2);
        let spans: Vec<(i64, i64)> = chunks
            .iter()
            .map(|(_, b)| chunk::header(b).map(|h| (h.first, h.last)))
            .collect::<Result<_, _>>()?;
        assert_eq!(spans, [(1, 1), (2, 2), (3, 4)]);
        let back: Vec<Row> = chunks
            .iter()
            .map(|(_, b)| chunk::decode(b))
            .collect::<Result<Vec<_>, _>>()?
            .concat();
        assert_eq!(back, rows);
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
