//! Operation tools at the edge: `POST /v1/tools/{name}`, and the one call
//! path every other front door (MCP, Vapi, Retell) uses. A tool call is a
//! proxied call whose request the catalogue built: after `build`, the
//! proxy's phases run unchanged (provider granted, allow list, path rules,
//! refresh, injection, one 401 replay, audit with the tool's name).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::Value;

use crate::app::App;
use crate::body::Body;
use crate::error::ApiError;
use crate::proxy::{self, Outgoing, Trace};
use sidekey_creds::session::VerifiedSession;
use sidekey_creds::tools::{Built, Tool};

/// What a front door hands over: the arguments, or the request it already
/// built from them (MCP builds first, to answer bad arguments as JSON-RPC
/// errors; building again would double the work of every call).
pub enum Args<'a> {
    Raw(&'a Value),
    Built(Built),
}

/// `POST /v1/tools/{name}`: the session and conversation as for the proxy,
/// the body the tool's arguments.
pub async fn handle(app: &Arc<App>, req: Request<Incoming>, name: &str) -> Response<Body> {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let mut t = Trace::for_route("/v1/tools", display_path(name));
    let result = async {
        let tool = lookup(app, name, &mut t)?;
        let session = proxy::authenticate(app, &parts.headers, &mut t).await?;
        let raw = proxy::read_body(app, &parts.headers, body).await?;
        let args = parse_args(&raw)?;
        invoke(app, &session, &tool, Args::Raw(&args), &mut t).await
    }
    .await;
    proxy::finish(app, &parts.method, started, t, result)
}

/// A tool call from a front door that carries the session in its own
/// message (MCP, Vapi, Retell): authenticated, run, audited and counted
/// exactly as `POST /v1/tools/{name}` is. `route` names the front door in
/// refused-request summaries.
pub async fn call(
    app: &Arc<App>,
    route: &'static str,
    token: Option<&str>,
    conversation: Option<&str>,
    name: &str,
    args: Args<'_>,
) -> Response<Body> {
    let started = Instant::now();
    let mut t = Trace::for_route(route, display_path(name));
    let result = async {
        let tool = lookup(app, name, &mut t)?;
        let conversation = match conversation {
            Some(c) if !sidekey_creds::session::valid_conversation_id(c) => {
                return Err(ApiError::BadRequest(
                    "The call id is not a valid conversation id.".into(),
                ));
            }
            c => c,
        };
        let session = proxy::authenticate_token(app, token, conversation, &mut t).await?;
        invoke(app, &session, &tool, args, &mut t).await
    }
    .await;
    proxy::finish(app, &Method::POST, started, t, result)
}

/// A requested tool name as it may be echoed (audit path, error message):
/// the characters a tool name can have, at most 64.
fn shown(name: &str) -> std::borrow::Cow<'_, str> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    // Every call passes here; a well-formed name is used as it is.
    if name.len() <= 64 && name.chars().all(ok) {
        return std::borrow::Cow::Borrowed(name);
    }
    std::borrow::Cow::Owned(name.chars().filter(|c| ok(*c)).take(64).collect())
}

/// The tool's name as the audit log shows the path of a refused call.
fn display_path(name: &str) -> String {
    let shown = shown(name);
    let mut p = String::with_capacity(10 + shown.len());
    p.push_str("/v1/tools/");
    p.push_str(&shown);
    p
}

fn lookup(app: &Arc<App>, name: &str, t: &mut Trace) -> Result<Arc<Tool>, ApiError> {
    match app.tools.get(name) {
        Some(tool) => {
            t.tool = Some(Arc::from(tool.name.as_str()));
            Ok(tool.clone())
        }
        None => Err(ApiError::UnknownTool(shown(name).into_owned())),
    }
}

/// The request body as the tool's arguments: a JSON object, or nothing.
pub fn parse_args(raw: &[u8]) -> Result<Value, ApiError> {
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    match serde_json::from_slice::<Value>(raw) {
        Ok(v @ (Value::Object(_) | Value::Null)) => Ok(v),
        _ => Err(ApiError::BadArguments(
            "The tool's arguments must be a JSON object.".into(),
        )),
    }
}

/// The tool's request through the proxy's phases 2-7.
async fn invoke(
    app: &Arc<App>,
    session: &VerifiedSession,
    tool: &Tool,
    args: Args<'_>,
    t: &mut Trace,
) -> Result<Response<Body>, ApiError> {
    let provider = proxy::select_provider(app, session, &tool.provider, t)?;
    let built = match args {
        Args::Raw(a) => tool
            .build(a)
            .map_err(|e| ApiError::BadArguments(e.message()))?,
        Args::Built(b) => b,
    };
    let path = proxy::check_request(&provider, &built.method, &built.path, t)?;
    let mut headers = HeaderMap::new();
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    let body = match built.body {
        Some(b) => {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json; charset=utf-8"),
            );
            Bytes::from(b)
        }
        None => Bytes::new(),
    };
    for (n, v) in built.headers {
        headers.insert(n, v);
    }
    let outgoing = Outgoing {
        method: built.method,
        path,
        query: built.query,
        headers: sidekey_creds::client::Headers::all(&headers),
        body,
    };
    proxy::call_provider(app, &provider, session, &outgoing).await
}

/// A whole answer, read for a front door that wraps it in its own message.
pub struct Answer {
    pub status: StatusCode,
    /// The sidekey error code, when sidekey refused the call itself.
    pub sidekey_error: Option<String>,
    pub json: bool,
    pub body: Bytes,
}

impl Answer {
    /// sidekey's refusal as `(code, message)`, from its error body.
    pub fn refusal(&self) -> Option<(String, String)> {
        let code = self.sidekey_error.clone()?;
        let v: Value = serde_json::from_slice(&self.body).ok()?;
        let message = v["error"]["message"].as_str()?.to_owned();
        Some((code, message))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads an answer whole, at most `limit` bytes (more is cut, and said).
pub async fn collect(resp: Response<Body>, limit: usize, timeout: Duration) -> Answer {
    let (parts, mut body) = resp.into_parts();
    let sidekey_error = parts
        .headers
        .get(&crate::error::ERROR_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let json = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    let mut buf = bytes::BytesMut::new();
    // One deadline for the whole answer, not one timer per frame: an
    // upstream trickling bytes must not stretch it, and one timer is cheaper.
    let read = async {
        loop {
            match body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        let room = limit.saturating_sub(buf.len());
                        if d.len() > room {
                            buf.extend_from_slice(&d[..room]);
                            return true;
                        }
                        buf.extend_from_slice(&d);
                    }
                }
                None => return false,
                Some(Err(_)) => return true,
            }
        }
    };
    let cut = tokio::time::timeout(timeout, read).await.unwrap_or(true);
    if cut {
        tracing::warn!(
            status = parts.status.as_u16(),
            limit,
            "tool answer cut short (too long, broken or stalled)"
        );
    }
    Answer {
        status: parts.status,
        sidekey_error,
        json: json && !cut,
        body: buf.freeze(),
    }
}
