//! The payload grammar of docs/protocol.md: a notification's text parsed into a [`Payload`], its
//! rows into [`Row`]s that share their column names, and keys into hashable [`Key`]s.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use serde::de::{self, DeserializeOwned, Deserializer, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

/// The op of a payload that carries rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// New rows.
    Insert,
    /// Changed rows: their new values, and `old` values of the columns that changed.
    Update,
    /// Removed rows, as they were before.
    Delete,
}

impl Op {
    /// The op as payloads spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }
}

/// One notification's content.
#[derive(Clone, Debug, PartialEq)]
pub enum Payload {
    /// Rows of one op.
    Rows {
        /// The table, `schema.table`.
        tbl: String,
        /// What happened to the rows.
        op: Op,
        /// The channel's sequence number (worker delivery), or none (inline delivery).
        seq: Option<i64>,
        /// The rows, key columns first.
        rows: Vec<Row>,
    },
    /// More changes of `op` than a payload can carry: refetch.
    Overflow {
        /// The table.
        tbl: String,
        /// The op whose rows were not sent.
        op: Op,
        /// The sequence number, if any.
        seq: Option<i64>,
    },
    /// Every row was removed.
    Truncate {
        /// The table.
        tbl: String,
        /// The sequence number, if any.
        seq: Option<i64>,
    },
    /// Changes may have overtaken one another (an inline transaction): refetch.
    Resync {
        /// The table.
        tbl: String,
        /// The sequence number, if any.
        seq: Option<i64>,
    },
    /// A gap in a retained feed (`restart`, `fallback`): refetch.
    Reset {
        /// The table.
        tbl: String,
        /// The sequence number, if any.
        seq: Option<i64>,
        /// Why, as the server says.
        reason: String,
    },
}

impl Payload {
    /// The payload's sequence number, if it has one.
    pub fn seq(&self) -> Option<i64> {
        match self {
            Payload::Rows { seq, .. }
            | Payload::Overflow { seq, .. }
            | Payload::Truncate { seq, .. }
            | Payload::Resync { seq, .. }
            | Payload::Reset { seq, .. } => *seq,
        }
    }

    /// Whether applying it means refetching everything (a marker, an overflow or a partial row).
    pub fn demands_refetch(&self) -> bool {
        match self {
            Payload::Rows { rows, .. } => rows.iter().any(Row::is_partial),
            Payload::Truncate { .. } => false,
            Payload::Overflow { .. } | Payload::Resync { .. } | Payload::Reset { .. } => true,
        }
    }
}

/// Why a text is not a payload.
#[derive(Debug)]
pub struct ParseError(String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not a pgwatch payload: {}", self.0)
    }
}

impl std::error::Error for ParseError {}

/// Parses a notification's text. Members it does not know are skipped (later protocol versions
/// may add some); anything else that breaks the grammar is an error.
pub fn parse(text: &str) -> Result<Payload, ParseError> {
    let wire: Wire = serde_json::from_str(text).map_err(|e| ParseError(e.to_string()))?;
    let tbl = wire.tbl.into_owned();
    let seq = wire.seq;
    let op = match &*wire.op {
        "insert" => Op::Insert,
        "update" => Op::Update,
        "delete" => Op::Delete,
        "truncate" => return Ok(Payload::Truncate { tbl, seq }),
        "resync" => return Ok(Payload::Resync { tbl, seq }),
        "reset" => {
            let reason = wire.reason.map(Cow::into_owned).unwrap_or_default();
            return Ok(Payload::Reset { tbl, seq, reason });
        }
        other => return Err(ParseError(format!("unknown op {other:?}"))),
    };
    if wire.overflow {
        return Ok(Payload::Overflow { tbl, op, seq });
    }
    let wire_rows = wire.rows.ok_or_else(|| ParseError("rows are missing".into()))?;
    let rows = match wire.cols {
        Some(cols) => compact_rows(cols, wire_rows)?,
        None => object_rows(wire_rows)?,
    };
    Ok(Payload::Rows { tbl, op, seq, rows })
}

/// A payload as it is written, borrowing from the text where it can.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    tbl: Cow<'a, str>,
    #[serde(borrow)]
    op: Cow<'a, str>,
    seq: Option<i64>,
    #[serde(default)]
    overflow: bool,
    #[serde(borrow, default)]
    reason: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    cols: Option<Vec<Cow<'a, str>>>,
    #[serde(borrow, default)]
    rows: Option<Vec<WireRow<'a>>>,
}

/// A row as written: an object (`full`, `keys`) or an array (`compact`).
enum WireRow<'a> {
    Object { columns: Vec<Cow<'a, str>>, values: Vec<Value>, old: Option<Map<String, Value>>, partial: bool },
    Array(Vec<Value>),
}

impl<'de: 'a, 'a> Deserialize<'de> for WireRow<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RowVisitor;
        impl<'de> Visitor<'de> for RowVisitor {
            type Value = WireRow<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a row (an object or an array)")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut columns, mut values) = (Vec::new(), Vec::new());
                let (mut old, mut partial) = (None, false);
                while let Some(Name(name)) = map.next_key()? {
                    match &*name {
                        "old" => old = Some(map.next_value()?),
                        "partial" => partial = map.next_value()?,
                        _ => {
                            columns.push(name);
                            values.push(map.next_value()?);
                        }
                    }
                }
                Ok(WireRow::Object { columns, values, old, partial })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(4));
                while let Some(value) = seq.next_element()? {
                    values.push(value);
                }
                Ok(WireRow::Array(values))
            }
        }
        deserializer.deserialize_any(RowVisitor)
    }
}

/// A member name, borrowed from the text unless it holds escapes.
struct Name<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Name<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl<'de> Visitor<'de> for NameVisitor {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

fn shared(names: &[Cow<'_, str>]) -> Arc<[Box<str>]> {
    names.iter().map(|n| Box::from(&**n)).collect()
}

/// Object rows, sharing one column list among the rows that name the same columns.
fn object_rows(wire_rows: Vec<WireRow<'_>>) -> Result<Vec<Row>, ParseError> {
    let mut rows = Vec::with_capacity(wire_rows.len());
    let mut last: Option<Arc<[Box<str>]>> = None;
    for wire_row in wire_rows {
        let WireRow::Object { columns, values, old, partial } = wire_row else {
            return Err(ParseError("an array row without \"cols\"".into()));
        };
        let same =
            last.as_ref().is_some_and(|l| l.len() == columns.len() && l.iter().zip(&columns).all(|(a, b)| **a == **b));
        let names = if same { last.clone().expect("checked") } else { shared(&columns) };
        last = Some(names.clone());
        let old = old
            .map(|old| {
                old.into_iter()
                    .map(|(name, value)| {
                        let at = names.iter().position(|n| **n == *name);
                        at.map(|at| (at, value))
                            .ok_or_else(|| ParseError(format!("\"old\" names {name:?}, not a column of its row")))
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        rows.push(Row::of(RowData { names, values, old, partial, left: false }));
    }
    Ok(rows)
}

/// Array rows in `cols` order, the last element possibly `{"old":[...]}` or `{"partial":true}`.
fn compact_rows(cols: Vec<Cow<'_, str>>, wire_rows: Vec<WireRow<'_>>) -> Result<Vec<Row>, ParseError> {
    let names = shared(&cols);
    let mut rows = Vec::with_capacity(wire_rows.len());
    for wire_row in wire_rows {
        let WireRow::Array(mut values) = wire_row else {
            return Err(ParseError("an object row beside \"cols\"".into()));
        };
        let (mut old, mut partial) = (Vec::new(), false);
        if let Some(Value::Object(_)) = values.last() {
            let Some(Value::Object(mut tail)) = values.pop() else { unreachable!("checked") };
            partial = tail.get("partial") == Some(&Value::Bool(true));
            if let Some(Value::Array(previous)) = tail.remove("old") {
                old = previous.into_iter().enumerate().collect();
            }
        }
        if values.len() > names.len() || old.len() > names.len() {
            return Err(ParseError("a row with more values than \"cols\"".into()));
        }
        rows.push(Row::of(RowData { names: names.clone(), values, old, partial, left: false }));
    }
    Ok(rows)
}

/// One row of a payload (or of a snapshot): values by column name, key columns first. Cheap to
/// clone (the values are shared).
#[derive(Clone, Debug, PartialEq)]
pub struct Row(Arc<RowData>);

#[derive(Clone, Debug, PartialEq)]
struct RowData {
    names: Arc<[Box<str>]>,
    /// In `names` order; a partial row has only its key values.
    values: Vec<Value>,
    /// Previous values, by index into `names`.
    old: Vec<(usize, Value)>,
    partial: bool,
    left: bool,
}

impl Row {
    fn of(data: RowData) -> Row {
        Row(Arc::new(data))
    }

    /// A row of the columns `names` (key columns first) from a JSON object such as a snapshot's
    /// row; a column the object lacks is NULL.
    pub fn from_object(names: &Arc<[Box<str>]>, mut object: Map<String, Value>) -> Row {
        let values = names.iter().map(|n| object.remove(&**n).unwrap_or(Value::Null)).collect();
        Row::of(RowData { names: names.clone(), values, old: Vec::new(), partial: false, left: false })
    }

    /// A row of the given columns and values (in the same order).
    pub fn new(names: Arc<[Box<str>]>, values: Vec<Value>) -> Row {
        assert_eq!(names.len(), values.len(), "one value per column");
        Row::of(RowData { names, values, old: Vec::new(), partial: false, left: false })
    }

    /// The value of `column`, if the row carries it.
    pub fn get(&self, column: &str) -> Option<&Value> {
        self.0.names.iter().zip(&self.0.values).find(|(n, _)| ***n == *column).map(|(_, v)| v)
    }

    /// The previous value of `column` as the payload tells it (an update's `old`), if it does.
    pub fn old(&self, column: &str) -> Option<&Value> {
        self.0.old.iter().find(|(at, _)| *self.0.names[*at] == *column).map(|(_, v)| v)
    }

    /// The value `column` had before the change: its `old` value if the payload gives one, else
    /// its value (a column an update did not change).
    pub fn previous(&self, column: &str) -> Option<&Value> {
        self.old(column).or_else(|| self.get(column))
    }

    /// The columns the row carries, with their values, in payload order.
    pub fn columns(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.0.names.iter().map(|n| &**n).zip(&self.0.values)
    }

    /// Whether the row carries only its key (it did not fit a payload): fetch it by its key.
    pub fn is_partial(&self) -> bool {
        self.0.partial
    }

    /// Whether the row left the scope of a [`Scope`](crate::Scope)d subscription: its previous
    /// value matched, its new one does not. Drop it from what you keep for that scope.
    pub fn has_left(&self) -> bool {
        self.0.left
    }

    pub(crate) fn mark_left(&mut self) {
        Arc::make_mut(&mut self.0).left = true;
    }

    /// The first `key_columns` values as a hashable key.
    pub fn key(&self, key_columns: usize) -> Key {
        match &self.0.values[..key_columns.min(self.0.values.len())] {
            [one] => Key::One(KeyPart::from(one)),
            many => Key::Many(many.iter().map(KeyPart::from).collect()),
        }
    }

    /// The key of the row as a JSON object of the columns that make it.
    pub fn to_object(&self) -> Map<String, Value> {
        self.columns().map(|(n, v)| (n.to_owned(), v.clone())).collect()
    }

    /// The row deserialized into your type (columns by name, as a `serde` struct sees a map).
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        let pairs = self.columns().map(|(n, v)| (n, v.into_deserializer()));
        T::deserialize(de::value::MapDeserializer::<_, serde_json::Error>::new(pairs))
    }
}

/// A row's key: its key columns' values in key order, hashable.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// A key of one column (no allocation for integers).
    One(KeyPart),
    /// A key of several columns (or none).
    Many(Box<[KeyPart]>),
}

impl Key {
    /// The key of these values, in key order.
    pub fn new(mut parts: Vec<KeyPart>) -> Key {
        match parts.len() {
            1 => Key::One(parts.pop().expect("one part")),
            _ => Key::Many(parts.into()),
        }
    }

    /// Its values, in key order.
    pub fn parts(&self) -> &[KeyPart] {
        match self {
            Key::One(part) => std::slice::from_ref(part),
            Key::Many(parts) => parts,
        }
    }
}

/// One key column's value. Numbers that are not 64-bit integers, and every other type, are
/// compared by their text.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyPart {
    /// SQL NULL (a key column cannot hold it; kept for completeness).
    Null,
    /// A boolean.
    Bool(bool),
    /// An integer that fits 64 bits.
    Int(i64),
    /// Anything else, by its text.
    Text(Box<str>),
}

impl From<&Value> for KeyPart {
    fn from(value: &Value) -> KeyPart {
        match value {
            Value::Null => KeyPart::Null,
            Value::Bool(b) => KeyPart::Bool(*b),
            Value::Number(n) => n.as_i64().map(KeyPart::Int).unwrap_or_else(|| KeyPart::Text(n.to_string().into())),
            Value::String(s) => KeyPart::Text(s.as_str().into()),
            other => KeyPart::Text(other.to_string().into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rows(payload: Payload) -> Vec<Row> {
        match payload {
            Payload::Rows { rows, .. } => rows,
            other => panic!("not rows: {other:?}"),
        }
    }

    #[test]
    fn object_rows_keep_values_old_values_and_column_order() {
        let p = parse(r#"{"tbl":"public.users","op":"update","seq":42,"rows":[{"id":42,"role_id":7,"old":{"role_id":3}},{"id":43,"role_id":7}]}"#).unwrap();
        assert_eq!(p.seq(), Some(42));
        let r = rows(p);
        assert_eq!(r[0].columns().map(|(n, _)| n).collect::<Vec<_>>(), ["id", "role_id"]);
        assert_eq!(r[0].get("role_id"), Some(&json!(7)));
        assert_eq!(r[0].old("role_id"), Some(&json!(3)));
        assert_eq!(r[1].previous("role_id"), Some(&json!(7)));
        assert!(Arc::ptr_eq(&r[0].0.names, &r[1].0.names), "rows naming the same columns share them");
        assert_eq!(r[0].key(1), Key::new(vec![KeyPart::Int(42)]));
    }

    #[test]
    fn compact_rows_read_cols_old_arrays_and_partial_markers() {
        let r = rows(
            parse(r#"{"tbl":"public.users","op":"update","seq":1,"cols":["id","role_id"],"rows":[[42,7,{"old":[42,3]}],[43,{"partial":true}]]}"#)
                .unwrap(),
        );
        assert_eq!(r[0].get("role_id"), Some(&json!(7)));
        assert_eq!(r[0].previous("role_id"), Some(&json!(3)));
        assert!(!r[0].is_partial() && r[1].is_partial());
        assert_eq!(r[1].get("role_id"), None);
        assert_eq!(r[1].key(1), Key::new(vec![KeyPart::Int(43)]));
    }

    #[test]
    fn markers_overflows_and_truncates_are_told_apart() {
        assert_eq!(
            parse(r#"{"tbl":"public.t","op":"reset","seq":7,"reason":"restart"}"#).unwrap(),
            Payload::Reset { tbl: "public.t".into(), seq: Some(7), reason: "restart".into() }
        );
        assert!(matches!(parse(r#"{"tbl":"t","op":"resync","seq":3}"#).unwrap(), Payload::Resync { seq: Some(3), .. }));
        assert!(matches!(parse(r#"{"tbl":"t","op":"truncate"}"#).unwrap(), Payload::Truncate { seq: None, .. }));
        let overflow = parse(r#"{"tbl":"t","op":"insert","seq":9,"overflow":true}"#).unwrap();
        assert!(matches!(overflow, Payload::Overflow { op: Op::Insert, seq: Some(9), .. }));
        assert!(overflow.demands_refetch());
    }

    #[test]
    fn unknown_members_are_skipped_and_broken_text_is_refused() {
        let p = parse(r#"{"tbl":"t","op":"insert","seq":1,"future":{"x":[1]},"rows":[{"id":1}]}"#).unwrap();
        assert_eq!(rows(p).len(), 1);
        for bad in [
            "",
            "hello",
            r#"{"tbl":"t"}"#,
            r#"{"tbl":"t","op":"upsert","rows":[]}"#,
            r#"{"tbl":"t","op":"insert"}"#,
            r#"{"tbl":"t","op":"insert","rows":[[1]]}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn escaped_column_names_and_64_bit_integers_stay_exact() {
        let r = rows(parse(r#"{"tbl":"t","op":"insert","rows":[{"a\"b":9223372036854775807,"n":1.5}]}"#).unwrap());
        assert_eq!(r[0].get("a\"b"), Some(&json!(9223372036854775807i64)));
        assert_eq!(r[0].key(1), Key::new(vec![KeyPart::Int(i64::MAX)]));
    }

    #[test]
    fn rows_deserialize_into_serde_types() {
        #[derive(serde::Deserialize, PartialEq, Debug)]
        struct User {
            id: i64,
            role_id: Option<i32>,
        }
        let r = rows(parse(r#"{"tbl":"t","op":"insert","rows":[{"id":1,"role_id":null}]}"#).unwrap());
        assert_eq!(r[0].deserialize::<User>().unwrap(), User { id: 1, role_id: None });
    }
}
