//! The log's ring of segments: which one the worker writes to, when it moves on, and emptying the
//! old ones once every payload in them is past its retention (or earlier, when the log outgrows
//! `pgwatch.log_max_size`), by TRUNCATE, never waiting for a reader.

use std::time::{Duration, Instant};

use pgrx::prelude::*;

use super::SEGMENTS;
use crate::error;
use crate::guc;
use crate::stats::{self, Counter};

/// How much a logged payload is counted for: its bytes and about what a row and its index entry
/// take besides.
pub fn logged_bytes(payload: usize) -> i64 {
    payload as i64 + 100
}

/// How often the worker looks at the ring.
const PRUNE_INTERVAL: Duration = Duration::from_secs(1);

/// A segment as `pgwatch.log_segments` holds it; times in microseconds since 2000.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub segment: i32,
    pub opened: Option<i64>,
    pub last_sent: Option<i64>,
    pub payloads: i64,
    pub bytes: i64,
}

/// What to do with the ring now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Segments to empty, and whether each still held payloads within their retention.
    pub empty: Vec<(i32, bool)>,
    /// The segment to write to from now on, if it changes.
    pub open: Option<i32>,
}

/// Plans the ring's upkeep at `now`: the worker writes to `current`; payloads are kept for
/// `retain` (the longest of the database's retained watches); the log may take `cap` bytes.
///
/// The current segment is left for the next one after a quarter of `retain` (at least a second)
/// or a sixth of the cap, so that segments empty about as fast as they fill and the eight of them
/// hold about `retain` and a half. A segment is emptied once its last payload is `retain` old;
/// while the log is over its cap, the oldest full segments are emptied early (cut short).
pub fn plan(segments: &[Segment], current: i32, retain: i64, cap: i64, now: i64) -> Plan {
    let mut plan = Plan::default();
    let expired = |s: &Segment| s.last_sent.is_none_or(|last| last + retain <= now);
    let Some(cur) = segments.iter().find(|s| s.segment == current) else {
        return plan;
    };
    let rotate_every = (retain / 4).max(1_000_000);
    let mut held: i64 = segments.iter().map(|s| s.bytes).sum();
    // Oldest first, from the segment after the current one round the ring.
    let order: Vec<&Segment> = (1..SEGMENTS)
        .map(|i| (current + i) % SEGMENTS)
        .filter_map(|n| segments.iter().find(|s| s.segment == n))
        .collect();
    for s in &order {
        if s.payloads == 0 {
            continue;
        }
        let cut = !expired(s);
        if cut && held <= cap {
            continue;
        }
        held -= s.bytes;
        plan.empty.push((s.segment, cut));
    }
    let due = cur.opened.is_none_or(|opened| opened + rotate_every <= now) || cur.bytes > cap / 6;
    if cur.payloads > 0 && due {
        let next = (current + 1) % SEGMENTS;
        let next_segment = segments.iter().find(|s| s.segment == next);
        if let Some(s) = next_segment.filter(|s| s.payloads > 0 && !plan.empty.iter().any(|(n, _)| *n == next)) {
            // The ring is full of payloads within their retention: the oldest go early.
            plan.empty.push((s.segment, !expired(s)));
        }
        plan.open = Some(next);
    }
    plan
}

/// How far past the time it is written a segment's `last_sent` says payloads were sent (its
/// lease). The worker writes a segment's row when the lease runs low, about once a second, not
/// for every batch: every payload it logs is within its segment's lease, so counts that a crash
/// keeps from the row never let a segment be emptied before its payloads' retention ends.
const LEASE: i64 = 2_000_000;

/// The ring as the worker keeps it.
pub struct Ring {
    current: i32,
    checked: Option<Instant>,
    /// The log may hold payloads: only then is it looked after (a database whose watches keep
    /// nothing costs its worker no transaction a second).
    pub active: bool,
    /// Payloads and bytes logged into the current segment that its row does not count yet.
    uncounted: (i64, i64),
    /// The current segment's lease, once written in this run.
    leased: Option<i64>,
}

impl Ring {
    /// The segment being written to (the one opened last), in a transaction.
    pub fn load() -> Ring {
        let (current, active) = Spi::get_two::<i32, bool>(
            "SELECT segment, (SELECT sum(payloads) > 0 FROM pgwatch.log_segments)
               FROM pgwatch.log_segments ORDER BY opened DESC NULLS LAST, segment LIMIT 1",
        )
        .unwrap_or_else(|e| error::spi_failed("pgwatch.log_segments", e));
        Ring {
            current: current.unwrap_or(0),
            checked: None,
            active: active.unwrap_or(false),
            uncounted: (0, 0),
            leased: None,
        }
    }

    pub fn current(&self) -> i32 {
        self.current
    }

    /// Counts `payloads` of `bytes` logged into the current segment at `now`, in the transaction
    /// that logs them: the counts and lease to add to the segment's row now (when its lease
    /// runs low, and for the segment's first payloads), if any.
    pub fn count(&mut self, payloads: i64, bytes: i64, now: i64) -> Option<(i64, i64, i64)> {
        self.uncounted = (self.uncounted.0 + payloads, self.uncounted.1 + bytes);
        if self.leased.is_some_and(|until| until - now > LEASE / 2) {
            return None;
        }
        let until = now + LEASE;
        self.leased = Some(until);
        let (payloads, bytes) = std::mem::take(&mut self.uncounted);
        Some((payloads, bytes, until))
    }

    /// Whether the log may hold payloads and a second has passed since it was last looked at.
    pub fn due(&self) -> bool {
        self.active && self.checked.is_none_or(|at| at.elapsed() >= PRUNE_INTERVAL)
    }

    /// Looks after the ring, in a transaction: empties segments and moves on as [`plan`] says,
    /// and forgets feeds that no watch keeps and the log no longer holds.
    pub fn prune(&mut self) {
        self.checked = Some(Instant::now());
        let (payloads, bytes) = std::mem::take(&mut self.uncounted);
        if payloads > 0 {
            Spi::run_with_args(
                "UPDATE pgwatch.log_segments SET payloads = payloads + $2, bytes = bytes + $3 WHERE segment = $1",
                &[self.current.into(), payloads.into(), bytes.into()],
            )
            .unwrap_or_else(|e| error::spi_failed("pgwatch.log_segments", e));
        }
        let segments = Spi::connect(|client| {
            client
                .select(
                    "SELECT segment, (extract(epoch FROM opened - '2000-01-01 UTC') * 1000000)::int8,
                            (extract(epoch FROM last_sent - '2000-01-01 UTC') * 1000000)::int8, payloads, bytes
                       FROM pgwatch.log_segments",
                    None,
                    &[],
                )?
                .map(|row| {
                    Ok(Segment {
                        segment: row.get(1)?.unwrap_or_default(),
                        opened: row.get(2)?,
                        last_sent: row.get(3)?,
                        payloads: row.get(4)?.unwrap_or_default(),
                        bytes: row.get(5)?.unwrap_or_default(),
                    })
                })
                .collect::<Result<Vec<_>, pgrx::spi::SpiError>>()
        })
        .unwrap_or_else(|e| error::spi_failed("pgwatch.log_segments", e));
        let retain = Spi::get_one::<i64>(
            "SELECT (extract(epoch FROM max(retain)) * 1000000)::int8 FROM pgwatch.watches WHERE retain IS NOT NULL",
        )
        .unwrap_or_else(|e| error::spi_failed("pgwatch.watches", e))
        .unwrap_or(0);
        let cap = i64::from(guc::LOG_MAX_SIZE_MB.get()) << 20;
        let plan = plan(&segments, self.current, retain, cap, super::clock());
        for &(segment, cut) in &plan.empty {
            let held = segments.iter().find(|s| s.segment == segment).expect("planned from these");
            empty(held, cut);
        }
        self.active = segments.iter().any(|s| s.payloads > 0 && !plan.empty.iter().any(|(n, _)| *n == s.segment));
        if let Some(next) = plan.open {
            Spi::run_with_args(
                "UPDATE pgwatch.log_segments SET opened = pg_catalog.now() WHERE segment = $1",
                &[next.into()],
            )
            .unwrap_or_else(|e| error::spi_failed("pgwatch.log_segments", e));
            self.current = next;
            self.leased = None;
            // Feeds no watch keeps any more, once the log holds nothing of them.
            Spi::run(
                "DELETE FROM pgwatch.feeds f
                  WHERE NOT EXISTS (SELECT FROM pgwatch.watches w WHERE w.channel = f.channel AND w.retain IS NOT NULL)
                    AND NOT EXISTS (SELECT FROM pgwatch.log l WHERE l.channel = f.channel)",
            )
            .unwrap_or_else(|e| error::spi_failed("pgwatch.feeds", e));
        }
    }
}

/// Empties `segment`: TRUNCATE when no one reads it, else DELETE (counted: a reader holds the
/// log, and autovacuum reclaims the rows later). `cut`: its payloads were still within their
/// retention, which their feeds count.
fn empty(segment: &Segment, cut: bool) {
    let table = format!("pgwatch.log_{}", segment.segment);
    if cut {
        Spi::run(&format!(
            "UPDATE pgwatch.feeds f SET cut_short = cut_short + 1
               FROM (SELECT DISTINCT channel, feed FROM {table}) l WHERE l.channel = f.channel AND l.feed = f.feed"
        ))
        .unwrap_or_else(|e| error::spi_failed("pgwatch.feeds", e));
    }
    let relid = Spi::get_one::<pg_sys::Oid>(&format!("SELECT '{table}'::pg_catalog.regclass::pg_catalog.oid"))
        .unwrap_or_else(|e| error::spi_failed(&table, e))
        .expect("the log's segments exist");
    // SAFETY: takes the lock only if it is free; held until the transaction ends.
    let free = unsafe { pg_sys::ConditionalLockRelationOid(relid, pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE) };
    let statement = if free {
        format!("TRUNCATE {table}")
    } else {
        stats::add(Counter::PrunesSkipped, 1);
        format!("DELETE FROM {table}")
    };
    Spi::run(&statement).unwrap_or_else(|e| error::spi_failed(&table, e));
    Spi::run_with_args(
        "UPDATE pgwatch.log_segments SET payloads = 0, bytes = 0, last_sent = NULL WHERE segment = $1",
        &[segment.segment.into()],
    )
    .unwrap_or_else(|e| error::spi_failed("pgwatch.log_segments", e));
    stats::add(Counter::PrunedPayloads, segment.payloads as u64);
    stats::add(Counter::PrunedBytes, segment.bytes as u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    fn seg(segment: i32, opened: i64, last_sent: Option<i64>, payloads: i64, bytes: i64) -> Segment {
        Segment { segment, opened: Some(opened), last_sent, payloads, bytes }
    }

    fn empty_ring(current: i32, opened: i64) -> Vec<Segment> {
        (0..SEGMENTS)
            .map(|n| {
                if n == current {
                    seg(n, opened, None, 0, 0)
                } else {
                    Segment { segment: n, opened: None, last_sent: None, payloads: 0, bytes: 0 }
                }
            })
            .collect()
    }

    #[test]
    fn the_current_segment_moves_on_after_a_quarter_of_the_retention() {
        let mut ring = empty_ring(0, 0);
        ring[0] = seg(0, 0, Some(10 * S), 5, 500);
        assert_eq!(plan(&ring, 0, 3600 * S, 1 << 30, 899 * S), Plan::default());
        assert_eq!(plan(&ring, 0, 3600 * S, 1 << 30, 900 * S), Plan { empty: vec![], open: Some(1) });
        // An empty segment stays.
        ring[0].payloads = 0;
        assert_eq!(plan(&ring, 0, 3600 * S, 1 << 30, 9000 * S), Plan::default());
    }

    #[test]
    fn a_segment_is_emptied_once_its_last_payload_is_past_retention() {
        let mut ring = empty_ring(2, 100 * S);
        ring[1] = seg(1, 50 * S, Some(99 * S), 3, 300);
        assert_eq!(plan(&ring, 2, 10 * S, 1 << 30, 108 * S).empty, vec![]);
        assert_eq!(plan(&ring, 2, 10 * S, 1 << 30, 109 * S).empty, vec![(1, false)]);
    }

    #[test]
    fn over_the_cap_the_oldest_segments_go_early_and_are_counted_as_cut_short() {
        let mut ring = empty_ring(3, 100 * S);
        ring[3] = seg(3, 100 * S, Some(101 * S), 1, 100);
        ring[1] = seg(1, 80 * S, Some(90 * S), 10, 600);
        ring[2] = seg(2, 90 * S, Some(100 * S), 10, 600);
        // 1,300 bytes held, 1,000 allowed: segment 1 (oldest) goes, then 700 fit.
        assert_eq!(plan(&ring, 3, 3600 * S, 1000, 101 * S).empty, vec![(1, true)]);
    }

    #[test]
    fn a_segments_row_is_written_for_its_first_payloads_and_when_its_lease_runs_low() {
        let mut ring = Ring { current: 0, checked: None, active: false, uncounted: (0, 0), leased: None };
        assert_eq!(ring.count(1, 100, 10 * S), Some((1, 100, 12 * S)));
        assert_eq!(ring.count(2, 200, 10 * S + S / 2), None);
        assert_eq!(ring.count(1, 100, 11 * S - 1), None);
        // A second of the lease left: written again, with what it did not count yet.
        assert_eq!(ring.count(1, 50, 11 * S), Some((4, 350, 13 * S)));
    }

    #[test]
    fn a_full_ring_empties_the_next_segment_before_moving_on() {
        let ring: Vec<Segment> =
            (0..SEGMENTS).map(|n| seg(n, i64::from(n) * S, Some(i64::from(n) * S + 1), 1, 100)).collect();
        let planned = plan(&ring, 7, 3600 * S, 1 << 30, 8 * S + 900 * S);
        assert_eq!(planned, Plan { empty: vec![(0, true)], open: Some(0) });
    }
}
