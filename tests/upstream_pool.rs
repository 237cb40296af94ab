//! The agent workers' upstream connection pool (`client::pool`): pooled
//! HTTP/1.1 connections are reused, connections the upstream closed are
//! replaced without the caller seeing an error, HTTPS upstreams get h2 or
//! HTTP/1.1 by ALPN with the configured private CA, and HTTP/1 requests
//! carry the upstream's `Host`.

use sidekey_testkit as support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, Version};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use support::{Options, Sidekey, provider_toml};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// A raw HTTP/1.1 upstream: answers every request on a connection with
/// `200 ok` (keep-alive), and after `answers_per_conn` answers closes the
/// connection `close_after` later. Counts accepted connections.
async fn raw_upstream(
    answers_per_conn: usize,
    close_after: Duration,
) -> (String, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let a = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            a.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve_raw(s, answers_per_conn, close_after));
        }
    });
    (url, accepted)
}

async fn serve_raw(mut s: TcpStream, answers: usize, close_after: Duration) {
    let mut buf = Vec::new();
    let mut answered = 0;
    while answered < answers {
        if support::read_request(&mut s, &mut buf).await.is_none() {
            return;
        }
        if s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}")
            .await
            .is_err()
        {
            return;
        }
        answered += 1;
    }
    tokio::time::sleep(close_after).await;
    drop(s);
}

async fn start(base_url: &str, extra_server: &str) -> (Sidekey, String) {
    // One worker: every request goes through the same thread's pool.
    let opts = Options::with_providers(&provider_toml("up", base_url, ""))
        .env("SIDEKEY_AGENT_THREADS", "1")
        .server(extra_server);
    let sk = Sidekey::start(opts).await;
    sk.put_credential("u1", "up", json!({"access_token": "tok-pool-u1"}))
        .await;
    let tok = sk.token("u1", &["up"]).await;
    (sk, tok)
}

#[tokio::test]
async fn keep_alive_upstream_connections_are_reused() {
    let (url, accepted) = raw_upstream(usize::MAX, Duration::ZERO).await;
    let (sk, tok) = start(&url, "").await;
    for i in 0..30 {
        let r = sk
            .proxy(Method::GET, &format!("/v1/proxy/up/items/{i}"), &tok, "")
            .await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.text(), "{\"ok\":true}");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "30 sequential requests from one worker share one upstream connection"
    );
}

#[tokio::test]
async fn connections_the_upstream_closed_are_replaced_without_an_error() {
    // Every connection answers once and is closed 20 ms later: each
    // request after the first finds its pooled connection gone.
    let (url, accepted) = raw_upstream(1, Duration::from_millis(20)).await;
    let (sk, tok) = start(&url, "").await;
    for i in 0..10 {
        let r = sk
            .proxy(Method::GET, &format!("/v1/proxy/up/items/{i}"), &tok, "")
            .await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 10);

    // Closed without waiting: the next request races the close. Whether
    // the pool sees it first or hyper hands the unsent request back, the
    // caller gets the answer.
    let (url, _) = raw_upstream(1, Duration::ZERO).await;
    let (sk, tok) = start(&url, "").await;
    for i in 0..20 {
        let r = sk
            .proxy(Method::GET, &format!("/v1/proxy/up/items/{i}"), &tok, "")
            .await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

/// A raw HTTP/1.1 upstream that answers in the framing the path names,
/// writing its answers in pieces with pauses between them (so sidekey has
/// to read a body across several reads). Records each request's head and
/// body; counts accepted connections.
async fn framing_upstream() -> (String, Arc<AtomicUsize>, Arc<std::sync::Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (a, sn) = (accepted.clone(), seen.clone());
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            a.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve_framings(s, sn.clone()));
        }
    });
    (url, accepted, seen)
}

async fn serve_framings(mut s: TcpStream, seen: Arc<std::sync::Mutex<Vec<String>>>) {
    let mut buf = Vec::new();
    let pause = || tokio::time::sleep(Duration::from_millis(15));
    loop {
        let Some((head, body)) = support::read_request(&mut s, &mut buf).await else {
            return;
        };
        let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
        seen.lock()
            .unwrap()
            .push(format!("{head}{}", String::from_utf8_lossy(&body)));
        let mut pieces: Vec<Vec<u8>> = Vec::new();
        let mut close = false;
        match path.as_str() {
            "/chunked" => {
                pieces.push(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel".to_vec());
                pieces.push(b"lo\r\n7;ext=1\r\n, world\r\n".to_vec());
                pieces.push(b"0\r\nx-trailer: dropped\r\n\r\n".to_vec());
            }
            "/chunked-and-length" => {
                // Both framings: Transfer-Encoding wins (RFC 9112 §6.3).
                pieces.push(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec());
            }
            "/split" => {
                let body = vec![b'a'; 40_000];
                let mut first = b"HTTP/1.1 200 OK\r\ncontent-length: 40000\r\n\r\n".to_vec();
                first.extend_from_slice(&body[..1000]);
                pieces.push(first);
                pieces.push(body[1000..30_000].to_vec());
                pieces.push(body[30_000..].to_vec());
            }
            "/until-close" => {
                pieces.push(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil ".to_vec());
                pieces.push(b"close".to_vec());
                close = true;
            }
            "/no-content" => {
                pieces
                    .push(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n".to_vec());
            }
            _ => {
                // Echo the request body back.
                let mut a = format!(
                    "HTTP/1.1 201 Created\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                a.extend_from_slice(&body);
                pieces.push(a);
            }
        }
        for (i, p) in pieces.iter().enumerate() {
            if i > 0 {
                pause().await;
            }
            if s.write_all(p).await.is_err() {
                return;
            }
        }
        if close {
            return;
        }
    }
}

#[tokio::test]
async fn every_answer_framing_arrives_whole_and_keeps_the_connection_when_it_can() {
    let (url, accepted, seen) = framing_upstream().await;
    let (sk, tok) = start(&url, "").await;

    let conns = || accepted.load(Ordering::SeqCst);
    let chunked = || async {
        let r = sk
            .proxy(Method::GET, "/v1/proxy/up/chunked", &tok, "")
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "hello, world");
        assert!(r.headers.get("x-trailer").is_none());
    };
    for round in 0..2 {
        chunked().await;
        let r = sk.proxy(Method::GET, "/v1/proxy/up/split", &tok, "").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), 40_000, "round {round}");
        assert!(r.body.iter().all(|&b| b == b'a'));
    }
    // Chunked and length-delimited answers to requests without a body
    // left the connection reusable: four requests, one connection.
    assert_eq!(conns(), 1);

    // Answers after which the upstream's idea of where the next answer
    // starts cannot be trusted arrive whole, and end their connection.
    let r = sk
        .proxy(Method::GET, "/v1/proxy/up/chunked-and-length", &tok, "")
        .await;
    assert_eq!(r.text(), "hello");
    assert_ne!(
        r.headers.get("content-length").map(|v| v.as_bytes()),
        Some(&b"3"[..]),
        "the upstream's Content-Length must not frame a chunked answer"
    );
    chunked().await;
    assert_eq!(conns(), 2, "both framings: not reused");

    let r = sk
        .proxy(Method::POST, "/v1/proxy/up/echo", &tok, "{\"n\":1}")
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(r.text(), "{\"n\":1}");
    chunked().await;
    assert_eq!(conns(), 3, "a request body: not reused");

    let r = sk
        .proxy(Method::POST, "/v1/proxy/up/no-content", &tok, "")
        .await;
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    chunked().await;
    assert_eq!(conns(), 4, "an interim answer and a 204: not reused");

    // An answer that ends with the connection is read to the close, and
    // the next request opens a new connection.
    let r = sk
        .proxy(Method::GET, "/v1/proxy/up/until-close", &tok, "")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "until close");
    chunked().await;
    assert_eq!(conns(), 5);

    // What went upstream: origin-form, the upstream's Host, the injected
    // token, and a Content-Length for bodies (also an empty POST's).
    let seen = seen.lock().unwrap();
    let echo = seen.iter().find(|h| h.starts_with("POST /echo ")).unwrap();
    assert!(
        echo.contains(&format!("host: {}\r\n", url.trim_start_matches("http://"))),
        "{echo}"
    );
    assert!(
        echo.contains("authorization: Bearer tok-pool-u1\r\n"),
        "{echo}"
    );
    assert!(echo.contains("content-length: 7\r\n"), "{echo}");
    assert!(echo.ends_with("\r\n\r\n{\"n\":1}"), "{echo}");
    let empty = seen
        .iter()
        .find(|h| h.starts_with("POST /no-content "))
        .unwrap();
    assert!(empty.contains("content-length: 0\r\n"), "{empty}");
    let get = seen
        .iter()
        .find(|h| h.starts_with("GET /chunked "))
        .unwrap();
    assert!(!get.contains("content-length"), "{get}");
}

/// A raw upstream whose first connection answers one request, then reads
/// the next and closes without answering (an upstream that dies mid-way);
/// later connections answer everything. Records the request lines.
async fn dying_upstream() -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sn = seen.clone();
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let answers = if first { 1 } else { usize::MAX };
            first = false;
            let sn = sn.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut answered = 0;
                loop {
                    let Some((head, _)) = support::read_request(&mut s, &mut buf).await else {
                        return;
                    };
                    sn.lock()
                        .unwrap()
                        .push(head.lines().next().unwrap_or("").to_owned());
                    if answered == answers {
                        return; // read, never answered, closed
                    }
                    answered += 1;
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";
                    if s.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, seen)
}

/// sidekey in front of a [`dying_upstream`], after one answered GET: its
/// pooled connection is the one that dies on the next request.
async fn pooled_on_dying_upstream() -> (Sidekey, String, Arc<std::sync::Mutex<Vec<String>>>) {
    let (url, seen) = dying_upstream().await;
    let (sk, tok) = start(&url, "").await;
    assert_eq!(
        sk.proxy(Method::GET, "/v1/proxy/up/a", &tok, "")
            .await
            .status,
        200
    );
    (sk, tok, seen)
}

#[tokio::test]
async fn an_unanswered_request_on_a_reused_connection_is_replayed_only_if_idempotent() {
    // GET: the pooled connection dies with the request unanswered; the
    // request goes once more on a new connection and the caller sees 200.
    let (sk, tok, seen) = pooled_on_dying_upstream().await;
    let r = sk.proxy(Method::GET, "/v1/proxy/up/b", &tok, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        *seen.lock().unwrap(),
        ["GET /a HTTP/1.1", "GET /b HTTP/1.1", "GET /b HTTP/1.1"]
    );

    // POST: it may have been acted on; never sent twice. The caller gets
    // the contract's 502 and the upstream saw it once.
    let (sk, tok, seen) = pooled_on_dying_upstream().await;
    let r = sk.proxy(Method::POST, "/v1/proxy/up/pay", &tok, "{}").await;
    r.assert_error(502, "upstream_unreachable");
    assert_eq!(
        *seen.lock().unwrap(),
        ["GET /a HTTP/1.1", "POST /pay HTTP/1.1"]
    );
    // The next request opens a new connection and works.
    assert_eq!(
        sk.proxy(Method::GET, "/v1/proxy/up/c", &tok, "")
            .await
            .status,
        200
    );
}

/// An HTTPS upstream on a certificate from a private CA, offering `alpn`;
/// records the HTTP version and `Host` (or `:authority`) of each request.
async fn tls_upstream(
    dir: &std::path::Path,
    alpn: &[&[u8]],
) -> (
    String,
    std::path::PathBuf,
    Arc<std::sync::Mutex<Vec<(Version, String)>>>,
) {
    let pki = support::private_pki(&["localhost"]);
    let ca_file = dir.join("upstream-ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let acceptor =
        tokio_rustls::TlsAcceptor::from(support::tls_server_config(pki.leaf, &pki.leaf_key, alpn));

    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            let (acceptor, seen) = (acceptor.clone(), s2.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let host = req
                        .headers()
                        .get(http::header::HOST)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                        .or_else(|| req.uri().authority().map(|a| a.to_string()))
                        .unwrap_or_default();
                    seen.lock().unwrap().push((req.version(), host));
                    async move {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(b"{\"ok\":true}"),
                        )))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (format!("https://localhost:{port}"), ca_file, seen)
}

#[tokio::test]
async fn https_upstreams_get_h2_or_http1_by_alpn_with_the_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    for (alpn, want) in [
        (&[&b"h2"[..], &b"http/1.1"[..]][..], Version::HTTP_2),
        (&[&b"http/1.1"[..]][..], Version::HTTP_11),
    ] {
        let (url, ca_file, seen) = tls_upstream(dir.path(), alpn).await;
        let port = url.rsplit(':').next().unwrap().to_owned();
        let (sk, tok) = start(
            &url,
            &format!("upstream_ca_file = \"{}\"", ca_file.display()),
        )
        .await;
        for i in 0..5 {
            let r = sk
                .proxy(Method::GET, &format!("/v1/proxy/up/items/{i}"), &tok, "")
                .await;
            assert_eq!(r.status, 200, "{want:?} request {i}: {}", r.text());
        }
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 5);
        for (v, host) in seen {
            assert_eq!(v, want);
            assert_eq!(host, format!("localhost:{port}"), "{want:?}");
        }
    }
}

/// An upstream that refuses every request as soon as its head is in
/// (`100 Continue`, then `413`), never reads a body and keeps the
/// connection open; its sockets take little before the sender must wait.
/// Counts accepted connections.
async fn refusing_upstream() -> (String, Arc<AtomicUsize>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = socket.listen(64).unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let a = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            a.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\ncontent-length: 16\r\n\r\n{\"too_big\":true}";
                if s.write_all(answer).await.is_ok() {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            });
        }
    });
    (url, accepted)
}

#[tokio::test]
async fn an_answer_that_comes_before_the_body_is_read_reaches_the_agent() {
    let (url, accepted) = refusing_upstream().await;
    let (sk, tok) = start(
        &url,
        "upstream_timeout_secs = 10\nmax_body_bytes = 33554432",
    )
    .await;
    // More than the kernel buffers on loopback hold (send buffers grow to
    // 4 MiB), so the write has to wait on the upstream.
    let body = "a".repeat(24 << 20);
    let t = std::time::Instant::now();
    let r = sk
        .proxy(Method::POST, "/v1/proxy/up/upload", &tok, body.clone())
        .await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json(), json!({"too_big": true}));
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "the answer waited for the body: {:?}",
        t.elapsed()
    );
    // That connection is not reused (its request was never finished): the
    // next request goes on a new one, and is answered too.
    let r = sk
        .proxy(Method::POST, "/v1/proxy/up/upload", &tok, "{}")
        .await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}
