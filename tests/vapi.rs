//! Vapi's server URL, `POST /v1/vapi/tools`, against the real binary, with
//! the messages built (and sidekey's answers checked) by Vapi's own Python
//! SDK types (`vapi-server-sdk`): tool calls through the proxy with the
//! caller's token, several at once, refusals as `error` sentences, the end
//! of a call revoking its sessions, inbound calls (`assistant-request`),
//! both of Vapi's credentials, and `sidekey vapi tools`.
use sidekey_testkit as support;

use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use http::Method;
use serde_json::{Value, json};
use sha2::Sha256;
use support::upstream::{Reply, Upstream, echo};
use support::{Options, Resp, Sidekey, run_cli, run_python};

const TOKEN: &str = "ya29.vapi-alice-google-token-0001";
const SECRET: &str = "vapi-shared-secret-for-tests-0001";
const HMAC_SECRET: &str = "vapi-hmac-secret-for-tests-00001";

/// Vapi's server messages as the SDK's types build them, with
/// placeholders the tests fill in (the SDK's models take ~20 s to import,
/// so this runs once per test binary).
const PY_TEMPLATES: &str = r#"
import json
from vapi.types import (
    AssistantOverrides, Call, CreateCustomerDto, ServerMessage,
    ServerMessageAssistantRequest, ServerMessageEndOfCallReport,
    ServerMessageStatusUpdate, ServerMessageToolCalls, ToolCall,
    ToolCallFunction, Artifact, Analysis,
)
def call():
    return Call(id="__CALL__", org_id="org-1", created_at="2026-01-01T00:00:00Z",
                updated_at="2026-01-01T00:00:00Z",
                assistant_overrides=AssistantOverrides(variable_values={"sidekey_session": "__TOKEN__"}),
                customer=CreateCustomerDto(number="__NUMBER__"))
def out(msg):
    return json.loads(ServerMessage(message=msg).json(by_alias=True, exclude_none=True))
tc = ToolCall(id="__ID__", type="function",
              function=ToolCallFunction(name="__NAME__", arguments=json.dumps({"a": 1})))
print(json.dumps({
    "tool_calls": out(ServerMessageToolCalls(type="tool-calls", tool_call_list=[tc],
                                             tool_with_tool_call_list=[], call=call())),
    "end_of_call": out(ServerMessageEndOfCallReport(type="end-of-call-report", call=call(),
                                                    ended_reason="customer-ended-call",
                                                    artifact=Artifact(), analysis=Analysis())),
    "status_ended": out(ServerMessageStatusUpdate(type="status-update", status="ended", call=call())),
    "assistant_request": out(ServerMessageAssistantRequest(type="assistant-request", call=call())),
}))
"#;

/// Checks sidekey's answers against the SDK's response types.
/// `argv[1]`: `{"mode", ...}`; prints JSON.
const PY_CHECK: &str = r#"
import json, sys
spec = json.loads(sys.argv[1])
mode = spec["mode"]
if mode == "check-tool-answer":
    from vapi.types.server_message_response_tool_calls import ServerMessageResponseToolCalls
    from vapi.types.tool_call_result import ToolCallResult
    a = ServerMessageResponseToolCalls.model_validate(spec["answer"])
    for r in spec["answer"]["results"]:
        ToolCallResult.model_validate(r)
    print(json.dumps({"results": [r.tool_call_id for r in a.results]}))
elif mode == "check-assistant-answer":
    from vapi.types.server_message_response_assistant_request import ServerMessageResponseAssistantRequest
    a = ServerMessageResponseAssistantRequest.model_validate(spec["answer"])
    vv = a.assistant_overrides.variable_values if a.assistant_overrides else None
    print(json.dumps({"variableValues": vv}))
elif mode == "check-tools":
    from vapi.types.create_function_tool_dto import CreateFunctionToolDto
    names = []
    for t in spec["tools"]:
        assert t["type"] == "function", t
        d = CreateFunctionToolDto.model_validate(t)
        names.append(d.function.name)
        assert d.server.url.endswith("/v1/vapi/tools"), d.server.url
    print(json.dumps(names))
"#;

fn run(script: &str, spec: &Value) -> Value {
    let (code, out, err) = run_python(script, &[&spec.to_string()], &[]);
    assert_eq!(code, 0, "vapi SDK script failed for {spec}:\n{err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("not JSON: {out}"))
}

fn py(spec: Value) -> Value {
    run(PY_CHECK, &spec)
}

/// The SDK-built messages; call first in each test, before anything
/// is started (it blocks for the SDK's import).
fn templates() -> &'static Value {
    static T: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    T.get_or_init(|| run(PY_TEMPLATES, &json!({})))
}

/// A template message for `call_id`, the session in the call's variable
/// values (or none).
fn message(kind: &str, call_id: &str, token: Option<&str>) -> Value {
    let mut m = templates()[kind].clone();
    assert!(m.is_object(), "no {kind} template");
    let call = &mut m["message"]["call"];
    call["id"] = json!(call_id);
    match token {
        Some(t) => call["assistantOverrides"]["variableValues"]["sidekey_session"] = json!(t),
        None => {
            call.as_object_mut().unwrap().remove("assistantOverrides");
        }
    }
    call.as_object_mut().unwrap().remove("customer");
    m
}

/// A `tool-calls` message: `(id, tool, arguments)` each, the arguments
/// as the JSON string the SDK's type has.
fn tool_calls(call_id: &str, token: Option<&str>, calls: &[(&str, &str, Value)]) -> Value {
    let mut m = message("tool_calls", call_id, token);
    let item = m["message"]["toolCallList"][0].clone();
    assert!(item["function"]["arguments"].is_string(), "{item}");
    let list: Vec<Value> = calls
        .iter()
        .map(|(id, name, args)| {
            let mut i = item.clone();
            i["id"] = json!(id);
            i["function"]["name"] = json!(name);
            i["function"]["arguments"] = json!(args.to_string());
            i
        })
        .collect();
    m["message"]["toolCallList"] = json!(list);
    m
}

fn assistant_request(call_id: &str, number: &str) -> Value {
    let mut m = message("assistant_request", call_id, None);
    m["message"]["call"]["customer"] = json!({"number": number});
    m
}

fn providers(base: &str, extra: &str) -> String {
    format!(
        r#"[providers.google]
preset = "google"
base_url = "{base}"
tools = ["*"]

[providers.slack]
preset = "slack"
base_url = "{base}"
tools = ["post_message"]

{extra}
"#
    )
}

async fn start(up: &Upstream) -> Sidekey {
    Sidekey::start(
        Options::with_providers(&providers(&up.url, "[vapi]\nsecret_env = \"VAPI_SECRET\""))
            .env("VAPI_SECRET", SECRET),
    )
    .await
}

async fn post(sk: &Sidekey, headers: &[(&str, &str)], body: &Value) -> Resp {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    sk.agent(Method::POST, "/v1/vapi/tools", &h, body.to_string())
        .await
}

async fn send(sk: &Sidekey, body: &Value) -> Resp {
    post(sk, &[("x-vapi-secret", SECRET)], body).await
}

fn assert_no_token(sk: &Sidekey, texts: &[&str]) {
    for t in texts {
        assert!(!t.contains(TOKEN), "the provider token leaked: {t}");
    }
    assert!(
        !sk.log_text().contains(TOKEN),
        "the provider token is in the log"
    );
}

/// The one result of a tool-calls answer, after checking the answer with
/// the SDK's response type.
fn results(r: &Resp) -> Vec<Value> {
    assert_eq!(r.status, 200, "{}", r.text());
    py(json!({"mode": "check-tool-answer", "answer": r.json()}));
    r.json()["results"].as_array().unwrap().clone()
}

#[tokio::test]
async fn tool_calls_reach_the_upstream_with_the_callers_token_all_at_once() {
    templates();
    let up = Upstream::start().await;
    // Each upstream answer takes 700 ms: two calls run one after the
    // other would take 1.4 s.
    up.set_handler(|r| Reply::Delay(Duration::from_millis(700), Box::new(echo(r))));
    let sk = start(&up).await;
    sk.put_credential("alice", "google", json!({"access_token": TOKEN}))
        .await;
    let s = sk.token("alice", &["google"]).await;

    let msg = tool_calls(
        "call-vapi-1",
        Some(&s),
        &[
            (
                "tc-1",
                "google_calendar_list_events",
                json!({"maxResults": 3}),
            ),
            ("tc-2", "google_drive_get_file", json!({"fileId": "abc"})),
        ],
    );
    // The SDK's type has the arguments as a JSON string.
    assert!(msg["message"]["toolCallList"][0]["function"]["arguments"].is_string());
    let started = Instant::now();
    let r = send(&sk, &msg).await;
    let took = started.elapsed();
    let res = results(&r);
    assert_eq!(res.len(), 2);
    assert_eq!(res[0]["toolCallId"], "tc-1");
    assert_eq!(res[0]["name"], "google_calendar_list_events");
    assert_eq!(res[1]["toolCallId"], "tc-2");
    let first: Value = serde_json::from_str(res[0]["result"].as_str().unwrap()).unwrap();
    assert_eq!(first["path"], "/calendar/v3/calendars/primary/events");
    let second: Value = serde_json::from_str(res[1]["result"].as_str().unwrap()).unwrap();
    assert_eq!(second["path"], "/drive/v3/files/abc");
    assert!(res.iter().all(|r| r.get("error").is_none()), "{res:?}");
    assert!(
        took < Duration::from_millis(1300),
        "the two calls ran one after the other ({took:?})"
    );
    assert_eq!(up.count(), 2);
    for seen in up.requests() {
        assert_eq!(seen.bearer().as_deref(), Some(TOKEN));
        assert!(seen.header("x-vapi-secret").is_none());
    }

    // Audited as tool calls of alice's, bound to the call.
    let audit = sk.audit_of_kind("proxy").await;
    let rec = audit
        .iter()
        .find(|a| a["tool"] == "google_drive_get_file")
        .unwrap_or_else(|| panic!("no audited tool call in {audit:?}"));
    assert_eq!(rec["user"], "alice");
    assert_eq!(rec["conversation_id"], "call-vapi-1");

    // The session now belongs to call-vapi-1: another call cannot use it.
    let other = tool_calls(
        "call-vapi-2",
        Some(&s),
        &[("tc-3", "google_drive_get_file", json!({"fileId": "x"}))],
    );
    let r = send(&sk, &other).await;
    let res = results(&r);
    assert!(res[0].get("result").is_none());
    assert!(
        res[0]["error"]
            .as_str()
            .unwrap()
            .contains("different conversation"),
        "{res:?}"
    );
    assert_eq!(up.count(), 2);
    assert_no_token(&sk, &[&r.text()]);
}

#[tokio::test]
async fn the_flattened_form_object_arguments_bearer_and_metadata_are_accepted() {
    templates();
    let up = Upstream::start().await;
    let sk = start(&up).await;
    sk.put_credential("alice", "google", json!({"access_token": TOKEN}))
        .await;
    let s = sk.token("alice", &["google"]).await;

    // As Vapi's docs examples show it: no `function`, arguments an object;
    // the session in the call's metadata.
    let body = json!({"message": {
        "type": "tool-calls",
        "call": {"id": "call-flat", "metadata": {"sidekey_session": s}},
        "toolCallList": [
            {"id": "f-1", "name": "google_drive_get_file", "arguments": {"fileId": "flat"}},
            {"id": "f-2", "type": "function", "function": {"name": "google_drive_get_file", "arguments": {"fileId": "obj"}}},
            {"id": "f-3", "type": "function", "function": {"name": "google_drive_get_file", "arguments": "not json"}},
            {"id": "f-4", "name": "no_such_tool", "arguments": {}},
        ]
    }});
    let auth = format!("Bearer {SECRET}");
    let r = post(&sk, &[("authorization", &auth)], &body).await;
    let res = results(&r);
    let paths: Vec<String> = up.requests().iter().map(|r| r.path.clone()).collect();
    assert!(
        paths.contains(&"/drive/v3/files/flat".to_owned()),
        "{paths:?}"
    );
    assert!(
        paths.contains(&"/drive/v3/files/obj".to_owned()),
        "{paths:?}"
    );
    assert_eq!(up.count(), 2);
    assert!(
        res[0]["result"]
            .as_str()
            .unwrap()
            .contains("/drive/v3/files/flat")
    );
    assert!(
        res[1]["result"]
            .as_str()
            .unwrap()
            .contains("/drive/v3/files/obj")
    );
    assert!(
        res[2]["error"].as_str().unwrap().contains("JSON object"),
        "{res:?}"
    );
    assert!(
        res[3]["error"].as_str().unwrap().contains("no_such_tool"),
        "{res:?}"
    );

    // The session from the assistant's variable values.
    let body = json!({"message": {
        "type": "tool-calls",
        "call": {"id": "call-flat"},
        "assistant": {"variableValues": {"sidekey_session": s}},
        "toolCallList": [{"id": "a-1", "name": "google_drive_get_file", "arguments": {"fileId": "asst"}}]
    }});
    let r = send(&sk, &body).await;
    let res = results(&r);
    assert!(
        res[0]["result"]
            .as_str()
            .unwrap()
            .contains("/drive/v3/files/asst"),
        "{res:?}"
    );
    assert_no_token(&sk, &[&r.text()]);
}

#[tokio::test]
async fn refusals_are_sentences_in_the_results_error() {
    templates();
    let up = Upstream::start().await;
    let sk = start(&up).await;
    sk.put_credential("alice", "google", json!({"access_token": TOKEN}))
        .await;
    let slack_only = sk.token("alice", &["slack"]).await;
    let msg = tool_calls(
        "call-refused",
        Some(&slack_only),
        &[("r-1", "google_drive_get_file", json!({"fileId": "a"}))],
    );
    let r = send(&sk, &msg).await;
    let res = results(&r);
    assert!(res[0].get("result").is_none(), "{res:?}");
    assert_eq!(
        res[0]["error"],
        "This conversation wasn't given access to your Google account."
    );

    // No session at all.
    let msg = tool_calls(
        "call-none",
        None,
        &[("r-2", "google_drive_get_file", json!({"fileId": "a"}))],
    );
    let res = results(&send(&sk, &msg).await);
    assert!(
        res[0]["error"].as_str().unwrap().contains("access pass"),
        "{res:?}"
    );
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn wrong_or_missing_credentials_are_refused() {
    templates();
    let up = Upstream::start().await;
    let sk = start(&up).await;
    let s = sk.token("alice", &["google"]).await;
    let msg = tool_calls(
        "call-auth",
        Some(&s),
        &[("x", "google_drive_get_file", json!({"fileId": "a"}))],
    );
    post(&sk, &[], &msg).await.assert_error(401, "unauthorized");
    post(&sk, &[("x-vapi-secret", "wrong-secret-wrong-secret")], &msg)
        .await
        .assert_error(401, "unauthorized");
    post(&sk, &[("authorization", "Bearer nope")], &msg)
        .await
        .assert_error(401, "unauthorized");
    let r = sk
        .agent(
            Method::GET,
            "/v1/vapi/tools",
            &[("x-vapi-secret", SECRET)],
            "",
        )
        .await;
    assert_eq!(r.status, 405);
    assert_eq!(up.count(), 0);

    // Without any Vapi credential configured the endpoint is off.
    let off = Sidekey::start(Options::with_providers(&providers(&up.url, ""))).await;
    post(&off, &[("x-vapi-secret", SECRET)], &msg)
        .await
        .assert_error(503, "not_configured");
}

fn vapi_hmac(ts: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(HMAC_SECRET.as_bytes()).unwrap();
    mac.update(ts.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn hmac_signed_messages_are_checked() {
    templates();
    let up = Upstream::start().await;
    let sk = Sidekey::start(
        Options::with_providers(&providers(
            &up.url,
            "[vapi]\nhmac_secret_env = \"VAPI_HMAC\"",
        ))
        .env("VAPI_HMAC", HMAC_SECRET),
    )
    .await;
    sk.put_credential("alice", "google", json!({"access_token": TOKEN}))
        .await;
    let s = sk.token("alice", &["google"]).await;
    let body = tool_calls(
        "call-hmac",
        Some(&s),
        &[("h-1", "google_drive_get_file", json!({"fileId": "signed"}))],
    )
    .to_string();
    let send_signed = |ts: String, sig: String, body: String| {
        let sk = &sk;
        async move {
            sk.agent(
                Method::POST,
                "/v1/vapi/tools",
                &[
                    ("content-type", "application/json"),
                    ("x-timestamp", &ts),
                    ("x-signature", &sig),
                ],
                body,
            )
            .await
        }
    };
    let now = support::unix_now();
    // Milliseconds, as Vapi sends them, and seconds.
    for ts in [(now * 1000).to_string(), now.to_string()] {
        let sig = vapi_hmac(&ts, body.as_bytes());
        let r = send_signed(ts, sig, body.clone()).await;
        let res = results(&r);
        assert!(
            res[0]["result"]
                .as_str()
                .unwrap()
                .contains("/drive/v3/files/signed"),
            "{res:?}"
        );
    }
    assert_eq!(up.count(), 2);
    // A signature over another body, a stale one, none at all.
    let ts = (now * 1000).to_string();
    let sig = vapi_hmac(&ts, b"{}");
    send_signed(ts.clone(), sig, body.clone())
        .await
        .assert_error(401, "invalid_signature");
    let old = ((now - 3600) * 1000).to_string();
    let sig = vapi_hmac(&old, body.as_bytes());
    send_signed(old, sig, body.clone())
        .await
        .assert_error(401, "invalid_signature");
    post(&sk, &[], &serde_json::from_str(&body).unwrap())
        .await
        .assert_error(401, "invalid_signature");
    // The shared secret is not configured here: X-Vapi-Secret means nothing.
    post(
        &sk,
        &[("x-vapi-secret", HMAC_SECRET)],
        &serde_json::from_str(&body).unwrap(),
    )
    .await
    .assert_error(401, "invalid_signature");
    assert_eq!(up.count(), 2);
}

#[tokio::test]
async fn the_end_of_a_call_revokes_its_sessions() {
    templates();
    let up = Upstream::start().await;
    let sk = start(&up).await;
    sk.put_credential("alice", "google", json!({"access_token": TOKEN}))
        .await;
    for (call_id, end_mode) in [
        ("call-end-1", "end_of_call"),
        ("call-end-2", "status_ended"),
    ] {
        let s = sk.token("alice", &["google"]).await;
        let call = |id: &str| {
            tool_calls(
                call_id,
                Some(&s),
                &[(id, "google_drive_get_file", json!({"fileId": "a"}))],
            )
        };
        let res = results(&send(&sk, &call("before")).await);
        assert!(res[0].get("result").is_some(), "{res:?}");

        let end = message(end_mode, call_id, Some(&s));
        let r = send(&sk, &end).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["sessions_revoked"], 1, "{}", r.text());
        // Redelivered: nothing left to revoke.
        let r = send(&sk, &end).await;
        assert_eq!(r.json()["sessions_revoked"], 0, "{}", r.text());

        let res = results(&send(&sk, &call("after")).await);
        assert!(res[0].get("result").is_none(), "{res:?}");
        assert!(
            res[0]["error"].as_str().unwrap().contains("has ended"),
            "{res:?}"
        );
    }
    assert_eq!(up.count(), 2);

    // A status update that is not the end changes nothing; other messages
    // are answered 200 and ignored.
    let r = send(
        &sk,
        &json!({"message": {"type": "status-update", "status": "in-progress", "call": {"id": "c"}}}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({}));
    let r = send(
        &sk,
        &json!({"message": {"type": "transcript", "transcript": "hi"}}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({}));
}

#[tokio::test]
async fn an_inbound_call_gets_a_session_for_a_known_number_only() {
    templates();
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

    let req = assistant_request("call-in-1", "+15551234567");
    let r = send(&sk, &req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let checked = py(json!({"mode": "check-assistant-answer", "answer": r.json()}));
    let token = checked["variableValues"]["sidekey_session"]
        .as_str()
        .unwrap_or_else(|| panic!("no session in {}", r.text()))
        .to_owned();

    // The call's tool calls carry it back (as the call's variable values).
    let msg = tool_calls(
        "call-in-1",
        Some(&token),
        &[("i-1", "google_drive_get_file", json!({"fileId": "inbound"}))],
    );
    let res = results(&send(&sk, &msg).await);
    assert!(
        res[0]["result"]
            .as_str()
            .unwrap()
            .contains("/drive/v3/files/inbound"),
        "{res:?}"
    );
    assert_eq!(up.last().bearer().as_deref(), Some(TOKEN));
    // Bound to that call from the start.
    let msg = tool_calls(
        "call-in-other",
        Some(&token),
        &[("i-2", "google_drive_get_file", json!({"fileId": "x"}))],
    );
    let res = results(&send(&sk, &msg).await);
    assert!(res[0].get("error").is_some(), "{res:?}");

    // An unknown number: an answer without a session.
    let req = assistant_request("call-in-2", "+15550000000");
    let r = send(&sk, &req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({}));
    py(json!({"mode": "check-assistant-answer", "answer": r.json()}));
    assert_no_token(&sk, &[&r.text()]);
}

#[tokio::test]
async fn vapi_tools_prints_a_function_tool_per_operation_tool() {
    templates();
    let up = Upstream::start().await;
    let sk = start(&up).await;
    let cfg = sk.config_path();
    let (code, out, err) = run_cli(
        sk.path(),
        &["vapi", "tools", "--config", cfg.to_str().unwrap()],
        &[],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let tools: Value = serde_json::from_str(&out).unwrap();
    let list = tools.as_array().unwrap();
    assert!(!list.is_empty());
    let names = py(json!({"mode": "check-tools", "tools": tools}));
    for n in [
        "google_calendar_list_events",
        "google_drive_get_file",
        "slack_post_message",
    ] {
        assert!(
            names.as_array().unwrap().iter().any(|x| x == n),
            "{n} not in {names}"
        );
    }
    let (code, listed, err) = run_cli(
        sk.path(),
        &["tools", "--config", cfg.to_str().unwrap()],
        &[],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["tools"].as_array().unwrap().len(), list.len());
    for t in list {
        assert_eq!(t["type"], "function");
        assert_eq!(t["server"]["url"], "https://127.0.0.1:8443/v1/vapi/tools");
        assert_eq!(t["function"]["parameters"]["type"], "object");
        for (_, p) in t["function"]["parameters"]["properties"]
            .as_object()
            .unwrap()
        {
            assert!(p["type"].is_string() && p["description"].is_string(), "{p}");
        }
    }
    // The admin API gives the same.
    let r = sk.admin(Method::GET, "/v1/vapi/tools", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), tools);
}

/// Vapi's HMAC credential can use sha512 or sha1, other headers, a
/// signature prefix, base64 and another payload format; sidekey follows
/// whatever `[vapi]` says and refuses the rest.
#[tokio::test]
async fn hmac_credentials_follow_their_algorithm_headers_and_format() {
    use base64::Engine as _;
    templates();
    let up = Upstream::start().await;
    let sk = Sidekey::start(
        Options::with_providers(&providers(
            &up.url,
            "[vapi]\nhmac_secret_env = \"VAPI_HMAC\"\nhmac_algorithm = \"sha512\"\n\
             hmac_signature_header = \"X-Hub-Signature\"\nhmac_timestamp_header = \"X-Sent-At\"\n\
             hmac_signature_prefix = \"sha512=\"\nhmac_payload_format = \"{method}:{timestamp}:{body}\"",
        ))
        .env("VAPI_HMAC", HMAC_SECRET),
    )
    .await;
    sk.put_credential("alice", "google", json!({"access_token": TOKEN}))
        .await;
    let s = sk.token("alice", &["google"]).await;
    let body = tool_calls(
        "call-hmac-512",
        Some(&s),
        &[(
            "h-1",
            "google_drive_get_file",
            json!({"fileId": "five-twelve"}),
        )],
    )
    .to_string();
    let ts = (support::unix_now() * 1000).to_string();
    let mac512 = |payload: &[u8]| {
        let mut m = <Hmac<sha2::Sha512> as Mac>::new_from_slice(HMAC_SECRET.as_bytes()).unwrap();
        m.update(payload);
        m.finalize().into_bytes().to_vec()
    };
    let signed = format!("POST:{ts}:{body}");
    let send = |sig: String, sig_header: &'static str, ts_header: &'static str| {
        let (sk, ts, body) = (&sk, ts.clone(), body.clone());
        async move {
            sk.agent(
                Method::POST,
                "/v1/vapi/tools",
                &[
                    ("content-type", "application/json"),
                    (ts_header, &ts),
                    (sig_header, &sig),
                ],
                body,
            )
            .await
        }
    };
    // Base64 with the prefix, and hex without it: both are Vapi's encodings.
    let b64 = base64::engine::general_purpose::STANDARD.encode(mac512(signed.as_bytes()));
    let hex: String = mac512(signed.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    for sig in [format!("sha512={b64}"), hex.clone()] {
        let r = send(sig, "x-hub-signature", "x-sent-at").await;
        let res = results(&r);
        assert!(
            res[0]["result"]
                .as_str()
                .unwrap()
                .contains("/drive/v3/files/five-twelve"),
            "{res:?}"
        );
    }
    assert_eq!(up.count(), 2);
    // The default payload, SHA-256, or the default headers: all refused.
    let default_payload = format!("{ts}.{body}");
    let hexed = |m: Vec<u8>| m.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let wrong = [
        (
            hexed(mac512(default_payload.as_bytes())),
            "x-hub-signature",
            "x-sent-at",
        ),
        (
            vapi_hmac(&ts, body.as_bytes()),
            "x-hub-signature",
            "x-sent-at",
        ),
        (
            hexed(mac512(signed.as_bytes())),
            "x-signature",
            "x-timestamp",
        ),
    ];
    for (sig, sh, th) in wrong {
        send(sig, sh, th)
            .await
            .assert_error(401, "invalid_signature");
    }
    assert_eq!(up.count(), 2);

    // SHA-1 with Vapi's default headers and format.
    let sk1 = Sidekey::start(
        Options::with_providers(&providers(
            &up.url,
            "[vapi]\nhmac_secret_env = \"VAPI_HMAC\"\nhmac_algorithm = \"sha1\"",
        ))
        .env("VAPI_HMAC", HMAC_SECRET),
    )
    .await;
    sk1.put_credential("alice", "google", json!({"access_token": TOKEN}))
        .await;
    let s1 = sk1.token("alice", &["google"]).await;
    let body1 = tool_calls(
        "call-hmac-1",
        Some(&s1),
        &[("h-1", "google_drive_get_file", json!({"fileId": "sha-one"}))],
    )
    .to_string();
    let mut m = <Hmac<sha1::Sha1> as Mac>::new_from_slice(HMAC_SECRET.as_bytes()).unwrap();
    m.update(format!("{ts}.{body1}").as_bytes());
    let sig1: String = m
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let r = sk1
        .agent(
            Method::POST,
            "/v1/vapi/tools",
            &[
                ("content-type", "application/json"),
                ("x-timestamp", &ts),
                ("x-signature", &sig1),
            ],
            body1,
        )
        .await;
    assert!(
        results(&r)[0]["result"]
            .as_str()
            .unwrap()
            .contains("/drive/v3/files/sha-one"),
        "{}",
        r.text()
    );
    assert_eq!(up.count(), 3);
}

/// What Vapi's HMAC settings cannot be: a check-config error each.
#[test]
fn hmac_settings_that_prove_nothing_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        "[vapi]\nhmac_secret_env = \"VAPI_HMAC\"\nhmac_algorithm = \"md5\"\n\
         hmac_payload_format = \"{timestamp}\"\nhmac_signature_header = \"bad header\"\n",
    )
    .unwrap();
    let (code, _out, err) = run_cli(
        dir.path(),
        &["check-config", "--config", path.to_str().unwrap()],
        &[("VAPI_HMAC".into(), HMAC_SECRET.into())],
        None,
    );
    assert_eq!(code, 2, "{err}");
    for want in [
        "[vapi] hmac_algorithm: \"md5\" is not one of sha256, sha512, sha1",
        "[vapi] hmac_payload_format: \"{timestamp}\" must contain both {timestamp} and {body}",
        "[vapi] hmac_signature_header: \"bad header\" is not a header name",
    ] {
        assert!(err.contains(want), "{want} not in:\n{err}");
    }
}

/// A bearer credential with its own `headerName`: only that header counts.
#[tokio::test]
async fn a_bearer_credential_in_its_own_header() {
    templates();
    let up = Upstream::start().await;
    let sk = Sidekey::start(
        Options::with_providers(&providers(
            &up.url,
            "[vapi]\nsecret_env = \"VAPI_SECRET\"\nsecret_header = \"X-Company-Key\"",
        ))
        .env("VAPI_SECRET", SECRET),
    )
    .await;
    sk.put_credential("alice", "google", json!({"access_token": TOKEN}))
        .await;
    let s = sk.token("alice", &["google"]).await;
    let msg = tool_calls(
        "call-own-header",
        Some(&s),
        &[("h-1", "google_drive_get_file", json!({"fileId": "own"}))],
    );
    for h in [SECRET.to_string(), format!("Bearer {SECRET}")] {
        let r = post(&sk, &[("x-company-key", &h)], &msg).await;
        assert!(
            results(&r)[0]["result"]
                .as_str()
                .unwrap()
                .contains("/drive/v3/files/own"),
            "{}",
            r.text()
        );
    }
    let bearer = format!("Bearer {SECRET}");
    for h in [
        ("x-vapi-secret", SECRET),
        ("authorization", bearer.as_str()),
    ] {
        post(&sk, &[h], &msg)
            .await
            .assert_error(401, "unauthorized");
    }
    assert_eq!(up.count(), 2);
}
