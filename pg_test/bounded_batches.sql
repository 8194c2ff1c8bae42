-- A round's batch stays within its bound whatever plan the statement gets. `x IN (SELECT ...
-- LIMIT n FOR UPDATE SKIP LOCKED)` is not bounded: as the inner side of a nested-loop semi join
-- the subquery runs again for each outer row, skips the rows the statement already deleted or
-- updated, and returns others (found by the isolation spec retention_does_not_wait_for_a_
-- resubmission, whose tables' statistics gave that plan: a round of batch 4 deleted 6 tasks).
-- The plan is forced here by the planner's settings.
SET enable_hashjoin = off;
SET enable_mergejoin = off;
SET enable_material = off;
SET enable_hashagg = off;
SET enable_sort = off;
SELECT stageflow.register_job_type('bounded', $$
{"stages": [{"name": "s", "handler": "b.s", "queue": "bounded", "fan_out": "count", "param": "n"}]}
$$);
DO $$
DECLARE
    v_job text;
BEGIN
    PERFORM set_config('stageflow.retention', '1 day', true);
    PERFORM set_config('stageflow.retention_batch_size', '4', true);
    PERFORM set_config('stageflow.fake_now', '2030-01-01 00:00:00+00', true);
    v_job := stageflow.submit_job('bounded', '{"n": 6}', 'https://example.org/hooks');
    PERFORM stageflow.cancel_job(v_job);
    PERFORM stageflow.submit_job('bounded', '{"n": 1}', 'https://example.org/hooks');
    PERFORM stageflow.submit_job('bounded', '{"n": 2}', 'https://example.org/hooks');
    PERFORM stageflow.cancel_job(stageflow.job_id('bounded', '{"n": 1}'));
    PERFORM stageflow.cancel_job(stageflow.job_id('bounded', '{"n": 2}'));
    ASSERT (SELECT count(*) FROM stageflow.claim_webhook_deliveries(2, 30)) = 2,
        'a dispatcher asking for 2 deliveries of 3 pending gets 2';
    ASSERT (SELECT count(*) FROM stageflow.webhook_deliveries(v_job) AS d WHERE d.attempts = 0)
           + (SELECT count(*) FROM stageflow.webhook_deliveries(stageflow.job_id('bounded', '{"n": 1}')) AS d WHERE d.attempts = 0)
           + (SELECT count(*) FROM stageflow.webhook_deliveries(stageflow.job_id('bounded', '{"n": 2}')) AS d WHERE d.attempts = 0) = 1,
        'the third is still unclaimed';
    PERFORM pgmq.archive('bounded', ARRAY(SELECT pgmq.send('bounded', '{}') FROM generate_series(1, 6)));
    PERFORM set_config('stageflow.fake_now', '2030-01-03 00:00:00+00', true);
    ASSERT stageflow.run_maintenance() @> '{"tasks_deleted": 4, "archived_messages_deleted": 4, "errors": 0}',
        'a retention round deletes at most stageflow.retention_batch_size tasks, and archived messages of a queue';
END $$;
