//! Suite results for RELIABILITY.md: when `TRACKGATE_RELIABILITY_OUT` names a directory,
//! tests write one JSON file per result there (`scripts/reliability.sh` renders them).

use serde_json::Value;

/// Write `value` as `<dir>/<name>.json` if `TRACKGATE_RELIABILITY_OUT` is set.
pub fn record(name: &str, value: &Value) {
    let Some(dir) = std::env::var_os("TRACKGATE_RELIABILITY_OUT") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(value).unwrap(),
    )
    .unwrap();
}
