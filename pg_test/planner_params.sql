-- A planner's results add params of the task's own; they cannot replace the job's validated
-- params (a task's params overlay the job's when it is claimed, so a planner could otherwise
-- point downstream tasks at other paths or tables than the submitter's schema allowed). A plan
-- naming a job parameter is refused to the planner (22023, nothing recorded); one with keys of
-- its own is accepted and its tasks see the job's params beside their own.
SELECT stageflow.register_job_type('planned_paths', $$
{"parameters": {"type": "object", "required": ["output"], "properties": {"output": {"type": "string"}}},
 "stages": [{"name": "plan", "handler": "p.plan", "queue": "planned_paths"},
            {"name": "write", "handler": "p.write", "queue": "planned_paths", "fan_out": "dynamic"}]}
$$);

DO $$
DECLARE
    v_job     text := stageflow.submit_job('planned_paths', '{"output": "/data/team_a"}');
    v_plan    record;
    v_report  jsonb;
    v_tiles   jsonb;
BEGIN
    SELECT * INTO v_plan FROM stageflow.claim_tasks('planned_paths', 1, 60, 'w');
    v_report := stageflow.complete_tasks(jsonb_build_array(jsonb_build_object(
        'task_id', v_plan.task_id, 'lease_token', v_plan.lease_token,
        'result', '{"tasks": [{"key": "a", "params": {"tile": 1}}, {"key": "b", "params": {"tile": 2, "output": "/home/victim/.ssh"}}]}'::jsonb)), 'w');
    ASSERT v_report -> 0 -> 'error' ->> 'sqlstate' = '22023'
       AND v_report -> 0 -> 'error' ->> 'message' LIKE '%entry 1: params key "output" is a parameter of the job%', v_report::text;
    ASSERT (SELECT status FROM stageflow.tasks WHERE task_id = v_plan.task_id) = 'running', 'nothing recorded';
    BEGIN
        PERFORM stageflow.complete_task_and_check_stage(v_plan.task_id,
            '{"tasks": [{"key": "b", "params": {"output": "/elsewhere"}}]}', 'w', v_plan.lease_token);
        RAISE EXCEPTION 'a plan replacing a job parameter must be refused';
    EXCEPTION WHEN invalid_parameter_value THEN
        NULL;
    END;

    PERFORM stageflow.complete_task_and_check_stage(v_plan.task_id,
        '{"tasks": [{"key": "a", "params": {"tile": 1}}, {"key": "b", "params": {"tile": 2}}]}', 'w', v_plan.lease_token);
    SELECT jsonb_object_agg(c.task_key, c.params) INTO v_tiles FROM stageflow.claim_tasks('planned_paths', 10, 60, 'w') AS c;
    ASSERT v_tiles = '{"a": {"output": "/data/team_a", "tile": 1}, "b": {"output": "/data/team_a", "tile": 2}}', v_tiles::text;
END;
$$;
