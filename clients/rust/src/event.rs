//! What a subscriber hands its consumer: changes, truncates, and resets that say "refetch".

use std::fmt;
use std::sync::Arc;

use crate::payload::{Op, Row};

/// One thing that happened on a channel, in the order the channel tells it.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Rows of one op (one payload's).
    Change(Change),
    /// Every row of the table was removed.
    Truncate {
        /// The channel.
        channel: Arc<str>,
        /// The payload's sequence number, if any.
        seq: Option<i64>,
    },
    /// Refetch what you mirror of the channel's table, now, before the next event: later events
    /// apply on top of a snapshot taken after this one was handed out.
    Reset(Reset),
}

impl Event {
    /// The channel the event belongs to.
    pub fn channel(&self) -> &Arc<str> {
        match self {
            Event::Change(change) => &change.channel,
            Event::Truncate { channel, .. } => channel,
            Event::Reset(reset) => &reset.channel,
        }
    }
}

/// Rows of one op on one channel.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// The channel.
    pub channel: Arc<str>,
    /// The payload's sequence number (worker delivery), or none (inline delivery).
    pub seq: Option<i64>,
    /// What happened to the rows.
    pub op: Op,
    /// The rows, each a distinct key.
    pub rows: Vec<Row>,
}

/// A "refetch" with its reason.
#[derive(Clone, Debug, PartialEq)]
pub struct Reset {
    /// The channel.
    pub channel: Arc<str>,
    /// Why.
    pub reason: ResetReason,
}

/// Why a subscriber asks for a refetch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResetReason {
    /// The subscription started: take your first snapshot.
    Start,
    /// Payloads were missed and the server's log cannot give them (not retained, pruned, or
    /// from before a crash).
    GapNotReplayable,
    /// The server wrote a reset marker in the feed (`restart`, `fallback`, ...).
    Marker(String),
    /// The server sent a resync: changes may have overtaken one another.
    Resync,
    /// A payload could not carry its rows (`"overflow":true`).
    Overflow,
    /// A row did not fit a payload and came with its key only.
    PartialRows,
    /// A payload without `seq` arrived on a retained channel: notified inline, outside the log.
    NoSeq,
    /// `seq` went back on a channel that is not retained: its server restarted.
    SeqWentBack,
    /// The connection was lost and the channel is not retained.
    Reconnected,
    /// The consumer fell `dropped` notifications behind the buffer's bound and the channel is
    /// not retained.
    Lagged {
        /// Notifications dropped with the buffer.
        dropped: u64,
    },
    /// A payload applied earlier is not the one the server logged with its `seq` (someone
    /// NOTIFYs forged payloads on the channel).
    Mismatch,
    /// The server's log holds a payload this client cannot read (a newer protocol).
    Unreadable,
}

impl fmt::Display for ResetReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResetReason::Start => f.write_str("start"),
            ResetReason::GapNotReplayable => f.write_str("missed payloads that cannot be replayed"),
            ResetReason::Marker(reason) => write!(f, "reset marker ({reason})"),
            ResetReason::Resync => f.write_str("resync"),
            ResetReason::Overflow => f.write_str("overflow"),
            ResetReason::PartialRows => f.write_str("partial rows"),
            ResetReason::NoSeq => f.write_str("a payload without seq on a retained channel"),
            ResetReason::SeqWentBack => f.write_str("seq went back (the server restarted)"),
            ResetReason::Reconnected => f.write_str("reconnected"),
            ResetReason::Lagged { dropped } => write!(f, "the consumer lagged ({dropped} notifications dropped)"),
            ResetReason::Mismatch => f.write_str("an applied payload differs from the server's log"),
            ResetReason::Unreadable => f.write_str("an unreadable payload in the server's log"),
        }
    }
}
