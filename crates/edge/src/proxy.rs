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
//!
//! The other agent entries that take these phases are beside this file:
//! `tool_call` (`POST /v1/call/{provider}`) and `refresh_tool`
//! (`POST /v1/session/refresh`); the header filters on both sides of the
//! upstream call are in `filters`, phase 8 in `finish`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, BodyStream, StreamBody};
use hyper::body::Incoming;
use serde_json::Value;

use crate::app::App;
use crate::body::{self, Body};
use crate::error::ApiError;
use sidekey_base::secret::scrub;
use sidekey_creds::audit::Caller;
use sidekey_creds::client::IdleTimeoutBody;
use sidekey_creds::owners;
use sidekey_creds::providers::{InjectError, Provider, ProxyPath, check_path};
use sidekey_creds::session::SessionFault;
use sidekey_creds::session::VerifiedSession;
use sidekey_vault::{AuditRecord, Credential, Owner};

mod filters;
mod finish;
mod refresh_tool;
mod tool_call;

pub(crate) use finish::finish;
pub use refresh_tool::refresh_tool;
pub use tool_call::handle_call;

use filters::{ForwardFilter, filter_answer_headers};

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

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderValue;

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
