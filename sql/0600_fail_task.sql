-- Ends a task as failed, and with it its stage and its job: deletes the task's message, cancels the
-- job's queued tasks (messages first, then rows: the lock order of claim_tasks) and records the
-- error on the job. Returns false if the task was no longer open.
CREATE FUNCTION stageflow._fail_task_final(p_task_id text, p_error jsonb)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_task  record;
BEGIN
    SELECT t.job_id, t.stage, t.msg_id, t.attempt, s.queue INTO STRICT v_task
      FROM stageflow.tasks AS t
      JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
     WHERE t.task_id = p_task_id;

    PERFORM pgmq.delete(v_task.queue, v_task.msg_id);
    UPDATE stageflow.tasks AS t
       SET status = 'failed', error = p_error, completed_at = now(), lease_expires_at = NULL,
           errors = t.errors || jsonb_build_array(
               jsonb_build_object('attempt', t.attempt, 'at', now(), 'worker_id', t.worker_id, 'error', p_error))
     WHERE t.task_id = p_task_id AND t.status IN ('queued', 'running');
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE stageflow.stages AS s
       SET remaining_tasks = s.remaining_tasks - 1, failed_count = s.failed_count + 1,
           status = 'failed', completed_at = coalesce(s.completed_at, now())
     WHERE s.job_id = v_task.job_id AND s.stage = v_task.stage;

    PERFORM pgmq.delete(q.queue, q.msg_ids)
       FROM (SELECT s.queue, array_agg(t.msg_id) AS msg_ids
               FROM stageflow.tasks AS t
               JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
              WHERE t.job_id = v_task.job_id AND t.stage = v_task.stage AND t.status = 'queued'
              GROUP BY s.queue) AS q;
    WITH cancelled AS (
        UPDATE stageflow.tasks AS t
           SET status = 'cancelled', completed_at = now()
         WHERE t.job_id = v_task.job_id AND t.stage = v_task.stage AND t.status = 'queued'
        RETURNING t.task_id
    )
    UPDATE stageflow.stages AS s
       SET remaining_tasks = s.remaining_tasks - (SELECT count(*) FROM cancelled)
     WHERE s.job_id = v_task.job_id AND s.stage = v_task.stage;

    UPDATE stageflow.jobs AS j
       SET status = 'failed', updated_at = now(), completed_at = now(),
           error = jsonb_build_object(
               'message', format('task %s failed on attempt %s', p_task_id, v_task.attempt),
               'task_id', p_task_id, 'stage', v_task.stage, 'error', p_error)
     WHERE j.job_id = v_task.job_id AND j.status IN ('queued', 'processing');
    RETURN true;
END;
$$;

-- Reports a failed attempt. A retryable failure with attempts left puts the task back in its queue
-- after an exponential backoff (retry.backoff_base_seconds * 2^(attempt-1), capped at
-- retry.backoff_max_seconds); otherwise the task fails and so does its job. Every attempt's error is
-- kept in the task's `errors`. Failing a task that already failed or was cancelled reports it again.
CREATE FUNCTION stageflow.fail_task(task_id text, error jsonb, retryable boolean DEFAULT true)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_task   record;
    v_error  jsonb;
    v_delay  numeric;
BEGIN
    SELECT t.job_id, t.stage, t.status, t.msg_id, t.attempt, t.max_attempts, s.queue,
           j.definition -> 'stages' -> (t.stage - 1) -> 'retry' AS retry
      INTO v_task
      FROM stageflow.tasks AS t
      JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
      JOIN stageflow.jobs AS j ON j.job_id = t.job_id
     WHERE t.task_id = fail_task.task_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING
            ERRCODE = '42704',
            MESSAGE = format('unknown task %L', fail_task.task_id),
            HINT = 'task ids come from stageflow.claim_tasks and look like <16 hex>-s<stage>-<key>';
    END IF;
    IF fail_task.error IS NULL OR fail_task.retryable IS NULL THEN
        RAISE EXCEPTION USING
            ERRCODE = '22004',
            MESSAGE = 'fail_task needs an error and retryable, got NULL',
            HINT = 'pass the error as JSON, e.g. {"type": "IOError", "message": "disk full"}';
    END IF;
    v_error := CASE WHEN jsonb_typeof(fail_task.error) = 'object' THEN fail_task.error
                    ELSE jsonb_build_object('message', fail_task.error) END;

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
    ELSIF v_task.status = 'running' THEN
        IF fail_task.retryable AND v_task.attempt < v_task.max_attempts THEN
            v_delay := least((v_task.retry ->> 'backoff_max_seconds')::numeric,
                             (v_task.retry ->> 'backoff_base_seconds')::numeric * power(2, v_task.attempt - 1));
            -- The message first, then the task: the same lock order as claim_tasks.
            PERFORM pgmq.set_vt(v_task.queue, v_task.msg_id, clock_timestamp() + make_interval(secs => v_delay));
            UPDATE stageflow.tasks AS t
               SET status = 'queued', error = v_error, lease_expires_at = NULL,
                   next_attempt_at = now() + make_interval(secs => v_delay),
                   errors = t.errors || jsonb_build_array(
                       jsonb_build_object('attempt', t.attempt, 'at', now(), 'worker_id', t.worker_id, 'error', v_error))
             WHERE t.task_id = fail_task.task_id AND t.status = 'running';
            IF FOUND THEN
                RETURN jsonb_build_object(
                    'task_id', fail_task.task_id, 'task_status', 'queued', 'attempt', v_task.attempt,
                    'max_attempts', v_task.max_attempts, 'retry_in_seconds', v_delay,
                    'job_id', v_task.job_id,
                    'job_status', (SELECT j.status FROM stageflow.jobs AS j WHERE j.job_id = v_task.job_id));
            END IF;
        ELSE
            PERFORM stageflow._fail_task_final(fail_task.task_id, v_error);
        END IF;
    END IF;

    RETURN (SELECT jsonb_build_object(
                       'task_id', t.task_id, 'task_status', t.status, 'attempt', t.attempt,
                       'max_attempts', t.max_attempts, 'error', t.error,
                       'job_id', j.job_id, 'job_status', j.status)
              FROM stageflow.tasks AS t
              JOIN stageflow.jobs AS j ON j.job_id = t.job_id
             WHERE t.task_id = fail_task.task_id);
END;
$$;
