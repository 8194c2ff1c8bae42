-- Stageflow's state: job types, jobs, the stages a job has reached, and their tasks.
-- Messages that carry tasks to workers live in pgmq queues; a task row knows its message.
-- The status lists here (CHECK constraints, partial index predicates) are literal; the code
-- reads the classes of statuses (open, done, stopped, ended...) through sql/0015_statuses.sql.
-- A status CHECK is written `status = ANY ('{...}'::text[])`, one constant array, not `IN (...)`:
-- PostgreSQL reads a table's CHECK expressions back from their stored text and plans them again
-- in every statement that writes the table, and `IN ('queued', ...)` is kept as an array of six
-- constants, built again each time (the claim and the completion write a task each: 57,000
-- instructions of about 2.6 million per pair, measured with valgrind, bench/README.md).
-- The columns that every claim and completion write are of domains instead (a task's status, a
-- stage's counters): a domain's CHECK is read and planned once per session (PostgreSQL keeps it
-- with the type), and checked on the values written to the column, which is every value the
-- column gets; a table's CHECK costs each statement that writes the table its reading and
-- planning again (a claim and a completion of one task: 58,000 instructions for the task's
-- status CHECK, 35,000 for the counters' three, of 1.32 million and more; bench/README.md,
-- eighteenth pass). An array of a domain compares only with an array of that domain: a query
-- comparing array_agg(status) with a text[] casts it, array_agg(status::text).
CREATE DOMAIN stageflow.task_status AS text
    CONSTRAINT task_status_check CHECK (VALUE = ANY ('{queued,running,completed,failed,dead,cancelled}'::text[]));
CREATE DOMAIN stageflow.tally AS int CONSTRAINT tally_check CHECK (VALUE >= 0);
CREATE DOMAIN stageflow.big_tally AS bigint CONSTRAINT big_tally_check CHECK (VALUE >= 0);

-- A job type: a named, validated definition (parameters schema, retry defaults, ordered stages).
CREATE TABLE stageflow.job_types (
    name        text PRIMARY KEY,
    definition  jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Ids compare byte by byte: every column holding a job id or a task id is COLLATE "C", whatever
-- the database's collation. They are hex digits and ASCII keys, looked up by key and sorted for
-- lock order on every claim and completion; under a linguistic collation each comparison went
-- through the collation library (a database with ICU en-US: submitting a 1,000,000-task stage
-- 8.7-9.3 s instead of 7.2-7.6 s, bench/README.md). Lock orders sort these columns, so byte by
-- byte; a sort of ids from an array follows the database's collation instead, which sorts job
-- ids (hex digits) alike but not every task id (keys may hold '-', '_', capitals): the one sort of
-- task ids from an array that takes locks (_settle_completions) names COLLATE "C".

-- A job: one submission of a job type with canonical parameters. The definition is copied in so
-- that re-registering the type changes future jobs only.
CREATE TABLE stageflow.jobs (
    job_id         text COLLATE "C" PRIMARY KEY,
    job_type       text NOT NULL,
    params         jsonb NOT NULL,
    definition     jsonb NOT NULL,
    status         text NOT NULL DEFAULT 'queued'
                   CHECK (status = ANY ('{queued,processing,completed,completed_with_errors,failed,cancelled}'::text[])),
    current_stage  int NOT NULL DEFAULT 1,
    total_stages   int NOT NULL,
    error          jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    completed_at   timestamptz,
    -- created_at + the job type's timeout_seconds: past it, maintenance fails the job.
    deadline_at    timestamptz,
    -- where to POST the job's end (else its job type's webhook_url)
    webhook_url    text,
    -- who submitted it: the login (session_user) and the session's tenant label, if any. Only
    -- they (and stageflow_admin) see, list and cancel it.
    owner          name NOT NULL,
    tenant         text,
    -- the most tasks the job may create over all its stages: its owner's quota when submitted
    max_tasks      bigint NOT NULL
);
CREATE INDEX jobs_created_at_idx ON stageflow.jobs (created_at DESC);
CREATE INDEX jobs_deadline_idx ON stageflow.jobs (deadline_at) WHERE status IN ('queued', 'processing');
-- A login's jobs, newest first (list_jobs), and its open ones by tenant (the open-task quota).
CREATE INDEX jobs_owner_idx ON stageflow.jobs (owner, created_at DESC);
CREATE INDEX jobs_open_owner_idx ON stageflow.jobs (owner, tenant) WHERE status IN ('queued', 'processing');
CREATE INDEX jobs_finished_idx ON stageflow.jobs (completed_at) WHERE completed_at IS NOT NULL;

-- A stage a job has reached. Its open tasks are counted in `shards` rows of stage_shards (no task
-- belongs to a shard: a completion takes its tasks off a shard no other transaction holds), so
-- concurrent completions lock different rows; the stage row counts the shards that still have
-- open tasks (open_shards) and is locked only by the transaction that empties a shard: the one
-- that takes open_shards to zero ends the stage. No completion ever scans the stage's tasks.
CREATE TABLE stageflow.stages (
    job_id            text COLLATE "C" NOT NULL REFERENCES stageflow.jobs (job_id) ON DELETE CASCADE,
    stage             int NOT NULL,
    name              text NOT NULL,
    handler           text NOT NULL,
    queue             text NOT NULL,
    fan_out           text NOT NULL,
    param             text,
    next_fan_out      text,
    max_attempts      int NOT NULL,
    -- the stage's own lease (overrides the claim's) and handler timeout, when it defines them
    lease_seconds     int,
    timeout_seconds   int,
    -- failures the stage tolerates: it fails when failed_count exceeds both
    -- max_failed_tasks and max_failure_ratio * task_count.
    max_failed_tasks  int NOT NULL DEFAULT 0,
    max_failure_ratio numeric NOT NULL DEFAULT 0,
    task_count        int NOT NULL,
    shards            int NOT NULL CHECK (shards >= 1),
    open_shards       int NOT NULL,
    failed_count      int NOT NULL DEFAULT 0,
    status            text NOT NULL DEFAULT 'active'
                      CHECK (status = ANY ('{active,completed,failed,cancelled}'::text[])),
    completed_by      text COLLATE "C",
    created_at        timestamptz NOT NULL DEFAULT now(),
    completed_at      timestamptz,
    PRIMARY KEY (job_id, stage),
    CHECK (open_shards BETWEEN 0 AND shards)
);

-- A stage's task counters, split over its shards: open (queued or running) tasks, completed tasks
-- and their claim-to-completion seconds summed (with completed_count: the mean).
CREATE TABLE stageflow.stage_shards (
    job_id            text COLLATE "C" NOT NULL,
    stage             int NOT NULL,
    shard             int NOT NULL,
    remaining_tasks   stageflow.tally NOT NULL,
    -- tasks counted here that stopped running (completed, failed, released, cancelled, re-queued):
    -- a stage's running tasks are the tasks its claims started (stage_claims) minus these.
    stopped_tasks     stageflow.tally NOT NULL DEFAULT 0,
    completed_count   int NOT NULL DEFAULT 0,
    completed_seconds double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, stage, shard),
    FOREIGN KEY (job_id, stage) REFERENCES stageflow.stages (job_id, stage) ON DELETE CASCADE
);

-- The tasks of a stage that each session's claims started (queued -> running), one row per stage
-- and session (its backend's pid): a claim adds to its own row, which no other session writes, so
-- claims never wait for one another or for a completion here. No foreign key (a referential
-- check would lock the stage row, which completions hold); retention deletes the rows with their
-- job.
CREATE TABLE stageflow.stage_claims (
    job_id   text COLLATE "C" NOT NULL,
    stage    int NOT NULL,
    session  int NOT NULL,
    started  stageflow.big_tally NOT NULL,
    PRIMARY KEY (job_id, stage, session)
);

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

-- A task: one unit of work of a stage. task_id = <16 hex of job id>-s<stage>-<key>.
CREATE TABLE stageflow.tasks (
    -- What the task is (written when it is created).
    task_id           text COLLATE "C" PRIMARY KEY,
    job_id            text COLLATE "C" NOT NULL,
    stage             int NOT NULL,
    ordinal           int NOT NULL,
    max_attempts      int NOT NULL,
    -- The task's current message: the delivery hint. The task row, not the message, decides
    -- whether the task may be claimed; a message that is not this one is stray.
    msg_id            bigint NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    task_key          text NOT NULL,
    -- the task's own params ('{}' for a count task: its {"index"} is made when read, _task_params)
    params            jsonb NOT NULL DEFAULT '{}',
    predecessor_id    text COLLATE "C",
    inputs            jsonb,
    -- What a failure writes.
    error             jsonb,
    errors            jsonb NOT NULL DEFAULT '[]',
    -- when the task became a dead letter (ended failed or dead); NULL otherwise (retry_job clears it)
    failed_at         timestamptz,
    -- What claims and completions change, last and together: an update's WAL record carries the
    -- new version from its first changed byte to its last (PostgreSQL logs the prefix and suffix
    -- it shares with the old version as lengths), so they log these columns and nothing before.
    -- The fencing token of the task's current (or last) lease: every claim adds one, nothing
    -- else changes it. A report naming another token comes from a lease that is over. A task
    -- starts from stageflow.lease_token_floor: above every token of the tasks retention deleted,
    -- whose ids a job submitted again takes anew.
    lease_token       bigint NOT NULL DEFAULT 0,
    attempt           int NOT NULL DEFAULT 0,
    status            stageflow.task_status NOT NULL DEFAULT 'queued',
    lease_expires_at  timestamptz,
    claimed_at        timestamptz,
    started_at        timestamptz,
    next_attempt_at   timestamptz,
    completed_at      timestamptz,
    worker_id         text,
    result            jsonb
)
-- Room on every page for the new versions of its rows' claims and completions: with no index on
-- a column they change, both are HOT updates (the new version on the same page, no index entries).
-- Eight sessions claiming neighbouring tasks keep a page pinned, and a page is pruned only when no
-- other session holds it, so the room must hold two new versions per row, a page a third full:
-- with 70 %, a quarter of one-at-a-time updates went to another page (a lock, two index entries,
-- and a full-page image of each index page they touched after a checkpoint); with 50 %, 1.6 %,
-- which still cost 112 of 1,413 bytes of WAL per task; with 35 %, 0.1 % one at a time but 9 % in
-- batches of 100 (1,080-1,100 bytes per task); with 30 %, none (898).
-- The rows take more pages, but a full-page image leaves out the page's free space, and a
-- fan-out's INSERT costs the same (2.41 s for 1,000,000 rows at 70 %, 2.47 s at 100 %).
WITH (fillfactor = 30);
-- No foreign key to stages: fan-out inserts up to a million rows at once and a per-row
-- referential check would dominate it. Only stageflow's functions write tasks, always with
-- their stage row in the same transaction.
-- Set-based reads of one stage (lineage, fan-in, job result, job_tasks) in task order. The job is
-- named by a 64-bit hash of its id rather than the 64-character id itself: an entry of 24 bytes
-- instead of 88 (a million-task stage: 32 MB of index instead of 105, and 73 bytes less WAL per
-- task created). Every read through it compares both, the hash for the index and the id for the
-- answer (stageflow._is_task_of_job): a hash shared by two jobs only costs the rows it reads.
-- (A built-in function: no index or default here uses one of the extension's, which its upgrade
-- scripts drop and create again.)
CREATE INDEX tasks_stage_idx ON stageflow.tasks (pg_catalog.hashtextextended(job_id, 0), stage, ordinal);
-- No index names a column that a claim or a completion changes (status, attempt, lease, worker,
-- times, result): both update the task row in place (HOT), writing no index entries. What the
-- engine once found through partial indexes on the status it finds elsewhere: running tasks are
-- counted (stage_claims, stage_shards.stopped_tasks); an expired last attempt by the note its
-- claim left (last_attempt_leases); due retries and other expired leases are messages whose
-- visibility time has come (claims read them); dead letters by failed_at, which only a task's
-- failure sets.
CREATE INDEX tasks_dead_letter_idx ON stageflow.tasks (failed_at DESC) WHERE failed_at IS NOT NULL;

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

-- A claim of a task's last attempt leaves a note of its lease here; maintenance dead-letters the
-- task when the lease has expired with the task still running on it (whether or not any worker
-- reads the queue), and drops notes that no longer describe the task's lease (completed, failed,
-- released, re-claimed) or follows a heartbeat's extension. Only last attempts write here, so
-- the claims and completions of earlier attempts stay HOT updates of the task row alone.
CREATE TABLE stageflow.last_attempt_leases (
    task_id      text COLLATE "C" NOT NULL,
    lease_token  bigint NOT NULL,
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (task_id, lease_token)
);
CREATE INDEX last_attempt_leases_expiry_idx ON stageflow.last_attempt_leases (expires_at);

-- The outbox: one row per state change of a job or stage and per task failure, written in the
-- transaction that made the change (and announced with NOTIFY stageflow_events). Webhooks and
-- dashboards read it. Task completions are counted on their stage row, not written here.
CREATE TABLE stageflow.events (
    event_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id      text COLLATE "C" NOT NULL,
    stage       int,
    task_id     text COLLATE "C",
    kind        text NOT NULL,
    payload     jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_job_idx ON stageflow.events (job_id, event_id);

-- Which roles may claim tasks from which queue (stageflow.grant_queue / revoke_queue). A role may
-- claim from a queue granted to it or to a role it is a member of; superusers and members of
-- stageflow_admin from every queue; any other role from none.
CREATE TABLE stageflow.queue_grants (
    queue       text NOT NULL,
    role_name   name NOT NULL,
    granted_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, role_name)
);

-- A login's quotas (stageflow.set_quota); a NULL limit, or a login without a row, has the default
-- (the settings stageflow.max_open_tasks and stageflow.max_tasks_per_job).
CREATE TABLE stageflow.role_quotas (
    role_name          name PRIMARY KEY,
    max_open_tasks     bigint CHECK (max_open_tasks >= 0),
    max_tasks_per_job  bigint CHECK (max_tasks_per_job >= 0),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

-- One row per login and tenant label ('' for none) that has submitted: every submission updates
-- its row first and holds it to its commit, so a login's submissions under one label are
-- serialised around the open-task quota check (and, under REPEATABLE READ, one that started
-- before another committed fails with 40001 instead of counting from an old snapshot).
CREATE TABLE stageflow.admissions (
    owner              name NOT NULL,
    tenant             text NOT NULL DEFAULT '',
    submissions        bigint NOT NULL DEFAULT 1,
    last_submitted_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, tenant)
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

-- Where maintenance's reconciler left off in its walk over the tasks (name 'tasks', a task_id)
-- and over each queue's messages (name 'queue:<queue>', a msg_id): each round looks at the next
-- max_rows of them, so a full pass is bounded per round whatever the tables' sizes.
CREATE TABLE stageflow.maintenance_cursors (
    name      text PRIMARY KEY,
    position  text NOT NULL
);

-- pg_dump keeps the engine's state with the extension (the built-in job types come with it).
SELECT pg_catalog.pg_extension_config_dump('stageflow.job_types', $$WHERE name <> 'hello_world'$$);
SELECT pg_catalog.pg_extension_config_dump('stageflow.jobs', '');
SELECT pg_catalog.pg_extension_config_dump('stageflow.stages', '');
SELECT pg_catalog.pg_extension_config_dump('stageflow.stage_shards', '');
SELECT pg_catalog.pg_extension_config_dump('stageflow.stage_claims', '');
SELECT pg_catalog.pg_extension_config_dump('stageflow.last_attempt_leases', '');
SELECT pg_catalog.pg_extension_config_dump('stageflow.tasks', '');
SELECT pg_catalog.pg_extension_config_dump('stageflow.events', '');
-- (and the identity's sequence: restored rows keep their ids, new ones must not reuse them)
SELECT pg_catalog.pg_extension_config_dump('stageflow.events_event_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('stageflow.maintenance_cursors', '');
SELECT pg_catalog.pg_extension_config_dump('stageflow.message_windows', '');
SELECT pg_catalog.pg_extension_config_dump('stageflow.lease_token_floor', '');
SELECT pg_catalog.pg_extension_config_dump('stageflow.lease_token_floor_note_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('stageflow.queue_grants', '');
SELECT pg_catalog.pg_extension_config_dump('stageflow.role_quotas', '');
SELECT pg_catalog.pg_extension_config_dump('stageflow.admissions', '');
