-- Every task a fan-out creates has one message of its own: the msg_id in its row names a message
-- of its queue that carries its task_id, and messages are in task order (the n-th smallest msg_id
-- is the task of ordinal n - 1, so claims take tasks in order). A count of 1,234 (keys of 1 to 4
-- digits, whose text order is not their order), the lineage after it, and an each.
SELECT stageflow.register_job_type('counted', $$
{
  "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}},
  "stages": [
    {"name": "first",  "handler": "h", "queue": "fo", "fan_out": "count", "param": "n"},
    {"name": "second", "handler": "h", "queue": "fo2", "fan_out": "lineage"}
  ]
}
$$);
SELECT stageflow.register_job_type('listed', $$
{
  "parameters": {"type": "object", "properties": {"items": {"type": "array"}}},
  "stages": [{"name": "only", "handler": "h", "queue": "fe", "fan_out": "each", "param": "items"}]
}
$$);

-- The checks on stage p_stage of job p_job, whose messages are in pgmq.q_<p_queue>: returns its
-- task count.
CREATE FUNCTION pg_temp.check_messages(p_job text, p_stage int, p_queue text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_tasks    bigint;
    v_matched  bigint;
    v_in_order boolean;
BEGIN
    SELECT count(*) INTO v_tasks FROM stageflow.tasks AS t WHERE t.job_id = p_job AND t.stage = p_stage;
    EXECUTE format('SELECT count(*) FROM stageflow.tasks AS t JOIN pgmq.%I AS m ON m.msg_id = t.msg_id '
                   'WHERE t.job_id = $1 AND t.stage = $2 AND m.message = jsonb_build_object(''task_id'', t.task_id)',
                   pgmq.format_table_name(p_queue, 'q'))
       INTO v_matched USING p_job, p_stage;
    ASSERT v_matched = v_tasks, format('stage %s: %s of %s tasks have their own message', p_stage, v_matched, v_tasks);
    SELECT bool_and(o.ordinal = o.by_msg - 1) INTO v_in_order
      FROM (SELECT t.ordinal, row_number() OVER (ORDER BY t.msg_id) AS by_msg
              FROM stageflow.tasks AS t WHERE t.job_id = p_job AND t.stage = p_stage) AS o;
    ASSERT v_in_order, format('stage %s: messages in task order', p_stage);
    ASSERT (SELECT count(DISTINCT t.ordinal) = v_tasks AND min(t.ordinal) = 0 AND max(t.ordinal) = v_tasks - 1
              FROM stageflow.tasks AS t WHERE t.job_id = p_job AND t.stage = p_stage),
        format('stage %s: ordinals 0 .. %s', p_stage, v_tasks - 1);
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.tasks AS t WHERE t.job_id = p_job AND t.stage = p_stage
                          AND t.task_id <> left(p_job, 16) || '-s' || p_stage || '-' || t.task_key),
        format('stage %s: task ids', p_stage);
    RETURN v_tasks;
END;
$$;

DO $$
DECLARE
    v_job     text := stageflow.submit_job('counted', '{"n": 1234}');
    v_claimed record;
    v_ids     text[];
    v_tokens  bigint[];
BEGIN
    ASSERT pg_temp.check_messages(v_job, 1, 'fo') = 1234;
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.tasks AS t WHERE t.job_id = v_job AND t.stage = 1
                          AND (t.task_key <> t.ordinal::text OR t.params <> '{}'
                               OR t.predecessor_id IS NOT NULL OR t.inputs IS NOT NULL)),
        'count: the key of each task is its ordinal, its row holds no params of its own';
    ASSERT (SELECT count(*) FROM stageflow.job_tasks(v_job, NULL, 10000) AS r
             WHERE r.stage = 1 AND r.params = jsonb_build_object('index', r.task_key::int)) = 1234,
        'count: each task''s params, as job_tasks reads them, are {"index": its ordinal}';

    -- Stage 1 completed in batches of 500: the lineage is created (its queue is another, so
    -- that this loop does not claim it).
    LOOP
        SELECT array_agg(c.task_id), array_agg(c.lease_token) INTO v_ids, v_tokens
          FROM stageflow.claim_tasks('fo', 500, 60, 'w') AS c;
        EXIT WHEN v_ids IS NULL;
        PERFORM stageflow.complete_tasks(
            (SELECT jsonb_agg(jsonb_build_object('task_id', u.id, 'lease_token', u.token, 'result', jsonb_build_object('k', u.id)))
               FROM unnest(v_ids, v_tokens) AS u(id, token)), 'w');
    END LOOP;
    ASSERT pg_temp.check_messages(v_job, 2, 'fo2') = 1234;
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.tasks AS t
                         JOIN stageflow.tasks AS p ON p.task_id = t.predecessor_id
                        WHERE t.job_id = v_job AND t.stage = 2
                          AND (p.stage <> 1 OR p.task_key <> t.task_key OR p.ordinal <> t.ordinal
                               OR t.params <> jsonb_build_object('index', p.ordinal))),
        'lineage: each task follows its predecessor: same key and ordinal, and the params it was given ({"index"} of a count task)';
    ASSERT (SELECT count(*) FROM stageflow.tasks AS t WHERE t.job_id = v_job AND t.stage = 2 AND t.predecessor_id IS NOT NULL) = 1234;
END;
$$;

DO $$
DECLARE
    v_job text := stageflow.submit_job('listed', '{"items": ["x", {"y": 1}, [2]]}');
BEGIN
    ASSERT pg_temp.check_messages(v_job, 1, 'fe') = 3;
    ASSERT (SELECT array_agg(t.params ORDER BY t.ordinal) FROM stageflow.tasks AS t WHERE t.job_id = v_job)
         = ARRAY['{"index": 0, "item": "x"}', '{"index": 1, "item": {"y": 1}}', '{"index": 2, "item": [2]}']::jsonb[],
        'each: params index and item, in array order';
END;
$$;
