//! Folding a watch's row changes to their net effect per primary key.
//!
//! A row is tracked by two images: before the first change (`None` if it did not exist) and after
//! the latest (`None` if it is gone). The net op follows from which exist, so n updates fold to one
//! update with the earliest old values, insert + delete to nothing, and a delete followed by an
//! insert of the same key to an update. A TRUNCATE makes every earlier change moot: subscribers
//! are told the table was emptied, then get what followed. Pure Rust, unit-tested with plain
//! `#[test]`s.

use crate::fxhash::FxHashMap;
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

/// The net changes of one watch, in the order each row was first changed.
#[derive(Default)]
pub struct Folded {
    rows: Vec<Change>,
    /// Current key → row. A deleted row stays reachable by its key so that a re-insert revives it.
    by_key: FxHashMap<Box<[u8]>, usize>,
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

    pub fn apply(&mut self, change: Change) {
        let Some(&at) = self.by_key.get(change.lookup_key()) else {
            let key = change.after.as_ref().or(change.before.as_ref()).expect("a change has an image").key();
            self.by_key.insert(key.into(), self.rows.len());
            self.rows.push(change);
            return;
        };
        if let Some(after) = change.after.as_ref().filter(|after| after.key() != change.lookup_key()) {
            // The key moved: the row is now found under its new key only. A row that had the new
            // key and was deleted stays listed as a delete (deletes are sent before updates).
            self.by_key.remove(change.lookup_key());
            self.by_key.insert(after.key().into(), at);
        }
        self.rows[at].after = change.after;
    }

    /// Net changes in first-change order, rows whose changes cancel out left out.
    pub fn net_rows(&self) -> impl Iterator<Item = NetRow<'_>> {
        self.rows.iter().filter_map(Change::net_row)
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
        folded
            .net_rows()
            .map(|row| {
                let mut out = PayloadBuf::new();
                row.render(&mut out, 1000).unwrap();
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
    fn moving_onto_a_deleted_key_keeps_the_delete() {
        assert_eq!(
            fold(vec![del(2, "x"), upd((1, "a"), (2, "a"))]),
            [r#"delete {"id":2,"role":"x"}"#, r#"update {"id":2,"role":"a","old":{"id":1}}"#]
        );
    }
}
