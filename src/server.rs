//! Listeners, TLS, routing and graceful shutdown.
//!
//! `run` takes already-bound listeners and a shutdown future, so tests can
//! start the real server on `127.0.0.1:0` and stop it when they like. The
//! agent-facing listener speaks HTTPS (HTTP/1.1 and HTTP/2 by ALPN); the
//! admin listener speaks plain HTTP on loopback.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::app::App;
use crate::body::{self, Body};
use crate::error::{ApiError, Fatal};

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
    pub async fn for_config(cfg: &crate::config::Config) -> Result<Listeners, Fatal> {
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
        // Also bounds how long an idle keep-alive connection is kept.
        .header_read_timeout(Duration::from_secs(cfg.header_read_timeout_secs))
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
    let builder = Arc::new(builder);
    let acceptor = tls.map(TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    let draining = Arc::new(AtomicBool::new(false));
    let agent_slots = Arc::new(Semaphore::new(cfg.max_connections));
    let admin_slots = Arc::new(Semaphore::new(256));
    let handshake_timeout = Duration::from_secs(cfg.tls_handshake_timeout_secs);
    let first_bytes_timeout = Duration::from_secs(cfg.header_read_timeout_secs);

    tokio::pin!(shutdown);
    loop {
        let (stream, peer, role) = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            r = accept(&listeners.agent, &agent_slots) => match r {
                Some((s, p, permit)) => { (s, p, (Role::Agent, permit)) }
                None => continue,
            },
            r = accept(&listeners.admin, &admin_slots) => match r {
                Some((s, p, permit)) => { (s, p, (Role::Admin, permit)) }
                None => continue,
            },
            r = accept_optional(listeners.metrics.as_ref(), &admin_slots) => match r {
                Some((s, p, permit)) => { (s, p, (Role::Metrics, permit)) }
                None => continue,
            },
        };
        let (role, permit) = role;
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let acceptor = acceptor.clone();
        let draining = draining.clone();
        tokio::spawn(async move {
            let _permit = permit;
            app.metrics.connection_opened();
            let svc_app = app.clone();
            let svc = service_fn(move |req: Request<Incoming>| {
                let app = svc_app.clone();
                let draining = draining.clone();
                async move {
                    let resp = std::panic::AssertUnwindSafe(route(&app, role, req, &draining))
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|_| {
                            tracing::error!("request handler panicked");
                            ApiError::Internal.into_response()
                        });
                    // Counted where every answer passes: the store error can
                    // surface in any handler.
                    if resp
                        .headers()
                        .get("x-sidekey-error")
                        .is_some_and(|v| v == "store_unavailable")
                    {
                        app.metrics.store_unavailable();
                    }
                    Ok::<_, Infallible>(resp)
                }
            });
            match (role, acceptor) {
                (Role::Agent, Some(acc)) => {
                    match tokio::time::timeout(handshake_timeout, acc.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let conn = builder
                                .serve_connection(
                                    TokioIo::new(FirstBytes::new(tls, first_bytes_timeout)),
                                    svc,
                                )
                                .into_owned();
                            if let Err(e) = watcher.watch(conn).await {
                                tracing::debug!(%peer, error = %e, "connection ended with an error");
                            }
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
                _ => {
                    let conn = builder
                        .serve_connection(
                            TokioIo::new(FirstBytes::new(stream, first_bytes_timeout)),
                            svc,
                        )
                        .into_owned();
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
            }
            app.metrics.connection_closed();
        });
    }

    draining.store(true, Ordering::SeqCst);
    drop(listeners);
    let grace = Duration::from_secs(app.config.server.shutdown_grace_secs);
    tracing::info!(
        in_flight_connections = graceful.count(),
        grace_secs = grace.as_secs(),
        "shutting down: no longer accepting, draining"
    );
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; closing remaining connections");
    }
    app.audit.sync().await;
    match app.store.flush().await {
        Ok(()) => tracing::info!("store flushed; bye"),
        Err(e) => tracing::error!(error = %e, "final store flush failed"),
    }
}

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
        } else if let Err(e) = app.store.ready().await {
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
    match role {
        Role::Admin => crate::admin::handle(app, req).await,
        Role::Agent => route_agent(app, req).await,
        Role::Metrics if path == "/metrics" && req.method() == Method::GET => {
            crate::admin::metrics(app).await
        }
        Role::Metrics => {
            ApiError::NotFound("This listener serves /metrics, /healthz and /readyz only.".into())
                .into_response()
        }
    }
}

async fn route_agent(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    if path.starts_with("/v1/proxy/") || path == "/v1/proxy" {
        return crate::proxy::handle(app, req).await;
    }
    if let Some(provider) = path.strip_prefix("/v1/call/") {
        if method != Method::POST {
            return ApiError::MethodNotAllowed.into_response();
        }
        let provider = provider.to_owned();
        return crate::proxy::handle_call(app, req, &provider).await;
    }
    // ---- connect page (issue 14): /connect/<ticket>[/connect|/disconnect], CSS
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
            return crate::oauth::callback(app, req, &provider).await;
        }
    }
    let is_post = method == Method::POST;
    match path.as_str() {
        "/v1/session/refresh" if is_post => crate::proxy::refresh_tool(app, req).await,
        "/v1/elevenlabs/conversation-init" if is_post => {
            crate::elevenlabs::conversation_init(app, req).await
        }
        "/v1/elevenlabs/post-call" if is_post => crate::elevenlabs::post_call(app, req).await,
        "/v1/session/refresh" | "/v1/elevenlabs/conversation-init" | "/v1/elevenlabs/post-call" => {
            ApiError::MethodNotAllowed.into_response()
        }
        _ => ApiError::NotFound("There is no such endpoint.".into()).into_response(),
    }
}

/// Fails reads while a new connection has not yet sent enough to pick its
/// protocol (the 24-byte HTTP/2 preface, or a first byte that is not its
/// `P`) within the header read timeout. hyper-util's protocol detection
/// waits forever, and hyper's own header timeout only starts after it, so a
/// client that completes TLS and then sends nothing would otherwise hold one
/// of `max_connections` for good.
struct FirstBytes<I> {
    io: I,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    seen: usize,
    armed: bool,
}

impl<I> FirstBytes<I> {
    fn new(io: I, limit: Duration) -> Self {
        FirstBytes {
            io,
            deadline: Box::pin(tokio::time::sleep(limit)),
            seen: 0,
            armed: true,
        }
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for FirstBytes<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        if !this.armed {
            return std::pin::Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if this.seen == 0 && new.first().is_some_and(|b| *b != b'P') {
                    // HTTP/1: hyper's header read timeout takes over.
                    this.armed = false;
                }
                this.seen += new.len();
                if this.seen >= 24 {
                    this.armed = false;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no request within the header read timeout",
                ))),
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for FirstBytes<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
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
