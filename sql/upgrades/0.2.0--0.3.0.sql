-- What 0.2.0 -> 0.3.0 changes in the tables 0.2.0 has, written by hand; scripts/versions.py write
-- puts it into sql/stageflow--0.2.0--0.3.0.sql (see there for what runs before and after). Jobs in
-- flight keep going: no row changes.

-- tasks: more room on each page for the new versions of claims and completions (HOT updates).
-- Pages written from now on are filled to 35 %; the rows already there stay where they are.
ALTER TABLE stageflow.tasks SET (fillfactor = 35);

-- tasks_stage_idx: the job named by a 64-bit hash of its id rather than the id (24-byte entries
-- instead of 88; see 0010_tables.sql). Built again over the rows there are.
DROP INDEX stageflow.tasks_stage_idx;
CREATE INDEX tasks_stage_idx ON stageflow.tasks (pg_catalog.hashtextextended(job_id, 0), stage, ordinal);

-- @definitions
