//! Counters of what pgwatch captured and sent, and of every fallback it took.
//!
//! They count this backend's work since it started (`pgwatch.stats()` reads them).

use std::sync::atomic::{AtomicU64, Ordering};

use pgrx::prelude::*;

#[derive(Clone, Copy)]
pub enum Counter {
    /// Row changes recorded by the trigger.
    RowsCaptured,
    /// Rows listed in sent payloads, after folding.
    RowsSent,
    Notifications,
    PayloadBytes,
    /// Rows sent with key columns only because the extra columns did not fit a payload.
    PartialRows,
    /// `"overflow":true` notifications: rows that could not be listed at all.
    Overflows,
    /// Rows of prepared (two-phase) transactions, which cannot notify.
    PreparedUnsent,
}

const COUNTERS: usize = Counter::PreparedUnsent as usize + 1;

static VALUES: [AtomicU64; COUNTERS] = [const { AtomicU64::new(0) }; COUNTERS];

pub fn add(counter: Counter, n: u64) {
    VALUES[counter as usize].fetch_add(n, Ordering::Relaxed);
}

fn get(counter: Counter) -> i64 {
    VALUES[counter as usize].load(Ordering::Relaxed) as i64
}

#[pg_schema]
mod pgwatch {
    use super::*;

    /// One row of counters: see the README's "Stats" section.
    #[pg_extern(volatile, parallel_safe)]
    fn stats() -> TableIterator<
        'static,
        (
            name!(rows_captured, i64),
            name!(rows_sent, i64),
            name!(notifications, i64),
            name!(payload_bytes, i64),
            name!(partial_rows, i64),
            name!(overflows, i64),
            name!(prepared_unsent, i64),
        ),
    > {
        TableIterator::once((
            get(Counter::RowsCaptured),
            get(Counter::RowsSent),
            get(Counter::Notifications),
            get(Counter::PayloadBytes),
            get(Counter::PartialRows),
            get(Counter::Overflows),
            get(Counter::PreparedUnsent),
        ))
    }
}
