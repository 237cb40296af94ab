//! `GET /oauth/{provider}/callback`: where the provider sends the browser
//! back. The state is taken (usable once), the browser's binding checked,
//! the code exchanged with the PKCE verifier and the credential stored (or
//! stored pending, with `[connect] confirm`) before the browser is sent on.
//! Every failure shows a page or redirects to `return_to?error=<code>` and
//! stores nothing; a state presented at another provider's callback is
//! spent and answered with a page only.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::Binding;
use crate::app::App;
use crate::body::{Body, html_escape};
use sidekey_base::secret::Secret;
use sidekey_creds::refresh::{TokenError, call_token_endpoint};
use sidekey_vault::{AuditRecord, Credential, OAuthState, Owner};

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
    let the_app = super::answers::the_app(app);
    // The state is consumed first, whatever happens next: a state is never
    // usable twice, even after a failed exchange.
    let st = match &state {
        None => None,
        Some(s) => match app.store.take_oauth_state(s).await {
            Ok(st) => st,
            // Not "unknown or used": the state was most likely not taken,
            // and the same callback may complete once the store is back.
            Err(e) if e.is_unavailable() => return super::store_unavailable(app),
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
        Some(s) if !foreign => super::callback_binding(app, req.headers(), s).await,
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
                query: req.uri().query().unwrap_or(""),
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
        tool: None,
        subject: None,
    });
    if let (Ok(Done::Pending(code)), Some(rt)) = (&outcome, &app_return) {
        // The app confirms (or not) for the user it has logged in.
        return super::redirect(app, &super::confirm::with_code(rt, code));
    }
    if let Binding::Page { page, .. } = &binding {
        // Back to the connect page, which puts the outcome into words.
        let p: String = url::form_urlencoded::byte_serialize(provider.as_bytes()).collect();
        return super::redirect(
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
            Some(rt) => super::redirect(app, &rt),
            None => page(
                app,
                StatusCode::OK,
                &format!("{display} connected"),
                &format!(
                    "Your {} account is connected. You can close this window and go back to {}.",
                    html_escape(&display),
                    html_escape(the_app),
                ),
            ),
        },
        Err(f) => match return_to {
            Some(rt) => {
                let sep = if rt.contains('?') { '&' } else { '?' };
                super::redirect(app, &format!("{rt}{sep}error={}", f.code))
            }
            None => page(app, f.status, f.title, &html_escape(&f.detail)),
        },
    }
}

/// The callback being completed.
struct Callback<'a> {
    provider: &'a str,
    /// The query as it arrived, for providers that sign it.
    query: &'a str,
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
        query,
        display,
        st,
        can_return,
    } = flow;
    let the_app = super::answers::the_app(app);
    let invalid = |detail: &str| Failure {
        code: "invalid_state",
        status: StatusCode::BAD_REQUEST,
        title: "This sign-in link is not valid",
        detail: detail.to_owned(),
    };
    let Some(st) = st else {
        return Err(invalid(&format!(
            "This sign-in link is unknown, was already used, or has expired. Please start connecting again from {the_app}."
        )));
    };
    if st.provider != provider {
        return Err(invalid(&format!(
            "This sign-in link was made for a different service. Please start connecting again from {the_app}."
        )));
    }
    if st.expires_at < app.clock.now() {
        return Err(Failure {
            code: "state_expired",
            status: StatusCode::BAD_REQUEST,
            title: "This sign-in link has expired",
            detail: format!(
                "Sign-in links last ten minutes. Please start connecting again from {the_app}."
            ),
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
                "{display} did not grant access, so nothing was connected. You can try again from {the_app}."
            ),
        });
    }
    let Some(code) = code.filter(|c| !c.is_empty()) else {
        return Err(Failure {
            code: "invalid_request",
            status: StatusCode::BAD_REQUEST,
            title: "The sign-in answer was incomplete",
            detail: format!(
                "The answer from {display} had no authorization code. Please start connecting again from {the_app}."
            ),
        });
    };
    let p = app
        .providers
        .get(provider)
        .cloned()
        .ok_or_else(|| invalid("Unknown service."))?;
    if p.signed_callback {
        // Shopify signs the return with the app's secret: an unsigned or
        // re-pointed answer (another shop) is refused before any code is
        // exchanged.
        let secret = p.client_secret.as_ref().map(|s| s.expose().as_bytes());
        let checked = sidekey_creds::providers::signed_callback::check_shopify(
            query,
            secret.unwrap_or_default(),
            &st.connection,
        );
        if let Err(e) = checked {
            tracing::warn!(provider, user = %st.user, reason = ?e, "callback signature refused");
            return Err(Failure {
                code: "invalid_signature",
                status: StatusCode::BAD_REQUEST,
                title: "This sign-in answer could not be verified",
                detail: format!(
                    "The answer from {display} was not signed as {display} signs it, or named another shop. Nothing was connected. Please start connecting again from {the_app}."
                ),
            });
        }
    }
    let confirm = app.config.connect.confirm;
    if confirm && !can_return {
        // A link made before confirmation was switched on, without a
        // return_to: the code would have nowhere to go.
        return Err(Failure {
            code: "confirm_unavailable",
            status: StatusCode::BAD_REQUEST,
            title: "Connecting did not work",
            detail: format!(
                "This sign-in has no way back to {the_app}, which must confirm new connections. Nothing was connected. Please start connecting again from {the_app}."
            ),
        });
    }
    let mut params = vec![
        ("grant_type", "authorization_code"),
        ("code", code.expose()),
        ("redirect_uri", st.redirect_uri.as_str()),
    ];
    if p.pkce {
        params.push(("code_verifier", st.verifier.expose()));
    }
    let grant = call_token_endpoint(
        &app.client,
        &p,
        &params,
        &st.connection,
        Duration::from_secs(app.config.server.upstream_timeout_secs),
        app.clock.now(),
    )
    .await
    .map_err(|e| {
        tracing::warn!(provider, user = %st.user, error = %e, "authorization code exchange failed");
        let refused = matches!(e, TokenError::Refused(_));
        if let TokenError::Connection(_) = e {
            return Failure {
                code: "bad_connection_value",
                status: StatusCode::BAD_GATEWAY,
                title: "Connecting did not work",
                detail: format!(
                    "{display} answered with account details {the_app} does not accept, so nothing was connected."
                ),
            };
        }
        Failure {
            code: if refused { "exchange_refused" } else { "exchange_failed" },
            status: StatusCode::BAD_GATEWAY,
            title: "Connecting did not work",
            detail: format!(
                "{display} did not accept the sign-in, so nothing was connected. Please try again from {the_app}."
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
        connection: {
            let mut m = st.connection.clone();
            m.extend(grant.connection);
            m
        },
        ..Default::default()
    };
    let store_failed = || Failure {
        code: "store_failed",
        status: StatusCode::INTERNAL_SERVER_ERROR,
        title: "Connecting did not work",
        detail: format!("The connection could not be saved. Please try again from {the_app}."),
    };
    if confirm {
        // Not among the credentials: whatever the user had stays in use.
        return match super::confirm::store_pending(app, &st.user, provider, cred).await {
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

/// `title` and `detail` are HTML (already escaped). Shown only when the
/// browser is not sent back to a `return_to`, so the way back is
/// `[connect] app_url`: a page flow's own `return_to` is the connect link,
/// which another browser must never be handed.
fn page(app: &App, status: StatusCode, title: &str, detail: &str) -> Response<Body> {
    super::message_page(app, status, title, detail, None)
}
