-- Every fan-out rule in one job: each -> dynamic -> lineage -> fan_in, driven through the SQL API.
SELECT stageflow.register_job_type('pipeline', $$
{
  "parameters": {"type": "object", "required": ["files"],
                 "properties": {"files": {"type": "array", "items": {"type": "string"}}, "tag": {"type": "string"}}},
  "stages": [
    {"name": "inspect", "handler": "p.inspect", "queue": "pipe", "fan_out": "each", "param": "files"},
    {"name": "tiles",   "handler": "p.tile",    "queue": "pipe", "fan_out": "dynamic"},
    {"name": "check",   "handler": "p.check",   "queue": "pipe", "fan_out": "lineage"},
    {"name": "catalog", "handler": "p.catalog", "queue": "pipe", "fan_out": "fan_in"}
  ]
}
$$);

CREATE TEMP TABLE job AS SELECT stageflow.submit_job('pipeline', '{"files": ["a.tif", "b.tif"], "tag": "t1"}') AS id;

DO $$
DECLARE
    v_job text := (SELECT id FROM job);
    r record;
    n int := 0;
BEGIN
    -- Stage 1, each: one task per file, key = index, params = job params without the array + item.
    FOR r IN SELECT * FROM stageflow.claim_tasks('pipe', 10) ORDER BY task_key LOOP
        n := n + 1;
        ASSERT r.task_id = left(v_job, 16) || '-s1-' || r.task_key, 'task id format: ' || r.task_id;
        ASSERT r.params = jsonb_build_object('tag', 't1', 'index', n - 1, 'item', ('["a.tif", "b.tif"]'::jsonb) -> (n - 1)),
            'each params: ' || r.params::text;
        ASSERT r.stage_name = 'inspect' AND r.handler = 'p.inspect' AND r.attempt = 1;
        -- each file plans two tiles; file b's plan comes first in completion order on purpose
        PERFORM stageflow.complete_task_and_check_stage(r.task_id, jsonb_build_object('tasks', jsonb_build_array(
            jsonb_build_object('key', 'tile_' || (r.params ->> 'item') || '_0', 'params', jsonb_build_object('x', 0)),
            jsonb_build_object('key', 'tile_' || (r.params ->> 'item') || '_1', 'params', jsonb_build_object('x', 1)))));
    END LOOP;
    ASSERT n = 2, 'two each-tasks, got ' || n;

    -- Stage 2, dynamic: the planned entries in task order, with their keys and params.
    n := 0;
    FOR r IN SELECT * FROM stageflow.claim_tasks('pipe', 10) LOOP
        n := n + 1;
        ASSERT r.stage = 2 AND r.params ? 'x' AND r.params ->> 'tag' = 't1', 'dynamic params: ' || r.params::text;
        PERFORM stageflow.complete_task_and_check_stage(r.task_id, jsonb_build_object('cog', r.task_key));
    END LOOP;
    ASSERT n = 4, 'four planned tiles, got ' || n;
    ASSERT (SELECT array_agg(task_key ORDER BY ordinal) FROM stageflow.tasks WHERE job_id = v_job AND stage = 2)
         = ARRAY['tile_a.tif_0', 'tile_a.tif_1', 'tile_b.tif_0', 'tile_b.tif_1'], 'dynamic keys in plan order';

    -- Stage 3, lineage: same keys, each with its predecessor's result.
    n := 0;
    FOR r IN SELECT * FROM stageflow.claim_tasks('pipe', 10) LOOP
        n := n + 1;
        ASSERT r.predecessor = jsonb_build_object('cog', r.task_key), 'lineage predecessor: ' || r.predecessor::text;
        ASSERT r.task_id = left(v_job, 16) || '-s3-' || r.task_key;
        PERFORM stageflow.complete_task_and_check_stage(r.task_id, jsonb_build_object('valid', r.task_key));
    END LOOP;
    ASSERT n = 4;

    -- Stage 4, fan_in: one task with every result in task order.
    SELECT * INTO r FROM stageflow.claim_tasks('pipe', 10);
    ASSERT r.task_key = '0' AND r.predecessor IS NULL;
    ASSERT r.inputs = '[{"valid": "tile_a.tif_0"}, {"valid": "tile_a.tif_1"}, {"valid": "tile_b.tif_0"}, {"valid": "tile_b.tif_1"}]',
        'fan-in inputs: ' || r.inputs::text;
    ASSERT (stageflow.complete_task_and_check_stage(r.task_id, '{"catalog": 4}')) ->> 'job_status' = 'completed';
    -- The last stage is fan_in: the job's result is its one task's result.
    ASSERT (stageflow.job_result(v_job)) -> 'entries' -> 0 -> 'result' = '{"catalog": 4}';
    ASSERT jsonb_array_length(stageflow.job_result(v_job) -> 'entries') = 1 AND stageflow.job_result(v_job) ->> 'fan_out' = 'fan_in';
    ASSERT NOT EXISTS (SELECT 1 FROM pgmq.q_pipe), 'no message left';
END;
$$;
