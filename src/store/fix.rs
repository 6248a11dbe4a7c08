//! How one fix is laid out in a live-tail stream entry (`tg:{P}:fixes`).
//!
//! A fix is a stream entry of (at most) three fields, the same in every entry so Redis
//! stores the names once per listpack node:
//! * `t` — fix time, Unix seconds (an integer: retention and range purges read it);
//! * `d` — everything else, packed (see [`pack`]): version byte, message-kind byte, a
//!   presence bitmap (LEB128) and the present values as zigzag LEB128 varints, in
//!   [`PACKED_FIELDS`] order. Integers only: coordinates in 1e-6 degrees, never floats;
//! * `x` — protocol-specific extras as compact JSON, only when present.
//!
//! Measured on 100k fixes: ≈ 67 B per fix and a 3.5 µs per-entry server-side scan, against
//! ≈ 93 B and 14 µs for one stream field per value. The entry ID is assigned by Redis at
//! write, so its milliseconds are the receive time.

use trackgate_protocols::{Fix, MessageKind};

use crate::pseudonym::Imei;

/// `<imei>` as hex: what replaces the IMEI's digits inside a raw (hex) extra.
const SCRUBBED_HEX: &str = "3c696d65693e";

/// [`StoredFix::scrubbed`] inside one JSON value.
fn scrub_json(v: &mut serde_json::Value, digits: &str, hex_digits: &str) {
    use serde_json::Value;
    match v {
        Value::String(s) if s.contains(digits) || s.contains(hex_digits) => {
            *s = s
                .replace(digits, "<imei>")
                .replace(hex_digits, SCRUBBED_HEX);
        }
        Value::Number(n) if n.to_string().contains(digits) => {
            *v = Value::String("<imei>".into());
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|i| scrub_json(i, digits, hex_digits)),
        Value::Object(m) => m
            .values_mut()
            .for_each(|i| scrub_json(i, digits, hex_digits)),
        _ => {}
    }
}

/// One field value of a stored fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldValue {
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
}

impl FieldValue {
    /// About how many bytes the value takes as a Redis argument.
    pub fn len_hint(&self) -> usize {
        match self {
            FieldValue::Int(_) => 20,
            FieldValue::Text(t) => t.len(),
            FieldValue::Bytes(b) => b.len(),
        }
    }
}

/// Version byte of the packed layout.
pub const PACKED_VERSION: u8 = 1;

/// The values inside `d`, in order: (export name, divisor). Index = bit in the bitmap.
pub const PACKED_FIELDS: [(&str, f64); 30] = [
    ("event", 1.0),
    ("valid", 1.0),
    ("lat", 1e6),
    ("lon", 1e6),
    ("speed_kmh", 10.0),
    ("course_deg", 1.0),
    ("altitude_m", 1.0),
    ("satellites", 1.0),
    ("hdop", 10.0),
    ("gsm_signal", 1.0),
    ("mileage_m", 1.0),
    ("runtime_s", 1.0),
    ("mcc", 1.0),
    ("mnc", 1.0),
    ("lac", 1.0),
    ("cell_id", 1.0),
    ("inputs", 1.0),
    ("outputs", 1.0),
    ("ad1_raw", 1.0),
    ("ad2_raw", 1.0),
    ("ad3_raw", 1.0),
    ("ad1_v", 1000.0),
    ("ad2_v", 1000.0),
    ("battery_raw", 1.0),
    ("power_raw", 1.0),
    ("battery_v", 1000.0),
    ("power_v", 1000.0),
    ("rtc_v", 1000.0),
    ("mcu_v", 1000.0),
    ("gps_v", 1000.0),
];

/// Message kinds as stored (index = kind byte).
pub(crate) const KINDS: [&str; 4] = ["AAA", "AFF", "CCE", "CCC"];

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(b: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos)?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Pack the values (index into [`PACKED_FIELDS`], value) of one fix.
pub fn pack(kind: MessageKind, values: &[(usize, i64)]) -> Vec<u8> {
    let mut all = [None; PACKED_FIELDS.len()];
    for &(i, v) in values {
        if let Some(slot) = all.get_mut(i) {
            *slot = Some(v);
        }
    }
    pack_all(kind, &all)
}

/// [`pack`] from every field's value in [`PACKED_FIELDS`] order (no intermediate list:
/// this runs for every fix).
fn pack_all(kind: MessageKind, all: &[Option<i64>; PACKED_FIELDS.len()]) -> Vec<u8> {
    let kind_byte = match kind {
        MessageKind::Aaa => 0,
        MessageKind::Aff => 1,
        MessageKind::Cce => 2,
        MessageKind::Ccc => 3,
        _ => 255,
    };
    pack_values(kind_byte, all)
}

/// The packed layout of a message-kind byte and every value in [`PACKED_FIELDS`] order.
pub(crate) fn pack_values(kind_byte: u8, all: &[Option<i64>; PACKED_FIELDS.len()]) -> Vec<u8> {
    let mut out = Vec::with_capacity(48);
    out.push(PACKED_VERSION);
    out.push(kind_byte);
    let bitmap = all
        .iter()
        .enumerate()
        .fold(0u64, |m, (i, v)| if v.is_some() { m | 1 << i } else { m });
    put_varint(&mut out, bitmap);
    for v in all.iter().flatten() {
        put_varint(&mut out, ((v << 1) ^ (v >> 63)) as u64); // zigzag
    }
    out
}

/// Unpack `d` into its message-kind byte and every value in [`PACKED_FIELDS`] order.
/// `None` for a layout this version does not know or a damaged value.
pub(crate) fn unpack_values(d: &[u8]) -> Option<(u8, [Option<i64>; PACKED_FIELDS.len()])> {
    if d.first() != Some(&PACKED_VERSION) {
        return None;
    }
    let kind = *d.get(1)?;
    let mut pos = 2;
    let bitmap = get_varint(d, &mut pos)?;
    if bitmap >> PACKED_FIELDS.len() != 0 {
        return None;
    }
    let mut values = [None; PACKED_FIELDS.len()];
    for (i, slot) in values.iter_mut().enumerate() {
        if bitmap & (1 << i) != 0 {
            let z = get_varint(d, &mut pos)?;
            *slot = Some(((z >> 1) as i64) ^ -((z & 1) as i64));
        }
    }
    (pos == d.len()).then_some((kind, values))
}

/// Unpack `d`: the message type and the present values as (index, value). `None` for a
/// layout this version does not know or a damaged value.
pub fn unpack(d: &[u8]) -> Option<(&'static str, Vec<(usize, i64)>)> {
    let (kind, values) = unpack_values(d)?;
    let kind = KINDS.get(usize::from(kind)).copied().unwrap_or("OTHER");
    let present = values
        .iter()
        .enumerate()
        .filter_map(|(i, v)| v.map(|v| (i, v)))
        .collect();
    Some((kind, present))
}

/// What recognises a fix sent again (a batch resent after its ACK was lost): the first 8
/// bytes of SHA-256 over its fix time, packed values and extras (exactly the content
/// [`crate::store::row::Row::is_resend_of`] compares), as a signed little-endian integer.
/// The append script keeps the digests of the tail's fixes in a set (`tg:{P}:seen`: an
/// integer set, about 9 B and 0.2 µs a fix) and stores a fix whose digest is there no
/// second time; sealing removes them with the entries. An unkeyed hash is fine here: it
/// identifies content within one device's tail, never a device or a person.
pub fn resend_digest(fix_time_s: i64, packed: &[u8], extras: Option<&[u8]>) -> i64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(fix_time_s.to_le_bytes());
    h.update((packed.len() as u64).to_le_bytes());
    h.update(packed);
    if let Some(x) = extras {
        h.update([1]);
        h.update(x);
    }
    let d = h.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&d[..8]);
    i64::from_le_bytes(out)
}

/// A fix as written to its stream: (field, value) pairs in a fixed order. Owned, so it
/// can cross the write queue while the frame's buffer is reused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFix {
    /// Fix time, Unix seconds (also in `fields` as `t`): retention checks it at ingest.
    pub fix_time_s: Option<i64>,
    /// At most three fields (`t`, `d`, `x`; `t`, `e` once sealed), kept inline: one
    /// allocation less per fix.
    pub fields: smallvec::SmallVec<[(&'static str, FieldValue); 3]>,
    /// The resend digest, computed before [`StoredFix::sealed`] hid the values.
    digest: Option<i64>,
}

/// Field name of the fix time (Unix seconds).
pub const F_TIME: &str = "t";
/// Field name of the packed values.
pub const F_PACKED: &str = "d";
/// Field name of the extras (JSON).
pub const F_EXTRAS: &str = "x";
/// Field name of the sealed payload ([`StoredFix::sealed`]): `d` and `x` in an envelope.
pub const F_SEALED: &str = "e";

/// The plaintext of a sealed tail payload: LEB128 length of `d`, `d`, then `x` (if any).
pub(crate) fn sealed_plaintext(packed: &[u8], extras: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + packed.len() + extras.map_or(0, <[u8]>::len));
    put_varint(&mut out, packed.len() as u64);
    out.extend_from_slice(packed);
    out.extend_from_slice(extras.unwrap_or_default());
    out
}

/// [`sealed_plaintext`] split again into `d` and `x`; `None` if it is malformed.
pub(crate) fn split_sealed_plaintext(plain: &[u8]) -> Option<(&[u8], Option<&[u8]>)> {
    let mut pos = 0;
    let n = usize::try_from(get_varint(plain, &mut pos)?).ok()?;
    let d = plain.get(pos..pos.checked_add(n)?)?;
    let x = &plain[pos + n..];
    Some((d, (!x.is_empty()).then_some(x)))
}

/// What a sealed tail payload's additional data binds besides the device: its fix time as
/// stored in `t`, or `-` without one.
pub(crate) fn tail_bind(fix_time_s: Option<i64>) -> Vec<u8> {
    fix_time_s.map_or_else(|| b"-".to_vec(), |t| t.to_string().into_bytes())
}

impl StoredFix {
    /// Lay out `fix` (from a message of `kind`) for storage.
    pub fn from_fix(kind: MessageKind, fix: &Fix<'_>) -> StoredFix {
        let fix_time_s = fix.time.map(|t| t.as_second());
        let a = &fix.analog;
        let all: [Option<i64>; 30] = [
            fix.event.map(i64::from),
            fix.valid.map(i64::from),
            fix.lat_e6.map(i64::from),
            fix.lon_e6.map(i64::from),
            fix.speed_kmh_x10.map(i64::from),
            fix.course_deg.map(i64::from),
            fix.altitude_m.map(i64::from),
            fix.satellites.map(i64::from),
            fix.hdop_x10.map(i64::from),
            fix.gsm_signal.map(i64::from),
            fix.mileage_m.and_then(|v| i64::try_from(v).ok()),
            fix.runtime_s.and_then(|v| i64::try_from(v).ok()),
            fix.cell.map(|c| i64::from(c.mcc)),
            fix.cell.map(|c| i64::from(c.mnc)),
            fix.cell.map(|c| i64::from(c.lac)),
            fix.cell.map(|c| i64::from(c.cell_id)),
            fix.inputs.map(i64::from),
            fix.outputs.map(i64::from),
            a.adc_raw[0].map(i64::from),
            a.adc_raw[1].map(i64::from),
            a.adc_raw[2].map(i64::from),
            a.adc_mv[0].map(i64::from),
            a.adc_mv[1].map(i64::from),
            a.battery_raw.map(i64::from),
            a.power_raw.map(i64::from),
            a.battery_mv.map(i64::from),
            a.power_mv.map(i64::from),
            a.rtc_mv.map(i64::from),
            a.mcu_mv.map(i64::from),
            a.gps_mv.map(i64::from),
        ];
        let mut fields = smallvec::SmallVec::new();
        if let Some(t) = fix_time_s {
            fields.push((F_TIME, FieldValue::Int(t)));
        }
        fields.push((F_PACKED, FieldValue::Bytes(pack_all(kind, &all))));
        if let Some(x) = trackgate_protocols::json::extras_json(fix) {
            fields.push((F_EXTRAS, FieldValue::Text(x.to_string())));
        }
        StoredFix {
            fix_time_s,
            fields,
            digest: None,
        }
    }

    /// The bytes of field `name` as stored (none for an integer field).
    fn field_bytes(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| match v {
                FieldValue::Bytes(b) => b.as_slice(),
                FieldValue::Text(t) => t.as_bytes(),
                FieldValue::Int(_) => &[][..],
            })
    }

    /// Seal the payload (`d`, `x`) for device `p` with the data key of `month` (the month
    /// it is received in; see [`crate::store::vault`]): the entry keeps `t` in clear (the
    /// scripts trim and purge by it) and gets `e`. Its resend digest is kept first.
    pub fn sealed(
        mut self,
        vault: &crate::store::vault::Vault,
        p: &crate::pseudonym::Pseudonym,
        month: crate::store::vault::Month,
    ) -> Result<StoredFix, crate::store::vault::VaultError> {
        let digest = self.resend_digest();
        let plain = sealed_plaintext(
            self.field_bytes(F_PACKED).unwrap_or_default(),
            self.field_bytes(F_EXTRAS),
        );
        let mut envelope = Vec::with_capacity(plain.len() + crate::store::vault::OVERHEAD);
        vault.seal_into(
            crate::store::vault::Purpose::Tail,
            p,
            &tail_bind(self.fix_time_s),
            month,
            &plain,
            &mut envelope,
        )?;
        self.fields.retain(|(n, _)| *n == F_TIME);
        self.fields.push((F_SEALED, FieldValue::Bytes(envelope)));
        self.digest = digest;
        Ok(self)
    }

    /// Replace the device's own IMEI wherever a device-supplied extra repeats it (some
    /// firmware echoes it in free-text parameters, file names or raw parameters): the raw
    /// IMEI must not reach storage by that back door either. Extras are JSON: a text
    /// value loses the digits, a raw (hex) value the bytes of the digits, a number that
    /// contains them becomes the string `"<imei>"`; the result is still valid JSON.
    pub fn scrubbed(self, imei: &Imei) -> StoredFix {
        self.scrubbed_with(imei.expose(), &hex::encode(imei.expose()))
    }

    /// [`StoredFix::scrubbed`] with the IMEI's digits and their hex already at hand (a
    /// connection makes them once, not per fix).
    pub fn scrubbed_with(mut self, digits: &str, hex_digits: &str) -> StoredFix {
        for (name, v) in &mut self.fields {
            let FieldValue::Text(t) = v else {
                continue;
            };
            // Cheap test first: this runs for every fix with extras.
            if !t.contains(digits) && !t.contains(hex_digits) {
                continue;
            }
            *t = match serde_json::from_str::<serde_json::Value>(t) {
                Ok(mut value) if *name == F_EXTRAS => {
                    scrub_json(&mut value, digits, hex_digits);
                    value.to_string()
                }
                _ => t
                    .replace(digits, "<imei>")
                    .replace(hex_digits, SCRUBBED_HEX),
            };
        }
        self
    }

    /// The fix's resend digest ([`resend_digest`]) from its stored fields; `None` without
    /// a fix time.
    pub fn resend_digest(&self) -> Option<i64> {
        if self.digest.is_some() {
            return self.digest;
        }
        let t = self.fix_time_s?;
        Some(resend_digest(
            t,
            self.field_bytes(F_PACKED).unwrap_or_default(),
            self.field_bytes(F_EXTRAS),
        ))
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
    fn the_devices_imei_is_scrubbed_from_raw_and_numeric_extras()
    -> Result<(), Box<dyn std::error::Error>> {
        let imei = Imei::new("350000000000001").ok_or("imei")?;
        let mut fix = Fix::default();
        // A file name that is not UTF-8 is kept as raw bytes (hex in the JSON).
        fix.push_extra(
            ExtraKey::Named("file_name"),
            ExtraValue::Bytes(b"350000000000001_\xff.jpg"),
        );
        fix.push_extra(
            ExtraKey::Named("serial"),
            ExtraValue::Int(350_000_000_000_001),
        );
        fix.push_extra(ExtraKey::Named("battery_pct"), ExtraValue::Int(96));
        let s = StoredFix::from_fix(MessageKind::Cce, &fix).scrubbed(&imei);
        let x = s
            .fields
            .iter()
            .find_map(|(n, v)| match v {
                FieldValue::Text(t) if *n == F_EXTRAS => Some(t.clone()),
                _ => None,
            })
            .ok_or("extras")?;
        let hex = hex::encode("350000000000001");
        assert!(!x.contains("350000000000001") && !x.contains(&hex), "{x}");
        let v: serde_json::Value = serde_json::from_str(&x)?;
        assert_eq!(v["serial"], "<imei>");
        assert_eq!(v["battery_pct"], 96, "other values untouched");
        let file_name = v["file_name"].as_str().unwrap_or_default();
        assert!(file_name.starts_with(SCRUBBED_HEX), "{x}");
        Ok(())
    }

    #[test]
    fn fix_is_time_packed_values_and_extras() {
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
        let names: Vec<&str> = s.fields.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["t", "d", "x"]);
        let FieldValue::Bytes(d) = &s.fields[1].1 else {
            panic!("d is bytes")
        };
        let (kind, values) = unpack(d).unwrap();
        assert_eq!(kind, "CCE");
        let name = |i: usize| PACKED_FIELDS[i].0;
        let got: Vec<(&str, i64)> = values.iter().map(|&(i, v)| (name(i), v)).collect();
        assert_eq!(
            got,
            [
                ("lat", -27_257_698),
                ("lon", 153_030_471),
                ("mcc", 505),
                ("mnc", 1),
                ("lac", 7),
                ("cell_id", 9)
            ]
        );
        assert_eq!(
            s.fields[2].1,
            FieldValue::Text(r#"{"battery_pct":96}"#.into())
        );
        assert!(d.len() < 20, "compact: {} bytes", d.len());
    }

    #[test]
    fn pack_round_trips_extremes_and_rejects_damage() {
        let values: Vec<(usize, i64)> = vec![
            (0, 0),
            (2, -90_000_000),
            (3, 180_000_000),
            (10, i64::MAX),
            (11, i64::MIN),
            (29, 1),
        ];
        let d = pack(MessageKind::Ccc, &values);
        assert_eq!(unpack(&d), Some(("CCC", values.clone())));
        assert_eq!(unpack(&d[..d.len() - 1]), None, "truncated");
        let mut longer = d.clone();
        longer.push(0);
        assert_eq!(unpack(&longer), None, "trailing bytes");
        assert_eq!(unpack(&[9, 0, 0]), None, "unknown version");
    }
}
