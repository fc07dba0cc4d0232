//! PostgreSQL functions called on the per-row path without pgrx's error guard.
//!
//! pgrx wraps every `pg_sys` call in a `sigsetjmp` and its bookkeeping, so that an ERROR raised
//! in C becomes a Rust panic. The functions bound here cannot raise an
//! ERROR for the arguments pgwatch passes them, so the guard buys nothing and costs a large share
//! of what capturing a row costs.

use pgrx::pg_sys::{self, SubTransactionId};

unsafe extern "C" {
    /// Reads the transaction state.
    pub fn GetCurrentTransactionNestLevel() -> i32;
    /// Reads the transaction state.
    pub fn GetCurrentSubTransactionId() -> SubTransactionId;
    /// Deforms a slot's first `attnum` columns; raises only for an attribute number beyond the
    /// slot's descriptor, and pgwatch passes one resolved from that descriptor.
    pub fn slot_getsomeattrs_int(slot: *mut pg_sys::TupleTableSlot, attnum: i32);
    /// Reads the next row of a tuplestore; raises only when reading a spilled one from its file,
    /// so pgwatch calls it this way only for a tuplestore held in memory.
    pub fn tuplestore_gettupleslot(
        state: *mut pg_sys::Tuplestorestate,
        forward: bool,
        copy: bool,
        slot: *mut pg_sys::TupleTableSlot,
    ) -> bool;
    /// Whether a tuplestore is held in memory; a plain read.
    pub fn tuplestore_in_memory(state: *mut pg_sys::Tuplestorestate) -> bool;
    /// How many rows a tuplestore holds; a plain read.
    pub fn tuplestore_tuple_count(state: *mut pg_sys::Tuplestorestate) -> i64;
    /// Makes an existing read pointer the active one; raises only for a pointer that does not
    /// exist, and pgwatch uses pointer 0, which always does.
    pub fn tuplestore_select_read_pointer(state: *mut pg_sys::Tuplestorestate, ptr: i32);
    /// Rewinds the active read pointer; raises only when seeking in a spilled tuplestore's
    /// file, so pgwatch calls it this way only for a tuplestore held in memory.
    pub fn tuplestore_rescan(state: *mut pg_sys::Tuplestorestate);
    /// Frees a context's memory; returns at once if nothing was allocated since the last reset.
    pub fn MemoryContextReset(context: pg_sys::MemoryContext);
}

/// Empties a slot as PostgreSQL's inline `ExecClearTuple` does, through its type's `clear`. For a
/// minimal, heap or virtual tuple slot that at most frees a row the slot owns, which raises only
/// for memory pfree did not hand out; a buffer slot's would release a buffer pin, which can raise.
///
/// # Safety
/// `slot` must be a valid slot that is not a buffer slot.
pub unsafe fn clear_slot(slot: *mut pg_sys::TupleTableSlot) {
    // SAFETY: a valid slot, as the caller promised, whose ops table every slot type fills in.
    unsafe { ((*(*slot).tts_ops).clear.expect("every slot type can be cleared"))(slot) }
}
