//! Payload encoding: row images as JSON pairs, and their packing into NOTIFY payloads.
//!
//! Pure Rust with fixed-capacity `heapless` buffers: nothing here calls PostgreSQL, so it is
//! unit-tested with plain `#[test]`s and can be shared by inline and worker delivery.

use std::ffi::CStr;

use heapless::Vec as FixedVec;

/// PostgreSQL rejects a payload of `NOTIFY_PAYLOAD_MAX_LENGTH` (8000) bytes or more.
pub const MAX_PAYLOAD: usize = 7999;

/// The longest table name a payload names: `schema.table`, 63 bytes each (NAMEDATALEN - 1), three
/// times over for a name in another server encoding read as UTF-8 (each byte that is not UTF-8
/// becomes U+FFFD). Escaped, it always leaves room for a compact watch's `"cols"` header and a row.
pub const MAX_TABLE_NAME: usize = 3 * (2 * 63 + 1);

/// The longest channel name NOTIFY accepts (NAMEDATALEN - 1).
pub const MAX_CHANNEL: usize = 63;

/// Room kept free in every payload for `"seq":N,`, so that rows sized for inline delivery also fit
/// a worker's numbered payload.
const SEQ_RESERVE: usize = r#""seq":18446744073709551615,"#.len();

/// A payload being built: never longer than PostgreSQL accepts.
pub type PayloadBuf = FixedVec<u8, MAX_PAYLOAD>;

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

/// A write that would pass a buffer's limit; the buffer is left unchanged or truncated by the caller.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

/// Appends `bytes`, failing if the buffer would grow beyond `limit` (or its capacity). One
/// `memcpy`: heapless's own `extend_from_slice` copies element by element.
fn push_bytes<const N: usize>(buf: &mut FixedVec<u8, N>, bytes: &[u8], limit: usize) -> Result<(), Full> {
    let len = buf.len();
    if len + bytes.len() > limit.min(N) {
        return Err(Full);
    }
    // SAFETY: the bytes fit the spare capacity (checked above), and are initialised once copied.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.as_mut_ptr().add(len), bytes.len());
        buf.set_len(len + bytes.len());
    }
    Ok(())
}

/// Appends `s` as a JSON string literal. Bytes ≥ 0x80 pass through: payloads are in the server encoding.
pub fn push_json_string<const N: usize>(buf: &mut FixedVec<u8, N>, s: &[u8], limit: usize) -> Result<(), Full> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let start = buf.len();
    let result = (|| {
        push_bytes(buf, b"\"", limit)?;
        let mut plain = 0;
        for (i, &b) in s.iter().enumerate() {
            let escaped: &[u8] = match b {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0x08 => b"\\b",
                0x0c => b"\\f",
                0..=0x1f => &[b'\\', b'u', b'0', b'0', HEX[(b >> 4) as usize], HEX[(b & 15) as usize]],
                _ => continue,
            };
            push_bytes(buf, &s[plain..i], limit)?;
            push_bytes(buf, escaped, limit)?;
            plain = i + 1;
        }
        push_bytes(buf, &s[plain..], limit)?;
        push_bytes(buf, b"\"", limit)
    })();
    if result.is_err() {
        buf.truncate(start);
    }
    result
}

/// The `"name":` prefix of a column's pair, built once per watched column.
pub fn pair_prefix(name: &str) -> Result<Box<[u8]>, Full> {
    let mut buf = PayloadBuf::new();
    push_json_string(&mut buf, name.as_bytes(), MAX_PAYLOAD)?;
    push_bytes(&mut buf, b":", MAX_PAYLOAD)?;
    Ok(buf.as_slice().into())
}

/// One row's watched columns, key columns first, as `"name":value` pairs each stored behind a
/// two-byte length. The key part doubles as the row's identity when changes are folded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    data: ImageBytes,
    key_len: u32,
    /// Extra columns were left out because the row was too big for a payload.
    pub partial: bool,
}

/// Image bytes held in place up to this many: a key and a few small columns, as most watches
/// record, so that recording or decoding a row allocates nothing (an [`Image`] takes 64 bytes).
const INLINE_IMAGE: usize = 54;

/// An image's bytes: in place when they fit, else boxed.
#[derive(Clone)]
enum ImageBytes {
    Inline { len: u8, bytes: [u8; INLINE_IMAGE] },
    Boxed(Box<[u8]>),
}

impl ImageBytes {
    fn new(data: &[u8]) -> ImageBytes {
        if data.len() > INLINE_IMAGE {
            return ImageBytes::Boxed(data.into());
        }
        let mut bytes = [0; INLINE_IMAGE];
        bytes[..data.len()].copy_from_slice(data);
        ImageBytes::Inline { len: data.len() as u8, bytes }
    }
}

impl std::ops::Deref for ImageBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            ImageBytes::Inline { len, bytes } => &bytes[..usize::from(*len)],
            ImageBytes::Boxed(bytes) => bytes,
        }
    }
}

impl PartialEq for ImageBytes {
    fn eq(&self, other: &ImageBytes) -> bool {
        **self == **other
    }
}

impl Eq for ImageBytes {}

impl std::fmt::Debug for ImageBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

impl Image {
    /// Rebuilds an image from [`Image::parts`], e.g. after a trip through shared memory.
    pub fn from_parts(data: &[u8], key_len: u32, partial: bool) -> Image {
        Image { data: ImageBytes::new(data), key_len: key_len.min(data.len() as u32), partial }
    }

    /// Bytes this image holds outside itself (a larger image is boxed).
    pub fn heap_bytes(&self) -> usize {
        match &self.data {
            ImageBytes::Inline { .. } => 0,
            ImageBytes::Boxed(bytes) => bytes.len(),
        }
    }

    /// The stored bytes, the length of their key part, and whether the image is partial.
    pub fn parts(&self) -> (&[u8], u32, bool) {
        (&self.data, self.key_len, self.partial)
    }

    /// The length-prefixed key pairs: equal exactly when the key values are equal.
    pub fn key(&self) -> &[u8] {
        &self.data[..self.key_len as usize]
    }

    fn pairs(data: &[u8]) -> impl Iterator<Item = &[u8]> {
        let mut rest = data;
        std::iter::from_fn(move || {
            let (len, tail) = rest.split_first_chunk::<2>()?;
            let (pair, tail) = tail.split_at(u16::from_le_bytes(*len) as usize);
            rest = tail;
            Some(pair)
        })
    }

    fn key_pairs(&self) -> impl Iterator<Item = &[u8]> {
        Self::pairs(self.key())
    }

    fn extra_pairs(&self) -> impl Iterator<Item = &[u8]> {
        Self::pairs(&self.data[self.key_len as usize..])
    }

    fn all_pairs(&self) -> impl Iterator<Item = &[u8]> {
        Self::pairs(&self.data)
    }
}

/// Builds an [`Image`] in a fixed buffer, refusing any pair that would make the rendered row
/// (`{`, pairs, commas, `,"partial":true`, `}`) longer than `limit`.
pub struct ImageBuilder {
    buf: PayloadBuf,
    key_len: usize,
    rendered: usize,
    limit: usize,
}

/// A point an [`ImageBuilder`] can be rolled back to.
#[derive(Clone, Copy)]
pub struct Mark {
    len: usize,
    rendered: usize,
}

const PARTIAL_FLAG: &[u8] = b",\"partial\":true";

impl ImageBuilder {
    #[inline(always)]
    pub fn new(limit: usize) -> Self {
        ImageBuilder { buf: PayloadBuf::new(), key_len: 0, rendered: 2 + PARTIAL_FLAG.len(), limit }
    }

    pub fn mark(&self) -> Mark {
        Mark { len: self.buf.len(), rendered: self.rendered }
    }

    pub fn rollback(&mut self, mark: Mark) {
        self.buf.truncate(mark.len);
        self.rendered = mark.rendered;
    }

    /// Ends the key columns: what has been added so far is the row's identity.
    pub fn end_key(&mut self) {
        self.key_len = self.buf.len();
    }

    /// Adds one pair whose value is written by `value` (e.g. [`push_json_string`]), all or nothing.
    pub fn pair(
        &mut self,
        prefix: &[u8],
        value: impl FnOnce(&mut PayloadBuf, usize) -> Result<(), Full>,
    ) -> Result<(), Full> {
        let mark = self.mark();
        let separator = usize::from(!self.buf.is_empty());
        let result = (|| {
            // Every stored byte but the length prefix is rendered, so the storage limit follows
            // from the rendering limit.
            let room = self.limit.checked_sub(self.rendered + separator).ok_or(Full)?;
            let start = self.buf.len();
            push_bytes(&mut self.buf, &[0, 0], MAX_PAYLOAD)?;
            let storage_limit = (start + 2 + room).min(MAX_PAYLOAD);
            push_bytes(&mut self.buf, prefix, storage_limit)?;
            value(&mut self.buf, storage_limit)?;
            let len = self.buf.len() - start - 2;
            self.buf[start..start + 2].copy_from_slice(&(len as u16).to_le_bytes());
            self.rendered += separator + len;
            Ok(())
        })();
        if result.is_err() {
            self.rollback(mark);
        }
        result
    }

    /// Adds a pair with a value written verbatim (numbers, booleans, `null`). Its length is known
    /// up front, so it is checked once (the common case: every integer column).
    pub fn raw_pair(&mut self, prefix: &[u8], value: &[u8]) -> Result<(), Full> {
        let separator = usize::from(!self.buf.is_empty());
        let len = prefix.len() + value.len();
        if self.rendered + separator + len > self.limit || self.buf.len() + 2 + len > MAX_PAYLOAD {
            return Err(Full);
        }
        for part in [&(len as u16).to_le_bytes()[..], prefix, value] {
            push_bytes(&mut self.buf, part, MAX_PAYLOAD)?;
        }
        self.rendered += separator + len;
        Ok(())
    }

    /// Adds a pair with an integer value.
    pub fn int_pair(&mut self, prefix: &[u8], value: i64) -> Result<(), Full> {
        let mut digits = [0u8; 20];
        let text = format_u64(value.unsigned_abs(), &mut digits);
        if value >= 0 {
            return self.raw_pair(prefix, text);
        }
        let mut signed = [b'-'; 21];
        signed[1..=text.len()].copy_from_slice(text);
        self.raw_pair(prefix, &signed[..=text.len()])
    }

    /// Adds a pair with a string value.
    pub fn string_pair(&mut self, prefix: &[u8], value: &[u8]) -> Result<(), Full> {
        self.pair(prefix, |buf, limit| push_json_string(buf, value, limit))
    }

    /// The image built so far. Borrows rather than consumes: moving the 8 KB builder costs more
    /// than building a small row.
    pub fn finish(&self, partial: bool) -> Image {
        Image { data: ImageBytes::new(self.buf.as_slice()), key_len: self.key_len as u32, partial }
    }
}

fn join<'a>(out: &mut PayloadBuf, limit: usize, items: impl Iterator<Item = &'a [u8]>) -> Result<(), Full> {
    for (i, item) in items.enumerate() {
        if i > 0 {
            push_bytes(out, b",", limit)?;
        }
        push_bytes(out, item, limit)?;
    }
    Ok(())
}

/// Writes `{pairs}`, with an `"old"` object and the `partial` flag as given.
fn write_object_row<'a>(
    out: &mut PayloadBuf,
    limit: usize,
    pairs: impl Iterator<Item = &'a [u8]>,
    old: impl Iterator<Item = &'a [u8]>,
    partial: bool,
) -> Result<(), Full> {
    push_bytes(out, b"{", limit)?;
    join(out, limit, pairs)?;
    let mut old = old.peekable();
    if old.peek().is_some() {
        push_bytes(out, b",\"old\":{", limit)?;
        join(out, limit, old)?;
        push_bytes(out, b"}", limit)?;
    }
    if partial {
        push_bytes(out, PARTIAL_FLAG, limit)?;
    }
    push_bytes(out, b"}", limit)
}

/// Writes `[values]` (compact rows), followed by an object holding the `"old"` values and the
/// `partial` flag when there are any.
fn write_array_row<'a>(
    out: &mut PayloadBuf,
    limit: usize,
    values: impl Iterator<Item = &'a [u8]>,
    old: Option<impl Iterator<Item = &'a [u8]>>,
    partial: bool,
) -> Result<(), Full> {
    push_bytes(out, b"[", limit)?;
    join(out, limit, values)?;
    if old.is_some() || partial {
        push_bytes(out, b",{", limit)?;
        let has_old = old.is_some();
        if let Some(old) = old {
            push_bytes(out, b"\"old\":[", limit)?;
            join(out, limit, old)?;
            push_bytes(out, b"]", limit)?;
        }
        if partial {
            // PARTIAL_FLAG without its leading comma when it is the object's first member.
            push_bytes(out, &PARTIAL_FLAG[usize::from(!has_old)..], limit)?;
        }
        push_bytes(out, b"}", limit)?;
    }
    push_bytes(out, b"]", limit)
}

/// The net change of one row, ready to be rendered.
#[derive(Clone, Copy, Debug)]
pub struct NetRow<'a> {
    pub op: Op,
    pub before: Option<&'a Image>,
    pub after: Option<&'a Image>,
}

impl NetRow<'_> {
    /// Renders the row as payload JSON within `limit` bytes, as an object or, for `compact`
    /// watches, an array of values. An update carries, under `"old"`, the previous values of the
    /// extra columns that changed (compact: all the previous values, when any of them changed);
    /// its key never changes (see `coalesce`). A row whose values are not all known (an image cut
    /// to its key because it was too big, its own or, for an update, the old one) or that does not
    /// fit is sent as its key columns with `"partial":true`; `Err(Full)` means not even that
    /// fits. Returns whether the row is partial.
    pub fn render(&self, out: &mut PayloadBuf, limit: usize, compact: bool) -> Result<bool, Full> {
        out.clear();
        let (shown, old) = match self.op {
            Op::Delete => (self.before.expect("a delete has a before image"), None),
            _ => (self.after.expect("an insert or update has an after image"), self.before),
        };
        if !shown.partial && old.is_none_or(|old| !old.partial) {
            let changed = || {
                old.into_iter().flat_map(|old| {
                    old.extra_pairs().zip(shown.extra_pairs()).filter(|(was, is)| was != is).map(|(was, _)| was)
                })
            };
            let written = if compact {
                let old = old.filter(|_| changed().next().is_some()).map(Image::all_pairs);
                write_array_row(out, limit, shown.all_pairs(), old, false)
            } else {
                write_object_row(out, limit, shown.all_pairs(), changed(), false)
            };
            if written.is_ok() {
                return Ok(false);
            }
            out.clear();
        }
        let no_old = std::iter::empty();
        let fallback = if compact {
            write_array_row(out, limit, shown.key_pairs(), None::<std::iter::Empty<&[u8]>>, true)
        } else {
            write_object_row(out, limit, shown.key_pairs(), no_old, true)
        };
        fallback.inspect_err(|_| out.clear())?;
        Ok(true)
    }
}

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

/// `value` in decimal, written at the end of `digits`.
fn format_u64(mut value: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            return &digits[at..];
        }
    }
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

    /// An image of raw key values and string extras, each behind `prefix(name)`.
    fn build(prefix: fn(&str) -> Box<[u8]>, keys: &[(&str, &str)], extras: &[(&str, &str)], limit: usize) -> Image {
        let mut b = ImageBuilder::new(limit);
        for (name, value) in keys {
            b.raw_pair(&prefix(name), value.as_bytes()).unwrap();
        }
        b.end_key();
        let mark = b.mark();
        for (name, value) in extras {
            if b.string_pair(&prefix(name), value.as_bytes()).is_err() {
                b.rollback(mark);
                return b.finish(true);
            }
        }
        b.finish(false)
    }

    fn image(keys: &[(&str, &str)], extras: &[(&str, &str)], limit: usize) -> Image {
        build(|name| pair_prefix(name).unwrap(), keys, extras, limit)
    }

    /// An image of a compact watch: values without names.
    fn values(keys: &[&str], extras: &[&str], limit: usize) -> Image {
        fn unnamed<'a>(values: &[&'a str]) -> Vec<(&'a str, &'a str)> {
            values.iter().map(|v| ("", *v)).collect()
        }
        build(|_| Box::default(), &unnamed(keys), &unnamed(extras), limit)
    }

    fn render_as(
        compact: bool,
        op: Op,
        before: Option<&Image>,
        after: Option<&Image>,
        limit: usize,
    ) -> Result<String, Full> {
        let mut out = PayloadBuf::new();
        let partial = NetRow { op, before, after }.render(&mut out, limit, compact)?;
        let flag: &[u8] = if compact { b"\"partial\":true}]" } else { b"\"partial\":true}" };
        assert_eq!(partial, out.ends_with(flag));
        Ok(String::from_utf8(out.to_vec()).unwrap())
    }

    fn render(op: Op, before: Option<&Image>, after: Option<&Image>, limit: usize) -> Result<String, Full> {
        render_as(false, op, before, after, limit)
    }

    fn render_compact(op: Op, before: Option<&Image>, after: Option<&Image>, limit: usize) -> Result<String, Full> {
        render_as(true, op, before, after, limit)
    }

    #[test]
    fn compact_rows_are_arrays_with_old_values_and_partial_in_a_trailing_object() {
        let before = values(&["1"], &["a", "x"], 500);
        let after = values(&["1"], &["b", "x"], 500);
        assert_eq!(render_compact(Op::Insert, None, Some(&after), 500).unwrap(), r#"[1,"b","x"]"#);
        assert_eq!(
            render_compact(Op::Update, Some(&before), Some(&after), 500).unwrap(),
            r#"[1,"b","x",{"old":[1,"a","x"]}]"#
        );
        assert_eq!(render_compact(Op::Update, Some(&after), Some(&after), 500).unwrap(), r#"[1,"b","x"]"#);
        assert_eq!(render_compact(Op::Delete, Some(&before), None, 500).unwrap(), r#"[1,"a","x"]"#);
        // Too big with its extras: the key, flagged partial; so is an update whose old row was cut.
        let big = values(&["1"], &[&"q".repeat(100)], 60);
        assert!(big.partial);
        assert_eq!(render_compact(Op::Insert, None, Some(&big), 60).unwrap(), r#"[1,{"partial":true}]"#);
        assert_eq!(render_compact(Op::Update, Some(&before), Some(&big), 60).unwrap(), r#"[1,{"partial":true}]"#);
        assert_eq!(render_compact(Op::Update, Some(&big), Some(&after), 60).unwrap(), r#"[1,{"partial":true}]"#);
        // Complete images that do not fit together: the key, flagged partial.
        assert_eq!(render_compact(Op::Update, Some(&before), Some(&after), 30).unwrap(), r#"[1,{"partial":true}]"#);
        assert_eq!(render_compact(Op::Update, Some(&before), Some(&after), 10), Err(Full));
    }

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
    fn images_held_in_place_and_boxed_read_alike() {
        assert_eq!(std::mem::size_of::<Image>(), 64);
        // 2 + 5 + 9 = 16 bytes of key (length, `"id":`, value), then 2 + 4 + 2 + 30 of extra.
        let fits = image(&[("id", "123456789")], &[("n", &"x".repeat(30))], 500);
        let boxed = image(&[("id", "123456789")], &[("n", &"x".repeat(31))], 500);
        assert!(matches!(fits.data, ImageBytes::Inline { .. }) && fits.parts().0.len() == INLINE_IMAGE);
        assert!(matches!(boxed.data, ImageBytes::Boxed(_)) && boxed.parts().0.len() == INLINE_IMAGE + 1);
        assert_eq!(fits.key(), boxed.key());
        assert_ne!(fits, boxed);
        for built in [fits, boxed] {
            let (data, key_len, partial) = built.parts();
            let rebuilt = Image::from_parts(data, key_len, partial);
            assert_eq!(rebuilt, built);
            assert_eq!(render(Op::Insert, None, Some(&rebuilt), 500), render(Op::Insert, None, Some(&built), 500));
        }
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut buf = PayloadBuf::new();
        push_json_string(&mut buf, "a\"b\\c\nd\u{1}é\t".as_bytes(), MAX_PAYLOAD).unwrap();
        let text = std::str::from_utf8(&buf).unwrap();
        assert_eq!(text, r#""a\"b\\c\nd\u0001é\t""#);
        assert_eq!(serde_json::from_str::<String>(text).unwrap(), "a\"b\\c\nd\u{1}é\t");
    }

    #[test]
    fn json_string_that_does_not_fit_leaves_buffer_unchanged() {
        let mut buf = PayloadBuf::new();
        buf.extend_from_slice(b"xy").unwrap();
        assert_eq!(push_json_string(&mut buf, b"abc", 6), Err(Full));
        assert_eq!(&buf[..], b"xy");
        push_json_string(&mut buf, b"abc", 7).unwrap();
        assert_eq!(&buf[..], b"xy\"abc\"");
    }

    #[test]
    fn insert_renders_all_pairs_in_column_order() {
        let after = image(&[("id", "42")], &[("role", "admin")], 500);
        assert_eq!(render(Op::Insert, None, Some(&after), 500).unwrap(), r#"{"id":42,"role":"admin"}"#);
    }

    #[test]
    fn update_lists_changed_extras_under_old() {
        let before = image(&[("id", "1")], &[("role", "a"), ("name", "x")], 500);
        let after = image(&[("id", "1")], &[("role", "b"), ("name", "x")], 500);
        assert_eq!(
            render(Op::Update, Some(&before), Some(&after), 500).unwrap(),
            r#"{"id":1,"role":"b","name":"x","old":{"role":"a"}}"#
        );
        assert_eq!(render(Op::Update, Some(&after), Some(&after), 500).unwrap(), r#"{"id":1,"role":"b","name":"x"}"#);
    }

    #[test]
    fn an_update_whose_old_row_was_cut_is_sent_as_its_key() {
        let before = image(&[("a", "1"), ("b", "2")], &[("role", &"r".repeat(100))], 60);
        let after = image(&[("a", "1"), ("b", "2")], &[("role", "s")], 60);
        assert!(before.partial && !after.partial);
        assert_eq!(render(Op::Update, Some(&before), Some(&after), 60).unwrap(), r#"{"a":1,"b":2,"partial":true}"#);
        // A delete shows the old row, which is all there is.
        assert_eq!(render(Op::Delete, Some(&before), None, 60).unwrap(), r#"{"a":1,"b":2,"partial":true}"#);
        assert_eq!(render(Op::Insert, None, Some(&after), 60).unwrap(), r#"{"a":1,"b":2,"role":"s"}"#);
    }

    #[test]
    fn delete_renders_the_before_image() {
        let before = image(&[("id", "7")], &[("role", "a")], 500);
        assert_eq!(render(Op::Delete, Some(&before), None, 500).unwrap(), r#"{"id":7,"role":"a"}"#);
    }

    #[test]
    fn image_too_big_for_extras_is_partial() {
        let big = "x".repeat(100);
        let img = image(&[("id", "1")], &[("a", "s"), ("body", &big)], 60);
        assert!(img.partial);
        assert_eq!(render(Op::Insert, None, Some(&img), 60).unwrap(), r#"{"id":1,"partial":true}"#);
    }

    #[test]
    fn image_limit_counts_the_rendered_row() {
        // {"id":1,"a":"s","partial":true} is 32 bytes: the partial flag is always budgeted.
        let fits = image(&[("id", "1")], &[("a", "s")], 16 + PARTIAL_FLAG.len());
        assert!(!fits.partial);
        let cut = image(&[("id", "1")], &[("a", "s")], 15 + PARTIAL_FLAG.len());
        assert!(cut.partial);
    }

    #[test]
    fn integers_are_written_in_full() {
        let mut b = ImageBuilder::new(500);
        for v in [0, 7, -7, 1234567890, i64::MIN, i64::MAX] {
            b.int_pair(&pair_prefix("n").unwrap(), v).unwrap();
        }
        let row = render(Op::Insert, None, Some(&b.finish(false)), 500).unwrap();
        assert_eq!(row, r#"{"n":0,"n":7,"n":-7,"n":1234567890,"n":-9223372036854775808,"n":9223372036854775807}"#);
    }

    #[test]
    fn key_too_big_does_not_build() {
        let mut b = ImageBuilder::new(30);
        assert_eq!(b.string_pair(&pair_prefix("id").unwrap(), "k".repeat(40).as_bytes()), Err(Full));
    }

    #[test]
    fn row_with_old_too_big_falls_back_to_keys() {
        let before = image(&[("id", "1")], &[("a", &"p".repeat(40))], 200);
        let after = image(&[("id", "1")], &[("a", &"q".repeat(40))], 200);
        let full = render(Op::Update, Some(&before), Some(&after), 200).unwrap();
        assert!(full.len() > 60, "{full}");
        assert_eq!(render(Op::Update, Some(&before), Some(&after), 60).unwrap(), r#"{"id":1,"partial":true}"#);
        assert_eq!(render(Op::Update, Some(&before), Some(&after), 10), Err(Full));
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
