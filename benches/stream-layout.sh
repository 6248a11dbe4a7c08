#!/usr/bin/env bash
# Redis memory per stored fix for alternative stream layouts, from real stored entries.
#
#   bash benches/stream-layout.sh [DEVICES] [FIXES_PER_DEVICE]     (defaults: 200, 1000)
#
# Fills a scratch redis-server through `trackgate serve` + `trackgate loadgen` (CCE
# batches of 16, as the bench's memory step), then copies every device's entries into a
# second scratch server, once per layout, transformed, with the same entry IDs, and
# prints `used_memory` growth per fix. The last two layouts put a whole frame (CCE batch)
# in one entry, to size what the 48 B goal would need. Both servers run on free ports in a temp dir and
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

def measure(name, transform, node=None, batched=None):
    """Memory per fix with each entry's fields through `transform`, or with the entries
    of one frame (same receive ms) grouped by `batched` into one entry."""
    dst.flushall()
    dst.config_set("stream-node-max-bytes", node[0] if node else 4096)
    dst.config_set("stream-node-max-entries", node[1] if node else 100)
    before, n = dst.info("memory")["used_memory"], 0
    for i, entries in enumerate(streams):
        p = dst.pipeline(transaction=False)
        if batched:
            frames = {}
            for eid, fields in entries:
                frames.setdefault(eid.split(b"-")[0], []).append(fields)
            # One script call may carry several frames of a device: at most 16 per entry.
            out = [(ms + b"-%d" % k, batched(fs[k:k + 16]))
                   for ms, fs in frames.items() for k in range(0, len(fs), 16)]
        else:
            out = [(eid, transform(fields)) for eid, fields in entries]
        for eid, fields in out:
            args = [x for kv in fields.items() for x in kv]
            p.execute_command("XADD", f"s{{{i}}}", eid, *args)
        n += len(entries)
        p.execute()
    print(f"{name:58s} {(dst.info('memory')['used_memory'] - before) / n:5.1f} B/fix")

def varint(v):
    out = bytearray()
    while v >= 0x80:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)

def unpack(d):
    """The packed value `d` (src/storage.rs): (version, kind, bitmap, signed values)."""
    pos, vals = 2, []
    def get():
        nonlocal pos
        v = shift = 0
        while True:
            b = d[pos]; pos += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return v
    bitmap = get()
    while pos < len(d):
        z = get()
        vals.append((z >> 1) ^ -(z & 1))
    return d[0], d[1], bitmap, vals

zz = lambda v: varint((v << 1) ^ (v >> 63))

def batch_concat(fs):
    """One entry per frame: each fix's `d` behind its length, fix times in `t` as deltas."""
    t0 = int(fs[0].get(b"t", 0))
    body = b"".join(varint(len(f[b"d"])) + f[b"d"] for f in fs)
    times = b"".join(zz(int(f.get(b"t", 0)) - t0) for f in fs)
    return {b"t": t0, b"n": len(fs), b"d": body + times}

def batch_delta(fs):
    """One entry per frame, each fix delta-coded against the one before (same bitmap)."""
    out, prev, t_prev = bytearray(), None, int(fs[0].get(b"t", 0))
    for f in fs:
        _, kind, bitmap, vals = unpack(f[b"d"])
        t = int(f.get(b"t", 0))
        if prev and prev[0] == bitmap:
            out += b"\x00" + zz(t - t_prev) + b"".join(zz(v - w) for v, w in zip(vals, prev[1]))
        else:
            out += b"\x01" + bytes([kind]) + varint(bitmap) + zz(t - t_prev) + b"".join(zz(v) for v in vals)
        prev, t_prev = (bitmap, vals), t
    return {b"t": int(fs[0].get(b"t", 0)), b"n": len(fs), b"d": bytes(out)}

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
# Several fixes per entry (not what trackgate stores: see docs/bench/README.md for what a
# per-fix purge would then have to do). One entry per frame of 16 fixes.
measure("one entry per frame, values concatenated", None, batched=batch_concat)
measure("one entry per frame, fixes delta-coded", None, batched=batch_delta)
PY
