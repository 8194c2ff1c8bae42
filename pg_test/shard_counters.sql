-- The sharded stage counters stay exact on the rare paths: a claim that finds messages of a job
-- that ended without cancelling them (a cancel skips rows other sessions hold) cancels those tasks
-- and moves their shards; retry_job moves them back; the counters always equal the task rows.
SELECT stageflow.register_job_type('sharded', $$
{"retry": {"max_attempts": 1},
 "stages": [{"name": "one", "handler": "s.one", "queue": "shq", "fan_out": "count", "param": "n"},
            {"name": "two", "handler": "s.two", "queue": "shq", "fan_out": "fan_in"}]}
$$);

CREATE FUNCTION pg_temp.counters_agree(p_job text) RETURNS boolean LANGUAGE sql AS $$
    SELECT c.remaining_tasks = (SELECT count(*) FROM stageflow.tasks AS t
                                 WHERE t.job_id = s.job_id AND t.stage = s.stage AND t.status IN ('queued', 'running'))
       AND c.completed_count = (SELECT count(*) FROM stageflow.tasks AS t
                                 WHERE t.job_id = s.job_id AND t.stage = s.stage AND t.status = 'completed')
       AND s.open_shards = (SELECT count(*) FROM stageflow.stage_shards AS sh
                             WHERE sh.job_id = s.job_id AND sh.stage = s.stage AND sh.remaining_tasks > 0)
      FROM stageflow.stages AS s JOIN stageflow.stage_counts AS c USING (job_id, stage)
     WHERE s.job_id = p_job AND s.stage = 1
$$;

DO $$
DECLARE
    v_job text := stageflow.submit_job('sharded', '{"n": 40}');
    v_claimed int;
BEGIN
    ASSERT (SELECT (shards, open_shards) = (16, 16) FROM stageflow.stages WHERE job_id = v_job AND stage = 1);
    ASSERT (SELECT array_agg(remaining_tasks::int ORDER BY shard) FROM stageflow.stage_shards WHERE job_id = v_job)
           = ARRAY[3,3,3,3,3,3,3,3,2,2,2,2,2,2,2,2], '40 tasks over 16 shards: ordinals 0-7 three times';
    -- 10 complete, then the job ends as if a cancel had skipped every task (the rows held
    -- elsewhere): the job row says cancelled, the tasks are still open, their messages still queued.
    PERFORM stageflow.complete_task_and_check_stage(c.task_id, '{}') FROM stageflow.claim_tasks('shq', 10) AS c;
    ASSERT pg_temp.counters_agree(v_job);
    UPDATE stageflow.jobs SET status = 'cancelled', completed_at = now() WHERE job_id = v_job;
    -- The next claims find only stale messages: nothing is claimed, the 30 open tasks are
    -- cancelled and their shards emptied, none of it advancing the ended job.
    SELECT count(*) INTO v_claimed FROM stageflow.claim_tasks('shq', 100);
    ASSERT v_claimed = 0, 'nothing claimable in an ended job';
    ASSERT NOT EXISTS (SELECT 1 FROM pgmq.q_shq), 'stale messages deleted';
    ASSERT (SELECT count(*) FROM stageflow.tasks WHERE job_id = v_job AND status = 'cancelled') = 30;
    ASSERT (SELECT open_shards FROM stageflow.stages WHERE job_id = v_job AND stage = 1) = 0;
    ASSERT pg_temp.counters_agree(v_job);
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.stages WHERE job_id = v_job AND stage = 2), 'an ended job does not advance';

    -- retry_job re-opens the 30: their shards fill again, and the job finishes normally.
    ASSERT (stageflow.retry_job(v_job)) ->> 'retried_tasks' = '30';
    ASSERT (SELECT open_shards FROM stageflow.stages WHERE job_id = v_job AND stage = 1) = 16;
    ASSERT pg_temp.counters_agree(v_job);
    PERFORM stageflow.complete_tasks(jsonb_agg(jsonb_build_object('task_id', c.task_id))) FROM stageflow.claim_tasks('shq', 100) AS c;
    ASSERT pg_temp.counters_agree(v_job);
    ASSERT (SELECT completed_by IS NOT NULL FROM stageflow.stages WHERE job_id = v_job AND stage = 1);
    PERFORM stageflow.complete_task_and_check_stage(c.task_id, '{"all": true}') FROM stageflow.claim_tasks('shq', 10) AS c;
    ASSERT (stageflow.job_status(v_job)) ->> 'status' = 'completed';
    ASSERT (stageflow.job_status(v_job)) -> 'stages' -> 0 -> 'tasks' = '{"queued": 0, "running": 0, "completed": 40, "failed": 0, "cancelled": 0}'::jsonb,
           (stageflow.job_status(v_job)) -> 'stages' -> 0 ->> 'tasks';
END;
$$;

-- A job that ended while two of its tasks were still running (a cancel skips rows other sessions
-- hold): their completions are recorded and empty the stage's shards, but report no stage
-- completed and no next stage, since nothing advances in an ended job.
DO $$
DECLARE
    v_job text := stageflow.submit_job('sharded', '{"n": 2}');
    v_ids text[];
    v_report jsonb;
BEGIN
    SELECT array_agg(task_id ORDER BY task_id) INTO v_ids FROM stageflow.claim_tasks('shq', 2);
    UPDATE stageflow.jobs SET status = 'cancelled', completed_at = now() WHERE job_id = v_job;
    PERFORM stageflow.complete_task_and_check_stage(v_ids[1], '{}');
    v_report := stageflow.complete_task_and_check_stage(v_ids[2], '{}');
    ASSERT v_report ->> 'task_status' = 'completed', v_report::text;
    ASSERT v_report ->> 'stage_completed' = 'false' AND v_report -> 'next_stage' = 'null'::jsonb, v_report::text;
    ASSERT (SELECT open_shards FROM stageflow.stages WHERE job_id = v_job AND stage = 1) = 0;
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.stages WHERE job_id = v_job AND stage = 2);
    -- Reporting it again gives the same answer.
    ASSERT stageflow.complete_task_and_check_stage(v_ids[2], '{}') = v_report,
           stageflow.complete_task_and_check_stage(v_ids[2], '{}')::text;
END;
$$;
