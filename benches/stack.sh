# Sourced by the bench scripts: scratch redis-server(s) and a `trackgate serve` on free
# loopback ports in a temp dir ($work), all stopped (and $work removed) on exit.
#
#   source benches/stack.sh
#   start_redis rport               # a redis-server; its port in $rport
#   start_gateway "$rport"          # sets $gport (trackgate port), $gpid
#
# Needs $bin (the trackgate binary) set before start_gateway. With STACK_COMPACT_AFTER_S
# set, a build that compacts (storage v2) seals fixes that many seconds after receipt, every
# second, so that its compaction cost falls inside a short run; older builds ignore it.
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Start a redis-server on a free port (its pid joins $pids); its port goes into the
# variable named $1 (not printed: a subshell would lose the pid).
start_redis() {
  local port
  port=$(free_port)
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" \
    --logfile "$work/redis-$port.log" >/dev/null &
  pids+=($!)
  printf -v "$1" '%s' "$port"
}

# Start `trackgate serve` against the redis on port $1, with a fresh key file.
start_gateway() {
  local rport=$1 hport
  gport=$(free_port)
  hport=$(free_port)
  "$bin" keys generate "$work/keys.json" >/dev/null
  cat > "$work/gw.toml" <<TOML
[[listeners]]
bind = "127.0.0.1:$gport"
[redis]
url = "redis://127.0.0.1:$rport"
[keys]
key_file = "$work/keys.json"
[http]
bind = "127.0.0.1:$hport"
TOML
  if [ -n "${STACK_COMPACT_AFTER_S:-}" ] && "$bin" config example 2>/dev/null | grep -q compact_after_s; then
    printf '[storage]\ncompact_after_s = %s\ncompact_interval_s = 1\n' "$STACK_COMPACT_AFTER_S" >> "$work/gw.toml"
  fi
  sleep 0.5
  RUST_LOG=warn "$bin" serve --config "$work/gw.toml" 2>"$work/gw.log" &
  gpid=$!
  pids+=($gpid)
  sleep 1
}
