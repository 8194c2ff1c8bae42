//! Prometheus metrics: the samples of `stageflow.metrics()` (read from pgmq and from Stageflow's
//! counters, stage rows and partial indexes: no scan of all tasks) in the text exposition format.

use std::fmt::Write;

use stageflow_client::Metric;

/// The metric families in the order they are written: name, type, help. A sample belongs to the
/// family its name is, or starts with (`_visible`, `_sum`, `_count`: the family's other series).
const FAMILIES: [(&str, &str, &str); 8] = [
    ("stageflow_queue_depth", "gauge", "Messages in a pgmq queue (visible: claimable now)."),
    (
        "stageflow_tasks_unsent",
        "gauge",
        "Tasks of big stages whose messages are still to be sent, per queue (stageflow.message_window).",
    ),
    ("stageflow_jobs", "gauge", "Jobs by status."),
    ("stageflow_tasks", "gauge", "Tasks by status."),
    ("stageflow_dead_letters", "gauge", "Tasks that ended without a result (failed or dead)."),
    ("stageflow_handler_tasks_total", "counter", "Task outcomes per handler."),
    ("stageflow_task_duration_seconds", "summary", "Claim-to-completion time of completed tasks per handler."),
    ("stageflow_webhook_deliveries", "gauge", "Webhook deliveries by status."),
];

/// The family of a sample's metric name: the name without the suffix of a family's other series.
fn family(name: &str) -> &str {
    ["_visible", "_sum", "_count"].iter().find_map(|suffix| name.strip_suffix(suffix)).unwrap_or(name)
}

fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Every family's HELP and TYPE lines, then its samples in the order given.
pub fn render(samples: &[Metric]) -> String {
    let mut out = String::new();
    for (name, kind, help) in FAMILIES {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for sample in samples.iter().filter(|sample| family(&sample.name) == name) {
            out.push_str(&sample.name);
            if !sample.labels.is_empty() {
                let labels: Vec<String> =
                    sample.labels.iter().map(|(key, value)| format!("{key}=\"{}\"", label(value))).collect();
                let _ = write!(out, "{{{}}}", labels.join(","));
            }
            let _ = writeln!(out, " {}", sample.value);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str, labels: &[(&str, &str)], value: f64) -> Metric {
        let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Metric { name: name.to_owned(), labels, value }
    }

    #[test]
    fn families_in_order_with_their_samples_escaped() {
        let samples = [
            sample("stageflow_webhook_deliveries", &[("status", "pending")], 2.0),
            sample("stageflow_queue_depth", &[("queue", "default")], 3.0),
            sample("stageflow_queue_depth_visible", &[("queue", "default")], 1.0),
            sample("stageflow_tasks_unsent", &[("queue", "default")], 7.0),
            sample("stageflow_tasks", &[("status", "queued")], 3.0),
            sample("stageflow_dead_letters", &[], 0.0),
            sample("stageflow_handler_tasks_total", &[("handler", "a\"b\\c\n"), ("outcome", "completed")], 5.0),
            sample("stageflow_task_duration_seconds_sum", &[("handler", "h")], 1.25),
            sample("stageflow_task_duration_seconds_count", &[("handler", "h")], 9_007_199_254_740_992.0),
        ];
        let expected = "\
# HELP stageflow_queue_depth Messages in a pgmq queue (visible: claimable now).
# TYPE stageflow_queue_depth gauge
stageflow_queue_depth{queue=\"default\"} 3
stageflow_queue_depth_visible{queue=\"default\"} 1
# HELP stageflow_tasks_unsent Tasks of big stages whose messages are still to be sent, per queue (stageflow.message_window).
# TYPE stageflow_tasks_unsent gauge
stageflow_tasks_unsent{queue=\"default\"} 7
# HELP stageflow_jobs Jobs by status.
# TYPE stageflow_jobs gauge
# HELP stageflow_tasks Tasks by status.
# TYPE stageflow_tasks gauge
stageflow_tasks{status=\"queued\"} 3
# HELP stageflow_dead_letters Tasks that ended without a result (failed or dead).
# TYPE stageflow_dead_letters gauge
stageflow_dead_letters 0
# HELP stageflow_handler_tasks_total Task outcomes per handler.
# TYPE stageflow_handler_tasks_total counter
stageflow_handler_tasks_total{handler=\"a\\\"b\\\\c\\n\",outcome=\"completed\"} 5
# HELP stageflow_task_duration_seconds Claim-to-completion time of completed tasks per handler.
# TYPE stageflow_task_duration_seconds summary
stageflow_task_duration_seconds_sum{handler=\"h\"} 1.25
stageflow_task_duration_seconds_count{handler=\"h\"} 9007199254740992
# HELP stageflow_webhook_deliveries Webhook deliveries by status.
# TYPE stageflow_webhook_deliveries gauge
stageflow_webhook_deliveries{status=\"pending\"} 2
";
        assert_eq!(render(&samples), expected);
    }
}
