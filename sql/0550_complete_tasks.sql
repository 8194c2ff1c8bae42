-- Completes many tasks in one transaction: results is an array of {"task_id", "result",
-- "lease_token"?}. Each task gets the semantics of complete_task_and_check_stage, through the same
-- settle path (_settle_completions): accepted only under its row lock, fenced by its lease token
-- (or by worker_id when the element has none), its stage's shard counters moved once for the whole
-- batch and the stage advanced when its last open shard empties. A task that cannot be
-- completed (unknown, not running, another lease's, a bad plan) does not stop the others: its
-- entry in the answer is {"task_id", "error": {"sqlstate", "message", "hint"}}, the refusal
-- complete_task_and_check_stage would raise. Returns one report per element, in order; with
-- reports => false an accepted element's entry is only {"task_id"} (a worker that does not read
-- the reports saves their cost: looking up each task's stage and job and building its report was
-- a fifth of the batched benchmark line, bench/README.md).
-- Locks are waited for in task_id order (tasks, then their messages; a task refused after the
-- UPDATE is locked only if no other session holds it: else it is decided as it stands, 40001 if
-- it could have been completed, report it again), then (job, stage) order (each stage's shards,
-- waited for only in shard order, then its row), so concurrent batches do not deadlock.
CREATE FUNCTION stageflow.complete_tasks(results jsonb, worker_id text DEFAULT NULL, reports boolean DEFAULT true)
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
    v_tokens     bigint[];
    v_refusals   jsonb[];
    v_reported   text[] := '{}'::text[];  -- the accepted ones, when reports are built
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
                WHERE jsonb_typeof(e.item) <> 'object' OR jsonb_typeof(e.item -> 'task_id') IS DISTINCT FROM 'string'
                   OR (e.item ? 'lease_token' AND jsonb_typeof(e.item -> 'lease_token') IS DISTINCT FROM 'null'
                       AND (jsonb_typeof(e.item -> 'lease_token') <> 'number' OR (e.item ->> 'lease_token') !~ '^-?[0-9]{1,18}$'))) THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = 'every element of results needs a "task_id" string (and a "lease_token", when given, is an integer)',
            HINT = 'pass [{"task_id": "...", "result": {...}, "lease_token": 1}, ...]';
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(complete_tasks.results) AS e(item)
                GROUP BY e.item ->> 'task_id' HAVING count(*) > 1) THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = 'results name a task more than once',
            HINT = 'report each task once per call';
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(complete_tasks.results) AS e(item)
                WHERE octet_length((e.item -> 'result')::text) > 8388608) THEN
        RAISE EXCEPTION USING
            ERRCODE = '54000',
            MESSAGE = 'a result takes more than the limit of 8388608 bytes',
            HINT = 'store large outputs elsewhere (a file, object storage) and return a reference';
    END IF;

    SELECT array_agg(e.item ->> 'task_id' ORDER BY e.n), array_agg(e.item -> 'result' ORDER BY e.n),
           array_agg((e.item ->> 'lease_token')::bigint ORDER BY e.n)
      INTO v_ids, v_results, v_tokens
      FROM jsonb_array_elements(complete_tasks.results) WITH ORDINALITY AS e(item, n);
    IF v_ids IS NULL THEN
        RETURN '[]'::jsonb;
    END IF;
    v_refusals := stageflow._settle_completions(v_ids, v_results, v_tokens, complete_tasks.worker_id);

    -- (reports => false, every element accepted, the usual batch: each answers its task_id, in
    -- one aggregate over the ids; the statement below, with its join and refusals, cost a claim
    -- of 100 and its completion 6,000 instructions a task, bench/README.md, twentieth pass)
    IF complete_tasks.reports IS FALSE AND cardinality(array_remove(v_refusals, NULL)) = 0 THEN
        RETURN (SELECT jsonb_agg(jsonb_build_object('task_id', u.task_id)) FROM unnest(v_ids) AS u(task_id));
    END IF;
    -- (reports => false: no report is built, the accepted ones answer their task_id)
    -- The accepted ones are listed first, into a variable: PostgreSQL inlines no set-returning
    -- function whose argument holds a subquery, and _completion_reports called instead of inlined
    -- is planned again on every call (170 us a call of six tasks).
    IF complete_tasks.reports IS NOT FALSE THEN
        v_reported := ARRAY(SELECT a.task_id FROM unnest(v_ids, v_refusals) AS a(task_id, refusal) WHERE a.refusal IS NULL);
    END IF;
    RETURN (
        SELECT jsonb_agg(CASE WHEN u.refusal IS NOT NULL THEN jsonb_build_object('task_id', u.task_id, 'error', u.refusal)
                              WHEN complete_tasks.reports IS FALSE THEN jsonb_build_object('task_id', u.task_id)
                              ELSE r.report END
                         ORDER BY u.n)
          FROM unnest(v_ids, v_refusals) WITH ORDINALITY AS u(task_id, refusal, n)
          LEFT JOIN stageflow._completion_reports(v_reported) AS r ON r.task_id = u.task_id);
END;
$$;
