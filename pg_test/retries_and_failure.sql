-- Retryable failures come back after an exponential backoff; the last attempt's failure, or a
-- non-retryable one, fails the task and the job, cancels its queued tasks and removes their messages.
SELECT stageflow.register_job_type('flaky', $$
{
  "retry": {"max_attempts": 3, "backoff_base_seconds": 10, "backoff_max_seconds": 15},
  "stages": [{"name": "try", "handler": "f.try", "queue": "flaky", "fan_out": "count", "param": "n"},
             {"name": "after", "handler": "f.after", "queue": "flaky", "fan_out": "lineage"}]
}
$$);

DO $$
DECLARE
    v_job text := stageflow.submit_job('flaky', '{"n": 3}');
    v_task text;
    v_report jsonb;
    v_vt timestamptz;
BEGIN
    SELECT task_id INTO v_task FROM stageflow.claim_tasks('flaky', 1, 60, 'w1');
    v_report := stageflow.fail_task(v_task, '{"type": "IOError", "message": "first"}');
    ASSERT v_report ->> 'task_status' = 'queued' AND (v_report ->> 'retry_in_seconds')::numeric = 10,
        'first retry after the base backoff: ' || v_report::text;
    SELECT q.vt INTO v_vt FROM pgmq.q_flaky AS q JOIN stageflow.tasks AS t ON t.msg_id = q.msg_id WHERE t.task_id = v_task;
    ASSERT v_vt > clock_timestamp() + interval '9 seconds', 'the message is invisible during the backoff';
    ASSERT (SELECT status FROM stageflow.tasks WHERE task_id = v_task) = 'queued';

    -- Make the message visible now (what the backoff's end does) and fail attempt 2.
    PERFORM pgmq.set_vt('flaky', (SELECT msg_id FROM stageflow.tasks WHERE task_id = v_task), 0);
    ASSERT (SELECT count(*) FROM stageflow.claim_tasks('flaky', 3) AS c WHERE c.task_id = v_task AND c.attempt = 2) = 1,
        'attempt 2 is claimed';
    v_report := stageflow.fail_task(v_task, '"second"');
    ASSERT (v_report ->> 'retry_in_seconds')::numeric = 15, 'the backoff is capped: ' || v_report::text;

    PERFORM pgmq.set_vt('flaky', (SELECT msg_id FROM stageflow.tasks WHERE task_id = v_task), 0);
    ASSERT (SELECT count(*) FROM stageflow.claim_tasks('flaky', 3) AS c WHERE c.task_id = v_task AND c.attempt = 3) = 1;
    v_report := stageflow.fail_task(v_task, '{"message": "third"}');
    ASSERT v_report ->> 'task_status' = 'failed' AND v_report ->> 'job_status' = 'failed', 'attempts ran out: ' || v_report::text;

    ASSERT (SELECT jsonb_agg(e -> 'error' ->> 'message') FROM stageflow.tasks t, jsonb_array_elements(t.errors) e WHERE t.task_id = v_task)
         = '["first", "second", "third"]', 'every attempt''s error is kept';
    ASSERT (SELECT error -> 'error' ->> 'message' FROM stageflow.jobs WHERE job_id = v_job) = 'third';
    -- The two other tasks were claimed above (still running): they stay running, nothing is queued.
    ASSERT (SELECT count(*) FROM stageflow.tasks WHERE job_id = v_job AND status = 'queued') = 0;
    -- Failing it again reports it again.
    ASSERT (stageflow.fail_task(v_task, '{}')) ->> 'task_status' = 'failed';
    -- A running task of the failed job may still complete, but the job does not advance.
    PERFORM stageflow.complete_task_and_check_stage(task_id, '{}') FROM stageflow.tasks WHERE job_id = v_job AND status = 'running';
    ASSERT (SELECT count(*) FROM stageflow.stages WHERE job_id = v_job) = 1, 'no stage 2 for a failed job';
    ASSERT NOT EXISTS (SELECT 1 FROM pgmq.q_flaky);
END;
$$;

DO $$
DECLARE
    v_job text := stageflow.submit_job('flaky', '{"n": 4}');
    v_task text;
BEGIN
    -- A non-retryable failure ends the job at once and cancels the queued tasks.
    SELECT task_id INTO v_task FROM stageflow.claim_tasks('flaky', 1);
    ASSERT (stageflow.fail_task(v_task, '{"message": "corrupt"}', false)) ->> 'job_status' = 'failed';
    ASSERT (SELECT count(*) FROM stageflow.tasks WHERE job_id = v_job AND status = 'cancelled') = 3;
    ASSERT NOT EXISTS (SELECT 1 FROM pgmq.q_flaky), 'the cancelled tasks'' messages are gone';
    ASSERT (stageflow.job_status(v_job)) -> 'stages' -> 0 -> 'tasks' = '{"queued": 0, "running": 0, "completed": 0, "failed": 1, "cancelled": 3}',
        (stageflow.job_status(v_job)) -> 'stages' -> 0 ->> 'tasks';
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.claim_tasks('flaky', 10));
END;
$$;
