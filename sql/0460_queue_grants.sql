-- Queue grants: a worker role claims only from the queues granted to it (or to a role it is a
-- member of), and reports (completes, fails, heartbeats, releases) only tasks of those queues;
-- superusers and members of stageflow_admin claim from and report on every queue. claim_tasks
-- and stageflow._check_report_grants check them against the session's login.

-- Whether p_queue is granted to the session's login or to a role it is a member of: the grant
-- rule of claims (claim_tasks) and reports (_check_report_grants), each of which first exempts
-- superusers and members of stageflow_admin (stageflow._session_is_admin(), asked alone: an
-- expression without a query, which PL/pgSQL evaluates without starting the executor). A grant
-- to a role dropped since counts for no one (to_regrole finds no such role). (Joined to the
-- pg_roles view instead, a claim and a completion by a worker login cost 65,000 instructions
-- more, bench/README.md.)
-- No SET clause: a claim- and completion-path helper that runs under its callers' fixed search path
-- (ARCHITECTURE.md, Conventions; security.rs).
CREATE FUNCTION stageflow._queue_granted_to_session(p_queue text)
RETURNS boolean
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM stageflow.queue_grants AS g
                    WHERE g.queue = p_queue
                      AND pg_catalog.pg_has_role(session_user,
                                                 pg_catalog.to_regrole(pg_catalog.quote_ident(g.role_name))::pg_catalog.oid,
                                                 'MEMBER'));
END;
$$;

-- Refuses (42501) a report naming a task of a queue the session's login may not claim from,
-- before the report changes anything: without it, a worker of one team could complete, fail,
-- release or keep alive another team's running tasks with the forms that name no lease (and
-- guess the small tokens of the others). Called by every report path (_settle_completions,
-- fail_task, _lock_leases); ids of no task are left to the caller's own refusal. The first queue
-- refused, by name, is the one named in the error.
-- No SET clause: a completion-path helper that runs under its callers' fixed search path
-- (ARCHITECTURE.md, Conventions; security.rs).
CREATE FUNCTION stageflow._check_report_grants(p_task_ids text[])
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_queue text;
BEGIN
    IF stageflow._session_is_admin() THEN
        RETURN;
    END IF;
    IF cardinality(p_task_ids) = 1 THEN
        -- (one task, the usual report: its queue by its key, without a DISTINCT over a set)
        SELECT s.queue INTO v_queue
          FROM stageflow.tasks AS t
          JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
         WHERE t.task_id = p_task_ids[1];
        IF NOT FOUND OR stageflow._queue_granted_to_session(v_queue) THEN
            RETURN;
        END IF;
    ELSE
        SELECT q.queue INTO v_queue
          FROM (SELECT DISTINCT s.queue
                  FROM stageflow.tasks AS t
                  JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
                 WHERE t.task_id = ANY (p_task_ids)) AS q
         WHERE NOT stageflow._queue_granted_to_session(q.queue)
         ORDER BY q.queue
         LIMIT 1;
        IF NOT FOUND THEN
            RETURN;
        END IF;
    END IF;
    RAISE EXCEPTION USING
        ERRCODE = '42501',
        MESSAGE = format('role %s may not report tasks of queue %L', session_user, v_queue),
        HINT = 'a worker reports only tasks of the queues granted to it or to a role it is a member of (stageflow.grant_queue), as it claims';
END;
$$;

-- Lets p_role (a role name, often a group role of workers) claim tasks from p_queue. Granting
-- what is granted already changes nothing. Returns {"queue", "role", "granted"}.
CREATE FUNCTION stageflow.grant_queue(queue text, role name)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_new  boolean;
    v_make boolean;
BEGIN
    v_make := stageflow._check_queue(grant_queue.queue);
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles AS r WHERE r.rolname = grant_queue.role) THEN
        RAISE EXCEPTION USING
            ERRCODE = '42704',
            MESSAGE = format('unknown role %L', grant_queue.role),
            HINT = 'grant a queue to an existing role, e.g. a group role your worker logins are members of';
    END IF;
    IF v_make THEN
        PERFORM stageflow._ensure_queue(grant_queue.queue);
    END IF;
    INSERT INTO stageflow.queue_grants (queue, role_name) VALUES (grant_queue.queue, grant_queue.role)
    ON CONFLICT ON CONSTRAINT queue_grants_pkey DO NOTHING;
    v_new := FOUND;
    RETURN jsonb_build_object('queue', grant_queue.queue, 'role', grant_queue.role, 'granted', v_new);
END;
$$;

-- Takes a queue grant back: p_role's members claim from p_queue no more (unless another grant
-- or their own role lets them). Returns {"queue", "role", "revoked"}.
CREATE FUNCTION stageflow.revoke_queue(queue text, role name)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_gone boolean;
BEGIN
    DELETE FROM stageflow.queue_grants AS g WHERE g.queue = revoke_queue.queue AND g.role_name = revoke_queue.role;
    v_gone := FOUND;
    RETURN jsonb_build_object('queue', revoke_queue.queue, 'role', revoke_queue.role, 'revoked', v_gone);
END;
$$;

-- The queue grants, by queue and role.
CREATE FUNCTION stageflow.list_queue_grants()
RETURNS TABLE (queue text, role_name name, granted_at timestamptz)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY SELECT g.queue, g.role_name, g.granted_at FROM stageflow.queue_grants AS g ORDER BY g.queue, g.role_name;
END;
$$;
