#!/usr/bin/env bash
# `trackgate loadgen` against two gateways on a local 3-primary + 3-replica Redis Cluster.
#
#   benches/cluster-loadgen.sh [FIXES_PER_S] [SECONDS] [WAIT_REPLICAS]   (defaults: 20000, 30, 1)
#   (LOAD_JSON=path keeps the load generator's report, with its per-second timeline)
#
# Starts the cluster (free ports, temp dir), two `trackgate serve` in cluster mode with
# `redis.wait_replicas`, one load generator spreading 2,000 devices over both gateways
# (CCE batches of 10, every fix confirmed), and prints: the load generator's summary, CPU
# seconds used by each gateway and each Redis node during the run, and Redis memory per
# stored fix. Everything is stopped on exit. Needs a release build and redis-server/redis-cli.
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-20000}
secs=${2:-30}
wait_replicas=${3:-1}
bin=target/release/trackgate
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.5; rm -rf "$work"; }
trap cleanup EXIT

# Six free ports below 55000 whose cluster bus port (+10000) is free too.
read -r -a ports <<<"$(python3 - <<'EOF'
import socket, random
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); return True
    except OSError:
        return False
    finally:
        s.close()
out = []
while len(out) < 6:
    p = random.randint(20000, 44999)
    if p not in out and free(p) and free(p + 10000):
        out.append(p)
print(" ".join(map(str, out)))
EOF
)"
for p in "${ports[@]}"; do
  mkdir -p "$work/r$p"
  redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes --cluster-config-file nodes.conf \
    --save '' --appendonly no --dir "$work/r$p" --logfile redis.log --daemonize no &
  pids+=($!)
done
for p in "${ports[@]}"; do
  until redis-cli -p "$p" ping >/dev/null 2>&1; do sleep 0.1; done
done
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${ports[@]}") --cluster-replicas 1 --cluster-yes >/dev/null
until redis-cli -p "${ports[0]}" cluster info | grep -q 'cluster_state:ok'; do sleep 0.2; done
sleep 2 # replicas link up

"$bin" keys generate "$work/keys.json" >/dev/null
seeds=$(printf '"redis://127.0.0.1:%s", ' "${ports[@]:0:3}")
gw_pids=()
targets=()
for i in 1 2; do
  g=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  h=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  cat > "$work/gw$i.toml" <<EOF
[[listeners]]
bind = "127.0.0.1:$g"
[redis]
mode = "cluster"
cluster_nodes = [${seeds%, }]
wait_replicas = $wait_replicas
[keys]
key_file = "$work/keys.json"
[http]
bind = "127.0.0.1:$h"
EOF
  RUST_LOG=warn "$bin" serve --config "$work/gw$i.toml" 2>"$work/gw$i.log" &
  gw_pids+=($!)
  pids+=($!)
  targets+=(--target "127.0.0.1:$g")
done
sleep 2

cpu_s() { awk '{print ($14 + $15) / 100}' "/proc/$1/stat"; }
node_pids=("${pids[@]:0:6}")
used_mem() { local t=0; for p in "${ports[@]}"; do
  m=$(redis-cli -p "$p" info memory | awk -F: '/^used_memory:/{print $2}' | tr -d '\r'); t=$((t + m)); done; echo $t; }
mem0=$(used_mem)
declare -A cpu0
for p in "${gw_pids[@]}" "${node_pids[@]}"; do cpu0[$p]=$(cpu_s "$p"); done

devices=2000
batch=10
interval=$(python3 -c "print($devices * $batch / $rate)")
"$bin" loadgen "${targets[@]}" --devices $devices --interval-s "$interval" --cce-share 1 \
  --batch-fixes $batch --ramp-s 2 --warmup-s 3 --duration-s "$secs" --quiet --report-json "$work/load.json"
cp "$work/load.json" "${LOAD_JSON:-/dev/null}" 2>/dev/null || true

echo "== CPU seconds over the run (${secs} s; wait_replicas=$wait_replicas)"
for i in 0 1; do p=${gw_pids[$i]}; echo "gateway $((i + 1)): $(python3 -c "print(round($(cpu_s "$p") - ${cpu0[$p]}, 2))")"; done
for i in "${!ports[@]}"; do
  p=${node_pids[$i]}
  role=$(redis-cli -p "${ports[$i]}" info replication | awk -F: '/^role:/{print $2}' | tr -d '\r')
  echo "redis :${ports[$i]} ($role): $(python3 -c "print(round($(cpu_s "$p") - ${cpu0[$p]}, 2))")"
done
stored=0
for p in "${ports[@]}"; do
  role=$(redis-cli -p "$p" info replication | awk -F: '/^role:/{print $2}' | tr -d '\r')
  [ "$role" = master ] || continue
  n=$(redis-cli -p "$p" --scan --pattern 'tg:{*}:fixes' | while read -r k; do redis-cli -p "$p" xlen "$k"; done | awk '{s+=$1} END {print s+0}')
  stored=$((stored + n))
done
mem1=$(used_mem)
python3 - "$work/load.json" "$stored" "$mem0" "$mem1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1])); t = r["totals"]; l = r["latency"]
stored, m0, m1 = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print(f"== load: {r['offered']['fixes_per_s']:.0f} fixes/s offered; sent {t['fixes_sent']} confirmed {t['fixes_acked']} "
      f"({t['fixes_acked'] / r['duration_s']:.0f}/s); ACK p50 {l['p50_ms']:.1f} ms p99 {l['p99_ms']:.1f} ms "
      f"p99.9 {l['p999_ms']:.1f} ms; timeouts {t['ack_timeouts']} disconnects {t['disconnects']}")
s = r.get("latency_steady", {})
if s.get("count"):
    print(f"== after the {r['warmup_s']:.0f} s warm-up (connections opening): ACK p50 {s['p50_ms']:.1f} ms "
          f"p99 {s['p99_ms']:.1f} ms p99.9 {s['p999_ms']:.1f} ms")
print(f"== stored on the primaries: {stored}; memory on all six nodes +{(m1 - m0) / 2**20:.1f} MiB "
      f"= {(m1 - m0) / max(stored, 1):.1f} B per fix incl. the replica copy")
EOF
