//! Everything that speaks ElevenLabs: the conversation-init and post-call
//! webhooks, webhook tool definitions, rewriting existing tools to go
//! through sidekey, and pushing tools to a workspace.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Value, json};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::app::{App, sha256};
use crate::body::{self, Body};
use crate::error::ApiError;
use sidekey_base::config::Config;
use sidekey_creds::client::HttpClient;
use sidekey_creds::providers::{Injection, Providers};
use sidekey_vault::AuditRecord;

// ---------------------------------------------------------------------------
// Conversation-init webhook

#[derive(Deserialize, Default)]
struct InitBody {
    #[serde(default)]
    caller_id: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    agent_id: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    called_number: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    call_sid: Option<String>,
    #[serde(default)]
    conversation_id: Option<String>,
}

async fn read_limited(req: Request<Incoming>, limit: u64) -> Result<Bytes, ApiError> {
    let (parts, body) = req.into_parts();
    crate::request::read_limited(&parts.headers, body, limit, Duration::from_secs(60)).await
}

/// A webhook answered with an error: counted, audited, answered.
fn refused(
    app: &App,
    path: &'static str,
    started: Instant,
    event: &str,
    outcome: &'static str,
    e: ApiError,
) -> Response<Body> {
    app.metrics.webhook(event, outcome);
    if matches!(e, ApiError::Unauthorized | ApiError::InvalidSignature(_)) {
        // Anyone can send these by the thousand: counted and summarised,
        // never one audit record each (see audit.rs).
        app.audit.refused(sidekey_creds::audit::Refused {
            path,
            code: e.code(),
            reason: None,
            status: e.status().as_u16(),
        });
    } else {
        record(
            app,
            path,
            e.status().as_u16(),
            started,
            None,
            None,
            Some(e.code()),
        );
    }
    e.into_response()
}

fn record(
    app: &App,
    path: &str,
    status: u16,
    started: Instant,
    user: Option<String>,
    conv: Option<String>,
    error: Option<&str>,
) {
    app.audit.record(AuditRecord {
        time: app.clock.now_millis(),
        kind: "webhook".into(),
        user,
        provider: None,
        method: "POST".into(),
        path: path.into(),
        status,
        duration_ms: (started.elapsed().as_secs_f64() * 1e6).round() / 1000.0,
        session_id: None,
        conversation_id: conv,
        error: error.map(str::to_owned),
    });
}

/// `POST /v1/elevenlabs/conversation-init`: caller id → user → a fresh
/// session in `dynamic_variables`. Answers fast: no fsync on this path (the
/// session record reaches disk with sled's periodic flush).
pub async fn conversation_init(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let path = "/v1/elevenlabs/conversation-init";
    let presented = req
        .headers()
        .get("x-sidekey-init-secret")
        .map(|v| sha256(v.as_bytes()));
    let ok = match (&app.init_secret, presented) {
        // Blank secrets are refused at start; never compare against one.
        (Some(s), Some(p)) if !s.is_empty() => bool::from(sha256(s.expose().as_bytes()).ct_eq(&p)),
        (None, _) => {
            tracing::warn!(
                "conversation-init called but no init secret is configured ([elevenlabs] init_secret_env)"
            );
            false
        }
        _ => false,
    };
    if !ok {
        return refused(
            app,
            path,
            started,
            "conversation_init",
            "unauthorized",
            ApiError::Unauthorized,
        );
    }
    let result = async {
        let raw = read_limited(req, 64 * 1024).await?;
        let b: InitBody = if raw.iter().all(u8::is_ascii_whitespace) {
            InitBody::default()
        } else {
            crate::request::json_object(&raw)?
        };
        let conv = b
            .conversation_id
            .filter(|c| sidekey_creds::session::valid_conversation_id(c));
        let user = match b
            .caller_id
            .as_deref()
            .and_then(sidekey_base::users::normalize_phone)
        {
            Some(phone) => app.store.user_by_phone(&phone).await.map_err(|e| {
                tracing::error!(error = %e, "cannot look up caller");
                ApiError::Internal
            })?,
            None => None,
        };
        let mut vars = serde_json::Map::new();
        if let Some(user) = &user {
            let providers = app
                .config
                .elevenlabs
                .init_providers
                .clone()
                .unwrap_or_else(|| app.providers.names().to_vec());
            let minted = app
                .sessions
                .mint_answer(
                    &app.config.sessions.dynamic_variable,
                    user,
                    providers,
                    app.config.sessions.ttl_secs,
                    conv.clone(),
                )
                .await?;
            vars.insert(
                app.config.sessions.dynamic_variable.clone(),
                minted["token"].clone(),
            );
        }
        vars.insert("user_id".into(), json!(user.clone().unwrap_or_default()));
        Ok::<_, ApiError>((user, conv, vars))
    }
    .await;
    match result {
        Ok((user, conv, vars)) => {
            let outcome = if user.is_some() {
                "known_caller"
            } else {
                "unknown_caller"
            };
            app.metrics.webhook("conversation_init", outcome);
            tracing::info!(
                known = user.is_some(),
                user = user.as_deref().unwrap_or("-"),
                "conversation-init answered"
            );
            record(app, path, 200, started, user, conv, None);
            body::json(
                StatusCode::OK,
                &json!({
                    "type": "conversation_initiation_client_data",
                    "dynamic_variables": Value::Object(vars),
                }),
            )
        }
        Err(e) => refused(app, path, started, "conversation_init", "error", e),
    }
}

// ---------------------------------------------------------------------------
// Post-call webhook

/// Parses `t=<unix>,v0=<hex>[,v0=<hex>...]`.
pub fn parse_signature(header: &str) -> Result<(i64, Vec<Vec<u8>>), &'static str> {
    let mut t = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        let Some((k, v)) = part.trim().split_once('=') else {
            return Err("malformed signature header");
        };
        match k.trim() {
            "t" => {
                t = Some(
                    v.trim()
                        .parse::<i64>()
                        .map_err(|_| "timestamp is not a number")?,
                )
            }
            "v0" => {
                let v = v.trim();
                if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                    continue;
                }
                sigs.push(
                    (0..32)
                        .map(|i| u8::from_str_radix(&v[2 * i..2 * i + 2], 16).unwrap_or(0))
                        .collect(),
                );
            }
            _ => {}
        }
    }
    let t = t.ok_or("no timestamp")?;
    if sigs.is_empty() {
        return Err("no v0 signature");
    }
    Ok((t, sigs))
}

/// A signature header that parsed and whose timestamp is fresh: what can
/// be checked before a byte of the body is read.
pub struct PendingSignature {
    t: i64,
    sigs: Vec<Vec<u8>>,
    mac: Hmac<Sha256>,
}

impl PendingSignature {
    /// Parses the header and checks the timestamp against `now`, with
    /// `tolerance` seconds either side; the MAC is then fed the body as it
    /// streams in ([`PendingSignature::update`]).
    pub fn start(
        header: &str,
        secret: &[u8],
        now: i64,
        tolerance: i64,
    ) -> Result<PendingSignature, &'static str> {
        let (t, sigs) = parse_signature(header)?;
        // abs_diff: a crafted `t` (i64::MIN) must not overflow the subtraction.
        if now.abs_diff(t) > tolerance.max(0) as u64 {
            return Err("timestamp outside tolerance");
        }
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("any key size");
        mac.update(t.to_string().as_bytes());
        mac.update(b".");
        Ok(PendingSignature { t, sigs, mac })
    }

    /// The signed timestamp.
    pub fn timestamp(&self) -> i64 {
        self.t
    }

    pub fn update(&mut self, chunk: &[u8]) {
        self.mac.update(chunk);
    }

    /// Compares in constant time against every candidate.
    pub fn verify(self) -> Result<(), &'static str> {
        let expected = self.mac.finalize().into_bytes();
        // Every candidate is compared (no early exit), so timing does not
        // tell which of several signatures matched.
        let mut any = subtle::Choice::from(0u8);
        for s in &self.sigs {
            any |= expected.as_slice().ct_eq(s.as_slice());
        }
        if bool::from(any) {
            Ok(())
        } else {
            Err("signature mismatch")
        }
    }
}

/// Checks an `ElevenLabs-Signature` against HMAC-SHA256(secret, "t.body"),
/// in constant time, with `tolerance` seconds either side of `now`.
pub fn verify_signature(
    header: &str,
    body: &[u8],
    secret: &[u8],
    now: i64,
    tolerance: i64,
) -> Result<(), &'static str> {
    let mut p = PendingSignature::start(header, secret, now, tolerance)?;
    p.update(body);
    p.verify()
}

#[derive(Deserialize)]
struct PostCall {
    #[serde(rename = "type")]
    kind: String,
    /// When the event happened (unix seconds); sessions minted after it
    /// are not the ones this event ends.
    #[serde(default)]
    event_timestamp: Option<f64>,
    #[serde(default)]
    data: Option<PostCallData>,
}

#[derive(Deserialize)]
struct PostCallData {
    #[serde(default)]
    conversation_id: Option<String>,
    // Transcripts and base64 audio are skipped, not allocated.
    #[serde(flatten)]
    #[allow(dead_code)]
    rest: std::collections::HashMap<String, IgnoredAny>,
}

const REVOKING_EVENTS: &[&str] = &[
    "post_call_transcription",
    "post_call_audio",
    "call_initiation_failure",
];

/// Why a post-call was refused: one of sidekey's errors, or a body that
/// did not arrive in time (408, which has no place among the contract's
/// agent-facing errors: only webhooks answer it).
enum PostCallError {
    Api(ApiError),
    TooSlow(&'static str),
}

impl From<ApiError> for PostCallError {
    fn from(e: ApiError) -> Self {
        PostCallError::Api(e)
    }
}

/// `408 request_timeout`, in the shape of every sidekey error. ElevenLabs
/// redelivers on 408 when the webhook's retries are switched on.
fn too_slow(message: &str) -> Response<Body> {
    let mut resp = body::json(
        StatusCode::REQUEST_TIMEOUT,
        &json!({"error": {"code": "request_timeout", "message": message}}),
    );
    resp.headers_mut().insert(
        &crate::error::ERROR_HEADER,
        http::HeaderValue::from_static("request_timeout"),
    );
    resp
}

/// `POST /v1/elevenlabs/post-call`: revokes every session bound to the
/// conversation and minted before the event. Redelivery finds nothing
/// left to revoke and answers 200.
///
/// Nothing is read before the cheap checks pass: a secret is configured,
/// the signature header parses and its timestamp is fresh. The body is
/// then read into memory held in `app.webhook_bodies` (all post-call
/// bodies in flight share it fairly, see [`sidekey_base::limits::Sharing`]) while
/// the HMAC is computed over it.
pub async fn post_call(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let path = "/v1/elevenlabs/post-call";
    let mut verified = false;
    let result = async {
        let Some(secret) = &app.webhook_secret else {
            tracing::warn!("post-call webhook called but no webhook secret is configured ([elevenlabs] webhook_secret_env)");
            return Err(ApiError::InvalidSignature("no webhook secret configured").into());
        };
        let sig = req
            .headers()
            .get("elevenlabs-signature")
            .ok_or(ApiError::InvalidSignature("missing ElevenLabs-Signature header"))?
            .to_str()
            .map_err(|_| ApiError::InvalidSignature("malformed signature header"))?;
        let mut pending = PendingSignature::start(
            sig,
            secret.expose().as_bytes(),
            app.clock.now(),
            app.config.elevenlabs.webhook_tolerance_secs,
        )
        .map_err(ApiError::InvalidSignature)?;
        let raw = read_signed_body(app, req, &mut pending).await?;
        let signed_at = pending.timestamp();
        pending.verify().map_err(ApiError::InvalidSignature)?;
        verified = true;
        let ev: PostCall = crate::request::json_object(&raw)?;
        drop(raw);
        let conv = ev.data.and_then(|d| d.conversation_id);
        // A replayed (validly signed) event must not end a session minted
        // after it happened.
        let event_time = ev
            .event_timestamp
            .filter(|t| t.is_finite() && *t > 0.0)
            .map(|t| t as i64)
            .unwrap_or(signed_at)
            .min(signed_at);
        let mut revoked = 0;
        if REVOKING_EVENTS.contains(&ev.kind.as_str()) {
            if let Some(c) = &conv {
                let sids = app.store.sessions_for_conversation(c).await.map_err(ApiError::from)?;
                for sid in sids {
                    let minted = app.store.session(&sid).await.map_err(ApiError::from)?.map(|r| r.iat);
                    if minted.is_some_and(|iat| iat > event_time) {
                        continue;
                    }
                    if app.store.revoke_session(&sid).await.map_err(ApiError::from)? {
                        revoked += 1;
                    }
                }
                app.store.flush().await.map_err(ApiError::from)?;
            }
        }
        Ok::<_, PostCallError>((ev.kind, conv, revoked))
    }
    .await;
    match result {
        Ok((kind, conv, revoked)) => {
            app.metrics.webhook(
                &kind
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .take(64)
                    .collect::<String>(),
                "ok",
            );
            tracing::info!(event = %kind.chars().take(64).collect::<String>(), conversation_id = conv.as_deref().unwrap_or("-"), sessions_revoked = revoked, "post-call webhook");
            record(app, path, 200, started, None, conv, None);
            body::json(
                StatusCode::OK,
                &json!({"status": "ok", "sessions_revoked": revoked}),
            )
        }
        Err(PostCallError::TooSlow(why)) => {
            tracing::warn!(reason = why, "post-call body cut off");
            app.metrics.webhook("post_call", "refused");
            app.audit.refused(sidekey_creds::audit::Refused {
                path,
                code: "request_timeout",
                reason: None,
                status: 408,
            });
            too_slow("The request body did not arrive in time.")
        }
        Err(PostCallError::Api(e)) => {
            if let ApiError::InvalidSignature(why) = &e {
                tracing::warn!(reason = why, "post-call webhook refused");
            }
            if !verified {
                // Anyone can send an unsigned body by the thousand (and cut
                // it off, or overrun the budget): counted and summarised,
                // never one audit record each.
                app.metrics.webhook("post_call", "refused");
                app.audit.refused(sidekey_creds::audit::Refused {
                    path,
                    code: e.code(),
                    reason: None,
                    status: e.status().as_u16(),
                });
                return e.into_response();
            }
            refused(app, path, started, "post_call", "refused", e)
        }
    }
}

/// The longest a post-call body may take, whatever its rate.
const BODY_DEADLINE: Duration = Duration::from_secs(60);

/// Reads a post-call body of at most `[elevenlabs] max_webhook_bytes`,
/// holding what it reads in the shared webhook budget and feeding it to
/// the signature as it arrives. Cut off with 408 when it arrives slower
/// than the minimum rate over a window, with 503 when the budget has no
/// room for it (or another body took its room back).
async fn read_signed_body(
    app: &App,
    req: Request<Incoming>,
    sig: &mut PendingSignature,
) -> Result<Bytes, PostCallError> {
    let cfg = &app.config.elevenlabs;
    let limit = cfg.max_webhook_bytes;
    let (parts, mut body) = req.into_parts();
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(ApiError::BodyTooLarge(limit).into());
    }
    let window = Duration::from_secs(cfg.webhook_min_rate_grace_secs);
    // Memory is held for what arrived, never for what a Content-Length
    // promises: a declared length costs the sender nothing.
    let mut budget = app.webhook_bodies.reader(
        sidekey_base::limits::Sharing {
            reserve: cfg.webhook_reserved_bytes,
            share: cfg.webhook_share_bytes,
            patience: window,
        },
        declared,
    );
    let min_per_window = cfg
        .webhook_min_bytes_per_sec
        .saturating_mul(cfg.webhook_min_rate_grace_secs);
    let deadline = tokio::time::Instant::now() + BODY_DEADLINE;
    let mut checkpoint = tokio::time::Instant::now() + window;
    let mut at_checkpoint: u64 = 0;
    let mut buf = bytes::BytesMut::with_capacity(declared.unwrap_or(0).min(64 * 1024) as usize);
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            () = tokio::time::sleep_until(checkpoint.min(deadline)) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(PostCallError::TooSlow("body not complete within 60 s"));
                }
                let got = buf.len() as u64;
                if got - at_checkpoint < min_per_window {
                    return Err(PostCallError::TooSlow("body slower than webhook_min_bytes_per_sec"));
                }
                at_checkpoint = got;
                checkpoint += window;
                continue;
            }
            () = budget.cut_off() => return Err(overloaded().into()),
        };
        let Some(frame) = frame else { break };
        let frame = frame
            .map_err(|_| ApiError::BadRequest("The request body could not be read.".into()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let total = buf.len() as u64 + data.len() as u64;
        if total > limit {
            return Err(ApiError::BodyTooLarge(limit).into());
        }
        if !budget.grow(data.len() as u64) {
            return Err(overloaded().into());
        }
        sig.update(&data);
        buf.extend_from_slice(&data);
    }
    Ok(buf.freeze())
}

fn overloaded() -> ApiError {
    tracing::warn!(
        "no room for a post-call body within [elevenlabs] webhook_memory_budget_bytes (or its share); answering 503"
    );
    ApiError::Overloaded
}

// ---------------------------------------------------------------------------
// Tool definitions

/// `x-conversation-id` → `X-Conversation-Id`.
fn title_case(h: &str) -> String {
    h.split('-')
        .map(sidekey_creds::providers::display_name)
        .collect::<Vec<_>>()
        .join("-")
}

fn tool_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect()
}

fn session_headers(cfg: &Config) -> Value {
    let mut h = serde_json::Map::new();
    h.insert(
        "X-Sidekey-Session".into(),
        json!({"variable_name": cfg.sessions.dynamic_variable}),
    );
    h.insert(
        title_case(cfg.elevenlabs.conversation_header.as_str()),
        json!({"variable_name": "system__conversation_id"}),
    );
    Value::Object(h)
}

/// The tools to create in ElevenLabs, each the body of `POST /v1/convai/tools`.
pub fn tools(cfg: &Config, providers: &Providers) -> Vec<Value> {
    let base = &cfg.server.public_url;
    let timeout = cfg.elevenlabs.tool_response_timeout_secs;
    let names: Vec<&String> = providers.names().iter().collect();
    let mut out = vec![json!({
        "tool_config": {
            "type": "webhook",
            "name": "sidekey_refresh_access",
            "description": "Renews the caller's access to their connected accounts. Use it once when another tool answered that access expired or could not be renewed, then retry that tool. If a provider's status comes back as reauth_required or credential_missing, tell the caller the message it gives (they need to connect the account in the app).",
            "response_timeout_secs": timeout,
            "tool_error_handling_mode": "passthrough",
            "api_schema": {
                "url": format!("{base}/v1/session/refresh"),
                "method": "POST",
                "content_type": "application/json",
                "request_headers": session_headers(cfg),
                "request_body_schema": {
                    "type": "object",
                    "description": "Which connected account to renew; leave provider empty to renew all of them.",
                    "required": [],
                    "properties": {
                        "provider": {
                            "type": "string",
                            "description": "The service whose access to renew.",
                            "enum": names,
                        }
                    }
                }
            }
        }
    })];
    for p in providers.iter() {
        let allowed = if p.allow_patterns.is_empty() {
            String::new()
        } else {
            format!(
                " Only these calls are allowed: {}.",
                p.allow_patterns.join(", ")
            )
        };
        let example = match p.preset.as_deref() {
            Some("slack") => {
                " For example method POST, path /chat.postMessage, body {\"channel\": \"C123\", \"text\": \"Hello\"}."
            }
            Some("google") => {
                " For example method GET, path /calendar/v3/calendars/primary/events, query maxResults=5&orderBy=startTime&singleEvents=true."
            }
            Some("telegram") => {
                " For example method POST, path /sendMessage, body {\"chat_id\": 123, \"text\": \"Hello\"}."
            }
            _ => "",
        };
        out.push(json!({
            "tool_config": {
                "type": "webhook",
                "name": tool_name(&format!("sidekey_{}", p.name)),
                "description": format!(
                    "Calls the {} API ({}) as the caller, with their connected {} account. Use it for anything the caller asks that needs their {} data or actions.{allowed}{example} If it answers with an error message, read that message to the caller.",
                    p.display, p.base.url, p.display, p.display
                ),
                "response_timeout_secs": timeout,
                "tool_error_handling_mode": "passthrough",
                "api_schema": {
                    "url": format!("{base}/v1/call/{}", p.name),
                    "method": "POST",
                    "content_type": "application/json",
                    "request_headers": session_headers(cfg),
                    "request_body_schema": {
                        "type": "object",
                        "description": format!("The {} API request to make.", p.display),
                        "required": ["method", "path"],
                        "properties": {
                            "method": {
                                "type": "string",
                                "description": "HTTP method of the API call.",
                                "enum": ["GET", "POST", "PUT", "PATCH", "DELETE"],
                            },
                            "path": {
                                "type": "string",
                                "description": format!("API path relative to {}, starting with /.", p.base.url),
                            },
                            "query": {
                                "type": "string",
                                "description": "Optional query string without the leading ?, e.g. limit=10&cursor=abc.",
                            },
                            "body": {
                                "type": "string",
                                "description": "Optional JSON request body, written as JSON text.",
                            }
                        }
                    }
                }
            }
        }));
    }
    out
}

// ---------------------------------------------------------------------------
// rewrite-tool

/// Re-points a tool that calls a provider directly at sidekey: URL under
/// `/v1/proxy/<provider>`, provider credential header replaced by the
/// session header. Accepts `{"tool_config": {...}}`, a tool as listed by
/// the API (`{"id", "tool_config"}`), or a bare tool config.
pub fn rewrite_tool(cfg: &Config, providers: &Providers, input: &Value) -> Result<Value, String> {
    let mut out = input.clone();
    // An item of the API's listing carries read-only fields that the
    // create/update request does not accept.
    if let Some(o) = out.as_object_mut() {
        for k in ["id", "access_info", "usage_stats"] {
            o.remove(k);
        }
    }
    let tc = if out.get("tool_config").is_some() {
        out.get_mut("tool_config").expect("checked")
    } else {
        &mut out
    };
    let api = tc
        .get_mut("api_schema")
        .ok_or("the tool has no api_schema (is it a webhook tool?)")?;
    let url = api
        .get("url")
        .and_then(Value::as_str)
        .ok_or("the tool's api_schema has no url")?
        .to_owned();
    let (provider, rest) = match_provider(providers, &url)
        .ok_or_else(|| format!("tool URL {url} matches no configured provider; add a [providers.NAME] section whose base_url is a prefix of it"))?;
    let p = providers.get(&provider).expect("matched");
    let mut rest = rest;
    if let Injection::PathPrefix { template } = &p.inject {
        // Drop the segment that carried the token, e.g. /bot{{secret__x}}.
        let literal = template
            .split("{token}")
            .next()
            .unwrap_or("")
            .trim_start_matches('/');
        let trimmed = rest.trim_start_matches('/');
        let (first, tail) = trimmed.split_once('/').unwrap_or((trimmed, ""));
        if !literal.is_empty() && first.starts_with(literal) {
            rest = format!("/{tail}");
        }
    }
    if let Injection::Query { param } = &p.inject {
        if let Some((path, q)) = rest.split_once('?') {
            let kept: Vec<&str> = q
                .split('&')
                .filter(|kv| kv.split('=').next() != Some(param.as_str()))
                .collect();
            rest = if kept.is_empty() {
                path.to_owned()
            } else {
                format!("{path}?{}", kept.join("&"))
            };
        }
        if let Some(props) = api
            .get_mut("query_params_schema")
            .and_then(|q| q.get_mut("properties"))
            .and_then(Value::as_object_mut)
        {
            props.remove(param);
        }
        if let Some(req) = api
            .get_mut("query_params_schema")
            .and_then(|q| q.get_mut("required"))
            .and_then(Value::as_array_mut)
        {
            req.retain(|v| v.as_str() != Some(param));
        }
    }
    api["url"] = json!(format!(
        "{}/v1/proxy/{provider}{rest}",
        cfg.server.public_url
    ));
    let mut headers = api
        .get("request_headers")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let injected = p.injected_header().map(|h| h.as_str().to_owned());
    headers.retain(|name, value| {
        let lname = name.to_ascii_lowercase();
        let carries_secret =
            value.to_string().contains("secret__") || value.get("secret_id").is_some();
        !(lname == "authorization"
            || Some(&lname) == injected.as_ref()
            || lname == "x-sidekey-session"
            || carries_secret)
    });
    if let Value::Object(extra) = session_headers(cfg) {
        headers.extend(extra);
    }
    api["request_headers"] = Value::Object(headers);
    let ours = cfg.elevenlabs.tool_response_timeout_secs;
    let cur = tc
        .get("response_timeout_secs")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    tc["response_timeout_secs"] = json!(cur.max(ours));
    tc["tool_error_handling_mode"] = json!("passthrough");
    Ok(out)
}

/// The provider whose base URL is the longest prefix of `url` (on a path
/// segment boundary), and the rest of the URL after it.
fn match_provider(providers: &Providers, url: &str) -> Option<(String, String)> {
    // ElevenLabs templates ({param}, {{var}}) are not valid URL syntax for
    // every parser: compare textually on scheme://host[:port]/path.
    let mut best: Option<(usize, String, String)> = None;
    for p in providers.iter() {
        let origin = &p.base.origin;
        let Some(after) = strip_prefix_ci(url, origin) else {
            continue;
        };
        if !(after.is_empty() || after.starts_with('/') || after.starts_with('?')) {
            continue;
        }
        let Some(rest) = after.strip_prefix(p.base.path.as_str()) else {
            continue;
        };
        if !(rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')) {
            continue;
        }
        let score = origin.len() + p.base.path.len();
        if best.as_ref().is_none_or(|b| score > b.0) {
            best = Some((score, p.name.clone(), rest.to_owned()));
        }
    }
    best.map(|(_, n, r)| (n, r))
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    if s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix) {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

// ---------------------------------------------------------------------------
// push-tools

async fn api_call(
    client: &HttpClient,
    method: Method,
    url: &str,
    key: &str,
    body: Option<&Value>,
) -> Result<Value, String> {
    let mut req = Request::builder()
        .method(method.clone())
        .uri(url)
        .header("accept", "application/json")
        .header("user-agent", concat!("sidekey/", env!("CARGO_PKG_VERSION")));
    let mut kv = http::HeaderValue::try_from(key)
        .map_err(|_| "ELEVENLABS_API_KEY is not a valid header value".to_string())?;
    kv.set_sensitive(true);
    req = req.header("xi-api-key", kv);
    let bytes = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            Bytes::from(serde_json::to_vec(b).unwrap_or_default())
        }
        None => Bytes::new(),
    };
    let req = req
        .body(Full::new(bytes))
        .map_err(|e| format!("bad request for {url}: {e}"))?;
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .map_err(|_| format!("{method} {url}: timed out"))?
        .map_err(|e| format!("{method} {url}: {}", sidekey_base::errors::error_chain(&e)))?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), 16 << 20)
        .collect()
        .await
        .map_err(|_| format!("{method} {url}: unreadable answer"))?
        .to_bytes();
    if !status.is_success() {
        let text: String = String::from_utf8_lossy(&bytes).chars().take(300).collect();
        return Err(format!("{method} {url}: HTTP {} {text}", status.as_u16()));
    }
    Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Creates or updates (matched by name) every generated tool. Returns one
/// line per tool: `created NAME (id)` or `updated NAME (id)`.
pub async fn push_tools(
    client: &HttpClient,
    api_base: &str,
    api_key: &str,
    tools: &[Value],
) -> Result<Vec<String>, String> {
    let base = api_base.trim_end_matches('/');
    let mut existing: Vec<(String, String)> = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let url = match &cursor {
            Some(c) => format!(
                "{base}/v1/convai/tools?cursor={}",
                url::form_urlencoded::byte_serialize(c.as_bytes()).collect::<String>()
            ),
            None => format!("{base}/v1/convai/tools"),
        };
        let list = api_call(client, Method::GET, &url, api_key, None).await?;
        // Anything but a tools list means this is not ElevenLabs' API (or
        // not the version we know): creating tools blindly would duplicate.
        let Some(items) = list.get("tools").and_then(Value::as_array) else {
            return Err(format!(
                "GET {url} did not answer with a tools list ({{\"tools\": [...]}}); is {base} the ElevenLabs API?"
            ));
        };
        for t in items {
            let id = t.get("id").and_then(Value::as_str);
            let name = t
                .get("tool_config")
                .and_then(|c| c.get("name"))
                .and_then(Value::as_str);
            if let (Some(id), Some(name)) = (id, name) {
                existing.push((name.to_owned(), id.to_owned()));
            }
        }
        let more = list
            .get("has_more")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        cursor = list
            .get("next_cursor")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if !more || cursor.is_none() {
            break;
        }
    }
    let mut lines = Vec::new();
    for tool in tools {
        let name = tool["tool_config"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match existing.iter().find(|(n, _)| *n == name) {
            Some((_, id)) => {
                api_call(
                    client,
                    Method::PATCH,
                    &format!("{base}/v1/convai/tools/{id}"),
                    api_key,
                    Some(tool),
                )
                .await?;
                lines.push(format!("updated {name} ({id})"));
            }
            None => {
                let created = api_call(
                    client,
                    Method::POST,
                    &format!("{base}/v1/convai/tools"),
                    api_key,
                    Some(tool),
                )
                .await?;
                let id = created
                    .get("id")
                    .and_then(Value::as_str)
                    .filter(|id| !id.is_empty())
                    .ok_or_else(|| {
                        format!(
                            "POST {base}/v1/convai/tools answered without the new tool's id; is {base} the ElevenLabs API?"
                        )
                    })?
                    .to_owned();
                lines.push(format!("created {name} ({id})"));
                existing.push((name, id));
            }
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn setup() -> (Config, Providers) {
        let cfg = Config::parse(
            r#"
[server]
public_url = "https://sidekey.example.com"
[providers.slack]
preset = "slack"
[providers.google]
preset = "google"
[providers.telegram]
preset = "telegram"
[providers.maps]
base_url = "https://maps.example.com/api"
inject = { query = "key" }
"#,
            Path::new("/x/c.toml"),
            Path::new("/x"),
        )
        .unwrap();
        let p = Providers::from_config(&cfg).unwrap();
        (cfg, p)
    }

    fn sign(secret: &[u8], t: i64, body: &[u8]) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn signatures() {
        let body = br#"{"type":"post_call_transcription"}"#;
        let good = sign(b"s3cret", 1000, body);
        assert!(
            verify_signature(&format!("t=1000,v0={good}"), body, b"s3cret", 1000, 1800).is_ok()
        );
        // rotation: one of several v0 values matches
        let other = sign(b"old", 1000, body);
        assert!(
            verify_signature(
                &format!("t=1000,v0={other},v0={good}"),
                body,
                b"s3cret",
                1100,
                1800
            )
            .is_ok()
        );
        assert!(
            verify_signature(&format!("t=1000,v0={good}"), b"{}", b"s3cret", 1000, 1800).is_err()
        );
        assert!(
            verify_signature(&format!("t=1000,v0={good}"), body, b"wrong", 1000, 1800).is_err()
        );
        assert_eq!(
            verify_signature(
                &format!("t=1000,v0={good}"),
                body,
                b"s3cret",
                1000 + 1801,
                1800
            ),
            Err("timestamp outside tolerance")
        );
        assert!(verify_signature("v0=abc", body, b"s3cret", 1000, 1800).is_err());
        assert!(verify_signature("garbage", body, b"s3cret", 1000, 1800).is_err());
        assert!(verify_signature("t=1000", body, b"s3cret", 1000, 1800).is_err());
        // Found by fuzzing: extreme timestamps are stale, never an overflow.
        for t in [i64::MIN, i64::MAX] {
            let h = format!("t={t},v0={}", sign(b"s3cret", t, body));
            assert_eq!(
                verify_signature(&h, body, b"s3cret", 1000, 1800),
                Err("timestamp outside tolerance")
            );
        }
    }

    #[test]
    fn generated_tools_use_only_secret_and_system_variables() {
        let (cfg, p) = setup();
        let tools = tools(&cfg, &p);
        assert_eq!(tools.len(), 5);
        let text = serde_json::to_string(&tools).unwrap();
        assert!(!text.contains("{{"));
        for t in &tools {
            let tc = &t["tool_config"];
            assert_eq!(tc["type"], "webhook");
            assert_eq!(tc["tool_error_handling_mode"], "passthrough");
            assert!(
                tc["response_timeout_secs"].as_u64().unwrap() > cfg.server.upstream_timeout_secs
            );
            let name = tc["name"].as_str().unwrap();
            assert!(
                name.len() <= 64
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            );
            let api = &tc["api_schema"];
            assert!(
                api["url"]
                    .as_str()
                    .unwrap()
                    .starts_with("https://sidekey.example.com/")
            );
            for (_, v) in api["request_headers"].as_object().unwrap() {
                let var = v["variable_name"].as_str().unwrap();
                assert!(var.starts_with("secret__") || var.starts_with("system__"));
            }
            for (_, prop) in api["request_body_schema"]["properties"]
                .as_object()
                .unwrap()
            {
                assert!(prop.get("description").is_some());
            }
        }
    }

    #[test]
    fn rewrite_slack_google_telegram_query() {
        let (cfg, p) = setup();
        let slack = json!({"tool_config": {"type": "webhook", "name": "post", "description": "d",
            "api_schema": {"url": "https://slack.com/api/chat.postMessage", "method": "POST",
            "request_headers": {"Authorization": "Bearer {{secret__slack_token}}", "Content-Type": "application/json"}}}});
        let out = rewrite_tool(&cfg, &p, &slack).unwrap();
        let api = &out["tool_config"]["api_schema"];
        assert_eq!(
            api["url"],
            "https://sidekey.example.com/v1/proxy/slack/chat.postMessage"
        );
        let h = api["request_headers"].as_object().unwrap();
        assert!(h.get("Authorization").is_none());
        assert_eq!(h["Content-Type"], "application/json");
        assert_eq!(
            h["X-Sidekey-Session"]["variable_name"],
            "secret__sidekey_session"
        );
        assert_eq!(
            h["X-Conversation-Id"]["variable_name"],
            "system__conversation_id"
        );
        assert_eq!(
            out["tool_config"]["tool_error_handling_mode"],
            "passthrough"
        );

        let google = json!({"type": "webhook", "name": "events", "api_schema": {
            "url": "https://www.googleapis.com/calendar/v3/calendars/{calendar_id}/events",
            "method": "GET", "request_headers": {"Authorization": {"secret_id": "abc"}}}});
        let out = rewrite_tool(&cfg, &p, &google).unwrap();
        assert_eq!(
            out["api_schema"]["url"],
            "https://sidekey.example.com/v1/proxy/google/calendar/v3/calendars/{calendar_id}/events"
        );
        assert!(
            out["api_schema"]["request_headers"]
                .get("Authorization")
                .is_none()
        );

        let tg = json!({"tool_config": {"type": "webhook", "name": "send", "api_schema": {
            "url": "https://api.telegram.org/bot{{secret__telegram_bot_token}}/sendMessage", "method": "POST"}}});
        let out = rewrite_tool(&cfg, &p, &tg).unwrap();
        assert_eq!(
            out["tool_config"]["api_schema"]["url"],
            "https://sidekey.example.com/v1/proxy/telegram/sendMessage"
        );
        assert!(!out.to_string().contains("telegram_bot_token"));

        let maps = json!({"type": "webhook", "name": "geo", "api_schema": {
            "url": "https://maps.example.com/api/geocode?key={{secret__maps}}&format=json", "method": "GET",
            "query_params_schema": {"properties": {"key": {"type": "string", "dynamic_variable": "secret__maps"}, "q": {"type": "string", "description": "d"}}, "required": ["key", "q"]}}});
        let out = rewrite_tool(&cfg, &p, &maps).unwrap();
        assert_eq!(
            out["api_schema"]["url"],
            "https://sidekey.example.com/v1/proxy/maps/geocode?format=json"
        );
        assert!(
            out["api_schema"]["query_params_schema"]["properties"]
                .get("key")
                .is_none()
        );
        assert_eq!(
            out["api_schema"]["query_params_schema"]["required"],
            json!(["q"])
        );
    }

    #[test]
    fn rewrite_refuses_unknown_urls() {
        let (cfg, p) = setup();
        let t = json!({"api_schema": {"url": "https://api.github.com/user", "method": "GET"}});
        let e = rewrite_tool(&cfg, &p, &t).unwrap_err();
        assert!(e.contains("https://api.github.com/user"), "{e}");
        // prefix on a segment boundary only
        let t = json!({"api_schema": {"url": "https://slack.com/apix/foo", "method": "GET"}});
        assert!(rewrite_tool(&cfg, &p, &t).is_err());
    }
}
