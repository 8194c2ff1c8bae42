-- Cancels a job: its queued tasks are removed (messages deleted), running ones are cancelled so
-- their completions are refused, and the job ends `cancelled`. Cancelling a job that already
-- ended changes nothing and reports its status. Only for those who see the job (as job_status).
CREATE FUNCTION stageflow.cancel_job(job_id text)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_status    text;
    v_changed   boolean;
BEGIN
    v_status := (stageflow._visible_job(cancel_job.job_id)).status;
    v_changed := stageflow._job_is_open(v_status)
                 AND stageflow._end_job(cancel_job.job_id, 'cancelled',
                                        jsonb_build_object('message', 'cancelled by stageflow.cancel_job'));
    RETURN jsonb_build_object(
        'job_id', cancel_job.job_id,
        'cancelled', v_changed,
        'job_status', (SELECT j.status FROM stageflow.jobs AS j WHERE j.job_id = cancel_job.job_id));
END;
$$;

-- Makes a job and its current stage open again after a retry (the caller holds the stage's
-- shards and row): the job is processing with no error, its deadline starts over (now + the job
-- type's timeout_seconds), and job_retried is emitted.
CREATE FUNCTION stageflow._reopen_job(p_job_id text, p_stage int, p_retried int)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE stageflow.stages AS s
       SET status = 'active', completed_at = NULL
     WHERE s.job_id = p_job_id AND s.stage = p_stage;
    UPDATE stageflow.jobs AS j
       SET status = 'processing', error = NULL, completed_at = NULL, updated_at = stageflow.now(),
           deadline_at = stageflow.now() + make_interval(secs => (j.definition ->> 'timeout_seconds')::numeric)
     WHERE j.job_id = p_job_id;
    PERFORM stageflow._emit(p_job_id, 'job_retried', jsonb_build_object('stage', p_stage, 'retried_tasks', p_retried), p_stage);
END;
$$;

-- Resumes a job from the stage it stopped at: the stage's failed, dead and cancelled tasks (and a
-- task still running in the ended job: one a claim held while the job ended, whose report would
-- be refused once it is queued again) are queued again with fresh attempts and new messages, the
-- job is processing again and its deadline starts over (now + the job type's timeout_seconds). An
-- ended job whose stage has nothing left to retry (its last report landed as it ended) is resumed
-- by advancing it. A job with nothing to retry (running fine, or completed) is left as it is.
-- Returns the number of tasks re-queued.
-- Lock order as every completion's, tasks before shards before stage before job (but for a KEY
-- SHARE lock of the job row first, which only retention's delete waits for): the tasks to
-- retry that have ended (failed, dead or cancelled: a batch of completions holds such a task, a
-- stale report it refuses, while it waits for the stage's shards), then the current stage's
-- shards and row (_lock_current_stage: a completion emptying the stage finishes first, and if it
-- advanced the job, the new current stage is taken instead), then the tasks that ended meanwhile
-- without waiting (one held: every task and shard this took is rolled back, and it starts over,
-- waiting for that task first: retry_job_racing_a_batch_with_a_stale_report,
-- retry_job_racing_a_batch_holding_a_task_just_ended), running ones only if no one holds them,
-- the job row last.
-- An admin's call (stageflow.retry_job). An owner's resubmission of an ended job
-- (p_resubmission, from submit_job_outcome) resumes only a job that is still failed or cancelled
-- once its stage is locked (the submission then checks the owner's open-task quota), and gets
-- NULL for a job retention deleted since the submission read it (the submission makes it anew).
CREATE FUNCTION stageflow.retry_job(job_id text)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN stageflow._retry_job(retry_job.job_id, false);
END;
$$;

CREATE FUNCTION stageflow._retry_job(p_job_id text, p_resubmission boolean)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job      stageflow.jobs;
    v_stage    stageflow.stages;
    v_ids      text[];
    v_reopened int;
    v_running  text[];
    v_old_msgs bigint[];
    v_stopped  int;
    v_failed   int;
    v_advance  jsonb;
    v_at       int;
    v_nowait   boolean;
BEGIN
    -- (KEY SHARE: retention, which deletes a finished job's row before its stages and tasks, skips
    -- a job being retried; an UPDATE of the row, advance_stage's lock, does not wait for it)
    PERFORM 1 FROM stageflow.jobs AS j WHERE j.job_id = p_job_id FOR KEY SHARE;
    IF NOT FOUND AND p_resubmission THEN
        RETURN NULL;
    ELSIF NOT FOUND THEN
        PERFORM stageflow._raise_unknown('job', p_job_id);
    END IF;
    -- Each round in a subtransaction: one that finds an ended task held gives back every task and
    -- shard it took, and the next round waits for that task holding nothing but the job's KEY
    -- SHARE. Only the NOWAIT is caught (a lock_timeout of a waiting lock is the caller's error).
    LOOP
        v_nowait := false;
        BEGIN
            SELECT j.current_stage INTO STRICT v_at FROM stageflow.jobs AS j WHERE j.job_id = p_job_id;
            PERFORM 1 FROM stageflow.tasks AS t
             WHERE stageflow._is_task_of_job(t.job_id, p_job_id) AND t.stage = v_at
               AND stageflow._task_ended_without_result(t.status)
             ORDER BY t.task_id
               FOR UPDATE;
            v_at := stageflow._lock_current_stage(p_job_id);
            v_nowait := true;
            PERFORM 1 FROM stageflow.tasks AS t
             WHERE stageflow._is_task_of_job(t.job_id, p_job_id) AND t.stage = v_at
               AND stageflow._task_ended_without_result(t.status)
             ORDER BY t.task_id
               FOR UPDATE NOWAIT;
            EXIT;
        EXCEPTION WHEN lock_not_available THEN
            IF NOT v_nowait THEN
                RAISE;
            END IF;
        END;
    END LOOP;
    SELECT * INTO STRICT v_job FROM stageflow.jobs AS j WHERE j.job_id = p_job_id;
    IF stageflow._job_is_done(v_job.status)
       OR (p_resubmission AND NOT stageflow._job_is_stopped(v_job.status)) THEN
        RETURN jsonb_build_object('job_id', v_job.job_id, 'retried_tasks', 0, 'job_status', v_job.status);
    END IF;
    SELECT * INTO STRICT v_stage FROM stageflow.stages AS s
     WHERE s.job_id = v_job.job_id AND s.stage = v_job.current_stage;

    -- The tasks to run again (those that ended are locked above), read as they are now.
    IF stageflow._job_is_stopped(v_job.status) THEN
        v_running := ARRAY(SELECT t.task_id FROM stageflow.tasks AS t
                            WHERE stageflow._is_task_of_job(t.job_id, v_job.job_id)
                              AND t.stage = v_job.current_stage AND t.status = 'running'
                            ORDER BY t.task_id
                              FOR UPDATE SKIP LOCKED);
    END IF;
    SELECT array_agg(t.task_id ORDER BY t.ordinal),
           (count(*) FILTER (WHERE t.status <> 'running'))::int,
           array_agg(t.msg_id) FILTER (WHERE t.status = 'running'),
           (count(*) FILTER (WHERE t.status = 'running'))::int,
           (count(*) FILTER (WHERE stageflow._task_has_failed(t.status)))::int
      INTO v_ids, v_reopened, v_old_msgs, v_stopped, v_failed
      FROM stageflow.tasks AS t
     WHERE stageflow._is_task_of_job(t.job_id, v_job.job_id) AND t.stage = v_job.current_stage
       AND (stageflow._task_ended_without_result(t.status) OR t.task_id = ANY (coalesce(v_running, '{}')));
    IF v_ids IS NULL THEN
        IF stageflow._job_is_stopped(v_job.status) AND v_stage.open_shards = 0 THEN
            -- Nothing to retry, nothing open: the stage's last report landed as the job ended.
            PERFORM stageflow._reopen_job(v_job.job_id, v_job.current_stage, 0);
            v_advance := stageflow.advance_stage(v_job.job_id);
            RETURN jsonb_build_object('job_id', v_job.job_id, 'retried_tasks', 0, 'job_status', v_advance ->> 'job_status');
        END IF;
        RETURN jsonb_build_object('job_id', v_job.job_id, 'retried_tasks', 0, 'job_status', v_job.status);
    END IF;

    -- New messages, matched to the tasks by msg_id order as in _create_stage_tasks; the old
    -- messages of tasks that were still running go, but for one a claim holds (that claim may be
    -- waiting for the shards this holds: retry_job_racing_a_claim_of_leftovers); a later claim
    -- that reads it deletes it, as no longer its task's current message.
    IF v_old_msgs IS NOT NULL THEN
        PERFORM stageflow._delete_free_messages(v_stage.queue, v_old_msgs);
    END IF;
    UPDATE stageflow.tasks AS t
       SET status = 'queued', attempt = 0, msg_id = m.msg_id, error = NULL, worker_id = NULL,
           lease_expires_at = NULL, next_attempt_at = NULL, completed_at = NULL, failed_at = NULL
      FROM unnest(v_ids) WITH ORDINALITY AS u(task_id, n)
      JOIN (SELECT s.msg_id, row_number() OVER (ORDER BY s.msg_id) AS n
              FROM pgmq.send_batch(v_stage.queue,
                                   ARRAY(SELECT jsonb_build_object('task_id', i.task_id)
                                           FROM unnest(v_ids) WITH ORDINALITY AS i(task_id, n) ORDER BY i.n)) AS s(msg_id)) AS m
        ON m.n = u.n
     WHERE t.task_id = u.task_id;
    -- (a stopped job's open tasks were all cancelled: every one has a message now, and a big
    -- stage's window has none left to send)
    IF stageflow._job_is_stopped(v_job.status) THEN
        PERFORM stageflow._drop_message_windows(v_job.job_id);
    END IF;

    -- Tasks that had ended are open again on the shards; a running one never left the shards' open
    -- count, and stops running (queued again).
    IF v_reopened > 0 THEN
        PERFORM stageflow._move_shards(v_job.job_id, v_job.current_stage, v_reopened, 1, -v_failed);
    END IF;
    IF v_stopped > 0 THEN
        PERFORM stageflow._leave_running(v_job.job_id, v_job.current_stage, v_stopped);
    END IF;
    PERFORM stageflow._reopen_job(v_job.job_id, v_job.current_stage, cardinality(v_ids));
    PERFORM pg_notify('stageflow_tasks', v_stage.queue);
    RETURN jsonb_build_object('job_id', v_job.job_id, 'retried_tasks', cardinality(v_ids), 'job_status', 'processing');
END;
$$;

-- Dead letters: tasks that ended without a result, newest first: `dead` (attempts ran out,
-- including on expired leases) and `failed` (a permanent error). stageflow.retry_job runs them
-- again.
CREATE FUNCTION stageflow.dead_letters(max_rows int DEFAULT 100)
RETURNS TABLE (
    task_id text, job_id text, job_type text, stage int, stage_name text, handler text, task_key text,
    status text, attempt int, max_attempts int, error jsonb, errors jsonb, failed_at timestamptz)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF dead_letters.max_rows IS NULL OR dead_letters.max_rows NOT BETWEEN 1 AND 10000 THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('max_rows must be between 1 and 10000, got %s', coalesce(dead_letters.max_rows::text, 'NULL')),
            HINT = 'list dead letters in pages of at most 10000';
    END IF;
    RETURN QUERY
    SELECT t.task_id, t.job_id, j.job_type, t.stage, s.name, s.handler, t.task_key, t.status::text, t.attempt,
           t.max_attempts, t.error, t.errors, t.completed_at
      FROM stageflow.tasks AS t
      JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
      JOIN stageflow.jobs AS j ON j.job_id = t.job_id
     -- failed_at: set exactly when a task ends failed or dead (tasks_dead_letter_idx)
     WHERE t.failed_at IS NOT NULL
     ORDER BY t.failed_at DESC
     LIMIT dead_letters.max_rows;
END;
$$;
