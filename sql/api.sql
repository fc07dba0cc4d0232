-- watch_table() returns the watch's catalog row. The row is read by a second statement, which
-- sees what pgwatch.define_watch() wrote.
CREATE FUNCTION watch_table(
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

-- One row per database that uses worker delivery (empty unless pgwatch is preloaded).
CREATE VIEW pgwatch.workers AS SELECT * FROM pgwatch.worker_status();
GRANT SELECT ON pgwatch.workers TO PUBLIC;
