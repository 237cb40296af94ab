//! `sidekey echo-upstream`: a local stand-in for a provider, so a new user
//! sees a proxied call succeed with no internet and no real token.
//!
//! It answers every request with what it received — method, path, query,
//! headers, body — with credential-bearing headers masked
//! (`Bearer xoxb-…a1b2`), and prints one line per request on stdout. Plain
//! HTTP on loopback: the shipped config's `demo` provider points at it.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Map, Value, json};

/// Where the shipped config's `demo` provider expects the echo upstream.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8099";

/// The `demo` provider's `base_url` host and port, when the config has one;
/// the default address when there is no config file or no such provider.
pub fn listen_from_config(path: &std::path::Path) -> Result<SocketAddr, String> {
    let default = || DEFAULT_LISTEN.parse().expect("valid default");
    if !path.exists() {
        return Ok(default());
    }
    let cfg = sidekey_base::config::Config::load(path).map_err(|p| p.join("\n"))?;
    let Some(base) = cfg.providers.get("demo").and_then(|p| p.base_url.clone()) else {
        return Ok(default());
    };
    let url =
        url::Url::parse(&base).map_err(|e| format!("[providers.demo] base_url {base:?}: {e}"))?;
    let host = url.host_str().unwrap_or("127.0.0.1");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = url.port_or_known_default().unwrap_or(80);
    let ip: std::net::IpAddr = if host == "localhost" {
        std::net::Ipv4Addr::LOCALHOST.into()
    } else {
        host.parse().map_err(|_| {
            format!("[providers.demo] base_url {base:?}: pass --listen ADDR for a host name")
        })?
    };
    Ok(SocketAddr::new(ip, port))
}

/// Headers whose value is a credential: shown masked, never whole.
const MASKED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-api-key",
    "x-sidekey-session",
];

/// `xoxb-demo-token-a1b2` → `xoxb-…a1b2`; short values are fully hidden.
pub fn mask(value: &str) -> String {
    let (scheme, token) = match value.split_once(' ') {
        Some((s, t)) if !s.is_empty() && !t.contains(' ') => (Some(s), t),
        _ => (None, value),
    };
    let chars: Vec<char> = token.chars().collect();
    let masked = if chars.len() >= 12 {
        let head: String = chars[..5].iter().collect();
        let tail: String = chars[chars.len() - 4..].iter().collect();
        format!("{head}…{tail}")
    } else {
        "…".to_owned()
    };
    match scheme {
        Some(s) => format!("{s} {masked}"),
        None => masked,
    }
}

/// The JSON answer describing one received request.
pub fn describe(method: &str, uri: &http::Uri, headers: &http::HeaderMap, body: &[u8]) -> Value {
    let mut hs = Map::new();
    for (name, value) in headers {
        let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
        let shown = if MASKED.contains(&name.as_str()) {
            mask(&v)
        } else {
            v
        };
        hs.insert(name.as_str().to_owned(), Value::String(shown));
    }
    let body_value = match serde_json::from_slice::<Value>(body) {
        Ok(v) => v,
        Err(_) => Value::String(String::from_utf8_lossy(body).into_owned()),
    };
    json!({
        "ok": true,
        "echo": {
            "method": method,
            "path": uri.path(),
            "query": uri.query(),
            "headers": Value::Object(hs),
            "body": if body.is_empty() { Value::Null } else { body_value },
        }
    })
}

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let (parts, body) = req.into_parts();
    let bytes = Limited::new(body, 1 << 20)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let v = describe(parts.method.as_str(), &parts.uri, &parts.headers, &bytes);
    let auth = v["echo"]["headers"]["authorization"]
        .as_str()
        .unwrap_or("(no authorization header)");
    println!(
        "{} {}  authorization: {auth}",
        parts.method,
        parts.uri.path()
    );
    let mut text = serde_json::to_string_pretty(&v).unwrap_or_default();
    text.push('\n');
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// Serves until the process is stopped.
pub async fn run(listen: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!(
        "echo upstream on http://{} (the demo provider's base_url); Ctrl-C stops it",
        listener.local_addr()?
    );
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(answer))
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_keep_scheme_head_and_tail() {
        assert_eq!(mask("Bearer xoxb-demo-7f3e-a1b2"), "Bearer xoxb-…a1b2");
        assert_eq!(mask("Bearer short"), "Bearer …");
        assert_eq!(mask("0123456789abcdef"), "01234…cdef");
    }

    #[test]
    fn echo_masks_credentials_only() {
        let mut h = http::HeaderMap::new();
        h.insert(
            "authorization",
            "Bearer xoxb-demo-7f3e-a1b2".parse().unwrap(),
        );
        h.insert("x-trace", "abc".parse().unwrap());
        let uri: http::Uri = "/chat.postMessage?x=1".parse().unwrap();
        let v = describe("POST", &uri, &h, br#"{"text":"hi"}"#);
        assert_eq!(v["echo"]["headers"]["authorization"], "Bearer xoxb-…a1b2");
        assert_eq!(v["echo"]["headers"]["x-trace"], "abc");
        assert_eq!(v["echo"]["body"]["text"], "hi");
        assert_eq!(v["echo"]["query"], "x=1");
        assert!(!v.to_string().contains("7f3e"));
    }
}
