//! Hostile upstreams: no byte of one exchange ever reaches another, and
//! what an upstream answers reaches the agent only as sidekey's rules allow.
//!
//! A raw-TCP fake upstream misbehaves the way real servers do: it answers
//! before reading a request's body and then reads that body as a request of
//! its own, sends bytes after an answer that has no body or after interim
//! answers, frames answers ambiguously, sends headers that would speak for
//! sidekey, and breaks answers off. Like most naive servers it leaves
//! Nagle's algorithm on, so a second small answer can wait in its socket
//! until the next request arrives. Two users alternate on ONE agent worker
//! (so they share that worker's connection pool). The upstream tags every
//! answer with the token it saw in the request it answers, so each user
//! checks that an answer is their own.

use sidekey_testkit as support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use support::{Options, Resp, Sidekey, provider_toml};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOKEN_A: &str = "tok-hostile-user-a";
const TOKEN_B: &str = "tok-hostile-user-b";

/// What the fake upstream saw.
#[derive(Default)]
struct Seen {
    /// Every request as `METHOD /path token`, in order.
    requests: Mutex<Vec<String>>,
    /// The bodies of `/smuggled` requests.
    smuggled_bodies: Mutex<Vec<Vec<u8>>>,
    accepted: AtomicUsize,
}

impl Seen {
    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// The fake upstream. Each request's path says how to misbehave:
///
/// - `/early...`: answers as soon as the head is in and never reads the
///   body: whatever follows the head is parsed as the next request (a
///   naive server whose handler ignores the body).
/// - `/early-drain...`: answers as soon as the head is in, then reads the
///   body and drops it (an early answer that stays in sync).
/// - `/smuggled?delay_ms=N`: an ordinary request answered after N ms;
///   `/attacker-chosen`: an ordinary request. Only ever sent from inside
///   another request's body.
/// - HEAD `/late/head`, `/late/204`, `/late/304`, `/late/interim`,
///   `/late/cl-te`: an answer with no body, after interim answers, or
///   framed both ways; then, `LATE` afterwards, an answer nobody asked for.
/// - `/extra`: an answer and at once (no Nagle) an answer nobody asked for.
/// - `/framing/two-lengths`, `/framing/cl-list`: two `Content-Length`s.
/// - `/headers`: headers no agent may get from an upstream.
/// - `/truncated/chunked`, `/truncated/length`: the body breaks off (the
///   connection closes); `/truncated/stall`: the body stops arriving.
/// - anything else: read whole, answered with the token it carried.
async fn hostile_upstream() -> (String, Arc<Seen>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let seen = Arc::new(Seen::default());
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            s2.accepted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(s, s2.clone()));
        }
    });
    (url, seen)
}

/// How long after an answer the planted bytes follow.
const LATE: Duration = Duration::from_millis(30);

/// The answer for a request that carried `token`: what every user checks.
fn tagged(token: &str, path: &str) -> Vec<u8> {
    let body = json!({"token": token, "path": path}).to_string();
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// An answer nobody asked for, planted for the next request on the
/// connection.
fn planted() -> Vec<u8> {
    tagged("planted", "/planted")
}

async fn serve(mut s: TcpStream, seen: Arc<Seen>) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if !read_more(&mut s, &mut buf).await {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let mut line = head.lines().next().unwrap_or("").split(' ');
        let method = line.next().unwrap_or("").to_owned();
        let target = line.next().unwrap_or("/").to_owned();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_owned())
            })
        };
        let token = header("authorization")
            .and_then(|a| a.strip_prefix("Bearer ").map(str::to_owned))
            .unwrap_or_else(|| "none".into());
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        seen.requests
            .lock()
            .unwrap()
            .push(format!("{method} {path} {token}"));

        let early = path.starts_with("/early");
        if !early {
            while buf.len() < len {
                if !read_more(&mut s, &mut buf).await {
                    return;
                }
            }
            let body: Vec<u8> = buf.drain(..len).collect();
            if path == "/smuggled" {
                seen.smuggled_bodies.lock().unwrap().push(body);
            }
        }
        let delay = query
            .strip_prefix("delay_ms=")
            .and_then(|d| d.parse().ok())
            .map(Duration::from_millis)
            .filter(|d| !d.is_zero());
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let mut late = false;
        let answer = match (method.as_str(), path) {
            ("HEAD", "/late/head") => {
                late = true;
                // The length of the body a GET would get; none follows.
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 40\r\n\r\n"
                    .to_vec()
            }
            (_, "/late/204") => {
                late = true;
                b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()
            }
            (_, "/late/304") => {
                late = true;
                b"HTTP/1.1 304 Not Modified\r\netag: \"x\"\r\n\r\n".to_vec()
            }
            (_, "/late/interim") => {
                late = true;
                let mut a =
                    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
                        .to_vec();
                a.extend_from_slice(&tagged(&token, path));
                a
            }
            (_, "/late/cl-te") => {
                // Transfer-Encoding wins (RFC 9112 §6.3); an upstream that
                // meant the length would put its next answer elsewhere.
                late = true;
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec()
            }
            (_, "/extra") => {
                // Sent at once, in a write of its own, behind the answer.
                let _ = s.set_nodelay(true);
                if s.write_all(&tagged(&token, path)).await.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
                planted()
            }
            (_, "/framing/two-lengths") => {
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 50\r\n\r\nhello".to_vec()
            }
            (_, "/framing/cl-list") => {
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5, 5\r\ncontent-length: 5\r\n\r\nhello"
                    .to_vec()
            }
            (_, "/headers") => b"HTTP/1.1 200 OK\r\n\
                content-type: application/json\r\n\
                x-sidekey-error: invalid_session\r\n\
                X-Sidekey-Session: spoofed\r\n\
                set-cookie: __Host-sidekey_connect=upstream; Path=/; Secure; HttpOnly\r\n\
                Set-Cookie: other=1\r\n\
                strict-transport-security: max-age=63072000; includeSubDomains\r\n\
                connection: x-hop\r\n\
                x-hop: per-connection\r\n\
                keep-alive: timeout=5\r\n\
                proxy-authenticate: Basic\r\n\
                x-custom: kept\r\n\
                content-length: 11\r\n\
                content-length: 11, 11\r\n\
                \r\n\
                {\"ok\":true}"
                .to_vec(),
            (_, "/truncated/chunked") => {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n20\r\n{\"ok\":false,\"error\":\"invalid_au")
                    .await;
                return;
            }
            (_, "/truncated/length") => {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"ok\":false,\"error\":\"invalid_auth\"}")
                    .await;
                return;
            }
            (_, "/truncated/stall") => {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n23\r\n{\"ok\":false,\"error\":\"invalid_auth\"}\r\n")
                    .await;
                tokio::time::sleep(Duration::from_secs(30)).await;
                return;
            }
            _ => tagged(&token, path),
        };
        if s.write_all(&answer).await.is_err() {
            return;
        }
        if path.starts_with("/early-drain") {
            while buf.len() < len {
                if !read_more(&mut s, &mut buf).await {
                    return;
                }
            }
            buf.drain(..len);
        }
        if late {
            tokio::time::sleep(LATE).await;
            if s.write_all(&planted()).await.is_err() {
                return;
            }
        }
    }
}

async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    match s.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// sidekey with ONE agent worker (one connection pool for both users) in
/// front of the hostile upstream as provider `up`, plus `extra` providers;
/// user A and user B each have a token for every provider.
async fn start_with(url: &str, extra: &str, server: &str) -> (Sidekey, String, String) {
    let opts = Options::with_providers(&format!("{}{extra}", provider_toml("up", url, "")))
        .env("SIDEKEY_AGENT_THREADS", "1")
        .server("max_body_bytes = 4194304")
        .server(server);
    let sk = Sidekey::start(opts).await;
    let mut providers = vec!["up"];
    if extra.contains("[providers.slack]") {
        providers.push("slack");
    }
    for p in &providers {
        sk.put_credential("user-a", p, json!({"access_token": TOKEN_A}))
            .await;
        sk.put_credential("user-b", p, json!({"access_token": TOKEN_B}))
            .await;
    }
    let a = sk.token("user-a", &providers).await;
    let b = sk.token("user-b", &providers).await;
    (sk, a, b)
}

async fn start(url: &str) -> (Sidekey, String, String) {
    start_with(url, "", "").await
}

/// The answer is the upstream's answer to this user's own request.
fn assert_own(r: &Resp, token: &str, path: &str, what: &str) {
    assert_eq!(r.status, 200, "{what}: {}", r.text());
    let v: Value = r.json();
    assert_eq!(
        (v["token"].as_str(), v["path"].as_str()),
        (Some(token), Some(path)),
        "{what}: got another exchange's answer"
    );
}

/// User B's request in round `round`, checked to be answered as its own.
async fn b_gets_its_own(sk: &Sidekey, tok_b: &str, round: usize, what: &str) {
    let path = format!("/b/{round}");
    let r = sk
        .proxy(Method::GET, &format!("/v1/proxy/up{path}"), tok_b, "")
        .await;
    assert_own(
        &r,
        TOKEN_B,
        &path,
        &format!("B after {what}, round {round}"),
    );
}

/// A request body that is itself a complete HTTP request of `size` bytes
/// for `/smuggled`, answered after `delay_ms`.
fn smuggled_request(size: usize, delay_ms: u64) -> Vec<u8> {
    let head = |pad: usize| {
        format!(
            "POST /smuggled?delay_ms={delay_ms} HTTP/1.1\r\nhost: up\r\ncontent-type: text/plain\r\ncontent-length: {pad}\r\n\r\n"
        )
    };
    let mut pad = size - head(size).len();
    while head(pad).len() + pad != size {
        pad = size - head(pad).len();
    }
    let mut body = head(pad).into_bytes();
    body.resize(size, b'x');
    body
}

/// A body that is the start of a request whose declared body is longer
/// than what follows: the next request on the connection (another user's,
/// with their credential) would become its body.
fn swallowing_request() -> Vec<u8> {
    b"POST /smuggled HTTP/1.1\r\nhost: up\r\ncontent-length: 600\r\n\r\ntext=".to_vec()
}

/// A body that is the start of a request line: the next request on the
/// connection (another user's request line and headers, their credential
/// among them) would complete it.
fn prefix_request() -> Vec<u8> {
    let mut b = b"GET /attacker-chosen?pad=".to_vec();
    b.resize(1024, b'p');
    b
}

#[tokio::test]
async fn a_request_smuggled_in_a_body_never_reaches_another_user() {
    let (url, seen) = hostile_upstream().await;
    let (sk, a, b) = start(&url).await;
    let mut bodies: Vec<(String, Vec<u8>)> = Vec::new();
    for size in [1024, 64 * 1024, 1024 * 1024] {
        // Answered at once (held back by Nagle until the next request
        // comes), and answered after the next request is in.
        for delay_ms in [0, 50] {
            bodies.push((
                format!("{size}-byte request, answered after {delay_ms} ms"),
                smuggled_request(size, delay_ms),
            ));
        }
    }
    bodies.push(("a request missing its body".into(), swallowing_request()));
    bodies.push(("half a request line".into(), prefix_request()));
    for (what, body) in &bodies {
        for round in 0..20 {
            let r = sk
                .proxy(Method::POST, "/v1/proxy/up/early", &a, body.clone())
                .await;
            assert_own(&r, TOKEN_A, "/early", &format!("A, {what}, round {round}"));
            b_gets_its_own(&sk, &b, round, what).await;
        }
    }
    // The upstream did read the bodies as requests of their own (the test
    // is not vacuous) but never with user B's request inside: B's request
    // line never completed A's, B's request was never the body of A's.
    let requests = seen.requests();
    assert!(requests.iter().any(|r| r.starts_with("POST /smuggled ")));
    for r in &requests {
        if r.starts_with("GET /attacker-chosen") {
            assert!(!r.ends_with(TOKEN_B), "B's credential in A's request: {r}");
        }
    }
    for body in seen.smuggled_bodies.lock().unwrap().iter() {
        let body = String::from_utf8_lossy(body);
        assert!(!body.contains(TOKEN_B), "B's request inside A's: {body}");
    }
}

#[tokio::test]
async fn early_answers_with_and_without_reading_the_body_stay_with_their_user() {
    let (url, _seen) = hostile_upstream().await;
    let (sk, a, b) = start(&url).await;
    let json = br#"{"channel":"C1","text":"hello"}"#.to_vec();
    let large = vec![b'y'; 64 * 1024];
    for (path, body) in [
        ("/early", &json),
        ("/early-drain", &json),
        ("/early-drain", &large),
    ] {
        for round in 0..20 {
            let r = sk
                .proxy(
                    Method::POST,
                    &format!("/v1/proxy/up{path}"),
                    &a,
                    body.clone(),
                )
                .await;
            let what = format!("{path} with {} bytes", body.len());
            assert_own(&r, TOKEN_A, path, &format!("A, {what}, round {round}"));
            b_gets_its_own(&sk, &b, round, &what).await;
        }
    }
}

#[tokio::test]
async fn bytes_after_an_answer_without_a_body_never_reach_the_next_user() {
    let (url, _seen) = hostile_upstream().await;
    let (sk, a, b) = start(&url).await;
    for (method, path, status) in [
        (Method::HEAD, "/late/head", 200),
        (Method::GET, "/late/204", 204),
        (Method::GET, "/late/304", 304),
        (Method::GET, "/late/interim", 200),
        (Method::GET, "/late/cl-te", 200),
    ] {
        for round in 0..20 {
            let r = sk
                .proxy(method.clone(), &format!("/v1/proxy/up{path}"), &a, "")
                .await;
            let what = format!("{method} {path}");
            assert_eq!(r.status, status, "A, {what}, round {round}: {}", r.text());
            match path {
                "/late/interim" => assert_own(&r, TOKEN_A, path, &what),
                "/late/cl-te" => assert_eq!(r.text(), "hello", "{what}"),
                _ => assert!(r.body.is_empty(), "{what}: {}", r.text()),
            }
            b_gets_its_own(&sk, &b, round, &what).await;
        }
    }
}

#[tokio::test]
async fn bytes_right_after_an_answer_end_its_connection() {
    let (url, _seen) = hostile_upstream().await;
    let (sk, a, b) = start(&url).await;
    for round in 0..20 {
        let r = sk.proxy(Method::GET, "/v1/proxy/up/extra", &a, "").await;
        assert_own(&r, TOKEN_A, "/extra", &format!("A, round {round}"));
        b_gets_its_own(&sk, &b, round, "an answer followed by another").await;
    }
}

#[tokio::test]
async fn bodiless_requests_of_two_users_still_share_one_connection() {
    let (url, seen) = hostile_upstream().await;
    let (sk, a, b) = start(&url).await;
    for round in 0..20 {
        let path = format!("/a/{round}");
        let r = sk
            .proxy(Method::GET, &format!("/v1/proxy/up{path}"), &a, "")
            .await;
        assert_own(&r, TOKEN_A, &path, &format!("A, round {round}"));
        b_gets_its_own(&sk, &b, round, "a GET").await;
    }
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
}

/// Sends one HTTP/1.1 request over TLS to the agent listener and reads the
/// raw answer until the connection closes.
async fn raw_h1(sk: &Sidekey, path: &str, token: &str) -> String {
    let ca = std::fs::read(sk.path().join("certs/server.crt")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(sk.agent_addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: localhost\r\nx-sidekey-session: {token}\r\nconnection: close\r\n\r\n"
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn header_lines<'a>(raw: &'a str, name: &str) -> Vec<&'a str> {
    let head = raw.split("\r\n\r\n").next().unwrap_or("");
    head.lines()
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        })
        .collect()
}

#[tokio::test]
async fn answers_carry_one_content_length_and_conflicting_ones_are_refused() {
    let (url, _seen) = hostile_upstream().await;
    let (sk, a, b) = start(&url).await;
    // `5, 5` and `5` again: one length, sent once.
    let raw = raw_h1(&sk, "/v1/proxy/up/framing/cl-list", &a).await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let lengths = header_lines(&raw, "content-length");
    assert_eq!(lengths.len(), 1, "{raw}");
    assert_eq!(lengths[0].split_once(':').unwrap().1.trim(), "5", "{raw}");
    assert!(raw.ends_with("\r\n\r\nhello"), "{raw}");
    let r = sk
        .proxy(Method::GET, "/v1/proxy/up/framing/cl-list", &a, "")
        .await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "hello"));
    let lengths: Vec<_> = r.headers.get_all("content-length").iter().collect();
    assert_eq!(lengths, ["5"]);

    // 5 and 50: where the answer ends is unknown; sidekey's 502, and the
    // next user is unaffected.
    for round in 0..3 {
        let r = sk
            .proxy(Method::GET, "/v1/proxy/up/framing/two-lengths", &a, "")
            .await;
        r.assert_error(502, "upstream_unreachable");
        b_gets_its_own(&sk, &b, round, "conflicting lengths").await;
    }
}

#[tokio::test]
async fn upstream_headers_that_speak_for_sidekey_or_its_origin_are_dropped() {
    let (url, _seen) = hostile_upstream().await;
    let (sk, a, _b) = start(&url).await;
    let gone = [
        "x-sidekey-error",
        "x-sidekey-session",
        "set-cookie",
        "strict-transport-security",
        "connection",
        "x-hop",
        "keep-alive",
        "proxy-authenticate",
    ];
    // On the wire, over HTTP/1.1 (sidekey's own `Connection: close` is
    // the one `Connection` header allowed).
    let raw = raw_h1(&sk, "/v1/proxy/up/headers", &a).await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    for name in gone {
        let lines = header_lines(&raw, name);
        if name == "connection" {
            assert!(
                lines
                    .iter()
                    .all(|l| l.to_ascii_lowercase().ends_with("close")),
                "{raw}"
            );
        } else {
            assert!(lines.is_empty(), "{name} reached the agent: {raw}");
        }
    }
    assert_eq!(header_lines(&raw, "x-custom"), ["x-custom: kept"]);
    assert_eq!(header_lines(&raw, "content-length").len(), 1, "{raw}");
    assert!(raw.ends_with("\r\n\r\n{\"ok\":true}"), "{raw}");

    // Through a client on either protocol.
    for h2 in [false, true] {
        let client = agent_client(&sk, h2);
        let r = support::send(
            &client,
            Method::GET,
            &sk.agent_url("/v1/proxy/up/headers"),
            &[("x-sidekey-session", &a)],
            "",
        )
        .await;
        assert_eq!(r.status, 200, "h2 {h2}: {}", r.text());
        assert_eq!(r.json(), json!({"ok": true}));
        for name in gone {
            if name != "connection" {
                assert!(r.headers.get(name).is_none(), "h2 {h2}: {name} passed");
            }
        }
        assert_eq!(r.headers["x-custom"], "kept");
        let lengths: Vec<_> = r.headers.get_all("content-length").iter().collect();
        assert_eq!(lengths, ["11"], "h2 {h2}");
    }
}

/// A client trusting sidekey's certificate that speaks HTTP/1.1 only, or
/// HTTP/2 only.
fn agent_client(sk: &Sidekey, h2: bool) -> support::TestClient {
    let ca = std::fs::read(sk.path().join("certs/server.crt")).unwrap();
    if h2 {
        return support::client_trusting(&ca, true);
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https)
}

/// What an agent's client got: the status and the whole body, or why the
/// answer broke off.
async fn outcome(
    client: &support::TestClient,
    url: &str,
    token: &str,
) -> Result<(u16, Bytes), String> {
    let req = Request::get(url)
        .header("x-sidekey-session", token)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("no answer in time")
        .map_err(|e| format!("head: {e:?}"))?;
    let status = resp.status().as_u16();
    let body = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
        .await
        .expect("the body neither ended nor broke off");
    let body = body.map_err(|e| format!("body after {status}: {e:?}"))?;
    Ok((status, body.to_bytes()))
}

#[tokio::test]
async fn a_broken_off_answer_breaks_the_agents_response_on_every_path() {
    let (url, _seen) = hostile_upstream().await;
    // `slack` reads `ok: false` answers before passing them on (to
    // refresh on an auth error); `up` streams them.
    let slack = format!("\n[providers.slack]\npreset = \"slack\"\nbase_url = \"{url}\"\n");
    let (sk, a, _b) = start_with(&url, &slack, "upstream_timeout_secs = 2").await;
    for h2 in [false, true] {
        let client = agent_client(&sk, h2);
        for provider in ["slack", "up"] {
            for case in ["chunked", "length", "stall"] {
                let what = format!("{provider}, {case}, h2 {h2}");
                let got = outcome(
                    &client,
                    &sk.agent_url(&format!("/v1/proxy/{provider}/truncated/{case}")),
                    &a,
                )
                .await;
                // Broken off: before the head (the head and what there was
                // of the body were still buffered) or after it; never a
                // complete answer.
                assert!(
                    got.is_err(),
                    "{what}: a broken-off answer arrived complete: {:?}",
                    got.map(|(s, b)| (s, String::from_utf8_lossy(&b).into_owned()))
                );
            }
        }
    }
    // A whole answer on the same paths still arrives whole.
    let client = agent_client(&sk, false);
    for provider in ["slack", "up"] {
        let (status, body) = outcome(
            &client,
            &sk.agent_url(&format!("/v1/proxy/{provider}/fine")),
            &a,
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["token"], TOKEN_A, "{provider}");
    }
}
