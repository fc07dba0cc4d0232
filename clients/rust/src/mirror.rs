//! Mirrors: a map of key → row kept equal to a watched table by applying its events, refetched
//! through a snapshot function on every reset.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde_json::{Map, Value};

use tokio_postgres::types::Type;
use tokio_postgres::SimpleQueryMessage;

use crate::connection::quote;
use crate::event::Event;
use crate::payload::{Key, Op, Row};
use crate::subscriber::{lost, Subscriber};
use crate::Error;

/// Rows by key, changed by events by the rules of docs/payload.md. Pure: it neither reads nor
/// waits; [`Mirror`] feeds it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Table {
    key_columns: usize,
    rows: HashMap<Key, Row>,
}

impl Table {
    /// An empty table whose rows' first `key_columns` columns are the key.
    pub fn new(key_columns: usize) -> Table {
        Table { key_columns, rows: HashMap::new() }
    }

    /// Applies a change or truncate. A reset changes nothing: the caller refetches ([`load`]).
    ///
    /// [`load`]: Table::load
    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::Change(change) => {
                for row in &change.rows {
                    let key = row.key(self.key_columns);
                    match change.op {
                        // A row that left a scope is gone from a mirror of the scope.
                        Op::Update if row.has_left() => {
                            self.rows.remove(&key);
                        }
                        Op::Insert | Op::Update => {
                            self.rows.insert(key, row.clone());
                        }
                        Op::Delete => {
                            self.rows.remove(&key);
                        }
                    }
                }
            }
            Event::Truncate { .. } => self.rows.clear(),
            Event::Reset(_) => {}
        }
    }

    /// Replaces every row with a snapshot's, whose first `key_columns` columns are the key.
    pub fn load(&mut self, key_columns: usize, rows: impl IntoIterator<Item = Row>) {
        self.key_columns = key_columns;
        self.rows.clear();
        for row in rows {
            self.rows.insert(row.key(self.key_columns), row);
        }
    }

    /// The rows, by key.
    pub fn rows(&self) -> &HashMap<Key, Row> {
        &self.rows
    }

    /// The number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether it holds no row.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// A function that returns a snapshot of the mirrored table's rows (each a JSON object of the
/// columns the watch sends, values as payloads write them).
pub type SnapshotFn = Box<dyn FnMut() -> BoxFuture<'static, Result<Vec<Map<String, Value>>, Error>> + Send>;

/// A table kept in sync with one channel of a [`Subscriber`].
///
/// Every reset (the first event is one) retakes the snapshot: by default the table's columns
/// that the watch sends, read on the subscriber's own connection with the values written as
/// payloads write them; or a function of yours ([`Mirror::with_snapshot`]).
///
/// ```no_run
/// # async fn example() -> Result<(), pgwatch_client::Error> {
/// use pgwatch_client::{Mirror, Subscriber};
///
/// let subscriber = Subscriber::builder("host=localhost user=app dbname=app")?.channel("public.users").connect().await?;
/// let mut mirror = Mirror::new(subscriber, "public.users");
/// loop {
///     let event = mirror.next().await?;
///     println!("{} rows after {:?}", mirror.table().len(), event);
/// }
/// # }
/// ```
pub struct Mirror {
    subscriber: Subscriber,
    channel: Arc<str>,
    snapshot: Option<SnapshotFn>,
    table: Table,
    snapshots: u64,
    /// A reset was handed out and its snapshot is not loaded yet.
    snapshot_due: bool,
}

impl Mirror {
    /// Mirrors `channel` of `subscriber` (which may listen on others: their events are handed
    /// out unapplied). On a [`Scope`](crate::Scope)d channel it mirrors the rows of the scope.
    pub fn new(subscriber: Subscriber, channel: &str) -> Mirror {
        let key_columns = subscriber.columns(channel).map_or(1, |(keys, _)| keys.len());
        Mirror {
            subscriber,
            channel: Arc::from(channel),
            snapshot: None,
            table: Table::new(key_columns),
            snapshots: 0,
            snapshot_due: false,
        }
    }

    /// Takes snapshots with `snapshot` instead of reading the table on the subscriber's
    /// connection. Start it after it is called (any connection will do).
    pub fn with_snapshot(mut self, snapshot: SnapshotFn) -> Mirror {
        self.snapshot = Some(snapshot);
        self
    }

    /// The rows.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// The subscriber (for its stats).
    pub fn subscriber(&self) -> &Subscriber {
        &self.subscriber
    }

    /// How many snapshots were taken.
    pub fn snapshots(&self) -> u64 {
        self.snapshots
    }

    /// Waits for the next event and applies it (a reset: a new snapshot); returns it.
    ///
    /// Cancel-safe like [`Subscriber::next`]: a snapshot that did not finish is asked for again.
    pub async fn next(&mut self) -> Result<Event, Error> {
        loop {
            if self.snapshot_due {
                // A snapshot was cut short (an error, or this future dropped): a new reset, with
                // a new position, starts it again.
                self.subscriber.request_reset(&self.channel);
                self.snapshot_due = false;
            }
            let event = self.subscriber.next().await?;
            if **event.channel() != *self.channel {
                return Ok(event);
            }
            if let Event::Reset(_) = &event {
                self.snapshot_due = true;
                match self.take_snapshot().await {
                    Ok(rows) => {
                        // The watch's columns as the subscriber read them at its reset.
                        let (keys, extra) = self.subscriber.columns(&self.channel).expect("a known channel");
                        let names: Arc<[Box<str>]> = keys.iter().chain(extra).map(|c| Box::from(c.as_str())).collect();
                        let scope = self.subscriber.scope(&self.channel).cloned();
                        let rows = rows.into_iter().map(|object| Row::from_object(&names, object));
                        self.table.load(keys.len(), rows.filter(|row| scope.as_ref().is_none_or(|s| s.matches(row))));
                        self.snapshots += 1;
                        self.snapshot_due = false;
                    }
                    // Lost connections are mended by the subscriber (which reconnects first);
                    // other errors are the caller's, and the next call starts again.
                    Err(Error::Postgres(e)) if lost(&e) => continue,
                    Err(e) => return Err(e),
                }
            }
            self.table.apply(&event);
            return Ok(event);
        }
    }

    async fn take_snapshot(&mut self) -> Result<Vec<Map<String, Value>>, Error> {
        if let Some(snapshot) = &mut self.snapshot {
            return snapshot().await;
        }
        let client = self.subscriber.client().ok_or_else(|| Error::Config("not connected".into()))?.clone();
        let _busy = self.subscriber.busy();
        let table = self.subscriber.table(&self.channel).ok_or_else(|| Error::Config("unknown channel".into()))?;
        let (keys, extra) = self.subscriber.columns(&self.channel).expect("a known channel");
        let columns: Vec<&String> = keys.iter().chain(extra).collect();
        let list = columns.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
        let sql = format!("SELECT {list} FROM {table}");
        // The columns' types as the server describes them (a domain's base type), and the
        // values in text format: each type's output function, as payloads write them.
        let types: Vec<Type> =
            client.prepare(&sql).await.map_err(Error::Postgres)?.columns().iter().map(|c| c.type_().clone()).collect();
        let mut rows = Vec::new();
        for message in client.simple_query(&sql).await.map_err(Error::Postgres)? {
            if let SimpleQueryMessage::Row(row) = message {
                let object = (0..columns.len())
                    .map(|at| (columns[at].clone(), as_payload_value(row.get(at), &types[at])))
                    .collect();
                rows.push(object);
            }
        }
        Ok(rows)
    }
}

/// A value's text output as payloads write it: integers, oids, numerics and floats as JSON
/// numbers (NaN and infinities as strings), booleans as booleans, anything else as the text.
fn as_payload_value(text: Option<&str>, ty: &Type) -> Value {
    let Some(text) = text else { return Value::Null };
    let numeric =
        [Type::INT2, Type::INT4, Type::INT8, Type::OID, Type::FLOAT4, Type::FLOAT8, Type::NUMERIC].contains(ty);
    match (numeric, ty == &Type::BOOL) {
        (true, _) => serde_json::from_str::<serde_json::Number>(text)
            .map_or_else(|_| Value::String(text.to_owned()), Value::Number),
        (_, true) => Value::Bool(text == "t"),
        _ => Value::String(text.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::{parse, Payload};

    fn event(text: &str) -> Event {
        match parse(text).unwrap() {
            Payload::Rows { op, seq, rows, .. } => Event::Change(crate::Change { channel: "c".into(), seq, op, rows }),
            Payload::Truncate { seq, .. } => Event::Truncate { channel: "c".into(), seq },
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_table_applies_inserts_updates_key_changes_deletes_and_truncates() {
        let mut t = Table::new(1);
        t.apply(&event(r#"{"tbl":"t","op":"insert","rows":[{"id":1,"v":"a"},{"id":2,"v":"b"}]}"#));
        t.apply(&event(r#"{"tbl":"t","op":"update","rows":[{"id":1,"v":"c","old":{"v":"a"}}]}"#));
        // A key change: the delete of the old key and the insert of the new one.
        t.apply(&event(r#"{"tbl":"t","op":"delete","rows":[{"id":2,"v":"b"}]}"#));
        t.apply(&event(r#"{"tbl":"t","op":"insert","rows":[{"id":3,"v":"b"}]}"#));
        let mut rows: Vec<_> = t.rows().values().map(|r| r.to_object()).collect();
        rows.sort_by_key(|r| r["id"].as_i64());
        assert_eq!(serde_json::to_string(&rows).unwrap(), r#"[{"id":1,"v":"c"},{"id":3,"v":"b"}]"#);
        t.apply(&event(r#"{"tbl":"t","op":"truncate"}"#));
        assert!(t.is_empty());
    }

    #[test]
    fn snapshot_values_are_written_as_payloads_write_them() {
        assert_eq!(as_payload_value(Some("42"), &Type::INT8), serde_json::json!(42));
        assert_eq!(as_payload_value(Some("1.5"), &Type::NUMERIC), serde_json::json!(1.5));
        assert_eq!(as_payload_value(Some("NaN"), &Type::FLOAT8), serde_json::json!("NaN"));
        assert_eq!(as_payload_value(Some("t"), &Type::BOOL), serde_json::json!(true));
        assert_eq!(
            as_payload_value(Some("2026-12-03 10:00:00+00"), &Type::TIMESTAMPTZ),
            serde_json::json!("2026-12-03 10:00:00+00")
        );
        assert_eq!(as_payload_value(None, &Type::TEXT), Value::Null);
    }

    #[test]
    fn a_snapshot_replaces_every_row_and_keys_by_the_key_columns() {
        let mut t = Table::new(2);
        t.apply(&event(r#"{"tbl":"t","op":"insert","cols":["a","b","v"],"rows":[[1,1,"x"]]}"#));
        let names: Arc<[Box<str>]> = ["a", "b", "v"].map(Box::from).into();
        let row = |v: Value| Row::from_object(&names, v.as_object().unwrap().clone());
        t.load(2, [row(serde_json::json!({"a": 1, "b": 2, "v": "y"}))]);
        assert_eq!(t.len(), 1);
        t.apply(&event(r#"{"tbl":"t","op":"delete","cols":["a","b","v"],"rows":[[1,2,"y"]]}"#));
        assert!(t.is_empty());
    }
}
