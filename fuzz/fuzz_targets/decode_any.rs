//! Arbitrary command and payload in a valid envelope: reaches every decoder, including
//! the ones for messages without a position.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trackgate_protocols::encode::frame;
use trackgate_protocols::{Direction, Framer, Scan, decode, expected_reply};

fuzz_target!(|data: &[u8]| {
    let Some((cmd, payload)) = data.split_first_chunk::<3>() else {
        return;
    };
    let mut raw = Vec::new();
    if frame(Direction::DeviceToServer, b'A', "350000000000001", cmd, payload, &mut raw).is_err() {
        return;
    }
    if let Scan::Frame(f) = Framer::new(Direction::DeviceToServer, 1 << 16).scan(&raw) {
        if let Ok(msg) = decode(&f) {
            if let Some(reply) = expected_reply(&msg, true) {
                let mut out = Vec::new();
                let _ = reply.encode(f.flag(), f.imei(), &mut out);
            }
        }
    }
});
