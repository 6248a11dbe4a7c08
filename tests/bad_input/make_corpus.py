#!/usr/bin/env python3
"""Write the bad-input corpus: one file per class, `NN-<class>.hex`.

Each file: `# key: value` header lines, then the input as hex (whitespace ignored).
  class       what is wrong
  expect      the metric series that must grow (Prometheus rendering, labels in order)
  connection  `open` (the gateway survives it and still answers the same connection) or
              `closed` (the gateway closes the connection: fatal input, or a timeout)
  repeat_s    send the bytes again and again for this long (endless input)
  eof         `yes`: close our side after sending (the gateway sees EOF mid-frame)

The test (tests/bad_input.rs) replays every file against a gateway process. Regenerate
with `python3 tests/bad_input/make_corpus.py` (deterministic).
"""
import os, random, struct

HERE = os.path.dirname(os.path.abspath(__file__))
IMEI = b"350000000000099"  # fake; the probe frame uses the same one
EPOCH_2000 = 946684800
FIX_T = 1_780_000_000  # 2026-05-28, fixed so the corpus does not change


def frame(cmd, payload, imei=IMEI, flag=b"A", fix_len=0, cs_delta=0):
    body = b"," + imei + b"," + cmd + ((b"," + payload) if payload is not None else b"") + b"*"
    length = len(body) + 4 + fix_len
    head = b"$$" + flag + str(length).encode()
    cs = (sum(head + body) + cs_delta) % 256
    return head + body + b"%02X" % cs + b"\r\n"


def aaa(lat=b"48.137154", lon=b"11.576124", dt=b"260528101500"):
    return b",".join([b"35", lat, lon, dt, b"A", b"9", b"20", b"42.0", b"90", b"0.9", b"519",
                      b"1000", b"5000", b"262|1|1234|5678", b"0001", b"0000|0000|0000|019A|0000"])


def cce_packet(lat=48_137_154, lon=11_576_124, t=FIX_T, four_count=None):
    g1 = bytes([3, 0x01, 35, 0x05, 1, 0x06, 9])
    g2 = bytes([1, 0x08]) + struct.pack("<H", 42)
    vals = [(0x02, lat & 0xFFFFFFFF), (0x03, lon & 0xFFFFFFFF), (0x04, t - EPOCH_2000)]
    g4 = bytes([four_count if four_count is not None else len(vals)])
    for pid, v in vals:
        g4 += bytes([pid]) + struct.pack("<I", v)
    gv = bytes([0])
    body = struct.pack("<H", 0) + g1 + g2 + g4 + gv
    return struct.pack("<H", len(body)) + body


def cce(packets, declared=None):
    n = declared if declared is not None else len(packets)
    return struct.pack("<IH", n, n) + b"".join(packets)


rnd = random.Random(7)
garbage = bytes(b for b in (rnd.randrange(256) for _ in range(2000)) if b != ord("$"))[:1024]

good_aaa = frame(b"AAA", aaa())
cases = [
    ("bad checksum", 'trackgate_frame_errors_total{kind="checksum"}', "open", frame(b"AAA", aaa(), cs_delta=1), {}),
    ("wrong length", 'trackgate_frame_errors_total{kind="length"}', "open", frame(b"AAA", aaa(), fix_len=-3), {}),
    ("truncated", 'trackgate_frame_errors_total{kind="incomplete"}', "closed", good_aaa[: len(good_aaa) // 2], {"eof": "yes"}),
    ("oversized", 'trackgate_frame_errors_total{kind="length"}', "closed", b"$$A9999," + IMEI + b",AAA," + b"1" * 200, {}),
    ("wrong IMEI format", 'trackgate_frame_errors_total{kind="imei"}', "open", frame(b"AAA", aaa(), imei=b"35000000000A099"), {}),
    ("IMEI too short", 'trackgate_frame_errors_total{kind="imei"}', "open", frame(b"AAA", aaa(), imei=b"350000000"), {}),
    ("unknown command", 'trackgate_frames_total{type="other",outcome="unknown_command"}', "open", frame(b"ZZZ", b"1,2,3"), {}),
    ("garbage bytes", "trackgate_junk_bytes_total", "open", garbage, {}),
    ("non-UTF-8 in text field", 'trackgate_decode_errors_total{scope="frame",reason="non_utf8"}', "open", frame(b"AFF", b"\xff\xfe\xc3(," + aaa()), {}),
    ("latitude out of range", 'trackgate_decode_errors_total{scope="frame",reason="out_of_range"}', "open", frame(b"AAA", aaa(lat=b"91.000000")), {}),
    ("longitude out of range (CCE record)", 'trackgate_decode_errors_total{scope="record",reason="out_of_range"}', "open", frame(b"CCE", cce([cce_packet(lon=-181_000_000)])), {}),
    ("date out of range (month 13)", 'trackgate_decode_errors_total{scope="frame",reason="out_of_range"}', "open", frame(b"AAA", aaa(dt=b"261328101500")), {}),
    ("CCE group count overruns its packet", 'trackgate_decode_errors_total{scope="record",reason="overrun"}', "open", frame(b"CCE", cce([cce_packet(four_count=6)])), {}),
    ("CCE packet count overruns the payload", 'trackgate_decode_errors_total{scope="record",reason="truncated"}', "open", frame(b"CCE", cce([cce_packet()], declared=5)), {}),
    ("zero-length frame", 'trackgate_frame_errors_total{kind="framing"}', "open", b"$$A0," + IMEI + b",AAA*00\r\n", {}),
    ("endless bytes without $$ marker", "trackgate_junk_bytes_total", "closed", garbage, {"repeat_s": "3"}),
]

for old in os.listdir(HERE):
    if old.endswith(".hex"):
        os.remove(os.path.join(HERE, old))
for i, (cls, expect, conn, data, extra) in enumerate(cases, 1):
    slug = "".join(c if c.isalnum() else "-" for c in cls.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    lines = [f"# class: {cls}", f"# expect: {expect}", f"# connection: {conn}"]
    lines += [f"# {k}: {v}" for k, v in extra.items()]
    hx = data.hex()
    lines += [hx[j:j + 64] for j in range(0, len(hx), 64)]
    with open(os.path.join(HERE, f"{i:02d}-{slug}.hex"), "w") as f:
        f.write("\n".join(lines) + "\n")
print(f"{len(cases)} files")
