-- One job's bad planner output never stops anyone else: duplicate keys across the planner tasks
-- of a dynamic stage are found only when the stage advances, and that may happen inside another
-- caller's transaction (a claim dead-lettering an expired lease, a maintenance round, another
-- worker's batch). The stage's creation fails *that job* (stage_creation_failed, permanent); the
-- caller's claim, batch or round goes on.
SELECT stageflow.register_job_type('planner', $$
{"retry": {"max_attempts": 1},
 "stages": [{"name": "plan", "handler": "p.plan", "queue": "shared", "fan_out": "count", "param": "n", "max_failed_tasks": 1},
            {"name": "work", "handler": "p.work", "queue": "shared", "fan_out": "dynamic"}]}
$$);
SELECT stageflow.register_job_type('bystander', $$
{"stages": [{"name": "s", "handler": "b.s", "queue": "shared", "fan_out": "count", "param": "n"}]}
$$);

SET stageflow.fake_now = '2030-01-01 00:00:00+00';
CREATE TEMP TABLE jobs AS
SELECT stageflow.submit_job('planner', '{"n": 3}') AS by_claim,
       stageflow.submit_job('planner', '{"n": 3, "tag": "maintenance"}') AS by_maintenance;

DO $$
DECLARE
    v_jobs    record := (SELECT j FROM jobs AS j);
    v_report  jsonb;
    r         record;
BEGIN
    -- Each planner job: claim all three with a 1 s lease, complete two naming the same key.
    FOR r IN SELECT c.task_id, c.task_key, c.lease_token FROM stageflow.claim_tasks('shared', 6, 1, 'w') AS c ORDER BY c.task_id LOOP
        IF r.task_key <> '2' THEN
            PERFORM stageflow.complete_task_and_check_stage(r.task_id, '{"tasks": [{"key": "x"}]}', 'w', r.lease_token);
        END IF;
    END LOOP;
    PERFORM stageflow.submit_job('bystander', '{"n": 2}');

    -- At 00:00:05 both third tasks' leases have expired with no attempt left. The claim that
    -- dead-letters one (the first job's: lower msg_id) advances its stage: that job fails, and the
    -- claim still hands out the bystander's tasks.
    PERFORM set_config('stageflow.fake_now', '2030-01-01 00:00:05+00', true);
    ASSERT (SELECT count(*) FROM stageflow.claim_tasks('shared', 1, 60, 'w')) = 0, 'the first claim reads the dead-lettered message';
    ASSERT (stageflow.job_status(v_jobs.by_claim)) ->> 'status' = 'failed';
    v_report := (stageflow.job_status(v_jobs.by_claim)) -> 'error';
    ASSERT v_report ->> 'type' = 'stage_creation_failed' AND v_report ->> 'category' = 'permanent'
       AND v_report ->> 'sqlstate' = '22023' AND v_report ->> 'message' LIKE '%task key ''x'' more than once%'
       AND (v_report ->> 'stage')::int = 2, v_report::text;
    ASSERT EXISTS (SELECT 1 FROM stageflow.events WHERE job_id = v_jobs.by_claim AND kind = 'job_failed');
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.stages WHERE job_id = v_jobs.by_claim AND stage = 2), 'no half-made stage';

    -- The second job's expired lease is dead-lettered by a maintenance round: no error, the round
    -- goes on, the job fails the same way.
    v_report := stageflow.run_maintenance();
    ASSERT NOT v_report ? 'error' AND (v_report ->> 'errors')::int = 0 AND (v_report ->> 'dead_lettered')::int = 1, v_report::text;
    ASSERT (stageflow.job_status(v_jobs.by_maintenance)) -> 'error' ->> 'type' = 'stage_creation_failed';

    -- The queue still works for everyone else.
    ASSERT (SELECT count(*) FROM stageflow.claim_tasks('shared', 10, 60, 'w') AS c WHERE c.job_type = 'bystander') = 2;
END;
$$;

-- retry_job starts the deadline over: the next maintenance round does not fail the job again.
SELECT stageflow.register_job_type('deadlined', $$
{"timeout_seconds": 60, "retry": {"max_attempts": 1},
 "stages": [{"name": "s", "handler": "d.s", "queue": "dl"}]}
$$);
SET stageflow.fake_now = '2030-01-02 00:00:00+00';
CREATE TEMP TABLE dl AS SELECT stageflow.submit_job('deadlined', '{}') AS id;
SET stageflow.fake_now = '2030-01-02 00:02:00+00';
DO $$
DECLARE
    v_job text := (SELECT id FROM dl);
BEGIN
    ASSERT (stageflow.run_maintenance() ->> 'jobs_timed_out')::int = 1;
    ASSERT (stageflow.retry_job(v_job)) ->> 'job_status' = 'processing';
    ASSERT (SELECT deadline_at FROM stageflow.jobs WHERE job_id = v_job) = '2030-01-02 00:03:00+00';
    ASSERT (stageflow.run_maintenance() ->> 'jobs_timed_out')::int = 0, 'a retried job gets its time again';
    ASSERT (stageflow.job_status(v_job)) ->> 'status' = 'processing';
END;
$$;

-- Task ids keep 16 hex digits of their job's id. When another job's tasks already hold the ids of
-- the stage a completion is about to create (two job ids with the same first 16 digits; made here
-- with a task row of a job that does not exist), that job fails (stage_creation_failed, 23505),
-- found before anything of the stage is written; the batch that advanced it goes on.
SELECT stageflow.register_job_type('clash', $$
{"stages": [{"name": "a", "handler": "c.a", "queue": "clash"}, {"name": "b", "handler": "c.b", "queue": "clash"}]}
$$);
SELECT stageflow.register_job_type('clash_bystander', $$
{"stages": [{"name": "s", "handler": "b.s", "queue": "clash_bystander"}]}
$$);
SET stageflow.fake_now = '2030-01-03 00:00:00+00';
DO $$
DECLARE
    v_job       text := stageflow.submit_job('clash', '{}');
    v_other     text := stageflow.submit_job('clash_bystander', '{}');
    v_reports   jsonb;
    v_error     jsonb;
BEGIN
    INSERT INTO stageflow.tasks (task_id, job_id, stage, ordinal, max_attempts, msg_id, task_key)
    VALUES (left(v_job, 16) || '-s2-0', repeat('0', 64), 2, 0, 1, 0, '0');
    v_reports := stageflow.complete_tasks(
        (SELECT jsonb_agg(jsonb_build_object('task_id', c.task_id, 'result', '{}'::jsonb, 'lease_token', c.lease_token))
           FROM (SELECT * FROM stageflow.claim_tasks('clash', 1, 60, 'w')
                 UNION ALL SELECT * FROM stageflow.claim_tasks('clash_bystander', 1, 60, 'w')) AS c), 'w');
    ASSERT jsonb_array_length(v_reports) = 2 AND NOT jsonb_path_exists(v_reports, '$[*].error'), v_reports::text;
    v_error := (stageflow.job_status(v_job)) -> 'error';
    ASSERT (stageflow.job_status(v_job)) ->> 'status' = 'failed', (stageflow.job_status(v_job))::text;
    ASSERT v_error ->> 'type' = 'stage_creation_failed' AND v_error ->> 'sqlstate' = '23505', v_error::text;
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.stages AS s WHERE s.job_id = v_job AND s.stage = 2), 'nothing of stage 2 written';
    ASSERT (stageflow.job_status(v_other)) ->> 'status' = 'completed';
    DELETE FROM stageflow.tasks AS t WHERE t.job_id = repeat('0', 64);
END;
$$;
