//! End-to-end tests: a real server, real autocommit client connections that LISTEN, and exact
//! payloads. Each test owns its tables (and so its channels), so tests run in parallel.

use std::collections::BTreeSet;
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};

/// A connection to the test database, booting the test server on first use.
fn connect() -> Client {
    pgrx_tests::run_test("watch_table_returns_the_watch", None, crate::pg_test::postgresql_conf_options()).unwrap();
    pgrx_tests::client().unwrap().0
}

/// A connection to another database of the test server.
fn connect_to(via: &mut Client, dbname: &str) -> Client {
    let row = via.query_one("SELECT inet_server_port(), current_user::text", &[]).unwrap();
    let (port, user): (i32, String) = (row.get(0), row.get(1));
    postgres::Config::new().host("localhost").port(port as u16).user(&user).dbname(dbname).connect(NoTls).unwrap()
}

/// A writer that ran `setup` and a listener already listening on `channels`.
fn watched(setup: &str, channels: &[&str]) -> (Client, Client) {
    let mut writer = connect();
    writer.batch_execute(setup).unwrap();
    (writer, listen(channels))
}

fn listen(channels: &[&str]) -> Client {
    let mut client = connect();
    for channel in channels {
        client.batch_execute(&format!("LISTEN \"{channel}\"")).unwrap();
    }
    client
}

/// Notifications as `(channel, payload)`, waiting up to `wait` for each.
fn receive(listener: &mut Client, count: usize, wait: Duration) -> Vec<(String, String)> {
    let mut notifications = listener.notifications();
    let mut iter = notifications.timeout_iter(wait);
    let mut got = Vec::new();
    while got.len() < count {
        match iter.next().unwrap() {
            Some(n) => got.push((n.channel().to_string(), n.payload().to_string())),
            None => break,
        }
    }
    got
}

/// Asserts that exactly these payloads arrive, in this order, and nothing more.
fn expect(listener: &mut Client, expected: &[&str]) {
    let got: Vec<String> =
        receive(listener, expected.len(), Duration::from_secs(10)).into_iter().map(|(_, p)| p).collect();
    assert_eq!(got, expected);
    expect_silence(listener);
}

fn expect_silence(listener: &mut Client) {
    let extra = receive(listener, 1, Duration::from_millis(300));
    assert!(extra.is_empty(), "unexpected notification: {extra:?}");
}

/// The SQLSTATE and message of a statement that must fail.
fn failure(client: &mut Client, sql: &str) -> (String, String) {
    let error = client.batch_execute(sql).expect_err(sql);
    let db = error.as_db_error().expect("a server error");
    (db.code().code().to_string(), db.message().to_string())
}

fn stat(client: &mut Client, counter: &str) -> i64 {
    client.query_one(&format!("SELECT {counter} FROM pgwatch.stats()"), &[]).unwrap().get(0)
}

#[test]
fn insert_update_delete_send_exact_payloads() {
    let (mut writer, mut listener) = watched(
        "CREATE TABLE e2e_basic (id int PRIMARY KEY, role_id int, name text);
             SELECT watch_table('e2e_basic', '*', '{role_id}')",
        &["public.e2e_basic"],
    );
    writer.batch_execute("INSERT INTO e2e_basic VALUES (1, 7, 'ann'), (2, 7, 'bob')").unwrap();
    expect(
        &mut listener,
        &[r#"{"tbl":"public.e2e_basic","op":"insert","rows":[{"id":1,"role_id":7},{"id":2,"role_id":7}]}"#],
    );
    writer.batch_execute("UPDATE e2e_basic SET role_id = 8 WHERE id = 1").unwrap();
    expect(
        &mut listener,
        &[r#"{"tbl":"public.e2e_basic","op":"update","rows":[{"id":1,"role_id":8,"old":{"role_id":7}}]}"#],
    );
    writer.batch_execute("UPDATE e2e_basic SET name = 'bea' WHERE id = 2").unwrap();
    expect(&mut listener, &[r#"{"tbl":"public.e2e_basic","op":"update","rows":[{"id":2,"role_id":7}]}"#]);
    writer.batch_execute("DELETE FROM e2e_basic WHERE id = 1").unwrap();
    expect(&mut listener, &[r#"{"tbl":"public.e2e_basic","op":"delete","rows":[{"id":1,"role_id":8}]}"#]);
}

#[test]
fn only_watched_events_are_sent() {
    let (mut writer, mut listener) = watched(
        "CREATE TABLE e2e_events (id int PRIMARY KEY, n int); SELECT watch_table('e2e_events', 'update')",
        &["public.e2e_events"],
    );
    writer
        .batch_execute(
            "INSERT INTO e2e_events VALUES (1, 0), (2, 0); UPDATE e2e_events SET n = 1 WHERE id = 2;
             DELETE FROM e2e_events WHERE id = 1",
        )
        .unwrap();
    expect(&mut listener, &[r#"{"tbl":"public.e2e_events","op":"update","rows":[{"id":2}]}"#]);
}

#[test]
fn composite_keys_and_key_changes() {
    let (mut writer, mut listener) = watched(
        "CREATE TABLE e2e_members (org_id int, user_id int, role text, PRIMARY KEY (user_id, org_id));
             SELECT watch_table('e2e_members', '*', '{role}')",
        &["public.e2e_members"],
    );
    writer.batch_execute("INSERT INTO e2e_members VALUES (10, 1, 'admin')").unwrap();
    writer.batch_execute("UPDATE e2e_members SET org_id = 11 WHERE user_id = 1").unwrap();
    writer.batch_execute("DELETE FROM e2e_members").unwrap();
    expect(
        &mut listener,
        &[
            r#"{"tbl":"public.e2e_members","op":"insert","rows":[{"user_id":1,"org_id":10,"role":"admin"}]}"#,
            r#"{"tbl":"public.e2e_members","op":"update","rows":[{"user_id":1,"org_id":11,"role":"admin","old":{"user_id":1,"org_id":10}}]}"#,
            r#"{"tbl":"public.e2e_members","op":"delete","rows":[{"user_id":1,"org_id":11,"role":"admin"}]}"#,
        ],
    );
}

#[test]
fn values_are_typed_json() {
    let (mut writer, mut listener) = watched(
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
    expect(
        &mut listener,
        &[concat!(
            r#"{"tbl":"public.e2e_types","op":"insert","rows":[{"id":-9000000000,"small":-3,"price":1.50,"#,
            r#""ratio":2.5e-07,"ok":true,"label":"say \"hi\"\n\\","code":"ab ","at":"2024-01-02 03:04:05+00","#,
            r#""mood":"sad","doc":"{\"a\": [1]}","missing":null,"nan":"NaN"}]}"#
        )],
    );
}

#[test]
fn a_transaction_folds_to_net_changes_deletes_first() {
    let (mut writer, mut listener) = watched(
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
    expect(
        &mut listener,
        &[
            r#"{"tbl":"public.e2e_fold","op":"delete","rows":[{"id":4,"role_id":1}]}"#,
            r#"{"tbl":"public.e2e_fold","op":"update","rows":[{"id":2,"role_id":3,"old":{"role_id":1}},{"id":5,"role_id":1}]}"#,
            r#"{"tbl":"public.e2e_fold","op":"insert","rows":[{"id":1,"role_id":2}]}"#,
        ],
    );
}

#[test]
fn rolled_back_transactions_send_nothing() {
    let (mut writer, mut listener) = watched(
        "CREATE TABLE e2e_rollback (id int PRIMARY KEY); SELECT watch_table('e2e_rollback')",
        &["public.e2e_rollback"],
    );
    writer.batch_execute("BEGIN; INSERT INTO e2e_rollback VALUES (1); ROLLBACK").unwrap();
    assert!(writer.batch_execute("BEGIN; INSERT INTO e2e_rollback VALUES (2); SELECT 1/0; COMMIT").is_err());
    writer.batch_execute("ROLLBACK; INSERT INTO e2e_rollback VALUES (3)").unwrap();
    expect(&mut listener, &[r#"{"tbl":"public.e2e_rollback","op":"insert","rows":[{"id":3}]}"#]);
}

#[test]
fn rollback_to_savepoint_drops_that_part() {
    let (mut writer, mut listener) = watched(
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
    expect(
        &mut listener,
        &[
            r#"{"tbl":"public.e2e_savepoint","op":"update","rows":[{"id":0,"v":5,"old":{"v":0}}]}"#,
            r#"{"tbl":"public.e2e_savepoint","op":"insert","rows":[{"id":1,"v":1},{"id":3,"v":3}]}"#,
        ],
    );
    // PL/pgSQL exception blocks are subtransactions too.
    writer
        .batch_execute(
            "DO $$ BEGIN
                 BEGIN INSERT INTO e2e_savepoint VALUES (4, 4); RAISE EXCEPTION 'undo'; EXCEPTION WHEN others THEN END;
                 INSERT INTO e2e_savepoint VALUES (5, 5);
             END $$",
        )
        .unwrap();
    expect(&mut listener, &[r#"{"tbl":"public.e2e_savepoint","op":"insert","rows":[{"id":5,"v":5}]}"#]);
}

#[test]
fn oversized_rows_are_sent_partial_or_as_overflow() {
    let (mut writer, mut listener) = watched(
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
    expect(
        &mut listener,
        &[
            r#"{"tbl":"public.e2e_big","op":"insert","rows":[{"id":"small","partial":true},{"id":"fine","body":"ok"}]}"#,
            r#"{"tbl":"public.e2e_big","op":"insert","overflow":true}"#,
        ],
    );
    assert_eq!(stat(&mut writer, "partial_rows"), partial + 1);
    assert_eq!(stat(&mut writer, "overflows"), overflows + 1);
    // The old value is dropped, not the write, when an update's row outgrows the payload.
    writer.batch_execute("UPDATE e2e_big SET body = repeat('y', 4000) WHERE id = 'fine'").unwrap();
    writer.batch_execute("UPDATE e2e_big SET body = repeat('z', 4000) WHERE id = 'fine'").unwrap();
    let got = receive(&mut listener, 2, Duration::from_secs(10));
    assert_eq!(got.len(), 2);
    assert!(got[0].1.ends_with(r#""old":{"body":"ok"}}]}"#), "{}", got[0].1);
    assert_eq!(got[1].1, r#"{"tbl":"public.e2e_big","op":"update","rows":[{"id":"fine","partial":true}]}"#);
    expect_silence(&mut listener);
}

#[test]
fn a_10000_row_statement_delivers_every_key_once_in_full_payloads() {
    let (mut writer, mut listener) = watched(
        "CREATE TABLE e2e_bulk (id int PRIMARY KEY, role_id int);
             SELECT watch_table('e2e_bulk', 'insert', '{role_id}')",
        &["public.e2e_bulk"],
    );
    let sent_before = stat(&mut writer, "notifications");
    writer.batch_execute("INSERT INTO e2e_bulk SELECT g, g % 7 FROM generate_series(1, 10000) g").unwrap();
    let sent = (stat(&mut writer, "notifications") - sent_before) as usize;
    let got = receive(&mut listener, sent, Duration::from_secs(10));
    assert_eq!(got.len(), sent);
    expect_silence(&mut listener);
    let mut ids = Vec::new();
    for (i, (_, payload)) in got.iter().enumerate() {
        assert!(payload.len() < 8000, "payload of {} bytes", payload.len());
        if i + 1 < got.len() {
            assert!(payload.len() > 7900, "payload {i} is not full: {} bytes", payload.len());
        }
        let v: serde_json::Value = serde_json::from_str(payload).unwrap();
        for row in v["rows"].as_array().unwrap() {
            let id = row["id"].as_i64().unwrap();
            assert_eq!(row["role_id"].as_i64().unwrap(), id % 7);
            ids.push(id);
        }
    }
    assert_eq!(ids, (1..=10000).collect::<Vec<_>>(), "every key once, in change order");
}

#[test]
fn past_the_row_limit_subscribers_are_told_to_refetch() {
    let (mut writer, mut listener) = watched(
        "CREATE TABLE e2e_limit (id int PRIMARY KEY); SELECT watch_table('e2e_limit', 'insert')",
        &["public.e2e_limit"],
    );
    writer
        .batch_execute("SET pgwatch.max_rows_per_xact = 1000; INSERT INTO e2e_limit SELECT generate_series(1, 5000)")
        .unwrap();
    let got = receive(&mut listener, 100, Duration::from_secs(5));
    let (last, rows) = got.split_last().unwrap();
    assert_eq!(last.1, r#"{"tbl":"public.e2e_limit","op":"insert","overflow":true}"#);
    let ids: BTreeSet<i64> = rows
        .iter()
        .flat_map(|(_, p)| serde_json::from_str::<serde_json::Value>(p).unwrap()["rows"].as_array().unwrap().clone())
        .map(|row| row["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, (1..=1000).collect());
}

#[test]
fn unwatch_stops_only_that_watch() {
    let (mut writer, mut listener) = watched(
        "CREATE TABLE e2e_unwatch (id int PRIMARY KEY);
             SELECT watch_table('e2e_unwatch', 'insert', label => 'e2e_unwatch_a');
             SELECT watch_table('e2e_unwatch', 'insert', label => 'e2e_unwatch_b')",
        &["e2e_unwatch_a", "e2e_unwatch_b"],
    );
    writer.batch_execute("INSERT INTO e2e_unwatch VALUES (1)").unwrap();
    let mut got = receive(&mut listener, 2, Duration::from_secs(10));
    got.sort();
    let payload = r#"{"tbl":"public.e2e_unwatch","op":"insert","rows":[{"id":1}]}"#;
    assert_eq!(got, [("e2e_unwatch_a".into(), payload.into()), ("e2e_unwatch_b".into(), payload.into())]);
    let removed: i32 = writer.query_one("SELECT unwatch_table('e2e_unwatch', 'e2e_unwatch_a')", &[]).unwrap().get(0);
    assert_eq!(removed, 1);
    writer.batch_execute("INSERT INTO e2e_unwatch VALUES (2)").unwrap();
    let got = receive(&mut listener, 1, Duration::from_secs(10));
    assert_eq!(
        got,
        [("e2e_unwatch_b".into(), r#"{"tbl":"public.e2e_unwatch","op":"insert","rows":[{"id":2}]}"#.into())]
    );
    expect_silence(&mut listener);
}

#[test]
fn drop_table_removes_the_watch_and_others_keep_working() {
    let (mut writer, mut listener) = watched(
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
    writer.batch_execute("CREATE TABLE e2e_dropped (id int PRIMARY KEY); INSERT INTO e2e_dropped VALUES (1)").unwrap();
    writer.batch_execute("INSERT INTO e2e_kept VALUES (1)").unwrap();
    expect(&mut listener, &[r#"{"tbl":"public.e2e_kept","op":"insert","rows":[{"id":1}]}"#]);
}

#[test]
fn replica_role_sends_nothing() {
    let (mut writer, mut listener) = watched(
        "CREATE TABLE e2e_replica (id int PRIMARY KEY); SELECT watch_table('e2e_replica')",
        &["public.e2e_replica"],
    );
    writer
        .batch_execute(
            "SET session_replication_role = replica; INSERT INTO e2e_replica VALUES (1);
             RESET session_replication_role; INSERT INTO e2e_replica VALUES (2)",
        )
        .unwrap();
    expect(&mut listener, &[r#"{"tbl":"public.e2e_replica","op":"insert","rows":[{"id":2}]}"#]);
}

#[test]
fn partition_rows_arrive_under_the_parent_name() {
    let (mut writer, mut listener) = watched(
        "CREATE TABLE e2e_parts (id int PRIMARY KEY) PARTITION BY RANGE (id);
             CREATE TABLE e2e_parts_low PARTITION OF e2e_parts FOR VALUES FROM (0) TO (100);
             SELECT watch_table('e2e_parts');
             CREATE TABLE e2e_parts_high PARTITION OF e2e_parts FOR VALUES FROM (100) TO (200)",
        &["public.e2e_parts"],
    );
    writer.batch_execute("INSERT INTO e2e_parts VALUES (1), (150)").unwrap();
    expect(&mut listener, &[r#"{"tbl":"public.e2e_parts","op":"insert","rows":[{"id":1},{"id":150}]}"#]);
}

#[test]
fn bad_input_fails_with_its_sqlstate_and_changes_nothing() {
    let mut client = connect();
    client
        .batch_execute(
            "CREATE TABLE e2e_bad (id int PRIMARY KEY, role_id int); CREATE TABLE e2e_bad_nokey (id int);
             CREATE VIEW e2e_bad_view AS SELECT * FROM e2e_bad; CREATE SEQUENCE e2e_bad_seq;
             CREATE ROLE e2e_bad_role; GRANT SELECT ON e2e_bad TO e2e_bad_role;
             SELECT watch_table('e2e_bad', 'insert')",
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
        ("SELECT watch_table('e2e_missing')", "42P01"),
        ("SELECT watch_table('e2e_bad', 'update', '{nope}')", "42703"),
        ("SELECT watch_table('e2e_bad', 'update', '{role_id,role_id}')", "42701"),
        ("SELECT watch_table('e2e_bad', 'update', '{id}')", "42701"),
        ("SELECT watch_table('e2e_bad', 'update', ARRAY[NULL])", "22004"),
        ("SELECT watch_table('e2e_bad', 'upsert')", "22023"),
        ("SELECT watch_table('e2e_bad', NULL)", "22004"),
        ("SELECT watch_table('e2e_bad', label => repeat('l', 64))", "42622"),
        ("SELECT watch_table('e2e_bad', label => '')", "22023"),
        ("SELECT watch_table('e2e_bad', 'update', array(SELECT 'c' || g FROM generate_series(1, 65) g))", "54011"),
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
    assert_eq!(triggers(&mut db), 4);
    db.batch_execute("DROP EXTENSION pgwatch").unwrap();
    assert_eq!(triggers(&mut db), 0);
    db.batch_execute("INSERT INTO t VALUES (1); INSERT INTO u VALUES (1)").unwrap();
    drop(db);
    admin.batch_execute("DROP DATABASE e2e_dropext").unwrap();
}

#[test]
fn stats_count_captured_and_sent_rows() {
    let (mut writer, mut listener) =
        watched("CREATE TABLE e2e_stats (id int PRIMARY KEY); SELECT watch_table('e2e_stats')", &["public.e2e_stats"]);
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
    let payload = r#"{"tbl":"public.e2e_stats","op":"insert","rows":[{"id":1}]}"#;
    expect(&mut listener, &[payload]);
    let after = read(&mut writer);
    let delta: Vec<i64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(delta, [3, 1, 1, payload.len() as i64], "captured, sent, notifications, bytes");
}

#[test]
fn ddl_on_watched_columns_never_fails_a_write() {
    let (mut writer, mut listener) = watched(
        "CREATE TABLE e2e_ddl (id int PRIMARY KEY, role_id int, name text);
             SELECT watch_table('e2e_ddl', '*', '{role_id}')",
        &["public.e2e_ddl"],
    );
    // A type change is followed: the plan is rebuilt from the new descriptor.
    writer
        .batch_execute("ALTER TABLE e2e_ddl ALTER COLUMN role_id TYPE text; INSERT INTO e2e_ddl VALUES (1, 'x', 'a')")
        .unwrap();
    expect(&mut listener, &[r#"{"tbl":"public.e2e_ddl","op":"insert","rows":[{"id":1,"role_id":"x"}]}"#]);
    // A renamed or dropped watched column: writes succeed, subscribers are told to refetch.
    writer.batch_execute("ALTER TABLE e2e_ddl RENAME COLUMN role_id TO role; UPDATE e2e_ddl SET name = 'b'").unwrap();
    expect(&mut listener, &[r#"{"tbl":"public.e2e_ddl","op":"update","overflow":true}"#]);
    writer.batch_execute("ALTER TABLE e2e_ddl DROP COLUMN role; DELETE FROM e2e_ddl").unwrap();
    expect(&mut listener, &[r#"{"tbl":"public.e2e_ddl","op":"delete","overflow":true}"#]);
    // Watching again picks up the new shape.
    writer.batch_execute("SELECT watch_table('e2e_ddl', '*', '{name}'); INSERT INTO e2e_ddl VALUES (2, 'c')").unwrap();
    expect(&mut listener, &[r#"{"tbl":"public.e2e_ddl","op":"insert","rows":[{"id":2,"name":"c"}]}"#]);
}
