-- DDL on watched tables. DROP TABLE (or DROP SCHEMA ... CASCADE) of a watched table forgets its
-- watches; dropping a column a watch sends or filters on, a watch's trigger, or the primary key a
-- watch identifies rows by (unless the same command puts back a NOT DEFERRABLE one on the same
-- columns), is refused when the command drops something of that table, and takes the watch with
-- it when the command reached them only through another object (a CASCADE). Runs once per DDL
-- command, never per row; enabled ALWAYS, so that DDL under session_replication_role = replica is
-- covered too.
CREATE FUNCTION pgwatch.on_sql_drop() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    broken record;
    refused record;
    refusing boolean := false;
    gone bigint[] := '{}';
    doomed text;
BEGIN
    DELETE FROM pgwatch.watches w
     USING pg_event_trigger_dropped_objects() d
     WHERE d.classid = 'pg_class'::regclass AND d.objsubid = 0 AND w.tbl::oid = d.objid;
    IF pgwatch.managing() THEN
        RETURN;
    END IF;
    FOR broken IN
        SELECT w.id, w.channel, w.tbl, w.key_columns, d.object_type, d.address_names[3] AS name,
               -- Whether the command drops something of the watched table itself (a column, a
               -- constraint, a trigger), rather than only objects elsewhere the watch depends on.
               EXISTS (SELECT FROM pg_event_trigger_dropped_objects() o
                        WHERE o.original AND o.object_type IN ('table column', 'trigger', 'table constraint')
                          AND (o.address_names[1], o.address_names[2]) =
                              (SELECT n.nspname::text, c.relname::text FROM pg_class c
                                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = w.tbl)) AS own
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
                                               'pgwatch_' || w.id || '_delete', 'pgwatch_' || w.id || '_truncate',
                                               'pgwatch_' || w.id || '_moved')
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
         ORDER BY 7 DESC, w.id, d.object_type = 'table constraint'  -- refusals first; a dropped key column is named
    LOOP
        IF broken.own THEN
            refused := broken;
            refusing := true;
            EXIT;
        END IF;
        -- Broken only through an object elsewhere (DROP ... CASCADE of a type, a function, a
        -- table or a schema its columns or condition depend on): the watch goes with it, as
        -- PostgreSQL's dependent objects do. Refusing would let a table's owner stop other
        -- roles' DROP ... CASCADE by making a watch depend on their objects. The command holds
        -- the table's lock already.
        CONTINUE WHEN broken.id = ANY (gone);
        gone := gone || broken.id;
        DELETE FROM pgwatch.watches WHERE id = broken.id;
        FOR doomed IN SELECT t.tgname FROM pg_trigger t
                     WHERE t.tgrelid = broken.tbl
                       AND t.tgname IN ('pgwatch_' || broken.id, 'pgwatch_' || broken.id || '_insert',
                                        'pgwatch_' || broken.id || '_update', 'pgwatch_' || broken.id || '_delete',
                                        'pgwatch_' || broken.id || '_truncate', 'pgwatch_' || broken.id || '_moved') LOOP
            EXECUTE format('DROP TRIGGER %I ON %s', doomed, broken.tbl);
        END LOOP;
        RAISE WARNING 'pgwatch: watch % of table % (channel "%") removed: it depended on an object this command drops',
                broken.id, broken.tbl, broken.channel
            USING HINT = 'Watch the table again with watch_table() if it is still wanted.';
    END LOOP;
    IF NOT refusing THEN
        RETURN;
    END IF;
    broken := refused;
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
CREATE EVENT TRIGGER pgwatch_sql_drop ON sql_drop EXECUTE FUNCTION pgwatch.on_sql_drop();
ALTER EVENT TRIGGER pgwatch_sql_drop ENABLE ALWAYS;

-- Renaming a watched table, its schema or a watched column: the watch follows; a watched table
-- that now needs row triggers (a new trigger, a new place in an inheritance tree) gets them (see
-- pgwatch.follow_ddl()). Enabled ALWAYS, so that DDL under session_replication_role = replica is
-- followed too.
CREATE FUNCTION pgwatch.on_ddl_command_end() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- While the extension's own script runs, its DDL comes before follow_ddl() exists.
    IF to_regprocedure('pgwatch.follow_ddl()') IS NOT NULL THEN
        PERFORM pgwatch.follow_ddl();
    END IF;
END
$$;
CREATE EVENT TRIGGER pgwatch_ddl_command_end ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE', 'ALTER SCHEMA', 'CREATE TRIGGER', 'ALTER TRIGGER', 'CREATE TABLE', 'CREATE SCHEMA',
                 'CREATE FOREIGN TABLE', 'ALTER FOREIGN TABLE',
                 -- PostgreSQL lets these rename a table or its columns too.
                 'ALTER INDEX', 'ALTER VIEW', 'ALTER MATERIALIZED VIEW', 'ALTER SEQUENCE')
    EXECUTE FUNCTION pgwatch.on_ddl_command_end();
ALTER EVENT TRIGGER pgwatch_ddl_command_end ENABLE ALWAYS;

-- Before ALTER TABLE: a watched table about to become a partition or an inheritance child gets row
-- triggers first, and DDL that changes which rows watched tables hold with no row event (ALTER
-- TABLE, or DROP TABLE, DROP SCHEMA or DROP OWNED of a partition) has their subscribers refetch (a
-- C function: it reads the parse tree, before the command changes the catalog).
CREATE FUNCTION pgwatch.on_ddl_command_start() RETURNS event_trigger
    LANGUAGE c AS 'MODULE_PATHNAME', 'pgwatch_on_ddl_command_start';
CREATE EVENT TRIGGER pgwatch_ddl_command_start ON ddl_command_start WHEN TAG IN ('ALTER TABLE', 'DROP TABLE', 'DROP FOREIGN TABLE', 'DROP SCHEMA', 'DROP OWNED')
    EXECUTE FUNCTION pgwatch.on_ddl_command_start();
ALTER EVENT TRIGGER pgwatch_ddl_command_start ENABLE ALWAYS;
