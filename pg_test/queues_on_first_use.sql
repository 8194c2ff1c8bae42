-- Queues are made on first use, and the reconciler mends each queue's tasks only. CREATE EXTENSION
-- makes no pgmq queue (a pg_restore runs it, then restores every queue with its messages); the
-- built-in hello_world's `default` queue appears when a claim, a grant or a stage needs it. Every
-- queue numbers its messages from 1, so a task of one queue and a task of another can share a
-- msg_id: a message missing from one queue is sent again for that queue's task, never for the
-- other's (it was: both were re-sent, the other into the wrong queue).
-- A login the queue is not granted to is refused before anything is made: no catalog row is
-- written, not even one rolled back with the refusal (counted in this transaction's statistics).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'first_use_worker') THEN
        CREATE ROLE first_use_worker LOGIN IN ROLE stageflow_worker;
    END IF;
END;
$$;
SET SESSION AUTHORIZATION first_use_worker;
DO $$
DECLARE
    v_before bigint := (SELECT n_tup_ins FROM pg_stat_xact_sys_tables WHERE relname = 'pg_class');
BEGIN
    BEGIN
        PERFORM stageflow.claim_tasks('default', 1, 60, 'w');
        RAISE EXCEPTION 'claimed from a queue not granted';
    EXCEPTION WHEN SQLSTATE '42501' THEN
        NULL;
    END;
    ASSERT (SELECT n_tup_ins FROM pg_stat_xact_sys_tables WHERE relname = 'pg_class') = v_before,
           'the refused claim made no queue';
END;
$$;
RESET SESSION AUTHORIZATION;

DO $$
BEGIN
    ASSERT NOT EXISTS (SELECT 1 FROM pgmq.meta), 'CREATE EXTENSION made no queue';
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.claim_tasks('default', 1, 60, 'w')), 'an empty claim';
    ASSERT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = 'default'), 'the claim made hello_world''s queue';
END;
$$;

-- A queue no job type names is still unknown.
DO $$
BEGIN
    PERFORM stageflow.claim_tasks('nobody_names_this', 1, 60, 'w');
    RAISE EXCEPTION 'claimed from an unknown queue';
EXCEPTION WHEN SQLSTATE '42704' THEN
    ASSERT NOT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = 'nobody_names_this');
END;
$$;

SELECT stageflow.register_job_type('left_q', $$
{"stages": [{"name": "s", "handler": "m.s", "queue": "left_q", "fan_out": "count", "param": "n"}]}
$$);
SELECT stageflow.register_job_type('right_q', $$
{"stages": [{"name": "s", "handler": "m.s", "queue": "right_q", "fan_out": "count", "param": "n"}]}
$$);

SET stageflow.fake_now = '2030-01-01 00:00:00+00';
CREATE TEMP TABLE job AS
SELECT stageflow.submit_job('left_q', '{"n": 1}') AS left_id, stageflow.submit_job('right_q', '{"n": 1}') AS right_id;

DO $$
DECLARE
    v_left   text := left((SELECT left_id FROM job), 16) || '-s1-0';
    v_right  text := left((SELECT right_id FROM job), 16) || '-s1-0';
    v_report jsonb;
BEGIN
    ASSERT (SELECT msg_id FROM stageflow.tasks WHERE task_id = v_left) = (SELECT msg_id FROM stageflow.tasks WHERE task_id = v_right),
           'both queues gave their first task message 1';
    -- The left queue's message is lost; the right one's is there.
    PERFORM pgmq.delete('left_q', (SELECT msg_id FROM stageflow.tasks WHERE task_id = v_left));
    v_report := stageflow.run_maintenance();
    ASSERT (v_report ->> 'messages_resent')::int = 1 AND (v_report ->> 'errors')::int = 0, v_report::text;
    ASSERT (SELECT count(*) FROM pgmq.q_left_q) = 1 AND (SELECT count(*) FROM pgmq.q_right_q) = 1,
           'one message in each queue';
    ASSERT EXISTS (SELECT 1 FROM pgmq.q_left_q AS q JOIN stageflow.tasks AS t ON t.msg_id = q.msg_id WHERE t.task_id = v_left);
    ASSERT EXISTS (SELECT 1 FROM pgmq.q_right_q AS q JOIN stageflow.tasks AS t ON t.msg_id = q.msg_id WHERE t.task_id = v_right),
           'the right queue''s task keeps its own message';

    -- A queue dropped under open tasks (a DBA, a partial restore) comes back with their messages.
    PERFORM pgmq.drop_queue('right_q');
    v_report := stageflow.run_maintenance();
    ASSERT (v_report ->> 'messages_resent')::int = 1 AND (v_report ->> 'errors')::int = 0, v_report::text;
    ASSERT EXISTS (SELECT 1 FROM pgmq.q_right_q AS q JOIN stageflow.tasks AS t ON t.msg_id = q.msg_id WHERE t.task_id = v_right);
END;
$$;

-- A queue Stageflow makes has no index on vt and fillfactor 50 (_shape_queue: a claim's read of a
-- message is a HOT update); a table it cannot shape is left as it is, without an error
-- (shape_queues goes through every queue the job types name): a partitioned one, as pgmq makes
-- with pg_partman, or none at all. Of a queue made by pgmq.create, only pgmq's own index on vt
-- goes: an index of the DBA's that holds vt among other columns stays, and so does a fillfactor
-- the DBA set.
DO $$
BEGIN
    ASSERT (SELECT c.reloptions FROM pg_class AS c WHERE c.oid = 'pgmq.q_default'::regclass) = '{fillfactor=50}',
           'the default queue''s table has fillfactor 50';
    ASSERT NOT EXISTS (SELECT 1 FROM pg_indexes AS x WHERE x.schemaname = 'pgmq' AND x.tablename = 'q_default'
                                                        AND x.indexdef LIKE '%(vt)%'),
           'the default queue has no index on vt';
    CREATE TABLE pgmq.q_shape_parted (msg_id bigint, vt timestamptz NOT NULL) PARTITION BY RANGE (msg_id);
    CREATE INDEX q_shape_parted_vt_idx ON pgmq.q_shape_parted (vt);
    PERFORM stageflow._shape_queue('shape_parted');
    ASSERT EXISTS (SELECT 1 FROM pg_class AS c WHERE c.relname = 'q_shape_parted_vt_idx'), 'a partitioned queue keeps its index';
    ASSERT NOT stageflow._shape_queue('shape_missing');
    DROP TABLE pgmq.q_shape_parted;

    PERFORM pgmq.create('shape_own');
    CREATE INDEX q_shape_own_vt_msg_idx ON pgmq.q_shape_own (vt, msg_id);
    ALTER TABLE pgmq.q_shape_own SET (fillfactor = 70);
    ASSERT stageflow._shape_queue('shape_own', true);
    ASSERT (SELECT array_agg(x.indexname::text ORDER BY x.indexname) FROM pg_indexes AS x
             WHERE x.schemaname = 'pgmq' AND x.tablename = 'q_shape_own') = '{q_shape_own_pkey,q_shape_own_vt_msg_idx}',
           (SELECT array_agg(x.indexname::text ORDER BY x.indexname) FROM pg_indexes AS x
             WHERE x.schemaname = 'pgmq' AND x.tablename = 'q_shape_own')::text;
    ASSERT (SELECT c.reloptions FROM pg_class AS c WHERE c.oid = 'pgmq.q_shape_own'::regclass) = '{fillfactor=70}';
    ASSERT NOT stageflow._shape_queue('shape_own', true), 'nothing more to shape';
    PERFORM pgmq.drop_queue('shape_own');
END;
$$;
