-- Recent jobs, newest first, optionally of one status (filter_status) and/or job type (filter_type); page with `before` (the
-- created_at of the last job of the previous page). Progress as in job_status, from the current
-- stage's counters. The session's own jobs (of its tenant, when it names one); every job for a
-- superuser or stageflow_admin member naming no tenant.
CREATE FUNCTION stageflow.list_jobs(
    filter_status text DEFAULT NULL,
    filter_type text DEFAULT NULL,
    max_rows int DEFAULT 50,
    before timestamptz DEFAULT NULL)
RETURNS TABLE (
    job_id text, job_type text, status text, current_stage int, total_stages int,
    current_stage_name text, progress numeric, created_at timestamptz, updated_at timestamptz,
    completed_at timestamptz, owner name, tenant text)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_tenant  text := stageflow._tenant();
    v_all     boolean := v_tenant IS NULL AND stageflow._session_is_admin();
BEGIN
    IF list_jobs.filter_status IS NOT NULL
       AND NOT (stageflow._job_is_open(list_jobs.filter_status) OR stageflow._job_has_ended(list_jobs.filter_status)) THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('unknown job status %L', list_jobs.filter_status),
            HINT = 'job statuses are queued, processing, completed, completed_with_errors, failed and cancelled';
    END IF;
    IF list_jobs.max_rows IS NULL OR list_jobs.max_rows NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('max_rows must be between 1 and 1000, got %s', coalesce(list_jobs.max_rows::text, 'NULL')),
            HINT = 'page through more jobs with `before`';
    END IF;
    RETURN QUERY
    SELECT j.job_id, j.job_type, j.status, j.current_stage, j.total_stages, s.name,
           CASE WHEN stageflow._job_is_done(j.status) THEN 100::numeric
                ELSE round(100 * ((j.current_stage - 1)
                                  + CASE WHEN s.status = 'completed' THEN 1
                                         WHEN s.task_count > 0 THEN c.completed_count::numeric / s.task_count
                                         ELSE 0 END) / j.total_stages, 1) END,
           j.created_at, j.updated_at, j.completed_at, j.owner, j.tenant
      FROM stageflow.jobs AS j
      LEFT JOIN stageflow.stages AS s ON s.job_id = j.job_id AND s.stage = j.current_stage
      LEFT JOIN LATERAL (SELECT sum(sh.completed_count) AS completed_count FROM stageflow.stage_shards AS sh
                          WHERE sh.job_id = s.job_id AND sh.stage = s.stage) AS c ON true
     WHERE (v_all OR (j.owner = session_user AND (v_tenant IS NULL OR j.tenant = v_tenant)))
       AND (list_jobs.filter_status IS NULL OR j.status = list_jobs.filter_status)
       AND (list_jobs.filter_type IS NULL OR j.job_type = list_jobs.filter_type)
       AND (list_jobs.before IS NULL OR j.created_at < list_jobs.before)
     ORDER BY j.created_at DESC, j.job_id
     LIMIT list_jobs.max_rows;
END;
$$;
