//! Defining, removing and remaking a watch: its catalog row and its triggers, changed together
//! as the extension's owner (callers check the user's own right first).

use pgrx::prelude::*;
use pgrx::{PgRelation, PgSqlErrorCode};

use super::owner::{as_extension_owner, run, Managing};
use super::store;
use super::triggers::{
    create_triggers, drop_triggers, existing_triggers, existing_whens, placement, silenced, Existing,
};
use super::validate::{check_may_watch, open_oid};
use super::when::When;
use crate::deliver::targets::{self, Watches};
use crate::error::fail;
use crate::model::events::Event;
use crate::model::watch::{Shape, TableName, Watch};

/// Waits for another transaction defining a watch on `channel`, before the table is locked:
/// waiting on its catalog row with the table locked would hold up the table's writers for as long
/// as that transaction stays open. Once it has ended, the claim (under READ COMMITTED) sees its
/// row. The lock is one no SQL statement takes, so that no one but a transaction defining a watch
/// holds it up; it is held until the transaction ends.
fn lock_channel(channel: &str) {
    // FNV-1a, the same in every backend: a channel that shares the hash only waits as well.
    let hash = channel.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    // SAFETY: a lock on an object tag of pg_extension's catalog with a sub-id PostgreSQL never
    // gives an extension, taken in the current transaction.
    unsafe {
        pg_sys::LockDatabaseObject(
            pg_sys::ExtensionRelationId,
            pg_sys::Oid::from(hash),
            CHANNEL_LOCK_SUBID,
            pg_sys::ExclusiveLock as pg_sys::LOCKMODE,
        )
    };
}

/// The sub-id of [`lock_channel`]'s lock tag: "pw".
const CHANNEL_LOCK_SUBID: u16 = 0x7077;

/// Stores `watch` (replacing the watch of its table and label, if any) and installs its
/// triggers, each event's with the WHEN `whens` gives (resolved by the caller, see `when`);
/// returns its id.
pub fn save(rel: PgRelation, watch: &Watch, whens: &[(Event, Option<When>)], shape: Shape) -> i64 {
    let table = TableName::of(&rel);
    let placement = placement(&rel);
    drop(rel);
    as_extension_owner(|| {
        let _managing = Managing::start();
        lock_channel(&watch.channel);
        run(&format!("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE", table.quoted), &[]);
        store::claim_channel(watch, &table, None);
        let redefined = store::redefines(watch, &shape);
        let (id, replaced) = store::upsert(watch, shape);
        let mut missed = false;
        if replaced {
            missed = missed_changes(id, watch);
            drop_triggers(id, watch.tbl, &table);
        }
        create_triggers(id, watch, watch.tbl, &table, placement, whens);
        if redefined || missed {
            // What subscribers' copies hold was sent by the old definition, or misses what was
            // written while the triggers made again now were not firing.
            targets::refetch(Watches::Ids(&[id]));
        }
        id
    })
}

/// Whether a trigger of watch `id` (on its table or a table below it) was not firing (see
/// `triggers::silenced`). Making the triggers again enables them, and the changes they missed
/// were never sent: subscribers refetch.
fn missed_changes(id: i64, watch: &Watch) -> bool {
    silenced(&targets::tree(watch.tbl, false, true), Some(id), watch.fire_on_replica)
}

/// Removes the watch of `rel` named `label`, or all of them when `label` is NULL, with their
/// triggers; returns how many were removed.
pub fn remove(rel: &PgRelation, label: Option<&str>) -> i32 {
    let table = TableName::of(rel);
    as_extension_owner(|| {
        let _managing = Managing::start();
        let ids = store::delete(rel.oid(), label);
        for &id in &ids {
            drop_triggers(id, rel.oid(), &table);
        }
        ids.len() as i32
    })
}

/// Makes the triggers of watch `id` again from `watch` (stored first, as it may have followed a
/// rename), keeping the WHEN each of its `existing` triggers has: the one way pgwatch remakes a
/// watch's triggers (following DDL, turning statement triggers into row triggers, upgrading).
/// `placement`: whether the table needs row triggers and holds moving rows (see
/// `create_triggers`); `claim`: the channel changed, and must not be another table's.
pub fn rebuild(id: i64, watch: &Watch, table: &TableName, existing: &[Existing], placement: (bool, bool), claim: bool) {
    let whens = {
        // SAFETY: the table exists (its watch does) and is locked by the DDL that led here.
        let rel = unsafe { PgRelation::with_lock(watch.tbl, pg_sys::AccessShareLock as pg_sys::LOCKMODE) };
        existing_whens(id, watch, &rel, existing)
    };
    as_extension_owner(|| {
        let _managing = Managing::start();
        if claim {
            store::claim_channel(watch, table, Some(id));
        }
        store::store_names(id, watch);
        let missed = missed_changes(id, watch);
        drop_triggers(id, watch.tbl, table);
        create_triggers(id, watch, watch.tbl, table, placement, &whens);
        if missed {
            targets::refetch(Watches::Ids(&[id]));
        }
    });
}

/// Makes the triggers of watch `id` again as this library makes them (statement triggers
/// where they suffice, one argument each), keeping their WHEN conditions as they are: what
/// `ALTER EXTENSION pgwatch UPDATE` does for the watches an earlier release made. Needs what
/// watching the table needs.
pub fn renew(id: i64) {
    let Some(watch) = store::load(id) else {
        fail(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("pgwatch watch {id} does not exist"),
            "see pgwatch.watches",
        );
    };
    // DROP TABLE removes the table's watches, but this transaction's snapshot may be older.
    let rel = open_oid(watch.tbl);
    let table = TableName::of(&rel);
    check_may_watch(&rel);
    if let Some(deferrable) = store::deferrable_primary_key(watch.tbl) {
        fail(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("the primary key of table {deferrable} is deferrable"),
            "pgwatch folds a transaction's changes per key, which needs keys unique after every row: make the key NOT DEFERRABLE",
        );
    }
    let existing = existing_triggers(id, watch.tbl);
    let placement = placement(&rel);
    drop(rel);
    rebuild(id, &watch, &table, &existing, placement, false);
}
