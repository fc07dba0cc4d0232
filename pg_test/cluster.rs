//! Clusters of their own for the suites that stop, crash, restart and promote servers: made with
//! the binaries of the test server (which has pgwatch installed), on ports the system had free.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};

use super::support::WAIT;

/// A cluster of the test server's PostgreSQL, run by the postgres user.
pub struct Cluster {
    bindir: String,
    pub dir: PathBuf,
    pub port: u16,
}

/// The test server's binary directory.
struct Server {
    bindir: String,
}

fn as_postgres(program: &str, args: &[&str]) -> std::process::Output {
    let output = Command::new("sudo").args(["-u", "postgres", program]).args(args).output().unwrap();
    assert!(output.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    output
}

impl Cluster {
    /// The test server (which has pgwatch installed).
    fn server() -> Server {
        pgrx_tests::run_test("the_test_server_has_pgwatch_installed", None, super::CONF.to_vec()).unwrap();
        let mut admin = pgrx_tests::client().unwrap().0;
        Server { bindir: admin.query_one("SELECT setting FROM pg_config WHERE name = 'BINDIR'", &[]).unwrap().get(0) }
    }

    /// An empty directory and a port of its own (one the system had free), so that other suites
    /// can run at the same time.
    fn empty(name: &str) -> Cluster {
        let Server { bindir } = Cluster::server();
        let port = std::net::TcpListener::bind("localhost:0").unwrap().local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("pgwatch-{name}-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Command::new("chown").args(["postgres:postgres"]).arg(&dir).status().unwrap();
        Cluster { bindir, dir, port }
    }

    /// A new cluster with pgwatch preloaded, started.
    pub fn new(name: &str) -> Cluster {
        let cluster = Cluster::empty(name);
        let data = cluster.data();
        as_postgres(&cluster.bin("initdb"), &["-D", &data, "-U", "postgres", "--auth=trust", "--no-sync"]);
        cluster.configure();
        cluster.pg_ctl(&["start"]);
        cluster
    }

    /// A streaming standby of `primary`, started.
    pub fn standby_of(primary: &Cluster, name: &str) -> Cluster {
        let cluster = Cluster::empty(name);
        let data = cluster.data();
        as_postgres(
            &cluster.bin("pg_basebackup"),
            &["-h", "localhost", "-p", &primary.port.to_string(), "-U", "postgres", "-D", &data, "-R", "-X", "stream"],
        );
        cluster.configure();
        // The connection string pg_basebackup writes may name options the server's libpq (the
        // system's) does not know.
        let path = format!("{data}/postgresql.auto.conf");
        let conf = std::fs::read_to_string(&path).unwrap()
            + &format!("primary_conninfo = 'host=localhost port={} user=postgres'\n", primary.port);
        std::fs::write(&path, conf).unwrap();
        cluster.pg_ctl(&["start"]);
        cluster
    }

    fn configure(&self) {
        let conf = format!(
            "port = {}\nlisten_addresses = 'localhost'\nunix_socket_directories = '{}'\nshared_preload_libraries = 'pgwatch'\nwal_level = replica\nmax_wal_senders = 4\nmax_prepared_transactions = 4\nfsync = off\n",
            self.port,
            self.dir.display()
        );
        let path = format!("{}/postgresql.auto.conf", self.data());
        let mut current = std::fs::read_to_string(&path).unwrap_or_default();
        current += &conf;
        std::fs::write(&path, current).unwrap();
    }

    pub fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    pub fn bin(&self, program: &str) -> String {
        format!("{}/{program}", self.bindir)
    }

    pub fn pg_ctl(&self, args: &[&str]) {
        let log = self.dir.join("log").display().to_string();
        let data = self.data();
        let mut all = vec!["-D", data.as_str(), "-l", log.as_str(), "-w", "-t", "120"];
        all.extend_from_slice(args);
        as_postgres(&self.bin("pg_ctl"), &all);
    }

    pub fn try_connect(&self, database: &str) -> Result<Client, postgres::Error> {
        postgres::Config::new().host("localhost").port(self.port).user("postgres").dbname(database).connect(NoTls)
    }

    /// A connection, waiting for the server to accept one (after a restart).
    pub fn connect(&self) -> Client {
        self.connect_to("postgres")
    }

    pub fn connect_to(&self, database: &str) -> Client {
        let deadline = Instant::now() + WAIT;
        loop {
            let answer =
                self.try_connect(database).and_then(|mut client| client.batch_execute("SELECT 1").map(|()| client));
            match answer {
                Ok(client) => return client,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => panic!("the server at port {} does not answer: {e}", self.port),
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.data();
        let _ = Command::new("sudo")
            .args(["-u", "postgres", &self.bin("pg_ctl"), "-D", &data, "-m", "immediate", "stop"])
            .output();
        // Kept after a failure: its server log tells why.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
