-- Size limits measure the JSON as text (octet_length), not as stored: a value that compresses
-- well (and arrives compressed, e.g. read from a table) is refused by its real size. Params 1 MiB,
-- a result 8 MiB, an error 64 KiB.
SELECT stageflow.register_job_type('sized', $$
{"stages": [{"name": "s", "handler": "s.s", "queue": "sized", "fan_out": "count", "param": "n"}]}
$$);
CREATE TEMP TABLE big AS
SELECT jsonb_build_object('n', 1, 'blob', repeat('x', 2000000)) AS params,
       jsonb_build_object('blob', repeat('y', 9000000)) AS result,
       jsonb_build_object('message', repeat('z', 100000)) AS error;

DO $$
DECLARE
    v_task record;
BEGIN
    ASSERT (SELECT pg_column_size(params) < 1048576 AND pg_column_size(result) < 8388608 AND pg_column_size(error) < 65536
              FROM big), 'stored compressed, each is under its limit';
    BEGIN
        PERFORM stageflow.submit_job('sized', (SELECT params FROM big));
        RAISE EXCEPTION 'params of 2 MB must be refused';
    EXCEPTION WHEN program_limit_exceeded THEN
        NULL;
    END;
    PERFORM stageflow.submit_job('sized', '{"n": 1}');
    SELECT * INTO v_task FROM stageflow.claim_tasks('sized', 1, 60, 'w');
    BEGIN
        PERFORM stageflow.complete_task_and_check_stage(v_task.task_id, (SELECT result FROM big), 'w', v_task.lease_token);
        RAISE EXCEPTION 'a result of 9 MB must be refused';
    EXCEPTION WHEN program_limit_exceeded THEN
        NULL;
    END;
    BEGIN
        PERFORM stageflow.complete_tasks(jsonb_build_array(jsonb_build_object(
            'task_id', v_task.task_id, 'lease_token', v_task.lease_token, 'result', (SELECT result FROM big))), 'w');
        RAISE EXCEPTION 'a batch with a result of 9 MB must be refused';
    EXCEPTION WHEN program_limit_exceeded THEN
        NULL;
    END;
    BEGIN
        PERFORM stageflow.fail_task(v_task.task_id, (SELECT error FROM big), true, 'w', v_task.lease_token);
        RAISE EXCEPTION 'an error of 100 kB must be refused';
    EXCEPTION WHEN program_limit_exceeded THEN
        NULL;
    END;
    ASSERT (SELECT status FROM stageflow.tasks WHERE task_id = v_task.task_id) = 'running', 'nothing was recorded';
END;
$$;
