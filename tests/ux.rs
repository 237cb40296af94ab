//! What a new user and the main app's developer read: error messages that
//! say why and where to fix it, the admin user list, and the ElevenLabs
//! commands refusing answers that are not ElevenLabs'.
use sidekey_testkit as support;

use std::path::Path;

use http::Method;
use serde_json::{Value, json};
use support::upstream::{Reply, Upstream};
use support::{InProcess, Options, Sidekey, provider_toml, run_cli};

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn message(r: &support::Resp) -> String {
    r.json()["error"]["message"].as_str().unwrap().to_owned()
}

// ---------------------------------------------------------------------------
// Messages

#[tokio::test]
async fn admin_unknown_provider_lists_the_configured_providers() {
    let up = Upstream::start().await;
    let sk = InProcess::start(Options::with_providers(&format!(
        "{}{}",
        provider_toml("custom", &up.url, ""),
        provider_toml("crm", &up.url, "")
    )))
    .await;
    for (method, path, body) in [
        (
            Method::PUT,
            "/v1/users/alice/credentials/dropbox",
            Some(json!({"access_token": "t"})),
        ),
        (
            Method::POST,
            "/v1/sessions",
            Some(json!({"user": "alice", "providers": ["dropbox"]})),
        ),
        (
            Method::POST,
            "/v1/users/alice/oauth/dropbox/start",
            Some(json!({})),
        ),
    ] {
        let r = sk.admin(method, path, body).await;
        r.assert_error(404, "unknown_provider");
        let m = message(&r);
        assert!(
            m.contains("dropbox") && m.contains("crm, custom"),
            "{path}: {m}"
        );
        assert!(!m.contains("I don't know"), "agent's voice on admin: {m}");
    }
    // The agent still hears a sentence it can say.
    let token = sk.token("alice", &["custom"]).await;
    let r = sk
        .proxy(Method::GET, "/v1/proxy/dropbox/x", &token, "")
        .await;
    r.assert_error(404, "unknown_provider");
    assert!(message(&r).starts_with("I don't know a service called"));
}

#[tokio::test]
async fn oauth_start_names_the_missing_setting() {
    let up = Upstream::start().await;
    let sk = InProcess::start(Options::with_providers(&format!(
        "{}{}{}",
        provider_toml(
            "noauth",
            &up.url,
            &format!("token_url = \"{}/token\"\nclient_id = \"cid\"", up.url)
        ),
        provider_toml(
            "notoken",
            &up.url,
            &format!(
                "authorize_url = \"{}/authorize\"\nclient_id = \"cid\"",
                up.url
            )
        ),
        "[providers.slack]\npreset = \"slack\"\nclient_id_env = \"SIDEKEY_TEST_UNSET_SLACK_CLIENT_ID\"\n"
    )))
    .await;
    let start = |p: &'static str| {
        let sk = &sk;
        async move {
            sk.admin(
                Method::POST,
                &format!("/v1/users/alice/oauth/{p}/start"),
                Some(json!({})),
            )
            .await
        }
    };
    let r = start("noauth").await;
    r.assert_error(400, "bad_request");
    let m = message(&r);
    assert!(
        m.contains("authorize_url") && !m.contains("token_url"),
        "{m}"
    );
    let r = start("notoken").await;
    let m = message(&r);
    assert!(
        m.contains("token_url") && !m.contains("authorize_url"),
        "{m}"
    );
    // Slack's client id comes from the variable the config names.
    let r = start("slack").await;
    r.assert_error(503, "not_configured");
    let m = message(&r);
    assert!(
        m.contains("SIDEKEY_TEST_UNSET_SLACK_CLIENT_ID"),
        "names the variable to set: {m}"
    );
}

#[tokio::test]
async fn refresh_tool_without_a_client_id_does_not_say_try_again() {
    let up = Upstream::start().await;
    let token_ep = Upstream::start_with(std::sync::Arc::new(|_: &_| {
        Reply::Json(401, json!({"error": "invalid_client"}))
    }))
    .await;
    let sk = InProcess::start(Options::with_providers(&provider_toml(
        "custom",
        &up.url,
        &format!("token_url = \"{}/token\"", token_ep.url),
    )))
    .await;
    sk.put_credential(
        "alice",
        "custom",
        json!({"access_token": "at-1", "refresh_token": "rt-1", "expires_in": 3600}),
    )
    .await;
    let token = sk.token("alice", &["custom"]).await;
    let r = sk
        .proxy(Method::POST, "/v1/session/refresh", &token, "{}")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let entry = &r.json()["providers"]["custom"];
    assert_eq!(entry["status"], "refresh_failed", "{entry}");
    let m = entry["message"].as_str().unwrap();
    assert!(!m.contains("try again"), "{m}");
    assert!(m.contains("isn't set up"), "{m}");
}

#[tokio::test]
async fn rate_limit_message_says_1_second() {
    let up = Upstream::start().await;
    let sk = InProcess::start(Options::with_providers(&format!(
        "{}\n[limits]\nper_session_rps = 1\nper_session_burst = 1\n",
        provider_toml("custom", &up.url, "")
    )))
    .await;
    sk.put_credential("alice", "custom", json!({"access_token": "at-1"}))
        .await;
    let token = sk.token("alice", &["custom"]).await;
    assert_eq!(
        sk.proxy(Method::GET, "/v1/proxy/custom/a", &token, "")
            .await
            .status,
        200
    );
    let r = sk
        .proxy(Method::GET, "/v1/proxy/custom/a", &token, "")
        .await;
    r.assert_error(429, "rate_limited");
    assert_eq!(r.headers["retry-after"], "1");
    assert!(message(&r).ends_with("in 1 second."), "{}", message(&r));
}

#[tokio::test]
async fn rotate_key_run_again_says_the_rotation_is_done() {
    let up = Upstream::start().await;
    let mut sk = Sidekey::start(Options::with_providers(&provider_toml(
        "custom", &up.url, "",
    )))
    .await;
    sk.put_credential("alice", "custom", json!({"access_token": "at-rot"}))
        .await;
    assert_eq!(sk.stop(), Some(0));
    let dir = sk.path().to_path_buf();
    let config = sk.config_path().to_string_lossy().into_owned();
    // Hex works as well as base64.
    std::fs::write(dir.join("new.key"), format!("{}\n", "ab".repeat(32))).unwrap();
    let args = [
        "rotate-key",
        "--config",
        &config,
        "--new-key-file",
        "new.key",
    ];
    let (code, out, err) = run_cli(&dir, &args, &[], None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("re-encrypted"), "{out}");
    let (code, out, err) = run_cli(&dir, &args, &[], None);
    assert_eq!(code, 0, "second run: {out}{err}");
    assert!(out.contains("already done"), "{out}{err}");
    assert!(out.contains("new.key"), "{out}");

    let (code, out, _) = run_cli(&dir, &["rotate-key", "--help"], &[], None);
    assert_eq!(code, 0);
    assert!(out.contains("base64") && out.contains("hex"), "{out}");
}

// ---------------------------------------------------------------------------
// GET /v1/users

#[tokio::test]
async fn users_are_listed_a_page_at_a_time_with_real_update_times() {
    let up = Upstream::start().await;
    let sk = InProcess::start(Options::with_providers(&provider_toml(
        "custom", &up.url, "",
    )))
    .await;
    let before = now();
    // '.', '+' and '-' sort before '/', the store's key separator.
    for u in ["bob", "al", "al.x", "al+y", "carol"] {
        sk.put_credential(u, "custom", json!({"access_token": format!("tok-{u}")}))
            .await;
    }
    // A user known only by a profile, and one with both.
    for u in ["dave", "al"] {
        let r = sk
            .admin(
                Method::PUT,
                &format!("/v1/users/{u}"),
                Some(json!({"tenant": "acme"})),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // A tenant's credential is not a user.
    let r = sk
        .admin(
            Method::PUT,
            "/v1/tenants/acme/credentials/custom",
            Some(json!({"access_token": "tok-acme"})),
        )
        .await;
    assert_eq!(r.status, 200);

    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &after {
            // The cursor is a user id: '+' must be sent as %2B.
            Some(a) => format!("/v1/users?limit=2&after={}", a.replace('+', "%2B")),
            None => "/v1/users?limit=2".to_owned(),
        };
        let r = sk.admin(Method::GET, &path, None).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let users = v["users"].as_array().unwrap();
        assert!(users.len() <= 2);
        for u in users {
            let id = u["user"].as_str().unwrap().to_owned();
            let updated = u["updated_at"].as_i64().unwrap();
            assert!(updated >= before, "{id}: updated_at {updated}");
            seen.push(id);
        }
        pages += 1;
        match v["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => break,
        }
        assert!(pages < 10);
    }
    assert_eq!(
        seen,
        ["al", "al+y", "al.x", "bob", "carol", "dave"],
        "every user once, in id order"
    );
    assert_eq!(pages, 3);

    // A user created by a credential PUT alone has a real updated_at.
    let r = sk.admin(Method::GET, "/v1/users/bob", None).await;
    assert!(
        r.json()["updated_at"].as_i64().unwrap() >= before,
        "{}",
        r.text()
    );
    assert!(!r.text().contains("tok-bob"));

    let r = sk.admin(Method::GET, "/v1/users?limit=0", None).await;
    r.assert_error(400, "bad_request");
    let r = sk.admin(Method::GET, "/v1/users?after=a%2Fb", None).await;
    r.assert_error(400, "bad_request");
    let r = sk.admin(Method::DELETE, "/v1/users", None).await;
    r.assert_error(405, "method_not_allowed");
}

// ---------------------------------------------------------------------------
// ElevenLabs commands

fn cli_config(dir: &Path) -> String {
    // A public URL: push-tools refuses one ElevenLabs cannot reach.
    let text = Options::with_providers("[providers.slack]\npreset = \"slack\"\n")
        .server("public_url = \"https://sidekey.acme-voice.com\"")
        .config_text();
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn rewrite_tool_drops_fields_only_the_listing_has() {
    let dir = tempfile::tempdir().unwrap();
    let config = cli_config(dir.path());
    let item = json!({
        "id": "tool_123",
        "access_info": {"is_creator": true, "creator_name": "x", "role": "admin"},
        "usage_stats": {"avg_latency_secs": 0.3},
        "tool_config": {"type": "webhook", "name": "slack_post", "description": "Post",
            "api_schema": {"url": "https://slack.com/api/chat.postMessage", "method": "POST",
                "request_headers": {"Authorization": "Bearer {{secret__slack_token}}"}}}
    });
    let (code, out, err) = run_cli(
        dir.path(),
        &["elevenlabs", "rewrite-tool", "--config", &config],
        &[],
        Some(&item.to_string()),
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["tool_config"], "{v}");
    assert!(
        v["tool_config"]["api_schema"]["url"]
            .as_str()
            .unwrap()
            .ends_with("/v1/proxy/slack/chat.postMessage")
    );
}

#[tokio::test]
async fn push_tools_refuses_answers_that_are_not_elevenlabs() {
    let dir = tempfile::tempdir().unwrap();
    let config = cli_config(dir.path());
    // Some other JSON API: no tools list.
    let other = Upstream::start_with(std::sync::Arc::new(|_: &_| {
        Reply::Json(200, json!({"status": "ok"}))
    }))
    .await;
    // A tools list, but creating answers without an id.
    let no_id = Upstream::start_with(std::sync::Arc::new(|r: &support::upstream::Recorded| {
        if r.method == "GET" {
            Reply::Json(200, json!({"tools": [], "has_more": false}))
        } else {
            Reply::Json(200, json!({"created": true}))
        }
    }))
    .await;
    for (base, mentions) in [(&other.url, "tools list"), (&no_id.url, "id")] {
        let (dir, config, base) = (dir.path().to_path_buf(), config.clone(), base.clone());
        let (code, out, err) = tokio::task::spawn_blocking(move || {
            run_cli(
                &dir,
                &[
                    "elevenlabs",
                    "push-tools",
                    "--config",
                    &config,
                    "--api-base",
                    &base,
                ],
                &[("ELEVENLABS_API_KEY".into(), "xi_test_key_ux".into())],
                None,
            )
        })
        .await
        .unwrap();
        assert_eq!(code, 2, "{mentions}: {out}{err}");
        assert!(!out.contains("created"), "no success reported: {out}");
        let line = err.trim();
        assert_eq!(line.lines().count(), 1, "one line: {err}");
        assert!(
            line.contains(mentions) && line.contains("ElevenLabs"),
            "{err}"
        );
        assert!(!err.contains("xi_test_key_ux"));
    }
    assert_eq!(other.count(), 1, "nothing created after a bad listing");
}

#[tokio::test]
async fn user_pages_match_a_sorted_listing_whatever_the_ids() {
    let up = Upstream::start().await;
    let sk = InProcess::start(Options::with_providers(&provider_toml(
        "custom", &up.url, "",
    )))
    .await;
    // Ids built from characters that sort below, at and above the store's
    // '/' separator, so key order and id order disagree often.
    let alphabet = ['a', 'b', '.', '+', '-', 'Z', '_'];
    let mut all = std::collections::BTreeSet::new();
    let mut n = 7u32;
    for i in 0..60 {
        n = n.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let len = 1 + (n >> 8) as usize % 4;
        let id: String = (0..len)
            .map(|j| alphabet[((n >> (10 + 3 * j)) as usize) % alphabet.len()])
            .collect();
        let id = format!("a{id}");
        if i % 5 == 0 {
            let r = sk
                .admin(
                    Method::PUT,
                    &format!("/v1/users/{}", id.replace('+', "%2B")),
                    Some(json!({})),
                )
                .await;
            assert_eq!(r.status, 200, "{id}: {}", r.text());
        } else {
            sk.put_credential(
                &id.replace('+', "%2B"),
                "custom",
                json!({"access_token": "t"}),
            )
            .await;
        }
        all.insert(id);
    }
    let all: Vec<String> = all.into_iter().collect();
    for limit in [1, 2, 3, 7, 100] {
        let mut seen: Vec<String> = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let q = match &after {
                Some(a) => format!("/v1/users?limit={limit}&after={}", a.replace('+', "%2B")),
                None => format!("/v1/users?limit={limit}"),
            };
            let v = sk.admin(Method::GET, &q, None).await.json();
            let page: Vec<String> = v["users"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| u["user"].as_str().unwrap().to_owned())
                .collect();
            assert!(page.len() <= limit);
            seen.extend(page);
            match v["next"].as_str() {
                Some(n) => after = Some(n.to_owned()),
                None => break,
            }
        }
        assert_eq!(seen, all, "limit {limit}");
    }
}

#[test]
fn config_mistakes_name_their_table_and_the_key_meant() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        "[server]\nlisen = \"127.0.0.1:1\"\nmax_body_bytes = \"big\"\n[providers.slack]\nprest = \"slack\"\n[connect]\napp_nme = \"x\"\n",
    )
    .unwrap();
    let (code, _out, err) = run_cli(
        dir.path(),
        &["check-config", "--config", path.to_str().unwrap()],
        &[],
        None,
    );
    assert_eq!(code, 2);
    for want in [
        "(line 2) [server]: unknown key `lisen`; did you mean `listen`?",
        "(line 3) [server] max_body_bytes: invalid type: string, expected a whole number",
        "(line 5) [providers.slack]: unknown key `prest`; did you mean `preset`?",
        "(line 7) [connect]: unknown key `app_nme`; did you mean `app_name`?",
    ] {
        assert!(err.contains(want), "{want} not in:\n{err}");
    }
    assert!(!err.contains("u64"), "{err}");
}

#[test]
fn connect_app_url_must_be_an_https_address() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "[connect]\napp_url = \"http://app.example/home\"\n").unwrap();
    let (code, _out, err) = run_cli(
        dir.path(),
        &["check-config", "--config", path.to_str().unwrap()],
        &[],
        None,
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(
            "[connect] app_url = \"http://app.example/home\": give the https:// address of your app"
        ),
        "{err}"
    );
}
