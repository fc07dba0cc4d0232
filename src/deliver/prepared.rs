//! Prepared (two-phase) transactions, with pgwatch preloaded. PostgreSQL cannot NOTIFY from them,
//! so their changes are never sent: when one commits, the watches it changed are told to refetch
//! instead (a resync notice, on a retained channel a reset marker), queued by the transaction of
//! `COMMIT PREPARED` behind whatever was queued before it.
//!
//! Every transaction prepared by `PREPARE TRANSACTION` in this server run is noted in shared
//! memory by database, GID and xid, with whether it changed watched tables, until it is committed
//! or rolled back (see `Shared::note_prepared`); no SQL is run for it. The backend that prepared
//! it also knows which watches it changed; any other backend tells every watch of the database.
//! So does a `COMMIT PREPARED` of a transaction that was not noted: prepared before the server
//! (re)started, or before a standby was promoted (its changes were replayed, not captured), or
//! when the table was full.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::prelude::*;

use super::shmem;
use super::targets::{self, Watches};
use super::xact;
use crate::model::watch::Target;

/// The transaction being prepared: its GID, from the PREPARE TRANSACTION statement, and the
/// watches it changed, from its pre-prepare on.
#[derive(Default)]
struct Preparing {
    gid: Option<String>,
    targets: Option<Vec<Rc<Target>>>,
}

thread_local! {
    static PREPARING: RefCell<Preparing> = RefCell::default();
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
pub fn around(statement: Statement, gid: String, run: impl FnOnce()) {
    let committing = match statement {
        // The transaction is prepared as the statement's transaction block ends (see `prepared`).
        Statement::Prepare => {
            PREPARING.with_borrow_mut(|preparing| preparing.gid = Some(gid));
            return run();
        }
        Statement::Commit => true,
        Statement::Rollback => false,
    };
    // SAFETY: reading the id of the database this backend is connected to.
    let dboid = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let shared = shmem::shared();
    // Looked up before: once it ends, the GID names nothing (or, used again, another transaction).
    let xid = shared.and_then(|shared| shared.prepared_xid(dboid, gid.as_bytes()));
    // PostgreSQL refuses a GID it does not know (or one of another database) here.
    run();
    // Taken by xid: should another session have ended that transaction first and a third
    // prepared another under the same GID, the one just committed was not noted.
    let noted = xid.and_then(|xid| Some((xid, shared?.take_prepared(dboid, xid)?)));
    let known = xid.and_then(|xid| PREPARED.with_borrow_mut(|prepared| prepared.remove(&xid)));
    if !committing {
        return;
    }
    let targets = match (noted, known) {
        (Some((_, false)), _) => Vec::new(),
        (Some(_), Some(targets)) => targets,
        // Not noted, or noted by another backend: what it changed is not known here.
        _ if targets::pgwatch_here() => targets::read(Watches::All),
        _ => Vec::new(),
    };
    xact::resync_at_commit(targets);
}

/// Remembers the watches a transaction being prepared changed (`targets`, none if it changed
/// nothing watched), for [`prepared`].
pub fn prepare(targets: Vec<Rc<Target>>) {
    PREPARING.with_borrow_mut(|preparing| preparing.targets = Some(targets));
}

/// Notes the transaction just prepared (see [`prepare`]), once PostgreSQL has prepared it:
/// a PREPARE that fails (its GID taken, say) leaves nothing behind. One prepared other than by
/// `PREPARE TRANSACTION` (a logical replication worker's) is not noted.
pub fn prepared() {
    let Preparing { gid: Some(gid), targets: Some(targets) } = PREPARING.take() else { return };
    let Some(shared) = shmem::shared() else { return };
    // SAFETY: the prepared transaction's id, still this backend's until PREPARE ends.
    let (xid, dboid) = unsafe { (pg_sys::GetTopTransactionIdIfAny(), pg_sys::MyDatabaseId) };
    let (xid, dboid) = (xid.into_inner(), dboid.to_u32());
    if !shared.note_prepared(dboid, xid, gid.as_bytes(), !targets.is_empty()) || targets.is_empty() {
        return;
    }
    PREPARED.with_borrow_mut(|prepared| {
        if prepared.len() >= REMEMBERED {
            prepared.retain(|&xid, _| shared.is_prepared(dboid, xid));
        }
        prepared.insert(xid, targets);
    });
}

/// Forgets a transaction that was to be prepared and was rolled back instead.
pub fn abandon() {
    PREPARING.take();
}
