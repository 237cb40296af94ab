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
//!
//! Here: the ticket, the callback's binding check, routing and the
//! security headers. `link` makes links, `view` shows the page,
//! `forms` takes its POSTs, `answers` words the errors, `page` and
//! `logos` render HTML.

mod answers;
pub mod callback;
pub mod confirm;
mod forms;
mod link;
mod logos;
mod page;
pub mod start;
mod view;

use std::sync::Arc;

use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::app::App;
use crate::body::{self, Body};
use crate::random::{b64url, random_b64};
use answers::{message, method_not_allowed, stylesheet, unknown_link};
use sidekey_vault::{ConnectTicket, OAuthState};

pub use answers::{message_page, store_unavailable};
pub(crate) use link::connection_for;
pub use link::create_link;
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
        (Method::GET | Method::HEAD, None) => view::open(app, req, &ticket).await,
        (Method::POST, Some("claim")) => forms::claim(app, req, &ticket).await,
        (Method::POST, Some(a @ ("connect" | "disconnect"))) => {
            let a = a.to_owned();
            forms::act(app, req, &ticket, &a).await
        }
        (_, None) => method_not_allowed(app, "GET, HEAD"),
        (_, Some("claim" | "connect" | "disconnect")) => method_not_allowed(app, "POST"),
        _ => unknown_link(app),
    }
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

/// A templated authorize URL as a CSP host source: a placeholder that is
/// the host's leading label becomes `*` (`https://*.myshopify.com`);
/// `None` for any other shape, which a host source cannot say.
fn wildcard_origin(text: &str) -> Option<String> {
    let rest = text.strip_prefix("https://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let (first, tail) = authority.split_once('.')?;
    let one_field =
        first.starts_with('{') && first.ends_with('}') && first.matches('{').count() == 1;
    (one_field && !tail.is_empty() && !tail.contains(['{', '}', '@']))
        .then(|| format!("https://*.{tail}"))
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
        // A host made from the user's value (`https://{shop}.myshopify.com`)
        // is allowed as its wildcard; the sample host would block the
        // redirect to the real one.
        let o = match &p.templates.authorize_url {
            Some(t) => wildcard_origin(&t.text),
            None => p
                .authorize_url
                .as_ref()
                .map(|u| u.origin().ascii_serialization()),
        };
        if let Some(o) = o {
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
        let the_app = answers::the_app(app);
        return message(
            app,
            StatusCode::BAD_REQUEST,
            &format!("Cannot return to {the_app}"),
            &format!("The return address of {the_app} is not valid."),
            None,
        );
    };
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::SEE_OTHER;
    resp.headers_mut().insert(header::LOCATION, loc);
    harden(app, resp)
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
