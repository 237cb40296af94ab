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
    let ctx = Ctx {
        app,
        headers: &parts.headers,
    };
    // The hot message, a single `tools/call`, read straight into its parts
    // (no tree of the whole envelope); anything else, or anything this
    // reading refuses (escapes, duplicate keys), takes the general path.
    if let Ok(call) = serde_json::from_slice::<FastCall>(&raw) {
        if call.jsonrpc == "2.0"
            && call.method == "tools/call"
            && (call.id.is_string() || call.id.is_number())
        {
            let answer = ctx
                .call_named(call.id, call.params.name, call.params.arguments)
                .await;
            return rpc_http(StatusCode::OK, answer);
        }
    }
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
                if let Some(a) = answer {
                    out.push(if out.is_empty() { b'[' } else { b',' });
                    out.extend_from_slice(&a);
                }
            }
            if out.is_empty() {
                return accepted();
            }
            out.push(b']');
            with_session(rpc_http(StatusCode::OK, out), issued)
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
    m.get("jsonrpc").and_then(Value::as_str) == Some("2.0")
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

/// One serialized JSON-RPC message (or batch of them) as the answer.
fn rpc_http(status: StatusCode, message: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(body::full(message));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Messages are serialized where they are made: a tool result splices the
/// upstream's JSON in as it came instead of parsing it into a tree and
/// writing it out again.
fn result(id: Value, result: Value) -> Vec<u8> {
    to_vec(&json!({"jsonrpc": "2.0", "id": id, "result": result}))
}

fn error(id: Value, code: i64, message: &str) -> Vec<u8> {
    to_vec(&json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}))
}

fn to_vec(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec())
}

/// One POST's identity: its headers.
struct Ctx<'a> {
    app: &'a Arc<App>,
    headers: &'a HeaderMap,
}

impl Ctx<'_> {
    /// One JSON-RPC message → its answer (none for a notification or a
    /// response) and a session id issued by `initialize`.
    async fn one(&self, mut m: Value) -> (Option<Vec<u8>>, Option<String>) {
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
        // Taken, not cloned: the arguments are the biggest part of a call.
        let params = m
            .as_object_mut()
            .and_then(|o| o.remove("params"))
            .unwrap_or(Value::Null);
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
        match method {
            "initialize" => {
                let (r, sid) = self.initialize(&params);
                (Some(result(id, r)), Some(sid))
            }
            "ping" => (Some(result(id, json!({}))), None),
            "tools/list" => (Some(result(id, self.list().await)), None),
            "tools/call" => (Some(self.call(id, params).await), None),
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

    async fn call(&self, id: Value, mut params: Value) -> Vec<u8> {
        let args = params.as_object_mut().and_then(|p| p.remove("arguments"));
        let Some(name) = params.get("name").and_then(Value::as_str) else {
            return error(id, INVALID_PARAMS, "tools/call needs params.name.");
        };
        self.call_named(id, name, args).await
    }

    async fn call_named(&self, id: Value, name: &str, args: Option<Value>) -> Vec<u8> {
        let args = match args {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(a @ Value::Object(_)) => a,
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
        let built = match tool.build(&args) {
            Ok(b) => b,
            Err(e) => return error(id, INVALID_PARAMS, &e.message()),
        };
        let conv = self
            .headers
            .get(&self.app.config.elevenlabs.conversation_header)
            .map(|v| v.to_str().unwrap_or("\u{0}").trim());
        let token = proxy::session_token(self.headers);
        let resp = crate::tools::call(
            self.app,
            "/v1/mcp",
            token,
            conv,
            &tool.name,
            crate::tools::Args::Built(built),
        )
        .await;
        let answer = crate::tools::collect(
            resp,
            self.app.config.server.max_body_bytes as usize,
            Duration::from_secs(self.app.config.server.upstream_timeout_secs),
        )
        .await;
        tool_result(&id, &answer)
    }
}

/// An answer as the JSON-RPC result of `tools/call`: a refusal's sentence,
/// or the upstream's body (JSON also as `structuredContent`, an object as
/// it is and anything else under `result`).
fn tool_result(id: &Value, a: &crate::tools::Answer) -> Vec<u8> {
    if let Some((code, message)) = a.refusal() {
        return result(
            id.clone(),
            json!({
                "content": [{"type": "text", "text": message}],
                "structuredContent": {"error": {"code": code, "message": message}},
                "isError": true,
            }),
        );
    }
    let text = String::from_utf8_lossy(&a.body);
    let mut out = Vec::with_capacity(2 * a.body.len() + 128);
    out.extend_from_slice(br#"{"jsonrpc":"2.0","id":"#);
    // Writing a `Value` or a `str` into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, id);
    out.extend_from_slice(br#","result":{"content":[{"type":"text","text":"#);
    let _ = serde_json::to_writer(&mut out, &*text);
    out.extend_from_slice(br#"}],"isError":"#);
    out.extend_from_slice(if a.status.as_u16() >= 400 {
        b"true"
    } else {
        b"false"
    });
    // Checked without building a tree; only well-formed JSON is spliced.
    if a.json && serde_json::from_slice::<serde::de::IgnoredAny>(&a.body).is_ok() {
        out.extend_from_slice(br#","structuredContent":"#);
        let object = a.body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        if object {
            out.extend_from_slice(&a.body);
        } else {
            out.extend_from_slice(br#"{"result":"#);
            out.extend_from_slice(&a.body);
            out.push(b'}');
        }
    }
    out.extend_from_slice(b"}}");
    out
}

/// A `tools/call` request as the fast path reads it: borrowed strings (an
/// escaped one fails the reading and the general path takes the message),
/// unknown members ignored as the general path ignores them.
#[derive(serde::Deserialize)]
struct FastCall<'a> {
    jsonrpc: &'a str,
    id: Value,
    method: &'a str,
    #[serde(borrow)]
    params: FastParams<'a>,
}

#[derive(serde::Deserialize)]
struct FastParams<'a> {
    name: &'a str,
    #[serde(default)]
    arguments: Option<Value>,
}

/// `Bytes` of a JSON-RPC message, for the upstream client.
fn to_bytes(v: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, json: bool, body: &str) -> Value {
        let a = crate::tools::Answer {
            status: StatusCode::from_u16(status).unwrap(),
            sidekey_error: None,
            json,
            body: Bytes::from(body.to_owned()),
        };
        serde_json::from_slice(&tool_result(&json!("id-1"), &a)).expect("valid JSON-RPC")
    }

    #[test]
    fn upstream_json_is_spliced_as_structured_content() {
        let v = answer(200, true, r#" {"a": [1, "x\"y"], "b": null} "#);
        assert_eq!(v["jsonrpc"], "2.0");
        assert_eq!(v["id"], "id-1");
        assert_eq!(v["result"]["isError"], false);
        assert_eq!(
            v["result"]["structuredContent"],
            json!({"a": [1, "x\"y"], "b": null})
        );
        assert_eq!(
            v["result"]["content"][0]["text"],
            r#" {"a": [1, "x\"y"], "b": null} "#
        );
        // Anything but an object goes under `result`.
        let v = answer(200, true, "[1,2]");
        assert_eq!(v["result"]["structuredContent"], json!({"result": [1, 2]}));
        let v = answer(404, true, "\"gone\"");
        assert_eq!(v["result"]["structuredContent"], json!({"result": "gone"}));
        assert_eq!(v["result"]["isError"], true);
    }

    #[test]
    fn text_and_broken_json_stay_text_only() {
        for (json, body) in [
            (false, "{\"a\":1}"),
            (true, "{\"a\":1"),
            (true, "{\"a\":1} trailing"),
            (true, ""),
        ] {
            let v = answer(200, json, body);
            assert_eq!(v["result"]["content"][0]["text"], body);
            assert!(v["result"].get("structuredContent").is_none(), "{body}");
        }
        // Bytes that are not UTF-8 are replaced, never passed on raw.
        let a = crate::tools::Answer {
            status: StatusCode::OK,
            sidekey_error: None,
            json: false,
            body: Bytes::from_static(b"caf\xe9"),
        };
        let v: Value = serde_json::from_slice(&tool_result(&json!(7), &a)).unwrap();
        assert_eq!(v["id"], 7);
        assert_eq!(v["result"]["content"][0]["text"], "caf\u{fffd}");
    }
}
