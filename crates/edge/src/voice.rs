//! What the Vapi and Retell front doors share: refusing a request before
//! it is authenticated, reading its body, and the tool definitions' shape.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::app::App;
use crate::body::Body;
use crate::error::ApiError;
use crate::webhook_body::BodyError;
use sidekey_base::config::{Config, HmacAlgorithm};

/// The most of an upstream answer put into a platform's tool result: the
/// LLM reads it, so long answers are cut (and said so in the log).
pub(crate) const RESULT_LIMIT: usize = 256 * 1024;

/// How long a tool result is waited for, beyond the upstream timeout.
pub(crate) fn result_timeout(app: &App) -> Duration {
    Duration::from_secs(app.config.server.upstream_timeout_secs + 10)
}

/// How long a platform should wait for sidekey's answer to a tool call
/// (the upstream timeout, a refresh, and some room).
pub(crate) fn platform_timeout_secs(cfg: &Config) -> u64 {
    (cfg.server.upstream_timeout_secs + 10).max(20)
}

/// A request turned away before it was authenticated (no secret set here,
/// a wrong secret, a bad signature): counted and summarised, never one
/// audit record each, since anyone can send these by the thousand.
pub(crate) fn turned_away(
    app: &App,
    path: &'static str,
    event: &str,
    e: ApiError,
) -> Response<Body> {
    app.metrics.webhook(event, "refused");
    if let ApiError::InvalidSignature(why) = &e {
        tracing::warn!(path, reason = why, "webhook refused");
    }
    app.audit.refused(sidekey_creds::audit::Refused {
        path,
        code: e.code(),
        reason: None,
        status: e.status().as_u16(),
    });
    e.into_response()
}

/// Reads a webhook body of at most `[elevenlabs] max_webhook_bytes` in the
/// memory budget every platform's webhooks share (a slow or huge sender
/// cannot hold it), or the answer that turns the sender away.
pub(crate) async fn read_body(
    app: &App,
    req: Request<Incoming>,
    path: &'static str,
    event: &str,
) -> Result<Bytes, Response<Body>> {
    match crate::webhook_body::read_fair(app, req, |_| {}).await {
        Ok(b) => Ok(b),
        Err(BodyError::Api(e)) => Err(turned_away(app, path, event, e)),
        Err(BodyError::TooSlow(why)) => {
            tracing::warn!(path, reason = why, "webhook body cut off");
            app.metrics.webhook(event, "refused");
            app.audit.refused(sidekey_creds::audit::Refused {
                path,
                code: "request_timeout",
                reason: None,
                status: 408,
            });
            Err(crate::webhook_body::too_slow(
                "The request body did not arrive in time.",
            ))
        }
    }
}

/// Decodes a signature as hex (either case) or, failing that, base64.
pub(crate) fn decode_signature(s: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let s = s.trim();
    let s = s.strip_prefix("sha256=").unwrap_or(s);
    if s.len() % 2 == 0 && !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return (0..s.len() / 2)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
            .collect();
    }
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

/// HMAC-SHA256 of `parts` (concatenated) under `key`, compared in constant
/// time with `expected`.
pub(crate) fn hmac_matches(key: &[u8], parts: &[&[u8]], expected: &[u8]) -> bool {
    hmac_matches_with(HmacAlgorithm::Sha256, key, parts, expected)
}

/// The same with the hash Vapi's HMAC credential names.
pub(crate) fn hmac_matches_with(
    algorithm: HmacAlgorithm,
    key: &[u8],
    parts: &[&[u8]],
    expected: &[u8],
) -> bool {
    use hmac::{Hmac, Mac};
    use subtle::ConstantTimeEq;
    fn digest<M: Mac + hmac::digest::KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        let mut mac = <M as hmac::digest::KeyInit>::new_from_slice(key).expect("any key size");
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().to_vec()
    }
    let got = match algorithm {
        HmacAlgorithm::Sha256 => digest::<Hmac<sha2::Sha256>>(key, parts),
        HmacAlgorithm::Sha512 => digest::<Hmac<sha2::Sha512>>(key, parts),
        HmacAlgorithm::Sha1 => digest::<Hmac<sha1::Sha1>>(key, parts),
    };
    bool::from(got.as_slice().ct_eq(expected))
}

/// A tool's parameters as a voice platform's function schema: JSON Schema
/// where every property has a type and a description, arrays say their
/// items' type, and a default is said in the description.
pub(crate) fn function_parameters(tool: &sidekey_creds::tools::Tool) -> Value {
    let mut schema = tool.input_schema();
    if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        for (name, p) in props.iter_mut() {
            let Some(o) = p.as_object_mut() else { continue };
            let mut desc = o
                .get("description")
                .and_then(Value::as_str)
                .unwrap_or(name)
                .to_owned();
            if let Some(d) = o.remove("default") {
                desc.push_str(&format!(" Default: {d}."));
            }
            o.insert("description".into(), json!(desc));
            if o.get("type").and_then(Value::as_str) == Some("array") {
                o.insert(
                    "items".into(),
                    json!({"type": "string", "description": format!("One item of {name}.")}),
                );
            }
        }
    }
    schema["required"] = schema.get("required").cloned().unwrap_or(json!([]));
    schema
}

/// A tool's description for a voice agent's LLM.
pub(crate) fn function_description(tool: &sidekey_creds::tools::Tool) -> String {
    let d = tool.description.trim();
    let d = if d.is_empty() { tool.name.as_str() } else { d };
    format!("{d} If it answers with an error message, read that message to the caller.")
}
