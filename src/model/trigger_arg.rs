//! The argument of a watch's triggers: what the trigger needs of its watch, written when pgwatch
//! makes the trigger and read when it first fires (see `capture::plan`).
//!
//! The fields (channel, table name, key count, key and extra columns) travel as one argument,
//! written like a PostgreSQL text array with every element quoted: `{"users","public.users","1","id"}`.
//! PostgreSQL copies every trigger argument of a table for each INSERT, UPDATE and DELETE
//! statement, one allocation each: one argument instead of one per field keeps that copy short,
//! which a single-row statement pays in full. Triggers made by earlier builds pass one field per argument; they are
//! read as such until their watch's triggers are made again.

use super::watch::{OnTruncate, PayloadMode, Watch, MAX_CHANNEL};

/// How a watch's rows are written, as its trigger argument says: the key count is followed by
/// ` compact` for arrays of values (and by ` retained` for a watch whose payloads are kept, see
/// [`TriggerArg::retained`], ` refetch` for one that does not report truncate, see
/// [`TriggerArg::on_truncate`], and ` moves`, ` moves-with-insert` or ` moves-clear` for a trigger
/// that reports only rows moved between partitions, see [`Moves`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Objects,
    Compact,
}

/// Which rows a trigger reports of those an UPDATE moves from one partition to another (see
/// `Watch::move_events`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moves {
    /// A trigger of one of the watch's events: every row of it (moved or not).
    All,
    /// Moved rows only: the delete trigger their old rows, at once; the insert trigger their new
    /// rows, each once its delete half was reported.
    Only,
    /// Moved rows only, the delete trigger's old rows held until the insert half is reported
    /// (the watch's condition reads the new row, and decides for the whole move).
    OnlyWithInsert,
    /// An insert trigger that reports nothing and fires after the watch's own insert trigger:
    /// it drops the held old row of a move whose new row the condition kept out.
    Clear,
}

/// A watch's trigger argument, read.
#[derive(Debug, PartialEq, Eq)]
pub struct TriggerArg {
    pub channel: Vec<u8>,
    pub tbl: Vec<u8>,
    /// How many of `columns`, from the first, are key columns.
    pub keys: usize,
    pub layout: Layout,
    /// The watch keeps its payloads for replay.
    pub retained: bool,
    /// What a TRUNCATE sends (triggers made before 0.4.0 say nothing: only a watch that reports
    /// truncate had a TRUNCATE trigger then).
    pub on_truncate: OnTruncate,
    /// Which moved rows the trigger reports.
    pub moves: Moves,
    /// Key columns, then extra columns.
    pub columns: Vec<Vec<u8>>,
}

impl TriggerArg {
    /// The one argument of `watch`'s triggers on the table subscribers know as `tbl`.
    pub fn write(watch: &Watch, tbl: &str) -> String {
        Self::write_for(watch, tbl, Moves::All)
    }

    /// The one argument of `watch`'s triggers that report `moves`.
    pub fn write_for(watch: &Watch, tbl: &str, moves: Moves) -> String {
        let mut keys = watch.keys.len().to_string();
        if watch.payload == PayloadMode::Compact {
            keys.push_str(" compact");
        }
        if watch.retain.is_some() {
            keys.push_str(" retained");
        }
        if watch.on_truncate() == OnTruncate::Refetch {
            keys.push_str(" refetch");
        }
        match moves {
            Moves::All => {}
            Moves::Only => keys.push_str(" moves"),
            Moves::OnlyWithInsert => keys.push_str(" moves-with-insert"),
            Moves::Clear => keys.push_str(" moves-clear"),
        }
        let fields: Vec<String> = [watch.channel.clone(), tbl.to_string(), keys]
            .into_iter()
            .chain(watch.keys.iter().cloned())
            .chain(watch.extras.iter().cloned())
            .collect();
        encode(&fields)
    }

    /// Reads a trigger's arguments; `Err` says why they are not what pgwatch writes.
    pub fn read(args: &[&[u8]]) -> Result<TriggerArg, String> {
        let fields = decode(args).ok_or("it is not one array of quoted fields")?;
        let [channel, tbl, keys, columns @ ..] = &fields[..] else {
            return Err("it takes the channel, the table name, the key count and the column names".into());
        };
        if channel.is_empty() || channel.len() > MAX_CHANNEL {
            return Err(format!("a channel name of {} bytes (1 to {MAX_CHANNEL})", channel.len()));
        }
        let keys = String::from_utf8_lossy(keys);
        let mut words = keys.split(' ');
        let count = words.next().unwrap_or_default();
        let (mut layout, mut retained, mut on_truncate) = (Layout::Objects, false, OnTruncate::Notice);
        let mut moves = Moves::All;
        for word in words {
            let refetch = on_truncate == OnTruncate::Refetch;
            let all = moves == Moves::All;
            match word {
                "compact" if layout == Layout::Objects && !retained && !refetch && all => layout = Layout::Compact,
                "retained" if !retained && !refetch && all => retained = true,
                "refetch" if !refetch && all => on_truncate = OnTruncate::Refetch,
                "moves" if all => moves = Moves::Only,
                "moves-with-insert" if all => moves = Moves::OnlyWithInsert,
                "moves-clear" if all => moves = Moves::Clear,
                _ => return Err(format!("a key count of \"{keys}\"")),
            }
        }
        let keys = match count.parse::<usize>() {
            Ok(keys) if (1..=columns.len()).contains(&keys) => keys,
            _ => return Err(format!("a key count of \"{keys}\" for {} columns", columns.len())),
        };
        Ok(TriggerArg {
            channel: channel.clone(),
            tbl: tbl.clone(),
            keys,
            layout,
            retained,
            on_truncate,
            moves,
            columns: columns.to_vec(),
        })
    }
}

/// The fields as one trigger argument.
fn encode(fields: &[String]) -> String {
    let quoted: Vec<String> =
        fields.iter().map(|field| format!("\"{}\"", field.replace('\\', "\\\\").replace('"', "\\\""))).collect();
    format!("{{{}}}", quoted.join(","))
}

/// The fields of a trigger's arguments, as bytes (they are in the database's encoding): one
/// argument written by [`encode`], or (older triggers) one field per argument. `None` when a lone
/// argument is not [`encode`]'s.
fn decode(args: &[&[u8]]) -> Option<Vec<Vec<u8>>> {
    let [arg] = args else {
        return Some(args.iter().map(|arg| arg.to_vec()).collect());
    };
    let mut bytes = arg.strip_prefix(b"{")?.strip_suffix(b"}")?.iter().copied();
    let mut fields = Vec::new();
    loop {
        if bytes.next()? != b'"' {
            return None;
        }
        let mut field = Vec::new();
        loop {
            match bytes.next()? {
                b'"' => break,
                b'\\' => field.push(bytes.next()?),
                b => field.push(b),
            }
        }
        fields.push(field);
        match bytes.next() {
            None => return Some(fields),
            Some(b',') => {}
            Some(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{decode, encode, Layout, Moves, OnTruncate, TriggerArg};

    fn strings(fields: &[&str]) -> Vec<String> {
        fields.iter().map(|f| f.to_string()).collect()
    }

    fn bytes(fields: &[&str]) -> Vec<Vec<u8>> {
        fields.iter().map(|f| f.as_bytes().to_vec()).collect()
    }

    #[test]
    fn encodes_fields_as_one_quoted_array() {
        let fields = strings(&["public.users", "public.users", "1", "id", "role_id"]);
        assert_eq!(encode(&fields), r#"{"public.users","public.users","1","id","role_id"}"#);
    }

    #[test]
    fn round_trips_quotes_backslashes_commas_and_braces() {
        let fields = ["a\"b", "c\\d", "e,f", "{g}", "", "1 compact", "x\ny", "ü"];
        let arg = encode(&strings(&fields));
        assert_eq!(arg, "{\"a\\\"b\",\"c\\\\d\",\"e,f\",\"{g}\",\"\",\"1 compact\",\"x\ny\",\"ü\"}");
        assert_eq!(decode(&[arg.as_bytes()]), Some(bytes(&fields)));
    }

    #[test]
    fn reads_older_triggers_one_field_per_argument() {
        let old: [&[u8]; 4] = [b"ch", b"public.t", b"1", b"id"];
        assert_eq!(decode(&old), Some(bytes(&["ch", "public.t", "1", "id"])));
        assert_eq!(decode(&[]), Some(vec![]));
    }

    #[test]
    fn refuses_a_lone_argument_it_did_not_write() {
        for bad in ["ch", "{}", "{ch}", r#"{"a""#, r#"{"a"}x"#, r#"{"a",}"#, r#"{"a";"b"}"#, r#"{"a\"}"#, "{\"a\"}}"] {
            assert_eq!(decode(&[bad.as_bytes()]), None, "{bad}");
        }
    }

    #[test]
    fn reads_what_it_writes_and_refuses_what_it_does_not() {
        let arg = |fields: &[&str]| encode(&strings(fields));
        let read = |text: String| TriggerArg::read(&[text.as_bytes()]);
        assert_eq!(
            read(arg(&["ch", "public.t", "2 compact", "a", "b", "c"])),
            Ok(TriggerArg {
                channel: b"ch".to_vec(),
                tbl: b"public.t".to_vec(),
                keys: 2,
                layout: Layout::Compact,
                retained: false,
                on_truncate: OnTruncate::Notice,
                moves: Moves::All,
                columns: bytes(&["a", "b", "c"])
            })
        );
        assert_eq!(read(arg(&["ch", "t", "1", "id"])).map(|a| a.layout), Ok(Layout::Objects));
        let retained = read(arg(&["ch", "t", "1 compact retained", "id"])).unwrap();
        assert_eq!((retained.layout, retained.retained), (Layout::Compact, true));
        let retained = read(arg(&["ch", "t", "1 retained", "id"])).unwrap();
        assert_eq!((retained.layout, retained.retained), (Layout::Objects, true));
        let refetch = read(arg(&["ch", "t", "1 compact retained refetch", "id"])).unwrap();
        assert_eq!(
            (refetch.layout, refetch.retained, refetch.on_truncate),
            (Layout::Compact, true, OnTruncate::Refetch)
        );
        assert_eq!(read(arg(&["ch", "t", "1 refetch", "id"])).map(|a| a.on_truncate), Ok(OnTruncate::Refetch));
        let moves = read(arg(&["ch", "t", "1 compact retained refetch moves", "id"])).unwrap();
        assert_eq!(
            (moves.layout, moves.retained, moves.on_truncate, moves.moves),
            (Layout::Compact, true, OnTruncate::Refetch, Moves::Only)
        );
        assert_eq!(read(arg(&["ch", "t", "1 moves-with-insert", "id"])).map(|a| a.moves), Ok(Moves::OnlyWithInsert));
        assert_eq!(read(arg(&["ch", "t", "1 moves-clear", "id"])).map(|a| a.moves), Ok(Moves::Clear));
        assert_eq!(read(arg(&["ch", "t", "1", "id"])).map(|a| a.moves), Ok(Moves::All));
        for bad in [
            arg(&["ch", "t", "1"]),
            arg(&["", "t", "1", "id"]),
            arg(&[&"c".repeat(64), "t", "1", "id"]),
            arg(&["ch", "t", "2", "id"]),
            arg(&["ch", "t", "0", "id"]),
            arg(&["ch", "t", "1 sparse", "id"]),
            arg(&["ch", "t", "1 retained compact", "id"]),
            arg(&["ch", "t", "1 retained retained", "id"]),
            arg(&["ch", "t", "1 compact compact", "id"]),
            arg(&["ch", "t", "1 refetch compact", "id"]),
            arg(&["ch", "t", "1 refetch refetch", "id"]),
            arg(&["ch", "t", "1 moves refetch", "id"]),
            arg(&["ch", "t", "1 moves moves", "id"]),
            arg(&["ch", "t", "1 moves moves-with-insert", "id"]),
            "ch".to_string(),
        ] {
            assert!(read(bad.clone()).is_err(), "{bad}");
        }
    }
}
