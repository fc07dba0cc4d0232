//! End-to-end tests: a real server, real client connections that LISTEN, exact payloads.

use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;

fn connect() -> Client {
    // Boots the test server once per test binary (the named #[pg_test] runs first).
    pgrx_tests::run_test("watch_table_returns_the_watch", None, crate::pg_test::postgresql_conf_options()).unwrap();
    pgrx_tests::client().unwrap().0
}

fn receive(listener: &mut Client, count: usize) -> Vec<String> {
    let mut got = Vec::new();
    let mut notifications = listener.notifications();
    let mut iter = notifications.timeout_iter(Duration::from_secs(5));
    while got.len() < count {
        match iter.next().unwrap() {
            Some(n) => got.push(n.payload().to_string()),
            None => break,
        }
    }
    got
}

#[test]
fn smoke() {
    let mut writer = connect();
    let mut listener = connect();
    writer.batch_execute("CREATE TABLE smoke (id int PRIMARY KEY, role_id int); SELECT watch_table('smoke', '*', '{role_id}')").unwrap();
    listener.batch_execute("LISTEN \"public.smoke\"").unwrap();
    writer.batch_execute("INSERT INTO smoke VALUES (1, 7), (2, 8)").unwrap();
    assert_eq!(receive(&mut listener, 1), [r#"{"tbl":"public.smoke","op":"insert","rows":[{"id":1,"role_id":7},{"id":2,"role_id":8}]}"#]);
}
