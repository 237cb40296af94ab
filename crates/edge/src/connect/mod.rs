//! The hosted connect page and the browser binding of OAuth flows.
//!
//! The main app asks for a connect link (admin `POST /v1/users/{u}/connect`)
//! and sends the user's browser to `<public_url>/connect/<ticket>`. No GET
//! changes anything: the first view says whose accounts are being
//! connected and offers "Continue", a form POST that claims the link for
//! this browser (so a mail scanner's prefetch burns nothing). The claiming
//! browser gets a `__Host-` cookie whose hash is recorded in the ticket, and
//! any other browser is shown "this link was already used". Connect starts
//! an authorization-code flow whose state names the ticket; the callback
//! completes only in the browser holding the cookie for that ticket
//! (RFC 9700 §4.7.1). Without it a forwarded authorize URL would let a
//! victim's account be stored under the forwarder's user. A link forwarded
//! before anyone opened it is closed by [`confirm`]: with `[connect]
//! confirm = true` the new credential waits until the app, which knows who
//! is logged in, confirms it for its user.
//!
//! The page is server-rendered HTML and one stylesheet: no script at all,
//! so the CSP forbids every script and inline style. Actions are form POSTs
//! carrying a CSRF token: derived from the browser's cookie and the ticket
//! on the page, from the ticket under a server key on the first view.

pub mod callback;
pub mod confirm;
mod page;
pub mod start;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::app::App;
use crate::body::{self, Body, html_escape};
use crate::error::ApiError;
use crate::random::{b64url, random_b64};
use sidekey_vault::{AuditRecord, ConnectTicket, OAuthState, Owner, StoreError, TicketClaim};

pub use page::CSS_PATH;

/// The binding cookie. `__Host-`: Secure, `Path=/`, no `Domain`, so no
/// other host or path can set or shadow it.
pub const COOKIE: &str = "__Host-sidekey-connect";
/// How long the binding cookie lives (the longest a link can live).
const COOKIE_MAX_AGE_SECS: u64 = 86_400;
/// Bounds of a link's `ttl_secs`.
pub const MIN_TTL_SECS: u64 = 60;
pub const MAX_TTL_SECS: u64 = 86_400;
pub const DEFAULT_TTL_SECS: u64 = 600;
/// Random bytes in a ticket and in a cookie (256 bits; 43 base64url chars).
const SECRET_BYTES: usize = 32;
const SECRET_CHARS: usize = 43;
const MAX_FORM_BYTES: u64 = 8 * 1024;

fn well_formed(s: &str) -> bool {
    s.len() == SECRET_CHARS
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A fresh connect link: the raw ticket goes into the URL only.
pub struct NewTicket {
    /// Store record id (keyed hash of the ticket).
    pub id: String,
    /// `<public_url>/connect/<ticket>`.
    pub url: String,
}

pub fn new_ticket(app: &App) -> NewTicket {
    let raw = random_b64(SECRET_BYTES);
    NewTicket {
        id: app.store.connect_ticket_id(&raw),
        url: page_url(app, &raw),
    }
}

fn page_url(app: &App, ticket: &str) -> String {
    format!("{}/connect/{ticket}", app.config.server.public_url)
}

// ----- admin: POST /v1/users/{user}/connect --------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LinkBody {
    #[serde(default)]
    providers: Option<Vec<String>>,
    #[serde(default)]
    return_to: Option<String>,
    #[serde(default)]
    ttl_secs: Option<u64>,
    #[serde(default)]
    user_label: Option<String>,
    /// Per-connection values (`from = "user"`), e.g. `{"subdomain": "acme"}`.
    #[serde(default)]
    connection: std::collections::BTreeMap<String, String>,
}

/// The values of `all` that provider `p` declares.
pub(crate) fn connection_for(
    p: &sidekey_creds::providers::Provider,
    all: &std::collections::BTreeMap<String, String>,
) -> std::collections::BTreeMap<String, String> {
    all.iter()
        .filter(|(k, _)| p.connection_field(k).is_some())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Admin `POST /v1/users/{user}/connect` → 201 `{connect_url, expires_at}`.
pub async fn create_link(
    app: &Arc<App>,
    user: &str,
    body: &[u8],
) -> Result<Response<Body>, ApiError> {
    let b: LinkBody = if body.iter().all(u8::is_ascii_whitespace) {
        LinkBody::default()
    } else {
        crate::request::json_object(body)?
    };
    let providers = match b.providers {
        None => {
            let all: Vec<String> = app
                .providers
                .iter()
                .filter(|p| p.oauth_capable())
                .map(|p| p.name.clone())
                .collect();
            if all.is_empty() {
                return Err(ApiError::BadRequest(
                    "No provider can be connected through OAuth: configure authorize_url, token_url and client_id for one.".into(),
                ));
            }
            all
        }
        Some(list) => {
            if list.is_empty() {
                return Err(ApiError::BadRequest(
                    "providers must list at least one provider (or be left out for all).".into(),
                ));
            }
            let mut uniq: Vec<String> = Vec::new();
            for name in list {
                let p = app
                    .providers
                    .get(&name)
                    .ok_or_else(|| ApiError::UnknownProvider(app.providers.label(&name)))?;
                if !p.oauth_capable() {
                    return Err(ApiError::BadRequest(format!(
                        "{} cannot be connected through OAuth (it needs authorize_url, token_url and client_id).",
                        p.display
                    )));
                }
                if !uniq.contains(&name) {
                    uniq.push(name);
                }
            }
            uniq
        }
    };
    // Each value must be a field of some listed provider, and acceptable
    // to every listed provider that declares it.
    for k in b.connection.keys() {
        if !providers
            .iter()
            .filter_map(|n| app.providers.get(n))
            .any(|p| p.connection_field(k).is_some())
        {
            let first = app.providers.get(&providers[0]).cloned();
            return Err(match first {
                Some(p) => ApiError::connection(
                    &p,
                    sidekey_creds::providers::ConnectionError::Unknown(k.clone()),
                ),
                None => ApiError::BadRequest("unknown connection field".into()),
            });
        }
    }
    for p in providers.iter().filter_map(|n| app.providers.get(n)) {
        p.check_connection(&connection_for(p, &b.connection))
            .map_err(|e| ApiError::connection(p, e))?;
    }
    crate::oauth::check_return_to_for(app, b.return_to.as_deref())?;
    let ttl = b.ttl_secs.unwrap_or(DEFAULT_TTL_SECS);
    if !(MIN_TTL_SECS..=MAX_TTL_SECS).contains(&ttl) {
        return Err(ApiError::BadRequest(format!(
            "ttl_secs must be between {MIN_TTL_SECS} and {MAX_TTL_SECS}."
        )));
    }
    if let Some(l) = &b.user_label {
        if !sidekey_base::config::page_text_ok(l, 200) {
            return Err(ApiError::BadRequest(
                "user_label must be 1-200 characters without control characters.".into(),
            ));
        }
    }
    let now = app.clock.now();
    let expires_at = now + ttl as i64;
    let link = new_ticket(app);
    app.store
        .put_connect_ticket(
            &link.id,
            &ConnectTicket {
                user: user.to_owned(),
                providers: providers.clone(),
                return_to: b.return_to,
                user_label: b.user_label,
                created_at: now,
                expires_at,
                browser: None,
                authorize_url: None,
                connection: b.connection,
            },
        )
        .await
        .map_err(ApiError::from)?;
    app.store.flush().await.map_err(ApiError::from)?;
    Ok(body::json(
        StatusCode::CREATED,
        &json!({
            "connect_url": link.url,
            "expires_at": expires_at,
            "providers": providers,
        }),
    ))
}

// ----- the callback's check -------------------------------------------------

/// How the OAuth callback must treat a state.
pub enum Binding {
    /// No browser binding applies (`[oauth] bind_browser = false` and the
    /// flow was not started from the page): complete as before.
    Unbound,
    /// Bound and started from the connect page at `page`: complete, then
    /// go back there (or, awaiting confirmation, to the link's `return_to`).
    Page {
        page: String,
        return_to: Option<String>,
    },
    /// Bound, started by admin `oauth/start` through its `connect_url`.
    Start,
    /// This browser does not hold the binding: refuse, store nothing.
    Refused,
}

/// Decides whether this browser may complete the flow of `st`.
pub async fn callback_binding(app: &App, headers: &HeaderMap, st: &OAuthState) -> Binding {
    let ticket = match st.ticket.as_deref() {
        Some(id) => match app.store.connect_ticket(id).await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot read connect ticket");
                None
            }
        },
        None => None,
    };
    let Some(t) = ticket else {
        return if app.config.oauth.bind_browser {
            Binding::Refused
        } else {
            Binding::Unbound
        };
    };
    let from_page = t.authorize_url.is_none();
    if !from_page && !app.config.oauth.bind_browser {
        return Binding::Unbound;
    }
    match (holds(headers, &t), from_page, &st.return_to) {
        (false, ..) => Binding::Refused,
        (true, true, Some(page)) => Binding::Page {
            page: page.clone(),
            return_to: t.return_to,
        },
        _ => Binding::Start,
    }
}

/// Whether this request carries the cookie of the browser that claimed `t`.
fn holds(headers: &HeaderMap, t: &ConnectTicket) -> bool {
    match (browser_cookie(headers), &t.browser) {
        (Some(c), Some(b)) => bool::from(browser_hash(&c).as_bytes().ct_eq(b.as_bytes())),
        _ => false,
    }
}

// ----- agent listener: /connect/... ------------------------------------------

/// Everything under `/connect/` on the agent listener.
pub async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let head = req.method() == Method::HEAD;
    let mut resp = route(app, req).await;
    if head {
        // The answer a GET would get, without its body (which HTTP/2 would
        // otherwise send, breaking the stream).
        *resp.body_mut() = body::empty();
        resp.headers_mut().remove(header::CONTENT_LENGTH);
    }
    resp
}

async fn route(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let rest = path.trim_start_matches("/connect/");
    if rest == CSS_PATH.trim_start_matches("/connect/") {
        return match *req.method() {
            Method::GET | Method::HEAD => stylesheet(app),
            _ => method_not_allowed(app, "GET, HEAD"),
        };
    }
    let (ticket, action) = match rest.split_once('/') {
        Some((t, a)) => (t, Some(a)),
        None => (rest, None),
    };
    if !well_formed(ticket) {
        return unknown_link(app);
    }
    let ticket = ticket.to_owned();
    match (req.method().clone(), action) {
        (Method::GET | Method::HEAD, None) => open(app, req, &ticket).await,
        (Method::POST, Some("claim")) => claim(app, req, &ticket).await,
        (Method::POST, Some(a @ ("connect" | "disconnect"))) => {
            let a = a.to_owned();
            act(app, req, &ticket, &a).await
        }
        (_, None) => method_not_allowed(app, "GET, HEAD"),
        (_, Some("claim" | "connect" | "disconnect")) => method_not_allowed(app, "POST"),
        _ => unknown_link(app),
    }
}

/// `GET /connect/<ticket>`. Changes nothing, except that an `oauth/start`
/// link is claimed by its first GET (the app redirects the browser there
/// at once; it is never mailed): an unclaimed page link shows "Continue",
/// a claimed one shows the page to its browser and "already used" to any
/// other.
async fn open(app: &Arc<App>, req: Request<Incoming>, ticket: &str) -> Response<Body> {
    let id = app.store.connect_ticket_id(ticket);
    let now = app.clock.now();
    let t = match app.store.connect_ticket(&id).await {
        Ok(Some(t)) => t,
        Ok(None) => return unknown_link(app),
        Err(e) => return internal(app, e),
    };
    if t.expires_at <= now {
        return expired_link(app);
    }
    if t.browser.is_none() {
        if t.authorize_url.is_some() && req.method() == Method::GET {
            let cookie = browser_cookie(req.headers());
            return bind(app, ticket, &id, cookie, "GET", now).await;
        }
        return first_view(app, ticket, &id, &t);
    }
    if !holds(req.headers(), &t) {
        return already_used(app);
    }
    match &t.authorize_url {
        Some(url) => redirect(app, url),
        None => {
            let Some(cookie) = browser_cookie(req.headers()) else {
                return already_used(app);
            };
            let notice = notice_from_query(app, &t, req.uri().query());
            render(app, ticket, &id, &cookie, &t, notice).await
        }
    }
}

/// The first view of an unclaimed link: whose accounts, and "Continue".
/// No cookie: a browser (or a prefetcher) that only looks claims nothing.
fn first_view(app: &App, ticket: &str, id: &str, t: &ConnectTicket) -> Response<Body> {
    let displays: Vec<&str> = t
        .providers
        .iter()
        .filter_map(|n| app.providers.get(n).map(|p| p.display.as_str()))
        .collect();
    let html = page::claim_page(
        &app.config.connect,
        &page::ClaimView {
            ticket,
            csrf: &app.store.claim_csrf(id),
            who: t.user_label.as_deref().unwrap_or(&t.user),
            providers: &displays,
            minutes_left: (t.expires_at - app.clock.now() + 59) / 60,
        },
    );
    harden(app, body::html(StatusCode::OK, html))
}

/// `POST /connect/<ticket>/claim`, the first view's "Continue": claims the
/// link for this browser and sets its cookie.
async fn claim(app: &Arc<App>, req: Request<Incoming>, ticket: &str) -> Response<Body> {
    let (parts, incoming) = req.into_parts();
    let form = match read_form(app, &parts.headers, incoming).await {
        Ok(f) => f,
        Err(resp) => return resp,
    };
    let id = app.store.connect_ticket_id(ticket);
    let now = app.clock.now();
    let t = match app.store.connect_ticket(&id).await {
        Ok(Some(t)) => t,
        Ok(None) => return unknown_link(app),
        Err(e) => return internal(app, e),
    };
    if t.expires_at <= now {
        return expired_link(app);
    }
    let expected = app.store.claim_csrf(&id);
    let csrf_ok = form
        .csrf
        .as_ref()
        .is_some_and(|c| bool::from(c.as_bytes().ct_eq(expected.as_bytes())));
    if !csrf_ok || cross_site(app, &parts.headers) {
        return form_expired(app);
    }
    bind(
        app,
        ticket,
        &id,
        browser_cookie(&parts.headers),
        "POST",
        now,
    )
    .await
}

/// Claims the link for the browser with `cookie` (a fresh one when it has
/// none), then sends it on: to the page, or to the provider for an
/// `oauth/start` link.
async fn bind(
    app: &Arc<App>,
    ticket: &str,
    id: &str,
    cookie: Option<String>,
    method: &'static str,
    now: i64,
) -> Response<Body> {
    let started = std::time::Instant::now();
    let cookie = cookie.unwrap_or_else(|| random_b64(SECRET_BYTES));
    let claim = app
        .store
        .claim_connect_ticket(id, &browser_hash(&cookie), now)
        .await;
    let t = match claim {
        Ok(TicketClaim::Claimed(t)) => {
            if let Err(e) = app.store.flush().await {
                return internal(app, e);
            }
            t
        }
        Ok(TicketClaim::Reopened(t)) => t,
        Ok(TicketClaim::Taken) => return already_used(app),
        Ok(TicketClaim::Expired) => return expired_link(app),
        Ok(TicketClaim::Unknown) => return unknown_link(app),
        Err(e) => return internal(app, e),
    };
    let to = t
        .authorize_url
        .clone()
        .unwrap_or_else(|| page_url(app, ticket));
    let mut resp = redirect(app, &to);
    set_cookie(&mut resp, &cookie);
    audit(app, &t.user, None, method, "claim", &resp, started);
    resp
}

/// Whether the browser says this form was sent from another site. The
/// page's own forms come `same-origin` (its `no-referrer` policy makes
/// browsers send `Origin: null` on them, which is allowed).
fn cross_site(app: &App, headers: &HeaderMap) -> bool {
    let site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    if site.is_some_and(|s| !matches!(s, "same-origin" | "none")) {
        return true;
    }
    let ours = url::Url::parse(&app.config.server.public_url)
        .map(|u| u.origin().ascii_serialization())
        .unwrap_or_default();
    headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|o| o != "null" && o != ours)
}

async fn render(
    app: &App,
    ticket: &str,
    id: &str,
    cookie: &str,
    t: &ConnectTicket,
    notice: Option<page::Notice>,
) -> Response<Body> {
    let owner = Owner::User(t.user.clone());
    let now = app.clock.now();
    let mut rows = Vec::new();
    for name in &t.providers {
        let Some(p) = app.providers.get(name) else {
            continue;
        };
        let standing = match app.store.credential_uncached(&owner, name).await {
            Ok(None) => page::Standing::NotConnected,
            Ok(Some(c)) => match c.status(now) {
                "reauth_required" => page::Standing::NeedsReconnecting,
                // An expired token with a refresh token is renewed on use.
                "expired" if c.refresh_token.is_none() || !p.can_refresh() => {
                    page::Standing::Expired
                }
                _ => page::Standing::Connected,
            },
            Err(e) => {
                tracing::error!(error = %e, "cannot read credential for the connect page");
                page::Standing::NeedsReconnecting
            }
        };
        rows.push(page::Row {
            name,
            display: &p.display,
            description: p.description.as_deref(),
            standing,
        });
    }
    let csrf = csrf_token(cookie, id);
    let html = page::connect_page(
        &app.config.connect,
        &page::PageView {
            ticket,
            csrf: &csrf,
            who: t.user_label.as_deref().unwrap_or(&t.user),
            return_to: t.return_to.as_deref(),
            minutes_left: (t.expires_at - now + 59) / 60,
            notice,
            rows,
        },
    );
    harden(app, body::html(StatusCode::OK, html))
}

/// The outcome of the last action, from the page's own query string. Only
/// fixed sentences and configured provider names reach the page.
fn notice_from_query(app: &App, t: &ConnectTicket, query: Option<&str>) -> Option<page::Notice> {
    let mut connected = None;
    let mut disconnected = None;
    let mut error = None;
    let mut provider = None;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "connected" => connected = Some(v.into_owned()),
            "disconnected" => disconnected = Some(v.into_owned()),
            "error" => error = Some(v.into_owned()),
            "provider" => provider = Some(v.into_owned()),
            _ => {}
        }
    }
    let display = |name: &Option<String>| -> Option<String> {
        let n = name.as_ref()?;
        if !t.providers.contains(n) {
            return None;
        }
        app.providers.get(n).map(|p| p.display.clone())
    };
    if let Some(d) = display(&connected) {
        return Some(page::Notice {
            ok: true,
            text: format!("{d} is now connected."),
        });
    }
    if let Some(d) = display(&disconnected) {
        return Some(page::Notice {
            ok: true,
            text: format!("{d} was disconnected; its access was removed."),
        });
    }
    let e = error?;
    let d = display(&provider).unwrap_or_else(|| "The service".into());
    let text = match e.as_str() {
        "access_denied" => format!(
            "Access denied: {d} was not allowed access, so nothing was connected. Press Connect to try again."
        ),
        "state_expired" => {
            format!("The link expired: the {d} sign-in took too long. Press Connect to try again.")
        }
        _ => format!("Connecting {d} did not work. Please try again."),
    };
    Some(page::Notice { ok: false, text })
}

#[derive(Default)]
struct ActionForm {
    csrf: Option<String>,
    provider: Option<String>,
}

/// A page form's fields, or the page that says it could not be read.
async fn read_form(
    app: &App,
    headers: &HeaderMap,
    incoming: Incoming,
) -> Result<ActionForm, Response<Body>> {
    let bytes: Bytes = match crate::request::read_limited(
        headers,
        incoming,
        MAX_FORM_BYTES,
        Duration::from_secs(30),
    )
    .await
    {
        Ok(b) => b,
        Err(_) => {
            return Err(message(
                app,
                StatusCode::BAD_REQUEST,
                "That did not work",
                "The form could not be read. Go back and try again.",
            ));
        }
    };
    let mut form = ActionForm::default();
    for (k, v) in url::form_urlencoded::parse(&bytes) {
        match &*k {
            "csrf" => form.csrf = Some(v.into_owned()),
            "provider" => form.provider = Some(v.into_owned()),
            _ => {}
        }
    }
    Ok(form)
}

/// `POST /connect/<ticket>/{connect,disconnect}` from the page's forms.
async fn act(app: &Arc<App>, req: Request<Incoming>, ticket: &str, action: &str) -> Response<Body> {
    let started = std::time::Instant::now();
    let (parts, incoming) = req.into_parts();
    let form = match read_form(app, &parts.headers, incoming).await {
        Ok(f) => f,
        Err(resp) => return resp,
    };
    let id = app.store.connect_ticket_id(ticket);
    let t = match app.store.connect_ticket(&id).await {
        Ok(Some(t)) => t,
        Ok(None) => return unknown_link(app),
        Err(e) => return internal(app, e),
    };
    if t.expires_at <= app.clock.now() {
        return expired_link(app);
    }
    let Some(cookie) = browser_cookie(&parts.headers).filter(|_| holds(&parts.headers, &t)) else {
        return already_used(app);
    };
    let expected = csrf_token(&cookie, &id);
    let csrf_ok = form
        .csrf
        .as_ref()
        .is_some_and(|c| bool::from(c.as_bytes().ct_eq(expected.as_bytes())));
    if !csrf_ok {
        return form_expired(app);
    }
    let Some(name) = form.provider.filter(|p| t.providers.contains(p)) else {
        return message(
            app,
            StatusCode::BAD_REQUEST,
            "Unknown service",
            "This link does not connect that service. Go back and choose one from the list.",
        );
    };
    let Some(p) = app.providers.get(&name).cloned() else {
        return message(
            app,
            StatusCode::BAD_REQUEST,
            "Unknown service",
            "That service is no longer configured. Ask the app for a new link.",
        );
    };
    let page = page_url(app, ticket);
    let owner = Owner::User(t.user.clone());
    let resp = match action {
        "connect" => {
            let values = connection_for(&p, &t.connection);
            match crate::oauth::begin(app, &t.user, &p, Some(page), None, Some(id), values).await {
                Ok(flow) => match app.store.flush().await {
                    Ok(()) => redirect(app, &flow.authorize_url),
                    Err(e) => internal(app, e),
                },
                Err(e) => {
                    tracing::warn!(provider = %name, error = ?e.code(), "cannot start a connect flow");
                    message(
                        app,
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Connecting is not available",
                        &format!(
                            "{} cannot be connected just now. Please try again later.",
                            html_escape(&p.display)
                        ),
                    )
                }
            }
        }
        _ => {
            let deleted = app
                .store
                .delete_credential(&owner, &name)
                .await
                .map_err(|e| e.to_string());
            match deleted {
                Ok(_) => match app.store.flush().await {
                    Ok(()) => {
                        app.refresher.reset(&owner, &name).await;
                        tracing::info!(provider = %name, user = %t.user, "account disconnected on the connect page");
                        let q: String =
                            url::form_urlencoded::byte_serialize(name.as_bytes()).collect();
                        redirect(app, &format!("{page}?disconnected={q}"))
                    }
                    Err(e) => internal(app, e),
                },
                Err(e) => {
                    tracing::error!(error = %e, "cannot delete credential");
                    message(
                        app,
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "That did not work",
                        "sidekey could not save the change. Please try again.",
                    )
                }
            }
        }
    };
    audit(app, &t.user, Some(name), "POST", action, &resp, started);
    resp
}

fn audit(
    app: &App,
    user: &str,
    provider: Option<String>,
    method: &'static str,
    action: &str,
    resp: &Response<Body>,
    started: std::time::Instant,
) {
    app.audit.record(AuditRecord {
        time: app.clock.now_millis(),
        kind: "connect".into(),
        user: Some(user.to_owned()),
        provider,
        method: method.into(),
        // Never the ticket: it is a bearer secret.
        path: format!("/connect/{{ticket}}/{action}"),
        status: resp.status().as_u16(),
        duration_ms: (started.elapsed().as_secs_f64() * 1e6).round() / 1000.0,
        session_id: None,
        conversation_id: None,
        error: None,
        tool: None,
        subject: None,
    });
}

// ----- pieces ------------------------------------------------------------------

/// This browser's binding cookie, if it sent a well-formed one.
fn browser_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim().to_owned())
        .filter(|v| well_formed(v))
}

/// What a ticket records about its browser: a hash, not the cookie.
fn browser_hash(cookie: &str) -> String {
    b64url(&Sha256::digest(cookie.as_bytes()))
}

/// Tied to the ticket and to this browser's cookie, which a cross-site page
/// can neither read nor set (`__Host-`, HttpOnly).
fn csrf_token(cookie: &str, ticket_id: &str) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(cookie.as_bytes()).expect("any key size");
    mac.update(b"connect-csrf\0");
    mac.update(ticket_id.as_bytes());
    b64url(&mac.finalize().into_bytes())
}

fn set_cookie(resp: &mut Response<Body>, cookie: &str) {
    let v = format!(
        "{COOKIE}={cookie}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age={COOKIE_MAX_AGE_SECS}"
    );
    if let Ok(v) = HeaderValue::try_from(v) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// The Content-Security-Policy: no script at all, styles and images from
/// here (plus the configured logo), forms may go here and, through the
/// redirect after Connect, to the providers' authorize pages.
fn csp(app: &App) -> String {
    let mut img = "'self'".to_owned();
    if let Some(u) = &app.config.connect.logo_url {
        img.push(' ');
        img.push_str(&u.origin().ascii_serialization());
    }
    let mut form = vec!["'self'".to_owned()];
    for p in app.providers.iter() {
        if let Some(u) = &p.authorize_url {
            let o = u.origin().ascii_serialization();
            if !form.contains(&o) {
                form.push(o);
            }
        }
    }
    format!(
        "default-src 'none'; script-src 'none'; style-src 'self'; img-src {img}; form-action {}; frame-ancestors 'none'; base-uri 'none'",
        form.join(" ")
    )
}

/// Security headers on every answer of the page and the callback.
fn harden(app: &App, mut resp: Response<Body>) -> Response<Body> {
    let csp = csp(app);
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::try_from(csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    if app.config.server.tls {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    resp
}

/// 303 to `to`, with the page's security headers.
pub fn redirect(app: &App, to: &str) -> Response<Body> {
    let Ok(loc) = HeaderValue::try_from(to) else {
        return message(
            app,
            StatusCode::BAD_REQUEST,
            "Cannot return to the app",
            "The app's return address is not valid.",
        );
    };
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::SEE_OTHER;
    resp.headers_mut().insert(header::LOCATION, loc);
    harden(app, resp)
}

/// A page with a title and a sentence; `detail_html` is already escaped.
pub fn message_page(
    app: &App,
    status: StatusCode,
    title: &str,
    detail_html: &str,
) -> Response<Body> {
    harden(
        app,
        body::html(
            status,
            page::message(&app.config.connect, title, detail_html),
        ),
    )
}

/// `message_page` for fixed sentences (escaped here).
fn message(app: &App, status: StatusCode, title: &str, detail: &str) -> Response<Body> {
    message_page(app, status, title, &html_escape(detail))
}

fn form_expired(app: &App) -> Response<Body> {
    message(
        app,
        StatusCode::FORBIDDEN,
        "This form has expired",
        "The request did not come from this page as sidekey served it. Reload the connect page and try again.",
    )
}

fn already_used(app: &App) -> Response<Body> {
    message(
        app,
        StatusCode::FORBIDDEN,
        "This link was already used",
        "It was opened in another browser, and a connect link works in one browser only, so nothing can be connected from here. If it was you, go back to that browser; otherwise ask the app for a new link.",
    )
}

fn expired_link(app: &App) -> Response<Body> {
    message(
        app,
        StatusCode::GONE,
        "This link has expired",
        "Connect links last a few minutes. Go back to the app and open a new one.",
    )
}

fn unknown_link(app: &App) -> Response<Body> {
    message(
        app,
        StatusCode::NOT_FOUND,
        "This link is not valid",
        "Check that you opened the whole link, or go back to the app and open a new one.",
    )
}

fn method_not_allowed(app: &App, allow: &'static str) -> Response<Body> {
    let mut r = message(
        app,
        StatusCode::METHOD_NOT_ALLOWED,
        "Not here",
        "Open the connect link itself and use its buttons.",
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

fn internal(app: &App, e: StoreError) -> Response<Body> {
    if e.is_unavailable() {
        return store_unavailable(app);
    }
    tracing::error!(error = %e, "connect page: store error");
    message(
        app,
        StatusCode::INTERNAL_SERVER_ERROR,
        "Something went wrong",
        "sidekey could not read or save this link just now. Please try again.",
    )
}

/// The page's form of `503 store_unavailable` (contract section 5): the
/// Postgres store is out of reach for now, which a retry may fix; a 500
/// would say sidekey itself is broken. The header lets the
/// `sidekey_store_unavailable_total` counter see it like any other.
pub fn store_unavailable(app: &App) -> Response<Body> {
    tracing::warn!("connect page: the store is unavailable");
    let mut resp = message(
        app,
        StatusCode::SERVICE_UNAVAILABLE,
        "Please try again in a moment",
        "sidekey cannot reach its credential store just now. Go back and try again in a moment.",
    );
    resp.headers_mut().insert(
        &crate::error::ERROR_HEADER,
        HeaderValue::from_static("store_unavailable"),
    );
    resp
}

fn stylesheet(app: &App) -> Response<Body> {
    let mut resp = body::text(
        StatusCode::OK,
        "text/css; charset=utf-8",
        page::stylesheet(&app.config.connect),
    );
    let h = resp.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_among_others_and_must_be_well_formed() {
        let good = "a".repeat(43);
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::try_from(format!("x=1; {COOKIE}={good}; y=2")).unwrap(),
        );
        assert_eq!(browser_cookie(&h).as_deref(), Some(good.as_str()));
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::try_from(format!("{COOKIE}=short")).unwrap(),
        );
        assert!(browser_cookie(&h).is_none());
    }

    #[test]
    fn csrf_depends_on_cookie_and_ticket() {
        let a = csrf_token(&"a".repeat(43), "t1");
        assert_ne!(a, csrf_token(&"b".repeat(43), "t1"));
        assert_ne!(a, csrf_token(&"a".repeat(43), "t2"));
        assert_eq!(a, csrf_token(&"a".repeat(43), "t1"));
    }
}
