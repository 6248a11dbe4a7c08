//! Export: a customer reads and copies its own device's history (NDJSON, CSV, GeoJSON).
//!
//! Streamed chunk by chunk from Redis (`XRANGE … COUNT`), never buffering the history,
//! across the device's pseudonyms under every key version. Nothing older than the
//! retention period is ever returned, whether or not the sweeper has removed it yet: an
//! entry is skipped if its receive time (entry id) or its fix time is past the TTL.

use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use jiff::Timestamp;
use redis::aio::ConnectionLike;
use serde_json::{Map, Value, json};

use crate::pseudonym::Pseudonym;
use crate::store::{F_EXTRAS, F_PACKED, F_TIME, PACKED_FIELDS, fixes_key, unpack};

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

fn rfc3339_s(s: i64) -> Option<String> {
    Timestamp::from_second(s).ok().map(|t| t.to_string())
}

fn id_ms(id: &str) -> Option<i64> {
    id.split_once('-').and_then(|(ms, _)| ms.parse().ok())
}

/// One stored entry as the JSON record `trackgate decode` would print (same names/units).
pub fn entry_json(id: &str, fields: &[(String, Vec<u8>)]) -> Map<String, Value> {
    let get = |k: &str| {
        fields
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_slice())
    };
    let mut m = Map::new();
    let t = get(F_TIME)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse::<i64>().ok());
    if let Some(t) = t.and_then(rfc3339_s) {
        m.insert("time".into(), json!(t));
    }
    if let Some(r) = id_ms(id).and_then(|ms| Timestamp::from_millisecond(ms).ok()) {
        m.insert("received_at".into(), json!(r.to_string()));
    }
    if let Some((kind, values)) = get(F_PACKED).and_then(unpack) {
        m.insert("type".into(), json!(kind));
        for (i, v) in values {
            let (name, div) = PACKED_FIELDS[i];
            let value = match name {
                "valid" => json!(v != 0),
                _ if div == 1.0 => json!(v),
                _ => json!(v as f64 / div),
            };
            m.insert(name.into(), value);
        }
    }
    if let Some(x) = get(F_EXTRAS).and_then(|x| serde_json::from_slice::<Value>(x).ok()) {
        m.insert("extra".into(), x);
    }
    m
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
}

struct State<C> {
    conn: C,
    q: ExportQuery,
    device: usize,
    /// XRANGE start for the current device's stream: `<ms>-0` (inclusive, the TTL
    /// bound) or `(<id>` (exclusive, after the last entry read).
    after: String,
    started: bool,
    finished: bool,
    emitted: u64,
    oldest_ms: i64,
}

/// The export as a byte stream (header, records, footer).
pub fn stream<C>(conn: C, q: ExportQuery) -> impl Stream<Item = Result<Bytes, redis::RedisError>>
where
    C: ConnectionLike + Send + 'static,
{
    let oldest_ms = (Timestamp::now().as_millisecond() - q.ttl.as_millis() as i64)
        .max(q.owned_since_ms.unwrap_or(0));
    let state = State {
        conn,
        q,
        device: 0,
        after: String::new(),
        started: false,
        finished: false,
        emitted: 0,
        oldest_ms,
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
            // Entries older than the TTL by receive time are skipped by the id range.
            st.after = format!("{}-0", st.oldest_ms.max(0));
            return Ok(Some((Bytes::from(out), st)));
        }
        while st.device < st.q.pseudonyms.len() {
            let key = fixes_key(&st.q.pseudonyms[st.device]);
            let start = st.after.clone();
            let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                .arg(&key)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(st.q.chunk_entries)
                .query_async(&mut st.conn)
                .await?;
            if reply.ids.is_empty() {
                st.device += 1;
                st.after = format!("{}-0", st.oldest_ms.max(0));
                continue;
            }
            let (from_s, to_s) = (
                st.q.from.map(|t| t.as_second()),
                st.q.to.map(|t| t.as_second()),
            );

            for e in &reply.ids {
                let fields: Vec<(String, Vec<u8>)> = e
                    .map
                    .iter()
                    .filter_map(|(k, v)| {
                        redis::from_redis_value::<Vec<u8>>(v.clone())
                            .ok()
                            .map(|v| (k.clone(), v))
                    })
                    .collect();
                let t = fields
                    .iter()
                    .find(|(k, _)| k == F_TIME)
                    .and_then(|(_, v)| std::str::from_utf8(v).ok())
                    .and_then(|v| v.parse::<i64>().ok());
                let keep = match t {
                    Some(t) => {
                        t.saturating_mul(1000) >= st.oldest_ms
                            && from_s.is_none_or(|f| t >= f)
                            && to_s.is_none_or(|x| t <= x)
                    }
                    None => from_s.is_none() && to_s.is_none(),
                };
                if keep {
                    let rec = entry_json(&e.id, &fields);
                    out.extend(render(st.q.format, &rec, st.emitted == 0));
                    st.emitted += 1;
                }
            }
            if let Some(last) = reply.ids.last() {
                // Exclusive start for the next chunk.
                st.after = format!("({}", last.id);
            }
            return Ok(Some((Bytes::from(out), st)));
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
        let rec = entry_json("1700000000123-0", &fields);
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
