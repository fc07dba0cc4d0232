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
use pgrx::spi::quote_identifier;
use pgrx::{PgRelation, PgSqlErrorCode};

use crate::api::{channel_name, fail, MAX_CHANNEL_BYTES};
use crate::args;
use crate::events::{Event, Events};
use crate::payload::Op;
use crate::when::{self, Images, When};

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
    let owner = Spi::get_one::<pg_sys::Oid>(
        "SELECT extowner FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'pgwatch'",
    )
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

/// The id of the watch a trigger named `name` belongs to, if pgwatch names its triggers so:
/// `pgwatch_<id>_<event>`, or 0.1.0's `pgwatch_<id>`.
fn watch_id_of(name: &str) -> Option<i64> {
    let rest = name.strip_prefix("pgwatch_")?;
    let (id, event) = rest.split_once('_').unwrap_or((rest, ""));
    let known = event.is_empty() || Event::ALL.iter().any(|e| e.as_str() == event);
    (known && !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())).then(|| id.parse().ok()).flatten()
}

/// Whether trigger `name` on table `relid`, sending on `channel`, is one pgwatch made: a watch's
/// trigger on the watch's table (or a partition under it, which has a clone of it) that sends on
/// the watch's channel. A trigger of a user's own that runs `pgwatch.capture()` could otherwise
/// send on any channel, with its changes folded into those of the watch that owns it. Read once
/// per trigger and backend (see `plan`), never per row.
pub fn made_by_pgwatch(name: &str, relid: pg_sys::Oid, channel: &[u8]) -> bool {
    let Some(id) = watch_id_of(name) else { return false };
    with_safe_search_path(|| {
        as_extension_owner(|| {
            Spi::get_one_with_args::<bool>(
                "SELECT EXISTS (
                    SELECT FROM pgwatch.watches w
                     WHERE w.id OPERATOR(pg_catalog.=) $1
                       AND pg_catalog.convert_to(w.channel, pg_catalog.getdatabaseencoding()) OPERATOR(pg_catalog.=) $3
                       AND (w.tbl::pg_catalog.oid OPERATOR(pg_catalog.=) $2
                            OR w.tbl::pg_catalog.oid IN (SELECT a.relid::pg_catalog.oid
                                                           FROM pg_catalog.pg_partition_ancestors($2::pg_catalog.regclass) a)))",
                &[id.into(), relid.into(), channel.into()],
            )
            .unwrap_or_else(|e| error!("pgwatch: {e}"))
            .unwrap_or(false)
        })
    })
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
    /// `pg_trigger.tgtype`.
    tgtype: u32,
    /// It runs `pgwatch.capture()`.
    captures: bool,
    /// Its WHEN, as PostgreSQL stored it (`pg_trigger.tgqual`).
    qual: Option<String>,
}

impl Existing {
    /// Whether this is the row trigger pgwatch makes for `event`: only such a trigger's WHEN is
    /// taken over (a WHEN on another kind of trigger could read a row that is not there).
    fn is_row_trigger_for(&self, event: Event) -> bool {
        let bit = match event {
            Event::Row(Op::Insert) => pg_sys::TRIGGER_TYPE_INSERT,
            Event::Row(Op::Update) => pg_sys::TRIGGER_TYPE_UPDATE,
            Event::Row(Op::Delete) => pg_sys::TRIGGER_TYPE_DELETE,
            Event::Truncate => return false,
        };
        let timing = pg_sys::TRIGGER_TYPE_BEFORE | pg_sys::TRIGGER_TYPE_INSTEAD;
        let events = pg_sys::TRIGGER_TYPE_INSERT
            | pg_sys::TRIGGER_TYPE_UPDATE
            | pg_sys::TRIGGER_TYPE_DELETE
            | pg_sys::TRIGGER_TYPE_TRUNCATE;
        self.captures
            && self.tgtype & pg_sys::TRIGGER_TYPE_ROW != 0
            && self.tgtype & timing == 0
            && self.tgtype & events == bit
    }
}

/// The triggers of watch `id` on its table.
fn existing_triggers(id: i64, tbl: pg_sys::Oid) -> Vec<Existing> {
    Spi::connect(|client| {
        client
            .select(
                "SELECT tgname::text, tgnargs::int4, tgargs, tgtype::int4, tgqual::text,
                        tgfoid OPERATOR(pg_catalog.=) 'pgwatch.capture()'::pg_catalog.regprocedure
                   FROM pg_catalog.pg_trigger
                  WHERE tgrelid = $1 AND tgname OPERATOR(pg_catalog.=) ANY($2)",
                None,
                &[tbl.into(), trigger_names(id).into()],
            )?
            .map(|row| {
                let name = row.get::<String>(1)?.unwrap_or_default();
                let count = row.get::<i32>(2)?.unwrap_or(0).max(0) as usize;
                let args = row.get::<Vec<u8>>(3)?.unwrap_or_default();
                // tgargs holds each argument followed by a NUL byte.
                let args = args.split(|&b| b == 0).take(count).map(|a| String::from_utf8_lossy(a).into_owned());
                let tgtype = row.get::<i32>(4)?.unwrap_or(0) as u32;
                let qual = row.get::<String>(5)?;
                let captures = row.get::<bool>(6)?.unwrap_or(false);
                let per_row = tgtype & pg_sys::TRIGGER_TYPE_ROW != 0;
                Ok(Existing { name, args: args.collect(), per_row, tgtype, captures, qual })
            })
            .collect::<Result<Vec<_>, pgrx::spi::SpiError>>()
    })
    .unwrap_or_else(|e| error!("pgwatch: {e}"))
}

/// The WHEN of each event's trigger, as the triggers of watch `id` on `rel` have them now: what a
/// rebuild of those triggers keeps (see `when`). A WHEN is taken only from pgwatch's own row
/// trigger of the same event, and checked to read only the rows that event has; refused when a
/// trigger that must have one has none that passes.
fn existing_whens(id: i64, watch: &Watch, rel: &PgRelation, existing: &[Existing]) -> Vec<(Event, Option<When>)> {
    watch
        .events
        .iter()
        .map(|event| {
            let trigger = existing.iter().find(|t| t.name == trigger_name(id, event) && t.is_row_trigger_for(event));
            let needs_when = match event {
                Event::Truncate => false,
                Event::Row(op) => watch.condition.is_some() || (op == Op::Update && !watch.trigger_columns.is_empty()),
            };
            let images = match event {
                Event::Row(op) => Images { old: op != Op::Insert, new: op != Op::Delete },
                Event::Truncate => Images { old: false, new: false },
            };
            // SAFETY: a stored WHEN of a trigger on `rel`.
            let when = trigger.and_then(|t| t.qual.as_deref()).map(|qual| unsafe { When::from_stored(qual) });
            let when = when.filter(|when| when::reads_only(*when, images));
            if when.is_none() && needs_when {
                fail(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!(
                        "the {} trigger of pgwatch watch {id} (channel \"{}\") of table {} is not the one pgwatch made",
                        event.as_str(),
                        watch.channel,
                        TableName::of(rel).display
                    ),
                    "define the watch again with watch_table(), or unwatch the table",
                );
            }
            (event, when)
        })
        .collect()
}

fn drop_triggers(id: i64, tbl: pg_sys::Oid, table: &TableName) {
    for trigger in existing_triggers(id, tbl) {
        run(&format!("DROP TRIGGER {} ON {}", quote_identifier(trigger.name), table.quoted), &[]);
    }
}

/// Installs one trigger per event of watch `id` on table `tbl`, each with the WHEN `whens` gives
/// for its event; `table_needs_rows` is what [`needs_row_triggers`] says of the table. The table
/// must not be open in this backend: `ALTER TABLE` refuses a table in use.
fn create_triggers(
    id: i64,
    watch: &Watch,
    tbl: pg_sys::Oid,
    table: &TableName,
    table_needs_rows: bool,
    whens: &[(Event, Option<When>)],
) {
    let args = trigger_args(watch, &table.display);
    for &(event, when) in whens {
        let name = trigger_name(id, event);
        let per_row = watch.fires_per_row(event, table_needs_rows);
        // Only a row trigger has a WHEN (a watch with one never gets statement triggers).
        let when = when.filter(|_| per_row);
        let update_of = match event {
            Event::Row(Op::Update) if per_row => &watch.trigger_columns[..],
            _ => &[],
        };
        // SAFETY: the table exists and is locked by this transaction (see save and follow).
        unsafe { create_trigger(tbl, &name, event, per_row, update_of, when, &args) };
        if watch.fire_on_replica {
            run(&format!("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}", table.quoted, quote_identifier(&name)), &[]);
        }
    }
}

/// Creates one trigger of pgwatch's: `AFTER <event> [OF update_of] ON tbl FOR EACH ROW|STATEMENT
/// [REFERENCING ...] [WHEN when] EXECUTE FUNCTION pgwatch.capture(args)`, depending on the
/// extension (dropped with it, dumped with that dependency). Made from parse nodes, not SQL text,
/// so that `when` goes in as the expression tree it is (see `when`); its dependencies (columns,
/// functions, operators) are recorded as CREATE TRIGGER records them.
///
/// # Safety
/// `tbl` must be an existing table this transaction has locked.
unsafe fn create_trigger(
    tbl: pg_sys::Oid,
    name: &str,
    event: Event,
    per_row: bool,
    update_of: &[String],
    when: Option<When>,
    args: &[String],
) {
    let cstring = |text: &str| {
        let text = std::ffi::CString::new(text).expect("names and trigger arguments hold no NUL byte");
        // SAFETY: copies the string into the current memory context.
        unsafe { pg_sys::pstrdup(text.as_ptr()) }
    };
    let strings = |items: &mut dyn Iterator<Item = &str>| {
        let mut list = pgrx::PgList::<pg_sys::Node>::new();
        // SAFETY: a String (Value) node of a copied string.
        items.for_each(|item| list.push(unsafe { pg_sys::makeString(cstring(item)) }.cast()));
        list.into_pg()
    };
    // SAFETY: a CreateTrigStmt filled in as the grammar fills one in for CREATE TRIGGER, passed to
    // the function CREATE TRIGGER runs, with the WHEN already resolved; then the dependencies that
    // CreateTrigger records only for a WHEN it resolves itself.
    unsafe {
        let mut stmt = pgrx::PgBox::<pg_sys::CreateTrigStmt>::alloc_node(pg_sys::NodeTag::T_CreateTrigStmt);
        stmt.trigname = cstring(name);
        let rel = PgRelation::with_lock(tbl, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        stmt.relation = pg_sys::makeRangeVar(cstring(rel.namespace()), cstring(rel.name()), -1);
        stmt.funcname = strings(&mut ["pgwatch", "capture"].into_iter());
        stmt.args = strings(&mut args.iter().map(String::as_str));
        stmt.row = per_row;
        stmt.timing = pg_sys::TRIGGER_TYPE_AFTER as i16;
        stmt.events = match event {
            Event::Row(Op::Insert) => pg_sys::TRIGGER_TYPE_INSERT,
            Event::Row(Op::Update) => pg_sys::TRIGGER_TYPE_UPDATE,
            Event::Row(Op::Delete) => pg_sys::TRIGGER_TYPE_DELETE,
            Event::Truncate => pg_sys::TRIGGER_TYPE_TRUNCATE,
        } as i16;
        stmt.columns = strings(&mut update_of.iter().map(String::as_str));
        if let (false, Event::Row(op)) = (per_row, event) {
            let mut transitions = pgrx::PgList::<pg_sys::Node>::new();
            let tables: &[(&std::ffi::CStr, bool)] = match op {
                Op::Insert => &[(c"pgwatch_new", true)],
                Op::Update => &[(c"pgwatch_old", false), (c"pgwatch_new", true)],
                Op::Delete => &[(c"pgwatch_old", false)],
            };
            for &(table, is_new) in tables {
                let mut transition =
                    pgrx::PgBox::<pg_sys::TriggerTransition>::alloc_node(pg_sys::NodeTag::T_TriggerTransition);
                transition.name = pg_sys::pstrdup(table.as_ptr());
                transition.isNew = is_new;
                transition.isTable = true;
                transitions.push(transition.into_pg().cast());
            }
            stmt.transitionRels = transitions.into_pg();
        }
        let when = when.map_or(std::ptr::null_mut(), When::as_ptr);
        let trigger = pg_sys::CreateTrigger(
            stmt.into_pg(),
            c"pgwatch".as_ptr(),
            tbl,
            pg_sys::InvalidOid,
            pg_sys::InvalidOid,
            pg_sys::InvalidOid,
            pg_sys::InvalidOid,
            pg_sys::InvalidOid,
            when,
            false,
            false,
        );
        if !when.is_null() {
            let pstate = crate::when::old_and_new(&rel);
            pg_sys::recordDependencyOnExpr(
                &trigger,
                when,
                (*pstate).p_rtable,
                pg_sys::DependencyType::DEPENDENCY_NORMAL,
            );
            pg_sys::free_parsestate(pstate);
        }
        let extension = pg_sys::ObjectAddress {
            classId: pg_sys::ExtensionRelationId,
            objectId: pg_sys::get_extension_oid(c"pgwatch".as_ptr(), false),
            objectSubId: 0,
        };
        pg_sys::recordDependencyOn(&trigger, &extension, pg_sys::DependencyType::DEPENDENCY_AUTO_EXTENSION);
        drop(rel);
        pg_sys::CommandCounterIncrement();
    }
}

/// Refuses `watch`'s channel if another watch uses it, or if it is a label that names another
/// table (`schema.table`, the channel that table's watches get without a label): a channel carries
/// one watch's changes, so that its sequence numbers count them and no one takes another table's
/// channel through pgwatch. `id` is the watch's own, when it exists; a watch being replaced is
/// the one of its table and label. The unique index on the channel (`sql/bootstrap.sql`) settles
/// a race with a concurrent definition; this check words the refusal.
fn claim_channel(watch: &Watch, table: &TableName, id: Option<i64>) {
    let taken = Spi::get_two_with_args::<i64, String>(
        "SELECT w.id, w.tbl::text
           FROM (SELECT) AS one
           LEFT JOIN LATERAL (SELECT id, tbl FROM pgwatch.watches
                               WHERE channel = $1 AND ($3::int8 IS NULL OR id <> $3)
                                 AND ($3::int8 IS NOT NULL OR NOT (tbl = $2::oid AND label IS NOT DISTINCT FROM $4))
                               ORDER BY id LIMIT 1) AS w ON true",
        &[watch.channel.as_str().into(), watch.tbl.into(), id.into(), watch.label.as_deref().into()],
    )
    .unwrap_or_else(|e| error!("pgwatch: {e}"));
    if let (Some(id), tbl) = taken {
        fail(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            format!(
                "channel \"{}\" is already used by pgwatch watch {id} of table {}",
                watch.channel,
                tbl.unwrap_or_default()
            ),
            &format!("a channel carries one watch's changes: give the watch of {} another label", table.display),
        );
    }
    if watch.label.is_none() {
        return;
    }
    let named = Spi::get_one_with_args::<String>(
        "SELECT (SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relkind IN ('r', 'p') AND c.oid <> $2::oid AND n.nspname || '.' || c.relname = $1
                  LIMIT 1)",
        &[watch.channel.as_str().into(), watch.tbl.into()],
    )
    .unwrap_or_else(|e| error!("pgwatch: {e}"));
    if let Some(other) = named {
        fail(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            format!("label \"{}\" is the channel of table {other}'s watches", watch.channel),
            "a label may not be another table's schema.table name: choose another label",
        );
    }
}

/// Stores `watch` (replacing the watch of its table and label, if any) and installs its
/// triggers, each event's with the WHEN `whens` gives (resolved by the caller, see `when`);
/// returns its id.
pub fn save(rel: PgRelation, watch: &Watch, whens: &[(Event, Option<When>)], shape: Shape) -> i64 {
    let table = TableName::of(&rel);
    let table_needs_rows = needs_row_triggers(&rel);
    drop(rel);
    as_extension_owner(|| {
        let _managing = Managing::start();
        run(&format!("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE", table.quoted), &[]);
        claim_channel(watch, &table, None);
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
        create_triggers(id, watch, watch.tbl, &table, table_needs_rows, whens);
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
    let moved = channel != watch.channel;
    changed |= moved;
    watch.channel = channel;
    if let Some(reserved) = reserved_column(&watch) {
        fail(
            PgSqlErrorCode::ERRCODE_RESERVED_NAME,
            format!(
                "cannot rename a column of table {} to \"{reserved}\": pgwatch watch {id} (channel \"{}\") sends it, and \"{reserved}\" names a member of its payload rows",
                table.display, watch.channel
            ),
            "choose another name, or watch the table with payload => 'compact' first",
        );
    }
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
    drop(rel);
    rebuild(id, &watch, &table, &existing, table_needs_rows, moved);
}

/// Makes the triggers of watch `id` again from `watch` (stored first, as it may have followed a
/// rename), keeping the WHEN each of its `existing` triggers has: the one way pgwatch remakes a
/// watch's triggers (following DDL, turning statement triggers into row triggers, upgrading).
/// `claim`: the channel changed, and must not be another table's.
fn rebuild(id: i64, watch: &Watch, table: &TableName, existing: &[Existing], table_needs_rows: bool, claim: bool) {
    let whens = {
        // SAFETY: the table exists (its watch does) and is locked by the DDL that led here.
        let rel = unsafe { PgRelation::with_lock(watch.tbl, pg_sys::AccessShareLock as pg_sys::LOCKMODE) };
        existing_whens(id, watch, &rel, existing)
    };
    as_extension_owner(|| {
        let _managing = Managing::start();
        if claim {
            claim_channel(watch, table, Some(id));
        }
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
        drop_triggers(id, watch.tbl, table);
        create_triggers(id, watch, watch.tbl, table, table_needs_rows, &whens);
    });
}

/// A column `watch` sends whose name is also the name of a member of its payload rows (`old`,
/// `partial`): in an object row the two could not be told apart. Compact rows are arrays, with
/// those members in a trailing object, so they can send any column.
pub fn reserved_column(watch: &Watch) -> Option<&str> {
    if watch.payload == PayloadMode::Compact {
        return None;
    }
    watch.keys.iter().chain(&watch.extras).map(String::as_str).find(|c| RESERVED_COLUMNS.contains(c))
}

/// The members of an object row besides its columns.
pub const RESERVED_COLUMNS: [&str; 2] = ["old", "partial"];

#[pg_schema]
mod pgwatch {
    use super::*;

    /// Whether pgwatch itself is running the current DDL (read by its event triggers).
    #[pg_extern(volatile)]
    fn managing() -> bool {
        MANAGING.get()
    }

    /// Makes the triggers of watch `id` again as this library makes them (statement triggers
    /// where they suffice, one argument each), keeping their WHEN conditions as they are: what
    /// `ALTER EXTENSION pgwatch UPDATE` does for the watches an earlier release made. Needs what
    /// watching the table needs.
    #[pg_extern(volatile)]
    #[search_path(pg_catalog, pg_temp)]
    fn renew_watch(id: i64) {
        let Some(watch) = load(id) else {
            fail(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                format!("pgwatch watch {id} does not exist"),
                "see pgwatch.watches",
            );
        };
        // SAFETY: the watched table exists (DROP TABLE removes its watches); locked for reading.
        let rel = unsafe { PgRelation::with_lock(watch.tbl, pg_sys::AccessShareLock as pg_sys::LOCKMODE) };
        let table = TableName::of(&rel);
        crate::api::check_may_watch(&rel);
        if let Some(deferrable) = deferrable_primary_key(watch.tbl) {
            fail(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("the primary key of table {deferrable} is deferrable"),
                "pgwatch folds a transaction's changes per key, which needs keys unique after every row: make the key NOT DEFERRABLE",
            );
        }
        let existing = existing_triggers(id, watch.tbl);
        let table_needs_rows = needs_row_triggers(&rel);
        drop(rel);
        rebuild(id, &watch, &table, &existing, table_needs_rows, false);
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
        let (schemas, tables) = (of_type(&["schema"]), of_type(&["table", "table column", "foreign table"]));
        // A trigger created on a watched table may change what kind of triggers its watches need.
        let triggers = of_type(&["trigger"]);
        // So are a changed table's partition ancestors (a partition attached further down a
        // watched tree is theirs), and a watched parent or child of a changed table that still
        // has pgwatch's statement triggers: a parent that just gained a child (CREATE TABLE ...
        // INHERITS, also inside CREATE SCHEMA; a foreign table's INHERITS) or a child whose
        // command the ddl_command_start trigger did not see. Only tables the command touched
        // lead to watches: one user's tables never make another user's DDL do work, or fail.
        let ids: Vec<i64> = column(
            "SELECT w.id FROM pgwatch.watches w JOIN pg_catalog.pg_class c ON c.oid = w.tbl
              WHERE c.relnamespace = ANY($1) OR c.oid = ANY($2)
                 OR c.oid IN (SELECT a.relid FROM unnest($2::pg_catalog.oid[]) AS t(oid),
                                                  pg_catalog.pg_partition_ancestors(t.oid) AS a)
                 OR c.oid IN (SELECT tgrelid FROM pg_catalog.pg_trigger WHERE oid = ANY($3))
                 OR (c.oid IN (SELECT i.inhparent FROM pg_catalog.pg_inherits i WHERE i.inhrelid = ANY($2)
                               UNION ALL
                               SELECT i.inhrelid FROM pg_catalog.pg_inherits i WHERE i.inhparent = ANY($2))
                     AND EXISTS (SELECT FROM pg_catalog.pg_trigger t
                                  WHERE t.tgrelid = c.oid AND t.tgname = ANY(ARRAY['pgwatch_' || w.id || '_insert',
                                                          'pgwatch_' || w.id || '_update', 'pgwatch_' || w.id || '_delete'])
                                    AND (t.tgtype::int4 & $4) = 0))
              ORDER BY w.id",
            &[schemas.into(), tables.into(), triggers.into(), (pg_sys::TRIGGER_TYPE_ROW as i32).into()],
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
        let existing = existing_triggers(id, relid);
        if existing.iter().all(|t| t.per_row || t.name == truncate) {
            continue;
        }
        // SAFETY: the table exists (its watch's triggers do); ALTER TABLE locks it next.
        let rel = unsafe { PgRelation::with_lock(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE) };
        let table = TableName::of(&rel);
        drop(rel);
        rebuild(id, &watch, &table, &existing, true, false);
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

#[cfg(test)]
mod tests {
    use super::watch_id_of;

    #[test]
    fn only_the_names_pgwatch_gives_its_triggers_name_a_watch() {
        assert_eq!(watch_id_of("pgwatch_12_update"), Some(12));
        assert_eq!(watch_id_of("pgwatch_7"), Some(7));
        assert_eq!(watch_id_of("pgwatch_7_truncate"), Some(7));
        for name in [
            "pgwatch_",
            "pgwatch_x_insert",
            "pgwatch_1_upsert",
            "pgwatch_1_insert_",
            "evil",
            "pgwatch_-1",
            "pgwatch_1 ",
        ] {
            assert_eq!(watch_id_of(name), None, "{name}");
        }
    }
}
