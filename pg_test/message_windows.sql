-- A stage of more tasks than stageflow.message_window has messages for one window of them at a
-- time (stageflow.message_windows): every task row holds its msg_id from the start, in task order;
-- the next window is sent by a claim that reads into the last one sent (one window ahead), or that
-- finds the queue short. Claims take every task once, in order, across windows and ahead of a job
-- submitted later on the same queue; the reconciler sends no message to a task whose window has
-- not come; a cancelled job's window goes (with cancel_job, or at the next claim if a claim held
-- it), and retry_job gives every task it opens a message.
SET stageflow.message_window = 4;
SELECT stageflow.register_job_type('windowed', $$
{
  "parameters": {"type": "object", "properties": {"n": {"type": "integer"}, "run": {"type": "integer"}}},
  "stages": [
    {"name": "first",  "handler": "h", "queue": "mw", "fan_out": "count", "param": "n"},
    {"name": "second", "handler": "h", "queue": "mw2", "fan_out": "lineage"}
  ]
}
$$);
SELECT stageflow.register_job_type('listed_windowed', $$
{
  "parameters": {"type": "object", "properties": {"items": {"type": "array"}}},
  "stages": [{"name": "only", "handler": "h", "queue": "mw3", "fan_out": "each", "param": "items"}]
}
$$);

-- Stage p_stage of p_job: how many of its tasks have a message of their own in pgmq.q_<p_queue>
-- (the msg_id their row holds, carrying their task_id); and the messages of other ids there.
CREATE FUNCTION pg_temp.sent(p_job text, p_stage int, p_queue text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_sent bigint;
BEGIN
    EXECUTE format('SELECT count(*) FROM stageflow.tasks AS t JOIN pgmq.%I AS m ON m.msg_id = t.msg_id '
                   'WHERE t.job_id = $1 AND t.stage = $2 AND m.message = jsonb_build_object(''task_id'', t.task_id)',
                   pgmq.format_table_name(p_queue, 'q'))
       INTO v_sent USING p_job, p_stage;
    RETURN v_sent;
END;
$$;
CREATE FUNCTION pg_temp.messages(p_queue text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_count bigint;
BEGIN
    EXECUTE format('SELECT count(*) FROM pgmq.%I', pgmq.format_table_name(p_queue, 'q')) INTO v_count;
    RETURN v_count;
END;
$$;

DO $$
DECLARE
    v_job      text := stageflow.submit_job('windowed', '{"n": 10}');
    v_later    text;
    v_w        stageflow.message_windows;
    v_order    text[] := '{}';
    v_claim    record;
    v_ids      text[];
    v_tokens   bigint[];
    v_report   jsonb;
BEGIN
    -- Made: ten task rows with ids taken in task order, four messages.
    ASSERT (SELECT count(*) FROM stageflow.tasks AS t WHERE t.job_id = v_job) = 10;
    ASSERT (SELECT bool_and(o.ordinal = o.by_msg - 1) FROM (SELECT t.ordinal, row_number() OVER (ORDER BY t.msg_id) AS by_msg
                                                               FROM stageflow.tasks AS t WHERE t.job_id = v_job) AS o),
        'msg_ids in task order';
    ASSERT pg_temp.sent(v_job, 1, 'mw') = 4 AND pg_temp.messages('mw') = 4, 'the first window only';
    SELECT * INTO STRICT v_w FROM stageflow.message_windows AS w WHERE w.job_id = v_job;
    ASSERT v_w.stage = 1 AND v_w.queue = 'mw' AND v_w.next_ordinal = 4 AND v_w.task_count = 10, format('window %s', to_jsonb(v_w));
    ASSERT v_w.refill_at = (SELECT t.msg_id FROM stageflow.tasks AS t WHERE t.job_id = v_job AND t.ordinal = 0)
       AND v_w.sent_up_to = (SELECT t.msg_id FROM stageflow.tasks AS t WHERE t.job_id = v_job AND t.ordinal = 3),
        format('the next window goes once a claim reads this one (ordinals 0 to 3): %s', to_jsonb(v_w));

    -- The reconciler sends nothing to a task whose window has not come (nor did it lose any).
    v_report := stageflow.run_maintenance();
    ASSERT v_report @> '{"messages_resent": 0, "messages_deleted": 0, "errors": 0}', format('maintenance: %s', v_report);
    ASSERT pg_temp.messages('mw') = 4, 'the reconciler sent messages ahead of the window';

    -- A job submitted later on the same queue, under the whole of the window (ids after all of the first's).
    v_later := stageflow.submit_job('windowed', '{"n": 2, "run": 1}');
    ASSERT pg_temp.messages('mw') = 6;

    -- One at a time: the first job's ten tasks in order, then the later job's two. (Sent only when
    -- the queue ran short, the later job's tasks would come after ordinal 3.)
    LOOP
        SELECT * INTO v_claim FROM stageflow.claim_tasks('mw', 1, 60, 'w');
        EXIT WHEN v_claim.task_id IS NULL;
        v_order := v_order || v_claim.task_id;
    END LOOP;
    ASSERT v_order = (SELECT array_agg(left(v_job, 16) || '-s1-' || i ORDER BY i) FROM generate_series(0, 9) AS i)
                     || (SELECT array_agg(left(v_later, 16) || '-s1-' || i ORDER BY i) FROM generate_series(0, 1) AS i),
        format('claim order %s', v_order);
    ASSERT pg_temp.sent(v_job, 1, 'mw') = 10, 'every task got its own message';
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.message_windows), 'the window row goes with the last window';

    -- Stage 1 completes: the lineage (10 tasks, its own queue) is windowed too, by the completion
    -- that makes it.
    SELECT array_agg(t.task_id), array_agg(t.lease_token) INTO v_ids, v_tokens
      FROM stageflow.tasks AS t WHERE t.job_id = v_job AND t.stage = 1;
    PERFORM stageflow.complete_tasks(
        (SELECT jsonb_agg(jsonb_build_object('task_id', u.id, 'lease_token', u.token, 'result', '{}'::jsonb))
           FROM unnest(v_ids, v_tokens) AS u(id, token)), 'w');
    ASSERT (SELECT count(*) FROM stageflow.tasks AS t WHERE t.job_id = v_job AND t.stage = 2) = 10;
    ASSERT pg_temp.sent(v_job, 2, 'mw2') = 4 AND pg_temp.messages('mw2') = 4;
    -- In batches of 3: a claim that finds the queue short sends the next window; one that read
    -- nothing reads again.
    v_ids := '{}';
    LOOP
        SELECT array_agg(c.task_id) INTO v_order FROM stageflow.claim_tasks('mw2', 3, 60, 'w') AS c;
        EXIT WHEN v_order IS NULL;
        v_ids := v_ids || v_order;
    END LOOP;
    ASSERT cardinality(v_ids) = 10 AND (SELECT count(DISTINCT u) FROM unnest(v_ids) AS u) = 10, format('stage 2 claims %s', v_ids);
    SELECT array_agg(t.task_id), array_agg(t.lease_token) INTO v_ids, v_tokens
      FROM stageflow.tasks AS t WHERE t.job_id = v_job AND t.stage = 2;
    PERFORM stageflow.complete_tasks(
        (SELECT jsonb_agg(jsonb_build_object('task_id', u.id, 'lease_token', u.token, 'result', '{}'::jsonb))
           FROM unnest(v_ids, v_tokens) AS u(id, token)), 'w');
    ASSERT (SELECT status FROM stageflow.jobs WHERE job_id = v_job) = 'completed';
    ASSERT pg_temp.messages('mw2') = 0 AND NOT EXISTS (SELECT 1 FROM stageflow.message_windows);
END;
$$;

-- A fan-out other than count: the same, its params kept.
DO $$
DECLARE
    v_job text := stageflow.submit_job('listed_windowed', '{"items": ["a", "b", "c", "d", "e", "f"]}');
BEGIN
    ASSERT pg_temp.sent(v_job, 1, 'mw3') = 4 AND pg_temp.messages('mw3') = 4;
    ASSERT (SELECT array_agg(t.params ->> 'item' ORDER BY t.msg_id) FROM stageflow.tasks AS t WHERE t.job_id = v_job)
         = ARRAY['a', 'b', 'c', 'd', 'e', 'f'];
    ASSERT (SELECT count(*) FROM stageflow.claim_tasks('mw3', 10, 60, 'w')) = 4;
    ASSERT (SELECT count(*) FROM stageflow.claim_tasks('mw3', 10, 60, 'w')) = 2, 'the short claim sent the rest and read them';
    ASSERT pg_temp.sent(v_job, 1, 'mw3') = 6 AND NOT EXISTS (SELECT 1 FROM stageflow.message_windows);
END;
$$;

-- Cancelled with tasks not sent yet, then retried: cancel_job drops the window (a claim drops one
-- left behind), nothing is claimed; retry_job gives every task it opens a message of its own.
DO $$
DECLARE
    v_job     text := stageflow.submit_job('windowed', '{"n": 10, "run": 2}');
    v_ids     text[];
    v_before  bigint;
BEGIN
    ASSERT (SELECT count(*) FROM stageflow.claim_tasks('mw', 2, 60, 'w')) = 2;
    ASSERT EXISTS (SELECT 1 FROM stageflow.message_windows AS w WHERE w.job_id = v_job);
    PERFORM stageflow.cancel_job(v_job);
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.message_windows AS w WHERE w.job_id = v_job), 'cancel_job drops the window';
    -- (a window a claim held while the job ended is left: the next claim on the queue drops it)
    INSERT INTO stageflow.message_windows
        (job_id, stage, queue, next_ordinal, task_count, window_size, refill_at, sent_up_to, last_msg_id, created_at)
    VALUES (v_job, 1, 'mw', 4, 10, 4, 0, 0, 0, stageflow.now());
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.claim_tasks('mw', 5, 60, 'w'));
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.message_windows AS w WHERE w.job_id = v_job), 'an ended job''s window goes';
    ASSERT pg_temp.sent(v_job, 1, 'mw') = 0, 'a cancelled job keeps no message';

    v_before := pg_temp.messages('mw');
    ASSERT stageflow.retry_job(v_job) ->> 'retried_tasks' = '10';
    ASSERT pg_temp.sent(v_job, 1, 'mw') = 10 AND pg_temp.messages('mw') = v_before + 10, 'retry_job sent each task one message';
    SELECT array_agg(c.task_id) INTO v_ids FROM stageflow.claim_tasks('mw', 20, 60, 'w') AS c;
    ASSERT cardinality(v_ids) = 10 AND (SELECT count(DISTINCT u) FROM unnest(v_ids) AS u) = 10;
    PERFORM stageflow.cancel_job(v_job);
END;
$$;

-- Retried while its window was still there (the row held by a claim, say): sending a window over
-- tasks that have messages sends nothing twice.
DO $$
DECLARE
    v_job     text := stageflow.submit_job('windowed', '{"n": 10, "run": 3}');
    v_before  bigint;
BEGIN
    PERFORM stageflow.cancel_job(v_job);
    PERFORM stageflow.retry_job(v_job);
    -- (last_msg_id above the ids retry_job gave: only the conflict on msg_id keeps them single)
    INSERT INTO stageflow.message_windows
        (job_id, stage, queue, next_ordinal, task_count, window_size, refill_at, sent_up_to, last_msg_id, created_at)
    VALUES (v_job, 1, 'mw', 0, 10, 1000, 0, 0, (SELECT max(t.msg_id) FROM stageflow.tasks AS t WHERE t.job_id = v_job),
            stageflow.now());
    v_before := pg_temp.messages('mw');
    ASSERT stageflow._send_next_window('mw', stageflow.now(), NULL, NULL, true) = 0, 'no task is without a message';
    ASSERT pg_temp.messages('mw') = v_before AND pg_temp.sent(v_job, 1, 'mw') = 10;
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.message_windows AS w WHERE w.job_id = v_job);
    PERFORM stageflow.cancel_job(v_job);
END;
$$;

-- One claim's read reaching into two stages' windows sends both stages' next windows (found by
-- review: only the first was sent, and the other's trigger was gone with the messages read, so
-- its job waited behind every later job on the queue). Later windows keep the size the stage was
-- made with, whatever the claiming session's setting.
SELECT stageflow.register_job_type('two_windowed', $$
{
  "parameters": {"type": "object", "properties": {"n": {"type": "integer"}, "run": {"type": "integer"}}},
  "stages": [{"name": "only", "handler": "h", "queue": "mw4", "fan_out": "count", "param": "n"}]
}
$$);
DO $$
DECLARE
    v_a text := stageflow.submit_job('two_windowed', '{"n": 12, "run": 1}');
    v_b text := stageflow.submit_job('two_windowed', '{"n": 12, "run": 2}');
BEGIN
    PERFORM set_config('stageflow.message_window', '1000', true);
    ASSERT (SELECT count(*) FROM stageflow.claim_tasks('mw4', 8, 60, 'w')) = 8;
    ASSERT (SELECT array_agg(w.next_ordinal ORDER BY w.job_id = v_b) FROM stageflow.message_windows AS w
             WHERE w.job_id IN (v_a, v_b)) = ARRAY[8, 8],
        format('both stages'' next windows of 4: %s', (SELECT jsonb_agg(to_jsonb(w)) FROM stageflow.message_windows AS w));
    ASSERT pg_temp.sent(v_a, 1, 'mw4') = 8 AND pg_temp.sent(v_b, 1, 'mw4') = 8;
    PERFORM stageflow.cancel_job(v_a);
    PERFORM stageflow.cancel_job(v_b);
END;
$$;

-- A window no claim sent (messages read outside claim_tasks here; in use: a claim whose read
-- reached it rolled back) is sent by the next maintenance round once that window is all read.
DO $$
DECLARE
    v_job    text := stageflow.submit_job('two_windowed', '{"n": 12, "run": 3}');
    v_report jsonb;
BEGIN
    PERFORM pgmq.read('mw4', 60, 4);
    ASSERT (SELECT w.next_ordinal FROM stageflow.message_windows AS w WHERE w.job_id = v_job) = 4;
    v_report := stageflow.run_maintenance();
    ASSERT v_report @> '{"windows_sent": 1, "errors": 0}', format('maintenance: %s', v_report);
    ASSERT (SELECT w.next_ordinal FROM stageflow.message_windows AS w WHERE w.job_id = v_job) = 8;
    ASSERT pg_temp.sent(v_job, 1, 'mw4') = 8;
    v_report := stageflow.run_maintenance();
    ASSERT v_report @> '{"windows_sent": 0, "errors": 0}', format('the window sent is not read yet: %s', v_report);
    PERFORM stageflow.cancel_job(v_job);
END;
$$;

-- A queue dropped (by a DBA, or lost in a restore) and made again: its new sequence starts above
-- the ids the big stage's tasks took, so the windows still to be sent and the messages of new
-- work never share an id (found by review: a later job's completion failed with 23505 on the
-- queue's key, and a submission too).
SELECT stageflow.register_job_type('dropped_windowed', $$
{
  "parameters": {"type": "object", "properties": {"n": {"type": "integer"}, "run": {"type": "integer"}}},
  "stages": [{"name": "only", "handler": "h", "queue": "mwd", "fan_out": "count", "param": "n"}]
}
$$);
DO $$
DECLARE
    v_big     text := stageflow.submit_job('dropped_windowed', '{"n": 12, "run": 1}');
    v_small   text;
    v_report  jsonb;
    v_ids     text[] := '{}';
    v_batch   text[];
    v_tokens  bigint[];
BEGIN
    PERFORM pgmq.drop_queue('mwd');
    v_report := stageflow.run_maintenance();
    ASSERT v_report @> '{"messages_resent": 4, "errors": 0}', format('maintenance: %s', v_report);
    ASSERT (SELECT last_value FROM pgmq.q_mwd_msg_id_seq) > (SELECT max(t.msg_id) FROM stageflow.tasks AS t WHERE t.job_id = v_big AND t.ordinal >= 4),
        'the queue made again numbers its messages above the ids the windows will send';
    v_small := stageflow.submit_job('dropped_windowed', '{"n": 2, "run": 2}');
    LOOP
        SELECT array_agg(c.task_id), array_agg(c.lease_token) INTO v_batch, v_tokens FROM stageflow.claim_tasks('mwd', 3, 60, 'w') AS c;
        EXIT WHEN v_batch IS NULL;
        v_ids := v_ids || v_batch;
        PERFORM stageflow.complete_tasks(
            (SELECT jsonb_agg(jsonb_build_object('task_id', u.id, 'lease_token', u.token, 'result', '{}'::jsonb))
               FROM unnest(v_batch, v_tokens) AS u(id, token)), 'w');
    END LOOP;
    ASSERT cardinality(v_ids) = 14 AND (SELECT count(DISTINCT u) FROM unnest(v_ids) AS u) = 14, format('claims %s', v_ids);
    ASSERT (SELECT array_agg(j.status ORDER BY j.job_id = v_small) FROM stageflow.jobs AS j WHERE j.job_id IN (v_big, v_small))
         = ARRAY['completed', 'completed'];
END;
$$;

-- A window two of whose tasks hold one id (no path makes that: here it is made by hand) is sent
-- all the same, one message for that id, instead of failing the claim that sends it (and every
-- claim on the queue after) with a duplicate key.
DO $$
DECLARE
    v_job text := stageflow.submit_job('two_windowed', '{"n": 12, "run": 4}');
BEGIN
    UPDATE stageflow.tasks AS t SET msg_id = (SELECT o.msg_id FROM stageflow.tasks AS o WHERE o.job_id = v_job AND o.ordinal = 4)
     WHERE t.job_id = v_job AND t.ordinal = 5;
    ASSERT (SELECT count(*) FROM stageflow.claim_tasks('mw4', 4, 60, 'w')) = 4;
    ASSERT pg_temp.sent(v_job, 1, 'mw4') = 7, format('%s of the 8 tasks have their message', pg_temp.sent(v_job, 1, 'mw4'));
    ASSERT (SELECT w.next_ordinal FROM stageflow.message_windows AS w WHERE w.job_id = v_job) = 8;
    PERFORM stageflow.cancel_job(v_job);
END;
$$;

-- Maintenance's backstop counts only the windows that are due against max_rows (found by review:
-- older windows of a queue nobody claims from, taken first, kept a busy queue's due window from
-- being sent).
SELECT stageflow.register_job_type('idle_windowed', $$
{
  "parameters": {"type": "object", "properties": {"n": {"type": "integer"}, "run": {"type": "integer"}}},
  "stages": [{"name": "only", "handler": "h", "queue": "mwi", "fan_out": "count", "param": "n"}]
}
$$);
-- (made first, each in a transaction of its own: older than the busy queue's window)
SELECT stageflow.submit_job('idle_windowed', '{"n": 9, "run": 1}') IS NOT NULL AS idle;
SELECT stageflow.submit_job('idle_windowed', '{"n": 9, "run": 2}') IS NOT NULL AS idle;
SELECT stageflow.submit_job('idle_windowed', '{"n": 9, "run": 3}') IS NOT NULL AS idle;
DO $$
DECLARE
    v_idle   text[] := ARRAY(SELECT j.job_id FROM stageflow.jobs AS j WHERE j.job_type = 'idle_windowed');
    v_busy   text := stageflow.submit_job('two_windowed', '{"n": 12, "run": 5}');
    v_report jsonb;
BEGIN
    PERFORM pgmq.read('mw4', 60, 4);
    v_report := stageflow.run_maintenance(2);
    ASSERT v_report @> '{"windows_sent": 1, "errors": 0}', format('maintenance: %s', v_report);
    ASSERT (SELECT w.next_ordinal FROM stageflow.message_windows AS w WHERE w.job_id = v_busy) = 8;
    ASSERT cardinality(v_idle) = 3
       AND (SELECT array_agg(w.next_ordinal) FROM stageflow.message_windows AS w WHERE w.job_id = ANY (v_idle)) = ARRAY[4, 4, 4];
    PERFORM stageflow.cancel_job(v_busy);
    PERFORM stageflow.cancel_job(j) FROM unnest(v_idle) AS j;
END;
$$;
