-- Creates stage p_stage of a job: its stages row, all its task rows in one INSERT, and one message
-- per task in one pgmq.send_batch (for a stage of more than stageflow.message_window tasks, the
-- messages of its first window, the rest later: stageflow.message_windows). Returns the number
-- of tasks (0 for an empty fan-out, in which case the stage is created already completed). Called only by submit_job and advance_stage, which hold
-- the job's row lock (advance) or have just inserted the job (submit). The job's quotas are
-- checked before anything is inserted (_check_quota).
-- What can fail for the job's own reasons (its params, its planner's results, its quota) is
-- found first, reading only, in a block of its own: a subtransaction that writes nothing gets no
-- transaction id. With p_catch (advance_stage) that failure is returned in `failure`
-- ({"message", "sqlstate", "hint"}) with nothing created, for the caller to fail the job; without
-- it (a submission) it is raised. So a batch of completions that advances many jobs uses no
-- subtransaction id per job: past 64 in one transaction, every other session's snapshot would
-- have to look its transactions up in pg_subtrans.
--
-- Fan-out rules (the stage definition's fan_out):
--   single   one task, key '0'
--   count    N tasks, keys '0'..'N-1', N = params->>param; task params {"index"} (_task_params)
--   each     one task per element of the array params->param; task params {"index", "item"}
--   dynamic  one task per entry of the previous stage's results' "tasks" lists, in task order;
--            entry {"key"?: text, "params"?: object}; key defaults to the entry's position
--   lineage  one task per completed task of the previous stage, same key and params; the
--            predecessor's result reaches the worker as `predecessor`
--   fan_in   one task, key '0', whose `inputs` are the previous stage's results in task order
-- A task's own params as claims, job_tasks and a lineage read them: a `count` task's are
-- {"index": ordinal}, made here rather than stored (31 of the 215 bytes of its row: a million
-- tasks write 22 MB less WAL when they are made, and each claim's full-page image of a task page
-- carries 26 bytes less per task); its row holds '{}' (tasks made before 0.3.0 hold the same
-- object, which this returns unchanged). Inlinable, as the status classes: no SET clause,
-- everything qualified, and STABLE as jsonb_build_object is (PostgreSQL inlines no IMMUTABLE
-- function whose body is not: called instead, it cost a 1,000,000-task lineage 1.4 s more).
CREATE FUNCTION stageflow._task_params(p_fan_out text, p_ordinal int, p_params jsonb)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN p_fan_out OPERATOR(pg_catalog.=) 'count'
                THEN pg_catalog.jsonb_build_object('index', p_ordinal) OPERATOR(pg_catalog.||) p_params
                ELSE p_params END
$$;

-- How many of a stage's tasks get their messages at once (stageflow.message_window): a stage of
-- more sends the rest in windows (stageflow.message_windows).
CREATE FUNCTION stageflow._message_window()
RETURNS int
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT greatest(coalesce(nullif(current_setting('stageflow.message_window', true), '')::int, 10000), 1)
$$;

-- Sends the messages of a stage's queued tasks of ordinals p_from .. p_upto - 1, visible from
-- p_vt, each with the msg_id its task row holds, if that is one the stage's tasks took from the
-- queue's sequence when it was made (at most p_last_msg_id: a task retry_job opened again has a
-- message of its own, under a newer id), and a task no longer queued gets none. Returns how many
-- it sent. The ids were taken for these tasks and a window is sent once (under its row's lock),
-- so no other session inserts them: a plain INSERT of the ones not in the queue already, one per
-- id. (With ON CONFLICT DO NOTHING each message cost a WAL record more, 48 bytes, the speculative
-- insertion's confirmation; and no exception block here: a subtransaction that writes takes an
-- id, one per big stage a batch of completions makes, found by review: 71 in a batch advancing 70
-- jobs.)
CREATE FUNCTION stageflow._send_stage_messages(p_job_id text, p_stage int, p_queue text, p_from int, p_upto int,
                                               p_last_msg_id bigint, p_vt timestamptz)
RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_sent int;
BEGIN
    EXECUTE format(
        'WITH sent AS ('
        '  INSERT INTO pgmq.%1$I AS m (msg_id, vt, message) OVERRIDING SYSTEM VALUE'
        '  SELECT DISTINCT ON (t.msg_id) t.msg_id, $5, jsonb_build_object(''task_id'', t.task_id)'
        '    FROM stageflow.tasks AS t'
        '   WHERE stageflow._is_task_of_job(t.job_id, $1) AND t.stage = $2 AND t.ordinal >= $3 AND t.ordinal < $4'
        '     AND t.status = ''queued'' AND t.msg_id <= $6'
        '     AND NOT EXISTS (SELECT 1 FROM pgmq.%1$I AS q WHERE q.msg_id = t.msg_id)'
        '   ORDER BY t.msg_id, t.ordinal'
        '  RETURNING 1) '
        'SELECT count(*) FROM sent', pgmq.format_table_name(p_queue, 'q'))
       INTO v_sent USING p_job_id, p_stage, p_from, p_upto, p_vt, p_last_msg_id;
    RETURN v_sent;
END;
$$;

-- The msg_id the task of that ordinal holds: where a window's refill point is.
CREATE FUNCTION stageflow._msg_id_of(p_job_id text, p_stage int, p_ordinal int)
RETURNS bigint
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT t.msg_id FROM stageflow.tasks AS t
     WHERE stageflow._is_task_of_job(t.job_id, p_job_id) AND t.stage = p_stage AND t.ordinal = p_ordinal
$$;

-- Sends the next window of stage p_stage of p_job_id (its messages visible from p_vt), unless
-- another session holds its row (SKIP LOCKED: this never waits) or it has none: returns how many
-- messages it sent, NULL when it sent no window. A stage of a job that ended gets no more (its row
-- goes).
CREATE FUNCTION stageflow._send_window(p_job_id text, p_stage int, p_vt timestamptz)
RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    w       stageflow.message_windows;
    v_upto  int;
    v_sent  int;
BEGIN
    SELECT * INTO w FROM stageflow.message_windows AS mw
     WHERE mw.job_id = p_job_id AND mw.stage = p_stage
       FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF NOT stageflow._job_is_open((SELECT j.status FROM stageflow.jobs AS j WHERE j.job_id = w.job_id)) THEN
        DELETE FROM stageflow.message_windows AS mw WHERE mw.job_id = w.job_id AND mw.stage = w.stage;
        RETURN NULL;
    END IF;
    v_upto := least(w.next_ordinal::bigint + w.window_size, w.task_count)::int;
    v_sent := stageflow._send_stage_messages(w.job_id, w.stage, w.queue, w.next_ordinal, v_upto, w.last_msg_id, p_vt);
    IF v_upto = w.task_count THEN
        DELETE FROM stageflow.message_windows AS mw WHERE mw.job_id = w.job_id AND mw.stage = w.stage;
    ELSE
        UPDATE stageflow.message_windows AS mw
           SET next_ordinal = v_upto,
               refill_at = stageflow._msg_id_of(w.job_id, w.stage, w.next_ordinal),
               sent_up_to = stageflow._msg_id_of(w.job_id, w.stage, v_upto - 1)
         WHERE mw.job_id = w.job_id AND mw.stage = w.stage;
    END IF;
    IF v_sent > 0 THEN
        PERFORM pg_notify('stageflow_tasks', w.queue);
    END IF;
    RETURN v_sent;
END;
$$;

-- Drops the windows of a job whose open tasks have all been cancelled (_end_job) or given messages
-- (retry_job of a stopped job): those a claim holds are skipped, not waited for (that claim finds
-- the job ended and drops it, or sends none of the tasks retry_job sent).
CREATE FUNCTION stageflow._drop_message_windows(p_job_id text)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    DELETE FROM stageflow.message_windows AS w
     WHERE (w.job_id, w.stage) IN (SELECT l.job_id, l.stage FROM stageflow.message_windows AS l
                                    WHERE l.job_id = p_job_id
                                    ORDER BY l.stage
                                      FOR UPDATE SKIP LOCKED)
$$;

-- Whether a claim's read of msg_ids p_read_from .. p_read_to took messages of a stage's last
-- window sent (p_refill_at .. p_sent_up_to, stageflow.message_windows), so that its next window
-- is due: the one test of it, inlined where claim_tasks probes for such a stage and where
-- _send_next_window picks them. (Inlinable: no SET clause, its operators qualified.)
CREATE FUNCTION stageflow._window_reached(p_refill_at bigint, p_sent_up_to bigint, p_read_from bigint, p_read_to bigint)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT p_refill_at OPERATOR(pg_catalog.<=) p_read_to AND p_read_from OPERATOR(pg_catalog.<=) p_sent_up_to
$$;

-- A claim's part: sends the next window of every stage on p_queue whose last window sent the
-- claim's read reached (it read msg_ids p_read_from .. p_read_to); if it read fewer than
-- it asked for (p_short) and those sent nothing, the next window of the oldest stage with one to
-- send; visible from p_vt. Stages another session is sending for are skipped. Returns how many
-- messages it sent.
CREATE FUNCTION stageflow._send_next_window(p_queue text, p_vt timestamptz, p_read_from bigint, p_read_to bigint,
                                             p_short boolean)
RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    w       record;
    v_sent  int;
    v_total int := 0;
BEGIN
    FOR w IN
        SELECT u.* FROM (
            SELECT mw.job_id, mw.stage, mw.created_at,
                   coalesce(stageflow._window_reached(mw.refill_at, mw.sent_up_to, p_read_from, p_read_to), false) AS reached
              FROM stageflow.message_windows AS mw
             WHERE mw.queue = p_queue) AS u
         WHERE u.reached OR p_short
         ORDER BY u.reached DESC, u.created_at, u.job_id, u.stage
    LOOP
        EXIT WHEN NOT w.reached AND v_total > 0;
        v_sent := stageflow._send_window(w.job_id, w.stage, p_vt);
        -- (a window none of whose tasks is left to send, cancelled or retried under other ids: the next)
        WHILE v_sent = 0 LOOP
            v_sent := stageflow._send_window(w.job_id, w.stage, p_vt);
        END LOOP;
        v_total := v_total + coalesce(v_sent, 0);
    END LOOP;
    RETURN v_total;
END;
$$;

CREATE FUNCTION stageflow._create_stage_tasks(p_job_id text, p_stage int, p_catch boolean DEFAULT false,
                                              OUT created int, OUT failure jsonb)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job         stageflow.jobs;
    v_def         jsonb;
    v_fan_out     text;
    v_param       text;
    v_queue       text;
    v_prefix      text := left(p_job_id, 16) || '-s' || p_stage || '-';
    v_keys        text[];
    v_params      jsonb[];
    v_preds       text[];
    v_inputs      jsonb;
    v_count       int;
    v_shards      int;
    v_matched     int;
    v_duplicate   text;
    v_first_token bigint;
    v_sequence    regclass;
    v_window      int;
    -- the engine's clock, read once for the stage and all its tasks
    v_now         timestamptz := stageflow.now();
    v_message     text;
    v_sqlstate    text;
    v_hint        text;
BEGIN
    SELECT * INTO STRICT v_job FROM stageflow.jobs AS j WHERE j.job_id = p_job_id;
    v_def := v_job.definition -> 'stages' -> (p_stage - 1);
    v_fan_out := v_def ->> 'fan_out';
    v_param := v_def ->> 'param';
    v_queue := v_def ->> 'queue';

    -- The stage's tasks, planned (reading only).
    BEGIN
        CASE v_fan_out
        WHEN 'single' THEN
            v_keys := ARRAY['0'];
            v_params := ARRAY['{}'::jsonb];
        WHEN 'count' THEN
            -- generated after the quota check below
            v_count := (v_job.params ->> v_param)::int;
        WHEN 'each' THEN
            SELECT array_agg((e.n - 1)::text ORDER BY e.n),
                   array_agg(jsonb_build_object('index', e.n - 1, 'item', e.item) ORDER BY e.n)
              INTO v_keys, v_params
              FROM jsonb_array_elements(v_job.params -> v_param) WITH ORDINALITY AS e(item, n);
        WHEN 'dynamic' THEN
            SELECT array_agg(coalesce(d.entry ->> 'key', (d.n - 1)::text) ORDER BY d.n),
                   array_agg(coalesce(d.entry -> 'params', '{}'::jsonb) ORDER BY d.n)
              INTO v_keys, v_params
              FROM (SELECT e.entry, row_number() OVER (ORDER BY t.ordinal, e.i) AS n
                      FROM stageflow.tasks AS t
                     CROSS JOIN LATERAL jsonb_array_elements(t.result -> 'tasks') WITH ORDINALITY AS e(entry, i)
                     WHERE stageflow._is_task_of_job(t.job_id, p_job_id) AND t.stage = p_stage - 1 AND t.status = 'completed') AS d;
            SELECT k INTO v_duplicate FROM unnest(v_keys) AS k GROUP BY k HAVING count(*) > 1 LIMIT 1;
            IF v_duplicate IS NOT NULL THEN
                RAISE EXCEPTION USING
                    ERRCODE = '22023',
                    MESSAGE = format('stage %s (%s) of job %s: the planner results name task key %L more than once',
                                     p_stage, v_def ->> 'name', p_job_id, v_duplicate),
                    HINT = 'each entry of a dynamic fan-out needs a unique "key" across all planner tasks of the previous stage';
            END IF;
        WHEN 'lineage' THEN
            SELECT array_agg(t.task_key ORDER BY t.ordinal),
                   array_agg(stageflow._task_params(v_job.definition -> 'stages' -> (p_stage - 2) ->> 'fan_out',
                                                    t.ordinal, t.params) ORDER BY t.ordinal),
                   array_agg(t.task_id ORDER BY t.ordinal)
              INTO v_keys, v_params, v_preds
              FROM stageflow.tasks AS t
             WHERE stageflow._is_task_of_job(t.job_id, p_job_id) AND t.stage = p_stage - 1 AND t.status = 'completed';
        WHEN 'fan_in' THEN
            v_keys := ARRAY['0'];
            v_params := ARRAY['{}'::jsonb];
            SELECT coalesce(jsonb_agg(t.result ORDER BY t.ordinal), '[]'::jsonb)
              INTO v_inputs
              FROM stageflow.tasks AS t
             WHERE stageflow._is_task_of_job(t.job_id, p_job_id) AND t.stage = p_stage - 1 AND t.status = 'completed';
        END CASE;
        v_count := coalesce(v_count, cardinality(v_keys), 0);
        PERFORM stageflow._check_quota(v_job, p_stage, v_count);
        -- Task ids keep 16 hex digits of the job's id: another job's tasks may hold this stage's
        -- (one index probe; found by the INSERT below, it would fail the caller, not the job).
        IF v_count > 0 AND EXISTS (SELECT 1 FROM stageflow.tasks AS t
                                    WHERE t.task_id >= v_prefix AND t.task_id < left(v_prefix, -1) || '.') THEN
            RAISE EXCEPTION USING
                ERRCODE = '23505',
                MESSAGE = format('stage %s of job %s: its task ids (%s...) are taken by another job''s tasks',
                                 p_stage, p_job_id, v_prefix),
                HINT = 'two job ids share their first 16 hex digits; submit the work with other params (or wait until retention deletes the other job)';
        END IF;
    EXCEPTION WHEN data_exception OR integrity_constraint_violation OR program_limit_exceeded
                   OR syntax_error_or_access_rule_violation OR raise_exception THEN
        IF NOT p_catch THEN
            RAISE;
        END IF;
        GET STACKED DIAGNOSTICS v_message = MESSAGE_TEXT, v_sqlstate = RETURNED_SQLSTATE, v_hint = PG_EXCEPTION_HINT;
        failure := jsonb_build_object('message', v_message, 'sqlstate', v_sqlstate, 'hint', nullif(v_hint, ''));
        RETURN;
    END;
    v_shards := greatest(least(v_count, 16), 1);

    INSERT INTO stageflow.stages
        (job_id, stage, name, handler, queue, fan_out, param, next_fan_out, max_attempts,
         lease_seconds, timeout_seconds,
         max_failed_tasks, max_failure_ratio, task_count, shards, open_shards, status, created_at, completed_at)
    VALUES
        (p_job_id, p_stage, v_def ->> 'name', v_def ->> 'handler', v_queue, v_fan_out, v_param,
         v_job.definition -> 'stages' -> p_stage ->> 'fan_out',
         (v_def -> 'retry' ->> 'max_attempts')::int,
         (v_def ->> 'lease_seconds')::int, (v_def ->> 'timeout_seconds')::int,
         (v_def ->> 'max_failed_tasks')::int, (v_def ->> 'max_failure_ratio')::numeric,
         v_count, v_shards, least(v_count, v_shards),
         CASE WHEN v_count = 0 THEN 'completed' ELSE 'active' END,
         v_now, CASE WHEN v_count = 0 THEN v_now END);
    -- The stage's tasks spread evenly over its shards.
    INSERT INTO stageflow.stage_shards (job_id, stage, shard, remaining_tasks)
    SELECT p_job_id, p_stage, k, v_count / v_shards + CASE WHEN k < v_count % v_shards THEN 1 ELSE 0 END
      FROM generate_series(0, v_shards - 1) AS k;

    -- One message per task, sent in one pgmq.send_batch whose ids come back in the order of its
    -- array (one INSERT ... RETURNING, in array order): the n-th id is the n-th task's. Ids and
    -- tasks are zipped by position (WITH ORDINALITY, ROWS FROM): no join, no sort, no array of
    -- the ids. A count fan-out builds no arrays of keys and params either: its keys are the
    -- ordinals. (Measured on a count of 1,000,000: the arrays of keys and params, the sorted
    -- message array and the sorted id array took half the function's time.)
    IF v_count > 0 THEN
        -- (made on first use: the built-in hello_world's queue, or one a restore dropped)
        PERFORM stageflow._ensure_queue(v_queue);
        -- (above the tokens of any deleted tasks that had these ids: stageflow.lease_token_floor)
        v_first_token := coalesce((SELECT max(f.token) FROM stageflow.lease_token_floor AS f), 0);
    END IF;
    v_window := stageflow._message_window();
    IF v_count > v_window THEN
        -- A stage of more tasks than a window: every task row holds an id taken from the queue's
        -- sequence (in task order), and only the first window's messages are sent now; the rest
        -- go as claims find the queue short (stageflow._send_next_window).
        v_sequence := pg_get_serial_sequence(format('pgmq.%I', pgmq.format_table_name(v_queue, 'q')), 'msg_id')::regclass;
        IF v_fan_out = 'count' THEN
            INSERT INTO stageflow.tasks
                (task_id, job_id, stage, task_key, ordinal, params, predecessor_id, inputs, max_attempts, msg_id, created_at,
                 lease_token)
            SELECT v_prefix || i, p_job_id, p_stage, i::text, i, '{}'::jsonb, NULL, v_inputs,
                   (v_def -> 'retry' ->> 'max_attempts')::int, nextval(v_sequence), v_now, v_first_token
              FROM generate_series(0, v_count - 1) AS i;
        ELSE
            INSERT INTO stageflow.tasks
                (task_id, job_id, stage, task_key, ordinal, params, predecessor_id, inputs, max_attempts, msg_id, created_at,
                 lease_token)
            SELECT v_prefix || u.key, p_job_id, p_stage, u.key, (u.n - 1)::int, u.params, u.pred, v_inputs,
                   (v_def -> 'retry' ->> 'max_attempts')::int, nextval(v_sequence), v_now, v_first_token
              FROM ROWS FROM (unnest(v_keys), unnest(v_params), unnest(v_preds)) WITH ORDINALITY AS u(key, params, pred, n);
        END IF;
        -- (no window sent yet, the empty range 1 .. 0; the first goes as every later one does)
        INSERT INTO stageflow.message_windows
            (job_id, stage, queue, next_ordinal, task_count, window_size, refill_at, sent_up_to, last_msg_id, created_at)
        VALUES (p_job_id, p_stage, v_queue, 0, v_count, v_window, 1, 0,
                stageflow._msg_id_of(p_job_id, p_stage, v_count - 1), v_now);
        PERFORM stageflow._send_window(p_job_id, p_stage, clock_timestamp());
    ELSIF v_count > 0 AND v_fan_out = 'count' THEN
        INSERT INTO stageflow.tasks
            (task_id, job_id, stage, task_key, ordinal, params, predecessor_id, inputs, max_attempts, msg_id, created_at,
             lease_token)
        SELECT v_prefix || (m.n - 1), p_job_id, p_stage, (m.n - 1)::text, (m.n - 1)::int,
               '{}'::jsonb, NULL, v_inputs,
               (v_def -> 'retry' ->> 'max_attempts')::int, m.msg_id, v_now, v_first_token
          FROM pgmq.send_batch(v_queue,
                               ARRAY(SELECT jsonb_build_object('task_id', v_prefix || i)
                                       FROM generate_series(0, v_count - 1) AS i)) WITH ORDINALITY AS m(msg_id, n);
    ELSIF v_count > 0 THEN
        INSERT INTO stageflow.tasks
            (task_id, job_id, stage, task_key, ordinal, params, predecessor_id, inputs, max_attempts, msg_id, created_at,
             lease_token)
        SELECT v_prefix || u.key, p_job_id, p_stage, u.key, (u.n - 1)::int, u.params, u.pred, v_inputs,
               (v_def -> 'retry' ->> 'max_attempts')::int, u.msg_id, v_now, v_first_token
          FROM ROWS FROM (unnest(v_keys), unnest(v_params), unnest(v_preds),
                          pgmq.send_batch(v_queue,
                                          ARRAY(SELECT jsonb_build_object('task_id', v_prefix || k)
                                                  FROM unnest(v_keys) AS k))) WITH ORDINALITY AS u(key, params, pred, msg_id, n);
    END IF;
    IF v_count > 0 AND v_sequence IS NULL THEN
        -- The zip by position stands on send_batch returning its ids in array order: checked at
        -- both ends of the stage (two index lookups), so that a pgmq that returned them otherwise
        -- fails the fan-out instead of pairing tasks with other tasks' messages.
        EXECUTE format('SELECT count(*) FROM stageflow.tasks AS t JOIN pgmq.%I AS m ON m.msg_id = t.msg_id '
                       'WHERE stageflow._is_task_of_job(t.job_id, $1) AND t.stage = $2 AND t.ordinal IN (0, $3 - 1) '
                       'AND m.message ->> ''task_id'' = t.task_id', pgmq.format_table_name(v_queue, 'q'))
           INTO v_matched USING p_job_id, p_stage, v_count;
        IF v_matched <> least(v_count, 2) THEN
            RAISE EXCEPTION 'stage % of job %: pgmq.send_batch did not return its message ids in array order',
                            p_stage, p_job_id;
        END IF;
    END IF;
    IF v_count > 0 THEN
        PERFORM pg_notify('stageflow_tasks', v_queue);
    END IF;
    created := v_count;
END;
$$;
