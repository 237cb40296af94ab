//! `/v1/mcp` against a real upstream (a server built with the official MCP
//! Python SDK that needs a Bearer token), against upstreams that misbehave
//! (garbage, hangs, endless streams, huge listings), and against hostile
//! requests. Also: the record push-mcp sends, checked with the ElevenLabs
//! SDK's own model.
use sidekey_testkit as support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::upstream::{Recorded, Reply, Upstream};
use support::{Options, Sidekey, ports, python, run_cli, run_python};

const NOTION_TOKEN: &str = "secret_notion-hostile-0003";

/// An MCP server made with the Python SDK (MCPServer, Streamable HTTP,
/// event-stream answers) behind a guard that answers 401 to any other
/// bearer token; its tool reports a digest of the token it was called with.
const SDK_SERVER: &str = r#"
import hashlib, json, os, sys
import uvicorn
from mcp.server.mcpserver import MCPServer

TOKENS = set(os.environ["UP_TOKENS"].split(","))
seen = {"sha256": None, "session_header": None}
server = MCPServer("fake-notes")

@server.tool()
def search(query: str) -> str:
    """Searches the caller's notes."""
    return json.dumps({"query": query, "token_sha256": seen["sha256"], "saw_session_header": seen["session_header"]})

@server.tool()
def admin_wipe() -> str:
    """Not for agents."""
    return "wiped"

app = server.streamable_http_app(stateless_http=True)

async def guard(scope, receive, send):
    if scope["type"] == "http":
        h = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        auth = h.get("authorization", "")
        tok = auth[7:] if auth.startswith("Bearer ") else ""
        if tok not in TOKENS:
            await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"error": "invalid_token"}'})
            return
        seen["sha256"] = hashlib.sha256(tok.encode()).hexdigest()
        seen["session_header"] = "x-sidekey-session" in h
    await app(scope, receive, send)

uvicorn.run(guard, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", lifespan="on")
"#;

struct PyServer(Child);

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn sdk_server(tokens: &str) -> (PyServer, u16) {
    let port = ports::listen_port();
    let child = Command::new(python())
        .arg("-c")
        .arg(SDK_SERVER)
        .arg(port.to_string())
        .env("UP_TOKENS", tokens)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the Python MCP server");
    let server = PyServer(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the Python MCP server did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (server, port)
}

fn config(notion_api: &str, servers: &[(&str, String)]) -> String {
    let mut s = format!(
        r#"[providers.notion]
base_url = "{notion_api}"
"#
    );
    for (name, url) in servers {
        s.push_str(&format!(
            "\n[mcp_servers.{name}]\nurl = \"{url}\"\nprovider = \"notion\"\nallow_http = true\n"
        ));
    }
    s
}

async fn rpc(
    sk: &Sidekey,
    session: Option<&str>,
    headers: &[(&str, &str)],
    body: &str,
) -> support::Resp {
    let mut h = vec![
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
    ];
    if let Some(s) = session {
        h.push(("x-sidekey-session", s));
    }
    h.extend_from_slice(headers);
    sk.agent(Method::POST, "/v1/mcp", &h, body.to_owned()).await
}

fn call(name: &str, args: Value) -> String {
    json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": name, "arguments": args}})
        .to_string()
}

const LIST: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;

#[tokio::test]
async fn an_upstream_built_with_the_python_sdk_gets_the_users_token_only() {
    let api = Upstream::start().await;
    let (_py, port) = sdk_server(NOTION_TOKEN).await;
    let toml = config(
        &api.url,
        &[("notes", format!("http://127.0.0.1:{port}/mcp"))],
    )
    .replace(
        "allow_http = true\n",
        "allow_http = true\ntools = [\"search\"]\n",
    );
    let sk = Sidekey::start(Options::with_providers(&toml)).await;
    sk.put_credential("alice", "notion", json!({"access_token": NOTION_TOKEN}))
        .await;
    let s = sk.token("alice", &["notion"]).await;

    let r = rpc(&sk, Some(&s), &[], LIST).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let names: Vec<String> = r.json()["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["notes__search"], "filtered by the tools globs");

    let r = rpc(
        &sk,
        Some(&s),
        &[],
        &call("notes__search", json!({"query": "budget"})),
    )
    .await;
    let res = &r.json()["result"];
    assert_eq!(res["isError"], false, "{}", r.text());
    let text = res["content"][0]["text"].as_str().unwrap();
    let got: Value = serde_json::from_str(text).unwrap();
    assert_eq!(got["query"], "budget");
    let digest = format!("{:x}", Sha256::digest(NOTION_TOKEN.as_bytes()));
    assert_eq!(
        got["token_sha256"], digest,
        "the upstream got alice's token"
    );
    assert_eq!(got["saw_session_header"], false, "never the session token");

    // A user whose token the server refuses (and that cannot be renewed):
    // a sentence to say, nothing else.
    sk.put_credential(
        "bob",
        "notion",
        json!({"access_token": "secret_notion-bob-stale"}),
    )
    .await;
    let b = sk.token("bob", &["notion"]).await;
    let r = rpc(
        &sk,
        Some(&b),
        &[],
        &call("notes__search", json!({"query": "x"})),
    )
    .await;
    let res = &r.json()["result"];
    assert_eq!(res["isError"], true, "{}", r.text());
    assert_eq!(res["structuredContent"]["error"]["code"], "reauth_required");
    let r = rpc(&sk, Some(&s), &[], &call("notes__admin_wipe", json!({}))).await;
    assert_eq!(
        r.json()["error"]["code"],
        -32602,
        "filtered tools cannot be called"
    );
    let all = format!("{}{}", r.text(), sk.log_text());
    assert!(!all.contains(NOTION_TOKEN));
}

#[tokio::test]
async fn misbehaving_upstream_servers_end_in_a_sentence_within_the_timeout() {
    let api = Upstream::start().await;
    let garbage = Upstream::start().await;
    garbage.set_handler(|_| Reply::Full {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: Bytes::from_static(b"{\"jsonrpc\": \"2.0\", \"id\": 1, \"res"),
    });
    let hangs = Upstream::start().await;
    hangs.set_handler(|_| {
        Reply::Delay(
            Duration::from_secs(60),
            Box::new(Reply::Json(200, json!({}))),
        )
    });
    let endless = Upstream::start().await;
    endless.set_handler(|_| Reply::Stream {
        status: 200,
        chunk: Bytes::from(vec![b' '; 64 * 1024]),
        count: 1_000_000,
        delay: Duration::ZERO,
    });
    let huge = Upstream::start().await;
    huge.set_handler(|r: &Recorded| {
        let m: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        let result = match m["method"].as_str() {
            Some("initialize") => json!({"protocolVersion": "2025-06-18", "capabilities": {}, "serverInfo": {"name": "huge", "version": "1"}}),
            Some("tools/list") => {
                let mut tools: Vec<Value> = (0..10_000)
                    .map(|i| json!({"name": format!("t{i}"), "inputSchema": {"type": "object"}}))
                    .collect();
                tools.insert(0, json!({"name": "fat", "inputSchema": {"type": "object", "description": "x".repeat(1 << 20)}}));
                json!({ "tools": tools })
            }
            _ => return Reply::Full { status: 202, headers: vec![], body: Bytes::new() },
        };
        Reply::Json(200, json!({"jsonrpc": "2.0", "id": m["id"], "result": result}))
    });
    let servers = [
        ("garbage", format!("{}/mcp", garbage.url)),
        ("hangs", format!("{}/mcp", hangs.url)),
        ("endless", format!("{}/mcp", endless.url)),
        ("huge", format!("{}/mcp", huge.url)),
    ];
    let sk = Sidekey::start(
        Options::with_providers(&config(&api.url, &servers)).server("upstream_timeout_secs = 2"),
    )
    .await;
    sk.put_credential("alice", "notion", json!({"access_token": NOTION_TOKEN}))
        .await;
    let s = sk.token("alice", &["notion"]).await;
    for (name, code) in [
        ("garbage", "upstream_unreachable"),
        ("hangs", "upstream_timeout"),
        ("endless", "upstream_unreachable"),
    ] {
        let started = Instant::now();
        let r = rpc(&sk, Some(&s), &[], &call(&format!("{name}__x"), json!({}))).await;
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        let res = &r.json()["result"];
        assert_eq!(res["isError"], true, "{name}: {}", r.text());
        assert_eq!(res["structuredContent"]["error"]["code"], code, "{name}");
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{name} took {:?}",
            started.elapsed()
        );
    }
    // A listing with every server: bounded, and within the timeout too.
    let started = Instant::now();
    let r = rpc(&sk, Some(&s), &[], LIST).await;
    assert_eq!(r.status, 200);
    let tools = r.json()["result"]["tools"].as_array().unwrap().clone();
    assert!(started.elapsed() < Duration::from_secs(15));
    let from_huge = tools
        .iter()
        .filter(|t| t["name"].as_str().unwrap().starts_with("huge__"))
        .count();
    assert_eq!(from_huge, 512, "at most 512 tools per server");
    assert!(
        !tools.iter().any(|t| t["name"] == "huge__fat"),
        "a megabyte definition is dropped"
    );
    assert!(r.body.len() < 1 << 20);
}

#[tokio::test]
async fn hostile_requests_are_refused_clearly_and_nothing_is_forwarded() {
    let api = Upstream::start().await;
    let toml = format!(
        r#"[providers.google]
preset = "google"
base_url = "{}"
tools = ["*"]
"#,
        api.url
    );
    let sk = Sidekey::start(Options::with_providers(&toml)).await;
    sk.put_credential("alice", "google", json!({"access_token": "ya29.hostile"}))
        .await;
    let s = sk.token("alice", &["google"]).await;

    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"pad":"{}"}}}}"#,
        "x".repeat(2 << 20)
    );
    let r = rpc(&sk, None, &[], &big).await;
    assert_eq!(r.status, 413);
    let deep = "[".repeat(100_000);
    let r = rpc(&sk, None, &[], &deep).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], -32700);
    let batch =
        r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"ping"}]"#;
    let r = rpc(&sk, None, &[("mcp-protocol-version", "2025-06-18")], batch).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], -32600);
    let r = rpc(&sk, None, &[("mcp-protocol-version", "2025-03-26")], batch).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json().as_array().unwrap().len(), 2);

    for id in [
        json!(0),
        json!(-7),
        json!(18446744073709551615u64),
        json!(1.5),
        json!("ü-\u{1F600}-id"),
        json!(""),
    ] {
        let body = json!({"jsonrpc": "2.0", "id": id, "method": "ping"}).to_string();
        let r = rpc(&sk, None, &[], &body).await;
        assert_eq!(r.json()["id"], id, "id echoed unchanged");
    }
    for id in [json!(true), json!({"a": 1}), json!([1])] {
        let body = json!({"jsonrpc": "2.0", "id": id, "method": "ping"}).to_string();
        let r = rpc(&sk, None, &[], &body).await;
        assert_eq!(r.json()["error"]["code"], -32600, "{id}");
    }
    let r = rpc(
        &sk,
        None,
        &[],
        r#"{"jsonrpc":"2.0","id":3,"method":"sampling/createMessage"}"#,
    )
    .await;
    assert_eq!(r.json()["error"]["code"], -32601);

    for (name, args) in [
        ("google_drive_get_file", json!({"fileId": "../../admin"})),
        ("google_drive_get_file", json!({"fileId": "a%2fb"})),
        (
            "google_drive_get_file",
            json!({"fileId": "x", "path": "/admin"}),
        ),
        ("google_calendar_list_events", json!({"maxResults": "all"})),
        ("google_admin_wipe", json!({})),
        ("../google_drive_get_file", json!({})),
    ] {
        let r = rpc(&sk, Some(&s), &[], &call(name, args.clone())).await;
        assert_eq!(r.status, 200, "{name} {args}");
        assert_eq!(
            r.json()["error"]["code"],
            -32602,
            "{name} {args}: {}",
            r.text()
        );
    }
    let r = rpc(
        &sk,
        Some(&s),
        &[],
        &json!({"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"google_drive_get_file","arguments":"fileId=x"}}).to_string(),
    )
    .await;
    assert_eq!(r.json()["error"]["code"], -32602);
    assert_eq!(api.count(), 0, "nothing was forwarded");
    assert!(!sk.log_text().contains("ya29.hostile"));
}

#[tokio::test]
async fn the_mcp_record_is_what_the_elevenlabs_sdk_models() {
    let api = Upstream::start().await;
    let sk = Sidekey::start(
        Options::with_providers(&config(&api.url, &[]))
            .elevenlabs("mcp_approval_policy = \"require_approval_all\""),
    )
    .await;
    let cfg = sk.config_path();
    let (code, out, err) = run_cli(
        sk.path(),
        &["elevenlabs", "mcp", "--config", cfg.to_str().unwrap()],
        &[],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let rec: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rec["config"]["approval_policy"], "require_approval_all");
    let check = r#"
import json, sys
from elevenlabs.types import McpServerConfigInput as M
cfg = json.loads(sys.argv[1])["config"]
unknown = sorted(set(cfg) - set(M.model_fields))
assert not unknown, f"fields the SDK does not model: {unknown}"
m = M.model_validate(cfg)
for name, v in m.request_headers.items():
    assert type(v).__name__ != "str" and getattr(v, "variable_name", None), (name, v)
assert str(m.transport) in ("STREAMABLE_HTTP", "McpServerTransport.STREAMABLE_HTTP") or m.transport == "STREAMABLE_HTTP", m.transport
print(json.dumps(m.model_dump(mode="json", exclude_none=True)))
"#;
    let (code, out, err) = run_python(check, &[&out], &[]);
    assert_eq!(code, 0, "{err}");
    let dumped: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        dumped["request_headers"]["X-Sidekey-Session"]["variable_name"],
        "secret__sidekey_session"
    );
    assert!(dumped["url"].as_str().unwrap().ends_with("/v1/mcp"));
}
