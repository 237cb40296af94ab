//! `/v1/mcp`: sidekey as a per-user MCP server, checked with the official
//! MCP Python SDK as the client, and as the MCP client of an upstream MCP
//! server that needs each user's own token.
use sidekey_testkit as support;

use std::sync::{Arc, Mutex};

use http::Method;
use serde_json::{Value, json};
use support::token::TokenServer;
use support::upstream::{Recorded, Reply, Upstream};
use support::{Options, Sidekey, run_cli, run_python};

const GOOGLE_TOKEN: &str = "ya29.mcp-alice-google-0001";
const NOTION_TOKEN: &str = "secret_notion-alice-0002";

/// The Python SDK's client: initialize, list, then the calls in SK_CALLS;
/// prints what it saw as JSON (a call's JSON-RPC error as {"rpc_error"}).
const CLIENT: &str = r#"
import asyncio, json, os, sys
import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError as McpError

async def main():
    headers = {}
    if os.environ.get("SK_SESSION"):
        headers["X-Sidekey-Session"] = os.environ["SK_SESSION"]
    if os.environ.get("SK_CONV"):
        headers["X-Conversation-Id"] = os.environ["SK_CONV"]
    async with httpx2.AsyncClient(headers=headers, verify=os.environ["SK_CA"], timeout=30) as http:
        async with streamable_http_client(os.environ["SK_URL"], http_client=http) as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(read, write) as s:
                init = await s.initialize()
                tools = await s.list_tools()
                out = {
                    "protocol": init.protocolVersion if hasattr(init, "protocolVersion") else init.protocol_version,
                    "server": init.serverInfo.name if hasattr(init, "serverInfo") else init.server_info.name,
                    "tools": [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in tools.tools],
                    "calls": [],
                }
                for name, args in json.loads(os.environ.get("SK_CALLS", "[]")):
                    try:
                        res = await s.call_tool(name, args)
                        out["calls"].append(res.model_dump(mode="json", by_alias=True, exclude_none=True))
                    except McpError as e:
                        out["calls"].append({"rpc_error": {"code": e.error.code, "message": e.error.message}})
                print(json.dumps(out))

asyncio.run(main())
"#;

/// Runs the SDK client off the test's runtime (the fakes answer on it).
async fn sdk_client(
    sk: &Sidekey,
    session: Option<&str>,
    conv: Option<&str>,
    calls: Value,
) -> Value {
    let mut env: Vec<(&'static str, String)> = vec![
        ("SK_URL", sk.agent_url("/v1/mcp")),
        (
            "SK_CA",
            sk.path()
                .join("certs/server.crt")
                .to_str()
                .unwrap()
                .to_owned(),
        ),
        ("SK_CALLS", calls.to_string()),
    ];
    if let Some(s) = session {
        env.push(("SK_SESSION", s.to_owned()));
    }
    if let Some(c) = conv {
        env.push(("SK_CONV", c.to_owned()));
    }
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run_python(CLIENT, &[], &env)
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "python MCP client failed:\n{err}\n{out}");
    serde_json::from_str(out.trim().lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {out}\n{err}"))
}

fn names(listing: &Value) -> Vec<String> {
    listing["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

/// A fake upstream MCP server (Streamable HTTP, JSON answers) that serves
/// only the bearer tokens `valid` accepts.
fn mcp_upstream(
    valid: impl Fn(&str) -> bool + Send + Sync + 'static,
) -> impl Fn(&Recorded) -> Reply + Send + Sync + 'static {
    move |r: &Recorded| {
        if !r.bearer().is_some_and(|b| valid(&b)) {
            return Reply::Json(401, json!({"error": "invalid_token"}));
        }
        let m: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        let id = m["id"].clone();
        let answer = |result: Value| Reply::Full {
            status: 200,
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("mcp-session-id".into(), "up-session-1".into()),
            ],
            body: json!({"jsonrpc": "2.0", "id": id, "result": result})
                .to_string()
                .into(),
        };
        match m["method"].as_str() {
            Some("initialize") => answer(json!({
                "protocolVersion": "2025-06-18",
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "fake-notion", "version": "1"}
            })),
            Some("notifications/initialized") => Reply::Full {
                status: 202,
                headers: vec![],
                body: Default::default(),
            },
            Some("tools/list") => answer(json!({"tools": [
                {"name": "search", "description": "Searches pages.", "inputSchema": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}},
                {"name": "delete_everything", "description": "Not for agents.", "inputSchema": {"type": "object"}}
            ]})),
            Some("tools/call") => {
                if m["params"]["name"] != "search" {
                    return Reply::Json(
                        200,
                        json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32602, "message": "Unknown tool"}}),
                    );
                }
                // An event-stream answer, as many servers send.
                let msg = json!({"jsonrpc": "2.0", "id": id, "result": {
                    "content": [{"type": "text", "text": format!("found 2 pages for {}", m["params"]["arguments"]["query"])}],
                    "isError": false
                }});
                Reply::Full {
                    status: 200,
                    headers: vec![("content-type".into(), "text/event-stream".into())],
                    body: format!("event: message\ndata: {msg}\n\n").into(),
                }
            }
            _ => Reply::Json(
                200,
                json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": "nope"}}),
            ),
        }
    }
}

fn config(google: &str, notion_api: &str, mcp_url: &str, token_url: &str) -> String {
    format!(
        r#"[providers.google]
preset = "google"
base_url = "{google}"
tools = ["calendar_list_events", "drive_get_file"]

[providers.notion]
base_url = "{notion_api}"
token_url = "{token_url}"
client_id = "test-client"
client_secret = "test-client-secret"

[mcp_servers.notion]
url = "{mcp_url}"
provider = "notion"
tools = ["search"]
allow_http = true
"#
    )
}

struct World {
    sk: Sidekey,
    google: Upstream,
    notion: Upstream,
    tok: TokenServer,
}

async fn world() -> World {
    let google = Upstream::start().await;
    let notion = Upstream::start().await;
    let tok = TokenServer::start().await;
    let t = tok.clone();
    notion.set_handler(mcp_upstream(move |b| {
        b == NOTION_TOKEN || t.is_valid_access(b)
    }));
    let sk = Sidekey::start(Options::with_providers(&config(
        &google.url,
        &notion.url,
        &format!("{}/mcp", notion.url),
        &tok.url,
    )))
    .await;
    sk.put_credential("alice", "google", json!({"access_token": GOOGLE_TOKEN}))
        .await;
    sk.put_credential("alice", "notion", json!({"access_token": NOTION_TOKEN}))
        .await;
    World {
        sk,
        google,
        notion,
        tok,
    }
}

#[tokio::test]
async fn the_python_sdk_lists_and_calls_tools_as_the_caller() {
    let w = world().await;
    let sk = &w.sk;

    // Without a session (a platform adding the server): every operation
    // tool, no upstream tool yet (none was ever listed).
    let open = sdk_client(sk, None, None, json!([])).await;
    assert!(
        ["2025-11-25", "2025-06-18", "2025-03-26"].contains(&open["protocol"].as_str().unwrap()),
        "{open}"
    );
    assert_eq!(open["server"], "sidekey");
    let n = names(&open);
    assert!(n.contains(&"google_calendar_list_events".into()), "{n:?}");
    assert!(!n.iter().any(|t| t.starts_with("notion__")), "{n:?}");
    let schema = open["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "google_drive_get_file")
        .unwrap()["inputSchema"]
        .clone();
    assert_eq!(schema["type"], "object");
    assert_eq!(schema["required"], json!(["fileId"]));

    // With a session for google only: google's tools, no notion ones.
    let s = sk.token("alice", &["google"]).await;
    let seen = sdk_client(
        sk,
        Some(&s),
        Some("conv_mcp_1"),
        json!([
            ["google_calendar_list_events", {"maxResults": 2}],
            ["google_drive_get_file", {"fileId": "../etc"}],
            ["no_such_tool", {}],
            ["notion__search", {"query": "x"}],
        ]),
    )
    .await;
    let n = names(&seen);
    assert!(n.contains(&"google_calendar_list_events".into()));
    assert!(!n.iter().any(|t| t.starts_with("notion__")), "{n:?}");
    let calls = seen["calls"].as_array().unwrap();
    // 1: the upstream's answer, JSON also as structured content.
    assert_eq!(calls[0]["isError"], false, "{}", calls[0]);
    assert_eq!(
        calls[0]["structuredContent"]["path"],
        "/calendar/v3/calendars/primary/events"
    );
    assert!(
        calls[0]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("/calendar/v3/calendars/primary/events")
    );
    assert_eq!(w.google.last().bearer().as_deref(), Some(GOOGLE_TOKEN));
    assert!(w.google.last().query.unwrap().contains("maxResults=2"));
    // 2: bad arguments and 3: an unknown tool are JSON-RPC errors -32602.
    assert_eq!(calls[1]["rpc_error"]["code"], -32602, "{}", calls[1]);
    assert!(
        calls[1]["rpc_error"]["message"]
            .as_str()
            .unwrap()
            .contains("fileId")
    );
    assert_eq!(calls[2]["rpc_error"]["code"], -32602, "{}", calls[2]);
    // 4: a refusal the agent can say: provider not in the session.
    assert_eq!(calls[3]["isError"], true, "{}", calls[3]);
    assert_eq!(
        calls[3]["structuredContent"]["error"]["code"],
        "provider_not_allowed"
    );
    assert!(calls[3]["content"][0]["text"].as_str().unwrap().len() > 10);

    // An invalid session is refused per call, as a result, never listed as
    // an error.
    let bad = sdk_client(
        sk,
        Some("not.a.jwt"),
        None,
        json!([["google_calendar_list_events", {}]]),
    )
    .await;
    assert!(names(&bad).contains(&"google_calendar_list_events".into()));
    let c = &bad["calls"][0];
    assert_eq!(c["isError"], true);
    assert_eq!(c["structuredContent"]["error"]["code"], "invalid_session");

    // Audited as proxied calls, with the tool's name; no token anywhere.
    let audit = sk.audit_of_kind("proxy").await;
    assert!(
        audit
            .iter()
            .any(|a| a["tool"] == "google_calendar_list_events"
                && a["user"] == "alice"
                && a["conversation_id"] == "conv_mcp_1"),
        "{audit:?}"
    );
    let everything = format!("{open}{seen}{bad}{audit:?}{}", sk.log_text());
    for secret in [GOOGLE_TOKEN, NOTION_TOKEN] {
        assert!(!everything.contains(secret), "{secret} leaked");
    }
}

#[tokio::test]
async fn upstream_mcp_servers_are_called_with_the_users_own_token() {
    let w = world().await;
    let sk = &w.sk;
    let s = sk.token("alice", &["notion"]).await;
    let seen = sdk_client(
        sk,
        Some(&s),
        None,
        json!([
            ["notion__search", {"query": "roadmap"}],
            ["notion__delete_everything", {}],
        ]),
    )
    .await;
    let n = names(&seen);
    assert!(n.contains(&"notion__search".into()), "{n:?}");
    assert!(
        !n.contains(&"notion__delete_everything".into()),
        "filtered: {n:?}"
    );
    assert!(!n.iter().any(|t| t.starts_with("google_")), "{n:?}");
    let calls = seen["calls"].as_array().unwrap();
    assert_eq!(calls[0]["isError"], false, "{}", calls[0]);
    assert_eq!(
        calls[0]["content"][0]["text"],
        "found 2 pages for \"roadmap\""
    );
    assert_eq!(calls[1]["rpc_error"]["code"], -32602);
    for r in w.notion.requests() {
        assert_eq!(r.path, "/mcp");
        assert_eq!(r.bearer().as_deref(), Some(NOTION_TOKEN));
        assert!(r.header("x-sidekey-session").is_none());
        assert!(!String::from_utf8_lossy(&r.body).contains(&s));
    }
    // The session id the upstream issued is sent back to it.
    assert!(
        w.notion
            .requests()
            .iter()
            .any(|r| r.header("mcp-session-id").as_deref() == Some("up-session-1"))
    );

    // Session-less, the kept listing shows the upstream's tools.
    let open = sdk_client(sk, None, None, json!([])).await;
    assert!(names(&open).contains(&"notion__search".into()), "{open}");
    let audit = sk.audit_of_kind("proxy").await;
    assert!(
        audit.iter().any(|a| a["tool"] == "notion__search"
            && a["provider"] == "notion"
            && a["status"] == 200),
        "{audit:?}"
    );
    let everything = format!("{seen}{open}{audit:?}{}", sk.log_text());
    assert!(!everything.contains(NOTION_TOKEN));
}

#[tokio::test]
async fn a_token_the_upstream_server_refuses_is_refreshed_once() {
    let w = world().await;
    let sk = &w.sk;
    w.tok.issue_refresh("rt-notion-seed");
    sk.put_credential(
        "bob",
        "notion",
        json!({"access_token": "at-notion-revoked", "refresh_token": "rt-notion-seed", "expires_in": 3600}),
    )
    .await;
    let s = sk.token("bob", &["notion"]).await;
    let seen = sdk_client(
        sk,
        Some(&s),
        None,
        json!([["notion__search", {"query": "q"}]]),
    )
    .await;
    assert_eq!(seen["calls"][0]["isError"], false, "{seen}");
    assert_eq!(w.tok.calls(), 1, "one refresh");
    let last = w.notion.last();
    assert!(w.tok.is_valid_access(&last.bearer().unwrap()));

    // A user without a notion credential: a sentence, not a failure.
    let s = sk.token("carol", &["notion"]).await;
    let seen = sdk_client(
        sk,
        Some(&s),
        None,
        json!([["notion__search", {"query": "q"}]]),
    )
    .await;
    let c = &seen["calls"][0];
    assert_eq!(c["isError"], true, "{c}");
    assert_eq!(
        c["structuredContent"]["error"]["code"],
        "credential_missing"
    );
}

async fn raw(sk: &Sidekey, method: Method, headers: &[(&str, &str)], body: &str) -> support::Resp {
    let mut h = vec![
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
    ];
    h.extend_from_slice(headers);
    sk.agent(method, "/v1/mcp", &h, body.to_owned()).await
}

#[tokio::test]
async fn the_transport_answers_as_the_specification_says() {
    let w = world().await;
    let sk = &w.sk;
    let r = raw(sk, Method::GET, &[], "").await;
    assert_eq!(r.status, 405);
    assert!(r.headers.get("allow").is_some());

    let r = raw(sk, Method::POST, &[], "{not json").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], -32700);
    let r = raw(sk, Method::POST, &[], r#"{"hello": 1}"#).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], -32600);
    let r = raw(
        sk,
        Method::POST,
        &[],
        r#"{"jsonrpc":"2.0","id":7,"method":"resources/list"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["error"]["code"], -32601);
    assert_eq!(r.json()["id"], 7);
    let r = raw(
        sk,
        Method::POST,
        &[],
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
    )
    .await;
    assert_eq!(r.status, 202);
    let r = raw(
        sk,
        Method::POST,
        &[],
        r#"{"jsonrpc":"2.0","id":"p","method":"ping"}"#,
    )
    .await;
    assert_eq!(r.json()["result"], json!({}));

    for (asked, got) in [
        ("2025-03-26", "2025-03-26"),
        ("2025-06-18", "2025-06-18"),
        ("2025-11-25", "2025-11-25"),
        ("1999-01-01", "2025-11-25"),
    ] {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": asked, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
        let r = raw(sk, Method::POST, &[], &body.to_string()).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["result"]["protocolVersion"], got);
        assert!(r.json()["result"]["capabilities"]["tools"].is_object());
    }
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    let r = raw(sk, Method::POST, &[], &body.to_string()).await;
    let sid = r
        .headers
        .get("mcp-session-id")
        .expect("a session id at initialize")
        .to_str()
        .unwrap()
        .to_owned();
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    let r = raw(
        sk,
        Method::POST,
        &[
            ("mcp-session-id", &sid),
            ("mcp-protocol-version", "2025-06-18"),
        ],
        list,
    )
    .await;
    assert_eq!(r.status, 200);
    let r = raw(
        sk,
        Method::POST,
        &[("mcp-protocol-version", "2031-01-01")],
        list,
    )
    .await;
    assert_eq!(r.status, 400);
    let r = raw(sk, Method::DELETE, &[("mcp-session-id", &sid)], "").await;
    assert!(r.status == 204 || r.status == 200, "{}", r.status);
    let r = raw(sk, Method::POST, &[("mcp-session-id", &sid)], list).await;
    assert_eq!(r.status, 404, "an ended session id is refused");
    // The id carries no identity: a session token is judged per request.
    let s = sk.token("alice", &["google"]).await;
    let call = json!({"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"google_calendar_list_events","arguments":{}}});
    let r = raw(sk, Method::POST, &[], &call.to_string()).await;
    assert_eq!(r.json()["result"]["isError"], true);
    let r = raw(
        sk,
        Method::POST,
        &[("x-sidekey-session", &s)],
        &call.to_string(),
    )
    .await;
    assert_eq!(r.json()["result"]["isError"], false, "{}", r.text());
    let r = raw(
        sk,
        Method::POST,
        &[("authorization", &format!("Bearer {s}"))],
        &call.to_string(),
    )
    .await;
    assert_eq!(r.json()["result"]["isError"], false, "{}", r.text());
}

#[tokio::test]
async fn push_mcp_creates_then_updates_the_elevenlabs_record() {
    let w = world().await;
    let sk = &w.sk;
    let cfg = sk.config_path();
    let (code, out, err) = run_cli(
        sk.path(),
        &["elevenlabs", "mcp", "--config", cfg.to_str().unwrap()],
        &[],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let rec: Value = serde_json::from_str(&out).unwrap();
    assert!(rec["config"]["url"].as_str().unwrap().ends_with("/v1/mcp"));
    assert_eq!(rec["config"]["transport"], "STREAMABLE_HTTP");
    assert_eq!(
        rec["config"]["request_headers"]["X-Sidekey-Session"]["variable_name"],
        "secret__sidekey_session"
    );
    assert_eq!(
        rec["config"]["request_headers"]["X-Conversation-Id"]["variable_name"],
        "system__conversation_id"
    );

    // A fake ElevenLabs API that keeps what it is sent.
    let api = Upstream::start().await;
    let servers: Arc<Mutex<Vec<Value>>> = Arc::default();
    let kept = servers.clone();
    api.set_handler(move |r: &Recorded| {
        if r.header("xi-api-key").as_deref() != Some("xi-test-key") {
            return Reply::Json(401, json!({"detail": "bad key"}));
        }
        let mut s = kept.lock().unwrap();
        match (r.method.as_str(), r.path.as_str()) {
            ("GET", "/v1/convai/mcp-servers") => Reply::Json(200, json!({"mcp_servers": *s})),
            ("POST", "/v1/convai/mcp-servers") => {
                let body: Value = serde_json::from_slice(&r.body).unwrap();
                let id = format!("mcp_{}", s.len() + 1);
                s.push(json!({"id": id, "config": body["config"]}));
                Reply::Json(200, json!({"id": id, "config": body["config"]}))
            }
            ("PATCH", p) if p.starts_with("/v1/convai/mcp-servers/") => {
                Reply::Json(200, json!({"id": p.rsplit('/').next().unwrap()}))
            }
            _ => Reply::Json(404, json!({})),
        }
    });
    let env = [("ELEVENLABS_API_KEY".to_owned(), "xi-test-key".to_owned())];
    let dir = sk.path().to_path_buf();
    let cfg_s = cfg.to_str().unwrap().to_owned();
    let base = api.url.clone();
    let push = move || {
        let (dir, cfg_s, base, env) = (dir.clone(), cfg_s.clone(), base.clone(), env.clone());
        tokio::task::spawn_blocking(move || {
            run_cli(
                &dir,
                &[
                    "elevenlabs",
                    "push-mcp",
                    "--allow-unreachable",
                    "--config",
                    &cfg_s,
                    "--api-base",
                    &base,
                ],
                &env,
                None,
            )
        })
    };
    let (code, out, err) = push().await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("created sidekey (mcp_1)"), "{out}");
    let (code, out, err) = push().await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("updated sidekey (mcp_1)"), "{out}");
    assert_eq!(servers.lock().unwrap().len(), 1, "no duplicate");
    let patch = api
        .requests()
        .into_iter()
        .find(|r| r.method == "PATCH")
        .unwrap();
    let body: Value = serde_json::from_slice(&patch.body).unwrap();
    assert!(body["request_headers"].is_object());
    assert!(!out.contains("xi-test-key") && !err.contains("xi-test-key"));
}
