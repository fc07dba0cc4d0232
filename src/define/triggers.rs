//! The triggers of a watch: their names, reading them from the catalog (with the WHEN each keeps),
//! whether a table needs row triggers, and making and dropping them.
//!
//! A watch installs one trigger per event, `pgwatch_<id>_<event>`, whose one argument holds what
//! the trigger needs (see `model::trigger_arg`), whose `UPDATE OF` and `WHEN` hold the trigger
//! columns and the condition; on a partitioned table or a partition, also a trigger per move
//! event under the same name (see `Watch::move_events`).

use pgrx::prelude::*;
use pgrx::spi::quote_identifier;
use pgrx::{PgRelation, PgSqlErrorCode};

use super::owner::{first, run};
use super::when::{self, Images, When};
use crate::error::{self, fail};
use crate::model::events::{Event, Op};
use crate::model::trigger_arg::{Moves, TriggerArg};
use crate::model::watch::{TableName, Watch};

pub fn trigger_name(id: i64, event: Event) -> String {
    format!("pgwatch_{id}_{}", event.as_str())
}

/// The name of watch `id`'s trigger that clears what its insert trigger left of a move (see
/// `Moves::Clear`): it sorts after `pgwatch_<id>_insert`, and triggers of one event fire by name.
pub fn clearing_name(id: i64) -> String {
    format!("pgwatch_{id}_{CLEARING}")
}

const CLEARING: &str = "moved";

/// Every name a trigger of watch `id` can have; 0.1.0 named its one trigger `pgwatch_<id>`.
pub fn trigger_names(id: i64) -> Vec<String> {
    std::iter::once(format!("pgwatch_{id}"))
        .chain(Event::ALL.map(|event| trigger_name(id, event)))
        .chain(std::iter::once(clearing_name(id)))
        .collect()
}

/// The id of the watch a trigger named `name` belongs to, if pgwatch names its triggers so:
/// `pgwatch_<id>_<event>`, `pgwatch_<id>_moved`, or 0.1.0's `pgwatch_<id>`.
pub fn watch_id_of(name: &str) -> Option<i64> {
    let rest = name.strip_prefix("pgwatch_")?;
    let (id, event) = rest.split_once('_').unwrap_or((rest, ""));
    let known = event.is_empty() || event == CLEARING || Event::ALL.iter().any(|e| e.as_str() == event);
    (known && !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())).then(|| id.parse().ok()).flatten()
}

/// Whether a trigger of pgwatch's on one of `tables` (of watch `id`, or of any watch) is not
/// firing for ordinary writes, or, with `fire_on_replica`, for replicated ones: disabled, set to
/// fire only on replicas, or (with `fire_on_replica`) only at the origin. What it missed was never
/// sent.
pub fn silenced(tables: &[pg_sys::Oid], id: Option<i64>, fire_on_replica: bool) -> bool {
    let silenced = first::<bool>(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_trigger
                         WHERE tgrelid OPERATOR(pg_catalog.=) ANY ($1)
                           AND CASE WHEN $2::pg_catalog.int8 IS NULL
                                    THEN pg_catalog.left(tgname::pg_catalog.text, 8) OPERATOR(pg_catalog.=) 'pgwatch_'
                                    ELSE tgname OPERATOR(pg_catalog.~) ('^pgwatch_' OPERATOR(pg_catalog.||) $2
                                                                        OPERATOR(pg_catalog.||) '(_[a-z]+)?$') END
                           AND (tgenabled OPERATOR(pg_catalog.=) ANY ('{D,R}'::pg_catalog.\"char\"[])
                                OR (tgenabled OPERATOR(pg_catalog.=) 'O' AND $3)))",
        &[tables.to_vec().into(), id.into(), fire_on_replica.into()],
    );
    silenced == Some(true)
}

/// A trigger of a watch as the catalog has it.
pub struct Existing {
    pub name: String,
    pub args: Vec<String>,
    pub per_row: bool,
    /// `pg_trigger.tgtype`.
    tgtype: u32,
    /// It runs `pgwatch.capture()`.
    captures: bool,
    /// Its WHEN, as PostgreSQL stored it (`pg_trigger.tgqual`).
    qual: Option<Vec<u8>>,
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
pub fn existing_triggers(id: i64, tbl: pg_sys::Oid) -> Vec<Existing> {
    Spi::connect(|client| {
        client
            .select(
                "SELECT tgname::text, tgnargs::int4, tgargs, tgtype::int4,
                        -- As bytes: names in it (a named argument's) need not be readable text.
                        pg_catalog.convert_to(tgqual::text, pg_catalog.getdatabaseencoding()),
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
                let qual = row.get::<Vec<u8>>(5)?;
                let captures = row.get::<bool>(6)?.unwrap_or(false);
                let per_row = tgtype & pg_sys::TRIGGER_TYPE_ROW != 0;
                Ok(Existing { name, args: args.collect(), per_row, tgtype, captures, qual })
            })
            .collect::<Result<Vec<_>, pgrx::spi::SpiError>>()
    })
    .unwrap_or_else(|e| error::spi_failed("pg_trigger", e))
}

/// The WHEN of each event's trigger, as the triggers of watch `id` on `rel` have them now: what a
/// rebuild of those triggers keeps (see `when`). A WHEN is taken only from pgwatch's own row
/// trigger of the same event, and checked to read only the rows that event has; refused when a
/// trigger that must have one has none that passes.
pub fn existing_whens(id: i64, watch: &Watch, rel: &PgRelation, existing: &[Existing]) -> Vec<(Event, Option<When>)> {
    watch
        .trigger_events()
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

/// Whether a trigger of watch `id` refers to column `attnum` of `tbl` (in UPDATE OF or WHEN).
pub fn triggers_refer_to(id: i64, tbl: pg_sys::Oid, attnum: i32) -> bool {
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
pub fn needs_row_triggers(rel: &PgRelation) -> bool {
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
    .unwrap_or_else(|e| error::spi_failed("pg_trigger", e));
    if !event_trigger.unwrap_or(false) || child.unwrap_or(true) {
        return true;
    }
    // SAFETY: a trigger descriptor holds numtriggers triggers.
    let triggers = match unsafe { trigdesc.as_ref() } {
        // SAFETY: as above.
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

pub fn drop_triggers(id: i64, tbl: pg_sys::Oid, table: &TableName) {
    for trigger in existing_triggers(id, tbl) {
        run(&format!("DROP TRIGGER {} ON {}", quote_identifier(trigger.name), table.quoted), &[]);
    }
}

/// What [`create_triggers`] needs to know of `rel`: whether it needs row triggers (see
/// [`needs_row_triggers`]), and whether rows can move between partitions of it or into and out of
/// it (a partitioned table, or a partition; see `Watch::move_events`).
pub fn placement(rel: &PgRelation) -> (bool, bool) {
    // SAFETY: an open relation has its pg_class row.
    let class = unsafe { &*rel.rd_rel };
    let moving_rows = class.relispartition || class.relkind as u8 == pg_sys::RELKIND_PARTITIONED_TABLE;
    (needs_row_triggers(rel), moving_rows)
}

/// Whether a watch of a table so placed gets the insert trigger of its move events. A watch of a
/// partition sees the delete half of a row moved out of it, but the insert half lands where it
/// has no trigger, and an insert it does see may be another row's: it pairs inserts only without
/// a condition, under a partitioned table of its own (a leaf has nothing below).
pub fn pairs_moved_inserts(watch: &Watch, partition: bool, partitioned: bool) -> bool {
    !partition || watch.condition.is_none() && partitioned
}

/// Installs one trigger per event of watch `id` on table `tbl`, each with the WHEN `whens` gives
/// for its event; `table_needs_rows` is what [`needs_row_triggers`] says of the table, and
/// `moving_rows` what [`placement`] says (or that it is about to become a partition): it
/// then also gets the triggers of the watch's move events. The table must not be open in this
/// backend: `ALTER TABLE` refuses a table in use.
pub fn create_triggers(
    id: i64,
    watch: &Watch,
    tbl: pg_sys::Oid,
    table: &TableName,
    (table_needs_rows, moving_rows): (bool, bool),
    whens: &[(Event, Option<When>)],
) {
    let args = [TriggerArg::write(watch, &table.display)];
    let update_columns = watch.update_columns();
    let enable_always = |name: &str| {
        if watch.fire_on_replica {
            run(&format!("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}", table.quoted, quote_identifier(name)), &[]);
        }
    };
    for &(event, when) in whens {
        let name = trigger_name(id, event);
        let per_row = watch.fires_per_row(event, table_needs_rows);
        // Only a row trigger has a WHEN (a watch with one never gets statement triggers).
        let when = when.filter(|_| per_row);
        let update_of = match event {
            Event::Row(Op::Update) if per_row => &update_columns[..],
            _ => &[],
        };
        // SAFETY: the table exists and is locked by this transaction (see save and follow).
        unsafe { create_trigger(tbl, &name, event, per_row, update_of, when, &args) };
        enable_always(&name);
    }
    if !moving_rows {
        return;
    }
    // PostgreSQL judges no WHEN on a move as on the update it is. Without a condition a move is
    // sent whole (with trigger columns too: a key change always is). A condition that reads only
    // the old row judges the delete half, and the insert half follows it; one that reads only the
    // new row judges the insert half, and the delete half is held until it comes. One that reads
    // both cannot be judged, and such a watch sends no moves: a condition decides what may go on
    // its channel.
    let update_when = whens.iter().find(|(event, _)| *event == Event::Row(Op::Update)).and_then(|(_, when)| *when);
    let condition = match (&watch.condition, update_when) {
        (None, _) => None,
        // With trigger columns the update's WHEN is their comparisons AND the condition (see
        // `validate::whens`); a move changes the key, so only the condition counts.
        (Some(_), Some(when)) if !watch.trigger_columns.is_empty() => match when.second_of_and() {
            Some(condition) => Some(condition),
            None => return,
        },
        (Some(_), Some(when)) => Some(when),
        (Some(_), None) => return,
    };
    let (delete, insert) = match condition {
        None => ((Moves::Only, None), (Moves::Only, None)),
        Some(when) if when::reads_only(when, Images { old: true, new: false }) => {
            ((Moves::Only, Some(when)), (Moves::Only, None))
        }
        Some(when) if when::reads_only(when, Images { old: false, new: true }) => {
            ((Moves::OnlyWithInsert, None), (Moves::Only, Some(when)))
        }
        Some(_) => return,
    };
    // A watch of a partition reports the delete half where no condition needs the new row (see
    // `pairs_moved_inserts` for the insert half).
    // SAFETY: syscache lookups of the table, which exists.
    let (partition, partitioned) = unsafe {
        (pg_sys::get_rel_relispartition(tbl), pg_sys::get_rel_relkind(tbl) as u8 == pg_sys::RELKIND_PARTITIONED_TABLE)
    };
    for op in watch.move_events() {
        let event = Event::Row(op);
        let name = trigger_name(id, event);
        let (moves, when) = if op == Op::Delete { delete } else { insert };
        let kept = match op {
            Op::Insert => pairs_moved_inserts(watch, partition, partitioned),
            _ => !partition || moves == Moves::Only,
        };
        if !kept {
            continue;
        }
        let args = [TriggerArg::write_for(watch, &table.display, moves)];
        // SAFETY: as above.
        unsafe { create_trigger(tbl, &name, event, true, &[], when, &args) };
        enable_always(&name);
        if moves == Moves::OnlyWithInsert {
            // A held old row whose new row the condition keeps out must not wait for another
            // insert of the same command (MERGE, a writable CTE) to go out with.
            let name = clearing_name(id);
            let args = [TriggerArg::write_for(watch, &table.display, Moves::Clear)];
            // SAFETY: as above.
            unsafe { create_trigger(tbl, &name, Event::Row(Op::Insert), true, &[], None, &args) };
            enable_always(&name);
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
        // The names as the catalog has them (CreateTrigger opens the table by OID; they are for
        // its messages).
        stmt.relation = pg_sys::makeRangeVar(
            pg_sys::get_namespace_name(rel.namespace_oid()),
            pg_sys::pstrdup((*rel.rd_rel).relname.data.as_ptr()),
            -1,
        );
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
            let pstate = when::old_and_new(&rel);
            pg_sys::recordDependencyOnExpr(
                &trigger,
                when,
                (*pstate).p_rtable,
                pg_sys::DependencyType::DEPENDENCY_NORMAL,
            );
            pg_sys::free_parsestate(pstate);
            pg_sys::CommandCounterIncrement();
            refuse_temporary_objects(trigger.objectId);
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

/// Fails if trigger `oid`'s WHEN refers to a temporary object (a function, operator or type in
/// `pg_temp`): its session's end would drop it, and with it the trigger, without the event
/// triggers that keep watches and their triggers together, leaving a watch that sends nothing.
/// Only what the WHEN names itself is looked at (not, say, a permanent function of a temporary
/// type's argument).
fn refuse_temporary_objects(oid: pg_sys::Oid) {
    // Schema names starting with pg_ are PostgreSQL's own: pg_temp (this session's) or
    // pg_temp_N (another's) is a temporary schema.
    let temporary = first::<Vec<u8>>(
        "SELECT pg_catalog.convert_to(pg_catalog.concat_ws(' ', o.type, o.identity), pg_catalog.getdatabaseencoding())
           FROM pg_catalog.pg_depend d, LATERAL pg_catalog.pg_identify_object(d.refclassid, d.refobjid, 0) o
          WHERE d.classid = 'pg_catalog.pg_trigger'::pg_catalog.regclass AND d.objid = $1
            AND o.schema OPERATOR(pg_catalog.~) '^pg_temp'",
        &[oid.into()],
    );
    if let Some(object) = temporary {
        fail(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("condition refers to temporary object {}", String::from_utf8_lossy(&object)),
            "the session's end would drop it and the watch's triggers with it: use an object of a permanent schema",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::watch_id_of;

    #[test]
    fn only_the_names_pgwatch_gives_its_triggers_name_a_watch() {
        assert_eq!(watch_id_of("pgwatch_12_update"), Some(12));
        assert_eq!(watch_id_of("pgwatch_7"), Some(7));
        assert_eq!(watch_id_of("pgwatch_7_truncate"), Some(7));
        assert_eq!(watch_id_of("pgwatch_7_moved"), Some(7));
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
