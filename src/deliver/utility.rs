//! A `ProcessUtility` hook (with pgwatch preloaded): a statement that needs a database to itself
//! (DROP DATABASE; CREATE DATABASE from it as the template; ALTER DATABASE RENAME or SET
//! TABLESPACE) first stops that database's worker, which would otherwise make it fail, and a drop
//! afterwards forgets the database's queued records; DROP EXTENSION has the worker check, once
//! committed, whether pgwatch is still there; TRUNCATE of a partition (named, or reached through
//! CASCADE) has the watches above it refetch; PREPARE TRANSACTION, COMMIT PREPARED and ROLLBACK PREPARED go through `prepared`.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pgrx::prelude::*;
use pgrx::{pg_guard, PgTryBuilder};

use super::prepared::{self, Statement};
use super::targets::{self, Watches};
use super::{shmem, xact};

/// How long a statement that needs a database to itself waits for the database's worker to exit.
const EXCLUSIVE_WAIT: Duration = Duration::from_secs(10);

static PREV_UTILITY: OnceLock<pg_sys::ProcessUtility_hook_type> = OnceLock::new();

/// Installs the DROP DATABASE hook; called from `_PG_init` while preloading.
pub fn install_drop_database_hook() {
    // SAFETY: hooks are installed by the postmaster while it loads preloaded libraries.
    unsafe {
        PREV_UTILITY.get_or_init(|| pg_sys::ProcessUtility_hook);
        pg_sys::ProcessUtility_hook = Some(on_utility);
    }
}

// PG 14 added `readOnlyTree`; the hook is otherwise the same, and its work is in
// `around_utility`. (`#[pg_guard]` does not keep a `#[cfg]` on a parameter: one hook per signature.)
#[cfg(feature = "pg13")]
#[pg_guard]
unsafe extern "C-unwind" fn on_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: passing the hook's own arguments on, to the previous hook or the standard function.
    around_utility(pstmt, context, || unsafe {
        match PREV_UTILITY.get().copied().flatten() {
            Some(prev) => prev(pstmt, query, context, params, env, dest, qc),
            None => pg_sys::standard_ProcessUtility(pstmt, query, context, params, env, dest, qc),
        }
    });
}

#[cfg(not(feature = "pg13"))]
#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn on_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: passing the hook's own arguments on, to the previous hook or the standard function.
    around_utility(pstmt, context, || unsafe {
        match PREV_UTILITY.get().copied().flatten() {
            Some(prev) => prev(pstmt, query, read_only_tree, context, params, env, dest, qc),
            None => pg_sys::standard_ProcessUtility(pstmt, query, read_only_tree, context, params, env, dest, qc),
        }
    });
}

/// Runs a utility statement. One that needs a database to itself first stops that database's
/// worker (so the statement is not refused for it), which starts again after it unless the
/// database was dropped (its queued records are then forgotten); DROP EXTENSION has the worker
/// check, once committed, whether pgwatch is still there.
fn around_utility(pstmt: *mut pg_sys::PlannedStmt, context: pg_sys::ProcessUtilityContext::Type, run: impl FnOnce()) {
    // SAFETY: a utility statement's PlannedStmt holds a valid parse node.
    let stmt = unsafe { (*pstmt).utilityStmt };
    if let Some((statement, gid)) = prepared_transaction(stmt) {
        return prepared::around(statement, gid, run);
    }
    // SAFETY: a DropStmt node, checked by its tag.
    let drops_extension = unsafe {
        pgrx::is_a(stmt, pg_sys::NodeTag::T_DropStmt)
            && (*stmt.cast::<pg_sys::DropStmt>()).removeType == pg_sys::ObjectType::OBJECT_EXTENSION
    };
    if drops_extension {
        xact::check_extension_at_commit();
    }
    if let Some(truncation) = truncation(stmt) {
        run();
        return truncation.refetch_above_partitions();
    }
    if let Some(parent) = detached_concurrently(stmt) {
        // It commits halfway: the refetch its ddl_command_start trigger asked for went out with
        // the first transaction, while the partition, left out of the parent's snapshots from
        // then on, kept its clones of the watches' row triggers until this second one.
        run();
        let above = targets::tree(parent, true, false);
        return targets::refetch(Watches::OfTables(&above, None));
    }
    let taken = exclusive_database(stmt);
    let Some((dboid, slot, exclusive)) =
        taken.and_then(|(d, e)| shmem::shared().and_then(|s| Some((d, s.find_slot(d)?, e))))
    else {
        return run();
    };
    // PostgreSQL checks who may run the statement, and where, only inside it: anyone else's
    // attempt, and one it refuses anyway, must leave the database's delivery alone.
    if !may_take(dboid, &exclusive, context) {
        return run();
    }
    // The lock PostgreSQL takes on the database first, so that the worker stops only once
    // nothing else holds the statement up (a role that keeps the database locked would
    // otherwise keep its worker stopped for as long as it likes).
    let mode = if exclusive.kind == Kind::Copy { pg_sys::ShareLock } else { pg_sys::AccessExclusiveLock };
    // SAFETY: a lock on a shared object, held until this transaction ends, as the statement
    // itself takes it.
    unsafe {
        pg_sys::LockSharedObject(pg_sys::DatabaseRelationId, pg_sys::Oid::from(dboid), 0, mode as pg_sys::LOCKMODE)
    };
    // While this waited for the lock, the database may have been renamed or dropped (its slot then
    // taken by another): the statement will not touch it, nor may this.
    // SAFETY: a lookup by a name from the parse tree, a C string.
    let same = unsafe { pg_sys::get_database_oid(exclusive.name.as_ptr(), true) } == pg_sys::Oid::from(dboid)
        && shmem::shared().and_then(|shared| shared.find_slot(dboid)).is_some_and(|now| std::ptr::eq(now, slot));
    if !same {
        return run();
    }
    // SAFETY: reading this backend's pid.
    let me = unsafe { pg_sys::MyProcPid };
    slot.held_by.store(me, Ordering::Release);
    slot.wake();
    // However the statement ends short of a drop (refused, cancelled while it waits, or done
    // without dropping), the database's worker may run again; if this backend exits instead,
    // the launcher sees it gone.
    PgTryBuilder::new(AssertUnwindSafe(|| {
        let deadline = Instant::now() + EXCLUSIVE_WAIT;
        while slot.pid.load(Ordering::Relaxed) != 0 && Instant::now() < deadline {
            // SAFETY: sleeping 10 ms, then honouring a cancel request.
            unsafe { pg_sys::pg_usleep(10_000) };
            pgrx::check_for_interrupts!();
        }
        run()
    }))
    .catch_others(|error| {
        slot.release(me);
        error.rethrow()
    })
    .execute();
    match exclusive.kind {
        Kind::Drop if !database_exists(dboid) => {
            if let Some(shared) = shmem::shared() {
                shared.forget_database(dboid);
            }
        }
        _ => slot.release(me),
    }
}

/// Why a statement needs a database to itself (PostgreSQL refuses it while any other session,
/// pgwatch's worker included, is connected to the database).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// DROP DATABASE.
    Drop,
    /// CREATE DATABASE with it as the template (`template1` when none is named).
    Copy,
    /// ALTER DATABASE ... RENAME TO.
    Rename,
    /// ALTER DATABASE ... SET TABLESPACE.
    Move,
}

/// A statement that needs a database to itself, with what PostgreSQL checks before it looks
/// for other sessions.
struct Exclusive {
    kind: Kind,
    /// The database's name as the statement gives it.
    name: std::ffi::CString,
    /// The name of the database it makes (a copy) or renames it to: must be free.
    new_name: Option<std::ffi::CString>,
}

/// Whether the current user may run the statement on database `dboid` here, as PostgreSQL checks
/// it before it looks for other sessions: with the database's owner's rights (or as a superuser),
/// with CREATEDB for a rename, or for a copy with CREATEDB and a database marked as a template (or
/// owned); not for a template's drop; a new name must be free; DROP, CREATE and SET TABLESPACE
/// only outside a transaction block and any function. `false` also for the database this session
/// is in unless it is copied (PostgreSQL refuses to drop, rename or move it), and for one dropped
/// meanwhile (DROP DATABASE IF EXISTS then skips).
fn may_take(dboid: u32, exclusive: &Exclusive, context: pg_sys::ProcessUtilityContext::Type) -> bool {
    // SAFETY: reading this backend's database and transaction state; syscache lookups inside the
    // statement's transaction, each tuple released before returning; a C string for a name.
    unsafe {
        if dboid == pg_sys::MyDatabaseId.to_u32() && exclusive.kind != Kind::Copy {
            return false;
        }
        let top_level = context == pg_sys::ProcessUtilityContext::PROCESS_UTILITY_TOPLEVEL
            && !pg_sys::IsTransactionBlock()
            && !pg_sys::IsSubTransaction();
        if exclusive.kind != Kind::Rename && !top_level {
            return false;
        }
        if exclusive
            .new_name
            .as_ref()
            .is_some_and(|name| pg_sys::get_database_oid(name.as_ptr(), true) != pg_sys::Oid::INVALID)
        {
            return false;
        }
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::DATABASEOID as i32,
            pg_sys::Datum::from(pg_sys::Oid::from(dboid)),
        );
        if tuple.is_null() {
            return false;
        }
        let database = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple);
        let (owner, is_template) = ((*database).datdba, (*database).datistemplate);
        pg_sys::ReleaseSysCache(tuple);
        let owns = pg_sys::has_privs_of_role(pg_sys::GetUserId(), owner);
        match exclusive.kind {
            Kind::Drop => owns && !is_template,
            Kind::Move => owns,
            Kind::Rename => owns && may_create_databases(),
            Kind::Copy => may_create_databases() && (is_template || owns),
        }
    }
}

/// Whether the current user has CREATEDB (or is a superuser), as CREATE DATABASE checks it.
fn may_create_databases() -> bool {
    // SAFETY: a syscache lookup of the current user, its tuple released before returning.
    unsafe {
        if pg_sys::superuser() {
            return true;
        }
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::AUTHOID as i32,
            pg_sys::Datum::from(pg_sys::GetUserId()),
        );
        if tuple.is_null() {
            return false;
        }
        let createdb = (*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_authid>(tuple)).rolcreatedb;
        pg_sys::ReleaseSysCache(tuple);
        createdb
    }
}

/// The existing database a statement needs to itself, and why.
fn exclusive_database(stmt: *mut pg_sys::Node) -> Option<(u32, Exclusive)> {
    let owned = |name: *const std::ffi::c_char| {
        // SAFETY: a name from the parse tree: NULL or a C string.
        (!name.is_null()).then(|| unsafe { std::ffi::CStr::from_ptr(name) }.to_owned())
    };
    // SAFETY: a valid parse node, cast only after checking its tag, as is every option read.
    let (name, kind, new_name) = unsafe {
        if pgrx::is_a(stmt, pg_sys::NodeTag::T_DropdbStmt) {
            ((*stmt.cast::<pg_sys::DropdbStmt>()).dbname, Kind::Drop, None)
        } else if pgrx::is_a(stmt, pg_sys::NodeTag::T_CreatedbStmt) {
            let create = stmt.cast::<pg_sys::CreatedbStmt>();
            let template = option((*create).options, c"template").filter(|def| !(**def).arg.is_null());
            let name = template.map_or(c"template1".as_ptr().cast_mut(), |def| pg_sys::defGetString(def));
            (name, Kind::Copy, owned((*create).dbname))
        } else if pgrx::is_a(stmt, pg_sys::NodeTag::T_RenameStmt) {
            let rename = stmt.cast::<pg_sys::RenameStmt>();
            if (*rename).renameType != pg_sys::ObjectType::OBJECT_DATABASE {
                return None;
            }
            ((*rename).subname, Kind::Rename, owned((*rename).newname))
        } else if pgrx::is_a(stmt, pg_sys::NodeTag::T_AlterDatabaseStmt) {
            let alter = stmt.cast::<pg_sys::AlterDatabaseStmt>();
            option((*alter).options, c"tablespace")?;
            ((*alter).dbname, Kind::Move, None)
        } else {
            return None;
        }
    };
    let name = owned(name)?;
    // SAFETY: a database name, a C string.
    let oid = unsafe { pg_sys::get_database_oid(name.as_ptr(), true) };
    (oid != pg_sys::Oid::INVALID).then(|| (oid.to_u32(), Exclusive { kind, name, new_name }))
}

/// Whether database `dboid` is still in the catalog as this transaction sees it (a DROP DATABASE
/// that skipped it, IF EXISTS after a rename say, left it).
fn database_exists(dboid: u32) -> bool {
    // SAFETY: a syscache lookup inside the statement's transaction, its tuple released at once.
    unsafe {
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::DATABASEOID as i32,
            pg_sys::Datum::from(pg_sys::Oid::from(dboid)),
        );
        if tuple.is_null() {
            return false;
        }
        pg_sys::ReleaseSysCache(tuple);
        true
    }
}

/// The option named `name` of a statement's option list (DefElems), if given.
///
/// # Safety
/// `options` is NIL or a valid list of DefElem nodes.
unsafe fn option(options: *mut pg_sys::List, name: &std::ffi::CStr) -> Option<*mut pg_sys::DefElem> {
    // SAFETY: as the caller promises; a DefElem's name is a C string.
    unsafe {
        pgrx::PgList::<pg_sys::DefElem>::from_pg(options)
            .iter_ptr()
            .find(|def| !(**def).defname.is_null() && std::ffi::CStr::from_ptr((**def).defname) == name)
    }
}

/// What a TRUNCATE statement names, resolved before it runs (with the statement's search_path):
/// each relation with whether its children go too (no ONLY), and whether it cascades to the
/// tables that reference them.
struct Truncation {
    named: Vec<(pg_sys::Oid, bool)>,
    cascade: bool,
}

/// The TRUNCATE `stmt` is, when it is one and pgwatch is in this database.
fn truncation(stmt: *mut pg_sys::Node) -> Option<Truncation> {
    // SAFETY: a valid parse node, cast only after checking its tag; its relations are RangeVars.
    unsafe {
        if !pgrx::is_a(stmt, pg_sys::NodeTag::T_TruncateStmt) || !targets::pgwatch_here() {
            return None;
        }
        let stmt = stmt.cast::<pg_sys::TruncateStmt>();
        let named = pgrx::PgList::<pg_sys::RangeVar>::from_pg((*stmt).relations)
            .iter_ptr()
            .map(|rv| {
                let relid = pg_sys::RangeVarGetRelidExtended(
                    rv,
                    pg_sys::NoLock as pg_sys::LOCKMODE,
                    pg_sys::RVROption::RVR_MISSING_OK,
                    None,
                    std::ptr::null_mut(),
                );
                (relid, (*rv).inh)
            })
            .filter(|&(relid, _)| relid != pg_sys::Oid::INVALID)
            .collect();
        Some(Truncation { named, cascade: (*stmt).behavior == pg_sys::DropBehavior::DROP_CASCADE })
    }
}

impl Truncation {
    /// Every table the statement emptied, found once it ran (it holds their locks) as
    /// PostgreSQL's ExecuteTruncate found them: the named ones with their children, then, with
    /// CASCADE, every table whose foreign keys reference one of them, until none is left.
    fn emptied(&self) -> Vec<pg_sys::Oid> {
        // SAFETY: catalog reads inside the statement's transaction, on relations it has locked;
        // the lists are palloc'd in the current memory context, and read only while it lives.
        unsafe {
            let mut relids: *mut pg_sys::List = std::ptr::null_mut();
            for &(relid, children) in &self.named {
                let tree = if children { targets::tree(relid, false, true) } else { vec![relid] };
                for relid in tree {
                    if !pg_sys::list_member_oid(relids, relid) {
                        relids = pg_sys::lappend_oid(relids, relid);
                    }
                }
            }
            if self.cascade {
                // Its result leaves out what the list has already, so this ends.
                loop {
                    let found = oids(pg_sys::heap_truncate_find_FKs(relids));
                    if found.is_empty() {
                        break;
                    }
                    for relid in found {
                        relids = pg_sys::lappend_oid(relids, relid);
                    }
                }
            }
            oids(relids)
        }
    }

    /// After the TRUNCATE: PostgreSQL fires each emptied table's own statement triggers but does
    /// not pass them up, so the watches of the tables above an emptied partition see nothing of
    /// its rows; their subscribers refetch once the transaction commits (as after DDL that
    /// changes which rows a table holds, see `define::follow`). Tables the statement emptied
    /// themselves are left to their TRUNCATE triggers.
    fn refetch_above_partitions(&self) {
        let emptied = self.emptied();
        let mut above: Vec<pg_sys::Oid> = Vec::new();
        // SAFETY: a syscache lookup inside the statement's transaction.
        for &partition in emptied.iter().filter(|&&relid| unsafe { pg_sys::get_rel_relispartition(relid) }) {
            for table in targets::tree(partition, true, false) {
                if !emptied.contains(&table) && !above.contains(&table) {
                    above.push(table);
                }
            }
        }
        if !above.is_empty() {
            targets::refetch(Watches::OfTables(&above, None));
        }
    }
}

/// The members of an OID list (empty for NIL).
///
/// # Safety
/// `list` must be NIL or a valid `T_OidList`.
unsafe fn oids(list: *mut pg_sys::List) -> Vec<pg_sys::Oid> {
    if list.is_null() {
        return Vec::new();
    }
    // SAFETY: as the caller promised; an OID list's cells hold OIDs.
    unsafe { (0..(*list).length as usize).map(|i| (*(*list).elements.add(i)).oid_value).collect() }
}

/// The parent an ALTER TABLE ... DETACH PARTITION ... CONCURRENTLY detaches from (resolved
/// before it runs), with pgwatch in this database.
fn detached_concurrently(stmt: *mut pg_sys::Node) -> Option<pg_sys::Oid> {
    #[cfg(feature = "pg13")]
    {
        let _ = stmt;
        None
    }
    #[cfg(not(feature = "pg13"))]
    // SAFETY: a valid parse node, cast only after checking its tag, as is each subcommand's.
    unsafe {
        if !pgrx::is_a(stmt, pg_sys::NodeTag::T_AlterTableStmt) {
            return None;
        }
        let alter = stmt.cast::<pg_sys::AlterTableStmt>();
        let concurrent = pgrx::PgList::<pg_sys::AlterTableCmd>::from_pg((*alter).cmds).iter_ptr().any(|cmd| {
            (*cmd).subtype == pg_sys::AlterTableType::AT_DetachPartition
                && pgrx::is_a((*cmd).def, pg_sys::NodeTag::T_PartitionCmd)
                && (*(*cmd).def.cast::<pg_sys::PartitionCmd>()).concurrent
        });
        if !concurrent || !targets::pgwatch_here() {
            return None;
        }
        let parent = pg_sys::RangeVarGetRelidExtended(
            (*alter).relation,
            pg_sys::NoLock as pg_sys::LOCKMODE,
            pg_sys::RVROption::RVR_MISSING_OK,
            None,
            std::ptr::null_mut(),
        );
        (parent != pg_sys::Oid::INVALID).then_some(parent)
    }
}

/// What a transaction statement does with a prepared transaction, and its GID.
fn prepared_transaction(stmt: *mut pg_sys::Node) -> Option<(Statement, Vec<u8>)> {
    // SAFETY: a valid parse node, cast only after checking its tag; a GID is a C string.
    unsafe {
        if !pgrx::is_a(stmt, pg_sys::NodeTag::T_TransactionStmt) {
            return None;
        }
        let stmt = stmt.cast::<pg_sys::TransactionStmt>();
        let statement = match (*stmt).kind {
            pg_sys::TransactionStmtKind::TRANS_STMT_PREPARE => Statement::Prepare,
            pg_sys::TransactionStmtKind::TRANS_STMT_COMMIT_PREPARED => Statement::Commit,
            pg_sys::TransactionStmtKind::TRANS_STMT_ROLLBACK_PREPARED => Statement::Rollback,
            _ => return None,
        };
        let gid = (*stmt).gid;
        // As bytes: in a database not in UTF-8, GIDs that differ must stay different.
        (!gid.is_null()).then(|| (statement, std::ffi::CStr::from_ptr(gid).to_bytes().to_vec()))
    }
}
