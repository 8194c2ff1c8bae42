-- Metrics: what `GET /metrics` exports, one row per Prometheus sample (metric name, labels, value),
-- read from pgmq and from the stage counters (stages, stage_shards). Tasks are counted only
-- through the partial indexes of running tasks and of dead letters: no scan of all tasks. Each
-- metric's rows come in the order they are exported (by queue, status or handler name); the
-- HTTP server adds the HELP and TYPE lines and the escaping.
CREATE FUNCTION stageflow.metrics()
RETURNS TABLE (metric text, labels jsonb, value double precision)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_open bigint;
    v_completed bigint;
    v_failed bigint;
    v_cancelled bigint;
    v_running bigint;
    v_dead bigint;
BEGIN
    -- Messages in each queue, and those claimable now.
    RETURN QUERY
    SELECT m.metric, jsonb_build_object('queue', q.queue_name), m.value
      FROM pgmq.metrics_all() AS q
     CROSS JOIN LATERAL (VALUES (1, 'stageflow_queue_depth', q.queue_length::float8),
                                (2, 'stageflow_queue_depth_visible', q.queue_visible_length::float8)) AS m(n, metric, value)
     ORDER BY q.queue_name, m.n;
    -- Tasks of big stages whose messages are still to be sent (stageflow.message_windows): work a
    -- queue's depth does not show yet.
    RETURN QUERY
    SELECT 'stageflow_tasks_unsent', jsonb_build_object('queue', w.queue), sum(w.task_count - w.next_ordinal)::float8
      FROM stageflow.message_windows AS w
     GROUP BY w.queue
     ORDER BY w.queue;

    RETURN QUERY
    SELECT 'stageflow_jobs', jsonb_build_object('status', j.status), count(*)::float8
      FROM stageflow.jobs AS j
     GROUP BY j.status
     ORDER BY j.status;

    -- Tasks by status from the stage counters: open (queued or running), running, completed,
    -- failed; the rest of a stage's tasks were cancelled.
    SELECT coalesce(sum(c.remaining_tasks), 0)::bigint,
           coalesce(sum(c.running_tasks), 0)::bigint,
           coalesce(sum(c.completed_count), 0)::bigint,
           coalesce(sum(s.failed_count), 0)::bigint,
           coalesce(sum(s.task_count - c.completed_count - s.failed_count - c.remaining_tasks), 0)::bigint
      INTO v_open, v_running, v_completed, v_failed, v_cancelled
      FROM stageflow.stages AS s
      JOIN stageflow.stage_counts AS c ON c.job_id = s.job_id AND c.stage = s.stage;
    -- failed_at: set exactly when a task ends failed or dead (tasks_dead_letter_idx)
    -- (not those of jobs retention has deleted and is draining: dead_letters() lists them no more)
    SELECT count(*) INTO v_dead FROM stageflow.tasks AS t
     WHERE t.failed_at IS NOT NULL AND NOT EXISTS (SELECT 1 FROM stageflow.deleted_jobs AS d WHERE d.job_id = t.job_id);
    RETURN QUERY
    SELECT 'stageflow_tasks', jsonb_build_object('status', t.status), t.value::float8
      FROM (VALUES (1, 'queued', v_open - v_running), (2, 'running', v_running), (3, 'completed', v_completed),
                   (4, 'failed', v_failed), (5, 'cancelled', v_cancelled)) AS t(n, status, value)
     ORDER BY t.n;
    -- Tasks that ended without a result.
    RETURN QUERY
    SELECT 'stageflow_dead_letters', '{}'::jsonb, v_dead::float8;

    -- Per handler: completed and failed tasks, and the claim-to-completion seconds of the completed
    -- ones (a summary's sum and count), one metric after the other.
    RETURN QUERY
    SELECT m.metric, jsonb_build_object('handler', h.handler) || m.labels, m.value
      FROM (SELECT s.handler,
                   sum(c.completed_count)::float8 AS completed,
                   sum(s.failed_count)::float8 AS failed,
                   sum(c.completed_seconds) AS seconds
              FROM stageflow.stages AS s
              JOIN stageflow.stage_counts AS c ON c.job_id = s.job_id AND c.stage = s.stage
             GROUP BY s.handler) AS h
     CROSS JOIN LATERAL (VALUES (1, 1, 'stageflow_handler_tasks_total', '{"outcome": "completed"}'::jsonb, h.completed),
                                (1, 2, 'stageflow_handler_tasks_total', '{"outcome": "failed"}'::jsonb, h.failed),
                                (2, 1, 'stageflow_task_duration_seconds_sum', '{}'::jsonb, h.seconds),
                                (2, 2, 'stageflow_task_duration_seconds_count', '{}'::jsonb, h.completed))
                         AS m(family, n, metric, labels, value)
     ORDER BY m.family, h.handler, m.n;

    RETURN QUERY
    SELECT 'stageflow_webhook_deliveries', jsonb_build_object('status', d.status), count(*)::float8
      FROM stageflow.webhook_deliveries AS d
     GROUP BY d.status
     ORDER BY d.status;
END;
$$;
