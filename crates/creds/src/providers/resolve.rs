//! Resolving a `[providers.NAME]` section: the preset's defaults, then
//! the section's keys, every URL checked, every placeholder declared.

use globset::GlobBuilder;
use http::{HeaderName, HeaderValue, Method};
use url::Url;

use sidekey_base::config::{ProviderConfig, RawInject, is_loopback_url};

use super::presets::{self, preset};
use super::{
    AllowRule, BaseUrl, ClientAuth, ConnectionField, ConnectionFrom, Conventions, Grant, Injection,
    PRESETS, Provider, Templates, TokenFormat, UrlTemplate, display_name, is_hop_by_hop,
};

/// The rules every provider URL keeps: https (http for loopback or with
/// `allow_http`), no `user:password@`, no `#fragment`.
pub(super) fn url_rules(u: &Url, allow_http: bool) -> Result<(), String> {
    match u.scheme() {
        "https" => {}
        "http" if allow_http || is_loopback_url(u) => {}
        "http" => return Err("http:// is only allowed for loopback hosts; use https:// or set allow_http = true on this provider".into()),
        other => return Err(format!("scheme {other:?} is not http or https")),
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err("must not contain user:password@".into());
    }
    if u.fragment().is_some() {
        return Err("must not contain a #fragment".into());
    }
    Ok(())
}

fn parse_url(
    sec: &str,
    key: &str,
    value: &str,
    allow_http: bool,
    p: &mut Vec<String>,
) -> Option<Url> {
    let u = match Url::parse(value) {
        Ok(u) => u,
        Err(e) => {
            p.push(format!("{sec} {key} = {value:?} is not a URL ({e})"));
            return None;
        }
    };
    if let Err(e) = url_rules(&u, allow_http) {
        p.push(format!("{sec} {key} = {value:?}: {e}"));
        return None;
    }
    Some(u)
}

/// A base URL's parts. `leak`: the authority's text is kept for the
/// process (configured providers, once each), so a request's URI takes
/// it without a copy; a connection's base is built per call and is not.
pub(super) fn base_of(u: Url, leak: bool) -> Result<BaseUrl, String> {
    if u.query().is_some() {
        return Err("base_url must not contain a query string".into());
    }
    // `host[:port]`, an IPv6 address in brackets.
    let host = match u.host() {
        Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
        _ => u.host_str().ok_or("base_url has no host")?.to_owned(),
    };
    let authority = match u.port() {
        Some(port) => format!("{host}:{port}"),
        None => host,
    };
    let origin = format!("{}://{authority}", u.scheme());
    let path = u.path().trim_end_matches('/').to_owned();
    let (Ok(scheme), Ok(_)) = (
        http::uri::Scheme::try_from(u.scheme()),
        http::uri::Authority::try_from(authority.as_str()),
    ) else {
        return Err(format!(
            "base_url has a scheme, host or port sidekey cannot use: {origin}"
        ));
    };
    let authority = if leak {
        // Checked above: `from_static` cannot panic.
        let leaked: &'static str = Box::leak(authority.into_boxed_str());
        http::uri::Authority::from_static(leaked)
    } else {
        http::uri::Authority::try_from(authority).map_err(|_| "bad authority")?
    };
    Ok(BaseUrl {
        url: u,
        origin,
        path,
        scheme,
        authority,
    })
}

/// A URL key that may carry placeholders: its template (if any) and the
/// URL checked with sample values.
fn template_url(
    sec: &str,
    key: &str,
    value: &str,
    allow_http: bool,
    p: &mut Vec<String>,
) -> (Option<UrlTemplate>, Option<Url>) {
    match UrlTemplate::parse(value) {
        Err(e) => {
            p.push(format!("{sec} {key} = {e}"));
            (None, None)
        }
        Ok(None) => (None, parse_url(sec, key, value, allow_http, p)),
        Ok(Some(t)) => {
            let u = parse_url(sec, key, &t.sample(), allow_http, p);
            (Some(t), u)
        }
    }
}

pub(super) fn resolve(name: &str, pc: &ProviderConfig) -> Result<Provider, Vec<String>> {
    let sec = format!("[providers.{name}]");
    let mut p = Vec::new();
    let mut notes = Vec::new();
    let preset = match pc.preset.as_deref() {
        None => None,
        Some(n) => match preset(n) {
            Some(ps) => Some(ps),
            None => {
                p.push(format!(
                    "{sec} preset = {n:?} is unknown; presets are {}",
                    PRESETS.join(", ")
                ));
                None
            }
        },
    };

    let base_str = pc
        .base_url
        .clone()
        .or_else(|| preset.as_ref().map(|ps| ps.base_url.to_owned()));
    let mut templates = Templates::default();
    let base = match base_str {
        None => {
            p.push(format!(
                "{sec} base_url is required (or a preset: {})",
                PRESETS.join(", ")
            ));
            None
        }
        Some(b) => {
            let (t, u) = template_url(&sec, "base_url", &b, pc.allow_http, &mut p);
            templates.base_url = t;
            u.and_then(|u| match base_of(u, true) {
                Ok(b) => Some(b),
                Err(e) => {
                    p.push(format!("{sec} {e}"));
                    None
                }
            })
        }
    };

    let token_url = pc
        .token_url
        .clone()
        .or_else(|| {
            preset
                .as_ref()
                .and_then(|ps| ps.token_url.map(str::to_owned))
        })
        .and_then(|u| {
            let (t, u) = template_url(&sec, "token_url", &u, pc.allow_http, &mut p);
            templates.token_url = t;
            u
        });
    let authorize_url = pc
        .authorize_url
        .clone()
        .or_else(|| {
            preset
                .as_ref()
                .and_then(|ps| ps.authorize_url.map(str::to_owned))
        })
        .and_then(|u| {
            let (t, u) = template_url(&sec, "authorize_url", &u, pc.allow_http, &mut p);
            templates.authorize_url = t;
            u
        });

    let inject = match &pc.raw_inject {
        None => preset
            .as_ref()
            .map(|ps| ps.inject.clone())
            .unwrap_or(Injection::Bearer),
        Some(RawInject::Style(s)) => match s.as_str() {
            "bearer" => Injection::Bearer,
            "basic" => Injection::Basic,
            other => {
                p.push(format!("{sec} inject = {other:?}: use \"bearer\", \"basic\", {{ header = \"X-Api-Key\", value = \"Token {{token}}\" }}, {{ query = \"key\" }} or {{ path_prefix = \"/bot{{token}}\" }}"));
                Injection::Bearer
            }
        },
        Some(RawInject::Header { header, value }) => {
            let template = value.clone().unwrap_or_else(|| "{token}".into());
            if !template.contains("{token}") {
                p.push(format!("{sec} inject.value must contain {{token}}"));
            }
            match HeaderName::from_bytes(header.as_bytes()) {
                Ok(h) if !is_hop_by_hop(&h) && h != http::header::HOST => {
                    Injection::Header { name: h, template }
                }
                _ => {
                    p.push(format!(
                        "{sec} inject.header = {header:?} is not a usable header name"
                    ));
                    Injection::Bearer
                }
            }
        }
        Some(RawInject::Query { query }) => {
            if query.is_empty() {
                p.push(format!("{sec} inject.query must name a query parameter"));
            }
            Injection::Query {
                param: query.clone(),
            }
        }
        Some(RawInject::PathPrefix { path_prefix }) => {
            if !path_prefix.starts_with('/') || !path_prefix.contains("{token}") {
                p.push(format!("{sec} inject.path_prefix must start with / and contain {{token}}, e.g. \"/bot{{token}}\""));
            }
            Injection::PathPrefix {
                template: path_prefix.trim_end_matches('/').to_owned(),
            }
        }
    };

    let client_auth = match pc.client_auth.as_deref() {
        None => preset
            .as_ref()
            .map_or(ClientAuth::Body, |ps| ps.client_auth),
        Some("body") => ClientAuth::Body,
        Some("basic") => ClientAuth::Basic,
        Some("private_key_jwt") => ClientAuth::PrivateKeyJwt,
        Some(o) => {
            p.push(format!(
                "{sec} client_auth = {o:?}: use \"body\", \"basic\" or \"private_key_jwt\""
            ));
            ClientAuth::Body
        }
    };
    let grant = match pc.grant.as_deref() {
        None | Some("authorization_code") | Some("refresh_token") => Grant::AuthorizationCode,
        Some("client_credentials") => Grant::ClientCredentials,
        Some("jwt_bearer") => Grant::JwtBearer,
        Some(o) => {
            p.push(format!(
                "{sec} grant = {o:?}: use \"authorization_code\" (default), \"client_credentials\" or \"jwt_bearer\""
            ));
            Grant::AuthorizationCode
        }
    };

    let mut allow = Vec::new();
    for pat in &pc.allow {
        let (method, path) = match pat.trim().split_once(char::is_whitespace) {
            Some((m, rest)) => (Some(m), rest.trim()),
            None => (None, pat.trim()),
        };
        let method = match method {
            None | Some("*") | Some("ANY") => None,
            Some(m) => match Method::from_bytes(m.as_bytes()) {
                Ok(m) => Some(m),
                Err(_) => {
                    p.push(format!("{sec} allow {pat:?}: {m:?} is not an HTTP method"));
                    None
                }
            },
        };
        if !path.starts_with('/') {
            p.push(format!(
                "{sec} allow {pat:?}: the path glob must start with /, e.g. \"GET /calendar/v3/**\""
            ));
            continue;
        }
        match GlobBuilder::new(path).literal_separator(true).build() {
            Ok(g) => allow.push(AllowRule {
                method,
                glob: g.compile_matcher(),
            }),
            Err(e) => p.push(format!("{sec} allow {pat:?}: {e}")),
        }
    }

    let client_id = match pc.client_id.load() {
        // A blank id is no id: the note below says it is not set.
        Ok(v) => v.map(|s| s.expose().to_owned()).filter(|s| !s.is_empty()),
        Err(e) => {
            p.push(format!("{sec} client_id: {e}"));
            None
        }
    };
    let client_secret = match pc.client_secret.load() {
        Ok(Some(s)) if s.is_empty() => {
            p.push(format!(
                "{sec} client_secret: {} is empty; put the provider's client secret in it, or remove the setting",
                pc.client_secret.describe()
            ));
            None
        }
        Ok(v) => v,
        Err(e) => {
            p.push(format!("{sec} client_secret: {e}"));
            None
        }
    };
    if token_url.is_some() || grant == Grant::ClientCredentials {
        if client_id.is_none() && pc.client_id != sidekey_base::config::SecretSource::Unset {
            notes.push(format!("{sec} client_id: {} is not set; token refresh and the OAuth flow for this provider will fail until it is", pc.client_id.describe()));
        }
        if client_secret.is_none() && pc.client_secret != sidekey_base::config::SecretSource::Unset
        {
            notes.push(format!("{sec} client_secret: {} is not set; token refresh and the OAuth flow for this provider will fail until it is", pc.client_secret.describe()));
        }
    }
    if grant == Grant::ClientCredentials && token_url.is_none() {
        p.push(format!(
            "{sec} grant = \"client_credentials\" needs token_url"
        ));
    }
    let (jwt, token_url) = jwt_settings(
        &sec,
        pc,
        preset.as_ref(),
        (grant, client_auth),
        client_id.as_deref(),
        client_secret.is_some(),
        token_url,
        &mut p,
        &mut notes,
    );

    let display = pc
        .display_name
        .clone()
        .or_else(|| preset.as_ref().map(|ps| ps.display.to_owned()))
        .unwrap_or_else(|| display_name(name));
    let scope_separator = pc
        .scope_separator
        .clone()
        .or_else(|| preset.as_ref().map(|ps| ps.scope_separator.to_owned()))
        .unwrap_or_else(|| " ".into());
    let mut authorize_params: Vec<(String, String)> = preset
        .as_ref()
        .map(|ps| {
            ps.authorize_params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default();
    for (k, v) in &pc.authorize_params {
        authorize_params.retain(|(ek, _)| ek != k);
        authorize_params.push((k.clone(), v.clone()));
    }
    let conventions = match &preset {
        Some(ps) => Conventions {
            ok_false_auth_errors: ps.ok_false_auth_errors.to_vec(),
            reauth_errors: ps.reauth_errors.iter().map(|s| s.to_string()).collect(),
            nested_user_token: ps.nested_user_token,
        },
        None => Conventions {
            ok_false_auth_errors: vec![],
            reauth_errors: vec!["invalid_grant".into()],
            nested_user_token: false,
        },
    };

    let mut token_params: Vec<(String, String)> = preset
        .as_ref()
        .map(|ps| {
            ps.token_params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default();
    for (k, v) in &pc.token_params {
        token_params.retain(|(ek, _)| ek != k);
        token_params.push((k.clone(), v.clone()));
    }
    let headers = fixed_headers(&sec, preset.as_ref(), pc, &inject, &mut p);
    let connection = connection_fields(&sec, preset.as_ref(), pc, &templates, &mut p);
    if let Some(from) = &pc.credential_from {
        if from == name {
            p.push(format!("{sec} credential_from names this provider itself"));
        }
    }

    if !p.is_empty() {
        return Err(p);
    }
    Ok(Provider {
        name: name.to_owned(),
        metric_label: sidekey_base::metrics::Label::new(name),
        display,
        description: pc.description.clone(),
        preset: pc.preset.clone(),
        base: base.expect("checked above"),
        inject,
        token_url,
        authorize_url,
        client_id,
        client_secret,
        client_auth,
        refresh_skew_secs: i64::try_from(pc.refresh_skew_secs.unwrap_or(60)).unwrap_or(i64::MAX),
        refresh_cooldown_secs: i64::try_from(pc.refresh_cooldown_secs.unwrap_or(30))
            .unwrap_or(i64::MAX),
        allow,
        allow_patterns: pc.allow.clone(),
        grant,
        scopes: pc.scopes.clone().unwrap_or_default(),
        user_scopes: pc.user_scopes.clone().unwrap_or_default(),
        scope_separator,
        authorize_params,
        token_params,
        conventions,
        allow_http: pc.allow_http,
        notes,
        pkce: pc
            .pkce
            .or_else(|| preset.as_ref().map(|ps| ps.pkce))
            .unwrap_or(true),
        token_format: preset
            .as_ref()
            .map_or(TokenFormat::Form, |ps| ps.token_format),
        headers,
        credential_from: pc.credential_from.clone(),
        connection,
        templates,
        rotates_refresh_token: preset.as_ref().is_some_and(|ps| ps.rotates_refresh_token),
        signed_callback: preset.as_ref().is_some_and(|ps| ps.signed_callback),
        jwt,
    })
}

/// The JWT keys of a section, and its token URL (a service account's
/// `token_uri` when the section names none).
#[allow(clippy::too_many_arguments)]
fn jwt_settings(
    sec: &str,
    pc: &ProviderConfig,
    preset: Option<&presets::Preset>,
    (grant, client_auth): (Grant, ClientAuth),
    client_id: Option<&str>,
    has_secret: bool,
    mut token_url: Option<Url>,
    p: &mut Vec<String>,
    notes: &mut Vec<String>,
) -> (Option<std::sync::Arc<crate::jwt::JwtSettings>>, Option<Url>) {
    let is_grant = grant == Grant::JwtBearer;
    if is_grant {
        if let (Some(name), Some(ps)) = (&pc.preset, preset) {
            if ps.jwt_audience.is_none() {
                p.push(format!("{sec} grant = \"jwt_bearer\": preset {name:?} documents no JWT bearer grant (google, gmail, google_sheets, google_drive and salesforce do); configure the provider without a preset"));
            }
        }
    }
    let jwt = crate::jwt::settings::resolve(
        &pc.jwt,
        &crate::jwt::settings::Needs {
            sec,
            grant: is_grant,
            client_assertion: client_auth == ClientAuth::PrivateKeyJwt,
            client_id,
            preset_audience: preset.and_then(|ps| ps.jwt_audience),
            preset_scope_claim: preset.is_none_or(|ps| ps.jwt_scope_claim),
        },
        p,
        notes,
    );
    if pc.token_url.is_none() {
        if let Some(uri) = jwt.as_ref().and_then(|j| j.token_uri.as_deref()) {
            token_url = parse_url(sec, "service_account_file token_uri", uri, pc.allow_http, p);
        }
    }
    if is_grant && token_url.is_none() {
        p.push(format!("{sec} grant = \"jwt_bearer\" needs token_url"));
    }
    if client_auth == ClientAuth::PrivateKeyJwt && has_secret {
        notes.push(format!(
            "{sec} client_secret is never sent with client_auth = \"private_key_jwt\"; remove it"
        ));
    }
    (jwt, token_url)
}

/// The preset's fixed headers, then the section's `headers` (which win).
fn fixed_headers(
    sec: &str,
    preset: Option<&presets::Preset>,
    pc: &ProviderConfig,
    inject: &Injection,
    p: &mut Vec<String>,
) -> Vec<(HeaderName, HeaderValue)> {
    let mut out: Vec<(HeaderName, HeaderValue)> = Vec::new();
    let given = preset
        .map(|ps| ps.headers)
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .chain(pc.headers.iter().map(|(k, v)| (k.clone(), v.clone())));
    for (k, v) in given {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(&v),
        ) else {
            p.push(format!(
                "{sec} headers: {k:?} = {v:?} is not a usable header"
            ));
            continue;
        };
        let refused = is_hop_by_hop(&name)
            || matches!(
                name.as_str(),
                "host" | "authorization" | "cookie" | "content-length" | "expect"
            )
            || name.as_str().starts_with("x-sidekey-")
            || matches!(inject, Injection::Header { name: n, .. } if *n == name);
        if refused {
            p.push(format!(
                "{sec} headers: {k:?} is a header sidekey sets or removes itself"
            ));
            continue;
        }
        out.retain(|(n, _)| *n != name);
        out.push((name, value));
    }
    out
}

/// The preset's connection fields, then the section's (which win); every
/// placeholder in a URL must be declared.
fn connection_fields(
    sec: &str,
    preset: Option<&presets::Preset>,
    pc: &ProviderConfig,
    templates: &Templates,
    p: &mut Vec<String>,
) -> Vec<ConnectionField> {
    let mut out: Vec<ConnectionField> = Vec::new();
    for (n, from, pat) in preset.map(|ps| ps.connection).unwrap_or_default() {
        match ConnectionField::new(n, *from, pat) {
            Ok(f) => out.push(f),
            Err(e) => p.push(format!("{sec} connection.{n}: {e}")),
        }
    }
    for (n, c) in &pc.connection {
        let Some(from) = ConnectionFrom::parse(&c.from) else {
            p.push(format!(
                "{sec} connection.{n}: from = {:?}: use \"user\", \"token\" or \"admin\"",
                c.from
            ));
            continue;
        };
        if !sidekey_base::config::valid_id(n) || n.contains(['{', '}']) {
            p.push(format!("{sec} connection.{n}: not a usable field name"));
            continue;
        }
        match ConnectionField::new(n, from, &c.pattern) {
            Ok(f) => {
                out.retain(|o| o.name != f.name);
                out.push(f);
            }
            Err(e) => p.push(format!("{sec} connection.{n}: {e}")),
        }
    }
    for t in [
        &templates.base_url,
        &templates.token_url,
        &templates.authorize_url,
    ]
    .into_iter()
    .flatten()
    {
        for f in t.fields() {
            if !out.iter().any(|o| o.name == f) {
                p.push(format!(
                    "{sec} {{{f}}} in {:?} needs [providers.NAME.connection.{f}] with from and pattern",
                    t.text
                ));
            }
        }
    }
    out
}
