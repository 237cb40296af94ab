//! The connection's IO under hyper: the first-bytes deadline, sidekey's
//! JSON in place of hyper's own HTTP/1 error answers, and the lingering
//! close.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use http_body_util::BodyExt;

use super::accounting::ConnState;
use crate::error::ApiError;

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
pub(super) struct ConnIo<I: tokio::io::AsyncRead + Unpin + Send + 'static> {
    io: Option<I>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    seen: usize,
    state: Arc<ConnState>,
    /// A rewritten error answer still to be written: bytes and how far.
    replacement: Option<(&'static [u8], usize)>,
}

impl<I: tokio::io::AsyncRead + Unpin + Send + 'static> ConnIo<I> {
    pub(super) fn new(io: I, limit: Duration, state: Arc<ConnState>) -> Self {
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
