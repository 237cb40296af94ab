//! An agent worker's own upstream connections: hyper's connection-level
//! client (`hyper::client::conn`) driven from a pool that lives on the
//! worker thread.
//!
//! hyper-util's legacy `Client` was the largest single cost of a proxied
//! request (see docs/performance.md): a shared, locked pool, a boxed
//! response future, a checkout that races a connect, and one more spawned
//! task per HTTP/1 request to put the connection back once the answer has
//! been read. A worker serves its connections on one current-thread
//! runtime, so its pool needs no lock, and an HTTP/1 connection can go back
//! the moment its answer's head arrives: the next checkout skips it until
//! hyper says it wants another request.
//!
//! What the legacy client did that callers rely on is kept: connections
//! come from the same connector (connect timeout, TCP keepalive and
//! nodelay, rustls with the same roots, h2 or HTTP/1.1 by ALPN), a request
//! that a reused connection never started is sent again once on a fresh
//! connection, HTTP/1 requests get a `Host` header and origin-form targets.

use std::cell::RefCell;
use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HOST, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower_service::Service;

use crate::body::BoxError;

type ReqBody = Full<Bytes>;

/// Idle connections kept per upstream and thread (the legacy client's
/// `pool_max_idle_per_host` was 256 for the whole process).
const MAX_PER_HOST: usize = 256;
/// A connection unused this long is not reused (upstreams close theirs
/// after 60–120 s; reusing one that is about to close costs a retry).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Why an upstream request failed before an answer's head arrived.
#[derive(Debug)]
pub enum SendError {
    /// No connection: DNS, TCP connect (or its timeout), TLS handshake.
    Connect(BoxError),
    /// The HTTP exchange on an established connection.
    Http(hyper::Error),
    /// Not an absolute `http://` or `https://` address (a bug: providers
    /// build absolute URIs).
    NotAbsolute,
    /// Called on a thread without a pool (a bug: callers check
    /// [`installed`]).
    NoPool,
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Connect(_) => f.write_str("cannot connect to the upstream"),
            SendError::Http(_) => f.write_str("upstream HTTP exchange failed"),
            SendError::NotAbsolute => f.write_str("upstream address is not absolute"),
            SendError::NoPool => f.write_str("no upstream connection pool on this thread"),
        }
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SendError::Connect(e) => Some(e.as_ref()),
            SendError::Http(e) => Some(e),
            SendError::NotAbsolute | SendError::NoPool => None,
        }
    }
}

enum Sender {
    H1(http1::SendRequest<ReqBody>),
    H2(http2::SendRequest<ReqBody>),
}

impl Sender {
    fn usable(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_ready(),
            Sender::H2(s) => s.is_ready(),
        }
    }

    fn closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

struct Pooled {
    sender: Sender,
    used: Instant,
}

/// Connections to one upstream (scheme and authority).
struct Host {
    https: bool,
    authority: String,
    conns: Vec<Pooled>,
}

/// One worker thread's pool. Not `Sync`, never shared: it is reached
/// through a thread-local and no borrow is held across an `.await`.
struct Pool {
    connector: HttpsConnector<HttpConnector>,
    hosts: RefCell<Vec<Host>>,
}

fn find(hosts: &[Host], https: bool, authority: &str) -> Option<usize> {
    hosts
        .iter()
        .position(|h| h.https == https && h.authority == authority)
}

impl Pool {
    /// A connection to the upstream that can take a request now, most
    /// recently used first; closed and stale ones are dropped on the way.
    /// HTTP/1 connections still reading an earlier answer stay pooled.
    fn checkout(&self, https: bool, authority: &str) -> Option<Sender> {
        let mut hosts = self.hosts.borrow_mut();
        let idx = find(&hosts, https, authority)?;
        let host = &mut hosts[idx];
        let now = Instant::now();
        let mut i = host.conns.len();
        while i > 0 {
            i -= 1;
            let c = &host.conns[i];
            if c.sender.closed() || now.duration_since(c.used) > IDLE_TIMEOUT {
                host.conns.swap_remove(i);
                continue;
            }
            if c.sender.usable() {
                let c = host.conns.swap_remove(i);
                return Some(match c.sender {
                    // An h2 connection multiplexes: it stays pooled.
                    Sender::H2(s) => {
                        host.conns.push(Pooled {
                            sender: Sender::H2(s.clone()),
                            used: now,
                        });
                        Sender::H2(s)
                    }
                    h1 => h1,
                });
            }
        }
        None
    }

    fn checkin(&self, https: bool, authority: &str, sender: Sender) {
        let mut hosts = self.hosts.borrow_mut();
        let idx = match find(&hosts, https, authority) {
            Some(i) => i,
            None => {
                hosts.push(Host {
                    https,
                    authority: authority.to_owned(),
                    conns: Vec::new(),
                });
                hosts.len() - 1
            }
        };
        let conns = &mut hosts[idx].conns;
        if conns.len() >= MAX_PER_HOST {
            // Dropping a sender lets its connection finish the answer in
            // flight and close.
            conns.remove(0);
        }
        conns.push(Pooled {
            sender,
            used: Instant::now(),
        });
    }
}

thread_local! {
    static POOL: RefCell<Option<std::rc::Rc<Pool>>> = const { RefCell::new(None) };
}

/// Gives the current thread (an agent worker) its own pool.
pub fn install(connector: HttpsConnector<HttpConnector>) {
    let pool = Pool {
        connector,
        hosts: RefCell::new(Vec::new()),
    };
    POOL.with(|p| *p.borrow_mut() = Some(std::rc::Rc::new(pool)));
}

/// Whether this thread has a pool (agent workers do; the main runtime's
/// threads use the shared legacy client).
pub fn installed() -> bool {
    POOL.with(|p| p.borrow().is_some())
}

fn with_pool<R>(f: impl FnOnce(&Pool) -> R) -> Option<R> {
    POOL.with(|p| p.borrow().as_ref().map(|p| f(p)))
}

/// Sends `req` (absolute URI) on one of this thread's connections, or a
/// new one. On a thread without a pool (callers check [`installed`]
/// first) it fails with [`SendError::NoPool`].
pub async fn send(mut req: Request<ReqBody>) -> Result<Response<Incoming>, SendError> {
    // A clone shares the URI's bytes: the authority is borrowed from it
    // rather than copied for every request.
    let target = req.uri().clone();
    let (https, authority) = match (target.scheme_str(), target.authority()) {
        (Some("https"), Some(a)) => (true, a.as_str()),
        (Some("http"), Some(a)) => (false, a.as_str()),
        _ => return Err(SendError::NotAbsolute),
    };
    let mut fresh_tried = false;
    loop {
        let (sender, reused) = match with_pool(|p| p.checkout(https, authority)).flatten() {
            Some(s) => (s, true),
            None => {
                fresh_tried = true;
                (connect(&target).await?, false)
            }
        };
        let result = match sender {
            Sender::H1(mut s) => {
                prepare_h1(&mut req, &target);
                let r = s.try_send_request(req).await;
                if r.is_ok() || !s.is_closed() {
                    with_pool(|p| p.checkin(https, authority, Sender::H1(s)));
                }
                r
            }
            Sender::H2(mut s) => {
                if !reused {
                    with_pool(|p| p.checkin(https, authority, Sender::H2(s.clone())));
                }
                *req.uri_mut() = target.clone();
                s.try_send_request(req).await
            }
        };
        match result {
            Ok(resp) => return Ok(resp),
            Err(mut e) => match e.take_message() {
                // Never started on a pooled connection that went away in
                // the meantime: once more, on a fresh connection.
                Some(back) if reused && !fresh_tried => {
                    tracing::debug!(error = %e.error(), "pooled upstream connection was closed; retrying on a new one");
                    req = back;
                }
                _ => return Err(SendError::Http(e.into_error())),
            },
        }
    }
}

/// HTTP/1 wants origin-form and a `Host` header (the legacy client did both).
fn prepare_h1(req: &mut Request<ReqBody>, target: &Uri) {
    if !req.headers().contains_key(HOST) {
        if let Some(host) = target.host() {
            let value = match non_default_port(target) {
                Some(port) => HeaderValue::from_str(&format!("{host}:{port}")),
                None => HeaderValue::from_str(host),
            };
            if let Ok(v) = value {
                req.headers_mut().insert(HOST, v);
            }
        }
    }
    let origin = match target.path_and_query() {
        Some(pq) if pq.as_str() != "/" => {
            let mut parts = http::uri::Parts::default();
            parts.path_and_query = Some(pq.clone());
            Uri::from_parts(parts).unwrap_or_default()
        }
        _ => Uri::from(PathAndQuery::from_static("/")),
    };
    *req.uri_mut() = origin;
}

fn non_default_port(uri: &Uri) -> Option<u16> {
    let port = uri.port_u16()?;
    let secure = uri.scheme_str() == Some("https");
    match (port, secure) {
        (443, true) | (80, false) => None,
        _ => Some(port),
    }
}

/// A new connection through the connector, then hyper's handshake for the
/// protocol ALPN chose; the connection task runs on this thread's runtime.
async fn connect(target: &Uri) -> Result<Sender, SendError> {
    let mut connector = with_pool(|p| p.connector.clone()).ok_or(SendError::NoPool)?;
    std::future::poll_fn(|cx| connector.poll_ready(cx))
        .await
        .map_err(SendError::Connect)?;
    let io = connector
        .call(target.clone())
        .await
        .map_err(SendError::Connect)?;
    if io.connected().is_negotiated_h2() {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .adaptive_window(true)
            .handshake(io)
            .await
            .map_err(SendError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream h2 connection ended");
            }
        });
        Ok(Sender::H2(sender))
    } else {
        let (sender, conn) = http1::Builder::new()
            .max_buf_size(256 * 1024)
            .handshake(io)
            .await
            .map_err(SendError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(Sender::H1(sender))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h1_requests_get_origin_form_and_host() {
        let target: Uri = "http://127.0.0.1:8080/api/items?limit=10".parse().unwrap();
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.uri_mut() = target.clone();
        prepare_h1(&mut req, &target);
        assert_eq!(req.uri().to_string(), "/api/items?limit=10");
        assert_eq!(req.headers()[HOST], "127.0.0.1:8080");

        let target: Uri = "https://slack.com".parse().unwrap();
        let mut req = Request::new(Full::new(Bytes::new()));
        prepare_h1(&mut req, &target);
        assert_eq!(req.uri().to_string(), "/");
        assert_eq!(req.headers()[HOST], "slack.com");
    }

    #[test]
    fn an_explicit_host_header_is_kept() {
        let target: Uri = "https://api.example.com:8443/x".parse().unwrap();
        let mut req = Request::new(Full::new(Bytes::new()));
        req.headers_mut()
            .insert(HOST, HeaderValue::from_static("override"));
        prepare_h1(&mut req, &target);
        assert_eq!(req.headers()[HOST], "override");
        assert_eq!(non_default_port(&target), Some(8443));
        assert_eq!(non_default_port(&"https://a:443/".parse().unwrap()), None);
        assert_eq!(non_default_port(&"http://a:80/".parse().unwrap()), None);
    }
}
