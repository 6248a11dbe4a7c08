//! Gateway hot paths besides decoding: the pseudonymizer (one HMAC per new connection,
//! cached after), laying fixes out for storage, and encoding a write batch into the Redis
//! pipeline bytes. Baselines in the same groups: a plain SHA-256 of the same input (the
//! HMAC costs two compressions more), and a memcpy of the encoded bytes.

#![allow(clippy::expect_used, clippy::unwrap_used)] // bench set-up fails loudly

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use redis::Pipeline;
use sha2::Digest;
use trackgate::loadgen::fleet::sample_fixes;
use trackgate::pseudonym::{Imei, KeyRing};
use trackgate::sink::{Upkeep, WriteJob, build_pipeline};

/// The default `retention.ingest_upkeep_interval_s`.
const UPKEEP: Upkeep = Upkeep {
    interval: Duration::from_secs(60),
    late_after: Duration::from_secs(3600),
};
use trackgate::store::StoredFix;
use trackgate_protocols::MessageKind;

fn pseudonymize(c: &mut Criterion) {
    let ring = KeyRing::ephemeral();
    let imei = Imei::new("350000000000001").unwrap();
    let mut g = c.benchmark_group("pseudonym");
    g.bench_function("sha256_baseline", |b| {
        b.iter(|| sha2::Sha256::digest(black_box(b"imei:350000000000001")))
    });
    g.bench_function("hmac_pseudonym", |b| {
        b.iter(|| ring.pseudonym(black_box(&imei)))
    });
    g.finish();
}

fn write_batch(c: &mut Criterion) {
    let ring = KeyRing::ephemeral();
    let route = sample_fixes(1, 512);
    // 64 devices × 8 fixes: a typical batch under load.
    let jobs: Vec<WriteJob> = (0..64)
        .map(|d| {
            let imei = Imei::new(&format!("3500000000{d:05}")).unwrap();
            WriteJob {
                device: ring.pseudonym(&imei),
                fixes: (0..8)
                    .map(|i| StoredFix::from_fix(MessageKind::Aaa, &route[d * 8 + i]))
                    .collect(),
                received_ms: 1_700_000_000_000,
                ttl: Duration::from_secs(90 * 86400),
                done: None,
            }
        })
        .collect();
    let encoded = build_pipeline(&jobs, "bench-1", UPKEEP).get_packed_pipeline();
    let mut g = c.benchmark_group("write_batch");
    g.throughput(Throughput::Elements(64 * 8));
    g.bench_function("memcpy_baseline", |b| {
        b.iter(|| black_box(&encoded).clone())
    });
    g.bench_function("store_layout_512_fixes", |b| {
        b.iter(|| {
            (0..512)
                .map(|i| {
                    StoredFix::from_fix(MessageKind::Aaa, black_box(&route[i]))
                        .fields
                        .len()
                })
                .sum::<usize>()
        })
    });
    g.bench_function("pipeline_encode_512_fixes", |b| {
        b.iter(|| {
            let p: Pipeline = build_pipeline(black_box(&jobs), "bench-1", UPKEEP);
            p.get_packed_pipeline().len()
        })
    });
    g.finish();
    println!(
        "encoded batch: {} bytes for 512 fixes ({} B/fix on the wire)",
        encoded.len(),
        encoded.len() / 512
    );
}

criterion_group!(benches, pseudonymize, write_batch);
criterion_main!(benches);
