-- A stage's shards: its open tasks are counted in up to 16 rows of stageflow.stage_shards (task
-- ordinal % shards), its row counts the shards still open. The primitives every path shares to
-- move those counters and to lock them in the one order: a stage's shards in shard order, then
-- the stage row, then the job row (docs/state_machine.md, "Lock order").

-- Tasks of one stage that stop being open without a result (p_sign = -1: failed, dead,
-- cancelled) or open again (+1: retried): locks all of the stage's shard rows in shard order (the
-- order a completion takes them, before the stage row), moves the shards' counters, then updates
-- the stage row: open_shards by the shards that emptied (-1 each) or had been empty (+1 each),
-- failed_count by p_failed. p_running of the tasks were running (they stop running: counted in
-- stopped_tasks of the first shard moved). Returns the stage row as updated.
CREATE FUNCTION stageflow._move_shards(p_job_id text, p_stage int, p_ordinals int[], p_sign int, p_failed int DEFAULT 0,
                                       p_running int DEFAULT 0)
RETURNS stageflow.stages
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_delta  int := 0;
    v_before int;
    v_after  int;
    v_stage  stageflow.stages;
    v_leave  int := p_running;
    r        record;
BEGIN
    PERFORM 1 FROM stageflow.stage_shards AS sh
      WHERE sh.job_id = p_job_id AND sh.stage = p_stage
      ORDER BY sh.shard FOR UPDATE;
    FOR r IN
        SELECT o % s.shards AS shard, count(*)::int AS n
          FROM unnest(p_ordinals) AS o
          JOIN stageflow.stages AS s ON s.job_id = p_job_id AND s.stage = p_stage
         GROUP BY o % s.shards
         ORDER BY 1
    LOOP
        UPDATE stageflow.stage_shards AS sh
           SET remaining_tasks = sh.remaining_tasks + p_sign * r.n, stopped_tasks = sh.stopped_tasks + v_leave
         WHERE sh.job_id = p_job_id AND sh.stage = p_stage AND sh.shard = r.shard
        RETURNING sh.remaining_tasks - p_sign * r.n, sh.remaining_tasks INTO v_before, v_after;
        v_leave := 0;
        IF v_before > 0 AND v_after = 0 THEN
            v_delta := v_delta - 1;
        ELSIF v_before = 0 AND v_after > 0 THEN
            v_delta := v_delta + 1;
        END IF;
    END LOOP;
    UPDATE stageflow.stages AS s
       SET open_shards = s.open_shards + v_delta, failed_count = s.failed_count + p_failed
     WHERE s.job_id = p_job_id AND s.stage = p_stage
    RETURNING * INTO v_stage;
    RETURN v_stage;
END;
$$;

-- Tasks of one stage that stop running but stay open (a retry scheduled, a lease handed back or
-- re-queued by retry_job): counted in stopped_tasks of the first one's shard (a stage's running
-- tasks are a sum over its shards, whichever shard counts them).
CREATE FUNCTION stageflow._leave_running(p_job_id text, p_stage int, p_ordinals int[])
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE stageflow.stage_shards AS sh
       SET stopped_tasks = sh.stopped_tasks + cardinality(p_ordinals)
      FROM stageflow.stages AS s
     WHERE s.job_id = p_job_id AND s.stage = p_stage
       AND sh.job_id = p_job_id AND sh.stage = p_stage AND sh.shard = p_ordinals[1] % s.shards;
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
