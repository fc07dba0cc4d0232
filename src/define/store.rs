//! `pgwatch.watches`, the catalog of watches: what is read from it and written to it, and the
//! rules it keeps (one watch per channel; a capture trigger must be a watch's).

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::{PgRelation, PgSqlErrorCode};

use super::owner::{as_extension_owner, column, first, with_safe_search_path};
use super::triggers::watch_id_of;
use crate::error::{self, fail};
use crate::model::events::Events;
use crate::model::trigger_arg::{Layout, TriggerArg};
use crate::model::watch::{PayloadMode, Shape, TableName, Watch};
use crate::text;

/// The table's primary key columns, in key order (none without a primary key); not the
/// columns an `INCLUDE` clause adds to its index. Names must be readable (see `crate::text`).
pub fn primary_key(rel: &PgRelation) -> Vec<String> {
    let attnums: Vec<i32> = column(
        "SELECT k.attnum::int4
           FROM pg_catalog.pg_index i,
                unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
          WHERE i.indrelid = $1 AND i.indisprimary AND k.n <= i.indnkeyatts
          ORDER BY k.n",
        &[rel.oid().into()],
    );
    let tupdesc = rel.tuple_desc();
    attnums
        .iter()
        .filter_map(|&attnum| tupdesc.get(attnum as usize - 1))
        .map(|attr| text::column_name(rel, attr).to_string())
        .collect()
}

/// The table, or the first partition under it, whose primary key is deferrable. Its keys may
/// repeat until the check at the end of the statement or transaction, and coalescing, which finds
/// rows by key, would fold different rows together (`UPDATE ... SET id = id + 1` in key order).
/// A partition attached with a deferrable key is one: PostgreSQL does not compare deferrability.
pub fn deferrable_primary_key(tbl: pg_sys::Oid) -> Option<String> {
    // As bytes, shown readably whatever the names (the message is all it is for).
    Spi::get_one_with_args::<Vec<u8>>(
        "SELECT (SELECT pg_catalog.convert_to(pg_catalog.format('%I.%I', n.nspname, c.relname),
                                              pg_catalog.getdatabaseencoding())
                   FROM (SELECT $1::pg_catalog.regclass AS relid, 0 AS level
                         UNION ALL  -- (empty for a table that is neither partition nor partitioned)
                         SELECT relid, level FROM pg_catalog.pg_partition_tree($1) WHERE level > 0) t
                   JOIN pg_catalog.pg_constraint k ON k.conrelid = t.relid AND k.contype = 'p' AND k.condeferrable
                   JOIN pg_catalog.pg_class c ON c.oid = t.relid
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                  ORDER BY t.level, c.relname
                  LIMIT 1)",
        &[tbl.into()],
    )
    .unwrap_or_else(|e| error::spi_failed("pgwatch.watches", e))
    .map(|name| text::shown(&name))
}

/// The table's column names, in column order.
pub fn column_names(rel: &PgRelation) -> Vec<String> {
    rel.tuple_desc()
        .iter()
        .filter(|attr| !attr.is_dropped())
        .map(|attr| text::column_name(rel, attr).to_string())
        .collect()
}

/// The stored definition of watch `id`.
pub fn load(id: i64) -> Option<Watch> {
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT tbl::oid, label, channel, array_to_string(events, ','), key_columns, extra_columns,
                    trigger_columns, condition, payload, fire_on_replica,
                    -- (read so, since a database still on 0.3.0's SQL has no such column)
                    (extract(epoch FROM (to_jsonb(w) ->> 'retain')::interval) * 1000000)::int8
               FROM pgwatch.watches w WHERE id = $1",
            None,
            &[id.into()],
        )?;
        let Some(row) = rows.into_iter().next() else { return Ok(None) };
        let events = row.get::<String>(4)?.unwrap_or_default();
        Ok(Some(Watch {
            tbl: row.get(1)?.unwrap_or(pg_sys::Oid::INVALID),
            label: row.get(2)?,
            channel: row.get(3)?.unwrap_or_default(),
            events: Events::parse(&events).unwrap_or_else(|_| error!("pgwatch: watch {id} has events {events}")),
            keys: row.get(5)?.unwrap_or_default(),
            extras: row.get(6)?.unwrap_or_default(),
            trigger_columns: row.get(7)?.unwrap_or_default(),
            condition: row.get(8)?,
            payload: {
                let payload = row.get::<String>(9)?.unwrap_or_default();
                PayloadMode::ALL.into_iter().find(|mode| mode.as_str() == payload).unwrap_or(PayloadMode::Full)
            },
            fire_on_replica: row.get(10)?.unwrap_or(false),
            retain: row.get(11)?,
        }))
    })
    .unwrap_or_else(|e: pgrx::spi::SpiError| error::spi_failed("pgwatch.watches", e))
}

/// Refuses `watch`'s channel if another watch uses it, or if it is a new label with a dot: a
/// channel carries one watch's changes, so that its sequence numbers count them and no one takes
/// another table's channel through pgwatch. A table's default channel (`schema.table`) always
/// holds a dot, so no label made since 0.4.0 can be one, and no one can take the default channel
/// of a table before it is made; a watch that already has a label with a dot (made before 0.4.0)
/// keeps it when defined again. `id` is the watch's own, when it exists; a watch being replaced is
/// the one of its table and label. The unique index on the channel (`sql/bootstrap.sql`) settles
/// a race with a concurrent definition; this check words the refusal.
pub fn claim_channel(watch: &Watch, table: &TableName, id: Option<i64>) {
    let (taken, kept) = Spi::get_three_with_args::<i64, String, bool>(
        "SELECT w.id, w.tbl::text,
                EXISTS (SELECT FROM pgwatch.watches WHERE tbl = $2::oid AND label = $4)
           FROM (SELECT) AS one
           LEFT JOIN LATERAL (SELECT id, tbl FROM pgwatch.watches
                               WHERE channel = $1 AND ($3::int8 IS NULL OR id <> $3)
                                 AND ($3::int8 IS NOT NULL OR NOT (tbl = $2::oid AND label IS NOT DISTINCT FROM $4))
                               ORDER BY id LIMIT 1) AS w ON true",
        &[watch.channel.as_str().into(), watch.tbl.into(), id.into(), watch.label.as_deref().into()],
    )
    .map(|(id, tbl, kept)| ((id, tbl), kept.unwrap_or(false)))
    .unwrap_or_else(|e| error::spi_failed("pgwatch.watches", e));
    if let Some(label) = watch.label.as_deref().filter(|label| label.contains('.') && !kept) {
        fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("label \"{label}\" holds a dot"),
            "a table's own channel is its schema.table name, and a label never takes one: choose a label without a dot",
        );
    }
    if let (Some(id), tbl) = taken {
        fail(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            format!(
                "channel \"{}\" is already used by pgwatch watch {id} of table {}",
                watch.channel,
                tbl.unwrap_or_default()
            ),
            &format!("a channel carries one watch's changes: give the watch of {} another label", table.display),
        );
    }
}

/// The table name subscribers know the watch of trigger `name` on table `relid` by (`schema.table`
/// as payloads write it, of its current name), if the trigger is one pgwatch made: a watch's
/// trigger on the watch's table (or a partition under it, which has a clone of it) with the
/// watch's channel, key and extra columns, payload layout and retention in its argument `arg`. A
/// trigger of a user's own that runs `pgwatch.capture()` could otherwise send on any channel, with
/// its changes folded into those of the watch that owns it, or fold its own rows by other columns
/// than its key. The table name in `arg` is not used: a trigger names its table as it was when the
/// trigger was made, which PostgreSQL does not keep in step with renames where pgwatch does not
/// follow them (under `session_replication_role = replica`, no event trigger fires). Read once
/// per trigger and backend (see `plan`), never per row.
pub fn made_by_pgwatch(name: &str, relid: pg_sys::Oid, arg: &TriggerArg) -> Option<Vec<u8>> {
    let id = watch_id_of(name)?;
    let columns: Vec<Vec<u8>> = arg.columns.clone();
    with_safe_search_path(|| {
        as_extension_owner(|| {
            let query = concat!(
                    "SELECT pg_catalog.convert_to(",
                    crate::display_name_sql!(),
                    ", pg_catalog.getdatabaseencoding())
                       FROM pgwatch.watches w, pg_catalog.pg_class c, pg_catalog.pg_namespace n
                      WHERE w.id OPERATOR(pg_catalog.=) $1
                        AND pg_catalog.convert_to(w.channel, pg_catalog.getdatabaseencoding()) OPERATOR(pg_catalog.=) $3
                        AND ((pg_catalog.to_jsonb(w) OPERATOR(pg_catalog.->>) 'retain') IS NOT NULL) OPERATOR(pg_catalog.=) $4
                        AND (w.tbl::pg_catalog.oid OPERATOR(pg_catalog.=) $2
                             OR w.tbl::pg_catalog.oid IN (SELECT a.relid::pg_catalog.oid
                                                            FROM pg_catalog.pg_partition_ancestors($2::pg_catalog.regclass) a))
                        AND c.oid OPERATOR(pg_catalog.=) w.tbl::pg_catalog.oid AND n.oid OPERATOR(pg_catalog.=) c.relnamespace
                        AND pg_catalog.cardinality(w.key_columns) OPERATOR(pg_catalog.=) $5
                        AND (SELECT pg_catalog.array_agg(pg_catalog.convert_to(u.name, pg_catalog.getdatabaseencoding()) ORDER BY u.i)
                               FROM pg_catalog.unnest(w.key_columns OPERATOR(pg_catalog.||) w.extra_columns)
                                    WITH ORDINALITY AS u(name, i)) OPERATOR(pg_catalog.=) $6
                        AND (COALESCE(pg_catalog.to_jsonb(w) OPERATOR(pg_catalog.->>) 'payload', 'full')
                             OPERATOR(pg_catalog.=) 'compact') OPERATOR(pg_catalog.=) $7"
            );
            let args = [
                id.into(),
                relid.into(),
                arg.channel.as_slice().into(),
                arg.retained.into(),
                (arg.keys as i32).into(),
                columns.into(),
                (arg.layout == Layout::Compact).into(),
            ];
            // Read-only: a trigger's first firing takes no snapshot or command of its own.
            Spi::connect(|client| {
                let rows = client.select(query, Some(1), &args)?;
                rows.into_iter().next().map_or(Ok(None), |row| row.get::<Vec<u8>>(1))
            })
            .unwrap_or_else(|e| error::spi_failed("pgwatch.watches", e))
        })
    })
}

/// Stores `watch`, replacing the watch of its table and label if there is one (in the columns
/// `shape` has); returns its id and whether it replaced one.
pub fn upsert(watch: &Watch, shape: Shape) -> (i64, bool) {
    let events: Vec<String> = watch.events.iter().map(|event| event.as_str().to_string()).collect();
    // SAFETY: reading the clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    let fields: [DatumWithOid; 12] = [
        watch.tbl.into(),
        watch.label.as_deref().into(),
        watch.channel.as_str().into(),
        events.into(),
        watch.extras.clone().into(),
        watch.keys.clone().into(),
        watch.trigger_columns.clone().into(),
        watch.condition.as_deref().into(),
        watch.payload.as_str().into(),
        watch.fire_on_replica.into(),
        watch.retain.into(),
        now.into(),
    ];
    let (update, insert, fields) = match shape {
        Shape::V0_1 => (
            "UPDATE pgwatch.watches SET channel = $3, events = $4, extra_columns = $5, key_columns = $6
          WHERE tbl = $1::regclass AND label IS NOT DISTINCT FROM $2 RETURNING id",
            "INSERT INTO pgwatch.watches (tbl, label, channel, events, extra_columns, key_columns)
         VALUES ($1::regclass, $2, $3, $4, $5, $6) RETURNING id",
            &fields[..6],
        ),
        Shape::V0_3 => (
            "UPDATE pgwatch.watches SET channel = $3, events = $4, extra_columns = $5, key_columns = $6,
            trigger_columns = $7, condition = $8, payload = $9, fire_on_replica = $10
          WHERE tbl = $1::regclass AND label IS NOT DISTINCT FROM $2 RETURNING id",
            "INSERT INTO pgwatch.watches (tbl, label, channel, events, extra_columns, key_columns,
                          trigger_columns, condition, payload, fire_on_replica)
         VALUES ($1::regclass, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
            &fields[..10],
        ),
        // A feed goes on while its watch keeps retention, its channel, what its payloads carry
        // and how it chooses rows; otherwise a new one starts (see `feed`): a feed's payloads are
        // read by whoever may read every column it sends and chooses rows by now, so narrowing
        // those (or dropping a condition) must not expose older payloads.
        Shape::Current => (
            "UPDATE pgwatch.watches SET channel = $3, events = $4, extra_columns = $5, key_columns = $6,
            trigger_columns = $7, condition = $8, payload = $9, fire_on_replica = $10,
            retain = $11 * interval '1 microsecond',
            feed_start = CASE WHEN $11 IS NULL THEN NULL
                              WHEN retain IS NOT NULL AND channel = $3 AND key_columns = $6
                                   AND extra_columns = $5 AND payload IS NOT DISTINCT FROM $9
                                   AND trigger_columns = $7 AND condition IS NOT DISTINCT FROM $8 THEN feed_start
                              ELSE $12 END
          WHERE tbl = $1::regclass AND label IS NOT DISTINCT FROM $2 RETURNING id",
            "INSERT INTO pgwatch.watches (tbl, label, channel, events, extra_columns, key_columns,
                          trigger_columns, condition, payload, fire_on_replica, retain, feed_start)
         VALUES ($1::regclass, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11 * interval '1 microsecond',
                 CASE WHEN $11 IS NULL THEN NULL ELSE $12 END) RETURNING id",
            &fields[..],
        ),
    };
    if let Some(id) = first::<i64>(update, fields) {
        return (id, true);
    }
    (first::<i64>(insert, fields).expect("INSERT ... RETURNING returns the id"), false)
}

/// Whether storing `watch` changes what the watch of its table and label sends: its events,
/// columns, condition, payload format, firing on replicas, or whether it keeps its payloads (a
/// longer or shorter `retain` changes nothing sent). Subscribers' copies were made by the old
/// definition, so they refetch. False when there is no such watch yet, with 0.1.0's SQL, and when
/// a retained watch starts a new feed (see `upsert`): its numbers jump, which tells subscribers.
pub fn redefines(watch: &Watch, shape: &Shape) -> bool {
    let events: Vec<String> = watch.events.iter().map(|event| event.as_str().to_string()).collect();
    let query = match shape {
        Shape::V0_1 => return false,
        Shape::V0_3 => {
            "SELECT (events, extra_columns, trigger_columns, condition, payload, fire_on_replica)
                    IS DISTINCT FROM ($3::text[], $4::text[], $5::text[], $6::text, $7::text, $8::bool)
               FROM pgwatch.watches WHERE tbl = $1::regclass AND label IS NOT DISTINCT FROM $2"
        }
        Shape::Current => {
            "SELECT (events, extra_columns, trigger_columns, condition, payload, fire_on_replica, retain IS NULL)
                    IS DISTINCT FROM ($3::text[], $4::text[], $5::text[], $6::text, $7::text, $8::bool, $9::int8 IS NULL)
                    AND NOT ($9::int8 IS NOT NULL
                             AND (retain IS NULL OR extra_columns IS DISTINCT FROM $4 OR payload IS DISTINCT FROM $7))
               FROM pgwatch.watches WHERE tbl = $1::regclass AND label IS NOT DISTINCT FROM $2"
        }
    };
    let args: [DatumWithOid; 9] = [
        watch.tbl.into(),
        watch.label.as_deref().into(),
        events.into(),
        watch.extras.clone().into(),
        watch.trigger_columns.clone().into(),
        watch.condition.as_deref().into(),
        watch.payload.as_str().into(),
        watch.fire_on_replica.into(),
        watch.retain.into(),
    ];
    let args = if matches!(shape, Shape::Current) { &args[..] } else { &args[..8] };
    first::<bool>(query, args).unwrap_or(false)
}

/// Removes the watch of table `tbl` named `label`, or all of them when `label` is NULL; their ids.
pub fn delete(tbl: pg_sys::Oid, label: Option<&str>) -> Vec<i64> {
    column(
        "DELETE FROM pgwatch.watches WHERE tbl = $1::regclass AND ($2::text IS NULL OR label = $2)
         RETURNING id",
        &[tbl.into(), label.into()],
    )
}

/// Stores what following a rename changed of watch `id`: its channel and column names. A
/// retained watch whose channel changed starts a new feed.
pub fn store_names(id: i64, watch: &Watch) {
    if watch.retain.is_some() {
        // SAFETY: reading the clock.
        let now = unsafe { pg_sys::GetCurrentTimestamp() };
        super::owner::run(
            "UPDATE pgwatch.watches SET feed_start = $3 WHERE id = $1 AND channel IS DISTINCT FROM $2",
            &[id.into(), watch.channel.as_str().into(), now.into()],
        );
    }
    super::owner::run(
        "UPDATE pgwatch.watches SET channel = $2, key_columns = $3, extra_columns = $4, trigger_columns = $5
          WHERE id = $1",
        &[
            id.into(),
            watch.channel.as_str().into(),
            watch.keys.clone().into(),
            watch.extras.clone().into(),
            watch.trigger_columns.clone().into(),
        ],
    );
}
