//! End-to-end tests of retained channels: `pgwatch.position()`, `pgwatch.replay()` and
//! `pgwatch.channels`, against what a real LISTEN connection received.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;

use super::support::{connect, connect_to, database, eventually, failure, serial, stat, Listener, WAIT};

fn position(db: &mut Client, channel: &str) -> i64 {
    db.query_one("SELECT pgwatch.position($1)", &[&channel]).unwrap().get(0)
}

fn replay(db: &mut Client, channel: &str, after: i64, max: i32) -> Vec<(i64, String)> {
    db.query("SELECT seq, payload FROM pgwatch.replay($1, $2, $3)", &[&channel, &after, &max])
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

fn seq(payload: &str) -> i64 {
    serde_json::from_str::<serde_json::Value>(payload).unwrap()["seq"].as_i64().unwrap()
}

#[test]
fn replay_returns_exactly_what_was_notified_and_says_when_it_cannot() {
    let _serial = serial();
    let mut db = connect();
    db.batch_execute(
        "DROP TABLE IF EXISTS r_items, r_plain;
         CREATE TABLE r_items (id int PRIMARY KEY, v text);
         CREATE TABLE r_plain (id int PRIMARY KEY);
         SELECT watch_table('r_plain');
         -- Delivered by the worker and logged, whatever this session's pgwatch.delivery says.
         SET pgwatch.delivery = inline;
         SELECT watch_table('r_items', extra_columns => '{v}', retain => '1 hour')",
    )
    .unwrap();
    let channel = "public.r_items";
    let start = position(&mut db, channel);
    let mut listener = Listener::new(connect(), &[channel]);
    let mut got = Vec::new();
    for sql in [
        "INSERT INTO r_items VALUES (1, 'a'), (2, 'b')",
        "UPDATE r_items SET v = 'c' WHERE id = 1",
        "DELETE FROM r_items WHERE id = 2",
    ] {
        db.batch_execute(sql).unwrap();
        got.extend(listener.receive_raw(1, WAIT).into_iter().map(|(_, payload)| payload));
    }
    listener.expect_silence();
    assert_eq!(
        got,
        [
            format!(
                r#"{{"tbl":"public.r_items","op":"insert","seq":{},"rows":[{{"id":1,"v":"a"}},{{"id":2,"v":"b"}}]}}"#,
                start + 1
            ),
            format!(
                r#"{{"tbl":"public.r_items","op":"update","seq":{},"rows":[{{"id":1,"v":"c","old":{{"v":"a"}}}}]}}"#,
                start + 2
            ),
            format!(r#"{{"tbl":"public.r_items","op":"delete","seq":{},"rows":[{{"id":2,"v":"b"}}]}}"#, start + 3),
        ]
    );
    let last = start + 3;
    assert_eq!(position(&mut db, channel), last);
    let numbered: Vec<(i64, String)> = got.iter().map(|payload| (seq(payload), payload.clone())).collect();
    assert_eq!(replay(&mut db, channel, start, 1000), numbered);
    assert_eq!(replay(&mut db, channel, start, 2), numbered[..2]);
    assert_eq!(replay(&mut db, channel, start + 2, 1000), numbered[2..]);
    assert_eq!(replay(&mut db, channel, last, 1000), []);
    let row: (i64, i64, i64) = {
        let r = db
            .query_one("SELECT last_seq, oldest_seq, payloads FROM pgwatch.channels WHERE channel = $1", &[&channel])
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!(row, (last, start + 1, 3));
    // What replay cannot give is said, never a partial range: 72000.
    for sql in [
        format!("SELECT * FROM pgwatch.replay('{channel}', {})", last + 1),
        format!("SELECT * FROM pgwatch.replay('{channel}', {})", start - 1),
        "SELECT * FROM pgwatch.replay('public.r_plain', 0)".to_string(),
        "SELECT pgwatch.position('public.r_plain')".to_string(),
        "SELECT pgwatch.position('no such channel')".to_string(),
    ] {
        assert_eq!(failure(&mut db, &sql).0, "72000", "{sql}");
    }
    for (sql, code) in [
        (format!("SELECT * FROM pgwatch.replay('{channel}', {start}, 0)"), "22023"),
        (format!("SELECT * FROM pgwatch.replay('{channel}', {start}, 10001)"), "22023"),
        (format!("SELECT * FROM pgwatch.replay('{channel}', NULL)"), "22004"),
        ("SELECT pgwatch.position(NULL)".to_string(), "22004"),
        ("SELECT watch_table('r_items', retain => '0.5 seconds')".to_string(), "22023"),
        ("SELECT watch_table('r_items', retain => '366 days')".to_string(), "22023"),
        ("SELECT watch_table('r_items', retain => '-1 hour')".to_string(), "22023"),
    ] {
        assert_eq!(failure(&mut db, &sql).0, code, "{sql}");
    }
    // Redefining the watch with the same channel and retention keeps the feed going.
    db.batch_execute("SELECT watch_table('r_items', extra_columns => '{v}', retain => '2 hours')").unwrap();
    assert_eq!(position(&mut db, channel), last);
    db.batch_execute("INSERT INTO r_items VALUES (3, 'd')").unwrap();
    let next = listener.receive_raw(1, WAIT).pop().unwrap().1;
    assert_eq!(seq(&next), last + 1);
    assert_eq!(replay(&mut db, channel, start, 1000).len(), 4);
    // Sending fewer columns starts a new feed: a reader allowed the remaining columns only must
    // not replay older payloads that carried the others.
    db.batch_execute("SELECT watch_table('r_items', retain => '2 hours')").unwrap();
    assert!(position(&mut db, channel) > last + 1);
    assert_eq!(failure(&mut db, &format!("SELECT * FROM pgwatch.replay('{channel}', {start})")).0, "72000");
    // The worker, which keeps its feeds in memory between batches, logs the next change in the
    // new feed: the first of it, replayable from its start.
    let fresh = db
        .query_one("SELECT feed_start FROM pgwatch.watches WHERE channel = $1", &[&channel])
        .unwrap()
        .get::<_, i64>(0);
    db.batch_execute("INSERT INTO r_items VALUES (5, 'f')").unwrap();
    let narrowed = listener.receive_raw(1, WAIT).pop().unwrap().1;
    assert_eq!(narrowed, format!(r#"{{"tbl":"public.r_items","op":"insert","seq":{fresh},"rows":[{{"id":5}}]}}"#));
    assert_eq!(replay(&mut db, channel, fresh - 1, 1000), [(fresh, narrowed)]);
    assert_eq!(position(&mut db, channel), fresh);
    // Without retention, the channel keeps nothing to replay; its subscribers, whose copies
    // hold rows as the other definition sent them, refetch (this session notifies inline).
    db.batch_execute("SELECT watch_table('r_items', extra_columns => '{v}')").unwrap();
    assert_eq!(listener.receive_raw(1, WAIT).pop().unwrap().1, r#"{"tbl":"public.r_items","op":"resync"}"#);
    assert_eq!(failure(&mut db, &format!("SELECT pgwatch.position('{channel}')")).0, "72000");
    // Its numbers go on above the feed's, never back to where the shared counter stood.
    db.batch_execute("SET pgwatch.delivery = worker; INSERT INTO r_items VALUES (4, 'e')").unwrap();
    let unretained = listener.receive_raw(1, WAIT).pop().unwrap().1;
    assert_eq!(seq(&unretained), fresh + 1, "{unretained}");
    // Retained once more and then not again: the worker, which numbered the channel itself just
    // before, goes on above the new feed's numbers too.
    let mut seqs = vec![fresh + 1];
    for (retain, row) in [(", retain => '2 hours'", 6), ("", 7)] {
        db.batch_execute(&format!(
            "SELECT watch_table('r_items', extra_columns => '{{v}}'{retain}); INSERT INTO r_items VALUES ({row}, 'g')"
        ))
        .unwrap();
        loop {
            let payload = listener.receive_raw(1, WAIT).pop().expect("the insert arrives").1;
            seqs.push(seq(&payload));
            if payload.contains(&format!(r#"{{"id":{row},"#)) {
                break;
            }
        }
    }
    assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]), "seq went back: {seqs:?}");
    db.batch_execute("DROP TABLE r_items, r_plain").unwrap();
}

#[test]
fn replay_answers_only_roles_that_may_read_everything_the_watch_sends() {
    let _serial = serial();
    let mut db = connect();
    db.batch_execute(
        "DROP TABLE IF EXISTS r_secret;
         DROP ROLE IF EXISTS r_reader;
         CREATE ROLE r_reader;
         CREATE TABLE r_secret (id int PRIMARY KEY, v text, hidden text);
         SELECT watch_table('r_secret', extra_columns => '{v}', retain => '1 hour');
         INSERT INTO r_secret VALUES (1, 'a', 'x')",
    )
    .unwrap();
    let channel = "public.r_secret";
    let as_reader = |db: &mut Client, sql: &str| {
        let code = failure(db, &format!("SET ROLE r_reader; {sql}")).0;
        db.batch_execute("RESET ROLE").unwrap();
        code
    };
    let calls =
        [format!("SELECT pgwatch.position('{channel}')"), format!("SELECT * FROM pgwatch.replay('{channel}', 0)")];
    for sql in &calls {
        assert_eq!(as_reader(&mut db, sql), "42501", "{sql}");
    }
    let visible = |db: &mut Client| -> i64 {
        db.batch_execute("SET ROLE r_reader").unwrap();
        let n = db
            .query_one("SELECT count(*) FROM pgwatch.channels WHERE channel = 'public.r_secret'", &[])
            .unwrap()
            .get(0);
        db.batch_execute("RESET ROLE").unwrap();
        n
    };
    assert_eq!(visible(&mut db), 0);
    // One of the columns the watch sends is not enough.
    db.batch_execute("GRANT SELECT (v) ON r_secret TO r_reader").unwrap();
    assert_eq!(as_reader(&mut db, &calls[0]), "42501");
    db.batch_execute("GRANT SELECT (id) ON r_secret TO r_reader").unwrap();
    // Every column it sends is.
    db.batch_execute(&format!("SET ROLE r_reader; SELECT pgwatch.position('{channel}'); RESET ROLE")).unwrap();
    db.batch_execute("GRANT SELECT ON r_secret TO r_reader").unwrap();
    assert_eq!(visible(&mut db), 1);
    let start = db
        .query_one("SELECT feed_start - 1 FROM pgwatch.watches WHERE channel = $1", &[&channel])
        .unwrap()
        .get::<_, i64>(0);
    db.batch_execute(&format!("SET ROLE r_reader; SELECT * FROM pgwatch.replay('{channel}', {start}); RESET ROLE"))
        .unwrap();
    // Row-level security: replay cannot filter rows by policy, so it refuses.
    db.batch_execute("ALTER TABLE r_secret ENABLE ROW LEVEL SECURITY").unwrap();
    for sql in &calls {
        assert_eq!(as_reader(&mut db, sql), "42501", "{sql}");
    }
    // pgwatch.channels shows only what replay answers.
    assert_eq!(visible(&mut db), 0);
    // The columns the watch sends, when it chooses rows by others: which rows it sent tells of
    // those too. A condition needs SELECT on the table, trigger columns SELECT on them.
    db.batch_execute(
        "ALTER TABLE r_secret DISABLE ROW LEVEL SECURITY; REVOKE SELECT ON r_secret FROM r_reader;
         GRANT SELECT (id, v) ON r_secret TO r_reader",
    )
    .unwrap();
    assert_eq!(visible(&mut db), 1);
    for (definition, what) in [
        ("'insert, update', '{v}', retain => '1 hour', condition => $$NEW.hidden <> 'x'$$", "a condition"),
        ("'*', '{v}', retain => '1 hour', trigger_columns => '{hidden}'", "trigger columns"),
    ] {
        db.batch_execute(&format!("SELECT watch_table('r_secret', {definition})")).unwrap();
        for sql in &calls {
            assert_eq!(as_reader(&mut db, sql), "42501", "{what}: {sql}");
        }
        assert_eq!(visible(&mut db), 0, "{what}");
    }
    // Choosing rows by fewer columns starts a new feed: the old one's payloads, chosen by a column
    // the reader may not read, are not replayed.
    let chosen: i64 =
        db.query_one("SELECT feed_start - 1 FROM pgwatch.watches WHERE channel = $1", &[&channel]).unwrap().get(0);
    db.batch_execute("SELECT watch_table('r_secret', '*', '{v}', retain => '1 hour')").unwrap();
    assert_eq!(visible(&mut db), 1);
    assert_eq!(as_reader(&mut db, &format!("SELECT * FROM pgwatch.replay('{channel}', {chosen})")), "72000");
    db.batch_execute("GRANT SELECT (hidden) ON r_secret TO r_reader").unwrap();
    db.batch_execute(&format!("SET ROLE r_reader; SELECT pgwatch.position('{channel}'); RESET ROLE")).unwrap();
    assert_eq!(visible(&mut db), 1);
    // SELECT on a table in a schema one may not use reads nothing in PostgreSQL, nor in replay.
    db.batch_execute(
        "DROP SCHEMA IF EXISTS r_closed CASCADE; CREATE SCHEMA r_closed;
         CREATE TABLE r_closed.t (id int PRIMARY KEY, v text);
         SELECT watch_table('r_closed.t', extra_columns => '{v}', retain => '1 hour');
         INSERT INTO r_closed.t VALUES (1, 'private'); GRANT SELECT ON r_closed.t TO r_reader",
    )
    .unwrap();
    let closed = [
        "SELECT pgwatch.position('r_closed.t')".to_string(),
        "SELECT * FROM pgwatch.replay('r_closed.t', 0)".to_string(),
    ];
    for sql in &closed {
        assert_eq!(as_reader(&mut db, sql), "42501", "{sql}");
    }
    let listed = |db: &mut Client| -> i64 {
        db.batch_execute("SET ROLE r_reader").unwrap();
        let n = db.query_one("SELECT count(*) FROM pgwatch.channels WHERE channel = 'r_closed.t'", &[]).unwrap().get(0);
        db.batch_execute("RESET ROLE").unwrap();
        n
    };
    assert_eq!(listed(&mut db), 0);
    db.batch_execute("GRANT USAGE ON SCHEMA r_closed TO r_reader").unwrap();
    assert_eq!(listed(&mut db), 1);
    db.batch_execute("SET ROLE r_reader; SELECT pgwatch.position('r_closed.t'); RESET ROLE").unwrap();
    db.batch_execute("DROP SCHEMA r_closed CASCADE; DROP TABLE r_secret; DROP ROLE r_reader").unwrap();
}

/// A subscriber's copy of `r_feed` (id → v), kept by the rules of docs/replay.md.
struct Subscriber {
    rows: BTreeMap<i64, Option<String>>,
    last: i64,
    refetches: usize,
    replayed: usize,
}

impl Subscriber {
    const CHANNEL: &str = "public.r_feed";

    /// Takes the position, then the snapshot: everything after the position is applied on top.
    fn refetch(&mut self, db: &mut Client) {
        let last = position(db, Self::CHANNEL);
        let rows = db
            .query("SELECT id, v FROM r_feed", &[])
            .unwrap()
            .iter()
            .map(|row| (i64::from(row.get::<_, i32>(0)), row.get(1)))
            .collect();
        (self.last, self.rows) = (last, rows);
        self.refetches += 1;
    }

    fn apply(&mut self, db: &mut Client, payload: &str) {
        let v: serde_json::Value = serde_json::from_str(payload).unwrap();
        let seq = v["seq"].as_i64().unwrap();
        if seq <= self.last {
            return;
        }
        assert_eq!(seq, self.last + 1, "applied in sequence: {payload}");
        self.last = seq;
        match v["op"].as_str().unwrap() {
            "reset" | "resync" => self.refetch(db),
            _ if v.get("overflow").is_some() => self.refetch(db),
            "truncate" => self.rows.clear(),
            op => {
                for row in v["rows"].as_array().unwrap() {
                    let id = row["id"].as_i64().unwrap();
                    if op == "delete" {
                        self.rows.remove(&id);
                    } else {
                        self.rows.insert(id, row["v"].as_str().map(str::to_string));
                    }
                }
            }
        }
    }

    /// Applies what the log holds after the last seq applied.
    fn catch_up(&mut self, db: &mut Client) {
        loop {
            let payloads = replay(db, Self::CHANNEL, self.last, 100);
            if payloads.is_empty() {
                return;
            }
            self.replayed += payloads.len();
            for (_, payload) in payloads {
                self.apply(db, &payload);
            }
        }
    }
}

#[test]
fn a_subscriber_cut_off_again_and_again_replays_and_ends_with_the_table() {
    let _serial = serial();
    let mut admin = connect();
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS r_feed;
             CREATE TABLE r_feed (id int PRIMARY KEY, v text);
             SELECT watch_table('r_feed', extra_columns => '{v}', retain => '1 hour')",
        )
        .unwrap();
    let writing = AtomicBool::new(true);
    // Counts the subscriber's connections that caught up and listen: each cut-off waits for the
    // next one, so that it falls between replays, however slow the machine.
    let listening = AtomicUsize::new(0);
    let mut sub = Subscriber { rows: BTreeMap::new(), last: 0, refetches: 0, replayed: 0 };
    let cut_offs = std::thread::scope(|scope| {
        let (writing, listening) = (&writing, &listening);
        let writers: Vec<_> = (0..8)
            .map(|w: i32| {
                scope.spawn(move || {
                    let mut db = connect();
                    let mut i = 0;
                    while writing.load(Ordering::Relaxed) {
                        let id = w * 1000 + i % 40;
                        let sql = match i % 5 {
                            0 | 1 => format!("INSERT INTO r_feed VALUES ({id}, 'w{w}i{i}') ON CONFLICT (id) DO UPDATE SET v = excluded.v"),
                            2 => format!("UPDATE r_feed SET v = v || '.' WHERE id = {id}"),
                            3 => format!("DELETE FROM r_feed WHERE id = {}", w * 1000 + (i * 7) % 40),
                            _ => format!("BEGIN; INSERT INTO r_feed VALUES ({}, 'x') ON CONFLICT DO NOTHING; UPDATE r_feed SET v = 'y{i}' WHERE id = {id}; COMMIT", w * 1000 + 500 + i % 300),
                        };
                        db.batch_execute(&sql).unwrap();
                        i += 1;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                })
            })
            .collect();
        let killer = scope.spawn(move || {
            // Terminates the subscriber's connection five times while the writers write, each
            // time once it has caught up and listens again; then the writers stop.
            let mut admin = connect();
            for cut in 1..=5 {
                assert!(eventually(|| listening.load(Ordering::Acquire) >= cut));
                assert!(eventually(|| {
                    let n: i64 = admin
                        .query_one(
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'r_subscriber'",
                            &[],
                        )
                        .unwrap()
                        .get(0);
                    n > 0
                }));
                std::thread::sleep(Duration::from_millis(200));
            }
            writing.store(false, Ordering::Relaxed);
            5
        });
        let subscriber = scope.spawn(|| {
            let mut first = true;
            let mut rounds = 0;
            loop {
                rounds += 1;
                let mut db = connect();
                let session = db.batch_execute("SET application_name = 'r_subscriber'; LISTEN \"public.r_feed\"");
                let caught_up = session.is_ok()
                    && std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        if first {
                            sub.refetch(&mut db);
                        } else {
                            sub.catch_up(&mut db);
                        }
                    }))
                    .is_ok();
                first &= !caught_up;
                if !caught_up {
                    continue;
                }
                listening.fetch_add(1, Ordering::Release);
                let mut notifications = db.notifications();
                let mut iter = notifications.timeout_iter(Duration::from_millis(500));
                let mut received = Vec::new();
                let lost = loop {
                    match iter.next() {
                        Ok(Some(n)) => received.push(n.payload().to_string()),
                        Ok(None) => break false,
                        Err(_) => break true,
                    }
                };
                drop(iter);
                drop(notifications);
                if lost {
                    // Whatever arrived before the cut is applied; the log gives the rest.
                    let mut fresh = connect();
                    for payload in &received {
                        sub.apply(&mut fresh, payload);
                    }
                    continue;
                }
                for payload in &received {
                    sub.apply(&mut db, payload);
                }
                if !writing.load(Ordering::Relaxed) {
                    let mut check = connect();
                    sub.catch_up(&mut check);
                    if sub.last == position(&mut check, Subscriber::CHANNEL) {
                        return rounds;
                    }
                }
            }
        });
        let cut_offs: i64 = killer.join().unwrap();
        for writer in writers {
            writer.join().unwrap();
        }
        let rounds = subscriber.join().unwrap();
        (cut_offs, rounds)
    });
    let table: BTreeMap<i64, Option<String>> = admin
        .query("SELECT id, v FROM r_feed", &[])
        .unwrap()
        .iter()
        .map(|row| (i64::from(row.get::<_, i32>(0)), row.get(1)))
        .collect();
    assert_eq!(sub.rows, table);
    assert!(cut_offs.0 >= 3, "the subscriber was cut off only {} times", cut_offs.0);
    assert!(sub.replayed > 0, "nothing was replayed");
    // Nothing was lost: the only refetch is the first.
    assert_eq!(sub.refetches, 1);
    admin.batch_execute("DROP TABLE r_feed").unwrap();
}

#[test]
fn pruned_payloads_give_the_must_refetch_answer_and_readers_never_block_pruning() {
    let _serial = serial();
    let mut admin = connect();
    // Its own database: pruning keeps payloads for the longest retention of the database.
    let mut db = database(&mut admin, "r_prune", None);
    db.batch_execute(
        "CREATE TABLE short (id int PRIMARY KEY);
         SELECT watch_table('short', retain => '1 second')",
    )
    .unwrap();
    let channel = "public.short";
    let start = position(&mut db, channel);
    db.batch_execute("INSERT INTO short VALUES (1)").unwrap();
    assert!(eventually(|| position(&mut db, channel) > start));
    assert_eq!(replay(&mut db, channel, start, 10).len(), 1);
    // A reader holding the log: the prune cannot truncate, deletes instead, and counts it.
    let mut reader = connect_to(&mut admin, "r_prune");
    reader.batch_execute("BEGIN; SELECT * FROM pgwatch.channels").unwrap();
    let skipped = stat(&mut admin, "prunes_skipped");
    assert!(
        eventually(|| db.query("SELECT * FROM pgwatch.replay($1, $2)", &[&channel, &start]).is_err()),
        "the payload was never pruned"
    );
    assert_eq!(failure(&mut db, &format!("SELECT * FROM pgwatch.replay('{channel}', {start})")).0, "72000");
    assert!(stat(&mut admin, "prunes_skipped") > skipped);
    assert!(stat(&mut admin, "pruned_payloads") > 0);
    reader.batch_execute("COMMIT").unwrap();
    // The position stays, and replay from it goes on.
    let last = position(&mut db, channel);
    assert_eq!(replay(&mut db, channel, last, 10), []);
    db.batch_execute("INSERT INTO short VALUES (2)").unwrap();
    assert!(eventually(|| position(&mut db, channel) > last));
    assert_eq!(replay(&mut db, channel, last, 10).len(), 1);
    drop((db, reader));
    admin.batch_execute("DROP DATABASE r_prune WITH (FORCE)").unwrap();
}
