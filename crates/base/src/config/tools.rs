//! `[tools.NAME]`, `[mcp_servers.NAME]`, `[vapi]` and `[retell]`: the
//! operation-tool catalogue and the front doors that call it.
//!
//! Tool definitions are checked here as far as the config alone can tell
//! (types, defaults, path placeholders, header names); whether the provider
//! exists is checked where providers are resolved.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::SecretSource;

/// `[tools.NAME]` as written.
#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawTool {
    pub provider: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub description: Option<String>,
    #[serde(default)]
    pub params: BTreeMap<String, RawParam>,
}

#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawParam {
    #[serde(rename = "type")]
    pub ty: Option<String>,
    #[serde(rename = "in")]
    pub location: Option<String>,
    pub required: Option<bool>,
    pub default: Option<Value>,
    #[serde(rename = "enum")]
    pub enum_values: Option<Vec<Value>>,
    pub description: Option<String>,
}

/// Where a parameter goes in the upstream request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamIn {
    /// One percent-encoded path segment, in place of `{name}`.
    Path,
    Query,
    /// A top-level field of a JSON object body.
    Body,
    Header,
}

impl ParamIn {
    pub fn as_str(self) -> &'static str {
        match self {
            ParamIn::Path => "path",
            ParamIn::Query => "query",
            ParamIn::Body => "body",
            ParamIn::Header => "header",
        }
    }
}

/// A parameter's JSON type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamType {
    String,
    Integer,
    Number,
    Boolean,
    Array,
    Object,
}

impl ParamType {
    pub fn as_str(self) -> &'static str {
        match self {
            ParamType::String => "string",
            ParamType::Integer => "integer",
            ParamType::Number => "number",
            ParamType::Boolean => "boolean",
            ParamType::Array => "array",
            ParamType::Object => "object",
        }
    }

    fn parse(s: &str) -> Option<ParamType> {
        Some(match s {
            "string" => ParamType::String,
            "integer" => ParamType::Integer,
            "number" => ParamType::Number,
            "boolean" => ParamType::Boolean,
            "array" => ParamType::Array,
            "object" => ParamType::Object,
            _ => return None,
        })
    }

    /// Whether `v` is of this type (an integer is also a number).
    pub fn admits(self, v: &Value) -> bool {
        match self {
            ParamType::String => v.is_string(),
            ParamType::Integer => v.is_i64() || v.is_u64(),
            ParamType::Number => v.is_number(),
            ParamType::Boolean => v.is_boolean(),
            ParamType::Array => v.is_array(),
            ParamType::Object => v.is_object(),
        }
    }
}

/// One parameter, checked.
#[derive(Clone, Debug)]
pub struct ParamConfig {
    pub ty: ParamType,
    pub location: ParamIn,
    pub required: bool,
    pub default: Option<Value>,
    pub enum_values: Option<Vec<Value>>,
    pub description: Option<String>,
}

/// One operation tool, checked as far as the config alone can tell.
#[derive(Clone, Debug)]
pub struct ToolConfig {
    pub provider: String,
    pub method: http::Method,
    /// Relative to the provider's base URL, with `{name}` placeholders.
    pub path: String,
    pub description: Option<String>,
    pub params: BTreeMap<String, ParamConfig>,
}

/// Names that ElevenLabs, Vapi, Retell and MCP clients all accept as a
/// tool name, and that fit in a URL path segment unescaped.
pub fn valid_tool_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Headers a tool parameter may not set: sidekey's own, the credential's,
/// and those that frame or route the request.
fn reserved_header(name: &str) -> bool {
    matches!(
        name,
        "authorization"
            | "proxy-authorization"
            | "cookie"
            | "host"
            | "content-length"
            | "content-type"
            | "transfer-encoding"
            | "connection"
            | "upgrade"
            | "te"
            | "trailer"
            | "expect"
            | "keep-alive"
    ) || name.starts_with("x-sidekey-")
}

/// The `{name}` placeholders of a path template, in order; `Err` for an
/// unclosed or empty one.
pub fn placeholders(path: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let mut rest = path;
    while let Some(i) = rest.find('{') {
        let after = &rest[i + 1..];
        let Some(j) = after.find('}') else {
            return Err("an unclosed { in path".into());
        };
        let name = &after[..j];
        if name.is_empty() || name.contains('{') {
            return Err("an empty or nested {} in path".into());
        }
        out.push(name);
        rest = &after[j + 1..];
    }
    if rest.contains('}') {
        return Err("a } without { in path".into());
    }
    Ok(out)
}

/// Checks one `[tools.NAME]` section. `sec` names it in messages
/// (`[tools.x]`, or a preset's pack).
pub fn check_tool(sec: &str, name: &str, raw: RawTool, p: &mut Vec<String>) -> Option<ToolConfig> {
    let before = p.len();
    if !valid_tool_name(name) {
        p.push(format!(
            "{sec}: tool names are 1-64 characters of A-Za-z0-9_- (what every voice platform and MCP client accepts)"
        ));
    }
    let provider = match raw.provider {
        Some(pr) if !pr.is_empty() => pr,
        _ => {
            p.push(format!("{sec}: provider is required"));
            String::new()
        }
    };
    let method = match raw
        .method
        .as_deref()
        .map(str::to_ascii_uppercase)
        .as_deref()
    {
        None => http::Method::GET,
        Some("GET") => http::Method::GET,
        Some("POST") => http::Method::POST,
        Some("PUT") => http::Method::PUT,
        Some("PATCH") => http::Method::PATCH,
        Some("DELETE") => http::Method::DELETE,
        Some(other) => {
            p.push(format!(
                "{sec} method: {other:?} is not one of GET, POST, PUT, PATCH, DELETE"
            ));
            http::Method::GET
        }
    };
    let path = raw.path.unwrap_or_default();
    if !path.starts_with('/') {
        p.push(format!(
            "{sec} path: must start with / (it is relative to the provider's base_url)"
        ));
    }
    if path.contains('?') || path.contains('#') {
        p.push(format!(
            "{sec} path: no query or fragment; declare query parameters with in = \"query\""
        ));
    }
    let holes = match placeholders(&path) {
        Ok(h) => h.into_iter().map(str::to_owned).collect::<Vec<_>>(),
        Err(e) => {
            p.push(format!("{sec}: {e}"));
            Vec::new()
        }
    };
    if let Some(d) = &raw.description {
        if d.chars().count() > 1000 || d.chars().any(char::is_control) {
            p.push(format!(
                "{sec} description: at most 1000 characters, no control characters"
            ));
        }
    }
    let mut params = BTreeMap::new();
    for (pname, rp) in raw.params {
        let at = format!("{sec} params.{pname}");
        if pname.is_empty()
            || pname.len() > 64
            || !pname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            p.push(format!(
                "{at}: parameter names are 1-64 characters of A-Za-z0-9_.-"
            ));
        }
        let ty = match rp.ty.as_deref() {
            None => ParamType::String,
            Some(t) => ParamType::parse(t).unwrap_or_else(|| {
                p.push(format!(
                    "{at} type: {t:?} is not one of string, integer, number, boolean, array, object"
                ));
                ParamType::String
            }),
        };
        let location = match rp.location.as_deref() {
            None if holes.contains(&pname) => ParamIn::Path,
            None if method == http::Method::GET || method == http::Method::DELETE => ParamIn::Query,
            None => ParamIn::Body,
            Some("path") => ParamIn::Path,
            Some("query") => ParamIn::Query,
            Some("body") => ParamIn::Body,
            Some("header") => ParamIn::Header,
            Some(other) => {
                p.push(format!(
                    "{at} in: {other:?} is not one of path, query, body, header"
                ));
                ParamIn::Query
            }
        };
        match location {
            ParamIn::Path => {
                if !holes.contains(&pname) {
                    p.push(format!(
                        "{at}: in = \"path\" but the path has no {{{pname}}}"
                    ));
                }
                if matches!(
                    ty,
                    ParamType::Array | ParamType::Object | ParamType::Boolean
                ) {
                    p.push(format!(
                        "{at}: a path parameter is a string, integer or number"
                    ));
                }
            }
            ParamIn::Header => {
                let lower = pname.to_ascii_lowercase();
                if http::HeaderName::from_bytes(lower.as_bytes()).is_err()
                    || reserved_header(&lower)
                {
                    p.push(format!(
                        "{at}: {pname:?} cannot be a header parameter (not a header name, or one sidekey sets itself)"
                    ));
                }
                if matches!(ty, ParamType::Array | ParamType::Object) {
                    p.push(format!("{at}: a header parameter is a scalar"));
                }
            }
            ParamIn::Query => {
                if ty == ParamType::Object {
                    p.push(format!(
                        "{at}: a query parameter is a scalar or an array of scalars"
                    ));
                }
            }
            ParamIn::Body => {}
        }
        if let Some(vals) = &rp.enum_values {
            if vals.is_empty() {
                p.push(format!("{at} enum: give at least one value"));
            }
            if let Some(v) = vals.iter().find(|v| !ty.admits(v)) {
                p.push(format!(
                    "{at} enum: {v} is not a {} (the parameter's type)",
                    ty.as_str()
                ));
            }
        }
        if let Some(d) = &rp.default {
            if !ty.admits(d) {
                p.push(format!(
                    "{at} default: {d} is not a {} (the parameter's type)",
                    ty.as_str()
                ));
            } else if rp.enum_values.as_ref().is_some_and(|e| !e.contains(d)) {
                p.push(format!("{at} default: not one of the enum's values"));
            }
        }
        if let Some(d) = &rp.description {
            if d.chars().count() > 500 || d.chars().any(char::is_control) {
                p.push(format!(
                    "{at} description: at most 500 characters, no control characters"
                ));
            }
        }
        params.insert(
            pname,
            ParamConfig {
                ty,
                location,
                // A path parameter without a default cannot be left out.
                required: rp
                    .required
                    .unwrap_or(location == ParamIn::Path && rp.default.is_none()),
                default: rp.default,
                enum_values: rp.enum_values,
                description: rp.description,
            },
        );
    }
    for h in &holes {
        match params.get(h) {
            Some(pc) if pc.location == ParamIn::Path => {}
            _ => p.push(format!(
                "{sec} path: {{{h}}} has no parameter with in = \"path\" in [{}.params]",
                sec.trim_matches(['[', ']'])
            )),
        }
    }
    if method == http::Method::GET && params.values().any(|pc| pc.location == ParamIn::Body) {
        p.push(format!(
            "{sec}: a GET request has no body; use in = \"query\""
        ));
    }
    (p.len() == before).then_some(ToolConfig {
        provider,
        method,
        path,
        description: raw.description,
        params,
    })
}

/// Parses a preset's tool pack (TOML text of `[tools.NAME]` sections, as a
/// user would write them). A problem in one is a bug in sidekey, reported
/// with the pack's name.
pub fn parse_pack(pack: &str, text: &str) -> Result<BTreeMap<String, ToolConfig>, Vec<String>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Pack {
        tools: BTreeMap<String, RawTool>,
    }
    let pack_raw: Pack =
        toml::from_str(text).map_err(|e| vec![format!("tool pack {pack}: {}", e.message())])?;
    let mut p = Vec::new();
    let mut out = BTreeMap::new();
    for (name, raw) in pack_raw.tools {
        let sec = format!("[{pack} tool {name}]");
        if let Some(t) = check_tool(&sec, &name, raw, &mut p) {
            out.insert(name, t);
        }
    }
    if p.is_empty() { Ok(out) } else { Err(p) }
}

/// `[mcp_servers.NAME]` as written.
#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawMcpServer {
    pub url: Option<String>,
    pub provider: Option<String>,
    pub tools: Option<Vec<String>>,
    pub allow_http: Option<bool>,
}

/// An upstream MCP server whose tools sidekey relays with each caller's
/// own credential.
#[derive(Clone, Debug)]
pub struct McpServerConfig {
    pub url: url::Url,
    pub provider: String,
    /// Globs of upstream tool names as written; empty means all.
    pub tools: Vec<String>,
    /// `tools` compiled once; `None` means all.
    pub matcher: Option<globset::GlobSet>,
}

impl McpServerConfig {
    /// Whether an upstream tool of this name is offered.
    pub fn offers(&self, tool: &str) -> bool {
        self.matcher.as_ref().is_none_or(|m| m.is_match(tool))
    }
}

pub fn check_mcp_server(
    name: &str,
    raw: RawMcpServer,
    p: &mut Vec<String>,
) -> Option<McpServerConfig> {
    let sec = format!("[mcp_servers.{name}]");
    let before = p.len();
    if name.is_empty()
        || name.len() > 32
        || name.contains("__")
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        p.push(format!(
            "{sec}: server names are 1-32 characters of A-Za-z0-9_- without a double underscore (it separates the server from the tool: notion__search)"
        ));
    }
    let allow_http = raw.allow_http.unwrap_or(false);
    let url = match raw.url.as_deref().map(url::Url::parse) {
        Some(Ok(u)) if u.scheme() == "https" || (u.scheme() == "http" && allow_http) => {
            if u.fragment().is_some() || !u.username().is_empty() || u.password().is_some() {
                p.push(format!("{sec} url: no fragment and no user:password"));
            }
            Some(u)
        }
        Some(Ok(_)) => {
            p.push(format!(
                "{sec} url: must be https:// (allow_http = true for a loopback test server)"
            ));
            None
        }
        Some(Err(e)) => {
            p.push(format!("{sec} url: not a URL ({e})"));
            None
        }
        None => {
            p.push(format!("{sec}: url is required"));
            None
        }
    };
    let provider = raw.provider.unwrap_or_default();
    if provider.is_empty() {
        p.push(format!(
            "{sec}: provider is required (whose per-user credential the server is called with)"
        ));
    }
    let tools = raw.tools.unwrap_or_default();
    let mut set = globset::GlobSetBuilder::new();
    for g in &tools {
        match globset::Glob::new(g) {
            Ok(glob) => {
                set.add(glob);
            }
            Err(_) => p.push(format!("{sec} tools: {g:?} is not a valid glob")),
        }
    }
    let matcher = if tools.is_empty() {
        None
    } else {
        match set.build() {
            Ok(m) => Some(m),
            Err(e) => {
                p.push(format!("{sec} tools: {e}"));
                None
            }
        }
    };
    if p.len() != before {
        return None;
    }
    Some(McpServerConfig {
        url: url?,
        provider,
        tools,
        matcher,
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawVapi {
    pub secret_env: Option<String>,
    pub secret_file: Option<String>,
    pub hmac_secret_env: Option<String>,
    pub hmac_secret_file: Option<String>,
    pub hmac_algorithm: Option<String>,
    pub hmac_signature_header: Option<String>,
    pub hmac_timestamp_header: Option<String>,
    pub hmac_signature_prefix: Option<String>,
    pub hmac_payload_format: Option<String>,
    pub secret_header: Option<String>,
    pub session_variable: Option<String>,
    pub signature_tolerance_secs: Option<u64>,
    pub assistant_id: Option<String>,
}

/// The hash of Vapi's HMAC credential (`algorithm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HmacAlgorithm {
    Sha256,
    Sha512,
    Sha1,
}

/// Vapi's HMAC credential, as its `HMACAuthenticationPlan` describes it:
/// which hash, which headers, and what is signed.
#[derive(Clone, Debug)]
pub struct VapiHmac {
    pub algorithm: HmacAlgorithm,
    pub signature_header: http::HeaderName,
    pub timestamp_header: http::HeaderName,
    /// Stripped from the signature before decoding (`sha256=`).
    pub signature_prefix: String,
    /// The signed payload, split at its placeholders.
    pub payload: Vec<PayloadPart>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PayloadPart {
    Text(String),
    Timestamp,
    Body,
    Method,
}

impl VapiHmac {
    fn from_raw(raw: &RawVapi, p: &mut Vec<String>) -> VapiHmac {
        let algorithm = match raw.hmac_algorithm.as_deref().unwrap_or("sha256") {
            "sha256" => HmacAlgorithm::Sha256,
            "sha512" => HmacAlgorithm::Sha512,
            "sha1" => HmacAlgorithm::Sha1,
            other => {
                p.push(format!(
                    "[vapi] hmac_algorithm: {other:?} is not one of sha256, sha512, sha1 (Vapi's choices)"
                ));
                HmacAlgorithm::Sha256
            }
        };
        let header = |v: &Option<String>, default: &'static str, key: &str, p: &mut Vec<String>| {
            let name = v.as_deref().unwrap_or(default).trim().to_ascii_lowercase();
            http::HeaderName::from_bytes(name.as_bytes()).unwrap_or_else(|_| {
                p.push(format!("[vapi] {key}: {name:?} is not a header name"));
                http::HeaderName::from_static(default)
            })
        };
        let signature_header = header(
            &raw.hmac_signature_header,
            "x-signature",
            "hmac_signature_header",
            p,
        );
        let timestamp_header = header(
            &raw.hmac_timestamp_header,
            "x-timestamp",
            "hmac_timestamp_header",
            p,
        );
        let format = raw
            .hmac_payload_format
            .as_deref()
            .unwrap_or("{timestamp}.{body}");
        let payload = parse_payload(format).unwrap_or_else(|e| {
            p.push(format!("[vapi] hmac_payload_format: {e}"));
            Vec::new()
        });
        VapiHmac {
            algorithm,
            signature_header,
            timestamp_header,
            signature_prefix: raw.hmac_signature_prefix.clone().unwrap_or_default(),
            payload,
        }
    }
}

/// `{timestamp}.{body}` and the like. The body and the timestamp must both
/// be signed: without the body anything could be sent under a signature,
/// and without the timestamp a captured request could be replayed.
fn parse_payload(format: &str) -> Result<Vec<PayloadPart>, String> {
    let mut parts = Vec::new();
    let mut rest = format;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(PayloadPart::Text(rest[..open].to_owned()));
        }
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("{format:?} has a `{{` without its `}}`"))?;
        let name = &rest[open + 1..open + close];
        parts.push(match name {
            "timestamp" => PayloadPart::Timestamp,
            "body" => PayloadPart::Body,
            "method" => PayloadPart::Method,
            other => {
                return Err(format!(
                    "{{{other}}} is not supported; use {{timestamp}}, {{body}} and {{method}}"
                ));
            }
        });
        rest = &rest[open + close + 1..];
    }
    if !rest.is_empty() {
        parts.push(PayloadPart::Text(rest.to_owned()));
    }
    if !parts.contains(&PayloadPart::Body) || !parts.contains(&PayloadPart::Timestamp) {
        return Err(format!(
            "{format:?} must contain both {{timestamp}} and {{body}} (a signature without the body proves nothing, one without the timestamp can be replayed)"
        ));
    }
    Ok(parts)
}

/// `[vapi]`: how Vapi's server messages are authenticated.
#[derive(Clone, Debug)]
pub struct VapiConfig {
    /// Compared with `X-Vapi-Secret` or `Authorization: Bearer`.
    pub secret: SecretSource,
    /// The key of Vapi's HMAC credential.
    pub hmac_secret: SecretSource,
    pub hmac: VapiHmac,
    /// Where the shared secret comes: unset, `X-Vapi-Secret` or
    /// `Authorization` (with or without `Bearer`); set, that header only.
    pub secret_header: Option<http::HeaderName>,
    pub session_variable: String,
    pub tolerance_secs: i64,
    /// The assistant an `assistant-request` (inbound phone call) answers
    /// with; unset: only `assistantOverrides` (the number's own assistant).
    pub assistant_id: Option<String>,
}

impl VapiConfig {
    pub fn from_raw(dir: &Path, raw: RawVapi, p: &mut Vec<String>) -> VapiConfig {
        let hmac = VapiHmac::from_raw(&raw, p);
        let secret = SecretSource::from_parts(
            dir,
            raw.secret_file,
            raw.secret_env,
            None,
            "[vapi] secret_env / secret_file",
            p,
        );
        let hmac_secret = SecretSource::from_parts(
            dir,
            raw.hmac_secret_file,
            raw.hmac_secret_env,
            None,
            "[vapi] hmac_secret_env / hmac_secret_file",
            p,
        );
        let secret_header = raw.secret_header.as_deref().and_then(|h| {
            let h = h.trim().to_ascii_lowercase();
            http::HeaderName::from_bytes(h.as_bytes())
                .map_err(|_| p.push(format!("[vapi] secret_header: {h:?} is not a header name")))
                .ok()
        });
        let session_variable = raw
            .session_variable
            .unwrap_or_else(|| "sidekey_session".into());
        if !valid_variable(&session_variable) {
            p.push("[vapi] session_variable: 1-64 characters of A-Za-z0-9_".into());
        }
        VapiConfig {
            secret,
            hmac_secret,
            hmac,
            secret_header,
            session_variable,
            tolerance_secs: raw.signature_tolerance_secs.unwrap_or(300) as i64,
            assistant_id: raw.assistant_id.filter(|a| !a.trim().is_empty()),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawRetell {
    pub api_key_env: Option<String>,
    pub api_key_file: Option<String>,
    pub session_variable: Option<String>,
    pub signature_tolerance_secs: Option<u64>,
}

/// `[retell]`: the API key Retell signs its requests with.
#[derive(Clone, Debug)]
pub struct RetellConfig {
    pub api_key: SecretSource,
    pub session_variable: String,
    pub tolerance_secs: i64,
}

impl RetellConfig {
    pub fn from_raw(dir: &Path, raw: RawRetell, p: &mut Vec<String>) -> RetellConfig {
        let api_key = SecretSource::from_parts(
            dir,
            raw.api_key_file,
            raw.api_key_env,
            None,
            "[retell] api_key_env / api_key_file",
            p,
        );
        let session_variable = raw
            .session_variable
            .unwrap_or_else(|| "sidekey_session".into());
        if !valid_variable(&session_variable) {
            p.push("[retell] session_variable: 1-64 characters of A-Za-z0-9_".into());
        }
        RetellConfig {
            api_key,
            session_variable,
            tolerance_secs: raw.signature_tolerance_secs.unwrap_or(300) as i64,
        }
    }
}

fn valid_variable(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> RawTool {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn a_tool_with_every_kind_of_parameter() {
        let mut p = Vec::new();
        let t = check_tool(
            "[tools.t]",
            "t",
            raw(r#"
provider = "google"
path = "/calendar/v3/calendars/{calendar_id}/events"
[params]
calendar_id = { type = "string", default = "primary" }
maxResults = { type = "integer", in = "query", default = 5 }
X-Trace = { in = "header" }
"#),
            &mut p,
        )
        .unwrap();
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(t.params["calendar_id"].location, ParamIn::Path);
        assert!(!t.params["calendar_id"].required);
        assert_eq!(t.params["maxResults"].ty, ParamType::Integer);
        assert_eq!(t.params["X-Trace"].location, ParamIn::Header);
    }

    #[test]
    fn mistakes_are_named() {
        let mut p = Vec::new();
        let t = check_tool(
            "[tools.bad]",
            "bad",
            raw(r#"
provider = "google"
method = "GET"
path = "/x/{id}/{missing}"
[params]
id = { type = "object", in = "path" }
n = { type = "integer", default = "five" }
authorization = { in = "header" }
b = { in = "body" }
"#),
            &mut p,
        );
        assert!(t.is_none());
        let all = p.join("\n");
        for needle in [
            "{missing} has no parameter",
            "params.id: a path parameter",
            "params.n default",
            "params.authorization",
            "a GET request has no body",
        ] {
            assert!(all.contains(needle), "{needle} not in {all}");
        }
    }

    #[test]
    fn placeholders_in_order() {
        assert_eq!(placeholders("/a/{x}/b/{y}").unwrap(), vec!["x", "y"]);
        assert!(placeholders("/a/{x").is_err());
        assert!(placeholders("/a/x}").is_err());
        assert!(placeholders("/a/{}").is_err());
    }
}
