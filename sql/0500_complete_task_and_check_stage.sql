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
-- entries: {"tasks": [{"key"?: "tile_x0_y0", "params"?: {...}}, ...]}.
CREATE FUNCTION stageflow._planner_problem(p_result jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN jsonb_typeof(p_result) IS DISTINCT FROM 'object' OR jsonb_typeof(p_result -> 'tasks') IS DISTINCT FROM 'array'
            THEN 'the result has no "tasks" array'
        ELSE (SELECT format('entry %s: %s', e.n - 1,
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
               LIMIT 1)
    END
$$;

-- Raises 22023 if a result that feeds a dynamic fan-out is not a valid plan.
CREATE FUNCTION stageflow._check_planner_result(p_task_id text, p_result jsonb)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_problem text := stageflow._planner_problem(p_result);
BEGIN
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('task %s plans the next stage (dynamic fan-out) but %s', p_task_id, v_problem),
            HINT = 'return {"tasks": [{"key": "tile_x0_y0", "params": {...}}, ...]}; report a planning error with stageflow.fail_task';
    END IF;
END;
$$;

-- Completes a running task with its result and deletes its message. If it was the last open task
-- of its stage, advances the job in the same transaction: the task's shard counter is decremented
-- under the shard row's lock, and only when that reaches zero is the stage row locked and its
-- count of open shards decremented; the completion that takes it to zero advances. Completing a completed task returns the same report and changes nothing.
-- With worker_id (what the worker passed to claim_tasks), only the worker holding the task's
-- current lease may complete it: a worker whose lease expired and went to another is refused.
-- Like every hot-path function it runs with plan_cache_mode = force_generic_plan: PL/pgSQL would
-- otherwise re-plan statements whose parameters are arrays on every call (measured: half of the
-- server CPU of a claim plus a completion). A generic plan is made once per session, with the
-- statistics of that moment: made while stages or stage_shards were small, it kept scanning them
-- whole as they grew (12,237 sequential scans of stages in one benchmark run). Every lookup here
-- is by key, so these functions also run with enable_seqscan = off: their own plans use the
-- indexes whatever the statistics said when they were made. (Functions they call, such as
-- advance_stage, run with these settings too, but keep the plans of whichever caller planned
-- them first in the session.)
CREATE FUNCTION stageflow.complete_task_and_check_stage(task_id text, result jsonb DEFAULT NULL, worker_id text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
AS $$
DECLARE
    v_task       record;
    v_remaining  int;
    v_open       int;
    v_advance    jsonb;
    v_seconds    double precision;
BEGIN
    SELECT t.job_id, t.stage, t.ordinal, t.status, t.msg_id, t.worker_id, s.queue, s.next_fan_out, s.shards,
           j.status AS job_status, j.current_stage, j.total_stages INTO v_task
      FROM stageflow.tasks AS t
      JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
      JOIN stageflow.jobs AS j ON j.job_id = t.job_id
     WHERE t.task_id = complete_task_and_check_stage.task_id;
    IF NOT FOUND THEN
        PERFORM stageflow._raise_unknown('task', complete_task_and_check_stage.task_id);
    END IF;

    IF v_task.status = 'running' THEN
        IF complete_task_and_check_stage.worker_id IS NOT NULL
           AND v_task.worker_id IS DISTINCT FROM complete_task_and_check_stage.worker_id THEN
            PERFORM stageflow._raise_foreign_lease(complete_task_and_check_stage.task_id, v_task.worker_id, complete_task_and_check_stage.worker_id);
        END IF;
        IF pg_column_size(complete_task_and_check_stage.result) > 8388608 THEN
            RAISE EXCEPTION USING
                ERRCODE = '54000',
                MESSAGE = format('the result of task %s takes %s bytes, more than the limit of 8388608',
                                 complete_task_and_check_stage.task_id, pg_column_size(complete_task_and_check_stage.result)),
                HINT = 'store large outputs elsewhere (a file, object storage) and return a reference';
        END IF;
        IF v_task.next_fan_out = 'dynamic' THEN
            PERFORM stageflow._check_planner_result(complete_task_and_check_stage.task_id,
                                                    complete_task_and_check_stage.result);
        END IF;
        -- The message first, then the task: the same lock order as claim_tasks.
        PERFORM stageflow._delete_messages(v_task.queue, ARRAY[v_task.msg_id]);
        UPDATE stageflow.tasks AS t
           SET status = 'completed', result = complete_task_and_check_stage.result,
               completed_at = stageflow.now(), lease_expires_at = NULL
         WHERE t.task_id = complete_task_and_check_stage.task_id AND t.status = 'running'
        RETURNING extract(epoch FROM t.completed_at - t.claimed_at) INTO v_seconds;
        IF FOUND THEN
            UPDATE stageflow.stage_shards AS sh
               SET remaining_tasks = sh.remaining_tasks - 1,
                   completed_count = sh.completed_count + 1,
                   completed_seconds = sh.completed_seconds + coalesce(v_seconds, 0)
             WHERE sh.job_id = v_task.job_id AND sh.stage = v_task.stage AND sh.shard = v_task.ordinal % v_task.shards
            RETURNING sh.remaining_tasks INTO v_remaining;
            IF v_remaining = 0 THEN
                UPDATE stageflow.stages AS s
                   SET open_shards = s.open_shards - 1,
                       completed_by = CASE WHEN s.open_shards = 1 THEN complete_task_and_check_stage.task_id
                                           ELSE s.completed_by END
                 WHERE s.job_id = v_task.job_id AND s.stage = v_task.stage
                RETURNING s.open_shards INTO v_open;
                IF v_open = 0 THEN
                    v_advance := stageflow.advance_stage(v_task.job_id);
                END IF;
            END IF;
            -- The report of a fresh completion, from what is known here (no more reads).
            RETURN jsonb_build_object(
                'task_id', complete_task_and_check_stage.task_id,
                'task_status', 'completed',
                'stage', v_task.stage,
                -- (a stage of a job that already ended empties without advancing anything)
                'stage_completed', coalesce(v_open = 0 AND (v_advance ->> 'advanced')::boolean, false),
                'next_stage', CASE WHEN v_open = 0 AND (v_advance ->> 'advanced')::boolean AND v_task.stage < v_task.total_stages
                                   THEN v_task.stage + 1 END,
                'job_id', v_task.job_id,
                'job_status', coalesce(v_advance ->> 'job_status', v_task.job_status),
                'current_stage', coalesce((v_advance ->> 'current_stage')::int, v_task.current_stage),
                'total_stages', v_task.total_stages);
        END IF;
        -- Another session completed or failed it first; report what it is now.
        SELECT t.status INTO v_task.status FROM stageflow.tasks AS t
         WHERE t.task_id = complete_task_and_check_stage.task_id;
    END IF;

    IF v_task.status = 'completed' THEN
        RETURN stageflow._completion_report(complete_task_and_check_stage.task_id);
    ELSIF v_task.status = 'queued' THEN
        RAISE EXCEPTION USING
            ERRCODE = '55000',
            MESSAGE = format('task %s is not claimed', complete_task_and_check_stage.task_id),
            HINT = 'claim it with stageflow.claim_tasks first; a task waiting for a retry is claimable after its backoff';
    ELSIF v_task.status = 'cancelled' THEN
        RAISE EXCEPTION USING
            ERRCODE = '55000',
            MESSAGE = format('task %s is cancelled: its job ended, the result is not recorded', complete_task_and_check_stage.task_id),
            HINT = 'see stageflow.job_status(job_id) for why the job ended';
    ELSE
        RAISE EXCEPTION USING
            ERRCODE = '55000',
            MESSAGE = format('task %s is %s and cannot be completed', complete_task_and_check_stage.task_id, v_task.status),
            HINT = 'stageflow.retry_job(job_id) runs failed and dead tasks again';
    END IF;
END;
$$;
