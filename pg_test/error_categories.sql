-- The error category decides the retry: transient backs off, throttling waits at least
-- retry_after_seconds, permanent does not retry.
SELECT stageflow.register_job_type('api_calls', $$
{"retry": {"max_attempts": 5, "backoff_base_seconds": 1, "backoff_max_seconds": 4},
 "stages": [{"name": "call", "handler": "a.call", "queue": "api", "fan_out": "count", "param": "n"}],
 "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}}}
$$);

DO $$
DECLARE
    v_job text := stageflow.submit_job('api_calls', '{"n": 3}');
    v_tasks text[];
    v_report jsonb;
BEGIN
    SELECT array_agg(task_id ORDER BY task_key) INTO v_tasks FROM stageflow.claim_tasks('api', 3);

    v_report := stageflow.fail_task(v_tasks[1], '{"type": "HTTP429", "message": "slow down", "category": "throttling", "retry_after_seconds": 120}');
    ASSERT v_report ->> 'category' = 'throttling' AND (v_report ->> 'retry_in_seconds')::numeric = 120,
        'throttling waits retry_after_seconds, beyond the backoff cap: ' || v_report::text;
    ASSERT (SELECT next_attempt_at FROM stageflow.tasks WHERE task_id = v_tasks[1]) >= stageflow.now() + interval '119 seconds';

    v_report := stageflow.fail_task(v_tasks[2], '{"type": "HTTP503", "message": "unavailable", "category": "throttling"}');
    ASSERT (v_report ->> 'retry_in_seconds')::numeric BETWEEN 1 AND 2,
        'throttling without retry_after waits twice the jittered backoff: ' || v_report::text;

    v_report := stageflow.fail_task(v_tasks[3], '{"type": "ValueError", "message": "bad tile", "category": "permanent", "code": "E42", "details": {"tile": 3}}');
    ASSERT v_report ->> 'task_status' = 'failed', 'permanent: no retry even with attempts left: ' || v_report::text;
    ASSERT (SELECT error ->> 'code' FROM stageflow.tasks WHERE task_id = v_tasks[3]) = 'E42', 'the structured error is kept whole';
    ASSERT (SELECT error -> 'details' ->> 'tile' FROM stageflow.tasks WHERE task_id = v_tasks[3]) = '3';
    ASSERT (stageflow.job_status(v_job)) ->> 'status' = 'failed';

    -- The events of the story, in order.
    ASSERT (SELECT array_agg(kind ORDER BY event_id) FROM stageflow.events WHERE job_id = v_job)
         = ARRAY['job_submitted', 'task_retry_scheduled', 'task_retry_scheduled', 'task_failed', 'job_failed'],
        (SELECT array_agg(kind ORDER BY event_id) FROM stageflow.events WHERE job_id = v_job)::text;
END;
$$;
