//! PostgreSQL functions called on the per-row path without pgrx's error guard.
//!
//! pgrx wraps every `pg_sys` call in a `sigsetjmp` (about 150 instructions with its bookkeeping)
//! so that an ERROR raised in C becomes a Rust panic. The functions bound here cannot raise an
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
    /// Frees a context's memory; returns at once if nothing was allocated since the last reset.
    pub fn MemoryContextReset(context: pg_sys::MemoryContext);
}
