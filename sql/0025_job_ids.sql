-- Job ids: a job's id is the hash of its job type and canonical params (src/job_id.rs), so that
-- identical work is one job. What submitters may call to learn the id of a piece of work.

-- stageflow.job_id(job_type, params): the id submit_job gives this work (after the job type's
-- defaults are filled in). stageflow.canonical_json(value): the text job ids hash. Both hand the
-- JSON to Rust as text, so that too deep a document is an error with a SQLSTATE, not a crash.
CREATE FUNCTION stageflow.job_id(job_type text, params jsonb)
RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN stageflow._job_id(job_id.job_type, job_id.params::text);
END;
$$;

CREATE FUNCTION stageflow.canonical_json(value jsonb)
RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN stageflow._canonical_json(canonical_json.value::text);
END;
$$;
