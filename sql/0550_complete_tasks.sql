-- Completes many tasks in one transaction: results is an array of {"task_id", "result"}. Each
-- task gets the semantics of complete_task_and_check_stage: its message deleted, its shard's
-- counter decremented (once per shard for the whole batch) and the stage advanced when its last
-- open shard empties. A task that cannot be completed (unknown, not running, leased to another worker, a bad
-- plan) does not stop the others: its entry in the answer carries an error with the SQLSTATE
-- complete_task_and_check_stage would raise. Returns one report per element, in order.
-- Locks are taken in msg_id order (messages, then tasks), then (job, stage, shard) order (shards),
-- then (job, stage) order (stages), so concurrent batches do not deadlock.
CREATE FUNCTION stageflow.complete_tasks(results jsonb, worker_id text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
AS $$
DECLARE
    v_ids        text[];
    v_results    jsonb[];
    v_jobs       text[];
    v_stages     int[];
    v_shards     int[];
    v_counts     int[];
    v_last       text[];
    v_seconds    double precision[];
    v_remaining  int;
    v_open       int;
    v_emptied    int := 0;
    v_msg_id     bigint;
    r            record;
    i            int;
BEGIN
    IF jsonb_typeof(complete_tasks.results) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('results must be a JSON array, got %s', coalesce(jsonb_typeof(complete_tasks.results), 'NULL')),
            HINT = 'pass [{"task_id": "...", "result": {...}}, ...]';
    END IF;
    IF jsonb_array_length(complete_tasks.results) > 10000 THEN
        RAISE EXCEPTION USING
            ERRCODE = '54000',
            MESSAGE = format('%s results in one call, more than the limit of 10000', jsonb_array_length(complete_tasks.results)),
            HINT = 'complete in batches of at most 10000 tasks';
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(complete_tasks.results) AS e(item)
                WHERE jsonb_typeof(e.item) <> 'object' OR jsonb_typeof(e.item -> 'task_id') IS DISTINCT FROM 'string') THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = 'every element of results needs a "task_id" string',
            HINT = 'pass [{"task_id": "...", "result": {...}}, ...]';
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(complete_tasks.results) AS e(item)
                GROUP BY e.item ->> 'task_id' HAVING count(*) > 1) THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = 'results name a task more than once',
            HINT = 'report each task once per call';
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(complete_tasks.results) AS e(item)
                WHERE pg_column_size(e.item -> 'result') > 8388608) THEN
        RAISE EXCEPTION USING
            ERRCODE = '54000',
            MESSAGE = 'a result takes more than the limit of 8388608 bytes',
            HINT = 'store large outputs elsewhere (a file, object storage) and return a reference';
    END IF;

    -- The completable ones, in msg_id order.
    SELECT array_agg(e.item ->> 'task_id' ORDER BY t.msg_id), array_agg(e.item -> 'result' ORDER BY t.msg_id)
      INTO v_ids, v_results
      FROM jsonb_array_elements(complete_tasks.results) AS e(item)
      JOIN stageflow.tasks AS t ON t.task_id = e.item ->> 'task_id'
      JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
     WHERE t.status = 'running'
       AND (complete_tasks.worker_id IS NULL OR t.worker_id = complete_tasks.worker_id)
       AND (s.next_fan_out IS DISTINCT FROM 'dynamic' OR stageflow._planner_problem(e.item -> 'result') IS NULL);

    IF v_ids IS NOT NULL THEN
        -- Messages first, then tasks: the lock order of claim_tasks.
        PERFORM stageflow._delete_messages(q.queue, q.msg_ids)
           FROM (SELECT s.queue, array_agg(t.msg_id ORDER BY t.msg_id) AS msg_ids
                   FROM stageflow.tasks AS t
                   JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
                  WHERE t.task_id = ANY (v_ids)
                  GROUP BY s.queue
                  ORDER BY s.queue) AS q;
        WITH done AS (
            UPDATE stageflow.tasks AS t
               SET status = 'completed', result = u.result, completed_at = stageflow.now(), lease_expires_at = NULL
              FROM unnest(v_ids, v_results) AS u(task_id, result)
             WHERE t.task_id = u.task_id AND t.status = 'running'
            RETURNING t.job_id, t.stage, t.task_id, t.ordinal, extract(epoch FROM t.completed_at - t.claimed_at) AS seconds
        )
        SELECT array_agg(g.job_id ORDER BY g.job_id, g.stage, g.shard), array_agg(g.stage ORDER BY g.job_id, g.stage, g.shard),
               array_agg(g.shard ORDER BY g.job_id, g.stage, g.shard),
               array_agg(g.n ORDER BY g.job_id, g.stage, g.shard), array_agg(g.last_task ORDER BY g.job_id, g.stage, g.shard),
               array_agg(g.seconds ORDER BY g.job_id, g.stage, g.shard)
          INTO v_jobs, v_stages, v_shards, v_counts, v_last, v_seconds
          FROM (SELECT d.job_id, d.stage, d.ordinal % s.shards AS shard, count(*)::int AS n,
                       (array_agg(d.task_id ORDER BY d.ordinal DESC))[1] AS last_task,
                       coalesce(sum(d.seconds), 0)::double precision AS seconds
                  FROM done AS d
                  JOIN stageflow.stages AS s ON s.job_id = d.job_id AND s.stage = d.stage
                 GROUP BY d.job_id, d.stage, d.ordinal % s.shards) AS g;

        -- Every shard first, then the stage rows whose shards emptied (a stage row after all of its
        -- shards, so the lock order stays shards -> stage for every caller).
        FOR i IN 1 .. coalesce(cardinality(v_jobs), 0) LOOP
            UPDATE stageflow.stage_shards AS sh
               SET remaining_tasks = sh.remaining_tasks - v_counts[i],
                   completed_count = sh.completed_count + v_counts[i],
                   completed_seconds = sh.completed_seconds + v_seconds[i]
             WHERE sh.job_id = v_jobs[i] AND sh.stage = v_stages[i] AND sh.shard = v_shards[i]
            RETURNING sh.remaining_tasks INTO v_remaining;
            IF v_remaining = 0 THEN
                v_emptied := v_emptied + 1;
            END IF;
            IF v_emptied > 0 AND (i = cardinality(v_jobs) OR v_jobs[i + 1] <> v_jobs[i] OR v_stages[i + 1] <> v_stages[i]) THEN
                -- The last shard of this stage in the batch: settle the stage.
                UPDATE stageflow.stages AS s
                   SET open_shards = s.open_shards - v_emptied,
                       completed_by = CASE WHEN s.open_shards = v_emptied THEN v_last[i] ELSE s.completed_by END
                 WHERE s.job_id = v_jobs[i] AND s.stage = v_stages[i]
                RETURNING s.open_shards INTO v_open;
                v_emptied := 0;
                IF v_open = 0 THEN
                    PERFORM stageflow.advance_stage(v_jobs[i]);
                END IF;
            END IF;
        END LOOP;

        -- A task that was running when this call looked, but was put back in the queue before
        -- its message was locked here (its lease expired, another worker claimed it and reported
        -- a retryable failure, or released it), lost its message to the delete above: it gets a
        -- new one, visible when its retry is due.
        FOR r IN
            SELECT t.task_id, s.queue, t.next_attempt_at
              FROM stageflow.tasks AS t
              JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
             WHERE t.task_id = ANY (v_ids) AND t.status = 'queued'
             ORDER BY t.msg_id
        LOOP
            v_msg_id := pgmq.send(r.queue, jsonb_build_object('task_id', r.task_id),
                                  clock_timestamp() + greatest(coalesce(r.next_attempt_at - stageflow.now(), interval '0'), interval '0'));
            UPDATE stageflow.tasks AS t SET msg_id = v_msg_id WHERE t.task_id = r.task_id;
        END LOOP;
    END IF;

    RETURN (
        SELECT coalesce(jsonb_agg(
                   CASE WHEN t.status = 'completed' THEN stageflow._completion_report(t.task_id)
                        ELSE jsonb_build_object('task_id', e.item ->> 'task_id', 'error',
                            CASE WHEN t.task_id IS NULL THEN
                                     jsonb_build_object('sqlstate', '42704', 'message', format('unknown task %L', e.item ->> 'task_id'))
                                 WHEN t.status = 'running' AND complete_tasks.worker_id IS NOT NULL
                                      AND t.worker_id IS DISTINCT FROM complete_tasks.worker_id THEN
                                     jsonb_build_object('sqlstate', '55000', 'message',
                                         format('task %s is leased to worker %s, not %s', t.task_id, coalesce(t.worker_id, '(none)'), complete_tasks.worker_id))
                                 WHEN t.status = 'running' THEN
                                     jsonb_build_object('sqlstate', '22023', 'message',
                                         format('task %s plans the next stage (dynamic fan-out) but %s', t.task_id,
                                                stageflow._planner_problem(e.item -> 'result')))
                                 WHEN t.status = 'queued' THEN
                                     jsonb_build_object('sqlstate', '55000', 'message', format('task %s is not claimed', t.task_id))
                                 ELSE
                                     jsonb_build_object('sqlstate', '55000', 'message', format('task %s is %s and cannot be completed', t.task_id, t.status))
                            END)
                   END ORDER BY e.n), '[]'::jsonb)
          FROM jsonb_array_elements(complete_tasks.results) WITH ORDINALITY AS e(item, n)
          LEFT JOIN stageflow.tasks AS t ON t.task_id = e.item ->> 'task_id');
END;
$$;
