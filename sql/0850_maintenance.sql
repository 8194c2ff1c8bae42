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

-- Jobs that retention has deleted (their job row, stages, shards and claims are gone) whose tasks,
-- events and webhook deliveries are still being deleted, a bounded batch a round: a job of a
-- million tasks is never deleted in one statement. From the job row's deletion on, the job is
-- gone for the API; its leftover rows are invisible (every reader joins the job or stage row). A
-- submission of the same work (the same job id) finishes its deletion first
-- (stageflow._finish_job_deletion), so the new job's rows never meet the old one's.
CREATE TABLE stageflow.deleted_jobs (
    job_id      text COLLATE "C" PRIMARY KEY,
    deleted_at  timestamptz NOT NULL
);
SELECT pg_catalog.pg_extension_config_dump('stageflow.deleted_jobs', '');

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
