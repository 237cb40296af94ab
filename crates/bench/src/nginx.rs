//! nginx as a child process doing the same gateway job, for comparison.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cli::NginxLog;

pub(crate) struct Nginx {
    child: Option<Child>,
    pub(crate) master: u32,
    pub(crate) workers: Vec<u32>,
}

/// The bench does not install packages: a missing nginx stops the run
/// before anything is measured.
pub(crate) fn require_nginx(bin: &Path) -> Result<(), String> {
    if bin.exists() {
        return Ok(());
    }
    Err(format!(
        "nginx not found at {}; install it (Debian: apt-get install nginx-light) or pass --nginx-bin PATH",
        bin.display()
    ))
}

/// nginx as a TLS gateway doing what sidekey does on the bench path, minus
/// the per-user lookup: TLS on sidekey's certificate, one static bearer
/// header injected, pooled keep-alive connections to the upstream.
pub(crate) fn write_nginx_config(
    dir: &Path,
    port: u16,
    upstream: u16,
    workers: usize,
    bearer: &str,
    log: NginxLog,
) -> std::io::Result<PathBuf> {
    let n = dir.join("nginx");
    for sub in ["", "tmp", "logs"] {
        std::fs::create_dir_all(n.join(sub))?;
    }
    let d = n.display();
    let certs = dir.join("certs");
    let c = certs.display();
    let access = match log {
        NginxLog::Buffered => format!(
            "log_format gw '$remote_addr [$time_local] \"$request\" $status $body_bytes_sent $request_time';\n    access_log {d}/logs/access.log gw buffer=64k flush=1s;"
        ),
        NginxLog::Off => "access_log off;".into(),
    };
    let text = format!(
        r#"# Written by sidekey-bench.
daemon off;
master_process on;
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    {access}
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    keepalive_requests 1000000;
    upstream bench {{
        server 127.0.0.1:{upstream};
        keepalive 256;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {c}/server.crt;
        ssl_certificate_key {c}/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://bench;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "{bearer}";
        }}
    }}
}}
"#
    );
    let path = n.join("nginx.conf");
    std::fs::write(&path, text)?;
    Ok(path)
}

impl Nginx {
    pub(crate) fn spawn(bin: &Path, conf: &Path, prefix: &Path) -> Result<Nginx, String> {
        let mut cmd = Command::new(bin);
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
        }
        let child = cmd
            .arg("-p")
            .arg(prefix)
            .arg("-e")
            .arg(prefix.join("logs/error.log"))
            .arg("-c")
            .arg(conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        Ok(Nginx {
            master: child.id(),
            child: Some(child),
            workers: Vec::new(),
        })
    }

    /// The master's children (the workers), from /proc.
    pub(crate) fn find_workers(&mut self) {
        let mut w = Vec::new();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let name = e.file_name();
                let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                    continue;
                };
                let ppid = stat
                    .rfind(')')
                    .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u32>().ok());
                if ppid == Some(self.master) {
                    w.push(pid);
                }
            }
        }
        self.workers = w;
    }

    pub(crate) fn pids(&self) -> Vec<String> {
        std::iter::once(self.master)
            .chain(self.workers.iter().copied())
            .map(|p| p.to_string())
            .collect()
    }

    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub(crate) fn error_log(prefix: &Path) -> String {
        std::fs::read_to_string(prefix.join("logs/error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM: the master stops its workers, then exits.
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
            for w in &self.workers {
                let _ = Command::new("kill")
                    .args(["-KILL", &w.to_string()])
                    .status();
            }
        }
    }
}
