-- complete_tasks: many completions in one call with the per-task semantics of
-- complete_task_and_check_stage; a task that cannot be completed gets an error entry and does
-- not stop the others.
SELECT stageflow.register_job_type('planned', $$
{"stages": [{"name": "plan", "handler": "p.plan", "queue": "batch"},
            {"name": "work", "handler": "p.work", "queue": "batch", "fan_out": "dynamic"}]}
$$);

DO $$
DECLARE
    v_a text := stageflow.submit_job('hello_world', '{"message": "a", "n": 3}');
    v_b text := stageflow.submit_job('hello_world', '{"message": "b", "n": 2}');
    v_plan_job text := stageflow.submit_job('planned', '{}');
    v_plan text;
    v_items jsonb;
    v_reports jsonb;
    v_queued text;
BEGIN
    SELECT jsonb_agg(jsonb_build_object('task_id', c.task_id, 'result', jsonb_build_object('greeting', c.task_key)) ORDER BY c.task_id)
      INTO v_items FROM stageflow.claim_tasks('default', 5, 60, 'w1') AS c;
    SELECT task_id INTO v_plan FROM stageflow.claim_tasks('batch', 1, 60, 'w1');
    v_queued := stageflow.submit_job('hello_world', '{"message": "c", "n": 1}');
    SELECT task_id INTO v_queued FROM stageflow.tasks WHERE job_id = v_queued;

    v_reports := stageflow.complete_tasks(
        v_items
        || jsonb_build_array(
               jsonb_build_object('task_id', 'nope'),
               jsonb_build_object('task_id', v_queued, 'result', '{}'::jsonb),
               jsonb_build_object('task_id', v_plan, 'result', '{"not": "a plan"}'::jsonb)),
        'w1');
    ASSERT jsonb_array_length(v_reports) = 8, v_reports::text;
    -- Both jobs' first stages completed in the batch: each advanced once, by one task of the batch.
    ASSERT (SELECT count(*) FROM jsonb_array_elements(v_reports) r WHERE r ->> 'stage_completed' = 'true') = 2, v_reports::text;
    ASSERT (SELECT count(*) FROM stageflow.tasks WHERE job_id = v_a AND stage = 2) = 3;
    ASSERT (SELECT count(*) FROM stageflow.tasks WHERE job_id = v_b AND stage = 2) = 2;
    ASSERT v_reports -> 5 -> 'error' ->> 'sqlstate' = '42704';
    ASSERT v_reports -> 6 -> 'error' ->> 'sqlstate' = '55000' AND v_reports -> 6 -> 'error' ->> 'message' LIKE '%not claimed%';
    ASSERT v_reports -> 7 -> 'error' ->> 'sqlstate' = '22023' AND v_reports -> 7 -> 'error' ->> 'message' LIKE '%no "tasks" array%';
    ASSERT (SELECT status FROM stageflow.tasks WHERE task_id = v_plan) = 'running', 'the bad plan is not completed';

    -- Again: the same reports for the completed ones, nothing changes.
    ASSERT (stageflow.complete_tasks(v_items, 'w1')) = (SELECT jsonb_agg(r) FROM jsonb_array_elements(v_reports) WITH ORDINALITY AS x(r, n) WHERE n <= 5);
    ASSERT (SELECT count(*) FROM stageflow.tasks WHERE job_id = v_a AND stage = 2) = 3;

    -- Another worker's batch is refused task by task.
    ASSERT (stageflow.complete_tasks(jsonb_build_array(jsonb_build_object('task_id', v_plan, 'result', '{"tasks": []}'::jsonb)), 'w2'))
           -> 0 -> 'error' ->> 'message' LIKE '%leased to worker w1%';
    ASSERT (stageflow.complete_tasks(jsonb_build_array(jsonb_build_object('task_id', v_plan, 'result', '{"tasks": [{"key": "x"}]}'::jsonb)), 'w1'))
           -> 0 ->> 'next_stage' = '2';
    ASSERT (SELECT count(*) FROM pgmq.q_batch) = 1, 'the planned task is queued';

    -- Both hello_world jobs finish through batches.
    PERFORM stageflow.complete_tasks((SELECT jsonb_agg(jsonb_build_object('task_id', c.task_id, 'result', c.predecessor))
                                        FROM stageflow.claim_tasks('default', 10) AS c));
    ASSERT (stageflow.job_status(v_a)) ->> 'status' = 'completed' AND (stageflow.job_status(v_b)) ->> 'status' = 'completed';
    ASSERT (SELECT jsonb_agg(e -> 'result' ORDER BY (e ->> 'ordinal')::int) FROM jsonb_array_elements(stageflow.job_result(v_a) -> 'entries') AS e) = '[{"greeting": "0"}, {"greeting": "1"}, {"greeting": "2"}]';
END;
$$;

-- A completion naming no task (NULL) is refused as an unknown task, and changes nothing.
DO $$
BEGIN
    PERFORM stageflow.complete_task_and_check_stage(NULL, '{}');
    RAISE EXCEPTION 'a completion of task NULL was accepted';
EXCEPTION WHEN undefined_object THEN
    ASSERT SQLERRM = 'unknown task NULL', SQLERRM;
END;
$$;

-- reports => false: the same completions, decided the same way; an accepted element's entry is
-- only {"task_id"}, a refused one still says why.
DO $$
DECLARE
    v_job text := stageflow.submit_job('hello_world', '{"message": "quiet", "n": 3}');
    v_items jsonb;
    v_reports jsonb;
BEGIN
    SELECT jsonb_agg(jsonb_build_object('task_id', c.task_id, 'result', '{}'::jsonb, 'lease_token', c.lease_token) ORDER BY c.task_id)
           FILTER (WHERE c.job_id = v_job)
      INTO v_items FROM stageflow.claim_tasks('default', 10, 60, 'wq') AS c;
    ASSERT jsonb_array_length(v_items) = 3, v_items::text;
    v_reports := stageflow.complete_tasks(v_items || jsonb_build_array(jsonb_build_object('task_id', 'nope')), 'wq', reports => false);
    ASSERT v_reports = (SELECT jsonb_agg(jsonb_build_object('task_id', i ->> 'task_id')) FROM jsonb_array_elements(v_items) AS i)
                       || jsonb_build_array(jsonb_build_object('task_id', 'nope', 'error', v_reports -> 3 -> 'error')), v_reports::text;
    ASSERT v_reports -> 3 -> 'error' ->> 'sqlstate' = '42704', v_reports::text;
    ASSERT (SELECT count(*) FROM stageflow.tasks WHERE job_id = v_job AND stage = 2) = 3, 'the stage advanced as with reports';
    -- Repeated by the same lease: accepted again, nothing changes.
    ASSERT stageflow.complete_tasks(v_items, 'wq', false)
           = (SELECT jsonb_agg(jsonb_build_object('task_id', i ->> 'task_id')) FROM jsonb_array_elements(v_items) AS i);
    ASSERT (SELECT count(*) FROM stageflow.tasks WHERE job_id = v_job AND stage = 2) = 3;
END;
$$;

-- complete_task_and_check_stage(..., report => false): the same completion, decided the same way;
-- accepted, its answer is only {"task_id"}; refused, it raises as with a report; repeated by the
-- same lease, accepted again and nothing changes.
DO $$
DECLARE
    v_job   text := stageflow.submit_job('hello_world', '{"message": "unreported", "n": 2}');
    v_tasks record;
    v_done  jsonb;
BEGIN
    FOR v_tasks IN SELECT c.task_id, c.lease_token FROM stageflow.claim_tasks('default', 10, 60, 'wu') AS c
                    WHERE c.job_id = v_job LOOP
        v_done := stageflow.complete_task_and_check_stage(v_tasks.task_id, '{"ok": 1}', 'wu', v_tasks.lease_token, report => false);
        ASSERT v_done = jsonb_build_object('task_id', v_tasks.task_id), v_done::text;
        ASSERT (SELECT t.status = 'completed' AND t.result = '{"ok": 1}' FROM stageflow.tasks AS t WHERE t.task_id = v_tasks.task_id);
        ASSERT stageflow.complete_task_and_check_stage(v_tasks.task_id, '{"ok": 1}', 'wu', v_tasks.lease_token, false) = v_done;
        BEGIN
            PERFORM stageflow.complete_task_and_check_stage(v_tasks.task_id, '{}', 'wu', v_tasks.lease_token - 1, false);
            RAISE EXCEPTION 'a report of an earlier lease was accepted';
        EXCEPTION WHEN object_not_in_prerequisite_state THEN
            ASSERT SQLERRM = format('task %s: lease %s is not its current lease (%s)', v_tasks.task_id, v_tasks.lease_token - 1, v_tasks.lease_token), SQLERRM;
        END;
    END LOOP;
    ASSERT (SELECT count(*) FROM stageflow.tasks WHERE job_id = v_job AND stage = 2) = 2, 'the stage advanced as with reports';
    ASSERT (SELECT t.result FROM stageflow.tasks AS t WHERE t.job_id = v_job AND t.stage = 1 LIMIT 1) = '{"ok": 1}';
END;
$$;

-- The reports are planned into the statements that read them, in both callers: with every
-- function call counted (track_functions = 'all'), _completion_reports is never called, while
-- _settle_completions, which cannot be inlined, is counted once per completing call. (Were it
-- not inlined, each completion would plan and run a function of its own, and nothing else would
-- fail: in complete_tasks, an argument holding a subquery stopped the inlining.)
DO $$
DECLARE
    v_job   text := stageflow.submit_job('hello_world', '{"message": "inlined", "n": 3}');
    v_items jsonb;
    v_first record;
    v_reports jsonb;
    -- (counts this backend has not yet reported, kept across transactions: compared before and after)
    v_settled bigint;
    v_reported bigint;
BEGIN
    SET LOCAL track_functions = 'all';
    v_settled := coalesce(pg_stat_get_xact_function_calls('stageflow._settle_completions'::regproc), 0);
    v_reported := coalesce(pg_stat_get_xact_function_calls('stageflow._completion_reports'::regproc), 0);
    SELECT jsonb_agg(jsonb_build_object('task_id', c.task_id, 'result', '{}'::jsonb, 'lease_token', c.lease_token) ORDER BY c.task_id)
           FILTER (WHERE c.job_id = v_job)
      INTO v_items FROM stageflow.claim_tasks('default', 10, 60, 'wi') AS c;
    ASSERT jsonb_array_length(v_items) = 3, v_items::text;
    ASSERT stageflow.complete_task_and_check_stage(v_items -> 0 ->> 'task_id', '{}', 'wi', (v_items -> 0 ->> 'lease_token')::bigint)
           ->> 'task_status' = 'completed';
    v_reports := stageflow.complete_tasks(v_items - 0, 'wi');
    ASSERT v_reports -> 0 ->> 'task_status' = 'completed' AND v_reports -> 1 ->> 'stage_completed' = 'true', v_reports::text;
    -- (complete_tasks settles through _settle_completions; a single completion that may be
    -- accepted as it stands takes its own path, and does not call it)
    ASSERT coalesce(pg_stat_get_xact_function_calls('stageflow._settle_completions'::regproc), 0) - v_settled = 1,
        'calls are counted: ' || coalesce(pg_stat_get_xact_function_calls('stageflow._settle_completions'::regproc) - v_settled, 0);
    ASSERT coalesce(pg_stat_get_xact_function_calls('stageflow._completion_reports'::regproc), 0) - v_reported = 0,
        'completion reports are inlined, not called: '
        || coalesce(pg_stat_get_xact_function_calls('stageflow._completion_reports'::regproc), 0) - v_reported;
END;
$$;

-- A batch of one stage is read with its stage row once (_settle_completions): a batch of planners
-- (the next stage dynamic) still checks each plan, refuses a bad one alone, and counts the others
-- on their shards, so that the stage advances once its last planner completes, with every plan.
SELECT stageflow.register_job_type('planned_many', $$
{"parameters": {"type": "object", "properties": {"n": {"type": "integer"}}},
 "stages": [{"name": "plan", "handler": "p.plan", "queue": "batch_planners", "fan_out": "count", "param": "n"},
            {"name": "work", "handler": "p.work", "queue": "batch_planners", "fan_out": "dynamic"}]}
$$);
DO $$
DECLARE
    v_job     text := stageflow.submit_job('planned_many', '{"n": 3}');
    v_tasks   text[];
    v_tokens  bigint[];
    v_reports jsonb;
BEGIN
    SELECT array_agg(c.task_id ORDER BY c.task_id), array_agg(c.lease_token ORDER BY c.task_id)
      INTO v_tasks, v_tokens FROM stageflow.claim_tasks('batch_planners', 3, 60, 'wp') AS c;
    ASSERT cardinality(v_tasks) = 3, v_tasks::text;
    v_reports := stageflow.complete_tasks(jsonb_build_array(
        jsonb_build_object('task_id', v_tasks[1], 'lease_token', v_tokens[1], 'result', '{"tasks": [{"key": "a"}]}'::jsonb),
        jsonb_build_object('task_id', v_tasks[2], 'lease_token', v_tokens[2], 'result', '{"not": "a plan"}'::jsonb),
        jsonb_build_object('task_id', v_tasks[3], 'lease_token', v_tokens[3], 'result', '{"tasks": [{"key": "c"}]}'::jsonb)), 'wp');
    ASSERT v_reports -> 0 ->> 'task_status' = 'completed' AND v_reports -> 2 ->> 'task_status' = 'completed', v_reports::text;
    ASSERT v_reports -> 1 -> 'error' ->> 'sqlstate' = '22023', v_reports::text;
    ASSERT (SELECT array_agg(status::text ORDER BY task_id) FROM stageflow.tasks WHERE job_id = v_job AND stage = 1)
           = ARRAY['completed', 'running', 'completed'];
    ASSERT (SELECT sum(remaining_tasks) FROM stageflow.stage_shards WHERE job_id = v_job AND stage = 1) = 1;
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.tasks WHERE job_id = v_job AND stage = 2), 'the stage waits for its last planner';
    ASSERT (SELECT count(*) FROM pgmq.q_batch_planners) = 1, 'the completed planners'' messages are deleted';
    v_reports := stageflow.complete_tasks(jsonb_build_array(
        jsonb_build_object('task_id', v_tasks[2], 'lease_token', v_tokens[2], 'result', '{"tasks": [{"key": "b"}]}'::jsonb)), 'wp');
    ASSERT v_reports -> 0 ->> 'stage_completed' = 'true', v_reports::text;
    ASSERT (SELECT array_agg(task_key ORDER BY ordinal) FROM stageflow.tasks WHERE job_id = v_job AND stage = 2) = ARRAY['a', 'b', 'c'];
END;
$$;
