#!/usr/bin/env bash
# Short fuzz run of every cargo-fuzz target, for CI: seed the corpora, build all targets
# once (address sanitizer; -O except the gateway's config target, see below), run each
# for FUZZ_SECONDS (default 10) and fail on the first crash (cargo fuzz exits non-zero and leaves the input in fuzz/artifacts/<target>/).
# Works on stable through RUSTC_BOOTSTRAP=1; installs cargo-fuzz if missing.
#
# With TRACKGATE_RELIABILITY_OUT=<dir>, writes <dir>/fuzz-<target>.json (executions, time).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
secs="${FUZZ_SECONDS:-10}"
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
"$here/seed_corpus.sh" >/dev/null
target_dir="${CARGO_TARGET_DIR:-$here/target}/fuzz"
cd "$here"
targets="$(cargo fuzz list)"
# The decoder targets need the protocols crate alone: optimised (-O) they build in about a
# minute. config_parse needs the whole gateway (feature `gateway`), whose dependency tree
# took 7.5 of a 20-minute CI optimised; unoptimised (--dev) it builds in 3 and still runs
# thousands of inputs a second. FUZZ_GATEWAY_BUILD=-O for longer campaigns.
gateway_build="${FUZZ_GATEWAY_BUILD:---dev}"
gateway_targets="config_parse chunk_decode"
build_flags() {
  if [[ " $gateway_targets " == *" $1 "* ]]; then
    echo "$gateway_build --features gateway"
  else
    echo "-O"
  fi
}
cargo fuzz build -O --target-dir "$target_dir"
for t in $gateway_targets; do
  # shellcheck disable=SC2046
  cargo fuzz build $(build_flags "$t") --target-dir "$target_dir" "$t"
done
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
for t in $targets; do
  log="$logs/$t.log"
  start=$(date +%s)
  # shellcheck disable=SC2046
  if ! cargo fuzz run $(build_flags "$t") --target-dir "$target_dir" "$t" "$here/corpus/$t" -- \
      -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz/ci.sh: $t FAILED (crash input in fuzz/artifacts/$t/)" >&2
    exit 1
  fi
  execs="$(awk '/stat::number_of_executed_units/ {print $2}' "$log" | tail -n 1)"
  corpus="$(ls "$here/corpus/$t" | wc -l)"
  echo "fuzz/ci.sh: $t ok: ${execs:-?} executions in ${secs}s, corpus $corpus"
  if [ -n "${TRACKGATE_RELIABILITY_OUT:-}" ]; then
    mkdir -p "$TRACKGATE_RELIABILITY_OUT"
    printf '{"target": "%s", "executions": %s, "seconds": %s, "wall_s": %s, "crashes": 0, "corpus": %s}\n' \
      "$t" "${execs:-0}" "$secs" "$(( $(date +%s) - start ))" "$corpus" \
      >"$TRACKGATE_RELIABILITY_OUT/fuzz-$t.json"
  fi
done
