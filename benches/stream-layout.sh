#!/usr/bin/env bash
# Redis memory per stored fix for alternative stream layouts, from real stored entries.
#
#   bash benches/stream-layout.sh [DEVICES] [FIXES_PER_DEVICE]     (defaults: 200, 1000)
#
# Fills a scratch redis-server through `trackgate serve` + `trackgate loadgen` (CCE
# batches of 16, as the bench's memory step), then copies every device's entries into a
# second scratch server, once per layout, transformed, with the same entry IDs, and
# prints `used_memory` growth per entry. Both servers run on free ports in a temp dir and
# are stopped on exit. Needs: redis-server, a release build, python3 with redis-py
# (`python3 -m pip install redis`).
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${1:-200}
per_device=${2:-1000}
bin=target/release/trackgate
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
python3 -c 'import redis' 2>/dev/null || { echo "needs redis-py: python3 -m pip install redis" >&2; exit 1; }

source benches/stack.sh
start_redis src
start_redis dst
start_gateway "$src"
"$bin" loadgen --target "127.0.0.1:$gport" --devices "$devices" --interval-s 0.2 --cce-share 1 \
  --batch-fixes 16 --ramp-s 1 --max-frames $((devices * per_device / 16)) --quiet >/dev/null

python3 - "$src" "$dst" <<'PY'
import sys, redis
src, dst = redis.Redis(port=int(sys.argv[1])), redis.Redis(port=int(sys.argv[2]))
keys = list(src.scan_iter(match=b"tg:{*}:fixes", count=1000))
streams = [src.xrange(k) for k in keys]

def measure(name, transform, node=None):
    dst.flushall()
    dst.config_set("stream-node-max-bytes", node[0] if node else 4096)
    dst.config_set("stream-node-max-entries", node[1] if node else 100)
    before, n = dst.info("memory")["used_memory"], 0
    for i, entries in enumerate(streams):
        p = dst.pipeline(transaction=False)
        for eid, fields in entries:
            args = [x for kv in transform(fields).items() for x in kv]
            p.execute_command("XADD", f"s{{{i}}}", eid, *args)
            n += 1
        p.execute()
    print(f"{name:58s} {(dst.info('memory')['used_memory'] - before) / n:5.1f} B/fix")

same = lambda f: f
# The fix time as a 2-byte varint delta to the receive time inside `d`, no `t` field.
no_t = lambda f: {b"d": f[b"d"] + b"\x01\x02"}
# ... and the version and message-kind bytes merged into one.
no_t_one_byte_header = lambda f: {b"d": f[b"d"][1:] + b"\x01\x02"}
d_len = [len(f[b"d"]) for s in streams for _, f in s]
print(f"{len(d_len)} entries over {len(streams)} streams; packed value d: {sum(d_len) / len(d_len):.1f} B average")
measure("as stored (t, d)", same)
measure("fix time inside d (no t field)", no_t)
measure("fix time inside d, one header byte", no_t_one_byte_header)
measure("as stored, stream-node-max-bytes 8192 / entries 200", same, (8192, 200))
measure("fix time inside d, one header byte, nodes 8192 / 200", no_t_one_byte_header, (8192, 200))
PY
