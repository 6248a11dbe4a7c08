#!/usr/bin/env bash
# Seed each target's corpus from the protocol vectors (../shared and protocols/tests).
# The framer and decode_any targets take whole frames; the per-decoder targets take the
# payload after `<cmd>,` (cut by the frame layout, so only well-formed vectors are used).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
for t in framer decode_aaa decode_cce decode_ccc decode_any config_parse chunk_decode; do mkdir -p "$here/corpus/$t"; done
# Seeds kept in fuzz/seeds/<target>/: the config parser's example config and variants,
# and inputs of crashes found and fixed (regressions).
for d in "$here"/seeds/*/; do cp "$d"* "$here/corpus/$(basename "$d")/"; done
for f in "$here"/../../shared/protocol/vectors/*.hex "$here"/../protocols/tests/vectors/*.hex; do
  [ -e "$f" ] || continue
  name="$(basename "$f" .hex)"
  tr -d ' \n' < "$f" | xxd -r -p > "$here/corpus/framer/$name"
  python3 - "$here/corpus/framer/$name" "$here/corpus" "$name" <<'PY'
import sys, os
raw = open(sys.argv[1], 'rb').read()
corpus, name = sys.argv[2], sys.argv[3]
parts = raw.split(b',', 3)
if len(parts) == 4 and raw.endswith(b'\r\n'):
    cmd, payload = parts[2], parts[3][:-5]
    # framer byte 0 is the split point; keep the frame whole after it.
    open(os.path.join(corpus, 'framer', name), 'wb').write(b'\x00' + raw)
    open(os.path.join(corpus, 'decode_any', name), 'wb').write(cmd + payload)
    target = {b'AAA': 'decode_aaa', b'AFF': 'decode_aaa', b'CCE': 'decode_cce', b'CCC': 'decode_ccc'}.get(cmd)
    if target:
        open(os.path.join(corpus, target, name), 'wb').write(payload)
PY
done
echo "seeded: $(ls "$here"/corpus/* | wc -l) files"
