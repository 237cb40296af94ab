//! The refresh tool: an agent asks mid-conversation for the session's
//! credentials (or one provider's) to be refreshed now, and hears per
//! provider how it went.

use std::sync::Arc;
use std::time::Instant;

use http::request::Parts;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::{
    Trace, authenticate, credential_provider, finish, owner_with_credential, read_body,
    select_provider,
};
use crate::app::App;
use crate::body::{self, Body};
use crate::error::ApiError;
use sidekey_creds::refresh::Forced;

/// `POST /v1/session/refresh`: the mid-conversation refresh tool.
pub async fn refresh_tool(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let mut t = Trace {
        path: "/v1/session/refresh".into(),
        route: "/v1/session/refresh",
        ..Default::default()
    };
    let result = refresh_providers(app, &parts, body, &mut t).await;
    finish(app, &parts.method, started, t, result)
}

async fn refresh_providers(
    app: &Arc<App>,
    parts: &Parts,
    body: Incoming,
    t: &mut Trace,
) -> Result<Response<Body>, ApiError> {
    let session = authenticate(app, &parts.headers, t).await?;
    let raw = read_body(app, &parts.headers, body).await?;
    #[derive(serde::Deserialize, Default)]
    struct RefreshBody {
        #[serde(default)]
        provider: Option<String>,
    }
    let req: RefreshBody = if raw.iter().all(u8::is_ascii_whitespace) {
        RefreshBody::default()
    } else {
        crate::request::json_object(&raw)?
    };
    let names: Vec<String> = match req.provider.filter(|p| !p.is_empty()) {
        Some(p) => {
            select_provider(app, &session, &p, t)?;
            vec![p]
        }
        None => session
            .providers()
            .iter()
            .filter(|p| app.providers.get(p).is_some())
            .cloned()
            .collect(),
    };
    let mut out = serde_json::Map::new();
    for name in names {
        let provider = app.providers.get(&name).expect("filtered above").clone();
        let cp = credential_provider(app, &provider)?;
        let result = if cp.grant == sidekey_creds::providers::Grant::JwtBearer {
            crate::jwt::force(app, &cp, session.user()).await.map(Some)
        } else {
            let owner = owner_with_credential(app, &cp, session.user()).await?;
            match &owner {
                Some(o) => app.refresher.force(&cp, o).await,
                None => Ok(None),
            }
            .map_err(ApiError::from)
        };
        let entry = match result {
            Ok(Some(Forced::Refreshed(c))) => {
                json!({"status": "refreshed", "expires_at": c.expires_at})
            }
            Ok(Some(Forced::Active(c))) => json!({"status": "active", "expires_at": c.expires_at}),
            Ok(None) => {
                let e = ApiError::CredentialMissing(provider.label());
                json!({"status": "credential_missing", "message": e.message()})
            }
            Err(e @ ApiError::ReauthRequired(_)) => {
                json!({"status": "reauth_required", "message": e.message()})
            }
            // Without a client id no retry can succeed: say so rather than
            // "try again in a moment", and tell the operator in the log.
            Err(ApiError::RefreshFailed(_)) if provider.client_id.is_none() => {
                tracing::warn!(
                    provider = %provider.name,
                    "refresh tool: {}",
                    crate::oauth::client_id_missing(app, &provider)
                );
                json!({"status": "refresh_failed", "message": format!(
                    "I can't renew access to your {} account because sidekey isn't set up for {} yet; please let the app's support team know.",
                    provider.display, provider.display
                )})
            }
            Err(e @ ApiError::RefreshFailed(_)) => {
                json!({"status": "refresh_failed", "message": e.message()})
            }
            Err(e @ (ApiError::GrantRefused(..) | ApiError::SubjectNotAllowed(..))) => {
                json!({"status": e.code(), "message": e.message()})
            }
            Err(e @ ApiError::CredentialMissing(_)) => {
                json!({"status": "credential_missing", "message": e.message()})
            }
            Err(e) => return Err(e),
        };
        out.insert(name, entry);
    }
    Ok(body::json(
        StatusCode::OK,
        &json!({"status": "ok", "providers": Value::Object(out)}),
    ))
}
