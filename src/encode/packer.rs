//! Packing rendered rows of one table and op into as few NOTIFY payloads as fit, each with its
//! header (and, in worker delivery, its sequence number), and the notices that list no rows.

use std::ffi::CStr;

use heapless::Vec as FixedVec;

use super::image::{format_u64, push_bytes, push_json_string, Full, PayloadBuf, MAX_PAYLOAD};
use crate::model::events::Op;

/// The longest table name a payload names: `schema.table`, 63 bytes each (NAMEDATALEN - 1), three
/// times over for a name in another server encoding read as UTF-8 (each byte that is not UTF-8
/// becomes U+FFFD). Escaped, it always leaves room for a compact watch's `"cols"` header and a row.
pub const MAX_TABLE_NAME: usize = 3 * (2 * 63 + 1);

/// Room kept free in every payload for `"seq":N,`, so that rows sized for inline delivery also fit
/// a worker's numbered payload.
const SEQ_RESERVE: usize = r#""seq":18446744073709551615,"#.len();

/// Packs rendered rows of one table and op into as few payloads as fit.
pub struct Packer {
    buf: PayloadBuf,
    /// Where `"seq":N,` goes: after `{"tbl":…,"op":"…",`.
    seq_at: usize,
    header_len: usize,
    rows: usize,
}

/// A finished payload, NUL-terminated as NOTIFY takes it, and how many rows it carries.
pub struct Payload<'a> {
    pub text: &'a CStr,
    pub rows: usize,
}

/// Writes `{"tbl":…,"op":"…",` and, for worker delivery, `"seq":N,`.
fn header(buf: &mut PayloadBuf, tbl: &str, op: &str, seq: Option<u64>) -> Result<(), Full> {
    push_bytes(buf, b"{\"tbl\":", MAX_PAYLOAD)?;
    push_json_string(buf, tbl.as_bytes(), MAX_PAYLOAD)?;
    push_bytes(buf, b",\"op\":\"", MAX_PAYLOAD)?;
    push_bytes(buf, op.as_bytes(), MAX_PAYLOAD)?;
    push_bytes(buf, b"\",", MAX_PAYLOAD)?;
    if let Some(seq) = seq {
        push_seq(buf, seq)?;
    }
    Ok(())
}

fn push_seq<const N: usize>(buf: &mut FixedVec<u8, N>, seq: u64) -> Result<(), Full> {
    let mut digits = [0u8; 20];
    let text = format_u64(seq, &mut digits);
    push_bytes(buf, b"\"seq\":", MAX_PAYLOAD)?;
    push_bytes(buf, text, MAX_PAYLOAD)?;
    push_bytes(buf, b",", MAX_PAYLOAD)
}

/// A payload that lists no rows: the header, then `fields` (each with its leading comma) and `}`.
fn notice(tbl: &str, op: &str, seq: Option<u64>, fields: &[u8]) -> PayloadBuf {
    let mut buf = PayloadBuf::new();
    header(&mut buf, tbl, op, seq).expect("a table name fits a payload");
    buf.pop();
    push_bytes(&mut buf, fields, MAX_PAYLOAD).expect("a table name fits a payload");
    push_bytes(&mut buf, b"}", MAX_PAYLOAD).expect("a table name fits a payload");
    buf
}

/// The payload that tells subscribers of `tbl` to refetch: some `op` rows could not be listed.
pub fn overflow_payload(tbl: &str, op: Op, seq: Option<u64>) -> PayloadBuf {
    notice(tbl, op.as_str(), seq, b",\"overflow\":true")
}

/// The payload that tells subscribers of `tbl` to refetch it: older changes may have reached them
/// after newer ones (a transaction notified inline overtook queued ones).
pub fn resync_payload(tbl: &str, seq: Option<u64>) -> PayloadBuf {
    notice(tbl, "resync", seq, b"")
}

/// Why a retained channel's feed has a gap that replay cannot fill (see [`reset_payload`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetReason {
    /// The server restarted without a clean shutdown (a crash, an immediate stop, a promoted
    /// standby): changes committed but not yet sent were lost.
    Restart,
    /// A transaction was notified inline (the queue was full), outside the log.
    Fallback,
    /// The table was truncated, and its watch does not report truncate.
    Truncate,
    /// DDL changed which rows the table holds or how they read (see `define::follow`).
    Ddl,
}

impl ResetReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ResetReason::Restart => "restart",
            ResetReason::Fallback => "fallback",
            ResetReason::Truncate => "truncate",
            ResetReason::Ddl => "ddl",
        }
    }
}

/// The reset marker of a retained channel: subscribers refetch `tbl`; replay goes on from here.
pub fn reset_payload(tbl: &str, seq: Option<u64>, reason: ResetReason) -> PayloadBuf {
    notice(tbl, "reset", seq, format!(",\"reason\":\"{}\"", reason.as_str()).as_bytes())
}

/// The payload that tells subscribers of `tbl` that it was truncated.
pub fn truncate_payload(tbl: &str, seq: Option<u64>) -> PayloadBuf {
    notice(tbl, "truncate", seq, b"")
}

/// The most bytes a rendered row may take in payloads of `tbl` (`cols` as for [`Packer::new`]).
/// An image builder counts a row as an object; a compact row takes two bytes more.
pub fn row_budget(tbl: &str, cols: &[u8]) -> usize {
    let compact_extra = if cols.is_empty() { 0 } else { 2 };
    Packer::new(tbl, cols, Op::Update).row_budget() - compact_extra
}

/// The most bytes a compact watch's `"cols"` member may take, so that rows keep most of a payload.
pub const MAX_COLS_HEADER: usize = MAX_PAYLOAD / 2;

/// `"cols":["id","role_id"],`: the column names of a compact watch's rows, written once per
/// payload. `Err(Full)` past [`MAX_COLS_HEADER`].
pub fn cols_header<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Box<[u8]>, Full> {
    let mut buf = PayloadBuf::new();
    push_bytes(&mut buf, b"\"cols\":[", MAX_COLS_HEADER)?;
    for (i, name) in names.into_iter().enumerate() {
        if i > 0 {
            push_bytes(&mut buf, b",", MAX_COLS_HEADER)?;
        }
        push_json_string(&mut buf, name.as_bytes(), MAX_COLS_HEADER)?;
    }
    push_bytes(&mut buf, b"],", MAX_COLS_HEADER)?;
    Ok(buf.as_slice().into())
}

impl Packer {
    /// A packer for `op` rows of `tbl`; `cols` is a compact watch's [`cols_header`], empty for
    /// rows written as objects.
    pub fn new(tbl: &str, cols: &[u8], op: Op) -> Self {
        let mut packer = Packer { buf: PayloadBuf::new(), seq_at: 0, header_len: 0, rows: 0 };
        packer.start(tbl, cols, op);
        packer
    }

    /// Starts over for `op` rows of `tbl`, reusing the buffer (moving 8 KB costs more than
    /// packing a few rows). Rows not flushed are dropped.
    pub fn start(&mut self, tbl: &str, cols: &[u8], op: Op) {
        self.buf.clear();
        header(&mut self.buf, tbl, op.as_str(), None).expect("a table name fits a payload");
        self.seq_at = self.buf.len();
        push_bytes(&mut self.buf, cols, MAX_PAYLOAD).expect("a cols header fits a payload");
        push_bytes(&mut self.buf, b"\"rows\":[", MAX_PAYLOAD).expect("a table name fits a payload");
        self.header_len = self.buf.len();
        self.rows = 0;
    }

    /// The most bytes one row may take so that it fits a payload on its own (with `]}` and room
    /// for a sequence number).
    pub fn row_budget(&self) -> usize {
        MAX_PAYLOAD - SEQ_RESERVE - self.header_len - 2
    }

    /// Adds a row if it fits the current payload; `false` means flush first.
    pub fn push(&mut self, row: &[u8]) -> bool {
        let separator = usize::from(self.rows > 0);
        if self.buf.len() + separator + row.len() + 2 + SEQ_RESERVE > MAX_PAYLOAD {
            return false;
        }
        if separator == 1 {
            self.buf.push(b',').expect("checked above");
        }
        push_bytes(&mut self.buf, row, MAX_PAYLOAD).expect("checked above");
        self.rows += 1;
        true
    }

    /// Closes the current payload, numbered by `seq()` if that gives a number, hands it to
    /// `send`, and starts the next one.
    pub fn flush(&mut self, seq: &mut impl FnMut() -> Option<u64>, send: &mut impl FnMut(Payload<'_>)) {
        if self.rows == 0 {
            return;
        }
        let mut out = FixedVec::<u8, { MAX_PAYLOAD + 1 }>::new();
        push_bytes(&mut out, &self.buf[..self.seq_at], MAX_PAYLOAD).expect("same capacity");
        if let Some(seq) = seq() {
            push_seq(&mut out, seq).expect("room kept by push");
        }
        push_bytes(&mut out, &self.buf[self.seq_at..], MAX_PAYLOAD).expect("room kept by push");
        push_bytes(&mut out, b"]}\0", MAX_PAYLOAD + 1).expect("room kept by push");
        let text = CStr::from_bytes_with_nul(&out).expect("JSON text holds no NUL byte");
        send(Payload { text, rows: self.rows });
        self.buf.truncate(self.header_len);
        self.rows = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_payloads_name_their_columns_once() {
        let cols = cols_header(["id", "role \"x\""]).unwrap();
        assert_eq!(&cols[..], br#""cols":["id","role \"x\""],"#);
        let mut packer = Packer::new("public.t", &cols, Op::Insert);
        assert!(packer.push(b"[1,7]") && packer.push(b"[2,7]"));
        let mut text = String::new();
        packer.flush(&mut || Some(3), &mut |p| text = p.text.to_str().unwrap().to_string());
        assert_eq!(text, r#"{"tbl":"public.t","op":"insert","seq":3,"cols":["id","role \"x\""],"rows":[[1,7],[2,7]]}"#);
        let long = "n".repeat(63);
        assert_eq!(cols_header(std::iter::repeat_n(long.as_str(), 100)), Err(Full));
        // A compact row is budgeted two bytes more than an object row: `[`, `]` and `,{…}`.
        assert_eq!(row_budget("public.t", &cols) + 2 + cols.len(), row_budget("public.t", b""));
    }

    #[test]
    fn packer_splits_rows_across_payloads_under_the_limit() {
        let mut packer = Packer::new("public.t", b"", Op::Insert);
        let mut payloads: Vec<(String, usize)> = Vec::new();
        let mut send = |p: Payload<'_>| payloads.push((p.text.to_str().unwrap().to_string(), p.rows));
        let rows: Vec<String> = (0..2000).map(|i| format!("{{\"id\":{i}}}")).collect();
        let mut next = 0;
        let mut seq = || {
            next += 1;
            Some(u64::MAX - 10 + next)
        };
        for row in &rows {
            if !packer.push(row.as_bytes()) {
                packer.flush(&mut seq, &mut send);
                assert!(packer.push(row.as_bytes()));
            }
        }
        packer.flush(&mut seq, &mut send);
        let mut ids = Vec::new();
        for (i, (text, count)) in payloads.iter().enumerate() {
            assert!(text.len() <= MAX_PAYLOAD);
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(v["seq"].as_u64().unwrap(), u64::MAX - 9 + i as u64);
            assert_eq!(v["tbl"], "public.t");
            assert_eq!(v["op"], "insert");
            let rows = v["rows"].as_array().unwrap();
            assert_eq!(rows.len(), *count);
            ids.extend(rows.iter().map(|r| r["id"].as_i64().unwrap()));
        }
        assert_eq!(ids, (0..2000).collect::<Vec<_>>());
        // Full payloads leave no room for another row, even without a sequence number.
        let first = &payloads[0].0;
        assert!(first.len() + ",{\"id\":1000}".len() > MAX_PAYLOAD);
    }

    #[test]
    fn overflow_payload_names_table_and_op() {
        let p = overflow_payload("s.\"q\"", Op::Delete, None);
        assert_eq!(std::str::from_utf8(&p).unwrap(), r#"{"tbl":"s.\"q\"","op":"delete","overflow":true}"#);
        let p = overflow_payload("t", Op::Insert, Some(42));
        assert_eq!(std::str::from_utf8(&p).unwrap(), r#"{"tbl":"t","op":"insert","seq":42,"overflow":true}"#);
    }

    #[test]
    fn resync_payload_names_the_table() {
        assert_eq!(&resync_payload("public.t", Some(9))[..], br#"{"tbl":"public.t","op":"resync","seq":9}"#);
    }

    #[test]
    fn the_longest_table_name_escaped_leaves_room_for_cols_and_a_row() {
        let tbl = "\u{1}".repeat(MAX_TABLE_NAME);
        let cols = cols_header(std::iter::repeat_n("n", 990)).unwrap();
        assert!(cols.len() > MAX_COLS_HEADER - 40);
        assert!(row_budget(&tbl, &cols) > 1000);
    }

    #[test]
    fn reset_payload_names_the_table_and_the_reason() {
        assert_eq!(
            &reset_payload("public.t", Some(7), ResetReason::Restart)[..],
            br#"{"tbl":"public.t","op":"reset","seq":7,"reason":"restart"}"#
        );
    }

    #[test]
    fn truncate_payload_names_the_table() {
        assert_eq!(&truncate_payload("public.t", None)[..], br#"{"tbl":"public.t","op":"truncate"}"#);
        assert_eq!(&truncate_payload("t", Some(7))[..], br#"{"tbl":"t","op":"truncate","seq":7}"#);
    }

    #[test]
    fn row_budget_lets_a_full_row_fit_alone() {
        let tbl = "public.users";
        let budget = row_budget(tbl, b"");
        let row = format!("{{\"k\":\"{}\"}}", "x".repeat(budget - 8));
        assert_eq!(row.len(), budget);
        let mut packer = Packer::new(tbl, b"", Op::Update);
        assert!(packer.push(row.as_bytes()));
        let mut len = 0;
        packer.flush(&mut || Some(u64::MAX), &mut |p| len = p.text.to_bytes().len());
        assert_eq!(len, MAX_PAYLOAD);
    }
}
