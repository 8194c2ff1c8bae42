-- Whether a last stage of this fan-out gives the job a one-task result (its task of ordinal 0,
-- whatever became of it) rather than the results of its completed tasks: the one rule of what a
-- job's result holds (job_result reads it, job_status counts it).
CREATE FUNCTION stageflow._result_is_one_task(p_fan_out text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p_fan_out IN ('single', 'fan_in')
$$;

-- A job's state: status, stages with task counts by status, progress, timestamps, how many entries
-- its result has (result_count; the result itself is read a page at a time with job_result), error,
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
-- result_count = the number of entries job_result pages over, from the last stage's counters: NULL
-- until the job is completed (with errors or not), as job_result answers only then.
CREATE FUNCTION stageflow._job_status(p_job stageflow.jobs)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_stages  jsonb;
    v_done    numeric;
    v_count   int;
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
                    ELSE 0 END),
           max(CASE WHEN d.n = p_job.total_stages AND stageflow._job_is_done(p_job.status) THEN
                    CASE WHEN stageflow._result_is_one_task(s.fan_out) THEN least(s.task_count, 1)
                         ELSE coalesce(c.completed_count, 0) END END)
      INTO v_stages, v_done, v_count
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
        'result_count', v_count,
        'error', p_job.error,
        'owner', p_job.owner,
        'tenant', p_job.tenant);
END;
$$;

-- A job's tasks in stage and task order, with status, attempts, result and errors (for those who
-- see the job, as job_status). A page at a time when asked: the tasks after the task after_task
-- (the last task_id of the previous page; NULL: from the first), at most max_rows (1 to 10000;
-- NULL: all of them). A page reads its tasks through tasks_stage_idx from the cursor on, never the
-- job's other tasks. (Bitmap scans and sorts are off here and in job_result: the index's hash of
-- the job id and the id itself are one condition, but the planner multiplies their selectivities,
-- and a page of a 20,000-task job among 420,000 tasks was estimated at 44 rows and read all
-- 20,000 through a bitmap and a sort, where the index read in order stops after the page.)
CREATE FUNCTION stageflow.job_tasks(job_id text, after_task text DEFAULT NULL, max_rows int DEFAULT NULL)
RETURNS TABLE (
    task_id text, stage int, stage_name text, task_key text, status text, attempt int,
    max_attempts int, worker_id text, params jsonb, predecessor_id text, result jsonb, error jsonb,
    errors jsonb, created_at timestamptz, started_at timestamptz, completed_at timestamptz,
    lease_expires_at timestamptz, next_attempt_at timestamptz)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET enable_bitmapscan = off
SET enable_sort = off
AS $$
#variable_conflict use_column
DECLARE
    v_stage    int;
    v_ordinal  int;
BEGIN
    PERFORM stageflow._visible_job(job_tasks.job_id);
    IF job_tasks.max_rows IS NOT NULL AND job_tasks.max_rows NOT BETWEEN 1 AND 10000 THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('max_rows must be between 1 and 10000, got %s', job_tasks.max_rows),
            HINT = 'read a large job''s tasks a page at a time: pass the last task_id of a page as after_task';
    END IF;
    IF job_tasks.after_task IS NOT NULL THEN
        SELECT t.stage, t.ordinal INTO v_stage, v_ordinal
          FROM stageflow.tasks AS t
         WHERE t.task_id = job_tasks.after_task AND t.job_id = job_tasks.job_id;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING
                ERRCODE = '22023',
                MESSAGE = format('after_task %L is not a task of job %s', job_tasks.after_task, job_tasks.job_id),
                HINT = 'pass the task_id of the last row of the previous page (NULL for the first page)';
        END IF;
    END IF;
    -- (from the first task, the cursor is before every task: stages start at 1, ordinals at 0;
    -- one statement either way, an index range on (job, stage, ordinal) from the cursor on)
    RETURN QUERY
    SELECT t.task_id, t.stage, s.name, t.task_key, t.status::text, t.attempt, t.max_attempts, t.worker_id,
           stageflow._task_params(s.fan_out, t.ordinal, t.params), t.predecessor_id, t.result, t.error, t.errors,
           t.created_at, t.started_at,
           t.completed_at, t.lease_expires_at, t.next_attempt_at
      FROM stageflow.tasks AS t
      JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
     WHERE stageflow._is_task_of_job(t.job_id, job_tasks.job_id)
       AND (t.stage, t.ordinal) > (coalesce(v_stage, 0), coalesce(v_ordinal, -1))
     ORDER BY t.stage, t.ordinal
     LIMIT job_tasks.max_rows;
END;
$$;

-- A job's result, a page at a time, for those who see the job (as job_status): the entries of the
-- job's last stage in task order, after the task ordinal `after` (NULL: from the first), at most
-- `limit` (1 to 10000) of them, as
--   {"job_id", "status", "fan_out", "entries": [{"ordinal", "task_key", "task_id", "result"}, ...],
--    "next_after"}
-- next_after is the `after` of the next page, NULL on the last one. The entries are the last
-- stage's completed tasks (a completed_with_errors job: only those, as its failed ones have no
-- result); a `single` or `fan_in` last stage (the last stage's fan_out says which) has one entry,
-- its task, whose result is the job's result. Only a job that is completed (with errors or not)
-- has a result: any other is refused with 55000 (job_status says where it is; a failed job's error
-- says why). Reads the last stage's tasks through tasks_stage_idx from `after` on, at most limit + 1
-- of them: never all of a job's tasks.
CREATE FUNCTION stageflow.job_result(job_id text, after int DEFAULT NULL, "limit" int DEFAULT 1000)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET enable_bitmapscan = off
SET enable_sort = off
AS $$
DECLARE
    v_job      stageflow.jobs;
    v_fan_out  text;
    v_one      boolean;
    v_entries  jsonb;
    v_rows     bigint;
    v_last     int;
BEGIN
    -- plpgsql_check's only "other" warning here is that the parameter "limit" is a reserved
    -- word: it is, on purpose (the page size has the name the HTTP API and the CLI give it; a
    -- named call quotes it: "limit" => 100). The function was checked clean of every other one.
    -- @plpgsql_check_options: other_warnings = false
    IF job_result."limit" IS NULL OR job_result."limit" NOT BETWEEN 1 AND 10000 THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('limit must be between 1 and 10000, got %s', coalesce(job_result."limit"::text, 'NULL')),
            HINT = 'page through a longer result with `after`: pass the next_after of the previous page';
    END IF;
    v_job := stageflow._visible_job(job_result.job_id);
    IF NOT stageflow._job_is_done(v_job.status) THEN
        RAISE EXCEPTION USING
            ERRCODE = '55000',
            MESSAGE = format('job %s has no result: it is %s', v_job.job_id, v_job.status),
            HINT = CASE WHEN stageflow._job_is_open(v_job.status)
                        THEN 'a job has a result once it is completed; stageflow.job_status(job_id) says how far it is'
                        ELSE 'a failed or cancelled job has no result: its error in stageflow.job_status(job_id) says why, '
                             'and its tasks'' results are in stageflow.job_tasks(job_id)' END;
    END IF;

    SELECT s.fan_out INTO STRICT v_fan_out
      FROM stageflow.stages AS s
     WHERE s.job_id = v_job.job_id AND s.stage = v_job.total_stages;
    v_one := stageflow._result_is_one_task(v_fan_out);

    -- One more row than the page holds says whether another page follows.
    SELECT jsonb_agg(jsonb_build_object('ordinal', p.ordinal, 'task_key', p.task_key, 'task_id', p.task_id,
                                        'result', p.result) ORDER BY p.ordinal) FILTER (WHERE p.n <= job_result."limit"),
           count(*), max(p.ordinal) FILTER (WHERE p.n <= job_result."limit")
      INTO v_entries, v_rows, v_last
      FROM (SELECT t.ordinal, t.task_key, t.task_id, t.result, row_number() OVER (ORDER BY t.ordinal) AS n
              FROM stageflow.tasks AS t
             WHERE stageflow._is_task_of_job(t.job_id, v_job.job_id) AND t.stage = v_job.total_stages
               AND t.ordinal > coalesce(job_result.after, -1)
               AND t.ordinal <= CASE WHEN v_one THEN 0 ELSE 2147483647 END
               AND (v_one OR t.status = 'completed')
             ORDER BY t.ordinal
             LIMIT job_result."limit" + 1) AS p;

    RETURN jsonb_build_object(
        'job_id', v_job.job_id,
        'status', v_job.status,
        'fan_out', v_fan_out,
        'entries', coalesce(v_entries, '[]'::jsonb),
        'next_after', CASE WHEN v_rows > job_result."limit" THEN v_last END);
END;
$$;
