//! Encoders: the `@@` frames a server sends (replies and commands), and the `$$` reports a
//! device sends (for the fleet simulator and round-trip tests).
//!
//! Every encoder validates what it writes: a parameter that would break the envelope
//! (`,` inside a field, `*`, CR, LF, non-printable bytes) or a value that does not fit its
//! binary field is an [`EncodeError`], never silently truncated.

use std::io::Write as _;

use crate::checksum::{checksum, hex_digits};
use crate::error::EncodeError;
use crate::framer::Direction;
use crate::record::{EPOCH_2000_UNIX_S, Fix};

/// Write one frame: `<mm><flag><len>,<imei>,<cmd>[,<params>]*<cs>\r\n`.
///
/// `params` is written as given (binary allowed); the length and checksum are computed.
pub fn frame(
    direction: Direction,
    flag: u8,
    imei: &str,
    command: &[u8; 3],
    params: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    if !(0x21..=0x7e).contains(&flag) || flag == b',' || flag == b'*' {
        return Err(EncodeError::Flag);
    }
    if !(14..=15).contains(&imei.len()) || !imei.bytes().all(|b| b.is_ascii_digit()) {
        return Err(EncodeError::Imei);
    }
    if !command.iter().all(u8::is_ascii_alphanumeric) {
        return Err(EncodeError::Command);
    }
    // `,imei,cmd` + (`,params`) + `*XX\r\n`
    let declared = 1
        + imei.len()
        + 1
        + 3
        + if params.is_empty() {
            0
        } else {
            1 + params.len()
        }
        + 5;
    let digits = declared.checked_ilog10().unwrap_or(0) as usize + 1;
    if declared + 3 + digits > 9999 || digits > 4 {
        return Err(EncodeError::TooLong {
            len: declared + 3 + digits,
        });
    }
    let start = out.len();
    let m = direction.marker();
    out.extend_from_slice(&[m, m, flag]);
    // Writing to a Vec cannot fail.
    let _ = write!(out, "{declared}");
    out.push(b',');
    out.extend_from_slice(imei.as_bytes());
    out.push(b',');
    out.extend_from_slice(command);
    if !params.is_empty() {
        out.push(b',');
        out.extend_from_slice(params);
    }
    out.push(b'*');
    let cs = checksum(&out[start..]);
    out.extend_from_slice(&hex_digits(cs));
    out.extend_from_slice(b"\r\n");
    Ok(())
}

/// What to do with one output port in a `C01` command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputAction {
    Off,
    On,
    /// Leave the port as it is.
    Keep,
}

/// Commands a server sends to a device (protocol notes §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// `A10`: report the current position once.
    RequestPosition,
    /// `C01,0,<5 digits>`: set outputs 1–5 (engine stop/resume and the like).
    SetOutputs([OutputAction; 5]),
    /// `C02,0,<phone>,<text>`: send an SMS through the device.
    SendSms { phone: &'a str, text: &'a str },
    /// `D03,<camera>,<file>`: take a photo.
    TakePhoto { camera: u8, file: &'a str },
    /// `D00,<file>,<packet>`: request one packet of a photo.
    RequestPhotoPacket { file: &'a str, packet: u32 },
}

/// True for bytes allowed inside one text parameter.
fn plain_param(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| (0x20..=0x7e).contains(&b) && b != b',' && b != b'*')
}

impl Command<'_> {
    /// Encode as an `@@` frame to `imei`, tagged with `flag`.
    pub fn encode(&self, flag: u8, imei: &str, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let mut params = Vec::new();
        let cmd: &[u8; 3] = match *self {
            Command::RequestPosition => b"A10",
            Command::SetOutputs(ports) => {
                params.extend_from_slice(b"0,");
                params.extend(ports.iter().map(|p| match p {
                    OutputAction::Off => b'0',
                    OutputAction::On => b'1',
                    OutputAction::Keep => b'2',
                }));
                b"C01"
            }
            Command::SendSms { phone, text } => {
                let phone_ok = !phone.is_empty()
                    && phone.len() <= 20
                    && phone
                        .bytes()
                        .enumerate()
                        .all(|(i, b)| b.is_ascii_digit() || (i == 0 && b == b'+'));
                if !phone_ok {
                    return Err(EncodeError::Param { field: "phone" });
                }
                if !plain_param(text) {
                    return Err(EncodeError::Param { field: "text" });
                }
                let _ = write!(params, "0,{phone},{text}");
                b"C02"
            }
            Command::TakePhoto { camera, file } => {
                if !plain_param(file) {
                    return Err(EncodeError::Param { field: "file" });
                }
                let _ = write!(params, "{camera},{file}");
                b"D03"
            }
            Command::RequestPhotoPacket { file, packet } => {
                if !plain_param(file) {
                    return Err(EncodeError::Param { field: "file" });
                }
                let _ = write!(params, "{file},{packet}");
                b"D00"
            }
        };
        frame(Direction::ServerToDevice, flag, imei, cmd, &params, out)
    }
}

// ---------------------------------------------------------------------------------------
// Device side: reports as a tracker writes them.
// ---------------------------------------------------------------------------------------

fn missing(field: &'static str) -> EncodeError {
    EncodeError::Param { field }
}

fn write_fixed(out: &mut Vec<u8>, value: i64, scale: u32) {
    let div = 10i64.pow(scale);
    let sign = if value < 0 { "-" } else { "" };
    let (int, frac) = (
        value.unsigned_abs() / div as u64,
        value.unsigned_abs() % div as u64,
    );
    let _ = write!(out, "{sign}{int}.{frac:0width$}", width = scale as usize);
}

/// The payload of an AAA report for `fix` (fields 1–16). Event, time, position and
/// validity are required; other absent numeric fields are written as 0, an absent cell
/// and I/O state as empty fields.
pub fn aaa_payload(fix: &Fix<'_>, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let event = fix.event.ok_or(missing("event"))?;
    let lat = fix.lat_e6.ok_or(missing("lat_e6"))?;
    let lon = fix.lon_e6.ok_or(missing("lon_e6"))?;
    let time = fix.time.ok_or(missing("time"))?;
    let valid = fix.valid.ok_or(missing("valid"))?;
    let dt = jiff::tz::Offset::UTC.to_datetime(time);
    if !(2000..=2099).contains(&dt.year()) || time.subsec_nanosecond() != 0 {
        return Err(missing("time"));
    }
    let _ = write!(out, "{event},");
    write_fixed(out, i64::from(lat), 6);
    out.push(b',');
    write_fixed(out, i64::from(lon), 6);
    let _ = write!(
        out,
        ",{:02}{:02}{:02}{:02}{:02}{:02},{},{},{},",
        dt.year() - 2000,
        dt.month(),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        if valid { 'A' } else { 'V' },
        fix.satellites.unwrap_or(0),
        fix.gsm_signal.unwrap_or(0),
    );
    write_fixed(out, i64::from(fix.speed_kmh_x10.unwrap_or(0)), 1);
    let _ = write!(out, ",{},", fix.course_deg.unwrap_or(0));
    write_fixed(out, i64::from(fix.hdop_x10.unwrap_or(0)), 1);
    let _ = write!(
        out,
        ",{},{},{},",
        fix.altitude_m.unwrap_or(0),
        fix.mileage_m.unwrap_or(0),
        fix.runtime_s.unwrap_or(0)
    );
    if let Some(c) = fix.cell {
        let _ = write!(out, "{}|{}|{:04X}|{:04X}", c.mcc, c.mnc, c.lac, c.cell_id);
    }
    out.push(b',');
    if fix.inputs.is_some() || fix.outputs.is_some() {
        let _ = write!(
            out,
            "{:02X}{:02X}",
            fix.inputs.unwrap_or(0),
            fix.outputs.unwrap_or(0)
        );
    }
    out.push(b',');
    let a = &fix.analog;
    let raw = |v: Option<u32>| v.map(|v| format!("{v:04X}")).unwrap_or_default();
    let _ = write!(
        out,
        "{}|{}|{}|{}|{}",
        raw(a.adc_raw[0]),
        raw(a.adc_raw[1]),
        raw(a.adc_raw[2]),
        raw(a.battery_raw),
        raw(a.power_raw)
    );
    Ok(())
}

fn fits<T: TryFrom<U>, U>(v: U, field: &'static str) -> Result<T, EncodeError> {
    T::try_from(v).map_err(|_| EncodeError::Param { field })
}

/// Seconds since 2000-01-01 for the binary formats.
fn secs_2000(fix: &Fix<'_>) -> Result<u32, EncodeError> {
    let t = fix.time.ok_or(missing("time"))?;
    if t.subsec_nanosecond() != 0 {
        return Err(missing("time"));
    }
    fits(t.as_second() - EPOCH_2000_UNIX_S, "time")
}

/// Speed in whole km/h, as the binary formats carry it.
fn whole_kmh(fix: &Fix<'_>) -> Result<u16, EncodeError> {
    let x10 = fix.speed_kmh_x10.unwrap_or(0);
    if x10 % 10 != 0 {
        return Err(EncodeError::Param { field: "speed" });
    }
    fits(x10 / 10, "speed")
}

/// The payload of a CCE batch holding `fixes` (core fields only; extras are not written).
pub fn cce_payload(
    fixes: &[Fix<'_>],
    cached_records: u32,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    out.extend_from_slice(&cached_records.to_le_bytes());
    out.extend_from_slice(&fits::<u16, _>(fixes.len(), "fixes")?.to_le_bytes());
    for (index, fix) in fixes.iter().enumerate() {
        let mut g1: Vec<(u8, u8)> = Vec::with_capacity(6);
        let mut g2: Vec<(u8, u16)> = Vec::with_capacity(5);
        let mut g3: Vec<(u8, u32)> = Vec::with_capacity(5);
        match fix.event {
            Some(e) if e <= 0xff => g1.push((0x01, e as u8)),
            Some(e) => g2.push((0x40, e)),
            None => {}
        }
        if let Some(v) = fix.valid {
            g1.push((0x05, u8::from(v)));
        }
        for (id, v) in [
            (0x06, fix.satellites),
            (0x07, fix.gsm_signal),
            (0x14, fix.outputs),
            (0x15, fix.inputs),
        ] {
            if let Some(v) = v {
                g1.push((id, v));
            }
        }
        if fix.speed_kmh_x10.is_some() {
            g2.push((0x08, whole_kmh(fix)?));
        }
        if let Some(v) = fix.course_deg {
            g2.push((0x09, v));
        }
        if let Some(v) = fix.hdop_x10 {
            g2.push((0x0A, v));
        }
        if let Some(v) = fix.altitude_m {
            g2.push((0x0B, fits::<i16, _>(v, "altitude_m")? as u16));
        }
        if let Some(v) = fix.lat_e6 {
            g3.push((0x02, v as u32));
        }
        if let Some(v) = fix.lon_e6 {
            g3.push((0x03, v as u32));
        }
        if fix.time.is_some() {
            g3.push((0x04, secs_2000(fix)?));
        }
        if let Some(v) = fix.mileage_m {
            g3.push((0x0C, fits(v, "mileage_m")?));
        }
        if let Some(v) = fix.runtime_s {
            g3.push((0x0D, fits(v, "runtime_s")?));
        }
        let mut packet = Vec::with_capacity(64);
        packet.extend_from_slice(&fits::<u16, _>(index, "fixes")?.to_le_bytes());
        packet.push(g1.len() as u8);
        for (id, v) in g1 {
            packet.extend_from_slice(&[id, v]);
        }
        packet.push(g2.len() as u8);
        for (id, v) in g2 {
            packet.push(id);
            packet.extend_from_slice(&v.to_le_bytes());
        }
        packet.push(g3.len() as u8);
        for (id, v) in g3 {
            packet.push(id);
            packet.extend_from_slice(&v.to_le_bytes());
        }
        match fix.cell {
            Some(c) => {
                packet.extend_from_slice(&[1, 0x0E, 10]);
                for v in [c.mcc, c.mnc, fits(c.lac, "lac")?] {
                    packet.extend_from_slice(&v.to_le_bytes());
                }
                packet.extend_from_slice(&c.cell_id.to_le_bytes());
            }
            None => packet.push(0),
        }
        out.extend_from_slice(&fits::<u16, _>(packet.len(), "packet")?.to_le_bytes());
        out.extend_from_slice(&packet);
    }
    Ok(())
}

/// The payload of a CCC batch holding `fixes` (protocol version 0x0102, 52-byte records).
pub fn ccc_payload(
    fixes: &[Fix<'_>],
    cached_records: u32,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    out.extend_from_slice(&0x0102u16.to_le_bytes());
    out.extend_from_slice(&52u16.to_le_bytes());
    out.extend_from_slice(&cached_records.to_le_bytes());
    for fix in fixes {
        let cell = fix.cell.unwrap_or_default();
        out.push(fits(fix.event.unwrap_or(0), "event")?);
        out.extend_from_slice(&fix.lat_e6.ok_or(missing("lat_e6"))?.to_le_bytes());
        out.extend_from_slice(&fix.lon_e6.ok_or(missing("lon_e6"))?.to_le_bytes());
        out.extend_from_slice(&secs_2000(fix)?.to_le_bytes());
        out.extend_from_slice(&[
            u8::from(fix.valid.unwrap_or(false)),
            fix.satellites.unwrap_or(0),
            fix.gsm_signal.unwrap_or(0),
        ]);
        for v in [
            whole_kmh(fix)?,
            fix.course_deg.unwrap_or(0),
            fix.hdop_x10.unwrap_or(0),
            fits(fix.altitude_m.unwrap_or(0), "altitude_m")?,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(
            &fits::<u32, _>(fix.mileage_m.unwrap_or(0), "mileage_m")?.to_le_bytes(),
        );
        out.extend_from_slice(
            &fits::<u32, _>(fix.runtime_s.unwrap_or(0), "runtime_s")?.to_le_bytes(),
        );
        for v in [
            cell.mcc,
            cell.mnc,
            fits(cell.lac, "lac")?,
            fits(cell.cell_id, "cell_id")?,
            0, // I/O state
            fits(fix.analog.adc_raw[0].unwrap_or(0), "adc")?,
            fits(fix.analog.battery_mv.unwrap_or(0) / 10, "battery_mv")?,
            fits(fix.analog.power_raw.unwrap_or(0), "power_raw")?,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&0u32.to_le_bytes()); // geofence
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(c: Command<'_>) -> String {
        let mut out = Vec::new();
        c.encode(b'A', "123456789012345", &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn known_good_commands() {
        // Encodings given in the protocol notes §5.
        assert_eq!(
            cmd(Command::RequestPosition),
            "@@A25,123456789012345,A10*58\r\n"
        );
        assert_eq!(
            cmd(Command::TakePhoto {
                camera: 1,
                file: "camera_picture.jpg"
            }),
            "@@A46,123456789012345,D03,1,camera_picture.jpg*1C\r\n"
        );
        assert_eq!(
            cmd(Command::SendSms {
                phone: "15360853789",
                text: "Meitrack"
            }),
            "@@A48,123456789012345,C02,0,15360853789,Meitrack*8B\r\n"
        );
    }

    #[test]
    fn set_outputs_digits() {
        use OutputAction::*;
        let s = cmd(Command::SetOutputs([On, Keep, Keep, Off, Keep]));
        assert!(s.starts_with("@@A33,123456789012345,C01,0,12202*"), "{s}");
    }

    #[test]
    fn envelope_breaking_params_are_refused() {
        let mut out = Vec::new();
        for text in ["a,b", "a*b", "a\r\n", ""] {
            let c = Command::SendSms { phone: "123", text };
            assert_eq!(
                c.encode(b'A', "123456789012345", &mut out),
                Err(EncodeError::Param { field: "text" })
            );
        }
        assert_eq!(
            Command::RequestPosition.encode(b'A', "12345", &mut out),
            Err(EncodeError::Imei)
        );
        assert_eq!(
            Command::RequestPosition.encode(b',', "123456789012345", &mut out),
            Err(EncodeError::Flag)
        );
        assert!(out.is_empty());
    }

    #[test]
    fn aac_reply_matches_device_expectation() {
        let mut out = Vec::new();
        crate::Reply::Aac
            .encode(b'z', "350000000000099", &mut out)
            .unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("@@z27,350000000000099,AAC,1*"), "{s}");
        let cs = checksum(s.split_once('*').unwrap().0.as_bytes());
        let cs = cs.wrapping_add(b'*');
        assert!(s.ends_with(&format!("{cs:02X}\r\n")), "{s}");
    }
}
