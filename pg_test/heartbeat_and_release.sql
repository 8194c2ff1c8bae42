-- heartbeat keeps a task leased (its message invisible); release_tasks hands it back at once
-- without spending an attempt.
SELECT stageflow.register_job_type('longrun', $$
{"stages": [{"name": "s", "handler": "l.s", "queue": "longrun", "fan_out": "count", "param": "n"}]}
$$);

CREATE TEMP TABLE job AS SELECT stageflow.submit_job('longrun', '{"n": 2}') AS id;
CREATE TEMP TABLE held AS SELECT task_id FROM stageflow.claim_tasks('longrun', 2, 1, 'w1');
-- The heartbeat of another worker extends nothing.
DO $$ BEGIN
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.heartbeat(ARRAY(SELECT task_id FROM held), 60, 'w2'));
    ASSERT (SELECT count(*) FROM stageflow.heartbeat(ARRAY(SELECT task_id FROM held), 60, 'w1')) = 2;
END $$;
SELECT pg_sleep(1.2);
DO $$ BEGIN
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.claim_tasks('longrun', 2, 60, 'w2')),
        'a task under heartbeat is not delivered again after its first lease';
    ASSERT stageflow.release_tasks(ARRAY(SELECT task_id FROM held LIMIT 1), 'w2') = 0,
        'another worker cannot release it';
    ASSERT stageflow.release_tasks(ARRAY(SELECT task_id FROM held LIMIT 1), 'w1') = 1;
    ASSERT (SELECT e.payload ->> 'worker_id' = 'w1' AND (e.payload ->> 'lease_token')::int = 1 AND (e.payload ->> 'attempt')::int = 1
              FROM stageflow.events AS e WHERE e.kind = 'task_released' AND e.task_id = (SELECT task_id FROM held LIMIT 1)),
        'the release leaves a trace: a task_released event with the worker, its lease token and the attempt given back';
    ASSERT (SELECT count(*) FROM stageflow.events WHERE kind = 'task_released') = 1, 'the refused release left none';
    ASSERT (SELECT count(*) FROM stageflow.claim_tasks('longrun', 2, 60, 'w2') AS c WHERE c.attempt = 1) = 1,
        'the released task is claimable at once, still on attempt 1';
END $$;

-- list_jobs: newest first, filtered, with progress.
DO $$
DECLARE
    v_done text := stageflow.submit_job('hello_world', '{"message": "listed", "n": 1}');
    r record;
BEGIN
    PERFORM stageflow.complete_task_and_check_stage(c.task_id, '{}') FROM stageflow.claim_tasks('default', 5) AS c;
    PERFORM stageflow.complete_task_and_check_stage(c.task_id, '{}') FROM stageflow.claim_tasks('default', 5) AS c;
    ASSERT (SELECT count(*) FROM stageflow.list_jobs()) = 2;
    SELECT * INTO r FROM stageflow.list_jobs(filter_status => 'completed');
    ASSERT r.job_id = v_done AND r.progress = 100 AND r.current_stage_name = 'reply';
    SELECT * INTO r FROM stageflow.list_jobs(filter_type => 'longrun');
    ASSERT r.status = 'processing' AND r.progress = 0, r::text;
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.list_jobs(before => r.created_at - interval '1 hour'));
END $$;
