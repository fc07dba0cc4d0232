//! The argument of a watch's triggers: what the trigger needs to know of its watch (see `plan`).
//!
//! The fields (channel, table name, key count, key and extra columns) travel as one argument,
//! written like a PostgreSQL text array with every element quoted: `{"users","public.users","1","id"}`.
//! PostgreSQL copies every trigger argument of a table for each INSERT, UPDATE and DELETE
//! statement; one argument instead of one per field saves a single-row statement about a tenth of
//! what pgwatch costs it. Triggers made by earlier builds pass one field per argument; they are
//! read as such until their watch's triggers are made again.

/// The fields as one trigger argument.
pub fn encode(fields: &[String]) -> String {
    let quoted: Vec<String> =
        fields.iter().map(|field| format!("\"{}\"", field.replace('\\', "\\\\").replace('"', "\\\""))).collect();
    format!("{{{}}}", quoted.join(","))
}

/// The fields of a trigger's arguments, as bytes (they are in the database's encoding): one
/// argument written by [`encode`], or (older triggers) one field per argument. `None` when a lone
/// argument is not [`encode`]'s.
pub fn decode(args: &[&[u8]]) -> Option<Vec<Vec<u8>>> {
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
    use super::{decode, encode};

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
}
