-- A claim's read from the first message its backend's last read took looks first at a span of
-- msg_ids past it (src/queues.rs, next_span): a B-tree scan with no end reads and checks its whole
-- leaf page. Messages beyond that span are still found: when the span held too few visible ones
-- (others' messages in flight), the read goes on past it, and the span doubles.
SELECT stageflow.register_job_type('spans', $$
{"stages": [{"name": "s", "handler": "r.s", "queue": "spans", "fan_out": "count", "param": "n"}]}
$$);
SET stageflow.fake_now = '2030-01-01 00:00:00+00';
CREATE TEMP TABLE job AS SELECT stageflow.submit_job('spans', '{"n": 200}') AS id;
CREATE FUNCTION pg_temp.take(p_max int) RETURNS int[] LANGUAGE sql AS $$
    SELECT array_agg(c.task_key::int ORDER BY c.task_key::int) FROM stageflow.claim_tasks('spans', p_max, 300, 'w') AS c
$$;
DO $$ BEGIN
    ASSERT pg_temp.take(1) = ARRAY[0];                            -- the first read looks at the whole queue
    ASSERT pg_temp.take(40) = (SELECT array_agg(i) FROM generate_series(1, 40) AS i);
    ASSERT pg_temp.take(1) = ARRAY[41],
        'the 40 messages from the last read''s first on are in flight: the read looks past its span of 17';
    ASSERT pg_temp.take(5) = ARRAY[42, 43, 44, 45, 46];
    ASSERT pg_temp.take(100) = (SELECT array_agg(i) FROM generate_series(47, 146) AS i),
        'a read of more messages than its span holds takes them all, in msg_id order from there';
    ASSERT pg_temp.take(100) = (SELECT array_agg(i) FROM generate_series(147, 199) AS i);
    ASSERT pg_temp.take(1) IS NULL, 'every task is running';
END $$;
