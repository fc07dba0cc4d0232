//! The SQL interface: every function and trigger PostgreSQL calls, as thin shims over the modules
//! that do the work. What the extension installs besides (the catalog table, the event triggers,
//! `watch_table()`) is SQL, in `sql/`.
//!
//! The C symbols (`<name>_wrapper`) are what earlier releases' SQL names: a database still on an
//! older version's SQL keeps working with this library until `ALTER EXTENSION pgwatch UPDATE`.

use std::convert::Infallible;
use std::sync::atomic::Ordering;

use pgrx::prelude::*;

use crate::acl;
use crate::capture;
use crate::define::validate::{watchable, RegClass, WatchArgs};
use crate::define::{follow, owner, validate, watches};
use crate::deliver::shmem;
use crate::feed;
use crate::model::watch::Shape;
use crate::stats::{self, Counter};
use crate::text::{self, TextArg};

#[pg_schema]
mod pgwatch {
    use super::*;

    /// Creates or replaces the watch of `tbl` named `label`; returns its id. Called by
    /// `watch_table()`, which returns the catalog row. `retain` comes in seconds.
    #[pg_extern(volatile, name = "define_watch")]
    #[search_path(pg_catalog, pg_temp)]
    #[allow(clippy::too_many_arguments)]
    fn define_retained_watch(
        tbl: Option<RegClass>,
        events: Option<TextArg>,
        extra_columns: Option<Vec<Option<TextArg>>>,
        label: Option<TextArg>,
        trigger_columns: Option<Vec<Option<TextArg>>>,
        condition: Option<TextArg>,
        payload: Option<TextArg>,
        fire_on_replica: Option<bool>,
        retain: Option<f64>,
    ) -> i64 {
        let args = WatchArgs {
            tbl,
            events: text::arg(&events),
            extra_columns: text::args(extra_columns),
            label: text::arg(&label),
            trigger_columns: text::args(trigger_columns),
            condition: text::arg(&condition),
            payload: text::arg(&payload),
            fire_on_replica,
            retain,
        };
        let (rel, watch, whens) = validate::watch(args);
        watches::save(rel, &watch, &whens, Shape::Current)
    }

    /// 0.3.0's `watch_table()` calls this (0.2.0's too): kept, without SQL of its own, so that a
    /// database still on that SQL keeps working with this library until `ALTER EXTENSION
    /// pgwatch UPDATE`.
    #[pg_extern(volatile, sql = false)]
    #[search_path(pg_catalog, pg_temp)]
    #[allow(clippy::too_many_arguments)]
    fn define_watch(
        tbl: Option<RegClass>,
        events: Option<TextArg>,
        extra_columns: Option<Vec<Option<TextArg>>>,
        label: Option<TextArg>,
        trigger_columns: Option<Vec<Option<TextArg>>>,
        condition: Option<TextArg>,
        payload: Option<TextArg>,
        fire_on_replica: Option<bool>,
    ) -> i64 {
        let args = WatchArgs {
            tbl,
            events: text::arg(&events),
            extra_columns: text::args(extra_columns),
            label: text::arg(&label),
            trigger_columns: text::args(trigger_columns),
            condition: text::arg(&condition),
            payload: text::arg(&payload),
            fire_on_replica,
            retain: None,
        };
        let (rel, watch, whens) = validate::watch(args);
        watches::save(rel, &watch, &whens, Shape::V0_3)
    }

    /// 0.1.0's `watch_table()` calls this. It is kept, without SQL of its own, so that a database
    /// still on 0.1.0's SQL keeps working with this library until `ALTER EXTENSION pgwatch UPDATE`.
    #[pg_extern(volatile, sql = false)]
    #[search_path(pg_catalog, pg_temp)]
    fn apply_watch(
        tbl: Option<RegClass>,
        events: Option<TextArg>,
        extra_columns: Option<Vec<Option<TextArg>>>,
        label: Option<TextArg>,
    ) -> i64 {
        let args = WatchArgs {
            tbl,
            events: text::arg(&events),
            extra_columns: text::args(extra_columns),
            label: text::arg(&label),
            trigger_columns: None,
            condition: None,
            payload: Some("full"),
            fire_on_replica: Some(false),
            retain: None,
        };
        let (rel, watch, whens) = validate::watch(args);
        watches::save(rel, &watch, &whens, Shape::V0_1)
    }

    /// Whether pgwatch itself is running the current DDL (read by its event triggers).
    #[pg_extern(volatile)]
    fn managing() -> bool {
        owner::managing()
    }

    /// Makes the triggers of watch `id` again as this library makes them (statement triggers
    /// where they suffice, one argument each), keeping their WHEN conditions as they are: what
    /// `ALTER EXTENSION pgwatch UPDATE` does for the watches an earlier release made. Needs what
    /// watching the table needs.
    #[pg_extern(volatile)]
    #[search_path(pg_catalog, pg_temp)]
    fn renew_watch(id: i64) {
        watches::renew(id)
    }

    /// Called at the end of DDL that can change a watched table (see `sql/ddl.sql`): watches
    /// follow renamed tables, schemas and columns, and get row triggers where the table now needs
    /// them (a new trigger, a new place in an inheritance tree).
    #[pg_extern(volatile)]
    #[search_path(pg_catalog, pg_temp)]
    fn follow_ddl() {
        follow::follow_ddl()
    }

    /// One row of counters: see docs/api.md (`pgwatch.stats()`).
    #[pg_extern(volatile, parallel_safe)]
    #[allow(clippy::type_complexity)] // pgrx reads the column names from the signature
    fn stats() -> TableIterator<
        'static,
        (
            name!(rows_captured, i64),
            name!(rows_sent, i64),
            name!(notifications, i64),
            name!(payload_bytes, i64),
            name!(batches, i64),
            name!(rows_per_notification, f64),
            name!(partial_rows, i64),
            name!(overflows, i64),
            name!(inline_fallbacks, i64),
            name!(queue_high_water, i64),
            name!(worker_restarts, i64),
            name!(prepared_unsent, i64),
            name!(resyncs, i64),
            name!(skipped_records, i64),
            name!(log_payloads, i64),
            name!(log_bytes, i64),
            name!(pruned_payloads, i64),
            name!(pruned_bytes, i64),
            name!(prunes_skipped, i64),
            name!(feed_resets, i64),
            name!(retained_unlogged, i64),
            name!(passed_over, i64),
        ),
    > {
        stats::flush();
        let notifications = stats::get(Counter::Notifications);
        let high_water = shmem::shared().map_or(0, |s| s.high_water.load(Ordering::Relaxed) as i64);
        TableIterator::once((
            stats::get(Counter::RowsCaptured),
            stats::get(Counter::RowsSent),
            notifications,
            stats::get(Counter::PayloadBytes),
            stats::get(Counter::Batches),
            stats::get(Counter::RowsSent) as f64 / notifications.max(1) as f64,
            stats::get(Counter::PartialRows),
            stats::get(Counter::Overflows),
            stats::get(Counter::InlineFallbacks),
            high_water,
            stats::get(Counter::WorkerRestarts),
            stats::get(Counter::PreparedUnsent),
            stats::get(Counter::Resyncs),
            stats::get(Counter::SkippedRecords),
            stats::get(Counter::LogPayloads),
            stats::get(Counter::LogBytes),
            stats::get(Counter::PrunedPayloads),
            stats::get(Counter::PrunedBytes),
            stats::get(Counter::PrunesSkipped),
            stats::get(Counter::FeedResets),
            stats::get(Counter::RetainedUnlogged),
            stats::get(Counter::PassedOver),
        ))
    }

    /// The last sequence number sent on a retained channel (`pgwatch.position()`, which passes
    /// the channel in the database's encoding).
    #[pg_extern(volatile)]
    #[search_path(pg_catalog, pg_temp)]
    fn read_position(channel: Option<&[u8]>) -> i64 {
        feed::read::position(channel)
    }

    /// Whether the current user may replay a retained watch of `tbl` that sends or fires on
    /// `columns` (their names as bytes in the database's encoding), with a `condition` or not (see `feed::read::refusal`): the rows of
    /// `pgwatch.channels` they see. A table dropped since the caller's snapshot: no.
    #[pg_extern(stable, parallel_safe)]
    #[search_path(pg_catalog, pg_temp)]
    fn may_replay(tbl: pg_sys::Oid, columns: pgrx::datum::Array<'_, &[u8]>, condition: bool) -> bool {
        let Some(columns) = columns.iter().collect::<Option<Vec<&[u8]>>>() else { return false };
        // SAFETY: a syscache lookup, its tuple released at once.
        let exists = unsafe {
            let tuple = pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::RELOID as i32, pg_sys::Datum::from(tbl));
            !tuple.is_null() && {
                pg_sys::ReleaseSysCache(tuple);
                true
            }
        };
        exists && feed::read::refusal(tbl, &columns, condition).is_none()
    }

    /// The payloads of a retained channel after `after_seq` (`pgwatch.replay()`, which turns
    /// them into text of the database's encoding).
    #[pg_extern(volatile)]
    #[search_path(pg_catalog, pg_temp)]
    fn read_replay(
        channel: Option<&[u8]>,
        after_seq: Option<i64>,
        max_payloads: Option<i32>,
    ) -> TableIterator<'static, (name!(seq, i64), name!(payload, Vec<u8>))> {
        TableIterator::new(feed::read::replay(channel, after_seq, max_payloads))
    }

    /// The delivery workers: one row per database that uses worker delivery.
    #[pg_extern(volatile)]
    #[allow(clippy::type_complexity)] // pgrx reads the column names from the signature
    fn worker_status() -> TableIterator<
        'static,
        (
            name!(database, Option<String>),
            name!(pid, Option<i32>),
            name!(state, String),
            name!(last_send, Option<pgrx::datetime::TimestampWithTimeZone>),
            name!(backlog, i64),
        ),
    > {
        let Some(shared) = shmem::shared() else { return TableIterator::new(Vec::new()) };
        let every_database = reads_all_stats();
        let rows: Vec<_> = shared
            .slots
            .iter()
            .filter(|slot| slot.dboid.load(Ordering::Relaxed) != 0)
            .filter_map(|slot| {
                let dboid = pg_sys::Oid::from(slot.dboid.load(Ordering::Relaxed));
                // SAFETY: a syscache lookup; NULL for a database dropped meanwhile.
                let name = unsafe { pg_sys::get_database_name(dboid) };
                // As PostgreSQL's database sizes: only of databases the role may connect to.
                if !every_database
                    && (name.is_null() || !acl::allowed(acl::Object::Database(dboid), pg_sys::ACL_CONNECT))
                {
                    return None;
                }
                // SAFETY: a database name is a NUL-terminated string.
                let name =
                    (!name.is_null()).then(|| unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy().into());
                let pid = slot.pid.load(Ordering::Relaxed);
                let last_send = slot.last_send.load(Ordering::Relaxed);
                Some((
                    name,
                    (pid != 0).then_some(pid),
                    slot.state().as_str().to_string(),
                    (last_send != 0).then(|| last_send.try_into().ok()).flatten(),
                    slot.backlog.load(Ordering::Relaxed) as i64,
                ))
            })
            .collect();
        TableIterator::new(rows)
    }
}

/// Whether the current role has the rights of pg_read_all_stats (superusers do).
fn reads_all_stats() -> bool {
    #[cfg(feature = "pg13")]
    let role = pg_sys::DEFAULT_ROLE_READ_ALL_STATS;
    #[cfg(not(feature = "pg13"))]
    let role = pg_sys::ROLE_PG_READ_ALL_STATS;
    // SAFETY: a role membership check of the current user.
    unsafe { pg_sys::has_privs_of_role(pg_sys::GetUserId(), pg_sys::Oid::from(role)) }
}

/// Removes the watch of `tbl` named `label`, or every watch of `tbl` when `label` is NULL, with
/// their triggers. Returns how many watches were removed.
#[pg_extern(volatile)]
#[search_path(pg_catalog, pg_temp)]
fn unwatch_table(tbl: Option<RegClass>, label: default!(Option<TextArg>, "NULL")) -> i32 {
    let rel = watchable(tbl);
    watches::remove(&rel, text::arg(&label))
}

/// The trigger of every watch (see `capture::trigger`), called through [`capture_wrapper`].
#[pg_trigger(
    sql = "CREATE FUNCTION pgwatch.capture() RETURNS trigger LANGUAGE c AS 'MODULE_PATHNAME', 'capture_wrapper';"
)]
fn capture_as_trigger<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, Infallible> {
    capture::trigger::capture(trigger)
}

/// `pgwatch.capture()`: called other than as a trigger (`SELECT pgwatch.capture()`), it fails as
/// a trigger function should (39P01), where pgrx's wrapper would panic (XX000).
///
/// # Safety
/// Called by PostgreSQL as a version-1 C function.
#[unsafe(no_mangle)]
#[pg_guard]
pub unsafe extern "C-unwind" fn capture_wrapper(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: fcinfo is this call's; a trigger's context is its TriggerData, checked by tag.
    let as_trigger = unsafe { !fcinfo.is_null() && pgrx::is_a((*fcinfo).context, pg_sys::NodeTag::T_TriggerData) };
    if !as_trigger {
        crate::error::fail(
            pgrx::PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
            "pgwatch.capture() was not called as a trigger".into(),
            "it is the trigger function of pgwatch's watches: use watch_table()",
        );
    }
    // SAFETY: called as a trigger, as pgrx's wrapper expects.
    unsafe { capture_as_trigger_wrapper(fcinfo) }
}

/// Marks `capture_wrapper` as a version-1 C function.
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_capture_wrapper() -> &'static pg_sys::Pg_finfo_record {
    static V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// The `ddl_command_start` event trigger of ALTER TABLE and DROP TABLE (`pgwatch.on_ddl_command_start()`, see
/// `define::follow`): a C function, since it reads the command's parse tree.
///
/// # Safety
/// Called by PostgreSQL as an event trigger function.
#[unsafe(no_mangle)]
#[pg_guard]
pub unsafe extern "C-unwind" fn pgwatch_on_ddl_command_start(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: as PostgreSQL calls it.
    unsafe { follow::on_ddl_command_start(fcinfo) };
    pg_sys::Datum::from(0)
}

/// Marks `pgwatch_on_ddl_command_start` as a version-1 C function.
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_pgwatch_on_ddl_command_start() -> &'static pg_sys::Pg_finfo_record {
    static V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}
