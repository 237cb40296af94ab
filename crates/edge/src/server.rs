//! Listeners, TLS, routing and graceful shutdown.
//!
//! `run` takes already-bound listeners and a shutdown future, so tests can
//! start the real server on `127.0.0.1:0` and stop it when they like. The
//! agent-facing listener speaks HTTPS (HTTP/1.1 and HTTP/2 by ALPN); the
//! admin listener speaks plain HTTP on loopback.
//!
//! The parts, one module each: `listen` (listeners, TLS, accepting),
//! `worker` (per-core agent workers and their balance), `conn` (one
//! connection from accept to close), `accounting` (what a connection
//! counts), `conn_io` (its IO under hyper), `routing` (by listener and
//! path) and `shutdown` (the signals). This file runs them and drains.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::sync::Semaphore;

use crate::app::App;

mod accounting;
mod conn;
mod conn_io;
mod listen;
mod routing;
mod shutdown;
mod worker;

pub use listen::Listeners;
pub use shutdown::shutdown_signal;

use conn::spawn_connection;
use listen::{ADMIN_CONNECTIONS, METRICS_CONNECTIONS, Tls, accept, accept_optional};
use worker::{Balance, agent_threads, spawn_worker};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Agent,
    Admin,
    Metrics,
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
