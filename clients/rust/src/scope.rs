//! Subscriptions to the rows with one value in one column (a key, or an association column such
//! as `role_id`), with the rows that leave the scope marked as such.

use serde_json::Value;

use crate::event::Change;
use crate::payload::{Op, Row};

/// The rows whose `column` equals `value`.
///
/// A row is in the scope when its value matches; an update row whose previous value matched
/// and whose new one does not is kept and marked [`Row::has_left`](crate::Row::has_left). An
/// update that changes a row's key arrives as a delete and an insert, so a scope by key sees the
/// delete. Rows that stop meeting a watch's `condition` send nothing at all: no scope can see
/// them leave. A column the watch does not send matches no row.
#[derive(Clone, Debug, PartialEq)]
pub struct Scope {
    column: String,
    value: Value,
}

impl Scope {
    /// The rows whose `column` is `value` (compared as JSON values: `7` is not `"7"`).
    pub fn new(column: impl Into<String>, value: impl Into<Value>) -> Scope {
        Scope { column: column.into(), value: value.into() }
    }

    /// Whether a row (of a snapshot, say) is in the scope.
    pub fn matches(&self, row: &Row) -> bool {
        row.get(&self.column) == Some(&self.value)
    }

    /// The change's rows in the scope (and those that left it), or none if no row concerns it.
    pub fn filter(&self, change: &Change) -> Option<Change> {
        let mut rows = Vec::new();
        for row in &change.rows {
            if self.matches(row) {
                rows.push(row.clone());
            } else if change.op == Op::Update && row.previous(&self.column) == Some(&self.value) {
                let mut left = row.clone();
                left.mark_left();
                rows.push(left);
            }
        }
        (!rows.is_empty()).then(|| Change { channel: change.channel.clone(), seq: change.seq, op: change.op, rows })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::{parse, Payload};

    fn change(text: &str) -> Change {
        let Payload::Rows { op, seq, rows, .. } = parse(text).unwrap() else { panic!("rows") };
        Change { channel: "c".into(), seq, op, rows }
    }

    #[test]
    fn a_scope_gets_its_rows_and_those_that_left_it() {
        let scope = Scope::new("role_id", 3);
        let update = change(
            r#"{"tbl":"t","op":"update","seq":1,"rows":[{"id":1,"role_id":7,"old":{"role_id":3}},{"id":2,"role_id":3},{"id":3,"role_id":5,"old":{"role_id":4}}]}"#,
        );
        let got = scope.filter(&update).unwrap();
        assert_eq!(got.rows.len(), 2);
        assert!(got.rows[0].has_left() && got.rows[0].get("id") == Some(&1.into()));
        assert!(!got.rows[1].has_left());
        assert_eq!(scope.filter(&change(r#"{"tbl":"t","op":"insert","rows":[{"id":9,"role_id":4}]}"#)), None);
    }

    #[test]
    fn compact_updates_leave_a_scope_by_their_old_values() {
        let scope = Scope::new("role_id", 3);
        let update = change(r#"{"tbl":"t","op":"update","cols":["id","role_id"],"rows":[[1,7,{"old":[1,3]}]]}"#);
        assert!(scope.filter(&update).unwrap().rows[0].has_left());
    }

    #[test]
    fn a_scope_by_key_sees_a_key_change_as_a_delete() {
        let scope = Scope::new("id", 1);
        let delete = change(r#"{"tbl":"t","op":"delete","rows":[{"id":1,"role_id":3}]}"#);
        assert_eq!(scope.filter(&delete).unwrap().op, Op::Delete);
        assert_eq!(scope.filter(&change(r#"{"tbl":"t","op":"insert","rows":[{"id":2,"role_id":3}]}"#)), None);
    }
}
