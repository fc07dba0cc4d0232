//! What a watch reports: the row operations and TRUNCATE, as its `events` argument names them.

/// The net kind of a row change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
}

impl Op {
    pub const ALL: [Op; 3] = [Op::Insert, Op::Update, Op::Delete];

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A non-empty set of events: row operations, and TRUNCATE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Events {
    rows: [bool; 3],
    truncate: bool,
}

/// A word of the `events` argument that names no event.
#[derive(Debug, PartialEq, Eq)]
pub enum EventsError {
    Unknown(String),
    Empty,
}

pub const ACCEPTED: &str =
    "insert, update, delete, truncate (or inserted, updated, deleted, truncated), and * or all for the three row events";

/// One kind of trigger a watch installs: a row trigger per operation, a statement trigger for TRUNCATE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Row(Op),
    Truncate,
}

impl Event {
    pub const ALL: [Event; 4] =
        [Event::Row(Op::Insert), Event::Row(Op::Update), Event::Row(Op::Delete), Event::Truncate];

    pub fn as_str(self) -> &'static str {
        match self {
            Event::Row(op) => op.as_str(),
            Event::Truncate => "truncate",
        }
    }
}

impl Events {
    /// Parses `'update'`, `'insert, update'`, `'{insert,update}'`, `'*'`, `'all'`, `'truncate'` and
    /// the past tenses, case-insensitively. `*` and `all` mean the three row events: TRUNCATE is
    /// reported only when asked for, so subscribers never meet an op they were not told about.
    pub fn parse(text: &str) -> Result<Events, EventsError> {
        let text = text.trim();
        let list = text.strip_prefix('{').and_then(|t| t.strip_suffix('}')).unwrap_or(text);
        let mut events = Events { rows: [false; 3], truncate: false };
        for word in list.split(|c: char| c == ',' || c.is_whitespace()).filter(|w| !w.is_empty()) {
            let word = word.trim_matches('"');
            match word.to_ascii_lowercase().as_str() {
                "*" | "all" => events.rows = [true; 3],
                "insert" | "inserted" => events.rows[Op::Insert.index()] = true,
                "update" | "updated" => events.rows[Op::Update.index()] = true,
                "delete" | "deleted" => events.rows[Op::Delete.index()] = true,
                "truncate" | "truncated" => events.truncate = true,
                _ => return Err(EventsError::Unknown(word.to_string())),
            }
        }
        if events.rows == [false; 3] && !events.truncate {
            return Err(EventsError::Empty);
        }
        Ok(events)
    }

    /// The events in their normal order: insert, update, delete, truncate.
    pub fn iter(self) -> impl Iterator<Item = Event> {
        let rows = Op::ALL.into_iter().filter(move |op| self.rows[op.index()]).map(Event::Row);
        rows.chain(self.truncate.then_some(Event::Truncate))
    }

    pub fn has(self, event: Event) -> bool {
        match event {
            Event::Row(op) => self.rows[op.index()],
            Event::Truncate => self.truncate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<&'static str> {
        Events::parse(text).unwrap().iter().map(Event::as_str).collect()
    }

    #[test]
    fn single_words_and_past_tenses() {
        assert_eq!(words("update"), ["update"]);
        assert_eq!(words("Deleted"), ["delete"]);
        assert_eq!(words(" inserted "), ["insert"]);
        assert_eq!(words("TRUNCATED"), ["truncate"]);
    }

    #[test]
    fn lists_arrays_and_wildcards() {
        assert_eq!(words("update, insert"), ["insert", "update"]);
        assert_eq!(words("{insert,update}"), ["insert", "update"]);
        assert_eq!(words("{\"delete\"}"), ["delete"]);
        assert_eq!(words("*"), ["insert", "update", "delete"]);
        assert_eq!(words("ALL"), ["insert", "update", "delete"]);
        assert_eq!(words("truncate, *"), ["insert", "update", "delete", "truncate"]);
        assert_eq!(words("insert insert"), ["insert"]);
    }

    #[test]
    fn unknown_and_empty_are_errors() {
        assert_eq!(Events::parse("insert, upsert"), Err(EventsError::Unknown("upsert".into())));
        assert_eq!(Events::parse(" , "), Err(EventsError::Empty));
        assert_eq!(Events::parse("{}"), Err(EventsError::Empty));
    }

    #[test]
    fn membership() {
        let events = Events::parse("delete, truncate").unwrap();
        assert!(events.has(Event::Row(Op::Delete)) && events.has(Event::Truncate));
        assert!(!events.has(Event::Row(Op::Update)));
    }
}
