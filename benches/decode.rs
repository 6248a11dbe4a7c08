//! The gateway's per-connection decode path over real frames: scan the stream, decode
//! each frame, encode the reply the device expects. Input: every positive vector of
//! `../shared/protocol/vectors` back to back (real devices, real field mixes), compared
//! with a checksum-only pass over the same bytes in the same group.

#![allow(clippy::expect_used, clippy::unwrap_used)] // bench set-up fails loudly

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use trackgate_protocols::{Framer, Scan, checksum, decode, expected_reply};

fn capture() -> Vec<u8> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/protocol/vectors");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "hex"))
        .collect();
    files.sort();
    let framer = Framer::new(trackgate_protocols::Direction::DeviceToServer, 4096);
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let bytes = hex::decode(text.split_whitespace().collect::<String>()).unwrap();
        // Only frames that decode: this measures the good path.
        if let Scan::Frame(fr) = framer.scan(&bytes) {
            if fr.len() == bytes.len() && decode(&fr).is_ok() {
                out.extend_from_slice(&bytes);
            }
        }
    }
    out
}

fn decode_path(c: &mut Criterion) {
    let stream = capture();
    let framer = Framer::new(trackgate_protocols::Direction::DeviceToServer, 4096);
    let mut g = c.benchmark_group("gateway/decode_path");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("checksum_only", |b| b.iter(|| checksum(black_box(&stream))));
    let mut reply = Vec::with_capacity(64);
    g.bench_function("scan_decode_reply", |b| {
        b.iter(|| {
            let mut buf = black_box(stream.as_slice());
            let mut fixes = 0usize;
            while let Scan::Frame(f) = framer.scan(buf) {
                let msg = decode(&f).unwrap();
                fixes += msg.fixes.len();
                if let Some(r) = expected_reply(&msg, true) {
                    reply.clear();
                    r.encode(f.flag(), f.imei(), &mut reply).unwrap();
                }
                buf = &buf[f.len()..];
            }
            fixes
        })
    });
    g.finish();
}

criterion_group!(benches, decode_path);
criterion_main!(benches);
