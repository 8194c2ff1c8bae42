#!/usr/bin/env bash
# A private PostgreSQL 15 cluster for tests, owned by the `postgres` user when run as root.
#   scripts/cluster.sh start DIR   initdb (first time) and start on a free port; prints the URL,
#                                  also written to DIR/url
#   scripts/cluster.sh stop DIR    fast shutdown, if running
set -euo pipefail
cmd=${1:?usage: cluster.sh start|stop DIR}
dir=${2:?usage: cluster.sh start|stop DIR}
BIN=/usr/lib/postgresql/15/bin
as_owner() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

case "$cmd" in
start)
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        mkdir -p "$dir"
        [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$dir"
        chmod 700 "$dir"
        as_owner "$BIN/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-sync >/dev/null
    fi
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_owner "$BIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 start -o \
        "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off -c shared_buffers=256MB" >/dev/null
    url="postgres://postgres@127.0.0.1:$port/postgres"
    echo "$url" | as_owner tee "$dir/url" >/dev/null
    echo "$url"
    ;;
stop)
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_owner "$BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    fi
    ;;
*)
    echo "usage: cluster.sh start|stop DIR" >&2
    exit 2
    ;;
esac
