-- A job's result is read a page at a time with job_result(job_id, after, limit), keyed by the last
-- stage's task ordinal: the completed tasks of the last stage (one entry, its task, for a single or
-- fan_in last stage). job_status carries only result_count. Only a completed job has a result;
-- another login's job is unknown (42704); a bad limit is refused (22023) and changes nothing.
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['stageflow_res_alice', 'stageflow_res_bob'] LOOP
        BEGIN
            EXECUTE format('CREATE ROLE %I LOGIN', r);
        EXCEPTION WHEN duplicate_object THEN
            NULL;
        END;
    END LOOP;
END;
$$;
GRANT stageflow_submitter TO stageflow_res_alice, stageflow_res_bob;

SELECT stageflow.register_job_type('paged', $$
{"parameters": {"type": "object", "properties": {"n": {"type": "integer"}}},
 "retry": {"max_attempts": 1},
 "stages": [{"name": "parts", "handler": "r.part", "queue": "res_q", "fan_out": "count", "param": "n", "max_failed_tasks": 1}]}
$$);
SELECT stageflow.register_job_type('summed', $$
{"parameters": {"type": "object", "properties": {"n": {"type": "integer"}}},
 "stages": [{"name": "parts", "handler": "r.part", "queue": "res_q", "fan_out": "count", "param": "n"},
            {"name": "sum", "handler": "r.sum", "queue": "res_q"}]}
$$);

SET SESSION AUTHORIZATION stageflow_res_alice;
CREATE TEMP TABLE alice_job AS SELECT stageflow.submit_job('paged', '{"n": 5}') AS job_id;
GRANT SELECT ON alice_job TO PUBLIC;
-- A job that is not finished has no result yet: 55000, with a hint.
DO $$
DECLARE
    v_job text := (SELECT job_id FROM alice_job);
BEGIN
    ASSERT (stageflow.job_status(v_job)) -> 'result_count' = 'null'::jsonb, 'no result count before the end';
    ASSERT NOT (stageflow.job_status(v_job)) ? 'result', 'job_status carries no result';
    BEGIN
        PERFORM stageflow.job_result(v_job);
        RAISE EXCEPTION 'a queued job has no result';
    EXCEPTION WHEN object_not_in_prerequisite_state THEN
        DECLARE
            v_hint text;
        BEGIN
            GET STACKED DIAGNOSTICS v_hint = PG_EXCEPTION_HINT;
            ASSERT SQLERRM = format('job %s has no result: it is queued', v_job), SQLERRM;
            ASSERT v_hint LIKE '%stageflow.job_status%', v_hint;
        END;
    END;
END;
$$;
RESET SESSION AUTHORIZATION;

-- Its five tasks complete (the worker's part, done here by the superuser).
SELECT stageflow.complete_tasks((SELECT jsonb_agg(jsonb_build_object('task_id', c.task_id, 'result', jsonb_build_object('part', c.task_key::int * 10)))
                                   FROM stageflow.claim_tasks('res_q', 10) AS c));

SET SESSION AUTHORIZATION stageflow_res_alice;
DO $$
DECLARE
    v_job    text := (SELECT job_id FROM alice_job);
    v_status jsonb := stageflow.job_status(v_job);
    v_page   jsonb;
    v_after  int;
    v_all    jsonb := '[]';
    v_pages  int := 0;
BEGIN
    ASSERT v_status ->> 'status' = 'completed', v_status::text;
    ASSERT v_status -> 'result_count' = '5'::jsonb, v_status::text;
    ASSERT NOT v_status ? 'result', 'job_status carries no result';

    -- The default page: everything, in task order, with each task's key and id.
    v_page := stageflow.job_result(v_job);
    ASSERT v_page - 'entries' = jsonb_build_object('job_id', v_job, 'status', 'completed', 'fan_out', 'count', 'next_after', NULL),
        v_page::text;
    ASSERT v_page -> 'entries' = (SELECT jsonb_agg(jsonb_build_object('ordinal', t.task_key::int, 'task_key', t.task_key, 'task_id', t.task_id,
                                                                        'result', jsonb_build_object('part', t.task_key::int * 10))
                                                     ORDER BY t.task_key::int)
                                    FROM stageflow.job_tasks(v_job) AS t),
        v_page ->> 'entries';
    -- The results in order are exactly what jobs.result held before: the array of the last stage's results.
    ASSERT (SELECT jsonb_agg(e -> 'result' ORDER BY (e ->> 'ordinal')::int) FROM jsonb_array_elements(v_page -> 'entries') AS e)
           = '[{"part": 0}, {"part": 10}, {"part": 20}, {"part": 30}, {"part": 40}]';

    -- Pages of 2: ordinals 0-1 (next 1), 2-3 (next 3), 4 (last: next_after NULL).
    v_page := stageflow.job_result(v_job, NULL, 2);
    ASSERT (SELECT array_agg((e ->> 'ordinal')::int) FROM jsonb_array_elements(v_page -> 'entries') AS e) = ARRAY[0, 1]
       AND v_page -> 'next_after' = '1', v_page::text;
    v_page := stageflow.job_result(v_job, 1, 2);
    ASSERT (SELECT array_agg((e ->> 'ordinal')::int) FROM jsonb_array_elements(v_page -> 'entries') AS e) = ARRAY[2, 3]
       AND v_page -> 'next_after' = '3', v_page::text;
    v_page := stageflow.job_result(v_job, 3, 2);
    ASSERT (SELECT array_agg((e ->> 'ordinal')::int) FROM jsonb_array_elements(v_page -> 'entries') AS e) = ARRAY[4]
       AND v_page -> 'next_after' = 'null', v_page::text;
    -- A page that ends exactly at the last entry is the last page: no empty page after it.
    v_page := stageflow.job_result(v_job, 2, 2);
    ASSERT (SELECT array_agg((e ->> 'ordinal')::int) FROM jsonb_array_elements(v_page -> 'entries') AS e) = ARRAY[3, 4]
       AND v_page -> 'next_after' = 'null', v_page::text;
    v_page := stageflow.job_result(v_job, NULL, 5);
    ASSERT jsonb_array_length(v_page -> 'entries') = 5 AND v_page -> 'next_after' = 'null', v_page::text;
    v_page := stageflow.job_result(v_job, NULL, 4);
    ASSERT jsonb_array_length(v_page -> 'entries') = 4 AND v_page -> 'next_after' = '3', v_page::text;
    -- After the last ordinal, or far past it: an empty last page. A negative after is the start.
    v_page := stageflow.job_result(v_job, 4, 2);
    ASSERT v_page -> 'entries' = '[]' AND v_page -> 'next_after' = 'null', v_page::text;
    ASSERT stageflow.job_result(v_job, 1000000) -> 'entries' = '[]';
    ASSERT stageflow.job_result(v_job, -7) = stageflow.job_result(v_job);
    ASSERT stageflow.job_result(v_job, NULL, 1) -> 'entries' -> 0 ->> 'ordinal' = '0';
    ASSERT jsonb_array_length(stageflow.job_result(v_job, NULL, 10000) -> 'entries') = 5;

    -- Walking the pages of 1 through next_after gives the whole result, once.
    LOOP
        v_page := stageflow.job_result(v_job, v_after, 1);
        v_pages := v_pages + 1;
        v_all := v_all || (v_page -> 'entries');
        v_after := (v_page ->> 'next_after')::int;
        EXIT WHEN v_after IS NULL;
        ASSERT v_pages < 10, 'next_after must end';
    END LOOP;
    ASSERT v_pages = 5 AND v_all = stageflow.job_result(v_job) -> 'entries', v_all::text;
END;
$$;

-- Bad limits: 22023 with a message and a hint, nothing changed.
DO $$
DECLARE
    v_job    text := (SELECT job_id FROM alice_job);
    v_before text := stageflow.job_status(v_job)::text;
    v_limit  int;
    v_hint   text;
BEGIN
    FOREACH v_limit IN ARRAY ARRAY[NULL, 0, -1, 10001] LOOP
        BEGIN
            PERFORM stageflow.job_result(v_job, NULL, v_limit);
            RAISE EXCEPTION 'limit % was taken', v_limit;
        EXCEPTION WHEN invalid_parameter_value THEN
            GET STACKED DIAGNOSTICS v_hint = PG_EXCEPTION_HINT;
            ASSERT SQLERRM = format('limit must be between 1 and 10000, got %s', coalesce(v_limit::text, 'NULL')), SQLERRM;
            ASSERT v_hint LIKE '%next_after%', v_hint;
        END;
    END LOOP;
    -- A bad limit is refused before the job is looked at: the same for an unknown job.
    BEGIN
        PERFORM stageflow.job_result('nope', NULL, 0);
        RAISE EXCEPTION 'limit 0 was taken';
    EXCEPTION WHEN invalid_parameter_value THEN
        NULL;
    END;
    ASSERT stageflow.job_status(v_job)::text = v_before, 'a refused call changes nothing';
END;
$$;

-- Another login: alice's job is unknown to bob (the same 42704 as a job that does not exist).
SET SESSION AUTHORIZATION stageflow_res_bob;
DO $$
DECLARE
    v_job text := (SELECT job_id FROM alice_job);
    v_id  text;
BEGIN
    FOREACH v_id IN ARRAY ARRAY[v_job, 'nope'] LOOP
        BEGIN
            PERFORM stageflow.job_result(v_id);
            RAISE EXCEPTION 'bob must not read the result of %', v_id;
        EXCEPTION WHEN undefined_object THEN
            ASSERT SQLERRM = format('unknown job %L', v_id), SQLERRM;
        END;
    END LOOP;
END;
$$;
RESET SESSION AUTHORIZATION;

-- An admin reads it; a tenant label narrows what even an admin sees.
DO $$
DECLARE
    v_job text := (SELECT job_id FROM alice_job);
BEGIN
    ASSERT jsonb_array_length(stageflow.job_result(v_job) -> 'entries') = 5;
    PERFORM set_config('stageflow.tenant', 'other', true);
    BEGIN
        PERFORM stageflow.job_result(v_job);
        RAISE EXCEPTION 'a tenant label hides other logins'' jobs';
    EXCEPTION WHEN undefined_object THEN
        NULL;
    END;
END;
$$;

-- completed_with_errors: only the completed tasks are entries (the failed one has no result), and
-- pages skip it: result_count counts the entries.
DO $$
DECLARE
    v_job  text := stageflow.submit_job('paged', '{"n": 3}');
    r      record;
    v_page jsonb;
BEGIN
    FOR r IN SELECT * FROM stageflow.claim_tasks('res_q', 10) ORDER BY task_key LOOP
        IF r.task_key = '1' THEN
            PERFORM stageflow.fail_task(r.task_id, '{"message": "broken part"}', false);
        ELSE
            PERFORM stageflow.complete_task_and_check_stage(r.task_id, jsonb_build_object('part', r.task_key));
        END IF;
    END LOOP;
    ASSERT (stageflow.job_status(v_job)) ->> 'status' = 'completed_with_errors', (stageflow.job_status(v_job))::text;
    ASSERT (stageflow.job_status(v_job)) -> 'result_count' = '2';
    v_page := stageflow.job_result(v_job);
    ASSERT v_page ->> 'status' = 'completed_with_errors' AND v_page -> 'next_after' = 'null', v_page::text;
    ASSERT (SELECT jsonb_agg(jsonb_build_array(e -> 'ordinal', e -> 'task_key', e -> 'result')) FROM jsonb_array_elements(v_page -> 'entries') AS e)
           = '[[0, "0", {"part": "0"}], [2, "2", {"part": "2"}]]', v_page::text;
    v_page := stageflow.job_result(v_job, NULL, 1);
    ASSERT v_page -> 'entries' -> 0 ->> 'ordinal' = '0' AND v_page -> 'next_after' = '0', v_page::text;
    v_page := stageflow.job_result(v_job, 0, 1);
    ASSERT v_page -> 'entries' -> 0 ->> 'ordinal' = '2' AND jsonb_array_length(v_page -> 'entries') = 1
       AND v_page -> 'next_after' = 'null', 'the failed ordinal 1 is skipped: ' || v_page::text;
END;
$$;

-- A single last stage: one entry, its task, whose result is the job's; the stages before it
-- (three tasks here) are not part of the result.
DO $$
DECLARE
    v_job  text := stageflow.submit_job('summed', '{"n": 3}');
    v_page jsonb;
BEGIN
    PERFORM stageflow.complete_tasks((SELECT jsonb_agg(jsonb_build_object('task_id', c.task_id, 'result', '{"x": 1}'::jsonb))
                                        FROM stageflow.claim_tasks('res_q', 10) AS c));
    PERFORM stageflow.complete_tasks((SELECT jsonb_agg(jsonb_build_object('task_id', c.task_id, 'result', '{"sum": 3}'::jsonb))
                                        FROM stageflow.claim_tasks('res_q', 10) AS c));
    ASSERT (stageflow.job_status(v_job)) ->> 'status' = 'completed';
    ASSERT (stageflow.job_status(v_job)) -> 'result_count' = '1';
    v_page := stageflow.job_result(v_job);
    ASSERT v_page ->> 'fan_out' = 'single' AND v_page -> 'next_after' = 'null', v_page::text;
    ASSERT v_page -> 'entries' = jsonb_build_array(jsonb_build_object(
               'ordinal', 0, 'task_key', '0', 'task_id', (SELECT task_id FROM stageflow.tasks WHERE job_id = v_job AND stage = 2),
               'result', '{"sum": 3}'::jsonb)), v_page::text;
    ASSERT stageflow.job_result(v_job, 0) -> 'entries' = '[]';
END;
$$;

-- A failed job and a cancelled one have no result: 55000, whose hint says where to look.
DO $$
DECLARE
    v_failed    text := stageflow.submit_job('summed', '{"n": 1}');
    v_cancelled text := stageflow.submit_job('paged', '{"n": 1}');
    v_job       text;
    v_hint      text;
BEGIN
    PERFORM stageflow.fail_task(c.task_id, '{"message": "no"}', false) FROM stageflow.claim_tasks('res_q', 10) AS c
      WHERE c.job_id = v_failed;
    PERFORM stageflow.cancel_job(v_cancelled);
    ASSERT (stageflow.job_status(v_failed)) ->> 'status' = 'failed' AND (stageflow.job_status(v_cancelled)) ->> 'status' = 'cancelled';
    FOREACH v_job IN ARRAY ARRAY[v_failed, v_cancelled] LOOP
        ASSERT (stageflow.job_status(v_job)) -> 'result_count' = 'null'::jsonb;
        BEGIN
            PERFORM stageflow.job_result(v_job);
            RAISE EXCEPTION 'an ended job without a result answered';
        EXCEPTION WHEN object_not_in_prerequisite_state THEN
            GET STACKED DIAGNOSTICS v_hint = PG_EXCEPTION_HINT;
            ASSERT SQLERRM LIKE format('job %s has no result: it is %%', v_job), SQLERRM;
            ASSERT v_hint LIKE '%stageflow.job_tasks%', v_hint;
        END;
    END LOOP;
END;
$$;

-- A job whose last stage fans out to nothing completed with an empty result.
SELECT stageflow.register_job_type('nothing_paged', $$
{"parameters": {"type": "object", "properties": {"n": {"type": "integer"}}},
 "stages": [{"name": "none", "handler": "r.none", "queue": "res_q", "fan_out": "count", "param": "n"}]}
$$);
DO $$
DECLARE
    v_job text := stageflow.submit_job('nothing_paged', '{"n": 0}');
BEGIN
    ASSERT (stageflow.job_status(v_job)) ->> 'status' = 'completed';
    ASSERT (stageflow.job_status(v_job)) -> 'result_count' = '0';
    ASSERT stageflow.job_result(v_job) - 'job_id' = '{"status": "completed", "fan_out": "count", "entries": [], "next_after": null}', stageflow.job_result(v_job)::text;
END;
$$;

-- A job's tasks are read through tasks_stage_idx, which names the job by a hash of its id: the
-- one predicate every such read uses (stageflow._is_task_of_job) is inlined, and the index serves
-- it. (Were the call not inlined, the planner could not match the index and would scan the table,
-- and nothing else would fail.)
DO $$
DECLARE
    v_plan text;
BEGIN
    SET LOCAL enable_seqscan = off;
    SET LOCAL enable_bitmapscan = off;
    EXECUTE 'EXPLAIN (FORMAT JSON) SELECT t.task_id FROM stageflow.tasks AS t
              WHERE stageflow._is_task_of_job(t.job_id, ''0123'') AND t.stage = 1 ORDER BY t.ordinal'
       INTO v_plan;
    ASSERT v_plan LIKE '%"Index Name": "tasks_stage_idx"%"Index Cond": "((hashtextextended(job_id, %',
        'a job''s tasks are read through tasks_stage_idx, by the hash of its id: ' || v_plan;
    ASSERT v_plan NOT LIKE '%"Node Type": "Sort"%', 'in task order, without a sort: ' || v_plan;
END;
$$;
