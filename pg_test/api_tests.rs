//! `#[pg_test]`s of the SQL API. Each runs inside a transaction that is rolled back, so nothing
//! here can observe a NOTIFY: delivery is covered end to end in `e2e.rs`.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn users() {
        Spi::run("CREATE TABLE users (id int PRIMARY KEY, role_id int, name text, org text)").unwrap();
    }

    fn count(query: &str) -> i64 {
        Spi::get_one::<i64>(query).unwrap().unwrap()
    }

    /// Triggers pgwatch made on `table` (partition clones included).
    fn triggers(table: &str) -> i64 {
        count(&format!(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = '{table}'::regclass AND tgfoid = 'pgwatch.capture'::regproc"
        ))
    }

    /// pgrx-tests boots its server only while running a `#[pg_test]` by name: the end-to-end
    /// suites run this one first (see `support::connect`).
    #[pg_test]
    fn the_test_server_has_pgwatch_installed() {
        assert_eq!(count("SELECT count(*) FROM pg_extension WHERE extname = 'pgwatch'"), 1);
    }

    #[pg_test]
    fn watch_table_returns_the_watch() {
        users();
        let row = Spi::get_three::<String, String, Vec<String>>(
            "SELECT channel, tbl::text, events FROM watch_table('users', 'update')",
        )
        .unwrap();
        assert_eq!(row, (Some("public.users".into()), Some("users".into()), Some(vec!["update".into()])));
        let columns = Spi::get_two::<Vec<String>, Vec<String>>(
            "SELECT extra_columns, key_columns FROM pgwatch.watches WHERE tbl = 'users'::regclass",
        )
        .unwrap();
        assert_eq!(columns, (Some(vec![]), Some(vec!["id".into()])));
        assert_eq!(triggers("users"), 2, "update, and truncate (a resync)");
    }

    #[pg_test]
    fn events_are_normalised() {
        users();
        for (given, expected) in [
            ("{update,insert}", vec!["insert", "update"]),
            ("deleted", vec!["delete"]),
            ("*", vec!["insert", "update", "delete"]),
            ("all", vec!["insert", "update", "delete"]),
            ("Inserted, DELETE", vec!["insert", "delete"]),
        ] {
            let events =
                Spi::get_one::<Vec<String>>(&format!("SELECT events FROM watch_table('users', '{given}')")).unwrap();
            assert_eq!(events.unwrap(), expected, "events => '{given}'");
        }
        let default = Spi::get_one::<Vec<String>>("SELECT events FROM watch_table('users')").unwrap().unwrap();
        assert_eq!(default, ["insert", "update", "delete"]);
    }

    #[pg_test]
    fn composite_keys_in_key_order_and_extra_columns() {
        // A column the key's index includes is not a key column: it can be an extra one.
        Spi::run(
            "CREATE TABLE members (org_id int, user_id int, role text, note text,
                                   PRIMARY KEY (user_id, org_id) INCLUDE (role))",
        )
        .unwrap();
        let row = Spi::get_two::<Vec<String>, Vec<String>>(
            "SELECT key_columns, extra_columns FROM watch_table('members', 'update', '{note,role}')",
        )
        .unwrap();
        assert_eq!(row, (Some(vec!["user_id".into(), "org_id".into()]), Some(vec!["note".into(), "role".into()])));
    }

    #[pg_test]
    fn watching_again_replaces_the_definition() {
        users();
        let first = count("SELECT id FROM watch_table('users', 'insert')");
        let second = count("SELECT id FROM watch_table('users', 'update', '{role_id}')");
        assert_eq!(first, second);
        assert_eq!(count("SELECT count(*) FROM pgwatch.watches"), 1);
        assert_eq!(triggers("users"), 2);
        let (events, extras) =
            Spi::get_two::<Vec<String>, Vec<String>>("SELECT events, extra_columns FROM pgwatch.watches").unwrap();
        assert_eq!((events.unwrap(), extras.unwrap()), (vec!["update".into()], vec!["role_id".into()]));
        // The trigger now fires on UPDATE only.
        let tgtype = count(
            "SELECT tgtype::bigint FROM pg_trigger WHERE tgfoid = 'pgwatch.capture'::regproc AND (tgtype & 32) = 0",
        );
        assert_eq!(tgtype & (4 | 8 | 16), 16, "TRIGGER_TYPE_UPDATE only");
    }

    #[pg_test]
    fn labels_make_separate_watches_with_their_own_channel() {
        users();
        Spi::run("SELECT watch_table('users', 'insert')").unwrap();
        let channel = Spi::get_one::<String>("SELECT channel FROM watch_table('users', 'update', label => 'admins')")
            .unwrap()
            .unwrap();
        assert_eq!(channel, "admins");
        assert_eq!(count("SELECT count(*) FROM pgwatch.watches"), 2);
        assert_eq!(triggers("users"), 4);
        assert_eq!(count("SELECT unwatch_table('users', 'admins')"), 1);
        assert_eq!(triggers("users"), 2);
        assert_eq!(count("SELECT unwatch_table('users')"), 1);
        assert_eq!(triggers("users"), 0);
        assert_eq!(count("SELECT unwatch_table('users')"), 0);
    }

    #[pg_test]
    fn unwatch_without_label_removes_every_watch_of_the_table() {
        users();
        Spi::run("SELECT watch_table('users'); SELECT watch_table('users', label => 'a'); SELECT watch_table('users', label => 'b')")
            .unwrap();
        assert_eq!(count("SELECT unwatch_table('users')"), 3);
        assert_eq!(count("SELECT count(*) FROM pgwatch.watches"), 0);
        assert_eq!(triggers("users"), 0);
    }

    #[pg_test]
    fn partitioned_tables_are_watched_on_the_parent() {
        Spi::run(
            "CREATE TABLE events (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
             CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
             SELECT watch_table('events')",
        )
        .unwrap();
        assert_eq!(triggers("events"), 4, "one per row event, and truncate");
        assert_eq!(triggers("events_2024"), 3, "the row triggers cloned onto the partition");
        assert_eq!(
            Spi::get_one::<Vec<String>>("SELECT key_columns FROM pgwatch.watches").unwrap().unwrap(),
            ["id", "at"]
        );
    }

    #[pg_test]
    fn drop_table_forgets_its_watches() {
        users();
        Spi::run("CREATE TABLE other (id int PRIMARY KEY); SELECT watch_table('users'); SELECT watch_table('other')")
            .unwrap();
        Spi::run("DROP TABLE users").unwrap();
        assert_eq!(
            Spi::get_one::<String>("SELECT string_agg(channel, ',') FROM pgwatch.watches").unwrap().unwrap(),
            "public.other"
        );
    }

    #[pg_test]
    fn stats_is_one_row_of_counters() {
        assert_eq!(count("SELECT count(*) FROM pgwatch.stats() WHERE rows_captured >= 0 AND overflows >= 0"), 1);
    }

    #[pg_test(error = "\"public.user_names\" is not a table")]
    fn error_for_a_view() {
        users();
        Spi::run("CREATE VIEW user_names AS SELECT id, name FROM users; SELECT watch_table('user_names')").unwrap();
    }

    #[pg_test(error = "\"public.counter\" is not a table")]
    fn error_for_a_sequence() {
        Spi::run("CREATE SEQUENCE counter; SELECT watch_table('counter')").unwrap();
    }

    #[pg_test(error = "\"public.users_pkey\" is not a table")]
    fn error_for_an_index() {
        users();
        Spi::run("SELECT watch_table('users_pkey')").unwrap();
    }

    #[pg_test(error = "\"public.remote\" is not a table")]
    fn error_for_a_foreign_table() {
        Spi::run(
            "CREATE FOREIGN DATA WRAPPER nothing; CREATE SERVER nowhere FOREIGN DATA WRAPPER nothing;
             CREATE FOREIGN TABLE remote (id int) SERVER nowhere; SELECT watch_table('remote')",
        )
        .unwrap();
    }

    #[pg_test(error = "table public.logs has no primary key")]
    fn error_without_a_primary_key() {
        Spi::run("CREATE TABLE logs (id int UNIQUE, line text); SELECT watch_table('logs')").unwrap();
    }

    #[pg_test(error = "the primary key of table public.ledger is deferrable")]
    fn error_with_a_deferrable_primary_key() {
        Spi::run(
            "CREATE TABLE ledger (id int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED); SELECT watch_table('ledger')",
        )
        .unwrap();
    }

    #[pg_test(error = "column \"rol_id\" of relation public.users does not exist")]
    fn error_for_an_unknown_extra_column() {
        users();
        Spi::run("SELECT watch_table('users', 'update', '{role_id,rol_id}')").unwrap();
    }

    #[pg_test(error = "column \"role_id\" is listed twice in extra_columns")]
    fn error_for_a_duplicate_extra_column() {
        users();
        Spi::run("SELECT watch_table('users', 'update', '{role_id,name,role_id}')").unwrap();
    }

    #[pg_test(error = "column \"id\" is part of the primary key of public.users")]
    fn error_for_a_key_column_listed_as_extra() {
        users();
        Spi::run("SELECT watch_table('users', 'update', '{id}')").unwrap();
    }

    #[cfg(feature = "pg18")]
    #[pg_test(error = "column \"twice\" is a virtual generated column")]
    fn error_for_a_virtual_generated_extra_column() {
        Spi::run("CREATE TABLE virt (id int PRIMARY KEY, n int, twice int GENERATED ALWAYS AS (n * 2) VIRTUAL)")
            .unwrap();
        Spi::run("SELECT watch_table('virt', extra_columns => '{n,twice}')").unwrap();
    }

    #[pg_test(error = "extra_columns must not contain NULL")]
    fn error_for_a_null_extra_column() {
        users();
        Spi::run("SELECT watch_table('users', 'update', ARRAY['name', NULL])").unwrap();
    }

    #[pg_test(error = "unknown event \"upsert\"")]
    fn error_for_an_unknown_event() {
        users();
        Spi::run("SELECT watch_table('users', 'insert, upsert')").unwrap();
    }

    #[pg_test(error = "events names no event")]
    fn error_for_no_event() {
        users();
        Spi::run("SELECT watch_table('users', '{}')").unwrap();
    }

    #[pg_test(
        error = "channel name \"public.a_table_name_that_is_long_enough_to_push_the_channel_over\" is longer than 63 bytes"
    )]
    fn error_for_a_channel_name_too_long() {
        Spi::run(
            "CREATE TABLE a_table_name_that_is_long_enough_to_push_the_channel_over (id int PRIMARY KEY);
             SELECT watch_table('a_table_name_that_is_long_enough_to_push_the_channel_over')",
        )
        .unwrap();
    }

    #[pg_test(error = "label must not be empty")]
    fn error_for_an_empty_label() {
        users();
        Spi::run("SELECT watch_table('users', label => '')").unwrap();
    }

    #[pg_test(error = "tbl must not be NULL")]
    fn error_for_a_null_table() {
        Spi::run("SELECT watch_table(NULL)").unwrap();
    }

    #[pg_test(error = "permission denied to watch table public.users")]
    fn error_without_the_trigger_privilege() {
        users();
        Spi::run(
            "CREATE ROLE pgwatch_stranger; GRANT SELECT, INSERT ON users TO pgwatch_stranger;
             SET ROLE pgwatch_stranger; SELECT watch_table('users')",
        )
        .unwrap();
    }

    #[pg_test(error = "permission denied to watch table public.users")]
    fn unwatch_needs_the_trigger_privilege_too() {
        users();
        Spi::run("SELECT watch_table('users'); CREATE ROLE pgwatch_stranger; SET ROLE pgwatch_stranger; SELECT unwatch_table('users')")
            .unwrap();
    }

    #[pg_test]
    fn the_trigger_privilege_is_enough_to_watch() {
        users();
        Spi::run(
            "CREATE ROLE pgwatch_helper; GRANT TRIGGER ON users TO pgwatch_helper;
             SET ROLE pgwatch_helper; SELECT watch_table('users', 'insert'); SELECT unwatch_table('users'); RESET ROLE",
        )
        .unwrap();
        assert_eq!(count("SELECT count(*) FROM pgwatch.watches"), 0);
    }

    #[pg_test]
    fn options_are_stored_and_shape_the_triggers() {
        users();
        let row = Spi::get_three::<Vec<String>, String, Vec<String>>(
            "SELECT events, condition, trigger_columns FROM watch_table('users', 'update, delete, truncate',
                    trigger_columns => '{org,role_id}', condition => 'OLD.org IS NOT NULL', fire_on_replica => true)",
        )
        .unwrap();
        assert_eq!(
            row,
            (
                Some(vec!["update".into(), "delete".into(), "truncate".into()]),
                Some("OLD.org IS NOT NULL".into()),
                Some(vec!["org".into(), "role_id".into()])
            )
        );
        let id = count("SELECT id FROM pgwatch.watches");
        // Per trigger: events (tgtype bits), UPDATE OF columns, WHEN or not, fires on replicas.
        let shape = |name: &str| {
            Spi::get_one::<String>(&format!(
                "SELECT (tgtype & (1 | 4 | 8 | 16 | 32))::text || ' ' || tgattr::text || ' ' || (tgqual IS NOT NULL)::text
                        || ' ' || tgenabled::text
                   FROM pg_trigger WHERE tgname = '{name}'"
            ))
            .unwrap()
            .unwrap()
        };
        assert_eq!(
            shape(&format!("pgwatch_{id}_update")),
            "17 4 2 1 true A",
            "row, UPDATE OF org, role_id and the key"
        );
        assert_eq!(shape(&format!("pgwatch_{id}_delete")), "9  true A", "row, delete");
        assert_eq!(shape(&format!("pgwatch_{id}_truncate")), "32  false A", "statement, truncate");
        assert_eq!(triggers("users"), 3);
        let payload = Spi::get_one::<String>("SELECT payload FROM watch_table('users', payload => 'KEYS')").unwrap();
        assert_eq!(payload.as_deref(), Some("keys"));
        assert_eq!(triggers("users"), 4, "replaced: insert, update, delete, and truncate (a resync)");
    }

    #[pg_test]
    fn plain_tables_get_statement_triggers_that_read_transition_tables() {
        users();
        Spi::run(
            "CREATE TABLE p (id int PRIMARY KEY) PARTITION BY RANGE (id);
             CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (10);
             SELECT watch_table('users');
             SELECT watch_table('users', 'update, delete', label => 'cond', condition => 'OLD.org IS NULL');
             SELECT watch_table('users', 'insert, update', label => 'cols', trigger_columns => '{org}');
             SELECT watch_table('p', 'insert')",
        )
        .unwrap();
        // Per trigger: table, watch label, event, level, and the transition tables it asks for.
        let shapes = Spi::get_one::<String>(
            "SELECT string_agg(concat_ws(' ', t.tgrelid::regclass, coalesce(w.label, '-'),
                                         substring(t.tgname from '[a-z]+$'),
                                         CASE WHEN (t.tgtype & 1) = 1 THEN 'row' ELSE 'statement' END,
                                         coalesce(t.tgoldtable, '-') || '/' || coalesce(t.tgnewtable, '-')),
                               '; ' ORDER BY w.id, t.tgname, t.tgrelid::regclass::text)
               FROM pg_trigger t JOIN pgwatch.watches w ON t.tgname ~ ('^pgwatch_' || w.id || '_')
              WHERE t.tgfoid = 'pgwatch.capture'::regproc",
        )
        .unwrap()
        .unwrap();
        let expected = [
            "users - delete statement pgwatch_old/-",
            "users - insert statement -/pgwatch_new",
            "users - truncate statement -/-",
            "users - update statement pgwatch_old/pgwatch_new",
            "users cond delete row -/-",
            "users cond truncate statement -/-",
            "users cond update row -/-",
            "users cols insert statement -/pgwatch_new",
            "users cols truncate statement -/-",
            "users cols update row -/-",
            "p - insert row -/-",
            "p1 - insert row -/-",
            "p - truncate statement -/-",
        ];
        assert_eq!(shapes, expected.join("; "));
    }

    #[pg_test]
    fn partitions_fire_on_replicas_too_even_when_attached_later() {
        Spi::run(
            "CREATE TABLE p (id int PRIMARY KEY) PARTITION BY RANGE (id);
             CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (10);
             SELECT watch_table('p', 'insert', fire_on_replica => true);
             CREATE TABLE p2 PARTITION OF p FOR VALUES FROM (10) TO (20)",
        )
        .unwrap();
        let enabled = Spi::get_one::<String>(
            "SELECT string_agg(tgrelid::regclass::text || ':' || tgenabled::text, ',' ORDER BY tgrelid::regclass::text)
               FROM pg_trigger WHERE tgfoid = 'pgwatch.capture'::regproc",
        )
        .unwrap();
        assert_eq!(enabled.as_deref(), Some("p:A,p:A,p1:A,p2:A"), "insert, truncate on p; insert cloned");
    }
}
