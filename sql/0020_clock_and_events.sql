-- The engine's clock: now(), unless the setting stageflow.fake_now holds a timestamp. Every
-- decision about time (leases, backoff, job deadlines, retention) reads it, so tests move time
-- forward with SET stageflow.fake_now instead of sleeping. pgmq's visibility timeouts run on the
-- real clock; maintenance (run_maintenance) releases what the engine's clock says is due.
-- Every name is qualified and there is no SET clause, so that PostgreSQL inlines it into the
-- statements of the hot path (a function with SET is never inlined).
CREATE FUNCTION stageflow.now()
RETURNS timestamptz
LANGUAGE sql STABLE
AS $$
    SELECT coalesce(nullif(pg_catalog.current_setting('stageflow.fake_now', true), '')::pg_catalog.timestamptz,
                    pg_catalog.now())
$$;

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
    IF p_kind IN ('job_completed', 'job_completed_with_errors', 'job_failed', 'job_cancelled') THEN
        PERFORM stageflow._queue_webhook(v_event_id, p_job_id, p_kind);
    END IF;
    PERFORM pg_notify('stageflow_events',
                      jsonb_build_object('event_id', v_event_id, 'job_id', p_job_id, 'kind', p_kind)::text);
END;
$$;

-- stageflow.job_id(job_type, params): the id submit_job gives this work (after the job type's
-- defaults are filled in). stageflow.canonical_json(value): the text job ids hash. Both hand the
-- JSON to Rust as text, so that too deep a document is an error with a SQLSTATE, not a crash.
CREATE FUNCTION stageflow.job_id(job_type text, params jsonb)
RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN stageflow._job_id(job_id.job_type, job_id.params::text);
END;
$$;

CREATE FUNCTION stageflow.canonical_json(value jsonb)
RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN stageflow._canonical_json(canonical_json.value::text);
END;
$$;

-- Raises 42704 for an unknown job or task (p_kind 'job' or 'task'), with a hint about what the ids
-- look like: the one wording of these errors.
CREATE FUNCTION stageflow._raise_unknown(p_kind text, p_id text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = '42704',
        MESSAGE = format('unknown %s %L', p_kind, p_id),
        HINT = CASE p_kind
                   WHEN 'job' THEN 'job ids are the 64 hex digits returned by stageflow.submit_job'
                   ELSE 'task ids come from stageflow.claim_tasks and look like <16 hex>-s<stage>-<key>'
               END;
END;
$$;

-- Raises 55000 when a worker reports a task whose current lease another worker holds.
CREATE FUNCTION stageflow._raise_foreign_lease(p_task_id text, p_holder text, p_worker_id text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = '55000',
        MESSAGE = format('task %s is leased to worker %s, not %s', p_task_id, coalesce(p_holder, '(none)'), p_worker_id),
        HINT = 'the lease expired and the task was delivered again; its new holder reports it';
END;
$$;
