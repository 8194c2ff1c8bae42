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
