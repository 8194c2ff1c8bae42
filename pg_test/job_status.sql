-- job_status reports counts by task status per stage and progress across stages.
DO $$
DECLARE
    v_job text := stageflow.submit_job('hello_world', '{"message": "status", "n": 4}');
    v_status jsonb;
    v_task text;
BEGIN
    v_status := stageflow.job_status(v_job);
    ASSERT v_status ->> 'status' = 'queued' AND (v_status ->> 'progress')::numeric = 0;
    ASSERT v_status -> 'stages' -> 1 ->> 'status' = 'pending', 'stage 2 is not created yet';

    SELECT task_id INTO v_task FROM stageflow.claim_tasks('default', 2) LIMIT 1;
    PERFORM stageflow.complete_task_and_check_stage(v_task, '{}');
    v_status := stageflow.job_status(v_job);
    ASSERT v_status ->> 'status' = 'processing';
    ASSERT v_status -> 'stages' -> 0 -> 'tasks' = '{"queued": 2, "running": 1, "completed": 1, "failed": 0, "cancelled": 0}',
        v_status -> 'stages' -> 0 ->> 'tasks';
    -- 1 of 4 tasks of stage 1 of 2: 12.5 %
    ASSERT (v_status ->> 'progress')::numeric = 12.5, 'progress ' || (v_status ->> 'progress');
    ASSERT (SELECT count(*) FROM stageflow.job_tasks(v_job)) = 4;
    ASSERT (SELECT status FROM stageflow.job_tasks(v_job) WHERE task_id = v_task) = 'completed';
END;
$$;

-- Claim-to-completion time is summed on the stage row (for the duration metric).
SELECT stageflow.register_job_type('timing', '{"stages": [{"name": "s", "handler": "h", "queue": "timing", "fan_out": "count", "param": "n"}]}');
SET stageflow.fake_now = '2031-01-01 00:00:00+00';
CREATE TEMP TABLE timed AS SELECT stageflow.submit_job('timing', '{"n": 2}') AS id;
CREATE TEMP TABLE held AS SELECT task_id FROM stageflow.claim_tasks('timing', 2);
SET stageflow.fake_now = '2031-01-01 00:00:05+00';
SELECT stageflow.complete_task_and_check_stage((SELECT min(task_id) FROM held), '{}');
SET stageflow.fake_now = '2031-01-01 00:00:07+00';
SELECT stageflow.complete_tasks(jsonb_build_array(jsonb_build_object('task_id', (SELECT max(task_id) FROM held))));
DO $$ BEGIN
    ASSERT (SELECT completed_seconds FROM stageflow.stage_counts WHERE job_id = (SELECT id FROM timed) AND stage = 1) = 12,
        'claimed at 0 s, completed at 5 s and 7 s: 12 s in all';
END $$;

-- job_tasks a page at a time: after the last task of the previous page, at most max_rows; the
-- pages together are the whole list in order; a bad page size or a cursor of another job is 22023.
DO $$
DECLARE
    v_job text := stageflow.submit_job('hello_world', '{"message": "pages", "n": 5}');
    v_other text := stageflow.submit_job('hello_world', '{"message": "other pages", "n": 1}');
    v_all text[] := ARRAY(SELECT task_id FROM stageflow.job_tasks(v_job));
    v_first text[] := ARRAY(SELECT task_id FROM stageflow.job_tasks(v_job, NULL, 2));
    v_second text[];
    v_third text[];
    v_state text;
BEGIN
    ASSERT cardinality(v_all) = 5;
    v_second := ARRAY(SELECT task_id FROM stageflow.job_tasks(v_job, v_first[2], 2));
    v_third := ARRAY(SELECT task_id FROM stageflow.job_tasks(v_job, v_second[2], 2));
    ASSERT v_first || v_second || v_third = v_all, (v_first || v_second || v_third)::text;
    ASSERT cardinality(v_third) = 1;
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.job_tasks(v_job, v_third[1], 2)), 'nothing after the last task';
    BEGIN
        PERFORM stageflow.job_tasks(v_job, NULL, 0);
        RAISE EXCEPTION 'a page of 0 rows was accepted';
    EXCEPTION WHEN invalid_parameter_value THEN
        GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE;
        ASSERT SQLERRM = 'max_rows must be between 1 and 10000, got 0', SQLERRM;
    END;
    BEGIN
        PERFORM stageflow.job_tasks(v_job, (SELECT task_id FROM stageflow.job_tasks(v_other) LIMIT 1), 2);
        RAISE EXCEPTION 'a cursor of another job was accepted';
    EXCEPTION WHEN invalid_parameter_value THEN
        ASSERT SQLERRM LIKE 'after_task % is not a task of job %', SQLERRM;
    END;
END;
$$;
