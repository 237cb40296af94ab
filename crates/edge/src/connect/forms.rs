//! The page's form POSTs: Continue (`claim`), Connect and Disconnect. Each
//! carries a CSRF token; Connect and Disconnect also need the browser's
//! binding cookie.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use subtle::ConstantTimeEq;

use super::answers::{already_used, expired_link, form_expired, internal, message, unknown_link};
use super::{
    MAX_FORM_BYTES, SECRET_BYTES, browser_cookie, browser_hash, connection_for, csrf_token, holds,
    page_url, redirect, set_cookie,
};
use crate::app::App;
use crate::body::Body;
use crate::random::random_b64;
use sidekey_vault::{AuditRecord, Owner, TicketClaim};

/// `POST /connect/<ticket>/claim`, the first view's "Continue": claims the
/// link for this browser and sets its cookie.
pub(super) async fn claim(app: &Arc<App>, req: Request<Incoming>, ticket: &str) -> Response<Body> {
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
        Err(e) => return internal(app, e, None),
    };
    let back = t.return_to.as_deref();
    if t.expires_at <= now {
        return expired_link(app, back);
    }
    let expected = app.store.claim_csrf(&id);
    let csrf_ok = form
        .csrf
        .as_ref()
        .is_some_and(|c| bool::from(c.as_bytes().ct_eq(expected.as_bytes())));
    if !csrf_ok || cross_site(app, &parts.headers) {
        return form_expired(app, back);
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
pub(super) async fn bind(
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
                return internal(app, e, t.return_to.as_deref());
            }
            t
        }
        Ok(TicketClaim::Reopened(t)) => t,
        Ok(TicketClaim::Taken) => return already_used(app, None),
        Ok(TicketClaim::Expired) => return expired_link(app, None),
        Ok(TicketClaim::Unknown) => return unknown_link(app),
        Err(e) => return internal(app, e, None),
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

#[derive(Default)]
struct ActionForm {
    csrf: Option<String>,
    provider: Option<String>,
    /// `connection.FIELD` inputs: values the user typed on the page.
    connection: std::collections::BTreeMap<String, String>,
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
                None,
            ));
        }
    };
    let mut form = ActionForm::default();
    for (k, v) in url::form_urlencoded::parse(&bytes) {
        match &*k {
            "csrf" => form.csrf = Some(v.into_owned()),
            "provider" => form.provider = Some(v.into_owned()),
            k if k.starts_with("connection.") => {
                let field = k["connection.".len()..].chars().take(64).collect();
                form.connection.insert(field, v.trim().to_owned());
            }
            _ => {}
        }
    }
    Ok(form)
}

/// `POST /connect/<ticket>/{connect,disconnect}` from the page's forms.
pub(super) async fn act(
    app: &Arc<App>,
    req: Request<Incoming>,
    ticket: &str,
    action: &str,
) -> Response<Body> {
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
        Err(e) => return internal(app, e, None),
    };
    let back = t.return_to.as_deref();
    if t.expires_at <= app.clock.now() {
        return expired_link(app, back);
    }
    let Some(cookie) = browser_cookie(&parts.headers).filter(|_| holds(&parts.headers, &t)) else {
        return already_used(app, back);
    };
    let expected = csrf_token(&cookie, &id);
    let csrf_ok = form
        .csrf
        .as_ref()
        .is_some_and(|c| bool::from(c.as_bytes().ct_eq(expected.as_bytes())));
    if !csrf_ok {
        return form_expired(app, back);
    }
    let Some(name) = form.provider.filter(|p| t.providers.contains(p)) else {
        return message(
            app,
            StatusCode::BAD_REQUEST,
            "Unknown service",
            "This link does not connect that service. Go back and choose one from the list.",
            back,
        );
    };
    let Some(p) = app.providers.get(&name).cloned() else {
        return message(
            app,
            StatusCode::BAD_REQUEST,
            "Unknown service",
            &format!(
                "That service is no longer configured. Ask {} for a new link.",
                super::answers::the_app(app)
            ),
            back,
        );
    };
    let page = page_url(app, ticket);
    let owner = Owner::User(t.user.clone());
    let resp = match action {
        "connect" => {
            let mut values = connection_for(&p, &t.connection);
            // What the user typed, for the fields the link left to them
            // (a link's own values are never overridden from the page).
            for f in super::link::asked_of_user(&p, &values) {
                if let Some(v) = form.connection.get(&f).filter(|v| !v.is_empty()) {
                    values.insert(f, v.clone());
                }
            }
            let missing = !super::link::asked_of_user(&p, &values).is_empty();
            if missing || p.check_connection(&values).is_err() {
                // Checked before any redirect: the page says which value.
                let q: String = url::form_urlencoded::byte_serialize(name.as_bytes()).collect();
                let resp = redirect(
                    app,
                    &format!("{page}?error=bad_connection_value&provider={q}"),
                );
                audit(app, &t.user, Some(name), "POST", action, &resp, started);
                return resp;
            }
            match crate::oauth::begin(app, &t.user, &p, Some(page), None, Some(id), values).await {
                Ok(flow) => match app.store.flush().await {
                    Ok(()) => redirect(app, &flow.authorize_url),
                    Err(e) => internal(app, e, back),
                },
                Err(e) => {
                    tracing::warn!(provider = %name, error = ?e.code(), "cannot start a connect flow");
                    message(
                        app,
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Connecting is not available",
                        &format!(
                            "{} cannot be connected just now. Please try again later.",
                            p.display
                        ),
                        back,
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
                    Err(e) => internal(app, e, back),
                },
                Err(e) => {
                    tracing::error!(error = %e, "cannot delete credential");
                    message(
                        app,
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "That did not work",
                        "The change could not be saved. Please try again.",
                        back,
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
