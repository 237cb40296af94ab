//! A resolved provider as JSON, for `sidekey providers`: what sidekey
//! will do with it, never a secret (no client secret, no client id's
//! source contents beyond whether one is set).

use serde_json::{Value, json};

use super::{ClientAuth, Injection, Provider, TokenFormat};

impl Provider {
    pub fn describe(&self) -> Value {
        let template = |t: &Option<super::UrlTemplate>, u: Option<&url::Url>| match t {
            Some(t) => Some(t.text.clone()),
            None => u.map(|u| u.to_string()),
        };
        let inject = match &self.inject {
            Injection::Bearer => json!({"kind": "bearer"}),
            Injection::Basic => json!({"kind": "basic"}),
            Injection::Header { name, template } => {
                json!({"kind": "header", "header": name.as_str(), "value": template})
            }
            Injection::Query { param } => json!({"kind": "query", "param": param}),
            Injection::PathPrefix { template } => {
                json!({"kind": "path_prefix", "path_prefix": template})
            }
        };
        let connection: serde_json::Map<String, Value> = self
            .connection
            .iter()
            .map(|f| {
                (
                    f.name.clone(),
                    json!({"from": f.from.as_str(), "pattern": f.pattern}),
                )
            })
            .collect();
        json!({
            "name": self.name,
            "display_name": self.display,
            "preset": self.preset,
            "base_url": template(&self.templates.base_url, Some(&self.base.url)),
            "token_url": template(&self.templates.token_url, self.token_url.as_ref()),
            "authorize_url": template(&self.templates.authorize_url, self.authorize_url.as_ref()),
            "inject": inject,
            "scope_separator": self.scope_separator,
            "scopes": self.scopes,
            "client_auth": match self.client_auth {
                ClientAuth::Body => "body",
                ClientAuth::Basic => "basic",
                ClientAuth::PrivateKeyJwt => "private_key_jwt",
            },
            "client_id_set": self.client_id.is_some(),
            "client_secret_set": self.client_secret.is_some(),
            "token_format": match self.token_format {
                TokenFormat::Form => "form",
                TokenFormat::Json => "json",
            },
            "pkce": self.pkce,
            "authorize_params": self.authorize_params.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "token_params": self.token_params.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "headers": self.headers.iter().map(|(n, v)| (n.as_str().to_owned(), Value::String(v.to_str().unwrap_or("").to_owned()))).collect::<serde_json::Map<_, _>>(),
            "rotates_refresh_token": self.rotates_refresh_token,
            "signed_callback": self.signed_callback,
            "refresh": self.can_refresh(),
            "grant": match self.grant {
                super::Grant::AuthorizationCode => "authorization_code",
                super::Grant::ClientCredentials => "client_credentials",
                super::Grant::JwtBearer => "jwt_bearer",
            },
            // Never the key: its algorithm, id, issuer and the subject rule.
            "jwt": self.jwt.as_ref().map(|j| json!({
                "alg": j.alg.name(),
                "key_id": j.key.as_ref().and_then(|k| k.key_id.clone()),
                "issuer": j.key.as_ref().and_then(|k| k.issuer.clone()),
                "audience": j.audience,
                "scope_claim": j.scope_claim,
                "subject": match j.subject {
                    crate::jwt::SubjectTemplate::Email => "{email}",
                    crate::jwt::SubjectTemplate::User => "{user}",
                },
                "subject_domains": j.domains,
            })),
            "allow": self.allow_patterns,
            "credential_from": self.credential_from,
            "connection": connection,
            "reauth_errors": self.conventions.reauth_errors,
            "ok_false_auth_errors": self.conventions.ok_false_auth_errors,
        })
    }
}
