//! Row images: a row's watched columns as JSON `"name":value` pairs, built within a payload's
//! limits, and the fixed-capacity buffers and JSON escaping they are written with.
//!
//! Pure Rust with fixed-capacity `heapless` buffers: nothing here calls PostgreSQL, so it is
//! unit-tested with plain `#[test]`s and shared by inline and worker delivery.

use heapless::Vec as FixedVec;

/// PostgreSQL rejects a payload of `NOTIFY_PAYLOAD_MAX_LENGTH` (8000) bytes or more.
pub const MAX_PAYLOAD: usize = 7999;

/// A payload being built: never longer than PostgreSQL accepts.
pub type PayloadBuf = FixedVec<u8, MAX_PAYLOAD>;

/// A write that would pass a buffer's limit; the buffer is left unchanged or truncated by the caller.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

/// Appends `bytes`, failing if the buffer would grow beyond `limit` (or its capacity). One
/// `memcpy`: heapless's own `extend_from_slice` copies element by element.
pub fn push_bytes<const N: usize>(buf: &mut FixedVec<u8, N>, bytes: &[u8], limit: usize) -> Result<(), Full> {
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

    /// The key part alone, marked partial: subscribers fetch the row by its key.
    pub fn key_only(&self) -> Image {
        Image::from_parts(self.key(), self.key_len, true)
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

    pub fn key_pairs(&self) -> impl Iterator<Item = &[u8]> {
        Self::pairs(self.key())
    }

    pub fn extra_pairs(&self) -> impl Iterator<Item = &[u8]> {
        Self::pairs(&self.data[self.key_len as usize..])
    }

    pub fn all_pairs(&self) -> impl Iterator<Item = &[u8]> {
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

pub const PARTIAL_FLAG: &[u8] = b",\"partial\":true";

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

/// `value` in decimal, written at the end of `digits`.
pub fn format_u64(mut value: u64, digits: &mut [u8; 20]) -> &[u8] {
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

#[cfg(test)]
pub mod tests {
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

    pub fn image(keys: &[(&str, &str)], extras: &[(&str, &str)], limit: usize) -> Image {
        build(|name| pair_prefix(name).unwrap(), keys, extras, limit)
    }

    /// An image of a compact watch: values without names.
    pub fn values(keys: &[&str], extras: &[&str], limit: usize) -> Image {
        fn unnamed<'a>(values: &[&'a str]) -> Vec<(&'a str, &'a str)> {
            values.iter().map(|v| ("", *v)).collect()
        }
        build(|_| Box::default(), &unnamed(keys), &unnamed(extras), limit)
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
            assert_eq!(rebuilt.parts(), built.parts());
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
    fn image_limit_counts_the_rendered_row() {
        // {"id":1,"a":"s","partial":true} is 32 bytes: the partial flag is always budgeted.
        let fits = image(&[("id", "1")], &[("a", "s")], 16 + PARTIAL_FLAG.len());
        assert!(!fits.partial);
        let cut = image(&[("id", "1")], &[("a", "s")], 15 + PARTIAL_FLAG.len());
        assert!(cut.partial);
    }

    #[test]
    fn key_too_big_does_not_build() {
        let mut b = ImageBuilder::new(30);
        assert_eq!(b.string_pair(&pair_prefix("id").unwrap(), "k".repeat(40).as_bytes()), Err(Full));
    }
}
