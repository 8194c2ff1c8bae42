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

-- @definitions
