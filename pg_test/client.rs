//! The subscriber clients against a real server of their own: the Rust `pgwatch-client` and the
//! Python subscriber keep mirrors equal to a table under concurrent writers while their
//! connections are killed and the server restarts, a slow consumer stays bounded and recovers
//! by replay, and scoped subscriptions get exactly their rows.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwatch_client::{Event, Mirror, Op, ResetReason, Scope, Subscriber};
use postgres::Client;
use serde_json::{json, Value};

// Shared with the main suite, which uses all of it.
#[allow(dead_code)]
#[path = "support.rs"]
mod support;
use support::{serial, WAIT};
#[allow(dead_code)]
#[path = "cluster.rs"]
mod cluster;
use cluster::Cluster;

const CONF: &[&str] = &["shared_preload_libraries = 'pgwatch'"];

const CHANNEL: &str = "public.items";

/// The table the writers change: `version` takes a new value of one sequence at every write, so
/// a row's versions only grow, also across deletes, re-inserts and key changes (the writers lock
/// the ids they write first: see `write_once`).
const SETUP: &str = "CREATE EXTENSION IF NOT EXISTS pgwatch;
     CREATE SEQUENCE versions;
     CREATE TABLE items (id int PRIMARY KEY, grp int NOT NULL, version bigint NOT NULL);
     SELECT watch_table('items', '*, truncate', '{grp,version}', retain => '1 hour')";

fn conninfo(cluster: &Cluster, application: &str) -> String {
    format!("host=localhost port={} user=postgres dbname=postgres application_name={application}", cluster.port)
}

/// A cluster of its own in which `items` is watched (see `SETUP`).
fn with_items(name: &str) -> Cluster {
    let cluster = Cluster::new(name);
    cluster.connect().batch_execute(SETUP).unwrap();
    cluster
}

/// A runtime for a test's async part.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap()
}

/// Takes the reset every subscription starts with (the snapshot's cue).
async fn started(subscriber: &mut Subscriber) {
    assert!(matches!(subscriber.next().await.unwrap(), Event::Reset(r) if r.reason == ResetReason::Start));
}

/// A connection for the async tests (the `postgres` crate's cannot run inside a runtime).
async fn connect_async(cluster: &Cluster, user: &str) -> tokio_postgres::Client {
    let info = format!("host=localhost port={} user={user} dbname=postgres", cluster.port);
    let (client, connection) = tokio_postgres::connect(&info, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// The position of a retained channel.
async fn position(db: &tokio_postgres::Client, channel: &str) -> i64 {
    db.query_one("SELECT pgwatch.position($1)", &[&channel]).await.unwrap().get(0)
}

/// Runs each statement once the worker has sent what the one before changed on the retained
/// `channel`, so that it cannot fold their changes together.
async fn one_by_one(db: &tokio_postgres::Client, channel: &str, statements: impl IntoIterator<Item = String>) {
    for sql in statements {
        let before = position(db, channel).await;
        db.batch_execute(&sql).await.unwrap();
        let deadline = Instant::now() + WAIT;
        while position(db, channel).await == before {
            assert!(Instant::now() < deadline, "the worker did not send what {sql} changed");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Inserts rows `ids` into items, one notification each.
async fn insert_one_by_one(db: &tokio_postgres::Client, ids: std::ops::RangeInclusive<i64>) {
    one_by_one(db, CHANNEL, ids.map(|id| format!("INSERT INTO items VALUES ({id}, 0, nextval('versions'))"))).await;
}

/// The table's rows as the mirrors hold them, by id.
fn table_rows(db: &mut Client) -> Vec<Value> {
    try_table_rows(db).unwrap()
}

/// The same, or the error of a connection that the server's restart may have closed.
fn try_table_rows(db: &mut Client) -> Result<Vec<Value>, postgres::Error> {
    Ok(db
        .query("SELECT id, grp, version FROM items ORDER BY id", &[])?
        .iter()
        .map(|r| json!({"id": r.get::<_, i32>(0), "grp": r.get::<_, i32>(1), "version": r.get::<_, i64>(2)}))
        .collect())
}

/// A tiny deterministic generator for the writers' choices.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, sides: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % sides
    }
}

/// One writer's transaction: a few inserts, updates, key changes and deletes, now and then a
/// truncate, a fifth of them rolled back. Errors (a key taken, a connection killed) roll back.
///
/// The transaction first locks the ids it writes, in order, until it ends, so that a row's
/// versions grow in the order of commits (rows 301 to 600 are written only by key changes, under
/// the lock of the id they came from). Without it they need not: an INSERT computes its values
/// before it checks the key, so one delayed there (waiting on a row, or just not scheduled) can
/// insert a version older than one another transaction wrote to the same id and a third deleted
/// meanwhile.
fn write_once(db: &mut Client, dice: &mut Dice) -> Result<(), postgres::Error> {
    let mut ids = Vec::new();
    let mut statements = String::new();
    for _ in 0..1 + dice.roll(4) {
        let (id, grp) = (1 + dice.roll(300), dice.roll(4));
        ids.push(id);
        statements += &match dice.roll(100) {
            0 => "TRUNCATE items;".to_string(),
            1..=35 => {
                format!("INSERT INTO items VALUES ({id}, {grp}, nextval('versions')) ON CONFLICT (id) DO NOTHING;")
            }
            36..=75 => format!("UPDATE items SET grp = {grp}, version = nextval('versions') WHERE id = {id};"),
            76..=85 => {
                format!("UPDATE items SET id = id + 300, version = nextval('versions') WHERE id = {id} AND id <= 600;")
            }
            _ => format!("DELETE FROM items WHERE id = {id};"),
        };
    }
    ids.sort_unstable();
    ids.dedup();
    let locks: Vec<String> = ids.iter().map(|id| format!("pg_advisory_xact_lock({id})")).collect();
    let end = if dice.roll(5) == 0 { "ROLLBACK;" } else { "COMMIT;" };
    let sql = format!("BEGIN; SELECT {}; {statements}{end}", locks.join(", "));
    db.batch_execute(&sql).or_else(|e| db.batch_execute("ROLLBACK").map(|()| Err(e))?)
}

/// Eight writers until `stop`, reconnecting after failures.
fn write_until(cluster: &Cluster, stop: &AtomicBool) {
    std::thread::scope(|scope| {
        for writer in 0..8u64 {
            scope.spawn(move || {
                let mut dice = Dice(0x9e37_79b9_7f4a_7c15 ^ ((writer + 1) * 0x1000_0001));
                let mut db = cluster.connect();
                while !stop.load(Ordering::Relaxed) {
                    if write_once(&mut db, &mut dice).is_err() && db.is_closed() {
                        std::thread::sleep(Duration::from_millis(20));
                        if let Ok(fresh) = cluster.try_connect("postgres") {
                            db = fresh;
                        }
                    }
                }
            });
        }
    });
}

/// Kills the backends of `application` every 150 to 650 ms until `stop`; how many it killed.
fn kill_until(cluster: &Cluster, application: &str, stop: &AtomicBool) -> i64 {
    let mut dice = Dice(7);
    let mut killed = 0;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(150 + dice.roll(500)));
        if let Ok(mut db) = cluster.try_connect("postgres") {
            if let Ok(row) = db.query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
                &[&application],
            ) {
                killed += row.get::<_, i64>(0);
            }
        }
    }
    killed
}

/// Writers and a killer for a few seconds, a clean restart in the middle, then a last row
/// touched until `converged` says the subscriber holds the table. Returns the connections killed.
fn run_workload(cluster: &Cluster, application: &str, converged: &AtomicBool) -> i64 {
    let (stop_writers, stop_killer) = (AtomicBool::new(false), AtomicBool::new(false));
    let killed = std::thread::scope(|scope| {
        let killer = scope.spawn(|| kill_until(cluster, application, &stop_killer));
        scope.spawn(|| write_until(cluster, &stop_writers));
        std::thread::sleep(Duration::from_secs(3));
        cluster.pg_ctl(&["restart", "-m", "fast"]);
        std::thread::sleep(Duration::from_secs(3));
        stop_writers.store(true, Ordering::Relaxed);
        stop_killer.store(true, Ordering::Relaxed);
        killer.join().unwrap()
    });
    // A last change, repeated, so that a subscriber compares after everything else.
    let mut db = cluster.connect();
    let deadline = Instant::now() + WAIT;
    while !converged.load(Ordering::Relaxed) && Instant::now() < deadline {
        db.batch_execute(
            "INSERT INTO items VALUES (0, 0, nextval('versions'))
                          ON CONFLICT (id) DO UPDATE SET version = excluded.version",
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    killed
}

/// A mirror's rows as JSON objects, by id.
fn mirror_rows(mirror: &Mirror) -> Vec<Value> {
    let mut rows: Vec<Value> = mirror.table().rows().values().map(|r| Value::Object(r.to_object())).collect();
    rows.sort_by_key(|r| r["id"].as_i64());
    rows
}

#[test]
fn a_mirror_stays_exact_through_killed_connections_and_a_restart() {
    let _serial = serial();
    let cluster = with_items("client-mirror");
    let converged = Arc::new(AtomicBool::new(false));
    let application = "pgwatch-client-test";
    let info = conninfo(&cluster, application);
    let done = converged.clone();
    let subscriber = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let subscriber = Subscriber::builder(&info)
                .unwrap()
                .channel(CHANNEL)
                .dead_after(Duration::from_secs(2))
                .connect()
                .await
                .unwrap();
            let mut mirror = Mirror::new(subscriber, CHANNEL);
            // The highest version a payload applied per id since the last snapshot: a payload
            // applied twice, or out of order, would not raise it. (Payloads after a snapshot may
            // carry changes it already holds: only payloads are compared with payloads.)
            let mut versions: HashMap<i64, i64> = HashMap::new();
            let (checker, connection) =
                tokio_postgres::connect(&info.replace(application, "checker"), tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(connection);
            let mut checker = Some(checker);
            loop {
                // Nothing for this long: the workload has ended without the mirror converging.
                let Ok(event) = tokio::time::timeout(WAIT * 2, mirror.next()).await else {
                    return mirror.subscriber().stats();
                };
                match event.unwrap() {
                    Event::Reset(reset) => {
                        assert!(
                            matches!(reset.reason, ResetReason::Start | ResetReason::Marker(_)),
                            "a retained channel needs no other reset: {reset:?}"
                        );
                        versions.clear();
                    }
                    Event::Change(change) if change.op != Op::Delete => {
                        for row in &change.rows {
                            let (id, version) = (row.get("id").unwrap().as_i64().unwrap(), row.get("version").unwrap().as_i64().unwrap());
                            let before = versions.insert(id, version).unwrap_or(0);
                            assert!(version > before, "id {id}: version {version} applied after {before}");
                        }
                        if change.rows.iter().any(|r| r.get("id") == Some(&json!(0))) {
                            // The server restarts once: a connection of the checker's may be gone.
                            let client = match checker.take() {
                                Some(c) if !c.is_closed() => c,
                                _ => {
                                    let (c, conn) = tokio_postgres::connect(&info.replace(application, "checker"), tokio_postgres::NoTls)
                                        .await
                                        .unwrap();
                                    tokio::spawn(conn);
                                    c
                                }
                            };
                            let table: Vec<Value> = client
                                .query("SELECT id, grp, version FROM items ORDER BY id", &[])
                                .await
                                .unwrap()
                                .iter()
                                .map(|r| json!({"id": r.get::<_, i32>(0), "grp": r.get::<_, i32>(1), "version": r.get::<_, i64>(2)}))
                                .collect();
                            checker = Some(client);
                            if table == mirror_rows(&mirror) {
                                done.store(true, Ordering::Relaxed);
                                return mirror.subscriber().stats();
                            }
                        }
                    }
                    _ => {}
                }
            }
        })
    });
    let killed = run_workload(&cluster, application, &converged);
    let stats = subscriber.join().unwrap();
    assert!(converged.load(Ordering::Relaxed), "the mirror did not converge: {stats:?}");
    assert!(killed > 0 && stats.reconnects > 0, "connections killed: {killed}, {stats:?}");
    assert!(stats.applied > 100, "the writers wrote: {stats:?}");
}

#[test]
fn a_subscriber_replays_what_was_sent_while_it_could_not_connect() {
    let _serial = serial();
    let cluster = with_items("client-replay");
    let mut db = cluster.connect();
    db.batch_execute("CREATE ROLE reader LOGIN; GRANT SELECT ON items TO reader").unwrap();
    let info = format!("host=localhost port={} user=reader dbname=postgres application_name=replayer", cluster.port);
    let runtime = runtime();
    runtime.block_on(async {
        let mut subscriber = Subscriber::builder(&info)
            .unwrap()
            .channel(CHANNEL)
            .backoff(Duration::from_millis(20), Duration::from_millis(200))
            .connect()
            .await
            .unwrap();
        started(&mut subscriber).await;
        let start = subscriber.last_seq(CHANNEL).unwrap();
        // The reader can connect no more; its connection is killed; ten transactions commit.
        let db = connect_async(&cluster, "postgres").await;
        db.batch_execute(
            "ALTER ROLE reader NOLOGIN;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'replayer'",
        )
        .await
        .unwrap();
        insert_one_by_one(&db, 1..=10).await;
        db.batch_execute("ALTER ROLE reader LOGIN").await.unwrap();
        let mut seqs = Vec::new();
        let mut ids = Vec::new();
        while ids.len() < 10 {
            match subscriber.next().await.unwrap() {
                Event::Change(change) => {
                    seqs.push(change.seq.unwrap());
                    ids.extend(change.rows.iter().map(|r| r.get("id").unwrap().as_i64().unwrap()));
                }
                other => panic!("only changes were sent: {other:?}"),
            }
        }
        assert_eq!(ids, (1..=10).collect::<Vec<i64>>());
        assert_eq!(seqs, (start + 1..=start + 10).collect::<Vec<i64>>());
        let stats = subscriber.stats();
        assert!(stats.reconnects >= 1 && stats.replayed >= 10 && stats.resets == 1, "{stats:?}");
    });
}

#[test]
fn a_slow_consumer_stays_within_its_buffer_and_recovers_by_replay() {
    let _serial = serial();
    let cluster = with_items("client-slow");
    let mut db = cluster.connect();
    let runtime = runtime();
    runtime.block_on(async {
        let subscriber = Subscriber::builder(&conninfo(&cluster, "slow"))
            .unwrap()
            .channel(CHANNEL)
            .buffer(20)
            .connect()
            .await
            .unwrap();
        let mut mirror = Mirror::new(subscriber, CHANNEL);
        assert!(matches!(mirror.next().await.unwrap(), Event::Reset(_)));
        // 200 notifications while the consumer sleeps: ten times its buffer.
        let db = connect_async(&cluster, "postgres").await;
        let writer = tokio::spawn(async move {
            insert_one_by_one(&db, 1..=200).await;
            db.query_one("SELECT pg_notification_queue_usage()", &[]).await.unwrap().get::<_, f64>(0)
        });
        let deadline = Instant::now() + WAIT;
        while mirror.subscriber().backlog().1 == 0 {
            assert!(Instant::now() < deadline, "the buffer never overflowed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let usage = writer.await.unwrap();
        assert!(usage < 0.001, "the server's notification queue filled to {usage}");
        while mirror.table().len() < 200 {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let event = mirror.next().await.unwrap();
            assert!(!matches!(event, Event::Reset(_)), "replay recovers a retained channel: {event:?}");
        }
        let stats = mirror.subscriber().stats();
        assert!(stats.lagged >= 1 && stats.dropped >= 1 && stats.replayed >= 1, "{stats:?}");
        assert!(mirror.subscriber().backlog().0 <= 20);
    });
    assert_eq!(table_rows(&mut db).len(), 200);
}

#[test]
fn forged_payloads_do_not_make_a_subscriber_drop_or_keep_anything() {
    let _serial = serial();
    let cluster = with_items("client-forged");
    let runtime = runtime();
    runtime.block_on(async {
        let db = connect_async(&cluster, "postgres").await;
        let mut subscriber =
            Subscriber::builder(&conninfo(&cluster, "forged")).unwrap().channel(CHANNEL).connect().await.unwrap();
        started(&mut subscriber).await;
        let ids = |event: Event| match event {
            Event::Change(c) => c.rows.iter().map(|r| r.get("id").unwrap().as_i64().unwrap()).collect::<Vec<_>>(),
            other => panic!("a change, not {other:?}"),
        };
        let forge = |payload: String| format!("SELECT pg_notify('{CHANNEL}', '{payload}')");
        let p = position(&db, CHANNEL).await;
        // Garbage, a jump far ahead, and a reset marker with the next seq: none is the log's.
        for payload in [
            "garbage".to_string(),
            format!(
                r#"{{"tbl":"public.items","op":"insert","seq":{},"rows":[{{"id":666,"grp":0,"version":0}}]}}"#,
                p + 1000
            ),
            format!(r#"{{"tbl":"public.items","op":"reset","seq":{},"reason":"restart"}}"#, p + 1),
        ] {
            db.batch_execute(&forge(payload)).await.unwrap();
        }
        db.batch_execute("INSERT INTO items VALUES (1, 0, nextval('versions'))").await.unwrap();
        assert_eq!(ids(subscriber.next().await.unwrap()), [1]);
        assert_eq!(subscriber.last_seq(CHANNEL), Some(p + 1));
        // A forged payload with the next seq is handed out (nothing tells it apart yet); the
        // server's own with that seq shows the mismatch, and a reset follows.
        db.batch_execute(&forge(format!(
            r#"{{"tbl":"public.items","op":"insert","seq":{},"rows":[{{"id":777,"grp":0,"version":0}}]}}"#,
            p + 2
        )))
        .await
        .unwrap();
        db.batch_execute("INSERT INTO items VALUES (2, 0, nextval('versions'))").await.unwrap();
        assert_eq!(ids(subscriber.next().await.unwrap()), [777]);
        assert!(matches!(subscriber.next().await.unwrap(), Event::Reset(r) if r.reason == ResetReason::Mismatch));
        let stats = subscriber.stats();
        assert_eq!((stats.ignored, stats.resets), (1, 2), "{stats:?}");
    });
}

/// Continues a stopped process when dropped (a stopped backend would hold up its server's stop).
struct Stopped(i32);

impl Stopped {
    fn stop(pid: i32) -> Stopped {
        assert!(Command::new("kill").args(["-STOP", &pid.to_string()]).status().unwrap().success());
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0.to_string()]).status();
    }
}

#[test]
fn a_subscriber_notices_a_backend_that_stopped_answering() {
    let _serial = serial();
    let cluster = with_items("client-stopped");
    let runtime = runtime();
    runtime.block_on(async {
        let db = connect_async(&cluster, "postgres").await;
        let mut subscriber = Subscriber::builder(&conninfo(&cluster, "stopped"))
            .unwrap()
            .channel(CHANNEL)
            .dead_after(Duration::from_secs(2))
            .connect()
            .await
            .unwrap();
        started(&mut subscriber).await;
        let pid: i32 = db
            .query_one("SELECT pid FROM pg_stat_activity WHERE application_name = 'stopped'", &[])
            .await
            .unwrap()
            .get(0);
        // Its backend stops answering (the kernel still keeps the connection up); a row commits.
        let _stopped = Stopped::stop(pid);
        db.batch_execute("INSERT INTO items VALUES (1, 0, nextval('versions'))").await.unwrap();
        let event =
            tokio::time::timeout(WAIT, subscriber.next()).await.expect("the row, from a new connection").unwrap();
        assert!(matches!(&event, Event::Change(c) if c.rows[0].get("id") == Some(&json!(1))), "{event:?}");
        let stats = subscriber.stats();
        assert!(stats.reconnects >= 1, "{stats:?}");
    });
}

/// The mirror's next event, which must come.
async fn next_event(mirror: &mut Mirror) -> Event {
    tokio::time::timeout(WAIT, mirror.next()).await.expect("an event").unwrap()
}

#[test]
fn without_retention_a_mirror_refetches_after_a_reconnect_in_both_delivery_modes() {
    let _serial = serial();
    let cluster = Cluster::new("client-plain");
    let mut db = cluster.connect();
    db.batch_execute("CREATE EXTENSION pgwatch").unwrap();
    let runtime = runtime();
    for mode in support::MODES {
        db.batch_execute(&format!(
            "DROP TABLE IF EXISTS plain; CREATE TABLE plain (id int PRIMARY KEY, v int);
             SELECT watch_table('plain', '*, truncate', '{{v}}'); ALTER ROLE postgres SET pgwatch.delivery = {mode}"
        ))
        .unwrap();
        runtime.block_on(async {
            let db = connect_async(&cluster, "postgres").await;
            let application = format!("plain-{mode}");
            let subscriber = Subscriber::builder(&conninfo(&cluster, &application))
                .unwrap()
                .channel("public.plain")
                .backoff(Duration::from_millis(20), Duration::from_millis(200))
                .connect()
                .await
                .unwrap();
            let mut mirror = Mirror::new(subscriber, "public.plain");
            assert!(matches!(next_event(&mut mirror).await, Event::Reset(r) if r.reason == ResetReason::Start));
            db.batch_execute("INSERT INTO plain SELECT g, g FROM generate_series(1, 5) g").await.unwrap();
            assert!(
                matches!(next_event(&mut mirror).await, Event::Change(c) if c.rows.len() == 5 && (c.seq.is_some() == (mode == "worker")))
            );
            // Killed: what is sent until it is back cannot be replayed; a reset says so.
            db.batch_execute(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{application}';
                 UPDATE plain SET v = 0 WHERE id = 1; DELETE FROM plain WHERE id = 2"
            ))
            .await
            .unwrap();
            loop {
                match next_event(&mut mirror).await {
                    Event::Reset(r) => {
                        assert_eq!(r.reason, ResetReason::Reconnected);
                        break;
                    }
                    // Sent before the kill took effect.
                    Event::Change(_) => {}
                    other => panic!("{other:?}"),
                }
            }
            db.batch_execute("TRUNCATE plain; INSERT INTO plain VALUES (7, 7)").await.unwrap();
            while mirror.table().rows().values().all(|r| r.get("id") != Some(&json!(7))) {
                next_event(&mut mirror).await;
            }
            let rows: Vec<Value> = mirror.table().rows().values().map(|r| Value::Object(r.to_object())).collect();
            assert_eq!(rows, [json!({"id": 7, "v": 7})], "{mode}");
        });
    }
}

#[test]
fn a_scope_gets_its_rows_and_those_that_leave_it() {
    let _serial = serial();
    let cluster = with_items("client-scope");
    let mut db = cluster.connect();
    db.batch_execute(
        "CREATE TABLE plain (id int PRIMARY KEY, grp int);
         SELECT watch_table('plain', extra_columns => '{grp}', retain => '1 hour')",
    )
    .unwrap();
    let runtime = runtime();
    runtime.block_on(async {
        let db = connect_async(&cluster, "postgres").await;
        let mut by_group = Subscriber::builder(&conninfo(&cluster, "scoped"))
            .unwrap()
            .scoped("public.plain", Scope::new("grp", 1))
            .connect()
            .await
            .unwrap();
        let mut by_key = Subscriber::builder(&conninfo(&cluster, "keyed"))
            .unwrap()
            .scoped("public.plain", Scope::new("id", 2))
            .connect()
            .await
            .unwrap();
        for subscriber in [&mut by_group, &mut by_key] {
            started(subscriber).await;
        }
        let changes = [
            "INSERT INTO plain VALUES (1, 1), (2, 1), (3, 2)",
            "UPDATE plain SET grp = 2 WHERE id = 1",
            "UPDATE plain SET grp = 1 WHERE id = 3",
            "UPDATE plain SET id = 4 WHERE id = 2",
            "DELETE FROM plain WHERE id = 3",
            "INSERT INTO plain VALUES (5, 2)",
            "INSERT INTO plain VALUES (6, 1)",
        ];
        one_by_one(&db, "public.plain", changes.map(String::from)).await;
        // Each sees what concerns it, in order; nothing about rows 5 (grp 2), and the last
        // insert marks the end.
        let mut seen = Vec::new();
        loop {
            let Event::Change(change) = by_group.next().await.unwrap() else { panic!("only changes") };
            for row in &change.rows {
                seen.push(format!(
                    "{} {} {}{}",
                    change.op.as_str(),
                    row.get("id").unwrap(),
                    row.get("grp").unwrap(),
                    if row.has_left() { " left" } else { "" }
                ));
            }
            if change.rows.iter().any(|r| r.get("id") == Some(&json!(6))) {
                break;
            }
        }
        assert_eq!(
            seen,
            [
                "insert 1 1",
                "insert 2 1",
                "update 1 2 left",
                "update 3 1",
                "delete 2 1",
                "insert 4 1",
                "delete 3 1",
                "insert 6 1"
            ],
            "after {changes:?}"
        );
        let mut keyed = Vec::new();
        while keyed.len() < 2 {
            let Event::Change(change) = by_key.next().await.unwrap() else { panic!("only changes") };
            keyed.extend(change.rows.iter().map(|r| format!("{} {}", change.op.as_str(), r.get("id").unwrap())));
        }
        assert_eq!(keyed, ["insert 2", "delete 2"]);
    });
}

/// The Python subscriber's mirror, asked on its stdin.
struct Python {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Python {
    fn start(conninfo: &str) -> Python {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/python/pgwatch_subscriber.py");
        let mut child = Command::new("/usr/bin/python3")
            .args([script, conninfo, CHANNEL])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 with psycopg 3 (Debian's python3-psycopg)");
        let out = BufReader::new(child.stdout.take().unwrap());
        Python { child, out }
    }

    fn dump(&mut self) -> Value {
        writeln!(self.child.stdin.as_mut().unwrap(), "dump").unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }
}

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_python_subscriber_keeps_an_exact_mirror_through_kills_and_a_restart() {
    let _serial = serial();
    let cluster = with_items("client-python");
    let application = "pgwatch-python";
    let mut python = Python::start(&format!("host=localhost port={} user=postgres dbname=postgres", cluster.port));
    assert_eq!(python.dump()["resets"], json!(1), "the first snapshot");
    let converged = AtomicBool::new(false);
    let killed = std::thread::scope(|scope| {
        let writer = scope.spawn(|| run_workload(&cluster, application, &converged));
        let deadline = Instant::now() + WAIT * 2;
        let mut db = cluster.connect();
        let mut last = Value::Null;
        while !writer.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            // Compared only once the last row is there: before, writers may still be running.
            last = python.dump();
            let Ok(table) = db.query("SELECT 1 FROM items WHERE id = 0", &[]).and_then(|_| try_table_rows(&mut db))
            else {
                db = cluster.connect();
                continue;
            };
            if table.iter().any(|r| r["id"] == json!(0)) && last["rows"] == Value::Array(table) {
                converged.store(true, Ordering::Relaxed);
            }
        }
        if !converged.load(Ordering::Relaxed) {
            let table = try_table_rows(&mut db).unwrap_or_else(|_| table_rows(&mut cluster.connect()));
            let mirror = last["rows"].as_array().cloned().unwrap_or_default();
            let only_table: Vec<&Value> = table.iter().filter(|r| !mirror.contains(r)).collect();
            let only_mirror: Vec<&Value> = mirror.iter().filter(|r| !table.contains(r)).collect();
            panic!("the Python mirror did not converge: only in the table {only_table:?}, only in the mirror {only_mirror:?}; {}", last["resets"]);
        }
        writer.join().unwrap()
    });
    assert!(killed > 0, "no connection of the Python subscriber was killed");
    assert_eq!(python.dump()["ignored"], json!(0));
}
