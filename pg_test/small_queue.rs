//! Worker delivery with a tiny queue: its own server, since `pgwatch.queue_size` is set at start.
//! Transactions that find the queue full are notified inline; none is lost.

use std::time::Duration;

// Shared with the main suite, which uses all of it.
#[allow(dead_code)]
#[path = "support.rs"]
mod support;
use support::{connect, serial, stat, watched, Replica};

const CONF: &[&str] = &["shared_preload_libraries = 'pgwatch'", "pgwatch.queue_size = '64kB'"];

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
    std::thread::scope(|scope| {
        for t in 0..8 {
            scope.spawn(move || {
                let mut db = connect();
                for i in 0..50 {
                    let first = (t * 50 + i) * 20;
                    db.batch_execute(&format!(
                        "INSERT INTO small SELECT g, repeat('x', 1000) FROM generate_series({}, {}) g",
                        first + 1,
                        first + 20
                    ))
                    .unwrap();
                }
            });
        }
    });
    let mut replica = Replica::default();
    while replica.rows.len() < 8000 {
        let got = listener.receive(1000, Duration::from_secs(10));
        assert!(!got.is_empty(), "stalled at {} of 8000 rows", replica.rows.len());
        got.iter().for_each(|(_, payload)| replica.apply(payload));
    }
    listener.expect_silence();
    assert!((1..=8000).all(|id| replica.rows.contains_key(&id)));
    assert!(stat(&mut admin, "inline_fallbacks") > fallbacks, "the queue never filled");
    assert!(stat(&mut admin, "batches") > batches, "the worker never delivered");
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
    // 16 writers × 400 one-row transactions: records of 100 to 200 bytes claim ring space at once
    // from many backends and go round the 64 kB ring about fifteen times.
    const WRITERS: i64 = 16;
    const EACH: i64 = 400;
    std::thread::scope(|scope| {
        for t in 0..WRITERS {
            scope.spawn(move || {
                let mut db = connect();
                for i in 0..EACH {
                    let id = t * EACH + i + 1;
                    // Notes of 0 to 100 bytes: records of several sizes, so the ring's end is
                    // skipped with padding.
                    db.batch_execute(&format!("INSERT INTO laps VALUES ({id}, repeat('x', {id} % 101))")).unwrap();
                }
            });
        }
    });
    let mut replica = Replica::default();
    let total = (WRITERS * EACH) as usize;
    while replica.rows.len() < total {
        let got = listener.receive(1000, Duration::from_secs(10));
        assert!(!got.is_empty(), "stalled at {} of {total} rows", replica.rows.len());
        got.iter().for_each(|(_, payload)| replica.apply(payload));
    }
    listener.expect_silence();
    assert!((1..=total as i64).all(|id| replica.rows.contains_key(&id)));
    assert!(stat(&mut admin, "batches") > batches, "the worker never delivered");
    // The worker keeps up with these writers: a ring that stopped moving would send them inline.
    let inline = stat(&mut admin, "inline_fallbacks") - fallbacks;
    assert!(inline < total as i64 / 2, "{inline} of {total} transactions fell back to inline");
}
