//! Everything ElevenLabs sees of sidekey — session dynamic
//! variables, conversation binding, the conversation-init and post-call
//! webhooks, generated tool definitions, `rewrite-tool` and `push-tools`
//! (against a fake ElevenLabs API written here).
use sidekey_testkit as support;

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::unix_now;

use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};
use sha2::Sha256;
use support::upstream::Upstream;
use support::{INIT_SECRET, Options, Resp, Sidekey, WEBHOOK_SECRET, provider_toml, run_cli};

const SESSION_VAR: &str = "secret__sidekey_session";
const PUBLIC_URL: &str = "https://127.0.0.1:8443";

// ---------------------------------------------------------------------------
// Local helpers

/// One provider `custom` pointing at a fake upstream.
async fn start_custom() -> (Upstream, Sidekey) {
    let up = Upstream::start().await;
    let sk = Sidekey::start(Options::with_providers(&provider_toml(
        "custom", &up.url, "",
    )))
    .await;
    (up, sk)
}

/// hex(HMAC-SHA256(secret, "<t>.<body>")), as ElevenLabs signs post-call webhooks.
fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A valid `ElevenLabs-Signature` header for `body`, signed now.
fn signature(body: &[u8]) -> String {
    let t = unix_now();
    format!("t={t},v0={}", sign(WEBHOOK_SECRET, t, body))
}

/// The claims of a JWT (no verification: the test only reads them).
fn jwt_claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT has three parts");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .expect("JWT payload is base64url");
    serde_json::from_slice(&raw).expect("JWT payload is JSON")
}

/// A proxied call to the fake upstream with a session and, optionally, a
/// conversation id.
async fn call_as(sk: &Sidekey, token: &str, conv: Option<&str>, path: &str) -> Resp {
    let mut headers = vec![("x-sidekey-session", token)];
    if let Some(c) = conv {
        headers.push(("x-conversation-id", c));
    }
    sk.agent(
        Method::GET,
        &format!("/v1/proxy/custom{path}"),
        &headers,
        "",
    )
    .await
}

async fn post_call(sk: &Sidekey, body: &[u8], sig: Option<&str>) -> Resp {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(s) = sig {
        headers.push(("elevenlabs-signature", s));
    }
    sk.agent(
        Method::POST,
        "/v1/elevenlabs/post-call",
        &headers,
        Bytes::copy_from_slice(body),
    )
    .await
}

async fn conversation_init(sk: &Sidekey, secret: Option<&str>, body: &Value) -> Resp {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(s) = secret {
        headers.push(("x-sidekey-init-secret", s));
    }
    sk.agent(
        Method::POST,
        "/v1/elevenlabs/conversation-init",
        &headers,
        body.to_string(),
    )
    .await
}

/// `sidekey_sessions_active` from the admin metrics.
async fn sessions_active(sk: &Sidekey) -> u64 {
    let r = sk.admin(Method::GET, "/metrics", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
        .lines()
        .find_map(|l| l.strip_prefix("sidekey_sessions_active "))
        .unwrap_or_else(|| panic!("no sidekey_sessions_active in metrics:\n{}", r.text()))
        .trim()
        .parse()
        .unwrap()
}

/// Writes a config (no server) with the slack/google/telegram presets and
/// the `custom` provider given, for the CLI commands that only read it.
fn cli_config(extra: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options::with_providers(&format!(
        "[providers.slack]\npreset = \"slack\"\n\n[providers.google]\npreset = \"google\"\n\n\
         [providers.telegram]\npreset = \"telegram\"\n\n{extra}"
    ));
    let path = dir.path().join("config.toml");
    std::fs::write(&path, opts.config_text()).unwrap();
    (dir, path)
}

/// `sidekey <args>` with some variables removed from the environment.
fn run_cli_without(dir: &Path, args: &[&str], remove: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(support::bin());
    cmd.args(args)
        .current_dir(dir)
        .env_remove("SIDEKEY_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for k in remove {
        cmd.env_remove(k);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every string in a JSON value (keys excluded).
fn strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(m) => m.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

/// Every dynamic variable a tool refers to: `{{name}}` in any string,
/// `variable_name` and `dynamic_variable` values.
fn referenced_variables(v: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    fn walk(v: &Value, out: &mut BTreeSet<String>) {
        match v {
            Value::String(s) => {
                let mut rest = s.as_str();
                while let Some(i) = rest.find("{{") {
                    let after = &rest[i + 2..];
                    let end = after.find("}}").unwrap_or(after.len());
                    out.insert(after[..end].trim().to_owned());
                    rest = &after[end..];
                }
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            Value::Object(m) => {
                for (k, x) in m {
                    if k == "variable_name" || k == "dynamic_variable" {
                        out.insert(x.as_str().unwrap_or("<not a string>").to_owned());
                    }
                    walk(x, out);
                }
            }
            _ => {}
        }
    }
    walk(v, &mut out);
    out
}

/// Each property of a schema properties map has exactly the source
/// ElevenLabs needs: a description for the LLM, or a dynamic variable or
/// constant. Recurses into nested objects and array items.
fn check_properties(tool: &str, where_: &str, props: &Value) {
    let Some(props) = props.as_object() else {
        panic!("{tool}: {where_} properties is not an object: {props}");
    };
    for (name, p) in props {
        let has_source = p
            .get("description")
            .and_then(Value::as_str)
            .is_some_and(|d| !d.trim().is_empty())
            || p.get("dynamic_variable").is_some()
            || p.get("constant_value").is_some()
            || p.get("is_system_provided") == Some(&Value::Bool(true));
        assert!(
            has_source,
            "{tool}: {where_}.{name} has no description/dynamic_variable/constant_value: {p}"
        );
        if let Some(inner) = p.get("properties") {
            check_properties(tool, &format!("{where_}.{name}"), inner);
        }
        if let Some(items) = p.get("items") {
            if let Some(inner) = items.get("properties") {
                check_properties(tool, &format!("{where_}.{name}[]"), inner);
            }
        }
    }
}

fn valid_tool_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

// ---------------------------------------------------------------------------
// 1. Mint → dynamic_variables → proxied call; the generic tool endpoint

#[tokio::test]
async fn minted_dynamic_variable_proxies_and_generic_tool_reaches_upstream() {
    let (up, sk) = start_custom().await;
    sk.put_credential("alice", "custom", json!({"access_token": "tok-alice-1"}))
        .await;
    let s = sk.session("alice", &["custom"]).await;
    let token = s["token"].as_str().unwrap();
    let vars = s["dynamic_variables"]
        .as_object()
        .unwrap_or_else(|| panic!("no dynamic_variables object in {s}"));
    assert_eq!(vars.len(), 1, "exactly one dynamic variable: {s}");
    assert_eq!(vars[SESSION_VAR].as_str(), Some(token));

    // What an agent tool sends: the variable's value as the whole header.
    let value = vars[SESSION_VAR].as_str().unwrap();
    let r = sk
        .agent(
            Method::GET,
            "/v1/proxy/custom/things?a=1",
            &[("x-sidekey-session", value)],
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.last();
    assert_eq!(seen.path, "/things");
    assert_eq!(seen.query.as_deref(), Some("a=1"));
    assert_eq!(seen.bearer().as_deref(), Some("tok-alice-1"));
    assert!(seen.header("x-sidekey-session").is_none());

    // The generic tool: the LLM fills method, path, query and body (a
    // string of JSON text, as the generated schema declares it).
    let spec = json!({
        "method": "POST",
        "path": "/chat.postMessage",
        "query": "a=1&b=two",
        "body": "{\"channel\": \"C123\", \"text\": \"Hello there\"}",
    });
    let r = sk
        .agent(
            Method::POST,
            "/v1/call/custom",
            &[
                ("x-sidekey-session", value),
                ("content-type", "application/json"),
            ],
            spec.to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["path"],
        "/chat.postMessage",
        "upstream answer passes through"
    );
    let seen = up.last();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path, "/chat.postMessage");
    assert_eq!(seen.query.as_deref(), Some("a=1&b=two"));
    assert_eq!(seen.bearer().as_deref(), Some("tok-alice-1"));
    assert!(
        seen.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{:?}",
        seen.headers
    );
    let body: Value = serde_json::from_slice(&seen.body).expect("upstream got JSON");
    assert_eq!(body, json!({"channel": "C123", "text": "Hello there"}));
    assert!(seen.header("x-sidekey-session").is_none());

    // Object query and object body work too; GET without a body sends none.
    let spec = json!({
        "method": "get",
        "path": "/calendar/v3/events",
        "query": {"maxResults": 5, "q": "team sync"},
    });
    let r = sk
        .agent(
            Method::POST,
            "/v1/call/custom",
            &[("x-sidekey-session", value)],
            spec.to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.last();
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.path, "/calendar/v3/events");
    let q: BTreeMap<String, String> =
        url::form_urlencoded::parse(seen.query.as_deref().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    assert_eq!(
        q,
        BTreeMap::from([
            ("maxResults".to_owned(), "5".to_owned()),
            ("q".to_owned(), "team sync".to_owned())
        ])
    );
    assert!(seen.body.is_empty());
    assert_eq!(seen.bearer().as_deref(), Some("tok-alice-1"));

    let spec = json!({"method": "PATCH", "path": "/items/7", "body": {"done": true, "n": [1, 2]}});
    let r = sk
        .agent(
            Method::POST,
            "/v1/call/custom",
            &[("x-sidekey-session", value)],
            spec.to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.last();
    assert_eq!(seen.method, "PATCH");
    assert_eq!(seen.path, "/items/7");
    assert_eq!(
        serde_json::from_slice::<Value>(&seen.body).unwrap(),
        json!({"done": true, "n": [1, 2]})
    );

    // Without the session the generic tool refuses and the upstream sees nothing.
    let n = up.count();
    let r = sk
        .agent(Method::POST, "/v1/call/custom", &[], spec.to_string())
        .await;
    r.assert_error(401, "invalid_session");
    assert_eq!(up.count(), n);
}

// ---------------------------------------------------------------------------
// 2. Conversation binding

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_bind_to_the_first_conversation_id() {
    let (up, sk) = start_custom().await;
    sk.put_credential("bob", "custom", json!({"access_token": "tok-bob"}))
        .await;

    // Bound by the first call that carries the header.
    let token = sk.token("bob", &["custom"]).await;
    let r = call_as(&sk, &token, Some("c1"), "/first").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = call_as(&sk, &token, Some("c1"), "/second").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let n = up.count();
    let r = call_as(&sk, &token, Some("c2"), "/third").await;
    r.assert_error(401, "conversation_mismatch");
    assert_eq!(
        up.count(),
        n,
        "a mismatched call never reaches the upstream"
    );
    // The conversation header is sidekey's, never forwarded.
    assert!(up.last().header("x-conversation-id").is_none());
    // A second conversation used it: revoked, so both holders lose it
    // (the error table).
    let r = call_as(&sk, &token, Some("c1"), "/fourth").await;
    r.assert_error(401, "invalid_session");
    assert_eq!(r.json()["error"]["reason"], "revoked");
    assert_eq!(up.count(), n);

    // Minted with a conversation id: bound from the start.
    let s = sk
        .session_with(json!({"user": "bob", "providers": ["custom"], "conversation_id": "conv-A"}))
        .await;
    let bound = s["token"].as_str().unwrap();
    assert_eq!(jwt_claims(bound)["conv"], "conv-A");
    let r = call_as(&sk, bound, Some("conv-A"), "/x").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = call_as(&sk, bound, Some("conv-B"), "/x").await;
    r.assert_error(401, "conversation_mismatch");
    let r = call_as(&sk, bound, Some("conv-A"), "/x").await;
    r.assert_error(401, "invalid_session");

    // Concurrent first calls with two ids: exactly one wins, every time.
    for round in 0..6 {
        let token = sk.token("bob", &["custom"]).await;
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let mut tasks = Vec::new();
        for side in ["x", "y"] {
            let conv = format!("race{round}-{side}");
            let path = format!("/race{round}/{side}");
            let (token, barrier) = (token.clone(), barrier.clone());
            let client = sk.client.clone();
            let url = sk.agent_url(&format!("/v1/proxy/custom{path}"));
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let r = support::send(
                    &client,
                    Method::GET,
                    &url,
                    &[
                        ("x-sidekey-session", token.as_str()),
                        ("x-conversation-id", conv.as_str()),
                    ],
                    "",
                )
                .await;
                (conv, path, r)
            }));
        }
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        let winners: Vec<_> = results.iter().filter(|(_, _, r)| r.status == 200).collect();
        assert_eq!(
            winners.len(),
            1,
            "round {round}: exactly one first call may bind: {:?}",
            results
                .iter()
                .map(|(c, _, r)| (c, r.status, r.text()))
                .collect::<Vec<_>>()
        );
        let (win_conv, win_path, _) = winners[0];
        let (lose_conv, _, loser) = results.iter().find(|(_, _, r)| r.status != 200).unwrap();
        loser.assert_error(401, "conversation_mismatch");
        // Afterwards the session is revoked: neither side can use it.
        let r = call_as(&sk, &token, Some(win_conv), &win_path.clone()).await;
        r.assert_error(401, "invalid_session");
        let r = call_as(&sk, &token, Some(lose_conv), "/late").await;
        r.assert_error(401, "invalid_session");
        let seen: Vec<String> = up
            .requests()
            .into_iter()
            .map(|r| r.path)
            .filter(|p| p.starts_with(&format!("/race{round}/")) || p == "/late")
            .collect();
        assert_eq!(
            seen,
            vec![win_path.clone()],
            "round {round}: the upstream saw only the winner's call"
        );
    }
}

// ---------------------------------------------------------------------------
// 3. Conversation-init webhook

#[tokio::test]
async fn conversation_init_maps_the_caller_to_a_session() {
    let (up, sk) = start_custom().await;
    let r = sk
        .admin(
            Method::PUT,
            "/v1/users/u",
            Some(json!({"phone_numbers": ["+1 (555) 123-4567"]})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["phone_numbers"], json!(["+15551234567"]));
    sk.put_credential("u", "custom", json!({"access_token": "tok-u"}))
        .await;

    let call = json!({
        "caller_id": "+15551234567",
        "agent_id": "agent_8401k2example",
        "called_number": "+15557654321",
        "call_sid": "CA0123456789abcdef0123456789abcdef",
    });
    let r = conversation_init(&sk, Some(INIT_SECRET), &call).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["type"], "conversation_initiation_client_data");
    let vars = v["dynamic_variables"].as_object().unwrap();
    assert_eq!(
        vars.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        BTreeSet::from([SESSION_VAR, "user_id"]),
        "{v}"
    );
    assert_eq!(vars["user_id"], "u");
    let token = vars[SESSION_VAR].as_str().unwrap().to_owned();
    assert_eq!(jwt_claims(&token)["sub"], "u");
    assert!(jwt_claims(&token).get("conv").is_none_or(Value::is_null));
    let r = call_as(&sk, &token, None, "/me").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().bearer().as_deref(), Some("tok-u"));

    // Newer ElevenLabs versions send the conversation id: bound from the start.
    let mut with_conv = call.clone();
    with_conv["conversation_id"] = json!("conv_init_1");
    let r = conversation_init(&sk, Some(INIT_SECRET), &with_conv).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["dynamic_variables"]["user_id"], "u");
    let bound = v["dynamic_variables"][SESSION_VAR]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(jwt_claims(&bound)["conv"], "conv_init_1");
    let r = call_as(&sk, &bound, Some("conv_init_1"), "/x").await;
    assert_eq!(r.status, 200, "{}", r.text());
    call_as(&sk, &bound, Some("conv_other"), "/x")
        .await
        .assert_error(401, "conversation_mismatch");

    // Unknown caller: same shape, no session.
    let before = sessions_active(&sk).await;
    let mut unknown = call.clone();
    unknown["caller_id"] = json!("+15550001111");
    let r = conversation_init(&sk, Some(INIT_SECRET), &unknown).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["type"], "conversation_initiation_client_data");
    let vars = v["dynamic_variables"].as_object().unwrap();
    assert!(vars.get(SESSION_VAR).is_none(), "{v}");
    assert!(vars["user_id"].is_string(), "{v}");
    assert_ne!(vars["user_id"], "u");
    assert_eq!(sessions_active(&sk).await, before);

    // Wrong or missing init secret: 401, nothing minted, no token leaked.
    for secret in [Some("not-the-init-secret"), Some(""), None] {
        let r = conversation_init(&sk, secret, &call).await;
        r.assert_error(401, "unauthorized");
        assert!(!r.text().contains("eyJ"), "no token in {}", r.text());
        assert_eq!(sessions_active(&sk).await, before, "secret {secret:?}");
    }

    // The number belongs to u: another user cannot take it.
    let r = sk
        .admin(
            Method::PUT,
            "/v1/users/v",
            Some(json!({"phone_numbers": ["+15551234567"]})),
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.error_code(), "conflict");
    let r = conversation_init(&sk, Some(INIT_SECRET), &call).await;
    assert_eq!(r.json()["dynamic_variables"]["user_id"], "u");
}

// ---------------------------------------------------------------------------
// 4. Post-call webhook

/// A chunked (no Content-Length) HTTP/1.1 client for large webhook bodies.
type StreamClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, BoxBody<Bytes, Infallible>>;

fn stream_client(ca_pem: &[u8]) -> StreamClient {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(https)
}

async fn post_call_chunked(sk: &Sidekey, body: Bytes, sig: &str) -> (StatusCode, Value) {
    let ca = std::fs::read(sk.path().join("certs/server.crt")).unwrap();
    let client = stream_client(&ca);
    let chunks: Vec<Result<Frame<Bytes>, Infallible>> = body
        .chunks(64 * 1024)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let req = Request::builder()
        .method(Method::POST)
        .uri(sk.agent_url("/v1/elevenlabs/post-call"))
        .header("content-type", "application/json")
        .header("elevenlabs-signature", sig)
        .body(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
            chunks,
        ))))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(60), client.request(req))
        .await
        .expect("post-call timed out")
        .expect("post-call request failed");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or_else(|_| json!(String::from_utf8_lossy(&bytes))),
    )
}

#[tokio::test]
async fn post_call_webhook_revokes_the_conversations_sessions() {
    let (_up, sk) = start_custom().await;
    sk.put_credential("carol", "custom", json!({"access_token": "tok-carol"}))
        .await;
    let mint = |conv: &'static str| {
        let sk = &sk;
        async move {
            sk.session_with(
                json!({"user": "carol", "providers": ["custom"], "conversation_id": conv}),
            )
            .await["token"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let ok = |r: Resp| assert_eq!(r.status, 200, "{}", r.text());

    // conv-A: one minted bound, one bound by its first call.
    let a1 = mint("conv-A").await;
    let a2 = sk.token("carol", &["custom"]).await;
    ok(call_as(&sk, &a2, Some("conv-A"), "/bind").await);
    let b = mint("conv-B").await;
    let c = mint("conv-C").await;
    let d = mint("conv-D").await;
    let free = sk.token("carol", &["custom"]).await;

    // post_call_transcription for conv-A.
    let ev = json!({
        "type": "post_call_transcription",
        "event_timestamp": unix_now(),
        "data": {
            "agent_id": "agent_1",
            "conversation_id": "conv-A",
            "status": "done",
            "transcript": [{"role": "agent", "message": "Hi, how can I help?", "time_in_call_secs": 0}],
            "metadata": {"call_duration_secs": 42},
            "analysis": {"call_successful": "success"},
            "conversation_initiation_client_data": {"dynamic_variables": {"user_id": "carol"}},
        }
    });
    let body = serde_json::to_vec(&ev).unwrap();
    let r = post_call(&sk, &body, Some(&signature(&body))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "ok");
    for t in [&a1, &a2] {
        call_as(&sk, t, Some("conv-A"), "/after")
            .await
            .assert_error(401, "invalid_session");
    }
    ok(call_as(&sk, &b, Some("conv-B"), "/still").await);
    ok(call_as(&sk, &free, None, "/still").await);
    // Redelivery of the same event (even with the very same signature): 200, harmless.
    let sig = signature(&body);
    for _ in 0..2 {
        let r = post_call(&sk, &body, Some(&sig)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["status"], "ok");
    }
    ok(call_as(&sk, &b, Some("conv-B"), "/still").await);

    // post_call_audio for conv-B: several MiB of base64 audio, sent chunked.
    let mut audio = Vec::with_capacity(4 << 20);
    let mut x: u32 = 0x1234_5678;
    for _ in 0..(4 << 20) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        audio.push(x as u8);
    }
    let full_audio = base64::engine::general_purpose::STANDARD.encode(&audio);
    // conversation_id after the big field: no reliance on field order.
    let body = Bytes::from(format!(
        r#"{{"type":"post_call_audio","event_timestamp":{},"data":{{"agent_id":"agent_1","full_audio":"{full_audio}","conversation_id":"conv-B"}}}}"#,
        unix_now()
    ));
    assert!(body.len() > 5 << 20);
    let (status, v) = post_call_chunked(&sk, body.clone(), &signature(&body)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "ok");
    call_as(&sk, &b, Some("conv-B"), "/after")
        .await
        .assert_error(401, "invalid_session");
    let (status, v) = post_call_chunked(&sk, body.clone(), &signature(&body)).await;
    assert_eq!(status, 200, "redelivery: {v}");
    ok(call_as(&sk, &c, Some("conv-C"), "/still").await);

    // call_initiation_failure for conv-C.
    let ev = json!({
        "type": "call_initiation_failure",
        "event_timestamp": unix_now(),
        "data": {"agent_id": "agent_1", "conversation_id": "conv-C", "failure_reason": "busy",
                 "metadata": {"type": "twilio", "body": {}}},
    });
    let body = serde_json::to_vec(&ev).unwrap();
    let r = post_call(&sk, &body, Some(&signature(&body))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    call_as(&sk, &c, Some("conv-C"), "/after")
        .await
        .assert_error(401, "invalid_session");
    ok(call_as(&sk, &d, Some("conv-D"), "/still").await);
    ok(call_as(&sk, &free, None, "/still").await);

    // Refused deliveries for conv-D: 401 each, nothing revoked.
    let ev = json!({"type": "post_call_transcription", "event_timestamp": unix_now(),
                    "data": {"agent_id": "agent_1", "conversation_id": "conv-D", "status": "done"}});
    let body = serde_json::to_vec(&ev).unwrap();
    let now = unix_now();
    let good = sign(WEBHOOK_SECRET, now, &body);
    let tampered = serde_json::to_vec(&json!({"type": "post_call_transcription", "event_timestamp": now,
                    "data": {"agent_id": "agent_2", "conversation_id": "conv-D", "status": "done"}}))
    .unwrap();
    let stale_t = now - 31 * 60;
    let refused: Vec<(&str, Vec<u8>, Option<String>)> = vec![
        (
            "tampered body",
            tampered,
            Some(format!("t={now},v0={good}")),
        ),
        (
            "wrong secret",
            body.clone(),
            Some(format!("t={now},v0={}", sign("not-the-secret", now, &body))),
        ),
        (
            "stale timestamp",
            body.clone(),
            Some(format!(
                "t={stale_t},v0={}",
                sign(WEBHOOK_SECRET, stale_t, &body)
            )),
        ),
        (
            "timestamp not the signed one",
            body.clone(),
            Some(format!("t={},v0={good}", now - 1)),
        ),
        ("missing header", body.clone(), None),
        ("malformed header", body.clone(), Some("garbage".into())),
        ("no v0", body.clone(), Some(format!("t={now}"))),
        ("no t", body.clone(), Some(format!("v0={good}"))),
        (
            "t not a number",
            body.clone(),
            Some(format!("t=yesterday,v0={good}")),
        ),
        (
            "v0 not hex",
            body.clone(),
            Some(format!("t={now},v0=not-hex-at-all")),
        ),
    ];
    for (why, b, sig) in &refused {
        let r = post_call(&sk, b, sig.as_deref()).await;
        assert_eq!(r.status, 401, "{why}: {}", r.text());
        assert!(r.error_code().len() > 1, "{why}");
        ok(call_as(&sk, &d, Some("conv-D"), "/still").await);
    }

    // Several v0 values (secret rotation), one of them valid: accepted.
    let other = sign("the-old-secret", now, &body);
    let r = post_call(&sk, &body, Some(&format!("t={now},v0={other},v0={good}"))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    call_as(&sk, &d, Some("conv-D"), "/after")
        .await
        .assert_error(401, "invalid_session");
    ok(call_as(&sk, &free, None, "/still").await);
}

// ---------------------------------------------------------------------------
// 5. Tool definitions

#[tokio::test]
async fn generated_tools_match_elevenlabs_rules_and_work_as_called() {
    let up = Upstream::start().await;
    let sk = Sidekey::start(Options::with_providers(&format!(
        "{}\n[providers.slack]\npreset = \"slack\"\n",
        provider_toml("custom", &up.url, "")
    )))
    .await;
    let r = sk.admin(Method::GET, "/v1/elevenlabs/tools", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let from_admin = r.json();
    let config = sk.config_path();
    let (code, out, err) = run_cli(
        sk.path(),
        &["elevenlabs", "tools", "--config", config.to_str().unwrap()],
        &[],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let from_cli: Value = serde_json::from_str(&out).expect("tools prints JSON");
    assert_eq!(
        from_cli, from_admin,
        "CLI and admin API print the same tools"
    );

    let tools = from_admin.as_array().expect("a JSON array");
    assert!(tools.len() >= 3, "refresh + one per provider: {from_admin}");
    let mut names = BTreeSet::new();
    let mut urls = Vec::new();
    for t in tools {
        let tc = t["tool_config"]
            .as_object()
            .unwrap_or_else(|| panic!("no tool_config in {t}"));
        let name = tc["name"].as_str().unwrap();
        assert!(valid_tool_name(name), "bad tool name {name:?}");
        assert!(names.insert(name.to_owned()), "duplicate tool name {name}");
        assert_eq!(tc["type"], "webhook", "{name}");
        assert!(
            tc["description"]
                .as_str()
                .is_some_and(|d| d.trim().len() > 10),
            "{name}: description"
        );
        assert_eq!(tc["tool_error_handling_mode"], "passthrough", "{name}");
        let timeout = tc["response_timeout_secs"].as_u64().unwrap();
        assert!(
            timeout > 5 && (5..=300).contains(&timeout),
            "{name}: response_timeout_secs {timeout} must exceed upstream_timeout_secs (5)"
        );
        let api = tc["api_schema"].as_object().unwrap();
        let url = api["url"].as_str().unwrap();
        assert!(url.starts_with(&format!("{PUBLIC_URL}/")), "{name}: {url}");
        urls.push(url.to_owned());
        assert!(
            ["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&api["method"].as_str().unwrap()),
            "{name}"
        );
        let headers = api["request_headers"].as_object().unwrap();
        assert_eq!(
            headers["X-Sidekey-Session"],
            json!({"variable_name": SESSION_VAR}),
            "{name}"
        );
        assert_eq!(
            headers["X-Conversation-Id"],
            json!({"variable_name": "system__conversation_id"}),
            "{name}"
        );
        for key in ["request_body_schema", "query_params_schema"] {
            if let Some(s) = api.get(key) {
                check_properties(name, key, &s["properties"]);
            }
        }
        if let Some(s) = api.get("path_params_schema") {
            check_properties(name, "path_params_schema", s);
        }
        for var in referenced_variables(t) {
            assert!(
                var.starts_with("secret__") || var.starts_with("system__"),
                "{name} refers to {var:?}, which only ElevenLabs' secret__/system__ variables may be"
            );
        }
    }
    assert!(
        urls.contains(&format!("{PUBLIC_URL}/v1/session/refresh")),
        "the refresh tool is among them: {urls:?}"
    );
    for p in ["custom", "slack"] {
        assert!(
            urls.iter()
                .any(|u| u.contains(&format!("/v1/call/{p}"))
                    || u.contains(&format!("/v1/proxy/{p}/"))),
            "no tool reaches provider {p}: {urls:?}"
        );
    }

    // Call the custom provider's tool the way ElevenLabs would: resolve the
    // typed headers from the conversation's variables, fill the body.
    sk.put_credential("dora", "custom", json!({"access_token": "tok-dora"}))
        .await;
    let token = sk.token("dora", &["custom", "slack"]).await;
    let vars = BTreeMap::from([
        (SESSION_VAR.to_owned(), token.clone()),
        (
            "system__conversation_id".to_owned(),
            "conv_tool_1".to_owned(),
        ),
    ]);
    let resolve = |api: &Value| -> Vec<(String, String)> {
        api["request_headers"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let val = match v {
                    Value::String(s) => s.clone(),
                    _ => vars[v["variable_name"].as_str().unwrap()].clone(),
                };
                (k.clone(), val)
            })
            .collect()
    };
    let send_tool = |api: Value, body: Value| {
        let headers = resolve(&api);
        let url = api["url"]
            .as_str()
            .unwrap()
            .replace(PUBLIC_URL, &sk.agent_url(""));
        let method = Method::from_bytes(api["method"].as_str().unwrap().as_bytes()).unwrap();
        let client = sk.client.clone();
        async move {
            let mut hs: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            hs.push(("content-type", "application/json"));
            support::send(&client, method, &url, &hs, body.to_string()).await
        }
    };
    let custom_tool = tools
        .iter()
        .find(|t| {
            t["tool_config"]["api_schema"]["url"]
                .as_str()
                .unwrap()
                .contains("/v1/call/custom")
        })
        .unwrap();
    let r = send_tool(
        custom_tool["tool_config"]["api_schema"].clone(),
        json!({"method": "POST", "path": "/notes", "body": "{\"text\": \"remember milk\"}"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.last();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("POST", "/notes")
    );
    assert_eq!(seen.bearer().as_deref(), Some("tok-dora"));
    assert_eq!(
        serde_json::from_slice::<Value>(&seen.body).unwrap(),
        json!({"text": "remember milk"})
    );

    let refresh_tool = tools
        .iter()
        .find(|t| {
            t["tool_config"]["api_schema"]["url"] == format!("{PUBLIC_URL}/v1/session/refresh")
        })
        .unwrap();
    let r = send_tool(
        refresh_tool["tool_config"]["api_schema"].clone(),
        json!({"provider": "slack"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["providers"]["slack"]["status"], "credential_missing");
    assert!(!r.text().contains("tok-dora"));
    // The tool bound the session to the conversation ElevenLabs named: a
    // call from another conversation is a conflict.
    let r = call_as(&sk, &token, Some("conv_tool_2"), "/x").await;
    r.assert_error(401, "conversation_mismatch");
}

// ---------------------------------------------------------------------------
// 6. rewrite-tool

fn rewrite(config: &Path, tool: &Value) -> (i32, String, String) {
    run_cli(
        config.parent().unwrap(),
        &[
            "elevenlabs",
            "rewrite-tool",
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
        Some(&tool.to_string()),
    )
}

/// Checks what every rewritten tool must satisfy and returns its api_schema.
fn check_rewritten(out: &str, expected_url: &str) -> Value {
    let v: Value = serde_json::from_str(out).unwrap_or_else(|_| panic!("not JSON: {out}"));
    let tc = v.get("tool_config").unwrap_or(&v);
    let api = &tc["api_schema"];
    assert_eq!(api["url"], expected_url, "{v}");
    let headers = api["request_headers"].as_object().unwrap();
    assert!(
        headers
            .keys()
            .all(|k| !k.eq_ignore_ascii_case("authorization")),
        "credential header removed: {v}"
    );
    assert_eq!(
        headers["X-Sidekey-Session"],
        json!({"variable_name": SESSION_VAR})
    );
    assert_eq!(
        headers["X-Conversation-Id"],
        json!({"variable_name": "system__conversation_id"})
    );
    assert!(
        headers.values().all(|h| h.get("secret_id").is_none()),
        "no workspace secret left: {v}"
    );
    for var in referenced_variables(&v) {
        assert!(
            var == SESSION_VAR || var.starts_with("system__"),
            "provider secret {var:?} left in {v}"
        );
    }
    let mut all = Vec::new();
    strings(&v, &mut all);
    assert!(
        all.iter()
            .all(|s| !s.contains("secret__") || s == SESSION_VAR),
        "provider secret left in {v}"
    );
    assert_eq!(tc["tool_error_handling_mode"], "passthrough");
    api.clone()
}

#[test]
fn rewrite_tool_repoints_slack_google_and_telegram_tools() {
    let (_dir, config) = cli_config("");

    let slack = json!({"tool_config": {
        "type": "webhook",
        "name": "slack_post_message",
        "description": "Posts a message to a Slack channel.",
        "api_schema": {
            "url": "https://slack.com/api/chat.postMessage",
            "method": "POST",
            "request_headers": {
                "Authorization": "Bearer {{secret__slack_token}}",
                "Content-Type": "application/json; charset=utf-8"
            },
            "request_body_schema": {
                "type": "object",
                "description": "The message.",
                "required": ["channel", "text"],
                "properties": {
                    "channel": {"type": "string", "description": "Channel id."},
                    "text": {"type": "string", "description": "Message text."}
                }
            }
        }
    }});
    let (code, out, err) = rewrite(&config, &slack);
    assert_eq!(code, 0, "{err}");
    let api = check_rewritten(
        &out,
        &format!("{PUBLIC_URL}/v1/proxy/slack/chat.postMessage"),
    );
    assert_eq!(api["method"], "POST");
    assert_eq!(
        api["request_headers"]["Content-Type"], "application/json; charset=utf-8",
        "other headers are kept"
    );
    assert_eq!(
        api["request_body_schema"], slack["tool_config"]["api_schema"]["request_body_schema"],
        "the schema the LLM fills is unchanged"
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["tool_config"]["name"], "slack_post_message");
    assert_eq!(
        v["tool_config"]["description"],
        "Posts a message to a Slack channel."
    );

    let google = json!({"tool_config": {
        "type": "webhook",
        "name": "list_events",
        "description": "Lists calendar events.",
        "api_schema": {
            "url": "https://www.googleapis.com/calendar/v3/calendars/{calendar_id}/events",
            "method": "GET",
            "path_params_schema": {
                "calendar_id": {"type": "string", "description": "Calendar id, e.g. primary."}
            },
            "query_params_schema": {
                "properties": {"maxResults": {"type": "integer", "description": "How many."}},
                "required": []
            },
            "request_headers": {"Authorization": {"secret_id": "sec_google_abc123"}}
        }
    }});
    let (code, out, err) = rewrite(&config, &google);
    assert_eq!(code, 0, "{err}");
    let api = check_rewritten(
        &out,
        &format!("{PUBLIC_URL}/v1/proxy/google/calendar/v3/calendars/{{calendar_id}}/events"),
    );
    assert_eq!(
        api["path_params_schema"],
        google["tool_config"]["api_schema"]["path_params_schema"]
    );
    assert_eq!(
        api["query_params_schema"],
        google["tool_config"]["api_schema"]["query_params_schema"]
    );
    assert!(!out.contains("sec_google_abc123"));

    let telegram = json!({"tool_config": {
        "type": "webhook",
        "name": "telegram_send",
        "description": "Sends a Telegram message.",
        "api_schema": {
            "url": "https://api.telegram.org/bot{{secret__telegram_bot_token}}/sendMessage",
            "method": "POST",
            "request_body_schema": {
                "type": "object",
                "description": "The message.",
                "properties": {
                    "chat_id": {"type": "integer", "description": "Chat id."},
                    "text": {"type": "string", "description": "Text."}
                }
            }
        }
    }});
    let (code, out, err) = rewrite(&config, &telegram);
    assert_eq!(code, 0, "{err}");
    check_rewritten(&out, &format!("{PUBLIC_URL}/v1/proxy/telegram/sendMessage"));
    assert!(!out.contains("telegram_bot_token"));

    // A URL no provider covers: exit 2, one clear line naming it.
    let github = json!({"tool_config": {"type": "webhook", "name": "me", "description": "d",
        "api_schema": {"url": "https://api.github.com/user/repos", "method": "GET"}}});
    let (code, out, err) = rewrite(&config, &github);
    assert_eq!(code, 2, "stdout: {out}\nstderr: {err}");
    assert!(out.trim().is_empty(), "nothing printed on stdout: {out}");
    assert!(
        err.lines()
            .any(|l| l.contains("https://api.github.com/user/repos")),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

// ---------------------------------------------------------------------------
// 7. push-tools against a fake ElevenLabs API

const XI_KEY: &str = "xi_test_key_7f3a9c2e5b1d";

#[derive(Default)]
struct FakeEl {
    /// (id, tool_config), in creation order.
    tools: Vec<(String, Value)>,
    /// (method, path, body) of every authorised call.
    calls: Vec<(String, String, Value)>,
    /// Calls that came without the right `xi-api-key`.
    unauthorised: usize,
    next: usize,
}

fn el_reply(status: u16, v: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())))
        .unwrap()
}

async fn fake_el_handle(st: Arc<Mutex<FakeEl>>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let key_ok = req
        .headers()
        .get("xi-api-key")
        .and_then(|v| v.to_str().ok())
        == Some(XI_KEY);
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(_) => return el_reply(422, json!({"detail": "body is not JSON"})),
        }
    };
    let mut st = st.lock().unwrap();
    if !key_ok {
        st.unauthorised += 1;
        return el_reply(401, json!({"detail": {"status": "invalid_api_key"}}));
    }
    st.calls.push((method.clone(), path.clone(), body.clone()));
    match (method.as_str(), path.as_str()) {
        ("GET", "/v1/convai/tools") => el_reply(
            200,
            json!({"tools": st.tools.iter().map(|(id, tc)| json!({
                "id": id, "tool_config": tc,
                "access_info": {"is_creator": true, "creator_name": "test", "creator_email": "t@example.com", "role": "admin"},
            })).collect::<Vec<_>>()}),
        ),
        ("POST", "/v1/convai/tools") => {
            let Some(tc) = body.get("tool_config").cloned() else {
                return el_reply(422, json!({"detail": "tool_config is required"}));
            };
            st.next += 1;
            let id = format!("tool_{:04}", st.next);
            st.tools.push((id.clone(), tc.clone()));
            el_reply(200, json!({"id": id, "tool_config": tc}))
        }
        ("PATCH", p) if p.starts_with("/v1/convai/tools/") => {
            let id = &p["/v1/convai/tools/".len()..];
            let Some(tc) = body.get("tool_config").cloned() else {
                return el_reply(422, json!({"detail": "tool_config is required"}));
            };
            match st.tools.iter_mut().find(|(i, _)| i == id) {
                Some(slot) => {
                    slot.1 = tc.clone();
                    el_reply(200, json!({"id": id, "tool_config": tc}))
                }
                None => el_reply(404, json!({"detail": "tool not found"})),
            }
        }
        _ => el_reply(404, json!({"detail": "not found"})),
    }
}

async fn start_fake_el(st: Arc<Mutex<FakeEl>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let st = st.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let st = st.clone();
                    async move { Ok::<_, Infallible>(fake_el_handle(st, req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn push_tools_creates_then_updates_without_duplicates() {
    let (dir, config) = cli_config("");
    let state = Arc::new(Mutex::new(FakeEl::default()));
    // Someone else's tool in the workspace: never touched.
    state.lock().unwrap().tools.push((
        "tool_theirs".into(),
        json!({"type": "webhook", "name": "weather_lookup", "description": "d",
               "api_schema": {"url": "https://weather.example/api", "method": "GET"}}),
    ));
    let base = start_fake_el(state.clone()).await;
    let cfg = config.to_str().unwrap().to_owned();
    let dir_path = dir.path().to_path_buf();

    let (code, out, err) = run_cli(
        &dir_path,
        &["elevenlabs", "tools", "--config", &cfg],
        &[],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let expected: Vec<Value> = serde_json::from_str(&out).unwrap();
    let expected_names: BTreeSet<String> = expected
        .iter()
        .map(|t| t["tool_config"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(expected_names.len(), expected.len());

    let push = {
        let (dir_path, cfg, base) = (dir_path.clone(), cfg.clone(), base.clone());
        move || {
            let (dir_path, cfg, base) = (dir_path.clone(), cfg.clone(), base.clone());
            tokio::task::spawn_blocking(move || {
                run_cli(
                    &dir_path,
                    &[
                        "elevenlabs",
                        "push-tools",
                        "--allow-unreachable",
                        "--config",
                        &cfg,
                        "--api-base",
                        &base,
                    ],
                    &[("ELEVENLABS_API_KEY".into(), XI_KEY.into())],
                    None,
                )
            })
        }
    };

    // First run: every tool created, with exactly the generated definition.
    let (code, out, err) = push().await.unwrap();
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(
        !out.contains(XI_KEY) && !err.contains(XI_KEY),
        "API key printed"
    );
    {
        let st = state.lock().unwrap();
        assert_eq!(st.unauthorised, 0, "every call carries xi-api-key");
        let posts: Vec<&Value> = st
            .calls
            .iter()
            .filter(|(m, _, _)| m == "POST")
            .map(|(_, _, b)| b)
            .collect();
        assert_eq!(posts.len(), expected.len(), "one create per tool");
        for t in &expected {
            assert!(posts.contains(&t), "not created as generated: {t}");
        }
        assert!(st.calls.iter().all(|(m, _, _)| m != "PATCH"));
        assert_eq!(st.tools.len(), expected.len() + 1);
        assert!(!st.calls.iter().any(|(_, p, _)| p.ends_with("/tool_theirs")));
    }
    for name in &expected_names {
        assert!(
            out.lines()
                .any(|l| l.contains(name.as_str()) && l.contains("created")),
            "no 'created {name}' line in:\n{out}"
        );
    }

    // Second run: the same tools updated in place, nothing created.
    let before = state.lock().unwrap().calls.len();
    let (code, out, err) = push().await.unwrap();
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(
        !out.contains(XI_KEY) && !err.contains(XI_KEY),
        "API key printed"
    );
    {
        let st = state.lock().unwrap();
        let run2 = &st.calls[before..];
        assert!(
            run2.iter().all(|(m, _, _)| m != "POST"),
            "second run creates nothing: {run2:?}"
        );
        let patched: Vec<&str> = run2
            .iter()
            .filter(|(m, _, _)| m == "PATCH")
            .map(|(_, p, _)| p.as_str())
            .collect();
        assert_eq!(patched.len(), expected.len(), "one update per tool");
        let ours: BTreeSet<String> = st
            .tools
            .iter()
            .filter(|(_, tc)| expected_names.contains(tc["name"].as_str().unwrap()))
            .map(|(id, _)| format!("/v1/convai/tools/{id}"))
            .collect();
        assert_eq!(
            patched
                .iter()
                .map(|p| p.to_string())
                .collect::<BTreeSet<_>>(),
            ours,
            "each of our tools updated once, by its id"
        );
        assert_eq!(st.tools.len(), expected.len() + 1, "no duplicates");
        for (_, _, b) in run2.iter().filter(|(m, _, _)| m == "PATCH") {
            assert!(
                expected.contains(b),
                "update body is the generated tool: {b}"
            );
        }
        assert_eq!(st.unauthorised, 0);
    }
    assert!(
        out.lines().filter(|l| l.contains("updated")).count() == expected.len(),
        "{out}"
    );

    // No API key: exit 2 with one clear line, and ElevenLabs is not called.
    let before = state.lock().unwrap().calls.len();
    let (code, out, err) = {
        let (dir_path, cfg, base) = (dir_path.clone(), cfg.clone(), base.clone());
        tokio::task::spawn_blocking(move || {
            run_cli_without(
                &dir_path,
                &[
                    "elevenlabs",
                    "push-tools",
                    "--allow-unreachable",
                    "--config",
                    &cfg,
                    "--api-base",
                    &base,
                ],
                &["ELEVENLABS_API_KEY"],
            )
        })
        .await
        .unwrap()
    };
    assert_eq!(code, 2, "stdout: {out}\nstderr: {err}");
    assert!(
        err.lines().any(|l| l.contains("ELEVENLABS_API_KEY")),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let st = state.lock().unwrap();
    assert_eq!(st.calls.len(), before);
    assert_eq!(st.unauthorised, 0);
}

#[tokio::test]
async fn push_refuses_a_public_url_elevenlabs_cannot_reach_and_never_pushes_the_demo() {
    let state = Arc::new(Mutex::new(FakeEl::default()));
    let base = start_fake_el(state.clone()).await;
    let run = |config: PathBuf, dir: PathBuf, args: Vec<String>| {
        let base = base.clone();
        tokio::task::spawn_blocking(move || {
            let mut a: Vec<String> = vec!["elevenlabs".into()];
            a.extend(args);
            a.extend([
                "--config".into(),
                config.to_str().unwrap().into(),
                "--api-base".into(),
                base,
            ]);
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            run_cli(
                &dir,
                &a,
                &[("ELEVENLABS_API_KEY".into(), XI_KEY.into())],
                None,
            )
        })
    };
    // The default public_url is https://localhost:<port>.
    let (dir, config) = cli_config("[providers.demo]\nbase_url = \"http://127.0.0.1:8099\"\n");
    for cmd in ["push-tools", "push-mcp"] {
        let (code, out, err) = run(config.clone(), dir.path().into(), vec![cmd.into()])
            .await
            .unwrap();
        assert_eq!(code, 2, "{cmd}: {out}{err}");
        assert!(
            err.contains("cannot reach it") && err.contains("--allow-unreachable"),
            "{err}"
        );
        assert!(err.contains("cloudflared"), "the fix in one line: {err}");
    }
    assert!(
        state.lock().unwrap().calls.is_empty(),
        "ElevenLabs was not called"
    );
    for bad in [
        "http://sidekey.acme-voice.com",
        "https://127.0.0.1:8443",
        "https://10.1.2.3",
        "https://192.168.1.20:8443",
        "https://169.254.1.1",
        "https://[::1]:8443",
        "https://[fd00::1]",
        "https://box.local",
        "https://devbox",
    ] {
        assert!(
            sidekey::commands::unreachable_reason(bad).is_some(),
            "{bad}"
        );
    }
    assert!(sidekey::commands::unreachable_reason("https://sidekey.acme-voice.com").is_none());

    // With a public URL: every tool but the demo provider's is pushed.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let text = Options::with_providers(
        "[providers.slack]\npreset = \"slack\"\n\n[providers.demo]\nbase_url = \"http://127.0.0.1:8099\"\n",
    )
    .server("public_url = \"https://sidekey.acme-voice.com\"")
    .config_text();
    std::fs::write(&config, text).unwrap();
    let (code, out, err) = run(config.clone(), dir.path().into(), vec!["push-tools".into()])
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("sidekey_demo"), "{out}");
    assert!(out.contains("sidekey_slack"), "{out}");
    // Named, it is pushed (and only it).
    let (code, out, err) = run(
        config,
        dir.path().into(),
        vec!["push-tools".into(), "--provider".into(), "demo".into()],
    )
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("sidekey_demo") && !out.contains("sidekey_slack"),
        "{out}"
    );
}
