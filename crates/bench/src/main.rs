//! `sidekey-bench`: a loopback load tool for sidekey.
//!
//! In one run it starts a minimal hyper upstream (and fake token endpoint)
//! in this process, spawns the release `sidekey` binary on a temp dir (TLS
//! in, HTTP upstream, bearer injection, a store filled with `--credentials`
//! users), and drives the same keep-alive client at the upstream directly and
//! through sidekey:
//!
//! - closed loop: fixed concurrency levels (`--levels 1,16,64,256`), each
//!   connection with one request in flight, for `--duration` seconds;
//! - open loop (`--rate R[,R2...]`): requests scheduled at fixed intervals
//!   over `--connections` connections, latency measured from the scheduled
//!   start, so a slow server cannot hide queueing (coordinated omission);
//! - `--refresh-storm N`: N concurrent requests on one expired token;
//! - `--soak S`: `--soak-connections` (256) connections for S seconds,
//!   with sidekey's RSS and its audit backlog
//!   (`sidekey_audit_pending_records`) sampled once a second.
//!
//! `--backend postgres` runs sidekey on PostgreSQL (a throwaway cluster the
//! bench starts as the `postgres` user on a unix socket in its temp dir, or
//! `--postgres-url`), with the same cases and table. Before sidekey starts,
//! `--uncached-lookups` credential reads are timed through the library on
//! the chosen backend; `--storm-replicas N` spreads the refresh storm over N
//! sidekey processes on the one database.
//!
//! sidekey's CPU time comes from `/proc/<pid>/stat` (utime + stime) and its
//! peak RSS from `/proc/<pid>/status` (VmHWM): it runs as its own process so
//! neither includes the load generator. Prints a table; `--json` prints one
//! JSON object per case on stdout (and the table on stderr).
//!
//! Build and run: `cargo build --release --bins && target/release/sidekey-bench`
//! (or `cargo run --release --bin sidekey-bench -- --help`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};

// The throwaway PostgreSQL cluster is started exactly as the tests start
// theirs: the test kit serves both.
use sidekey_testkit::pg_server;

type BenchClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Populate {
    /// Write the credentials with the library's `Store` before sidekey starts
    /// (same sealing code as the admin API, without HTTP; fast for 100k).
    Offline,
    /// `PUT /v1/users/{u}/credentials/bench` on the admin API
    /// (--admin-concurrency in flight).
    Admin,
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "sidekey-bench",
    about = "Loopback load test: upstream direct vs through sidekey (spawns target/release/sidekey)"
)]
struct Args {
    /// Closed-loop concurrency levels (connections, one request in flight each).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    levels: Vec<usize>,
    /// Seconds measured per case.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Seconds of unmeasured traffic before each case.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Open-loop mode: constant request rates in requests/s (comma-separated);
    /// replaces the closed-loop levels.
    #[arg(long, value_delimiter = ',')]
    rate: Vec<f64>,
    /// Connections the open-loop schedule is spread over.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Credentials in the store, one user each (user-000000 ...).
    #[arg(long, default_value_t = 100)]
    credentials: usize,
    /// Distinct users (one session each) the traffic rotates over; at most
    /// --credentials, spread evenly over them.
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// How the store is filled.
    #[arg(long, value_enum, default_value = "offline")]
    populate: Populate,
    /// Admin API calls in flight while populating and minting sessions.
    #[arg(long, default_value_t = 32)]
    admin_concurrency: usize,
    /// Refresh storm: this many concurrent requests on one expired token (0: off).
    #[arg(long, default_value_t = 0)]
    refresh_storm: usize,
    /// How long the fake token endpoint takes to answer during the storm, ms.
    #[arg(long, default_value_t = 50)]
    storm_token_delay_ms: u64,
    /// Soak: --soak-connections connections through sidekey for this many seconds (0: off).
    #[arg(long, default_value_t = 0.0)]
    soak: f64,
    #[arg(long, default_value_t = 256)]
    soak_connections: usize,
    /// Skip the direct/via load cases (only start-up, storm and soak).
    #[arg(long)]
    no_load: bool,
    /// The client speaks HTTP/2 (ALPN h2 to sidekey, h2c prior knowledge to
    /// the upstream); concurrency is then streams on one connection.
    #[arg(long)]
    http2: bool,
    /// The upstream speaks TLS with ALPN h2 and http/1.1, so sidekey uses
    /// HTTP/2 to it (the direct client too).
    #[arg(long)]
    upstream_tls: bool,
    /// Size of the upstream's response body, bytes.
    #[arg(long, default_value_t = 128)]
    body_bytes: usize,
    /// Turn sidekey's audit log off ([audit] enabled = false), to see its cost.
    #[arg(long)]
    no_audit: bool,
    /// One JSON object per case on stdout; the table goes to stderr.
    #[arg(long)]
    json: bool,
    /// The sidekey binary (default: `sidekey` next to this executable,
    /// rebuilt first with the same profile when run through `cargo run`).
    #[arg(long)]
    sidekey: Option<PathBuf>,
    /// Do not rebuild the sidekey binary under `cargo run`.
    #[arg(long)]
    no_build: bool,
    /// Extra environment for the sidekey process, KEY=VALUE (repeatable),
    /// e.g. LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2.
    #[arg(long = "sidekey-env", value_name = "KEY=VALUE")]
    sidekey_env: Vec<String>,
    /// sidekey's log filter (SIDEKEY_LOG).
    #[arg(long, default_value = "warn")]
    log: String,
    /// Keep the temp dir (config, store, certs) and print its path.
    #[arg(long)]
    keep: bool,
    /// Wait this many seconds before the load cases (e.g. to attach `perf record -p PID`).
    #[arg(long, default_value_t = 0.0)]
    pause: f64,
    /// Also measure nginx as the same kind of gateway: TLS on the same
    /// certificate, a static `Authorization: Bearer` header injected,
    /// upstream keepalive, 2 workers. Every case then runs direct, nginx and
    /// sidekey back to back, and a side-by-side summary ends the run.
    #[arg(long)]
    nginx: bool,
    /// The nginx binary (installed with apt-get when missing).
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx_bin: PathBuf,
    /// nginx worker processes.
    #[arg(long, default_value_t = 2)]
    nginx_workers: usize,
    /// nginx's access log: buffered to a file in the temp dir (as sidekey's
    /// audit log is on), or off.
    #[arg(long, value_enum, default_value = "buffered")]
    nginx_access_log: NginxLog,
    /// The load generator: this tool's own hyper client, or wrk (Debian's
    /// package; HTTP/1.1, closed loop only, no p99.9).
    #[arg(long, value_enum, default_value = "builtin")]
    load: Load,
    /// wrk threads (at most the connections of a case).
    #[arg(long, default_value_t = 1)]
    wrk_threads: usize,
    /// Run every load case this many times (direct, nginx and sidekey
    /// interleaved each time); the summary gives the range.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Where sidekey keeps its records: the embedded sled store, or
    /// PostgreSQL (a throwaway cluster the bench starts, unless --postgres-url).
    #[arg(long, value_enum, default_value = "sled")]
    backend: BenchBackend,
    /// With --backend postgres: this (empty) database instead of a throwaway
    /// cluster. The run writes bench records into it under a fresh master key.
    #[arg(long, value_name = "URL")]
    postgres_url: Option<String>,
    /// Uncached credential reads timed through the library on the chosen
    /// backend before sidekey starts (0: off).
    #[arg(long, default_value_t = 2000)]
    uncached_lookups: usize,
    /// Run the refresh storm over this many sidekey processes on one
    /// database, requests spread round-robin (PostgreSQL only).
    #[arg(long, default_value_t = 1)]
    storm_replicas: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Load {
    /// The bench's own client (hyper-util + rustls), in this process.
    Builtin,
    /// `wrk --latency` as a child process.
    Wrk,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum NginxLog {
    Buffered,
    Off,
}

// ---------------------------------------------------------------------------
// Output

/// One measured case.
struct Case {
    mode: &'static str,
    target: &'static str,
    concurrency: usize,
    rate: Option<f64>,
    requests: u64,
    errors: u64,
    error_kinds: BTreeMap<String, u64>,
    secs: f64,
    hist: Histogram<u64>,
    /// Quantiles reported by an external load generator (wrk), by
    /// per-mille (500, 900, 990, 1000 = max), instead of `hist`.
    fixed: Option<BTreeMap<u32, f64>>,
    /// CPU of the gateway under test: sidekey's process for `sidekey`,
    /// nginx's master and workers for `nginx`, 0 for `direct`.
    proxy_cpu_s: f64,
    /// The user-space part of `proxy_cpu_s`; the rest is the kernel's.
    proxy_user_s: f64,
    /// CPU of the load generator and the upstream (this process, and wrk).
    bench_cpu_s: f64,
    /// How the gateway's CPU was shared between its workers, per cent
    /// each (sidekey's agent threads, nginx's worker processes).
    worker_split: Option<Vec<f64>>,
    sidekey_hwm_kib: u64,
    sidekey_rss_kib: u64,
    /// Filled in for `via` cases from the matching `direct` one.
    ratio: Option<f64>,
    added_p50_us: Option<f64>,
    extra: serde_json::Map<String, Value>,
}

impl Case {
    fn rps(&self) -> f64 {
        if self.secs > 0.0 {
            self.requests as f64 / self.secs
        } else {
            0.0
        }
    }

    fn q(&self, q: f64) -> f64 {
        if let Some(f) = &self.fixed {
            return f
                .get(&((q * 1000.0).round() as u32))
                .copied()
                .unwrap_or(f64::NAN);
        }
        if self.hist.is_empty() {
            0.0
        } else {
            self.hist.value_at_quantile(q) as f64
        }
    }

    fn max(&self) -> f64 {
        match &self.fixed {
            Some(_) => self.q(1.0),
            None => self.hist.max() as f64,
        }
    }

    fn cpu_us_per_req(&self, cpu_s: f64) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            cpu_s * 1e6 / self.requests as f64
        }
    }

    fn json(&self, credentials: usize) -> Value {
        let mut v = json!({
            "case": self.mode,
            "target": self.target,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "credentials": credentials,
            "requests": self.requests,
            "errors": self.errors,
            "error_kinds": self.error_kinds,
            "secs": round3(self.secs),
            "rps": round1(self.rps()),
            "load": if self.fixed.is_some() { "wrk" } else { "builtin" },
            "p50_us": finite(self.q(0.5)),
            "p90_us": finite(self.q(0.9)),
            "p99_us": finite(self.q(0.99)),
            "p999_us": finite(self.q(0.999)),
            "max_us": finite(self.max()),
            "ratio_rps_to_direct": self.ratio.map(round3),
            "added_p50_us": self.added_p50_us,
            "proxy_cpu_us_per_req": round1(self.cpu_us_per_req(self.proxy_cpu_s)),
            "proxy_user_us_per_req": round1(self.cpu_us_per_req(self.proxy_user_s)),
            "bench_cpu_us_per_req": round1(self.cpu_us_per_req(self.bench_cpu_s)),
            "sidekey_rss_kib": self.sidekey_rss_kib,
            "sidekey_peak_rss_kib": self.sidekey_hwm_kib,
            "worker_cpu_split_pct": self
                .worker_split
                .as_ref()
                .map(|w| w.iter().map(|p| round1(*p)).collect::<Vec<_>>()),
        });
        if let Value::Object(m) = &mut v {
            for (k, x) in &self.extra {
                m.insert(k.clone(), x.clone());
            }
        }
        v
    }
}

fn fmt_us(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.0}")
    } else {
        "-".into()
    }
}

fn finite(x: f64) -> Value {
    if x.is_finite() { json!(x) } else { Value::Null }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

struct Out {
    json: bool,
    credentials: usize,
    header_printed: bool,
    /// `sled` or `postgres`, named in every JSON object.
    backend: &'static str,
}

impl Out {
    /// The human table goes to stdout, or to stderr when stdout carries JSON.
    fn line(&self, s: &str) {
        if self.json {
            eprintln!("{s}");
        } else {
            println!("{s}");
        }
        let _ = std::io::stdout().flush();
    }

    fn json_line(&self, v: &Value) {
        if self.json {
            let mut v = v.clone();
            if let Value::Object(m) = &mut v {
                m.entry("backend").or_insert(json!(self.backend));
            }
            println!("{v}");
            let _ = std::io::stdout().flush();
        }
    }

    fn case(&mut self, c: &Case) {
        if !self.header_printed {
            self.line(&format!(
                "{:<6} {:<7} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7} {:>6} {:>8} {:>9} {:>8} {:>8}",
                "mode",
                "target",
                "conc/rate",
                "req/s",
                "p50 µs",
                "p99 µs",
                "p99.9µs",
                "max µs",
                "errors",
                "ratio",
                "+p50 µs",
                "gw µs/rq",
                "bn µs/rq",
                "sk HWM"
            ));
            self.header_printed = true;
        }
        let load = match c.rate {
            Some(r) => format!("{r:.0}/s"),
            None => c.concurrency.to_string(),
        };
        let ratio = c.ratio.map(|r| format!("{r:.2}")).unwrap_or("-".into());
        let added = c
            .added_p50_us
            .map(|a| format!("{a:+.0}"))
            .unwrap_or("-".into());
        self.line(&format!(
            "{:<6} {:<7} {:>9} {:>10.0} {:>8.0} {:>8.0} {:>8} {:>8.0} {:>7} {:>6} {:>8} {:>9.1} {:>8.1} {:>6}Mi",
            c.mode,
            c.target,
            load,
            c.rps(),
            c.q(0.5),
            c.q(0.99),
            fmt_us(c.q(0.999)),
            c.max(),
            c.errors,
            ratio,
            added,
            c.cpu_us_per_req(c.proxy_cpu_s),
            c.cpu_us_per_req(c.bench_cpu_s),
            c.sidekey_hwm_kib / 1024
        ));
        for (k, n) in &c.error_kinds {
            self.line(&format!("        error {k}: {n}"));
        }
        if c.proxy_cpu_s > 0.0 && c.proxy_user_s.is_finite() {
            // Several connections over several workers: a split far from
            // even means one worker carried most of the connections.
            let split = match c.worker_split.as_ref().filter(|_| c.concurrency > 1) {
                Some(split) => {
                    let each: Vec<String> = split.iter().map(|p| format!("{p:.0} %")).collect();
                    format!("workers' CPU {}; ", each.join(" / "))
                }
                None => String::new(),
            };
            self.line(&format!(
                "        {}: {split}user {:.1} + kernel {:.1} µs per request",
                c.target,
                c.cpu_us_per_req(c.proxy_user_s),
                c.cpu_us_per_req(c.proxy_cpu_s - c.proxy_user_s),
            ));
        }
        self.json_line(&c.json(self.credentials));
    }

    fn note(&self, s: &str) {
        self.line(s);
    }
}

// ---------------------------------------------------------------------------
// /proc

/// utime + stime of a process (all threads), seconds.
fn cpu_secs(pid: &str) -> f64 {
    let (user, sys) = cpu_split_secs(pid);
    user + sys
}

/// utime and stime of a process (all threads), seconds: user space, and
/// the kernel working for it (system calls, and on loopback the
/// receiving side's TCP processing of what it sends).
fn cpu_split_secs(pid: &str) -> (f64, f64) {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0.0, 0.0);
    };
    let Some(rest) = s.rfind(')').map(|i| &s[i + 1..]) else {
        return (0.0, 0.0);
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command name: state is field 3, utime 14, stime 15.
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let hz = clock_ticks();
    (field(11) as f64 / hz, field(12) as f64 / hz)
}

/// CPU seconds of each thread of `pid` whose name starts with `prefix`,
/// in the order of their names (so two snapshots line up).
fn thread_cpu(pid: &str, prefix: &str) -> Vec<f64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut threads: Vec<(String, f64)> = dir
        .filter_map(|e| {
            let tid = e.ok()?.file_name().into_string().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
            let comm = comm.trim();
            comm.starts_with(prefix)
                .then(|| (comm.to_owned(), cpu_secs(&format!("{pid}/task/{tid}"))))
        })
        .collect();
    threads.sort_by(|a, b| a.0.cmp(&b.0));
    threads.into_iter().map(|t| t.1).collect()
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// A `Vm*` line of /proc/<pid>/status, KiB.
fn status_kib(pid: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The soak's per-second samples as one line: RSS in MiB and, after a
/// slash, the audit records not yet written.
fn soak_timeline(samples: &[(u64, Option<u64>)]) -> String {
    let peak = samples.iter().filter_map(|s| s.1).max();
    let each: Vec<String> = samples
        .iter()
        .map(|(rss, pending)| match pending {
            Some(p) => format!("{:.0}/{p}", *rss as f64 / 1024.0),
            None => format!("{:.0}/-", *rss as f64 / 1024.0),
        })
        .collect();
    format!(
        "soak each second, RSS MiB / audit records pending (peak {}): {}",
        peak.map_or("-".to_string(), |p| p.to_string()),
        each.join(" ")
    )
}

fn dir_bytes(p: &Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => n += dir_bytes(&e.path()),
                Ok(m) => n += m.len(),
                Err(_) => {}
            }
        }
    }
    n
}

// ---------------------------------------------------------------------------
// The upstream and token endpoint

struct Upstream {
    body: Bytes,
    token_calls: AtomicU64,
    token_delay_ms: AtomicU64,
    /// Requests that carried a token the fake token endpoint issued.
    new_token_seen: AtomicU64,
    unauthenticated: AtomicU64,
    requests: AtomicU64,
    h2_requests: AtomicU64,
}

async fn upstream_handle(st: Arc<Upstream>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() == "/token" {
        let n = st.token_calls.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = req.into_body().collect().await;
        let delay = st.token_delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let body = json!({
            "access_token": format!("storm-new-{n}"),
            "token_type": "Bearer",
            "expires_in": 3600,
            "refresh_token": format!("rt-storm-{}", n + 1),
        })
        .to_string();
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("static response");
    }
    st.requests.fetch_add(1, Ordering::Relaxed);
    if req.version() == http::Version::HTTP_2 {
        st.h2_requests.fetch_add(1, Ordering::Relaxed);
    }
    let authed = match req.headers().get(header::AUTHORIZATION) {
        Some(v) => {
            let b = v.as_bytes();
            if b.starts_with(b"Bearer storm-new-") {
                st.new_token_seen.fetch_add(1, Ordering::Relaxed);
            }
            b.starts_with(b"Bearer ") && b.len() > 7
        }
        None => false,
    };
    // Drain any request body (keep-alive needs it).
    let _ = req.into_body().collect().await;
    if !authed {
        st.unauthenticated.fetch_add(1, Ordering::Relaxed);
        return Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .body(Full::new(Bytes::from_static(b"{\"error\":\"no token\"}")))
            .expect("static response");
    }
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(st.body.clone()))
        .expect("static response")
}

async fn serve_upstream(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    st: Arc<Upstream>,
) {
    let builder = Arc::new(hyper_util::server::conn::auto::Builder::new(
        TokioExecutor::new(),
    ));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let st = st.clone();
        let tls = tls.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let st = st.clone();
                async move { Ok::<_, std::convert::Infallible>(upstream_handle(st, req).await) }
            });
            match tls {
                Some(acc) => {
                    if let Ok(s) = acc.accept(stream).await {
                        let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                    }
                }
                None => {
                    let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                }
            }
        });
    }
}

// ---------------------------------------------------------------------------
// sidekey, as a child process

struct Sidekey {
    child: Option<Child>,
    pid: u32,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Sidekey {
    fn spawn(bin: &Path, dir: &Path, log: &str, env: &[String]) -> Result<Sidekey, String> {
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
                let mut l = l2.lock().unwrap_or_else(|e| e.into_inner());
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

    fn pid(&self) -> String {
        self.pid.to_string()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn log_text(&self) -> String {
        self.logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    /// SIGTERM, then wait (SIGKILL after 30 s); how long the exit took.
    fn stop(&mut self) -> Option<Duration> {
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

// ---------------------------------------------------------------------------
// nginx, as a child process (the same gateway job, for comparison)

struct Nginx {
    child: Option<Child>,
    master: u32,
    workers: Vec<u32>,
}

/// Debian's nginx, installed with apt-get when it is missing.
fn ensure_nginx(bin: &Path) -> Result<(), String> {
    if bin.exists() {
        return Ok(());
    }
    eprintln!(
        "sidekey-bench: {} not found; installing Debian's nginx (apt-get install nginx)",
        bin.display()
    );
    let st = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", "nginx"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map_err(|e| format!("apt-get: {e}"))?;
    if !st.success() || !bin.exists() {
        return Err(format!(
            "could not install nginx ({st}); install it (apt-get install nginx) or pass --nginx-bin"
        ));
    }
    Ok(())
}

/// nginx as a TLS gateway doing what sidekey does on the bench path, minus
/// the per-user lookup: TLS on sidekey's certificate, one static bearer
/// header injected, pooled keep-alive connections to the upstream.
fn write_nginx_config(
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
    fn spawn(bin: &Path, conf: &Path, prefix: &Path) -> Result<Nginx, String> {
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
    fn find_workers(&mut self) {
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

    fn pids(&self) -> Vec<String> {
        std::iter::once(self.master)
            .chain(self.workers.iter().copied())
            .map(|p| p.to_string())
            .collect()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn error_log(prefix: &Path) -> String {
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

// ---------------------------------------------------------------------------
// wrk, as the load generator

/// `1.23ms` → µs.
fn wrk_duration_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mul) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|v| v * mul)
}

#[derive(Debug, Default, PartialEq)]
struct WrkOut {
    requests: u64,
    secs: f64,
    quantiles: BTreeMap<u32, f64>,
    errors: BTreeMap<String, u64>,
}

/// Parses `wrk --latency` output.
fn parse_wrk(text: &str) -> Result<WrkOut, String> {
    let mut o = WrkOut::default();
    let mut in_dist = false;
    for line in text.lines() {
        let t = line.trim();
        let f: Vec<&str> = t.split_whitespace().collect();
        if t.starts_with("Latency Distribution") {
            in_dist = true;
            continue;
        }
        if in_dist {
            if let [pct, v] = f.as_slice() {
                if let (Some(p), Some(us)) = (
                    pct.strip_suffix('%').and_then(|p| p.parse::<f64>().ok()),
                    wrk_duration_us(v),
                ) {
                    o.quantiles.insert((p * 10.0).round() as u32, us);
                    continue;
                }
            }
            in_dist = false;
        }
        if f.first() == Some(&"Latency") && f.len() >= 4 {
            if let Some(max) = wrk_duration_us(f[3]) {
                o.quantiles.insert(1000, max);
            }
        }
        if f.len() >= 5 && f[1] == "requests" && f[2] == "in" {
            o.requests = f[0].parse().map_err(|_| format!("wrk: bad line {t:?}"))?;
            o.secs = wrk_duration_us(f[3].trim_end_matches(','))
                .ok_or_else(|| format!("wrk: bad line {t:?}"))?
                / 1e6;
        }
        if let Some(rest) = t.strip_prefix("Socket errors:") {
            for part in rest.split(',') {
                let mut kv = part.split_whitespace();
                if let (Some(k), Some(v)) = (kv.next(), kv.next()) {
                    let n: u64 = v.parse().unwrap_or(0);
                    if n > 0 {
                        o.errors.insert(format!("socket {k}"), n);
                    }
                }
            }
        }
        if let Some(rest) = t.strip_prefix("Non-2xx or 3xx responses:") {
            let n: u64 = rest.trim().parse().unwrap_or(0);
            if n > 0 {
                o.errors.insert("non-2xx".into(), n);
            }
        }
    }
    if o.secs <= 0.0 {
        return Err(format!("wrk: no result in its output:\n{text}"));
    }
    Ok(o)
}

fn run_wrk(
    ctx: &Ctx,
    target: Target,
    conns: usize,
    threads: usize,
    secs: f64,
) -> Result<WrkOut, String> {
    let mut cmd = Command::new("wrk");
    let secs = secs.ceil().max(1.0) as u64;
    cmd.arg("--latency")
        .arg(format!("-t{}", threads.clamp(1, conns.max(1))))
        .arg(format!("-c{}", conns.max(1)))
        .arg(format!("-d{secs}s"))
        .arg("--timeout")
        .arg("30s")
        .arg("-H")
        .arg("Accept: application/json")
        .arg("-H")
        .arg("User-Agent: sidekey-bench/1");
    match target {
        Target::Direct => {
            cmd.arg("-H").arg(format!(
                "Authorization: {}",
                ctx.direct_auth.to_str().unwrap_or_default()
            ));
        }
        Target::Nginx => {}
        Target::Via => {
            // One session: wrk sends the same request bytes each time (no
            // Lua on its hot path); sidekey still runs every session check.
            cmd.arg("-H").arg(format!(
                "X-Sidekey-Session: {}",
                ctx.sessions[0].to_str().unwrap_or_default()
            ));
        }
    }
    let out = cmd
        .arg(target.uri(ctx).to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run wrk: {e} (apt-get install wrk)"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "wrk failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    parse_wrk(&text)
}

/// One closed-loop case driven by wrk (a warm-up run first, not counted).
async fn wrk_case(
    ctx: &Arc<Ctx>,
    target: Target,
    conns: usize,
    threads: usize,
    warmup: Duration,
    dur: Duration,
) -> Result<Case, String> {
    let c2 = ctx.clone();
    let w = warmup.as_secs_f64();
    let d = dur.as_secs_f64();
    tokio::task::spawn_blocking(move || {
        if w > 0.0 {
            run_wrk(&c2, target, conns, threads, w)?;
        }
        let a = snap(&c2);
        let o = run_wrk(&c2, target, conns, threads, d)?;
        let b = snap(&c2);
        let mut c = finish_case(&c2, "wrk", target, conns, None, Vec::new(), a, b);
        c.requests = o.requests;
        c.secs = o.secs;
        c.errors = o.errors.values().sum();
        c.error_kinds = o.errors;
        c.fixed = Some(o.quantiles);
        Ok(c)
    })
    .await
    .map_err(|e| e.to_string())?
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

fn sidekey_bin(args: &Args) -> Result<PathBuf, String> {
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

struct Ports {
    agent: u16,
    admin: u16,
    upstream: u16,
}

fn write_config(dir: &Path, ports: &Ports, args: &Args) -> std::io::Result<()> {
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

[providers.storm]
display_name = "Storm"
base_url = "{up}"
token_url = "{up}/token"
inject = "bearer"
client_id = "bench-client"
client_secret = "bench-client-secret"
"#,
        agent = ports.agent,
        admin = ports.admin,
    );
    std::fs::write(dir.join("config.toml"), text)
}

fn user_id(i: usize) -> String {
    format!("user-{i:06}")
}

/// Fills the store with the library before sidekey starts (and generates
/// the dev keys, admin token and TLS certificate on the way), on whichever
/// backend the config names.
async fn populate_offline(dir: &Path, n: usize) -> Result<(), String> {
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

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Clients

fn build_client(roots_pem: &[Vec<u8>], http2: bool) -> BenchClient {
    let mut roots = rustls::RootCertStore::empty();
    for pem in roots_pem {
        for c in CertificateDer::pem_slice_iter(pem).flatten() {
            let _ = roots.add(c);
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let https = if http2 {
        b.enable_http2().wrap_connector(http)
    } else {
        b.enable_http1().wrap_connector(http)
    };
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_idle_timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(usize::MAX);
    if http2 {
        builder.http2_only(true);
    }
    builder.build(https)
}

/// A plain-HTTP admin API caller.
struct Admin {
    client: BenchClient,
    base: String,
    auth: HeaderValue,
}

impl Admin {
    async fn call(&self, method: Method, path: &str, body: Value) -> Result<(u16, Value), String> {
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(header::AUTHORIZATION, self.auth.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(Duration::from_secs(60), self.client.request(req))
            .await
            .map_err(|_| "admin call timed out".to_string())?
            .map_err(|e| format!("admin call failed: {e}"))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    /// One sample of `/metrics`' value for `name` (a gauge or counter
    /// without labels).
    async fn metric(&self, name: &str) -> Option<f64> {
        let req = Request::builder()
            .uri(format!("{}/metrics", self.base))
            .header(header::AUTHORIZATION, self.auth.clone())
            .body(Full::new(Bytes::new()))
            .ok()?;
        let resp = tokio::time::timeout(Duration::from_secs(5), self.client.request(req))
            .await
            .ok()?
            .ok()?;
        let bytes = resp.into_body().collect().await.ok()?.to_bytes();
        let text = std::str::from_utf8(&bytes).ok()?;
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == name).then(|| v.parse().ok())?
        })
    }

    async fn put_credential(&self, user: &str, provider: &str, body: Value) -> Result<(), String> {
        let (s, v) = self
            .call(
                Method::PUT,
                &format!("/v1/users/{user}/credentials/{provider}"),
                body,
            )
            .await?;
        if s != 200 {
            return Err(format!("PUT credential for {user}: {s} {v}"));
        }
        Ok(())
    }

    async fn session(&self, user: &str, providers: &[&str]) -> Result<String, String> {
        let (s, v) = self
            .call(
                Method::POST,
                "/v1/sessions",
                json!({"user": user, "providers": providers, "ttl_secs": 86_400}),
            )
            .await?;
        if s != 201 {
            return Err(format!("mint session for {user}: {s} {v}"));
        }
        v["token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no token in {v}"))
    }
}

/// Polls GET /readyz on the agent listener until 200; the time it took.
async fn wait_ready(client: &BenchClient, url: &Uri, sk: &mut Sidekey) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) = sk.exited() {
            return Err(format!(
                "sidekey exited ({st}) before it was ready:\n{}",
                sk.log_text()
            ));
        }
        let req = Request::get(url.clone())
            .body(Full::new(Bytes::new()))
            .expect("valid request");
        if let Ok(Ok(r)) =
            tokio::time::timeout(Duration::from_millis(500), client.request(req)).await
        {
            if r.status() == StatusCode::OK {
                let _ = r.into_body().collect().await;
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("sidekey not ready within 60 s:\n{}", sk.log_text()));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

// ---------------------------------------------------------------------------
// Load

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Direct,
    Nginx,
    /// Through sidekey.
    Via,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Nginx => "nginx",
            Target::Via => "sidekey",
        }
    }

    fn uri(self, ctx: &Ctx) -> Uri {
        match self {
            Target::Direct => ctx.direct_uri.clone(),
            Target::Nginx => ctx.nginx_uri.clone().expect("nginx target without --nginx"),
            Target::Via => ctx.via_uri.clone(),
        }
    }
}

struct Ctx {
    client: BenchClient,
    direct_uri: Uri,
    via_uri: Uri,
    /// nginx's `/api/items?limit=10` (it injects the bearer header itself).
    nginx_uri: Option<Uri>,
    /// nginx's master and worker pids.
    nginx_pids: Vec<String>,
    /// `Bearer ...` the direct requests carry (what sidekey would inject).
    direct_auth: HeaderValue,
    /// Session tokens, one per user.
    sessions: Vec<HeaderValue>,
    sidekey_pid: String,
}

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

fn new_hist() -> Histogram<u64> {
    // 1 µs .. 120 s, 3 significant digits.
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds")
}

struct WorkerOut {
    hist: Histogram<u64>,
    requests: u64,
    errors: BTreeMap<String, u64>,
}

impl WorkerOut {
    fn new() -> Self {
        WorkerOut {
            hist: new_hist(),
            requests: 0,
            errors: BTreeMap::new(),
        }
    }
}

/// One request; `Ok` on a fully read 200.
async fn one(ctx: &Ctx, target: Target, uri: &Uri, session: usize) -> Result<(), String> {
    let mut req = Request::new(Full::new(Bytes::new()));
    *req.uri_mut() = uri.clone();
    let h = req.headers_mut();
    h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    h.insert(
        header::USER_AGENT,
        HeaderValue::from_static("sidekey-bench/1"),
    );
    match target {
        Target::Direct => {
            h.insert(header::AUTHORIZATION, ctx.direct_auth.clone());
        }
        Target::Nginx => {}
        Target::Via => {
            h.insert(
                "x-sidekey-session",
                ctx.sessions[session % ctx.sessions.len()].clone(),
            );
        }
    }
    let resp = match tokio::time::timeout(Duration::from_secs(30), ctx.client.request(req)).await {
        Err(_) => return Err("timeout".into()),
        Ok(Err(e)) if e.is_connect() => return Err("connect".into()),
        Ok(Err(_)) => return Err("transport".into()),
        Ok(Ok(r)) => r,
    };
    let status = resp.status();
    let code = resp
        .headers()
        .get("x-sidekey-error")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    match resp.into_body().collect().await {
        Ok(_) if status == StatusCode::OK => Ok(()),
        Ok(_) => Err(match code {
            Some(c) => format!("{} {c}", status.as_u16()),
            None => status.as_u16().to_string(),
        }),
        Err(_) => Err("body".into()),
    }
}

fn record(out: &mut WorkerOut, res: Result<(), String>, us: u64) {
    out.requests += 1;
    match res {
        Ok(()) => {
            let _ = out.hist.record(us.max(1));
        }
        Err(e) => *out.errors.entry(e).or_default() += 1,
    }
}

struct Snap {
    at: Instant,
    sidekey_cpu: f64,
    nginx_cpu: f64,
    /// The user-space part of the two above.
    sidekey_user: f64,
    nginx_user: f64,
    bench_cpu: f64,
    /// Each sidekey agent worker thread's CPU, by thread name.
    sidekey_workers: Vec<f64>,
    /// Each nginx worker process's CPU (the master is not one).
    nginx_workers: Vec<f64>,
}

fn snap(ctx: &Ctx) -> Snap {
    let (sk_user, sk_sys) = cpu_split_secs(&ctx.sidekey_pid);
    let nginx: Vec<(f64, f64)> = ctx.nginx_pids.iter().map(|p| cpu_split_secs(p)).collect();
    Snap {
        at: Instant::now(),
        sidekey_cpu: sk_user + sk_sys,
        nginx_cpu: nginx.iter().map(|(u, s)| u + s).sum(),
        sidekey_user: sk_user,
        nginx_user: nginx.iter().map(|(u, _)| u).sum(),
        bench_cpu: cpu_secs("self") + children_cpu_secs(),
        sidekey_workers: thread_cpu(&ctx.sidekey_pid, "sidekey-agent-"),
        nginx_workers: ctx.nginx_pids.iter().skip(1).map(|p| cpu_secs(p)).collect(),
    }
}

/// Each worker's share of the CPU between two snapshots, in per cent, when
/// there are several workers and they did something.
fn worker_split(a: &[f64], b: &[f64]) -> Option<Vec<f64>> {
    let used: Vec<f64> = b.iter().zip(a).map(|(b, a)| (b - a).max(0.0)).collect();
    let total: f64 = used.iter().sum();
    (used.len() > 1 && total > 0.0).then(|| used.iter().map(|u| 100.0 * u / total).collect())
}

/// CPU of this process's waited-for children (wrk runs), seconds.
fn children_cpu_secs() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[allow(clippy::too_many_arguments)]
fn finish_case(
    ctx: &Ctx,
    mode: &'static str,
    target: Target,
    concurrency: usize,
    rate: Option<f64>,
    outs: Vec<WorkerOut>,
    a: Snap,
    b: Snap,
) -> Case {
    let mut hist = new_hist();
    let mut requests = 0;
    let mut error_kinds = BTreeMap::new();
    for o in outs {
        let _ = hist.add(&o.hist);
        requests += o.requests;
        for (k, n) in o.errors {
            *error_kinds.entry(k).or_default() += n;
        }
    }
    let errors = error_kinds.values().sum();
    Case {
        mode,
        target: target.name(),
        concurrency,
        rate,
        requests,
        errors,
        error_kinds,
        secs: (b.at - a.at).as_secs_f64(),
        hist,
        fixed: None,
        proxy_cpu_s: match target {
            Target::Direct => 0.0,
            Target::Nginx => b.nginx_cpu - a.nginx_cpu,
            Target::Via => b.sidekey_cpu - a.sidekey_cpu,
        },
        proxy_user_s: match target {
            Target::Direct => 0.0,
            Target::Nginx => b.nginx_user - a.nginx_user,
            Target::Via => b.sidekey_user - a.sidekey_user,
        },
        bench_cpu_s: b.bench_cpu - a.bench_cpu,
        worker_split: match target {
            Target::Direct => None,
            Target::Nginx => worker_split(&a.nginx_workers, &b.nginx_workers),
            Target::Via => worker_split(&a.sidekey_workers, &b.sidekey_workers),
        },
        sidekey_hwm_kib: status_kib(&ctx.sidekey_pid, "VmHWM:"),
        sidekey_rss_kib: status_kib(&ctx.sidekey_pid, "VmRSS:"),
        ratio: None,
        added_p50_us: None,
        extra: serde_json::Map::new(),
    }
}

/// Closed loop: `conc` workers, each one request at a time, back to back.
/// Only requests that start and end inside the measured window count.
async fn closed_loop(
    ctx: &Arc<Ctx>,
    mode: &'static str,
    target: Target,
    conc: usize,
    warmup: Duration,
    dur: Duration,
) -> Case {
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let uri = target.uri(ctx);
    let mut handles = Vec::with_capacity(conc);
    for w in 0..conc {
        let ctx = ctx.clone();
        let phase = phase.clone();
        let uri = uri.clone();
        handles.push(tokio::spawn(async move {
            let mut out = WorkerOut::new();
            let mut seq = w.wrapping_mul(7919);
            loop {
                let p0 = phase.load(Ordering::Relaxed);
                if p0 == STOP {
                    break;
                }
                let t0 = Instant::now();
                let res = one(&ctx, target, &uri, seq).await;
                seq = seq.wrapping_add(1);
                let us = t0.elapsed().as_micros() as u64;
                let failed = res.is_err();
                if p0 == MEASURE && phase.load(Ordering::Relaxed) == MEASURE {
                    record(&mut out, res, us);
                }
                if failed {
                    // Do not spin on a refused connection.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            out
        }));
    }
    tokio::time::sleep(warmup).await;
    let a = snap(ctx);
    phase.store(MEASURE, Ordering::Relaxed);
    tokio::time::sleep(dur).await;
    phase.store(STOP, Ordering::Relaxed);
    let b = snap(ctx);
    let mut outs = Vec::with_capacity(conc);
    for h in handles {
        if let Ok(o) = h.await {
            outs.push(o);
        }
    }
    finish_case(ctx, mode, target, conc, None, outs, a, b)
}

/// Timer wake-up slack that is not counted as latency in the open loop.
const TIMER_SLACK: Duration = Duration::from_micros(1500);

/// Open loop: request i is due at start + i/rate; `conns` workers take the
/// next due request when free. Latency runs from the due time, so a request
/// that waited for a busy connection counts its wait (wrk2's correction for
/// coordinated omission). A worker that slept until the due time starts the
/// clock when it wakes, but forgives at most TIMER_SLACK of lateness.
async fn open_loop(
    ctx: &Arc<Ctx>,
    target: Target,
    rate: f64,
    conns: usize,
    warmup: Duration,
    dur: Duration,
) -> Case {
    let uri = target.uri(ctx);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + Duration::from_millis(20);
    let total = warmup + dur;
    let measure_from = start + warmup;
    let measure_to = start + total;
    let interval = 1.0 / rate;
    let late = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::with_capacity(conns);
    for w in 0..conns {
        let ctx = ctx.clone();
        let next = next.clone();
        let uri = uri.clone();
        let late = late.clone();
        handles.push(tokio::spawn(async move {
            let mut out = WorkerOut::new();
            let mut seq = w.wrapping_mul(7919);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let off = Duration::from_secs_f64(i as f64 * interval);
                if off >= total {
                    break;
                }
                let due = start + off;
                let now = Instant::now();
                let base = if now < due {
                    tokio::time::sleep_until(due.into()).await;
                    Instant::now().min(due + TIMER_SLACK)
                } else {
                    if now - due > Duration::from_millis(1) {
                        late.fetch_add(1, Ordering::Relaxed);
                    }
                    due
                };
                let res = one(&ctx, target, &uri, seq).await;
                seq = seq.wrapping_add(1);
                let us = base.elapsed().as_micros() as u64;
                if due >= measure_from && due < measure_to {
                    record(&mut out, res, us);
                }
            }
            out
        }));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let a = snap(ctx);
    let mut outs = Vec::with_capacity(conns);
    for h in handles {
        if let Ok(o) = h.await {
            outs.push(o);
        }
    }
    let mut b = snap(ctx);
    // Throughput over the schedule's window (the tail that ran over is in
    // the latencies, not in the rate).
    let secs_sched = dur.as_secs_f64();
    let overrun = (b.at - a.at).as_secs_f64() - secs_sched;
    b.at = a.at + dur;
    let mut c = finish_case(ctx, "open", target, conns, Some(rate), outs, a, b);
    c.extra
        .insert("overrun_secs".into(), json!(round3(overrun.max(0.0))));
    c.extra
        .insert("late_starts".into(), json!(late.load(Ordering::Relaxed)));
    c
}

// ---------------------------------------------------------------------------
// Main

fn main() {
    let args = Args::parse();
    sidekey::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(args)) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("sidekey-bench: {e}");
            std::process::exit(1);
        }
    }
}

struct TempDir(PathBuf, bool);

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.1 {
            eprintln!("kept {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let bin = sidekey_bin(&args)?;
    let dir = std::env::temp_dir().join(format!(
        "sidekey-bench-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let tmp = TempDir(dir.clone(), args.keep);
    let mut out = Out {
        json: args.json,
        credentials: args.credentials,
        header_printed: false,
        backend: args.backend.name(),
    };
    let (pg, pg_url) = start_postgres(&args, &dir)?;

    // --- upstream -----------------------------------------------------------
    let up_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let up_port = up_listener.local_addr().map_err(|e| e.to_string())?.port();
    let mut roots: Vec<Vec<u8>> = Vec::new();
    let up_tls = if args.upstream_tls {
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .map_err(|e| e.to_string())?;
        std::fs::write(dir.join("upstream.crt"), ck.cert.pem()).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("upstream.key"), ck.signing_key.serialize_pem())
            .map_err(|e| e.to_string())?;
        roots.push(ck.cert.pem().into_bytes());
        let sc =
            sidekey::bootstrap::tls_config(&dir.join("upstream.crt"), &dir.join("upstream.key"))?;
        Some(tokio_rustls::TlsAcceptor::from(sc))
    } else {
        None
    };
    let mut body = br#"{"ok":true,"data":""#.to_vec();
    let pad = args.body_bytes.saturating_sub(body.len() + 2);
    body.extend(std::iter::repeat_n(b'x', pad));
    body.extend_from_slice(b"\"}");
    let upstream = Arc::new(Upstream {
        body: Bytes::from(body),
        token_calls: AtomicU64::new(0),
        token_delay_ms: AtomicU64::new(0),
        new_token_seen: AtomicU64::new(0),
        unauthenticated: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        h2_requests: AtomicU64::new(0),
    });
    tokio::spawn(serve_upstream(up_listener, up_tls, upstream.clone()));

    // --- sidekey ------------------------------------------------------------
    let ports = Ports {
        agent: free_port(),
        admin: free_port(),
        upstream: up_port,
    };
    write_config(&dir, &ports, &args).map_err(|e| e.to_string())?;
    if let Some(url) = &pg_url {
        use_postgres_store(&dir, url)?;
    }
    let n = args.credentials;
    let populate_started = Instant::now();
    // Generates keys and the certificate; with --populate offline also the credentials.
    let offline_n = if args.populate == Populate::Offline {
        n
    } else {
        0
    };
    populate_offline(&dir, offline_n).await?;
    let mut populate_secs = populate_started.elapsed().as_secs_f64();

    roots.push(std::fs::read(dir.join("certs/server.crt")).map_err(|e| e.to_string())?);
    let admin_token = std::fs::read_to_string(dir.join("data/admin.token"))
        .map_err(|e| e.to_string())?
        .trim()
        .to_owned();
    let ready_uri: Uri = format!("https://127.0.0.1:{}/readyz", ports.agent)
        .parse()
        .expect("valid uri");
    let mk_admin = || Admin {
        client: build_client(&[], false),
        base: format!("http://127.0.0.1:{}", ports.admin),
        auth: HeaderValue::try_from(format!("Bearer {admin_token}")).expect("printable token"),
    };

    let mut populate_hwm_kib = 0;
    if args.populate == Populate::Admin && n > 0 {
        let mut sk = Sidekey::spawn(&bin, &dir, &args.log, &args.sidekey_env)?;
        wait_ready(&build_client(&roots, false), &ready_uri, &mut sk).await?;
        let admin = Arc::new(mk_admin());
        let t = Instant::now();
        let next = Arc::new(AtomicU64::new(0));
        let now = unix_now();
        let mut hs = Vec::new();
        for _ in 0..args.admin_concurrency.max(1) {
            let admin = admin.clone();
            let next = next.clone();
            hs.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= n {
                        return Ok::<(), String>(());
                    }
                    admin
                        .put_credential(
                            &user_id(i),
                            "bench",
                            json!({
                                "access_token": format!("tok-{i:06}-{:016x}", rand::random::<u64>()),
                                "expires_at": now + 30 * 86_400,
                            }),
                        )
                        .await?;
                }
            }));
        }
        for h in hs {
            h.await.map_err(|e| e.to_string())??;
        }
        populate_secs = t.elapsed().as_secs_f64();
        populate_hwm_kib = status_kib(&sk.pid(), "VmHWM:");
        sk.stop();
    }

    let lookups = probe_store(&dir, n, args.uncached_lookups).await?;
    report_probe(&out, &lookups, n);

    // Cold start on the populated store: spawn → first /readyz 200.
    let t = Instant::now();
    let mut sk = Sidekey::spawn(&bin, &dir, &args.log, &args.sidekey_env)?;
    let probe = build_client(&roots, false);
    wait_ready(&probe, &ready_uri, &mut sk).await?;
    let cold_ms = t.elapsed().as_secs_f64() * 1000.0;
    let pid = sk.pid();
    let start_rss = status_kib(&pid, "VmRSS:");
    let store_bytes = match args.backend {
        BenchBackend::Sled => dir_bytes(&dir.join("data/sidekey.db")),
        BenchBackend::Postgres => lookups.bytes,
    };
    out.note(&format!(
        "sidekey-bench: sidekey pid {pid}, {} store, {} credentials ({:?} populate, {:.2} s), cold start to /readyz 200: {:.1} ms, RSS after start {:.1} MiB, store on disk {:.1} MiB{}",
        args.backend.name(),
        n,
        args.populate,
        populate_secs,
        cold_ms,
        start_rss as f64 / 1024.0,
        store_bytes as f64 / 1_048_576.0,
        if populate_hwm_kib > 0 {
            format!(", peak RSS while populating {:.1} MiB", populate_hwm_kib as f64 / 1024.0)
        } else {
            String::new()
        }
    ));
    out.json_line(&json!({
        "case": "startup",
        "credentials": n,
        "populate": format!("{:?}", args.populate).to_lowercase(),
        "populate_secs": round3(populate_secs),
        "cold_start_ms": round1(cold_ms),
        "rss_after_start_kib": start_rss,
        "populate_peak_rss_kib": populate_hwm_kib,
        "store_bytes": store_bytes,
    }));

    // Sessions, spread over the users.
    let admin = Arc::new(mk_admin());
    let k = args.users.clamp(1, n.max(1));
    let t = Instant::now();
    let mut sessions = vec![HeaderValue::from_static(""); if n == 0 { 0 } else { k }];
    if n > 0 {
        let slots = Arc::new(Mutex::new(vec![None; k]));
        let next = Arc::new(AtomicU64::new(0));
        let mut hs = Vec::new();
        for _ in 0..args.admin_concurrency.max(1) {
            let admin = admin.clone();
            let next = next.clone();
            let slots = slots.clone();
            hs.push(tokio::spawn(async move {
                loop {
                    let j = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if j >= k {
                        return Ok::<(), String>(());
                    }
                    let u = user_id(j * n / k);
                    let tok = admin.session(&u, &["bench"]).await?;
                    slots.lock().unwrap_or_else(|e| e.into_inner())[j] = Some(tok);
                }
            }));
        }
        for h in hs {
            h.await.map_err(|e| e.to_string())??;
        }
        let slots = std::mem::take(&mut *slots.lock().unwrap_or_else(|e| e.into_inner()));
        for (j, s) in slots.into_iter().enumerate() {
            sessions[j] =
                HeaderValue::try_from(s.ok_or("missing session")?).map_err(|e| e.to_string())?;
        }
    }
    let sessions_secs = t.elapsed().as_secs_f64();

    let up_scheme = if args.upstream_tls { "https" } else { "http" };
    let direct_auth = "Bearer tok-000000-0123456789abcdef";
    // --- nginx (optional) ---------------------------------------------------
    let mut nginx = None;
    let mut nginx_uri = None;
    if args.nginx {
        if args.upstream_tls || args.http2 {
            return Err(
                "--nginx compares HTTP/1.1 to a plain upstream: drop --upstream-tls/--http2".into(),
            );
        }
        ensure_nginx(&args.nginx_bin)?;
        let port = free_port();
        let conf = write_nginx_config(
            &dir,
            port,
            ports.upstream,
            args.nginx_workers,
            direct_auth,
            args.nginx_access_log,
        )
        .map_err(|e| e.to_string())?;
        let prefix = dir.join("nginx");
        let mut ng = Nginx::spawn(&args.nginx_bin, &conf, &prefix)?;
        let uri: Uri = format!("https://127.0.0.1:{port}/api/items?limit=10")
            .parse()
            .expect("valid uri");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = ng.exited() {
                return Err(format!(
                    "nginx exited ({st}):\n{}",
                    Nginx::error_log(&prefix)
                ));
            }
            let req = Request::get(uri.clone())
                .body(Full::new(Bytes::new()))
                .expect("valid request");
            if let Ok(Ok(r)) =
                tokio::time::timeout(Duration::from_millis(500), probe.request(req)).await
            {
                let st = r.status();
                let _ = r.into_body().collect().await;
                if st == StatusCode::OK {
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "nginx not answering 200 within 20 s:\n{}",
                    Nginx::error_log(&prefix)
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ng.find_workers();
        out.note(&format!(
            "sidekey-bench: nginx {} (master {}, workers {:?}), access log {:?}",
            Command::new(&args.nginx_bin)
                .arg("-v")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stderr)
                    .trim()
                    .replace("nginx version: ", ""))
                .unwrap_or_default(),
            ng.master,
            ng.workers,
            args.nginx_access_log
        ));
        nginx_uri = Some(uri);
        nginx = Some(ng);
    }
    let ctx = Arc::new(Ctx {
        client: build_client(&roots, args.http2),
        direct_uri: format!(
            "{up_scheme}://127.0.0.1:{}/api/items?limit=10",
            ports.upstream
        )
        .parse()
        .expect("valid uri"),
        via_uri: format!(
            "https://127.0.0.1:{}/v1/proxy/bench/api/items?limit=10",
            ports.agent
        )
        .parse()
        .expect("valid uri"),
        direct_auth: HeaderValue::from_static(direct_auth),
        nginx_uri,
        nginx_pids: nginx.as_ref().map(Nginx::pids).unwrap_or_default(),
        sessions,
        sidekey_pid: pid.clone(),
    });
    out.note(&format!(
        "sidekey-bench: {} sessions over {} users minted in {:.2} s; client {}, upstream {}{}; {} cores",
        ctx.sessions.len(),
        k,
        sessions_secs,
        if args.http2 { "HTTP/2" } else { "HTTP/1.1 keep-alive" },
        if args.upstream_tls { "HTTPS (h2 by ALPN)" } else { "plain HTTP/1.1" },
        if args.no_audit { ", audit off" } else { "" },
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    ));

    if n > 0 {
        // Sanity: one request each way.
        one(&ctx, Target::Direct, &ctx.direct_uri, 0)
            .await
            .map_err(|e| format!("direct request failed: {e}"))?;
        one(&ctx, Target::Via, &ctx.via_uri, 0)
            .await
            .map_err(|e| format!("request through sidekey failed: {e}\n{}", sk.log_text()))?;
        if let Some(u) = &ctx.nginx_uri {
            one(&ctx, Target::Nginx, u, 0)
                .await
                .map_err(|e| format!("request through nginx failed: {e}"))?;
        }
    }

    if args.pause > 0.0 {
        out.note(&format!(
            "sidekey-bench: pausing {:.0} s (sidekey pid {pid})",
            args.pause
        ));
        tokio::time::sleep(Duration::from_secs_f64(args.pause)).await;
    }

    let warmup = Duration::from_secs_f64(args.warmup);
    let dur = Duration::from_secs_f64(args.duration);
    let mut measured: Vec<Case> = Vec::new();
    let pg_before = pg.as_ref().and_then(PgCluster::transactions);
    if !args.no_load && n > 0 {
        let cases: Vec<(usize, Option<f64>)> = if args.rate.is_empty() {
            args.levels.iter().map(|&c| (c, None)).collect()
        } else if args.load == Load::Wrk {
            return Err("--load wrk runs closed-loop levels only (no --rate)".into());
        } else {
            args.rate
                .iter()
                .map(|&r| (args.connections, Some(r)))
                .collect()
        };
        let mut targets = vec![Target::Direct];
        if ctx.nginx_uri.is_some() {
            targets.push(Target::Nginx);
        }
        targets.push(Target::Via);
        for round in 0..args.repeat.max(1) {
            if args.repeat > 1 {
                out.note(&format!(
                    "sidekey-bench: round {} of {}",
                    round + 1,
                    args.repeat
                ));
            }
            for &(conc, rate) in &cases {
                let mut direct: Option<(f64, f64)> = None;
                for &target in &targets {
                    let mut c = match (args.load, rate) {
                        (Load::Wrk, _) => {
                            wrk_case(&ctx, target, conc, args.wrk_threads, warmup, dur).await?
                        }
                        (Load::Builtin, None) => {
                            closed_loop(&ctx, "closed", target, conc, warmup, dur).await
                        }
                        (Load::Builtin, Some(r)) => {
                            open_loop(&ctx, target, r, conc, warmup, dur).await
                        }
                    };
                    match direct {
                        None => direct = Some((c.rps(), c.q(0.5))),
                        Some((rps, p50)) => {
                            // In the open loop all run at the scheduled rate: no ratio.
                            if rps > 0.0 && rate.is_none() {
                                c.ratio = Some(c.rps() / rps);
                            }
                            c.added_p50_us = Some(c.q(0.5) - p50);
                        }
                    }
                    out.case(&c);
                    measured.push(c);
                }
            }
        }
        if ctx.nginx_uri.is_some() {
            side_by_side(&out, &measured);
        }
        report_pg_transactions(&out, pg.as_ref(), pg_before, &measured);
    }

    if args.refresh_storm > 0 {
        let c = match &pg_url {
            Some(url) if args.storm_replicas > 1 => {
                let mut replicas =
                    start_replicas(&bin, &dir, &args, ports.upstream, url, &roots).await?;
                let agent_ports: Vec<u16> = std::iter::once(ports.agent)
                    .chain(replicas.iter().map(|r| r.1))
                    .collect();
                let pids: Vec<String> = std::iter::once(pid.clone())
                    .chain(replicas.iter().map(|r| r.0.pid()))
                    .collect();
                let c = storm_replicas(&ctx, &admin, &upstream, &roots, &args, &agent_ports, &pids)
                    .await?;
                for (sk, _) in &mut replicas {
                    if sk.exited().is_some() {
                        return Err(format!(
                            "a replica died during the storm:\n{}",
                            sk.log_text()
                        ));
                    }
                    sk.stop();
                }
                c
            }
            _ => storm(&ctx, &admin, &upstream, &roots, &args, ports.agent).await?,
        };
        out.case(&c);
        out.note(&format!(
            "refresh storm over {} replica(s): {} concurrent requests on one expired token -> {} token-endpoint call(s), {} succeeded, {} errors, p50 {:.0} µs, p99 {:.0} µs, max {} µs",
            args.storm_replicas.max(1),
            args.refresh_storm,
            c.extra["token_calls"],
            c.requests - c.errors,
            c.errors,
            c.q(0.5),
            c.q(0.99),
            c.max()
        ));
    }

    if args.soak > 0.0 && n > 0 {
        // RSS and the audit writer's backlog once a second, to tell a
        // growing backlog from memory the store keeps.
        let samples = Arc::new(Mutex::new(Vec::new()));
        let sampler = {
            let (admin, pid, samples) = (admin.clone(), pid.clone(), samples.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    let pending = admin.metric("sidekey_audit_pending_records").await;
                    let rss = status_kib(&pid, "VmRSS:");
                    samples
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((rss, pending.map(|p| p as u64)));
                }
            })
        };
        let c = closed_loop(
            &ctx,
            "soak",
            Target::Via,
            args.soak_connections,
            Duration::from_secs(1),
            Duration::from_secs_f64(args.soak),
        )
        .await;
        out.case(&c);
        out.note(&format!(
            "soak: {} connections for {:.0} s through sidekey: {} requests, {} errors, p99 {:.0} µs, p99.9 {:.0} µs, sidekey peak RSS {:.1} MiB",
            args.soak_connections,
            c.secs,
            c.requests,
            c.errors,
            c.q(0.99),
            c.q(0.999),
            c.sidekey_hwm_kib as f64 / 1024.0
        ));
        sampler.abort();
        let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()));
        out.note(&soak_timeline(&samples));
    }

    let unauth = upstream.unauthenticated.load(Ordering::Relaxed);
    if unauth > 0 {
        out.note(&format!(
            "warning: the upstream saw {unauth} request(s) without a bearer token"
        ));
    }
    out.note(&format!(
        "upstream: {} requests, {} over HTTP/2",
        upstream.requests.load(Ordering::Relaxed),
        upstream.h2_requests.load(Ordering::Relaxed)
    ));
    let final_hwm = status_kib(&pid, "VmHWM:");
    let final_cpu = cpu_secs(&pid);
    if sk.exited().is_some() {
        return Err(format!("sidekey died during the run:\n{}", sk.log_text()));
    }
    let stopped = sk.stop();
    out.note(&format!(
        "sidekey: peak RSS {:.1} MiB, total CPU {:.2} s, exited {} after SIGTERM",
        final_hwm as f64 / 1024.0,
        final_cpu,
        stopped
            .map(|d| format!("{:.0} ms", d.as_secs_f64() * 1000.0))
            .unwrap_or_else(|| "not within 30 s".into())
    ));
    out.json_line(&json!({
        "case": "summary",
        "credentials": n,
        "sidekey_peak_rss_kib": final_hwm,
        "sidekey_cpu_secs": round3(final_cpu),
    }));
    drop(nginx);
    drop(pg);
    drop(tmp);
    Ok(())
}

fn range(xs: &[f64], prec: usize, signed: bool) -> String {
    let xs: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if xs.is_empty() {
        return "-".into();
    }
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let f = |x: f64| {
        if signed {
            format!("{x:+.prec$}")
        } else {
            format!("{x:.prec$}")
        }
    };
    if (hi - lo).abs() < 0.5 * 10f64.powi(-(prec as i32)) {
        f(lo)
    } else {
        format!("{}…{}", f(lo), f(hi))
    }
}

/// The middle of the finite values (the mean of the two middle ones for an
/// even count); NaN when there are none. Rounds on a shared VM spread
/// widely, so the goals are reported with their median as well as range.
fn median(xs: &[f64]) -> f64 {
    let mut xs: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let m = xs.len() / 2;
    if xs.len() % 2 == 1 {
        xs[m]
    } else {
        (xs[m - 1] + xs[m]) / 2.0
    }
}

/// direct / nginx / sidekey per load level, as ranges over the rounds, and
/// the two gateway goals (added p50 at 1 connection, req/s at 64).
fn side_by_side(out: &Out, cases: &[Case]) {
    let mut keys: Vec<(usize, String)> = Vec::new();
    for c in cases {
        let k = (
            c.concurrency,
            c.rate.map(|r| format!("{r:.0}/s")).unwrap_or_default(),
        );
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let rounds = cases
        .iter()
        .filter(|c| c.target == "direct" && c.concurrency == keys[0].0)
        .count();
    out.note(&format!(
        "\nside by side, {rounds} round(s), min…max ({} load, {} store):",
        if cases.iter().any(|c| c.fixed.is_some()) {
            "wrk"
        } else {
            "builtin"
        },
        out.backend
    ));
    out.note(&format!(
        "{:>9} {:<8} {:>15} {:>11} {:>11} {:>7} {:>13} {:>13} {:>13}",
        "conc/rate",
        "target",
        "req/s",
        "p50 µs",
        "+p50 µs",
        "errors",
        "gw CPU µs/rq",
        "of it user",
        "×nginx req/s"
    ));
    let pick = |k: &(usize, String), t: &str| -> Vec<&Case> {
        cases
            .iter()
            .filter(|c| {
                c.target == t
                    && c.concurrency == k.0
                    && c.rate.map(|r| format!("{r:.0}/s")).unwrap_or_default() == k.1
            })
            .collect()
    };
    for k in &keys {
        let ng = pick(k, "nginx");
        for t in ["direct", "nginx", "sidekey"] {
            let cs = pick(k, t);
            if cs.is_empty() {
                continue;
            }
            let v = |f: &dyn Fn(&Case) -> f64| cs.iter().map(|c| f(c)).collect::<Vec<_>>();
            let vs_nginx: Vec<f64> = cs
                .iter()
                .zip(ng.iter())
                .map(|(c, n)| c.rps() / n.rps().max(1e-9))
                .collect();
            out.note(&format!(
                "{:>9} {:<8} {:>15} {:>11} {:>11} {:>7} {:>13} {:>13} {:>13}",
                if k.1.is_empty() {
                    k.0.to_string()
                } else {
                    k.1.clone()
                },
                t,
                range(&v(&|c| c.rps()), 0, false),
                range(&v(&|c| c.q(0.5)), 0, false),
                if t == "direct" {
                    "-".into()
                } else {
                    range(&v(&|c| c.added_p50_us.unwrap_or(f64::NAN)), 0, true)
                },
                range(&v(&|c| c.errors as f64), 0, false),
                if t == "direct" {
                    "-".into()
                } else {
                    range(&v(&|c| c.cpu_us_per_req(c.proxy_cpu_s)), 1, false)
                },
                if t == "direct" {
                    "-".into()
                } else {
                    range(&v(&|c| c.cpu_us_per_req(c.proxy_user_s)), 1, false)
                },
                if t == "sidekey" {
                    range(&vs_nginx, 2, false)
                } else {
                    "-".into()
                },
            ));
        }
    }
    // The goals, judged round by round (same run, same machine state).
    let at = |conc: usize, t: &str| -> Vec<&Case> {
        cases
            .iter()
            .filter(|c| c.target == t && c.concurrency == conc && c.rate.is_none())
            .collect()
    };
    let (s1, n1) = (at(1, "sidekey"), at(1, "nginx"));
    if !s1.is_empty() && s1.len() == n1.len() {
        let diff: Vec<f64> = s1
            .iter()
            .zip(&n1)
            .map(|(s, n)| s.added_p50_us.unwrap_or(f64::NAN) - n.added_p50_us.unwrap_or(f64::NAN))
            .collect();
        let met = diff.iter().filter(|d| **d <= 0.0).count();
        out.note(&format!(
            "goal p50 at 1 connection: sidekey adds {} µs, nginx {} µs; sidekey − nginx {} µs (median {:+.0}); met in {met}/{} round(s)",
            range(&s1.iter().map(|c| c.added_p50_us.unwrap_or(f64::NAN)).collect::<Vec<_>>(), 0, true),
            range(&n1.iter().map(|c| c.added_p50_us.unwrap_or(f64::NAN)).collect::<Vec<_>>(), 0, true),
            range(&diff, 0, true),
            median(&diff),
            diff.len()
        ));
    }
    let (s64, n64) = (at(64, "sidekey"), at(64, "nginx"));
    if !s64.is_empty() && s64.len() == n64.len() {
        let ratio: Vec<f64> = s64
            .iter()
            .zip(&n64)
            .map(|(s, n)| s.rps() / n.rps().max(1e-9))
            .collect();
        let met = s64
            .iter()
            .zip(&ratio)
            .filter(|(s, r)| **r >= 1.0 && s.errors == 0)
            .count();
        out.note(&format!(
            "goal req/s at 64 connections: sidekey/nginx {}× (median {:.2}; errors sidekey {}, nginx {}); met in {met}/{} round(s)",
            range(&ratio, 2, false),
            median(&ratio),
            s64.iter().map(|c| c.errors).sum::<u64>(),
            n64.iter().map(|c| c.errors).sum::<u64>(),
            ratio.len()
        ));
    }
}

/// N concurrent requests on one expired credential: the first refreshes,
/// the rest wait for it; the token endpoint should see exactly one call.
async fn storm(
    ctx: &Arc<Ctx>,
    admin: &Admin,
    upstream: &Arc<Upstream>,
    roots: &[Vec<u8>],
    args: &Args,
    agent_port: u16,
) -> Result<Case, String> {
    let n = args.refresh_storm;
    let user = "storm-user";
    admin
        .put_credential(
            user,
            "storm",
            json!({
                "access_token": "storm-old-token",
                "refresh_token": "rt-storm-1",
                "expires_at": unix_now() - 60,
            }),
        )
        .await?;
    let token = admin.session(user, &["storm"]).await?;
    // Its own client and connections, opened before the storm so the
    // latencies are of the refresh, not of n TLS handshakes.
    let client = build_client(roots, args.http2);
    let health: Uri = format!("https://127.0.0.1:{agent_port}/healthz")
        .parse()
        .expect("valid uri");
    let mut hs = Vec::new();
    for _ in 0..n {
        let client = client.clone();
        let health = health.clone();
        hs.push(tokio::spawn(async move {
            let req = Request::get(health)
                .body(Full::new(Bytes::new()))
                .expect("valid request");
            if let Ok(r) = client.request(req).await {
                let _ = r.into_body().collect().await;
            }
        }));
    }
    for h in hs {
        let _ = h.await;
    }
    let sctx = Arc::new(Ctx {
        client,
        direct_uri: ctx.direct_uri.clone(),
        via_uri: format!("https://127.0.0.1:{agent_port}/v1/proxy/storm/api/items")
            .parse()
            .expect("valid uri"),
        direct_auth: ctx.direct_auth.clone(),
        nginx_uri: None,
        nginx_pids: Vec::new(),
        sessions: vec![HeaderValue::try_from(token).map_err(|e| e.to_string())?],
        sidekey_pid: ctx.sidekey_pid.clone(),
    });
    upstream
        .token_delay_ms
        .store(args.storm_token_delay_ms, Ordering::Relaxed);
    let calls_before = upstream.token_calls.load(Ordering::SeqCst);
    let seen_before = upstream.new_token_seen.load(Ordering::Relaxed);
    let barrier = Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut hs = Vec::with_capacity(n);
    for _ in 0..n {
        let sctx = sctx.clone();
        let barrier = barrier.clone();
        hs.push(tokio::spawn(async move {
            barrier.wait().await;
            let t0 = Instant::now();
            let res = one(&sctx, Target::Via, &sctx.via_uri, 0).await;
            (res, t0.elapsed().as_micros() as u64)
        }));
    }
    let a = snap(&sctx);
    barrier.wait().await;
    let mut w = WorkerOut::new();
    for h in hs {
        if let Ok((res, us)) = h.await {
            record(&mut w, res, us);
        }
    }
    let b = snap(&sctx);
    upstream.token_delay_ms.store(0, Ordering::Relaxed);
    let calls = upstream.token_calls.load(Ordering::SeqCst) - calls_before;
    let seen = upstream.new_token_seen.load(Ordering::Relaxed) - seen_before;
    let mut c = finish_case(&sctx, "storm", Target::Via, n, None, vec![w], a, b);
    c.extra.insert("token_calls".into(), json!(calls));
    c.extra.insert("upstream_saw_new_token".into(), json!(seen));
    c.extra
        .insert("token_delay_ms".into(), json!(args.storm_token_delay_ms));
    Ok(c)
}

// ---------------------------------------------------------------------------
// The store backend (--backend postgres): a throwaway PostgreSQL cluster,
// uncached lookup latency, and the refresh storm over several replicas.

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BenchBackend {
    /// The embedded store in the run's temp dir (sidekey's default).
    Sled,
    /// PostgreSQL: a throwaway cluster on a unix socket, or --postgres-url.
    Postgres,
}

impl BenchBackend {
    fn name(self) -> &'static str {
        match self {
            BenchBackend::Sled => "sled",
            BenchBackend::Postgres => "postgres",
        }
    }
}

/// A PostgreSQL cluster of the run's own, as tests/support/pg.rs starts
/// them: Debian's server binaries, run as the `postgres` user (initdb
/// refuses root), listening only on a unix socket in a directory of the
/// run's temp dir, so it never collides with another cluster. Stopped
/// (`-m immediate`) on drop, and by a watchdog if this process dies first.
struct PgCluster {
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
    fn transactions(&self) -> Option<(i64, Instant)> {
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
fn start_postgres(args: &Args, dir: &Path) -> Result<(Option<PgCluster>, Option<String>), String> {
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
fn report_pg_transactions(
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
fn use_postgres_store(dir: &Path, url: &str) -> Result<(), String> {
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

/// What the library measured on the store before sidekey started.
struct StoreProbe {
    bytes: u64,
    /// `credential_uncached` (a read from the backend and an unseal), ns.
    uncached: Option<Histogram<u64>>,
    /// `credential` through the record cache, ns (what a warm request does).
    cached: Option<Histogram<u64>>,
    /// Whether the cache was in use (PostgreSQL: its listener was up).
    cache_live: bool,
}

fn ns_hist() -> Histogram<u64> {
    // 1 ns .. 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
}

/// Opens the store through the library as sidekey does and times `reads`
/// credential lookups over the `n` users, uncached and cached. Closed
/// again before sidekey starts (sled has one process).
async fn probe_store(dir: &Path, n: usize, reads: usize) -> Result<StoreProbe, String> {
    let cfg = sidekey::config::Config::load(&dir.join("config.toml")).map_err(|p| p.join("; "))?;
    let loaded = sidekey::bootstrap::load(&cfg, false).map_err(|p| p.join("; "))?;
    let sled_db = cfg.store.path.join("db");
    wait_sled_unlocked(&sled_db).await?;
    let store = sidekey::app::open_store(&cfg, loaded.keys)
        .await
        .map_err(|e| e.to_string())?;
    let probe = probe_open_store(&store, n, reads).await;
    drop(store);
    // sidekey starts next, on the same sled files.
    wait_sled_unlocked(&sled_db).await?;
    probe
}

/// sled's I/O threads can hold a dropped store's file lock a little
/// longer; waits (up to 10 s) until `db` could be locked.
async fn wait_sled_unlocked(db: &Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::File::open(db) else {
        return Ok(()); // no sled store (yet)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            // SAFETY: as above.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{} still locked after 10 s", db.display()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn probe_open_store(
    store: &sidekey::store::Store,
    n: usize,
    reads: usize,
) -> Result<StoreProbe, String> {
    let mut probe = StoreProbe {
        bytes: store.size_on_disk().await,
        uncached: None,
        cached: None,
        cache_live: false,
    };
    if n == 0 || reads == 0 {
        return Ok(probe);
    }
    // Not counted: the pool's connections, sled's pages.
    probe.uncached = Some(time_lookups(store, n, reads, reads.min(100), false).await?);
    // PostgreSQL's cache is used only while the LISTEN connection is up.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !store.caches().is_live() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    probe.cache_live = store.caches().is_live();
    // Warm-up fills the cache.
    probe.cached = Some(time_lookups(store, n, reads, n.min(reads), true).await?);
    Ok(probe)
}

/// `reads` timed credential lookups over `n` users after `warmup` untimed
/// ones, through the record cache or around it.
async fn time_lookups(
    store: &sidekey::store::Store,
    n: usize,
    reads: usize,
    warmup: usize,
    cached: bool,
) -> Result<Histogram<u64>, String> {
    use sidekey::store::Owner;
    // Timed up to the answer; the credential is dropped (and zeroized)
    // after the clock is read.
    let lookup = |i: usize| async move {
        let t = Instant::now();
        let owner = Owner::User(user_id(i % n));
        let (took, found) = if cached {
            let c = store.credential(&owner, "bench").await;
            (t.elapsed(), c.map(|c| c.is_some()))
        } else {
            let c = store.credential_uncached(&owner, "bench").await;
            (t.elapsed(), c.map(|c| c.is_some()))
        };
        found.map(|f| (took, f)).map_err(|e| e.to_string())
    };
    for i in 0..warmup {
        lookup(i).await?;
    }
    let mut h = ns_hist();
    for i in 0..reads {
        let (took, found) = lookup(i).await?;
        if !found {
            return Err(format!("credential of {} missing", user_id(i % n)));
        }
        let _ = h.record((took.as_nanos() as u64).max(1));
    }
    Ok(h)
}

/// Prints the lookup latencies (and a JSON object with them).
fn report_probe(out: &Out, p: &StoreProbe, n: usize) {
    let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let (Some(u), Some(c)) = (&p.uncached, &p.cached) else {
        return;
    };
    out.note(&format!(
        "lookup ({}, library, {} reads over {} credentials): uncached p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs; cached{} p50 {:.2} µs, p99 {:.2} µs",
        out.backend,
        u.len(),
        n,
        us(u, 0.5),
        us(u, 0.99),
        u.max() as f64 / 1000.0,
        if p.cache_live { "" } else { " (cache off: listener down)" },
        us(c, 0.5),
        us(c, 0.99),
    ));
    out.json_line(&json!({
        "case": "lookup",
        "credentials": n,
        "reads": u.len(),
        "uncached_p50_us": round1(us(u, 0.5)),
        "uncached_p99_us": round1(us(u, 0.99)),
        "uncached_max_us": round1(u.max() as f64 / 1000.0),
        "cached_p50_us": round3(us(c, 0.5)),
        "cached_p99_us": round3(us(c, 0.99)),
        "cache_live": p.cache_live,
    }));
}

/// `--storm-replicas N`: N−1 more sidekey processes on the same database,
/// each in a dir of its own with the first one's master key, session key,
/// admin token and certificate (as replicas of one deployment share them),
/// on ports of their own. Returns them with their agent ports.
async fn start_replicas(
    bin: &Path,
    dir: &Path,
    args: &Args,
    upstream_port: u16,
    url: &str,
    roots: &[Vec<u8>],
) -> Result<Vec<(Sidekey, u16)>, String> {
    let mut v = Vec::new();
    let probe = build_client(roots, false);
    for i in 1..args.storm_replicas {
        let rd = dir.join(format!("replica-{i}"));
        for sub in ["data", "certs"] {
            std::fs::create_dir_all(rd.join(sub)).map_err(|e| e.to_string())?;
        }
        for f in [
            "data/master.key",
            "data/session.key",
            "data/admin.token",
            "certs/server.crt",
            "certs/server.key",
            "upstream.crt",
        ] {
            if dir.join(f).exists() {
                std::fs::copy(dir.join(f), rd.join(f)).map_err(|e| format!("{f}: {e}"))?;
            }
        }
        let ports = Ports {
            agent: free_port(),
            admin: free_port(),
            upstream: upstream_port,
        };
        write_config(&rd, &ports, args).map_err(|e| e.to_string())?;
        use_postgres_store(&rd, url)?;
        let mut sk = Sidekey::spawn(bin, &rd, &args.log, &args.sidekey_env)?;
        let ready: Uri = format!("https://127.0.0.1:{}/readyz", ports.agent)
            .parse()
            .expect("valid uri");
        wait_ready(&probe, &ready, &mut sk).await?;
        v.push((sk, ports.agent));
    }
    Ok(v)
}

/// The refresh storm spread round-robin over sidekey processes on one
/// PostgreSQL (`agent_ports`, the first being the main one): the token
/// endpoint should still see exactly one call cluster-wide.
async fn storm_replicas(
    ctx: &Arc<Ctx>,
    admin: &Admin,
    upstream: &Arc<Upstream>,
    roots: &[Vec<u8>],
    args: &Args,
    agent_ports: &[u16],
    pids: &[String],
) -> Result<Case, String> {
    let n = args.refresh_storm;
    let user = "storm-user";
    admin
        .put_credential(
            user,
            "storm",
            json!({
                "access_token": "storm-old-token",
                "refresh_token": "rt-storm-1",
                "expires_at": unix_now() - 60,
            }),
        )
        .await?;
    let token = admin.session(user, &["storm"]).await?;
    let uris: Vec<Uri> = agent_ports
        .iter()
        .map(|p| {
            format!("https://127.0.0.1:{p}/v1/proxy/storm/api/items")
                .parse()
                .expect("valid uri")
        })
        .collect();
    // Connections to every replica opened first: the latencies are of the
    // refresh, not of n TLS handshakes.
    let client = build_client(roots, args.http2);
    // One accepted request per replica first: a fresh replica closes more
    // than `max_pending_per_ip` (128) not-yet-proven connections from one
    // address, and health probes prove nothing.
    admin
        .put_credential(
            "storm-proof",
            "bench",
            json!({"access_token": "storm-proof-token"}),
        )
        .await?;
    let proof = HeaderValue::try_from(admin.session("storm-proof", &["bench"]).await?)
        .map_err(|e| e.to_string())?;
    let pctx = Ctx {
        client: client.clone(),
        direct_uri: ctx.direct_uri.clone(),
        via_uri: ctx.via_uri.clone(),
        direct_auth: ctx.direct_auth.clone(),
        nginx_uri: None,
        nginx_pids: Vec::new(),
        sessions: vec![proof],
        sidekey_pid: ctx.sidekey_pid.clone(),
    };
    for p in agent_ports {
        let uri: Uri = format!("https://127.0.0.1:{p}/v1/proxy/bench/api/items")
            .parse()
            .expect("valid uri");
        one(&pctx, Target::Via, &uri, 0)
            .await
            .map_err(|e| format!("request through replica on port {p} failed: {e}"))?;
    }
    let mut hs = Vec::new();
    for i in 0..n {
        let client = client.clone();
        let health: Uri = format!(
            "https://127.0.0.1:{}/healthz",
            agent_ports[i % agent_ports.len()]
        )
        .parse()
        .expect("valid uri");
        hs.push(tokio::spawn(async move {
            let req = Request::get(health)
                .body(Full::new(Bytes::new()))
                .expect("valid request");
            if let Ok(r) = client.request(req).await {
                let _ = r.into_body().collect().await;
            }
        }));
    }
    for h in hs {
        let _ = h.await;
    }
    let sctx = Arc::new(Ctx {
        client,
        direct_uri: ctx.direct_uri.clone(),
        via_uri: uris[0].clone(),
        direct_auth: ctx.direct_auth.clone(),
        nginx_uri: None,
        nginx_pids: Vec::new(),
        sessions: vec![HeaderValue::try_from(token).map_err(|e| e.to_string())?],
        sidekey_pid: ctx.sidekey_pid.clone(),
    });
    upstream
        .token_delay_ms
        .store(args.storm_token_delay_ms, Ordering::Relaxed);
    let calls_before = upstream.token_calls.load(Ordering::SeqCst);
    let seen_before = upstream.new_token_seen.load(Ordering::Relaxed);
    let cpu = || pids.iter().map(|p| cpu_secs(p)).sum::<f64>();
    let barrier = Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut hs = Vec::with_capacity(n);
    for i in 0..n {
        let sctx = sctx.clone();
        let barrier = barrier.clone();
        let uri = uris[i % uris.len()].clone();
        hs.push(tokio::spawn(async move {
            barrier.wait().await;
            let t0 = Instant::now();
            let res = one(&sctx, Target::Via, &uri, 0).await;
            (res, t0.elapsed().as_micros() as u64)
        }));
    }
    let a = snap(&sctx);
    let cpu_a = cpu();
    barrier.wait().await;
    let mut w = WorkerOut::new();
    for h in hs {
        if let Ok((res, us)) = h.await {
            record(&mut w, res, us);
        }
    }
    let b = snap(&sctx);
    let cpu_b = cpu();
    upstream.token_delay_ms.store(0, Ordering::Relaxed);
    let calls = upstream.token_calls.load(Ordering::SeqCst) - calls_before;
    let seen = upstream.new_token_seen.load(Ordering::Relaxed) - seen_before;
    let mut c = finish_case(&sctx, "storm", Target::Via, n, None, vec![w], a, b);
    // CPU of every replica, not only the first.
    c.proxy_cpu_s = cpu_b - cpu_a;
    c.proxy_user_s = f64::NAN;
    c.extra.insert("token_calls".into(), json!(calls));
    c.extra.insert("upstream_saw_new_token".into(), json!(seen));
    c.extra
        .insert("token_delay_ms".into(), json!(args.storm_token_delay_ms));
    c.extra.insert("replicas".into(), json!(agent_ports.len()));
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_skip_missing_values() {
        assert_eq!(median(&[3.0, -5.0, 28.0]), 3.0);
        assert!((median(&[0.76, 1.03, 0.88, 0.9]) - 0.89).abs() < 1e-9);
        assert_eq!(median(&[f64::NAN, 2.0]), 2.0);
        assert!(median(&[]).is_nan());
    }

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

    #[test]
    fn parses_wrk_output() {
        let text = "Running 4s test @ https://127.0.0.1:1/api\n  1 threads and 64 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     1.80ms  300.00us  12.50ms   90.00%\n    Req/Sec    36.00k     1.00k   38.00k    70.00%\n  Latency Distribution\n     50%  174.00us\n     75%    1.70ms\n     90%    2.00ms\n     99%    3.10ms\n  145000 requests in 4.00s, 30.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 12\nRequests/sec:  36250.00\nTransfer/sec:      7.50MB\n";
        let o = parse_wrk(text).unwrap();
        assert_eq!(o.requests, 145_000);
        assert!((o.secs - 4.0).abs() < 1e-9);
        assert_eq!(o.quantiles[&500], 174.0);
        assert_eq!(o.quantiles[&990], 3100.0);
        assert_eq!(o.quantiles[&1000], 12_500.0);
        assert_eq!(o.errors["socket read"], 2);
        assert_eq!(o.errors["socket timeout"], 1);
        assert_eq!(o.errors["non-2xx"], 12);
        assert!(parse_wrk("nothing").is_err());
    }
}
