//! CCC: compressed binary batches of older firmware. Protocol notes §4.
//!
//! `u16` protocol version, `u16` record size, `u32` records still cached, then fixed-size
//! little-endian records. The 52-byte layout is known; a larger declared size keeps the
//! known prefix and skips the rest of each record.

use jiff::Timestamp;

use crate::binary::Cursor;
use crate::error::DecodeError;
use crate::record::{Cell, EPOCH_2000_UNIX_S, ExtraKey, ExtraValue, Fix};

/// Size of the record layout this decoder knows.
pub(crate) const RECORD_BYTES: usize = 52;

/// Decode the payload: good records go to `fixes`, bad ones to `rejected` (a bad record
/// is skipped by the record size; see `cce::decode` for why). Returns (records still
/// cached, records in the batch).
pub(crate) fn decode<'a>(
    payload: &'a [u8],
    fixes: &mut Vec<Fix<'a>>,
    rejected: &mut Vec<DecodeError>,
) -> Result<(u32, u32), DecodeError> {
    let mut c = Cursor::new(payload, 0);
    let _version = c.u16("ccc.protocol_version")?;
    let size_at = c.offset();
    let size = usize::from(c.u16("ccc.record_size")?);
    let cached = c.u32("ccc.cached_records")?;
    if size < RECORD_BYTES {
        return Err(DecodeError::Syntax {
            field: "ccc.record_size",
            offset: size_at,
            expected: "at least 52",
        });
    }
    if c.remaining() % size != 0 {
        return Err(DecodeError::Syntax {
            field: "ccc.records",
            offset: c.offset(),
            expected: "a whole number of records",
        });
    }
    let count = c.remaining() / size;
    fixes.reserve(count);
    while c.remaining() > 0 {
        let at = c.offset();
        let body = c.bytes(size, "ccc.record")?;
        match record(&mut Cursor::new(body, at)) {
            Ok(fix) => fixes.push(fix),
            Err(e) => rejected.push(e),
        }
    }
    Ok((cached, u32::try_from(count).unwrap_or(u32::MAX)))
}

fn record<'a>(r: &mut Cursor<'a>) -> Result<Fix<'a>, DecodeError> {
    let mut fix = Fix {
        event: Some(u16::from(r.u8("ccc.event")?)),
        ..Fix::default()
    };
    let at = r.offset();
    let lat = r.i32("ccc.latitude")?;
    if !(-90_000_000..=90_000_000).contains(&lat) {
        return Err(DecodeError::OutOfRange {
            field: "ccc.latitude",
            offset: at,
        });
    }
    let at = r.offset();
    let lon = r.i32("ccc.longitude")?;
    if !(-180_000_000..=180_000_000).contains(&lon) {
        return Err(DecodeError::OutOfRange {
            field: "ccc.longitude",
            offset: at,
        });
    }
    fix.lat_e6 = Some(lat);
    fix.lon_e6 = Some(lon);
    fix.time = Timestamp::from_second(EPOCH_2000_UNIX_S + i64::from(r.u32("ccc.time")?)).ok();
    fix.valid = Some(r.u8("ccc.valid")? == 1);
    fix.satellites = Some(r.u8("ccc.satellites")?);
    fix.gsm_signal = Some(r.u8("ccc.gsm_signal")?);
    fix.speed_kmh_x10 = Some(u32::from(r.u16("ccc.speed")?) * 10);
    fix.course_deg = Some(r.u16("ccc.course")?);
    fix.hdop_x10 = Some(r.u16("ccc.hdop")?);
    fix.altitude_m = Some(i32::from(r.u16("ccc.altitude")?));
    fix.mileage_m = Some(u64::from(r.u32("ccc.mileage")?));
    fix.runtime_s = Some(u64::from(r.u32("ccc.runtime")?));
    fix.cell = Some(Cell {
        mcc: r.u16("ccc.mcc")?,
        mnc: r.u16("ccc.mnc")?,
        lac: u32::from(r.u16("ccc.lac")?),
        cell_id: u32::from(r.u16("ccc.cell_id")?),
    });
    let io = r.u16("ccc.io_state")?;
    fix.push_extra(ExtraKey::Named("io_state"), ExtraValue::Int(i64::from(io)));
    fix.analog.adc_raw[0] = Some(u32::from(r.u16("ccc.ad1")?));
    fix.analog.battery_mv = Some(u32::from(r.u16("ccc.battery")?) * 10);
    fix.analog.power_raw = Some(u32::from(r.u16("ccc.power")?));
    let geofence = r.u32("ccc.geofence")?;
    fix.push_extra(
        ExtraKey::Named("geofence"),
        ExtraValue::Int(i64::from(geofence)),
    );
    Ok(fix)
}
