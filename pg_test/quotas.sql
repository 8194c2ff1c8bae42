-- Quotas bound what a login's submissions create: the tasks of one job over all its stages
-- (stageflow.max_tasks_per_job, a dynamic fan-out included, fixed when the job is submitted) and
-- the open tasks of its jobs under each tenant label when it submits (stageflow.max_open_tasks);
-- stageflow.set_quota sets them per login. A submission over a limit is refused with 54000 and a
-- hint, and creates nothing, also when its first stage is empty and the next one is over; a later
-- stage over the per-job limit fails its job. The defaults refuse a million tasks in one call.
DO $$
BEGIN
    CREATE ROLE stageflow_quota_carol LOGIN;
EXCEPTION WHEN duplicate_object THEN
    NULL;
END;
$$;
GRANT stageflow_submitter TO stageflow_quota_carol;

SELECT stageflow.register_job_type('quota_count', $$
{"parameters": {"type": "object", "properties": {"n": {"type": "integer"}, "tag": {"type": "string"}}},
 "stages": [{"name": "s", "handler": "q.s", "queue": "quota_q", "fan_out": "count", "param": "n"}]}
$$);
SELECT stageflow.register_job_type('quota_two', $$
{"parameters": {"type": "object", "properties": {"n": {"type": "integer"}, "m": {"type": "integer"}}},
 "stages": [{"name": "first", "handler": "q.s", "queue": "quota_q", "fan_out": "count", "param": "n"},
            {"name": "second", "handler": "q.s", "queue": "quota_q", "fan_out": "count", "param": "m"}]}
$$);
SELECT stageflow.register_job_type('quota_plan', $$
{"parameters": {"type": "object", "properties": {"tag": {"type": "string"}}},
 "stages": [{"name": "plan", "handler": "q.plan", "queue": "quota_q"},
            {"name": "work", "handler": "q.work", "queue": "quota_q", "fan_out": "dynamic"}]}
$$);

-- Refused with 54000 and a hint, nothing created: raises if the call succeeds.
CREATE FUNCTION pg_temp.refused(p_sql text, p_message text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_hint text;
BEGIN
    EXECUTE p_sql;
    RAISE EXCEPTION 'expected a quota refusal: %', p_sql;
EXCEPTION WHEN program_limit_exceeded THEN
    GET STACKED DIAGNOSTICS v_hint = PG_EXCEPTION_HINT;
    ASSERT SQLERRM LIKE p_message, SQLERRM;
    ASSERT v_hint LIKE '%stageflow.set_quota(role, max_open_tasks, max_tasks_per_job)%', v_hint;
END;
$$;

SET SESSION AUTHORIZATION stageflow_quota_carol;
-- The defaults: 100000 tasks a job, 1000000 open tasks.
SELECT pg_temp.refused($$SELECT stageflow.submit_job('quota_count', '{"n": 1000000}')$$,
                       'stage 1 of job % would create 1000000 tasks, making 1000000 in the job: more than the 100000 tasks it may have');
DO $$
BEGIN
    ASSERT (SELECT (q.role_name, q.tenant, q.max_open_tasks, q.max_tasks_per_job, q.open_tasks, q.custom) FROM stageflow.list_quotas() AS q)
           = ('stageflow_quota_carol'::name, NULL::text, 1000000::bigint, 100000::bigint, 0::bigint, false), 'carol sees her own quota';
    BEGIN
        PERFORM stageflow.set_quota('stageflow_quota_carol', 1000000000, NULL);
        RAISE EXCEPTION 'a submitter must not set quotas';
    EXCEPTION WHEN insufficient_privilege THEN
        NULL;
    END;
END;
$$;
RESET SESSION AUTHORIZATION;
DO $$
BEGIN
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.jobs), 'the refused submission created nothing';
    ASSERT NOT EXISTS (SELECT 1 FROM pgmq.q_quota_q);
    ASSERT stageflow.set_quota('stageflow_quota_carol', 10, 6)
           = '{"role": "stageflow_quota_carol", "max_open_tasks": 10, "max_tasks_per_job": 6}';
    ASSERT stageflow.set_quota('stageflow_quota_carol', NULL, 5) ->> 'max_open_tasks' = '1000000', 'NULL: the default';
    ASSERT stageflow.set_quota('stageflow_quota_carol', 10, 5) ->> 'max_tasks_per_job' = '5';
    BEGIN
        PERFORM stageflow.set_quota('no_such_role', 1, 1);
        RAISE EXCEPTION 'an unknown role must be refused';
    EXCEPTION WHEN undefined_object THEN
        NULL;
    END;
    BEGIN
        PERFORM stageflow.set_quota('stageflow_quota_carol', -1, 1);
        RAISE EXCEPTION 'a negative quota must be refused';
    EXCEPTION WHEN invalid_parameter_value THEN
        NULL;
    END;
END;
$$;

SET SESSION AUTHORIZATION stageflow_quota_carol;
SELECT pg_temp.refused($$SELECT stageflow.submit_job('quota_count', '{"n": 6}')$$,
                       '% would create 6 tasks, making 6 in the job: more than the 5 tasks it may have');
CREATE TEMP TABLE carol_jobs AS
SELECT stageflow.submit_job('quota_count', '{"n": 5, "tag": "a"}') AS job_id
UNION ALL
SELECT stageflow.submit_job('quota_count', '{"n": 4, "tag": "b"}');
-- 9 open: one more fits, two do not.
SELECT pg_temp.refused($$SELECT stageflow.submit_job('quota_count', '{"n": 2, "tag": "c"}')$$,
                       'this submission would leave login stageflow_quota_carol with 11 open tasks, more than its quota of 10');
DO $$
BEGIN
    ASSERT (SELECT count(*) FROM stageflow.list_jobs()) = 2, 'the refused submission created nothing';
    ASSERT (SELECT q.open_tasks FROM stageflow.list_quotas() AS q) = 9;
END;
$$;
INSERT INTO carol_jobs SELECT stageflow.submit_job('quota_count', '{"n": 1, "tag": "c"}');
-- Her jobs finish or are cancelled: room again. Resuming a cancelled job counts its tasks again.
SELECT stageflow.cancel_job(job_id) FROM carol_jobs WHERE job_id = stageflow.job_id('quota_count', '{"n": 5, "tag": "a"}');
INSERT INTO carol_jobs SELECT stageflow.submit_job('quota_count', '{"n": 3, "tag": "d"}');
SELECT pg_temp.refused($$SELECT stageflow.submit_job('quota_count', '{"n": 5, "tag": "a"}')$$,
                       'this submission would leave login stageflow_quota_carol with 13 open tasks, more than its quota of 10');
DO $$
BEGIN
    ASSERT (SELECT status FROM stageflow.list_jobs() WHERE job_id = stageflow.job_id('quota_count', '{"n": 5, "tag": "a"}'))
           = 'cancelled', 'the refused resumption changed nothing';
END;
$$;
-- An empty first stage does not let the next one past the quotas: refused, nothing created.
SELECT pg_temp.refused($$SELECT stageflow.submit_job('quota_two', '{"n": 0, "m": 3}')$$,
                       'this submission would leave login stageflow_quota_carol with 11 open tasks, more than its quota of 10');
SELECT pg_temp.refused($$SELECT stageflow.submit_job('quota_two', '{"n": 0, "m": 6}')$$,
                       'creating the tasks of stage 2 failed: stage 2 of job % would create 6 tasks, making 6 in the job: more than the 5 tasks it may have');
-- Each tenant label of the login has the login's quota to itself.
SET stageflow.tenant = 'side';
INSERT INTO carol_jobs SELECT stageflow.submit_job('quota_count', '{"n": 5, "tag": "side"}');
DO $$
BEGIN
    ASSERT (SELECT array_agg((q.tenant, q.open_tasks)::text) FROM stageflow.list_quotas() AS q) = ARRAY['(side,5)'],
           'under a label, only its own count';
END;
$$;
RESET stageflow.tenant;
DO $$
BEGIN
    ASSERT (SELECT array_agg((q.tenant, q.open_tasks)::text ORDER BY q.tenant NULLS FIRST) FROM stageflow.list_quotas() AS q)
           = ARRAY['(,8)', '(side,5)'], 'without a label, every label of the login';
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.list_jobs(filter_type => 'quota_two')), 'the refused submissions created nothing';
END;
$$;
-- A planner may not take the job past its limit: the job fails, its planner's report stands.
CREATE TEMP TABLE plan_job AS SELECT stageflow.submit_job('quota_plan', '{"tag": "p"}') AS job_id;
RESET SESSION AUTHORIZATION;
DO $$
DECLARE
    v_job   text := (SELECT job_id FROM plan_job);
    v_task  record;
    v_error jsonb;
BEGIN
    -- (carol's other tasks are claimed with it and left running)
    SELECT * INTO STRICT v_task FROM stageflow.claim_tasks('quota_q', 100, 60, 'w') AS c WHERE c.job_id = v_job;
    PERFORM stageflow.complete_task_and_check_stage(v_task.task_id,
        jsonb_build_object('tasks', (SELECT jsonb_agg(jsonb_build_object('key', 'k' || i)) FROM generate_series(1, 5) AS i)),
        'w', v_task.lease_token);
    SELECT error INTO v_error FROM stageflow.jobs WHERE job_id = v_job;
    ASSERT (SELECT status FROM stageflow.jobs WHERE job_id = v_job) = 'failed';
    ASSERT v_error ->> 'type' = 'stage_creation_failed' AND v_error ->> 'sqlstate' = '54000'
       AND v_error ->> 'message' LIKE '%would create 5 tasks, making 6 in the job: more than the 5 tasks it may have', v_error::text;
    ASSERT (SELECT status FROM stageflow.tasks WHERE task_id = v_task.task_id) = 'completed';
    ASSERT stageflow.set_quota('stageflow_quota_carol') ->> 'max_tasks_per_job' = '100000', 'no row: the defaults';
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.role_quotas);
END;
$$;
