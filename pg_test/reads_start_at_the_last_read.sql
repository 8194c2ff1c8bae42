-- A claim reads its queue from the first message its session's last read of that queue took
-- (src/queues.rs): the messages deleted below it since the last VACUUM are not walked again. A
-- message that becomes visible again below it (here an expired lease) is still delivered: when
-- the messages from there on run out, or a second after the session last looked at the whole
-- queue, the read looks at the whole queue.
SELECT stageflow.register_job_type('reads', $$
{"retry": {"max_attempts": 3}, "stages": [{"name": "s", "handler": "r.s", "queue": "reads", "fan_out": "count", "param": "n"}]}
$$);
SET stageflow.fake_now = '2030-01-01 00:00:00+00';
CREATE TEMP TABLE job AS SELECT stageflow.submit_job('reads', '{"n": 5}') AS id;
DO $$ BEGIN
    ASSERT (SELECT array_agg(c.task_key) FROM stageflow.claim_tasks('reads', 1, 1, 'w') AS c) = ARRAY['0'];
    ASSERT (SELECT array_agg(c.task_key ORDER BY c.task_key) FROM stageflow.claim_tasks('reads', 2, 300, 'w') AS c) = ARRAY['1', '2'];
END $$;
-- Task 0's lease (1 s) is over: its message is visible again, below where this session reads.
SET stageflow.fake_now = '2030-01-01 00:00:10+00';
DO $$ BEGIN
    ASSERT (SELECT array_agg(c.task_key) FROM stageflow.claim_tasks('reads', 1, 300, 'w') AS c) = ARRAY['3'],
        'the read starts at the first message the last one took (key 1): key 3 is the first visible from there';
    ASSERT (SELECT array_agg(c.task_key) FROM stageflow.claim_tasks('reads', 1, 300, 'w') AS c) = ARRAY['4'];
    ASSERT (SELECT array_agg(c.task_key || ':' || c.attempt || ':' || c.lease_token) FROM stageflow.claim_tasks('reads', 1, 300, 'w') AS c)
           = ARRAY['0:2:2'],
        'the messages from there on ran out: the whole queue is read, and the expired lease is claimed again';
    ASSERT NOT EXISTS (SELECT FROM stageflow.claim_tasks('reads', 5, 300, 'w')), 'nothing else is visible';
END $$;
-- Another session's read, and this one's after a second, look at the whole queue.
SET stageflow.fake_now = '2030-01-01 00:10:00+00';
SELECT pg_sleep(1.1);
DO $$ BEGIN
    ASSERT (SELECT array_agg(c.task_key ORDER BY c.task_key) FROM stageflow.claim_tasks('reads', 2, 300, 'w') AS c) = ARRAY['0', '1'],
        'a second after its last look at the whole queue, the read starts from the lowest message again';
END $$;
