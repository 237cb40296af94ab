//! The one HTTP body type every handler answers with, and small builders.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Response bodies: buffered JSON/HTML from sidekey itself, or an upstream
/// body streamed through.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Reads a request body of at most `limit` bytes within `timeout`: a
/// declared `Content-Length` over the limit is refused before reading.
pub async fn read_limited(
    headers: &http::HeaderMap,
    body: hyper::body::Incoming,
    limit: u64,
    timeout: std::time::Duration,
) -> Result<Bytes, crate::error::ApiError> {
    use crate::error::ApiError;
    use http_body_util::Limited;
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit {
            return Err(ApiError::BodyTooLarge(limit));
        }
    }
    let limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    match tokio::time::timeout(timeout, limited.collect()).await {
        Err(_) => Err(ApiError::BadRequest(
            "The request body did not arrive in time.".into(),
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::BodyTooLarge(limit))
        }
        Ok(Err(_)) => Err(ApiError::BadRequest(
            "The request body could not be read.".into(),
        )),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// Parses a request body that must be one JSON object. serde would also
/// read a struct from a JSON array (fields by position), so `["tok"]` could
/// pass for `{"access_token": "tok"}`: objects only. Errors never quote the
/// input.
pub fn json_object<'a, T: serde::Deserialize<'a>>(
    bytes: &'a [u8],
) -> Result<T, crate::error::ApiError> {
    use crate::error::ApiError;
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        None => Err(ApiError::BadRequest(
            "This endpoint needs a JSON body.".into(),
        )),
        Some(b'{') => serde_json::from_slice(bytes).map_err(|e| crate::error::json_error(&e)),
        Some(_) => Err(ApiError::BadRequest(
            "The request body must be a JSON object.".into(),
        )),
    }
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    Empty::<Bytes>::new().map_err(|e| match e {}).boxed_unsync()
}

pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

pub fn html(status: StatusCode, page: String) -> Response<Body> {
    let mut resp = Response::new(full(page));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

pub fn no_content() -> Response<Body> {
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp
}

pub fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// Escapes text for HTML element content and attribute values.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
