//! The pooled upstream client (providers, token endpoints, ElevenLabs API),
//! and a body wrapper that enforces an idle timeout while streaming.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;

use crate::body::BoxError;

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Builds the shared client: HTTP/1.1 and HTTP/2 (by ALPN) over rustls with
/// the webpki roots plus `extra_roots`; plain HTTP is possible only because
/// config validation allows `http://` for loopback or `allow_http` providers.
pub fn build(connect_timeout: Duration, extra_roots: Vec<CertificateDer<'static>>) -> HttpClient {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for c in extra_roots {
        let _ = roots.add(c);
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .http1_max_buf_size(256 * 1024)
        .http2_adaptive_window(true)
        .build(https)
}

thread_local! {
    /// The upstream client of an agent worker thread (`server`): its pool's
    /// connection tasks run on that thread's runtime, so a proxied request
    /// never wakes another thread.
    static THREAD_CLIENT: std::cell::RefCell<Option<HttpClient>> = const { std::cell::RefCell::new(None) };
}

/// Gives the current thread its own client (and connection pool).
pub fn set_thread_client(cfg: &crate::config::ServerConfig) {
    let roots = match &cfg.upstream_ca_file {
        Some(p) => crate::bootstrap::load_roots(p).unwrap_or_default(),
        None => Vec::new(),
    };
    let c = build(Duration::from_secs(cfg.connect_timeout_secs), roots);
    THREAD_CLIENT.with(|t| *t.borrow_mut() = Some(c));
}

/// Sends on this thread's client if it has one, else on the shared one
/// (without cloning either: the future owns what it needs).
pub fn request(
    shared: &HttpClient,
    req: http::Request<Full<Bytes>>,
) -> hyper_util::client::legacy::ResponseFuture {
    THREAD_CLIENT.with(|t| match &*t.borrow() {
        Some(c) => c.request(req),
        None => shared.request(req),
    })
}

pin_project_lite::pin_project! {
    /// Fails the body when no frame arrives within `idle`: a stalled
    /// upstream cannot hold a connection (and a voice turn) forever.
    pub struct IdleTimeoutBody<B> {
        #[pin]
        inner: B,
        #[pin]
        sleep: tokio::time::Sleep,
        idle: Duration,
    }
}

impl<B> IdleTimeoutBody<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        IdleTimeoutBody {
            inner,
            sleep: tokio::time::sleep(idle),
            idle,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("upstream body stalled for longer than the upstream timeout")]
pub struct BodyStalled;

impl<B> HttpBody for IdleTimeoutBody<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(f) => {
                let deadline = tokio::time::Instant::now() + *this.idle;
                this.sleep.reset(deadline);
                Poll::Ready(f.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => match this.sleep.poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyStalled)))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
