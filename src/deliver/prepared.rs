//! Prepared (two-phase) transactions, with pgwatch preloaded. PostgreSQL cannot NOTIFY from them,
//! so their changes are never sent: when one commits, the watches it changed are told to refetch
//! instead (a resync notice, on a retained channel a reset marker), queued by the transaction of
//! `COMMIT PREPARED` behind whatever was queued before it.
//!
//! The backend that prepared a transaction knows which watches it changed. Another backend, or
//! the same one after a restart, does not: it tells every watch of the database, whenever the
//! transaction may have changed any (a bit per hashed GID, set as it was prepared; or prepared
//! before this server run began).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;

use pgrx::prelude::*;

use super::shmem::{self, PREPARED_GID_BITS};
use super::slots::channel_hash;
use super::targets::{self, Watches};
use super::xact;
use crate::error;
use crate::model::watch::Target;

thread_local! {
    /// The GID of the PREPARE TRANSACTION this backend runs, for the prepare that follows it.
    static PREPARING: RefCell<Option<String>> = const { RefCell::new(None) };
    /// The watches each transaction this backend prepared changed, by GID.
    static PREPARED: RefCell<HashMap<String, Vec<Rc<Target>>>> = RefCell::default();
}

/// What a transaction statement does with a prepared transaction.
pub enum Statement {
    Prepare,
    Commit,
    Rollback,
}

/// Runs `run`, a statement that prepares, commits or rolls back the prepared transaction `gid`.
pub fn around(statement: Statement, gid: String, run: impl FnOnce()) {
    match statement {
        // The transaction is prepared as the statement's transaction block ends (see `prepare`).
        Statement::Prepare => {
            PREPARING.set(Some(gid));
            run();
        }
        Statement::Commit => {
            // Whether it was prepared before this run is asked only when nothing else tells.
            let known = PREPARED.with_borrow(|prepared| prepared.contains_key(&gid));
            let before_this_run =
                !known && !may_have_changes(&gid) && targets::pgwatch_here() && prepared_before_this_run(&gid);
            run();
            let known = PREPARED.with_borrow_mut(|prepared| prepared.remove(&gid));
            let targets = match known {
                Some(targets) => targets,
                None if before_this_run || may_have_changes(&gid) => targets::read(Watches::All),
                None => Vec::new(),
            };
            xact::resync_at_commit(targets);
        }
        Statement::Rollback => {
            run();
            PREPARED.with_borrow_mut(|prepared| prepared.remove(&gid));
        }
    }
}

/// Remembers the watches a transaction being prepared changed (`targets`, none if it changed
/// nothing watched), for its commit.
pub fn prepare(targets: Vec<Rc<Target>>) {
    let Some(gid) = PREPARING.take() else { return };
    if targets.is_empty() {
        return;
    }
    if let Some(shared) = shmem::shared() {
        let bit = gid_bit(&gid);
        shared.prepared_gids[bit / 64].fetch_or(1 << (bit % 64), Ordering::AcqRel);
    }
    PREPARED.with_borrow_mut(|prepared| prepared.insert(gid, targets));
}

fn gid_bit(gid: &str) -> usize {
    (channel_hash(gid.as_bytes()) % PREPARED_GID_BITS as u64) as usize
}

/// Whether some transaction prepared in this server run with a GID of the same bit changed a
/// watched table. (Bits are never cleared: another transaction may share one.)
fn may_have_changes(gid: &str) -> bool {
    let bit = gid_bit(gid);
    shmem::shared()
        .is_some_and(|shared| shared.prepared_gids[bit / 64].load(Ordering::Acquire) & (1 << (bit % 64)) != 0)
}

/// Whether `gid` was prepared before the server started (what it changed is not known then).
fn prepared_before_this_run(gid: &str) -> bool {
    Spi::get_one_with_args::<bool>(
        "SELECT prepared OPERATOR(pg_catalog.<) pg_catalog.pg_postmaster_start_time()
           FROM pg_catalog.pg_prepared_xacts WHERE gid OPERATOR(pg_catalog.=) $1",
        &[gid.into()],
    )
    .unwrap_or_else(|e| error::spi_failed("pg_prepared_xacts", e))
    .unwrap_or(false)
}
