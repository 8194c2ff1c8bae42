//! Prometheus metrics, read from pgmq and from Stageflow's counters (stage rows and partial
//! indexes: no scan of all tasks).

use std::fmt::Write;

fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

pub async fn render(client: &tokio_postgres::Client) -> Result<String, tokio_postgres::Error> {
    let mut out = String::new();
    let _ = writeln!(out, "# HELP stageflow_queue_depth Messages in a pgmq queue (visible: claimable now).");
    let _ = writeln!(out, "# TYPE stageflow_queue_depth gauge");
    for row in client
        .query("SELECT queue_name, queue_length, queue_visible_length FROM pgmq.metrics_all() ORDER BY queue_name", &[])
        .await?
    {
        let (queue, total, visible): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
        let _ = writeln!(out, "stageflow_queue_depth{{queue=\"{}\"}} {total}", label(&queue));
        let _ = writeln!(out, "stageflow_queue_depth_visible{{queue=\"{}\"}} {visible}", label(&queue));
    }

    let _ = writeln!(out, "# HELP stageflow_jobs Jobs by status.");
    let _ = writeln!(out, "# TYPE stageflow_jobs gauge");
    for row in client.query("SELECT status, count(*) FROM stageflow.jobs GROUP BY status ORDER BY status", &[]).await? {
        let (status, n): (String, i64) = (row.get(0), row.get(1));
        let _ = writeln!(out, "stageflow_jobs{{status=\"{}\"}} {n}", label(&status));
    }

    let row = client
        .query_one(
            "SELECT coalesce(sum(c.remaining_tasks), 0)::bigint,
                    coalesce(sum(c.completed_count), 0)::bigint,
                    coalesce(sum(s.failed_count), 0)::bigint,
                    coalesce(sum(s.task_count - c.completed_count - s.failed_count - c.remaining_tasks), 0)::bigint,
                    (SELECT count(*) FROM stageflow.tasks AS t WHERE t.status = 'running'),
                    (SELECT count(*) FROM stageflow.tasks AS t WHERE t.status IN ('failed', 'dead'))
               FROM stageflow.stages AS s
               JOIN stageflow.stage_counts AS c ON c.job_id = s.job_id AND c.stage = s.stage",
            &[],
        )
        .await?;
    let (open, completed, failed, cancelled, running, dead): (i64, i64, i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4), row.get(5));
    let _ = writeln!(out, "# HELP stageflow_tasks Tasks by status.");
    let _ = writeln!(out, "# TYPE stageflow_tasks gauge");
    let _ = writeln!(out, "stageflow_tasks{{status=\"queued\"}} {}", open - running);
    let _ = writeln!(out, "stageflow_tasks{{status=\"running\"}} {running}");
    let _ = writeln!(out, "stageflow_tasks{{status=\"completed\"}} {completed}");
    let _ = writeln!(out, "stageflow_tasks{{status=\"failed\"}} {failed}");
    let _ = writeln!(out, "stageflow_tasks{{status=\"cancelled\"}} {cancelled}");
    let _ = writeln!(out, "# HELP stageflow_dead_letters Tasks that ended without a result (failed or dead).");
    let _ = writeln!(out, "# TYPE stageflow_dead_letters gauge");
    let _ = writeln!(out, "stageflow_dead_letters {dead}");

    let _ = writeln!(out, "# HELP stageflow_handler_tasks_total Task outcomes per handler.");
    let _ = writeln!(out, "# TYPE stageflow_handler_tasks_total counter");
    for row in client
        .query(
            "SELECT s.handler, sum(c.completed_count)::bigint, sum(s.failed_count)::bigint
               FROM stageflow.stages AS s JOIN stageflow.stage_counts AS c ON c.job_id = s.job_id AND c.stage = s.stage
              GROUP BY s.handler ORDER BY s.handler",
            &[],
        )
        .await?
    {
        let (handler, done, failed): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
        let _ = writeln!(
            out,
            "stageflow_handler_tasks_total{{handler=\"{}\",outcome=\"completed\"}} {done}",
            label(&handler)
        );
        let _ = writeln!(
            out,
            "stageflow_handler_tasks_total{{handler=\"{}\",outcome=\"failed\"}} {failed}",
            label(&handler)
        );
    }

    let _ = writeln!(
        out,
        "# HELP stageflow_task_duration_seconds Claim-to-completion time of completed tasks per handler."
    );
    let _ = writeln!(out, "# TYPE stageflow_task_duration_seconds summary");
    for row in client
        .query(
            "SELECT s.handler, sum(c.completed_seconds), sum(c.completed_count)::bigint
               FROM stageflow.stages AS s JOIN stageflow.stage_counts AS c ON c.job_id = s.job_id AND c.stage = s.stage
              GROUP BY s.handler ORDER BY s.handler",
            &[],
        )
        .await?
    {
        let (handler, seconds, count): (String, f64, i64) = (row.get(0), row.get(1), row.get(2));
        let _ = writeln!(out, "stageflow_task_duration_seconds_sum{{handler=\"{}\"}} {seconds}", label(&handler));
        let _ = writeln!(out, "stageflow_task_duration_seconds_count{{handler=\"{}\"}} {count}", label(&handler));
    }

    let _ = writeln!(out, "# HELP stageflow_webhook_deliveries Webhook deliveries by status.");
    let _ = writeln!(out, "# TYPE stageflow_webhook_deliveries gauge");
    for row in client
        .query("SELECT status, count(*) FROM stageflow.webhook_deliveries GROUP BY status ORDER BY status", &[])
        .await?
    {
        let (status, n): (String, i64) = (row.get(0), row.get(1));
        let _ = writeln!(out, "stageflow_webhook_deliveries{{status=\"{}\"}} {n}", label(&status));
    }
    Ok(out)
}
