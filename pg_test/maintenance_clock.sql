-- Maintenance under a fake clock (SET stageflow.fake_now): no sleeping. Expired leases with
-- attempts left are redelivered, without attempts they are dead-lettered; due retries are released;
-- jobs past their deadline fail; finished jobs past the retention are deleted.
SELECT stageflow.register_job_type('clocked', $$
{"retry": {"max_attempts": 2, "backoff_base_seconds": 600, "backoff_max_seconds": 600},
 "timeout_seconds": 3600,
 "stages": [{"name": "s", "handler": "c.s", "queue": "clock", "fan_out": "count", "param": "n"}]}
$$);

-- Keep finished jobs until the retention step below (the default retention is 7 days).
SET stageflow.retention = 0;
SET stageflow.fake_now = '2030-01-01 00:00:00+00';
CREATE TEMP TABLE job AS SELECT stageflow.submit_job('clocked', '{"n": 2}') AS id;
DO $$
DECLARE
    v_job text := (SELECT id FROM job);
    v_tasks text[];
    v_report jsonb;
BEGIN
    ASSERT (SELECT created_at FROM stageflow.jobs WHERE job_id = v_job) = '2030-01-01 00:00:00+00';
    ASSERT (SELECT deadline_at FROM stageflow.jobs WHERE job_id = v_job) = '2030-01-01 01:00:00+00';
    SELECT array_agg(task_id ORDER BY task_key) INTO v_tasks FROM stageflow.claim_tasks('clock', 2, 300);
    ASSERT (SELECT lease_expires_at FROM stageflow.tasks WHERE task_id = v_tasks[1]) = '2030-01-01 00:05:00+00';

    -- Task 2 fails and waits 300 to 600 s; nothing is due at 00:04.
    PERFORM stageflow.fail_task(v_tasks[2], '{"message": "later"}');
    PERFORM set_config('stageflow.fake_now', '2030-01-01 00:04:00+00', false);
    v_report := stageflow.run_maintenance();
    ASSERT v_report @> '{"retries_released": 0, "leases_expired": 0, "dead_lettered": 0, "jobs_timed_out": 0, "jobs_deleted": 0, "errors": 0}', v_report::text;

    -- At 00:11 task 1's lease (to 00:05) has expired with an attempt left, and task 2's retry is due.
    PERFORM set_config('stageflow.fake_now', '2030-01-01 00:11:00+00', false);
    v_report := stageflow.run_maintenance();
    ASSERT (v_report ->> 'leases_expired')::int = 1 AND (v_report ->> 'retries_released')::int = 1, v_report::text;
    ASSERT (SELECT count(*) FROM stageflow.claim_tasks('clock', 2, 300) AS c WHERE c.attempt = 2) = 2,
        'both are claimable again, on attempt 2, without waiting for pgmq''s real clock';

    -- At 00:20 both attempt-2 leases (to 00:16) expired with no attempt left: dead letters.
    PERFORM set_config('stageflow.fake_now', '2030-01-01 00:20:00+00', false);
    v_report := stageflow.run_maintenance();
    ASSERT (v_report ->> 'dead_lettered')::int = 1, 'the first dead letter fails the job (nothing tolerated): ' || v_report::text;
    ASSERT (stageflow.job_status(v_job)) ->> 'status' = 'failed';
    ASSERT (SELECT count(*) FROM stageflow.dead_letters() WHERE job_id = v_job) = 1;
    ASSERT (SELECT error ->> 'type' FROM stageflow.tasks WHERE job_id = v_job AND status = 'dead') = 'lease_expired';
END;
$$;

-- Deadlines: a job still running after timeout_seconds fails.
SET stageflow.fake_now = '2030-02-01 00:00:00+00';
CREATE TEMP TABLE slow_job AS SELECT stageflow.submit_job('clocked', '{"n": 1}') AS id;
SET stageflow.fake_now = '2030-02-01 01:00:01+00';
DO $$
DECLARE
    v_job text := (SELECT id FROM slow_job);
BEGIN
    ASSERT stageflow.run_maintenance() @> '{"jobs_timed_out": 1, "jobs_deleted": 0}';
    ASSERT (stageflow.job_status(v_job)) ->> 'status' = 'failed';
    ASSERT (stageflow.job_status(v_job)) -> 'error' ->> 'type' = 'job_timeout';
    ASSERT NOT EXISTS (SELECT 1 FROM pgmq.q_clock), 'its task''s message is gone';
END;
$$;

-- Retention: finished jobs older than stageflow.retention are deleted with their rows.
SET stageflow.retention = '30 days';
SET stageflow.fake_now = '2030-03-05 00:00:00+00';
DO $$
DECLARE
    v_report jsonb := stageflow.run_maintenance(1);
BEGIN
    ASSERT (v_report ->> 'jobs_deleted')::int = 1, 'bounded by max_rows: ' || v_report::text;
    v_report := stageflow.run_maintenance();
    ASSERT (v_report ->> 'jobs_deleted')::int = 1, 'the second (finished 2030-02-01 01:00) is past 30 days too: ' || v_report::text;
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.jobs);
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.tasks);
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.stages);
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.events);
END;
$$;

-- A round that goes wrong is reported, not raised.
SET stageflow.retention = 'not an interval';
DO $$ BEGIN
    ASSERT stageflow.run_maintenance() ? 'error';
END $$;

-- A round runs without JIT (what it runs are bounded batches, and JIT compiles a statement anew on
-- every execution: an idle round with an unanalysed job_types table took 350-420 ms, 4 ms without).
DO $$
BEGIN
    ASSERT (SELECT 'jit=off' = ANY (p.proconfig) FROM pg_proc AS p
             WHERE p.oid = 'stageflow.run_maintenance(int)'::regprocedure), 'run_maintenance sets jit = off';
END;
$$;

-- Messages that became visible are found by a walk over each queue in msg_id order, at most
-- max_rows messages of it a round (not by pgmq's index on vt: Stageflow's queues have none), and
-- each is counted once, by the first pass over the queue that starts after it became visible.
RESET stageflow.retention;
SELECT stageflow.register_job_type('walked', $$
{"retry": {"max_attempts": 3}, "stages": [{"name": "s", "handler": "w.s", "queue": "walked", "fan_out": "count", "param": "n"}]}
$$);
SET stageflow.fake_now = '2030-04-01 00:00:00+00';
CREATE TEMP TABLE walked_job AS SELECT stageflow.submit_job('walked', '{"n": 5}') AS id;
DO $$
DECLARE
    v_report jsonb;
    v_counts int[] := '{}';
BEGIN
    ASSERT (SELECT count(*) FROM stageflow.claim_tasks('walked', 5, 60)) = 5;
    -- (a pass starting now, over the 5 messages whose leases run to 00:01, counts nothing)
    FOR i IN 1..3 LOOP
        v_report := stageflow.run_maintenance(2);
        ASSERT (v_report ->> 'leases_expired')::int = 0, v_report::text;
    END LOOP;
    PERFORM set_config('stageflow.fake_now', '2030-04-01 00:02:00+00', false);
    FOR i IN 1..4 LOOP
        v_report := stageflow.run_maintenance(2);
        ASSERT (v_report ->> 'errors')::int = 0, v_report::text;
        v_counts := v_counts || (v_report ->> 'leases_expired')::int;
    END LOOP;
    ASSERT v_counts = '{2,2,1,0}', 'two messages a round, each counted once: ' || v_counts::text;
    ASSERT (SELECT count(*) FROM stageflow.claim_tasks('walked', 5, 60) AS c WHERE c.attempt = 2) = 5;
    -- A position of another shape (written by hand) counts as none, and fails no round.
    UPDATE stageflow.maintenance_cursors SET position = '1.5' WHERE name = 'visible:walked';
    ASSERT FOUND;
    v_report := stageflow.run_maintenance(2);
    ASSERT (v_report ->> 'errors')::int = 0, v_report::text;
END;
$$;
RESET stageflow.fake_now;
