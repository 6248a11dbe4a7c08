#!/usr/bin/env bash
# Run the reliability suite (issue 7) and render RELIABILITY.md from its results.
#
#   scripts/reliability.sh                 # fault/bad-input/security tests + 60 s per fuzz target
#   FUZZ_SECONDS=600 scripts/reliability.sh
#   TRACKGATE_SOAK_S=60 scripts/reliability.sh   # hold the load 60 s around each fault
#
# The tests write JSON results to $TRACKGATE_RELIABILITY_OUT (default
# target/reliability); scripts/render_reliability.py turns them into RELIABILITY.md.
# Exits non-zero (and leaves RELIABILITY.md alone) if any test or fuzz target fails.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${TRACKGATE_RELIABILITY_OUT:-${CARGO_TARGET_DIR:-$root/target}/reliability}"
rm -rf "$out"
mkdir -p "$out"
export TRACKGATE_RELIABILITY_OUT="$out"
export FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
# A campaign, not a CI smoke run: the config target optimised too (fuzz/ci.sh).
export FUZZ_GATEWAY_BUILD="${FUZZ_GATEWAY_BUILD:--O}"

t0=$(date +%s)
cargo test --test faults --test bad_input --test isolation --test privacy_scan --test tls \
  --test ingest 2>&1 | tee "$out/tests.log"
t1=$(date +%s)
"$root/fuzz/ci.sh" 2>&1 | tee "$out/fuzz.log"
t2=$(date +%s)
printf '{"tests_wall_s": %s, "fuzz_wall_s": %s, "fuzz_seconds_per_target": %s, "soak_s": "%s", "date": "%s", "commit": "%s", "host_cpus": %s}\n' \
  "$((t1 - t0))" "$((t2 - t1))" "$FUZZ_SECONDS" "${TRACKGATE_SOAK_S:-}" \
  "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')" \
  "$(nproc)" >"$out/meta.json"
python3 "$root/scripts/render_reliability.py" "$out" >"$root/RELIABILITY.md"
echo "RELIABILITY.md written from $out"
