-- pgwatch 0.1.0 → 0.2.0: watch options (trigger_columns, condition, truncate, payload,
-- fire_on_replica), watches that follow renames, DDL that would break a watch refused, one
-- trigger per event. Leaves the same objects as installing 0.2.0 (the upgrade test compares them).

ALTER TABLE pgwatch.watches
    ADD COLUMN trigger_columns text[] NOT NULL DEFAULT '{}',
    ADD COLUMN condition text,
    ADD COLUMN payload text NOT NULL DEFAULT 'full' CHECK (payload IN ('full', 'keys')),
    ADD COLUMN fire_on_replica boolean NOT NULL DEFAULT false;

-- watch_table() gains arguments; 0.1.0's entry point stays in the library for databases not yet
-- updated, but leaves the SQL.
DROP FUNCTION @extschema@.watch_table(regclass, text, text[], text);
DROP FUNCTION pgwatch.apply_watch(regclass, text, text[], text);

CREATE FUNCTION pgwatch."define_watch"(
	"tbl" regclass,
	"events" TEXT,
	"extra_columns" TEXT[],
	"label" TEXT,
	"trigger_columns" TEXT[],
	"condition" TEXT,
	"payload" TEXT,
	"fire_on_replica" bool
) RETURNS bigint
VOLATILE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'define_watch_wrapper';

CREATE FUNCTION pgwatch."follow_ddl"() RETURNS void
STRICT VOLATILE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'follow_ddl_wrapper';

CREATE FUNCTION pgwatch."managing"() RETURNS bool
STRICT VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'managing_wrapper';

CREATE FUNCTION @extschema@.watch_table(
    tbl regclass,
    events text DEFAULT '*',
    extra_columns text[] DEFAULT '{}',
    label text DEFAULT NULL,
    trigger_columns text[] DEFAULT '{}',
    condition text DEFAULT NULL,
    payload text DEFAULT 'full',
    fire_on_replica boolean DEFAULT false
) RETURNS pgwatch.watches
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pgwatch.define_watch(tbl, events, extra_columns, label, trigger_columns, condition, payload, fire_on_replica);
    SELECT w.* FROM pgwatch.watches w WHERE w.tbl = $1 AND w.label IS NOT DISTINCT FROM $4;
$$;

-- The sql_drop event trigger now also refuses drops that would break a watch, and a
-- ddl_command_end one follows renames.
DROP EVENT TRIGGER pgwatch_forget_dropped_tables;
DROP FUNCTION pgwatch.forget_dropped_tables();
CREATE FUNCTION pgwatch.on_sql_drop() RETURNS event_trigger
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
    SELECT w.id, w.channel, w.tbl, d.object_type, d.address_names[3] AS name INTO broken
      FROM pg_event_trigger_dropped_objects() d
      JOIN pgwatch.watches w ON
           (d.object_type = 'table column' AND d.objid = w.tbl::oid
            AND d.address_names[3] = ANY (w.key_columns || w.extra_columns || w.trigger_columns))
        OR (d.object_type = 'trigger'
            AND d.address_names[3] IN ('pgwatch_' || w.id, 'pgwatch_' || w.id || '_insert', 'pgwatch_' || w.id || '_update',
                                       'pgwatch_' || w.id || '_delete', 'pgwatch_' || w.id || '_truncate')
            AND (d.address_names[1], d.address_names[2]) =
                (SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.oid = w.tbl))
     ORDER BY w.id
     LIMIT 1;
    IF broken.object_type = 'trigger' THEN
        RAISE EXCEPTION 'cannot drop trigger % of table %: it belongs to pgwatch watch % (channel "%")',
                broken.name, broken.tbl, broken.id, broken.channel
            USING ERRCODE = 'dependent_objects_still_exist',
                  HINT = 'Remove the watch with unwatch_table(), which drops its triggers.';
    ELSIF broken.object_type IS NOT NULL THEN
        RAISE EXCEPTION 'cannot drop column % of table %: pgwatch watch % (channel "%") uses it',
                broken.name, broken.tbl, broken.id, broken.channel
            USING ERRCODE = 'dependent_objects_still_exist',
                  HINT = 'Watch the table again without this column (SELECT watch_table(...)), or unwatch it, first.';
    END IF;
END
$$;
CREATE EVENT TRIGGER pgwatch_sql_drop ON sql_drop EXECUTE FUNCTION pgwatch.on_sql_drop();

-- Renaming a watched table, its schema or a watched column: the watch follows (see
-- pgwatch.follow_ddl()).
CREATE FUNCTION pgwatch.on_ddl_command_end() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pgwatch.follow_ddl();
END
$$;
CREATE EVENT TRIGGER pgwatch_ddl_command_end ON ddl_command_end WHEN TAG IN ('ALTER TABLE', 'ALTER SCHEMA')
    EXECUTE FUNCTION pgwatch.on_ddl_command_end();

-- Each watch's one 0.1.0 trigger becomes a trigger per event. A watch that cannot be defined
-- again (its table changed since) keeps its 0.1.0 trigger, which this library still runs.
-- Functions are named with their schema: this runs as a superuser with the extension's schema
-- (public, often) on the path, where another role may have put a closer match.
DO $$
DECLARE
    w record;
BEGIN
    FOR w IN SELECT * FROM pgwatch.watches ORDER BY id LOOP
        BEGIN
            PERFORM pgwatch.define_watch(w.tbl, pg_catalog.array_to_string(w.events, ','), w.extra_columns, w.label,
                                         '{}', NULL, 'full', false);
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'pgwatch: watch % of table % keeps its 0.1.0 trigger: %', w.id, w.tbl, SQLERRM
                USING HINT = 'Fix the table or the watch, then call watch_table() for it again.';
        END;
    END LOOP;
END
$$;
