//! Webhook tool definitions for an agent, and rewriting existing tools so
//! they go through sidekey.

use super::*;
use sidekey_base::config::{ParamConfig, ParamType};
use sidekey_creds::tools::{Catalogue, Tool};

// ---------------------------------------------------------------------------
// Tool definitions

/// `x-conversation-id` → `X-Conversation-Id`.
pub(super) fn title_case(h: &str) -> String {
    h.split('-')
        .map(sidekey_creds::providers::display_name)
        .collect::<Vec<_>>()
        .join("-")
}

pub(super) fn tool_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect()
}

pub(super) fn session_headers(cfg: &Config) -> Value {
    let mut h = serde_json::Map::new();
    h.insert(
        "X-Sidekey-Session".into(),
        json!({"variable_name": cfg.sessions.dynamic_variable}),
    );
    h.insert(
        title_case(cfg.elevenlabs.conversation_header.as_str()),
        json!({"variable_name": "system__conversation_id"}),
    );
    Value::Object(h)
}

/// The tools to create in ElevenLabs, each the body of `POST /v1/convai/tools`:
/// the refresh tool, one generic tool per provider, and one tool per
/// operation tool of the catalogue.
pub fn tools(cfg: &Config, providers: &Providers, catalogue: &Catalogue) -> Vec<Value> {
    let base = &cfg.server.public_url;
    let timeout = cfg.elevenlabs.tool_response_timeout_secs;
    let names: Vec<&String> = providers.names().iter().collect();
    let mut out = vec![json!({
        "tool_config": {
            "type": "webhook",
            "name": "sidekey_refresh_access",
            "description": "Renews the caller's access to their connected accounts. Use it once when another tool answered that access expired or could not be renewed, then retry that tool. If a provider's status comes back as reauth_required or credential_missing, tell the caller the message it gives (they need to connect the account in the app).",
            "response_timeout_secs": timeout,
            "tool_error_handling_mode": "passthrough",
            "api_schema": {
                "url": format!("{base}/v1/session/refresh"),
                "method": "POST",
                "content_type": "application/json",
                "request_headers": session_headers(cfg),
                "request_body_schema": {
                    "type": "object",
                    "description": "Which connected account to renew; leave provider empty to renew all of them.",
                    "required": [],
                    "properties": {
                        "provider": {
                            "type": "string",
                            "description": "The service whose access to renew.",
                            "enum": names,
                        }
                    }
                }
            }
        }
    })];
    for p in providers.iter() {
        let allowed = if p.allow_patterns.is_empty() {
            String::new()
        } else {
            format!(
                " Only these calls are allowed: {}.",
                p.allow_patterns.join(", ")
            )
        };
        let example = match p.preset.as_deref() {
            Some("slack") => {
                " For example method POST, path /chat.postMessage, body {\"channel\": \"C123\", \"text\": \"Hello\"}."
            }
            Some("google") => {
                " For example method GET, path /calendar/v3/calendars/primary/events, query maxResults=5&orderBy=startTime&singleEvents=true."
            }
            Some("telegram") => {
                " For example method POST, path /sendMessage, body {\"chat_id\": 123, \"text\": \"Hello\"}."
            }
            _ => "",
        };
        out.push(json!({
            "tool_config": {
                "type": "webhook",
                "name": tool_name(&format!("sidekey_{}", p.name)),
                "description": format!(
                    "Calls the {} API ({}) as the caller, with their connected {} account. Use it for anything the caller asks that needs their {} data or actions.{allowed}{example} If it answers with an error message, read that message to the caller.",
                    p.display, p.base_url_text(), p.display, p.display
                ),
                "response_timeout_secs": timeout,
                "tool_error_handling_mode": "passthrough",
                "api_schema": {
                    "url": format!("{base}/v1/call/{}", p.name),
                    "method": "POST",
                    "content_type": "application/json",
                    "request_headers": session_headers(cfg),
                    "request_body_schema": {
                        "type": "object",
                        "description": format!("The {} API request to make.", p.display),
                        "required": ["method", "path"],
                        "properties": {
                            "method": {
                                "type": "string",
                                "description": "HTTP method of the API call.",
                                "enum": ["GET", "POST", "PUT", "PATCH", "DELETE"],
                            },
                            "path": {
                                "type": "string",
                                "description": format!("API path relative to {}, starting with /.", p.base_url_text()),
                            },
                            "query": {
                                "type": "string",
                                "description": "Optional query string without the leading ?, e.g. limit=10&cursor=abc.",
                            },
                            "body": {
                                "type": "string",
                                "description": "Optional JSON request body, written as JSON text.",
                            }
                        }
                    }
                }
            }
        }));
    }
    for t in catalogue.iter() {
        out.push(operation_tool(cfg, t));
    }
    out
}

/// The body of `POST /v1/convai/mcp-servers`: sidekey's `/v1/mcp` with
/// the session and conversation as typed dynamic-variable headers.
pub fn mcp_server(cfg: &Config) -> Value {
    json!({
        "config": {
            "name": "sidekey",
            "description": "The caller's own connected accounts, through sidekey.",
            "url": format!("{}/v1/mcp", cfg.server.public_url),
            "transport": "STREAMABLE_HTTP",
            "approval_policy": cfg.elevenlabs.mcp_approval_policy,
            "request_headers": session_headers(cfg),
            "response_timeout_secs": cfg.elevenlabs.tool_response_timeout_secs,
        }
    })
}

/// A webhook tool that posts its parameters to `/v1/tools/<name>`.
fn operation_tool(cfg: &Config, t: &Tool) -> Value {
    let mut props = serde_json::Map::new();
    let mut required = Vec::new();
    for (name, pc) in &t.params {
        props.insert(name.clone(), elevenlabs_property(name, pc));
        if pc.required && pc.default.is_none() {
            required.push(json!(name));
        }
    }
    json!({
        "tool_config": {
            "type": "webhook",
            "name": t.name,
            "description": format!("{} If it answers with an error message, read that message to the caller.", t.description),
            "response_timeout_secs": cfg.elevenlabs.tool_response_timeout_secs,
            "tool_error_handling_mode": "passthrough",
            "api_schema": {
                "url": format!("{}/v1/tools/{}", cfg.server.public_url, t.name),
                "method": "POST",
                "content_type": "application/json",
                "request_headers": session_headers(cfg),
                "request_body_schema": {
                    "type": "object",
                    "description": format!("The arguments of {}.", t.name),
                    "required": required,
                    "properties": props,
                }
            }
        }
    })
}

/// A parameter in ElevenLabs' schema form: every property needs a
/// description; arrays need `items` and objects `properties`; there is no
/// `default`, so it is said in the description.
fn elevenlabs_property(name: &str, pc: &ParamConfig) -> Value {
    let mut desc = pc.description.clone().unwrap_or_else(|| name.to_owned());
    if let Some(d) = &pc.default {
        desc.push_str(&format!(" Default: {d}."));
    }
    let mut v = json!({"type": pc.ty.as_str(), "description": desc});
    if let Some(e) = &pc.enum_values {
        v["enum"] = json!(e);
    }
    match pc.ty {
        ParamType::Array => {
            v["items"] = json!({"type": "string", "description": format!("One item of {name}.")})
        }
        ParamType::Object => v["properties"] = json!({}),
        _ => {}
    }
    v
}

// ---------------------------------------------------------------------------
// rewrite-tool

/// Re-points a tool that calls a provider directly at sidekey: URL under
/// `/v1/proxy/<provider>`, provider credential header replaced by the
/// session header. Accepts `{"tool_config": {...}}`, a tool as listed by
/// the API (`{"id", "tool_config"}`), or a bare tool config.
pub fn rewrite_tool(cfg: &Config, providers: &Providers, input: &Value) -> Result<Value, String> {
    let mut out = input.clone();
    // An item of the API's listing carries read-only fields that the
    // create/update request does not accept.
    if let Some(o) = out.as_object_mut() {
        for k in ["id", "access_info", "usage_stats"] {
            o.remove(k);
        }
    }
    let tc = if out.get("tool_config").is_some() {
        out.get_mut("tool_config").expect("checked")
    } else {
        &mut out
    };
    let api = tc
        .get_mut("api_schema")
        .ok_or("the tool has no api_schema (is it a webhook tool?)")?;
    let url = api
        .get("url")
        .and_then(Value::as_str)
        .ok_or("the tool's api_schema has no url")?
        .to_owned();
    let (provider, rest) = match_provider(providers, &url)
        .ok_or_else(|| format!("tool URL {url} matches no configured provider; add a [providers.NAME] section whose base_url is a prefix of it"))?;
    let p = providers.get(&provider).expect("matched");
    let mut rest = rest;
    if let Injection::PathPrefix { template } = &p.inject {
        // Drop the segment that carried the token, e.g. /bot{{secret__x}}.
        let literal = template
            .split("{token}")
            .next()
            .unwrap_or("")
            .trim_start_matches('/');
        let trimmed = rest.trim_start_matches('/');
        let (first, tail) = trimmed.split_once('/').unwrap_or((trimmed, ""));
        if !literal.is_empty() && first.starts_with(literal) {
            rest = format!("/{tail}");
        }
    }
    if let Injection::Query { param } = &p.inject {
        if let Some((path, q)) = rest.split_once('?') {
            let kept: Vec<&str> = q
                .split('&')
                .filter(|kv| kv.split('=').next() != Some(param.as_str()))
                .collect();
            rest = if kept.is_empty() {
                path.to_owned()
            } else {
                format!("{path}?{}", kept.join("&"))
            };
        }
        if let Some(props) = api
            .get_mut("query_params_schema")
            .and_then(|q| q.get_mut("properties"))
            .and_then(Value::as_object_mut)
        {
            props.remove(param);
        }
        if let Some(req) = api
            .get_mut("query_params_schema")
            .and_then(|q| q.get_mut("required"))
            .and_then(Value::as_array_mut)
        {
            req.retain(|v| v.as_str() != Some(param));
        }
    }
    api["url"] = json!(format!(
        "{}/v1/proxy/{provider}{rest}",
        cfg.server.public_url
    ));
    let mut headers = api
        .get("request_headers")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let injected = p.injected_header().map(|h| h.as_str().to_owned());
    headers.retain(|name, value| {
        let lname = name.to_ascii_lowercase();
        let carries_secret =
            value.to_string().contains("secret__") || value.get("secret_id").is_some();
        !(lname == "authorization"
            || Some(&lname) == injected.as_ref()
            || lname == "x-sidekey-session"
            || carries_secret)
    });
    if let Value::Object(extra) = session_headers(cfg) {
        headers.extend(extra);
    }
    api["request_headers"] = Value::Object(headers);
    let ours = cfg.elevenlabs.tool_response_timeout_secs;
    let cur = tc
        .get("response_timeout_secs")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    tc["response_timeout_secs"] = json!(cur.max(ours));
    tc["tool_error_handling_mode"] = json!("passthrough");
    Ok(out)
}

/// The provider whose base URL is the longest prefix of `url` (on a path
/// segment boundary), and the rest of the URL after it.
pub(super) fn match_provider(providers: &Providers, url: &str) -> Option<(String, String)> {
    // ElevenLabs templates ({param}, {{var}}) are not valid URL syntax for
    // every parser: compare textually on scheme://host[:port]/path.
    let mut best: Option<(usize, String, String)> = None;
    for p in providers.iter() {
        let origin = &p.base.origin;
        let Some(after) = strip_prefix_ci(url, origin) else {
            continue;
        };
        if !(after.is_empty() || after.starts_with('/') || after.starts_with('?')) {
            continue;
        }
        let Some(rest) = after.strip_prefix(p.base.path.as_str()) else {
            continue;
        };
        if !(rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')) {
            continue;
        }
        let score = origin.len() + p.base.path.len();
        if best.as_ref().is_none_or(|b| score > b.0) {
            best = Some((score, p.name.clone(), rest.to_owned()));
        }
    }
    best.map(|(_, n, r)| (n, r))
}

pub(super) fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    if s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix) {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}
