//! The connect pages' fixed answers: errors in words, each with a way back
//! to the app, and the stylesheet. End users see these, so they name the
//! app (`[connect] app_name`), never the vault behind it.

use http::{HeaderValue, Response, StatusCode, header};

use super::{harden, page};
use crate::app::App;
use crate::body::{self, Body, html_escape};
use sidekey_vault::StoreError;

/// The app's name in the middle of a sentence ("the app" without one).
pub(crate) fn the_app(app: &App) -> &str {
    page::app_name(&app.config.connect)
}

/// Where an error page's "Back to" link goes: the link's `return_to`
/// when known, else `[connect] app_url`, else nowhere.
fn back<'a>(app: &'a App, return_to: Option<&'a str>) -> Option<&'a str> {
    return_to.or(app.config.connect.app_url.as_ref().map(url::Url::as_str))
}

/// A page with a title and a sentence; `detail_html` is already escaped.
/// `return_to` is the link's, when this answer belongs to a known link.
pub fn message_page(
    app: &App,
    status: StatusCode,
    title: &str,
    detail_html: &str,
    return_to: Option<&str>,
) -> Response<Body> {
    harden(
        app,
        body::html(
            status,
            page::message(
                &app.config.connect,
                title,
                detail_html,
                back(app, return_to),
            ),
        ),
    )
}

/// `message_page` for fixed sentences (escaped here).
pub(super) fn message(
    app: &App,
    status: StatusCode,
    title: &str,
    detail: &str,
    return_to: Option<&str>,
) -> Response<Body> {
    message_page(app, status, title, &html_escape(detail), return_to)
}

pub(super) fn form_expired(app: &App, return_to: Option<&str>) -> Response<Body> {
    message(
        app,
        StatusCode::FORBIDDEN,
        "This form has expired",
        "It was not sent from the connect page as it was shown to you, or it is too old, so nothing changed. Reload the connect page and try again.",
        return_to,
    )
}

pub(super) fn already_used(app: &App, return_to: Option<&str>) -> Response<Body> {
    message(
        app,
        StatusCode::FORBIDDEN,
        "This link was already used",
        &format!(
            "It was opened in another browser, and a connect link works in one browser only, so nothing can be connected from here. If it was you, go back to that browser; otherwise ask {} for a new link.",
            the_app(app)
        ),
        return_to,
    )
}

pub(super) fn expired_link(app: &App, return_to: Option<&str>) -> Response<Body> {
    message(
        app,
        StatusCode::GONE,
        "This link has expired",
        &format!(
            "Connect links last a few minutes. Go back to {} and open a new one.",
            the_app(app)
        ),
        return_to,
    )
}

pub(super) fn unknown_link(app: &App) -> Response<Body> {
    message(
        app,
        StatusCode::NOT_FOUND,
        "This link is not valid",
        &format!(
            "Check that you opened the whole link, or go back to {} and open a new one.",
            the_app(app)
        ),
        None,
    )
}

pub(super) fn method_not_allowed(app: &App, allow: &'static str) -> Response<Body> {
    let mut r = message(
        app,
        StatusCode::METHOD_NOT_ALLOWED,
        "Not here",
        "Open the connect link itself and use its buttons.",
        None,
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

pub(super) fn internal(app: &App, e: StoreError, return_to: Option<&str>) -> Response<Body> {
    if e.is_unavailable() {
        return store_unavailable_for(app, return_to);
    }
    tracing::error!(error = %e, "connect page: store error");
    message(
        app,
        StatusCode::INTERNAL_SERVER_ERROR,
        "Something went wrong",
        "This link could not be read or saved just now. Please try again.",
        return_to,
    )
}

/// The page's form of `503 store_unavailable` (contract section 5): the
/// Postgres store is out of reach for now, which a retry may fix; a 500
/// would say the service itself is broken. The header lets the
/// `sidekey_store_unavailable_total` counter see it like any other.
pub fn store_unavailable(app: &App) -> Response<Body> {
    store_unavailable_for(app, None)
}

fn store_unavailable_for(app: &App, return_to: Option<&str>) -> Response<Body> {
    tracing::warn!("connect page: the store is unavailable");
    let mut resp = message(
        app,
        StatusCode::SERVICE_UNAVAILABLE,
        "Please try again in a moment",
        "Your connected accounts cannot be reached just now. Go back and try again in a moment.",
        return_to,
    );
    resp.headers_mut().insert(
        &crate::error::ERROR_HEADER,
        HeaderValue::from_static("store_unavailable"),
    );
    resp
}

pub(super) fn stylesheet(app: &App) -> Response<Body> {
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
