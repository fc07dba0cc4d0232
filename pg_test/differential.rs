//! A randomized differential test: writers run random transactions on watched tables while a
//! subscriber, listening from the start, takes a snapshot of each table once they are under way
//! and then applies the notifications as they arrive, by the README's rules and nothing else
//! (its refetches read the tables as they are at that moment); once the writers are done, its
//! copy of each table must equal the table. Shared by the main suite
//! (inline and worker delivery) and the small-queue suite (worker delivery that falls back).
//!
//! Writers run concurrently, so a seed fixes what they try, not the order they commit in: a
//! failure prints every committed transaction in commit order, to be kept as a regression test
//! replayed serially.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use postgres::Client;

use super::support::{connect, Listener, WAIT};

/// The watched tables: object rows, a compact watch, and keys only.
const TABLES: [(&str, &str); 4] = [
    ("d_obj", "SELECT watch_table('d_obj', '*, truncate', '{v,n}')"),
    ("d_cmp", "SELECT watch_table('d_cmp', '*, truncate', '{v,n}', payload => 'compact')"),
    ("d_key", "SELECT watch_table('d_key', 'insert, delete, update, truncate', payload => 'keys')"),
    // Always delivered by the worker, whatever the writer's pgwatch.delivery, and logged.
    ("d_ret", "SELECT watch_table('d_ret', '*, truncate', '{v,n}', retain => '1 hour')"),
];
/// The table whose payloads are kept: replay must return exactly those it notified.
const RETAINED: &str = "d_ret";
/// Written only with pgwatch.mute on: nothing may arrive for it.
const MUTED: &str = "d_muted";
const KEYS: i64 = 24;

/// A small deterministic generator (xorshift), so that the test needs no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    fn key(&mut self) -> i64 {
        self.below(KEYS as u64) as i64
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// One statement of a random transaction on `table`.
fn statement(rng: &mut Rng, table: &str, step: usize) -> String {
    let (a, b) = (rng.key(), rng.key());
    let (lo, hi) = (a.min(b), a.max(b));
    let value = match rng.below(10) {
        0 => format!("repeat('w', {})", 4000 + rng.below(6000)),
        1 => "NULL".to_string(),
        _ => format!("'s{step}.{}'", rng.below(1000)),
    };
    match rng.below(11) {
        0 | 1 => format!(
            "INSERT INTO {table} SELECT g, {value}, g FROM generate_series({lo}, {hi}) g ON CONFLICT DO NOTHING"
        ),
        2 => format!("UPDATE {table} SET v = {value}, n = n + 1 WHERE id BETWEEN {lo} AND {hi}"),
        3 => format!("UPDATE {table} SET id = {b} WHERE id = {a}"),
        // A swap of two keys through a free one, and a rotation of three.
        4 => format!(
            "UPDATE {table} SET id = -1 WHERE id = {a}; UPDATE {table} SET id = {a} WHERE id = {b};
             UPDATE {table} SET id = {b} WHERE id = -1"
        ),
        5 => {
            let c = rng.key();
            format!(
                "UPDATE {table} SET id = -1 WHERE id = {a}; UPDATE {table} SET id = {a} WHERE id = {b};
                 UPDATE {table} SET id = {b} WHERE id = {c}; UPDATE {table} SET id = {c} WHERE id = -1"
            )
        }
        6 => format!("DELETE FROM {table} WHERE id BETWEEN {lo} AND {hi}"),
        // Insert then delete, delete then insert.
        7 => format!(
            "INSERT INTO {table} VALUES ({a}, {value}, 0) ON CONFLICT DO NOTHING; DELETE FROM {table} WHERE id = {a}"
        ),
        8 => format!("DELETE FROM {table} WHERE id = {a}; INSERT INTO {table} VALUES ({a}, {value}, 1)"),
        9 => format!("UPDATE {table} SET id = id + {KEYS} WHERE id BETWEEN {lo} AND {hi}; DELETE FROM {table} WHERE id >= {KEYS}"),
        _ => match rng.below(8) {
            0 => format!("TRUNCATE {table}"),
            // A large statement: many rows, spread over many payloads.
            _ => format!(
                "INSERT INTO {table} SELECT g, 'bulk' || g, g FROM generate_series(1000, {}) g ON CONFLICT DO NOTHING;
                 DELETE FROM {table} WHERE id >= 1000",
                1000 + 200 + rng.below(800)
            ),
        },
    }
}

/// One random transaction: statements on random tables, some in savepoints rolled back or
/// released, some transactions rolled back whole, some muted (on the muted table only).
fn transaction(rng: &mut Rng) -> (String, bool) {
    if rng.chance(5) {
        let key = rng.key();
        return (
            format!("BEGIN; SET LOCAL pgwatch.mute = on; INSERT INTO {MUTED} VALUES ({key}, 'm', 0) ON CONFLICT (id) DO UPDATE SET n = {MUTED}.n + 1; COMMIT"),
            true,
        );
    }
    let mut sql = String::from("BEGIN;");
    for step in 0..1 + rng.below(4) as usize {
        let table = TABLES[rng.below(TABLES.len() as u64) as usize].0;
        let statement = statement(rng, table, step);
        if rng.chance(20) {
            let end = if rng.chance(50) { "ROLLBACK TO SAVEPOINT s" } else { "RELEASE SAVEPOINT s" };
            sql += &format!(" SAVEPOINT s; {statement}; {end};");
        } else {
            sql += &format!(" {statement};");
        }
    }
    let commit = !rng.chance(10);
    sql += if commit { " COMMIT" } else { " ROLLBACK" };
    (sql, commit)
}

/// A subscriber's copy of one table, kept by the README's rules.
#[derive(Default)]
struct Copy {
    rows: BTreeMap<i64, (Option<String>, Option<i64>)>,
    /// The last `seq` seen on the channel.
    seq: Option<u64>,
    refetches: usize,
}

/// The rows of `table` as they are now: what a subscriber refetches.
fn fetch(db: &mut Client, table: &str, key: Option<i64>) -> BTreeMap<i64, (Option<String>, Option<i64>)> {
    let filter = key.map_or(String::new(), |key| format!(" WHERE id = {key}"));
    let sql = format!("SELECT id, v, n FROM {table}{filter}");
    let rows = loop {
        match db.query(&sql, &[]) {
            Ok(rows) => break rows,
            // Queued between two writers that deadlock (one holds the table for TRUNCATE and
            // waits for the other, which waits behind this read), the read can be the one
            // PostgreSQL cancels: a subscriber reads again.
            Err(e) if e.code() == Some(&postgres::error::SqlState::T_R_DEADLOCK_DETECTED) => continue,
            Err(e) => panic!("{sql}: {e}"),
        }
    };
    rows.iter()
        .map(|row| (i64::from(row.get::<_, i32>(0)), (row.get(1), row.get::<_, Option<i32>>(2).map(i64::from))))
        .collect()
}

impl Copy {
    fn refetch(&mut self, db: &mut Client, table: &str) {
        self.rows = fetch(db, table, None);
        self.refetches += 1;
    }

    /// Applies one notification by the README's rules.
    fn apply(&mut self, db: &mut Client, table: &str, payload: &str) {
        let v: serde_json::Value = serde_json::from_str(payload).unwrap_or_else(|e| panic!("{e}: {payload}"));
        if let Some(seq) = v.get("seq").and_then(serde_json::Value::as_u64) {
            // Nothing is lost in these runs, so a gap is a failure here, not just a refetch.
            if let Some(last) = self.seq {
                assert_eq!(seq, last + 1, "seq gap on {table}: {payload}");
            }
            self.seq = Some(seq);
        }
        let op = v["op"].as_str().unwrap();
        if v.get("overflow").is_some() || op == "resync" || op == "reset" {
            return self.refetch(db, table);
        }
        if op == "truncate" {
            self.rows.clear();
            return;
        }
        let cols: Option<Vec<&str>> =
            v.get("cols").map(|cols| cols.as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect());
        for row in v["rows"].as_array().unwrap() {
            // Object rows name their values; compact ones list them in `cols` order, with `old`
            // and `partial` in a trailing object.
            let (values, meta): (BTreeMap<&str, &serde_json::Value>, Option<&serde_json::Value>) = match &cols {
                None => (row.as_object().unwrap().iter().map(|(k, v)| (k.as_str(), v)).collect(), Some(row)),
                Some(cols) => {
                    let items = row.as_array().unwrap();
                    let meta = items.last().filter(|last| last.is_object());
                    (cols.iter().copied().zip(items.iter()).filter(|(_, v)| !v.is_object()).collect(), meta)
                }
            };
            let id = values["id"].as_i64().unwrap();
            let partial = meta.and_then(|m| m.get("partial")).is_some_and(|p| p == true);
            match op {
                "delete" => {
                    self.rows.remove(&id);
                }
                _ if partial || !values.contains_key("v") => {
                    // Values left out (too big, or a keys-only watch): fetch the row by key.
                    self.rows.remove(&id);
                    self.rows.extend(fetch(db, table, Some(id)));
                }
                _ => {
                    let v = values["v"].as_str().map(str::to_string);
                    let n = values["n"].as_i64();
                    self.rows.insert(id, (v, n));
                }
            }
        }
    }
}

/// Whether `payload` lists the `op` of key `id` (the key is the first value of a row).
fn lists(payload: &str, op: &str, id: i64) -> bool {
    let v: serde_json::Value = serde_json::from_str(payload).unwrap();
    let key = |row: &serde_json::Value| row.get("id").or_else(|| row.get(0)).and_then(serde_json::Value::as_i64);
    v["op"] == op
        && v.get("rows")
            .and_then(|rows| rows.as_array())
            .is_some_and(|rows| rows.iter().any(|row| key(row) == Some(id)))
}

/// What the subscriber thread shares with the test: how far the writers are, and how far it is.
struct Progress {
    /// Transactions the writers have started.
    attempted: AtomicUsize,
    /// Sentinel rounds the subscriber has seen on every table (see [`run`]).
    rounds_seen: AtomicUsize,
    /// The test failed elsewhere: the subscriber stops.
    give_up: AtomicBool,
}

/// How many copies of each table the subscriber keeps: its first, and one from each later fetch.
const COPIES: usize = 8;

/// The subscriber: listening since before the writers began, it takes its first snapshot once
/// they are a quarter through (`first_fetch_after` transactions), then applies every notification
/// as it arrives, until it has seen both sentinel rounds. A subscriber may refetch whenever it
/// likes (a reconnect, say), and every later notification must then bring its copy to the
/// table just the same: so every fifth notification of a table, while the writers are in their
/// first three quarters, starts another copy of it from a fresh fetch (up to [`COPIES`]), each
/// kept by the rules from then on, so that fetches fall between transactions that a worker sends
/// together. Returns every table's copies and the retained channel's payloads with their seq.
fn subscribe(
    mut listener: Listener,
    progress: &Progress,
    first_fetch_after: usize,
    channels: &[String],
    muted_channel: &str,
) -> (Vec<Vec<Copy>>, Vec<(i64, String)>) {
    let mut db = connect();
    while progress.attempted.load(Ordering::Relaxed) < first_fetch_after {
        assert!(!progress.give_up.load(Ordering::Relaxed), "given up");
        std::thread::sleep(Duration::from_millis(1));
    }
    let fresh = |db: &mut Client, table: &str| Copy { rows: fetch(db, table, None), ..Copy::default() };
    let mut copies: Vec<Vec<Copy>> = TABLES.iter().map(|(table, _)| vec![fresh(&mut db, table)]).collect();
    let mut retained_sent: Vec<(i64, String)> = Vec::new();
    let mut seen = [[false; TABLES.len()]; 2];
    let mut applied = [0usize; TABLES.len()];
    while progress.rounds_seen.load(Ordering::Relaxed) < 2 {
        assert!(!progress.give_up.load(Ordering::Relaxed), "given up");
        let Some((channel, payload)) = listener.receive_raw(1, Duration::from_millis(100)).pop() else { continue };
        assert_ne!(channel, muted_channel, "a muted change was sent: {payload}");
        let i = channels.iter().position(|c| *c == channel).unwrap();
        let table = TABLES[i].0;
        if table == RETAINED {
            // Those notified inline (the queue was full) carry no seq and are not logged.
            if let Some(seq) = serde_json::from_str::<serde_json::Value>(&payload).unwrap()["seq"].as_i64() {
                retained_sent.push((seq, payload.clone()));
            }
        }
        for copy in &mut copies[i] {
            copy.apply(&mut db, table, &payload);
        }
        applied[i] += 1;
        let early = progress.attempted.load(Ordering::Relaxed) < 3 * first_fetch_after;
        if applied[i] % 5 == 0 && early && copies[i].len() < COPIES {
            let mut copy = fresh(&mut db, table);
            copy.seq = copies[i][0].seq;
            copies[i].push(copy);
        }
        for (round, op) in ["insert", "delete"].iter().enumerate() {
            seen[round][i] |= lists(&payload, op, 9999);
        }
        let rounds = seen.iter().take_while(|round| round.iter().all(|&s| s)).count();
        progress.rounds_seen.fetch_max(rounds, Ordering::Relaxed);
    }
    listener.expect_silence();
    (copies, retained_sent)
}

/// Runs `transactions` random transactions in each of 4 writers for each seed, delivering in
/// `mode`, and checks every table against the copy its notifications rebuild.
pub fn run(seeds: &[u64], transactions: usize, mode: &str) {
    for &seed in seeds {
        let mut admin = connect();
        let mut setup = format!("DROP TABLE IF EXISTS {MUTED};");
        for (table, watch) in TABLES {
            setup += &format!(
                "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id int PRIMARY KEY, v text, n int); {watch};"
            );
        }
        setup += &format!("CREATE TABLE {MUTED} (id int PRIMARY KEY, v text, n int); SELECT watch_table('{MUTED}');");
        admin.batch_execute(&setup).unwrap();
        let channels: Vec<String> = TABLES.iter().map(|(t, _)| format!("public.{t}")).collect();
        let mut all: Vec<&str> = channels.iter().map(String::as_str).collect();
        let muted_channel = format!("public.{MUTED}");
        all.push(&muted_channel);
        let listener = Listener::new(connect(), &all);
        let retained_start: i64 =
            admin.query_one("SELECT pgwatch.position($1)", &[&format!("public.{RETAINED}")]).unwrap().get(0);
        let committed = Mutex::new(Vec::new());
        let progress = Progress {
            attempted: AtomicUsize::new(0),
            rounds_seen: AtomicUsize::new(0),
            give_up: AtomicBool::new(false),
        };
        let (copies, retained_sent) = std::thread::scope(|scope| {
            let subscriber = scope.spawn(|| subscribe(listener, &progress, transactions, &channels, &muted_channel));
            let writers: Vec<_> = (0..4u64)
                .map(|writer| {
                    let (committed, progress) = (&committed, &progress);
                    scope.spawn(move || {
                        let mut db = connect();
                        db.batch_execute(&format!("SET pgwatch.delivery = {mode}; SET lock_timeout = '5s'")).unwrap();
                        let mut rng = Rng::new(seed * 16 + writer);
                        for _ in 0..transactions {
                            let (sql, commit) = transaction(&mut rng);
                            progress.attempted.fetch_add(1, Ordering::Relaxed);
                            match db.batch_execute(&sql) {
                                // Each committed transaction, numbered in commit order by a
                                // sequence read after its commit (close enough to replay a
                                // failure from).
                                Ok(()) if commit => {
                                    let at: i64 = db.query_one("SELECT txid_current()", &[]).unwrap().get(0);
                                    committed.lock().unwrap().push((at, sql));
                                }
                                Ok(()) => {}
                                // Conflicts (duplicate keys, deadlocks) abort the transaction.
                                Err(_) => db.batch_execute("ROLLBACK").unwrap(),
                            }
                        }
                    })
                })
                .collect();
            let failed = writers.into_iter().map(|writer| writer.join()).filter(Result::is_err).count();
            // Two last transactions on every table, each waited for: once the second has
            // arrived, so has every notification sent before it (a resync the first one's batch
            // ends with included).
            let mut writer = connect();
            writer.batch_execute(&format!("SET pgwatch.delivery = {mode}")).unwrap();
            for (round, sentinel) in
                ["INSERT INTO {t} VALUES (9999, 'end', 0)", "DELETE FROM {t} WHERE id = 9999"].iter().enumerate()
            {
                if failed > 0 {
                    break;
                }
                for (table, _) in TABLES {
                    writer.batch_execute(&sentinel.replace("{t}", table)).unwrap();
                }
                let deadline = Instant::now() + WAIT;
                while progress.rounds_seen.load(Ordering::Relaxed) <= round
                    && Instant::now() < deadline
                    && !subscriber.is_finished()
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if progress.rounds_seen.load(Ordering::Relaxed) <= round {
                    progress.give_up.store(true, Ordering::Relaxed);
                    break;
                }
            }
            progress.give_up.fetch_or(failed > 0, Ordering::Relaxed);
            let subscribed = subscriber.join();
            assert_eq!(failed, 0, "seed {seed}, {mode}: a writer failed");
            subscribed.unwrap_or_else(|_| {
                panic!("seed {seed}, {mode}: the subscriber failed, or the last transactions did not arrive")
            })
        });
        let mut db = connect();
        // The log holds exactly what was notified on the retained channel, in order.
        let channel = format!("public.{RETAINED}");
        let mut replayed: Vec<(i64, String)> = Vec::new();
        let mut after = retained_start;
        loop {
            let rows = db.query("SELECT seq, payload FROM pgwatch.replay($1, $2, 500)", &[&channel, &after]).unwrap();
            if rows.is_empty() {
                break;
            }
            replayed.extend(rows.iter().map(|row| (row.get::<_, i64>(0), row.get::<_, String>(1))));
            after = replayed.last().unwrap().0;
        }
        assert_eq!(replayed, retained_sent, "seed {seed}, {mode}: replay differs from what was notified");
        for (i, (table, _)) in TABLES.iter().enumerate() {
            let expected = fetch(&mut db, table, None);
            for (n, copy) in copies[i].iter().enumerate() {
                if copy.rows != expected {
                    let mut log = committed.lock().unwrap().clone();
                    log.sort();
                    panic!(
                        "seed {seed}, {mode}: copy {n} of {table} differs from it\ncopy:  {:?}\ntable: {expected:?}\ncommitted transactions:\n{}",
                        copy.rows,
                        log.iter().map(|(_, sql)| sql.as_str()).collect::<Vec<_>>().join("\n")
                    );
                }
            }
        }
        admin.batch_execute(&format!("DROP TABLE {MUTED}, d_obj, d_cmp, d_key, d_ret")).unwrap();
    }
}
