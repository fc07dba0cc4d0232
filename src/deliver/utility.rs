//! A `ProcessUtility` hook (with pgwatch preloaded): DROP DATABASE first stops that database's
//! worker (which would otherwise make the drop fail), and afterwards forgets its queued records;
//! DROP EXTENSION has the worker check, once committed, whether pgwatch is still there; PREPARE
//! TRANSACTION, COMMIT PREPARED and ROLLBACK PREPARED go through `prepared`.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pgrx::prelude::*;
use pgrx::{pg_guard, PgTryBuilder};

use super::prepared::{self, Statement};
use super::{shmem, xact};

/// How long DROP DATABASE waits for the database's worker to exit.
const DROP_WAIT: Duration = Duration::from_secs(10);

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
    around_utility(pstmt, || unsafe {
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
    around_utility(pstmt, || unsafe {
        match PREV_UTILITY.get().copied().flatten() {
            Some(prev) => prev(pstmt, query, read_only_tree, context, params, env, dest, qc),
            None => pg_sys::standard_ProcessUtility(pstmt, query, read_only_tree, context, params, env, dest, qc),
        }
    });
}

/// Runs a utility statement. DROP DATABASE first stops that database's worker (so the drop is not
/// refused for it) and afterwards forgets the database's queued records; DROP EXTENSION has the
/// worker check, once committed, whether pgwatch is still there.
fn around_utility(pstmt: *mut pg_sys::PlannedStmt, run: impl FnOnce()) {
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
    let dropped = dropped_database(stmt);
    let Some((dboid, slot)) = dropped.and_then(|d| shmem::shared().and_then(|s| Some((d, s.find_slot(d)?)))) else {
        return run();
    };
    // PostgreSQL checks who may drop the database only inside the statement: anyone else's
    // attempt must leave the database's delivery alone.
    if !may_drop(dboid) {
        return run();
    }
    // SAFETY: reading this backend's pid.
    let me = unsafe { pg_sys::MyProcPid };
    slot.dropping.store(me, Ordering::Release);
    slot.wake();
    // However the statement ends short of the drop (refused, cancelled while it waits), the
    // database's worker may run again; if this backend exits instead, the launcher sees it gone.
    PgTryBuilder::new(AssertUnwindSafe(|| {
        let deadline = Instant::now() + DROP_WAIT;
        while slot.pid.load(Ordering::Relaxed) != 0 && Instant::now() < deadline {
            // SAFETY: sleeping 10 ms, then honouring a cancel request.
            unsafe { pg_sys::pg_usleep(10_000) };
            pgrx::check_for_interrupts!();
        }
        run()
    }))
    .catch_others(|error| {
        slot.stop_dropping(me);
        error.rethrow()
    })
    .execute();
    if let Some(shared) = shmem::shared() {
        shared.forget_database(dboid);
    }
}

/// Whether the current user may drop database `dboid` (has its owner's rights, or is a
/// superuser), as PostgreSQL checks it; `false` for the database this session is in, which
/// PostgreSQL refuses to drop, and for one dropped meanwhile (DROP DATABASE IF EXISTS then skips).
fn may_drop(dboid: u32) -> bool {
    // SAFETY: reading this backend's database; a syscache lookup inside the statement's
    // transaction, its tuple released before returning.
    unsafe {
        if dboid == pg_sys::MyDatabaseId.to_u32() {
            return false;
        }
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::DATABASEOID as i32,
            pg_sys::Datum::from(pg_sys::Oid::from(dboid)),
        );
        if tuple.is_null() {
            return false;
        }
        let owner = (*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple)).datdba;
        pg_sys::ReleaseSysCache(tuple);
        pg_sys::has_privs_of_role(pg_sys::GetUserId(), owner)
    }
}

/// The database a DROP DATABASE statement drops, if it exists.
fn dropped_database(stmt: *mut pg_sys::Node) -> Option<u32> {
    // SAFETY: a valid parse node, cast only after checking its tag.
    unsafe {
        if !pgrx::is_a(stmt, pg_sys::NodeTag::T_DropdbStmt) {
            return None;
        }
        let drop = stmt.cast::<pg_sys::DropdbStmt>();
        let oid = pg_sys::get_database_oid((*drop).dbname, true);
        (oid != pg_sys::Oid::INVALID).then(|| oid.to_u32())
    }
}

/// What a transaction statement does with a prepared transaction, and its GID.
fn prepared_transaction(stmt: *mut pg_sys::Node) -> Option<(Statement, String)> {
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
        (!gid.is_null()).then(|| (statement, std::ffi::CStr::from_ptr(gid).to_string_lossy().into_owned()))
    }
}
