-- The replay log (see docs/replay.md): written only by the delivery worker, in the transaction
-- that sends the payloads, so that a payload is in the log if and only if it was notified; read
-- by pgwatch.position() and pgwatch.replay(). Not readable by other roles: replay checks the
-- caller's rights on the watched table. Not dumped: a restored database starts new feeds.

-- One row per retained channel: its feed, the last sequence number sent, and how far numbers are
-- reserved durably (after a crash the feed goes on above both, after a reset marker). This table
-- and log_segments have rows the worker updates for every batch: pages mostly free let each
-- page prune its dead versions early (HOT), so an update never walks a long chain of them.
CREATE TABLE pgwatch.feeds (
    channel      text PRIMARY KEY,
    tbl          text NOT NULL,
    feed         bigint NOT NULL,
    seq          bigint NOT NULL,
    reserved     bigint NOT NULL,
    -- How many times the size cap pruned payloads of this feed before their retention ended.
    cut_short    bigint NOT NULL DEFAULT 0,
    last_reset   timestamptz,
    reset_reason text
) WITH (fillfactor = 10);

-- The payloads, in a ring of eight segments: the worker writes to one at a time, moves on to the
-- next as time passes (or the size cap asks), and empties an old one with TRUNCATE once every
-- payload in it is past its retention, so that the log never bloats.
CREATE TABLE pgwatch.log (
    segment int NOT NULL,
    channel text NOT NULL,
    feed    bigint NOT NULL,
    seq     bigint NOT NULL,
    -- The sequence number before this one on the channel: replay checks the chain is unbroken.
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

-- The segments: when each was opened, its last payload, and what it holds.
CREATE TABLE pgwatch.log_segments (
    segment   int PRIMARY KEY,
    opened    timestamptz,
    last_sent timestamptz,
    payloads  bigint NOT NULL DEFAULT 0,
    bytes     bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 10);
INSERT INTO pgwatch.log_segments (segment) SELECT pg_catalog.generate_series(0, 7);
