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
