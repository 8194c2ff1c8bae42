-- The wording of the errors that several functions raise: an unknown job or task, and the
-- refusals of a task's report (not running, another lease's), decided in one place.

-- Raises 42704 for an unknown job or task (p_kind 'job' or 'task'), with a hint about what the ids
-- look like: the one wording of these errors.
CREATE FUNCTION stageflow._raise_unknown(p_kind text, p_id text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = '42704',
        MESSAGE = format('unknown %s %L', p_kind, p_id),
        HINT = CASE p_kind
                   WHEN 'job' THEN 'job ids are the 64 hex digits returned by stageflow.submit_job; a job is shown only to the login '
                                    '(and tenant) that submitted it and to stageflow_admin'
                   ELSE 'task ids come from stageflow.claim_tasks and look like <16 hex>-s<stage>-<key>'
               END;
END;
$$;

-- Whether a report may speak for a task's current lease (the task row's lease_token, p_lease_token,
-- held by its worker_id, p_holder): naming a token (p_token), only if it is that one; naming no
-- token but a worker_id (p_worker_id), only if that worker holds the lease; naming neither, the
-- caller is trusted (the psql form). The one statement of the fence: _refusal words its refusals
-- from it, and a completion's UPDATE asks it alone (_refusal's wordings, planned into every
-- completion, cost it 36,000 instructions, bench/README.md). Inlined like _refusal.
CREATE FUNCTION stageflow._report_fenced(p_lease_token bigint, p_holder text, p_token bigint, p_worker_id text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE WHEN p_token IS NOT NULL THEN p_token OPERATOR(pg_catalog.=) p_lease_token
                ELSE p_worker_id IS NULL OR coalesce(p_holder OPERATOR(pg_catalog.=) p_worker_id, false) END
$$;

-- Why a report (p_verb: 'completed', 'failed') of a task cannot be recorded, as
-- {"sqlstate", "message", "hint"}, or NULL when it can: the one wording of every refusal, decided
-- from the task row read under its lock. A report names the lease it comes from by its token
-- (p_token) and/or the worker_id it claimed with (p_worker_id); a report naming neither trusts
-- the caller (the psql form). A completion repeated by the lease that made it is not refused.
-- Without a SET clause, and with its functions qualified, so that PostgreSQL inlines it into the
-- statements of the hot path that call it (only Stageflow's own functions, whose search_path is
-- fixed, can call it).
CREATE FUNCTION stageflow._refusal(p_task stageflow.tasks, p_task_id text, p_verb text, p_token bigint, p_worker_id text)
RETURNS jsonb
LANGUAGE sql STABLE
AS $$
    SELECT CASE
        WHEN p_task.task_id IS NULL THEN
            pg_catalog.jsonb_build_object('sqlstate', '42704', 'message', pg_catalog.format('unknown task %L', p_task_id),
                               'hint', 'task ids come from stageflow.claim_tasks and look like <16 hex>-s<stage>-<key>')
        -- (another lease's token, whatever the task's status; another worker, of a task running or
        -- completed: a task in any other status is refused for that below)
        WHEN NOT stageflow._report_fenced(p_task.lease_token, p_task.worker_id, p_token, p_worker_id)
             AND (p_token IS NOT NULL OR p_task.status = ANY ('{running,completed}'::text[])) THEN
            CASE WHEN p_token IS NOT NULL THEN
                pg_catalog.jsonb_build_object('sqlstate', '55000',
                                   'message', pg_catalog.format('task %s: lease %s is not its current lease (%s)', p_task_id, p_token, p_task.lease_token),
                                   'hint', 'the lease expired and the task was claimed again; its current holder reports it')
            WHEN p_task.status = 'running' THEN
                pg_catalog.jsonb_build_object('sqlstate', '55000',
                                   'message', pg_catalog.format('task %s is leased to worker %s, not %s', p_task_id, coalesce(p_task.worker_id, '(none)'), p_worker_id),
                                   'hint', 'the lease expired and the task was delivered again; its new holder reports it')
            ELSE
                pg_catalog.jsonb_build_object('sqlstate', '55000',
                                   'message', pg_catalog.format('task %s was completed by worker %s, not %s', p_task_id, coalesce(p_task.worker_id, '(none)'), p_worker_id),
                                   'hint', 'the lease expired and the task was delivered again; its new holder completed it')
            END
        WHEN p_task.status = 'running' THEN NULL
        WHEN p_task.status = 'completed' AND p_verb = 'completed' THEN NULL
        WHEN p_task.status = 'queued' THEN
            pg_catalog.jsonb_build_object('sqlstate', '55000', 'message', pg_catalog.format('task %s is not claimed', p_task_id),
                               'hint', 'claim it with stageflow.claim_tasks first; a task waiting for a retry is claimable after its backoff')
        WHEN p_task.status = 'cancelled' THEN
            pg_catalog.jsonb_build_object('sqlstate', '55000',
                               'message', pg_catalog.format('task %s is cancelled: its job ended, the outcome is not recorded', p_task_id),
                               'hint', 'see stageflow.job_status(job_id) for why the job ended')
        WHEN p_task.status = 'completed' THEN
            pg_catalog.jsonb_build_object('sqlstate', '55000', 'message', pg_catalog.format('task %s is already completed and cannot be %s', p_task_id, p_verb),
                               'hint', 'a completed task keeps its result; retry the whole job to run it again')
        ELSE
            pg_catalog.jsonb_build_object('sqlstate', '55000', 'message', pg_catalog.format('task %s is %s and cannot be %s', p_task_id, p_task.status, p_verb),
                               'hint', 'stageflow.retry_job(job_id) runs failed and dead tasks again')
    END
$$;

-- Raises a refusal made by stageflow._refusal.
CREATE FUNCTION stageflow._raise_refusal(p_refusal jsonb)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- plpgsql_check would have it IMMUTABLE; raising is its whole effect, and an IMMUTABLE call
    -- with constant arguments may be run while a query is planned: VOLATILE is right.
    -- @plpgsql_check_options: performance_warnings = false
    RAISE EXCEPTION USING
        ERRCODE = p_refusal ->> 'sqlstate', MESSAGE = p_refusal ->> 'message', HINT = p_refusal ->> 'hint';
END;
$$;
