#!/usr/bin/env bash
# Where the time goes under load: redis-server, `trackgate serve` and `trackgate loadgen`
# on this machine, sampled system-wide with `perf record -e cpu-clock` (software clock:
# works where hardware counters are not exposed, as in most VMs).
#
#   benches/profile.sh [FIXES_PER_S] [SECONDS]      (defaults: 10000, 20)
#
# Prints the CPU share per process and the hottest symbols of the gateway and of Redis.
# Needs: perf (Debian: linux-perf), redis-server, a release build (cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-10000}
secs=${2:-20}
bin=target/release/trackgate
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
command -v perf >/dev/null || { echo "perf not found (apt-get install linux-perf)" >&2; exit 1; }

source benches/stack.sh
start_redis rport
start_gateway "$rport"
devices=1000
batch=10
interval=$(python3 -c "print($devices * $batch / $rate)")
"$bin" loadgen --target "127.0.0.1:$gport" --devices $devices --interval-s "$interval" \
  --cce-share 1 --batch-fixes $batch --ramp-s 1 --duration-s $((secs + 4)) --quiet \
  --report-json "$work/load.json" &
lg=$!
pids+=($lg)
sleep 3
perf record -q -e cpu-clock -F 499 -a -o "$work/perf.data" -- sleep "$secs" 2>/dev/null
wait $lg || true
echo "== CPU samples per thread name, both cores (swapper = idle; tg-gateway = trackgate serve, tg-loadgen = the load generator)"
perf report -q -i "$work/perf.data" --sort comm --stdio 2>/dev/null | head -10 || true
echo "== hottest symbols in the gateway (share of the gateway's own samples)"
perf report -q -i "$work/perf.data" --comms tg-gateway --percentage relative --sort dso,symbol --stdio 2>/dev/null \
  | sed -E 's/ {2,}/  /g; s/ +- +- *$//' | head -30 || true
echo "== hottest symbols in redis-server (share of its own samples)"
perf report -q -i "$work/perf.data" --comms redis-server --percentage relative --sort dso,symbol --stdio 2>/dev/null \
  | sed -E 's/ {2,}/  /g; s/ +- +- *$//' | head -15 || true
echo "== hottest symbols in the load generator (share of its own samples)"
perf report -q -i "$work/perf.data" --comms tg-loadgen --percentage relative --sort dso,symbol --stdio 2>/dev/null \
  | sed -E 's/ {2,}/  /g; s/ +- +- *$//' | head -20 || true
echo "== load generator summary"
python3 -c "import json; r=json.load(open('$work/load.json')); t=r['totals']; l=r['latency']; print(f\"sent {t['fixes_sent']} confirmed {t['fixes_acked']} p50 {l['p50_ms']:.1f} ms p99 {l['p99_ms']:.1f} ms\")"
