-- Ownership and quotas. A job belongs to the login that submitted it (session_user; SET ROLE does
-- not change it) and to the session's tenant label, if it set one (stageflow.tenant). Its owner
-- sees, lists, cancels and resubmits it; a superuser or a member of stageflow_admin sees and
-- cancels every job, unless the session names a tenant: a label only ever narrows what a session
-- sees to its own login's jobs of that tenant (how the HTTP API serves many tenants on one login).
-- Quotas bound what a login's submissions create: the open tasks of its jobs under each tenant
-- label when it submits, and the tasks of one job over all its stages.

-- stageflow._session_is_admin() (Rust, src/ownership.rs): whether the session's login is a
-- superuser or a member of stageflow_admin.
--
-- The helpers below are PL/pgSQL, not SQL: a SQL function that cannot be inlined (a FROM, a
-- subquery) is planned again in every transaction that calls it, about 100 µs each; PL/pgSQL
-- keeps its plans for the session.

-- The session's access to a job of p_owner under p_tenant: 'owner' (its login, and its tenant
-- when the session names one), 'admin' (a superuser or stageflow_admin member naming no
-- tenant), or NULL: none, the job is not shown.
CREATE FUNCTION stageflow._access(p_owner name, p_tenant text)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tenant text := stageflow._tenant();
BEGIN
    RETURN CASE WHEN p_owner = session_user AND (v_tenant IS NULL OR p_tenant = v_tenant) THEN 'owner'
                WHEN v_tenant IS NULL AND stageflow._session_is_admin() THEN 'admin' END;
END;
$$;

-- The job p_job_id if the session may see it; otherwise the error of an unknown job, so that a
-- job of another login reads exactly as one that does not exist.
CREATE FUNCTION stageflow._visible_job(p_job_id text)
RETURNS stageflow.jobs
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job stageflow.jobs;
BEGIN
    SELECT * INTO v_job FROM stageflow.jobs AS j WHERE j.job_id = p_job_id;
    IF NOT FOUND OR stageflow._access(v_job.owner, v_job.tenant) IS NULL THEN
        PERFORM stageflow._raise_unknown('job', p_job_id);
    END IF;
    RETURN v_job;
END;
$$;

-- A login's quotas: its role_quotas row's limits, else the defaults (stageflow.max_open_tasks,
-- stageflow.max_tasks_per_job).
CREATE FUNCTION stageflow._quota(p_role name, OUT max_open_tasks bigint, OUT max_tasks_per_job bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    SELECT coalesce(q.max_open_tasks, d.max_open_tasks), coalesce(q.max_tasks_per_job, d.max_tasks_per_job)
      INTO _quota.max_open_tasks, _quota.max_tasks_per_job
      FROM stageflow._default_quotas() AS d
      LEFT JOIN stageflow.role_quotas AS q ON q.role_name = p_role;
END;
$$;

-- The open (queued or running) tasks of a login's open jobs under one tenant label (NULL: none):
-- the current stages' shard counters.
CREATE FUNCTION stageflow._open_tasks(p_owner name, p_tenant text)
RETURNS bigint
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN (SELECT coalesce(sum(sh.remaining_tasks), 0)::bigint
      FROM stageflow.jobs AS j
      JOIN stageflow.stage_shards AS sh ON sh.job_id = j.job_id AND sh.stage = j.current_stage
     -- literal list: the predicate of jobs_open_owner_idx, whose use must not hang on inlining (0015_statuses.sql)
     WHERE j.owner = p_owner AND j.tenant IS NOT DISTINCT FROM p_tenant AND j.status IN ('queued', 'processing'));
END;
$$;

-- The first step of every submission (submit_job_outcome): updates the row of the login and
-- tenant label in stageflow.admissions, which the submission then holds to its commit. So a
-- login's submissions under one label take turns from here (before any other lock they take), the
-- open-task check of each counts what the ones before it committed, and under REPEATABLE READ a
-- submission whose snapshot predates another's commit fails with 40001 (serialization_failure:
-- run the transaction again) rather than counting from that snapshot.
CREATE FUNCTION stageflow._admit(p_owner name, p_tenant text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO stageflow.admissions AS a (owner, tenant, last_submitted_at)
    VALUES (p_owner, coalesce(p_tenant, ''), now())
    ON CONFLICT ON CONSTRAINT admissions_pkey DO UPDATE
       SET submissions = a.submissions + 1, last_submitted_at = excluded.last_submitted_at;
END;
$$;

-- The last step of a submission that opened tasks (a new job, a resumed one): refuses (54000) when
-- the login's open tasks under the job's tenant label, this submission's included, are more than
-- its quota. The whole submission is then rolled back: it creates nothing.
CREATE FUNCTION stageflow._check_open_tasks(p_owner name, p_tenant text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_limit bigint := (stageflow._quota(p_owner)).max_open_tasks;
    v_open  bigint := stageflow._open_tasks(p_owner, p_tenant);
BEGIN
    IF v_open > v_limit THEN
        RAISE EXCEPTION USING
            ERRCODE = '54000',
            MESSAGE = format('this submission would leave %s with %s open tasks, more than its quota of %s',
                             CASE WHEN p_tenant IS NULL THEN format('login %s', p_owner) ELSE format('tenant %s', p_tenant) END,
                             v_open, v_limit),
            HINT = 'wait for its jobs to finish (or cancel some), or an admin raises the quota with '
                   'stageflow.set_quota(role, max_open_tasks, max_tasks_per_job)';
    END IF;
END;
$$;

-- The per-job check of a stage about to be created with p_count tasks (by _create_stage_tasks,
-- before anything is inserted): the job's tasks over all its stages stay within the limit it was
-- submitted with (jobs.max_tasks: its owner's max_tasks_per_job then), a dynamic fan-out too. A
-- refusal is 54000 with a hint: a submission creates nothing; a later stage's fails its job
-- (advance_stage's stage_creation_failed).
CREATE FUNCTION stageflow._check_quota(p_job stageflow.jobs, p_stage int, p_count bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_before  bigint;
BEGIN
    SELECT coalesce(sum(s.task_count), 0) INTO v_before FROM stageflow.stages AS s WHERE s.job_id = p_job.job_id;
    IF v_before + p_count > p_job.max_tasks THEN
        RAISE EXCEPTION USING
            ERRCODE = '54000',
            MESSAGE = format('stage %s of job %s would create %s tasks, making %s in the job: more than the %s tasks it may have',
                             p_stage, p_job.job_id, p_count, v_before + p_count, p_job.max_tasks),
            HINT = 'split the work into smaller jobs, or an admin raises the limit with '
                   'stageflow.set_quota(role, max_open_tasks, max_tasks_per_job) before it is submitted';
    END IF;
END;
$$;

-- Sets a login's quotas: the most open tasks its jobs may have when it submits another, and the
-- most tasks one of its jobs may create over all its stages. NULL keeps (or goes back to) the
-- default of that limit; both NULL remove the login's row. Returns the limits now in force.
CREATE FUNCTION stageflow.set_quota(role name, max_open_tasks bigint DEFAULT NULL, max_tasks_per_job bigint DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles AS r WHERE r.rolname = set_quota.role) THEN
        RAISE EXCEPTION USING
            ERRCODE = '42704',
            MESSAGE = format('unknown role %L', set_quota.role),
            HINT = 'a quota applies to the login that submits jobs: name an existing role';
    END IF;
    IF set_quota.max_open_tasks < 0 OR set_quota.max_tasks_per_job < 0 THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('quotas cannot be negative, got max_open_tasks %s and max_tasks_per_job %s',
                             set_quota.max_open_tasks, set_quota.max_tasks_per_job),
            HINT = 'give a limit of 0 or more, or NULL for the default';
    END IF;
    IF set_quota.max_open_tasks IS NULL AND set_quota.max_tasks_per_job IS NULL THEN
        DELETE FROM stageflow.role_quotas AS q WHERE q.role_name = set_quota.role;
    ELSE
        INSERT INTO stageflow.role_quotas AS q (role_name, max_open_tasks, max_tasks_per_job, updated_at)
        VALUES (set_quota.role, set_quota.max_open_tasks, set_quota.max_tasks_per_job, now())
        ON CONFLICT ON CONSTRAINT role_quotas_pkey DO UPDATE
           SET max_open_tasks = excluded.max_open_tasks, max_tasks_per_job = excluded.max_tasks_per_job,
               updated_at = excluded.updated_at;
    END IF;
    RETURN (SELECT jsonb_build_object('role', set_quota.role, 'max_open_tasks', q.max_open_tasks,
                                      'max_tasks_per_job', q.max_tasks_per_job)
              FROM stageflow._quota(set_quota.role) AS q);
END;
$$;

-- The quotas in force and the open tasks held against them, per login and tenant label (a label's
-- jobs count against the login's quota on their own): for an admin naming no tenant, of every
-- login with a quota of its own or an open job; for anyone else, of its own login (and only the
-- label it names, if it names one). `custom` says whether the login has a row of its own
-- (stageflow.set_quota) or the defaults.
CREATE FUNCTION stageflow.list_quotas()
RETURNS TABLE (role_name name, tenant text, max_open_tasks bigint, max_tasks_per_job bigint, open_tasks bigint,
               custom boolean)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_tenant text := stageflow._tenant();
    v_all    boolean := v_tenant IS NULL AND stageflow._session_is_admin();
BEGIN
    RETURN QUERY
    SELECT r.owner, r.tenant, q.max_open_tasks, q.max_tasks_per_job, stageflow._open_tasks(r.owner, r.tenant),
           EXISTS (SELECT 1 FROM stageflow.role_quotas AS rq WHERE rq.role_name = r.owner)
      FROM (SELECT rq.role_name AS owner, NULL::text AS tenant FROM stageflow.role_quotas AS rq
             UNION
            -- literal list: the predicate of jobs_open_owner_idx, whose use must not hang on inlining (0015_statuses.sql)
            SELECT j.owner, j.tenant FROM stageflow.jobs AS j WHERE j.status IN ('queued', 'processing')
             UNION
            SELECT session_user, v_tenant) AS r
     CROSS JOIN LATERAL stageflow._quota(r.owner) AS q
     WHERE v_all OR (r.owner = session_user AND (v_tenant IS NULL OR r.tenant = v_tenant))
     ORDER BY r.owner, r.tenant NULLS FIRST;
END;
$$;
