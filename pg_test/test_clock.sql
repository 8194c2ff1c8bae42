-- stageflow.fake_now moves the engine's clock (leases, retries, deadlines, retention, message
-- visibility) for tests; only a superuser may set it. A role without that right is refused
-- (42501) and the clock stays the real one. (A value set by such a role before the library was
-- loaded in its session is dropped with a WARNING when the library loads: checked by hand on a
-- cluster without shared_preload_libraries, see issue 12's note; test clusters preload it.)
DO $$
BEGIN
    CREATE ROLE stageflow_clock_test NOLOGIN;
EXCEPTION WHEN duplicate_object THEN
    NULL;
END;
$$;
GRANT stageflow_submitter, stageflow_worker TO stageflow_clock_test;

SET stageflow.fake_now = '2030-01-01 00:00:00+00';
DO $$
BEGIN
    ASSERT stageflow.now() = '2030-01-01 00:00:00+00', 'a superuser moves the clock';
END;
$$;
RESET stageflow.fake_now;

SET ROLE stageflow_clock_test;
DO $$
BEGIN
    BEGIN
        PERFORM set_config('stageflow.fake_now', '1970-01-01 00:00:00+00', false);
        RAISE EXCEPTION 'a role that is not a superuser must not move the clock';
    EXCEPTION WHEN insufficient_privilege THEN
        NULL;
    END;
    BEGIN
        PERFORM set_config('stageflow.fake_nwo', 'x', false);
        RAISE EXCEPTION 'the stageflow. prefix is reserved: no made-up settings';
    EXCEPTION WHEN undefined_object OR invalid_name THEN
        NULL;
    END;
END;
$$;
-- What the role can do runs on the real clock.
CREATE TEMP TABLE submitted AS SELECT stageflow.submit_job('hello_world', '{"n": 1, "message": "clock"}') AS id;
RESET ROLE;
DO $$
BEGIN
    ASSERT (SELECT created_at FROM stageflow.jobs WHERE job_id = (SELECT id FROM submitted))
           BETWEEN now() - interval '1 minute' AND now(), 'the job was made at the real time';
    ASSERT stageflow.now() = now();
END;
$$;

-- Everything a submission writes is dated by the engine's clock: the job, its stage and its tasks.
SET stageflow.fake_now = '2031-06-01 12:00:00+00';
CREATE TEMP TABLE dated AS SELECT stageflow.submit_job('hello_world', '{"n": 2, "message": "dated"}') AS id;
DO $$
DECLARE
    v_job text := (SELECT id FROM dated);
BEGIN
    ASSERT (SELECT created_at FROM stageflow.jobs WHERE job_id = v_job) = '2031-06-01 12:00:00+00';
    ASSERT (SELECT created_at FROM stageflow.stages WHERE job_id = v_job AND stage = 1) = '2031-06-01 12:00:00+00',
           'the stage is dated by stageflow.now()';
    ASSERT (SELECT array_agg(DISTINCT created_at) FROM stageflow.tasks WHERE job_id = v_job) = ARRAY['2031-06-01 12:00:00+00'::timestamptz],
           'so are its tasks';
END;
$$;
RESET stageflow.fake_now;
