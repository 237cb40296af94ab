//! Upstream MCP servers (`[mcp_servers.NAME]`): sidekey as their MCP client,
//! with the caller's own credential for the server's provider injected as
//! that provider injects it (refreshed when due, one refresh and one retry
//! when the server answers 401). The upstream never sees a session token.
//!
//! Each call runs a short exchange of its own (`initialize`,
//! `notifications/initialized`, the request): an upstream session belongs
//! to one user's token and is not kept.

use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri};
use http_body_util::BodyExt;
use serde_json::{Value, json};

use super::*;
use sidekey_base::config::McpServerConfig;
use sidekey_creds::providers::Provider;
use sidekey_vault::Credential;

/// The revision sidekey asks upstream servers for.
const CLIENT_VERSION: &str = "2025-06-18";
/// Largest upstream answer read (a tool listing or a tool result).
const MAX_ANSWER: usize = 4 << 20;
/// Most tools taken from one server's listing, and the largest definition
/// kept: an agent cannot use more, and a listing is kept in the store.
const MAX_TOOLS: usize = 512;
const MAX_DEFINITION: usize = 64 << 10;

pub enum CallError {
    /// Not a tool of this server (or filtered out by its `tools` globs).
    Unknown,
    /// The upstream's JSON-RPC error about the call itself (bad arguments).
    Rpc(i64, String),
}

/// Why an exchange stopped.
enum Failed {
    /// HTTP 401: the token was refused.
    Rejected,
    Api(ApiError),
}

impl From<ApiError> for Failed {
    fn from(e: ApiError) -> Self {
        Failed::Api(e)
    }
}

/// The upstream's tools as this server's: `server__tool`, filtered.
fn present(name: &str, server: &McpServerConfig, tools: &Value) -> Vec<Value> {
    let Some(list) = tools.as_array() else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|t| {
            let tn = t.get("name")?.as_str()?;
            if !server.offers(tn) {
                return None;
            }
            let mut out = json!({
                "name": format!("{name}__{tn}"),
                "inputSchema": t.get("inputSchema").cloned().unwrap_or_else(|| json!({"type": "object"})),
            });
            for k in ["title", "description", "annotations", "outputSchema"] {
                if let Some(v) = t.get(k) {
                    out[k] = v.clone();
                }
            }
            Some(out)
        })
        .collect()
}

/// Only the parts of a listing worth keeping: tool definitions, nothing
/// else the upstream put in its answer.
fn definitions(tools: &Value) -> Value {
    let list = tools.as_array().cloned().unwrap_or_default();
    let total = list.len();
    let kept: Vec<Value> = list
        .into_iter()
        .filter(|t| {
            t.get("name")
                .and_then(Value::as_str)
                .is_some_and(|n| !n.is_empty() && n.len() <= 128)
        })
        .filter(|t| serde_json::to_vec(t).map_or(0, |v| v.len()) <= MAX_DEFINITION)
        .take(MAX_TOOLS)
        .collect();
    if kept.len() < total {
        tracing::warn!(
            listed = total,
            kept = kept.len(),
            "upstream MCP listing trimmed (nameless, over 64 KiB, or past {MAX_TOOLS} tools)"
        );
    }
    Value::Array(
        kept.into_iter()
            .map(|t| {
                let mut d = json!({"name": t["name"]});
                for k in [
                    "title",
                    "description",
                    "inputSchema",
                    "annotations",
                    "outputSchema",
                ] {
                    if let Some(v) = t.get(k) {
                        d[k] = v.clone();
                    }
                }
                d
            })
            .collect(),
    )
}

/// This server's tools for a listing: live with the caller's credential
/// when there is a session that can reach it, else the last listing kept.
pub async fn list(
    app: &Arc<App>,
    name: &str,
    server: &McpServerConfig,
    session: Option<&VerifiedSession>,
) -> Vec<Value> {
    if let (Some(s), Some(p)) = (session, app.providers.get(&server.provider)) {
        match rpc(app, p, s.user(), server, "tools/list", json!({})).await {
            Ok(Ok(r)) => {
                let defs = definitions(r.get("tools").unwrap_or(&Value::Null));
                if let Err(e) = app.store.put_mcp_listing(name, &defs).await {
                    tracing::warn!(server = name, error = %e, "cannot keep the MCP tool listing");
                }
                return present(name, server, &defs);
            }
            Ok(Err((code, _))) => {
                tracing::warn!(
                    server = name,
                    code,
                    "upstream MCP server refused tools/list"
                );
            }
            Err(e) => {
                tracing::debug!(server = name, error = %e.code(), "upstream MCP listing failed; using the last one kept");
            }
        }
    }
    match app.store.mcp_listing(name).await {
        Ok(Some(defs)) => present(name, server, &defs),
        Ok(None) => Vec::new(),
        Err(e) => {
            tracing::warn!(server = name, error = %e, "cannot read the kept MCP tool listing");
            Vec::new()
        }
    }
}

/// `tools/call` of `server__tool`, audited as a proxied call.
pub async fn call(
    app: &Arc<App>,
    headers: &HeaderMap,
    name: &str,
    server: &McpServerConfig,
    tool: &str,
    args: &Value,
) -> Result<Value, CallError> {
    if tool.is_empty() || !server.offers(tool) {
        return Err(CallError::Unknown);
    }
    let started = Instant::now();
    let mut t = Trace::for_route("/v1/mcp", server.url.path().to_owned());
    t.tool = Some(Arc::from(format!("{name}__{tool}").as_str()));
    let outcome: Result<Result<Value, (i64, String)>, ApiError> = async {
        let session = proxy::authenticate(app, headers, &mut t).await?;
        let provider = proxy::select_provider(app, &session, &server.provider, &mut t)?;
        rpc(
            app,
            &provider,
            session.user(),
            server,
            "tools/call",
            json!({"name": tool, "arguments": args}),
        )
        .await
    }
    .await;
    let (audited, answer) = match outcome {
        Ok(Ok(r)) => {
            let status = if r.get("isError") == Some(&Value::Bool(true)) {
                StatusCode::BAD_GATEWAY
            } else {
                StatusCode::OK
            };
            (Ok(body::json(status, &json!({}))), Ok(r))
        }
        Ok(Err((code, msg))) if code == INVALID_PARAMS => (
            Err(ApiError::BadArguments(msg.clone())),
            Err(CallError::Rpc(code, msg)),
        ),
        Ok(Err((code, msg))) => {
            tracing::warn!(server = name, code, "upstream MCP server answered an error");
            let text = format!("The {name} tool server could not do that: {msg}");
            (
                Ok(body::json(StatusCode::BAD_GATEWAY, &json!({}))),
                Ok(json!({"content": [{"type": "text", "text": text}], "isError": true})),
            )
        }
        Err(e) => {
            let (code, message) = (e.code(), e.message());
            (
                Err(e),
                Ok(json!({
                    "content": [{"type": "text", "text": message}],
                    "structuredContent": {"error": {"code": code, "message": message}},
                    "isError": true,
                })),
            )
        }
    };
    proxy::finish(app, &Method::POST, started, t, audited);
    answer
}

/// One JSON-RPC request to the server as `user`: `Ok(Ok(result))`,
/// `Ok(Err((code, message)))` for the server's JSON-RPC error, `Err` when
/// sidekey could not get an answer.
async fn rpc(
    app: &Arc<App>,
    provider: &Provider,
    user: &str,
    server: &McpServerConfig,
    method: &str,
    params: Value,
) -> Result<Result<Value, (i64, String)>, ApiError> {
    let (owner, cred) = proxy::credential_for(app, provider, user).await?;
    match exchange(app, provider, &cred, server, method, &params).await {
        Ok(r) => Ok(r),
        Err(Failed::Api(e)) => Err(e),
        Err(Failed::Rejected) => {
            let cp = proxy::credential_provider(app, provider)?;
            let fresh = app
                .refresher
                .after_reject(&cp, &owner, cred.generation)
                .await?;
            let Some(fresh) = fresh else {
                return Err(ApiError::ReauthRequired(provider.label()));
            };
            tracing::info!(provider = %provider.name, "upstream MCP server rejected the token; retrying once with a refreshed one");
            match exchange(app, provider, &fresh, server, method, &params).await {
                Ok(r) => Ok(r),
                Err(Failed::Api(e)) => Err(e),
                Err(Failed::Rejected) => Err(ApiError::ReauthRequired(provider.label())),
            }
        }
    }
}

/// `initialize`, `notifications/initialized`, then the request.
async fn exchange(
    app: &Arc<App>,
    provider: &Provider,
    cred: &Credential,
    server: &McpServerConfig,
    method: &str,
    params: &Value,
) -> Result<Result<Value, (i64, String)>, Failed> {
    let init = json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {
            "protocolVersion": CLIENT_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "sidekey", "version": env!("CARGO_PKG_VERSION")},
        }
    });
    let (h, v) = post_message(app, provider, cred, server, None, None, &init).await?;
    let init_result = match v.as_ref().map(outcome) {
        Some(Ok(r)) => r,
        Some(Err((code, msg))) => return Ok(Err((code, msg))),
        None => return Err(unreachable(provider, server, "no answer to initialize")),
    };
    let session = h
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let version = init_result
        .get("protocolVersion")
        .and_then(Value::as_str)
        .unwrap_or(CLIENT_VERSION)
        .to_owned();
    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    post_message(
        app,
        provider,
        cred,
        server,
        session.as_deref(),
        Some(&version),
        &note,
    )
    .await?;
    let req = json!({"jsonrpc": "2.0", "id": 2, "method": method, "params": params});
    let (_, v) = post_message(
        app,
        provider,
        cred,
        server,
        session.as_deref(),
        Some(&version),
        &req,
    )
    .await?;
    match v.as_ref().map(outcome) {
        Some(r) => Ok(r),
        None => Err(unreachable(provider, server, "no answer to the request")),
    }
}

fn outcome(v: &Value) -> Result<Value, (i64, String)> {
    if let Some(e) = v.get("error") {
        let code = e.get("code").and_then(Value::as_i64).unwrap_or(-32603);
        let msg = e
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("error")
            .chars()
            .take(300)
            .collect();
        return Err((code, msg));
    }
    Ok(v.get("result").cloned().unwrap_or(Value::Null))
}

fn unreachable(provider: &Provider, server: &McpServerConfig, why: &str) -> Failed {
    tracing::warn!(provider = %provider.name, url = %server.url, "upstream MCP server: {why}");
    Failed::Api(ApiError::UpstreamUnreachable(provider.label()))
}

static ACCEPT_BOTH: HeaderValue = HeaderValue::from_static("application/json, text/event-stream");

/// POSTs one message; the answer's headers and the JSON-RPC message in it
/// (a JSON body, or the first message of an event stream).
async fn post_message(
    app: &Arc<App>,
    provider: &Provider,
    cred: &Credential,
    server: &McpServerConfig,
    session: Option<&str>,
    version: Option<&str>,
    msg: &Value,
) -> Result<(HeaderMap, Option<Value>), Failed> {
    let uri: Uri = server
        .url
        .as_str()
        .parse()
        .map_err(|_| unreachable(provider, server, "URL not usable"))?;
    let mut headers = HeaderMap::new();
    headers.insert(header::ACCEPT, ACCEPT_BOTH.clone());
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(s) = session.and_then(|s| HeaderValue::from_str(s).ok()) {
        headers.insert(HeaderName::from_static("mcp-session-id"), s);
    }
    if let Some(v) = version.and_then(|v| HeaderValue::from_str(v).ok()) {
        headers.insert(HeaderName::from_static("mcp-protocol-version"), v);
    }
    let credential = match provider.credential_header(cred) {
        Ok(Some(h)) => Some(h),
        Ok(None) => {
            return Err(Failed::Api(ApiError::NotConfigured(format!(
                "The {} provider puts its token in the path or query; an MCP server takes it in a header.",
                provider.display
            ))));
        }
        Err(_) => return Err(Failed::Api(ApiError::CredentialMissing(provider.label()))),
    };
    let req = sidekey_creds::client::Outbound {
        method: &Method::POST,
        uri,
        headers: sidekey_creds::client::Headers::all(&headers),
        credential,
        body: to_bytes(msg),
    };
    let timeout = Duration::from_secs(app.config.server.upstream_timeout_secs);
    let resp = match tokio::time::timeout(timeout, sidekey_creds::client::request(&app.client, req))
        .await
    {
        Err(_) => return Err(Failed::Api(ApiError::UpstreamTimeout(provider.label()))),
        Ok(Err(e)) => {
            let secrets: Vec<&sidekey_base::secret::Secret> = cred.access_token.iter().collect();
            tracing::warn!(
                provider = %provider.name,
                error = %sidekey_base::secret::scrub(&sidekey_base::errors::error_chain(&e), &secrets),
                "upstream MCP server unreachable"
            );
            return Err(Failed::Api(ApiError::UpstreamUnreachable(provider.label())));
        }
        Ok(Ok(r)) => r,
    };
    let (parts, body) = resp.into_parts();
    if parts.status == StatusCode::UNAUTHORIZED {
        return Err(Failed::Rejected);
    }
    if parts.status == StatusCode::ACCEPTED {
        return Ok((parts.headers, None));
    }
    if !parts.status.is_success() {
        return Err(unreachable(
            provider,
            server,
            &format!("HTTP {}", parts.status.as_u16()),
        ));
    }
    let limited = http_body_util::Limited::new(body, MAX_ANSWER);
    let bytes = match tokio::time::timeout(timeout, limited.collect()).await {
        Ok(Ok(c)) => c.to_bytes(),
        _ => {
            return Err(unreachable(
                provider,
                server,
                "answer too long, broken or stalled",
            ));
        }
    };
    let event_stream = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let want = msg.get("id");
    let message = if event_stream {
        sse_message(&bytes, want)
    } else if bytes.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        serde_json::from_slice::<Value>(&bytes).ok()
    };
    Ok((parts.headers, message))
}

/// The response to `want` among an event stream's `data:` messages.
fn sse_message(bytes: &[u8], want: Option<&Value>) -> Option<Value> {
    let text = String::from_utf8_lossy(bytes);
    let mut data = String::new();
    let mut found = None;
    for line in text.lines().chain(std::iter::once("")) {
        if line.is_empty() {
            if !data.is_empty() {
                if let Ok(v) = serde_json::from_str::<Value>(&data) {
                    let is_response = v.get("result").is_some() || v.get("error").is_some();
                    if is_response && (want.is_none() || v.get("id") == want) {
                        found = Some(v);
                        break;
                    }
                }
                data.clear();
            }
        } else if let Some(d) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(d.strip_prefix(' ').unwrap_or(d));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_response_is_found_in_an_event_stream() {
        let s = b"event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\n\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":2,\ndata: \"result\":{}}\n\n";
        // A data field split over lines is joined with a newline (valid JSON whitespace).
        let v = sse_message(s, Some(&json!(2))).unwrap();
        assert_eq!(v["id"], 2);
        assert!(
            sse_message(
                b"data: {\"jsonrpc\":\"2.0\",\"id\":3,\"result\":{}}\n",
                Some(&json!(2))
            )
            .is_none()
        );
    }

    #[test]
    fn listings_keep_definitions_only_and_are_renamed_and_filtered() {
        let server = McpServerConfig {
            url: "https://mcp.example.com/mcp".parse().unwrap(),
            provider: "notion".into(),
            tools: vec!["search".into(), "fetch*".into()],
            matcher: Some(
                globset::GlobSetBuilder::new()
                    .add(globset::Glob::new("search").unwrap())
                    .add(globset::Glob::new("fetch*").unwrap())
                    .build()
                    .unwrap(),
            ),
        };
        let tools = json!([
            {"name": "search", "description": "d", "inputSchema": {"type": "object"}, "x-extra": "dropped"},
            {"name": "fetch_page"},
            {"name": "delete_everything"},
            {"nameless": true},
        ]);
        let defs = definitions(&tools);
        assert!(defs[0].get("x-extra").is_none());
        let shown = present("notion", &server, &defs);
        let names: Vec<&str> = shown.iter().map(|t| t["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["notion__search", "notion__fetch_page"]);
    }
}
