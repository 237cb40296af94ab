//! The OAuth authorization-code flow with PKCE (S256).
//!
//! A flow starts from the connect page or from the admin API (`start`,
//! which answers an authorize URL and a `connect_url`); the provider
//! redirects back to `callback` on the agent-facing listener. The state is
//! random, sealed in the store, usable once, for ten minutes, and names the
//! connect link it belongs to: the callback completes only in the browser
//! bound to that link ([`crate::connect`]). The code is exchanged with the
//! PKCE verifier and the credential stored before the browser is sent on
//! (with `[connect] confirm = true`, stored pending, and the browser sent
//! to `return_to?connect_code=` for the app to confirm). Every failure
//! shows a page (or redirects to `return_to?error=<code>`) and stores
//! nothing. A state presented at another provider's callback is spent and
//! answered with a page only: nothing about it is trusted, not even where
//! it would return to.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::app::App;
use crate::body::{Body, html_escape};
use crate::connect::Binding;
use crate::error::ApiError;
use sidekey_base::secret::Secret;
use sidekey_creds::providers::Provider;
use sidekey_creds::refresh::{TokenError, call_token_endpoint};
use sidekey_vault::{AuditRecord, Credential, OAuthState, Owner};

/// How long an authorize URL stays usable.
pub const STATE_TTL_SECS: i64 = 600;

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub fn random_b64(n: usize) -> String {
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

/// Where the operator sets the missing client id: the source the config
/// names (e.g. the shipped config's `SLACK_CLIENT_ID`), not just the section.
pub fn client_id_missing(app: &App, p: &Provider) -> String {
    use sidekey_base::config::SecretSource;
    match app.config.providers.get(&p.name).map(|c| &c.client_id) {
        None | Some(SecretSource::Unset) => format!(
            "{}'s client id is not configured; set client_id, client_id_env or client_id_file in [providers.{}].",
            p.display, p.name
        ),
        Some(other) => format!(
            "{}'s client id is not configured: {} (named by [providers.{}]) is not set.",
            p.display,
            other.describe(),
            p.name
        ),
    }
}

/// `POST /v1/users/{user}/oauth/{provider}/start` (admin).
///
/// Answers the bare `authorize_url` and a `connect_url`: opening the
/// latter binds the browser to the flow, then redirects to the former.
/// With `[oauth] bind_browser` on (the default) only a bound browser can
/// complete the flow.
pub async fn start(
    app: &Arc<App>,
    user: &str,
    provider: &str,
    body: &[u8],
) -> Result<Value, ApiError> {
    let p = app
        .providers
        .get(provider)
        .ok_or_else(|| crate::admin::unknown_provider(app, provider))?
        .clone();
    let b: StartBody = if body.iter().all(u8::is_ascii_whitespace) {
        StartBody::default()
    } else {
        crate::request::json_object(body)?
    };
    check_return_to_for(app, b.return_to.as_deref())?;
    let link = crate::connect::new_ticket(app);
    let flow = begin(
        app,
        user,
        &p,
        b.return_to.clone(),
        b.scopes,
        Some(link.id.clone()),
    )
    .await?;
    app.store
        .put_connect_ticket(
            &link.id,
            &sidekey_vault::ConnectTicket {
                user: user.to_owned(),
                providers: vec![provider.to_owned()],
                return_to: b.return_to,
                user_label: None,
                created_at: app.clock.now(),
                expires_at: flow.expires_at,
                browser: None,
                authorize_url: Some(flow.authorize_url.clone()),
            },
        )
        .await
        .map_err(ApiError::from)?;
    app.store.flush().await.map_err(ApiError::from)?;
    Ok(json!({
        "authorize_url": flow.authorize_url,
        "state": flow.state,
        "expires_at": flow.expires_at,
        "connect_url": link.url,
    }))
}

/// `return_to` must be an absolute http(s) URL.
pub fn check_return_to(rt: &str) -> Result<(), ApiError> {
    match url::Url::parse(rt) {
        Ok(u) if (u.scheme() == "https" || u.scheme() == "http") && rt.len() <= 2048 => Ok(()),
        _ => Err(ApiError::BadRequest(
            "return_to must be an absolute http(s) URL of at most 2048 characters.".into(),
        )),
    }
}

/// `return_to` of a new link or flow: checked when given, and required
/// when the app confirms connections (the code is sent there).
pub fn check_return_to_for(app: &App, return_to: Option<&str>) -> Result<(), ApiError> {
    match return_to {
        Some(rt) => check_return_to(rt),
        None if app.config.connect.confirm => Err(ApiError::BadRequest(
            "return_to is required with [connect] confirm = true: sidekey sends the connect_code there for the app to confirm.".into(),
        )),
        None => Ok(()),
    }
}

/// A started authorization: where to send the browser, and its state.
pub struct Flow {
    pub authorize_url: String,
    pub state: String,
    pub expires_at: i64,
}

/// Starts an authorization-code flow: a fresh state and PKCE verifier,
/// sealed in the store (not yet flushed), and the provider's authorize URL.
/// `ticket` is the connect link the flow belongs to.
pub async fn begin(
    app: &Arc<App>,
    user: &str,
    p: &sidekey_creds::providers::Provider,
    return_to: Option<String>,
    scopes: Option<Vec<String>>,
    ticket: Option<String>,
) -> Result<Flow, ApiError> {
    let (Some(authorize), Some(_)) = (&p.authorize_url, &p.token_url) else {
        let missing = match (&p.authorize_url, &p.token_url) {
            (None, None) => "authorize_url and token_url",
            (None, Some(_)) => "authorize_url",
            _ => "token_url",
        };
        return Err(ApiError::BadRequest(format!(
            "{} cannot be connected through OAuth: [providers.{}] has no {missing}.",
            p.display, p.name
        )));
    };
    let Some(client_id) = &p.client_id else {
        return Err(ApiError::NotConfigured(client_id_missing(app, p)));
    };
    let state = random_b64(32);
    let verifier = Secret::new(random_b64(32));
    let challenge = pkce_challenge(verifier.expose());
    let redirect = redirect_uri(app, &p.name);
    let scopes = scopes.unwrap_or_else(|| p.scopes.clone());

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
                provider: p.name.clone(),
                verifier,
                return_to,
                redirect_uri: redirect,
                expires_at,
                ticket,
            },
        )
        .await
        .map_err(ApiError::from)?;
    app.store.flush().await.map_err(ApiError::from)?;
    Ok(Flow {
        authorize_url: url.into(),
        state,
        expires_at,
    })
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
        Some(s) => match app.store.take_oauth_state(s).await {
            Ok(st) => st,
            // Not "unknown or used": the state was most likely not taken,
            // and the same callback may complete once the store is back.
            Err(e) if e.is_unavailable() => return crate::connect::store_unavailable(app),
            Err(e) => {
                tracing::error!(error = %e, "cannot read OAuth state");
                None
            }
        },
    };
    if st.is_some() {
        let _ = app.store.flush().await;
    }
    // A state made for another provider: spent above, and nothing of it
    // is used, not its binding and not its return_to (for a page flow,
    // the connect link itself).
    let foreign = st.as_ref().is_some_and(|s| s.provider != provider);
    // The binding is checked once the state is consumed, before anything
    // else: a refused callback can never be retried with the same state.
    let binding = match &st {
        Some(s) if !foreign => crate::connect::callback_binding(app, req.headers(), s).await,
        _ => Binding::Unbound,
    };
    // Where the app hears the outcome: a confirmation code needs it.
    let app_return = match &binding {
        _ if foreign => None,
        Binding::Page { return_to, .. } => return_to.clone(),
        Binding::Refused => None,
        _ => st.as_ref().and_then(|s| s.return_to.clone()),
    };
    let outcome = match &binding {
        Binding::Refused => Err(Failure {
            code: "browser_mismatch",
            status: StatusCode::FORBIDDEN,
            title: "This sign-in was started in another browser",
            detail: "For your safety, a sign-in completes only in the browser that opened the connect link. Nothing was connected. If you started it yourself, go back to that browser and press Connect again.".into(),
        }),
        _ => {
            let flow = Callback {
                provider,
                display: &display,
                st: st.as_ref(),
                can_return: app_return.is_some(),
            };
            complete(app, flow, code, error).await
        }
    };
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
    if let (Ok(Done::Pending(code)), Some(rt)) = (&outcome, &app_return) {
        // The app confirms (or not) for the user it has logged in.
        return crate::connect::redirect(app, &crate::connect::confirm::with_code(rt, code));
    }
    if let Binding::Page { page, .. } = &binding {
        // Back to the connect page, which puts the outcome into words.
        let p: String = url::form_urlencoded::byte_serialize(provider.as_bytes()).collect();
        return crate::connect::redirect(
            app,
            &match &outcome {
                Ok(_) => format!("{page}?connected={p}"),
                Err(f) => format!("{page}?error={}&provider={p}", f.code),
            },
        );
    }
    let return_to = app_return;
    match outcome {
        Ok(_) => match return_to {
            Some(rt) => crate::connect::redirect(app, &rt),
            None => page(
                app,
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
                crate::connect::redirect(app, &format!("{rt}{sep}error={}", f.code))
            }
            None => page(app, f.status, f.title, &html_escape(&f.detail)),
        },
    }
}

/// The callback being completed.
struct Callback<'a> {
    provider: &'a str,
    display: &'a str,
    st: Option<&'a OAuthState>,
    /// Whether the browser can be sent back to the app (with a
    /// confirmation code, when the app confirms connections).
    can_return: bool,
}

/// What a completed callback stored.
enum Done {
    /// The credential, active.
    Stored,
    /// The credential, pending the app's confirm with this code.
    Pending(String),
}

async fn complete(
    app: &Arc<App>,
    flow: Callback<'_>,
    code: Option<Secret>,
    error: Option<String>,
) -> Result<Done, Failure> {
    let Callback {
        provider,
        display,
        st,
        can_return,
    } = flow;
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
    let confirm = app.config.connect.confirm;
    if confirm && !can_return {
        // A link made before confirmation was switched on, without a
        // return_to: the code would have nowhere to go.
        return Err(Failure {
            code: "confirm_unavailable",
            status: StatusCode::BAD_REQUEST,
            title: "Connecting did not work",
            detail: "This sign-in has no way back to the app, which must confirm new connections. Nothing was connected. Please start connecting again from the app.".into(),
        });
    }
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
    let store_failed = || Failure {
        code: "store_failed",
        status: StatusCode::INTERNAL_SERVER_ERROR,
        title: "Connecting did not work",
        detail: "sidekey could not save the connection. Please try again from the app.".into(),
    };
    if confirm {
        // Not among the credentials: whatever the user had stays in use.
        return match crate::connect::confirm::store_pending(app, &st.user, provider, cred).await {
            Ok(code) => {
                tracing::info!(provider, user = %st.user, "account connected through OAuth, waiting for the app's confirmation");
                Ok(Done::Pending(code))
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot store the pending credential");
                Err(store_failed())
            }
        };
    }
    let stored = app
        .store
        .put_credential(&owner, provider, &mut cred)
        .await
        .map_err(|e| e.to_string());
    let flushed = match stored {
        Ok(()) => app.store.flush().await.map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    if let Err(e) = flushed {
        tracing::error!(error = %e, "cannot store the new credential");
        return Err(store_failed());
    }
    app.refresher.reset(&owner, provider).await;
    tracing::info!(provider, user = %st.user, "account connected through OAuth");
    Ok(Done::Stored)
}

/// `title` and `detail` are HTML (already escaped).
fn page(app: &App, status: StatusCode, title: &str, detail: &str) -> Response<Body> {
    crate::connect::message_page(app, status, title, detail)
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
