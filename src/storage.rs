//! The Redis data model (DESIGN §5): key names and how a fix is laid out in a stream entry.
//!
//! Every key of a device carries its pseudonym as the hash tag `{P}`, so a device's keys
//! land in one Redis Cluster slot and can be written in one pipeline or script.
//!
//! A fix is a stream entry with short field names and integer values (listpack-friendly;
//! coordinates in 1e-6 degrees, never floats). The entry ID is assigned by Redis at write,
//! so its milliseconds are the receive time. Protocol-specific extras, when present, are
//! one compact JSON field `x`.

use trackgate_protocols::{Fix, MessageKind};

use crate::pseudonym::{Imei, Pseudonym};

/// `tg:{P}:fixes`, the device's location history.
pub fn fixes_key(p: &Pseudonym) -> String {
    format!("tg:{{{p}}}:fixes")
}

/// `tg:{P}:meta`, owner, retention override, last seen, key version.
pub fn meta_key(p: &Pseudonym) -> String {
    format!("tg:{{{p}}}:meta")
}

/// `tg:{P}:tomb`, purge cutoffs (issue 5).
pub fn tomb_key(p: &Pseudonym) -> String {
    format!("tg:{{{p}}}:tomb")
}

/// Pattern matching every fixes stream (for the sweeper's SCAN).
pub const FIXES_PATTERN: &str = "tg:{*}:fixes";

/// One page of a SCAN over every fixes stream: (next cursor, keys); cursor 0 starts and
/// a returned 0 ends. (Single node; a cluster scans each primary, issue 8.)
pub async fn scan_fixes_keys<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    cursor: u64,
) -> redis::RedisResult<(u64, Vec<String>)> {
    redis::cmd("SCAN")
        .arg(cursor)
        .arg("MATCH")
        .arg(FIXES_PATTERN)
        .arg("COUNT")
        .arg(500)
        .arg("TYPE")
        .arg("stream")
        .query_async(conn)
        .await
}

/// The pseudonym inside a `tg:{P}:…` key.
pub fn pseudonym_of_key(key: &str) -> Option<Pseudonym> {
    let inner = key.strip_prefix("tg:{")?.split_once('}')?.0;
    Pseudonym::parse(inner)
}

/// One field value of a stored fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldValue {
    Int(i64),
    Text(String),
}

/// A fix as written to its stream: (field, value) pairs in a fixed order. Owned, so it
/// can cross the write queue while the frame's buffer is reused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFix {
    /// Fix time, Unix seconds (also in `fields` as `t`): retention checks it at ingest.
    pub fix_time_s: Option<i64>,
    pub fields: Vec<(&'static str, FieldValue)>,
}

/// Field name of the message type (`AAA`, `CCE`, …).
pub const F_TYPE: &str = "ty";
/// Field name of the fix time (Unix seconds).
pub const F_TIME: &str = "t";

fn kind_name(kind: MessageKind) -> &'static str {
    match kind {
        MessageKind::Aaa => "AAA",
        MessageKind::Aff => "AFF",
        MessageKind::Cce => "CCE",
        MessageKind::Ccc => "CCC",
        _ => "OTHER",
    }
}

impl StoredFix {
    /// Lay out `fix` (from a message of `kind`) for storage.
    pub fn from_fix(kind: MessageKind, fix: &Fix<'_>) -> StoredFix {
        let mut fields: Vec<(&'static str, FieldValue)> = Vec::with_capacity(34);
        fields.push((F_TYPE, FieldValue::Text(kind_name(kind).into())));
        let fix_time_s = fix.time.map(|t| t.as_second());
        let a = &fix.analog;
        let ints = [
            (F_TIME, fix_time_s),
            ("e", fix.event.map(i64::from)),
            ("v", fix.valid.map(i64::from)),
            ("la", fix.lat_e6.map(i64::from)),
            ("lo", fix.lon_e6.map(i64::from)),
            ("sp", fix.speed_kmh_x10.map(i64::from)),
            ("co", fix.course_deg.map(i64::from)),
            ("al", fix.altitude_m.map(i64::from)),
            ("sa", fix.satellites.map(i64::from)),
            ("hd", fix.hdop_x10.map(i64::from)),
            ("gs", fix.gsm_signal.map(i64::from)),
            ("mi", fix.mileage_m.and_then(|v| i64::try_from(v).ok())),
            ("ru", fix.runtime_s.and_then(|v| i64::try_from(v).ok())),
            ("mcc", fix.cell.map(|c| i64::from(c.mcc))),
            ("mnc", fix.cell.map(|c| i64::from(c.mnc))),
            ("lac", fix.cell.map(|c| i64::from(c.lac))),
            ("ci", fix.cell.map(|c| i64::from(c.cell_id))),
            ("in", fix.inputs.map(i64::from)),
            ("out", fix.outputs.map(i64::from)),
            ("a1", a.adc_raw[0].map(i64::from)),
            ("a2", a.adc_raw[1].map(i64::from)),
            ("a3", a.adc_raw[2].map(i64::from)),
            ("a1mv", a.adc_mv[0].map(i64::from)),
            ("a2mv", a.adc_mv[1].map(i64::from)),
            ("br", a.battery_raw.map(i64::from)),
            ("pr", a.power_raw.map(i64::from)),
            ("bmv", a.battery_mv.map(i64::from)),
            ("pmv", a.power_mv.map(i64::from)),
            ("rmv", a.rtc_mv.map(i64::from)),
            ("umv", a.mcu_mv.map(i64::from)),
            ("gmv", a.gps_mv.map(i64::from)),
        ];
        fields.extend(
            ints.into_iter()
                .filter_map(|(k, v)| v.map(|v| (k, FieldValue::Int(v)))),
        );
        if let Some(x) = trackgate_protocols::json::extras_json(fix) {
            fields.push(("x", FieldValue::Text(x.to_string())));
        }
        StoredFix { fix_time_s, fields }
    }

    /// Replace the device's own IMEI wherever a device-supplied text field repeats it
    /// (some firmware echoes it in free-text parameters or file names): the raw IMEI must
    /// not reach storage by that back door either.
    pub fn scrubbed(mut self, imei: &Imei) -> StoredFix {
        let digits = imei.expose();
        for (_, v) in &mut self.fields {
            if let FieldValue::Text(t) = v {
                if t.contains(digits) {
                    *t = t.replace(digits, "<imei>");
                }
            }
        }
        self
    }

    /// Number of Redis arguments this entry adds after `XADD key *`.
    pub fn arg_count(&self) -> usize {
        self.fields.len() * 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;
    use trackgate_protocols::{Cell, ExtraKey, ExtraValue};

    #[test]
    fn the_devices_imei_is_scrubbed_from_free_text() {
        let imei = Imei::new("350000000000001").unwrap();
        let mut fix = Fix::default();
        fix.push_extra(
            ExtraKey::Named("file_name"),
            ExtraValue::Text("350000000000001_cam1.jpg"),
        );
        let s = StoredFix::from_fix(MessageKind::Cce, &fix).scrubbed(&imei);
        let text = format!("{:?}", s.fields);
        assert!(!text.contains("350000000000001"), "{text}");
        assert!(text.contains("<imei>_cam1.jpg"), "{text}");
    }

    #[test]
    fn keys_share_the_hash_tag() {
        let p = Pseudonym::parse("p1_abcdefghijklmnopqrstuvwxyz").unwrap();
        assert_eq!(fixes_key(&p), "tg:{p1_abcdefghijklmnopqrstuvwxyz}:fixes");
        assert_eq!(meta_key(&p), "tg:{p1_abcdefghijklmnopqrstuvwxyz}:meta");
        assert_eq!(pseudonym_of_key(&fixes_key(&p)), Some(p));
        assert_eq!(pseudonym_of_key("tg:{nope}:fixes"), None);
    }

    #[test]
    fn fix_is_integers_only_with_extras_as_json() {
        let mut fix = Fix {
            time: Timestamp::from_second(1_700_000_000).ok(),
            lat_e6: Some(-27_257_698),
            lon_e6: Some(153_030_471),
            cell: Some(Cell {
                mcc: 505,
                mnc: 1,
                lac: 7,
                cell_id: 9,
            }),
            ..Fix::default()
        };
        fix.push_extra(ExtraKey::Named("battery_pct"), ExtraValue::Int(96));
        let s = StoredFix::from_fix(MessageKind::Cce, &fix);
        assert_eq!(s.fix_time_s, Some(1_700_000_000));
        let get = |k: &str| {
            s.fields
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("la"), Some(FieldValue::Int(-27_257_698)));
        assert_eq!(get("mcc"), Some(FieldValue::Int(505)));
        assert_eq!(get("ty"), Some(FieldValue::Text("CCE".into())));
        assert_eq!(
            get("x"),
            Some(FieldValue::Text(r#"{"battery_pct":96}"#.into()))
        );
        assert_eq!(get("sp"), None, "absent fields are not written");
    }
}
