//! JSON Lines rendering of decoded messages, as `trackgate decode` prints them.
//!
//! Field names and units follow the protocol notes §7; fields a message does not carry are
//! left out rather than written as `null` or 0.

use serde_json::{Map, Value, json};

use crate::framer::{Framer, Scan};
use crate::record::{ExtraValue, Fix, Message};
use crate::{DecodeError, FrameError, decode};

fn scaled(value: i64, scale: u8) -> Value {
    json!(value as f64 / 10f64.powi(i32::from(scale)))
}

fn millivolts(mv: u32) -> Value {
    json!(f64::from(mv) / 1000.0)
}

fn extra_value(v: &ExtraValue<'_>) -> Value {
    match *v {
        ExtraValue::Int(i) => json!(i),
        ExtraValue::Decimal { value, scale } => scaled(value, scale),
        ExtraValue::Bool(b) => json!(b),
        ExtraValue::Text(t) => json!(t),
        ExtraValue::Bytes(b) => json!(hex_string(b)),
        ExtraValue::Cell { cell, signal_dbm } => {
            let mut m =
                json!({"mcc": cell.mcc, "mnc": cell.mnc, "lac": cell.lac, "cell_id": cell.cell_id});
            if let (Some(s), Some(o)) = (signal_dbm, m.as_object_mut()) {
                o.insert("signal_dbm".into(), json!(s));
            }
            m
        }
        ExtraValue::Wifi { mac, rssi_dbm } => {
            let mac: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
            json!({"mac": mac.join(":"), "rssi_dbm": rssi_dbm})
        }
    }
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One fix as a JSON object.
pub fn fix_json(imei: &str, kind: &str, fix: &Fix<'_>) -> Value {
    let mut m = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.to_owned(), v);
        }
    };
    put("imei", Some(json!(imei)));
    put("type", Some(json!(kind)));
    put("event", fix.event.map(|v| json!(v)));
    put(
        "time",
        fix.time
            .map(|t| json!(t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())),
    );
    put("valid", fix.valid.map(|v| json!(v)));
    put("lat", fix.lat_e6.map(|v| scaled(i64::from(v), 6)));
    put("lon", fix.lon_e6.map(|v| scaled(i64::from(v), 6)));
    put(
        "speed_kmh",
        fix.speed_kmh_x10.map(|v| scaled(i64::from(v), 1)),
    );
    put("course_deg", fix.course_deg.map(|v| json!(v)));
    put("altitude_m", fix.altitude_m.map(|v| json!(v)));
    put("satellites", fix.satellites.map(|v| json!(v)));
    put("hdop", fix.hdop_x10.map(|v| scaled(i64::from(v), 1)));
    put("gsm_signal", fix.gsm_signal.map(|v| json!(v)));
    put("mileage_m", fix.mileage_m.map(|v| json!(v)));
    put("runtime_s", fix.runtime_s.map(|v| json!(v)));
    if let Some(c) = fix.cell {
        put("mcc", Some(json!(c.mcc)));
        put("mnc", Some(json!(c.mnc)));
        put("lac", Some(json!(c.lac)));
        put("cell_id", Some(json!(c.cell_id)));
    }
    put("inputs", fix.inputs.map(|v| json!(v)));
    put("outputs", fix.outputs.map(|v| json!(v)));
    let a = &fix.analog;
    for (i, v) in a.adc_raw.iter().enumerate() {
        put(&format!("ad{}_raw", i + 1), v.map(|v| json!(v)));
    }
    for (i, v) in a.adc_mv.iter().enumerate() {
        put(&format!("ad{}_v", i + 1), v.map(millivolts));
    }
    put("battery_raw", a.battery_raw.map(|v| json!(v)));
    put("power_raw", a.power_raw.map(|v| json!(v)));
    put("battery_v", a.battery_mv.map(millivolts));
    put("power_v", a.power_mv.map(millivolts));
    put("rtc_v", a.rtc_mv.map(millivolts));
    put("mcu_v", a.mcu_mv.map(millivolts));
    put("gps_v", a.gps_mv.map(millivolts));
    if let Some(extra) = extras_json(fix) {
        m.insert("extra".into(), extra);
    }
    Value::Object(m)
}

/// The fix's extras as one JSON object (`None` when it has none).
pub fn extras_json(fix: &Fix<'_>) -> Option<Value> {
    if fix.extras.is_empty() {
        return None;
    }
    let extra: Map<String, Value> = fix
        .extras
        .iter()
        .map(|e| (e.key.to_string(), extra_value(&e.value)))
        .collect();
    Some(Value::Object(extra))
}

/// The JSON lines for one decoded message: one per fix, or one `"position": false` line.
pub fn message_json(imei: &str, kind: &str, message: &Message<'_>) -> Vec<Value> {
    if message.kind.has_position() {
        message
            .fixes
            .iter()
            .map(|f| fix_json(imei, kind, f))
            .collect()
    } else {
        vec![json!({"imei": imei, "type": kind, "position": false})]
    }
}

/// An error line.
pub fn error_json(kind: &str, field: &str, offset: usize, detail: &str) -> Value {
    json!({"error": {"kind": kind, "field": field, "offset": offset, "detail": detail}})
}

fn frame_error_json(e: &FrameError, base: usize) -> Value {
    error_json(e.kind(), e.field(), base + e.offset(), &e.to_string())
}

fn decode_error_json(e: &DecodeError, base: usize) -> Value {
    error_json("decode", e.field(), base + e.offset(), &e.to_string())
}

/// Decode a raw byte stream into JSON lines, the way `trackgate decode` does.
///
/// Junk between frames is skipped silently; junk left at the end of the input with no frame
/// after it (other than whitespace) is reported once as a `framing` error, as is a frame
/// cut off by the end of the input (`incomplete`). Returns the lines and whether any of
/// them is an error.
pub fn decode_stream(framer: &Framer, input: &[u8]) -> (Vec<Value>, bool) {
    let mut out = Vec::new();
    let mut failed = false;
    let mut pos = 0;
    // Offset of junk skipped since the last line, unless that junk belongs to a frame
    // already reported as rejected.
    let mut pending_junk: Option<usize> = None;
    while pos < input.len() {
        match framer.scan(&input[pos..]) {
            Scan::Frame(frame) => {
                pending_junk = None;
                match decode(&frame) {
                    Ok(msg) => {
                        out.extend(message_json(frame.imei(), frame.command_str(), &msg));
                        // Records of a batch that did not decode: the good ones are above.
                        for e in &msg.rejected {
                            failed = true;
                            out.push(decode_error_json(e, pos));
                        }
                    }
                    Err(e) => {
                        failed = true;
                        out.push(decode_error_json(&e, pos));
                    }
                }
                pos += frame.len();
            }
            Scan::Incomplete { .. } => {
                pending_junk = None;
                failed = true;
                out.push(error_json(
                    "incomplete",
                    "frame",
                    pos,
                    "input ended inside a frame",
                ));
                pos = input.len();
            }
            Scan::Reject { error, skip } => {
                match error {
                    FrameError::Junk { .. } => {
                        let junk = &input[pos..pos + skip];
                        if pending_junk.is_none() && !junk.iter().all(u8::is_ascii_whitespace) {
                            pending_junk = Some(pos);
                        }
                    }
                    _ => {
                        failed = true;
                        out.push(frame_error_json(&error, pos));
                        // The bytes up to the next marker are this frame's remains.
                        pending_junk = Some(usize::MAX);
                    }
                }
                pos += skip;
            }
        }
        if let Some(at) = pending_junk.filter(|_| pos >= input.len()) {
            if at != usize::MAX {
                failed = true;
                out.push(error_json(
                    "framing",
                    "start",
                    at,
                    "no frame start marker in the remaining input",
                ));
            }
        }
    }
    (out, failed)
}
