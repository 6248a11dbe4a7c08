//! CCE: compressed binary batches of newer firmware. Protocol notes §3.
//!
//! ```text
//! u32 records still cached, u16 packet count,
//! per packet: u16 length of the rest, u16 index, then four parameter groups
//!   (1-, 2-, 4-byte values, then id + u8 length + bytes), each led by a u8 count.
//! ```
//! Parameter ids are one byte, or two (big-endian) when the first is `0xFE`. Unknown ids
//! are kept as raw extras; groups running past the packet's length are an error.

use jiff::Timestamp;

use crate::binary::Cursor;
use crate::error::DecodeError;
use crate::record::{Cell, EPOCH_2000_UNIX_S, ExtraKey, ExtraValue, Fix};

/// Decode the payload: good packets go to `fixes`, bad ones to `rejected`.
///
/// Only a broken batch header fails the whole message. A packet whose content does not
/// decode is skipped by its own length and reported, so one bad record cannot make the
/// batch unconfirmable (the device would resend it, and everything cached behind it,
/// forever). A packet whose length runs past the payload ends the batch: nothing after
/// it can be located. Returns (records still cached, packets the header declares).
pub(crate) fn decode<'a>(
    payload: &'a [u8],
    fixes: &mut Vec<Fix<'a>>,
    rejected: &mut Vec<DecodeError>,
) -> Result<(u32, u32), DecodeError> {
    let mut c = Cursor::new(payload, 0);
    let cached = c.u32("cce.cached_records")?;
    let count = c.u16("cce.packet_count")?;
    // Each packet takes at least 2 + 2 + 4 bytes: never reserve more than the bytes allow.
    fixes.reserve(usize::from(count).min(c.remaining() / 8));
    for _ in 0..count {
        let body = c
            .u16("cce.packet_length")
            .and_then(|len| c.bytes(usize::from(len), "cce.packet"));
        let (body, at) = match body {
            Ok(body) => (body, c.offset() - body.len()),
            Err(e) => {
                rejected.push(e);
                return Ok((cached, u32::from(count)));
            }
        };
        match packet(&mut Cursor::new(body, at)) {
            Ok(fix) => fixes.push(fix),
            Err(DecodeError::Truncated { field, offset }) => {
                rejected.push(DecodeError::Overrun { field, offset })
            }
            Err(e) => rejected.push(e),
        }
    }
    if c.remaining() > 0 {
        rejected.push(DecodeError::Syntax {
            field: "cce.trailing",
            offset: c.offset(),
            expected: "end of payload after the declared packets",
        });
    }
    Ok((cached, u32::from(count)))
}

fn param_id(p: &mut Cursor<'_>, field: &'static str) -> Result<u16, DecodeError> {
    if p.peek_u8() == Some(0xFE) {
        p.u16_be(field)
    } else {
        p.u8(field).map(u16::from)
    }
}

fn packet<'a>(p: &mut Cursor<'a>) -> Result<Fix<'a>, DecodeError> {
    let mut fix = Fix::default();
    let _index = p.u16("cce.packet_index")?;

    for _ in 0..p.u8("cce.group1_count")? {
        let id = param_id(p, "cce.group1_id")?;
        let v = p.u8("cce.group1_value")?;
        one_byte(&mut fix, id, v);
    }
    for _ in 0..p.u8("cce.group2_count")? {
        let id = param_id(p, "cce.group2_id")?;
        let v = p.u16("cce.group2_value")?;
        two_byte(&mut fix, id, v);
    }
    for _ in 0..p.u8("cce.group3_count")? {
        let id = param_id(p, "cce.group3_id")?;
        let at = p.offset();
        let v = p.u32("cce.group3_value")?;
        four_byte(&mut fix, id, v, at)?;
    }
    for _ in 0..p.u8("cce.group4_count")? {
        let id = param_id(p, "cce.group4_id")?;
        let len = p.u8("cce.group4_length")?;
        let bytes = p.bytes(usize::from(len), "cce.group4_value")?;
        variable(&mut fix, id, bytes);
    }
    Ok(fix)
}

fn named(fix: &mut Fix<'_>, name: &'static str, v: i64) {
    fix.push_extra(ExtraKey::Named(name), ExtraValue::Int(v));
}

fn decimal(fix: &mut Fix<'_>, name: &'static str, value: i64, scale: u8) {
    fix.push_extra(ExtraKey::Named(name), ExtraValue::Decimal { value, scale });
}

fn one_byte(fix: &mut Fix<'_>, id: u16, v: u8) {
    match id {
        0x01 => fix.event = Some(u16::from(v)),
        0x05 => fix.valid = Some(v > 0),
        0x06 => fix.satellites = Some(v),
        0x07 => fix.gsm_signal = Some(v),
        0x14 => fix.outputs = Some(v),
        0x15 => fix.inputs = Some(v),
        0x47 => named(fix, "lock_state", i64::from(v)),
        0x97 => named(fix, "throttle_pct", i64::from(v)),
        0x9D => named(fix, "fuel_level_pct", i64::from(v)),
        0xFE69 => named(fix, "battery_pct", i64::from(v)),
        _ => fix.push_extra(ExtraKey::CceParam(id), ExtraValue::Int(i64::from(v))),
    }
}

fn two_byte(fix: &mut Fix<'_>, id: u16, v: u16) {
    let mv = u32::from(v) * 10; // value is volts × 100
    match id {
        0x08 => fix.speed_kmh_x10 = Some(u32::from(v) * 10),
        0x09 => fix.course_deg = Some(v),
        0x0A => fix.hdop_x10 = Some(v),
        0x0B => fix.altitude_m = Some(i32::from(v as i16)),
        0x16 => fix.analog.adc_mv[0] = Some(mv),
        0x17 => fix.analog.adc_mv[1] = Some(mv),
        0x19 => fix.analog.battery_mv = Some(mv),
        0x1A => fix.analog.power_mv = Some(mv),
        0x29 => decimal(fix, "fuel_pct", i64::from(v), 2),
        0x40 => fix.event = Some(v),
        0x91 | 0x92 => named(fix, "obd_speed_kmh", i64::from(v)),
        0x98 => named(fix, "fuel_used", i64::from(v)),
        0x99 => named(fix, "rpm", i64::from(v)),
        0x9C => named(fix, "coolant_temp_c", i64::from(v)),
        0x9F => named(fix, "obd_temp_c", i64::from(v)),
        0xC9 => named(fix, "fuel_consumption", i64::from(v)),
        _ => fix.push_extra(ExtraKey::CceParam(id), ExtraValue::Int(i64::from(v))),
    }
}

fn four_byte(fix: &mut Fix<'_>, id: u16, v: u32, at: usize) -> Result<(), DecodeError> {
    match id {
        0x02 => {
            let lat = v as i32;
            if !(-90_000_000..=90_000_000).contains(&lat) {
                return Err(DecodeError::OutOfRange {
                    field: "cce.latitude",
                    offset: at,
                });
            }
            fix.lat_e6 = Some(lat);
        }
        0x03 => {
            let lon = v as i32;
            if !(-180_000_000..=180_000_000).contains(&lon) {
                return Err(DecodeError::OutOfRange {
                    field: "cce.longitude",
                    offset: at,
                });
            }
            fix.lon_e6 = Some(lon);
        }
        0x04 => {
            // EPOCH_2000 + u32::MAX is far inside Timestamp's range, so this cannot fail.
            fix.time = Timestamp::from_second(EPOCH_2000_UNIX_S + i64::from(v)).ok();
        }
        0x0C => fix.mileage_m = Some(u64::from(v)),
        0x0D => fix.runtime_s = Some(u64::from(v)),
        0x25 => named(fix, "driver_id", i64::from(v)),
        0x9B => named(fix, "obd_odometer_m", i64::from(v)),
        0xA0 => decimal(fix, "fuel_used_l", i64::from(v), 3),
        0xA2 => decimal(fix, "fuel_consumption", i64::from(v), 2),
        0xFEF4 => named(fix, "engine_minutes", i64::from(v)),
        _ => fix.push_extra(ExtraKey::CceParam(id), ExtraValue::Int(i64::from(v))),
    }
    Ok(())
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// A base-station entry: u16 MCC, u16 MNC, u16 LAC, then a u16 CI (8 bytes) or a u32 CI
/// (10 bytes) optionally followed by an i16 signal (12 bytes).
fn cell_entry(b: &[u8]) -> Option<(Cell, Option<i16>)> {
    let cell_id = match b.len() {
        8 => u32::from(le16(b, 6)),
        10.. => u32::from_le_bytes([b[6], b[7], b[8], b[9]]),
        _ => return None,
    };
    let signal = (b.len() >= 12).then(|| le16(b, 10) as i16);
    Some((
        Cell {
            mcc: le16(b, 0),
            mnc: le16(b, 2),
            lac: u32::from(le16(b, 4)),
            cell_id,
        },
        signal,
    ))
}

fn variable<'a>(fix: &mut Fix<'a>, id: u16, b: &'a [u8]) {
    match (id, b.len()) {
        (0x0E, _) if cell_entry(b).is_some() => {
            if let Some((cell, signal)) = cell_entry(b) {
                fix.cell = Some(cell);
                if let Some(s) = signal {
                    named(fix, "cell_signal_dbm", i64::from(s));
                }
            }
        }
        (0x0F..=0x13, _) if cell_entry(b).is_some() => {
            if let Some((cell, signal_dbm)) = cell_entry(b) {
                fix.push_extra(
                    ExtraKey::Indexed("cell", (id - 0x0E + 1) as u8),
                    ExtraValue::Cell { cell, signal_dbm },
                );
            }
        }
        (0x1D..=0x25, 8) => {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&b[..6]);
            fix.push_extra(
                ExtraKey::Indexed("wifi", (id - 0x1D + 1) as u8),
                ExtraValue::Wifi {
                    mac,
                    rssi_dbm: le16(b, 6) as i16,
                },
            );
        }
        (0x2A..=0x31, 3) => {
            // A label byte, then the temperature in 0.01 °C.
            fix.push_extra(
                ExtraKey::Indexed("temp_c", (id - 0x2A + 1) as u8),
                ExtraValue::Decimal {
                    value: i64::from(le16(b, 1) as i16),
                    scale: 2,
                },
            );
        }
        (0xFE31, 2..) => {
            named(fix, "alarm_protocol", i64::from(b[0]));
            named(fix, "alarm_type", i64::from(b[1]));
            if b.len() > 2 {
                let value = match std::str::from_utf8(&b[2..]) {
                    Ok(s) => ExtraValue::Text(s),
                    Err(_) => ExtraValue::Bytes(&b[2..]),
                };
                fix.push_extra(ExtraKey::Named("file_name"), value);
            }
        }
        (0xFE73, _) => fix.push_extra(ExtraKey::Named("ble_tag"), ExtraValue::Bytes(b)),
        (0xFEA8, 7..) => {
            // Three (present, level) pairs, then an alert byte.
            for k in 0..3u8 {
                let (present, level) = (b[usize::from(k) * 2], b[usize::from(k) * 2 + 1]);
                if present > 0 {
                    // Named apart from 0xFE69's `battery_pct` (the device's own battery):
                    // a packet may carry both.
                    let key = ExtraKey::Indexed("pack_pct", k + 1);
                    fix.push_extra(key, ExtraValue::Int(i64::from(level)));
                }
            }
            named(fix, "battery_alert", i64::from(b[6]));
        }
        _ => fix.push_extra(ExtraKey::CceParam(id), ExtraValue::Bytes(b)),
    }
}
