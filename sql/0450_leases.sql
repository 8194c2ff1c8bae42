-- Leases held by workers: extended by heartbeat, handed back by release_tasks. Both lock the
-- tasks first and decide under the lock which leases are the caller's (by lease token, or by
-- worker_id when no token is given), then move those tasks' current messages: a stale caller
-- can neither extend nor hand back a lease that is not its own.

-- The running tasks among task_ids whose lease the caller holds, locked in task_id order:
-- with lease_tokens (parallel to task_ids) the token must be the task's current one; else with
-- worker_id the holder must be that worker; with neither, any running task. Only tasks of queues
-- granted to the session's login (_check_report_grants: else 42501, nothing changed).
CREATE FUNCTION stageflow._lock_leases(p_task_ids text[], p_worker_id text, p_lease_tokens bigint[])
RETURNS SETOF stageflow.tasks
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_lease_tokens IS NOT NULL AND cardinality(p_lease_tokens) IS DISTINCT FROM cardinality(p_task_ids) THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('%s task ids but %s lease tokens', coalesce(cardinality(p_task_ids), 0), cardinality(p_lease_tokens)),
            HINT = 'pass one lease token per task id, in the same order (the lease_token claim_tasks returned)';
    END IF;
    PERFORM stageflow._check_report_grants(p_task_ids);
    RETURN QUERY
    SELECT t.* FROM stageflow.tasks AS t
      JOIN unnest(p_task_ids, coalesce(p_lease_tokens, array_fill(NULL::bigint, ARRAY[cardinality(p_task_ids)])))
           AS u(task_id, lease_token) ON u.task_id = t.task_id
     WHERE t.status = 'running'
       AND CASE WHEN p_lease_tokens IS NOT NULL THEN t.lease_token = u.lease_token
                ELSE p_worker_id IS NULL OR t.worker_id = p_worker_id END
     ORDER BY t.task_id
       FOR UPDATE OF t;
END;
$$;

-- Raises 22023 for a lease outside 1 s to 7 days (claim_tasks and heartbeat check it inline).
CREATE FUNCTION stageflow._raise_bad_lease(p_lease_seconds int)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = '22023',
        MESSAGE = format('lease_seconds must be between 1 and 604800, got %s', coalesce(p_lease_seconds::text, 'NULL')),
        HINT = 'a lease is how long a worker may hold a task before it is delivered again';
END;
$$;

-- Extends the leases of running tasks (a worker's heartbeat) to lease_seconds from now (a
-- stage's own lease_seconds wins, as in claim_tasks); their messages stay invisible as long.
-- Only the caller's leases are extended (see _lock_leases). Returns the tasks extended; a task
-- missing from the answer is no longer the caller's (completed, failed, cancelled, or claimed by
-- another worker after its lease ran out): its outcome will be refused.
CREATE FUNCTION stageflow.heartbeat(task_ids text[], lease_seconds int DEFAULT 300, worker_id text DEFAULT NULL,
                                    lease_tokens bigint[] DEFAULT NULL)
RETURNS TABLE (task_id text, lease_expires_at timestamptz)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_now   timestamptz := stageflow.now();
    v_ids   text[];
    v_exp   timestamptz[];
    r       record;
BEGIN
    IF heartbeat.lease_seconds IS NULL OR heartbeat.lease_seconds NOT BETWEEN 1 AND 604800 THEN
        PERFORM stageflow._raise_bad_lease(heartbeat.lease_seconds);
    END IF;
    -- Tasks first (locked), then their messages: the lock order of every report.
    WITH extended AS (
        UPDATE stageflow.tasks AS t
           SET lease_expires_at = v_now + make_interval(secs => coalesce(s.lease_seconds, heartbeat.lease_seconds))
          FROM stageflow.stages AS s
         WHERE t.task_id IN (SELECT l.task_id FROM stageflow._lock_leases(heartbeat.task_ids, heartbeat.worker_id,
                                                                          heartbeat.lease_tokens) AS l)
           AND s.job_id = t.job_id AND s.stage = t.stage
        RETURNING t.task_id, t.lease_expires_at
    )
    SELECT array_agg(e.task_id ORDER BY e.task_id), array_agg(e.lease_expires_at ORDER BY e.task_id)
      INTO v_ids, v_exp
      FROM extended AS e;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;
    FOR r IN
        SELECT s.queue, t.lease_expires_at, array_agg(t.msg_id ORDER BY t.msg_id) AS msg_ids
          FROM stageflow.tasks AS t
          JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
         WHERE t.task_id = ANY (v_ids)
         GROUP BY s.queue, t.lease_expires_at
         ORDER BY s.queue, t.lease_expires_at
    LOOP
        PERFORM pgmq.set_vt(r.queue, r.msg_ids, r.lease_expires_at);
    END LOOP;
    RETURN QUERY SELECT u.task_id, u.lease_expires_at FROM unnest(v_ids, v_exp) AS u(task_id, lease_expires_at);
END;
$$;

-- Hands running tasks back without an outcome (a worker shutting down): they are queued again,
-- their messages visible at once, and the attempt they were on is not counted; each release is
-- recorded as a task_released event (worker, lease token, attempt), so a claim handed back leaves
-- a trace. Only the caller's
-- leases are released (see _lock_leases). Returns the number released.
CREATE FUNCTION stageflow.release_tasks(task_ids text[], worker_id text DEFAULT NULL, lease_tokens bigint[] DEFAULT NULL)
RETURNS int
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now       timestamptz := stageflow.now();
    v_ids       text[];
    r           record;
BEGIN
    FOR r IN
        WITH mine AS (
            SELECT l.task_id, l.job_id, l.stage, l.worker_id, l.lease_token, l.attempt
              FROM stageflow._lock_leases(release_tasks.task_ids, release_tasks.worker_id, release_tasks.lease_tokens) AS l
        ), released AS (
            UPDATE stageflow.tasks AS t
               SET status = 'queued', attempt = t.attempt - 1, lease_expires_at = NULL, worker_id = NULL,
                   next_attempt_at = NULL
              FROM mine AS m
             WHERE t.task_id = m.task_id
            RETURNING m.task_id, m.job_id, m.stage, m.worker_id, m.lease_token, m.attempt
        )
        SELECT x.* FROM released AS x ORDER BY x.task_id
    LOOP
        PERFORM stageflow._emit(r.job_id, 'task_released',
                                jsonb_build_object('worker_id', r.worker_id, 'lease_token', r.lease_token, 'attempt', r.attempt),
                                r.stage, r.task_id);
        v_ids := coalesce(v_ids, '{}') || r.task_id;
    END LOOP;
    IF v_ids IS NULL THEN
        RETURN 0;
    END IF;
    FOR r IN
        SELECT s.queue, array_agg(t.msg_id ORDER BY t.msg_id) AS msg_ids
          FROM stageflow.tasks AS t
          JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
         WHERE t.task_id = ANY (v_ids)
         GROUP BY s.queue
         ORDER BY s.queue
    LOOP
        PERFORM pgmq.set_vt(r.queue, r.msg_ids, v_now);
        PERFORM pg_notify('stageflow_tasks', r.queue);
    END LOOP;
    -- They no longer run (tasks, messages, then shards: the lock order of every report).
    FOR r IN
        SELECT t.job_id, t.stage, count(*)::int AS tasks
          FROM stageflow.tasks AS t
         WHERE t.task_id = ANY (v_ids)
         GROUP BY t.job_id, t.stage
         ORDER BY t.job_id, t.stage
    LOOP
        PERFORM stageflow._leave_running(r.job_id, r.stage, r.tasks);
    END LOOP;
    RETURN cardinality(v_ids);
END;
$$;
