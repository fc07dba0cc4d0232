//! Text pgwatch takes from PostgreSQL as Rust strings (`watch_table`'s arguments, the names of a
//! watched table, its schema and its columns), checked once where it comes in. pgrx reads text
//! as UTF-8 and stops with XX000 where it is not; pgwatch refuses such text with 0A000 instead,
//! having changed nothing.
//!
//! Readable text: any in a UTF-8 database, valid UTF-8 in a `SQL_ASCII` one, ASCII in others
//! (LATIN1, EUC_JP, ...), where other bytes would spell other characters. Readable text has the
//! same bytes as a Rust string as in the database, so it goes back into SQL, trigger arguments
//! and payloads unchanged. Names are read as bytes wherever they are not checked here (the
//! delivery worker, replay).

use pgrx::callconv::{Arg, ArgAbi};
use pgrx::datum::{Datum, UnboxDatum};
use pgrx::pgrx_sql_entity_graph::metadata::{
    ArgumentError, ReturnsError, ReturnsRef, SqlMappingRef, SqlTranslatable, TypeOrigin,
};
use pgrx::prelude::*;
use pgrx::{PgRelation, PgSqlErrorCode};

use crate::error::fail;

/// `bytes` as a string, if they are readable text in this database (see the module's text).
pub fn readable(bytes: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(bytes).ok()?;
    // SAFETY: reads the database's encoding, fixed for the session.
    let encoding = unsafe { pg_sys::GetDatabaseEncoding() } as u32;
    (text.is_ascii() || encoding == pg_sys::pg_enc::PG_UTF8 || encoding == pg_sys::pg_enc::PG_SQL_ASCII).then_some(text)
}

/// `bytes` for a message: ASCII as it is, other bytes as `\xNN`, readable in any encoding.
pub fn shown(bytes: &[u8]) -> String {
    if let Some(text) = readable(bytes) {
        return text.to_string();
    }
    bytes
        .iter()
        .map(|&b| if b.is_ascii() && !b.is_ascii_control() { char::from(b).to_string() } else { format!("\\x{b:02x}") })
        .collect()
}

/// `bytes` as a string, or an ERROR (0A000) that names `what` they are.
pub fn checked(bytes: &[u8], what: impl FnOnce(String) -> String) -> &str {
    readable(bytes).unwrap_or_else(|| {
        // SAFETY: the encoding's name is a static NUL-terminated string.
        let encoding = unsafe { std::ffi::CStr::from_ptr(pg_sys::GetDatabaseEncodingName()) }.to_string_lossy();
        fail(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("{} is not text pgwatch can read in a database encoded {encoding}", what(shown(bytes))),
            "pgwatch reads any text in UTF-8 databases, UTF-8 in SQL_ASCII ones and only ASCII in others: here, pass ASCII arguments and give watched tables, their schemas and columns ASCII names, or unwatch the table first (see docs/limits-and-errors.md)",
        )
    })
}

/// The bytes of a name of the catalog's (`NameData`).
fn name_bytes(data: &pg_sys::NameData) -> &[u8] {
    // SAFETY: a NameData holds a NUL-terminated string within its array.
    unsafe { std::ffi::CStr::from_ptr(data.data.as_ptr()) }.to_bytes()
}

/// The bytes of `rel`'s name.
fn relation_bytes(rel: &PgRelation) -> &[u8] {
    // SAFETY: an open relation has its pg_class row.
    name_bytes(unsafe { &(*rel.rd_rel).relname })
}

/// The bytes of `rel`'s schema's name.
fn schema_bytes(rel: &PgRelation) -> Vec<u8> {
    // SAFETY: the schema of an open (locked) relation exists; its name is a palloc'd,
    // NUL-terminated string, copied here.
    unsafe { std::ffi::CStr::from_ptr(pg_sys::get_namespace_name(rel.namespace_oid())) }.to_bytes().to_vec()
}

/// The name of `rel`, checked.
pub fn relation_name(rel: &PgRelation) -> &str {
    checked(relation_bytes(rel), |n| format!("table name \"{n}\""))
}

/// The name of `rel`'s schema, checked.
pub fn schema_name(rel: &PgRelation) -> String {
    checked(&schema_bytes(rel), |n| format!("schema name \"{n}\"")).to_string()
}

/// `rel` as `schema.table` for a message, whatever its names hold (see [`shown`]).
pub fn shown_relation(rel: &PgRelation) -> String {
    format!("{}.{}", shown(&schema_bytes(rel)), shown(relation_bytes(rel)))
}

/// The name of column `attr` of `rel`, checked.
pub fn column_name<'a>(rel: &PgRelation, attr: &'a pg_sys::FormData_pg_attribute) -> &'a str {
    checked(name_bytes(&attr.attname), |n| format!("column name \"{n}\" of table \"{}\"", shown(relation_bytes(rel))))
}

/// A text argument of a function of pgwatch's, checked: where pgrx's `&str` and `String` would
/// stop with XX000 (or read bytes of another encoding as UTF-8, in arrays).
pub struct TextArg(pub String);

impl TextArg {
    fn of(bytes: &[u8]) -> TextArg {
        TextArg(checked(bytes, |text| format!("argument \"{text}\"")).to_string())
    }
}

impl FromDatum for TextArg {
    unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, _typoid: pg_sys::Oid) -> Option<TextArg> {
        (!is_null && !datum.is_null()).then(|| {
            // SAFETY: a text datum, detoasted into the current memory context (a copy when it
            // was toasted), read before that context ends.
            TextArg::of(unsafe {
                pgrx::varlena::varlena_to_byte_slice(pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr()))
            })
        })
    }
}

// SAFETY: an element of a text array, which pgrx hands over detoasted, read as FromDatum reads it.
unsafe impl UnboxDatum for TextArg {
    type As<'src> = TextArg;
    unsafe fn unbox<'src>(datum: Datum<'src>) -> TextArg
    where
        Self: 'src,
    {
        // SAFETY: as above; the datum is a detoasted text.
        TextArg::of(unsafe { pgrx::varlena::varlena_to_byte_slice(datum.sans_lifetime().cast_mut_ptr()) })
    }
}

// SAFETY: read by FromDatum from a text argument, as pgrx reads String.
unsafe impl<'fcx> ArgAbi<'fcx> for TextArg {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        // SAFETY: the caller promised a non-null text argument.
        unsafe { arg.unbox_arg_using_from_datum() }.unwrap_or(TextArg(String::new()))
    }
}

// SAFETY: a text argument, as pgrx maps String.
unsafe impl SqlTranslatable for TextArg {
    const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!(TextArg);
    const TYPE_ORIGIN: TypeOrigin = TypeOrigin::External;
    const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> = Ok(SqlMappingRef::literal("text"));
    const RETURN_SQL: Result<ReturnsRef, ReturnsError> = Ok(ReturnsRef::One(SqlMappingRef::literal("text")));
}

/// An optional text argument as `&str`.
pub fn arg(text: &Option<TextArg>) -> Option<&str> {
    text.as_ref().map(|t| t.0.as_str())
}

/// An optional text array argument as pgwatch's code takes it.
pub fn args(texts: Option<Vec<Option<TextArg>>>) -> Option<Vec<Option<String>>> {
    texts.map(|texts| texts.into_iter().map(|t| t.map(|t| t.0)).collect())
}
