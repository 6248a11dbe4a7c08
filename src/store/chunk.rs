//! The history chunk codec: a run of [`Row`]s, sorted by time, compressed losslessly into
//! one byte string (a member of `tg:{P}:hist`).
//!
//! Layout (version 1), all integers LEB128 varints, signed ones zigzag-coded:
//!
//! ```text
//! header   version u8 · flags u8 · count · first time (signed) · last − first
//! columns  time · recv_ms · seq · fix_time − time · kind · 30 packed values · extras
//! ```
//!
//! Each integer column starts with a byte: presence (bits 0–1: none, all, or a bitmap of
//! `count` bits follows) and transform (bits 2–3: the value itself, the difference to the
//! previous present value, or the difference of those differences; the encoder keeps the
//! smallest). The transformed values follow as tokens: an odd token is one non-zero value
//! (`(zigzag − 1) << 1 | 1`), an even token a run of `(token >> 1) + 1` zeros. A tracker's
//! values mostly repeat or change steadily, so most columns cost a byte or two per chunk
//! and a moving position about two bytes per coordinate and fix. Extras: presence byte,
//! then per present row `0` (same as the previous present row) or `len + 1` and the bytes.
//!
//! Arithmetic wraps, so every i64 round-trips. The decoder checks every length against
//! the input, the row count against [`MAX_ROWS`], and that the header matches the rows: a
//! damaged chunk is a [`ChunkError`], never a panic.

use super::row::{Row, VALUES};

/// Codec version written by [`encode`].
pub const VERSION: u8 = 1;

/// A sealed chunk (what Redis holds since payloads are encrypted at rest): the same
/// header with this version byte, in clear, then an envelope
/// ([`super::vault`]) holding the whole version-1 chunk. [`header`] reads it; the rows
/// need the data key ([`super::hist::StoredChunk::rows`]).
pub const VERSION_SEALED: u8 = 2;

/// Most rows a chunk may hold (the decoder refuses more: bounded memory per chunk).
pub const MAX_ROWS: usize = 16_384;

/// Header flag: some row's fix time differs from its time (a device clock far ahead, see
/// [`super::row::effective_time`]): ranges over fix time must look inside this chunk even
/// when its time span does not reach them.
pub const FLAG_DISPLACED: u8 = 1;

/// What a chunk says of itself, readable without decoding the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u8,
    pub flags: u8,
    pub count: usize,
    /// Time (s) of the first and last row.
    pub first: i64,
    pub last: i64,
}

impl Header {
    /// Whether some row's fix time lies outside `[first, last]`.
    pub fn displaced(&self) -> bool {
        self.flags & FLAG_DISPLACED != 0
    }
}

/// A chunk that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("unknown chunk codec version {0}")]
    Version(u8),
    #[error("chunk truncated in {0}")]
    Truncated(&'static str),
    #[error("chunk row count {0} outside 1..={MAX_ROWS}")]
    Count(u64),
    #[error("chunk value out of range in {0}")]
    Range(&'static str),
    #[error("chunk header does not match its rows")]
    Header,
    #[error("{0} bytes after the chunk's last column")]
    Trailing(usize),
    #[error("sealed chunk: {0}")]
    Sealed(#[from] super::vault::VaultError),
}

impl ChunkError {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            ChunkError::Version(_) => "version",
            ChunkError::Truncated(_) => "truncated",
            ChunkError::Count(_) => "count",
            ChunkError::Range(_) => "range",
            ChunkError::Header => "header",
            ChunkError::Trailing(_) => "trailing",
            ChunkError::Sealed(e) => e.label(),
        }
    }
}

const PRESENT_NONE: u8 = 0;
const PRESENT_ALL: u8 = 1;
const PRESENT_SOME: u8 = 2;

#[derive(Debug, Clone, Copy)]
enum Transform {
    Raw = 0,
    Delta = 1,
    DeltaOfDelta = 2,
}

const TRANSFORMS: [Transform; 3] = [Transform::Raw, Transform::Delta, Transform::DeltaOfDelta];

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(z: u64) -> i64 {
    ((z >> 1) as i64) ^ -((z & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut v: u128) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A cursor over the chunk's bytes.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn byte(&mut self, what: &'static str) -> Result<u8, ChunkError> {
        let v = *self.b.get(self.pos).ok_or(ChunkError::Truncated(what))?;
        self.pos += 1;
        Ok(v)
    }

    /// A varint of at most 70 bits (a token carries 65).
    fn varint(&mut self, what: &'static str) -> Result<u128, ChunkError> {
        let mut v = 0u128;
        for shift in (0..70).step_by(7) {
            let byte = self.byte(what)?;
            v |= u128::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(ChunkError::Range(what))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, ChunkError> {
        u64::try_from(self.varint(what)?).map_err(|_| ChunkError::Range(what))
    }

    fn bytes(&mut self, n: usize, what: &'static str) -> Result<&[u8], ChunkError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(ChunkError::Truncated(what))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
}

/// `values` transformed, for the tokens.
fn transformed(values: &[i64], t: Transform) -> impl Iterator<Item = i64> + '_ {
    let (mut prev, mut prev_delta) = (0i64, 0i64);
    values.iter().map(move |&v| {
        let delta = v.wrapping_sub(prev);
        prev = v;
        match t {
            Transform::Raw => v,
            Transform::Delta => delta,
            Transform::DeltaOfDelta => {
                let dd = delta.wrapping_sub(prev_delta);
                prev_delta = delta;
                dd
            }
        }
    })
}

fn put_tokens(out: &mut Vec<u8>, values: impl Iterator<Item = i64>) {
    let mut zeros = 0u128;
    for v in values {
        if v == 0 {
            zeros += 1;
            continue;
        }
        if zeros > 0 {
            put_varint(out, (zeros - 1) << 1);
            zeros = 0;
        }
        put_varint(out, (u128::from(zigzag(v)) - 1) << 1 | 1);
    }
    if zeros > 0 {
        put_varint(out, (zeros - 1) << 1);
    }
}

fn put_presence(out: &mut Vec<u8>, present: &[bool], head: u8) {
    if present.iter().all(|p| *p) {
        out.push(head | PRESENT_ALL);
    } else if !present.iter().any(|p| *p) {
        out.push(head | PRESENT_NONE);
    } else {
        out.push(head | PRESENT_SOME);
        for bits in present.chunks(8) {
            out.push(
                bits.iter()
                    .enumerate()
                    .fold(0u8, |b, (i, p)| if *p { b | 1 << i } else { b }),
            );
        }
    }
}

/// Bit 4 of a column's head byte: the values are bit-packed (see [`put_packed`]) rather
/// than tokens.
const PACKED: u8 = 1 << 4;

/// The smallest of `values` and the bit width of the largest difference to it.
fn frame_of_reference(values: &[i64]) -> (i64, u32) {
    let min = values.iter().copied().min().unwrap_or(0);
    let span = values
        .iter()
        .map(|v| v.wrapping_sub(min) as u64)
        .max()
        .unwrap_or(0);
    (min, 64 - span.leading_zeros())
}

/// Frame-of-reference bit packing: the smallest value (zigzag varint), the bit width of
/// the largest difference to it (one byte, 0 to 64), then every difference in that many
/// bits, least significant first. Noisy values (a signal level, a cell id that changes
/// every fix) cost their width in bits instead of whole bytes.
fn put_packed(out: &mut Vec<u8>, values: &[i64]) {
    let (min, width) = frame_of_reference(values);
    put_varint(out, u128::from(zigzag(min)));
    out.push(width as u8);
    let (mut acc, mut bits) = (0u128, 0u32);
    for v in values {
        acc |= u128::from(v.wrapping_sub(min) as u64) << bits;
        bits += width;
        while bits >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            bits -= 8;
        }
    }
    if bits > 0 {
        out.push(acc as u8);
    }
}

fn get_packed(r: &mut Reader<'_>, m: usize, what: &'static str) -> Result<Vec<i64>, ChunkError> {
    let min = unzigzag(r.u64(what)?);
    let width = u32::from(r.byte(what)?);
    if width > 64 {
        return Err(ChunkError::Range(what));
    }
    let len = (m as u64 * u64::from(width)).div_ceil(8);
    let bytes = r.bytes(
        usize::try_from(len).map_err(|_| ChunkError::Range(what))?,
        what,
    )?;
    let mask = if width == 64 {
        u64::MAX
    } else {
        (1u64 << width) - 1
    };
    let (mut acc, mut bits, mut next) = (0u128, 0u32, bytes.iter());
    let mut values = Vec::with_capacity(m);
    for _ in 0..m {
        while bits < width {
            acc |= u128::from(*next.next().ok_or(ChunkError::Truncated(what))?) << bits;
            bits += 8;
        }
        values.push(min.wrapping_add((acc as u64 & mask) as i64));
        acc >>= width;
        bits -= width;
    }
    Ok(values)
}

fn varint_len(v: u128) -> usize {
    ((128 - v.leading_zeros()).max(1) as usize).div_ceil(7)
}

/// Bytes [`put_tokens`] would write.
fn tokens_len(values: &[i64]) -> usize {
    let (mut len, mut zeros) = (0, 0u128);
    for &v in values {
        if v == 0 {
            zeros += 1;
            continue;
        }
        if zeros > 0 {
            len += varint_len((zeros - 1) << 1);
            zeros = 0;
        }
        len += varint_len((u128::from(zigzag(v)) - 1) << 1 | 1);
    }
    if zeros > 0 {
        len += varint_len((zeros - 1) << 1);
    }
    len
}

/// Bytes [`put_packed`] would write.
fn packed_len(values: &[i64]) -> usize {
    let (min, width) = frame_of_reference(values);
    varint_len(u128::from(zigzag(min))) + 1 + (values.len() * width as usize).div_ceil(8)
}

/// One integer column, with the smallest transform and packing (sized first, written
/// once: sealing encodes every column of every chunk).
fn put_int_column(out: &mut Vec<u8>, column: &[Option<i64>]) {
    let present: Vec<bool> = column.iter().map(Option::is_some).collect();
    let values: Vec<i64> = column.iter().flatten().copied().collect();
    let mut d = Vec::with_capacity(values.len());
    let mut best = (Transform::Raw, 0u8, usize::MAX);
    for t in TRANSFORMS {
        d.clear();
        d.extend(transformed(&values, t));
        for (packing, len) in [(0, tokens_len(&d)), (PACKED, packed_len(&d))] {
            if len < best.2 {
                best = (t, packing, len);
            }
        }
    }
    let (t, packing, _) = best;
    put_presence(out, &present, (t as u8) << 2 | packing);
    if values.is_empty() {
        return;
    }
    d.clear();
    d.extend(transformed(&values, t));
    if packing == PACKED {
        put_packed(out, &d);
    } else {
        put_tokens(out, d.iter().copied());
    }
}

/// Read a presence byte: (transform bits, which rows are present).
fn get_presence(
    r: &mut Reader<'_>,
    n: usize,
    what: &'static str,
) -> Result<(u8, Vec<bool>), ChunkError> {
    let head = r.byte(what)?;
    if head >> 5 != 0 {
        return Err(ChunkError::Range(what));
    }
    let present = match head & 3 {
        PRESENT_NONE => vec![false; n],
        PRESENT_ALL => vec![true; n],
        PRESENT_SOME => {
            let bits = r.bytes(n.div_ceil(8), what)?;
            (0..n).map(|i| bits[i / 8] & (1 << (i % 8)) != 0).collect()
        }
        _ => return Err(ChunkError::Range(what)),
    };
    Ok((head >> 2, present))
}

fn get_tokens(r: &mut Reader<'_>, m: usize, what: &'static str) -> Result<Vec<i64>, ChunkError> {
    let mut raw = Vec::with_capacity(m);
    while raw.len() < m {
        let token = r.varint(what)?;
        if token & 1 == 1 {
            let z = u64::try_from((token >> 1) + 1).map_err(|_| ChunkError::Range(what))?;
            raw.push(unzigzag(z));
        } else {
            let run = (token >> 1) + 1;
            if run > (m - raw.len()) as u128 {
                return Err(ChunkError::Range(what));
            }
            raw.extend(std::iter::repeat_n(0, run as usize));
        }
    }
    Ok(raw)
}

fn get_int_column(
    r: &mut Reader<'_>,
    n: usize,
    what: &'static str,
) -> Result<Vec<Option<i64>>, ChunkError> {
    let (head, present) = get_presence(r, n, what)?;
    let transform = *TRANSFORMS
        .get(usize::from(head & 3))
        .ok_or(ChunkError::Range(what))?;
    let m = present.iter().filter(|p| **p).count();
    let raw = if m == 0 {
        Vec::new()
    } else if head & (PACKED >> 2) != 0 {
        get_packed(r, m, what)?
    } else {
        get_tokens(r, m, what)?
    };
    let (mut prev, mut prev_delta) = (0i64, 0i64);
    let mut values = raw.into_iter().map(|d| match transform {
        Transform::Raw => d,
        Transform::Delta => {
            prev = prev.wrapping_add(d);
            prev
        }
        Transform::DeltaOfDelta => {
            prev_delta = prev_delta.wrapping_add(d);
            prev = prev.wrapping_add(prev_delta);
            prev
        }
    });
    Ok(present
        .into_iter()
        .map(|p| if p { values.next() } else { None })
        .collect())
}

fn put_extras_column(out: &mut Vec<u8>, rows: &[Row]) {
    let present: Vec<bool> = rows.iter().map(|r| r.extras.is_some()).collect();
    put_presence(out, &present, 0);
    let mut prev: Option<&Vec<u8>> = None;
    for x in rows.iter().filter_map(|r| r.extras.as_ref()) {
        if prev == Some(x) {
            put_varint(out, 0);
        } else {
            put_varint(out, x.len() as u128 + 1);
            out.extend_from_slice(x);
        }
        prev = Some(x);
    }
}

fn get_extras_column(r: &mut Reader<'_>, n: usize) -> Result<Vec<Option<Vec<u8>>>, ChunkError> {
    const WHAT: &str = "extras";
    let (t, present) = get_presence(r, n, WHAT)?;
    if t != 0 {
        return Err(ChunkError::Range(WHAT));
    }
    let mut prev: Option<Vec<u8>> = None;
    let mut out = Vec::with_capacity(n);
    for p in present {
        if !p {
            out.push(None);
            continue;
        }
        let len = r.u64(WHAT)?;
        let value = if len == 0 {
            prev.clone().ok_or(ChunkError::Range(WHAT))?
        } else {
            let len = usize::try_from(len - 1).map_err(|_| ChunkError::Range(WHAT))?;
            r.bytes(len, WHAT)?.to_vec()
        };
        prev = Some(value.clone());
        out.push(Some(value));
    }
    Ok(out)
}

/// Encode `rows` (sorted by [`Row::order_key`], 1 to [`MAX_ROWS`] of them: the caller
/// splits longer runs).
pub fn encode(rows: &[Row]) -> Vec<u8> {
    let n = rows.len();
    let first = rows.first().map_or(0, |r| r.time);
    let last = rows.iter().map(|r| r.time).max().unwrap_or(first);
    let displaced = rows
        .iter()
        .any(|r| r.fix_time_s.is_some_and(|t| t != r.time));
    let mut out = Vec::with_capacity(16 + n * 16);
    out.push(VERSION);
    out.push(if displaced { FLAG_DISPLACED } else { 0 });
    put_varint(&mut out, n as u128);
    put_varint(&mut out, u128::from(zigzag(first)));
    put_varint(&mut out, u128::from(last.wrapping_sub(first) as u64));
    let column = |f: &dyn Fn(&Row) -> Option<i64>| rows.iter().map(f).collect::<Vec<_>>();
    put_int_column(&mut out, &column(&|r| Some(r.time)));
    put_int_column(&mut out, &column(&|r| Some(r.recv_ms)));
    put_int_column(&mut out, &column(&|r| Some(r.seq as i64)));
    put_int_column(
        &mut out,
        &column(&|r| r.fix_time_s.map(|t| t.wrapping_sub(r.time))),
    );
    put_int_column(&mut out, &column(&|r| Some(i64::from(r.kind))));
    for i in 0..VALUES {
        put_int_column(&mut out, &column(&|r| r.values[i]));
    }
    put_extras_column(&mut out, rows);
    out
}

/// Bytes each column of [`encode`] takes for `rows`, by column name: where a fleet's
/// bytes per fix go (`trackgate bench`, docs/storage-format.md).
pub fn column_sizes(rows: &[Row]) -> Vec<(&'static str, usize)> {
    let size = |column: Vec<Option<i64>>| {
        let mut out = Vec::new();
        put_int_column(&mut out, &column);
        out.len()
    };
    let column = |f: &dyn Fn(&Row) -> Option<i64>| rows.iter().map(f).collect::<Vec<_>>();
    let mut sizes = vec![
        ("time", size(column(&|r| Some(r.time)))),
        ("recv_ms", size(column(&|r| Some(r.recv_ms)))),
        ("seq", size(column(&|r| Some(r.seq as i64)))),
        (
            "fix_time",
            size(column(&|r| r.fix_time_s.map(|t| t.wrapping_sub(r.time)))),
        ),
        ("kind", size(column(&|r| Some(i64::from(r.kind))))),
    ];
    for (i, (name, _)) in super::fix::PACKED_FIELDS.iter().enumerate() {
        sizes.push((name, size(column(&|r| r.values[i]))));
    }
    let mut extras = Vec::new();
    put_extras_column(&mut extras, rows);
    sizes.push(("extras", extras.len()));
    sizes
}

/// Read the header alone (of a clear or a sealed chunk).
pub fn header(b: &[u8]) -> Result<Header, ChunkError> {
    header_at(&mut Reader { b, pos: 0 })
}

/// A sealed chunk's parts: its header, the header's bytes (what the envelope's additional
/// data binds) and the envelope.
pub fn split_sealed(b: &[u8]) -> Result<(Header, &[u8], &[u8]), ChunkError> {
    let mut r = Reader { b, pos: 0 };
    let h = header_at(&mut r)?;
    if h.version != VERSION_SEALED {
        return Err(ChunkError::Version(h.version));
    }
    Ok((h, &b[..r.pos], &b[r.pos..]))
}

/// The clear header a sealed chunk of `plain` (a version-1 chunk) starts with.
pub fn sealed_header(plain: &[u8]) -> Result<Vec<u8>, ChunkError> {
    let mut r = Reader { b: plain, pos: 0 };
    let h = header_at(&mut r)?;
    if h.version != VERSION {
        return Err(ChunkError::Version(h.version));
    }
    let mut out = plain[..r.pos].to_vec();
    out[0] = VERSION_SEALED;
    Ok(out)
}

fn header_at(r: &mut Reader<'_>) -> Result<Header, ChunkError> {
    let version = r.byte("header")?;
    if version != VERSION && version != VERSION_SEALED {
        return Err(ChunkError::Version(version));
    }
    let flags = r.byte("header")?;
    let count = r.u64("header")?;
    if count == 0 || count > MAX_ROWS as u64 {
        return Err(ChunkError::Count(count));
    }
    let first = unzigzag(r.u64("header")?);
    let span = r.u64("header")?;
    Ok(Header {
        version,
        flags,
        count: count as usize,
        first,
        last: first.wrapping_add(span as i64),
    })
}

/// Decode a chunk into its rows.
pub fn decode(b: &[u8]) -> Result<Vec<Row>, ChunkError> {
    let mut r = Reader { b, pos: 0 };
    let h = header_at(&mut r)?;
    if h.version != VERSION {
        return Err(ChunkError::Version(h.version));
    }
    let n = h.count;
    let col = |r: &mut Reader<'_>, what| get_int_column(r, n, what);
    let time = col(&mut r, "time")?;
    let recv = col(&mut r, "recv_ms")?;
    let seq = col(&mut r, "seq")?;
    let fix_dt = col(&mut r, "fix_time")?;
    let kind = col(&mut r, "kind")?;
    let mut values = Vec::with_capacity(VALUES);
    for i in 0..VALUES {
        values.push(col(&mut r, super::fix::PACKED_FIELDS[i].0)?);
    }
    let extras = get_extras_column(&mut r, n)?;
    if r.pos != b.len() {
        return Err(ChunkError::Trailing(b.len() - r.pos));
    }
    let mut rows = Vec::with_capacity(n);
    for (i, x) in extras.into_iter().enumerate() {
        let required = |c: &[Option<i64>], what| c[i].ok_or(ChunkError::Range(what));
        let time = required(&time, "time")?;
        let kind = u8::try_from(required(&kind, "kind")?).map_err(|_| ChunkError::Range("kind"))?;
        let mut row_values = [None; VALUES];
        for (slot, column) in row_values.iter_mut().zip(&values) {
            *slot = column[i];
        }
        rows.push(Row {
            recv_ms: required(&recv, "recv_ms")?,
            seq: required(&seq, "seq")? as u64,
            time,
            fix_time_s: fix_dt[i].map(|d| d.wrapping_add(time)),
            kind,
            values: row_values,
            extras: x,
        });
    }
    let last = rows.iter().map(|r| r.time).max();
    if rows.first().map(|r| r.time) != Some(h.first) || last != Some(h.last) {
        return Err(ChunkError::Header);
    }
    let displaced = rows
        .iter()
        .any(|r| r.fix_time_s.is_some_and(|t| t != r.time));
    if displaced != h.displaced() || h.flags & !FLAG_DISPLACED != 0 {
        return Err(ChunkError::Header);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(super) fn row(i: i64) -> Row {
        let mut values = [None; VALUES];
        values[2] = Some(-27_257_698 + i * 800);
        values[3] = Some(153_030_471 - i * 650);
        values[4] = Some(400 + (i % 7) * 10);
        values[7] = Some(9);
        values[10] = Some(1_000_000 + i * 300);
        Row {
            recv_ms: 1_700_000_000_000 + i * 30_000 + (i * 37) % 400,
            seq: 0,
            time: 1_700_000_000 + i * 30,
            fix_time_s: Some(1_700_000_000 + i * 30),
            kind: 0,
            values,
            extras: (i % 10 == 0).then(|| br#"{"battery_pct":96}"#.to_vec()),
        }
    }

    #[test]
    fn a_steady_track_packs_into_a_few_bytes_per_fix() -> Result<(), ChunkError> {
        let rows: Vec<Row> = (0..256).map(row).collect();
        let b = encode(&rows);
        assert_eq!(decode(&b)?, rows);
        let per_fix = b.len() as f64 / rows.len() as f64;
        assert!(per_fix < 12.0, "{per_fix} B per fix");
        let h = header(&b)?;
        assert_eq!(
            (h.count, h.first, h.last),
            (256, rows[0].time, rows[255].time)
        );
        assert!(!h.displaced());
        Ok(())
    }

    #[test]
    fn noisy_values_cost_their_bit_width() {
        // A signal level jumping within 10..=31 every fix: 5 bits, not a byte.
        let column: Vec<Option<i64>> = (0..256).map(|i| Some(10 + (i * 7919) % 22)).collect();
        let mut out = Vec::new();
        put_int_column(&mut out, &column);
        assert!(out.len() <= 2 + 2 + 256 * 5 / 8, "{} bytes", out.len());
        let mut r = Reader { b: &out, pos: 0 };
        assert_eq!(get_int_column(&mut r, 256, "test"), Ok(column));
        assert_eq!(r.pos, out.len());
    }

    #[test]
    fn damage_is_a_typed_error() {
        let rows: Vec<Row> = (0..20).map(row).collect();
        let b = encode(&rows);
        for cut in 0..b.len() {
            assert!(decode(&b[..cut]).is_err(), "truncated at {cut}");
        }
        let mut longer = b.clone();
        longer.push(0);
        assert_eq!(decode(&longer), Err(ChunkError::Trailing(1)));
        let mut v = b.clone();
        v[0] = 9;
        assert_eq!(decode(&v), Err(ChunkError::Version(9)));
        assert_eq!(decode(&[VERSION, 0, 0]), Err(ChunkError::Count(0)));
    }

    fn arb_row() -> impl Strategy<Value = Row> {
        (
            (
                any::<i64>(),
                any::<u64>(),
                any::<i64>(),
                any::<Option<i64>>(),
            ),
            any::<u8>(),
            proptest::array::uniform30(any::<Option<i64>>()),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        )
            .prop_map(
                |((recv_ms, seq, time, fix_time_s), kind, values, extras)| Row {
                    recv_ms,
                    seq,
                    time,
                    fix_time_s,
                    kind,
                    values,
                    extras,
                },
            )
    }

    proptest! {
        #[test]
        fn any_rows_round_trip(mut rows in proptest::collection::vec(arb_row(), 1..60)) {
            rows.sort_by_key(Row::order_key);
            let b = encode(&rows);
            prop_assert_eq!(decode(&b), Ok(rows));
        }

        #[test]
        fn small_steps_round_trip(
            start in any::<i64>(),
            steps in proptest::collection::vec((-3i64..3, 0u8..2), 1..300),
        ) {
            let mut rows = Vec::new();
            let mut v = start;
            for (i, (step, present)) in steps.into_iter().enumerate() {
                v = v.wrapping_add(step);
                let mut r = row(i as i64);
                r.values[5] = (present == 1).then_some(v);
                r.values[6] = Some(v);
                rows.push(r);
            }
            let b = encode(&rows);
            prop_assert_eq!(decode(&b), Ok(rows));
        }

        #[test]
        fn sizes_match_what_is_written(values in proptest::collection::vec(any::<i64>(), 0..80)) {
            let mut tokens = Vec::new();
            put_tokens(&mut tokens, values.iter().copied());
            prop_assert_eq!(tokens_len(&values), tokens.len());
            let mut packed = Vec::new();
            put_packed(&mut packed, &values);
            prop_assert_eq!(packed_len(&values), packed.len());
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&b);
            let _ = header(&b);
        }
    }
}

#[cfg(test)]
mod seeds {
    /// `TRACKGATE_WRITE_CHUNK_SEEDS=<dir> cargo test --lib write_fuzz_seeds` writes a few
    /// chunks for the fuzz target's corpus (fuzz/seeds/chunk_decode/).
    #[test]
    fn write_fuzz_seeds() {
        let Ok(dir) = std::env::var("TRACKGATE_WRITE_CHUNK_SEEDS") else {
            return;
        };
        let rows: Vec<_> = (0..40).map(super::tests::row).collect();
        for (name, part) in [
            ("steady-40", &rows[..]),
            ("one", &rows[..1]),
            ("five", &rows[..5]),
        ] {
            let path = std::path::Path::new(&dir).join(name);
            std::fs::write(path, super::encode(part)).unwrap_or_default();
        }
    }
}
