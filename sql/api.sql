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
    fire_on_replica boolean DEFAULT false,
    retain interval DEFAULT NULL
) RETURNS pgwatch.watches
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pgwatch.define_watch(tbl, events, extra_columns, label, trigger_columns, condition, payload, fire_on_replica,
                                extract(epoch FROM retain)::float8);
    SELECT w.* FROM pgwatch.watches w WHERE w.tbl = $1 AND w.label IS NOT DISTINCT FROM $4;
$$;

-- One row per database that uses worker delivery (empty unless pgwatch is preloaded); a role
-- sees the databases it may connect to, unless it has pg_read_all_stats.
CREATE VIEW pgwatch.workers AS SELECT * FROM pgwatch.worker_status();
GRANT SELECT ON pgwatch.workers TO PUBLIC;

-- The counters are the whole cluster's: which rows and how many payload bytes other databases
-- sent tells of their data. As PostgreSQL's own statistics of that kind: for pg_read_all_stats.
REVOKE EXECUTE ON FUNCTION pgwatch.stats() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgwatch.stats() TO pg_read_all_stats;

-- The replay of a retained channel (see docs/replay.md). The channel and the payloads travel as
-- bytes in the database's encoding between these and the functions that read the log.
CREATE FUNCTION pgwatch.position(channel text) RETURNS bigint
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pgwatch.read_position(convert_to(channel, getdatabaseencoding()));
$$;

CREATE FUNCTION pgwatch.replay(channel text, after_seq bigint, max_payloads int DEFAULT 1000)
    RETURNS TABLE (seq bigint, payload text)
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT r.seq, convert_from(r.payload, getdatabaseencoding())
      FROM pgwatch.read_replay(convert_to(channel, getdatabaseencoding()), after_seq, max_payloads) AS r;
$$;

-- One row per retained channel the caller may replay (see pgwatch.may_replay). The view is parsed as the script
-- runs, with the extension's schema on the search_path: its functions and operators are
-- qualified, so that none a user made there beforehand can stand in for pg_catalog's.
CREATE VIEW pgwatch.channels WITH (security_barrier) AS
SELECT w.channel, w.tbl, w.retain,
       coalesce(f.seq, w.feed_start OPERATOR(pg_catalog.-) 1) AS last_seq,
       l.oldest_seq,
       coalesce(l.payloads, 0) AS payloads,
       coalesce(l.bytes, 0) AS bytes,
       coalesce(f.cut_short, 0) AS cut_short,
       f.last_reset, f.reset_reason
  FROM pgwatch.watches w
  LEFT JOIN pgwatch.feeds f
         ON f.channel OPERATOR(pg_catalog.=) w.channel AND f.feed OPERATOR(pg_catalog.=) w.feed_start
  LEFT JOIN LATERAL (SELECT pg_catalog.min(g.seq) AS oldest_seq, pg_catalog.count(*) AS payloads,
                            pg_catalog.sum(pg_catalog.octet_length(g.payload)) AS bytes
                       FROM pgwatch.log g
                      WHERE g.channel OPERATOR(pg_catalog.=) w.channel AND g.feed OPERATOR(pg_catalog.=) w.feed_start) l ON true
 WHERE w.retain IS NOT NULL
   AND pgwatch.may_replay(w.tbl::pg_catalog.oid,
                          ARRAY(SELECT pg_catalog.convert_to(c, pg_catalog.getdatabaseencoding())
                                  FROM pg_catalog.unnest(w.key_columns OPERATOR(pg_catalog.||) w.extra_columns
                                                         OPERATOR(pg_catalog.||) w.trigger_columns) AS c),
                          w.condition IS NOT NULL);
GRANT SELECT ON pgwatch.channels TO PUBLIC;

-- The version of the subscriber protocol (docs/protocol.md) this pgwatch speaks; a client checks
-- it at start-up.
CREATE FUNCTION pgwatch.protocol_version() RETURNS int
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS 'SELECT 1';
