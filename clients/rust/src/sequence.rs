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
    /// The last `seq` whose payload the server's log (or its position) vouched for; those
    /// applied after it came from the channel alone.
    confirmed: Option<i64>,
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
        Track { retained, last, confirmed: last, recent: VecDeque::new() }
    }

    /// Judges a live payload with `seq`, whose text has `print`; `refetch` when applying it means
    /// a refetch (a marker, an overflow, a partial row).
    pub fn judge(&self, seq: Option<i64>, print: u64, refetch: bool) -> Verdict {
        match (self.retained, seq, self.last) {
            (true, None, _) => Verdict::Reset(ResetReason::NoSeq),
            (true, Some(n), Some(last)) if n <= last => match self.remembered(n) {
                Some(seen) if seen != print => Verdict::Verify(n),
                _ => Verdict::Skip,
            },
            // A refetch on the channel's word alone would let anyone force one: the log decides.
            (true, Some(n), Some(last)) if Some(n) == last.checked_add(1) && !refetch => Verdict::Apply,
            (true, Some(_), _) => Verdict::Replay,
            (false, None, _) | (false, Some(_), None) => Verdict::Apply,
            (false, Some(n), Some(last)) if Some(n) == last.checked_add(1) => Verdict::Apply,
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
        self.confirmed = position;
        self.recent.clear();
    }

    /// Where a replay starts: at the last payload the log vouched for, so that the payloads
    /// applied since from the channel alone are compared with the log's (as far back as they
    /// are remembered).
    pub fn replay_from(&self) -> Option<i64> {
        let oldest = self.recent.front().map(|(seq, _)| seq - 1);
        match (self.confirmed, self.last) {
            (Some(confirmed), Some(last)) => Some(confirmed.max(oldest.unwrap_or(last)).min(last)),
            (_, last) => last,
        }
    }

    /// The log holds the payload with `seq` and `print`: whether it agrees with the one applied
    /// with that `seq`, if any (one not remembered agrees).
    pub fn logged(&mut self, seq: i64, print: u64) -> bool {
        let agrees = self.remembered(seq).is_none_or(|seen| seen == print);
        if agrees {
            self.confirmed = Some(self.confirmed.map_or(seq, |c| c.max(seq)));
        }
        agrees
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
        assert_eq!(t.judge(Some(i64::MAX), 1, false), Verdict::Replay);
    }

    #[test]
    fn a_replay_starts_at_what_the_log_vouched_for_and_finds_forged_payloads_applied_since() {
        let mut t = Track::new(true, Some(10));
        t.applied(Some(11), 1);
        t.applied(Some(12), 2);
        assert_eq!(t.replay_from(), Some(10), "11 and 12 came from the channel alone");
        assert!(t.logged(11, 1));
        assert_eq!(t.replay_from(), Some(11));
        assert!(!t.logged(12, 9), "the log's 12 is not the one applied");
        t.restart(true, Some(20));
        assert_eq!(t.replay_from(), Some(20));
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
