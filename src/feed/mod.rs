//! The resumable feed of a retained watch (`watch_table(..., retain)`): its payloads kept in a
//! log for replay, numbered by a sequence that survives restarts, with reset markers where a gap
//! cannot be replayed. See docs/replay.md.
//!
//! - `log`: what the delivery worker writes, in the transaction that sends the payloads.
//! - `prune`: the ring of log segments, emptied as retention ends or the size cap asks.
//! - `read`: `pgwatch.position()` and `pgwatch.replay()`, with their access checks.
//!
//! Only the delivery worker writes the feeds and the log, so that no user transaction can hold a
//! lock that stops it. Sequence numbers start from the clock (microseconds since 2000): after a
//! reset a feed goes on above the clock and above what it reserved durably, so above anything
//! sent before, even what a crash kept out of the log.

pub mod log;
pub mod prune;
pub mod read;

/// Sequence numbers a feed reserves durably ahead of what it sends: committing the reservation
/// synchronously once per this many payloads lets every other batch commit asynchronously.
pub const RESERVE_AHEAD: i64 = 10_000;

/// The log's segments (`pgwatch.log_0` .. `log_7`, see `sql/feed.sql`).
pub const SEGMENTS: i32 = 8;

/// The clock, in microseconds since 2000-01-01.
pub fn clock() -> i64 {
    // SAFETY: reading the clock.
    unsafe { pgrx::pg_sys::GetCurrentTimestamp() }
}
