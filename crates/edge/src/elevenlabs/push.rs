//! Pushing tool definitions to an ElevenLabs workspace over its API.

use super::*;

// ---------------------------------------------------------------------------
// push-tools

pub(super) async fn api_call(
    client: &HttpClient,
    method: Method,
    url: &str,
    key: &str,
    body: Option<&Value>,
) -> Result<Value, String> {
    let mut req = Request::builder()
        .method(method.clone())
        .uri(url)
        .header("accept", "application/json")
        .header("user-agent", concat!("sidekey/", env!("CARGO_PKG_VERSION")));
    let mut kv = http::HeaderValue::try_from(key)
        .map_err(|_| "ELEVENLABS_API_KEY is not a valid header value".to_string())?;
    kv.set_sensitive(true);
    req = req.header("xi-api-key", kv);
    let bytes = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            Bytes::from(serde_json::to_vec(b).unwrap_or_default())
        }
        None => Bytes::new(),
    };
    let req = req
        .body(Full::new(bytes))
        .map_err(|e| format!("bad request for {url}: {e}"))?;
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .map_err(|_| format!("{method} {url}: timed out"))?
        .map_err(|e| format!("{method} {url}: {}", sidekey_base::errors::error_chain(&e)))?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), 16 << 20)
        .collect()
        .await
        .map_err(|_| format!("{method} {url}: unreadable answer"))?
        .to_bytes();
    if !status.is_success() {
        let text: String = String::from_utf8_lossy(&bytes).chars().take(300).collect();
        return Err(format!("{method} {url}: HTTP {} {text}", status.as_u16()));
    }
    Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Creates or updates (matched by name) every generated tool. Returns one
/// line per tool: `created NAME (id)` or `updated NAME (id)`.
pub async fn push_tools(
    client: &HttpClient,
    api_base: &str,
    api_key: &str,
    tools: &[Value],
) -> Result<Vec<String>, String> {
    let base = api_base.trim_end_matches('/');
    let mut existing: Vec<(String, String)> = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let url = match &cursor {
            Some(c) => format!(
                "{base}/v1/convai/tools?cursor={}",
                url::form_urlencoded::byte_serialize(c.as_bytes()).collect::<String>()
            ),
            None => format!("{base}/v1/convai/tools"),
        };
        let list = api_call(client, Method::GET, &url, api_key, None).await?;
        // Anything but a tools list means this is not ElevenLabs' API (or
        // not the version we know): creating tools blindly would duplicate.
        let Some(items) = list.get("tools").and_then(Value::as_array) else {
            return Err(format!(
                "GET {url} did not answer with a tools list ({{\"tools\": [...]}}); is {base} the ElevenLabs API?"
            ));
        };
        for t in items {
            let id = t.get("id").and_then(Value::as_str);
            let name = t
                .get("tool_config")
                .and_then(|c| c.get("name"))
                .and_then(Value::as_str);
            if let (Some(id), Some(name)) = (id, name) {
                existing.push((name.to_owned(), id.to_owned()));
            }
        }
        let more = list
            .get("has_more")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        cursor = list
            .get("next_cursor")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if !more || cursor.is_none() {
            break;
        }
    }
    let mut lines = Vec::new();
    for tool in tools {
        let name = tool["tool_config"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match existing.iter().find(|(n, _)| *n == name) {
            Some((_, id)) => {
                api_call(
                    client,
                    Method::PATCH,
                    &format!("{base}/v1/convai/tools/{id}"),
                    api_key,
                    Some(tool),
                )
                .await?;
                lines.push(format!("updated {name} ({id})"));
            }
            None => {
                let created = api_call(
                    client,
                    Method::POST,
                    &format!("{base}/v1/convai/tools"),
                    api_key,
                    Some(tool),
                )
                .await?;
                let id = created
                    .get("id")
                    .and_then(Value::as_str)
                    .filter(|id| !id.is_empty())
                    .ok_or_else(|| {
                        format!(
                            "POST {base}/v1/convai/tools answered without the new tool's id; is {base} the ElevenLabs API?"
                        )
                    })?
                    .to_owned();
                lines.push(format!("created {name} ({id})"));
                existing.push((name, id));
            }
        }
    }
    Ok(lines)
}

// ---------------------------------------------------------------------------
// push-mcp

/// Creates sidekey's MCP server record, or updates the one of the same
/// name. Returns `created NAME (id)` or `updated NAME (id)`.
pub async fn push_mcp(
    client: &HttpClient,
    api_base: &str,
    api_key: &str,
    record: &Value,
) -> Result<String, String> {
    let base = api_base.trim_end_matches('/');
    let url = format!("{base}/v1/convai/mcp-servers");
    let list = api_call(client, Method::GET, &url, api_key, None).await?;
    let Some(items) = list.get("mcp_servers").and_then(Value::as_array) else {
        return Err(format!(
            "GET {url} did not answer with an MCP server list ({{\"mcp_servers\": [...]}}); is {base} the ElevenLabs API?"
        ));
    };
    let cfg = &record["config"];
    let name = cfg["name"].as_str().unwrap_or("sidekey");
    let existing = items.iter().find_map(|m| {
        (m.get("config")
            .and_then(|c| c.get("name"))
            .and_then(Value::as_str)
            == Some(name))
        .then(|| m.get("id").and_then(Value::as_str))
        .flatten()
    });
    match existing {
        Some(id) => {
            // The update takes the settings flat (no `config` wrapper).
            let mut update = serde_json::Map::new();
            for k in [
                "approval_policy",
                "request_headers",
                "response_timeout_secs",
            ] {
                if let Some(v) = cfg.get(k) {
                    update.insert(k.into(), v.clone());
                }
            }
            api_call(
                client,
                Method::PATCH,
                &format!("{url}/{id}"),
                api_key,
                Some(&Value::Object(update)),
            )
            .await?;
            Ok(format!("updated {name} ({id})"))
        }
        None => {
            let created = api_call(client, Method::POST, &url, api_key, Some(record)).await?;
            let id = created
                .get("id")
                .and_then(Value::as_str)
                .filter(|id| !id.is_empty())
                .ok_or_else(|| {
                    format!("POST {url} answered without the new server's id; is {base} the ElevenLabs API?")
                })?;
            Ok(format!("created {name} ({id})"))
        }
    }
}
