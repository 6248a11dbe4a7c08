#!/usr/bin/env bash
# Redis-side cost of the append script (src/store/scripts/append.lua) per call, against a
# floor script that only XADDs the same entries, in the same run (this box is noisy).
#
#   bash benches/script-cost.sh [ROUNDS] [FIXES_PER_CALL]
#
# Starts its own redis-server on a free port in a temp dir (stopped on exit), loads both
# scripts and drives each with redis-benchmark (-P 16, 1000 random devices, FIXES_PER_CALL
# entries of the stored-fix shape per call), alternating ROUNDS times. The figure is
# Redis's own time per call (INFO commandstats usec_per_call), not client time.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
FIXES=${2:-10}
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
  --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
trap 'redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done

cp src/store/scripts/append.lua "$dir/append.lua"
cat >"$dir/floor.lua" <<'EOF'
local i = 11
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call('XADD', KEYS[1], '*', unpack(ARGV, i + 1, i + n))
  i = i + 1 + n
end
return 1
EOF
append=$(redis-cli -p "$port" SCRIPT LOAD "$(cat "$dir/append.lua")")
floor=$(redis-cli -p "$port" SCRIPT LOAD "$(cat "$dir/floor.lua")")

now_ms=$(($(date +%s) * 1000))
now_s=$((now_ms / 1000))
ttl_ms=7776000000
# One job (frame): received ms, late flag (0: on time), words that follow; per entry: 4
# field/value words, then t and a 30-byte packed d (the layout of append.lua's ARGV).
entries=("$now_ms" 0 $((FIXES * 5)))
for _ in $(seq "$FIXES"); do
  entries+=(4 t "$now_s" d abcdefghijklmnopqrstuvwxyz0123)
done

run() { # sha -> usec per call
  redis-cli -p "$port" CONFIG RESETSTAT >/dev/null
  redis-benchmark -p "$port" -q -n 100000 -P 16 -r 1000 EVALSHA "$1" 4 \
    'tg:{__rand_int__}:fixes' 'tg:{__rand_int__}:meta' 'tg:{__rand_int__}:tomb' \
    'tg:{__rand_int__}:late' 'b__rand_int__' "$ttl_ms" $((now_ms - ttl_ms)) "$now_ms" 1 60000 \
    3600000 "${entries[@]}" >/dev/null
  redis-cli -p "$port" INFO commandstats | tr -d '\r' |
    sed -n 's/^cmdstat_evalsha:.*usec_per_call=\([0-9.]*\).*/\1/p'
}
echo "round  append_us/call  floor_us/call  append/floor   ($FIXES fixes per call)"
for r in $(seq "$ROUNDS"); do
  a=$(run "$append")
  f=$(run "$floor")
  printf '%5d  %14s  %13s  %12s\n' "$r" "$a" "$f" "$(python3 -c "print(f'{$a/$f:.2f}')")"
done
