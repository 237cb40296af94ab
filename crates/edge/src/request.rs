//! Reading request bodies: within a size and a time limit, and as the JSON
//! object an endpoint takes.

use bytes::Bytes;
use http::header;
use http_body_util::BodyExt;

use crate::error::{ApiError, json_error};

/// After refusing a body as too large, at most this much more of it is
/// read and thrown away, so the client gets to read the 413 (see `discard`).
const DRAIN_MAX_BYTES: u64 = 8 * 1024 * 1024;
/// ... and for at most this long.
const DRAIN_MAX_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads a request body of at most `limit` bytes within `timeout`: a
/// declared `Content-Length` over the limit is refused before reading.
pub async fn read_limited(
    headers: &http::HeaderMap,
    mut body: hyper::body::Incoming,
    limit: u64,
    timeout: std::time::Duration,
) -> Result<Bytes, ApiError> {
    use http_body::Body as _;
    // The common case on the proxy path (GET, no body): no timer.
    if body.is_end_stream() {
        return Ok(Bytes::new());
    }
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit {
            // A client waiting for `100 Continue` sends nothing more once it
            // reads the 413; hyper sends the 100 only if the body is read.
            let expects_continue = headers
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
            if !expects_continue {
                discard(body);
            }
            return Err(ApiError::BodyTooLarge(limit));
        }
    }
    let read = async {
        let mut first: Option<Bytes> = None;
        let mut more: Option<bytes::BytesMut> = None;
        let mut total: u64 = 0;
        loop {
            match body.frame().await {
                None => break,
                Some(Err(_)) => return Err(None),
                Some(Ok(f)) => {
                    let Ok(data) = f.into_data() else { continue };
                    total += data.len() as u64;
                    if total > limit {
                        return Err(Some(()));
                    }
                    match (&mut first, &mut more) {
                        (None, _) => first = Some(data),
                        (Some(a), None) => {
                            let mut m = bytes::BytesMut::with_capacity(a.len() + data.len());
                            m.extend_from_slice(a);
                            m.extend_from_slice(&data);
                            more = Some(m);
                        }
                        (Some(_), Some(m)) => m.extend_from_slice(&data),
                    }
                }
            }
        }
        Ok(match (first, more) {
            (_, Some(m)) => m.freeze(),
            (Some(a), None) => a,
            (None, None) => Bytes::new(),
        })
    };
    let res = tokio::time::timeout(timeout, read).await;
    match res {
        Err(_) => Err(ApiError::BadRequest(
            "The request body did not arrive in time.".into(),
        )),
        Ok(Err(Some(()))) => {
            discard(body);
            Err(ApiError::BodyTooLarge(limit))
        }
        Ok(Err(None)) => Err(ApiError::BadRequest(
            "The request body could not be read.".into(),
        )),
        Ok(Ok(b)) => Ok(b),
    }
}

/// Reads and throws away the rest of a refused body (up to
/// `DRAIN_MAX_BYTES` within `DRAIN_MAX_TIME`) while the 413 is being sent.
/// Dropping the body at once would reset the HTTP/2 stream with CANCEL
/// before the answer (curl exits 92, httpx waits forever), and over
/// HTTP/1.1 close the socket under a client still writing (a broken pipe
/// instead of the answer). Held until the answer is out, an HTTP/2 body
/// that is still streaming ends with RST_STREAM(NO_ERROR), as RFC 9113
/// §8.1 allows; a longer HTTP/1.1 body ends in a lingering close
/// (`server::ConnIo`).
fn discard(mut body: hyper::body::Incoming) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        let drain = async {
            let mut n: u64 = 0;
            while let Some(Ok(f)) = body.frame().await {
                if let Ok(d) = f.into_data() {
                    n += d.len() as u64;
                    if n > DRAIN_MAX_BYTES {
                        break;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_MAX_TIME, drain).await;
    });
}

/// Parses a request body that must be one JSON object. serde would also
/// read a struct from a JSON array (fields by position), so `["tok"]` could
/// pass for `{"access_token": "tok"}`: objects only. Errors never quote the
/// input.
pub fn json_object<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ApiError> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        None => Err(ApiError::BadRequest(
            "This endpoint needs a JSON body.".into(),
        )),
        Some(b'{') => serde_json::from_slice(bytes).map_err(|e| json_error(&e)),
        Some(_) => Err(ApiError::BadRequest(
            "The request body must be a JSON object.".into(),
        )),
    }
}
