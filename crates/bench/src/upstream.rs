//! The upstream and its token endpoint, in this process: a minimal hyper
//! server, so what is measured is the gateway, not the backend.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;

pub(crate) struct Upstream {
    pub(crate) body: Bytes,
    pub(crate) token_calls: AtomicU64,
    /// JWT bearer grant exchanges (`/jwt-token`).
    pub(crate) jwt_calls: AtomicU64,
    pub(crate) token_delay_ms: AtomicU64,
    /// Requests that carried a token the fake token endpoint issued.
    pub(crate) new_token_seen: AtomicU64,
    pub(crate) unauthenticated: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) h2_requests: AtomicU64,
}

async fn upstream_handle(st: Arc<Upstream>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() == "/jwt-token" {
        // The JWT bearer grant (RFC 7523 §2.1): the assertion's signature
        // and claims are verified by tests/jwt_bearer.rs; here only the
        // form's shape is checked, so a wrong grant shows up as errors.
        let n = st.jwt_calls.fetch_add(1, Ordering::SeqCst) + 1;
        let form = req.into_body().collect().await.map(|b| b.to_bytes());
        let ok = form.as_ref().is_ok_and(|b| {
            contains(b, b"grant_type=") && contains(b, b"jwt-bearer") && contains(b, b"assertion=")
        });
        let (status, body) = if ok {
            (
                StatusCode::OK,
                json!({"access_token": format!("jwt-at-{n}"), "token_type": "Bearer", "expires_in": 3600}),
            )
        } else {
            (StatusCode::BAD_REQUEST, json!({"error": "invalid_request"}))
        };
        return Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("static response");
    }
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

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

pub(crate) async fn serve_upstream(
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
