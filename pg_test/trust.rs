//! End-to-end tests of what a hostile table owner can and cannot do through pgwatch, and of
//! payload streams a subscriber following the README's rules can rebuild each table from.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use postgres::{Client, NoTls};

use super::support::{
    config_to, connect, connect_to, database, eventually, failure, owned_database, serial, stat, watched,
    without_locations, Listener, MODES, WAIT,
};

/// A connection acting as `mallory`, a role with no privileges but its own schema, where its
/// tables go; dropped and made again for each test.
fn mallory(admin: &mut Client) -> Client {
    admin
        .batch_execute(
            "DROP SCHEMA IF EXISTS mallory CASCADE; DROP SCHEMA IF EXISTS adm CASCADE; DROP ROLE IF EXISTS mallory;
             CREATE ROLE mallory NOSUPERUSER; CREATE SCHEMA mallory AUTHORIZATION mallory",
        )
        .unwrap();
    let mut client = connect();
    client.batch_execute("SET ROLE mallory; SET search_path = mallory, public").unwrap();
    client
}

fn is_superuser(admin: &mut Client, role: &str) -> bool {
    admin.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&role]).unwrap().get(0)
}

#[test]
fn a_condition_is_never_parsed_again_under_other_settings() {
    let _serial = serial();
    let mut admin = connect();
    let mut m = mallory(&mut admin);
    m.batch_execute("CREATE TABLE m (id int PRIMARY KEY, v text); CREATE TABLE m_seen (id int)").unwrap();
    // Under standard_conforming_strings = on this is one expression; pasted again under off, the
    // first string would end early and the rest run as statements of the extension's owner.
    let condition = r#"NEW.v = '\' AND NEW.v = ')) EXECUTE FUNCTION pgwatch.capture($q${"a","b","1","id"}$q$); ALTER ROLE mallory SUPERUSER; CREATE TRIGGER zz AFTER INSERT ON mallory.m2 FOR EACH ROW WHEN ((true --'"#;
    m.batch_execute(&format!(
        "SET standard_conforming_strings = on;
         SELECT watch_table('m', 'insert', condition => $c${condition}$c$);
         SET standard_conforming_strings = off"
    ))
    .unwrap();
    let stored: String =
        admin.query_one("SELECT condition FROM pgwatch.watches WHERE tbl = 'mallory.m'::regclass", &[]).unwrap().get(0);
    assert_eq!(stored, condition, "the condition is kept as given, for reference");
    let qual = |admin: &mut Client| -> String {
        admin
            .query_one(
                "SELECT tgqual::text FROM pg_trigger
                  WHERE tgname LIKE 'pgwatch_%' AND tgrelid::regclass::text LIKE 'mallory.m%' AND tgqual IS NOT NULL",
                &[],
            )
            .unwrap()
            .get(0)
    };
    let before = qual(&mut admin);
    m.batch_execute("ALTER TABLE m RENAME TO m2").unwrap();
    // The rebuilt trigger has the very expression the first one had (but the places in the
    // condition's text that parse nodes remember for error messages).
    assert_eq!(without_locations(&qual(&mut admin)), without_locations(&before));
    m.batch_execute("RESET standard_conforming_strings").unwrap();
    assert!(!is_superuser(&mut admin, "mallory"), "the condition ran as a statement");
    let triggers: Vec<String> = admin
        .query("SELECT tgname::text FROM pg_trigger WHERE tgrelid = 'mallory.m2'::regclass ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    // The watch's own two: insert, and truncate (a resync, as the watch does not report it).
    assert_eq!(triggers.len(), 2, "{triggers:?}");
    assert!(triggers[0].starts_with("pgwatch_") && triggers[0].ends_with("_insert"), "{triggers:?}");
    assert!(triggers[1].starts_with("pgwatch_") && triggers[1].ends_with("_truncate"), "{triggers:?}");
    drop(m);
    admin.batch_execute("DROP SCHEMA mallory CASCADE; DROP ROLE mallory").unwrap();
}

#[test]
fn a_condition_resolves_names_with_its_authors_rights() {
    let _serial = serial();
    let mut admin = connect();
    let mut m = mallory(&mut admin);
    admin
        .batch_execute(
            "CREATE SCHEMA adm;
             CREATE FUNCTION adm.privileged(text) RETURNS boolean LANGUAGE sql AS $$ SELECT true $$;
             REVOKE ALL ON SCHEMA adm FROM PUBLIC",
        )
        .unwrap();
    m.batch_execute("CREATE TABLE m (id int PRIMARY KEY)").unwrap();
    let (code, message) = failure(&mut m, "SELECT watch_table('m', 'insert', condition => $$adm.privileged('x')$$)");
    assert_eq!(code, "42501", "{message}");
    let watches: i64 =
        admin.query_one("SELECT count(*) FROM pgwatch.watches WHERE tbl::text LIKE 'mallory.%'", &[]).unwrap().get(0);
    assert_eq!(watches, 0);
    // With USAGE, the same condition is fine.
    admin.batch_execute("GRANT USAGE ON SCHEMA adm TO mallory").unwrap();
    m.batch_execute("SELECT watch_table('m', 'insert', condition => $$adm.privileged('x')$$)").unwrap();
    drop(m);
    // The watch's trigger depends on the function its condition calls: the table goes first.
    admin.batch_execute("DROP SCHEMA mallory CASCADE; DROP SCHEMA adm CASCADE; DROP ROLE mallory").unwrap();
}

#[test]
fn a_hand_made_trigger_cannot_stop_delivery_for_others() {
    let _serial = serial();
    let mut admin = connect();
    let mut m = mallory(&mut admin);
    let (mut writer, mut listener) = watched(
        "worker",
        "CREATE TABLE t_victim (id int PRIMARY KEY); SELECT watch_table('t_victim')",
        &["public.t_victim"],
    );
    let long_channel = "c".repeat(70);
    let long_table = "t".repeat(400);
    m.batch_execute(&format!(
        r#"CREATE TABLE evil (id int PRIMARY KEY);
           CREATE TRIGGER evil AFTER INSERT ON evil REFERENCING NEW TABLE AS n FOR EACH STATEMENT
             EXECUTE FUNCTION pgwatch.capture('{{"{long_channel}","mallory.evil","1","id"}}');
           CREATE TABLE evil2 (id int PRIMARY KEY);
           CREATE TRIGGER evil2 AFTER INSERT ON evil2 FOR EACH ROW
             EXECUTE FUNCTION pgwatch.capture('{{"evil2","{long_table}","1","id"}}');
           CREATE TABLE evil3 (id int PRIMARY KEY);
           CREATE TRIGGER evil3 AFTER INSERT ON evil3 FOR EACH ROW
             EXECUTE FUNCTION pgwatch.capture('{{"evil3","mallory.evil3","7","id"}}')"#
    ))
    .unwrap();
    m.batch_execute("SET pgwatch.delivery = worker").unwrap();
    for table in ["evil", "evil2", "evil3"] {
        let (code, message) = failure(&mut m, &format!("INSERT INTO {table} VALUES (1)"));
        assert_eq!(code, "39P01", "{table}: {message}");
    }
    listener.expect_after(
        &mut writer,
        "INSERT INTO t_victim VALUES (1)",
        &[r#"{"tbl":"public.t_victim","op":"insert","rows":[{"id":1}]}"#],
    );
    // Named as a trigger of her own watch and sending on its channel, but folding by another
    // column than the key, sending a column twice or in another layout. On a partition, whose
    // triggers pgwatch does not remake when one is added (it does on the watched table itself).
    for (n, fields) in
        [r#""1","grp","id""#, r#""1","id","grp","grp""#, r#""1 compact","id","grp""#].into_iter().enumerate()
    {
        let table = format!("forged_{n}");
        m.batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, grp text) PARTITION BY RANGE (id);
             CREATE TABLE {table}_1 PARTITION OF {table} FOR VALUES FROM (0) TO (100);
             SELECT watch_table('{table}', extra_columns => '{{grp}}')"
        ))
        .unwrap();
        let id: i64 = m
            .query_one("SELECT id FROM pgwatch.watches WHERE channel = $1", &[&format!("mallory.{table}")])
            .unwrap()
            .get(0);
        let argument = format!(r#"{{"mallory.{table}","mallory.{table}",{fields}}}"#);
        m.batch_execute(&format!(
            "CREATE TRIGGER pgwatch_{id} AFTER INSERT ON {table}_1 FOR EACH ROW EXECUTE FUNCTION pgwatch.capture('{argument}')"
        ))
        .unwrap();
        let (code, message) = failure(&mut m, &format!("INSERT INTO {table} VALUES (1, 'g'), (2, 'g')"));
        assert_eq!(code, "39P01", "{argument}: {message}");
    }
    drop(m);
    admin.batch_execute("DROP SCHEMA mallory CASCADE; DROP ROLE mallory").unwrap();
}

#[test]
fn only_a_role_with_the_owners_rights_can_mute_a_table() {
    let _serial = serial();
    let mut admin = connect();
    let mut m = mallory(&mut admin);
    let (mut writer, mut listener) = watched(
        "inline",
        "CREATE TABLE t_mute (id int PRIMARY KEY); SELECT watch_table('t_mute');
         GRANT INSERT ON t_mute TO mallory",
        &["public.t_mute", "mallory.m_mute"],
    );
    m.batch_execute("CREATE TABLE m_mute (id int PRIMARY KEY); SELECT watch_table('m_mute')").unwrap();
    // A writer who does not own the table cannot hide its changes; on its own table it can.
    m.batch_execute("SET pgwatch.mute = on; INSERT INTO public.t_mute VALUES (1); INSERT INTO m_mute VALUES (1)")
        .unwrap();
    listener.expect(&[r#"{"tbl":"public.t_mute","op":"insert","rows":[{"id":1}]}"#]);
    // The owner (here a superuser) can.
    writer.batch_execute("SET pgwatch.mute = on; INSERT INTO t_mute VALUES (2)").unwrap();
    listener.expect_silence();
    // Not through a function of another role's that leaves it on for the caller's session.
    m.batch_execute(
        "CREATE FUNCTION quiet() RETURNS text LANGUAGE sql SECURITY DEFINER
             AS $$ SELECT set_config('pgwatch.mute', 'on', false) $$",
    )
    .unwrap();
    writer.batch_execute("RESET pgwatch.mute; SELECT mallory.quiet()").unwrap();
    let shown: String = writer.query_one("SHOW pgwatch.mute", &[]).unwrap().get(0);
    assert_eq!(shown, "on", "the function left it on");
    listener.expect_after(
        &mut writer,
        "INSERT INTO t_mute VALUES (3)",
        &[r#"{"tbl":"public.t_mute","op":"insert","rows":[{"id":3}]}"#],
    );
    writer.batch_execute("RESET pgwatch.mute").unwrap();
    drop(m);
    admin.batch_execute("DROP SCHEMA mallory CASCADE; REVOKE ALL ON t_mute FROM mallory; DROP ROLE mallory").unwrap();
}

#[test]
fn a_default_for_a_database_or_role_cannot_mute_anyones_writes() {
    let _serial = serial();
    let mut admin = connect();
    let mut db = owned_database(&mut admin, "t_mutedb", "t_dbowner");
    // The database's owner may set defaults for its database; PostgreSQL checks them only where
    // they apply, as it does a function's SET clause.
    db.batch_execute(
        "CREATE EXTENSION pgwatch; CREATE TABLE t (id int PRIMARY KEY); SELECT watch_table('t', 'insert');
         SET ROLE t_dbowner; ALTER DATABASE t_mutedb SET pgwatch.mute = on; RESET ROLE;
         ALTER ROLE CURRENT_USER IN DATABASE t_mutedb SET pgwatch.mute = on",
    )
    .unwrap();
    let mut listener = Listener::new(connect_to(&mut admin, "t_mutedb"), &["public.t"]);
    // A new session, here the table owner's, is told and not muted.
    let notices = Arc::new(Mutex::new(Vec::new()));
    let seen = notices.clone();
    let mut writer = config_to(&mut admin, "t_mutedb")
        .notice_callback(move |n| seen.lock().unwrap().push(format!("{}: {}", n.severity(), n.message())))
        .connect(NoTls)
        .unwrap();
    let mute: String = writer.query_one("SHOW pgwatch.mute", &[]).unwrap().get(0);
    assert_eq!(mute, "off");
    let told = notices.lock().unwrap().clone();
    assert!(
        told.iter()
            .filter(|n| *n == "WARNING: pgwatch.mute = on is refused as a default of the server, a database or a role")
            .count()
            == 2,
        "both defaults refused aloud: {told:?}"
    );
    listener.expect_after(
        &mut writer,
        "INSERT INTO t VALUES (1)",
        &[r#"{"tbl":"public.t","op":"insert","rows":[{"id":1}]}"#],
    );
    // What the session chooses itself still counts.
    writer.batch_execute("SET pgwatch.mute = on; INSERT INTO t VALUES (2)").unwrap();
    listener.expect_silence();
    drop((db, listener, writer));
    admin.batch_execute("DROP DATABASE t_mutedb WITH (FORCE)").unwrap();
    admin.batch_execute("DROP ROLE t_dbowner").unwrap();
}

#[test]
fn someone_elses_drop_database_leaves_its_worker_alone() {
    let _serial = serial();
    let mut admin = connect();
    let mut m = mallory(&mut admin);
    let (mut writer, mut listener) = watched(
        "worker",
        "CREATE TABLE t_dropdb (id int PRIMARY KEY); SELECT watch_table('t_dropdb')",
        &["public.t_dropdb"],
    );
    let insert = |n: i32| format!(r#"{{"tbl":"public.t_dropdb","op":"insert","rows":[{{"id":{n}}}]}}"#);
    listener.expect_after(&mut writer, "INSERT INTO t_dropdb VALUES (1)", &[&insert(1)]);
    let worker = |admin: &mut Client| -> Option<i32> {
        admin.query_one("SELECT pid FROM pgwatch.workers WHERE database = current_database()", &[]).unwrap().get(0)
    };
    let before = worker(&mut admin);
    assert!(before.is_some());
    let database: String = admin.query_one("SELECT current_database()::text", &[]).unwrap().get(0);
    // Only the database's owner may drop it: anyone else's attempt, which PostgreSQL refuses,
    // must not stop the database's worker on the way.
    let (code, message) = failure(&mut m, &format!("DROP DATABASE \"{database}\""));
    assert_eq!(code, "42501", "{message}");
    assert_eq!(worker(&mut admin), before, "the same worker runs");
    let fallbacks = stat(&mut admin, "inline_fallbacks");
    listener.expect_after(&mut writer, "INSERT INTO t_dropdb VALUES (2)", &[&insert(2)]);
    assert_eq!(stat(&mut admin, "inline_fallbacks"), fallbacks, "sent by the worker");
    drop(m);
    admin.batch_execute("DROP SCHEMA mallory CASCADE; DROP ROLE mallory").unwrap();
}

#[test]
fn a_database_owners_settings_cannot_stop_its_worker() {
    let _serial = serial();
    let mut admin = connect();
    drop(mallory(&mut admin));
    let mut db = database(&mut admin, "trust_settings", None);
    // A retained watch: the worker writes its log, which mallory may not.
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY); SELECT watch_table('t', retain => '1 hour');
         GRANT SELECT, INSERT ON t TO mallory",
    )
    .unwrap();
    drop(db);
    // What the database's owner may set for every session, the worker's included (it takes them
    // in as it connects, on the first commit below).
    let mut hostile = vec![
        "role = mallory",
        "default_transaction_read_only = on",
        "statement_timeout = '1ms'",
        "lock_timeout = '1ms'",
    ];
    let mut own = "-c default_transaction_read_only=off -c statement_timeout=0 -c lock_timeout=0".to_string();
    if cfg!(any(feature = "pg17", feature = "pg18")) {
        hostile.push("transaction_timeout = '1ms'");
        own.push_str(" -c transaction_timeout=0");
    }
    for setting in &hostile {
        admin.batch_execute(&format!("ALTER DATABASE trust_settings SET {setting}")).unwrap();
    }
    // The test's own sessions override them as they connect (options outrank database settings,
    // so no timer is ever armed for them); they run as mallory.
    let row = admin.query_one("SELECT inet_server_port(), current_user::text", &[]).unwrap();
    let (port, user): (i32, String) = (row.get(0), row.get(1));
    let calm = || {
        postgres::Config::new()
            .host("localhost")
            .port(port as u16)
            .user(&user)
            .dbname("trust_settings")
            .options(&own)
            .connect(postgres::NoTls)
            .unwrap()
    };
    let mut db = calm();
    let mut listener = Listener::new(calm(), &["public.t"]);
    listener.expect_after(
        &mut db,
        "SET pgwatch.delivery = worker; INSERT INTO t VALUES (1)",
        &[r#"{"tbl":"public.t","op":"insert","rows":[{"id":1}]}"#],
    );
    let pid: Option<i32> =
        admin.query_one("SELECT pid FROM pgwatch.workers WHERE database = 'trust_settings'", &[]).unwrap().get(0);
    assert!(pid.is_some(), "the worker sent it");
    let logged: i64 =
        db.query_one("SELECT payloads FROM pgwatch.channels WHERE channel = 'public.t'", &[]).unwrap().get(0);
    assert_eq!(logged, 1, "and logged it");
    drop((db, listener));
    admin.batch_execute("DROP DATABASE trust_settings WITH (FORCE)").unwrap();
    admin.batch_execute("DROP SCHEMA mallory CASCADE; DROP ROLE mallory").unwrap();
}

#[test]
fn ddl_another_role_may_not_run_has_no_subscriber_refetch() {
    let _serial = serial();
    let mut admin = connect();
    let mut m = mallory(&mut admin);
    let (_writer, mut listener) = watched(
        "worker",
        "CREATE TABLE t_reshape (id int PRIMARY KEY, v int) PARTITION BY RANGE (id);
         CREATE TABLE t_reshape_1 PARTITION OF t_reshape FOR VALUES FROM (0) TO (10);
         SELECT watch_table('t_reshape', '*', '{v}');
         GRANT SELECT ON t_reshape, t_reshape_1 TO mallory",
        &["public.t_reshape"],
    );
    // pgwatch sees these before PostgreSQL refuses them: caught at a savepoint, mallory's
    // attempts must not have every subscriber of the table refetch, over and over.
    for ddl in [
        "DROP TABLE public.t_reshape_1",
        "ALTER TABLE public.t_reshape DETACH PARTITION public.t_reshape_1",
        "ALTER TABLE public.t_reshape ALTER COLUMN v TYPE bigint",
        "ALTER TABLE public.t_reshape ENABLE TRIGGER ALL",
    ] {
        m.batch_execute("BEGIN; SAVEPOINT s").unwrap();
        let (code, message) = failure(&mut m, ddl);
        assert_eq!(code, "42501", "{ddl}: {message}");
        m.batch_execute("ROLLBACK TO s; COMMIT").unwrap();
    }
    listener.expect_silence();
    drop(m);
    admin.batch_execute("DROP TABLE t_reshape; DROP SCHEMA mallory CASCADE; DROP ROLE mallory").unwrap();
}

#[test]
fn a_channel_belongs_to_one_table() {
    let _serial = serial();
    let mut admin = connect();
    let mut m = mallory(&mut admin);
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS t_chan_a, t_chan_b, t_chan_c;
             CREATE TABLE t_chan_a (id int PRIMARY KEY); CREATE TABLE t_chan_b (id int PRIMARY KEY);
             CREATE TABLE t_chan_c (id int PRIMARY KEY);
             SELECT watch_table('t_chan_a', label => 'shared'); SELECT watch_table('t_chan_c')",
        )
        .unwrap();
    let watches =
        |admin: &mut Client| -> i64 { admin.query_one("SELECT count(*) FROM pgwatch.watches", &[]).unwrap().get(0) };
    let before = watches(&mut admin);
    m.batch_execute("CREATE TABLE m (id int PRIMARY KEY)").unwrap();
    for (by_mallory, sql) in [
        (true, "SELECT watch_table('m', label => 'shared')"),
        (false, "SELECT watch_table('t_chan_b', label => 'shared')"),
    ] {
        let (code, message) = failure(if by_mallory { &mut m } else { &mut admin }, sql);
        assert_eq!(code, "42710", "{sql}: {message}");
    }
    assert_eq!(watches(&mut admin), before);
    // A label never holds a dot, so no one can take the channel a table gets without a label
    // (its `schema.table`), not even before the table is made (t_chan_d is not, yet), nor may a
    // second watch of one table share its channel.
    admin.batch_execute("DROP TABLE IF EXISTS t_chan_d").unwrap();
    for (by_mallory, sql) in [
        (true, "SELECT watch_table('m', label => 'public.t_chan_d')"),
        (true, "SELECT watch_table('m', label => 'public.t_chan_c')"),
        (false, "SELECT watch_table('t_chan_c', 'delete', label => 'public.t_chan_c')"),
    ] {
        let (code, message) = failure(if by_mallory { &mut m } else { &mut admin }, sql);
        assert_eq!(code, "22023", "{sql}: {message}");
    }
    assert_eq!(watches(&mut admin), before);
    admin.batch_execute("CREATE TABLE t_chan_d (id int PRIMARY KEY); SELECT watch_table('t_chan_d')").unwrap();
    // A label with a dot made before 0.4.0 (set by hand here) stays with its watch.
    admin
        .batch_execute(
            "UPDATE pgwatch.watches SET label = 'app.d', channel = 'app.d' WHERE tbl = 't_chan_d'::regclass;
             SELECT watch_table('t_chan_d', 'insert', label => 'app.d')",
        )
        .unwrap();
    let (code, message) = failure(&mut admin, "SELECT watch_table('t_chan_d', label => 'app.e')");
    assert_eq!(code, "22023", "{message}");
    // Replacing a watch keeps its channel; a rename onto another watch's channel is refused. A
    // table "x.y" in schema public and a table y in schema "public.x" have channels of their own:
    // a part of the name with a dot is quoted.
    admin.batch_execute("SELECT watch_table('t_chan_a', 'insert', label => 'shared')").unwrap();
    admin
        .batch_execute(
            r#"DROP SCHEMA IF EXISTS "public.t_chan_e" CASCADE; CREATE SCHEMA "public.t_chan_e";
               CREATE TABLE "public.t_chan_e".f (id int PRIMARY KEY); SELECT watch_table('"public.t_chan_e".f');
               SELECT watch_table('t_chan_b');
               ALTER TABLE t_chan_b RENAME TO "t_chan_e.f""#,
        )
        .unwrap();
    let channels: Vec<String> = admin
        .query(
            r#"SELECT channel FROM pgwatch.watches
                WHERE tbl IN ('public."t_chan_e.f"'::regclass, '"public.t_chan_e".f'::regclass) ORDER BY id"#,
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(channels, [r#""public.t_chan_e".f"#, r#"public."t_chan_e.f""#]);
    // A watch made before 0.4.0 has its channel unquoted (set so by hand here): DDL that does not
    // rename its table keeps it.
    let channel = r#"SELECT channel FROM pgwatch.watches WHERE tbl = 'public."t_chan_e.f"'::regclass"#;
    admin
        .batch_execute(
            r#"UPDATE pgwatch.watches SET channel = 'public.t_chan_e.f' WHERE tbl = 'public."t_chan_e.f"'::regclass;
               ALTER TABLE "t_chan_e.f" ADD COLUMN extra int"#,
        )
        .unwrap();
    assert_eq!(admin.query_one(channel, &[]).unwrap().get::<_, String>(0), "public.t_chan_e.f");
    admin
        .batch_execute(r#"DROP SCHEMA IF EXISTS app CASCADE; CREATE SCHEMA app; CREATE TABLE app.x (id int PRIMARY KEY); SELECT watch_table('app.x')"#)
        .unwrap();
    let (code, message) = failure(&mut admin, "ALTER TABLE app.x RENAME TO d");
    assert_eq!(code, "42710", "{message}");
    drop(m);
    admin
        .batch_execute(
            r#"DROP TABLE t_chan_a, "t_chan_e.f", t_chan_c, t_chan_d; DROP SCHEMA "public.t_chan_e", app CASCADE;
               DROP SCHEMA mallory CASCADE; DROP ROLE mallory"#,
        )
        .unwrap();
}

#[test]
fn a_hand_made_trigger_cannot_send_on_a_watchs_channel() {
    let _serial = serial();
    let mut admin = connect();
    let mut m = mallory(&mut admin);
    // The victim's watch; mallory copies its trigger's argument, and even its name, onto her table:
    // her changes would be folded into the victim's (a delete of hers cancelling an insert of theirs).
    let (mut writer, mut listener) = watched(
        "worker",
        "CREATE TABLE t_forged (id int PRIMARY KEY); SELECT watch_table('t_forged')",
        &["public.t_forged"],
    );
    let id: i64 =
        writer.query_one("SELECT id FROM pgwatch.watches WHERE channel = 'public.t_forged'", &[]).unwrap().get(0);
    m.batch_execute(&format!(
        r#"CREATE TABLE f (id int PRIMARY KEY);
           CREATE TRIGGER pgwatch_{id}_delete AFTER DELETE ON f FOR EACH ROW
             EXECUTE FUNCTION pgwatch.capture('{{"public.t_forged","public.t_forged","1","id"}}');
           CREATE TRIGGER by_hand AFTER INSERT ON f FOR EACH ROW
             EXECUTE FUNCTION pgwatch.capture('{{"public.t_forged","public.t_forged","1","id"}}');
           INSERT INTO f SELECT 1 WHERE false"#
    ))
    .unwrap();
    let (code, message) = failure(&mut m, "INSERT INTO f VALUES (1)");
    assert_eq!(code, "39P01", "{message}");
    // Called as a plain function, it says it is a trigger function.
    let (code, message) = failure(&mut m, "SELECT pgwatch.capture()");
    assert_eq!(code, "39P01", "{message}");
    m.batch_execute("ALTER TABLE f DISABLE TRIGGER by_hand; INSERT INTO f VALUES (1)").unwrap();
    let (code, message) = failure(&mut m, "BEGIN; SET LOCAL pgwatch.delivery = worker; DELETE FROM f; COMMIT");
    assert_eq!(code, "39P01", "{message}");
    m.batch_execute("ROLLBACK").unwrap();
    listener.expect_after(
        &mut writer,
        "INSERT INTO t_forged VALUES (1)",
        &[r#"{"tbl":"public.t_forged","op":"insert","rows":[{"id":1}]}"#],
    );
    drop(m);
    admin.batch_execute("DROP SCHEMA mallory CASCADE; DROP ROLE mallory").unwrap();
}

#[test]
fn max_rows_per_xact_bounds_the_transaction_and_only_a_superuser_raises_it() {
    let _serial = serial();
    let mut admin = connect();
    let mut m = mallory(&mut admin);
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE t_rows_a (id int PRIMARY KEY); CREATE TABLE t_rows_b (id int PRIMARY KEY);
             SELECT watch_table('t_rows_a'); SELECT watch_table('t_rows_b')",
            &["public.t_rows_a", "public.t_rows_b"],
        );
        // 6 rows in each of two tables, 10 tracked in all: the last 2 are announced, not listed.
        writer
            .batch_execute(
                "BEGIN; SET LOCAL pgwatch.max_rows_per_xact = 10;
                 INSERT INTO t_rows_a SELECT generate_series(1, 6); INSERT INTO t_rows_b SELECT generate_series(1, 6);
                 COMMIT",
            )
            .unwrap();
        listener.expect_on(&[
            ("public.t_rows_a", r#"{"tbl":"public.t_rows_a","op":"insert","rows":[{"id":1},{"id":2},{"id":3},{"id":4},{"id":5},{"id":6}]}"#),
            ("public.t_rows_b", r#"{"tbl":"public.t_rows_b","op":"insert","rows":[{"id":1},{"id":2},{"id":3},{"id":4}]}"#),
            ("public.t_rows_b", r#"{"tbl":"public.t_rows_b","op":"insert","overflow":true}"#),
        ]);
    }
    // A row listed before the limit may be older than a change past it: the notice comes after
    // every listed row, so that a refetch at the notice is not undone by them.
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE t_rows_c (id int PRIMARY KEY, v text); SELECT watch_table('t_rows_c', extra_columns => '{v}')",
            &["public.t_rows_c"],
        );
        writer
            .batch_execute(
                "BEGIN; SET LOCAL pgwatch.max_rows_per_xact = 2;
                 INSERT INTO t_rows_c VALUES (1, 'old'), (2, 'old'); UPDATE t_rows_c SET v = 'new' WHERE id = 1;
                 COMMIT",
            )
            .unwrap();
        listener.expect(&[
            r#"{"tbl":"public.t_rows_c","op":"insert","rows":[{"id":1,"v":"old"},{"id":2,"v":"old"}]}"#,
            r#"{"tbl":"public.t_rows_c","op":"update","overflow":true}"#,
        ]);
    }
    // The bound is the superuser's to set.
    for sql in [
        "SET pgwatch.max_rows_per_xact = 1000000",
        "SET LOCAL pgwatch.max_rows_per_xact = 5",
        "ALTER ROLE mallory SET pgwatch.max_rows_per_xact = 1000000",
    ] {
        let (code, message) = failure(&mut m, sql);
        assert_eq!(code, "42501", "{sql}: {message}");
    }
    admin.batch_execute("SET pgwatch.max_rows_per_xact = 1000000; RESET pgwatch.max_rows_per_xact").unwrap();
    drop(m);
    admin.batch_execute("DROP SCHEMA mallory CASCADE; DROP ROLE mallory").unwrap();
}

/// Applies `payload` to `copy` by the README's rules for subscribers (without refetching: the
/// tests using it expect no notice that asks for one).
fn apply(copy: &mut BTreeMap<i64, String>, payload: &str) {
    let v: serde_json::Value = serde_json::from_str(payload).unwrap();
    let op = v["op"].as_str().unwrap();
    assert!(["insert", "update", "delete"].contains(&op), "{payload}");
    for row in v["rows"].as_array().unwrap() {
        assert!(row.get("partial").is_none(), "{payload}");
        let id = row["id"].as_i64().unwrap();
        match op {
            "delete" => {
                copy.remove(&id);
            }
            _ => {
                copy.insert(id, row["v"].as_str().unwrap().to_string());
            }
        }
    }
}

fn table(client: &mut Client, name: &str) -> BTreeMap<i64, String> {
    client
        .query(&format!("SELECT id, v FROM {name}"), &[])
        .unwrap()
        .iter()
        .map(|row| (i64::from(row.get::<_, i32>(0)), row.get(1)))
        .collect()
}

#[test]
fn key_changes_swaps_and_rotations_apply_row_by_row() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE t_keys (id int PRIMARY KEY, v text); SELECT watch_table('t_keys', '*', '{v}')",
            &["public.t_keys"],
        );
        let mut copy = BTreeMap::new();
        let mut step = |writer: &mut Client, listener: &mut Listener, sql: &str, expected: &[&str]| {
            writer.batch_execute(sql).unwrap();
            let got: Vec<String> = listener.receive(expected.len(), WAIT).into_iter().map(|(_, p)| p).collect();
            listener.expect_silence();
            assert_eq!(got, expected, "{mode}: {sql}");
            got.iter().for_each(|payload| apply(&mut copy, payload));
            assert_eq!(copy, table(writer, "t_keys"), "{mode}: {sql}");
        };
        step(
            &mut writer,
            &mut listener,
            "INSERT INTO t_keys VALUES (1, 'x'), (2, 'a')",
            &[r#"{"tbl":"public.t_keys","op":"insert","rows":[{"id":1,"v":"x"},{"id":2,"v":"a"}]}"#],
        );
        step(
            &mut writer,
            &mut listener,
            "UPDATE t_keys SET v = v || '.'",
            &[
                r#"{"tbl":"public.t_keys","op":"update","rows":[{"id":1,"v":"x.","old":{"v":"x"}},{"id":2,"v":"a.","old":{"v":"a"}}]}"#,
            ],
        );
        // The review's shuffle: row 1 changes, row 2 moves to 3, row 1 to 2.
        step(
            &mut writer,
            &mut listener,
            "BEGIN; UPDATE t_keys SET v = 'x2' WHERE id = 1; UPDATE t_keys SET id = 3 WHERE id = 2;
             UPDATE t_keys SET id = 2 WHERE id = 1; COMMIT",
            &[
                r#"{"tbl":"public.t_keys","op":"delete","rows":[{"id":1,"v":"x."}]}"#,
                r#"{"tbl":"public.t_keys","op":"update","rows":[{"id":2,"v":"x2","old":{"v":"a."}}]}"#,
                r#"{"tbl":"public.t_keys","op":"insert","rows":[{"id":3,"v":"a."}]}"#,
            ],
        );
        // A swap through a free key, and a rotation of three keys in one statement each.
        step(
            &mut writer,
            &mut listener,
            "BEGIN; UPDATE t_keys SET id = 4 WHERE id = 2; UPDATE t_keys SET id = 2 WHERE id = 3;
             UPDATE t_keys SET id = 3 WHERE id = 4; COMMIT",
            &[
                r#"{"tbl":"public.t_keys","op":"update","rows":[{"id":2,"v":"a.","old":{"v":"x2"}},{"id":3,"v":"x2","old":{"v":"a."}}]}"#,
            ],
        );
        step(
            &mut writer,
            &mut listener,
            "INSERT INTO t_keys VALUES (10, 'p'), (11, 'q'), (12, 'r');
             BEGIN; UPDATE t_keys SET id = 13 WHERE id = 10; UPDATE t_keys SET id = 10 WHERE id = 11;
             UPDATE t_keys SET id = 11 WHERE id = 12; UPDATE t_keys SET id = 12 WHERE id = 13; COMMIT",
            &[
                r#"{"tbl":"public.t_keys","op":"insert","rows":[{"id":10,"v":"q"},{"id":11,"v":"r"},{"id":12,"v":"p"}]}"#,
            ],
        );
    }
}

/// The database's delivery worker, stopped (SIGSTOP) until dropped: what commits meanwhile stays
/// queued, and reaches it as one batch. It is stopped only while idle with nothing queued, so
/// that it holds no lock of the queue.
struct FrozenWorker(i32);

impl FrozenWorker {
    fn new(client: &mut Client) -> FrozenWorker {
        let status = |client: &mut Client| -> (Option<i32>, String, i64) {
            let row = client
                .query_one("SELECT pid, state, backlog FROM pgwatch.workers WHERE database = current_database()", &[])
                .unwrap();
            (row.get(0), row.get(1), row.get(2))
        };
        let signal = |pid: i32, signal: &str| {
            let done = std::process::Command::new("kill").args([signal, &pid.to_string()]).status().unwrap();
            assert!(done.success(), "kill {signal} {pid}");
        };
        loop {
            assert!(eventually(|| matches!(status(client), (Some(_), state, 0) if state == "idle")));
            let (Some(pid), ..) = status(client) else { continue };
            signal(pid, "-STOP");
            if matches!(status(client), (Some(now), state, 0) if now == pid && state == "idle") {
                return FrozenWorker(pid);
            }
            signal(pid, "-CONT");
        }
    }
}

impl Drop for FrozenWorker {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-CONT", &self.0.to_string()]).status();
    }
}

#[test]
fn inline_notifications_never_overtake_queued_ones_unannounced() {
    let _serial = serial();
    let (mut writer, mut listener) = watched(
        "worker",
        "CREATE TABLE t_overtake (id int PRIMARY KEY, v text); INSERT INTO t_overtake VALUES (1, 'start');
         SELECT watch_table('t_overtake', 'update', '{v}')",
        &["public.t_overtake"],
    );
    listener.expect_after(
        &mut writer,
        "UPDATE t_overtake SET v = 'warm'",
        &[r#"{"tbl":"public.t_overtake","op":"update","rows":[{"id":1,"v":"warm","old":{"v":"start"}}]}"#],
    );
    let resyncs = stat(&mut writer, "resyncs");
    let frozen = FrozenWorker::new(&mut writer);
    // T1 is queued for the worker; T2, notified by its own transaction, arrives first.
    writer.batch_execute("UPDATE t_overtake SET v = 'queued'").unwrap();
    listener.expect_after(
        &mut writer,
        "BEGIN; SET LOCAL pgwatch.delivery = inline; UPDATE t_overtake SET v = 'inline'; COMMIT",
        &[r#"{"tbl":"public.t_overtake","op":"update","rows":[{"id":1,"v":"inline","old":{"v":"queued"}}]}"#],
    );
    drop(frozen);
    // Then T1's older value, and right after it the notice to refetch (numbered in turn).
    listener.expect(&[
        r#"{"tbl":"public.t_overtake","op":"update","rows":[{"id":1,"v":"queued","old":{"v":"warm"}}]}"#,
        r#"{"tbl":"public.t_overtake","op":"resync"}"#,
    ]);
    assert!(eventually(|| stat(&mut writer, "resyncs") > resyncs));
    // Nothing queued any more: an inline transaction has nothing to overtake, and no notice follows.
    assert!(eventually(|| {
        let backlog: i64 = writer
            .query_one("SELECT backlog FROM pgwatch.workers WHERE database = current_database()", &[])
            .unwrap()
            .get(0);
        backlog == 0
    }));
    listener.expect_after(
        &mut writer,
        "BEGIN; SET LOCAL pgwatch.delivery = inline; UPDATE t_overtake SET v = 'alone'; COMMIT",
        &[r#"{"tbl":"public.t_overtake","op":"update","rows":[{"id":1,"v":"alone","old":{"v":"inline"}}]}"#],
    );
}

#[test]
fn a_worker_folding_transactions_that_move_keys_sends_each_key_its_final_row() {
    let _serial = serial();
    let (mut writer, mut listener) = watched(
        "worker",
        "CREATE TABLE t_fold (id int PRIMARY KEY, v text); SELECT watch_table('t_fold', '*', '{v}')",
        &["public.t_fold"],
    );
    listener.expect_after(
        &mut writer,
        "INSERT INTO t_fold VALUES (1, 'x'), (2, 'a')",
        &[r#"{"tbl":"public.t_fold","op":"insert","rows":[{"id":1,"v":"x"},{"id":2,"v":"a"}]}"#],
    );
    let frozen = FrozenWorker::new(&mut writer);
    writer.batch_execute("UPDATE t_fold SET v = v || '.'").unwrap();
    writer
        .batch_execute(
            "BEGIN; UPDATE t_fold SET v = 'x2' WHERE id = 1; UPDATE t_fold SET id = 3 WHERE id = 2;
             UPDATE t_fold SET id = 2 WHERE id = 1; COMMIT",
        )
        .unwrap();
    drop(frozen);
    // Both transactions in one batch, folded per key.
    listener.expect(&[
        r#"{"tbl":"public.t_fold","op":"delete","rows":[{"id":1,"v":"x"}]}"#,
        r#"{"tbl":"public.t_fold","op":"update","rows":[{"id":2,"v":"x2","old":{"v":"a"}}]}"#,
        r#"{"tbl":"public.t_fold","op":"insert","rows":[{"id":3,"v":"a."}]}"#,
    ]);
    let rows = table(&mut writer, "t_fold");
    assert_eq!(rows, BTreeMap::from([(2, "x2".to_string()), (3, "a.".to_string())]));
}

/// A transaction whose commit hangs after it queued its changes (its temporary table, emptied at
/// commit, waits for a lock that another session holds) does not hold up later changes: the
/// worker passes it over, and once it commits its subscribers refetch.
#[test]
fn a_commit_that_hangs_after_queuing_does_not_hold_up_delivery() {
    let _serial = serial();
    let (mut writer, mut listener) =
        watched("worker", "CREATE TABLE t_hang (id int PRIMARY KEY); SELECT watch_table('t_hang')", &["public.t_hang"]);
    let passed = stat(&mut writer, "passed_over");
    let mut hanging = connect();
    hanging
        .batch_execute("SET pgwatch.delivery = worker; CREATE TEMP TABLE t_hang_tmp (id int) ON COMMIT DELETE ROWS")
        .unwrap();
    hanging.batch_execute("BEGIN; INSERT INTO t_hang_tmp VALUES (1); INSERT INTO t_hang VALUES (1)").unwrap();
    let temp_schema: String = hanging
        .query_one("SELECT nspname::text FROM pg_namespace WHERE oid = pg_my_temp_schema()", &[])
        .unwrap()
        .get(0);
    let mut locker = connect();
    locker.batch_execute(&format!("BEGIN; LOCK TABLE {temp_schema}.t_hang_tmp IN ACCESS SHARE MODE")).unwrap();
    std::thread::scope(|scope| {
        let committing = scope.spawn(move || hanging.batch_execute("COMMIT").unwrap());
        // Its commit waits; what commits meanwhile is sent all the same, a second or so later.
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!committing.is_finished(), "the commit did not wait for the lock");
        listener.expect_after(
            &mut writer,
            "INSERT INTO t_hang VALUES (2)",
            &[r#"{"tbl":"public.t_hang","op":"insert","rows":[{"id":2}]}"#],
        );
        locker.batch_execute("COMMIT").unwrap();
        committing.join().unwrap();
    });
    // Its own row was not sent: its subscribers refetch, behind what was sent meanwhile.
    listener.expect(&[r#"{"tbl":"public.t_hang","op":"resync"}"#]);
    assert!(eventually(|| stat(&mut writer, "passed_over") > passed));
    assert_eq!(table_ids(&mut writer, "t_hang"), [1, 2]);
}

fn table_ids(client: &mut Client, name: &str) -> Vec<i32> {
    client.query(&format!("SELECT id FROM {name} ORDER BY id"), &[]).unwrap().iter().map(|row| row.get(0)).collect()
}

#[test]
fn a_row_committed_and_deleted_within_one_batch_reaches_a_copy_fetched_in_between() {
    let _serial = serial();
    let (mut writer, mut listener) = watched(
        "worker",
        "CREATE TABLE t_between (id int PRIMARY KEY, v text); SELECT watch_table('t_between', '*', '{v}')",
        &["public.t_between"],
    );
    let frozen = FrozenWorker::new(&mut writer);
    writer.batch_execute("INSERT INTO t_between VALUES (1, 'a'), (2, 'b')").unwrap();
    // A subscriber takes its snapshot (or refetches) between the two commits: it holds both rows.
    let mut copy = table(&mut writer, "t_between");
    writer.batch_execute("DELETE FROM t_between WHERE id = 1; UPDATE t_between SET id = 3 WHERE id = 2").unwrap();
    drop(frozen);
    // Both transactions in one batch: the rows the first inserted and the second removed are sent
    // as deleted, not folded away.
    listener.expect(&[
        r#"{"tbl":"public.t_between","op":"delete","rows":[{"id":1,"v":"a"},{"id":2,"v":"b"}]}"#,
        r#"{"tbl":"public.t_between","op":"insert","rows":[{"id":3,"v":"b"}]}"#,
    ]);
    copy.remove(&1);
    copy.remove(&2);
    copy.insert(3, "b".to_string());
    assert_eq!(copy, table(&mut writer, "t_between"));
}

/// The pid of this server's pgwatch launcher: a child of the postmaster (the parent of this
/// connection's backend) titled so. It has no row in pg_stat_activity (it connects to no database).
fn launcher_pid(client: &mut Client) -> Option<i32> {
    let backend: i32 = client.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let parent = |pid: &str| -> Option<String> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // pid (comm) state ppid ...: comm may hold spaces, so fields are counted after its ')'.
        stat.rsplit_once(')')?.1.split_whitespace().nth(1).map(str::to_string)
    };
    let postmaster = parent(&backend.to_string())?;
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid = entry.file_name().to_string_lossy().into_owned();
        let title = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).ok()?;
        (parent(&pid)? == postmaster && title.contains("pgwatch launcher")).then(|| pid.parse().ok()).flatten()
    })
}

#[test]
fn the_launcher_comes_back_after_sigterm() {
    let _serial = serial();
    let (mut writer, mut listener) = watched(
        "worker",
        "CREATE TABLE t_launcher (id int PRIMARY KEY); SELECT watch_table('t_launcher')",
        &["public.t_launcher"],
    );
    let first = launcher_pid(&mut writer).expect("a launcher runs");
    let terminated = std::process::Command::new("kill").args(["-TERM", &first.to_string()]).status().unwrap();
    assert!(terminated.success());
    assert!(eventually(|| launcher_pid(&mut writer).is_some_and(|pid| pid != first)), "no new launcher");
    // With no worker either, a commit still gets delivered: the new launcher starts one.
    let worker: Option<i32> =
        writer.query_one("SELECT pid FROM pgwatch.workers WHERE database = current_database()", &[]).unwrap().get(0);
    if let Some(pid) = worker {
        writer.execute("SELECT pg_terminate_backend($1)", &[&pid]).unwrap();
    }
    listener.expect_after(
        &mut writer,
        "INSERT INTO t_launcher VALUES (1)",
        &[r#"{"tbl":"public.t_launcher","op":"insert","rows":[{"id":1}]}"#],
    );
}

#[test]
fn columns_named_like_payload_members_need_compact_rows() {
    let _serial = serial();
    let mut client = connect();
    client
        .batch_execute(
            "DROP TABLE IF EXISTS t_members, t_members_key, t_members_renamed;
             CREATE TABLE t_members (id int PRIMARY KEY, old int, partial int);
             CREATE TABLE t_members_key (partial int PRIMARY KEY);
             CREATE TABLE t_members_renamed (id int PRIMARY KEY, v int, w int);
             SELECT watch_table('t_members_renamed', '*', '{v}');
             SELECT watch_table('t_members_renamed', '*', '{w}', label => 't_members_compact', payload => 'compact')",
        )
        .unwrap();
    for sql in [
        "SELECT watch_table('t_members', '*', '{old}')",
        "SELECT watch_table('t_members', '*', '{partial}')",
        "SELECT watch_table('t_members_key')",
        "SELECT watch_table('t_members_key', payload => 'keys')",
        // Renaming a column that a watch with object rows sends.
        "ALTER TABLE t_members_renamed RENAME COLUMN v TO old",
    ] {
        let (code, message) = failure(&mut client, sql);
        assert_eq!(code, "42939", "{sql}: {message}");
    }
    client
        .batch_execute(
            "SELECT watch_table('t_members', '*', '{old,partial}', payload => 'compact');
             SELECT watch_table('t_members_key', payload => 'compact');
             ALTER TABLE t_members_renamed RENAME COLUMN w TO partial",
        )
        .unwrap();
    client.batch_execute("DROP TABLE t_members, t_members_key, t_members_renamed").unwrap();
}

#[test]
fn a_row_whose_old_values_were_cut_is_sent_as_its_key_only() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE t_cut (id int PRIMARY KEY, body text); INSERT INTO t_cut VALUES (1, repeat('x', 9000));
             SELECT watch_table('t_cut', 'update', '{body}')",
            &["public.t_cut"],
        );
        listener.expect_after(
            &mut writer,
            "UPDATE t_cut SET body = 'small'",
            &[r#"{"tbl":"public.t_cut","op":"update","rows":[{"id":1,"partial":true}]}"#],
        );
        listener.expect_after(
            &mut writer,
            "UPDATE t_cut SET body = 'smaller'",
            &[r#"{"tbl":"public.t_cut","op":"update","rows":[{"id":1,"body":"smaller","old":{"body":"small"}}]}"#],
        );
    }
}

#[test]
fn a_when_is_taken_over_only_from_the_trigger_pgwatch_made_for_that_event() {
    let _serial = serial();
    let mut client = connect();
    client
        .batch_execute(
            "DROP TABLE IF EXISTS t_swapped; CREATE TABLE t_swapped (id int PRIMARY KEY, v int);
             SELECT watch_table('t_swapped', 'update, delete', trigger_columns => '{v}', condition => 'OLD.v > 0')",
        )
        .unwrap();
    let id: i64 =
        client.query_one("SELECT id FROM pgwatch.watches WHERE channel = 'public.t_swapped'", &[]).unwrap().get(0);
    // The update trigger's WHEN reads NEW; on the delete trigger it would read a row that is not there.
    client
        .batch_execute(&format!(
            "ALTER TRIGGER pgwatch_{id}_update ON t_swapped RENAME TO swap;
             ALTER TRIGGER pgwatch_{id}_delete ON t_swapped RENAME TO pgwatch_{id}_update;
             ALTER TRIGGER swap ON t_swapped RENAME TO pgwatch_{id}_delete"
        ))
        .unwrap();
    let (code, message) = failure(&mut client, &format!("SELECT pgwatch.renew_watch({id})"));
    assert_eq!(code, "55000", "{message}");
    client
        .batch_execute("INSERT INTO t_swapped VALUES (1, 1); UPDATE t_swapped SET v = 2; DELETE FROM t_swapped")
        .unwrap();
    client.batch_execute("DROP TABLE t_swapped").unwrap();
}

#[test]
fn renames_through_other_commands_are_followed() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE t_via_index (id int PRIMARY KEY, v int); SELECT watch_table('t_via_index', '*', '{v}')",
            &["public.t_via_renamed"],
        );
        writer
            .batch_execute(
                "DROP TABLE IF EXISTS t_via_renamed;
                 ALTER INDEX t_via_index RENAME TO t_via_renamed;
                 ALTER VIEW t_via_renamed RENAME COLUMN v TO w",
            )
            .unwrap();
        // A sent column renamed: subscribers refetch (the table's old channel is told too).
        listener.expect(&[r#"{"tbl":"public.t_via_renamed","op":"resync"}"#]);
        listener.expect_after(
            &mut writer,
            "INSERT INTO t_via_renamed VALUES (1, 2)",
            &[r#"{"tbl":"public.t_via_renamed","op":"insert","rows":[{"id":1,"w":2}]}"#],
        );
        writer.batch_execute("DROP TABLE t_via_renamed").unwrap();
    }
}

#[test]
fn a_transaction_that_watches_a_table_holds_up_no_one_elses_ddl() {
    let _serial = serial();
    let mut admin = connect();
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS t_slow_watch, t_other_drop;
             CREATE TABLE t_slow_watch (id int PRIMARY KEY); CREATE TABLE t_other_drop (id int PRIMARY KEY)",
        )
        .unwrap();
    let mut slow = connect();
    slow.batch_execute("BEGIN; SELECT watch_table('t_slow_watch')").unwrap();
    let mut other = connect();
    other.batch_execute("SET lock_timeout = '10s'; DROP TABLE t_other_drop").unwrap();
    slow.batch_execute("COMMIT").unwrap();
    admin.batch_execute("DROP TABLE t_slow_watch").unwrap();
}

#[test]
fn a_watch_on_someone_elses_objects_cannot_stop_their_drop_cascade() {
    let _serial = serial();
    let mut admin = connect();
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS t_theirs; DROP TYPE IF EXISTS t_theirs_mood;
             CREATE TABLE t_theirs (id int PRIMARY KEY); CREATE TYPE t_theirs_mood AS ENUM ('ok')",
        )
        .unwrap();
    let mut m = mallory(&mut admin);
    // Mallory's watches depend on another's table (a constant in the condition) and type (a sent
    // column's): PostgreSQL records both dependencies.
    m.batch_execute(
        "CREATE TABLE m (id int PRIMARY KEY, mood public.t_theirs_mood);
         SELECT watch_table('m', 'insert', condition => $$'public.t_theirs'::regclass IS NOT NULL$$);
         SELECT watch_table('m', 'update', '{mood}', label => 'm_moods')",
    )
    .unwrap();
    // Their DROP ... CASCADE drops what depends on their objects, mallory's watches with it (and
    // their triggers), instead of failing.
    admin.batch_execute("DROP TABLE t_theirs CASCADE").unwrap();
    admin.batch_execute("DROP TYPE t_theirs_mood CASCADE").unwrap();
    let left: i64 =
        admin.query_one("SELECT count(*) FROM pgwatch.watches WHERE tbl = 'mallory.m'::regclass", &[]).unwrap().get(0);
    assert_eq!(left, 0);
    let triggers: i64 =
        admin.query_one("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'mallory.m'::regclass", &[]).unwrap().get(0);
    assert_eq!(triggers, 0);
    // The table's own DDL is still refused when it would break a watch (see ddl.rs).
    m.batch_execute("SELECT watch_table('m')").unwrap();
    assert_eq!(failure(&mut m, "ALTER TABLE m DROP CONSTRAINT m_pkey CASCADE").0, "2BP01");
    drop(m);
    admin.batch_execute("DROP SCHEMA mallory CASCADE; DROP ROLE mallory").unwrap();
}

#[test]
fn a_label_claimed_by_an_open_transaction_does_not_hold_up_another_tables_writers() {
    let _serial = serial();
    let mut admin = connect();
    let mut m = mallory(&mut admin);
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS t_claim_v; CREATE TABLE t_claim_v (id int PRIMARY KEY);
             CREATE TABLE mallory.t_claim_m (id int PRIMARY KEY); ALTER TABLE mallory.t_claim_m OWNER TO mallory",
        )
        .unwrap();
    m.batch_execute("BEGIN; SELECT watch_table('mallory.t_claim_m', label => 'claimed')").unwrap();
    // The victim's watch_table waits for mallory's transaction before it locks its table...
    let victim = std::thread::spawn(|| failure(&mut connect(), "SELECT watch_table('t_claim_v', label => 'claimed')"));
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'object'";
    assert!(eventually(|| admin.query_one(waiting, &[]).unwrap().get::<_, i64>(0) == 1));
    // ... so that its writers go on meanwhile (they waited for mallory's COMMIT before; the
    // timeout only ends the test should they wait again).
    admin.batch_execute("SET lock_timeout = '60s'; INSERT INTO t_claim_v VALUES (1); RESET lock_timeout").unwrap();
    m.batch_execute("COMMIT").unwrap();
    // Once it is committed, the claim is refused with the documented SQLSTATE.
    let (code, message) = victim.join().unwrap();
    assert_eq!(code, "42710", "{message}");
    drop(m);
    admin.batch_execute("DROP TABLE t_claim_v; DROP SCHEMA mallory CASCADE; DROP ROLE mallory").unwrap();
}

#[test]
fn a_condition_postgresql_would_misread_or_drop_with_a_session_is_refused() {
    let _serial = serial();
    let mut admin = connect();
    let mut m = mallory(&mut admin);
    m.batch_execute("CREATE TABLE m (id int PRIMARY KEY, n int)").unwrap();
    // A bare star is no expression: PostgreSQL's grammar expands it only in a target list (once,
    // this crashed the server).
    for condition in ["*", "*\n-- all"] {
        let (code, message) = failure(&mut m, &format!("SELECT watch_table('m', condition => $c${condition}$c$)"));
        assert_eq!(code, "42601", "{condition}: {message}");
    }
    // A temporary function or operator: the session's end would drop the watch's triggers with it,
    // without the event triggers that keep a watch and its triggers together.
    m.batch_execute(
        "CREATE FUNCTION pg_temp.tf(int) RETURNS boolean LANGUAGE sql AS 'SELECT true';
         CREATE OPERATOR pg_temp.=== (LEFTARG = int, RIGHTARG = int, FUNCTION = int4eq)",
    )
    .unwrap();
    for condition in ["pg_temp.tf(NEW.n)", "NEW.n OPERATOR(pg_temp.===) 1"] {
        let (code, message) =
            failure(&mut m, &format!("SELECT watch_table('m', 'insert, update', condition => $c${condition}$c$)"));
        assert_eq!(code, "0A000", "{condition}: {message}");
        assert!(message.contains("temporary object"), "{message}");
    }
    let left: i64 = admin
        .query_one(
            "SELECT (SELECT count(*) FROM pgwatch.watches WHERE tbl::text LIKE 'mallory.%')
                  + (SELECT count(*) FROM pg_trigger WHERE tgrelid = 'mallory.m'::regclass)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    // The same condition over a function of a permanent schema is fine.
    m.batch_execute(
        "CREATE FUNCTION tf(int) RETURNS boolean LANGUAGE sql AS 'SELECT true';
         SELECT watch_table('m', 'insert, update', condition => 'mallory.tf(NEW.n)')",
    )
    .unwrap();
    // Her temporary objects go before her role does, not as her backend exits.
    m.batch_execute("DISCARD TEMP").unwrap();
    drop(m);
    admin.batch_execute("DROP SCHEMA mallory CASCADE; DROP ROLE mallory").unwrap();
}

#[test]
fn a_label_cannot_be_chosen_to_hold_up_the_claim_of_another_channel() {
    let _serial = serial();
    let mut admin = connect();
    let mut m = mallory(&mut admin);
    admin.batch_execute("DROP TABLE IF EXISTS victim; CREATE TABLE victim (id int PRIMARY KEY)").unwrap();
    m.batch_execute("CREATE TABLE t_hash (id int PRIMARY KEY)").unwrap();
    // The two channels shared the unkeyed hash that once named the claim lock: mallory, holding
    // her claim open, stalled every definition of the victim's channel.
    m.batch_execute("BEGIN; SELECT watch_table('t_hash', label => 'mal_au0a9bb')").unwrap();
    admin
        .batch_execute("SET statement_timeout = '60s'; SELECT watch_table('victim'); RESET statement_timeout")
        .unwrap();
    m.batch_execute("COMMIT").unwrap();
    drop(m);
    admin.batch_execute("DROP TABLE victim; DROP SCHEMA mallory CASCADE; DROP ROLE mallory").unwrap();
}

#[test]
fn other_databases_activity_shows_only_to_roles_that_read_all_statistics() {
    let _serial = serial();
    let mut admin = connect();
    let mut m = mallory(&mut admin);
    // The counters are the whole cluster's: payload bytes tell the length of others' values.
    let (code, message) = failure(&mut m, "SELECT payload_bytes FROM pgwatch.stats()");
    assert_eq!(code, "42501", "{message}");
    // A database mallory may not connect to, with a worker: its row is not hers to see.
    let mut closed = database(&mut admin, "t_closed", None);
    admin.batch_execute("REVOKE CONNECT ON DATABASE t_closed FROM PUBLIC").unwrap();
    closed
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY); SELECT watch_table('t');
             SET pgwatch.delivery = worker; INSERT INTO t VALUES (1)",
        )
        .unwrap();
    let listed = |client: &mut Client| -> i64 {
        client.query_one("SELECT count(*) FROM pgwatch.workers WHERE database = 't_closed'", &[]).unwrap().get(0)
    };
    assert!(eventually(|| listed(&mut admin) == 1));
    assert_eq!(listed(&mut m), 0);
    admin.batch_execute("GRANT pg_read_all_stats TO mallory").unwrap();
    assert_eq!(listed(&mut m), 1);
    m.batch_execute("SELECT payload_bytes FROM pgwatch.stats()").unwrap();
    drop((m, closed));
    admin.batch_execute("DROP DATABASE t_closed WITH (FORCE)").unwrap();
    admin
        .batch_execute("REVOKE pg_read_all_stats FROM mallory; DROP SCHEMA mallory CASCADE; DROP ROLE mallory")
        .unwrap();
}
