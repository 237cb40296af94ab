//! `POST /v1/call/{provider}`, the generic tool: one JSON body naming the
//! method, path, query and body, encoded as an LLM may write them, then
//! the same phases as `/v1/proxy/...`.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response};
use hyper::body::Incoming;
use serde_json::Value;

use super::{
    Outgoing, Trace, authenticate, call_provider, check_request, finish, read_body, select_provider,
};
use crate::app::App;
use crate::body::Body;
use crate::error::ApiError;

/// `POST /v1/call/{provider}`: the generic tool. The LLM fills `method`,
/// `path`, and optionally `query` and `body`; everything else is as for
/// `/v1/proxy/...`.
pub async fn handle_call(app: &Arc<App>, req: Request<Incoming>, name: &str) -> Response<Body> {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let mut t = Trace {
        route: "/v1/call",
        ..Default::default()
    };
    let result = call(app, &parts, body, name, &mut t).await;
    finish(app, &parts.method, started, t, result)
}

async fn call(
    app: &Arc<App>,
    parts: &Parts,
    body: Incoming,
    name: &str,
    t: &mut Trace,
) -> Result<Response<Body>, ApiError> {
    let session = authenticate(app, &parts.headers, t).await?;
    let provider = select_provider(app, &session, name, t)?;
    let raw = read_body(app, &parts.headers, body).await?;
    let spec: CallSpec = crate::request::json_object(&raw)?;
    let method = Method::from_bytes(spec.method.trim().to_ascii_uppercase().as_bytes())
        .ok()
        .filter(|m| {
            matches!(
                *m,
                Method::GET | Method::POST | Method::PUT | Method::PATCH | Method::DELETE
            )
        })
        .ok_or_else(|| {
            ApiError::BadRequest("method must be GET, POST, PUT, PATCH or DELETE.".into())
        })?;
    let (path_part, query_in_path) = match spec.path.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(encode_tool_query(q))),
        None => (spec.path.clone(), None),
    };
    let encoded = encode_tool_path(&path_part)?;
    let path = check_request(&provider, &method, &encoded, t)?;
    let mut query = query_in_path;
    match spec.query {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(Value::String(s)) => {
            query = Some(join_query(
                query,
                &encode_tool_query(s.trim().trim_start_matches('?')),
            ))
        }
        Some(Value::Object(map)) => {
            let mut ser = url::form_urlencoded::Serializer::new(String::new());
            for (k, v) in map {
                let v = match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                ser.append_pair(&k, &v);
            }
            query = Some(join_query(query, &ser.finish()));
        }
        Some(_) => {
            return Err(ApiError::BadRequest(
                "query must be a string or an object.".into(),
            ));
        }
    }
    let body = match spec.body {
        None | Some(Value::Null) => Bytes::new(),
        Some(Value::String(s)) if s.trim().is_empty() => Bytes::new(),
        // A string body is JSON text when it parses as JSON (LLMs fill
        // string parameters most reliably).
        Some(Value::String(s)) => match serde_json::from_str::<Value>(&s) {
            Ok(v) => Bytes::from(serde_json::to_vec(&v).unwrap_or_default()),
            Err(_) => Bytes::from(s),
        },
        Some(v) => Bytes::from(serde_json::to_vec(&v).unwrap_or_default()),
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    if !body.is_empty() {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
    }
    if let Some(ua) = parts.headers.get(header::USER_AGENT) {
        headers.insert(header::USER_AGENT, ua.clone());
    }
    let outgoing = Outgoing {
        method,
        path,
        query,
        headers: sidekey_creds::client::Headers::all(&headers),
        body,
    };
    call_provider(app, &provider, &session, &outgoing).await
}

#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct CallSpec {
    method: String,
    path: String,
    #[serde(default)]
    query: Option<Value>,
    #[serde(default)]
    body: Option<Value>,
}

fn join_query(a: Option<String>, b: &str) -> String {
    match a {
        Some(a) if !a.is_empty() => format!("{a}&{b}"),
        _ => b.to_owned(),
    }
}

/// Percent-encodes what an LLM may write in a query string: space, `#`,
/// CR, LF and every other character a request line cannot carry, and a `%`
/// that does not start an escape. `&`, `=`, `+` and existing `%XX` escapes
/// keep their meaning. Raw, a `#` cut the query short (dropping the
/// injected `key=`) and a space or CR/LF made the URI unparsable.
fn encode_tool_query(q: &str) -> String {
    const ENCODE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
        .add(b' ')
        .add(b'"')
        .add(b'#')
        .add(b'<')
        .add(b'>')
        .add(b'`')
        .add(b'{')
        .add(b'}')
        .add(b'|')
        .add(b'\\')
        .add(b'^')
        .add(b'[')
        .add(b']');
    let b = q.as_bytes();
    let mut out = String::with_capacity(q.len());
    let mut start = 0;
    for (i, &c) in b.iter().enumerate() {
        let escape =
            i + 2 < b.len() && b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit();
        if c == b'%' && !escape {
            out.extend(percent_encoding::utf8_percent_encode(&q[start..i], ENCODE));
            out.push_str("%25");
            start = i + 1;
        }
    }
    out.extend(percent_encoding::utf8_percent_encode(&q[start..], ENCODE));
    out
}

/// Percent-encodes what an LLM may write in a path (spaces, quotes, non-ASCII)
/// while keeping existing `%XX` escapes, so `check_path` judges the result.
fn encode_tool_path(p: &str) -> Result<String, ApiError> {
    let p = p.trim();
    if !p.starts_with('/') {
        return Err(ApiError::BadPath("tool path must start with /"));
    }
    const KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'/')
        .remove(b'%')
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~')
        .remove(b':')
        .remove(b'@')
        .remove(b'!')
        .remove(b'$')
        .remove(b'&')
        .remove(b'\'')
        .remove(b'(')
        .remove(b')')
        .remove(b'*')
        .remove(b'+')
        .remove(b',')
        .remove(b';')
        .remove(b'=');
    if p.contains('\\') {
        return Err(ApiError::BadPath("backslash in path"));
    }
    Ok(percent_encoding::utf8_percent_encode(p, KEEP).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidekey_creds::providers::check_path;

    #[test]
    fn tool_paths_are_encoded_then_checked() {
        assert_eq!(encode_tool_path("/files/a b").unwrap(), "/files/a%20b");
        assert_eq!(encode_tool_path("/x%2Fy").unwrap(), "/x%2Fy");
        assert!(check_path(&encode_tool_path("/x%2Fy").unwrap()).is_err());
        assert!(check_path(&encode_tool_path("/../x").unwrap()).is_err());
        assert!(encode_tool_path("x").is_err());
        assert!(encode_tool_path("/a\\b").is_err());
    }
}
