//! The default quotas: how many open (queued or running) tasks a login's jobs may have when it
//! submits another, and how many tasks one job may create over all its stages. A row of
//! `stageflow.role_quotas` (`stageflow.set_quota`) overrides them for one login; the checks are
//! SQL (`stageflow._check_quota`). Only a superuser changes the defaults.

use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

static MAX_OPEN_TASKS: GucSetting<i32> = GucSetting::<i32>::new(1_000_000);
static MAX_TASKS_PER_JOB: GucSetting<i32> = GucSetting::<i32>::new(100_000);

/// Defines `stageflow.max_open_tasks` and `stageflow.max_tasks_per_job` (superuser only).
pub fn init() {
    GucRegistry::define_int_guc(
        c"stageflow.max_open_tasks",
        c"The most open tasks a login's jobs may have when it submits a job (unless stageflow.set_quota says otherwise).",
        c"A submission that would go past it is refused with 54000 and creates nothing.",
        &MAX_OPEN_TASKS,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"stageflow.max_tasks_per_job",
        c"The most tasks one job may create over all its stages (unless stageflow.set_quota says otherwise).",
        c"A submission over it is refused with 54000; a later stage over it fails its job.",
        &MAX_TASKS_PER_JOB,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
}

/// The default quotas as (max_open_tasks, max_tasks_per_job).
#[pg_extern(stable, parallel_safe, name = "_default_quotas")]
fn default_quotas() -> TableIterator<'static, (name!(max_open_tasks, i64), name!(max_tasks_per_job, i64))> {
    TableIterator::once((i64::from(MAX_OPEN_TASKS.get()), i64::from(MAX_TASKS_PER_JOB.get())))
}
