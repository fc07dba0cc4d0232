//! The queue's record format: a committed transaction's net changes, one part per watch, as the
//! delivery worker reads them in place and folds them across transactions. Pure Rust.

use std::ffi::CString;

use super::fold::{Change, Folded};
use super::image::Image;
use super::packer::{MAX_COLS_HEADER, MAX_TABLE_NAME};
use crate::model::events::Op;
use crate::model::watch::{OnTruncate, Rows, Target, MAX_CHANNEL};

/// One watch's changes in a record, read in place: the worker compares the watch's [`Target`]
/// with the ones it already has and decodes the changes straight into its fold.
pub struct WatchRecord<'a> {
    channel: &'a [u8],
    tbl: &'a [u8],
    cols: &'a [u8],
    flags: u8,
    count: u32,
    changes: &'a [u8],
}

impl<'a> WatchRecord<'a> {
    pub fn is_for(&self, target: &Target) -> bool {
        target.channel.as_bytes() == self.channel
            && target.tbl.as_bytes() == self.tbl
            && target.cols() == self.cols
            && target.retained == self.retained()
    }

    pub fn target(&self) -> Target {
        Target {
            channel: CString::new(self.channel).expect("channels have no NUL"),
            tbl: String::from_utf8_lossy(self.tbl).into_owned(),
            rows: if self.cols.is_empty() { Rows::Objects } else { Rows::Compact(self.cols.into()) },
            retained: self.retained(),
        }
    }

    /// The watch keeps its payloads for replay.
    pub fn retained(&self) -> bool {
        self.flags & RETAINED != 0
    }

    pub fn channel(&self) -> &'a [u8] {
        self.channel
    }

    /// The table was truncated before these changes (a truncate notice is due).
    pub fn truncated(&self) -> bool {
        self.flags & TRUNCATED != 0
    }

    /// The table was truncated, and the watch, which does not report truncate, has its
    /// subscribers refetch after these changes.
    pub fn refetch_after_truncate(&self) -> bool {
        self.flags & REFETCH != 0
    }

    pub fn overflowed(&self, op: Op) -> bool {
        self.flags & (1 << op.index()) != 0
    }

    /// Subscribers are to refetch once what came before is sent.
    pub fn resync(&self) -> bool {
        self.flags & RESYNC != 0
    }

    /// DDL changed which rows the table holds or how they read: subscribers are to refetch after
    /// these changes.
    pub fn reshaped(&self) -> bool {
        self.flags & RESHAPED != 0
    }

    /// Why these changes cannot be sent, if they cannot: what a trigger of pgwatch's records
    /// always can be, but a hand-made trigger's may not.
    pub fn unsendable(&self) -> Option<String> {
        if self.channel.is_empty() || self.channel.len() > MAX_CHANNEL || self.channel.contains(&0) {
            return Some(format!("the channel name takes {} bytes (1 to {MAX_CHANNEL})", self.channel.len()));
        }
        if self.tbl.len() > MAX_TABLE_NAME {
            return Some(format!("the table name takes {} bytes (at most {MAX_TABLE_NAME})", self.tbl.len()));
        }
        if self.cols.len() > MAX_COLS_HEADER {
            return Some(format!("the column names take {} bytes (at most {MAX_COLS_HEADER})", self.cols.len()));
        }
        None
    }

    /// The channel and table, for messages.
    pub fn describe(&self) -> String {
        format!(
            "table \"{}\" on channel \"{}\"",
            String::from_utf8_lossy(self.tbl),
            String::from_utf8_lossy(self.channel)
        )
    }

    pub fn changes(&self) -> impl Iterator<Item = Change> + 'a {
        let (mut rest, count) = (self.changes, self.count);
        (0..count).map(move |at| {
            let change = Change { before: read_image(&mut rest), after: read_image(&mut rest) };
            debug_assert!(at + 1 < count || rest.is_empty(), "the rows' bytes hold exactly their count");
            change
        })
    }

    /// Folds these changes, which came after what `folded` holds, into it.
    pub fn fold_into(&self, folded: &mut Folded) {
        if self.truncated() {
            folded.truncate(OnTruncate::Notice);
        }
        if self.refetch_after_truncate() {
            folded.truncate(OnTruncate::Refetch);
        }
        if folded.len() == 0 {
            folded.extend_net(self.changes());
        } else {
            self.changes().for_each(|change| folded.apply(change));
        }
        for op in Op::ALL.into_iter().filter(|&op| self.overflowed(op)) {
            folded.mark_overflow(op);
        }
        if self.resync() {
            folded.mark_resync();
        }
        if self.reshaped() {
            folded.mark_reshaped();
        }
    }
}

/// Bit of the flags byte that says the table was truncated; bits 0–2 are the per-op overflows.
const TRUNCATED: u8 = 1 << 3;

/// Bit of the flags byte that asks for a resync notice (see [`encode_resync`]).
const RESYNC: u8 = 1 << 4;

/// Bit of the flags byte that says the watch keeps its payloads for replay.
const RETAINED: u8 = 1 << 5;

/// Bit of the flags byte that asks for a refetch after these changes for a truncate (see
/// [`Folded::refetch_after_truncate`]).
const REFETCH: u8 = 1 << 6;

/// Bit of the flags byte that asks for a refetch after these changes for DDL (see
/// [`Folded::reshaped`]).
const RESHAPED: u8 = 1 << 7;

fn retained_flag(target: &Target) -> u8 {
    if target.retained {
        RETAINED
    } else {
        0
    }
}

/// Appends a watch's resync request to a record body: no changes, only the request that its
/// subscribers refetch once everything queued before it is sent. A transaction notified inline
/// queues one, since its notifications may reach subscribers before older queued ones.
pub fn encode_resync(out: &mut Vec<u8>, target: &Target) {
    encode_header(out, target, RESYNC | retained_flag(target));
    out.extend_from_slice(&[0; 8]);
}

fn encode_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// A watch's part of a record up to its rows: the target and the flags.
fn encode_header(out: &mut Vec<u8>, target: &Target, flags: u8) {
    encode_bytes(out, target.channel.as_bytes());
    encode_bytes(out, target.tbl.as_bytes());
    encode_bytes(out, target.cols());
    out.push(flags);
}

/// Appends one watch's net changes to a record body.
pub fn encode(out: &mut Vec<u8>, target: &Target, folded: &Folded) {
    fn image(out: &mut Vec<u8>, image: Option<&Image>) {
        if let Some(image) = image {
            let (data, key_len, partial) = image.parts();
            out.push(1 + u8::from(partial));
            out.extend_from_slice(&key_len.to_le_bytes());
            encode_bytes(out, data);
        } else {
            out.push(0);
        }
    }
    let overflow = Op::ALL.into_iter().fold(0, |bits, op| bits | u8::from(folded.overflowed(op)) << op.index());
    let truncated =
        if folded.truncated() { TRUNCATED } else { 0 } | if folded.refetch_after_truncate() { REFETCH } else { 0 };
    let resync = if folded.resync() { RESYNC } else { 0 } | if folded.reshaped() { RESHAPED } else { 0 };
    encode_header(out, target, overflow | truncated | resync | retained_flag(target));
    // The row count, then the rows' bytes, length-prefixed so that a reader can step over them.
    let count_at = out.len();
    out.extend_from_slice(&[0; 8]);
    let mut count = 0u32;
    for row in folded.net_rows() {
        image(out, row.before);
        image(out, row.after);
        count += 1;
    }
    let rows_len = (out.len() - count_at - 8) as u32;
    out[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
    out[count_at + 4..count_at + 8].copy_from_slice(&rows_len.to_le_bytes());
}

/// Reads a record body written by [`encode`], one watch at a time.
pub fn decode(body: &[u8]) -> impl Iterator<Item = WatchRecord<'_>> {
    let mut rest = body;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (channel, tbl, cols) = (read_bytes(&mut rest), read_bytes(&mut rest), read_bytes(&mut rest));
        let flags = take(&mut rest, 1)[0];
        let count = read_u32(&mut rest);
        let changes = read_bytes(&mut rest);
        Some(WatchRecord { channel, tbl, cols, flags, count, changes })
    })
}

fn take<'a>(body: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, tail) = body.split_at(n);
    *body = tail;
    head
}

fn read_u32(body: &mut &[u8]) -> u32 {
    u32::from_le_bytes(take(body, 4).try_into().expect("4 bytes"))
}

fn read_bytes<'a>(body: &mut &'a [u8]) -> &'a [u8] {
    let len = read_u32(body) as usize;
    take(body, len)
}

fn read_image(body: &mut &[u8]) -> Option<Image> {
    let tag = take(body, 1)[0];
    if tag == 0 {
        return None;
    }
    let key_len = read_u32(body);
    Some(Image::from_parts(read_bytes(body), key_len, tag == 2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::fold::tests::render;
    use crate::encode::image::{pair_prefix, ImageBuilder};

    fn img(id: i64, note: &str, partial: bool) -> Image {
        let mut b = ImageBuilder::new(1000);
        b.int_pair(&pair_prefix("id").unwrap(), id).unwrap();
        b.end_key();
        if !partial {
            b.string_pair(&pair_prefix("note").unwrap(), note.as_bytes()).unwrap();
        }
        b.finish(partial)
    }

    #[test]
    fn records_round_trip_and_fold_across_transactions() {
        let target = Target {
            channel: c"chan".into(),
            tbl: "public.t".into(),
            rows: Rows::Compact((*b"\"cols\":[\"id\"],").into()),
            retained: true,
        };
        let mut first = Folded::default();
        first.apply(Change { before: None, after: Some(img(1, "a", false)) });
        first.apply(Change { before: Some(img(2, "b", false)), after: Some(img(2, "c", false)) });
        first.apply(Change { before: Some(img(3, "", true)), after: None });
        let mut second = Folded::default();
        second.apply(Change { before: Some(img(1, "a", false)), after: Some(img(1, "z", false)) });
        second.apply(Change { before: Some(img(2, "c", false)), after: None });

        first.mark_overflow(Op::Update);
        let mut body = Vec::new();
        encode(&mut body, &target, &first);
        encode(&mut body, &target, &second);
        let decoded: Vec<_> = decode(&body).collect();
        assert_eq!(decoded.len(), 2);
        assert!(decoded.iter().all(|w| w.is_for(&target) && w.target() == target));
        assert_eq!(Op::ALL.map(|op| decoded[0].overflowed(op)), [false, true, false]);
        assert_eq!(Op::ALL.map(|op| decoded[1].overflowed(op)), [false; 3]);
        assert!(!decoded[0].truncated() && !decoded[1].truncated());

        let mut worker = Folded::of_transactions();
        decoded.iter().for_each(|w| w.fold_into(&mut worker));
        assert!(worker.overflowed(Op::Update));
        assert_eq!(
            render(&worker),
            [r#"insert {"id":1,"note":"z"}"#, r#"delete {"id":2,"note":"b"}"#, r#"delete {"id":3,"partial":true}"#]
        );
    }

    #[test]
    fn op_order_of_decoded_changes_is_kept() {
        let target = Target { channel: c"c".into(), tbl: "t".into(), rows: Rows::Objects, retained: false };
        let mut folded = Folded::default();
        folded.apply(Change { before: None, after: Some(img(5, "x", false)) });
        let mut body = Vec::new();
        encode(&mut body, &target, &folded);
        let change = decode(&body).next().unwrap().changes().next().unwrap();
        assert_eq!(change.op(), Some(Op::Insert));
        assert_eq!(change.after.as_ref().unwrap().key(), img(5, "", false).key());
    }

    #[test]
    fn a_truncate_clears_earlier_transactions_but_not_its_own_later_rows() {
        let target = Target { channel: c"c".into(), tbl: "t".into(), rows: Rows::Objects, retained: false };
        let mut earlier = Folded::default();
        earlier.apply(Change { before: None, after: Some(img(1, "a", false)) });
        earlier.mark_overflow(Op::Delete);
        let mut truncating = Folded::default();
        truncating.truncate(OnTruncate::Notice);
        truncating.apply(Change { before: None, after: Some(img(2, "b", false)) });
        let mut body = Vec::new();
        encode(&mut body, &target, &earlier);
        encode(&mut body, &target, &truncating);
        let mut worker = Folded::of_transactions();
        decode(&body).for_each(|w| w.fold_into(&mut worker));
        assert!(worker.truncated() && !worker.overflowed(Op::Delete));
        assert_eq!(render(&worker), [r#"insert {"id":2,"note":"b"}"#]);
    }

    #[test]
    fn a_reshape_crosses_the_queue_and_outlives_a_later_truncate() {
        let target = Target { channel: c"c".into(), tbl: "t".into(), rows: Rows::Objects, retained: true };
        let mut reshaping = Folded::default();
        reshaping.apply(Change { before: None, after: Some(img(1, "a", false)) });
        reshaping.mark_reshaped();
        let mut truncating = Folded::default();
        truncating.truncate(OnTruncate::Notice);
        let mut body = Vec::new();
        encode(&mut body, &target, &reshaping);
        encode(&mut body, &target, &truncating);
        let parts: Vec<_> = decode(&body).collect();
        assert!(parts[0].reshaped() && !parts[0].resync() && parts[0].retained() && !parts[1].reshaped());
        let mut worker = Folded::of_transactions();
        parts.iter().for_each(|w| w.fold_into(&mut worker));
        assert!(worker.reshaped() && worker.truncated() && worker.net_rows().next().is_none());
    }

    #[test]
    fn a_resync_part_carries_no_rows_and_asks_for_a_resync() {
        let target = Target { channel: c"c".into(), tbl: "t".into(), rows: Rows::Objects, retained: false };
        let mut body = Vec::new();
        encode_resync(&mut body, &target);
        let part = decode(&body).next().unwrap();
        assert!(part.resync() && part.is_for(&target) && part.changes().next().is_none());
        let mut folded = Folded::default();
        part.fold_into(&mut folded);
        assert!(folded.resync() && folded.net_rows().next().is_none());
    }

    #[test]
    fn a_part_that_cannot_be_sent_says_why() {
        let mut body = Vec::new();
        let long = Target {
            channel: CString::new("c".repeat(64)).unwrap(),
            tbl: "t".into(),
            rows: Rows::Objects,
            retained: false,
        };
        encode_resync(&mut body, &long);
        assert!(decode(&body).next().unwrap().unsendable().is_some());
    }
}
