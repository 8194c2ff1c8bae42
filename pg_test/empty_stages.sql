-- Stages that fan out to nothing are passed through in the same call.
SELECT stageflow.register_job_type('sparse', $$
{
  "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}},
  "stages": [
    {"name": "plan",   "handler": "s.plan",   "queue": "sparse"},
    {"name": "work",   "handler": "s.work",   "queue": "sparse", "fan_out": "dynamic"},
    {"name": "follow", "handler": "s.follow", "queue": "sparse", "fan_out": "lineage"},
    {"name": "sum",    "handler": "s.sum",    "queue": "sparse", "fan_out": "fan_in"}
  ]
}
$$);
SELECT stageflow.register_job_type('nothing', $$
{"stages": [{"name": "many", "handler": "n.many", "queue": "sparse", "fan_out": "count", "param": "n"},
            {"name": "after", "handler": "n.after", "queue": "sparse", "fan_out": "lineage"}]}
$$);

DO $$
DECLARE
    v_job text;
    r record;
BEGIN
    -- A planner that plans nothing: dynamic and lineage stages are empty, fan_in gets [].
    v_job := stageflow.submit_job('sparse', '{}');
    SELECT * INTO r FROM stageflow.claim_tasks('sparse', 5);
    ASSERT (stageflow.complete_task_and_check_stage(r.task_id, '{"tasks": []}')) ->> 'next_stage' = '2';
    ASSERT (SELECT current_stage FROM stageflow.jobs WHERE job_id = v_job) = 4, 'empty stages passed through';
    ASSERT (SELECT array_agg(status ORDER BY stage) FROM stageflow.stages WHERE job_id = v_job)
         = ARRAY['completed', 'completed', 'completed', 'active'];
    SELECT * INTO r FROM stageflow.claim_tasks('sparse', 5);
    ASSERT r.stage = 4 AND r.inputs = '[]'::jsonb, 'fan-in of nothing: ' || coalesce(r.inputs::text, 'NULL');
    PERFORM stageflow.complete_task_and_check_stage(r.task_id, '{"total": 0}');
    ASSERT (stageflow.job_status(v_job)) ->> 'status' = 'completed';

    -- A job whose every stage is empty completes at submit; its result is the empty list.
    v_job := stageflow.submit_job('nothing', '{"n": 0}');
    ASSERT (stageflow.job_status(v_job)) ->> 'status' = 'completed';
    ASSERT stageflow.job_result(v_job) -> 'entries' = '[]'::jsonb AND (stageflow.job_status(v_job)) -> 'result_count' = '0';
    ASSERT NOT EXISTS (SELECT 1 FROM pgmq.q_sparse);
END;
$$;
