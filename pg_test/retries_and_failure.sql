-- Retryable failures come back after an exponential backoff with jitter; when attempts run out
-- the task is dead-lettered; a non-retryable failure fails it at once. Either ends the job (no
-- failure is tolerated by default): its open tasks are cancelled and their messages removed.
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
    v_other text;
BEGIN
    SELECT task_id INTO v_task FROM stageflow.claim_tasks('flaky', 1, 60, 'w1');
    v_report := stageflow.fail_task(v_task, '{"type": "IOError", "message": "first"}');
    -- b = 10 * 2^0 = 10; the wait is between b/2 and b
    ASSERT v_report ->> 'task_status' = 'queued' AND (v_report ->> 'retry_in_seconds')::numeric BETWEEN 5 AND 10,
        'first retry after the jittered base backoff: ' || v_report::text;
    ASSERT v_report ->> 'category' = 'transient';
    SELECT q.vt INTO v_vt FROM pgmq.q_flaky AS q JOIN stageflow.tasks AS t ON t.msg_id = q.msg_id WHERE t.task_id = v_task;
    ASSERT v_vt > clock_timestamp() + interval '4 seconds', 'the message is invisible during the backoff';
    ASSERT (SELECT status FROM stageflow.tasks WHERE task_id = v_task) = 'queued';

    -- Before the backoff ends, the task is not claimable even if its message is made visible:
    -- the task row decides, and the message is pushed back to when the retry is due.
    PERFORM pgmq.set_vt('flaky', (SELECT msg_id FROM stageflow.tasks WHERE task_id = v_task), 0);
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.claim_tasks('flaky', 3, 60, 'w1') AS c WHERE c.task_id = v_task),
        'a retry that is not due is not claimed';
    SELECT q.vt INTO v_vt FROM pgmq.q_flaky AS q JOIN stageflow.tasks AS t ON t.msg_id = q.msg_id WHERE t.task_id = v_task;
    ASSERT v_vt = (SELECT next_attempt_at FROM stageflow.tasks WHERE task_id = v_task), 'its message waits for the retry';
    -- Move the engine's clock past the backoff (the same clock decides the message's visibility)
    -- and fail attempt 2.
    PERFORM set_config('stageflow.fake_now', (now() + interval '11 seconds')::text, true);
    ASSERT (SELECT count(*) FROM stageflow.claim_tasks('flaky', 3, 60, 'w1') AS c WHERE c.task_id = v_task AND c.attempt = 2) = 1,
        'attempt 2 is claimed';
    v_report := stageflow.fail_task(v_task, '"second"');
    -- b = min(15, 10 * 2) = 15
    ASSERT (v_report ->> 'retry_in_seconds')::numeric BETWEEN 7.5 AND 15, 'the backoff is capped: ' || v_report::text;

    PERFORM set_config('stageflow.fake_now', (now() + interval '30 seconds')::text, true);
    ASSERT (SELECT count(*) FROM stageflow.claim_tasks('flaky', 3, 60, 'w1') AS c WHERE c.task_id = v_task AND c.attempt = 3) = 1;
    v_report := stageflow.fail_task(v_task, '{"message": "third"}');
    ASSERT v_report ->> 'task_status' = 'dead' AND v_report ->> 'job_status' = 'failed', 'attempts ran out: ' || v_report::text;

    ASSERT (SELECT jsonb_agg(e -> 'error' ->> 'message') FROM stageflow.tasks t, jsonb_array_elements(t.errors) e WHERE t.task_id = v_task)
         = '["first", "second", "third"]', 'every attempt''s error is kept';
    ASSERT (SELECT error -> 'error' ->> 'message' FROM stageflow.jobs WHERE job_id = v_job) = 'third';
    ASSERT (SELECT count(*) FROM stageflow.dead_letters() WHERE task_id = v_task AND status = 'dead') = 1, 'listed as a dead letter';
    ASSERT EXISTS (SELECT 1 FROM pgmq.a_flaky AS a JOIN stageflow.tasks AS t ON t.msg_id = a.msg_id WHERE t.task_id = v_task),
        'its message is archived, not dropped';
    -- The two other tasks were running: the job's end cancelled them, and their completion is refused.
    ASSERT (SELECT count(*) FROM stageflow.tasks WHERE job_id = v_job AND status = 'cancelled') = 2;
    SELECT task_id INTO v_other FROM stageflow.tasks WHERE job_id = v_job AND status = 'cancelled' LIMIT 1;
    BEGIN
        PERFORM stageflow.complete_task_and_check_stage(v_other, '{}');
        RAISE EXCEPTION 'completing a cancelled task must be refused';
    EXCEPTION WHEN object_not_in_prerequisite_state THEN
        NULL;
    END;
    -- Failing it again reports it again.
    ASSERT (stageflow.fail_task(v_task, '{}')) ->> 'task_status' = 'dead';
    ASSERT (SELECT count(*) FROM stageflow.stages WHERE job_id = v_job) = 1, 'no stage 2 for a failed job';
    ASSERT NOT EXISTS (SELECT 1 FROM pgmq.q_flaky);
END;
$$;

DO $$
DECLARE
    v_job text := stageflow.submit_job('flaky', '{"n": 4}');
    v_task text;
BEGIN
    -- A non-retryable failure ends the task as failed at once and cancels the queued tasks.
    SELECT task_id INTO v_task FROM stageflow.claim_tasks('flaky', 1);
    ASSERT (stageflow.fail_task(v_task, '{"message": "corrupt"}', false)) ->> 'job_status' = 'failed';
    ASSERT (SELECT status FROM stageflow.tasks WHERE task_id = v_task) = 'failed';
    ASSERT (SELECT count(*) FROM stageflow.tasks WHERE job_id = v_job AND status = 'cancelled') = 3;
    ASSERT NOT EXISTS (SELECT 1 FROM pgmq.q_flaky), 'the cancelled tasks'' messages are gone';
    ASSERT (stageflow.job_status(v_job)) -> 'stages' -> 0 -> 'tasks' = '{"queued": 0, "running": 0, "completed": 0, "failed": 1, "cancelled": 3}',
        (stageflow.job_status(v_job)) -> 'stages' -> 0 ->> 'tasks';
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.claim_tasks('flaky', 10));
END;
$$;
