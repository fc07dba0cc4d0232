//! What the delivery worker writes for retained channels, inside the transaction that sends their
//! payloads: the payloads themselves, numbered in sequence, and each feed's position.

use std::collections::HashMap;

use pgrx::prelude::*;

use super::{clock, RESERVE_AHEAD};
use crate::encode::packer::ResetReason;
use crate::error;
use crate::stats::{self, Counter};

/// Where a feed stands within the transaction being written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Feed {
    /// The feed's id: its watch's `feed_start`.
    pub feed: i64,
    /// The last sequence number sent (before the first payload: `feed - 1`).
    pub position: i64,
    /// The number the next payload gets: `position + 1`, or more at the start of a feed.
    pub next: i64,
    /// Numbers up to this one are reserved durably.
    pub reserved: i64,
}

impl Feed {
    /// The feed of a watch whose current feed is `feed_start`, from what `pgwatch.feeds` holds
    /// for its channel (`stored`: feed, position, reserved), if anything.
    pub fn resume(feed_start: i64, stored: Option<(i64, i64, i64)>) -> Feed {
        match stored {
            Some((feed, position, reserved)) if feed == feed_start => {
                Feed { feed, position, next: position + 1, reserved }
            }
            // A new feed on the channel goes on above the one before.
            other => {
                let (before, reserved) = other.map_or((0, 0), |(_, position, reserved)| (position, reserved));
                Feed {
                    feed: feed_start,
                    position: feed_start - 1,
                    next: feed_start.max(before + 1).max(reserved + 1),
                    reserved,
                }
            }
        }
    }

    /// Numbers the next payload; `true` when the reservation had to move (the transaction then
    /// commits synchronously).
    pub fn advance(&mut self) -> (i64, i64, bool) {
        let (seq, prev) = (self.next, self.position);
        self.position = seq;
        self.next = seq + 1;
        let reserve = seq > self.reserved;
        if reserve {
            self.reserved = seq + RESERVE_AHEAD;
        }
        (seq, prev, reserve)
    }

    /// Moves the feed past a gap: above the clock `now` and everything reserved, so above
    /// anything sent before, whatever a crash kept out of the log.
    pub fn jump(&mut self, now: i64) {
        self.next = self.next.max(now).max(self.reserved + 1);
    }
}

/// One payload to log.
struct Entry {
    channel: Vec<u8>,
    seq: i64,
    prev: i64,
    payload: Vec<u8>,
}

/// What one worker transaction logs: the feeds of the retained channels it sends on, and their
/// payloads.
#[derive(Default)]
pub struct Logged {
    feeds: HashMap<Vec<u8>, (String, Feed, Option<ResetReason>)>,
    entries: Vec<Entry>,
    /// A reservation moved: commit synchronously.
    sync: bool,
}

impl Logged {
    /// Opens the feeds of the retained watches on `channels` (every retained watch when `None`),
    /// in the worker's transaction. A channel whose watch no longer keeps payloads has none.
    pub fn open(channels: Option<&[&[u8]]>) -> Logged {
        let query = "SELECT pg_catalog.convert_to(w.channel, pg_catalog.getdatabaseencoding()),
                            (SELECT n.nspname || '.' || c.relname FROM pg_catalog.pg_class c
                               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = w.tbl),
                            w.feed_start, f.feed, f.seq, f.reserved
                       FROM pgwatch.watches w LEFT JOIN pgwatch.feeds f ON f.channel = w.channel
                      WHERE w.retain IS NOT NULL
                        AND ($1::bytea[] IS NULL
                             OR w.channel = ANY (SELECT pg_catalog.convert_from(c, pg_catalog.getdatabaseencoding())
                                                   FROM unnest($1::bytea[]) AS c))";
        let channels: Option<Vec<Vec<u8>>> = channels.map(|c| c.iter().map(|c| c.to_vec()).collect());
        let feeds = Spi::connect(|client| {
            client
                .select(query, None, &[channels.into()])?
                .map(|row| {
                    let channel: Vec<u8> = row.get(1)?.unwrap_or_default();
                    let tbl: String = row.get(2)?.unwrap_or_default();
                    let feed_start: i64 = row.get(3)?.unwrap_or_default();
                    let stored = match (row.get::<i64>(4)?, row.get::<i64>(5)?, row.get::<i64>(6)?) {
                        (Some(feed), Some(seq), Some(reserved)) => Some((feed, seq, reserved)),
                        _ => None,
                    };
                    Ok((channel, (tbl, Feed::resume(feed_start, stored), None)))
                })
                .collect::<Result<HashMap<_, _>, pgrx::spi::SpiError>>()
        })
        .unwrap_or_else(|e| error::spi_failed("pgwatch.feeds", e));
        Logged { feeds, entries: Vec::new(), sync: false }
    }

    /// Whether `channel` has an open feed (its watch keeps payloads).
    pub fn has(&self, channel: &[u8]) -> bool {
        self.feeds.contains_key(channel)
    }

    /// The channels of the open feeds, with their table names.
    pub fn channels(&self) -> impl Iterator<Item = (&[u8], &str)> {
        self.feeds.iter().map(|(channel, (tbl, ..))| (channel.as_slice(), tbl.as_str()))
    }

    /// Numbers the next payload on `channel` (which must be open).
    pub fn next_seq(&mut self, channel: &[u8]) -> u64 {
        let (_, feed, _) = self.feeds.get_mut(channel).expect("an open feed");
        let (seq, prev, reserve) = feed.advance();
        self.sync |= reserve;
        self.entries.push(Entry { channel: channel.to_vec(), seq, prev, payload: Vec::new() });
        seq as u64
    }

    /// Logs `payload`, sent on `channel` with the number [`Logged::next_seq`] gave last.
    pub fn sent(&mut self, channel: &[u8], payload: &[u8]) {
        let entry = self.entries.iter_mut().rev().find(|e| e.channel == channel).expect("numbered before it is sent");
        entry.payload = payload.to_vec();
    }

    /// Marks a gap on `channel` that replay cannot fill: the next payload (its reset marker)
    /// goes on above anything sent before.
    pub fn reset(&mut self, channel: &[u8], reason: ResetReason) {
        let (_, feed, why) = self.feeds.get_mut(channel).expect("an open feed");
        feed.jump(clock());
        *why = Some(reason);
        stats::add(Counter::FeedResets, 1);
    }

    /// Writes what this transaction logged into segment `segment`, in one statement: the
    /// payloads, the feeds' positions and the segment's counts. Asks for a synchronous commit
    /// when a reservation moved. Whether it logged any payload.
    pub fn write(self, segment: i32) -> bool {
        if self.entries.is_empty() {
            return false;
        }
        let bytes: i64 = self.entries.iter().map(|e| super::prune::logged_bytes(e.payload.len())).sum();
        stats::add(Counter::LogPayloads, self.entries.len() as u64);
        stats::add(Counter::LogBytes, self.entries.iter().map(|e| e.payload.len() as u64).sum());
        // Column arrays, for unnest() on the other side.
        let channels: Vec<Vec<u8>> = self.entries.iter().map(|e| e.channel.clone()).collect();
        let entry_feeds: Vec<i64> = self.entries.iter().map(|e| self.feeds[&e.channel].1.feed).collect();
        let seqs: Vec<i64> = self.entries.iter().map(|e| e.seq).collect();
        let prevs: Vec<i64> = self.entries.iter().map(|e| e.prev).collect();
        let payloads: Vec<Vec<u8>> = self.entries.iter().map(|e| e.payload.clone()).collect();
        let feed_channels: Vec<Vec<u8>> = self.feeds.keys().cloned().collect();
        let feed_tables: Vec<String> = self.feeds.values().map(|(tbl, ..)| tbl.clone()).collect();
        let feed_ids: Vec<i64> = self.feeds.values().map(|(_, feed, _)| feed.feed).collect();
        let positions: Vec<i64> = self.feeds.values().map(|(_, feed, _)| feed.position).collect();
        let reserved: Vec<i64> = self.feeds.values().map(|(_, feed, _)| feed.reserved).collect();
        let resets: Vec<Option<String>> =
            self.feeds.values().map(|(.., reset)| reset.map(|r| r.as_str().to_string())).collect();
        let count = self.entries.len() as i64;
        let query = "WITH logged AS (
                INSERT INTO pgwatch.log (segment, channel, feed, seq, prev, sent_at, payload)
                SELECT $1, pg_catalog.convert_from(c, pg_catalog.getdatabaseencoding()), f, s, p, pg_catalog.now(), b
                  FROM unnest($2::bytea[], $3::int8[], $4::int8[], $5::int8[], $6::bytea[]) AS u(c, f, s, p, b)
                RETURNING 1),
            segment AS (
                UPDATE pgwatch.log_segments SET last_sent = pg_catalog.now(), payloads = payloads + $7, bytes = bytes + $8
                 WHERE segment = $1 AND $7 > 0
                RETURNING 1)
            INSERT INTO pgwatch.feeds AS old (channel, tbl, feed, seq, reserved, last_reset, reset_reason)
            SELECT pg_catalog.convert_from(c, pg_catalog.getdatabaseencoding()), t, f, s, r,
                   CASE WHEN why IS NOT NULL THEN pg_catalog.now() END, why
              FROM unnest($9::bytea[], $10::text[], $11::int8[], $12::int8[], $13::int8[], $14::text[]) AS u(c, t, f, s, r, why)
            ON CONFLICT (channel) DO UPDATE SET
                tbl = excluded.tbl, feed = excluded.feed, seq = excluded.seq, reserved = excluded.reserved,
                cut_short = CASE WHEN old.feed = excluded.feed THEN old.cut_short ELSE 0 END,
                last_reset = CASE WHEN excluded.reset_reason IS NOT NULL THEN excluded.last_reset
                                  WHEN old.feed = excluded.feed THEN old.last_reset END,
                reset_reason = CASE WHEN excluded.reset_reason IS NOT NULL THEN excluded.reset_reason
                                    WHEN old.feed = excluded.feed THEN old.reset_reason END";
        Spi::run_with_args(
            query,
            &[
                segment.into(),
                channels.into(),
                entry_feeds.into(),
                seqs.into(),
                prevs.into(),
                payloads.into(),
                count.into(),
                bytes.into(),
                feed_channels.into(),
                feed_tables.into(),
                feed_ids.into(),
                positions.into(),
                reserved.into(),
                resets.into(),
            ],
        )
        .unwrap_or_else(|e| error::spi_failed("pgwatch.log", e));
        if self.sync {
            Spi::run("SET LOCAL synchronous_commit = on").unwrap_or_else(|e| error::spi_failed("pgwatch.log", e));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_feed_goes_on_from_its_position_and_a_new_one_above_the_old() {
        let same = Feed::resume(1000, Some((1000, 1500, 11_000)));
        assert_eq!(same, Feed { feed: 1000, position: 1500, next: 1501, reserved: 11_000 });
        let fresh = Feed::resume(1000, None);
        assert_eq!((fresh.position, fresh.next), (999, 1000));
        // Redefined within the old feed's reservation: the new numbers start above it.
        let after_old = Feed::resume(5000, Some((1000, 4000, 14_000)));
        assert_eq!((after_old.feed, after_old.position, after_old.next), (5000, 4999, 14_001));
    }

    #[test]
    fn numbers_are_consecutive_and_a_reservation_moves_ahead_once_in_a_while() {
        let mut feed = Feed::resume(100, None);
        assert_eq!(feed.advance(), (100, 99, true));
        assert_eq!(feed.reserved, 100 + RESERVE_AHEAD);
        assert_eq!(feed.advance(), (101, 100, false));
        feed.jump(50);
        assert_eq!(feed.advance(), (100 + RESERVE_AHEAD + 1, 101, true));
        feed.jump(1_000_000);
        assert_eq!(feed.advance().0, 1_000_000);
    }
}
