-- Maintenance dead-letters an expired last attempt whose message the reconciler re-sent (an
-- adversarial review's reproduction; it failed on a4a7f15, where, in the same round, a running last attempt whose message was lost gets a new
-- message from the reconciler, visible at v_now, in the same maintenance round that just moved the
-- queue's visibility cursor to (v_now, 2^62). The new message's (vt, msg_id) sorts before the
-- cursor, so no later round reads it: the expired lease is never dead-lettered (no worker claims
-- from the queue). Before the change the lease index found it in the next round.
SET stageflow.retention = 0;
SET stageflow.fake_now = '2031-01-01 00:00:00+00';
SELECT stageflow.register_job_type('rv_resent', $$
{"retry": {"max_attempts": 1},
 "stages": [{"name": "s", "handler": "h", "queue": "rv_resent"}]}
$$) IS NOT NULL AS registered;
CREATE TEMP TABLE rv_job AS SELECT stageflow.submit_job('rv_resent', '{}') AS id;
SELECT task_key, attempt FROM stageflow.claim_tasks('rv_resent', 1, 60, 'w');
-- The task's message is lost (what the reconciler exists to mend).
SELECT count(*) AS lost FROM (SELECT pgmq.delete('rv_resent', msg_id) FROM pgmq.q_rv_resent) AS d;
-- 00:02: the lease (to 00:01) has expired; this round's reconciler re-sends the message.
SET stageflow.fake_now = '2031-01-01 00:02:00+00';
SELECT m ->> 'dead_lettered' AS dead_lettered, m ->> 'messages_resent' AS resent FROM stageflow.run_maintenance() AS m;
SELECT vt, (SELECT position FROM stageflow.maintenance_cursors WHERE name = 'visible:rv_resent') AS cursor
  FROM pgmq.q_rv_resent;
-- Later rounds: the running last attempt, expired for hours, is never dead-lettered.
SET stageflow.fake_now = '2031-01-01 00:03:00+00';
SELECT m ->> 'dead_lettered' AS dead_lettered FROM stageflow.run_maintenance() AS m;
SET stageflow.fake_now = '2031-01-01 05:00:00+00';
SELECT m ->> 'dead_lettered' AS dead_lettered FROM stageflow.run_maintenance() AS m;
SELECT t.status, t.lease_expires_at, j.status AS job_status
  FROM stageflow.tasks AS t JOIN stageflow.jobs AS j USING (job_id) WHERE j.job_id = (SELECT id FROM rv_job);
DO $$
BEGIN
    ASSERT (SELECT t.status FROM stageflow.tasks AS t WHERE t.job_id = (SELECT id FROM rv_job)) = 'dead',
        'an expired last attempt is dead-lettered by maintenance within a few rounds';
END
$$;
