#!/usr/bin/env bash
# Runs the tests of Stageflow, installing what is missing first (see scripts/setup.sh):
#   1. unit tests and #[pg_test] tests         cargo pgrx test (pgrx's own throwaway cluster)
#   2. on a private cluster started with `stageflow cluster start`: the isolation specs
#      (scripts/isolation.sh), then the SQL-level tests (pg_test/*.sql), integration tests, the
#      typed client's tests and worker tests (stageflow worker processes, examples/python_worker.py)
#                                              cargo test -p stageflow-tests -p stageflow-cli ...
#
#   scripts/test.sh            every test (what CI runs)
#   scripts/test.sh --core     the engine, worker, CLI and HTTP tests only: skips the tests that
#                              need GDAL, PostGIS and the Python tools venv (the stageflow-geo crate
#                              and stageflow-cli's geo feature), Chromium (the dashboard test) and
#                              Debian's python3 with psycopg (the Python worker example's test).
#                              scripts/setup.sh installs only what the rest needs
#                              (STAGEFLOW_SETUP_TIER=core).
# Environment: CARGO_TARGET_DIR (default /var/tmp/stageflow-target), STAGEFLOW_TEST_THREADS (4).
set -euo pipefail
cd "$(dirname "$0")/.."
core=false
for arg in "$@"; do
    case "$arg" in
        --core) core=true ;;
        -h | --help) sed -n '2,16s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "scripts/test.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/stageflow-target}"
cluster=/var/tmp/stageflow-test-cluster
pgrx_data=/var/tmp/stageflow-pgrx-data
say() { printf '\033[1m== %s\033[0m\n' "$*"; }

# What --core leaves out: the geospatial crate and feature, and these two tests (full names).
core_skips=(
    the_dashboard_shows_jobs_live_and_retries_dead_letters_in_chromium  # crates/stageflow-cli/tests/dashboard.rs
    a_python_worker_runs_hello_world_beside_a_rust_worker               # crates/stageflow-cli/tests/workers.rs
    webhooks_verify_with_the_standard_webhooks_library                  # crates/stageflow-http/tests/api.rs (the Python tools venv)
)
if $core; then
    say "--core: skipping the stageflow-geo tests and the geo feature (GDAL, PostGIS, the Python tools venv), the dashboard test (Chromium) and the Python worker test (python3-psycopg)"
    # ... and scripts/setup.sh leaves out installing what only they need.
    export STAGEFLOW_SETUP_TIER=core
fi

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
say "versions: the schema is recorded, released ones unchanged, every version upgrades (scripts/versions.py)"
PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}" python3 scripts/versions.py check
say "SQL-level, integration and worker tests on a private cluster"
packages=(-p stageflow-tests -p stageflow-client -p stageflow-cli -p stageflow-worker -p stageflow-http)
test_args=(--test-threads "${STAGEFLOW_TEST_THREADS:-4}")
if $core; then
    cargo build -p stageflow-cli
    for name in "${core_skips[@]}"; do test_args+=(--skip "$name"); done
else
    cargo build -p stageflow-cli --features geo
    packages+=(-p stageflow-geo --features stageflow-cli/geo)
fi
rm -rf "$cluster"
STAGEFLOW_TEST_DATABASE_URL=$("$stageflow" cluster start --dir "$cluster")
export STAGEFLOW_TEST_DATABASE_URL
trap '"$stageflow" cluster stop --dir "$cluster"' EXIT
say "isolation specs"; scripts/isolation.sh "$STAGEFLOW_TEST_DATABASE_URL"
cargo test "${packages[@]}" -- "${test_args[@]}"
