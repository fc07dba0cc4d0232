-- watch_table() returns the watch's catalog row. The row is read by a second statement, which
-- sees what pgwatch.apply_watch() wrote.
CREATE FUNCTION watch_table(
    tbl regclass,
    events text DEFAULT '*',
    extra_columns text[] DEFAULT '{}',
    label text DEFAULT NULL
) RETURNS pgwatch.watches
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pgwatch.apply_watch(tbl, events, extra_columns, label);
    SELECT w.* FROM pgwatch.watches w WHERE w.tbl = $1 AND w.label IS NOT DISTINCT FROM $4;
$$;

-- One row per database that uses worker delivery (empty unless pgwatch is preloaded).
CREATE VIEW pgwatch.workers AS SELECT * FROM pgwatch.worker_status();
GRANT SELECT ON pgwatch.workers TO PUBLIC;
