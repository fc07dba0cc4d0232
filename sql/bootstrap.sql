-- pgwatch's own objects. User-facing functions live in the schema the extension is installed in;
-- everything internal lives in schema pgwatch.
CREATE SCHEMA pgwatch;
GRANT USAGE ON SCHEMA pgwatch TO PUBLIC;

-- One row per watch. Kept by pg_dump (extension configuration) and matched to its triggers
-- pgwatch_<id>_<event> on the watched table.
CREATE TABLE pgwatch.watches (
    id              bigserial PRIMARY KEY,
    tbl             regclass NOT NULL,
    label           text,
    channel         text NOT NULL,
    events          text[] NOT NULL,
    extra_columns   text[] NOT NULL,
    key_columns     text[] NOT NULL,
    trigger_columns text[] NOT NULL DEFAULT '{}',
    condition       text,
    payload         text NOT NULL DEFAULT 'full' CHECK (payload IN ('full', 'keys', 'compact')),
    fire_on_replica boolean NOT NULL DEFAULT false,
    -- How long the watch's payloads are kept for replay (NULL: not kept), and the clock reading
    -- (microseconds since 2000) that names its current feed: see docs/replay.md.
    retain          interval,
    feed_start      bigint,
    CONSTRAINT watches_feed_start_with_retain CHECK ((retain IS NULL) = (feed_start IS NULL))
);
CREATE UNIQUE INDEX watches_tbl_label ON pgwatch.watches (tbl, coalesce(label, ''));
-- A channel carries one watch's changes: its sequence numbers count them, and no one can send on
-- another's channel through pgwatch.
CREATE UNIQUE INDEX watches_channel ON pgwatch.watches (channel);
GRANT SELECT ON pgwatch.watches TO PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('pgwatch.watches', '');
SELECT pg_catalog.pg_extension_config_dump('pgwatch.watches_id_seq', '');

-- A random key per database for the lock watch_table takes on a channel name while it claims it
-- (see src/define/watches.rs): lock tags are visible to all, and with a key no role can compute a
-- name whose lock falls on another's channel. Readable only by the extension's owner; not dumped
-- (a restored database gets a new one).
CREATE TABLE pgwatch.claim_key (key bytea NOT NULL);
INSERT INTO pgwatch.claim_key SELECT pg_catalog.uuid_send(pg_catalog.gen_random_uuid());
