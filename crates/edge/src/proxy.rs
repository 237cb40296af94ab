//! The agent-facing request path, as named phases called in order:
//!
//! 1. `authenticate`   — session token → verified session; conversation binding; rate limit
//! 2. `select_provider` — provider exists and is in the session
//! 3. `check_request`  — path rules and the provider's allow list
//! 4. `read_body`      — buffered up to `max_body_bytes` (needed for a 401 replay)
//! 5. `credential_for` — the user's (or tenant's, or app's) credential, refreshed if due
//! 6. `send`           — strip client headers, inject, forward with a timeout
//! 7. `check_rejected` — 401 (or a preset's equivalent) → refresh once, replay once
//! 8. `finish`         — audit record, metrics, access log
//!
//! Errors from any phase are `ApiError`s, answered by `ApiError::into_response`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, BodyStream, StreamBody};
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::app::App;
use crate::body::{self, Body};
use crate::error::ApiError;
use sidekey_base::secret::scrub;
use sidekey_creds::audit::{Caller, ProxyRecord, Refused};
use sidekey_creds::client::IdleTimeoutBody;
use sidekey_creds::owners;
use sidekey_creds::providers::{InjectError, Provider, ProxyPath, check_path};
use sidekey_creds::refresh::Forced;
use sidekey_creds::session::SessionFault;
use sidekey_creds::session::VerifiedSession;
use sidekey_vault::{AuditRecord, Credential, Owner};

/// What one request did, for the audit log, metrics and the access log.
#[derive(Default)]
pub(crate) struct Trace {
    /// The verified session and the provider, as far as the request got.
    caller: Caller,
    /// The audited path of a route with no provider path.
    path: String,
    /// The provider path once checked; the request borrows it from here
    /// and `finish` moves it into the records (no copy).
    checked: Option<ProxyPath>,
    error: Option<&'static str>,
    /// Route group for refused-request summaries (`/v1/proxy`, ...).
    route: &'static str,
    /// Why a session was refused (`invalid_session` answers only).
    reason: Option<&'static str>,
    /// The operation tool called, for the audit record.
    pub(crate) tool: Option<Arc<str>>,
}

impl Trace {
    /// A trace for a route other than the proxy's, audited as `path`.
    pub(crate) fn for_route(route: &'static str, path: String) -> Trace {
        Trace {
            route,
            path,
            ..Default::default()
        }
    }
}

// ---------------------------------------------------------------------------
// Entry points

/// `ANY /v1/proxy/{provider}/{path...}`
pub async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let mut t = Trace {
        route: "/v1/proxy",
        ..Default::default()
    };
    let result = proxy(app, &parts, body, &mut t).await;
    finish(app, &parts.method, started, t, result)
}

async fn proxy(
    app: &Arc<App>,
    parts: &Parts,
    body: Incoming,
    t: &mut Trace,
) -> Result<Response<Body>, ApiError> {
    let session = authenticate(app, &parts.headers, t).await?;
    let (name, rest) = split_proxy_path(parts.uri.path());
    let provider = select_provider(app, &session, name, t)?;
    let path = check_request(&provider, &parts.method, rest, t)?;
    if !matches!(
        parts.method,
        Method::GET
            | Method::POST
            | Method::PUT
            | Method::PATCH
            | Method::DELETE
            | Method::HEAD
            | Method::OPTIONS
    ) {
        return Err(ApiError::MethodNotAllowed);
    }
    let body = read_body(app, &parts.headers, body).await?;
    let filter = ForwardFilter::new(
        &parts.headers,
        &provider,
        &app.config.elevenlabs.conversation_header,
    );
    let outgoing = Outgoing {
        method: parts.method.clone(),
        path,
        query: parts.uri.query().map(str::to_owned),
        headers: sidekey_creds::client::Headers::filtered(&parts.headers, &filter),
        body,
    };
    call_provider(app, &provider, &session, &outgoing).await
}

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

/// `POST /v1/session/refresh`: the mid-conversation refresh tool.
pub async fn refresh_tool(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let mut t = Trace {
        path: "/v1/session/refresh".into(),
        route: "/v1/session/refresh",
        ..Default::default()
    };
    let result = refresh_providers(app, &parts, body, &mut t).await;
    finish(app, &parts.method, started, t, result)
}

async fn refresh_providers(
    app: &Arc<App>,
    parts: &Parts,
    body: Incoming,
    t: &mut Trace,
) -> Result<Response<Body>, ApiError> {
    let session = authenticate(app, &parts.headers, t).await?;
    let raw = read_body(app, &parts.headers, body).await?;
    #[derive(serde::Deserialize, Default)]
    struct RefreshBody {
        #[serde(default)]
        provider: Option<String>,
    }
    let req: RefreshBody = if raw.iter().all(u8::is_ascii_whitespace) {
        RefreshBody::default()
    } else {
        crate::request::json_object(&raw)?
    };
    let names: Vec<String> = match req.provider.filter(|p| !p.is_empty()) {
        Some(p) => {
            select_provider(app, &session, &p, t)?;
            vec![p]
        }
        None => session
            .providers()
            .iter()
            .filter(|p| app.providers.get(p).is_some())
            .cloned()
            .collect(),
    };
    let mut out = serde_json::Map::new();
    for name in names {
        let provider = app.providers.get(&name).expect("filtered above").clone();
        let cp = credential_provider(app, &provider)?;
        let result = if cp.grant == sidekey_creds::providers::Grant::JwtBearer {
            crate::jwt::force(app, &cp, session.user()).await.map(Some)
        } else {
            let owner = owner_with_credential(app, &cp, session.user()).await?;
            match &owner {
                Some(o) => app.refresher.force(&cp, o).await,
                None => Ok(None),
            }
            .map_err(ApiError::from)
        };
        let entry = match result {
            Ok(Some(Forced::Refreshed(c))) => {
                json!({"status": "refreshed", "expires_at": c.expires_at})
            }
            Ok(Some(Forced::Active(c))) => json!({"status": "active", "expires_at": c.expires_at}),
            Ok(None) => {
                let e = ApiError::CredentialMissing(provider.label());
                json!({"status": "credential_missing", "message": e.message()})
            }
            Err(e @ ApiError::ReauthRequired(_)) => {
                json!({"status": "reauth_required", "message": e.message()})
            }
            // Without a client id no retry can succeed: say so rather than
            // "try again in a moment", and tell the operator in the log.
            Err(ApiError::RefreshFailed(_)) if provider.client_id.is_none() => {
                tracing::warn!(
                    provider = %provider.name,
                    "refresh tool: {}",
                    crate::oauth::client_id_missing(app, &provider)
                );
                json!({"status": "refresh_failed", "message": format!(
                    "I can't renew access to your {} account because sidekey isn't set up for {} yet; please let the app's support team know.",
                    provider.display, provider.display
                )})
            }
            Err(e @ ApiError::RefreshFailed(_)) => {
                json!({"status": "refresh_failed", "message": e.message()})
            }
            Err(e @ (ApiError::GrantRefused(..) | ApiError::SubjectNotAllowed(..))) => {
                json!({"status": e.code(), "message": e.message()})
            }
            Err(e @ ApiError::CredentialMissing(_)) => {
                json!({"status": "credential_missing", "message": e.message()})
            }
            Err(e) => return Err(e),
        };
        out.insert(name, entry);
    }
    Ok(body::json(
        StatusCode::OK,
        &json!({"status": "ok", "providers": Value::Object(out)}),
    ))
}

// ---------------------------------------------------------------------------
// Phases

/// Parsed once: a lookup by `&str` parses and lowercases the name on
/// every request.
static SESSION_HEADER: HeaderName = HeaderName::from_static("x-sidekey-session");

pub(crate) fn session_token(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(&SESSION_HEADER) {
        return v.to_str().ok().map(str::trim);
    }
    let auth = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = auth.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// Phase 1: the session token, conversation binding and rate limits.
pub(crate) async fn authenticate(
    app: &Arc<App>,
    headers: &HeaderMap,
    t: &mut Trace,
) -> Result<VerifiedSession, ApiError> {
    let conv_header = &app.config.elevenlabs.conversation_header;
    let conv = match headers.get(conv_header) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .map(str::trim)
                .filter(|s| sidekey_creds::session::valid_conversation_id(s))
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "The {conv_header} header is not a valid conversation id."
                    ))
                })?,
        ),
    };
    authenticate_token(app, session_token(headers), conv, t).await
}

/// Phase 1 for a token and conversation id that came from anywhere (the
/// headers, an MCP request, a Vapi or Retell call's variables).
pub(crate) async fn authenticate_token(
    app: &Arc<App>,
    token: Option<&str>,
    conv: Option<&str>,
    t: &mut Trace,
) -> Result<VerifiedSession, ApiError> {
    let token = token
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(ApiError::InvalidSession(
            SessionFault::Missing,
            "no session token",
        ))?;
    let mut session = app.sessions.verify(token).await?;
    t.caller.session = Some(session.clone());
    // An unbound session is a bearer pass for whichever conversation uses
    // it first: it has to be claimed soon after minting, or never.
    let bind_within = app.config.sessions.bind_within_secs;
    if session.conv().is_none()
        && bind_within > 0
        && app.clock.now() > session.iat().saturating_add(bind_within)
    {
        return Err(ApiError::InvalidSession(
            SessionFault::Expired,
            "unbound session past [sessions] bind_within_secs",
        ));
    }
    match (session.conv(), conv) {
        (Some(bound), Some(c)) if bound != c => {
            return Err(Box::pin(session_conflict(app, &session, bound, c)).await);
        }
        (Some(_), None) if app.config.sessions.require_conversation_header => {
            return Err(ApiError::ConversationMissing);
        }
        // Boxed, as the two conflict paths: rare, and large futures.
        (None, Some(c)) => match Box::pin(app.store.bind_session(session.sid(), c)).await {
            Ok(sidekey_vault::BindOutcome::Bound) => {
                tracing::info!(session_id = %session.sid(), conversation_id = %c, "session bound to conversation");
                session.bound_to(c);
                t.caller.session = Some(session.clone());
            }
            Ok(sidekey_vault::BindOutcome::Mismatch) => {
                // Another conversation bound it a moment ago.
                return Err(Box::pin(session_conflict(app, &session, "-", c)).await);
            }
            Ok(sidekey_vault::BindOutcome::Gone) => {
                return Err(ApiError::InvalidSession(
                    SessionFault::Revoked,
                    "session revoked or unknown",
                ));
            }
            Err(e) => return Err(ApiError::from(e)),
        },
        _ => {}
    }
    // Checked: the conversation is recorded even if a later check
    // refuses the call.
    t.caller.conversation = true;
    app.limits
        .check(session.sid(), session.user(), app.clock.now_millis())
        .map_err(|retry_after_secs| ApiError::RateLimited { retry_after_secs })?;
    Ok(session)
}

/// A session used from a second conversation: one of the two holders is
/// not who it was minted for, and sidekey cannot tell which. Revoking it
/// stops both; the real conversation's app mints a new one. Audited as
/// `session_conflict` and counted.
async fn session_conflict(
    app: &Arc<App>,
    session: &VerifiedSession,
    bound: &str,
    presented: &str,
) -> ApiError {
    match app.store.revoke_session(session.sid()).await {
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "cannot revoke a conflicting session"),
    }
    app.metrics.session_conflict();
    tracing::warn!(
        session_id = %session.sid(),
        user = %session.user(),
        bound_conversation = %bound,
        conversation_id = %presented,
        "session used from a second conversation; revoked"
    );
    app.audit.record(AuditRecord {
        time: app.clock.now_millis(),
        kind: "session_conflict".into(),
        user: Some(session.user().to_owned()),
        provider: None,
        method: "-".into(),
        path: "-".into(),
        status: 401,
        duration_ms: 0.0,
        session_id: Some(session.sid().to_owned()),
        conversation_id: Some(presented.chars().take(256).collect()),
        error: Some("conversation_mismatch".into()),
        tool: None,
        subject: None,
    });
    ApiError::ConversationMismatch
}

/// `/v1/proxy/slack/chat.postMessage` → (`slack`, `/chat.postMessage`).
fn split_proxy_path(path: &str) -> (&str, &str) {
    let rest = path.strip_prefix("/v1/proxy").unwrap_or(path);
    let rest = rest.strip_prefix('/').unwrap_or(rest);
    match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    }
}

/// Phase 2: the provider exists and the session may use it. The provider
/// goes into the trace, or the name asked for when it is refused.
pub(crate) fn select_provider(
    app: &Arc<App>,
    session: &VerifiedSession,
    name: &str,
    t: &mut Trace,
) -> Result<Arc<Provider>, ApiError> {
    let selected = allowed_provider(app, session, name);
    match &selected {
        Ok(p) => t.caller.provider = Some(p.clone()),
        Err(_) => t.caller.requested = Some(name.to_owned()),
    }
    selected
}

fn allowed_provider(
    app: &Arc<App>,
    session: &VerifiedSession,
    name: &str,
) -> Result<Arc<Provider>, ApiError> {
    let label = || app.providers.label(name);
    if !sidekey_base::config::valid_id(name) {
        return Err(ApiError::UnknownProvider(
            sidekey_creds::providers::ProviderLabel::unknown(
                &name
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric())
                    .take(64)
                    .collect::<String>(),
            ),
        ));
    }
    let provider = app
        .providers
        .get(name)
        .ok_or_else(|| ApiError::UnknownProvider(label()))?;
    // A session granting a provider grants every provider that uses its
    // credential (`credential_from`).
    let granted = |n: &str| session.providers().iter().any(|p| p == n);
    if !granted(name) && !provider.credential_from.as_deref().is_some_and(granted) {
        return Err(ApiError::ProviderNotAllowed(label()));
    }
    Ok(provider.clone())
}

/// Phase 3: path rules, then the allow list. The checked path goes into
/// the trace (audited however the request ends) and is lent from there.
pub(crate) fn check_request<'t>(
    provider: &Provider,
    method: &Method,
    rest: &str,
    t: &'t mut Trace,
) -> Result<&'t ProxyPath, ApiError> {
    let path = &*t
        .checked
        .insert(check_path(rest).map_err(ApiError::BadPath)?);
    if !provider.allows(method, path.decoded()) {
        return Err(ApiError::PathNotAllowed(provider.label()));
    }
    Ok(path)
}

/// Phase 4: the request body, at most `max_body_bytes`.
pub(crate) async fn read_body(
    app: &Arc<App>,
    headers: &HeaderMap,
    body: Incoming,
) -> Result<Bytes, ApiError> {
    crate::request::read_limited(
        headers,
        body,
        app.config.server.max_body_bytes,
        Duration::from_secs(app.config.server.upstream_timeout_secs),
    )
    .await
}

/// Which owner holds the credential a user would use, without refreshing
/// (the app's token of a client-credentials provider is fetched on demand,
/// so the app always qualifies).
async fn owner_with_credential(
    app: &Arc<App>,
    p: &Provider,
    user: &str,
) -> Result<Option<Owner>, ApiError> {
    let found = owners::first_with(&app.store, p, user, |o| async move {
        if o == Owner::App {
            return Ok::<_, ApiError>(Some(()));
        }
        Ok(app.store.credential(&o, &p.name).await?.map(|_| ()))
    })
    .await?;
    Ok(found.map(|(o, ())| o))
}

/// The provider whose credential `p` uses and refreshes (its
/// `credential_from`, else itself): the store key, the token endpoint and
/// the client come from it; base URL, allow list and injection from `p`.
pub(crate) fn credential_provider(app: &App, p: &Provider) -> Result<Arc<Provider>, ApiError> {
    app.providers
        .credential_provider(p)
        .cloned()
        .ok_or_else(|| {
            tracing::error!(provider = %p.name, "credential_from names no configured provider");
            ApiError::Internal
        })
}

/// Phase 5: a credential ready to inject, refreshed first if it is due.
pub(crate) async fn credential_for(
    app: &Arc<App>,
    p: &Provider,
    user: &str,
) -> Result<(Owner, Arc<Credential>), ApiError> {
    let cp = credential_provider(app, p)?;
    let cp = &*cp;
    if cp.grant == sidekey_creds::providers::Grant::JwtBearer {
        return crate::jwt::credential(app, cp, user).await;
    }
    owners::first_with(&app.store, cp, user, |o| async move {
        Ok::<_, ApiError>(app.refresher.usable(cp, &o).await?)
    })
    .await?
    .ok_or_else(|| ApiError::CredentialMissing(p.label()))
}

/// A request ready to go upstream, minus the credential.
pub(crate) struct Outgoing<'a> {
    pub(crate) method: Method,
    pub(crate) path: &'a ProxyPath,
    pub(crate) query: Option<String>,
    pub(crate) headers: sidekey_creds::client::Headers<'a>,
    pub(crate) body: Bytes,
}

/// Phases 5–7 for one call: credential, send, and one refresh-and-replay.
pub(crate) async fn call_provider(
    app: &Arc<App>,
    provider: &Arc<Provider>,
    session: &VerifiedSession,
    out: &Outgoing<'_>,
) -> Result<Response<Body>, ApiError> {
    let (owner, cred) = credential_for(app, provider, session.user()).await?;
    let resp = send(app, provider, out, &cred).await?;
    let resp = with_subject(resp, &cred);
    match check_rejected(app, provider, resp).await {
        Checked::Pass(resp) => Ok(resp),
        Checked::Rejected(resp) => {
            let cp = credential_provider(app, provider)?;
            match app
                .refresher
                .after_reject(&cp, &owner, cred.generation)
                .await
            {
                Ok(Some(fresh)) => {
                    tracing::info!(provider = %provider.name, "upstream rejected the token; replaying once with a refreshed one");
                    let resp = send(app, provider, out, &fresh).await?;
                    // Never loop: whatever the replay answers goes back.
                    Ok(with_subject(resp, &fresh))
                }
                // Not refreshable: the upstream's own answer goes back.
                Ok(None) => Ok(resp),
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// Names a JWT bearer token's subject for the audit record.
fn with_subject(mut resp: Response<Body>, cred: &Credential) -> Response<Body> {
    if let Some(j) = &cred.jwt {
        resp.extensions_mut()
            .insert(crate::jwt::AuditSubject(j.subject.clone()));
    }
    resp
}

/// Which headers the client sent may go upstream: no credentials of its
/// own, no session, no hop-by-hop, no conversation header. Applied while
/// the upstream request is written ([`sidekey_creds::client::Headers`]).
struct ForwardFilter<'a> {
    provider: &'a Provider,
    conv_header: &'a HeaderName,
    /// Names the client's `Connection` header lists (hop-by-hop too).
    listed: Vec<String>,
}

impl<'a> ForwardFilter<'a> {
    fn new(incoming: &HeaderMap, provider: &'a Provider, conv_header: &'a HeaderName) -> Self {
        let listed = incoming
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().to_ascii_lowercase())
            .collect();
        ForwardFilter {
            provider,
            conv_header,
            listed,
        }
    }
}

impl sidekey_creds::client::HeaderFilter for ForwardFilter<'_> {
    // Runs for every header of every proxied call: the fixed names are one
    // `match` on the name, not a comparison each.
    fn keeps(&self, name: &HeaderName) -> bool {
        let n = name.as_str();
        let refused = match n {
            sidekey_creds::hop_by_hop_names!()
            | "host"
            | "authorization"
            | "cookie"
            | "content-length"
            | "expect" => true,
            // Slack-style `ok: false` answers must be read to be
            // recognised; ask for an uncompressed body.
            "accept-encoding" => !self.provider.conventions.ok_false_auth_errors.is_empty(),
            _ => n.starts_with("x-sidekey-"),
        };
        !(refused
            || name == self.conv_header
            || self.provider.injected_header() == Some(name)
            || self.listed.iter().any(|l| l == n))
    }
}

/// Phase 6: inject and forward; response headers within the upstream timeout.
async fn send(
    app: &Arc<App>,
    p: &Provider,
    out: &Outgoing<'_>,
    cred: &Credential,
) -> Result<Response<Body>, ApiError> {
    // A base with `{field}` placeholders is built from the credential's
    // connection values; a value still missing means not connected yet.
    let base = p
        .base_for(&cred.connection)
        .map_err(|e| ApiError::connection(p, e))?;
    let uri = p
        .upstream_uri_at(
            &base,
            out.path,
            out.query.as_deref(),
            cred.access_token.as_ref(),
        )
        .map_err(|e| inject_error(p, e))?;
    let req = sidekey_creds::client::Outbound {
        method: &out.method,
        uri,
        headers: out.headers.with_defaults(&p.headers),
        credential: p.credential_header(cred).map_err(|e| inject_error(p, e))?,
        body: out.body.clone(),
    };

    let timeout = Duration::from_secs(app.config.server.upstream_timeout_secs);
    // One clock reading for both the deadline and the latency metric.
    let started = tokio::time::Instant::now();
    let sent = sidekey_creds::client::request(&app.client, req);
    let resp = match tokio::time::timeout_at(started + timeout, sent).await {
        Err(_) => {
            tracing::warn!(provider = %p.name, timeout_secs = timeout.as_secs(), "upstream timed out");
            return Err(ApiError::UpstreamTimeout(p.label()));
        }
        Ok(Err(e)) => {
            let secrets: Vec<&sidekey_base::secret::Secret> = cred.access_token.iter().collect();
            tracing::warn!(
                provider = %p.name,
                error = %scrub(&sidekey_base::errors::error_chain(&e), &secrets),
                "upstream request failed"
            );
            return Err(ApiError::UpstreamUnreachable(p.label()));
        }
        Ok(Ok(r)) => r,
    };
    app.metrics
        .upstream_latency(&p.metric_label, started.elapsed().as_secs_f64());
    let (mut parts, incoming) = resp.into_parts();
    if filter_answer_headers(&mut parts.headers).is_err() {
        tracing::warn!(provider = %p.name, "upstream answer with conflicting Content-Length values refused");
        return Err(ApiError::UpstreamUnreachable(p.label()));
    }
    // A body that came whole with the head cannot stall: no idle timer.
    let body = if incoming.is_read() {
        incoming.boxed_unsync()
    } else {
        IdleTimeoutBody::new(incoming, timeout).boxed_unsync()
    };
    Ok(Response::from_parts(parts, body))
}

fn inject_error(p: &Provider, e: InjectError) -> ApiError {
    match e {
        InjectError::MissingToken => ApiError::CredentialMissing(p.label()),
        // Path and query were checked and encoded; what is left is a
        // request line the URI parser still refuses (over 64 KiB): the
        // caller's input, so a 400, never a 500.
        InjectError::BadUri => ApiError::BadRequest(
            "The request address is too long or not valid; shorten the path or query.".into(),
        ),
        other => {
            tracing::error!(provider = %p.name, error = %other, "cannot build the upstream request");
            ApiError::Internal
        }
    }
}

/// The upstream's headers as the agent may get them: no hop-by-hop
/// headers (nor those its `Connection` names), no `X-Sidekey-*` (only
/// sidekey speaks for sidekey), no `Set-Cookie` or
/// `Strict-Transport-Security` (they would apply to sidekey's origin), and
/// at most one `Content-Length`. `Err` for lengths that disagree: the
/// answer's end is unknown. hyper's parsers already refuse those and
/// sidekey's own exchange merges equal repeats; this holds it for every
/// client.
fn filter_answer_headers(h: &mut HeaderMap) -> Result<(), ()> {
    // One pass by name over every header; nothing is built or removed
    // unless something has to go (this runs on every response).
    let mut strip = false;
    let mut lengths = 0;
    let mut listed = false;
    for (n, v) in h.iter() {
        match n.as_str() {
            sidekey_creds::hop_by_hop_names!() | "set-cookie" | "strict-transport-security" => {
                strip = true;
            }
            "content-length" => {
                lengths += 1;
                listed |= v.as_bytes().contains(&b',');
            }
            n => strip |= n.starts_with("x-sidekey-"),
        }
    }
    if lengths > 1 || listed {
        let mut one: Option<u64> = None;
        for v in h.get_all(header::CONTENT_LENGTH) {
            for part in v.to_str().map_err(|_| ())?.split(',') {
                let n: u64 = part.trim().parse().map_err(|_| ())?;
                if one.is_some_and(|m| m != n) {
                    return Err(());
                }
                one = Some(n);
            }
        }
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(one.ok_or(())?));
    }
    if !strip {
        return Ok(());
    }
    if h.contains_key(header::CONNECTION) {
        let listed: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|s| HeaderName::from_bytes(s.trim().as_bytes()).ok())
            // The framing header stays: it is sidekey's to decide.
            .filter(|n| *n != header::CONTENT_LENGTH)
            .collect();
        for n in listed {
            h.remove(n);
        }
    }
    let gone: Vec<HeaderName> = h
        .keys()
        .filter(|n| {
            matches!(
                n.as_str(),
                sidekey_creds::hop_by_hop_names!() | "set-cookie" | "strict-transport-security"
            ) || n.as_str().starts_with("x-sidekey-")
        })
        .cloned()
        .collect();
    for n in gone {
        h.remove(n);
    }
    Ok(())
}

enum Checked {
    Pass(Response<Body>),
    /// The upstream refused the token (401, or the preset's equivalent).
    Rejected(Response<Body>),
}

/// Phase 7: did the upstream refuse the token?
async fn check_rejected(app: &Arc<App>, p: &Provider, resp: Response<Body>) -> Checked {
    if resp.status() == StatusCode::UNAUTHORIZED {
        return Checked::Rejected(resp);
    }
    let json_ok = resp.status() == StatusCode::OK
        && !p.conventions.ok_false_auth_errors.is_empty()
        && resp.headers().get(header::CONTENT_ENCODING).is_none()
        && resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("json"));
    if !json_ok {
        return Checked::Pass(resp);
    }
    let (parts, body) = resp.into_parts();
    let timeout = Duration::from_secs(app.config.server.upstream_timeout_secs);
    let (body, rejected) = match peek(body, 1 << 20, timeout).await {
        Peeked::Whole(whole) => {
            let rejected = serde_json::from_slice::<Value>(&whole)
                .ok()
                .is_some_and(|v| {
                    v.get("ok") == Some(&Value::Bool(false))
                        && v.get("error")
                            .and_then(Value::as_str)
                            .is_some_and(|e| p.conventions.ok_false_auth_errors.contains(&e))
                });
            (body::full(whole), rejected)
        }
        Peeked::Longer(prefix, rest) => {
            let head =
                futures_util::stream::once(async move { Ok(http_body::Frame::data(prefix)) });
            use futures_util::StreamExt;
            let body = StreamBody::new(head.chain(BodyStream::new(rest))).boxed_unsync();
            (body, false)
        }
        // What was read, then the same failure a streamed body would
        // have ended with: the agent's response breaks off (connection or
        // stream reset), never a complete shorter answer.
        Peeked::Broken(prefix, error) => {
            let frames = [Ok(http_body::Frame::data(prefix)), Err(error)];
            (
                StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync(),
                false,
            )
        }
    };
    let resp = Response::from_parts(parts, body);
    if rejected {
        Checked::Rejected(resp)
    } else {
        Checked::Pass(resp)
    }
}

/// The start of an upstream body, read to be inspected.
enum Peeked {
    /// The whole body.
    Whole(Bytes),
    /// More than the limit: what was read, and the rest still unread.
    Longer(Bytes, Body),
    /// The body broke off (an error, or a stall longer than the upstream
    /// timeout) after what was read.
    Broken(Bytes, sidekey_base::errors::BoxError),
}

/// Reads up to `limit` bytes of `body`, each frame within `timeout`.
async fn peek(mut body: Body, limit: usize, timeout: Duration) -> Peeked {
    let mut buf = BytesMut::new();
    loop {
        match tokio::time::timeout(timeout, body.frame()).await {
            Ok(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    buf.extend_from_slice(&d);
                    if buf.len() > limit {
                        return Peeked::Longer(buf.freeze(), body);
                    }
                }
            }
            Ok(None) => return Peeked::Whole(buf.freeze()),
            Ok(Some(Err(e))) => return Peeked::Broken(buf.freeze(), e),
            Err(_) => {
                return Peeked::Broken(buf.freeze(), Box::new(sidekey_creds::client::BodyStalled));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Phase 8

pub(crate) fn finish(
    app: &Arc<App>,
    method: &Method,
    started: Instant,
    mut t: Trace,
    result: Result<Response<Body>, ApiError>,
) -> Response<Body> {
    let subject;
    let resp = match result {
        Ok(mut r) => {
            subject = r
                .extensions_mut()
                .remove::<crate::jwt::AuditSubject>()
                .map(|s| s.0);
            r
        }
        Err(e) => {
            subject = e.subject().map(str::to_owned);
            t.error = Some(e.code());
            if let ApiError::InvalidSession(fault, detail) = &e {
                t.reason = Some(fault.reason());
                tracing::debug!(reason = fault.reason(), detail, "session refused");
            }
            e.into_response()
        }
    };
    // The path as the audit log and access log show it: decoded, `/` for
    // an empty one.
    if let Some(p) = t.checked.take() {
        t.path = if p.raw.is_empty() {
            "/".into()
        } else {
            p.into_decoded()
        };
    }
    let status = resp.status().as_u16();
    let elapsed = started.elapsed();
    let caller = &t.caller;
    // A provider refused for this session still has its own label.
    let refused = || {
        caller
            .requested
            .as_deref()
            .and_then(|p| app.providers.get(p))
    };
    let label = match &caller.provider {
        Some(p) => &p.metric_label,
        None => refused()
            .map(|p| &p.metric_label)
            .unwrap_or(app.metrics.no_provider()),
    };
    app.metrics.request(label, status);
    tracing::info!(
        target: "sidekey::access",
        method = %method,
        provider = %caller.provider_name().unwrap_or("-"),
        path = %t.path,
        status,
        ms = elapsed.as_secs_f64() * 1000.0,
        user = caller.user().unwrap_or("-"),
        session_id = caller.session_id().unwrap_or("-"),
        conversation_id = caller.conversation_id().unwrap_or("-"),
        error = t.error.unwrap_or("-"),
        reason = t.reason.unwrap_or("-"),
    );
    if let Some(reason) = t.reason {
        // Unauthenticated: counted and summarised, not one record each
        // (see audit.rs), so a flood cannot evict records of real calls.
        app.metrics.unauthenticated(reason);
        app.audit.refused(Refused {
            path: t.route,
            code: "invalid_session",
            reason: Some(reason),
            status,
        });
        return resp;
    }
    app.audit.record_proxy(ProxyRecord {
        time: app.clock.now_millis(),
        caller: t.caller,
        method: sidekey_vault::method_name(method),
        path: t.path,
        status,
        duration_ms: (elapsed.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
        error: t.error,
        tool: t.tool,
        subject,
    });
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_paths() {
        assert_eq!(
            split_proxy_path("/v1/proxy/slack/chat.postMessage"),
            ("slack", "/chat.postMessage")
        );
        assert_eq!(split_proxy_path("/v1/proxy/slack"), ("slack", ""));
        assert_eq!(split_proxy_path("/v1/proxy/slack/"), ("slack", "/"));
        assert_eq!(split_proxy_path("/v1/proxy/"), ("", ""));
    }

    #[test]
    fn tool_paths_are_encoded_then_checked() {
        assert_eq!(encode_tool_path("/files/a b").unwrap(), "/files/a%20b");
        assert_eq!(encode_tool_path("/x%2Fy").unwrap(), "/x%2Fy");
        assert!(check_path(&encode_tool_path("/x%2Fy").unwrap()).is_err());
        assert!(check_path(&encode_tool_path("/../x").unwrap()).is_err());
        assert!(encode_tool_path("x").is_err());
        assert!(encode_tool_path("/a\\b").is_err());
    }

    #[test]
    fn session_token_sources() {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer abc"));
        assert_eq!(session_token(&h), Some("abc"));
        h.insert("x-sidekey-session", HeaderValue::from_static("def"));
        assert_eq!(session_token(&h), Some("def"));
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Basic abc"));
        assert_eq!(session_token(&h), None);
    }
}
