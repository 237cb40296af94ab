//! Token lifecycle: refresh before use, single flight, rotation
//! durability, 401 → refresh → replay, Slack conventions, dead refresh
//! tokens, transient failures and backoff, the refresh tool, the OAuth code
//! flow with PKCE, client credentials and tenant credentials.
//!
//! Token-endpoint traffic is observed through the fake `TokenServer` (it
//! counts calls, rotates single-use refresh tokens and verifies PKCE); the
//! fake upstream accepts only access tokens that fake issued, so a request
//! that reached it with a stale token is visible as a 401 there.
use sidekey_testkit as support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::token::require_valid_token;
use support::{oauth_provider, unix_now};

use base64::Engine;
use futures_util::future::join_all;
use http::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::token::{Mode, TokenServer};
use support::upstream::{Reply, Upstream};
use support::{Api, InProcess, Options, Resp, Sidekey, query_param};

const NEW_1: &str = "at-1-test-client";
const NEW_2: &str = "at-2-test-client";
const NEW_3: &str = "at-3-test-client";
/// `public_url` of the test config plus the callback path.
const REDIRECT_CUSTOM: &str = "https://127.0.0.1:8443/oauth/custom/callback";
const RETURN_TO: &str = "https://app.example/settings";

// ---------------------------------------------------------------------------
// Local helpers

/// A preset provider with its URLs pointed at the fakes.
fn preset_provider(
    name: &str,
    preset: &str,
    up: &Upstream,
    tok: &TokenServer,
    extra: &str,
) -> String {
    format!(
        "[providers.{name}]\npreset = \"{preset}\"\nbase_url = \"{}\"\ntoken_url = \"{}\"\n\
         client_id = \"test-client\"\nclient_secret = \"test-client-secret\"\n{extra}\n",
        up.url, tok.url
    )
}

/// Credential metadata from the admin API (asserts 200).
async fn meta(api: &Api, owner_path: &str) -> Value {
    let r = api.admin(Method::GET, owner_path, None).await;
    assert_eq!(r.status, 200, "GET {owner_path}: {}", r.text());
    r.json()
}

fn user_cred(user: &str, provider: &str) -> String {
    format!("/v1/users/{user}/credentials/{provider}")
}

/// `POST /v1/session/refresh` with a session token and a raw JSON body.
async fn refresh_tool(api: &Api, session: &str, body: &str) -> Resp {
    api.agent(
        Method::POST,
        "/v1/session/refresh",
        &[
            ("x-sidekey-session", session),
            ("content-type", "application/json"),
        ],
        body.to_owned(),
    )
    .await
}

/// Access tokens the fake issued so far (each successful token call issues
/// exactly one; failed calls issue none).
fn issued(tok: &TokenServer) -> usize {
    tok.state
        .lock()
        .unwrap()
        .valid_access
        .iter()
        .filter(|t| t.starts_with("at-"))
        .count()
}

fn bearers(up: &Upstream) -> Vec<Option<String>> {
    up.requests().iter().map(|r| r.bearer()).collect()
}

fn assert_no_token_in(text: &str, tok: &TokenServer, others: &[&str]) {
    for t in tok
        .all_tokens()
        .iter()
        .map(String::as_str)
        .chain(others.iter().copied())
    {
        assert!(
            !text.contains(t),
            "a token value ({t}) leaked into a response: {text}"
        );
    }
}

fn pkce(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

fn location(r: &Resp) -> String {
    r.headers
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no Location header (status {}): {}", r.status, r.text()))
        .to_owned()
}

fn assert_html(r: &Resp, status: u16) {
    assert_eq!(r.status, status, "{}", r.text());
    let ct = r
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(ct.starts_with("text/html"), "content-type {ct:?}");
    assert!(r.headers.get("location").is_none(), "unexpected redirect");
}

/// Admin OAuth start; returns (authorize_url, state).
async fn oauth_start(api: &Api, user: &str, provider: &str, body: Value) -> (String, String) {
    let r = api
        .admin(
            Method::POST,
            &format!("/v1/users/{user}/oauth/{provider}/start"),
            Some(body),
        )
        .await;
    assert_eq!(r.status, 200, "oauth start: {}", r.text());
    let v = r.json();
    (
        v["authorize_url"].as_str().unwrap().to_owned(),
        v["state"].as_str().unwrap().to_owned(),
    )
}

async fn callback(api: &Api, provider: &str, query: &str) -> Resp {
    api.agent(
        Method::GET,
        &format!("/oauth/{provider}/callback?{query}"),
        &[],
        "",
    )
    .await
}

// ---------------------------------------------------------------------------
// 1. Refresh before use

#[tokio::test]
async fn refreshes_before_use_when_expiry_is_within_the_skew() {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    require_valid_token(&up, &tok);
    tok.issue_refresh("rt-body-seed");
    tok.issue_refresh("rt-basic-seed");
    let toml = oauth_provider("bodyauth", &up.url, &tok.url, "")
        + &oauth_provider("basicauth", &up.url, &tok.url, "client_auth = \"basic\"");
    let sk = Sidekey::start(Options::with_providers(&toml)).await;

    // Expires in 30 s, skew is 60 s: due for refresh.
    let before = sk
        .put_credential(
            "alice",
            "bodyauth",
            json!({"access_token": "at-old-body", "refresh_token": "rt-body-seed", "expires_in": 30}),
        )
        .await;
    let session = sk.token("alice", &["bodyauth", "basicauth"]).await;
    let r = sk
        .proxy(Method::GET, "/v1/proxy/bodyauth/me", &session, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tok.calls(), 1);
    assert_eq!(up.last().bearer().as_deref(), Some(NEW_1));
    let form = tok.last_form();
    assert_eq!(form["grant_type"], "refresh_token");
    assert_eq!(form["refresh_token"], "rt-body-seed");
    assert_eq!(form["client_id"], "test-client");
    assert_eq!(form["client_secret"], "test-client-secret");
    assert!(tok.last_basic().is_none(), "body auth must not send Basic");

    let after = meta(&sk, &user_cred("alice", "bodyauth")).await;
    assert_eq!(after["status"], "active");
    assert_eq!(after["has_refresh_token"], true);
    let (old_exp, new_exp) = (
        before["expires_at"].as_i64().unwrap(),
        after["expires_at"].as_i64().unwrap(),
    );
    // The fake grants 3600 s; the old token had 30 s left.
    assert!(
        new_exp >= old_exp + 3000 && new_exp <= unix_now() + 3600,
        "expires_at {old_exp} → {new_exp}"
    );

    // The fresh token is used as is: no second token call.
    let r = sk
        .proxy(Method::GET, "/v1/proxy/bodyauth/me", &session, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tok.calls(), 1);
    assert_eq!(up.last().bearer().as_deref(), Some(NEW_1));

    // client_auth = "basic": credentials in the Authorization header.
    sk.put_credential(
        "alice",
        "basicauth",
        json!({"access_token": "at-old-basic", "refresh_token": "rt-basic-seed", "expires_in": 5}),
    )
    .await;
    let r = sk
        .proxy(Method::GET, "/v1/proxy/basicauth/me", &session, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tok.calls(), 2);
    assert_eq!(up.last().bearer().as_deref(), Some(NEW_2));
    assert_eq!(
        tok.last_basic(),
        Some(("test-client".to_owned(), "test-client-secret".to_owned()))
    );
    let form = tok.last_form();
    assert_eq!(form["refresh_token"], "rt-basic-seed");
    assert!(
        !form.contains_key("client_secret"),
        "basic auth must not also put the secret in the form"
    );
    let m = meta(&sk, &user_cred("alice", "basicauth")).await;
    assert!(m["expires_at"].as_i64().unwrap() > unix_now() + 3000);

    // No request ever reached the upstream with a stale token.
    assert!(
        bearers(&up)
            .iter()
            .all(|b| b.as_deref() == Some(NEW_1) || b.as_deref() == Some(NEW_2)),
        "{:?}",
        bearers(&up)
    );
}

// ---------------------------------------------------------------------------
// 2. Single flight

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_one_refresh() {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    require_valid_token(&up, &tok);
    tok.issue_refresh("rt-seed");
    let sk = Sidekey::start(Options::with_providers(&oauth_provider(
        "custom", &up.url, &tok.url, "",
    )))
    .await;
    sk.put_credential(
        "bob",
        "custom",
        json!({"access_token": "at-stale", "refresh_token": "rt-seed", "expires_at": unix_now() - 100}),
    )
    .await;
    let session = sk.token("bob", &["custom"]).await;

    let results = join_all((0..200).map(|i| {
        let (sk, session) = (&sk, &session);
        async move {
            sk.proxy(
                Method::GET,
                &format!("/v1/proxy/custom/items/{i}"),
                session,
                "",
            )
            .await
        }
    }))
    .await;
    for r in &results {
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(tok.calls(), 1, "200 requests must share one token call");
    assert_eq!(up.count(), 200);
    assert!(
        bearers(&up).iter().all(|b| b.as_deref() == Some(NEW_1)),
        "every upstream request carries the new token"
    );

    // The refresh tool racing with proxied calls: each token call presents
    // the refresh token that is current at that moment, so none is refused.
    sk.put_credential(
        "bob",
        "custom",
        json!({"access_token": "at-stale-2", "refresh_token": "rt-1-test-client", "expires_at": unix_now() - 100}),
    )
    .await;
    up.clear();
    let calls_before = tok.calls();
    let proxied = join_all((0..50).map(|i| {
        let (sk, session) = (&sk, &session);
        async move {
            sk.proxy(
                Method::GET,
                &format!("/v1/proxy/custom/race/{i}"),
                session,
                "",
            )
            .await
        }
    }));
    let tools = join_all((0..5).map(|_| {
        let (sk, session) = (&sk, &session);
        async move { refresh_tool(sk, session, r#"{"provider": "custom"}"#).await }
    }));
    let (proxied, tools) = tokio::join!(proxied, tools);
    for r in &proxied {
        assert_eq!(r.status, 200, "{}", r.text());
    }
    for r in &tools {
        assert_eq!(r.status, 200, "{}", r.text());
        // `active`: within refresh_cooldown_secs of a refresh a racing
        // proxied call made, the tool does not call again.
        let status = &r.json()["providers"]["custom"]["status"];
        assert!(status == "refreshed" || status == "active", "{}", r.text());
        assert_no_token_in(&r.text(), &tok, &["at-stale-2"]);
    }
    let made = tok.calls() - calls_before;
    assert!(
        (1..=6).contains(&made),
        "{made} token calls for 50 requests and 5 forced refreshes"
    );
    assert_eq!(
        issued(&tok),
        tok.calls(),
        "every token call succeeded: no invalid_grant from a reused refresh token"
    );
    assert!(
        up.requests()
            .iter()
            .all(|r| r.bearer().is_some_and(|b| tok.is_valid_access(&b))),
        "no stale token went upstream"
    );
    assert_eq!(
        meta(&sk, &user_cred("bob", "custom")).await["status"],
        "active"
    );
}

// ---------------------------------------------------------------------------
// 3. A rotated refresh token survives SIGKILL right after the refresh

#[tokio::test]
async fn rotated_refresh_token_survives_kill_and_restart() {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    require_valid_token(&up, &tok);
    tok.issue_refresh("rt-seed");
    // No cooldown: the forced refresh after the restart must call the
    // token endpoint with the refresh token rotated before the kill.
    let mut sk = Sidekey::start(Options::with_providers(&oauth_provider(
        "custom",
        &up.url,
        &tok.url,
        "refresh_cooldown_secs = 0",
    )))
    .await;
    sk.put_credential(
        "carol",
        "custom",
        json!({"access_token": "at-stale", "refresh_token": "rt-seed", "expires_at": unix_now() - 5}),
    )
    .await;
    let session = sk.token("carol", &["custom"]).await;
    let r = sk
        .proxy(Method::GET, "/v1/proxy/custom/me", &session, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tok.calls(), 1);
    assert_eq!(up.last().bearer().as_deref(), Some(NEW_1));

    // No chance to flush on the way down.
    sk.kill9();
    sk.restart().await;

    let session = sk.token("carol", &["custom"]).await;
    let r = refresh_tool(&sk, &session, r#"{"provider": "custom"}"#).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["providers"]["custom"]["status"], "refreshed");
    assert_eq!(tok.calls(), 2);
    // The fake accepts each rotated refresh token once: sidekey presented
    // the one it got before the kill, so it was on disk.
    assert_eq!(tok.last_form()["refresh_token"], "rt-1-test-client");
    assert_eq!(issued(&tok), 2);

    let r = sk
        .proxy(Method::GET, "/v1/proxy/custom/me", &session, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().bearer().as_deref(), Some(NEW_2));
    let m = meta(&sk, &user_cred("carol", "custom")).await;
    assert_eq!(m["status"], "active");
    assert_eq!(m["has_refresh_token"], true);
}

// ---------------------------------------------------------------------------
// 4. 401 → refresh → replay once

#[tokio::test]
async fn upstream_401_refreshes_and_replays_once_with_the_body() {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    require_valid_token(&up, &tok);
    tok.issue_refresh("rt-seed");
    tok.issue_refresh("rt-seed-2");
    let sk = Sidekey::start(Options::with_providers(&oauth_provider(
        "custom", &up.url, &tok.url, "",
    )))
    .await;
    // Far from expiry: only the upstream's 401 can trigger the refresh.
    sk.put_credential(
        "dave",
        "custom",
        json!({"access_token": "at-revoked", "refresh_token": "rt-seed", "expires_in": 3600}),
    )
    .await;
    let session = sk.token("dave", &["custom"]).await;
    let body = r#"{"text": "hello", "channel": "C123", "n": [1, 2, 3]}"#;
    let r = send_json(&sk, &session, "/v1/proxy/custom/messages?x=1", body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body"], body, "client sees the replay's answer");
    assert_eq!(tok.calls(), 1);
    let seen = up.requests();
    assert_eq!(seen.len(), 2, "one request and one replay");
    assert_eq!(seen[0].bearer().as_deref(), Some("at-revoked"));
    assert_eq!(seen[1].bearer().as_deref(), Some(NEW_1));
    for s in &seen {
        assert_eq!(s.method, "POST");
        assert_eq!(s.path, "/messages");
        assert_eq!(s.query.as_deref(), Some("x=1"));
        assert_eq!(&s.body[..], body.as_bytes(), "body replayed intact");
        assert_eq!(
            s.header("content-type").as_deref(),
            Some("application/json")
        );
    }

    // An upstream that refuses every token: one refresh, one replay, then
    // its own 401 goes back to the client.
    up.set_handler(|_| Reply::Json(401, json!({"error": "nope", "from": "upstream"})));
    up.clear();
    sk.put_credential(
        "dave",
        "custom",
        json!({"access_token": "at-revoked-2", "refresh_token": "rt-seed-2", "expires_in": 3600}),
    )
    .await;
    let r = send_json(&sk, &session, "/v1/proxy/custom/messages", body).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["from"], "upstream", "the upstream's own answer");
    assert!(r.headers.get("x-sidekey-error").is_none());
    assert_eq!(tok.calls(), 2, "exactly one refresh");
    let seen = up.requests();
    assert_eq!(seen.len(), 2, "exactly one replay, never a loop");
    assert_eq!(seen[0].bearer().as_deref(), Some("at-revoked-2"));
    assert_eq!(seen[1].bearer().as_deref(), Some(NEW_2));
    assert_eq!(&seen[1].body[..], body.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_401s_share_one_refresh() {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    require_valid_token(&up, &tok);
    tok.issue_refresh("rt-seed");
    let sk = Sidekey::start(Options::with_providers(&oauth_provider(
        "custom", &up.url, &tok.url, "",
    )))
    .await;
    sk.put_credential(
        "dora",
        "custom",
        json!({"access_token": "at-revoked", "refresh_token": "rt-seed", "expires_in": 3600}),
    )
    .await;
    let session = sk.token("dora", &["custom"]).await;
    let results = join_all((0..40).map(|i| {
        let (sk, session) = (&sk, &session);
        async move {
            send_json(
                sk,
                session,
                &format!("/v1/proxy/custom/n/{i}"),
                &format!("{{\"i\": {i}}}"),
            )
            .await
        }
    }))
    .await;
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["body"], format!("{{\"i\": {i}}}"));
    }
    assert_eq!(tok.calls(), 1, "40 rejected requests share one refresh");
    let seen = up.requests();
    assert_eq!(
        seen.iter()
            .filter(|r| r.bearer().as_deref() == Some(NEW_1))
            .count(),
        40,
        "each request replayed once with the new token"
    );
    assert!(
        seen.iter()
            .all(|r| matches!(r.bearer().as_deref(), Some("at-revoked") | Some(NEW_1)))
    );
}

async fn send_json(api: &Api, session: &str, path: &str, body: &str) -> Resp {
    api.agent(
        Method::POST,
        path,
        &[
            ("x-sidekey-session", session),
            ("content-type", "application/json"),
        ],
        body.to_owned(),
    )
    .await
}

// ---------------------------------------------------------------------------
// 5. Slack conventions

#[tokio::test]
async fn slack_ok_false_errors_refresh_and_replay() {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    tok.set_slack(true);
    for rt in ["xoxe-seed-1", "xoxe-seed-2", "xoxe-seed-3"] {
        tok.issue_refresh(rt);
    }
    // Slack answers 200 {"ok": false, "error": ...} for a dead token.
    let stale_error = Arc::new(Mutex::new("token_expired"));
    {
        let (t, e) = (tok.clone(), stale_error.clone());
        up.set_handler(move |r| match r.bearer() {
            Some(b) if t.is_valid_access(&b) => {
                Reply::Json(200, json!({"ok": true, "channel": "C1", "ts": "1.2"}))
            }
            _ => Reply::Json(200, json!({"ok": false, "error": *e.lock().unwrap()})),
        });
    }
    let sk = Sidekey::start(Options::with_providers(&preset_provider(
        "slack", "slack", &up, &tok, "",
    )))
    .await;
    let session = sk.token("erin", &["slack"]).await;

    let mut expected_calls = 0;
    for (i, err) in ["token_expired", "invalid_auth"].into_iter().enumerate() {
        *stale_error.lock().unwrap() = err;
        up.clear();
        sk.put_credential(
            "erin",
            "slack",
            json!({"access_token": format!("xoxp-stale-{i}"), "refresh_token": format!("xoxe-seed-{}", i + 1), "expires_in": 43200}),
        )
        .await;
        let r = sk
            .proxy(
                Method::POST,
                "/v1/proxy/slack/chat.postMessage",
                &session,
                r#"{"channel":"C1","text":"hi"}"#,
            )
            .await;
        expected_calls += 1;
        assert_eq!(r.status, 200, "{err}: {}", r.text());
        assert_eq!(
            r.json()["ok"],
            true,
            "{err}: client gets the replay's answer"
        );
        assert_eq!(tok.calls(), expected_calls, "{err}: one refresh");
        let seen = up.requests();
        assert_eq!(seen.len(), 2, "{err}: one replay");
        assert_eq!(seen[0].bearer(), Some(format!("xoxp-stale-{i}")));
        assert_eq!(
            seen[1].bearer(),
            Some(format!("at-{expected_calls}-test-client")),
            "{err}: replay uses the token from Slack's ok:true answer"
        );
        assert_eq!(&seen[1].body[..], br#"{"channel":"C1","text":"hi"}"#);
        let m = meta(&sk, &user_cred("erin", "slack")).await;
        assert_eq!(m["status"], "active");
        assert!(m["expires_at"].as_i64().unwrap() > unix_now() + 3000);
    }

    // Slack refuses the refresh token with 200 ok:false invalid_refresh_token.
    *stale_error.lock().unwrap() = "token_expired";
    tok.set_mode(Mode::InvalidGrant);
    up.clear();
    sk.put_credential(
        "erin",
        "slack",
        json!({"access_token": "xoxp-stale-dead", "refresh_token": "xoxe-seed-3", "expires_in": 43200}),
    )
    .await;
    let r = sk
        .proxy(Method::GET, "/v1/proxy/slack/auth.test", &session, "")
        .await;
    r.assert_error(424, "reauth_required");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Slack")
    );
    assert_eq!(tok.calls(), expected_calls + 1);
    assert_eq!(up.count(), 1, "no replay without a new token");
    assert_eq!(
        meta(&sk, &user_cred("erin", "slack")).await["status"],
        "reauth_required"
    );
}

// ---------------------------------------------------------------------------
// 6. A refused refresh token: reauth_required, and no more token calls

#[tokio::test]
async fn dead_refresh_token_needs_reauth_until_replaced() {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    require_valid_token(&up, &tok);
    tok.issue_refresh("rt-dead");
    tok.issue_refresh("rt-good");
    tok.issue_access("at-fresh-manual");
    tok.set_mode(Mode::InvalidGrant);
    let sk = Sidekey::start(Options::with_providers(&oauth_provider(
        "custom",
        &up.url,
        &tok.url,
        "display_name = \"Acme CRM\"",
    )))
    .await;
    sk.put_credential(
        "frank",
        "custom",
        json!({"access_token": "at-stale", "refresh_token": "rt-dead", "expires_at": unix_now() - 1}),
    )
    .await;
    let session = sk.token("frank", &["custom"]).await;
    let r = sk
        .proxy(Method::GET, "/v1/proxy/custom/me", &session, "")
        .await;
    r.assert_error(424, "reauth_required");
    let v = r.json();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("Acme CRM") && msg.contains("reconnect"),
        "speakable, names the provider: {msg}"
    );
    assert_eq!(v["error"]["provider"], "custom");
    assert_no_token_in(&r.text(), &tok, &["rt-dead", "at-stale"]);
    assert_eq!(tok.calls(), 1);
    let m = meta(&sk, &user_cred("frank", "custom")).await;
    assert_eq!(m["status"], "reauth_required");

    // Nothing calls the token endpoint for it again: proxy or refresh tool.
    for _ in 0..3 {
        let r = sk
            .proxy(Method::GET, "/v1/proxy/custom/me", &session, "")
            .await;
        r.assert_error(424, "reauth_required");
    }
    let r = refresh_tool(&sk, &session, "{}").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["providers"]["custom"]["status"], "reauth_required");
    assert_eq!(tok.calls(), 1, "zero further token calls");
    assert_eq!(up.count(), 0);

    // A new credential from the main app works again at once.
    let m = sk
        .put_credential(
            "frank",
            "custom",
            json!({"access_token": "at-fresh-manual", "refresh_token": "rt-good", "expires_in": 3600}),
        )
        .await;
    assert_eq!(m["status"], "active");
    let r = sk
        .proxy(Method::GET, "/v1/proxy/custom/me", &session, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().bearer().as_deref(), Some("at-fresh-manual"));
    assert_eq!(tok.calls(), 1);

    // And so does refreshing it, once the provider accepts the token.
    tok.set_mode(Mode::Ok);
    sk.put_credential(
        "frank",
        "custom",
        json!({"access_token": "at-stale-again", "refresh_token": "rt-good", "expires_in": 10}),
    )
    .await;
    let r = sk
        .proxy(Method::GET, "/v1/proxy/custom/me", &session, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tok.calls(), 2);
    assert_eq!(up.last().bearer().as_deref(), Some(NEW_1));
    assert_eq!(
        meta(&sk, &user_cred("frank", "custom")).await["status"],
        "active"
    );
}

// ---------------------------------------------------------------------------
// 7. Transient failures: refresh_failed, credential untouched, backoff

#[tokio::test]
async fn token_endpoint_5xx_leaves_credential_untouched_and_backs_off() {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    require_valid_token(&up, &tok);
    tok.issue_refresh("rt-keep");
    tok.set_mode(Mode::ServerError);
    let mut sk = InProcess::start(Options::with_providers(&oauth_provider(
        "custom", &up.url, &tok.url, "",
    )))
    .await;
    sk.put_credential(
        "gina",
        "custom",
        json!({"access_token": "at-stale", "refresh_token": "rt-keep", "expires_at": sk.clock.now() - 10}),
    )
    .await;
    let session = sk.token("gina", &["custom"]).await;
    let before = meta(&sk, &user_cred("gina", "custom")).await;
    let get = || sk.proxy(Method::GET, "/v1/proxy/custom/me", &session, "");

    let r = get().await;
    r.assert_error(502, "refresh_failed");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Custom")
    );
    assert_eq!(tok.calls(), 1);
    assert_eq!(meta(&sk, &user_cred("gina", "custom")).await, before);

    // Immediately again: inside the 1 s backoff, no token call.
    get().await.assert_error(502, "refresh_failed");
    assert_eq!(
        tok.calls(),
        1,
        "backoff: the broken endpoint is not hammered"
    );

    // Past the backoff it tries again; each failure doubles the wait.
    sk.clock.advance(2);
    get().await.assert_error(502, "refresh_failed");
    assert_eq!(tok.calls(), 2);
    get().await.assert_error(502, "refresh_failed");
    assert_eq!(tok.calls(), 2, "2 s backoff after the second failure");
    sk.clock.advance(3);
    get().await.assert_error(502, "refresh_failed");
    assert_eq!(tok.calls(), 3);
    get().await.assert_error(502, "refresh_failed");
    assert_eq!(tok.calls(), 3, "4 s backoff after the third failure");

    // The refresh tool respects the backoff too.
    let r = refresh_tool(&sk, &session, "{}").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["providers"]["custom"]["status"], "refresh_failed");
    assert_eq!(tok.calls(), 3);

    assert_eq!(
        meta(&sk, &user_cred("gina", "custom")).await,
        before,
        "credential untouched by transient failures"
    );
    assert_eq!(up.count(), 0, "nothing forwarded with the expired token");

    // The provider recovers: the old refresh token is still the one used,
    // and the fake (which consumes each once) accepts it.
    tok.set_mode(Mode::Ok);
    sk.clock.advance(5);
    let r = get().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tok.calls(), 4);
    assert_eq!(tok.last_form()["refresh_token"], "rt-keep");
    assert_eq!(up.last().bearer().as_deref(), Some(NEW_1));
    let m = meta(&sk, &user_cred("gina", "custom")).await;
    assert_eq!(m["status"], "active");
    sk.stop().await;
}

#[tokio::test]
async fn slow_token_endpoint_is_refresh_failed_within_the_timeout() {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    require_valid_token(&up, &tok);
    tok.issue_refresh("rt-seed");
    let slow = Duration::from_secs(15);
    tok.set_mode(Mode::Slow(slow));
    let sk = Sidekey::start(
        Options::with_providers(&oauth_provider("custom", &up.url, &tok.url, ""))
            .server("upstream_timeout_secs = 1"),
    )
    .await;
    sk.put_credential(
        "hank",
        "custom",
        json!({"access_token": "at-stale", "refresh_token": "rt-seed", "expires_at": unix_now() - 10}),
    )
    .await;
    let before = meta(&sk, &user_cred("hank", "custom")).await;
    let session = sk.token("hank", &["custom"]).await;
    let started = Instant::now();
    let r = sk
        .proxy(Method::GET, "/v1/proxy/custom/me", &session, "")
        .await;
    let took = started.elapsed();
    r.assert_error(502, "refresh_failed");
    assert!(
        took < slow,
        "sidekey gave up after its own timeout, not the endpoint's {slow:?} (took {took:?})"
    );
    assert_eq!(tok.calls(), 1);
    assert_eq!(up.count(), 0);
    assert_eq!(meta(&sk, &user_cred("hank", "custom")).await, before);
}

// ---------------------------------------------------------------------------
// 8. The refresh tool

#[tokio::test]
async fn refresh_tool_reports_each_provider_without_tokens() {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    require_valid_token(&up, &tok);
    tok.issue_refresh("rt-seed");
    // No cooldown here: this test forces two refreshes back to back (the
    // cooldown has its own test in tests/hardening.rs).
    let toml = oauth_provider("custom", &up.url, &tok.url, "refresh_cooldown_secs = 0")
        + &oauth_provider("other", &up.url, &tok.url, "")
        + &oauth_provider("dead", &up.url, &tok.url, "")
        + &oauth_provider("outside", &up.url, &tok.url, "")
        + &format!(
            "[providers.tg]\npreset = \"telegram\"\nbase_url = \"{}\"\n",
            up.url
        );
    let sk = Sidekey::start(Options::with_providers(&toml)).await;
    sk.put_credential(
        "ivy",
        "custom",
        json!({"access_token": "at-ivy-manual", "refresh_token": "rt-seed", "expires_in": 3600}),
    )
    .await;
    sk.put_credential("ivy", "tg", json!({"access_token": "123456:tg-bot-secret"}))
        .await;
    // The fake never issued this one: invalid_grant.
    sk.put_credential(
        "ivy",
        "dead",
        json!({"access_token": "at-dead-manual", "refresh_token": "rt-unknown", "expires_in": 3600}),
    )
    .await;
    let secrets = [
        "at-ivy-manual",
        "rt-seed",
        "123456:tg-bot-secret",
        "tg-bot-secret",
        "at-dead-manual",
        "rt-unknown",
    ];
    let session = sk.token("ivy", &["custom", "tg", "other", "dead"]).await;

    // `{}`: every provider in the session.
    let r = refresh_tool(&sk, &session, "{}").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_no_token_in(&r.text(), &tok, &secrets);
    let v = r.json();
    assert_eq!(v["status"], "ok");
    let p = v["providers"].as_object().unwrap();
    assert_eq!(p.len(), 4, "{v}");
    assert_eq!(p["custom"]["status"], "refreshed");
    let custom_meta = meta(&sk, &user_cred("ivy", "custom")).await;
    assert_eq!(p["custom"]["expires_at"], custom_meta["expires_at"]);
    assert!(p["custom"]["expires_at"].as_i64().unwrap() > unix_now() + 3000);
    assert_eq!(p["tg"]["status"], "active", "not refreshable but usable");
    assert_eq!(p["other"]["status"], "credential_missing");
    assert!(p["other"]["message"].as_str().unwrap().contains("Other"));
    assert_eq!(p["dead"]["status"], "reauth_required");
    assert!(p["dead"]["message"].as_str().unwrap().contains("Dead"));
    assert_eq!(tok.calls(), 2, "custom refreshed, dead refused");
    assert_eq!(
        meta(&sk, &user_cred("ivy", "dead")).await["status"],
        "reauth_required"
    );

    // One named provider: only that one, forced even though it is fresh.
    let r = refresh_tool(&sk, &session, r#"{"provider": "custom"}"#).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_no_token_in(&r.text(), &tok, &secrets);
    let v = r.json();
    assert_eq!(v["providers"].as_object().unwrap().len(), 1, "{v}");
    assert_eq!(v["providers"]["custom"]["status"], "refreshed");
    assert_eq!(tok.calls(), 3);
    // Presented the token rotated by the first refresh (the dead
    // provider's refused call issued nothing).
    assert_eq!(tok.last_form()["refresh_token"], "rt-1-test-client");
    let r = sk
        .proxy(Method::GET, "/v1/proxy/custom/me", &session, "")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(up.last().bearer().as_deref(), Some(NEW_2));

    for (name, status) in [
        ("tg", "active"),
        ("dead", "reauth_required"),
        ("other", "credential_missing"),
    ] {
        let r = refresh_tool(&sk, &session, &format!(r#"{{"provider": "{name}"}}"#)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_no_token_in(&r.text(), &tok, &secrets);
        let v = r.json();
        assert_eq!(v["providers"].as_object().unwrap().len(), 1, "{v}");
        assert_eq!(v["providers"][name]["status"], status, "{v}");
    }
    assert_eq!(tok.calls(), 3, "no token call for tg, dead or other");

    // Configured, but not in this session.
    let r = refresh_tool(&sk, &session, r#"{"provider": "outside"}"#).await;
    r.assert_error(403, "provider_not_allowed");
    assert_eq!(tok.calls(), 3);
}

// ---------------------------------------------------------------------------
// 9. OAuth connect with PKCE

#[tokio::test]
async fn oauth_code_flow_with_pkce_stores_the_credential() {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    require_valid_token(&up, &tok);
    let mut sk = InProcess::start(
        Options::with_providers(&oauth_provider(
            "custom",
            &up.url,
            &tok.url,
            "scopes = [\"read\", \"write\"]",
        ))
        .unbound_oauth(),
    )
    .await;

    let r = sk
        .admin(
            Method::POST,
            "/v1/users/jack/oauth/custom/start",
            Some(json!({"return_to": RETURN_TO})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let url = v["authorize_url"].as_str().unwrap();
    let state = v["state"].as_str().unwrap();
    let exp = v["expires_at"].as_i64().unwrap();
    assert!(
        (exp - sk.clock.now() - 600).abs() <= 2,
        "state lives 10 minutes"
    );
    assert!(
        url.starts_with("https://auth.example.com/authorize?"),
        "{url}"
    );
    let q = |k: &str| query_param(url, k);
    assert_eq!(q("client_id").as_deref(), Some("test-client"));
    assert_eq!(q("redirect_uri").as_deref(), Some(REDIRECT_CUSTOM));
    assert_eq!(q("response_type").as_deref(), Some("code"));
    assert_eq!(q("scope").as_deref(), Some("read write"));
    assert_eq!(q("state").as_deref(), Some(state));
    assert_eq!(q("code_challenge_method").as_deref(), Some("S256"));
    let challenge = q("code_challenge").unwrap();
    assert_eq!(challenge.len(), 43, "base64url SHA-256");
    assert!(!url.contains("test-client-secret"));

    tok.register_code("code-jack", &challenge, REDIRECT_CUSTOM);
    let r = callback(&sk, "custom", &format!("code=code-jack&state={state}")).await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(location(&r), RETURN_TO);
    assert_eq!(tok.calls(), 1);
    let form = tok.last_form();
    assert_eq!(form["grant_type"], "authorization_code");
    assert_eq!(form["code"], "code-jack");
    assert_eq!(form["redirect_uri"], REDIRECT_CUSTOM);
    assert_eq!(pkce(&form["code_verifier"]), challenge, "verifier matches");
    let m = meta(&sk, &user_cred("jack", "custom")).await;
    assert_eq!(m["status"], "active");
    assert_eq!(m["has_refresh_token"], true);
    assert!(m["expires_at"].as_i64().unwrap() > sk.clock.now() + 3000);
    let session = sk.token("jack", &["custom"]).await;
    let r = sk
        .proxy(Method::GET, "/v1/proxy/custom/me", &session, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().bearer().as_deref(), Some(NEW_1));

    // The state is single-use: a replay (even with a valid code) is an
    // error page, exchanges nothing and replaces nothing.
    tok.register_code("code-jack-2", &challenge, REDIRECT_CUSTOM);
    let r = callback(&sk, "custom", &format!("code=code-jack-2&state={state}")).await;
    assert_html(&r, 400);
    assert_eq!(tok.calls(), 1, "no exchange on a replayed state");
    let r = sk
        .proxy(Method::GET, "/v1/proxy/custom/me", &session, "")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        up.last().bearer().as_deref(),
        Some(NEW_1),
        "credential not replaced"
    );

    // The user declines at the provider.
    let rt = format!("{RETURN_TO}?tab=accounts");
    let (_, state) = oauth_start(&sk, "kate", "custom", json!({"return_to": rt})).await;
    let r = callback(&sk, "custom", &format!("error=access_denied&state={state}")).await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(location(&r), format!("{rt}&error=access_denied"));
    // ...and that state is gone too.
    tok.register_code("code-kate", &challenge, REDIRECT_CUSTOM);
    let r = callback(&sk, "custom", &format!("code=code-kate&state={state}")).await;
    assert_html(&r, 400);
    assert_eq!(tok.calls(), 1);
    let r = sk
        .admin(Method::GET, &user_cred("kate", "custom"), None)
        .await;
    assert_eq!(r.status, 404, "nothing stored: {}", r.text());

    // A code whose PKCE challenge does not match this flow's verifier.
    let (_, state) = oauth_start(&sk, "liam", "custom", json!({"return_to": RETURN_TO})).await;
    tok.register_code("code-liam", &pkce("some-other-verifier"), REDIRECT_CUSTOM);
    let r = callback(&sk, "custom", &format!("code=code-liam&state={state}")).await;
    assert_eq!(r.status, 303, "{}", r.text());
    let loc = location(&r);
    assert!(loc.starts_with(&format!("{RETURN_TO}?error=")), "{loc}");
    assert_eq!(tok.calls(), 2, "the exchange was tried and refused");
    let r = sk
        .admin(Method::GET, &user_cred("liam", "custom"), None)
        .await;
    assert_eq!(r.status, 404, "nothing stored: {}", r.text());

    // An unknown code, without return_to: an error page.
    let (_, state) = oauth_start(&sk, "mia", "custom", json!({})).await;
    let r = callback(&sk, "custom", &format!("code=no-such-code&state={state}")).await;
    assert!(r.status.is_client_error() || r.status.is_server_error());
    assert_html(&r, r.status.as_u16());
    assert!(!r.text().contains("no-such-code"), "the code is not echoed");
    assert_eq!(tok.calls(), 3);
    let r = sk
        .admin(Method::GET, &user_cred("mia", "custom"), None)
        .await;
    assert_eq!(r.status, 404, "nothing stored: {}", r.text());

    // Without return_to: a small success page.
    let (url, state) = oauth_start(&sk, "noah", "custom", json!({})).await;
    let challenge = query_param(&url, "code_challenge").unwrap();
    tok.register_code("code-noah", &challenge, REDIRECT_CUSTOM);
    let r = callback(&sk, "custom", &format!("code=code-noah&state={state}")).await;
    assert_html(&r, 200);
    assert!(r.text().contains("connected"), "{}", r.text());
    assert_no_token_in(&r.text(), &tok, &["code-noah"]);
    assert_eq!(tok.calls(), 4);
    let m = meta(&sk, &user_cred("noah", "custom")).await;
    assert_eq!(m["status"], "active");
    assert_eq!(m["has_refresh_token"], true);
    sk.stop().await;
}

#[tokio::test]
async fn oauth_state_expires_after_ten_minutes() {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    let mut sk = InProcess::start(
        Options::with_providers(&oauth_provider("custom", &up.url, &tok.url, "")).unbound_oauth(),
    )
    .await;
    let (url, state) = oauth_start(&sk, "olga", "custom", json!({"return_to": RETURN_TO})).await;
    let challenge = query_param(&url, "code_challenge").unwrap();
    tok.register_code("code-olga", &challenge, REDIRECT_CUSTOM);
    sk.clock.advance(601);
    let r = callback(&sk, "custom", &format!("code=code-olga&state={state}")).await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(location(&r), format!("{RETURN_TO}?error=state_expired"));
    assert_eq!(tok.calls(), 0, "no exchange with an expired state");
    let r = sk
        .admin(Method::GET, &user_cred("olga", "custom"), None)
        .await;
    assert_eq!(r.status, 404, "nothing stored: {}", r.text());
    sk.stop().await;
}

#[tokio::test]
async fn oauth_presets_add_their_authorize_parameters() {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    let toml = preset_provider(
        "google",
        "google",
        &up,
        &tok,
        "scopes = [\"https://www.googleapis.com/auth/calendar\", \"openid\"]",
    ) + &preset_provider(
        "slack",
        "slack",
        &up,
        &tok,
        "scopes = [\"channels:read\"]\nuser_scopes = [\"chat:write\", \"users:read\"]",
    );
    let mut sk = InProcess::start(Options::with_providers(&toml).unbound_oauth()).await;

    let (url, _) = oauth_start(&sk, "pia", "google", json!({"return_to": RETURN_TO})).await;
    assert!(url.starts_with("https://accounts.google.com/"), "{url}");
    let q = |k: &str| query_param(&url, k);
    assert_eq!(q("access_type").as_deref(), Some("offline"));
    assert_eq!(q("prompt").as_deref(), Some("consent"));
    assert_eq!(
        q("scope").as_deref(),
        Some("https://www.googleapis.com/auth/calendar openid")
    );
    assert_eq!(q("response_type").as_deref(), Some("code"));
    assert_eq!(q("code_challenge_method").as_deref(), Some("S256"));
    assert_eq!(
        q("redirect_uri").as_deref(),
        Some("https://127.0.0.1:8443/oauth/google/callback")
    );

    let (url, state) = oauth_start(&sk, "pia", "slack", json!({"return_to": RETURN_TO})).await;
    assert!(
        url.starts_with("https://slack.com/oauth/v2/authorize?"),
        "{url}"
    );
    let q = |k: &str| query_param(&url, k);
    assert_eq!(q("scope").as_deref(), Some("channels:read"));
    assert_eq!(q("user_scope").as_deref(), Some("chat:write,users:read"));
    assert_eq!(q("code_challenge_method").as_deref(), Some("S256"));
    assert!(
        q("access_type").is_none(),
        "Google's extras are Google's only"
    );

    // Slack's token endpoint style (200 with "ok": true) completes the flow.
    tok.set_slack(true);
    let redirect = "https://127.0.0.1:8443/oauth/slack/callback";
    tok.register_code("code-slack", &q("code_challenge").unwrap(), redirect);
    let r = callback(&sk, "slack", &format!("code=code-slack&state={state}")).await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(location(&r), RETURN_TO);
    let m = meta(&sk, &user_cred("pia", "slack")).await;
    assert_eq!(m["status"], "active");
    assert_eq!(m["has_refresh_token"], true);
    sk.stop().await;
}

// ---------------------------------------------------------------------------
// 10. Client credentials

#[tokio::test]
async fn client_credentials_token_is_shared_refreshed_and_refetched_on_401() {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    require_valid_token(&up, &tok);
    tok.set_expires_in(300);
    let toml = format!(
        "[providers.app]\nbase_url = \"{}\"\ntoken_url = \"{}\"\n\
         client_id = \"test-client\"\nclient_secret = \"test-client-secret\"\n\
         grant = \"client_credentials\"\nrefresh_skew_secs = 60\n",
        up.url, tok.url
    );
    let mut sk = InProcess::start(Options::with_providers(&toml)).await;
    let s1 = sk.token("quinn", &["app"]).await;
    let s2 = sk.token("rosa", &["app"]).await;

    let r = sk.proxy(Method::GET, "/v1/proxy/app/a", &s1, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = sk.proxy(Method::GET, "/v1/proxy/app/b", &s2, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tok.calls(), 1, "one app-level token for both users");
    assert_eq!(
        bearers(&up),
        vec![Some(NEW_1.to_owned()), Some(NEW_1.to_owned())]
    );
    assert_eq!(tok.last_form()["grant_type"], "client_credentials");
    assert_eq!(tok.last_form()["client_id"], "test-client");

    // 250 s later the 300 s token is within the 60 s skew.
    sk.clock.advance(250);
    let r = sk.proxy(Method::GET, "/v1/proxy/app/c", &s2, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tok.calls(), 2);
    assert_eq!(up.last().bearer().as_deref(), Some(NEW_2));
    let r = sk.proxy(Method::GET, "/v1/proxy/app/d", &s1, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tok.calls(), 2);
    assert_eq!(up.last().bearer().as_deref(), Some(NEW_2));

    // The provider revokes it early: the 401 fetches a new one and replays.
    tok.revoke_access(NEW_2);
    up.clear();
    let r = sk.proxy(Method::GET, "/v1/proxy/app/e", &s1, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tok.calls(), 3);
    assert_eq!(
        bearers(&up),
        vec![Some(NEW_2.to_owned()), Some(NEW_3.to_owned())]
    );
    assert_eq!(
        tok.state.lock().unwrap().grants,
        vec!["client_credentials"; 3]
    );
    let r = sk.proxy(Method::GET, "/v1/proxy/app/f", &s2, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().bearer().as_deref(), Some(NEW_3));
    assert_eq!(tok.calls(), 3);

    // The main app cannot store a per-user token for such a provider.
    let r = sk
        .admin(
            Method::PUT,
            &user_cred("quinn", "app"),
            Some(json!({"access_token": "x"})),
        )
        .await;
    r.assert_error(400, "bad_request");
    sk.stop().await;
}

// ---------------------------------------------------------------------------
// 11. Tenant credentials

#[tokio::test]
async fn tenant_credentials_serve_users_without_their_own() {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    require_valid_token(&up, &tok);
    tok.issue_access("tenant-at");
    tok.issue_access("sam-own-at");
    tok.issue_refresh("rt-tenant");
    let sk = Sidekey::start(Options::with_providers(&oauth_provider(
        "custom", &up.url, &tok.url, "",
    )))
    .await;
    let tenant_cred = "/v1/tenants/acme/credentials/custom";
    let r = sk
        .admin(
            Method::PUT,
            tenant_cred,
            Some(json!({"access_token": "tenant-at", "refresh_token": "rt-tenant", "expires_in": 3600})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["tenant"], "acme");
    for u in ["ruth", "sam", "tom"] {
        let r = sk
            .admin(
                Method::PUT,
                &format!("/v1/users/{u}"),
                Some(json!({"tenant": "acme"})),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    sk.put_credential(
        "sam",
        "custom",
        json!({"access_token": "sam-own-at", "expires_in": 3600}),
    )
    .await;
    let ruth = sk.token("ruth", &["custom"]).await;
    let sam = sk.token("sam", &["custom"]).await;
    let tom = sk.token("tom", &["custom"]).await;

    let r = sk.proxy(Method::GET, "/v1/proxy/custom/x", &ruth, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().bearer().as_deref(), Some("tenant-at"));
    let r = sk.proxy(Method::GET, "/v1/proxy/custom/x", &sam, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        up.last().bearer().as_deref(),
        Some("sam-own-at"),
        "a user's own credential wins"
    );
    assert_eq!(tok.calls(), 0);

    // The tenant's token is due: one refresh serves every tenant user.
    let r = sk
        .admin(
            Method::PUT,
            tenant_cred,
            Some(json!({"access_token": "tenant-at", "refresh_token": "rt-tenant", "expires_in": 10})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    up.clear();
    let (a, b) = tokio::join!(
        sk.proxy(Method::GET, "/v1/proxy/custom/y", &ruth, ""),
        sk.proxy(Method::GET, "/v1/proxy/custom/y", &tom, ""),
    );
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(b.status, 200, "{}", b.text());
    assert_eq!(tok.calls(), 1);
    assert_eq!(tok.last_form()["refresh_token"], "rt-tenant");
    assert_eq!(
        bearers(&up),
        vec![Some(NEW_1.to_owned()), Some(NEW_1.to_owned())]
    );
    let m = meta(&sk, tenant_cred).await;
    assert_eq!(m["status"], "active");
    assert!(m["expires_at"].as_i64().unwrap() > unix_now() + 3000);
    let r = sk.proxy(Method::GET, "/v1/proxy/custom/z", &sam, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().bearer().as_deref(), Some("sam-own-at"));
    assert_eq!(tok.calls(), 1);
    // The user has no credential of their own: the tenant's was refreshed.
    let r = sk
        .admin(Method::GET, &user_cred("ruth", "custom"), None)
        .await;
    assert_eq!(r.status, 404, "{}", r.text());
}

// ---------------------------------------------------------------------------
// A credential replaced while a refresh of the old one is in flight

/// Runs `during` once the fake token endpoint has received `n` calls.
async fn when_token_calls_reach(tok: &TokenServer, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tok.calls() < n {
        assert!(Instant::now() < deadline, "token endpoint never called");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn credential_replaced_during_a_refresh_is_not_clobbered() {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    require_valid_token(&up, &tok);
    tok.issue_access("at-reconnected");
    tok.issue_access("at-reconnected-2");
    tok.issue_refresh("rt-old-valid");
    tok.issue_refresh("rt-reconnected-2");
    // The fake holds each answer 2 s: time for the main app to reconnect.
    tok.set_mode(Mode::Slow(Duration::from_secs(2)));
    let sk = Sidekey::start(Options::with_providers(&oauth_provider(
        "custom", &up.url, &tok.url, "",
    )))
    .await;
    let session = sk.token("uma", &["custom"]).await;

    // 1. The old refresh token is refused while the user reconnects: the
    //    refusal must not mark the NEW credential reauth_required.
    sk.put_credential(
        "uma",
        "custom",
        json!({"access_token": "at-stale", "refresh_token": "rt-never-issued", "expires_at": unix_now() - 5}),
    )
    .await;
    let (_, replaced) = tokio::join!(
        sk.proxy(Method::GET, "/v1/proxy/custom/a", &session, ""),
        async {
            when_token_calls_reach(&tok, 1).await;
            sk.put_credential(
                "uma",
                "custom",
                json!({"access_token": "at-reconnected", "refresh_token": "rt-reconnected", "expires_in": 3600}),
            )
            .await
        }
    );
    assert_eq!(tok.calls(), 1);
    let m = meta(&sk, &user_cred("uma", "custom")).await;
    assert_eq!(
        m["status"], "active",
        "the reconnected credential stays usable"
    );
    assert_eq!(m["expires_at"], replaced["expires_at"]);
    let r = sk
        .proxy(Method::GET, "/v1/proxy/custom/b", &session, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().bearer().as_deref(), Some("at-reconnected"));
    assert_eq!(tok.calls(), 1);

    // 2. A successful refresh of the old grant finishing after the
    //    reconnect must not overwrite the reconnected credential.
    sk.put_credential(
        "uma",
        "custom",
        json!({"access_token": "at-stale", "refresh_token": "rt-old-valid", "expires_at": unix_now() - 5}),
    )
    .await;
    let (_, replaced) = tokio::join!(
        sk.proxy(Method::GET, "/v1/proxy/custom/c", &session, ""),
        async {
            when_token_calls_reach(&tok, 2).await;
            sk.put_credential(
                "uma",
                "custom",
                json!({"access_token": "at-reconnected-2", "refresh_token": "rt-reconnected-2", "expires_in": 7200}),
            )
            .await
        }
    );
    assert_eq!(tok.calls(), 2);
    let m = meta(&sk, &user_cred("uma", "custom")).await;
    assert_eq!(m["status"], "active");
    assert_eq!(
        m["expires_at"], replaced["expires_at"],
        "the reconnect wins"
    );
    let r = sk
        .proxy(Method::GET, "/v1/proxy/custom/d", &session, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().bearer().as_deref(), Some("at-reconnected-2"));
    // Its refresh token is the one kept: a forced refresh presents it.
    tok.set_mode(Mode::Ok);
    let r = refresh_tool(&sk, &session, "{}").await;
    assert_eq!(
        r.json()["providers"]["custom"]["status"],
        "refreshed",
        "{}",
        r.text()
    );
    assert_eq!(tok.last_form()["refresh_token"], "rt-reconnected-2");
}

#[tokio::test]
async fn early_refresh_failure_still_uses_the_unexpired_token() {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    tok.issue_refresh("rt-early");
    tok.issue_access("at-still-good");
    tok.set_mode(Mode::ServerError);
    let mut sk = InProcess::start(Options::with_providers(&oauth_provider(
        "custom", &up.url, &tok.url, "",
    )))
    .await;
    // Inside the 60 s skew, but 30 s from actually expiring.
    sk.put_credential(
        "hank",
        "custom",
        json!({"access_token": "at-still-good", "refresh_token": "rt-early", "expires_at": sk.clock.now() + 30}),
    )
    .await;
    let session = sk.token("hank", &["custom"]).await;
    let r = sk
        .proxy(Method::GET, "/v1/proxy/custom/me", &session, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tok.calls(), 1, "the early refresh was attempted once");
    assert_eq!(up.last().bearer().as_deref(), Some("at-still-good"));
    // Inside the backoff: no token call, the old token still serves.
    let r = sk
        .proxy(Method::GET, "/v1/proxy/custom/me", &session, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tok.calls(), 1);
    // Once it has really expired, the failure reaches the caller.
    sk.clock.advance(31);
    sk.proxy(Method::GET, "/v1/proxy/custom/me", &session, "")
        .await
        .assert_error(502, "refresh_failed");
    assert_eq!(up.count(), 2, "nothing forwarded with the expired token");
    sk.stop().await;
}
