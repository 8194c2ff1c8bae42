-- Webhooks: when a job ends (completed, completed_with_errors, failed, cancelled) and it names a
-- webhook_url (its submission's, else its job type's), the event's transaction also queues a
-- delivery. A dispatcher (`stageflow serve`) claims due deliveries, POSTs them, and records every
-- attempt; the database decides nothing but what is due.
CREATE TABLE stageflow.webhook_deliveries (
    delivery_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id         bigint NOT NULL,
    job_id           text COLLATE "C" NOT NULL,
    url              text NOT NULL,
    payload          jsonb NOT NULL,
    status           text NOT NULL DEFAULT 'pending' CHECK (status = ANY ('{pending,delivered,failed}'::text[])),
    attempts         int NOT NULL DEFAULT 0,
    attempt_log      jsonb NOT NULL DEFAULT '[]',
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    -- The signing secret of the registered endpoint the job named (NULL: a URL, signed with the
    -- dispatcher's own secret). Never shown by webhook_deliveries().
    secret           text
);
CREATE INDEX webhook_deliveries_due_idx ON stageflow.webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_job_idx ON stageflow.webhook_deliveries (job_id);
SELECT pg_catalog.pg_extension_config_dump('stageflow.webhook_deliveries', '');
SELECT pg_catalog.pg_extension_config_dump('stageflow.webhook_deliveries_delivery_id_seq', '');

-- Registered webhook endpoints: a login's (and tenant label's) named receivers, each with a
-- signing secret of its own (Standard Webhooks' whsec_<base64 of 32 random bytes>), shown once
-- when it is registered. A submission names one with webhook_url => 'endpoint:<name>'.
CREATE TABLE stageflow.webhook_endpoints (
    owner       name NOT NULL,
    tenant      text NOT NULL DEFAULT '',
    name        text NOT NULL,
    url         text NOT NULL,
    secret      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, tenant, name)
);
SELECT pg_catalog.pg_extension_config_dump('stageflow.webhook_endpoints', '');

-- Raises 22023 unless p_url is an http(s) URL of at most 2048 characters (p_what: what the caller
-- calls it, for the message): the one rule for a submission's webhook_url and an endpoint's url.
CREATE FUNCTION stageflow._check_webhook_url(p_url text, p_what text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- (raising is its whole effect: VOLATILE, as _raise_refusal)
    -- @plpgsql_check_options: performance_warnings = false
    IF p_url IS NULL OR p_url !~ '^https?://\S+$' OR length(p_url) > 2048 THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('%s %L is not an http(s) URL of at most 2048 characters', p_what, p_url),
            HINT = 'give a URL like https://example.org/hooks/stageflow (a submission may name a registered endpoint '
                   'instead: endpoint:<name>)';
    END IF;
END;
$$;

-- The endpoint a webhook_url of the form endpoint:<name> names, for this owner and tenant label
-- (NULL: no such endpoint).
CREATE FUNCTION stageflow._webhook_endpoint(p_url text, p_owner name, p_tenant text)
RETURNS stageflow.webhook_endpoints
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT e FROM stageflow.webhook_endpoints AS e
     WHERE e.owner = p_owner AND e.tenant = coalesce(p_tenant, '') AND e.name = substr(p_url, length('endpoint:') + 1)
$$;

-- Registers (or replaces) the caller's endpoint `name` (its login's, under its tenant label) at
-- `url` with a new signing secret, and returns the secret: the only time it is shown. Registering
-- a name again rotates its secret.
CREATE FUNCTION stageflow.register_webhook_endpoint(name text, url text)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_secret text := 'whsec_' || encode(decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'), 'base64');
BEGIN
    IF register_webhook_endpoint.name IS NULL OR register_webhook_endpoint.name !~ '^[a-z0-9][a-z0-9_-]{0,62}$' THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('webhook endpoint name %L is not 1 to 63 lowercase letters, digits, _ or -', register_webhook_endpoint.name),
            HINT = 'name it like orders-prod';
    END IF;
    PERFORM stageflow._check_webhook_url(register_webhook_endpoint.url, 'webhook endpoint url');
    INSERT INTO stageflow.webhook_endpoints AS e (owner, tenant, name, url, secret, created_at)
    VALUES (session_user, coalesce(stageflow._tenant(), ''), register_webhook_endpoint.name, register_webhook_endpoint.url,
            v_secret, stageflow.now())
    ON CONFLICT ON CONSTRAINT webhook_endpoints_pkey
    DO UPDATE SET url = excluded.url, secret = excluded.secret, created_at = excluded.created_at;
    RETURN v_secret;
END;
$$;

-- The caller's endpoints (its login's, under its tenant label), without their secrets.
CREATE FUNCTION stageflow.webhook_endpoints()
RETURNS TABLE (name text, url text, created_at timestamptz)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT e.name, e.url, e.created_at FROM stageflow.webhook_endpoints AS e
     WHERE e.owner = session_user AND e.tenant = coalesce(stageflow._tenant(), '')
     ORDER BY e.name
$$;

-- Drops the caller's endpoint `name`; whether there was one. A job that names it gets no delivery
-- (its delivery is recorded as failed, saying why).
CREATE FUNCTION stageflow.drop_webhook_endpoint(name text)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM stageflow.webhook_endpoints AS e
     WHERE e.owner = session_user AND e.tenant = coalesce(stageflow._tenant(), '') AND e.name = drop_webhook_endpoint.name;
    RETURN FOUND;
END;
$$;

-- Queues a delivery for a job's terminal event when the job names a webhook.
CREATE FUNCTION stageflow._queue_webhook(p_event_id bigint, p_job_id text, p_kind text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job stageflow.jobs;
    v_url text;
    v_endpoint stageflow.webhook_endpoints;
    v_dropped boolean := false;
BEGIN
    SELECT * INTO STRICT v_job FROM stageflow.jobs AS j WHERE j.job_id = p_job_id;
    v_url := coalesce(v_job.webhook_url, v_job.definition ->> 'webhook_url');
    IF v_url IS NULL THEN
        RETURN;
    END IF;
    IF v_url LIKE 'endpoint:%' THEN
        v_endpoint := stageflow._webhook_endpoint(v_url, v_job.owner, v_job.tenant);
        -- Dropped since the submission: recorded as failed, saying so, and not sent.
        v_dropped := v_endpoint.name IS NULL;
    END IF;
    INSERT INTO stageflow.webhook_deliveries (event_id, job_id, url, payload, status, attempt_log, next_attempt_at,
                                              created_at, secret)
    VALUES (p_event_id, p_job_id, coalesce(v_endpoint.url, v_url),
            jsonb_build_object('event_id', p_event_id, 'event', p_kind, 'job', stageflow._job_status(v_job)),
            CASE WHEN v_dropped THEN 'failed' ELSE 'pending' END,
            CASE WHEN v_dropped THEN jsonb_build_array(jsonb_build_object(
                'attempt', 0, 'at', stageflow.now(), 'error', format('the webhook endpoint %s was dropped', v_url)))
                 ELSE '[]' END,
            stageflow.now(), stageflow.now(), v_endpoint.secret);
END;
$$;

-- Claims up to max_rows due deliveries for lease_seconds (they are not due again before), counting
-- the attempt. Deliveries claimed by another dispatcher are skipped. secret: the registered
-- endpoint's signing secret (NULL: sign with the dispatcher's own).
CREATE FUNCTION stageflow.claim_webhook_deliveries(max_rows int DEFAULT 10, lease_seconds int DEFAULT 30)
RETURNS TABLE (delivery_id bigint, job_id text, url text, payload jsonb, attempts int, secret text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF claim_webhook_deliveries.max_rows IS NULL OR claim_webhook_deliveries.max_rows NOT BETWEEN 1 AND 1000
       OR claim_webhook_deliveries.lease_seconds IS NULL OR claim_webhook_deliveries.lease_seconds NOT BETWEEN 1 AND 3600 THEN
        RAISE EXCEPTION USING
            ERRCODE = '22023',
            MESSAGE = format('max_rows must be 1 to 1000 and lease_seconds 1 to 3600, got %s and %s',
                             claim_webhook_deliveries.max_rows, claim_webhook_deliveries.lease_seconds),
            HINT = 'claim deliveries in small batches with a lease longer than a POST takes';
    END IF;
    RETURN QUERY
    UPDATE stageflow.webhook_deliveries AS d
       SET attempts = d.attempts + 1,
           next_attempt_at = stageflow.now() + make_interval(secs => claim_webhook_deliveries.lease_seconds)
     -- (picked once, as an array: `IN (SELECT ... LIMIT ... FOR UPDATE SKIP LOCKED)` as the inner
     -- side of a nested loop ran again for each row, skipped the ones updated and took more,
     -- pg_test/bounded_batches.sql)
     WHERE d.delivery_id = ANY (ARRAY(SELECT w.delivery_id FROM stageflow.webhook_deliveries AS w
                                       WHERE w.status = 'pending' AND w.next_attempt_at <= stageflow.now()
                                       ORDER BY w.next_attempt_at
                                       LIMIT claim_webhook_deliveries.max_rows
                                         FOR UPDATE SKIP LOCKED))
    RETURNING d.delivery_id, d.job_id, d.url, d.payload, d.attempts, d.secret;
END;
$$;

-- Records an attempt: delivered, or failed with the status code and error seen, then retried after
-- retry_in_seconds or, when that is NULL, given up (status failed).
CREATE FUNCTION stageflow.record_webhook_attempt(delivery_id bigint, delivered boolean, status_code int DEFAULT NULL,
                                                 error text DEFAULT NULL, retry_in_seconds numeric DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_row stageflow.webhook_deliveries;
BEGIN
    UPDATE stageflow.webhook_deliveries AS d
       SET status = CASE WHEN record_webhook_attempt.delivered THEN 'delivered'
                         WHEN record_webhook_attempt.retry_in_seconds IS NULL THEN 'failed'
                         ELSE 'pending' END,
           delivered_at = CASE WHEN record_webhook_attempt.delivered THEN stageflow.now() END,
           next_attempt_at = stageflow.now() + make_interval(secs => coalesce(record_webhook_attempt.retry_in_seconds, 0)),
           attempt_log = d.attempt_log || jsonb_build_array(jsonb_build_object(
               'attempt', d.attempts, 'at', stageflow.now(), 'status_code', record_webhook_attempt.status_code,
               'error', record_webhook_attempt.error))
     WHERE d.delivery_id = record_webhook_attempt.delivery_id AND d.status = 'pending'
    RETURNING * INTO v_row;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING
            ERRCODE = '42704',
            MESSAGE = format('no pending webhook delivery %s', record_webhook_attempt.delivery_id),
            HINT = 'deliveries come from stageflow.claim_webhook_deliveries';
    END IF;
    RETURN jsonb_build_object('delivery_id', v_row.delivery_id, 'status', v_row.status, 'attempts', v_row.attempts);
END;
$$;

-- A job's webhook deliveries with their attempts (for those who see the job, as job_status: the
-- URLs often carry secrets).
CREATE FUNCTION stageflow.webhook_deliveries(job_id text)
RETURNS TABLE (delivery_id bigint, url text, status text, attempts int, attempt_log jsonb, created_at timestamptz,
               delivered_at timestamptz)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM stageflow._visible_job(webhook_deliveries.job_id);
    RETURN QUERY
    SELECT d.delivery_id, d.url, d.status, d.attempts, d.attempt_log, d.created_at, d.delivered_at
      FROM stageflow.webhook_deliveries AS d
     WHERE d.job_id = webhook_deliveries.job_id
     ORDER BY d.delivery_id;
END;
$$;
