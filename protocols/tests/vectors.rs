//! Every vector decodes to what its `.expected.jsonl` says, and the framer finds the same
//! frames whether the bytes arrive whole, byte by byte or in random chunks.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod support;

use proptest::prelude::*;
use serde_json::Value;
use support::{compare_lines, load_vectors};
use trackgate_protocols::json::decode_stream;
use trackgate_protocols::{FrameError, Framer, Scan};

fn decode_json(bytes: &[u8]) -> Vec<Value> {
    decode_stream(&Framer::default(), bytes).0
}

#[test]
fn every_vector_decodes_to_its_expected_records() {
    let mut failures = Vec::new();
    let vectors = load_vectors();
    for v in &vectors {
        let (lines, failed) = decode_stream(&Framer::default(), &v.bytes);
        let mut problems = compare_lines(&lines, &v.expected);
        if failed != v.is_negative() {
            problems.push(format!(
                "failed flag {failed}, negative vector {}",
                v.is_negative()
            ));
        }
        if !problems.is_empty() {
            failures.push(format!("{}:\n  {}", v.label, problems.join("\n  ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} vectors differ:\n{}",
        failures.len(),
        vectors.len(),
        failures.join("\n")
    );
}

/// What a connection would see: frames, rejections, skipped junk, leftovers at the end.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    Frame(Vec<u8>),
    Rejected(&'static str),
    Junk(usize),
    Leftover(usize),
}

/// Feed `input` to a growing buffer `chunks` bytes at a time, the way a socket reader does.
fn stream(input: &[u8], chunk_sizes: &mut dyn Iterator<Item = usize>) -> Vec<Event> {
    stream_with(Framer::default(), input, chunk_sizes)
}

fn stream_with(
    framer: Framer,
    input: &[u8],
    chunk_sizes: &mut dyn Iterator<Item = usize>,
) -> Vec<Event> {
    let mut buf: Vec<u8> = Vec::new();
    let mut events = Vec::new();
    let mut junk = 0;
    let mut fed = 0;
    while fed < input.len() {
        let n = chunk_sizes
            .next()
            .unwrap_or(input.len())
            .clamp(1, input.len() - fed);
        buf.extend_from_slice(&input[fed..fed + n]);
        fed += n;
        loop {
            match framer.scan(&buf) {
                Scan::Incomplete { needed } => {
                    if let Some(needed) = needed {
                        assert!(needed >= 1, "Incomplete must ask for at least one byte");
                    }
                    break;
                }
                Scan::Frame(f) => {
                    if junk > 0 {
                        events.push(Event::Junk(std::mem::take(&mut junk)));
                    }
                    let len = f.len();
                    events.push(Event::Frame(f.raw().to_vec()));
                    buf.drain(..len);
                }
                Scan::Reject { error, skip } => {
                    assert!(
                        skip >= 1 && skip <= buf.len(),
                        "skip {skip} of {}",
                        buf.len()
                    );
                    if let FrameError::Junk { .. } = error {
                        junk += skip;
                    } else {
                        if junk > 0 {
                            events.push(Event::Junk(std::mem::take(&mut junk)));
                        }
                        events.push(Event::Rejected(error.kind()));
                    }
                    buf.drain(..skip);
                }
            }
        }
    }
    if junk > 0 {
        events.push(Event::Junk(junk));
    }
    if !buf.is_empty() {
        events.push(Event::Leftover(buf.len()));
    }
    events
}

fn whole(input: &[u8]) -> Vec<Event> {
    stream(input, &mut std::iter::once(input.len()))
}

/// All vectors back to back with line noise between them, as one long capture.
fn capture() -> Vec<u8> {
    let mut out = Vec::new();
    for (i, v) in load_vectors().iter().enumerate() {
        out.extend_from_slice(&v.bytes);
        if i % 3 == 0 {
            out.extend_from_slice(b"\r\nAT+OK$\x00\xff");
        }
    }
    // End on a good frame, so no vector's fate depends on being last in the input.
    out.extend_from_slice(b"$$z27,350000000000099,AAC,1*B9\r\n");
    out
}

#[test]
fn whole_stream_finds_every_positive_vector() {
    let vectors = load_vectors();
    let events = whole(&capture());
    let frames = events
        .iter()
        .filter(|e| matches!(e, Event::Frame(_)))
        .count();
    let positives = vectors.iter().filter(|v| !v.is_negative()).count();
    assert_eq!(
        frames,
        positives + 1,
        "positive vectors plus the closing AAC frame"
    );
}

#[test]
fn byte_by_byte_equals_whole() {
    let input = capture();
    assert_eq!(stream(&input, &mut std::iter::repeat(1)), whole(&input));
}

/// The gateway's framer gives up on bad lengths early; inside a stream that changes only
/// when, not what.
#[test]
fn early_resync_byte_by_byte_equals_whole() {
    let input = capture();
    let early = Framer::default().with_early_resync(true);
    let whole_early = stream_with(early, &input, &mut std::iter::once(input.len()));
    assert_eq!(whole_early, whole(&input));
    assert_eq!(
        stream_with(early, &input, &mut std::iter::repeat(1)),
        whole_early
    );
}

#[test]
fn each_vector_byte_by_byte_equals_whole() {
    for v in load_vectors() {
        assert_eq!(
            stream(&v.bytes, &mut std::iter::repeat(1)),
            whole(&v.bytes),
            "{}",
            v.label
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_chunks_equal_whole(sizes in proptest::collection::vec(1usize..300, 1..64)) {
        let input = capture();
        let mut it = sizes.iter().copied().cycle();
        prop_assert_eq!(stream(&input, &mut it), whole(&input));
        let early = Framer::default().with_early_resync(true);
        let mut it = sizes.into_iter().cycle();
        prop_assert_eq!(stream_with(early, &input, &mut it), whole(&input));
    }
}

#[test]
fn decoded_json_is_independent_of_surrounding_junk() {
    for v in load_vectors().iter().filter(|v| !v.is_negative()) {
        let mut noisy = b"\x00garbage\r\n".to_vec();
        noisy.extend_from_slice(&v.bytes);
        let alone = decode_json(&v.bytes);
        let (lines, _) = decode_stream(&Framer::default(), &noisy);
        assert_eq!(lines, alone, "{}", v.label);
    }
}

/// The comparator itself must be able to fail, or the vector test proves nothing.
#[test]
fn comparator_catches_differences() {
    let expected: Vec<Value> = vec![serde_json::json!({
        "lat": -27.257698, "time": "2025-06-07T02:20:40Z", "extra": {"battery_pct": 96}
    })];
    let ok = serde_json::json!({
        "lat": -27.2576984, "time": "2025-06-07T04:20:40+02:00", "extra": {"battery_pct": 96}, "more": 1
    });
    assert!(compare_lines(std::slice::from_ref(&ok), &expected).is_empty());
    for bad in [
        serde_json::json!({"lat": -27.257700, "time": "2025-06-07T02:20:40Z", "extra": {"battery_pct": 96}}),
        serde_json::json!({"lat": -27.257698, "time": "2025-06-07T02:20:41Z", "extra": {"battery_pct": 96}}),
        serde_json::json!({"lat": -27.257698, "time": "2025-06-07T02:20:40Z", "extra": {}}),
        serde_json::json!({"time": "2025-06-07T02:20:40Z", "extra": {"battery_pct": 96}}),
    ] {
        assert!(
            !compare_lines(std::slice::from_ref(&bad), &expected).is_empty(),
            "{bad}"
        );
    }
    assert!(
        !compare_lines(&[ok.clone(), ok], &expected).is_empty(),
        "line count"
    );
}
