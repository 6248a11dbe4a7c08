#!/usr/bin/env bash
# CPU cost per 1,000 confirmed fixes of the gateway and of Redis at a fixed offered load,
# for two or more trackgate builds, runs alternating (A B A B …) so that the box's drift
# falls on every build alike. A ramp (`trackgate bench`) finds where the tail latency
# breaks, which on a shared 2-core box moves by ±30 % between runs; CPU per fix at a load
# both builds sustain moves by a few per cent, so a regression shows here first.
#
#   benches/cpu-ab.sh RATE SECONDS ROUNDS BINARY...
#   benches/cpu-ab.sh 60000 20 3 /tmp/old/trackgate target/release/trackgate
#
# The load generator is the first binary's (the same load for every build): 1,000
# devices, CCE batches of 10. Prints one line per run and the mean per build.
# Needs: redis-server, release builds.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 4 ] || { sed -n 2,12p "$0" >&2; exit 2; }
rate=$1 secs=$2 rounds=$3
shift 3
builds=("$@")
loadgen=${builds[0]}

source benches/stack.sh

# utime + stime of a process, in clock ticks.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

declare -A sum_gw sum_redis
for ((r = 1; r <= rounds; r++)); do
  for b in "${builds[@]}"; do
    bin=$b
    pids=()
    start_redis rport
    rpid=${pids[-1]}
    start_gateway "$rport"
    g0=$(ticks "$gpid") r0=$(ticks "$rpid")
    "$loadgen" loadgen --target "127.0.0.1:$gport" --devices 1000 \
      --interval-s "$(python3 -c "print(1000 * 10 / $rate)")" --cce-share 1 --batch-fixes 10 \
      --ramp-s 1 --duration-s "$secs" --quiet --report-json "$work/load.json" >/dev/null
    g1=$(ticks "$gpid") r1=$(ticks "$rpid")
    # Script calls (one per device and batch) and pipelines: fewer per fix = more batching.
    calls=$(redis-cli -p "$rport" info commandstats | awk -F'[=,:]' '/^cmdstat_evalsha:/ {print $3}')
    acked=$(python3 -c "import json; print(json.load(open('$work/load.json'))['totals']['fixes_acked'])")
    p99=$(python3 -c "import json; print(round(json.load(open('$work/load.json'))['latency']['p99_ms'], 1))")
    gw=$(python3 -c "print(round(($g1 - $g0) / $hz * 1e6 / $acked, 3))")
    rd=$(python3 -c "print(round(($r1 - $r0) / $hz * 1e6 / $acked, 3))")
    per_call=$(python3 -c "print(round($acked / max(${calls:-0}, 1), 2))")
    echo "round $r  $b  confirmed $acked  p99 ${p99} ms  gateway ${gw} ms  redis ${rd} ms per 1k fixes  fixes/script call ${per_call}"
    sum_gw[$b]=$(python3 -c "print(${sum_gw[$b]:-0} + $gw)")
    sum_redis[$b]=$(python3 -c "print(${sum_redis[$b]:-0} + $rd)")
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "${work:?}"/*
  done
done
for b in "${builds[@]}"; do
  python3 -c "print(f'mean  $b  gateway {${sum_gw[$b]} / $rounds:.3f}  redis {${sum_redis[$b]} / $rounds:.3f} ms per 1k fixes')"
done
