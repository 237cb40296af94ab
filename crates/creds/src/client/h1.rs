//! sidekey's own HTTP/1.1 client exchange, run in the task that serves the
//! agent's request.
//!
//! hyper's connection-level client drives each upstream connection from a
//! task of its own: the request goes to it over a channel, the answer's head
//! comes back over another, and every body frame is one more hand-off and
//! wake-up between the two tasks. After round 3 that machinery was the
//! largest cost left on the proxy path that nginx does not pay (see
//! docs/performance.md). Here, as in nginx and pingora, the request's own
//! task writes the request, reads the answer's head, and the response body
//! reads the upstream socket when the agent's connection polls it.
//!
//! The exchange is deliberately small: requests have a buffered body and a
//! `Content-Length`; answers are framed by RFC 9112 §6.3 (no body for HEAD,
//! 1xx, 204 and 304; chunked; `Content-Length`; or until close). Interim
//! 1xx answers are skipped; trailers are read and dropped (nginx drops them
//! too). Anything malformed fails the exchange rather than guessing, and
//! an answer carries exactly one `Content-Length` (equal repeats merged,
//! different ones refused).
//!
//! One pooled connection serves many users in turn, so no byte of one
//! exchange may ever reach another. A connection goes back to the pool only
//! when the exchange is provably in sync, which means all of:
//!
//! - the request had no body. An upstream that answers before reading a
//!   body and then reads that body as a request of its own is
//!   indistinguishable, from this side, from one that read it first: on
//!   loopback or a fast link the whole request is written before the
//!   upstream has looked at it, and an answer to a request smuggled in the
//!   body can be held back by Nagle's algorithm until the next user's
//!   request is on the wire. Nothing but not reusing the connection rules
//!   that out (RFC 9112 §9.6's early answer is the case a write notices);
//! - the request was written whole before any answer began;
//! - the answer had a body framed by `Content-Length` or chunked encoding,
//!   and no `Transfer-Encoding` next to a `Content-Length`: an answer with
//!   no body (to HEAD, 204, 304) is where upstreams put bytes nobody
//!   framed, so such a connection is not reused at all, and neither is one
//!   that sent an interim (1xx) answer, which sidekey never asks for;
//! - the body ended exactly at its framing: nothing read past it, and
//!   nothing the runtime has seen arrive when the connection is checked in;
//! - at checkout, the kernel has nothing to read on the socket (one
//!   non-blocking peek).

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Uri};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::Headers;
use sidekey_base::errors::BoxError;

mod framing;
use framing::{BodyError, BodyState, Head, Step, take_head};
pub use framing::{ReadAnswer, read_answer};

/// An answer's head (status line and headers) may be at most this large;
/// hyper's client allowed the same (its `max_buf_size`).
const MAX_HEAD: usize = 256 * 1024;
/// At most this many headers in an answer (hyper's default).
const MAX_HEADERS: usize = 100;
/// A chunk-size line (with extensions) may be at most this long.
const MAX_CHUNK_LINE: usize = 4096;
/// Trailers are read and dropped, up to this much.
const MAX_TRAILERS: usize = 64 * 1024;
/// Read buffer growth: enough for a typical JSON answer in one read.
const READ_CHUNK: usize = 16 * 1024;
/// Bodies up to this size are copied behind the head and written in one
/// call; larger ones are written after it.
const COALESCE_BODY: usize = 16 * 1024;

/// The upstream socket: plain TCP, or TLS over it.
pub(crate) enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An HTTP/1.1 connection to an upstream, and what was read from it but
/// not yet consumed.
pub(crate) struct Conn {
    io: Io,
    buf: BytesMut,
    /// The request being written; kept between requests (heads are alike).
    out: Vec<u8>,
    /// The `Host` header's value: a connection serves one origin, so it is
    /// worked out once, not parsed out of each request's URI.
    host: Box<[u8]>,
    /// Whether the exchange under way can still leave the connection
    /// reusable: not after a request body, a request an answer cut short,
    /// or an interim answer (see the module's rule).
    in_sync: bool,
}

impl Conn {
    /// A connection to `target`'s origin.
    pub(crate) fn new(io: Io, target: &Uri) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            out: Vec::new(),
            host: host_value(target).into_boxed_slice(),
            in_sync: true,
        }
    }

    /// Whether the connection can go back to the pool after an answer that
    /// ended at its framing: nothing read past it, and nothing that the
    /// runtime has seen arrive since. This look costs no system call; the
    /// checkout asks the kernel ([`Conn::idle_and_open`]).
    fn quiet(&mut self) -> bool {
        self.buf.is_empty() && self.poll_nothing()
    }

    /// Whether an idle connection can take a request: the upstream has
    /// neither closed it nor sent anything unasked. hyper's connection task
    /// noticed a close by always reading; an idle connection here has no
    /// task, so checkout looks once, without waiting, and asks the kernel
    /// too: the runtime learns of bytes that arrived only when it next
    /// polls for events, which a busy worker may not have done yet.
    pub(crate) fn idle_and_open(&mut self) -> bool {
        if !self.quiet() {
            return false;
        }
        let tcp = match &self.io {
            Io::Plain(s) => s,
            Io::Tls(s) => s.get_ref().0,
        };
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        // WouldBlock: nothing to read and still open. For TLS the look
        // above has let rustls take what it could (a session ticket); a
        // record still waiting in the kernel is something unasked too.
        matches!(
            socket2::SockRef::from(tcp).peek(&mut probe),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        )
    }

    /// Polls the socket once without waiting: whether it had nothing to
    /// give (neither bytes nor a close).
    fn poll_nothing(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut probe = [0u8; 1];
        let mut rb = ReadBuf::new(&mut probe);
        // Pending: nothing to read, still open. A TLS session ticket is
        // consumed by rustls and also ends in Pending.
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut rb)
            .is_pending()
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }
}

/// Why an exchange failed before the answer's head was complete.
#[derive(Debug)]
pub enum ExchangeError {
    /// Writing the request failed.
    Write(io::Error),
    /// Reading the answer failed, or the upstream closed first.
    Read {
        error: io::Error,
        /// No byte of an answer had arrived (a reused connection that went
        /// away: safe to retry an idempotent request).
        nothing_read: bool,
    },
    /// The answer's head is not valid HTTP/1.x.
    Parse(&'static str),
}

impl fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExchangeError::Write(_) => f.write_str("cannot write the request upstream"),
            ExchangeError::Read { .. } => f.write_str("cannot read the upstream's answer"),
            ExchangeError::Parse(why) => write!(f, "invalid answer from the upstream: {why}"),
        }
    }
}

impl ExchangeError {
    /// Whether the request may go once more on a fresh connection, when
    /// this happened on a reused one: it was not (completely) sent, or it
    /// is idempotent and no byte of an answer came back.
    pub(crate) fn retryable(&self, method: &Method) -> bool {
        match self {
            ExchangeError::Write(_) => true,
            ExchangeError::Read {
                nothing_read: true, ..
            } => idempotent(method),
            _ => false,
        }
    }
}

impl std::error::Error for ExchangeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ExchangeError::Write(e) | ExchangeError::Read { error: e, .. } => Some(e),
            ExchangeError::Parse(_) => None,
        }
    }
}

/// Writes the request in origin-form with `Host` (unless the caller set
/// one), `credential` after the caller's headers (replacing any of the
/// same name), and a `Content-Length` for any body. Stops early, without
/// an error, when the upstream's final answer begins first; the
/// connection then ends with this exchange.
pub(crate) async fn write_request(
    conn: &mut Conn,
    method: &Method,
    target: &Uri,
    headers: Headers<'_>,
    credential: Option<&(HeaderName, HeaderValue)>,
    body: &Bytes,
) -> io::Result<()> {
    // A body is where a request smuggled for the upstream would ride
    // (see the module's rule): the connection ends with this exchange.
    conn.in_sync = body.is_empty();
    let mut out = std::mem::take(&mut conn.out);
    out.clear();
    encode_head(
        &mut out, method, target, &conn.host, headers, credential, body,
    );
    let mut written = write_unless_answered(conn, &out).await;
    if matches!(written, Ok(true)) && body.len() > COALESCE_BODY {
        written = write_unless_answered(conn, body).await;
    }
    // The head carries the injected credential: wiped before the buffer
    // waits in the pool (or is freed), so no token outlives its request
    // here. A large coalesced body is not kept for the connection's life.
    out.fill(0);
    if out.capacity() <= 4096 {
        conn.out = out;
    }
    if !written? {
        // The answer began before the rest was sent: the upstream's idea
        // of where a next request would start is unknown.
        conn.in_sync = false;
        return Ok(());
    }
    // Plain TCP: nothing buffered. TLS: pushes the records out.
    conn.io.flush().await
}

/// Writes `data` unless the upstream's final answer starts arriving
/// first; whether all of it was written. An upstream may refuse a request
/// (413, 401) before reading its body and then stop reading: without
/// this, the write would wait for room until the upstream timeout and the
/// agent would get 504 instead of the upstream's answer. Interim (1xx)
/// answers are skipped and the write goes on.
async fn write_unless_answered(conn: &mut Conn, data: &[u8]) -> io::Result<bool> {
    let mut off = 0;
    std::future::poll_fn(|cx| {
        while off < data.len() {
            match Pin::new(&mut conn.io).poll_write(cx, &data[off..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => off += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // No room: see whether the upstream has answered meanwhile.
                Poll::Pending => loop {
                    match conn.poll_fill(cx) {
                        Poll::Ready(Ok(0)) => {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the upstream closed the connection during the request",
                            )));
                        }
                        Poll::Ready(Ok(_))
                            if final_answer_started(&mut conn.buf, &mut conn.in_sync) =>
                        {
                            return Poll::Ready(Ok(false));
                        }
                        Poll::Ready(Ok(_)) => {}
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return Poll::Pending,
                    }
                },
            }
        }
        Poll::Ready(Ok(true))
    })
    .await
}

/// Drops complete interim (1xx) heads off the front of `buf` (clearing
/// `in_sync`), and says whether what is left begins a final answer (or
/// something that is not an HTTP/1 answer at all, which `read_head` then
/// reports). Too few bytes to tell, or an interim head still arriving: not
/// yet.
fn final_answer_started(buf: &mut BytesMut, in_sync: &mut bool) -> bool {
    loop {
        let Some(line) = buf.get(..10) else {
            return false;
        };
        if !line.starts_with(b"HTTP/1.") || line[9] != b'1' {
            return true;
        }
        match buf.get(9..12) {
            None => return false,
            Some(b"101") => return true,
            Some(_) => {}
        }
        match buf.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(end) => {
                let _ = buf.split_to(end + 4);
                *in_sync = false;
            }
            None => return false,
        }
    }
}

/// `host` is the `Host` value to send unless the caller set one (none
/// when empty).
fn encode_head(
    out: &mut Vec<u8>,
    method: &Method,
    target: &Uri,
    host: &[u8],
    headers: Headers<'_>,
    credential: Option<&(HeaderName, HeaderValue)>,
    body: &Bytes,
) {
    let replaced = credential.map(|(n, _)| n);
    let mut size = 64 + target.path().len() + target.query().map_or(0, str::len);
    for (n, v) in headers.iter().chain(credential.map(|(n, v)| (n, v))) {
        size += n.as_str().len() + v.len() + 4;
    }
    if body.len() <= COALESCE_BODY {
        size += body.len();
    }
    out.reserve(size);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    match target.path_and_query() {
        Some(pq) if !pq.as_str().is_empty() => out.extend_from_slice(pq.as_str().as_bytes()),
        _ => out.push(b'/'),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !host.is_empty() && !headers.contains_key(&header::HOST) && replaced != Some(&header::HOST) {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(host);
        out.extend_from_slice(b"\r\n");
    }
    for (n, v) in headers.iter() {
        if replaced != Some(n) {
            push_header(out, n, v);
        }
    }
    if let Some((n, v)) = credential {
        push_header(out, n, v);
    }
    if !body.is_empty() || expects_body(method) {
        out.extend_from_slice(b"content-length:");
        push_decimal(out, b' ', body.len() as u64);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if body.len() <= COALESCE_BODY {
        out.extend_from_slice(body);
    }
}

fn push_header(out: &mut Vec<u8>, n: &HeaderName, v: &HeaderValue) {
    out.extend_from_slice(n.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(v.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `target`'s host, and its port unless it is the scheme's default.
fn host_value(target: &Uri) -> Vec<u8> {
    let mut v = Vec::new();
    if let Some(host) = target.host() {
        v.extend_from_slice(host.as_bytes());
        if let Some(port) = non_default_port(target) {
            push_decimal(&mut v, b':', port.into());
        }
    }
    v
}

/// The port for `Host`, unless it is the scheme's default.
fn non_default_port(uri: &Uri) -> Option<u16> {
    let port = uri.port_u16()?;
    let secure = uri.scheme_str() == Some("https");
    match (port, secure) {
        (443, true) | (80, false) => None,
        _ => Some(port),
    }
}

/// `sep` and `n` in decimal, without a `String` per number (this runs for
/// every request).
fn push_decimal(out: &mut Vec<u8>, sep: u8, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push(sep);
    out.extend_from_slice(&digits[i..]);
}

/// Methods whose requests carry a body by convention: an empty one is
/// still announced (`Content-Length: 0`), as hyper did.
fn expects_body(m: &Method) -> bool {
    !matches!(
        *m,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
    ) && *m != Method::CONNECT
}

/// Whether a request may be sent again after an upstream connection went
/// away without answering (RFC 9110 §9.2.2).
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

/// Reads the answer's head (skipping interim 1xx answers).
pub(crate) async fn read_head(conn: &mut Conn, method: &Method) -> Result<Head, ExchangeError> {
    let mut read_any = false;
    loop {
        if let Some(head) = take_head(&mut conn.buf, method, &mut conn.in_sync)? {
            return Ok(head);
        }
        match conn.fill().await {
            Ok(0) => {
                return Err(ExchangeError::Read {
                    error: io::ErrorKind::UnexpectedEof.into(),
                    nothing_read: !read_any,
                });
            }
            Ok(_) => read_any = true,
            Err(error) => {
                return Err(ExchangeError::Read {
                    error,
                    nothing_read: !read_any,
                });
            }
        }
    }
}

/// Hands a connection whose answer was read to its end back to the pool.
pub(crate) type Checkin = fn(&Uri, Conn);

/// An answer's body, read from the upstream connection as the agent's
/// connection polls it. At its end the connection goes back to the pool if
/// the exchange left it in sync; dropped before its end, the connection is
/// closed.
pub struct Body {
    state: BodyState,
    conn: Option<Conn>,
    keep_alive: bool,
    target: Uri,
    checkin: Checkin,
}

impl Body {
    /// The body for `head` on `conn`. An answer already read whole (no
    /// body, or a short one that came with its head) needs the connection
    /// no more: it goes back to the pool at once (if in sync and nothing
    /// followed), before the agent's connection has polled anything.
    pub(crate) fn new(head: &Head, mut conn: Conn, target: Uri, checkin: Checkin) -> Body {
        let state = BodyState::for_head(head, &mut conn.buf);
        if matches!(state, BodyState::Buffered(_) | BodyState::Done) {
            if head.keep_alive && conn.quiet() {
                checkin(&target, conn);
            }
            return Body {
                state,
                conn: None,
                keep_alive: false,
                target,
                checkin,
            };
        }
        Body {
            state,
            conn: Some(conn),
            keep_alive: head.keep_alive,
            target,
            checkin,
        }
    }

    /// Whether the body is in memory already (no more reads).
    pub fn is_read(&self) -> bool {
        matches!(self.state, BodyState::Buffered(_) | BodyState::Done)
    }

    fn finish(&mut self) {
        self.state = BodyState::Done;
        if let Some(mut conn) = self.conn.take() {
            if self.keep_alive && conn.quiet() {
                (self.checkin)(&self.target, conn);
            }
        }
    }

    fn fail(&mut self, e: BodyError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        self.state = BodyState::Done;
        Poll::Ready(Some(Err(Box::new(e))))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if let BodyState::Buffered(data) = &mut this.state {
                let data = std::mem::take(data);
                this.state = BodyState::Done;
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.state.step(&mut conn.buf) {
                Err(e) => return this.fail(e),
                Ok(Step::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::Data(d)) => {
                    // The last byte read: the connection can serve the
                    // next request while this frame is still being sent.
                    if matches!(this.state, BodyState::Length(0)) {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Ok(Step::NeedMore) => {}
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) => match this.state.at_close() {
                    Ok(()) => {
                        this.conn = None;
                        this.state = BodyState::Done;
                        return Poll::Ready(None);
                    }
                    Err(e) => return this.fail(e),
                },
                Ok(_) => {}
                Err(e) => return this.fail(BodyError::Io(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done | BodyState::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            BodyState::Buffered(b) => SizeHint::with_exact(b.len() as u64),
            BodyState::Length(n) => SizeHint::with_exact(*n),
            BodyState::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests;
