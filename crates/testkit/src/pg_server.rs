//! A throwaway PostgreSQL cluster from Debian's server binaries, started
//! the same way for the tests (tests/support/pg.rs) and for the bench
//! (src/bin/sidekey-bench.rs includes this file by path): run as the
//! `postgres` user (initdb refuses root), listening only on a unix socket
//! in the cluster's own directory so it never collides with another one,
//! and stopped by a watchdog once the process that started it is gone.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The newest `/usr/lib/postgresql/<version>/bin` with an initdb.
pub fn server_bin() -> Result<PathBuf, String> {
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
    dirs.pop().ok_or_else(|| {
        "PostgreSQL server binaries not found under /usr/lib/postgresql: install Debian's package (apt-get install -y postgresql)".to_owned()
    })
}

/// Runs `cmd` to completion; its output in the error if it fails.
pub fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// One of the server's tools, run as the `postgres` user.
pub fn as_postgres(bin: &Path, tool: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
    c
}

/// Hands `dir` (which exists) to `postgres` and runs initdb in `dir/data`.
pub fn init(bin: &Path, dir: &Path) -> Result<(), String> {
    run(
        Command::new("chown").arg("postgres:postgres").arg(dir),
        "chown postgres (the cluster runs as the postgres user)",
    )?;
    run(Command::new("chmod").arg("700").arg(dir), "chmod")?;
    run(
        as_postgres(bin, "initdb")
            .arg("-D")
            .arg(dir.join("data"))
            .args([
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
    )
}

/// `pg_ctl start` for the cluster in `dir`: the socket in `dir`, no TCP,
/// the log in `dir/log`, and `settings` (`-c name=value ...`).
pub fn start(bin: &Path, dir: &Path, settings: &str) -> Result<(), String> {
    run(
        as_postgres(bin, "pg_ctl")
            .arg("-D")
            .arg(dir.join("data"))
            .arg("-l")
            .arg(dir.join("log"))
            .args(["-w", "-o"])
            .arg(format!(
                "-k {} -c listen_addresses='' -p 5432 {settings}",
                dir.display()
            ))
            .arg("start"),
        "pg_ctl start",
    )
}

/// Stops the cluster in `dir` (`-m immediate`) once this process has
/// ended, however it ends, then runs `then` (a shell command, may be
/// empty). Detached (setsid, backgrounded by a shell we wait for) so that
/// it outlives this process.
pub fn watchdog(bin: &Path, dir: &Path, then: &str) -> Result<(), String> {
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
         runuser -u postgres -- {pg_ctl} -D {data} stop -m immediate >/dev/null 2>&1; {then}",
        pid = std::process::id(),
        pg_ctl = bin.join("pg_ctl").display(),
        data = dir.join("data").display(),
    );
    let quoted = script.replace('\'', "'\\''");
    run(
        Command::new("sh").arg("-c").arg(format!(
            "setsid sh -c '{quoted}' </dev/null >/dev/null 2>&1 &"
        )),
        "start the cluster watchdog",
    )
}
