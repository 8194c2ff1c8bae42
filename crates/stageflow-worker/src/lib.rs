//! Stageflow's worker runtime.
//!
//! A worker is thin: it claims tasks with `stageflow.claim_tasks`, runs the handler named by each
//! task, and reports with `stageflow.complete_task_and_check_stage` or `stageflow.fail_task`. It
//! keeps no state the database does not have: a worker that dies loses nothing, its tasks come back
//! when their leases run out.
//!
//! ```ignore
//! let handlers = Handlers::new()
//!     .register("hello_world.greet", hello_world::greet)
//!     .register("hello_world.reply", hello_world::reply);
//! Worker::new(WorkerConfig::new(database_url), handlers).run(shutdown_signal()).await?;
//! ```

pub mod diagnostic;
pub mod handlers;
pub mod hello_world;
pub mod tasks;
pub mod worker;

pub use handlers::{Handlers, Task, TaskError};
pub use worker::{shutdown_signal, Worker, WorkerConfig, WorkerReport};

/// The handlers that ship with Stageflow: `hello_world.*` and the diagnostic `debug.*` ones.
pub fn builtin_handlers() -> Handlers {
    Handlers::new()
        .register("hello_world.greet", hello_world::greet)
        .register("hello_world.reply", hello_world::reply)
        .register("debug.sleep", diagnostic::sleep)
        .register("debug.fail", diagnostic::fail)
        .register("debug.panic", diagnostic::panic)
}
