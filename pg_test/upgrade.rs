//! End-to-end tests of upgrades from every earlier release (watches keep firing, and the updated
//! extension has exactly a fresh install's objects) and of pg_dump / pg_restore.

use postgres::Client;

use super::support::{connect, connect_to, database, failure, per_row, serial, without_locations, Listener};

/// A fresh database `name` with pgwatch `version` installed from its released install script
/// `sql` (cargo-pgrx installs only this version's script and the upgrade scripts).
fn released(admin: &mut Client, name: &str, version: &str, sql: &str) -> Client {
    let sharedir: String =
        admin.query_one("SELECT setting FROM pg_config WHERE name = 'SHAREDIR'", &[]).unwrap().get(0);
    std::fs::write(format!("{sharedir}/extension/pgwatch--{version}.sql"), sql).unwrap();
    database(admin, name, Some(version))
}

/// Asserts that the extension's objects in `db` (after an update) equal a fresh install's.
fn same_objects_as_a_fresh_install(admin: &mut Client, db: &mut Client) {
    let objects = |client: &mut Client| -> Vec<String> {
        client
        .query(
            "SELECT pg_describe_object(classid, objid, objsubid)
                    || coalesce(' ' || pg_get_function_identity_arguments(p.oid) || ' -> ' || p.prorettype::regtype
                                || ' ' || p.provolatile::text || p.proisstrict || ' ' || p.prosrc || array_to_string(p.proconfig, ','), '')
                    || coalesce(' ' || (SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                                                          || a.attnotnull || coalesce(pg_get_expr(d.adbin, d.adrelid), ''), ', ' ORDER BY a.attnum)
                                          FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                                         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '')
                    || coalesce(' ' || e.evtevent || array_to_string(e.evttags, ','), '')
               FROM pg_depend dep
               LEFT JOIN pg_proc p ON dep.classid = 'pg_proc'::regclass AND p.oid = dep.objid
               LEFT JOIN pg_class c ON dep.classid = 'pg_class'::regclass AND c.oid = dep.objid
               LEFT JOIN pg_event_trigger e ON dep.classid = 'pg_event_trigger'::regclass AND e.oid = dep.objid
              WHERE dep.refclassid = 'pg_extension'::regclass AND dep.deptype = 'e'
                AND dep.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pgwatch')
              ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get::<_, String>(0))
        // The test build adds its #[pg_test] functions to the extension.
        .filter(|object| object != "schema tests" && !object.starts_with("function tests."))
        .collect()
    };
    let mut fresh = database(admin, "o_fresh", None);
    let (updated, fresh_objects) = (objects(db), objects(&mut fresh));
    let only_updated: Vec<&String> = updated.iter().filter(|o| !fresh_objects.contains(o)).collect();
    let only_fresh: Vec<&String> = fresh_objects.iter().filter(|o| !updated.contains(o)).collect();
    assert_eq!((only_updated, only_fresh), (vec![], vec![]), "objects of the updated and of a fresh install differ");
    drop(fresh);
    admin.batch_execute("DROP DATABASE o_fresh WITH (FORCE)").unwrap();
}

#[test]
fn watches_made_with_0_1_0_keep_firing_after_alter_extension_update() {
    let _serial = serial();
    let mut admin = connect();
    let mut db = released(&mut admin, "o_upgrade", "0.1.0", include_str!("../sql/released/pgwatch--0.1.0.sql"));
    db.batch_execute(
        "CREATE TABLE users (id int PRIMARY KEY, role_id int, name text);
         SELECT watch_table('users', '*', '{role_id}');
         SELECT watch_table('users', 'delete', label => 'gone_users')",
    )
    .unwrap();
    let mut listener = Listener::new(connect_to(&mut admin, "o_upgrade"), &["public.users", "gone_users"]);
    db.batch_execute("INSERT INTO users VALUES (1, 1, 'a')").unwrap();
    listener.expect_on(&[("public.users", r#"{"tbl":"public.users","op":"insert","rows":[{"id":1,"role_id":1}]}"#)]);

    db.batch_execute("ALTER EXTENSION pgwatch UPDATE").unwrap();
    let version: String =
        db.query_one("SELECT extversion FROM pg_extension WHERE extname = 'pgwatch'", &[]).unwrap().get(0);
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    db.batch_execute("UPDATE users SET role_id = 2").unwrap();
    listener.expect_on(&[(
        "public.users",
        r#"{"tbl":"public.users","op":"update","rows":[{"id":1,"role_id":2,"old":{"role_id":1}}]}"#,
    )]);
    db.batch_execute("DELETE FROM users").unwrap();
    listener.expect_on(&[
        ("public.users", r#"{"tbl":"public.users","op":"delete","rows":[{"id":1,"role_id":2}]}"#),
        ("gone_users", r#"{"tbl":"public.users","op":"delete","rows":[{"id":1}]}"#),
    ]);
    // The watches now have a trigger per event, and the new options work.
    let triggers: Vec<String> = db
        .query("SELECT tgname::text FROM pg_trigger WHERE tgrelid = 'users'::regclass ORDER BY tgname", &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    // (A watch that does not report truncate has a TRUNCATE trigger too, which sends a resync.)
    assert_eq!(
        triggers,
        [
            "pgwatch_1_delete",
            "pgwatch_1_insert",
            "pgwatch_1_truncate",
            "pgwatch_1_update",
            "pgwatch_2_delete",
            "pgwatch_2_truncate"
        ]
    );
    db.batch_execute("SELECT watch_table('users', 'insert, truncate', label => 'gone_users'); TRUNCATE users").unwrap();
    listener.expect_on(&[
        ("gone_users", r#"{"tbl":"public.users","op":"truncate"}"#),
        // Defined again with other events: its subscribers refetch.
        ("gone_users", r#"{"tbl":"public.users","op":"resync"}"#),
        // The plain watch does not report truncate: its subscribers refetch.
        ("public.users", r#"{"tbl":"public.users","op":"resync"}"#),
    ]);

    same_objects_as_a_fresh_install(&mut admin, &mut db);
    drop((db, listener));
    admin.batch_execute("DROP DATABASE o_upgrade WITH (FORCE)").unwrap();
}

#[test]
fn watches_made_with_0_2_0_get_statement_triggers_and_compact_payloads_after_update() {
    let _serial = serial();
    let mut admin = connect();
    let mut db = released(&mut admin, "o_upgrade", "0.2.0", include_str!("../sql/released/pgwatch--0.2.0.sql"));
    db.batch_execute(
        "CREATE TABLE users (id int PRIMARY KEY, role_id int, name text);
         SELECT watch_table('users', '*', '{role_id}');
         SELECT watch_table('users', 'update', label => 'renamed_users', trigger_columns => '{name}');
         SELECT watch_table('users', 'insert', label => 'big_users', condition => $$NEW.role_id > 5$$)",
    )
    .unwrap();
    let quals = |db: &mut Client| -> Vec<String> {
        db.query("SELECT tgqual::text FROM pg_trigger WHERE tgrelid = 'users'::regclass AND tgqual IS NOT NULL ORDER BY tgname", &[])
            .unwrap()
            .iter()
            .map(|row| without_locations(row.get(0)))
            .collect()
    };
    let quals_before = quals(&mut db);
    assert_eq!(quals_before.len(), 2);
    let failed = failure(&mut db, "SELECT watch_table('users', label => 'compact_users', payload => 'compact')");
    assert_eq!(failed.0, "23514", "0.2.0's catalog does not take compact watches: {}", failed.1);
    // Until the update adds the DDL event trigger statement triggers rely on, watches keep row
    // triggers (made by this library, which serves 0.2.0's SQL).
    assert_eq!(per_row(&mut db, "users"), [true; 5]);
    let mut listener = Listener::new(
        connect_to(&mut admin, "o_upgrade"),
        &["public.users", "renamed_users", "compact_users", "big_users"],
    );
    db.batch_execute("INSERT INTO users VALUES (0, 0, 'z')").unwrap();
    listener.expect_on(&[("public.users", r#"{"tbl":"public.users","op":"insert","rows":[{"id":0,"role_id":0}]}"#)]);
    db.batch_execute("UPDATE users SET name = 'y'").unwrap();
    listener.expect_on(&[
        ("public.users", r#"{"tbl":"public.users","op":"update","rows":[{"id":0,"role_id":0}]}"#),
        ("renamed_users", r#"{"tbl":"public.users","op":"update","rows":[{"id":0}]}"#),
    ]);
    db.batch_execute("DELETE FROM users").unwrap();
    listener.expect_on(&[("public.users", r#"{"tbl":"public.users","op":"delete","rows":[{"id":0,"role_id":0}]}"#)]);

    db.batch_execute("ALTER EXTENSION pgwatch UPDATE").unwrap();
    let version: String =
        db.query_one("SELECT extversion FROM pg_extension WHERE extname = 'pgwatch'", &[]).unwrap().get(0);
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    // Defined again by the update: the plain watch reads transition tables, the one with
    // trigger_columns keeps its row trigger.
    let levels: Vec<String> = db
        .query(
            "SELECT tgname || CASE WHEN (tgtype & 1) = 1 THEN ' row' ELSE ' statement' END || ' ' || tgnargs
               FROM pg_trigger WHERE tgrelid = 'users'::regclass ORDER BY tgname",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        levels,
        [
            "pgwatch_1_delete statement 1",
            "pgwatch_1_insert statement 1",
            "pgwatch_1_truncate statement 1",
            "pgwatch_1_update statement 1",
            "pgwatch_2_truncate statement 1",
            "pgwatch_2_update row 1",
            "pgwatch_3_insert row 1",
            "pgwatch_3_truncate statement 1"
        ]
    );
    // The WHEN conditions came through the update as PostgreSQL stored them, never parsed again.
    assert_eq!(quals(&mut db), quals_before);
    db.batch_execute("INSERT INTO users VALUES (7, 7, 'big')").unwrap();
    listener.expect_on(&[
        ("public.users", r#"{"tbl":"public.users","op":"insert","rows":[{"id":7,"role_id":7}]}"#),
        ("big_users", r#"{"tbl":"public.users","op":"insert","rows":[{"id":7}]}"#),
    ]);
    db.batch_execute("DELETE FROM users").unwrap();
    listener.expect_on(&[("public.users", r#"{"tbl":"public.users","op":"delete","rows":[{"id":7,"role_id":7}]}"#)]);
    db.batch_execute("SELECT watch_table('users', label => 'compact_users', payload => 'compact')").unwrap();
    db.batch_execute("INSERT INTO users VALUES (1, 1, 'a')").unwrap();
    listener.expect_on(&[
        ("public.users", r#"{"tbl":"public.users","op":"insert","rows":[{"id":1,"role_id":1}]}"#),
        ("compact_users", r#"{"tbl":"public.users","op":"insert","cols":["id"],"rows":[[1]]}"#),
    ]);
    db.batch_execute("UPDATE users SET name = 'b'").unwrap();
    listener.expect_on(&[
        ("public.users", r#"{"tbl":"public.users","op":"update","rows":[{"id":1,"role_id":1}]}"#),
        ("renamed_users", r#"{"tbl":"public.users","op":"update","rows":[{"id":1}]}"#),
        ("compact_users", r#"{"tbl":"public.users","op":"update","cols":["id"],"rows":[[1]]}"#),
    ]);
    same_objects_as_a_fresh_install(&mut admin, &mut db);
    drop((db, listener));
    admin.batch_execute("DROP DATABASE o_upgrade WITH (FORCE)").unwrap();
}

#[test]
fn watches_made_with_0_3_0_keep_firing_after_update_and_can_keep_their_payloads() {
    let _serial = serial();
    let mut admin = connect();
    let mut db = released(&mut admin, "o_upgrade", "0.3.0", include_str!("../sql/released/pgwatch--0.3.0.sql"));
    db.batch_execute(
        "CREATE TABLE users (id int PRIMARY KEY, name text);
         SELECT watch_table('users', extra_columns => '{name}', payload => 'compact')",
    )
    .unwrap();
    let mut listener = Listener::new(connect_to(&mut admin, "o_upgrade"), &["public.users"]);
    // This library with 0.3.0's SQL: the watch fires, and pgwatch.stats() still answers.
    listener.expect_after(
        &mut db,
        "INSERT INTO users VALUES (1, 'a')",
        &[r#"{"tbl":"public.users","op":"insert","cols":["id","name"],"rows":[[1,"a"]]}"#],
    );
    db.batch_execute("SELECT * FROM pgwatch.stats()").unwrap();
    // 0.3.0 made no TRUNCATE trigger for a watch that does not report truncate (with its event
    // trigger off for a moment, pgwatch lets this one go).
    db.batch_execute(
        "ALTER EVENT TRIGGER pgwatch_sql_drop DISABLE;
         DO $$ BEGIN EXECUTE (SELECT format('DROP TRIGGER %I ON users', tgname) FROM pg_trigger
                               WHERE tgrelid = 'users'::regclass AND tgname LIKE '%_truncate'); END $$;
         ALTER EVENT TRIGGER pgwatch_sql_drop ENABLE ALWAYS",
    )
    .unwrap();
    db.batch_execute("ALTER EXTENSION pgwatch UPDATE").unwrap();
    listener.expect_after(
        &mut db,
        "UPDATE users SET name = 'b'",
        &[r#"{"tbl":"public.users","op":"update","cols":["id","name"],"rows":[[1,"b",{"old":[1,"a"]}]]}"#],
    );
    // The update made the watch's triggers again: a TRUNCATE has its subscribers refetch.
    listener.expect_after(
        &mut db,
        "BEGIN; TRUNCATE users; INSERT INTO users VALUES (1, 'b'); COMMIT",
        &[
            r#"{"tbl":"public.users","op":"insert","cols":["id","name"],"rows":[[1,"b"]]}"#,
            r#"{"tbl":"public.users","op":"resync"}"#,
        ],
    );
    db.batch_execute(
        "SELECT watch_table('users', extra_columns => '{name}', payload => 'compact', retain => '1 hour')",
    )
    .unwrap();
    let start: i64 = db.query_one("SELECT pgwatch.position('public.users')", &[]).unwrap().get(0);
    // A new feed numbers on from the clock: a subscriber sees the jump, and refetches once.
    let mut listener = Listener::new(connect_to(&mut admin, "o_upgrade"), &["public.users"]);
    listener.expect_after(
        &mut db,
        "DELETE FROM users",
        &[r#"{"tbl":"public.users","op":"delete","cols":["id","name"],"rows":[[1,"b"]]}"#],
    );
    let replayed: i64 =
        db.query_one("SELECT count(*) FROM pgwatch.replay('public.users', $1)", &[&start]).unwrap().get(0);
    assert_eq!(replayed, 1);
    same_objects_as_a_fresh_install(&mut admin, &mut db);
    drop((db, listener));
    admin.batch_execute("DROP DATABASE o_upgrade WITH (FORCE)").unwrap();
}

#[test]
fn an_update_goes_past_a_watched_table_another_transaction_keeps_locked() {
    let _serial = serial();
    let mut admin = connect();
    let mut db = released(&mut admin, "o_upgrade_locked", "0.3.0", include_str!("../sql/released/pgwatch--0.3.0.sql"));
    db.batch_execute(
        "CREATE TABLE locked (id int PRIMARY KEY); SELECT watch_table('locked', 'insert');
         CREATE TABLE free (id int PRIMARY KEY); SELECT watch_table('free', 'insert')",
    )
    .unwrap();
    // As 0.3.0 made them: no TRUNCATE trigger for a watch that does not report truncate (see
    // above); the update makes one, as it makes a watch's triggers again.
    db.batch_execute(
        "ALTER EVENT TRIGGER pgwatch_sql_drop DISABLE;
         DO $$ DECLARE t record; BEGIN
             FOR t IN SELECT tgname, tgrelid::regclass AS tbl FROM pg_trigger WHERE tgname LIKE 'pgwatch%truncate' LOOP
                 EXECUTE format('DROP TRIGGER %I ON %s', t.tgname, t.tbl);
             END LOOP;
         END $$;
         ALTER EVENT TRIGGER pgwatch_sql_drop ENABLE ALWAYS",
    )
    .unwrap();
    // A table owner's transaction that stays open with its table locked: the update waits for
    // it only so long, and the watch keeps its 0.3.0 triggers (with a WARNING).
    let mut holder = connect_to(&mut admin, "o_upgrade_locked");
    holder.batch_execute("BEGIN; LOCK TABLE locked IN ACCESS EXCLUSIVE MODE").unwrap();
    db.batch_execute("ALTER EXTENSION pgwatch UPDATE").unwrap();
    holder.batch_execute("ROLLBACK").unwrap();
    let mut listener = Listener::new(connect_to(&mut admin, "o_upgrade_locked"), &["public.locked", "public.free"]);
    listener.expect_after(
        &mut db,
        "INSERT INTO locked VALUES (1)",
        &[r#"{"tbl":"public.locked","op":"insert","rows":[{"id":1}]}"#],
    );
    listener.expect_after(
        &mut db,
        "INSERT INTO free VALUES (1)",
        &[r#"{"tbl":"public.free","op":"insert","rows":[{"id":1}]}"#],
    );
    // The update made the free table's triggers again, not the locked one's; watch_table() does.
    let truncate_triggers = |db: &mut Client| -> Vec<String> {
        let rows = db
            .query(
                "SELECT tgrelid::regclass::text FROM pg_trigger WHERE tgname LIKE 'pgwatch%truncate' ORDER BY 1",
                &[],
            )
            .unwrap();
        rows.iter().map(|row| row.get(0)).collect()
    };
    assert_eq!(truncate_triggers(&mut db), ["free"]);
    db.batch_execute("SELECT watch_table('locked', 'insert')").unwrap();
    assert_eq!(truncate_triggers(&mut db), ["free", "locked"]);
    drop((db, listener, holder));
    admin.batch_execute("DROP DATABASE o_upgrade_locked WITH (FORCE)").unwrap();
}

#[test]
fn pg_dump_and_pg_restore_keep_watches() {
    let _serial = serial();
    let mut admin = connect();
    let row = admin
        .query_one("SELECT inet_server_port(), current_user::text, setting FROM pg_config WHERE name = 'BINDIR'", &[])
        .unwrap();
    let (port, user, bindir): (i32, String, String) = (row.get(0), row.get(1), row.get(2));
    let mut source = database(&mut admin, "o_dump", None);
    source
        .batch_execute(
            "CREATE TABLE orders (id int PRIMARY KEY, status text, total numeric);
             SELECT watch_table('orders', 'insert, update, truncate', '{status}', trigger_columns => '{status}',
                                condition => $$NEW.total > 0$$, fire_on_replica => true);
             SELECT watch_table('orders', 'delete', label => 'orders_gone', payload => 'keys');
             -- Row triggers for a self-referencing foreign key, statement triggers for a plain table:
             -- restored one trigger at a time, before the foreign key.
             CREATE TABLE tree (id int PRIMARY KEY, parent int REFERENCES tree ON DELETE CASCADE);
             SELECT watch_table('tree', payload => 'compact');
             -- A watch that reports neither update nor truncate: its TRUNCATE trigger is restored
             -- after the others, and pgwatch must not make it first.
             SELECT watch_table('tree', 'delete', label => 'tree_gone');
             CREATE TABLE notes (id int PRIMARY KEY);
             SELECT watch_table('notes', retain => '2 hours')",
        )
        .unwrap();
    let watches = |client: &mut Client| -> Vec<String> {
        client
            .query("SELECT w::text FROM pgwatch.watches w ORDER BY id", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let triggers = |client: &mut Client| -> Vec<String> {
        client
            .query(
                "SELECT pg_get_triggerdef(oid) || tgenabled::text FROM pg_trigger
                  WHERE tgfoid = 'pgwatch.capture'::regproc ORDER BY tgrelid::regclass::text, tgname",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    // Named by port: suites of different versions may run at the same time.
    let dump = std::env::temp_dir().join(format!("pgwatch-o_dump-{port}.dump"));
    let status = std::process::Command::new(format!("{bindir}/pg_dump"))
        .args(["-Fc", "-h", "localhost", "-p", &port.to_string(), "-U", &user, "-d", "o_dump", "-f"])
        .arg(&dump)
        .status()
        .unwrap();
    assert!(status.success(), "pg_dump failed");
    admin.batch_execute("DROP DATABASE IF EXISTS o_restored WITH (FORCE)").unwrap();
    admin.batch_execute("CREATE DATABASE o_restored").unwrap();
    let status = std::process::Command::new(format!("{bindir}/pg_restore"))
        .args(["--exit-on-error", "-h", "localhost", "-p", &port.to_string(), "-U", &user, "-d", "o_restored"])
        .arg(&dump)
        .status()
        .unwrap();
    assert!(status.success(), "pg_restore failed");
    let mut restored = connect_to(&mut admin, "o_restored");
    assert_eq!(watches(&mut restored), watches(&mut source));
    assert_eq!(triggers(&mut restored), triggers(&mut source));
    let restored_triggers = triggers(&mut restored);
    let count = |table: &str, level: &str| {
        restored_triggers.iter().filter(|t| t.contains(&format!("ON public.{table} ")) && t.contains(level)).count()
    };
    assert_eq!((count("notes", "FOR EACH STATEMENT"), count("tree", "FOR EACH ROW")), (4, 4));
    let mut listener = Listener::new(connect_to(&mut admin, "o_restored"), &["public.orders", "orders_gone"]);
    // One statement at a time: the worker would fold changes that reach it together.
    restored.batch_execute("INSERT INTO orders VALUES (1, 'new', 0), (2, 'new', 5)").unwrap();
    listener
        .expect_on(&[("public.orders", r#"{"tbl":"public.orders","op":"insert","rows":[{"id":2,"status":"new"}]}"#)]);
    restored.batch_execute("UPDATE orders SET status = 'paid'").unwrap();
    listener.expect_on(&[(
        "public.orders",
        r#"{"tbl":"public.orders","op":"update","rows":[{"id":2,"status":"paid","old":{"status":"new"}}]}"#,
    )]);
    restored.batch_execute("DELETE FROM orders WHERE id = 1").unwrap();
    listener.expect_on(&[("orders_gone", r#"{"tbl":"public.orders","op":"delete","rows":[{"id":1}]}"#)]);
    // A new watch does not collide with the restored ones.
    restored.batch_execute("SELECT watch_table('orders', 'insert', label => 'orders_new')").unwrap();
    assert_eq!(watches(&mut restored).len(), 6);
    drop((source, restored, listener));
    std::fs::remove_file(dump).unwrap();
    admin.batch_execute("DROP DATABASE o_dump WITH (FORCE)").unwrap();
    admin.batch_execute("DROP DATABASE o_restored WITH (FORCE)").unwrap();
}
