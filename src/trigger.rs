//! The trigger each watch installs: encodes the changed rows' watched columns (or notes a
//! TRUNCATE) and records them for this transaction. No SPI, no catalog lookups and nothing that can
//! fail a user's write.
//!
//! Plain tables get statement triggers that read the statement's transition tables: PostgreSQL
//! then only appends each row to a tuplestore, instead of queueing an AFTER-trigger event per row
//! and fetching the row again to fire it. Row triggers remain where a statement trigger would
//! miss rows or see them out of order, or cannot express the watch (`catalog` decides).

use std::cell::Cell;
use std::convert::Infallible;

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

use crate::api::fail;
use crate::coalesce::Change;
use crate::payload::{Image, Op};
use crate::plan::{Columns, Plan};
use crate::{guc, plan, unguarded, xact};

#[pg_trigger(
    sql = "CREATE FUNCTION pgwatch.capture() RETURNS trigger LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';"
)]
fn capture<'a>(trigger: &'a PgTrigger<'a>) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, Infallible> {
    if guc::MUTE.get() {
        return Ok(None);
    }
    let data = trigger.trigger_data();
    let event = data.tg_event & pg_sys::TRIGGER_EVENT_OPMASK;
    let is_row = data.tg_event & pg_sys::TRIGGER_EVENT_ROW != 0;
    let op = match event {
        pg_sys::TRIGGER_EVENT_INSERT => Op::Insert,
        pg_sys::TRIGGER_EVENT_UPDATE => Op::Update,
        pg_sys::TRIGGER_EVENT_DELETE => Op::Delete,
        _ if !is_row => {
            // SAFETY: this is a firing trigger of pgwatch.capture.
            xact::record_truncate(&unsafe { plan::for_trigger(data) }.target);
            return Ok(None);
        }
        _ => misfired("a row trigger on TRUNCATE"),
    };
    let missing_tables = match op {
        Op::Insert => data.tg_newtable.is_null(),
        Op::Update => data.tg_oldtable.is_null() || data.tg_newtable.is_null(),
        Op::Delete => data.tg_oldtable.is_null(),
    };
    if !is_row && missing_tables {
        misfired("a statement trigger without the transition tables watch_table() asks for");
    }
    // A statement that changed no row has nothing to report, not even an overflow.
    let table = if op == Op::Delete { data.tg_oldtable } else { data.tg_newtable };
    // SAFETY: a transition table of the firing statement, checked above to be there.
    let statement_rows = if is_row { 1 } else { unsafe { unguarded::tuplestore_tuple_count(table) } };
    if statement_rows <= 0 {
        return Ok(None);
    }
    // SAFETY: this is a firing trigger of pgwatch.capture.
    let plan = unsafe { plan::for_trigger(data) };
    let Some(columns) = &plan.columns else {
        xact::record_overflow(&plan.target, op);
        return Ok(None);
    };
    if is_row {
        // SAFETY: a row trigger's tuples are valid and described by its relation's descriptor:
        // the old row (or the inserted one) in tg_trigtuple, the new row of an update in
        // tg_newtuple.
        let image = |tuple| unsafe { columns.image_of_tuple(tuple, (*data.tg_relation).rd_att) };
        let (before, after) = match op {
            Op::Insert => (None, Some(data.tg_trigtuple)),
            Op::Update => (Some(data.tg_trigtuple), Some(data.tg_newtuple)),
            Op::Delete => (Some(data.tg_trigtuple), None),
        };
        record(&plan, op, before.map(image), after.map(image));
    } else {
        // SAFETY: the transition tables of a firing statement trigger on the plan's table.
        unsafe { record_transition_tables(data, &plan, columns, op, statement_rows) };
    }
    Ok(None)
}

/// Records one row's change from its images (`Some(None)`: an image that does not fit).
fn record(plan: &Plan, op: Op, before: Option<Option<Image>>, after: Option<Option<Image>>) {
    match (before, after) {
        (Some(None), _) | (_, Some(None)) => xact::record_overflow(&plan.target, op),
        (before, after) => xact::record(&plan.target, op, Change { before: before.flatten(), after: after.flatten() }),
    }
}

/// Records every row of a statement (`rows` of them) from its transition tables. An update's old
/// and new rows are stored pairwise, in the order the rows changed, so the two tables are read in
/// step.
///
/// # Safety
/// `data` must be a firing statement trigger's, with the transition tables `op` needs, on the
/// table `plan` was built for.
unsafe fn record_transition_tables(data: &pg_sys::TriggerData, plan: &Plan, columns: &Columns, op: Op, rows: i64) {
    // SAFETY: as the caller promised, the transition tables hold rows of the plan's table.
    let tupdesc = unsafe { (*data.tg_relation).rd_att };
    let kept = plan.transition_slots.get_or_init(|| unsafe { TransitionSlots::new(tupdesc) });
    // A statement of the same trigger fired while this one reads would read through its own.
    let nested;
    let lent = match kept.lend() {
        Some(lent) => lent,
        None => {
            // SAFETY: as above.
            nested = unsafe { TransitionSlots::new(tupdesc) };
            nested.lend().expect("new slots are free")
        }
    };
    let [old_slot, new_slot] = lent.0.slots;
    let open = |table: *mut pg_sys::Tuplestorestate, slot| {
        // SAFETY: a transition table of this statement, holding rows of the trigger's table, each
        // read through a slot of its own.
        (!table.is_null()).then(|| unsafe { TransitionTable::open(table, slot) })
    };
    let (mut old, mut new) = match op {
        Op::Insert => (None, open(data.tg_newtable, new_slot)),
        Op::Update => (open(data.tg_oldtable, old_slot), open(data.tg_newtable, new_slot)),
        Op::Delete => (open(data.tg_oldtable, old_slot), None),
    };
    xact::expect_rows(&plan.target, usize::try_from(rows).unwrap_or(0));
    let per_row = columns.allocates().then(RowMemory::new);
    loop {
        // Per table: None when the op has no such table, Some(None) once it is read to its end.
        let (old_row, new_row) = (old.as_mut().map(TransitionTable::next), new.as_mut().map(TransitionTable::next));
        match (old_row, new_row) {
            (None | Some(None), None | Some(None)) => break,
            // Old and new rows of an update come in pairs; if one table ran out first, the rest
            // cannot be listed, only announced.
            (Some(None), Some(Some(_))) | (Some(Some(_)), Some(None)) => {
                xact::record_overflow(&plan.target, op);
                break;
            }
            (old_row, new_row) => {
                // SAFETY: each slot holds a row of the trigger's table until its next read. The
                // rows are read outside per_row, so a slot never holds a tuple its reset frees.
                let image = |row: Option<Option<_>>| {
                    row.flatten().map(|slot| {
                        let image = || unsafe { columns.image_of_slot(slot) };
                        match &per_row {
                            Some(memory) => memory.run(image),
                            None => image(),
                        }
                    })
                };
                // A row whose key does not fit a payload is recorded as an overflow; the
                // statement's other rows are still listed.
                record(plan, op, image(old_row), image(new_row));
            }
        }
    }
}

/// Where imaging one row of a statement allocates: output functions and detoasting do, and a
/// long statement must not hold all of it at once.
struct RowMemory(pg_sys::MemoryContext);

impl RowMemory {
    fn new() -> RowMemory {
        // SAFETY: a child of the trigger call's context, so it goes with it even on an ERROR.
        RowMemory(unsafe {
            pg_sys::AllocSetContextCreateExtended(
                pg_sys::CurrentMemoryContext,
                c"pgwatch transition row".as_ptr(),
                pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
            )
        })
    }

    /// Runs `f` with this context current, then frees what it allocated: `f` returns only
    /// Rust-owned values.
    fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        let result = in_context(self.0, f);
        // SAFETY: nothing allocated in the context is referenced any more.
        unsafe { unguarded::MemoryContextReset(self.0) };
        result
    }
}

/// Runs `f` with `context` current, switching back afterwards, also when `f` unwinds.
fn in_context<R>(context: pg_sys::MemoryContext, f: impl FnOnce() -> R) -> R {
    struct Restore(pg_sys::MemoryContext);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: switching back to the context that was current before.
            unsafe { pg_sys::CurrentMemoryContext = self.0 };
        }
    }
    // SAFETY: switching memory contexts is an assignment, as MemoryContextSwitchTo does.
    let _restore = Restore(unsafe {
        let previous = pg_sys::CurrentMemoryContext;
        pg_sys::CurrentMemoryContext = context;
        previous
    });
    f()
}

impl Drop for RowMemory {
    fn drop(&mut self) {
        // SAFETY: made by new() and not current (run() switches back).
        unsafe { pg_sys::MemoryContextDelete(self.0) };
    }
}

/// The two slots a statement trigger reads its transition tables through (an update reads old
/// and new rows in step), made once per trigger and backend and kept with its plan: making and
/// dropping slots for every statement cost more than imaging its row. They describe rows with a
/// copy of the table's descriptor (with its defaults for rows stored before a column was added)
/// that is not reference-counted, so they hold no pin between statements.
pub struct TransitionSlots {
    /// Holds the slots and the descriptor copy.
    memory: pg_sys::MemoryContext,
    slots: [*mut pg_sys::TupleTableSlot; 2],
    /// A statement of this trigger is reading through them.
    lent: Cell<bool>,
}

impl TransitionSlots {
    /// # Safety
    /// `tupdesc` must describe the rows of the transition tables to be read.
    unsafe fn new(tupdesc: pg_sys::TupleDesc) -> TransitionSlots {
        // SAFETY: a context of its own under TopMemoryContext, deleted with these slots (also if
        // making them fails half-way); the caller's context is current again afterwards.
        unsafe {
            let memory = pg_sys::AllocSetContextCreateExtended(
                pg_sys::TopMemoryContext,
                c"pgwatch transition slots".as_ptr(),
                pg_sys::ALLOCSET_SMALL_MINSIZE as usize,
                pg_sys::ALLOCSET_SMALL_INITSIZE as usize,
                pg_sys::ALLOCSET_SMALL_MAXSIZE as usize,
            );
            let mut made = TransitionSlots { memory, slots: [std::ptr::null_mut(); 2], lent: Cell::new(false) };
            in_context(memory, || {
                let tupdesc = pg_sys::CreateTupleDescCopyConstr(tupdesc);
                for slot in &mut made.slots {
                    *slot = pg_sys::MakeSingleTupleTableSlot(tupdesc, &pg_sys::TTSOpsMinimalTuple);
                }
            });
            made
        }
    }

    /// The slots, unless a statement of the same trigger is reading through them already.
    fn lend(&self) -> Option<LentSlots<'_>> {
        (!self.lent.replace(true)).then_some(LentSlots(self))
    }
}

impl Drop for TransitionSlots {
    fn drop(&mut self) {
        // SAFETY: the context holds only these slots and their descriptor; the slots hold no row
        // (see LentSlots) and pin no descriptor, and a plan (their owner) is dropped only when no
        // trigger runs with it.
        unsafe { pg_sys::MemoryContextDelete(self.memory) };
    }
}

/// Slots lent to one statement, given back empty when it is done (also when it unwinds).
struct LentSlots<'a>(&'a TransitionSlots);

impl Drop for LentSlots<'_> {
    fn drop(&mut self) {
        for &slot in &self.0.slots {
            // SAFETY: a slot made by TransitionSlots::new. A row read from a spilled table is a
            // copy the slot owns, in memory of this trigger call; clearing frees it now, while
            // that memory is still there, instead of at the next statement's first read.
            unsafe { unguarded::clear_slot(slot) };
        }
        self.0.lent.set(false);
    }
}

/// A transition table read from its start through a slot lent to the statement.
struct TransitionTable {
    store: *mut pg_sys::Tuplestorestate,
    slot: *mut pg_sys::TupleTableSlot,
    /// Not spilled to a file: reading cannot fail.
    in_memory: bool,
}

impl TransitionTable {
    /// # Safety
    /// `store` must be a transition table of the firing statement, holding rows described by
    /// `slot`'s descriptor; no other table is read through `slot` at the same time.
    unsafe fn open(store: *mut pg_sys::Tuplestorestate, slot: *mut pg_sys::TupleTableSlot) -> TransitionTable {
        // SAFETY: every trigger on the table and event shares this tuplestore; read pointer 0
        // is the one its other readers do not use (they allocate their own), and rewinding it
        // is allowed (transition tables are created with EXEC_FLAG_REWIND).
        unsafe {
            unguarded::tuplestore_select_read_pointer(store, 0);
            let mut table = TransitionTable { store, slot, in_memory: unguarded::tuplestore_in_memory(store) };
            table.rewind();
            table
        }
    }

    /// Rewinds read pointer 0 (see open()).
    fn rewind(&mut self) {
        // SAFETY: rewinding a tuplestore in memory cannot raise an ERROR; a spilled one may (a
        // file seek), so it goes through the guard.
        unsafe {
            if self.in_memory {
                unguarded::tuplestore_rescan(self.store);
            } else {
                pg_sys::tuplestore_rescan(self.store);
            }
        }
    }

    /// The next row, valid until the next call; `None` at the end, where the slot is cleared and
    /// the table rewound for any later reader of read pointer 0.
    fn next(&mut self) -> Option<*mut pg_sys::TupleTableSlot> {
        // SAFETY: the slot describes the store's rows; a tuplestore in memory is read without
        // raising an ERROR, so the guard is needed only for a spilled one. A row in memory is
        // shown in place; one read from the file is a copy the slot owns (see LentSlots).
        let found = unsafe {
            if self.in_memory {
                unguarded::tuplestore_gettupleslot(self.store, true, false, self.slot)
            } else {
                pg_sys::tuplestore_gettupleslot(self.store, true, false, self.slot)
            }
        };
        if !found {
            self.rewind();
        }
        found.then_some(self.slot)
    }
}

/// pgwatch.capture() was attached by hand in a way watch_table() never does.
fn misfired(how: &str) -> ! {
    fail(
        PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
        format!("pgwatch.capture() was fired as {how}"),
        "watch tables with watch_table(), which creates pgwatch's triggers",
    )
}
