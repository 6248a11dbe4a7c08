//! Typed records produced by the decoders (DESIGN §3).
//!
//! Fixed-point everywhere: coordinates in 1e-6 degrees, speed and HDOP in tenths, voltages
//! in millivolts. Fields a message type does not carry are `None`, never a made-up zero.
//! Records borrow text and byte extras from the frame, so decoding allocates only the
//! vector of extras.

use jiff::Timestamp;

use crate::error::DecodeError;

/// Seconds from the Unix epoch to 2000-01-01T00:00:00Z, the epoch of binary timestamps.
pub const EPOCH_2000_UNIX_S: i64 = 946_684_800;

/// A GSM/LTE cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cell {
    pub mcc: u16,
    pub mnc: u16,
    pub lac: u32,
    pub cell_id: u32,
}

/// Analog readings. Which fields are set depends on the model and message type; the units
/// are in the names. `_raw` values are ADC counts whose scale is model-specific.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Analog {
    /// AD1..AD3 as raw ADC counts (AAA older format, CCC AD1).
    pub adc_raw: [Option<u32>; 3],
    /// AD1, AD2 in millivolts (CCE `0x16`/`0x17`).
    pub adc_mv: [Option<u32>; 2],
    /// Battery and external power as raw counts (AAA older format, CCC external power).
    pub battery_raw: Option<u32>,
    pub power_raw: Option<u32>,
    /// Voltages in millivolts (AAA newer format, CCE, CCC battery).
    pub battery_mv: Option<u32>,
    pub power_mv: Option<u32>,
    pub rtc_mv: Option<u32>,
    pub mcu_mv: Option<u32>,
    pub gps_mv: Option<u32>,
}

impl Analog {
    /// True when no reading is present.
    pub fn is_empty(&self) -> bool {
        *self == Analog::default()
    }
}

/// Name of an extra value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExtraKey {
    /// A value this crate models, e.g. `fuel_pct`, `driver_id`.
    Named(&'static str),
    /// A numbered instance of a modelled value, e.g. (`temp_c`, 2) for sensor 2.
    Indexed(&'static str, u8),
    /// A CCE parameter id this crate does not model, kept raw.
    CceParam(u16),
    /// An AAA tail field (1-based position in the payload) this crate does not model.
    AaaField(u16),
}

impl std::fmt::Display for ExtraKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExtraKey::Named(n) => f.write_str(n),
            ExtraKey::Indexed(n, i) => {
                // `temp_c` + 2 → `temp2_c`: the index goes before the unit suffix.
                match n.rsplit_once('_') {
                    Some((base, unit)) => write!(f, "{base}{i}_{unit}"),
                    None => write!(f, "{n}{i}"),
                }
            }
            ExtraKey::CceParam(id) => write!(f, "cce_{id:#06x}"),
            ExtraKey::AaaField(n) => write!(f, "field_{n}"),
        }
    }
}

/// Value of an extra.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtraValue<'a> {
    Int(i64),
    /// Fixed-point decimal: `value / 10^scale`.
    Decimal {
        value: i64,
        scale: u8,
    },
    Bool(bool),
    Text(&'a str),
    Bytes(&'a [u8]),
    Cell {
        cell: Cell,
        signal_dbm: Option<i16>,
    },
    Wifi {
        mac: [u8; 6],
        rssi_dbm: i16,
    },
}

/// One extra value with its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extra<'a> {
    pub key: ExtraKey,
    pub value: ExtraValue<'a>,
}

/// One decoded position record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fix<'a> {
    /// Event code (see the protocol notes §6).
    pub event: Option<u16>,
    /// Fix time, UTC.
    pub time: Option<Timestamp>,
    /// GPS validity (`A` / valid flag > 0).
    pub valid: Option<bool>,
    /// Latitude in 1e-6 degrees, −90e6..=90e6.
    pub lat_e6: Option<i32>,
    /// Longitude in 1e-6 degrees, −180e6..=180e6.
    pub lon_e6: Option<i32>,
    /// Speed in 0.1 km/h.
    pub speed_kmh_x10: Option<u32>,
    /// Course over ground, degrees.
    pub course_deg: Option<u16>,
    /// Altitude, metres.
    pub altitude_m: Option<i32>,
    pub satellites: Option<u8>,
    /// Horizontal dilution of precision × 10.
    pub hdop_x10: Option<u16>,
    /// GSM signal, 0–31.
    pub gsm_signal: Option<u8>,
    /// Odometer, metres.
    pub mileage_m: Option<u64>,
    /// Run time, seconds.
    pub runtime_s: Option<u64>,
    pub cell: Option<Cell>,
    /// Input port states, one bit per port.
    pub inputs: Option<u8>,
    /// Output port states, one bit per port.
    pub outputs: Option<u8>,
    pub analog: Analog,
    /// Everything else the message carried, in message order.
    pub extras: Vec<Extra<'a>>,
}

impl<'a> Fix<'a> {
    /// Add an extra value.
    pub fn push_extra(&mut self, key: ExtraKey, value: ExtraValue<'a>) {
        self.extras.push(Extra { key, value });
    }

    /// The first extra with `key`.
    pub fn extra(&self, key: ExtraKey) -> Option<&ExtraValue<'a>> {
        self.extras.iter().find(|e| e.key == key).map(|e| &e.value)
    }
}

/// Message types this crate knows by name.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// Text position report.
    Aaa,
    /// Text position report with one extra leading field.
    Aff,
    /// Compressed binary batch, newer firmware.
    Cce,
    /// Compressed binary batch, older firmware.
    Ccc,
    /// Device asks for a confirmation.
    Aac,
    /// Photo data packet.
    D00,
    /// Answer to a take-photo command.
    D03,
    /// Answer to a command, no position.
    D82,
    /// Any other command: an answer without position.
    Other([u8; 3]),
}

impl MessageKind {
    /// Classify a frame's command field.
    pub fn from_command(cmd: [u8; 3]) -> Self {
        match &cmd {
            b"AAA" => MessageKind::Aaa,
            b"AFF" => MessageKind::Aff,
            b"CCE" => MessageKind::Cce,
            b"CCC" => MessageKind::Ccc,
            b"AAC" => MessageKind::Aac,
            b"D00" => MessageKind::D00,
            b"D03" => MessageKind::D03,
            b"D82" => MessageKind::D82,
            _ => MessageKind::Other(cmd),
        }
    }

    /// True for messages that carry position records.
    pub fn has_position(self) -> bool {
        matches!(
            self,
            MessageKind::Aaa | MessageKind::Aff | MessageKind::Cce | MessageKind::Ccc
        )
    }
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    pub kind: MessageKind,
    /// Position records, in the order the device sent them (empty for messages without
    /// position).
    pub fixes: Vec<Fix<'a>>,
    /// Records the message carries as the device counts them (1 for AAA, the declared
    /// packet count for CCE, the record count for CCC, 0 without position). Replies
    /// confirm this number, whatever happened to the individual records.
    pub records: u32,
    /// Records of a batch that did not decode (skipped; the rest of the batch is in
    /// `fixes`). Offsets are from the frame start.
    pub rejected: Vec<DecodeError>,
    /// Records still in the device's cache, as a batch header declares (CCE, CCC).
    pub cached_records: Option<u32>,
}
