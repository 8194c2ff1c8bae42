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
