//! Arbitrary payloads wrapped in a valid CCC envelope, so every input reaches the CCC
//! decoder (a raw-bytes target would spend its time failing the checksum).
#![no_main]

use libfuzzer_sys::fuzz_target;
use trackgate_protocols::encode::frame;
use trackgate_protocols::{Direction, Framer, Scan, decode};

fuzz_target!(|payload: &[u8]| {
    let mut raw = Vec::new();
    if frame(Direction::DeviceToServer, b'A', "350000000000001", b"CCC", payload, &mut raw).is_err() {
        return;
    }
    if let Scan::Frame(f) = Framer::new(Direction::DeviceToServer, 1 << 16).scan(&raw) {
        let _ = decode(&f);
    }
});
