//! The pooled upstream client (providers, token endpoints, ElevenLabs API),
//! and a body wrapper that enforces an idle timeout while streaming.
//!
//! Agent workers send proxied requests through their own pool
//! ([`pool`]); everything else (token endpoints, the ElevenLabs API, the
//! main runtime) uses the shared hyper-util client built here.

pub mod h1;
pub mod pool;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;

use sidekey_base::errors::BoxError;

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

/// The connector the shared client uses: TCP as in [`tcp_connector`], then
/// rustls as in [`tls_config`] offering h2 and HTTP/1.1 by ALPN.
pub fn connector(
    connect_timeout: Duration,
    extra_roots: Vec<CertificateDer<'static>>,
) -> HttpsConnector<HttpConnector> {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(extra_roots))
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(tcp_connector(connect_timeout))
}

/// TCP for both clients: the connect timeout, keepalive and nodelay;
/// `https://` addresses are accepted (TLS is layered on by the caller).
fn tcp_connector(connect_timeout: Duration) -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    http
}

/// rustls for both clients: the webpki roots plus `extra_roots`, no ALPN
/// (each client adds its own).
fn tls_config(extra_roots: Vec<CertificateDer<'static>>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for c in extra_roots {
        let _ = roots.add(c);
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Gives the current thread (an agent worker) its own connection pool: its
/// connection tasks run on that thread's runtime, so a proxied request
/// never wakes another thread.
pub fn set_thread_client(cfg: &sidekey_base::config::ServerConfig) {
    let roots = match &cfg.upstream_ca_file {
        Some(p) => sidekey_base::tls::load_roots(p).unwrap_or_default(),
        None => Vec::new(),
    };
    let mut tls = tls_config(roots);
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    pool::install(
        tcp_connector(Duration::from_secs(cfg.connect_timeout_secs)),
        tls,
    );
}

/// Why a proxied request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Pool(#[from] pool::SendError),
    #[error(transparent)]
    Shared(#[from] hyper_util::client::legacy::Error),
}

/// One request for an upstream. The caller's headers are borrowed and the
/// credential header travels apart from them, so neither is copied into a
/// new map for each attempt (a 401 replay sends the same headers again).
pub struct Outbound<'a> {
    pub method: &'a Method,
    /// Absolute: its scheme and authority pick the connection.
    pub uri: Uri,
    pub headers: Headers<'a>,
    /// Sent after `headers`, replacing any header of the same name there.
    pub credential: Option<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

/// Which of a client's headers may go upstream.
pub trait HeaderFilter: Sync {
    fn keeps(&self, name: &HeaderName) -> bool;
}

/// The headers an upstream request carries besides the credential: a
/// borrowed map, optionally seen through a filter. The filter is applied
/// as the request is written, so forwarding a client's headers builds no
/// second map (that map, its hashing and its drop were ~3 % of a proxied
/// request's instructions).
#[derive(Clone, Copy)]
pub struct Headers<'a> {
    map: &'a HeaderMap,
    filter: Option<&'a dyn HeaderFilter>,
    /// Sent when the map (as filtered) has no header of the same name: a
    /// provider's fixed headers (Notion-Version), which a client may
    /// override.
    defaults: &'a [(HeaderName, HeaderValue)],
}

impl<'a> Headers<'a> {
    /// Every header of `map`.
    pub fn all(map: &'a HeaderMap) -> Self {
        Headers {
            map,
            filter: None,
            defaults: &[],
        }
    }

    /// The headers of `map` that `filter` keeps.
    pub fn filtered(map: &'a HeaderMap, filter: &'a dyn HeaderFilter) -> Self {
        Headers {
            map,
            filter: Some(filter),
            defaults: &[],
        }
    }

    /// The same headers plus `defaults` where the client sent none.
    pub fn with_defaults(self, defaults: &'a [(HeaderName, HeaderValue)]) -> Self {
        Headers { defaults, ..self }
    }

    fn keeps(&self, name: &HeaderName) -> bool {
        self.filter.is_none_or(|f| f.keeps(name))
    }

    fn sent(&self, name: &HeaderName) -> bool {
        // The filter first: it refuses `Host` without a hash lookup.
        self.keeps(name) && self.map.contains_key(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)> + '_ {
        self.map.iter().filter(|(n, _)| self.keeps(n)).chain(
            self.defaults
                .iter()
                .filter(|(n, _)| !self.sent(n))
                .map(|(n, v)| (n, v)),
        )
    }

    pub fn contains_key(&self, name: &HeaderName) -> bool {
        self.sent(name) || self.defaults.iter().any(|(n, _)| n == name)
    }

    /// As a map of their own, for hyper's clients.
    pub fn to_map(&self) -> HeaderMap {
        if self.filter.is_none() && self.defaults.is_empty() {
            return self.map.clone();
        }
        let mut out = HeaderMap::with_capacity(self.map.len());
        for (n, v) in self.iter() {
            out.append(n.clone(), v.clone());
        }
        out
    }
}

/// The same request as an `http::Request`, for hyper's clients (h2, the
/// shared client), which take one by value.
fn owned_request(
    method: &Method,
    uri: &Uri,
    headers: Headers<'_>,
    credential: Option<&(HeaderName, HeaderValue)>,
    body: &Bytes,
) -> http::Request<Bytes> {
    let mut req = http::Request::new(body.clone());
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri.clone();
    *req.headers_mut() = headers.to_map();
    if let Some((n, v)) = credential {
        req.headers_mut().insert(n.clone(), v.clone());
    }
    req
}

/// Sends on this thread's pool if it has one, else on the shared client.
pub async fn request(
    shared: &HttpClient,
    out: Outbound<'_>,
) -> Result<http::Response<UpstreamBody>, RequestError> {
    if pool::installed() {
        Ok(pool::send(out).await?)
    } else {
        let mut req = owned_request(
            out.method,
            &out.uri,
            out.headers,
            out.credential.as_ref(),
            &out.body,
        );
        // The pool's rule (see `h1`): a request with a body, or one whose
        // answer has none, leaves no connection for the next user. hyper
        // keeps a connection out of its pool when the request says close
        // (and drops the header on h2).
        if !out.body.is_empty() || *out.method == Method::HEAD {
            req.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        let resp = shared.request(req.map(Full::new)).await?;
        Ok(resp.map(UpstreamBody::Hyper))
    }
}

/// An upstream answer's body: read by hyper's client (the shared client,
/// h2), or by sidekey's own HTTP/1.1 exchange ([`h1`]).
// Unboxed: the H1 body is nearly every answer's, and boxing it would be an
// allocation per proxied call to save bytes in the rare hyper case.
#[allow(clippy::large_enum_variant)]
pub enum UpstreamBody {
    Hyper(hyper::body::Incoming),
    H1(h1::Body),
}

impl UpstreamBody {
    /// Whether the whole body has already been read (it came with the
    /// answer's head): nothing left that could stall.
    pub fn is_read(&self) -> bool {
        match self {
            UpstreamBody::Hyper(_) => false,
            UpstreamBody::H1(b) => b.is_read(),
        }
    }
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Hyper(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            UpstreamBody::H1(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Hyper(b) => b.is_end_stream(),
            UpstreamBody::H1(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Hyper(b) => b.size_hint(),
            UpstreamBody::H1(b) => b.size_hint(),
        }
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
        // When the body stalls, unless another frame comes first. Kept
        // apart from `sleep`: moving a timer costs a trip to the timer
        // wheel, so `sleep` follows only when a poll has to wait.
        deadline: tokio::time::Instant,
    }
}

impl<B> IdleTimeoutBody<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        let deadline = tokio::time::Instant::now() + idle;
        IdleTimeoutBody {
            inner,
            sleep: tokio::time::sleep_until(deadline),
            idle,
            deadline,
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
        let mut this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(f) => {
                *this.deadline = tokio::time::Instant::now() + *this.idle;
                Poll::Ready(f.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                if this.sleep.deadline() != *this.deadline {
                    this.sleep.as_mut().reset(*this.deadline);
                }
                match this.sleep.poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyStalled)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use http_body_util::{BodyExt, StreamBody};

    /// A body whose frames arrive after the given pauses.
    fn paced(pauses: Vec<Duration>) -> impl HttpBody<Data = Bytes, Error = BoxError> {
        StreamBody::new(futures_util::stream::iter(pauses).then(|p| async move {
            tokio::time::sleep(p).await;
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"x")))
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_is_cut_off_only_when_one_gap_exceeds_the_idle_timeout() {
        let idle = Duration::from_secs(10);
        // Seven frames 6 s apart: 42 s in all, never 10 s without a frame.
        let started = tokio::time::Instant::now();
        let body = IdleTimeoutBody::new(paced(vec![Duration::from_secs(6); 7]), idle);
        let bytes = body.collect().await.expect("no gap exceeds the timeout");
        assert_eq!(bytes.to_bytes().len(), 7);
        assert_eq!(started.elapsed(), Duration::from_secs(42));

        // Two quick frames, then a 30 s gap: cut off 10 s after the last.
        let started = tokio::time::Instant::now();
        let mut body = std::pin::pin!(IdleTimeoutBody::new(
            paced(vec![
                Duration::from_secs(1),
                Duration::from_secs(1),
                Duration::from_secs(30)
            ]),
            idle,
        ));
        assert!(body.frame().await.unwrap().is_ok());
        assert!(body.frame().await.unwrap().is_ok());
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<BodyStalled>());
        assert_eq!(started.elapsed(), Duration::from_secs(12));
    }
}
