//! The agent workers: one current-thread runtime per core, each accepting
//! on a copy of the agent socket, and the balance that moves a new
//! connection to the worker holding the fewest.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::accounting::{Counted, WorkerHold};
use super::conn::spawn_connection;
use super::listen::accept;
use super::{Role, Shared};

/// Threads serving the agent listener, one current-thread runtime each:
/// `SIDEKEY_AGENT_THREADS`, by default one per core; `0` serves it on the
/// caller's runtime instead.
pub(super) fn agent_threads() -> usize {
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
pub(super) fn spawn_worker(
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
pub(super) struct Balance {
    workers: Vec<(
        prometheus_client::metrics::gauge::Gauge,
        tokio::sync::mpsc::UnboundedSender<Handoff>,
    )>,
}

/// An accepted connection on its way to another worker.
pub(super) struct Handoff {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
    counted: Counted,
}

impl Balance {
    pub(super) fn new(
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
