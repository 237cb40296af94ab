//! `--backend postgres`: a throwaway PostgreSQL cluster, the config that
//! points sidekey at it, and its transaction count during the load.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
// The throwaway PostgreSQL cluster is started exactly as the tests start
// theirs: the test kit serves both.
use sidekey_testkit::pg_server;

use crate::cli::{Args, BenchBackend};
use crate::report::{Case, Out, round3};

/// A PostgreSQL cluster of the run's own, as tests/support/pg.rs starts
/// them: Debian's server binaries, run as the `postgres` user (initdb
/// refuses root), listening only on a unix socket in a directory of the
/// run's temp dir, so it never collides with another cluster. Stopped
/// (`-m immediate`) on drop, and by a watchdog if this process dies first.
pub(crate) struct PgCluster {
    dir: PathBuf,
    bin: PathBuf,
    version: String,
    running: bool,
}

const PG_DATABASE: &str = "sidekey_bench";

impl PgCluster {
    /// initdb + pg_ctl start in `dir` (created here, owned by `postgres`),
    /// then an empty database for the run.
    fn start(dir: PathBuf) -> Result<PgCluster, String> {
        let bin = pg_server::server_bin().map_err(|e| format!("{e} or pass --postgres-url"))?;
        let version = bin
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        pg_server::init(&bin, &dir)?;
        let mut pg = PgCluster {
            dir,
            bin,
            version,
            running: false,
        };
        // PostgreSQL's durability defaults (fsync, synchronous_commit on):
        // what a deployment runs, unlike the test clusters.
        if let Err(e) = pg_server::start(&pg.bin, &pg.dir, "-c max_connections=200") {
            return Err(format!("{e}\n{}", pg.log_tail()));
        }
        pg.running = true;
        // Drop stops it on every ordinary exit; the watchdog if this
        // process dies first.
        pg_server::watchdog(&pg.bin, &pg.dir, "")?;
        pg_server::run(
            Command::new(pg.bin.join("createdb"))
                .arg("-h")
                .arg(&pg.dir)
                .args(["-U", "postgres", PG_DATABASE]),
            "createdb",
        )?;
        Ok(pg)
    }

    /// libpq URL over the unix socket.
    fn url(&self) -> String {
        format!(
            "postgresql://postgres@/{PG_DATABASE}?host={}&sslmode=disable",
            self.dir.display()
        )
    }

    /// Transactions committed or rolled back so far, cluster-wide.
    pub(crate) fn transactions(&self) -> Option<(i64, Instant)> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-t", "-A", "-h"])
            .arg(&self.dir)
            .args([
                "-U",
                "postgres",
                "-d",
                PG_DATABASE,
                "-c",
                "SELECT sum(xact_commit + xact_rollback) FROM pg_stat_database",
            ])
            .stdin(Stdio::null())
            .output()
            .ok()?;
        let n = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
        Some((n, Instant::now()))
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn stop(&mut self) {
        if !std::mem::take(&mut self.running) {
            return;
        }
        let _ = pg_server::as_postgres(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-w", "stop", "-m", "immediate"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `--backend postgres`: the cluster the bench started (None with
/// --postgres-url) and the URL sidekey is given.
pub(crate) fn start_postgres(
    args: &Args,
    dir: &Path,
) -> Result<(Option<PgCluster>, Option<String>), String> {
    if args.storm_replicas > 1 && args.backend != BenchBackend::Postgres {
        return Err(
            "--storm-replicas needs --backend postgres (a sled store is served by one process)"
                .into(),
        );
    }
    if args.storm_replicas > 1 && args.refresh_storm == 0 {
        return Err("--storm-replicas goes with --refresh-storm N".into());
    }
    if args.backend != BenchBackend::Postgres {
        if args.postgres_url.is_some() {
            return Err("--postgres-url goes with --backend postgres".into());
        }
        return Ok((None, None));
    }
    if let Some(url) = &args.postgres_url {
        return Ok((None, Some(url.clone())));
    }
    let t = Instant::now();
    let pg = PgCluster::start(dir.join("pg"))?;
    eprintln!(
        "sidekey-bench: PostgreSQL {} started in {:.1} s (unix socket in {}, durability defaults)",
        pg.version,
        t.elapsed().as_secs_f64(),
        pg.dir.display()
    );
    let url = pg.url();
    Ok((Some(pg), Some(url)))
}

/// How many transactions the throwaway cluster ran during the load cases:
/// a cached request should run none (the audit log's batches and the
/// listener's heartbeat do, in the background).
pub(crate) fn report_pg_transactions(
    out: &Out,
    pg: Option<&PgCluster>,
    before: Option<(i64, Instant)>,
    cases: &[Case],
) {
    let (Some(pg), Some((a, t0))) = (pg, before) else {
        return;
    };
    // The statistics reach pg_stat_database when a backend goes idle.
    std::thread::sleep(Duration::from_millis(1100));
    let Some((b, t1)) = pg.transactions() else {
        return;
    };
    // Minus the two queries of this count.
    let tx = (b - a - 2).max(0);
    let via: u64 = cases
        .iter()
        .filter(|c| c.target == "sidekey")
        .map(|c| c.requests)
        .sum();
    let secs = (t1 - t0).as_secs_f64();
    out.note(&format!(
        "PostgreSQL: {tx} transactions in {secs:.1} s of load cases ({:.1}/s) while sidekey answered {via} measured requests ({:.5} per request)",
        tx as f64 / secs.max(1e-9),
        tx as f64 / (via.max(1)) as f64
    ));
    out.json_line(&json!({
        "case": "postgres_transactions",
        "transactions": tx,
        "secs": round3(secs),
        "sidekey_requests": via,
    }));
}

/// Points the generated config at PostgreSQL (`[store] backend = "postgres"`).
pub(crate) fn use_postgres_store(dir: &Path, url: &str) -> Result<(), String> {
    let path = dir.join("config.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
    // A JSON string is a valid TOML basic string.
    let quoted = serde_json::to_string(url).map_err(|e| e.to_string())?;
    let with = text.replacen(
        "[store]\n",
        &format!("[store]\nbackend = \"postgres\"\npostgres_url = {quoted}\n"),
        1,
    );
    if with == text {
        return Err("the generated config has no [store] section".into());
    }
    std::fs::write(&path, with).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::run::TempDir;
    use crate::sidekey_proc::{Ports, write_config};

    #[test]
    fn postgres_backend_is_written_into_the_generated_config() {
        let dir = std::env::temp_dir().join(format!(
            "sidekey-bench-cfg-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let tmp = TempDir(dir.clone(), false);
        let args = Args::parse_from(["sidekey-bench"]);
        let ports = Ports {
            agent: 1,
            admin: 2,
            upstream: 3,
        };
        write_config(&dir, &ports, &args).unwrap();
        let sled = sidekey::config::Config::load(&dir.join("config.toml")).unwrap();
        assert_eq!(sled.store.backend, sidekey::config::StoreBackend::Sled);
        let url = "postgresql://postgres@/sidekey_bench?host=/tmp/a \"b\"&sslmode=disable";
        use_postgres_store(&dir, url).unwrap();
        let cfg = sidekey::config::Config::load(&dir.join("config.toml")).unwrap();
        assert_eq!(cfg.store.backend, sidekey::config::StoreBackend::Postgres);
        match sidekey::app::store_location(&cfg).unwrap() {
            sidekey::store::Location::Postgres(pg) => assert_eq!(pg.url.expose(), url),
            sidekey::store::Location::Sled(_) => panic!("still sled"),
        }
        drop(tmp);
    }

    /// Needs Debian's postgresql and root (initdb runs as `postgres`), as
    /// tests/cluster.rs does.
    #[test]
    fn throwaway_cluster_starts_and_is_stopped_on_drop() {
        let dir = std::env::temp_dir().join(format!(
            "sidekey-bench-pg-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let tmp = TempDir(dir.clone(), false);
        let pg = PgCluster::start(dir.join("pg")).unwrap();
        let pid_file = pg.dir.join("data/postmaster.pid");
        assert!(pid_file.exists());
        let (n, _) = pg
            .transactions()
            .expect("the cluster answers over its socket");
        assert!(n > 0);
        assert!(pg.url().contains(&format!("host={}", pg.dir.display())));
        drop(pg);
        assert!(!pid_file.exists(), "the cluster is still running");
        drop(tmp);
    }
}
