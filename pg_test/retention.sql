-- Retention deletes everything that grows with use, a bounded batch a round: finished jobs past
-- stageflow.retention with their stages, shards, claims, tasks, events and webhook deliveries
-- (at most stageflow.retention_batch_size rows of each table a round: a big job takes several
-- rounds, and is gone for the API from the first), the queues' archived messages (the messages
-- of failed and dead-lettered tasks, pgmq.a_<queue>), and webhook deliveries whose job is gone.
-- A submission of the same work while its old job's rows are still being deleted gets a clean job.
SELECT stageflow.register_job_type('kept', $$
{"retry": {"max_attempts": 1},
 "webhook_url": "https://example.org/hooks/kept",
 "stages": [{"name": "s", "handler": "k.s", "queue": "kept", "fan_out": "count", "param": "n", "max_failed_tasks": 100}]}
$$);

SET stageflow.retention = '1 day';
SET stageflow.retention_batch_size = 4;
SET stageflow.fake_now = '2030-01-01 00:00:00+00';
-- Job A: 10 tasks, 2 of which fail (their messages are archived); it ends completed_with_errors
-- and queues a webhook delivery.
CREATE TEMP TABLE a AS SELECT stageflow.submit_job('kept', '{"n": 10}') AS id;
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT * FROM stageflow.claim_tasks('kept', 10, 60) ORDER BY task_key LOOP
        IF r.task_key IN ('0', '1') THEN
            PERFORM stageflow.fail_task(r.task_id, '{"message": "no"}', false);
        ELSE
            PERFORM stageflow.complete_task_and_check_stage(r.task_id, '{"ok": true}');
        END IF;
    END LOOP;
    ASSERT (stageflow.job_status((SELECT id FROM a))) ->> 'status' = 'completed_with_errors';
    ASSERT (SELECT count(*) FROM pgmq.a_kept) = 2, 'the failed tasks'' messages are archived';
    ASSERT NOT EXISTS (SELECT 1 FROM pgmq.q_kept), 'completed tasks'' messages are deleted';
    ASSERT (SELECT count(*) FROM stageflow.webhook_deliveries WHERE job_id = (SELECT id FROM a)) = 1;
    ASSERT (SELECT count(*) FROM stageflow.stage_claims WHERE job_id = (SELECT id FROM a)) >= 1;
END;
$$;

-- A day and a minute later: nothing is younger than the retention any more... except pgmq's
-- archive, which pgmq dates with the real clock: from 2030 on, it is long past.
SET stageflow.fake_now = '2030-01-02 00:01:00+00';
DO $$
DECLARE
    v_job text := (SELECT id FROM a);
    v_report jsonb;
    v_events int := (SELECT count(*) FROM stageflow.events WHERE job_id = (SELECT id FROM a));
BEGIN
    ASSERT v_events > 4, 'more events than one batch: ' || v_events;
    v_report := stageflow.run_maintenance();
    ASSERT v_report @> '{"jobs_deleted": 1, "tasks_deleted": 4, "events_deleted": 4, "webhook_deliveries_deleted": 1, "archived_messages_deleted": 2, "errors": 0}',
        v_report::text;
    -- The job is gone for the API at once, with its stages, shards and claims...
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.jobs WHERE job_id = v_job);
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.stages WHERE job_id = v_job);
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.stage_shards WHERE job_id = v_job);
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.stage_claims WHERE job_id = v_job);
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.dead_letters() WHERE job_id = v_job), 'its failed tasks are no dead letters any more';
    BEGIN
        PERFORM stageflow.job_status(v_job);
        RAISE EXCEPTION 'job_status of a deleted job must fail';
    EXCEPTION WHEN undefined_object OR no_data_found THEN
        NULL;
    END;
    -- ... its tasks and events go a batch (4) a round.
    ASSERT (SELECT count(*) FROM stageflow.tasks WHERE job_id = v_job) = 6;
    ASSERT (SELECT count(*) FROM stageflow.deleted_jobs WHERE job_id = v_job) = 1;
    ASSERT NOT EXISTS (SELECT 1 FROM pgmq.a_kept), 'the archive is pruned';
    v_report := stageflow.run_maintenance();
    ASSERT v_report @> '{"jobs_deleted": 0, "tasks_deleted": 4}', v_report::text;
    v_report := stageflow.run_maintenance();
    ASSERT v_report @> '{"tasks_deleted": 2}', v_report::text;
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.tasks WHERE job_id = v_job);
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.events WHERE job_id = v_job);
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.webhook_deliveries WHERE job_id = v_job);
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.deleted_jobs), 'the note goes with the job''s last rows';
    v_report := stageflow.run_maintenance();
    ASSERT v_report @> '{"jobs_deleted": 0, "tasks_deleted": 0, "events_deleted": 0, "webhook_deliveries_deleted": 0, "archived_messages_deleted": 0, "errors": 0}',
        v_report::text;
END;
$$;

-- The same work submitted again while its old job's rows are still being deleted: the old rows go
-- first, the new job is whole, and retention leaves it alone.
SET stageflow.fake_now = '2030-02-01 00:00:00+00';
CREATE TEMP TABLE b AS SELECT stageflow.submit_job('kept', '{"n": 9}') AS id;
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT * FROM stageflow.claim_tasks('kept', 10, 60) LOOP
        PERFORM stageflow.complete_task_and_check_stage(r.task_id, '{"old": true}');
    END LOOP;
    ASSERT (stageflow.job_status((SELECT id FROM b))) ->> 'status' = 'completed';
END;
$$;
SET stageflow.fake_now = '2030-02-03 00:00:00+00';
DO $$
DECLARE
    v_report jsonb := stageflow.run_maintenance();
BEGIN
    ASSERT v_report @> '{"jobs_deleted": 1, "tasks_deleted": 4}', v_report::text;
    ASSERT (SELECT count(*) FROM stageflow.tasks WHERE job_id = (SELECT id FROM b)) = 5;
END;
$$;
DO $$
DECLARE
    v_job text := stageflow.submit_job('kept', '{"n": 9}');
    v_report jsonb;
    r record;
BEGIN
    ASSERT v_job = (SELECT id FROM b), 'the same work is the same job id';
    ASSERT (stageflow.job_status(v_job)) ->> 'status' = 'queued', 'a new job, not the deleted one';
    ASSERT (SELECT count(*) FROM stageflow.tasks WHERE job_id = v_job) = 9;
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.tasks WHERE job_id = v_job AND status <> 'queued'), 'none of the old job''s tasks';
    ASSERT (SELECT array_agg(kind ORDER BY event_id) FROM stageflow.events WHERE job_id = v_job) = ARRAY['job_submitted'],
        'none of the old job''s events';
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.deleted_jobs);
    v_report := stageflow.run_maintenance();
    ASSERT v_report @> '{"jobs_deleted": 0, "tasks_deleted": 0, "events_deleted": 0}', v_report::text;
    ASSERT (SELECT count(*) FROM stageflow.claim_tasks('kept', 20, 60)) = 9, 'the new job runs';
END;
$$;

-- A webhook delivery whose job is gone and was never noted (what 0.1.0's retention left behind)
-- is deleted when the walk over the deliveries reaches it, once older than the retention.
INSERT INTO stageflow.webhook_deliveries (event_id, job_id, url, payload, status, created_at, next_attempt_at)
VALUES (1, 'gone-long-ago', 'https://example.org/x', '{}', 'delivered', '2030-01-15 00:00:00+00', '2030-01-15 00:00:00+00'),
       (2, 'gone-lately', 'https://example.org/x', '{}', 'pending', '2030-02-02 12:00:00+00', '2030-02-02 12:00:00+00');
DO $$
DECLARE
    v_report jsonb;
    v_rounds int := 0;
BEGIN
    LOOP
        v_report := stageflow.run_maintenance();
        v_rounds := v_rounds + 1;
        EXIT WHEN NOT EXISTS (SELECT 1 FROM stageflow.webhook_deliveries WHERE job_id = 'gone-long-ago') OR v_rounds > 10;
    END LOOP;
    ASSERT v_rounds <= 2, 'reached within a pass of the walk: ' || v_rounds;
    ASSERT EXISTS (SELECT 1 FROM stageflow.webhook_deliveries WHERE job_id = 'gone-lately'), 'younger than the retention: kept';
END;
$$;

-- Expired notes of last attempts whose task is no longer running on that lease go in one
-- statement, up to stageflow.retention_batch_size a round, however small max_rows is (a job type
-- whose every claim is a last attempt leaves one a claim).
SELECT stageflow.register_job_type('once', $$
{"retry": {"max_attempts": 1},
 "stages": [{"name": "s", "handler": "o.s", "queue": "once", "fan_out": "count", "param": "n"}]}
$$);
SET stageflow.fake_now = '2030-03-01 00:00:00+00';
DO $$
DECLARE
    v_job text := stageflow.submit_job('once', '{"n": 3}');
    r record;
BEGIN
    FOR r IN SELECT * FROM stageflow.claim_tasks('once', 3, 60) LOOP
        PERFORM stageflow.complete_task_and_check_stage(r.task_id, '{}');
    END LOOP;
    ASSERT (SELECT count(*) FROM stageflow.last_attempt_leases AS l
             WHERE l.task_id IN (SELECT t.task_id FROM stageflow.tasks AS t WHERE t.job_id = v_job)) = 3,
        'every claim was a last attempt';
    PERFORM set_config('stageflow.fake_now', '2030-03-01 00:02:00+00', false);
    PERFORM stageflow.run_maintenance(1);
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.last_attempt_leases AS l
                        WHERE l.task_id IN (SELECT t.task_id FROM stageflow.tasks AS t WHERE t.job_id = v_job)),
        'all three stale notes are gone in one round';
END;
$$;

-- A job whose webhook delivery is still pending (a dispatcher that is down) is kept until that
-- delivery's next attempt is a retention overdue; the dead-letter metric and dead_letters() agree
-- about a job retention has deleted and is still draining; retention turned off still drains
-- the jobs it has deleted.
SET stageflow.fake_now = '2030-06-01 00:00:00+00';
CREATE TEMP TABLE c AS SELECT stageflow.submit_job('kept', '{"n": 12}') AS id;
DO $$
DECLARE
    v_job text := (SELECT id FROM c);
    v_report jsonb;
    r record;
BEGIN
    FOR r IN SELECT * FROM stageflow.claim_tasks('kept', 20, 60) LOOP
        PERFORM stageflow.fail_task(r.task_id, '{"message": "no"}', false);
    END LOOP;
    ASSERT (SELECT status FROM stageflow.webhook_deliveries WHERE job_id = v_job) = 'pending';
    -- The dispatcher would try again in an hour; it never comes.
    UPDATE stageflow.webhook_deliveries SET next_attempt_at = '2030-06-01 01:00:00+00' WHERE job_id = v_job;
    -- (the older jobs of this file go, and are drained, meanwhile)
    PERFORM set_config('stageflow.fake_now', '2030-06-02 00:30:00+00', false);
    FOR i IN 1..50 LOOP
        v_report := stageflow.run_maintenance();
        ASSERT (v_report ->> 'errors')::int = 0, v_report::text;
        EXIT WHEN NOT EXISTS (SELECT 1 FROM stageflow.deleted_jobs);
    END LOOP;
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.deleted_jobs);
    ASSERT EXISTS (SELECT 1 FROM stageflow.jobs WHERE job_id = v_job), 'kept: its delivery is pending';
    PERFORM set_config('stageflow.fake_now', '2030-06-02 01:01:00+00', false);
    v_report := stageflow.run_maintenance();
    ASSERT v_report @> '{"jobs_deleted": 1, "tasks_deleted": 4, "errors": 0}', v_report::text;
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.dead_letters() WHERE job_id = v_job);
    ASSERT (SELECT m.value FROM stageflow.metrics() AS m WHERE m.metric = 'stageflow_dead_letters')
           = (SELECT count(*) FROM stageflow.dead_letters()), 'the metric counts what dead_letters() lists';
    -- Retention off: nothing more is deleted, but the deleted job's rows still go.
    PERFORM set_config('stageflow.retention', '0', false);
    v_report := stageflow.run_maintenance();
    ASSERT v_report @> '{"jobs_deleted": 0, "tasks_deleted": 4}', v_report::text;
    FOR i IN 1..10 LOOP
        v_report := stageflow.run_maintenance();
        ASSERT v_report @> '{"jobs_deleted": 0, "errors": 0}', v_report::text;
        EXIT WHEN NOT EXISTS (SELECT 1 FROM stageflow.deleted_jobs);
    END LOOP;
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.tasks WHERE job_id = v_job);
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.events WHERE job_id = v_job);
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.deleted_jobs), 'drained with retention off';
    PERFORM set_config('stageflow.retention', '1 day', false);
END;
$$;

-- A worker that still holds a lease of a job retention deleted cannot report on the same work
-- submitted again: the new job's tasks have the old ones' ids, and their lease tokens start above
-- every token the deleted tasks handed out (stageflow.lease_token_floor), whether retention's
-- rounds deleted the old tasks or the submission finished their deletion. Before the floor, the
-- new tasks counted from 0 again, and the stale worker's report was taken for the new lease's.
SELECT stageflow.register_job_type('again', $$
{"retry": {"max_attempts": 5},
 "stages": [{"name": "s", "handler": "a.s", "queue": "again", "fan_out": "count", "param": "n"}]}
$$);
SET stageflow.fake_now = '2030-09-01 00:00:00+00';
CREATE TEMP TABLE stale (task_id text, lease_token bigint);
-- The job's 6 tasks are claimed, and their leases are still held when the job is cancelled:
-- those workers never hear of it.
DO $$
DECLARE
    v_job text := stageflow.submit_job('again', '{"n": 6}');
BEGIN
    INSERT INTO stale SELECT c.task_id, c.lease_token FROM stageflow.claim_tasks('again', 10, 60) AS c;
    ASSERT (SELECT count(*) FROM stale) = 6;
    PERFORM stageflow.cancel_job(v_job);
END;
$$;
DO $$
DECLARE
    v_job text := stageflow._job_id('again', '{"n": 6}');
    v_report jsonb;
    v_old_max bigint := (SELECT max(lease_token) FROM stale);
    v_refused int := 0;
    r record;
BEGIN
    -- Retention deletes the job and drains its tasks over two rounds (a batch is 4).
    PERFORM set_config('stageflow.fake_now', '2030-09-03 00:00:00+00', false);
    FOR i IN 1..10 LOOP
        v_report := stageflow.run_maintenance();
        ASSERT (v_report ->> 'errors')::int = 0, v_report::text;
        EXIT WHEN NOT EXISTS (SELECT 1 FROM stageflow.deleted_jobs);
    END LOOP;
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.tasks WHERE job_id = v_job), 'the old tasks are gone';
    ASSERT (SELECT max(token) FROM stageflow.lease_token_floor) > v_old_max, 'the floor is above the deleted leases';
    -- The same work again: the same job id, the same task ids, tokens above the old ones.
    ASSERT stageflow.submit_job('again', '{"n": 6}') = v_job;
    ASSERT (SELECT count(*) FROM stageflow.claim_tasks('again', 10, 60) AS c
              JOIN stale AS s ON s.task_id = c.task_id
             WHERE c.lease_token > v_old_max) = 6, 'every task claimed again, on a token above the deleted ones';
    -- The stale workers report (the first a failure, the rest completions, then all in one batch):
    -- every report is refused, and the new leases are untouched.
    FOR r IN SELECT * FROM stale ORDER BY task_id LOOP
        BEGIN
            IF v_refused = 0 THEN
                PERFORM stageflow.fail_task(r.task_id, '{"message": "stale"}', false, NULL, r.lease_token);
            ELSE
                PERFORM stageflow.complete_task_and_check_stage(r.task_id, '{"stale": true}', NULL, r.lease_token);
            END IF;
            RAISE EXCEPTION 'the stale report on % (lease %) was accepted', r.task_id, r.lease_token;
        EXCEPTION WHEN object_not_in_prerequisite_state THEN
            v_refused := v_refused + 1;
        END;
    END LOOP;
    ASSERT v_refused = 6;
    v_report := stageflow.complete_tasks((SELECT jsonb_agg(jsonb_build_object('task_id', s.task_id, 'result', '{}'::jsonb,
                                                                              'lease_token', s.lease_token))
                                            FROM stale AS s));
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.tasks WHERE job_id = v_job AND status <> 'running'),
        'the new leases are untouched: ' || v_report::text;
    ASSERT (stageflow.job_status(v_job)) ->> 'status' = 'processing';
END;
$$;
-- The same once more, with the deletion finished by the submission: retention deletes the job row
-- and 4 of its tasks in one round; the submission that comes next deletes the other 2. Their
-- leases must be above what the round noted, so they are made the highest (by hand, as if those
-- two had been claimed ten times more than the others).
DO $$
DECLARE
    v_job text := stageflow._job_id('again', '{"n": 6}');
    v_old_max bigint;
    r record;
BEGIN
    DELETE FROM stale;
    INSERT INTO stale SELECT c.task_id, c.lease_token FROM stageflow.claim_tasks('again', 10, 60) AS c;
    ASSERT (SELECT count(*) FROM stale) = 0, 'the leases of the new job are still held';
    PERFORM stageflow.cancel_job(v_job);
    PERFORM set_config('stageflow.fake_now', '2030-09-05 00:00:00+00', false);
    ASSERT stageflow.run_maintenance() @> '{"jobs_deleted": 1, "tasks_deleted": 4}';
    UPDATE stageflow.tasks SET lease_token = lease_token + 10 WHERE job_id = v_job;
    INSERT INTO stale SELECT t.task_id, t.lease_token FROM stageflow.tasks AS t WHERE t.job_id = v_job;
    ASSERT (SELECT count(*) FROM stale) = 2;
    v_old_max := (SELECT max(lease_token) FROM stale);
    ASSERT (SELECT max(token) FROM stageflow.lease_token_floor) <= v_old_max, 'these two leases are not below the floor';
    ASSERT stageflow.submit_job('again', '{"n": 6}') = v_job;
    ASSERT (SELECT max(token) FROM stageflow.lease_token_floor) > v_old_max, 'raised by the submission''s deletion';
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.tasks WHERE job_id = v_job AND lease_token <= v_old_max),
        'every new task starts above the deleted leases';
    CREATE TEMP TABLE life AS SELECT c.task_id, c.lease_token FROM stageflow.claim_tasks('again', 10, 60) AS c;
    ASSERT (SELECT count(*) FROM life AS c JOIN stale AS s ON s.task_id = c.task_id AND c.lease_token > v_old_max) = 2;
    BEGIN
        PERFORM stageflow.complete_task_and_check_stage(s.task_id, '{"stale": true}', NULL, s.lease_token)
           FROM stale AS s ORDER BY s.task_id LIMIT 1;
        RAISE EXCEPTION 'a stale report was accepted';
    EXCEPTION WHEN object_not_in_prerequisite_state THEN
        NULL;
    END;
    PERFORM stageflow.cancel_job(v_job);
    -- Each round keeps only the highest note.
    PERFORM set_config('stageflow.fake_now', '2030-09-07 00:00:00+00', false);
    PERFORM stageflow.run_maintenance();
    PERFORM stageflow.run_maintenance();
    ASSERT (SELECT count(*) FROM stageflow.lease_token_floor) = 1, (SELECT array_agg(token) FROM stageflow.lease_token_floor)::text;
    ASSERT (SELECT token FROM stageflow.lease_token_floor) = (SELECT max(lease_token) + 1 FROM life),
        'the note kept is the highest: one above the last life''s highest lease';
    -- (a finished job for the part below)
    PERFORM stageflow.submit_job('kept', '{"n": 1}');
    FOR r IN SELECT * FROM stageflow.claim_tasks('kept', 20, 60) LOOP
        PERFORM stageflow.complete_task_and_check_stage(r.task_id, '{"ok": true}');
    END LOOP;
END;
$$;

-- retention 0 keeps everything; the batch size is a setting with bounds.
SET stageflow.retention = 0;
SET stageflow.fake_now = '2031-01-01 00:00:00+00';
INSERT INTO stageflow.webhook_deliveries (event_id, job_id, url, payload, status, created_at, next_attempt_at)
VALUES (3, 'gone-but-kept', 'https://example.org/x', '{}', 'failed', '2030-01-01 00:00:00+00', '2030-01-01 00:00:00+00');
DO $$
DECLARE
    v_report jsonb;
BEGIN
    FOR i IN 1..3 LOOP
        v_report := stageflow.run_maintenance();
        ASSERT v_report @> '{"jobs_deleted": 0, "tasks_deleted": 0, "webhook_deliveries_deleted": 0, "archived_messages_deleted": 0}',
            v_report::text;
    END LOOP;
    ASSERT EXISTS (SELECT 1 FROM stageflow.webhook_deliveries WHERE job_id = 'gone-but-kept');
    ASSERT EXISTS (SELECT 1 FROM stageflow.jobs), 'finished jobs are kept';
    BEGIN
        PERFORM set_config('stageflow.retention_batch_size', '0', false);
        RAISE EXCEPTION 'a batch of 0 rows must be refused';
    EXCEPTION WHEN invalid_parameter_value THEN
        NULL;
    END;
END;
$$;
RESET stageflow.fake_now;
