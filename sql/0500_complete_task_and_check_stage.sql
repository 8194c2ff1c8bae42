-- What completions report, one row per named task: the task, its stage, whether this task's
-- completion finished the stage (the stage row remembers which task did), and where the job is
-- now. Set-based: a batch of completions reads its tasks, stages and jobs in one statement.
-- Inlinable, as the status classes are (no SET clause, every operator and function qualified, not
-- STRICT, not SECURITY DEFINER): PostgreSQL plans it into its callers' statements, whose plans
-- are kept for the session. (As a plpgsql function of its own it cost each single completion
-- about 25 us of its 200, measured with complete_task_and_check_stage under pgbench.) The report
-- is the row as JSON (jsonb_build_object of its nine fields cost 9,000 instructions more,
-- bench/README.md).
CREATE FUNCTION stageflow._completion_reports(p_task_ids text[])
RETURNS TABLE (task_id text, report jsonb)
LANGUAGE sql STABLE
AS $$
    SELECT r.task_id, pg_catalog.to_jsonb(r)
      FROM (SELECT t.task_id, t.status AS task_status, t.stage,
                   s.status OPERATOR(pg_catalog.=) 'completed' AND coalesce(s.completed_by OPERATOR(pg_catalog.=) t.task_id, false)
                       AS stage_completed,
                   CASE WHEN s.status OPERATOR(pg_catalog.=) 'completed'
                             AND coalesce(s.completed_by OPERATOR(pg_catalog.=) t.task_id, false)
                             AND t.stage OPERATOR(pg_catalog.<) j.total_stages
                        THEN t.stage OPERATOR(pg_catalog.+) 1 END AS next_stage,
                   j.job_id, j.status AS job_status, j.current_stage, j.total_stages
              FROM stageflow.tasks AS t
              JOIN stageflow.stages AS s ON s.job_id OPERATOR(pg_catalog.=) t.job_id AND s.stage OPERATOR(pg_catalog.=) t.stage
              JOIN stageflow.jobs AS j ON j.job_id OPERATOR(pg_catalog.=) t.job_id
             WHERE t.task_id OPERATOR(pg_catalog.=) ANY (p_task_ids)) AS r
$$;

-- What is wrong with a result that feeds a dynamic fan-out, or NULL if it is a valid list of task
-- entries: {"tasks": [{"key"?: "tile_x0_y0", "params"?: {...}}, ...]} whose keys are distinct and
-- whose params add keys of their own: a planner cannot replace the job's validated params
-- (p_job_params; a task's params overlay the job's when it is claimed).
-- (Keys repeated across the results of several planner tasks are found only when the stage is
-- created, and fail that job: see advance_stage.)
CREATE FUNCTION stageflow._planner_problem(p_result jsonb, p_job_params jsonb DEFAULT '{}')
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN jsonb_typeof(p_result) IS DISTINCT FROM 'object' OR jsonb_typeof(p_result -> 'tasks') IS DISTINCT FROM 'array'
            THEN 'the result has no "tasks" array'
        ELSE coalesce(
             (SELECT format('entry %s: %s', e.n - 1,
                            CASE WHEN jsonb_typeof(e.entry) <> 'object' THEN 'not an object'
                                 WHEN e.entry ? 'key' AND (jsonb_typeof(e.entry -> 'key') <> 'string'
                                                           OR e.entry ->> 'key' !~ '^[A-Za-z0-9_.:-]{1,128}$')
                                     THEN format('key %s is not 1 to 128 letters, digits or _.:-', e.entry -> 'key')
                                 ELSE '"params" is not an object' END)
                FROM jsonb_array_elements(p_result -> 'tasks') WITH ORDINALITY AS e(entry, n)
               WHERE jsonb_typeof(e.entry) <> 'object'
                  OR (e.entry ? 'key' AND (jsonb_typeof(e.entry -> 'key') <> 'string'
                                           OR e.entry ->> 'key' !~ '^[A-Za-z0-9_.:-]{1,128}$'))
                  OR (e.entry ? 'params' AND jsonb_typeof(e.entry -> 'params') <> 'object')
               ORDER BY e.n
               LIMIT 1),
             (SELECT format('entry %s: key %s is named more than once (first by entry %s)', d.n - 1, to_jsonb(d.key), d.first - 1)
                FROM (SELECT e.n, e.entry ->> 'key' AS key, min(e.n) OVER (PARTITION BY e.entry ->> 'key') AS first
                        FROM jsonb_array_elements(p_result -> 'tasks') WITH ORDINALITY AS e(entry, n)
                       WHERE e.entry ? 'key') AS d
               WHERE d.n <> d.first
               ORDER BY d.n
               LIMIT 1),
             (SELECT format('entry %s: params key %s is a parameter of the job', e.n - 1, to_jsonb(k.key))
                FROM jsonb_array_elements(p_result -> 'tasks') WITH ORDINALITY AS e(entry, n)
               CROSS JOIN LATERAL jsonb_object_keys(CASE WHEN jsonb_typeof(e.entry -> 'params') = 'object'
                                                         THEN e.entry -> 'params' ELSE '{}' END) AS k(key)
               WHERE p_job_params ? k.key
               ORDER BY e.n
               LIMIT 1))
    END
$$;

-- The refusal of a result that feeds a dynamic fan-out but is not a valid plan for its job, or NULL.
CREATE FUNCTION stageflow._planner_refusal(p_task_id text, p_result jsonb, p_job_id text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_problem text := stageflow._planner_problem(
        p_result, (SELECT j.params FROM stageflow.jobs AS j WHERE j.job_id = p_job_id));
BEGIN
    RETURN CASE WHEN v_problem IS NOT NULL THEN jsonb_build_object(
        'sqlstate', '22023',
        'message', format('task %s plans the next stage (dynamic fan-out) but %s', p_task_id, v_problem),
        'hint', 'return {"tasks": [{"key": "tile_x0_y0", "params": {...}}, ...]} with params of the task''s own (the job''s params reach every task anyway); report a planning error with stageflow.fail_task')
    END;
END;
$$;

-- Records completions: the one settle path of complete_task_and_check_stage and complete_tasks.
-- p_task_ids, p_results and p_tokens are parallel (a NULL token: no token given); the ids are
-- distinct. Every report that may be accepted is decided under its task's row lock
-- (its lease's fence, stageflow._report_fenced, and a plan check for a result that feeds a dynamic
-- fan-out; the wording of a refusal, stageflow._refusal, only for the rest): one UPDATE, in
-- task_id order, completes the tasks that may be completed, its conditions checked on each row's
-- newest version once it holds the row's lock (no separate lock first: a lock is a WAL record of
-- its own). The rest (rare) are decided as they are now: a report naming another lease than the
-- task's (a token other than its lease_token) is refused without the lock, since a lease that is
-- over never comes back (tokens only grow); the others (no token, or the task's own lease: a
-- repeat, or a task that ended) are locked and their refusals read (in a call naming several
-- tasks, a task another session holds is skipped and decided as it stands, 40001 if it could be
-- completed: the call holds tasks of higher ids already), and a task that became completable
-- meanwhile (a report without a token, of a task claimed since) goes through the same UPDATE
-- again. (A batch holding tasks it took waits for no task it refuses for a lease that is over: two
-- batches, each with a stale report of a task the other took, deadlocked so before every named
-- task was locked first; that lock cost a WAL record per task.) The accepted ones have their
-- messages deleted (tasks before messages: the lock order of every report), and each stage's
-- tasks are taken off its shards once for the whole call, in (job, stage) order
-- (_take_from_free_shards: one shard no other transaction holds, if one has them all); a stage
-- row is locked only when one of its shards empties (shards before stage), and the call that
-- takes the stage's open shards to zero advances the job in this transaction. A completion
-- repeated by the lease that made it is accepted and changes nothing.
-- Returns, per element, NULL when accepted, else its refusal {"sqlstate", "message", "hint"}.
-- It runs with its two callers' plan settings (generic plans, no sequential scans) rather than
-- setting them again: one setting saved and restored per call on the hot path instead of three.
-- No SET clause: a completion-path helper that runs under its callers' fixed search path
-- (ARCHITECTURE.md, Conventions; security.rs).
CREATE FUNCTION stageflow._settle_completions(p_task_ids text[], p_results jsonb[], p_tokens bigint[], p_worker_id text)
RETURNS jsonb[]
LANGUAGE plpgsql
AS $$
DECLARE
    v_now        timestamptz := stageflow.now();
    v_refusals   jsonb[] := array_fill(NULL::jsonb, ARRAY[cardinality(p_task_ids)]);
    v_todo       text[];
    v_rest       text[];
    v_locked     text[];
    v_ids        text[];
    v_msg_ids    bigint[];
    v_queues     text[];
    v_jobs       text[];
    v_stages     int[];
    v_prefer     int[];
    v_ordinals   int[];
    v_seconds    double precision[];
    v_counts     int[];
    v_last       text[];
    v_emptied    int[];
    v_open       int;
    v_first      int;
    v_final      int;
    v_sum        double precision;
    -- The stage of the call's first task (a batch's tasks are nearly always of one): what the call
    -- needs of it is read once, for every task of that stage, rather than twice a task (a batch's
    -- completion: 5-10 % less server CPU, bench/README.md).
    v_job_id     text;
    v_stage      int;
    v_dynamic    boolean;
    v_queue      text;
    v_shard_count int;
    r            record;
BEGIN
    -- Only tasks of queues granted to the session's login, checked before anything is locked.
    PERFORM stageflow._check_report_grants(p_task_ids);
    IF cardinality(p_task_ids) > 1 THEN
        -- (by the first task alone: finding every task's stage first, to know that they share one,
        -- cost a claim of 100 and its completion 12,800 instructions a task, bench/README.md,
        -- twentieth pass; a task of another stage looks its stage up in the UPDATE below)
        SELECT t.job_id, t.stage INTO v_job_id, v_stage FROM stageflow.tasks AS t WHERE t.task_id = p_task_ids[1];
        IF FOUND THEN
            -- (what is read here does not change after the stage is made)
            SELECT s.next_fan_out IS NOT DISTINCT FROM 'dynamic', s.queue, s.shards
              INTO v_dynamic, v_queue, v_shard_count
              FROM stageflow.stages AS s WHERE s.job_id = v_job_id AND s.stage = v_stage;
        END IF;
    END IF;
    FOR v_pass IN 1 .. 2 LOOP
        -- Complete the tasks of v_todo that may be completed, locking them in task_id order (the
        -- sorted list drives the join); the UPDATE re-checks its conditions on a row changed
        -- since its snapshot, in the row's newest version, under the lock.
        WITH done AS (
            UPDATE stageflow.tasks AS t
               SET status = 'completed', result = u.result, completed_at = v_now, lease_expires_at = NULL
              FROM (SELECT a.task_id, a.result, a.token
                      FROM unnest(p_task_ids, p_results, p_tokens) AS a(task_id, result, token)
                     WHERE v_pass = 1 OR a.task_id = ANY (v_todo)
                     ORDER BY a.task_id COLLATE "C") AS u
             WHERE t.task_id = u.task_id
               AND t.status = 'running'
               AND stageflow._report_fenced(t.lease_token, t.worker_id, u.token, p_worker_id)
               AND (CASE WHEN t.job_id = v_job_id AND t.stage = v_stage THEN v_dynamic IS NOT TRUE
                         ELSE (SELECT s.next_fan_out FROM stageflow.stages AS s WHERE s.job_id = t.job_id AND s.stage = t.stage)
                              IS DISTINCT FROM 'dynamic' END
                    OR stageflow._planner_refusal(u.task_id, u.result, t.job_id) IS NULL)
            RETURNING t.task_id, t.msg_id, t.job_id, t.stage, t.ordinal, t.claimed_at,
                      CASE WHEN t.job_id = v_job_id AND t.stage = v_stage THEN NULL ELSE
                          (SELECT s FROM stageflow.stages AS s WHERE s.job_id = t.job_id AND s.stage = t.stage) END AS st
        )
        -- (parallel arrays: every aggregate of the statement reads the same rows in the same order;
        -- each NULL while no task is taken, NULL || x being x)
        SELECT v_ids || array_agg(d.task_id),
               v_msg_ids || array_agg(d.msg_id),
               v_queues || array_agg(CASE WHEN d.st IS NULL THEN v_queue ELSE (d.st).queue END),
               v_jobs || array_agg(d.job_id),
               v_stages || array_agg(d.stage),
               v_prefer || array_agg(d.ordinal % CASE WHEN d.st IS NULL THEN v_shard_count ELSE (d.st).shards END),
               v_ordinals || array_agg(d.ordinal),
               v_seconds || array_agg(extract(epoch FROM v_now - d.claimed_at)::double precision)
          INTO v_ids, v_msg_ids, v_queues, v_jobs, v_stages, v_prefer, v_ordinals, v_seconds
          FROM done AS d;
        EXIT WHEN cardinality(v_ids) = cardinality(p_task_ids) OR v_pass = 2;

        -- The others (rare), decided as they are now: refused, a repeat of a completion
        -- (accepted, nothing to do), or completable now (the next pass); those that do not name
        -- a lease that is over locked first, in task_id order.
        -- Each refusal is computed once (OFFSET 0 keeps the subquery from being flattened into
        -- the aggregates, which would evaluate it once per use).
        v_rest := ARRAY(SELECT a.task_id FROM unnest(p_task_ids) AS a(task_id)
                        EXCEPT SELECT d.task_id FROM unnest(v_ids) AS d(task_id));
        IF cardinality(p_task_ids) = 1 THEN
            v_locked := ARRAY(SELECT t.task_id FROM stageflow.tasks AS t
                                JOIN unnest(p_task_ids, p_tokens) AS u(task_id, token) ON u.task_id = t.task_id
                               WHERE t.task_id = ANY (v_rest) AND (u.token IS NULL OR u.token = t.lease_token)
                                 FOR UPDATE OF t);
        ELSE
            -- (the call holds the tasks pass 1 took, and those whose re-check failed, of any ids:
            -- a wait here could be out of task_id order, so a task another session holds is
            -- skipped, and decided as it stands)
            v_locked := ARRAY(SELECT t.task_id FROM stageflow.tasks AS t
                                JOIN unnest(p_task_ids, p_tokens) AS u(task_id, token) ON u.task_id = t.task_id
                               WHERE t.task_id = ANY (v_rest) AND (u.token IS NULL OR u.token = t.lease_token)
                               ORDER BY t.task_id
                                 FOR UPDATE OF t SKIP LOCKED);
        END IF;
        SELECT array_agg(c.refusal ORDER BY c.n),
               array_agg(c.task_id) FILTER (WHERE c.rest AND c.refusal IS NULL AND (c.task).status = 'running')
          INTO v_refusals, v_todo
          -- (a NULL id is never taken: it is refused as an unknown task)
          FROM (SELECT u.n, u.task_id, l.task, x.task_id IS NOT NULL OR u.task_id IS NULL AS rest,
                       CASE WHEN x.task_id IS NOT NULL OR u.task_id IS NULL THEN
                           coalesce(stageflow._refusal(l.task, u.task_id, 'completed', u.token, p_worker_id),
                                    CASE WHEN (l.task).status = 'running' AND l.next_fan_out = 'dynamic' THEN
                                        stageflow._planner_refusal(u.task_id, u.result, (l.task).job_id) END,
                                    -- (not locked, yet running and completable as it stands:
                                    -- another session holds it, or its token became current after
                                    -- the report was read; a completed one is a repeat, accepted:
                                    -- nothing changes a completed task)
                                    CASE WHEN NOT (u.task_id = ANY (v_locked)) AND (l.task).status = 'running' THEN
                                        jsonb_build_object('sqlstate', '40001',
                                            'message', format('task %s was held by another transaction, or changed, while its report was decided', u.task_id),
                                            'hint', 'report it again') END) END AS refusal
                  FROM unnest(p_task_ids, p_results, p_tokens) WITH ORDINALITY AS u(task_id, result, token, n)
                  LEFT JOIN unnest(v_rest) AS x(task_id) ON x.task_id = u.task_id
                  LEFT JOIN (SELECT t AS task, s.next_fan_out
                               FROM stageflow.tasks AS t
                               JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
                              WHERE t.task_id = ANY (v_rest)) AS l ON (l.task).task_id = u.task_id
                OFFSET 0) AS c;
        EXIT WHEN v_todo IS NULL;
    END LOOP;
    IF v_ids IS NULL THEN
        RETURN v_refusals;
    END IF;

    -- Their messages (after the tasks: the lock order of every report).
    IF v_queues[1] = ALL (v_queues) THEN
        PERFORM stageflow._delete_messages(v_queues[1], v_msg_ids);
    ELSE
        FOR r IN SELECT u.queue, array_agg(u.msg_id ORDER BY u.msg_id) AS msg_ids
                   FROM unnest(v_queues, v_msg_ids) AS u(queue, msg_id) GROUP BY u.queue ORDER BY u.queue LOOP
            PERFORM stageflow._delete_messages(r.queue, r.msg_ids);
        END LOOP;
    END IF;

    -- One entry per stage, in (job, stage) order: how many tasks it loses, the last of them by
    -- ordinal, their claim-to-completion seconds, the shard to try first (its first task's
    -- ordinal % shards: consecutive batches of a stage start on different shards).
    IF cardinality(v_ids) = 1 THEN
        v_counts := ARRAY[1];
        v_last := v_ids;
    ELSIF v_jobs[1] = ALL (v_jobs) AND v_stages[1] = ALL (v_stages) THEN
        -- (one stage, the usual batch: its first and last tasks by ordinal found without a sort, a
        -- stage's ordinals being distinct; grouped below, 11,000 instructions a task more,
        -- bench/README.md, twentieth pass)
        SELECT min(u.ordinal), max(u.ordinal), coalesce(sum(u.seconds), 0)::double precision
          INTO v_first, v_final, v_sum
          FROM unnest(v_ordinals, v_seconds) AS u(ordinal, seconds);
        v_jobs := v_jobs[1:1];
        v_stages := v_stages[1:1];
        v_counts := ARRAY[cardinality(v_ids)];
        v_prefer := ARRAY[v_prefer[array_position(v_ordinals, v_first)]];
        v_last := ARRAY[v_ids[array_position(v_ordinals, v_final)]];
        v_seconds := ARRAY[v_sum];
    ELSE
        SELECT array_agg(g.job_id ORDER BY g.job_id, g.stage), array_agg(g.stage ORDER BY g.job_id, g.stage),
               array_agg(g.prefer ORDER BY g.job_id, g.stage),
               array_agg(g.n ORDER BY g.job_id, g.stage), array_agg(g.last_task ORDER BY g.job_id, g.stage),
               array_agg(g.seconds ORDER BY g.job_id, g.stage)
          INTO v_jobs, v_stages, v_prefer, v_counts, v_last, v_seconds
          FROM (SELECT u.job_id, u.stage, count(*)::int AS n, (array_agg(u.shard ORDER BY u.ordinal))[1] AS prefer,
                       (array_agg(u.task_id ORDER BY u.ordinal DESC))[1] AS last_task,
                       coalesce(sum(u.seconds), 0)::double precision AS seconds
                  FROM unnest(v_jobs, v_stages, v_prefer, v_ids, v_ordinals, v_seconds)
                       AS u(job_id, stage, shard, task_id, ordinal, seconds)
                 GROUP BY u.job_id, u.stage) AS g;
    END IF;

    -- Each stage's tasks off its shards: first without waiting for a shard another transaction
    -- holds (_take_from_free_shards), in one subtransaction; if a stage cannot, that is rolled
    -- back with every shard it left locked (a transaction holding a shard out of order must not
    -- then wait for another of that stage) and every stage waits for its shards in shard order
    -- (_take_from_shards_in_order). One subtransaction a call, however many stages (a transaction
    -- with more than 64 makes every other session's snapshots look their transactions up in
    -- pg_subtrans), and nothing in it but shard counters (nothing costly to do again).
    BEGIN
        FOR i IN 1 .. cardinality(v_jobs) LOOP
            v_emptied[i] := stageflow._take_from_free_shards(v_jobs[i], v_stages[i], v_counts[i], v_prefer[i], v_counts[i],
                                                             coalesce(v_seconds[i], 0), v_counts[i]);
            IF v_emptied[i] IS NULL THEN
                RAISE EXCEPTION USING ERRCODE = 'SFW01', MESSAGE = 'no free shard (handled below)';
            END IF;
        END LOOP;
    EXCEPTION WHEN SQLSTATE 'SFW01' THEN
        FOR i IN 1 .. cardinality(v_jobs) LOOP
            v_emptied[i] := stageflow._take_from_shards_in_order(v_jobs[i], v_stages[i], v_counts[i], v_counts[i],
                                                                 coalesce(v_seconds[i], 0), v_counts[i]);
        END LOOP;
    END;
    -- Then the rows of the stages whose shards emptied, in the same order (shards -> stage -> job);
    -- the call that takes a stage's open shards to zero advances its job.
    FOR i IN 1 .. cardinality(v_jobs) LOOP
        IF v_emptied[i] > 0 THEN
            UPDATE stageflow.stages AS s
               SET open_shards = s.open_shards - v_emptied[i],
                   completed_by = CASE WHEN s.open_shards = v_emptied[i] THEN v_last[i] ELSE s.completed_by END
             WHERE s.job_id = v_jobs[i] AND s.stage = v_stages[i]
            RETURNING s.open_shards INTO v_open;
            IF v_open = 0 THEN
                PERFORM stageflow.advance_stage(v_jobs[i]);
            END IF;
        END IF;
    END LOOP;
    RETURN v_refusals;
END;
$$;

-- Completes a running task with its result (see _settle_completions). If it was the last open
-- task of its stage, the job advances in the same transaction. Repeating a completion returns the
-- same report and changes nothing. With report => false the answer is only {"task_id"}, as an
-- accepted element of complete_tasks(..., reports => false): a worker that does not read the
-- report saves looking up the task's stage and job to build it (bench/README.md).
-- A report that may be accepted as it stands (the usual one) takes a path of its own: the task
-- completed by its key in one UPDATE that joins its stage by its key, under the same conditions
-- as _settle_completions' UPDATE, then its message deleted and the task taken off its stage's
-- shards as _settle_completions takes a stage's, with the same primitives, in scalars. Every other
-- report (refused, a repeat, or decided under a lock first) goes through _settle_completions.
-- (_settle_completions sets up its arrays and the aggregates over them in every transaction:
-- 133,000 instructions of a claim and completion of one task, bench/README.md, eighteenth pass.)
-- Fencing: with lease_token (what claim_tasks returned), only the task's current lease may
-- complete it; with worker_id alone, only the worker holding the current lease. Called with
-- neither (the psql form: complete_task_and_check_stage(task_id, result)), it trusts the caller:
-- any running task is completed, whichever lease it is on. Workers always pass the token.
-- Like every hot-path function it runs with plan_cache_mode = force_generic_plan: PL/pgSQL would
-- otherwise re-plan statements whose parameters are arrays on every call (measured: half of the
-- server CPU of a claim plus a completion). A generic plan is made once per session, with the
-- statistics of that moment: made while stages or stage_shards were small, it kept scanning them
-- whole as they grew (12,237 sequential scans of stages in one benchmark run). Every lookup here
-- is by key, so these functions also run with enable_seqscan = off: their own plans use the
-- indexes whatever the statistics said when they were made. (Functions they call, such as
-- advance_stage, run with these settings too, but keep the plans of whichever caller planned
-- them first in the session.)
CREATE FUNCTION stageflow.complete_task_and_check_stage(task_id text, result jsonb DEFAULT NULL, worker_id text DEFAULT NULL,
                                                        lease_token bigint DEFAULT NULL, report boolean DEFAULT true)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
AS $$
DECLARE
    v_now      timestamptz := stageflow.now();
    v_refusal  jsonb;
    v_msg_id   bigint;
    v_queue    text;
    v_job_id   text;
    v_stage    int;
    v_shard    int;
    v_seconds  double precision;
    v_emptied  int;
    v_open     int;
    v_admin    boolean := stageflow._session_is_admin();
BEGIN
    IF octet_length(complete_task_and_check_stage.result::text) > 8388608 THEN
        RAISE EXCEPTION USING
            ERRCODE = '54000',
            MESSAGE = format('the result of task %s takes %s bytes, more than the limit of 8388608',
                             complete_task_and_check_stage.task_id, octet_length(complete_task_and_check_stage.result::text)),
            HINT = 'store large outputs elsewhere (a file, object storage) and return a reference';
    END IF;
    -- Only a task of a queue granted to the session's login (or any, for an admin) is completed
    -- here: asked in the UPDATE's conditions, before it locks the row. A task of a queue not
    -- granted goes to _settle_completions, which refuses it (42501) before it locks anything. (A
    -- statement of its own before the UPDATE, _check_report_grants, cost a claim and a completion
    -- of one task 94,000 instructions as a worker login, 11,000 as a superuser, bench/README.md,
    -- nineteenth pass.)
    UPDATE stageflow.tasks AS t
       SET status = 'completed', result = complete_task_and_check_stage.result, completed_at = v_now,
           lease_expires_at = NULL
      FROM stageflow.stages AS s
     WHERE t.task_id = complete_task_and_check_stage.task_id AND s.job_id = t.job_id AND s.stage = t.stage
       AND t.status = 'running'
       AND stageflow._report_fenced(t.lease_token, t.worker_id, complete_task_and_check_stage.lease_token,
                                    complete_task_and_check_stage.worker_id)
       AND (s.next_fan_out IS DISTINCT FROM 'dynamic'
            OR stageflow._planner_refusal(t.task_id, complete_task_and_check_stage.result, t.job_id) IS NULL)
       AND (v_admin OR stageflow._queue_granted_to_session(s.queue))
    RETURNING t.msg_id, s.queue, t.job_id, t.stage, t.ordinal % s.shards,
              extract(epoch FROM v_now - t.claimed_at)::double precision
         INTO v_msg_id, v_queue, v_job_id, v_stage, v_shard, v_seconds;
    IF FOUND THEN
        -- Its message (after the task: the lock order of every report), then its stage's shards,
        -- in a subtransaction rolled back if it cannot take the task without waiting out of shard
        -- order: from the shard its ordinal prefers, if that has one (waited for if held: a lock
        -- taken on its own is a WAL record of its own, and consecutive tasks prefer different
        -- shards; here rather than in _take_from_free_shards, a call fewer: 17,500 instructions of
        -- a claim and a completion, bench/README.md, nineteenth pass); else from a shard no other
        -- transaction holds; else waiting for them in shard order (see _settle_completions). Then
        -- the stage row only if a shard emptied, and the job advanced if that was the stage's last.
        PERFORM stageflow._delete_messages(v_queue, ARRAY[v_msg_id]);
        BEGIN
            UPDATE stageflow.stage_shards AS sh
               SET remaining_tasks = sh.remaining_tasks - 1, stopped_tasks = sh.stopped_tasks + 1,
                   completed_count = sh.completed_count + 1, completed_seconds = sh.completed_seconds + coalesce(v_seconds, 0)
             WHERE sh.job_id = v_job_id AND sh.stage = v_stage AND sh.shard = v_shard AND sh.remaining_tasks >= 1
            RETURNING (sh.remaining_tasks = 0)::int INTO v_emptied;
            IF NOT FOUND THEN
                v_emptied := stageflow._take_from_free_shards(v_job_id, v_stage, 1, v_shard, 1, coalesce(v_seconds, 0), 1);
                IF v_emptied IS NULL THEN
                    RAISE EXCEPTION USING ERRCODE = 'SFW01', MESSAGE = 'no free shard (handled below)';
                END IF;
            END IF;
        EXCEPTION WHEN SQLSTATE 'SFW01' THEN
            v_emptied := stageflow._take_from_shards_in_order(v_job_id, v_stage, 1, 1, coalesce(v_seconds, 0), 1);
        END;
        IF v_emptied > 0 THEN
            UPDATE stageflow.stages AS s
               SET open_shards = s.open_shards - v_emptied,
                   completed_by = CASE WHEN s.open_shards = v_emptied THEN complete_task_and_check_stage.task_id
                                       ELSE s.completed_by END
             WHERE s.job_id = v_job_id AND s.stage = v_stage
            RETURNING s.open_shards INTO v_open;
            IF v_open = 0 THEN
                PERFORM stageflow.advance_stage(v_job_id);
            END IF;
        END IF;
    ELSE
        v_refusal := (stageflow._settle_completions(ARRAY[complete_task_and_check_stage.task_id],
                                                    ARRAY[complete_task_and_check_stage.result],
                                                    ARRAY[complete_task_and_check_stage.lease_token],
                                                    complete_task_and_check_stage.worker_id))[1];
        IF v_refusal IS NOT NULL THEN
            PERFORM stageflow._raise_refusal(v_refusal);
        END IF;
    END IF;
    IF complete_task_and_check_stage.report IS FALSE THEN
        RETURN jsonb_build_object('task_id', complete_task_and_check_stage.task_id);
    END IF;
    RETURN (SELECT r.report FROM stageflow._completion_reports(ARRAY[complete_task_and_check_stage.task_id]) AS r);
END;
$$;
