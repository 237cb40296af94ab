//! Retell's custom functions (`POST /v1/retell/tools/{name}`) and webhooks
//! (`POST /v1/retell/webhook`) against the real binary, every request
//! signed by the Retell SDK's own `retell.lib.webhook_auth` and the tool
//! definitions checked against the SDK's custom-tool type.
use sidekey_testkit as support;

use http::Method;
use serde_json::{Value, json};
use support::upstream::Upstream;
use support::{Options, Resp, Sidekey, run_cli, run_python};

const TOKEN: &str = "ya29.retell-alice-google-token-0001";
const API_KEY: &str = "key_retell_api_key_for_tests_0001";

/// `argv[1]`: `{"mode": "sign", "key", "bodies", "timestamp"?}` → the
/// signatures (checked with the SDK's verify when fresh), or
/// `{"mode": "check-tools", "tools"}` → their names.
const PY: &str = r#"
import json, sys
spec = json.loads(sys.argv[1])
if spec["mode"] == "sign":
    from retell.lib.webhook_auth import symmetric, verify
    out = []
    for b in spec["bodies"]:
        ts = spec.get("timestamp")
        sig = symmetric["sign"](b, spec["key"], ts) if ts else symmetric["sign"](b, spec["key"])
        if not ts:
            assert verify(b, spec["key"], sig), sig
        out.append(sig)
    print(json.dumps(out))
else:
    import pydantic
    from retell.types.llm_create_params import GeneralToolCustomTool
    ta = pydantic.TypeAdapter(GeneralToolCustomTool)
    print(json.dumps([ta.validate_python(t)["name"] for t in spec["tools"]]))
"#;

fn py(spec: Value) -> Value {
    let (code, out, err) = run_python(PY, &[&spec.to_string()], &[]);
    assert_eq!(code, 0, "retell SDK script failed:\n{err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("not JSON: {out}"))
}

/// Signs each body with the SDK, as Retell signs its requests.
fn sign_all(key: &str, bodies: &[String], timestamp: Option<i64>) -> Vec<String> {
    let mut spec = json!({"mode": "sign", "key": key, "bodies": bodies});
    if let Some(t) = timestamp {
        spec["timestamp"] = json!(t);
    }
    serde_json::from_value(py(spec)).unwrap()
}

async fn start(up: &Upstream) -> Sidekey {
    Sidekey::start(
        Options::with_providers(&format!(
            r#"[providers.google]
preset = "google"
base_url = "{}"
tools = ["*"]

[providers.slack]
preset = "slack"
base_url = "{}"
tools = ["post_message"]

[retell]
api_key_env = "RETELL_API_KEY"
"#,
            up.url, up.url
        ))
        .env("RETELL_API_KEY", API_KEY),
    )
    .await
}

async fn post(sk: &Sidekey, path: &str, body: &str, sig: Option<&str>) -> Resp {
    let mut h = vec![("content-type", "application/json")];
    if let Some(s) = sig {
        h.push(("x-retell-signature", s));
    }
    sk.agent(Method::POST, path, &h, body.to_owned()).await
}

fn function_call(name: &str, call_id: &str, token: &str, args: Value) -> String {
    json!({
        "name": name,
        "call": {
            "call_id": call_id,
            "agent_id": "agent_1",
            "call_status": "ongoing",
            "retell_llm_dynamic_variables": {"sidekey_session": token},
        },
        "args": args,
    })
    .to_string()
}

/// Signs and sends each (path, body) in order.
async fn send_all(sk: &Sidekey, reqs: &[(&str, String)]) -> Vec<Resp> {
    let bodies: Vec<String> = reqs.iter().map(|(_, b)| b.clone()).collect();
    let sigs = sign_all(API_KEY, &bodies, None);
    let mut out = Vec::new();
    for ((path, body), sig) in reqs.iter().zip(&sigs) {
        out.push(post(sk, path, body, Some(sig)).await);
    }
    out
}

fn assert_no_token(sk: &Sidekey, texts: &[String]) {
    for t in texts {
        assert!(!t.contains(TOKEN), "the provider token leaked: {t}");
    }
    assert!(
        !sk.log_text().contains(TOKEN),
        "the provider token is in the log"
    );
}

#[tokio::test]
async fn a_custom_function_answers_the_upstream_body_and_refusals_as_200() {
    let up = Upstream::start().await;
    let sk = start(&up).await;
    sk.put_credential("alice", "google", json!({"access_token": TOKEN}))
        .await;
    let s = sk.token("alice", &["google"]).await;
    let slack_only = sk.token("alice", &["slack"]).await;
    let rs = send_all(
        &sk,
        &[
            (
                "/v1/retell/tools/google_drive_get_file",
                function_call(
                    "google_drive_get_file",
                    "retell-call-1",
                    &s,
                    json!({"fileId": "r1"}),
                ),
            ),
            (
                "/v1/retell/tools/google_drive_get_file",
                function_call(
                    "google_drive_get_file",
                    "retell-call-2",
                    &slack_only,
                    json!({"fileId": "r2"}),
                ),
            ),
            (
                "/v1/retell/tools/no_such_tool",
                function_call("no_such_tool", "retell-call-1", &s, json!({})),
            ),
            (
                "/v1/retell/tools/google_drive_get_file",
                function_call(
                    "google_drive_get_file",
                    "retell-call-other",
                    &s,
                    json!({"fileId": "r3"}),
                ),
            ),
        ],
    )
    .await;
    assert_eq!(rs[0].status, 200, "{}", rs[0].text());
    assert_eq!(rs[0].json()["path"], "/drive/v3/files/r1");
    assert_eq!(up.count(), 1);
    assert_eq!(up.last().bearer().as_deref(), Some(TOKEN));
    assert!(up.last().header("x-retell-signature").is_none());

    // Refusals: 200, sidekey's error JSON and header, a sentence for the LLM.
    rs[1].assert_error(200, "provider_not_allowed");
    assert_eq!(
        rs[1].json()["error"]["message"],
        "This conversation wasn't given access to your Google account."
    );
    rs[2].assert_error(200, "unknown_tool");
    // The session was bound to retell-call-1 by its first call.
    rs[3].assert_error(200, "conversation_mismatch");
    assert_eq!(up.count(), 1);

    let audit = sk.audit_of_kind("proxy").await;
    let rec = audit
        .iter()
        .find(|a| a["tool"] == "google_drive_get_file" && a["status"] == 200)
        .unwrap_or_else(|| panic!("no audited tool call in {audit:?}"));
    assert_eq!(rec["user"], "alice");
    assert_eq!(rec["conversation_id"], "retell-call-1");
    assert_no_token(&sk, &rs.iter().map(Resp::text).collect::<Vec<_>>());
}

#[tokio::test]
async fn unsigned_wrongly_signed_and_stale_requests_are_refused() {
    let up = Upstream::start().await;
    let sk = start(&up).await;
    sk.put_credential("alice", "google", json!({"access_token": TOKEN}))
        .await;
    let s = sk.token("alice", &["google"]).await;
    let body = function_call(
        "google_drive_get_file",
        "retell-sig",
        &s,
        json!({"fileId": "x"}),
    );
    let path = "/v1/retell/tools/google_drive_get_file";
    let end = json!({"event": "call_ended", "call": {"call_id": "retell-sig"}}).to_string();

    post(&sk, path, &body, None)
        .await
        .assert_error(401, "invalid_signature");
    post(&sk, "/v1/retell/webhook", &end, None)
        .await
        .assert_error(401, "invalid_signature");
    let wrong = sign_all(
        "key_some_other_accounts_api_key",
        std::slice::from_ref(&body),
        None,
    );
    post(&sk, path, &body, Some(&wrong[0]))
        .await
        .assert_error(401, "invalid_signature");
    // Ten minutes old.
    let old = sign_all(
        API_KEY,
        std::slice::from_ref(&body),
        Some((support::unix_now() - 600) * 1000),
    );
    post(&sk, path, &body, Some(&old[0]))
        .await
        .assert_error(401, "invalid_signature");
    // Signed for another body.
    let good = sign_all(API_KEY, std::slice::from_ref(&body), None);
    let tampered = body.replace("\"x\"", "\"y\"");
    post(&sk, path, &tampered, Some(&good[0]))
        .await
        .assert_error(401, "invalid_signature");
    post(&sk, path, &body, Some("v=abc,d=zz"))
        .await
        .assert_error(401, "invalid_signature");
    assert_eq!(up.count(), 0);
    // The good one still goes through.
    let r = post(&sk, path, &body, Some(&good[0])).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.count(), 1);

    // Without an API key configured, Retell's endpoints are off.
    let off = Sidekey::start(Options::with_providers(&support::provider_toml(
        "custom", &up.url, "",
    )))
    .await;
    post(&off, path, &body, Some(&good[0]))
        .await
        .assert_error(503, "not_configured");
}

#[tokio::test]
async fn the_webhook_revokes_an_ended_calls_sessions() {
    let up = Upstream::start().await;
    let sk = start(&up).await;
    sk.put_credential("alice", "google", json!({"access_token": TOKEN}))
        .await;
    let s = sk.token("alice", &["google"]).await;
    let call = || {
        function_call(
            "google_drive_get_file",
            "retell-end",
            &s,
            json!({"fileId": "e"}),
        )
    };
    let ended =
        json!({"event": "call_ended", "call": {"call_id": "retell-end", "call_status": "ended",
        "retell_llm_dynamic_variables": {"sidekey_session": s}}})
        .to_string();
    let analyzed = json!({"event": "call_analyzed", "call": {"call_id": "retell-end"}}).to_string();
    let other =
        json!({"event": "transcript_updated", "call": {"call_id": "retell-end"}}).to_string();
    let rs = send_all(
        &sk,
        &[
            ("/v1/retell/tools/google_drive_get_file", call()),
            ("/v1/retell/webhook", other),
            ("/v1/retell/webhook", ended),
            ("/v1/retell/webhook", analyzed),
            ("/v1/retell/tools/google_drive_get_file", call()),
        ],
    )
    .await;
    assert_eq!(rs[0].status, 200, "{}", rs[0].text());
    assert_eq!(rs[1].status, 200);
    assert_eq!(rs[1].json(), json!({}));
    assert_eq!(rs[2].status, 200, "{}", rs[2].text());
    assert_eq!(rs[2].json()["sessions_revoked"], 1);
    assert_eq!(rs[3].json()["sessions_revoked"], 0);
    rs[4].assert_error(200, "invalid_session");
    assert!(
        rs[4].json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("has ended")
    );
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn an_inbound_call_gets_a_session_for_a_known_number_only() {
    let up = Upstream::start().await;
    let sk = start(&up).await;
    let r = sk
        .admin(
            Method::PUT,
            "/v1/users/alice",
            Some(json!({"phone_numbers": ["+1 (555) 123-4567"]})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    sk.put_credential("alice", "google", json!({"access_token": TOKEN}))
        .await;
    let inbound = |from: &str| {
        json!({"event": "call_inbound", "call_inbound": {
            "agent_id": "agent_1", "from_number": from, "to_number": "+15559990000"}})
        .to_string()
    };
    let rs = send_all(
        &sk,
        &[
            ("/v1/retell/webhook", inbound("+15551234567")),
            ("/v1/retell/webhook", inbound("+15550000000")),
        ],
    )
    .await;
    assert_eq!(rs[0].status, 200, "{}", rs[0].text());
    let token = rs[0].json()["call_inbound"]["dynamic_variables"]["sidekey_session"]
        .as_str()
        .unwrap_or_else(|| panic!("no session in {}", rs[0].text()))
        .to_owned();
    assert_eq!(rs[1].status, 200, "{}", rs[1].text());
    assert_eq!(rs[1].json(), json!({"call_inbound": {}}));

    // call_started binds it to the call; the call's functions then use it,
    // and no other call can.
    let started = json!({"event": "call_started", "call": {"call_id": "retell-in-1",
        "retell_llm_dynamic_variables": {"sidekey_session": token}}})
    .to_string();
    let rs = send_all(
        &sk,
        &[
            ("/v1/retell/webhook", started),
            (
                "/v1/retell/tools/google_drive_get_file",
                function_call(
                    "google_drive_get_file",
                    "retell-in-other",
                    &token,
                    json!({"fileId": "o"}),
                ),
            ),
        ],
    )
    .await;
    assert_eq!(rs[0].status, 200, "{}", rs[0].text());
    rs[1].assert_error(200, "conversation_mismatch");
    assert_eq!(up.count(), 0);

    // (A conversation mismatch revokes the session for both calls, so a
    // fresh inbound call shows the happy path.)
    let rs = send_all(&sk, &[("/v1/retell/webhook", inbound("+15551234567"))]).await;
    let token = rs[0].json()["call_inbound"]["dynamic_variables"]["sidekey_session"]
        .as_str()
        .unwrap()
        .to_owned();
    let rs = send_all(
        &sk,
        &[(
            "/v1/retell/tools/google_drive_get_file",
            function_call(
                "google_drive_get_file",
                "retell-in-2",
                &token,
                json!({"fileId": "in"}),
            ),
        )],
    )
    .await;
    assert_eq!(rs[0].status, 200, "{}", rs[0].text());
    assert_eq!(rs[0].json()["path"], "/drive/v3/files/in");
    assert_eq!(up.last().bearer().as_deref(), Some(TOKEN));
    assert_no_token(&sk, &rs.iter().map(Resp::text).collect::<Vec<_>>());
}

#[tokio::test]
async fn retell_tools_prints_a_custom_function_per_operation_tool() {
    let up = Upstream::start().await;
    let sk = start(&up).await;
    let cfg = sk.config_path();
    let (code, out, err) = run_cli(
        sk.path(),
        &["retell", "tools", "--config", cfg.to_str().unwrap()],
        &[],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let tools: Value = serde_json::from_str(&out).unwrap();
    let names = py(json!({"mode": "check-tools", "tools": tools}));
    assert!(
        names
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "google_drive_get_file"),
        "{names}"
    );
    for t in tools.as_array().unwrap() {
        assert_eq!(t["type"], "custom");
        assert_eq!(
            t["url"],
            format!(
                "https://127.0.0.1:8443/v1/retell/tools/{}",
                t["name"].as_str().unwrap()
            )
        );
        assert_eq!(t["parameters"]["type"], "object");
        assert_eq!(t["speak_during_execution"], false);
        assert_eq!(t["args_at_root"], false);
    }
    let r = sk.admin(Method::GET, "/v1/retell/tools", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), tools);
}
