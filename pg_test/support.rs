//! Helpers for the end-to-end suites: connections, listeners that check sequence numbers, and
//! failures with their SQLSTATE. The including module provides `CONF`, its server's settings.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};

/// Both ways of delivering: by the writing transaction, and by the database's worker.
pub const MODES: [&str; 2] = ["inline", "worker"];

/// How long to wait for something that must come (a notification, a worker): generous, since
/// only a failing test waits it out, and a loaded machine can take seconds.
pub const WAIT: Duration = Duration::from_secs(60);

/// Polls `done` every 10 ms until it holds or `WAIT` has passed; whether it held.
pub fn eventually(mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + WAIT;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Counters are cluster-wide and several tests assert exact changes of them: tests run one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The database the end-to-end tests use: their own, so that what they commit (tables,
/// watches) never shows in pgrx's database, where the `#[pg_test]`s run at the same time.
const DATABASE: &str = "pgwatch_e2e";

/// A connection to the end-to-end tests' database, booting the test server on first use
/// (pgrx-tests boots it only while running a `#[pg_test]`, so this runs the one that checks the
/// extension is there) and making the database.
pub fn connect() -> Client {
    static MADE: std::sync::Once = std::sync::Once::new();
    pgrx_tests::run_test("the_test_server_has_pgwatch_installed", None, super::CONF.to_vec()).unwrap();
    let mut admin = pgrx_tests::client().unwrap().0;
    MADE.call_once(|| {
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")).unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {DATABASE}")).unwrap();
        connect_to(&mut admin, DATABASE).batch_execute("CREATE EXTENSION pgwatch").unwrap();
    });
    connect_to(&mut admin, DATABASE)
}

/// A connection to another database of the test server.
pub fn connect_to(via: &mut Client, dbname: &str) -> Client {
    config_to(via, dbname).connect(NoTls).unwrap()
}

/// What [`connect_to`] connects with, for a test to add to.
pub fn config_to(via: &mut Client, dbname: &str) -> postgres::Config {
    let row = via.query_one("SELECT inet_server_port(), current_user::text", &[]).unwrap();
    let (port, user): (i32, String) = (row.get(0), row.get(1));
    let mut config = postgres::Config::new();
    config.host("localhost").port(port as u16).user(&user).dbname(dbname);
    config
}

/// A fresh database `name` owned by a fresh role `owner` (both dropped first, if there), and a
/// connection to it as `admin`'s user.
pub fn owned_database(admin: &mut Client, name: &str, owner: &str) -> Client {
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).unwrap();
    admin.batch_execute(&format!("DROP ROLE IF EXISTS {owner}; CREATE ROLE {owner}")).unwrap();
    admin.batch_execute(&format!("CREATE DATABASE {name} OWNER {owner}")).unwrap();
    connect_to(admin, name)
}

/// A fresh database `name` with pgwatch installed (at `version`, if given), and a connection to it.
pub fn database(admin: &mut Client, name: &str, version: Option<&str>) -> Client {
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).unwrap();
    admin.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    let mut db = connect_to(admin, name);
    let version = version.map(|v| format!(" VERSION '{v}'")).unwrap_or_default();
    db.batch_execute(&format!("CREATE EXTENSION pgwatch{version}")).unwrap();
    db
}

/// A writer delivering in `mode` that ran `setup`, and a listener already listening on `channels`.
/// The tables and types `setup` creates are dropped first, so a test can run it once per mode.
pub fn watched(mode: &str, setup: &str, channels: &[&str]) -> (Client, Listener) {
    let mut writer = connect();
    writer.batch_execute(&format!("SET pgwatch.delivery = {mode}")).unwrap();
    for kind in ["TABLE", "TYPE"] {
        for created in setup.split(&format!("CREATE {kind} ")).skip(1) {
            let name = created.split(|c: char| c.is_whitespace() || c == '(').next().unwrap();
            writer.batch_execute(&format!("DROP {kind} IF EXISTS {name} CASCADE")).unwrap();
        }
    }
    writer.batch_execute(setup).unwrap();
    (writer, Listener::new(connect(), channels))
}

/// A connection that LISTENs, and checks that numbered payloads count up by one per channel.
pub struct Listener {
    pub client: Client,
    last_seq: HashMap<String, u64>,
}

impl Listener {
    pub fn new(mut client: Client, channels: &[&str]) -> Listener {
        for channel in channels {
            client.batch_execute(&format!("LISTEN \"{}\"", channel.replace('"', "\"\""))).unwrap();
        }
        Listener { client, last_seq: HashMap::new() }
    }

    /// Notifications as `(channel, payload)` as received, waiting up to `wait` for each.
    pub fn receive_raw(&mut self, count: usize, wait: Duration) -> Vec<(String, String)> {
        let mut notifications = self.client.notifications();
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

    /// Like `receive_raw`, with `"seq":N,` checked (one more than the channel's last) and removed.
    pub fn receive(&mut self, count: usize, wait: Duration) -> Vec<(String, String)> {
        let got = self.receive_raw(count, wait);
        got.into_iter().map(|(channel, payload)| (channel.clone(), self.check_seq(&channel, &payload))).collect()
    }

    fn check_seq(&mut self, channel: &str, payload: &str) -> String {
        let Some((start, seq, end)) = seq_of(payload) else { return payload.to_string() };
        if let Some(last) = self.last_seq.insert(channel.to_string(), seq) {
            assert_eq!(seq, last + 1, "seq gap on {channel}: {payload}");
        }
        format!("{}{}", &payload[..start], &payload[end..])
    }

    /// Receives payloads until `count` rows have arrived: the rows, and each payload's length.
    pub fn receive_rows(&mut self, count: usize) -> (Vec<serde_json::Value>, Vec<usize>) {
        let (mut rows, mut sizes) = (Vec::new(), Vec::new());
        while rows.len() < count {
            let Some((_, payload)) = self.receive(1, WAIT).pop() else {
                panic!("only {} of {count} rows arrived", rows.len());
            };
            let v: serde_json::Value = serde_json::from_str(&payload).unwrap();
            rows.extend(v["rows"].as_array().unwrap().iter().cloned());
            sizes.push(payload.len());
        }
        (rows, sizes)
    }

    /// Asserts that exactly these payloads (without seq) arrive, in this order, and nothing more.
    pub fn expect(&mut self, expected: &[&str]) {
        let got: Vec<String> = self.receive(expected.len(), WAIT).into_iter().map(|(_, p)| p).collect();
        assert_eq!(got, expected);
        self.expect_silence();
    }

    /// Runs `sql` on `writer`, then asserts that exactly these payloads arrive, as `expect` does.
    /// A test that expects each transaction's own payloads writes the next one only after them:
    /// a worker folds together the changes of the transactions it drains in one batch (an update
    /// and a delete of a row become one delete, two inserts one payload).
    pub fn expect_after(&mut self, writer: &mut Client, sql: &str, expected: &[&str]) {
        writer.batch_execute(sql).unwrap();
        self.expect(expected);
    }

    /// Asserts that exactly these `(channel, payload)` notifications (without seq) arrive, in any
    /// order across channels, and nothing more.
    pub fn expect_on(&mut self, expected: &[(&str, &str)]) {
        let mut got = self.receive(expected.len(), WAIT);
        let mut expected: Vec<(String, String)> =
            expected.iter().map(|(c, p)| (c.to_string(), p.to_string())).collect();
        got.sort();
        expected.sort();
        assert_eq!(got, expected);
        self.expect_silence();
    }

    pub fn expect_silence(&mut self) {
        let extra = self.receive_raw(1, Duration::from_millis(300));
        assert!(extra.is_empty(), "unexpected notification: {extra:?}");
    }
}

/// Where `"seq":N` stands in a payload's header (with the comma that separates it from the
/// next field), and N.
pub fn seq_of(payload: &str) -> Option<(usize, u64, usize)> {
    let op = payload.find(",\"op\":\"")? + 7;
    let op_end = op + payload[op..].find('"')? + 1;
    let digits = payload[op_end..].strip_prefix(",\"seq\":")?;
    let len = digits.find(|c: char| !c.is_ascii_digit())?;
    let seq = digits[..len].parse().ok()?;
    let end = op_end + ",\"seq\":".len() + len;
    // `{…,"op":"x","seq":N,"rows":…}` loses `"seq":N,`; `{…,"op":"x","seq":N}` loses `,"seq":N`.
    Some(if payload[end..].starts_with(',') { (op_end + 1, seq, end + 1) } else { (op_end, seq, end) })
}

/// A stored node tree without the `:location N` fields.
pub fn without_locations(tree: &str) -> String {
    let mut parts = tree.split(":location ");
    let mut out = parts.next().unwrap_or_default().to_string();
    for part in parts {
        out += part.trim_start_matches(|c: char| c == '-' || c.is_ascii_digit());
    }
    out
}

/// The SQLSTATE and message of a statement that must fail.
pub fn failure(client: &mut Client, sql: &str) -> (String, String) {
    let error = client.batch_execute(sql).expect_err(sql);
    let db = error.as_db_error().expect("a server error");
    (db.code().code().to_string(), db.message().to_string())
}

/// The payloads `pgwatch.replay()` returns for `channel` after `after_seq`.
pub fn replayed(client: &mut Client, channel: &str, after_seq: i64) -> Vec<String> {
    let rows = client.query("SELECT payload FROM pgwatch.replay($1, $2)", &[&channel, &after_seq]).unwrap();
    rows.iter().map(|row| row.get(0)).collect()
}

pub fn stat(client: &mut Client, counter: &str) -> i64 {
    client.query_one(&format!("SELECT {counter} FROM pgwatch.stats()"), &[]).unwrap().get(0)
}

/// Rebuilds a table's rows (key → payload row) from its notifications, failing on any
/// notification that does not fit what came before: a duplicate, a lost change, a stray row.
/// (Stricter than the README's rules, which take an insert of a key held as an update, since a
/// refetch may already show it: the tests that use this never refetch. A delete of a key it does
/// not hold is a row that transactions a worker sent together inserted and deleted.)
#[derive(Default)]
pub struct Replica {
    pub rows: HashMap<i64, serde_json::Value>,
    /// Resync notices received.
    pub resyncs: usize,
}

impl Replica {
    pub fn apply(&mut self, payload: &str) {
        let v: serde_json::Value = serde_json::from_str(payload).unwrap();
        assert!(v.get("overflow").is_none(), "unexpected overflow: {payload}");
        let op = v["op"].as_str().unwrap();
        if op == "resync" {
            // Older notifications may have come after newer ones: a client refetches; these
            // tests' writes never touch a key twice, so their rows cannot have come out of order.
            self.resyncs += 1;
            return;
        }
        for row in v["rows"].as_array().unwrap() {
            let mut row = row.clone();
            let id = row["id"].as_i64().unwrap();
            row.as_object_mut().unwrap().remove("old");
            match op {
                "insert" => assert!(self.rows.insert(id, row).is_none(), "insert of existing row {id}: {payload}"),
                "update" => assert!(self.rows.insert(id, row).is_some(), "update of missing row {id}: {payload}"),
                // A row inserted and deleted by transactions the worker sent together: its
                // delete, for a subscriber that may have fetched it in between.
                "delete" => {
                    self.rows.remove(&id);
                }
                other => panic!("unknown op {other}"),
            }
        }
    }
}

#[test]
fn seq_is_found_only_in_the_header() {
    let payload = r#"{"tbl":"t","op":"update","seq":17,"rows":[{"id":1}]}"#;
    let (start, seq, end) = seq_of(payload).unwrap();
    assert_eq!(
        (seq, format!("{}{}", &payload[..start], &payload[end..])),
        (17, r#"{"tbl":"t","op":"update","rows":[{"id":1}]}"#.into())
    );
    assert_eq!(seq_of(r#"{"tbl":"t","op":"insert","rows":[{"seq":1}]}"#), None);
    let truncate = r#"{"tbl":"t","op":"truncate","seq":3}"#;
    let (start, seq, end) = seq_of(truncate).unwrap();
    assert_eq!(
        (seq, format!("{}{}", &truncate[..start], &truncate[end..])),
        (3, r#"{"tbl":"t","op":"truncate"}"#.into())
    );
}

/// The id of the watch on `channel`.
pub fn watch_id(client: &mut Client, channel: &str) -> i64 {
    client.query_one("SELECT id FROM pgwatch.watches WHERE channel = $1", &[&channel]).unwrap().get(0)
}

/// Per pgwatch trigger of a row event on `table`, in name order: whether it fires per row (a
/// TRUNCATE trigger always fires per statement).
pub fn per_row(client: &mut Client, table: &str) -> Vec<bool> {
    client
        .query(
            "SELECT (tgtype & 1) = 1 FROM pg_trigger WHERE tgrelid = $1::text::regclass
                AND tgfoid = 'pgwatch.capture'::regproc AND (tgtype & 32) = 0 ORDER BY tgname",
            &[&table],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}
