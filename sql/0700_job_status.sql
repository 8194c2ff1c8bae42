-- A job's state: status, stages with task counts by status, progress, timestamps, result, error,
-- and who submitted it (owner, tenant), for the job's owner and stageflow_admin (_visible_job):
-- another login's job is an unknown one. stageflow._job_status answers for the engine itself (the
-- webhook payload, written in whichever transaction ended the job).
CREATE FUNCTION stageflow.job_status(job_id text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN stageflow._job_status(stageflow._visible_job(job_status.job_id));
END;
$$;

-- The status of a job row its caller read: reads its stage rows and their shards (counters, running
-- tasks included), never its tasks, so it answers as fast for 100,000 tasks as for 3.
--
-- progress = 100 * (completed stages + completed fraction of the current stage) / total stages.
CREATE FUNCTION stageflow._job_status(p_job stageflow.jobs)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_stages  jsonb;
    v_done    numeric;
BEGIN

    SELECT jsonb_agg(jsonb_build_object(
               'stage', d.n,
               'name', d.def ->> 'name',
               'handler', d.def ->> 'handler',
               'fan_out', d.def ->> 'fan_out',
               'status', coalesce(s.status, 'pending'),
               'task_count', s.task_count,
               'tasks', CASE WHEN s.stage IS NOT NULL THEN jsonb_build_object(
                   'queued', c.remaining_tasks - c.running_tasks,
                   'running', c.running_tasks,
                   'completed', c.completed_count,
                   'failed', s.failed_count,
                   'cancelled', s.task_count - c.completed_count - s.failed_count - c.remaining_tasks) END,
               'created_at', s.created_at,
               'completed_at', s.completed_at) ORDER BY d.n),
           sum(CASE WHEN s.status = 'completed' THEN 1
                    WHEN s.task_count > 0 THEN c.completed_count::numeric / s.task_count
                    ELSE 0 END)
      INTO v_stages, v_done
      FROM jsonb_array_elements(p_job.definition -> 'stages') WITH ORDINALITY AS d(def, n)
      LEFT JOIN stageflow.stages AS s ON s.job_id = p_job.job_id AND s.stage = d.n
      LEFT JOIN stageflow.stage_counts AS c ON c.job_id = p_job.job_id AND c.stage = d.n;

    RETURN jsonb_build_object(
        'job_id', p_job.job_id,
        'job_type', p_job.job_type,
        'status', p_job.status,
        'params', p_job.params,
        'current_stage', p_job.current_stage,
        'total_stages', p_job.total_stages,
        'progress', CASE WHEN stageflow._job_is_done(p_job.status) THEN 100
                         ELSE round(100 * v_done / p_job.total_stages, 1) END,
        'stages', v_stages,
        'created_at', p_job.created_at,
        'started_at', p_job.started_at,
        'updated_at', p_job.updated_at,
        'completed_at', p_job.completed_at,
        'result', p_job.result,
        'error', p_job.error,
        'owner', p_job.owner,
        'tenant', p_job.tenant);
END;
$$;

-- A job's tasks in stage and task order, with status, attempts, result and errors (for those who
-- see the job, as job_status).
CREATE FUNCTION stageflow.job_tasks(job_id text)
RETURNS TABLE (
    task_id text, stage int, stage_name text, task_key text, status text, attempt int,
    max_attempts int, worker_id text, params jsonb, predecessor_id text, result jsonb, error jsonb,
    errors jsonb, created_at timestamptz, started_at timestamptz, completed_at timestamptz,
    lease_expires_at timestamptz, next_attempt_at timestamptz)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM stageflow._visible_job(job_tasks.job_id);
    RETURN QUERY
    SELECT t.task_id, t.stage, s.name, t.task_key, t.status, t.attempt, t.max_attempts, t.worker_id,
           t.params, t.predecessor_id, t.result, t.error, t.errors, t.created_at, t.started_at,
           t.completed_at, t.lease_expires_at, t.next_attempt_at
      FROM stageflow.tasks AS t
      JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
     WHERE t.job_id = job_tasks.job_id
     ORDER BY t.stage, t.ordinal;
END;
$$;
