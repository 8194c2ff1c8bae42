-- The outbox (the table stageflow.events, sql/0010_tables.sql): every change of a job's or stage's
-- state and every task failure, retry, dead letter and release is written here by the transaction
-- that makes it, and a job's end queues its webhook delivery (sql/0870_webhooks.sql).

-- Writes an event to the outbox and announces it on the channel stageflow_events with
-- {"event_id", "job_id", "kind"}.
CREATE FUNCTION stageflow._emit(p_job_id text, p_kind text, p_payload jsonb DEFAULT '{}',
                                p_stage int DEFAULT NULL, p_task_id text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_event_id bigint;
BEGIN
    INSERT INTO stageflow.events (job_id, stage, task_id, kind, payload, created_at)
    VALUES (p_job_id, p_stage, p_task_id, p_kind, p_payload, stageflow.now())
    RETURNING event_id INTO v_event_id;
    -- A job's end (kind job_<status>, a status it ended in):
    IF left(p_kind, 4) = 'job_' AND stageflow._job_has_ended(substr(p_kind, 5)) THEN
        PERFORM stageflow._queue_webhook(v_event_id, p_job_id, p_kind);
    END IF;
    PERFORM pg_notify('stageflow_events',
                      jsonb_build_object('event_id', v_event_id, 'job_id', p_job_id, 'kind', p_kind)::text);
END;
$$;
