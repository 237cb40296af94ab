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

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, Version};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::Headers;
use crate::body::BoxError;

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

/// How the answer's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

/// The answer's head, and how to read its body.
pub(crate) struct Head {
    pub(crate) parts: http::response::Parts,
    framing: Framing,
    /// Whether the connection may serve another request once the body has
    /// ended exactly at its framing (the module's rule).
    keep_alive: bool,
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

/// Takes the final answer's head off the front of `buf`, dropping interim
/// answers before it (which clear `in_sync`); `None` while more bytes are
/// needed. The head is not reusable unless the exchange is still in sync.
fn take_head(
    buf: &mut BytesMut,
    method: &Method,
    in_sync: &mut bool,
) -> Result<Option<Head>, ExchangeError> {
    while !buf.is_empty() {
        match parse_head(buf, method)? {
            Some(Parsed::Interim) => *in_sync = false,
            Some(Parsed::Final(mut head)) => {
                head.keep_alive &= *in_sync;
                return Ok(Some(head));
            }
            None if buf.len() >= MAX_HEAD => {
                return Err(ExchangeError::Parse("the answer's head is too large"));
            }
            None => return Ok(None),
        }
    }
    Ok(None)
}

enum Parsed {
    Interim,
    Final(Head),
}

/// Parses a complete head off the front of `buf`; `None` when more bytes
/// are needed.
fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Parsed>, ExchangeError> {
    // Uninitialised slots: zeroing 100 of them (3.2 KiB) for every answer
    // cost more than parsing a typical head.
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, buf, &mut slots);
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ExchangeError::Parse("too many headers"));
        }
        Err(_) => return Err(ExchangeError::Parse("malformed status line or header")),
    };
    // However the head arrived: one read or many (a partial head this
    // large is refused by `take_head`).
    if len > MAX_HEAD {
        return Err(ExchangeError::Parse("the answer's head is too large"));
    }
    let code = res.code.unwrap_or(0);
    let version = match res.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // Header positions in `buf`, so the values can share the head's bytes
    // once it is split off (no copy per header, no list on the heap).
    let base = buf.as_ptr() as usize;
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let count = res.headers.len();
    for (span, h) in spans.iter_mut().zip(res.headers.iter()) {
        // A head is at most MAX_HEAD (256 KiB) plus one read: offsets fit.
        let name = (h.name.as_ptr() as usize - base) as u32;
        let value = (h.value.as_ptr() as usize - base) as u32;
        *span = (
            name,
            name + h.name.len() as u32,
            value,
            value + h.value.len() as u32,
        );
    }
    let head = buf.split_to(len).freeze();
    if (100..200).contains(&code) {
        if code == 101 {
            return Err(ExchangeError::Parse("unexpected protocol switch"));
        }
        return Ok(Some(Parsed::Interim));
    }
    let status =
        StatusCode::from_u16(code).map_err(|_| ExchangeError::Parse("invalid status code"))?;
    let mut headers = HeaderMap::with_capacity(count);
    for &(n0, n1, v0, v1) in &spans[..count] {
        let (n0, n1, v0, v1) = (n0 as usize, n1 as usize, v0 as usize, v1 as usize);
        let name = HeaderName::from_bytes(&head[n0..n1])
            .map_err(|_| ExchangeError::Parse("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(v0..v1))
            .map_err(|_| ExchangeError::Parse("invalid header value"))?;
        headers.append(name, value);
    }
    let length = content_length(&mut headers)?;
    let chunked_or_coded = headers.contains_key(header::TRANSFER_ENCODING);
    let framing = framing(method, status, &headers, length);
    if chunked_or_coded {
        // Transfer-Encoding overrides Content-Length (RFC 9112 §6.3); a
        // length passed on next to a decoded body would misframe the
        // answer to the agent.
        headers.remove(header::CONTENT_LENGTH);
    }
    // No body: where an upstream puts bytes nobody framed (a body for a
    // HEAD, after a 204 or 304). Both framings: the upstream and sidekey
    // may disagree on where the answer ends (RFC 9112 §6.3 calls it an
    // error). Either way the connection ends with this answer.
    let bodyless = *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let keep_alive = version == Version::HTTP_11
        && framing != Framing::UntilClose
        && !bodyless
        && !(chunked_or_coded && length.is_some())
        && !connection_close(&headers);
    let mut resp = http::Response::new(());
    *resp.status_mut() = status;
    *resp.version_mut() = version;
    *resp.headers_mut() = headers;
    let (parts, ()) = resp.into_parts();
    Ok(Some(Parsed::Final(Head {
        parts,
        framing,
        keep_alive,
    })))
}

/// The answer's `Content-Length`, if it has one. Repeats of one value (two
/// headers, or a list `5, 5`) are one length, and the header is left with
/// that one value so the agent gets exactly one; different values are no
/// answer at all (RFC 9112 §6.3).
fn content_length(h: &mut HeaderMap) -> Result<Option<u64>, ExchangeError> {
    let mut length: Option<u64> = None;
    let mut values = 0;
    let mut listed = false;
    for v in h.get_all(header::CONTENT_LENGTH) {
        values += 1;
        let v = v
            .to_str()
            .map_err(|_| ExchangeError::Parse("invalid content-length"))?;
        for part in v.split(',') {
            listed |= part.len() != v.len();
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ExchangeError::Parse("invalid content-length"));
            }
            let n: u64 = part
                .parse()
                .map_err(|_| ExchangeError::Parse("invalid content-length"))?;
            match length {
                Some(m) if m != n => {
                    return Err(ExchangeError::Parse("conflicting content-length values"));
                }
                _ => length = Some(n),
            }
        }
    }
    if let (Some(n), true) = (length, values > 1 || listed) {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    Ok(length)
}

/// RFC 9112 §6.3, for a client.
fn framing(method: &Method, status: StatusCode, h: &HeaderMap, length: Option<u64>) -> Framing {
    if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Framing::Length(0);
    }
    if h.contains_key(header::TRANSFER_ENCODING) {
        let last = h
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|c| !c.is_empty());
        return match last {
            Some(c) if c.eq_ignore_ascii_case("chunked") => Framing::Chunked,
            // Any other final coding: the body ends when the connection does.
            _ => Framing::UntilClose,
        };
    }
    match length {
        Some(n) => Framing::Length(n),
        None => Framing::UntilClose,
    }
}

fn connection_close(h: &HeaderMap) -> bool {
    h.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("close"))
}

/// Where the chunked decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes to go.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines (dropped), this many bytes so far.
    Trailers(usize),
}

/// What the next step of reading a body produced.
enum Step {
    Data(Bytes),
    NeedMore,
    End,
}

/// Decodes what `buf` holds of a chunked body.
fn decode_chunked(state: &mut Chunk, buf: &mut BytesMut) -> Result<Step, BodyError> {
    loop {
        match *state {
            Chunk::Size => {
                let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
                    if buf.len() > MAX_CHUNK_LINE {
                        return Err(BodyError::Chunked("chunk-size line too long"));
                    }
                    return Ok(Step::NeedMore);
                };
                // Refused however the line arrived, in one read or many.
                if nl > MAX_CHUNK_LINE {
                    return Err(BodyError::Chunked("chunk-size line too long"));
                }
                let line = buf.split_to(nl + 1);
                let line = line.strip_suffix(b"\n").unwrap_or(&line);
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let size = line.split(|&b| b == b';').next().unwrap_or_default();
                let size = size.trim_ascii();
                if size.is_empty() || size.len() > 16 || !size.iter().all(u8::is_ascii_hexdigit) {
                    return Err(BodyError::Chunked("invalid chunk size"));
                }
                let n = size
                    .iter()
                    .fold(0u64, |acc, &b| (acc << 4) | u64::from(hex(b)));
                *state = if n == 0 {
                    Chunk::Trailers(0)
                } else {
                    Chunk::Data(n)
                };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                let take = left.min(buf.len() as u64) as usize;
                let data = buf.split_to(take).freeze();
                *state = if take as u64 == left {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left - take as u64)
                };
                return Ok(Step::Data(data));
            }
            Chunk::DataEnd => match buf.first() {
                None => return Ok(Step::NeedMore),
                Some(b'\n') => {
                    buf.advance(1);
                    *state = Chunk::Size;
                }
                Some(b'\r') => match buf.get(1) {
                    None => return Ok(Step::NeedMore),
                    Some(b'\n') => {
                        buf.advance(2);
                        *state = Chunk::Size;
                    }
                    Some(_) => return Err(BodyError::Chunked("chunk data not followed by CRLF")),
                },
                Some(_) => return Err(BodyError::Chunked("chunk data not followed by CRLF")),
            },
            Chunk::Trailers(seen) => {
                let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
                    if seen + buf.len() > MAX_TRAILERS {
                        return Err(BodyError::Chunked("trailers too large"));
                    }
                    return Ok(Step::NeedMore);
                };
                let line = buf.split_to(nl + 1);
                if line.as_ref() == b"\r\n" || line.as_ref() == b"\n" {
                    return Ok(Step::End);
                }
                if seen + line.len() > MAX_TRAILERS {
                    return Err(BodyError::Chunked("trailers too large"));
                }
                *state = Chunk::Trailers(seen + line.len());
            }
        }
    }
}

fn hex(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

/// Why a body read from the upstream ended early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("the upstream closed the connection before the body was complete")]
    Incomplete,
    #[error("reading the upstream body failed")]
    Io(#[source] io::Error),
    #[error("invalid chunked body from the upstream: {0}")]
    Chunked(&'static str),
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

enum BodyState {
    /// The whole body, read with the head.
    Buffered(Bytes),
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

impl BodyState {
    /// How to read `head`'s body, given what `buf` already holds after the
    /// head: a body already there whole is taken off `buf` at once.
    fn for_head(head: &Head, buf: &mut BytesMut) -> BodyState {
        match head.framing {
            Framing::Length(0) => BodyState::Done,
            Framing::Length(n) if buf.len() as u64 >= n => {
                BodyState::Buffered(buf.split_to(n as usize).freeze())
            }
            Framing::Length(n) => BodyState::Length(n),
            Framing::Chunked => BodyState::Chunked(Chunk::Size),
            Framing::UntilClose => BodyState::UntilClose,
        }
    }

    /// The next step of a body still on the connection, from what `buf`
    /// holds.
    fn step(&mut self, buf: &mut BytesMut) -> Result<Step, BodyError> {
        match self {
            BodyState::Buffered(_) | BodyState::Done => Ok(Step::End),
            BodyState::Length(left) => {
                if buf.is_empty() {
                    Ok(Step::NeedMore)
                } else {
                    let take = (*left).min(buf.len() as u64) as usize;
                    *left -= take as u64;
                    Ok(Step::Data(buf.split_to(take).freeze()))
                }
            }
            BodyState::Chunked(chunk) => decode_chunked(chunk, buf),
            BodyState::UntilClose => {
                if buf.is_empty() {
                    Ok(Step::NeedMore)
                } else {
                    Ok(Step::Data(buf.split().freeze()))
                }
            }
        }
    }

    /// What the upstream closing the connection means here: the end of an
    /// until-close body, anything else broken off.
    fn at_close(&self) -> Result<(), BodyError> {
        match self {
            BodyState::UntilClose => Ok(()),
            _ => Err(BodyError::Incomplete),
        }
    }
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

/// One answer read from a byte stream by the exchange's own parser and
/// body decoder, without a socket: what the fuzz target
/// (`fuzz/fuzz_targets/h1_framing.rs`) checks. Not an API.
#[doc(hidden)]
#[derive(Debug, PartialEq, Eq)]
pub struct ReadAnswer {
    pub status: u16,
    /// The headers passed on to the agent, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// The body ended at its framing (or, until close, at the close).
    pub ended: bool,
    /// Whether the connection would go back to the pool (before the
    /// socket checks, which need a socket).
    pub reusable: bool,
    /// Bytes read past the answer's end.
    pub leftover: usize,
    /// An interim (1xx) answer came first.
    pub interim: bool,
}

/// Reads one answer to a `method` request (with a body or not) from
/// `pieces`, fed one at a time as reads would deliver them; `closed`: the
/// upstream closed the connection after the last piece. Drives the same
/// functions as an exchange on a socket. Not an API.
#[doc(hidden)]
pub fn read_answer(
    method: &str,
    request_had_body: bool,
    pieces: &[&[u8]],
    closed: bool,
) -> Result<ReadAnswer, String> {
    let method = Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
    let mut buf = BytesMut::new();
    let mut pieces = pieces.iter();
    let mut in_sync = true;
    let head = loop {
        if let Some(h) = take_head(&mut buf, &method, &mut in_sync).map_err(|e| e.to_string())? {
            break h;
        }
        match pieces.next() {
            Some(p) => buf.extend_from_slice(p),
            None => return Err("the upstream closed before the answer's head".into()),
        }
    };
    let mut state = BodyState::for_head(&head, &mut buf);
    let mut body = Vec::new();
    let ended = loop {
        if let BodyState::Buffered(d) = &state {
            body.extend_from_slice(d);
            state = BodyState::Done;
        }
        if matches!(state, BodyState::Done) {
            break true;
        }
        match state.step(&mut buf).map_err(|e| e.to_string())? {
            Step::End => break true,
            Step::Data(d) => {
                body.extend_from_slice(&d);
                if matches!(state, BodyState::Length(0)) {
                    break true;
                }
            }
            Step::NeedMore => match pieces.next() {
                Some(p) => buf.extend_from_slice(p),
                None if closed => {
                    state.at_close().map_err(|e| e.to_string())?;
                    break true;
                }
                None => break false,
            },
        }
    };
    let mut leftover = buf.len();
    for p in pieces {
        leftover += p.len();
    }
    Ok(ReadAnswer {
        status: head.parts.status.as_u16(),
        headers: head
            .parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect(),
        body,
        ended,
        reusable: head.keep_alive && !request_had_body && ended && leftover == 0,
        leftover,
        interim: !in_sync,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(method: &Method, target: &Uri, headers: &HeaderMap, body: &Bytes) -> Vec<u8> {
        let mut out = Vec::new();
        let host = host_value(target);
        encode_head(
            &mut out,
            method,
            target,
            &host,
            Headers::all(headers),
            None,
            body,
        );
        out
    }

    fn head_of(raw: &[u8], method: &Method) -> Result<Option<Head>, ExchangeError> {
        let mut buf = BytesMut::from(raw);
        take_head(&mut buf, method, &mut true)
    }

    fn decode_all(raw: &[u8], split: usize) -> Result<(Vec<u8>, bool), BodyError> {
        // Fed in pieces of `split` bytes, as reads would deliver them.
        let mut state = Chunk::Size;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in raw.chunks(split.max(1)) {
            buf.extend_from_slice(piece);
            loop {
                match decode_chunked(&mut state, &mut buf)? {
                    Step::Data(d) => out.extend_from_slice(&d),
                    Step::NeedMore => break,
                    Step::End => return Ok((out, true)),
                }
            }
        }
        Ok((out, false))
    }

    #[test]
    fn requests_are_origin_form_with_host_and_length() {
        let target: Uri = "http://127.0.0.1:8080/api/items?limit=10".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("accept", HeaderValue::from_static("application/json"));
        let head = encode(&Method::GET, &target, &h, &Bytes::new());
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "GET /api/items?limit=10 HTTP/1.1\r\nhost: 127.0.0.1:8080\r\naccept: application/json\r\n\r\n"
        );

        let target: Uri = "https://slack.com".parse().unwrap();
        let body = Bytes::from_static(b"{\"a\":1}");
        let head = encode(&Method::POST, &target, &HeaderMap::new(), &body);
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "POST / HTTP/1.1\r\nhost: slack.com\r\ncontent-length: 7\r\n\r\n{\"a\":1}"
        );
        // An empty POST still says so; an empty GET does not.
        let head = encode(&Method::POST, &target, &HeaderMap::new(), &Bytes::new());
        assert!(
            String::from_utf8(head)
                .unwrap()
                .contains("content-length: 0\r\n")
        );
    }

    #[test]
    fn the_credential_goes_last_and_replaces_a_header_of_its_name() {
        let target: Uri = "http://127.0.0.1:8080/x".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("from-the-client"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        let cred = (
            HeaderName::from_static("x-api-key"),
            HeaderValue::from_static("injected"),
        );
        let mut out = Vec::new();
        encode_head(
            &mut out,
            &Method::GET,
            &target,
            &host_value(&target),
            Headers::all(&h),
            Some(&cred),
            &Bytes::new(),
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /x HTTP/1.1\r\nhost: 127.0.0.1:8080\r\naccept: */*\r\nx-api-key: injected\r\n\r\n"
        );
    }

    #[test]
    fn an_explicit_host_header_is_kept_and_large_bodies_go_separately() {
        let target: Uri = "https://api.example.com:8443/x".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("override"));
        let body = Bytes::from(vec![b'x'; COALESCE_BODY + 1]);
        let head = String::from_utf8(encode(&Method::PUT, &target, &h, &body)).unwrap();
        assert_eq!(
            head,
            format!(
                "PUT /x HTTP/1.1\r\nhost: override\r\ncontent-length: {}\r\n\r\n",
                COALESCE_BODY + 1
            )
        );
    }

    #[test]
    fn heads_are_parsed_with_their_framing() {
        let h = head_of(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{",
            &Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.parts.status, StatusCode::OK);
        assert_eq!(h.parts.headers["content-type"], "application/json");
        assert_eq!(h.framing, Framing::Length(11));
        assert!(h.keep_alive);

        // Incomplete: more bytes needed.
        assert!(
            head_of(b"HTTP/1.1 200 OK\r\nContent-Le", &Method::GET)
                .unwrap()
                .is_none()
        );

        // Interim answers are skipped.
        let h = head_of(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            &Method::POST,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.parts.status, StatusCode::NO_CONTENT);
        assert_eq!(h.framing, Framing::Length(0));
        assert!(!h.keep_alive);

        let h = head_of(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\n\r\n",
            &Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, Framing::Chunked);
        assert!(!h.parts.headers.contains_key(header::CONTENT_LENGTH));
        assert!(!h.keep_alive, "both framings: the connection ends");

        // No length: until close, and the connection is not reused.
        let h = head_of(b"HTTP/1.1 200 OK\r\n\r\n", &Method::GET)
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::UntilClose);
        assert!(!h.keep_alive);

        // HEAD answers have no body whatever they declare.
        let h = head_of(
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n",
            &Method::HEAD,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, Framing::Length(0));

        for raw in [
            &b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 1\r\n\r\n",
        ] {
            assert!(!head_of(raw, &Method::GET).unwrap().unwrap().keep_alive);
        }
    }

    #[test]
    fn bad_heads_are_refused() {
        for raw in [
            &b"garbage\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ] {
            assert!(
                head_of(raw, &Method::GET).is_err(),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        // Repeated equal lengths are one length, passed on as one value.
        for raw in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
        ] {
            let h = head_of(raw, &Method::GET).unwrap().unwrap();
            assert_eq!(h.framing, Framing::Length(3));
            let cl: Vec<_> = h
                .parts
                .headers
                .get_all(header::CONTENT_LENGTH)
                .iter()
                .collect();
            assert_eq!(cl, ["3"]);
        }
        // Conflicting lengths are refused on bodyless answers too.
        assert!(
            head_of(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                &Method::HEAD
            )
            .is_err()
        );
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(head_of(&many, &Method::GET).is_err());
    }

    #[test]
    fn chunked_bodies_decode_however_they_are_split() {
        let raw =
            b"5;ext=1\r\nhello\r\n7\r\n, world\r\nA \r\n0123456789\r\n0\r\nx-trailer: t\r\n\r\n";
        for split in [1, 2, 3, 7, 64, raw.len()] {
            let (out, ended) = decode_all(raw, split).unwrap();
            assert_eq!(out, b"hello, world0123456789", "split {split}");
            assert!(ended, "split {split}");
        }
        // Bare LF line ends are accepted.
        let (out, ended) = decode_all(b"3\nabc\n0\n\n", 2).unwrap();
        assert_eq!((out.as_slice(), ended), (&b"abc"[..], true));
        // Not yet ended.
        let (out, ended) = decode_all(b"3\r\nabc\r\n", 4).unwrap();
        assert_eq!((out.as_slice(), ended), (&b"abc"[..], false));
    }

    #[test]
    fn bad_chunked_bodies_are_errors() {
        for raw in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"11111111111111111\r\n",
            b"3\r\nabcX\r\n",
        ] {
            assert!(
                decode_all(raw, raw.len()).is_err(),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        let long = vec![b'1'; MAX_CHUNK_LINE + 1];
        assert!(decode_all(&long, long.len()).is_err());
        let mut trailers = b"0\r\n".to_vec();
        trailers.extend(std::iter::repeat_n(b'x', MAX_TRAILERS + 1));
        assert!(decode_all(&trailers, trailers.len()).is_err());
    }

    #[test]
    fn interim_answers_are_skipped_while_a_request_is_written() {
        let mut b = BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 41"[..]);
        let mut in_sync = true;
        assert!(final_answer_started(&mut b, &mut in_sync));
        assert_eq!(&b[..], b"HTTP/1.1 41");
        assert!(!in_sync, "an interim answer ends the connection's reuse");
        // Only interim heads, or too little to tell: not yet.
        for partial in [
            &b"HTTP/1.1 100 Continue\r\n\r\n"[..],
            b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n",
            b"HTTP/1.1 ",
        ] {
            let mut b = BytesMut::from(partial);
            assert!(!final_answer_started(&mut b, &mut true), "{partial:?}");
        }
        // 101 and anything that is not HTTP/1 are left for read_head to refuse.
        for odd in [&b"HTTP/1.1 101 Switching\r\n\r\n"[..], b"garbage, not HTTP"] {
            let mut b = BytesMut::from(odd);
            assert!(final_answer_started(&mut b, &mut true), "{odd:?}");
            assert_eq!(&b[..], odd);
        }
    }

    #[test]
    fn retries_only_what_is_safe() {
        let gone = || ExchangeError::Read {
            error: io::ErrorKind::UnexpectedEof.into(),
            nothing_read: true,
        };
        assert!(gone().retryable(&Method::GET));
        assert!(gone().retryable(&Method::PUT));
        assert!(!gone().retryable(&Method::POST));
        assert!(ExchangeError::Write(io::ErrorKind::BrokenPipe.into()).retryable(&Method::POST));
        let partial = ExchangeError::Read {
            error: io::ErrorKind::UnexpectedEof.into(),
            nothing_read: false,
        };
        assert!(!partial.retryable(&Method::GET));
        assert!(!ExchangeError::Parse("x").retryable(&Method::GET));
    }

    #[test]
    fn default_ports_are_left_out_of_host() {
        let target: Uri = "https://api.example.com:8443/x".parse().unwrap();
        assert_eq!(non_default_port(&target), Some(8443));
        assert_eq!(non_default_port(&"https://a:443/".parse().unwrap()), None);
        assert_eq!(non_default_port(&"http://a:80/".parse().unwrap()), None);
        assert_eq!(
            non_default_port(&"http://a:443/".parse().unwrap()),
            Some(443)
        );
        for (uri, host) in [
            ("https://api.example.com:8443/x", "api.example.com:8443"),
            ("https://api.example.com:443/x", "api.example.com"),
            ("http://[::1]:8080/", "[::1]:8080"),
            ("http://[::1]:80/", "[::1]"),
            ("http://a/", "a"),
        ] {
            let v = host_value(&uri.parse().unwrap());
            assert_eq!(std::str::from_utf8(&v).unwrap(), host, "{uri}");
        }
    }

    fn read(method: &str, body: bool, raw: &[u8]) -> ReadAnswer {
        read_answer(method, body, &[raw], false).unwrap()
    }

    #[test]
    fn only_a_bodiless_request_with_a_framed_answer_ending_exactly_is_reusable() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        assert!(read("GET", false, ok).reusable);
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
        assert!(read("GET", false, chunked).reusable);
        // A request body could have carried a request of its own.
        assert!(!read("POST", true, ok).reusable);
        // Bytes past the answer.
        let mut past = ok.to_vec();
        past.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        let r = read("GET", false, &past);
        assert!(!r.reusable);
        assert_eq!(r.leftover, 17);
        // No body: HEAD, 204, 304.
        assert!(
            !read(
                "HEAD",
                false,
                b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n"
            )
            .reusable
        );
        assert!(!read("GET", false, b"HTTP/1.1 204 No Content\r\n\r\n").reusable);
        assert!(!read("GET", false, b"HTTP/1.1 304 Not Modified\r\n\r\n").reusable);
        // An interim answer first.
        let mut interim = b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n".to_vec();
        interim.extend_from_slice(ok);
        let r = read("GET", false, &interim);
        assert!(r.interim && !r.reusable);
        assert_eq!(r.body, b"ok");
        // Both framings.
        let both = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n";
        let r = read("GET", false, both);
        assert_eq!((r.body.as_slice(), r.reusable), (&b"ok"[..], false));
        // Not ended yet, or ended by the close.
        let r = read_answer("GET", false, &[&ok[..ok.len() - 1]], false).unwrap();
        assert!(!r.ended && !r.reusable);
        assert!(read_answer("GET", false, &[&ok[..ok.len() - 1]], true).is_err());
        let r = read_answer("GET", false, &[b"HTTP/1.1 200 OK\r\n\r\nuntil close"], true).unwrap();
        assert!(r.ended && !r.reusable);
        assert_eq!(r.body, b"until close");
    }

    #[test]
    fn limits_hold_however_the_bytes_arrive() {
        // A chunk-size line over the limit, in one read and byte by byte.
        let mut raw = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1;".to_vec();
        raw.extend(std::iter::repeat_n(b'x', MAX_CHUNK_LINE));
        raw.extend_from_slice(b"\r\na\r\n0\r\n\r\n");
        assert!(read_answer("GET", false, &[&raw], false).is_err());
        let bytes: Vec<&[u8]> = raw.chunks(1).collect();
        assert!(read_answer("GET", false, &bytes, false).is_err());
        // A head over the limit, whole or in pieces.
        let mut head = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
        head.extend(std::iter::repeat_n(b'a', MAX_HEAD));
        head.extend_from_slice(b"\r\ncontent-length: 0\r\n\r\n");
        assert!(read_answer("GET", false, &[&head], false).is_err());
        let pieces: Vec<&[u8]> = head.chunks(4096).collect();
        assert!(read_answer("GET", false, &pieces, false).is_err());
    }
}
