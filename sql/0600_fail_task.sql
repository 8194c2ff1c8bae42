-- Deletes, without waiting, the messages of a job's open (queued or running) tasks and marks those
-- tasks cancelled; returns how many. Rows another session holds (a claim or a completion in
-- flight) are skipped instead of waited for: waiting could deadlock with a completion that holds
-- a message and waits for the stage row we hold. The skipped ones settle themselves: a claim
-- drops a task whose job ended, a completion of it is recorded without advancing the job.
-- pgmq.delete cannot skip locked rows, so this deletes from the queue table, named by pgmq's own
-- pgmq.format_table_name.
CREATE FUNCTION stageflow._cancel_open_tasks(p_job_id text)
RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_group      record;
    v_cancelled  int := 0;
BEGIN
    FOR v_group IN
        SELECT s.queue, array_agg(t.msg_id) AS msg_ids
          FROM stageflow.tasks AS t
          JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
         WHERE t.job_id = p_job_id AND t.status IN ('queued', 'running')
         GROUP BY s.queue
    LOOP
        EXECUTE format(
            'DELETE FROM pgmq.%1$I WHERE msg_id IN '
            '(SELECT q.msg_id FROM pgmq.%1$I AS q WHERE q.msg_id = ANY ($1) FOR UPDATE SKIP LOCKED)',
            pgmq.format_table_name(v_group.queue, 'q'))
        USING v_group.msg_ids;
    END LOOP;

    FOR v_group IN
        WITH cancelled AS (
            UPDATE stageflow.tasks AS t
               SET status = 'cancelled', completed_at = stageflow.now(), lease_expires_at = NULL
             WHERE t.task_id IN (SELECT o.task_id FROM stageflow.tasks AS o
                                  WHERE o.job_id = p_job_id AND o.status IN ('queued', 'running')
                                    FOR UPDATE SKIP LOCKED)
            RETURNING t.stage, t.ordinal
        )
        SELECT c.stage, array_agg(c.ordinal) AS ordinals FROM cancelled AS c GROUP BY c.stage ORDER BY c.stage
    LOOP
        PERFORM stageflow._move_shards(p_job_id, v_group.stage, v_group.ordinals, -1);
        v_cancelled := v_cancelled + cardinality(v_group.ordinals);
    END LOOP;
    RETURN v_cancelled;
END;
$$;

-- Ends an active job as failed or cancelled: cancels its open tasks, closes its active stage and
-- records the error. Returns false if the job had already ended.
CREATE FUNCTION stageflow._end_job(p_job_id text, p_status text, p_error jsonb)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_cancelled int;
BEGIN
    v_cancelled := stageflow._cancel_open_tasks(p_job_id);
    UPDATE stageflow.stages AS s
       SET status = CASE WHEN p_status = 'cancelled' THEN 'cancelled' ELSE 'failed' END,
           completed_at = stageflow.now()
     WHERE s.job_id = p_job_id AND s.status = 'active';
    UPDATE stageflow.jobs AS j
       SET status = p_status, error = coalesce(p_error, j.error),
           completed_at = stageflow.now(), updated_at = stageflow.now()
     WHERE j.job_id = p_job_id AND j.status IN ('queued', 'processing');
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM stageflow._emit(p_job_id, 'job_' || p_status,
                            jsonb_build_object('error', p_error, 'cancelled_tasks', v_cancelled));
    RETURN true;
END;
$$;

-- Ends a task without a result: 'failed' (a permanent error) or 'dead' (its attempts ran out).
-- Its message is archived (pgmq.archive), its error kept. Within the stage's failure threshold the
-- stage goes on without it (and advances if it was the last open task); beyond it the job fails.
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
    SELECT t.job_id, t.stage, t.ordinal, t.msg_id, t.attempt, s.queue INTO STRICT v_task
      FROM stageflow.tasks AS t
      JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
     WHERE t.task_id = p_task_id;

    -- The message first, then the task: the lock order of claim_tasks.
    PERFORM pgmq.archive(v_task.queue, v_task.msg_id);
    UPDATE stageflow.tasks AS t
       SET status = p_status, error = p_error, completed_at = stageflow.now(), lease_expires_at = NULL,
           errors = t.errors || jsonb_build_array(jsonb_build_object(
               'attempt', t.attempt, 'at', stageflow.now(), 'worker_id', t.worker_id, 'error', p_error))
     WHERE t.task_id = p_task_id AND t.status IN ('queued', 'running');
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM stageflow._emit(v_task.job_id, 'task_' || p_status,
                            jsonb_build_object('attempt', v_task.attempt, 'error', p_error), v_task.stage, p_task_id);

    -- All of the stage's shards are locked before its row: if this failure ends the job,
    -- cancelling the other open tasks moves their shards too, in the order shards -> stage.
    v_stage := stageflow._move_shards(v_task.job_id, v_task.stage, ARRAY[v_task.ordinal], -1, 1);

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
-- Failing a task that already ended reports it again. With worker_id, only the worker holding
-- the task's current lease may fail it (as in complete_task_and_check_stage).
CREATE FUNCTION stageflow.fail_task(task_id text, error jsonb, retryable boolean DEFAULT true, worker_id text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_task         record;
    v_error        jsonb;
    v_category     text;
    v_retry_after  numeric;
    v_delay        numeric;
BEGIN
    SELECT t.job_id, t.stage, t.status, t.msg_id, t.attempt, t.max_attempts, t.worker_id, s.queue,
           j.definition -> 'stages' -> (t.stage - 1) -> 'retry' AS retry
      INTO v_task
      FROM stageflow.tasks AS t
      JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
      JOIN stageflow.jobs AS j ON j.job_id = t.job_id
     WHERE t.task_id = fail_task.task_id;
    IF NOT FOUND THEN
        PERFORM stageflow._raise_unknown('task', fail_task.task_id);
    END IF;
    IF fail_task.error IS NULL OR fail_task.retryable IS NULL THEN
        RAISE EXCEPTION USING
            ERRCODE = '22004',
            MESSAGE = 'fail_task needs an error and retryable, got NULL',
            HINT = 'pass the error as JSON, e.g. {"type": "IOError", "message": "disk full", "category": "transient"}';
    END IF;
    IF pg_column_size(fail_task.error) > 65536 THEN
        RAISE EXCEPTION USING
            ERRCODE = '54000',
            MESSAGE = format('the error of task %s takes %s bytes, more than the limit of 65536', fail_task.task_id,
                             pg_column_size(fail_task.error)),
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

    IF v_task.status = 'completed' THEN
        RAISE EXCEPTION USING
            ERRCODE = '55000',
            MESSAGE = format('task %s is already completed and cannot fail', fail_task.task_id),
            HINT = 'a completed task keeps its result; retry the whole job to run it again';
    ELSIF v_task.status = 'queued' THEN
        RAISE EXCEPTION USING
            ERRCODE = '55000',
            MESSAGE = format('task %s is not claimed', fail_task.task_id),
            HINT = 'only a claimed (running) task can fail; claim it with stageflow.claim_tasks first';
    ELSIF v_task.status = 'cancelled' THEN
        RAISE EXCEPTION USING
            ERRCODE = '55000',
            MESSAGE = format('task %s is cancelled: its job ended', fail_task.task_id),
            HINT = 'see stageflow.job_status(job_id) for why the job ended';
    ELSIF v_task.status = 'running' THEN
        IF fail_task.worker_id IS NOT NULL AND v_task.worker_id IS DISTINCT FROM fail_task.worker_id THEN
            PERFORM stageflow._raise_foreign_lease(fail_task.task_id, v_task.worker_id, fail_task.worker_id);
        END IF;
        IF v_category <> 'permanent' AND v_task.attempt < v_task.max_attempts THEN
            v_delay := least((v_task.retry ->> 'backoff_max_seconds')::numeric,
                             (v_task.retry ->> 'backoff_base_seconds')::numeric * power(2, v_task.attempt - 1));
            v_delay := round(v_delay / 2 + random()::numeric * v_delay / 2, 3);
            IF v_category = 'throttling' THEN
                v_delay := greatest(coalesce(v_retry_after, 2 * v_delay), v_delay);
            END IF;
            -- The message first, then the task: the lock order of claim_tasks.
            PERFORM pgmq.set_vt(v_task.queue, v_task.msg_id, clock_timestamp() + make_interval(secs => v_delay));
            UPDATE stageflow.tasks AS t
               SET status = 'queued', error = v_error, lease_expires_at = NULL,
                   next_attempt_at = stageflow.now() + make_interval(secs => v_delay),
                   errors = t.errors || jsonb_build_array(jsonb_build_object(
                       'attempt', t.attempt, 'at', stageflow.now(), 'worker_id', t.worker_id, 'error', v_error))
             WHERE t.task_id = fail_task.task_id AND t.status = 'running';
            IF FOUND THEN
                PERFORM stageflow._emit(v_task.job_id, 'task_retry_scheduled',
                                        jsonb_build_object('attempt', v_task.attempt, 'retry_in_seconds', v_delay,
                                                           'error', v_error),
                                        v_task.stage, fail_task.task_id);
                RETURN jsonb_build_object(
                    'task_id', fail_task.task_id, 'task_status', 'queued', 'attempt', v_task.attempt,
                    'max_attempts', v_task.max_attempts, 'category', v_category, 'retry_in_seconds', v_delay,
                    'job_id', v_task.job_id,
                    'job_status', (SELECT j.status FROM stageflow.jobs AS j WHERE j.job_id = v_task.job_id));
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
