//! Defining, removing and remaking a watch: its catalog row and its triggers, changed together
//! as the extension's owner (callers check the user's own right first).

use pgrx::prelude::*;
use pgrx::{PgRelation, PgSqlErrorCode};

use super::owner::{as_extension_owner, first, run, Managing};
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
/// holds it up; it is held until the transaction ends. Its tag is a keyed hash of the channel
/// (see [`channel_lock_tag`]): every role sees lock tags in pg_locks, and without a key one could
/// compute a label of its own whose lock, held open, stalls the definition of another's channel.
/// Run as the extension's owner, who alone reads the key.
fn lock_channel(channel: &str) {
    // A database whose pgwatch is not updated to 0.4.0 yet has no key (a statement naming the
    // table would fail there, however it is guarded).
    let keyed = first::<bool>("SELECT pg_catalog.to_regclass('pgwatch.claim_key') IS NOT NULL", &[]);
    let key = keyed.unwrap_or(false).then(|| first::<Vec<u8>>("SELECT k.key FROM pgwatch.claim_key k LIMIT 1", &[]));
    let key = key.flatten();
    let (objid, subid) = channel_lock_tag(key.as_deref().unwrap_or_default(), channel);
    // SAFETY: a lock on an object tag of pg_extension's catalog with a sub-id PostgreSQL never
    // gives an extension (it has no sub-objects), taken in the current transaction.
    unsafe {
        pg_sys::LockDatabaseObject(
            pg_sys::ExtensionRelationId,
            pg_sys::Oid::from(objid),
            subid,
            pg_sys::ExclusiveLock as pg_sys::LOCKMODE,
        )
    };
}

/// The object id and sub-id of `channel`'s claim lock: 47 bits of SipHash-2-4 keyed with `key`
/// (the database's, 16 random bytes; none in a database whose pgwatch is not updated yet), the
/// sub-id never 0.
fn channel_lock_tag(key: &[u8], channel: &str) -> (u32, u16) {
    let half = |range: std::ops::Range<usize>| {
        key.get(range).map_or(0, |bytes| u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
    };
    // SipHash-2-4, which std keeps as SipHasher (deprecated for hash maps, which need no key):
    // a pseudo-random function of the key, so that seeing tags tells nothing of other names'.
    #[allow(deprecated)]
    let mut hasher = std::hash::SipHasher::new_with_keys(half(0..8), half(8..16));
    std::hash::Hasher::write(&mut hasher, channel.as_bytes());
    let hash = std::hash::Hasher::finish(&hasher);
    ((hash >> 32) as u32, hash as u16 | 0x8000)
}

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

#[cfg(test)]
mod tests {
    use super::channel_lock_tag;

    #[test]
    fn a_channels_claim_lock_depends_on_the_databases_key() {
        let key: Vec<u8> = (1..=16).collect();
        let other: Vec<u8> = (101..=116).collect();
        let tag = channel_lock_tag(&key, "public.victim");
        assert_eq!(tag, channel_lock_tag(&key, "public.victim"));
        assert_ne!(tag, channel_lock_tag(&other, "public.victim"));
        assert_ne!(tag, channel_lock_tag(&key, "public.victin"));
        // Not the tag of an extension itself (sub-id 0), with or without a key.
        for key in [&key[..], &[]] {
            for channel in ["", "a", "public.victim", "mal_au0a9bb"] {
                assert!(channel_lock_tag(key, channel).1 >= 0x8000);
            }
        }
    }
}
