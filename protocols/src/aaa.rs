//! AAA-style text reports: `AAA` and `AFF` (one extra leading field). Protocol notes §2.

use jiff::Timestamp;

use crate::error::DecodeError;
use crate::record::{Analog, Cell, ExtraKey, ExtraValue, Fix};
use crate::text;

/// Comma-separated fields with their offsets in the payload.
struct Fields<'a> {
    rest: Option<&'a [u8]>,
    offset: usize,
    /// Offset where the payload ends (for "missing field" errors).
    end: usize,
}

impl<'a> Fields<'a> {
    fn new(payload: &'a [u8]) -> Self {
        Fields {
            rest: Some(payload),
            offset: 0,
            end: payload.len(),
        }
    }

    fn next(&mut self) -> Option<(usize, &'a [u8])> {
        let rest = self.rest?;
        let at = self.offset;
        match rest.iter().position(|&b| b == b',') {
            Some(p) => {
                self.rest = Some(&rest[p + 1..]);
                self.offset += p + 1;
                Some((at, &rest[..p]))
            }
            None => {
                self.rest = None;
                Some((at, rest))
            }
        }
    }

    fn required(&mut self, field: &'static str) -> Result<(usize, &'a [u8]), DecodeError> {
        self.next().ok_or(DecodeError::Truncated {
            field,
            offset: self.end,
        })
    }
}

fn syntax(field: &'static str, offset: usize, expected: &'static str) -> DecodeError {
    DecodeError::Syntax {
        field,
        offset,
        expected,
    }
}

fn parse<T>(
    (offset, bytes): (usize, &[u8]),
    field: &'static str,
    expected: &'static str,
    f: impl FnOnce(&[u8]) -> Option<T>,
) -> Result<T, DecodeError> {
    f(bytes).ok_or_else(|| syntax(field, offset, expected))
}

fn small<T: TryFrom<u64>>(v: u64, field: &'static str, offset: usize) -> Result<T, DecodeError> {
    T::try_from(v).map_err(|_| DecodeError::OutOfRange { field, offset })
}

fn text_value<'a>(
    (offset, bytes): (usize, &'a [u8]),
    field: &'static str,
) -> Result<&'a str, DecodeError> {
    std::str::from_utf8(bytes).map_err(|_| DecodeError::NonUtf8 { field, offset })
}

/// Decode the payload of an AAA-style report. Offsets in errors are relative to the payload.
pub(crate) fn decode(payload: &[u8], leading_field: bool) -> Result<Fix<'_>, DecodeError> {
    let mut f = Fields::new(payload);
    let mut fix = Fix::default();

    if leading_field {
        let lead = f.required("aff_field")?;
        let v = text_value(lead, "aff_field")?;
        fix.push_extra(ExtraKey::Named("aff_field"), ExtraValue::Text(v));
    }

    let field = f.required("event")?;
    let event = parse(field, "event", "decimal", text::unsigned)?;
    fix.event = Some(small(event, "event", field.0)?);

    let field = f.required("latitude")?;
    let lat = parse(field, "latitude", "signed decimal", |b| text::fixed(b, 6))?;
    if !(-90_000_000..=90_000_000).contains(&lat) {
        return Err(DecodeError::OutOfRange {
            field: "latitude",
            offset: field.0,
        });
    }
    let field = f.required("longitude")?;
    let lon = parse(field, "longitude", "signed decimal", |b| text::fixed(b, 6))?;
    if !(-180_000_000..=180_000_000).contains(&lon) {
        return Err(DecodeError::OutOfRange {
            field: "longitude",
            offset: field.0,
        });
    }
    // Both are within ±180e6, so they fit i32.
    fix.lat_e6 = i32::try_from(lat).ok();
    fix.lon_e6 = i32::try_from(lon).ok();

    let field = f.required("datetime")?;
    let [y, mo, d, h, mi, s] = parse(field, "datetime", "yymmddHHMMSS", text::datetime)?;
    fix.time = Some(
        civil_utc(y, mo, d, h, mi, s).ok_or(DecodeError::OutOfRange {
            field: "datetime",
            offset: field.0,
        })?,
    );

    let field = f.required("gps_status")?;
    fix.valid = Some(match field.1 {
        b"A" => true,
        b"V" => false,
        _ => return Err(syntax("gps_status", field.0, "A or V")),
    });

    let field = f.required("satellites")?;
    let v = parse(field, "satellites", "decimal", text::unsigned)?;
    fix.satellites = Some(small(v, "satellites", field.0)?);

    let field = f.required("gsm_signal")?;
    let v = parse(field, "gsm_signal", "decimal", text::unsigned)?;
    fix.gsm_signal = Some(small(v, "gsm_signal", field.0)?);

    let field = f.required("speed")?;
    let v = parse(field, "speed", "decimal", |b| text::fixed(b, 1))?;
    fix.speed_kmh_x10 = Some(small(non_negative(v, "speed", field.0)?, "speed", field.0)?);

    let field = f.required("course")?;
    let v = parse(field, "course", "decimal", |b| text::fixed(b, 0))?;
    fix.course_deg = Some(small(
        non_negative(v, "course", field.0)?,
        "course",
        field.0,
    )?);

    let field = f.required("hdop")?;
    let v = parse(field, "hdop", "decimal", |b| text::fixed(b, 1))?;
    fix.hdop_x10 = Some(small(non_negative(v, "hdop", field.0)?, "hdop", field.0)?);

    let field = f.required("altitude")?;
    let v = parse(field, "altitude", "signed decimal", |b| text::fixed(b, 0))?;
    fix.altitude_m = Some(i32::try_from(v).map_err(|_| DecodeError::OutOfRange {
        field: "altitude",
        offset: field.0,
    })?);

    let field = f.required("mileage")?;
    fix.mileage_m = Some(parse(field, "mileage", "decimal", text::unsigned)?);

    let field = f.required("runtime")?;
    fix.runtime_s = Some(parse(field, "runtime", "decimal", text::unsigned)?);

    let field = f.required("base_station")?;
    fix.cell = base_station(field)?;

    let field = f.required("io_state")?;
    if !field.1.is_empty() {
        let io = parse(field, "io_state", "4 hex digits", |b| {
            (b.len() == 4).then(|| text::hex(b)).flatten()
        })?;
        fix.inputs = Some((io >> 8) as u8);
        fix.outputs = Some((io & 0xff) as u8);
    }

    if let Some(field) = f.next() {
        fix.analog = analog(field)?;
    }

    tail(&mut f, &mut fix)?;
    Ok(fix)
}

fn non_negative(v: i64, field: &'static str, offset: usize) -> Result<u64, DecodeError> {
    u64::try_from(v).map_err(|_| DecodeError::OutOfRange { field, offset })
}

/// UTC instant of a two-digit-year civil time (years 2000–2099).
pub(crate) fn civil_utc(y: u8, mo: u8, d: u8, h: u8, mi: u8, s: u8) -> Option<Timestamp> {
    // The fallible constructors reject Feb 30, hour 24, …; nothing here can panic.
    let day = jiff::civil::Date::new(
        2000 + i16::from(y),
        i8::try_from(mo).ok()?,
        i8::try_from(d).ok()?,
    )
    .ok()?;
    let time = jiff::civil::Time::new(
        i8::try_from(h).ok()?,
        i8::try_from(mi).ok()?,
        i8::try_from(s).ok()?,
        0,
    )
    .ok()?;
    jiff::tz::Offset::UTC
        .to_timestamp(day.to_datetime(time))
        .ok()
}

/// `MCC|MNC|LAC|CI`: MCC, MNC decimal; LAC, CI hex; empty parts read as 0. An empty field
/// means no cell.
fn base_station((offset, bytes): (usize, &[u8])) -> Result<Option<Cell>, DecodeError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let mut parts = bytes.split(|&b| b == b'|');
    let mut at = offset;
    let mut next = |expected: &'static str, hex: bool| -> Result<u32, DecodeError> {
        let part = parts
            .next()
            .ok_or_else(|| syntax("base_station", offset, "MCC|MNC|LAC|CI"))?;
        let here = at;
        at += part.len() + 1;
        if part.is_empty() {
            return Ok(0);
        }
        let v = if hex {
            text::hex(part)
        } else {
            text::unsigned(part).and_then(|v| u32::try_from(v).ok())
        };
        v.ok_or_else(|| syntax("base_station", here, expected))
    };
    let mcc = next("decimal MCC", false)?;
    let mnc = next("decimal MNC", false)?;
    let lac = next("hex LAC", true)?;
    let cell_id = next("hex CI", true)?;
    let range = || DecodeError::OutOfRange {
        field: "base_station",
        offset,
    };
    Ok(Some(Cell {
        mcc: u16::try_from(mcc).map_err(|_| range())?,
        mnc: u16::try_from(mnc).map_err(|_| range())?,
        lac,
        cell_id,
    }))
}

/// Field 16. Older models: `AD1|AD2|AD3|battery|power` in hex (raw counts); newer ones:
/// `battery|power|rtc|mcu|gps` in volts with a decimal point. Empty parts are absent.
fn analog((offset, bytes): (usize, &[u8])) -> Result<Analog, DecodeError> {
    let mut a = Analog::default();
    if bytes.is_empty() {
        return Ok(a);
    }
    let volts = bytes.contains(&b'.');
    let mut at = offset;
    for (i, part) in bytes.split(|&b| b == b'|').enumerate() {
        let here = at;
        at += part.len() + 1;
        if part.is_empty() {
            continue;
        }
        if volts {
            let mv = text::fixed(part, 3)
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| syntax("analog", here, "volts as decimals"))?;
            match i {
                0 => a.battery_mv = Some(mv),
                1 => a.power_mv = Some(mv),
                2 => a.rtc_mv = Some(mv),
                3 => a.mcu_mv = Some(mv),
                4 => a.gps_mv = Some(mv),
                _ => {}
            }
        } else {
            let raw = text::hex(part).ok_or_else(|| syntax("analog", here, "hex counts"))?;
            match i {
                0..=2 => a.adc_raw[i] = Some(raw),
                3 => a.battery_raw = Some(raw),
                4 => a.power_raw = Some(raw),
                _ => {}
            }
        }
    }
    Ok(a)
}

/// Fields 17+: model-specific. Values that do not have the documented form are kept raw
/// (field number and text) rather than failing the whole report.
fn tail<'a>(f: &mut Fields<'a>, fix: &mut Fix<'a>) -> Result<(), DecodeError> {
    let mut protocol = 0u64;
    let mut n: u16 = 17;
    while let Some(field) = f.next() {
        let (_, bytes) = field;
        let Ok(text) = std::str::from_utf8(bytes) else {
            // Not text: keep the bytes rather than lose the report over a vendor field.
            fix.push_extra(ExtraKey::AaaField(n), ExtraValue::Bytes(bytes));
            n = n.saturating_add(1);
            continue;
        };
        if !bytes.is_empty() {
            let modelled = match n {
                17 => {
                    let key = if fix.event == Some(37) {
                        "driver_id"
                    } else {
                        "event_data"
                    };
                    fix.push_extra(ExtraKey::Named(key), ExtraValue::Text(text));
                    true
                }
                19 => match text::unsigned(bytes) {
                    Some(v) => {
                        protocol = v;
                        fix.push_extra(ExtraKey::Named("protocol_version"), int(v));
                        true
                    }
                    None => false,
                },
                20 => fuel(bytes).is_some_and(|v| {
                    fix.push_extra(
                        ExtraKey::Named("fuel_pct"),
                        ExtraValue::Decimal { value: v, scale: 2 },
                    );
                    true
                }),
                21 => temperatures(bytes, protocol, fix),
                22 => match text::unsigned(bytes) {
                    Some(v) => {
                        fix.push_extra(ExtraKey::Named("data_count"), int(v));
                        true
                    }
                    None => false,
                },
                _ => false,
            };
            if !modelled {
                fix.push_extra(ExtraKey::AaaField(n), ExtraValue::Text(text));
            }
        }
        n = n.saturating_add(1);
    }
    Ok(())
}

fn int(v: u64) -> ExtraValue<'static> {
    ExtraValue::Int(i64::try_from(v).unwrap_or(i64::MAX))
}

/// 4 hex digits: integer byte, then hundredths byte → value × 100.
fn fuel(bytes: &[u8]) -> Option<i64> {
    if bytes.len() != 4 {
        return None;
    }
    let int = text::hex(&bytes[..2])?;
    let hundredths = text::hex(&bytes[2..])?;
    Some(i64::from(int) * 100 + i64::from(hundredths))
}

/// `IIVVVV|IIVVVV…`: sensor index, then (protocol ≥ 3) a signed 16-bit value in 0.01 °C, or
/// (older) a signed integer byte and a hundredths byte. Adds nothing unless every entry
/// parses.
fn temperatures(bytes: &[u8], protocol: u64, fix: &mut Fix<'_>) -> bool {
    let mut parsed = Vec::new();
    for entry in bytes.split(|&b| b == b'|') {
        if entry.len() != 6 {
            return false;
        }
        let (Some(index), Some(value)) = (text::hex(&entry[..2]), text::hex(&entry[2..])) else {
            return false;
        };
        let centi = if protocol >= 3 {
            i64::from(value as u16 as i16)
        } else {
            let int = i64::from((value >> 8) as u8 as i8);
            let frac = i64::from(value & 0xff);
            if int < 0 {
                int * 100 - frac
            } else {
                int * 100 + frac
            }
        };
        parsed.push((index as u8, centi));
    }
    for (index, centi) in parsed {
        fix.push_extra(
            ExtraKey::Indexed("temp_c", index),
            ExtraValue::Decimal {
                value: centi,
                scale: 2,
            },
        );
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_report() {
        let p = b"35,34.516428,10.470160,170915154043,A,9,12,68,74,0.9,9,1988259,525882,605|2|008C|0007B5A6,0200,0003|0000|0000|01A6|0571,00000001,,3,0000,06FB2E,360,511";
        let fix = decode(p, false).unwrap();
        assert_eq!(fix.event, Some(35));
        assert_eq!(fix.lat_e6, Some(34_516_428));
        assert_eq!(fix.lon_e6, Some(10_470_160));
        assert_eq!(fix.speed_kmh_x10, Some(680));
        assert_eq!(fix.hdop_x10, Some(9));
        assert_eq!(fix.inputs, Some(2));
        assert_eq!(fix.outputs, Some(0));
        assert_eq!(
            fix.cell,
            Some(Cell {
                mcc: 605,
                mnc: 2,
                lac: 0x8c,
                cell_id: 0x7b5a6
            })
        );
        assert_eq!(fix.analog.adc_raw, [Some(3), Some(0), Some(0)]);
        assert_eq!(fix.analog.battery_raw, Some(0x1a6));
        assert_eq!(
            fix.extra(ExtraKey::Named("event_data")),
            Some(&ExtraValue::Text("00000001"))
        );
        assert_eq!(
            fix.extra(ExtraKey::Named("protocol_version")),
            Some(&ExtraValue::Int(3))
        );
        assert_eq!(
            fix.extra(ExtraKey::Named("fuel_pct")),
            Some(&ExtraValue::Decimal { value: 0, scale: 2 })
        );
        // 0x06FB2E at protocol 3: sensor 6, 0xFB2E = -1234 → -12.34 °C.
        assert_eq!(
            fix.extra(ExtraKey::Indexed("temp_c", 6)),
            Some(&ExtraValue::Decimal {
                value: -1234,
                scale: 2
            })
        );
    }

    #[test]
    fn volts_analog_format() {
        let p = b"35,-1.264865,36.800705,211001105240,A,9,20,41.0,323,1,1697,1,0,000|00||,0000,4.33|12.96|1.92|2.72|2.69,0.000000|0|0.000000,";
        let fix = decode(p, false).unwrap();
        assert_eq!(fix.analog.battery_mv, Some(4330));
        assert_eq!(fix.analog.power_mv, Some(12960));
        assert_eq!(fix.analog.gps_mv, Some(2690));
        assert_eq!(fix.cell.map(|c| c.lac), Some(0));
    }

    #[test]
    fn errors_name_the_field() {
        let e = decode(b"35,91.0,0,170915154043,A", false).unwrap_err();
        assert_eq!(e.field(), "latitude");
        assert!(matches!(e, DecodeError::OutOfRange { offset: 3, .. }));
        let e = decode(b"35,1.0,2.0,171315154043,A", false).unwrap_err();
        assert_eq!(e.field(), "datetime");
        let e = decode(b"35,1.0,2.0,170230154043,A", false).unwrap_err();
        assert_eq!(e.field(), "datetime");
        let e = decode(b"35,1.0,2.0,170215154043,X", false).unwrap_err();
        assert_eq!(e.field(), "gps_status");
        let e = decode(b"35,1.0,2.0,170215154043,A,1", false).unwrap_err();
        assert!(matches!(
            e,
            DecodeError::Truncated {
                field: "gsm_signal",
                ..
            }
        ));
    }

    #[test]
    fn non_utf8_tail_field_is_kept_as_bytes() {
        let mut p = b"35,1.0,2.0,170215154043,A,1,2,3,4,5,6,7,8,1|2|3|4,0000,,".to_vec();
        p.push(0xff);
        let fix = decode(&p, false).unwrap();
        assert_eq!(
            fix.extra(ExtraKey::AaaField(17)),
            Some(&ExtraValue::Bytes(&[0xff]))
        );
    }

    #[test]
    fn non_utf8_core_field_is_typed_error() {
        let p = b"35,1.0,2.0,170215154043,\xff,1,2,3,4,5,6,7,8,1|2|3|4,0000,";
        assert!(decode(p, false).is_err());
    }
}
