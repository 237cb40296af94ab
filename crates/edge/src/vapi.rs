//! `POST /v1/vapi/tools`: Vapi's server URL. Tool calls run the named
//! operation tools (all of one message at once); the end of a call revokes
//! its sessions; an inbound phone call (`assistant-request`) gets a session
//! for the caller's number. `tools` gives the tool definitions.

use std::sync::Arc;
use std::time::Instant;

use http::{HeaderMap, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Map, Value, json};
use subtle::ConstantTimeEq;

use crate::app::{App, sha256};
use crate::body::{self, Body};
use crate::error::ApiError;
use crate::voice;
use sidekey_base::config::Config;
use sidekey_base::config::PayloadPart;
use sidekey_creds::tools::Catalogue;

const PATH: &str = "/v1/vapi/tools";

/// How the request proved it comes from Vapi.
enum Auth {
    /// The shared secret matched: nothing left to check.
    Secret,
    /// An HMAC to check over the body, with its fresh timestamp.
    Hmac {
        timestamp: String,
        signature: Vec<u8>,
    },
}

/// The credential checks that need no body: a configured secret matches,
/// or an HMAC signature is present with a fresh timestamp.
fn authenticate(app: &App, headers: &HeaderMap) -> Result<Auth, ApiError> {
    let secret = app.vapi_secret.as_ref().filter(|s| !s.is_empty());
    let hmac = app.vapi_hmac_secret.as_ref().filter(|s| !s.is_empty());
    if secret.is_none() && hmac.is_none() {
        tracing::warn!(
            "Vapi called but no Vapi credential is configured ([vapi] secret_env or hmac_secret_env)"
        );
        return Err(ApiError::NotConfigured(
            "Vapi is not set up on this sidekey: set [vapi] secret_env (or hmac_secret_env) and restart.".into(),
        ));
    }
    let h = &app.config.vapi.hmac;
    if let Some(s) = secret {
        let want = sha256(s.expose().as_bytes());
        let mut presented = Vec::new();
        let configured = app.config.vapi.secret_header.as_ref();
        if configured.is_none() {
            if let Some(v) = headers.get("x-vapi-secret") {
                presented.push(v.as_bytes().trim_ascii());
            }
        }
        let name = configured.unwrap_or(&http::header::AUTHORIZATION);
        if let Some(v) = headers.get(name) {
            let v = v.as_bytes().trim_ascii();
            // `bearerPrefixEnabled` off sends the bare secret.
            let token = match v.get(..7) {
                Some(p) if p.eq_ignore_ascii_case(b"bearer ") => v[7..].trim_ascii(),
                _ => v,
            };
            presented.push(token);
        }
        let mut ok = subtle::Choice::from(0u8);
        for p in presented {
            ok |= want.ct_eq(&sha256(p));
        }
        if bool::from(ok) {
            return Ok(Auth::Secret);
        }
        if hmac.is_none() || headers.get(&h.signature_header).is_none() {
            return Err(ApiError::Unauthorized);
        }
    }
    let signature = headers
        .get(&h.signature_header)
        .ok_or(ApiError::InvalidSignature("missing signature header"))?
        .to_str()
        .ok()
        .map(|v| {
            let v = v.trim();
            v.strip_prefix(h.signature_prefix.as_str()).unwrap_or(v)
        })
        .and_then(voice::decode_signature)
        .ok_or(ApiError::InvalidSignature("malformed signature header"))?;
    let timestamp = headers
        .get(&h.timestamp_header)
        .ok_or(ApiError::InvalidSignature("missing timestamp header"))?
        .to_str()
        .map_err(|_| ApiError::InvalidSignature("malformed timestamp header"))?
        .trim()
        .to_owned();
    let t: i64 = timestamp
        .parse()
        .map_err(|_| ApiError::InvalidSignature("timestamp is not a number"))?;
    // Seconds or milliseconds: anything past the year 5138 in seconds is
    // taken as milliseconds.
    let t = if t.unsigned_abs() >= 100_000_000_000 {
        t / 1000
    } else {
        t
    };
    if app.clock.now().abs_diff(t) > app.config.vapi.tolerance_secs.max(0) as u64 {
        return Err(ApiError::InvalidSignature("timestamp outside tolerance"));
    }
    Ok(Auth::Hmac {
        timestamp,
        signature,
    })
}

/// `POST /v1/vapi/tools`.
pub async fn server_message(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let auth = match authenticate(app, req.headers()) {
        Ok(a) => a,
        Err(e) => return voice::turned_away(app, PATH, "vapi", e),
    };
    let raw = match voice::read_body(app, req, PATH, "vapi").await {
        Ok(b) => b,
        Err(answer) => return answer,
    };
    if let Auth::Hmac {
        timestamp,
        signature,
    } = &auth
    {
        let key = app
            .vapi_hmac_secret
            .as_ref()
            .map(|s| s.expose().as_bytes())
            .unwrap_or_default();
        let h = &app.config.vapi.hmac;
        let parts: Vec<&[u8]> = h
            .payload
            .iter()
            .map(|p| match p {
                PayloadPart::Text(t) => t.as_bytes(),
                PayloadPart::Timestamp => timestamp.as_bytes(),
                PayloadPart::Body => &raw[..],
                PayloadPart::Method => b"POST",
            })
            .collect();
        if !voice::hmac_matches_with(h.algorithm, key, &parts, signature) {
            return voice::turned_away(
                app,
                PATH,
                "vapi",
                ApiError::InvalidSignature("signature mismatch"),
            );
        }
    }
    let body: Value = match crate::request::json_object(&raw) {
        Ok(v) => v,
        Err(e) => {
            app.metrics.webhook("vapi", "error");
            return e.into_response();
        }
    };
    drop(raw);
    // `{"message": {...}}`; a bare message is taken as it is.
    let message = match body.get("message") {
        Some(m @ Value::Object(_)) => m,
        _ => &body,
    };
    let kind = message.get("type").and_then(Value::as_str).unwrap_or("");
    let result = match kind {
        "tool-calls" => Ok(tool_calls(app, message).await),
        "end-of-call-report" => end_of_call(app, message, started).await,
        "status-update" if message.get("status").and_then(Value::as_str) == Some("ended") => {
            end_of_call(app, message, started).await
        }
        "assistant-request" => assistant_request(app, message, started).await,
        _ => {
            app.metrics.webhook("vapi_other", "ignored");
            Ok(json!({}))
        }
    };
    match result {
        Ok(v) => body::json(StatusCode::OK, &v),
        Err(e) => crate::elevenlabs::refused(app, PATH, started, "vapi", "error", e),
    }
}

/// The call's id (or a chat's), the conversation sessions are bound to.
fn conversation(message: &Value) -> Option<&str> {
    message
        .pointer("/call/id")
        .or_else(|| message.pointer("/chat/id"))
        .and_then(Value::as_str)
        .filter(|c| !c.is_empty())
}

/// The session token from the call's variable values.
fn session_token<'a>(app: &App, message: &'a Value) -> Option<&'a str> {
    let var = &app.config.vapi.session_variable;
    [
        "/call/assistantOverrides/variableValues",
        "/assistant/variableValues",
        "/call/metadata",
        "/assistantOverrides/variableValues",
    ]
    .iter()
    .find_map(|p| {
        message
            .pointer(p)
            .and_then(|v| v.get(var))
            .and_then(Value::as_str)
            .filter(|t| !t.trim().is_empty())
    })
}

/// One tool call of a message: its id, the tool's name and the arguments
/// (a JSON string as Vapi's types have it, or an object as its docs show).
struct Call {
    id: String,
    name: String,
    args: Result<Value, String>,
}

fn parse_call(v: &Value) -> Call {
    let f = v.get("function").filter(|f| f.is_object()).unwrap_or(v);
    let id = v
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let raw = f
        .get("arguments")
        .or_else(|| f.get("parameters"))
        .unwrap_or(&Value::Null);
    let args = match raw {
        Value::Null => Ok(Value::Null),
        Value::Object(_) => Ok(raw.clone()),
        Value::String(s) if s.trim().is_empty() => Ok(Value::Null),
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(v @ (Value::Object(_) | Value::Null)) => Ok(v),
            _ => Err("The tool's arguments must be a JSON object.".to_owned()),
        },
        _ => Err("The tool's arguments must be a JSON object.".to_owned()),
    };
    Call { id, name, args }
}

/// Runs every tool call of the message at once; one result each, in order.
async fn tool_calls(app: &Arc<App>, message: &Value) -> Value {
    let list: Vec<&Value> = match message.get("toolCallList").and_then(Value::as_array) {
        Some(l) => l.iter().collect(),
        None => message
            .get("toolWithToolCallList")
            .and_then(Value::as_array)
            .map(|l| l.iter().filter_map(|t| t.get("toolCall")).collect())
            .unwrap_or_default(),
    };
    let token = session_token(app, message);
    let conv = conversation(message);
    let calls: Vec<Call> = list.into_iter().map(parse_call).collect();
    app.metrics.webhook("vapi_tool_calls", "ok");
    let results = futures_util::future::join_all(calls.iter().map(|c| async move {
        let mut r = Map::new();
        r.insert("toolCallId".into(), json!(c.id));
        r.insert("name".into(), json!(c.name));
        let args = match &c.args {
            Ok(a) => a,
            Err(msg) => {
                r.insert("error".into(), json!(msg));
                return Value::Object(r);
            }
        };
        let resp = crate::tools::call(
            app,
            PATH,
            token,
            conv,
            &c.name,
            crate::tools::Args::Raw(args),
        )
        .await;
        let answer =
            crate::tools::collect(resp, voice::RESULT_LIMIT, voice::result_timeout(app)).await;
        if let Some((_code, sentence)) = answer.refusal() {
            r.insert("error".into(), json!(sentence));
        } else if answer.body.is_empty() {
            r.insert(
                "result".into(),
                json!(json!({"status": answer.status.as_u16()}).to_string()),
            );
        } else {
            r.insert("result".into(), json!(answer.text()));
        }
        Value::Object(r)
    }))
    .await;
    json!({ "results": results })
}

/// `end-of-call-report`, `status-update` ended: the call's sessions end.
async fn end_of_call(app: &Arc<App>, message: &Value, started: Instant) -> Result<Value, ApiError> {
    let Some(conv) =
        conversation(message).filter(|c| sidekey_creds::session::valid_conversation_id(c))
    else {
        app.metrics.webhook("vapi_call_ended", "ignored");
        return Ok(json!({}));
    };
    let revoked = crate::elevenlabs::revoke_conversation(app, conv, app.clock.now()).await?;
    app.metrics.webhook("vapi_call_ended", "ok");
    tracing::info!(
        conversation_id = conv,
        sessions_revoked = revoked,
        "Vapi call ended"
    );
    crate::elevenlabs::record(app, PATH, 200, started, None, Some(conv.to_owned()), None);
    Ok(json!({ "sessions_revoked": revoked }))
}

/// `assistant-request` (an inbound phone call): a session for the caller,
/// when their number is a user's.
async fn assistant_request(
    app: &Arc<App>,
    message: &Value,
    started: Instant,
) -> Result<Value, ApiError> {
    let number = message
        .pointer("/call/customer/number")
        .or_else(|| message.pointer("/customer/number"))
        .and_then(Value::as_str);
    let conv = conversation(message)
        .filter(|c| sidekey_creds::session::valid_conversation_id(c))
        .map(str::to_owned);
    let user = crate::elevenlabs::user_by_caller(app, number).await?;
    let mut answer = Map::new();
    if let Some(a) = &app.config.vapi.assistant_id {
        answer.insert("assistantId".into(), json!(a));
    }
    if let Some(user) = &user {
        let token = crate::elevenlabs::mint_for_caller(app, user, conv.clone()).await?;
        answer.insert(
            "assistantOverrides".into(),
            json!({"variableValues": {app.config.vapi.session_variable.clone(): token}}),
        );
    }
    app.metrics.webhook(
        "vapi_assistant_request",
        if user.is_some() {
            "known_caller"
        } else {
            "unknown_caller"
        },
    );
    tracing::info!(
        known = user.is_some(),
        user = user.as_deref().unwrap_or("-"),
        "Vapi assistant-request answered"
    );
    crate::elevenlabs::record(app, PATH, 200, started, user, conv, None);
    Ok(Value::Object(answer))
}

/// The Vapi tools to create (`POST https://api.vapi.ai/tool`), one
/// `function` tool per operation tool, each calling `POST /v1/vapi/tools`.
pub fn tools(cfg: &Config, catalogue: &Catalogue) -> Vec<Value> {
    catalogue
        .iter()
        .map(|t| {
            json!({
                "type": "function",
                "async": false,
                "function": {
                    "name": t.name,
                    "description": voice::function_description(t),
                    "parameters": voice::function_parameters(t),
                },
                "server": {
                    "url": format!("{}{PATH}", cfg.server.public_url),
                    "timeoutSeconds": voice::platform_timeout_secs(cfg),
                },
            })
        })
        .collect()
}
