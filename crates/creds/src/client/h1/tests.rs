//! Unit tests of the exchange: requests as written, answers as parsed and
//! decoded, and when a connection is reusable.

use http::StatusCode;
use http::header::HeaderMap;

use super::framing::*;
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
    let raw = b"5;ext=1\r\nhello\r\n7\r\n, world\r\nA \r\n0123456789\r\n0\r\nx-trailer: t\r\n\r\n";
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
