-- One round of maintenance, run by the background worker every stageflow.maintenance_interval
-- (or by hand, or from a test with stageflow.fake_now set). Each step is bounded by max_rows:
--   * retries whose backoff is over (by the engine's clock) become visible now;
--   * expired leases: tasks with attempts left become visible for redelivery, tasks without are
--     dead-lettered;
--   * jobs past their deadline (the job type's timeout_seconds) fail with a job_timeout error;
--   * finished jobs older than stageflow.retention (an interval, default 7 days; 0 keeps them)
--     are deleted with their stages, tasks and events.
-- Returns what it did; an error in a round is caught, logged as a WARNING and returned as
-- {"error": ...} (with whatever the round had done rolled back), so the caller can go on.
CREATE FUNCTION stageflow.run_maintenance(max_rows int DEFAULT 1000)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now        timestamptz := stageflow.now();
    v_released   int := 0;
    v_redeliver  int := 0;
    v_dead       int := 0;
    v_timed_out  int := 0;
    v_deleted    int := 0;
    v_retention  interval;
    v_error_message text;
    v_error_state   text;
    r            record;
BEGIN
    -- Due retries and expired leases with attempts left: make their messages visible now.
    FOR r IN
        SELECT s.queue, array_agg(t.msg_id) AS msg_ids,
               count(*) FILTER (WHERE t.status = 'queued') AS retries,
               count(*) FILTER (WHERE t.status = 'running') AS expired
          FROM (SELECT d.job_id, d.stage, d.msg_id, d.status FROM stageflow.tasks AS d
                 WHERE d.status = 'queued' AND d.next_attempt_at <= v_now
                 ORDER BY d.next_attempt_at LIMIT max_rows) AS t
          JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
         GROUP BY s.queue
        UNION ALL
        SELECT s.queue, array_agg(t.msg_id), 0, count(*)
          FROM (SELECT d.job_id, d.stage, d.msg_id FROM stageflow.tasks AS d
                 WHERE d.status = 'running' AND d.lease_expires_at <= v_now AND d.attempt < d.max_attempts
                 ORDER BY d.lease_expires_at LIMIT max_rows) AS t
          JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
         GROUP BY s.queue
    LOOP
        PERFORM pgmq.set_vt(r.queue, r.msg_ids, clock_timestamp());
        v_released := v_released + r.retries;
        v_redeliver := v_redeliver + r.expired;
        PERFORM pg_notify('stageflow_tasks', r.queue);
    END LOOP;
    UPDATE stageflow.tasks AS t SET next_attempt_at = NULL
     WHERE t.task_id IN (SELECT d.task_id FROM stageflow.tasks AS d
                          WHERE d.status = 'queued' AND d.next_attempt_at <= v_now
                          ORDER BY d.next_attempt_at LIMIT max_rows);

    -- Expired leases without attempts left: dead letters. Their messages are locked first, per
    -- queue in msg_id order: a completion takes a message before its task and its shard, so
    -- ending these tasks one by one must not wait for the next one's message while holding the
    -- shards of the one before.
    FOR r IN
        SELECT s.queue, array_agg(d.msg_id ORDER BY d.msg_id) AS msg_ids
          FROM (SELECT t.job_id, t.stage, t.msg_id FROM stageflow.tasks AS t
                 WHERE t.status = 'running' AND t.lease_expires_at <= v_now AND t.attempt >= t.max_attempts
                 ORDER BY t.lease_expires_at LIMIT max_rows) AS d
          JOIN stageflow.stages AS s ON s.job_id = d.job_id AND s.stage = d.stage
         GROUP BY s.queue
         ORDER BY s.queue
    LOOP
        EXECUTE format('SELECT count(*) FROM (SELECT 1 FROM pgmq.%I AS q WHERE q.msg_id = ANY ($1) '
                       'ORDER BY q.msg_id FOR UPDATE) AS locked', pgmq.format_table_name(r.queue, 'q'))
        USING r.msg_ids;
    END LOOP;
    FOR r IN
        SELECT d.task_id, d.attempt, d.max_attempts FROM stageflow.tasks AS d
         WHERE d.status = 'running' AND d.lease_expires_at <= v_now AND d.attempt >= d.max_attempts
         ORDER BY d.lease_expires_at LIMIT max_rows
    LOOP
        IF stageflow._end_task(r.task_id, 'dead', jsonb_build_object(
               'type', 'lease_expired', 'category', 'transient',
               'message', format('the lease of attempt %s of %s expired before the task was completed',
                                 r.attempt, r.max_attempts))) THEN
            v_dead := v_dead + 1;
        END IF;
    END LOOP;

    -- Jobs past their deadline.
    FOR r IN
        SELECT j.job_id, j.deadline_at, j.created_at FROM stageflow.jobs AS j
         WHERE j.status IN ('queued', 'processing') AND j.deadline_at <= v_now
         ORDER BY j.deadline_at LIMIT max_rows
    LOOP
        IF stageflow._end_job(r.job_id, 'failed', jsonb_build_object(
               'type', 'job_timeout',
               'message', format('the job ran past its deadline %s (timeout_seconds %s)', r.deadline_at,
                                 extract(epoch FROM r.deadline_at - r.created_at)))) THEN
            v_timed_out := v_timed_out + 1;
        END IF;
    END LOOP;

    -- Retention.
    -- Unset (the library not loaded in this session) means the default, 7 days; '' or 0 means forever.
    v_retention := nullif(nullif(coalesce(current_setting('stageflow.retention', true), '7 days'), ''), '0')::interval;
    IF v_retention IS NOT NULL THEN
        WITH old AS (
            SELECT j.job_id FROM stageflow.jobs AS j
             WHERE j.completed_at < v_now - v_retention
               AND j.status IN ('completed', 'completed_with_errors', 'failed', 'cancelled')
             ORDER BY j.completed_at LIMIT max_rows
        ), tasks_gone AS (
            DELETE FROM stageflow.tasks AS t USING old WHERE t.job_id = old.job_id
        ), events_gone AS (
            DELETE FROM stageflow.events AS e USING old WHERE e.job_id = old.job_id
        ), jobs_gone AS (
            DELETE FROM stageflow.jobs AS j USING old WHERE j.job_id = old.job_id RETURNING 1
        )
        SELECT count(*) INTO v_deleted FROM jobs_gone;
    END IF;

    RETURN jsonb_build_object(
        'retries_released', v_released, 'leases_expired', v_redeliver, 'dead_lettered', v_dead,
        'jobs_timed_out', v_timed_out, 'jobs_deleted', v_deleted);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_error_message = MESSAGE_TEXT, v_error_state = RETURNED_SQLSTATE;
    RAISE WARNING 'stageflow.run_maintenance: % (SQLSTATE %)', v_error_message, v_error_state;
    RETURN jsonb_build_object('error', jsonb_build_object('message', v_error_message, 'sqlstate', v_error_state));
END;
$$;
