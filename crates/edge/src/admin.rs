//! The admin API (main app → sidekey): credentials, users, tenants,
//! sessions, OAuth start, audit, metrics and tool definitions.
//!
//! Every route but health needs `Authorization: Bearer <admin token>`.
//! Every write is flushed to disk before it is acknowledged.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use percent_encoding::percent_decode_str;
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::app::{App, sha256};
use crate::body::{self, Body};
use crate::error::ApiError;
use sidekey_base::config::valid_id;
use sidekey_base::secret::Secret;
use sidekey_vault::{AuditRecord, Credential, Owner, PutUserError, UserProfile};

const MAX_ADMIN_BODY: usize = 1 << 20;

/// The OpenAPI 3.1 description of both listeners, served as committed
/// (tests/openapi.rs checks it against the running server).
pub const OPENAPI_JSON: &str = include_str!("../../../docs/openapi.json");

pub async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    if !authorized(app, req.headers()) {
        return ApiError::Unauthorized.into_response();
    }
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    // The body read consumes the request; `/metrics` negotiates on Accept.
    let headers = req.headers().clone();
    let bytes = match read_body(req).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let segs: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let result = dispatch(app, &method, &segs, query.as_deref(), &headers, &bytes).await;
    let resp = match result {
        Ok(r) => r,
        Err(e @ ApiError::MethodNotAllowed) => {
            let mut r = e.into_response();
            if let Some(allow) = allowed(&segs) {
                r.headers_mut()
                    .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
            }
            r
        }
        Err(e) => e.into_response(),
    };
    if method != Method::GET && method != Method::HEAD {
        audit_write(app, &method, &path, &segs, resp.status().as_u16(), started);
    }
    resp
}

/// The methods an admin path answers: a 405 names them in `Allow`
/// (RFC 9110 section 15.5.6), so a client sees what it should have sent.
fn allowed(segs: &[&str]) -> Option<&'static str> {
    Some(match segs {
        ["metrics"]
        | ["v1", "openapi.json"]
        | ["v1", "audit"]
        | ["v1", "elevenlabs", "tools"]
        | ["v1", "vapi", "tools"]
        | ["v1", "retell", "tools"]
        | ["v1", "users"]
        | ["v1", "users", _, "credentials"]
        | ["v1", "tenants", _, "credentials"] => "GET",
        ["v1", "users", _, "oauth", _, "start"]
        | ["v1", "users", _, "connect"]
        | ["v1", "users", _, "connect", "confirm"]
        | ["v1", "sessions"]
        | ["v1", "admin", "backup"] => "POST",
        ["v1", "users", _]
        | ["v1", "users", _, "credentials", _]
        | ["v1", "tenants", _, "credentials", _] => "GET, PUT, DELETE",
        ["v1", "sessions", _] => "GET, DELETE",
        _ => return None,
    })
}

fn authorized(app: &App, headers: &http::HeaderMap) -> bool {
    let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, token)) = v.trim().split_once(' ') else {
        return false;
    };
    // Comparing digests keeps the comparison constant-time in the length too.
    scheme.eq_ignore_ascii_case("bearer")
        && bool::from(sha256(token.trim().as_bytes()).ct_eq(&app.admin_token_hash))
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let (parts, body) = req.into_parts();
    crate::request::read_limited(
        &parts.headers,
        body,
        MAX_ADMIN_BODY as u64,
        std::time::Duration::from_secs(60),
    )
    .await
}

fn id<'a>(s: &'a str, what: &str) -> Result<&'a str, ApiError> {
    if valid_id(s) {
        Ok(s)
    } else {
        Err(ApiError::BadRequest(format!(
            "The {what} must be 1-128 characters of A-Z, a-z, 0-9 and . _ @ : + -"
        )))
    }
}

async fn dispatch(
    app: &Arc<App>,
    method: &Method,
    segs: &[&str],
    query: Option<&str>,
    headers: &http::HeaderMap,
    body: &[u8],
) -> Result<Response<Body>, ApiError> {
    use Method as M;
    match (method, segs) {
        (&M::GET, ["metrics"]) => Ok(metrics(app, headers).await),
        (&M::GET, ["v1", "openapi.json"]) => Ok(body::text(
            StatusCode::OK,
            "application/json",
            OPENAPI_JSON.to_owned(),
        )),
        (&M::GET, ["v1", "audit"]) => audit(app, query).await,
        (&M::GET, ["v1", "elevenlabs", "tools"]) => Ok(body::json(
            StatusCode::OK,
            &Value::Array(crate::elevenlabs::tools(
                &app.config,
                &app.providers,
                &app.tools,
            )),
        )),
        (&M::GET, ["v1", "vapi", "tools"]) => Ok(body::json(
            StatusCode::OK,
            &Value::Array(crate::vapi::tools(&app.config, &app.tools)),
        )),
        (&M::GET, ["v1", "retell", "tools"]) => Ok(body::json(
            StatusCode::OK,
            &Value::Array(crate::retell::tools(&app.config, &app.tools)),
        )),
        (_, ["v1", "users", user, "credentials", provider]) => {
            let owner = Owner::User(id(user, "user id")?.to_owned());
            credential_route(app, method, owner, provider, body).await
        }
        (&M::GET, ["v1", "users", user, "credentials"]) => {
            list_credentials(app, Owner::User(id(user, "user id")?.to_owned())).await
        }
        (_, ["v1", "tenants", tenant, "credentials", provider]) => {
            let owner = Owner::Tenant(id(tenant, "tenant id")?.to_owned());
            credential_route(app, method, owner, provider, body).await
        }
        (&M::GET, ["v1", "tenants", tenant, "credentials"]) => {
            list_credentials(app, Owner::Tenant(id(tenant, "tenant id")?.to_owned())).await
        }
        (&M::POST, ["v1", "users", user, "oauth", provider, "start"]) => {
            let user = id(user, "user id")?;
            let provider = id(provider, "provider name")?;
            let v = crate::connect::start::start(app, user, provider, body).await?;
            Ok(body::json(StatusCode::OK, &v))
        }
        (&M::POST, ["v1", "users", user, "connect"]) => {
            crate::connect::create_link(app, id(user, "user id")?, body).await
        }
        (&M::POST, ["v1", "users", user, "connect", "confirm"]) => {
            crate::connect::confirm::confirm(app, id(user, "user id")?, body).await
        }
        (&M::GET, ["v1", "users"]) => list_users(app, query).await,
        (&M::PUT, ["v1", "users", user]) => put_user(app, id(user, "user id")?, body).await,
        (&M::GET, ["v1", "users", user]) => get_user(app, id(user, "user id")?).await,
        (&M::DELETE, ["v1", "users", user]) => delete_user(app, id(user, "user id")?).await,
        (&M::POST, ["v1", "sessions"]) => create_session(app, body).await,
        (&M::GET, ["v1", "sessions", sid]) => get_session(app, sid).await,
        (&M::DELETE, ["v1", "sessions", sid]) => delete_session(app, sid).await,
        (&M::POST, ["v1", "admin", "backup"]) => backup(app, body).await,
        // A known path, another method: 405 (its `Allow` from the same list).
        _ if allowed(segs).is_some() => Err(ApiError::MethodNotAllowed),
        _ => Err(ApiError::NotFound(
            "There is no such admin endpoint.".into(),
        )),
    }
}

/// The OpenMetrics content type, for scrapers that ask for it.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Prometheus' text format, the default.
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `/metrics` on the admin listener and the token-less metrics listener:
/// OpenMetrics when the scraper prefers it (Prometheus asks for it first
/// by default), else Prometheus' text format, which every tool reads.
pub async fn metrics(app: &Arc<App>, headers: &http::HeaderMap) -> Response<Body> {
    let sampled = sidekey_base::metrics::Sampled {
        sessions: app.store.session_count().await,
        credentials: app.store.credential_count().await,
        store_bytes: app.store.size_on_disk().await,
        audit: app.audit.backlog(),
        listener_up: app.store.listener_up(),
    };
    if wants_openmetrics(headers) {
        let text = app.metrics.render(sampled);
        body::text(StatusCode::OK, OPENMETRICS_CONTENT_TYPE, text)
    } else {
        let text = app.metrics.render_text(sampled);
        body::text(StatusCode::OK, PROMETHEUS_TEXT_CONTENT_TYPE, text)
    }
}

/// Whether `Accept` ranks OpenMetrics above Prometheus' text format (a
/// missing `q` is 1; `*/*` alone gets the text format).
fn wants_openmetrics(headers: &http::HeaderMap) -> bool {
    let mut open = 0.0f32;
    let mut text = 0.0f32;
    for v in headers.get_all(http::header::ACCEPT) {
        let Ok(v) = v.to_str() else { continue };
        for range in v.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let kind = parts.next().unwrap_or("").to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.strip_prefix("q="))
                .find_map(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            match kind.as_str() {
                "application/openmetrics-text" => open = open.max(q),
                "text/plain" => text = text.max(q),
                _ => {}
            }
        }
    }
    open > 0.0 && open >= text
}

// ----- credentials ---------------------------------------------------------

/// A credential PUT body: a token response as the provider sent it (read
/// by the same parser as the refresh path), plus `scopes`, `username` and
/// `password`.
struct CredentialBody {
    token: sidekey_creds::token_response::TokenResponse,
    scopes: Option<Vec<String>>,
    username: Option<Secret>,
    password: Option<Secret>,
    /// Per-connection values (`"connection": {"subdomain": "acme"}`), and
    /// any top-level string a token response carries for a field.
    connection: std::collections::BTreeMap<String, String>,
    /// Top-level strings of the body, for `from = "token"` fields.
    strings: std::collections::BTreeMap<String, String>,
}

/// Fields a hand-built body may carry; `token_type` marks a body that is a
/// provider's token response, whose other fields are ignored.
const CREDENTIAL_FIELDS: &[&str] = &[
    "access_token",
    "refresh_token",
    "expires_at",
    "expires_in",
    "scope",
    "scopes",
    "username",
    "password",
    "token_type",
    "id_token",
    "refresh_token_expires_in",
    "connection",
];

impl CredentialBody {
    fn parse(body: &[u8], now: i64) -> Result<CredentialBody, ApiError> {
        let map: serde_json::Map<String, Value> = crate::request::json_object(body)?;
        // A token response (it names its token_type) is stored as servers
        // send it, extra fields and all (Entra's ext_expires_in, ...). A
        // hand-built body is checked strictly: a misspelt refresh_token
        // is an error, not a silently lost refresh token.
        if !map.contains_key("token_type") {
            if let Some(k) = map
                .keys()
                .find(|k| !CREDENTIAL_FIELDS.contains(&k.as_str()))
            {
                let k: String = k.chars().take(64).collect();
                return Err(ApiError::BadRequest(format!(
                    "The request body is not what this endpoint takes: unknown field {k:?}."
                )));
            }
        }
        let token = sidekey_creds::token_response::parse(&map, now)
            .map_err(|e| ApiError::BadRequest(format!("The token response is refused: {e}.")))?;
        let secret = |k: &'static str| -> Result<Option<Secret>, ApiError> {
            match map.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(Secret::new(s.as_str()))),
                Some(_) => Err(ApiError::BadRequest(format!("{k} must be a string."))),
            }
        };
        let scopes = match map.get("scopes") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|x| x.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        ApiError::BadRequest("scopes must be a list of strings.".into())
                    })?,
            ),
            Some(_) => {
                return Err(ApiError::BadRequest(
                    "scopes must be a list of strings.".into(),
                ));
            }
        };
        let bad_connection = || {
            ApiError::BadRequest(
                "connection must be an object of strings, e.g. {\"subdomain\": \"acme\"}.".into(),
            )
        };
        let connection = match map.get("connection") {
            None | Some(Value::Null) => Default::default(),
            Some(Value::Object(o)) if o.len() <= 32 => o
                .iter()
                .map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                .collect::<Option<_>>()
                .ok_or_else(bad_connection)?,
            Some(_) => return Err(bad_connection()),
        };
        let strings = map
            .iter()
            .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
            .collect();
        Ok(CredentialBody {
            token,
            scopes,
            username: secret("username")?,
            password: secret("password")?,
            connection,
            strings,
        })
    }
}

/// Secrets are injected into headers and URLs: printable ASCII only, so a
/// stored value can never smuggle CR/LF into an upstream request.
fn check_secret(s: &Option<Secret>, field: &str) -> Result<(), ApiError> {
    if let Some(s) = s {
        let v = s.expose();
        if v.is_empty()
            || v.len() > 16_384
            || !v.bytes().all(|b| (0x21..0x7f).contains(&b) || b == b' ')
        {
            return Err(ApiError::BadRequest(format!(
                "{field} must be 1-16384 printable ASCII characters."
            )));
        }
    }
    Ok(())
}

pub use crate::views::credential_metadata;

async fn credential_route(
    app: &Arc<App>,
    method: &Method,
    owner: Owner,
    provider: &str,
    body: &[u8],
) -> Result<Response<Body>, ApiError> {
    let provider = id(provider, "provider name")?;
    let p = app
        .providers
        .get(provider)
        .ok_or_else(|| app.unknown_provider(provider))?
        .clone();
    let now = app.clock.now();
    match *method {
        Method::PUT if crate::jwt_keys::is_key_body(body) => {
            crate::jwt_keys::put(app, &owner, &p, body, now).await
        }
        Method::PUT => {
            if p.grant == sidekey_creds::providers::Grant::JwtBearer {
                return Err(ApiError::BadRequest(format!(
                    "{} gets each user's token with a signed assertion (grant = jwt_bearer); store a tenant's key instead: {{\"service_account\": {{…}}}} or {{\"jwt_key\": {{\"issuer\", \"private_key_pem\", \"key_id\"}}}}.",
                    p.display
                )));
            }
            let mut b = CredentialBody::parse(body, now)?;
            if let Some(owner_name) = &p.credential_from {
                return Err(ApiError::BadRequest(format!(
                    "{} uses the credential stored for {owner_name} (credential_from); store it there.",
                    p.display
                )));
            }
            // A token response as the provider sent it names its
            // `from = "token"` values at the top level (instance_url).
            for f in &p.connection {
                if f.from == sidekey_creds::providers::ConnectionFrom::Token
                    && !b.connection.contains_key(&f.name)
                {
                    if let Some(v) = b.strings.get(&f.name) {
                        b.connection.insert(f.name.clone(), v.clone());
                    }
                }
            }
            p.check_connection(&b.connection)
                .map_err(|e| ApiError::connection(&p, e))?;
            if p.grant == sidekey_creds::providers::Grant::ClientCredentials {
                return Err(ApiError::BadRequest(format!(
                    "{} uses one app-level token (grant = client_credentials); sidekey fetches it itself.",
                    p.display
                )));
            }
            for (v, f) in [
                (&b.token.access_token, "access_token"),
                (&b.token.refresh_token, "refresh_token"),
                (&b.username, "username"),
                (&b.password, "password"),
            ] {
                check_secret(v, f)?;
            }
            match p.inject {
                sidekey_creds::providers::Injection::Basic => {
                    if b.username.is_none() || b.password.is_none() {
                        return Err(ApiError::BadRequest(format!(
                            "{} uses basic auth: give username and password.",
                            p.display
                        )));
                    }
                }
                _ => {
                    if b.token.access_token.is_none() {
                        return Err(ApiError::BadRequest("access_token is required.".into()));
                    }
                }
            }
            let mut cred = Credential {
                reauth_reason: None,
                refreshed_at: None,
                access_token: b.token.access_token,
                refresh_token: b.token.refresh_token,
                expires_at: b.token.expires_at,
                scopes: b.scopes.or(b.token.scopes).unwrap_or_default(),
                username: b.username,
                password: b.password,
                reauth_required: false,
                updated_at: now,
                generation: 0,
                connection: std::mem::take(&mut b.connection),
                jwt_key: None,
                jwt: None,
            };
            app.store
                .put_credential(&owner, provider, &mut cred)
                .await
                .map_err(ApiError::from)?;
            app.store.flush().await.map_err(ApiError::from)?;
            app.refresher.reset(&owner, provider).await;
            tracing::info!(owner = %owner.describe(), provider, "credential stored");
            Ok(body::json(
                StatusCode::OK,
                &credential_metadata(&owner, provider, &cred, now),
            ))
        }
        Method::GET => match app
            .store
            .credential_uncached(&owner, provider)
            .await
            .map_err(ApiError::from)?
        {
            Some(c) => Ok(body::json(
                StatusCode::OK,
                &credential_metadata(&owner, provider, &c, now),
            )),
            None => Err(ApiError::NotFound(format!(
                "{} has no {} credential.",
                owner.describe(),
                p.display
            ))),
        },
        Method::DELETE => {
            app.store
                .delete_credential(&owner, provider)
                .await
                .map_err(ApiError::from)?;
            app.store.flush().await.map_err(ApiError::from)?;
            app.refresher.reset(&owner, provider).await;
            Ok(body::no_content())
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

async fn list_credentials(app: &Arc<App>, owner: Owner) -> Result<Response<Body>, ApiError> {
    let now = app.clock.now();
    let list: Vec<Value> = app
        .store
        .list_credentials(&owner)
        .await
        .map_err(ApiError::from)?
        .iter()
        .map(|(p, c)| credential_metadata(&owner, p, c, now))
        .collect();
    Ok(body::json(StatusCode::OK, &Value::Array(list)))
}

// ----- users ---------------------------------------------------------------

fn double_option<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserBody {
    #[serde(default)]
    phone_numbers: Option<Vec<String>>,
    /// Absent: unchanged; null: no tenant.
    #[serde(default, deserialize_with = "double_option")]
    tenant: Option<Option<String>>,
    /// Absent: unchanged; null: none. The subject of JWT bearer grants.
    #[serde(default, deserialize_with = "double_option")]
    email: Option<Option<String>>,
}

fn user_json(user: &str, p: &UserProfile) -> Value {
    json!({
        "user": user,
        "phone_numbers": p.phone_numbers,
        "tenant": p.tenant,
        "email": p.email,
        "updated_at": p.updated_at,
    })
}

async fn put_user(app: &Arc<App>, user: &str, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let b: UserBody = crate::request::json_object(body)?;
    let mut profile = app
        .store
        .user(user)
        .await
        .map_err(ApiError::from)?
        .unwrap_or_default();
    if let Some(phones) = b.phone_numbers {
        let mut norm = Vec::new();
        for ph in phones {
            let n = sidekey_base::users::normalize_phone(&ph).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "{ph:?} is not a phone number in E.164 form, e.g. +15551234567."
                ))
            })?;
            if !norm.contains(&n) {
                norm.push(n);
            }
        }
        profile.phone_numbers = norm;
    }
    if let Some(t) = b.tenant {
        if let Some(t) = &t {
            id(t, "tenant id")?;
        }
        profile.tenant = t;
    }
    if let Some(e) = b.email {
        profile.email = match e {
            None => None,
            Some(e) => Some(sidekey_base::users::normalize_email(&e).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "{:?} is not an e-mail address sidekey accepts (local@domain, e.g. alice@acme.com).",
                    e.chars().take(80).collect::<String>()
                ))
            })?),
        };
    }
    profile.updated_at = app.clock.now();
    match app
        .store
        .put_user(user, &profile)
        .await
        .map_err(ApiError::from)?
    {
        Ok(()) => {}
        Err(PutUserError::PhoneTaken { phone, user: other }) => {
            return Err(ApiError::Conflict(format!(
                "The phone number {phone} already belongs to user {other}; remove it there first."
            )));
        }
    }
    app.store.flush().await.map_err(ApiError::from)?;
    Ok(body::json(StatusCode::OK, &user_json(user, &profile)))
}

/// A user's profile and credential metadata; `None` when neither exists.
/// A user known only through credentials (created by a credential PUT) has
/// no profile: its `updated_at` is that of its latest credential write.
async fn user_view(app: &Arc<App>, user: &str) -> Result<Option<Value>, ApiError> {
    let profile = app.store.user(user).await.map_err(ApiError::from)?;
    let creds = app
        .store
        .list_credentials(&Owner::User(user.to_owned()))
        .await
        .map_err(ApiError::from)?;
    if profile.is_none() && creds.is_empty() {
        return Ok(None);
    }
    let now = app.clock.now();
    let mut profile = profile.unwrap_or_default();
    let latest_credential = creds.iter().map(|(_, c)| c.updated_at).max();
    profile.updated_at = profile.updated_at.max(latest_credential.unwrap_or(0));
    let mut v = user_json(user, &profile);
    let owner = Owner::User(user.to_owned());
    v["credentials"] = Value::Array(
        creds
            .iter()
            .map(|(p, c)| credential_metadata(&owner, p, c, now))
            .collect(),
    );
    Ok(Some(v))
}

async fn get_user(app: &Arc<App>, user: &str) -> Result<Response<Body>, ApiError> {
    match user_view(app, user).await? {
        Some(v) => Ok(body::json(StatusCode::OK, &v)),
        None => Err(ApiError::NotFound(format!("There is no user {user}."))),
    }
}

/// `GET /v1/users?limit=&after=`: users in id order, a page at a time;
/// `next` is the `after` of the following page (null on the last one).
async fn list_users(app: &Arc<App>, query: Option<&str>) -> Result<Response<Body>, ApiError> {
    let mut after: Option<String> = None;
    let mut limit = 100usize;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "after" if !v.is_empty() => after = Some(id(&v, "after cursor")?.to_owned()),
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|l| (1..=1000).contains(l))
                    .ok_or_else(|| {
                        ApiError::BadRequest("limit must be between 1 and 1000.".into())
                    })?
            }
            _ => {}
        }
    }
    let mut ids = app
        .store
        .list_users(after.as_deref(), limit + 1)
        .await
        .map_err(ApiError::from)?;
    let more = ids.len() > limit;
    ids.truncate(limit);
    let mut users = Vec::with_capacity(ids.len());
    for u in &ids {
        // A user deleted since the key scan is simply left out.
        if let Some(v) = user_view(app, u).await? {
            users.push(v);
        }
    }
    let next = if more { ids.last().cloned() } else { None };
    Ok(body::json(
        StatusCode::OK,
        &json!({"users": users, "next": next}),
    ))
}

async fn delete_user(app: &Arc<App>, user: &str) -> Result<Response<Body>, ApiError> {
    let revoked = app.store.delete_user(user).await.map_err(ApiError::from)?;
    app.store.flush().await.map_err(ApiError::from)?;
    tracing::info!(user, sessions_revoked = revoked, "user deleted");
    Ok(body::no_content())
}

// ----- sessions ------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionBody {
    user: String,
    #[serde(default)]
    providers: Option<Vec<String>>,
    #[serde(default)]
    ttl_secs: Option<u64>,
    #[serde(default)]
    conversation_id: Option<String>,
}

async fn create_session(app: &Arc<App>, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let b: SessionBody = crate::request::json_object(body)?;
    let user = id(&b.user, "user id")?;
    // No list means every configured provider; an empty list is a mistake.
    let providers = b
        .providers
        .unwrap_or_else(|| app.providers.names().to_vec());
    if providers.is_empty() {
        return Err(ApiError::BadRequest(
            "providers must list at least one configured provider.".into(),
        ));
    }
    let mut uniq: Vec<String> = Vec::new();
    for p in providers {
        if app.providers.get(&p).is_none() {
            return Err(app.unknown_provider(&p));
        }
        if !uniq.contains(&p) {
            uniq.push(p);
        }
    }
    let max = app.config.sessions.max_ttl_secs;
    let ttl = b.ttl_secs.unwrap_or(app.config.sessions.ttl_secs);
    if ttl == 0 || ttl > max {
        return Err(ApiError::BadRequest(format!(
            "ttl_secs must be between 1 and {max}."
        )));
    }
    if let Some(c) = &b.conversation_id {
        if !sidekey_creds::session::valid_conversation_id(c) {
            return Err(ApiError::BadRequest(
                "conversation_id must be 1-256 printable ASCII characters without spaces.".into(),
            ));
        }
    }
    let v = app
        .sessions
        .mint_answer(
            &app.config.sessions.dynamic_variable,
            user,
            uniq,
            ttl,
            b.conversation_id,
        )
        .await?;
    app.store.flush().await.map_err(ApiError::from)?;
    Ok(body::json(StatusCode::CREATED, &v))
}

async fn get_session(app: &Arc<App>, sid: &str) -> Result<Response<Body>, ApiError> {
    match app.store.session(sid).await.map_err(ApiError::from)? {
        Some(r) if r.exp > app.clock.now() => Ok(body::json(
            StatusCode::OK,
            &json!({
                "session_id": sid,
                "user": r.user,
                "providers": r.providers,
                "issued_at": r.iat,
                "expires_at": r.exp,
                "conversation_id": r.conv,
            }),
        )),
        _ => Err(ApiError::NotFound(
            "There is no such active session.".into(),
        )),
    }
}

async fn delete_session(app: &Arc<App>, sid: &str) -> Result<Response<Body>, ApiError> {
    app.store
        .revoke_session(sid)
        .await
        .map_err(ApiError::from)?;
    app.store.flush().await.map_err(ApiError::from)?;
    Ok(body::no_content())
}

// ----- audit, backup -------------------------------------------------------

async fn audit(app: &Arc<App>, query: Option<&str>) -> Result<Response<Body>, ApiError> {
    let mut user = None;
    let mut limit = 100usize;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "user" if !v.is_empty() => user = Some(id(&v, "user id")?.to_owned()),
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|l| (1..=10_000).contains(l))
                    .ok_or_else(|| {
                        ApiError::BadRequest("limit must be between 1 and 10000.".into())
                    })?
            }
            _ => {}
        }
    }
    app.audit.sync().await;
    let store = app.store.clone();
    // Decrypting many batches is CPU work: off the request workers.
    let rt = tokio::runtime::Handle::current();
    let records = tokio::task::spawn_blocking(move || {
        rt.block_on(store.recent_audit(user.as_deref(), limit))
    })
    .await
    .map_err(|_| ApiError::Internal)??;
    let out: Vec<Value> = records
        .into_iter()
        .map(|r| {
            let mut v = serde_json::to_value(&r).unwrap_or(Value::Null);
            v["time"] = json!(rfc3339(r.time));
            v["time_ms"] = json!(r.time);
            v
        })
        .collect();
    Ok(body::json(StatusCode::OK, &Value::Array(out)))
}

fn audit_write(
    app: &Arc<App>,
    method: &Method,
    path: &str,
    segs: &[&str],
    status: u16,
    started: Instant,
) {
    let user = match segs {
        ["v1", "users", u, ..] => Some((*u).to_owned()),
        _ => None,
    };
    let provider = match segs {
        ["v1", "users" | "tenants", _, "credentials" | "oauth", p, ..] => Some((*p).to_owned()),
        _ => None,
    };
    app.audit.record(AuditRecord {
        time: app.clock.now_millis(),
        kind: "admin".into(),
        user,
        provider,
        method: sidekey_vault::method_name(method),
        path: path.to_owned(),
        status,
        duration_ms: (started.elapsed().as_secs_f64() * 1e6).round() / 1000.0,
        session_id: None,
        conversation_id: None,
        error: None,
        tool: None,
        subject: None,
    });
}

async fn backup(app: &Arc<App>, body: &[u8]) -> Result<Response<Body>, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct B {
        out: String,
    }
    let b: B = crate::request::json_object(body)?;
    let out = std::path::PathBuf::from(&b.out);
    if !out.is_absolute() {
        return Err(ApiError::BadRequest("out must be an absolute path.".into()));
    }
    let store = app.store.clone();
    let n = tokio::task::spawn_blocking(move || store.backup_to(&out))
        .await
        .map_err(|_| ApiError::Internal)?
        .map_err(ApiError::BadRequest)?;
    let mut resp = body::json(
        StatusCode::OK,
        &json!({"status": "ok", "out": b.out, "records": n}),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// Unix milliseconds → `2026-11-25T19:18:54.123Z`.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_634_334_123), "2026-11-25T19:18:54.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn secrets_must_be_printable() {
        assert!(check_secret(&Some(Secret::new("xoxb-1")), "t").is_ok());
        assert!(check_secret(&Some(Secret::new("a\r\nX-Evil: 1")), "t").is_err());
        assert!(check_secret(&Some(Secret::new("")), "t").is_err());
        assert!(check_secret(&None, "t").is_ok());
    }
}
