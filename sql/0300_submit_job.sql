-- Submits a job: validates params against the job type's schema (filling in defaults), derives the
-- job id from the job type and the canonical params, and creates stage 1's tasks. Submitting
-- identical work again returns the same id and creates nothing (nor changes its webhook_url).
-- webhook_url, when given, receives a POST when the job ends (see stageflow.webhook_deliveries).
CREATE FUNCTION stageflow.submit_job(job_type text, params jsonb DEFAULT '{}', webhook_url text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
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

    IF octet_length(submit_job.params::text) > 1048576 THEN
        RAISE EXCEPTION USING
            ERRCODE = '54000',
            MESSAGE = format('the params take %s bytes, more than the limit of 1048576', octet_length(submit_job.params::text)),
            HINT = 'pass large inputs by reference (a path or URL), not inline';
    END IF;
    IF submit_job.webhook_url IS NOT NULL
       AND (submit_job.webhook_url !~ '^https?://\S+$' OR length(submit_job.webhook_url) > 2048) THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('webhook_url %L is not an http(s) URL', submit_job.webhook_url),
            HINT = 'give a URL like https://example.org/hooks/stageflow';
    END IF;
    v_params := stageflow._validate_params(submit_job.job_type, v_definition, submit_job.params::text);
    v_job_id := stageflow._job_id(submit_job.job_type, v_params::text);

    INSERT INTO stageflow.jobs AS j (job_id, job_type, params, definition, total_stages, created_at, updated_at, deadline_at,
                                     webhook_url)
    VALUES (v_job_id, submit_job.job_type, v_params, v_definition, jsonb_array_length(v_definition -> 'stages'),
            stageflow.now(), stageflow.now(),
            stageflow.now() + make_interval(secs => (v_definition ->> 'timeout_seconds')::numeric),
            submit_job.webhook_url)
    ON CONFLICT ON CONSTRAINT jobs_pkey DO NOTHING;
    IF NOT FOUND THEN
        RETURN v_job_id;
    END IF;
    PERFORM stageflow._emit(v_job_id, 'job_submitted', jsonb_build_object('job_type', submit_job.job_type));

    IF stageflow._create_stage_tasks(v_job_id, 1) = 0 THEN
        PERFORM stageflow.advance_stage(v_job_id);
    END IF;
    RETURN v_job_id;
END;
$$;
