//! Black-box tests of the core gateway: the real `sidekey` binary
//! on ephemeral ports, fake upstreams, and only what a user can see —
//! statuses, `X-Sidekey-Error` + JSON error codes, what the upstream
//! received, files on disk, exit codes and log lines.
use sidekey_testkit as support;

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use support::upstream::{Handler, Recorded, Reply, Upstream};
use support::{Options, Resp, Sidekey, provider_toml, send, snapshot};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------
// Local helpers (tests/support is shared and left as it is).

type AnyBody = BoxBody<Bytes, Infallible>;
type FlexClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, AnyBody>;

fn tls_client_config(ca_pem: &[u8]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.unwrap()).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// A client trusting `ca_pem` that sends any body type; `h1_only` offers
/// only http/1.1 by ALPN (so hop-by-hop headers really go on the wire and
/// bodies without a length go chunked).
fn flex_client(ca_pem: &[u8], h1_only: bool) -> FlexClient {
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_client_config(ca_pem))
        .https_only();
    let https = if h1_only {
        b.enable_http1().build()
    } else {
        b.enable_http1().enable_http2().build()
    };
    Client::builder(TokioExecutor::new()).build(https)
}

/// An HTTP/1.1-only client for plain http:// (the control in the
/// header-stripping test).
fn plain_h1_client() -> FlexClient {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_client_config(b""))
        .https_or_http()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(https)
}

fn ca_of(sk: &Sidekey) -> Vec<u8> {
    std::fs::read(sk.path().join("certs/server.crt")).unwrap()
}

fn full(b: impl Into<Bytes>) -> AnyBody {
    Full::new(b.into()).boxed()
}

/// A body with no length: chunked on HTTP/1.1, plain DATA frames on h2.
fn streamed(chunks: Vec<Bytes>) -> AnyBody {
    let frames: Vec<Result<Frame<Bytes>, Infallible>> =
        chunks.into_iter().map(|c| Ok(Frame::data(c))).collect();
    StreamBody::new(futures_util::stream::iter(frames)).boxed()
}

async fn flex_send(
    client: &FlexClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: AnyBody,
) -> Resp {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(60),
        client.request(req.body(body).unwrap()),
    )
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

/// One HTTP/1.1 request written byte for byte over TLS (for request targets
/// an HTTP client library would normalise or refuse), read to the end.
async fn raw_https(addr: SocketAddr, ca_pem: &[u8], target: &str, session: &str) -> Resp {
    let mut cfg = tls_client_config(ca_pem);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let head = format!(
        "GET {target} HTTP/1.1\r\nHost: localhost:{}\r\nX-Sidekey-Session: {session}\r\nConnection: close\r\n\r\n",
        addr.port()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let mut buf = Vec::new();
    // A peer closing without close_notify is an error for rustls; what was
    // read before still counts.
    let _ = tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut buf))
        .await
        .expect("raw request timed out");
    parse_raw_response(&buf)
}

fn parse_raw_response(buf: &[u8]) -> Resp {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(buf)));
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut rest = buf[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let mut headers = HeaderMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            headers.append(
                http::HeaderName::from_bytes(k.trim().as_bytes()).unwrap(),
                http::HeaderValue::from_str(v.trim()).unwrap(),
            );
        }
    }
    let chunked = headers
        .get("transfer-encoding")
        .is_some_and(|v| v.to_str().unwrap().contains("chunked"));
    if chunked {
        let mut out = Vec::new();
        let mut i = 0;
        loop {
            let nl = rest[i..].windows(2).position(|w| w == b"\r\n").unwrap() + i;
            let size_text = String::from_utf8_lossy(&rest[i..nl]).into_owned();
            let size =
                usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[nl + 2..nl + 2 + size]);
            i = nl + 2 + size + 2;
        }
        rest = out;
    } else if let Some(len) = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
    {
        rest.truncate(len);
    }
    Resp {
        status: StatusCode::from_u16(code).unwrap(),
        headers,
        body: Bytes::from(rest),
        version: Version::HTTP_11,
    }
}

/// An upstream answering a fixed body that never repeats what it received
/// (the echo default would put a query- or path-injected token into the
/// response, which would then show up in the secret scans).
async fn quiet_upstream() -> Upstream {
    let h: Handler =
        Arc::new(|_r: &Recorded| Reply::Json(200, json!({"ok": true, "from": "fake"})));
    Upstream::start_with(h).await
}

/// An upstream whose single response body is fed by the test: the head is
/// sent at once, each chunk when the test sends it, and the body ends when
/// the sender is dropped. Proves streaming causally: the upstream has not
/// finished until the test says so.
struct GatedUpstream {
    url: String,
    hits: Arc<AtomicUsize>,
    tx: Option<tokio::sync::mpsc::UnboundedSender<Bytes>>,
}

impl GatedUpstream {
    async fn start() -> GatedUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let rx = Arc::new(Mutex::new(Some(rx)));
        let hits = Arc::new(AtomicUsize::new(0));
        let hits2 = hits.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (rx, hits) = (rx.clone(), hits2.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |_req: Request<Incoming>| {
                        let rx = rx.lock().unwrap().take();
                        hits.fetch_add(1, Ordering::SeqCst);
                        async move {
                            let resp = match rx {
                                Some(rx) => {
                                    let s = futures_util::stream::unfold(rx, |mut rx| async move {
                                        rx.recv()
                                            .await
                                            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
                                    });
                                    http::Response::builder()
                                        .status(200)
                                        .header("content-type", "text/plain")
                                        .body(StreamBody::new(s).boxed_unsync())
                                        .unwrap()
                                }
                                None => http::Response::builder()
                                    .status(500)
                                    .body(Full::new(Bytes::from("one request only")).boxed_unsync())
                                    .unwrap(),
                            };
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        GatedUpstream {
            url,
            hits,
            tx: Some(tx),
        }
    }

    fn push(&self, b: &'static [u8]) {
        self.tx
            .as_ref()
            .unwrap()
            .send(Bytes::from_static(b))
            .unwrap();
    }

    fn finish(&mut self) {
        self.tx = None;
    }
}

async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads body frames until `n` bytes arrived (or the body ended).
async fn read_at_least(body: &mut Incoming, n: usize, limit: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while got.len() < n {
        let f = tokio::time::timeout_at(deadline, body.frame())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {n} bytes arrived; the response is being buffered, not streamed",
                    got.len()
                )
            });
        match f {
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    got.extend_from_slice(&d);
                }
            }
            Some(Err(e)) => panic!("body error: {e}"),
            None => break,
        }
    }
    got
}

/// Response dumps kept for the secret scan.
#[derive(Default)]
struct Seen(Vec<String>);

impl Seen {
    fn keep(&mut self, r: Resp) -> Resp {
        let mut s = format!("{}\n", r.status);
        for (k, v) in &r.headers {
            s.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
        }
        s.push_str(&String::from_utf8_lossy(&r.body));
        self.0.push(s);
        r
    }
}

fn assert_free_of(what: &str, hay: &str, secrets: &[String]) {
    for s in secrets {
        assert!(
            s.len() >= 12,
            "secret too short for a meaningful scan: {s:?}"
        );
        if let Some(i) = hay.find(s.as_str()) {
            let line_start = hay[..i].rfind('\n').map_or(0, |p| p + 1);
            let line_end = hay[i..].find('\n').map_or(hay.len(), |p| i + p);
            panic!(
                "{what} contains a secret ({}…): {}",
                &s[..8],
                &hay[line_start..line_end]
            );
        }
    }
}

/// Secrets every instance holds: admin token, master key, session key.
fn instance_secrets(dir: &Path) -> Vec<String> {
    ["data/admin.token", "data/master.key", "data/session.key"]
        .iter()
        .map(|f| {
            std::fs::read_to_string(dir.join(f))
                .unwrap()
                .trim()
                .to_owned()
        })
        .collect()
}

/// SIGTERM, every log line up to the final flush, and exit 0. The test's
/// runtime keeps running meanwhile, so its client connections can answer
/// the server's graceful close instead of holding the grace period open.
async fn stop_and_logs(sk: &mut Sidekey) -> String {
    let flushes = |sk: &Sidekey| sk.log_text().matches("store flushed").count();
    let before = flushes(sk);
    support::signal(sk.pid().expect("sidekey is running"), "TERM");
    wait_until(
        "sidekey logs its final flush after SIGTERM",
        Duration::from_secs(30),
        || flushes(sk) > before,
    )
    .await;
    assert_eq!(sk.stop(), Some(0), "sidekey must exit 0 on SIGTERM");
    sk.log_text()
}

/// Stops `sk` and scans its logs and every kept response for `secrets`
/// plus the instance's own admin token, master key and session key.
async fn scan_everything(sk: &mut Sidekey, seen: &Seen, secrets: &[String]) {
    let mut all: Vec<String> = secrets.to_vec();
    all.extend(instance_secrets(sk.path()));
    let logs = stop_and_logs(sk).await;
    assert!(
        logs.contains("sidekey ready") && logs.contains("SIGTERM"),
        "the captured log is incomplete:\n{logs}"
    );
    assert_free_of("the log", &logs, &all);
    for (i, r) in seen.0.iter().enumerate() {
        assert_free_of(&format!("response #{i}"), r, &all);
    }
}

/// Names of credential-carrying headers the upstream got.
fn credential_headers(r: &Recorded) -> Vec<String> {
    let mut v: Vec<String> = r
        .headers
        .keys()
        .map(|k| k.as_str().to_owned())
        .filter(|k| {
            matches!(
                k.as_str(),
                "authorization" | "proxy-authorization" | "cookie" | "x-api-key"
            ) || k.starts_with("x-sidekey-")
        })
        .collect();
    v.sort();
    v
}

/// Nothing the upstream recorded (header values, path, query, body)
/// contains any of `needles`.
fn assert_upstream_never_saw(r: &Recorded, needles: &[&str]) {
    let mut hay = vec![
        r.path.clone(),
        r.query.clone().unwrap_or_default(),
        String::from_utf8_lossy(&r.body).into_owned(),
    ];
    for (k, v) in &r.headers {
        hay.push(format!("{k}: {}", String::from_utf8_lossy(v.as_bytes())));
    }
    for h in &hay {
        for n in needles {
            assert!(!h.contains(n), "the upstream saw {n:?} in {h:?}");
        }
    }
}

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn closed_port_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

/// `sidekey <args>` in `dir`, killed (and the test failed) if it is still
/// running after `limit`: a `serve` that wrongly starts must not hang.
fn run_bounded(dir: &Path, args: &[&str], limit: Duration) -> (i32, String, String) {
    let mut child = Command::new(support::bin())
        .args(args)
        .current_dir(dir)
        .env_remove("SIDEKEY_CONFIG")
        .env_remove("RUST_LOG")
        .env("SIDEKEY_LOG", "info")
        .env("TEST_WEBHOOK_SECRET", support::WEBHOOK_SECRET)
        .env("TEST_INIT_SECRET", support::INIT_SECRET)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`sidekey {}` still running after {limit:?}; stderr:\n{}",
                args.join(" "),
                t_err.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status.code().unwrap_or(-1),
        t_out.join().unwrap(),
        t_err.join().unwrap(),
    )
}

fn assert_no_panic(stderr: &str) {
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE", "stack backtrace"] {
        assert!(!stderr.contains(bad), "stderr shows a panic:\n{stderr}");
    }
}

const SESSION_HDR: &str = "x-sidekey-session";

// ---------------------------------------------------------------------------
// 1. Injection styles

const AT_BEARER: &str = "at-bearer-6d0c3f1a9e2b4c58";
const AT_HEADER: &str = "at-header-0b7d2e9c4f1a3e65";
const AT_QUERY: &str = "at-query-5e8a1c3d7b9f2e04";
const TG_TOKEN: &str = "123456789:AAHtg-secret-9f8e7d6c5b4a";
const BASIC_USER: &str = "svc-user";
const BASIC_PASS: &str = "pa:ss-basic-1f2e3d4c5b6a";

#[tokio::test]
async fn every_injection_style_reaches_the_upstream_exactly() {
    let (up_b, up_basic, up_h, up_q, up_t) = (
        quiet_upstream().await,
        quiet_upstream().await,
        quiet_upstream().await,
        quiet_upstream().await,
        quiet_upstream().await,
    );
    let toml = [
        provider_toml("bearer", &format!("{}/v2", up_b.url), ""),
        provider_toml("basic", &up_basic.url, "inject = \"basic\""),
        provider_toml(
            "hdr",
            &up_h.url,
            "inject = { header = \"X-Api-Key\", value = \"Token {token}\" }",
        ),
        provider_toml("query", &up_q.url, "inject = { query = \"key\" }"),
        format!(
            "[providers.telegram]\npreset = \"telegram\"\nbase_url = \"{}\"\n",
            up_t.url
        ),
    ]
    .concat();
    let mut sk = Sidekey::start(Options::with_providers(&toml).log("debug")).await;
    let mut seen = Seen::default();
    for (p, cred) in [
        ("bearer", json!({"access_token": AT_BEARER})),
        (
            "basic",
            json!({"username": BASIC_USER, "password": BASIC_PASS}),
        ),
        ("hdr", json!({"access_token": AT_HEADER})),
        ("query", json!({"access_token": AT_QUERY})),
        ("telegram", json!({"access_token": TG_TOKEN})),
    ] {
        let r = sk
            .admin(
                Method::PUT,
                &format!("/v1/users/alice/credentials/{p}"),
                Some(cred),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        seen.keep(r);
    }
    let tok = sk
        .token("alice", &["bearer", "basic", "hdr", "query", "telegram"])
        .await;

    // bearer, under a base_url with a path
    let r = seen.keep(
        sk.proxy(Method::GET, "/v1/proxy/bearer/things/1?a=1&b=two", &tok, "")
            .await,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"ok": true, "from": "fake"}));
    let rec = up_b.last();
    assert_eq!(rec.method, "GET");
    assert_eq!(rec.path, "/v2/things/1");
    assert_eq!(rec.query.as_deref(), Some("a=1&b=two"));
    assert_eq!(credential_headers(&rec), ["authorization"]);
    assert_eq!(rec.headers.get_all("authorization").iter().count(), 1);
    assert_eq!(
        rec.header("authorization").as_deref(),
        Some(format!("Bearer {AT_BEARER}").as_str())
    );

    // basic, from the credential's username and password
    let r = seen.keep(
        sk.proxy(
            Method::POST,
            "/v1/proxy/basic/items",
            &tok,
            r#"{"name":"x"}"#,
        )
        .await,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = up_basic.last();
    assert_eq!(rec.method, "POST");
    assert_eq!(rec.path, "/items");
    assert_eq!(&rec.body[..], br#"{"name":"x"}"#);
    assert_eq!(credential_headers(&rec), ["authorization"]);
    let expect =
        base64::engine::general_purpose::STANDARD.encode(format!("{BASIC_USER}:{BASIC_PASS}"));
    assert_eq!(
        rec.header("authorization").as_deref(),
        Some(format!("Basic {expect}").as_str())
    );

    // named header with a template; a client-supplied copy is dropped
    let r = seen.keep(
        sk.agent(
            Method::GET,
            "/v1/proxy/hdr/me",
            &[
                (SESSION_HDR, &tok),
                ("x-api-key", "Token client-supplied-key"),
            ],
            "",
        )
        .await,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = up_h.last();
    assert_eq!(rec.path, "/me");
    assert_eq!(credential_headers(&rec), ["x-api-key"]);
    assert_eq!(rec.headers.get_all("x-api-key").iter().count(), 1);
    assert_eq!(
        rec.header("x-api-key").as_deref(),
        Some(format!("Token {AT_HEADER}").as_str())
    );
    assert_upstream_never_saw(&rec, &["client-supplied-key"]);

    // query parameter; the client's own `key=` never reaches the upstream
    let r = seen.keep(
        sk.proxy(
            Method::GET,
            "/v1/proxy/query/geocode?key=attacker-key&a=1",
            &tok,
            "",
        )
        .await,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = up_q.last();
    assert_eq!(rec.path, "/geocode");
    assert_eq!(
        rec.query.as_deref(),
        Some(format!("a=1&key={AT_QUERY}").as_str())
    );
    assert!(credential_headers(&rec).is_empty(), "{:?}", rec.headers);
    assert_upstream_never_saw(&rec, &["attacker-key"]);
    // ... and with no client query at all
    let r = seen.keep(
        sk.proxy(Method::GET, "/v1/proxy/query/geocode", &tok, "")
            .await,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        up_q.last().query.as_deref(),
        Some(format!("key={AT_QUERY}").as_str())
    );

    // Telegram: the token is a path prefix under the (overridden) base_url
    let r = seen.keep(
        sk.proxy(
            Method::POST,
            "/v1/proxy/telegram/sendMessage?parse_mode=HTML",
            &tok,
            r#"{"chat_id":42,"text":"hi"}"#,
        )
        .await,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = up_t.last();
    assert_eq!(rec.method, "POST");
    assert_eq!(rec.path, format!("/bot{TG_TOKEN}/sendMessage"));
    assert_eq!(rec.query.as_deref(), Some("parse_mode=HTML"));
    assert_eq!(&rec.body[..], br#"{"chat_id":42,"text":"hi"}"#);
    assert!(credential_headers(&rec).is_empty(), "{:?}", rec.headers);

    // No upstream ever saw the session token, and each saw one request per call.
    for up in [&up_b, &up_basic, &up_h, &up_q, &up_t] {
        for rec in up.requests() {
            assert_upstream_never_saw(&rec, &[&tok]);
        }
    }
    assert_eq!(
        [&up_b, &up_basic, &up_h, &up_q, &up_t].map(|u| u.count()),
        [1, 1, 1, 2, 1]
    );

    scan_everything(
        &mut sk,
        &seen,
        &[
            AT_BEARER.into(),
            AT_HEADER.into(),
            AT_QUERY.into(),
            TG_TOKEN.into(),
            BASIC_PASS.into(),
            expect,
            tok,
        ],
    )
    .await;
}

// ---------------------------------------------------------------------------
// 2. Header stripping and forwarding

#[tokio::test]
async fn client_credentials_and_hop_by_hop_headers_are_stripped() {
    let up = quiet_upstream().await;
    // An upstream answering 404 with its own hop-by-hop headers.
    let h: Handler = Arc::new(|_r: &Recorded| Reply::Full {
        status: 404,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("connection".into(), "x-resp-hop".into()),
            ("x-resp-hop".into(), "resp-hop-value".into()),
            ("keep-alive".into(), "timeout=9".into()),
            ("proxy-authenticate".into(), "Basic realm=upstream".into()),
            ("x-upstream".into(), "kept".into()),
        ],
        body: Bytes::from_static(br#"{"message":"no such item"}"#),
    });
    let up404 = Upstream::start_with(h).await;
    let toml = [
        provider_toml("bearer", &up.url, ""),
        provider_toml("answers404", &up404.url, ""),
    ]
    .concat();
    let mut sk = Sidekey::start(Options::with_providers(&toml).log("debug")).await;
    for p in ["bearer", "answers404"] {
        sk.put_credential("alice", p, json!({"access_token": AT_BEARER}))
            .await;
    }
    let mut seen = Seen::default();
    let tok = sk.token("alice", &["bearer", "answers404"]).await;
    let h1 = flex_client(&ca_of(&sk), true);
    let body = r#"{"text":"hello","n":1}"#;
    let client_headers: &[(&str, &str)] = &[
        (SESSION_HDR, &tok),
        ("authorization", "Bearer client-own-credential-77"),
        ("cookie", "sid=client-cookie-value-88"),
        ("connection", "keep-alive, x-hop-listed"),
        ("x-hop-listed", "hop-listed-value"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers"),
        ("upgrade", "websocket"),
        ("proxy-authorization", "Basic cHJveHk6cHJveHktc2VjcmV0"),
        ("x-conversation-id", "conv-strip-1"),
        ("x-sidekey-debug", "1"),
        ("x-sidekey-anything", "2"),
        ("x-custom", "keep-me"),
        ("content-type", "application/json"),
        ("accept", "application/json"),
    ];
    // Control: this client really puts every one of them on the wire (a
    // plain HTTP/1.1 request straight to a mirror records them all).
    let mirror = quiet_upstream().await;
    let r = flex_send(
        &plain_h1_client(),
        Method::POST,
        &format!("{}/mirror", mirror.url),
        client_headers,
        full(body),
    )
    .await;
    assert_eq!(r.status, 200);
    let m = mirror.last();
    for (k, _) in client_headers {
        assert!(
            m.header(k).is_some(),
            "the control lost {k}: {:?}",
            m.headers
        );
    }
    let r = seen.keep(
        flex_send(
            &h1,
            Method::POST,
            &sk.agent_url("/v1/proxy/bearer/messages/send?channel=C1&text=hi%20there"),
            client_headers,
            full(body),
        )
        .await,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.version, Version::HTTP_11);
    assert_eq!(up.count(), 1);
    let rec = up.last();
    assert_eq!(rec.method, "POST");
    assert_eq!(rec.path, "/messages/send");
    assert_eq!(rec.query.as_deref(), Some("channel=C1&text=hi%20there"));
    assert_eq!(&rec.body[..], body.as_bytes());
    assert_eq!(rec.header("x-custom").as_deref(), Some("keep-me"));
    assert_eq!(
        rec.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(rec.header("accept").as_deref(), Some("application/json"));
    // The client's Host is not forwarded: the upstream gets its own.
    assert_eq!(rec.header("host"), Some(up.addr.to_string()));
    for gone in [
        "cookie",
        "connection",
        "x-hop-listed",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "x-conversation-id",
    ] {
        assert!(
            rec.header(gone).is_none(),
            "{gone} reached the upstream: {:?}",
            rec.headers
        );
    }
    assert!(
        !rec.headers
            .keys()
            .any(|k| k.as_str().starts_with("x-sidekey-")),
        "{:?}",
        rec.headers
    );
    assert_eq!(credential_headers(&rec), ["authorization"]);
    assert_eq!(rec.headers.get_all("authorization").iter().count(), 1);
    assert_eq!(rec.bearer().as_deref(), Some(AT_BEARER));
    assert_upstream_never_saw(
        &rec,
        &[
            &tok,
            "client-own-credential-77",
            "client-cookie-value-88",
            "hop-listed-value",
            "conv-strip-1",
        ],
    );

    // The conversation header was consumed (it bound the session), not
    // forwarded: another conversation id is now refused.
    let r = seen.keep(
        sk.agent(
            Method::GET,
            "/v1/proxy/bearer/x",
            &[(SESSION_HDR, &tok), ("x-conversation-id", "conv-other-2")],
            "",
        )
        .await,
    );
    r.assert_error(401, "conversation_mismatch");
    assert_eq!(up.count(), 1);

    // The session may also come as `Authorization: Bearer <session>`; it is
    // replaced by the credential, never forwarded.
    let tok2 = sk.token("alice", &["bearer"]).await;
    let auth = format!("Bearer {tok2}");
    let r = seen.keep(
        sk.agent(
            Method::DELETE,
            "/v1/proxy/bearer/items/9?force=true",
            &[("authorization", &auth)],
            "",
        )
        .await,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = up.last();
    assert_eq!(rec.method, "DELETE");
    assert_eq!(rec.path, "/items/9");
    assert_eq!(rec.query.as_deref(), Some("force=true"));
    assert_eq!(rec.headers.get_all("authorization").iter().count(), 1);
    assert_eq!(rec.bearer().as_deref(), Some(AT_BEARER));
    assert_upstream_never_saw(&rec, &[&tok2, &tok]);
    assert_eq!(up.count(), 2);

    // The answer comes back with the upstream's status, body and headers,
    // minus its hop-by-hop ones, and is not marked as sidekey's own error.
    // (`tok` is now bound to conv-strip-1, so a fresh session.)
    let tok3 = sk.token("alice", &["answers404"]).await;
    let r = seen.keep(
        flex_send(
            &h1,
            Method::GET,
            &sk.agent_url("/v1/proxy/answers404/items/404"),
            &[(SESSION_HDR, &tok3)],
            full(""),
        )
        .await,
    );
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.text(), r#"{"message":"no such item"}"#);
    assert_eq!(r.headers["x-upstream"], "kept");
    assert_eq!(r.headers["content-type"], "application/json");
    assert!(
        r.headers.get("x-sidekey-error").is_none(),
        "{:?}",
        r.headers
    );
    for gone in ["x-resp-hop", "keep-alive", "proxy-authenticate"] {
        assert!(
            r.headers.get(gone).is_none(),
            "{gone} came back: {:?}",
            r.headers
        );
    }
    assert!(
        r.headers
            .get_all("connection")
            .iter()
            .all(|v| !v.to_str().unwrap().contains("x-resp-hop")),
        "{:?}",
        r.headers
    );
    assert_eq!(up404.count(), 1);

    scan_everything(&mut sk, &seen, &[AT_BEARER.into(), tok, tok2, tok3]).await;
}

// ---------------------------------------------------------------------------
// 3a. invalid_session in all its forms

/// Signs `claims` with HS256 under `kid`.
fn forge(claims: &Value, key: &[u8], kid: &str) -> String {
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&h, claims, &jsonwebtoken::EncodingKey::from_secret(key)).unwrap()
}

/// Compression is the client's to ask for, except from a provider whose
/// auth errors sidekey recognises in the body (Slack's `ok: false`): there
/// it must be able to read the answer, so `Accept-Encoding` is dropped.
#[tokio::test]
async fn accept_encoding_is_forwarded_unless_the_answer_must_be_read() {
    let plain = quiet_upstream().await;
    let slack = quiet_upstream().await;
    let toml = format!(
        "{}[providers.slack]\npreset = \"slack\"\nbase_url = \"{}\"\n",
        provider_toml("bearer", &plain.url, ""),
        slack.url
    );
    let sk = Sidekey::start(Options::with_providers(&toml)).await;
    for p in ["bearer", "slack"] {
        sk.put_credential("alice", p, json!({"access_token": AT_BEARER}))
            .await;
    }
    let tok = sk.token("alice", &["bearer", "slack"]).await;
    for (p, up, forwarded) in [
        ("bearer", &plain, Some("gzip, br")),
        ("slack", &slack, None),
    ] {
        let r = sk
            .agent(
                Method::GET,
                &format!("/v1/proxy/{p}/x"),
                &[(SESSION_HDR, &tok), ("accept-encoding", "gzip, br")],
                "",
            )
            .await;
        assert_eq!(r.status, 200, "{p}: {}", r.text());
        let rec = up.last();
        assert_eq!(rec.header("accept-encoding").as_deref(), forwarded, "{p}");
        assert_eq!(rec.bearer().as_deref(), Some(AT_BEARER), "{p}");
    }
}

#[tokio::test]
async fn every_kind_of_bad_session_is_invalid_session() {
    let up = quiet_upstream().await;
    let mut sk =
        Sidekey::start(Options::with_providers(&provider_toml("bearer", &up.url, "")).log("debug"))
            .await;
    sk.put_credential("alice", "bearer", json!({"access_token": AT_BEARER}))
        .await;
    sk.put_credential(
        "carol",
        "bearer",
        json!({"access_token": "at-carol-4b5c6d7e8f90"}),
    )
    .await;
    let mut seen = Seen::default();
    let legit = sk.token("alice", &["bearer"]).await;
    let url = "/v1/proxy/bearer/ping";

    // Material for forgeries: the real key, the real kid, real claims.
    let key_b64 = std::fs::read_to_string(sk.path().join("data/session.key")).unwrap();
    let key = base64::engine::general_purpose::STANDARD
        .decode(key_b64.trim())
        .unwrap();
    let header = jsonwebtoken::decode_header(&legit).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::HS256);
    let kid = header.kid.clone().expect("session tokens carry a kid");
    let parts: Vec<&str> = legit.split('.').collect();
    assert_eq!(parts.len(), 3);
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .unwrap(),
    )
    .unwrap();
    for k in ["iss", "aud", "sub", "sid", "providers", "iat", "exp"] {
        assert!(claims.get(k).is_some(), "claim {k} missing in {claims}");
    }

    // Controls: the legit token, and a re-signed copy of its claims, work
    // (so each refusal below is about the one thing that differs).
    let r = seen.keep(sk.proxy(Method::GET, url, &legit, "").await);
    assert_eq!(r.status, 200, "{}", r.text());
    let resigned = forge(&claims, &key, &kid);
    let r = seen.keep(sk.proxy(Method::GET, url, &resigned, "").await);
    assert_eq!(r.status, 200, "re-signed control: {}", r.text());
    let passed = up.count();
    assert_eq!(passed, 2);

    let mut other_key = [0u8; 32];
    rand::fill(&mut other_key);
    let with = |k: &str, v: Value| {
        let mut c = claims.clone();
        c[k] = v;
        c
    };
    let alg_none = format!(
        "{}.{}.",
        b64url(
            json!({"alg": "none", "typ": "JWT", "kid": kid})
                .to_string()
                .as_bytes()
        ),
        parts[1]
    );
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64url(with("sub", json!("carol")).to_string().as_bytes()),
        parts[2]
    );
    let tampered_providers = format!(
        "{}.{}.{}",
        parts[0],
        b64url(
            with("providers", json!(["bearer", "slack"]))
                .to_string()
                .as_bytes()
        ),
        parts[2]
    );
    let mut expired = with("exp", json!(now() - 60));
    expired["iat"] = json!(now() - 120);
    let cases: Vec<(&str, String)> = vec![
        ("malformed", "not-a-jwt".into()),
        ("three garbage parts", "aaa.bbb.ccc".into()),
        ("alg none with the real kid", alg_none),
        (
            "signed with another HS256 key",
            forge(&claims, &other_key, &kid),
        ),
        (
            "wrong aud",
            forge(&with("aud", json!("someone-else")), &key, &kid),
        ),
        (
            "wrong iss",
            forge(&with("iss", json!("not-sidekey")), &key, &kid),
        ),
        ("expired", forge(&expired, &key, &kid)),
        ("unknown kid", forge(&claims, &key, "hs-0000000000000000")),
        ("tampered sub", tampered),
        ("tampered providers", tampered_providers),
    ];
    let r = seen.keep(sk.agent(Method::GET, url, &[], "").await);
    r.assert_error(401, "invalid_session");
    let r = seen.keep(
        sk.agent(
            Method::GET,
            url,
            &[("authorization", "Bearer not.a.session")],
            "",
        )
        .await,
    );
    r.assert_error(401, "invalid_session");
    for (what, t) in &cases {
        let r = seen.keep(sk.proxy(Method::GET, url, t, "").await);
        assert_eq!(r.status, 401, "{what}: {}", r.text());
        r.assert_error(401, "invalid_session");
        // ... also as Authorization: Bearer
        let auth = format!("Bearer {t}");
        let r = seen.keep(
            sk.agent(Method::GET, url, &[("authorization", &auth)], "")
                .await,
        );
        assert_eq!(r.status, 401, "{what} (bearer): {}", r.text());
        r.assert_error(401, "invalid_session");
    }
    assert_eq!(up.count(), passed, "a refused session reached the upstream");

    // Revoked via the admin API: works before, not after.
    let s = sk.session("alice", &["bearer"]).await;
    let (sid, t) = (
        s["session_id"].as_str().unwrap().to_owned(),
        s["token"].as_str().unwrap().to_owned(),
    );
    assert_eq!(sk.proxy(Method::GET, url, &t, "").await.status, 200);
    let d = sk
        .admin(Method::DELETE, &format!("/v1/sessions/{sid}"), None)
        .await;
    assert_eq!(d.status, 204, "{}", d.text());
    let r = seen.keep(sk.proxy(Method::GET, url, &t, "").await);
    r.assert_error(401, "invalid_session");
    assert_eq!(up.count(), passed + 1);

    // User deleted: the session dies and so does the credential.
    let carol = sk.token("carol", &["bearer"]).await;
    assert_eq!(sk.proxy(Method::GET, url, &carol, "").await.status, 200);
    let d = sk.admin(Method::DELETE, "/v1/users/carol", None).await;
    assert_eq!(d.status, 204, "{}", d.text());
    let r = seen.keep(sk.proxy(Method::GET, url, &carol, "").await);
    r.assert_error(401, "invalid_session");
    let g = seen.keep(
        sk.admin(Method::GET, "/v1/users/carol/credentials/bearer", None)
            .await,
    );
    assert_eq!(g.status, 404, "{}", g.text());
    assert_eq!(up.count(), passed + 2);

    // The legit session is untouched by all of this.
    assert_eq!(sk.proxy(Method::GET, url, &legit, "").await.status, 200);
    for rec in up.requests() {
        assert_upstream_never_saw(&rec, &[&legit, &resigned, &t, &carol]);
    }

    let mut secrets = vec![
        AT_BEARER.to_owned(),
        "at-carol-4b5c6d7e8f90".into(),
        legit,
        resigned,
        t,
        carol,
    ];
    secrets.extend(cases.into_iter().map(|(_, t)| t).filter(|t| t.len() > 20));
    scan_everything(&mut sk, &seen, &secrets).await;
}

// ---------------------------------------------------------------------------
// 3b. The other refusals and upstream failures

#[tokio::test]
async fn refusals_have_their_codes_and_never_reach_the_upstream() {
    let (up_a, up_other, up_lim) = (
        quiet_upstream().await,
        quiet_upstream().await,
        quiet_upstream().await,
    );
    let toml = [
        provider_toml("bearer", &up_a.url, ""),
        provider_toml("other", &up_other.url, ""),
        provider_toml(
            "limited",
            &up_lim.url,
            "allow = [\"GET /calendar/v3/**\", \"POST /chat.postMessage\"]",
        ),
        provider_toml("dead", &closed_port_url(), ""),
    ]
    .concat();
    let mut sk = Sidekey::start(
        Options::with_providers(&toml)
            .server("max_body_bytes = 1024")
            .log("debug"),
    )
    .await;
    for p in ["bearer", "limited", "dead"] {
        sk.put_credential("alice", p, json!({"access_token": AT_BEARER}))
            .await;
    }
    let mut seen = Seen::default();
    let all = sk
        .token("alice", &["bearer", "other", "limited", "dead"])
        .await;
    let only_bearer = sk.token("alice", &["bearer"]).await;
    let ca = ca_of(&sk);

    // provider_not_allowed
    let r = seen.keep(
        sk.proxy(
            Method::GET,
            "/v1/proxy/limited/calendar/v3/events",
            &only_bearer,
            "",
        )
        .await,
    );
    r.assert_error(403, "provider_not_allowed");
    assert_eq!(r.json()["error"]["provider"], "limited");

    // path_not_allowed (method and path), with a control that is allowed
    for (m, p) in [
        (Method::POST, "/v1/proxy/limited/calendar/v3/events"),
        (Method::GET, "/v1/proxy/limited/admin/users"),
        (Method::GET, "/v1/proxy/limited/chat.postMessage"),
        (Method::GET, "/v1/proxy/limited"),
    ] {
        let r = seen.keep(sk.proxy(m.clone(), p, &all, "").await);
        assert_eq!(r.status, 403, "{m} {p}: {}", r.text());
        r.assert_error(403, "path_not_allowed");
        assert_eq!(r.json()["error"]["provider"], "limited");
    }
    assert_eq!(up_lim.count(), 0);
    let r = seen.keep(
        sk.proxy(
            Method::GET,
            "/v1/proxy/limited/calendar/v3/calendars/primary/events",
            &all,
            "",
        )
        .await,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = seen.keep(
        sk.proxy(
            Method::POST,
            "/v1/proxy/limited/chat.postMessage",
            &all,
            "{}",
        )
        .await,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up_lim.count(), 2);

    // bad_path, written byte for byte (a client library would normalise
    // some of these); the control proves the raw client itself works.
    let ok = seen.keep(raw_https(sk.agent_addr, &ca, "/v1/proxy/bearer/fine/path", &all).await);
    assert_eq!(ok.status, 200, "raw control: {}", ok.text());
    assert_eq!(up_a.count(), 1);
    for target in [
        "/v1/proxy/bearer/..",
        "/v1/proxy/bearer/../../etc/passwd",
        "/v1/proxy/bearer/a/../../x",
        "/v1/proxy/bearer/%2e%2e/x",
        "/v1/proxy/bearer/%2E%2E/x",
        "/v1/proxy/bearer/.%2e/x",
        "/v1/proxy/bearer/%252e%252e/x",
        "/v1/proxy/bearer/a%2fb",
        "/v1/proxy/bearer/a%2Fb",
        "/v1/proxy/bearer/a\\b",
        "/v1/proxy/bearer/a%5cb",
        "/v1/proxy/bearer//evil.example/x",
        "/v1/proxy/bearer/@evil.example/x",
        "https://evil.example/v1/proxy/bearer/x",
    ] {
        let r = seen.keep(raw_https(sk.agent_addr, &ca, target, &all).await);
        assert_eq!(r.status, 400, "{target}: {}", r.text());
        r.assert_error(400, "bad_path");
    }
    // ... and the ones an ordinary client can send, through the h1+h2 client
    for p in ["/v1/proxy/bearer/%2e%2e/x", "/v1/proxy/bearer/a%2fb/c"] {
        let r = seen.keep(sk.proxy(Method::GET, p, &all, "").await);
        r.assert_error(400, "bad_path");
    }
    assert_eq!(up_a.count(), 1, "a bad path reached the upstream");

    // unknown_provider
    let r = seen.keep(sk.proxy(Method::GET, "/v1/proxy/nosuch/x", &all, "").await);
    r.assert_error(404, "unknown_provider");

    // credential_missing
    let r = seen.keep(sk.proxy(Method::GET, "/v1/proxy/other/x", &all, "").await);
    r.assert_error(424, "credential_missing");
    assert_eq!(r.json()["error"]["provider"], "other");
    assert_eq!(up_other.count(), 0);

    // body_too_large: with Content-Length, chunked on HTTP/1.1, streamed on h2
    let r = seen.keep(
        sk.proxy(
            Method::POST,
            "/v1/proxy/bearer/upload",
            &all,
            vec![b'x'; 1025],
        )
        .await,
    );
    r.assert_error(413, "body_too_large");
    let h1 = flex_client(&ca, true);
    let h2 = flex_client(&ca, false);
    for (client, version) in [(&h1, Version::HTTP_11), (&h2, Version::HTTP_2)] {
        let chunks: Vec<Bytes> = (0..8).map(|_| Bytes::from(vec![b'y'; 512])).collect();
        let r = seen.keep(
            flex_send(
                client,
                Method::POST,
                &sk.agent_url("/v1/proxy/bearer/upload"),
                &[(SESSION_HDR, &all)],
                streamed(chunks),
            )
            .await,
        );
        assert_eq!(r.version, version);
        r.assert_error(413, "body_too_large");
    }
    assert_eq!(up_a.count(), 1, "an oversized body reached the upstream");
    // Exactly the limit is fine, chunked too, and arrives intact.
    let exact: Vec<u8> = (0..1024u32).map(|i| b'a' + (i % 26) as u8).collect();
    let r = seen.keep(
        sk.proxy(Method::POST, "/v1/proxy/bearer/upload", &all, exact.clone())
            .await,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(&up_a.last().body[..], &exact[..]);
    let r = seen.keep(
        flex_send(
            &h1,
            Method::POST,
            &sk.agent_url("/v1/proxy/bearer/upload"),
            &[(SESSION_HDR, &all)],
            streamed(exact.chunks(100).map(Bytes::copy_from_slice).collect()),
        )
        .await,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(&up_a.last().body[..], &exact[..]);
    assert_eq!(up_a.count(), 3);

    // upstream_unreachable
    let r = seen.keep(sk.proxy(Method::GET, "/v1/proxy/dead/x", &all, "").await);
    r.assert_error(502, "upstream_unreachable");
    assert_eq!(r.json()["error"]["provider"], "dead");
    assert_eq!(
        [up_a.count(), up_lim.count(), up_other.count()],
        [3, 2, 0],
        "only the controls reached an upstream"
    );

    for up in [&up_a, &up_lim] {
        for rec in up.requests() {
            assert_upstream_never_saw(&rec, &[&all, &only_bearer]);
        }
    }
    scan_everything(&mut sk, &seen, &[AT_BEARER.into(), all, only_bearer]).await;
}

#[tokio::test]
async fn a_slow_upstream_is_upstream_timeout() {
    let up = Upstream::slow(Duration::from_secs(30), 200, json!({"late": true})).await;
    let mut sk = Sidekey::start(
        Options::with_providers(&provider_toml("slow", &up.url, ""))
            .server("upstream_timeout_secs = 1"),
    )
    .await;
    sk.put_credential("alice", "slow", json!({"access_token": AT_BEARER}))
        .await;
    let tok = sk.token("alice", &["slow"]).await;
    let mut seen = Seen::default();
    let r = seen.keep(sk.proxy(Method::GET, "/v1/proxy/slow/x", &tok, "").await);
    r.assert_error(504, "upstream_timeout");
    assert_eq!(r.json()["error"]["provider"], "slow");
    assert_eq!(up.count(), 1, "the upstream did get the request");
    scan_everything(&mut sk, &seen, &[AT_BEARER.into(), tok]).await;
}

// ---------------------------------------------------------------------------
// 4. Streaming

#[tokio::test]
async fn large_responses_arrive_intact_and_are_streamed() {
    let chunk: Bytes = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
    let c2 = chunk.clone();
    let h: Handler = Arc::new(move |_r: &Recorded| Reply::Stream {
        status: 200,
        chunk: c2.clone(),
        count: 128,
        delay: Duration::ZERO,
    });
    let big = Upstream::start_with(h).await;
    let mut gated = GatedUpstream::start().await;
    let toml = [
        provider_toml("big", &big.url, ""),
        provider_toml("gated", &gated.url, ""),
    ]
    .concat();
    let sk = Sidekey::start(Options::with_providers(&toml)).await;
    for p in ["big", "gated"] {
        sk.put_credential("alice", p, json!({"access_token": AT_BEARER}))
            .await;
    }
    let tok = sk.token("alice", &["big", "gated"]).await;

    // 8 MiB in 64 KiB chunks, over h2 and HTTP/1.1.
    let h1 = flex_client(&ca_of(&sk), true);
    for r in [
        sk.proxy(Method::GET, "/v1/proxy/big/download", &tok, "")
            .await,
        flex_send(
            &h1,
            Method::GET,
            &sk.agent_url("/v1/proxy/big/download"),
            &[(SESSION_HDR, &tok)],
            full(""),
        )
        .await,
    ] {
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), 8 * 1024 * 1024, "{:?}", r.version);
        assert!(
            r.body.chunks(chunk.len()).all(|c| c == &chunk[..]),
            "the body was altered"
        );
    }
    assert_eq!(big.count(), 2);

    // The first chunk reaches the client while the upstream is still
    // holding the rest: if sidekey buffered, it would never arrive.
    let req = Request::builder()
        .uri(sk.agent_url("/v1/proxy/gated/events"))
        .header(SESSION_HDR, &tok)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::spawn({
        let client = sk.client.clone();
        async move { client.request(req).await }
    });
    wait_until(
        "the upstream got the request",
        Duration::from_secs(30),
        || gated.hits.load(Ordering::SeqCst) == 1,
    )
    .await;
    gated.push(b"first chunk;");
    let resp = tokio::time::timeout(Duration::from_secs(30), resp)
        .await
        .expect("response head not forwarded before the upstream body ended")
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = read_at_least(&mut body, 12, Duration::from_secs(20)).await;
    assert_eq!(first, b"first chunk;");
    // Only now does the upstream go on and finish.
    gated.push(b"second chunk;");
    gated.push(b"last chunk");
    gated.finish();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b"second chunk;last chunk");
}

// ---------------------------------------------------------------------------
// 5. HTTP/2 and HTTP/1.1

#[tokio::test]
async fn http2_by_alpn_and_http1_both_work() {
    let up = quiet_upstream().await;
    let mut sk = Sidekey::start(Options::with_providers(&provider_toml(
        "bearer", &up.url, "",
    )))
    .await;
    sk.put_credential("alice", "bearer", json!({"access_token": AT_BEARER}))
        .await;
    let tok = sk.token("alice", &["bearer"]).await;
    let ca = ca_of(&sk);
    let h2_only = support::client_trusting(&ca, true);
    let r = send(
        &h2_only,
        Method::POST,
        &sk.agent_url("/v1/proxy/bearer/h2?x=1"),
        &[(SESSION_HDR, &tok), ("x-custom", "h2")],
        "h2-body",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.version, Version::HTTP_2);
    let rec = up.last();
    assert_eq!(
        (rec.method.as_str(), rec.path.as_str(), rec.query.as_deref()),
        ("POST", "/h2", Some("x=1"))
    );
    assert_eq!(&rec.body[..], b"h2-body");
    assert_eq!(rec.header("x-custom").as_deref(), Some("h2"));
    assert_eq!(rec.bearer().as_deref(), Some(AT_BEARER));
    assert_upstream_never_saw(&rec, &[&tok]);

    // A client offering both gets h2 by ALPN.
    let r = sk
        .proxy(Method::GET, "/v1/proxy/bearer/both", &tok, "")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.version, Version::HTTP_2);

    let h1 = flex_client(&ca, true);
    let r = flex_send(
        &h1,
        Method::PUT,
        &sk.agent_url("/v1/proxy/bearer/h1"),
        &[(SESSION_HDR, &tok)],
        full("h1-body"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.version, Version::HTTP_11);
    let rec = up.last();
    assert_eq!((rec.method.as_str(), rec.path.as_str()), ("PUT", "/h1"));
    assert_eq!(&rec.body[..], b"h1-body");
    assert_eq!(rec.bearer().as_deref(), Some(AT_BEARER));
    assert_eq!(up.count(), 3);

    // Health on both listeners, both protocols.
    assert_eq!(
        send(&h2_only, Method::GET, &sk.agent_url("/readyz"), &[], "")
            .await
            .status,
        200
    );
    assert_eq!(
        send(
            &sk.admin_client,
            Method::GET,
            &sk.admin_url("/healthz"),
            &[],
            ""
        )
        .await
        .status,
        200
    );
    scan_everything(&mut sk, &Seen::default(), &[AT_BEARER.into(), tok]).await;
}

// ---------------------------------------------------------------------------
// 6. Restart and durability

#[tokio::test]
async fn credentials_survive_restart_and_kill9() {
    let up = quiet_upstream().await;
    let toml = [
        provider_toml("bearer", &up.url, ""),
        provider_toml("second", &up.url, ""),
    ]
    .concat();
    let mut sk = Sidekey::start(Options::with_providers(&toml)).await;
    let exp = now() + 7200;
    let put = sk
        .put_credential(
            "alice",
            "bearer",
            json!({"access_token": AT_BEARER, "refresh_token": "rt-bearer-restart-5566",
                   "expires_at": exp, "scopes": ["read", "write"]}),
        )
        .await;
    let old = sk.token("alice", &["bearer", "second"]).await;
    assert_eq!(
        sk.proxy(Method::GET, "/v1/proxy/bearer/x", &old, "")
            .await
            .status,
        200
    );

    sk.restart().await;
    let meta = sk
        .admin(Method::GET, "/v1/users/alice/credentials/bearer", None)
        .await;
    assert_eq!(meta.status, 200, "{}", meta.text());
    let m = meta.json();
    assert_eq!(m["expires_at"], exp);
    assert_eq!(m["has_refresh_token"], true);
    assert_eq!(m["scopes"], json!(["read", "write"]));
    assert_eq!(m["status"], "active");
    assert_eq!(m["updated_at"], put["updated_at"]);
    assert!(!meta.text().contains(AT_BEARER) && !meta.text().contains("rt-bearer-restart"));
    let tok = sk.token("alice", &["bearer", "second"]).await;
    let r = sk
        .proxy(Method::GET, "/v1/proxy/bearer/after-restart", &tok, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().bearer().as_deref(), Some(AT_BEARER));
    // A session minted before the restart is still valid.
    let r = sk
        .proxy(Method::GET, "/v1/proxy/bearer/old-session", &old, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());

    // A PUT answered 200 is on disk: SIGKILL straight after loses nothing.
    sk.put_credential(
        "alice",
        "bearer",
        json!({"access_token": "at-bearer-rotated-9a8b7c"}),
    )
    .await;
    sk.put_credential(
        "alice",
        "second",
        json!({"access_token": "at-second-new-1a2b3c4d"}),
    )
    .await;
    sk.kill9();
    sk.restart().await;
    let tok = sk.token("alice", &["bearer", "second"]).await;
    let r = sk
        .proxy(Method::GET, "/v1/proxy/bearer/after-kill", &tok, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        up.last().bearer().as_deref(),
        Some("at-bearer-rotated-9a8b7c")
    );
    let r = sk
        .proxy(Method::GET, "/v1/proxy/second/after-kill", &tok, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        up.last().bearer().as_deref(),
        Some("at-second-new-1a2b3c4d")
    );
    // The overwrite replaced the refresh token and expiry too.
    let m = sk
        .admin(Method::GET, "/v1/users/alice/credentials/bearer", None)
        .await
        .json();
    assert_eq!(m["has_refresh_token"], false);
    assert_eq!(m["expires_at"], Value::Null);

    let mut seen = Seen::default();
    seen.keep(meta);
    scan_everything(
        &mut sk,
        &seen,
        &[
            AT_BEARER.into(),
            "rt-bearer-restart-5566".into(),
            "at-bearer-rotated-9a8b7c".into(),
            "at-second-new-1a2b3c4d".into(),
            old,
            tok,
        ],
    )
    .await;
}

// ---------------------------------------------------------------------------
// 7. Wrong master key

#[tokio::test]
async fn a_wrong_master_key_is_refused_and_leaves_the_store_untouched() {
    let up = quiet_upstream().await;
    // The store's files are compared byte for byte: a sled store whatever
    // the suite's backend (tests/cluster.rs covers a wrong key on
    // PostgreSQL).
    let mut sk = Sidekey::start(
        Options::with_providers(&provider_toml("bearer", &up.url, "")).store("backend = \"sled\""),
    )
    .await;
    sk.put_credential("alice", "bearer", json!({"access_token": AT_BEARER}))
        .await;
    assert_eq!(sk.stop(), Some(0));

    let dir = sk.path().to_path_buf();
    let key_path = dir.join("data/master.key");
    let store_dir = dir.join("data/sidekey.db");
    let right_key = std::fs::read(&key_path).unwrap();
    let before = snapshot(&store_dir);
    assert!(!before.is_empty(), "the store has files");

    let mut other = [0u8; 32];
    rand::fill(&mut other);
    let wrong_key = base64::engine::general_purpose::STANDARD.encode(other);
    std::fs::write(&key_path, format!("{wrong_key}\n")).unwrap();

    let config = dir.join("config.toml");
    let config = config.to_str().unwrap();
    let (code, stdout, stderr) = run_bounded(
        &dir,
        &["serve", "--config", config],
        Duration::from_secs(30),
    );
    assert_eq!(code, 2, "serve with a wrong master key: stderr:\n{stderr}");
    assert_no_panic(&stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one clear error line expected:\n{stderr}");
    assert!(
        errors[0].contains("master key") && errors[0].contains("master_key_file"),
        "the error must name the master key setting: {}",
        errors[0]
    );
    let mut secrets = instance_secrets(&dir);
    secrets.push(
        String::from_utf8(right_key.clone())
            .unwrap()
            .trim()
            .to_owned(),
    );
    secrets.push(AT_BEARER.into());
    assert_free_of("serve's output", &format!("{stdout}\n{stderr}"), &secrets);

    // check-config says the same.
    let (code, _, cc_err) =
        support::run_cli(&dir, &["check-config", "--config", config], &[], None);
    assert_eq!(code, 2, "{cc_err}");
    assert_no_panic(&cc_err);
    assert!(cc_err.contains("master key"), "{cc_err}");
    assert_free_of("check-config's output", &cc_err, &secrets);

    assert_eq!(
        snapshot(&store_dir),
        before,
        "the store changed although the key was wrong"
    );

    // The right key opens it again, credential and all.
    std::fs::write(&key_path, &right_key).unwrap();
    let (code, out, err) = support::run_cli(&dir, &["check-config", "--config", config], &[], None);
    assert_eq!(code, 0, "{out}{err}");
    sk.restart().await;
    let m = sk
        .admin(Method::GET, "/v1/users/alice/credentials/bearer", None)
        .await;
    assert_eq!(m.status, 200, "{}", m.text());
    let tok = sk.token("alice", &["bearer"]).await;
    let r = sk
        .proxy(Method::GET, "/v1/proxy/bearer/again", &tok, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().bearer().as_deref(), Some(AT_BEARER));
}

// ---------------------------------------------------------------------------
// 8. check-config

#[test]
fn check_config_accepts_a_good_config_and_lists_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options::with_providers(&provider_toml("bearer", "http://127.0.0.1:9", ""));
    std::fs::write(dir.path().join("config.toml"), opts.config_text()).unwrap();
    let (code, out, err) = support::run_cli(
        dir.path(),
        &["check-config", "--config", "config.toml"],
        &[],
        None,
    );
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("OK"), "{out}");
    assert_no_panic(&err);
    // The config path may come before the command too, as many tools take it.
    for args in [
        &["--config", "config.toml", "check-config"][..],
        &[
            "--config=config.toml",
            "--log-format",
            "text",
            "check-config",
        ],
    ] {
        let (code, out, err) = support::run_cli(dir.path(), args, &[], None);
        assert_eq!(code, 0, "{args:?}\nstdout:\n{out}\nstderr:\n{err}");
        assert!(out.contains("OK"), "{out}");
    }
    // Validation writes nothing: no keys, no certificate, no store.
    assert!(
        !dir.path().join("data").exists(),
        "check-config created data/"
    );
    assert!(
        !dir.path().join("certs").exists(),
        "check-config created certs/"
    );

    let bad = r#"
[server]
listen = "not-an-address"
public_url = "ftp://example.com"

[admin]
listen = "0.0.0.0:9444"

[store]
generate_missing = true

[sessions]
ttl_secs = 7200
max_ttl_secs = 60
dynamic_variable = "sidekey_session"

[providers.plain]
base_url = "http://api.example.com"

[providers.weird]
base_url = "https://api.example.com"
inject = "carrier-pigeon"
"#;
    std::fs::write(dir.path().join("bad.toml"), bad).unwrap();
    let (code, out, err) = support::run_cli(
        dir.path(),
        &["check-config", "--config", "bad.toml"],
        &[],
        None,
    );
    assert_eq!(code, 2, "stdout:\n{out}\nstderr:\n{err}");
    assert_no_panic(&err);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    for (what, needle) in [
        ("server listen", "[server] listen"),
        ("public_url", "public_url"),
        ("admin listen", "[admin] listen"),
        ("ttl above max", "max_ttl_secs"),
        ("dynamic variable", "dynamic_variable"),
        ("http upstream", "[providers.plain]"),
        ("bad inject", "[providers.weird]"),
    ] {
        assert!(
            errors.iter().any(|l| l.contains(needle)),
            "check-config did not report the {what} problem ({needle}):\n{err}"
        );
    }
    assert!(errors.len() >= 7, "{err}");
}

// ---------------------------------------------------------------------------
// 9. Zero-step first start with the shipped config

struct Proc {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn log_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    async fn stop(&mut self) -> Option<i32> {
        support::signal(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            assert!(Instant::now() < deadline, "no exit within 30 s of SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sidekey --log-format json serve --config <config>` in `dir`, up to its
/// "sidekey ready" line (as tests/support does).
async fn spawn_ready(dir: &Path, config: &Path) -> (Proc, SocketAddr, SocketAddr) {
    let mut child = Command::new(support::bin())
        .args(["--log-format", "json", "serve", "--config"])
        .arg(config)
        .current_dir(dir)
        .env("SIDEKEY_LOG", "info")
        .env_remove("RUST_LOG")
        .env_remove("SIDEKEY_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let logs = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel::<Result<(SocketAddr, SocketAddr), String>>();
    let logs2 = logs.clone();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            logs2.lock().unwrap().push(line.clone());
            if !sent {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if v["message"] == "sidekey ready" {
                        let parse = |k: &str| -> SocketAddr {
                            v[k].as_str()
                                .unwrap()
                                .rsplit("//")
                                .next()
                                .unwrap()
                                .parse()
                                .unwrap()
                        };
                        let _ = tx.send(Ok((parse("agent"), parse("admin"))));
                        sent = true;
                    }
                }
            }
        }
        if !sent {
            let _ = tx.send(Err("exited before it was ready".into()));
        }
    });
    let proc_ = Proc { child, logs };
    let res = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap();
    match res {
        Ok(Ok((agent, admin))) => (proc_, agent, admin),
        other => panic!("sidekey did not start: {other:?}\n{}", proc_.log_text()),
    }
}

#[tokio::test]
async fn the_shipped_config_starts_with_no_other_step() {
    use std::os::unix::fs::PermissionsExt;
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml")).unwrap();
    let mut replaced = 0;
    let text: String = shipped
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("listen =") || l.trim_start().starts_with("listen=") {
                replaced += 1;
                "listen = \"127.0.0.1:0\"".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(replaced, 2, "the shipped config has two listen lines");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, text).unwrap();

    let (mut p, agent, admin) = spawn_ready(dir.path(), &config).await;
    for f in [
        "data/master.key",
        "data/admin.token",
        "data/session.key",
        "certs/server.key",
        "certs/server.crt",
    ] {
        let meta = std::fs::metadata(dir.path().join(f))
            .unwrap_or_else(|e| panic!("{f} was not generated: {e}"));
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o600,
            "{f} must be mode 0600"
        );
        assert!(meta.len() > 0, "{f} is empty");
    }
    let ca = std::fs::read(dir.path().join("certs/server.crt")).unwrap();
    let agent_client = support::client_trusting(&ca, false);
    let r = send(
        &agent_client,
        Method::GET,
        &format!("https://localhost:{}/readyz", agent.port()),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "agent /readyz: {}", r.text());
    let r = send(
        &support::plain_client(),
        Method::GET,
        &format!("http://{admin}/readyz"),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "admin /readyz: {}", r.text());
    // The generated admin token works.
    let token = std::fs::read_to_string(dir.path().join("data/admin.token")).unwrap();
    let auth = format!("Bearer {}", token.trim());
    let r = send(
        &support::plain_client(),
        Method::GET,
        &format!("http://{admin}/v1/users/alice/credentials"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());

    assert_eq!(p.stop().await, Some(0));
    wait_until(
        "the final log line is read",
        Duration::from_secs(10),
        || p.log_text().contains("store flushed"),
    )
    .await;
    let logs = p.log_text();
    let warns: Vec<Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["level"] == "WARN")
        .collect();
    let warn_text: Vec<String> = warns.iter().map(|v| v["message"].to_string()).collect();
    for what in [
        "master key",
        "admin token",
        "session signing key",
        "TLS certificate",
    ] {
        assert!(
            warn_text
                .iter()
                .any(|m| m.contains("generated") && m.contains(what)),
            "no warning about the generated {what}:\n{logs}"
        );
    }
    assert!(
        logs.lines()
            .any(|l| l.contains("admin API token") && l.contains("data/admin.token")),
        "the log must say where the admin token is:\n{logs}"
    );
    assert_free_of("the first-start log", &logs, &instance_secrets(dir.path()));
}

// ---------------------------------------------------------------------------
// 10. Graceful shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_the_request_in_flight_and_exits_0() {
    let mut gated = GatedUpstream::start().await;
    let mut sk = Sidekey::start(Options::with_providers(&provider_toml(
        "slow", &gated.url, "",
    )))
    .await;
    sk.put_credential("alice", "slow", json!({"access_token": AT_BEARER}))
        .await;
    let tok = sk.token("alice", &["slow"]).await;
    let in_flight = tokio::spawn({
        let (client, url, tok) = (
            sk.client.clone(),
            sk.agent_url("/v1/proxy/slow/report"),
            tok.clone(),
        );
        async move { send(&client, Method::GET, &url, &[(SESSION_HDR, &tok)], "").await }
    });
    wait_until(
        "the upstream got the request",
        Duration::from_secs(30),
        || gated.hits.load(Ordering::SeqCst) == 1,
    )
    .await;
    gated.push(b"partial ");

    // SIGTERM while the upstream still holds the rest of the answer.
    support::signal(sk.pid().unwrap(), "TERM");
    wait_until("sidekey is draining", Duration::from_secs(30), || {
        sk.log_text().contains("shutting down")
    })
    .await;
    assert!(
        TcpStream::connect(sk.agent_addr).await.is_err(),
        "still accepting connections after SIGTERM"
    );
    gated.push(b"and the rest");
    gated.finish();
    let r = tokio::time::timeout(Duration::from_secs(30), in_flight)
        .await
        .expect("the in-flight request did not finish")
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "partial and the rest");
    // SIGTERM was sent above: the store is flushed and the exit code is 0.
    wait_until("sidekey flushes its store", Duration::from_secs(30), || {
        sk.log_text().contains("store flushed")
    })
    .await;
    assert_eq!(sk.stop(), Some(0), "exit code after SIGTERM");
    let logs = sk.log_text();
    let mut secrets = instance_secrets(sk.path());
    secrets.extend([AT_BEARER.to_owned(), tok]);
    assert_free_of("the log", &logs, &secrets);
}

// ---------------------------------------------------------------------------
// 11. Admin API basics (and 12: the secret scan over all of it)

#[tokio::test]
async fn admin_api_basics() {
    let up = quiet_upstream().await;
    let toml = [
        provider_toml("bearer", &up.url, ""),
        provider_toml("second", &up.url, ""),
    ]
    .concat();
    let mut sk = Sidekey::start(Options::with_providers(&toml).log("debug")).await;
    let mut seen = Seen::default();
    let creds_url = sk.admin_url("/v1/users/alice/credentials");

    // 401 without a token, with a wrong one, with the wrong scheme.
    let wrong = format!("Bearer {}x", sk.admin_token);
    let basic = format!("Basic {}", sk.admin_token);
    for h in [
        vec![],
        vec![("authorization", "Bearer wrong-admin-token-123456")],
        vec![("authorization", wrong.as_str())],
        vec![("authorization", basic.as_str())],
    ] {
        let r = seen.keep(send(&sk.admin_client, Method::GET, &creds_url, &h, "").await);
        r.assert_error(401, "unauthorized");
        let r = seen.keep(
            send(
                &sk.admin_client,
                Method::PUT,
                &sk.admin_url("/v1/users/alice/credentials/bearer"),
                &h,
                json!({"access_token": "at-should-not-store-1234"}).to_string(),
            )
            .await,
        );
        r.assert_error(401, "unauthorized");
    }
    let r = seen.keep(
        sk.admin(Method::GET, "/v1/users/alice/credentials/bearer", None)
            .await,
    );
    assert_eq!(
        r.status,
        404,
        "an unauthorized PUT was stored: {}",
        r.text()
    );

    // Bad user ids.
    let long = "u".repeat(129);
    for user in ["bad!user", "bad%20user", long.as_str(), "a%2Fb"] {
        let r = seen.keep(
            sk.admin(
                Method::PUT,
                &format!("/v1/users/{user}/credentials/bearer"),
                Some(json!({"access_token": AT_BEARER})),
            )
            .await,
        );
        assert_eq!(r.status, 400, "{user}: {}", r.text());
        r.assert_error(400, "bad_request");
    }
    let ok_long = "u".repeat(128);
    let r = seen.keep(
        sk.admin(
            Method::PUT,
            &format!("/v1/users/{ok_long}/credentials/bearer"),
            Some(json!({"access_token": AT_BEARER})),
        )
        .await,
    );
    assert_eq!(r.status, 200, "128 characters are allowed: {}", r.text());

    // Unknown provider.
    let r = seen.keep(
        sk.admin(
            Method::PUT,
            "/v1/users/alice/credentials/nosuch",
            Some(json!({"access_token": AT_BEARER})),
        )
        .await,
    );
    r.assert_error(404, "unknown_provider");

    // PUT, GET metadata (never a token), list, DELETE.
    let exp = now() + 3600;
    let r = seen.keep(
        sk.admin(
            Method::PUT,
            "/v1/users/alice/credentials/bearer",
            Some(
                json!({"access_token": AT_BEARER, "refresh_token": "rt-admin-basics-778899",
                        "expires_at": exp, "scopes": ["read", "write"]}),
            ),
        )
        .await,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let before = now();
    let r = seen.keep(
        sk.admin(
            Method::PUT,
            "/v1/users/alice/credentials/second",
            Some(json!({"access_token": "at-second-admin-556677", "expires_in": 600})),
        )
        .await,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let e = r.json()["expires_at"]
        .as_i64()
        .expect("expires_at from expires_in");
    assert!((before + 600..=now() + 600).contains(&e), "expires_at {e}");

    let r = seen.keep(
        sk.admin(Method::GET, "/v1/users/alice/credentials/bearer", None)
            .await,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let m = r.json();
    for k in [
        "user",
        "provider",
        "status",
        "expires_at",
        "has_refresh_token",
        "scopes",
        "updated_at",
    ] {
        assert!(m.get(k).is_some(), "metadata lacks {k}: {m}");
    }
    assert_eq!(m["user"], "alice");
    assert_eq!(m["provider"], "bearer");
    assert_eq!(m["status"], "active");
    assert_eq!(m["expires_at"], exp);
    assert_eq!(m["has_refresh_token"], true);
    assert_eq!(m["scopes"], json!(["read", "write"]));
    assert!(m["updated_at"].is_i64(), "{m}");
    for k in ["access_token", "refresh_token", "token", "password"] {
        assert!(m.get(k).is_none(), "metadata has {k}: {m}");
    }

    let r = seen.keep(
        sk.admin(Method::GET, "/v1/users/alice/credentials", None)
            .await,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let list = r.json();
    let mut names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["provider"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["bearer", "second"]);

    let tok = sk.token("alice", &["bearer", "second"]).await;
    let r = seen.keep(sk.proxy(Method::GET, "/v1/proxy/second/x", &tok, "").await);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = seen.keep(
        sk.admin(Method::DELETE, "/v1/users/alice/credentials/second", None)
            .await,
    );
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(r.body.is_empty());
    let r = seen.keep(
        sk.admin(Method::GET, "/v1/users/alice/credentials/second", None)
            .await,
    );
    assert_eq!(r.status, 404, "{}", r.text());
    let r = seen.keep(
        sk.admin(Method::GET, "/v1/users/alice/credentials", None)
            .await,
    );
    assert_eq!(r.json().as_array().unwrap().len(), 1);
    let r = seen.keep(sk.proxy(Method::GET, "/v1/proxy/second/x", &tok, "").await);
    r.assert_error(424, "credential_missing");
    let r = seen.keep(sk.proxy(Method::GET, "/v1/proxy/bearer/x", &tok, "").await);
    assert_eq!(r.status, 200, "{}", r.text());

    // What operators read must be token-free too.
    let r = seen.keep(sk.admin(Method::GET, "/v1/audit?limit=1000", None).await);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.json()
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["path"] == "/x" && a["provider"] == "second"),
        "proxied calls are audited: {}",
        r.text()
    );
    let r = seen.keep(sk.admin(Method::GET, "/metrics", None).await);
    assert_eq!(r.status, 200);

    scan_everything(
        &mut sk,
        &seen,
        &[
            AT_BEARER.into(),
            "rt-admin-basics-778899".into(),
            "at-second-admin-556677".into(),
            "at-should-not-store-1234".into(),
            tok,
        ],
    )
    .await;
}

#[tokio::test]
async fn admin_accepts_token_responses_and_defaults_session_providers() {
    let up = support::upstream::Upstream::start().await;
    let sk = Sidekey::start(Options::with_providers(&format!(
        "{}{}",
        support::provider_toml("alpha", &up.url, ""),
        support::provider_toml("beta", &up.url, "")
    )))
    .await;
    // A provider's token response stored as it is.
    let r = sk
        .admin(
            Method::PUT,
            "/v1/users/ann/credentials/alpha",
            Some(json!({
                "access_token": "at-resp-1", "token_type": "Bearer", "expires_in": 3600,
                "refresh_token": "rt-resp-1", "scope": "read write,admin", "id_token": "eyJ.x.y",
                "refresh_token_expires_in": 86400
            })),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["scopes"], json!(["read", "write", "admin"]));
    // A misspelt field is an error, not a silently lost refresh token.
    let r = sk
        .admin(
            Method::PUT,
            "/v1/users/ann/credentials/alpha",
            Some(json!({"access_token": "at-resp-2", "refresh_tokn": "rt"})),
        )
        .await;
    r.assert_error(400, "bad_request");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("refresh_tokn")
    );
    // No providers list: every configured provider.
    let s = sk.session_with(json!({"user": "ann"})).await;
    assert_eq!(s["providers"], json!(["alpha", "beta"]));
    let r = sk
        .proxy(
            Method::GET,
            "/v1/proxy/alpha/x",
            s["token"].as_str().unwrap(),
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().bearer().as_deref(), Some("at-resp-1"));
    // An explicit empty list is a mistake.
    let r = sk
        .admin(
            Method::POST,
            "/v1/sessions",
            Some(json!({"user": "ann", "providers": []})),
        )
        .await;
    r.assert_error(400, "bad_request");
}

/// What the audit log says about proxied calls: who (user and session),
/// in which conversation (bound at minting or by the call's header), to
/// which provider, and, for a refused provider, the name that was asked
/// for. The request path hands the session's strings to the audit writer
/// without copying them; this pins what comes out.
#[tokio::test]
async fn proxied_calls_are_audited_with_their_user_session_conversation_and_provider() {
    let up = Upstream::start().await;
    let toml = [
        provider_toml("bearer", &up.url, ""),
        provider_toml("other", &up.url, ""),
    ]
    .concat();
    let sk = Sidekey::start(Options::with_providers(&toml)).await;
    sk.put_credential("alice", "bearer", json!({"access_token": AT_BEARER}))
        .await;
    let bound = sk
        .session_with(
            json!({"user": "alice", "providers": ["bearer"], "conversation_id": "conv-A"}),
        )
        .await;
    let unbound = sk.session("alice", &["bearer"]).await;
    let (bound_tok, unbound_tok) = (
        bound["token"].as_str().unwrap(),
        unbound["token"].as_str().unwrap(),
    );

    async fn call(sk: &Sidekey, method: Method, path: &str, tok: &str, conv: &str) -> Resp {
        let headers = [("x-sidekey-session", tok), ("x-conversation-id", conv)];
        sk.agent(method, path, &headers, "{}").await
    }
    let r = call(&sk, Method::GET, "/v1/proxy/bearer/a", bound_tok, "conv-A").await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The unbound session is bound by this call's header.
    let r = call(
        &sk,
        Method::POST,
        "/v1/proxy/bearer/b",
        unbound_tok,
        "conv-B",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    call(&sk, Method::GET, "/v1/proxy/other/c", bound_tok, "conv-A")
        .await
        .assert_error(403, "provider_not_allowed");
    call(&sk, Method::GET, "/v1/proxy/nope/d", bound_tok, "conv-A")
        .await
        .assert_error(404, "unknown_provider");

    let proxied = sk.audit_of_kind("proxy").await;
    assert_eq!(proxied.len(), 4, "{proxied:?}");
    let find = |provider: &str| {
        proxied
            .iter()
            .find(|a| a["provider"] == provider)
            .unwrap_or_else(|| panic!("no record for {provider}: {proxied:?}"))
    };
    let bound_sid = bound["session_id"].as_str().unwrap();
    let unbound_sid = unbound["session_id"].as_str().unwrap();

    let a = proxied.iter().find(|a| a["path"] == "/a").unwrap();
    assert_eq!(
        (&a["user"], &a["session_id"], &a["conversation_id"]),
        (&json!("alice"), &json!(bound_sid), &json!("conv-A")),
        "{a}"
    );
    assert_eq!((&a["method"], &a["status"]), (&json!("GET"), &json!(200)));
    assert!(a.get("error").is_none(), "{a}");

    let b = proxied.iter().find(|a| a["path"] == "/b").unwrap();
    assert_eq!(
        (
            &b["user"],
            &b["session_id"],
            &b["conversation_id"],
            &b["provider"]
        ),
        (
            &json!("alice"),
            &json!(unbound_sid),
            &json!("conv-B"),
            &json!("bearer")
        ),
        "{b}"
    );
    assert_eq!(b["method"], "POST");

    // Refused providers: named as asked, with who asked. The session
    // passed its checks before the provider was refused, so its
    // conversation is recorded too.
    for (name, code, status) in [
        ("other", "provider_not_allowed", 403),
        ("nope", "unknown_provider", 404),
    ] {
        let rec = find(name);
        assert_eq!(
            (
                &rec["user"],
                &rec["session_id"],
                &rec["error"],
                &rec["status"]
            ),
            (
                &json!("alice"),
                &json!(bound_sid),
                &json!(code),
                &json!(status)
            ),
            "{rec}"
        );
        assert_eq!(rec["conversation_id"], "conv-A", "{rec}");
    }
    let all = sk.admin(Method::GET, "/v1/audit?limit=1000", None).await;
    assert!(!all.text().contains(AT_BEARER), "{}", all.text());
}
