//! The app's confirmation of a new connection (`[connect] confirm = true`).
//!
//! A connect link can be handed on before anyone opens it: whoever claims
//! it connects *their* account, and it would be stored under the link's
//! user. The app is the one party that knows who is logged in, so with
//! `confirm` on, the OAuth callback does not store the credential: it keeps
//! it pending under a one-time code and sends the browser to
//! `return_to?connect_code=<code>`. The app calls admin
//! `POST /v1/users/{user}/connect/confirm {"code"}` for the user it has
//! logged in; only a code made for that user makes the credential active.
//! Any confirm spends the code, so a wrong-user attempt cannot be retried
//! for the right one.
//!
//! The code is a bearer secret: 256 random bits, stored only as a keyed
//! hash ([`sidekey_vault::Store::connect_code_id`]), the pending record
//! sealed like every other. Until confirmed, nothing reads it: the proxy,
//! the credential routes and the connect page see the credential the user
//! had before (or none).

use std::sync::Arc;

use http::{Response, StatusCode};
use serde::Deserialize;

use crate::app::App;
use crate::body::{self, Body};
use crate::error::ApiError;
use crate::oauth::random_b64;
use sidekey_vault::{Credential, Owner, PendingCredential, StoreError};

/// How long the app has to confirm a connection.
pub const CODE_TTL_SECS: i64 = 600;

/// Keeps `cred` pending for `user`; answers the one-time code. Durable
/// before it returns.
pub async fn store_pending(
    app: &App,
    user: &str,
    provider: &str,
    credential: Credential,
) -> Result<String, StoreError> {
    let code = random_b64(32);
    let now = app.clock.now();
    app.store
        .put_pending_credential(
            &app.store.connect_code_id(&code),
            &PendingCredential {
                user: user.to_owned(),
                provider: provider.to_owned(),
                credential,
                created_at: now,
                expires_at: now.saturating_add(CODE_TTL_SECS),
            },
        )
        .await?;
    app.store.flush().await?;
    Ok(code)
}

/// `return_to` with `connect_code=<code>` added to its query.
pub fn with_code(return_to: &str, code: &str) -> String {
    match url::Url::parse(return_to) {
        Ok(mut u) => {
            u.query_pairs_mut().append_pair("connect_code", code);
            u.into()
        }
        // Checked when the link was made; kept whole all the same.
        Err(_) => {
            let sep = if return_to.contains('?') { '&' } else { '?' };
            format!("{return_to}{sep}connect_code={code}")
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfirmBody {
    code: String,
}

/// Admin `POST /v1/users/{user}/connect/confirm` → 200 with the
/// credential's metadata, or 404 for an unknown, spent, expired or
/// another user's code (one answer for all four: the app learns nothing
/// about codes that are not its user's).
pub async fn confirm(app: &Arc<App>, user: &str, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let b: ConfirmBody = crate::request::json_object(body)?;
    if b.code.is_empty() || b.code.len() > 256 {
        return Err(ApiError::BadRequest(
            "code must be the connect_code sidekey added to return_to.".into(),
        ));
    }
    let not_found = || {
        ApiError::NotFound(format!(
            "No connection waits for user {user} with this code: it is unknown, already used, made for another user, or older than {} minutes.",
            CODE_TTL_SECS / 60
        ))
    };
    let taken = app
        .store
        .take_pending_credential(&app.store.connect_code_id(&b.code))
        .await
        .map_err(ApiError::from)?;
    let Some(p) = taken else {
        return Err(not_found());
    };
    // The code is spent whatever follows, and stays spent after a restart.
    app.store.flush().await.map_err(ApiError::from)?;
    let now = app.clock.now();
    if p.user != user {
        tracing::warn!(
            user,
            provider = %p.provider,
            "connect confirm for another user's code refused; the code is spent"
        );
        return Err(not_found());
    }
    if p.expires_at <= now || app.providers.get(&p.provider).is_none() {
        return Err(not_found());
    }
    let owner = Owner::User(p.user.clone());
    let mut cred = p.credential;
    cred.updated_at = now;
    app.store
        .put_credential(&owner, &p.provider, &mut cred)
        .await
        .map_err(ApiError::from)?;
    app.store.flush().await.map_err(ApiError::from)?;
    app.refresher.reset(&owner, &p.provider).await;
    tracing::info!(provider = %p.provider, user, "connection confirmed by the app");
    Ok(body::json(
        StatusCode::OK,
        &crate::views::credential_metadata(&owner, &p.provider, &cred, now),
    ))
}
