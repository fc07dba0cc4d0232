//! Retained feeds across restarts, on clusters of their own (started, stopped, crashed and promoted
//! here, with the binaries of the test server): a clean restart goes on without a gap, a crash
//! restart and a standby's promotion leave a reset marker above everything sent before.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;

// Shared with the main suite, which uses all of it.
#[allow(dead_code)]
#[path = "support.rs"]
mod support;
use support::{eventually, serial, Listener, WAIT};
#[path = "cluster.rs"]
mod cluster;
use cluster::Cluster;

const CONF: &[&str] = &["shared_preload_libraries = 'pgwatch'"];

const CHANNEL: &str = "public.feed";

/// Payloads of the retained channel `CHANNEL` in the log, from `after` on, as (seq, payload).
fn replay_all(db: &mut Client, after: i64) -> Vec<(i64, serde_json::Value)> {
    let mut all = Vec::new();
    let mut after = after;
    loop {
        let rows = db.query("SELECT seq, payload FROM pgwatch.replay($1, $2, 1000)", &[&CHANNEL, &after]).unwrap();
        let Some(last) = rows.last() else { return all };
        after = last.get(0);
        all.extend(rows.iter().map(|r| (r.get::<_, i64>(0), serde_json::from_str(r.get::<_, &str>(1)).unwrap())));
    }
}

fn position(db: &mut Client) -> i64 {
    db.query_one("SELECT pgwatch.position($1)", &[&CHANNEL]).unwrap().get(0)
}

fn setup(db: &mut Client) -> i64 {
    db.batch_execute(
        "CREATE EXTENSION pgwatch;
         CREATE TABLE feed (id int PRIMARY KEY);
         SELECT watch_table('feed', 'insert', retain => '1 hour')",
    )
    .unwrap();
    position(db)
}

/// Replays `CHANNEL` after `after` until `done` holds of it (the worker logs in its own time).
fn replay_until(
    db: &mut Client,
    after: i64,
    done: impl Fn(&[(i64, serde_json::Value)]) -> bool,
) -> Vec<(i64, serde_json::Value)> {
    let deadline = Instant::now() + WAIT;
    loop {
        let logged = replay_all(db, after);
        if done(&logged) || Instant::now() > deadline {
            return logged;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Inserts ids one per transaction until `stop`, reconnecting after failures; the ids whose
/// commit was acknowledged.
fn write_until(cluster: &Cluster, stop: &AtomicBool, committed: &Mutex<Vec<i32>>, first: i32) {
    let mut id = first;
    let mut db = cluster.connect();
    while !stop.load(Ordering::Relaxed) {
        match db.batch_execute(&format!("INSERT INTO feed VALUES ({id})")) {
            Ok(()) => committed.lock().unwrap().push(id),
            Err(_) => {
                std::thread::sleep(Duration::from_millis(20));
                if let Ok(fresh) = cluster.try_connect("postgres") {
                    db = fresh;
                }
            }
        }
        id += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Adds the seq of each notification heard to `seen` until it holds `count`, or (with
/// `usize::MAX`) until nothing more arrives or the connection is gone.
fn hear(iter: &mut postgres::notifications::TimeoutIter<'_>, seen: &mut Vec<i64>, count: usize) {
    while seen.len() < count {
        match iter.next() {
            Ok(Some(n)) => {
                seen.push(serde_json::from_str::<serde_json::Value>(n.payload()).unwrap()["seq"].as_i64().unwrap())
            }
            Ok(None) if count != usize::MAX => {}
            _ => return,
        }
    }
}

/// The ids the insert payloads list.
fn ids(payloads: &[(i64, serde_json::Value)]) -> Vec<i32> {
    payloads
        .iter()
        .filter(|(_, p)| p["op"] == "insert")
        .flat_map(|(_, p)| p["rows"].as_array().unwrap().iter().map(|r| r["id"].as_i64().unwrap() as i32))
        .collect()
}

#[test]
fn a_clean_restart_under_load_continues_the_feed_without_a_gap() {
    let _serial = serial();
    let cluster = Cluster::new("clean");
    let mut db = cluster.connect();
    let start = setup(&mut db);
    let (stop, committed) = (AtomicBool::new(false), Mutex::new(Vec::new()));
    std::thread::scope(|scope| {
        scope.spawn(|| write_until(&cluster, &stop, &committed, 1));
        std::thread::sleep(Duration::from_millis(500));
        cluster.pg_ctl(&["restart", "-m", "fast"]);
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
    });
    let mut db = cluster.connect();
    let committed = committed.into_inner().unwrap();
    let deadline = Instant::now() + WAIT;
    let logged = loop {
        let logged = replay_all(&mut db, start);
        let sent = ids(&logged);
        if committed.iter().all(|id| sent.contains(id)) || Instant::now() > deadline {
            break logged;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Unbroken (replay checks the chain), no reset, every committed row logged once (a commit
    // whose acknowledgement the shutdown cut off may be logged too).
    assert!(logged.iter().all(|(_, p)| p["op"] == "insert"), "a reset after a clean restart: {logged:?}");
    let mut sent = ids(&logged);
    sent.sort();
    let once = sent.len();
    sent.dedup();
    assert_eq!(sent.len(), once, "a row logged twice");
    let missing: Vec<&i32> = committed.iter().filter(|id| sent.binary_search(id).is_err()).collect();
    assert!(missing.is_empty(), "committed but not logged: {missing:?}");
    let seqs: Vec<i64> = logged.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(seqs, (start + 1..=start + seqs.len() as i64).collect::<Vec<_>>());
}

/// The listener's payloads before a crash, then after it: the reset marker stands above every seq
/// sent before, and the log goes on unbroken through it.
#[test]
fn a_crash_restart_leaves_a_reset_marker_above_everything_sent_before() {
    let _serial = serial();
    let cluster = Cluster::new("crash");
    let mut db = cluster.connect();
    let start = setup(&mut db);
    let mut listener = cluster.connect();
    listener.batch_execute(&format!("LISTEN \"{CHANNEL}\"")).unwrap();
    let (stop, committed) = (AtomicBool::new(false), Mutex::new(Vec::new()));
    let mut seen: Vec<i64> = Vec::new();
    std::thread::scope(|scope| {
        scope.spawn(|| write_until(&cluster, &stop, &committed, 1));
        let mut notifications = listener.notifications();
        let mut iter = notifications.timeout_iter(Duration::from_millis(300));
        hear(&mut iter, &mut seen, 20);
        // Kill an ordinary backend: the postmaster restarts every process and resets shared memory.
        let pid: i32 = db.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
        Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
        // Whatever reached the listener before its connection went.
        hear(&mut iter, &mut seen, usize::MAX);
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
    });
    let mut db = cluster.connect();
    let logged = replay_all(&mut db, start);
    let markers: Vec<&(i64, serde_json::Value)> = logged.iter().filter(|(_, p)| p["op"] == "reset").collect();
    assert_eq!(markers.len(), 1, "{logged:?}");
    let (marker, payload) = markers[0];
    assert_eq!(payload["reason"], "restart");
    assert!(*marker > *seen.iter().max().unwrap(), "the marker {marker} is not above everything sent {seen:?}");
    // What was written after the restart follows the marker.
    assert!(logged.last().unwrap().0 >= *marker);
    assert!(position(&mut db) >= *marker);
    let stats: i64 = db.query_one("SELECT feed_resets FROM pgwatch.stats()", &[]).unwrap().get(0);
    assert!(stats >= 1);
}

/// A transaction prepared before a crash restart, whose changes this server run never captured,
/// has every watch of its database refetch when it commits, whichever session commits it.
#[test]
fn a_transaction_prepared_before_a_crash_restart_is_announced_when_it_commits() {
    let _serial = serial();
    let cluster = Cluster::new("prepared");
    let mut db = cluster.connect();
    db.batch_execute("CREATE EXTENSION pgwatch; CREATE TABLE prep (id int PRIMARY KEY); SELECT watch_table('prep')")
        .unwrap();
    db.batch_execute("BEGIN; INSERT INTO prep VALUES (1); PREPARE TRANSACTION 'before_crash'").unwrap();
    let mut bystander = cluster.connect();
    let pid: i32 = db.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    // The postmaster ends every backend (this one too) before it starts again.
    let deadline = Instant::now() + WAIT;
    while bystander.batch_execute("SELECT 1").is_ok() {
        assert!(Instant::now() < deadline, "the server did not restart");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut listener = cluster.connect();
    listener.batch_execute("LISTEN \"public.prep\"").unwrap();
    cluster.connect().batch_execute("COMMIT PREPARED 'before_crash'").unwrap();
    let mut notifications = listener.notifications();
    let heard = notifications.timeout_iter(WAIT).next().unwrap().expect("a notification after COMMIT PREPARED");
    let payload: serde_json::Value = serde_json::from_str(heard.payload()).unwrap();
    assert_eq!(payload["op"], "resync", "{payload}");
    assert_eq!(payload["tbl"], "public.prep", "{payload}");
}

#[test]
fn a_promoted_standby_goes_on_with_a_reset_marker_above_the_primarys_numbers() {
    let _serial = serial();
    let primary = Cluster::new("primary");
    let mut db = primary.connect();
    let start = setup(&mut db);
    let standby = Cluster::standby_of(&primary, "standby");
    let (stop, committed) = (AtomicBool::new(false), Mutex::new(Vec::new()));
    let mut listener = primary.connect();
    listener.batch_execute(&format!("LISTEN \"{CHANNEL}\"")).unwrap();
    let mut seen: Vec<i64> = Vec::new();
    std::thread::scope(|scope| {
        scope.spawn(|| write_until(&primary, &stop, &committed, 1));
        let mut notifications = listener.notifications();
        let mut iter = notifications.timeout_iter(Duration::from_millis(300));
        hear(&mut iter, &mut seen, 20);
        // The standby has what was sent so far (the worker commits asynchronously; the WAL
        // writer flushes it soon), however loaded the machine.
        let sent: String = primary.connect().query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).unwrap().get(0);
        let mut on_standby = standby.connect();
        let replayed = "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn";
        assert!(eventually(|| on_standby.query_one(replayed, &[&sent]).unwrap().get::<_, bool>(0)));
        standby.pg_ctl(&["promote"]);
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        hear(&mut iter, &mut seen, usize::MAX);
    });
    let mut promoted = standby.connect();
    promoted.batch_execute("INSERT INTO feed VALUES (1000000)").unwrap();
    let deadline = Instant::now() + WAIT;
    let logged = loop {
        let logged = replay_all(&mut promoted, start);
        if ids(&logged).contains(&1_000_000) || Instant::now() > deadline {
            break logged;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let marker = logged.iter().find(|(_, p)| p["op"] == "reset").expect("a reset marker after the promotion");
    assert_eq!(marker.1["reason"], "restart");
    assert!(marker.0 > *seen.iter().max().unwrap(), "the marker {} is not above what the primary sent", marker.0);
    // The primary's log came along, up to what was replicated.
    assert!(logged.iter().any(|(seq, _)| seen.contains(seq)));
}

/// Every delivery slot taken (64 databases): a database without one has its retained changes
/// notified inline and not logged. Replay refuses it until it has a slot; then its feed starts
/// with a reset marker; and the server's next shutdown is not clean, so every feed is reset.
#[test]
fn a_database_without_a_delivery_slot_gets_a_reset_marker_once_it_has_one() {
    let _serial = serial();
    let cluster = Cluster::new("slots");
    let mut admin = cluster.connect();
    admin.batch_execute("CREATE DATABASE feed_template").unwrap();
    let mut template = cluster.connect_to("feed_template");
    template
        .batch_execute(
            "CREATE EXTENSION pgwatch;
             CREATE TABLE feed (id int PRIMARY KEY);
             SELECT watch_table('feed', 'insert', retain => '1 hour')",
        )
        .unwrap();
    drop(template);
    // Reading a feed takes a slot for its database.
    for i in 0..65 {
        admin.batch_execute(&format!("CREATE DATABASE slot_{i} TEMPLATE feed_template")).unwrap();
    }
    let mut starts = Vec::new();
    for i in 0..64 {
        starts.push(position(&mut cluster.connect_to(&format!("slot_{i}"))));
    }
    let mut last = cluster.connect_to("slot_64");
    let no_slot = |db: &mut Client| {
        let error = db.query_one("SELECT pgwatch.position($1)", &[&CHANNEL]).unwrap_err();
        assert_eq!(error.code(), Some(&postgres::error::SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE), "{error}");
    };
    no_slot(&mut last);
    last.batch_execute("INSERT INTO feed VALUES (1)").unwrap();
    let unlogged: i64 = last.query_one("SELECT retained_unlogged FROM pgwatch.stats()", &[]).unwrap().get(0);
    assert_eq!(unlogged, 1);
    no_slot(&mut last);
    // A slot comes free: the feed goes on after a reset marker, without the unlogged row.
    admin.batch_execute("DROP DATABASE slot_0").unwrap();
    let start = starts[63];
    assert!(position(&mut last) > start);
    last.batch_execute("INSERT INTO feed VALUES (2)").unwrap();
    let logged = replay_until(&mut last, start, |logged| ids(logged).contains(&2));
    let ops: Vec<&str> = logged.iter().map(|(_, p)| p["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["reset", "insert"], "{logged:?}");
    assert_eq!(ids(&logged), [2]);
    // The run had unlogged changes: a clean restart resets every feed all the same.
    drop(last);
    cluster.pg_ctl(&["restart", "-m", "fast"]);
    let mut other = cluster.connect_to("slot_5");
    let logged = replay_until(&mut other, starts[5], |logged| !logged.is_empty());
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(logged[0].1["op"], "reset");
}

/// A database whose worker cannot start (no background worker slot left) has its queued changes
/// dropped once the oldest of them has waited half a minute at the shared queue's tail, where they
/// held up every database's delivery; they are counted, and its subscribers refetch once a worker
/// runs there.
#[test]
fn a_database_whose_worker_cannot_start_stops_holding_the_shared_queue() {
    let _serial = serial();
    let cluster = Cluster::new("unserved");
    let mut admin = cluster.connect();
    // One slot for pgwatch's launcher and one for a single delivery worker; nothing else takes one.
    for setting in ["max_worker_processes = 2", "max_logical_replication_workers = 0", "max_parallel_workers = 0"] {
        admin.batch_execute(&format!("ALTER SYSTEM SET {setting}")).unwrap();
    }
    cluster.pg_ctl(&["restart", "-m", "fast"]);
    let mut admin = cluster.connect();
    let mut watched = |name: &str| {
        admin.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        let mut db = cluster.connect_to(name);
        db.batch_execute(
            "CREATE EXTENSION pgwatch; CREATE TABLE t (id int PRIMARY KEY); SELECT watch_table('t', 'insert')",
        )
        .unwrap();
        let listener = Listener::new(cluster.connect_to(name), &["public.t"]);
        (db, listener)
    };
    let insert = |n: i32| format!(r#"{{"tbl":"public.t","op":"insert","rows":[{{"id":{n}}}]}}"#);
    // The first database's worker takes the one slot.
    let (mut served, mut served_listener) = watched("served");
    served_listener.expect_after(&mut served, "INSERT INTO t VALUES (1)", &[&insert(1)]);
    let (mut unserved, mut unserved_listener) = watched("unserved");
    let skipped =
        |db: &mut Client| -> i64 { db.query_one("SELECT skipped_records FROM pgwatch.stats()", &[]).unwrap().get(0) };
    let before = skipped(&mut unserved);
    unserved.batch_execute("INSERT INTO t VALUES (1)").unwrap();
    // Dropped after half a minute at the tail (polled for up to two minutes).
    let deadline = Instant::now() + WAIT * 2;
    while skipped(&mut unserved) == before {
        assert!(Instant::now() < deadline, "the unserved database's changes were not dropped");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(skipped(&mut unserved), before + 1);
    served_listener.expect_after(&mut served, "INSERT INTO t VALUES (2)", &[&insert(2)]);
    // The slot comes free: the unserved database's worker starts and has its subscribers refetch
    // (the dropped insert is never sent), then sends as usual.
    drop((served, served_listener));
    admin.batch_execute("DROP DATABASE served WITH (FORCE)").unwrap();
    unserved_listener.expect(&[r#"{"tbl":"public.t","op":"resync"}"#]);
    unserved_listener.expect_after(&mut unserved, "INSERT INTO t VALUES (2)", &[&insert(2)]);
}

/// A run without pgwatch preloaded notifies a retained watch's changes inline, unlogged: the next
/// run with it preloaded does not count as a clean start, and marks the gap.
#[test]
fn a_run_without_pgwatch_preloaded_is_marked_by_a_reset_when_it_is_back() {
    let _serial = serial();
    let cluster = Cluster::new("unloaded");
    let mut db = cluster.connect();
    let start = setup(&mut db);
    db.batch_execute("INSERT INTO feed VALUES (1)").unwrap();
    replay_until(&mut db, start, |logged| ids(logged).contains(&1));
    drop(db);
    cluster.pg_ctl(&["stop", "-m", "fast"]);
    cluster.pg_ctl(&["start", "-o", "-c shared_preload_libraries="]);
    let mut db = cluster.connect();
    db.batch_execute("INSERT INTO feed VALUES (2)").unwrap();
    drop(db);
    cluster.pg_ctl(&["stop", "-m", "fast"]);
    cluster.pg_ctl(&["start"]);
    let mut db = cluster.connect();
    db.batch_execute("INSERT INTO feed VALUES (3)").unwrap();
    let logged = replay_until(&mut db, start, |logged| ids(logged).contains(&3));
    let ops: Vec<&str> = logged.iter().map(|(_, p)| p["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["insert", "reset", "insert"], "{logged:?}");
    assert_eq!(ids(&logged), [1, 3]);
}
