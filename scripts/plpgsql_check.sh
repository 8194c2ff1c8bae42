#!/usr/bin/env bash
# Checks every PL/pgSQL function of schema stageflow with plpgsql_check (Debian's
# postgresql-15-plpgsql-check, installed by scripts/setup.sh): in a scratch database it runs
# CREATE EXTENSION stageflow CASCADE and plpgsql_check, then plpgsql_check_function_tb over each
# function (a trigger function once per table it is a trigger of) with every class of warning on
# (other, extra, performance, security, compatibility). Prints each finding and exits 1 if there
# is any, 0 if none. A false positive is silenced in the function itself, with an in-comment
# option (`-- @plpgsql_check_options: ...`) and a comment saying why.
#   scripts/plpgsql_check.sh URL   on a running cluster (URL names a database to connect to; the
#                                  scratch database is created beside it and dropped at the end)
#   scripts/plpgsql_check.sh       on a throwaway cluster of its own, removed at the end
# The extension must be installed (scripts/setup.sh). SQL functions are not checked: plpgsql_check
# reads PL/pgSQL only; the tests run the SQL ones.
set -euo pipefail
BIN=/usr/lib/postgresql/15/bin
db="stageflow_plpgsql_check_$$"

# As root, a cluster runs as the postgres user (PostgreSQL refuses root).
as_owner() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

cleanup() {
    [ -n "${url:-}" ] && psql "$url" -X -q -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1
    if [ -n "${dir:-}" ]; then
        as_owner "$BIN/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1
        rm -rf "$dir"
    fi
    return 0
}
trap cleanup EXIT

if [ $# -eq 0 ]; then
    dir=$(mktemp -d "${TMPDIR:-/var/tmp}/stageflow-plpgsql-check.XXXXXX")
    [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$dir"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_owner "$BIN/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    # Only a Unix socket in the cluster's own directory: nothing else can reach it.
    as_owner "$BIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w \
        -o "-p $port -k $dir -c listen_addresses=''" start >/dev/null \
        || { cat "$dir/postgres.log" >&2; exit 1; }
    url="postgresql://postgres@/postgres?host=$dir&port=$port"
elif [ $# -eq 1 ]; then
    url=$1
else
    echo "usage: scripts/plpgsql_check.sh [URL]" >&2
    exit 2
fi

psql "$url" -X -q -v ON_ERROR_STOP=1 -c "CREATE DATABASE $db" >/dev/null
# One finding a line: function, line, level, SQLSTATE, message (detail; hint) [context: query].
status=0
findings=$(psql "$url" -X -q -At -v ON_ERROR_STOP=1 2>&1 <<SQL
\connect $db
SET client_min_messages = warning;
CREATE EXTENSION stageflow CASCADE;
CREATE EXTENSION plpgsql_check;
CREATE TEMPORARY TABLE checked AS
SELECT p.oid::regprocedure AS fn, coalesce(tg.relid, 0::oid)::regclass AS relid
  FROM pg_catalog.pg_proc AS p
  JOIN pg_catalog.pg_language AS l ON l.oid = p.prolang
  LEFT JOIN LATERAL (SELECT DISTINCT t.tgrelid AS relid FROM pg_catalog.pg_trigger AS t WHERE t.tgfoid = p.oid) AS tg
       ON p.prorettype = 'pg_catalog.trigger'::pg_catalog.regtype
 WHERE p.pronamespace = 'stageflow'::regnamespace AND l.lanname = 'plpgsql';
SELECT format('%s functions checked', count(DISTINCT c.fn)) FROM checked AS c;
SELECT format('%s%s line %s: %s %s: %s%s%s%s%s',
              c.fn, CASE WHEN c.relid <> 0 THEN format(' (trigger on %s)', c.relid) ELSE '' END,
              coalesce(r.lineno::text, '-'), r.level, r.sqlstate, r.message,
              ' (' || r.detail || ')', '; hint: ' || r.hint, ' [' || r.context || ']', ': ' || r.query)
  FROM checked AS c
 CROSS JOIN LATERAL public.plpgsql_check_function_tb(
           c.fn, c.relid, fatal_errors => false, other_warnings => true, extra_warnings => true,
           performance_warnings => true, security_warnings => true, compatibility_warnings => true) AS r
 ORDER BY c.fn::text, r.lineno NULLS FIRST, r.message;
SQL
) || status=$?
summary=$(head -n 1 <<<"$findings")
rest=$(tail -n +2 <<<"$findings")
if [ "$status" -ne 0 ] || ! [[ "$summary" =~ ^[1-9][0-9]*\ functions\ checked$ ]]; then
    echo "plpgsql_check: could not check the functions:" >&2
    echo "$findings" >&2
    exit 1
fi
if [ -n "$rest" ]; then
    echo "plpgsql_check: $summary, $(wc -l <<<"$rest") finding(s):" >&2
    echo "$rest" >&2
    exit 1
fi
echo "plpgsql_check: $summary, no finding"
