-- Every report is fenced by the lease it came from: claim_tasks returns a lease token per task
-- (one more on every claim), and complete, fail, heartbeat and release refuse or skip a report
-- whose token is not the task's current one, decided under the task's row lock. All under the
-- engine's clock (stageflow.fake_now), which also decides when a message is visible: no sleeping.
SELECT stageflow.register_job_type('fenced', $$
{"retry": {"max_attempts": 3},
 "stages": [{"name": "s", "handler": "f.s", "queue": "fenced", "fan_out": "count", "param": "n"},
            {"name": "own", "handler": "f.own", "queue": "fenced", "fan_out": "lineage", "lease_seconds": 30}]}
$$);

SET stageflow.fake_now = '2030-01-01 00:00:00+00';
CREATE TEMP TABLE job AS SELECT stageflow.submit_job('fenced', '{"n": 2}') AS id;
CREATE TEMP TABLE first_claim AS SELECT task_id, lease_token, attempt, effective_lease_seconds FROM stageflow.claim_tasks('fenced', 1, 60, 'A');

DO $$
DECLARE
    v_a      record := (SELECT f FROM first_claim AS f);
    v_b      record;
    v_report jsonb;
BEGIN
    ASSERT v_a.lease_token = 1 AND v_a.attempt = 1 AND v_a.effective_lease_seconds = 60, v_a::text;
    -- Nothing else of that task is claimable while the lease lives, even with its message visible.
    PERFORM pgmq.set_vt('fenced', (SELECT msg_id FROM stageflow.tasks WHERE task_id = v_a.task_id), 0);
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.claim_tasks('fenced', 5, 60, 'X') AS c WHERE c.task_id = v_a.task_id),
        'a live lease is not taken';
    ASSERT (SELECT q.vt FROM pgmq.q_fenced AS q JOIN stageflow.tasks AS t ON t.msg_id = q.msg_id WHERE t.task_id = v_a.task_id)
         = '2030-01-01 00:01:00+00', 'its visible message is pushed back to the lease''s expiry';

    -- At 00:01:01 A's lease has expired: B claims it again with token 2.
    PERFORM set_config('stageflow.fake_now', '2030-01-01 00:01:01+00', true);
    SELECT * INTO v_b FROM stageflow.claim_tasks('fenced', 5, 60, 'B') AS c WHERE c.task_id = v_a.task_id;
    ASSERT v_b.lease_token = 2 AND v_b.attempt = 2, v_b::text;

    -- A's reports are refused (55000, with a hint), whatever form they take; nothing changes.
    BEGIN
        PERFORM stageflow.complete_task_and_check_stage(v_a.task_id, '{"by": "A"}', 'A', v_a.lease_token);
        RAISE EXCEPTION 'a stale completion must be refused';
    EXCEPTION WHEN object_not_in_prerequisite_state THEN
        NULL;
    END;
    BEGIN
        PERFORM stageflow.complete_task_and_check_stage(v_a.task_id, '{"by": "A"}', NULL, v_a.lease_token);
        RAISE EXCEPTION 'a stale completion (token only) must be refused';
    EXCEPTION WHEN object_not_in_prerequisite_state THEN
        NULL;
    END;
    BEGIN
        PERFORM stageflow.fail_task(v_a.task_id, '{"message": "x"}', true, 'A', v_a.lease_token);
        RAISE EXCEPTION 'a stale failure must be refused';
    EXCEPTION WHEN object_not_in_prerequisite_state THEN
        NULL;
    END;
    v_report := stageflow.complete_tasks(jsonb_build_array(jsonb_build_object(
                    'task_id', v_a.task_id, 'result', '{"by": "A"}', 'lease_token', v_a.lease_token)), 'A');
    ASSERT v_report -> 0 -> 'error' ->> 'sqlstate' = '55000'
       AND v_report -> 0 -> 'error' ->> 'message' = format('task %s: lease 1 is not its current lease (2)', v_a.task_id)
       AND v_report -> 0 -> 'error' ->> 'hint' IS NOT NULL, v_report::text;
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.heartbeat(ARRAY[v_a.task_id], 600, 'A', ARRAY[v_a.lease_token])),
        'a stale heartbeat extends nothing';
    ASSERT stageflow.release_tasks(ARRAY[v_a.task_id], 'A', ARRAY[v_a.lease_token]) = 0, 'a stale release releases nothing';
    ASSERT (SELECT t.status = 'running' AND t.worker_id = 'B' AND t.lease_token = 2
                   AND t.lease_expires_at = '2030-01-01 00:02:01+00' AND t.attempt = 2
              FROM stageflow.tasks AS t WHERE t.task_id = v_a.task_id), 'B''s lease is untouched';
    ASSERT (SELECT q.vt FROM pgmq.q_fenced AS q JOIN stageflow.tasks AS t ON t.msg_id = q.msg_id WHERE t.task_id = v_a.task_id)
         >= '2030-01-01 00:02:01+00', 'and so is its message';

    -- B's heartbeat extends it; B's completion is recorded; repeating it returns the same report.
    ASSERT (SELECT h.lease_expires_at FROM stageflow.heartbeat(ARRAY[v_b.task_id], 120, 'B', ARRAY[v_b.lease_token]) AS h)
         = '2030-01-01 00:03:01+00';
    v_report := stageflow.complete_task_and_check_stage(v_b.task_id, '{"by": "B"}', 'B', v_b.lease_token);
    ASSERT v_report ->> 'task_status' = 'completed', v_report::text;
    ASSERT stageflow.complete_task_and_check_stage(v_b.task_id, '{"by": "B again"}', 'B', v_b.lease_token) = v_report,
        'a repeated completion by the same lease returns the same report';
    ASSERT (SELECT result ->> 'by' FROM stageflow.tasks WHERE task_id = v_b.task_id) = 'B';
    -- ... while the stale lease's repeat is still refused.
    BEGIN
        PERFORM stageflow.complete_task_and_check_stage(v_a.task_id, '{"by": "A"}', 'A', v_a.lease_token);
        RAISE EXCEPTION 'a stale completion of a completed task must be refused';
    EXCEPTION WHEN object_not_in_prerequisite_state THEN
        NULL;
    END;
END;
$$;

-- A released task is not counted as an attempt, keeps its token until claimed again, and its
-- next claim gets a new token; the stage's own lease (30 s) wins over the claim's and the
-- heartbeat's.
DO $$
DECLARE
    v_other  record;
    v_again  record;
    v_own    record;
BEGIN
    PERFORM set_config('stageflow.fake_now', '2030-01-01 00:05:00+00', true);
    SELECT * INTO v_other FROM stageflow.claim_tasks('fenced', 5, 60, 'C');
    ASSERT v_other.task_id IS NOT NULL AND v_other.lease_token = 3 AND v_other.attempt = 3,
        'the second task: claimed by X at 00:00 (token 1) and by B at 00:01:01 (token 2), both expired: ' || v_other::text;
    ASSERT stageflow.release_tasks(ARRAY[v_other.task_id], 'C', ARRAY[v_other.lease_token]) = 1;
    SELECT * INTO v_again FROM stageflow.claim_tasks('fenced', 5, 60, 'D');
    ASSERT v_again.task_id = v_other.task_id AND v_again.lease_token = 4 AND v_again.attempt = 3,
        'the release gave the attempt back, not the token: ' || v_again::text;
    PERFORM stageflow.complete_task_and_check_stage(v_again.task_id, '{}', 'D', v_again.lease_token);

    SELECT * INTO v_own FROM stageflow.claim_tasks('fenced', 1, 600, 'E');
    ASSERT v_own.stage_name = 'own' AND v_own.effective_lease_seconds = 30
       AND v_own.lease_expires_at = '2030-01-01 00:05:30+00', v_own::text;
    ASSERT (SELECT h.lease_expires_at FROM stageflow.heartbeat(ARRAY[v_own.task_id], 600, 'E', ARRAY[v_own.lease_token]) AS h)
         = '2030-01-01 00:05:30+00', 'a heartbeat extends by the stage''s own lease';
END;
$$;

-- Bad calls: tokens and ids must pair up.
DO $$
BEGIN
    PERFORM stageflow.heartbeat(ARRAY['a', 'b'], 60, 'E', ARRAY[1::bigint]);
    RAISE EXCEPTION 'mismatched tokens must be refused';
EXCEPTION WHEN invalid_parameter_value THEN
    NULL;
END;
$$;

-- A failure made again by the same lease after its answer was lost reports the task as it is; a
-- failure from a lease that ended in the queue (released), or a repeat after another lease came,
-- or from a worker that never held the task, is refused, not answered as recorded.
SELECT stageflow.register_job_type('fenced_fail', $$
{"retry": {"max_attempts": 3}, "stages": [{"name": "s", "handler": "f.s", "queue": "fenced_fail", "fan_out": "count", "param": "n"}]}
$$);
DO $$
DECLARE
    v_job    text := stageflow.submit_job('fenced_fail', '{"n": 2}');
    v_a      record;
    v_b      record;
    v_c      record;
    v_d      record;
    v_first  jsonb;
BEGIN
    SELECT * INTO v_a FROM stageflow.claim_tasks('fenced_fail', 1, 60, 'A');
    v_first := stageflow.fail_task(v_a.task_id, '{"message": "flaky"}', true, 'A', v_a.lease_token);
    ASSERT v_first ->> 'task_status' = 'queued', v_first::text;
    ASSERT (stageflow.fail_task(v_a.task_id, '{"message": "flaky"}', true, 'A', v_a.lease_token)) ->> 'task_status' = 'queued',
        'the same report again is answered, not refused';
    ASSERT jsonb_array_length((SELECT errors FROM stageflow.tasks WHERE task_id = v_a.task_id)) = 1, 'and recorded once';
    BEGIN
        PERFORM stageflow.fail_task(v_a.task_id, '{"message": "something else"}', true, 'A', v_a.lease_token);
        RAISE EXCEPTION 'a different failure of a task that is not running must be refused';
    EXCEPTION WHEN object_not_in_prerequisite_state THEN
        NULL;
    END;

    SELECT * INTO v_b FROM stageflow.claim_tasks('fenced_fail', 1, 60, 'B') AS c WHERE c.task_id <> v_a.task_id;
    ASSERT stageflow.release_tasks(ARRAY[v_b.task_id], 'B', ARRAY[v_b.lease_token]) = 1;
    BEGIN
        PERFORM stageflow.fail_task(v_b.task_id, '{"message": "late"}', false, 'B', v_b.lease_token);
        RAISE EXCEPTION 'a failure under a released lease must be refused';
    EXCEPTION WHEN object_not_in_prerequisite_state THEN
        NULL;
    END;
    ASSERT (SELECT status = 'queued' AND errors = '[]' FROM stageflow.tasks WHERE task_id = v_b.task_id);

    -- A's task, queued for its retry, is claimed by C and released: A's repeat is no repeat any
    -- more (another lease came since), and is refused (before: accepted, as A's tokens and error
    -- were still the last the task recorded).
    PERFORM set_config('stageflow.fake_now', '2030-01-01 01:00:00+00', true);
    CREATE TEMP TABLE c_claims AS SELECT c.task_id, c.lease_token FROM stageflow.claim_tasks('fenced_fail', 2, 60, 'C') AS c;
    SELECT * INTO v_c FROM c_claims AS c WHERE c.task_id = v_a.task_id;
    ASSERT v_c.lease_token = v_a.lease_token + 1;
    ASSERT stageflow.release_tasks((SELECT array_agg(task_id) FROM c_claims), 'C',
                                   (SELECT array_agg(lease_token) FROM c_claims)) = 2;
    BEGIN
        PERFORM stageflow.fail_task(v_a.task_id, '{"message": "flaky"}', true, 'A', v_a.lease_token);
        RAISE EXCEPTION 'a repeated failure from a lease that another claim followed must be refused';
    EXCEPTION WHEN object_not_in_prerequisite_state THEN
        NULL;
    END;

    -- A task that failed reports itself again, without a token, to the worker that held it and to
    -- the psql form; another worker naming itself is refused (before: answered as if its own
    -- failure had been recorded).
    SELECT * INTO v_d FROM stageflow.claim_tasks('fenced_fail', 2, 60, 'D') AS c WHERE c.task_id = v_b.task_id;
    ASSERT (stageflow.fail_task(v_b.task_id, '{"message": "bad input"}', false, 'D', v_d.lease_token)) ->> 'task_status' = 'failed';
    ASSERT (stageflow.fail_task(v_b.task_id, '{"message": "bad input"}', false, 'D')) ->> 'task_status' = 'failed';
    ASSERT (stageflow.fail_task(v_b.task_id, '{"message": "anything"}', false)) ->> 'task_status' = 'failed';
    BEGIN
        PERFORM stageflow.fail_task(v_b.task_id, '{"message": "never here"}', false, 'E');
        RAISE EXCEPTION 'a failure from a worker that never held the task must be refused';
    EXCEPTION WHEN object_not_in_prerequisite_state THEN
        NULL;
    END;
    ASSERT (SELECT jsonb_array_length(errors) = 1 AND worker_id = 'D' FROM stageflow.tasks WHERE task_id = v_b.task_id);
END;
$$;
