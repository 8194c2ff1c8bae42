-- Deletes the messages of queue p_queue among p_msg_ids that no other transaction holds (a claim
-- that reads one of the others deletes it, as not its task's current message or one whose task
-- ended). Paths that hold a job's shards use it: a wait for a message a claim holds, while that
-- claim waits for the shards, is a deadlock. (pgmq.delete
-- cannot skip locked rows: this deletes from the queue table, named by pgmq.format_table_name.)
CREATE FUNCTION stageflow._delete_free_messages(p_queue text, p_msg_ids bigint[])
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE format(
        'DELETE FROM pgmq.%1$I WHERE msg_id IN '
        '(SELECT q.msg_id FROM pgmq.%1$I AS q WHERE q.msg_id = ANY ($1) ORDER BY q.msg_id FOR UPDATE SKIP LOCKED)',
        pgmq.format_table_name(p_queue, 'q'))
    USING p_msg_ids;
END;
$$;

-- Cancels the open (queued or running) tasks of a job that has ended, skipping rows another
-- session holds instead of waiting for them (waiting could deadlock with a completion that holds
-- its task and waits for the job row). What was skipped settles itself or is mended: a report in
-- flight is recorded without advancing the job; a claim that read the job as still open hands the
-- task out, its report is recorded the same way, and maintenance's reconciler cancels the task if
-- it is still running (retry_job re-queues it too). Tasks first, then their
-- messages (also skipped when held: a claim holding one finds its task cancelled and deletes it),
-- then each stage's shards. Returns how many tasks it cancelled.
CREATE FUNCTION stageflow._cancel_open_tasks(p_job_id text)
RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_group      record;
    v_stages     int[];
    v_queues     text[];
    v_msg_ids    bigint[];
    v_running    boolean[];
BEGIN
    WITH locked AS (
        SELECT o.task_id, o.status FROM stageflow.tasks AS o
         WHERE stageflow._is_task_of_job(o.job_id, p_job_id) AND stageflow._task_is_open(o.status)
         ORDER BY o.task_id
           FOR UPDATE SKIP LOCKED
    ), cancelled AS (
        UPDATE stageflow.tasks AS t
           SET status = 'cancelled', completed_at = stageflow.now(), lease_expires_at = NULL
          FROM locked AS l
         WHERE t.task_id = l.task_id
        RETURNING t.stage, t.msg_id, l.status = 'running' AS was_running
    )
    SELECT array_agg(c.stage), array_agg(s.queue), array_agg(c.msg_id), array_agg(c.was_running)
      INTO v_stages, v_queues, v_msg_ids, v_running
      FROM cancelled AS c
      JOIN stageflow.stages AS s ON s.job_id = p_job_id AND s.stage = c.stage;
    IF v_stages IS NULL THEN
        RETURN 0;
    END IF;

    FOR v_group IN
        SELECT u.queue, array_agg(u.msg_id ORDER BY u.msg_id) AS msg_ids FROM unnest(v_queues, v_msg_ids) AS u(queue, msg_id)
         GROUP BY u.queue ORDER BY u.queue
    LOOP
        PERFORM stageflow._delete_free_messages(v_group.queue, v_group.msg_ids);
    END LOOP;
    FOR v_group IN
        SELECT u.stage, count(*)::int AS tasks, (count(*) FILTER (WHERE u.was_running))::int AS running
          FROM unnest(v_stages, v_running) AS u(stage, was_running)
         GROUP BY u.stage ORDER BY u.stage
    LOOP
        PERFORM stageflow._move_shards(p_job_id, v_group.stage, v_group.tasks, -1, 0, v_group.running);
    END LOOP;
    RETURN cardinality(v_stages);
END;
$$;

-- Ends an open job as failed or cancelled (with p_deadline: only if its deadline is still at or
-- before it, as a concurrent retry_job moves it). Its current stage's shards and row are locked
-- first, then the job row: from then on nothing advances the job, and the statements after it see
-- every stage and task a completion created before: its open tasks are cancelled and its active
-- stages closed (stage rows another session holds are skipped: the completion holding one closes
-- it when advance_stage finds the job ended). Records the error and emits job_<status>. Returns
-- false if the job had already ended. p_advancing: called by advance_stage, which holds the job
-- row and found the current stage without open tasks: nothing of that stage is left to cancel,
-- and its shards are not waited for (the completion advancing the job holds one of them, and a
-- cancel_job holding the lower ones waits for it: a deadlock).
CREATE FUNCTION stageflow._end_job(p_job_id text, p_status text, p_error jsonb, p_deadline timestamptz DEFAULT NULL,
                                   p_advancing boolean DEFAULT false)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_cancelled int;
BEGIN
    IF NOT p_advancing THEN
        PERFORM stageflow._lock_current_stage(p_job_id);
    END IF;
    UPDATE stageflow.jobs AS j
       SET status = p_status, error = coalesce(p_error, j.error),
           completed_at = stageflow.now(), updated_at = stageflow.now()
     WHERE j.job_id = p_job_id AND stageflow._job_is_open(j.status)
       AND (p_deadline IS NULL OR j.deadline_at <= p_deadline);
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    v_cancelled := stageflow._cancel_open_tasks(p_job_id);
    -- (a big stage's tasks without messages were cancelled with the rest)
    PERFORM stageflow._drop_message_windows(p_job_id);
    UPDATE stageflow.stages AS s
       SET status = CASE WHEN p_status = 'cancelled' THEN 'cancelled' ELSE 'failed' END,
           completed_at = stageflow.now()
     WHERE (s.job_id, s.stage) IN (SELECT a.job_id, a.stage FROM stageflow.stages AS a
                                    WHERE a.job_id = p_job_id AND a.status = 'active'
                                    ORDER BY a.stage
                                      FOR UPDATE SKIP LOCKED);
    PERFORM stageflow._emit(p_job_id, 'job_' || p_status,
                            jsonb_build_object('error', p_error, 'cancelled_tasks', v_cancelled));
    RETURN true;
END;
$$;

-- Cancels what is still open of a job that has ended (tasks a claim or report held while the job
-- ended): under the locks of its current stage, which retry_job takes too, and only if the job is
-- still ended then (a retry that came first revived it). Returns how many tasks it cancelled.
CREATE FUNCTION stageflow._cancel_leftovers(p_job_id text)
RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM stageflow._lock_current_stage(p_job_id);
    IF NOT EXISTS (SELECT 1 FROM stageflow.jobs AS j
                    WHERE j.job_id = p_job_id AND stageflow._job_has_ended(j.status)) THEN
        RETURN 0;
    END IF;
    RETURN stageflow._cancel_open_tasks(p_job_id);
END;
$$;

-- Ends a task without a result: 'failed' (a permanent error) or 'dead' (its attempts ran out).
-- Its message is archived (pgmq.archive), its error kept. Within the stage's failure threshold the
-- stage goes on without it (and advances if it was the last open task); beyond it the job fails.
-- The task row is locked before its message (callers that decided on it hold the lock already).
-- Returns false if the task was no longer open.
CREATE FUNCTION stageflow._end_task(p_task_id text, p_status text, p_error jsonb)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_task       record;
    v_stage      stageflow.stages;
BEGIN
    SELECT t.job_id, t.stage, t.ordinal, t.msg_id, t.attempt, t.status, s.queue INTO STRICT v_task
      FROM stageflow.tasks AS t
      JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
     WHERE t.task_id = p_task_id
       FOR UPDATE OF t;
    IF NOT stageflow._task_is_open(v_task.status) THEN
        RETURN false;
    END IF;

    PERFORM pgmq.archive(v_task.queue, v_task.msg_id);
    UPDATE stageflow.tasks AS t
       SET status = p_status, error = p_error, completed_at = stageflow.now(), lease_expires_at = NULL,
           failed_at = stageflow.now(),
           errors = t.errors || jsonb_build_array(jsonb_build_object(
               'attempt', t.attempt, 'at', stageflow.now(), 'worker_id', t.worker_id, 'lease_token', t.lease_token,
               'error', p_error))
     WHERE t.task_id = p_task_id AND stageflow._task_is_open(t.status);
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM stageflow._emit(v_task.job_id, 'task_' || p_status,
                            jsonb_build_object('attempt', v_task.attempt, 'error', p_error), v_task.stage, p_task_id);

    -- All of the stage's shards are locked before its row: if this failure ends the job,
    -- cancelling the other open tasks moves their shards too, in the order shards -> stage.
    v_stage := stageflow._move_shards(v_task.job_id, v_task.stage, 1, -1, 1,
                                      CASE WHEN v_task.status = 'running' THEN 1 ELSE 0 END);

    IF v_stage.failed_count <= v_stage.max_failed_tasks
       OR v_stage.failed_count <= v_stage.max_failure_ratio * v_stage.task_count THEN
        IF v_stage.open_shards = 0 THEN
            PERFORM stageflow.advance_stage(v_task.job_id);
        END IF;
        RETURN true;
    END IF;

    PERFORM stageflow._end_job(
        v_task.job_id, 'failed',
        jsonb_build_object(
            'message', format('task %s %s on attempt %s; stage %s (%s) tolerates %s failed task(s) or a ratio of %s',
                              p_task_id, CASE p_status WHEN 'dead' THEN 'ran out of attempts' ELSE 'failed' END,
                              v_task.attempt, v_stage.stage, v_stage.name, v_stage.max_failed_tasks,
                              v_stage.max_failure_ratio),
            'task_id', p_task_id, 'stage', v_task.stage, 'error', p_error));
    RETURN true;
END;
$$;

-- Reports a failed attempt with a structured error:
--   {"type", "message", "code", "category": "transient" | "throttling" | "permanent", "details",
--    "retry_after_seconds"}
-- (a non-object error is stored as {"message": error}). The category defaults to transient, or to
-- permanent when retryable is false. A transient failure with attempts left is retried after an
-- exponential backoff with jitter: b = min(backoff_max_seconds, backoff_base_seconds * 2^(attempt-1)),
-- waiting between b/2 and b. A throttling failure waits at least retry_after_seconds (without it,
-- twice the backoff). A permanent failure ends the task as `failed`; a retryable one that ran out
-- of attempts ends it as `dead` (dead-lettered). Every attempt's error is kept in `errors`.
-- Failing a task that already ended as failed or dead reports it again. Fenced as
-- complete_task_and_check_stage is, under the task's row lock: with lease_token only the current
-- lease may fail the task, with worker_id alone only the worker holding it; with neither the
-- caller is trusted.
CREATE FUNCTION stageflow.fail_task(task_id text, error jsonb, retryable boolean DEFAULT true, worker_id text DEFAULT NULL,
                                    lease_token bigint DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_row          stageflow.tasks;
    v_queue        text;
    v_retry        jsonb;
    v_refusal      jsonb;
    v_now          timestamptz := stageflow.now();
    v_error        jsonb;
    v_category     text;
    v_retry_after  numeric;
    v_delay        numeric;
BEGIN
    -- Only a task of a queue granted to the session's login (before its lock is taken).
    PERFORM stageflow._check_report_grants(ARRAY[fail_task.task_id]);
    -- The task row decides, under its lock (taken before its message, as every report does).
    SELECT * INTO v_row FROM stageflow.tasks AS t WHERE t.task_id = fail_task.task_id FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM stageflow._raise_unknown('task', fail_task.task_id);
    END IF;
    SELECT s.queue, j.definition -> 'stages' -> (v_row.stage - 1) -> 'retry'
      INTO v_queue, v_retry
      FROM stageflow.stages AS s
      JOIN stageflow.jobs AS j ON j.job_id = s.job_id
     WHERE s.job_id = v_row.job_id AND s.stage = v_row.stage;
    IF fail_task.error IS NULL OR fail_task.retryable IS NULL THEN
        RAISE EXCEPTION USING
            ERRCODE = '22004',
            MESSAGE = 'fail_task needs an error and retryable, got NULL',
            HINT = 'pass the error as JSON, e.g. {"type": "IOError", "message": "disk full", "category": "transient"}';
    END IF;
    IF octet_length(fail_task.error::text) > 65536 THEN
        RAISE EXCEPTION USING
            ERRCODE = '54000',
            MESSAGE = format('the error of task %s takes %s bytes, more than the limit of 65536', fail_task.task_id,
                             octet_length(fail_task.error::text)),
            HINT = 'keep errors short: a type, a message and small details; put large diagnostics in storage and link them';
    END IF;
    v_error := CASE WHEN jsonb_typeof(fail_task.error) = 'object' THEN fail_task.error
                    ELSE jsonb_build_object('message', fail_task.error) END;
    v_category := coalesce(v_error ->> 'category', CASE WHEN fail_task.retryable THEN 'transient' ELSE 'permanent' END);
    IF v_category NOT IN ('transient', 'throttling', 'permanent') THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('unknown error category %s', v_error -> 'category'),
            HINT = 'categories are "transient" (retry with backoff), "throttling" (retry after retry_after_seconds) and "permanent" (no retry)';
    END IF;
    IF v_error ? 'retry_after_seconds' THEN
        IF jsonb_typeof(v_error -> 'retry_after_seconds') <> 'number'
           OR (v_error ->> 'retry_after_seconds')::numeric NOT BETWEEN 0 AND 604800 THEN
            RAISE EXCEPTION USING
                ERRCODE = '22023',
                MESSAGE = format('retry_after_seconds must be a number from 0 to 604800, got %s', v_error -> 'retry_after_seconds'),
                HINT = 'give the delay a throttled service asked for, in seconds';
        END IF;
        v_retry_after := (v_error ->> 'retry_after_seconds')::numeric;
    END IF;
    IF NOT fail_task.retryable THEN
        v_category := 'permanent';
    END IF;
    v_error := v_error || jsonb_build_object('category', v_category);

    -- A report made again after its answer was lost reports the task as it is (below): the last
    -- error the task recorded is this one, from this lease, and no claim came since (the token is
    -- still the task's). Without a token, a task that already failed or died reports itself
    -- again to the worker that held it (with worker_id) or to the psql form (neither). Anything
    -- else not running, or another lease's, is refused: a failure from a lease that was
    -- released, re-queued by retry_job or dead-lettered while its holder worked is not recorded,
    -- and not answered as if it had been.
    v_refusal := CASE WHEN fail_task.lease_token IS NOT NULL
                           AND v_row.lease_token = fail_task.lease_token
                           AND (v_row.status = 'queued' OR stageflow._task_has_failed(v_row.status))
                           AND (v_row.errors -> -1 ->> 'lease_token')::bigint = fail_task.lease_token
                           AND v_row.errors -> -1 -> 'error' = v_error THEN NULL
                      WHEN fail_task.lease_token IS NULL AND stageflow._task_has_failed(v_row.status)
                           AND (fail_task.worker_id IS NULL OR v_row.worker_id IS NOT DISTINCT FROM fail_task.worker_id) THEN NULL
                      ELSE stageflow._refusal(v_row, fail_task.task_id, 'failed', fail_task.lease_token, fail_task.worker_id) END;
    IF v_refusal IS NOT NULL THEN
        PERFORM stageflow._raise_refusal(v_refusal);
    END IF;
    IF v_row.status = 'running' THEN
        IF v_category <> 'permanent' AND v_row.attempt < v_row.max_attempts THEN
            v_delay := least((v_retry ->> 'backoff_max_seconds')::numeric,
                             (v_retry ->> 'backoff_base_seconds')::numeric * power(2::numeric, v_row.attempt - 1));
            v_delay := round(v_delay / 2 + random()::numeric * v_delay / 2, 3);
            IF v_category = 'throttling' THEN
                v_delay := greatest(coalesce(v_retry_after, 2 * v_delay), v_delay);
            END IF;
            -- The task (locked above), then its message, visible when the retry is due.
            UPDATE stageflow.tasks AS t
               SET status = 'queued', error = v_error, lease_expires_at = NULL,
                   next_attempt_at = v_now + make_interval(secs => v_delay),
                   errors = t.errors || jsonb_build_array(jsonb_build_object(
                       'attempt', t.attempt, 'at', v_now, 'worker_id', t.worker_id, 'lease_token', t.lease_token,
                       'error', v_error))
             WHERE t.task_id = fail_task.task_id AND t.status = 'running';
            IF FOUND THEN
                PERFORM pgmq.set_vt(v_queue, v_row.msg_id, v_now + make_interval(secs => v_delay));
                PERFORM stageflow._leave_running(v_row.job_id, v_row.stage, 1);
                PERFORM stageflow._emit(v_row.job_id, 'task_retry_scheduled',
                                        jsonb_build_object('attempt', v_row.attempt, 'retry_in_seconds', v_delay,
                                                           'error', v_error),
                                        v_row.stage, fail_task.task_id);
                RETURN jsonb_build_object(
                    'task_id', fail_task.task_id, 'task_status', 'queued', 'attempt', v_row.attempt,
                    'max_attempts', v_row.max_attempts, 'category', v_category, 'retry_in_seconds', v_delay,
                    'job_id', v_row.job_id,
                    'job_status', (SELECT j.status FROM stageflow.jobs AS j WHERE j.job_id = v_row.job_id));
            END IF;
        ELSE
            PERFORM stageflow._end_task(fail_task.task_id,
                                        CASE WHEN v_category = 'permanent' THEN 'failed' ELSE 'dead' END,
                                        v_error);
        END IF;
    END IF;

    RETURN (SELECT jsonb_build_object(
                       'task_id', t.task_id, 'task_status', t.status, 'attempt', t.attempt,
                       'max_attempts', t.max_attempts, 'category', t.error ->> 'category', 'error', t.error,
                       'job_id', j.job_id, 'job_status', j.status)
              FROM stageflow.tasks AS t
              JOIN stageflow.jobs AS j ON j.job_id = t.job_id
             WHERE t.task_id = fail_task.task_id);
END;
$$;
