//! What a connection counts: answers in flight (so it can tell when it is
//! idle), when it was last active, whether it has proven itself for the
//! per-IP pending limit, and whether its close must linger; and, for an
//! agent worker's connection, its place in that worker's count.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Response;

use crate::body::{self, Body};

/// Per-connection state shared by the connection task, its IO and the
/// bodies of its answers.
pub(super) struct ConnState {
    /// Answers not yet fully sent (their body not yet dropped).
    pub(super) in_flight: AtomicUsize,
    /// When the last answer ended, as ms since `born`.
    last_active_ms: AtomicU64,
    born: tokio::time::Instant,
    /// Taken (and given back as proven) on the first accepted request.
    ticket: std::sync::Mutex<Option<sidekey_base::limits::PendingTicket>>,
    proven: AtomicBool,
    /// Read what the client still sends after the close (see `ConnIo`).
    pub(super) linger: AtomicBool,
    /// Answers the service produced whose HTTP/1 head has not been seen
    /// written yet: a head written while this is 0 is hyper's own.
    pub(super) heads_due: AtomicUsize,
}

impl ConnState {
    pub(super) fn new(ticket: Option<sidekey_base::limits::PendingTicket>) -> ConnState {
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
    pub(super) fn answered(&self, resp: &Response<Body>, health: bool, has_body: bool) {
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
    pub(super) fn idle_deadline(&self, idle: Duration) -> Option<tokio::time::Instant> {
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
pub(super) struct InFlight(Arc<ConnState>);

impl InFlight {
    pub(super) fn start(state: &Arc<ConnState>) -> InFlight {
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
    pub(super) struct Tracked {
        #[pin]
        inner: Body,
        _in_flight: InFlight,
    }
}

impl Tracked {
    pub(super) fn new(inner: Body, in_flight: InFlight) -> Tracked {
        Tracked {
            inner,
            _in_flight: in_flight,
        }
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

/// One open connection in its worker's count, until dropped.
pub(super) struct Counted(pub(super) prometheus_client::metrics::gauge::Gauge);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What an agent worker's connection holds: its worker's "still busy"
/// sender and its place in the worker's count.
pub(super) struct WorkerHold {
    pub(super) _idle: tokio::sync::mpsc::Sender<()>,
    pub(super) _counted: Counted,
}
