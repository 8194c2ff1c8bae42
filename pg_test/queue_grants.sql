-- A worker role claims only from queues granted to it (stageflow.grant_queue), directly or
-- through a role it is a member of; without a grant its claim is refused (42501, with a hint) and
-- changes nothing. Superusers and members of stageflow_admin claim from every queue. A grant to
-- a role that is dropped later does not break anyone's claims. The check is on the session's
-- login, so the test switches it with SET SESSION AUTHORIZATION.
DO $$
BEGIN
    CREATE ROLE stageflow_qg_team NOLOGIN;
EXCEPTION WHEN duplicate_object THEN
    NULL;
END;
$$;
DO $$
BEGIN
    CREATE ROLE stageflow_qg_worker LOGIN IN ROLE stageflow_worker, stageflow_qg_team;
EXCEPTION WHEN duplicate_object THEN
    NULL;
END;
$$;
DO $$
BEGIN
    CREATE ROLE stageflow_qg_gone NOLOGIN;
EXCEPTION WHEN duplicate_object THEN
    NULL;
END;
$$;

SELECT stageflow.register_job_type('granted', $$
{"stages": [{"name": "s", "handler": "g.s", "queue": "granted_q", "fan_out": "count", "param": "n"}]}
$$);
SELECT stageflow.submit_job('granted', '{"n": 3}') IS NOT NULL AS submitted;
-- a stale grant: its role is dropped below
SELECT stageflow.grant_queue('granted_q', 'stageflow_qg_gone') ->> 'granted' AS granted;
DROP ROLE stageflow_qg_gone;

SET SESSION AUTHORIZATION stageflow_qg_worker;
DO $$
BEGIN
    PERFORM stageflow.claim_tasks('granted_q', 1, 60, 'w');
    RAISE EXCEPTION 'a queue not granted must be refused';
EXCEPTION WHEN insufficient_privilege THEN
    ASSERT SQLERRM = 'role stageflow_qg_worker may not claim tasks from queue ''granted_q''', SQLERRM;
END;
$$;
RESET SESSION AUTHORIZATION;
DO $$
BEGIN
    ASSERT (SELECT count(*) FROM stageflow.tasks WHERE status = 'queued') = 3, 'the refused claim changed nothing';
    ASSERT (SELECT count(*) FROM pgmq.q_granted_q WHERE read_ct = 0) = 3;
    ASSERT (stageflow.grant_queue('granted_q', 'stageflow_qg_team')) = '{"queue": "granted_q", "role": "stageflow_qg_team", "granted": true}';
    ASSERT (stageflow.grant_queue('granted_q', 'stageflow_qg_team')) ->> 'granted' = 'false', 'granting again changes nothing';
    ASSERT (SELECT array_agg(role_name::text ORDER BY role_name) FROM stageflow.list_queue_grants() WHERE queue = 'granted_q')
         = ARRAY['stageflow_qg_gone', 'stageflow_qg_team'];
    BEGIN
        PERFORM stageflow.grant_queue('granted_q', 'no_such_role');
        RAISE EXCEPTION 'an unknown role must be refused';
    EXCEPTION WHEN undefined_object THEN
        NULL;
    END;
END;
$$;

-- Through its team, the worker claims now.
SET SESSION AUTHORIZATION stageflow_qg_worker;
DO $$
BEGIN
    ASSERT (SELECT count(*) FROM stageflow.claim_tasks('granted_q', 1, 60, 'w')) = 1;
END;
$$;
RESET SESSION AUTHORIZATION;
SELECT stageflow.revoke_queue('granted_q', 'stageflow_qg_team') ->> 'revoked' AS revoked;
SET SESSION AUTHORIZATION stageflow_qg_worker;
DO $$
BEGIN
    PERFORM stageflow.claim_tasks('granted_q', 1, 60, 'w');
    RAISE EXCEPTION 'a revoked queue must be refused';
EXCEPTION WHEN insufficient_privilege THEN
    NULL;
END;
$$;
RESET SESSION AUTHORIZATION;
-- A grant to a role whose name needs quoting (capitals, a space) counts like any other, for claims
-- and reports.
DO $$
BEGIN
    CREATE ROLE "Stageflow QG Mixed" NOLOGIN;
EXCEPTION WHEN duplicate_object THEN
    NULL;
END;
$$;
GRANT "Stageflow QG Mixed" TO stageflow_qg_worker;
SELECT stageflow.grant_queue('granted_q', 'Stageflow QG Mixed') ->> 'granted' AS granted;
SET SESSION AUTHORIZATION stageflow_qg_worker;
DO $$
DECLARE
    r record;
BEGIN
    SELECT * INTO r FROM stageflow.claim_tasks('granted_q', 1, 60, 'm');
    ASSERT r.task_id IS NOT NULL, 'a grant to a role whose name needs quoting counts';
    ASSERT (stageflow.complete_task_and_check_stage(r.task_id, '{}', 'm', r.lease_token)) ->> 'task_status' = 'completed';
END;
$$;
RESET SESSION AUTHORIZATION;
SELECT stageflow.revoke_queue('granted_q', 'Stageflow QG Mixed') ->> 'revoked' AS revoked;
REVOKE "Stageflow QG Mixed" FROM stageflow_qg_worker;
-- A superuser claims from every queue (the last of the three tasks).
DO $$
BEGIN
    ASSERT (SELECT count(*) FROM stageflow.claim_tasks('granted_q', 5, 60, 'admin')) = 1;
END;
$$;

-- A worker reports only tasks of the queues granted to it: another team's running task is refused
-- (42501, with a hint) on every report path, with its lease token or with none, and nothing
-- changes. (Before, the forms that name no lease took any running task: a worker of one team
-- could complete, fail, release or keep alive another team's tasks.)
SELECT set_config('qg.task', task_id, false), set_config('qg.token', lease_token::text, false)
  FROM stageflow.tasks WHERE worker_id = 'admin' ORDER BY task_id LIMIT 1;
SET SESSION AUTHORIZATION stageflow_qg_worker;
DO $$
DECLARE
    v_task  text := current_setting('qg.task');
    v_token bigint := current_setting('qg.token')::bigint;
    v_call  text;
BEGIN
    FOREACH v_call IN ARRAY ARRAY[
        format('SELECT stageflow.complete_task_and_check_stage(%L, %L)', v_task, '{"forged": true}'),
        format('SELECT stageflow.complete_task_and_check_stage(%L, %L, %L, %s)', v_task, '{"forged": true}', 'admin', v_token),
        format('SELECT stageflow.complete_tasks(%L)', jsonb_build_array(jsonb_build_object('task_id', v_task, 'result', '{}'::jsonb))),
        format('SELECT stageflow.fail_task(%L, %L, false)', v_task, '{"message": "sabotage"}'),
        format('SELECT stageflow.fail_task(%L, %L, false, %L, %s)', v_task, '{"message": "sabotage"}', 'admin', v_token),
        format('SELECT count(*) FROM stageflow.heartbeat(ARRAY[%L], 604800)', v_task),
        format('SELECT stageflow.release_tasks(ARRAY[%L])', v_task),
        format('SELECT stageflow.release_tasks(ARRAY[%L], %L, ARRAY[%s::bigint])', v_task, 'admin', v_token)]
    LOOP
        BEGIN
            EXECUTE v_call;
            RAISE EXCEPTION 'a report on a task of a queue not granted must be refused: %', v_call;
        EXCEPTION WHEN insufficient_privilege THEN
            ASSERT SQLERRM = 'role stageflow_qg_worker may not report tasks of queue ''granted_q''', SQLERRM;
        END;
    END LOOP;
END;
$$;
RESET SESSION AUTHORIZATION;
DO $$
BEGIN
    ASSERT (SELECT status = 'running' AND worker_id = 'admin' AND result IS NULL AND errors = '[]'
                   AND lease_expires_at < stageflow.now() + interval '1 hour'
              FROM stageflow.tasks WHERE task_id = current_setting('qg.task')), 'the refused reports changed nothing';
END;
$$;
-- Granted again, the worker reports its own task (the one it claimed above).
SELECT stageflow.grant_queue('granted_q', 'stageflow_qg_team') ->> 'granted' AS granted;
SELECT set_config('qg.own', task_id, false), set_config('qg.own_token', lease_token::text, false)
  FROM stageflow.tasks WHERE worker_id = 'w';
SET SESSION AUTHORIZATION stageflow_qg_worker;
DO $$
BEGIN
    ASSERT (stageflow.complete_task_and_check_stage(current_setting('qg.own'), '{"ok": true}', 'w',
                                                    current_setting('qg.own_token')::bigint)) ->> 'task_status' = 'completed';
END;
$$;
RESET SESSION AUTHORIZATION;
