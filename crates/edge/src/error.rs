//! Every error sidekey answers with, and the one place it becomes HTTP.
//!
//! Each variant is one code of the contract's error table (plus the admin
//! codes). [`ApiError::into_response`] is the only function that turns an
//! error into a status, a JSON body and the `X-Sidekey-Error` header, so a
//! code can never be answered with two different statuses.

use http::{HeaderName, HeaderValue, Response, StatusCode};
use serde_json::json;

use crate::body::{self, Body};
use sidekey_creds::providers::ConnectionError;
use sidekey_creds::providers::ProviderLabel;
use sidekey_creds::refresh::RefreshError;
use sidekey_creds::session::{SessionError, SessionFault};
use sidekey_vault::StoreError;

/// `X-Sidekey-Error` on every error answer: its code. A name parsed once,
/// since every answer is checked for it.
pub static ERROR_HEADER: HeaderName = HeaderName::from_static("x-sidekey-error");

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The fault is sent as `reason`; the detail is only logged.
    #[error("invalid session ({reason}): {detail}", reason = .0.reason(), detail = .1)]
    InvalidSession(SessionFault, &'static str),
    #[error("session bound to another conversation")]
    ConversationMismatch,
    /// A bound session called without the conversation header.
    #[error("call without its conversation id")]
    ConversationMissing,
    #[error("provider {} not in session", .0.name)]
    ProviderNotAllowed(ProviderLabel),
    #[error("path not allowed for {}", .0.name)]
    PathNotAllowed(ProviderLabel),
    #[error("bad path: {0}")]
    BadPath(&'static str),
    #[error("unknown provider {}", .0.name)]
    UnknownProvider(ProviderLabel),
    /// The admin API's `unknown_provider`: speaks to the main app's
    /// developer, not the caller, and lists what is configured.
    #[error("unknown provider {name}")]
    UnknownProviderAdmin {
        name: String,
        configured: Vec<String>,
    },
    #[error("no credential for {}", .0.name)]
    CredentialMissing(ProviderLabel),
    #[error("reauthorisation required for {}", .0.name)]
    ReauthRequired(ProviderLabel),
    /// The token endpoint refused a JWT bearer grant for this subject
    /// (the organisation has not allowed it); the subject is audited.
    #[error("JWT bearer grant refused for {}", .0.name)]
    GrantRefused(ProviderLabel, String),
    /// The caller's subject is outside `jwt_subject_domains`.
    #[error("subject not allowed for {}", .0.name)]
    SubjectNotAllowed(ProviderLabel, String),
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
    /// A per-connection value (`[providers.NAME.connection.FIELD]`) fails
    /// its pattern or would change the URL's shape; the field is named.
    #[error("connection value {} for {} not accepted", .1, .0.name)]
    BadConnectionValue(ProviderLabel, String),
    /// An operation tool's arguments; the message names the parameter.
    #[error("bad arguments: {0}")]
    BadArguments(String),
    #[error("unknown tool {0}")]
    UnknownTool(String),
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
    /// The shared store (PostgreSQL) cannot be reached; details are logged.
    #[error("store unavailable")]
    StoreUnavailable,
    /// Details go to the log at the point of failure, never to the caller.
    #[error("internal error")]
    Internal,
    /// A store failure: answered as `store_unavailable` when the database
    /// cannot be reached, else as `internal_error`; the cause is logged
    /// once, when the answer is made.
    #[error("{0}")]
    Store(StoreError),
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            InvalidSession(..) => "invalid_session",
            ConversationMismatch | ConversationMissing => "conversation_mismatch",
            ProviderNotAllowed(_) => "provider_not_allowed",
            PathNotAllowed(_) => "path_not_allowed",
            BadPath(_) => "bad_path",
            UnknownProvider(_) | UnknownProviderAdmin { .. } => "unknown_provider",
            CredentialMissing(_) => "credential_missing",
            ReauthRequired(_) => "reauth_required",
            GrantRefused(..) => "grant_refused",
            SubjectNotAllowed(..) => "subject_not_allowed",
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
            BadConnectionValue(..) => "bad_connection_value",
            BadArguments(_) => "bad_arguments",
            UnknownTool(_) => "unknown_tool",
            NotFound(_) => "not_found",
            MethodNotAllowed => "method_not_allowed",
            Conflict(_) => "conflict",
            NotConfigured(_) => "not_configured",
            Overloaded => "overloaded",
            StoreUnavailable => "store_unavailable",
            Store(e) if e.is_unavailable() => "store_unavailable",
            Internal | Store(_) => "internal_error",
        }
    }

    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            InvalidSession(..) | ConversationMismatch | ConversationMissing | Unauthorized
            | InvalidSignature(_) => StatusCode::UNAUTHORIZED,
            ProviderNotAllowed(_) | PathNotAllowed(_) | SubjectNotAllowed(..) => {
                StatusCode::FORBIDDEN
            }
            BadPath(_) | BadRequest(_) | BadArguments(_) | BadConnectionValue(..) => {
                StatusCode::BAD_REQUEST
            }
            UnknownTool(_) => StatusCode::NOT_FOUND,
            UnknownProvider(_) | UnknownProviderAdmin { .. } | NotFound(_) => StatusCode::NOT_FOUND,
            CredentialMissing(_) | ReauthRequired(_) | GrantRefused(..) => {
                StatusCode::FAILED_DEPENDENCY
            }
            BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            UriTooLong => StatusCode::URI_TOO_LONG,
            RefreshFailed(_) | UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Conflict(_) => StatusCode::CONFLICT,
            NotConfigured(_) | Overloaded | StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Store(e) if e.is_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
            Internal | Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// One sentence a voice agent can read to the caller as it is.
    pub fn message(&self) -> String {
        use ApiError::*;
        match self {
            InvalidSession(SessionFault::Missing, _) => {
                "This call didn't include the access pass for your accounts, so I can't use them here.".into()
            }
            InvalidSession(SessionFault::Expired, _) => {
                "This conversation's access to your accounts has expired; please start a new conversation from the app.".into()
            }
            InvalidSession(SessionFault::Revoked, _) => {
                "This conversation's access to your accounts has ended; please start a new conversation from the app.".into()
            }
            InvalidSession(..) => {
                "This conversation's access pass isn't valid; please start a new conversation from the app.".into()
            }
            ConversationMismatch => {
                "This access pass belongs to a different conversation, so I can't use it here.".into()
            }
            ConversationMissing => {
                "This call didn't say which conversation it belongs to, so I can't use this conversation's access pass.".into()
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
            UnknownProviderAdmin { name, configured } => format!(
                "No provider named {name} is configured; the configured providers are: {}.",
                configured.join(", ")
            ),
            CredentialMissing(p) => format!(
                "Your {} account isn't connected yet; please connect it in the app.",
                p.display
            ),
            ReauthRequired(p) => format!(
                "Your {} connection has expired; please reconnect your {} account in the app.",
                p.display, p.display
            ),
            GrantRefused(p, _) => format!(
                "Your organisation hasn't let me use your {} account.",
                p.display
            ),
            SubjectNotAllowed(p, _) => format!(
                "Your organisation's {} access doesn't cover your account.",
                p.display
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
                "Too many requests right now; please try again in {} second{}.",
                retry_after_secs,
                if *retry_after_secs == 1 { "" } else { "s" }
            ),
            Unauthorized => "Missing or wrong credentials for this endpoint.".into(),
            InvalidSignature(_) => "The webhook signature is missing, invalid or too old.".into(),
            BadRequest(m) | BadArguments(m) => m.clone(),
            BadConnectionValue(p, field) => format!(
                "The {field} given for {} isn't accepted; please check it and try again.",
                p.display
            ),
            UnknownTool(n) => format!("I don't have a tool called {n}."),
            NotFound(m) => m.clone(),
            MethodNotAllowed => "That method is not allowed on this endpoint.".into(),
            Conflict(m) => m.clone(),
            NotConfigured(m) => m.clone(),
            Overloaded => "sidekey is busy right now; please try again in a moment.".into(),
            StoreUnavailable => "I can't reach my credential store just now; please try again in a moment.".into(),
            Store(e) if e.is_unavailable() => "I can't reach my credential store just now; please try again in a moment.".into(),
            Internal | Store(_) => "Something went wrong inside sidekey; please try again.".into(),
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
            | GrantRefused(p, _)
            | SubjectNotAllowed(p, _)
            | RefreshFailed(p)
            | UpstreamUnreachable(p)
            | UpstreamTimeout(p)
            | BadConnectionValue(p, _) => Some(&p.name),
            UnknownProviderAdmin { name, .. } => Some(name),
            _ => None,
        }
    }

    /// The JWT bearer subject an error is about, for the audit record.
    pub fn subject(&self) -> Option<&str> {
        match self {
            ApiError::GrantRefused(_, s) | ApiError::SubjectNotAllowed(_, s) => Some(s),
            _ => None,
        }
    }

    /// The contract's error answer: JSON body, status, [`ERROR_HEADER`].
    pub fn into_response(self) -> Response<Body> {
        if let ApiError::Store(e) = &self {
            if e.is_unavailable() {
                tracing::warn!(error = %e, "store unavailable");
            } else {
                tracing::error!(error = %e, "store error");
            }
        }
        let mut err = json!({ "code": self.code(), "message": self.message() });
        if let Some(p) = self.provider() {
            err["provider"] = json!(p);
        }
        if let ApiError::InvalidSession(fault, _) = &self {
            err["reason"] = json!(fault.reason());
        }
        let mut resp = body::json(self.status(), &json!({ "error": err }));
        resp.headers_mut()
            .insert(&ERROR_HEADER, HeaderValue::from_static(self.code()));
        if let ApiError::RateLimited { retry_after_secs } = self {
            resp.headers_mut().insert(
                http::header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs),
            );
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Store(e)
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Invalid(fault, detail) => ApiError::InvalidSession(fault, detail),
            SessionError::Store(e) => ApiError::Store(e),
        }
    }
}

impl From<RefreshError> for ApiError {
    fn from(e: RefreshError) -> Self {
        match e {
            RefreshError::ReauthRequired(p) => ApiError::ReauthRequired(p),
            RefreshError::CredentialMissing(p) => ApiError::CredentialMissing(p),
            RefreshError::Failed(p) => ApiError::RefreshFailed(p),
            RefreshError::GrantRefused(p, s) => ApiError::GrantRefused(p, s),
            RefreshError::BadConnection(p, f) => ApiError::BadConnectionValue(p, f),
            RefreshError::Store(e) => ApiError::Store(e),
        }
    }
}

impl ApiError {
    /// A connection value problem of provider `p`: missing → 424
    /// `credential_missing`, refused → 400 `bad_connection_value`.
    pub fn connection(p: &sidekey_creds::providers::Provider, e: ConnectionError) -> ApiError {
        match e {
            ConnectionError::Missing(_) => ApiError::CredentialMissing(p.label()),
            ConnectionError::Bad(f) | ConnectionError::Unknown(f) => ApiError::BadConnectionValue(
                p.label(),
                f.chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
                    .take(64)
                    .collect(),
            ),
        }
    }
}

/// A JSON parse error as a sentence that never quotes the input.
pub fn json_error(e: &serde_json::Error) -> ApiError {
    let msg = e.to_string();
    let detail = if msg.starts_with("missing field")
        || msg.starts_with("unknown field")
        || msg.starts_with("duplicate field")
    {
        msg.split(" at line")
            .next()
            .unwrap_or("")
            .replace('`', "\"")
    } else {
        match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                "it is not valid JSON".into()
            }
            _ => "a field has the wrong type".into(),
        }
    };
    ApiError::BadRequest(format!(
        "The request body is not what this endpoint takes: {detail} (line {}, column {}).",
        e.line(),
        e.column()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Spec {
        method: String,
        path: String,
    }

    #[test]
    fn json_errors_do_not_quote_input() {
        let e =
            serde_json::from_str::<Spec>(r#"{"method": 5, "path": "xoxb-secret"}"#).unwrap_err();
        let m = json_error(&e).message();
        assert!(!m.contains("xoxb"), "{m}");
        let e = serde_json::from_str::<Spec>(r#"{"path": "/a"}"#).unwrap_err();
        assert!(
            json_error(&e)
                .message()
                .contains("missing field \"method\"")
        );
    }

    #[test]
    fn every_error_has_header_and_json_body() {
        let p = ProviderLabel::new("google", "Google");
        let cases = vec![
            (
                ApiError::InvalidSession(SessionFault::Missing, "x"),
                401,
                "invalid_session",
            ),
            (ApiError::ConversationMismatch, 401, "conversation_mismatch"),
            (ApiError::ConversationMissing, 401, "conversation_mismatch"),
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
            (
                ApiError::GrantRefused(p.clone(), "a@acme.com".into()),
                424,
                "grant_refused",
            ),
            (
                ApiError::SubjectNotAllowed(p.clone(), "a@evil.com".into()),
                403,
                "subject_not_allowed",
            ),
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
            (ApiError::StoreUnavailable, 503, "store_unavailable"),
        ];
        for (err, status, code) in cases {
            let resp = err.into_response();
            assert_eq!(resp.status().as_u16(), status, "{code}");
            assert_eq!(resp.headers()["x-sidekey-error"], code);
        }
    }

    #[test]
    fn grant_refused_sentence_names_the_provider_not_the_subject() {
        let p = ProviderLabel::new("google", "Google");
        let e = ApiError::GrantRefused(p, "alice@acme.com".into());
        assert_eq!(
            e.message(),
            "Your organisation hasn't let me use your Google account."
        );
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
