-- Maintenance's reconciler mends what no normal path leaves but an outside hand or a crash in
-- the wrong place could: an open task of a live job whose message is gone gets a new one; a
-- message that is not its task's current one (a duplicate), or whose task has ended, is deleted;
-- an open task of an ended job is cancelled with its message. A claim that reads a duplicate
-- deletes it without touching the task.
SELECT stageflow.register_job_type('mend', $$
{"stages": [{"name": "s", "handler": "m.s", "queue": "mend", "fan_out": "count", "param": "n"}]}
$$);

SET stageflow.fake_now = '2030-01-01 00:00:00+00';
CREATE TEMP TABLE job AS SELECT stageflow.submit_job('mend', '{"n": 3}') AS id;

DO $$
DECLARE
    v_job     text := (SELECT id FROM job);
    v_lost    text := left(v_job, 16) || '-s1-0';
    v_dup     text := left(v_job, 16) || '-s1-1';
    v_report  jsonb;
    v_claim   record;
    v_msg     bigint;
BEGIN
    -- A lost message and a duplicate one.
    PERFORM pgmq.delete('mend', (SELECT msg_id FROM stageflow.tasks WHERE task_id = v_lost));
    v_msg := pgmq.send('mend', jsonb_build_object('task_id', v_dup));
    -- A claim that reads the duplicate first deletes it and leaves the task alone.
    PERFORM pgmq.set_vt('mend', (SELECT array_agg(msg_id) FROM pgmq.q_mend WHERE msg_id <> v_msg), stageflow.now() + interval '1 hour');
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.claim_tasks('mend', 5, 60, 'w')), 'a duplicate is not a claim';
    ASSERT NOT EXISTS (SELECT 1 FROM pgmq.q_mend WHERE msg_id = v_msg), 'the duplicate is deleted';
    ASSERT (SELECT status = 'queued' AND attempt = 0 AND lease_token = 0 FROM stageflow.tasks WHERE task_id = v_dup);

    -- Another duplicate, invisible: the reconciler deletes it; the lost message is sent again.
    v_msg := pgmq.send('mend', jsonb_build_object('task_id', v_dup), stageflow.now() + interval '1 hour');
    v_report := stageflow.run_maintenance();
    ASSERT (v_report ->> 'messages_resent')::int = 1 AND (v_report ->> 'messages_deleted')::int = 1
       AND (v_report ->> 'errors')::int = 0, v_report::text;
    ASSERT EXISTS (SELECT 1 FROM pgmq.q_mend AS q JOIN stageflow.tasks AS t ON t.msg_id = q.msg_id WHERE t.task_id = v_lost);
    ASSERT (SELECT count(*) FROM pgmq.q_mend) = 3, 'one message per open task';

    -- The lost task is claimable again (its new message is visible now).
    PERFORM pgmq.set_vt('mend', (SELECT array_agg(msg_id) FROM pgmq.q_mend), stageflow.now());
    ASSERT (SELECT count(*) FROM stageflow.claim_tasks('mend', 5, 60, 'w')) = 3;

    -- An ended job with a task still open (as a cancel that skipped a row another session held
    -- leaves it): cancelled, its message deleted, its shard counter moved.
    UPDATE stageflow.jobs SET status = 'cancelled', completed_at = stageflow.now() WHERE job_id = v_job;
    v_report := stageflow.run_maintenance();
    ASSERT (v_report ->> 'tasks_cancelled')::int = 3, v_report::text;
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.tasks WHERE job_id = v_job AND status IN ('queued', 'running'));
    ASSERT NOT EXISTS (SELECT 1 FROM pgmq.q_mend);
    ASSERT (SELECT remaining_tasks FROM stageflow.stage_counts WHERE job_id = v_job) = 0;
END;
$$;
