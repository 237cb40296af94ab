//! The pooled upstream client (providers, token endpoints, ElevenLabs API),
//! and a body wrapper that enforces an idle timeout while streaming.
//!
//! Agent workers send proxied requests through their own pool
//! ([`pool`]); everything else (token endpoints, the ElevenLabs API, the
//! main runtime) uses the shared hyper-util client built here.

pub mod pool;

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
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .http1_max_buf_size(256 * 1024)
        .http2_adaptive_window(true)
        .build(connector(connect_timeout, extra_roots))
}

/// The connector both clients use: TCP with the connect timeout, keepalive
/// and nodelay, then rustls (webpki roots plus `extra_roots`) offering h2
/// and HTTP/1.1 by ALPN.
pub fn connector(
    connect_timeout: Duration,
    extra_roots: Vec<CertificateDer<'static>>,
) -> HttpsConnector<HttpConnector> {
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
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http)
}

/// Gives the current thread (an agent worker) its own connection pool: its
/// connection tasks run on that thread's runtime, so a proxied request
/// never wakes another thread.
pub fn set_thread_client(cfg: &crate::config::ServerConfig) {
    let roots = match &cfg.upstream_ca_file {
        Some(p) => crate::bootstrap::load_roots(p).unwrap_or_default(),
        None => Vec::new(),
    };
    pool::install(connector(
        Duration::from_secs(cfg.connect_timeout_secs),
        roots,
    ));
}

/// Why a proxied request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Pool(#[from] pool::SendError),
    #[error(transparent)]
    Shared(#[from] hyper_util::client::legacy::Error),
}

/// Sends on this thread's pool if it has one, else on the shared client.
pub async fn request(
    shared: &HttpClient,
    req: http::Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, RequestError> {
    if pool::installed() {
        Ok(pool::send(req).await?)
    } else {
        Ok(shared.request(req).await?)
    }
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
