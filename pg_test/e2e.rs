//! End-to-end tests: a real server, real autocommit client connections that LISTEN, and exact
//! payloads. Payload scenarios run in both delivery modes; tests run one at a time (see `serial`).

use std::collections::{BTreeSet, HashMap};

use postgres::Client;

#[path = "support.rs"]
mod support;
use support::{
    connect, connect_to, database, eventually, failure, owned_database, replayed, seq_of, serial, stat, watched,
    Listener, Replica, MODES, WAIT,
};

// Logical replication (wal_level) serves the fire_on_replica test.
pub const CONF: &[&str] = &[
    "shared_preload_libraries = 'pgwatch'",
    "max_worker_processes = 16",
    "wal_level = logical",
    "max_prepared_transactions = 10",
];

#[path = "options.rs"]
mod options;

#[path = "ddl.rs"]
mod ddl;

#[path = "upgrade.rs"]
mod upgrade;

#[path = "trust.rs"]
mod trust;

#[path = "differential.rs"]
mod differential;

#[path = "replay.rs"]
mod replay;

#[test]
fn random_transactions_leave_every_subscriber_copy_equal_to_its_table() {
    let _serial = serial();
    for mode in MODES {
        differential::run(&[1, 2, 3], 60, mode);
    }
}

#[test]
fn insert_update_delete_send_exact_payloads() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE e2e_basic (id int PRIMARY KEY, role_id int, name text);
                 SELECT watch_table('e2e_basic', '*', '{role_id}')",
            &["public.e2e_basic"],
        );
        writer.batch_execute("INSERT INTO e2e_basic VALUES (1, 7, 'ann'), (2, 7, 'bob')").unwrap();
        listener.expect(&[
            r#"{"tbl":"public.e2e_basic","op":"insert","rows":[{"id":1,"role_id":7},{"id":2,"role_id":7}]}"#,
        ]);
        writer.batch_execute("UPDATE e2e_basic SET role_id = 8 WHERE id = 1").unwrap();
        listener
            .expect(&[r#"{"tbl":"public.e2e_basic","op":"update","rows":[{"id":1,"role_id":8,"old":{"role_id":7}}]}"#]);
        writer.batch_execute("UPDATE e2e_basic SET name = 'bea' WHERE id = 2").unwrap();
        listener.expect(&[r#"{"tbl":"public.e2e_basic","op":"update","rows":[{"id":2,"role_id":7}]}"#]);
        writer.batch_execute("DELETE FROM e2e_basic WHERE id = 1").unwrap();
        listener.expect(&[r#"{"tbl":"public.e2e_basic","op":"delete","rows":[{"id":1,"role_id":8}]}"#]);
    }
}

#[test]
fn only_watched_events_are_sent() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE e2e_events (id int PRIMARY KEY, n int); SELECT watch_table('e2e_events', 'update')",
            &["public.e2e_events"],
        );
        writer
            .batch_execute(
                "INSERT INTO e2e_events VALUES (1, 0), (2, 0); UPDATE e2e_events SET n = 1 WHERE id = 2;
                 DELETE FROM e2e_events WHERE id = 1",
            )
            .unwrap();
        listener.expect(&[r#"{"tbl":"public.e2e_events","op":"update","rows":[{"id":2}]}"#]);
    }
}

#[test]
fn composite_keys_and_key_changes() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE e2e_members (org_id int, user_id int, role text, PRIMARY KEY (user_id, org_id));
                 SELECT watch_table('e2e_members', '*', '{role}')",
            &["public.e2e_members"],
        );
        // One transaction at a time: a worker that drains them together folds them to their net
        // effect (the update and the delete to one delete).
        listener.expect_after(
            &mut writer,
            "INSERT INTO e2e_members VALUES (10, 1, 'admin')",
            &[r#"{"tbl":"public.e2e_members","op":"insert","rows":[{"user_id":1,"org_id":10,"role":"admin"}]}"#],
        );
        listener.expect_after(
            &mut writer,
            "UPDATE e2e_members SET org_id = 11 WHERE user_id = 1",
            // A key change is the delete of the old key and the insert of the new one.
            &[
                r#"{"tbl":"public.e2e_members","op":"delete","rows":[{"user_id":1,"org_id":10,"role":"admin"}]}"#,
                r#"{"tbl":"public.e2e_members","op":"insert","rows":[{"user_id":1,"org_id":11,"role":"admin"}]}"#,
            ],
        );
        listener.expect_after(
            &mut writer,
            "DELETE FROM e2e_members",
            &[r#"{"tbl":"public.e2e_members","op":"delete","rows":[{"user_id":1,"org_id":11,"role":"admin"}]}"#],
        );
    }
}

#[test]
fn values_are_typed_json() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "SET TimeZone = 'UTC';
                 CREATE TYPE e2e_mood AS ENUM ('happy', 'sad');
                 CREATE TABLE e2e_types (id bigint PRIMARY KEY, small smallint, price numeric, ratio float8, ok boolean,
                     label text, code char(3), at timestamptz, mood e2e_mood, doc jsonb, missing int, nan float8);
                 SELECT watch_table('e2e_types', 'insert',
                     '{small,price,ratio,ok,label,code,at,mood,doc,missing,nan}')",
            &["public.e2e_types"],
        );
        writer
            .batch_execute(
                r#"INSERT INTO e2e_types VALUES (-9000000000, -3, 1.50, 2.5e-7, true, E'say "hi"\n\\', 'ab',
                      '2024-01-02 03:04:05+00', 'sad', '{"a": [1]}', NULL, 'NaN')"#,
            )
            .unwrap();
        listener.expect(&[concat!(
            r#"{"tbl":"public.e2e_types","op":"insert","rows":[{"id":-9000000000,"small":-3,"price":1.50,"#,
            r#""ratio":2.5e-07,"ok":true,"label":"say \"hi\"\n\\","code":"ab ","at":"2024-01-02 03:04:05+00","#,
            r#""mood":"sad","doc":"{\"a\": [1]}","missing":null,"nan":"NaN"}]}"#
        )]);
    }
}

#[test]
fn a_transaction_folds_to_net_changes_deletes_first() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE e2e_fold (id int PRIMARY KEY, role_id int);
                 INSERT INTO e2e_fold VALUES (2, 1), (4, 1), (5, 1);
                 SELECT watch_table('e2e_fold', '*', '{role_id}')",
            &["public.e2e_fold"],
        );
        writer
            .batch_execute(
                "BEGIN;
                 INSERT INTO e2e_fold VALUES (1, 1);
                 UPDATE e2e_fold SET role_id = 2 WHERE id = 1;
                 UPDATE e2e_fold SET role_id = 2 WHERE id = 2;
                 UPDATE e2e_fold SET role_id = 3 WHERE id = 2;
                 INSERT INTO e2e_fold VALUES (3, 1);
                 DELETE FROM e2e_fold WHERE id = 3;
                 UPDATE e2e_fold SET role_id = 9 WHERE id = 4;
                 DELETE FROM e2e_fold WHERE id = 4;
                 UPDATE e2e_fold SET role_id = 7 WHERE id = 5;
                 UPDATE e2e_fold SET role_id = 1 WHERE id = 5;
                 COMMIT",
            )
            .unwrap();
        listener.expect(
            &[
                r#"{"tbl":"public.e2e_fold","op":"delete","rows":[{"id":4,"role_id":1}]}"#,
                r#"{"tbl":"public.e2e_fold","op":"update","rows":[{"id":2,"role_id":3,"old":{"role_id":1}},{"id":5,"role_id":1}]}"#,
                r#"{"tbl":"public.e2e_fold","op":"insert","rows":[{"id":1,"role_id":2}]}"#,
            ],
        );
    }
}

#[test]
fn rolled_back_transactions_send_nothing() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE e2e_rollback (id int PRIMARY KEY); SELECT watch_table('e2e_rollback')",
            &["public.e2e_rollback"],
        );
        writer.batch_execute("BEGIN; INSERT INTO e2e_rollback VALUES (1); ROLLBACK").unwrap();
        assert!(writer.batch_execute("BEGIN; INSERT INTO e2e_rollback VALUES (2); SELECT 1/0; COMMIT").is_err());
        writer.batch_execute("ROLLBACK; INSERT INTO e2e_rollback VALUES (3)").unwrap();
        listener.expect(&[r#"{"tbl":"public.e2e_rollback","op":"insert","rows":[{"id":3}]}"#]);
    }
}

#[test]
fn rollback_to_savepoint_drops_that_part() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE e2e_savepoint (id int PRIMARY KEY, v int); INSERT INTO e2e_savepoint VALUES (0, 0);
                 SELECT watch_table('e2e_savepoint', '*', '{v}')",
            &["public.e2e_savepoint"],
        );
        writer
            .batch_execute(
                "BEGIN;
                 INSERT INTO e2e_savepoint VALUES (1, 1);
                 SAVEPOINT a;
                 INSERT INTO e2e_savepoint VALUES (2, 2);
                 UPDATE e2e_savepoint SET v = 10 WHERE id = 1;
                 SAVEPOINT b;
                 DELETE FROM e2e_savepoint WHERE id = 0;
                 RELEASE b;
                 ROLLBACK TO a;
                 SAVEPOINT c;
                 INSERT INTO e2e_savepoint VALUES (3, 3);
                 RELEASE c;
                 UPDATE e2e_savepoint SET v = 5 WHERE id = 0;
                 COMMIT",
            )
            .unwrap();
        listener.expect(&[
            r#"{"tbl":"public.e2e_savepoint","op":"update","rows":[{"id":0,"v":5,"old":{"v":0}}]}"#,
            r#"{"tbl":"public.e2e_savepoint","op":"insert","rows":[{"id":1,"v":1},{"id":3,"v":3}]}"#,
        ]);
        // PL/pgSQL exception blocks are subtransactions too.
        writer
            .batch_execute(
                "DO $$ BEGIN
                     BEGIN INSERT INTO e2e_savepoint VALUES (4, 4); RAISE EXCEPTION 'undo'; EXCEPTION WHEN others THEN END;
                     INSERT INTO e2e_savepoint VALUES (5, 5);
                 END $$",
            )
            .unwrap();
        listener.expect(&[r#"{"tbl":"public.e2e_savepoint","op":"insert","rows":[{"id":5,"v":5}]}"#]);
    }
}

#[test]
fn oversized_rows_are_sent_partial_or_as_overflow() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE e2e_big (id text PRIMARY KEY, body text);
                 SELECT watch_table('e2e_big', '*', '{body}')",
            &["public.e2e_big"],
        );
        let (partial, overflows) = (stat(&mut writer, "partial_rows"), stat(&mut writer, "overflows"));
        writer
            .batch_execute(
                "INSERT INTO e2e_big VALUES ('small', repeat('x', 9000)), ('fine', 'ok'), (repeat('k', 8100), 'x')",
            )
            .unwrap();
        listener.expect(
            &[
                r#"{"tbl":"public.e2e_big","op":"insert","rows":[{"id":"small","partial":true},{"id":"fine","body":"ok"}]}"#,
                r#"{"tbl":"public.e2e_big","op":"insert","overflow":true}"#,
            ],
        );
        assert_eq!(stat(&mut writer, "partial_rows"), partial + 1);
        assert_eq!(stat(&mut writer, "overflows"), overflows + 1);
        // The old value is dropped, not the write, when an update's row outgrows the payload.
        // One update at a time: a worker that drains both together folds them into one update
        // (from "ok" to the z's), which fits.
        writer.batch_execute("UPDATE e2e_big SET body = repeat('y', 4000) WHERE id = 'fine'").unwrap();
        let got = listener.receive(1, WAIT);
        listener.expect_silence();
        assert_eq!(got.len(), 1);
        assert!(got[0].1.ends_with(r#""old":{"body":"ok"}}]}"#), "{}", got[0].1);
        listener.expect_after(
            &mut writer,
            "UPDATE e2e_big SET body = repeat('z', 4000) WHERE id = 'fine'",
            &[r#"{"tbl":"public.e2e_big","op":"update","rows":[{"id":"fine","partial":true}]}"#],
        );
        // A key too big comes first: the statement's later rows are still listed.
        writer.batch_execute("INSERT INTO e2e_big VALUES (repeat('j', 8100), 'x'), ('after', 'ok')").unwrap();
        listener.expect(&[
            r#"{"tbl":"public.e2e_big","op":"insert","rows":[{"id":"after","body":"ok"}]}"#,
            r#"{"tbl":"public.e2e_big","op":"insert","overflow":true}"#,
        ]);
    }
}

#[test]
fn a_10000_row_statement_delivers_every_key_once_in_full_payloads() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE e2e_bulk (id int PRIMARY KEY, role_id int);
                 SELECT watch_table('e2e_bulk', 'insert', '{role_id}')",
            &["public.e2e_bulk"],
        );
        let sent_before = stat(&mut writer, "notifications");
        writer.batch_execute("INSERT INTO e2e_bulk SELECT g, g % 7 FROM generate_series(1, 10000) g").unwrap();
        let (rows, sizes) = listener.receive_rows(10000);
        let ids: Vec<i64> = rows.iter().map(|row| row["id"].as_i64().unwrap()).collect();
        assert!(rows.iter().all(|row| row["role_id"].as_i64().unwrap() == row["id"].as_i64().unwrap() % 7));
        listener.expect_silence();
        assert_eq!(stat(&mut writer, "notifications") - sent_before, sizes.len() as i64);
        let (last, full) = sizes.split_last().unwrap();
        assert!(*last < 8000);
        assert!(full.iter().all(|&len| len > 7900 && len < 8000), "{mode}: payloads not full: {sizes:?}");
        assert_eq!(ids, (1..=10000).collect::<Vec<_>>(), "every key once, in change order");
    }
}

/// The rows that arrive on each of `channels`, until `rows` have arrived on each; then silence.
fn rows_by_channel(listener: &mut Listener, channels: &[&str], rows: usize) -> Vec<Vec<(String, serde_json::Value)>> {
    let mut got = vec![Vec::new(); channels.len()];
    while got.iter().any(|r| r.len() < rows) {
        let Some((channel, payload)) = listener.receive(1, WAIT).pop() else {
            panic!("only {:?} of {rows} rows arrived", got.iter().map(Vec::len).collect::<Vec<_>>());
        };
        let v: serde_json::Value = serde_json::from_str(&payload).unwrap();
        let i = channels.iter().position(|c| *c == channel).unwrap();
        let op = v["op"].as_str().unwrap().to_string();
        got[i].extend(v["rows"].as_array().unwrap().iter().map(|row| (op.clone(), row.clone())));
    }
    listener.expect_silence();
    got
}

#[test]
fn transition_tables_are_read_whole_when_shared_and_when_spilled_to_disk() {
    let _serial = serial();
    let channels = ["public.e2e_tt", "e2e_tt_again"];
    for mode in MODES {
        // Two watches and a trigger of the user's own share each statement's transition tables
        // (the user's fires after pgwatch's, by name, so pgwatch keeps its statement triggers).
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE e2e_tt (id int PRIMARY KEY, role_id int);
             CREATE TABLE e2e_tt_seen (op text, rows bigint);
             CREATE OR REPLACE FUNCTION e2e_tt_count() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN INSERT INTO e2e_tt_seen SELECT TG_OP, count(*) FROM changed; RETURN NULL; END $$;
             CREATE TRIGGER zz_e2e_tt_count AFTER INSERT ON e2e_tt REFERENCING NEW TABLE AS changed
               FOR EACH STATEMENT EXECUTE FUNCTION e2e_tt_count();
             SELECT watch_table('e2e_tt', '*', '{role_id}');
             SELECT watch_table('e2e_tt', '*', '{role_id}', label => 'e2e_tt_again')",
            &channels,
        );
        let row_triggers: i64 = writer
            .query_one(
                "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'e2e_tt'::regclass
                    AND tgfoid = 'pgwatch.capture'::regproc AND (tgtype & 1) = 1",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(row_triggers, 0, "statement triggers read the transition tables");
        // At work_mem's minimum, 3000 rows spill the transition tables to a temporary file.
        writer.batch_execute("SET work_mem = '64kB'").unwrap();
        writer.batch_execute("INSERT INTO e2e_tt SELECT g, g % 7 FROM generate_series(1, 3000) g").unwrap();
        for rows in rows_by_channel(&mut listener, &channels, 3000) {
            let ids: Vec<i64> = rows.iter().map(|(_, row)| row["id"].as_i64().unwrap()).collect();
            assert_eq!(ids, (1..=3000).collect::<Vec<_>>(), "{mode}: every key once, in change order");
            assert!(
                rows.iter()
                    .all(|(op, row)| op == "insert"
                        && row["role_id"].as_i64().unwrap() == row["id"].as_i64().unwrap() % 7)
            );
        }
        let seen: i64 = writer.query_one("SELECT sum(rows)::int8 FROM e2e_tt_seen", &[]).unwrap().get(0);
        assert_eq!(seen, 3000, "{mode}: the user's trigger reads the whole table too");
        // An update's old and new rows pair up, also from a spilled store: each moved key is the
        // delete of the old one (deletes first) and the insert of the new one.
        writer.batch_execute("UPDATE e2e_tt SET role_id = role_id + 10, id = id + 5000 WHERE id <= 2500").unwrap();
        for rows in rows_by_channel(&mut listener, &channels, 5000) {
            for (i, (op, row)) in rows.iter().enumerate() {
                let old = i as i64 % 2500 + 1;
                let expected = match i < 2500 {
                    true => ("delete", serde_json::json!({"id": old, "role_id": old % 7})),
                    false => ("insert", serde_json::json!({"id": old + 5000, "role_id": old % 7 + 10})),
                };
                assert_eq!((op.as_str(), row), (expected.0, &expected.1), "{mode}");
            }
        }
        writer.batch_execute("RESET work_mem; DELETE FROM e2e_tt WHERE id IN (2600, 7500)").unwrap();
        listener.expect_on(&[
            (
                "public.e2e_tt",
                r#"{"tbl":"public.e2e_tt","op":"delete","rows":[{"id":2600,"role_id":3},{"id":7500,"role_id":11}]}"#,
            ),
            (
                "e2e_tt_again",
                r#"{"tbl":"public.e2e_tt","op":"delete","rows":[{"id":2600,"role_id":3},{"id":7500,"role_id":11}]}"#,
            ),
        ]);
        writer.batch_execute("UPDATE e2e_tt SET role_id = 0 WHERE id < 0").unwrap();
        listener.expect_silence();
    }
}

#[test]
fn past_the_row_limit_subscribers_are_told_to_refetch() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE e2e_limit (id int PRIMARY KEY); SELECT watch_table('e2e_limit', 'insert')",
            &["public.e2e_limit"],
        );
        writer
            .batch_execute(
                "SET pgwatch.max_rows_per_xact = 1000; INSERT INTO e2e_limit SELECT generate_series(1, 5000)",
            )
            .unwrap();
        let mut ids = BTreeSet::new();
        loop {
            let Some((_, payload)) = listener.receive(1, WAIT).pop() else {
                panic!("{mode}: no overflow notice after {} rows", ids.len());
            };
            if payload == r#"{"tbl":"public.e2e_limit","op":"insert","overflow":true}"# {
                break;
            }
            let v: serde_json::Value = serde_json::from_str(&payload).unwrap();
            ids.extend(v["rows"].as_array().unwrap().iter().map(|row| row["id"].as_i64().unwrap()));
        }
        listener.expect_silence();
        assert_eq!(ids, (1..=1000).collect());
    }
}

#[test]
fn unwatch_stops_only_that_watch() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE e2e_unwatch (id int PRIMARY KEY);
                 SELECT watch_table('e2e_unwatch', 'insert', label => 'e2e_unwatch_a');
                 SELECT watch_table('e2e_unwatch', 'insert', label => 'e2e_unwatch_b')",
            &["e2e_unwatch_a", "e2e_unwatch_b"],
        );
        writer.batch_execute("INSERT INTO e2e_unwatch VALUES (1)").unwrap();
        let mut got = listener.receive(2, WAIT);
        got.sort();
        let payload = r#"{"tbl":"public.e2e_unwatch","op":"insert","rows":[{"id":1}]}"#;
        assert_eq!(got, [("e2e_unwatch_a".into(), payload.into()), ("e2e_unwatch_b".into(), payload.into())]);
        let removed: i32 =
            writer.query_one("SELECT unwatch_table('e2e_unwatch', 'e2e_unwatch_a')", &[]).unwrap().get(0);
        assert_eq!(removed, 1);
        writer.batch_execute("INSERT INTO e2e_unwatch VALUES (2)").unwrap();
        let got = listener.receive(1, WAIT);
        assert_eq!(
            got,
            [("e2e_unwatch_b".into(), r#"{"tbl":"public.e2e_unwatch","op":"insert","rows":[{"id":2}]}"#.into())]
        );
        listener.expect_silence();
    }
}

#[test]
fn drop_table_removes_the_watch_and_others_keep_working() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE e2e_dropped (id int PRIMARY KEY); CREATE TABLE e2e_kept (id int PRIMARY KEY);
                 SELECT watch_table('e2e_dropped'); SELECT watch_table('e2e_kept')",
            &["public.e2e_dropped", "public.e2e_kept"],
        );
        writer.batch_execute("DROP TABLE e2e_dropped").unwrap();
        let left: i64 = writer
            .query_one(
                "SELECT count(*) FROM pgwatch.watches WHERE channel IN ('public.e2e_dropped', 'public.e2e_kept')",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(left, 1);
        writer
            .batch_execute("CREATE TABLE e2e_dropped (id int PRIMARY KEY); INSERT INTO e2e_dropped VALUES (1)")
            .unwrap();
        writer.batch_execute("INSERT INTO e2e_kept VALUES (1)").unwrap();
        listener.expect(&[r#"{"tbl":"public.e2e_kept","op":"insert","rows":[{"id":1}]}"#]);
    }
}

#[test]
fn replica_role_sends_nothing() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE e2e_replica (id int PRIMARY KEY); SELECT watch_table('e2e_replica')",
            &["public.e2e_replica"],
        );
        writer
            .batch_execute(
                "SET session_replication_role = replica; INSERT INTO e2e_replica VALUES (1);
                 RESET session_replication_role; INSERT INTO e2e_replica VALUES (2)",
            )
            .unwrap();
        listener.expect(&[r#"{"tbl":"public.e2e_replica","op":"insert","rows":[{"id":2}]}"#]);
    }
}

#[test]
fn partition_rows_arrive_under_the_parent_name() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE e2e_parts (id int PRIMARY KEY) PARTITION BY RANGE (id);
                 CREATE TABLE e2e_parts_low PARTITION OF e2e_parts FOR VALUES FROM (0) TO (100);
                 SELECT watch_table('e2e_parts');
                 CREATE TABLE e2e_parts_high PARTITION OF e2e_parts FOR VALUES FROM (100) TO (200)",
            &["public.e2e_parts"],
        );
        writer.batch_execute("INSERT INTO e2e_parts VALUES (1), (150)").unwrap();
        listener.expect(&[r#"{"tbl":"public.e2e_parts","op":"insert","rows":[{"id":1},{"id":150}]}"#]);
    }
}

#[test]
fn bad_input_fails_with_its_sqlstate_and_changes_nothing() {
    let _serial = serial();
    let mut client = connect();
    client
        .batch_execute(
            "CREATE TABLE e2e_bad (id int PRIMARY KEY, role_id int); CREATE TABLE e2e_bad_nokey (id int);
             CREATE TABLE e2e_bad_deferred (id int PRIMARY KEY DEFERRABLE INITIALLY IMMEDIATE);
             CREATE TEMP TABLE e2e_bad_temp (id int PRIMARY KEY);
             CREATE VIEW e2e_bad_view AS SELECT * FROM e2e_bad; CREATE SEQUENCE e2e_bad_seq;
             CREATE ROLE e2e_bad_role; GRANT SELECT ON e2e_bad TO e2e_bad_role;
             SELECT watch_table('e2e_bad', 'insert');
             DO $$ BEGIN
               EXECUTE 'CREATE TABLE e2e_bad_wide (id int PRIMARY KEY, '
                       || (SELECT string_agg(repeat('c', 58) || lpad(g::text, 4, '0') || ' int', ', ')
                             FROM generate_series(1, 64) g) || ')';
             END $$",
        )
        .unwrap();
    let catalog = |client: &mut Client| -> String {
        client
            .query_one(
                "SELECT (SELECT string_agg(w::text, ';' ORDER BY id) FROM pgwatch.watches w)
                     || (SELECT string_agg(tgname || tgtype, ';' ORDER BY tgname) FROM pg_trigger
                          WHERE tgfoid = 'pgwatch.capture'::regproc)",
                &[],
            )
            .unwrap()
            .get(0)
    };
    let before = catalog(&mut client);
    for (sql, code) in [
        ("SELECT watch_table('e2e_bad_view')", "42809"),
        ("SELECT watch_table('e2e_bad_seq')", "42809"),
        ("SELECT watch_table('e2e_bad_pkey')", "42809"),
        ("SELECT watch_table('e2e_bad_nokey')", "55000"),
        ("SELECT watch_table('e2e_bad_deferred')", "55000"),
        ("SELECT watch_table('e2e_bad_temp')", "0A000"),
        ("SELECT watch_table('e2e_missing')", "42P01"),
        ("SELECT watch_table(0::regclass)", "42P01"),
        ("SELECT unwatch_table(0::regclass)", "42P01"),
        ("SELECT watch_table(2147483647::oid::regclass)", "42P01"),
        ("SELECT watch_table('e2e_bad', 'update', '{nope}')", "42703"),
        ("SELECT watch_table('e2e_bad', 'update', '{role_id,role_id}')", "42701"),
        ("SELECT watch_table('e2e_bad', 'update', '{id}')", "42701"),
        ("SELECT watch_table('e2e_bad', 'update', ARRAY[NULL])", "22004"),
        ("SELECT watch_table('e2e_bad', 'upsert')", "22023"),
        ("SELECT watch_table('e2e_bad', NULL)", "22004"),
        ("SELECT watch_table('e2e_bad', label => repeat('l', 64))", "42622"),
        ("SELECT watch_table('e2e_bad', label => '')", "22023"),
        ("SELECT watch_table('e2e_bad', 'update', array(SELECT 'c' || g FROM generate_series(1, 65) g))", "54011"),
        ("SELECT watch_table('e2e_bad', trigger_columns => '{nope}')", "42703"),
        ("SELECT watch_table('e2e_bad', trigger_columns => '{role_id,role_id}')", "42701"),
        ("SELECT watch_table('e2e_bad', 'insert', trigger_columns => '{role_id}')", "22023"),
        ("SELECT watch_table('e2e_bad', condition => 'NEW.role_id =')", "42601"),
        ("SELECT watch_table('e2e_bad', condition => 'true) EXECUTE FUNCTION pgwatch.capture(''x'') --')", "42601"),
        ("SELECT watch_table('e2e_bad', condition => 'true; DROP TABLE e2e_bad')", "42601"),
        ("SELECT watch_table('e2e_bad', condition => '1 FROM pg_class')", "42601"),
        ("SELECT watch_table('e2e_bad', condition => 'NEW.nope = 1')", "42703"),
        ("SELECT watch_table('e2e_bad', 'insert', condition => 'OLD.role_id = 1')", "42P17"),
        ("SELECT watch_table('e2e_bad', condition => '(SELECT true)')", "0A000"),
        ("SELECT watch_table('e2e_bad', 'truncate', condition => 'true')", "22023"),
        ("SELECT watch_table('e2e_bad', condition => ' ')", "22023"),
        ("SELECT watch_table('e2e_bad', payload => 'all')", "22023"),
        ("SELECT watch_table('e2e_bad', '*', '{role_id}', payload => 'keys')", "22023"),
        ("SELECT watch_table('e2e_bad', payload => NULL)", "22004"),
        (
            "SELECT watch_table('e2e_bad_wide', '*', array(SELECT attname::text FROM pg_attribute
                                  WHERE attrelid = 'e2e_bad_wide'::regclass AND attnum > 1), payload => 'compact')",
            "54000",
        ),
        ("SELECT watch_table('e2e_bad', fire_on_replica => NULL)", "22004"),
        ("SET ROLE e2e_bad_role; SELECT watch_table('e2e_bad')", "42501"),
        ("SET ROLE e2e_bad_role; SELECT unwatch_table('e2e_bad')", "42501"),
    ] {
        let (got, message) = failure(&mut client, sql);
        assert_eq!(got, code, "{sql}: {message}");
        client.batch_execute("RESET ROLE").unwrap();
        assert_eq!(catalog(&mut client), before, "{sql} changed the catalog");
    }
    let label_63 = "l".repeat(63);
    client.batch_execute(&format!("SELECT watch_table('e2e_bad', label => '{label_63}')")).unwrap();
}

#[test]
fn drop_extension_removes_every_trigger() {
    let _serial = serial();
    let mut admin = connect();
    admin.batch_execute("DROP DATABASE IF EXISTS e2e_dropext").unwrap();
    admin.batch_execute("CREATE DATABASE e2e_dropext").unwrap();
    let mut db = connect_to(&mut admin, "e2e_dropext");
    db.batch_execute(
        "CREATE EXTENSION pgwatch;
         CREATE TABLE t (id int PRIMARY KEY) PARTITION BY RANGE (id);
         CREATE TABLE t_1 PARTITION OF t FOR VALUES FROM (0) TO (10);
         CREATE TABLE u (id int PRIMARY KEY);
         SELECT watch_table('t'); SELECT watch_table('u', label => 'u2'); SELECT watch_table('u')",
    )
    .unwrap();
    let triggers = |db: &mut Client| -> i64 {
        db.query_one("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgwatch%'", &[]).unwrap().get(0)
    };
    // One per row event and one for truncate: t's on the parent (the row ones cloned onto t_1),
    // and u's two watches.
    assert_eq!(triggers(&mut db), 15);
    // A write starts the database's worker; after DROP EXTENSION it exits by itself.
    db.batch_execute("INSERT INTO u VALUES (0)").unwrap();
    let worker_pid = |admin: &mut Client| -> Option<i32> {
        admin
            .query_opt("SELECT pid FROM pgwatch.workers WHERE database = 'e2e_dropext'", &[])
            .unwrap()
            .and_then(|row| row.get(0))
    };
    assert!(eventually(|| worker_pid(&mut admin).is_some()), "no worker started");
    db.batch_execute("DROP EXTENSION pgwatch").unwrap();
    assert!(eventually(|| worker_pid(&mut admin).is_none()), "the worker did not exit after DROP EXTENSION");
    assert_eq!(triggers(&mut db), 0);
    db.batch_execute("INSERT INTO t VALUES (1); INSERT INTO u VALUES (1)").unwrap();
    drop(db);
    clients_leave(&mut admin, "e2e_dropext");
    admin.batch_execute("DROP DATABASE e2e_dropext").unwrap();
}

/// Waits until the backends of closed connections to `dbname` have exited: each does in its own
/// time, and DROP DATABASE waits only 5 s for them.
fn clients_leave(admin: &mut Client, dbname: &str) {
    let left = eventually(|| {
        let row = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend'",
                &[&dbname],
            )
            .unwrap();
        row.get::<_, i64>(0) == 0
    });
    assert!(left, "connections to {dbname} are still open");
}

#[test]
fn stats_count_captured_and_sent_rows() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE e2e_stats (id int PRIMARY KEY); SELECT watch_table('e2e_stats')",
            &["public.e2e_stats"],
        );
        let read = |c: &mut Client| -> Vec<i64> {
            let row = c
                .query_one("SELECT rows_captured, rows_sent, notifications, payload_bytes FROM pgwatch.stats()", &[])
                .unwrap();
            (0..4).map(|i| row.get(i)).collect()
        };
        let before = read(&mut writer);
        writer
            .batch_execute("BEGIN; INSERT INTO e2e_stats VALUES (1), (2); DELETE FROM e2e_stats WHERE id = 2; COMMIT")
            .unwrap();
        let (_, raw) = listener.receive_raw(1, WAIT).pop().expect("a notification");
        listener.expect_silence();
        assert_eq!(without_seq(&raw), r#"{"tbl":"public.e2e_stats","op":"insert","rows":[{"id":1}]}"#);
        let after = read(&mut writer);
        let delta: Vec<i64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        assert_eq!(delta, [3, 1, 1, raw.len() as i64], "{mode}: captured, sent, notifications, bytes");
    }
}

fn without_seq(payload: &str) -> String {
    match seq_of(payload) {
        Some((start, _, end)) => format!("{}{}", &payload[..start], &payload[end..]),
        None => payload.to_string(),
    }
}

#[test]
fn the_delivery_setting_chooses_who_sends() {
    let _serial = serial();
    let (mut writer, mut listener) = watched(
        "worker",
        "CREATE TABLE e2e_delivery (id int PRIMARY KEY); SELECT watch_table('e2e_delivery', 'insert')",
        &["public.e2e_delivery"],
    );
    // One transaction at a time: a worker that drains 1 and 4 together sends them in one payload,
    // and an inline one may arrive before a worker's.
    for (sql, id, numbered) in [
        ("INSERT INTO e2e_delivery VALUES (1)", 1, true),
        ("BEGIN; SET LOCAL pgwatch.delivery = inline; INSERT INTO e2e_delivery VALUES (2); COMMIT", 2, false),
        ("SET pgwatch.delivery = inline; INSERT INTO e2e_delivery VALUES (3)", 3, false),
        ("RESET pgwatch.delivery; INSERT INTO e2e_delivery VALUES (4)", 4, true),
    ] {
        // Nothing of the channel is left queued, so an inline transaction has nothing to overtake
        // (and no resync notice follows it).
        assert!(eventually(|| {
            let backlog: i64 =
                writer.query_one("SELECT coalesce(sum(backlog), 0)::int8 FROM pgwatch.workers", &[]).unwrap().get(0);
            backlog == 0
        }));
        writer.batch_execute(sql).unwrap();
        let got = listener.receive_raw(1, WAIT);
        listener.expect_silence();
        let [(_, payload)] = got.as_slice() else { panic!("{sql}: {got:?}") };
        let expected = format!(r#"{{"tbl":"public.e2e_delivery","op":"insert","rows":[{{"id":{id}}}]}}"#);
        assert_eq!(without_seq(payload), expected, "{sql}");
        assert_eq!(seq_of(payload).is_some(), numbered, "{sql}: {payload}");
    }
}

/// `threads` writers run `transactions` transactions each on their own keys of `e2e_load`: inserts,
/// updates and deletes, some several to a transaction, some rolled back (those write role_id -1).
/// `during` runs beside them. Then a last transaction inserts key 0; once it has arrived, the
/// listener's replica must equal the table.
fn load(threads: i64, transactions: i64, during: impl FnOnce() + Send) {
    let (mut writer, mut listener) = watched(
        "worker",
        "CREATE TABLE e2e_load (id bigint PRIMARY KEY, role_id int); SELECT watch_table('e2e_load', '*', '{role_id}')",
        &["public.e2e_load"],
    );
    std::thread::scope(|scope| {
        for t in 0..threads {
            scope.spawn(move || {
                let mut db = connect();
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (t as u64 + 1);
                let mut next = || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                let (mut live, mut fresh) = (Vec::<i64>::new(), t * 1_000_000);
                for _ in 0..transactions {
                    let rollback = next() % 10 == 0;
                    let role = if rollback { -1 } else { (next() % 50) as i32 };
                    let mut sql = String::from("BEGIN;");
                    let mut staged = live.clone();
                    for _ in 0..1 + next() % 3 {
                        let pick = next() as usize;
                        match (next() % 10, staged.is_empty()) {
                            (0..=3, _) | (_, true) => {
                                fresh += 1;
                                staged.push(fresh);
                                sql += &format!("INSERT INTO e2e_load VALUES ({fresh}, {role});");
                            }
                            (4..=7, false) => {
                                let id = staged[pick % staged.len()];
                                sql += &format!("UPDATE e2e_load SET role_id = {role} WHERE id = {id};");
                            }
                            _ => {
                                let id = staged.swap_remove(pick % staged.len());
                                sql += &format!("DELETE FROM e2e_load WHERE id = {id};");
                            }
                        }
                    }
                    sql += if rollback { "ROLLBACK" } else { "COMMIT" };
                    db.batch_execute(&sql).unwrap();
                    if !rollback {
                        live = staged;
                    }
                }
            });
        }
        scope.spawn(during);
    });
    // Transactions arrive in commit order, and the inserts of a worker's batch last, in the order
    // their rows were first changed: once key 0 has arrived, so has every earlier change, also
    // one that leaves the table as it was (an update to the same value, an insert and a delete
    // in two batches), which waiting for the replica to equal the table would not wait for.
    writer.batch_execute("INSERT INTO e2e_load VALUES (0, 0)").unwrap();
    let expected: HashMap<i64, i32> = writer
        .query("SELECT id, role_id FROM e2e_load", &[])
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let mut replica = Replica::default();
    while !replica.rows.contains_key(&0) {
        let Some((_, payload)) = listener.receive(1, WAIT).pop() else {
            panic!("stalled with {} of {} rows replicated", replica.rows.len(), expected.len());
        };
        assert!(!payload.contains(r#""role_id":-1"#), "a rolled-back change was sent: {payload}");
        replica.apply(&payload);
    }
    listener.expect_silence();
    let matches = replica.rows.len() == expected.len()
        && replica.rows.iter().all(|(id, row)| expected.get(id).map(|&r| i64::from(r)) == row["role_id"].as_i64());
    assert!(matches, "the replica ({} rows) differs from the table ({} rows)", replica.rows.len(), expected.len());
}

#[test]
fn sixteen_concurrent_writers_lose_nothing_and_send_nothing_rolled_back() {
    let _serial = serial();
    let mut admin = connect();
    let batches = stat(&mut admin, "batches");
    load(16, 500, || {});
    // The worker counts a batch just after its commit, which the listener may hear of first.
    assert!(eventually(|| stat(&mut admin, "batches") > batches));
}

#[test]
fn a_terminated_worker_is_restarted_and_loses_nothing() {
    let _serial = serial();
    let mut admin = connect();
    let restarts = stat(&mut admin, "worker_restarts");
    let terminated = std::sync::Mutex::new(0);
    // The worker, started by the first commit (or left running by an earlier test), is terminated
    // as soon as it is seen; should that be after the writers' last change was sent, load's last
    // insert has the launcher start a new one.
    load(4, 400, || {
        let mut db = connect();
        let mut pid: Option<i32> = None;
        eventually(|| {
            pid = db
                .query_one("SELECT pid FROM pgwatch.workers WHERE database = current_database()", &[])
                .ok()
                .and_then(|row| row.get(0));
            pid.is_some()
        });
        if let Some(pid) = pid {
            db.execute("SELECT pg_terminate_backend($1)", &[&pid]).unwrap();
            *terminated.lock().unwrap() = pid;
        }
    });
    let old = *terminated.lock().unwrap();
    assert_ne!(old, 0, "no worker to terminate");
    // A terminated worker sends what is queued before it exits; the next commit that finds none
    // has the launcher start another.
    let mut new: Option<i32> = None;
    assert!(
        eventually(|| {
            admin
                .batch_execute("INSERT INTO e2e_load VALUES (-1, 0) ON CONFLICT (id) DO UPDATE SET role_id = 0")
                .unwrap();
            new = admin
                .query_one("SELECT pid FROM pgwatch.workers WHERE database = current_database()", &[])
                .unwrap()
                .get(0);
            new.is_some_and(|new| new != old)
        }),
        "worker {old} was not replaced: {new:?}"
    );
    assert!(stat(&mut admin, "worker_restarts") > restarts);
}

#[test]
fn a_transaction_too_big_for_the_queue_is_sent_inline() {
    let _serial = serial();
    let (mut writer, mut listener) = watched(
        "worker",
        "CREATE TABLE e2e_huge (id int PRIMARY KEY, body text); SELECT watch_table('e2e_huge', 'insert', '{body}')",
        &["public.e2e_huge"],
    );
    let fallbacks = stat(&mut writer, "inline_fallbacks");
    // 2600 rows of 7 kB: more than the 16 MB queue holds.
    writer.batch_execute("INSERT INTO e2e_huge SELECT g, repeat('b', 7000) FROM generate_series(1, 2600) g").unwrap();
    let got = listener.receive_raw(2600, WAIT);
    listener.expect_silence();
    assert_eq!(got.len(), 2600, "one row per payload");
    assert!(got.iter().all(|(_, p)| seq_of(p).is_none()), "sent inline, without seq");
    assert_eq!(stat(&mut writer, "inline_fallbacks"), fallbacks + 1);
}

#[test]
fn the_workers_view_shows_the_database_worker() {
    let _serial = serial();
    let (mut writer, mut listener) = watched(
        "worker",
        "CREATE TABLE e2e_view (id int PRIMARY KEY); SELECT watch_table('e2e_view')",
        &["public.e2e_view"],
    );
    writer.batch_execute("INSERT INTO e2e_view VALUES (1)").unwrap();
    listener.expect(&[r#"{"tbl":"public.e2e_view","op":"insert","rows":[{"id":1}]}"#]);
    // The worker stamps last_send and marks its records done just after its commit, which the
    // listener may hear of first.
    let view = |writer: &mut Client| -> (Option<i32>, String, Option<bool>, i64) {
        let row = writer
            .query_one(
                "SELECT pid, state, last_send > now() - interval '1 minute', backlog FROM pgwatch.workers
                  WHERE database = current_database()",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1), row.get(2), row.get(3))
    };
    eventually(|| {
        let (_, _, recent, backlog) = view(&mut writer);
        recent == Some(true) && backlog == 0
    });
    let (pid, state, recent, backlog) = view(&mut writer);
    assert!(pid.is_some());
    assert!(state == "idle" || state == "sending", "{state}");
    assert_eq!(recent, Some(true));
    assert_eq!(backlog, 0);
}

#[test]
fn each_database_gets_its_own_notifications_and_can_be_dropped() {
    let _serial = serial();
    let mut admin = connect();
    let mut dbs = Vec::new();
    for name in ["e2e_db_one", "e2e_db_two"] {
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name}")).unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        let mut db = connect_to(&mut admin, name);
        db.batch_execute(
            "CREATE EXTENSION pgwatch; CREATE TABLE t (id int PRIMARY KEY); SELECT watch_table('t', 'insert')",
        )
        .unwrap();
        let listener = Listener::new(connect_to(&mut admin, name), &["public.t"]);
        dbs.push((db, listener));
    }
    for (i, (db, _)) in dbs.iter_mut().enumerate() {
        db.batch_execute(&format!("INSERT INTO t VALUES ({})", i + 1)).unwrap();
    }
    for (i, (_, listener)) in dbs.iter_mut().enumerate() {
        let got = listener.receive_raw(1, WAIT);
        assert_eq!(got[0].1, format!(r#"{{"tbl":"public.t","op":"insert","seq":1,"rows":[{{"id":{}}}]}}"#, i + 1));
        listener.expect_silence();
    }
    let (one, two) = (dbs.remove(0), dbs.remove(0));
    drop(one);
    clients_leave(&mut admin, "e2e_db_one");
    // The worker of e2e_db_one is connected to it: DROP DATABASE stops it rather than failing.
    admin.batch_execute("DROP DATABASE e2e_db_one").unwrap();
    let listed: i64 =
        admin.query_one("SELECT count(*) FROM pgwatch.workers WHERE database LIKE 'e2e_db_%'", &[]).unwrap().get(0);
    assert_eq!(listed, 1);
    let (mut db, mut listener) = two;
    db.batch_execute("INSERT INTO t VALUES (3)").unwrap();
    assert_eq!(listener.receive_raw(1, WAIT)[0].1, r#"{"tbl":"public.t","op":"insert","seq":2,"rows":[{"id":3}]}"#);
    drop((db, listener));
    clients_leave(&mut admin, "e2e_db_two");
    admin.batch_execute("DROP DATABASE e2e_db_two").unwrap();
}

#[test]
fn a_database_with_a_worker_can_be_copied_renamed_and_closed() {
    let _serial = serial();
    let mut admin = connect();
    for name in ["e2e_db_src", "e2e_db_moved", "e2e_db_copy"] {
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).unwrap();
    }
    let insert = |n: i32| format!(r#"{{"tbl":"public.t","op":"insert","rows":[{{"id":{n}}}]}}"#);
    let mut db = database(&mut admin, "e2e_db_src", None);
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY); SELECT watch_table('t', 'insert'); SET pgwatch.delivery = worker",
    )
    .unwrap();
    let mut listener = Listener::new(connect_to(&mut admin, "e2e_db_src"), &["public.t"]);
    listener.expect_after(&mut db, "INSERT INTO t VALUES (1)", &[&insert(1)]);
    let worker = |admin: &mut Client, name: &str| -> Option<i32> {
        admin.query_opt("SELECT pid FROM pgwatch.workers WHERE database = $1", &[&name]).unwrap().and_then(|r| r.get(0))
    };
    assert!(worker(&mut admin, "e2e_db_src").is_some());
    drop((db, listener));
    clients_leave(&mut admin, "e2e_db_src");
    // PostgreSQL refuses these while any other session is connected to the database, and the
    // worker is: it steps aside for them, and starts again when there is something to send. (A
    // session may copy the database it is in.)
    let mut inside = connect_to(&mut admin, "e2e_db_src");
    inside.batch_execute("CREATE DATABASE e2e_db_copy TEMPLATE e2e_db_src").unwrap();
    drop(inside);
    clients_leave(&mut admin, "e2e_db_src");
    admin.batch_execute("ALTER DATABASE e2e_db_src RENAME TO e2e_db_moved").unwrap();
    for name in ["e2e_db_moved", "e2e_db_copy"] {
        let mut db = connect_to(&mut admin, name);
        db.batch_execute("SET pgwatch.delivery = worker").unwrap();
        let mut listener = Listener::new(connect_to(&mut admin, name), &["public.t"]);
        // Its owner closes the database to new connections: sessions still connected commit
        // changes, which only its worker, started after that, sends.
        admin.batch_execute(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false")).unwrap();
        let fallbacks = stat(&mut db, "inline_fallbacks");
        listener.expect_after(&mut db, "INSERT INTO t VALUES (2)", &[&insert(2)]);
        assert!(worker(&mut admin, name).is_some(), "{name}: its worker sent it");
        assert_eq!(stat(&mut db, "inline_fallbacks"), fallbacks, "{name}: not inline");
        drop((db, listener));
        admin.batch_execute(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true")).unwrap();
        clients_leave(&mut admin, name);
        admin.batch_execute(&format!("DROP DATABASE {name}")).unwrap();
    }
}

#[test]
fn a_database_whose_worker_cannot_connect_does_not_hold_the_queue() {
    let _serial = serial();
    let mut admin = connect();
    let mut db = database(&mut admin, "e2e_invalid", None);
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY); SELECT watch_table('t', 'insert'); SET pgwatch.delivery = worker",
    )
    .unwrap();
    let mut listener = Listener::new(connect_to(&mut admin, "e2e_invalid"), &["public.t"]);
    let insert = |n: i32| format!(r#"{{"tbl":"public.t","op":"insert","rows":[{{"id":{n}}}]}}"#);
    listener.expect_after(&mut db, "INSERT INTO t VALUES (1)", &[&insert(1)]);
    // As PostgreSQL leaves a database whose DROP DATABASE was interrupted late: sessions still
    // connected go on, but no new connection is let in, a worker's included.
    admin.batch_execute("UPDATE pg_database SET datconnlimit = -2 WHERE datname = 'e2e_invalid'").unwrap();
    let worker = |admin: &mut Client| -> Option<i32> {
        admin.query_one("SELECT pid FROM pgwatch.workers WHERE database = 'e2e_invalid'", &[]).unwrap().get(0)
    };
    admin
        .batch_execute("SELECT pg_terminate_backend(pid) FROM pgwatch.workers WHERE database = 'e2e_invalid'")
        .unwrap();
    assert!(eventually(|| worker(&mut admin).is_none()), "the worker did not exit");
    let skipped = stat(&mut admin, "skipped_records");
    // A change committed now cannot be sent: once a few workers failed to start, it is dropped
    // rather than left to hold the queue every database shares.
    db.batch_execute("INSERT INTO t VALUES (2)").unwrap();
    assert!(eventually(|| stat(&mut admin, "skipped_records") == skipped + 1), "the record was not dropped");
    let backlog: i64 =
        admin.query_one("SELECT backlog FROM pgwatch.workers WHERE database = 'e2e_invalid'", &[]).unwrap().get(0);
    assert_eq!(backlog, 0);
    // Once a worker runs there again, the database's subscribers are told to refetch.
    admin.batch_execute("UPDATE pg_database SET datconnlimit = -1 WHERE datname = 'e2e_invalid'").unwrap();
    db.batch_execute("INSERT INTO t VALUES (3)").unwrap();
    listener.expect_on(&[("public.t", &insert(3)), ("public.t", r#"{"tbl":"public.t","op":"resync"}"#)]);
    drop((db, listener));
    admin.batch_execute("DROP DATABASE e2e_invalid WITH (FORCE)").unwrap();
}

#[test]
fn mute_silences_a_transaction_or_a_session() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE e2e_mute (id int PRIMARY KEY); SELECT watch_table('e2e_mute', 'insert')",
            &["public.e2e_mute"],
        );
        writer
            .batch_execute(
                "BEGIN; SET LOCAL pgwatch.mute = on; INSERT INTO e2e_mute VALUES (1); COMMIT;
                 INSERT INTO e2e_mute VALUES (2);
                 SET pgwatch.mute = on; INSERT INTO e2e_mute VALUES (3);
                 RESET pgwatch.mute; INSERT INTO e2e_mute VALUES (4)",
            )
            .unwrap();
        // In worker delivery both rows may arrive in one notification.
        let ids: Vec<i64> = listener.receive_rows(2).0.iter().map(|row| row["id"].as_i64().unwrap()).collect();
        listener.expect_silence();
        assert_eq!(ids, [2, 4], "{mode}");
    }
}

#[test]
fn a_committed_prepared_transaction_tells_the_watches_it_changed_to_refetch() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE e2e_prep (id int PRIMARY KEY);
             CREATE TABLE e2e_prep_kept (id int PRIMARY KEY);
             SELECT watch_table('e2e_prep');
             SELECT watch_table('e2e_prep_kept', retain => '1 hour')",
            &["public.e2e_prep", "public.e2e_prep_kept"],
        );
        let resync = r#"{"tbl":"public.e2e_prep","op":"resync"}"#;
        let reset = r#"{"tbl":"public.e2e_prep_kept","op":"reset","reason":"fallback"}"#;
        // PostgreSQL cannot notify from a prepared transaction: nothing as it is prepared, and
        // once it commits, its session knows which watches it changed.
        writer.batch_execute("BEGIN; INSERT INTO e2e_prep VALUES (1); PREPARE TRANSACTION 'e2e_prep_1'").unwrap();
        listener.expect_silence();
        writer.batch_execute("COMMIT PREPARED 'e2e_prep_1'").unwrap();
        listener.expect(&[resync]);
        // A TRUNCATE of a table whose watch does not report it is counted and announced too.
        let unsent = stat(&mut writer, "prepared_unsent");
        writer.batch_execute("BEGIN; TRUNCATE e2e_prep; PREPARE TRANSACTION 'e2e_prep_3'").unwrap();
        // (A backend adds its counts to the totals as its next transaction ends.)
        writer.batch_execute("SELECT 1").unwrap();
        assert_eq!(stat(&mut writer, "prepared_unsent"), unsent + 1);
        writer.batch_execute("COMMIT PREPARED 'e2e_prep_3'").unwrap();
        listener.expect(&[resync]);
        // A PREPARE that fails after pgwatch's pre-prepare (its GID taken) prepared nothing:
        // nothing is counted.
        writer
            .batch_execute("BEGIN; INSERT INTO e2e_prep VALUES (7); PREPARE TRANSACTION 'e2e_prep_7'; SELECT 1")
            .unwrap();
        let unsent = stat(&mut writer, "prepared_unsent");
        let (code, message) =
            failure(&mut writer, "BEGIN; INSERT INTO e2e_prep VALUES (8); PREPARE TRANSACTION 'e2e_prep_7'");
        assert_eq!(code, "42710", "{message}");
        writer.batch_execute("ROLLBACK").unwrap();
        writer.batch_execute("SELECT 1").unwrap();
        assert_eq!(stat(&mut writer, "prepared_unsent"), unsent);
        writer.batch_execute("ROLLBACK PREPARED 'e2e_prep_7'").unwrap();
        // Rolled back, or without watched changes: nothing.
        writer.batch_execute("BEGIN; INSERT INTO e2e_prep VALUES (2); PREPARE TRANSACTION 'e2e_prep_2'").unwrap();
        writer.batch_execute("ROLLBACK PREPARED 'e2e_prep_2'").unwrap();
        writer.batch_execute("BEGIN; SELECT 1; PREPARE TRANSACTION 'e2e_prep_4'").unwrap();
        let mut other = connect();
        other.batch_execute("COMMIT PREPARED 'e2e_prep_4'").unwrap();
        listener.expect_silence();
        // Committed by another session, which does not know what it changed: every watch of the
        // database, a retained one with a reset marker in its log.
        let start: i64 = writer.query_one("SELECT pgwatch.position('public.e2e_prep_kept')", &[]).unwrap().get(0);
        writer.batch_execute("BEGIN; INSERT INTO e2e_prep_kept VALUES (1); PREPARE TRANSACTION 'e2e_prep_5'").unwrap();
        other.batch_execute("COMMIT PREPARED 'e2e_prep_5'").unwrap();
        let mut got: Vec<String> = listener.receive(2, WAIT).into_iter().map(|(_, payload)| payload).collect();
        got.sort();
        assert_eq!(got, [resync, reset]);
        let replayed = replayed(&mut writer, "public.e2e_prep_kept", start);
        assert_eq!(replayed.len(), 1);
        assert!(
            replayed[0].contains(r#""op":"reset""#) && replayed[0].contains(r#""reason":"fallback""#),
            "{replayed:?}"
        );
        // A GID used again: the session that prepared it first does not take the second
        // transaction for its own (which changed another table).
        writer.batch_execute("BEGIN; INSERT INTO e2e_prep VALUES (3); PREPARE TRANSACTION 'e2e_prep_6'").unwrap();
        other.batch_execute("ROLLBACK PREPARED 'e2e_prep_6'").unwrap();
        other.batch_execute("BEGIN; INSERT INTO e2e_prep_kept VALUES (2); PREPARE TRANSACTION 'e2e_prep_6'").unwrap();
        writer.batch_execute("COMMIT PREPARED 'e2e_prep_6'").unwrap();
        let mut got: Vec<String> = listener.receive(2, WAIT).into_iter().map(|(_, payload)| payload).collect();
        got.sort();
        assert_eq!(got, [resync, reset]);
        // A GID no transaction has: PostgreSQL's own error.
        assert_eq!(failure(&mut writer, "COMMIT PREPARED 'e2e_prep_none'").0, "42704");
        assert_eq!(failure(&mut writer, "ROLLBACK PREPARED 'e2e_prep_none'").0, "42704");
        listener.expect_silence();
        writer.batch_execute("DROP TABLE e2e_prep, e2e_prep_kept").unwrap();
    }
}

/// Puts `synchronous_standby_names` back as it was, however the test ends: while it names a
/// standby that never comes, every commit that waits for one hangs.
struct NoStandby(Client);

impl Drop for NoStandby {
    fn drop(&mut self) {
        // (ALTER SYSTEM runs outside a transaction block: a statement of its own.)
        let _ = self.0.batch_execute("ALTER SYSTEM RESET synchronous_standby_names");
        let _ = self.0.batch_execute("SELECT pg_reload_conf()");
    }
}

#[test]
fn a_commit_prepared_that_fails_after_committing_still_has_its_watches_refetch() {
    let _serial = serial();
    let (mut writer, mut listener) = watched(
        "inline",
        "CREATE TABLE e2e_prep_lost (id int PRIMARY KEY);
         CREATE TABLE e2e_prep_wal (id int);
         SELECT watch_table('e2e_prep_lost')",
        &["public.e2e_prep_lost"],
    );
    // A session that notified and waits, at commit, for a standby that never comes holds
    // PostgreSQL's NOTIFY lock all the while (a commit waits only when it wrote WAL).
    let mut admin = NoStandby(connect());
    // Connected first: while the setting holds, a commit that waits for a standby hangs.
    let mut holders: Vec<Client> = (0..5).map(|_| connect()).collect();
    admin.0.batch_execute("ALTER SYSTEM SET synchronous_standby_names = 'pgwatch_nobody'").unwrap();
    admin.0.batch_execute("SELECT pg_reload_conf()").unwrap();
    assert!(eventually(|| {
        let shown: String = admin.0.query_one("SHOW synchronous_standby_names", &[]).unwrap().get(0);
        shown == "pgwatch_nobody"
    }));
    let blocker = loop {
        let mut holder = holders.pop().expect("the setting reached the checkpointer");
        let pid: i32 = holder.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
        let commit = std::thread::spawn(move || {
            holder.batch_execute("BEGIN; INSERT INTO e2e_prep_wal VALUES (1); NOTIFY e2e_prep_lost_other; COMMIT")
        });
        let waits = eventually(|| {
            commit.is_finished()
                || admin
                    .0
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event = 'SyncRep'",
                        &[&pid],
                    )
                    .unwrap()
                    .get::<_, i64>(0)
                    == 1
        });
        assert!(waits);
        if !commit.is_finished() {
            break (pid, commit);
        }
        // The checkpointer had not yet taken in the setting: that commit did not wait.
        commit.join().unwrap().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    // The prepared transaction commits; the statement's own transaction then cannot send the
    // resync inline (the NOTIFY lock is held), times out and aborts.
    writer
        .batch_execute(
            "SET synchronous_commit = local; BEGIN; INSERT INTO e2e_prep_lost VALUES (1);
             PREPARE TRANSACTION 'e2e_prep_lost'; SET lock_timeout = '200ms'",
        )
        .unwrap();
    assert_eq!(failure(&mut writer, "COMMIT PREPARED 'e2e_prep_lost'").0, "55P03");
    writer.batch_execute("RESET lock_timeout").unwrap();
    let committed: i64 = writer.query_one("SELECT count(*) FROM e2e_prep_lost", &[]).unwrap().get(0);
    assert_eq!(committed, 1, "the prepared transaction committed");
    // Let the blocker go; the worker sends the resync the aborted statement could not.
    admin.0.batch_execute(&format!("SELECT pg_cancel_backend({})", blocker.0)).unwrap();
    blocker.1.join().unwrap().unwrap();
    drop(admin);
    listener.expect(&[r#"{"tbl":"public.e2e_prep_lost","op":"resync"}"#]);
    writer.batch_execute("DROP TABLE e2e_prep_lost, e2e_prep_wal").unwrap();
}

#[test]
fn pgwatch_installs_and_works_in_a_schema_of_its_own() {
    let _serial = serial();
    let mut admin = connect();
    admin.batch_execute("DROP DATABASE IF EXISTS e2e_own_schema WITH (FORCE)").unwrap();
    admin.batch_execute("CREATE DATABASE e2e_own_schema").unwrap();
    let mut db = connect_to(&mut admin, "e2e_own_schema");
    db.batch_execute(
        "CREATE SCHEMA pgwatch_api; CREATE EXTENSION pgwatch SCHEMA pgwatch_api;
         CREATE TABLE t (id int PRIMARY KEY); SELECT pgwatch_api.watch_table('t', 'insert')",
    )
    .unwrap();
    let mut listener = Listener::new(connect_to(&mut admin, "e2e_own_schema"), &["public.t"]);
    for (id, mode) in MODES.iter().enumerate() {
        db.batch_execute(&format!("SET pgwatch.delivery = {mode}; INSERT INTO t VALUES ({id})")).unwrap();
        listener.expect(&[&format!(r#"{{"tbl":"public.t","op":"insert","rows":[{{"id":{id}}}]}}"#)]);
    }
    db.batch_execute("SELECT pgwatch_api.unwatch_table('t')").unwrap();
    drop((db, listener));
    admin.batch_execute("DROP DATABASE e2e_own_schema WITH (FORCE)").unwrap();
}

#[test]
fn a_database_not_in_utf8_refuses_what_pgwatch_cannot_read_and_delivers_its_text() {
    let _serial = serial();
    let mut admin = connect();
    admin.batch_execute("DROP DATABASE IF EXISTS e2e_latin1 WITH (FORCE)").unwrap();
    admin
        .batch_execute("CREATE DATABASE e2e_latin1 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
        .unwrap();
    // The client speaks UTF-8; the server keeps these names and values in LATIN1.
    let mut db = connect_to(&mut admin, "e2e_latin1");
    db.batch_execute(
        "CREATE EXTENSION pgwatch;
         CREATE TABLE t (id int PRIMARY KEY, v text);
         CREATE TABLE \"café\" (id int PRIMARY KEY);
         CREATE TABLE k (\"clé\" int PRIMARY KEY)",
    )
    .unwrap();
    let refused = [
        "SELECT watch_table('t', label => 'lé')",
        "SELECT watch_table('t', 'insert', extra_columns => '{vé}')",
        "SELECT watch_table('t', 'insert', trigger_columns => '{vé}')",
        "SELECT watch_table('t', 'insert', condition => 'NEW.v = ''é''')",
        "SELECT watch_table('\"café\"')",
        "SELECT watch_table('k')",
    ];
    for sql in refused {
        assert_eq!(failure(&mut db, sql).0, "0A000", "{sql}");
    }
    let watches: i64 = db.query_one("SELECT count(*) FROM pgwatch.watches", &[]).unwrap().get(0);
    assert_eq!(watches, 0, "a refused watch_table changes nothing");

    db.batch_execute("SELECT watch_table('t', 'insert', extra_columns => '{v}', label => 'l')").unwrap();
    // A condition spelled in ASCII can still hold a name outside it (a named argument here),
    // which its stored WHEN keeps: pgwatch reads that as bytes, and can remake and remove it.
    db.batch_execute(
        r#"CREATE FUNCTION positive("é" int) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT $1 > 0';
           SELECT watch_table('t', 'insert', label => 'named', condition => 'public.positive(U&"\00E9" => NEW.id)');
           ALTER TABLE t ADD COLUMN w int; ALTER TABLE t DROP COLUMN w;
           SELECT unwatch_table('t', 'named')"#,
    )
    .unwrap();
    let mut listener = Listener::new(connect_to(&mut admin, "e2e_latin1"), &["l"]);
    let sent = |id: usize| format!(r#"{{"tbl":"public.t","op":"insert","rows":[{{"id":{id},"v":"é ü \"ÿ\""}}]}}"#);
    for (id, mode) in MODES.iter().enumerate() {
        db.batch_execute(&format!(r#"SET pgwatch.delivery = {mode}; INSERT INTO t VALUES ({id}, 'é ü "ÿ"')"#)).unwrap();
        listener.expect(&[&sent(id)]);
    }
    // DDL that would give the watched table a name pgwatch cannot read fails, and the watch
    // goes on as it was.
    for sql in
        ["ALTER TABLE t ADD COLUMN \"é\" int", "ALTER TABLE t RENAME TO \"té\"", "ALTER TABLE t RENAME v TO \"vé\""]
    {
        assert_eq!(failure(&mut db, sql).0, "0A000", "{sql}");
    }
    db.batch_execute("INSERT INTO t VALUES (2, 'é ü \"ÿ\"')").unwrap();
    listener.expect(&[&sent(2)]);
    db.query("SELECT * FROM pgwatch.channels", &[]).unwrap();
    assert_eq!(failure(&mut db, "SELECT unwatch_table('t', 'lé')").0, "0A000");
    let removed: i32 = db.query_one("SELECT unwatch_table('t', 'l')", &[]).unwrap().get(0);
    assert_eq!(removed, 1);
    drop((db, listener));
    admin.batch_execute("DROP DATABASE e2e_latin1 WITH (FORCE)").unwrap();
}

#[test]
fn tables_whose_names_hold_dots_have_channels_and_tbl_of_their_own() {
    let _serial = serial();
    for mode in MODES {
        let setup = r#"DROP SCHEMA IF EXISTS "e2e.dot" CASCADE; CREATE SCHEMA "e2e.dot";
                       CREATE TABLE "e2e.dot".t (id int PRIMARY KEY);
                       CREATE TABLE "dot.t" (id int PRIMARY KEY);
                       SELECT watch_table('"e2e.dot".t', retain => '1 hour');
                       SELECT watch_table('"dot.t"')"#;
        let (mut writer, mut listener) = watched(mode, setup, &[r#""e2e.dot".t"#, r#"public."dot.t""#]);
        writer.batch_execute(r#"INSERT INTO "e2e.dot".t VALUES (1); INSERT INTO "dot.t" VALUES (2)"#).unwrap();
        listener.expect_on(&[
            (r#""e2e.dot".t"#, r#"{"tbl":"\"e2e.dot\".t","op":"insert","rows":[{"id":1}]}"#),
            (r#"public."dot.t""#, r#"{"tbl":"public.\"dot.t\"","op":"insert","rows":[{"id":2}]}"#),
        ]);
        // Refetches name the tables from the catalog, as the triggers do.
        writer
            .batch_execute(r#"ALTER TABLE "e2e.dot".t ALTER COLUMN id TYPE bigint; ALTER TABLE "dot.t" ALTER COLUMN id TYPE bigint"#)
            .unwrap();
        listener.expect_on(&[
            (r#""e2e.dot".t"#, r#"{"tbl":"\"e2e.dot\".t","op":"reset","reason":"ddl"}"#),
            (r#"public."dot.t""#, r#"{"tbl":"public.\"dot.t\"","op":"resync"}"#),
        ]);
        writer.batch_execute(r#"DROP SCHEMA "e2e.dot" CASCADE; DROP TABLE "dot.t""#).unwrap();
    }
}

#[test]
fn a_database_owner_cannot_make_the_worker_run_as_another_role() {
    let _serial = serial();
    let mut admin = connect();
    let mut owner = owned_database(&mut admin, "e2e_sessauth", "e2e_dbowner");
    // The worker, which connects as the bootstrap superuser, takes this in as it starts.
    owner
        .batch_execute("SET ROLE e2e_dbowner; ALTER DATABASE e2e_sessauth SET session_authorization = 'e2e_dbowner'")
        .unwrap();
    drop(owner);
    let mut db = connect_to(&mut admin, "e2e_sessauth");
    db.batch_execute(
        "CREATE EXTENSION pgwatch; CREATE TABLE t (id int PRIMARY KEY);
         SELECT watch_table('t', 'insert', retain => '1 hour')",
    )
    .unwrap();
    let mut listener = Listener::new(connect_to(&mut admin, "e2e_sessauth"), &["public.t"]);
    let start: i64 = db.query_one("SELECT pgwatch.position('public.t')", &[]).unwrap().get(0);
    db.batch_execute("INSERT INTO t VALUES (1)").unwrap();
    listener.expect(&[r#"{"tbl":"public.t","op":"insert","rows":[{"id":1}]}"#]);
    // The worker wrote the log, which only pgwatch's owner may.
    assert_eq!(replayed(&mut db, "public.t", start).len(), 1);
    drop((db, listener));
    admin.batch_execute("DROP DATABASE e2e_sessauth WITH (FORCE)").unwrap();
    admin.batch_execute("DROP ROLE e2e_dbowner").unwrap();
}
