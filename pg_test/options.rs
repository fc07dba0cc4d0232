//! End-to-end tests of the watch options and of operations on watched tables: trigger columns,
//! conditions, TRUNCATE, partitions, replicas, key-only payloads, DDL, upgrades, dump and restore.

use postgres::Client;

use super::support::{connect, connect_to, failure, serial, watched, without_locations, Listener, MODES, WAIT};

/// A fresh database `name` with pgwatch installed (at `version`, if given), and a connection to it.
fn database(admin: &mut Client, name: &str, version: Option<&str>) -> Client {
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).unwrap();
    admin.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    let mut db = connect_to(admin, name);
    let version = version.map(|v| format!(" VERSION '{v}'")).unwrap_or_default();
    db.batch_execute(&format!("CREATE EXTENSION pgwatch{version}")).unwrap();
    db
}

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

/// The id of the watch on `channel`.
fn watch_id(client: &mut Client, channel: &str) -> i64 {
    client.query_one("SELECT id FROM pgwatch.watches WHERE channel = $1", &[&channel]).unwrap().get(0)
}

#[test]
fn trigger_columns_send_only_updates_that_change_them() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE o_tc (id int PRIMARY KEY, role_id int, name text, doc json);
             INSERT INTO o_tc VALUES (1, 1, 'a', '{}');
             SELECT watch_table('o_tc', 'update', '{role_id}', trigger_columns => '{role_id,doc}')",
            &["public.o_tc"],
        );
        // Not a trigger column; a trigger column set to its own value; json, which has no
        // equality operator, set to the same text.
        writer
            .batch_execute(
                "UPDATE o_tc SET name = 'b'; UPDATE o_tc SET role_id = role_id; UPDATE o_tc SET doc = '{}', name = 'c'",
            )
            .unwrap();
        listener.expect_silence();
        writer.batch_execute("UPDATE o_tc SET role_id = 2, name = 'd'").unwrap();
        listener.expect(&[r#"{"tbl":"public.o_tc","op":"update","rows":[{"id":1,"role_id":2,"old":{"role_id":1}}]}"#]);
        writer.batch_execute(r#"UPDATE o_tc SET doc = '{"a":1}'"#).unwrap();
        listener.expect(&[r#"{"tbl":"public.o_tc","op":"update","rows":[{"id":1,"role_id":2}]}"#]);
    }
}

#[test]
fn rows_stored_before_a_watched_column_was_added_carry_its_default() {
    let _serial = serial();
    for mode in MODES {
        // ADD COLUMN with a constant default rewrites nothing: the rows already stored stay
        // shorter, and PostgreSQL reads the default for them from the table's descriptor.
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE o_fast (id int PRIMARY KEY);
             INSERT INTO o_fast VALUES (1), (2);
             ALTER TABLE o_fast ADD COLUMN tier int DEFAULT 7;
             SELECT watch_table('o_fast', '*', '{tier}')",
            &["public.o_fast"],
        );
        writer.batch_execute("DELETE FROM o_fast WHERE id = 1").unwrap();
        listener.expect(&[r#"{"tbl":"public.o_fast","op":"delete","rows":[{"id":1,"tier":7}]}"#]);
        writer.batch_execute("UPDATE o_fast SET tier = 8").unwrap();
        listener.expect(&[r#"{"tbl":"public.o_fast","op":"update","rows":[{"id":2,"tier":8,"old":{"tier":7}}]}"#]);
    }
}

#[test]
fn a_condition_filters_rows() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE o_cond (id int PRIMARY KEY, status text, note text);
             SELECT watch_table('o_cond', 'insert, update', condition => $$NEW.status = 'active' -- live rows only$$);
             SELECT watch_table('o_cond', 'update', label => 'o_cond_status', trigger_columns => '{status}',
                                condition => $$OLD.status IS NOT NULL$$)",
            &["public.o_cond", "o_cond_status"],
        );
        writer.batch_execute("INSERT INTO o_cond VALUES (1, 'draft'), (2, 'active')").unwrap();
        listener.expect_on(&[("public.o_cond", r#"{"tbl":"public.o_cond","op":"insert","rows":[{"id":2}]}"#)]);
        // Only the first watch: the second fires on changes of status.
        writer.batch_execute("UPDATE o_cond SET note = 'n' WHERE id = 2").unwrap();
        listener.expect_on(&[("public.o_cond", r#"{"tbl":"public.o_cond","op":"update","rows":[{"id":2}]}"#)]);
        writer.batch_execute("UPDATE o_cond SET status = 'gone' WHERE id = 2").unwrap();
        listener.expect_on(&[("o_cond_status", r#"{"tbl":"public.o_cond","op":"update","rows":[{"id":2}]}"#)]);
        writer.batch_execute("UPDATE o_cond SET status = 'active' WHERE id = 1").unwrap();
        let payload = r#"{"tbl":"public.o_cond","op":"update","rows":[{"id":1}]}"#;
        listener.expect_on(&[("public.o_cond", payload), ("o_cond_status", payload)]);
    }
}

#[test]
fn truncate_is_reported_after_what_it_makes_moot_is_dropped() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE o_trunc (id int PRIMARY KEY);
             SELECT watch_table('o_trunc', 'insert, delete, truncate');
             SELECT watch_table('o_trunc', 'insert', label => 'o_trunc_rows');
             CREATE TABLE o_trunc_parts (id int PRIMARY KEY) PARTITION BY RANGE (id);
             CREATE TABLE o_trunc_parts_1 PARTITION OF o_trunc_parts FOR VALUES FROM (0) TO (10);
             SELECT watch_table('o_trunc_parts', 'truncate')",
            &["public.o_trunc", "o_trunc_rows", "public.o_trunc_parts"],
        );
        let truncate = r#"{"tbl":"public.o_trunc","op":"truncate"}"#;
        let insert = |id: i32| format!(r#"{{"tbl":"public.o_trunc","op":"insert","rows":[{{"id":{id}}}]}}"#);
        writer
            .batch_execute(
                "BEGIN; INSERT INTO o_trunc VALUES (1); TRUNCATE o_trunc; INSERT INTO o_trunc VALUES (2); COMMIT",
            )
            .unwrap();
        // The insert of 1 is gone with the truncate; the watch without 'truncate' hears of 2 only.
        listener.expect_on(&[
            ("public.o_trunc", truncate),
            ("public.o_trunc", &insert(2)),
            ("o_trunc_rows", r#"{"tbl":"public.o_trunc","op":"insert","rows":[{"id":1},{"id":2}]}"#),
        ]);
        writer
            .batch_execute(
                "BEGIN; INSERT INTO o_trunc VALUES (3); SAVEPOINT s; TRUNCATE o_trunc; ROLLBACK TO s; COMMIT",
            )
            .unwrap();
        listener.expect_on(&[("public.o_trunc", &insert(3)), ("o_trunc_rows", &insert(3))]);
        writer.batch_execute("TRUNCATE o_trunc").unwrap();
        listener.expect_on(&[("public.o_trunc", truncate)]);
        writer.batch_execute("INSERT INTO o_trunc_parts VALUES (1); TRUNCATE o_trunc_parts").unwrap();
        listener.expect_on(&[("public.o_trunc_parts", r#"{"tbl":"public.o_trunc_parts","op":"truncate"}"#)]);
    }
}

#[test]
fn partitions_attached_later_report_under_the_parent_and_detached_ones_stop() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE o_parts (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
             CREATE TABLE o_parts_1 PARTITION OF o_parts FOR VALUES FROM (0) TO (10);
             SELECT watch_table('o_parts', '*', '{v}');
             CREATE TABLE o_parts_2 (v text, id int NOT NULL);
             ALTER TABLE o_parts ATTACH PARTITION o_parts_2 FOR VALUES FROM (10) TO (20)",
            &["public.o_parts"],
        );
        // o_parts_2's columns stand in another order: rows are still read by name.
        writer.batch_execute("INSERT INTO o_parts VALUES (1, 'a'), (11, 'b')").unwrap();
        listener.expect(&[r#"{"tbl":"public.o_parts","op":"insert","rows":[{"id":1,"v":"a"},{"id":11,"v":"b"}]}"#]);
        writer
            .batch_execute("ALTER TABLE o_parts DETACH PARTITION o_parts_2; INSERT INTO o_parts_2 VALUES ('c', 12)")
            .unwrap();
        writer.batch_execute("UPDATE o_parts SET v = 'z'").unwrap();
        listener.expect(&[r#"{"tbl":"public.o_parts","op":"update","rows":[{"id":1,"v":"z","old":{"v":"a"}}]}"#]);
    }
}

#[test]
fn a_watched_table_attached_as_a_partition_reports_rows_routed_through_its_parent() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE o_attach (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
             CREATE TABLE o_attach_1 (id int PRIMARY KEY, v text);
             SELECT watch_table('o_attach_1', '*', '{v}')",
            &["public.o_attach_1"],
        );
        // A plain table's watch fires once per statement; as a partition it must fire per row,
        // or rows written through the parent would go unseen.
        assert_eq!(per_row(&mut writer, "o_attach_1"), [false, false, false]);
        // Also under session_replication_role = replica, where ordinary event triggers sleep.
        writer
            .batch_execute(
                "SET session_replication_role = replica;
                 ALTER TABLE o_attach ATTACH PARTITION o_attach_1 FOR VALUES FROM (0) TO (10);
                 RESET session_replication_role",
            )
            .unwrap();
        assert_eq!(per_row(&mut writer, "o_attach_1"), [true, true, true]);
        writer.batch_execute("INSERT INTO o_attach VALUES (1, 'a')").unwrap();
        listener.expect(&[r#"{"tbl":"public.o_attach_1","op":"insert","rows":[{"id":1,"v":"a"}]}"#]);
        writer.batch_execute("UPDATE o_attach SET v = 'b'").unwrap();
        listener.expect(&[r#"{"tbl":"public.o_attach_1","op":"update","rows":[{"id":1,"v":"b","old":{"v":"a"}}]}"#]);
        writer.batch_execute("ALTER TABLE o_attach DETACH PARTITION o_attach_1; DELETE FROM o_attach_1").unwrap();
        listener.expect(&[r#"{"tbl":"public.o_attach_1","op":"delete","rows":[{"id":1,"v":"b"}]}"#]);
    }
}

/// Per pgwatch trigger on `table`, in name order: whether it fires per row.
fn per_row(client: &mut Client, table: &str) -> Vec<bool> {
    client
        .query(
            "SELECT (tgtype & 1) = 1 FROM pg_trigger WHERE tgrelid = $1::text::regclass
                AND tgfoid = 'pgwatch.capture'::regproc ORDER BY tgname",
            &[&table],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[test]
fn inheritance_trees_keep_row_triggers_whenever_they_are_formed() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE o_inh (id int PRIMARY KEY, v text);
             CREATE TABLE o_inh_child (id int PRIMARY KEY, v text);
             CREATE TABLE o_inh_late (id int PRIMARY KEY, v text);
             SELECT watch_table('o_inh', '*', '{v}');
             SELECT watch_table('o_inh_child', '*', '{v}');
             SELECT watch_table('o_inh_late', '*', '{v}')",
            &["public.o_inh", "public.o_inh_child", "public.o_inh_late"],
        );
        assert_eq!(per_row(&mut writer, "o_inh"), [false, false, false], "plain tables read transition tables");
        // Both sides of ALTER TABLE ... INHERIT, and the parent of CREATE TABLE ... INHERITS (here
        // inside CREATE SCHEMA, which fires no event trigger of its own for it), turn to row
        // triggers.
        writer
            .batch_execute(
                "DROP SCHEMA IF EXISTS o_inh_s CASCADE;
                 ALTER TABLE o_inh_child INHERIT o_inh;
                 CREATE SCHEMA o_inh_s CREATE TABLE o_inh_new () INHERITS (public.o_inh_late)",
            )
            .unwrap();
        for table in ["o_inh", "o_inh_child", "o_inh_late"] {
            assert_eq!(per_row(&mut writer, table), [true, true, true], "{table}");
        }
        // As with any row trigger: a statement on the parent fires the child's watch for the
        // child's rows, and the parent's for its own rows only.
        writer.batch_execute("INSERT INTO o_inh VALUES (1, 'p'); INSERT INTO o_inh_child VALUES (2, 'c')").unwrap();
        listener.expect_on(&[
            ("public.o_inh", r#"{"tbl":"public.o_inh","op":"insert","rows":[{"id":1,"v":"p"}]}"#),
            ("public.o_inh_child", r#"{"tbl":"public.o_inh_child","op":"insert","rows":[{"id":2,"v":"c"}]}"#),
        ]);
        writer.batch_execute("UPDATE o_inh SET v = v || '!'").unwrap();
        listener.expect_on(&[
            ("public.o_inh", r#"{"tbl":"public.o_inh","op":"update","rows":[{"id":1,"v":"p!","old":{"v":"p"}}]}"#),
            (
                "public.o_inh_child",
                r#"{"tbl":"public.o_inh_child","op":"update","rows":[{"id":2,"v":"c!","old":{"v":"c"}}]}"#,
            ),
        ]);
        writer.batch_execute("INSERT INTO o_inh_s.o_inh_new VALUES (3, 'n')").unwrap();
        listener.expect_silence();
    }
}

#[test]
fn triggers_that_change_the_table_again_are_seen_in_order() {
    let _serial = serial();
    // An AFTER trigger that writes the table again: its update must follow the insert it reacts
    // to. A row trigger (here firing after pgwatch's, by name) or a statement trigger named before
    // pgwatch's runs before a statement trigger of pgwatch would, so pgwatch turns to row
    // triggers; a statement trigger named after pgwatch's fires after it, and nothing changes.
    for (level, name, filter, per_row_after) in [
        ("ROW", "z_stamp", "id = NEW.id", true),
        ("STATEMENT", "a_stamp", "stamp = 0", true),
        ("STATEMENT", "z_stamp", "stamp = 0", false),
    ] {
        for mode in MODES {
            let (mut writer, mut listener) = watched(
                mode,
                &format!(
                    "CREATE TABLE o_touch (id int PRIMARY KEY, v text, stamp int);
                     SELECT watch_table('o_touch', '*', '{{v,stamp}}');
                     CREATE OR REPLACE FUNCTION o_touch_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
                       BEGIN UPDATE o_touch SET stamp = 7 WHERE {filter}; RETURN NULL; END $$"
                ),
                &["public.o_touch"],
            );
            assert_eq!(per_row(&mut writer, "o_touch"), [false, false, false]);
            writer
                .batch_execute(&format!(
                    "CREATE TRIGGER {name} AFTER INSERT ON o_touch FOR EACH {level} EXECUTE FUNCTION o_touch_stamp()"
                ))
                .unwrap();
            assert_eq!(per_row(&mut writer, "o_touch"), [per_row_after; 3], "{level} {name}");
            writer.batch_execute("INSERT INTO o_touch VALUES (1, 'a', 0), (2, 'b', 0)").unwrap();
            listener.expect(&[
                r#"{"tbl":"public.o_touch","op":"insert","rows":[{"id":1,"v":"a","stamp":7},{"id":2,"v":"b","stamp":7}]}"#,
            ]);
        }
    }
}

#[test]
fn rows_changed_by_foreign_key_cascades_and_copy_are_reported() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE o_fk_org (id int PRIMARY KEY);
             CREATE TABLE o_fk_user (id int PRIMARY KEY, org int REFERENCES o_fk_org ON UPDATE CASCADE ON DELETE CASCADE);
             INSERT INTO o_fk_org VALUES (1), (2);
             SELECT watch_table('o_fk_user', '*', '{org}')",
            &["public.o_fk_user"],
        );
        let mut copy = writer.copy_in("COPY o_fk_user FROM STDIN").unwrap();
        std::io::Write::write_all(&mut copy, b"10\t1\n11\t2\n").unwrap();
        copy.finish().unwrap();
        listener.expect(&[r#"{"tbl":"public.o_fk_user","op":"insert","rows":[{"id":10,"org":1},{"id":11,"org":2}]}"#]);
        writer.batch_execute("UPDATE o_fk_org SET id = 3 WHERE id = 1").unwrap();
        listener.expect(&[r#"{"tbl":"public.o_fk_user","op":"update","rows":[{"id":10,"org":3,"old":{"org":1}}]}"#]);
        writer.batch_execute("DELETE FROM o_fk_org WHERE id = 2").unwrap();
        listener.expect(&[r#"{"tbl":"public.o_fk_user","op":"delete","rows":[{"id":11,"org":2}]}"#]);
    }
}

#[test]
fn triggers_with_one_argument_per_field_as_earlier_builds_made_them_still_fire() {
    let _serial = serial();
    for mode in MODES {
        // What 0.1.0 made for a watch with the extra column role_id: one trigger, `pgwatch_<id>`,
        // one argument per field (in place of the watch's own insert trigger).
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE o_legacy (id int PRIMARY KEY, role_id int, name text);
             SELECT watch_table('o_legacy', 'insert', '{role_id}')",
            &["public.o_legacy"],
        );
        let id = watch_id(&mut writer, "public.o_legacy");
        writer
            .batch_execute(&format!(
                "ALTER TABLE o_legacy DISABLE TRIGGER pgwatch_{id}_insert;
                 CREATE TRIGGER pgwatch_{id} AFTER INSERT ON o_legacy FOR EACH ROW
                     EXECUTE FUNCTION pgwatch.capture('public.o_legacy', 'public.o_legacy', '1', 'id', 'role_id')"
            ))
            .unwrap();
        listener.expect_after(
            &mut writer,
            "INSERT INTO o_legacy VALUES (1, 7, 'a')",
            &[r#"{"tbl":"public.o_legacy","op":"insert","rows":[{"id":1,"role_id":7}]}"#],
        );
    }
}

#[test]
fn a_capture_trigger_with_an_argument_pgwatch_never_writes_is_refused() {
    let _serial = serial();
    let (mut writer, _listener) = watched(
        "inline",
        "CREATE TABLE o_foreign (id int PRIMARY KEY);
         CREATE TRIGGER pgwatch_foreign AFTER INSERT ON o_foreign FOR EACH ROW
             EXECUTE FUNCTION pgwatch.capture('public.o_foreign')",
        &["public.o_foreign"],
    );
    let (code, message) = failure(&mut writer, "INSERT INTO o_foreign VALUES (1)");
    assert_eq!(code, "39P01", "{message}");
    let rows: i64 = writer.query_one("SELECT count(*) FROM o_foreign", &[]).unwrap().get(0);
    assert_eq!(rows, 0);
}

#[test]
fn names_with_quotes_backslashes_commas_and_braces_reach_the_trigger_intact() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            r#"CREATE TABLE "o_a""b\c" ("x,{y}" int PRIMARY KEY, "it's" text);
               SELECT watch_table('"o_a""b\c"', extra_columns => $${"it's"}$$, label => 'o_awkward')"#,
            &["o_awkward"],
        );
        let args: i16 = writer
            .query_one(r#"SELECT tgnargs FROM pg_trigger WHERE tgrelid = '"o_a""b\c"'::regclass LIMIT 1"#, &[])
            .unwrap()
            .get(0);
        assert_eq!(args, 1);
        writer.batch_execute(r#"INSERT INTO "o_a""b\c" VALUES (1, 'z')"#).unwrap();
        listener.expect(&[r#"{"tbl":"public.o_a\"b\\c","op":"insert","rows":[{"x,{y}":1,"it's":"z"}]}"#]);
    }
}

#[test]
fn keys_payload_sends_key_columns_only() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE o_keys (id int PRIMARY KEY, secret text);
             SELECT watch_table('o_keys', payload => 'keys')",
            &["public.o_keys"],
        );
        // One statement at a time: a worker folds changes that reach it together.
        for (sql, payloads) in [
            ("INSERT INTO o_keys VALUES (1, 's')", &[r#"{"tbl":"public.o_keys","op":"insert","rows":[{"id":1}]}"#][..]),
            ("UPDATE o_keys SET secret = 't'", &[r#"{"tbl":"public.o_keys","op":"update","rows":[{"id":1}]}"#]),
            (
                "UPDATE o_keys SET id = 2",
                &[
                    r#"{"tbl":"public.o_keys","op":"delete","rows":[{"id":1}]}"#,
                    r#"{"tbl":"public.o_keys","op":"insert","rows":[{"id":2}]}"#,
                ],
            ),
        ] {
            listener.expect_after(&mut writer, sql, payloads);
        }
        let payload: String = writer
            .query_one("SELECT payload FROM pgwatch.watches WHERE channel = 'public.o_keys'", &[])
            .unwrap()
            .get(0);
        assert_eq!(payload, "keys");
    }
}

#[test]
fn compact_payload_sends_rows_as_arrays_under_their_column_names() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE o_compact (id int, region text, role_id int, body text, PRIMARY KEY (region, id));
             SELECT watch_table('o_compact', '*', '{role_id,body}', payload => 'compact')",
            &["public.o_compact"],
        );
        let head = |op: &str| {
            format!(r#"{{"tbl":"public.o_compact","op":"{op}","cols":["region","id","role_id","body"],"rows":"#)
        };
        // One statement at a time: a worker folds changes that reach it together.
        for (sql, payloads) in [
            (
                "INSERT INTO o_compact VALUES (1, 'eu', 7, 'a'), (2, 'us', NULL, 'b')",
                &[("insert", r#"[["eu",1,7,"a"],["us",2,null,"b"]]"#)][..],
            ),
            (
                "UPDATE o_compact SET role_id = 8 WHERE id = 1",
                &[("update", r#"[["eu",1,8,"a",{"old":["eu",1,7,"a"]}]]"#)],
            ),
            (
                "UPDATE o_compact SET body = 'c' WHERE id = 2",
                &[("update", r#"[["us",2,null,"c",{"old":["us",2,null,"b"]}]]"#)],
            ),
            (
                "UPDATE o_compact SET id = 3 WHERE id = 2",
                &[("delete", r#"[["us",2,null,"c"]]"#), ("insert", r#"[["us",3,null,"c"]]"#)],
            ),
            ("UPDATE o_compact SET region = region", &[("update", r#"[["eu",1,8,"a"],["us",3,null,"c"]]"#)]),
            (
                "UPDATE o_compact SET body = repeat('x', 9000) WHERE id = 1",
                &[("update", r#"[["eu",1,{"partial":true}]]"#)],
            ),
            ("DELETE FROM o_compact WHERE id = 3", &[("delete", r#"[["us",3,null,"c"]]"#)]),
        ] {
            let expected: Vec<String> = payloads.iter().map(|(op, rows)| format!("{}{rows}}}", head(op))).collect();
            listener.expect_after(&mut writer, sql, &expected.iter().map(String::as_str).collect::<Vec<_>>());
        }
        // A 10,000-row statement: every key once, in full payloads.
        writer
            .batch_execute(
                "TRUNCATE o_compact; INSERT INTO o_compact SELECT g, 'eu', g % 7 FROM generate_series(1, 10000) g",
            )
            .unwrap();
        let (rows, sizes) = listener.receive_rows(10000);
        let ids: Vec<i64> = rows.iter().map(|row| row[1].as_i64().unwrap()).collect();
        assert_eq!(ids, (1..=10000).collect::<Vec<_>>(), "{mode}");
        assert!(rows
            .iter()
            .all(|row| *row == serde_json::json!(["eu", row[1].clone(), row[1].as_i64().unwrap() % 7, null])));
        let (_, full) = sizes.split_last().unwrap();
        assert!(full.iter().all(|&len| len > 7950 && len < 8000), "{mode}: payloads not full: {sizes:?}");
    }
}

#[test]
fn fire_on_replica_notifies_changes_applied_by_logical_replication() {
    let _serial = serial();
    let mut admin = connect();
    let row = admin.query_one("SELECT inet_server_port(), current_user::text", &[]).unwrap();
    let (port, user): (i32, String) = (row.get(0), row.get(1));
    let mut publisher = database(&mut admin, "o_pub", None);
    publisher
        .batch_execute("CREATE TABLE r (id int PRIMARY KEY, v text); CREATE PUBLICATION o_pub FOR TABLE r")
        .unwrap();
    publisher.batch_execute("SELECT pg_create_logical_replication_slot('o_sub', 'pgoutput')").unwrap();
    let mut subscriber = database(&mut admin, "o_sub", None);
    subscriber
        .batch_execute(
            "CREATE TABLE r (id int PRIMARY KEY, v text);
             SELECT watch_table('r', 'insert', label => 'r_always', fire_on_replica => true);
             SELECT watch_table('r', 'insert', label => 'r_origin')",
        )
        .unwrap();
    let mut listener = Listener::new(connect_to(&mut admin, "o_sub"), &["r_always", "r_origin"]);
    subscriber
        .batch_execute(&format!(
            "CREATE SUBSCRIPTION o_sub CONNECTION 'host=localhost port={port} user={user} dbname=o_pub'
             PUBLICATION o_pub WITH (create_slot = false, slot_name = 'o_sub', copy_data = false)"
        ))
        .unwrap();
    publisher.batch_execute("INSERT INTO r VALUES (1, 'x')").unwrap();
    // The subscription's apply worker runs as a replica: only the ENABLE ALWAYS trigger fires.
    let got = listener.receive(1, WAIT);
    assert_eq!(got, [("r_always".to_string(), r#"{"tbl":"public.r","op":"insert","rows":[{"id":1}]}"#.to_string())]);
    listener.expect_silence();
    // Local writes reach both.
    subscriber.batch_execute("INSERT INTO r VALUES (2, 'y')").unwrap();
    let payload = r#"{"tbl":"public.r","op":"insert","rows":[{"id":2}]}"#;
    listener.expect_on(&[("r_always", payload), ("r_origin", payload)]);
    subscriber.batch_execute("DROP SUBSCRIPTION o_sub").unwrap();
    drop((publisher, subscriber, listener));
    admin.batch_execute("DROP DATABASE o_pub WITH (FORCE)").unwrap();
    admin.batch_execute("DROP DATABASE o_sub WITH (FORCE)").unwrap();
}

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
        listener.expect_on(&[(
            "o_s.o_ren",
            r#"{"tbl":"o_s.o_ren","op":"update","rows":[{"id":1,"role":2,"old":{"role":1}}]}"#,
        )]);
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
            ("o_ren_label", r#"{"tbl":"o_s.o_ren","op":"insert","rows":[{"key":2}]}"#),
        ]);
        // A table without a label changes channel with its name; a labelled one keeps it.
        writer
            .batch_execute("ALTER TABLE o_s.o_ren RENAME TO o_renamed; DELETE FROM o_s.o_renamed WHERE key = 2")
            .unwrap();
        listener
            .expect_on(&[("o_s.o_renamed", r#"{"tbl":"o_s.o_renamed","op":"delete","rows":[{"key":2,"role":3}]}"#)]);
        writer.batch_execute("ALTER SCHEMA o_s RENAME TO o_s2; INSERT INTO o_s2.o_renamed VALUES (3, 3)").unwrap();
        listener.expect_on(&[
            ("o_s2.o_renamed", r#"{"tbl":"o_s2.o_renamed","op":"insert","rows":[{"key":3,"role":3}]}"#),
            ("o_ren_label", r#"{"tbl":"o_s2.o_renamed","op":"insert","rows":[{"key":3}]}"#),
        ]);
        writer
            .batch_execute("ALTER TABLE o_s2.o_renamed SET SCHEMA public; UPDATE o_renamed SET role = 4 WHERE key = 3")
            .unwrap();
        listener.expect_on(&[(
            "public.o_renamed",
            r#"{"tbl":"public.o_renamed","op":"update","rows":[{"key":3,"role":4,"old":{"role":3}}]}"#,
        )]);
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
                    r#"cannot rename column "state" of table public.o_ddl: pgwatch watch {conditional} (channel "o_ddl_cond") has a condition that refers to it"#
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
        // Changes the watches can follow: new types (the key's index is rebuilt), new and dropped
        // unwatched columns and constraints, the primary key put back as it was.
        writer
            .batch_execute(
                "ALTER TABLE o_ddl ALTER COLUMN role_id TYPE text USING 'r' || role_id;
                 ALTER TABLE o_ddl ALTER COLUMN id TYPE bigint;
                 ALTER TABLE o_ddl ADD COLUMN added int DEFAULT 5;
                 ALTER TABLE o_ddl DROP COLUMN name;
                 ALTER TABLE o_ddl ADD CONSTRAINT o_ddl_positive CHECK (id > 0), ADD UNIQUE (id, added);
                 ALTER TABLE o_ddl DROP CONSTRAINT o_ddl_positive, DROP CONSTRAINT o_ddl_id_added_key;
                 ALTER TABLE o_ddl DROP CONSTRAINT o_ddl_pkey, ADD CONSTRAINT o_ddl_pkey PRIMARY KEY (id)",
            )
            .unwrap();
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
    assert_eq!(triggers, ["pgwatch_1_delete", "pgwatch_1_insert", "pgwatch_1_update", "pgwatch_2_delete"]);
    db.batch_execute("SELECT watch_table('users', 'insert, truncate', label => 'gone_users'); TRUNCATE users").unwrap();
    listener.expect_on(&[("gone_users", r#"{"tbl":"public.users","op":"truncate"}"#)]);

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
            "pgwatch_1_update statement 1",
            "pgwatch_2_update row 1",
            "pgwatch_3_insert row 1"
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
             CREATE TABLE notes (id int PRIMARY KEY);
             SELECT watch_table('notes')",
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
    let dump = std::env::temp_dir().join("pgwatch-o_dump.dump");
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
    assert_eq!((count("notes", "FOR EACH STATEMENT"), count("tree", "FOR EACH ROW")), (3, 3));
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
    assert_eq!(watches(&mut restored).len(), 5);
    drop((source, restored, listener));
    std::fs::remove_file(dump).unwrap();
    admin.batch_execute("DROP DATABASE o_dump WITH (FORCE)").unwrap();
    admin.batch_execute("DROP DATABASE o_restored WITH (FORCE)").unwrap();
}
