//! Folding a watch's row changes to their net effect per primary key.
//!
//! A row is tracked by two images: before the first change (`None` if it did not exist) and after
//! the latest (`None` if it is gone). The net op follows from which exist, so n updates fold to one
//! update with the earliest old values, insert + delete to nothing, and a delete followed by an
//! insert of the same key to an update. A TRUNCATE makes every earlier change moot: subscribers
//! are told the table was emptied, then get what followed. Pure Rust, unit-tested with plain
//! `#[test]`s.

use hashbrown::HashTable;

use crate::fxhash;
use crate::payload::{Image, NetRow, Op};

/// One row change as a trigger saw it, or the folded net change of several.
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

    pub fn net_row(&self) -> Option<NetRow<'_>> {
        Some(NetRow { op: self.op()?, before: self.before.as_ref(), after: self.after.as_ref() })
    }

    /// The key the row had before this change (its identity for folding).
    fn lookup_key(&self) -> &[u8] {
        self.before.as_ref().or(self.after.as_ref()).expect("a change has an image").key()
    }
}

/// A tracked row: its net change, and the key it is found under once deleted, when that is not
/// its `before` key (it was inserted or moved in this transaction, and so may be revived).
#[derive(Debug)]
struct Row {
    change: Change,
    gone: Option<Box<[u8]>>,
}

impl Row {
    /// The key the row is found under.
    fn key(&self) -> &[u8] {
        let Change { before, after } = &self.change;
        match (after, &self.gone, before) {
            (Some(after), ..) => after.key(),
            (None, Some(gone), _) => gone,
            (None, None, Some(before)) => before.key(),
            (None, None, None) => unreachable!("a row without images keeps the key it was deleted under"),
        }
    }
}

/// The net changes of one watch, in the order each row was first changed.
///
/// Rows are found by key through a table of row indices (no key is copied). The table is built
/// lazily: a transaction that changes one row, or a delivery worker's first record of a watch,
/// never hashes.
#[derive(Default)]
pub struct Folded {
    rows: Vec<Row>,
    /// Current key → row, for `rows[..indexed]`. A deleted row stays reachable by its key so that
    /// a re-insert revives it.
    index: HashTable<usize>,
    indexed: usize,
    /// Per op: some rows could not be listed (too big, or past the per-transaction limit).
    overflow: [bool; 3],
    /// The table was truncated before the changes held here.
    truncated: bool,
}

impl Folded {
    /// Notes that some `op` rows could not be listed: subscribers are told to refetch.
    pub fn mark_overflow(&mut self, op: Op) {
        self.overflow[op.index()] = true;
    }

    pub fn overflowed(&self, op: Op) -> bool {
        self.overflow[op.index()]
    }

    /// The table was emptied: what came before no longer matters.
    pub fn truncate(&mut self) {
        *self = Folded { truncated: true, ..Folded::default() };
    }

    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// Whether anything is left to send.
    pub fn has_news(&self) -> bool {
        self.truncated || self.overflow.contains(&true) || self.net_rows().next().is_some()
    }

    /// How many rows are tracked (the memory bound counts these).
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// How many rows fit without growing.
    pub fn capacity(&self) -> usize {
        self.rows.capacity()
    }

    /// Forgets every change, keeping the memory for the next transaction's.
    pub fn clear(&mut self) {
        let Folded { rows, index, indexed, overflow, truncated } = self;
        rows.clear();
        index.clear();
        *indexed = 0;
        *overflow = [false; 3];
        *truncated = false;
    }

    /// Adds net changes of distinct rows (one transaction's, as queued) to an empty fold, without
    /// indexing them until another change arrives.
    pub fn extend_net(&mut self, changes: impl IntoIterator<Item = Change>) {
        debug_assert!(self.rows.is_empty());
        self.rows.extend(changes.into_iter().map(|change| Row { change, gone: None }));
    }

    /// Makes room for `additional` more rows, e.g. a statement's, so that neither the rows nor
    /// the index grow step by step while they arrive.
    pub fn reserve(&mut self, additional: usize) {
        let Folded { rows, index, .. } = self;
        rows.reserve(additional);
        if !rows.is_empty() || additional > 1 {
            index.reserve(additional, |&i| fxhash::hash_bytes(rows[i].key()));
        }
    }

    /// Indexes the rows added since the last call. Where rows share a key, the live one is the
    /// one found (keys are unique among live rows); among deleted ones, the latest.
    fn index_rest(&mut self) {
        let Folded { rows, index, indexed, .. } = self;
        for at in *indexed..rows.len() {
            let key = rows[at].key();
            let hash = fxhash::hash_bytes(key);
            match index.find_mut(hash, |&i| rows[i].key() == key) {
                Some(found) if rows[*found].change.after.is_some() => {}
                Some(found) => *found = at,
                None => {
                    index.insert_unique(hash, at, |&i| fxhash::hash_bytes(rows[i].key()));
                }
            }
        }
        *indexed = rows.len();
    }

    pub fn apply(&mut self, change: Change) {
        if self.rows.is_empty() {
            self.rows.push(Row { change, gone: None });
            return;
        }
        self.index_rest();
        let key = change.lookup_key();
        let hash = fxhash::hash_bytes(key);
        let Folded { rows, index, indexed, .. } = self;
        let Ok(entry) = index.find_entry(hash, |&i| rows[i].key() == key) else {
            // A new row is found under its key after the change: the looked-up one unless it moved.
            let moved = change.after.as_ref().is_some_and(|after| after.key() != key);
            let row = Row { change, gone: None };
            let hash = if moved { fxhash::hash_bytes(row.key()) } else { hash };
            index.insert_unique(hash, rows.len(), |&i| fxhash::hash_bytes(rows[i].key()));
            rows.push(row);
            *indexed = rows.len();
            return;
        };
        let at = *entry.get();
        match &change.after {
            Some(after) if after.key() != key => {
                // The key moved: the row is now found under its new key only. A row that had the
                // new key and was deleted stays listed as a delete (deletes are sent before updates).
                entry.remove();
                let moved = fxhash::hash_bytes(after.key());
                match index.find_mut(moved, |&i| rows[i].key() == after.key()) {
                    Some(found) => *found = at,
                    None => {
                        index.insert_unique(moved, at, |&i| fxhash::hash_bytes(rows[i].key()));
                    }
                }
            }
            Some(_) => {}
            None => {
                // Deleted: still found under this key, which its `before` image may not hold.
                let row = &mut rows[at];
                if row.change.before.as_ref().is_none_or(|before| before.key() != key) {
                    row.gone = Some(key.into());
                }
            }
        }
        rows[at].change.after = change.after;
    }

    /// Net changes in first-change order, rows whose changes cancel out left out.
    pub fn net_rows(&self) -> impl Iterator<Item = NetRow<'_>> {
        self.rows.iter().filter_map(|row| row.change.net_row())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::{pair_prefix, ImageBuilder, PayloadBuf};

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

    fn render(folded: &Folded) -> Vec<String> {
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
    fn key_moves_are_followed() {
        assert_eq!(
            fold(vec![upd((1, "a"), (2, "a")), upd((2, "a"), (3, "b"))]),
            [r#"update {"id":3,"role":"b","old":{"id":1,"role":"a"}}"#]
        );
    }

    #[test]
    fn a_key_freed_by_a_move_can_be_reused() {
        assert_eq!(
            fold(vec![upd((1, "a"), (2, "a")), ins(1, "n")]),
            [r#"update {"id":2,"role":"a","old":{"id":1}}"#, r#"insert {"id":1,"role":"n"}"#]
        );
    }

    /// Folds `first` as a transaction, queues its net rows, then folds `then` on top, as a
    /// delivery worker does; the result must equal folding everything at once.
    fn fold_queued(first: Vec<Change>, then: Vec<Change>) -> Vec<String> {
        let mut writer = Folded::default();
        first.into_iter().for_each(|change| writer.apply(change));
        let queued: Vec<Change> =
            writer.net_rows().map(|row| Change { before: row.before.cloned(), after: row.after.cloned() }).collect();
        let mut worker = Folded::default();
        worker.extend_net(queued);
        then.into_iter().for_each(|change| worker.apply(change));
        render(&worker)
    }

    #[test]
    fn queued_rows_fold_like_unqueued_ones() {
        // Row 2 is deleted, then row 1 moves onto key 2: the mover, not the deleted row, is found.
        let first = || vec![ins(1, "a"), upd((2, "b"), (2, "c")), del(2, "c"), upd((1, "a"), (2, "a"))];
        let then = || vec![upd((2, "a"), (2, "z")), ins(3, "n"), del(3, "n")];
        let all: Vec<Change> = first().into_iter().chain(then()).collect();
        assert_eq!(fold_queued(first(), then()), fold(all));
        assert_eq!(fold_queued(first(), then()), [r#"insert {"id":2,"role":"z"}"#, r#"delete {"id":2,"role":"b"}"#]);
    }

    #[test]
    fn a_row_inserted_and_deleted_is_revived_where_it_was() {
        assert_eq!(
            fold(vec![ins(1, "a"), ins(2, "b"), del(1, "a"), ins(1, "c")]),
            [r#"insert {"id":1,"role":"c"}"#, r#"insert {"id":2,"role":"b"}"#]
        );
        // Moved, then deleted: found again under the key it was deleted with.
        assert_eq!(
            fold(vec![upd((1, "a"), (5, "a")), del(5, "a"), ins(5, "n")]),
            [r#"update {"id":5,"role":"n","old":{"id":1,"role":"a"}}"#]
        );
    }

    #[test]
    fn truncate_drops_what_came_before_and_keeps_what_follows() {
        let mut folded = Folded::default();
        folded.apply(ins(1, "a"));
        folded.mark_overflow(Op::Update);
        assert!(!folded.truncated());
        folded.truncate();
        assert!(folded.truncated() && folded.has_news() && !folded.overflowed(Op::Update));
        assert_eq!(folded.net_rows().count(), 0);
        folded.apply(ins(1, "b"));
        assert_eq!(folded.net_rows().map(|row| row.op).collect::<Vec<_>>(), [Op::Insert]);
        assert!(!Folded::default().has_news());
    }

    #[test]
    fn a_cleared_fold_keeps_its_memory_and_nothing_else() {
        let mut folded = Folded::default();
        folded.apply(ins(1, "a"));
        folded.apply(upd((1, "a"), (1, "b")));
        folded.apply(del(2, "c"));
        folded.mark_overflow(Op::Delete);
        folded.truncate();
        folded.apply(ins(3, "d"));
        folded.apply(ins(4, "e"));
        let capacity = folded.capacity();
        folded.clear();
        assert!(!folded.has_news() && !folded.truncated() && !folded.overflowed(Op::Delete));
        assert_eq!((folded.len(), folded.capacity()), (0, capacity));
        // The index is empty too: a key seen before the clear is a new row after it.
        folded.apply(ins(3, "f"));
        folded.apply(upd((3, "f"), (3, "g")));
        folded.apply(del(4, "e"));
        assert_eq!(render(&folded), [r#"insert {"id":3,"role":"g"}"#, r#"delete {"id":4,"role":"e"}"#]);
    }

    #[test]
    fn moving_onto_a_deleted_key_keeps_the_delete() {
        assert_eq!(
            fold(vec![del(2, "x"), upd((1, "a"), (2, "a"))]),
            [r#"delete {"id":2,"role":"x"}"#, r#"update {"id":2,"role":"a","old":{"id":1}}"#]
        );
    }
}
