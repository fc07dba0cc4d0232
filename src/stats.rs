//! Counters of what pgwatch captured and sent, and of every fallback it took.
//!
//! With pgwatch preloaded they live in shared memory and count the whole cluster; without it,
//! each backend counts its own work. Either way a backend first counts in plain local cells and
//! adds them to the totals when a transaction ends, so the per-row path touches no shared cache
//! line.

use std::cell::Cell;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

#[derive(Clone, Copy)]
pub enum Counter {
    /// Row changes recorded by the trigger.
    RowsCaptured,
    /// Rows listed in sent payloads, after folding.
    RowsSent,
    Notifications,
    PayloadBytes,
    /// Worker transactions that sent notifications.
    Batches,
    /// Rows sent with key columns only because the extra columns did not fit a payload.
    PartialRows,
    /// `"overflow":true` notifications: rows that could not be listed at all.
    Overflows,
    /// Transactions notified inline because the queue was full or had no slot for their database.
    InlineFallbacks,
    /// Delivery workers started again after one stopped.
    WorkerRestarts,
    /// Rows of prepared (two-phase) transactions, which cannot notify.
    PreparedUnsent,
    /// `"op":"resync"` notifications: older changes may have reached subscribers after newer ones.
    Resyncs,
    /// Watch records a delivery worker could not send (a hand-made trigger's), skipped with a WARNING.
    SkippedRecords,
    /// Payloads written to the replay log, and their bytes.
    LogPayloads,
    LogBytes,
    /// Payloads pruned from the log, and their bytes.
    PrunedPayloads,
    PrunedBytes,
    /// Prunes that found a log segment in use by a reader and deleted its rows instead of
    /// truncating it (autovacuum reclaims the space).
    PrunesSkipped,
    /// Reset markers written: gaps in a retained channel's feed that replay cannot fill.
    FeedResets,
    /// Retained watches' transactions notified inline without a slot to announce the gap through.
    RetainedUnlogged,
    /// Transactions whose queued changes the worker passed over, as they took too long to
    /// commit: their subscribers were told to refetch instead.
    PassedOver,
}

pub const COUNTERS: usize = Counter::PassedOver as usize + 1;

/// The totals: in the shared segment, or this backend's own.
pub type Counters = [AtomicU64; COUNTERS];

/// This backend's totals, used when the shared segment is not there.
static LOCAL: Counters = [const { AtomicU64::new(0) }; COUNTERS];

/// The totals in the shared segment, once it is set up (see `deliver::shmem`).
static SHARED: AtomicPtr<Counters> = AtomicPtr::new(std::ptr::null_mut());

/// Counts into `counters` from now on: the shared segment's, set up by the postmaster before any
/// backend forks.
pub fn attach(counters: &'static Counters) {
    SHARED.store(std::ptr::from_ref(counters).cast_mut(), Ordering::Release);
}

thread_local! {
    /// Counted since the last flush.
    static PENDING: [Cell<u64>; COUNTERS] = const { [const { Cell::new(0) }; COUNTERS] };
}

fn totals() -> &'static Counters {
    // SAFETY: set once, before any backend forks, to counters in shared memory that live as long
    // as the postmaster.
    unsafe { SHARED.load(Ordering::Acquire).as_ref() }.unwrap_or(&LOCAL)
}

pub fn add(counter: Counter, n: u64) {
    PENDING.with(|pending| {
        let cell = &pending[counter as usize];
        cell.set(cell.get() + n);
    });
}

/// Adds what this backend counted to the totals; called when a transaction ends.
pub fn flush() {
    let totals = totals();
    PENDING.with(|pending| {
        for (total, cell) in totals.iter().zip(pending) {
            let n = cell.replace(0);
            if n > 0 {
                total.fetch_add(n, Ordering::Relaxed);
            }
        }
    });
}

pub fn get(counter: Counter) -> i64 {
    totals()[counter as usize].load(Ordering::Relaxed) as i64
}
