//! The OAuth authorization-code flow with PKCE (S256): the state, the
//! verifier and the authorize URL (`begin`), and the checks every start
//! shares. Where a flow starts (the connect page, the admin API's
//! `oauth/start`) and how its callback completes live in [`crate::connect`],
//! which binds each flow to the browser that began it.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::app::App;
use crate::error::ApiError;
use sidekey_base::secret::Secret;
use sidekey_creds::providers::Provider;
use sidekey_vault::OAuthState;

/// How long an authorize URL stays usable.
pub const STATE_TTL_SECS: i64 = 600;

use crate::random::b64url;
pub use crate::random::random_b64;

/// RFC 7636: `BASE64URL(SHA256(verifier))`.
pub fn pkce_challenge(verifier: &str) -> String {
    b64url(&Sha256::digest(verifier.as_bytes()))
}

pub fn redirect_uri(app: &App, provider: &str) -> String {
    format!("{}/oauth/{provider}/callback", app.config.server.public_url)
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
    connection: std::collections::BTreeMap<String, String>,
) -> Result<Flow, ApiError> {
    let (Some(_), Some(_)) = (&p.authorize_url, &p.token_url) else {
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
    p.check_connection(&connection)
        .map_err(|e| ApiError::connection(p, e))?;
    let needs = |f: String| {
        ApiError::BadRequest(format!(
            "{} needs connection.{f} to be connected (give \"connection\": {{\"{f}\": \"...\"}}).",
            p.display
        ))
    };
    let endpoint = |r: Result<Option<url::Url>, sidekey_creds::providers::ConnectionError>| match r
    {
        Ok(u) => Ok(u),
        Err(sidekey_creds::providers::ConnectionError::Missing(f)) => Err(needs(f)),
        Err(e) => Err(ApiError::connection(p, e)),
    };
    endpoint(p.token_url_for(&connection))?;
    let Some(authorize) = endpoint(p.authorize_url_for(&connection))? else {
        return Err(ApiError::Internal);
    };
    let state = random_b64(32);
    let verifier = Secret::new(random_b64(32));
    let challenge = pkce_challenge(verifier.expose());
    let redirect = redirect_uri(app, &p.name);
    let scopes = scopes.unwrap_or_else(|| p.scopes.clone());

    let mut url = authorize;
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
        q.append_pair("state", &state);
        if p.pkce {
            q.append_pair("code_challenge", &challenge)
                .append_pair("code_challenge_method", "S256");
        }
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
                connection,
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
