//! Admin `PUT /v1/tenants/{tenant}/credentials/{provider}` with a signing
//! key instead of a token: `{"service_account": {…}}` (a Google key file's
//! JSON) or `{"jwt_key": {"issuer", "private_key_pem", "key_id"}}`. The key
//! is checked as a configured one is (kind, size, algorithm), sealed with
//! the tenant's credential, and shown only as `key_id` and `issuer`.
//! Tokens got with a tenant's previous key carry that key's fingerprint and
//! are not used once it is replaced: the next call exchanges with the new
//! key.

use std::sync::Arc;

use http::{Response, StatusCode};
use serde_json::Value;

use crate::app::App;
use crate::body::{self, Body};
use crate::error::ApiError;
use sidekey_base::secret::Secret;
use sidekey_creds::jwt::SigningKey;
use sidekey_creds::providers::{Grant, Provider};
use sidekey_vault::jwt::JwtKey;
use sidekey_vault::{Credential, Owner};

/// Whether a credential PUT body carries a signing key.
pub(crate) fn is_key_body(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Map<String, Value>>(body)
        .is_ok_and(|m| m.contains_key("service_account") || m.contains_key("jwt_key"))
}

fn bad(m: impl Into<String>) -> ApiError {
    ApiError::BadRequest(m.into())
}

/// A short, printable text field of `jwt_key`.
fn text_field(
    o: &serde_json::Map<String, Value>,
    k: &str,
    required: bool,
) -> Result<Option<String>, ApiError> {
    match o.get(k) {
        None | Some(Value::Null) if !required => Ok(None),
        Some(Value::String(s))
            if (1..=256).contains(&s.chars().count()) && !s.chars().any(char::is_control) =>
        {
            Ok(Some(s.clone()))
        }
        _ => Err(bad(format!(
            "jwt_key.{k} must be {}1-256 characters without control characters.",
            if required { "given: " } else { "" }
        ))),
    }
}

pub(crate) async fn put(
    app: &Arc<App>,
    owner: &Owner,
    p: &Provider,
    body: &[u8],
    now: i64,
) -> Result<Response<Body>, ApiError> {
    let Owner::Tenant(_) = owner else {
        return Err(bad(
            "Signing keys are stored per tenant: PUT /v1/tenants/{tenant}/credentials/{provider}.",
        ));
    };
    let settings = match (&p.jwt, p.grant) {
        (Some(s), Grant::JwtBearer) => s,
        _ => {
            return Err(bad(format!(
                "{} does not use a JWT bearer grant (grant = \"jwt_bearer\"), so it takes no signing key.",
                p.display
            )));
        }
    };
    let map: serde_json::Map<String, Value> = crate::request::json_object(body)?;
    if let Some(k) = map
        .keys()
        .find(|k| !matches!(k.as_str(), "service_account" | "jwt_key"))
    {
        let k: String = k.chars().take(64).collect();
        return Err(bad(format!(
            "The request body is not what this endpoint takes: unknown field {k:?} next to the key."
        )));
    }
    let (kind, key, pem) = match (map.get("service_account"), map.get("jwt_key")) {
        (Some(_), Some(_)) => return Err(bad("Give service_account or jwt_key, not both.")),
        (Some(Value::Object(sa)), None) => {
            // Held as a secret: the text carries the private key.
            let json = Secret::new(Value::Object(sa.clone()).to_string());
            let (key, account) = SigningKey::from_service_account(json.expose(), settings.alg)
                .map_err(|e| bad(format!("service_account {e}.")))?;
            if let (Some(uri), Some(token_url)) = (&account.token_uri, &p.token_url) {
                if uri != token_url.as_str() {
                    return Err(bad(format!(
                        "service_account.token_uri must be {}'s token endpoint, {token_url}.",
                        p.display
                    )));
                }
            }
            ("service_account", key, account.private_key)
        }
        (Some(_), None) => return Err(bad("service_account must be the key file's JSON object.")),
        (None, Some(Value::Object(k))) => {
            if let Some(f) = k
                .keys()
                .find(|f| !matches!(f.as_str(), "issuer" | "private_key_pem" | "key_id"))
            {
                let f: String = f.chars().take(64).collect();
                return Err(bad(format!("jwt_key has an unknown field {f:?}.")));
            }
            let issuer = text_field(k, "issuer", true)?;
            let key_id = text_field(k, "key_id", false)?;
            let Some(Value::String(pem)) = k.get("private_key_pem") else {
                return Err(bad(
                    "jwt_key.private_key_pem must be the PEM text of a private key.",
                ));
            };
            let key = SigningKey::from_pem(pem, settings.alg, key_id, issuer)
                .map_err(|e| bad(format!("jwt_key.private_key_pem {e}.")))?;
            ("jwt_key", key, Secret::new(pem.as_str()))
        }
        (None, Some(_)) => {
            return Err(bad(
                "jwt_key must be an object: {\"issuer\", \"private_key_pem\", \"key_id\"}.",
            ));
        }
        (None, None) => unreachable!("is_key_body checked"),
    };
    let mut cred = Credential {
        updated_at: now,
        jwt_key: Some(JwtKey {
            kind: kind.into(),
            issuer: key.issuer.clone().unwrap_or_default(),
            private_key_pem: pem,
            key_id: key.key_id.clone(),
            fingerprint: key.fingerprint.clone(),
        }),
        ..Default::default()
    };
    app.store
        .put_credential(owner, &p.name, &mut cred)
        .await
        .map_err(ApiError::from)?;
    app.store.flush().await.map_err(ApiError::from)?;
    app.refresher.reset(owner, &p.name).await;
    tracing::info!(owner = %owner.describe(), provider = %p.name, key_id = ?key.key_id, "tenant signing key stored");
    Ok(body::json(
        StatusCode::OK,
        &crate::views::credential_metadata(owner, &p.name, &cred, now),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_bodies_are_told_apart_from_tokens() {
        assert!(is_key_body(br#"{"service_account": {}}"#));
        assert!(is_key_body(br#"{"jwt_key": {"issuer": "x"}}"#));
        assert!(!is_key_body(br#"{"access_token": "at"}"#));
        assert!(!is_key_body(b"not json"));
    }
}
