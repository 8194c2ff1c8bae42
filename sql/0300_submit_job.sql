-- Submits a job: validates params against the job type's schema (filling in defaults), derives the
-- job id from the job type and the canonical params, and creates stage 1's tasks (or, when it has
-- none, the first stage that has), within the submitting login's quotas: 54000 over one, and an
-- error creating those tasks is the submission's (it creates nothing). The job belongs to the
-- session's login and tenant label (stageflow.tenant). webhook_url, when given, receives a POST
-- when the job ends (see stageflow.webhook_deliveries). A login's submissions under one label take
-- turns (_admit, their first lock).
--
-- Identical work has one id, so submitting it again returns the same id, and the outcome says
-- what that meant:
--   created           a new job
--   exists            your job of this work, left as it is (its webhook_url too)
--   resumed           your job of this work had failed or been cancelled: it runs again from the
--                     stage it stopped at, as stageflow.retry_job does (its completed stages and
--                     tasks are kept; the open tasks count against your quota)
--   owned_by_another  another login (or tenant) submitted this work; its job is not yours to read
--                     or cancel (job_status is NULL unless you are an admin)
-- job_status is the job's status after the call.
CREATE FUNCTION stageflow.submit_job_outcome(job_type text, params jsonb DEFAULT '{}', webhook_url text DEFAULT NULL)
RETURNS TABLE (job_id text, outcome text, job_status text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_definition  jsonb;
    v_params      jsonb;
    v_job_id      text;
    v_job         stageflow.jobs;
    v_access      text;
    v_tenant      text := stageflow._tenant();
    v_retried     jsonb;
BEGIN
    SELECT jt.definition INTO v_definition FROM stageflow.job_types AS jt WHERE jt.name = submit_job_outcome.job_type;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING
            ERRCODE = '42704',
            MESSAGE = format('unknown job type %L', submit_job_outcome.job_type),
            HINT = coalesce('registered job types: ' || (SELECT string_agg(jt.name, ', ' ORDER BY jt.name)
                                                           FROM stageflow.job_types AS jt),
                            'no job type is registered: use stageflow.register_job_type(name, definition)');
    END IF;

    IF octet_length(submit_job_outcome.params::text) > 1048576 THEN
        RAISE EXCEPTION USING
            ERRCODE = '54000',
            MESSAGE = format('the params take %s bytes, more than the limit of 1048576', octet_length(submit_job_outcome.params::text)),
            HINT = 'pass large inputs by reference (a path or URL), not inline';
    END IF;
    IF submit_job_outcome.webhook_url LIKE 'endpoint:%' THEN
        IF (stageflow._webhook_endpoint(submit_job_outcome.webhook_url, session_user, v_tenant)).name IS NULL THEN
            RAISE EXCEPTION USING
                ERRCODE = '42704',
                MESSAGE = format('unknown webhook endpoint %L', substr(submit_job_outcome.webhook_url, 10)),
                HINT = 'register it with stageflow.register_webhook_endpoint(name, url) under the same login and tenant';
        END IF;
    ELSIF submit_job_outcome.webhook_url IS NOT NULL THEN
        PERFORM stageflow._check_webhook_url(submit_job_outcome.webhook_url, 'webhook_url');
    END IF;
    v_params := stageflow._validate_params(submit_job_outcome.job_type, v_definition, submit_job_outcome.params::text);
    v_job_id := stageflow._job_id(submit_job_outcome.job_type, v_params::text);
    PERFORM stageflow._admit(session_user, v_tenant);

    LOOP
        INSERT INTO stageflow.jobs AS j (job_id, job_type, params, definition, total_stages, created_at, updated_at,
                                         deadline_at, webhook_url, owner, tenant, max_tasks)
        VALUES (v_job_id, submit_job_outcome.job_type, v_params, v_definition, jsonb_array_length(v_definition -> 'stages'),
                stageflow.now(), stageflow.now(),
                stageflow.now() + make_interval(secs => (v_definition ->> 'timeout_seconds')::numeric),
                submit_job_outcome.webhook_url, session_user, v_tenant,
                (stageflow._quota(session_user)).max_tasks_per_job)
        ON CONFLICT ON CONSTRAINT jobs_pkey DO NOTHING;
        IF FOUND THEN
            -- Under REPEATABLE READ, a snapshot taken before retention deleted the same work's
            -- earlier job still sees that job's row beside the new one: the transaction must run
            -- again, as for any serialization conflict.
            IF (SELECT count(*) FROM stageflow.jobs AS o WHERE o.job_id = v_job_id) > 1 THEN
                RAISE EXCEPTION USING
                    ERRCODE = '40001',
                    MESSAGE = format('could not serialize the submission of job %s: retention deleted the same work''s earlier job after this transaction began', v_job_id),
                    HINT = 'run the transaction again';
            END IF;
            -- The same work's earlier job, deleted by retention, may still have rows being deleted:
            -- they go now, before the new job writes any (stageflow.deleted_jobs).
            IF EXISTS (SELECT 1 FROM stageflow.deleted_jobs AS d WHERE d.job_id = v_job_id) THEN
                PERFORM stageflow._finish_job_deletion(v_job_id);
            END IF;
            PERFORM stageflow._emit(v_job_id, 'job_submitted',
                                    jsonb_build_object('job_type', submit_job_outcome.job_type, 'owner', session_user,
                                                       'tenant', v_tenant));
            IF (stageflow._create_stage_tasks(v_job_id, 1)).created = 0 THEN
                PERFORM stageflow.advance_stage(v_job_id);
                -- Stage 1 was empty: a later stage that could not be created is this call's error.
                SELECT * INTO STRICT v_job FROM stageflow.jobs AS j WHERE j.job_id = v_job_id;
                IF v_job.error ->> 'type' = 'stage_creation_failed' THEN
                    RAISE EXCEPTION USING
                        ERRCODE = v_job.error ->> 'sqlstate',
                        MESSAGE = v_job.error ->> 'message',
                        HINT = coalesce(v_job.error ->> 'hint', 'see the job type''s stages');
                END IF;
            END IF;
            PERFORM stageflow._check_open_tasks(session_user, v_tenant);
            RETURN QUERY SELECT v_job_id, 'created'::text, j.status FROM stageflow.jobs AS j WHERE j.job_id = v_job_id;
            RETURN;
        END IF;
        SELECT * INTO v_job FROM stageflow.jobs AS j WHERE j.job_id = v_job_id;
        -- Not found: retention deleted the job since the insert met it; insert again.
        CONTINUE WHEN NOT FOUND;
        v_access := stageflow._access(v_job.owner, v_job.tenant);
        IF v_access IS DISTINCT FROM 'owner' THEN
            RETURN QUERY SELECT v_job_id, 'owned_by_another'::text, CASE WHEN v_access = 'admin' THEN v_job.status END;
            RETURN;
        ELSIF NOT stageflow._job_is_stopped(v_job.status) THEN
            RETURN QUERY SELECT v_job_id, 'exists'::text, v_job.status;
            RETURN;
        END IF;
        -- The job's own label may be one this session does not name (the login's, seen without a
        -- label): its turn is taken too, after this session's ('' sorts first: no cycle).
        IF v_job.tenant IS DISTINCT FROM v_tenant THEN
            PERFORM stageflow._admit(session_user, v_job.tenant);
        END IF;
        -- (NULL: retention deleted the job since it was read here; insert again. Seen in the
        -- retention torture as "unknown job" raised to a submission.)
        v_retried := stageflow._retry_job(v_job_id, true);
        IF v_retried IS NOT NULL THEN
            PERFORM stageflow._check_open_tasks(session_user, v_job.tenant);
            RETURN QUERY SELECT v_job_id, 'resumed'::text, v_retried ->> 'job_status';
            RETURN;
        END IF;
    END LOOP;
END;
$$;

-- Submits a job and returns its id: stageflow.submit_job_outcome without the outcome. Identical
-- work of another login (or tenant) is refused (23505, its id is taken: an id the caller could
-- not read is no answer); a resumed job is told by a NOTICE.
CREATE FUNCTION stageflow.submit_job(job_type text, params jsonb DEFAULT '{}', webhook_url text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_submitted record;
BEGIN
    SELECT * INTO STRICT v_submitted
      FROM stageflow.submit_job_outcome(submit_job.job_type, submit_job.params, submit_job.webhook_url);
    IF v_submitted.outcome = 'owned_by_another' THEN
        RAISE EXCEPTION USING
            ERRCODE = '23505',
            MESSAGE = format('job %s: another login (or tenant) submitted this work; the job is not yours to read or cancel',
                             v_submitted.job_id),
            HINT = 'identical work is one job; to run it yourself make the params differ (a job type can take a '
                   'parameter naming your team), or ask its owner or stageflow_admin for its result';
    ELSIF v_submitted.outcome = 'resumed' THEN
        RAISE NOTICE USING
            MESSAGE = format('job %s had failed or been cancelled: it runs again from the stage it stopped at',
                             v_submitted.job_id),
            HINT = 'stageflow.submit_job_outcome returns the outcome of a submission';
    END IF;
    RETURN v_submitted.job_id;
END;
$$;
