//! Operation tools: `POST /v1/tools/{name}` builds the request from the
//! tool's template and typed parameters, then runs the proxy's phases
//! (provider granted, allow list, refresh, injection, 401 replay, audit).
use sidekey_testkit as support;

use http::Method;
use serde_json::{Value, json};
use support::token::{TokenServer, require_valid_token};
use support::upstream::Upstream;
use support::{Options, Sidekey, oauth_provider, run_cli};

const TOKEN: &str = "ya29.alice-calendar-token-0001";

fn google_with_tools(base: &str) -> String {
    format!(
        r#"[providers.google]
preset = "google"
base_url = "{base}"
tools = ["*"]

[providers.slack]
preset = "slack"
base_url = "{base}"
tools = ["post_message", "list_channels"]

[tools.create_ticket]
provider = "google"
method = "POST"
path = "/projects/{{project}}/tickets"
description = "Opens a support ticket."
[tools.create_ticket.params]
project = {{ type = "string", in = "path", required = true, description = "Project key." }}
title = {{ type = "string", in = "body", required = true }}
priority = {{ type = "integer", in = "body", default = 3 }}
labels = {{ type = "array", in = "body" }}
notify = {{ type = "boolean", in = "query" }}
X-Request-Source = {{ type = "string", in = "header", enum = ["voice", "chat"] }}
"#
    )
}

async fn post_tool(sk: &Sidekey, name: &str, token: &str, args: Value) -> support::Resp {
    sk.agent(
        Method::POST,
        &format!("/v1/tools/{name}"),
        &[
            ("x-sidekey-session", token),
            ("content-type", "application/json"),
        ],
        args.to_string(),
    )
    .await
}

#[tokio::test]
async fn a_preset_tool_builds_the_documented_request_and_injects_the_callers_token() {
    let up = Upstream::start().await;
    let sk = Sidekey::start(Options::with_providers(&google_with_tools(&up.url))).await;
    sk.put_credential("alice", "google", json!({"access_token": TOKEN}))
        .await;
    let s = sk.token("alice", &["google"]).await;

    let r = post_tool(
        &sk,
        "google_calendar_list_events",
        &s,
        json!({"timeMin": "2026-12-07T00:00:00Z", "maxResults": 3}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.last();
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.path, "/calendar/v3/calendars/primary/events");
    let q = seen.query.clone().unwrap();
    for part in [
        "timeMin=2026-12-07T00%3A00%3A00Z",
        "maxResults=3",
        "singleEvents=true",
        "orderBy=startTime",
    ] {
        assert!(q.contains(part), "{part} not in {q}");
    }
    assert_eq!(seen.bearer().as_deref(), Some(TOKEN));
    assert!(seen.header("x-sidekey-session").is_none());
    // The upstream's answer is the tool's answer.
    assert_eq!(r.json()["path"], "/calendar/v3/calendars/primary/events");
    assert!(!r.text().contains(TOKEN));

    // `provider.tool` and the bare preset name reach the same tool.
    let r = post_tool(&sk, "google.drive_get_file", &s, json!({"fileId": "abc"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().path, "/drive/v3/files/abc");
    let r = post_tool(&sk, "drive_get_file", &s, json!({"fileId": "abd"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().path, "/drive/v3/files/abd");

    // The audit record names the tool.
    let audit = sk.audit_of_kind("proxy").await;
    let rec = audit
        .iter()
        .find(|a| a["tool"] == "google_calendar_list_events")
        .unwrap_or_else(|| panic!("no audited tool call in {audit:?}"));
    assert_eq!(rec["user"], "alice");
    assert_eq!(rec["provider"], "google");
    assert_eq!(rec["path"], "/calendar/v3/calendars/primary/events");
    assert_eq!(rec["status"], 200);
    assert!(!format!("{audit:?}").contains(TOKEN));
}

#[tokio::test]
async fn path_parameters_never_change_the_path() {
    let up = Upstream::start().await;
    let sk = Sidekey::start(Options::with_providers(&google_with_tools(&up.url))).await;
    sk.put_credential("alice", "google", json!({"access_token": TOKEN}))
        .await;
    let s = sk.token("alice", &["google"]).await;

    // Encoded as one segment: `#`, `?`, `@` and spaces stay inside it.
    let r = post_tool(
        &sk,
        "google_calendar_list_events",
        &s,
        json!({"calendar_id": "en.usa#holiday@group v?x=1"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        up.last().path,
        "/calendar/v3/calendars/en.usa%23holiday%40group%20v%3Fx%3D1/events"
    );
    let calls = up.count();
    for evil in ["../../admin", "..", "%2e%2e", "a/b", "x%2fy", "%252f", ""] {
        let r = post_tool(
            &sk,
            "google_calendar_list_events",
            &s,
            json!({ "calendar_id": evil }),
        )
        .await;
        r.assert_error(400, "bad_arguments");
        assert!(r.text().contains("calendar_id"), "{evil}: {}", r.text());
    }
    assert_eq!(up.count(), calls, "no refused call reached the upstream");
}

#[tokio::test]
async fn arguments_are_checked_and_refusals_name_the_parameter() {
    let up = Upstream::start().await;
    let sk = Sidekey::start(Options::with_providers(&google_with_tools(&up.url))).await;
    sk.put_credential("alice", "google", json!({"access_token": TOKEN}))
        .await;
    let s = sk.token("alice", &["google"]).await;

    let cases = [
        (json!({"title": "x"}), "project"),
        (json!({"project": "P", "title": 5}), "title"),
        (
            json!({"project": "P", "title": "t", "priority": "high"}),
            "priority",
        ),
        (
            json!({"project": "P", "title": "t", "notify": "yes"}),
            "notify",
        ),
        (
            json!({"project": "P", "title": "t", "X-Request-Source": "fax"}),
            "X-Request-Source",
        ),
        (
            json!({"project": "P", "title": "t", "path": "/admin"}),
            "path",
        ),
    ];
    for (args, param) in cases {
        let r = post_tool(&sk, "create_ticket", &s, args.clone()).await;
        r.assert_error(400, "bad_arguments");
        let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(msg.contains(param), "{args}: {msg}");
    }
    let r = sk
        .agent(
            Method::POST,
            "/v1/tools/create_ticket",
            &[("x-sidekey-session", &s)],
            "[1, 2]",
        )
        .await;
    r.assert_error(400, "bad_arguments");
    assert_eq!(up.count(), 0);

    let r = post_tool(&sk, "no_such_tool", &s, json!({})).await;
    r.assert_error(404, "unknown_tool");
    let r = sk
        .agent(
            Method::GET,
            "/v1/tools/create_ticket",
            &[("x-sidekey-session", &s)],
            "",
        )
        .await;
    assert_eq!(r.status, 405);

    // A good call: body fields, a default, a query flag, a header.
    let r = post_tool(
        &sk,
        "create_ticket",
        &s,
        json!({"project": "OPS", "title": "Printer on fire", "labels": ["hw", 2], "notify": true, "X-Request-Source": "voice"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.last();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path, "/projects/OPS/tickets");
    assert_eq!(seen.query.as_deref(), Some("notify=true"));
    assert_eq!(seen.header("x-request-source").as_deref(), Some("voice"));
    assert!(
        seen.header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    let body: Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(
        body,
        json!({"title": "Printer on fire", "priority": 3, "labels": ["hw", 2]})
    );
}

#[tokio::test]
async fn the_session_and_the_allow_list_still_decide() {
    let up = Upstream::start().await;
    let toml = google_with_tools(&up.url).replace(
        "tools = [\"*\"]",
        "tools = [\"*\"]\nallow = [\"GET /calendar/**\"]",
    );
    let sk = Sidekey::start(Options::with_providers(&toml)).await;
    sk.put_credential("alice", "google", json!({"access_token": TOKEN}))
        .await;
    sk.put_credential("alice", "slack", json!({"access_token": "xoxp-alice"}))
        .await;
    let only_slack = sk.token("alice", &["slack"]).await;
    let r = post_tool(&sk, "google_calendar_list_events", &only_slack, json!({})).await;
    r.assert_error(403, "provider_not_allowed");

    let google = sk.token("alice", &["google"]).await;
    let r = post_tool(
        &sk,
        "google_drive_get_file",
        &google,
        json!({"fileId": "f1"}),
    )
    .await;
    r.assert_error(403, "path_not_allowed");
    let r = post_tool(&sk, "google_calendar_list_events", &google, json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text());

    let r = post_tool(&sk, "google_calendar_list_events", "not-a-jwt", json!({})).await;
    r.assert_error(401, "invalid_session");

    // Slack's post_message: a JSON body to /chat.postMessage.
    let r = post_tool(
        &sk,
        "slack_post_message",
        &only_slack,
        json!({"channel": "C1", "text": "hello"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.last();
    assert_eq!(seen.path, "/chat.postMessage");
    assert_eq!(seen.bearer().as_deref(), Some("xoxp-alice"));
    let body: Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(body, json!({"channel": "C1", "text": "hello"}));
    // Not enabled: not a tool.
    let r = post_tool(
        &sk,
        "slack_search_messages",
        &only_slack,
        json!({"query": "x"}),
    )
    .await;
    r.assert_error(404, "unknown_tool");
}

#[tokio::test]
async fn a_rejected_token_is_refreshed_once_and_the_call_replayed() {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    require_valid_token(&up, &tok);
    tok.issue_refresh("rt-tools-seed");
    let toml = oauth_provider("crm", &up.url, &tok.url, "")
        + r#"
[tools.crm_contact]
provider = "crm"
path = "/contacts/{id}"
[tools.crm_contact.params]
id = { type = "integer", required = true }
"#;
    let sk = Sidekey::start(Options::with_providers(&toml)).await;
    // Not expired as far as sidekey knows; the upstream refuses it.
    sk.put_credential(
        "bob",
        "crm",
        json!({"access_token": "at-revoked-early", "refresh_token": "rt-tools-seed", "expires_in": 3600}),
    )
    .await;
    let s = sk.token("bob", &["crm"]).await;
    let r = post_tool(&sk, "crm_contact", &s, json!({"id": 42})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tok.calls(), 1);
    let reqs = up.requests();
    assert_eq!(reqs.len(), 2, "one refusal, one replay");
    assert_eq!(reqs[1].path, "/contacts/42");
    assert_ne!(reqs[1].bearer(), reqs[0].bearer());
}

#[tokio::test]
async fn the_catalogue_is_listed_and_becomes_elevenlabs_webhook_tools() {
    let up = Upstream::start().await;
    let sk = Sidekey::start(Options::with_providers(&google_with_tools(&up.url))).await;
    let cfg = sk.config_path();
    let (code, out, err) = run_cli(
        sk.path(),
        &["tools", "--config", cfg.to_str().unwrap()],
        &[],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let tools = v["tools"].as_array().unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
    for n in [
        "create_ticket",
        "google_calendar_list_events",
        "google_calendar_create_event",
        "google_drive_search_files",
        "google_drive_get_file",
        "slack_post_message",
        "slack_list_channels",
    ] {
        assert!(names.contains(&n), "{n} not in {names:?}");
    }
    let t = tools.iter().find(|t| t["name"] == "create_ticket").unwrap();
    assert_eq!(t["provider"], "google");
    assert_eq!(t["method"], "POST");
    assert_eq!(t["path"], "/projects/{project}/tickets");
    assert_eq!(t["parameters"]["project"]["in"], "path");
    assert_eq!(t["parameters"]["priority"]["default"], 3);

    let r = sk.admin(Method::GET, "/v1/elevenlabs/tools", None).await;
    assert_eq!(r.status, 200);
    let all = r.json();
    let el = all
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tool_config"]["name"] == "create_ticket")
        .expect("a webhook tool per operation tool")
        .clone();
    let api = &el["tool_config"]["api_schema"];
    assert!(
        api["url"]
            .as_str()
            .unwrap()
            .ends_with("/v1/tools/create_ticket")
    );
    assert_eq!(api["method"], "POST");
    assert_eq!(
        api["request_headers"]["X-Sidekey-Session"]["variable_name"],
        "secret__sidekey_session"
    );
    let schema = &api["request_body_schema"];
    assert_eq!(schema["required"], json!(["project", "title"]));
    assert_eq!(schema["properties"]["labels"]["type"], "array");
    assert!(schema["properties"]["labels"]["items"].is_object());
    for (_, p) in schema["properties"].as_object().unwrap() {
        assert!(p["description"].is_string(), "{p}");
    }
}

#[tokio::test]
async fn config_mistakes_in_tools_are_reported_by_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        r#"
[providers.slack]
preset = "slack"
tools = ["post_mesage"]
[tools.broken]
provider = "slack"
path = "/x/{id}"
[tools.orphan]
provider = "nobody"
path = "/x"
"#,
    )
    .unwrap();
    let (code, _out, err) = run_cli(
        dir.path(),
        &["check-config", "--config", path.to_str().unwrap()],
        &[],
        None,
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("{id} has no parameter"), "{err}");
    assert!(
        err.contains("\"nobody\" is not a configured provider"),
        "{err}"
    );
    assert!(
        err.contains("\"post_mesage\" is not a tool of the slack preset"),
        "{err}"
    );
}
