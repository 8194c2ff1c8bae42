-- cancel_job removes queued tasks, refuses running tasks' completions and ends the job
-- cancelled; retry_job re-queues the stopped stage's failed, dead and cancelled tasks with fresh
-- attempts and the job resumes. Both are idempotent.
SELECT stageflow.register_job_type('resumable', $$
{"retry": {"max_attempts": 1},
 "stages": [{"name": "one", "handler": "r.one", "queue": "res", "fan_out": "count", "param": "n"},
            {"name": "two", "handler": "r.two", "queue": "res", "fan_out": "fan_in"}]}
$$);

DO $$
DECLARE
    v_job text := stageflow.submit_job('resumable', '{"n": 4}');
    v_running text;
    v_report jsonb;
BEGIN
    SELECT task_id INTO v_running FROM stageflow.claim_tasks('res', 1);
    v_report := stageflow.cancel_job(v_job);
    ASSERT v_report ->> 'cancelled' = 'true' AND v_report ->> 'job_status' = 'cancelled', v_report::text;
    ASSERT NOT EXISTS (SELECT 1 FROM pgmq.q_res), 'queued and running messages removed';
    ASSERT (SELECT count(*) FROM stageflow.tasks WHERE job_id = v_job AND status = 'cancelled') = 4;
    BEGIN
        PERFORM stageflow.complete_task_and_check_stage(v_running, '{}');
        RAISE EXCEPTION 'a running task''s completion after cancel must be refused';
    EXCEPTION WHEN object_not_in_prerequisite_state THEN NULL;
    END;
    ASSERT (stageflow.cancel_job(v_job)) ->> 'cancelled' = 'false', 'cancelling again changes nothing';

    -- Resume the cancelled job: all four come back with fresh attempts.
    v_report := stageflow.retry_job(v_job);
    ASSERT (v_report ->> 'retried_tasks')::int = 4 AND v_report ->> 'job_status' = 'processing', v_report::text;
    ASSERT (SELECT count(*) FROM pgmq.q_res) = 4;
    ASSERT (stageflow.retry_job(v_job)) ->> 'retried_tasks' = '0', 'retrying a running job changes nothing';
    PERFORM stageflow.complete_task_and_check_stage(c.task_id, '{"ok": true}') FROM stageflow.claim_tasks('res', 10) AS c;
    PERFORM stageflow.complete_task_and_check_stage(c.task_id, '{"done": true}') FROM stageflow.claim_tasks('res', 10) AS c;
    ASSERT (stageflow.job_status(v_job)) ->> 'status' = 'completed';
    ASSERT (stageflow.retry_job(v_job)) ->> 'retried_tasks' = '0';
END;
$$;

DO $$
DECLARE
    v_job text := stageflow.submit_job('resumable', '{"n": 3}');
    v_task text;
BEGIN
    -- A dead letter and the tasks cancelled with it come back; the job resumes at stage 1.
    SELECT task_id INTO v_task FROM stageflow.claim_tasks('res', 1);
    PERFORM stageflow.fail_task(v_task, '{"message": "flaky disk"}');
    ASSERT (stageflow.job_status(v_job)) ->> 'status' = 'failed';
    ASSERT (SELECT status FROM stageflow.tasks WHERE task_id = v_task) = 'dead';
    ASSERT (stageflow.retry_job(v_job)) ->> 'retried_tasks' = '3';
    ASSERT (SELECT attempt FROM stageflow.tasks WHERE task_id = v_task) = 0;
    ASSERT (SELECT jsonb_array_length(errors) FROM stageflow.tasks WHERE task_id = v_task) = 1, 'the history is kept';
    ASSERT (stageflow.job_status(v_job)) -> 'stages' -> 0 -> 'tasks' = '{"queued": 3, "running": 0, "completed": 0, "failed": 0, "cancelled": 0}',
        (stageflow.job_status(v_job)) -> 'stages' -> 0 ->> 'tasks';
    PERFORM stageflow.complete_task_and_check_stage(c.task_id, '{}') FROM stageflow.claim_tasks('res', 10) AS c;
    PERFORM stageflow.complete_task_and_check_stage(c.task_id, '{}') FROM stageflow.claim_tasks('res', 10) AS c;
    ASSERT (stageflow.job_status(v_job)) ->> 'status' = 'completed';
    ASSERT (SELECT array_agg(kind ORDER BY event_id) FROM stageflow.events WHERE job_id = v_job)
         = ARRAY['job_submitted', 'task_dead', 'job_failed', 'job_retried', 'stage_completed', 'stage_completed', 'job_completed'],
        (SELECT array_agg(kind ORDER BY event_id) FROM stageflow.events WHERE job_id = v_job)::text;
END;
$$;
