//! Listeners, TLS, routing and graceful shutdown.
//!
//! `run` takes already-bound listeners and a shutdown future, so tests can
//! start the real server on `127.0.0.1:0` and stop it when they like. The
//! agent-facing listener speaks HTTPS (HTTP/1.1 and HTTP/2 by ALPN); the
//! admin listener speaks plain HTTP on loopback.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::app::App;
use crate::body::{self, Body};
use crate::error::ApiError;
use sidekey_base::errors::Fatal;

/// The two bound listeners.
pub struct Listeners {
    /// Agent-facing (ElevenLabs, browsers for OAuth callbacks).
    pub agent: TcpListener,
    /// Main-app-facing admin API.
    pub admin: TcpListener,
    /// `/metrics` and health without a token (`[admin] metrics_listen`).
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(agent: SocketAddr, admin: SocketAddr) -> Result<Listeners, Fatal> {
        let a = TcpListener::bind(agent).await.map_err(|e| {
            Fatal::new(format!(
                "server.listen: cannot listen on {agent}: {e}; pick a free address or stop whatever holds it"
            ))
        })?;
        let b = TcpListener::bind(admin).await.map_err(|e| {
            Fatal::new(format!(
                "admin.listen: cannot listen on {admin}: {e}; pick a free address or stop whatever holds it"
            ))
        })?;
        Ok(Listeners {
            agent: a,
            admin: b,
            metrics: None,
        })
    }

    /// Every listener the config names: agent, admin and, if set, metrics.
    pub async fn for_config(cfg: &sidekey_base::config::Config) -> Result<Listeners, Fatal> {
        Listeners::bind(cfg.server.listen, cfg.admin.listen)
            .await?
            .with_metrics(cfg.admin.metrics_listen)
            .await
    }

    /// Adds the optional metrics listener.
    pub async fn with_metrics(mut self, addr: Option<SocketAddr>) -> Result<Listeners, Fatal> {
        if let Some(addr) = addr {
            self.metrics = Some(TcpListener::bind(addr).await.map_err(|e| {
                Fatal::new(format!(
                    "admin.metrics_listen: cannot listen on {addr}: {e}; pick a free address or remove it"
                ))
            })?);
        }
        Ok(self)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Agent,
    Admin,
    Metrics,
}

/// Connections the admin listener serves at once.
const ADMIN_CONNECTIONS: usize = 256;
/// Connections the token-less metrics listener serves at once: its own
/// budget, so scrapers and probes cannot starve the admin API (nor the
/// reverse).
const METRICS_CONNECTIONS: usize = 64;

/// TLS for the agent listener: the configured ALPN list (h2, http/1.1),
/// and the same config without ALPN for clients that offer neither
/// (`http/1.0` only, or an unknown protocol). rustls would refuse those
/// with `no_application_protocol`; like nginx, sidekey answers them over
/// HTTP/1.1 instead.
#[derive(Clone)]
struct Tls {
    main: Arc<rustls::ServerConfig>,
    no_alpn: Arc<rustls::ServerConfig>,
}

impl Tls {
    fn new(main: Arc<rustls::ServerConfig>) -> Tls {
        let mut no_alpn = (*main).clone();
        no_alpn.alpn_protocols.clear();
        Tls {
            main,
            no_alpn: Arc::new(no_alpn),
        }
    }

    fn for_hello(&self, hello: &rustls::server::ClientHello<'_>) -> Arc<rustls::ServerConfig> {
        match hello.alpn() {
            Some(mut offered) => {
                let ours = &self.main.alpn_protocols;
                if offered.any(|p| ours.iter().any(|o| o.as_slice() == p)) {
                    self.main.clone()
                } else {
                    self.no_alpn.clone()
                }
            }
            None => self.main.clone(),
        }
    }
}

/// What every connection task shares.
struct Shared {
    app: Arc<App>,
    builder: Builder<TokioExecutor>,
    tls: Option<Tls>,
    draining: Arc<AtomicBool>,
    /// `true` once shutting down; every live connection holds a receiver,
    /// so `closed()` on the sender is "all connections are gone".
    drain: tokio::sync::watch::Sender<bool>,
    /// `true` when the grace period is over (or `run` was dropped): agent
    /// worker threads stop, dropping what connections they still have.
    abort: tokio::sync::watch::Sender<bool>,
    /// A connection with no request in flight for this long is closed
    /// (HTTP/2: GOAWAY; HTTP/1.1: hyper's header read timeout does the same).
    idle: Duration,
    handshake_timeout: Duration,
    first_bytes_timeout: Duration,
    pending: Arc<sidekey_base::limits::PendingConns>,
    /// Agent workers still holding their copy of the listening socket:
    /// "no longer accepting" is true only once this is 0.
    worker_listeners: std::sync::atomic::AtomicUsize,
}

/// Serves both listeners until `shutdown` resolves, then drains in-flight
/// requests for up to `server.shutdown_grace_secs` and flushes the store.
pub async fn run(
    app: Arc<App>,
    listeners: Listeners,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) {
    let cfg = &app.config.server;
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Off: `serve_http`'s connection timer already closes a connection
        // with no request in flight for `header_read_timeout_secs` (idle,
        // or a head that never completes). hyper's own timer cost a boxed
        // sleep and a timer-wheel entry on every request.
        .header_read_timeout(None)
        // On: hyper otherwise reads ahead while a request is in flight to
        // see the client leave. That read needs room in its 8 KiB buffer,
        // which the request's headers still share, so hyper allocated a new
        // one for every request (glibc's slow path). A request whose client
        // left now runs to its end and is audited like any other; its
        // answer then fails to write and the connection closes.
        .half_close(true)
        .max_buf_size(cfg.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(cfg.h2_max_concurrent_streams)
        .max_header_list_size(cfg.max_header_bytes as u32)
        // Rapid-reset (CVE-2023-44487) and error-reset floods.
        .max_pending_accept_reset_streams(Some(50))
        .max_local_error_reset_streams(Some(256))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let (drain, _) = tokio::sync::watch::channel(false);
    let (abort, _) = tokio::sync::watch::channel(false);
    let shared = Arc::new(Shared {
        abort,
        builder,
        tls: tls.map(Tls::new),
        draining: Arc::new(AtomicBool::new(false)),
        drain,
        idle: Duration::from_secs(cfg.header_read_timeout_secs),
        handshake_timeout: Duration::from_secs(cfg.tls_handshake_timeout_secs),
        first_bytes_timeout: Duration::from_secs(cfg.header_read_timeout_secs),
        pending: sidekey_base::limits::PendingConns::new(cfg.max_pending_per_ip),
        worker_listeners: std::sync::atomic::AtomicUsize::new(0),
        app: app.clone(),
    });
    let agent_slots = Arc::new(Semaphore::new(cfg.max_connections));
    let admin_slots = Arc::new(Semaphore::new(ADMIN_CONNECTIONS));
    let metrics_slots = Arc::new(Semaphore::new(METRICS_CONNECTIONS));
    // Workers stop when this is dropped, also when `run` itself is dropped
    // (an in-process server whose runtime ends).
    let _abort_on_drop = AbortOnDrop(shared.clone());

    let Listeners {
        agent,
        admin,
        metrics,
    } = listeners;
    let mut agent = Some(agent);
    let mut workers = Vec::new();
    let threads = agent_threads();
    if threads > 0 {
        if let Some(l) = agent.take() {
            match l.into_std() {
                Ok(l) => {
                    let (balance, inboxes) = Balance::new(threads, &app.metrics);
                    for (i, inbox) in inboxes.into_iter().enumerate() {
                        match l.try_clone() {
                            Ok(l) => workers.push(spawn_worker(
                                i,
                                &shared,
                                l,
                                &agent_slots,
                                &balance,
                                inbox,
                            )),
                            Err(e) => {
                                tracing::error!(error = %e, "cannot share the agent listener")
                            }
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot hand the agent listener to workers"),
            }
        }
    }

    tokio::pin!(shutdown);
    loop {
        let (stream, peer, role, permit) = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            r = accept_optional(agent.as_ref(), &agent_slots) => match r {
                Some((s, p, permit)) => (s, p, Role::Agent, permit),
                None => continue,
            },
            r = accept(&admin, &admin_slots) => match r {
                Some((s, p, permit)) => (s, p, Role::Admin, permit),
                None => continue,
            },
            r = accept_optional(metrics.as_ref(), &metrics_slots) => match r {
                Some((s, p, permit)) => (s, p, Role::Metrics, permit),
                None => continue,
            },
        };
        spawn_connection(&shared, stream, peer, role, permit, None);
    }
    drop((agent, admin, metrics));

    shared.draining.store(true, Ordering::SeqCst);
    let grace = Duration::from_secs(app.config.server.shutdown_grace_secs);
    shared.drain.send_replace(true);
    // The workers close their copies of the agent socket on the drain
    // signal; until they have, a client could still connect.
    let closing = tokio::time::Instant::now();
    while shared.worker_listeners.load(Ordering::SeqCst) > 0
        && closing.elapsed() < Duration::from_secs(1)
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tracing::info!(
        in_flight_connections = shared.drain.receiver_count(),
        grace_secs = grace.as_secs(),
        "shutting down: no longer accepting, draining"
    );
    if tokio::time::timeout(grace, shared.drain.closed())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; closing remaining connections");
    }
    shared.abort.send_replace(true);
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(1), w).await;
    }
    app.audit.sync().await;
    match app.store.flush().await {
        Ok(()) => tracing::info!("store flushed; bye"),
        Err(e) => tracing::error!(error = %e, "final store flush failed"),
    }
}

struct AbortOnDrop(Arc<Shared>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort.send_replace(true);
    }
}

/// Threads serving the agent listener, one current-thread runtime each:
/// `SIDEKEY_AGENT_THREADS`, by default one per core; `0` serves it on the
/// caller's runtime instead.
fn agent_threads() -> usize {
    match std::env::var("SIDEKEY_AGENT_THREADS") {
        Ok(v) => v.trim().parse().unwrap_or(0),
        Err(_) => std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}

/// One agent worker: its own current-thread runtime accepting on a shared
/// copy of the listening socket, and its own upstream connection pool, so
/// a request is read, forwarded, answered and audited on one thread with
/// no hand-off between threads (nginx's worker model). Sessions, caches,
/// the store, audit and metrics stay shared. Background work (audit
/// writer, GC, store flushes, database connections) stays on the caller's
/// runtime. Ends after the drain when its connections have, or at abort.
fn spawn_worker(
    i: usize,
    sh: &Arc<Shared>,
    listener: std::net::TcpListener,
    slots: &Arc<Semaphore>,
    balance: &Arc<Balance>,
    mut inbox: tokio::sync::mpsc::UnboundedReceiver<Handoff>,
) -> tokio::sync::oneshot::Receiver<()> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let sh = sh.clone();
    let slots = slots.clone();
    let balance = balance.clone();
    let mut drain = sh.drain.subscribe();
    let mut abort = sh.abort.subscribe();
    sh.worker_listeners.fetch_add(1, Ordering::SeqCst);
    let run = move || {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "cannot start an agent worker runtime");
                return;
            }
        };
        rt.block_on(async move {
            sidekey_creds::client::set_thread_client(&sh.app.config.server);
            let listener = match TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "agent worker cannot listen");
                    return;
                }
            };
            // Each connection holds a sender; all gone = this worker is idle.
            let (held, mut idle) = tokio::sync::mpsc::channel::<()>(1);
            let serve_here = |s: TcpStream,
                              peer: SocketAddr,
                              permit: tokio::sync::OwnedSemaphorePermit,
                              counted: Counted| {
                let hold = WorkerHold {
                    _idle: held.clone(),
                    _counted: counted,
                };
                spawn_connection(&sh, s, peer, Role::Agent, permit, Some(hold));
            };
            let adopt = |h: Handoff| match TcpStream::from_std(h.stream) {
                Ok(s) => serve_here(s, h.peer, h.permit, h.counted),
                Err(e) => tracing::debug!(error = %e, "cannot adopt a handed-off connection"),
            };
            if !*drain.borrow_and_update() {
                loop {
                    tokio::select! {
                        _ = drain.changed() => break,
                        _ = abort.changed() => break,
                        Some(h) = inbox.recv() => adopt(h),
                        r = accept(&listener, &slots) => {
                            if let Some((s, p, permit)) = r {
                                let to = balance.pick(i);
                                let counted = balance.count(to);
                                if to == i {
                                    serve_here(s, p, permit, counted);
                                } else if let Err(mut h) = balance.hand_off(to, s, p, permit, counted) {
                                    h.counted = balance.count(i);
                                    adopt(h);
                                }
                            }
                        }
                    }
                }
            }
            // Connections already handed to this worker are served (and
            // drained) like its own; later hand-offs fail and stay where
            // they were accepted.
            inbox.close();
            while let Ok(h) = inbox.try_recv() {
                adopt(h);
            }
            drop((listener, held, drain));
            sh.worker_listeners.fetch_sub(1, Ordering::SeqCst);
            if !*abort.borrow_and_update() {
                tokio::select! {
                    _ = idle.recv() => {}
                    _ = abort.changed() => {}
                }
            }
        });
        let _ = done_tx.send(());
    };
    if let Err(e) = std::thread::Builder::new()
        .name(format!("sidekey-agent-{i}"))
        .spawn(run)
    {
        tracing::error!(error = %e, "cannot start an agent worker thread");
    }
    done_rx
}

/// The agent workers' shares of the connections. All workers wait on one
/// listening socket, so a burst of new connections can land mostly on
/// whichever worker is awake, and a worker can use at most one core: with
/// two thirds of the connections on one of two workers, sidekey gets
/// about 1.5 cores' worth of work done however many are idle. A worker
/// that accepts a connection while another holds fewer passes it there,
/// before the TLS handshake. This costs a hand-off per connection, never
/// per request.
struct Balance {
    workers: Vec<(
        prometheus_client::metrics::gauge::Gauge,
        tokio::sync::mpsc::UnboundedSender<Handoff>,
    )>,
}

/// An accepted connection on its way to another worker.
struct Handoff {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
    counted: Counted,
}

/// One open connection in its worker's count, until dropped.
struct Counted(prometheus_client::metrics::gauge::Gauge);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What an agent worker's connection holds: its worker's "still busy"
/// sender and its place in the worker's count.
struct WorkerHold {
    _idle: tokio::sync::mpsc::Sender<()>,
    _counted: Counted,
}

impl Balance {
    fn new(
        workers: usize,
        metrics: &sidekey_base::metrics::Metrics,
    ) -> (
        Arc<Balance>,
        Vec<tokio::sync::mpsc::UnboundedReceiver<Handoff>>,
    ) {
        let (senders, inboxes) = (0..workers)
            .map(|i| {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                ((metrics.worker_connections(i), tx), rx)
            })
            .unzip();
        (Arc::new(Balance { workers: senders }), inboxes)
    }

    /// The worker that should serve a connection `me` accepted: the live
    /// one with the fewest connections, `me` on a tie.
    fn pick(&self, me: usize) -> usize {
        let mut best = (me, self.workers[me].0.get());
        for (i, (count, inbox)) in self.workers.iter().enumerate() {
            let n = count.get();
            if n < best.1 && !inbox.is_closed() {
                best = (i, n);
            }
        }
        best.0
    }

    fn count(&self, worker: usize) -> Counted {
        let g = self.workers[worker].0.clone();
        g.inc();
        Counted(g)
    }

    /// Moves the connection to worker `to`'s runtime; gives it back when
    /// that worker no longer takes connections (it is draining). A socket
    /// the accepting runtime cannot let go of is closed (the client sees a
    /// reset, as for a connection refused at accept).
    fn hand_off(
        &self,
        to: usize,
        stream: TcpStream,
        peer: SocketAddr,
        permit: tokio::sync::OwnedSemaphorePermit,
        counted: Counted,
    ) -> Result<(), Handoff> {
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "cannot hand a connection to another worker");
                return Ok(());
            }
        };
        let h = Handoff {
            stream,
            peer,
            permit,
            counted,
        };
        self.workers[to].1.send(h).map_err(|e| e.0)
    }
}

/// Admits (per-IP pending limit) and serves one accepted connection on the
/// current runtime.
fn spawn_connection(
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
            Ok::<_, Infallible>(resp.map(|b| Tracked {
                inner: b,
                _in_flight: guard,
            }))
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

/// `accept` on a listener that may not be configured (then never resolves).
async fn accept_optional(
    listener: Option<&TcpListener>,
    slots: &Arc<Semaphore>,
) -> Option<(TcpStream, SocketAddr, tokio::sync::OwnedSemaphorePermit)> {
    match listener {
        Some(l) => accept(l, slots).await,
        None => std::future::pending().await,
    }
}

/// Accepts one connection once a slot is free. Accept errors (e.g. out of
/// file descriptors) back off instead of ending the loop.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> Option<(TcpStream, SocketAddr, tokio::sync::OwnedSemaphorePermit)> {
    let permit = slots.clone().acquire_owned().await.ok()?;
    match listener.accept().await {
        Ok((s, p)) => {
            let _ = s.set_nodelay(true);
            Some((s, p, permit))
        }
        Err(e) => {
            tracing::warn!(error = %e, "accept failed; backing off");
            tokio::time::sleep(Duration::from_millis(100)).await;
            None
        }
    }
}

async fn route(
    app: &Arc<App>,
    role: Role,
    req: Request<Incoming>,
    draining: &AtomicBool,
) -> Response<Body> {
    let path = req.uri().path();
    if path == "/healthz" {
        return body::json(StatusCode::OK, &json!({"status": "ok"}));
    }
    if path == "/readyz" {
        return if draining.load(Ordering::Relaxed) {
            body::json(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "draining"}),
            )
        } else if let Err(e) = Box::pin(app.store.ready()).await {
            tracing::warn!(error = %e, "not ready: store unavailable");
            body::json(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "store_unavailable"}),
            )
        } else {
            body::json(StatusCode::OK, &json!({"status": "ready"}))
        };
    }
    if req.method() == Method::CONNECT {
        return ApiError::MethodNotAllowed.into_response();
    }
    // An absolute URI in an HTTP/1 request line is proxy syntax; sidekey is
    // not an open proxy. (HTTP/2 always carries scheme and authority.)
    if req.version() < Version::HTTP_2 && req.uri().scheme().is_some() {
        return ApiError::BadPath("absolute URI in request line").into_response();
    }
    // The admin and metrics routes boxed, for the agent route's sake (see
    // `route_agent`).
    match role {
        Role::Admin => Box::pin(crate::admin::handle(app, req)).await,
        Role::Agent => route_agent(app, req).await,
        Role::Metrics if path == "/metrics" && req.method() == Method::GET => {
            Box::pin(crate::admin::metrics(app, req.headers())).await
        }
        Role::Metrics => {
            ApiError::NotFound("This listener serves /metrics, /healthz and /readyz only.".into())
                .into_response()
        }
    }
}

async fn route_agent(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    // The proxy route first, before anything is copied out of the request:
    // it is nearly every request this listener serves.
    let p = req.uri().path();
    if p.starts_with("/v1/proxy/") || p == "/v1/proxy" {
        return crate::proxy::handle(app, req).await;
    }
    // Boxed: inline, the largest of the other routes' futures would set the
    // size of every proxied request's future (kilobytes copied per request).
    Box::pin(route_agent_other(app, req)).await
}

async fn route_agent_other(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    if let Some(provider) = path.strip_prefix("/v1/call/") {
        if method != Method::POST {
            return ApiError::MethodNotAllowed.into_response();
        }
        let provider = provider.to_owned();
        return crate::proxy::handle_call(app, req, &provider).await;
    }
    if path == "/v1/mcp" {
        return crate::mcp::handle(app, req).await;
    }
    if let Some(name) = path.strip_prefix("/v1/tools/") {
        if method != Method::POST {
            return ApiError::MethodNotAllowed.into_response();
        }
        let name = name.to_owned();
        return crate::tools::handle(app, req, &name).await;
    }
    if let Some(name) = path.strip_prefix("/v1/retell/tools/") {
        if method != Method::POST {
            return ApiError::MethodNotAllowed.into_response();
        }
        let name = name.to_owned();
        return crate::retell::tool(app, req, &name).await;
    }
    // ---- connect page: /connect/<ticket>[/connect|/disconnect], CSS
    if path.starts_with("/connect/") {
        return crate::connect::handle(app, req).await;
    }
    // ---- end connect page
    if let Some(rest) = path.strip_prefix("/oauth/") {
        if let Some(provider) = rest.strip_suffix("/callback") {
            if method != Method::GET {
                return ApiError::MethodNotAllowed.into_response();
            }
            let provider = provider.to_owned();
            return crate::connect::callback::callback(app, req, &provider).await;
        }
    }
    let is_post = method == Method::POST;
    match path.as_str() {
        "/v1/session/refresh" if is_post => crate::proxy::refresh_tool(app, req).await,
        "/v1/elevenlabs/conversation-init" if is_post => {
            crate::elevenlabs::conversation_init(app, req).await
        }
        "/v1/elevenlabs/post-call" if is_post => crate::elevenlabs::post_call(app, req).await,
        "/v1/vapi/tools" if is_post => crate::vapi::server_message(app, req).await,
        "/v1/retell/webhook" if is_post => crate::retell::webhook(app, req).await,
        "/v1/session/refresh"
        | "/v1/elevenlabs/conversation-init"
        | "/v1/elevenlabs/post-call"
        | "/v1/vapi/tools"
        | "/v1/retell/webhook" => ApiError::MethodNotAllowed.into_response(),
        p if is_admin_path(p) => ApiError::NotFound(
            "This is the agent listener; admin routes (/v1/users, /v1/sessions, /v1/audit, ...) are served on the admin listener ([admin] listen) with the admin token.".into(),
        )
        .into_response(),
        _ => ApiError::NotFound("There is no such endpoint.".into()).into_response(),
    }
}

/// Paths of the admin API, to point a caller who sent one to the agent
/// listener at the right one.
fn is_admin_path(p: &str) -> bool {
    [
        "/v1/users",
        "/v1/tenants",
        "/v1/sessions",
        "/v1/audit",
        "/v1/admin",
        "/v1/elevenlabs/tools",
        "/metrics",
    ]
    .iter()
    .any(|a| p == *a || p.strip_prefix(a).is_some_and(|r| r.starts_with('/')))
}

/// A connection's share of the server, for its requests.
struct ConnCtx {
    app: Arc<App>,
    draining: Arc<AtomicBool>,
    state: Arc<ConnState>,
}

/// Per-connection state shared by the connection task, its IO and the
/// bodies of its answers.
struct ConnState {
    /// Answers not yet fully sent (their body not yet dropped).
    in_flight: AtomicUsize,
    /// When the last answer ended, as ms since `born`.
    last_active_ms: AtomicU64,
    born: tokio::time::Instant,
    /// Taken (and given back as proven) on the first accepted request.
    ticket: std::sync::Mutex<Option<sidekey_base::limits::PendingTicket>>,
    proven: AtomicBool,
    /// Read what the client still sends after the close (see `ConnIo`).
    linger: AtomicBool,
    /// Answers the service produced whose HTTP/1 head has not been seen
    /// written yet: a head written while this is 0 is hyper's own.
    heads_due: AtomicUsize,
}

impl ConnState {
    fn new(ticket: Option<sidekey_base::limits::PendingTicket>) -> ConnState {
        ConnState {
            in_flight: AtomicUsize::new(0),
            last_active_ms: AtomicU64::new(0),
            born: tokio::time::Instant::now(),
            proven: AtomicBool::new(ticket.is_none()),
            ticket: std::sync::Mutex::new(ticket),
            linger: AtomicBool::new(false),
            heads_due: AtomicUsize::new(0),
        }
    }

    fn request_ended(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.last_active_ms.store(ms, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Release);
    }

    /// An answer is ready: a request sidekey accepted (no error of its own,
    /// not a health probe) proves the connection for the per-IP limit; a
    /// refusal of a request with a body (possibly not read, as for a 413)
    /// asks for a lingering close.
    fn answered(&self, resp: &Response<Body>, health: bool, has_body: bool) {
        self.heads_due.fetch_add(1, Ordering::Release);
        if has_body && resp.status().as_u16() >= 400 {
            self.linger.store(true, Ordering::Relaxed);
        }
        if !self.proven.load(Ordering::Relaxed)
            && !health
            && !resp.headers().contains_key(&crate::error::ERROR_HEADER)
        {
            self.proven.store(true, Ordering::Relaxed);
            let t = sidekey_base::sync::lock(&self.ticket).take();
            if let Some(t) = t {
                t.prove();
            }
        }
    }

    /// `None` when the connection has been idle for `idle`; otherwise when
    /// to look again.
    fn idle_deadline(&self, idle: Duration) -> Option<tokio::time::Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Some(tokio::time::Instant::now() + idle);
        }
        let last = self.born + Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed));
        let at = last + idle;
        (at > tokio::time::Instant::now()).then_some(at)
    }
}

/// One request in flight on a connection, from the moment the service is
/// called until its answer's body is dropped, or until the handler is
/// dropped (an HTTP/2 stream reset mid-request): either way it ends, or the
/// connection would never count as idle again.
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn start(state: &Arc<ConnState>) -> InFlight {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

pin_project_lite::pin_project! {
    /// An answer's body that tells its connection when it is done.
    struct Tracked {
        #[pin]
        inner: Body,
        _in_flight: InFlight,
    }
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = body::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, body::BoxError>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// How long, and how much, a lingering close reads after the answer.
const LINGER_TIME: Duration = Duration::from_secs(5);
const LINGER_BYTES: u64 = 64 * 1024 * 1024;

/// The connection's IO as hyper sees it. Three jobs:
///
/// - Fails reads while a new connection has not yet sent enough to pick its
///   protocol (the 24-byte HTTP/2 preface, or a first byte that is not its
///   `P`) within the header read timeout. hyper-util's protocol detection
///   waits forever, and hyper's own header timeout only starts after it, so
///   a client that completes TLS and then sends nothing would otherwise hold
///   one of `max_connections` for good.
/// - Gives hyper's own HTTP/1 error answers (400 unparsable request, 414,
///   431), which have empty bodies, sidekey's JSON error shape. They are the
///   only answers written while no request is in flight.
/// - Lingering close: when an answer went out before the request body was
///   read (a 413), the socket is read and discarded for a while after
///   hyper is done with it, as nginx does. Closing with unread data would
///   send a reset, and a client still writing its body would see a broken
///   pipe instead of the answer.
struct ConnIo<I: tokio::io::AsyncRead + Unpin + Send + 'static> {
    io: Option<I>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    seen: usize,
    state: Arc<ConnState>,
    /// A rewritten error answer still to be written: bytes and how far.
    replacement: Option<(&'static [u8], usize)>,
}

impl<I: tokio::io::AsyncRead + Unpin + Send + 'static> ConnIo<I> {
    fn new(io: I, limit: Duration, state: Arc<ConnState>) -> Self {
        ConnIo {
            io: Some(io),
            deadline: Some(Box::pin(tokio::time::sleep(limit))),
            seen: 0,
            state,
            replacement: None,
        }
    }

    fn io(&mut self) -> Pin<&mut I> {
        Pin::new(self.io.as_mut().expect("IO present until drop"))
    }
}

/// hyper's own error answer at the start of `buf`, as sidekey's JSON error.
fn rewrite_hyper_error(buf: &[u8]) -> Option<&'static [u8]> {
    let rest = buf.strip_prefix(b"HTTP/1.")?;
    let code = rest.get(2..5)?;
    static ANSWERS: std::sync::OnceLock<[Vec<u8>; 3]> = std::sync::OnceLock::new();
    let answers = ANSWERS.get_or_init(|| {
        [
            ApiError::BadRequest(
                "The request could not be parsed as HTTP/1.1 (bad request line or header).".into(),
            ),
            ApiError::UriTooLong,
            ApiError::HeadersTooLarge,
        ]
        .map(raw_error_answer)
    });
    match code {
        b"400" => Some(&answers[0]),
        b"414" => Some(&answers[1]),
        b"431" => Some(&answers[2]),
        _ => None,
    }
}

fn contains_ci(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

/// An error answer as the bytes of an HTTP/1.1 response that closes the
/// connection.
fn raw_error_answer(e: ApiError) -> Vec<u8> {
    let resp = e.into_response();
    let (parts, b) = resp.into_parts();
    let body = b
        .collect()
        .now_or_never()
        .and_then(Result::ok)
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    for (k, v) in &parts.headers {
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(
        format!(
            "content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(&body);
    out
}

impl<I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> ConnIo<I> {
    /// Writes what is left of a rewritten answer.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while let Some((bytes, at)) = self.replacement {
            if at >= bytes.len() {
                self.replacement = None;
                break;
            }
            let n = std::task::ready!(self.io().poll_write(cx, &bytes[at..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.replacement = Some((bytes, at + n));
        }
        Poll::Ready(Ok(()))
    }

    /// Swallows hyper's own error answer if `buf` is one, queueing
    /// sidekey's in its place. An answer from the service passes: its head
    /// is the first HTTP/1 head written after it was produced.
    fn intercept(&mut self, buf: &[u8]) -> bool {
        if !buf.starts_with(b"HTTP/1.") {
            return false;
        }
        let due = &self.state.heads_due;
        if due
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            return false;
        }
        // hyper's own answers are a bare head: no body, no content type.
        if buf.len() > 512 || !buf.ends_with(b"\r\n\r\n") || contains_ci(buf, b"content-type:") {
            return false;
        }
        match rewrite_hyper_error(buf) {
            Some(answer) => {
                self.replacement = Some((answer, 0));
                // The client may still be sending what hyper refused.
                self.state.linger.store(true, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

impl<I: tokio::io::AsyncRead + Unpin + Send + 'static> tokio::io::AsyncRead for ConnIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.deadline.is_none() {
            return this.io().poll_read(cx, buf);
        }
        let before = buf.filled().len();
        match this.io().poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                let h1 = this.seen == 0 && new.first().is_some_and(|b| *b != b'P');
                this.seen += new.len();
                if h1 || this.seen >= 24 {
                    // HTTP/1: hyper's header read timeout takes over; HTTP/2:
                    // the idle timeout does.
                    this.deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match this.deadline.as_mut().map(|d| d.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no request within the header read timeout",
                ))),
                _ => Poll::Pending,
            },
            other => other,
        }
    }
}

impl<I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> tokio::io::AsyncWrite
    for ConnIo<I>
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.poll_replacement(cx))?;
        if self.intercept(buf) {
            let _ = self.poll_replacement(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        self.io().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.poll_replacement(cx))?;
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            if self.intercept(first) {
                let _ = self.poll_replacement(cx)?;
                return Poll::Ready(Ok(first.len()));
            }
        }
        self.io().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_replacement(cx))?;
        self.io().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_replacement(cx))?;
        self.io().poll_shutdown(cx)
    }
}

impl<I: tokio::io::AsyncRead + Unpin + Send + 'static> Drop for ConnIo<I> {
    fn drop(&mut self) {
        if !self.state.linger.load(Ordering::Relaxed) {
            return;
        }
        let (Some(mut io), Ok(rt)) = (self.io.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        rt.spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 16 * 1024];
            let mut n: u64 = 0;
            let _ = tokio::time::timeout(LINGER_TIME, async {
                while let Ok(k) = io.read(&mut buf).await {
                    n += k as u64;
                    if k == 0 || n > LINGER_BYTES {
                        break;
                    }
                }
            })
            .await;
        });
    }
}

/// Resolves on SIGINT or SIGTERM (Kubernetes sends SIGTERM).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

#[cfg(test)]
mod future_size {
    use super::*;

    /// The request's future is moved into hyper's connection state for
    /// every request, so its size is copied each time. Cold routes and cold
    /// paths (admin, webhooks, OAuth, refreshes, store reads on a cache
    /// miss, connects) are boxed to keep it small: 10.8 KiB before, about
    /// 4 KiB after (debug build; the bound leaves room for compiler
    /// changes).
    #[test]
    fn a_requests_future_stays_small() {
        fn size<Fut>(
            _: impl Fn(&'static Arc<App>, Role, Request<Incoming>, &'static AtomicBool) -> Fut,
        ) -> usize {
            std::mem::size_of::<Fut>()
        }
        let n = size(route);
        assert!(
            n <= 6 * 1024,
            "a request's future is {n} bytes; box the cold path that grew it"
        );
    }
}
