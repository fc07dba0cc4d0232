//! Prepared (two-phase) transactions, with pgwatch preloaded. PostgreSQL cannot NOTIFY from them,
//! so their changes are never sent: when one commits, the watches it changed are told to refetch
//! instead (a resync notice, on a retained channel a reset marker), queued by the transaction of
//! `COMMIT PREPARED` behind whatever was queued before it.
//!
//! Every transaction prepared by `PREPARE TRANSACTION` in this server run is noted in shared
//! memory by database, GID and xid, with whether it changed watched tables, until it is committed
//! or rolled back (see `Shared::note_prepared`): claimed at pre-prepare, where an ERROR still
//! aborts the transaction, and confirmed once it is prepared, where nothing may fail. No SQL is
//! run for it but the read of the database's watches before `COMMIT PREPARED` commits. The
//! backend that prepared a transaction also knows which watches it changed; any other backend
//! tells every watch of the database. So does a `COMMIT PREPARED` of a transaction that was not
//! noted: prepared before the server (re)started, or before a standby was promoted (its changes
//! were replayed, not captured), or when the table was full.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::prelude::*;

use super::shmem;
use super::targets::{self, Watches};
use super::xact;
use crate::model::watch::Target;

thread_local! {
    /// The GID of the PREPARE TRANSACTION this backend runs, until its pre-prepare.
    static PREPARING_GID: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
    /// The entry claimed for the transaction being prepared, and its xid, from its pre-prepare
    /// until it is prepared or aborts.
    static CLAIMED: Cell<Option<(usize, u32)>> = const { Cell::new(None) };
    /// The watches each transaction this backend prepared changed, by xid.
    static PREPARED: RefCell<HashMap<u32, Vec<Rc<Target>>>> = RefCell::default();
}

/// How many prepared transactions this backend remembers the watches of before it forgets those
/// that have ended (committed or rolled back by other sessions).
const REMEMBERED: usize = 64;

/// What a transaction statement does with a prepared transaction.
pub enum Statement {
    Prepare,
    Commit,
    Rollback,
}

/// Runs `run`, a statement that prepares, commits or rolls back the prepared transaction `gid`.
pub fn around(statement: Statement, gid: Vec<u8>, run: impl FnOnce()) {
    let committing = match statement {
        // The transaction is prepared as the statement's transaction block ends (see `prepare`).
        Statement::Prepare => {
            PREPARING_GID.set(Some(gid));
            return run();
        }
        Statement::Commit => true,
        Statement::Rollback => false,
    };
    // SAFETY: reading the id of the database this backend is connected to.
    let dboid = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let shared = shmem::shared();
    // Looked up before: once it ends, the GID names nothing (or, used again, another transaction).
    let looked = shared.and_then(|shared| shared.prepared_xid(dboid, &gid));
    let xid = looked.map(|(xid, _)| xid);
    // Every watch, when what it changed is not known here: read before the transaction commits,
    // since nothing after that may fail and have a committed COMMIT PREPARED reported as failed.
    let unknown = match looked {
        Some((_, false)) => false,
        Some((xid, true)) => !PREPARED.with_borrow(|prepared| prepared.contains_key(&xid)),
        None => true,
    };
    let mut all = (committing && unknown).then(|| targets::read(Watches::All));
    // PostgreSQL refuses a GID it does not know (or one of another database) here.
    run();
    // Taken by xid: should another session have ended that transaction first and a third
    // prepared another under the same GID, the one just committed is not the one looked up.
    let noted = xid.and_then(|xid| shared?.take_prepared(dboid, xid));
    let known = xid.and_then(|xid| PREPARED.with_borrow_mut(|prepared| prepared.remove(&xid)));
    if !committing {
        return;
    }
    let targets = match (noted, known) {
        (Some(false), _) => Vec::new(),
        (Some(true), Some(targets)) => targets,
        // Not noted, or noted by another backend: what it changed is not known here (read
        // after the commit only in that race).
        _ => all.take().unwrap_or_else(|| targets::read(Watches::All)),
    };
    xact::resync_at_commit(targets);
}

/// At pre-prepare: claims the transaction's entry, noting whether it changed watches
/// (`targets`), and remembers those; `true` when its commit will have them refetch. A
/// transaction prepared other than by `PREPARE TRANSACTION` (a logical replication worker's,
/// which also commits it without a statement) is not noted, and its commit not announced.
pub fn prepare(targets: Vec<Rc<Target>>) -> bool {
    let gid = PREPARING_GID.take();
    let Some(shared) = shmem::shared() else { return false };
    let Some(gid) = gid else { return false };
    // SAFETY: PREPARE assigns the transaction its xid before the pre-prepare callbacks; reading
    // the id of the database this backend is connected to.
    let (xid, dboid) = unsafe { (pg_sys::GetTopTransactionIdIfAny().into_inner(), pg_sys::MyDatabaseId.to_u32()) };
    let Some(entry) = shared.note_prepared(dboid, xid, &gid, !targets.is_empty()) else {
        // Not noted (the table is full of transactions still prepared): its commit tells every
        // watch of the database.
        return true;
    };
    CLAIMED.set(Some((entry, xid)));
    if !targets.is_empty() {
        PREPARED.with_borrow_mut(|prepared| {
            if prepared.len() >= REMEMBERED {
                prepared.retain(|&xid, _| shared.is_prepared(dboid, xid));
            }
            prepared.insert(xid, targets);
        });
    }
    true
}

/// The transaction is prepared: its claimed entry is confirmed. Nothing here may fail.
pub fn prepared() {
    if let (Some((entry, _)), Some(shared)) = (CLAIMED.take(), shmem::shared()) {
        shared.confirm_prepared(entry);
    }
}

/// A transaction that was to be prepared was rolled back instead (its GID was taken, say).
pub fn abandon() {
    PREPARING_GID.take();
    if let (Some((entry, xid)), Some(shared)) = (CLAIMED.take(), shmem::shared()) {
        shared.release_prepared(entry, xid);
        PREPARED.with_borrow_mut(|prepared| prepared.remove(&xid));
    }
}
