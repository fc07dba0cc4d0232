//! Worker delivery with a tiny queue: its own server, since `pgwatch.queue_size` is set at start.
//! Transactions that find the queue full are notified inline; none is lost.

use std::time::Duration;

// Shared with the main suite, which uses all of it.
#[allow(dead_code)]
#[path = "support.rs"]
mod support;
use support::{connect, eventually, serial, stat, watched, Listener, Replica, WAIT};

const CONF: &[&str] = &["shared_preload_libraries = 'pgwatch'", "pgwatch.queue_size = '64kB'"];

#[path = "differential.rs"]
mod differential;

/// Transactions that find the queue full are notified inline, and may overtake older queued ones:
/// subscribers are told to refetch, and still end with an exact copy.
#[test]
fn random_transactions_with_a_small_queue_leave_every_copy_equal_to_its_table() {
    let _serial = serial();
    differential::run(&[11, 12, 13], 60, "worker");
}

/// `writers` connections, each running `each` transactions: `sql(writer, i)`.
fn write_concurrently(writers: i64, each: i64, sql: impl Fn(i64, i64) -> String + Sync) {
    std::thread::scope(|scope| {
        for t in 0..writers {
            let sql = &sql;
            scope.spawn(move || {
                let mut db = connect();
                for i in 0..each {
                    db.batch_execute(&sql(t, i)).unwrap();
                }
            });
        }
    });
}

/// Receives until rows 1..=`total` have each arrived once (and nothing more arrives).
fn receive_every_row(listener: &mut Listener, total: i64) {
    let mut replica = Replica::default();
    while (replica.rows.len() as i64) < total {
        let Some((_, payload)) = listener.receive(1, WAIT).pop() else {
            panic!("stalled at {} of {total} rows", replica.rows.len());
        };
        replica.apply(&payload);
    }
    // Transactions notified inline may have overtaken queued ones: a resync notice follows once
    // the queued ones are sent, which may be after the last row arrived. Nothing else may.
    loop {
        let extra = listener.receive(1, Duration::from_secs(2));
        let Some((_, payload)) = extra.first() else { break };
        assert!(payload.contains(r#""op":"resync""#), "unexpected notification: {payload}");
    }
    assert!((1..=total).all(|id| replica.rows.contains_key(&id)));
}

#[test]
fn a_full_queue_falls_back_to_inline_and_loses_nothing() {
    let _serial = serial();
    let (mut admin, mut listener) = watched(
        "worker",
        "CREATE TABLE small (id bigint PRIMARY KEY, body text); SELECT watch_table('small', 'insert', '{body}')",
        &["public.small"],
    );
    let (fallbacks, batches) = (stat(&mut admin, "inline_fallbacks"), stat(&mut admin, "batches"));
    // 8 writers × 50 transactions of 20 rows of 1 kB: a record is about 21 kB, three fill the queue.
    write_concurrently(8, 50, |t, i| {
        let first = (t * 50 + i) * 20;
        format!("INSERT INTO small SELECT g, repeat('x', 1000) FROM generate_series({}, {}) g", first + 1, first + 20)
    });
    receive_every_row(&mut listener, 8000);
    assert!(stat(&mut admin, "inline_fallbacks") > fallbacks, "the queue never filled");
    // The worker counts a batch just after its commit, which the listener may hear of first.
    assert!(eventually(|| stat(&mut admin, "batches") > batches), "the worker never delivered");
    assert!(stat(&mut admin, "queue_high_water") <= 64 * 1024);
}

#[test]
fn many_writers_lapping_a_small_queue_deliver_every_row_once() {
    let _serial = serial();
    let (mut admin, mut listener) = watched(
        "worker",
        "CREATE TABLE laps (id bigint PRIMARY KEY, note text); SELECT watch_table('laps', 'insert', '{note}')",
        &["public.laps"],
    );
    let (fallbacks, batches) = (stat(&mut admin, "inline_fallbacks"), stat(&mut admin, "batches"));
    // 16 writers × 400 one-row transactions: records of 100 to 200 bytes (notes of 0 to 100
    // bytes, so the ring's end is skipped with padding) claim ring space at once from many
    // backends and go round the 64 kB ring about fifteen times.
    write_concurrently(16, 400, |t, i| {
        let id = t * 400 + i + 1;
        format!("INSERT INTO laps VALUES ({id}, repeat('x', {id} % 101))")
    });
    receive_every_row(&mut listener, 6400);
    assert!(eventually(|| stat(&mut admin, "batches") > batches), "the worker never delivered");
    // A ring that stopped moving would send nearly all of them inline. How many go through the
    // ring depends on how the worker is scheduled beside the writers, so this asks only that the
    // ring went round: more than 1,000 records of 100 to 200 bytes are about two laps.
    let inline = stat(&mut admin, "inline_fallbacks") - fallbacks;
    assert!(inline < 6400 - 1000, "{inline} of 6400 transactions fell back to inline");
}

/// A retained watch's transactions that find the queue full are notified inline, outside its
/// log: a reset marker takes their place there, in sequence, so replay never skips them silently.
#[test]
fn a_full_queue_leaves_a_reset_marker_in_a_retained_channels_log() {
    let _serial = serial();
    let (mut admin, mut listener) = watched(
        "worker",
        "CREATE TABLE kept (id bigint PRIMARY KEY, body text);
         SELECT watch_table('kept', 'insert', '{body}', retain => '1 hour')",
        &["public.kept"],
    );
    let channel = "public.kept";
    let start: i64 = admin.query_one("SELECT pgwatch.position($1)", &[&channel]).unwrap().get(0);
    let fallbacks = stat(&mut admin, "inline_fallbacks");
    write_concurrently(8, 50, |t, i| {
        let first = (t * 50 + i) * 20;
        format!("INSERT INTO kept SELECT g, repeat('x', 1000) FROM generate_series({}, {}) g", first + 1, first + 20)
    });
    assert!(stat(&mut admin, "inline_fallbacks") > fallbacks, "the queue never filled");
    // Every payload notified with a seq is in the log, in order, with the markers among them.
    let mut notified: Vec<(i64, String)> = Vec::new();
    let mut markers = 0;
    while let Some((_, payload)) = listener.receive_raw(1, Duration::from_secs(3)).pop() {
        let v: serde_json::Value = serde_json::from_str(&payload).unwrap();
        if let Some(seq) = v["seq"].as_i64() {
            markers += usize::from(v["op"] == "reset" && v["reason"] == "fallback");
            notified.push((seq, payload));
        }
    }
    assert!(markers > 0, "no reset marker took the place of the inline notifications");
    let mut replayed: Vec<(i64, String)> = Vec::new();
    let mut after = start;
    loop {
        let rows = admin.query("SELECT seq, payload FROM pgwatch.replay($1, $2, 500)", &[&channel, &after]).unwrap();
        let Some(last) = rows.last() else { break };
        after = last.get(0);
        replayed.extend(rows.iter().map(|row| (row.get::<_, i64>(0), row.get::<_, String>(1))));
    }
    assert_eq!(replayed, notified);
    // pgwatch.channels shows the last of them.
    let reason: Option<String> = admin
        .query_one(
            "SELECT reset_reason FROM pgwatch.channels WHERE channel = $1 AND last_reset IS NOT NULL",
            &[&channel],
        )
        .unwrap()
        .get(0);
    assert_eq!(reason.as_deref(), Some("fallback"));
    admin.batch_execute("DROP TABLE kept").unwrap();
}
