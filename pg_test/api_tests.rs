//! `#[pg_test]`s of the SQL API: they run inside a transaction that is rolled back.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn watch_table_returns_the_watch() {
        Spi::run("CREATE TABLE users (id int PRIMARY KEY, role_id int, name text)").unwrap();
        let row = Spi::get_three::<String, String, Vec<String>>(
            "SELECT channel, tbl::text, events FROM watch_table('users', 'update')",
        )
        .unwrap();
        assert_eq!(row, (Some("public.users".into()), Some("users".into()), Some(vec!["update".into()])));
    }
}
