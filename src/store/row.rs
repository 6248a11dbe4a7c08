//! A stored fix, decoded: what a live-tail entry and a history chunk row both turn into,
//! and what export, purge, retention and compaction work on.
//!
//! Invariants:
//! * A row holds exactly what the tail entry held (entry id, `t`, the packed values with
//!   their message-kind byte, the extras' text byte for byte), so a tail entry sealed into
//!   a chunk exports identically.
//! * [`Row::time`] (the row's *time*) orders, ranges and expires history: the fix time when
//!   it is plausible, else the receive time (see [`effective_time`]). It is computed once,
//!   when a tail entry is read, and stored in the chunk, so a later change of the
//!   tolerance never reorders sealed history.

use serde_json::{Map, Value, json};

use super::fix::{
    F_EXTRAS, F_PACKED, F_SEALED, F_TIME, KINDS, PACKED_FIELDS, pack_values,
    split_sealed_plaintext, tail_bind, unpack_values,
};
use super::vault::{Purpose, Vault};
use crate::pseudonym::Pseudonym;

/// Number of packed values per row (see [`PACKED_FIELDS`]).
pub const VALUES: usize = PACKED_FIELDS.len();

/// One stored fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Receive time, Unix ms (the tail entry id's first part).
    pub recv_ms: i64,
    /// The tail entry id's sequence part: with `recv_ms` the fix's stable id.
    pub seq: u64,
    /// The row's time, Unix s: see [`effective_time`].
    pub time: i64,
    /// The fix time the device reported, Unix s.
    pub fix_time_s: Option<i64>,
    /// Message-kind byte of the packed layout (0 AAA, 1 AFF, 2 CCE, 3 CCC, else other).
    pub kind: u8,
    /// The packed values, in [`PACKED_FIELDS`] order.
    pub values: [Option<i64>; VALUES],
    /// Protocol-specific extras, compact JSON text as stored.
    pub extras: Option<Vec<u8>>,
}

/// Why a tail entry could not be read as a row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    #[error("entry id is not <ms>-<seq>")]
    Id,
    #[error("fix time field is not an integer")]
    Time,
    #[error("packed values missing, of an unknown layout version, or damaged")]
    Packed,
    #[error("sealed payload: {0}")]
    Sealed(#[from] super::vault::VaultError),
}

impl RowError {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            RowError::Id => "id",
            RowError::Time => "time",
            RowError::Packed => "packed",
            RowError::Sealed(e) => e.label(),
        }
    }
}

/// The time a row is ordered, ranged and expired by: the fix time, unless it lies more
/// than `future_tolerance_s` after the receive time (a device clock far ahead: trusting it
/// would keep the fix past its retention), or is missing; then the receive time.
pub fn effective_time(fix_time_s: Option<i64>, recv_ms: i64, future_tolerance_s: i64) -> i64 {
    let recv_s = recv_ms.div_euclid(1000);
    match fix_time_s {
        Some(t) if t <= recv_s.saturating_add(future_tolerance_s) => t,
        _ => recv_s,
    }
}

/// Split a stream entry id `<ms>-<seq>`.
pub fn parse_id(id: &str) -> Option<(i64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

impl Row {
    /// Read a tail entry (`id`, fields as stored) of device `p`: a sealed payload (`e`) is
    /// opened with `vault`; clear `d` and `x` (entries written before payloads were
    /// sealed) are read as they are.
    pub fn from_entry(
        id: &str,
        fields: &[(String, Vec<u8>)],
        future_tolerance_s: i64,
        vault: &Vault,
        p: &Pseudonym,
    ) -> Result<Row, RowError> {
        let (recv_ms, seq) = parse_id(id).ok_or(RowError::Id)?;
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v);
        let fix_time_s = match get(F_TIME) {
            None => None,
            Some(v) => Some(
                std::str::from_utf8(v)
                    .ok()
                    .and_then(|v| v.parse::<i64>().ok())
                    .ok_or(RowError::Time)?,
            ),
        };
        let opened;
        let (d, x) = match get(F_SEALED) {
            Some(e) => {
                opened = vault.open(Purpose::Tail, p, &tail_bind(fix_time_s), e)?;
                split_sealed_plaintext(&opened).ok_or(RowError::Packed)?
            }
            None => (
                get(F_PACKED).ok_or(RowError::Packed)?.as_slice(),
                get(F_EXTRAS).map(Vec::as_slice),
            ),
        };
        let (kind, values) = unpack_values(d).ok_or(RowError::Packed)?;
        Ok(Row {
            recv_ms,
            seq,
            time: effective_time(fix_time_s, recv_ms, future_tolerance_s),
            fix_time_s,
            kind,
            values,
            extras: x.map(<[u8]>::to_vec),
        })
    }

    /// The tail entry's id, `<recv_ms>-<seq>`: the fix's stable id, kept through sealing.
    pub fn id(&self) -> String {
        format!("{}-{}", self.recv_ms, self.seq)
    }

    /// The packed layout `d` again, byte for byte as the tail held it.
    pub fn packed(&self) -> Vec<u8> {
        pack_values(self.kind, &self.values)
    }

    /// The resend digest of this row (see [`super::fix::resend_digest`]); `None` without a
    /// fix time.
    pub fn resend_digest(&self) -> Option<i64> {
        let t = self.fix_time_s?;
        Some(super::fix::resend_digest(
            t,
            &self.packed(),
            self.extras.as_deref(),
        ))
    }

    /// Order of rows in history: time, then receive time, then sequence.
    pub fn order_key(&self) -> (i64, i64, u64) {
        (self.time, self.recv_ms, self.seq)
    }

    /// Whether `other` is the same fix sent again (a batch resent after its ACK was lost):
    /// same reported fix time and the same content. Fixes without a fix time are never
    /// taken for duplicates (two identical heartbeats are two heartbeats).
    pub fn is_resend_of(&self, other: &Row) -> bool {
        // Position first: fixes of one second differ there, and that ends the comparison
        // before the 30 values are compared.
        self.fix_time_s.is_some()
            && self.fix_time_s == other.fix_time_s
            && self.values[2..4] == other.values[2..4]
            && self.kind == other.kind
            && self.values == other.values
            && self.extras == other.extras
    }

    /// The JSON record export writes (the names and units `trackgate decode` prints).
    pub fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        if let Some(t) = self
            .fix_time_s
            .and_then(|t| jiff::Timestamp::from_second(t).ok())
        {
            m.insert("time".into(), json!(t.to_string()));
        }
        if let Ok(r) = jiff::Timestamp::from_millisecond(self.recv_ms) {
            m.insert("received_at".into(), json!(r.to_string()));
        }
        let kind = KINDS
            .get(usize::from(self.kind))
            .copied()
            .unwrap_or("OTHER");
        m.insert("type".into(), json!(kind));
        for (i, v) in self.values.iter().enumerate() {
            let Some(v) = *v else { continue };
            let (name, div) = PACKED_FIELDS[i];
            let value = match name {
                "valid" => json!(v != 0),
                _ if div == 1.0 => json!(v),
                _ => json!(v as f64 / div),
            };
            m.insert(name.into(), value);
        }
        if let Some(x) = self
            .extras
            .as_ref()
            .and_then(|x| serde_json::from_slice::<Value>(x).ok())
        {
            m.insert("extra".into(), x);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fix::{FieldValue, PACKED_VERSION, StoredFix};
    use trackgate_protocols::{ExtraKey, ExtraValue, Fix, MessageKind};

    fn as_fields(s: &StoredFix) -> Vec<(String, Vec<u8>)> {
        s.fields
            .iter()
            .map(|(k, v)| {
                let bytes = match v {
                    FieldValue::Int(i) => i.to_string().into_bytes(),
                    FieldValue::Text(t) => t.clone().into_bytes(),
                    FieldValue::Bytes(b) => b.clone(),
                };
                (k.to_string(), bytes)
            })
            .collect()
    }

    fn ring() -> crate::pseudonym::KeyRing {
        crate::pseudonym::KeyRing::ephemeral()
    }

    fn device(c: &str) -> Pseudonym {
        Pseudonym::parse(&format!("p1_{}", c.repeat(26))).unwrap_or_else(|| unreachable!())
    }

    #[test]
    fn a_tail_entry_reads_back_to_the_same_packed_bytes_and_extras()
    -> Result<(), Box<dyn std::error::Error>> {
        let mut fix = Fix {
            time: jiff::Timestamp::from_second(1_700_000_000).ok(),
            lat_e6: Some(-27_257_698),
            lon_e6: Some(153_030_471),
            mileage_m: Some(u64::MAX),
            ..Fix::default()
        };
        fix.push_extra(ExtraKey::Named("battery_pct"), ExtraValue::Int(96));
        let stored = StoredFix::from_fix(MessageKind::Ccc, &fix);
        let fields = as_fields(&stored);
        let (ring, p) = (ring(), device("a"));
        let row = Row::from_entry("1700000000123-7", &fields, 3600, ring.vault(), &p)?;
        assert_eq!(
            (row.recv_ms, row.seq, row.time),
            (1_700_000_000_123, 7, 1_700_000_000)
        );
        assert_eq!(row.id(), "1700000000123-7");
        let d = fields
            .iter()
            .find(|(k, _)| k == "d")
            .map(|(_, v)| v.clone());
        assert_eq!(Some(row.packed()), d);
        assert_eq!(row.extras.as_deref(), Some(&br#"{"battery_pct":96}"#[..]));
        assert_eq!(row.to_json()["type"], "CCC");
        // Sealed: `t` in clear, `d` and `x` in one envelope that reads back the same row
        // for this device only, with this fix time only.
        let month = super::super::vault::Month::now();
        let sealed = StoredFix::from_fix(MessageKind::Ccc, &fix).sealed(ring.vault(), &p, month)?;
        assert_eq!(
            sealed.resend_digest(),
            stored.resend_digest(),
            "digest of the clear values"
        );
        let sealed_fields = as_fields(&sealed);
        let names: Vec<&str> = sealed_fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["t", "e"]);
        let again = Row::from_entry("1700000000123-7", &sealed_fields, 3600, ring.vault(), &p)?;
        assert_eq!(again, row);
        assert!(matches!(
            Row::from_entry(
                "1700000000123-7",
                &sealed_fields,
                3600,
                ring.vault(),
                &device("b")
            ),
            Err(RowError::Sealed(super::super::vault::VaultError::Forged))
        ));
        let mut moved = sealed_fields.clone();
        moved[0].1 = b"1700000001".to_vec();
        assert!(
            matches!(
                Row::from_entry("1700000000123-7", &moved, 3600, ring.vault(), &p),
                Err(RowError::Sealed(super::super::vault::VaultError::Forged))
            ),
            "the fix time is bound"
        );
        Ok(())
    }

    #[test]
    fn a_fix_time_far_ahead_of_its_receipt_is_not_trusted() {
        assert_eq!(
            effective_time(Some(100), 50_000, 60),
            100,
            "within tolerance"
        );
        assert_eq!(effective_time(Some(200), 50_000, 60), 50, "too far ahead");
        assert_eq!(effective_time(None, 50_999, 60), 50, "no fix time");
        assert_eq!(effective_time(Some(-5), -1, 0), -5);
    }

    #[test]
    fn damaged_entries_are_typed_errors() {
        let (ring, p) = (ring(), device("a"));
        let v = ring.vault();
        let ok = vec![("d".to_string(), vec![PACKED_VERSION, 0, 0])];
        assert!(Row::from_entry("1-0", &ok, 0, v, &p).is_ok());
        assert_eq!(Row::from_entry("x", &ok, 0, v, &p), Err(RowError::Id));
        let bad_t = vec![("t".to_string(), b"abc".to_vec()), ok[0].clone()];
        assert_eq!(
            Row::from_entry("1-0", &bad_t, 0, v, &p),
            Err(RowError::Time)
        );
        let bad_d = vec![("d".to_string(), vec![9, 0, 0])];
        assert_eq!(
            Row::from_entry("1-0", &bad_d, 0, v, &p),
            Err(RowError::Packed)
        );
        let trailing = vec![("d".to_string(), vec![PACKED_VERSION, 0, 0, 0])];
        assert_eq!(
            Row::from_entry("1-0", &trailing, 0, v, &p),
            Err(RowError::Packed)
        );
    }

    #[test]
    fn a_resend_is_the_same_fix_time_and_content() {
        let a = Row {
            recv_ms: 1,
            seq: 0,
            time: 10,
            fix_time_s: Some(10),
            kind: 2,
            values: [Some(1); VALUES],
            extras: None,
        };
        let b = Row {
            recv_ms: 99,
            seq: 3,
            ..a.clone()
        };
        assert!(b.is_resend_of(&a));
        let other = Row {
            values: [Some(2); VALUES],
            ..b.clone()
        };
        assert!(!other.is_resend_of(&a));
        let untimed = Row {
            fix_time_s: None,
            ..a.clone()
        };
        assert!(!untimed.is_resend_of(&untimed.clone()));
    }
}
