-- Claims and completions of batches whose tasks are of several stages. A batch of one stage reads
-- that stage once (its answer, its completion's checks and shard counts); every other batch looks
-- each task's stage up: both must give each task what its own stage says.
SELECT stageflow.register_job_type('split', $$
{"parameters": {"type": "object", "properties": {"files": {"type": "array"}, "tag": {"type": "string"}}},
 "stages": [{"name": "inspect", "handler": "s.inspect", "queue": "mixed", "fan_out": "each", "param": "files", "lease_seconds": 90},
            {"name": "check", "handler": "s.check", "queue": "mixed", "fan_out": "lineage"}]}
$$);
SELECT stageflow.register_job_type('planned', $$
{"stages": [{"name": "plan", "handler": "p.plan", "queue": "mixed"},
            {"name": "work", "handler": "p.work", "queue": "mixed", "fan_out": "dynamic"}]}
$$);

DO $$
DECLARE
    v_split text := stageflow.submit_job('split', '{"files": ["a", "b", "c"], "tag": "t"}');
    v_plan_job text := stageflow.submit_job('planned', '{}');
    v_rows int := 0;
    v_plan text;
    v_first text;
    v_items jsonb;
    v_answer jsonb;
    r record;
BEGIN
    -- One claim over two jobs' stages: each row as its own stage and job say.
    FOR r IN SELECT c.*, j.job_type AS want_type, s.name AS want_name, s.handler AS want_handler,
                    coalesce(s.lease_seconds, 60) AS want_lease
               FROM stageflow.claim_tasks('mixed', 10, 60, 'w') AS c
               JOIN stageflow.jobs AS j ON j.job_id = c.job_id
               JOIN stageflow.stages AS s ON s.job_id = c.job_id AND s.stage = c.stage LOOP
        v_rows := v_rows + 1;
        ASSERT r.job_type = r.want_type AND r.stage_name = r.want_name AND r.handler = r.want_handler,
            format('row %s: %s %s %s', r.task_id, r.job_type, r.stage_name, r.handler);
        ASSERT r.effective_lease_seconds = r.want_lease, format('%s: lease %s', r.task_id, r.effective_lease_seconds);
        IF r.job_id = v_split THEN
            ASSERT r.params = jsonb_build_object('tag', 't', 'index', r.task_key::int,
                                                 'item', ('["a", "b", "c"]'::jsonb) -> r.task_key::int), r.params::text;
        ELSE
            ASSERT r.params = '{}' AND r.stage_name = 'plan', r.params::text;
            v_plan := r.task_id;
        END IF;
    END LOOP;
    ASSERT v_rows = 4, 'four tasks over two jobs, got ' || v_rows;

    -- A completion led by the planner's bad plan (the first task's stage is the dynamic one), then
    -- the other job's tasks: the plan refused, the rest accepted, the answer in the call's order.
    SELECT jsonb_build_array(jsonb_build_object('task_id', v_plan, 'result', '{"not": "a plan"}'::jsonb))
           || jsonb_agg(jsonb_build_object('task_id', t.task_id, 'result', jsonb_build_object('seen', t.task_key)) ORDER BY t.task_id)
      INTO v_items FROM stageflow.tasks AS t WHERE t.job_id = v_split AND t.stage = 1;
    v_answer := stageflow.complete_tasks(v_items, 'w', false);
    ASSERT jsonb_array_length(v_answer) = 4, v_answer::text;
    ASSERT v_answer -> 0 ->> 'task_id' = v_plan AND v_answer -> 0 -> 'error' ->> 'sqlstate' = '22023', v_answer::text;
    ASSERT (SELECT bool_and(e = jsonb_build_object('task_id', v_items -> (n::int - 1) ->> 'task_id'))
              FROM jsonb_array_elements(v_answer) WITH ORDINALITY AS x(e, n) WHERE n > 1), v_answer::text;
    ASSERT (SELECT status FROM stageflow.tasks WHERE task_id = v_plan) = 'running', 'the bad plan is not completed';
    ASSERT (SELECT current_stage FROM stageflow.jobs WHERE job_id = v_split) = 2, 'the split job advanced';

    -- Stage 2 (lineage) in one claim: each task gets its predecessor's result.
    v_rows := 0;
    FOR r IN SELECT * FROM stageflow.claim_tasks('mixed', 10, 60, 'w') LOOP
        v_rows := v_rows + 1;
        ASSERT r.stage = 2 AND r.stage_name = 'check' AND r.handler = 's.check' AND r.effective_lease_seconds = 60, r::text;
        ASSERT r.predecessor = jsonb_build_object('seen', r.task_key), r.predecessor::text;
        -- (a lineage task's params: the job's, overlaid with its predecessor's, which it keeps)
        ASSERT r.params = '{"tag": "t", "files": ["a", "b", "c"]}'::jsonb
                          || jsonb_build_object('index', r.task_key::int, 'item', ('["a", "b", "c"]'::jsonb) -> r.task_key::int),
            r.params::text;
    END LOOP;
    ASSERT v_rows = 3, 'three lineage tasks, got ' || v_rows;

    -- A batch led by a task no one knows, then one stage's tasks and the good plan of the other
    -- job's planner: every known task completed and counted on its own stage.
    SELECT min(t.task_id) INTO v_first FROM stageflow.tasks AS t WHERE t.job_id = v_split AND t.stage = 2;
    SELECT jsonb_build_array(jsonb_build_object('task_id', 'nope'))
           || jsonb_agg(jsonb_build_object('task_id', t.task_id, 'result', '{}'::jsonb) ORDER BY t.task_id DESC)
           || jsonb_build_array(jsonb_build_object('task_id', v_plan, 'result', '{"tasks": [{"key": "x"}, {"key": "y"}]}'::jsonb))
      INTO v_items FROM stageflow.tasks AS t WHERE t.job_id = v_split AND t.stage = 2;
    v_answer := stageflow.complete_tasks(v_items, 'w', false);
    ASSERT v_answer -> 0 -> 'error' ->> 'sqlstate' = '42704', v_answer::text;
    ASSERT (SELECT count(*) FROM jsonb_array_elements(v_answer) AS e WHERE NOT e ? 'error') = 4, v_answer::text;
    ASSERT (stageflow.job_status(v_split)) ->> 'status' = 'completed', (stageflow.job_status(v_split))::text;
    ASSERT (SELECT count(*) FROM stageflow.tasks WHERE job_id = v_plan_job AND stage = 2) = 2, 'the plan made two tasks';
    ASSERT (SELECT remaining_tasks FROM stageflow.stage_counts WHERE job_id = v_plan_job AND stage = 1) = 0;
    ASSERT (SELECT remaining_tasks FROM stageflow.stage_counts WHERE job_id = v_plan_job AND stage = 2) = 2;
    ASSERT (SELECT running_tasks FROM stageflow.stage_counts WHERE job_id = v_split AND stage = 2) = 0;
    ASSERT (SELECT completed_count FROM stageflow.stage_counts WHERE job_id = v_split AND stage = 2) = 3;
END;
$$;
