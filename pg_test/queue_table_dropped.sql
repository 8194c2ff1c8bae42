-- A queue pgmq still lists whose table was dropped outside pgmq: a claim says so (42P01, with a
-- hint), rather than reading it as empty while its tasks wait unseen (found by review: the read
-- that reads a queue pgmq does not have as empty took it for one, bench/README.md, nineteenth
-- pass). Once the queue is gone from pgmq.meta too, a job type's queue is made again by a claim.
SELECT stageflow.register_job_type('dropped', $$
{"stages": [{"name": "s", "handler": "d.s", "queue": "dropped_q", "fan_out": "count", "param": "n"}]}
$$);
SELECT stageflow.submit_job('dropped', '{"n": 3}') IS NOT NULL AS submitted;
-- (this session's read remembers the table first)
SELECT count(*) = 1 AS claimed FROM stageflow.claim_tasks('dropped_q', 1, 60, 'w');
DROP TABLE pgmq.q_dropped_q;
DO $$
DECLARE
    v_state text;
    v_message text;
    v_hint text;
BEGIN
    BEGIN
        PERFORM stageflow.claim_tasks('dropped_q', 1, 60, 'w');
        RAISE EXCEPTION 'a claim from a queue whose table was dropped must fail';
    EXCEPTION WHEN undefined_table THEN
        GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_message = MESSAGE_TEXT, v_hint = PG_EXCEPTION_HINT;
    END;
    ASSERT v_state = '42P01', v_state;
    ASSERT v_message = 'queue ''dropped_q'' has no table pgmq.q_dropped_q', v_message;
    ASSERT v_hint LIKE 'the table was dropped outside pgmq, which still lists the queue: DELETE FROM pgmq.meta WHERE queue_name = ''dropped_q''%', v_hint;
    DELETE FROM pgmq.meta WHERE queue_name = 'dropped_q';
    ASSERT (SELECT count(*) FROM stageflow.claim_tasks('dropped_q', 1, 60, 'w')) = 0,
        'the job type''s queue is made again, empty (the reconciler sends the open tasks their messages)';
    ASSERT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = 'dropped_q');
    ASSERT to_regclass('pgmq.q_dropped_q') IS NOT NULL;
END $$;
