//! The agent workers' upstream connection pool (`client::pool`): pooled
//! HTTP/1.1 connections are reused, connections the upstream closed are
//! replaced without the caller seeing an error, HTTPS upstreams get h2 or
//! HTTP/1.1 by ALPN with the configured private CA, and HTTP/1 requests
//! carry the upstream's `Host`.

mod support;

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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    let mut chunk = [0u8; 4096];
    while answered < answers {
        // One request head per answer (the proxied GETs have no body).
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        buf.drain(..end);
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
