//! Every error sidekey answers with, and the one place it becomes HTTP.
//!
//! Each variant is one code of the contract's error table (plus the admin
//! codes). [`ApiError::into_response`] is the only function that turns an
//! error into a status, a JSON body and the `X-Sidekey-Error` header, so a
//! code can never be answered with two different statuses.

use std::fmt;

use http::{HeaderValue, Response, StatusCode};
use serde_json::json;

use crate::body::{self, Body};

/// Which provider an error is about, with the name a caller would say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderLabel {
    /// The configured provider key, e.g. `google`.
    pub name: String,
    /// What the voice agent calls it, e.g. `Google`.
    pub display: String,
}

impl ProviderLabel {
    pub fn new(name: &str, display: &str) -> Self {
        ProviderLabel {
            name: name.to_owned(),
            display: display.to_owned(),
        }
    }

    /// A label for a provider name that is not configured.
    pub fn unknown(name: &str) -> Self {
        ProviderLabel::new(name, &display_name(name))
    }
}

/// `google` → `Google`; `my-crm` → `My-crm`.
pub fn display_name(name: &str) -> String {
    let mut c = name.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The reason is logged, never sent: telling an attacker which check
    /// failed helps them.
    #[error("invalid session: {0}")]
    InvalidSession(&'static str),
    #[error("session bound to another conversation")]
    ConversationMismatch,
    #[error("provider {} not in session", .0.name)]
    ProviderNotAllowed(ProviderLabel),
    #[error("path not allowed for {}", .0.name)]
    PathNotAllowed(ProviderLabel),
    #[error("bad path: {0}")]
    BadPath(&'static str),
    #[error("unknown provider {}", .0.name)]
    UnknownProvider(ProviderLabel),
    #[error("no credential for {}", .0.name)]
    CredentialMissing(ProviderLabel),
    #[error("reauthorisation required for {}", .0.name)]
    ReauthRequired(ProviderLabel),
    #[error("body larger than {0} bytes")]
    BodyTooLarge(u64),
    /// The request head is over `[server] max_header_bytes` (hyper's 431).
    #[error("request head too large")]
    HeadersTooLarge,
    /// The request target is longer than HTTP/1 parsing allows (hyper's 414).
    #[error("request URI too long")]
    UriTooLong,
    #[error("token refresh failed for {}", .0.name)]
    RefreshFailed(ProviderLabel),
    #[error("upstream {} unreachable", .0.name)]
    UpstreamUnreachable(ProviderLabel),
    #[error("upstream {} timed out", .0.name)]
    UpstreamTimeout(ProviderLabel),
    #[error("rate limited")]
    RateLimited { retry_after_secs: u64 },
    #[error("unauthorized")]
    Unauthorized,
    #[error("invalid webhook signature: {0}")]
    InvalidSignature(&'static str),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("not configured: {0}")]
    NotConfigured(String),
    #[error("overloaded")]
    Overloaded,
    /// Details go to the log at the point of failure, never to the caller.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            InvalidSession(_) => "invalid_session",
            ConversationMismatch => "conversation_mismatch",
            ProviderNotAllowed(_) => "provider_not_allowed",
            PathNotAllowed(_) => "path_not_allowed",
            BadPath(_) => "bad_path",
            UnknownProvider(_) => "unknown_provider",
            CredentialMissing(_) => "credential_missing",
            ReauthRequired(_) => "reauth_required",
            BodyTooLarge(_) => "body_too_large",
            HeadersTooLarge => "headers_too_large",
            UriTooLong => "uri_too_long",
            RefreshFailed(_) => "refresh_failed",
            UpstreamUnreachable(_) => "upstream_unreachable",
            UpstreamTimeout(_) => "upstream_timeout",
            RateLimited { .. } => "rate_limited",
            Unauthorized => "unauthorized",
            InvalidSignature(_) => "invalid_signature",
            BadRequest(_) => "bad_request",
            NotFound(_) => "not_found",
            MethodNotAllowed => "method_not_allowed",
            Conflict(_) => "conflict",
            NotConfigured(_) => "not_configured",
            Overloaded => "overloaded",
            Internal => "internal_error",
        }
    }

    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            InvalidSession(_) | ConversationMismatch | Unauthorized | InvalidSignature(_) => {
                StatusCode::UNAUTHORIZED
            }
            ProviderNotAllowed(_) | PathNotAllowed(_) => StatusCode::FORBIDDEN,
            BadPath(_) | BadRequest(_) => StatusCode::BAD_REQUEST,
            UnknownProvider(_) | NotFound(_) => StatusCode::NOT_FOUND,
            CredentialMissing(_) | ReauthRequired(_) => StatusCode::FAILED_DEPENDENCY,
            BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            UriTooLong => StatusCode::URI_TOO_LONG,
            RefreshFailed(_) | UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Conflict(_) => StatusCode::CONFLICT,
            NotConfigured(_) | Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// One sentence a voice agent can read to the caller as it is.
    pub fn message(&self) -> String {
        use ApiError::*;
        match self {
            InvalidSession(_) => {
                "This conversation's access to your accounts has expired or is not valid; please start a new conversation from the app.".into()
            }
            ConversationMismatch => {
                "This access pass belongs to a different conversation, so I can't use it here.".into()
            }
            ProviderNotAllowed(p) => format!(
                "This conversation wasn't given access to your {} account.",
                p.display
            ),
            PathNotAllowed(p) => format!(
                "I'm not allowed to do that with your {} account.",
                p.display
            ),
            BadPath(_) => "That request address isn't allowed.".into(),
            UnknownProvider(p) => format!("I don't know a service called {}.", p.display),
            CredentialMissing(p) => format!(
                "Your {} account isn't connected yet; please connect it in the app.",
                p.display
            ),
            ReauthRequired(p) => format!(
                "Your {} connection has expired; please reconnect your {} account in the app.",
                p.display, p.display
            ),
            BodyTooLarge(limit) => format!(
                "That request is too large; the limit is {} bytes.",
                limit
            ),
            HeadersTooLarge => "The request's headers are too large.".into(),
            UriTooLong => "The request address is too long.".into(),
            RefreshFailed(p) => format!(
                "I couldn't renew access to your {} account just now; please try again in a moment.",
                p.display
            ),
            UpstreamUnreachable(p) => format!(
                "I couldn't reach {} just now; please try again in a moment.",
                p.display
            ),
            UpstreamTimeout(p) => format!(
                "{} took too long to answer; please try again in a moment.",
                p.display
            ),
            RateLimited { retry_after_secs } => format!(
                "Too many requests right now; please try again in {} seconds.",
                retry_after_secs
            ),
            Unauthorized => "Missing or wrong credentials for this endpoint.".into(),
            InvalidSignature(_) => "The webhook signature is missing, invalid or too old.".into(),
            BadRequest(m) => m.clone(),
            NotFound(m) => m.clone(),
            MethodNotAllowed => "That method is not allowed on this endpoint.".into(),
            Conflict(m) => m.clone(),
            NotConfigured(m) => m.clone(),
            Overloaded => "sidekey is busy right now; please try again in a moment.".into(),
            Internal => "Something went wrong inside sidekey; please try again.".into(),
        }
    }

    pub fn provider(&self) -> Option<&str> {
        use ApiError::*;
        match self {
            ProviderNotAllowed(p)
            | PathNotAllowed(p)
            | UnknownProvider(p)
            | CredentialMissing(p)
            | ReauthRequired(p)
            | RefreshFailed(p)
            | UpstreamUnreachable(p)
            | UpstreamTimeout(p) => Some(&p.name),
            _ => None,
        }
    }

    /// The contract's error answer: JSON body, status, `X-Sidekey-Error`.
    pub fn into_response(self) -> Response<Body> {
        let mut err = json!({ "code": self.code(), "message": self.message() });
        if let Some(p) = self.provider() {
            err["provider"] = json!(p);
        }
        let mut resp = body::json(self.status(), &json!({ "error": err }));
        resp.headers_mut()
            .insert("x-sidekey-error", HeaderValue::from_static(self.code()));
        if let ApiError::RateLimited { retry_after_secs } = self {
            resp.headers_mut().insert(
                http::header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs),
            );
        }
        resp
    }
}

/// A problem that stops the process: bad config, unreadable key, wrong master
/// key. `main` prints the message as one line and exits with status 2.
#[derive(Debug)]
pub struct Fatal(pub String);

impl fmt::Display for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fatal {}

impl Fatal {
    pub fn new(msg: impl Into<String>) -> Self {
        Fatal(msg.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_header_and_json_body() {
        let p = ProviderLabel::new("google", "Google");
        let cases = vec![
            (ApiError::InvalidSession("x"), 401, "invalid_session"),
            (ApiError::ConversationMismatch, 401, "conversation_mismatch"),
            (
                ApiError::ProviderNotAllowed(p.clone()),
                403,
                "provider_not_allowed",
            ),
            (ApiError::PathNotAllowed(p.clone()), 403, "path_not_allowed"),
            (ApiError::BadPath("x"), 400, "bad_path"),
            (
                ApiError::UnknownProvider(p.clone()),
                404,
                "unknown_provider",
            ),
            (
                ApiError::CredentialMissing(p.clone()),
                424,
                "credential_missing",
            ),
            (ApiError::ReauthRequired(p.clone()), 424, "reauth_required"),
            (ApiError::BodyTooLarge(10), 413, "body_too_large"),
            (ApiError::HeadersTooLarge, 431, "headers_too_large"),
            (ApiError::UriTooLong, 414, "uri_too_long"),
            (ApiError::RefreshFailed(p.clone()), 502, "refresh_failed"),
            (
                ApiError::UpstreamUnreachable(p.clone()),
                502,
                "upstream_unreachable",
            ),
            (
                ApiError::UpstreamTimeout(p.clone()),
                504,
                "upstream_timeout",
            ),
            (
                ApiError::RateLimited {
                    retry_after_secs: 3,
                },
                429,
                "rate_limited",
            ),
        ];
        for (err, status, code) in cases {
            let resp = err.into_response();
            assert_eq!(resp.status().as_u16(), status, "{code}");
            assert_eq!(resp.headers()["x-sidekey-error"], code);
        }
    }

    #[test]
    fn messages_name_the_provider() {
        let p = ProviderLabel::new("google", "Google");
        assert_eq!(
            ApiError::CredentialMissing(p).message(),
            "Your Google account isn't connected yet; please connect it in the app."
        );
    }
}
