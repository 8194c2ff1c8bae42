-- A stage may tolerate failed tasks: within max_failed_tasks / max_failure_ratio it completes with
-- the successful tasks' results and the job ends completed_with_errors; beyond, the job fails.
SELECT stageflow.register_job_type('tolerant', $$
{"retry": {"max_attempts": 1},
 "stages": [{"name": "tiles", "handler": "t.tile", "queue": "tol", "fan_out": "count", "param": "n", "max_failed_tasks": 1},
            {"name": "check", "handler": "t.check", "queue": "tol", "fan_out": "lineage", "max_failure_ratio": 0.5}]}
$$);

DO $$
DECLARE
    v_job text := stageflow.submit_job('tolerant', '{"n": 4}');
    r record;
BEGIN
    -- Stage 1: task 0 fails (tolerated: 1 <= max_failed_tasks), the rest complete.
    FOR r IN SELECT * FROM stageflow.claim_tasks('tol', 10) ORDER BY task_key LOOP
        IF r.task_key = '0' THEN
            ASSERT (stageflow.fail_task(r.task_id, '{"message": "broken tile"}', false)) ->> 'job_status' = 'processing';
        ELSE
            PERFORM stageflow.complete_task_and_check_stage(r.task_id, jsonb_build_object('tile', r.task_key));
        END IF;
    END LOOP;
    ASSERT (SELECT current_stage FROM stageflow.jobs WHERE job_id = v_job) = 2, 'the stage completed despite the failure';
    ASSERT (SELECT array_agg(task_key ORDER BY ordinal) FROM stageflow.tasks WHERE job_id = v_job AND stage = 2) = ARRAY['1', '2', '3'],
        'lineage follows the successful tasks only';

    -- Stage 2: one of three fails (0.33 <= 0.5): tolerated.
    FOR r IN SELECT * FROM stageflow.claim_tasks('tol', 10) ORDER BY task_key LOOP
        IF r.task_key = '3' THEN
            PERFORM stageflow.fail_task(r.task_id, '{"message": "invalid"}', false);
        ELSE
            PERFORM stageflow.complete_task_and_check_stage(r.task_id, r.predecessor);
        END IF;
    END LOOP;
    ASSERT (stageflow.job_status(v_job)) ->> 'status' = 'completed_with_errors', (stageflow.job_status(v_job))::text;
    -- The result: the completed tasks' results of the last stage, in task order.
    ASSERT (SELECT jsonb_agg(e -> 'result' ORDER BY (e ->> 'ordinal')::int) FROM jsonb_array_elements(stageflow.job_result(v_job) -> 'entries') AS e) = '[{"tile": "1"}, {"tile": "2"}]';
    ASSERT (stageflow.job_status(v_job)) -> 'result_count' = '2';
END;
$$;

DO $$
DECLARE
    v_job text := stageflow.submit_job('tolerant', '{"n": 5}');
    v_tasks text[];
BEGIN
    SELECT array_agg(task_id ORDER BY task_key) INTO v_tasks FROM stageflow.claim_tasks('tol', 10);
    PERFORM stageflow.fail_task(v_tasks[1], '{"message": "one"}', false);
    ASSERT (stageflow.job_status(v_job)) ->> 'status' = 'processing';
    PERFORM stageflow.fail_task(v_tasks[2], '{"message": "two"}', false);
    ASSERT (stageflow.job_status(v_job)) ->> 'status' = 'failed', 'two failures exceed max_failed_tasks = 1';
    ASSERT (SELECT count(*) FROM stageflow.tasks WHERE job_id = v_job AND status = 'cancelled') = 3;
    ASSERT (stageflow.job_status(v_job)) -> 'error' ->> 'message' LIKE '%tolerates 1 failed task(s)%';
END;
$$;
