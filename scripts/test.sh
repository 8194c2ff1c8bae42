#!/usr/bin/env bash
# Runs every test of Stageflow, installing what is missing first (see scripts/setup.sh):
#   1. unit tests and #[pg_test] tests         cargo pgrx test (pgrx's own throwaway cluster)
#   2. SQL-level tests (pg_test/*.sql), integration tests and worker tests (stageflow worker
#      processes, examples/python_worker.py) against a private cluster started with
#      `stageflow cluster start`                 cargo test -p stageflow-tests -p stageflow-cli ...
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/stageflow-target}"
cluster=/var/tmp/stageflow-test-cluster
pgrx_data=/var/tmp/stageflow-pgrx-data
say() { printf '\033[1m== %s\033[0m\n' "$*"; }

stageflow="$CARGO_TARGET_DIR/debug/stageflow"

# Installing overwrites the extension's .so: no cluster of ours may be running on it.
[ -x "$stageflow" ] && "$stageflow" cluster stop --dir "$cluster" 2>/dev/null || true
scripts/setup.sh deps

say "unit and #[pg_test] tests"
rm -rf "$pgrx_data"
# cargo pgrx copies the .so over the installed one in place; unlinking it first keeps any other
# running cluster on its old copy instead of crashing it.
sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
sudo_if_needed rm -f "$(/usr/lib/postgresql/15/bin/pg_config --pkglibdir)/stageflow.so"
if [ "$(id -u)" -eq 0 ]; then
    install -d -o postgres -g postgres -m 700 "$pgrx_data"
    cargo pgrx test pg15 --runas postgres --pgdata "$pgrx_data"
else
    cargo pgrx test pg15 --pgdata "$pgrx_data"
fi

scripts/setup.sh
say "SQL-level, integration and worker tests on a private cluster"
cargo build -p stageflow-cli --features geo
rm -rf "$cluster"
STAGEFLOW_TEST_DATABASE_URL=$("$stageflow" cluster start --dir "$cluster")
export STAGEFLOW_TEST_DATABASE_URL
trap '"$stageflow" cluster stop --dir "$cluster"' EXIT
say "isolation specs"; scripts/isolation.sh "$STAGEFLOW_TEST_DATABASE_URL"
cargo test -p stageflow-tests -p stageflow-cli -p stageflow-worker -p stageflow-http -p stageflow-geo --features stageflow-cli/geo -- --test-threads "${STAGEFLOW_TEST_THREADS:-4}"
