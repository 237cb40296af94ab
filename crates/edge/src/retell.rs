//! Retell: `POST /v1/retell/tools/{name}` (a custom function running the
//! operation tool of that name) and `POST /v1/retell/webhook` (the end of a
//! call revokes its sessions; an inbound call gets a session for the
//! caller's number). Both are signed with the account's API key.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::app::App;
use crate::body::{self, Body};
use crate::error::ApiError;
use crate::voice;
use sidekey_base::config::Config;
use sidekey_creds::tools::Catalogue;

const TOOLS_PATH: &str = "/v1/retell/tools";
const WEBHOOK_PATH: &str = "/v1/retell/webhook";

/// A parsed `X-Retell-Signature: v=<unix ms>,d=<hex>` whose timestamp is
/// fresh; the digest is checked once the body is read.
struct Pending {
    v: String,
    digest: Vec<u8>,
}

fn check_header(app: &App, headers: &HeaderMap) -> Result<Pending, ApiError> {
    if app.retell_api_key.as_ref().is_none_or(|k| k.is_empty()) {
        tracing::warn!("Retell called but no Retell API key is configured ([retell] api_key_env)");
        return Err(ApiError::NotConfigured(
            "Retell is not set up on this sidekey: set [retell] api_key_env and restart.".into(),
        ));
    }
    let h = headers
        .get("x-retell-signature")
        .ok_or(ApiError::InvalidSignature(
            "missing X-Retell-Signature header",
        ))?
        .to_str()
        .map_err(|_| ApiError::InvalidSignature("malformed signature header"))?;
    let (mut v, mut d) = (None, None);
    for part in h.split(',') {
        match part.trim().split_once('=') {
            Some(("v", x)) => v = Some(x.trim()),
            Some(("d", x)) => d = Some(x.trim()),
            _ => return Err(ApiError::InvalidSignature("malformed signature header")),
        }
    }
    let v = v
        .filter(|v| !v.is_empty() && v.len() <= 19 && v.bytes().all(|b| b.is_ascii_digit()))
        .ok_or(ApiError::InvalidSignature("no timestamp in signature"))?;
    let d = d
        .filter(|d| d.len() == 64)
        .and_then(voice::decode_signature)
        .ok_or(ApiError::InvalidSignature("no digest in signature"))?;
    let ms: i64 = v
        .parse()
        .map_err(|_| ApiError::InvalidSignature("timestamp is not a number"))?;
    let tolerance = (app.config.retell.tolerance_secs.max(0) as u64).saturating_mul(1000);
    if app.clock.now_millis().abs_diff(ms) > tolerance {
        return Err(ApiError::InvalidSignature("timestamp outside tolerance"));
    }
    Ok(Pending {
        v: v.to_owned(),
        digest: d,
    })
}

/// Checks the signature and reads the body: `Err` is the answer to give.
async fn signed_body(
    app: &App,
    req: Request<Incoming>,
    path: &'static str,
    event: &str,
) -> Result<Bytes, Box<Response<Body>>> {
    let pending = match check_header(app, req.headers()) {
        Ok(p) => p,
        Err(e) => return Err(Box::new(voice::turned_away(app, path, event, e))),
    };
    let raw = voice::read_body(app, req, path, event)
        .await
        .map_err(Box::new)?;
    let key = app
        .retell_api_key
        .as_ref()
        .map(|k| k.expose().as_bytes())
        .unwrap_or_default();
    if !voice::hmac_matches(key, &[&raw, pending.v.as_bytes()], &pending.digest) {
        return Err(Box::new(voice::turned_away(
            app,
            path,
            event,
            ApiError::InvalidSignature("signature mismatch"),
        )));
    }
    Ok(raw)
}

/// `POST /v1/retell/tools/{name}`: the upstream's answer as it is; a
/// refusal is sidekey's error JSON with status 200, so that Retell gives
/// its sentence to the LLM.
pub async fn tool(app: &Arc<App>, req: Request<Incoming>, name: &str) -> Response<Body> {
    let raw = match signed_body(app, req, TOOLS_PATH, "retell_tool").await {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    let body: Value = match crate::request::json_object(&raw) {
        Ok(v) => v,
        Err(e) => return as_tool_answer(e.into_response()),
    };
    let var = &app.config.retell.session_variable;
    let token = [
        "retell_llm_dynamic_variables",
        "dynamic_variables",
        "metadata",
    ]
    .iter()
    .find_map(|k| {
        body.get("call")
            .and_then(|c| c.get(*k))
            .and_then(|v| v.get(var))
            .and_then(Value::as_str)
            .filter(|t| !t.trim().is_empty())
    });
    let conv = body
        .pointer("/call/call_id")
        .and_then(Value::as_str)
        .filter(|c| !c.is_empty());
    // `args_at_root` puts the arguments beside `name` and `call`.
    let args = match body.get("args") {
        Some(a) => a.clone(),
        None => {
            let mut o = body.as_object().cloned().unwrap_or_default();
            o.remove("name");
            o.remove("call");
            Value::Object(o)
        }
    };
    app.metrics.webhook("retell_tool", "ok");
    let resp = crate::tools::call(
        app,
        TOOLS_PATH,
        token,
        conv,
        name,
        crate::tools::Args::Raw(&args),
    )
    .await;
    as_tool_answer(resp)
}

/// A sidekey refusal answered 200 (its body and `X-Sidekey-Error` kept).
fn as_tool_answer(mut resp: Response<Body>) -> Response<Body> {
    if resp.headers().contains_key(&crate::error::ERROR_HEADER) {
        *resp.status_mut() = StatusCode::OK;
    }
    resp
}

/// `POST /v1/retell/webhook`.
pub async fn webhook(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let raw = match signed_body(app, req, WEBHOOK_PATH, "retell").await {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    let body: Value = match crate::request::json_object(&raw) {
        Ok(v) => v,
        Err(e) => {
            app.metrics.webhook("retell", "error");
            return e.into_response();
        }
    };
    drop(raw);
    let event = body.get("event").and_then(Value::as_str).unwrap_or("");
    let result = match event {
        "call_ended" | "call_analyzed" => call_ended(app, &body, started).await,
        "call_inbound" => call_inbound(app, &body, started).await,
        "call_started" => call_started(app, &body).await,
        _ => {
            app.metrics.webhook("retell_other", "ignored");
            Ok(json!({}))
        }
    };
    match result {
        Ok(v) => body::json(StatusCode::OK, &v),
        Err(e) => crate::elevenlabs::refused(app, WEBHOOK_PATH, started, "retell", "error", e),
    }
}

fn call_id(body: &Value) -> Option<&str> {
    body.pointer("/call/call_id")
        .and_then(Value::as_str)
        .filter(|c| sidekey_creds::session::valid_conversation_id(c))
}

async fn call_ended(app: &Arc<App>, body: &Value, started: Instant) -> Result<Value, ApiError> {
    let Some(conv) = call_id(body) else {
        app.metrics.webhook("retell_call_ended", "ignored");
        return Ok(json!({}));
    };
    let revoked = crate::elevenlabs::revoke_conversation(app, conv, app.clock.now()).await?;
    app.metrics.webhook("retell_call_ended", "ok");
    tracing::info!(
        conversation_id = conv,
        sessions_revoked = revoked,
        "Retell call ended"
    );
    crate::elevenlabs::record(
        app,
        WEBHOOK_PATH,
        200,
        started,
        None,
        Some(conv.to_owned()),
        None,
    );
    Ok(json!({ "sessions_revoked": revoked }))
}

/// `call_started`: a session handed out by `call_inbound` (which comes
/// before the call has an id) is bound to the call at once, so that no
/// other call can claim it.
async fn call_started(app: &Arc<App>, body: &Value) -> Result<Value, ApiError> {
    let var = &app.config.retell.session_variable;
    let token = body
        .pointer("/call/retell_llm_dynamic_variables")
        .and_then(|v| v.get(var))
        .and_then(Value::as_str);
    if let (Some(token), Some(conv)) = (token, call_id(body)) {
        let mut t = crate::proxy::Trace::for_route(WEBHOOK_PATH, WEBHOOK_PATH.into());
        // A refusal here is the tool calls' to tell; nothing to answer.
        if let Err(e) = crate::proxy::authenticate_token(app, Some(token), Some(conv), &mut t).await
        {
            tracing::info!(error = %e, "Retell call_started: session not bound");
        }
    }
    app.metrics.webhook("retell_call_started", "ok");
    Ok(json!({}))
}

/// `call_inbound` (before the call exists, so without a call id): a
/// session for the caller, as the call's dynamic variables.
async fn call_inbound(app: &Arc<App>, body: &Value, started: Instant) -> Result<Value, ApiError> {
    let number = body
        .pointer("/call_inbound/from_number")
        .and_then(Value::as_str);
    let user = crate::elevenlabs::user_by_caller(app, number).await?;
    let mut inbound = serde_json::Map::new();
    if let Some(user) = &user {
        let token = crate::elevenlabs::mint_for_caller(app, user, None).await?;
        inbound.insert(
            "dynamic_variables".into(),
            json!({ app.config.retell.session_variable.clone(): token }),
        );
    }
    app.metrics.webhook(
        "retell_call_inbound",
        if user.is_some() {
            "known_caller"
        } else {
            "unknown_caller"
        },
    );
    tracing::info!(
        known = user.is_some(),
        user = user.as_deref().unwrap_or("-"),
        "Retell call_inbound answered"
    );
    crate::elevenlabs::record(app, WEBHOOK_PATH, 200, started, user, None, None);
    Ok(json!({ "call_inbound": Value::Object(inbound) }))
}

/// Retell custom functions, one per operation tool, each calling
/// `POST /v1/retell/tools/<name>`.
pub fn tools(cfg: &Config, catalogue: &Catalogue) -> Vec<Value> {
    catalogue
        .iter()
        .map(|t| {
            json!({
                "type": "custom",
                "name": t.name,
                "description": voice::function_description(t),
                "url": format!("{}{TOOLS_PATH}/{}", cfg.server.public_url, t.name),
                "method": "POST",
                "args_at_root": false,
                "parameters": voice::function_parameters(t),
                "speak_during_execution": false,
                "speak_after_execution": true,
                "timeout_ms": voice::platform_timeout_secs(cfg) * 1000,
            })
        })
        .collect()
}
