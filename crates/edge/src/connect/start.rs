//! `POST /v1/users/{user}/oauth/{provider}/start`: the admin API's way into
//! a flow, for an app that redirects its user at once. It answers the bare
//! `authorize_url` and a `connect_url` whose first open binds the browser
//! (a connect link made for this one flow).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::App;
use crate::error::ApiError;
use crate::oauth::{begin, check_return_to_for};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StartBody {
    #[serde(default)]
    return_to: Option<String>,
    /// Overrides the provider's configured scopes for this authorization.
    #[serde(default)]
    scopes: Option<Vec<String>>,
    /// Per-connection values (`from = "user"`), e.g. `{"subdomain": "acme"}`.
    #[serde(default)]
    connection: std::collections::BTreeMap<String, String>,
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
        .ok_or_else(|| app.unknown_provider(provider))?
        .clone();
    let b: StartBody = if body.iter().all(u8::is_ascii_whitespace) {
        StartBody::default()
    } else {
        crate::request::json_object(body)?
    };
    check_return_to_for(app, b.return_to.as_deref())?;
    let link = super::new_ticket(app);
    let flow = begin(
        app,
        user,
        &p,
        b.return_to.clone(),
        b.scopes,
        Some(link.id.clone()),
        b.connection,
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
                connection: Default::default(),
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
