-- What 0.1.0 -> 0.2.0 changes in the tables 0.1.0 has, and the data carried over, written by hand;
-- scripts/upgrade-script.py 0.1.0 0.2.0 puts it into sql/stageflow--0.1.0--0.2.0.sql (see there
-- for what runs before and after). Jobs in flight keep going: a queued task keeps its message, a
-- running one its lease (its worker, of either version, reports it: by worker_id, as 0.1.0 did,
-- or it expires and the task is delivered again), a retry waiting its backoff its delayed message.

-- jobs: the result is read from the tasks (job_result); owner, tenant and max_tasks are new. A job
-- submitted before 0.2.0 had no owner: it belongs to the extension's owner (stageflow_admin and
-- superusers see it); it had no task quota and gets none (set in part 5).
ALTER TABLE stageflow.jobs DROP COLUMN result;
ALTER TABLE stageflow.jobs ADD COLUMN owner name, ADD COLUMN tenant text, ADD COLUMN max_tasks bigint;
CREATE INDEX jobs_owner_idx ON stageflow.jobs (owner, created_at DESC);
CREATE INDEX jobs_open_owner_idx ON stageflow.jobs (owner, tenant) WHERE status IN ('queued', 'processing');

-- stage_shards gains stopped_tasks before its completion counters: the table is made again in
-- 0.2.0's column order. A stage's running tasks are now started (stage_claims) - stopped: the
-- tasks running now are counted as started by a session 0 that no backend has.
ALTER TABLE stageflow.stage_shards RENAME TO stage_shards_0_1_0;
ALTER TABLE stageflow.stage_shards_0_1_0 RENAME CONSTRAINT stage_shards_pkey TO stage_shards_0_1_0_pkey;
ALTER TABLE stageflow.stage_shards_0_1_0 RENAME CONSTRAINT stage_shards_remaining_tasks_check TO stage_shards_0_1_0_remaining_tasks_check;
ALTER TABLE stageflow.stage_shards_0_1_0 RENAME CONSTRAINT stage_shards_job_id_stage_fkey TO stage_shards_0_1_0_job_id_stage_fkey;
CREATE TABLE stageflow.stage_shards (
    job_id            text NOT NULL,
    stage             int NOT NULL,
    shard             int NOT NULL,
    remaining_tasks   int NOT NULL CHECK (remaining_tasks >= 0),
    -- tasks of this shard that stopped running (completed, failed, released, cancelled, re-queued):
    -- a stage's running tasks are the tasks its claims started (stage_claims) minus these.
    stopped_tasks     int NOT NULL DEFAULT 0 CHECK (stopped_tasks >= 0),
    completed_count   int NOT NULL DEFAULT 0,
    completed_seconds double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, stage, shard),
    FOREIGN KEY (job_id, stage) REFERENCES stageflow.stages (job_id, stage) ON DELETE CASCADE
);
INSERT INTO stageflow.stage_shards (job_id, stage, shard, remaining_tasks, completed_count, completed_seconds)
SELECT job_id, stage, shard, remaining_tasks, completed_count, completed_seconds FROM stageflow.stage_shards_0_1_0;
ALTER EXTENSION stageflow DROP TABLE stageflow.stage_shards_0_1_0;
DROP TABLE stageflow.stage_shards_0_1_0;
SELECT pg_catalog.pg_extension_config_dump('stageflow.stage_shards', '');

-- tasks: a lease token and failed_at are new, the columns claims and completions change go last,
-- fillfactor 50, and the partial indexes on status are gone: the table is made again.
ALTER TABLE stageflow.tasks RENAME TO tasks_0_1_0;
ALTER TABLE stageflow.tasks_0_1_0 RENAME CONSTRAINT tasks_pkey TO tasks_0_1_0_pkey;
ALTER TABLE stageflow.tasks_0_1_0 RENAME CONSTRAINT tasks_status_check TO tasks_0_1_0_status_check;
DROP INDEX stageflow.tasks_stage_idx, stageflow.tasks_running_idx, stageflow.tasks_lease_idx,
           stageflow.tasks_retry_idx, stageflow.tasks_dead_letter_idx;
CREATE TABLE stageflow.tasks (
    -- What the task is (written when it is created).
    task_id           text PRIMARY KEY,
    job_id            text NOT NULL,
    stage             int NOT NULL,
    ordinal           int NOT NULL,
    max_attempts      int NOT NULL,
    -- The task's current message: the delivery hint. The task row, not the message, decides
    -- whether the task may be claimed; a message that is not this one is stray.
    msg_id            bigint NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    task_key          text NOT NULL,
    params            jsonb NOT NULL DEFAULT '{}',
    predecessor_id    text,
    inputs            jsonb,
    -- What a failure writes.
    error             jsonb,
    errors            jsonb NOT NULL DEFAULT '[]',
    -- when the task became a dead letter (ended failed or dead); NULL otherwise (retry_job clears it)
    failed_at         timestamptz,
    -- What claims and completions change, last and together (see sql/0010_tables.sql).
    lease_token       bigint NOT NULL DEFAULT 0,
    attempt           int NOT NULL DEFAULT 0,
    status            text NOT NULL DEFAULT 'queued'
                      CHECK (status IN ('queued', 'running', 'completed', 'failed', 'dead', 'cancelled')),
    lease_expires_at  timestamptz,
    claimed_at        timestamptz,
    started_at        timestamptz,
    next_attempt_at   timestamptz,
    completed_at      timestamptz,
    worker_id         text,
    result            jsonb
)
WITH (fillfactor = 50);
-- (lease_token 0: the leases running now are the tasks' first with a token; their workers report
-- by worker_id, or without either, as 0.1.0's did)
INSERT INTO stageflow.tasks (task_id, job_id, stage, ordinal, max_attempts, msg_id, created_at, task_key, params,
                             predecessor_id, inputs, error, errors, failed_at, lease_token, attempt, status,
                             lease_expires_at, claimed_at, started_at, next_attempt_at, completed_at, worker_id, result)
SELECT task_id, job_id, stage, ordinal, max_attempts, msg_id, created_at, task_key, params,
       predecessor_id, inputs, error, errors,
       CASE WHEN status IN ('failed', 'dead') THEN coalesce(completed_at, now()) END, 0, attempt, status,
       lease_expires_at, claimed_at, started_at, next_attempt_at, completed_at, worker_id, result
  FROM stageflow.tasks_0_1_0;
ALTER EXTENSION stageflow DROP TABLE stageflow.tasks_0_1_0;
DROP TABLE stageflow.tasks_0_1_0;
CREATE INDEX tasks_stage_idx ON stageflow.tasks (job_id, stage, ordinal);
CREATE INDEX tasks_dead_letter_idx ON stageflow.tasks (failed_at DESC) WHERE failed_at IS NOT NULL;
SELECT pg_catalog.pg_extension_config_dump('stageflow.tasks', '');

-- What 0.2.0 counts and notes of the tasks running now: started by claims (running = started -
-- stopped), and the leases of last attempts (maintenance dead-letters the task when one expires).
INSERT INTO stageflow.stage_claims (job_id, stage, session, started)
SELECT job_id, stage, 0, count(*) FROM stageflow.tasks WHERE status = 'running' GROUP BY job_id, stage;
INSERT INTO stageflow.last_attempt_leases (task_id, lease_token, expires_at)
SELECT task_id, lease_token, lease_expires_at FROM stageflow.tasks
 WHERE status = 'running' AND attempt >= max_attempts AND lease_expires_at IS NOT NULL;

-- webhook_deliveries: the secret of a registered endpoint (none before 0.2.0).
ALTER TABLE stageflow.webhook_deliveries ADD COLUMN secret text;

-- Queue grants are new in 0.2.0: without one, only stageflow_admin and superusers claim. The
-- workers of 0.1.0 (members of stageflow_worker) claimed from every queue; they keep the queues
-- of the job types registered now and those the jobs' stages use (a job keeps the definition it
-- was submitted with: a job type registered again on another queue leaves its jobs on the old).
INSERT INTO stageflow.queue_grants (queue, role_name)
SELECT q.queue, 'stageflow_worker'::name
  FROM (SELECT s.stage ->> 'queue' AS queue
          FROM stageflow.job_types AS jt, jsonb_array_elements(jt.definition -> 'stages') AS s(stage)
        UNION
        SELECT st.queue FROM stageflow.stages AS st
        UNION
        SELECT s.stage ->> 'queue'
          FROM stageflow.jobs AS j, jsonb_array_elements(j.definition -> 'stages') AS s(stage)
         WHERE j.status IN ('queued', 'processing')) AS q
 WHERE q.queue IS NOT NULL
ON CONFLICT DO NOTHING;

-- The identity sequences of events and webhook deliveries are dumped with their tables: restored
-- rows keep their ids, and new ones must not reuse them.
SELECT pg_catalog.pg_extension_config_dump('stageflow.events_event_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('stageflow.webhook_deliveries_delivery_id_seq', '');

-- 0.1.0's CREATE EXTENSION made hello_world's pgmq queue `default`, so its tables became members
-- of the extension and pg_dump left out their messages. It becomes a queue like any other, dumped
-- with pgmq's (0.2.0 makes it on first use).
DO $upgrade$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_depend AS d
                WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = to_regclass('pgmq.q_default')
                  AND d.refclassid = 'pg_catalog.pg_extension'::regclass AND d.deptype = 'e'
                  AND d.refobjid = (SELECT e.oid FROM pg_catalog.pg_extension AS e WHERE e.extname = 'stageflow')) THEN
        ALTER EXTENSION stageflow DROP TABLE pgmq.q_default;
        ALTER EXTENSION stageflow DROP TABLE pgmq.a_default;
        ALTER EXTENSION stageflow DROP SEQUENCE pgmq.q_default_msg_id_seq;
    END IF;
END
$upgrade$;

-- @definitions
-- The jobs of 0.1.0: owned by the extension's owner, and without a task quota, as they were
-- submitted (a later stage of theirs may fan out to any size).
UPDATE stageflow.jobs AS j
   SET owner = (SELECT e.extowner::regrole::name FROM pg_catalog.pg_extension AS e WHERE e.extname = 'stageflow'),
       max_tasks = 9223372036854775807
 WHERE j.owner IS NULL;
ALTER TABLE stageflow.jobs ALTER COLUMN owner SET NOT NULL, ALTER COLUMN max_tasks SET NOT NULL;
