//! The OAuth authorization-code flow with PKCE (S256).
//!
//! The main app asks for an authorize URL (`start`), sends the user's
//! browser there, and the provider redirects back to `callback` on the
//! agent-facing listener. The state is random, sealed in the store, usable
//! once, for ten minutes; the code is exchanged with the PKCE verifier and
//! the credential stored before the browser is sent on. Every failure
//! shows a page (or redirects to `return_to?error=<code>`) and stores
//! nothing.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::app::App;
use crate::body::{self, Body, html_escape};
use crate::error::ApiError;
use crate::refresh::{TokenError, call_token_endpoint};
use crate::secret::Secret;
use crate::store::{AuditRecord, Credential, OAuthState, Owner};

/// How long an authorize URL stays usable.
pub const STATE_TTL_SECS: i64 = 600;

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn random_b64(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::fill(&mut b[..]);
    b64url(&b)
}

/// RFC 7636: `BASE64URL(SHA256(verifier))`.
pub fn pkce_challenge(verifier: &str) -> String {
    b64url(&Sha256::digest(verifier.as_bytes()))
}

pub fn redirect_uri(app: &App, provider: &str) -> String {
    format!("{}/oauth/{provider}/callback", app.config.server.public_url)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StartBody {
    #[serde(default)]
    return_to: Option<String>,
    /// Overrides the provider's configured scopes for this authorization.
    #[serde(default)]
    scopes: Option<Vec<String>>,
}

/// `POST /v1/users/{user}/oauth/{provider}/start` (admin).
pub async fn start(
    app: &Arc<App>,
    user: &str,
    provider: &str,
    body: &[u8],
) -> Result<Value, ApiError> {
    let p = app
        .providers
        .get(provider)
        .ok_or_else(|| ApiError::UnknownProvider(app.providers.label(provider)))?
        .clone();
    let b: StartBody = if body.iter().all(u8::is_ascii_whitespace) {
        StartBody::default()
    } else {
        body::json_object(body)?
    };
    let (Some(authorize), Some(_)) = (&p.authorize_url, &p.token_url) else {
        return Err(ApiError::BadRequest(format!(
            "{} has no authorize_url and token_url configured, so it cannot be connected through OAuth.",
            p.display
        )));
    };
    let Some(client_id) = &p.client_id else {
        return Err(ApiError::NotConfigured(format!(
            "{}'s client_id is not configured; set it in [providers.{}].",
            p.display, p.name
        )));
    };
    if let Some(rt) = &b.return_to {
        match url::Url::parse(rt) {
            Ok(u) if u.scheme() == "https" || u.scheme() == "http" => {}
            _ => {
                return Err(ApiError::BadRequest(
                    "return_to must be an absolute http(s) URL.".into(),
                ));
            }
        }
    }
    let state = random_b64(32);
    let verifier = Secret::new(random_b64(32));
    let challenge = pkce_challenge(verifier.expose());
    let redirect = redirect_uri(app, provider);
    let scopes = b.scopes.unwrap_or_else(|| p.scopes.clone());

    let mut url = authorize.clone();
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("client_id", client_id)
            .append_pair("redirect_uri", &redirect)
            .append_pair("response_type", "code");
        if !scopes.is_empty() {
            q.append_pair("scope", &scopes.join(&p.scope_separator));
        }
        if !p.user_scopes.is_empty() {
            q.append_pair("user_scope", &p.user_scopes.join(&p.scope_separator));
        }
        q.append_pair("state", &state)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        for (k, v) in &p.authorize_params {
            q.append_pair(k, v);
        }
    }
    let expires_at = app.clock.now().saturating_add(STATE_TTL_SECS);
    app.store
        .put_oauth_state(
            &state,
            &OAuthState {
                user: user.to_owned(),
                provider: provider.to_owned(),
                verifier,
                return_to: b.return_to,
                redirect_uri: redirect,
                expires_at,
            },
        )
        .map_err(store_error)?;
    app.store.flush().await.map_err(store_error)?;
    Ok(json!({
        "authorize_url": url.as_str(),
        "state": state,
        "expires_at": expires_at,
    }))
}

fn store_error(e: crate::store::StoreError) -> ApiError {
    tracing::error!(error = %e, "store error");
    ApiError::Internal
}

/// Why a callback failed: the code goes to `return_to?error=`, the text to
/// the page.
struct Failure {
    code: &'static str,
    status: StatusCode,
    title: &'static str,
    detail: String,
}

/// `GET /oauth/{provider}/callback` (agent-facing listener).
pub async fn callback(app: &Arc<App>, req: Request<Incoming>, provider: &str) -> Response<Body> {
    let started = std::time::Instant::now();
    let mut code = None;
    let mut state = None;
    let mut error = None;
    for (k, v) in url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        match &*k {
            "code" => code = Some(Secret::new(v.into_owned())),
            "state" => state = Some(v.into_owned()),
            "error" => error = Some(v.into_owned()),
            _ => {}
        }
    }
    let display = app.providers.label(provider).display;
    // The state is consumed first, whatever happens next: a state is never
    // usable twice, even after a failed exchange.
    let st = match &state {
        None => None,
        Some(s) => match app.store.take_oauth_state(s) {
            Ok(st) => st,
            Err(e) => {
                tracing::error!(error = %e, "cannot read OAuth state");
                None
            }
        },
    };
    if st.is_some() {
        let _ = app.store.flush().await;
    }
    let outcome = complete(app, provider, &display, st.as_ref(), code, error).await;
    let (status, user) = match &outcome {
        Ok(_) => (StatusCode::SEE_OTHER, st.as_ref().map(|s| s.user.clone())),
        Err(f) => (f.status, st.as_ref().map(|s| s.user.clone())),
    };
    app.audit.record(AuditRecord {
        time: app.clock.now_millis(),
        kind: "oauth".into(),
        user,
        provider: Some(provider.chars().take(128).collect()),
        method: "GET".into(),
        path: format!(
            "/oauth/{}/callback",
            provider.chars().take(128).collect::<String>()
        ),
        status: status.as_u16(),
        duration_ms: (started.elapsed().as_secs_f64() * 1e6).round() / 1000.0,
        session_id: None,
        conversation_id: None,
        error: outcome.as_ref().err().map(|f| f.code.to_owned()),
    });
    let return_to = st.as_ref().and_then(|s| s.return_to.clone());
    match outcome {
        Ok(()) => match return_to {
            Some(rt) => redirect(&rt),
            None => page(
                StatusCode::OK,
                &format!("{} connected", html_escape(&display)),
                &format!(
                    "Your {} account is connected. You can close this window and go back to the app.",
                    html_escape(&display)
                ),
            ),
        },
        Err(f) => match return_to {
            Some(rt) => {
                let sep = if rt.contains('?') { '&' } else { '?' };
                redirect(&format!("{rt}{sep}error={}", f.code))
            }
            None => page(f.status, f.title, &html_escape(&f.detail)),
        },
    }
}

async fn complete(
    app: &Arc<App>,
    provider: &str,
    display: &str,
    st: Option<&OAuthState>,
    code: Option<Secret>,
    error: Option<String>,
) -> Result<(), Failure> {
    let invalid = |detail: &str| Failure {
        code: "invalid_state",
        status: StatusCode::BAD_REQUEST,
        title: "This sign-in link is not valid",
        detail: detail.to_owned(),
    };
    let Some(st) = st else {
        return Err(invalid(
            "This sign-in link is unknown, was already used, or has expired. Please start connecting again from the app.",
        ));
    };
    if st.provider != provider {
        return Err(invalid(
            "This sign-in link was made for a different service. Please start connecting again from the app.",
        ));
    }
    if st.expires_at < app.clock.now() {
        return Err(Failure {
            code: "state_expired",
            status: StatusCode::BAD_REQUEST,
            title: "This sign-in link has expired",
            detail: "Sign-in links last ten minutes. Please start connecting again from the app."
                .into(),
        });
    }
    if let Some(e) = error {
        let denied = e == "access_denied";
        tracing::info!(provider, user = %st.user, error = %e.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').take(64).collect::<String>(), "authorization not granted");
        return Err(Failure {
            code: if denied {
                "access_denied"
            } else {
                "provider_error"
            },
            status: StatusCode::BAD_REQUEST,
            title: if denied {
                "Access was not granted"
            } else {
                "The provider reported an error"
            },
            detail: format!(
                "{display} did not grant access, so nothing was connected. You can try again from the app."
            ),
        });
    }
    let Some(code) = code.filter(|c| !c.is_empty()) else {
        return Err(Failure {
            code: "invalid_request",
            status: StatusCode::BAD_REQUEST,
            title: "The sign-in answer was incomplete",
            detail: "The provider's answer had no authorization code. Please start connecting again from the app.".into(),
        });
    };
    let p = app
        .providers
        .get(provider)
        .cloned()
        .ok_or_else(|| invalid("Unknown service."))?;
    let grant = call_token_endpoint(
        &app.client,
        &p,
        &[
            ("grant_type", "authorization_code"),
            ("code", code.expose()),
            ("redirect_uri", &st.redirect_uri),
            ("code_verifier", st.verifier.expose()),
        ],
        Duration::from_secs(app.config.server.upstream_timeout_secs),
        app.clock.now(),
    )
    .await
    .map_err(|e| {
        tracing::warn!(provider, user = %st.user, error = %e, "authorization code exchange failed");
        let refused = matches!(e, TokenError::Refused(_));
        Failure {
            code: if refused { "exchange_refused" } else { "exchange_failed" },
            status: StatusCode::BAD_GATEWAY,
            title: "Connecting did not work",
            detail: format!(
                "{display} did not accept the sign-in, so nothing was connected. Please try again from the app."
            ),
        }
    })?;
    let now = app.clock.now();
    let owner = Owner::User(st.user.clone());
    let mut cred = Credential {
        access_token: Some(grant.access_token),
        refresh_token: grant.refresh_token,
        expires_at: grant.expires_at,
        scopes: grant.scopes.unwrap_or_default(),
        updated_at: now,
        ..Default::default()
    };
    let stored = app
        .store
        .put_credential(&owner, provider, &mut cred)
        .map_err(|e| e.to_string());
    let flushed = match stored {
        Ok(()) => app.store.flush().await.map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    if let Err(e) = flushed {
        tracing::error!(error = %e, "cannot store the new credential");
        return Err(Failure {
            code: "store_failed",
            status: StatusCode::INTERNAL_SERVER_ERROR,
            title: "Connecting did not work",
            detail: "sidekey could not save the connection. Please try again from the app.".into(),
        });
    }
    app.refresher.reset(&owner, provider);
    tracing::info!(provider, user = %st.user, "account connected through OAuth");
    Ok(())
}

fn redirect(to: &str) -> Response<Body> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::SEE_OTHER;
    match HeaderValue::try_from(to) {
        Ok(v) => {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        Err(_) => {
            return page(
                StatusCode::BAD_REQUEST,
                "Cannot return to the app",
                "The app's return address is not valid.",
            );
        }
    }
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp.headers_mut().insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

fn page(status: StatusCode, title: &str, detail: &str) -> Response<Body> {
    body::html(
        status,
        format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\"><title>{title}</title>\
<style>body{{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem;color:#222}}h1{{font-size:1.4rem}}</style></head>\
<body><h1>{title}</h1><p>{detail}</p></body></html>"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_rfc7636_example() {
        // RFC 7636 appendix B.
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }
}
