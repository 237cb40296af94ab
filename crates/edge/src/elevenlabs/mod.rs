//! Everything that speaks ElevenLabs: the conversation-init webhook
//! (`init`), the post-call webhook and its signature (`post_call`), webhook
//! tool definitions and rewriting existing tools to go through sidekey
//! (`tools`), and pushing tools to a workspace (`push`).
//!
//! The submodules take the imports below, and `init`'s helpers for reading
//! and auditing webhook bodies, through `use super::*`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Value, json};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::app::{App, sha256};
use crate::body::{self, Body};
use crate::error::ApiError;
use sidekey_base::config::Config;
use sidekey_creds::client::HttpClient;
use sidekey_creds::providers::{Injection, Providers};
use sidekey_vault::AuditRecord;

mod init;
mod post_call;
mod push;
mod tools;

pub use init::conversation_init;
pub(crate) use init::{mint_for_caller, record, refused, user_by_caller};
pub(crate) use post_call::revoke_conversation;
pub use post_call::{PendingSignature, parse_signature, post_call, verify_signature};
pub use push::{push_mcp, push_tools};
pub use tools::{mcp_server, rewrite_tool, tools};

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn setup() -> (Config, Providers) {
        let cfg = Config::parse(
            r#"
[server]
public_url = "https://sidekey.example.com"
[providers.slack]
preset = "slack"
[providers.google]
preset = "google"
[providers.telegram]
preset = "telegram"
[providers.maps]
base_url = "https://maps.example.com/api"
inject = { query = "key" }
"#,
            Path::new("/x/c.toml"),
            Path::new("/x"),
        )
        .unwrap();
        let p = Providers::from_config(&cfg).unwrap();
        (cfg, p)
    }

    fn sign(secret: &[u8], t: i64, body: &[u8]) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn signatures() {
        let body = br#"{"type":"post_call_transcription"}"#;
        let good = sign(b"s3cret", 1000, body);
        assert!(
            verify_signature(&format!("t=1000,v0={good}"), body, b"s3cret", 1000, 1800).is_ok()
        );
        // rotation: one of several v0 values matches
        let other = sign(b"old", 1000, body);
        assert!(
            verify_signature(
                &format!("t=1000,v0={other},v0={good}"),
                body,
                b"s3cret",
                1100,
                1800
            )
            .is_ok()
        );
        assert!(
            verify_signature(&format!("t=1000,v0={good}"), b"{}", b"s3cret", 1000, 1800).is_err()
        );
        assert!(
            verify_signature(&format!("t=1000,v0={good}"), body, b"wrong", 1000, 1800).is_err()
        );
        assert_eq!(
            verify_signature(
                &format!("t=1000,v0={good}"),
                body,
                b"s3cret",
                1000 + 1801,
                1800
            ),
            Err("timestamp outside tolerance")
        );
        assert!(verify_signature("v0=abc", body, b"s3cret", 1000, 1800).is_err());
        assert!(verify_signature("garbage", body, b"s3cret", 1000, 1800).is_err());
        assert!(verify_signature("t=1000", body, b"s3cret", 1000, 1800).is_err());
        // Found by fuzzing: extreme timestamps are stale, never an overflow.
        for t in [i64::MIN, i64::MAX] {
            let h = format!("t={t},v0={}", sign(b"s3cret", t, body));
            assert_eq!(
                verify_signature(&h, body, b"s3cret", 1000, 1800),
                Err("timestamp outside tolerance")
            );
        }
    }

    #[test]
    fn generated_tools_use_only_secret_and_system_variables() {
        let (cfg, p) = setup();
        let tools = tools(&cfg, &p, &sidekey_creds::tools::Catalogue::default());
        assert_eq!(tools.len(), 5);
        let text = serde_json::to_string(&tools).unwrap();
        assert!(!text.contains("{{"));
        for t in &tools {
            let tc = &t["tool_config"];
            assert_eq!(tc["type"], "webhook");
            assert_eq!(tc["tool_error_handling_mode"], "passthrough");
            assert!(
                tc["response_timeout_secs"].as_u64().unwrap() > cfg.server.upstream_timeout_secs
            );
            let name = tc["name"].as_str().unwrap();
            assert!(
                name.len() <= 64
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            );
            let api = &tc["api_schema"];
            assert!(
                api["url"]
                    .as_str()
                    .unwrap()
                    .starts_with("https://sidekey.example.com/")
            );
            for (_, v) in api["request_headers"].as_object().unwrap() {
                let var = v["variable_name"].as_str().unwrap();
                assert!(var.starts_with("secret__") || var.starts_with("system__"));
            }
            for (_, prop) in api["request_body_schema"]["properties"]
                .as_object()
                .unwrap()
            {
                assert!(prop.get("description").is_some());
            }
        }
    }

    #[test]
    fn rewrite_slack_google_telegram_query() {
        let (cfg, p) = setup();
        let slack = json!({"tool_config": {"type": "webhook", "name": "post", "description": "d",
            "api_schema": {"url": "https://slack.com/api/chat.postMessage", "method": "POST",
            "request_headers": {"Authorization": "Bearer {{secret__slack_token}}", "Content-Type": "application/json"}}}});
        let out = rewrite_tool(&cfg, &p, &slack).unwrap();
        let api = &out["tool_config"]["api_schema"];
        assert_eq!(
            api["url"],
            "https://sidekey.example.com/v1/proxy/slack/chat.postMessage"
        );
        let h = api["request_headers"].as_object().unwrap();
        assert!(h.get("Authorization").is_none());
        assert_eq!(h["Content-Type"], "application/json");
        assert_eq!(
            h["X-Sidekey-Session"]["variable_name"],
            "secret__sidekey_session"
        );
        assert_eq!(
            h["X-Conversation-Id"]["variable_name"],
            "system__conversation_id"
        );
        assert_eq!(
            out["tool_config"]["tool_error_handling_mode"],
            "passthrough"
        );

        let google = json!({"type": "webhook", "name": "events", "api_schema": {
            "url": "https://www.googleapis.com/calendar/v3/calendars/{calendar_id}/events",
            "method": "GET", "request_headers": {"Authorization": {"secret_id": "abc"}}}});
        let out = rewrite_tool(&cfg, &p, &google).unwrap();
        assert_eq!(
            out["api_schema"]["url"],
            "https://sidekey.example.com/v1/proxy/google/calendar/v3/calendars/{calendar_id}/events"
        );
        assert!(
            out["api_schema"]["request_headers"]
                .get("Authorization")
                .is_none()
        );

        let tg = json!({"tool_config": {"type": "webhook", "name": "send", "api_schema": {
            "url": "https://api.telegram.org/bot{{secret__telegram_bot_token}}/sendMessage", "method": "POST"}}});
        let out = rewrite_tool(&cfg, &p, &tg).unwrap();
        assert_eq!(
            out["tool_config"]["api_schema"]["url"],
            "https://sidekey.example.com/v1/proxy/telegram/sendMessage"
        );
        assert!(!out.to_string().contains("telegram_bot_token"));

        let maps = json!({"type": "webhook", "name": "geo", "api_schema": {
            "url": "https://maps.example.com/api/geocode?key={{secret__maps}}&format=json", "method": "GET",
            "query_params_schema": {"properties": {"key": {"type": "string", "dynamic_variable": "secret__maps"}, "q": {"type": "string", "description": "d"}}, "required": ["key", "q"]}}});
        let out = rewrite_tool(&cfg, &p, &maps).unwrap();
        assert_eq!(
            out["api_schema"]["url"],
            "https://sidekey.example.com/v1/proxy/maps/geocode?format=json"
        );
        assert!(
            out["api_schema"]["query_params_schema"]["properties"]
                .get("key")
                .is_none()
        );
        assert_eq!(
            out["api_schema"]["query_params_schema"]["required"],
            json!(["q"])
        );
    }

    #[test]
    fn rewrite_refuses_unknown_urls() {
        let (cfg, p) = setup();
        let t = json!({"api_schema": {"url": "https://api.github.com/user", "method": "GET"}});
        let e = rewrite_tool(&cfg, &p, &t).unwrap_err();
        assert!(e.contains("https://api.github.com/user"), "{e}");
        // prefix on a segment boundary only
        let t = json!({"api_schema": {"url": "https://slack.com/apix/foo", "method": "GET"}});
        assert!(rewrite_tool(&cfg, &p, &t).is_err());
    }
}
