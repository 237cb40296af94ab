//! sidekey under test, as a child process: its binary, its generated
//! config, and the store filled through the library before it starts.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cli::Args;

pub(crate) struct Sidekey {
    child: Option<Child>,
    pid: u32,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Sidekey {
    pub(crate) fn spawn(
        bin: &Path,
        dir: &Path,
        log: &str,
        env: &[String],
    ) -> Result<Sidekey, String> {
        let mut cmd = Command::new(bin);
        // As the shipped deployment files run it (Dockerfile, Kubernetes,
        // Compose, systemd); `--sidekey-env MALLOC_ARENA_MAX=8` overrides.
        cmd.env("MALLOC_ARENA_MAX", "2");
        for kv in env {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("--sidekey-env {kv:?}: expected KEY=VALUE"))?;
            cmd.env(k, v);
        }
        // The child dies with this process, even on Ctrl-C or a kill.
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .args(["serve", "--config"])
            .arg(dir.join("config.toml"))
            .current_dir(dir)
            .env("SIDEKEY_LOG", log)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped");
        let l2 = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut l = sidekey::sync::lock(&l2);
                if l.len() < 10_000 {
                    l.push(line);
                }
            }
        });
        Ok(Sidekey {
            pid: child.id(),
            child: Some(child),
            logs,
        })
    }

    pub(crate) fn pid(&self) -> String {
        self.pid.to_string()
    }

    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub(crate) fn log_text(&self) -> String {
        sidekey::sync::lock(&self.logs).join("\n")
    }

    /// SIGTERM, then wait (SIGKILL after 30 s); how long the exit took.
    pub(crate) fn stop(&mut self) -> Option<Duration> {
        let mut child = self.child.take()?;
        let t = Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return Some(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Sidekey {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

pub(crate) fn sidekey_bin(args: &Args) -> Result<PathBuf, String> {
    let p = match &args.sidekey {
        Some(p) => p.clone(),
        None => {
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let dir = exe.parent().ok_or("no parent dir")?;
            // `cargo run --bin sidekey-bench` builds only this binary: build
            // the server too, so a stale one is never measured.
            if let (Ok(cargo), false) = (std::env::var("CARGO"), args.no_build) {
                let mut cmd = Command::new(cargo);
                cmd.args(["build", "--quiet", "--bin", "sidekey"]);
                if dir.ends_with("release") {
                    cmd.arg("--release");
                }
                let st = cmd.status().map_err(|e| format!("cargo build: {e}"))?;
                if !st.success() {
                    return Err("cargo build --bin sidekey failed".into());
                }
            }
            dir.join("sidekey")
        }
    };
    if !p.exists() {
        return Err(format!(
            "{} not found; build it first: cargo build --release --bins (or pass --sidekey PATH)",
            p.display()
        ));
    }
    Ok(p)
}

pub(crate) struct Ports {
    pub(crate) agent: u16,
    pub(crate) admin: u16,
    pub(crate) upstream: u16,
}

pub(crate) fn write_config(dir: &Path, ports: &Ports, args: &Args) -> std::io::Result<()> {
    let scheme = if args.upstream_tls { "https" } else { "http" };
    let up = format!("{scheme}://127.0.0.1:{}", ports.upstream);
    let ca = if args.upstream_tls {
        "upstream_ca_file = \"upstream.crt\"\n"
    } else {
        ""
    };
    let audit = if args.no_audit {
        "[audit]\nenabled = false\n"
    } else {
        ""
    };
    let text = format!(
        r#"# Written by sidekey-bench.
[server]
listen = "127.0.0.1:{agent}"
public_url = "https://127.0.0.1:{agent}"
tls_cert = "certs/server.crt"
tls_key = "certs/server.key"
upstream_timeout_secs = 30
{ca}
[admin]
listen = "127.0.0.1:{admin}"
token_file = "data/admin.token"

[store]
path = "data/sidekey.db"
master_key_file = "data/master.key"
generate_missing = true

[sessions]
signing_key_file = "data/session.key"
ttl_secs = 86400

{audit}
[providers.bench]
display_name = "Bench"
base_url = "{up}"
inject = "bearer"

[tools.bench_items]
provider = "bench"
method = "GET"
path = "/api/items"
description = "The bench upstream's items."
[tools.bench_items.params]
limit = {{ type = "integer", in = "query" }}

[providers.storm]
display_name = "Storm"
base_url = "{up}"
token_url = "{up}/token"
inject = "bearer"
client_id = "bench-client"
client_secret = "bench-client-secret"
{jwt}"#,
        agent = ports.agent,
        admin = ports.admin,
        jwt = if args.jwt_path {
            format!(
                r#"
[providers.bench_jwt]
display_name = "Bench JWT bearer"
base_url = "{up}"
token_url = "{up}/jwt-token"
grant = "jwt_bearer"
client_id = "bench-service-account"
jwt_key_file = "data/jwt.pem"
jwt_subject = "{{user}}"
inject = "bearer"
"#
            )
        } else {
            String::new()
        },
    );
    if args.jwt_path {
        // A 2048-bit RSA key made for this run (RS256, the default alg).
        std::fs::create_dir_all(dir.join("data"))?;
        let key = sidekey_testkit::jwt::TestKey::rsa(2048);
        std::fs::write(dir.join("data/jwt.pem"), key.private_pem)?;
    }
    std::fs::write(dir.join("config.toml"), text)
}

pub(crate) fn user_id(i: usize) -> String {
    format!("user-{i:06}")
}

/// Fills the store with the library before sidekey starts (and generates
/// the dev keys, admin token and TLS certificate on the way), on whichever
/// backend the config names.
pub(crate) async fn populate_offline(dir: &Path, n: usize) -> Result<(), String> {
    use futures_util::StreamExt;
    use sidekey::secret::Secret;
    use sidekey::store::{Credential, Owner};
    let mut cfg =
        sidekey::config::Config::load(&dir.join("config.toml")).map_err(|p| p.join("; "))?;
    let loaded = sidekey::bootstrap::load(&cfg, true).map_err(|p| p.join("; "))?;
    if n == 0 {
        return Ok(());
    }
    // Writes only: no record cache to fill.
    cfg.store.cache_ttl_secs = 0;
    cfg.store.cache_max_entries = 0;
    let store = sidekey::app::open_store(&cfg, loaded.keys)
        .await
        .map_err(|e| e.to_string())?;
    let now = unix_now();
    // Several writes in flight for PostgreSQL's round trips; sled's
    // complete without waiting.
    let mut writes = futures_util::stream::iter(0..n)
        .map(|i| {
            let store = &store;
            async move {
                let mut c = Credential {
                    access_token: Some(Secret::new(format!(
                        "tok-{i:06}-{:016x}",
                        rand::random::<u64>()
                    ))),
                    expires_at: Some(now + 30 * 86_400),
                    updated_at: now,
                    ..Default::default()
                };
                store
                    .put_credential(&Owner::User(user_id(i)), "bench", &mut c)
                    .await
            }
        })
        .buffer_unordered(16);
    while let Some(r) = writes.next().await {
        r.map_err(|e| e.to_string())?;
    }
    drop(writes);
    store.flush().await.map_err(|e| e.to_string())?;
    Ok(())
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
