-- pgwatch 0.3.0 → 0.4.0: retained watches, whose payloads the delivery worker keeps in a log for
-- replay (docs/replay.md). Leaves the same objects as installing 0.4.0 (the upgrade test
-- compares them). Existing watches keep no payloads until defined again with retain.

ALTER TABLE pgwatch.watches
    ADD COLUMN retain interval,
    ADD COLUMN feed_start bigint,
    ADD CONSTRAINT watches_feed_start_with_retain CHECK ((retain IS NULL) = (feed_start IS NULL));

-- The channel claims' key: as in sql/bootstrap.sql.
CREATE TABLE pgwatch.claim_key (key bytea NOT NULL);
INSERT INTO pgwatch.claim_key SELECT pg_catalog.uuid_send(pg_catalog.gen_random_uuid());

-- The log: as in sql/feed.sql.
CREATE TABLE pgwatch.feeds (
    channel      text PRIMARY KEY,
    tbl          text NOT NULL,
    feed         bigint NOT NULL,
    seq          bigint NOT NULL,
    reserved     bigint NOT NULL,
    cut_short    bigint NOT NULL DEFAULT 0,
    last_reset   timestamptz,
    reset_reason text
) WITH (fillfactor = 10);
CREATE TABLE pgwatch.log (
    segment int NOT NULL,
    channel text NOT NULL,
    feed    bigint NOT NULL,
    seq     bigint NOT NULL,
    prev    bigint NOT NULL,
    sent_at timestamptz NOT NULL,
    payload bytea NOT NULL
) PARTITION BY LIST (segment);
CREATE TABLE pgwatch.log_0 PARTITION OF pgwatch.log FOR VALUES IN (0);
CREATE TABLE pgwatch.log_1 PARTITION OF pgwatch.log FOR VALUES IN (1);
CREATE TABLE pgwatch.log_2 PARTITION OF pgwatch.log FOR VALUES IN (2);
CREATE TABLE pgwatch.log_3 PARTITION OF pgwatch.log FOR VALUES IN (3);
CREATE TABLE pgwatch.log_4 PARTITION OF pgwatch.log FOR VALUES IN (4);
CREATE TABLE pgwatch.log_5 PARTITION OF pgwatch.log FOR VALUES IN (5);
CREATE TABLE pgwatch.log_6 PARTITION OF pgwatch.log FOR VALUES IN (6);
CREATE TABLE pgwatch.log_7 PARTITION OF pgwatch.log FOR VALUES IN (7);
CREATE INDEX log_channel_feed_seq ON pgwatch.log (channel, feed, seq);
CREATE TABLE pgwatch.log_segments (
    segment   int PRIMARY KEY,
    opened    timestamptz,
    last_sent timestamptz,
    payloads  bigint NOT NULL DEFAULT 0,
    bytes     bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 10);
INSERT INTO pgwatch.log_segments (segment) SELECT pg_catalog.generate_series(0, 7);

-- New counters.
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
    "skipped_records" bigint,
    "log_payloads" bigint,
    "log_bytes" bigint,
    "pruned_payloads" bigint,
    "pruned_bytes" bigint,
    "prunes_skipped" bigint,
    "feed_resets" bigint,
    "retained_unlogged" bigint,
    "passed_over" bigint
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'stats_wrapper';
-- For pg_read_all_stats only: as in sql/api.sql.
REVOKE EXECUTE ON FUNCTION pgwatch.stats() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgwatch.stats() TO pg_read_all_stats;

-- watch_table() and the function behind it gain retain.
DROP FUNCTION watch_table(regclass, text, text[], text, text[], text, text, boolean);
DROP FUNCTION pgwatch.define_watch(regclass, text, text[], text, text[], text, text, boolean);
CREATE FUNCTION pgwatch."define_watch"(
    "tbl" regclass,
    "events" TEXT,
    "extra_columns" TEXT[],
    "label" TEXT,
    "trigger_columns" TEXT[],
    "condition" TEXT,
    "payload" TEXT,
    "fire_on_replica" bool,
    "retain" double precision
) RETURNS bigint
VOLATILE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'define_retained_watch_wrapper';

CREATE FUNCTION pgwatch."read_position"("channel" bytea) RETURNS bigint
VOLATILE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'read_position_wrapper';

CREATE FUNCTION pgwatch."may_replay"("tbl" oid, "columns" bytea[], "condition" bool) RETURNS bool
STRICT STABLE PARALLEL SAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'may_replay_wrapper';

CREATE FUNCTION pgwatch."read_replay"("channel" bytea, "after_seq" bigint, "max_payloads" INT)
RETURNS TABLE ("seq" bigint, "payload" bytea)
VOLATILE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'read_replay_wrapper';

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

-- DDL that changes which rows a watched table holds with no row event has its subscribers
-- refetch: the ddl_command_start trigger now also sees DROP TABLE, DROP SCHEMA and DROP OWNED (of a
-- partition).
DROP EVENT TRIGGER pgwatch_ddl_command_start;
CREATE EVENT TRIGGER pgwatch_ddl_command_start ON ddl_command_start WHEN TAG IN ('ALTER TABLE', 'DROP TABLE', 'DROP FOREIGN TABLE', 'DROP SCHEMA', 'DROP OWNED')
    EXECUTE FUNCTION pgwatch.on_ddl_command_start();
ALTER EVENT TRIGGER pgwatch_ddl_command_start ENABLE ALWAYS;

-- A drop that breaks a watch only through another object (DROP ... CASCADE of a type, a function,
-- a table or a schema the watch depends on) takes the watch with it instead of failing: another
-- role's watch could otherwise stop a DROP ... CASCADE of one's own objects.
CREATE OR REPLACE FUNCTION pgwatch.on_sql_drop() RETURNS event_trigger
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

-- Each watch's triggers are made again: a watch that does not report truncate gets the TRUNCATE
-- trigger that has its subscribers refetch; WHEN conditions are kept as PostgreSQL stored them (a
-- condition's text is never parsed again). A watch whose triggers cannot be made again (its
-- table changed since, or locked by a transaction that stays open: each table is waited for at
-- most 5 seconds, since the tables renewed before it stay locked until the update commits) keeps
-- its 0.3.0 triggers, which this library still runs.
DO $$
DECLARE
    w record;
    timeout text := pg_catalog.current_setting('lock_timeout');
BEGIN
    PERFORM pg_catalog.set_config('lock_timeout', '5s', true);
    FOR w IN SELECT id, tbl FROM pgwatch.watches ORDER BY id LOOP
        BEGIN
            PERFORM pgwatch.renew_watch(w.id);
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'pgwatch: watch % of table % keeps its 0.3.0 triggers: %', w.id, w.tbl, SQLERRM
                USING HINT = 'Fix the table or the watch (or wait for the lock), then call watch_table() for it again.';
        END;
    END LOOP;
    PERFORM pg_catalog.set_config('lock_timeout', timeout, true);
END
$$;
