//! Hardening found by an outside review (secrets at start, refresh storms,
//! token responses from real libraries, webhook order and budgets, session
//! binding) and session errors that say why. Each test names what it
//! proves; each fails without its fix.
use sidekey_testkit as support;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::token::require_valid_token;
use support::{oauth_provider, unix_now};

use base64::Engine;
use futures_util::future::join_all;
use http::Method;
use serde_json::{Value, json};
use support::token::TokenServer;
use support::upstream::{Reply, Upstream};
use support::{Api, InProcess, Options, Resp, Sidekey};

async fn meta(api: &Api, user: &str, provider: &str) -> Value {
    let r = api
        .admin(
            Method::GET,
            &format!("/v1/users/{user}/credentials/{provider}"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

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

/// Runs `sidekey <args>` in `dir` for at most `limit` (a server that should
/// have refused to start is killed), with `env` on top of a clean one.
fn run_bounded(
    dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    limit: Duration,
) -> (Option<i32>, String) {
    let mut cmd = Command::new(support::bin());
    cmd.args(args)
        .current_dir(dir)
        .env_remove("SIDEKEY_CONFIG")
        .env_remove("RUST_LOG")
        .env_remove("TEST_WEBHOOK_SECRET")
        .env_remove("TEST_INIT_SECRET")
        .env("SIDEKEY_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, t_err.join().unwrap())
}

// ---------------------------------------------------------------------------
// Item 1: empty and short secrets fail closed

#[test]
fn blank_or_short_secrets_are_refused_at_start_and_by_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let text = Options::default().config_text();
    std::fs::write(dir.path().join("config.toml"), &text).unwrap();
    let check = ["check-config", "--config", "config.toml"];
    let serve = ["serve", "--config", "config.toml"];
    let limit = Duration::from_secs(20);

    // Sanity: with good secrets the config is fine.
    let good = [
        ("TEST_INIT_SECRET", support::INIT_SECRET),
        ("TEST_WEBHOOK_SECRET", support::WEBHOOK_SECRET),
    ];
    let (code, err) = run_bounded(dir.path(), &check, &good, limit);
    assert_eq!(code, Some(0), "{err}");

    // Environment variables: blank, whitespace-only, short.
    for (var, value, setting) in [
        ("TEST_INIT_SECRET", "", "init_secret"),
        ("TEST_INIT_SECRET", "   \t ", "init_secret"),
        ("TEST_INIT_SECRET", "short-secret", "init_secret"),
        ("TEST_WEBHOOK_SECRET", "", "webhook_secret"),
        ("TEST_WEBHOOK_SECRET", "wsec_123", "webhook_secret"),
    ] {
        let env: Vec<(&str, &str)> = good
            .iter()
            .map(|(k, v)| if *k == var { (*k, value) } else { (*k, *v) })
            .collect();
        for args in [&check, &serve] {
            let (code, err) = run_bounded(dir.path(), args, &env, limit);
            assert_eq!(
                code,
                Some(2),
                "{} with {var}={value:?} must exit 2:\n{err}",
                args[0]
            );
            assert!(
                err.lines()
                    .any(|l| l.starts_with("error:") && l.contains(setting)),
                "{} must name {setting}:\n{err}",
                args[0]
            );
            if !value.trim().is_empty() {
                assert!(!err.contains(value), "the secret leaked:\n{err}");
            }
        }
    }

    // Files: an empty or whitespace-only secret file.
    let files = text.replace(
        "webhook_secret_env = \"TEST_WEBHOOK_SECRET\"\ninit_secret_env = \"TEST_INIT_SECRET\"",
        "webhook_secret_file = \"webhook.secret\"\ninit_secret_file = \"init.secret\"",
    );
    std::fs::write(dir.path().join("config.toml"), files).unwrap();
    std::fs::write(dir.path().join("webhook.secret"), support::WEBHOOK_SECRET).unwrap();
    for (content, setting) in [("", "init_secret"), ("\n  \n", "init_secret")] {
        std::fs::write(dir.path().join("init.secret"), content).unwrap();
        for args in [&check, &serve] {
            let (code, err) = run_bounded(dir.path(), args, &[], limit);
            assert_eq!(code, Some(2), "{} with a blank file:\n{err}", args[0]);
            assert!(err.contains(setting), "{err}");
        }
    }
    std::fs::write(dir.path().join("init.secret"), support::INIT_SECRET).unwrap();
    std::fs::write(dir.path().join("webhook.secret"), " \n").unwrap();
    let (code, err) = run_bounded(dir.path(), &check, &[], limit);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("webhook_secret"), "{err}");

    // The admin token file: blank is refused, not regenerated or accepted.
    std::fs::write(dir.path().join("webhook.secret"), support::WEBHOOK_SECRET).unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/admin.token"), "  \n").unwrap();
    let (code, err) = run_bounded(dir.path(), &check, &[], limit);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("admin.token_file"), "{err}");
}

// ---------------------------------------------------------------------------
// Item 4: no refresh storm when tokens live shorter than the skew

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_tokens_do_not_cause_a_refresh_storm() {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    require_valid_token(&up, &tok);
    tok.set_expires_in(5);
    tok.issue_refresh("rt-seed");
    let sk = InProcess::start(Options::with_providers(&oauth_provider(
        "short", &up.url, &tok.url, "",
    )))
    .await;
    sk.put_credential(
        "alice",
        "short",
        json!({"access_token": "at-old", "refresh_token": "rt-seed", "expires_in": 5}),
    )
    .await;
    let session = sk.token("alice", &["short"]).await;
    sk.clock.advance(6);

    // 50 concurrent calls with an expired token: one token call.
    let calls = (0..50).map(|_| sk.proxy(Method::GET, "/v1/proxy/short/me", &session, ""));
    for r in join_all(calls).await {
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(tok.calls(), 1, "concurrent callers must share one refresh");

    // 5 sequential calls right after: the new 5 s token is used as is,
    // although 5 s is below refresh_skew_secs (60).
    for _ in 0..5 {
        let r = sk
            .proxy(Method::GET, "/v1/proxy/short/me", &session, "")
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(tok.calls(), 1, "sequential calls must not refresh again");

    // Past half its lifetime it is refreshed once more, then reused.
    sk.clock.advance(3);
    for _ in 0..3 {
        let r = sk
            .proxy(Method::GET, "/v1/proxy/short/me", &session, "")
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(tok.calls(), 2);
}

// ---------------------------------------------------------------------------
// Item 5: token responses as real servers send them

/// A token endpoint (on the fake upstream) answering `answer` to every call.
async fn token_endpoint(answer: Value) -> Upstream {
    let t = Upstream::start().await;
    t.set_handler(move |_| Reply::Json(200, answer.clone()));
    t
}

#[tokio::test]
async fn refresh_reads_float_expiry_list_scopes_and_ignores_extras() {
    let up = Upstream::start().await;
    let tok = token_endpoint(json!({
        "access_token": "at-float-1", "token_type": "Bearer", "expires_in": 5.0,
        "ext_expires_in": 7200, "scope": ["read", "write"], "refresh_token": "rt-next"
    }))
    .await;
    let sk = Sidekey::start(Options::with_providers(&oauth_provider(
        "f",
        &up.url,
        &format!("{}/token", tok.url),
        "",
    )))
    .await;
    sk.put_credential(
        "alice",
        "f",
        json!({"access_token": "at-old", "refresh_token": "rt-old", "expires_at": 1000}),
    )
    .await;
    let session = sk.token("alice", &["f"]).await;
    let r = sk.proxy(Method::GET, "/v1/proxy/f/me", &session, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tok.count(), 1);
    assert_eq!(up.last().bearer().as_deref(), Some("at-float-1"));
    let m = meta(&sk, "alice", "f").await;
    let exp = m["expires_at"]
        .as_i64()
        .unwrap_or_else(|| panic!("expires_in 5.0 was ignored: {m}"));
    assert!((unix_now()..=unix_now() + 6).contains(&exp), "{m}");
    assert_eq!(m["scopes"], json!(["read", "write"]));
}

#[tokio::test]
async fn admin_put_accepts_token_dicts_from_real_libraries() {
    let up = Upstream::start().await;
    let sk = Sidekey::start(Options::with_providers(&support::provider_toml(
        "p", &up.url, "",
    )))
    .await;
    let now = unix_now();
    let put = |body: Value| {
        let sk = &sk;
        async move {
            sk.admin(Method::PUT, "/v1/users/ann/credentials/p", Some(body))
                .await
        }
    };
    // Authlib: expires_in and expires_at together; the earlier wins.
    let r = put(
        json!({"access_token": "at-authlib", "token_type": "Bearer", "expires_in": 3600,
                       "expires_at": now + 1800, "refresh_token": "rt-a", "scope": "a b"}),
    )
    .await;
    assert_eq!(r.status, 200, "Authlib: {}", r.text());
    assert_eq!(r.json()["expires_at"], now + 1800);
    let r = put(
        json!({"access_token": "at-authlib", "token_type": "Bearer", "expires_in": 60,
                       "expires_at": now + 1800}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let e = r.json()["expires_at"].as_i64().unwrap();
    assert!((now + 59..=now + 62).contains(&e), "{e}");
    // requests-oauthlib: scope as a list, expires_at as a float.
    let r = put(
        json!({"access_token": "at-rol", "token_type": "Bearer", "expires_in": 3599.0,
                       "expires_at": (now as f64) + 3599.25, "scope": ["read", "write"]}),
    )
    .await;
    assert_eq!(r.status, 200, "requests-oauthlib: {}", r.text());
    assert_eq!(r.json()["scopes"], json!(["read", "write"]));
    assert_eq!(r.json()["expires_at"], now + 3599);
    // Numeric strings.
    let r = put(json!({"access_token": "at-str", "expires_in": "3599"})).await;
    assert_eq!(r.status, 200, "string: {}", r.text());
    let e = r.json()["expires_at"].as_i64().unwrap();
    assert!((now + 3598..=now + 3601).contains(&e), "{e}");
    // Entra: ext_expires_in and other extras are ignored.
    let r = put(
        json!({"token_type": "Bearer", "scope": "User.Read", "expires_in": 4455,
                       "ext_expires_in": 4455, "access_token": "at-entra",
                       "refresh_token": "rt-entra", "id_token": "eyJ0.e.s",
                       "client_info": "eyJ1aWQiOiIx"}),
    )
    .await;
    assert_eq!(r.status, 200, "Entra: {}", r.text());
    assert_eq!(r.json()["scopes"], json!(["User.Read"]));
    // The stored token is used as Bearer.
    let session = sk.token("ann", &["p"]).await;
    let r = sk.proxy(Method::GET, "/v1/proxy/p/x", &session, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().bearer().as_deref(), Some("at-entra"));
}

#[tokio::test]
async fn non_bearer_token_types_are_refused_never_injected() {
    let up = Upstream::start().await;
    let tok = token_endpoint(json!({
        "access_token": "at-dpop-bound", "token_type": "DPoP", "expires_in": 3600
    }))
    .await;
    let sk = Sidekey::start(Options::with_providers(&oauth_provider(
        "d",
        &up.url,
        &format!("{}/token", tok.url),
        "",
    )))
    .await;
    for tt in ["DPoP", "MAC"] {
        let r = sk
            .admin(
                Method::PUT,
                "/v1/users/ann/credentials/d",
                Some(json!({"access_token": "at-bound-1", "token_type": tt})),
            )
            .await;
        r.assert_error(400, "bad_request");
        let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(msg.contains(tt) && msg.contains("bearer"), "{msg}");
        assert!(!msg.contains("at-bound-1"), "{msg}");
    }
    // The refresh path: a DPoP token from the endpoint is never sent.
    sk.put_credential(
        "ann",
        "d",
        json!({"access_token": "at-old", "refresh_token": "rt-old", "expires_at": 1000}),
    )
    .await;
    let session = sk.token("ann", &["d"]).await;
    let r = sk.proxy(Method::GET, "/v1/proxy/d/me", &session, "").await;
    r.assert_error(502, "refresh_failed");
    assert_eq!(tok.count(), 1);
    assert!(
        up.requests()
            .iter()
            .all(|r| r.header("authorization").is_none()),
        "a DPoP token went upstream"
    );
    // The log line is read from the process's stderr by another thread.
    let waited = Instant::now();
    while !sk.log_text().contains("DPoP") && waited.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        sk.log_text().contains("DPoP"),
        "the log must say why the refresh failed"
    );
}

// ---------------------------------------------------------------------------
// Item 6: client_secret_basic encodes a space as %20

#[tokio::test]
async fn client_secret_basic_sends_a_space_as_percent_20() {
    let up = Upstream::start().await;
    let tok = token_endpoint(json!({"access_token": "at-basic", "token_type": "Bearer"})).await;
    let toml = format!(
        "[providers.b]\nbase_url = \"{}\"\ntoken_url = \"{}/token\"\nclient_id = \"my client\"\n\
         client_secret = \"s3cret with space+plus\"\nclient_auth = \"basic\"\n",
        up.url, tok.url
    );
    let sk = Sidekey::start(Options::with_providers(&toml)).await;
    sk.put_credential(
        "ann",
        "b",
        json!({"access_token": "at-old", "refresh_token": "rt-old", "expires_at": 1000}),
    )
    .await;
    let session = sk.token("ann", &["b"]).await;
    let r = sk.proxy(Method::GET, "/v1/proxy/b/me", &session, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let auth = tok.last().header("authorization").unwrap();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(auth.strip_prefix("Basic ").unwrap())
        .unwrap();
    // What Authlib's `unquote` and every form decoder both read right.
    assert_eq!(
        String::from_utf8(raw).unwrap(),
        "my%20client:s3cret%20with%20space%2Bplus"
    );
}

// ---------------------------------------------------------------------------
// Item 9: the refresh tool's cooldown

#[tokio::test]
async fn refresh_tool_within_cooldown_answers_active_without_token_calls() {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    require_valid_token(&up, &tok);
    tok.issue_refresh("rt-seed");
    let sk = InProcess::start(Options::with_providers(&oauth_provider(
        "c", &up.url, &tok.url, "",
    )))
    .await;
    sk.put_credential(
        "ann",
        "c",
        json!({"access_token": "at-old", "refresh_token": "rt-seed", "expires_in": 3600}),
    )
    .await;
    let session = sk.token("ann", &["c"]).await;
    let r = refresh_tool(&sk, &session, r#"{"provider": "c"}"#).await;
    assert_eq!(
        r.json()["providers"]["c"]["status"],
        "refreshed",
        "{}",
        r.text()
    );
    assert_eq!(tok.calls(), 1);
    let expires = r.json()["providers"]["c"]["expires_at"].clone();
    for _ in 0..29 {
        let r = refresh_tool(&sk, &session, r#"{"provider": "c"}"#).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["providers"]["c"]["status"], "active");
        assert_eq!(r.json()["providers"]["c"]["expires_at"], expires);
    }
    assert_eq!(tok.calls(), 1, "forced refreshes within the cooldown");
    // After the default 30 s cooldown, a forced refresh calls again.
    sk.clock.advance(31);
    let r = refresh_tool(&sk, &session, "{}").await;
    assert_eq!(
        r.json()["providers"]["c"]["status"],
        "refreshed",
        "{}",
        r.text()
    );
    assert_eq!(tok.calls(), 2);
}

// ---------------------------------------------------------------------------
// Item 13: defence in depth

fn core_limits(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap()
        .split_whitespace()
        .skip(4)
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test]
async fn core_dumps_are_disabled_unless_switched_on() {
    if !Path::new("/proc/self/limits").exists() {
        panic!("this test needs Linux /proc");
    }
    let sk = Sidekey::start(Options::default()).await;
    assert_eq!(core_limits(sk.pid().unwrap()), "0 0", "soft and hard 0");
    let on = Sidekey::start(Options::default().env("SIDEKEY_ALLOW_CORE_DUMPS", "1")).await;
    let mine = core_limits(std::process::id());
    assert_eq!(
        core_limits(on.pid().unwrap()),
        mine,
        "the switch leaves the inherited limits alone"
    );
    assert!(on.log_text().contains("SIDEKEY_ALLOW_CORE_DUMPS"));
}

#[tokio::test]
async fn log_directives_cannot_lift_the_caps_on_http_and_tls_targets() {
    let up = Upstream::start().await;
    let sk = Sidekey::start(
        Options::with_providers(&support::provider_toml("p", &up.url, "")).log(
            "info,h2::codec=trace,h2::proto=trace,hyper::proto=trace,hyper_util::client=trace,\
             rustls::conn=trace,sled::tree=trace,[{token}]=trace",
        ),
    )
    .await;
    sk.put_credential("ann", "p", json!({"access_token": "at-capped-secret-77"}))
        .await;
    let session = sk.token("ann", &["p"]).await;
    // The test client speaks HTTP/2 (ALPN): h2 logs frames at debug.
    let r = sk.proxy(Method::GET, "/v1/proxy/p/x", &session, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.version, http::Version::HTTP_2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = sk.log_text();
    for line in logs.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or(Value::Null);
        let level = v["level"].as_str().unwrap_or("");
        assert!(
            level != "DEBUG" && level != "TRACE",
            "a capped target logged below info: {line}"
        );
    }
    assert!(!logs.contains("at-capped-secret-77"));
    assert!(!logs.contains(&session));
}

#[tokio::test]
async fn huge_ttls_and_expiries_saturate_instead_of_wrapping() {
    let up = Upstream::start().await;
    let sk = Sidekey::start(
        Options::with_providers(&support::provider_toml("p", &up.url, ""))
            // The largest integer TOML has (i64::MAX).
            .sessions("max_ttl_secs = 9223372036854775807"),
    )
    .await;
    let r = sk
        .admin(
            Method::PUT,
            "/v1/users/ann/credentials/p",
            Some(json!({"access_token": "at-forever", "expires_in": 1e300})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "active", "{}", r.text());
    let s = sk
        .session_with(json!({"user": "ann", "providers": ["p"], "ttl_secs": i64::MAX}))
        .await;
    assert!(s["expires_at"].as_i64().unwrap() > unix_now(), "{s}");
    let r = sk
        .proxy(
            Method::GET,
            "/v1/proxy/p/x",
            s["token"].as_str().unwrap(),
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

// ---------------------------------------------------------------------------
// Items 7 and 8: the generic tool's query, and the injected parameter

/// A provider that takes its key in the query, on the fake upstream.
async fn query_provider() -> (Upstream, Sidekey, String) {
    let up = Upstream::start().await;
    let sk = Sidekey::start(Options::with_providers(&support::provider_toml(
        "q",
        &up.url,
        "inject = { query = \"key\" }",
    )))
    .await;
    sk.put_credential("ann", "q", json!({"access_token": "tok-real-key"}))
        .await;
    let session = sk.token("ann", &["q"]).await;
    (up, sk, session)
}

async fn tool_call(api: &Api, session: &str, spec: Value) -> Resp {
    api.agent(
        Method::POST,
        "/v1/call/q",
        &[
            ("x-sidekey-session", session),
            ("content-type", "application/json"),
        ],
        spec.to_string(),
    )
    .await
}

/// Every query parameter the upstream got as (name, value), split the way
/// the most permissive server would (`&` and `;`).
fn upstream_params(query: &str) -> Vec<(String, String)> {
    query
        .split(['&', ';'])
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let d = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (d(k), d(v))
        })
        .collect()
}

/// Exactly one parameter any server could read as `key`, and it is ours.
fn assert_only_injected_key(query: &str) {
    let keys: Vec<(String, String)> = upstream_params(query)
        .into_iter()
        .filter(|(k, _)| {
            let n = k.split('[').next().unwrap();
            let n = n.trim_matches(|c: char| c.is_whitespace() || c.is_control());
            n.to_lowercase() == "key" || n.to_lowercase().replace("%6b", "k") == "key"
        })
        .collect();
    assert_eq!(
        keys,
        vec![("key".to_owned(), "tok-real-key".to_owned())],
        "upstream query: {query}"
    );
}

#[tokio::test]
async fn generic_tool_query_is_encoded_and_never_a_500() {
    let (up, sk, session) = query_provider().await;
    // The reported cases: `#`, space, CR, LF.
    let r = tool_call(
        &sk,
        &session,
        json!({"method": "GET", "path": "/geo", "query": "q=a b#frag&x=1\r\nX-Evil: 1"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let q = up.last().query.unwrap();
    assert_only_injected_key(&q);
    let params = upstream_params(&q);
    assert!(params.contains(&("q".into(), "a b#frag".into())), "{q}");
    assert!(
        params.contains(&("x".into(), "1\r\nX-Evil: 1".into())),
        "{q}"
    );

    // Whatever else an LLM may write: never a 500, and when it goes
    // through, the injected key is there and alone.
    let nasty = [
        "#",
        "##key=evil",
        "a=%",
        "a=%zz&b=%4",
        "a=\u{0}b",
        "a=\"<>`{}|\\^[]",
        "ü=ö&€",
        "?&&=&",
        "a=1\n\nGET / HTTP/1.1",
        " key = evil ",
    ];
    for q in nasty {
        for spec in [
            json!({"method": "GET", "path": "/geo", "query": q}),
            json!({"method": "GET", "path": format!("/geo?{q}")}),
        ] {
            let r = tool_call(&sk, &session, spec.clone()).await;
            assert_ne!(r.status.as_u16(), 500, "{spec}: {}", r.text());
            if r.status == 200 {
                assert_only_injected_key(&up.last().query.unwrap_or_default());
            }
        }
    }
    // A query too long for any request line is the caller's mistake: 400.
    let long = format!("a={}", "x".repeat(70_000));
    let r = tool_call(
        &sk,
        &session,
        json!({"method": "GET", "path": "/geo", "query": long}),
    )
    .await;
    r.assert_error(400, "bad_request");
}

#[tokio::test]
async fn every_spelling_of_the_injected_parameter_is_removed() {
    let (up, sk, session) = query_provider().await;
    let variants = [
        "KEY=evil",
        "Key=evil",
        "key[]=evil",
        "key%5B%5D=evil",
        "key%5B0%5D=evil",
        "a=1;key=evil",
        "key+=evil",
        "+key=evil",
        "%6Bey=evil",
        "%256Bey=evil",
        "%4B%45%59=evil",
        "key%00=evil",
        "key=evil",
    ];
    // Through the proxy route, each alone and all together.
    let all = variants.join("&");
    for v in variants.iter().copied().chain([all.as_str()]) {
        let r = sk
            .proxy(
                Method::GET,
                &format!("/v1/proxy/q/geo?b=2&{v}&c=3"),
                &session,
                "",
            )
            .await;
        assert_eq!(r.status, 200, "{v}: {}", r.text());
        let q = up.last().query.unwrap();
        assert_only_injected_key(&q);
        let params = upstream_params(&q);
        assert!(params.contains(&("b".into(), "2".into())), "{q}");
        assert!(params.contains(&("c".into(), "3".into())), "{q}");
    }
    // Through the generic tool: as a string and as an object.
    let r = tool_call(
        &sk,
        &session,
        json!({"method": "GET", "path": "/geo", "query": all}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_only_injected_key(&up.last().query.unwrap());
    let r = tool_call(
        &sk,
        &session,
        json!({"method": "GET", "path": "/geo", "query": {"KEY": "evil", "key[]": "evil", "b": "2"}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_only_injected_key(&up.last().query.unwrap());
}

// ---------------------------------------------------------------------------
// Item 2: post-call bodies are bounded before and while they are read

/// hex(HMAC-SHA256(secret, "<t>.<body>")), as ElevenLabs signs.
fn sign(t: i64, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac =
        <Hmac<sha2::Sha256> as Mac>::new_from_slice(support::WEBHOOK_SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={t},v0={hex}")
}

/// An HTTP/1.1 connection over TLS to the agent listener.
async fn tls_connect(
    api: &Api,
    dir: &Path,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(dir.join("certs/server.crt")).unwrap()
    {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(api.agent_addr)
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

/// Starts a post-call request declaring `declared` bytes but sending only
/// `sent` of them; the connection stays open, the body unfinished.
async fn unfinished_post_call(
    api: &Api,
    dir: &Path,
    signature: Option<&str>,
    declared: usize,
    sent: usize,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut tls = tls_connect(api, dir).await;
    let sig = signature
        .map(|s| format!("ElevenLabs-Signature: {s}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "POST /v1/elevenlabs/post-call HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{sig}Content-Length: {declared}\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(&vec![b' '; sent]).await.unwrap();
    tls.flush().await.unwrap();
    tls
}

/// The status line of whatever the server answered within `wait`.
async fn answer_within(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    wait: Duration,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(wait, tls.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => Some(
            String::from_utf8_lossy(&buf[..n])
                .lines()
                .next()
                .unwrap_or("")
                .to_owned(),
        ),
        _ => None,
    }
}

#[tokio::test]
async fn post_call_checks_secret_signature_and_timestamp_before_reading() {
    let sk = InProcess::start(Options::default()).await;
    let now = sk.clock.now();
    let stale = sign(now - 7200, b"{}");
    let cases: [(&str, Option<&str>); 4] = [
        ("no signature header", None),
        ("unparsable header", Some("garbage")),
        ("no v0", Some("t=1")),
        ("stale timestamp", Some(stale.as_str())),
    ];
    for (what, sig) in cases {
        // 60 MB declared, 1 KB sent: an answer now means nothing was read.
        let mut tls = unfinished_post_call(&sk, sk.dir.path(), sig, 60_000_000, 1024).await;
        let line = answer_within(&mut tls, Duration::from_secs(5)).await;
        assert_eq!(
            line.as_deref(),
            Some("HTTP/1.1 401 Unauthorized"),
            "{what}: must be refused before the body is read"
        );
        assert_eq!(sk.app.webhook_bodies.used(), 0, "{what}");
    }

    // No webhook secret configured: refused before reading too.
    let off =
        Sidekey::start(Options::default().elevenlabs("webhook_secret_env = \"UNSET_VAR_X\"")).await;
    let sig = sign(unix_now(), b"{}");
    let mut tls = unfinished_post_call(&off, off.path(), Some(&sig), 60_000_000, 1024).await;
    let line = answer_within(&mut tls, Duration::from_secs(5)).await;
    assert_eq!(line.as_deref(), Some("HTTP/1.1 401 Unauthorized"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_call_bodies_share_one_memory_budget_and_audio_still_fits() {
    const MIB: usize = 1 << 20;
    let up = Upstream::start().await;
    let sk = InProcess::start(
        Options::with_providers(&support::provider_toml("p", &up.url, ""))
            // 4 MiB of it kept for small bodies, 2 MiB per body when contended.
            .elevenlabs("webhook_memory_budget_bytes = 12582912")
            // The slow upload below stalls on purpose: no minimum rate here.
            .elevenlabs("webhook_min_bytes_per_sec = 0"),
    )
    .await;
    sk.session_with(json!({"user": "ann", "providers": ["p"], "conversation_id": "conv-audio"}))
        .await;
    // One slow upload alone holds 5 MiB of the 8 MiB large bodies may use
    // (what arrived, not the 8 MiB it declares).
    let fresh = sign(sk.clock.now(), b"never verified");
    let mut slow = unfinished_post_call(&sk, sk.dir.path(), Some(&fresh), 8 * MIB, 5 * MIB).await;
    let t0 = Instant::now();
    while sk.app.webhook_bodies.used() < (5 * MIB) as u64 {
        assert!(t0.elapsed() < Duration::from_secs(5), "budget not taken");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(sk.app.webhook_bodies.used() < (6 * MIB) as u64);
    // A second one that would pass the budget once past its own share: 503.
    let mut second = unfinished_post_call(&sk, sk.dir.path(), Some(&fresh), 6 * MIB, 6 * MIB).await;
    let line = answer_within(&mut second, Duration::from_secs(5)).await;
    assert_eq!(line.as_deref(), Some("HTTP/1.1 503 Service Unavailable"));
    assert!(
        answer_within(&mut slow, Duration::from_millis(100))
            .await
            .is_none()
    );
    // The slow client goes away: its share comes back.
    drop(slow);
    drop(second);
    let t0 = Instant::now();
    while sk.app.webhook_bodies.used() != 0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "budget not returned");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A real post_call_audio of several MB is accepted and revokes.
    let audio = "A".repeat(6 * MIB);
    let body = json!({
        "type": "post_call_audio",
        "event_timestamp": sk.clock.now(),
        "data": {"agent_id": "a", "conversation_id": "conv-audio", "full_audio": audio}
    })
    .to_string();
    let r = sk
        .agent(
            Method::POST,
            "/v1/elevenlabs/post-call",
            &[
                ("content-type", "application/json"),
                (
                    "elevenlabs-signature",
                    &sign(sk.clock.now(), body.as_bytes()),
                ),
            ],
            body,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["sessions_revoked"], 1);
    assert_eq!(sk.app.webhook_bodies.used(), 0);
}

// ---------------------------------------------------------------------------
// Item 10: an unauthenticated flood does not evict real audit records

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_flood_never_evicts_records_of_proxied_calls() {
    let up = Upstream::start().await;
    let sk = Sidekey::start(Options::with_providers(&format!(
        "{}\n[audit]\nmax_records = 50\n",
        support::provider_toml("p", &up.url, "")
    )))
    .await;
    sk.put_credential("ann", "p", json!({"access_token": "at-audit"}))
        .await;
    let session = sk.token("ann", &["p"]).await;
    for i in 0..10 {
        let r = sk
            .proxy(Method::GET, &format!("/v1/proxy/p/real/{i}"), &session, "")
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // 2,000 refused requests without a valid session or signature.
    let mut sent = 0;
    for round in 0..20 {
        let batch = (0..100).map(|i| {
            let client = sk.client.clone();
            let (url, headers): (String, Vec<(&str, String)>) = match i % 4 {
                0 => (sk.agent_url("/v1/proxy/p/x"), vec![]),
                1 => (
                    sk.agent_url("/v1/proxy/p/x"),
                    vec![("x-sidekey-session", format!("bogus.{round}.{i}"))],
                ),
                2 => (sk.agent_url("/v1/elevenlabs/post-call"), vec![]),
                _ => (sk.agent_url("/v1/elevenlabs/conversation-init"), vec![]),
            };
            async move {
                let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                // No body: refused before reading it, a body still being
                // sent would race with the early answer.
                support::send(&client, Method::POST, &url, &h, "").await
            }
        });
        for r in join_all(batch).await {
            assert_eq!(r.status, 401, "{}", r.text());
            sent += 1;
        }
    }
    assert_eq!(sent, 2000);
    let r = sk.admin(Method::GET, "/v1/audit?limit=1000", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let records = r.json();
    let records = records.as_array().unwrap();
    let real: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "proxy" && r["status"] == 200)
        .collect();
    assert_eq!(real.len(), 10, "proxied calls were evicted: {records:?}");
    let summarised: u64 = records
        .iter()
        .filter(|r| r["kind"] == "refused")
        .map(|r| {
            r["error"]
                .as_str()
                .unwrap()
                .rsplit_once(" x")
                .unwrap()
                .1
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(summarised, 2000, "{records:?}");
    let m = sk.admin(Method::GET, "/metrics", None).await.text();
    assert_eq!(
        metric(
            &m,
            "sidekey_unauthenticated_requests_total{reason=\"missing\"}"
        ),
        500.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "sidekey_unauthenticated_requests_total{reason=\"malformed\"}"
        ),
        500.0,
        "{m}"
    );
}

// ---------------------------------------------------------------------------
// Item 11: a session minted without a conversation cannot be taken

async fn call_conv(api: &Api, token: &str, conv: Option<&str>) -> Resp {
    let mut h = vec![("x-sidekey-session", token)];
    if let Some(c) = conv {
        h.push(("x-conversation-id", c));
    }
    api.agent(Method::GET, "/v1/proxy/p/me", &h, "").await
}

#[tokio::test]
async fn second_conversation_revokes_the_session_audited_and_counted() {
    let up = Upstream::start().await;
    let sk = Sidekey::start(Options::with_providers(&support::provider_toml(
        "p", &up.url, "",
    )))
    .await;
    sk.put_credential("ann", "p", json!({"access_token": "at-conflict"}))
        .await;
    let token = sk.token("ann", &["p"]).await;
    // The attacker binds it first; the real conversation then conflicts.
    assert_eq!(call_conv(&sk, &token, Some("conv-thief")).await.status, 200);
    call_conv(&sk, &token, Some("conv-real"))
        .await
        .assert_error(401, "conversation_mismatch");
    // Both holders lost it.
    for conv in ["conv-thief", "conv-real"] {
        let r = call_conv(&sk, &token, Some(conv)).await;
        r.assert_error(401, "invalid_session");
        assert_eq!(r.json()["error"]["reason"], "revoked");
    }
    assert_eq!(up.count(), 1);
    let conflicts = sk.audit_of_kind("session_conflict").await;
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert_eq!(conflicts[0]["user"], "ann");
    assert_eq!(conflicts[0]["conversation_id"], "conv-real");
    let m = sk.admin(Method::GET, "/metrics", None).await.text();
    assert_eq!(metric(&m, "sidekey_session_conflicts_total"), 1.0, "{m}");
}

#[tokio::test]
async fn unbound_sessions_must_be_bound_within_bind_within_secs() {
    let up = Upstream::start().await;
    let sk = InProcess::start(
        Options::with_providers(&support::provider_toml("p", &up.url, ""))
            .sessions("bind_within_secs = 60"),
    )
    .await;
    sk.put_credential("ann", "p", json!({"access_token": "at-bind"}))
        .await;
    let late = sk.token("ann", &["p"]).await;
    let early = sk.token("ann", &["p"]).await;
    assert_eq!(call_conv(&sk, &early, Some("conv-1")).await.status, 200);
    sk.clock.advance(61);
    for conv in [Some("conv-2"), None] {
        let r = call_conv(&sk, &late, conv).await;
        r.assert_error(401, "invalid_session");
        assert_eq!(r.json()["error"]["reason"], "expired");
    }
    // Bound in time: keeps working for its whole life.
    assert_eq!(call_conv(&sk, &early, Some("conv-1")).await.status, 200);

    // 0 switches the limit off.
    let off = InProcess::start(
        Options::with_providers(&support::provider_toml("p", &up.url, ""))
            .sessions("bind_within_secs = 0"),
    )
    .await;
    off.put_credential("ann", "p", json!({"access_token": "at-bind"}))
        .await;
    let t = off.token("ann", &["p"]).await;
    off.clock.advance(3000);
    assert_eq!(call_conv(&off, &t, Some("conv-9")).await.status, 200);
}

#[tokio::test]
async fn replayed_post_call_does_not_revoke_a_later_session() {
    let up = Upstream::start().await;
    let sk = InProcess::start(Options::with_providers(&support::provider_toml(
        "p", &up.url, "",
    )))
    .await;
    sk.put_credential("ann", "p", json!({"access_token": "at-replay"}))
        .await;
    let mint =
        || sk.session_with(json!({"user": "ann", "providers": ["p"], "conversation_id": "conv-r"}));
    let first = mint().await["token"].as_str().unwrap().to_owned();
    sk.clock.advance(5);
    let t = sk.clock.now();
    let body = json!({"type": "post_call_transcription", "event_timestamp": t,
                      "data": {"conversation_id": "conv-r"}})
    .to_string();
    let sig = sign(t, body.as_bytes());
    let post = |body: String, sig: String| {
        let sk = &sk;
        async move {
            sk.agent(
                Method::POST,
                "/v1/elevenlabs/post-call",
                &[
                    ("content-type", "application/json"),
                    ("elevenlabs-signature", sig.as_str()),
                ],
                body,
            )
            .await
        }
    };
    let r = post(body.clone(), sig.clone()).await;
    assert_eq!(r.json()["sessions_revoked"], 1, "{}", r.text());
    call_conv(&sk, &first, Some("conv-r"))
        .await
        .assert_error(401, "invalid_session");
    // Later, a new session for the same conversation id; then the old,
    // validly signed webhook is replayed within its tolerance.
    sk.clock.advance(10);
    let later = mint().await["token"].as_str().unwrap().to_owned();
    let r = post(body, sig).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["sessions_revoked"], 0, "{}", r.text());
    let r = call_conv(&sk, &later, Some("conv-r")).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

// ---------------------------------------------------------------------------
// invalid_session says why

#[tokio::test]
async fn session_errors_carry_a_reason_in_the_answer_and_the_access_log() {
    let up = Upstream::start().await;
    let sk = Sidekey::start(Options::with_providers(&support::provider_toml(
        "p", &up.url, "",
    )))
    .await;
    sk.put_credential("ann", "p", json!({"access_token": "at-why"}))
        .await;
    let good = sk.session("ann", &["p"]).await;
    let token = good["token"].as_str().unwrap().to_owned();

    // A token signed with a key this instance does not have.
    let foreign = {
        let claims = jsonwebtoken::decode_header(&token).unwrap();
        assert!(claims.kid.is_some());
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        h.kid = Some("hs-0123456789abcdef".into());
        let payload: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(token.split('.').nth(1).unwrap())
                .unwrap(),
        )
        .unwrap();
        jsonwebtoken::encode(
            &h,
            &payload,
            &jsonwebtoken::EncodingKey::from_secret(&[7u8; 32]),
        )
        .unwrap()
    };
    // The right key id, a signature that does not match.
    let forged = {
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let sig = &mut parts[2];
        let mid = sig.len() / 2;
        let c = if &sig[mid..mid + 1] == "A" { "B" } else { "A" };
        sig.replace_range(mid..mid + 1, c);
        parts.join(".")
    };
    let short = sk
        .session_with(json!({"user": "ann", "providers": ["p"], "ttl_secs": 1}))
        .await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let revoked = sk.session("ann", &["p"]).await;
    let r = sk
        .admin(
            Method::DELETE,
            &format!("/v1/sessions/{}", revoked["session_id"].as_str().unwrap()),
            None,
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text());
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("missing", vec![]),
        ("missing", vec![("x-sidekey-sesion", token.clone())]),
        ("missing", vec![("x-sidekey-session", String::new())]),
        ("malformed", vec![("x-sidekey-session", "not.a.jwt".into())]),
        ("malformed", vec![("authorization", "Bearer abc".into())]),
        ("expired", vec![("x-sidekey-session", short)]),
        ("bad_signature", vec![("x-sidekey-session", forged)]),
        ("unknown_key", vec![("x-sidekey-session", foreign)]),
        (
            "revoked",
            vec![(
                "x-sidekey-session",
                revoked["token"].as_str().unwrap().to_owned(),
            )],
        ),
    ];
    for (reason, headers) in &cases {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = sk.agent(Method::GET, "/v1/proxy/p/me", &h, "").await;
        r.assert_error(401, "invalid_session");
        assert_eq!(
            r.json()["error"]["reason"],
            *reason,
            "{headers:?}: {}",
            r.text()
        );
        for (_, v) in headers {
            if v.len() > 8 {
                assert!(!r.text().contains(v.as_str()), "the token was echoed");
            }
        }
    }
    assert_eq!(up.count(), 0);
    // The access log says it too.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = sk.log_text();
    for reason in [
        "missing",
        "malformed",
        "expired",
        "bad_signature",
        "unknown_key",
        "revoked",
    ] {
        assert!(
            logs.lines()
                .any(|l| l.contains("\"status\":401")
                    && l.contains(&format!("\"reason\":\"{reason}\""))),
            "no access-log line with reason {reason}:\n{logs}"
        );
    }

    // A bound session called without its conversation header: its own message.
    let bound = sk
        .session_with(json!({"user": "ann", "providers": ["p"], "conversation_id": "conv-b"}))
        .await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = call_conv(&sk, &bound, None).await;
    r.assert_error(401, "conversation_mismatch");
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("didn't say which conversation it belongs to"),
        "{msg}"
    );
    // That is not a conflict: the session still works with its header.
    assert_eq!(call_conv(&sk, &bound, Some("conv-b")).await.status, 200);
}
