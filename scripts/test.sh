#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need (as root, via apt),
# starts one private Postgres for the run on a free loopback port (each test gets its own database
# on it), builds everything, checks formatting and lints, and runs every test with nextest.
# Everything it starts is stopped on exit. README.md's second command; .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

# ---- 1. System packages (guarded: on a machine that has them, apt would upgrade things).
need=()
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
command -v setpriv >/dev/null || need+=(util-linux)
command -v pg_isready >/dev/null || need+=(postgresql-client)
command -v redis-server >/dev/null || need+=(redis-server)
command -v docker-compose >/dev/null || need+=(docker-compose)
# The UI tests drive a real headless Chromium through chromedriver.
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
if ((${#need[@]})); then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v cargo-nextest >/dev/null || { log "installing cargo-nextest"; cargo install cargo-nextest --locked; }

# ---- 2. A private Postgres for this run. Postgres refuses root, so it runs as `postgres`
# (fallback `nobody`); --pdeathsig ties it to this script so a killed run leaves nothing behind.
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
PGUSER_OS=postgres; id postgres >/dev/null 2>&1 || PGUSER_OS=nobody
PGBASE=$(mktemp -d /tmp/parley-test-pg.XXXXXX)
chown "$PGUSER_OS" "$PGBASE"
as_pg() { setpriv --reuid="$PGUSER_OS" --regid="$(id -g "$PGUSER_OS")" --init-groups "$@"; }
PGPID=
cleanup() {
  [ -n "$PGPID" ] && kill -INT "$PGPID" 2>/dev/null && wait "$PGPID" 2>/dev/null || true
  rm -rf "$PGBASE"
}
trap cleanup EXIT
log "starting a private Postgres ($PGBIN)"
(cd /tmp && as_pg "$PGBIN/initdb" -D "$PGBASE/data" -U postgres -A trust -E UTF8 --locale=C --no-sync >"$PGBASE/initdb.log" 2>&1)
PGPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
(cd /tmp && exec setpriv --reuid="$PGUSER_OS" --regid="$(id -g "$PGUSER_OS")" --init-groups --pdeathsig KILL \
  "$PGBIN/postgres" -D "$PGBASE/data" -p "$PGPORT" -k "$PGBASE" -c listen_addresses=127.0.0.1 \
  -c fsync=off -c synchronous_commit=off -c max_connections=400 >"$PGBASE/postgres.log" 2>&1) &
PGPID=$!
for _ in $(seq 1 100); do pg_isready -q -h 127.0.0.1 -p "$PGPORT" && break; sleep 0.1; done
pg_isready -q -h 127.0.0.1 -p "$PGPORT" || { cat "$PGBASE/postgres.log"; exit 1; }
export PARLEY_TEST_PG_URL="postgres://postgres@127.0.0.1:$PGPORT/postgres"

# ---- 3. Build, lint, test.
# A one-shot build gains nothing from incremental compilation, whose caches were >1 GB of the
# target directory (CI's disk is small: see the `[profile.dev]` note in Cargo.toml).
export CARGO_INCREMENTAL=0
log "format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
log "build"
cargo build --workspace --bins --locked
log "tests"
cargo nextest run --workspace --locked --no-fail-fast "$@"
