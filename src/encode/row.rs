//! A folded row change rendered as payload JSON: an object of named values, or for compact
//! watches an array of values, with its old values and the partial flag.

use super::image::{push_bytes, Full, Image, PayloadBuf, PARTIAL_FLAG};
use crate::model::events::Op;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::image::tests::{image, values};
    use crate::encode::image::{pair_prefix, ImageBuilder};

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
    fn integers_are_written_in_full() {
        let mut b = ImageBuilder::new(500);
        for v in [0, 7, -7, 1234567890, i64::MIN, i64::MAX] {
            b.int_pair(&pair_prefix("n").unwrap(), v).unwrap();
        }
        let row = render(Op::Insert, None, Some(&b.finish(false)), 500).unwrap();
        assert_eq!(row, r#"{"n":0,"n":7,"n":-7,"n":1234567890,"n":-9223372036854775808,"n":9223372036854775807}"#);
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
    fn an_image_read_back_renders_alike() {
        for built in [image(&[("id", "1")], &[("n", "x")], 500), image(&[("id", "1")], &[("n", &"x".repeat(60))], 500)]
        {
            let (data, key_len, partial) = built.parts();
            let rebuilt = Image::from_parts(data, key_len, partial);
            assert_eq!(render(Op::Insert, None, Some(&rebuilt), 500), render(Op::Insert, None, Some(&built), 500));
        }
    }
}
