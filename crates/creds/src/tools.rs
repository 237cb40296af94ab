//! The operation-tool catalogue: named calls with typed parameters, each
//! one request to one provider. Every front door (`/v1/tools/{name}`, MCP,
//! Vapi, Retell) asks the catalogue for a tool and has it build the
//! request; the proxy's phases then run on that request unchanged.
//!
//! A tool builds requests only from its template and the declared
//! parameters: the LLM never writes a path. A path parameter is one
//! percent-encoded segment, so `../`, `%2f`, `?` and `#` in a value cannot
//! reach another endpoint.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{HeaderName, HeaderValue, Method};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Map, Value, json};

use crate::providers::{Providers, check_path};
use sidekey_base::config::{Config, ParamConfig, ParamIn, ParamType, ToolConfig, parse_pack};

/// One operation tool, resolved: its provider exists.
#[derive(Debug)]
pub struct Tool {
    pub name: String,
    pub provider: String,
    pub method: Method,
    /// Template relative to the provider's base URL (`/x/{id}`).
    pub path: String,
    pub description: String,
    pub params: BTreeMap<String, ParamConfig>,
    /// The preset tool this one was enabled from (`slack.post_message`).
    pub preset_tool: Option<String>,
}

/// The upstream request a tool call makes, before credential injection.
#[derive(Debug)]
pub struct Built {
    pub method: Method,
    /// Path relative to the base URL, every parameter encoded.
    pub path: String,
    pub query: Option<String>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// A JSON object, when the tool has body parameters.
    pub body: Option<Vec<u8>>,
}

/// Why arguments were refused; each message names the parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgError {
    NotAnObject,
    Missing(String),
    WrongType(String, &'static str),
    NotInEnum(String, String),
    Undeclared(String, String),
    /// A path parameter whose value cannot be one path segment.
    BadSegment(String),
    BadHeader(String),
}

impl ArgError {
    /// One sentence for the agent and the caller.
    pub fn message(&self) -> String {
        match self {
            ArgError::NotAnObject => "The tool's arguments must be a JSON object.".into(),
            ArgError::Missing(p) => format!("The argument `{p}` is required."),
            ArgError::WrongType(p, t) => format!("The argument `{p}` must be {t}."),
            ArgError::NotInEnum(p, vals) => {
                format!("The argument `{p}` must be one of: {vals}.")
            }
            ArgError::Undeclared(p, known) if known.is_empty() => {
                format!("`{p}` is not an argument of this tool; it takes none.")
            }
            ArgError::Undeclared(p, known) => {
                format!("`{p}` is not an argument of this tool; it takes: {known}.")
            }
            ArgError::BadSegment(p) => format!(
                "The argument `{p}` cannot be used in the request path (empty, a dot segment, or a slash in any encoding)."
            ),
            ArgError::BadHeader(p) => {
                format!("The argument `{p}` is not a valid header value.")
            }
        }
    }

    /// The parameter named, if any.
    pub fn param(&self) -> Option<&str> {
        match self {
            ArgError::NotAnObject => None,
            ArgError::Missing(p)
            | ArgError::WrongType(p, _)
            | ArgError::NotInEnum(p, _)
            | ArgError::Undeclared(p, _)
            | ArgError::BadSegment(p)
            | ArgError::BadHeader(p) => Some(p),
        }
    }
}

impl std::fmt::Display for ArgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for ArgError {}

/// Everything but the unreserved characters: a value is one segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn article(t: ParamType) -> &'static str {
    match t {
        ParamType::String => "a string",
        ParamType::Integer => "an integer",
        ParamType::Number => "a number",
        ParamType::Boolean => "true or false",
        ParamType::Array => "an array",
        ParamType::Object => "a JSON object",
    }
}

/// A scalar as text for a path, query or header.
fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Tool {
    /// Builds the upstream request from the caller's arguments. `args` is
    /// the body the agent sent: a JSON object (or nothing, for a tool
    /// without required parameters).
    pub fn build(&self, args: &Value) -> Result<Built, ArgError> {
        let empty = Map::new();
        let args = match args {
            Value::Object(m) => m,
            Value::Null => &empty,
            _ => return Err(ArgError::NotAnObject),
        };
        if let Some(k) = args.keys().find(|k| !self.params.contains_key(*k)) {
            let known: Vec<&str> = self.params.keys().map(String::as_str).collect();
            return Err(ArgError::Undeclared(
                k.chars().take(64).collect(),
                known.join(", "),
            ));
        }
        let mut path = self.path.clone();
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        let mut any_query = false;
        let mut headers = Vec::new();
        let mut body = Map::new();
        for (name, pc) in &self.params {
            let given = args.get(name).filter(|v| !v.is_null());
            let Some(v) = given.or(pc.default.as_ref()) else {
                if pc.required {
                    return Err(ArgError::Missing(name.clone()));
                }
                continue;
            };
            if !pc.ty.admits(v) {
                return Err(ArgError::WrongType(name.clone(), article(pc.ty)));
            }
            if let Some(vals) = &pc.enum_values {
                if !vals.contains(v) {
                    let list: Vec<String> = vals.iter().map(scalar_text).collect();
                    return Err(ArgError::NotInEnum(name.clone(), list.join(", ")));
                }
            }
            match pc.location {
                ParamIn::Path => {
                    let text = scalar_text(v);
                    let seg = utf8_percent_encode(&text, SEGMENT).to_string();
                    // The value alone must be a segment the path rules
                    // accept: `..` in any encoding, or a slash, is refused
                    // here, naming the parameter.
                    if text.is_empty() || check_path(&format!("/{seg}")).is_err() {
                        return Err(ArgError::BadSegment(name.clone()));
                    }
                    path = path.replace(&format!("{{{name}}}"), &seg);
                }
                ParamIn::Query => {
                    any_query = true;
                    match v {
                        Value::Array(items) => {
                            for item in items {
                                if item.is_object() || item.is_array() {
                                    return Err(ArgError::WrongType(
                                        name.clone(),
                                        "an array of strings or numbers",
                                    ));
                                }
                                query.append_pair(name, &scalar_text(item));
                            }
                        }
                        other => {
                            query.append_pair(name, &scalar_text(other));
                        }
                    }
                }
                ParamIn::Header => {
                    let hn = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                        .map_err(|_| ArgError::BadHeader(name.clone()))?;
                    let hv = HeaderValue::from_str(&scalar_text(v))
                        .map_err(|_| ArgError::BadHeader(name.clone()))?;
                    headers.push((hn, hv));
                }
                ParamIn::Body => {
                    body.insert(name.clone(), v.clone());
                }
            }
        }
        let has_body_params = self.params.values().any(|p| p.location == ParamIn::Body);
        let body = (has_body_params && self.method != Method::GET)
            .then(|| serde_json::to_vec(&Value::Object(body)).unwrap_or_default());
        let query = query.finish();
        Ok(Built {
            method: self.method.clone(),
            path,
            query: (any_query && !query.is_empty()).then_some(query),
            headers,
            body,
        })
    }

    /// The parameters as a JSON Schema object (MCP `inputSchema`, Vapi and
    /// Retell `parameters`).
    pub fn input_schema(&self) -> Value {
        let mut props = Map::new();
        let mut required = Vec::new();
        for (name, pc) in &self.params {
            props.insert(name.clone(), param_schema(pc));
            if pc.required && pc.default.is_none() {
                required.push(Value::String(name.clone()));
            }
        }
        let mut schema = json!({"type": "object", "properties": props});
        if !required.is_empty() {
            schema["required"] = Value::Array(required);
        }
        schema
    }

    /// How listings show the tool (`sidekey tools`).
    pub fn describe(&self) -> Value {
        let params: Map<String, Value> = self
            .params
            .iter()
            .map(|(n, pc)| {
                let mut v = param_schema(pc);
                v["in"] = json!(pc.location.as_str());
                v["required"] = json!(pc.required && pc.default.is_none());
                (n.clone(), v)
            })
            .collect();
        let mut v = json!({
            "name": self.name,
            "provider": self.provider,
            "method": self.method.as_str(),
            "path": self.path,
            "description": self.description,
            "parameters": params,
        });
        if let Some(p) = &self.preset_tool {
            v["preset_tool"] = json!(p);
        }
        v
    }
}

/// One parameter's JSON Schema.
pub fn param_schema(pc: &ParamConfig) -> Value {
    let mut v = json!({"type": pc.ty.as_str()});
    if let Some(d) = &pc.description {
        v["description"] = json!(d);
    }
    if let Some(e) = &pc.enum_values {
        v["enum"] = json!(e);
    }
    if let Some(d) = &pc.default {
        v["default"] = d.clone();
    }
    if pc.ty == ParamType::Array {
        // Items are left open (strings or numbers): a schema validator on
        // the platform's side accepts what the API accepts.
        v["items"] = json!({});
    }
    v
}

/// A preset's ready tools, as TOML (the same form as `[tools.NAME]`).
fn pack_text(preset: &str) -> Option<&'static str> {
    Some(match preset {
        "google" => include_str!("tools/packs/google.toml"),
        "slack" => include_str!("tools/packs/slack.toml"),
        "telegram" => include_str!("tools/packs/telegram.toml"),
        _ => return None,
    })
}

/// The ready tools of a preset, by their name in the pack.
pub fn preset_pack(preset: &str) -> BTreeMap<String, ToolConfig> {
    match pack_text(preset) {
        // Packs are part of sidekey and parsed by its unit tests.
        Some(text) => parse_pack(preset, text).unwrap_or_default(),
        None => BTreeMap::new(),
    }
}

/// Every tool of a configuration.
#[derive(Debug, Default)]
pub struct Catalogue {
    tools: BTreeMap<String, Arc<Tool>>,
    /// `slack.post_message` and a preset tool's bare name, when unique.
    aliases: BTreeMap<String, String>,
}

impl Catalogue {
    pub fn from_config(cfg: &Config, providers: &Providers) -> Result<Catalogue, Vec<String>> {
        let mut problems = Vec::new();
        let mut cat = Catalogue::default();
        for (name, tc) in &cfg.tools {
            if providers.get(&tc.provider).is_none() {
                problems.push(format!(
                    "[tools.{name}] provider: {:?} is not a configured provider",
                    tc.provider
                ));
                continue;
            }
            cat.insert(name, tc, None);
        }
        let mut bare: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (pname, pc) in &cfg.providers {
            if pc.tools.is_empty() {
                continue;
            }
            let sec = format!("[providers.{pname}] tools");
            let Some(preset) = pc.preset.as_deref() else {
                problems.push(format!(
                    "{sec}: only a preset ships ready tools; define your own as [tools.NAME]"
                ));
                continue;
            };
            let pack = preset_pack(preset);
            if pack.is_empty() {
                problems.push(format!(
                    "{sec}: the {preset} preset ships no ready tools (presets with tools: google, slack, telegram)"
                ));
                continue;
            }
            let wanted: Vec<&String> = if pc.tools.iter().any(|t| t == "*") {
                pack.keys().collect()
            } else {
                pc.tools.iter().collect()
            };
            for w in wanted {
                let Some(tc) = pack.get(w.as_str()) else {
                    let have: Vec<&str> = pack.keys().map(String::as_str).collect();
                    problems.push(format!(
                        "{sec}: {w:?} is not a tool of the {preset} preset; it has: {}",
                        have.join(", ")
                    ));
                    continue;
                };
                let name = format!("{pname}_{w}");
                if cat.tools.contains_key(&name) {
                    problems.push(format!(
                        "{sec}: {w:?} would be named {name}, which [tools.{name}] already is"
                    ));
                    continue;
                }
                let mut tc = tc.clone();
                tc.provider = pname.clone();
                cat.insert(&name, &tc, Some(format!("{preset}.{w}")));
                cat.aliases.insert(format!("{pname}.{w}"), name.clone());
                bare.entry(w.clone()).or_default().push(name);
            }
        }
        for (w, names) in bare {
            if let [only] = names.as_slice() {
                if !cat.tools.contains_key(&w) {
                    cat.aliases.insert(w, only.clone());
                }
            }
        }
        if problems.is_empty() {
            Ok(cat)
        } else {
            Err(problems)
        }
    }

    fn insert(&mut self, name: &str, tc: &ToolConfig, preset_tool: Option<String>) {
        self.tools.insert(
            name.to_owned(),
            Arc::new(Tool {
                name: name.to_owned(),
                provider: tc.provider.clone(),
                method: tc.method.clone(),
                path: tc.path.clone(),
                description: tc
                    .description
                    .clone()
                    .unwrap_or_else(|| format!("{} {}", tc.method, tc.path)),
                params: tc.params.clone(),
                preset_tool,
            }),
        );
    }

    /// A tool by its name, or by `provider.tool` / a preset tool's bare
    /// name when that is unambiguous.
    pub fn get(&self, name: &str) -> Option<&Arc<Tool>> {
        self.tools
            .get(name)
            .or_else(|| self.aliases.get(name).and_then(|n| self.tools.get(n)))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Tool>> {
        self.tools.values()
    }

    pub fn len(&self) -> usize {
        self.tools.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }
}

#[cfg(test)]
mod tests;
