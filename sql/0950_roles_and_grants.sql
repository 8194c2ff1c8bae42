-- Roles, created once per cluster (roles are cluster-wide) and granted what each needs:
--   stageflow_worker     claim, heartbeat, complete, fail and release tasks
--   stageflow_submitter  submit, list, read and cancel its own jobs (the login's, see
--                        0050_ownership_and_quotas.sql), see its quota
--   stageflow_monitor    metrics (every job's counters, no job's data): what an HTTP server's login
--                        needs for /metrics without being an admin
--   stageflow_admin      all of the above, plus every job, registering job types, retrying jobs,
--                        dead letters, repairs, queue grants (a worker claims only from queues
--                        granted to it), quotas
-- The functions are SECURITY DEFINER with search_path pg_catalog, pg_temp and every name
-- qualified, so no role needs (or has) any privilege on the tables. Nothing is granted to PUBLIC.
DO $$
DECLARE
    v_role text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['stageflow_worker', 'stageflow_submitter', 'stageflow_monitor', 'stageflow_admin'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = v_role) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
            EXCEPTION WHEN unique_violation OR duplicate_object THEN
                -- (CREATE EXTENSION in another database made it at the same time)
                NULL;
            END;
        END IF;
    END LOOP;
END;
$$;
GRANT stageflow_worker, stageflow_submitter, stageflow_monitor TO stageflow_admin;

REVOKE ALL ON ALL TABLES IN SCHEMA stageflow FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA stageflow FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA stageflow FROM PUBLIC;
GRANT USAGE ON SCHEMA stageflow TO stageflow_worker, stageflow_submitter, stageflow_monitor, stageflow_admin;

GRANT EXECUTE ON FUNCTION
    stageflow.claim_tasks(text, int, int, text),
    stageflow.heartbeat(text[], int, text, bigint[]),
    stageflow.complete_task_and_check_stage(text, jsonb, text, bigint, boolean),
    stageflow.complete_tasks(jsonb, text, boolean),
    stageflow.fail_task(text, jsonb, boolean, text, bigint),
    stageflow.release_tasks(text[], text, bigint[])
TO stageflow_worker;

GRANT EXECUTE ON FUNCTION
    stageflow.submit_job(text, jsonb, text),
    stageflow.submit_job_outcome(text, jsonb, text),
    stageflow.list_quotas(),
    stageflow.webhook_deliveries(text),
    stageflow.register_webhook_endpoint(text, text),
    stageflow.webhook_endpoints(),
    stageflow.drop_webhook_endpoint(text),
    stageflow.job_status(text),
    stageflow.job_tasks(text, text, int),
    stageflow.job_result(text, int, int),
    stageflow.list_jobs(text, text, int, timestamptz),
    stageflow.cancel_job(text),
    stageflow.job_types(),
    stageflow.job_id(text, jsonb),
    stageflow.canonical_json(jsonb)
TO stageflow_submitter;

GRANT EXECUTE ON FUNCTION
    stageflow.register_job_type(text, jsonb),
    stageflow.retry_job(text),
    stageflow.dead_letters(int),
    stageflow.advance_stage(text),
    stageflow.run_maintenance(int),
    stageflow.shape_queues(),
    stageflow.grant_queue(text, name),
    stageflow.revoke_queue(text, name),
    stageflow.list_queue_grants(),
    stageflow.set_quota(name, bigint, bigint),
    stageflow.claim_webhook_deliveries(int, int),
    stageflow.record_webhook_attempt(bigint, boolean, int, text, numeric)
TO stageflow_admin;

GRANT EXECUTE ON FUNCTION stageflow.metrics() TO stageflow_monitor;

-- Every entry point that updates task rows compresses the full-page images it logs, whatever the
-- cluster's wal_compression: a claim or a report is often the first change of its task's page
-- after a checkpoint, so PostgreSQL logs the whole page with it, and a page of task rows
-- compresses to about a fifth (bench/README.md, seventh pass). lz4 where this PostgreSQL has it
-- (with pglz, a batch over a backlog cost 2-6 % more server CPU), else pglz, which every build
-- has. The setting is a superuser's, which a function applies as its owner: these functions stay
-- owned by the superuser who created the extension.
DO $$
DECLARE
    v_method   text := CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_settings AS s
                                          WHERE s.name = 'wal_compression' AND 'lz4' = ANY (s.enumvals))
                            THEN 'lz4' ELSE 'pglz' END;
    v_function regprocedure;
BEGIN
    FOREACH v_function IN ARRAY ARRAY[
        'stageflow.claim_tasks(text, int, int, text)',
        'stageflow.heartbeat(text[], int, text, bigint[])',
        'stageflow.release_tasks(text[], text, bigint[])',
        'stageflow.complete_task_and_check_stage(text, jsonb, text, bigint, boolean)',
        'stageflow.complete_tasks(jsonb, text, boolean)',
        'stageflow.fail_task(text, jsonb, boolean, text, bigint)',
        'stageflow.cancel_job(text)',
        'stageflow.retry_job(text)',
        'stageflow.submit_job_outcome(text, jsonb, text)',
        'stageflow.submit_job(text, jsonb, text)',
        'stageflow.advance_stage(text)',
        'stageflow.run_maintenance(int)']::regprocedure[] LOOP
        EXECUTE pg_catalog.format('ALTER FUNCTION %s SET wal_compression = %s', v_function, v_method);
    END LOOP;
END;
$$;
