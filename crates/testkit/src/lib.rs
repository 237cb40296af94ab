//! Test harness: the real `sidekey` binary (or the real server in-process)
//! on ephemeral loopback ports with a temp dir, a TLS client that trusts its
//! generated certificate, and fake upstreams and token endpoints.

pub mod cluster;
pub mod connect;
pub mod jwt;
pub mod pg;
pub mod pg_server;
pub mod ports;
pub mod token;
pub mod upstream;
pub mod webdriver;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::Value;

pub type TestClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// An HTTP answer, fully read.
#[derive(Clone, Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            panic!(
                "not JSON (status {}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// sidekey's error code, from the JSON body; also checks the header agrees.
    pub fn error_code(&self) -> String {
        let v = self.json();
        let code = v["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code in {v}"))
            .to_owned();
        assert_eq!(
            self.headers
                .get("x-sidekey-error")
                .and_then(|h| h.to_str().ok()),
            Some(code.as_str()),
            "X-Sidekey-Error header must match the body"
        );
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "error message missing in {v}"
        );
        code
    }

    /// Asserts status and sidekey error code together.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(
            self.status.as_u16(),
            status,
            "expected {status} {code}, got {} {}",
            self.status,
            self.text()
        );
        assert_eq!(self.error_code(), code, "body: {}", self.text());
    }
}

/// A client trusting `ca` (PEM) plus nothing else, speaking h1 and h2.
pub fn client_trusting(ca_pem: &[u8], http2_only: bool) -> TestClient {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let https = if http2_only {
        b.enable_http2().build()
    } else {
        b.enable_http1().enable_http2().build()
    };
    let mut builder = Client::builder(TokioExecutor::new());
    if http2_only {
        builder.http2_only(true);
    }
    builder.build(https)
}

/// A plain client for http:// only.
pub fn plain_client() -> TestClient {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        )
        .https_or_http()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(https)
}

pub async fn send(
    client: &TestClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Resp {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(60), client.request(req))
        .await
        .expect("request timed out")
        .unwrap_or_else(|e| panic!("request to {url} failed: {e:?}"));
    let status = resp.status();
    let version = resp.version();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Resp {
        status,
        headers,
        body,
        version,
    }
}

/// What to put in a test config.
#[derive(Clone)]
pub struct Options {
    /// TOML appended after the base config (providers, extra sections).
    pub extra_toml: String,
    /// Environment for the process.
    pub env: Vec<(String, String)>,
    /// Extra `[server]` lines.
    pub server_toml: String,
    /// Extra `[store]` lines.
    pub store_toml: String,
    /// Extra `[admin]` lines.
    pub admin_toml: String,
    /// Extra `[sessions]` lines.
    pub sessions_toml: String,
    /// Extra `[elevenlabs]` lines.
    pub elevenlabs_toml: String,
    /// SIDEKEY_LOG value.
    pub log: String,
    /// The PostgreSQL database of this instance (and its restarts and
    /// clones), created on first use when the suite runs on PostgreSQL.
    pub pg_db: Arc<std::sync::OnceLock<String>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            extra_toml: String::new(),
            env: Vec::new(),
            server_toml: String::new(),
            store_toml: String::new(),
            admin_toml: String::new(),
            sessions_toml: String::new(),
            elevenlabs_toml: String::new(),
            log: "info".into(),
            pg_db: Arc::new(std::sync::OnceLock::new()),
        }
    }
}

pub const WEBHOOK_SECRET: &str = "whsec_test_post_call_secret";
pub const INIT_SECRET: &str = "init-secret-for-tests";

impl Options {
    pub fn with_providers(toml: &str) -> Self {
        Options {
            extra_toml: toml.to_owned(),
            ..Default::default()
        }
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    pub fn server(mut self, toml: &str) -> Self {
        self.server_toml.push_str(toml);
        self.server_toml.push('\n');
        self
    }

    pub fn store(mut self, toml: &str) -> Self {
        self.store_toml.push_str(toml);
        self.store_toml.push('\n');
        self
    }

    pub fn admin(mut self, toml: &str) -> Self {
        self.admin_toml.push_str(toml);
        self.admin_toml.push('\n');
        self
    }

    pub fn sessions(mut self, toml: &str) -> Self {
        self.sessions_toml.push_str(toml);
        self.sessions_toml.push('\n');
        self
    }

    pub fn elevenlabs(mut self, toml: &str) -> Self {
        self.elevenlabs_toml.push_str(toml);
        self.elevenlabs_toml.push('\n');
        self
    }

    /// `[oauth] bind_browser = false`: a bare `authorize_url` completes a
    /// flow in any client (tests of the flow itself, without a browser).
    pub fn unbound_oauth(mut self) -> Self {
        self.extra_toml
            .push_str("\n[oauth]\nbind_browser = false\n");
        self
    }

    pub fn log(mut self, filter: &str) -> Self {
        self.log = filter.into();
        self
    }

    /// Runs this instance on PostgreSQL whatever the suite's backend.
    pub fn postgres(self) -> Self {
        let url = self.pg_url();
        self.store(&format!("backend = \"postgres\"\npostgres_url = \"{url}\""))
    }

    /// This instance's database URL (the database is created on first use).
    pub fn pg_url(&self) -> String {
        let c = pg::cluster();
        c.url(self.pg_db.get_or_init(|| c.new_database()))
    }

    /// Whether this instance's store is PostgreSQL.
    pub fn on_postgres(&self) -> bool {
        self.store_toml.contains("backend = \"postgres\"")
            || (pg::selected() && !self.store_toml.contains("backend ="))
    }

    /// The config file text. Keys given in the extra section text replace
    /// the base ones, so tests can override any default.
    pub fn config_text(&self) -> String {
        fn section(name: &str, base: &[&str], extra: &str) -> String {
            let overridden: Vec<&str> = extra
                .lines()
                .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim()))
                .collect();
            let mut out = format!("[{name}]\n");
            for line in base {
                let key = line.split_once('=').map(|(k, _)| k.trim()).unwrap_or("");
                if !overridden.contains(&key) {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            out.push_str(extra);
            out.push('\n');
            out
        }
        [
            section(
                "server",
                &[
                    "listen = \"127.0.0.1:0\"",
                    "public_url = \"https://127.0.0.1:8443\"",
                    "tls_cert = \"certs/server.crt\"",
                    "tls_key = \"certs/server.key\"",
                    "upstream_timeout_secs = 5",
                    "shutdown_grace_secs = 5",
                ],
                &self.server_toml,
            ),
            section(
                "admin",
                &[
                    "listen = \"127.0.0.1:0\"",
                    "token_file = \"data/admin.token\"",
                ],
                &self.admin_toml,
            ),
            section(
                "store",
                &{
                    let mut base = vec![
                        "path = \"data/sidekey.db\"".to_owned(),
                        "master_key_file = \"data/master.key\"".to_owned(),
                        "generate_missing = true".to_owned(),
                    ];
                    // SIDEKEY_TEST_BACKEND=postgres: the same suite on a
                    // database of its own, unless the test chose a backend.
                    if pg::selected() && !self.store_toml.contains("backend =") {
                        base.push("backend = \"postgres\"".to_owned());
                        base.push(format!("postgres_url = \"{}\"", self.pg_url()));
                    }
                    base
                }
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
                &self.store_toml,
            ),
            section(
                "sessions",
                &["signing_key_file = \"data/session.key\""],
                &self.sessions_toml,
            ),
            section(
                "elevenlabs",
                &[
                    "webhook_secret_env = \"TEST_WEBHOOK_SECRET\"",
                    "init_secret_env = \"TEST_INIT_SECRET\"",
                ],
                &self.elevenlabs_toml,
            ),
            self.extra_toml.clone(),
        ]
        .join("\n")
    }
}

/// Addresses, token and clients of a running sidekey, however started.
pub struct Api {
    pub agent_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub admin_token: String,
    /// Trusts the instance's generated certificate; h1 and h2 by ALPN.
    pub client: TestClient,
    pub admin_client: TestClient,
}

impl Api {
    fn new(dir: &Path, agent_addr: SocketAddr, admin_addr: SocketAddr) -> Api {
        let admin_token = std::fs::read_to_string(dir.join("data/admin.token"))
            .unwrap()
            .trim()
            .to_owned();
        let ca = std::fs::read(dir.join("certs/server.crt")).unwrap();
        Api {
            client: client_trusting(&ca, false),
            admin_client: plain_client(),
            agent_addr,
            admin_addr,
            admin_token,
        }
    }

    pub fn agent_url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.agent_addr.port())
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    /// Admin call with the admin token.
    pub async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> Resp {
        let auth = format!("Bearer {}", self.admin_token);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        send(
            &self.admin_client,
            method,
            &self.admin_url(path),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            body,
        )
        .await
    }

    /// Stores a credential; panics unless 200.
    pub async fn put_credential(&self, user: &str, provider: &str, cred: Value) -> Value {
        let r = self
            .admin(
                Method::PUT,
                &format!("/v1/users/{user}/credentials/{provider}"),
                Some(cred),
            )
            .await;
        assert_eq!(r.status, 200, "put credential: {}", r.text());
        r.json()
    }

    /// The audit records of one `kind` among the newest 1000, newest
    /// first; panics unless the audit log answers 200.
    pub async fn audit_of_kind(&self, kind: &str) -> Vec<Value> {
        let r = self.admin(Method::GET, "/v1/audit?limit=1000", None).await;
        assert_eq!(r.status, 200, "audit: {}", r.text());
        let Value::Array(all) = r.json() else {
            panic!("audit is not an array: {}", r.text())
        };
        all.into_iter().filter(|a| a["kind"] == kind).collect()
    }

    /// Mints a session; panics unless 201. Returns the whole answer.
    pub async fn session(&self, user: &str, providers: &[&str]) -> Value {
        self.session_with(serde_json::json!({"user": user, "providers": providers}))
            .await
    }

    pub async fn session_with(&self, body: Value) -> Value {
        let r = self.admin(Method::POST, "/v1/sessions", Some(body)).await;
        assert_eq!(r.status, 201, "mint session: {}", r.text());
        r.json()
    }

    /// Mints a session and returns just its token.
    pub async fn token(&self, user: &str, providers: &[&str]) -> String {
        self.session(user, providers).await["token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Agent-facing call with a session token in X-Sidekey-Session.
    pub async fn proxy(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: impl Into<Bytes>,
    ) -> Resp {
        send(
            &self.client,
            method,
            &self.agent_url(path),
            &[("x-sidekey-session", token)],
            body,
        )
        .await
    }

    /// Agent-facing call with arbitrary headers.
    pub async fn agent(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Resp {
        send(&self.client, method, &self.agent_url(path), headers, body).await
    }
}

/// The real `sidekey` binary, started on ephemeral ports.
pub struct Sidekey {
    /// Temp dir holding config.toml, data/ and certs/ (kept across restarts).
    pub dir: Arc<tempfile::TempDir>,
    pub opts: Options,
    pub api: Api,
    child: Option<Child>,
    /// Every stderr line of every run, for secret scans.
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl std::ops::Deref for Sidekey {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

/// The `sidekey` binary of this build: Cargo builds it before any
/// integration test and puts it beside the test executables' `deps/`.
/// `SIDEKEY_BIN` names another one (the load tool's `--sidekey`).
pub fn bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SIDEKEY_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("the test executable has a path");
    let mut dir = exe.parent().expect("the test executable is in a folder");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("deps/ is in the profile's folder");
    }
    let bin = dir.join(format!("sidekey{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build --bin sidekey)",
        bin.display()
    );
    bin
}

impl Sidekey {
    pub async fn start(opts: Options) -> Sidekey {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        Sidekey::start_in(dir, opts).await
    }

    /// Starts on an existing directory (its config.toml is rewritten).
    pub async fn start_in(dir: Arc<tempfile::TempDir>, opts: Options) -> Sidekey {
        std::fs::write(dir.path().join("config.toml"), opts.config_text()).unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (child, agent, admin) = spawn(dir.path(), &opts, &logs).await;
        Sidekey {
            api: Api::new(dir.path(), agent, admin),
            dir,
            opts,
            child: Some(child),
            logs,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// All stderr so far.
    pub fn log_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        signal(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("sidekey did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no chance to flush.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same directory (new ports, new clients).
    pub async fn restart(&mut self) {
        self.kill9();
        std::fs::write(self.config_path(), self.opts.config_text()).unwrap();
        let (child, agent, admin) = spawn(self.dir.path(), &self.opts, &self.logs).await;
        self.child = Some(child);
        self.api = Api::new(self.dir.path(), agent, admin);
    }
}

/// The real server run in this process (`sidekey::server::run`), with a
/// clock the test can move: for expiry and backoff without sleeping.
pub struct InProcess {
    pub dir: Arc<tempfile::TempDir>,
    pub api: Api,
    pub app: Arc<sidekey::app::App>,
    pub clock: sidekey::clock::Clock,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::ops::Deref for InProcess {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

impl InProcess {
    pub async fn start(opts: Options) -> InProcess {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let path = dir.path().join("config.toml");
        // Secrets the binary would read from the environment are given
        // as files here: tests run in parallel in one process.
        std::fs::write(dir.path().join("webhook.secret"), WEBHOOK_SECRET).unwrap();
        std::fs::write(dir.path().join("init.secret"), INIT_SECRET).unwrap();
        let text = opts.config_text().replace(
            "webhook_secret_env = \"TEST_WEBHOOK_SECRET\"\ninit_secret_env = \"TEST_INIT_SECRET\"",
            "webhook_secret_file = \"webhook.secret\"\ninit_secret_file = \"init.secret\"",
        );
        std::fs::write(&path, text).unwrap();
        let cfg = sidekey::config::Config::load(&path).expect("test config is valid");
        let clock = sidekey::clock::Clock::system();
        let (app, listeners, tls) = sidekey::commands::start(cfg, clock.clone())
            .await
            .expect("server starts");
        let agent = listeners.agent.local_addr().unwrap();
        let admin = listeners.admin.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(sidekey::server::run(
            app.clone(),
            listeners,
            tls,
            async move {
                let _ = rx.await;
            },
        ));
        InProcess {
            api: Api::new(dir.path(), agent, admin),
            dir,
            app,
            clock,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Graceful shutdown, waiting for the server task to end.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Sidekey {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sends a signal with kill(1): the tests stay free of `unsafe`.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Runs `sidekey <args>` to completion with the test dir's config.
pub fn run_cli(
    dir: &Path,
    args: &[&str],
    env: &[(String, String)],
    stdin: Option<&str>,
) -> (i32, String, String) {
    use std::io::Write;
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .current_dir(dir)
        .env_remove("SIDEKEY_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    {
        let mut si = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            si.write_all(s.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts the binary and waits for its "sidekey ready" line.
async fn spawn(
    dir: &Path,
    opts: &Options,
    logs: &Arc<Mutex<Vec<String>>>,
) -> (Child, SocketAddr, SocketAddr) {
    let mut cmd = Command::new(bin());
    cmd.args(["--log-format", "json", "serve", "--config"])
        .arg(dir.join("config.toml"))
        .current_dir(dir)
        .env("SIDEKEY_LOG", &opts.log)
        .env("TEST_WEBHOOK_SECRET", WEBHOOK_SECRET)
        .env("TEST_INIT_SECRET", INIT_SECRET)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in &opts.env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn sidekey");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Result<(SocketAddr, SocketAddr), String>>();
    let logs2 = logs.clone();
    std::thread::spawn(move || {
        let mut sent = false;
        let mut early = Vec::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            logs2.lock().unwrap().push(line.clone());
            if !sent {
                early.push(line.clone());
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if v["message"] == "sidekey ready" {
                        let parse = |k: &str| -> SocketAddr {
                            let s = v[k].as_str().unwrap();
                            s.rsplit("//").next().unwrap().parse().unwrap()
                        };
                        let _ = tx.send(Ok((parse("agent"), parse("admin"))));
                        sent = true;
                    }
                }
            }
        }
        if !sent {
            let _ = tx.send(Err(early.join("\n")));
        }
    });
    let res = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap();
    match res {
        Ok(Ok((agent, admin))) => (child, agent, admin),
        Ok(Err(out)) => {
            let _ = child.kill();
            panic!("sidekey exited before it was ready:\n{out}");
        }
        Err(_) => {
            let _ = child.kill();
            panic!("sidekey was not ready within 30 s");
        }
    }
}

/// Every file under `dir` with its bytes, by relative path (to prove a
/// store was left untouched).
pub fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut std::collections::BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(base).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Every file under `dir`, concatenated (for raw-store scans).
pub fn read_tree(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(read_tree(&p));
            } else if let Ok(b) = std::fs::read(&p) {
                out.extend(b);
            }
        }
    }
    out
}

pub fn contains(hay: &[u8], needle: &str) -> bool {
    let n = needle.as_bytes();
    !n.is_empty() && hay.windows(n.len()).any(|w| w == n)
}

/// Extracts one query parameter from a URL.
pub fn query_param(url: &str, name: &str) -> Option<String> {
    let u = url::Url::parse(url).ok()?;
    u.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The bound config section for one provider pointing at a fake upstream.
pub fn provider_toml(name: &str, base_url: &str, extra: &str) -> String {
    format!("[providers.{name}]\nbase_url = \"{base_url}\"\n{extra}\n")
}

/// Unix seconds now (the system clock the binary uses).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A refreshable provider pointing at a fake upstream and token endpoint.
pub fn oauth_provider(name: &str, base_url: &str, token_url: &str, extra: &str) -> String {
    format!(
        "[providers.{name}]\nbase_url = \"{base_url}\"\ntoken_url = \"{token_url}\"\n\
         authorize_url = \"https://auth.example.com/authorize\"\n\
         client_id = \"test-client\"\nclient_secret = \"test-client-secret\"\n\
         refresh_skew_secs = 60\n{extra}\n"
    )
}

/// A private CA and a certificate it signed for `names`: what an upstream
/// on a company's own PKI presents (sidekey trusts it through
/// `upstream_ca_file`).
pub struct PrivatePki {
    /// PEM of the CA.
    pub ca_pem: String,
    /// The leaf for `names`, signed by the CA.
    pub leaf: CertificateDer<'static>,
    pub leaf_key: rcgen::KeyPair,
}

pub fn private_pki(names: &[&str]) -> PrivatePki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sidekey test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
    PrivatePki {
        ca_pem: ca_cert.pem(),
        leaf: leaf.der().clone(),
        leaf_key,
    }
}

/// A rustls server config presenting `cert` (ring provider) and offering
/// `alpn`.
pub fn tls_server_config(
    cert: CertificateDer<'static>,
    key: &rcgen::KeyPair,
    alpn: &[&[u8]],
) -> Arc<rustls::ServerConfig> {
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// Reads one HTTP/1.1 request for the raw test upstreams: the head (as
/// sent) and its `Content-Length` body. Bytes past it stay in `buf` for the
/// next call on the same connection; `None` at EOF or on an error.
pub async fn read_request<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> Option<(String, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < end + len {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = buf[end..end + len].to_vec();
    buf.drain(..end + len);
    Some((head, body))
}

/// The suites' Python interpreter: a venv with tests/python/requirements.txt
/// (the MCP Python SDK, the Vapi and Retell SDKs), made by
/// scripts/py-venv.sh on first use.
pub fn python() -> PathBuf {
    static PY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PY.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = Command::new(root.join("scripts/py-venv.sh"))
            .current_dir(&root)
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/py-venv.sh");
        assert!(
            out.status.success(),
            "scripts/py-venv.sh failed: the Python SDKs the suites test against are not installed"
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

/// Runs a Python script with the suites' interpreter; (exit code, stdout,
/// stderr).
pub fn run_python(script: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(python());
    cmd.arg("-c").arg(script).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run python");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
