#!/usr/bin/env bash
# The benchmark of BENCHMARKS.md, reproducibly: a release build of `parley`, a private Postgres
# (durable: fsync and synchronous_commit stay on) in a temp dir on port ${BENCH_PG_PORT:-29432},
# a fresh database, then `parley bench --postgres-url ... "$@"`. Everything it starts is stopped on
# exit. `BENCH_STORE=embedded scripts/bench.sh ...` skips Postgres and runs on the embedded store.
#
#   scripts/bench.sh --json > bench.json          # the full run (about 15 minutes)
#   scripts/bench.sh --scenarios relay,durable    # a subset
#   BENCH_BIN=/tmp/parley-a scripts/bench.sh ...  # run a given binary, no build
#   BENCH_PG_ARGS="-c plan_cache_mode=auto" scripts/bench.sh ...   # extra server settings, for A/B runs
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*" >&2; }

if [ -n "${BENCH_BIN:-}" ]; then
  BIN="$BENCH_BIN" # a binary built earlier (A/B runs while the tree changes)
else
  log "release build"
  cargo build --release --locked -p parley-node --bin parley >&2
  BIN="${CARGO_TARGET_DIR:-target}/release/parley"
fi

if [ "${BENCH_STORE:-postgres}" = embedded ]; then
  exec "$BIN" bench "$@"
fi

PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
PGPORT=${BENCH_PG_PORT:-29432}
PGUSER_OS=postgres; id postgres >/dev/null 2>&1 || PGUSER_OS=nobody
PGBASE=$(mktemp -d /tmp/parley-bench-pg.XXXXXX)
chown "$PGUSER_OS" "$PGBASE"
as_pg() { setpriv --reuid="$PGUSER_OS" --regid="$(id -g "$PGUSER_OS")" --init-groups "$@"; }
PGPID=
cleanup() {
  [ -n "$PGPID" ] && kill -INT "$PGPID" 2>/dev/null && wait "$PGPID" 2>/dev/null || true
  # The server's log outlives the run (checkpoints, autovacuum, errors: what a slow phase may owe
  # to Postgres rather than to Parley).
  mkdir -p data/bench && cp "$PGBASE/postgres.log" data/bench/postgres-last.log 2>/dev/null || true
  rm -rf "$PGBASE"
}
trap cleanup EXIT
log "private Postgres on 127.0.0.1:$PGPORT ($PGBIN), durable settings"
(cd /tmp && as_pg "$PGBIN/initdb" -D "$PGBASE/data" -U postgres -A trust -E UTF8 --locale=C >"$PGBASE/initdb.log" 2>&1)
# Durability on (fsync, synchronous_commit: the defaults); enough connections for the nodes' pools;
# shared_buffers sized for a history table of millions of rows; checkpoints and autovacuum runs are
# logged (the log is kept in data/bench/postgres-last.log). Everything else is the default.
(cd /tmp && exec setpriv --reuid="$PGUSER_OS" --regid="$(id -g "$PGUSER_OS")" --init-groups --pdeathsig KILL \
  "$PGBIN/postgres" -D "$PGBASE/data" -p "$PGPORT" -k "$PGBASE" -c listen_addresses=127.0.0.1 \
  -c max_connections=200 -c shared_buffers=1GB -c log_checkpoints=on -c log_autovacuum_min_duration=0 \
  -c log_line_prefix='%m ' ${BENCH_PG_ARGS:-} >"$PGBASE/postgres.log" 2>&1) &
PGPID=$!
for _ in $(seq 1 100); do pg_isready -q -h 127.0.0.1 -p "$PGPORT" && break; sleep 0.1; done
pg_isready -q -h 127.0.0.1 -p "$PGPORT" || { cat "$PGBASE/postgres.log" >&2; exit 1; }
createdb -h 127.0.0.1 -p "$PGPORT" -U postgres parley_bench
"$BIN" bench --postgres-url "postgres://postgres@127.0.0.1:$PGPORT/parley_bench" "$@"
