//! Sans-I/O implementation of the Meitrack GPRS protocol.
//!
//! * [`Framer`] finds `$$…*XX\r\n` frames in a byte buffer, checks the declared length and
//!   checksum, and says how many bytes to skip after garbage.
//! * [`decode`] turns a checked [`Frame`] into a [`Message`] of typed [`Fix`] records
//!   (AAA/AFF text reports, CCE and CCC binary batches; other commands decode to a
//!   [`Message`] without fixes).
//! * [`encode`] writes the server's replies and commands (`@@` frames) and, for simulators
//!   and round-trip tests, device reports.
//!
//! No I/O, no async runtime, no logging: every outcome is a value. Nothing here panics on
//! any input (fuzzed; see `fuzz/`).

mod aaa;
mod binary;
mod ccc;
mod cce;
mod checksum;
mod decode;
pub mod encode;
mod error;
mod framer;
#[cfg(feature = "json")]
pub mod json;
mod record;
mod text;

pub use checksum::checksum;
pub use decode::{Reply, decode, expected_reply};
pub use error::{DecodeError, EncodeError, FrameError};
pub use framer::{DEFAULT_MAX_FRAME_BYTES, Direction, Frame, Framer, MAX_FRAME_BYTES_LIMIT, Scan};
pub use record::{
    Analog, Cell, EPOCH_2000_UNIX_S, Extra, ExtraKey, ExtraValue, Fix, Message, MessageKind,
};
