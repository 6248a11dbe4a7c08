//! Test-vector loading and the comparison rule of the protocol notes §7, shared by the
//! crate's vector tests and the `trackgate decode` CLI tests (included by `#[path]`).
//!
//! Vectors come from `../shared/protocol/vectors/` (the team's spec; new files are picked
//! up automatically) and from `protocols/tests/vectors/` (frames we added ourselves).
//! `TRACKGATE_VECTORS_DIR` adds another directory.

#![allow(dead_code, unreachable_pub, clippy::expect_used)]

use std::path::{Path, PathBuf};

use serde_json::Value;

/// One vector: a frame and the JSON lines `trackgate decode` must print for it.
#[derive(Debug)]
pub struct Vector {
    pub label: String,
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    pub expected: Vec<Value>,
}

impl Vector {
    /// Whether the vector expects an error line rather than records.
    pub fn is_negative(&self) -> bool {
        self.expected.iter().any(|v| v.get("error").is_some())
    }
}

/// The directories holding vectors. The shared one must exist: a test that silently
/// checked nothing would be worse than a failing one.
pub fn vector_dirs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The manifest is either the workspace root or `protocols/`.
    let workspace = if root.join("protocols").is_dir() {
        root.to_path_buf()
    } else {
        root.join("..")
    };
    let shared = workspace.join("../shared/protocol/vectors");
    assert!(
        shared.is_dir(),
        "shared vectors not found at {} (CI checks ../shared out beside the repo)",
        shared.display()
    );
    let mut dirs = vec![shared, workspace.join("protocols/tests/vectors")];
    if let Some(extra) = std::env::var_os("TRACKGATE_VECTORS_DIR") {
        dirs.push(PathBuf::from(extra));
    }
    dirs
}

/// Every vector in every directory, sorted by label.
pub fn load_vectors() -> Vec<Vector> {
    let mut out = Vec::new();
    for dir in vector_dirs() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("readable directory entry").path();
            if path.extension().and_then(|e| e.to_str()) != Some("hex") {
                continue;
            }
            let label = path
                .file_stem()
                .and_then(|s| s.to_str())
                .expect("utf-8 file name")
                .to_owned();
            let text = std::fs::read_to_string(&path).expect("readable .hex file");
            let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
            let bytes = hex::decode(&compact)
                .unwrap_or_else(|e| panic!("{}: bad hex: {e}", path.display()));
            let exp_path = dir.join(format!("{label}.expected.jsonl"));
            let exp_text = std::fs::read_to_string(&exp_path)
                .unwrap_or_else(|e| panic!("{}: {e}", exp_path.display()));
            let expected = exp_text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| {
                    serde_json::from_str(l)
                        .unwrap_or_else(|e| panic!("{}: bad JSON line: {e}", exp_path.display()))
                })
                .collect();
            out.push(Vector {
                label,
                path,
                bytes,
                expected,
            });
        }
    }
    out.sort_by(|a, b| a.label.cmp(&b.label));
    assert!(
        out.len() >= 10,
        "expected the shared vectors, found {}",
        out.len()
    );
    out
}

/// Check `actual` against `expected` per §7; returns every mismatch found.
pub fn compare_lines(actual: &[Value], expected: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    if actual.len() != expected.len() {
        problems.push(format!(
            "{} lines printed, {} expected",
            actual.len(),
            expected.len()
        ));
    }
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        compare_value(&format!("line {}", i + 1), a, e, &mut problems);
    }
    problems
}

fn compare_value(at: &str, actual: &Value, expected: &Value, problems: &mut Vec<String>) {
    match (actual, expected) {
        (Value::Object(a), Value::Object(e)) => {
            for (k, ev) in e {
                let here = format!("{at}.{k}");
                match a.get(k) {
                    None => problems.push(format!("{here}: missing (expected {ev})")),
                    Some(av) if k == "time" => compare_time(&here, av, ev, problems),
                    Some(av) => compare_value(&here, av, ev, problems),
                }
            }
        }
        (Value::Number(a), Value::Number(e)) => {
            let (Some(a), Some(e)) = (a.as_f64(), e.as_f64()) else {
                problems.push(format!("{at}: not comparable numbers"));
                return;
            };
            if (a - e).abs() > 1e-6 {
                problems.push(format!("{at}: {a} != expected {e}"));
            }
        }
        (Value::Array(a), Value::Array(e)) if a.len() == e.len() => {
            for (i, (av, ev)) in a.iter().zip(e).enumerate() {
                compare_value(&format!("{at}[{i}]"), av, ev, problems);
            }
        }
        (a, e) if a == e => {}
        (a, e) => problems.push(format!("{at}: {a} != expected {e}")),
    }
}

fn compare_time(at: &str, actual: &Value, expected: &Value, problems: &mut Vec<String>) {
    let parse = |v: &Value| v.as_str().and_then(|s| s.parse::<jiff::Timestamp>().ok());
    match (parse(actual), parse(expected)) {
        (Some(a), Some(e)) if a == e => {}
        _ => problems.push(format!(
            "{at}: {actual} != expected {expected} (as instants)"
        )),
    }
}
