-- Checks a queue name the way every function taking one does: pgmq's own rules (lowercase
-- letters, digits and underscores, at most 47 characters) and that the queue exists.
CREATE FUNCTION stageflow._check_queue(p_queue text)
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_queue IS NULL OR p_queue !~ '^[a-z_][a-z0-9_]{0,46}$' THEN
        RAISE EXCEPTION USING
            ERRCODE = '42602',
            MESSAGE = format('invalid queue name %L', p_queue),
            HINT = 'queue names are 1 to 47 lowercase letters, digits or underscores, not starting with a digit';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pgmq.meta AS m WHERE m.queue_name = p_queue) THEN
        RAISE EXCEPTION USING
            ERRCODE = '42704',
            MESSAGE = format('unknown queue %L', p_queue),
            HINT = 'queues are created by stageflow.register_job_type for the stages that name them';
    END IF;
END;
$$;

-- Claims up to max_tasks tasks of a queue for lease_seconds (or the stage's own lease_seconds,
-- when its definition sets one): reads their messages with the lease as pgmq's visibility timeout
-- and marks the tasks running with attempt + 1. A task whose lease runs out without a completion
-- is delivered again by a later claim. Messages whose task can no longer run (finished, or its job
-- ended) are deleted; a task whose attempts were all spent on expired leases is dead-lettered.
--
-- Each row carries the task's params (the job's params overlaid with the task's own; for an `each`
-- stage the fanned-out array is left out), its predecessor's result (lineage), its inputs
-- (fan-in), and the stage's handler timeout in seconds (NULL when it sets none).
CREATE FUNCTION stageflow.claim_tasks(
    queue text DEFAULT 'default',
    max_tasks int DEFAULT 1,
    lease_seconds int DEFAULT 300,
    worker_id text DEFAULT NULL)
RETURNS TABLE (
    task_id text, job_id text, job_type text, stage int, stage_name text, handler text,
    task_key text, params jsonb, predecessor jsonb, inputs jsonb, attempt int,
    lease_expires_at timestamptz, timeout_seconds int)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    v_msg_ids      bigint[];
    v_task_ids     text[];
    v_claimed_ids  text[];
    v_own_lease    int[];
    v_own_msgs     bigint[];
    v_stale        text[] := '{}';
    v_stale_msgs   bigint[] := '{}';
    r              record;
BEGIN
    -- _check_queue's rules inline (this is the hot path); it raises the error when they fail.
    IF claim_tasks.queue IS NULL OR claim_tasks.queue !~ '^[a-z_][a-z0-9_]{0,46}$'
       OR NOT EXISTS (SELECT 1 FROM pgmq.meta AS q WHERE q.queue_name = claim_tasks.queue) THEN
        PERFORM stageflow._check_queue(claim_tasks.queue);
    END IF;
    IF claim_tasks.max_tasks IS NULL OR claim_tasks.max_tasks NOT BETWEEN 1 AND 10000 THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('max_tasks must be between 1 and 10000, got %s', coalesce(claim_tasks.max_tasks::text, 'NULL')),
            HINT = 'claim in batches of at most 10000 tasks';
    END IF;
    IF claim_tasks.lease_seconds IS NULL OR claim_tasks.lease_seconds NOT BETWEEN 1 AND 604800 THEN
        PERFORM stageflow._raise_bad_lease(claim_tasks.lease_seconds);
    END IF;

    -- pgmq.read's statement, with its plan kept for the session (stageflow._read_messages).
    SELECT array_agg(m.msg_id ORDER BY m.msg_id), array_agg(m.task_id ORDER BY m.msg_id)
      INTO v_msg_ids, v_task_ids
      FROM stageflow._read_messages(claim_tasks.queue, claim_tasks.lease_seconds, claim_tasks.max_tasks) AS m;
    IF v_msg_ids IS NULL THEN
        RETURN;
    END IF;

    WITH claimed AS (
        UPDATE stageflow.tasks AS t
           SET status = 'running',
               attempt = t.attempt + 1,
               lease_expires_at = stageflow.now()
                                  + make_interval(secs => coalesce(s.lease_seconds, claim_tasks.lease_seconds)),
               worker_id = claim_tasks.worker_id,
               started_at = coalesce(t.started_at, stageflow.now()),
               claimed_at = stageflow.now(),
               next_attempt_at = NULL
          FROM stageflow.jobs AS j, stageflow.stages AS s
         WHERE t.task_id = ANY (v_task_ids)
           AND j.job_id = t.job_id
           AND s.job_id = t.job_id AND s.stage = t.stage
           AND j.status IN ('queued', 'processing')
           AND t.status IN ('queued', 'running')
           AND t.attempt < t.max_attempts
        RETURNING t.task_id, t.job_id, t.msg_id, s.lease_seconds
    ), started AS (
        UPDATE stageflow.jobs AS j
           SET status = 'processing', started_at = stageflow.now(), updated_at = stageflow.now()
         WHERE j.job_id IN (SELECT c.job_id FROM claimed AS c) AND j.status = 'queued'
    )
    SELECT array_agg(c.task_id),
           array_agg(c.lease_seconds) FILTER (WHERE c.lease_seconds IS DISTINCT FROM claim_tasks.lease_seconds
                                                    AND c.lease_seconds IS NOT NULL),
           array_agg(c.msg_id) FILTER (WHERE c.lease_seconds IS DISTINCT FROM claim_tasks.lease_seconds
                                             AND c.lease_seconds IS NOT NULL)
      INTO v_claimed_ids, v_own_lease, v_own_msgs
      FROM claimed AS c;

    -- Stages with a lease of their own: their messages stay invisible that long instead.
    FOR r IN SELECT u.lease, array_agg(u.msg_id) AS msg_ids FROM unnest(v_own_lease, v_own_msgs) AS u(lease, msg_id) GROUP BY u.lease LOOP
        PERFORM pgmq.set_vt(claim_tasks.queue, r.msg_ids, clock_timestamp() + make_interval(secs => r.lease));
    END LOOP;

    RETURN QUERY
    SELECT t.task_id, t.job_id, j.job_type, t.stage, s.name, s.handler, t.task_key,
           CASE WHEN s.fan_out = 'each' THEN j.params - s.param ELSE j.params END || t.params,
           p.result, t.inputs, t.attempt, t.lease_expires_at, s.timeout_seconds
      FROM stageflow.tasks AS t
      JOIN stageflow.jobs AS j ON j.job_id = t.job_id
      JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
      LEFT JOIN stageflow.tasks AS p ON p.task_id = t.predecessor_id
     WHERE t.task_id = ANY (v_claimed_ids)
     ORDER BY t.msg_id;
    IF coalesce(cardinality(v_claimed_ids), 0) = cardinality(v_msg_ids) THEN
        RETURN;
    END IF;

    -- Messages that did not become claims (rare): a task still running whose attempts were all
    -- spent on expired leases is dead-lettered; any other (finished, or of a job that ended) has
    -- its message deleted and, if still open, is cancelled.
    FOR r IN
        SELECT u.msg_id, u.task_id, t.status, t.attempt, t.max_attempts, j.status AS job_status
          FROM unnest(v_msg_ids, v_task_ids) AS u(msg_id, task_id)
          LEFT JOIN unnest(v_claimed_ids) AS c(task_id) ON c.task_id = u.task_id
          LEFT JOIN stageflow.tasks AS t ON t.task_id = u.task_id
          LEFT JOIN stageflow.jobs AS j ON j.job_id = t.job_id
         WHERE c.task_id IS NULL
         ORDER BY u.msg_id
    LOOP
        IF r.status = 'running' AND r.job_status IN ('queued', 'processing') THEN
            PERFORM stageflow._end_task(
                r.task_id, 'dead',
                jsonb_build_object(
                    'type', 'lease_expired',
                    'message', format('the lease of attempt %s of %s expired before the task was completed',
                                      r.attempt, r.max_attempts),
                    'category', 'transient'));
        ELSE
            v_stale_msgs := v_stale_msgs || r.msg_id;
            v_stale := v_stale || r.task_id;
        END IF;
    END LOOP;
    PERFORM stageflow._delete_messages(claim_tasks.queue, v_stale_msgs);
    -- The open ones among them are cancelled, each stage's shards moved once.
    FOR r IN
        WITH cancelled AS (
            UPDATE stageflow.tasks AS t
               SET status = 'cancelled', lease_expires_at = NULL, completed_at = stageflow.now()
             WHERE t.task_id = ANY (v_stale) AND t.status IN ('queued', 'running')
            RETURNING t.job_id, t.stage, t.ordinal
        )
        SELECT c.job_id, c.stage, array_agg(c.ordinal) AS ordinals FROM cancelled AS c
         GROUP BY c.job_id, c.stage ORDER BY c.job_id, c.stage
    LOOP
        PERFORM stageflow._move_shards(r.job_id, r.stage, r.ordinals, -1);
    END LOOP;
END;
$$;
