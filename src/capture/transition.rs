//! Reading a statement's transition tables: the slots a statement trigger reads them through (made
//! once per trigger and backend), the tables read from their start, and the memory one row's
//! imaging may take.

use std::cell::Cell;

use pgrx::pg_sys;

use crate::unguarded;

/// Where imaging one row of a statement allocates: output functions and detoasting do, and a
/// long statement must not hold all of it at once.
pub struct RowMemory(pg_sys::MemoryContext);

impl RowMemory {
    pub fn new() -> RowMemory {
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
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> R {
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
    pub slots: [*mut pg_sys::TupleTableSlot; 2],
    /// A statement of this trigger is reading through them.
    lent: Cell<bool>,
}

impl TransitionSlots {
    /// # Safety
    /// `tupdesc` must describe the rows of the transition tables to be read.
    pub unsafe fn new(tupdesc: pg_sys::TupleDesc) -> TransitionSlots {
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
    pub fn lend(&self) -> Option<LentSlots<'_>> {
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
pub struct LentSlots<'a>(pub &'a TransitionSlots);

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
pub struct TransitionTable {
    store: *mut pg_sys::Tuplestorestate,
    slot: *mut pg_sys::TupleTableSlot,
    /// Not spilled to a file: reading cannot fail.
    in_memory: bool,
}

impl TransitionTable {
    /// # Safety
    /// `store` must be a transition table of the firing statement, holding rows described by
    /// `slot`'s descriptor; no other table is read through `slot` at the same time.
    pub unsafe fn open(store: *mut pg_sys::Tuplestorestate, slot: *mut pg_sys::TupleTableSlot) -> TransitionTable {
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
    pub fn next(&mut self) -> Option<*mut pg_sys::TupleTableSlot> {
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
