//! The sequence rules of docs/protocol.md for one channel: what to do with a payload given the
//! last `seq` applied, and a short memory of applied payloads to catch forged duplicates.

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};

use crate::event::ResetReason;

/// How many applied payloads a channel remembers to compare duplicates with.
const REMEMBERED: usize = 1024;

/// What to do with a live payload.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// In sequence (or without `seq` where that is normal): apply it.
    Apply,
    /// Already applied: drop it.
    Skip,
    /// Missed payloads, or something to confirm from the server's log: replay from `last`.
    Replay,
    /// A duplicate `seq` with another text: ask the log which one is the server's.
    Verify(i64),
    /// Refetch.
    Reset(ResetReason),
}

/// One channel's position.
#[derive(Debug)]
pub(crate) struct Track {
    /// Whether the server logs the channel (replay can fill gaps).
    pub retained: bool,
    /// The last `seq` applied; none before the first one on a channel that is not retained.
    pub last: Option<i64>,
    recent: VecDeque<(i64, u64)>,
}

/// A payload text's fingerprint.
pub(crate) fn fingerprint(text: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

impl Track {
    pub fn new(retained: bool, last: Option<i64>) -> Track {
        Track { retained, last, recent: VecDeque::new() }
    }

    /// Judges a live payload with `seq`, whose text has `print`; `refetch` when applying it means
    /// a refetch (a marker, an overflow, a partial row).
    pub fn judge(&self, seq: Option<i64>, print: u64, refetch: bool) -> Verdict {
        match (self.retained, seq, self.last) {
            (true, None, _) => Verdict::Reset(ResetReason::NoSeq),
            (true, Some(n), Some(last)) if n <= last => match self.recent.iter().find(|(s, _)| *s == n) {
                Some((_, seen)) if *seen != print => Verdict::Verify(n),
                _ => Verdict::Skip,
            },
            // A refetch on the channel's word alone would let anyone force one: the log decides.
            (true, Some(n), Some(last)) if n == last + 1 && !refetch => Verdict::Apply,
            (true, Some(_), _) => Verdict::Replay,
            (false, None, _) | (false, Some(_), None) => Verdict::Apply,
            (false, Some(n), Some(last)) if n == last + 1 => Verdict::Apply,
            (false, Some(n), Some(last)) if n <= last => Verdict::Reset(ResetReason::SeqWentBack),
            (false, Some(_), Some(_)) => Verdict::Reset(ResetReason::GapNotReplayable),
        }
    }

    /// Records that the payload with `seq` and `print` was applied.
    pub fn applied(&mut self, seq: Option<i64>, print: u64) {
        if let Some(seq) = seq {
            self.last = Some(seq);
            if self.retained {
                if self.recent.len() == REMEMBERED {
                    self.recent.pop_front();
                }
                self.recent.push_back((seq, print));
            }
        }
    }

    /// The fingerprint of the applied payload with `seq`, if remembered.
    pub fn remembered(&self, seq: i64) -> Option<u64> {
        self.recent.iter().find(|(s, _)| *s == seq).map(|(_, p)| *p)
    }

    /// Starts again after a refetch from `position` (none on a channel that is not retained).
    pub fn restart(&mut self, retained: bool, position: Option<i64>) {
        self.retained = retained;
        self.last = position;
        self.recent.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retained_channel_applies_in_sequence_skips_repeats_and_replays_jumps() {
        let mut t = Track::new(true, Some(10));
        assert_eq!(t.judge(Some(11), 1, false), Verdict::Apply);
        t.applied(Some(11), 1);
        assert_eq!(t.judge(Some(11), 1, false), Verdict::Skip);
        assert_eq!(t.judge(Some(5), 9, false), Verdict::Skip, "not remembered: nothing to compare");
        assert_eq!(t.judge(Some(13), 1, false), Verdict::Replay);
        assert_eq!(t.judge(Some(999_999_999), 1, false), Verdict::Replay);
    }

    #[test]
    fn a_retained_channel_checks_refetches_and_forged_duplicates_against_the_log() {
        let mut t = Track::new(true, Some(10));
        assert_eq!(t.judge(Some(11), 1, true), Verdict::Replay, "a marker in sequence is confirmed first");
        assert_eq!(t.judge(None, 1, false), Verdict::Reset(ResetReason::NoSeq));
        t.applied(Some(11), 1);
        assert_eq!(t.judge(Some(11), 2, false), Verdict::Verify(11));
        assert_eq!(t.remembered(11), Some(1));
    }

    #[test]
    fn a_channel_without_a_log_starts_anywhere_and_resets_on_gaps_and_restarts() {
        let mut t = Track::new(false, None);
        assert_eq!(t.judge(Some(40), 1, false), Verdict::Apply);
        t.applied(Some(40), 1);
        assert_eq!(t.judge(Some(41), 1, false), Verdict::Apply);
        assert_eq!(t.judge(Some(43), 1, false), Verdict::Reset(ResetReason::GapNotReplayable));
        assert_eq!(t.judge(Some(1), 1, false), Verdict::Reset(ResetReason::SeqWentBack));
        assert_eq!(t.judge(None, 1, false), Verdict::Apply, "inline delivery has no seq");
        t.restart(false, None);
        assert_eq!(t.judge(Some(1), 1, false), Verdict::Apply);
    }
}
