//! Arbitrary bytes through the framer, split at a fuzzer-chosen point the way a socket
//! splits them: no panic, every skip in bounds, and the split never changes the frames.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trackgate_protocols::{Framer, Scan, decode};

fn frames(framer: &Framer, input: &[u8], split: usize) -> Vec<Vec<u8>> {
    let mut buf = Vec::new();
    let mut found = Vec::new();
    for chunk in [&input[..split], &input[split..]] {
        buf.extend_from_slice(chunk);
        loop {
            match framer.scan(&buf) {
                Scan::Frame(f) => {
                    let _ = decode(&f);
                    let n = f.len();
                    found.push(f.raw().to_vec());
                    buf.drain(..n);
                }
                Scan::Reject { skip, .. } => {
                    assert!(skip >= 1 && skip <= buf.len());
                    buf.drain(..skip);
                }
                Scan::Incomplete { .. } => break,
            }
        }
    }
    found
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else {
        return;
    };
    let framer = Framer::default();
    let split = usize::from(split).min(input.len());
    assert_eq!(frames(&framer, input, split), frames(&framer, input, input.len()));
});
