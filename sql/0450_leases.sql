-- Extends the leases of running tasks (a worker's heartbeat): their messages stay invisible and
-- the tasks stay leased for lease_seconds from now. With worker_id, only tasks leased to that
-- worker are extended. Returns the tasks extended; a task missing from the answer is no longer
-- the caller's (completed, failed, cancelled, or delivered to another worker after its lease ran out).
-- Moves the visibility time of the messages of running tasks (only those leased to p_worker_id,
-- when given) to p_vt, queue by queue: what heartbeat and release_tasks both do before they update
-- the tasks (messages first, then tasks: the lock order of claim_tasks). Returns the queues touched.
CREATE FUNCTION stageflow._set_running_tasks_vt(p_task_ids text[], p_worker_id text, p_vt timestamptz)
RETURNS text[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_group   record;
    v_queues  text[] := '{}';
BEGIN
    FOR v_group IN
        SELECT s.queue, array_agg(t.msg_id ORDER BY t.msg_id) AS msg_ids
          FROM stageflow.tasks AS t
          JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
         WHERE t.task_id = ANY (p_task_ids) AND t.status = 'running'
           AND (p_worker_id IS NULL OR t.worker_id = p_worker_id)
         GROUP BY s.queue
         ORDER BY s.queue
    LOOP
        PERFORM pgmq.set_vt(v_group.queue, v_group.msg_ids, p_vt);
        v_queues := v_queues || v_group.queue;
    END LOOP;
    RETURN v_queues;
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

CREATE FUNCTION stageflow.heartbeat(task_ids text[], lease_seconds int DEFAULT 300, worker_id text DEFAULT NULL)
RETURNS TABLE (task_id text, lease_expires_at timestamptz)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF heartbeat.lease_seconds IS NULL OR heartbeat.lease_seconds NOT BETWEEN 1 AND 604800 THEN
        PERFORM stageflow._raise_bad_lease(heartbeat.lease_seconds);
    END IF;
    PERFORM stageflow._set_running_tasks_vt(heartbeat.task_ids, heartbeat.worker_id,
                                            clock_timestamp() + make_interval(secs => heartbeat.lease_seconds));
    RETURN QUERY
    UPDATE stageflow.tasks AS t
       SET lease_expires_at = stageflow.now() + make_interval(secs => heartbeat.lease_seconds)
     WHERE t.task_id = ANY (heartbeat.task_ids) AND t.status = 'running'
       AND (heartbeat.worker_id IS NULL OR t.worker_id = heartbeat.worker_id)
    RETURNING t.task_id, t.lease_expires_at;
END;
$$;

-- Hands running tasks back without an outcome (a worker shutting down): their messages become
-- visible at once and the attempt they were on is not counted. With worker_id, only tasks leased
-- to that worker are released. Returns the number released.
CREATE FUNCTION stageflow.release_tasks(task_ids text[], worker_id text DEFAULT NULL)
RETURNS int
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_queues    text[];
    v_released  int;
BEGIN
    v_queues := stageflow._set_running_tasks_vt(release_tasks.task_ids, release_tasks.worker_id, clock_timestamp());
    UPDATE stageflow.tasks AS t
       SET status = 'queued', attempt = t.attempt - 1, lease_expires_at = NULL, worker_id = NULL
     WHERE t.task_id = ANY (release_tasks.task_ids) AND t.status = 'running'
       AND (release_tasks.worker_id IS NULL OR t.worker_id = release_tasks.worker_id);
    GET DIAGNOSTICS v_released = ROW_COUNT;
    IF v_released > 0 THEN
        PERFORM pg_notify('stageflow_tasks', q.queue) FROM unnest(v_queues) AS q(queue);
    END IF;
    RETURN v_released;
END;
$$;
