//! What the delivery worker writes for retained channels, inside the transaction that sends their
//! payloads: the payloads themselves, numbered in sequence, and each feed's position.

use std::collections::HashMap;

use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::PgOid;

use super::prune::Ring;
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

/// The retained watches' feeds, of the channels `$1` (every retained watch when NULL).
const OPEN: &str = concat!(
    "SELECT pg_catalog.convert_to(w.channel, pg_catalog.getdatabaseencoding()),
            (SELECT pg_catalog.convert_to(",
    crate::display_name_sql!(),
    ", pg_catalog.getdatabaseencoding())
               FROM pg_catalog.pg_class c
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = w.tbl),
            w.feed_start, f.feed, f.seq, f.reserved
       FROM pgwatch.watches w LEFT JOIN pgwatch.feeds f ON f.channel = w.channel
      WHERE w.retain IS NOT NULL
        AND ($1::bytea[] IS NULL
             OR w.channel = ANY (SELECT pg_catalog.convert_from(c, pg_catalog.getdatabaseencoding())
                                   FROM unnest($1::bytea[]) AS c))"
);

/// One payload, into segment `$1`. (Routed through the partitioned table: a row inserted into
/// the segment itself has its partition constraint checked, which costs more.)
const INSERT: &str = "INSERT INTO pgwatch.log (segment, channel, feed, seq, prev, sent_at, payload)
    VALUES ($1, pg_catalog.convert_from($2, pg_catalog.getdatabaseencoding()), $3, $4, $5, pg_catalog.now(), $6)";

/// A segment's counts and lease (in microseconds since 2000, see `prune::Ring::count`), after
/// payloads were logged into it.
const COUNT: &str = "UPDATE pgwatch.log_segments
                        SET last_sent = GREATEST(last_sent, '2000-01-01 UTC'::pg_catalog.timestamptz
                                                            + $4 * interval '1 microsecond'),
                            payloads = payloads + $2, bytes = bytes + $3
                      WHERE segment = $1";

/// A feed's position, when its row holds this feed already and no reset is to be recorded.
const ADVANCE: &str = "UPDATE pgwatch.feeds SET seq = $3, reserved = $4
                        WHERE channel = pg_catalog.convert_from($1, pg_catalog.getdatabaseencoding()) AND feed = $2";

/// A feed's row, new or for a new feed on the channel, or with a reset.
const STORE: &str = "INSERT INTO pgwatch.feeds AS old (channel, tbl, feed, seq, reserved, last_reset, reset_reason)
    VALUES (pg_catalog.convert_from($1, pg_catalog.getdatabaseencoding()), $2, $3, $4, $5,
            CASE WHEN $6::text IS NOT NULL THEN pg_catalog.now() END, $6)
    ON CONFLICT (channel) DO UPDATE SET
        tbl = excluded.tbl, feed = excluded.feed, seq = excluded.seq, reserved = excluded.reserved,
        cut_short = CASE WHEN old.feed = excluded.feed THEN old.cut_short ELSE 0 END,
        last_reset = CASE WHEN excluded.reset_reason IS NOT NULL THEN excluded.last_reset
                          WHEN old.feed = excluded.feed THEN old.last_reset END,
        reset_reason = CASE WHEN excluded.reset_reason IS NOT NULL THEN excluded.reset_reason
                            WHEN old.feed = excluded.feed THEN old.reset_reason END";

/// The worker's statements on the log, planned once per worker: PostgreSQL plans them again by
/// itself when a table they use changes. Parsing and planning them for every batch cost the
/// worker more than everything else it does for a batch; single-row statements start and end
/// faster in the executor than set-based ones, and a batch logs about one payload per channel.
pub struct Plans {
    open: OwnedPreparedStatement,
    insert: OwnedPreparedStatement,
    count: OwnedPreparedStatement,
    advance: OwnedPreparedStatement,
    store: OwnedPreparedStatement,
}

impl Plans {
    /// Plans the statements, in a transaction of a database whose pgwatch has the log.
    pub fn prepare() -> Plans {
        let oid = |oid: pg_sys::Oid| PgOid::from(oid);
        let (bytea, int4, int8, text) =
            (oid(pg_sys::BYTEAOID), oid(pg_sys::INT4OID), oid(pg_sys::INT8OID), oid(pg_sys::TEXTOID));
        Spi::connect(|client| {
            Ok::<_, pgrx::spi::SpiError>(Plans {
                open: client.prepare(OPEN, &[oid(pg_sys::BYTEAARRAYOID)])?.keep(),
                insert: client.prepare_mut(INSERT, &[int4, bytea, int8, int8, int8, bytea])?.keep(),
                count: client.prepare_mut(COUNT, &[int4, int8, int8, int8])?.keep(),
                advance: client.prepare_mut(ADVANCE, &[bytea, int8, int8, int8])?.keep(),
                store: client.prepare_mut(STORE, &[bytea, text, int8, int8, int8, text])?.keep(),
            })
        })
        .unwrap_or_else(|e| error::spi_failed("pgwatch.log", e))
    }
}

/// One payload to log.
struct Entry {
    channel: Vec<u8>,
    seq: i64,
    prev: i64,
    payload: Vec<u8>,
}

/// A feed open in a worker transaction.
struct Open {
    tbl: String,
    feed: Feed,
    /// A reset to record with the feed's position.
    reset: Option<ResetReason>,
    /// `pgwatch.feeds` holds a row of this very feed for the channel.
    stored: bool,
}

/// What one worker transaction logs: the feeds of the retained channels it sends on, and their
/// payloads.
#[derive(Default)]
pub struct Logged {
    feeds: HashMap<Vec<u8>, Open>,
    entries: Vec<Entry>,
    /// A reservation moved: commit synchronously.
    sync: bool,
}

impl Logged {
    /// Opens the feeds of the retained watches on `channels` (every retained watch when `None`),
    /// in the worker's transaction. A channel whose watch no longer keeps payloads has none.
    pub fn open(plans: &Plans, channels: Option<&[&[u8]]>) -> Logged {
        let channels: Option<Vec<Vec<u8>>> = channels.map(|c| c.iter().map(|c| c.to_vec()).collect());
        let feeds = Spi::connect(|client| {
            client
                .select(&plans.open, None, &[channels.into()])?
                .map(|row| {
                    let channel: Vec<u8> = row.get(1)?.unwrap_or_default();
                    // As bytes: in a database not in UTF-8 a name may not be valid UTF-8, and
                    // reading it as text would stop the worker (see `targets::read`).
                    let tbl: Vec<u8> = row.get(2)?.unwrap_or_default();
                    let tbl = String::from_utf8_lossy(&tbl).into_owned();
                    let feed_start: i64 = row.get(3)?.unwrap_or_default();
                    let stored = match (row.get::<i64>(4)?, row.get::<i64>(5)?, row.get::<i64>(6)?) {
                        (Some(feed), Some(seq), Some(reserved)) => Some((feed, seq, reserved)),
                        _ => None,
                    };
                    let same = stored.is_some_and(|(feed, ..)| feed == feed_start);
                    let feed = Feed::resume(feed_start, stored);
                    Ok((channel, Open { tbl, feed, reset: None, stored: same }))
                })
                .collect::<Result<HashMap<_, _>, pgrx::spi::SpiError>>()
        })
        .unwrap_or_else(|e| error::spi_failed("pgwatch.feeds", e));
        Logged { feeds, entries: Vec::new(), sync: false }
    }

    /// Opens feeds as a committed transaction of this worker left them (see
    /// [`Logged::into_feeds`]): `pgwatch.feeds` holds their rows, and only this worker writes them.
    pub fn resume(feeds: impl IntoIterator<Item = (Vec<u8>, String, Feed)>) -> Logged {
        let feeds = feeds
            .into_iter()
            .map(|(channel, tbl, feed)| (channel, Open { tbl, feed, reset: None, stored: true }))
            .collect();
        Logged { feeds, entries: Vec::new(), sync: false }
    }

    /// The feeds as they stand once this transaction commits.
    pub fn into_feeds(self) -> impl Iterator<Item = (Vec<u8>, String, Feed)> {
        self.feeds.into_iter().map(|(channel, open)| (channel, open.tbl, open.feed))
    }

    /// Whether `channel` has an open feed (its watch keeps payloads).
    pub fn has(&self, channel: &[u8]) -> bool {
        self.feeds.contains_key(channel)
    }

    /// The channels of the open feeds, with their table names.
    pub fn channels(&self) -> impl Iterator<Item = (&[u8], &str)> {
        self.feeds.iter().map(|(channel, open)| (channel.as_slice(), open.tbl.as_str()))
    }

    /// The highest number `channel`'s feed may have given, if it is open: the numbers this worker
    /// gives the channel without the log go on above it.
    pub fn position(&self, channel: &[u8]) -> Option<u64> {
        self.feeds.get(channel).map(|open| (open.feed.next - 1).max(0) as u64)
    }

    /// Makes the next number of `channel`'s feed come after `seq`, a number this worker gave the
    /// channel without the log in this transaction (its watch lost or gained `retain` since
    /// records of it were queued).
    pub fn skip_past(&mut self, channel: &[u8], seq: u64) {
        if let Some(open) = self.feeds.get_mut(channel) {
            open.feed.next = open.feed.next.max(seq as i64 + 1);
        }
    }

    /// Numbers the next payload on `channel` (which must be open).
    pub fn next_seq(&mut self, channel: &[u8]) -> u64 {
        let open = self.feeds.get_mut(channel).expect("an open feed");
        let (seq, prev, reserve) = open.feed.advance();
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
        let open = self.feeds.get_mut(channel).expect("an open feed");
        open.feed.jump(clock());
        open.reset = Some(reason);
        stats::add(Counter::FeedResets, 1);
    }

    /// Records that `channel` sent a reset marker for a gap that took no numbers (changes
    /// notified inline when the queue was full), so that `pgwatch.channels` shows it.
    pub fn note_reset(&mut self, channel: &[u8], reason: ResetReason) {
        self.feeds.get_mut(channel).expect("an open feed").reset = Some(reason);
    }

    /// Writes what this transaction logged into the ring's current segment: the payloads, the
    /// segment's counts when due, and the positions of the feeds that sent. Asks for a
    /// synchronous commit when a reservation moved. Whether it logged any payload.
    pub fn write(&mut self, plans: &Plans, ring: &mut Ring) -> bool {
        if self.entries.is_empty() {
            return false;
        }
        let bytes: i64 = self.entries.iter().map(|e| super::prune::logged_bytes(e.payload.len())).sum();
        stats::add(Counter::LogPayloads, self.entries.len() as u64);
        stats::add(Counter::LogBytes, self.entries.iter().map(|e| e.payload.len() as u64).sum());
        let segment = ring.current();
        let count = ring.count(self.entries.len() as i64, bytes, clock());
        let (entries, feeds) = (&self.entries, &mut self.feeds);
        Spi::connect_mut(|client| {
            for e in entries {
                let feed = feeds[&e.channel].feed.feed;
                let args = [
                    segment.into(),
                    e.channel.as_slice().into(),
                    feed.into(),
                    e.seq.into(),
                    e.prev.into(),
                    e.payload.as_slice().into(),
                ];
                client.update(&plans.insert, None, &args)?;
            }
            if let Some((payloads, bytes, until)) = count {
                client.update(&plans.count, None, &[segment.into(), payloads.into(), bytes.into(), until.into()])?;
            }
            for (channel, open) in feeds.iter_mut() {
                let Open { tbl, feed, reset, stored } = open;
                if !entries.iter().any(|e| e.channel == *channel) && reset.is_none() {
                    continue;
                }
                let channel = channel.as_slice();
                if *stored && reset.is_none() {
                    let args = [channel.into(), feed.feed.into(), feed.position.into(), feed.reserved.into()];
                    if !client.update(&plans.advance, None, &args)?.is_empty() {
                        continue;
                    }
                }
                let why = reset.map(|r| r.as_str());
                let args = [
                    channel.into(),
                    tbl.as_str().into(),
                    feed.feed.into(),
                    feed.position.into(),
                    feed.reserved.into(),
                    why.into(),
                ];
                client.update(&plans.store, None, &args)?;
                (*stored, *reset) = (true, None);
            }
            Ok::<_, pgrx::spi::SpiError>(())
        })
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
