-- Moves a job past its current stage if that stage has no open task left: creates the next
-- stage's tasks, or completes the job. Stages that fan out to nothing are passed
-- through in the same call. Idempotent: the job row lock serialises callers and the current
-- stage's open_shards decides, so a stage's tasks are never created twice. The last completion of a
-- stage calls it; calling it by hand repairs a job that is stuck, or does nothing.
--
-- Fault isolation: an error while planning the next stage's tasks (a planner's results naming a
-- key twice, a fan-out over a limit, params that do not make one) is that job's failure, never its
-- caller's: nothing of the stage is created and the job fails with a categorised
-- `stage_creation_failed` error (event job_failed), whichever claim, batch or maintenance round
-- happened to advance it (_create_stage_tasks finds these before it writes anything).
-- A job that ended while its last completion was on the way here (cancelled, failed) is not
-- advanced; the stage that completion emptied is closed with the job.
--
-- A job some of whose tasks failed within their stages' thresholds ends `completed_with_errors`.
-- Its result stays in its last stage's tasks, where job_result pages over it: completing the job
-- copies nothing, however many tasks the last stage has.
CREATE FUNCTION stageflow.advance_stage(job_id text)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job       stageflow.jobs;
    v_stage     stageflow.stages;
    v_advanced  boolean := false;
    v_created   int;
    v_failure   jsonb;
BEGIN
    -- (NO KEY UPDATE, the lock of an UPDATE of the row: it does not wait for the KEY SHARE a
    -- retry_job takes first, which keeps retention from deleting the job under it)
    SELECT * INTO v_job FROM stageflow.jobs AS j WHERE j.job_id = advance_stage.job_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        PERFORM stageflow._raise_unknown('job', advance_stage.job_id);
    END IF;

    WHILE stageflow._job_is_open(v_job.status) LOOP
        SELECT * INTO STRICT v_stage
          FROM stageflow.stages AS s
         WHERE s.job_id = v_job.job_id AND s.stage = v_job.current_stage;
        EXIT WHEN v_stage.open_shards > 0;

        IF v_stage.status = 'active' THEN
            UPDATE stageflow.stages AS s
               SET status = 'completed', completed_at = stageflow.now()
             WHERE s.job_id = v_job.job_id AND s.stage = v_job.current_stage;
        END IF;
        PERFORM stageflow._emit(v_job.job_id, 'stage_completed',
                                jsonb_build_object('name', v_stage.name, 'task_count', v_stage.task_count,
                                                   'completed', (SELECT c.completed_count FROM stageflow.stage_counts AS c
                                                                  WHERE c.job_id = v_job.job_id AND c.stage = v_stage.stage),
                                                   'failed', v_stage.failed_count),
                                v_stage.stage);

        IF v_job.current_stage >= v_job.total_stages THEN
            UPDATE stageflow.jobs AS j
               SET status = CASE WHEN EXISTS (SELECT 1 FROM stageflow.stages AS s
                                               WHERE s.job_id = v_job.job_id AND s.failed_count > 0)
                                 THEN 'completed_with_errors' ELSE 'completed' END,
                   completed_at = stageflow.now(), updated_at = stageflow.now()
             WHERE j.job_id = v_job.job_id
            RETURNING * INTO v_job;
            PERFORM stageflow._emit(v_job.job_id, 'job_' || v_job.status, jsonb_build_object('total_stages', v_job.total_stages));
            v_advanced := true;
            EXIT;
        END IF;

        SELECT c.created, c.failure INTO v_created, v_failure
          FROM stageflow._create_stage_tasks(v_job.job_id, v_job.current_stage + 1, p_catch => true) AS c;
        IF v_failure IS NOT NULL THEN
            PERFORM stageflow._end_job(v_job.job_id, 'failed', jsonb_build_object(
                'type', 'stage_creation_failed', 'category', 'permanent', 'stage', v_job.current_stage + 1,
                'message', format('creating the tasks of stage %s failed: %s', v_job.current_stage + 1, v_failure ->> 'message'),
                'sqlstate', v_failure ->> 'sqlstate', 'hint', v_failure ->> 'hint'), p_advancing => true);
            SELECT * INTO v_job FROM stageflow.jobs AS j WHERE j.job_id = advance_stage.job_id;
            EXIT;
        END IF;
        UPDATE stageflow.jobs AS j
           SET current_stage = j.current_stage + 1, updated_at = stageflow.now()
         WHERE j.job_id = v_job.job_id
        RETURNING * INTO v_job;
        v_advanced := true;
        EXIT WHEN v_created > 0;
    END LOOP;

    IF NOT v_advanced AND NOT stageflow._job_is_open(v_job.status) THEN
        UPDATE stageflow.stages AS s
           SET status = CASE WHEN v_job.status = 'cancelled' THEN 'cancelled' ELSE 'failed' END,
               completed_at = stageflow.now()
         WHERE s.job_id = v_job.job_id AND s.stage = v_job.current_stage AND s.status = 'active' AND s.open_shards = 0;
    END IF;

    RETURN jsonb_build_object(
        'job_id', v_job.job_id,
        'advanced', v_advanced,
        'job_status', v_job.status,
        'current_stage', v_job.current_stage,
        'total_stages', v_job.total_stages);
END;
$$;
