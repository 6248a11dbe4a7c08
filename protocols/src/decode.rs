//! Dispatch a checked frame to its decoder, and say which reply it expects.

use crate::error::{DecodeError, EncodeError};
use crate::framer::Frame;
use crate::record::{Message, MessageKind};
use crate::{aaa, ccc, cce, encode};

/// Decode a frame the [`crate::Framer`] accepted. Errors carry offsets from the frame start.
pub fn decode<'a>(frame: &Frame<'a>) -> Result<Message<'a>, DecodeError> {
    let kind = MessageKind::from_command(frame.command());
    let payload = frame.payload();
    let shift = |e: DecodeError| e.shifted(frame.payload_offset());
    let mut fixes = Vec::new();
    let mut rejected = Vec::new();
    let mut cached_records = None;
    let mut records = 0;
    match kind {
        MessageKind::Aaa | MessageKind::Aff => {
            fixes.push(aaa::decode(payload, kind == MessageKind::Aff).map_err(shift)?);
            records = 1;
        }
        MessageKind::Cce => {
            let (cached, n) = cce::decode(payload, &mut fixes, &mut rejected).map_err(shift)?;
            (cached_records, records) = (Some(cached), n);
        }
        MessageKind::Ccc => {
            let (cached, n) = ccc::decode(payload, &mut fixes, &mut rejected).map_err(shift)?;
            (cached_records, records) = (Some(cached), n);
        }
        _ => {}
    }
    rejected
        .iter_mut()
        .for_each(|e| *e = e.shifted(frame.payload_offset()));
    Ok(Message {
        kind,
        fixes,
        records,
        rejected,
        cached_records,
    })
}

/// A reply the server owes the device for a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// `CCC,<n>`: the device may delete `n` records from its cache.
    Ccc { records: u32 },
    /// `CCE,<n>`: the same for CCE batches (sent when `confirm_cce` is on).
    Cce { records: u32 },
    /// `AAC,1`: the confirmation the device asked for.
    Aac,
}

impl Reply {
    /// Encode as an `@@` frame answering a frame with `flag` from `imei`.
    pub fn encode(&self, flag: u8, imei: &str, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let digits;
        let (cmd, param): (&[u8; 3], &[u8]) = match *self {
            Reply::Ccc { records } => {
                digits = itoa_buf(records);
                (b"CCC", digits.as_slice())
            }
            Reply::Cce { records } => {
                digits = itoa_buf(records);
                (b"CCE", digits.as_slice())
            }
            Reply::Aac => (b"AAC", b"1"),
        };
        encode::frame(
            crate::Direction::ServerToDevice,
            flag,
            imei,
            cmd,
            param,
            out,
        )
    }
}

/// Decimal digits of `v` without allocating.
fn itoa_buf(v: u32) -> DigitBuf {
    let mut buf = [0u8; 10];
    let mut i = buf.len();
    let mut v = v;
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    DigitBuf { buf, start: i }
}

struct DigitBuf {
    buf: [u8; 10],
    start: usize,
}

impl DigitBuf {
    fn as_slice(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// The reply `message` calls for, if any. CCE batches are confirmed only when
/// `confirm_cce` is set (the protocol notes §5 explain why it is a switch).
pub fn expected_reply(message: &Message<'_>, confirm_cce: bool) -> Option<Reply> {
    // The device counts the records it sent, including any we could not decode or chose
    // not to store: confirming fewer would make it resend the batch.
    let records = message.records;
    match message.kind {
        MessageKind::Ccc => Some(Reply::Ccc { records }),
        MessageKind::Cce if confirm_cce => Some(Reply::Cce { records }),
        MessageKind::Aac => Some(Reply::Aac),
        _ => None,
    }
}
