//! Connection-level behaviour of the listeners: idle HTTP/2 connections,
//! per-IP pending connections, the metrics listener's own budget, early
//! 413 answers clients can read, ALPN fallback, wrong-listener mistakes and
//! a prompt shutdown (issues 12 and 13).

use sidekey_testkit as support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use support::upstream::Upstream;
use support::{InProcess, Options, Sidekey, provider_toml};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

fn tls_config(ca_pem: &[u8], alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg
}

fn ca(dir: &std::path::Path) -> Vec<u8> {
    std::fs::read(dir.join("certs/server.crt")).unwrap()
}

async fn tls_connect(
    addr: SocketAddr,
    ca_pem: &[u8],
    alpn: &[&[u8]],
) -> Result<Tls, std::io::Error> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(ca_pem, alpn)));
    let tcp = TcpStream::connect(addr).await?;
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// Reads until the peer closes (or errors); how long that took, or `None`
/// if it stayed open for `within`.
async fn closed_within<R: tokio::io::AsyncRead + Unpin>(r: &mut R, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// The response head and body of a raw HTTP/1.1 exchange.
fn parse_raw(buf: &[u8]) -> (u16, String, Value) {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(buf)));
    let head = String::from_utf8_lossy(&buf[..split]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    let body = &buf[split + 4..];
    let v = serde_json::from_slice(body).unwrap_or_else(|_| {
        panic!(
            "body is not JSON: {:?} (head {head})",
            String::from_utf8_lossy(body)
        )
    });
    (status, head, v)
}

async fn ready_with_bearer(opts: Options) -> (InProcess, Upstream, String) {
    let up = Upstream::start().await;
    let opts = Options {
        extra_toml: provider_toml("bearer", &up.url, ""),
        ..opts
    };
    let sk = InProcess::start(opts).await;
    sk.put_credential(
        "alice",
        "bearer",
        json!({"access_token": "tok-transport-alice"}),
    )
    .await;
    let tok = sk.token("alice", &["bearer"]).await;
    (sk, up, tok)
}

// ---------------------------------------------------------------------------
// idle HTTP/2, pending connections per IP, metrics budget

#[tokio::test]
async fn an_http2_connection_without_streams_gets_goaway_after_the_idle_timeout() {
    let (sk, _up, tok) =
        ready_with_bearer(Options::default().server("header_read_timeout_secs = 1")).await;
    let ca = ca(sk.dir.path());
    // hyper's client answers PINGs, as the clients in the report did.
    let tls = tls_connect(sk.agent_addr, &ca, &[b"h2"]).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    // One request first: activity keeps it open, idleness afterwards closes.
    let req = Request::get(sk.agent_url("/v1/proxy/bearer/x"))
        .header("x-sidekey-session", &tok)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let _ = resp.into_body().collect().await;
    let t = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(
        ended.is_ok(),
        "an HTTP/2 connection with no open stream stayed open past the idle timeout"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(700),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn a_stream_reset_mid_request_does_not_keep_the_connection_busy() {
    let up = Upstream::slow(Duration::from_secs(20), 200, json!({"late": true})).await;
    let sk = InProcess::start(
        Options::with_providers(&provider_toml("slow", &up.url, ""))
            .server("header_read_timeout_secs = 1\nupstream_timeout_secs = 30"),
    )
    .await;
    sk.put_credential("di", "slow", json!({"access_token": "tok-slow-di"}))
        .await;
    let tok = sk.token("di", &["slow"]).await;
    let tls = tls_connect(sk.agent_addr, &ca(sk.dir.path()), &[b"h2"])
        .await
        .unwrap();
    let (client, conn) = h2::client::handshake(tls).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = Request::get(sk.agent_url("/v1/proxy/slow/x"))
        .header("x-sidekey-session", &tok)
        .body(())
        .unwrap();
    let (resp, mut stream) = client.send_request(req, true).unwrap();
    // Wait until the request is upstream, then cancel it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.count() == 0 {
        assert!(
            Instant::now() < deadline,
            "the request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stream.send_reset(h2::Reason::CANCEL);
    drop(resp);
    // The cancelled request must not count as in flight for ever: the idle
    // connection is closed after the idle timeout, long before the upstream
    // would have answered.
    let ended = tokio::time::timeout(Duration::from_secs(6), conn).await;
    assert!(ended.is_ok(), "a reset stream kept the connection open");
}

#[tokio::test]
async fn a_request_in_flight_longer_than_the_idle_timeout_is_not_cut() {
    let up = Upstream::slow(Duration::from_millis(2500), 200, json!({"slow": true})).await;
    let sk = InProcess::start(
        Options::with_providers(&provider_toml("slow", &up.url, ""))
            .server("header_read_timeout_secs = 1"),
    )
    .await;
    sk.put_credential("bo", "slow", json!({"access_token": "tok-slow-bo"}))
        .await;
    let tok = sk.token("bo", &["slow"]).await;
    let h2 = support::client_trusting(&ca(sk.dir.path()), true);
    let r = support::send(
        &h2,
        Method::GET,
        &sk.agent_url("/v1/proxy/slow/x"),
        &[("x-sidekey-session", &tok)],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.version, http::Version::HTTP_2);
}

#[tokio::test]
async fn pending_connections_are_limited_per_ip_but_an_authenticated_ip_is_not() {
    let (sk, _up, tok) = ready_with_bearer(
        Options::default().server("max_pending_per_ip = 2\nheader_read_timeout_secs = 30"),
    )
    .await;
    // Two connections that send nothing are accepted and kept...
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(TcpStream::connect(sk.agent_addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for s in &mut idle {
        assert!(!closed_within(s, Duration::from_millis(300)).await);
    }
    // ... a third from the same address is closed at once.
    let mut third = TcpStream::connect(sk.agent_addr).await.unwrap();
    assert!(
        closed_within(&mut third, Duration::from_secs(2)).await,
        "a third pending connection from one address was kept"
    );
    let m = sk.admin(Method::GET, "/metrics", None).await;
    assert!(
        m.text()
            .contains("sidekey_connections_refused_total{reason=\"pending_per_ip\"}"),
        "{}",
        m.text()
    );

    // One pending connection goes away; an authenticated call gets in and
    // proves the address.
    drop(idle.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = sk.proxy(Method::GET, "/v1/proxy/bearer/x", &tok, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    // From then on the address is not limited: more idle connections, and
    // a fresh client (new connections) still works.
    for _ in 0..4 {
        idle.push(TcpStream::connect(sk.agent_addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for s in &mut idle {
        assert!(
            !closed_within(s, Duration::from_millis(200)).await,
            "a connection from a proven address was closed"
        );
    }
    let fresh = support::client_trusting(&ca(sk.dir.path()), false);
    let r = support::send(
        &fresh,
        Method::GET,
        &sk.agent_url("/v1/proxy/bearer/y"),
        &[("x-sidekey-session", &tok)],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn the_metrics_listener_has_its_own_connection_budget() {
    let sk = Sidekey::start(
        Options::default()
            .admin("metrics_listen = \"127.0.0.1:0\"")
            .server("header_read_timeout_secs = 30"),
    )
    .await;
    let ready: Value = sk
        .logs
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == "sidekey ready")
        .expect("ready line");
    let metrics = ready["metrics"].as_str().unwrap().to_owned();
    // Every admin connection slot taken by connections that send nothing.
    let mut hold = Vec::new();
    for _ in 0..256 {
        hold.push(TcpStream::connect(sk.admin_addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = support::plain_client();
    let r = tokio::time::timeout(
        Duration::from_secs(3),
        client.request(
            Request::get(&metrics)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ),
    )
    .await;
    let r = r
        .expect("the metrics listener waited for an admin connection slot")
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    drop(hold);
    // And the reverse: a full metrics listener leaves the admin API alone.
    let addr: SocketAddr = metrics
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .parse()
        .unwrap();
    let mut hold = Vec::new();
    for _ in 0..64 {
        hold.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = tokio::time::timeout(
        Duration::from_secs(3),
        sk.admin(Method::GET, "/v1/audit", None),
    )
    .await
    .expect("the admin API waited for a metrics connection slot");
    assert_eq!(r.status, 200);
}

// ---------------------------------------------------------------------------
// early answers clients can read

const LIMIT: usize = 1024;
const UPLOAD: usize = 4 * 1024 * 1024;

#[tokio::test]
async fn an_oversized_http1_upload_written_in_full_reads_the_413() {
    let (sk, up, tok) =
        ready_with_bearer(Options::default().server(&format!("max_body_bytes = {LIMIT}"))).await;
    let ca = ca(sk.dir.path());
    // As Python's http.client does: the whole body is written, then the
    // answer read. Before, sidekey closed under the writer: a broken pipe.
    let mut tls = tls_connect(sk.agent_addr, &ca, &[b"http/1.1"])
        .await
        .unwrap();
    let head = format!(
        "POST /v1/proxy/bearer/upload HTTP/1.1\r\nHost: localhost\r\nX-Sidekey-Session: {tok}\r\nContent-Type: application/octet-stream\r\nContent-Length: {UPLOAD}\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let body = vec![b'z'; UPLOAD];
    tokio::time::timeout(Duration::from_secs(20), tls.write_all(&body))
        .await
        .expect("writing the body stalled")
        .expect("the body could not be written (connection closed under the client)");
    tls.flush().await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tls.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                        if let Some(len) = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                        {
                            if buf.len() >= i + 4 + len {
                                break;
                            }
                        }
                    }
                }
            }
        }
    })
    .await;
    let (status, head, v) = parse_raw(&buf);
    assert_eq!(status, 413, "{head}");
    assert_eq!(v["error"]["code"], "body_too_large");
    assert!(head.contains("x-sidekey-error: body_too_large"), "{head}");
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn an_oversized_http2_upload_reads_the_413_without_a_cancelled_stream() {
    let (sk, up, tok) =
        ready_with_bearer(Options::default().server(&format!("max_body_bytes = {LIMIT}"))).await;
    let ca = ca(sk.dir.path());
    let tls = tls_connect(sk.agent_addr, &ca, &[b"h2"]).await.unwrap();
    let (client, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    // Declared, then sent in full as httpx does. A stream reset with
    // CANCEL before the answer is what made curl exit 92 and httpx hang;
    // RST_STREAM(NO_ERROR) after a complete answer is allowed (RFC 9113 §8.1).
    let req = Request::post(sk.agent_url("/v1/proxy/bearer/upload"))
        .header("x-sidekey-session", &tok)
        .header("content-length", UPLOAD.to_string())
        .body(())
        .unwrap();
    let (resp, mut stream) = client.send_request(req, false).unwrap();
    let sender = tokio::spawn(async move {
        let mut left = UPLOAD;
        while left > 0 {
            stream.reserve_capacity(left.min(65_536));
            match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                None => return Err("stream closed".to_string()),
                Some(Err(e)) => return Err(format!("{:?}", e.reason())),
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(left);
                    left -= n;
                    stream
                        .send_data(Bytes::from(vec![b'q'; n]), left == 0)
                        .map_err(|e| format!("{:?}", e.reason()))?;
                }
            }
        }
        Ok(())
    });
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("no answer to the oversized upload")
        .unwrap_or_else(|e| panic!("the stream was reset before the answer: {e:?}"));
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(resp.headers()["x-sidekey-error"], "body_too_large");
    let mut body = resp.into_body();
    let mut b = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), body.data())
        .await
        .expect("the 413 body never completed")
    {
        let chunk = chunk.expect("the 413 body was cut");
        let _ = body.flow_control().release_capacity(chunk.len());
        b.extend_from_slice(&chunk);
    }
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["error"]["code"], "body_too_large");
    let sent = tokio::time::timeout(Duration::from_secs(10), sender)
        .await
        .expect("the upload stalled")
        .unwrap();
    match sent {
        Ok(()) => {}
        Err(reason) => assert!(
            reason.contains("NO_ERROR"),
            "the upload stream was reset with {reason}"
        ),
    }
    assert_eq!(up.count(), 0);
}

// ---------------------------------------------------------------------------
// ALPN

#[tokio::test]
async fn a_client_offering_only_http10_or_an_unknown_protocol_gets_http11() {
    let sk = InProcess::start(Options::default()).await;
    let ca = ca(sk.dir.path());
    for alpn in [
        &[b"http/1.0".as_slice()][..],
        &[b"spdy/3"],
        &[b"foo", b"http/1.0"],
    ] {
        let mut tls = tls_connect(sk.agent_addr, &ca, alpn)
            .await
            .unwrap_or_else(|e| panic!("ALPN {alpn:?}: handshake refused: {e}"));
        assert_eq!(tls.get_ref().1.alpn_protocol(), None);
        tls.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf)).await;
        let (status, head, v) = parse_raw(&buf);
        assert_eq!(status, 200, "{head}");
        assert_eq!(v["status"], "ok");
    }
    // h2 and http/1.1 are still negotiated as before.
    let tls = tls_connect(sk.agent_addr, &ca, &[b"h2", b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
}

// ---------------------------------------------------------------------------
// wrong-listener mistakes

#[tokio::test]
async fn plain_http_on_the_tls_port_gets_a_plain_400_saying_https() {
    let sk = InProcess::start(Options::default()).await;
    let mut s = TcpStream::connect(sk.agent_addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let (status, head, v) = parse_raw(&buf);
    assert_eq!(status, 400, "{head}");
    assert!(head.contains("x-sidekey-error: bad_request"), "{head}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("HTTPS") && msg.contains("https://"), "{msg}");
}

#[tokio::test]
async fn tls_on_the_admin_port_is_logged() {
    let sk = Sidekey::start(Options::default()).await;
    let ca = ca(sk.path());
    let r = tls_connect(sk.admin_addr, &ca, &[b"http/1.1"]).await;
    assert!(r.is_err(), "the admin listener speaks plain HTTP");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let logs = sk.log_text();
        if logs.contains("TLS handshake arrived on the admin listener") {
            assert!(logs.contains("plain HTTP"), "{logs}");
            break;
        }
        assert!(Instant::now() < deadline, "no log line:\n{logs}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_admin_route_on_the_agent_port_points_at_the_admin_listener() {
    let sk = InProcess::start(Options::default()).await;
    for (m, p) in [
        (Method::GET, "/v1/users/alice"),
        (Method::POST, "/v1/sessions"),
        (Method::GET, "/v1/audit"),
        (Method::PUT, "/v1/users/alice/credentials/slack"),
    ] {
        let r = sk.agent(m, p, &[], "").await;
        r.assert_error(404, "not_found");
        let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(msg.contains("admin listener"), "{p}: {msg}");
    }
    let r = sk.agent(Method::GET, "/v1/nothing-here", &[], "").await;
    r.assert_error(404, "not_found");
    assert!(
        !r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("admin")
    );
}

// ---------------------------------------------------------------------------
// shutdown

#[tokio::test]
async fn sigterm_exits_promptly_with_an_http2_client_that_never_answers() {
    let mut sk = Sidekey::start(Options::default()).await;
    let ca = ca(sk.path());
    // An HTTP/2 client that sent its preface and settings, then stalled: it
    // never answers the PING that hyper's graceful GOAWAY waits for.
    let mut tls = tls_connect(sk.agent_addr, &ca, &[b"h2"]).await.unwrap();
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    assert_eq!(sk.stop(), Some(0));
    let took = t.elapsed();
    // The grace period is 5 s; it used to be spent in full.
    assert!(took < Duration::from_secs(2), "exit took {took:?}");
    drop(tls);
}

// ---------------------------------------------------------------------------
// The serving model

#[tokio::test]
async fn both_serving_models_proxy_h1_and_h2_and_stop_cleanly() {
    let up = Upstream::start().await;
    // One worker thread per core (the default), and everything on the main
    // runtime (SIDEKEY_AGENT_THREADS=0).
    for threads in [None, Some("0"), Some("3")] {
        let mut opts = Options::with_providers(&provider_toml("bearer", &up.url, ""));
        if let Some(t) = threads {
            opts = opts.env("SIDEKEY_AGENT_THREADS", t);
        }
        let mut sk = Sidekey::start(opts).await;
        sk.put_credential("cy", "bearer", json!({"access_token": "tok-model-cy"}))
            .await;
        let tok = sk.token("cy", &["bearer"]).await;
        let ca = ca(sk.path());
        for h2 in [false, true] {
            let c = support::client_trusting(&ca, h2);
            for i in 0..20 {
                let r = support::send(
                    &c,
                    Method::GET,
                    &sk.agent_url(&format!("/v1/proxy/bearer/m/{i}")),
                    &[("x-sidekey-session", &tok)],
                    "",
                )
                .await;
                assert_eq!(r.status, 200, "{threads:?} h2={h2}: {}", r.text());
            }
        }
        assert_eq!(
            up.last().bearer().as_deref(),
            Some("tok-model-cy"),
            "{threads:?}"
        );
        let t = Instant::now();
        assert_eq!(sk.stop(), Some(0), "{threads:?}");
        assert!(t.elapsed() < Duration::from_secs(2), "{threads:?}");
    }
}

/// A burst of connections lands on whichever agent worker is awake; it
/// passes each one on to the worker with the fewest, so every worker gets
/// its share (shown by `sidekey_agent_worker_connections`), and the counts
/// go back to zero as the connections close.
#[tokio::test]
async fn agent_workers_share_the_connections_evenly() {
    let up = Upstream::start().await;
    let opts = Options::with_providers(&provider_toml("bearer", &up.url, ""))
        .env("SIDEKEY_AGENT_THREADS", "3");
    let mut sk = Sidekey::start(opts).await;
    sk.put_credential("cy", "bearer", json!({"access_token": "tok-share-cy"}))
        .await;
    let tok = sk.token("cy", &["bearer"]).await;
    let ca = ca(sk.path());
    let per_worker = |m: &str| -> Vec<String> {
        let mut v: Vec<String> = m
            .lines()
            .filter(|l| l.starts_with("sidekey_agent_worker_connections{"))
            .map(str::to_owned)
            .collect();
        v.sort();
        v
    };
    // Nine clients, each holding one keep-alive connection open; opened
    // one after the other, so every choice sees the counts before it.
    let clients: Vec<_> = (0..9)
        .map(|_| support::client_trusting(&ca, false))
        .collect();
    for (i, c) in clients.iter().enumerate() {
        let r = support::send(
            c,
            Method::GET,
            &sk.agent_url(&format!("/v1/proxy/bearer/share/{i}")),
            &[("x-sidekey-session", &tok)],
            "",
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let m = sk.admin(Method::GET, "/metrics", None).await.text();
    assert_eq!(
        per_worker(&m),
        [
            r#"sidekey_agent_worker_connections{worker="0"} 3"#,
            r#"sidekey_agent_worker_connections{worker="1"} 3"#,
            r#"sidekey_agent_worker_connections{worker="2"} 3"#,
        ],
        "{m}"
    );
    drop(clients);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = sk.admin(Method::GET, "/metrics", None).await.text();
        let counts = per_worker(&m);
        if counts.iter().all(|l| l.ends_with(" 0")) {
            assert_eq!(counts.len(), 3, "{m}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "connections still counted: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sk.stop(), Some(0));
}

/// An HTTP/1.1 client may shut its sending side once its request is out
/// (a half-close): it still gets the answer. And a client that leaves
/// altogether while the upstream is working does not erase the call: it
/// runs to its end and is in the audit log with the upstream's status.
#[tokio::test]
async fn a_request_outlives_its_client_half_closing_or_leaving() {
    let up = Upstream::slow(Duration::from_millis(400), 200, json!({"done": true})).await;
    let sk = InProcess::start(Options::with_providers(&provider_toml("slow", &up.url, ""))).await;
    sk.put_credential("hc", "slow", json!({"access_token": "tok-slow-hc"}))
        .await;
    let tok = sk.token("hc", &["slow"]).await;
    let ca = ca(sk.dir.path());
    let request = |path: &str| {
        format!(
            "GET /v1/proxy/slow/{path} HTTP/1.1\r\nhost: localhost\r\nx-sidekey-session: {tok}\r\n\r\n"
        )
    };

    let mut tls = tls_connect(sk.agent_addr, &ca, &[b"http/1.1"])
        .await
        .unwrap();
    tls.write_all(request("half").as_bytes()).await.unwrap();
    tls.shutdown().await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf))
        .await
        .expect("no answer after the half-close")
        .ok();
    let (status, _, v) = parse_raw(&buf);
    assert_eq!((status, v), (200, json!({"done": true})));

    let mut tls = tls_connect(sk.agent_addr, &ca, &[b"http/1.1"])
        .await
        .unwrap();
    tls.write_all(request("gone").as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.count() < 2 {
        assert!(
            Instant::now() < deadline,
            "the request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(tls);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = sk.admin(Method::GET, "/v1/audit?user=hc", None).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let records = r.json();
        let gone = records.as_array().unwrap().iter().find(|r| {
            r["kind"] == "proxy" && r["path"].as_str().is_some_and(|p| p.ends_with("/gone"))
        });
        if let Some(rec) = gone {
            assert_eq!(rec["status"], 200, "{rec}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the call whose client left is not audited: {records}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
