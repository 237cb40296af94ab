//! `GET /connect/<ticket>`: the first view of an unclaimed link and, for
//! the browser that claimed it, the page with one row per provider, its
//! status and reason in words, and the outcome of the last action.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::answers::{already_used, expired_link, internal, unknown_link};
use super::{browser_cookie, csrf_token, forms::bind, harden, holds, logos, page, redirect};
use crate::app::App;
use crate::body::{self, Body};
use sidekey_creds::providers::Provider;
use sidekey_vault::{ConnectTicket, Credential, Owner};

/// Changes nothing, except that an `oauth/start` link is claimed by its
/// first GET (the app redirects the browser there at once; it is never
/// mailed): an unclaimed page link shows "Continue", a claimed one shows
/// the page to its browser and "already used" to any other.
pub(super) async fn open(app: &Arc<App>, req: Request<Incoming>, ticket: &str) -> Response<Body> {
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
    if t.browser.is_none() {
        if t.authorize_url.is_some() && req.method() == Method::GET {
            let cookie = browser_cookie(req.headers());
            return bind(app, ticket, &id, cookie, "GET", now).await;
        }
        return first_view(app, ticket, &id, &t);
    }
    if !holds(req.headers(), &t) {
        return already_used(app, back);
    }
    match &t.authorize_url {
        Some(url) => redirect(app, url),
        None => {
            let Some(cookie) = browser_cookie(req.headers()) else {
                return already_used(app, back);
            };
            let q = Query::parse(req.uri().query());
            render(app, ticket, &id, &cookie, &t, &q).await
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

/// The page's own query string: the outcome of the last action, or the
/// provider whose Disconnect asks for confirmation. Never echoed: only
/// names of the link's providers and known codes are used.
#[derive(Default)]
struct Query {
    connected: Option<String>,
    disconnected: Option<String>,
    error: Option<String>,
    provider: Option<String>,
    disconnect: Option<String>,
}

impl Query {
    fn parse(query: Option<&str>) -> Query {
        let mut q = Query::default();
        for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            let slot = match &*k {
                "connected" => &mut q.connected,
                "disconnected" => &mut q.disconnected,
                "error" => &mut q.error,
                "provider" => &mut q.provider,
                "disconnect" => &mut q.disconnect,
                _ => continue,
            };
            *slot = Some(v.into_owned());
        }
        q
    }
}

/// A credential's standing on the page, and why in words when the user
/// has something to do. Only the status and the provider's error code
/// are read, never a token.
fn standing(
    p: &Provider,
    c: &Credential,
    now: i64,
    the_app: &str,
) -> (page::Standing, Option<String>) {
    let d = &p.display;
    match c.status(now) {
        "reauth_required" => {
            let why = match c.reauth_reason.as_deref() {
                Some("interaction_required" | "consent_required" | "login_required") => {
                    format!("{d} asks you to sign in again. Press Reconnect.")
                }
                Some("invalid_client" | "unauthorized_client") => format!(
                    "{d} no longer accepts the sign-in of {the_app}. Press Reconnect; if that fails too, tell {the_app}."
                ),
                _ => format!(
                    "{d} refused to renew access (it was revoked, or it ran out). Press Reconnect."
                ),
            };
            (page::Standing::NeedsReconnecting, Some(why))
        }
        // An expired token with a refresh token is renewed on use.
        "expired" if c.refresh_token.is_none() || !p.can_refresh() => (
            page::Standing::Expired,
            Some(format!(
                "The access {d} granted has run out and cannot be renewed by itself. Press Reconnect."
            )),
        ),
        _ => (page::Standing::Connected, None),
    }
}

async fn render(
    app: &App,
    ticket: &str,
    id: &str,
    cookie: &str,
    t: &ConnectTicket,
    q: &Query,
) -> Response<Body> {
    let owner = Owner::User(t.user.clone());
    let now = app.clock.now();
    let mut rows = Vec::new();
    for name in &t.providers {
        let Some(p) = app.providers.get(name) else {
            continue;
        };
        let (standing, reason) = match app.store.credential_uncached(&owner, name).await {
            Ok(None) => (page::Standing::NotConnected, None),
            Ok(Some(c)) => standing(p, &c, now, super::answers::the_app(app)),
            Err(e) => {
                tracing::error!(error = %e, "cannot read credential for the connect page");
                (
                    page::Standing::NeedsReconnecting,
                    Some(
                        "Its status could not be checked just now. Reload the page in a moment."
                            .into(),
                    ),
                )
            }
        };
        rows.push(page::Row {
            name,
            display: &p.display,
            description: p.description.as_deref(),
            standing,
            reason,
            logo: p.preset.as_deref().and_then(logos::inline),
            asks: super::link::asked_of_user(p, &t.connection),
        });
    }
    let confirm_disconnect = q
        .disconnect
        .as_deref()
        .filter(|n| t.providers.iter().any(|p| p == n));
    let csrf = csrf_token(cookie, id);
    let html = page::connect_page(
        &app.config.connect,
        &page::PageView {
            ticket,
            csrf: &csrf,
            who: t.user_label.as_deref().unwrap_or(&t.user),
            return_to: t.return_to.as_deref(),
            minutes_left: (t.expires_at - now + 59) / 60,
            notice: notice(app, t, q),
            rows,
            confirm_disconnect,
        },
    );
    harden(app, body::html(StatusCode::OK, html))
}

/// The outcome of the last action, from the page's own query string. Only
/// fixed sentences and configured provider names reach the page.
fn notice(app: &App, t: &ConnectTicket, q: &Query) -> Option<page::Notice> {
    if q.disconnect.is_some() {
        return None;
    }
    let display = |name: &Option<String>| -> Option<String> {
        let n = name.as_ref()?;
        if !t.providers.contains(n) {
            return None;
        }
        app.providers.get(n).map(|p| p.display.clone())
    };
    if let Some(d) = display(&q.connected) {
        return Some(page::Notice {
            ok: true,
            text: format!("{d} is now connected."),
        });
    }
    if let Some(d) = display(&q.disconnected) {
        return Some(page::Notice {
            ok: true,
            text: format!("{d} was disconnected; its access was removed."),
        });
    }
    let e = q.error.as_deref()?;
    let d = display(&q.provider).unwrap_or_else(|| "The service".into());
    let again = "Press Connect to try again.";
    let text = match e {
        "access_denied" => {
            format!("Access denied: {d} was not allowed access, so nothing was connected. {again}")
        }
        "provider_error" => format!("{d} reported an error, so nothing was connected. {again}"),
        "state_expired" => format!("The link expired: the {d} sign-in took too long. {again}"),
        "invalid_state" | "invalid_request" => format!(
            "The answer from {d} was incomplete or already used, so nothing was connected. {again}"
        ),
        "invalid_signature" => {
            format!("The answer from {d} could not be verified, so nothing was connected. {again}")
        }
        "exchange_refused" | "exchange_failed" => {
            format!("{d} did not accept the sign-in, so nothing was connected. {again}")
        }
        // A value typed on the page, or one the provider's answer carried.
        "bad_connection_value" => format!(
            "The {d} account details were not accepted, so nothing was connected. Check them and try again."
        ),
        "store_failed" => format!("The {d} connection could not be saved. {again}"),
        "confirm_unavailable" => format!(
            "This link cannot finish connecting {d}: it has no way back to {}. Ask it for a new link.",
            super::answers::the_app(app)
        ),
        _ => format!("Connecting {d} did not work. Please try again."),
    };
    Some(page::Notice { ok: false, text })
}
