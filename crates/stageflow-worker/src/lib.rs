//! Stageflow's worker runtime.
//!
//! A worker is thin: it claims tasks with `stageflow.claim_tasks`, runs the handler named by each
//! task, and reports with `stageflow.complete_task_and_check_stage` or `stageflow.fail_task`. It
//! keeps no state the database does not have: a worker that dies loses nothing, its tasks come back
//! when their leases run out.
//!
//! A handler's writes to the same database can be made exactly once: register it with
//! [`Handlers::register_transactional`] and it gets the [`Transaction`] its completion commits
//! (the handler may run twice; its writes commit once, with the one completion the database
//! accepts). See [`handlers`].
//!
//! ```ignore
//! let handlers = Handlers::new()
//!     .register("hello_world.greet", hello_world::greet)
//!     .register("hello_world.reply", hello_world::reply)
//!     .register_transactional("orders.record", record_order); // async fn(Task, &Transaction<'_>)
//! Worker::new(WorkerConfig::new(database_url), handlers).run(shutdown_signal()).await?;
//! ```

pub mod diagnostic;
pub mod handlers;
pub mod hello_world;
pub mod tasks;
pub mod worker;

pub use handlers::{Handlers, Task, TaskError, Transaction, TransactionalHandler};
pub use worker::{shutdown_signal, Worker, WorkerConfig, WorkerReport};

/// The handlers that ship with Stageflow: `hello_world.*` and the diagnostic `debug.*` ones.
pub fn builtin_handlers() -> Handlers {
    Handlers::new()
        .register("hello_world.greet", hello_world::greet)
        .register("hello_world.reply", hello_world::reply)
        .register("debug.sleep", diagnostic::sleep)
        .register("debug.fail", diagnostic::fail)
        .register("debug.panic", diagnostic::panic)
        .register_transactional("debug.insert_row", diagnostic::insert_row)
}
