//! Following DDL on watched tables: a renamed table, schema or column is followed, a table that
//! now needs row triggers gets them, and DDL that would break a watch is refused. Runs once per
//! DDL command, from pgwatch's event triggers (see `sql/ddl.sql`), never per row.

use std::collections::BTreeSet;
use std::ffi::CStr;

use pgrx::prelude::*;
use pgrx::{PgRelation, PgSqlErrorCode};

use super::owner::{column, first, managing, with_safe_search_path};
use super::store::{column_names, deferrable_primary_key, load};
use super::triggers::{
    clearing_name, existing_triggers, pairs_moved_inserts, placement, silenced, trigger_name, triggers_refer_to,
    watch_id_of, Existing,
};
use super::watches::rebuild;
use crate::deliver::targets::{self, Watches};
use crate::error::{self, fail};
use crate::model::events::{Event, Op};
use crate::model::trigger_arg::{Moves, TriggerArg};
use crate::model::watch::{channel_name, OnTruncate, TableName, MAX_CHANNEL};
use crate::text;

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
    .unwrap_or_else(|e| error::spi_failed("pg_event_trigger_ddl_commands()", e))
}

/// Brings watch `id` in step with its table after `changes`: a renamed table, schema or watched
/// column is followed; a rename the watch cannot follow is refused with an ERROR.
fn follow(id: i64, changes: &[Changed]) {
    let Some(mut watch) = load(id) else { return };
    let existing = existing_triggers(id, watch.tbl);
    // Triggers made since 0.4.0 (their argument says what a TRUNCATE sends) include a TRUNCATE
    // trigger whatever the watch reports; older ones have it only if it reports truncate, and
    // following them makes it.
    let current = existing.iter().any(|t| {
        let args: Vec<&[u8]> = t.args.iter().map(|a| a.as_bytes()).collect();
        TriggerArg::read(&args).is_ok_and(|arg| arg.on_truncate == OnTruncate::Refetch)
    });
    let mut needed = watch.events.iter().chain(current.then_some(Event::Truncate));
    if !needed.all(|event| existing.iter().any(|t| t.name == trigger_name(id, event))) {
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
        .filter_map(|c| {
            rel.tuple_desc().get(c.objsubid as usize - 1).map(|a| (c.objsubid, text::column_name(&rel, a).to_string()))
        })
        .collect();
    let columns = column_names(&rel);
    let listed = || watch.keys.iter().chain(&watch.extras).chain(&watch.trigger_columns);
    let missing: BTreeSet<String> = listed().filter(|c| !columns.contains(c)).cloned().collect();
    if let Some(condition) = watch.condition.as_deref() {
        // pgwatch's own part of the update trigger (UPDATE OF and the comparisons of key and
        // trigger columns) refers to columns by number and follows a rename; the condition is the
        // user's text, kept as written, so a column it names may not be renamed under it.
        let only_ours = |old: &String| {
            (watch.keys.contains(old) || watch.trigger_columns.contains(old))
                && !condition.to_lowercase().contains(&old.to_lowercase())
        };
        let followed = missing.len() == 1 && missing.iter().all(only_ours);
        if let Some((_, name)) =
            renamed.iter().find(|(attnum, _)| !followed && triggers_refer_to(id, watch.tbl, *attnum))
        {
            fail(
                PgSqlErrorCode::ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
                format!(
                    "cannot rename a column of table {} to \"{name}\": pgwatch watch {id} (channel \"{}\") has a condition that refers to it",
                    table.display, watch.channel
                ),
                "unwatch the table, rename the column, then watch it again with the condition written for the new name",
            );
        }
    }
    let mut changed = false;
    // A renamed key or extra column changes the rows' members: the same row would be sent under
    // two names (and folded as two keys within a transaction), so subscribers refetch.
    let mut sent_renamed = false;
    if let ([old], [(_, new)]) = (&missing.into_iter().collect::<Vec<_>>()[..], &renamed[..]) {
        sent_renamed = watch.keys.contains(old) || watch.extras.contains(old);
        for list in [&mut watch.keys, &mut watch.extras, &mut watch.trigger_columns] {
            list.iter_mut().filter(|c| *c == old).for_each(|c| c.clone_from(new));
        }
        changed = true;
    }
    // A watch made before names with a dot were quoted keeps its channel until its table is
    // renamed: its subscribers listen there.
    let kept = (watch.label.is_none() && watch.channel == table.unquoted).then(|| watch.channel.clone());
    let Some(channel) = kept.or_else(|| channel_name(&table.display, watch.label.as_deref())) else {
        fail(
            PgSqlErrorCode::ERRCODE_NAME_TOO_LONG,
            format!(
                "the channel of pgwatch watch {id} would be \"{}\", longer than {MAX_CHANNEL} bytes",
                table.display
            ),
            "give the watch a short label first: SELECT watch_table(..., label => 'short_name')",
        );
    };
    let moved = channel != watch.channel;
    if moved {
        // The watch's changes go to the new channel from now on: its subscribers on the old one
        // are told to refetch (the catalog still names the old channel here), as they would miss
        // them otherwise.
        targets::refetch(Watches::Ids(&[id]));
    }
    changed |= moved;
    watch.channel = channel;
    if let Some(reserved) = watch.reserved_column() {
        fail(
            PgSqlErrorCode::ERRCODE_RESERVED_NAME,
            format!(
                "cannot rename a column of table {} to \"{reserved}\": pgwatch watch {id} (channel \"{}\") sends it, and \"{reserved}\" names a member of its payload rows",
                table.display, watch.channel
            ),
            "choose another name, or watch the table with payload => 'compact' first",
        );
    }
    let args = TriggerArg::write(&watch, &table.display);
    let moves_args =
        [Moves::Only, Moves::OnlyWithInsert].map(|moves| TriggerArg::write_for(&watch, &table.display, moves));
    let clearing_args = TriggerArg::write_for(&watch, &table.display, Moves::Clear);
    // The table's triggers or place in an inheritance tree may have changed what its watches need.
    let placement @ (table_needs_rows, moving_rows) = placement(&rel);
    // SAFETY: an open relation has its pg_class row.
    let (partition, partitioned) = unsafe {
        let class = &*rel.rd_rel;
        (class.relispartition, class.relkind as u8 == pg_sys::RELKIND_PARTITIONED_TABLE)
    };
    let wanted = |trigger: &Existing| {
        let event = watch.trigger_events().any(|event| {
            trigger.name == trigger_name(id, event)
                && trigger.per_row == watch.fires_per_row(event, table_needs_rows)
                && trigger.args == [args.clone()]
        });
        // A detached partition's move triggers are no longer wanted, nor an attached one's
        // pairing ones (see `create_triggers`): made again without them.
        let [only, with_insert] = &moves_args;
        let moves = moving_rows
            && trigger.per_row
            && watch.move_events().any(|op| {
                let args = |moves: &String| trigger.args == [moves.clone()];
                trigger.name == trigger_name(id, Event::Row(op))
                    && match (partition, op) {
                        (false, _) => args(only) || args(with_insert),
                        (true, Op::Delete) => args(only),
                        (true, _) => pairs_moved_inserts(&watch, partition, partitioned) && args(only),
                    }
            });
        let clearing =
            moving_rows && !partition && trigger.name == clearing_name(id) && trigger.args == [clearing_args.clone()];
        event || moves || clearing
    };
    if !changed && existing.iter().all(wanted) {
        return;
    }
    drop(rel);
    rebuild(id, &watch, &table, &existing, placement, moved);
    if sent_renamed {
        targets::refetch(Watches::Ids(&[id]));
    }
}

/// Gives the watches of `relid`, a table about to become a partition (`partition`) or an
/// inheritance child, row triggers in place of statement triggers (see `triggers::needs_row_triggers`),
/// and, for a partition, the triggers of their move events (see `create_triggers`). It must
/// happen before the command: PostgreSQL 13 refuses to attach or inherit a table that has
/// triggers with transition tables.
fn use_row_triggers(relid: pg_sys::Oid, partition: bool) {
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
        let moves = !partition
            || watch.move_events().all(|op| existing.iter().any(|t| t.name == trigger_name(id, Event::Row(op))));
        if moves && existing.iter().all(|t| t.per_row || t.name == truncate) {
            continue;
        }
        // SAFETY: the table exists (its watch's triggers do); ALTER TABLE locks it next.
        let rel = unsafe { PgRelation::with_lock(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE) };
        let table = TableName::of(&rel);
        drop(rel);
        rebuild(id, &watch, &table, &existing, (true, partition), false);
    }
}

/// Called at the end of DDL that can change a watched table (see `sql/ddl.sql`): watches
/// follow renamed tables, schemas and columns, and get row triggers where the table now needs
/// them (a new trigger, a new place in an inheritance tree).
pub fn follow_ddl() {
    if managing() {
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

/// The `ddl_command_start` event trigger of ALTER TABLE (`pgwatch.on_ddl_command_start()`): a
/// watched table about to become a partition or an inheritance child gets row triggers first, and
/// the watches whose rows the command changes without a row event (see [`Reshape`]) have their
/// subscribers refetch once the transaction commits. It needs the parse tree, which only a C
/// function can read. (A watched parent that gains a child is followed at `ddl_command_end`, in
/// `follow_ddl`.) Also the `ddl_command_start` trigger of DROP TABLE, DROP SCHEMA and DROP OWNED:
/// a dropped partition's rows leave the watched tables above it.
///
/// # Safety
/// `fcinfo` must be the call of PostgreSQL running an event trigger function.
pub unsafe fn on_ddl_command_start(fcinfo: pg_sys::FunctionCallInfo) {
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
        if managing() {
            return;
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
        let mut reshaped = Vec::new();
        // Schemas being dropped, and roles whose objects are: partitions there or theirs go.
        let (mut schemas, mut owners) = (Vec::new(), Vec::new());
        if pgrx::is_a(stmt, pg_sys::NodeTag::T_AlterTableStmt) {
            let alter = stmt.cast::<pg_sys::AlterTableStmt>();
            let relation = table((*alter).relation);
            for cmd in pgrx::PgList::<pg_sys::AlterTableCmd>::from_pg((*alter).cmds).iter_ptr() {
                let def = (*cmd).def;
                let name =
                    || (!(*cmd).name.is_null()).then(|| CStr::from_ptr((*cmd).name).to_string_lossy().into_owned());
                let subtype = (*cmd).subtype;
                match subtype {
                    pg_sys::AlterTableType::AT_AttachPartition if pgrx::is_a(def, pg_sys::NodeTag::T_PartitionCmd) => {
                        joining.extend(table((*def.cast::<pg_sys::PartitionCmd>()).name).map(|relid| (relid, true)));
                    }
                    pg_sys::AlterTableType::AT_AddInherit => joining.extend(relation.map(|relid| (relid, false))),
                    _ => {}
                }
                let reshape = match subtype {
                    pg_sys::AlterTableType::AT_AttachPartition | pg_sys::AlterTableType::AT_DetachPartition => {
                        Some(Reshape::Partitions)
                    }
                    #[cfg(not(feature = "pg13"))]
                    pg_sys::AlterTableType::AT_DetachPartitionFinalize => Some(Reshape::Partitions),
                    pg_sys::AlterTableType::AT_AlterColumnType => name().map(Reshape::ColumnType),
                    // A stored generated column's new expression rewrites its values.
                    #[cfg(any(feature = "pg17", feature = "pg18"))]
                    pg_sys::AlterTableType::AT_SetExpression => name().map(Reshape::ColumnType),
                    pg_sys::AlterTableType::AT_EnableTrig
                    | pg_sys::AlterTableType::AT_EnableAlwaysTrig
                    | pg_sys::AlterTableType::AT_EnableReplicaTrig => {
                        name().filter(|name| watch_id_of(name).is_some()).map(|_| Reshape::Enable)
                    }
                    pg_sys::AlterTableType::AT_EnableTrigAll | pg_sys::AlterTableType::AT_EnableTrigUser => {
                        Some(Reshape::Enable)
                    }
                    _ => None,
                };
                reshaped.extend(relation.zip(reshape));
            }
        } else if pgrx::is_a(stmt, pg_sys::NodeTag::T_DropStmt) {
            let drop = stmt.cast::<pg_sys::DropStmt>();
            let tables = [pg_sys::ObjectType::OBJECT_TABLE, pg_sys::ObjectType::OBJECT_FOREIGN_TABLE];
            if tables.contains(&(*drop).removeType) {
                let names = pgrx::PgList::<pg_sys::List>::from_pg((*drop).objects);
                let dropped = names.iter_ptr().filter_map(|name| table(pg_sys::makeRangeVarFromNameList(name)));
                reshaped.extend(
                    dropped
                        .filter(|&relid| pg_sys::get_rel_relispartition(relid))
                        .map(|relid| (relid, Reshape::Dropped)),
                );
            } else if (*drop).removeType == pg_sys::ObjectType::OBJECT_SCHEMA {
                // DROP SCHEMA ... CASCADE drops the partitions in it of tables elsewhere.
                for name in pgrx::PgList::<pg_sys::Node>::from_pg((*drop).objects).iter_ptr() {
                    #[cfg(any(feature = "pg13", feature = "pg14"))]
                    let name = (*name.cast::<pg_sys::Value>()).val.str_;
                    #[cfg(not(any(feature = "pg13", feature = "pg14")))]
                    let name = (*name.cast::<pg_sys::String>()).sval;
                    let schema = pg_sys::get_namespace_oid(name, true);
                    if schema != pg_sys::Oid::INVALID {
                        schemas.push(schema);
                    }
                }
            }
        } else if pgrx::is_a(stmt, pg_sys::NodeTag::T_DropOwnedStmt) {
            // DROP OWNED drops the partitions the roles own, of tables they may not own.
            let roles = (*stmt.cast::<pg_sys::DropOwnedStmt>()).roles;
            for role in pgrx::PgList::<pg_sys::RoleSpec>::from_pg(roles).iter_ptr() {
                let role = pg_sys::get_rolespec_oid(role, true);
                if role != pg_sys::Oid::INVALID {
                    owners.push(role);
                }
            }
        }
        // Names were resolved with the command's search_path; pgwatch's own SQL runs with a safe
        // one.
        if !joining.is_empty() || !reshaped.is_empty() || !schemas.is_empty() || !owners.is_empty() {
            with_safe_search_path(|| {
                joining.into_iter().for_each(|(relid, partition)| use_row_triggers(relid, partition));
                if !schemas.is_empty() || !owners.is_empty() {
                    let dropped = column::<pg_sys::Oid>(
                        "SELECT c.oid FROM pg_catalog.pg_class c
                          WHERE c.relispartition
                            AND (c.relnamespace OPERATOR(pg_catalog.=) ANY($1) OR c.relowner OPERATOR(pg_catalog.=) ANY($2))",
                        &[schemas.into(), owners.into()],
                    );
                    reshaped.extend(dropped.into_iter().map(|relid| (relid, Reshape::Dropped)));
                }
                reshaped.into_iter().for_each(|(relid, reshape)| refetch_after(relid, reshape));
            });
        }
    }
}

/// What an ALTER TABLE subcommand does to rows that watches see, with no row event to say so:
/// their subscribers are to refetch.
#[derive(Debug, PartialEq, Eq)]
enum Reshape {
    /// ATTACH or DETACH PARTITION: rows join or leave the table and the tables above it.
    Partitions,
    /// ALTER COLUMN ... TYPE of this column: its values may read differently, in the table and
    /// in the tables below it (the change recurses to them).
    ColumnType(String),
    /// ENABLE TRIGGER (of pgwatch's, or ALL, or USER): changes written while a pgwatch trigger
    /// was disabled (or fired only on replicas) were not seen, in the table or any table above
    /// or below it that shares the watch's triggers.
    Enable,
    /// DROP TABLE of a partition: its rows leave the tables above it (its own watches go with it).
    Dropped,
}

/// Has the subscribers of the watches that `reshape` of table `relid` affects refetch once this
/// transaction commits (a resync, on a retained channel a reset marker with reason `ddl`). A
/// subcommand that then fails leaves at most a needless refetch.
fn refetch_after(relid: pg_sys::Oid, reshape: Reshape) {
    // PostgreSQL checks who may run the command only after this trigger: no one else's attempt
    // (rolled back to a savepoint, say) may have every subscriber refetch. It needs the table's
    // owner's rights, or for a drop its schema's owner's.
    let may = first::<bool>(
        "SELECT pg_catalog.pg_has_role(c.relowner, 'USAGE') OR ($2 AND pg_catalog.pg_has_role(n.nspowner, 'USAGE'))
           FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
          WHERE c.oid OPERATOR(pg_catalog.=) $1",
        &[relid.into(), (reshape == Reshape::Dropped).into()],
    );
    if may != Some(true) {
        return;
    }
    let (up, down) = match reshape {
        Reshape::Partitions | Reshape::Dropped => (true, false),
        Reshape::ColumnType(_) => (false, true),
        Reshape::Enable => (true, true),
    };
    let mut tables = targets::tree(relid, up, down);
    if reshape == Reshape::Dropped {
        tables.retain(|&table| table != relid);
    }
    // Only a trigger of pgwatch's that was disabled (or fired only on replicas) missed changes.
    if reshape == Reshape::Enable && !silenced(&tables, None, false) {
        return;
    }
    let column = match &reshape {
        Reshape::ColumnType(column) => Some(column.as_str()),
        _ => None,
    };
    targets::refetch(Watches::OfTables(&tables, column));
}
