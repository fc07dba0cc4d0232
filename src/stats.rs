//! Counters of what pgwatch captured and sent, and of every fallback it took.
//!
//! With pgwatch preloaded they live in shared memory and count the whole cluster; without it,
//! each backend counts its own work. Either way a backend first counts in plain local cells and
//! adds them to the totals when a transaction ends, so the per-row path touches no shared cache
//! line.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use pgrx::prelude::*;

use crate::queue;

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
}

pub const COUNTERS: usize = Counter::SkippedRecords as usize + 1;

/// This backend's totals, used when the shared segment is not there.
static LOCAL: [AtomicU64; COUNTERS] = [const { AtomicU64::new(0) }; COUNTERS];

thread_local! {
    /// Counted since the last flush.
    static PENDING: [Cell<u64>; COUNTERS] = const { [const { Cell::new(0) }; COUNTERS] };
}

fn totals() -> &'static [AtomicU64; COUNTERS] {
    queue::shared().map_or(&LOCAL, |shared| &shared.counters)
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

fn get(counter: Counter) -> i64 {
    totals()[counter as usize].load(Ordering::Relaxed) as i64
}

#[pg_schema]
mod pgwatch {
    use super::*;

    /// One row of counters: see docs/api.md (`pgwatch.stats()`).
    #[pg_extern(volatile, parallel_safe)]
    fn stats() -> TableIterator<
        'static,
        (
            name!(rows_captured, i64),
            name!(rows_sent, i64),
            name!(notifications, i64),
            name!(payload_bytes, i64),
            name!(batches, i64),
            name!(rows_per_notification, f64),
            name!(partial_rows, i64),
            name!(overflows, i64),
            name!(inline_fallbacks, i64),
            name!(queue_high_water, i64),
            name!(worker_restarts, i64),
            name!(prepared_unsent, i64),
            name!(resyncs, i64),
            name!(skipped_records, i64),
        ),
    > {
        flush();
        let notifications = get(Counter::Notifications);
        let high_water = queue::shared().map_or(0, |s| s.high_water.load(Ordering::Relaxed) as i64);
        TableIterator::once((
            get(Counter::RowsCaptured),
            get(Counter::RowsSent),
            notifications,
            get(Counter::PayloadBytes),
            get(Counter::Batches),
            get(Counter::RowsSent) as f64 / notifications.max(1) as f64,
            get(Counter::PartialRows),
            get(Counter::Overflows),
            get(Counter::InlineFallbacks),
            high_water,
            get(Counter::WorkerRestarts),
            get(Counter::PreparedUnsent),
            get(Counter::Resyncs),
            get(Counter::SkippedRecords),
        ))
    }
}
