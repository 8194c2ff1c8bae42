//! The maintenance background worker: with `shared_preload_libraries = 'stageflow'`, one process
//! per cluster runs `stageflow.run_maintenance()` in the database `stageflow.database` every
//! `stageflow.maintenance_interval`, then `stageflow.shape_queues()` in a transaction of its own.
//! No pg_cron, no outside process.
//!
//! It survives its own errors: `run_maintenance` catches what goes wrong in a round and reports
//! it, the worker logs it and backs off (doubling the interval up to a minute); anything worse
//! ends the process and the postmaster starts it again after 10 s. It stops with the server.
//!
//! On a hot standby it starts too (once the standby is consistent) and idles: while the server is
//! in recovery a round is skipped before any transaction is opened (`RecoveryInProgress()`, a read
//! of shared memory), with one log line when it starts waiting and one when the server is
//! promoted, from which round on it maintains (`docs/operations.md`, "Failover").

use std::ffi::CString;
use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

static INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));
static RETENTION: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"7 days"));
static RETENTION_BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(10_000);

/// Registers the GUCs, and the background worker when loaded at server start.
pub fn init() {
    GucRegistry::define_int_guc(
        c"stageflow.maintenance_interval",
        c"How often the maintenance worker runs stageflow.run_maintenance().",
        c"Expired leases, due retries, job deadlines and retention are handled at this pace.",
        &INTERVAL_MS,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_string_guc(
        c"stageflow.retention",
        c"How long finished jobs are kept before maintenance deletes them (an interval; 0 keeps them).",
        c"Jobs are deleted with their stages, tasks, events and webhook deliveries, and the queues' archived \
          messages older than it, in bounded batches (stageflow.retention_batch_size).",
        &RETENTION,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"stageflow.retention_batch_size",
        c"The most rows a maintenance round's retention deletes from each table.",
        c"Tasks, events, webhook deliveries and each queue's archived messages; finished jobs at most this many \
          (and run_maintenance's max_rows) a round.",
        &RETENTION_BATCH_SIZE,
        1,
        1_000_000,
        GucContext::Suset,
        GucFlags::default(),
    );
    // A server-start setting can only be defined while the server starts: only when preloaded,
    // which is also the only time there is a background worker to read it.
    // SAFETY: a plain bool PostgreSQL sets while it loads shared_preload_libraries, read from the
    // single-threaded backend that runs _PG_init.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        GucRegistry::define_string_guc(
            c"stageflow.database",
            c"The database whose stageflow extension the maintenance worker looks after.",
            c"Read at server start.",
            &DATABASE,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        BackgroundWorkerBuilder::new("stageflow maintenance")
            .set_type("stageflow maintenance")
            .set_library("stageflow")
            .set_function("stageflow_maintenance_main")
            .enable_spi_access()
            // (after enable_spi_access, which sets RecoveryFinished) also on a hot standby, where
            // it waits for promotion: see in_recovery.
            .set_start_time(BgWorkerStartTime::ConsistentState)
            .set_restart_time(Some(Duration::from_secs(10)))
            .load();
    }
}

fn interval() -> Duration {
    Duration::from_millis(INTERVAL_MS.get().max(10) as u64)
}

/// Whether the server is a standby (still in recovery), where run_maintenance cannot write.
fn in_recovery() -> bool {
    // SAFETY: RecoveryInProgress reads shared memory that a background worker attached to shared
    // memory may read at any time, in or out of a transaction; once it has returned false it
    // answers from a process-local flag.
    unsafe { pg_sys::RecoveryInProgress() }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn stageflow_maintenance_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = DATABASE.get().and_then(|name| name.into_string().ok()).unwrap_or_else(|| "postgres".to_owned());
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    log!("stageflow maintenance worker started in database {database}");

    let mut wait = interval();
    // Whether it is waiting for the standby it runs on to be promoted (said once in the log).
    let mut waiting = false;
    while BackgroundWorker::wait_latch(Some(wait)) {
        if BackgroundWorker::sighup_received() {
            // SAFETY: what a background worker does on SIGHUP: re-read the configuration files, in its own
            // single-threaded process, outside any transaction.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        if in_recovery() {
            if !waiting {
                log!("stageflow maintenance worker: the server is a standby (in recovery); waiting for its promotion");
                waiting = true;
            }
            wait = interval();
            continue;
        }
        if waiting {
            log!("stageflow maintenance worker: the server was promoted; maintaining");
            waiting = false;
        }
        let outcome: Option<pgrx::JsonB> = BackgroundWorker::transaction(|| {
            let installed =
                Spi::get_one::<bool>("SELECT to_regprocedure('stageflow.run_maintenance(integer)') IS NOT NULL")
                    .ok()
                    .flatten()
                    .unwrap_or(false);
            if !installed {
                return None;
            }
            Spi::get_one::<pgrx::JsonB>("SELECT stageflow.run_maintenance()").ok().flatten()
        });
        wait = match outcome {
            Some(pgrx::JsonB(report)) if report.get("error").is_some() => {
                let next = (wait * 2).min(Duration::from_secs(60));
                warning!("stageflow maintenance failed, next try in {next:?}: {}", report["error"]);
                next
            }
            Some(pgrx::JsonB(report)) => {
                let busy = [
                    "retries_released",
                    "leases_expired",
                    "dead_lettered",
                    "jobs_timed_out",
                    "windows_sent",
                    "jobs_deleted",
                    "tasks_deleted",
                    "events_deleted",
                    "webhook_deliveries_deleted",
                    "archived_messages_deleted",
                ]
                .iter()
                .any(|key| report[key].as_i64().unwrap_or(0) > 0);
                if busy {
                    log!("stageflow maintenance: {report}");
                }
                shape_queues();
                interval()
            }
            None => interval(),
        };
    }
    log!("stageflow maintenance worker stopped");
}

/// After a round, in a transaction of its own: `stageflow.shape_queues()` drops pgmq's index on
/// `vt` from the job types' queues that still have it (queues made before 0.3.0), each only if its
/// lock is free at once, and holds what it locked until this transaction commits, at once.
fn shape_queues() {
    let shaped = BackgroundWorker::transaction(|| {
        let installed = Spi::get_one::<bool>("SELECT to_regprocedure('stageflow.shape_queues()') IS NOT NULL")
            .ok()
            .flatten()
            .unwrap_or(false);
        if !installed {
            return 0;
        }
        Spi::get_one::<i32>("SELECT stageflow.shape_queues()").ok().flatten().unwrap_or(0)
    });
    if shaped > 0 {
        log!("stageflow maintenance: shaped {shaped} queue(s): pgmq's index on vt dropped, fillfactor 50");
    }
}
