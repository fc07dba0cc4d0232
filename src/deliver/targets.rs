//! Watches as targets of a refetch, read from `pgwatch.watches`: every watch of the database (a
//! prepared transaction committed by a backend that does not know what it changed, see
//! `prepared`), or some of them (DDL that changed which rows their tables hold, see
//! `define::follow`). Runs in the session's transaction with its search_path: every function and
//! operator is qualified, so that none of another schema's can stand in.

use std::rc::Rc;

use pgrx::prelude::*;

use super::xact;
use crate::encode::packer::cols_header;
use crate::error;
use crate::model::watch::{Rows, Target};

/// Which watches to read.
pub enum Watches<'a> {
    All,
    /// The watches of these tables; with a column, only those that send it.
    OfTables(&'a [pg_sys::Oid], Option<&'a str>),
    /// These watches, by id.
    Ids(&'a [i64]),
}

/// Has the subscribers of the watches `which` names refetch once this transaction commits (see
/// `xact::refetch_at_commit`).
pub fn refetch(which: Watches<'_>) {
    xact::refetch_at_commit(read(which));
}

/// Table `relid` and, if asked, the partitions above it (its partition ancestors) and the tables
/// below it (partitions and inheritance children, at any depth).
pub fn tree(relid: pg_sys::Oid, up: bool, down: bool) -> Vec<pg_sys::Oid> {
    let query = "WITH RECURSIVE below(oid) AS (
                     SELECT $1::pg_catalog.oid WHERE $3
                     UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i
                                JOIN below b ON i.inhparent OPERATOR(pg_catalog.=) b.oid)
                 SELECT $1::pg_catalog.oid
                 UNION SELECT a.relid::pg_catalog.oid FROM pg_catalog.pg_partition_ancestors($1) AS a WHERE $2
                 UNION SELECT oid FROM below";
    Spi::connect(|client| {
        client
            .select(query, None, &[relid.into(), up.into(), down.into()])?
            .map(|row| Ok(row.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::Oid::INVALID)))
            .collect::<Result<Vec<_>, pgrx::spi::SpiError>>()
    })
    .unwrap_or_else(|e| error::spi_failed("pg_inherits", e))
}

/// Whether pgwatch is installed in this database.
pub fn pgwatch_here() -> bool {
    // SAFETY: a syscache lookup inside the caller's transaction.
    unsafe { pg_sys::get_extension_oid(c"pgwatch".as_ptr(), true) != pg_sys::Oid::INVALID }
}

/// The watches `which` names, as targets of a refetch (none without pgwatch in this database).
pub fn read(which: Watches<'_>) -> Vec<Rc<Target>> {
    if !pgwatch_here() {
        return Vec::new();
    }
    let (tables, column, ids) = match which {
        Watches::All => (None, None, None),
        Watches::OfTables(tables, column) => (Some(tables.to_vec()), column, None),
        Watches::Ids(ids) => (None, None, Some(ids.to_vec())),
    };
    // `retain` and `payload` are read from the row as JSON, which works with an older release's
    // SQL too (before `ALTER EXTENSION pgwatch UPDATE` added them). A compact watch's rows are
    // named as its triggers name them, so that the target is the very one they record under:
    // the refetch joins their changes (in this transaction, and in a worker's batch) and is sent
    // after them.
    let query = concat!(
        "SELECT pg_catalog.convert_to(w.channel, pg_catalog.getdatabaseencoding()),
                        pg_catalog.convert_to(",
        crate::display_name_sql!(),
        ", pg_catalog.getdatabaseencoding()),
                        pg_catalog.row_to_json(w) OPERATOR(pg_catalog.->>) 'retain' IS NOT NULL,
                        CASE WHEN pg_catalog.row_to_json(w) OPERATOR(pg_catalog.->>) 'payload' OPERATOR(pg_catalog.=) 'compact'
                             THEN pg_catalog.convert_to(
                                      pg_catalog.to_json(w.key_columns OPERATOR(pg_catalog.||) w.extra_columns)::pg_catalog.text,
                                      pg_catalog.getdatabaseencoding())
                        END
                   FROM pgwatch.watches w
                   JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) w.tbl
                   JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
                  WHERE ($1::pg_catalog.oid[] IS NULL OR w.tbl::pg_catalog.oid OPERATOR(pg_catalog.=) ANY ($1))
                    AND ($2::pg_catalog.text IS NULL
                         OR $2 OPERATOR(pg_catalog.=) ANY (w.key_columns OPERATOR(pg_catalog.||) w.extra_columns))
                    AND ($3::pg_catalog.int8[] IS NULL OR w.id OPERATOR(pg_catalog.=) ANY ($3))
                  ORDER BY w.id"
    );
    Spi::connect(|client| {
        client
            .select(query, None, &[tables.into(), column.into(), ids.into()])?
            .map(|row| {
                let channel: Vec<u8> = row.get(1)?.unwrap_or_default();
                let tbl: Vec<u8> = row.get(2)?.unwrap_or_default();
                // A compact watch's column names, a JSON array, read as the trigger reads them (see
                // `capture::plan`): in the database's encoding, lossily where that is not UTF-8.
                let compact: Option<Vec<u8>> = row.get(4)?;
                let names = compact.map(|json| serde_json::from_str::<Vec<String>>(&String::from_utf8_lossy(&json)));
                let rows = match names {
                    Some(Ok(names)) => {
                        cols_header(names.iter().map(String::as_str)).map_or(Rows::Objects, Rows::Compact)
                    }
                    _ => Rows::Objects,
                };
                Ok(Rc::new(Target {
                    channel: std::ffi::CString::new(channel).expect("a channel holds no NUL"),
                    tbl: String::from_utf8_lossy(&tbl).into_owned(),
                    rows,
                    retained: row.get::<bool>(3)?.unwrap_or(false),
                }))
            })
            .collect::<Result<Vec<_>, pgrx::spi::SpiError>>()
    })
    .unwrap_or_else(|e| error::spi_failed("pgwatch.watches", e))
}
