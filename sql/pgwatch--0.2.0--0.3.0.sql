-- pgwatch 0.2.0 → 0.3.0: payload 'compact' (rows as arrays of values under a "cols" header),
-- statement triggers that read transition tables for plain tables, and a watched table's primary
-- key kept. Leaves the same objects as installing 0.3.0 (the upgrade test compares them).

ALTER TABLE pgwatch.watches
    DROP CONSTRAINT watches_payload_check,
    ADD CONSTRAINT watches_payload_check CHECK (payload IN ('full', 'keys', 'compact'));

-- A channel carries one watch's changes. Watches that share one are left for the administrator to
-- tell apart: pgwatch does not pick which of them keeps the channel. (Functions are named with
-- their schema: this runs as a superuser with the extension's schema on the path, see 0.1.0->0.2.0.)
DO $$
DECLARE
    shared text;
BEGIN
    SELECT pg_catalog.string_agg(pg_catalog.format('"%s" (watches %s)', channel, ids), ', ') INTO shared
      FROM (SELECT channel, pg_catalog.string_agg(id::text, ', ' ORDER BY id) AS ids
              FROM pgwatch.watches GROUP BY channel HAVING pg_catalog.count(*) > 1) AS d;
    IF shared IS NOT NULL THEN
        RAISE EXCEPTION 'pgwatch 0.3.0 gives each channel to one watch, and these share one: %', shared
            USING ERRCODE = 'duplicate_object',
                  HINT = 'Give each but one of them a label of its own with watch_table(), or unwatch them, then update again.';
    END IF;
END
$$;
CREATE UNIQUE INDEX watches_channel ON pgwatch.watches (channel);

-- Before ALTER TABLE: a watched table about to become a partition or an inheritance child gets row
-- triggers first (a C function: it reads the parse tree).
CREATE FUNCTION pgwatch.on_ddl_command_start() RETURNS event_trigger
    LANGUAGE c AS 'MODULE_PATHNAME', 'pgwatch_on_ddl_command_start';
CREATE EVENT TRIGGER pgwatch_ddl_command_start ON ddl_command_start WHEN TAG IN ('ALTER TABLE')
    EXECUTE FUNCTION pgwatch.on_ddl_command_start();
ALTER EVENT TRIGGER pgwatch_ddl_command_start ENABLE ALWAYS;

-- After DDL that can give a watched table another trigger or a place in an inheritance tree, its
-- watches get row triggers where they need them; enabled ALWAYS (DDL under replica is followed).
CREATE OR REPLACE FUNCTION pgwatch.on_ddl_command_end() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- While the extension's own script runs, its DDL comes before follow_ddl() exists.
    IF to_regprocedure('pgwatch.follow_ddl()') IS NOT NULL THEN
        PERFORM pgwatch.follow_ddl();
    END IF;
END
$$;
DROP EVENT TRIGGER pgwatch_ddl_command_end;
CREATE EVENT TRIGGER pgwatch_ddl_command_end ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE', 'ALTER SCHEMA', 'CREATE TRIGGER', 'ALTER TRIGGER', 'CREATE TABLE', 'CREATE SCHEMA',
                 'CREATE FOREIGN TABLE', 'ALTER FOREIGN TABLE',
                 -- PostgreSQL lets these rename a table or its columns too.
                 'ALTER INDEX', 'ALTER VIEW', 'ALTER MATERIALIZED VIEW', 'ALTER SEQUENCE')
    EXECUTE FUNCTION pgwatch.on_ddl_command_end();
ALTER EVENT TRIGGER pgwatch_ddl_command_end ENABLE ALWAYS;

-- Dropping the primary key a watch identifies rows by is refused too (unless the same command
-- puts back a NOT DEFERRABLE one on the same columns), also under session_replication_role =
-- replica, where the trigger now fires as well.
CREATE OR REPLACE FUNCTION pgwatch.on_sql_drop() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    broken record;
BEGIN
    DELETE FROM pgwatch.watches w
     USING pg_event_trigger_dropped_objects() d
     WHERE d.classid = 'pg_class'::regclass AND d.objsubid = 0 AND w.tbl::oid = d.objid;
    IF pgwatch.managing() THEN
        RETURN;
    END IF;
    SELECT w.id, w.channel, w.tbl, w.key_columns, d.object_type, d.address_names[3] AS name INTO broken
      FROM pg_event_trigger_dropped_objects() d
      JOIN pgwatch.watches w ON
           (d.object_type = 'table column' AND d.objid = w.tbl::oid
            AND d.address_names[3] = ANY (w.key_columns || w.extra_columns || w.trigger_columns))
        OR (d.object_type IN ('trigger', 'table constraint')
            AND (d.address_names[1], d.address_names[2]) =
                (SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.oid = w.tbl)
            AND CASE d.object_type
                WHEN 'trigger' THEN
                    d.address_names[3] IN ('pgwatch_' || w.id, 'pgwatch_' || w.id || '_insert', 'pgwatch_' || w.id || '_update',
                                           'pgwatch_' || w.id || '_delete', 'pgwatch_' || w.id || '_truncate')
                -- Keys that may repeat (no key, another one, a deferrable one) would let
                -- coalescing fold different rows together.
                ELSE NOT EXISTS (
                    SELECT FROM pg_constraint k
                     WHERE k.conrelid = w.tbl AND k.contype = 'p' AND NOT k.condeferrable
                       AND ARRAY(SELECT a.attname::text
                                   FROM unnest(k.conkey) WITH ORDINALITY AS u(attnum, n)
                                   JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.attnum
                                  ORDER BY u.n) = w.key_columns)
                END)
     ORDER BY w.id, d.object_type = 'table constraint'  -- a dropped key column is named
     LIMIT 1;
    IF broken.object_type = 'trigger' THEN
        RAISE EXCEPTION 'cannot drop trigger % of table %: it belongs to pgwatch watch % (channel "%")',
                broken.name, broken.tbl, broken.id, broken.channel
            USING ERRCODE = 'dependent_objects_still_exist',
                  HINT = 'Remove the watch with unwatch_table(), which drops its triggers.';
    ELSIF broken.object_type = 'table constraint' THEN
        RAISE EXCEPTION 'cannot drop constraint % of table %: pgwatch watch % (channel "%") identifies rows by this primary key',
                broken.name, broken.tbl, broken.id, broken.channel
            USING ERRCODE = 'dependent_objects_still_exist',
                  HINT = format('Keep a NOT DEFERRABLE primary key on (%s), or unwatch the table first.',
                                array_to_string(broken.key_columns, ', '));
    ELSIF broken.object_type IS NOT NULL THEN
        RAISE EXCEPTION 'cannot drop column % of table %: pgwatch watch % (channel "%") uses it',
                broken.name, broken.tbl, broken.id, broken.channel
            USING ERRCODE = 'dependent_objects_still_exist',
                  HINT = 'Watch the table again without this column (SELECT watch_table(...)), or unwatch it, first.';
    END IF;
END
$$;
ALTER EVENT TRIGGER pgwatch_sql_drop ENABLE ALWAYS;

-- Counters of the notices that tell subscribers to refetch, and of changes a worker could not send.
DROP FUNCTION pgwatch.stats();
CREATE FUNCTION pgwatch."stats"() RETURNS TABLE (
	"rows_captured" bigint,
	"rows_sent" bigint,
	"notifications" bigint,
	"payload_bytes" bigint,
	"batches" bigint,
	"rows_per_notification" double precision,
	"partial_rows" bigint,
	"overflows" bigint,
	"inline_fallbacks" bigint,
	"queue_high_water" bigint,
	"worker_restarts" bigint,
	"prepared_unsent" bigint,
	"resyncs" bigint,
	"skipped_records" bigint
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'stats_wrapper';

CREATE FUNCTION pgwatch."renew_watch"("id" bigint) RETURNS void
STRICT VOLATILE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'renew_watch_wrapper';

-- Each watch's triggers are made again, so that a plain table's row triggers become statement
-- triggers; their WHEN conditions are kept as PostgreSQL stored them (a condition's text is never
-- parsed again). A watch whose triggers cannot be made again (its table changed since, e.g. a
-- deferrable key) keeps its 0.2.0 triggers, which this library still runs.
DO $$
DECLARE
    w record;
BEGIN
    FOR w IN SELECT id, tbl FROM pgwatch.watches ORDER BY id LOOP
        BEGIN
            PERFORM pgwatch.renew_watch(w.id);
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'pgwatch: watch % of table % keeps its 0.2.0 triggers: %', w.id, w.tbl, SQLERRM
                USING HINT = 'Fix the table or the watch, then call watch_table() for it again.';
        END;
    END LOOP;
END
$$;
