-- The engine's clock: now(), unless the setting stageflow.fake_now holds a timestamp. Every
-- decision about time reads it: lease expiry, due retries, job deadlines, retention, and the
-- visibility of the queue messages Stageflow writes and reads (their vt is set and compared with
-- this clock, not the wall clock), so tests move time forward with SET stageflow.fake_now instead
-- of sleeping, and a lease, its message and its expiry agree.
-- The setting is defined by the library, superuser only (src/clock.rs); it is read through the
-- library's stageflow._fake_now(), so that a value someone without the right set before the
-- library was loaded in the session is dropped rather than believed.
-- Every name is qualified and there is no SET clause, so that PostgreSQL inlines it into the
-- statements of the hot path (a function with SET is never inlined).
CREATE FUNCTION stageflow.now()
RETURNS timestamptz
LANGUAGE sql STABLE
AS $$
    SELECT coalesce(stageflow._fake_now()::pg_catalog.timestamptz, pg_catalog.now())
$$;
