//! A real, throwaway PostgreSQL for the tests: one cluster per test
//! process, listening only on a unix socket in a temp dir (so parallel test
//! processes never collide), a fresh database per sidekey instance.
//!
//! `SIDEKEY_TEST_BACKEND=postgres` runs every suite against it; the cluster
//! tests use it always. initdb refuses root, so the cluster runs as the
//! `postgres` user (Debian's `postgresql` package creates it; `.ci/run`
//! installs the package). A watchdog stops the cluster when this process
//! ends, however it ends.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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

fn pg_bin() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    dirs.retain(|d| d.join("initdb").exists());
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries not found under /usr/lib/postgresql; install Debian's package: apt-get install -y postgresql"
        )
    })
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn as_postgres(bin: &Path, tool: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
    c
}

impl Cluster {
    /// A cluster of its own (for a test that stops and starts it).
    pub fn start_new() -> Cluster {
        let bin = pg_bin();
        let dir = tempfile::Builder::new()
            .prefix("sidekey-pg-")
            .tempdir()
            .unwrap()
            .keep();
        run(
            Command::new("chown").args(["postgres:postgres"]).arg(&dir),
            "chown",
        );
        run(Command::new("chmod").arg("700").arg(&dir), "chmod");
        let data = dir.join("data");
        run(
            as_postgres(&bin, "initdb").arg("-D").arg(&data).args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ]),
            "initdb",
        );
        run(
        as_postgres(&bin, "pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("log"))
            .args(["-w", "-o"])
            .arg(format!(
                "-k {} -c listen_addresses='' -p 5432 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=400",
                dir.display()
            ))
            .arg("start"),
        "pg_ctl start",
    );
        // Stops the cluster and removes it once this test process is gone.
        let watchdog = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
         runuser -u postgres -- {pg_ctl} -D {data} stop -m immediate >/dev/null 2>&1; \
         rm -rf {dir}",
            pid = std::process::id(),
            pg_ctl = bin.join("pg_ctl").display(),
            data = data.display(),
            dir = dir.display(),
        );
        // Detached (setsid, backgrounded by a shell we wait for) so that
        // it outlives this process and cleans up after it.
        let quoted = watchdog.replace('\'', "'\\''");
        run(
            Command::new("sh").arg("-c").arg(format!(
                "setsid sh -c '{quoted}' </dev/null >/dev/null 2>&1 &"
            )),
            "start the cluster watchdog",
        );
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
        let data = self.dir.join("data");
        let mut c = as_postgres(&self.bin, "pg_ctl");
        c.arg("-D").arg(&data).arg("-w");
        if action == "start" {
            c.arg("-l").arg(self.dir.join("log")).arg("-o").arg(format!(
                "-k {} -c listen_addresses='' -p 5432 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=400",
                self.dir.display()
            ));
        } else {
            c.args(["-m", "fast"]);
        }
        c.arg(action);
        run(&mut c, &format!("pg_ctl {action}"));
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
