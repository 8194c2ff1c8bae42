-- stageflow._read_messages and _delete_messages do what pgmq.read and pgmq.delete do, with plans
-- kept per session: visible messages in msg_id order, made invisible for vt seconds with read_ct
-- and last_read_at updated; a read of more than the kept-plan size works the same; a bad queue
-- name is refused. Visibility is decided by the clock the caller passes (the engine's, in
-- claim_tasks): a read at a later instant sees messages whose vt has passed by then.
SELECT pgmq.create('qa');

DO $$
DECLARE
    v_ids bigint[];
    v_read record;
BEGIN
    PERFORM pgmq.send_batch('qa', ARRAY(SELECT jsonb_build_object('task_id', 't' || i) FROM generate_series(1, 300) AS i));
    SELECT array_agg(msg_id ORDER BY msg_id) INTO v_ids FROM pgmq.q_qa;

    -- Two reads of 2: the first four messages, in order, each once.
    ASSERT (SELECT array_agg(msg_id) FROM stageflow._read_messages('qa', 30, 2, clock_timestamp())) = v_ids[1:2];
    ASSERT (SELECT array_agg(task_id) FROM stageflow._read_messages('qa', 30, 2, clock_timestamp())) = ARRAY['t3', 't4'];
    ASSERT (SELECT count(*) FROM pgmq.q_qa WHERE read_ct = 1 AND last_read_at IS NOT NULL
                                            AND vt > clock_timestamp() + interval '25 seconds') = 4;
    -- A read of 0 reads nothing; a big read (planned each time) takes the rest but the four.
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow._read_messages('qa', 30, 0, clock_timestamp()));
    ASSERT (SELECT count(*) FROM stageflow._read_messages('qa', 30, 1000, clock_timestamp())) = 296;
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow._read_messages('qa', 30, 1, clock_timestamp())), 'nothing visible is left';

    -- By a clock 40 s ahead, the messages read for 30 s are visible again, and a read by that
    -- clock hides them until that clock + vt.
    ASSERT (SELECT count(*) FROM stageflow._read_messages('qa', 30, 1000, clock_timestamp() + interval '40 seconds')) = 300;
    ASSERT (SELECT count(*) FROM pgmq.q_qa WHERE vt > clock_timestamp() + interval '65 seconds') = 300;
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow._read_messages('qa', 30, 1, clock_timestamp() + interval '60 seconds'));
    UPDATE pgmq.q_qa SET vt = clock_timestamp() + interval '1 hour', read_ct = 1;

    -- A read with vt 0 leaves messages visible again at once (as pgmq.read does).
    PERFORM pgmq.set_vt('qa', v_ids[300], clock_timestamp() - interval '1 second');
    SELECT * INTO v_read FROM stageflow._read_messages('qa', 0, 1, clock_timestamp());
    ASSERT v_read.msg_id = v_ids[300] AND v_read.task_id = 't300', v_read::text;
    ASSERT (SELECT read_ct FROM pgmq.q_qa WHERE msg_id = v_ids[300]) = 2;

    -- Deletes: how many there were; again, none.
    ASSERT stageflow._delete_messages('qa', v_ids[1:10]) = 10;
    ASSERT stageflow._delete_messages('qa', v_ids[1:10]) = 0;
    ASSERT stageflow._delete_messages('qa', ARRAY[v_ids[11]]) = 1;
    ASSERT (SELECT count(*) FROM pgmq.q_qa) = 289;

    BEGIN
        PERFORM stageflow._read_messages('Q"; DROP TABLE x; --', 30, 1, clock_timestamp());
        RAISE EXCEPTION 'a bad queue name must be refused';
    EXCEPTION WHEN invalid_name THEN NULL;
    END;
END;
$$;

-- A queue is what pgmq.meta names, not whatever relation pgmq.q_<name> resolves to: pgmq's own
-- index and sequence of queue qa (q_qa_pkey, q_qa_vt_idx, q_qa_msg_id_seq) are unknown queues to a
-- claim, with the unknown queue's error and hint, as a name nothing answers to.
DO $$
DECLARE
    v_queue text;
    v_hint  text;
BEGIN
    ASSERT (SELECT count(*) FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
             WHERE n.nspname = 'pgmq' AND c.relname IN ('q_qa_pkey', 'q_qa_vt_idx', 'q_qa_msg_id_seq')) = 3,
        'pgmq made the index and sequence names this test uses';
    FOREACH v_queue IN ARRAY ARRAY['qa_pkey', 'qa_vt_idx', 'qa_msg_id_seq', 'no_such_queue'] LOOP
        BEGIN
            PERFORM stageflow.claim_tasks(v_queue, 1, 60, 'w');
            RAISE EXCEPTION 'claim_tasks(%) was not refused', v_queue;
        EXCEPTION WHEN undefined_object THEN
            GET STACKED DIAGNOSTICS v_hint = PG_EXCEPTION_HINT;
            ASSERT v_hint LIKE 'queues are created by stageflow.register_job_type%', v_hint;
        END;
    END LOOP;
END;
$$;
