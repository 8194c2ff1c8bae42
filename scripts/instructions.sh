#!/usr/bin/env bash
# Instructions per claim + completion of one task, and per pgmq read + delete of one message,
# counted by valgrind (cachegrind) on a single-user PostgreSQL backend: a measure of server CPU
# that does not move with the machine's load (the rates of scripts/bench.sh do, by 10-30 % between
# runs on a shared 2-core machine). Not a benchmark: one backend, one statement a pair
# (`claim_tasks` joined to `complete_task_and_check_stage`, so both run in one transaction), no
# client, no commit flush. Use it to compare two versions of the hot path; scripts/bench.sh stays
# the measure of speed.
#
# The pair completes without the report (`report => false`), as the worker runtime and the
# benchmark call it, and is counted as the superuser (the benchmark's login, which skips the queue
# grant checks), as a login with stageflow_worker granted the queue (as a deployed worker runs),
# and with the report (the psql form's default; every argument written out: a default filled in
# when the statement is planned is counted here, since each statement is planned anew, but not by
# a client that prepares it). Then batched, per task: a claim of 100 and complete_tasks without
# reports, against pgmq's read 100 + delete 100.
# Each count is the difference of two runs over a fresh copy of one template database (the same
# job submitted, then 10 or 310 pairs), divided by 300: what the setup costs cancels out. Counts
# repeat to within 0.2 % (bench/README.md, fifteenth pass).
#
# usage: scripts/instructions.sh [FILE.sql]  the installed extension (scripts/setup.sh installs it),
#                                           FILE.sql applied after it (a variant to compare)
# The counts are of the installed build: a debug build of the library (what scripts/test.sh
# installs) counted 57,000 instructions a pair more than an optimised one (`cargo pgrx install
# --release`, what scripts/bench.sh installs), in the Rust that reads and deletes messages.
# Needs valgrind (`apt-get install valgrind`); runs a private cluster as the postgres user under
# /var/tmp/stageflow-instructions, on port 5491, and stops it when done.
set -euo pipefail
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
DIR=/var/tmp/stageflow-instructions
PORT=5491
command -v valgrind >/dev/null || { echo "valgrind is missing: apt-get install valgrind" >&2; exit 2; }
as_pg() { sudo -u postgres "$@"; }
psql_() { psql -h /tmp -p "$PORT" -U postgres -Xq -v ON_ERROR_STOP=1 "$@"; }
start() { as_pg "$PG_BIN/pg_ctl" -D "$DIR" -o "-p $PORT -k /tmp" -l "$DIR.log" start -w >/dev/null; }
stop() { as_pg "$PG_BIN/pg_ctl" -D "$DIR" stop -m fast -w >/dev/null; }

rm -rf "$DIR"
mkdir -p "$DIR" && chown postgres "$DIR"
as_pg "$PG_BIN/initdb" -D "$DIR" -A trust >/dev/null
printf "shared_buffers = 256MB\nfsync = off\nsynchronous_commit = off\n" >> "$DIR/postgresql.conf"
start
trap 'stop 2>/dev/null || true' EXIT
psql_ -c "CREATE DATABASE template_pairs"
psql_ -d template_pairs -c "CREATE EXTENSION stageflow CASCADE" 2>&1 | grep -v NOTICE || true
if [ -n "${1:-}" ]; then psql_ -d template_pairs -f "$1" >/dev/null; fi
psql_ -d template_pairs -c "SELECT stageflow.register_job_type('pairs', '{\"parameters\": {\"type\": \"object\", \"properties\": {\"n\": {\"type\": \"integer\"}}}, \"stages\": [{\"name\": \"a\", \"handler\": \"h\", \"queue\": \"pairs\", \"fan_out\": \"count\", \"param\": \"n\"}, {\"name\": \"b\", \"handler\": \"h\", \"queue\": \"pairs\", \"fan_out\": \"lineage\"}]}'::jsonb)" >/dev/null
# (the queue is made by the first claim; pgmq's queue for the other line; a worker login granted
# the queue, for the line that claims as workers do, under the grant checks a superuser skips)
psql_ -d template_pairs -c "SELECT count(*) FROM stageflow.claim_tasks('pairs', 1)" -c "SELECT pgmq.create('plain')" \
    -c "CREATE ROLE stageflow_instructions_worker LOGIN IN ROLE stageflow_worker" \
    -c "SELECT stageflow.grant_queue('pairs', 'stageflow_instructions_worker')" >/dev/null
stop

# count SETUP PAIR N: instructions of a single-user backend on a fresh copy of the template
count() {
    start
    psql_ -c "DROP DATABASE IF EXISTS pairs_run" -c "CREATE DATABASE pairs_run TEMPLATE template_pairs" 2>&1 | grep -v NOTICE || true
    stop
    local script out
    script=$(mktemp) out=$(mktemp)
    { echo "$1"; for _ in $(seq 1 "$3"); do echo "$2"; done; } > "$script"
    as_pg valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \
        "$PG_BIN/postgres" --single -D "$DIR" pairs_run < "$script" > "$out" 2>&1
    if grep -q ERROR "$out"; then grep -m3 ERROR "$out" >&2; exit 1; fi
    grep -oP 'I\s+refs:\s+\K[0-9,]+' "$out" | tr -d ,
    rm -f "$script" "$out"
}
per_pair() {
    local a b
    a=$(count "$1" "$2" 10)
    b=$(count "$1" "$2" 310)
    echo $(((b - a) / 300))
}
# (the completion without its report, as the worker runtime and the benchmark call it; then with it)
pair="SELECT count(*) FROM stageflow.claim_tasks('pairs', 1, 60, 'w') AS c, stageflow.complete_task_and_check_stage(c.task_id, '{}', 'w', c.lease_token, false);"
reported="SELECT count(*) FROM stageflow.claim_tasks('pairs', 1, 60, 'w') AS c, stageflow.complete_task_and_check_stage(c.task_id, '{}', 'w', c.lease_token, true);"
stageflow=$(per_pair "SELECT stageflow.submit_job('pairs', '{\"n\": 3000}');" "$pair")
worker=$(per_pair "SELECT stageflow.submit_job('pairs', '{\"n\": 3000}'); SET SESSION AUTHORIZATION stageflow_instructions_worker;" "$pair")
with_report=$(per_pair "SELECT stageflow.submit_job('pairs', '{\"n\": 3000}');" "$reported")
pgmq=$(per_pair "SELECT count(*) FROM pgmq.send_batch('plain', array_fill('{\"task_id\": \"x\"}'::jsonb, ARRAY[3000]));" \
    "SELECT pgmq.delete('plain', m.msg_id) FROM pgmq.read('plain', 30, 1) AS m;")
# Batched, as the benchmark's batched pgbench lines: a claim of 100 and complete_tasks without the
# accepted ones' reports, against pgmq's read 100 + delete 100; counted per task (a pair of 100,
# divided by 100 again).
batch="SELECT jsonb_array_length(stageflow.complete_tasks(b.batch, 'w', false)) FROM (SELECT jsonb_agg(jsonb_build_object('task_id', c.task_id, 'lease_token', c.lease_token)) AS batch FROM stageflow.claim_tasks('pairs', 100, 60, 'w') AS c) AS b;"
stageflow_batch=$(per_pair "SELECT stageflow.submit_job('pairs', '{\"n\": 32000}');" "$batch")
pgmq_batch=$(per_pair "SELECT count(*) FROM pgmq.send_batch('plain', array_fill('{\"task_id\": \"x\"}'::jsonb, ARRAY[32000]));" \
    "SELECT count(*) FROM pgmq.delete('plain', (SELECT array_agg(m.msg_id) FROM pgmq.read('plain', 30, 100) AS m));")
printf '%-56s %10s instructions\n' "stageflow claim + complete, one task (report => false)" "$stageflow"
printf '%-56s %10s instructions\n' "the same as a worker login (queue granted)" "$worker"
printf '%-56s %10s instructions\n' "the same with the completion's report" "$with_report"
printf '%-56s %10s instructions\n' "pgmq read + delete, one message" "$pgmq"
printf '%-56s %10s instructions\n' "stageflow claim 100 + complete_tasks, a task" "$((stageflow_batch / 100))"
printf '%-56s %10s instructions\n' "pgmq read 100 + delete 100, a message" "$((pgmq_batch / 100))"
