-- A claim reads its queue from the first message its backend's last read of that queue took
-- (src/queues.rs): the messages deleted below it since the last VACUUM are not walked again. A
-- message that becomes visible again below it (here a released task) is still delivered: when the
-- messages from there on run out, or once a second has passed on the engine's clock since the
-- backend last looked at the whole queue.
SELECT stageflow.register_job_type('reads', $$
{"stages": [{"name": "s", "handler": "r.s", "queue": "reads", "fan_out": "count", "param": "n"}]}
$$);
SET stageflow.fake_now = '2030-01-01 00:00:00+00';
CREATE TEMP TABLE job AS SELECT stageflow.submit_job('reads', '{"n": 7}') AS id;
CREATE FUNCTION pg_temp.take(p_max int) RETURNS text[] LANGUAGE sql AS $$
    SELECT array_agg(c.task_key ORDER BY c.task_key) FROM stageflow.claim_tasks('reads', p_max, 300, 'w') AS c
$$;
CREATE FUNCTION pg_temp.hand_back(p_key text) RETURNS int LANGUAGE sql AS $$
    SELECT stageflow.release_tasks(ARRAY[t.task_id], 'w') FROM stageflow.tasks AS t
     WHERE t.job_id = (SELECT id FROM job) AND t.task_key = p_key
$$;
DO $$ BEGIN
    ASSERT pg_temp.take(1) = ARRAY['0'];          -- the first read looks at the whole queue
    ASSERT pg_temp.take(2) = ARRAY['1', '2'];
    ASSERT pg_temp.hand_back('0') = 1;            -- its message is visible again at once
    ASSERT pg_temp.take(1) = ARRAY['3'],
        'the read starts at the first message the last one took (key 1): key 3 is the first visible from there';
END $$;
SET stageflow.fake_now = '2030-01-01 00:00:00.5+00';
DO $$ BEGIN
    ASSERT pg_temp.take(1) = ARRAY['4'], 'half a second later the read still starts there';
    ASSERT pg_temp.take(1) = ARRAY['5'];
END $$;
SET stageflow.fake_now = '2030-01-01 00:00:01+00';
DO $$ BEGIN
    ASSERT pg_temp.take(1) = ARRAY['0'],
        'a second after the last look at the whole queue (engine clock), the read looks at all of it: key 0 first';
    ASSERT pg_temp.take(1) = ARRAY['6'];
    ASSERT pg_temp.hand_back('1') = 1;
    ASSERT pg_temp.take(2) = ARRAY['1'],
        'nothing is visible from key 6 on: the read looks below it, and finds the task handed back';
    ASSERT pg_temp.take(7) IS NULL, 'every task is running';
END $$;
