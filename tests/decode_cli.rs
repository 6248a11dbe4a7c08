//! `trackgate decode` as a user runs it: every vector through `--hex`, a raw capture
//! through stdin, hex lines through a file, and the exit status.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

#[path = "../protocols/tests/support/mod.rs"]
mod support;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use support::{compare_lines, load_vectors};

fn trackgate(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_trackgate"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn trackgate");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    child.wait_with_output().expect("trackgate runs")
}

fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8(out.stdout.clone())
        .expect("utf-8 stdout")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

#[test]
fn every_vector_through_hex_argument() {
    let mut failures = Vec::new();
    for v in load_vectors() {
        let out = trackgate(&["decode", "--hex", &hex::encode(&v.bytes)], b"");
        let mut problems = compare_lines(&json_lines(&out), &v.expected);
        let want = if v.is_negative() { 1 } else { 0 };
        if out.status.code() != Some(want) {
            problems.push(format!(
                "exit status {:?}, expected {want}",
                out.status.code()
            ));
        }
        if !problems.is_empty() {
            failures.push(format!("{}:\n  {}", v.label, problems.join("\n  ")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn raw_capture_on_stdin_skips_junk_between_frames() {
    let positives: Vec<_> = load_vectors()
        .into_iter()
        .filter(|v| !v.is_negative())
        .collect();
    let mut capture = Vec::new();
    let mut expected = Vec::new();
    for v in &positives {
        capture.extend_from_slice(b"\x00\xffnoise\r\n");
        capture.extend_from_slice(&v.bytes);
        expected.extend(v.expected.iter().cloned());
    }
    let out = trackgate(&["decode"], &capture);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let problems = compare_lines(&json_lines(&out), &expected);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn hex_lines_file_reports_errors_in_order_and_exits_1() {
    let vectors = load_vectors();
    let dir = std::env::temp_dir().join(format!("trackgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("frames.txt");
    let mut text = String::from("# a comment\n\n");
    let mut expected = Vec::new();
    for v in &vectors {
        text.push_str(&hex::encode(&v.bytes));
        text.push('\n');
        expected.extend(v.expected.iter().cloned());
    }
    std::fs::write(&file, text).expect("write hex lines");
    let out = trackgate(
        &["decode", "--hex-lines", file.to_str().expect("utf-8 path")],
        b"",
    );
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(
        out.status.code(),
        Some(1),
        "negative vectors make the exit status 1"
    );
    let problems = compare_lines(&json_lines(&out), &expected);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn error_lines_carry_kind_offset_and_detail() {
    let out = trackgate(&["decode", "--hex", "242441313030 2c333530"], b""); // "$$A100,350" then EOF
    assert_eq!(out.status.code(), Some(1));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1);
    let err = &lines[0]["error"];
    assert_eq!(err["kind"], "incomplete");
    assert_eq!(err["offset"], 0);
    assert!(err["detail"].as_str().is_some_and(|d| !d.is_empty()));

    let out = trackgate(&["decode", "--hex", "zz"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json_lines(&out)[0]["error"]["kind"], "hex");
}

#[test]
fn pretty_output_is_the_same_json() {
    let v = load_vectors()
        .into_iter()
        .find(|v| !v.is_negative())
        .expect("a positive vector");
    let hex = hex::encode(&v.bytes);
    let compact = trackgate(&["decode", "--hex", &hex], b"");
    let pretty = trackgate(&["decode", "--pretty", "--hex", &hex], b"");
    let text = String::from_utf8(pretty.stdout).expect("utf-8");
    assert!(
        text.lines().count() > json_lines(&compact).len(),
        "pretty spans lines"
    );
    let parsed: Vec<Value> = serde_json::Deserializer::from_str(&text)
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("pretty output is a JSON stream");
    assert_eq!(parsed, json_lines(&compact));
}
