//! Providers: presets, the resolved per-provider settings, path mapping and
//! credential injection.
//!
//! Everything a request needs about a provider is computed once at start-up
//! (URLs parsed, globs compiled, secrets loaded) so the request path only
//! looks things up.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use globset::GlobMatcher;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use url::Url;

use sidekey_base::config::Config;
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
    /// A signed client assertion (RFC 7523 §2.2); no secret is sent.
    PrivateKeyJwt,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant {
    /// Per-user tokens from the OAuth code flow or the admin API.
    AuthorizationCode,
    /// One app-level token per provider, fetched with the client id/secret.
    ClientCredentials,
    /// A token per (provider, subject), got with a signed assertion
    /// (RFC 7523 §2.1): service accounts acting for each caller.
    JwtBearer,
}

impl Grant {
    /// Whether sidekey gets this grant's tokens itself, with nothing
    /// stored first.
    pub fn fetched_on_demand(self) -> bool {
        matches!(self, Grant::ClientCredentials | Grant::JwtBearer)
    }
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

mod connection;
mod describe;
mod presets;
mod resolve;
pub mod signed_callback;

pub use connection::{ConnectionError, ConnectionField, ConnectionFrom, UrlTemplate};
pub use presets::PRESETS;
use resolve::{base_of, resolve, url_rules};

/// How a token request's parameters are sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenFormat {
    /// `application/x-www-form-urlencoded` (RFC 6749).
    Form,
    /// A JSON object (Notion's documented form).
    Json,
}

/// The URLs of a provider that carry `{field}` placeholders.
#[derive(Clone, Debug, Default)]
pub struct Templates {
    pub base_url: Option<UrlTemplate>,
    pub token_url: Option<UrlTemplate>,
    pub authorize_url: Option<UrlTemplate>,
}

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
    /// Whether the authorize URL carries an S256 code challenge (and the
    /// code exchange its verifier).
    pub pkce: bool,
    pub token_format: TokenFormat,
    /// Fixed headers sent on every proxied call unless the client sent
    /// its own (Notion-Version, GitHub's Accept).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The provider whose stored credential (and its refresh) this one
    /// uses; `None`: its own.
    pub credential_from: Option<String>,
    /// Declared per-connection values.
    pub connection: Vec<ConnectionField>,
    pub templates: Templates,
    /// Documented: each refresh answers a new refresh token.
    pub rotates_refresh_token: bool,
    /// The provider signs its callback query (Shopify's `hmac`), checked
    /// before the code is exchanged.
    pub signed_callback: bool,
    /// JWT assertions (`grant = "jwt_bearer"`, `client_auth =
    /// "private_key_jwt"`): key, algorithm, audience, subject rule.
    pub jwt: Option<Arc<crate::jwt::JwtSettings>>,
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

    /// The name the credential is stored under: `credential_from`'s, or
    /// this provider's own.
    pub fn credential_name(&self) -> &str {
        self.credential_from.as_deref().unwrap_or(&self.name)
    }

    /// The base URL as configured: its template (`https://{subdomain}…`)
    /// when it has placeholders, for descriptions.
    pub fn base_url_text(&self) -> String {
        match &self.templates.base_url {
            Some(t) => t.text.clone(),
            None => self.base.url.to_string(),
        }
    }

    pub fn connection_field(&self, name: &str) -> Option<&ConnectionField> {
        self.connection.iter().find(|f| f.name == name)
    }

    /// Checks values given for a connection (credential PUT, OAuth start):
    /// each names a declared field and matches its pattern, and every URL
    /// whose placeholders they fill passes the `base_url` rules.
    pub fn check_connection(
        &self,
        values: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), ConnectionError> {
        for (k, v) in values {
            let f = self
                .connection_field(k)
                .ok_or_else(|| ConnectionError::Unknown(k.clone()))?;
            if !f.matches(v) {
                return Err(ConnectionError::Bad(k.clone()));
            }
        }
        for t in [
            &self.templates.base_url,
            &self.templates.token_url,
            &self.templates.authorize_url,
        ]
        .into_iter()
        .flatten()
        {
            match self.build_url(t, values) {
                Ok(_) | Err(ConnectionError::Missing(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn build_url(
        &self,
        t: &UrlTemplate,
        values: &std::collections::BTreeMap<String, String>,
    ) -> Result<Url, ConnectionError> {
        t.build(&self.connection, values, |u| {
            url_rules(u, self.allow_http).is_ok() && u.query().is_none()
        })
    }

    /// The upstream location for a credential's connection values.
    pub fn base_for(
        &self,
        values: &std::collections::BTreeMap<String, String>,
    ) -> Result<std::borrow::Cow<'_, BaseUrl>, ConnectionError> {
        match &self.templates.base_url {
            None => Ok(std::borrow::Cow::Borrowed(&self.base)),
            Some(t) => {
                let u = self.build_url(t, values)?;
                let field = || ConnectionError::Bad(t.fields().next().unwrap_or_default().into());
                base_of(u, false)
                    .map(std::borrow::Cow::Owned)
                    .map_err(|_| field())
            }
        }
    }

    /// The token endpoint for a connection's values.
    pub fn token_url_for(
        &self,
        values: &std::collections::BTreeMap<String, String>,
    ) -> Result<Option<Url>, ConnectionError> {
        match &self.templates.token_url {
            None => Ok(self.token_url.clone()),
            Some(t) => self.build_url(t, values).map(Some),
        }
    }

    /// The authorize endpoint for a connection's values.
    pub fn authorize_url_for(
        &self,
        values: &std::collections::BTreeMap<String, String>,
    ) -> Result<Option<Url>, ConnectionError> {
        match &self.templates.authorize_url {
            None => Ok(self.authorize_url.clone()),
            Some(t) => self.build_url(t, values).map(Some),
        }
    }

    /// The upstream URI for a checked path and the client's query string.
    /// `token` is needed only for query and path-prefix injection.
    pub fn upstream_uri(
        &self,
        path: &ProxyPath,
        query: Option<&str>,
        token: Option<&Secret>,
    ) -> Result<Uri, InjectError> {
        self.upstream_uri_at(&self.base, path, query, token)
    }

    /// [`Provider::upstream_uri`] under a given base (a connection's).
    pub fn upstream_uri_at(
        &self,
        base: &BaseUrl,
        path: &ProxyPath,
        query: Option<&str>,
        token: Option<&Secret>,
    ) -> Result<Uri, InjectError> {
        // The path and query; the origin was parsed at start.
        let mut s = String::with_capacity(base.path.len() + path.raw.len() + 64);
        s.push_str(&base.path);
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
        parts.scheme = Some(base.scheme.clone());
        parts.authority = Some(base.authority.clone());
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

    /// The provider whose stored credential `p` uses (and refreshes):
    /// its `credential_from`, else itself. Checked at start to exist.
    pub fn credential_provider(&self, p: &Provider) -> Option<&Arc<Provider>> {
        self.get(p.credential_name())
    }

    pub fn label(&self, name: &str) -> ProviderLabel {
        match self.get(name) {
            Some(p) => p.label(),
            None => ProviderLabel::unknown(name),
        }
    }
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
