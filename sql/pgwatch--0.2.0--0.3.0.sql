-- pgwatch 0.2.0 → 0.3.0: payload 'compact' (rows as arrays of values under a "cols" header), and
-- statement triggers that read transition tables for plain tables. Leaves the same objects as
-- installing 0.3.0 (the upgrade test compares them).

ALTER TABLE pgwatch.watches
    DROP CONSTRAINT watches_payload_check,
    ADD CONSTRAINT watches_payload_check CHECK (payload IN ('full', 'keys', 'compact'));

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
    WHEN TAG IN ('ALTER TABLE', 'ALTER SCHEMA', 'CREATE TRIGGER', 'ALTER TRIGGER', 'CREATE TABLE', 'CREATE SCHEMA', 'CREATE FOREIGN TABLE', 'ALTER FOREIGN TABLE')
    EXECUTE FUNCTION pgwatch.on_ddl_command_end();
ALTER EVENT TRIGGER pgwatch_ddl_command_end ENABLE ALWAYS;

-- Each watch is defined again, so that a plain table's row triggers become statement triggers.
-- A watch that cannot be defined again (its table changed since) keeps its triggers, which this
-- library still runs.
DO $$
DECLARE
    w record;
BEGIN
    FOR w IN SELECT * FROM pgwatch.watches ORDER BY id LOOP
        BEGIN
            PERFORM pgwatch.define_watch(w.tbl, array_to_string(w.events, ','), w.extra_columns, w.label,
                                         w.trigger_columns, w.condition, w.payload, w.fire_on_replica);
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'pgwatch: watch % of table % keeps its 0.2.0 triggers: %', w.id, w.tbl, SQLERRM
                USING HINT = 'Fix the table or the watch, then call watch_table() for it again.';
        END;
    END LOOP;
END
$$;
