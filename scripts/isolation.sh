#!/usr/bin/env bash
# Runs the isolation specs of the lease protocol (pg_test/isolation/specs/*.spec) with
# PostgreSQL's isolation tester against a running cluster:
#
#   scripts/isolation.sh [URL]        URL defaults to $STAGEFLOW_TEST_DATABASE_URL
#
# On that cluster it drops and creates the database stageflow_isolation (or
# $STAGEFLOW_ISOLATION_DATABASE), of ICU's en-US collation as many installations have (the
# engine's ids compare byte by byte whatever the database's collation: COLLATE "C" columns),
# with CREATE EXTENSION stageflow CASCADE (pgmq comes with it),
# then runs pg_isolation_regress --use-existing with every spec in pg_test/isolation/specs as
# the schedule, comparing each output with pg_test/isolation/expected/<spec>.out. Results go to
# /var/tmp/stageflow-isolation (or $STAGEFLOW_ISOLATION_OUTPUT), outside the checkout. On a
# failure it prints regression.diffs and exits non-zero. Needs postgresql-server-dev-15 (for
# pg_isolation_regress and isolationtester; scripts/setup.sh installs it) and psql.
set -euo pipefail
cd "$(dirname "$0")/.."

url="${1:-${STAGEFLOW_TEST_DATABASE_URL:-}}"
if [ -z "$url" ]; then
    echo "usage: scripts/isolation.sh URL (or set STAGEFLOW_TEST_DATABASE_URL)" >&2
    exit 2
fi
database="${STAGEFLOW_ISOLATION_DATABASE:-stageflow_isolation}"
output="${STAGEFLOW_ISOLATION_OUTPUT:-/var/tmp/stageflow-isolation}"
pg_config="${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}"
bindir="$("$pg_config" --bindir)"
regress="$(dirname "$(dirname "$("$pg_config" --pgxs)")")/test/isolation/pg_isolation_regress"
if [ ! -x "$regress" ]; then
    echo "scripts/isolation.sh: $regress not found (install postgresql-server-dev-15)" >&2
    exit 2
fi

# pg_isolation_regress hands isolationtester "dbname=<database>" and leaves the rest of the
# connection to libpq's environment, so the URL is taken apart into PGHOST, PGPORT, PGUSER,
# PGPASSWORD and the libpq settings given as query parameters:
#   postgres[ql]://[user[:password]@][host][:port][/dbname][?key=value&...]
urldecode() { local s="${1//+/ }"; printf '%b' "${s//%/\\x}"; }
re='^postgres(ql)?://(([^@/]*)@)?(\[[^]]*\]|[^:/?]*)(:([0-9]*))?(/([^?]*))?(\?(.*))?$'
if [[ ! "$url" =~ $re ]]; then
    echo "scripts/isolation.sh: not a postgres:// URL: $url" >&2
    exit 2
fi
userinfo="${BASH_REMATCH[3]}" host="${BASH_REMATCH[4]}" port="${BASH_REMATCH[6]}"
admin_db="${BASH_REMATCH[8]}" query="${BASH_REMATCH[10]}"
unset PGHOST PGHOSTADDR PGPORT PGUSER PGPASSWORD PGDATABASE PGSERVICE
if [ -n "$userinfo" ]; then
    export PGUSER; PGUSER="$(urldecode "${userinfo%%:*}")"
    if [[ "$userinfo" == *:* ]]; then export PGPASSWORD; PGPASSWORD="$(urldecode "${userinfo#*:}")"; fi
fi
host="${host#[}"; host="${host%]}"
if [ -n "$host" ]; then export PGHOST; PGHOST="$(urldecode "$host")"; fi
if [ -n "$port" ]; then export PGPORT="$port"; fi
admin_db="$(urldecode "${admin_db:-postgres}")"
if [ -n "$query" ]; then
    IFS='&' read -r -a params <<< "$query"
    for param in "${params[@]}"; do
        key="${param%%=*}" value="$(urldecode "${param#*=}")"
        case "$key" in
            host) export PGHOST="$value" ;;
            hostaddr) export PGHOSTADDR="$value" ;;
            port) export PGPORT="$value" ;;
            user) export PGUSER="$value" ;;
            password) export PGPASSWORD="$value" ;;
            dbname) admin_db="$value" ;;
            sslmode) export PGSSLMODE="$value" ;;
            sslrootcert) export PGSSLROOTCERT="$value" ;;
            sslcert) export PGSSLCERT="$value" ;;
            sslkey) export PGSSLKEY="$value" ;;
            connect_timeout) export PGCONNECT_TIMEOUT="$value" ;;
            options) export PGOPTIONS="$value" ;;
            application_name) ;;
            *) echo "scripts/isolation.sh: ignoring URL parameter $key" >&2 ;;
        esac
    done
fi

psql=("$bindir/psql" -X -q -v ON_ERROR_STOP=1)
"${psql[@]}" -d "$admin_db" -c "SET client_min_messages = warning" \
    -c "DROP DATABASE IF EXISTS \"$database\" WITH (FORCE)" \
    -c "CREATE DATABASE \"$database\" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
"${psql[@]}" -d "$database" -c "SET client_min_messages = warning" -c "CREATE EXTENSION stageflow CASCADE"

rm -rf "$output"
mkdir -p "$output"
for spec in pg_test/isolation/specs/*.spec; do
    echo "test: $(basename "$spec" .spec)"
done > "$output/schedule"

status=0
"$regress" --use-existing --bindir="$bindir" --dbname="$database" \
    --inputdir=pg_test/isolation --outputdir="$output" --schedule="$output/schedule" || status=$?
if [ "$status" -ne 0 ]; then
    if [ -s "$output/regression.diffs" ]; then
        cat "$output/regression.diffs"
    fi
    echo "scripts/isolation.sh: isolation specs failed (exit $status); outputs in $output/results" >&2
    exit "$status"
fi
