//! One call to a provider's token endpoint: the request (form or JSON
//! body, client authentication in the body or as HTTP Basic), and its
//! answer read into a [`TokenGrant`] or a [`TokenError`].

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::Value;
use zeroize::Zeroizing;

use super::{TokenError, TokenGrant};
use crate::client::HttpClient;
use crate::providers::{ClientAuth, ConnectionFrom, Provider, TokenFormat};
use sidekey_base::errors::error_chain;
use sidekey_base::secret::{Secret, scrub};

/// Calls a provider's token endpoint with `params` (plus client auth).
/// `now` (unix seconds) turns a relative `expires_in` into `expires_at`.
/// `connection`: the credential's (or flow's) per-connection values, for
/// a token URL with placeholders.
pub async fn call_token_endpoint(
    client: &HttpClient,
    provider: &Provider,
    params: &[(&str, &str)],
    connection: &BTreeMap<String, String>,
    timeout: Duration,
    now: i64,
) -> Result<TokenGrant, TokenError> {
    let url = provider
        .token_url_for(connection)?
        .ok_or_else(|| TokenError::Transient("provider has no token_url".into()))?;
    let req = token_request(provider, &url, params, now)?;
    let secret = provider.client_secret.as_ref();
    let secrets: Vec<&Secret> = secret.into_iter().collect();
    let resp = match tokio::time::timeout(timeout, client.request(req)).await {
        Err(_) => return Err(TokenError::Transient("timed out".into())),
        Ok(Err(e)) => {
            return Err(TokenError::Transient(scrub(&error_chain(&e), &secrets)));
        }
        Ok(Ok(r)) => r,
    };
    let status = resp.status();
    let is_form = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let collected =
        tokio::time::timeout(timeout, Limited::new(resp.into_body(), 1 << 20).collect()).await;
    let bytes = match collected {
        Err(_) => return Err(TokenError::Transient("timed out reading the answer".into())),
        Ok(Err(_)) => {
            return Err(TokenError::Transient(
                "answer unreadable or over 1 MiB".into(),
            ));
        }
        Ok(Ok(c)) => Zeroizing::new(c.to_bytes().to_vec()),
    };
    let json: Value = if is_form {
        let map: serde_json::Map<String, Value> = url::form_urlencoded::parse(&bytes)
            .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
            .collect();
        Value::Object(map)
    } else {
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    };
    let error = json
        .get("error")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| {
            // Slack: 200 {"ok": false, "error": "..."}
            (json.get("ok") == Some(&Value::Bool(false))).then(|| "unknown_error".to_owned())
        });
    if status.is_server_error() {
        return Err(TokenError::Transient(format!("HTTP {}", status.as_u16())));
    }
    if let Some(err) = error {
        let err = sanitize_code(&err);
        if provider.conventions.reauth_errors.contains(&err) {
            return Err(TokenError::Refused(err));
        }
        if matches!(
            err.as_str(),
            "invalid_client" | "unauthorized_client" | "bad_client_secret" | "invalid_client_id"
        ) {
            return Err(TokenError::BadClient(err));
        }
        return Err(TokenError::Transient(format!(
            "HTTP {} error {err}",
            status.as_u16()
        )));
    }
    if !status.is_success() {
        return Err(TokenError::Transient(format!("HTTP {}", status.as_u16())));
    }
    parse_grant(&json, provider, now)
}

/// The token request: form body plus client authentication. Built in a
/// plain function so nothing here is held across an await.
fn token_request(
    provider: &Provider,
    url: &url::Url,
    params: &[(&str, &str)],
    now: i64,
) -> Result<Request<Full<Bytes>>, TokenError> {
    let client_id = provider.client_id.as_deref().unwrap_or("");
    let secret = provider.client_secret.as_ref();
    let mut form = TokenBody::new(provider.token_format);
    for (k, v) in params {
        form.append_pair(k, v);
    }
    for (k, v) in &provider.token_params {
        form.append_pair(k, v);
    }
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(url.as_str())
        .header(header::CONTENT_TYPE, form.content_type())
        .header(header::ACCEPT, "application/json")
        .header(
            header::USER_AGENT,
            concat!("sidekey/", env!("CARGO_PKG_VERSION")),
        );
    match provider.client_auth {
        ClientAuth::Body => {
            if !client_id.is_empty() {
                form.append_pair("client_id", client_id);
            }
            if let Some(s) = secret {
                form.append_pair("client_secret", s.expose());
            }
        }
        ClientAuth::Basic => {
            use base64::Engine;
            // RFC 6749 §2.3.1: form-encode each part before joining, but
            // with a space as %20, not `+`: servers that decode with plain
            // percent-decoding (Authlib's `unquote`) read `+` as a plus,
            // while every form decoder also reads %20 as a space.
            let enc =
                |s: &str| percent_encoding::utf8_percent_encode(s, BASIC_CREDENTIAL).to_string();
            let raw = Zeroizing::new(format!(
                "{}:{}",
                enc(client_id),
                enc(secret.map(|s| s.expose()).unwrap_or(""))
            ));
            let b64 =
                Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(raw.as_bytes()));
            let mut v =
                http::HeaderValue::try_from(format!("Basic {}", b64.as_str())).map_err(|_| {
                    TokenError::BadClient("client id or secret not valid in a header".into())
                })?;
            v.set_sensitive(true);
            req = req.header(header::AUTHORIZATION, v);
        }
        ClientAuth::PrivateKeyJwt => {
            // RFC 7523 §2.2: a fresh assertion (new jti) on every request;
            // the client secret, if configured at all, never travels.
            let key = provider
                .jwt
                .as_ref()
                .and_then(|j| j.key.as_ref())
                .ok_or_else(|| TokenError::BadClient("no jwt_key_file to sign with".into()))?;
            let assertion =
                crate::jwt::assertion::client_assertion(key, client_id, url.as_str(), now)
                    .map_err(|e| TokenError::BadClient(e.to_string()))?;
            form.append_pair("client_id", client_id);
            form.append_pair(
                "client_assertion_type",
                crate::jwt::assertion::CLIENT_ASSERTION_TYPE,
            );
            form.append_pair("client_assertion", assertion.expose());
        }
    }
    let body = Zeroizing::new(form.finish());
    req.body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .map_err(|_| TokenError::Transient("cannot build token request".into()))
}

/// A token request's body, as a form or (Notion) a JSON object.
enum TokenBody {
    Form(url::form_urlencoded::Serializer<'static, String>),
    Json(serde_json::Map<String, Value>),
}

impl TokenBody {
    fn new(format: TokenFormat) -> Self {
        match format {
            TokenFormat::Form => {
                TokenBody::Form(url::form_urlencoded::Serializer::new(String::new()))
            }
            TokenFormat::Json => TokenBody::Json(serde_json::Map::new()),
        }
    }

    fn append_pair(&mut self, k: &str, v: &str) {
        match self {
            TokenBody::Form(f) => {
                f.append_pair(k, v);
            }
            TokenBody::Json(m) => {
                m.insert(k.to_owned(), Value::String(v.to_owned()));
            }
        }
    }

    fn content_type(&self) -> &'static str {
        match self {
            TokenBody::Form(_) => "application/x-www-form-urlencoded",
            TokenBody::Json(_) => "application/json",
        }
    }

    fn finish(&mut self) -> String {
        match self {
            TokenBody::Form(f) => f.finish(),
            TokenBody::Json(m) => Value::Object(std::mem::take(m)).to_string(),
        }
    }
}

/// What `application/x-www-form-urlencoded` leaves as is (`*-._` and
/// alphanumerics); everything else, space included, becomes `%XX`.
const BASIC_CREDENTIAL: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'*')
    .remove(b'-')
    .remove(b'.')
    .remove(b'_');

/// Error codes are quoted in logs; keep them to a harmless alphabet.
pub(super) fn sanitize_code(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-' || *c == '.')
        .take(64)
        .collect()
}

pub(super) fn parse_grant(
    json: &Value,
    provider: &Provider,
    now: i64,
) -> Result<TokenGrant, TokenError> {
    // Slack puts a user token under `authed_user`; use it when the app asked
    // only for user scopes, or when there is no top-level token.
    let nested = json
        .get("authed_user")
        .filter(|v| v.get("access_token").is_some());
    let src = match nested {
        Some(n)
            if provider.conventions.nested_user_token
                && (json.get("access_token").is_none()
                    || (provider.scopes.is_empty() && !provider.user_scopes.is_empty())) =>
        {
            n
        }
        _ => json,
    };
    let obj = src
        .as_object()
        .ok_or_else(|| TokenError::Transient("answer is not a JSON object".into()))?;
    let r = crate::token_response::parse(obj, now).map_err(|e| match e {
        // The provider issued a token sidekey cannot use: retrying will not
        // help, and the operator must hear why.
        e @ crate::token_response::TokenResponseError::UnsupportedTokenType(_) => {
            TokenError::Unusable(e.to_string())
        }
        e => TokenError::Transient(format!("unreadable answer: {e}")),
    })?;
    let access = r
        .access_token
        .ok_or_else(|| TokenError::Transient("answer has no access_token".into()))?;
    // `from = "token"` values: top-level strings of the whole answer.
    let mut connection = BTreeMap::new();
    for f in provider
        .connection
        .iter()
        .filter(|f| f.from == ConnectionFrom::Token)
    {
        if let Some(v) = json.get(&f.name).and_then(Value::as_str) {
            connection.insert(f.name.clone(), v.to_owned());
        }
    }
    provider.check_connection(&connection)?;
    Ok(TokenGrant {
        access_token: access,
        refresh_token: r.refresh_token,
        expires_at: r.expires_at,
        scopes: r.scopes,
        connection,
    })
}
