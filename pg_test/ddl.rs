//! End-to-end tests of DDL on watched tables: renames are followed, changes that would break a
//! watch are refused with writes left working, and keys that may repeat cannot get under a watch.

use postgres::Client;

use super::support::{connect, failure, replayed, serial, stat, watch_id, watched, MODES};

#[test]
fn renamed_tables_schemas_and_columns_are_followed() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "DROP SCHEMA IF EXISTS o_s CASCADE; DROP SCHEMA IF EXISTS o_s2 CASCADE;
             CREATE SCHEMA o_s;
             CREATE TABLE o_s.o_ren (id int PRIMARY KEY, role_id int, flag bool);
             INSERT INTO o_s.o_ren VALUES (1, 1, false);
             SELECT watch_table('o_s.o_ren', '*', '{role_id}', trigger_columns => '{role_id,flag}');
             SELECT watch_table('o_s.o_ren', 'insert', label => 'o_ren_label')",
            &["o_s.o_ren", "o_s.o_renamed", "o_s2.o_renamed", "public.o_renamed", "o_ren_label"],
        );
        writer
            .batch_execute("ALTER TABLE o_s.o_ren RENAME COLUMN role_id TO role; UPDATE o_s.o_ren SET role = 2")
            .unwrap();
        // A sent column's rename: subscribers refetch (their copies hold the old name).
        let resync = r#"{"tbl":"o_s.o_ren","op":"resync"}"#;
        listener.expect_on(&[
            ("o_s.o_ren", r#"{"tbl":"o_s.o_ren","op":"update","rows":[{"id":1,"role":2,"old":{"role":1}}]}"#),
            ("o_s.o_ren", resync),
        ]);
        writer
            .batch_execute(
                r#"ALTER TABLE o_s.o_ren RENAME COLUMN flag TO "is on"; UPDATE o_s.o_ren SET "is on" = true"#,
            )
            .unwrap();
        listener.expect_on(&[("o_s.o_ren", r#"{"tbl":"o_s.o_ren","op":"update","rows":[{"id":1,"role":2}]}"#)]);
        writer
            .batch_execute("ALTER TABLE o_s.o_ren RENAME COLUMN id TO key; INSERT INTO o_s.o_ren VALUES (2, 3)")
            .unwrap();
        let inserted = r#"{"tbl":"o_s.o_ren","op":"insert","rows":[{"key":2,"role":3}]}"#;
        listener.expect_on(&[
            ("o_s.o_ren", inserted),
            ("o_s.o_ren", resync),
            ("o_ren_label", r#"{"tbl":"o_s.o_ren","op":"insert","rows":[{"key":2}]}"#),
            ("o_ren_label", resync),
        ]);
        // A table without a label changes channel with its name (its subscribers on the old one
        // are told to refetch); a labelled one keeps it.
        writer
            .batch_execute("ALTER TABLE o_s.o_ren RENAME TO o_renamed; DELETE FROM o_s.o_renamed WHERE key = 2")
            .unwrap();
        listener.expect_on(&[
            ("o_s.o_renamed", r#"{"tbl":"o_s.o_renamed","op":"delete","rows":[{"key":2,"role":3}]}"#),
            ("o_s.o_ren", r#"{"tbl":"o_s.o_renamed","op":"resync"}"#),
        ]);
        writer.batch_execute("ALTER SCHEMA o_s RENAME TO o_s2; INSERT INTO o_s2.o_renamed VALUES (3, 3)").unwrap();
        listener.expect_on(&[
            ("o_s2.o_renamed", r#"{"tbl":"o_s2.o_renamed","op":"insert","rows":[{"key":3,"role":3}]}"#),
            ("o_s.o_renamed", r#"{"tbl":"o_s2.o_renamed","op":"resync"}"#),
            ("o_ren_label", r#"{"tbl":"o_s2.o_renamed","op":"insert","rows":[{"key":3}]}"#),
        ]);
        writer
            .batch_execute("ALTER TABLE o_s2.o_renamed SET SCHEMA public; UPDATE o_renamed SET role = 4 WHERE key = 3")
            .unwrap();
        listener.expect_on(&[
            (
                "public.o_renamed",
                r#"{"tbl":"public.o_renamed","op":"update","rows":[{"key":3,"role":4,"old":{"role":3}}]}"#,
            ),
            ("o_s2.o_renamed", r#"{"tbl":"public.o_renamed","op":"resync"}"#),
        ]);
        let row = writer
            .query_one(
                "SELECT channel, key_columns, extra_columns, trigger_columns FROM pgwatch.watches
                  WHERE tbl = 'o_renamed'::regclass AND label IS NULL",
                &[],
            )
            .unwrap();
        let catalog: (String, Vec<String>, Vec<String>, Vec<String>) = (row.get(0), row.get(1), row.get(2), row.get(3));
        assert_eq!(
            catalog,
            ("public.o_renamed".into(), vec!["key".into()], vec!["role".into()], vec!["role".into(), "is on".into()])
        );
        writer.batch_execute("DROP TABLE o_renamed; DROP SCHEMA o_s2").unwrap();
    }
}

#[test]
fn ddl_that_would_break_a_watch_is_refused_and_writes_keep_working() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE o_ddl (id int PRIMARY KEY, role_id int, status text, name text);
             SELECT watch_table('o_ddl', '*', '{role_id}');
             SELECT watch_table('o_ddl', 'update', label => 'o_ddl_cond', condition => $$NEW.status IS NOT NULL$$)",
            &["public.o_ddl", "o_ddl_cond"],
        );
        let plain = watch_id(&mut writer, "public.o_ddl");
        let conditional = watch_id(&mut writer, "o_ddl_cond");
        let catalog = |client: &mut Client| -> String {
            client
                .query_one(
                    "SELECT (SELECT string_agg(w::text, ';' ORDER BY id) FROM pgwatch.watches w WHERE tbl = 'o_ddl'::regclass)
                         || (SELECT string_agg(tgname || pg_get_triggerdef(oid), ';' ORDER BY tgname) FROM pg_trigger
                              WHERE tgrelid = 'o_ddl'::regclass)",
                    &[],
                )
                .unwrap()
                .get(0)
        };
        let before = catalog(&mut writer);
        for (sql, code, message) in [
            (
                "ALTER TABLE o_ddl DROP COLUMN role_id",
                "2BP01",
                format!(
                    r#"cannot drop column role_id of table public.o_ddl: pgwatch watch {plain} (channel "public.o_ddl") uses it"#
                ),
            ),
            (
                "DROP TRIGGER pgwatch_{plain}_insert ON o_ddl",
                "2BP01",
                format!(
                    r#"cannot drop trigger pgwatch_{plain}_insert of table public.o_ddl: it belongs to pgwatch watch {plain} (channel "public.o_ddl")"#
                ),
            ),
            // The condition's trigger depends on status: PostgreSQL refuses, and with CASCADE pgwatch does.
            ("ALTER TABLE o_ddl DROP COLUMN status", "2BP01", String::new()),
            (
                "ALTER TABLE o_ddl DROP COLUMN status CASCADE",
                "2BP01",
                format!(
                    r#"cannot drop trigger pgwatch_{conditional}_update of table public.o_ddl: it belongs to pgwatch watch {conditional} (channel "o_ddl_cond")"#
                ),
            ),
            (
                "ALTER TABLE o_ddl RENAME COLUMN status TO state",
                "2BP01",
                format!(
                    r#"cannot rename a column of table public.o_ddl to "state": pgwatch watch {conditional} (channel "o_ddl_cond") has a condition that refers to it"#
                ),
            ),
            ("ALTER TABLE o_ddl ALTER COLUMN status TYPE varchar(10)", "0A000", String::new()),
            (
                "ALTER TABLE o_ddl DROP CONSTRAINT o_ddl_pkey",
                "2BP01",
                format!(
                    r#"cannot drop constraint o_ddl_pkey of table public.o_ddl: pgwatch watch {plain} (channel "public.o_ddl") identifies rows by this primary key"#
                ),
            ),
            // Keys that may repeat until the check would let coalescing fold different rows.
            ("ALTER TABLE o_ddl DROP CONSTRAINT o_ddl_pkey, ADD PRIMARY KEY (id) DEFERRABLE", "2BP01", String::new()),
            ("ALTER TABLE o_ddl DROP CONSTRAINT o_ddl_pkey, ADD PRIMARY KEY (id, role_id)", "2BP01", String::new()),
        ] {
            let sql = sql.replace("{plain}", &plain.to_string());
            let (got, got_message) = failure(&mut writer, &sql);
            assert_eq!(got, code, "{sql}: {got_message}");
            if !message.is_empty() {
                assert_eq!(got_message, message, "{sql}");
            }
            assert_eq!(catalog(&mut writer), before, "{sql} changed the watch");
            // One statement at a time: a worker folds changes that reach it together.
            writer.batch_execute("INSERT INTO o_ddl VALUES (1, 1, 'on', 'a')").unwrap();
            listener.expect_on(&[(
                "public.o_ddl",
                r#"{"tbl":"public.o_ddl","op":"insert","rows":[{"id":1,"role_id":1}]}"#,
            )]);
            writer.batch_execute("DELETE FROM o_ddl").unwrap();
            listener.expect_on(&[(
                "public.o_ddl",
                r#"{"tbl":"public.o_ddl","op":"delete","rows":[{"id":1,"role_id":1}]}"#,
            )]);
        }
        // Changes the watches can follow: new types (the key's index is rebuilt; subscribers of
        // the watches that send them refetch), new and dropped unwatched columns and constraints,
        // the primary key put back as it was.
        writer
            .batch_execute(
                "BEGIN;
                 ALTER TABLE o_ddl ALTER COLUMN role_id TYPE text USING 'r' || role_id;
                 ALTER TABLE o_ddl ALTER COLUMN id TYPE bigint;
                 ALTER TABLE o_ddl ADD COLUMN added int DEFAULT 5;
                 ALTER TABLE o_ddl DROP COLUMN name;
                 ALTER TABLE o_ddl ADD CONSTRAINT o_ddl_positive CHECK (id > 0), ADD UNIQUE (id, added);
                 ALTER TABLE o_ddl DROP CONSTRAINT o_ddl_positive, DROP CONSTRAINT o_ddl_id_added_key;
                 ALTER TABLE o_ddl DROP CONSTRAINT o_ddl_pkey, ADD CONSTRAINT o_ddl_pkey PRIMARY KEY (id);
                 COMMIT",
            )
            .unwrap();
        listener.expect_on(&[
            ("public.o_ddl", r#"{"tbl":"public.o_ddl","op":"resync"}"#),
            ("o_ddl_cond", r#"{"tbl":"public.o_ddl","op":"resync"}"#),
        ]);
        writer.batch_execute("INSERT INTO o_ddl VALUES (2, 'r2', 'on')").unwrap();
        listener
            .expect_on(&[("public.o_ddl", r#"{"tbl":"public.o_ddl","op":"insert","rows":[{"id":2,"role_id":"r2"}]}"#)]);
        writer.batch_execute("UPDATE o_ddl SET added = 6").unwrap();
        listener.expect_on(&[
            ("public.o_ddl", r#"{"tbl":"public.o_ddl","op":"update","rows":[{"id":2,"role_id":"r2"}]}"#),
            ("o_ddl_cond", r#"{"tbl":"public.o_ddl","op":"update","rows":[{"id":2}]}"#),
        ]);
        // What unwatch_table and DROP TABLE drop is not refused.
        writer
            .batch_execute("SELECT unwatch_table('o_ddl', 'o_ddl_cond'); ALTER TABLE o_ddl DROP COLUMN status")
            .unwrap();
        writer.batch_execute("DROP TABLE o_ddl").unwrap();
    }
}

#[test]
fn ddl_that_changes_what_a_table_holds_has_its_subscribers_refetch() {
    let _serial = serial();
    let resync = r#"{"tbl":"public.o_plain","op":"resync"}"#;
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "DROP SCHEMA IF EXISTS o_elsewhere CASCADE; DROP ROLE IF EXISTS o_owner; CREATE ROLE o_owner;
             CREATE TABLE o_parts (id int PRIMARY KEY, v int) PARTITION BY RANGE (id);
             CREATE TABLE o_parts_1 PARTITION OF o_parts FOR VALUES FROM (0) TO (10);
             CREATE SCHEMA o_elsewhere;
             CREATE TABLE o_elsewhere.o_parts_3 PARTITION OF o_parts FOR VALUES FROM (20) TO (30);
             CREATE TABLE o_parts_4 PARTITION OF o_parts FOR VALUES FROM (30) TO (40);
             ALTER TABLE o_parts_4 OWNER TO o_owner;
             CREATE TABLE o_parts_2 (id int PRIMARY KEY, v int);
             INSERT INTO o_parts_2 VALUES (15, 1);
             CREATE TABLE o_ref (id int PRIMARY KEY); INSERT INTO o_ref VALUES (7);
             CREATE TABLE o_parts_5 PARTITION OF o_parts FOR VALUES FROM (40) TO (50);
             ALTER TABLE o_parts_5 ADD FOREIGN KEY (v) REFERENCES o_ref;
             CREATE TABLE o_plain (id int PRIMARY KEY, v int, note text);
             SELECT watch_table('o_parts', '*', '{v}');
             SELECT watch_table('o_plain', '*', '{v}');
             SELECT watch_table('o_plain', 'insert', '{note}', label => 'o_plain_notes')",
            &["public.o_parts", "public.o_plain", "o_plain_notes"],
        );
        // Rows join the table with no insert to say so: its subscribers refetch, after what the
        // transaction sends of its own.
        listener.expect_after(
            &mut writer,
            "BEGIN; INSERT INTO o_parts VALUES (1, 1);
             ALTER TABLE o_parts ATTACH PARTITION o_parts_2 FOR VALUES FROM (10) TO (20); COMMIT",
            &[
                r#"{"tbl":"public.o_parts","op":"insert","rows":[{"id":1,"v":1}]}"#,
                r#"{"tbl":"public.o_parts","op":"resync"}"#,
            ],
        );
        // A command rolled back to a savepoint changed nothing: no refetch.
        writer
            .batch_execute("BEGIN; SAVEPOINT s; ALTER TABLE o_parts DETACH PARTITION o_parts_2; ROLLBACK TO s; COMMIT")
            .unwrap();
        listener.expect_silence();
        writer.batch_execute("INSERT INTO o_parts VALUES (45, 7)").unwrap();
        listener.expect_on(&[("public.o_parts", r#"{"tbl":"public.o_parts","op":"insert","rows":[{"id":45,"v":7}]}"#)]);
        // Rows leave it with no delete: truncated alone (PostgreSQL passes no statement trigger
        // down; pgwatch is preloaded here), also as a table that references a truncated one
        // (CASCADE), detached, or dropped with their partition, also by DROP SCHEMA ... CASCADE
        // or DROP OWNED.
        for ddl in [
            "TRUNCATE o_parts_2",
            "TRUNCATE o_ref CASCADE",
            "ALTER TABLE o_parts DETACH PARTITION o_parts_2",
            "DROP TABLE o_parts_1",
            "DROP SCHEMA o_elsewhere CASCADE",
            "DROP OWNED BY o_owner",
        ] {
            listener.expect_after(&mut writer, ddl, &[r#"{"tbl":"public.o_parts","op":"resync"}"#]);
        }
        // A sent column's values may read differently under another type: the watches that
        // send it refetch, the others do not.
        writer.batch_execute("ALTER TABLE o_plain ALTER COLUMN v TYPE numeric(10, 1)").unwrap();
        listener.expect_on(&[("public.o_plain", resync)]);
        writer.batch_execute("ALTER TABLE o_plain ALTER COLUMN note TYPE varchar(20)").unwrap();
        listener.expect_on(&[("o_plain_notes", resync)]);
        // Changes written while pgwatch's triggers were disabled were not seen: enabling them
        // again has every watch of the table refetch; enabling what was not disabled does not.
        writer
            .batch_execute(
                "ALTER TABLE o_plain DISABLE TRIGGER USER; INSERT INTO o_plain VALUES (1, 1, 'x');
                 ALTER TABLE o_plain ENABLE TRIGGER USER",
            )
            .unwrap();
        listener.expect_on(&[("public.o_plain", resync), ("o_plain_notes", resync)]);
        writer.batch_execute("ALTER TABLE o_plain ENABLE TRIGGER USER").unwrap();
        listener.expect_silence();
        // Making a watch's triggers again enables them: what they missed is announced too.
        writer
            .batch_execute(
                "ALTER TABLE o_plain DISABLE TRIGGER USER; INSERT INTO o_plain VALUES (2, 2, 'y');
                 SELECT watch_table('o_plain', '*', '{v}')",
            )
            .unwrap();
        listener.expect_on(&[("public.o_plain", resync)]);
        writer.batch_execute("ALTER TABLE o_plain ENABLE TRIGGER USER").unwrap();
        listener.expect_on(&[("public.o_plain", resync), ("o_plain_notes", resync)]);
        writer.batch_execute("DROP TABLE o_parts, o_parts_2, o_plain, o_ref; DROP ROLE o_owner").unwrap();
    }
    // A compact watch's refetch goes after the transaction's rows too, also when the DDL came first.
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE o_cparts (id int PRIMARY KEY) PARTITION BY RANGE (id);
             CREATE TABLE o_cparts_1 (id int PRIMARY KEY);
             SELECT watch_table('o_cparts', payload => 'compact')",
            &["public.o_cparts"],
        );
        listener.expect_after(
            &mut writer,
            "BEGIN; ALTER TABLE o_cparts ATTACH PARTITION o_cparts_1 FOR VALUES FROM (0) TO (10);
             INSERT INTO o_cparts VALUES (1); COMMIT",
            &[
                r#"{"tbl":"public.o_cparts","op":"insert","cols":["id"],"rows":[[1]]}"#,
                r#"{"tbl":"public.o_cparts","op":"resync"}"#,
            ],
        );
        writer.batch_execute("DROP TABLE o_cparts").unwrap();
    }
    // On a retained channel the refetch is a reset marker with reason "ddl", in the log like any
    // payload: not a gap.
    let (mut writer, mut listener) = watched(
        "worker",
        "CREATE TABLE o_kept (id int PRIMARY KEY) PARTITION BY RANGE (id);
         CREATE TABLE o_kept_1 (id int PRIMARY KEY); INSERT INTO o_kept_1 VALUES (1);
         SELECT watch_table('o_kept', retain => '1 hour')",
        &["public.o_kept"],
    );
    let resets = stat(&mut writer, "feed_resets");
    let before: i64 = writer.query_one("SELECT pgwatch.position('public.o_kept')", &[]).unwrap().get(0);
    let marker = r#"{"tbl":"public.o_kept","op":"reset","reason":"ddl"}"#;
    listener.expect_after(
        &mut writer,
        "ALTER TABLE o_kept ATTACH PARTITION o_kept_1 FOR VALUES FROM (0) TO (10)",
        &[marker],
    );
    assert_eq!(
        replayed(&mut writer, "public.o_kept", before),
        [format!(r#"{{"tbl":"public.o_kept","op":"reset","seq":{},"reason":"ddl"}}"#, before + 1)]
    );
    assert_eq!(stat(&mut writer, "feed_resets"), resets, "not counted as a gap");
    writer.batch_execute("DROP TABLE o_kept").unwrap();
}

#[test]
fn keys_that_may_repeat_cannot_get_under_a_watch_and_drops_are_checked_under_replica() {
    let _serial = serial();
    let mut client = connect();
    client
        .batch_execute(
            "CREATE TABLE o_defer (id int PRIMARY KEY) PARTITION BY RANGE (id);
             CREATE TABLE o_defer_1 (id int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED);
             CREATE TABLE o_defer_2 (id int PRIMARY KEY) PARTITION BY RANGE (id);
             CREATE TABLE o_defer_2a (id int PRIMARY KEY DEFERRABLE);
             ALTER TABLE o_defer ATTACH PARTITION o_defer_2 FOR VALUES FROM (100) TO (200);
             SELECT watch_table('o_defer')",
        )
        .unwrap();
    let id = watch_id(&mut client, "public.o_defer");
    // PostgreSQL attaches a partition whose key is deferrable to a key that is not.
    for (sql, table) in [
        ("ALTER TABLE o_defer ATTACH PARTITION o_defer_1 FOR VALUES FROM (0) TO (100)", "public.o_defer_1"),
        ("ALTER TABLE o_defer_2 ATTACH PARTITION o_defer_2a FOR VALUES FROM (100) TO (150)", "public.o_defer_2a"),
    ] {
        assert_eq!(
            failure(&mut client, sql),
            (
                "2BP01".to_string(),
                format!(
                    r#"the primary key of table {table} is deferrable: pgwatch watch {id} (channel "public.o_defer") of table public.o_defer needs keys unique after every row"#
                )
            ),
            "{sql}"
        );
    }
    client
        .batch_execute(
            "SELECT unwatch_table('o_defer');
             ALTER TABLE o_defer_2 ATTACH PARTITION o_defer_2a FOR VALUES FROM (100) TO (150)",
        )
        .unwrap();
    assert_eq!(
        failure(&mut client, "SELECT watch_table('o_defer')"),
        ("55000".to_string(), "the primary key of table public.o_defer_2a is deferrable".to_string())
    );
    // DDL under session_replication_role = replica (a subscriber's, or a migration's) is checked
    // and followed alike.
    client
        .batch_execute(
            "CREATE TABLE o_replica (id int PRIMARY KEY); SELECT watch_table('o_replica');
             SET session_replication_role = replica",
        )
        .unwrap();
    let (code, _) = failure(&mut client, "ALTER TABLE o_replica DROP CONSTRAINT o_replica_pkey");
    assert_eq!(code, "2BP01");
    client.batch_execute("DROP TABLE o_replica; RESET session_replication_role").unwrap();
    let left: i64 = client
        .query_one("SELECT count(*) FROM pgwatch.watches WHERE channel = 'public.o_replica'", &[])
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "DROP TABLE under replica left its watch behind");
    client.batch_execute("DROP TABLE o_defer, o_defer_1").unwrap();
}

#[test]
fn a_key_or_trigger_column_its_condition_does_not_name_can_be_renamed() {
    let _serial = serial();
    let (mut writer, mut listener) = watched(
        "inline",
        "CREATE TABLE o_kren (id int PRIMARY KEY, status text, note text);
         INSERT INTO o_kren VALUES (1, 'a', 'x');
         SELECT watch_table('o_kren', 'update', '{status}', trigger_columns => '{status}',
                            condition => $$NEW.note IS NOT NULL$$)",
        &["public.o_kren"],
    );
    // pgwatch's own part of the trigger (UPDATE OF, the comparisons) follows these renames.
    writer
        .batch_execute("ALTER TABLE o_kren RENAME COLUMN id TO ident; ALTER TABLE o_kren RENAME COLUMN status TO state")
        .unwrap();
    writer.batch_execute("UPDATE o_kren SET ident = 2").unwrap();
    listener.expect(&[
        r#"{"tbl":"public.o_kren","op":"resync"}"#,
        r#"{"tbl":"public.o_kren","op":"delete","rows":[{"ident":1,"state":"a"}]}"#,
        r#"{"tbl":"public.o_kren","op":"insert","rows":[{"ident":2,"state":"a"}]}"#,
    ]);
    // The condition's own column is refused, as before.
    let (code, message) = failure(&mut writer, "ALTER TABLE o_kren RENAME COLUMN note TO remark");
    assert_eq!(code, "2BP01", "{message}");
}
