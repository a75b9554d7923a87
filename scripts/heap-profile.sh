#!/usr/bin/env bash
# Where an idle session's memory goes, by call site: the table of BENCHMARKS.md session 17.
#
# One node (embedded store) runs under heaptrack with the system allocator (heaptrack hooks malloc;
# the node's jemalloc would hide everything). `parley bench --scenarios sessions` opens
# $SESSIONS idle sessions against it; once the node reports them all, it is killed with -9, so
# what heaptrack calls "leaked" is exactly what was live with the sessions open. Each call site's
# bytes are divided by $SESSIONS: per-node state (the store, the runtime) shows as a few bytes.
#
#   scripts/heap-profile.sh                      # 5,000 sessions, release build in target/heap
#   SESSIONS=2000 scripts/heap-profile.sh
#   HEAP_BIN=/tmp/parley-sys scripts/heap-profile.sh   # a binary built with --features system-alloc
#
# Sizes are glibc malloc's requests; the node's RSS under jemalloc rounds each to a size class,
# which is why `parley bench` reports somewhat more per session. Needs heaptrack (apt) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

SESSIONS=${SESSIONS:-5000}
PORT=${HEAP_PORT:-29300}
command -v heaptrack_print >/dev/null || { echo "heaptrack is needed: apt-get install heaptrack" >&2; exit 1; }
first() { for f in "$@"; do [ -e "$f" ] && { echo "$f"; return; }; done; }
PRELOAD=$(first /usr/lib/heaptrack/libheaptrack_preload.so /usr/lib/*/heaptrack/libheaptrack_preload.so)
INTERPRET=$(first /usr/lib/heaptrack/libexec/heaptrack_interpret /usr/lib/*/heaptrack/libexec/heaptrack_interpret)
[ -n "$PRELOAD" ] && [ -n "$INTERPRET" ] || { echo "heaptrack's preload library or interpreter not found" >&2; exit 1; }

if [ -n "${HEAP_BIN:-}" ]; then
  BIN=$HEAP_BIN
else
  # A target directory of its own: the feature changes the binary, and target/release stays the
  # jemalloc build that the benchmarks measure.
  cargo build --release --locked -p parley-node --bin parley --features system-alloc --target-dir target/heap >&2
  BIN=$PWD/target/heap/release/parley
fi

WORK=$(mktemp -d /tmp/parley-heap.XXXXXX)
BENCH_PID=
cleanup() {
  [ -n "$BENCH_PID" ] && kill "$BENCH_PID" 2>/dev/null || true
  [ -f "$WORK/node.pid" ] && kill -9 "$(cat "$WORK/node.pid")" 2>/dev/null || true
}
trap cleanup EXIT

# The bench starts nodes through PARLEY_BIN: this wrapper runs the node under heaptrack's preload
# library (exec: the node keeps the wrapper's pid, so kill -9 reaches the node itself) — only the
# first node start; a restart by the bench runs plain — and the load processes as they are.
cat >"$WORK/wrap.sh" <<EOF
#!/bin/sh
if [ "\$1" = node ] && mkdir "$WORK/profiled" 2>/dev/null; then
  echo \$\$ > "$WORK/node.pid"
  mkfifo "$WORK/pipe"
  ("$INTERPRET" < "$WORK/pipe" | gzip -1 > "$WORK/node.heaptrack.gz") &
  LD_PRELOAD="$PRELOAD" DUMP_HEAPTRACK_OUTPUT="$WORK/pipe" exec "$BIN" "\$@"
fi
exec "$BIN" "\$@"
EOF
chmod +x "$WORK/wrap.sh"

echo "== $SESSIONS idle sessions on one node under heaptrack (work dir $WORK)" >&2
PARLEY_BIN="$WORK/wrap.sh" "$BIN" bench --nodes 1 --shards 8 --scenarios sessions \
  --sessions-per-node "$SESSIONS" --session-users 50 --port-base "$PORT" --work-dir "$WORK/bench" \
  >"$WORK/bench.log" 2>&1 &
BENCH_PID=$!
held=
for _ in $(seq 1 600); do
  held=$(curl -sf "http://127.0.0.1:$PORT/v1/cluster" | python3 -c 'import json,sys; print(json.load(sys.stdin)["sessions"])' 2>/dev/null || true)
  [ "$held" = "$SESSIONS" ] && break
  kill -0 "$BENCH_PID" 2>/dev/null || { cat "$WORK/bench.log" >&2; exit 1; }
  sleep 0.5
done
[ "$held" = "$SESSIONS" ] || { echo "the node never held $SESSIONS sessions (last: ${held:-none})" >&2; exit 1; }
sleep 1
kill -9 "$(cat "$WORK/node.pid")"
kill "$BENCH_PID" 2>/dev/null || true
wait "$BENCH_PID" 2>/dev/null || true
BENCH_PID=
sleep 2 # the interpreter drains the pipe

heaptrack_print -f "$WORK/node.heaptrack.gz" -p 0 -a 0 -T 0 -F "$WORK/leaked.stacks" \
  --flamegraph-cost-type leaked >/dev/null
python3 - "$WORK/leaked.stacks" "$SESSIONS" <<'EOF'
import collections, re, sys
path, sessions = sys.argv[1], int(sys.argv[2])
total, sites = 0, collections.Counter()
def tidy(frame):
    # Legacy Rust mangling, as heaptrack prints it: hash suffixes, `$LT$`, `{{closure}}`, `..`.
    frame = re.sub(r'::h[0-9a-f]{16}', '', frame)
    for a, b in (('$LT$', '<'), ('$GT$', '>'), ('$u20$', ' '), ('$u7b$', '{'), ('$u7d$', '}'), ('$RF$', '&'), ('$C$', ','), ('..', '::')):
        frame = frame.replace(a, b)
    return re.sub(r' \([^)]*\.rs\)$', '', frame.lstrip('_'))
libs = r'^(ractor|tokio|tokio_tungstenite|tungstenite|hyper|hyper_util|warp|bytes|rusqlite|parley)'
for line in open(path):
    stack, _, n = line.rstrip().rpartition(' ')
    n = int(n)
    total += n
    frames = [tidy(f) for f in stack.split(';')]
    ours = [f for f in frames if 'parley' in f]
    lib = [f for f in frames if re.search(libs, f)]
    # Where in our code, and the library call nearest the allocation.
    sites[(ours[-1] if ours else '-', lib[-1] if lib else frames[-1])] += n
print(f'live heap with {sessions} sessions: {total} B, {total / sessions:.0f} B per session\n')
print(f'{"B/session":>9}  allocated by  <-  called from (nearest frame of ours)')
for (ours, lib), n in sites.most_common(30):
    if n / sessions < 8:
        break
    print(f'{n / sessions:9.0f}  {lib[:80]}  <-  {ours[:80]}')
EOF
