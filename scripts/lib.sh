# Shared helpers for the scripts in this folder: finding or starting Postgres
# and Redis. Sourced, not run.

TESSERA_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCAL_DIR="$TESSERA_ROOT/.local"

log() { printf '%s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

pg_bin() {
  # The newest installed PostgreSQL's binaries, or whatever is on PATH.
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$dir" ] && [ -x "$dir/$1" ]; then echo "$dir/$1"; else command -v "$1"; fi
}

# ensure_postgres HOST PORT DATA_DIR: reuse a server answering on HOST:PORT, or
# start a private one (trust auth, user root) in DATA_DIR on that port.
ensure_postgres() {
  local host=$1 port=$2 data=$3
  if "$(pg_bin pg_isready)" -q -h "$host" -p "$port" 2>/dev/null; then
    return 0
  fi
  # The machine's own cluster, if it is merely stopped.
  if [ "$port" = 5432 ] && command -v pg_ctlcluster >/dev/null 2>&1 && ls /etc/postgresql/*/main >/dev/null 2>&1; then
    log "starting the system PostgreSQL cluster"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main start >/dev/null 2>&1 || true
    for _ in $(seq 1 30); do "$(pg_bin pg_isready)" -q -h "$host" -p "$port" && return 0; sleep 0.5; done
  fi
  log "starting a private PostgreSQL in $data on port $port"
  mkdir -p "$data"
  if [ ! -f "$data/PG_VERSION" ]; then
    local owner=()
    [ "$(id -u)" = 0 ] && owner=(runuser -u postgres --)
    if [ "$(id -u)" = 0 ]; then chown -R postgres "$data"; fi
    "${owner[@]}" "$(pg_bin initdb)" -D "$data" -U root --auth=trust >/dev/null || die "initdb failed"
  fi
  local runner=()
  [ "$(id -u)" = 0 ] && runner=(runuser -u postgres --)
  "${runner[@]}" "$(pg_bin pg_ctl)" -D "$data" -l "$data/postgres.log" -o "-p $port -k $data -h $host" -w start >/dev/null \
    || die "PostgreSQL did not start; see $data/postgres.log"
}

# ensure_redis HOST PORT DATA_DIR: reuse a Redis answering on HOST:PORT, or start one.
ensure_redis() {
  local host=$1 port=$2 data=$3
  if redis-cli -h "$host" -p "$port" ping >/dev/null 2>&1; then
    return 0
  fi
  log "starting Redis on $host:$port (data in $data)"
  mkdir -p "$data"
  redis-server --daemonize yes --bind "$host" --port "$port" --save "" --appendonly no \
    --dir "$data" --logfile "$data/redis.log" --pidfile "$data/redis.pid" >/dev/null || die "Redis did not start"
  for _ in $(seq 1 30); do redis-cli -h "$host" -p "$port" ping >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "Redis did not answer on $host:$port; see $data/redis.log"
}

ensure_database() {
  local url_base=$1 name=$2
  psql "$url_base/postgres" -tAc "SELECT 1 FROM pg_database WHERE datname = '$name'" | grep -q 1 \
    || psql "$url_base/postgres" -qc "CREATE DATABASE \"$name\"" >/dev/null \
    || die "cannot create database $name"
}
