//! Smoke: the shipped harness starts the real binary and proxies one call.
use sidekey_testkit as support;

use http::Method;
use serde_json::json;
use support::upstream::Upstream;
use support::{Options, Sidekey, provider_toml};

#[tokio::test]
async fn proxies_one_call_with_the_injected_token() {
    let up = Upstream::start().await;
    let sk = Sidekey::start(Options::with_providers(&provider_toml(
        "custom", &up.url, "",
    )))
    .await;
    sk.put_credential("alice", "custom", json!({"access_token": "tok-alice-1"}))
        .await;
    let s = sk.session("alice", &["custom"]).await;
    let token = s["token"].as_str().unwrap();
    let r = sk
        .proxy(Method::GET, "/v1/proxy/custom/things?a=1", token, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.last();
    assert_eq!(seen.path, "/things");
    assert_eq!(seen.query.as_deref(), Some("a=1"));
    assert_eq!(seen.bearer().as_deref(), Some("tok-alice-1"));
    assert!(seen.header("x-sidekey-session").is_none());
}

#[tokio::test]
async fn in_process_server_with_a_movable_clock() {
    let up = Upstream::start().await;
    let mut sk = support::InProcess::start(Options::with_providers(&provider_toml(
        "custom", &up.url, "",
    )))
    .await;
    sk.put_credential("bob", "custom", json!({"access_token": "tok-bob"}))
        .await;
    let s = sk
        .session_with(json!({"user": "bob", "providers": ["custom"], "ttl_secs": 60}))
        .await;
    let token = s["token"].as_str().unwrap().to_owned();
    let r = sk
        .proxy(Method::GET, "/v1/proxy/custom/x", &token, "")
        .await;
    assert_eq!(r.status, 200);
    sk.clock.advance(61);
    let r = sk
        .proxy(Method::GET, "/v1/proxy/custom/x", &token, "")
        .await;
    r.assert_error(401, "invalid_session");
    sk.stop().await;
}
