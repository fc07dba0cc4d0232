//! The catalog of watches (`pgwatch.watches`) and the triggers that carry each watch out, kept in
//! step with each other and with DDL on watched tables.
//!
//! A watch installs one trigger per event, `pgwatch_<id>_<event>`, whose arguments hold what the
//! row trigger needs (channel, table name, key and extra column names; see `plan`), whose
//! `UPDATE OF` and `WHEN` hold the trigger columns and the condition. Renaming a watched table or
//! column rebuilds the triggers with the new names; DDL that would break a watch is refused (see
//! `sql/bootstrap.sql`). This module runs only when a watch is defined or a watched table's
//! definition changes: it is the only place pgwatch uses SPI, never per row.

use std::cell::Cell;
use std::collections::BTreeSet;

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, quote_literal};
use pgrx::{PgRelation, PgSqlErrorCode};

use crate::api::{channel_name, fail, MAX_CHANNEL_BYTES};
use crate::args;
use crate::events::{Event, Events};
use crate::payload::Op;

/// Which values a watch may send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadMode {
    /// Key and extra columns.
    Full,
    /// Key columns only, for tables whose other values must not reach listeners.
    Keys,
    /// Key and extra columns, each row an array of values under the payload's `"cols"`.
    Compact,
}

impl PayloadMode {
    pub const ALL: [PayloadMode; 3] = [PayloadMode::Full, PayloadMode::Keys, PayloadMode::Compact];

    pub fn as_str(self) -> &'static str {
        match self {
            PayloadMode::Full => "full",
            PayloadMode::Keys => "keys",
            PayloadMode::Compact => "compact",
        }
    }
}

/// The catalog's columns: a database still on 0.1.0's SQL (before `ALTER EXTENSION pgwatch
/// UPDATE`) has only the first seven.
pub enum Shape {
    V0_1,
    Current,
}

/// A watch's definition.
pub struct Watch {
    pub tbl: pg_sys::Oid,
    pub label: Option<String>,
    pub channel: String,
    pub events: Events,
    pub keys: Vec<String>,
    pub extras: Vec<String>,
    pub trigger_columns: Vec<String>,
    pub condition: Option<String>,
    pub payload: PayloadMode,
    pub fire_on_replica: bool,
}

impl Watch {
    /// Whether `event`'s trigger fires per row, rather than once per statement over the
    /// statement's transition tables (cheaper per row): where the table needs it
    /// (`table_needs_rows`, see [`needs_row_triggers`]), and for what a statement trigger cannot
    /// express (a WHEN condition; UPDATE OF with transition tables; changes applied by logical
    /// replication, whose apply worker fires row triggers only).
    fn fires_per_row(&self, event: Event, table_needs_rows: bool) -> bool {
        match event {
            Event::Truncate => false,
            Event::Row(op) => {
                table_needs_rows
                    || self.condition.is_some()
                    || self.fire_on_replica
                    || (op == Op::Update && !self.trigger_columns.is_empty())
            }
        }
    }
}

/// A table's name as subscribers see it (`schema.table`) and as SQL needs it (quoted).
pub struct TableName {
    pub display: String,
    pub quoted: String,
}

impl TableName {
    pub fn of(rel: &PgRelation) -> TableName {
        TableName {
            display: format!("{}.{}", rel.namespace(), rel.name()),
            quoted: format!("{}.{}", quote_identifier(rel.namespace()), quote_identifier(rel.name())),
        }
    }
}

/// Whether the watches of `rel` need row triggers, because a statement trigger reading transition
/// tables would miss rows or see them out of order:
/// - partitions and inheritance children: a statement on the parent fires the parent's statement
///   triggers only, but the row triggers of every child it changes;
/// - partitioned tables and inheritance parents: their statement triggers' transition tables also
///   hold the children's rows, which the row triggers of 0.2.0 did not report;
/// - tables with other AFTER triggers on insert, update or delete (a self-referencing foreign
///   key's included), which may change the table again: a row trigger of theirs runs while the
///   statement's rows are still queued, a statement trigger named before `pgwatch_...` fires
///   before pgwatch's (statement triggers fire by name), and either way a statement trigger of
///   pgwatch would record their changes before the rows they follow.
fn needs_row_triggers(rel: &PgRelation) -> bool {
    // SAFETY: an open relation has its pg_class row, and a trigger descriptor when it has triggers.
    let (class, trigdesc) = unsafe { (&*rel.rd_rel, rel.trigdesc) };
    if class.relispartition || class.relhassubclass || class.relkind as u8 == pg_sys::RELKIND_PARTITIONED_TABLE {
        return true;
    }
    // Statement triggers need the DDL event triggers that 0.3.0's SQL adds, enabled always (a
    // database still on an older version's SQL keeps row triggers until ALTER EXTENSION UPDATE),
    // and a table that inherits nothing.
    let (capture, event_trigger, child) = Spi::get_three_with_args::<pg_sys::Oid, bool, bool>(
        "SELECT 'pgwatch.capture'::pg_catalog.regproc::oid,
                (SELECT count(*) FROM pg_catalog.pg_event_trigger
                  WHERE evtname IN ('pgwatch_ddl_command_start', 'pgwatch_ddl_command_end') AND evtenabled = 'A') = 2,
                EXISTS (SELECT FROM pg_catalog.pg_inherits WHERE inhrelid = $1)",
        &[rel.oid().into()],
    )
    .unwrap_or_else(|e| error!("pgwatch: {e}"));
    if !event_trigger.unwrap_or(false) || child.unwrap_or(true) {
        return true;
    }
    // SAFETY: a trigger descriptor holds numtriggers triggers.
    let triggers = match unsafe { trigdesc.as_ref() } {
        Some(desc) => unsafe { std::slice::from_raw_parts(desc.triggers, desc.numtriggers as usize) },
        None => &[],
    };
    triggers.iter().any(|t| {
        let tgtype = t.tgtype as u32;
        // SAFETY: a trigger's name is a NUL-terminated string.
        let name = unsafe { std::ffi::CStr::from_ptr(t.tgname) }.to_bytes();
        let fires_first = tgtype & pg_sys::TRIGGER_TYPE_ROW != 0 || name < &b"pgwatch_\x7f"[..];
        let after_change = tgtype & (pg_sys::TRIGGER_TYPE_BEFORE | pg_sys::TRIGGER_TYPE_INSTEAD) == 0
            && tgtype & (pg_sys::TRIGGER_TYPE_INSERT | pg_sys::TRIGGER_TYPE_UPDATE | pg_sys::TRIGGER_TYPE_DELETE) != 0
            && fires_first;
        // Internal triggers are foreign keys'; only a self-referencing one changes this table.
        after_change && Some(t.tgfoid) != capture && (!t.tgisinternal || t.tgconstrrelid == rel.oid())
    })
}

thread_local! {
    /// pgwatch itself is changing triggers: its event triggers let it.
    static MANAGING: Cell<bool> = const { Cell::new(false) };
}

/// Marks pgwatch's own DDL until dropped (also when an ERROR unwinds).
struct Managing(bool);

impl Managing {
    fn start() -> Managing {
        Managing(MANAGING.replace(true))
    }
}

impl Drop for Managing {
    fn drop(&mut self) {
        MANAGING.set(self.0);
    }
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

/// The first column of each row `query` returns (NULL as the type's default).
fn column<T: FromDatum + IntoDatum + Default>(query: &str, args: &[DatumWithOid<'_>]) -> Vec<T> {
    Spi::connect(|client| {
        client
            .select(query, None, args)?
            .map(|row| row.get::<T>(1).map(Option::unwrap_or_default))
            .collect::<Result<Vec<_>, _>>()
    })
    .unwrap_or_else(|e| error!("pgwatch: {e}"))
}

/// The table's primary key columns, in key order (none without a primary key); not the
/// columns an `INCLUDE` clause adds to its index.
pub fn primary_key(tbl: pg_sys::Oid) -> Vec<String> {
    column(
        "SELECT a.attname::text
           FROM pg_catalog.pg_index i,
                unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n),
                pg_catalog.pg_attribute a
          WHERE i.indrelid = $1 AND i.indisprimary AND k.n <= i.indnkeyatts
            AND a.attrelid = i.indrelid AND a.attnum = k.attnum
          ORDER BY k.n",
        &[tbl.into()],
    )
}

/// The table, or the first partition under it, whose primary key is deferrable. Its keys may
/// repeat until the check at the end of the statement or transaction, and coalescing, which finds
/// rows by key, would fold different rows together (`UPDATE ... SET id = id + 1` in key order).
/// A partition attached with a deferrable key is one: PostgreSQL does not compare deferrability.
pub fn deferrable_primary_key(tbl: pg_sys::Oid) -> Option<String> {
    Spi::get_one_with_args::<String>(
        "SELECT (SELECT pg_catalog.format('%I.%I', n.nspname, c.relname)
                   FROM (SELECT $1::pg_catalog.regclass AS relid, 0 AS level
                         UNION ALL  -- (empty for a table that is neither partition nor partitioned)
                         SELECT relid, level FROM pg_catalog.pg_partition_tree($1) WHERE level > 0) t
                   JOIN pg_catalog.pg_constraint k ON k.conrelid = t.relid AND k.contype = 'p' AND k.condeferrable
                   JOIN pg_catalog.pg_class c ON c.oid = t.relid
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                  ORDER BY t.level, c.relname
                  LIMIT 1)",
        &[tbl.into()],
    )
    .unwrap_or_else(|e| error!("pgwatch: {e}"))
}

/// The table's column names, in column order.
pub fn column_names(rel: &PgRelation) -> Vec<String> {
    rel.tuple_desc().iter().filter(|attr| !attr.is_dropped()).map(|attr| attr.name().to_string()).collect()
}

/// The trigger's arguments: one, holding what the trigger reads (see `plan`): channel, table
/// name, key count (marked ` compact` for a compact watch), key and extra columns.
fn trigger_args(watch: &Watch, display: &str) -> Vec<String> {
    let keys = match watch.payload {
        PayloadMode::Compact => format!("{} compact", watch.keys.len()),
        PayloadMode::Full | PayloadMode::Keys => watch.keys.len().to_string(),
    };
    let fields: Vec<String> = [watch.channel.clone(), display.to_string(), keys]
        .into_iter()
        .chain(watch.keys.iter().cloned())
        .chain(watch.extras.iter().cloned())
        .collect();
    vec![args::encode(&fields)]
}

fn trigger_name(id: i64, event: Event) -> String {
    format!("pgwatch_{id}_{}", event.as_str())
}

/// Every name a trigger of watch `id` can have; 0.1.0 named its one trigger `pgwatch_<id>`.
fn trigger_names(id: i64) -> Vec<String> {
    std::iter::once(format!("pgwatch_{id}")).chain(Event::ALL.map(|event| trigger_name(id, event))).collect()
}

/// A trigger of a watch as the catalog has it.
struct Existing {
    name: String,
    args: Vec<String>,
    per_row: bool,
}

/// The triggers of watch `id` on its table.
fn existing_triggers(id: i64, tbl: pg_sys::Oid) -> Vec<Existing> {
    Spi::connect(|client| {
        client
            .select(
                "SELECT tgname::text, tgnargs::int4, tgargs, (tgtype::int4 & 1) = 1 FROM pg_catalog.pg_trigger
                  WHERE tgrelid = $1 AND tgname = ANY($2)",
                None,
                &[tbl.into(), trigger_names(id).into()],
            )?
            .map(|row| {
                let name = row.get::<String>(1)?.unwrap_or_default();
                let count = row.get::<i32>(2)?.unwrap_or(0).max(0) as usize;
                let args = row.get::<Vec<u8>>(3)?.unwrap_or_default();
                // tgargs holds each argument followed by a NUL byte.
                let args = args.split(|&b| b == 0).take(count).map(|a| String::from_utf8_lossy(a).into_owned());
                let per_row = row.get::<bool>(4)?.unwrap_or(false);
                Ok(Existing { name, args: args.collect(), per_row })
            })
            .collect::<Result<Vec<_>, pgrx::spi::SpiError>>()
    })
    .unwrap_or_else(|e| error!("pgwatch: {e}"))
}

fn drop_triggers(id: i64, tbl: pg_sys::Oid, table: &TableName) {
    for trigger in existing_triggers(id, tbl) {
        run(&format!("DROP TRIGGER {} ON {}", quote_identifier(trigger.name), table.quoted), &[]);
    }
}

/// `OLD.c IS DISTINCT FROM NEW.c` for each trigger column: an update that changes none of them
/// sends nothing. A type without an equality operator (json, point, …) is compared as text.
fn comparisons(rel: &PgRelation, columns: &[String]) -> Vec<String> {
    let tupdesc = rel.tuple_desc();
    columns
        .iter()
        .map(|column| {
            let typid = tupdesc.iter().find(|a| !a.is_dropped() && a.name() == column).map(|a| a.type_oid().value());
            // SAFETY: a type cache lookup of an existing column's type.
            let comparable = typid.is_some_and(|typid| unsafe {
                (*pg_sys::lookup_type_cache(typid, pg_sys::TYPECACHE_EQ_OPR as i32)).eq_opr != pg_sys::Oid::INVALID
            });
            let column = quote_identifier(column);
            let cast = if comparable { "" } else { "::text" };
            format!("OLD.{column}{cast} IS DISTINCT FROM NEW.{column}{cast}")
        })
        .collect()
}

/// ` WHEN ((a) AND (b))`, or nothing without conditions. Each condition stands on lines of its
/// own, so that a trailing `--` comment in it ends there.
fn when_clause(conditions: &[String]) -> String {
    if conditions.is_empty() {
        return String::new();
    }
    let all: Vec<String> = conditions.iter().map(|c| format!("(\n{c}\n)")).collect();
    format!(" WHEN ({})", all.join(" AND "))
}

/// Installs one trigger per event of watch `id`; `changed` holds the [`comparisons`] of its
/// trigger columns, `table_needs_rows` what [`needs_row_triggers`] says of the table. The table
/// must not be open in this backend: `ALTER TABLE` refuses a table in use.
fn create_triggers(id: i64, watch: &Watch, table: &TableName, table_needs_rows: bool, changed: &[String]) {
    let args: Vec<String> = trigger_args(watch, &table.display).into_iter().map(quote_literal).collect();
    let args = args.join(", ");
    let condition: Vec<String> = watch.condition.iter().cloned().collect();
    for event in watch.events.iter() {
        let name = quote_identifier(trigger_name(id, event));
        let t = &table.quoted;
        let spec = match event {
            Event::Truncate => format!("AFTER TRUNCATE ON {t} FOR EACH STATEMENT"),
            Event::Row(op) if !watch.fires_per_row(event, table_needs_rows) => {
                let tables = match op {
                    Op::Insert => "NEW TABLE AS pgwatch_new",
                    Op::Update => "OLD TABLE AS pgwatch_old NEW TABLE AS pgwatch_new",
                    Op::Delete => "OLD TABLE AS pgwatch_old",
                };
                format!("AFTER {} ON {t} REFERENCING {tables} FOR EACH STATEMENT", op.as_str().to_uppercase())
            }
            Event::Row(Op::Update) => {
                let columns: Vec<String> = watch.trigger_columns.iter().map(quote_identifier).collect();
                let of = if columns.is_empty() { String::new() } else { format!(" OF {}", columns.join(", ")) };
                let changed = (!changed.is_empty()).then(|| changed.join(" OR "));
                let conditions: Vec<String> = changed.into_iter().chain(condition.iter().cloned()).collect();
                format!("AFTER UPDATE{of} ON {t} FOR EACH ROW{}", when_clause(&conditions))
            }
            Event::Row(op) => {
                format!("AFTER {} ON {t} FOR EACH ROW{}", op.as_str().to_uppercase(), when_clause(&condition))
            }
        };
        run(&format!("CREATE TRIGGER {name} {spec} EXECUTE FUNCTION pgwatch.capture({args})"), &[]);
        // Dropped with the extension, and dumped with that dependency.
        run(&format!("ALTER TRIGGER {name} ON {t} DEPENDS ON EXTENSION pgwatch"), &[]);
        if watch.fire_on_replica {
            run(&format!("ALTER TABLE {t} ENABLE ALWAYS TRIGGER {name}"), &[]);
        }
    }
}

/// Stores `watch` (replacing the watch of its table and label, if any) and installs its
/// triggers; returns its id.
pub fn save(rel: PgRelation, watch: &Watch, shape: Shape) -> i64 {
    let table = TableName::of(&rel);
    let table_needs_rows = needs_row_triggers(&rel);
    let changed = comparisons(&rel, &watch.trigger_columns);
    drop(rel);
    as_extension_owner(|| {
        let _managing = Managing::start();
        run(&format!("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE", table.quoted), &[]);
        let events: Vec<String> = watch.events.iter().map(|event| event.as_str().to_string()).collect();
        let fields: [DatumWithOid; 10] = [
            watch.tbl.into(),
            watch.label.as_deref().into(),
            watch.channel.as_str().into(),
            events.into(),
            watch.extras.clone().into(),
            watch.keys.clone().into(),
            watch.trigger_columns.clone().into(),
            watch.condition.as_deref().into(),
            watch.payload.as_str().into(),
            watch.fire_on_replica.into(),
        ];
        let (update, insert, fields) = match shape {
            Shape::V0_1 => (
                "UPDATE pgwatch.watches SET channel = $3, events = $4, extra_columns = $5, key_columns = $6
                  WHERE tbl = $1::regclass AND label IS NOT DISTINCT FROM $2 RETURNING id",
                "INSERT INTO pgwatch.watches (tbl, label, channel, events, extra_columns, key_columns)
                 VALUES ($1::regclass, $2, $3, $4, $5, $6) RETURNING id",
                &fields[..6],
            ),
            Shape::Current => (
                "UPDATE pgwatch.watches SET channel = $3, events = $4, extra_columns = $5, key_columns = $6,
                        trigger_columns = $7, condition = $8, payload = $9, fire_on_replica = $10
                  WHERE tbl = $1::regclass AND label IS NOT DISTINCT FROM $2 RETURNING id",
                "INSERT INTO pgwatch.watches (tbl, label, channel, events, extra_columns, key_columns,
                                              trigger_columns, condition, payload, fire_on_replica)
                 VALUES ($1::regclass, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
                &fields[..],
            ),
        };
        let replaced = Spi::get_one_with_args::<i64>(update, fields).ok().flatten();
        if let Some(id) = replaced {
            drop_triggers(id, watch.tbl, &table);
        }
        let id = replaced.unwrap_or_else(|| {
            Spi::get_one_with_args::<i64>(insert, fields).ok().flatten().expect("INSERT ... RETURNING returns the id")
        });
        create_triggers(id, watch, &table, table_needs_rows, &changed);
        id
    })
}

/// Removes the watch of `rel` named `label`, or all of them when `label` is NULL, with their
/// triggers; returns how many were removed.
pub fn remove(rel: &PgRelation, label: Option<&str>) -> i32 {
    let table = TableName::of(rel);
    as_extension_owner(|| {
        let _managing = Managing::start();
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
            drop_triggers(id, rel.oid(), &table);
        }
        ids.len() as i32
    })
}

/// The stored definition of watch `id`.
fn load(id: i64) -> Option<Watch> {
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT tbl::oid, label, channel, array_to_string(events, ','), key_columns, extra_columns,
                    trigger_columns, condition, payload, fire_on_replica
               FROM pgwatch.watches WHERE id = $1",
            None,
            &[id.into()],
        )?;
        let Some(row) = rows.into_iter().next() else { return Ok(None) };
        let events = row.get::<String>(4)?.unwrap_or_default();
        Ok(Some(Watch {
            tbl: row.get(1)?.unwrap_or(pg_sys::Oid::INVALID),
            label: row.get(2)?,
            channel: row.get(3)?.unwrap_or_default(),
            events: Events::parse(&events).unwrap_or_else(|_| error!("pgwatch: watch {id} has events {events}")),
            keys: row.get(5)?.unwrap_or_default(),
            extras: row.get(6)?.unwrap_or_default(),
            trigger_columns: row.get(7)?.unwrap_or_default(),
            condition: row.get(8)?,
            payload: {
                let payload = row.get::<String>(9)?.unwrap_or_default();
                PayloadMode::ALL.into_iter().find(|mode| mode.as_str() == payload).unwrap_or(PayloadMode::Full)
            },
            fire_on_replica: row.get(10)?.unwrap_or(false),
        }))
    })
    .unwrap_or_else(|e: pgrx::spi::SpiError| error!("pgwatch: {e}"))
}

/// One object a DDL command changed, as `pg_event_trigger_ddl_commands()` lists it.
struct Changed {
    objid: pg_sys::Oid,
    objsubid: i32,
    object_type: String,
}

fn ddl_commands() -> Vec<Changed> {
    Spi::connect(|client| {
        client
            .select("SELECT objid, objsubid, object_type FROM pg_catalog.pg_event_trigger_ddl_commands()", None, &[])?
            .map(|row| {
                Ok(Changed {
                    objid: row.get(1)?.unwrap_or(pg_sys::Oid::INVALID),
                    objsubid: row.get(2)?.unwrap_or(0),
                    object_type: row.get(3)?.unwrap_or_default(),
                })
            })
            .collect::<Result<Vec<_>, pgrx::spi::SpiError>>()
    })
    .unwrap_or_else(|e| error!("pgwatch: {e}"))
}

/// Whether a trigger of watch `id` refers to column `attnum` of `tbl` (in UPDATE OF or WHEN).
fn triggers_refer_to(id: i64, tbl: pg_sys::Oid, attnum: i32) -> bool {
    Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_trigger t ON t.oid = d.objid
                         WHERE d.classid = 'pg_catalog.pg_trigger'::regclass AND d.refclassid = 'pg_catalog.pg_class'::regclass
                           AND d.refobjid = $1 AND d.refobjsubid = $2 AND t.tgrelid = $1 AND t.tgname = ANY($3))",
        &[tbl.into(), attnum.into(), trigger_names(id).into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// Brings watch `id` in step with its table after `changes`: a renamed table, schema or watched
/// column is followed; a rename the watch cannot follow is refused with an ERROR.
fn follow(id: i64, changes: &[Changed]) {
    let Some(mut watch) = load(id) else { return };
    let existing = existing_triggers(id, watch.tbl);
    if !watch.events.iter().all(|event| existing.iter().any(|t| t.name == trigger_name(id, event))) {
        // Not all its triggers are there (yet): pg_restore creates them one by one, after the
        // table's other DDL.
        return;
    }
    // SAFETY: the table exists (its triggers do) and this transaction's DDL has it locked.
    let rel = unsafe { PgRelation::with_lock(watch.tbl, pg_sys::AccessShareLock as pg_sys::LOCKMODE) };
    let table = TableName::of(&rel);
    if let Some(deferrable) = deferrable_primary_key(watch.tbl) {
        // A partition attached with a deferrable key (the table's own key cannot become one,
        // see `sql/ddl.sql`).
        fail(
            PgSqlErrorCode::ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
            format!(
                "the primary key of table {deferrable} is deferrable: pgwatch watch {id} (channel \"{}\") of table {} needs keys unique after every row",
                watch.channel, table.display
            ),
            "attach only partitions whose primary key is not deferrable, or unwatch the table first",
        );
    }
    let renamed: Vec<(i32, String)> = changes
        .iter()
        .filter(|c| c.objid == watch.tbl && c.objsubid > 0 && c.object_type == "table column")
        .filter_map(|c| rel.tuple_desc().get(c.objsubid as usize - 1).map(|a| (c.objsubid, a.name().to_string())))
        .collect();
    if watch.condition.is_some() {
        if let Some((_, name)) = renamed.iter().find(|(attnum, _)| triggers_refer_to(id, watch.tbl, *attnum)) {
            fail(
                PgSqlErrorCode::ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
                format!(
                    "cannot rename column \"{name}\" of table {}: pgwatch watch {id} (channel \"{}\") has a condition that refers to it",
                    table.display, watch.channel
                ),
                "unwatch the table, rename the column, then watch it again with the condition written for the new name",
            );
        }
    }
    let columns = column_names(&rel);
    let listed = || watch.keys.iter().chain(&watch.extras).chain(&watch.trigger_columns);
    let missing: BTreeSet<String> = listed().filter(|c| !columns.contains(c)).cloned().collect();
    let mut changed = false;
    if let ([old], [(_, new)]) = (&missing.into_iter().collect::<Vec<_>>()[..], &renamed[..]) {
        for list in [&mut watch.keys, &mut watch.extras, &mut watch.trigger_columns] {
            list.iter_mut().filter(|c| *c == old).for_each(|c| c.clone_from(new));
        }
        changed = true;
    }
    let Some(channel) = channel_name(&table.display, watch.label.as_deref()) else {
        fail(
            PgSqlErrorCode::ERRCODE_NAME_TOO_LONG,
            format!(
                "the channel of pgwatch watch {id} would be \"{}\", longer than {MAX_CHANNEL_BYTES} bytes",
                table.display
            ),
            "give the watch a short label first: SELECT watch_table(..., label => 'short_name')",
        );
    };
    changed |= channel != watch.channel;
    watch.channel = channel;
    let args = trigger_args(&watch, &table.display);
    // The table's triggers or place in an inheritance tree may have changed what its watches need.
    let table_needs_rows = needs_row_triggers(&rel);
    let wanted = |trigger: &Existing| {
        watch.events.iter().any(|event| {
            trigger.name == trigger_name(id, event) && trigger.per_row == watch.fires_per_row(event, table_needs_rows)
        })
    };
    if !changed && existing.iter().all(|trigger| trigger.args == args && wanted(trigger)) {
        return;
    }
    let comparisons = comparisons(&rel, &watch.trigger_columns);
    drop(rel);
    as_extension_owner(|| {
        let _managing = Managing::start();
        run(
            "UPDATE pgwatch.watches SET channel = $2, key_columns = $3, extra_columns = $4, trigger_columns = $5
              WHERE id = $1",
            &[
                id.into(),
                watch.channel.as_str().into(),
                watch.keys.clone().into(),
                watch.extras.clone().into(),
                watch.trigger_columns.clone().into(),
            ],
        );
        drop_triggers(id, watch.tbl, &table);
        create_triggers(id, &watch, &table, table_needs_rows, &comparisons);
    });
}

#[pg_schema]
mod pgwatch {
    use super::*;

    /// Whether pgwatch itself is running the current DDL (read by its event triggers).
    #[pg_extern(volatile)]
    fn managing() -> bool {
        MANAGING.get()
    }

    /// Called at the end of DDL that can change a watched table (see `sql/ddl.sql`): watches
    /// follow renamed tables, schemas and columns, and get row triggers where the table now needs
    /// them (a new trigger, a new place in an inheritance tree).
    #[pg_extern(volatile)]
    #[search_path(pg_catalog, pg_temp)]
    fn follow_ddl() {
        if MANAGING.get() {
            return;
        }
        let changes = ddl_commands();
        let of_type = |kind: &[&str]| -> Vec<pg_sys::Oid> {
            changes.iter().filter(|c| kind.contains(&c.object_type.as_str())).map(|c| c.objid).collect()
        };
        let (schemas, tables) = (of_type(&["schema"]), of_type(&["table", "table column"]));
        // A trigger created on a watched table may change what kind of triggers its watches need.
        let triggers = of_type(&["trigger"]);
        // So are a changed table's partition ancestors (a partition attached further down a
        // watched tree is theirs), and any watched table in an inheritance tree that still has
        // statement triggers: a parent that just gained a child (CREATE TABLE ... INHERITS, also
        // inside CREATE SCHEMA; a foreign table's INHERITS) or a child whose command the
        // ddl_command_start trigger did not see.
        let ids: Vec<i64> = column(
            "SELECT w.id FROM pgwatch.watches w JOIN pg_catalog.pg_class c ON c.oid = w.tbl
              WHERE c.relnamespace = ANY($1) OR c.oid = ANY($2)
                 OR c.oid IN (SELECT a.relid FROM unnest($2::pg_catalog.oid[]) AS t(oid),
                                                  pg_catalog.pg_partition_ancestors(t.oid) AS a)
                 OR c.oid IN (SELECT tgrelid FROM pg_catalog.pg_trigger WHERE oid = ANY($3))
                 OR ((c.relispartition OR c.relhassubclass
                      OR EXISTS (SELECT FROM pg_catalog.pg_inherits i WHERE i.inhrelid = c.oid))
                     AND EXISTS (SELECT FROM pg_catalog.pg_trigger t
                                  WHERE t.tgrelid = c.oid AND t.tgfoid = 'pgwatch.capture'::pg_catalog.regproc
                                    AND (t.tgtype::int4 & 1) = 0 AND (t.tgtype::int4 & 28) <> 0))
              ORDER BY w.id",
            &[schemas.into(), tables.into(), triggers.into()],
        );
        for id in ids {
            follow(id, &changes);
        }
    }
}

/// Gives the watches of `relid`, a table about to become a partition or an inheritance child, row
/// triggers in place of statement triggers (see [`needs_row_triggers`]). It must happen before the
/// command: PostgreSQL 13 refuses to attach or inherit a table that has triggers with transition
/// tables.
fn use_row_triggers(relid: pg_sys::Oid) {
    // Only for a user who may run the command (it needs ownership): anyone else's fails anyway,
    // and should not lock the table for a rebuild first.
    let ids: Vec<i64> = column(
        "SELECT w.id FROM pgwatch.watches w JOIN pg_catalog.pg_class c ON c.oid = w.tbl
          WHERE w.tbl = $1 AND pg_catalog.pg_has_role(c.relowner, 'USAGE') ORDER BY w.id",
        &[relid.into()],
    );
    for id in ids {
        let Some(watch) = load(id) else { continue };
        let truncate = trigger_name(id, Event::Truncate);
        if existing_triggers(id, relid).iter().all(|t| t.per_row || t.name == truncate) {
            continue;
        }
        // SAFETY: the table exists (its watch's triggers do); ALTER TABLE locks it next.
        let rel = unsafe { PgRelation::with_lock(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE) };
        let table = TableName::of(&rel);
        let comparisons = comparisons(&rel, &watch.trigger_columns);
        drop(rel);
        as_extension_owner(|| {
            let _managing = Managing::start();
            drop_triggers(id, relid, &table);
            create_triggers(id, &watch, &table, true, &comparisons);
        });
    }
}

/// Runs `f` with `search_path = pg_catalog, pg_temp`, as pgwatch's SQL functions declare it: the
/// event trigger function below cannot declare it, since it resolves the command's table names.
/// The caller's setting comes back afterwards (and with the transaction's abort on an ERROR).
fn with_safe_search_path<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: a GUC nest level around one setting, popped below, as fmgr does for SET clauses.
    let level = unsafe {
        let level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        level
    };
    let result = f();
    // SAFETY: pops the nest level pushed above.
    unsafe { pg_sys::AtEOXact_GUC(true, level) };
    result
}

/// The `ddl_command_start` event trigger of ALTER TABLE (`pgwatch.on_ddl_command_start()`): a
/// watched table about to become a partition or an inheritance child gets row triggers first. It
/// needs the parse tree, which only a C function can read. (A watched parent that gains a child is
/// followed at `ddl_command_end`, in `follow_ddl`.)
///
/// # Safety
/// Called by PostgreSQL as an event trigger function.
#[unsafe(no_mangle)]
#[pg_guard]
pub unsafe extern "C-unwind" fn pgwatch_on_ddl_command_start(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: fcinfo is this call's; an event trigger's context is its EventTriggerData, checked
    // by tag before the cast, as is every node read below.
    unsafe {
        let context = (*fcinfo).context;
        if !pgrx::is_a(context, pg_sys::NodeTag::T_EventTriggerData) {
            fail(
                PgSqlErrorCode::ERRCODE_E_R_I_E_EVENT_TRIGGER_PROTOCOL_VIOLATED,
                "pgwatch.on_ddl_command_start() was not called as an event trigger".into(),
                "it is pgwatch's own ddl_command_start event trigger",
            );
        }
        let stmt = (*context.cast::<pg_sys::EventTriggerData>()).parsetree;
        if MANAGING.get() {
            return pg_sys::Datum::from(0);
        }
        let table = |rv: *mut pg_sys::RangeVar| {
            let relid = pg_sys::RangeVarGetRelidExtended(
                rv,
                pg_sys::NoLock as pg_sys::LOCKMODE,
                pg_sys::RVROption::RVR_MISSING_OK,
                None,
                std::ptr::null_mut(),
            );
            (relid != pg_sys::Oid::INVALID).then_some(relid)
        };
        let mut joining = Vec::new();
        if pgrx::is_a(stmt, pg_sys::NodeTag::T_AlterTableStmt) {
            let alter = stmt.cast::<pg_sys::AlterTableStmt>();
            for cmd in pgrx::PgList::<pg_sys::AlterTableCmd>::from_pg((*alter).cmds).iter_ptr() {
                let def = (*cmd).def;
                match (*cmd).subtype {
                    pg_sys::AlterTableType::AT_AttachPartition if pgrx::is_a(def, pg_sys::NodeTag::T_PartitionCmd) => {
                        joining.extend(table((*def.cast::<pg_sys::PartitionCmd>()).name));
                    }
                    pg_sys::AlterTableType::AT_AddInherit => joining.extend(table((*alter).relation)),
                    _ => {}
                }
            }
        }
        // Names were resolved with the command's search_path; pgwatch's own SQL runs with a safe
        // one.
        if !joining.is_empty() {
            with_safe_search_path(|| joining.into_iter().for_each(use_row_triggers));
        }
    }
    pg_sys::Datum::from(0)
}

/// Marks `pgwatch_on_ddl_command_start` as a version-1 C function.
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_pgwatch_on_ddl_command_start() -> &'static pg_sys::Pg_finfo_record {
    static V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}
