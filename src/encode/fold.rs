//! Folding a watch's row changes to their net effect per primary key.
//!
//! Each key the changes touch is tracked by two images: the row under it before the first change
//! (`None` if there was none) and after the latest (`None` if there is none now). The net op
//! follows from which exist: n updates fold to one update with the earliest old values, insert +
//! delete to nothing, delete + insert of the same key to an update. The key is the identity: an
//! update that changes a row's key is the delete of the old key and the insert of the new one (an
//! update, if that key held a row earlier in the fold). So the net changes of different keys never
//! depend on each other: applied in any order, also spread over many payloads, they leave a
//! subscriber's copy equal to the table (swaps and rotations of keys fold to updates). Folding a
//! fold's net changes on top of another's is the same as folding all their changes at once, which
//! lets a delivery worker fold transactions together, with one difference: a row one transaction
//! inserted and a later one deleted was committed in between, where a subscriber may have fetched
//! it, so a fold of several transactions sends its delete. A TRUNCATE makes every earlier change moot:
//! subscribers are told the table was emptied, then get what followed. Pure Rust, unit-tested with
//! plain `#[test]`s.

use hashbrown::HashTable;

use super::image::Image;
use super::row::NetRow;
use crate::fxhash;
use crate::model::events::Op;
use crate::model::watch::OnTruncate;

/// One row change as a trigger saw it (its key may change), or the folded net change of one key.
#[derive(Clone, Debug)]
pub struct Change {
    pub before: Option<Image>,
    pub after: Option<Image>,
}

impl Change {
    /// The change's net op; `None` when the row neither existed before nor exists after.
    pub fn op(&self) -> Option<Op> {
        match (&self.before, &self.after) {
            (None, Some(_)) => Some(Op::Insert),
            (Some(_), Some(_)) => Some(Op::Update),
            (Some(_), None) => Some(Op::Delete),
            (None, None) => None,
        }
    }
}

/// The net change of one key.
#[derive(Debug)]
struct Entry {
    change: Change,
    /// Once a row inserted in this fold is deleted again neither image remains: the deleted
    /// row, kept for its key (and, in a fold of several transactions, sent as its delete).
    gone: Option<Image>,
}

/// Whether a change that found the row under its key as `found` (`None`: no row) follows the
/// change folded last, which left it as `held`. In the order changes happen they always do (a key
/// is never held by two rows at once, since watched keys are not deferrable), but another
/// trigger can change the row again inside the statement that changed it, and that nested change
/// reaches the fold first; settings that print values differently (`TimeZone`, say) between the
/// writing sessions a worker folds together break the chain too. A cut image can never be
/// compared.
fn follows(held: Option<&Image>, found: Option<&Image>) -> bool {
    match (held, found) {
        (None, None) => true,
        (Some(held), Some(found)) => !held.partial && held == found,
        _ => false,
    }
}

impl Entry {
    fn key(&self) -> &[u8] {
        let Change { before, after } = &self.change;
        after.as_ref().or(before.as_ref()).or(self.gone.as_ref()).expect("an entry keeps an image of its key").key()
    }

    /// The key's net change; with `committed_between`, a row inserted and deleted again is
    /// sent as deleted.
    fn net_row(&self, committed_between: bool) -> Option<NetRow<'_>> {
        let Change { before, after } = &self.change;
        match self.change.op() {
            Some(op) => Some(NetRow { op, before: before.as_ref(), after: after.as_ref() }),
            None if committed_between => {
                self.gone.as_ref().map(|gone| NetRow { op: Op::Delete, before: Some(gone), after: None })
            }
            None => None,
        }
    }
}

/// The net changes of one watch, one per key, in the order each key was first changed.
///
/// Keys are found through a table of entry indices (no key is copied). The table is built
/// lazily: a transaction that changes one row, or a delivery worker's first record of a watch,
/// never hashes.
#[derive(Default)]
pub struct Folded {
    entries: Vec<Entry>,
    /// Key → entry, for `entries[..indexed]`.
    index: HashTable<usize>,
    indexed: usize,
    /// Per op: some rows could not be listed (too big, or past the per-transaction limit).
    overflow: [bool; 3],
    /// The table was truncated before the changes held here, and a truncate notice is due.
    truncated: bool,
    /// The table was truncated, and its watch, which does not report truncate, has subscribers
    /// refetch after these changes (see [`OnTruncate`]).
    refetch: bool,
    /// Subscribers must refetch after these changes: older ones may have reached them late.
    resync: bool,
    /// DDL changed which rows the table holds or how they read (a partition attached, say): no
    /// row event says so, and subscribers refetch after these changes.
    reshaped: bool,
    /// The changes are of several transactions, each folded to its net changes before (see
    /// [`Folded::of_transactions`]).
    of_transactions: bool,
}

impl Folded {
    /// A fold of committed transactions' net changes, one after another (a delivery worker's):
    /// each transaction's changes are of distinct keys, so a key inserted and then deleted here
    /// was inserted by one transaction and deleted by a later one. Between their commits a
    /// subscriber may have fetched the row (its first snapshot, or a refetch), so the delete is
    /// sent: applying it to a copy that never held the row changes nothing.
    pub fn of_transactions() -> Folded {
        Folded { of_transactions: true, ..Folded::default() }
    }

    /// Notes that some `op` rows could not be listed: subscribers are told to refetch.
    pub fn mark_overflow(&mut self, op: Op) {
        self.overflow[op.index()] = true;
    }

    pub fn overflowed(&self, op: Op) -> bool {
        self.overflow[op.index()]
    }

    /// Notes that subscribers must refetch once these changes are sent (see `notify`).
    pub fn mark_resync(&mut self) {
        self.resync = true;
    }

    pub fn resync(&self) -> bool {
        self.resync
    }

    /// Notes that DDL changed which rows the table holds or how they read: subscribers refetch
    /// once these changes are sent.
    pub fn mark_reshaped(&mut self) {
        self.reshaped = true;
    }

    pub fn reshaped(&self) -> bool {
        self.reshaped
    }

    /// The table was emptied: what came before no longer matters (but a resync, a reshape, and
    /// what earlier truncates asked for, still do). `on` says what subscribers hear of it.
    pub fn truncate(&mut self, on: OnTruncate) {
        let (truncated, refetch) =
            (self.truncated || on == OnTruncate::Notice, self.refetch || on == OnTruncate::Refetch);
        *self = Folded {
            truncated,
            refetch,
            resync: self.resync,
            reshaped: self.reshaped,
            of_transactions: self.of_transactions,
            ..Folded::default()
        };
    }

    /// A truncate notice is due, before the changes held here.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// A refetch for a truncate is due, after the changes held here.
    pub fn refetch_after_truncate(&self) -> bool {
        self.refetch
    }

    /// Whether anything is left to send.
    pub fn has_news(&self) -> bool {
        self.truncated
            || self.refetch
            || self.resync
            || self.reshaped
            || self.overflow.contains(&true)
            || self.net_rows().next().is_some()
    }

    /// How many keys are tracked (the memory bound counts these).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// How many keys fit without growing.
    pub fn capacity(&self) -> usize {
        self.entries.capacity()
    }

    /// Forgets every change, keeping the memory for the next transaction's.
    pub fn clear(&mut self) {
        let Folded { entries, index, indexed, overflow, truncated, refetch, resync, reshaped, of_transactions: _ } =
            self;
        entries.clear();
        index.clear();
        *indexed = 0;
        *overflow = [false; 3];
        *truncated = false;
        *refetch = false;
        *resync = false;
        *reshaped = false;
    }

    /// Adds net changes of distinct keys (one transaction's, as queued) to an empty fold, without
    /// indexing them until another change arrives.
    pub fn extend_net(&mut self, changes: impl IntoIterator<Item = Change>) {
        debug_assert!(self.entries.is_empty());
        self.entries.extend(changes.into_iter().map(|change| Entry { change, gone: None }));
    }

    /// Makes room for `additional` more keys, e.g. a statement's, so that neither the entries nor
    /// the index grow step by step while they arrive.
    pub fn reserve(&mut self, additional: usize) {
        let Folded { entries, index, .. } = self;
        entries.reserve(additional);
        if !entries.is_empty() || additional > 1 {
            index.reserve(additional, |&i| fxhash::hash_bytes(entries[i].key()));
        }
    }

    /// Indexes the entries added since the last call (their keys are distinct).
    fn index_rest(&mut self) {
        let Folded { entries, index, indexed, .. } = self;
        for at in *indexed..entries.len() {
            let hash = fxhash::hash_bytes(entries[at].key());
            debug_assert!(index.find(hash, |&i| entries[i].key() == entries[at].key()).is_none());
            index.insert_unique(hash, at, |&i| fxhash::hash_bytes(entries[i].key()));
        }
        *indexed = entries.len();
    }

    /// Folds one row change, which comes after every change folded so far.
    pub fn apply(&mut self, change: Change) {
        match change {
            Change { before: Some(before), after: Some(after) } if before.key() != after.key() => {
                // The key changed: the old key is deleted, the new one taken.
                self.apply_key(Some(before), None);
                self.apply_key(None, Some(after));
            }
            Change { before, after } => self.apply_key(before, after),
        }
    }

    /// Folds one change of the row under one key: `before` as the change found it, `after` as it
    /// left it (`None`: no row).
    fn apply_key(&mut self, before: Option<Image>, after: Option<Image>) {
        if self.entries.is_empty() {
            self.entries.push(Entry { change: Change { before, after }, gone: None });
            return;
        }
        self.index_rest();
        let Folded { entries, index, indexed, .. } = self;
        let key = before.as_ref().or(after.as_ref()).expect("a change has an image").key();
        let hash = fxhash::hash_bytes(key);
        let Some(&at) = index.find(hash, |&i| entries[i].key() == key) else {
            index.insert_unique(hash, entries.len(), |&i| fxhash::hash_bytes(entries[i].key()));
            entries.push(Entry { change: Change { before, after }, gone: None });
            *indexed = entries.len();
            return;
        };
        let entry = &mut entries[at];
        if !follows(entry.change.after.as_ref(), before.as_ref()) {
            // Out of order (or cut, or given up on before): neither image can be trusted, so the
            // row is sent as its key, flagged partial, and subscribers fetch it (or find it gone).
            let image = after.as_ref().or(before.as_ref()).expect("a change has an image");
            entry.change.after = Some(image.key_only());
            entry.gone = None;
            return;
        }
        if after.is_none() && entry.change.before.is_none() {
            // Inserted in this fold and deleted again: nothing is left to hold the key.
            entry.gone = before;
        }
        entry.change.after = after;
    }

    /// Net changes in first-change order, keys whose changes cancel out left out (within one
    /// transaction: see [`Folded::of_transactions`]).
    pub fn net_rows(&self) -> impl Iterator<Item = NetRow<'_>> {
        self.entries.iter().filter_map(|entry| entry.net_row(self.of_transactions))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::encode::image::{pair_prefix, ImageBuilder, PayloadBuf};

    fn img(id: i64, role: &str) -> Image {
        let mut b = ImageBuilder::new(1000);
        b.raw_pair(&pair_prefix("id").unwrap(), id.to_string().as_bytes()).unwrap();
        b.end_key();
        b.string_pair(&pair_prefix("role").unwrap(), role.as_bytes()).unwrap();
        b.finish(false)
    }

    fn ins(id: i64, role: &str) -> Change {
        Change { before: None, after: Some(img(id, role)) }
    }

    fn upd(old: (i64, &str), new: (i64, &str)) -> Change {
        Change { before: Some(img(old.0, old.1)), after: Some(img(new.0, new.1)) }
    }

    fn del(id: i64, role: &str) -> Change {
        Change { before: Some(img(id, role)), after: None }
    }

    fn fold(changes: Vec<Change>) -> Vec<String> {
        let mut folded = Folded::default();
        for change in changes {
            folded.apply(change);
        }
        render(&folded)
    }

    /// The net rows of `folded` as `op json`, in sending order (also used by the record tests).
    pub(crate) fn render(folded: &Folded) -> Vec<String> {
        folded
            .net_rows()
            .map(|row| {
                let mut out = PayloadBuf::new();
                row.render(&mut out, 1000, false).unwrap();
                format!("{} {}", row.op.as_str(), std::str::from_utf8(&out).unwrap())
            })
            .collect()
    }

    #[test]
    fn distinct_rows_keep_change_order() {
        assert_eq!(
            fold(vec![ins(2, "a"), del(1, "b"), upd((3, "c"), (3, "c"))]),
            [r#"insert {"id":2,"role":"a"}"#, r#"delete {"id":1,"role":"b"}"#, r#"update {"id":3,"role":"c"}"#]
        );
    }

    #[test]
    fn updates_fold_to_latest_values_and_earliest_old() {
        assert_eq!(
            fold(vec![upd((1, "a"), (1, "b")), upd((1, "b"), (1, "c"))]),
            [r#"update {"id":1,"role":"c","old":{"role":"a"}}"#]
        );
    }

    #[test]
    fn updates_that_restore_a_value_report_no_old_value() {
        assert_eq!(fold(vec![upd((1, "a"), (1, "b")), upd((1, "b"), (1, "a"))]), [r#"update {"id":1,"role":"a"}"#]);
    }

    #[test]
    fn insert_then_updates_is_one_insert_with_latest_values() {
        assert_eq!(
            fold(vec![ins(1, "a"), upd((1, "a"), (1, "b")), upd((1, "b"), (5, "c"))]),
            [r#"insert {"id":5,"role":"c"}"#]
        );
    }

    #[test]
    fn insert_then_delete_is_nothing() {
        assert_eq!(fold(vec![ins(1, "a"), upd((1, "a"), (1, "b")), del(1, "b")]), Vec::<String>::new());
    }

    #[test]
    fn updates_then_delete_is_one_delete_of_the_row_as_it_was() {
        assert_eq!(
            fold(vec![upd((1, "a"), (2, "b")), upd((2, "b"), (2, "c")), del(2, "c")]),
            [r#"delete {"id":1,"role":"a"}"#]
        );
    }

    #[test]
    fn delete_then_insert_is_an_update() {
        assert_eq!(fold(vec![del(1, "a"), ins(1, "b")]), [r#"update {"id":1,"role":"b","old":{"role":"a"}}"#]);
    }

    #[test]
    fn a_key_change_is_the_delete_of_the_old_key_and_the_insert_of_the_new() {
        assert_eq!(
            fold(vec![upd((1, "a"), (2, "a")), upd((2, "a"), (3, "b"))]),
            [r#"delete {"id":1,"role":"a"}"#, r#"insert {"id":3,"role":"b"}"#]
        );
    }

    #[test]
    fn a_key_freed_by_a_move_and_taken_again_is_an_update() {
        assert_eq!(
            fold(vec![upd((1, "a"), (2, "a")), ins(1, "n")]),
            [r#"update {"id":1,"role":"n","old":{"role":"a"}}"#, r#"insert {"id":2,"role":"a"}"#]
        );
    }

    #[test]
    fn swaps_and_rotations_of_keys_fold_to_updates_of_each_key() {
        // Swap through a free key: 1 -> 3, 2 -> 1, 3 -> 2.
        assert_eq!(
            fold(vec![upd((1, "a"), (3, "a")), upd((2, "b"), (1, "b")), upd((3, "a"), (2, "a"))]),
            [r#"update {"id":1,"role":"b","old":{"role":"a"}}"#, r#"update {"id":2,"role":"a","old":{"role":"b"}}"#]
        );
        // Rotation: 10 -> 13, 11 -> 10, 12 -> 11, 13 -> 12.
        assert_eq!(
            fold(vec![
                upd((10, "a"), (13, "a")),
                upd((11, "b"), (10, "b")),
                upd((12, "c"), (11, "c")),
                upd((13, "a"), (12, "a")),
            ]),
            [
                r#"update {"id":10,"role":"b","old":{"role":"a"}}"#,
                r#"update {"id":11,"role":"c","old":{"role":"b"}}"#,
                r#"update {"id":12,"role":"a","old":{"role":"c"}}"#
            ]
        );
    }

    /// Folds each of `transactions` as its writer does, then their net rows one after the other,
    /// as a delivery worker does; the result equals folding every change at once, but for rows
    /// one transaction inserted and a later one deleted.
    fn fold_queued(transactions: Vec<Vec<Change>>) -> Vec<String> {
        let mut worker = Folded::of_transactions();
        for changes in transactions {
            let mut writer = Folded::default();
            changes.into_iter().for_each(|change| writer.apply(change));
            let queued = writer.net_rows().map(|row| Change { before: row.before.cloned(), after: row.after.cloned() });
            if worker.len() == 0 {
                worker.extend_net(queued.collect::<Vec<_>>());
            } else {
                queued.for_each(|change| worker.apply(change));
            }
        }
        render(&worker)
    }

    #[test]
    fn queued_rows_fold_like_unqueued_ones() {
        // Row 2 is deleted, then row 1 moves onto key 2.
        let first = || vec![ins(1, "a"), upd((2, "b"), (2, "c")), del(2, "c"), upd((1, "a"), (2, "a"))];
        let then = || vec![upd((2, "a"), (2, "z")), ins(3, "n"), del(3, "n")];
        let all: Vec<Change> = first().into_iter().chain(then()).collect();
        assert_eq!(fold_queued(vec![first(), then()]), fold(all));
        assert_eq!(fold_queued(vec![first(), then()]), [r#"update {"id":2,"role":"z","old":{"role":"b"}}"#]);
    }

    #[test]
    fn a_row_inserted_by_one_transaction_and_deleted_by_a_later_one_is_sent_deleted() {
        // A subscriber may have fetched the table between the two commits.
        assert_eq!(fold_queued(vec![vec![ins(1, "a")], vec![del(1, "a")]]), [r#"delete {"id":1,"role":"a"}"#]);
        // Within one transaction no one saw it.
        assert_eq!(
            fold_queued(vec![vec![ins(1, "a"), del(1, "a")], vec![ins(2, "b")]]),
            [r#"insert {"id":2,"role":"b"}"#]
        );
        // Inserted again by a third: the insert alone.
        assert_eq!(
            fold_queued(vec![vec![ins(1, "a")], vec![del(1, "a")], vec![ins(1, "c")]]),
            [r#"insert {"id":1,"role":"c"}"#]
        );
    }

    #[test]
    fn a_key_one_transaction_inserted_and_a_later_one_moved_away_is_sent_deleted() {
        assert_eq!(
            fold_queued(vec![vec![ins(1, "a")], vec![upd((1, "a"), (2, "a"))]]),
            [r#"delete {"id":1,"role":"a"}"#, r#"insert {"id":2,"role":"a"}"#]
        );
    }

    #[test]
    fn a_worker_folding_transactions_that_move_keys_sends_each_key_its_final_row() {
        // Rows (1,x) and (2,a); T1 appends a dot to both; T2 sets row 1 to x2, moves 2 to 3 and 1 to 2.
        let t1 = vec![upd((1, "x"), (1, "x.")), upd((2, "a"), (2, "a."))];
        let t2 = vec![upd((1, "x."), (1, "x2")), upd((2, "a."), (3, "a.")), upd((1, "x2"), (2, "x2"))];
        let all: Vec<Change> = t1.iter().chain(&t2).cloned().collect();
        let expected = [
            r#"delete {"id":1,"role":"x"}"#,
            r#"update {"id":2,"role":"x2","old":{"role":"a"}}"#,
            r#"insert {"id":3,"role":"a."}"#,
        ];
        assert_eq!(fold_queued(vec![t1, t2]), expected);
        assert_eq!(fold(all), expected);
    }

    #[test]
    fn a_row_inserted_and_deleted_is_revived_where_it_was() {
        assert_eq!(
            fold(vec![ins(1, "a"), ins(2, "b"), del(1, "a"), ins(1, "c")]),
            [r#"insert {"id":1,"role":"c"}"#, r#"insert {"id":2,"role":"b"}"#]
        );
        // Moved, then deleted: the key it moved to was free before, so a new row there is an insert.
        assert_eq!(
            fold(vec![upd((1, "a"), (5, "a")), del(5, "a"), ins(5, "n")]),
            [r#"delete {"id":1,"role":"a"}"#, r#"insert {"id":5,"role":"n"}"#]
        );
    }

    #[test]
    fn truncate_drops_what_came_before_and_keeps_what_follows() {
        let mut folded = Folded::default();
        folded.apply(ins(1, "a"));
        folded.mark_overflow(Op::Update);
        folded.mark_resync();
        assert!(!folded.truncated());
        folded.truncate(OnTruncate::Notice);
        assert!(folded.truncated() && folded.has_news() && !folded.overflowed(Op::Update) && folded.resync());
        assert_eq!(folded.net_rows().count(), 0);
        folded.apply(ins(1, "b"));
        assert_eq!(folded.net_rows().map(|row| row.op).collect::<Vec<_>>(), [Op::Insert]);
        assert!(!Folded::default().has_news());
    }

    #[test]
    fn a_change_that_does_not_follow_the_last_one_sends_the_row_as_its_key() {
        // Another trigger updated the row again inside the statement, and its change came first:
        // the images cannot say where the row ended, so subscribers fetch it.
        assert_eq!(fold(vec![upd((1, "b"), (1, "c")), upd((1, "a"), (1, "b"))]), [r#"update {"id":1,"partial":true}"#]);
        // A row deleted and put back by another trigger does not vanish from the fold.
        assert_eq!(fold(vec![ins(1, "z"), del(1, "a")]), [r#"insert {"id":1,"partial":true}"#]);
        // Nor does a row deleted in between without this fold seeing it (a muted transaction).
        assert_eq!(fold(vec![upd((1, "a"), (1, "b")), ins(1, "c")]), [r#"update {"id":1,"partial":true}"#]);
        // Once given up on, the row stays partial whatever follows.
        assert_eq!(
            fold(vec![upd((1, "b"), (1, "c")), upd((1, "a"), (1, "b")), upd((1, "c"), (1, "d")), del(1, "d")]),
            [r#"update {"id":1,"partial":true}"#]
        );
        // Other keys keep their values.
        assert_eq!(
            fold(vec![upd((2, "x"), (2, "y")), upd((1, "b"), (1, "c")), upd((1, "a"), (1, "b"))]),
            [r#"update {"id":2,"role":"y","old":{"role":"x"}}"#, r#"update {"id":1,"partial":true}"#]
        );
    }

    #[test]
    fn a_reshape_is_news_and_outlives_a_truncate() {
        let mut folded = Folded::default();
        folded.mark_reshaped();
        assert!(folded.reshaped() && folded.has_news());
        folded.apply(ins(1, "a"));
        folded.truncate(OnTruncate::Notice);
        assert!(folded.reshaped() && folded.truncated());
        folded.clear();
        assert!(!folded.reshaped() && !folded.has_news());
    }

    #[test]
    fn a_truncate_its_watch_does_not_report_asks_for_a_refetch_and_keeps_an_earlier_notice() {
        let mut folded = Folded::default();
        folded.apply(ins(1, "a"));
        folded.truncate(OnTruncate::Refetch);
        assert!(folded.refetch_after_truncate() && !folded.truncated() && folded.has_news());
        assert_eq!(folded.net_rows().count(), 0);
        folded.truncate(OnTruncate::Notice);
        folded.apply(ins(2, "b"));
        assert!(folded.refetch_after_truncate() && folded.truncated());
        assert_eq!(render(&folded), [r#"insert {"id":2,"role":"b"}"#]);
        folded.clear();
        assert!(!folded.refetch_after_truncate() && !folded.has_news());
    }

    #[test]
    fn a_cleared_fold_keeps_its_memory_and_nothing_else() {
        let mut folded = Folded::default();
        folded.apply(ins(1, "a"));
        folded.apply(upd((1, "a"), (1, "b")));
        folded.apply(del(2, "c"));
        folded.mark_overflow(Op::Delete);
        folded.mark_resync();
        folded.truncate(OnTruncate::Notice);
        folded.apply(ins(3, "d"));
        folded.apply(ins(4, "e"));
        let capacity = folded.capacity();
        folded.clear();
        assert!(!folded.has_news() && !folded.truncated() && !folded.overflowed(Op::Delete) && !folded.resync());
        assert_eq!((folded.len(), folded.capacity()), (0, capacity));
        // The index is empty too: a key seen before the clear is a new row after it.
        folded.apply(ins(3, "f"));
        folded.apply(upd((3, "f"), (3, "g")));
        folded.apply(del(4, "e"));
        assert_eq!(render(&folded), [r#"insert {"id":3,"role":"g"}"#, r#"delete {"id":4,"role":"e"}"#]);
    }

    #[test]
    fn moving_onto_a_deleted_key_is_an_update_of_that_key() {
        assert_eq!(
            fold(vec![del(2, "x"), upd((1, "a"), (2, "a"))]),
            [r#"update {"id":2,"role":"a","old":{"role":"x"}}"#, r#"delete {"id":1,"role":"a"}"#]
        );
    }

    /// Applies rendered net rows (`op row`) to a copy of a table of (id, role) rows by the rules
    /// subscribers follow: deletes, updates and inserts each by key.
    fn apply_rows(table: &mut std::collections::BTreeMap<i64, String>, rows: &[String]) {
        for row in rows {
            let (op, json) = row.split_once(' ').unwrap();
            let v: serde_json::Value = serde_json::from_str(json).unwrap();
            let id = v["id"].as_i64().unwrap();
            match op {
                "delete" => {
                    table.remove(&id);
                }
                _ => {
                    table.insert(id, v["role"].as_str().unwrap().to_string());
                }
            }
        }
    }

    #[test]
    fn random_changes_folded_and_applied_by_key_reproduce_the_table() {
        use std::collections::BTreeMap;
        // A small deterministic generator (no dependency): xorshift.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        for _ in 0..300 {
            let mut table: BTreeMap<i64, String> =
                (0..6).filter(|_| next(2) == 0).map(|k| (k, "s".to_string())).collect();
            let start = table.clone();
            let mut transactions = Vec::new();
            for _ in 0..1 + next(3) {
                let mut changes = Vec::new();
                for step in 0..1 + next(8) {
                    let key = next(8) as i64;
                    let role = format!("r{step}");
                    match (table.get(&key).cloned(), next(3)) {
                        (None, _) => {
                            table.insert(key, role.clone());
                            changes.push(ins(key, &role));
                        }
                        (Some(was), 0) => {
                            table.remove(&key);
                            changes.push(del(key, &was));
                        }
                        (Some(was), 1) => {
                            table.insert(key, role.clone());
                            changes.push(upd((key, &was), (key, &role)));
                        }
                        (Some(was), _) => {
                            let to = next(8) as i64;
                            if !table.contains_key(&to) {
                                table.remove(&key);
                                table.insert(to, was.clone());
                                changes.push(upd((key, &was), (to, &was)));
                            }
                        }
                    }
                }
                transactions.push(changes);
            }
            let all: Vec<Change> = transactions.iter().flatten().cloned().collect();
            for rows in [fold(all), fold_queued(transactions)] {
                let mut copy = start.clone();
                apply_rows(&mut copy, &rows);
                assert_eq!(copy, table, "{rows:?}");
            }
        }
    }
}
