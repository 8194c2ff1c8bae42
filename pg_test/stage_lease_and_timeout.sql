-- A stage's own lease_seconds overrides the claim's; its timeout_seconds reaches the worker.
SELECT stageflow.register_job_type('timed', $$
{"lease_seconds": 600, "task_timeout_seconds": 30,
 "stages": [{"name": "quick", "handler": "t.quick", "queue": "timed", "lease_seconds": 2, "timeout_seconds": 7},
            {"name": "slow", "handler": "t.slow", "queue": "timed"}]}
$$);

DO $$
DECLARE
    v_job text := stageflow.submit_job('timed', '{}');
    r record;
    v_vt timestamptz;
BEGIN
    SELECT * INTO r FROM stageflow.claim_tasks('timed', 1, 300);
    ASSERT r.timeout_seconds = 7, 'the stage''s timeout: ' || r.timeout_seconds;
    -- (A claim reads the clock as it is at the claim, not at the transaction's start.)
    ASSERT r.lease_expires_at BETWEEN stageflow.now() + interval '2 seconds' AND clock_timestamp() + interval '2 seconds',
        'the stage''s lease, not the claim''s: ' || r.lease_expires_at;
    SELECT q.vt INTO v_vt FROM pgmq.q_timed AS q JOIN stageflow.tasks AS t ON t.msg_id = q.msg_id WHERE t.task_id = r.task_id;
    ASSERT v_vt < clock_timestamp() + interval '3 seconds', 'the message is visible again after the stage''s lease';
    PERFORM stageflow.complete_task_and_check_stage(r.task_id, '{}');

    -- Stage 2 inherits the job type's defaults.
    SELECT * INTO r FROM stageflow.claim_tasks('timed', 1, 300);
    ASSERT r.stage = 2 AND r.timeout_seconds = 30
       AND r.lease_expires_at BETWEEN stageflow.now() + interval '600 seconds' AND clock_timestamp() + interval '600 seconds', r::text;
END;
$$;
