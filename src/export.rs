//! Export: a customer reads and copies its own device's history (NDJSON, CSV, GeoJSON).
//!
//! Per pseudonym of the device (every key version): its live tail is read whole (it
//! holds minutes of fixes) and sorted, then merged with its history chunks, decoded one at
//! a time, so records come out in time order (the fix time; see
//! [`crate::store::row::effective_time`]) with at most one chunk decoded at once. The
//! chunks are read in one call, an atomic snapshot against compaction (their compressed
//! bytes: a few MB for a device's three months). A fix sealed while the tail was read is
//! written once (by its id), and so is a resent copy of a fix.
//!
//! Nothing older than the retention period is ever returned, whether or not the sweeper
//! has removed it yet: a row is skipped if its receive time or its fix time is past the
//! TTL.

use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use jiff::Timestamp;
use redis::aio::ConnectionLike;
use serde_json::{Map, Value, json};

use crate::pseudonym::Pseudonym;
use crate::store::chunk;
use crate::store::hist::{self, StoredChunk};
use crate::store::row::Row;
use crate::store::tail;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Ndjson,
    Csv,
    GeoJson,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "ndjson" | "jsonl" => Some(Format::Ndjson),
            "csv" => Some(Format::Csv),
            "geojson" => Some(Format::GeoJson),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Ndjson => "application/x-ndjson",
            Format::Csv => "text/csv; charset=utf-8",
            Format::GeoJson => "application/geo+json",
        }
    }
}

/// CSV columns, in order.
pub const CSV_COLUMNS: &[&str] = &[
    "time",
    "received_at",
    "type",
    "event",
    "valid",
    "lat",
    "lon",
    "speed_kmh",
    "course_deg",
    "altitude_m",
    "satellites",
    "hdop",
    "gsm_signal",
    "mileage_m",
    "runtime_s",
    "mcc",
    "mnc",
    "lac",
    "cell_id",
    "inputs",
    "outputs",
];

/// One stored tail entry of device `p` as the JSON record `trackgate decode` would print
/// (same names and units); an entry that cannot be read gives an empty record.
pub fn entry_json(
    id: &str,
    fields: &[(String, Vec<u8>)],
    vault: &crate::store::vault::Vault,
    p: &Pseudonym,
) -> Map<String, Value> {
    Row::from_entry(id, fields, i64::MAX, vault, p)
        .map(|r| r.to_json())
        .unwrap_or_default()
}

fn csv_field(v: Option<&Value>) -> String {
    let s = match v {
        None | Some(Value::Null) => return String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

fn render(format: Format, rec: &Map<String, Value>, first: bool) -> Vec<u8> {
    match format {
        Format::Ndjson => {
            let mut out = Value::Object(rec.clone()).to_string().into_bytes();
            out.push(b'\n');
            out
        }
        Format::Csv => {
            let row: Vec<String> = CSV_COLUMNS.iter().map(|c| csv_field(rec.get(*c))).collect();
            let mut out = row.join(",").into_bytes();
            out.extend_from_slice(b"\r\n");
            out
        }
        Format::GeoJson => {
            let mut props = rec.clone();
            let (lon, lat) = (props.remove("lon"), props.remove("lat"));
            let geometry = match (lon, lat) {
                (Some(lon), Some(lat)) => json!({"type": "Point", "coordinates": [lon, lat]}),
                _ => Value::Null,
            };
            let feature = json!({"type": "Feature", "geometry": geometry, "properties": props});
            let mut out = if first { Vec::new() } else { b",".to_vec() };
            out.extend_from_slice(feature.to_string().as_bytes());
            out
        }
    }
}

/// What to export.
#[derive(Debug, Clone)]
pub struct ExportQuery {
    pub pseudonyms: Vec<Pseudonym>,
    /// Fix-time bounds (inclusive).
    pub from: Option<Timestamp>,
    pub to: Option<Timestamp>,
    pub ttl: Duration,
    /// Since when the caller owns the device (Unix ms): what was received or taken
    /// before is the previous owner's history and not exported.
    pub owned_since_ms: Option<i64>,
    pub format: Format,
    /// Entries read per Redis call (`http.export_chunk_entries`).
    pub chunk_entries: usize,
    /// `storage.future_fix_tolerance_s`: how a tail entry's time is read.
    pub future_tolerance_s: i64,
    /// Opens the sealed history chunks.
    pub vault: std::sync::Arc<crate::store::vault::Vault>,
}

/// Which rows an export returns: within the retention (by receive and fix time), the
/// caller's ownership and the asked fix-time range.
#[derive(Debug, Clone, Copy)]
struct Filter {
    oldest_ms: i64,
    from_s: Option<i64>,
    to_s: Option<i64>,
}

impl Filter {
    fn keeps(&self, r: &Row) -> bool {
        if r.recv_ms < self.oldest_ms {
            return false;
        }
        match r.fix_time_s {
            Some(t) => {
                t.saturating_mul(1000) >= self.oldest_ms
                    && self.from_s.is_none_or(|f| t >= f)
                    && self.to_s.is_none_or(|x| t <= x)
            }
            None => self.from_s.is_none() && self.to_s.is_none(),
        }
    }

    /// Whether a chunk may hold rows this filter keeps.
    fn may_keep(&self, h: &chunk::Header) -> bool {
        h.displaced()
            || (h.last.saturating_mul(1000) >= self.oldest_ms.saturating_sub(999)
                && self.from_s.is_none_or(|f| h.last >= f))
    }
}

/// One device (pseudonym) being exported: its tail, read whole and sorted, merged with
/// its history chunks, read in one atomic call, one chunk at a time.
struct Device {
    tail: std::collections::VecDeque<Row>,
    /// Tail entries' ids: a fix sealed into a chunk while the export read the tail is in
    /// both, and is written once.
    tail_ids: std::collections::HashSet<(i64, u64)>,
    chunks: std::collections::VecDeque<StoredChunk>,
    /// Rows written with the current time: a resent copy of one of them is skipped.
    group: Vec<Row>,
}

impl Device {
    /// Read `p`'s tail, then its history (in that order: a fix that moves from one to the
    /// other meanwhile is then read at least once).
    async fn load<C: ConnectionLike + Send>(
        conn: &mut C,
        p: &Pseudonym,
        q: &ExportQuery,
        filter: &Filter,
    ) -> redis::RedisResult<Device> {
        let mut rows = Vec::new();
        let mut start = format!("{}-0", filter.oldest_ms.max(0));
        loop {
            let page = tail::range(conn, p, &start, "+", q.chunk_entries).await?;
            let Some(last) = page.last() else { break };
            start = format!("({}", last.0);
            let full = page.len() == q.chunk_entries;
            rows.extend(
                page.iter()
                    .filter_map(|e| {
                        tail::row_of(e, &q.vault, p, q.future_tolerance_s, "export").ok()
                    })
                    .filter(|r| filter.keeps(r)),
            );
            if !full {
                break;
            }
        }
        rows.sort_by_key(Row::order_key);
        let tail_ids = rows.iter().map(|r| (r.recv_ms, r.seq)).collect();
        let max =
            q.to.map_or("+inf".to_string(), |t| t.as_second().to_string());
        let chunks = hist::chunks_by_score(conn, p, "-inf", &max, 0, usize::MAX)
            .await?
            .into_iter()
            .filter(|c| c.header.as_ref().map_or(true, |h| filter.may_keep(h)))
            .collect();
        Ok(Device {
            tail: rows.into(),
            tail_ids,
            chunks,
            group: Vec::new(),
        })
    }

    /// The next rows to write, in time order: the next chunk's rows with the tail rows
    /// that come before them; the rest of the tail once the chunks are done. `None` once
    /// the device is done.
    fn next_rows(
        &mut self,
        filter: &Filter,
        vault: &crate::store::vault::Vault,
    ) -> Option<Vec<Row>> {
        let Some(c) = self.chunks.pop_front() else {
            if self.tail.is_empty() {
                return None;
            }
            let rest: Vec<Row> = self.tail.drain(..).collect();
            return Some(self.unique(rest));
        };
        let rows: Vec<Row> = c
            .rows(vault, "export")
            .unwrap_or_default()
            .into_iter()
            .filter(|r| filter.keeps(r) && !self.tail_ids.contains(&(r.recv_ms, r.seq)))
            .collect();
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            while self
                .tail
                .front()
                .is_some_and(|t| t.order_key() < r.order_key())
            {
                out.extend(self.tail.pop_front());
            }
            out.push(r);
        }
        Some(self.unique(out))
    }

    /// `rows` without the resends of rows already written.
    fn unique(&mut self, rows: Vec<Row>) -> Vec<Row> {
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            if self.group.last().is_some_and(|g| g.time != r.time) {
                self.group.clear();
            }
            if self.group.iter().any(|g| r.is_resend_of(g)) {
                continue;
            }
            self.group.push(r.clone());
            out.push(r);
        }
        out
    }
}

struct State<C> {
    conn: C,
    q: ExportQuery,
    filter: Filter,
    /// Index of the pseudonym being exported, and its loaded rows.
    device: usize,
    current: Option<Device>,
    started: bool,
    finished: bool,
    emitted: u64,
}

/// The export as a byte stream (header, records in time order per pseudonym, footer).
pub fn stream<C>(conn: C, q: ExportQuery) -> impl Stream<Item = Result<Bytes, redis::RedisError>>
where
    C: ConnectionLike + Send + 'static,
{
    let oldest_ms = (Timestamp::now().as_millisecond() - q.ttl.as_millis() as i64)
        .max(q.owned_since_ms.unwrap_or(0));
    let filter = Filter {
        oldest_ms,
        from_s: q.from.map(|t| t.as_second()),
        to_s: q.to.map(|t| t.as_second()),
    };
    let state = State {
        conn,
        q,
        filter,
        device: 0,
        current: None,
        started: false,
        finished: false,
        emitted: 0,
    };
    futures::stream::try_unfold(state, |mut st| async move {
        if st.finished {
            return Ok(None);
        }
        let mut out = Vec::new();
        if !st.started {
            st.started = true;
            match st.q.format {
                Format::Csv => {
                    out.extend_from_slice(CSV_COLUMNS.join(",").as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                Format::GeoJson => {
                    out.extend_from_slice(br#"{"type":"FeatureCollection","features":["#)
                }
                Format::Ndjson => {}
            }
            return Ok(Some((Bytes::from(out), st)));
        }
        while st.device < st.q.pseudonyms.len() {
            let device = match st.current.as_mut() {
                Some(d) => d,
                None => {
                    let p = &st.q.pseudonyms[st.device];
                    let d = Device::load(&mut st.conn, p, &st.q, &st.filter).await?;
                    st.current.insert(d)
                }
            };
            match device.next_rows(&st.filter, &st.q.vault) {
                Some(rows) => {
                    for r in rows {
                        out.extend(render(st.q.format, &r.to_json(), st.emitted == 0));
                        st.emitted += 1;
                    }
                    return Ok(Some((Bytes::from(out), st)));
                }
                None => {
                    st.current = None;
                    st.device += 1;
                }
            }
        }
        st.finished = true;
        if st.q.format == Format::GeoJson {
            out.extend_from_slice(b"]}");
        }
        Ok(Some((Bytes::from(out), st)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_fields_map_back_to_decode_names_and_units() {
        use trackgate_protocols::{ExtraKey, ExtraValue, Fix, MessageKind};
        let mut fix = Fix {
            time: Timestamp::from_second(1_700_000_000).ok(),
            lat_e6: Some(-27_257_698),
            lon_e6: Some(153_030_471),
            speed_kmh_x10: Some(425),
            valid: Some(true),
            ..Fix::default()
        };
        fix.analog.battery_mv = Some(4150);
        fix.push_extra(ExtraKey::Named("battery_pct"), ExtraValue::Int(96));
        let stored = crate::store::StoredFix::from_fix(MessageKind::Aaa, &fix);
        let fields: Vec<(String, Vec<u8>)> = stored
            .fields
            .iter()
            .map(|(k, v)| {
                let bytes = match v {
                    crate::store::FieldValue::Int(i) => i.to_string().into_bytes(),
                    crate::store::FieldValue::Text(t) => t.clone().into_bytes(),
                    crate::store::FieldValue::Bytes(b) => b.clone(),
                };
                (k.to_string(), bytes)
            })
            .collect();
        let ring = crate::pseudonym::KeyRing::ephemeral();
        let p = Pseudonym::parse("p1_aaaaaaaaaaaaaaaaaaaaaaaaaa").unwrap_or_else(|| unreachable!());
        let rec = entry_json("1700000000123-0", &fields, ring.vault(), &p);
        assert_eq!(rec["time"], "2023-11-14T22:13:20Z");
        assert_eq!(rec["received_at"], "2023-11-14T22:13:20.123Z");
        assert_eq!(rec["type"], "AAA");
        assert_eq!(rec["lat"], -27.257698);
        assert_eq!(rec["lon"], 153.030471);
        assert_eq!(rec["speed_kmh"], 42.5);
        assert_eq!(rec["valid"], true);
        assert_eq!(rec["battery_v"], 4.15);
        assert_eq!(rec["extra"]["battery_pct"], 96);
    }

    #[test]
    fn csv_escapes_and_geojson_puts_lon_first() {
        let mut rec = Map::new();
        rec.insert("type".into(), json!("a,\"b\""));
        rec.insert("lat".into(), json!(1.5));
        rec.insert("lon".into(), json!(2.5));
        let row = String::from_utf8(render(Format::Csv, &rec, true)).unwrap();
        assert!(row.contains(r#""a,""b""""#), "{row}");
        assert_eq!(
            row.trim_end().split(',').count(),
            CSV_COLUMNS.len() + 1,
            "one quoted comma"
        );
        let feat: Value = serde_json::from_slice(&render(Format::GeoJson, &rec, true)).unwrap();
        assert_eq!(feat["geometry"]["coordinates"], json!([2.5, 1.5]));
        assert!(render(Format::GeoJson, &rec, false).starts_with(b","));
    }
}
