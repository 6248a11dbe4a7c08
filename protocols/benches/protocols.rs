//! Hot-path benches: the framer and each decoder, each in one group with a checksum-only
//! pass over the same bytes. The checksum pass touches every byte once and does nothing
//! else, so "decode throughput / checksum throughput" is a machine-independent figure of
//! how much work decoding adds (goal: ≥ 25 %).

#![allow(clippy::expect_used, clippy::unwrap_used)] // bench set-up fails loudly

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use jiff::Timestamp;
use trackgate_protocols::encode::{self, aaa_payload, ccc_payload, cce_payload};
use trackgate_protocols::{Analog, Cell, Direction, Fix, Framer, Reply, Scan, checksum, decode};

const IMEI: &str = "350000000000001"; // fake

fn fix(i: u32) -> Fix<'static> {
    Fix {
        event: Some(35),
        time: Some(Timestamp::from_second(1_700_000_000 + i64::from(i)).unwrap()),
        valid: Some(true),
        lat_e6: Some(-27_257_698 + i as i32),
        lon_e6: Some(153_030_471 - i as i32),
        speed_kmh_x10: Some(380),
        course_deg: Some(101),
        altitude_m: Some(12),
        satellites: Some(14),
        hdop_x10: Some(8),
        gsm_signal: Some(24),
        mileage_m: Some(48_204 + u64::from(i)),
        runtime_s: Some(1_234_567),
        cell: Some(Cell {
            mcc: 505,
            mnc: 1,
            lac: 0x2f1c,
            cell_id: 0x1b3e,
        }),
        inputs: Some(2),
        outputs: Some(0),
        analog: Analog {
            adc_raw: [Some(3), Some(0), Some(0)],
            battery_raw: Some(422),
            power_raw: Some(0x0510),
            ..Analog::default()
        },
        ..Fix::default()
    }
}

fn report(cmd: &[u8; 3], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode::frame(
        Direction::DeviceToServer,
        b'A',
        IMEI,
        cmd,
        payload,
        &mut out,
    )
    .unwrap();
    out
}

/// One AAA report, one 16-fix CCE batch and one 16-fix CCC batch, as devices send them.
fn samples() -> [(&'static str, Vec<u8>); 3] {
    let fixes: Vec<Fix<'_>> = (0..16).map(fix).collect();
    let mut aaa = Vec::new();
    aaa_payload(&fixes[0], &mut aaa).unwrap();
    let mut cce = Vec::new();
    cce_payload(&fixes, 0, &mut cce).unwrap();
    let mut ccc = Vec::new();
    ccc_payload(&fixes, 0, &mut ccc).unwrap();
    [
        ("aaa", report(b"AAA", &aaa)),
        ("cce_x16", report(b"CCE", &cce)),
        ("ccc_x16", report(b"CCC", &ccc)),
    ]
}

fn decoders(c: &mut Criterion) {
    let framer = Framer::new(Direction::DeviceToServer, 4096);
    for (name, raw) in samples() {
        let mut g = c.benchmark_group(format!("decode/{name}"));
        g.throughput(Throughput::Bytes(raw.len() as u64));
        g.bench_function("checksum_only", |b| b.iter(|| checksum(black_box(&raw))));
        g.bench_function("frame", |b| {
            b.iter(|| match framer.scan(black_box(&raw)) {
                Scan::Frame(f) => f.len(),
                _ => unreachable!(),
            })
        });
        g.bench_function("frame_and_decode", |b| {
            b.iter(|| match framer.scan(black_box(&raw)) {
                Scan::Frame(f) => decode(&f).map(|m| m.fixes.len()).unwrap_or(0),
                _ => unreachable!(),
            })
        });
        g.finish();
    }
}

/// A capture of many frames with line noise between them: the framer's resync path.
fn framer_stream(c: &mut Criterion) {
    let framer = Framer::new(Direction::DeviceToServer, 4096);
    let mut stream = Vec::new();
    for i in 0..64 {
        for (_, raw) in samples() {
            stream.extend_from_slice(&raw);
        }
        if i % 4 == 0 {
            stream.extend_from_slice(b"\r\nAT+OK\r\n");
        }
    }
    let mut g = c.benchmark_group("framer/stream");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("checksum_only", |b| b.iter(|| checksum(black_box(&stream))));
    g.bench_function("scan_all", |b| {
        b.iter(|| {
            let mut buf = black_box(stream.as_slice());
            let mut frames = 0usize;
            loop {
                match framer.scan(buf) {
                    Scan::Frame(f) => {
                        frames += 1;
                        buf = &buf[f.len()..];
                    }
                    Scan::Reject { skip, .. } => buf = &buf[skip..],
                    Scan::Incomplete { .. } => break frames,
                }
            }
        })
    });
    g.finish();
}

fn replies(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode/ack");
    let mut out = Vec::with_capacity(64);
    g.bench_function("ccc_reply", |b| {
        b.iter(|| {
            out.clear();
            Reply::Ccc {
                records: black_box(16),
            }
            .encode(b'A', IMEI, &mut out)
            .unwrap();
            out.len()
        })
    });
    g.finish();
}

criterion_group!(benches, decoders, framer_stream, replies);
criterion_main!(benches);
