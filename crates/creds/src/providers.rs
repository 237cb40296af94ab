//! Providers: presets, the resolved per-provider settings, path mapping and
//! credential injection.
//!
//! Everything a request needs about a provider is computed once at start-up
//! (URLs parsed, globs compiled, secrets loaded) so the request path only
//! looks things up.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use globset::{GlobBuilder, GlobMatcher};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use url::Url;

use sidekey_base::config::{Config, ProviderConfig, RawInject, is_loopback_url};
use sidekey_base::secret::Secret;

/// How the credential is put on the upstream request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Injection {
    /// `Authorization: Bearer <access_token>`
    Bearer,
    /// `Authorization: Basic base64(username:password)`
    Basic,
    /// A named header; `template` contains `{token}`.
    Header { name: HeaderName, template: String },
    /// `?<param>=<token>` appended to the query string.
    Query { param: String },
    /// `<base path><before>{token}<after>/<rest>`, e.g. Telegram's `/bot{token}`.
    PathPrefix { template: String },
}

/// Which provider an error is about, with the name a caller would say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderLabel {
    /// The configured provider key, e.g. `google`.
    pub name: String,
    /// What the voice agent calls it, e.g. `Google`.
    pub display: String,
}

impl ProviderLabel {
    pub fn new(name: &str, display: &str) -> Self {
        ProviderLabel {
            name: name.to_owned(),
            display: display.to_owned(),
        }
    }

    /// A label for a provider name that is not configured.
    pub fn unknown(name: &str) -> Self {
        ProviderLabel::new(name, &display_name(name))
    }
}

/// `google` → `Google`; `my-crm` → `My-crm`.
pub fn display_name(name: &str) -> String {
    let mut c = name.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// client_id and client_secret in the form body.
    Body,
    /// HTTP Basic with client_id:client_secret.
    Basic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant {
    /// Per-user tokens from the OAuth code flow or the admin API.
    AuthorizationCode,
    /// One app-level token per provider, fetched with the client id/secret.
    ClientCredentials,
}

/// How a provider signals errors that are not plain HTTP statuses.
#[derive(Clone, Debug, Default)]
pub struct Conventions {
    /// Slack answers `200 {"ok": false, "error": "..."}`; these errors mean
    /// "the access token is dead" and are handled like a 401.
    pub ok_false_auth_errors: Vec<&'static str>,
    /// Token-endpoint `error` values meaning the refresh token is dead.
    pub reauth_errors: Vec<String>,
    /// Token responses nest a user token under `authed_user` (Slack).
    pub nested_user_token: bool,
}

/// A provider's fixed upstream location.
#[derive(Clone, Debug)]
pub struct BaseUrl {
    pub url: Url,
    /// `scheme://host[:port]`.
    pub origin: String,
    /// Path without trailing slash; empty for the root.
    pub path: String,
    /// The origin parsed once, so that each upstream request parses only
    /// its path and query. The authority's text lives for the process
    /// (providers are configured once, at start), so cloning it into a
    /// request's URI costs no allocation and no shared reference count.
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
}

#[derive(Clone, Debug)]
struct AllowRule {
    method: Option<Method>,
    glob: GlobMatcher,
}

/// A preset's defaults; any key set in the provider's section wins.
struct Preset {
    display: &'static str,
    base_url: &'static str,
    token_url: Option<&'static str>,
    authorize_url: Option<&'static str>,
    inject: Injection,
    authorize_params: &'static [(&'static str, &'static str)],
    scope_separator: &'static str,
    ok_false_auth_errors: &'static [&'static str],
    reauth_errors: &'static [&'static str],
    nested_user_token: bool,
}

fn preset(name: &str) -> Option<Preset> {
    match name {
        "slack" => Some(Preset {
            display: "Slack",
            base_url: "https://slack.com/api",
            token_url: Some("https://slack.com/api/oauth.v2.access"),
            authorize_url: Some("https://slack.com/oauth/v2/authorize"),
            inject: Injection::Bearer,
            authorize_params: &[],
            scope_separator: ",",
            ok_false_auth_errors: &["token_expired", "invalid_auth", "token_revoked"],
            reauth_errors: &["invalid_refresh_token", "invalid_grant", "token_revoked"],
            nested_user_token: true,
        }),
        "google" => Some(Preset {
            display: "Google",
            base_url: "https://www.googleapis.com",
            token_url: Some("https://oauth2.googleapis.com/token"),
            authorize_url: Some("https://accounts.google.com/o/oauth2/v2/auth"),
            inject: Injection::Bearer,
            authorize_params: &[("access_type", "offline"), ("prompt", "consent")],
            scope_separator: " ",
            ok_false_auth_errors: &[],
            reauth_errors: &["invalid_grant"],
            nested_user_token: false,
        }),
        "telegram" => Some(Preset {
            display: "Telegram",
            base_url: "https://api.telegram.org",
            token_url: None,
            authorize_url: None,
            inject: Injection::PathPrefix {
                template: "/bot{token}".into(),
            },
            authorize_params: &[],
            scope_separator: " ",
            ok_false_auth_errors: &[],
            reauth_errors: &["invalid_grant"],
            nested_user_token: false,
        }),
        _ => None,
    }
}

pub const PRESETS: &[&str] = &["slack", "google", "telegram"];

/// One configured provider, fully resolved.
#[derive(Debug)]
pub struct Provider {
    pub name: String,
    /// `name` as a metrics label value, made once.
    pub metric_label: sidekey_base::metrics::Label,
    /// Name the voice agent says ("Google").
    pub display: String,
    /// What this provider is used for (`description`), on the connect page.
    pub description: Option<String>,
    pub preset: Option<String>,
    pub base: BaseUrl,
    pub inject: Injection,
    pub token_url: Option<Url>,
    pub authorize_url: Option<Url>,
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub client_auth: ClientAuth,
    /// Refresh when the token expires within this many seconds (capped at
    /// half the token's issued lifetime, see `refresh::effective_skew`).
    pub refresh_skew_secs: i64,
    /// The refresh tool does not call the token endpoint again within this
    /// many seconds of a successful refresh; 0 turns the cooldown off.
    pub refresh_cooldown_secs: i64,
    /// Empty means every path is allowed.
    allow: Vec<AllowRule>,
    /// The allow list as written, for generated tool descriptions.
    pub allow_patterns: Vec<String>,
    pub grant: Grant,
    pub scopes: Vec<String>,
    pub user_scopes: Vec<String>,
    pub scope_separator: String,
    pub authorize_params: Vec<(String, String)>,
    pub token_params: Vec<(String, String)>,
    pub conventions: Conventions,
    pub allow_http: bool,
    /// Problems that do not stop the server (e.g. a missing client secret
    /// only disables refresh); printed by check-config and logged at start.
    pub notes: Vec<String>,
}

impl Provider {
    pub fn label(&self) -> ProviderLabel {
        ProviderLabel::new(&self.name, &self.display)
    }

    /// Whether a user can connect it through the authorization-code flow
    /// (connect page and admin `oauth/start`).
    pub fn oauth_capable(&self) -> bool {
        self.grant == Grant::AuthorizationCode
            && self.authorize_url.is_some()
            && self.token_url.is_some()
            && self.client_id.is_some()
    }

    /// Whether tokens of this provider can be renewed at all.
    pub fn can_refresh(&self) -> bool {
        self.token_url.is_some()
    }

    /// Checks a method and decoded path against the allow list.
    pub fn allows(&self, method: &Method, decoded_path: &str) -> bool {
        if self.allow.is_empty() {
            return true;
        }
        let path = if decoded_path.is_empty() {
            "/"
        } else {
            decoded_path
        };
        self.allow
            .iter()
            .any(|r| r.method.as_ref().is_none_or(|m| m == method) && r.glob.is_match(path))
    }

    /// The upstream URI for a checked path and the client's query string.
    /// `token` is needed only for query and path-prefix injection.
    pub fn upstream_uri(
        &self,
        path: &ProxyPath,
        query: Option<&str>,
        token: Option<&Secret>,
    ) -> Result<Uri, InjectError> {
        // The path and query; the origin was parsed at start.
        let mut s = String::with_capacity(self.base.path.len() + path.raw.len() + 64);
        s.push_str(&self.base.path);
        if let Injection::PathPrefix { template } = &self.inject {
            let token = token.ok_or(InjectError::MissingToken)?;
            let enc = utf8_percent_encode(token.expose(), SEGMENT).to_string();
            s.push_str(&template.replace("{token}", &enc));
        }
        s.push_str(&path.raw);
        let mut first = true;
        let inject_param = match &self.inject {
            Injection::Query { param } => Some(param.as_str()),
            _ => None,
        };
        if let Some(q) = query.filter(|q| !q.is_empty()) {
            for pair in q.split('&') {
                // A client-supplied copy of the injected parameter must not
                // reach the upstream, in any spelling some server reads as
                // the same name: some servers take the first copy.
                if inject_param.is_some_and(|param| names_param(pair, param)) {
                    continue;
                }
                s.push(if first { '?' } else { '&' });
                first = false;
                s.push_str(pair);
            }
        }
        if let Some(param) = inject_param {
            let token = token.ok_or(InjectError::MissingToken)?;
            s.push(if first { '?' } else { '&' });
            s.push_str(&utf8_percent_encode(param, QUERY).to_string());
            s.push('=');
            s.push_str(&utf8_percent_encode(token.expose(), QUERY).to_string());
        }
        if !s.starts_with('/') {
            s.insert(0, '/');
        }
        // From the String itself: `parse` would copy it first.
        let path_and_query =
            http::uri::PathAndQuery::try_from(s).map_err(|_| InjectError::BadUri)?;
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.base.scheme.clone());
        parts.authority = Some(self.base.authority.clone());
        parts.path_and_query = Some(path_and_query);
        Uri::from_parts(parts).map_err(|_| InjectError::BadUri)
    }

    /// Puts the credential on the upstream request headers (after every
    /// client-supplied copy was removed by the caller).
    pub fn inject_headers(
        &self,
        headers: &mut HeaderMap,
        cred: &sidekey_vault::Credential,
    ) -> Result<(), InjectError> {
        if let Some((name, value)) = self.credential_header(cred)? {
            headers.insert(name, value);
        }
        Ok(())
    }

    /// The header that carries the credential (`None` when it goes in the
    /// path or query), marked sensitive. The proxy hands it to the client
    /// apart from the caller's headers, so those are not copied into a new
    /// map for every attempt.
    pub fn credential_header(
        &self,
        cred: &sidekey_vault::Credential,
    ) -> Result<Option<(HeaderName, HeaderValue)>, InjectError> {
        let (name, mut v) = match &self.inject {
            Injection::Bearer => {
                let token = cred
                    .access_token
                    .as_ref()
                    .ok_or(InjectError::MissingToken)?;
                // By hand, not `format!`: its formatting machinery was 2 %
                // of a proxied request's instructions (callgrind, round 10).
                let t = token.expose();
                let mut s = String::with_capacity("Bearer ".len() + t.len());
                s.push_str("Bearer ");
                s.push_str(t);
                let v = HeaderValue::try_from(s).map_err(|_| InjectError::BadValue)?;
                (http::header::AUTHORIZATION, v)
            }
            Injection::Basic => {
                let (Some(u), Some(p)) = (&cred.username, &cred.password) else {
                    return Err(InjectError::MissingToken);
                };
                let raw = zeroize::Zeroizing::new(format!("{}:{}", u.expose(), p.expose()));
                let enc = zeroize::Zeroizing::new(
                    base64::engine::general_purpose::STANDARD.encode(raw.as_bytes()),
                );
                let v = HeaderValue::try_from(format!("Basic {}", enc.as_str()))
                    .map_err(|_| InjectError::BadValue)?;
                (http::header::AUTHORIZATION, v)
            }
            Injection::Header { name, template } => {
                let token = cred
                    .access_token
                    .as_ref()
                    .ok_or(InjectError::MissingToken)?;
                let value = zeroize::Zeroizing::new(template.replace("{token}", token.expose()));
                let v = HeaderValue::try_from(value.as_str()).map_err(|_| InjectError::BadValue)?;
                (name.clone(), v)
            }
            Injection::Query { .. } | Injection::PathPrefix { .. } => return Ok(None),
        };
        v.set_sensitive(true);
        Ok(Some((name, v)))
    }

    /// Header that carries the credential, which a client may not set.
    pub fn injected_header(&self) -> Option<&HeaderName> {
        match &self.inject {
            Injection::Header { name, .. } => Some(name),
            _ => None,
        }
    }
}

/// Does this `&`-separated query pair set `param`, as any server might
/// read it? Servers differ, so every reading counts: `;` as a separator
/// (`a=1;key=x`), any case (`KEY`), `+` as a space (`key+`), array forms
/// (`key[]`, `key[0]`), percent-encoding (`%6Bey`, also twice), stray
/// whitespace or control characters around the name, and PHP's `.` and
/// space for `_`.
pub fn names_param(pair: &str, param: &str) -> bool {
    let want = normalize_param(param);
    pair.split(';').any(|seg| {
        let mut key = seg.split('=').next().unwrap_or("").replace('+', " ");
        for _ in 0..3 {
            let decoded = percent_decode_str(&key).decode_utf8_lossy().into_owned();
            if decoded == key {
                break;
            }
            key = decoded.replace('+', " ");
        }
        normalize_param(&key) == want
    })
}

fn normalize_param(k: &str) -> String {
    let k = k.split('[').next().unwrap_or("");
    k.trim_matches(|c: char| c.is_whitespace() || c.is_control())
        .chars()
        .flat_map(char::to_lowercase)
        .map(|c| if c == '.' || c == ' ' { '_' } else { c })
        .collect()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InjectError {
    #[error("credential has no value for this provider's injection style")]
    MissingToken,
    #[error("credential value is not valid in a header")]
    BadValue,
    #[error("upstream URI could not be built")]
    BadUri,
}

/// Path segment characters that must be escaped when sidekey writes them.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'\\')
    .add(b'^')
    .add(b'|');
const QUERY: &AsciiSet = &SEGMENT.add(b'&').add(b'=').add(b'+').add(b';');

/// A path under a provider that passed every traversal check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyPath {
    /// As received (still percent-encoded); empty or starting with `/`.
    pub raw: String,
    /// Percent-decoded; `None` when nothing was escaped, when it is `raw`
    /// (nearly every path: no second copy per request).
    decoded: Option<String>,
}

impl ProxyPath {
    /// Percent-decoded, for allow-list matching and audit.
    pub fn decoded(&self) -> &str {
        self.decoded.as_deref().unwrap_or(&self.raw)
    }

    pub fn into_decoded(self) -> String {
        self.decoded.unwrap_or(self.raw)
    }
}

/// `.` and `..`, also with a `;param` suffix: servlet containers (Tomcat,
/// Jetty) read `..;` as `..`, which would step out of an allow-listed prefix.
fn is_dot_segment(s: &str) -> bool {
    matches!(s.split(';').next(), Some("." | ".."))
}

/// Decoding rounds `check_path` follows before refusing a path.
const MAX_DECODES: usize = 4;

/// Validates the part of a request path after `/v1/proxy/{provider}`.
///
/// Refuses anything that could leave `base_url` once some server along the
/// way decodes it: dot segments in any encoding (`..`, `%2e%2e`, double
/// encoding), encoded slashes, backslashes, NUL and control bytes, invalid
/// UTF-8 (overlong forms), empty segments (`//host`) and a leading `@`.
pub fn check_path(rest: &str) -> Result<ProxyPath, &'static str> {
    if rest.is_empty() {
        return Ok(ProxyPath {
            raw: String::new(),
            decoded: None,
        });
    }
    if !rest.starts_with('/') {
        return Err("path must start with /");
    }
    if rest.bytes().any(|b| b == b'\\' || b <= 0x20 || b >= 0x7f) {
        return Err("backslash, space or control character in path");
    }
    let any_escape = rest.as_bytes().contains(&b'%');
    let mut decoded = any_escape.then(|| String::with_capacity(rest.len()));
    let mut segments = rest[1..].split('/').enumerate().peekable();
    while let Some((i, seg)) = segments.next() {
        // A trailing slash is an empty last segment and harmless; an empty
        // segment anywhere else is `//`, which some servers read as a host.
        if seg.is_empty() && segments.peek().is_some() {
            return Err("empty path segment");
        }
        // Printable ASCII without a backslash (checked above) and no escape
        // means what it says: nearly every real segment skips decoding.
        let escaped = any_escape && seg.contains('%');
        let meaning = if escaped {
            fully_decoded(seg)?
        } else {
            std::borrow::Cow::Borrowed(seg)
        };
        if is_dot_segment(&meaning) {
            return Err("dot segment in path");
        }
        if i == 0 && meaning.starts_with('@') {
            return Err("path looks like a user@host authority");
        }
        let Some(decoded) = &mut decoded else {
            continue;
        };
        decoded.push('/');
        if escaped {
            // Allow-list matching uses one round of decoding, which is what
            // the upstream will see.
            let once = percent_decode_str(seg)
                .decode_utf8()
                .map_err(|_| "invalid UTF-8 in path")?;
            decoded.push_str(&once);
        } else {
            decoded.push_str(seg);
        }
    }
    Ok(ProxyPath {
        raw: rest.to_owned(),
        decoded,
    })
}

/// What an escaped path segment finally means: decoded until stable, so
/// double and triple encodings are judged by their meaning; more than
/// MAX_DECODES levels is refused outright (no legitimate path is encoded
/// that often), and so is a meaning with a slash, backslash or control
/// character, or a dot segment at any level.
fn fully_decoded(seg: &str) -> Result<std::borrow::Cow<'_, str>, &'static str> {
    let mut cur: std::borrow::Cow<str> = std::borrow::Cow::Borrowed(seg);
    let mut stable = false;
    for _ in 0..MAX_DECODES {
        if is_dot_segment(&cur) {
            return Err("dot segment in path");
        }
        if cur.contains(['/', '\\']) {
            return Err("encoded slash or backslash in path");
        }
        if cur.chars().any(|c| c.is_control()) {
            return Err("control character in path");
        }
        if !cur.contains('%') {
            stable = true;
            break;
        }
        let next = match percent_decode_str(&cur).decode_utf8() {
            Ok(d) => d.into_owned(),
            Err(_) => return Err("invalid UTF-8 in path"),
        };
        if next == cur {
            stable = true;
            break;
        }
        cur = std::borrow::Cow::Owned(next);
    }
    if !stable
        && percent_decode_str(&cur)
            .decode_utf8()
            .map_or(true, |d| d != cur)
    {
        return Err("path is percent-encoded too many times");
    }
    if cur.contains(['/', '\\']) || cur.chars().any(|c| c.is_control()) {
        return Err("encoded slash, backslash or control character in path");
    }
    Ok(cur)
}

/// All configured providers by name.
#[derive(Debug, Default)]
pub struct Providers {
    /// foldhash rather than SipHash: looked up several times per request,
    /// keyed by names from the operator's config.
    map: HashMap<String, Arc<Provider>, foldhash::fast::RandomState>,
    names: Vec<String>,
}

impl Providers {
    pub fn from_config(cfg: &Config) -> Result<Providers, Vec<String>> {
        let mut problems = Vec::new();
        let mut map = HashMap::with_hasher(foldhash::fast::RandomState::default());
        let mut names = Vec::new();
        for (name, pc) in &cfg.providers {
            match resolve(name, pc) {
                Ok(p) => {
                    names.push(name.clone());
                    map.insert(name.clone(), Arc::new(p));
                }
                Err(mut e) => problems.append(&mut e),
            }
        }
        if problems.is_empty() {
            Ok(Providers { map, names })
        } else {
            Err(problems)
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Provider>> {
        self.map.get(name)
    }

    /// Provider names in config order (sorted).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Provider>> {
        self.names.iter().filter_map(|n| self.map.get(n))
    }

    pub fn label(&self, name: &str) -> ProviderLabel {
        match self.get(name) {
            Some(p) => p.label(),
            None => ProviderLabel::unknown(name),
        }
    }
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
    match u.scheme() {
        "https" => {}
        "http" if allow_http || is_loopback_url(&u) => {}
        "http" => {
            p.push(format!("{sec} {key} = {value:?}: http:// is only allowed for loopback hosts; use https:// or set allow_http = true on this provider"));
            return None;
        }
        other => {
            p.push(format!(
                "{sec} {key}: scheme {other:?} is not http or https"
            ));
            return None;
        }
    }
    if !u.username().is_empty() || u.password().is_some() {
        p.push(format!("{sec} {key} must not contain user:password@"));
    }
    if u.fragment().is_some() {
        p.push(format!("{sec} {key} must not contain a #fragment"));
    }
    Some(u)
}

fn resolve(name: &str, pc: &ProviderConfig) -> Result<Provider, Vec<String>> {
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
    let base = match base_str {
        None => {
            p.push(format!(
                "{sec} base_url is required (or a preset: {})",
                PRESETS.join(", ")
            ));
            None
        }
        Some(b) => parse_url(&sec, "base_url", &b, pc.allow_http, &mut p).and_then(|u| {
            if u.query().is_some() {
                p.push(format!("{sec} base_url must not contain a query string"));
                return None;
            }
            // `host[:port]`, an IPv6 address in brackets.
            let host = match u.host() {
                Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
                _ => u.host_str()?.to_owned(),
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
                p.push(format!(
                    "{sec} base_url has a scheme, host or port sidekey cannot use: {origin}"
                ));
                return None;
            };
            // Kept for the process, once per configured provider: a
            // request's URI then takes the authority without a copy or a
            // shared reference count. Checked above: `from_static` cannot
            // panic.
            let leaked: &'static str = Box::leak(authority.into_boxed_str());
            let authority = http::uri::Authority::from_static(leaked);
            Some(BaseUrl {
                url: u,
                origin,
                path,
                scheme,
                authority,
            })
        }),
    };

    let token_url = pc
        .token_url
        .clone()
        .or_else(|| {
            preset
                .as_ref()
                .and_then(|ps| ps.token_url.map(str::to_owned))
        })
        .and_then(|u| parse_url(&sec, "token_url", &u, pc.allow_http, &mut p));
    let authorize_url = pc
        .authorize_url
        .clone()
        .or_else(|| {
            preset
                .as_ref()
                .and_then(|ps| ps.authorize_url.map(str::to_owned))
        })
        .and_then(|u| parse_url(&sec, "authorize_url", &u, pc.allow_http, &mut p));

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
        None | Some("body") => ClientAuth::Body,
        Some("basic") => ClientAuth::Basic,
        Some(o) => {
            p.push(format!(
                "{sec} client_auth = {o:?}: use \"body\" or \"basic\""
            ));
            ClientAuth::Body
        }
    };
    let grant = match pc.grant.as_deref() {
        None | Some("authorization_code") | Some("refresh_token") => Grant::AuthorizationCode,
        Some("client_credentials") => Grant::ClientCredentials,
        Some(o) => {
            p.push(format!(
                "{sec} grant = {o:?}: use \"authorization_code\" (default) or \"client_credentials\""
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
        token_params: pc
            .token_params
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        conventions,
        allow_http: pc.allow_http,
        notes,
    })
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) never cross a proxy. A pattern,
/// so that a filter checking other names too makes one `match`.
#[macro_export]
macro_rules! hop_by_hop_names {
    () => {
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    };
}

pub fn is_hop_by_hop(h: &HeaderName) -> bool {
    matches!(h.as_str(), hop_by_hop_names!())
}

#[cfg(test)]
mod tests;
