-- A task whose lease expires is delivered again with attempt + 1; when its last attempt's lease
-- expires, the next claim fails it (and its job) instead of handing it out again.
SELECT stageflow.register_job_type('slow', $$
{"retry": {"max_attempts": 2}, "stages": [{"name": "s", "handler": "slow.s", "queue": "slow"}]}
$$);

CREATE TEMP TABLE job AS SELECT stageflow.submit_job('slow', '{}') AS id;
SELECT task_id FROM stageflow.claim_tasks('slow', 1, 1);
SELECT pg_sleep(1.2);
DO $$
DECLARE
    r record;
BEGIN
    SELECT * INTO r FROM stageflow.claim_tasks('slow', 1, 1);
    ASSERT r.attempt = 2, 'the expired task comes back as attempt 2';
END;
$$;
SELECT pg_sleep(1.2);
DO $$
DECLARE
    v_job text := (SELECT id FROM job);
BEGIN
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.claim_tasks('slow', 1, 1)), 'no third attempt';
    ASSERT (stageflow.job_status(v_job)) ->> 'status' = 'failed';
    ASSERT (stageflow.job_status(v_job)) -> 'error' -> 'error' ->> 'type' = 'lease_expired';
    ASSERT NOT EXISTS (SELECT 1 FROM pgmq.q_slow);
END;
$$;
