//! `pgwatch.position()` and `pgwatch.replay()`: a retained channel's last sequence number and the
//! payloads after a given one, exactly as they were notified, for roles that may read the whole
//! of what the watch sends.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

use crate::acl;
use crate::define::owner::{as_extension_owner, with_safe_search_path};
use crate::deliver::shmem;
use crate::deliver::slots::{set_latch, MAX_DATABASES};
use crate::error::{self, fail};
use crate::text;

/// Most payloads one call of `replay` returns.
pub const MAX_PAYLOADS: i32 = 10_000;

/// How long a reader waits for the worker to reset the database's feeds after a restart.
const READY_WAIT: Duration = Duration::from_secs(10);

/// A retained watch's feed: its table, the columns it sends or filters on (see [`refusal`]),
/// whether a condition filters its rows, and the feed's id.
struct Watched {
    tbl: pg_sys::Oid,
    /// As bytes in the database's encoding: not every name is valid UTF-8 in one that is not.
    columns: Vec<Vec<u8>>,
    condition: bool,
    feed: i64,
}

fn must_refetch(message: String) -> ! {
    fail(
        PgSqlErrorCode::ERRCODE_SNAPSHOT_TOO_OLD,
        message,
        "refetch the table, then go on from pgwatch.position() (see docs/replay.md)",
    )
}

/// A channel's name for a message, in any database's encoding.
fn channel_text(channel: &[u8]) -> String {
    text::shown(channel)
}

/// The retained watch on `channel`; must-refetch when none keeps its payloads.
fn watched(channel: &[u8]) -> Watched {
    let row = Spi::connect(|client| {
        let rows = client.select(
            "SELECT tbl::oid,
                    (SELECT pg_catalog.string_agg(pg_catalog.convert_to(c, pg_catalog.getdatabaseencoding()),
                                                  pg_catalog.decode('00', 'hex'))
                       FROM pg_catalog.unnest(key_columns || extra_columns || trigger_columns) AS c),
                    condition IS NOT NULL, feed_start
               FROM pgwatch.watches
              WHERE channel = pg_catalog.convert_from($1, pg_catalog.getdatabaseencoding()) AND retain IS NOT NULL",
            None,
            &[channel.into()],
        )?;
        match rows.into_iter().next() {
            Some(row) => {
                Ok(Some((row.get::<pg_sys::Oid>(1)?, row.get::<Vec<u8>>(2)?, row.get::<bool>(3)?, row.get::<i64>(4)?)))
            }
            None => Ok(None),
        }
    })
    .unwrap_or_else(|e: pgrx::spi::SpiError| error::spi_failed("pgwatch.watches", e));
    match row {
        Some((Some(tbl), columns, condition, Some(feed))) => {
            // NUL-separated: no name holds one.
            let columns = columns.map_or_else(Vec::new, |names| names.split(|&b| b == 0).map(<[u8]>::to_vec).collect());
            Watched { tbl, columns, condition: condition.unwrap_or(true), feed }
        }
        _ => must_refetch(format!("channel \"{}\" keeps no payloads to replay", channel_text(channel))),
    }
}

/// Why the current user may not replay a watch of table `tbl`, if they may not: they must be
/// able to read everything the watch sends and everything it chooses rows by, since which rows
/// it sent tells of those values too: SELECT on the table, or on each of `columns` (sent, key
/// and trigger columns) when no `condition` filters rows (a condition may read any column), USAGE
/// on its schema, and no row-level security in the way (replay cannot filter rows by policy).
pub fn refusal(tbl: pg_sys::Oid, columns: &[impl AsRef<[u8]>], condition: bool) -> Option<&'static str> {
    // SAFETY: reading the current user's id.
    let user = unsafe { pg_sys::GetUserId() };
    // SAFETY: a plain ACL check of an existing relation for the current user.
    let table = unsafe { pg_sys::pg_class_aclcheck(tbl, user, pg_sys::ACL_SELECT as _) };
    let readable = table == pg_sys::AclResult::ACLCHECK_OK
        || !condition
            && columns.iter().all(|column| {
                let Ok(name) = std::ffi::CString::new(column.as_ref()) else { return false };
                // SAFETY: a syscache lookup and an ACL check of an existing relation.
                unsafe {
                    let attnum = pg_sys::get_attnum(tbl, name.as_ptr());
                    attnum > 0
                        && pg_sys::pg_attribute_aclcheck(tbl, attnum, user, pg_sys::ACL_SELECT as _)
                            == pg_sys::AclResult::ACLCHECK_OK
                }
            });
    if !readable {
        return Some("you may not read its table");
    }
    // PostgreSQL lets nobody read a table in a schema they may not use, whatever the table's
    // own privileges.
    if !may_use_schema_of(tbl) {
        return Some("you may not use its table's schema");
    }
    // SAFETY: checks whether row-level security applies to the current user on the table (with
    // no ERROR when row_security is off and it would).
    let rls = unsafe { pg_sys::check_enable_rls(tbl, pg_sys::Oid::INVALID, true) }
        == pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32;
    rls.then_some("row-level security applies to you on its table")
}

/// Whether the current role has USAGE on the schema of table `tbl`.
fn may_use_schema_of(tbl: pg_sys::Oid) -> bool {
    // SAFETY: a syscache lookup of an existing relation.
    let schema = unsafe { pg_sys::get_rel_namespace(tbl) };
    // A table dropped meanwhile: nothing to read (an ACL check would fail on the missing schema).
    if schema == pg_sys::Oid::INVALID {
        return false;
    }
    acl::allowed(acl::Object::Schema(schema), pg_sys::ACL_USAGE)
}

/// Refuses the current user unless they may replay the watch (see [`refusal`]).
fn check_access(watched: &Watched, channel: &[u8]) {
    if let Some(why) = refusal(watched.tbl, &watched.columns, watched.condition) {
        fail(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied to replay channel \"{}\": {why}", channel_text(channel)),
            "replay needs USAGE on the watched table's schema, SELECT on the table (or, for a watch without a condition, on every column it sends or fires on), and no row-level security policy in the way",
        );
    }
}

/// Waits until the database's feeds are ready to be read: after a restart that was not clean,
/// the worker first writes their reset markers (a reader starts it if need be).
fn await_ready() {
    let Some(shared) = shmem::shared() else {
        fail(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "replay needs pgwatch's delivery worker, which runs only when pgwatch is preloaded".into(),
            "add pgwatch to shared_preload_libraries in postgresql.conf and restart the server",
        );
    };
    // SAFETY: reading the id of the database this backend is connected to.
    let dboid = unsafe { pg_sys::MyDatabaseId }.to_u32();
    // Without a slot this database's retained changes are notified inline and not logged: the
    // log cannot be trusted to be whole.
    let Some(slot) = shared.claim_slot(dboid) else {
        fail(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("no delivery slot is free for this database: {MAX_DATABASES} databases already use pgwatch's delivery worker"),
            "retry once a database has stopped using pgwatch; its changes meanwhile are marked by a reset",
        );
    };
    let deadline = Instant::now() + READY_WAIT;
    loop {
        if slot.feeds_ready.load(Ordering::Acquire) {
            return;
        }
        slot.worker_wanted.store(true, Ordering::Release);
        set_latch(&shared.launcher_latch);
        if Instant::now() >= deadline {
            break;
        }
        // SAFETY: a plain sleep; interrupts are checked right after.
        unsafe { pg_sys::pg_usleep(10_000) };
        pg_sys::check_for_interrupts!();
    }
    fail(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        "pgwatch has not yet reset this database's feeds after a restart or changes it could not log".into(),
        "retry in a moment; pgwatch.workers shows whether the database's delivery worker runs",
    );
}

/// The position of the feed and, when `after` is given, up to `max` payloads after it (seq,
/// prev, payload), read in one statement (one snapshot), as the extension's owner.
fn read(channel: &[u8], after: Option<i64>, max: i32) -> (i64, Vec<(i64, i64, Vec<u8>)>) {
    let watched = watched(channel);
    check_access(&watched, channel);
    await_ready();
    // The position alone reads no segment of the log: a reader's locks on the log make pruning
    // fall back to DELETE (see `prune`).
    let query = if after.is_none() {
        "SELECT coalesce((SELECT f.seq FROM pgwatch.feeds f
                           WHERE f.channel = pg_catalog.convert_from($1, pg_catalog.getdatabaseencoding()) AND f.feed = $2),
                         $2 - 1), NULL::int8, NULL::int8, NULL::bytea"
    } else {
        "WITH position AS (
            SELECT coalesce((SELECT f.seq FROM pgwatch.feeds f
                              WHERE f.channel = pg_catalog.convert_from($1, pg_catalog.getdatabaseencoding()) AND f.feed = $2),
                            $2 - 1) AS position)
        SELECT p.position, l.seq, l.prev, l.payload FROM position p
          LEFT JOIN LATERAL (SELECT g.seq, g.prev, g.payload FROM pgwatch.log g
                              WHERE g.channel = pg_catalog.convert_from($1, pg_catalog.getdatabaseencoding())
                                AND g.feed = $2 AND g.seq > $3
                              ORDER BY g.seq LIMIT $4) l ON true"
    };
    with_safe_search_path(|| {
        as_extension_owner(|| {
            Spi::connect_mut(|client| {
                let rows =
                    client.update(query, None, &[channel.into(), watched.feed.into(), after.into(), max.into()])?;
                let mut position = 0;
                let mut payloads = Vec::new();
                for row in rows {
                    position = row.get::<i64>(1)?.unwrap_or_default();
                    if let (Some(seq), Some(prev), Some(payload)) =
                        (row.get::<i64>(2)?, row.get::<i64>(3)?, row.get::<Vec<u8>>(4)?)
                    {
                        payloads.push((seq, prev, payload));
                    }
                }
                Ok((position, payloads))
            })
            .unwrap_or_else(|e: pgrx::spi::SpiError| error::spi_failed("pgwatch.log", e))
        })
    })
}

/// The last sequence number sent on `channel`.
pub fn position(channel: Option<&[u8]>) -> i64 {
    let Some(channel) = channel else {
        fail(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, "channel must not be NULL".into(), "pass a channel name");
    };
    read(channel, None, 0).0
}

/// The payloads sent on `channel` after `after`, at most `max`, in order: all of them from
/// `after + 1` on, or must-refetch (72000) when the log cannot give that.
pub fn replay(channel: Option<&[u8]>, after: Option<i64>, max: Option<i32>) -> Vec<(i64, Vec<u8>)> {
    let (Some(channel), Some(after), Some(max)) = (channel, after, max) else {
        fail(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "channel, after_seq and max_payloads must not be NULL".into(),
            "pass the last seq your copy applied as after_seq",
        );
    };
    if !(1..=MAX_PAYLOADS).contains(&max) {
        fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("max_payloads must be between 1 and {MAX_PAYLOADS}, not {max}"),
            "call replay again from the last seq it returned for more",
        );
    }
    let (position, payloads) = read(channel, Some(after), max);
    if after == position {
        return Vec::new();
    }
    if after > position {
        must_refetch(format!(
            "seq {after} was never sent on channel \"{}\", whose last seq is {position}",
            channel_text(channel)
        ));
    }
    let mut expected = after;
    for (seq, prev, _) in &payloads {
        if *prev != expected {
            must_refetch(format!(
                "the log of channel \"{}\" no longer holds what followed seq {expected}",
                channel_text(channel)
            ));
        }
        expected = *seq;
    }
    if payloads.is_empty() {
        must_refetch(format!(
            "the log of channel \"{}\" no longer holds what followed seq {after}",
            channel_text(channel)
        ));
    }
    payloads.into_iter().map(|(seq, _, payload)| (seq, payload)).collect()
}
