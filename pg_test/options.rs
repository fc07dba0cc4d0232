//! End-to-end tests of the watch options: trigger columns, conditions, TRUNCATE, partitions and
//! inheritance, triggers and cascades that change watched tables, key-only and compact payloads,
//! replicas and logical replication.

use super::support::{
    connect, connect_to, database, failure, per_row, serial, watch_id, watched, Listener, MODES, WAIT,
};

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
        // A key change always fires: a subscriber's copy must lose the old key and gain the new.
        writer.batch_execute("UPDATE o_tc SET id = 5").unwrap();
        listener.expect(&[
            r#"{"tbl":"public.o_tc","op":"delete","rows":[{"id":1,"role_id":2}]}"#,
            r#"{"tbl":"public.o_tc","op":"insert","rows":[{"id":5,"role_id":2}]}"#,
        ]);
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
             SELECT watch_table('o_trunc', 'update', label => 'o_trunc_kept', retain => '1 hour');
             CREATE TABLE o_trunc_parts (id int PRIMARY KEY) PARTITION BY RANGE (id);
             CREATE TABLE o_trunc_parts_1 PARTITION OF o_trunc_parts FOR VALUES FROM (0) TO (10);
             SELECT watch_table('o_trunc_parts', 'truncate')",
            &["public.o_trunc", "o_trunc_rows", "o_trunc_kept", "public.o_trunc_parts"],
        );
        let truncate = r#"{"tbl":"public.o_trunc","op":"truncate"}"#;
        // Watches that do not report truncate still have their subscribers refetch: their copies
        // hold rows the table no longer has.
        let resync = r#"{"tbl":"public.o_trunc","op":"resync"}"#;
        let reset = r#"{"tbl":"public.o_trunc","op":"reset","reason":"truncate"}"#;
        let insert = |id: i32| format!(r#"{{"tbl":"public.o_trunc","op":"insert","rows":[{{"id":{id}}}]}}"#);
        writer
            .batch_execute(
                "BEGIN; INSERT INTO o_trunc VALUES (1); TRUNCATE o_trunc; INSERT INTO o_trunc VALUES (2); COMMIT",
            )
            .unwrap();
        // The insert of 1 is gone with the truncate; the watches without 'truncate' refetch after
        // what came after it.
        listener.expect_on(&[
            ("public.o_trunc", truncate),
            ("public.o_trunc", &insert(2)),
            ("o_trunc_rows", &insert(2)),
            ("o_trunc_rows", resync),
            ("o_trunc_kept", reset),
        ]);
        writer
            .batch_execute(
                "BEGIN; INSERT INTO o_trunc VALUES (3); SAVEPOINT s; TRUNCATE o_trunc; ROLLBACK TO s; COMMIT",
            )
            .unwrap();
        listener.expect_on(&[("public.o_trunc", &insert(3)), ("o_trunc_rows", &insert(3))]);
        writer.batch_execute("TRUNCATE o_trunc").unwrap();
        listener.expect_on(&[("public.o_trunc", truncate), ("o_trunc_rows", resync), ("o_trunc_kept", reset)]);
        writer.batch_execute("INSERT INTO o_trunc_parts VALUES (1); TRUNCATE o_trunc_parts").unwrap();
        listener.expect_on(&[("public.o_trunc_parts", r#"{"tbl":"public.o_trunc_parts","op":"truncate"}"#)]);
    }
}

#[test]
fn rows_another_truncate_trigger_writes_first_are_refetched() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE o_reseed (id int PRIMARY KEY, v text);
             CREATE OR REPLACE FUNCTION o_reseed_default() RETURNS trigger LANGUAGE plpgsql
                 AS $$ BEGIN INSERT INTO o_reseed VALUES (0, 'default'); RETURN NULL; END $$;
             CREATE TRIGGER add_default AFTER TRUNCATE ON o_reseed FOR EACH STATEMENT
                 EXECUTE FUNCTION o_reseed_default();
             SELECT watch_table('o_reseed', 'insert, update, delete, truncate', '{v}')",
            &["public.o_reseed"],
        );
        // The trigger, named before pgwatch's, writes its row before pgwatch's truncate is
        // recorded, which drops what came before it: subscribers refetch after the truncate.
        writer.batch_execute("TRUNCATE o_reseed").unwrap();
        listener.expect_on(&[
            ("public.o_reseed", r#"{"tbl":"public.o_reseed","op":"truncate"}"#),
            ("public.o_reseed", r#"{"tbl":"public.o_reseed","op":"resync"}"#),
        ]);
        // One named after pgwatch's writes after the truncate is recorded: its row is sent.
        writer
            .batch_execute(
                "DROP TRIGGER add_default ON o_reseed;
                 CREATE TRIGGER zz_default AFTER TRUNCATE ON o_reseed FOR EACH STATEMENT
                     EXECUTE FUNCTION o_reseed_default();
                 TRUNCATE o_reseed",
            )
            .unwrap();
        listener.expect_on(&[
            ("public.o_reseed", r#"{"tbl":"public.o_reseed","op":"truncate"}"#),
            ("public.o_reseed", r#"{"tbl":"public.o_reseed","op":"insert","rows":[{"id":0,"v":"default"}]}"#),
        ]);
    }
    connect().batch_execute("DROP TABLE o_reseed; DROP FUNCTION o_reseed_default()").unwrap();
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
             CREATE TABLE o_parts_2 (v text, id int NOT NULL)",
            &["public.o_parts"],
        );
        // Attaching and detaching have subscribers refetch (see the ddl tests).
        let resync = r#"{"tbl":"public.o_parts","op":"resync"}"#;
        listener.expect_after(
            &mut writer,
            "ALTER TABLE o_parts ATTACH PARTITION o_parts_2 FOR VALUES FROM (10) TO (20)",
            &[resync],
        );
        // o_parts_2's columns stand in another order: rows are still read by name.
        writer.batch_execute("INSERT INTO o_parts VALUES (1, 'a'), (11, 'b')").unwrap();
        listener.expect(&[r#"{"tbl":"public.o_parts","op":"insert","rows":[{"id":1,"v":"a"},{"id":11,"v":"b"}]}"#]);
        writer
            .batch_execute("ALTER TABLE o_parts DETACH PARTITION o_parts_2; INSERT INTO o_parts_2 VALUES ('c', 12)")
            .unwrap();
        listener.expect(&[resync]);
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
    // A row trigger named before pgwatch's updates each row before pgwatch's trigger sees the
    // insert: the update reaches pgwatch first, so the rows are sent as their keys, flagged
    // partial, for subscribers to fetch (as they were inserted, their stamp would be stale).
    let full =
        r#"{"tbl":"public.o_touch","op":"insert","rows":[{"id":1,"v":"a","stamp":7},{"id":2,"v":"b","stamp":7}]}"#;
    let partial = r#"{"tbl":"public.o_touch","op":"update","rows":[{"id":1,"partial":true},{"id":2,"partial":true}]}"#;
    for (level, name, filter, per_row_after, expected) in [
        ("ROW", "z_stamp", "id = NEW.id", true, full),
        ("ROW", "a_stamp", "id = NEW.id", true, partial),
        ("STATEMENT", "a_stamp", "stamp = 0", true, full),
        ("STATEMENT", "z_stamp", "stamp = 0", false, full),
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
            listener.expect(&[expected]);
        }
    }
}

#[test]
fn a_row_another_trigger_deletes_right_after_its_insert_is_not_kept() {
    let _serial = serial();
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE o_reject (id int PRIMARY KEY, v text);
             SELECT watch_table('o_reject', '*', '{v}');
             CREATE OR REPLACE FUNCTION o_reject() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN DELETE FROM o_reject WHERE id = NEW.id AND NEW.v = 'bad'; RETURN NULL; END $$;
             CREATE TRIGGER a_reject AFTER INSERT ON o_reject FOR EACH ROW EXECUTE FUNCTION o_reject()",
            &["public.o_reject"],
        );
        // The trigger fires before pgwatch's and deletes the row it reacts to: pgwatch sees the
        // delete first, then the insert of a row that is already gone, which it sends as its
        // key for subscribers to fetch (and find gone), not as a row to keep.
        listener.expect_after(
            &mut writer,
            "INSERT INTO o_reject VALUES (1, 'bad'), (2, 'good')",
            &[
                r#"{"tbl":"public.o_reject","op":"update","rows":[{"id":1,"partial":true}]}"#,
                r#"{"tbl":"public.o_reject","op":"insert","rows":[{"id":2,"v":"good"}]}"#,
            ],
        );
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
        // The new trigger has pgwatch make the watch's triggers again, enabled: what the disabled
        // one might have missed is announced.
        listener.expect(&[r#"{"tbl":"public.o_legacy","op":"resync"}"#]);
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
        listener.expect(&[r#"{"tbl":"public.\"o_a\"\"b\\c\"","op":"insert","rows":[{"x,{y}":1,"it's":"z"}]}"#]);
    }
}

#[test]
fn a_watch_defined_again_differently_has_its_subscribers_refetch() {
    let _serial = serial();
    let resync = r#"{"tbl":"public.o_redef","op":"resync"}"#;
    for mode in MODES {
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE o_redef (id int PRIMARY KEY, a text, b text); SELECT watch_table('o_redef', '*', '{a}')",
            &["public.o_redef"],
        );
        // The same definition again, as an application that makes its watches as it starts does:
        // nothing to tell.
        writer.batch_execute("SELECT watch_table('o_redef', '*', '{a}')").unwrap();
        listener.expect_silence();
        // What subscribers' copies hold was sent by the old definition: other columns, another
        // payload format, other events.
        for definition in
            ["'*', '{a,b}'", "'*', '{a,b}', payload => 'compact'", "'insert, update', '{a,b}', payload => 'compact'"]
        {
            listener.expect_after(&mut writer, &format!("SELECT watch_table('o_redef', {definition})"), &[resync]);
        }
        writer.batch_execute("DROP TABLE o_redef").unwrap();
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
fn a_row_moved_to_another_partition_is_a_key_change_for_every_watch_that_reports_updates() {
    let _serial = serial();
    for mode in MODES {
        // PostgreSQL runs a move as a delete and an insert, and fires no update trigger for it.
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE o_move (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
             CREATE TABLE o_move_1 PARTITION OF o_move FOR VALUES FROM (0) TO (100);
             CREATE TABLE o_move_2 PARTITION OF o_move FOR VALUES FROM (100) TO (200);
             INSERT INTO o_move VALUES (1, 'a'), (2, 'b');
             SELECT watch_table('o_move', 'update', '{v}', label => 'o_move_u');
             SELECT watch_table('o_move', 'insert, update', '{v}', label => 'o_move_iu');
             SELECT watch_table('o_move', 'update, delete', '{v}', label => 'o_move_ud');
             SELECT watch_table('o_move', 'update', '{v}', condition => $$NEW.v <> 'hidden'$$, label => 'o_move_c');
             SELECT watch_table('o_move', 'update', '{v}', trigger_columns => '{v}', condition => $$NEW.v <> 'hidden'$$,
                                label => 'o_move_tc')",
            &["o_move_u", "o_move_iu", "o_move_ud", "o_move_c", "o_move_tc"],
        );
        let all = ["o_move_u", "o_move_iu", "o_move_ud", "o_move_c", "o_move_tc"];
        let delete = |row: &str| format!(r#"{{"tbl":"public.o_move","op":"delete","rows":[{row}]}}"#);
        let insert = |row: &str| format!(r#"{{"tbl":"public.o_move","op":"insert","rows":[{row}]}}"#);
        // What each of `watches` gets for a row moved from `old` to `new`: its delete and insert
        // (o_move_iu, which reports inserts, with the rows `inserted` too, in one payload).
        let moved = |watches: &[&str], old: &str, new: &str, inserted: &str| -> Vec<(String, String)> {
            let with = insert(&[new, inserted].into_iter().filter(|r| !r.is_empty()).collect::<Vec<_>>().join(","));
            let came = |c: &str| if c == "o_move_iu" { with.clone() } else { insert(new) };
            watches.iter().flat_map(|&c| [(c.to_string(), delete(old)), (c.to_string(), came(c))]).collect()
        };
        let expect = |listener: &mut Listener, expected: Vec<(String, String)>| {
            listener.expect_on(&expected.iter().map(|(c, p)| (c.as_str(), p.as_str())).collect::<Vec<_>>());
        };
        writer.batch_execute("UPDATE o_move SET id = 150 WHERE id = 1").unwrap();
        expect(&mut listener, moved(&all, r#"{"id":1,"v":"a"}"#, r#"{"id":150,"v":"a"}"#, ""));
        // The condition reads the new row: it judges the whole move, as it would an update (a
        // filtered channel never carries rows its condition keeps out). Trigger columns do not
        // count for a move: it changes the key.
        writer.batch_execute("UPDATE o_move SET id = 160, v = 'hidden' WHERE id = 2").unwrap();
        expect(&mut listener, moved(&all[..3], r#"{"id":2,"v":"b"}"#, r#"{"id":160,"v":"hidden"}"#, ""));
        // Inserts and deletes that move nothing reach only the watches that report them.
        writer.batch_execute("INSERT INTO o_move VALUES (3, 'c')").unwrap();
        listener.expect_on(&[("o_move_iu", &insert(r#"{"id":3,"v":"c"}"#))]);
        writer.batch_execute("DELETE FROM o_move WHERE id = 3").unwrap();
        listener.expect_on(&[("o_move_ud", &delete(r#"{"id":3,"v":"c"}"#))]);
        // Moved back within one transaction, after another change.
        writer
            .batch_execute(
                "BEGIN; INSERT INTO o_move VALUES (4, 'd'); UPDATE o_move SET id = 50 WHERE id = 150; COMMIT",
            )
            .unwrap();
        let four = r#"{"id":4,"v":"d"}"#;
        let mut expected = moved(&all, r#"{"id":150,"v":"a"}"#, r#"{"id":50,"v":"a"}"#, "");
        // o_move_iu lists the insert of 4 first, in the same payload.
        expected[3].1 = insert(&format!(r#"{four},{{"id":50,"v":"a"}}"#));
        expect(&mut listener, expected);
        // A move whose new row the condition keeps out, then an insert it lets through, in one
        // command: the held old row does not go out with that insert.
        writer
            .batch_execute(
                "WITH m AS (UPDATE o_move SET id = 60 WHERE id = 160 RETURNING id) INSERT INTO o_move SELECT 6, 'f' FROM m",
            )
            .unwrap();
        let six = r#"{"id":6,"v":"f"}"#;
        expect(&mut listener, moved(&all[..3], r#"{"id":160,"v":"hidden"}"#, r#"{"id":60,"v":"hidden"}"#, six));
        writer.batch_execute("DROP TABLE o_move").unwrap();
    }
}

#[test]
fn a_partitions_watch_sends_the_rows_moved_out_of_it_and_pairs_nothing() {
    let _serial = serial();
    for mode in MODES {
        // The insert half of a row moved out lands where the partition's watch has no trigger:
        // an insert it does see in the same statement is another row's.
        let (mut writer, mut listener) = watched(
            mode,
            "CREATE TABLE o_leaf (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
             CREATE TABLE o_leaf_1 PARTITION OF o_leaf FOR VALUES FROM (0) TO (100);
             CREATE TABLE o_leaf_2 PARTITION OF o_leaf FOR VALUES FROM (100) TO (200);
             INSERT INTO o_leaf VALUES (1, 'hidden'), (160, 'x');
             SELECT watch_table('o_leaf_1', 'update', '{v}', label => 'o_leaf_u');
             SELECT watch_table('o_leaf_1', 'update', '{v}', condition => $$NEW.v <> 'hidden'$$, label => 'o_leaf_c')",
            &["o_leaf_u", "o_leaf_c"],
        );
        writer
            .batch_execute("UPDATE o_leaf SET id = CASE id WHEN 1 THEN 150 ELSE 60 END WHERE id IN (1, 160)")
            .unwrap();
        listener
            .expect_on(&[("o_leaf_u", r#"{"tbl":"public.o_leaf_1","op":"delete","rows":[{"id":1,"v":"hidden"}]}"#)]);
        writer.batch_execute("DROP TABLE o_leaf").unwrap();
    }
}
