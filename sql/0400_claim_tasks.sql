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
