//! The command line: every flag, its default and its help text.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Populate {
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
pub(crate) struct Args {
    /// Closed-loop concurrency levels (connections, one request in flight each).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    pub(crate) levels: Vec<usize>,
    /// Seconds measured per case.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) duration: f64,
    /// Seconds of unmeasured traffic before each case.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) warmup: f64,
    /// Open-loop mode: constant request rates in requests/s (comma-separated);
    /// replaces the closed-loop levels.
    #[arg(long, value_delimiter = ',')]
    pub(crate) rate: Vec<f64>,
    /// Connections the open-loop schedule is spread over.
    #[arg(long, default_value_t = 64)]
    pub(crate) connections: usize,
    /// Credentials in the store, one user each (user-000000 ...).
    #[arg(long, default_value_t = 100)]
    pub(crate) credentials: usize,
    /// Distinct users (one session each) the traffic rotates over; at most
    /// --credentials, spread evenly over them.
    #[arg(long, default_value_t = 1000)]
    pub(crate) users: usize,
    /// How the store is filled.
    #[arg(long, value_enum, default_value = "offline")]
    pub(crate) populate: Populate,
    /// Admin API calls in flight while populating and minting sessions.
    #[arg(long, default_value_t = 32)]
    pub(crate) admin_concurrency: usize,
    /// Refresh storm: this many concurrent requests on one expired token (0: off).
    #[arg(long, default_value_t = 0)]
    pub(crate) refresh_storm: usize,
    /// How long the fake token endpoint takes to answer during the storm, ms.
    #[arg(long, default_value_t = 50)]
    pub(crate) storm_token_delay_ms: u64,
    /// Soak: --soak-connections connections through sidekey for this many seconds (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) soak: f64,
    #[arg(long, default_value_t = 256)]
    pub(crate) soak_connections: usize,
    /// Skip the direct/via load cases (only start-up, storm and soak).
    #[arg(long)]
    pub(crate) no_load: bool,
    /// The client speaks HTTP/2 (ALPN h2 to sidekey, h2c prior knowledge to
    /// the upstream); concurrency is then streams on one connection.
    #[arg(long)]
    pub(crate) http2: bool,
    /// The upstream speaks TLS with ALPN h2 and http/1.1, so sidekey uses
    /// HTTP/2 to it (the direct client too).
    #[arg(long)]
    pub(crate) upstream_tls: bool,
    /// Size of the upstream's response body, bytes.
    #[arg(long, default_value_t = 128)]
    pub(crate) body_bytes: usize,
    /// Also measure the operation tool `bench_items` (POST /v1/tools/...)
    /// and its MCP tools/call, side by side with the proxy path.
    #[arg(long)]
    pub(crate) tool_paths: bool,
    /// Also measure a `grant = "jwt_bearer"` provider (`bench_jwt`, the
    /// user id as subject, RS256) side by side with the proxy path: its
    /// tokens are exchanged once per subject before the measurement, so
    /// the row shows the cached-token path.
    #[arg(long)]
    pub(crate) jwt_path: bool,
    /// Turn sidekey's audit log off ([audit] enabled = false), to see its cost.
    #[arg(long)]
    pub(crate) no_audit: bool,
    /// One JSON object per case on stdout; the table goes to stderr.
    #[arg(long)]
    pub(crate) json: bool,
    /// The sidekey binary (default: `sidekey` next to this executable,
    /// rebuilt first with the same profile when run through `cargo run`).
    #[arg(long)]
    pub(crate) sidekey: Option<PathBuf>,
    /// Do not rebuild the sidekey binary under `cargo run`.
    #[arg(long)]
    pub(crate) no_build: bool,
    /// Extra environment for the sidekey process, KEY=VALUE (repeatable),
    /// e.g. LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2.
    #[arg(long = "sidekey-env", value_name = "KEY=VALUE")]
    pub(crate) sidekey_env: Vec<String>,
    /// sidekey's log filter (SIDEKEY_LOG).
    #[arg(long, default_value = "warn")]
    pub(crate) log: String,
    /// Keep the temp dir (config, store, certs) and print its path.
    #[arg(long)]
    pub(crate) keep: bool,
    /// Wait this many seconds before the load cases (e.g. to attach `perf record -p PID`).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) pause: f64,
    /// Also measure nginx as the same kind of gateway: TLS on the same
    /// certificate, a static `Authorization: Bearer` header injected,
    /// upstream keepalive, 2 workers. Every case then runs direct, nginx and
    /// sidekey back to back, and a side-by-side summary ends the run.
    #[arg(long)]
    pub(crate) nginx: bool,
    /// The nginx binary (Debian: apt-get install nginx-light); the run stops
    /// if it is missing.
    #[arg(long, default_value = "/usr/sbin/nginx")]
    pub(crate) nginx_bin: PathBuf,
    /// nginx worker processes.
    #[arg(long, default_value_t = 2)]
    pub(crate) nginx_workers: usize,
    /// nginx's access log: buffered to a file in the temp dir (as sidekey's
    /// audit log is on), or off.
    #[arg(long, value_enum, default_value = "buffered")]
    pub(crate) nginx_access_log: NginxLog,
    /// The load generator: this tool's own hyper client, or wrk (Debian's
    /// package; HTTP/1.1, closed loop only, no p99.9).
    #[arg(long, value_enum, default_value = "builtin")]
    pub(crate) load: Load,
    /// wrk threads (at most the connections of a case).
    #[arg(long, default_value_t = 1)]
    pub(crate) wrk_threads: usize,
    /// Run every load case this many times (direct, nginx and sidekey
    /// interleaved each time); the summary gives the range.
    #[arg(long, default_value_t = 1)]
    pub(crate) repeat: usize,
    /// Where sidekey keeps its records: the embedded sled store, or
    /// PostgreSQL (a throwaway cluster the bench starts, unless --postgres-url).
    #[arg(long, value_enum, default_value = "sled")]
    pub(crate) backend: BenchBackend,
    /// With --backend postgres: this (empty) database instead of a throwaway
    /// cluster. The run writes bench records into it under a fresh master key.
    #[arg(long, value_name = "URL")]
    pub(crate) postgres_url: Option<String>,
    /// Uncached credential reads timed through the library on the chosen
    /// backend before sidekey starts (0: off).
    #[arg(long, default_value_t = 2000)]
    pub(crate) uncached_lookups: usize,
    /// Run the refresh storm over this many sidekey processes on one
    /// database, requests spread round-robin (PostgreSQL only).
    #[arg(long, default_value_t = 1)]
    pub(crate) storm_replicas: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Load {
    /// The bench's own client (hyper-util + rustls), in this process.
    Builtin,
    /// `wrk --latency` as a child process.
    Wrk,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum NginxLog {
    Buffered,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum BenchBackend {
    /// The embedded store in the run's temp dir (sidekey's default).
    Sled,
    /// PostgreSQL: a throwaway cluster on a unix socket, or --postgres-url.
    Postgres,
}

impl BenchBackend {
    pub(crate) fn name(self) -> &'static str {
        match self {
            BenchBackend::Sled => "sled",
            BenchBackend::Postgres => "postgres",
        }
    }
}
