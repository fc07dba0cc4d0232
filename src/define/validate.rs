//! The arguments of `watch_table` and `unwatch_table`, checked and turned into a [`Watch`] with the
//! WHEN of each of its triggers. Bad input fails here, before anything is changed.

use pgrx::pgrx_sql_entity_graph::metadata::{ArgumentError, ReturnsError, ReturnsRef, SqlMappingRef, SqlTranslatable};
use pgrx::prelude::*;
use pgrx::{PgRelation, PgSqlErrorCode};

use super::store;
use super::when::{self, Images, When};
use crate::encode::packer::{cols_header, MAX_COLS_HEADER};
use crate::error::fail;
use crate::model::events::{Event, Events, EventsError, Op, ACCEPTED};
use crate::model::watch::{channel_name, PayloadMode, TableName, Watch, MAX_CHANNEL, RETAIN_RANGE};
use crate::text;

/// Most extra columns one watch may list.
pub const MAX_EXTRA_COLUMNS: usize = 64;

/// A `regclass` argument, not opened yet. (pgrx's `PgRelation` opens the relation while it reads
/// the argument, and an OID no relation has, such as `0::regclass`, fails there with XX000.)
pub struct RegClass(pg_sys::Oid);

impl FromDatum for RegClass {
    unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, _typoid: pg_sys::Oid) -> Option<RegClass> {
        // SAFETY: a regclass datum is an OID.
        (!is_null).then(|| RegClass(unsafe { pg_sys::Oid::from_datum(datum, false) }.unwrap_or(pg_sys::Oid::INVALID)))
    }
}

// SAFETY: read from a regclass datum by FromDatum, as pgrx reads PgRelation.
unsafe impl<'fcx> pgrx::callconv::ArgAbi<'fcx> for RegClass {
    unsafe fn unbox_arg_unchecked(arg: pgrx::callconv::Arg<'_, 'fcx>) -> Self {
        // SAFETY: the caller promised a non-null regclass argument.
        unsafe { arg.unbox_arg_using_from_datum() }.unwrap_or(RegClass(pg_sys::Oid::INVALID))
    }
}

// SAFETY: a regclass argument, as pgrx maps PgRelation.
unsafe impl SqlTranslatable for RegClass {
    const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!(RegClass);
    const TYPE_ORIGIN: pgrx::pgrx_sql_entity_graph::metadata::TypeOrigin =
        pgrx::pgrx_sql_entity_graph::metadata::TypeOrigin::External;
    const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> = Ok(SqlMappingRef::literal("regclass"));
    const RETURN_SQL: Result<ReturnsRef, ReturnsError> = Ok(ReturnsRef::One(SqlMappingRef::literal("regclass")));
}

/// The relation `tbl` names, open and locked for reading; 42P01 when there is none.
fn open(tbl: Option<RegClass>) -> PgRelation {
    let Some(RegClass(oid)) = tbl else {
        fail(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, "tbl must not be NULL".into(), "pass a table name");
    };
    open_oid(oid)
}

/// The relation `oid`, open and locked for reading; 42P01 when there is none (any more: a
/// catalog row read under an older snapshot may name a table dropped since).
pub fn open_oid(oid: pg_sys::Oid) -> PgRelation {
    // SAFETY: opens the relation if it exists, taking the lock PgRelation::with_lock takes.
    let rel = unsafe { pg_sys::try_relation_open(oid, pg_sys::AccessShareLock as pg_sys::LOCKMODE) };
    if rel.is_null() {
        fail(
            PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
            format!("relation with OID {} does not exist", oid.to_u32()),
            "pass a table name, e.g. 'public.users'",
        );
    }
    // SAFETY: the relation exists and is locked; PgRelation closes it with that lock (the lock
    // is counted, and held until the transaction ends).
    unsafe {
        pg_sys::relation_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        PgRelation::with_lock(oid, pg_sys::AccessShareLock as pg_sys::LOCKMODE)
    }
}

/// Refuses the current user unless they may watch `rel`: what CREATE TRIGGER needs, ownership or
/// the TRIGGER privilege.
pub fn check_may_watch(rel: &PgRelation) {
    // SAFETY: a plain ACL check of an existing relation for the current user.
    let allowed = unsafe { pg_sys::pg_class_aclcheck(rel.oid(), pg_sys::GetUserId(), pg_sys::ACL_TRIGGER as _) };
    if allowed != pg_sys::AclResult::ACLCHECK_OK {
        fail(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied to watch table {}", text::shown_relation(rel)),
            "watching needs what CREATE TRIGGER needs: ownership or the TRIGGER privilege on the table",
        );
    }
}

/// The table, checked to be watchable by the current user.
pub fn watchable(tbl: Option<RegClass>) -> PgRelation {
    let rel = open(tbl);
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
            format!("\"{}\" is not a table", text::shown_relation(&rel)),
            &format!("it is {kind}; pgwatch watches ordinary and partitioned tables"),
        );
    }
    // SAFETY: as above.
    if unsafe { (*rel.rd_rel).relpersistence } as u8 == pg_sys::RELPERSISTENCE_TEMP {
        // Its session's end drops it without event triggers, which would leave the watch behind.
        fail(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("temporary table \"{}\" cannot be watched", text::shown_relation(&rel)),
            "pgwatch watches ordinary (also unlogged) and partitioned tables",
        );
    }
    check_may_watch(&rel);
    rel
}

fn primary_key(rel: &PgRelation) -> Vec<String> {
    let keys = store::primary_key(rel);
    if keys.is_empty() {
        fail(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("table {} has no primary key", TableName::of(rel).display),
            "pgwatch identifies rows by their primary key: add one with ALTER TABLE ... ADD PRIMARY KEY",
        );
    }
    if let Some(table) = store::deferrable_primary_key(rel.oid()) {
        fail(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("the primary key of table {table} is deferrable"),
            "pgwatch folds a transaction's changes per key, which needs keys unique after every row: make the key NOT DEFERRABLE",
        );
    }
    keys
}

/// A list of column names of `rel`: each exists, is given once, and is not NULL.
fn column_list(rel: &PgRelation, argument: &str, requested: Option<Vec<Option<String>>>) -> Vec<String> {
    let existing = store::column_names(rel);
    let mut columns: Vec<String> = Vec::new();
    for column in requested.unwrap_or_default() {
        let Some(column) = column else {
            fail(
                PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
                format!("{argument} must not contain NULL"),
                "list column names",
            );
        };
        if !existing.contains(&column) {
            fail(
                PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                format!("column \"{column}\" of relation {} does not exist", TableName::of(rel).display),
                &format!("{argument} lists columns of the watched table, by their exact names"),
            );
        }
        if is_virtual_generated(rel, &column) {
            fail(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("column \"{column}\" is a virtual generated column"),
                &format!(
                    "PostgreSQL computes a virtual column only when a query reads it and gives triggers no value for it: make it STORED, or leave it out of {argument}"
                ),
            );
        }
        if columns.contains(&column) {
            fail(
                PgSqlErrorCode::ERRCODE_DUPLICATE_COLUMN,
                format!("column \"{column}\" is listed twice in {argument}"),
                "list each column once",
            );
        }
        columns.push(column);
    }
    columns
}

/// Whether `column` of `rel` is a virtual generated column (PostgreSQL 18 on).
fn is_virtual_generated(rel: &PgRelation, column: &str) -> bool {
    rel.tuple_desc().iter().any(|attr| text::column_name(rel, attr) == column && attr.attgenerated as u8 == b'v')
}

fn parse_extra_columns(rel: &PgRelation, keys: &[String], requested: Option<Vec<Option<String>>>) -> Vec<String> {
    let count = requested.as_ref().map_or(0, Vec::len);
    if count > MAX_EXTRA_COLUMNS {
        fail(
            PgSqlErrorCode::ERRCODE_TOO_MANY_COLUMNS,
            format!("a watch can list at most {MAX_EXTRA_COLUMNS} extra columns, not {count}"),
            "list only the columns subscribers filter on",
        );
    }
    let extras = column_list(rel, "extra_columns", requested);
    if let Some(key) = extras.iter().find(|column| keys.contains(column)) {
        fail(
            PgSqlErrorCode::ERRCODE_DUPLICATE_COLUMN,
            format!("column \"{key}\" is part of the primary key of {}", TableName::of(rel).display),
            "key columns are always sent: leave them out of extra_columns",
        );
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
    let display = TableName::of(rel).display;
    channel_name(&display, label).unwrap_or_else(|| {
        fail(
            PgSqlErrorCode::ERRCODE_NAME_TOO_LONG,
            format!("channel name \"{}\" is longer than {MAX_CHANNEL} bytes", label.unwrap_or(&display)),
            "pass a shorter label: watch_table(..., label => 'short_name'); the label is the channel",
        )
    })
}

fn parse_trigger_columns(rel: &PgRelation, events: Events, requested: Option<Vec<Option<String>>>) -> Vec<String> {
    let columns = column_list(rel, "trigger_columns", requested);
    if !columns.is_empty() && !events.has(Event::Row(Op::Update)) {
        fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "trigger_columns applies to updates, and this watch reports no updates".into(),
            "add 'update' to events, or leave trigger_columns out",
        );
    }
    columns
}

/// A WHEN condition: one SQL expression (see `when`), checked here and resolved by [`whens`].
fn parse_condition(events: Events, condition: Option<&str>) -> Option<String> {
    let condition = condition?;
    if condition.trim().is_empty() {
        fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "condition must not be empty".into(),
            "pass NULL to report every change",
        );
    }
    if !events.iter().any(|event| matches!(event, Event::Row(_))) {
        fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "a condition applies to row events, and this watch reports only truncate".into(),
            "leave condition out",
        );
    }
    Some(condition.to_string())
}

/// The WHEN of each of `watch`'s triggers: its condition, and for updates the comparisons of its
/// trigger columns, resolved now as the calling user (see `when`).
fn whens(rel: &PgRelation, watch: &Watch) -> Vec<(Event, Option<When>)> {
    let condition = watch.condition.as_deref().map(when::parse_condition);
    let row_condition = condition.map(|c| {
        // Checked against the events that have it: OLD is not there for inserts, NEW not for deletes.
        let (inserts, deletes) = (watch.events.has(Event::Row(Op::Insert)), watch.events.has(Event::Row(Op::Delete)));
        when::resolve(rel, c, Images { old: !inserts, new: !deletes })
    });
    let comparisons = when::comparisons(rel, &watch.update_columns());
    watch
        .trigger_events()
        .map(|event| {
            let when = match event {
                Event::Row(Op::Update) => match (comparisons, row_condition) {
                    (Some(changed), Some(condition)) => Some(changed.and(condition)),
                    (changed, condition) => changed.or(condition),
                },
                Event::Row(_) => row_condition,
                Event::Truncate => None,
            };
            (event, when)
        })
        .collect()
}

fn parse_payload(payload: Option<&str>, keys: &[String], extras: &[String]) -> PayloadMode {
    let Some(payload) = payload else {
        fail(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "payload must not be NULL".into(),
            "pass 'full', 'keys' or 'compact'",
        );
    };
    let lowered = payload.to_ascii_lowercase();
    let Some(mode) = PayloadMode::ALL.into_iter().find(|mode| mode.as_str() == lowered) else {
        fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("unknown payload \"{payload}\""),
            "payload accepts 'full' (key and extra columns), 'keys' (key columns only) or 'compact' (key and extra columns as arrays of values)",
        );
    };
    if mode == PayloadMode::Keys && !extras.is_empty() {
        fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "payload 'keys' sends key columns only, but extra_columns lists some".into(),
            "leave extra_columns out, or use payload 'full'",
        );
    }
    let names = keys.iter().chain(extras).map(String::as_str);
    if mode == PayloadMode::Compact && cols_header(names).is_err() {
        fail(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!("the column names of a compact payload take more than {} bytes", MAX_COLS_HEADER),
            "watch fewer extra columns, or use payload 'full'",
        );
    }
    mode
}

/// The arguments of `watch_table`, as SQL passes them (NULL as `None`).
pub struct WatchArgs<'a> {
    pub tbl: Option<RegClass>,
    pub events: Option<&'a str>,
    pub extra_columns: Option<Vec<Option<String>>>,
    pub label: Option<&'a str>,
    pub trigger_columns: Option<Vec<Option<String>>>,
    pub condition: Option<&'a str>,
    pub payload: Option<&'a str>,
    pub fire_on_replica: Option<bool>,
    /// `retain` in seconds (`extract(epoch FROM retain)`); `None`: NULL, payloads not kept.
    pub retain: Option<f64>,
}

/// How long a watch keeps its payloads, in microseconds: 1 second to 365 days, and only where
/// the delivery worker runs, which writes the log.
fn parse_retain(retain: Option<f64>) -> Option<i64> {
    let seconds = retain?;
    let (shortest, longest) = RETAIN_RANGE;
    let micros = seconds * 1e6;
    if !(shortest as f64..=longest as f64).contains(&micros) {
        fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("retain must be between 1 second and 365 days, not {seconds} seconds"),
            "pass an interval such as '1 hour', or NULL to keep no payloads",
        );
    }
    if crate::deliver::shmem::shared().is_none() {
        fail(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "retain needs pgwatch's delivery worker, which runs only when pgwatch is preloaded".into(),
            "add pgwatch to shared_preload_libraries in postgresql.conf and restart the server",
        );
    }
    Some(micros.round() as i64)
}

/// Checks the arguments of `watch_table` and makes the watch they describe, with the WHEN of each
/// of its triggers.
pub fn watch(args: WatchArgs<'_>) -> (PgRelation, Watch, Vec<(Event, Option<When>)>) {
    let WatchArgs { tbl, events, extra_columns, label, trigger_columns, condition, payload, fire_on_replica, retain } =
        args;
    let rel = watchable(tbl);
    let events = parse_events(events);
    let keys = primary_key(&rel);
    let extras = parse_extra_columns(&rel, &keys, extra_columns);
    let channel = channel(&rel, label);
    let trigger_columns = parse_trigger_columns(&rel, events, trigger_columns);
    let condition = parse_condition(events, condition);
    let payload = parse_payload(payload, &keys, &extras);
    let retain = parse_retain(retain);
    let Some(fire_on_replica) = fire_on_replica else {
        fail(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "fire_on_replica must not be NULL".into(),
            "pass true or false",
        );
    };
    let watch = Watch {
        tbl: rel.oid(),
        label: label.map(str::to_string),
        channel,
        events,
        keys,
        extras,
        trigger_columns,
        condition,
        payload,
        fire_on_replica,
        retain,
    };
    if let Some(reserved) = watch.reserved_column() {
        fail(
            PgSqlErrorCode::ERRCODE_RESERVED_NAME,
            format!(
                "column \"{reserved}\" of table {} cannot be sent in object rows: \"{reserved}\" names a member of the payload's rows",
                TableName::of(&rel).display
            ),
            "watch the table with payload => 'compact', whose rows are arrays, or leave the column out of extra_columns",
        );
    }
    let whens = whens(&rel, &watch);
    (rel, watch, whens)
}
