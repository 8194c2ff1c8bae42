-- Registered webhook endpoints: a secret of their own (whsec_ + 32 random bytes), shown once,
-- rotated by registering again; a submission names one with endpoint:<name>; its deliveries go to
-- the endpoint's URL signed with its secret, which webhook_deliveries() never shows; another
-- tenant label neither sees nor uses it; a bad name, an unknown endpoint and a dropped one say so.
DO $$
DECLARE
    v_secret text;
    v_again text;
    v_job text;
    v_other text;
    v_delivery record;
    v_state text;
BEGIN
    v_secret := stageflow.register_webhook_endpoint('orders', 'https://example.org/hooks');
    ASSERT v_secret ~ '^whsec_[A-Za-z0-9+/]{43}=$', v_secret;
    ASSERT length(decode(substr(v_secret, 7), 'base64')) = 32;
    ASSERT (SELECT jsonb_agg(to_jsonb(e) - 'created_at') FROM stageflow.webhook_endpoints() AS e)
           = '[{"name": "orders", "url": "https://example.org/hooks"}]';
    v_again := stageflow.register_webhook_endpoint('orders', 'https://example.org/hooks/v2');
    ASSERT v_again <> v_secret, 'registering again rotates the secret';

    v_job := stageflow.submit_job('hello_world', '{"message": "endpoint", "n": 1}', 'endpoint:orders');
    PERFORM stageflow.cancel_job(v_job);
    SELECT * INTO STRICT v_delivery FROM stageflow.webhook_deliveries(v_job);
    ASSERT v_delivery.url = 'https://example.org/hooks/v2', v_delivery.url;
    ASSERT to_jsonb(v_delivery)::text NOT LIKE '%whsec_%', 'webhook_deliveries() shows no secret';
    ASSERT (SELECT c.secret FROM stageflow.claim_webhook_deliveries(10, 30) AS c WHERE c.job_id = v_job) = v_again,
        'the dispatcher signs with the endpoint''s current secret';

    -- Another tenant label: not its endpoint.
    PERFORM set_config('stageflow.tenant', 'globex', false);
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.webhook_endpoints());
    BEGIN
        PERFORM stageflow.submit_job('hello_world', '{"message": "not mine", "n": 1}', 'endpoint:orders');
        RAISE EXCEPTION 'another tenant used the endpoint';
    EXCEPTION WHEN undefined_object THEN
        ASSERT SQLERRM = 'unknown webhook endpoint ''orders''', SQLERRM;
    END;
    ASSERT NOT stageflow.drop_webhook_endpoint('orders'), 'nor can it drop it';
    RESET stageflow.tenant;

    BEGIN
        PERFORM stageflow.register_webhook_endpoint('Bad Name', 'https://example.org');
        RAISE EXCEPTION 'a bad name was accepted';
    EXCEPTION WHEN invalid_parameter_value THEN
        GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE;
    END;
    BEGIN
        PERFORM stageflow.register_webhook_endpoint('ok', 'ftp://example.org');
        RAISE EXCEPTION 'a URL that is not http(s) was accepted';
    EXCEPTION WHEN invalid_parameter_value THEN
        NULL;
    END;

    -- Dropped before the job ends: the delivery is recorded as failed, saying why, and not sent.
    v_other := stageflow.submit_job('hello_world', '{"message": "dropped", "n": 1}', 'endpoint:orders');
    ASSERT stageflow.drop_webhook_endpoint('orders');
    PERFORM stageflow.cancel_job(v_other);
    SELECT * INTO STRICT v_delivery FROM stageflow.webhook_deliveries(v_other);
    ASSERT v_delivery.status = 'failed' AND v_delivery.attempt_log -> 0 ->> 'error' = 'the webhook endpoint endpoint:orders was dropped',
        to_jsonb(v_delivery)::text;
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.claim_webhook_deliveries(10, 30) AS c WHERE c.job_id = v_other);
END;
$$;
