//! Admin `POST /v1/users/{user}/connect`: the main app asks for a link to
//! send its user's browser to.

use std::sync::Arc;

use http::{Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::{DEFAULT_TTL_SECS, MAX_TTL_SECS, MIN_TTL_SECS, new_ticket};
use crate::app::App;
use crate::body::{self, Body};
use crate::error::ApiError;
use sidekey_vault::ConnectTicket;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LinkBody {
    #[serde(default)]
    providers: Option<Vec<String>>,
    #[serde(default)]
    return_to: Option<String>,
    #[serde(default)]
    ttl_secs: Option<u64>,
    #[serde(default)]
    user_label: Option<String>,
    /// Per-connection values (`from = "user"`), e.g. `{"subdomain": "acme"}`.
    #[serde(default)]
    connection: std::collections::BTreeMap<String, String>,
}

/// The values of `all` that provider `p` declares.
pub(crate) fn connection_for(
    p: &sidekey_creds::providers::Provider,
    all: &std::collections::BTreeMap<String, String>,
) -> std::collections::BTreeMap<String, String> {
    all.iter()
        .filter(|(k, _)| p.connection_field(k).is_some())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The names of `p`'s `from = "user"` fields that `given` lacks: what the
/// connect page asks the user for, and must have before it redirects.
pub(crate) fn asked_of_user(
    p: &sidekey_creds::providers::Provider,
    given: &std::collections::BTreeMap<String, String>,
) -> Vec<String> {
    p.connection
        .iter()
        .filter(|f| f.from == sidekey_creds::providers::ConnectionFrom::User)
        .filter(|f| !given.contains_key(&f.name))
        .map(|f| f.name.clone())
        .collect()
}

/// Admin `POST /v1/users/{user}/connect` → 201 `{connect_url, expires_at}`.
pub async fn create_link(
    app: &Arc<App>,
    user: &str,
    body: &[u8],
) -> Result<Response<Body>, ApiError> {
    let b: LinkBody = if body.iter().all(u8::is_ascii_whitespace) {
        LinkBody::default()
    } else {
        crate::request::json_object(body)?
    };
    let providers = match b.providers {
        None => {
            let all: Vec<String> = app
                .providers
                .iter()
                .filter(|p| p.oauth_capable())
                .map(|p| p.name.clone())
                .collect();
            if all.is_empty() {
                return Err(ApiError::BadRequest(
                    "No provider can be connected through OAuth: configure authorize_url, token_url and client_id for one.".into(),
                ));
            }
            all
        }
        Some(list) => {
            if list.is_empty() {
                return Err(ApiError::BadRequest(
                    "providers must list at least one provider (or be left out for all).".into(),
                ));
            }
            let mut uniq: Vec<String> = Vec::new();
            for name in list {
                let p = app
                    .providers
                    .get(&name)
                    .ok_or_else(|| ApiError::UnknownProvider(app.providers.label(&name)))?;
                if !p.oauth_capable() {
                    return Err(ApiError::BadRequest(format!(
                        "{} cannot be connected through OAuth (it needs authorize_url, token_url and client_id).",
                        p.display
                    )));
                }
                if !uniq.contains(&name) {
                    uniq.push(name);
                }
            }
            uniq
        }
    };
    // Each value must be a field of some listed provider, and acceptable
    // to every listed provider that declares it.
    for k in b.connection.keys() {
        if !providers
            .iter()
            .filter_map(|n| app.providers.get(n))
            .any(|p| p.connection_field(k).is_some())
        {
            let first = app.providers.get(&providers[0]).cloned();
            return Err(match first {
                Some(p) => ApiError::connection(
                    &p,
                    sidekey_creds::providers::ConnectionError::Unknown(k.clone()),
                ),
                None => ApiError::BadRequest("unknown connection field".into()),
            });
        }
    }
    for p in providers.iter().filter_map(|n| app.providers.get(n)) {
        p.check_connection(&connection_for(p, &b.connection))
            .map_err(|e| ApiError::connection(p, e))?;
    }
    crate::oauth::check_return_to_for(app, b.return_to.as_deref())?;
    let ttl = b.ttl_secs.unwrap_or(DEFAULT_TTL_SECS);
    if !(MIN_TTL_SECS..=MAX_TTL_SECS).contains(&ttl) {
        return Err(ApiError::BadRequest(format!(
            "ttl_secs must be between {MIN_TTL_SECS} and {MAX_TTL_SECS}."
        )));
    }
    if let Some(l) = &b.user_label {
        if !sidekey_base::config::page_text_ok(l, 200) {
            return Err(ApiError::BadRequest(
                "user_label must be 1-200 characters without control characters.".into(),
            ));
        }
    }
    let now = app.clock.now();
    let expires_at = now + ttl as i64;
    let link = new_ticket(app);
    app.store
        .put_connect_ticket(
            &link.id,
            &ConnectTicket {
                user: user.to_owned(),
                providers: providers.clone(),
                return_to: b.return_to,
                user_label: b.user_label,
                created_at: now,
                expires_at,
                browser: None,
                authorize_url: None,
                connection: b.connection,
            },
        )
        .await
        .map_err(ApiError::from)?;
    app.store.flush().await.map_err(ApiError::from)?;
    Ok(body::json(
        StatusCode::CREATED,
        &json!({
            "connect_url": link.url,
            "expires_at": expires_at,
            "providers": providers,
        }),
    ))
}
