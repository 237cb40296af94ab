//! One connection from accept to close: the per-IP pending limit, the
//! protocol checks and TLS handshake, then HTTP/1.1 or HTTP/2 until the
//! connection ends, goes idle or the server drains.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::accounting::{ConnState, InFlight, Tracked, WorkerHold};
use super::conn_io::ConnIo;
use super::routing::route;
use super::{Role, Shared};
use crate::app::App;
use crate::error::ApiError;

/// Admits (per-IP pending limit) and serves one accepted connection on the
/// current runtime.
pub(super) fn spawn_connection(
    shared: &Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    role: Role,
    permit: tokio::sync::OwnedSemaphorePermit,
    held: Option<WorkerHold>,
) {
    let ticket = if role == Role::Agent {
        match shared.pending.admit(peer.ip()) {
            Some(t) => Some(t),
            None => {
                shared.app.metrics.connection_refused("pending_per_ip");
                tracing::debug!(%peer, "too many pending connections from this address; closed");
                return;
            }
        }
    } else {
        None
    };
    let shared = shared.clone();
    let drain = shared.drain.subscribe();
    tokio::spawn(async move {
        let _permit = permit;
        let _held = held;
        shared.app.metrics.connection_opened();
        serve_stream(&shared, stream, peer, role, ticket, drain).await;
        shared.app.metrics.connection_closed();
    });
}

/// One accepted connection: protocol checks, TLS, then HTTP until it ends.
async fn serve_stream(
    sh: &Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    role: Role,
    ticket: Option<sidekey_base::limits::PendingTicket>,
    drain: tokio::sync::watch::Receiver<bool>,
) {
    let state = Arc::new(ConnState::new(ticket));
    match (role, &sh.tls) {
        (Role::Agent, Some(tls)) => {
            match tokio::time::timeout(sh.handshake_timeout, first_byte(&stream)).await {
                Ok(Some(0x16)) => {}
                Ok(Some(b)) if b.is_ascii_uppercase() => {
                    tracing::debug!(%peer, "plain HTTP on the TLS port; answering 400");
                    plain_http_on_tls_port(sh, stream).await;
                    return;
                }
                _ => return,
            }
            let start =
                tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
            let handshake = async {
                let start = start.await?;
                let cfg = tls.for_hello(&start.client_hello());
                start.into_stream(cfg).await
            };
            match tokio::time::timeout(sh.handshake_timeout, handshake).await {
                Ok(Ok(tls)) => {
                    let io = ConnIo::new(tls, sh.first_bytes_timeout, state.clone());
                    serve_http(sh, io, state, role, peer, drain).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
        (Role::Admin | Role::Metrics, _) => {
            if let Ok(Some(0x16)) =
                tokio::time::timeout(sh.first_bytes_timeout, first_byte(&stream)).await
            {
                let addr = stream
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                tracing::warn!(
                    %peer,
                    "a TLS handshake arrived on the {} listener, which speaks plain HTTP: use http://{addr}/ (the agent listener is the HTTPS one); connection closed",
                    if role == Role::Admin { "admin" } else { "metrics" }
                );
                return;
            }
            let io = ConnIo::new(stream, sh.first_bytes_timeout, state.clone());
            serve_http(sh, io, state, role, peer, drain).await;
        }
        (Role::Agent, None) => {
            let io = ConnIo::new(stream, sh.first_bytes_timeout, state.clone());
            serve_http(sh, io, state, role, peer, drain).await;
        }
    }
}

/// The first byte the client sent, without consuming it.
async fn first_byte(stream: &TcpStream) -> Option<u8> {
    let mut b = [0u8; 1];
    match stream.peek(&mut b).await {
        Ok(1) => Some(b[0]),
        _ => None,
    }
}

/// Plain HTTP on the TLS port: one plain-HTTP 400 that says so (nginx's
/// 497), instead of a TLS alert the client shows as garbage.
async fn plain_http_on_tls_port(sh: &Arc<Shared>, stream: TcpStream) {
    let url = sh.app.config.server.public_url.clone();
    let svc = service_fn(move |_req: Request<Incoming>| {
        let msg = format!(
            "This port speaks HTTPS, and this request came as plain HTTP. Use {url}/ (https://)."
        );
        async move { Ok::<_, Infallible>(ApiError::BadRequest(msg).into_response()) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(sh.first_bytes_timeout)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), svc);
    let _ = tokio::time::timeout(sh.first_bytes_timeout * 2, conn).await;
}

/// A connection's share of the server, for its requests.
struct ConnCtx {
    app: Arc<App>,
    draining: Arc<AtomicBool>,
    state: Arc<ConnState>,
}

/// HTTP/1.1 or HTTP/2 on an established connection, until it ends, is idle
/// for `Shared::idle`, or the server drains.
async fn serve_http<I>(
    sh: &Arc<Shared>,
    io: ConnIo<I>,
    state: Arc<ConnState>,
    role: Role,
    peer: SocketAddr,
    mut drain: tokio::sync::watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // What every request on this connection needs, behind one handle of
    // the connection's own: cloning the process-wide `Arc`s per request
    // would bounce their reference counts between the agent workers' cores.
    let conn_ctx = Arc::new(ConnCtx {
        app: sh.app.clone(),
        draining: sh.draining.clone(),
        state: state.clone(),
    });
    let svc = service_fn(move |req: Request<Incoming>| {
        let ctx = conn_ctx.clone();
        async move {
            let ConnCtx {
                app,
                draining,
                state: st,
            } = &*ctx;
            let guard = InFlight::start(st);
            let health = matches!(req.uri().path(), "/healthz" | "/readyz");
            let has_body = !http_body::Body::is_end_stream(req.body());
            let resp = std::panic::AssertUnwindSafe(route(app, role, req, draining))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    tracing::error!("request handler panicked");
                    ApiError::Internal.into_response()
                });
            st.answered(&resp, health, has_body);
            // Counted where every answer passes: the store error can
            // surface in any handler.
            if resp
                .headers()
                .get(&crate::error::ERROR_HEADER)
                .is_some_and(|v| v == "store_unavailable")
            {
                app.metrics.store_unavailable();
            }
            Ok::<_, Infallible>(resp.map(|b| Tracked::new(b, guard)))
        }
    });
    let conn = sh.builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    // One timer: the idle check while open, then the settle check while
    // closing.
    let timer = tokio::time::sleep(sh.idle);
    tokio::pin!(timer);
    let mut closing = false;
    if *drain.borrow_and_update() {
        closing = true;
        conn.as_mut().graceful_shutdown();
        timer.as_mut().reset(tokio::time::Instant::now() + SETTLE);
    }
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                break;
            }
            r = drain.changed(), if !closing => {
                if r.is_err() || *drain.borrow() {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                    timer.as_mut().reset(tokio::time::Instant::now() + SETTLE);
                }
            }
            _ = timer.as_mut() => {
                if closing {
                    // HTTP/2's graceful close waits for the client to answer
                    // a PING before its last GOAWAY; a client that does not
                    // (a stalled or hostile one) would hold the connection,
                    // and a shutdown, until the grace period ends. With no
                    // request in flight there is nothing left to wait for.
                    if state.in_flight.load(Ordering::Acquire) == 0 {
                        break;
                    }
                    timer.as_mut().reset(tokio::time::Instant::now() + SETTLE);
                    continue;
                }
                match state.idle_deadline(sh.idle) {
                    // Idle long enough: GOAWAY (HTTP/2) or close (HTTP/1.1).
                    None => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                        timer.as_mut().reset(tokio::time::Instant::now() + SETTLE);
                    }
                    Some(at) => timer.as_mut().reset(at),
                }
            }
        }
    }
}

/// How long a closing connection with no request in flight may take to
/// finish its goodbye before it is dropped.
const SETTLE: Duration = Duration::from_millis(250);
