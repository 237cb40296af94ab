//! `/v1/mcp`: sidekey as a per-user MCP server (Streamable HTTP, single
//! JSON answers, no server stream).
//!
//! Identity is the session token of every request's own headers, exactly
//! as for the proxy; an `Mcp-Session-Id` carries none. `initialize`,
//! `ping` and `tools/list` work without a session (platforms list tools
//! when the server is added); `tools/call` needs one, and a refusal is a
//! tool result with `isError` whose text the agent can say.
//!
//! Hand-written rather than on rmcp's server: the server side is one
//! JSON-RPC dispatch of four methods judged per request by its headers, and
//! the upstream side must go through sidekey's own client (injection,
//! refresh, the pinned TLS roots); rmcp's transports hold identity per
//! session and bring their own HTTP client.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Map, Value, json};

use crate::app::App;
use crate::body::{self, Body};
use crate::error::ApiError;
use crate::proxy::{self, Trace};
use sidekey_creds::session::VerifiedSession;

pub mod sessions;
mod upstream;

/// Protocol revisions sidekey speaks, newest first.
pub const PROTOCOL_VERSIONS: [&str; 3] = ["2025-11-25", "2025-06-18", "2025-03-26"];

static SESSION_ID: http::HeaderName = http::HeaderName::from_static("mcp-session-id");
static PROTOCOL_HEADER: http::HeaderName = http::HeaderName::from_static("mcp-protocol-version");

/// JSON-RPC error codes.
const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;

/// `ANY /v1/mcp`.
pub async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    match *req.method() {
        Method::POST => post(app, req).await,
        Method::DELETE => delete(app, req.headers()),
        _ => {
            // No server-initiated stream is offered (spec: 405 for GET).
            let mut r = ApiError::MethodNotAllowed.into_response();
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST, DELETE"));
            r
        }
    }
}

/// `DELETE /v1/mcp`: ends the session id this replica issued.
fn delete(app: &Arc<App>, headers: &HeaderMap) -> Response<Body> {
    let Some(id) = headers.get(&SESSION_ID).and_then(|v| v.to_str().ok()) else {
        return ApiError::BadRequest("DELETE /v1/mcp needs the Mcp-Session-Id header.".into())
            .into_response();
    };
    if app.mcp_sessions.end(id) {
        Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(body::empty())
            .expect("static response")
    } else {
        ApiError::NotFound("There is no such MCP session.".into()).into_response()
    }
}

async fn post(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let (parts, incoming) = req.into_parts();
    if let Some(id) = parts.headers.get(&SESSION_ID).and_then(|v| v.to_str().ok()) {
        if app.mcp_sessions.is_ended(id) {
            return ApiError::NotFound("This MCP session was ended; initialize a new one.".into())
                .into_response();
        }
    }
    let mut version = None;
    if let Some(v) = parts.headers.get(&PROTOCOL_HEADER) {
        version = v
            .to_str()
            .ok()
            .map(str::trim)
            .filter(|v| PROTOCOL_VERSIONS.contains(v));
        if version.is_none() {
            return rpc_http(
                StatusCode::BAD_REQUEST,
                error(
                    Value::Null,
                    INVALID_REQUEST,
                    &format!(
                        "Unsupported MCP-Protocol-Version; sidekey speaks {}.",
                        PROTOCOL_VERSIONS.join(", ")
                    ),
                ),
            );
        }
    }
    let raw = match proxy::read_body(app, &parts.headers, incoming).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let msg: Value = match serde_json::from_slice(&raw) {
        Ok(v) => v,
        Err(_) => {
            return rpc_http(
                StatusCode::BAD_REQUEST,
                error(
                    Value::Null,
                    PARSE_ERROR,
                    "Parse error: the body is not JSON.",
                ),
            );
        }
    };
    let ctx = Ctx {
        app,
        headers: &parts.headers,
    };
    match msg {
        // JSON-RPC batches were removed in 2025-06-18.
        Value::Array(_) if version.is_some_and(|v| v != "2025-03-26") => rpc_http(
            StatusCode::BAD_REQUEST,
            error(
                Value::Null,
                INVALID_REQUEST,
                "Invalid Request: batches are not allowed in this protocol version.",
            ),
        ),
        Value::Array(batch) if !batch.is_empty() => {
            let mut out = Vec::new();
            let mut issued = None;
            for m in batch {
                let (answer, id) = ctx.one(m).await;
                issued = issued.or(id);
                out.extend(answer);
            }
            if out.is_empty() {
                return accepted();
            }
            with_session(rpc_http(StatusCode::OK, Value::Array(out)), issued)
        }
        Value::Array(_) => rpc_http(
            StatusCode::BAD_REQUEST,
            error(
                Value::Null,
                INVALID_REQUEST,
                "Invalid Request: an empty batch.",
            ),
        ),
        m => {
            let invalid = !is_message(&m);
            let (answer, issued) = ctx.one(m).await;
            match answer {
                None => accepted(),
                Some(a) if invalid => rpc_http(StatusCode::BAD_REQUEST, a),
                Some(a) => with_session(rpc_http(StatusCode::OK, a), issued),
            }
        }
    }
}

fn is_message(m: &Value) -> bool {
    m.get("jsonrpc") == Some(&json!("2.0"))
        && (m.get("method").is_some_and(Value::is_string)
            || m.get("result").is_some()
            || m.get("error").is_some())
}

/// 202 for notifications and responses: nothing to answer.
fn accepted() -> Response<Body> {
    Response::builder()
        .status(StatusCode::ACCEPTED)
        .body(body::empty())
        .expect("static response")
}

fn with_session(mut r: Response<Body>, issued: Option<String>) -> Response<Body> {
    if let Some(id) = issued.and_then(|i| HeaderValue::from_str(&i).ok()) {
        r.headers_mut().insert(SESSION_ID.clone(), id);
    }
    r
}

fn rpc_http(status: StatusCode, v: Value) -> Response<Body> {
    body::json(status, &v)
}

fn result(id: Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

fn error(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

/// One POST's identity: its headers.
struct Ctx<'a> {
    app: &'a Arc<App>,
    headers: &'a HeaderMap,
}

impl Ctx<'_> {
    /// One JSON-RPC message → its answer (none for a notification or a
    /// response) and a session id issued by `initialize`.
    async fn one(&self, m: Value) -> (Option<Value>, Option<String>) {
        if !is_message(&m) {
            let id = m.get("id").cloned().unwrap_or(Value::Null);
            return (
                Some(error(
                    id,
                    INVALID_REQUEST,
                    "Invalid Request: not a JSON-RPC 2.0 message.",
                )),
                None,
            );
        }
        let Some(method) = m.get("method").and_then(Value::as_str) else {
            // A client's response to a server request: sidekey sends none.
            return (None, None);
        };
        let Some(id) = m.get("id").cloned() else {
            // Notifications (initialized, cancelled, ...) need no answer.
            return (None, None);
        };
        // Echoed unchanged; a request id is a string or a number.
        if !(id.is_string() || id.is_number()) {
            return (
                Some(error(
                    Value::Null,
                    INVALID_REQUEST,
                    "Invalid Request: id must be a string or an integer.",
                )),
                None,
            );
        }
        let params = m.get("params").cloned().unwrap_or(Value::Null);
        match method {
            "initialize" => {
                let (r, sid) = self.initialize(&params);
                (Some(result(id, r)), Some(sid))
            }
            "ping" => (Some(result(id, json!({}))), None),
            "tools/list" => (Some(result(id, self.list().await)), None),
            "tools/call" => (Some(self.call(id, &params).await), None),
            _ => (
                Some(error(
                    id,
                    METHOD_NOT_FOUND,
                    &format!(
                        "Method not found: sidekey serves initialize, ping, tools/list and tools/call ({})",
                        method.chars().take(64).collect::<String>()
                    ),
                )),
                None,
            ),
        }
    }

    fn initialize(&self, params: &Value) -> (Value, String) {
        let asked = params
            .get("protocolVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        // The client's version when sidekey speaks it, else sidekey's newest
        // (the client decides whether it can go on).
        let version = PROTOCOL_VERSIONS
            .iter()
            .find(|v| **v == asked)
            .copied()
            .unwrap_or(PROTOCOL_VERSIONS[0]);
        let sid = self.app.mcp_sessions.issue();
        (
            json!({
                "protocolVersion": version,
                "capabilities": {"tools": {"listChanged": false}},
                "serverInfo": {
                    "name": "sidekey",
                    "title": "sidekey",
                    "version": env!("CARGO_PKG_VERSION"),
                },
                "instructions": "Tools that act on the caller's own connected accounts. If a tool answers with an error, tell the caller its message.",
            }),
            sid,
        )
    }

    /// The session of this request, if its token is valid; never an error
    /// (a listing without one shows every tool).
    async fn session(&self) -> Option<VerifiedSession> {
        let token = proxy::session_token(self.headers)?;
        self.app.sessions.verify(token).await.ok()
    }

    async fn list(&self) -> Value {
        let session = self.session().await;
        let grants = |provider: &str| {
            session
                .as_ref()
                .is_none_or(|s| s.providers().iter().any(|p| p == provider))
        };
        let mut tools: Vec<Value> = self
            .app
            .tools
            .iter()
            .filter(|t| grants(&t.provider))
            .map(|t| {
                json!({
                    "name": t.name,
                    "title": t.name,
                    "description": t.description,
                    "inputSchema": t.input_schema(),
                })
            })
            .collect();
        for (name, server) in &self.app.config.mcp_servers {
            if !grants(&server.provider) {
                continue;
            }
            tools.extend(upstream::list(self.app, name, server, session.as_ref()).await);
        }
        json!({ "tools": tools })
    }

    async fn call(&self, id: Value, params: &Value) -> Value {
        let Some(name) = params.get("name").and_then(Value::as_str) else {
            return error(id, INVALID_PARAMS, "tools/call needs params.name.");
        };
        let args = match params.get("arguments") {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(a @ Value::Object(_)) => a.clone(),
            Some(_) => {
                return error(
                    id,
                    INVALID_PARAMS,
                    "tools/call arguments must be an object.",
                );
            }
        };
        if let Some((server, tool)) = name.split_once("__") {
            if let Some(cfg) = self.app.config.mcp_servers.get(server) {
                return match upstream::call(self.app, self.headers, server, cfg, tool, &args).await
                {
                    Ok(r) => result(id, r),
                    Err(upstream::CallError::Unknown) => {
                        error(id, INVALID_PARAMS, &format!("Unknown tool: {name}"))
                    }
                    Err(upstream::CallError::Rpc(code, msg)) => error(id, code, &msg),
                };
            }
        }
        let Some(tool) = self.app.tools.get(name) else {
            return error(
                id,
                INVALID_PARAMS,
                &format!(
                    "Unknown tool: {}",
                    name.chars().take(64).collect::<String>()
                ),
            );
        };
        if let Err(e) = tool.build(&args) {
            return error(id, INVALID_PARAMS, &e.message());
        }
        let conv = self
            .headers
            .get(&self.app.config.elevenlabs.conversation_header)
            .map(|v| v.to_str().unwrap_or("\u{0}").trim());
        let token = proxy::session_token(self.headers);
        let resp = crate::tools::call(self.app, "/v1/mcp", token, conv, &tool.name, &args).await;
        let answer = crate::tools::collect(
            resp,
            self.app.config.server.max_body_bytes as usize,
            Duration::from_secs(self.app.config.server.upstream_timeout_secs),
        )
        .await;
        result(id, tool_result(&answer))
    }
}

/// An answer as an MCP tool result: a refusal's sentence, or the
/// upstream's body (JSON also as `structuredContent`).
fn tool_result(a: &crate::tools::Answer) -> Value {
    if let Some((code, message)) = a.refusal() {
        return json!({
            "content": [{"type": "text", "text": message}],
            "structuredContent": {"error": {"code": code, "message": message}},
            "isError": true,
        });
    }
    let text = a.text();
    let mut r = json!({
        "content": [{"type": "text", "text": text}],
        "isError": a.status.as_u16() >= 400,
    });
    if a.json {
        if let Ok(v) = serde_json::from_slice::<Value>(&a.body) {
            r["structuredContent"] = match v {
                Value::Object(_) => v,
                other => json!({ "result": other }),
            };
        }
    }
    r
}

/// `Bytes` of a JSON-RPC message, for the upstream client.
fn to_bytes(v: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}
