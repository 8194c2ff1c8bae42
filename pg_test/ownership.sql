-- A job belongs to the login that submitted it (and to its tenant label, if it set one). Another
-- submitter cannot read it, list it, see its webhook deliveries or cancel it: to that login the
-- job is unknown (42704), and nothing changes. Resubmitting identical work returns the same id and
-- says whether the job is yours; your own cancelled job is resumed. stageflow_admin sees all.
-- The checks are on the session's login, so the test switches it with SET SESSION AUTHORIZATION.
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['stageflow_own_alice', 'stageflow_own_bob', 'stageflow_own_ops'] LOOP
        BEGIN
            EXECUTE format('CREATE ROLE %I LOGIN', r);
        EXCEPTION WHEN duplicate_object THEN
            NULL;
        END;
    END LOOP;
END;
$$;
GRANT stageflow_submitter TO stageflow_own_alice, stageflow_own_bob;
GRANT stageflow_admin TO stageflow_own_ops;

SELECT stageflow.register_job_type('owned', $$
{"parameters": {"type": "object", "properties": {"n": {"type": "integer"}, "tag": {"type": "string"}}},
 "stages": [{"name": "s", "handler": "o.s", "queue": "owned_q", "fan_out": "count", "param": "n"}]}
$$);

SET SESSION AUTHORIZATION stageflow_own_alice;
CREATE TEMP TABLE alice_jobs AS
SELECT 'plain' AS name, o.* FROM stageflow.submit_job_outcome('owned', '{"n": 2}', 'https://alice.example/hook?secret=s3') AS o;
INSERT INTO alice_jobs SELECT 'tenant', o.* FROM stageflow.submit_job_outcome('owned', '{"n": 1, "tag": "t"}') AS o;
DO $$
BEGIN
    ASSERT (SELECT array_agg(outcome || '/' || job_status) FROM alice_jobs) = ARRAY['created/queued', 'created/queued'];
    ASSERT (stageflow.job_status((SELECT job_id FROM alice_jobs WHERE name = 'plain')) ->> 'owner') = 'stageflow_own_alice';
END;
$$;
GRANT SELECT ON alice_jobs TO PUBLIC;

SET SESSION AUTHORIZATION stageflow_own_bob;
DO $$
DECLARE
    v_job  text := (SELECT job_id FROM alice_jobs WHERE name = 'plain');
    v_call text;
    v_same record;
BEGIN
    FOREACH v_call IN ARRAY ARRAY[
        'SELECT stageflow.job_status($1)',
        'SELECT * FROM stageflow.job_tasks($1)',
        'SELECT * FROM stageflow.webhook_deliveries($1)',
        'SELECT stageflow.cancel_job($1)'] LOOP
        BEGIN
            EXECUTE v_call USING v_job;
            RAISE EXCEPTION 'bob must not reach alice''s job: %', v_call;
        EXCEPTION WHEN undefined_object THEN
            ASSERT SQLERRM = format('unknown job %L', v_job), SQLERRM;
        END;
    END LOOP;
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.list_jobs()), 'bob lists none of alice''s jobs';

    -- Identical work: the same id, not bob's.
    SELECT * INTO v_same FROM stageflow.submit_job_outcome('owned', '{"n": 2}');
    ASSERT v_same.job_id = v_job AND v_same.outcome = 'owned_by_another' AND v_same.job_status IS NULL, v_same::text;
    BEGIN
        PERFORM stageflow.submit_job('owned', '{"n": 2}');
        RAISE EXCEPTION 'submit_job must not return an id bob cannot read';
    EXCEPTION WHEN unique_violation THEN
        ASSERT SQLERRM = format('job %s: another login (or tenant) submitted this work; the job is not yours to read or cancel', v_job), SQLERRM;
    END;
END;
$$;

RESET SESSION AUTHORIZATION;
DO $$
DECLARE
    v_job text := (SELECT job_id FROM alice_jobs WHERE name = 'plain');
BEGIN
    ASSERT (SELECT status FROM stageflow.jobs WHERE job_id = v_job) = 'queued', 'bob changed nothing';
    ASSERT (SELECT count(*) FROM stageflow.tasks WHERE job_id = v_job AND status = 'queued') = 2;
    ASSERT (SELECT count(*) FROM stageflow.jobs) = 2, 'bob''s identical submission made no job';
END;
$$;

-- Alice resubmits: hers, as it is; cancelled, then resubmitted: resumed.
SET SESSION AUTHORIZATION stageflow_own_alice;
DO $$
DECLARE
    v_job   text := (SELECT job_id FROM alice_jobs WHERE name = 'plain');
    v_again record;
BEGIN
    SELECT * INTO v_again FROM stageflow.submit_job_outcome('owned', '{"n": 2}');
    ASSERT (v_again.job_id, v_again.outcome, v_again.job_status) = (v_job, 'exists', 'queued'), v_again::text;
    ASSERT (stageflow.cancel_job(v_job) ->> 'cancelled')::boolean;
    SELECT * INTO v_again FROM stageflow.submit_job_outcome('owned', '{"n": 2}');
    ASSERT (v_again.job_id, v_again.outcome, v_again.job_status) = (v_job, 'resumed', 'processing'), v_again::text;
    ASSERT (SELECT count(*) FROM stageflow.job_tasks(v_job) WHERE status = 'queued') = 2, 'both tasks run again';
    ASSERT (SELECT count(*) FROM stageflow.list_jobs()) = 2;
    ASSERT (SELECT count(*) FROM stageflow.webhook_deliveries(v_job)) = 1, 'her own deliveries: the cancellation''s';
END;
$$;

-- A tenant label narrows a login's own jobs; it never widens them.
SET stageflow.tenant = 'acme';
CREATE TEMP TABLE acme_job AS SELECT stageflow.submit_job('owned', '{"n": 1, "tag": "acme"}') AS job_id;
DO $$
DECLARE
    v_acme  text := (SELECT job_id FROM acme_job);
    v_plain text := (SELECT job_id FROM alice_jobs WHERE name = 'plain');
BEGIN
    ASSERT (stageflow.job_status(v_acme) ->> 'tenant') = 'acme';
    ASSERT (SELECT array_agg(job_id) FROM stageflow.list_jobs()) = ARRAY[v_acme], 'only acme''s job is listed under acme';
    BEGIN
        PERFORM stageflow.job_status(v_plain);
        RAISE EXCEPTION 'under tenant acme, a job of no tenant is not shown';
    EXCEPTION WHEN undefined_object THEN
        NULL;
    END;
    PERFORM set_config('stageflow.tenant', 'globex', false);
    ASSERT (SELECT submit_job_outcome.outcome FROM stageflow.submit_job_outcome('owned', '{"n": 1, "tag": "acme"}'))
           = 'owned_by_another', 'another tenant of the same login does not own it';
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.list_jobs());
    PERFORM set_config('stageflow.tenant', 'not a label', false);
    BEGIN
        PERFORM stageflow.list_jobs();
        RAISE EXCEPTION 'a bad tenant label must be refused';
    EXCEPTION WHEN invalid_parameter_value THEN
        ASSERT SQLERRM LIKE 'stageflow.tenant "not a label" is not a tenant label', SQLERRM;
    END;
    PERFORM set_config('stageflow.tenant', '', false);
    ASSERT (SELECT count(*) FROM stageflow.list_jobs()) = 3, 'no tenant: all of the login''s jobs';
END;
$$;
RESET stageflow.tenant;

-- stageflow_admin sees and lists every job; naming a tenant, only its own login's jobs of it.
SET SESSION AUTHORIZATION stageflow_own_ops;
DO $$
DECLARE
    v_plain text := (SELECT job_id FROM alice_jobs WHERE name = 'plain');
BEGIN
    ASSERT (SELECT count(*) FROM stageflow.list_jobs()) = 3;
    ASSERT (stageflow.job_status(v_plain) ->> 'owner') = 'stageflow_own_alice';
    ASSERT (SELECT (o.outcome, o.job_status) FROM stageflow.submit_job_outcome('owned', '{"n": 2}') AS o)
           = ('owned_by_another'::text, 'processing'::text), 'an admin sees the status of identical work it does not own';
    PERFORM set_config('stageflow.tenant', 'acme', false);
    ASSERT NOT EXISTS (SELECT 1 FROM stageflow.list_jobs()), 'a tenant is a label within a login: alice''s acme is not ops''';
END;
$$;
RESET SESSION AUTHORIZATION;
