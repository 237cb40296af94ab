//! An agent worker's own upstream connections, in a pool that lives on the
//! worker thread.
//!
//! hyper-util's legacy `Client` was the largest single cost of a proxied
//! request (see docs/performance.md): a shared, locked pool, a boxed
//! response future, a checkout that races a connect, and one more spawned
//! task per HTTP/1 request to put the connection back. A worker serves its
//! connections on one current-thread runtime, so its pool needs no lock.
//! HTTP/1.1 connections are plain sockets that the request's own task
//! writes and reads ([`super::h1`]); they come back when an answer has been
//! read to its end. h2 connections (by ALPN) are hyper's h2 senders, which
//! multiplex and stay pooled while in use.
//!
//! What the legacy client did that callers rely on is kept: connections
//! come from the same TCP connector (connect timeout, TCP keepalive and
//! nodelay) and rustls configuration (same roots, h2 or HTTP/1.1 by ALPN);
//! a request a reused connection did not take is sent once more on a
//! fresh connection; HTTP/1 requests get a `Host` header and origin-form
//! targets.

use std::cell::RefCell;
use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Response;
use http::uri::Uri;
use http_body_util::Full;
use hyper::client::conn::http2;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tower_service::Service;

use super::Outbound;
use super::UpstreamBody;
use super::h1::{self, Conn, ExchangeError};
use sidekey_base::errors::BoxError;

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
    /// The HTTP/1.1 exchange on an established connection.
    Exchange(ExchangeError),
    /// The h2 exchange on an established connection.
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
            SendError::Exchange(e) => fmt::Display::fmt(e, f),
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
            SendError::Exchange(e) => e.source(),
            SendError::Http(e) => Some(e),
            SendError::NotAbsolute | SendError::NoPool => None,
        }
    }
}

/// A pooled connection: an HTTP/1.1 socket read and written by the
/// request's own task, or hyper's sender for an h2 connection (which
/// multiplexes, and so has a task of its own).
enum Idle {
    H1(Conn),
    H2(http2::SendRequest<Full<Bytes>>),
}

struct Pooled {
    conn: Idle,
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
    tcp: HttpConnector,
    tls: tokio_rustls::TlsConnector,
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
    fn checkout(&self, https: bool, authority: &str) -> Option<Idle> {
        let mut hosts = self.hosts.borrow_mut();
        let idx = find(&hosts, https, authority)?;
        let host = &mut hosts[idx];
        let now = Instant::now();
        let mut i = host.conns.len();
        while i > 0 {
            i -= 1;
            if now.duration_since(host.conns[i].used) > IDLE_TIMEOUT {
                host.conns.swap_remove(i);
                continue;
            }
            match &mut host.conns[i].conn {
                Idle::H2(s) if s.is_closed() => {
                    host.conns.swap_remove(i);
                }
                // An h2 connection multiplexes: it stays pooled.
                Idle::H2(s) if s.is_ready() => {
                    let s = s.clone();
                    host.conns[i].used = now;
                    return Some(Idle::H2(s));
                }
                Idle::H2(_) => {}
                Idle::H1(_) => {
                    let Pooled { conn, .. } = host.conns.swap_remove(i);
                    if let Idle::H1(mut c) = conn {
                        if c.idle_and_open() {
                            return Some(Idle::H1(c));
                        }
                    }
                }
            }
        }
        None
    }

    fn checkin(&self, https: bool, authority: &str, conn: Idle) {
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
            // The oldest goes; dropping an h2 sender lets its connection
            // finish the streams in flight and close.
            conns.remove(0);
        }
        conns.push(Pooled {
            conn,
            used: Instant::now(),
        });
    }
}

thread_local! {
    static POOL: RefCell<Option<std::rc::Rc<Pool>>> = const { RefCell::new(None) };
}

/// Gives the current thread (an agent worker) its own pool. `tls` offers
/// h2 and HTTP/1.1 by ALPN.
pub fn install(tcp: HttpConnector, tls: rustls::ClientConfig) {
    let pool = Pool {
        tcp,
        tls: tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls)),
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

fn scheme_and_authority(uri: &Uri) -> Option<(bool, &str)> {
    match (uri.scheme_str(), uri.authority()) {
        (Some("https"), Some(a)) => Some((true, a.as_str())),
        (Some("http"), Some(a)) => Some((false, a.as_str())),
        _ => None,
    }
}

/// An HTTP/1.1 connection whose answer was read to its end: back to the
/// pool of the thread reading it (if that thread has one).
fn checkin_h1(target: &Uri, conn: Conn) {
    if let Some((https, authority)) = scheme_and_authority(target) {
        with_pool(|p| p.checkin(https, authority, Idle::H1(conn)));
    }
}

/// Sends `req` (absolute URI) on one of this thread's connections, or a
/// new one. On a thread without a pool (callers check [`installed`]
/// first) it fails with [`SendError::NoPool`].
pub async fn send(out: Outbound<'_>) -> Result<Response<UpstreamBody>, SendError> {
    let Outbound {
        method,
        uri: target,
        headers,
        credential,
        body,
    } = out;
    let (https, authority) = scheme_and_authority(&target).ok_or(SendError::NotAbsolute)?;
    // A retry always goes on a new connection: a second pooled one may be
    // just as stale, and the request is sent at most twice.
    let mut retried = false;
    loop {
        let pooled = if retried {
            None
        } else {
            with_pool(|p| p.checkout(https, authority)).flatten()
        };
        let (conn, reused) = match pooled {
            Some(c) => (c, true),
            // Boxed: a connect (TCP, then TLS) is a large future that
            // would otherwise sit inline in every request's future.
            None => (Box::pin(connect(&target, https)).await?, false),
        };
        match conn {
            Idle::H1(mut conn) => {
                let sent = h1::write_request(
                    &mut conn,
                    method,
                    &target,
                    headers,
                    credential.as_ref(),
                    &body,
                )
                .await
                .map_err(ExchangeError::Write);
                let head = match sent {
                    Ok(()) => h1::read_head(&mut conn, method).await,
                    Err(e) => Err(e),
                };
                match head {
                    Ok(head) => {
                        let body = h1::Body::new(&head, conn, target, checkin_h1);
                        return Ok(Response::from_parts(head.parts, UpstreamBody::H1(body)));
                    }
                    // A reused connection that went away: an unsent request,
                    // or an idempotent one nothing was answered to, goes once
                    // more on a fresh connection.
                    Err(e) if reused && e.retryable(method) => {
                        tracing::debug!(error = %e, "pooled upstream connection was closed; retrying on a new one");
                        retried = true;
                    }
                    Err(e) => return Err(SendError::Exchange(e)),
                }
            }
            Idle::H2(mut s) => {
                if !reused {
                    with_pool(|p| p.checkin(https, authority, Idle::H2(s.clone())));
                }
                let h2req =
                    super::owned_request(method, &target, headers, credential.as_ref(), &body)
                        .map(Full::new);
                // Boxed: hyper's h2 send future would otherwise sit inline
                // in every HTTP/1.1 request's future too.
                match Box::pin(s.try_send_request(h2req)).await {
                    Ok(resp) => return Ok(resp.map(UpstreamBody::Hyper)),
                    Err(mut e) => {
                        // Never started on a pooled connection that went away
                        // in the meantime: once more, on a fresh connection.
                        if !(reused && e.take_message().is_some()) {
                            return Err(SendError::Http(e.into_error()));
                        }
                        tracing::debug!(error = %e.error(), "pooled upstream connection was closed; retrying on a new one");
                        retried = true;
                    }
                }
            }
        }
    }
}

/// A new connection: TCP through hyper-util's connector (DNS, connect
/// timeout, keepalive, nodelay), then for `https` rustls; h2 if ALPN chose
/// it (hyper's h2 client, its task on this thread's runtime), else
/// HTTP/1.1 read and written by the requests themselves.
async fn connect(target: &Uri, https: bool) -> Result<Idle, SendError> {
    let (mut tcp, tls) = with_pool(|p| (p.tcp.clone(), p.tls.clone())).ok_or(SendError::NoPool)?;
    std::future::poll_fn(|cx| tcp.poll_ready(cx))
        .await
        .map_err(|e| SendError::Connect(e.into()))?;
    let stream = tcp
        .call(target.clone())
        .await
        .map_err(|e| SendError::Connect(e.into()))?
        .into_inner();
    if !https {
        return Ok(Idle::H1(Conn::new(h1::Io::Plain(stream), target)));
    }
    let host = target.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_owned()).map_err(|e| SendError::Connect(e.into()))?;
    let stream = tls
        .connect(name, stream)
        .await
        .map_err(|e| SendError::Connect(e.into()))?;
    if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .adaptive_window(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream h2 connection ended");
            }
        });
        return Ok(Idle::H2(sender));
    }
    Ok(Idle::H1(Conn::new(h1::Io::Tls(Box::new(stream)), target)))
}
