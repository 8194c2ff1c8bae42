//! Metrics: the samples of `stageflow.metrics()`, what `GET /metrics` exports (queue depths, jobs
//! and tasks by status, dead letters, outcomes and durations per handler, webhook deliveries).

use serde_json::Value;
use tokio_postgres::{GenericClient, Row};

use crate::{column, Api, Error};

/// A sample of `stageflow.metrics()`: a Prometheus metric's name, its labels and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    /// `stageflow_queue_depth`, `stageflow_queue_depth_visible`, `stageflow_jobs`, ...
    pub name: String,
    /// (label, value) pairs, by label name.
    pub labels: Vec<(String, String)>,
    /// Counts are whole numbers (exact up to 2^53).
    pub value: f64,
}

const METRICS: &str = "SELECT metric, labels, value FROM stageflow.metrics()";

impl<C: GenericClient + Sync> Api<'_, C> {
    /// Every sample, each metric's in the order it is exported (admin).
    pub async fn metrics(&self) -> Result<Vec<Metric>, Error> {
        self.rows(METRICS, &[], metric).await
    }
}

fn metric(row: &Row) -> Result<Metric, Error> {
    let labels: Value = column(row, "labels")?;
    let Value::Object(labels) = labels else {
        return Err(Error::Decode(format!("metric labels {labels} are not an object")));
    };
    let mut labels = labels
        .into_iter()
        .map(|(name, value)| match value {
            Value::String(value) => Ok((name, value)),
            other => Err(Error::Decode(format!("metric label {name} is {other}, not a string"))),
        })
        .collect::<Result<Vec<_>, Error>>()?;
    labels.sort();
    Ok(Metric { name: column(row, "metric")?, labels, value: column(row, "value")? })
}
