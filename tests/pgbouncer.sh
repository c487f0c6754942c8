#!/usr/bin/env bash
# The PostgreSQL tests that matter behind a transaction pooler, run once more through one.
#
#   tests/pgbouncer.sh                 # the representative part (storage contract, sync and webhook
#                                      # API tests, replicas, wake-ups), PostgreSQL only
#   tests/pgbouncer.sh -k migrat       # extra pytest arguments are passed on
#   tests/pgbouncer.sh tests/storage   # ... and replace the default selection if they name tests
#
# Starts a private PgBouncer (Debian's pgbouncer 1.18: `apt-get install -y pgbouncer`) on a free
# port in transaction mode in front of PG_HOST:PG_PORT (default 127.0.0.1:5432, trust auth), as
# Supabase's pooler works: each transaction may run on another server connection, there are no
# prepared statements across them, and startup parameters such as search_path are refused. So the
# tests are isolated by database (TEST_PG_ISOLATION=database: tests/conftest.py creates one per test
# over the direct TEST_ADMIN_DATABASE_URL) instead of by schema. PgBouncer is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_HOST=${PG_HOST:-127.0.0.1}
PG_PORT=${PG_PORT:-5432}
PG_USER=${PG_USER:-postgres}
PYTHON=${PYTHON:-python}
PGBOUNCER=${PGBOUNCER:-$(command -v pgbouncer || echo /usr/sbin/pgbouncer)}
[ -x "$PGBOUNCER" ] || { echo "pgbouncer not found: apt-get install -y pgbouncer" >&2; exit 2; }

DEFAULT_TESTS=(
  tests/storage
  tests/webhook/test_webhook_api.py
  tests/webhook/test_applier.py
  tests/sync/test_sync_api.py
  tests/sync/test_pool.py
  tests/routes/test_stream.py
)

dir=$(mktemp -d /tmp/pgbouncer.XXXXXX)
pid=""
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" && wait "$pid" 2>/dev/null || true
  fi
  rm -rf "$dir"
}
trap cleanup EXIT

port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$dir/pgbouncer.ini" <<EOF
[databases]
; every database name is passed through: each test has a database of its own
* = host=$PG_HOST port=$PG_PORT

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $dir/userlist.txt
pool_mode = transaction
default_pool_size = 20
max_client_conn = 1000
server_reset_query =
logfile = $dir/pgbouncer.log
pidfile =
EOF
printf '"%s" ""\n' "$PG_USER" >"$dir/userlist.txt"

# PgBouncer will not run as root: as root, it runs as the (Debian) postgres user.
run_as=()
if [ "$(id -u)" = 0 ]; then
  chown -R postgres "$dir"
  run_as=(-u postgres)
fi
"$PGBOUNCER" -q "${run_as[@]}" "$dir/pgbouncer.ini" &
pid=$!
for _ in $(seq 100); do
  "$PYTHON" -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2).close()" 2>/dev/null && break
  kill -0 "$pid" 2>/dev/null || { cat "$dir/pgbouncer.log" >&2; exit 1; }
  sleep 0.05
done

tests=("${DEFAULT_TESTS[@]}")
for arg in "$@"; do
  case "$arg" in tests/*) tests=(); break ;; esac
done

echo "pgbouncer $("$PGBOUNCER" --version | head -1 | cut -d' ' -f2) (transaction mode) on 127.0.0.1:$port -> $PG_HOST:$PG_PORT"
started=$(date +%s)
status=0
TEST_ENGINES=postgres \
TEST_PG_ISOLATION=database \
TEST_DATABASE_URL="postgresql://$PG_USER@127.0.0.1:$port/postgres" \
TEST_ADMIN_DATABASE_URL="postgresql://$PG_USER@$PG_HOST:$PG_PORT/postgres" \
  "$PYTHON" -m pytest -m postgres -q "${tests[@]}" "$@" || status=$?
echo "through pgbouncer: $(( $(date +%s) - started )) s"
if [ "$status" != 0 ]; then
  echo "--- pgbouncer log (last lines) ---" >&2
  tail -n 20 "$dir/pgbouncer.log" >&2 || true
fi
exit "$status"
