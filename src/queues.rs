//! Reading and deleting a queue's messages with plans kept per backend. `pgmq.read` and
//! `pgmq.delete` build their statement as text on every call (the queue's table is in its name),
//! and parsing and planning that text was about a fifth of the server's CPU for claiming and
//! completing one task. These do what pgmq 1.11.1's read and delete do, with one plan each per
//! queue and backend, kept; PostgreSQL's plan cache re-plans them if a queue's table changes.
//! The read takes the engine's clock (`stageflow.now()`) as an argument: a message is visible
//! when its vt has passed by that clock, and a read message stays invisible until that clock
//! plus the lease, the same instant the task's lease expires.
//! It also defines `stageflow.message_window`: how many messages a big stage sends at a time.

use std::cell::RefCell;
use std::collections::HashMap;

use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult};
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PgBuiltInOids, PgOid, PgSqlErrorCode};

static MESSAGE_WINDOW: GucSetting<i32> = GucSetting::<i32>::new(10_000);

/// Defines `stageflow.message_window` (superuser only): how many of a stage's tasks get their
/// messages when it is made, and how many more each time its queue runs low (read by SQL,
/// `stageflow._message_window()`).
pub fn init() {
    GucRegistry::define_int_guc(
        c"stageflow.message_window",
        c"How many messages a stage's tasks get at once: when the stage is made, then each time a claim finds its queue short.",
        c"A stage of more tasks sends the rest in windows of this size (stageflow.message_windows); the task rows are all made at once.",
        &MESSAGE_WINDOW,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Statement {
    Read,
    Delete,
}

thread_local! {
    static PLANS: RefCell<HashMap<(Statement, String), OwnedPreparedStatement>> = RefCell::new(HashMap::new());
    static READ_FROM: RefCell<HashMap<String, ReadFrom>> = RefCell::new(HashMap::new());
    static QUEUE_TABLES: RefCell<HashMap<String, pg_sys::Oid>> = RefCell::new(HashMap::new());
}

/// Whether pgmq has `queue`: pgmq.meta names it (the authority), asked once per table. The table
/// pgmq.meta was last found to name is remembered by its oid; while the catalog cache finds the
/// same table under that name (a lookup without the executor), the queue is the one pgmq.meta
/// named. A table dropped, or dropped and made again, is asked about anew. (A statement asking
/// pgmq.meta in every claim cost a claim and a completion of one task 29,500 instructions,
/// bench/README.md, nineteenth pass.) A queue pgmq.meta names whose table is gone (dropped outside
/// pgmq) is an error, as reading it was before: read as empty, its tasks would wait unseen.
fn queue_exists(queue: &str, table: &str) -> bool {
    let oid = table_oid(table);
    if oid != pg_sys::InvalidOid && QUEUE_TABLES.with(|tables| tables.borrow().get(queue) == Some(&oid)) {
        return true;
    }
    let named = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pgmq.meta AS m WHERE m.queue_name OPERATOR(pg_catalog.=) $1)",
        &[queue.into()],
    )
    .unwrap_or_else(|error| error!("looking up queue {queue}: {error}"))
    .unwrap_or(false);
    if oid == pg_sys::InvalidOid {
        QUEUE_TABLES.with(|tables| tables.borrow_mut().remove(queue));
        if named {
            crate::raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                format!("queue {} has no table pgmq.q_{queue}", pgrx::spi::quote_literal(queue)),
                &format!(
                    "the table was dropped outside pgmq, which still lists the queue: DELETE FROM pgmq.meta WHERE queue_name = {}; a job type's queue is then made again by its next claim",
                    pgrx::spi::quote_literal(queue)
                ),
            );
        }
        return false;
    }
    QUEUE_TABLES.with(|tables| {
        let mut tables = tables.borrow_mut();
        if named {
            tables.insert(queue.to_owned(), oid);
        } else {
            tables.remove(queue);
        }
    });
    named
}

/// The oid of pgmq's table `table` (a name without its schema), or InvalidOid, from the catalog
/// cache.
fn table_oid(table: &str) -> pg_sys::Oid {
    let Ok(table) = std::ffi::CString::new(table) else {
        return pg_sys::InvalidOid;
    };
    // SAFETY: both are NUL-terminated strings that outlive the calls; the lookups only read the
    // catalog caches (missing_ok: an absent schema is InvalidOid, which get_relname_relid finds
    // nothing in).
    unsafe {
        let namespace = pg_sys::get_namespace_oid(c"pgmq".as_ptr(), true);
        if namespace == pg_sys::InvalidOid {
            return pg_sys::InvalidOid;
        }
        pg_sys::get_relname_relid(table.as_ptr(), namespace)
    }
}

/// Where this backend's next read of a queue starts looking. A read walks the queue's primary key
/// from the lowest msg_id up to the visible messages it takes, and every message deleted since the
/// table was last vacuumed leaves an index entry on that walk: one at a time, 100,000 deleted
/// messages made a claim plus a completion 30 % slower (1,131 -> 859 a second, 1,467 after
/// `VACUUM`), and autovacuum of a million-message queue waits for 200,000 of them. So a read
/// starts at the lowest msg_id this backend's last read of the queue took, and looks below it only
/// when the messages from there on run out, or when a second has passed on the engine's clock
/// (the `now` the claim passes) since its last look at the whole queue. A message that becomes
/// visible again below that point (an expired lease, a retry coming due, a released task) waits
/// for one of those. (msg_ids are handed out as messages are sent but committed in any order: a
/// long fan-out's lower ids appear late, and are found the same way.) The state is the backend's:
/// a new connection starts with a look at the whole queue; a queue dropped and made again under
/// the same name may start below the old point, and is looked at whole within the second.
///
/// A read from `low` looks first at the next `span` msg_ids past the messages it wants, then, if
/// those had too few, past them. A B-tree index scan reads the whole leaf page it starts on (up to
/// about 400 msg_ids) and checks each entry against the scan's keys unless one of them ends the
/// range: unbounded, that was 46,000 instructions of a claim and a completion of one task,
/// bench/README.md, nineteenth pass. The span adapts to the queue (see [`next_span`]).
struct ReadFrom {
    low: i64,
    /// the engine's clock, in microseconds, at this backend's last look at the whole queue
    whole_at: i64,
    /// how many msg_ids past `low` (besides the ones it wants) the next read looks at first
    span: i64,
}

/// How often, on the engine's clock, a backend's read looks at the whole queue (see [`ReadFrom`]).
const WHOLE_QUEUE_EVERY_US: i64 = 1_000_000;

/// The least and the most msg_ids a read from `low` looks at first, besides the ones it wants.
const SPAN_LEAST: i64 = 16;
const SPAN_MOST: i64 = 1 << 20;

/// The span of a queue's next read from `low`, given this one's: doubled when the messages within
/// it ran short (others' messages in flight, deleted ones not yet vacuumed, or the queue's end),
/// halved when the messages taken lay within a quarter of it (`reach`: how far past `low` the
/// last message taken was, less the ones wanted), else kept.
fn next_span(span: i64, short: bool, reach: i64) -> i64 {
    if short {
        span.saturating_mul(2).min(SPAN_MOST)
    } else if reach.saturating_mul(4) < span {
        (span / 2).max(SPAN_LEAST)
    } else {
        span
    }
}

/// pgmq's table of a queue, quoted, or an error for a name pgmq would not have made (the callers
/// check the queue first; this keeps the statement text safe whatever the caller).
fn queue_table(queue: &str) -> String {
    let plain = !queue.is_empty()
        && queue.len() <= 47
        && queue.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && queue.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !plain {
        crate::raise(
            PgSqlErrorCode::ERRCODE_INVALID_NAME,
            // (quoted by PostgreSQL's quote_literal, as SQL's refusals quote it with format('%L'))
            format!("invalid queue name {}", pgrx::spi::quote_literal(queue)),
            "queue names are 1 to 47 lowercase letters, digits or underscores, not starting with a digit",
        );
    }
    format!("pgmq.\"q_{queue}\"")
}

fn sql(statement: Statement, table: &str) -> String {
    match statement {
        // pgmq.read(queue, vt, qty) without its `conditional` filter. The messages to read are
        // picked into an array rather than joined from a CTE as pgmq does: a kept (generic) plan
        // does not know the limit, expects a tenth of the queue, and joined that by hash over the
        // whole table; `msg_id = ANY (array)` stays an index lookup whatever it expects.
        Statement::Read => format!(
            "UPDATE {table} AS m SET last_read_at = pg_catalog.clock_timestamp(), \
                    vt = $3 OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => $1::pg_catalog.float8), \
                    read_ct = m.read_ct OPERATOR(pg_catalog.+) 1 \
              WHERE m.msg_id OPERATOR(pg_catalog.=) ANY (ARRAY( \
                    SELECT q.msg_id FROM {table} AS q WHERE q.vt OPERATOR(pg_catalog.<=) $3 \
                       AND q.msg_id OPERATOR(pg_catalog.>=) $4 AND q.msg_id OPERATOR(pg_catalog.<) $5 \
                     ORDER BY q.msg_id LIMIT $2 FOR UPDATE SKIP LOCKED)) \
             RETURNING m.msg_id, m.message OPERATOR(pg_catalog.->>) 'task_id'"
        ),
        // pgmq.delete(queue, msg_ids).
        Statement::Delete => {
            format!("DELETE FROM {table} WHERE msg_id OPERATOR(pg_catalog.=) ANY ($1) RETURNING msg_id")
        }
    }
}

/// Runs `run` with the backend's plan of `statement` for `queue`, preparing it the first time.
fn with_plan<R>(
    client: &mut SpiClient<'_>,
    statement: Statement,
    queue: &str,
    run: impl FnOnce(&mut SpiClient<'_>, &OwnedPreparedStatement) -> SpiResult<R>,
) -> SpiResult<R> {
    PLANS.with(|plans| {
        let mut plans = plans.borrow_mut();
        let key = (statement, queue.to_owned());
        if !plans.contains_key(&key) {
            let args: &[PgOid] = match statement {
                Statement::Read => &[
                    PgOid::BuiltIn(PgBuiltInOids::INT4OID),
                    PgOid::BuiltIn(PgBuiltInOids::INT4OID),
                    PgOid::BuiltIn(PgBuiltInOids::TIMESTAMPTZOID),
                    PgOid::BuiltIn(PgBuiltInOids::INT8OID),
                    PgOid::BuiltIn(PgBuiltInOids::INT8OID),
                ],
                Statement::Delete => &[PgOid::BuiltIn(PgBuiltInOids::INT8ARRAYOID)],
            };
            let plan = client.prepare_mut(sql(statement, &queue_table(queue)).as_str(), args)?.keep();
            plans.insert(key.clone(), plan);
        }
        run(client, &plans[&key])
    })
}

/// Reads up to `qty` messages of `queue` visible at `now` (the engine's clock), making them
/// invisible until `now` + `vt` seconds (what pgmq.read does on the wall clock): their msg_id and
/// the task_id they carry, in msg_id order. Nothing from a queue pgmq does not have.
///
/// A C function's symbol keeps its signature forever: an installed schema of an older version
/// calls this library until `ALTER EXTENSION stageflow UPDATE` (see [`read_messages`]), so a new
/// signature gets a new symbol (`read_messages_at_wrapper`).
#[pg_extern(name = "_read_messages")]
fn read_messages_at(
    queue: &str,
    vt: i32,
    qty: i32,
    now: pgrx::datum::TimestampWithTimeZone,
) -> TableIterator<'static, (name!(msg_id, i64), name!(task_id, Option<String>))> {
    let qty = qty.max(0);
    // A queue pgmq does not have reads as empty (the claim then checks the queue, and makes a job
    // type's queue on first use); a name pgmq would not have made is refused.
    queue_table(queue);
    if !queue_exists(queue, &format!("q_{queue}")) {
        return TableIterator::new(Vec::new());
    }
    let now_us = pg_sys::TimestampTz::from(now);
    // Where this read starts (None: the whole queue; see ReadFrom).
    let (low, span) = READ_FROM.with(|from| match from.borrow().get(queue) {
        Some(from) if (0..WHOLE_QUEUE_EVERY_US).contains(&(now_us - from.whole_at)) => (Some(from.low), from.span),
        Some(from) => (None, from.span),
        None => (None, SPAN_LEAST),
    });
    // The visible messages with from <= msg_id < below, oldest first.
    let read = |from: i64, below: i64, qty: i32| -> Vec<(i64, Option<String>)> {
        Spi::connect_mut(|client| {
            with_plan(client, Statement::Read, queue, |client, plan| {
                client
                    .update(plan, None, &[vt.into(), qty.into(), now.into(), from.into(), below.into()])?
                    .map(|row| Ok((row.get::<i64>(1)?.unwrap_or_default(), row.get::<String>(2)?)))
                    .collect()
            })
        })
        .unwrap_or_else(|error| error!("reading queue {queue}: {error}"))
    };
    // From `low`: first the span past it, then, if that ran short, the rest from there on.
    let mut next = span;
    let mut rows = match low {
        Some(low) => {
            let near = low.saturating_add(span).saturating_add(i64::from(qty));
            let mut rows = read(low, near, qty);
            let short = rows.len() < qty as usize;
            let reach = rows.last().map_or(0, |(msg_id, _)| msg_id.saturating_sub(low) + 1 - rows.len() as i64);
            next = next_span(span, short, reach);
            if short {
                rows.extend(read(near, i64::MAX, qty - rows.len() as i32));
            }
            rows
        }
        None => read(i64::MIN, i64::MAX, qty),
    };
    // The messages from `low` on ran out: the rest from below it, which makes this a look at the
    // whole queue.
    let short = rows.len() < qty as usize;
    if let Some(low) = low.filter(|_| short) {
        rows.extend(read(i64::MIN, low, qty - rows.len() as i32));
    }
    let whole = low.is_none() || short;
    rows.sort_unstable_by_key(|(msg_id, _)| *msg_id);
    READ_FROM.with(|from| {
        let mut from = from.borrow_mut();
        let entry = from.entry(queue.to_owned()).or_insert(ReadFrom { low: i64::MIN, whole_at: now_us, span });
        entry.span = next;
        if let Some((first, _)) = rows.first() {
            entry.low = *first;
        }
        if whole {
            entry.whole_at = now_us;
        }
    });
    TableIterator::new(rows)
}

/// 0.1.0's `_read_messages(queue, vt, qty)` (symbol `read_messages_wrapper`), for a 0.1.0 schema
/// on this library between installing the new files and `ALTER EXTENSION stageflow UPDATE`:
/// reads at the wall clock, as 0.1.0 did. No SQL of this version declares it.
#[pg_extern(sql = false)]
fn read_messages(
    queue: &str,
    vt: i32,
    qty: i32,
) -> TableIterator<'static, (name!(msg_id, i64), name!(task_id, Option<String>))> {
    // SAFETY: GetCurrentTransactionStartTimestamp only reads the backend's transaction state, and
    // a function call runs inside a transaction (what now() returns).
    let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    let now = pgrx::datum::TimestampWithTimeZone::try_from(now)
        .unwrap_or_else(|error| error!("the transaction's start time: {error:?}"));
    read_messages_at(queue, vt, qty, now)
}

/// Deletes messages of `queue` (what pgmq.delete does); returns how many there were.
#[pg_extern(name = "_delete_messages")]
fn delete_messages(queue: &str, msg_ids: Vec<i64>) -> i64 {
    Spi::connect_mut(|client| {
        with_plan(client, Statement::Delete, queue, |client, plan| {
            Ok(client.update(plan, None, &[msg_ids.into()])?.len() as i64)
        })
    })
    .unwrap_or_else(|error| error!("deleting messages of queue {queue}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::{next_span, SPAN_LEAST, SPAN_MOST};

    #[test]
    fn a_span_that_ran_short_doubles_up_to_its_most() {
        assert_eq!(next_span(16, true, 0), 32);
        assert_eq!(next_span(SPAN_MOST / 2 + 1, true, 0), SPAN_MOST);
        assert_eq!(next_span(SPAN_MOST, true, 0), SPAN_MOST);
    }

    #[test]
    fn a_span_used_to_less_than_a_quarter_halves_down_to_its_least() {
        assert_eq!(next_span(256, false, 63), 128);
        assert_eq!(next_span(256, false, 64), 256);
        assert_eq!(next_span(SPAN_LEAST + 1, false, 0), SPAN_LEAST);
        assert_eq!(next_span(SPAN_LEAST, false, 0), SPAN_LEAST);
    }
}
