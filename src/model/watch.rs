//! A watch's definition, the channel and table name its notifications carry, and the target a
//! trigger records changes for.

use std::ffi::CString;

use pgrx::pg_sys;
use pgrx::spi::quote_identifier;
use pgrx::PgRelation;

use super::events::{Event, Events, Op};
use crate::text;

/// Longest channel name PostgreSQL accepts (NAMEDATALEN - 1).
pub const MAX_CHANNEL: usize = 63;

/// Which values a watch may send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadMode {
    /// Key and extra columns.
    Full,
    /// Key columns only, for tables whose other values must not reach listeners.
    Keys,
    /// Key and extra columns, each row an array of values under the payload's `"cols"`.
    Compact,
}

impl PayloadMode {
    pub const ALL: [PayloadMode; 3] = [PayloadMode::Full, PayloadMode::Keys, PayloadMode::Compact];

    pub fn as_str(self) -> &'static str {
        match self {
            PayloadMode::Full => "full",
            PayloadMode::Keys => "keys",
            PayloadMode::Compact => "compact",
        }
    }
}

/// The catalog's columns: a database still on an older release's SQL (before `ALTER EXTENSION
/// pgwatch UPDATE`) has only that release's: 0.1.0's first seven, 0.3.0's all but `retain` and
/// `feed_start`.
pub enum Shape {
    V0_1,
    V0_3,
    Current,
}

/// Shortest and longest retention of a watch's payloads (`watch_table(..., retain)`), in
/// microseconds: a second, and 365 days.
pub const RETAIN_RANGE: (i64, i64) = (1_000_000, 365 * 86_400 * 1_000_000);

/// A watch's definition.
pub struct Watch {
    pub tbl: pg_sys::Oid,
    pub label: Option<String>,
    pub channel: String,
    pub events: Events,
    pub keys: Vec<String>,
    pub extras: Vec<String>,
    pub trigger_columns: Vec<String>,
    pub condition: Option<String>,
    pub payload: PayloadMode,
    pub fire_on_replica: bool,
    /// How long its payloads are kept for replay, in microseconds; `None`: not kept.
    pub retain: Option<i64>,
}

impl Watch {
    /// The columns whose change fires the update trigger (none: any change): the trigger columns
    /// and, when there are any, the key columns too, since a key change is the delete of a row
    /// and the insert of another, which a subscriber's copy must always see.
    pub fn update_columns(&self) -> Vec<String> {
        if self.trigger_columns.is_empty() {
            return Vec::new();
        }
        let keys = self.keys.iter().filter(|key| !self.trigger_columns.contains(key));
        self.trigger_columns.iter().chain(keys).cloned().collect()
    }

    /// A column this watch sends whose name is also the name of a member of its payload rows
    /// (`old`, `partial`): in an object row the two could not be told apart. Compact rows are
    /// arrays, with those members in a trailing object, so they can send any column.
    pub fn reserved_column(&self) -> Option<&str> {
        if self.payload == PayloadMode::Compact {
            return None;
        }
        self.keys.iter().chain(&self.extras).map(String::as_str).find(|c| RESERVED_COLUMNS.contains(c))
    }

    /// The triggers this watch has: one per event it reports, and a TRUNCATE trigger in any case
    /// (one that does not report truncate tells its subscribers to refetch, see [`OnTruncate`]).
    pub fn trigger_events(&self) -> impl Iterator<Item = Event> {
        let refetch = (!self.events.has(Event::Truncate)).then_some(Event::Truncate);
        self.events.iter().chain(refetch)
    }

    /// The row events this watch, on a partitioned table or a partition, also has a trigger for
    /// that reports only rows an UPDATE moved to another partition: PostgreSQL runs such an
    /// update as the delete of the row from one partition and its insert into another, and fires
    /// no update trigger for it. The partition key is part of the primary key, so a move is a key
    /// change, which a watch that reports updates always sends (as the delete of the old key and
    /// the insert of the new one): a watch without the delete (or insert) event gets a delete
    /// (insert) trigger for the moved rows alone.
    pub fn move_events(&self) -> impl Iterator<Item = Op> + '_ {
        let updates = self.events.has(Event::Row(Op::Update));
        [Op::Delete, Op::Insert].into_iter().filter(move |&op| updates && !self.events.has(Event::Row(op)))
    }

    /// What a TRUNCATE of the table sends its subscribers.
    pub fn on_truncate(&self) -> OnTruncate {
        if self.events.has(Event::Truncate) {
            OnTruncate::Notice
        } else {
            OnTruncate::Refetch
        }
    }

    /// Whether `event`'s trigger fires per row, rather than once per statement over the
    /// statement's transition tables (cheaper per row): where the table needs it
    /// (`table_needs_rows`, see `define::triggers::needs_row_triggers`), and for what a statement trigger cannot
    /// express (a WHEN condition; UPDATE OF with transition tables; changes applied by logical
    /// replication, whose apply worker fires row triggers only).
    pub fn fires_per_row(&self, event: Event, table_needs_rows: bool) -> bool {
        match event {
            Event::Truncate => false,
            Event::Row(op) => {
                table_needs_rows
                    || self.condition.is_some()
                    || self.fire_on_replica
                    || (op == Op::Update && !self.trigger_columns.is_empty())
            }
        }
    }
}

/// The members of an object row besides its columns.
pub const RESERVED_COLUMNS: [&str; 2] = ["old", "partial"];

/// A table's name as subscribers see it (`schema.table`, see [`display_name`]) and as SQL needs
/// it (quoted).
pub struct TableName {
    pub display: String,
    pub quoted: String,
    /// `schema.table` with no part quoted: the channel a watch made before 0.4.0 has, and keeps
    /// until its table is renamed (see `follow`).
    pub unquoted: String,
}

impl TableName {
    /// `rel`'s names, which must be readable (see `crate::text`: 0A000 otherwise).
    pub fn of(rel: &PgRelation) -> TableName {
        let (schema, name) = (text::schema_name(rel), text::relation_name(rel));
        TableName {
            display: display_name(&schema, name),
            quoted: format!("{}.{}", quote_identifier(&schema), quote_identifier(name)),
            unquoted: format!("{schema}.{name}"),
        }
    }
}

/// `schema.table`, each part as it is unless it holds a dot or a double quote, which is written
/// quoted (`app."v2.orders"`): one name is never another's (`"app.v2".orders`), so no table can
/// take another's default channel, nor send its `tbl`.
pub fn display_name(schema: &str, table: &str) -> String {
    let part = |name: &str| {
        if name.contains(['.', '"']) {
            format!("\"{}\"", name.replace('"', "\"\""))
        } else {
            name.to_string()
        }
    };
    format!("{}.{}", part(schema), part(table))
}

/// [`display_name`] in SQL, of the table `c` (`pg_class`) in the schema `n` (`pg_namespace`), for
/// queries that name tables as payloads do.
#[macro_export]
macro_rules! display_name_sql {
    () => {
        "pg_catalog.concat_ws('.',
            CASE WHEN pg_catalog.strpos(n.nspname, '.') OPERATOR(pg_catalog.>) 0
                   OR pg_catalog.strpos(n.nspname, '\"') OPERATOR(pg_catalog.>) 0
                 THEN pg_catalog.concat('\"', pg_catalog.replace(n.nspname, '\"', '\"\"'), '\"')
                 ELSE n.nspname::pg_catalog.text END,
            CASE WHEN pg_catalog.strpos(c.relname, '.') OPERATOR(pg_catalog.>) 0
                   OR pg_catalog.strpos(c.relname, '\"') OPERATOR(pg_catalog.>) 0
                 THEN pg_catalog.concat('\"', pg_catalog.replace(c.relname, '\"', '\"\"'), '\"')
                 ELSE c.relname::pg_catalog.text END)"
    };
}

/// The channel: the label if given, else `schema.table`; `None` when it is too long.
pub fn channel_name(display: &str, label: Option<&str>) -> Option<String> {
    let channel = label.unwrap_or(display);
    (channel.len() <= MAX_CHANNEL).then(|| channel.to_string())
}

/// How a watch's rows are written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rows {
    /// Objects of named values.
    Objects,
    /// Arrays of values, their names written once per payload: this `"cols":[...],` header.
    Compact(Box<[u8]>),
}

/// What a TRUNCATE of a watched table sends: a watch that reports truncate sends a truncate notice
/// (`"op":"truncate"`); any other still tells its subscribers to refetch (a resync, on a retained
/// channel a reset marker), since their copies hold rows the table no longer has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnTruncate {
    Notice,
    Refetch,
}

/// Where a watch's notifications go and how they are written: its channel, the table name
/// subscribers see, and the shape of its rows.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    pub channel: CString,
    pub tbl: String,
    pub rows: Rows,
    /// Its payloads are kept for replay (see `feed`): always delivered by the worker, which
    /// writes them to the log in the transaction that sends them.
    pub retained: bool,
}

impl Target {
    /// The `"cols"` header of a compact watch's payloads; empty for object rows.
    pub fn cols(&self) -> &[u8] {
        match &self.rows {
            Rows::Objects => b"",
            Rows::Compact(cols) => cols,
        }
    }

    pub fn compact(&self) -> bool {
        matches!(self.rows, Rows::Compact(_))
    }
}

#[cfg(test)]
mod tests {
    use super::{display_name, Events, Op, PayloadMode, Watch};

    #[test]
    fn display_names_quote_only_parts_with_dots_or_quotes_so_two_tables_never_share_one() {
        assert_eq!(display_name("public", "Users"), "public.Users");
        assert_eq!(display_name("app", "v2.orders"), "app.\"v2.orders\"");
        assert_eq!(display_name("app.v2", "orders"), "\"app.v2\".orders");
        assert_eq!(display_name("a", "say \"hi\""), "a.\"say \"\"hi\"\"\"");
        assert_ne!(display_name("a.b", "c"), display_name("a", "b.c"));
        assert_ne!(display_name("a", "\"b\".c"), display_name("a.\"b\"", "c"));
    }

    fn watching(events: &str) -> Watch {
        Watch {
            tbl: pgrx::pg_sys::Oid::INVALID,
            label: None,
            channel: "public.t".into(),
            events: Events::parse(events).unwrap(),
            keys: vec!["id".into()],
            extras: Vec::new(),
            trigger_columns: Vec::new(),
            condition: None,
            payload: PayloadMode::Full,
            fire_on_replica: false,
            retain: None,
        }
    }

    #[test]
    fn a_watch_that_reports_updates_sees_rows_moved_between_partitions_through_the_halves_it_lacks() {
        let moves = |events: &str| watching(events).move_events().collect::<Vec<Op>>();
        assert_eq!(moves("update"), [Op::Delete, Op::Insert]);
        assert_eq!(moves("insert, update"), [Op::Delete]);
        assert_eq!(moves("update, delete"), [Op::Insert]);
        assert_eq!(moves("*"), []);
        assert_eq!(moves("insert, delete"), []);
        assert_eq!(moves("truncate"), []);
    }
}
