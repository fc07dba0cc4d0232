//! `watch_table` and `unwatch_table`: validate the request, then keep `pgwatch.watches` and the
//! tables' triggers in step. This is the only place pgwatch uses SPI; it never runs per row.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, quote_literal};
use pgrx::{datum::DatumWithOid, function_name, PgRelation, PgSqlErrorCode};

use crate::events::{Events, EventsError, ACCEPTED};

/// Most extra columns one watch may list.
pub const MAX_EXTRA_COLUMNS: usize = 64;
/// Longest channel name PostgreSQL accepts (NAMEDATALEN - 1).
pub const MAX_CHANNEL_BYTES: usize = 63;

/// Raises an ERROR with a SQLSTATE, a message and a hint.
fn fail(code: PgSqlErrorCode, message: String, hint: &str) -> ! {
    ErrorReport::new(code, message, function_name!()).set_hint(hint).report(PgLogLevel::ERROR);
    unreachable!("an ERROR does not return")
}

/// A table as subscribers see it: `schema.table`.
fn display_name(rel: &PgRelation) -> String {
    format!("{}.{}", rel.namespace(), rel.name())
}

/// The table, checked to be watchable by the current user.
fn watchable(tbl: Option<PgRelation>) -> PgRelation {
    let Some(rel) = tbl else {
        fail(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, "tbl must not be NULL".into(), "pass a table name");
    };
    // SAFETY: an open relation has its pg_class row.
    let relkind = unsafe { (*rel.rd_rel).relkind } as u8;
    if relkind != pg_sys::RELKIND_RELATION && relkind != pg_sys::RELKIND_PARTITIONED_TABLE {
        let kind = match relkind {
            pg_sys::RELKIND_VIEW => "a view",
            pg_sys::RELKIND_MATVIEW => "a materialized view",
            pg_sys::RELKIND_SEQUENCE => "a sequence",
            pg_sys::RELKIND_INDEX | pg_sys::RELKIND_PARTITIONED_INDEX => "an index",
            pg_sys::RELKIND_FOREIGN_TABLE => "a foreign table",
            pg_sys::RELKIND_COMPOSITE_TYPE => "a composite type",
            _ => "not a table",
        };
        fail(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            format!("\"{}\" is not a table", display_name(&rel)),
            &format!("it is {kind}; pgwatch watches ordinary and partitioned tables"),
        );
    }
    // SAFETY: a plain ACL check of an existing relation for the current user.
    let allowed = unsafe { pg_sys::pg_class_aclcheck(rel.oid(), pg_sys::GetUserId(), pg_sys::ACL_TRIGGER as _) };
    if allowed != pg_sys::AclResult::ACLCHECK_OK {
        fail(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied to watch table {}", display_name(&rel)),
            "watching needs what CREATE TRIGGER needs: ownership or the TRIGGER privilege on the table",
        );
    }
    rel
}

/// Runs `f` as the extension's owner, so that callers need no rights on pgwatch's own objects.
/// The caller's own right to watch the table is checked before.
fn as_extension_owner<R>(f: impl FnOnce() -> R) -> R {
    let owner = Spi::get_one::<pg_sys::Oid>("SELECT extowner FROM pg_catalog.pg_extension WHERE extname = 'pgwatch'")
        .ok()
        .flatten()
        .expect("pgwatch is installed");
    let (mut user, mut context) = (pg_sys::Oid::INVALID, 0);
    // SAFETY: the same switch PostgreSQL makes for SECURITY DEFINER functions; an ERROR in `f`
    // aborts the (sub)transaction, which restores the user.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(owner, context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
    }
    let result = f();
    // SAFETY: restores what was saved above.
    unsafe { pg_sys::SetUserIdAndSecContext(user, context) };
    result
}

fn run(query: &str, args: &[DatumWithOid<'_>]) {
    Spi::run_with_args(query, args).unwrap_or_else(|e| error!("pgwatch: {e}"));
}

fn column_names(query: &str, rel: &PgRelation) -> Vec<String> {
    Spi::connect(|client| {
        client
            .select(query, None, &[rel.oid().into()])?
            .map(|row| row.get::<String>(1).map(Option::unwrap_or_default))
            .collect::<Result<Vec<_>, _>>()
    })
    .unwrap_or_else(|e| error!("pgwatch: {e}"))
}

fn primary_key(rel: &PgRelation) -> Vec<String> {
    let keys = column_names(
        "SELECT a.attname::text
           FROM pg_catalog.pg_index i,
                unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n),
                pg_catalog.pg_attribute a
          WHERE i.indrelid = $1 AND i.indisprimary AND a.attrelid = i.indrelid AND a.attnum = k.attnum
          ORDER BY k.n",
        rel,
    );
    if keys.is_empty() {
        fail(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("table {} has no primary key", display_name(rel)),
            "pgwatch identifies rows by their primary key: add one with ALTER TABLE ... ADD PRIMARY KEY",
        );
    }
    keys
}

fn extra_columns(rel: &PgRelation, keys: &[String], requested: Option<Vec<Option<String>>>) -> Vec<String> {
    let requested = requested.unwrap_or_default();
    if requested.len() > MAX_EXTRA_COLUMNS {
        fail(
            PgSqlErrorCode::ERRCODE_TOO_MANY_COLUMNS,
            format!("a watch can list at most {MAX_EXTRA_COLUMNS} extra columns, not {}", requested.len()),
            "list only the columns subscribers filter on",
        );
    }
    let existing = column_names(
        "SELECT attname::text FROM pg_catalog.pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
        rel,
    );
    let mut extras: Vec<String> = Vec::with_capacity(requested.len());
    for column in requested {
        let Some(column) = column else {
            fail(
                PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
                "extra_columns must not contain NULL".into(),
                "list column names",
            );
        };
        if !existing.contains(&column) {
            fail(
                PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                format!("column \"{column}\" of relation {} does not exist", display_name(rel)),
                "extra_columns lists columns of the watched table, by their exact names",
            );
        }
        if keys.contains(&column) {
            fail(
                PgSqlErrorCode::ERRCODE_DUPLICATE_COLUMN,
                format!("column \"{column}\" is part of the primary key of {}", display_name(rel)),
                "key columns are always sent: leave them out of extra_columns",
            );
        }
        if extras.contains(&column) {
            fail(
                PgSqlErrorCode::ERRCODE_DUPLICATE_COLUMN,
                format!("column \"{column}\" is listed twice in extra_columns"),
                "list each column once",
            );
        }
        extras.push(column);
    }
    extras
}

fn parse_events(events: Option<&str>) -> Events {
    let Some(events) = events else {
        fail(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, "events must not be NULL".into(), ACCEPTED);
    };
    Events::parse(events).unwrap_or_else(|e| {
        let message = match e {
            EventsError::Unknown(word) => format!("unknown event \"{word}\""),
            EventsError::Empty => "events names no event".into(),
        };
        fail(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, message, &format!("events accepts {ACCEPTED}"))
    })
}

fn channel(rel: &PgRelation, label: Option<&str>) -> String {
    if label == Some("") {
        fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "label must not be empty".into(),
            "pass NULL to use the table name as the channel",
        );
    }
    let channel = label.map_or_else(|| display_name(rel), str::to_string);
    if channel.len() > MAX_CHANNEL_BYTES {
        fail(
            PgSqlErrorCode::ERRCODE_NAME_TOO_LONG,
            format!("channel name \"{channel}\" is longer than {MAX_CHANNEL_BYTES} bytes"),
            "pass a shorter label: watch_table(..., label => 'short_name'); the label is the channel",
        );
    }
    channel
}

fn trigger_name(id: i64) -> String {
    format!("pgwatch_{id}")
}

fn drop_trigger(id: i64, table: &str) {
    run(&format!("DROP TRIGGER IF EXISTS {} ON {table}", quote_identifier(trigger_name(id))), &[]);
}

#[pg_schema]
mod pgwatch {
    use super::*;

    /// Creates or replaces the watch of `tbl` named `label`; returns its id. Called by
    /// `watch_table()`, which returns the catalog row.
    #[pg_extern(volatile)]
    #[search_path(pg_catalog, pg_temp)]
    fn apply_watch(
        tbl: Option<PgRelation>,
        events: Option<&str>,
        extra_columns: Option<Vec<Option<String>>>,
        label: Option<&str>,
    ) -> i64 {
        let rel = watchable(tbl);
        let events = parse_events(events);
        let keys = primary_key(&rel);
        let extras = super::extra_columns(&rel, &keys, extra_columns);
        let channel = channel(&rel, label);
        let table = format!("{}.{}", quote_identifier(rel.namespace()), quote_identifier(rel.name()));
        let event_words: Vec<String> = events.ops().map(|op| op.as_str().to_string()).collect();
        as_extension_owner(|| {
            run(&format!("LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE"), &[]);
            let fields: [DatumWithOid; 6] = [
                rel.oid().into(),
                label.into(),
                channel.as_str().into(),
                event_words.clone().into(),
                extras.clone().into(),
                keys.clone().into(),
            ];
            let replaced = Spi::get_one_with_args::<i64>(
                "UPDATE pgwatch.watches SET channel = $3, events = $4, extra_columns = $5, key_columns = $6
                  WHERE tbl = $1::regclass AND label IS NOT DISTINCT FROM $2 RETURNING id",
                &fields,
            )
            .ok()
            .flatten();
            if let Some(id) = replaced {
                drop_trigger(id, &table);
            }
            let id = match replaced {
                Some(id) => id,
                None => Spi::get_one_with_args::<i64>(
                    "INSERT INTO pgwatch.watches (tbl, label, channel, events, extra_columns, key_columns)
                     VALUES ($1::regclass, $2, $3, $4, $5, $6) RETURNING id",
                    &fields,
                )
                .ok()
                .flatten()
                .expect("INSERT ... RETURNING returns the id"),
            };
            let trigger = quote_identifier(trigger_name(id));
            let args: Vec<String> = [channel.clone(), display_name(&rel), keys.len().to_string()]
                .into_iter()
                .chain(keys.iter().cloned())
                .chain(extras.iter().cloned())
                .map(quote_literal)
                .collect();
            run(
                &format!(
                    "CREATE TRIGGER {trigger} AFTER {} ON {table} FOR EACH ROW EXECUTE FUNCTION pgwatch.capture({})",
                    events.trigger_clause(),
                    args.join(", ")
                ),
                &[],
            );
            // Dropped with the extension, and dumped with that dependency.
            run(&format!("ALTER TRIGGER {trigger} ON {table} DEPENDS ON EXTENSION pgwatch"), &[]);
            id
        })
    }
}

/// Removes the watch of `tbl` named `label`, or every watch of `tbl` when `label` is NULL, with
/// their triggers. Returns how many watches were removed.
#[pg_extern(volatile)]
#[search_path(pg_catalog, pg_temp)]
fn unwatch_table(tbl: Option<PgRelation>, label: default!(Option<&str>, "NULL")) -> i32 {
    let rel = watchable(tbl);
    let table = format!("{}.{}", quote_identifier(rel.namespace()), quote_identifier(rel.name()));
    as_extension_owner(|| {
        let ids: Vec<i64> = Spi::connect_mut(|client| {
            client
                .update(
                    "DELETE FROM pgwatch.watches WHERE tbl = $1::regclass AND ($2::text IS NULL OR label = $2)
                     RETURNING id",
                    None,
                    &[rel.oid().into(), label.into()],
                )?
                .map(|row| row.get::<i64>(1).map(Option::unwrap_or_default))
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap_or_else(|e| error!("pgwatch: {e}"));
        for &id in &ids {
            drop_trigger(id, &table);
        }
        ids.len() as i32
    })
}
