-- pgwatch's own objects. User-facing functions live in the schema the extension is installed in;
-- everything internal lives in schema pgwatch.
CREATE SCHEMA pgwatch;
GRANT USAGE ON SCHEMA pgwatch TO PUBLIC;

-- One row per watch. Kept by pg_dump (extension configuration) and matched to its trigger
-- pgwatch_<id> on the watched table.
CREATE TABLE pgwatch.watches (
    id            bigserial PRIMARY KEY,
    tbl           regclass NOT NULL,
    label         text,
    channel       text NOT NULL,
    events        text[] NOT NULL,
    extra_columns text[] NOT NULL,
    key_columns   text[] NOT NULL
);
CREATE UNIQUE INDEX watches_tbl_label ON pgwatch.watches (tbl, coalesce(label, ''));
GRANT SELECT ON pgwatch.watches TO PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('pgwatch.watches', '');
SELECT pg_catalog.pg_extension_config_dump('pgwatch.watches_id_seq', '');

-- DROP TABLE (or DROP SCHEMA ... CASCADE) of a watched table forgets its watches. Runs per DDL
-- command, never per row.
CREATE FUNCTION pgwatch.forget_dropped_tables() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM pgwatch.watches w
     USING pg_event_trigger_dropped_objects() d
     WHERE d.classid = 'pg_class'::regclass AND d.objsubid = 0 AND w.tbl::oid = d.objid;
END
$$;
CREATE EVENT TRIGGER pgwatch_forget_dropped_tables ON sql_drop
    EXECUTE FUNCTION pgwatch.forget_dropped_tables();
