//! The `events` argument of `watch_table`: which row operations a watch reports.

use crate::payload::Op;

/// A non-empty set of operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Events([bool; 3]);

/// A word of the `events` argument that names no operation.
#[derive(Debug, PartialEq, Eq)]
pub enum EventsError {
    Unknown(String),
    Empty,
}

pub const ACCEPTED: &str = "insert, update, delete (or inserted, updated, deleted), * or all";

impl Events {
    /// Parses `'update'`, `'insert, update'`, `'{insert,update}'`, `'*'`, `'all'` and the past
    /// tenses `inserted`/`updated`/`deleted`, case-insensitively.
    pub fn parse(text: &str) -> Result<Events, EventsError> {
        let text = text.trim();
        let list = text.strip_prefix('{').and_then(|t| t.strip_suffix('}')).unwrap_or(text);
        let mut set = [false; 3];
        for word in list.split(|c: char| c == ',' || c.is_whitespace()).filter(|w| !w.is_empty()) {
            let word = word.trim_matches('"');
            match word.to_ascii_lowercase().as_str() {
                "*" | "all" => set = [true; 3],
                "insert" | "inserted" => set[Op::Insert.index()] = true,
                "update" | "updated" => set[Op::Update.index()] = true,
                "delete" | "deleted" => set[Op::Delete.index()] = true,
                _ => return Err(EventsError::Unknown(word.to_string())),
            }
        }
        if set == [false; 3] {
            return Err(EventsError::Empty);
        }
        Ok(Events(set))
    }

    pub fn ops(self) -> impl Iterator<Item = Op> {
        Op::ALL.into_iter().filter(move |op| self.0[op.index()])
    }

    /// The event clause of `CREATE TRIGGER`, e.g. `INSERT OR UPDATE`.
    pub fn trigger_clause(self) -> String {
        self.ops().map(|op| op.as_str().to_ascii_uppercase()).collect::<Vec<_>>().join(" OR ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<&'static str> {
        Events::parse(text).unwrap().ops().map(Op::as_str).collect()
    }

    #[test]
    fn single_words_and_past_tenses() {
        assert_eq!(words("update"), ["update"]);
        assert_eq!(words("Deleted"), ["delete"]);
        assert_eq!(words(" inserted "), ["insert"]);
    }

    #[test]
    fn lists_arrays_and_wildcards() {
        assert_eq!(words("update, insert"), ["insert", "update"]);
        assert_eq!(words("{insert,update}"), ["insert", "update"]);
        assert_eq!(words("{\"delete\"}"), ["delete"]);
        assert_eq!(words("*"), ["insert", "update", "delete"]);
        assert_eq!(words("ALL"), ["insert", "update", "delete"]);
        assert_eq!(words("insert insert"), ["insert"]);
    }

    #[test]
    fn unknown_and_empty_are_errors() {
        assert_eq!(Events::parse("insert, upsert"), Err(EventsError::Unknown("upsert".into())));
        assert_eq!(Events::parse("truncate"), Err(EventsError::Unknown("truncate".into())));
        assert_eq!(Events::parse(" , "), Err(EventsError::Empty));
        assert_eq!(Events::parse("{}"), Err(EventsError::Empty));
    }

    #[test]
    fn trigger_clause() {
        assert_eq!(Events::parse("delete,insert").unwrap().trigger_clause(), "INSERT OR DELETE");
    }
}
