-- Moves a job past its current stage if that stage has no open task left: creates the next
-- stage's tasks, or completes the job with its result. Stages that fan out to nothing are passed
-- through in the same call. Idempotent: the job row lock serialises callers and the current
-- stage's open_shards decides, so a stage's tasks are never created twice. The last completion of a
-- stage calls it; calling it by hand repairs a job that is stuck, or does nothing.
--
-- The job's result: the task's result when the last stage is `single` or `fan_in`, otherwise the
-- array of the last stage's results in task order. A job some of whose tasks failed within their
-- stages' thresholds ends `completed_with_errors`.
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
    v_result    jsonb;
BEGIN
    SELECT * INTO v_job FROM stageflow.jobs AS j WHERE j.job_id = advance_stage.job_id FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM stageflow._raise_unknown('job', advance_stage.job_id);
    END IF;

    WHILE v_job.status IN ('queued', 'processing') LOOP
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
            IF v_stage.fan_out IN ('single', 'fan_in') THEN
                SELECT t.result INTO v_result
                  FROM stageflow.tasks AS t
                 WHERE t.job_id = v_job.job_id AND t.stage = v_job.current_stage AND t.ordinal = 0;
            ELSE
                SELECT coalesce(jsonb_agg(t.result ORDER BY t.ordinal), '[]'::jsonb) INTO v_result
                  FROM stageflow.tasks AS t
                 WHERE t.job_id = v_job.job_id AND t.stage = v_job.current_stage AND t.status = 'completed';
            END IF;
            UPDATE stageflow.jobs AS j
               SET status = CASE WHEN EXISTS (SELECT 1 FROM stageflow.stages AS s
                                               WHERE s.job_id = v_job.job_id AND s.failed_count > 0)
                                 THEN 'completed_with_errors' ELSE 'completed' END,
                   result = v_result, completed_at = stageflow.now(), updated_at = stageflow.now()
             WHERE j.job_id = v_job.job_id
            RETURNING * INTO v_job;
            PERFORM stageflow._emit(v_job.job_id, 'job_' || v_job.status, jsonb_build_object('total_stages', v_job.total_stages));
            v_advanced := true;
            EXIT;
        END IF;

        v_created := stageflow._create_stage_tasks(v_job.job_id, v_job.current_stage + 1);
        UPDATE stageflow.jobs AS j
           SET current_stage = j.current_stage + 1, updated_at = stageflow.now()
         WHERE j.job_id = v_job.job_id
        RETURNING * INTO v_job;
        v_advanced := true;
        EXIT WHEN v_created > 0;
    END LOOP;

    RETURN jsonb_build_object(
        'job_id', v_job.job_id,
        'advanced', v_advanced,
        'job_status', v_job.status,
        'current_stage', v_job.current_stage,
        'total_stages', v_job.total_stages);
END;
$$;
