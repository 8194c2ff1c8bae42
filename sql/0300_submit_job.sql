-- Submits a job: validates params against the job type's schema (filling in defaults), derives the
-- job id from the job type and the canonical params, and creates stage 1's tasks. Submitting
-- identical work again returns the same id and creates nothing.
CREATE FUNCTION stageflow.submit_job(job_type text, params jsonb DEFAULT '{}')
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_definition  jsonb;
    v_params      jsonb;
    v_job_id      text;
BEGIN
    SELECT jt.definition INTO v_definition FROM stageflow.job_types AS jt WHERE jt.name = submit_job.job_type;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING
            ERRCODE = '42704',
            MESSAGE = format('unknown job type %L', submit_job.job_type),
            HINT = coalesce('registered job types: ' || (SELECT string_agg(jt.name, ', ' ORDER BY jt.name)
                                                           FROM stageflow.job_types AS jt),
                            'no job type is registered: use stageflow.register_job_type(name, definition)');
    END IF;

    v_params := stageflow._validate_params(submit_job.job_type, v_definition, submit_job.params);
    v_job_id := stageflow.job_id(submit_job.job_type, v_params);

    INSERT INTO stageflow.jobs AS j (job_id, job_type, params, definition, total_stages)
    VALUES (v_job_id, submit_job.job_type, v_params, v_definition, jsonb_array_length(v_definition -> 'stages'))
    ON CONFLICT ON CONSTRAINT jobs_pkey DO NOTHING;
    IF NOT FOUND THEN
        RETURN v_job_id;
    END IF;

    IF stageflow._create_stage_tasks(v_job_id, 1) = 0 THEN
        PERFORM stageflow.advance_stage(v_job_id);
    END IF;
    RETURN v_job_id;
END;
$$;
