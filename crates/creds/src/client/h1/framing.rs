//! How an upstream's answer is read: its head (interim answers dropped,
//! one `Content-Length`), how its body is framed and decoded, and whether
//! the exchange leaves the connection reusable. No I/O here: the exchange
//! in [`super`] feeds these the bytes it reads, and so does
//! [`read_answer`] for the fuzz target.

use std::io;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

use super::{ExchangeError, MAX_CHUNK_LINE, MAX_HEAD, MAX_HEADERS, MAX_TRAILERS};

/// How the answer's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

/// The answer's head, and how to read its body.
pub(crate) struct Head {
    pub(crate) parts: http::response::Parts,
    pub(super) framing: Framing,
    /// Whether the connection may serve another request once the body has
    /// ended exactly at its framing (the module's rule).
    pub(super) keep_alive: bool,
}

/// Takes the final answer's head off the front of `buf`, dropping interim
/// answers before it (which clear `in_sync`); `None` while more bytes are
/// needed. The head is not reusable unless the exchange is still in sync.
pub(super) fn take_head(
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

pub(super) enum Parsed {
    Interim,
    Final(Head),
}

/// Parses a complete head off the front of `buf`; `None` when more bytes
/// are needed.
pub(super) fn parse_head(
    buf: &mut BytesMut,
    method: &Method,
) -> Result<Option<Parsed>, ExchangeError> {
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
pub(super) enum Chunk {
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
pub(super) enum Step {
    Data(Bytes),
    NeedMore,
    End,
}

/// Decodes what `buf` holds of a chunked body.
pub(super) fn decode_chunked(state: &mut Chunk, buf: &mut BytesMut) -> Result<Step, BodyError> {
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

pub(super) enum BodyState {
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
    pub(super) fn for_head(head: &Head, buf: &mut BytesMut) -> BodyState {
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
    pub(super) fn step(&mut self, buf: &mut BytesMut) -> Result<Step, BodyError> {
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
    pub(super) fn at_close(&self) -> Result<(), BodyError> {
        match self {
            BodyState::UntilClose => Ok(()),
            _ => Err(BodyError::Incomplete),
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
