//! A real, throwaway PostgreSQL for the tests: one cluster per test
//! process, listening only on a unix socket in a temp dir (so parallel test
//! processes never collide), a fresh database per sidekey instance.
//!
//! `SIDEKEY_TEST_BACKEND=postgres` runs every suite against it; the cluster
//! tests use it always. initdb refuses root, so the cluster runs as the
//! `postgres` user (Debian's `postgresql` package creates it; `.ci/run`
//! installs the package). A watchdog stops the cluster when this process
//! ends, however it ends.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::pg_server;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct Cluster {
    /// The socket directory (also holds data/ and log).
    pub dir: PathBuf,
    pub bin: PathBuf,
}

/// Whether the suites run on PostgreSQL (`SIDEKEY_TEST_BACKEND=postgres`).
pub fn selected() -> bool {
    matches!(
        std::env::var("SIDEKEY_TEST_BACKEND").as_deref(),
        Ok("postgres") | Ok("pg") | Ok("postgresql")
    )
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static NEXT_DB: AtomicUsize = AtomicUsize::new(0);

/// The cluster this test process shares between its tests.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(Cluster::start_new)
}

/// Settings of the test clusters: durability off (a test's data is thrown
/// away), room for many sidekey instances' pools.
const SETTINGS: &str =
    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=400";

fn must(r: Result<(), String>) {
    if let Err(e) = r {
        panic!("{e}");
    }
}

impl Cluster {
    /// A cluster of its own (for a test that stops and starts it).
    pub fn start_new() -> Cluster {
        let bin = pg_server::server_bin().unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::Builder::new()
            .prefix("sidekey-pg-")
            .tempdir()
            .unwrap()
            .keep();
        must(pg_server::init(&bin, &dir));
        must(pg_server::start(&bin, &dir, SETTINGS));
        // Stops the cluster and removes it once this test process is gone.
        must(pg_server::watchdog(
            &bin,
            &dir,
            &format!("rm -rf {}", dir.display()),
        ));
        Cluster { dir, bin }
    }

    /// Runs SQL as the superuser on database `db`.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.dir)
            .args(["-U", "postgres", "-d", db, "-c", sql])
            .stdin(Stdio::null())
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A new empty database; returns its name.
    pub fn new_database(&self) -> String {
        let name = format!(
            "sk_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        name
    }

    /// The libpq URL sidekey is given for `db` (unix socket).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgresql://postgres@/{db}?host={}&sslmode=disable",
            self.dir.display()
        )
    }

    /// `pg_ctl stop` (fast) or `start`: an outage under traffic.
    pub fn ctl(&self, action: &str) {
        if action == "start" {
            must(pg_server::start(&self.bin, &self.dir, SETTINGS));
            return;
        }
        must(pg_server::run(
            pg_server::as_postgres(&self.bin, "pg_ctl")
                .arg("-D")
                .arg(self.dir.join("data"))
                .args(["-w", "-m", "fast"])
                .arg(action),
            &format!("pg_ctl {action}"),
        ));
    }

    /// `pg_dump` of one database, as text.
    pub fn dump(&self, db: &str) -> Vec<u8> {
        let dump = self.bin.join("pg_dump");
        let out = Command::new(dump)
            .arg("-h")
            .arg(&self.dir)
            .args(["-U", "postgres", db])
            .stdin(Stdio::null())
            .output()
            .expect("pg_dump");
        assert!(
            out.status.success(),
            "pg_dump: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}
