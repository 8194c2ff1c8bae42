-- What a completion reports: the task, its stage, whether this task's completion finished the
-- stage (the stage row remembers which task did), and where the job is now.
-- (plpgsql rather than sql: its plan is cached for the session, where a sql function's is not.)
CREATE FUNCTION stageflow._completion_report(p_task_id text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN (SELECT jsonb_build_object(
               'task_id', t.task_id,
               'task_status', t.status,
               'stage', t.stage,
               'stage_completed', s.completed_by IS NOT DISTINCT FROM t.task_id AND s.status = 'completed',
               'next_stage', CASE WHEN s.completed_by IS NOT DISTINCT FROM t.task_id AND s.status = 'completed'
                                       AND t.stage < j.total_stages
                                  THEN t.stage + 1 END,
               'job_id', j.job_id,
               'job_status', j.status,
               'current_stage', j.current_stage,
               'total_stages', j.total_stages)
      FROM stageflow.tasks AS t
      JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
      JOIN stageflow.jobs AS j ON j.job_id = t.job_id
     WHERE t.task_id = p_task_id);
END;
$$;

-- What is wrong with a result that feeds a dynamic fan-out, or NULL if it is a valid list of task
-- entries: {"tasks": [{"key"?: "tile_x0_y0", "params"?: {...}}, ...]} whose keys are distinct.
-- (Keys repeated across the results of several planner tasks are found only when the stage is
-- created, and fail that job: see advance_stage.)
CREATE FUNCTION stageflow._planner_problem(p_result jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN jsonb_typeof(p_result) IS DISTINCT FROM 'object' OR jsonb_typeof(p_result -> 'tasks') IS DISTINCT FROM 'array'
            THEN 'the result has no "tasks" array'
        ELSE coalesce(
             (SELECT format('entry %s: %s', e.n - 1,
                            CASE WHEN jsonb_typeof(e.entry) <> 'object' THEN 'not an object'
                                 WHEN e.entry ? 'key' AND (jsonb_typeof(e.entry -> 'key') <> 'string'
                                                           OR e.entry ->> 'key' !~ '^[A-Za-z0-9_.:-]{1,128}$')
                                     THEN format('key %s is not 1 to 128 letters, digits or _.:-', e.entry -> 'key')
                                 ELSE '"params" is not an object' END)
                FROM jsonb_array_elements(p_result -> 'tasks') WITH ORDINALITY AS e(entry, n)
               WHERE jsonb_typeof(e.entry) <> 'object'
                  OR (e.entry ? 'key' AND (jsonb_typeof(e.entry -> 'key') <> 'string'
                                           OR e.entry ->> 'key' !~ '^[A-Za-z0-9_.:-]{1,128}$'))
                  OR (e.entry ? 'params' AND jsonb_typeof(e.entry -> 'params') <> 'object')
               ORDER BY e.n
               LIMIT 1),
             (SELECT format('entry %s: key %s is named more than once (first by entry %s)', d.n - 1, to_jsonb(d.key), d.first - 1)
                FROM (SELECT e.n, e.entry ->> 'key' AS key, min(e.n) OVER (PARTITION BY e.entry ->> 'key') AS first
                        FROM jsonb_array_elements(p_result -> 'tasks') WITH ORDINALITY AS e(entry, n)
                       WHERE e.entry ? 'key') AS d
               WHERE d.n <> d.first
               ORDER BY d.n
               LIMIT 1))
    END
$$;

-- Records completions: the one settle path of complete_task_and_check_stage and complete_tasks.
-- p_task_ids, p_results and p_tokens are parallel (a NULL token: no token given); the ids are
-- distinct. Every named task is locked first, in task_id order, and each report is decided under
-- its task's lock (stageflow._refusal, and a plan check for a result that feeds a dynamic
-- fan-out). The accepted ones have their messages deleted (tasks before messages: the lock order
-- of every report), are marked completed, and their stages' shard counters are decremented once
-- per shard for the whole call; a stage row is locked only when one of its shards empties (shards
-- before stage, in (job, stage, shard) order), and the call that takes the stage's open shards to
-- zero advances the job in this transaction. A completion repeated by the lease that made it is
-- accepted and changes nothing. Returns, per element, NULL when accepted, else its refusal
-- {"sqlstate", "message", "hint"}.
CREATE FUNCTION stageflow._settle_completions(p_task_ids text[], p_results jsonb[], p_tokens bigint[], p_worker_id text)
RETURNS jsonb[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
AS $$
DECLARE
    v_refusals   jsonb[];
    v_ids        text[];
    v_results    jsonb[];
    v_jobs       text[];
    v_stages     int[];
    v_shards     int[];
    v_counts     int[];
    v_last       text[];
    v_seconds    double precision[];
    v_remaining  int;
    v_open       int;
    v_emptied    int := 0;
    i            int;
BEGIN
    PERFORM 1 FROM stageflow.tasks AS t WHERE t.task_id = ANY (p_task_ids) ORDER BY t.task_id FOR UPDATE;

    -- Decided on the rows as they are now (this statement's snapshot follows the locks).
    SELECT array_agg(d.refusal ORDER BY d.n),
           array_agg(d.task_id ORDER BY d.task_id) FILTER (WHERE d.refusal IS NULL AND d.status = 'running'),
           array_agg(d.result ORDER BY d.task_id) FILTER (WHERE d.refusal IS NULL AND d.status = 'running')
      INTO v_refusals, v_ids, v_results
      FROM (SELECT u.n, u.task_id, u.result, t.status,
                   coalesce(stageflow._refusal(t, u.task_id, 'completed', u.token, p_worker_id),
                            CASE WHEN t.status = 'running' AND s.next_fan_out = 'dynamic'
                                      AND stageflow._planner_problem(u.result) IS NOT NULL THEN
                                jsonb_build_object(
                                    'sqlstate', '22023',
                                    'message', format('task %s plans the next stage (dynamic fan-out) but %s', u.task_id,
                                                      stageflow._planner_problem(u.result)),
                                    'hint', 'return {"tasks": [{"key": "tile_x0_y0", "params": {...}}, ...]}; report a planning error with stageflow.fail_task')
                            END) AS refusal
              FROM unnest(p_task_ids, p_results, p_tokens) WITH ORDINALITY AS u(task_id, result, token, n)
              LEFT JOIN stageflow.tasks AS t ON t.task_id = u.task_id
              LEFT JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage) AS d;
    IF v_ids IS NULL THEN
        RETURN v_refusals;
    END IF;

    PERFORM stageflow._delete_messages(q.queue, q.msg_ids)
       FROM (SELECT s.queue, array_agg(t.msg_id ORDER BY t.msg_id) AS msg_ids
               FROM stageflow.tasks AS t
               JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
              WHERE t.task_id = ANY (v_ids)
              GROUP BY s.queue
              ORDER BY s.queue) AS q;
    WITH done AS (
        UPDATE stageflow.tasks AS t
           SET status = 'completed', result = u.result, completed_at = stageflow.now(), lease_expires_at = NULL
          FROM unnest(v_ids, v_results) AS u(task_id, result)
         WHERE t.task_id = u.task_id
        RETURNING t.job_id, t.stage, t.task_id, t.ordinal, extract(epoch FROM t.completed_at - t.claimed_at) AS seconds
    )
    SELECT array_agg(g.job_id ORDER BY g.job_id, g.stage, g.shard), array_agg(g.stage ORDER BY g.job_id, g.stage, g.shard),
           array_agg(g.shard ORDER BY g.job_id, g.stage, g.shard),
           array_agg(g.n ORDER BY g.job_id, g.stage, g.shard), array_agg(g.last_task ORDER BY g.job_id, g.stage, g.shard),
           array_agg(g.seconds ORDER BY g.job_id, g.stage, g.shard)
      INTO v_jobs, v_stages, v_shards, v_counts, v_last, v_seconds
      FROM (SELECT d.job_id, d.stage, d.ordinal % s.shards AS shard, count(*)::int AS n,
                   (array_agg(d.task_id ORDER BY d.ordinal DESC))[1] AS last_task,
                   coalesce(sum(d.seconds), 0)::double precision AS seconds
              FROM done AS d
              JOIN stageflow.stages AS s ON s.job_id = d.job_id AND s.stage = d.stage
             GROUP BY d.job_id, d.stage, d.ordinal % s.shards) AS g;

    -- Every shard first, then the stage rows whose shards emptied (a stage row after all of its
    -- shards, so the lock order stays shards -> stage for every caller).
    FOR i IN 1 .. cardinality(v_jobs) LOOP
        UPDATE stageflow.stage_shards AS sh
           SET remaining_tasks = sh.remaining_tasks - v_counts[i],
               completed_count = sh.completed_count + v_counts[i],
               completed_seconds = sh.completed_seconds + v_seconds[i]
         WHERE sh.job_id = v_jobs[i] AND sh.stage = v_stages[i] AND sh.shard = v_shards[i]
        RETURNING sh.remaining_tasks INTO v_remaining;
        IF v_remaining = 0 THEN
            v_emptied := v_emptied + 1;
        END IF;
        IF v_emptied > 0 AND (i = cardinality(v_jobs) OR v_jobs[i + 1] <> v_jobs[i] OR v_stages[i + 1] <> v_stages[i]) THEN
            -- The last shard of this stage in the call: settle the stage.
            UPDATE stageflow.stages AS s
               SET open_shards = s.open_shards - v_emptied,
                   completed_by = CASE WHEN s.open_shards = v_emptied THEN v_last[i] ELSE s.completed_by END
             WHERE s.job_id = v_jobs[i] AND s.stage = v_stages[i]
            RETURNING s.open_shards INTO v_open;
            v_emptied := 0;
            IF v_open = 0 THEN
                PERFORM stageflow.advance_stage(v_jobs[i]);
            END IF;
        END IF;
    END LOOP;
    RETURN v_refusals;
END;
$$;

-- Completes a running task with its result (see _settle_completions). If it was the last open
-- task of its stage, the job advances in the same transaction. Repeating a completion returns the
-- same report and changes nothing.
-- Fencing: with lease_token (what claim_tasks returned), only the task's current lease may
-- complete it; with worker_id alone, only the worker holding the current lease. Called with
-- neither (the psql form: complete_task_and_check_stage(task_id, result)), it trusts the caller:
-- any running task is completed, whichever lease it is on. Workers always pass the token.
-- Like every hot-path function it runs with plan_cache_mode = force_generic_plan: PL/pgSQL would
-- otherwise re-plan statements whose parameters are arrays on every call (measured: half of the
-- server CPU of a claim plus a completion). A generic plan is made once per session, with the
-- statistics of that moment: made while stages or stage_shards were small, it kept scanning them
-- whole as they grew (12,237 sequential scans of stages in one benchmark run). Every lookup here
-- is by key, so these functions also run with enable_seqscan = off: their own plans use the
-- indexes whatever the statistics said when they were made. (Functions they call, such as
-- advance_stage, run with these settings too, but keep the plans of whichever caller planned
-- them first in the session.)
CREATE FUNCTION stageflow.complete_task_and_check_stage(task_id text, result jsonb DEFAULT NULL, worker_id text DEFAULT NULL,
                                                        lease_token bigint DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
AS $$
DECLARE
    v_refusal  jsonb;
BEGIN
    IF pg_column_size(complete_task_and_check_stage.result) > 8388608 THEN
        RAISE EXCEPTION USING
            ERRCODE = '54000',
            MESSAGE = format('the result of task %s takes %s bytes, more than the limit of 8388608',
                             complete_task_and_check_stage.task_id, pg_column_size(complete_task_and_check_stage.result)),
            HINT = 'store large outputs elsewhere (a file, object storage) and return a reference';
    END IF;
    v_refusal := (stageflow._settle_completions(ARRAY[complete_task_and_check_stage.task_id],
                                                ARRAY[complete_task_and_check_stage.result],
                                                ARRAY[complete_task_and_check_stage.lease_token],
                                                complete_task_and_check_stage.worker_id))[1];
    IF v_refusal IS NOT NULL THEN
        PERFORM stageflow._raise_refusal(v_refusal);
    END IF;
    RETURN stageflow._completion_report(complete_task_and_check_stage.task_id);
END;
$$;
