-- Stageflow 0.2.0 -> 0.3.0: ALTER EXTENSION stageflow UPDATE TO '0.3.0'.
-- Written by scripts/versions.py write from sql/versions/ and sql/upgrades/0.2.0--0.3.0.sql;
-- edit those, not this file.
\echo Use "ALTER EXTENSION stageflow UPDATE TO '0.3.0'" to load this file. \quit

-- 1. Every function and view of 0.2.0 goes: 0.3.0 defines all of them again below.
DO $upgrade$
DECLARE
    r record;
BEGIN
    -- (the extension's members only: not what someone else created in its schema)
    FOR r IN SELECT c.oid::regclass AS name FROM pg_catalog.pg_class AS c
               JOIN pg_catalog.pg_depend AS d ON d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid
                AND d.refclassid = 'pg_catalog.pg_extension'::regclass AND d.deptype = 'e'
              WHERE c.relnamespace = 'stageflow'::regnamespace AND c.relkind IN ('v', 'm') LOOP
        EXECUTE format('DROP VIEW %s', r.name);
    END LOOP;
    FOR r IN SELECT p.oid::regprocedure AS name FROM pg_catalog.pg_proc AS p
               JOIN pg_catalog.pg_depend AS d ON d.classid = 'pg_catalog.pg_proc'::regclass AND d.objid = p.oid
                AND d.refclassid = 'pg_catalog.pg_extension'::regclass AND d.deptype = 'e'
              WHERE p.pronamespace = 'stageflow'::regnamespace LOOP
        EXECUTE format('DROP ROUTINE %s', r.name);
    END LOOP;
END
$upgrade$;

-- 2. The tables 0.3.0 adds.
-- The token a task made from now on starts from (its first claim's is one more): the highest
-- token noted here (none: 0). Task ids are made from the job id, the stage and the key, so a job
-- that retention deleted and that is submitted again makes its tasks anew under the same ids (as
-- does another job whose id shares the first 16 hex digits); each transaction that deletes task
-- rows (a retention round, a resubmission finishing a deletion) notes one more than the highest
-- lease token among them, so a task made later never hands out a token a deleted task did, and
-- the report of a worker still holding a lease of a deleted task is refused. (An update from
-- 0.2.0, whose retention noted nothing, notes 2^31.)
-- Insert-only: no transaction waits for another's note (one row updated by all would make a
-- round wait for an open transaction that resubmitted a job: deadlocks, and completions waiting
-- behind the round). Each retention round deletes the notes below the highest that no other
-- round holds. The primary key is what a publication needs to replicate the deletes.
-- A stage created reads the highest note once, and sees that of its own ids' deletion: made by
-- its own transaction (_finish_job_deletion); or committed by a round before the resubmission's
-- delete of the job's note in stageflow.deleted_jobs returned (it waits for the round that holds
-- the note; READ COMMITTED reads the floor in a later statement; under REPEATABLE READ, tasks a
-- round deleted after the snapshot make _finish_job_deletion's delete of the job's tasks fail
-- with 40001); or committed before the task-id probe of _create_stage_tasks found no other job's
-- tasks under the stage's ids.
CREATE TABLE stageflow.lease_token_floor (
    note_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    token    bigint NOT NULL CHECK (token >= 0)
);
-- A stage of more tasks than stageflow.message_window has messages for one window of them at a
-- time (window_size tasks, the setting when the stage was made); this row says which tasks have
-- none yet (ordinal >= next_ordinal). Each task row holds its message's id from the start (taken
-- from the queue's sequence, in task order, when the stage is made; the highest: last_msg_id), so
-- sending a window inserts messages and changes no task. The next window is sent by a claim that
-- reads a message of the last window sent (msg_ids refill_at .. sent_up_to: one window stays ahead),
-- or that reads fewer messages than it asked for (stageflow._send_next_window), and by a
-- maintenance round that finds that window all read (_send_due_windows); the row goes once
-- every task has its message, or the job ended. Locks on it never wait (SKIP LOCKED), but
-- retention's, which deletes it with its stage.
CREATE TABLE stageflow.message_windows (
    job_id        text COLLATE "C" NOT NULL,
    stage         int NOT NULL,
    queue         text NOT NULL,
    next_ordinal  int NOT NULL,
    task_count    int NOT NULL,
    window_size   int NOT NULL CHECK (window_size >= 1),
    refill_at     bigint NOT NULL,
    sent_up_to    bigint NOT NULL,
    last_msg_id   bigint NOT NULL,
    created_at    timestamptz NOT NULL,
    PRIMARY KEY (job_id, stage),
    FOREIGN KEY (job_id, stage) REFERENCES stageflow.stages (job_id, stage) ON DELETE CASCADE,
    CHECK (next_ordinal BETWEEN 0 AND task_count)
);
CREATE INDEX message_windows_queue_idx ON stageflow.message_windows (queue, created_at, job_id, stage);
SELECT pg_catalog.pg_extension_config_dump('stageflow.message_windows', '');
SELECT pg_catalog.pg_extension_config_dump('stageflow.lease_token_floor', '');

-- 3. What changes in the tables of 0.2.0 (sql/upgrades/0.2.0--0.3.0.sql).
-- What 0.2.0 -> 0.3.0 changes in the tables 0.2.0 has, written by hand; scripts/versions.py write
-- puts it into sql/stageflow--0.2.0--0.3.0.sql (see there for what runs before and after). Jobs in
-- flight keep going: no row changes.

-- tasks: more room on each page for the new versions of claims and completions (HOT updates).
-- Pages written from now on are filled to 30 %; the rows already there stay where they are.
ALTER TABLE stageflow.tasks SET (fillfactor = 30);

-- tasks_stage_idx: the job named by a 64-bit hash of its id rather than the id (24-byte entries
-- instead of 88; see 0010_tables.sql). Dropped here and built again over the rows there are
-- below, once (after the ids' collation changed, which would build it again otherwise).
DROP INDEX stageflow.tasks_stage_idx;

-- Ids compare byte by byte (COLLATE "C", see 0010_tables.sql): each column holding a job id or a
-- task id. The rows stay as they are (a collation is not in the data); the indexes on these
-- columns are built again, and the foreign keys to jobs checked again.
ALTER TABLE stageflow.jobs ALTER COLUMN job_id TYPE text COLLATE "C";
ALTER TABLE stageflow.stages ALTER COLUMN job_id TYPE text COLLATE "C", ALTER COLUMN completed_by TYPE text COLLATE "C";
ALTER TABLE stageflow.stage_shards ALTER COLUMN job_id TYPE text COLLATE "C";
ALTER TABLE stageflow.stage_claims ALTER COLUMN job_id TYPE text COLLATE "C";
ALTER TABLE stageflow.tasks ALTER COLUMN task_id TYPE text COLLATE "C", ALTER COLUMN job_id TYPE text COLLATE "C",
                            ALTER COLUMN predecessor_id TYPE text COLLATE "C";
ALTER TABLE stageflow.last_attempt_leases ALTER COLUMN task_id TYPE text COLLATE "C";
ALTER TABLE stageflow.events ALTER COLUMN job_id TYPE text COLLATE "C", ALTER COLUMN task_id TYPE text COLLATE "C";
ALTER TABLE stageflow.webhook_deliveries ALTER COLUMN job_id TYPE text COLLATE "C";
ALTER TABLE stageflow.deleted_jobs ALTER COLUMN job_id TYPE text COLLATE "C";

CREATE INDEX tasks_stage_idx ON stageflow.tasks (pg_catalog.hashtextextended(job_id, 0), stage, ordinal);

-- The status CHECKs as one constant array each (see 0010_tables.sql): the same statuses, cheaper
-- to plan in every statement that writes these tables. Each is checked again over the rows there.
ALTER TABLE stageflow.jobs DROP CONSTRAINT jobs_status_check,
    ADD CONSTRAINT jobs_status_check
        CHECK (status = ANY ('{queued,processing,completed,completed_with_errors,failed,cancelled}'::text[]));
ALTER TABLE stageflow.stages DROP CONSTRAINT stages_status_check,
    ADD CONSTRAINT stages_status_check CHECK (status = ANY ('{active,completed,failed,cancelled}'::text[]));
ALTER TABLE stageflow.webhook_deliveries DROP CONSTRAINT webhook_deliveries_status_check,
    ADD CONSTRAINT webhook_deliveries_status_check CHECK (status = ANY ('{pending,delivered,failed}'::text[]));

-- A task's status and a stage's counters: of domains instead of CHECKs of their tables (see
-- 0010_tables.sql). Each domain is made without its CHECK, the columns change to it (the same
-- values: no table is written again), and then the CHECK is added to the domain, which checks the
-- rows there once.
CREATE DOMAIN stageflow.task_status AS text;
CREATE DOMAIN stageflow.tally AS int;
CREATE DOMAIN stageflow.big_tally AS bigint;
ALTER TABLE stageflow.tasks DROP CONSTRAINT tasks_status_check, ALTER COLUMN status TYPE stageflow.task_status;
ALTER TABLE stageflow.stage_shards DROP CONSTRAINT stage_shards_remaining_tasks_check,
    DROP CONSTRAINT stage_shards_stopped_tasks_check,
    ALTER COLUMN remaining_tasks TYPE stageflow.tally, ALTER COLUMN stopped_tasks TYPE stageflow.tally;
ALTER TABLE stageflow.stage_claims DROP CONSTRAINT stage_claims_started_check, ALTER COLUMN started TYPE stageflow.big_tally;
ALTER DOMAIN stageflow.task_status
    ADD CONSTRAINT task_status_check CHECK (VALUE = ANY ('{queued,running,completed,failed,dead,cancelled}'::text[]));
ALTER DOMAIN stageflow.tally ADD CONSTRAINT tally_check CHECK (VALUE >= 0);
ALTER DOMAIN stageflow.big_tally ADD CONSTRAINT big_tally_check CHECK (VALUE >= 0);

-- lease_token_floor (new): 0.2.0's retention deleted tasks without noting their tokens, and the
-- same work submitted again after the update makes its tasks anew under the same ids. Their
-- tokens start at 2^31, above any token a task of 0.2.0 reached (one a claim), so a worker still
-- holding a lease of such a deleted task is refused. Tasks made by a fresh install start at 0.
INSERT INTO stageflow.lease_token_floor (token) VALUES (2147483648);
-- (and its identity's sequence, as 0010_tables.sql marks it: the table's dump mark is written above)
SELECT pg_catalog.pg_extension_config_dump('stageflow.lease_token_floor_note_id_seq', '');

-- 4. The functions, views, roles, grants and built-in job types of 0.3.0.
-- A stage's counters summed over its shards; running = started by claims - stopped.
CREATE VIEW stageflow.stage_counts AS
SELECT g.job_id, g.stage, g.remaining_tasks,
       ((SELECT coalesce(sum(c.started), 0) FROM stageflow.stage_claims AS c
          WHERE c.job_id = g.job_id AND c.stage = g.stage) - g.stopped_tasks)::int AS running_tasks,
       g.completed_count, g.completed_seconds
  FROM (SELECT sh.job_id, sh.stage,
               sum(sh.remaining_tasks)::int AS remaining_tasks,
               sum(sh.stopped_tasks)::bigint AS stopped_tasks,
               sum(sh.completed_count)::int AS completed_count,
               sum(sh.completed_seconds) AS completed_seconds
          FROM stageflow.stage_shards AS sh
         GROUP BY sh.job_id, sh.stage) AS g;
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:59
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
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:65
-- Logs a unit of maintenance work that failed (in the handler of its subtransaction) as a WARNING
-- naming the unit, and counts it: returns 1.
CREATE FUNCTION stageflow._unit_failed(p_unit text, p_message text, p_sqlstate text)
RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- plpgsql_check would have it IMMUTABLE; the WARNING it logs is a side effect, which an
    -- IMMUTABLE function may not have (it could be folded or skipped): VOLATILE is right.
    -- @plpgsql_check_options: performance_warnings = false
    RAISE WARNING '%: % (SQLSTATE %)', p_unit, p_message, p_sqlstate;
    RETURN 1;
END;
$$;
-- The error a task's last lease records when it expires: a dead letter's, made by the claim that
-- reads its message or by maintenance.
CREATE FUNCTION stageflow._lease_expired_error(p_attempt int, p_max_attempts int)
RETURNS jsonb
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT jsonb_build_object(
        'type', 'lease_expired', 'category', 'transient',
        'message', format('the lease of attempt %s of %s expired before the task was completed', p_attempt, p_max_attempts))
$$;
-- The retention's settings: the interval (stageflow.retention; unset, when the library is not
-- loaded in this session, means the default, 7 days; '' or 0 means forever: NULL) and the rows a
-- round deletes at most from each table (stageflow.retention_batch_size, default 10000).
CREATE FUNCTION stageflow._retention()
RETURNS interval
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT nullif(nullif(coalesce(current_setting('stageflow.retention', true), '7 days'), ''), '0')::interval
$$;
CREATE FUNCTION stageflow._retention_batch_size()
RETURNS int
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT greatest(coalesce(nullif(current_setting('stageflow.retention_batch_size', true), '')::int, 10000), 1)
$$;
-- Raises stageflow.lease_token_floor above p_token, the highest lease token of task rows the
-- caller's transaction has just deleted (NULL: none, nothing to do): a task made again under one
-- of their ids starts above every lease they handed out. An insert: it waits for no one.
CREATE FUNCTION stageflow._raise_lease_token_floor(p_token bigint)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO stageflow.lease_token_floor (token) SELECT p_token + 1 WHERE p_token IS NOT NULL
$$;
-- Finishes the deletion of job p_job_id now, whatever its size, if retention has begun it: a
-- submission that creates the job again calls it before it writes anything of the new job.
-- Deleting the note first waits for a maintenance round that is draining the job (it holds the
-- note) and keeps later rounds off it. Returns whether there was a deletion to finish.
CREATE FUNCTION stageflow._finish_job_deletion(p_job_id text)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_max_token bigint;
BEGIN
    DELETE FROM stageflow.deleted_jobs AS d WHERE d.job_id = p_job_id;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    WITH gone AS (
        DELETE FROM stageflow.tasks AS t WHERE stageflow._is_task_of_job(t.job_id, p_job_id)
        RETURNING t.lease_token
    )
    SELECT max(gone.lease_token) INTO v_max_token FROM gone;
    PERFORM stageflow._raise_lease_token_floor(v_max_token);
    DELETE FROM stageflow.events AS e WHERE e.job_id = p_job_id;
    DELETE FROM stageflow.webhook_deliveries AS w WHERE w.job_id = p_job_id;
    DELETE FROM stageflow.stage_claims AS c WHERE c.job_id = p_job_id;
    RETURN true;
END;
$$;
-- One round of retention (run_maintenance's last step), each part bounded, on the engine's clock
-- (p_retention NULL, retention off: parts 1, 3 and 4 delete nothing, part 2 still drains):
--   1. up to least(max_rows, batch) finished jobs whose completed_at is older than the retention
--      (rows another session holds are skipped) lose their job row (with it, by cascade, their
--      stages and shards: at most 16 shards a stage) and stage claims, and are noted in
--      stageflow.deleted_jobs;
--   2. the jobs noted there (as many, oldest first, notes another round holds skipped) lose up
--      to `batch` tasks, `batch` events and `batch` webhook deliveries; a note with nothing left
--      is removed (a small job goes in the round that deleted its row); the highest lease token
--      of the tasks deleted is noted in stageflow.lease_token_floor, whose notes but the
--      highest go;
--   3. each queue the job types use loses up to `batch` archived messages (pgmq.a_<queue>: the
--      messages of tasks that failed or were dead-lettered, pgmq.archive) archived before the
--      retention; pgmq dates them with the real clock;
--   4. the next least(max_rows, batch) webhook deliveries (a cursor walks them in delivery_id
--      order, wrapping around) lose those older than the retention whose job is gone and not
--      noted in deleted_jobs: what 0.1.0's retention, which left deliveries behind, orphaned.
-- Completed and cancelled tasks' messages are deleted, not archived, when they end: pgmq.q_<queue>
-- holds only the open tasks' messages (and strays the reconciler deletes); its dead tuples are
-- vacuum's. Returns {"jobs_deleted", "tasks_deleted", "events_deleted",
-- "webhook_deliveries_deleted", "archived_messages_deleted", "errors"}; each part runs in a
-- subtransaction of its own (an error is logged as a WARNING and counted).
CREATE FUNCTION stageflow._prune(max_rows int, p_retention interval)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now        timestamptz := stageflow.now();
    v_cutoff     timestamptz := stageflow.now() - p_retention;
    v_batch      int := stageflow._retention_batch_size();
    v_jobs       int;
    v_ids        text[];
    v_count      int;
    v_max_token  bigint;
    v_window     bigint[];
    v_cursor     bigint;
    v_deleted    jsonb := '{"jobs_deleted": 0, "tasks_deleted": 0, "events_deleted": 0, "webhook_deliveries_deleted": 0, "archived_messages_deleted": 0}'::jsonb;
    v_errors     int := 0;
    v_lock_timeout text := current_setting('lock_timeout');
    q            record;
BEGIN
    v_jobs := greatest(least(max_rows, v_batch), 1);

    -- 1. Job rows. Locked before their stages and shards (the cascade), the reverse of the order
    -- every other path takes (shards, stage, job): a wait here gives up after 50 ms (before the
    -- deadlock detector's second), so a retry_job or a resubmission that holds a job's stage goes
    -- on and this batch waits for the next round. A job whose webhook delivery is still pending
    -- stays until that delivery's next attempt is a retention overdue (a dispatcher that was down).
    BEGIN
        PERFORM set_config('lock_timeout', '50ms', true);
        WITH old AS (
            SELECT j.job_id FROM stageflow.jobs AS j
             WHERE j.completed_at < v_cutoff
               AND stageflow._job_has_ended(j.status)
               AND NOT EXISTS (SELECT 1 FROM stageflow.webhook_deliveries AS w
                                WHERE w.job_id = j.job_id AND w.status = 'pending' AND w.next_attempt_at >= v_cutoff)
             ORDER BY j.completed_at LIMIT v_jobs
               FOR UPDATE SKIP LOCKED
        ), noted AS (
            INSERT INTO stageflow.deleted_jobs AS d (job_id, deleted_at)
            SELECT old.job_id, v_now FROM old
            ON CONFLICT ON CONSTRAINT deleted_jobs_pkey DO NOTHING
        ), claims_gone AS (
            DELETE FROM stageflow.stage_claims AS c USING old WHERE c.job_id = old.job_id
        ), jobs_gone AS (
            DELETE FROM stageflow.jobs AS j USING old WHERE j.job_id = old.job_id RETURNING 1
        )
        SELECT count(*)::int INTO v_count FROM jobs_gone;
        v_deleted := v_deleted || jsonb_build_object('jobs_deleted', v_count);
        PERFORM set_config('lock_timeout', v_lock_timeout, true);
    EXCEPTION WHEN lock_not_available THEN
        -- (the setting goes back with the subtransaction)
        NULL;
    WHEN OTHERS THEN
        v_errors := v_errors + stageflow._unit_failed('stageflow.run_maintenance: retention of jobs', SQLERRM, SQLSTATE);
    END;

    -- 2. Their tasks, events and webhook deliveries.
    BEGIN
        SELECT array_agg(d.job_id) INTO v_ids
          FROM (SELECT d.job_id FROM stageflow.deleted_jobs AS d
                 ORDER BY d.deleted_at, d.job_id LIMIT v_jobs
                   FOR UPDATE SKIP LOCKED) AS d;
        IF v_ids IS NOT NULL THEN
            WITH gone AS (
                DELETE FROM stageflow.tasks AS t
                 -- (_is_task_of_job's two conditions, for a list of jobs)
                 -- (the batch picked once, as an array: `IN (SELECT ... LIMIT ... FOR UPDATE SKIP
                 -- LOCKED)` as the inner side of a nested loop ran again for each task, skipped the
                 -- ones deleted and took more, pg_test/bounded_batches.sql)
                 WHERE t.task_id = ANY (ARRAY(SELECT o.task_id FROM stageflow.tasks AS o
                                               WHERE pg_catalog.hashtextextended(o.job_id, 0)
                                                     = ANY (ARRAY(SELECT pg_catalog.hashtextextended(u.job_id, 0) FROM unnest(v_ids) AS u(job_id)))
                                                 AND o.job_id = ANY (v_ids)
                                               LIMIT v_batch
                                                 -- (one a stale report holds: the next round)
                                                 FOR UPDATE SKIP LOCKED))
                RETURNING t.lease_token
            )
            SELECT count(*)::int, max(gone.lease_token) INTO v_count, v_max_token FROM gone;
            PERFORM stageflow._raise_lease_token_floor(v_max_token);
            v_deleted := v_deleted || jsonb_build_object('tasks_deleted', v_count);
            WITH gone AS (
                DELETE FROM stageflow.events AS e
                 WHERE e.event_id IN (SELECT o.event_id FROM stageflow.events AS o WHERE o.job_id = ANY (v_ids) LIMIT v_batch)
                RETURNING 1
            )
            SELECT count(*)::int INTO v_count FROM gone;
            v_deleted := v_deleted || jsonb_build_object('events_deleted', v_count);
            WITH gone AS (
                DELETE FROM stageflow.webhook_deliveries AS w
                 WHERE w.delivery_id IN (SELECT o.delivery_id FROM stageflow.webhook_deliveries AS o
                                          WHERE o.job_id = ANY (v_ids) LIMIT v_batch)
                RETURNING 1
            )
            SELECT count(*)::int INTO v_count FROM gone;
            v_deleted := v_deleted || jsonb_build_object('webhook_deliveries_deleted', v_count);
            DELETE FROM stageflow.deleted_jobs AS d
             WHERE d.job_id = ANY (v_ids)
               AND NOT EXISTS (SELECT 1 FROM stageflow.tasks AS t WHERE stageflow._is_task_of_job(t.job_id, d.job_id))
               AND NOT EXISTS (SELECT 1 FROM stageflow.events AS e WHERE e.job_id = d.job_id)
               AND NOT EXISTS (SELECT 1 FROM stageflow.webhook_deliveries AS w WHERE w.job_id = d.job_id);
        END IF;
        -- The floor's notes but the highest. (A note another round holds is skipped: that round
        -- keeps a note at least as high as any it deletes, and its deletions roll back with it.
        -- A lone note is left unlocked: an idle round writes nothing here.)
        IF (SELECT count(*) > 1 FROM stageflow.lease_token_floor) THEN
            -- (picked once, as an array, as the batches above)
            DELETE FROM stageflow.lease_token_floor AS f
             WHERE f.note_id = ANY (ARRAY(SELECT o.note_id FROM stageflow.lease_token_floor AS o
                                           ORDER BY o.token DESC OFFSET 1
                                             FOR UPDATE SKIP LOCKED));
        END IF;
    EXCEPTION WHEN OTHERS THEN
        -- (what this part deleted was rolled back with it)
        v_deleted := v_deleted || '{"tasks_deleted": 0, "events_deleted": 0, "webhook_deliveries_deleted": 0}'::jsonb;
        v_errors := v_errors + stageflow._unit_failed('stageflow.run_maintenance: retention of deleted jobs'' rows', SQLERRM, SQLSTATE);
    END;

    -- 3. Archived messages (a batch picked once, as an array, as the tasks' above).
    FOR q IN
        SELECT u.queue FROM stageflow._job_type_queues() AS u(queue)
    LOOP
        BEGIN
            EXECUTE format(
                'WITH gone AS (DELETE FROM pgmq.%1$I WHERE msg_id = ANY (ARRAY('
                'SELECT a.msg_id FROM pgmq.%1$I AS a WHERE a.archived_at < $1 ORDER BY a.archived_at LIMIT $2 '
                'FOR UPDATE SKIP LOCKED)) RETURNING 1) SELECT count(*)::int FROM gone',
                pgmq.format_table_name(q.queue, 'a'))
               INTO v_count USING v_cutoff, v_batch;
            v_deleted := v_deleted || jsonb_build_object('archived_messages_deleted',
                                                         (v_deleted ->> 'archived_messages_deleted')::int + v_count);
        EXCEPTION WHEN OTHERS THEN
            v_errors := v_errors + stageflow._unit_failed(format('stageflow.run_maintenance: retention of queue %s''s archive', q.queue), SQLERRM, SQLSTATE);
        END;
    END LOOP;

    -- 4. Orphaned webhook deliveries: the next window.
    BEGIN
        v_cursor := coalesce((SELECT c.position::bigint FROM stageflow.maintenance_cursors AS c
                               WHERE c.name = 'retention:webhook_deliveries'), 0);
        SELECT array_agg(w.delivery_id ORDER BY w.delivery_id) INTO v_window
          FROM (SELECT o.delivery_id FROM stageflow.webhook_deliveries AS o
                 WHERE o.delivery_id > v_cursor ORDER BY o.delivery_id LIMIT v_jobs) AS w;
        INSERT INTO stageflow.maintenance_cursors AS c (name, position)
        VALUES ('retention:webhook_deliveries',
                CASE WHEN coalesce(cardinality(v_window), 0) < v_jobs THEN '0' ELSE v_window[cardinality(v_window)]::text END)
        ON CONFLICT (name) DO UPDATE SET position = excluded.position;
        IF v_window IS NOT NULL THEN
            WITH gone AS (
                DELETE FROM stageflow.webhook_deliveries AS w
                 WHERE w.delivery_id IN (
                       SELECT o.delivery_id FROM stageflow.webhook_deliveries AS o
                        WHERE o.delivery_id = ANY (v_window) AND o.created_at < v_cutoff
                          AND NOT EXISTS (SELECT 1 FROM stageflow.jobs AS j WHERE j.job_id = o.job_id)
                          AND NOT EXISTS (SELECT 1 FROM stageflow.deleted_jobs AS d WHERE d.job_id = o.job_id)
                          FOR UPDATE SKIP LOCKED)
                RETURNING 1
            )
            SELECT count(*)::int INTO v_count FROM gone;
            v_deleted := v_deleted || jsonb_build_object('webhook_deliveries_deleted',
                                                         (v_deleted ->> 'webhook_deliveries_deleted')::int + v_count);
        END IF;
    EXCEPTION WHEN OTHERS THEN
        v_errors := v_errors + stageflow._unit_failed('stageflow.run_maintenance: retention of orphaned webhook deliveries', SQLERRM, SQLSTATE);
    END;

    RETURN v_deleted || jsonb_build_object('errors', v_errors);
END;
$$;
-- Maintenance's part of the message windows: sends the next window of each big stage whose last
-- window has all been read (no message of msg_ids refill_at .. sent_up_to is still
-- unread in its queue) while no claim sent it (a claim whose read reached it rolled back, say), at
-- most max_rows windows a round, oldest first in each queue; visible from p_vt. Only due windows
-- count against max_rows (found by review: a LIMIT before the check let a thousand older windows
-- of an idle queue keep a busy queue's window from being sent). Returns how many it sent.
CREATE FUNCTION stageflow._send_due_windows(max_rows int, p_vt timestamptz)
RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    q         record;
    v_job_id  text;
    v_stage   int;
    v_sent    int := 0;
BEGIN
    FOR q IN
        SELECT DISTINCT mw.queue FROM stageflow.message_windows AS mw
         -- (a queue a restore or a DBA dropped is the reconciler's to make again first)
         WHERE EXISTS (SELECT 1 FROM pgmq.meta AS m WHERE m.queue_name = mw.queue)
         ORDER BY mw.queue
    LOOP
        FOR v_job_id, v_stage IN EXECUTE format(
            'SELECT mw.job_id, mw.stage FROM stageflow.message_windows AS mw'
            ' WHERE mw.queue = $1'
            '   AND NOT EXISTS (SELECT 1 FROM pgmq.%I AS m'
            '                    WHERE m.msg_id BETWEEN mw.refill_at AND mw.sent_up_to AND m.read_ct = 0)'
            ' ORDER BY mw.created_at, mw.job_id, mw.stage LIMIT $2', pgmq.format_table_name(q.queue, 'q'))
            USING q.queue, max_rows - v_sent
        LOOP
            IF stageflow._send_window(v_job_id, v_stage, p_vt) IS NOT NULL THEN
                v_sent := v_sent + 1;
            END IF;
        END LOOP;
        EXIT WHEN v_sent >= max_rows;
    END LOOP;
    RETURN v_sent;
END;
$$;
-- One round of maintenance, run by the background worker every stageflow.maintenance_interval
-- (or by hand, or from a test with stageflow.fake_now set). Each step is bounded by max_rows and
-- re-checks what it acts on under the task's row lock (rows another session holds are left to the
-- next round):
--   * expired last attempts (the notes their claims left in last_attempt_leases): dead-lettered;
--   * jobs past their deadline (the job type's timeout_seconds) fail with a job_timeout error;
--   * big stages' message windows that are due and that no claim sent are sent;
--   * the reconciler (stageflow._reconcile) walks on through tasks and messages (and wakes the
--     workers of queues where a retry came due or a lease expired);
--   * retention (stageflow._prune): finished jobs older than stageflow.retention (an interval,
--     default 7 days; 0 keeps them) are deleted with their stages, tasks, events and webhook
--     deliveries, and the queues' archived messages older than it, at most
--     stageflow.retention_batch_size rows of each table a round.
-- Each unit of work (a task, a job, a reconciler window, a retention batch) runs in a
-- subtransaction: an error in one is logged as a WARNING, counted in "errors", and the round
-- goes on. Returns what it did. Only an error outside every unit is returned as {"error": ...}
-- (with the round rolled back), so the caller can back off.
-- Without JIT (jit = off for the round and all it calls): its statements are bounded batches, and
-- one whose estimate passes jit_above_cost is compiled on every execution (a plan kept by PL/pgSQL
-- keeps no compiled code). The list of the job types' queues, over a job_types table that
-- autovacuum never analyses (it changes by a few rows), was estimated at 56,250 rows and compiled
-- three times a round: 350-420 ms a round against 4 ms without JIT, every second, on an idle engine.
CREATE FUNCTION stageflow.run_maintenance(max_rows int DEFAULT 1000)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $$
DECLARE
    v_now        timestamptz := stageflow.now();
    v_dead       int := 0;
    v_timed_out  int := 0;
    v_windows    int := 0;
    v_errors     int := 0;
    v_reconciled jsonb := '{}'::jsonb;
    v_pruned     jsonb := '{}'::jsonb;
    v_busy       boolean;
    v_retention  interval;
    v_error_message text;
    v_error_state   text;
    r            record;
BEGIN
    IF run_maintenance.max_rows IS NULL OR run_maintenance.max_rows < 1 THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('max_rows must be at least 1, got %s', coalesce(run_maintenance.max_rows::text, 'NULL')),
            HINT = 'pass how many rows each step of the round may look at, e.g. 1000 (the default)';
    END IF;
    -- (A bad argument above is the caller's error; an error below is the round's, reported.)
    BEGIN
        -- Expired notes of last attempts that no longer describe their task's lease (the task
        -- completed, failed, was released or re-claimed, or is gone: the common case) are dropped in
        -- one statement first, at most stageflow.retention_batch_size a round, oldest first (notes
        -- another session holds skipped), so that the notes of a job type whose every claim is a last
        -- attempt (max_attempts 1) do not pile up faster than the loop below goes through them.
        BEGIN
            WITH stale AS (
                SELECT l.task_id, l.lease_token FROM stageflow.last_attempt_leases AS l
                 WHERE l.expires_at <= v_now
                   AND NOT EXISTS (SELECT 1 FROM stageflow.tasks AS t
                                    WHERE t.task_id = l.task_id AND t.lease_token = l.lease_token AND t.status = 'running')
                 ORDER BY l.expires_at LIMIT stageflow._retention_batch_size()
                   FOR UPDATE OF l SKIP LOCKED
            )
            DELETE FROM stageflow.last_attempt_leases AS l USING stale
             WHERE l.task_id = stale.task_id AND l.lease_token = stale.lease_token;
        EXCEPTION WHEN OTHERS THEN
            v_errors := v_errors + stageflow._unit_failed('stageflow.run_maintenance: dropping stale last-attempt notes', SQLERRM, SQLSTATE);
        END;

        -- Expired last attempts and jobs past their deadline, one unit (a subtransaction) each: the
        -- round's max_rows oldest notes of expired last attempts (last_attempt_leases) and its
        -- max_rows earliest deadlines, gone through together in (job, stage, task) order, the order
        -- in which a claim dead-letters and a batch of completions takes its stages' shards (taken in
        -- any other order, a round holding one job's shards waited for a lower job's that a batch
        -- held while the batch waited for the first: maintenance_racing_a_batch_of_two_jobs,
        -- deadlines_racing_a_batch_of_two_jobs).
        -- A note that no longer describes its task's lease (the task completed, failed, was released
        -- or re-claimed, or its job is gone) is dropped; one whose lease a heartbeat extended follows
        -- it; a task still running on the expired lease is dead-lettered, re-checked under its row
        -- lock. A task whose row or message another session holds is left, with its note, to the next
        -- round (a claim holding its message dead-letters it itself): waiting here, while holding the
        -- shards of an earlier dead letter of the same stage, could deadlock with that claim. A job
        -- past its deadline fails (_end_job).
        FOR r IN
            SELECT u.* FROM (
                SELECT false AS deadline, t.job_id, t.stage, n.task_id, n.lease_token, t.attempt, t.max_attempts,
                       t.msg_id, t.status, t.lease_expires_at, t.lease_token AS current_token, s.queue,
                       NULL::timestamptz AS deadline_at, NULL::text AS timeout_seconds
                  FROM (SELECT l.task_id, l.lease_token FROM stageflow.last_attempt_leases AS l
                         WHERE l.expires_at <= v_now
                         ORDER BY l.expires_at LIMIT max_rows
                           FOR UPDATE SKIP LOCKED) AS n
                  LEFT JOIN stageflow.tasks AS t ON t.task_id = n.task_id
                  LEFT JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
                UNION ALL
                SELECT true, d.job_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, d.deadline_at, d.timeout_seconds
                  FROM (SELECT j.job_id, j.deadline_at, j.definition ->> 'timeout_seconds' AS timeout_seconds
                          FROM stageflow.jobs AS j
                         -- literal list: the predicate of jobs_deadline_idx, whose use must not hang on inlining (0015_statuses.sql)
                         WHERE j.status IN ('queued', 'processing') AND j.deadline_at <= v_now
                         ORDER BY j.deadline_at LIMIT max_rows) AS d) AS u
             ORDER BY u.job_id, u.deadline, u.stage, u.task_id
        LOOP
            IF r.deadline THEN
                BEGIN
                    IF stageflow._end_job(r.job_id, 'failed', jsonb_build_object(
                           'type', 'job_timeout', 'category', 'permanent',
                           'message', format('the job ran past its deadline %s (timeout_seconds %s)', r.deadline_at,
                                             r.timeout_seconds)), v_now) THEN
                        v_timed_out := v_timed_out + 1;
                    END IF;
                EXCEPTION WHEN OTHERS THEN
                    v_errors := v_errors + stageflow._unit_failed(format('stageflow.run_maintenance: failing job %s past its deadline', r.job_id), SQLERRM, SQLSTATE);
                END;
                CONTINUE;
            END IF;
            BEGIN
                IF r.status IS DISTINCT FROM 'running' OR r.current_token IS DISTINCT FROM r.lease_token THEN
                    DELETE FROM stageflow.last_attempt_leases AS l WHERE l.task_id = r.task_id AND l.lease_token = r.lease_token;
                ELSIF r.lease_expires_at > v_now THEN
                    UPDATE stageflow.last_attempt_leases AS l SET expires_at = r.lease_expires_at
                     WHERE l.task_id = r.task_id AND l.lease_token = r.lease_token;
                ELSE
                    PERFORM 1 FROM stageflow.tasks AS t
                      WHERE t.task_id = r.task_id AND t.lease_token = r.lease_token AND t.status = 'running'
                        AND t.lease_expires_at <= v_now AND t.attempt >= t.max_attempts
                        FOR UPDATE SKIP LOCKED;
                    IF FOUND THEN
                        EXECUTE format('SELECT EXISTS (SELECT 1 FROM pgmq.%1$I AS m WHERE m.msg_id = $1) '
                                       'AND NOT EXISTS (SELECT 1 FROM pgmq.%1$I AS m WHERE m.msg_id = $1 FOR UPDATE SKIP LOCKED)',
                                       pgmq.format_table_name(r.queue, 'q'))
                           INTO v_busy USING r.msg_id;
                        IF NOT v_busy AND stageflow._end_task(r.task_id, 'dead', stageflow._lease_expired_error(r.attempt, r.max_attempts)) THEN
                            v_dead := v_dead + 1;
                            DELETE FROM stageflow.last_attempt_leases AS l WHERE l.task_id = r.task_id AND l.lease_token = r.lease_token;
                        END IF;
                    END IF;
                END IF;
            EXCEPTION WHEN OTHERS THEN
                v_errors := v_errors + stageflow._unit_failed(format('stageflow.run_maintenance: dead-lettering task %s', r.task_id), SQLERRM, SQLSTATE);
            END;
        END LOOP;

        -- Big stages' next message windows that no claim sent.
        BEGIN
            v_windows := stageflow._send_due_windows(max_rows, v_now);
        EXCEPTION WHEN OTHERS THEN
            v_errors := v_errors + stageflow._unit_failed('stageflow.run_maintenance: sending message windows', SQLERRM, SQLSTATE);
        END;

        -- The reconciler's next windows.
        BEGIN
            v_reconciled := stageflow._reconcile(max_rows);
            v_errors := v_errors + coalesce((v_reconciled ->> 'errors')::int, 0);
            v_reconciled := v_reconciled - 'errors';
        EXCEPTION WHEN OTHERS THEN
            v_errors := v_errors + stageflow._unit_failed('stageflow.run_maintenance: reconciling', SQLERRM, SQLSTATE);
        END;

        -- Retention (stageflow._prune): bounded batches of finished jobs past the retention and of
        -- their rows, archived messages and orphaned webhook deliveries. (A setting that is not an
        -- interval fails the round: it is the operator's to fix, not a unit's.)
        -- With retention off (NULL) nothing more is deleted, but the jobs already deleted are drained.
        v_retention := stageflow._retention();
        BEGIN
            v_pruned := stageflow._prune(max_rows, v_retention);
            v_errors := v_errors + coalesce((v_pruned ->> 'errors')::int, 0);
            v_pruned := v_pruned - 'errors';
        EXCEPTION WHEN OTHERS THEN
            v_errors := v_errors + stageflow._unit_failed('stageflow.run_maintenance: retention', SQLERRM, SQLSTATE);
        END;

        RETURN jsonb_build_object(
            'retries_released', 0, 'leases_expired', 0, 'dead_lettered', v_dead,
            'jobs_timed_out', v_timed_out, 'windows_sent', v_windows, 'jobs_deleted', 0, 'tasks_deleted', 0, 'events_deleted', 0,
            'webhook_deliveries_deleted', 0, 'archived_messages_deleted', 0, 'errors', v_errors) || v_reconciled || v_pruned;
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS v_error_message = MESSAGE_TEXT, v_error_state = RETURNED_SQLSTATE;
        RAISE WARNING 'stageflow.run_maintenance: % (SQLSTATE %)', v_error_message, v_error_state;
        RETURN jsonb_build_object('error', jsonb_build_object('message', v_error_message, 'sqlstate', v_error_state));
    END;
END;
$$;
-- Shapes the job types' queues that still have pgmq's index on vt (stageflow._shape_queue: a
-- claim's read of a message becomes a HOT update): queues made before 0.3.0, or by pgmq.create
-- (which makes the index again on a queue that lost it). The background worker calls it after
-- each maintenance round, in a transaction of its own. Each queue's lock is taken only if it is
-- free at once, and its index's within 10 ms (a queue a worker holds is left to the next call, so
-- this never waits for a worker), and is held until the caller's transaction ends: call it alone,
-- not inside a longer transaction, or that queue's claims and reports wait for the transaction
-- (the upgrade to 0.3.0 does not shape for that reason: its transaction holds stageflow.tasks,
-- and a claim holding a queue's message while waiting for a task row deadlocked with it). A queue
-- whose shaping fails otherwise is logged as a WARNING and left. Returns how many queues it
-- shaped.
CREATE FUNCTION stageflow.shape_queues()
RETURNS int
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_shaped int := 0;
    q        record;
BEGIN
    FOR q IN
        SELECT u.queue FROM stageflow._job_type_queues() AS u(queue)
    LOOP
        BEGIN
            IF stageflow._shape_queue(q.queue, true) THEN
                v_shaped := v_shaped + 1;
            END IF;
        EXCEPTION WHEN lock_not_available THEN
            NULL;  -- (a worker holds the queue: next time)
        WHEN OTHERS THEN
            PERFORM stageflow._unit_failed(format('stageflow.shape_queues: queue %s', q.queue), SQLERRM, SQLSTATE);
        END;
    END LOOP;
    RETURN v_shaped;
END;
$$;
-- The reconciler: each call looks at the next max_rows tasks (in task_id order, from where the
-- last call stopped, wrapping around) and the next max_rows messages of each queue a job type
-- uses (in msg_id order, likewise), so every task and message is looked at within a bounded
-- number of rounds, at a bounded cost per round. What it mends, each under the task's row lock
-- (held rows are left to a later pass):
--   * an open task of an ended job is cancelled with its message (its job's other open tasks too);
--   * an open task of a live job without its message gets a new one, visible when the task is
--     next due (a running task: at its lease's expiry);
--   * a message that is not its task's current one, or whose task has ended, is deleted.
-- It also counts the messages of its window that became visible since its last pass over their
-- queue, for a due retry or an expired lease with attempts left, and wakes their queue's workers.
-- Returns {"retries_released", "leases_expired", "tasks_cancelled", "messages_resent",
-- "messages_deleted", "errors"}.
CREATE FUNCTION stageflow._reconcile(max_rows int)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now        timestamptz := stageflow.now();
    v_after      text;
    v_window     text[];
    v_cancelled  int := 0;
    v_resent     int := 0;
    v_deleted    int := 0;
    v_errors     int := 0;
    v_missing    bigint[];
    v_msg_ids    bigint[];
    v_task_ids   text[];
    v_stray      bigint[];
    v_cursor     bigint;
    v_vts        timestamptz[];
    v_ended      boolean;
    v_now_us     bigint := (extract(epoch FROM v_now) * 1000000)::bigint;
    v_from_us    bigint;
    v_to_us      bigint;
    v_due        int;
    v_expired    int;
    v_released   int := 0;
    v_redelivered int := 0;
    v_count      int;
    v_msg_id     bigint;
    v_lock_timeout text := current_setting('lock_timeout');
    r            record;
    q            record;
BEGIN
    -- Tasks: the next window.
    v_after := coalesce((SELECT c.position FROM stageflow.maintenance_cursors AS c WHERE c.name = 'tasks'), '');
    SELECT array_agg(w.task_id ORDER BY w.task_id) INTO v_window
      FROM (SELECT t.task_id FROM stageflow.tasks AS t WHERE t.task_id > v_after ORDER BY t.task_id LIMIT max_rows) AS w;
    INSERT INTO stageflow.maintenance_cursors AS c (name, position)
    VALUES ('tasks', CASE WHEN coalesce(cardinality(v_window), 0) < max_rows THEN '' ELSE v_window[cardinality(v_window)] END)
    ON CONFLICT (name) DO UPDATE SET position = excluded.position;

    -- Open tasks of ended jobs: their jobs' open tasks are cancelled. Found in the window, and
    -- among the jobs that ended in the last hour (a claim that held a task while its job ended
    -- leaves it running; its stages' shards count its running tasks, without reading them), in
    -- job order (as run_maintenance's dead letters).
    FOR r IN
        SELECT DISTINCT t.job_id FROM stageflow.tasks AS t
          JOIN stageflow.jobs AS j ON j.job_id = t.job_id
         WHERE t.task_id = ANY (v_window) AND stageflow._task_is_open(t.status)
           AND NOT stageflow._job_is_open(j.status)
        UNION
        (SELECT j.job_id FROM stageflow.jobs AS j
          WHERE j.completed_at > v_now - interval '1 hour'
            AND stageflow._job_has_ended(j.status)
            AND EXISTS (SELECT 1 FROM stageflow.stage_counts AS c WHERE c.job_id = j.job_id AND c.running_tasks > 0)
          ORDER BY j.completed_at DESC
          LIMIT max_rows)
         ORDER BY 1
    LOOP
        -- (A job whose stage another session holds for more than 20 ms is left to the next round,
        -- which reads the same window of tasks again: the round may hold the shards of a higher
        -- job from its dead letters, and a batch holding this job's shards may be waiting for
        -- those.)
        BEGIN
            PERFORM set_config('lock_timeout', '20ms', true);
            v_cancelled := v_cancelled + stageflow._cancel_leftovers(r.job_id);
            PERFORM set_config('lock_timeout', v_lock_timeout, true);
        EXCEPTION WHEN lock_not_available THEN
            -- (the setting goes back with the subtransaction)
            UPDATE stageflow.maintenance_cursors AS c SET position = v_after WHERE c.name = 'tasks';
        WHEN OTHERS THEN
            v_errors := v_errors + stageflow._unit_failed(format('stageflow._reconcile: cancelling the open tasks of ended job %s', r.job_id), SQLERRM, SQLSTATE);
        END;
    END LOOP;

    -- Open tasks of live jobs whose message is gone: a new one each.
    FOR q IN
        SELECT s.queue, array_agg(t.msg_id) AS msg_ids
          FROM stageflow.tasks AS t
          JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
          JOIN stageflow.jobs AS j ON j.job_id = t.job_id
         WHERE t.task_id = ANY (v_window) AND stageflow._task_is_open(t.status)
           AND stageflow._job_is_open(j.status)
           -- (a task of a big stage whose window has not reached it has no message yet)
           AND NOT EXISTS (SELECT 1 FROM stageflow.message_windows AS w
                            WHERE w.job_id = t.job_id AND w.stage = t.stage AND t.ordinal >= w.next_ordinal)
         GROUP BY s.queue
    LOOP
        -- (a queue a restore or a DBA dropped comes back, empty: its tasks get messages below)
        PERFORM stageflow._ensure_queue(q.queue);
        EXECUTE format('SELECT array_agg(u.msg_id) FROM unnest($1) AS u(msg_id) '
                       'WHERE NOT EXISTS (SELECT 1 FROM pgmq.%I AS m WHERE m.msg_id = u.msg_id)',
                       pgmq.format_table_name(q.queue, 'q'))
           INTO v_missing USING q.msg_ids;
        FOR r IN
            -- (this queue's tasks only: every queue numbers its messages from 1)
            SELECT t.task_id, t.msg_id FROM stageflow.tasks AS t
              JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
             WHERE t.task_id = ANY (v_window) AND s.queue = q.queue AND t.msg_id = ANY (coalesce(v_missing, '{}'))
             ORDER BY t.task_id
        LOOP
            BEGIN
                -- Under the task's lock: still open, still on the missing message, and the message still gone?
                PERFORM 1 FROM stageflow.tasks AS t
                  WHERE t.task_id = r.task_id AND t.msg_id = r.msg_id AND stageflow._task_is_open(t.status)
                    FOR UPDATE SKIP LOCKED;
                IF FOUND THEN
                    EXECUTE format('SELECT count(*) FROM pgmq.%I AS m WHERE m.msg_id = $1', pgmq.format_table_name(q.queue, 'q'))
                       INTO v_count USING r.msg_id;
                    IF v_count = 0 THEN
                        SELECT pgmq.send(q.queue, jsonb_build_object('task_id', t.task_id),
                                         CASE WHEN t.status = 'running' THEN greatest(t.lease_expires_at, v_now)
                                              ELSE greatest(coalesce(t.next_attempt_at, v_now), v_now) END)
                          INTO v_msg_id
                          FROM stageflow.tasks AS t WHERE t.task_id = r.task_id;
                        UPDATE stageflow.tasks AS t SET msg_id = v_msg_id WHERE t.task_id = r.task_id;
                        v_resent := v_resent + 1;
                    END IF;
                END IF;
            EXCEPTION WHEN OTHERS THEN
                v_errors := v_errors + stageflow._unit_failed(format('stageflow._reconcile: re-sending the message of task %s', r.task_id), SQLERRM, SQLSTATE);
            END;
        END LOOP;
    END LOOP;

    -- Messages: the next window of each queue the job types use. Its messages whose visibility
    -- time the pass over the queue counts, and whose tasks are queued for a retry that is due or
    -- running on an expired lease with attempts left, are counted and their queue's workers woken
    -- (claims take them; workers poll every few seconds anyway, so this is only a quicker start).
    -- A pass counts the times from the start of the last pass to its own start ('visible:<queue>':
    -- 'from/to' in microseconds while a pass goes on, 'to' once it ended): every position of the
    -- queue is looked at after the pass started, so a message keeping one visibility time is
    -- counted once, by the first pass whose range holds it, and no round reads more than max_rows
    -- messages of a queue whatever its size (pgmq's index on vt, which reading by time would need,
    -- is gone from the queues, see _shape_queue).
    FOR q IN
        SELECT u.queue FROM stageflow._job_type_queues() AS u(queue)
    LOOP
        BEGIN
            v_cursor := coalesce((SELECT c.position::bigint FROM stageflow.maintenance_cursors AS c
                                   WHERE c.name = 'queue:' || q.queue), 0);
            -- (a position of another shape, written by hand, counts as none)
            SELECT nullif(split_part(c.position, '/', 1), '')::bigint, nullif(split_part(c.position, '/', 2), '')::bigint
              INTO v_from_us, v_to_us
              FROM stageflow.maintenance_cursors AS c
             WHERE c.name = 'visible:' || q.queue AND c.position ~ '^[0-9]{1,17}(/[0-9]{1,17})?$';
            IF v_to_us IS NULL THEN
                -- (a pass starts)
                v_to_us := v_now_us;
            END IF;
            -- (A first pass, or a clock moved back, as tests move stageflow.fake_now: the last hour.)
            IF v_from_us IS NULL OR v_to_us > v_now_us OR v_from_us > v_to_us THEN
                v_from_us := v_now_us - 3600000000;
                v_to_us := v_now_us;
            END IF;
            EXECUTE format('SELECT array_agg(w.msg_id ORDER BY w.msg_id), array_agg(w.task_id ORDER BY w.msg_id), '
                           'array_agg(w.vt ORDER BY w.msg_id) '
                           'FROM (SELECT m.msg_id, m.message ->> ''task_id'' AS task_id, m.vt FROM pgmq.%I AS m '
                           'WHERE m.msg_id > $1 ORDER BY m.msg_id LIMIT $2) AS w',
                           pgmq.format_table_name(q.queue, 'q'))
               INTO v_msg_ids, v_task_ids, v_vts USING v_cursor, max_rows;
            v_ended := coalesce(cardinality(v_msg_ids), 0) < max_rows;
            INSERT INTO stageflow.maintenance_cursors AS c (name, position)
            VALUES ('queue:' || q.queue, CASE WHEN v_ended THEN '0' ELSE v_msg_ids[cardinality(v_msg_ids)]::text END),
                   ('visible:' || q.queue, CASE WHEN v_ended THEN v_to_us::text ELSE v_from_us || '/' || v_to_us END)
            ON CONFLICT (name) DO UPDATE SET position = excluded.position;
            -- The window's tasks, looked up once: visible since the last pass (a due retry, an
            -- expired lease with attempts left, on the task's current message), and stray (no
            -- such task, or not its task's current message, or its task has ended).
            SELECT (count(*) FILTER (WHERE w.visible AND t.msg_id = w.msg_id AND t.status = 'queued'
                                            AND t.next_attempt_at <= v_now))::int,
                   (count(*) FILTER (WHERE w.visible AND t.msg_id = w.msg_id AND t.status = 'running'
                                            AND t.lease_expires_at <= v_now AND t.attempt < t.max_attempts))::int,
                   array_agg(w.msg_id) FILTER (WHERE t.task_id IS NULL OR t.msg_id <> w.msg_id
                                                  OR NOT stageflow._task_is_open(t.status))
              INTO v_due, v_expired, v_stray
              FROM (SELECT u.msg_id, u.task_id,
                           u.vt > timestamptz 'epoch' + v_from_us * interval '1 microsecond'
                           AND u.vt <= timestamptz 'epoch' + v_to_us * interval '1 microsecond' AS visible
                      FROM unnest(v_msg_ids, v_task_ids, v_vts) AS u(msg_id, task_id, vt)) AS w
              LEFT JOIN stageflow.tasks AS t ON t.task_id = w.task_id;
            v_released := v_released + v_due;
            v_redelivered := v_redelivered + v_expired;
            IF v_due + v_expired > 0 THEN
                PERFORM pg_notify('stageflow_tasks', q.queue);
            END IF;
            IF v_stray IS NOT NULL THEN
                EXECUTE format(
                    'WITH gone AS (DELETE FROM pgmq.%1$I WHERE msg_id IN '
                    '(SELECT m.msg_id FROM pgmq.%1$I AS m WHERE m.msg_id = ANY ($1) ORDER BY m.msg_id FOR UPDATE SKIP LOCKED) '
                    'RETURNING 1) SELECT count(*) FROM gone',
                    pgmq.format_table_name(q.queue, 'q'))
                   INTO v_count USING v_stray;
                v_deleted := v_deleted + v_count;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            v_errors := v_errors + stageflow._unit_failed(format('stageflow._reconcile: messages of queue %s', q.queue), SQLERRM, SQLSTATE);
        END;
    END LOOP;

    RETURN jsonb_build_object('retries_released', v_released, 'leases_expired', v_redelivered,
                              'tasks_cancelled', v_cancelled, 'messages_resent', v_resent,
                              'messages_deleted', v_deleted, 'errors', v_errors);
END;
$$;
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:55
-- Submits a job: validates params against the job type's schema (filling in defaults), derives the
-- job id from the job type and the canonical params, and creates stage 1's tasks (or, when it has
-- none, the first stage that has), within the submitting login's quotas: 54000 over one, and an
-- error creating those tasks is the submission's (it creates nothing). The job belongs to the
-- session's login and tenant label (stageflow.tenant). webhook_url, when given, receives a POST
-- when the job ends (see stageflow.webhook_deliveries). A login's submissions under one label take
-- turns (_admit, their first lock).
--
-- Identical work has one id, so submitting it again returns the same id, and the outcome says
-- what that meant:
--   created           a new job
--   exists            your job of this work, left as it is (its webhook_url too)
--   resumed           your job of this work had failed or been cancelled: it runs again from the
--                     stage it stopped at, as stageflow.retry_job does (its completed stages and
--                     tasks are kept; the open tasks count against your quota)
--   owned_by_another  another login (or tenant) submitted this work; its job is not yours to read
--                     or cancel (job_status is NULL unless you are an admin)
-- job_status is the job's status after the call.
CREATE FUNCTION stageflow.submit_job_outcome(job_type text, params jsonb DEFAULT '{}', webhook_url text DEFAULT NULL)
RETURNS TABLE (job_id text, outcome text, job_status text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_definition  jsonb;
    v_params      jsonb;
    v_job_id      text;
    v_job         stageflow.jobs;
    v_access      text;
    v_tenant      text := stageflow._tenant();
    v_retried     jsonb;
BEGIN
    SELECT jt.definition INTO v_definition FROM stageflow.job_types AS jt WHERE jt.name = submit_job_outcome.job_type;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING
            ERRCODE = '42704',
            MESSAGE = format('unknown job type %L', submit_job_outcome.job_type),
            HINT = coalesce('registered job types: ' || (SELECT string_agg(jt.name, ', ' ORDER BY jt.name)
                                                           FROM stageflow.job_types AS jt),
                            'no job type is registered: use stageflow.register_job_type(name, definition)');
    END IF;

    IF octet_length(submit_job_outcome.params::text) > 1048576 THEN
        RAISE EXCEPTION USING
            ERRCODE = '54000',
            MESSAGE = format('the params take %s bytes, more than the limit of 1048576', octet_length(submit_job_outcome.params::text)),
            HINT = 'pass large inputs by reference (a path or URL), not inline';
    END IF;
    IF submit_job_outcome.webhook_url LIKE 'endpoint:%' THEN
        IF (stageflow._webhook_endpoint(submit_job_outcome.webhook_url, session_user, v_tenant)).name IS NULL THEN
            RAISE EXCEPTION USING
                ERRCODE = '42704',
                MESSAGE = format('unknown webhook endpoint %L', substr(submit_job_outcome.webhook_url, 10)),
                HINT = 'register it with stageflow.register_webhook_endpoint(name, url) under the same login and tenant';
        END IF;
    ELSIF submit_job_outcome.webhook_url IS NOT NULL THEN
        PERFORM stageflow._check_webhook_url(submit_job_outcome.webhook_url, 'webhook_url');
    END IF;
    v_params := stageflow._validate_params(submit_job_outcome.job_type, v_definition, submit_job_outcome.params::text);
    v_job_id := stageflow._job_id(submit_job_outcome.job_type, v_params::text);
    PERFORM stageflow._admit(session_user, v_tenant);

    LOOP
        INSERT INTO stageflow.jobs AS j (job_id, job_type, params, definition, total_stages, created_at, updated_at,
                                         deadline_at, webhook_url, owner, tenant, max_tasks)
        VALUES (v_job_id, submit_job_outcome.job_type, v_params, v_definition, jsonb_array_length(v_definition -> 'stages'),
                stageflow.now(), stageflow.now(),
                stageflow.now() + make_interval(secs => (v_definition ->> 'timeout_seconds')::numeric),
                submit_job_outcome.webhook_url, session_user, v_tenant,
                (stageflow._quota(session_user)).max_tasks_per_job)
        ON CONFLICT ON CONSTRAINT jobs_pkey DO NOTHING;
        IF FOUND THEN
            -- Under REPEATABLE READ, a snapshot taken before retention deleted the same work's
            -- earlier job still sees that job's row beside the new one: the transaction must run
            -- again, as for any serialization conflict.
            IF (SELECT count(*) FROM stageflow.jobs AS o WHERE o.job_id = v_job_id) > 1 THEN
                RAISE EXCEPTION USING
                    ERRCODE = '40001',
                    MESSAGE = format('could not serialize the submission of job %s: retention deleted the same work''s earlier job after this transaction began', v_job_id),
                    HINT = 'run the transaction again';
            END IF;
            -- The same work's earlier job, deleted by retention, may still have rows being deleted:
            -- they go now, before the new job writes any (stageflow.deleted_jobs).
            IF EXISTS (SELECT 1 FROM stageflow.deleted_jobs AS d WHERE d.job_id = v_job_id) THEN
                PERFORM stageflow._finish_job_deletion(v_job_id);
            END IF;
            PERFORM stageflow._emit(v_job_id, 'job_submitted',
                                    jsonb_build_object('job_type', submit_job_outcome.job_type, 'owner', session_user,
                                                       'tenant', v_tenant));
            IF (stageflow._create_stage_tasks(v_job_id, 1)).created = 0 THEN
                PERFORM stageflow.advance_stage(v_job_id);
                -- Stage 1 was empty: a later stage that could not be created is this call's error.
                SELECT * INTO STRICT v_job FROM stageflow.jobs AS j WHERE j.job_id = v_job_id;
                IF v_job.error ->> 'type' = 'stage_creation_failed' THEN
                    RAISE EXCEPTION USING
                        ERRCODE = v_job.error ->> 'sqlstate',
                        MESSAGE = v_job.error ->> 'message',
                        HINT = coalesce(v_job.error ->> 'hint', 'see the job type''s stages');
                END IF;
            END IF;
            PERFORM stageflow._check_open_tasks(session_user, v_tenant);
            RETURN QUERY SELECT v_job_id, 'created'::text, j.status FROM stageflow.jobs AS j WHERE j.job_id = v_job_id;
            RETURN;
        END IF;
        SELECT * INTO v_job FROM stageflow.jobs AS j WHERE j.job_id = v_job_id;
        -- Not found: retention deleted the job since the insert met it; insert again.
        CONTINUE WHEN NOT FOUND;
        v_access := stageflow._access(v_job.owner, v_job.tenant);
        IF v_access IS DISTINCT FROM 'owner' THEN
            RETURN QUERY SELECT v_job_id, 'owned_by_another'::text, CASE WHEN v_access = 'admin' THEN v_job.status END;
            RETURN;
        ELSIF NOT stageflow._job_is_stopped(v_job.status) THEN
            RETURN QUERY SELECT v_job_id, 'exists'::text, v_job.status;
            RETURN;
        END IF;
        -- The job's own label may be one this session does not name (the login's, seen without a
        -- label): its turn is taken too, after this session's ('' sorts first: no cycle).
        IF v_job.tenant IS DISTINCT FROM v_tenant THEN
            PERFORM stageflow._admit(session_user, v_job.tenant);
        END IF;
        -- (NULL: retention deleted the job since it was read here; insert again. Seen in the
        -- retention torture as "unknown job" raised to a submission.)
        v_retried := stageflow._retry_job(v_job_id, true);
        IF v_retried IS NOT NULL THEN
            PERFORM stageflow._check_open_tasks(session_user, v_job.tenant);
            RETURN QUERY SELECT v_job_id, 'resumed'::text, v_retried ->> 'job_status';
            RETURN;
        END IF;
    END LOOP;
END;
$$;
-- Submits a job and returns its id: stageflow.submit_job_outcome without the outcome. Identical
-- work of another login (or tenant) is refused (23505, its id is taken: an id the caller could
-- not read is no answer); a resumed job is told by a NOTICE.
CREATE FUNCTION stageflow.submit_job(job_type text, params jsonb DEFAULT '{}', webhook_url text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_submitted record;
BEGIN
    SELECT * INTO STRICT v_submitted
      FROM stageflow.submit_job_outcome(submit_job.job_type, submit_job.params, submit_job.webhook_url);
    IF v_submitted.outcome = 'owned_by_another' THEN
        RAISE EXCEPTION USING
            ERRCODE = '23505',
            MESSAGE = format('job %s: another login (or tenant) submitted this work; the job is not yours to read or cancel',
                             v_submitted.job_id),
            HINT = 'identical work is one job; to run it yourself make the params differ (a job type can take a '
                   'parameter naming your team), or ask its owner or stageflow_admin for its result';
    ELSIF v_submitted.outcome = 'resumed' THEN
        RAISE NOTICE USING
            MESSAGE = format('job %s had failed or been cancelled: it runs again from the stage it stopped at',
                             v_submitted.job_id),
            HINT = 'stageflow.submit_job_outcome returns the outcome of a submission';
    END IF;
    RETURN v_submitted.job_id;
END;
$$;
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:45
-- The outbox (the table stageflow.events, sql/0010_tables.sql): every change of a job's or stage's
-- state and every task failure, retry, dead letter and release is written here by the transaction
-- that makes it, and a job's end queues its webhook delivery (sql/0870_webhooks.sql).

-- Writes an event to the outbox and announces it on the channel stageflow_events with
-- {"event_id", "job_id", "kind"}.
CREATE FUNCTION stageflow._emit(p_job_id text, p_kind text, p_payload jsonb DEFAULT '{}',
                                p_stage int DEFAULT NULL, p_task_id text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_event_id bigint;
BEGIN
    INSERT INTO stageflow.events (job_id, stage, task_id, kind, payload, created_at)
    VALUES (p_job_id, p_stage, p_task_id, p_kind, p_payload, stageflow.now())
    RETURNING event_id INTO v_event_id;
    -- A job's end (kind job_<status>, a status it ended in):
    IF left(p_kind, 4) = 'job_' AND stageflow._job_has_ended(substr(p_kind, 5)) THEN
        PERFORM stageflow._queue_webhook(v_event_id, p_job_id, p_kind);
    END IF;
    PERFORM pg_notify('stageflow_events',
                      jsonb_build_object('event_id', v_event_id, 'job_id', p_job_id, 'kind', p_kind)::text);
END;
$$;
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:57
-- Leases held by workers: extended by heartbeat, handed back by release_tasks. Both lock the
-- tasks first and decide under the lock which leases are the caller's (by lease token, or by
-- worker_id when no token is given), then move those tasks' current messages: a stale caller
-- can neither extend nor hand back a lease that is not its own.

-- The running tasks among task_ids whose lease the caller holds, locked in task_id order:
-- with lease_tokens (parallel to task_ids) the token must be the task's current one; else with
-- worker_id the holder must be that worker; with neither, any running task. Only tasks of queues
-- granted to the session's login (_check_report_grants: else 42501, nothing changed).
CREATE FUNCTION stageflow._lock_leases(p_task_ids text[], p_worker_id text, p_lease_tokens bigint[])
RETURNS SETOF stageflow.tasks
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_lease_tokens IS NOT NULL AND cardinality(p_lease_tokens) IS DISTINCT FROM cardinality(p_task_ids) THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('%s task ids but %s lease tokens', coalesce(cardinality(p_task_ids), 0), cardinality(p_lease_tokens)),
            HINT = 'pass one lease token per task id, in the same order (the lease_token claim_tasks returned)';
    END IF;
    PERFORM stageflow._check_report_grants(p_task_ids);
    RETURN QUERY
    SELECT t.* FROM stageflow.tasks AS t
      JOIN unnest(p_task_ids, coalesce(p_lease_tokens, array_fill(NULL::bigint, ARRAY[cardinality(p_task_ids)])))
           AS u(task_id, lease_token) ON u.task_id = t.task_id
     WHERE t.status = 'running'
       AND CASE WHEN p_lease_tokens IS NOT NULL THEN t.lease_token = u.lease_token
                ELSE p_worker_id IS NULL OR t.worker_id = p_worker_id END
     ORDER BY t.task_id
       FOR UPDATE OF t;
END;
$$;
-- Raises 22023 for a lease outside 1 s to 7 days (claim_tasks and heartbeat check it inline).
CREATE FUNCTION stageflow._raise_bad_lease(p_lease_seconds int)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = '22023',
        MESSAGE = format('lease_seconds must be between 1 and 604800, got %s', coalesce(p_lease_seconds::text, 'NULL')),
        HINT = 'a lease is how long a worker may hold a task before it is delivered again';
END;
$$;
-- Extends the leases of running tasks (a worker's heartbeat) to lease_seconds from now (a
-- stage's own lease_seconds wins, as in claim_tasks); their messages stay invisible as long.
-- Only the caller's leases are extended (see _lock_leases). Returns the tasks extended; a task
-- missing from the answer is no longer the caller's (completed, failed, cancelled, or claimed by
-- another worker after its lease ran out): its outcome will be refused.
CREATE FUNCTION stageflow.heartbeat(task_ids text[], lease_seconds int DEFAULT 300, worker_id text DEFAULT NULL,
                                    lease_tokens bigint[] DEFAULT NULL)
RETURNS TABLE (task_id text, lease_expires_at timestamptz)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_now   timestamptz := stageflow.now();
    v_ids   text[];
    v_exp   timestamptz[];
    r       record;
BEGIN
    IF heartbeat.lease_seconds IS NULL OR heartbeat.lease_seconds NOT BETWEEN 1 AND 604800 THEN
        PERFORM stageflow._raise_bad_lease(heartbeat.lease_seconds);
    END IF;
    -- Tasks first (locked), then their messages: the lock order of every report.
    WITH extended AS (
        UPDATE stageflow.tasks AS t
           SET lease_expires_at = v_now + make_interval(secs => coalesce(s.lease_seconds, heartbeat.lease_seconds))
          FROM stageflow.stages AS s
         WHERE t.task_id IN (SELECT l.task_id FROM stageflow._lock_leases(heartbeat.task_ids, heartbeat.worker_id,
                                                                          heartbeat.lease_tokens) AS l)
           AND s.job_id = t.job_id AND s.stage = t.stage
        RETURNING t.task_id, t.lease_expires_at
    )
    SELECT array_agg(e.task_id ORDER BY e.task_id), array_agg(e.lease_expires_at ORDER BY e.task_id)
      INTO v_ids, v_exp
      FROM extended AS e;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;
    FOR r IN
        SELECT s.queue, t.lease_expires_at, array_agg(t.msg_id ORDER BY t.msg_id) AS msg_ids
          FROM stageflow.tasks AS t
          JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
         WHERE t.task_id = ANY (v_ids)
         GROUP BY s.queue, t.lease_expires_at
         ORDER BY s.queue, t.lease_expires_at
    LOOP
        PERFORM pgmq.set_vt(r.queue, r.msg_ids, r.lease_expires_at);
    END LOOP;
    RETURN QUERY SELECT u.task_id, u.lease_expires_at FROM unnest(v_ids, v_exp) AS u(task_id, lease_expires_at);
END;
$$;
-- Hands running tasks back without an outcome (a worker shutting down): they are queued again,
-- their messages visible at once, and the attempt they were on is not counted; each release is
-- recorded as a task_released event (worker, lease token, attempt), so a claim handed back leaves
-- a trace. Only the caller's
-- leases are released (see _lock_leases). Returns the number released.
CREATE FUNCTION stageflow.release_tasks(task_ids text[], worker_id text DEFAULT NULL, lease_tokens bigint[] DEFAULT NULL)
RETURNS int
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now       timestamptz := stageflow.now();
    v_ids       text[];
    r           record;
BEGIN
    FOR r IN
        WITH mine AS (
            SELECT l.task_id, l.job_id, l.stage, l.worker_id, l.lease_token, l.attempt
              FROM stageflow._lock_leases(release_tasks.task_ids, release_tasks.worker_id, release_tasks.lease_tokens) AS l
        ), released AS (
            UPDATE stageflow.tasks AS t
               SET status = 'queued', attempt = t.attempt - 1, lease_expires_at = NULL, worker_id = NULL,
                   next_attempt_at = NULL
              FROM mine AS m
             WHERE t.task_id = m.task_id
            RETURNING m.task_id, m.job_id, m.stage, m.worker_id, m.lease_token, m.attempt
        )
        SELECT x.* FROM released AS x ORDER BY x.task_id
    LOOP
        PERFORM stageflow._emit(r.job_id, 'task_released',
                                jsonb_build_object('worker_id', r.worker_id, 'lease_token', r.lease_token, 'attempt', r.attempt),
                                r.stage, r.task_id);
        v_ids := coalesce(v_ids, '{}') || r.task_id;
    END LOOP;
    IF v_ids IS NULL THEN
        RETURN 0;
    END IF;
    FOR r IN
        SELECT s.queue, array_agg(t.msg_id ORDER BY t.msg_id) AS msg_ids
          FROM stageflow.tasks AS t
          JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
         WHERE t.task_id = ANY (v_ids)
         GROUP BY s.queue
         ORDER BY s.queue
    LOOP
        PERFORM pgmq.set_vt(r.queue, r.msg_ids, v_now);
        PERFORM pg_notify('stageflow_tasks', r.queue);
    END LOOP;
    -- They no longer run (tasks, messages, then shards: the lock order of every report).
    FOR r IN
        SELECT t.job_id, t.stage, count(*)::int AS tasks
          FROM stageflow.tasks AS t
         WHERE t.task_id = ANY (v_ids)
         GROUP BY t.job_id, t.stage
         ORDER BY t.job_id, t.stage
    LOOP
        PERFORM stageflow._leave_running(r.job_id, r.stage, r.tasks);
    END LOOP;
    RETURN cardinality(v_ids);
END;
$$;
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:52
-- A stage's shards: its open tasks are counted in up to 16 rows of stageflow.stage_shards, its
-- row counts the shards still open. A task belongs to no shard: the shards' counters only add up
-- to the stage's open tasks, so whoever ends tasks takes them from any shard that has that many.
-- The primitives every path shares to move those counters and to lock them: shards (a blocking
-- wait only in shard order, holding no shard of that stage above it), then the stage row, then
-- the job row (docs/state_machine.md, "Lock order").

-- Takes p_count ended tasks off a stage's shards without waiting for a shard another transaction
-- holds, and returns how many shards this emptied, or NULL if it cannot (the caller then rolls
-- back what this took and locked, see _settle_completions). p_completed of them completed, in
-- p_seconds from claim to completion; p_stopped of them stop running: these go to the first shard
-- taken from (a stage's running, completed and seconds are sums over its shards, whichever shard
-- counts them). One shard no one holds that has them all, the first from p_prefer on (concurrent
-- batches of one stage then settle on different rows instead of queueing on shared ones); else
-- shards no one holds, one by one, while they have some. (complete_task_and_check_stage first takes
-- its one task from shard p_prefer itself, waiting for it if held.) It may leave locked a shard it
-- did not take from (a re-check that fails once a row's lock came keeps the lock): a caller waits
-- for no shard of that stage afterwards, or rolls back first.
-- No SET clause: a completion-path helper that runs under its callers' fixed search path
-- (ARCHITECTURE.md, Conventions; security.rs).
CREATE FUNCTION stageflow._take_from_free_shards(p_job_id text, p_stage int, p_count int, p_prefer int,
                                                 p_completed int, p_seconds double precision, p_stopped int)
RETURNS int
LANGUAGE plpgsql
AS $$
DECLARE
    v_remaining int;
    v_emptied   int := 0;
    v_taken     int := 0;
    v_shard     int;
BEGIN
    UPDATE stageflow.stage_shards AS sh
       SET remaining_tasks = sh.remaining_tasks - p_count, stopped_tasks = sh.stopped_tasks + p_stopped,
           completed_count = sh.completed_count + p_completed, completed_seconds = sh.completed_seconds + p_seconds
     WHERE sh.job_id = p_job_id AND sh.stage = p_stage
       AND sh.shard = (SELECT f.shard FROM stageflow.stage_shards AS f
                        WHERE f.job_id = p_job_id AND f.stage = p_stage AND f.remaining_tasks >= p_count
                        ORDER BY f.shard < p_prefer, f.shard
                        LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING sh.remaining_tasks::int INTO v_remaining;
    IF FOUND THEN
        RETURN (v_remaining = 0)::int;
    END IF;
    WHILE v_taken < p_count LOOP
        SELECT f.shard, f.remaining_tasks::int INTO v_shard, v_remaining FROM stageflow.stage_shards AS f
         WHERE f.job_id = p_job_id AND f.stage = p_stage AND f.remaining_tasks > 0
         ORDER BY f.shard < p_prefer, f.shard
         LIMIT 1 FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
        v_emptied := v_emptied + stageflow._take_from_shard(p_job_id, p_stage, v_shard, v_remaining, p_count - v_taken,
                                                             p_completed, p_seconds, p_stopped);
        v_taken := v_taken + least(v_remaining, p_count - v_taken);
        p_completed := 0; p_seconds := 0; p_stopped := 0;
    END LOOP;
    RETURN v_emptied;
END;
$$;
-- Takes p_count ended tasks off a stage's shards (the other counters as _take_from_free_shards),
-- waiting for every shard in shard order: the caller holds no shard of that stage, or holds them
-- all. Held, the shards add up to the stage's open tasks less what the other holders of a shard
-- took, each for tasks of its own (a retry_job that opens tasks again adds to them only holding
-- them all); the tasks are taken greedily in shard order. Returns how many shards this emptied.
CREATE FUNCTION stageflow._take_from_shards_in_order(p_job_id text, p_stage int, p_count int,
                                                     p_completed int DEFAULT 0, p_seconds double precision DEFAULT 0,
                                                     p_stopped int DEFAULT 0)
RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
-- (called from completions, which plan with enable_seqscan off, and from paths that do not set
-- it: its plan, made once a session by whichever calls first, is a key lookup either way)
SET enable_seqscan = off
AS $$
DECLARE
    v_emptied   int := 0;
    v_taken     int := 0;
    k           int;
    v_remaining int;
BEGIN
    FOR k, v_remaining IN
        SELECT f.shard, f.remaining_tasks::int FROM stageflow.stage_shards AS f
         WHERE f.job_id = p_job_id AND f.stage = p_stage
         ORDER BY f.shard
           FOR UPDATE
    LOOP
        IF v_remaining > 0 OR p_count = 0 THEN
            v_emptied := v_emptied + stageflow._take_from_shard(p_job_id, p_stage, k, v_remaining, p_count - v_taken,
                                                                 p_completed, p_seconds, p_stopped);
            v_taken := v_taken + least(v_remaining, p_count - v_taken);
            p_completed := 0; p_seconds := 0; p_stopped := 0;
        END IF;
        EXIT WHEN v_taken = p_count;
    END LOOP;
    IF v_taken < p_count THEN
        RAISE EXCEPTION USING
            ERRCODE = 'XX000',
            MESSAGE = format('stage %s of job %s counts %s open tasks in its shards, fewer than the %s ending',
                             p_stage, p_job_id, v_taken, p_count),
            HINT = 'the stage''s counters disagree with its tasks: report this as a bug';
    END IF;
    RETURN v_emptied;
END;
$$;
-- Takes up to p_want tasks off one shard whose lock the caller holds and whose remaining_tasks it
-- read under that lock (p_remaining), with the other counters; returns 1 if the shard emptied.
CREATE FUNCTION stageflow._take_from_shard(p_job_id text, p_stage int, p_shard int, p_remaining int, p_want int,
                                           p_completed int, p_seconds double precision, p_stopped int)
RETURNS int
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    UPDATE stageflow.stage_shards AS sh
       SET remaining_tasks = sh.remaining_tasks - least(p_remaining, p_want), stopped_tasks = sh.stopped_tasks + p_stopped,
           completed_count = sh.completed_count + p_completed, completed_seconds = sh.completed_seconds + p_seconds
     WHERE sh.job_id = p_job_id AND sh.stage = p_stage AND sh.shard = p_shard
    RETURNING (p_remaining > 0 AND sh.remaining_tasks = 0)::int;
$$;
-- Tasks of one stage that stop being open without a result (p_sign = -1: failed, dead,
-- cancelled) or open again (+1: retried): locks all of the stage's shard rows in shard order (the
-- order of every wait for them, before the stage row), takes the tasks off the shards
-- (_take_from_shards_in_order) or spreads them evenly over them, then updates the stage row:
-- open_shards by the shards that emptied (-1 each) or had been empty (+1 each), failed_count by
-- p_failed.
-- p_running of the tasks were running (they stop running). Returns the stage row as updated.
CREATE FUNCTION stageflow._move_shards(p_job_id text, p_stage int, p_count int, p_sign int, p_failed int DEFAULT 0,
                                       p_running int DEFAULT 0)
RETURNS stageflow.stages
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_delta  int;
    v_stage  stageflow.stages;
BEGIN
    PERFORM 1 FROM stageflow.stage_shards AS sh
      WHERE sh.job_id = p_job_id AND sh.stage = p_stage
      ORDER BY sh.shard FOR UPDATE;
    IF p_sign < 0 THEN
        v_delta := -stageflow._take_from_shards_in_order(p_job_id, p_stage, p_count, p_stopped => p_running);
    ELSE
        WITH moved AS (
            UPDATE stageflow.stage_shards AS sh
               SET remaining_tasks = sh.remaining_tasks + a.n,
                   stopped_tasks = sh.stopped_tasks + CASE WHEN a.shard = 0 THEN p_running ELSE 0 END
              FROM (SELECT k AS shard, p_count / s.shards + (k < p_count % s.shards)::int AS n
                      FROM stageflow.stages AS s, generate_series(0, s.shards - 1) AS k
                     WHERE s.job_id = p_job_id AND s.stage = p_stage) AS a
             WHERE sh.job_id = p_job_id AND sh.stage = p_stage AND sh.shard = a.shard AND (a.n > 0 OR a.shard = 0)
            RETURNING a.n, sh.remaining_tasks
        )
        SELECT (count(*) FILTER (WHERE m.n > 0 AND m.remaining_tasks = m.n))::int INTO v_delta FROM moved AS m;
    END IF;
    UPDATE stageflow.stages AS s
       SET open_shards = s.open_shards + v_delta, failed_count = s.failed_count + p_failed
     WHERE s.job_id = p_job_id AND s.stage = p_stage
    RETURNING * INTO v_stage;
    RETURN v_stage;
END;
$$;
-- p_count tasks of one stage that stop running but stay open (a retry scheduled, a lease handed
-- back or re-queued by retry_job): counted in stopped_tasks of a shard no one else holds (one row
-- locked, by its key: nothing re-checked can fail), else of shard 0, waited for (the caller holds
-- no shard of the stage, or all of them).
CREATE FUNCTION stageflow._leave_running(p_job_id text, p_stage int, p_count int)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE stageflow.stage_shards AS sh
       SET stopped_tasks = sh.stopped_tasks + p_count
     WHERE sh.job_id = p_job_id AND sh.stage = p_stage
       AND sh.shard = (SELECT f.shard FROM stageflow.stage_shards AS f
                        WHERE f.job_id = p_job_id AND f.stage = p_stage
                        ORDER BY f.shard
                        LIMIT 1 FOR UPDATE SKIP LOCKED);
    IF NOT FOUND THEN
        UPDATE stageflow.stage_shards AS sh
           SET stopped_tasks = sh.stopped_tasks + p_count
         WHERE sh.job_id = p_job_id AND sh.stage = p_stage AND sh.shard = 0;
    END IF;
END;
$$;
-- Locks the shard rows and the row of a job's current stage (shards in order, then the stage: the
-- order of every completion), following the job if a completion advances it meanwhile; returns
-- the stage locked, or NULL for an unknown job. Whoever ends, revives or tidies a job takes these
-- first and the job row after, so they never wait in a cycle with a completion of that stage.
CREATE FUNCTION stageflow._lock_current_stage(p_job_id text)
RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_stage   int;
    v_locked  int;
BEGIN
    LOOP
        -- No such job: v_stage is NULL, and so is the answer.
        SELECT j.current_stage INTO v_stage FROM stageflow.jobs AS j WHERE j.job_id = p_job_id;
        EXIT WHEN NOT FOUND OR v_stage IS NOT DISTINCT FROM v_locked;
        PERFORM 1 FROM stageflow.stage_shards AS sh
          WHERE sh.job_id = p_job_id AND sh.stage = v_stage
          ORDER BY sh.shard FOR UPDATE;
        PERFORM 1 FROM stageflow.stages AS s WHERE s.job_id = p_job_id AND s.stage = v_stage FOR UPDATE;
        v_locked := v_stage;
    END LOOP;
    RETURN v_stage;
END;
$$;
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:58
-- Queue grants: a worker role claims only from the queues granted to it (or to a role it is a
-- member of), and reports (completes, fails, heartbeats, releases) only tasks of those queues;
-- superusers and members of stageflow_admin claim from and report on every queue. claim_tasks
-- and stageflow._check_report_grants check them against the session's login.

-- Whether p_queue is granted to the session's login or to a role it is a member of: the grant
-- rule of claims (claim_tasks) and reports (_check_report_grants), each of which first exempts
-- superusers and members of stageflow_admin (stageflow._session_is_admin(), asked alone: an
-- expression without a query, which PL/pgSQL evaluates without starting the executor). A grant
-- to a role dropped since counts for no one (to_regrole finds no such role). (Joined to the
-- pg_roles view instead, a claim and a completion by a worker login cost 65,000 instructions
-- more, bench/README.md.)
-- No SET clause: a claim- and completion-path helper that runs under its callers' fixed search path
-- (ARCHITECTURE.md, Conventions; security.rs).
CREATE FUNCTION stageflow._queue_granted_to_session(p_queue text)
RETURNS boolean
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM stageflow.queue_grants AS g
                    WHERE g.queue = p_queue
                      AND pg_catalog.pg_has_role(session_user,
                                                 pg_catalog.to_regrole(pg_catalog.quote_ident(g.role_name))::pg_catalog.oid,
                                                 'MEMBER'));
END;
$$;
-- Refuses (42501) a report naming a task of a queue the session's login may not claim from,
-- before the report changes anything: without it, a worker of one team could complete, fail,
-- release or keep alive another team's running tasks with the forms that name no lease (and
-- guess the small tokens of the others). Called by every report path (_settle_completions,
-- fail_task, _lock_leases); ids of no task are left to the caller's own refusal. The first queue
-- refused, by name, is the one named in the error.
-- No SET clause: a completion-path helper that runs under its callers' fixed search path
-- (ARCHITECTURE.md, Conventions; security.rs).
CREATE FUNCTION stageflow._check_report_grants(p_task_ids text[])
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_queue text;
BEGIN
    IF stageflow._session_is_admin() THEN
        RETURN;
    END IF;
    IF cardinality(p_task_ids) = 1 THEN
        -- (one task, the usual report: its queue by its key, without a DISTINCT over a set)
        SELECT s.queue INTO v_queue
          FROM stageflow.tasks AS t
          JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
         WHERE t.task_id = p_task_ids[1];
        IF NOT FOUND OR stageflow._queue_granted_to_session(v_queue) THEN
            RETURN;
        END IF;
    ELSE
        SELECT q.queue INTO v_queue
          FROM (SELECT DISTINCT s.queue
                  FROM stageflow.tasks AS t
                  JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
                 WHERE t.task_id = ANY (p_task_ids)) AS q
         WHERE NOT stageflow._queue_granted_to_session(q.queue)
         ORDER BY q.queue
         LIMIT 1;
        IF NOT FOUND THEN
            RETURN;
        END IF;
    END IF;
    RAISE EXCEPTION USING
        ERRCODE = '42501',
        MESSAGE = format('role %s may not report tasks of queue %L', session_user, v_queue),
        HINT = 'a worker reports only tasks of the queues granted to it or to a role it is a member of (stageflow.grant_queue), as it claims';
END;
$$;
-- Lets p_role (a role name, often a group role of workers) claim tasks from p_queue. Granting
-- what is granted already changes nothing. Returns {"queue", "role", "granted"}.
CREATE FUNCTION stageflow.grant_queue(queue text, role name)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_new  boolean;
    v_make boolean;
BEGIN
    v_make := stageflow._check_queue(grant_queue.queue);
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles AS r WHERE r.rolname = grant_queue.role) THEN
        RAISE EXCEPTION USING
            ERRCODE = '42704',
            MESSAGE = format('unknown role %L', grant_queue.role),
            HINT = 'grant a queue to an existing role, e.g. a group role your worker logins are members of';
    END IF;
    IF v_make THEN
        PERFORM stageflow._ensure_queue(grant_queue.queue);
    END IF;
    INSERT INTO stageflow.queue_grants (queue, role_name) VALUES (grant_queue.queue, grant_queue.role)
    ON CONFLICT ON CONSTRAINT queue_grants_pkey DO NOTHING;
    v_new := FOUND;
    RETURN jsonb_build_object('queue', grant_queue.queue, 'role', grant_queue.role, 'granted', v_new);
END;
$$;
-- Takes a queue grant back: p_role's members claim from p_queue no more (unless another grant
-- or their own role lets them). Returns {"queue", "role", "revoked"}.
CREATE FUNCTION stageflow.revoke_queue(queue text, role name)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_gone boolean;
BEGIN
    DELETE FROM stageflow.queue_grants AS g WHERE g.queue = revoke_queue.queue AND g.role_name = revoke_queue.role;
    v_gone := FOUND;
    RETURN jsonb_build_object('queue', revoke_queue.queue, 'role', revoke_queue.role, 'revoked', v_gone);
END;
$$;
-- The queue grants, by queue and role.
CREATE FUNCTION stageflow.list_queue_grants()
RETURNS TABLE (queue text, role_name name, granted_at timestamptz)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY SELECT g.queue, g.role_name, g.granted_at FROM stageflow.queue_grants AS g ORDER BY g.queue, g.role_name;
END;
$$;
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:54
-- Moves a job past its current stage if that stage has no open task left: creates the next
-- stage's tasks, or completes the job. Stages that fan out to nothing are passed
-- through in the same call. Idempotent: the job row lock serialises callers and the current
-- stage's open_shards decides, so a stage's tasks are never created twice. The last completion of a
-- stage calls it; calling it by hand repairs a job that is stuck, or does nothing.
--
-- Fault isolation: an error while planning the next stage's tasks (a planner's results naming a
-- key twice, a fan-out over a limit, params that do not make one) is that job's failure, never its
-- caller's: nothing of the stage is created and the job fails with a categorised
-- `stage_creation_failed` error (event job_failed), whichever claim, batch or maintenance round
-- happened to advance it (_create_stage_tasks finds these before it writes anything).
-- A job that ended while its last completion was on the way here (cancelled, failed) is not
-- advanced; the stage that completion emptied is closed with the job.
--
-- A job some of whose tasks failed within their stages' thresholds ends `completed_with_errors`.
-- Its result stays in its last stage's tasks, where job_result pages over it: completing the job
-- copies nothing, however many tasks the last stage has.
CREATE FUNCTION stageflow.advance_stage(job_id text)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job       stageflow.jobs;
    v_stage     stageflow.stages;
    v_advanced  boolean := false;
    v_created   int;
    v_failure   jsonb;
BEGIN
    -- (NO KEY UPDATE, the lock of an UPDATE of the row: it does not wait for the KEY SHARE a
    -- retry_job takes first, which keeps retention from deleting the job under it)
    SELECT * INTO v_job FROM stageflow.jobs AS j WHERE j.job_id = advance_stage.job_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        PERFORM stageflow._raise_unknown('job', advance_stage.job_id);
    END IF;

    WHILE stageflow._job_is_open(v_job.status) LOOP
        SELECT * INTO STRICT v_stage
          FROM stageflow.stages AS s
         WHERE s.job_id = v_job.job_id AND s.stage = v_job.current_stage;
        EXIT WHEN v_stage.open_shards > 0;

        IF v_stage.status = 'active' THEN
            UPDATE stageflow.stages AS s
               SET status = 'completed', completed_at = stageflow.now()
             WHERE s.job_id = v_job.job_id AND s.stage = v_job.current_stage;
        END IF;
        PERFORM stageflow._emit(v_job.job_id, 'stage_completed',
                                jsonb_build_object('name', v_stage.name, 'task_count', v_stage.task_count,
                                                   'completed', (SELECT c.completed_count FROM stageflow.stage_counts AS c
                                                                  WHERE c.job_id = v_job.job_id AND c.stage = v_stage.stage),
                                                   'failed', v_stage.failed_count),
                                v_stage.stage);

        IF v_job.current_stage >= v_job.total_stages THEN
            UPDATE stageflow.jobs AS j
               SET status = CASE WHEN EXISTS (SELECT 1 FROM stageflow.stages AS s
                                               WHERE s.job_id = v_job.job_id AND s.failed_count > 0)
                                 THEN 'completed_with_errors' ELSE 'completed' END,
                   completed_at = stageflow.now(), updated_at = stageflow.now()
             WHERE j.job_id = v_job.job_id
            RETURNING * INTO v_job;
            PERFORM stageflow._emit(v_job.job_id, 'job_' || v_job.status, jsonb_build_object('total_stages', v_job.total_stages));
            v_advanced := true;
            EXIT;
        END IF;

        SELECT c.created, c.failure INTO v_created, v_failure
          FROM stageflow._create_stage_tasks(v_job.job_id, v_job.current_stage + 1, p_catch => true) AS c;
        IF v_failure IS NOT NULL THEN
            PERFORM stageflow._end_job(v_job.job_id, 'failed', jsonb_build_object(
                'type', 'stage_creation_failed', 'category', 'permanent', 'stage', v_job.current_stage + 1,
                'message', format('creating the tasks of stage %s failed: %s', v_job.current_stage + 1, v_failure ->> 'message'),
                'sqlstate', v_failure ->> 'sqlstate', 'hint', v_failure ->> 'hint'), p_advancing => true);
            SELECT * INTO v_job FROM stageflow.jobs AS j WHERE j.job_id = advance_stage.job_id;
            EXIT;
        END IF;
        UPDATE stageflow.jobs AS j
           SET current_stage = j.current_stage + 1, updated_at = stageflow.now()
         WHERE j.job_id = v_job.job_id
        RETURNING * INTO v_job;
        v_advanced := true;
        EXIT WHEN v_created > 0;
    END LOOP;

    IF NOT v_advanced AND NOT stageflow._job_is_open(v_job.status) THEN
        UPDATE stageflow.stages AS s
           SET status = CASE WHEN v_job.status = 'cancelled' THEN 'cancelled' ELSE 'failed' END,
               completed_at = stageflow.now()
         WHERE s.job_id = v_job.job_id AND s.stage = v_job.current_stage AND s.status = 'active' AND s.open_shards = 0;
    END IF;

    RETURN jsonb_build_object(
        'job_id', v_job.job_id,
        'advanced', v_advanced,
        'job_status', v_job.status,
        'current_stage', v_job.current_stage,
        'total_stages', v_job.total_stages);
END;
$$;
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:64
-- Cancels a job: its queued tasks are removed (messages deleted), running ones are cancelled so
-- their completions are refused, and the job ends `cancelled`. Cancelling a job that already
-- ended changes nothing and reports its status. Only for those who see the job (as job_status).
CREATE FUNCTION stageflow.cancel_job(job_id text)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_status    text;
    v_changed   boolean;
BEGIN
    v_status := (stageflow._visible_job(cancel_job.job_id)).status;
    v_changed := stageflow._job_is_open(v_status)
                 AND stageflow._end_job(cancel_job.job_id, 'cancelled',
                                        jsonb_build_object('message', 'cancelled by stageflow.cancel_job'));
    RETURN jsonb_build_object(
        'job_id', cancel_job.job_id,
        'cancelled', v_changed,
        'job_status', (SELECT j.status FROM stageflow.jobs AS j WHERE j.job_id = cancel_job.job_id));
END;
$$;
-- Makes a job and its current stage open again after a retry (the caller holds the stage's
-- shards and row): the job is processing with no error, its deadline starts over (now + the job
-- type's timeout_seconds), and job_retried is emitted.
CREATE FUNCTION stageflow._reopen_job(p_job_id text, p_stage int, p_retried int)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE stageflow.stages AS s
       SET status = 'active', completed_at = NULL
     WHERE s.job_id = p_job_id AND s.stage = p_stage;
    UPDATE stageflow.jobs AS j
       SET status = 'processing', error = NULL, completed_at = NULL, updated_at = stageflow.now(),
           deadline_at = stageflow.now() + make_interval(secs => (j.definition ->> 'timeout_seconds')::numeric)
     WHERE j.job_id = p_job_id;
    PERFORM stageflow._emit(p_job_id, 'job_retried', jsonb_build_object('stage', p_stage, 'retried_tasks', p_retried), p_stage);
END;
$$;
-- Resumes a job from the stage it stopped at: the stage's failed, dead and cancelled tasks (and a
-- task still running in the ended job: one a claim held while the job ended, whose report would
-- be refused once it is queued again) are queued again with fresh attempts and new messages, the
-- job is processing again and its deadline starts over (now + the job type's timeout_seconds). An
-- ended job whose stage has nothing left to retry (its last report landed as it ended) is resumed
-- by advancing it. A job with nothing to retry (running fine, or completed) is left as it is.
-- Returns the number of tasks re-queued.
-- Lock order as every completion's, tasks before shards before stage before job (but for a KEY
-- SHARE lock of the job row first, which only retention's delete waits for): the tasks to
-- retry that have ended (failed, dead or cancelled: a batch of completions holds such a task, a
-- stale report it refuses, while it waits for the stage's shards), then the current stage's
-- shards and row (_lock_current_stage: a completion emptying the stage finishes first, and if it
-- advanced the job, the new current stage is taken instead), then the tasks that ended meanwhile
-- without waiting (one held: every task and shard this took is rolled back, and it starts over,
-- waiting for that task first: retry_job_racing_a_batch_with_a_stale_report,
-- retry_job_racing_a_batch_holding_a_task_just_ended), running ones only if no one holds them,
-- the job row last.
-- An admin's call (stageflow.retry_job). An owner's resubmission of an ended job
-- (p_resubmission, from submit_job_outcome) resumes only a job that is still failed or cancelled
-- once its stage is locked (the submission then checks the owner's open-task quota), and gets
-- NULL for a job retention deleted since the submission read it (the submission makes it anew).
CREATE FUNCTION stageflow.retry_job(job_id text)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN stageflow._retry_job(retry_job.job_id, false);
END;
$$;
CREATE FUNCTION stageflow._retry_job(p_job_id text, p_resubmission boolean)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job      stageflow.jobs;
    v_stage    stageflow.stages;
    v_ids      text[];
    v_reopened int;
    v_running  text[];
    v_old_msgs bigint[];
    v_stopped  int;
    v_failed   int;
    v_advance  jsonb;
    v_at       int;
    v_nowait   boolean;
BEGIN
    -- (KEY SHARE: retention, which deletes a finished job's row before its stages and tasks, skips
    -- a job being retried; an UPDATE of the row, advance_stage's lock, does not wait for it)
    PERFORM 1 FROM stageflow.jobs AS j WHERE j.job_id = p_job_id FOR KEY SHARE;
    IF NOT FOUND AND p_resubmission THEN
        RETURN NULL;
    ELSIF NOT FOUND THEN
        PERFORM stageflow._raise_unknown('job', p_job_id);
    END IF;
    -- Each round in a subtransaction: one that finds an ended task held gives back every task and
    -- shard it took, and the next round waits for that task holding nothing but the job's KEY
    -- SHARE. Only the NOWAIT is caught (a lock_timeout of a waiting lock is the caller's error).
    LOOP
        v_nowait := false;
        BEGIN
            SELECT j.current_stage INTO STRICT v_at FROM stageflow.jobs AS j WHERE j.job_id = p_job_id;
            PERFORM 1 FROM stageflow.tasks AS t
             WHERE stageflow._is_task_of_job(t.job_id, p_job_id) AND t.stage = v_at
               AND stageflow._task_ended_without_result(t.status)
             ORDER BY t.task_id
               FOR UPDATE;
            v_at := stageflow._lock_current_stage(p_job_id);
            v_nowait := true;
            PERFORM 1 FROM stageflow.tasks AS t
             WHERE stageflow._is_task_of_job(t.job_id, p_job_id) AND t.stage = v_at
               AND stageflow._task_ended_without_result(t.status)
             ORDER BY t.task_id
               FOR UPDATE NOWAIT;
            EXIT;
        EXCEPTION WHEN lock_not_available THEN
            IF NOT v_nowait THEN
                RAISE;
            END IF;
        END;
    END LOOP;
    SELECT * INTO STRICT v_job FROM stageflow.jobs AS j WHERE j.job_id = p_job_id;
    IF stageflow._job_is_done(v_job.status)
       OR (p_resubmission AND NOT stageflow._job_is_stopped(v_job.status)) THEN
        RETURN jsonb_build_object('job_id', v_job.job_id, 'retried_tasks', 0, 'job_status', v_job.status);
    END IF;
    SELECT * INTO STRICT v_stage FROM stageflow.stages AS s
     WHERE s.job_id = v_job.job_id AND s.stage = v_job.current_stage;

    -- The tasks to run again (those that ended are locked above), read as they are now.
    IF stageflow._job_is_stopped(v_job.status) THEN
        v_running := ARRAY(SELECT t.task_id FROM stageflow.tasks AS t
                            WHERE stageflow._is_task_of_job(t.job_id, v_job.job_id)
                              AND t.stage = v_job.current_stage AND t.status = 'running'
                            ORDER BY t.task_id
                              FOR UPDATE SKIP LOCKED);
    END IF;
    SELECT array_agg(t.task_id ORDER BY t.ordinal),
           (count(*) FILTER (WHERE t.status <> 'running'))::int,
           array_agg(t.msg_id) FILTER (WHERE t.status = 'running'),
           (count(*) FILTER (WHERE t.status = 'running'))::int,
           (count(*) FILTER (WHERE stageflow._task_has_failed(t.status)))::int
      INTO v_ids, v_reopened, v_old_msgs, v_stopped, v_failed
      FROM stageflow.tasks AS t
     WHERE stageflow._is_task_of_job(t.job_id, v_job.job_id) AND t.stage = v_job.current_stage
       AND (stageflow._task_ended_without_result(t.status) OR t.task_id = ANY (coalesce(v_running, '{}')));
    IF v_ids IS NULL THEN
        IF stageflow._job_is_stopped(v_job.status) AND v_stage.open_shards = 0 THEN
            -- Nothing to retry, nothing open: the stage's last report landed as the job ended.
            PERFORM stageflow._reopen_job(v_job.job_id, v_job.current_stage, 0);
            v_advance := stageflow.advance_stage(v_job.job_id);
            RETURN jsonb_build_object('job_id', v_job.job_id, 'retried_tasks', 0, 'job_status', v_advance ->> 'job_status');
        END IF;
        RETURN jsonb_build_object('job_id', v_job.job_id, 'retried_tasks', 0, 'job_status', v_job.status);
    END IF;

    -- New messages, matched to the tasks by msg_id order as in _create_stage_tasks; the old
    -- messages of tasks that were still running go, but for one a claim holds (that claim may be
    -- waiting for the shards this holds: retry_job_racing_a_claim_of_leftovers); a later claim
    -- that reads it deletes it, as no longer its task's current message.
    IF v_old_msgs IS NOT NULL THEN
        PERFORM stageflow._delete_free_messages(v_stage.queue, v_old_msgs);
    END IF;
    UPDATE stageflow.tasks AS t
       SET status = 'queued', attempt = 0, msg_id = m.msg_id, error = NULL, worker_id = NULL,
           lease_expires_at = NULL, next_attempt_at = NULL, completed_at = NULL, failed_at = NULL
      FROM unnest(v_ids) WITH ORDINALITY AS u(task_id, n)
      JOIN (SELECT s.msg_id, row_number() OVER (ORDER BY s.msg_id) AS n
              FROM pgmq.send_batch(v_stage.queue,
                                   ARRAY(SELECT jsonb_build_object('task_id', i.task_id)
                                           FROM unnest(v_ids) WITH ORDINALITY AS i(task_id, n) ORDER BY i.n)) AS s(msg_id)) AS m
        ON m.n = u.n
     WHERE t.task_id = u.task_id;
    -- (a stopped job's open tasks were all cancelled: every one has a message now, and a big
    -- stage's window has none left to send)
    IF stageflow._job_is_stopped(v_job.status) THEN
        PERFORM stageflow._drop_message_windows(v_job.job_id);
    END IF;

    -- Tasks that had ended are open again on the shards; a running one never left the shards' open
    -- count, and stops running (queued again).
    IF v_reopened > 0 THEN
        PERFORM stageflow._move_shards(v_job.job_id, v_job.current_stage, v_reopened, 1, -v_failed);
    END IF;
    IF v_stopped > 0 THEN
        PERFORM stageflow._leave_running(v_job.job_id, v_job.current_stage, v_stopped);
    END IF;
    PERFORM stageflow._reopen_job(v_job.job_id, v_job.current_stage, cardinality(v_ids));
    PERFORM pg_notify('stageflow_tasks', v_stage.queue);
    RETURN jsonb_build_object('job_id', v_job.job_id, 'retried_tasks', cardinality(v_ids), 'job_status', 'processing');
END;
$$;
-- Dead letters: tasks that ended without a result, newest first: `dead` (attempts ran out,
-- including on expired leases) and `failed` (a permanent error). stageflow.retry_job runs them
-- again.
CREATE FUNCTION stageflow.dead_letters(max_rows int DEFAULT 100)
RETURNS TABLE (
    task_id text, job_id text, job_type text, stage int, stage_name text, handler text, task_key text,
    status text, attempt int, max_attempts int, error jsonb, errors jsonb, failed_at timestamptz)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF dead_letters.max_rows IS NULL OR dead_letters.max_rows NOT BETWEEN 1 AND 10000 THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('max_rows must be between 1 and 10000, got %s', coalesce(dead_letters.max_rows::text, 'NULL')),
            HINT = 'list dead letters in pages of at most 10000';
    END IF;
    RETURN QUERY
    SELECT t.task_id, t.job_id, j.job_type, t.stage, s.name, s.handler, t.task_key, t.status::text, t.attempt,
           t.max_attempts, t.error, t.errors, t.completed_at
      FROM stageflow.tasks AS t
      JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
      JOIN stageflow.jobs AS j ON j.job_id = t.job_id
     -- failed_at: set exactly when a task ends failed or dead (tasks_dead_letter_idx)
     WHERE t.failed_at IS NOT NULL
     ORDER BY t.failed_at DESC
     LIMIT dead_letters.max_rows;
END;
$$;
-- Raises 22023 unless p_url is an http(s) URL of at most 2048 characters (p_what: what the caller
-- calls it, for the message): the one rule for a submission's webhook_url and an endpoint's url.
CREATE FUNCTION stageflow._check_webhook_url(p_url text, p_what text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- (raising is its whole effect: VOLATILE, as _raise_refusal)
    -- @plpgsql_check_options: performance_warnings = false
    IF p_url IS NULL OR p_url !~ '^https?://\S+$' OR length(p_url) > 2048 THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('%s %L is not an http(s) URL of at most 2048 characters', p_what, p_url),
            HINT = 'give a URL like https://example.org/hooks/stageflow (a submission may name a registered endpoint '
                   'instead: endpoint:<name>)';
    END IF;
END;
$$;
-- The endpoint a webhook_url of the form endpoint:<name> names, for this owner and tenant label
-- (NULL: no such endpoint).
CREATE FUNCTION stageflow._webhook_endpoint(p_url text, p_owner name, p_tenant text)
RETURNS stageflow.webhook_endpoints
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT e FROM stageflow.webhook_endpoints AS e
     WHERE e.owner = p_owner AND e.tenant = coalesce(p_tenant, '') AND e.name = substr(p_url, length('endpoint:') + 1)
$$;
-- Registers (or replaces) the caller's endpoint `name` (its login's, under its tenant label) at
-- `url` with a new signing secret, and returns the secret: the only time it is shown. Registering
-- a name again rotates its secret.
CREATE FUNCTION stageflow.register_webhook_endpoint(name text, url text)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_secret text := 'whsec_' || encode(decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'), 'base64');
BEGIN
    IF register_webhook_endpoint.name IS NULL OR register_webhook_endpoint.name !~ '^[a-z0-9][a-z0-9_-]{0,62}$' THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('webhook endpoint name %L is not 1 to 63 lowercase letters, digits, _ or -', register_webhook_endpoint.name),
            HINT = 'name it like orders-prod';
    END IF;
    PERFORM stageflow._check_webhook_url(register_webhook_endpoint.url, 'webhook endpoint url');
    INSERT INTO stageflow.webhook_endpoints AS e (owner, tenant, name, url, secret, created_at)
    VALUES (session_user, coalesce(stageflow._tenant(), ''), register_webhook_endpoint.name, register_webhook_endpoint.url,
            v_secret, stageflow.now())
    ON CONFLICT ON CONSTRAINT webhook_endpoints_pkey
    DO UPDATE SET url = excluded.url, secret = excluded.secret, created_at = excluded.created_at;
    RETURN v_secret;
END;
$$;
-- The caller's endpoints (its login's, under its tenant label), without their secrets.
CREATE FUNCTION stageflow.webhook_endpoints()
RETURNS TABLE (name text, url text, created_at timestamptz)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT e.name, e.url, e.created_at FROM stageflow.webhook_endpoints AS e
     WHERE e.owner = session_user AND e.tenant = coalesce(stageflow._tenant(), '')
     ORDER BY e.name
$$;
-- Drops the caller's endpoint `name`; whether there was one. A job that names it gets no delivery
-- (its delivery is recorded as failed, saying why).
CREATE FUNCTION stageflow.drop_webhook_endpoint(name text)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM stageflow.webhook_endpoints AS e
     WHERE e.owner = session_user AND e.tenant = coalesce(stageflow._tenant(), '') AND e.name = drop_webhook_endpoint.name;
    RETURN FOUND;
END;
$$;
-- Queues a delivery for a job's terminal event when the job names a webhook.
CREATE FUNCTION stageflow._queue_webhook(p_event_id bigint, p_job_id text, p_kind text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job stageflow.jobs;
    v_url text;
    v_endpoint stageflow.webhook_endpoints;
    v_dropped boolean := false;
BEGIN
    SELECT * INTO STRICT v_job FROM stageflow.jobs AS j WHERE j.job_id = p_job_id;
    v_url := coalesce(v_job.webhook_url, v_job.definition ->> 'webhook_url');
    IF v_url IS NULL THEN
        RETURN;
    END IF;
    IF v_url LIKE 'endpoint:%' THEN
        v_endpoint := stageflow._webhook_endpoint(v_url, v_job.owner, v_job.tenant);
        -- Dropped since the submission: recorded as failed, saying so, and not sent.
        v_dropped := v_endpoint.name IS NULL;
    END IF;
    INSERT INTO stageflow.webhook_deliveries (event_id, job_id, url, payload, status, attempt_log, next_attempt_at,
                                              created_at, secret)
    VALUES (p_event_id, p_job_id, coalesce(v_endpoint.url, v_url),
            jsonb_build_object('event_id', p_event_id, 'event', p_kind, 'job', stageflow._job_status(v_job)),
            CASE WHEN v_dropped THEN 'failed' ELSE 'pending' END,
            CASE WHEN v_dropped THEN jsonb_build_array(jsonb_build_object(
                'attempt', 0, 'at', stageflow.now(), 'error', format('the webhook endpoint %s was dropped', v_url)))
                 ELSE '[]' END,
            stageflow.now(), stageflow.now(), v_endpoint.secret);
END;
$$;
-- Claims up to max_rows due deliveries for lease_seconds (they are not due again before), counting
-- the attempt. Deliveries claimed by another dispatcher are skipped. secret: the registered
-- endpoint's signing secret (NULL: sign with the dispatcher's own).
CREATE FUNCTION stageflow.claim_webhook_deliveries(max_rows int DEFAULT 10, lease_seconds int DEFAULT 30)
RETURNS TABLE (delivery_id bigint, job_id text, url text, payload jsonb, attempts int, secret text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF claim_webhook_deliveries.max_rows IS NULL OR claim_webhook_deliveries.max_rows NOT BETWEEN 1 AND 1000
       OR claim_webhook_deliveries.lease_seconds IS NULL OR claim_webhook_deliveries.lease_seconds NOT BETWEEN 1 AND 3600 THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('max_rows must be 1 to 1000 and lease_seconds 1 to 3600, got %s and %s',
                             claim_webhook_deliveries.max_rows, claim_webhook_deliveries.lease_seconds),
            HINT = 'claim deliveries in small batches with a lease longer than a POST takes';
    END IF;
    RETURN QUERY
    UPDATE stageflow.webhook_deliveries AS d
       SET attempts = d.attempts + 1,
           next_attempt_at = stageflow.now() + make_interval(secs => claim_webhook_deliveries.lease_seconds)
     -- (picked once, as an array: `IN (SELECT ... LIMIT ... FOR UPDATE SKIP LOCKED)` as the inner
     -- side of a nested loop ran again for each row, skipped the ones updated and took more,
     -- pg_test/bounded_batches.sql)
     WHERE d.delivery_id = ANY (ARRAY(SELECT w.delivery_id FROM stageflow.webhook_deliveries AS w
                                       WHERE w.status = 'pending' AND w.next_attempt_at <= stageflow.now()
                                       ORDER BY w.next_attempt_at
                                       LIMIT claim_webhook_deliveries.max_rows
                                         FOR UPDATE SKIP LOCKED))
    RETURNING d.delivery_id, d.job_id, d.url, d.payload, d.attempts, d.secret;
END;
$$;
-- Records an attempt: delivered, or failed with the status code and error seen, then retried after
-- retry_in_seconds or, when that is NULL, given up (status failed).
CREATE FUNCTION stageflow.record_webhook_attempt(delivery_id bigint, delivered boolean, status_code int DEFAULT NULL,
                                                 error text DEFAULT NULL, retry_in_seconds numeric DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_row stageflow.webhook_deliveries;
BEGIN
    UPDATE stageflow.webhook_deliveries AS d
       SET status = CASE WHEN record_webhook_attempt.delivered THEN 'delivered'
                         WHEN record_webhook_attempt.retry_in_seconds IS NULL THEN 'failed'
                         ELSE 'pending' END,
           delivered_at = CASE WHEN record_webhook_attempt.delivered THEN stageflow.now() END,
           next_attempt_at = stageflow.now() + make_interval(secs => coalesce(record_webhook_attempt.retry_in_seconds, 0)),
           attempt_log = d.attempt_log || jsonb_build_array(jsonb_build_object(
               'attempt', d.attempts, 'at', stageflow.now(), 'status_code', record_webhook_attempt.status_code,
               'error', record_webhook_attempt.error))
     WHERE d.delivery_id = record_webhook_attempt.delivery_id AND d.status = 'pending'
    RETURNING * INTO v_row;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING
            ERRCODE = '42704',
            MESSAGE = format('no pending webhook delivery %s', record_webhook_attempt.delivery_id),
            HINT = 'deliveries come from stageflow.claim_webhook_deliveries';
    END IF;
    RETURN jsonb_build_object('delivery_id', v_row.delivery_id, 'status', v_row.status, 'attempts', v_row.attempts);
END;
$$;
-- A job's webhook deliveries with their attempts (for those who see the job, as job_status: the
-- URLs often carry secrets).
CREATE FUNCTION stageflow.webhook_deliveries(job_id text)
RETURNS TABLE (delivery_id bigint, url text, status text, attempts int, attempt_log jsonb, created_at timestamptz,
               delivered_at timestamptz)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM stageflow._visible_job(webhook_deliveries.job_id);
    RETURN QUERY
    SELECT d.delivery_id, d.url, d.status, d.attempts, d.attempt_log, d.created_at, d.delivered_at
      FROM stageflow.webhook_deliveries AS d
     WHERE d.job_id = webhook_deliveries.job_id
     ORDER BY d.delivery_id;
END;
$$;
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:67
-- Metrics: what `GET /metrics` exports, one row per Prometheus sample (metric name, labels, value),
-- read from pgmq and from the stage counters (stages, stage_shards). Tasks are counted only
-- through the partial indexes of running tasks and of dead letters: no scan of all tasks. Each
-- metric's rows come in the order they are exported (by queue, status or handler name); the
-- HTTP server adds the HELP and TYPE lines and the escaping.
CREATE FUNCTION stageflow.metrics()
RETURNS TABLE (metric text, labels jsonb, value double precision)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_open bigint;
    v_completed bigint;
    v_failed bigint;
    v_cancelled bigint;
    v_running bigint;
    v_dead bigint;
BEGIN
    -- Messages in each queue, and those claimable now.
    RETURN QUERY
    SELECT m.metric, jsonb_build_object('queue', q.queue_name), m.value
      FROM pgmq.metrics_all() AS q
     CROSS JOIN LATERAL (VALUES (1, 'stageflow_queue_depth', q.queue_length::float8),
                                (2, 'stageflow_queue_depth_visible', q.queue_visible_length::float8)) AS m(n, metric, value)
     ORDER BY q.queue_name, m.n;
    -- Tasks of big stages whose messages are still to be sent (stageflow.message_windows): work a
    -- queue's depth does not show yet.
    RETURN QUERY
    SELECT 'stageflow_tasks_unsent', jsonb_build_object('queue', w.queue), sum(w.task_count - w.next_ordinal)::float8
      FROM stageflow.message_windows AS w
     GROUP BY w.queue
     ORDER BY w.queue;

    RETURN QUERY
    SELECT 'stageflow_jobs', jsonb_build_object('status', j.status), count(*)::float8
      FROM stageflow.jobs AS j
     GROUP BY j.status
     ORDER BY j.status;

    -- Tasks by status from the stage counters: open (queued or running), running, completed,
    -- failed; the rest of a stage's tasks were cancelled.
    SELECT coalesce(sum(c.remaining_tasks), 0)::bigint,
           coalesce(sum(c.running_tasks), 0)::bigint,
           coalesce(sum(c.completed_count), 0)::bigint,
           coalesce(sum(s.failed_count), 0)::bigint,
           coalesce(sum(s.task_count - c.completed_count - s.failed_count - c.remaining_tasks), 0)::bigint
      INTO v_open, v_running, v_completed, v_failed, v_cancelled
      FROM stageflow.stages AS s
      JOIN stageflow.stage_counts AS c ON c.job_id = s.job_id AND c.stage = s.stage;
    -- failed_at: set exactly when a task ends failed or dead (tasks_dead_letter_idx)
    -- (not those of jobs retention has deleted and is draining: dead_letters() lists them no more)
    SELECT count(*) INTO v_dead FROM stageflow.tasks AS t
     WHERE t.failed_at IS NOT NULL AND NOT EXISTS (SELECT 1 FROM stageflow.deleted_jobs AS d WHERE d.job_id = t.job_id);
    RETURN QUERY
    SELECT 'stageflow_tasks', jsonb_build_object('status', t.status), t.value::float8
      FROM (VALUES (1, 'queued', v_open - v_running), (2, 'running', v_running), (3, 'completed', v_completed),
                   (4, 'failed', v_failed), (5, 'cancelled', v_cancelled)) AS t(n, status, value)
     ORDER BY t.n;
    -- Tasks that ended without a result.
    RETURN QUERY
    SELECT 'stageflow_dead_letters', '{}'::jsonb, v_dead::float8;

    -- Per handler: completed and failed tasks, and the claim-to-completion seconds of the completed
    -- ones (a summary's sum and count), one metric after the other.
    RETURN QUERY
    SELECT m.metric, jsonb_build_object('handler', h.handler) || m.labels, m.value
      FROM (SELECT s.handler,
                   sum(c.completed_count)::float8 AS completed,
                   sum(s.failed_count)::float8 AS failed,
                   sum(c.completed_seconds) AS seconds
              FROM stageflow.stages AS s
              JOIN stageflow.stage_counts AS c ON c.job_id = s.job_id AND c.stage = s.stage
             GROUP BY s.handler) AS h
     CROSS JOIN LATERAL (VALUES (1, 1, 'stageflow_handler_tasks_total', '{"outcome": "completed"}'::jsonb, h.completed),
                                (1, 2, 'stageflow_handler_tasks_total', '{"outcome": "failed"}'::jsonb, h.failed),
                                (2, 1, 'stageflow_task_duration_seconds_sum', '{}'::jsonb, h.seconds),
                                (2, 2, 'stageflow_task_duration_seconds_count', '{}'::jsonb, h.completed))
                         AS m(family, n, metric, labels, value)
     ORDER BY m.family, h.handler, m.n;

    RETURN QUERY
    SELECT 'stageflow_webhook_deliveries', jsonb_build_object('status', d.status), count(*)::float8
      FROM stageflow.webhook_deliveries AS d
     GROUP BY d.status
     ORDER BY d.status;
END;
$$;
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:60
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
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:56
-- Checks a queue name the way every function taking one does: pgmq's own rules (lowercase
-- letters, digits and underscores, at most 47 characters) and that the queue exists, or is named
-- by a registered job type: then it returns true, and the caller, once it has checked that the
-- session may use the queue, makes it (_ensure_queue).
CREATE FUNCTION stageflow._check_queue(p_queue text)
RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_queue IS NULL OR p_queue !~ '^[a-z_][a-z0-9_]{0,46}$' THEN
        RAISE EXCEPTION USING
            ERRCODE = '42602',
            MESSAGE = format('invalid queue name %L', p_queue),
            HINT = 'queue names are 1 to 47 lowercase letters, digits or underscores, not starting with a digit';
    END IF;
    IF EXISTS (SELECT 1 FROM pgmq.meta AS m WHERE m.queue_name = p_queue) THEN
        RETURN false;
    ELSIF p_queue IN (SELECT u.queue FROM stageflow._job_type_queues(false) AS u(queue)) THEN
        RETURN true;
    END IF;
    RAISE EXCEPTION USING
        ERRCODE = '42704',
        MESSAGE = format('unknown queue %L', p_queue),
        HINT = 'queues are created by stageflow.register_job_type for the stages that name them';
END;
$$;
-- The messages a claim read that did not become claims (rare), settled: p_locked are the tasks
-- the claim locked, p_claimed those it is about to take (claimable under their locks: settled
-- first, so that a dead letter here that fails a job cancels them before they are claimed). Read
-- again in a new snapshot: the locked rows are as
-- they are now and stay so until the claim's transaction ends.
--   * a task another session holds: its message becomes visible again a second later;
--   * a message that is not its task's current one (a duplicate, a leftover), or whose task has
--     ended: deleted, the task untouched;
--   * a task of a job that ended: its job's leftovers are cancelled (_cancel_leftovers: under the
--     locks retry_job takes, and only if the job is still ended then; if a retry revived it, the
--     message becomes visible again);
--   * a live lease's message, or a retry's not yet due: pushed back to that time;
--   * a running task whose last attempt's lease expired: dead-lettered.
-- Dead letters and ended jobs' leftovers are settled last, in (job, stage, task) order: each
-- takes its stage's shards, and a batch of completions takes the shards of its stages in that
-- order too (in msg_id order, this held one job's shards while waiting for a lower job's that a
-- batch held, and the batch waited for the first: batch_racing_dead_letters_of_two_jobs).
CREATE FUNCTION stageflow._settle_unclaimed(p_queue text, p_msg_ids bigint[], p_task_ids text[], p_locked text[],
                                            p_claimed text[], p_now timestamptz)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_stray_msgs   bigint[] := '{}'::bigint[];
    v_busy_msgs    bigint[] := '{}'::bigint[];
    v_ended_jobs   text[] := '{}'::text[];
    v_ended_tasks  text[] := '{}'::text[];
    v_dead_tasks   text[] := '{}'::text[];
    r              record;
BEGIN
    FOR r IN
        SELECT u.msg_id, u.task_id, u.task_id = ANY (coalesce(p_locked, '{}')) AS mine,
               t.job_id, t.status, t.msg_id AS current_msg_id, t.attempt, t.max_attempts, t.lease_expires_at,
               t.next_attempt_at, j.status AS job_status
          FROM unnest(p_msg_ids, p_task_ids) AS u(msg_id, task_id)
          LEFT JOIN stageflow.tasks AS t ON t.task_id = u.task_id
          LEFT JOIN stageflow.jobs AS j ON j.job_id = t.job_id
         WHERE NOT (u.task_id = ANY (coalesce(p_claimed, '{}')))
         ORDER BY u.msg_id
    LOOP
        IF r.current_msg_id IS DISTINCT FROM r.msg_id THEN
            v_stray_msgs := v_stray_msgs || r.msg_id;       -- not its task's current message
        ELSIF NOT r.mine THEN
            v_busy_msgs := v_busy_msgs || r.msg_id;         -- another session holds the task
        ELSIF NOT stageflow._task_is_open(r.status) THEN
            v_stray_msgs := v_stray_msgs || r.msg_id;       -- its task has ended
        ELSIF NOT stageflow._job_is_open(r.job_status) THEN
            v_ended_jobs := v_ended_jobs || r.job_id;
            v_ended_tasks := v_ended_tasks || r.task_id;
        ELSIF r.status = 'running' AND r.lease_expires_at > p_now THEN
            PERFORM pgmq.set_vt(p_queue, r.msg_id, r.lease_expires_at);
        ELSIF r.attempt >= r.max_attempts THEN
            v_dead_tasks := v_dead_tasks || r.task_id;
        ELSIF r.status = 'queued' AND r.next_attempt_at > p_now THEN
            PERFORM pgmq.set_vt(p_queue, r.msg_id, r.next_attempt_at);
        ELSE
            -- claimable now, though not when the claim's snapshot looked: visible again at once
            PERFORM pgmq.set_vt(p_queue, r.msg_id, p_now);
        END IF;
    END LOOP;
    IF cardinality(v_busy_msgs) > 0 THEN
        PERFORM pgmq.set_vt(p_queue, v_busy_msgs, p_now + interval '1 second');
    END IF;
    PERFORM stageflow._delete_messages(p_queue, v_stray_msgs);
    IF cardinality(v_dead_tasks) + cardinality(v_ended_jobs) > 0 THEN
        -- (a job is either ended or open in the one snapshot the loop read: never in both lists;
        -- the dead letters' rows are this claim's, locked, as the loop read them)
        FOR r IN
            SELECT t.job_id, t.stage, t.task_id, stageflow._lease_expired_error(t.attempt, t.max_attempts) AS error
              FROM stageflow.tasks AS t
             WHERE t.task_id = ANY (v_dead_tasks)
            UNION ALL
            SELECT DISTINCT u.job_id, NULL::int, NULL::text, NULL::jsonb FROM unnest(v_ended_jobs) AS u(job_id)
             ORDER BY 1, 2, 3
        LOOP
            IF r.task_id IS NULL THEN
                PERFORM stageflow._cancel_leftovers(r.job_id);
            ELSE
                PERFORM stageflow._end_task(r.task_id, 'dead', r.error);
            END IF;
        END LOOP;
    END IF;
    IF cardinality(v_ended_jobs) > 0 THEN
        -- A job a retry revived meanwhile keeps its tasks: their messages are visible again.
        PERFORM pgmq.set_vt(p_queue, m.msg_ids, p_now)
           FROM (SELECT array_agg(t.msg_id) AS msg_ids FROM stageflow.tasks AS t
                  WHERE t.task_id = ANY (v_ended_tasks) AND stageflow._task_is_open(t.status)) AS m
          WHERE m.msg_ids IS NOT NULL;
    END IF;
END;
$$;
-- Claims up to max_tasks tasks of a queue granted to the caller's login (see queue_grants) for
-- lease_seconds (or the stage's own lease_seconds, when its definition sets one) and marks them
-- running with attempt + 1 and a new lease token.
--
-- The task row is the authority; its message is only a delivery hint. The claim reads messages
-- visible by the engine's clock (making them invisible for the lease), then locks the tasks they
-- name, skipping tasks another session holds, and takes a task only if, under its row lock, the
-- message is the task's current one, its job is open, it has attempts left, and it is queued and
-- due or running with an expired lease. Whatever else a message turns out to be is settled here:
--   * a message that is not its task's current one (a duplicate, a leftover), or whose task has
--     ended, is deleted without touching the task; an open task of an ended job is cancelled;
--   * a running task whose lease expired with no attempts left is dead-lettered;
--   * the message of a live lease, or of a retry not yet due, is pushed to that time;
--   * the message of a task another session holds becomes visible again a second later.
-- Lock order: messages, then tasks (never waited for: SKIP LOCKED), then shards, stage, job. Every
-- other path locks a task before its message, so a claim and a report never wait for each other
-- in a cycle.
--
-- Each row carries the task's params (the job's params overlaid with the task's own; for an
-- `each` stage the fanned-out array is left out), its predecessor's result (lineage), its inputs
-- (fan-in), the stage's handler timeout in seconds (NULL when it sets none), the lease's token
-- (pass it back with every report: complete, fail, heartbeat, release) and its length in seconds.
-- The rows come in no set order (sorting them cost a claim of one task 27,000 instructions of
-- 1.4 million, bench/README.md).
CREATE FUNCTION stageflow.claim_tasks(
    queue text DEFAULT 'default',
    max_tasks int DEFAULT 1,
    lease_seconds int DEFAULT 300,
    worker_id text DEFAULT NULL)
RETURNS TABLE (
    task_id text, job_id text, job_type text, stage int, stage_name text, handler text,
    task_key text, params jsonb, predecessor jsonb, inputs jsonb, attempt int,
    lease_expires_at timestamptz, timeout_seconds int, lease_token bigint, effective_lease_seconds int)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    -- The engine's clock as it reads now (stageflow.now() is the transaction's start: a claim in
    -- an old transaction would hand out a lease already partly spent, and not see a message sent
    -- earlier in the same transaction).
    v_now          timestamptz := greatest(stageflow.now(), clock_timestamp());
    v_msg_ids      bigint[];
    v_task_ids     text[];
    v_locked       text[];
    v_claimable    text[];
    v_reclaimed    text[];
    v_claimed_ids  text[];
    v_own_expiry   timestamptz[];
    v_own_msgs     bigint[];
    v_started_jobs    text[];
    v_started_stages  int[];
    v_queued_jobs     text[];
    v_last_ids        text[];
    v_last_tokens     bigint[];
    v_last_expiry     timestamptz[];
    v_short           boolean;
    v_one             boolean;
    v_locked_status   text;
    v_job_status      text;
    v_last            boolean;
    v_predecessor_id  text;
    v_one_stage       boolean;
    v_job_id          text;
    v_stage           int;
    v_fan_out         text;
    r              record;
BEGIN
    -- The queue must be granted to the session's login (or a role it is a member of), unless it is
    -- a superuser or a member of stageflow_admin (stageflow.grant_queue). (Asked in that order, in
    -- two statements: as one expression, the grants' query ran for every claim.) A claim that is
    -- refused learns first whether its queue is one: _check_queue raises the error of a bad or
    -- unknown name, so the errors come in one order whatever the call: the queue's name, the
    -- grant, the other arguments. A claim that is not refused checks its queue only if it reads
    -- nothing (below).
    IF NOT stageflow._session_is_admin() THEN
        IF NOT stageflow._queue_granted_to_session(claim_tasks.queue) THEN
            PERFORM stageflow._check_queue(claim_tasks.queue);
            RAISE EXCEPTION USING
                ERRCODE = '42501',
                MESSAGE = format('role %s may not claim tasks from queue %L', session_user, claim_tasks.queue),
                HINT = format('an admin grants it with SELECT stageflow.grant_queue(%L, %L)', claim_tasks.queue, session_user);
        END IF;
    END IF;
    IF claim_tasks.max_tasks IS NULL OR claim_tasks.max_tasks NOT BETWEEN 1 AND 10000 THEN
        PERFORM stageflow._check_queue(claim_tasks.queue);
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('max_tasks must be between 1 and 10000, got %s', coalesce(claim_tasks.max_tasks::text, 'NULL')),
            HINT = 'claim in batches of at most 10000 tasks';
    END IF;
    IF claim_tasks.lease_seconds IS NULL OR claim_tasks.lease_seconds NOT BETWEEN 1 AND 604800 THEN
        PERFORM stageflow._check_queue(claim_tasks.queue);
        PERFORM stageflow._raise_bad_lease(claim_tasks.lease_seconds);
    END IF;

    -- pgmq.read's statement on the engine's clock, with its plan kept (stageflow._read_messages).
    -- (_read_messages returns its rows in msg_id order, and an aggregate takes them in the order
    -- it reads them: v_msg_ids is sorted, its first and last are its lowest and highest)
    -- A claim of one task (the one-at-a-time path) reads, and below takes its task, in statements
    -- without aggregates: setting up an aggregate costs about 9,000 instructions in every
    -- transaction, and PL/pgSQL sets up each statement again in every transaction (a claim and a
    -- completion of one task: 1.91 million instructions before, bench/README.md, eighteenth pass).
    IF claim_tasks.max_tasks = 1 THEN
        SELECT ARRAY[m.msg_id], ARRAY[m.task_id]
          INTO v_msg_ids, v_task_ids
          FROM stageflow._read_messages(claim_tasks.queue, claim_tasks.lease_seconds, 1, v_now) AS m;
    ELSE
        SELECT array_agg(m.msg_id), array_agg(m.task_id)
          INTO v_msg_ids, v_task_ids
          FROM stageflow._read_messages(claim_tasks.queue, claim_tasks.lease_seconds, claim_tasks.max_tasks, v_now) AS m;
    END IF;
    -- Nothing read: the queue may be one pgmq does not have, which _read_messages reads as empty
    -- (it asks pgmq.meta, the authority, once per queue table and backend: a statement asking it in
    -- every claim cost a claim and a completion of one task 29,500 instructions, bench/README.md,
    -- nineteenth pass). _check_queue raises the error of a bad or unknown name, or says that a job
    -- type's queue is to be made: made here, on first use. (A queue made with pgmq's own functions
    -- under a name Stageflow's rules refuse is refused by _read_messages, with _check_queue's
    -- SQLSTATE and hint.)
    IF v_msg_ids IS NULL THEN
        IF stageflow._check_queue(claim_tasks.queue) THEN
            PERFORM stageflow._ensure_queue(claim_tasks.queue);
        END IF;
    END IF;
    -- A big stage on this queue whose tasks do not all have messages yet (stageflow.message_windows)
    -- gets its next window when this read took messages of its last one, a window ahead (each
    -- such stage), or came back short (the oldest, if none of those), never waiting for a lock;
    -- a claim that had read nothing reads again (holding nothing, it reads in any order). (One
    -- index probe of a table with a row per such stage.)
    v_short := coalesce(cardinality(v_msg_ids), 0) < claim_tasks.max_tasks;
    IF EXISTS (SELECT 1 FROM stageflow.message_windows AS w
                WHERE w.queue = claim_tasks.queue
                  AND (v_short OR stageflow._window_reached(w.refill_at, w.sent_up_to, v_msg_ids[1], v_msg_ids[cardinality(v_msg_ids)]))) THEN
        IF stageflow._send_next_window(claim_tasks.queue, v_now, v_msg_ids[1], v_msg_ids[cardinality(v_msg_ids)], v_short) > 0
           AND v_msg_ids IS NULL THEN
            SELECT array_agg(m.msg_id), array_agg(m.task_id)
              INTO v_msg_ids, v_task_ids
              FROM stageflow._read_messages(claim_tasks.queue, claim_tasks.lease_seconds, claim_tasks.max_tasks, v_now) AS m;
        END IF;
    END IF;
    IF v_msg_ids IS NULL THEN
        RETURN;
    END IF;

    -- One message: its task is locked (never waited for), then taken in an UPDATE by its key that
    -- joins its job and stage by theirs and returns the claim's answer: the same conditions as
    -- below, the same columns as the answer at the end. (The UPDATE's snapshot is taken after the
    -- lock, as below: a job that ended before the lock was taken is seen ended. Locked in the
    -- UPDATE itself, the job was read in a snapshot taken before the lock, and a claim could take
    -- a task of a job cancelled meanwhile: found by a review, bench/README.md, eighteenth pass.)
    -- A task that is not taken (another session holds it, or it may not be claimed) goes the way
    -- of every other claim below, which locks it again (a lock this session holds is taken at
    -- once) and settles its message.
    IF claim_tasks.max_tasks = 1 THEN
        SELECT t.status::text INTO v_locked_status
          FROM stageflow.tasks AS t
         WHERE t.task_id = v_task_ids[1] AND t.msg_id = v_msg_ids[1]
           FOR UPDATE SKIP LOCKED;
    END IF;
    IF v_locked_status IS NOT NULL THEN
        UPDATE stageflow.tasks AS t
           SET status = 'running',
               attempt = t.attempt + 1,
               lease_token = t.lease_token + 1,
               lease_expires_at = v_now + make_interval(secs => coalesce(s.lease_seconds, claim_tasks.lease_seconds)),
               worker_id = claim_tasks.worker_id,
               started_at = coalesce(t.started_at, v_now),
               claimed_at = v_now,
               next_attempt_at = NULL
          FROM stageflow.jobs AS j, stageflow.stages AS s
         WHERE t.task_id = v_task_ids[1] AND j.job_id = t.job_id AND s.job_id = t.job_id AND s.stage = t.stage
           AND stageflow._task_is_claimable(t.status, t.attempt, t.max_attempts, t.next_attempt_at, t.lease_expires_at, v_now)
           AND stageflow._job_is_open(j.status)
        RETURNING t.task_id, t.job_id, j.job_type, t.stage, s.name, s.handler, t.task_key,
                  CASE WHEN s.fan_out = 'each' THEN j.params - s.param ELSE j.params END
                  || stageflow._task_params(s.fan_out, t.ordinal, t.params),
                  t.inputs, t.attempt, t.lease_expires_at, s.timeout_seconds, t.lease_token,
                  coalesce(s.lease_seconds, claim_tasks.lease_seconds),
                  j.status, t.attempt >= t.max_attempts, t.predecessor_id
             INTO claim_tasks.task_id, claim_tasks.job_id, claim_tasks.job_type, claim_tasks.stage,
                  claim_tasks.stage_name, claim_tasks.handler, claim_tasks.task_key, claim_tasks.params,
                  claim_tasks.inputs, claim_tasks.attempt, claim_tasks.lease_expires_at,
                  claim_tasks.timeout_seconds, claim_tasks.lease_token, claim_tasks.effective_lease_seconds,
                  v_job_status, v_last, v_predecessor_id;
        v_one := FOUND;
        IF v_one THEN
            -- A lineage task's predecessor's result, by its key, in a statement only such a task
            -- runs (a subquery of the UPDATE was set up for every claim: 25,000 instructions of a
            -- claim and a completion of one task, bench/README.md, nineteenth pass).
            IF v_predecessor_id IS NOT NULL THEN
                SELECT p.result INTO claim_tasks.predecessor FROM stageflow.tasks AS p WHERE p.task_id = v_predecessor_id;
            END IF;
            -- A queued task started: counted in this session's row of its stage by its key, in
            -- scalars (the statement below for a set, with its arrays and conditions, cost 69,000
            -- instructions more, bench/README.md); the session's first claim of the stage makes
            -- the row below. The rest, rare, is left to the follow-ups below, in the arrays that
            -- the UPDATE of several tasks sets.
            IF v_locked_status = 'queued' THEN
                UPDATE stageflow.stage_claims AS c
                   SET started = c.started + 1
                 WHERE c.job_id = claim_tasks.job_id AND c.stage = claim_tasks.stage AND c.session = pg_backend_pid();
                IF NOT FOUND THEN
                    v_started_jobs := ARRAY[claim_tasks.job_id];
                    v_started_stages := ARRAY[claim_tasks.stage];
                END IF;
            END IF;
            IF claim_tasks.effective_lease_seconds <> claim_tasks.lease_seconds THEN
                v_own_expiry := ARRAY[claim_tasks.lease_expires_at];
                v_own_msgs := v_msg_ids;
            END IF;
            IF v_last THEN
                v_last_ids := ARRAY[claim_tasks.task_id];
                v_last_tokens := ARRAY[claim_tasks.lease_token];
                v_last_expiry := ARRAY[claim_tasks.lease_expires_at];
            END IF;
            IF v_job_status = 'queued' THEN
                v_queued_jobs := ARRAY[claim_tasks.job_id];
            END IF;
        END IF;
    END IF;

    IF v_one IS NOT TRUE THEN
        -- Lock the tasks whose current message was read (rows another session holds are skipped; a
        -- row changed since this statement's snapshot is locked in its newest version and its
        -- conditions re-checked there), and see which of them may be claimed, which of those are
        -- re-claims of an expired lease (already counted as running), and which jobs they would start
        -- (a job once per task: the jobs' UPDATE below reads them as a set). In no particular order:
        -- SKIP LOCKED never waits, so the order of these locks cannot make a cycle.
        SELECT array_agg(l.task_id), array_agg(l.task_id) FILTER (WHERE l.claimable),
               array_agg(l.task_id) FILTER (WHERE l.claimable AND l.status = 'running'),
               array_agg(l.job_id) FILTER (WHERE l.claimable AND l.job_status = 'queued'),
               -- (whether the claimable ones are all of one stage, and which)
               min(l.job_id) FILTER (WHERE l.claimable),
               min(l.job_id) FILTER (WHERE l.claimable) = max(l.job_id) FILTER (WHERE l.claimable)
               AND min(l.stage) FILTER (WHERE l.claimable) = max(l.stage) FILTER (WHERE l.claimable),
               min(l.stage) FILTER (WHERE l.claimable)
          INTO v_locked, v_claimable, v_reclaimed, v_queued_jobs, v_job_id, v_one_stage, v_stage
          FROM (SELECT k.task_id, k.job_id, k.stage, k.status, k.job_status,
                       stageflow._task_is_claimable(k.status, k.attempt, k.max_attempts, k.next_attempt_at,
                                                    k.lease_expires_at, v_now)
                       AND stageflow._job_is_open(k.job_status) AS claimable
                  FROM (SELECT t.task_id, t.job_id, t.stage, t.status, t.attempt, t.max_attempts, t.next_attempt_at,
                               t.lease_expires_at,
                               -- (the job by its key, a lookup whatever the statistics say: joined, the
                               -- plan made without statistics cost a claim four times as much)
                               (SELECT j.status FROM stageflow.jobs AS j WHERE j.job_id = t.job_id) AS job_status
                          FROM stageflow.tasks AS t
                         WHERE t.task_id = ANY (v_task_ids) AND t.msg_id = ANY (v_msg_ids)
                           FOR UPDATE OF t SKIP LOCKED) AS k) AS l;

        -- The messages that will not become claims (rare) are settled first: a dead letter there that
        -- fails its job cancels the job's other open tasks, the claimable ones among them, before any
        -- is claimed (a lease token is only ever spent on a lease handed out).
        IF coalesce(cardinality(v_claimable), 0) < cardinality(v_msg_ids) THEN
            PERFORM stageflow._settle_unclaimed(claim_tasks.queue, v_msg_ids, v_task_ids, v_locked, v_claimable, v_now);
        END IF;
        IF v_claimable IS NULL THEN
            RETURN;
        END IF;
        -- Tasks all of one stage (a batch's, nearly always): its job and stage read once, now that the
        -- tasks are locked (as the UPDATE's per-task lookups below read them: a job that ended before
        -- the lock was taken is seen ended), for the UPDATE (the job's status, the stage's lease) and
        -- for the answer (what does not change once the job and stage are made: into the output
        -- columns, copied to every row below), rather than looked up for each task (claim 100 +
        -- complete_tasks: 13,000 and 17,600 instructions a task, bench/README.md, twentieth pass).
        -- (The tasks claimed are some of these: of the same stage.)
        IF v_one_stage THEN
            SELECT j.status, j.job_type, s.name, s.handler,
                   CASE WHEN s.fan_out = 'each' THEN j.params - s.param ELSE j.params END,
                   s.fan_out, s.timeout_seconds, coalesce(s.lease_seconds, claim_tasks.lease_seconds)
              INTO v_job_status, claim_tasks.job_type, claim_tasks.stage_name, claim_tasks.handler,
                   claim_tasks.params, v_fan_out, claim_tasks.timeout_seconds, claim_tasks.effective_lease_seconds
              FROM stageflow.jobs AS j, stageflow.stages AS s
             WHERE j.job_id = v_job_id AND s.job_id = v_job_id AND s.stage = v_stage;
        ELSE
            v_job_id := NULL;
        END IF;

        -- Take them: the UPDATE re-checks its conditions on each row (locked, as the rare path left it).
        -- (Only the task table in FROM, by its key, the job and stage looked up by theirs: joined, a
        -- plan made without statistics drove from the jobs through tasks_stage_idx and read the whole
        -- stage for each claim.)
        WITH claimed AS (
            UPDATE stageflow.tasks AS t
               SET status = 'running',
                   attempt = t.attempt + 1,
                   lease_token = t.lease_token + 1,
                   lease_expires_at = v_now + make_interval(secs =>
                       CASE WHEN t.job_id = v_job_id AND t.stage = v_stage THEN claim_tasks.effective_lease_seconds
                            ELSE coalesce((SELECT s.lease_seconds FROM stageflow.stages AS s WHERE s.job_id = t.job_id AND s.stage = t.stage),
                                          claim_tasks.lease_seconds) END),
                   worker_id = claim_tasks.worker_id,
                   started_at = coalesce(t.started_at, v_now),
                   claimed_at = v_now,
                   next_attempt_at = NULL
             WHERE t.task_id = ANY (v_claimable)
               AND stageflow._task_is_claimable(t.status, t.attempt, t.max_attempts, t.next_attempt_at, t.lease_expires_at, v_now)
               AND stageflow._job_is_open(CASE WHEN t.job_id = v_job_id THEN v_job_status ELSE
                                              (SELECT j.status FROM stageflow.jobs AS j WHERE j.job_id = t.job_id) END)
            RETURNING t.task_id, t.job_id, t.stage, t.msg_id, t.lease_token, t.lease_expires_at,
                      NOT (t.task_id = ANY (coalesce(v_reclaimed, '{}'))) AS was_queued,
                      t.attempt >= t.max_attempts AS last_attempt
        )
        SELECT array_agg(c.task_id),
               -- a stage's own lease_seconds made a lease other than the claim's
               array_agg(c.lease_expires_at) FILTER (WHERE c.lease_expires_at <> v_now + make_interval(secs => claim_tasks.lease_seconds)),
               array_agg(c.msg_id) FILTER (WHERE c.lease_expires_at <> v_now + make_interval(secs => claim_tasks.lease_seconds)),
               array_agg(c.job_id) FILTER (WHERE c.was_queued), array_agg(c.stage) FILTER (WHERE c.was_queued),
               array_agg(c.task_id) FILTER (WHERE c.last_attempt), array_agg(c.lease_token) FILTER (WHERE c.last_attempt),
               array_agg(c.lease_expires_at) FILTER (WHERE c.last_attempt)
          INTO v_claimed_ids, v_own_expiry, v_own_msgs, v_started_jobs, v_started_stages,
               v_last_ids, v_last_tokens, v_last_expiry
          FROM claimed AS c;
    END IF;

    -- Stages with a lease of their own: their messages stay invisible that long instead.
    IF v_own_expiry IS NOT NULL THEN
        FOR r IN SELECT u.expiry, array_agg(u.msg_id) AS msg_ids FROM unnest(v_own_expiry, v_own_msgs) AS u(expiry, msg_id) GROUP BY u.expiry LOOP
            PERFORM pgmq.set_vt(claim_tasks.queue, r.msg_ids, r.expiry);
        END LOOP;
    END IF;

    -- The queued tasks it started count as running: this session's own row per stage (no other
    -- session writes it, so no claim waits here); a task re-claimed after its lease expired was
    -- counted already. A last attempt leaves a note of its lease for maintenance.
    -- Tasks all of one stage whose row exists, the usual claim: one UPDATE by its key (an upsert
    -- locks the row before updating it, a WAL record more per claim). Otherwise (the session's
    -- first claim of a stage, or tasks of several) the counts are grouped and upserted. (The
    -- grouping in every claim cost a claim of one task 17 us of its 240; the arrays and the loop
    -- per stage this replaces, 20,000 instructions more, counted with valgrind, bench/README.md.)
    IF v_started_jobs IS NOT NULL THEN
        UPDATE stageflow.stage_claims AS c
           SET started = c.started + cardinality(v_started_jobs)
         WHERE c.job_id = v_started_jobs[1] AND c.stage = v_started_stages[1] AND c.session = pg_backend_pid()
           AND v_started_jobs[1] = ALL (v_started_jobs) AND v_started_stages[1] = ALL (v_started_stages);
        IF NOT FOUND THEN
            INSERT INTO stageflow.stage_claims AS c (job_id, stage, session, started)
            SELECT u.job_id, u.stage, pg_backend_pid(), count(*)
              FROM unnest(v_started_jobs, v_started_stages) AS u(job_id, stage)
             GROUP BY u.job_id, u.stage
            ON CONFLICT (job_id, stage, session) DO UPDATE SET started = c.started + excluded.started;
        END IF;
    END IF;
    IF v_last_ids IS NOT NULL THEN
        INSERT INTO stageflow.last_attempt_leases (task_id, lease_token, expires_at)
        SELECT u.task_id, u.lease_token, u.expires_at FROM unnest(v_last_ids, v_last_tokens, v_last_expiry) AS u(task_id, lease_token, expires_at)
        -- (a note left by a deleted task of the same id, before maintenance dropped it)
        ON CONFLICT (task_id, lease_token) DO UPDATE SET expires_at = excluded.expires_at;
    END IF;
    -- A job's first claim starts it (job rows in job order).
    IF v_queued_jobs IS NOT NULL THEN
        UPDATE stageflow.jobs AS j
           SET status = 'processing', started_at = v_now, updated_at = v_now
         WHERE j.job_id IN (SELECT q.job_id FROM stageflow.jobs AS q
                             WHERE q.job_id = ANY (v_queued_jobs) AND q.status = 'queued'
                             ORDER BY q.job_id
                               FOR UPDATE)
           AND j.status = 'queued';
    END IF;
    IF v_one THEN
        RETURN NEXT;
        RETURN;
    END IF;
    -- The answer. Tasks all of one stage: its job's and stage's columns as read above, not joined to
    -- each task.
    IF v_one_stage THEN
        RETURN QUERY
        SELECT t.task_id, t.job_id, claim_tasks.job_type, t.stage, claim_tasks.stage_name, claim_tasks.handler,
               t.task_key, claim_tasks.params || stageflow._task_params(v_fan_out, t.ordinal, t.params),
               CASE WHEN t.predecessor_id IS NOT NULL THEN
                   (SELECT p.result FROM stageflow.tasks AS p WHERE p.task_id = t.predecessor_id) END,
               t.inputs, t.attempt, t.lease_expires_at, claim_tasks.timeout_seconds, t.lease_token,
               claim_tasks.effective_lease_seconds
          FROM stageflow.tasks AS t
         WHERE t.task_id = ANY (v_claimed_ids) AND t.status = 'running';
        RETURN;
    END IF;
    RETURN QUERY
    SELECT t.task_id, t.job_id, j.job_type, t.stage, s.name, s.handler, t.task_key,
           CASE WHEN s.fan_out = 'each' THEN j.params - s.param ELSE j.params END
           || stageflow._task_params(s.fan_out, t.ordinal, t.params),
           p.result, t.inputs, t.attempt, t.lease_expires_at, s.timeout_seconds, t.lease_token,
           coalesce(s.lease_seconds, claim_tasks.lease_seconds)
      FROM stageflow.tasks AS t
      JOIN stageflow.jobs AS j ON j.job_id = t.job_id
      JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
      LEFT JOIN stageflow.tasks AS p ON p.task_id = t.predecessor_id
     WHERE t.task_id = ANY (v_claimed_ids) AND t.status = 'running';
END;
$$;
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:61
-- Deletes the messages of queue p_queue among p_msg_ids that no other transaction holds (a claim
-- that reads one of the others deletes it, as not its task's current message or one whose task
-- ended). Paths that hold a job's shards use it: a wait for a message a claim holds, while that
-- claim waits for the shards, is a deadlock. (pgmq.delete
-- cannot skip locked rows: this deletes from the queue table, named by pgmq.format_table_name.)
CREATE FUNCTION stageflow._delete_free_messages(p_queue text, p_msg_ids bigint[])
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE format(
        'DELETE FROM pgmq.%1$I WHERE msg_id IN '
        '(SELECT q.msg_id FROM pgmq.%1$I AS q WHERE q.msg_id = ANY ($1) ORDER BY q.msg_id FOR UPDATE SKIP LOCKED)',
        pgmq.format_table_name(p_queue, 'q'))
    USING p_msg_ids;
END;
$$;
-- Cancels the open (queued or running) tasks of a job that has ended, skipping rows another
-- session holds instead of waiting for them (waiting could deadlock with a completion that holds
-- its task and waits for the job row). What was skipped settles itself or is mended: a report in
-- flight is recorded without advancing the job; a claim that read the job as still open hands the
-- task out, its report is recorded the same way, and maintenance's reconciler cancels the task if
-- it is still running (retry_job re-queues it too). Tasks first, then their
-- messages (also skipped when held: a claim holding one finds its task cancelled and deletes it),
-- then each stage's shards. Returns how many tasks it cancelled.
CREATE FUNCTION stageflow._cancel_open_tasks(p_job_id text)
RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_group      record;
    v_stages     int[];
    v_queues     text[];
    v_msg_ids    bigint[];
    v_running    boolean[];
BEGIN
    WITH locked AS (
        SELECT o.task_id, o.status FROM stageflow.tasks AS o
         WHERE stageflow._is_task_of_job(o.job_id, p_job_id) AND stageflow._task_is_open(o.status)
         ORDER BY o.task_id
           FOR UPDATE SKIP LOCKED
    ), cancelled AS (
        UPDATE stageflow.tasks AS t
           SET status = 'cancelled', completed_at = stageflow.now(), lease_expires_at = NULL
          FROM locked AS l
         WHERE t.task_id = l.task_id
        RETURNING t.stage, t.msg_id, l.status = 'running' AS was_running
    )
    SELECT array_agg(c.stage), array_agg(s.queue), array_agg(c.msg_id), array_agg(c.was_running)
      INTO v_stages, v_queues, v_msg_ids, v_running
      FROM cancelled AS c
      JOIN stageflow.stages AS s ON s.job_id = p_job_id AND s.stage = c.stage;
    IF v_stages IS NULL THEN
        RETURN 0;
    END IF;

    FOR v_group IN
        SELECT u.queue, array_agg(u.msg_id ORDER BY u.msg_id) AS msg_ids FROM unnest(v_queues, v_msg_ids) AS u(queue, msg_id)
         GROUP BY u.queue ORDER BY u.queue
    LOOP
        PERFORM stageflow._delete_free_messages(v_group.queue, v_group.msg_ids);
    END LOOP;
    FOR v_group IN
        SELECT u.stage, count(*)::int AS tasks, (count(*) FILTER (WHERE u.was_running))::int AS running
          FROM unnest(v_stages, v_running) AS u(stage, was_running)
         GROUP BY u.stage ORDER BY u.stage
    LOOP
        PERFORM stageflow._move_shards(p_job_id, v_group.stage, v_group.tasks, -1, 0, v_group.running);
    END LOOP;
    RETURN cardinality(v_stages);
END;
$$;
-- Ends an open job as failed or cancelled (with p_deadline: only if its deadline is still at or
-- before it, as a concurrent retry_job moves it). Its current stage's shards and row are locked
-- first, then the job row: from then on nothing advances the job, and the statements after it see
-- every stage and task a completion created before: its open tasks are cancelled and its active
-- stages closed (stage rows another session holds are skipped: the completion holding one closes
-- it when advance_stage finds the job ended). Records the error and emits job_<status>. Returns
-- false if the job had already ended. p_advancing: called by advance_stage, which holds the job
-- row and found the current stage without open tasks: nothing of that stage is left to cancel,
-- and its shards are not waited for (the completion advancing the job holds one of them, and a
-- cancel_job holding the lower ones waits for it: a deadlock).
CREATE FUNCTION stageflow._end_job(p_job_id text, p_status text, p_error jsonb, p_deadline timestamptz DEFAULT NULL,
                                   p_advancing boolean DEFAULT false)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_cancelled int;
BEGIN
    IF NOT p_advancing THEN
        PERFORM stageflow._lock_current_stage(p_job_id);
    END IF;
    UPDATE stageflow.jobs AS j
       SET status = p_status, error = coalesce(p_error, j.error),
           completed_at = stageflow.now(), updated_at = stageflow.now()
     WHERE j.job_id = p_job_id AND stageflow._job_is_open(j.status)
       AND (p_deadline IS NULL OR j.deadline_at <= p_deadline);
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    v_cancelled := stageflow._cancel_open_tasks(p_job_id);
    -- (a big stage's tasks without messages were cancelled with the rest)
    PERFORM stageflow._drop_message_windows(p_job_id);
    UPDATE stageflow.stages AS s
       SET status = CASE WHEN p_status = 'cancelled' THEN 'cancelled' ELSE 'failed' END,
           completed_at = stageflow.now()
     WHERE (s.job_id, s.stage) IN (SELECT a.job_id, a.stage FROM stageflow.stages AS a
                                    WHERE a.job_id = p_job_id AND a.status = 'active'
                                    ORDER BY a.stage
                                      FOR UPDATE SKIP LOCKED);
    PERFORM stageflow._emit(p_job_id, 'job_' || p_status,
                            jsonb_build_object('error', p_error, 'cancelled_tasks', v_cancelled));
    RETURN true;
END;
$$;
-- Cancels what is still open of a job that has ended (tasks a claim or report held while the job
-- ended): under the locks of its current stage, which retry_job takes too, and only if the job is
-- still ended then (a retry that came first revived it). Returns how many tasks it cancelled.
CREATE FUNCTION stageflow._cancel_leftovers(p_job_id text)
RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM stageflow._lock_current_stage(p_job_id);
    IF NOT EXISTS (SELECT 1 FROM stageflow.jobs AS j
                    WHERE j.job_id = p_job_id AND stageflow._job_has_ended(j.status)) THEN
        RETURN 0;
    END IF;
    RETURN stageflow._cancel_open_tasks(p_job_id);
END;
$$;
-- Ends a task without a result: 'failed' (a permanent error) or 'dead' (its attempts ran out).
-- Its message is archived (pgmq.archive), its error kept. Within the stage's failure threshold the
-- stage goes on without it (and advances if it was the last open task); beyond it the job fails.
-- The task row is locked before its message (callers that decided on it hold the lock already).
-- Returns false if the task was no longer open.
CREATE FUNCTION stageflow._end_task(p_task_id text, p_status text, p_error jsonb)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_task       record;
    v_stage      stageflow.stages;
BEGIN
    SELECT t.job_id, t.stage, t.ordinal, t.msg_id, t.attempt, t.status, s.queue INTO STRICT v_task
      FROM stageflow.tasks AS t
      JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
     WHERE t.task_id = p_task_id
       FOR UPDATE OF t;
    IF NOT stageflow._task_is_open(v_task.status) THEN
        RETURN false;
    END IF;

    PERFORM pgmq.archive(v_task.queue, v_task.msg_id);
    UPDATE stageflow.tasks AS t
       SET status = p_status, error = p_error, completed_at = stageflow.now(), lease_expires_at = NULL,
           failed_at = stageflow.now(),
           errors = t.errors || jsonb_build_array(jsonb_build_object(
               'attempt', t.attempt, 'at', stageflow.now(), 'worker_id', t.worker_id, 'lease_token', t.lease_token,
               'error', p_error))
     WHERE t.task_id = p_task_id AND stageflow._task_is_open(t.status);
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM stageflow._emit(v_task.job_id, 'task_' || p_status,
                            jsonb_build_object('attempt', v_task.attempt, 'error', p_error), v_task.stage, p_task_id);

    -- All of the stage's shards are locked before its row: if this failure ends the job,
    -- cancelling the other open tasks moves their shards too, in the order shards -> stage.
    v_stage := stageflow._move_shards(v_task.job_id, v_task.stage, 1, -1, 1,
                                      CASE WHEN v_task.status = 'running' THEN 1 ELSE 0 END);

    IF v_stage.failed_count <= v_stage.max_failed_tasks
       OR v_stage.failed_count <= v_stage.max_failure_ratio * v_stage.task_count THEN
        IF v_stage.open_shards = 0 THEN
            PERFORM stageflow.advance_stage(v_task.job_id);
        END IF;
        RETURN true;
    END IF;

    PERFORM stageflow._end_job(
        v_task.job_id, 'failed',
        jsonb_build_object(
            'message', format('task %s %s on attempt %s; stage %s (%s) tolerates %s failed task(s) or a ratio of %s',
                              p_task_id, CASE p_status WHEN 'dead' THEN 'ran out of attempts' ELSE 'failed' END,
                              v_task.attempt, v_stage.stage, v_stage.name, v_stage.max_failed_tasks,
                              v_stage.max_failure_ratio),
            'task_id', p_task_id, 'stage', v_task.stage, 'error', p_error));
    RETURN true;
END;
$$;
-- Reports a failed attempt with a structured error:
--   {"type", "message", "code", "category": "transient" | "throttling" | "permanent", "details",
--    "retry_after_seconds"}
-- (a non-object error is stored as {"message": error}). The category defaults to transient, or to
-- permanent when retryable is false. A transient failure with attempts left is retried after an
-- exponential backoff with jitter: b = min(backoff_max_seconds, backoff_base_seconds * 2^(attempt-1)),
-- waiting between b/2 and b. A throttling failure waits at least retry_after_seconds (without it,
-- twice the backoff). A permanent failure ends the task as `failed`; a retryable one that ran out
-- of attempts ends it as `dead` (dead-lettered). Every attempt's error is kept in `errors`.
-- Failing a task that already ended as failed or dead reports it again. Fenced as
-- complete_task_and_check_stage is, under the task's row lock: with lease_token only the current
-- lease may fail the task, with worker_id alone only the worker holding it; with neither the
-- caller is trusted.
CREATE FUNCTION stageflow.fail_task(task_id text, error jsonb, retryable boolean DEFAULT true, worker_id text DEFAULT NULL,
                                    lease_token bigint DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_row          stageflow.tasks;
    v_queue        text;
    v_retry        jsonb;
    v_refusal      jsonb;
    v_now          timestamptz := stageflow.now();
    v_error        jsonb;
    v_category     text;
    v_retry_after  numeric;
    v_delay        numeric;
BEGIN
    -- Only a task of a queue granted to the session's login (before its lock is taken).
    PERFORM stageflow._check_report_grants(ARRAY[fail_task.task_id]);
    -- The task row decides, under its lock (taken before its message, as every report does).
    SELECT * INTO v_row FROM stageflow.tasks AS t WHERE t.task_id = fail_task.task_id FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM stageflow._raise_unknown('task', fail_task.task_id);
    END IF;
    SELECT s.queue, j.definition -> 'stages' -> (v_row.stage - 1) -> 'retry'
      INTO v_queue, v_retry
      FROM stageflow.stages AS s
      JOIN stageflow.jobs AS j ON j.job_id = s.job_id
     WHERE s.job_id = v_row.job_id AND s.stage = v_row.stage;
    IF fail_task.error IS NULL OR fail_task.retryable IS NULL THEN
        RAISE EXCEPTION USING
            ERRCODE = '22004',
            MESSAGE = 'fail_task needs an error and retryable, got NULL',
            HINT = 'pass the error as JSON, e.g. {"type": "IOError", "message": "disk full", "category": "transient"}';
    END IF;
    IF octet_length(fail_task.error::text) > 65536 THEN
        RAISE EXCEPTION USING
            ERRCODE = '54000',
            MESSAGE = format('the error of task %s takes %s bytes, more than the limit of 65536', fail_task.task_id,
                             octet_length(fail_task.error::text)),
            HINT = 'keep errors short: a type, a message and small details; put large diagnostics in storage and link them';
    END IF;
    v_error := CASE WHEN jsonb_typeof(fail_task.error) = 'object' THEN fail_task.error
                    ELSE jsonb_build_object('message', fail_task.error) END;
    v_category := coalesce(v_error ->> 'category', CASE WHEN fail_task.retryable THEN 'transient' ELSE 'permanent' END);
    IF v_category NOT IN ('transient', 'throttling', 'permanent') THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('unknown error category %s', v_error -> 'category'),
            HINT = 'categories are "transient" (retry with backoff), "throttling" (retry after retry_after_seconds) and "permanent" (no retry)';
    END IF;
    IF v_error ? 'retry_after_seconds' THEN
        IF jsonb_typeof(v_error -> 'retry_after_seconds') <> 'number'
           OR (v_error ->> 'retry_after_seconds')::numeric NOT BETWEEN 0 AND 604800 THEN
            RAISE EXCEPTION USING
                ERRCODE = '22023',
                MESSAGE = format('retry_after_seconds must be a number from 0 to 604800, got %s', v_error -> 'retry_after_seconds'),
                HINT = 'give the delay a throttled service asked for, in seconds';
        END IF;
        v_retry_after := (v_error ->> 'retry_after_seconds')::numeric;
    END IF;
    IF NOT fail_task.retryable THEN
        v_category := 'permanent';
    END IF;
    v_error := v_error || jsonb_build_object('category', v_category);

    -- A report made again after its answer was lost reports the task as it is (below): the last
    -- error the task recorded is this one, from this lease, and no claim came since (the token is
    -- still the task's). Without a token, a task that already failed or died reports itself
    -- again to the worker that held it (with worker_id) or to the psql form (neither). Anything
    -- else not running, or another lease's, is refused: a failure from a lease that was
    -- released, re-queued by retry_job or dead-lettered while its holder worked is not recorded,
    -- and not answered as if it had been.
    v_refusal := CASE WHEN fail_task.lease_token IS NOT NULL
                           AND v_row.lease_token = fail_task.lease_token
                           AND (v_row.status = 'queued' OR stageflow._task_has_failed(v_row.status))
                           AND (v_row.errors -> -1 ->> 'lease_token')::bigint = fail_task.lease_token
                           AND v_row.errors -> -1 -> 'error' = v_error THEN NULL
                      WHEN fail_task.lease_token IS NULL AND stageflow._task_has_failed(v_row.status)
                           AND (fail_task.worker_id IS NULL OR v_row.worker_id IS NOT DISTINCT FROM fail_task.worker_id) THEN NULL
                      ELSE stageflow._refusal(v_row, fail_task.task_id, 'failed', fail_task.lease_token, fail_task.worker_id) END;
    IF v_refusal IS NOT NULL THEN
        PERFORM stageflow._raise_refusal(v_refusal);
    END IF;
    IF v_row.status = 'running' THEN
        IF v_category <> 'permanent' AND v_row.attempt < v_row.max_attempts THEN
            v_delay := least((v_retry ->> 'backoff_max_seconds')::numeric,
                             (v_retry ->> 'backoff_base_seconds')::numeric * power(2::numeric, v_row.attempt - 1));
            v_delay := round(v_delay / 2 + random()::numeric * v_delay / 2, 3);
            IF v_category = 'throttling' THEN
                v_delay := greatest(coalesce(v_retry_after, 2 * v_delay), v_delay);
            END IF;
            -- The task (locked above), then its message, visible when the retry is due.
            UPDATE stageflow.tasks AS t
               SET status = 'queued', error = v_error, lease_expires_at = NULL,
                   next_attempt_at = v_now + make_interval(secs => v_delay),
                   errors = t.errors || jsonb_build_array(jsonb_build_object(
                       'attempt', t.attempt, 'at', v_now, 'worker_id', t.worker_id, 'lease_token', t.lease_token,
                       'error', v_error))
             WHERE t.task_id = fail_task.task_id AND t.status = 'running';
            IF FOUND THEN
                PERFORM pgmq.set_vt(v_queue, v_row.msg_id, v_now + make_interval(secs => v_delay));
                PERFORM stageflow._leave_running(v_row.job_id, v_row.stage, 1);
                PERFORM stageflow._emit(v_row.job_id, 'task_retry_scheduled',
                                        jsonb_build_object('attempt', v_row.attempt, 'retry_in_seconds', v_delay,
                                                           'error', v_error),
                                        v_row.stage, fail_task.task_id);
                RETURN jsonb_build_object(
                    'task_id', fail_task.task_id, 'task_status', 'queued', 'attempt', v_row.attempt,
                    'max_attempts', v_row.max_attempts, 'category', v_category, 'retry_in_seconds', v_delay,
                    'job_id', v_row.job_id,
                    'job_status', (SELECT j.status FROM stageflow.jobs AS j WHERE j.job_id = v_row.job_id));
            END IF;
        ELSE
            PERFORM stageflow._end_task(fail_task.task_id,
                                        CASE WHEN v_category = 'permanent' THEN 'failed' ELSE 'dead' END,
                                        v_error);
        END IF;
    END IF;

    RETURN (SELECT jsonb_build_object(
                       'task_id', t.task_id, 'task_status', t.status, 'attempt', t.attempt,
                       'max_attempts', t.max_attempts, 'category', t.error ->> 'category', 'error', t.error,
                       'job_id', j.job_id, 'job_status', j.status)
              FROM stageflow.tasks AS t
              JOIN stageflow.jobs AS j ON j.job_id = t.job_id
             WHERE t.task_id = fail_task.task_id);
END;
$$;
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:53
-- Creates stage p_stage of a job: its stages row, all its task rows in one INSERT, and one message
-- per task in one pgmq.send_batch (for a stage of more than stageflow.message_window tasks, the
-- messages of its first window, the rest later: stageflow.message_windows). Returns the number
-- of tasks (0 for an empty fan-out, in which case the stage is created already completed). Called only by submit_job and advance_stage, which hold
-- the job's row lock (advance) or have just inserted the job (submit). The job's quotas are
-- checked before anything is inserted (_check_quota).
-- What can fail for the job's own reasons (its params, its planner's results, its quota) is
-- found first, reading only, in a block of its own: a subtransaction that writes nothing gets no
-- transaction id. With p_catch (advance_stage) that failure is returned in `failure`
-- ({"message", "sqlstate", "hint"}) with nothing created, for the caller to fail the job; without
-- it (a submission) it is raised. So a batch of completions that advances many jobs uses no
-- subtransaction id per job: past 64 in one transaction, every other session's snapshot would
-- have to look its transactions up in pg_subtrans.
--
-- Fan-out rules (the stage definition's fan_out):
--   single   one task, key '0'
--   count    N tasks, keys '0'..'N-1', N = params->>param; task params {"index"} (_task_params)
--   each     one task per element of the array params->param; task params {"index", "item"}
--   dynamic  one task per entry of the previous stage's results' "tasks" lists, in task order;
--            entry {"key"?: text, "params"?: object}; key defaults to the entry's position
--   lineage  one task per completed task of the previous stage, same key and params; the
--            predecessor's result reaches the worker as `predecessor`
--   fan_in   one task, key '0', whose `inputs` are the previous stage's results in task order
-- A task's own params as claims, job_tasks and a lineage read them: a `count` task's are
-- {"index": ordinal}, made here rather than stored (31 of the 215 bytes of its row: a million
-- tasks write 22 MB less WAL when they are made, and each claim's full-page image of a task page
-- carries 26 bytes less per task); its row holds '{}' (tasks made before 0.3.0 hold the same
-- object, which this returns unchanged). Inlinable, as the status classes: no SET clause,
-- everything qualified, and STABLE as jsonb_build_object is (PostgreSQL inlines no IMMUTABLE
-- function whose body is not: called instead, it cost a 1,000,000-task lineage 1.4 s more).
CREATE FUNCTION stageflow._task_params(p_fan_out text, p_ordinal int, p_params jsonb)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN p_fan_out OPERATOR(pg_catalog.=) 'count'
                THEN pg_catalog.jsonb_build_object('index', p_ordinal) OPERATOR(pg_catalog.||) p_params
                ELSE p_params END
$$;
-- How many of a stage's tasks get their messages at once (stageflow.message_window): a stage of
-- more sends the rest in windows (stageflow.message_windows).
CREATE FUNCTION stageflow._message_window()
RETURNS int
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT greatest(coalesce(nullif(current_setting('stageflow.message_window', true), '')::int, 10000), 1)
$$;
-- Sends the messages of a stage's queued tasks of ordinals p_from .. p_upto - 1, visible from
-- p_vt, each with the msg_id its task row holds, if that is one the stage's tasks took from the
-- queue's sequence when it was made (at most p_last_msg_id: a task retry_job opened again has a
-- message of its own, under a newer id), and a task no longer queued gets none. Returns how many
-- it sent. The ids were taken for these tasks and a window is sent once (under its row's lock),
-- so no other session inserts them: a plain INSERT of the ones not in the queue already, one per
-- id. (With ON CONFLICT DO NOTHING each message cost a WAL record more, 48 bytes, the speculative
-- insertion's confirmation; and no exception block here: a subtransaction that writes takes an
-- id, one per big stage a batch of completions makes, found by review: 71 in a batch advancing 70
-- jobs.)
CREATE FUNCTION stageflow._send_stage_messages(p_job_id text, p_stage int, p_queue text, p_from int, p_upto int,
                                               p_last_msg_id bigint, p_vt timestamptz)
RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_sent int;
BEGIN
    EXECUTE format(
        'WITH sent AS ('
        '  INSERT INTO pgmq.%1$I AS m (msg_id, vt, message) OVERRIDING SYSTEM VALUE'
        '  SELECT DISTINCT ON (t.msg_id) t.msg_id, $5, jsonb_build_object(''task_id'', t.task_id)'
        '    FROM stageflow.tasks AS t'
        '   WHERE stageflow._is_task_of_job(t.job_id, $1) AND t.stage = $2 AND t.ordinal >= $3 AND t.ordinal < $4'
        '     AND t.status = ''queued'' AND t.msg_id <= $6'
        '     AND NOT EXISTS (SELECT 1 FROM pgmq.%1$I AS q WHERE q.msg_id = t.msg_id)'
        '   ORDER BY t.msg_id, t.ordinal'
        '  RETURNING 1) '
        'SELECT count(*) FROM sent', pgmq.format_table_name(p_queue, 'q'))
       INTO v_sent USING p_job_id, p_stage, p_from, p_upto, p_vt, p_last_msg_id;
    RETURN v_sent;
END;
$$;
-- The msg_id the task of that ordinal holds: where a window's refill point is.
CREATE FUNCTION stageflow._msg_id_of(p_job_id text, p_stage int, p_ordinal int)
RETURNS bigint
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT t.msg_id FROM stageflow.tasks AS t
     WHERE stageflow._is_task_of_job(t.job_id, p_job_id) AND t.stage = p_stage AND t.ordinal = p_ordinal
$$;
-- Sends the next window of stage p_stage of p_job_id (its messages visible from p_vt), unless
-- another session holds its row (SKIP LOCKED: this never waits) or it has none: returns how many
-- messages it sent, NULL when it sent no window. A stage of a job that ended gets no more (its row
-- goes).
CREATE FUNCTION stageflow._send_window(p_job_id text, p_stage int, p_vt timestamptz)
RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    w       stageflow.message_windows;
    v_upto  int;
    v_sent  int;
BEGIN
    SELECT * INTO w FROM stageflow.message_windows AS mw
     WHERE mw.job_id = p_job_id AND mw.stage = p_stage
       FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF NOT stageflow._job_is_open((SELECT j.status FROM stageflow.jobs AS j WHERE j.job_id = w.job_id)) THEN
        DELETE FROM stageflow.message_windows AS mw WHERE mw.job_id = w.job_id AND mw.stage = w.stage;
        RETURN NULL;
    END IF;
    v_upto := least(w.next_ordinal::bigint + w.window_size, w.task_count)::int;
    v_sent := stageflow._send_stage_messages(w.job_id, w.stage, w.queue, w.next_ordinal, v_upto, w.last_msg_id, p_vt);
    IF v_upto = w.task_count THEN
        DELETE FROM stageflow.message_windows AS mw WHERE mw.job_id = w.job_id AND mw.stage = w.stage;
    ELSE
        UPDATE stageflow.message_windows AS mw
           SET next_ordinal = v_upto,
               refill_at = stageflow._msg_id_of(w.job_id, w.stage, w.next_ordinal),
               sent_up_to = stageflow._msg_id_of(w.job_id, w.stage, v_upto - 1)
         WHERE mw.job_id = w.job_id AND mw.stage = w.stage;
    END IF;
    IF v_sent > 0 THEN
        PERFORM pg_notify('stageflow_tasks', w.queue);
    END IF;
    RETURN v_sent;
END;
$$;
-- Drops the windows of a job whose open tasks have all been cancelled (_end_job) or given messages
-- (retry_job of a stopped job): those a claim holds are skipped, not waited for (that claim finds
-- the job ended and drops it, or sends none of the tasks retry_job sent).
CREATE FUNCTION stageflow._drop_message_windows(p_job_id text)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    DELETE FROM stageflow.message_windows AS w
     WHERE (w.job_id, w.stage) IN (SELECT l.job_id, l.stage FROM stageflow.message_windows AS l
                                    WHERE l.job_id = p_job_id
                                    ORDER BY l.stage
                                      FOR UPDATE SKIP LOCKED)
$$;
-- Whether a claim's read of msg_ids p_read_from .. p_read_to took messages of a stage's last
-- window sent (p_refill_at .. p_sent_up_to, stageflow.message_windows), so that its next window
-- is due: the one test of it, inlined where claim_tasks probes for such a stage and where
-- _send_next_window picks them. (Inlinable: no SET clause, its operators qualified.)
CREATE FUNCTION stageflow._window_reached(p_refill_at bigint, p_sent_up_to bigint, p_read_from bigint, p_read_to bigint)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT p_refill_at OPERATOR(pg_catalog.<=) p_read_to AND p_read_from OPERATOR(pg_catalog.<=) p_sent_up_to
$$;
-- A claim's part: sends the next window of every stage on p_queue whose last window sent the
-- claim's read reached (it read msg_ids p_read_from .. p_read_to); if it read fewer than
-- it asked for (p_short) and those sent nothing, the next window of the oldest stage with one to
-- send; visible from p_vt. Stages another session is sending for are skipped. Returns how many
-- messages it sent.
CREATE FUNCTION stageflow._send_next_window(p_queue text, p_vt timestamptz, p_read_from bigint, p_read_to bigint,
                                             p_short boolean)
RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    w       record;
    v_sent  int;
    v_total int := 0;
BEGIN
    FOR w IN
        SELECT u.* FROM (
            SELECT mw.job_id, mw.stage, mw.created_at,
                   coalesce(stageflow._window_reached(mw.refill_at, mw.sent_up_to, p_read_from, p_read_to), false) AS reached
              FROM stageflow.message_windows AS mw
             WHERE mw.queue = p_queue) AS u
         WHERE u.reached OR p_short
         ORDER BY u.reached DESC, u.created_at, u.job_id, u.stage
    LOOP
        EXIT WHEN NOT w.reached AND v_total > 0;
        v_sent := stageflow._send_window(w.job_id, w.stage, p_vt);
        -- (a window none of whose tasks is left to send, cancelled or retried under other ids: the next)
        WHILE v_sent = 0 LOOP
            v_sent := stageflow._send_window(w.job_id, w.stage, p_vt);
        END LOOP;
        v_total := v_total + coalesce(v_sent, 0);
    END LOOP;
    RETURN v_total;
END;
$$;
CREATE FUNCTION stageflow._create_stage_tasks(p_job_id text, p_stage int, p_catch boolean DEFAULT false,
                                              OUT created int, OUT failure jsonb)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job         stageflow.jobs;
    v_def         jsonb;
    v_fan_out     text;
    v_param       text;
    v_queue       text;
    v_prefix      text := left(p_job_id, 16) || '-s' || p_stage || '-';
    v_keys        text[];
    v_params      jsonb[];
    v_preds       text[];
    v_inputs      jsonb;
    v_count       int;
    v_shards      int;
    v_matched     int;
    v_duplicate   text;
    v_first_token bigint;
    v_sequence    regclass;
    v_window      int;
    -- the engine's clock, read once for the stage and all its tasks
    v_now         timestamptz := stageflow.now();
    v_message     text;
    v_sqlstate    text;
    v_hint        text;
BEGIN
    SELECT * INTO STRICT v_job FROM stageflow.jobs AS j WHERE j.job_id = p_job_id;
    v_def := v_job.definition -> 'stages' -> (p_stage - 1);
    v_fan_out := v_def ->> 'fan_out';
    v_param := v_def ->> 'param';
    v_queue := v_def ->> 'queue';

    -- The stage's tasks, planned (reading only).
    BEGIN
        CASE v_fan_out
        WHEN 'single' THEN
            v_keys := ARRAY['0'];
            v_params := ARRAY['{}'::jsonb];
        WHEN 'count' THEN
            -- generated after the quota check below
            v_count := (v_job.params ->> v_param)::int;
        WHEN 'each' THEN
            SELECT array_agg((e.n - 1)::text ORDER BY e.n),
                   array_agg(jsonb_build_object('index', e.n - 1, 'item', e.item) ORDER BY e.n)
              INTO v_keys, v_params
              FROM jsonb_array_elements(v_job.params -> v_param) WITH ORDINALITY AS e(item, n);
        WHEN 'dynamic' THEN
            SELECT array_agg(coalesce(d.entry ->> 'key', (d.n - 1)::text) ORDER BY d.n),
                   array_agg(coalesce(d.entry -> 'params', '{}'::jsonb) ORDER BY d.n)
              INTO v_keys, v_params
              FROM (SELECT e.entry, row_number() OVER (ORDER BY t.ordinal, e.i) AS n
                      FROM stageflow.tasks AS t
                     CROSS JOIN LATERAL jsonb_array_elements(t.result -> 'tasks') WITH ORDINALITY AS e(entry, i)
                     WHERE stageflow._is_task_of_job(t.job_id, p_job_id) AND t.stage = p_stage - 1 AND t.status = 'completed') AS d;
            SELECT k INTO v_duplicate FROM unnest(v_keys) AS k GROUP BY k HAVING count(*) > 1 LIMIT 1;
            IF v_duplicate IS NOT NULL THEN
                RAISE EXCEPTION USING
                    ERRCODE = '22023',
                    MESSAGE = format('stage %s (%s) of job %s: the planner results name task key %L more than once',
                                     p_stage, v_def ->> 'name', p_job_id, v_duplicate),
                    HINT = 'each entry of a dynamic fan-out needs a unique "key" across all planner tasks of the previous stage';
            END IF;
        WHEN 'lineage' THEN
            SELECT array_agg(t.task_key ORDER BY t.ordinal),
                   array_agg(stageflow._task_params(v_job.definition -> 'stages' -> (p_stage - 2) ->> 'fan_out',
                                                    t.ordinal, t.params) ORDER BY t.ordinal),
                   array_agg(t.task_id ORDER BY t.ordinal)
              INTO v_keys, v_params, v_preds
              FROM stageflow.tasks AS t
             WHERE stageflow._is_task_of_job(t.job_id, p_job_id) AND t.stage = p_stage - 1 AND t.status = 'completed';
        WHEN 'fan_in' THEN
            v_keys := ARRAY['0'];
            v_params := ARRAY['{}'::jsonb];
            SELECT coalesce(jsonb_agg(t.result ORDER BY t.ordinal), '[]'::jsonb)
              INTO v_inputs
              FROM stageflow.tasks AS t
             WHERE stageflow._is_task_of_job(t.job_id, p_job_id) AND t.stage = p_stage - 1 AND t.status = 'completed';
        END CASE;
        v_count := coalesce(v_count, cardinality(v_keys), 0);
        PERFORM stageflow._check_quota(v_job, p_stage, v_count);
        -- Task ids keep 16 hex digits of the job's id: another job's tasks may hold this stage's
        -- (one index probe; found by the INSERT below, it would fail the caller, not the job).
        IF v_count > 0 AND EXISTS (SELECT 1 FROM stageflow.tasks AS t
                                    WHERE t.task_id >= v_prefix AND t.task_id < left(v_prefix, -1) || '.') THEN
            RAISE EXCEPTION USING
                ERRCODE = '23505',
                MESSAGE = format('stage %s of job %s: its task ids (%s...) are taken by another job''s tasks',
                                 p_stage, p_job_id, v_prefix),
                HINT = 'two job ids share their first 16 hex digits; submit the work with other params (or wait until retention deletes the other job)';
        END IF;
    EXCEPTION WHEN data_exception OR integrity_constraint_violation OR program_limit_exceeded
                   OR syntax_error_or_access_rule_violation OR raise_exception THEN
        IF NOT p_catch THEN
            RAISE;
        END IF;
        GET STACKED DIAGNOSTICS v_message = MESSAGE_TEXT, v_sqlstate = RETURNED_SQLSTATE, v_hint = PG_EXCEPTION_HINT;
        failure := jsonb_build_object('message', v_message, 'sqlstate', v_sqlstate, 'hint', nullif(v_hint, ''));
        RETURN;
    END;
    v_shards := greatest(least(v_count, 16), 1);

    INSERT INTO stageflow.stages
        (job_id, stage, name, handler, queue, fan_out, param, next_fan_out, max_attempts,
         lease_seconds, timeout_seconds,
         max_failed_tasks, max_failure_ratio, task_count, shards, open_shards, status, created_at, completed_at)
    VALUES
        (p_job_id, p_stage, v_def ->> 'name', v_def ->> 'handler', v_queue, v_fan_out, v_param,
         v_job.definition -> 'stages' -> p_stage ->> 'fan_out',
         (v_def -> 'retry' ->> 'max_attempts')::int,
         (v_def ->> 'lease_seconds')::int, (v_def ->> 'timeout_seconds')::int,
         (v_def ->> 'max_failed_tasks')::int, (v_def ->> 'max_failure_ratio')::numeric,
         v_count, v_shards, least(v_count, v_shards),
         CASE WHEN v_count = 0 THEN 'completed' ELSE 'active' END,
         v_now, CASE WHEN v_count = 0 THEN v_now END);
    -- The stage's tasks spread evenly over its shards.
    INSERT INTO stageflow.stage_shards (job_id, stage, shard, remaining_tasks)
    SELECT p_job_id, p_stage, k, v_count / v_shards + CASE WHEN k < v_count % v_shards THEN 1 ELSE 0 END
      FROM generate_series(0, v_shards - 1) AS k;

    -- One message per task, sent in one pgmq.send_batch whose ids come back in the order of its
    -- array (one INSERT ... RETURNING, in array order): the n-th id is the n-th task's. Ids and
    -- tasks are zipped by position (WITH ORDINALITY, ROWS FROM): no join, no sort, no array of
    -- the ids. A count fan-out builds no arrays of keys and params either: its keys are the
    -- ordinals. (Measured on a count of 1,000,000: the arrays of keys and params, the sorted
    -- message array and the sorted id array took half the function's time.)
    IF v_count > 0 THEN
        -- (made on first use: the built-in hello_world's queue, or one a restore dropped)
        PERFORM stageflow._ensure_queue(v_queue);
        -- (above the tokens of any deleted tasks that had these ids: stageflow.lease_token_floor)
        v_first_token := coalesce((SELECT max(f.token) FROM stageflow.lease_token_floor AS f), 0);
    END IF;
    v_window := stageflow._message_window();
    IF v_count > v_window THEN
        -- A stage of more tasks than a window: every task row holds an id taken from the queue's
        -- sequence (in task order), and only the first window's messages are sent now; the rest
        -- go as claims find the queue short (stageflow._send_next_window).
        v_sequence := pg_get_serial_sequence(format('pgmq.%I', pgmq.format_table_name(v_queue, 'q')), 'msg_id')::regclass;
        IF v_fan_out = 'count' THEN
            INSERT INTO stageflow.tasks
                (task_id, job_id, stage, task_key, ordinal, params, predecessor_id, inputs, max_attempts, msg_id, created_at,
                 lease_token)
            SELECT v_prefix || i, p_job_id, p_stage, i::text, i, '{}'::jsonb, NULL, v_inputs,
                   (v_def -> 'retry' ->> 'max_attempts')::int, nextval(v_sequence), v_now, v_first_token
              FROM generate_series(0, v_count - 1) AS i;
        ELSE
            INSERT INTO stageflow.tasks
                (task_id, job_id, stage, task_key, ordinal, params, predecessor_id, inputs, max_attempts, msg_id, created_at,
                 lease_token)
            SELECT v_prefix || u.key, p_job_id, p_stage, u.key, (u.n - 1)::int, u.params, u.pred, v_inputs,
                   (v_def -> 'retry' ->> 'max_attempts')::int, nextval(v_sequence), v_now, v_first_token
              FROM ROWS FROM (unnest(v_keys), unnest(v_params), unnest(v_preds)) WITH ORDINALITY AS u(key, params, pred, n);
        END IF;
        -- (no window sent yet, the empty range 1 .. 0; the first goes as every later one does)
        INSERT INTO stageflow.message_windows
            (job_id, stage, queue, next_ordinal, task_count, window_size, refill_at, sent_up_to, last_msg_id, created_at)
        VALUES (p_job_id, p_stage, v_queue, 0, v_count, v_window, 1, 0,
                stageflow._msg_id_of(p_job_id, p_stage, v_count - 1), v_now);
        PERFORM stageflow._send_window(p_job_id, p_stage, clock_timestamp());
    ELSIF v_count > 0 AND v_fan_out = 'count' THEN
        INSERT INTO stageflow.tasks
            (task_id, job_id, stage, task_key, ordinal, params, predecessor_id, inputs, max_attempts, msg_id, created_at,
             lease_token)
        SELECT v_prefix || (m.n - 1), p_job_id, p_stage, (m.n - 1)::text, (m.n - 1)::int,
               '{}'::jsonb, NULL, v_inputs,
               (v_def -> 'retry' ->> 'max_attempts')::int, m.msg_id, v_now, v_first_token
          FROM pgmq.send_batch(v_queue,
                               ARRAY(SELECT jsonb_build_object('task_id', v_prefix || i)
                                       FROM generate_series(0, v_count - 1) AS i)) WITH ORDINALITY AS m(msg_id, n);
    ELSIF v_count > 0 THEN
        INSERT INTO stageflow.tasks
            (task_id, job_id, stage, task_key, ordinal, params, predecessor_id, inputs, max_attempts, msg_id, created_at,
             lease_token)
        SELECT v_prefix || u.key, p_job_id, p_stage, u.key, (u.n - 1)::int, u.params, u.pred, v_inputs,
               (v_def -> 'retry' ->> 'max_attempts')::int, u.msg_id, v_now, v_first_token
          FROM ROWS FROM (unnest(v_keys), unnest(v_params), unnest(v_preds),
                          pgmq.send_batch(v_queue,
                                          ARRAY(SELECT jsonb_build_object('task_id', v_prefix || k)
                                                  FROM unnest(v_keys) AS k))) WITH ORDINALITY AS u(key, params, pred, msg_id, n);
    END IF;
    IF v_count > 0 AND v_sequence IS NULL THEN
        -- The zip by position stands on send_batch returning its ids in array order: checked at
        -- both ends of the stage (two index lookups), so that a pgmq that returned them otherwise
        -- fails the fan-out instead of pairing tasks with other tasks' messages.
        EXECUTE format('SELECT count(*) FROM stageflow.tasks AS t JOIN pgmq.%I AS m ON m.msg_id = t.msg_id '
                       'WHERE stageflow._is_task_of_job(t.job_id, $1) AND t.stage = $2 AND t.ordinal IN (0, $3 - 1) '
                       'AND m.message ->> ''task_id'' = t.task_id', pgmq.format_table_name(v_queue, 'q'))
           INTO v_matched USING p_job_id, p_stage, v_count;
        IF v_matched <> least(v_count, 2) THEN
            RAISE EXCEPTION 'stage % of job %: pgmq.send_batch did not return its message ids in array order',
                            p_stage, p_job_id;
        END IF;
    END IF;
    IF v_count > 0 THEN
        PERFORM pg_notify('stageflow_tasks', v_queue);
    END IF;
    created := v_count;
END;
$$;
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:41
-- What a status means: the classes of job and task statuses, each list written here once and read
-- everywhere else through these functions (docs/state_machine.md draws the transitions).
-- They are SQL functions without a SET clause and with nothing to look up, so that PostgreSQL
-- inlines them: `stageflow._job_is_open(j.status)` plans exactly as `j.status IN ('queued',
-- 'processing')`. Only Stageflow's own functions, whose search_path is fixed, call them.
-- Two places keep literal lists: the tables' CHECK constraints (the statuses there are), and the
-- predicates of partial indexes with the queries meant to use them. The planner matches an index
-- predicate against a query's conditions as they are after inlining, so an inlined call would
-- match too (measured); but a call that stops being inlined (a SET clause, STRICT, another
-- language) would not, and nothing would fail: those queries keep the literal and say so.

-- A job still to finish: queued (no task claimed yet) or processing.
CREATE FUNCTION stageflow._job_is_open(p_status text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT p_status IN ('queued', 'processing')
$$;
-- A job that ran to its end: completed, with failed tasks its stages tolerated or without.
CREATE FUNCTION stageflow._job_is_done(p_status text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT p_status IN ('completed', 'completed_with_errors')
$$;
-- A job stopped before its end: failed or cancelled (retry_job, or its owner resubmitting the
-- work, resumes it).
CREATE FUNCTION stageflow._job_is_stopped(p_status text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT p_status IN ('failed', 'cancelled')
$$;
-- A job that has ended: done or stopped.
CREATE FUNCTION stageflow._job_has_ended(p_status text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT stageflow._job_is_done(p_status) OR stageflow._job_is_stopped(p_status)
$$;
-- An open task: queued (waiting, or due for a retry) or running (leased to a worker).
CREATE FUNCTION stageflow._task_is_open(p_status text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT p_status IN ('queued', 'running')
$$;
-- A task that failed for good, a dead letter: failed (a permanent error) or dead (its attempts
-- ran out).
CREATE FUNCTION stageflow._task_has_failed(p_status text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT p_status IN ('failed', 'dead')
$$;
-- A task that ended without a result: failed, dead or cancelled (what retry_job queues again).
CREATE FUNCTION stageflow._task_ended_without_result(p_status text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT stageflow._task_has_failed(p_status) OR p_status = 'cancelled'
$$;
-- A task a claim may take at p_now: attempts left, and queued with its retry (if any) due, or
-- running on a lease that has expired. (The claim asks it under the task's row lock, once to
-- decide and once more in its UPDATE, after the rare path may have changed the row.)
CREATE FUNCTION stageflow._task_is_claimable(p_status text, p_attempt int, p_max_attempts int,
                                             p_next_attempt_at timestamptz, p_lease_expires_at timestamptz,
                                             p_now timestamptz)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT p_attempt < p_max_attempts
           AND ((p_status = 'queued' AND (p_next_attempt_at IS NULL OR p_next_attempt_at <= p_now))
                OR (p_status = 'running' AND p_lease_expires_at <= p_now))
$$;
-- A task of the job p_job_id, as every read of a job's tasks asks it: tasks_stage_idx names the job
-- by hashtextextended(job_id, 0) (sql/0010_tables.sql), so the hash is compared for the index and
-- the id for the answer. Written once here; inlined like the classes above, so the planner sees
-- both conditions and uses the index (pg_test/job_result.sql checks that it does).
CREATE FUNCTION stageflow._is_task_of_job(p_task_job_id text, p_job_id text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT pg_catalog.hashtextextended(p_task_job_id, 0) OPERATOR(pg_catalog.=) pg_catalog.hashtextextended(p_job_id, 0)
           AND p_task_job_id OPERATOR(pg_catalog.=) p_job_id
$$;
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:51
-- Shapes the table of a queue the job types use for how the engine uses it. A claim reads a
-- message (src/queues.rs) by walking the table's primary key in msg_id order, never by pgmq's
-- index on vt, and moves its vt to the lease's end; with that index, the move is an update that
-- writes an entry into both indexes. Without it, and with room on the page for the new version
-- (fillfactor 50: a message row and its one new version), the move is a HOT update: no index
-- entry. One at a time under pgbench (8 clients, sync on, pg_walinspect), a task's WAL went from
-- 989-996 to 838-884 bytes (pgmq's read + delete: 431). Nothing of Stageflow reads a queue by vt
-- (maintenance finds the messages that became visible in its bounded walk by msg_id, _reconcile),
-- and pgmq's own functions keep working on the table (its read then walks the primary key too).
-- Pages written before stay as they are. What it drops is pgmq's index: one on vt alone, backing
-- no constraint (an index of the DBA's own that holds vt among other columns stays); it sets the
-- fillfactor only where none is set.
-- Called by _ensure_queue on the queue it makes (p_nowait false: nobody else can use it yet), and
-- by stageflow.shape_queues on the job types' queues that still have the index (queues made
-- before 0.3.0, or by pgmq.create, which makes the index again on a queue that has lost it) with
-- p_nowait: it takes the table's lock without waiting, and any other lock within 10 ms (55P03
-- when a claim or a completion holds the table, or another session the index; the caller's
-- subtransaction then gives back what it took). Only an ordinary table is shaped: a partitioned
-- queue's (pgmq with pg_partman) takes no fillfactor, and a queue whose table is gone has nothing
-- to shape.
-- Returns whether it changed the table.
CREATE FUNCTION stageflow._shape_queue(p_queue text, p_nowait boolean DEFAULT false)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_table      oid;
    v_fillfactor boolean;
    v_indexes    name[];
    v_index      name;
    v_lock_timeout text;
BEGIN
    SELECT c.oid, EXISTS (SELECT 1 FROM unnest(c.reloptions) AS o(option) WHERE o.option LIKE 'fillfactor=%')
      INTO v_table, v_fillfactor
      FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
     WHERE n.nspname = 'pgmq' AND c.relname = pgmq.format_table_name(p_queue, 'q') AND c.relkind = 'r';
    IF v_table IS NULL THEN
        RETURN false;
    END IF;
    SELECT array_agg(ic.relname ORDER BY ic.relname) INTO v_indexes
      FROM pg_index AS i
      JOIN pg_class AS ic ON ic.oid = i.indexrelid
      JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
     WHERE i.indrelid = v_table AND i.indnatts = 1 AND a.attname = 'vt' AND i.indpred IS NULL
       AND NOT EXISTS (SELECT 1 FROM pg_constraint AS k WHERE k.conindid = i.indexrelid);
    IF v_indexes IS NULL AND v_fillfactor THEN
        RETURN false;
    END IF;
    IF p_nowait THEN
        -- (and every lock after it within 10 ms: a session holding a lock on the index alone, as
        -- COMMENT ON INDEX does, would make the DROP wait while this holds the table, and the
        -- tables of the queues its caller shaped before; a review's claim waited 4 s so)
        v_lock_timeout := current_setting('lock_timeout');
        PERFORM set_config('lock_timeout', '10ms', true);
        EXECUTE format('LOCK TABLE pgmq.%I IN ACCESS EXCLUSIVE MODE NOWAIT', pgmq.format_table_name(p_queue, 'q'));
    END IF;
    FOREACH v_index IN ARRAY coalesce(v_indexes, '{}') LOOP
        EXECUTE format('DROP INDEX pgmq.%I', v_index);
    END LOOP;
    IF NOT v_fillfactor THEN
        EXECUTE format('ALTER TABLE pgmq.%I SET (fillfactor = 50)', pgmq.format_table_name(p_queue, 'q'));
    END IF;
    IF p_nowait THEN
        PERFORM set_config('lock_timeout', v_lock_timeout, true);
    END IF;
    RETURN true;
END;
$$;
-- Creates pgmq queue p_queue unless it exists: the one place Stageflow creates queues. Called when
-- a job type naming the queue is registered, and again where a queue is needed (a stage's tasks
-- are sent, a claim or a grant names a job type's queue), so that a queue is made on first use
-- where it does not exist: the built-in hello_world's `default` queue (CREATE EXTENSION makes no
-- queue, so that pg_restore, which runs CREATE EXTENSION and then restores pgmq's queues with
-- their messages, finds none in its way), or a queue a restore or a DBA dropped.
CREATE FUNCTION stageflow._ensure_queue(p_queue text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgmq.meta AS m WHERE m.queue_name = p_queue) THEN
        -- (two sessions making the same queue at once would collide in the catalogs)
        PERFORM pg_advisory_xact_lock(hashtext('stageflow queue ' || p_queue));
        -- (made meanwhile by the session that held the lock: pgmq.create would build pgmq's index
        -- on vt again, over the messages sent since)
        IF EXISTS (SELECT 1 FROM pgmq.meta AS m WHERE m.queue_name = p_queue) THEN
            RETURN;
        END IF;
        PERFORM pgmq.create(p_queue);
        PERFORM stageflow._shape_queue(p_queue);
        -- (a queue made again, after a restore or a DBA dropped it: the tasks of its big stages
        -- hold ids the old one's sequence handed out for messages still to be sent, which the new
        -- one must not hand out again; until this transaction commits nobody else takes one)
        PERFORM setval(pg_get_serial_sequence(format('pgmq.%I', pgmq.format_table_name(p_queue, 'q')), 'msg_id'), m.last_msg_id)
           FROM (SELECT max(w.last_msg_id) AS last_msg_id FROM stageflow.message_windows AS w WHERE w.queue = p_queue) AS m
          WHERE m.last_msg_id IS NOT NULL;
    END IF;
END;
$$;
-- The queues the job types' stages name, in name order: those that exist (the ones maintenance
-- walks), or all of them (p_existing false: the ones _check_queue may make on first use).
CREATE FUNCTION stageflow._job_type_queues(p_existing boolean DEFAULT true)
RETURNS SETOF text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT DISTINCT e.stage ->> 'queue'
      FROM stageflow.job_types AS jt
     CROSS JOIN LATERAL jsonb_array_elements(jt.definition -> 'stages') AS e(stage)
     WHERE NOT p_existing OR EXISTS (SELECT 1 FROM pgmq.meta AS m WHERE m.queue_name = e.stage ->> 'queue')
     ORDER BY 1
$$;
-- Stores a job type, or replaces its definition for jobs submitted from now on.
-- stageflow._normalize_definition (Rust) validates the definition, naming the bad field, and fills
-- in defaults; every queue a stage names is created in pgmq if it does not exist yet.
CREATE FUNCTION stageflow.register_job_type(name text, definition jsonb)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_definition jsonb := stageflow._normalize_definition(register_job_type.name, register_job_type.definition);
    v_queue text;
BEGIN
    FOR v_queue IN
        SELECT DISTINCT s.stage ->> 'queue' FROM jsonb_array_elements(v_definition -> 'stages') AS s(stage)
    LOOP
        PERFORM stageflow._ensure_queue(v_queue);
    END LOOP;

    INSERT INTO stageflow.job_types AS jt (name, definition)
    VALUES (register_job_type.name, v_definition)
    ON CONFLICT ON CONSTRAINT job_types_pkey
    DO UPDATE SET definition = excluded.definition, updated_at = now();

    RETURN jsonb_build_object('name', register_job_type.name, 'definition', v_definition);
END;
$$;
-- The registered job types with their (normalised) definitions.
CREATE FUNCTION stageflow.job_types()
RETURNS TABLE (name text, description text, stages jsonb, definition jsonb, updated_at timestamptz)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT jt.name,
           jt.definition ->> 'description',
           (SELECT jsonb_agg(s.stage ->> 'name' ORDER BY s.n)
              FROM jsonb_array_elements(jt.definition -> 'stages') WITH ORDINALITY AS s(stage, n)),
           jt.definition,
           jt.updated_at
      FROM stageflow.job_types AS jt
     ORDER BY jt.name
$$;
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:63
-- Recent jobs, newest first, optionally of one status (filter_status) and/or job type (filter_type); page with `before` (the
-- created_at of the last job of the previous page). Progress as in job_status, from the current
-- stage's counters. The session's own jobs (of its tenant, when it names one); every job for a
-- superuser or stageflow_admin member naming no tenant.
CREATE FUNCTION stageflow.list_jobs(
    filter_status text DEFAULT NULL,
    filter_type text DEFAULT NULL,
    max_rows int DEFAULT 50,
    before timestamptz DEFAULT NULL)
RETURNS TABLE (
    job_id text, job_type text, status text, current_stage int, total_stages int,
    current_stage_name text, progress numeric, created_at timestamptz, updated_at timestamptz,
    completed_at timestamptz, owner name, tenant text)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_tenant  text := stageflow._tenant();
    v_all     boolean := v_tenant IS NULL AND stageflow._session_is_admin();
BEGIN
    IF list_jobs.filter_status IS NOT NULL
       AND NOT (stageflow._job_is_open(list_jobs.filter_status) OR stageflow._job_has_ended(list_jobs.filter_status)) THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('unknown job status %L', list_jobs.filter_status),
            HINT = 'job statuses are queued, processing, completed, completed_with_errors, failed and cancelled';
    END IF;
    IF list_jobs.max_rows IS NULL OR list_jobs.max_rows NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('max_rows must be between 1 and 1000, got %s', coalesce(list_jobs.max_rows::text, 'NULL')),
            HINT = 'page through more jobs with `before`';
    END IF;
    RETURN QUERY
    SELECT j.job_id, j.job_type, j.status, j.current_stage, j.total_stages, s.name,
           CASE WHEN stageflow._job_is_done(j.status) THEN 100::numeric
                ELSE round(100 * ((j.current_stage - 1)
                                  + CASE WHEN s.status = 'completed' THEN 1
                                         WHEN s.task_count > 0 THEN c.completed_count::numeric / s.task_count
                                         ELSE 0 END) / j.total_stages, 1) END,
           j.created_at, j.updated_at, j.completed_at, j.owner, j.tenant
      FROM stageflow.jobs AS j
      LEFT JOIN stageflow.stages AS s ON s.job_id = j.job_id AND s.stage = j.current_stage
      LEFT JOIN LATERAL (SELECT sum(sh.completed_count) AS completed_count FROM stageflow.stage_shards AS sh
                          WHERE sh.job_id = s.job_id AND sh.stage = s.stage) AS c ON true
     WHERE (v_all OR (j.owner = session_user AND (v_tenant IS NULL OR j.tenant = v_tenant)))
       AND (list_jobs.filter_status IS NULL OR j.status = list_jobs.filter_status)
       AND (list_jobs.filter_type IS NULL OR j.job_type = list_jobs.filter_type)
       AND (list_jobs.before IS NULL OR j.created_at < list_jobs.before)
     ORDER BY j.created_at DESC, j.job_id
     LIMIT list_jobs.max_rows;
END;
$$;
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:44
-- The wording of the errors that several functions raise: an unknown job or task, and the
-- refusals of a task's report (not running, another lease's), decided in one place.

-- Raises 42704 for an unknown job or task (p_kind 'job' or 'task'), with a hint about what the ids
-- look like: the one wording of these errors.
CREATE FUNCTION stageflow._raise_unknown(p_kind text, p_id text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = '42704',
        MESSAGE = format('unknown %s %L', p_kind, p_id),
        HINT = CASE p_kind
                   WHEN 'job' THEN 'job ids are the 64 hex digits returned by stageflow.submit_job; a job is shown only to the login '
                                    '(and tenant) that submitted it and to stageflow_admin'
                   ELSE 'task ids come from stageflow.claim_tasks and look like <16 hex>-s<stage>-<key>'
               END;
END;
$$;
-- Whether a report may speak for a task's current lease (the task row's lease_token, p_lease_token,
-- held by its worker_id, p_holder): naming a token (p_token), only if it is that one; naming no
-- token but a worker_id (p_worker_id), only if that worker holds the lease; naming neither, the
-- caller is trusted (the psql form). The one statement of the fence: _refusal words its refusals
-- from it, and a completion's UPDATE asks it alone (_refusal's wordings, planned into every
-- completion, cost it 36,000 instructions, bench/README.md). Inlined like _refusal.
CREATE FUNCTION stageflow._report_fenced(p_lease_token bigint, p_holder text, p_token bigint, p_worker_id text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE WHEN p_token IS NOT NULL THEN p_token OPERATOR(pg_catalog.=) p_lease_token
                ELSE p_worker_id IS NULL OR coalesce(p_holder OPERATOR(pg_catalog.=) p_worker_id, false) END
$$;
-- Why a report (p_verb: 'completed', 'failed') of a task cannot be recorded, as
-- {"sqlstate", "message", "hint"}, or NULL when it can: the one wording of every refusal, decided
-- from the task row read under its lock. A report names the lease it comes from by its token
-- (p_token) and/or the worker_id it claimed with (p_worker_id); a report naming neither trusts
-- the caller (the psql form). A completion repeated by the lease that made it is not refused.
-- Without a SET clause, and with its functions qualified, so that PostgreSQL inlines it into the
-- statements of the hot path that call it (only Stageflow's own functions, whose search_path is
-- fixed, can call it).
CREATE FUNCTION stageflow._refusal(p_task stageflow.tasks, p_task_id text, p_verb text, p_token bigint, p_worker_id text)
RETURNS jsonb
LANGUAGE sql STABLE
AS $$
    SELECT CASE
        WHEN p_task.task_id IS NULL THEN
            pg_catalog.jsonb_build_object('sqlstate', '42704', 'message', pg_catalog.format('unknown task %L', p_task_id),
                               'hint', 'task ids come from stageflow.claim_tasks and look like <16 hex>-s<stage>-<key>')
        -- (another lease's token, whatever the task's status; another worker, of a task running or
        -- completed: a task in any other status is refused for that below)
        WHEN NOT stageflow._report_fenced(p_task.lease_token, p_task.worker_id, p_token, p_worker_id)
             AND (p_token IS NOT NULL OR p_task.status = ANY ('{running,completed}'::text[])) THEN
            CASE WHEN p_token IS NOT NULL THEN
                pg_catalog.jsonb_build_object('sqlstate', '55000',
                                   'message', pg_catalog.format('task %s: lease %s is not its current lease (%s)', p_task_id, p_token, p_task.lease_token),
                                   'hint', 'the lease expired and the task was claimed again; its current holder reports it')
            WHEN p_task.status = 'running' THEN
                pg_catalog.jsonb_build_object('sqlstate', '55000',
                                   'message', pg_catalog.format('task %s is leased to worker %s, not %s', p_task_id, coalesce(p_task.worker_id, '(none)'), p_worker_id),
                                   'hint', 'the lease expired and the task was delivered again; its new holder reports it')
            ELSE
                pg_catalog.jsonb_build_object('sqlstate', '55000',
                                   'message', pg_catalog.format('task %s was completed by worker %s, not %s', p_task_id, coalesce(p_task.worker_id, '(none)'), p_worker_id),
                                   'hint', 'the lease expired and the task was delivered again; its new holder completed it')
            END
        WHEN p_task.status = 'running' THEN NULL
        WHEN p_task.status = 'completed' AND p_verb = 'completed' THEN NULL
        WHEN p_task.status = 'queued' THEN
            pg_catalog.jsonb_build_object('sqlstate', '55000', 'message', pg_catalog.format('task %s is not claimed', p_task_id),
                               'hint', 'claim it with stageflow.claim_tasks first; a task waiting for a retry is claimable after its backoff')
        WHEN p_task.status = 'cancelled' THEN
            pg_catalog.jsonb_build_object('sqlstate', '55000',
                               'message', pg_catalog.format('task %s is cancelled: its job ended, the outcome is not recorded', p_task_id),
                               'hint', 'see stageflow.job_status(job_id) for why the job ended')
        WHEN p_task.status = 'completed' THEN
            pg_catalog.jsonb_build_object('sqlstate', '55000', 'message', pg_catalog.format('task %s is already completed and cannot be %s', p_task_id, p_verb),
                               'hint', 'a completed task keeps its result; retry the whole job to run it again')
        ELSE
            pg_catalog.jsonb_build_object('sqlstate', '55000', 'message', pg_catalog.format('task %s is %s and cannot be %s', p_task_id, p_task.status, p_verb),
                               'hint', 'stageflow.retry_job(job_id) runs failed and dead tasks again')
    END
$$;
-- Raises a refusal made by stageflow._refusal.
CREATE FUNCTION stageflow._raise_refusal(p_refusal jsonb)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- plpgsql_check would have it IMMUTABLE; raising is its whole effect, and an IMMUTABLE call
    -- with constant arguments may be run while a query is planned: VOLATILE is right.
    -- @plpgsql_check_options: performance_warnings = false
    RAISE EXCEPTION USING
        ERRCODE = p_refusal ->> 'sqlstate', MESSAGE = p_refusal ->> 'message', HINT = p_refusal ->> 'hint';
END;
$$;
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:62
-- Whether a last stage of this fan-out gives the job a one-task result (its task of ordinal 0,
-- whatever became of it) rather than the results of its completed tasks: the one rule of what a
-- job's result holds (job_result reads it, job_status counts it).
CREATE FUNCTION stageflow._result_is_one_task(p_fan_out text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p_fan_out IN ('single', 'fan_in')
$$;
-- A job's state: status, stages with task counts by status, progress, timestamps, how many entries
-- its result has (result_count; the result itself is read a page at a time with job_result), error,
-- and who submitted it (owner, tenant), for the job's owner and stageflow_admin (_visible_job):
-- another login's job is an unknown one. stageflow._job_status answers for the engine itself (the
-- webhook payload, written in whichever transaction ended the job).
CREATE FUNCTION stageflow.job_status(job_id text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN stageflow._job_status(stageflow._visible_job(job_status.job_id));
END;
$$;
-- The status of a job row its caller read: reads its stage rows and their shards (counters, running
-- tasks included), never its tasks, so it answers as fast for 100,000 tasks as for 3.
--
-- progress = 100 * (completed stages + completed fraction of the current stage) / total stages.
-- result_count = the number of entries job_result pages over, from the last stage's counters: NULL
-- until the job is completed (with errors or not), as job_result answers only then.
CREATE FUNCTION stageflow._job_status(p_job stageflow.jobs)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_stages  jsonb;
    v_done    numeric;
    v_count   int;
BEGIN

    SELECT jsonb_agg(jsonb_build_object(
               'stage', d.n,
               'name', d.def ->> 'name',
               'handler', d.def ->> 'handler',
               'fan_out', d.def ->> 'fan_out',
               'status', coalesce(s.status, 'pending'),
               'task_count', s.task_count,
               'tasks', CASE WHEN s.stage IS NOT NULL THEN jsonb_build_object(
                   'queued', c.remaining_tasks - c.running_tasks,
                   'running', c.running_tasks,
                   'completed', c.completed_count,
                   'failed', s.failed_count,
                   'cancelled', s.task_count - c.completed_count - s.failed_count - c.remaining_tasks) END,
               'created_at', s.created_at,
               'completed_at', s.completed_at) ORDER BY d.n),
           sum(CASE WHEN s.status = 'completed' THEN 1
                    WHEN s.task_count > 0 THEN c.completed_count::numeric / s.task_count
                    ELSE 0 END),
           max(CASE WHEN d.n = p_job.total_stages AND stageflow._job_is_done(p_job.status) THEN
                    CASE WHEN stageflow._result_is_one_task(s.fan_out) THEN least(s.task_count, 1)
                         ELSE coalesce(c.completed_count, 0) END END)
      INTO v_stages, v_done, v_count
      FROM jsonb_array_elements(p_job.definition -> 'stages') WITH ORDINALITY AS d(def, n)
      LEFT JOIN stageflow.stages AS s ON s.job_id = p_job.job_id AND s.stage = d.n
      LEFT JOIN stageflow.stage_counts AS c ON c.job_id = p_job.job_id AND c.stage = d.n;

    RETURN jsonb_build_object(
        'job_id', p_job.job_id,
        'job_type', p_job.job_type,
        'status', p_job.status,
        'params', p_job.params,
        'current_stage', p_job.current_stage,
        'total_stages', p_job.total_stages,
        'progress', CASE WHEN stageflow._job_is_done(p_job.status) THEN 100
                         ELSE round(100 * v_done / p_job.total_stages, 1) END,
        'stages', v_stages,
        'created_at', p_job.created_at,
        'started_at', p_job.started_at,
        'updated_at', p_job.updated_at,
        'completed_at', p_job.completed_at,
        'result_count', v_count,
        'error', p_job.error,
        'owner', p_job.owner,
        'tenant', p_job.tenant);
END;
$$;
-- A job's tasks in stage and task order, with status, attempts, result and errors (for those who
-- see the job, as job_status). A page at a time when asked: the tasks after the task after_task
-- (the last task_id of the previous page; NULL: from the first), at most max_rows (1 to 10000;
-- NULL: all of them). A page reads its tasks through tasks_stage_idx from the cursor on, never the
-- job's other tasks. (Bitmap scans and sorts are off here and in job_result: the index's hash of
-- the job id and the id itself are one condition, but the planner multiplies their selectivities,
-- and a page of a 20,000-task job among 420,000 tasks was estimated at 44 rows and read all
-- 20,000 through a bitmap and a sort, where the index read in order stops after the page.)
CREATE FUNCTION stageflow.job_tasks(job_id text, after_task text DEFAULT NULL, max_rows int DEFAULT NULL)
RETURNS TABLE (
    task_id text, stage int, stage_name text, task_key text, status text, attempt int,
    max_attempts int, worker_id text, params jsonb, predecessor_id text, result jsonb, error jsonb,
    errors jsonb, created_at timestamptz, started_at timestamptz, completed_at timestamptz,
    lease_expires_at timestamptz, next_attempt_at timestamptz)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET enable_bitmapscan = off
SET enable_sort = off
AS $$
#variable_conflict use_column
DECLARE
    v_stage    int;
    v_ordinal  int;
BEGIN
    PERFORM stageflow._visible_job(job_tasks.job_id);
    IF job_tasks.max_rows IS NOT NULL AND job_tasks.max_rows NOT BETWEEN 1 AND 10000 THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('max_rows must be between 1 and 10000, got %s', job_tasks.max_rows),
            HINT = 'read a large job''s tasks a page at a time: pass the last task_id of a page as after_task';
    END IF;
    IF job_tasks.after_task IS NOT NULL THEN
        SELECT t.stage, t.ordinal INTO v_stage, v_ordinal
          FROM stageflow.tasks AS t
         WHERE t.task_id = job_tasks.after_task AND t.job_id = job_tasks.job_id;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING
                ERRCODE = '22023',
                MESSAGE = format('after_task %L is not a task of job %s', job_tasks.after_task, job_tasks.job_id),
                HINT = 'pass the task_id of the last row of the previous page (NULL for the first page)';
        END IF;
    END IF;
    -- (from the first task, the cursor is before every task: stages start at 1, ordinals at 0;
    -- one statement either way, an index range on (job, stage, ordinal) from the cursor on)
    RETURN QUERY
    SELECT t.task_id, t.stage, s.name, t.task_key, t.status::text, t.attempt, t.max_attempts, t.worker_id,
           stageflow._task_params(s.fan_out, t.ordinal, t.params), t.predecessor_id, t.result, t.error, t.errors,
           t.created_at, t.started_at,
           t.completed_at, t.lease_expires_at, t.next_attempt_at
      FROM stageflow.tasks AS t
      JOIN stageflow.stages AS s ON s.job_id = t.job_id AND s.stage = t.stage
     WHERE stageflow._is_task_of_job(t.job_id, job_tasks.job_id)
       AND (t.stage, t.ordinal) > (coalesce(v_stage, 0), coalesce(v_ordinal, -1))
     ORDER BY t.stage, t.ordinal
     LIMIT job_tasks.max_rows;
END;
$$;
-- A job's result, a page at a time, for those who see the job (as job_status): the entries of the
-- job's last stage in task order, after the task ordinal `after` (NULL: from the first), at most
-- `limit` (1 to 10000) of them, as
--   {"job_id", "status", "fan_out", "entries": [{"ordinal", "task_key", "task_id", "result"}, ...],
--    "next_after"}
-- next_after is the `after` of the next page, NULL on the last one. The entries are the last
-- stage's completed tasks (a completed_with_errors job: only those, as its failed ones have no
-- result); a `single` or `fan_in` last stage (the last stage's fan_out says which) has one entry,
-- its task, whose result is the job's result. Only a job that is completed (with errors or not)
-- has a result: any other is refused with 55000 (job_status says where it is; a failed job's error
-- says why). Reads the last stage's tasks through tasks_stage_idx from `after` on, at most limit + 1
-- of them: never all of a job's tasks.
CREATE FUNCTION stageflow.job_result(job_id text, after int DEFAULT NULL, "limit" int DEFAULT 1000)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET enable_bitmapscan = off
SET enable_sort = off
AS $$
DECLARE
    v_job      stageflow.jobs;
    v_fan_out  text;
    v_one      boolean;
    v_entries  jsonb;
    v_rows     bigint;
    v_last     int;
BEGIN
    -- plpgsql_check's only "other" warning here is that the parameter "limit" is a reserved
    -- word: it is, on purpose (the page size has the name the HTTP API and the CLI give it; a
    -- named call quotes it: "limit" => 100). The function was checked clean of every other one.
    -- @plpgsql_check_options: other_warnings = false
    IF job_result."limit" IS NULL OR job_result."limit" NOT BETWEEN 1 AND 10000 THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('limit must be between 1 and 10000, got %s', coalesce(job_result."limit"::text, 'NULL')),
            HINT = 'page through a longer result with `after`: pass the next_after of the previous page';
    END IF;
    v_job := stageflow._visible_job(job_result.job_id);
    IF NOT stageflow._job_is_done(v_job.status) THEN
        RAISE EXCEPTION USING
            ERRCODE = '55000',
            MESSAGE = format('job %s has no result: it is %s', v_job.job_id, v_job.status),
            HINT = CASE WHEN stageflow._job_is_open(v_job.status)
                        THEN 'a job has a result once it is completed; stageflow.job_status(job_id) says how far it is'
                        ELSE 'a failed or cancelled job has no result: its error in stageflow.job_status(job_id) says why, '
                             'and its tasks'' results are in stageflow.job_tasks(job_id)' END;
    END IF;

    SELECT s.fan_out INTO STRICT v_fan_out
      FROM stageflow.stages AS s
     WHERE s.job_id = v_job.job_id AND s.stage = v_job.total_stages;
    v_one := stageflow._result_is_one_task(v_fan_out);

    -- One more row than the page holds says whether another page follows.
    SELECT jsonb_agg(jsonb_build_object('ordinal', p.ordinal, 'task_key', p.task_key, 'task_id', p.task_id,
                                        'result', p.result) ORDER BY p.ordinal) FILTER (WHERE p.n <= job_result."limit"),
           count(*), max(p.ordinal) FILTER (WHERE p.n <= job_result."limit")
      INTO v_entries, v_rows, v_last
      FROM (SELECT t.ordinal, t.task_key, t.task_id, t.result, row_number() OVER (ORDER BY t.ordinal) AS n
              FROM stageflow.tasks AS t
             WHERE stageflow._is_task_of_job(t.job_id, v_job.job_id) AND t.stage = v_job.total_stages
               AND t.ordinal > coalesce(job_result.after, -1)
               AND t.ordinal <= CASE WHEN v_one THEN 0 ELSE 2147483647 END
               AND (v_one OR t.status = 'completed')
             ORDER BY t.ordinal
             LIMIT job_result."limit" + 1) AS p;

    RETURN jsonb_build_object(
        'job_id', v_job.job_id,
        'status', v_job.status,
        'fan_out', v_fan_out,
        'entries', coalesce(v_entries, '[]'::jsonb),
        'next_after', CASE WHEN v_rows > job_result."limit" THEN v_last END);
END;
$$;
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:43
-- Job ids: a job's id is the hash of its job type and canonical params (src/job_id.rs), so that
-- identical work is one job. What submitters may call to learn the id of a piece of work.

-- stageflow.job_id(job_type, params): the id submit_job gives this work (after the job type's
-- defaults are filled in). stageflow.canonical_json(value): the text job ids hash. Both hand the
-- JSON to Rust as text, so that too deep a document is an error with a SQLSTATE, not a crash.
CREATE FUNCTION stageflow.job_id(job_type text, params jsonb)
RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN stageflow._job_id(job_id.job_type, job_id.params::text);
END;
$$;
CREATE FUNCTION stageflow.canonical_json(value jsonb)
RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN stageflow._canonical_json(canonical_json.value::text);
END;
$$;
/* </end connected objects> */

/* <begin connected objects> */
-- src/job_id.rs:62
-- stageflow::job_id::_canonical_json
CREATE  FUNCTION "_canonical_json"(
	"value" TEXT /* & str */
) RETURNS TEXT /* String */
IMMUTABLE STRICT PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'canonical_json_sql_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/quotas.rs:37
-- stageflow::quotas::_default_quotas
CREATE  FUNCTION "_default_quotas"() RETURNS TABLE (
	"max_open_tasks" bigint,  /* i64 */
	"max_tasks_per_job" bigint  /* i64 */
)
STRICT STABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'default_quotas_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/queues.rs:322
-- stageflow::queues::_delete_messages
CREATE  FUNCTION "_delete_messages"(
	"queue" TEXT, /* & str */
	"msg_ids" bigint[] /* Vec < i64 > */
) RETURNS bigint /* i64 */
STRICT 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'delete_messages_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/clock.rs:30
-- stageflow::clock::_fake_now
CREATE  FUNCTION "_fake_now"() RETURNS TEXT /* Option < String > */
STRICT STABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'fake_now_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:42
-- requires:
--   clock::fake_now

-- The engine's clock: now(), unless the setting stageflow.fake_now holds a timestamp. Every
-- decision about time reads it: lease expiry, due retries, job deadlines, retention, and the
-- visibility of the queue messages Stageflow writes and reads (their vt is set and compared with
-- this clock, not the wall clock), so tests move time forward with SET stageflow.fake_now instead
-- of sleeping, and a lease, its message and its expiry agree.
-- The setting is defined by the library, superuser only (src/clock.rs); it is read through the
-- library's stageflow._fake_now(), so that a value someone without the right set before the
-- library was loaded in the session is dropped rather than believed.
-- Every name is qualified and there is no SET clause, so that PostgreSQL inlines it into the
-- statements of the hot path (a function with SET is never inlined).
CREATE FUNCTION stageflow.now()
RETURNS timestamptz
LANGUAGE sql STABLE
AS $$
    SELECT coalesce(stageflow._fake_now()::pg_catalog.timestamptz, pg_catalog.now())
$$;
/* </end connected objects> */

/* <begin connected objects> */
-- src/job_id.rs:56
-- stageflow::job_id::_job_id
CREATE  FUNCTION "_job_id"(
	"job_type" TEXT, /* & str */
	"params" TEXT /* & str */
) RETURNS TEXT /* String */
IMMUTABLE STRICT PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'job_id_sql_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/job_types.rs:364
-- stageflow::job_types::_normalize_definition
CREATE  FUNCTION "_normalize_definition"(
	"name" TEXT, /* Option < & str > */
	"definition" jsonb /* Option < pgrx :: JsonB > */
) RETURNS jsonb /* pgrx :: JsonB */
IMMUTABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'normalize_definition_sql_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/queues.rs:233
-- stageflow::queues::_read_messages
CREATE  FUNCTION "_read_messages"(
	"queue" TEXT, /* & str */
	"vt" INT, /* i32 */
	"qty" INT, /* i32 */
	"now" timestamp with time zone /* pgrx :: datum :: TimestampWithTimeZone */
) RETURNS TABLE (
	"msg_id" bigint,  /* i64 */
	"task_id" TEXT  /* Option < String > */
)
STRICT 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'read_messages_at_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/ownership.rs:57
-- stageflow::ownership::_session_is_admin
CREATE  FUNCTION "_session_is_admin"() RETURNS bool /* bool */
STRICT STABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'session_is_admin_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/ownership.rs:39
-- stageflow::ownership::_tenant
CREATE  FUNCTION "_tenant"() RETURNS TEXT /* Option < String > */
STRICT STABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'tenant_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:46
-- requires:
--   ownership::tenant
--   ownership::session_is_admin
--   quotas::default_quotas

-- Ownership and quotas. A job belongs to the login that submitted it (session_user; SET ROLE does
-- not change it) and to the session's tenant label, if it set one (stageflow.tenant). Its owner
-- sees, lists, cancels and resubmits it; a superuser or a member of stageflow_admin sees and
-- cancels every job, unless the session names a tenant: a label only ever narrows what a session
-- sees to its own login's jobs of that tenant (how the HTTP API serves many tenants on one login).
-- Quotas bound what a login's submissions create: the open tasks of its jobs under each tenant
-- label when it submits, and the tasks of one job over all its stages.

-- stageflow._session_is_admin() (Rust, src/ownership.rs): whether the session's login is a
-- superuser or a member of stageflow_admin.
--
-- The helpers below are PL/pgSQL, not SQL: a SQL function that cannot be inlined (a FROM, a
-- subquery) is planned again in every transaction that calls it, about 100 µs each; PL/pgSQL
-- keeps its plans for the session.

-- The session's access to a job of p_owner under p_tenant: 'owner' (its login, and its tenant
-- when the session names one), 'admin' (a superuser or stageflow_admin member naming no
-- tenant), or NULL: none, the job is not shown.
CREATE FUNCTION stageflow._access(p_owner name, p_tenant text)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tenant text := stageflow._tenant();
BEGIN
    RETURN CASE WHEN p_owner = session_user AND (v_tenant IS NULL OR p_tenant = v_tenant) THEN 'owner'
                WHEN v_tenant IS NULL AND stageflow._session_is_admin() THEN 'admin' END;
END;
$$;
-- The job p_job_id if the session may see it; otherwise the error of an unknown job, so that a
-- job of another login reads exactly as one that does not exist.
CREATE FUNCTION stageflow._visible_job(p_job_id text)
RETURNS stageflow.jobs
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job stageflow.jobs;
BEGIN
    SELECT * INTO v_job FROM stageflow.jobs AS j WHERE j.job_id = p_job_id;
    IF NOT FOUND OR stageflow._access(v_job.owner, v_job.tenant) IS NULL THEN
        PERFORM stageflow._raise_unknown('job', p_job_id);
    END IF;
    RETURN v_job;
END;
$$;
-- A login's quotas: its role_quotas row's limits, else the defaults (stageflow.max_open_tasks,
-- stageflow.max_tasks_per_job).
CREATE FUNCTION stageflow._quota(p_role name, OUT max_open_tasks bigint, OUT max_tasks_per_job bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    SELECT coalesce(q.max_open_tasks, d.max_open_tasks), coalesce(q.max_tasks_per_job, d.max_tasks_per_job)
      INTO _quota.max_open_tasks, _quota.max_tasks_per_job
      FROM stageflow._default_quotas() AS d
      LEFT JOIN stageflow.role_quotas AS q ON q.role_name = p_role;
END;
$$;
-- The open (queued or running) tasks of a login's open jobs under one tenant label (NULL: none):
-- the current stages' shard counters.
CREATE FUNCTION stageflow._open_tasks(p_owner name, p_tenant text)
RETURNS bigint
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN (SELECT coalesce(sum(sh.remaining_tasks), 0)::bigint
      FROM stageflow.jobs AS j
      JOIN stageflow.stage_shards AS sh ON sh.job_id = j.job_id AND sh.stage = j.current_stage
     -- literal list: the predicate of jobs_open_owner_idx, whose use must not hang on inlining (0015_statuses.sql)
     WHERE j.owner = p_owner AND j.tenant IS NOT DISTINCT FROM p_tenant AND j.status IN ('queued', 'processing'));
END;
$$;
-- The first step of every submission (submit_job_outcome): updates the row of the login and
-- tenant label in stageflow.admissions, which the submission then holds to its commit. So a
-- login's submissions under one label take turns from here (before any other lock they take), the
-- open-task check of each counts what the ones before it committed, and under REPEATABLE READ a
-- submission whose snapshot predates another's commit fails with 40001 (serialization_failure:
-- run the transaction again) rather than counting from that snapshot.
CREATE FUNCTION stageflow._admit(p_owner name, p_tenant text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO stageflow.admissions AS a (owner, tenant, last_submitted_at)
    VALUES (p_owner, coalesce(p_tenant, ''), now())
    ON CONFLICT ON CONSTRAINT admissions_pkey DO UPDATE
       SET submissions = a.submissions + 1, last_submitted_at = excluded.last_submitted_at;
END;
$$;
-- The last step of a submission that opened tasks (a new job, a resumed one): refuses (54000) when
-- the login's open tasks under the job's tenant label, this submission's included, are more than
-- its quota. The whole submission is then rolled back: it creates nothing.
CREATE FUNCTION stageflow._check_open_tasks(p_owner name, p_tenant text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_limit bigint := (stageflow._quota(p_owner)).max_open_tasks;
    v_open  bigint := stageflow._open_tasks(p_owner, p_tenant);
BEGIN
    IF v_open > v_limit THEN
        RAISE EXCEPTION USING
            ERRCODE = '54000',
            MESSAGE = format('this submission would leave %s with %s open tasks, more than its quota of %s',
                             CASE WHEN p_tenant IS NULL THEN format('login %s', p_owner) ELSE format('tenant %s', p_tenant) END,
                             v_open, v_limit),
            HINT = 'wait for its jobs to finish (or cancel some), or an admin raises the quota with '
                   'stageflow.set_quota(role, max_open_tasks, max_tasks_per_job)';
    END IF;
END;
$$;
-- The per-job check of a stage about to be created with p_count tasks (by _create_stage_tasks,
-- before anything is inserted): the job's tasks over all its stages stay within the limit it was
-- submitted with (jobs.max_tasks: its owner's max_tasks_per_job then), a dynamic fan-out too. A
-- refusal is 54000 with a hint: a submission creates nothing; a later stage's fails its job
-- (advance_stage's stage_creation_failed).
CREATE FUNCTION stageflow._check_quota(p_job stageflow.jobs, p_stage int, p_count bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_before  bigint;
BEGIN
    SELECT coalesce(sum(s.task_count), 0) INTO v_before FROM stageflow.stages AS s WHERE s.job_id = p_job.job_id;
    IF v_before + p_count > p_job.max_tasks THEN
        RAISE EXCEPTION USING
            ERRCODE = '54000',
            MESSAGE = format('stage %s of job %s would create %s tasks, making %s in the job: more than the %s tasks it may have',
                             p_stage, p_job.job_id, p_count, v_before + p_count, p_job.max_tasks),
            HINT = 'split the work into smaller jobs, or an admin raises the limit with '
                   'stageflow.set_quota(role, max_open_tasks, max_tasks_per_job) before it is submitted';
    END IF;
END;
$$;
-- Sets a login's quotas: the most open tasks its jobs may have when it submits another, and the
-- most tasks one of its jobs may create over all its stages. NULL keeps (or goes back to) the
-- default of that limit; both NULL remove the login's row. Returns the limits now in force.
CREATE FUNCTION stageflow.set_quota(role name, max_open_tasks bigint DEFAULT NULL, max_tasks_per_job bigint DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles AS r WHERE r.rolname = set_quota.role) THEN
        RAISE EXCEPTION USING
            ERRCODE = '42704',
            MESSAGE = format('unknown role %L', set_quota.role),
            HINT = 'a quota applies to the login that submits jobs: name an existing role';
    END IF;
    IF set_quota.max_open_tasks < 0 OR set_quota.max_tasks_per_job < 0 THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('quotas cannot be negative, got max_open_tasks %s and max_tasks_per_job %s',
                             set_quota.max_open_tasks, set_quota.max_tasks_per_job),
            HINT = 'give a limit of 0 or more, or NULL for the default';
    END IF;
    IF set_quota.max_open_tasks IS NULL AND set_quota.max_tasks_per_job IS NULL THEN
        DELETE FROM stageflow.role_quotas AS q WHERE q.role_name = set_quota.role;
    ELSE
        INSERT INTO stageflow.role_quotas AS q (role_name, max_open_tasks, max_tasks_per_job, updated_at)
        VALUES (set_quota.role, set_quota.max_open_tasks, set_quota.max_tasks_per_job, now())
        ON CONFLICT ON CONSTRAINT role_quotas_pkey DO UPDATE
           SET max_open_tasks = excluded.max_open_tasks, max_tasks_per_job = excluded.max_tasks_per_job,
               updated_at = excluded.updated_at;
    END IF;
    RETURN (SELECT jsonb_build_object('role', set_quota.role, 'max_open_tasks', q.max_open_tasks,
                                      'max_tasks_per_job', q.max_tasks_per_job)
              FROM stageflow._quota(set_quota.role) AS q);
END;
$$;
-- The quotas in force and the open tasks held against them, per login and tenant label (a label's
-- jobs count against the login's quota on their own): for an admin naming no tenant, of every
-- login with a quota of its own or an open job; for anyone else, of its own login (and only the
-- label it names, if it names one). `custom` says whether the login has a row of its own
-- (stageflow.set_quota) or the defaults.
CREATE FUNCTION stageflow.list_quotas()
RETURNS TABLE (role_name name, tenant text, max_open_tasks bigint, max_tasks_per_job bigint, open_tasks bigint,
               custom boolean)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_tenant text := stageflow._tenant();
    v_all    boolean := v_tenant IS NULL AND stageflow._session_is_admin();
BEGIN
    RETURN QUERY
    SELECT r.owner, r.tenant, q.max_open_tasks, q.max_tasks_per_job, stageflow._open_tasks(r.owner, r.tenant),
           EXISTS (SELECT 1 FROM stageflow.role_quotas AS rq WHERE rq.role_name = r.owner)
      FROM (SELECT rq.role_name AS owner, NULL::text AS tenant FROM stageflow.role_quotas AS rq
             UNION
            -- literal list: the predicate of jobs_open_owner_idx, whose use must not hang on inlining (0015_statuses.sql)
            SELECT j.owner, j.tenant FROM stageflow.jobs AS j WHERE j.status IN ('queued', 'processing')
             UNION
            SELECT session_user, v_tenant) AS r
     CROSS JOIN LATERAL stageflow._quota(r.owner) AS q
     WHERE v_all OR (r.owner = session_user AND (v_tenant IS NULL OR r.tenant = v_tenant))
     ORDER BY r.owner, r.tenant NULLS FIRST;
END;
$$;
/* </end connected objects> */

/* <begin connected objects> */
-- src/params.rs:42
-- stageflow::params::_validate_params
CREATE  FUNCTION "_validate_params"(
	"job_type" TEXT, /* & str */
	"definition" jsonb, /* pgrx :: JsonB */
	"params" TEXT /* Option < & str > */
) RETURNS jsonb /* pgrx :: JsonB */
IMMUTABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'validate_params_sql_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:68
-- requires:
--   register_job_type
--   job_types::normalize_definition_sql
--   params::validate_params_sql

-- The built-in job type: stage 1 `greet` fans out n greetings, stage 2 `reply` answers each one
-- (lineage: every reply task receives its greeting's result). The job's result is the n replies.
-- Stored without creating its queue (what register_job_type would do): CREATE EXTENSION makes no
-- pgmq queue, so a pg_restore, which runs CREATE EXTENSION and then restores every queue with
-- its messages, finds none in its way; `default` is made on first use (_ensure_queue).
INSERT INTO stageflow.job_types AS jt (name, definition)
SELECT 'hello_world', stageflow._normalize_definition('hello_world', $json$
{
  "description": "Greets n times, then replies to each greeting: the smallest job with fan-out and lineage.",
  "parameters": {
    "type": "object",
    "properties": {
      "message": {"type": "string", "minLength": 1, "maxLength": 1000, "default": "hello"},
      "n": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 3}
    },
    "required": ["message", "n"],
    "additionalProperties": false
  },
  "retry": {"max_attempts": 3, "backoff_base_seconds": 1, "backoff_max_seconds": 60},
  "stages": [
    {"name": "greet", "handler": "hello_world.greet", "fan_out": "count", "param": "n"},
    {"name": "reply", "handler": "hello_world.reply", "fan_out": "lineage"}
  ]
}
$json$::jsonb)
ON CONFLICT ON CONSTRAINT job_types_pkey DO UPDATE SET definition = excluded.definition, updated_at = now();
/* </end connected objects> */

/* <begin connected objects> */
-- src/queues.rs:307
-- stageflow::queues::read_messages
-- Skipped due to `#[pgrx(sql = false)]`
/* </end connected objects> */

/* <begin connected objects> */
-- src/lib.rs:73
-- finalize
-- Roles, created once per cluster (roles are cluster-wide) and granted what each needs:
--   stageflow_worker     claim, heartbeat, complete, fail and release tasks
--   stageflow_submitter  submit, list, read and cancel its own jobs (the login's, see
--                        0050_ownership_and_quotas.sql), see its quota
--   stageflow_monitor    metrics (every job's counters, no job's data): what an HTTP server's login
--                        needs for /metrics without being an admin
--   stageflow_admin      all of the above, plus every job, registering job types, retrying jobs,
--                        dead letters, repairs, queue grants (a worker claims only from queues
--                        granted to it), quotas
-- The functions are SECURITY DEFINER with search_path pg_catalog, pg_temp and every name
-- qualified, so no role needs (or has) any privilege on the tables. Nothing is granted to PUBLIC.
DO $$
DECLARE
    v_role text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['stageflow_worker', 'stageflow_submitter', 'stageflow_monitor', 'stageflow_admin'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = v_role) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
            EXCEPTION WHEN unique_violation OR duplicate_object THEN
                -- (CREATE EXTENSION in another database made it at the same time)
                NULL;
            END;
        END IF;
    END LOOP;
END;
$$;
GRANT stageflow_worker, stageflow_submitter, stageflow_monitor TO stageflow_admin;
REVOKE ALL ON ALL TABLES IN SCHEMA stageflow FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA stageflow FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA stageflow FROM PUBLIC;
GRANT USAGE ON SCHEMA stageflow TO stageflow_worker, stageflow_submitter, stageflow_monitor, stageflow_admin;
GRANT EXECUTE ON FUNCTION
    stageflow.claim_tasks(text, int, int, text),
    stageflow.heartbeat(text[], int, text, bigint[]),
    stageflow.complete_task_and_check_stage(text, jsonb, text, bigint, boolean),
    stageflow.complete_tasks(jsonb, text, boolean),
    stageflow.fail_task(text, jsonb, boolean, text, bigint),
    stageflow.release_tasks(text[], text, bigint[])
TO stageflow_worker;
GRANT EXECUTE ON FUNCTION
    stageflow.submit_job(text, jsonb, text),
    stageflow.submit_job_outcome(text, jsonb, text),
    stageflow.list_quotas(),
    stageflow.webhook_deliveries(text),
    stageflow.register_webhook_endpoint(text, text),
    stageflow.webhook_endpoints(),
    stageflow.drop_webhook_endpoint(text),
    stageflow.job_status(text),
    stageflow.job_tasks(text, text, int),
    stageflow.job_result(text, int, int),
    stageflow.list_jobs(text, text, int, timestamptz),
    stageflow.cancel_job(text),
    stageflow.job_types(),
    stageflow.job_id(text, jsonb),
    stageflow.canonical_json(jsonb)
TO stageflow_submitter;
GRANT EXECUTE ON FUNCTION
    stageflow.register_job_type(text, jsonb),
    stageflow.retry_job(text),
    stageflow.dead_letters(int),
    stageflow.advance_stage(text),
    stageflow.run_maintenance(int),
    stageflow.shape_queues(),
    stageflow.grant_queue(text, name),
    stageflow.revoke_queue(text, name),
    stageflow.list_queue_grants(),
    stageflow.set_quota(name, bigint, bigint),
    stageflow.claim_webhook_deliveries(int, int),
    stageflow.record_webhook_attempt(bigint, boolean, int, text, numeric)
TO stageflow_admin;
GRANT EXECUTE ON FUNCTION stageflow.metrics() TO stageflow_monitor;
-- Every entry point that updates task rows compresses the full-page images it logs, whatever the
-- cluster's wal_compression: a claim or a report is often the first change of its task's page
-- after a checkpoint, so PostgreSQL logs the whole page with it, and a page of task rows
-- compresses to about a fifth (bench/README.md, seventh pass). lz4 where this PostgreSQL has it
-- (with pglz, a batch over a backlog cost 2-6 % more server CPU), else pglz, which every build
-- has. The setting is a superuser's, which a function applies as its owner: these functions stay
-- owned by the superuser who created the extension.
DO $$
DECLARE
    v_method   text := CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_settings AS s
                                          WHERE s.name = 'wal_compression' AND 'lz4' = ANY (s.enumvals))
                            THEN 'lz4' ELSE 'pglz' END;
    v_function regprocedure;
BEGIN
    FOREACH v_function IN ARRAY ARRAY[
        'stageflow.claim_tasks(text, int, int, text)',
        'stageflow.heartbeat(text[], int, text, bigint[])',
        'stageflow.release_tasks(text[], text, bigint[])',
        'stageflow.complete_task_and_check_stage(text, jsonb, text, bigint, boolean)',
        'stageflow.complete_tasks(jsonb, text, boolean)',
        'stageflow.fail_task(text, jsonb, boolean, text, bigint)',
        'stageflow.cancel_job(text)',
        'stageflow.retry_job(text)',
        'stageflow.submit_job_outcome(text, jsonb, text)',
        'stageflow.submit_job(text, jsonb, text)',
        'stageflow.advance_stage(text)',
        'stageflow.run_maintenance(int)']::regprocedure[] LOOP
        EXECUTE pg_catalog.format('ALTER FUNCTION %s SET wal_compression = %s', v_function, v_method);
    END LOOP;
END;
$$;

-- 5. What needs the functions of 0.3.0 (sql/upgrades/0.2.0--0.3.0.sql).

