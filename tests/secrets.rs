//! Secrets never escape: a broad slice of traffic at `SIDEKEY_LOG=trace`,
//! then every token, refresh token, client secret, session token, OAuth
//! code, password and key is looked for in the log, in every response
//! (header and body), in the audit log and in the raw store files.
use sidekey_testkit as support;

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{Hmac, Mac};
use http::Method;
use serde_json::json;
use support::token::TokenServer;
use support::upstream::{Reply, Upstream};
use support::{
    INIT_SECRET, Options, Resp, Sidekey, WEBHOOK_SECRET, contains, provider_toml, query_param,
    read_tree,
};

/// Every response seen, labelled; `carries` names the session token a
/// session-mint answer legitimately holds (exempt for that answer only).
#[derive(Default)]
struct Seen {
    responses: Vec<(String, Resp, Option<String>)>,
}

impl Seen {
    fn add(&mut self, label: &str, r: Resp) -> Resp {
        self.responses.push((label.to_owned(), r.clone(), None));
        r
    }

    fn add_mint(&mut self, label: &str, r: Resp, token: &str) -> Resp {
        self.responses
            .push((label.to_owned(), r.clone(), Some(token.to_owned())));
        r
    }
}

fn resp_text(r: &Resp) -> String {
    let mut s = String::new();
    for (k, v) in &r.headers {
        s.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
    }
    s.push('\n');
    s.push_str(&String::from_utf8_lossy(&r.body));
    s
}

/// The forms a secret could leak in: as is, URL-encoded, and (for JWTs)
/// the signature on its own.
fn forms(secret: &str) -> Vec<String> {
    let mut v = vec![secret.to_owned()];
    let enc: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
    if enc != secret {
        v.push(enc);
    }
    if secret.matches('.').count() == 2 && secret.starts_with("eyJ") {
        v.push(secret.rsplit('.').next().unwrap().to_owned());
    }
    v
}

fn sign(body: &str) -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(WEBHOOK_SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={t},v0={hex}")
}

const BOB_STALE: &str = "at-SECRET-bob-stale-4d5e";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_escape() {
    // ---- fakes --------------------------------------------------------------
    // The upstream never echoes what it got, so any secret in a response is
    // sidekey's doing. It refuses bob's stale token to force a 401 replay.
    let up = Upstream::start().await;
    up.set_handler(|r| {
        if r.bearer().as_deref() == Some(BOB_STALE) {
            Reply::Json(401, json!({"error": "token_expired"}))
        } else {
            Reply::Json(200, json!({"ok": true}))
        }
    });
    let ts_body = TokenServer::start().await;
    let ts_basic = TokenServer::start().await;
    let body_secret = "cs-SECRET-body-5a6b7c9d";
    let basic_secret = "cs-SECRET-basic-8e9f0a1b";
    for (ts, id, sec) in [
        (&ts_body, "sk-body-client", body_secret),
        (&ts_basic, "sk-basic-client", basic_secret),
    ] {
        let mut st = ts.state.lock().unwrap();
        st.client_id = id.into();
        st.client_secret = sec.into();
    }
    // A port nothing listens on: connection refused.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };

    let mut toml = String::new();
    toml.push_str(&provider_toml(
        "custom",
        &up.url,
        &format!(
            "token_url = \"{}\"\nauthorize_url = \"https://auth.example.test/authorize\"\nclient_id = \"sk-body-client\"\nclient_secret_env = \"SECRETS_BODY_SECRET\"\nscopes = [\"read\"]",
            ts_body.url
        ),
    ));
    toml.push_str(&provider_toml(
        "gbasic",
        &format!("{}/gbasic", up.url),
        &format!(
            "token_url = \"{}\"\nclient_id = \"sk-basic-client\"\nclient_secret_env = \"SECRETS_BASIC_SECRET\"\nclient_auth = \"basic\"",
            ts_basic.url
        ),
    ));
    toml.push_str(&provider_toml(
        "hdr",
        &format!("{}/hdr", up.url),
        "inject = { header = \"X-Api-Key\", value = \"Token {token}\" }",
    ));
    toml.push_str(&provider_toml(
        "qry",
        &format!("{}/qry", up.url),
        "inject = { query = \"key\" }",
    ));
    toml.push_str(&provider_toml("tg", &up.url, "preset = \"telegram\""));
    toml.push_str(&provider_toml(
        "tgdown",
        &format!("http://127.0.0.1:{closed}"),
        "preset = \"telegram\"",
    ));
    toml.push_str(&provider_toml(
        "basicp",
        &format!("{}/basic", up.url),
        "inject = \"basic\"",
    ));
    let opts = Options::with_providers(&toml)
        .unbound_oauth()
        .env("SECRETS_BODY_SECRET", body_secret)
        .env("SECRETS_BASIC_SECRET", basic_secret)
        .log("trace");
    let mut sk = Sidekey::start(opts).await;
    let mut seen = Seen::default();

    // ---- secrets ---------------------------------------------------------
    let alice_at = "at-SECRET-alice-custom-31f2";
    let alice_rt = "rt-SECRET-alice-custom-77c1";
    let bob_rt = "rt-SECRET-bob-custom-9a8b";
    let gb_at = "at-SECRET-alice-gbasic-1c2d";
    let gb_rt = "rt-SECRET-alice-gbasic-3e4f";
    let hdr_key = "hk-SECRET-alice-hdr-5f6a";
    let qry_key = "qk-SECRET-alice-qry-7b8c";
    let tg_token = "123456:SECRET-tg-alice-9d0e";
    let tgdown_token = "654321:SECRET-tgdown-alice-1a2b";
    let basic_user = "basic-user-alice";
    let basic_pw = "pw-SECRET-basic-3c4d";
    let basic_b64 =
        base64::engine::general_purpose::STANDARD.encode(format!("{basic_user}:{basic_pw}"));
    let carol_at = "at-SECRET-carol-6a7b";
    let carol_rt = "rt-SECRET-carol-dead-5e6f";
    let oauth_code = "code-SECRET-oauth-8c9d";
    let oauth_bad_code = "code-SECRET-oauth-bad-0e1f";
    let wrong_admin = "wrong-admin-SECRET-2f3a";
    ts_body.issue_refresh(alice_rt);
    ts_body.issue_refresh(bob_rt);
    ts_basic.issue_refresh(gb_rt);

    // ---- admin writes ------------------------------------------------------
    let puts = [
        (
            "alice",
            "custom",
            json!({"access_token": alice_at, "refresh_token": alice_rt, "expires_in": 5}),
        ),
        (
            "bob",
            "custom",
            json!({"access_token": BOB_STALE, "refresh_token": bob_rt, "expires_in": 3600}),
        ),
        (
            "alice",
            "gbasic",
            json!({"access_token": gb_at, "refresh_token": gb_rt, "expires_in": 5}),
        ),
        ("alice", "hdr", json!({"access_token": hdr_key})),
        ("alice", "qry", json!({"access_token": qry_key})),
        ("alice", "tg", json!({"access_token": tg_token})),
        ("alice", "tgdown", json!({"access_token": tgdown_token})),
        (
            "alice",
            "basicp",
            json!({"username": basic_user, "password": basic_pw}),
        ),
        (
            "carol",
            "custom",
            json!({"access_token": carol_at, "refresh_token": carol_rt, "expires_in": 5}),
        ),
    ];
    for (user, provider, body) in puts {
        let r = sk
            .admin(
                Method::PUT,
                &format!("/v1/users/{user}/credentials/{provider}"),
                Some(body),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        seen.add("PUT credential", r);
    }
    // Refused admin bodies must not quote what they refused.
    for (label, body) in [
        (
            "malformed JSON",
            "{\"access_token\": \"at-SECRET-malformed-1a1a\", ".to_owned(),
        ),
        (
            "wrong type",
            json!({"access_token": 5, "refresh_token": "rt-SECRET-wrongtype-2b2b"}).to_string(),
        ),
        (
            "unknown field",
            json!({"access_token": "at-SECRET-unknown-3c3c", "tokn": "rt-SECRET-unknown-4d4d"})
                .to_string(),
        ),
        (
            "control characters",
            json!({"access_token": "at-SECRET-crlf-5e5e\r\nX-Evil: 1"}).to_string(),
        ),
    ] {
        let r = support::send(
            &sk.admin_client,
            Method::PUT,
            &sk.admin_url("/v1/users/alice/credentials/hdr"),
            &[
                ("authorization", &format!("Bearer {}", sk.admin_token)),
                ("content-type", "application/json"),
            ],
            body,
        )
        .await;
        r.assert_error(400, "bad_request");
        seen.add(label, r);
    }
    let r = sk
        .admin(
            Method::PUT,
            "/v1/users/alice",
            Some(json!({"phone_numbers": ["+15551234567"]})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    seen.add("PUT user", r);
    seen.add(
        "GET credentials",
        sk.admin(Method::GET, "/v1/users/alice/credentials", None)
            .await,
    );
    let r = support::send(
        &sk.admin_client,
        Method::GET,
        &sk.admin_url("/v1/users/alice/credentials"),
        &[("authorization", &format!("Bearer {wrong_admin}"))],
        "",
    )
    .await;
    r.assert_error(401, "unauthorized");
    seen.add("wrong admin token", r);

    // ---- sessions ----------------------------------------------------------
    let mut session_tokens = Vec::new();
    let mut mint = |seen: &mut Seen, r: Resp| -> (String, String) {
        assert_eq!(r.status, 201, "{}", r.text());
        let v = r.json();
        let t = v["token"].as_str().unwrap().to_owned();
        seen.add_mint("POST /v1/sessions", r, &t);
        session_tokens.push(t.clone());
        (t, v["session_id"].as_str().unwrap().to_owned())
    };
    let all = ["custom", "gbasic", "hdr", "qry", "tg", "tgdown", "basicp"];
    let (alice, alice_sid) = mint(
        &mut seen,
        sk.admin(
            Method::POST,
            "/v1/sessions",
            Some(json!({"user": "alice", "providers": all})),
        )
        .await,
    );
    let (bob, _) = mint(
        &mut seen,
        sk.admin(
            Method::POST,
            "/v1/sessions",
            Some(json!({"user": "bob", "providers": ["custom"], "conversation_id": "conv-bob-1"})),
        )
        .await,
    );
    let (carol, _) = mint(
        &mut seen,
        sk.admin(
            Method::POST,
            "/v1/sessions",
            Some(json!({"user": "carol", "providers": ["custom"]})),
        )
        .await,
    );
    seen.add(
        "GET session",
        sk.admin(Method::GET, &format!("/v1/sessions/{alice_sid}"), None)
            .await,
    );

    // ---- proxied calls -----------------------------------------------------
    // Bearer, refreshed first (client secret in the form body).
    let r = sk
        .agent(
            Method::GET,
            "/v1/proxy/custom/alice/1?x=1",
            &[("authorization", &format!("Bearer {alice}"))],
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    seen.add("proxy custom", r);
    // Refreshed with client_auth = basic; the caller's query string and
    // body go upstream but never into a log line or the audit log.
    let r = sk
        .proxy(
            Method::POST,
            "/v1/proxy/gbasic/items?api_key=caller-SECRET-query-6d7e",
            &alice,
            "{\"note\": \"body-SECRET-payload-8f9a\"}",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    seen.add("proxy gbasic", r);
    assert_eq!(
        ts_basic.last_basic(),
        Some(("sk-basic-client".to_owned(), basic_secret.to_owned()))
    );
    for (label, path) in [
        ("header", "/v1/proxy/hdr/h"),
        ("query", "/v1/proxy/qry/q?a=1"),
        ("path prefix", "/v1/proxy/tg/getMe"),
        ("basic", "/v1/proxy/basicp/b"),
    ] {
        let r = sk.proxy(Method::GET, path, &alice, "").await;
        assert_eq!(r.status, 200, "{label}: {}", r.text());
        seen.add(label, r);
    }
    // Connection refused on a path-prefix provider.
    let r = sk
        .proxy(Method::GET, "/v1/proxy/tgdown/getMe", &alice, "")
        .await;
    r.assert_error(502, "upstream_unreachable");
    seen.add("tgdown", r);
    // The generic call tool.
    let r = sk
        .agent(
            Method::POST,
            "/v1/call/custom",
            &[
                ("x-sidekey-session", &alice),
                ("content-type", "application/json"),
            ],
            json!({"method": "GET", "path": "/alice/tool", "query": {"q": "v"}}).to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    seen.add("call tool", r);
    // bob: the upstream refuses the stored token → refresh → replay.
    let r = sk
        .agent(
            Method::GET,
            "/v1/proxy/custom/bob/1",
            &[
                ("x-sidekey-session", &bob),
                ("x-conversation-id", "conv-bob-1"),
            ],
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    seen.add("bob replay", r);
    // carol: the refresh token is refused.
    let r = sk
        .proxy(Method::GET, "/v1/proxy/custom/carol", &carol, "")
        .await;
    r.assert_error(424, "reauth_required");
    seen.add("carol reauth", r);
    // The refresh tool.
    for t in [&alice, &carol] {
        let r = sk
            .agent(
                Method::POST,
                "/v1/session/refresh",
                &[("x-sidekey-session", t)],
                "{}",
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        seen.add("refresh tool", r);
    }
    // Bad session tokens: altered signature, extra byte.
    let mut altered = alice.clone();
    let last = altered.pop().unwrap();
    altered.push(if last == 'A' { 'B' } else { 'A' });
    for bad in [altered, format!("{alice}x")] {
        let r = sk.proxy(Method::GET, "/v1/proxy/custom/z", &bad, "").await;
        r.assert_error(401, "invalid_session");
        seen.add("bad session", r);
    }

    // ---- OAuth: one success, one refused code ------------------------------
    for (user, code, ok) in [("dave", oauth_code, true), ("erin", oauth_bad_code, false)] {
        let r = sk
            .admin(
                Method::POST,
                &format!("/v1/users/{user}/oauth/custom/start"),
                Some(json!({"return_to": "https://app.example/settings"})),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        seen.add("oauth start", r);
        let url = v["authorize_url"].as_str().unwrap();
        let state = v["state"].as_str().unwrap();
        if ok {
            ts_body.register_code(
                code,
                &query_param(url, "code_challenge").unwrap(),
                &query_param(url, "redirect_uri").unwrap(),
            );
        }
        let r = sk
            .agent(
                Method::GET,
                &format!("/oauth/custom/callback?code={code}&state={state}"),
                &[],
                "",
            )
            .await;
        assert_eq!(r.status, 303, "{}", r.text());
        let loc = r.headers["location"].to_str().unwrap().to_owned();
        assert_eq!(loc.contains("error="), !ok, "{loc}");
        seen.add("oauth callback", r);
    }
    let r = sk
        .admin(Method::GET, "/v1/users/dave/credentials/custom", None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["has_refresh_token"], true);
    seen.add("dave credential", r);

    // ---- ElevenLabs webhooks -------------------------------------------------
    let init =
        json!({"caller_id": "+15551234567", "agent_id": "agent-1", "called_number": "+15550000000",
                      "call_sid": "CA-secrets", "conversation_id": "conv-secrets-1"})
        .to_string();
    let r = sk
        .agent(
            Method::POST,
            "/v1/elevenlabs/conversation-init",
            &[
                ("x-sidekey-init-secret", INIT_SECRET),
                ("content-type", "application/json"),
            ],
            init.clone(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let init_token = r.json()["dynamic_variables"]["secret__sidekey_session"]
        .as_str()
        .expect("a known caller gets a session")
        .to_owned();
    seen.add_mint("conversation-init", r, &init_token);
    session_tokens.push(init_token.clone());
    let r = sk
        .agent(
            Method::POST,
            "/v1/elevenlabs/conversation-init",
            &[("x-sidekey-init-secret", "wrong-init-secret")],
            init,
        )
        .await;
    r.assert_error(401, "unauthorized");
    seen.add("conversation-init refused", r);
    let r = sk
        .agent(
            Method::GET,
            "/v1/proxy/hdr/from-init",
            &[
                ("x-sidekey-session", &init_token),
                ("x-conversation-id", "conv-secrets-1"),
            ],
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    seen.add("proxy with init session", r);
    // The event happens now: post-call revokes only sessions minted before it.
    let event_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let post = json!({"type": "post_call_transcription", "event_timestamp": event_time,
                      "data": {"conversation_id": "conv-secrets-1", "agent_id": "agent-1",
                               "transcript": [{"role": "user", "message": "hello"}]}})
    .to_string();
    let r = sk
        .agent(
            Method::POST,
            "/v1/elevenlabs/post-call",
            &[("elevenlabs-signature", &sign(&post))],
            post.clone(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    seen.add("post-call", r);
    let r = sk
        .agent(
            Method::POST,
            "/v1/elevenlabs/post-call",
            &[("elevenlabs-signature", "t=1,v0=00")],
            post,
        )
        .await;
    r.assert_error(401, "invalid_signature");
    seen.add("post-call refused", r);
    let r = sk
        .proxy(Method::GET, "/v1/proxy/hdr/after", &init_token, "")
        .await;
    r.assert_error(401, "invalid_session");
    seen.add("revoked session", r);

    // ---- what operators read --------------------------------------------------
    let r = sk.admin(Method::GET, "/metrics", None).await;
    assert_eq!(r.status, 200);
    seen.add("metrics", r);
    seen.add(
        "tools",
        sk.admin(Method::GET, "/v1/elevenlabs/tools", None).await,
    );
    let audit = sk.admin(Method::GET, "/v1/audit?limit=10000", None).await;
    assert_eq!(audit.status, 200);
    let audit_text = audit.text();
    assert!(
        audit.json().as_array().unwrap().len() > 20,
        "the audit log should hold the traffic: {audit_text}"
    );
    seen.add("audit", audit);

    // ---- the injections really happened (so the scan means something) -------
    let reqs = up.requests();
    let saw = |pred: &dyn Fn(&support::upstream::Recorded) -> bool, what: &str| {
        assert!(reqs.iter().any(pred), "the upstream never got {what}");
    };
    saw(
        &|r| r.bearer().is_some_and(|b| b.ends_with("-sk-body-client")) && r.path == "/alice/1",
        "alice's refreshed bearer",
    );
    saw(
        &|r| r.bearer().as_deref() == Some(BOB_STALE),
        "bob's stale token",
    );
    saw(
        &|r| r.bearer().is_some_and(|b| b.ends_with("-sk-body-client")) && r.path == "/bob/1",
        "bob's replay with a refreshed token",
    );
    saw(
        &|r| r.bearer().is_some_and(|b| b.ends_with("-sk-basic-client")),
        "the gbasic refreshed bearer",
    );
    saw(
        &|r| {
            r.path == "/gbasic/items"
                && r.query.as_deref() == Some("api_key=caller-SECRET-query-6d7e")
                && contains(&r.body, "body-SECRET-payload-8f9a")
        },
        "the caller's query and body",
    );
    saw(
        &|r| r.header("x-api-key").as_deref() == Some(&format!("Token {hdr_key}")),
        "the header injection",
    );
    saw(
        &|r| {
            r.query
                .as_deref()
                .is_some_and(|q| q.contains(&format!("key={qry_key}")))
        },
        "the query injection",
    );
    saw(
        &|r| r.path.contains("SECRET-tg-alice-9d0e") && r.path.ends_with("/getMe"),
        "the path-prefix injection",
    );
    saw(
        &|r| r.header("authorization").as_deref() == Some(&format!("Basic {basic_b64}")),
        "the basic injection",
    );
    saw(
        &|r| {
            r.path == "/hdr/from-init"
                && r.header("x-api-key").as_deref() == Some(&format!("Token {hdr_key}"))
        },
        "the init session's call",
    );

    // Plain HTTP to the TLS listener: a handshake failure sidekey logs at
    // debug level, which shows the verbose filter is in effect.
    {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(sk.agent_addr).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let _ = c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        let _ = c.read(&mut [0u8; 64]);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !sk.log_text().contains("\"level\":\"DEBUG\"") {
        assert!(
            std::time::Instant::now() < deadline,
            "no debug line at SIDEKEY_LOG=trace:\n{}",
            sk.log_text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // ---- stop, then scan everything -------------------------------------------
    let dir = sk.path().to_path_buf();
    let master_key = std::fs::read_to_string(dir.join("data/master.key")).unwrap();
    let session_key = std::fs::read_to_string(dir.join("data/session.key")).unwrap();
    let admin_token = sk.admin_token.clone();
    assert_eq!(sk.stop(), Some(0), "graceful stop");
    let logs = sk.log_text();
    // What the store holds at rest: sled's files, or a dump of the
    // PostgreSQL database (where bytea shows as hex: scanned both ways).
    let raw_store = if sk.opts.on_postgres() {
        let dump = support::pg::cluster().dump(sk.opts.pg_db.get().unwrap());
        let mut all = dump.clone();
        all.extend_from_slice(b"\n");
        all.extend(hex_decode_dump(&dump));
        all
    } else {
        read_tree(&dir.join("data/sidekey.db"))
    };
    assert!(!raw_store.is_empty());

    let mut secrets: Vec<(String, String)> = [
        ("alice access token", alice_at),
        ("alice refresh token", alice_rt),
        ("bob stale access token", BOB_STALE),
        ("bob refresh token", bob_rt),
        ("gbasic access token", gb_at),
        ("gbasic refresh token", gb_rt),
        ("header token", hdr_key),
        ("query token", qry_key),
        ("telegram token", tg_token),
        ("telegram (down) token", tgdown_token),
        ("basic password", basic_pw),
        ("basic header value", &basic_b64),
        ("carol access token", carol_at),
        ("carol refresh token", carol_rt),
        ("body client secret", body_secret),
        ("basic client secret", basic_secret),
        ("OAuth code", oauth_code),
        ("refused OAuth code", oauth_bad_code),
        ("admin token", &admin_token),
        ("wrong admin token", wrong_admin),
        ("master key", master_key.trim()),
        ("session signing key", session_key.trim()),
        ("webhook secret", WEBHOOK_SECRET),
        ("init secret", INIT_SECRET),
        ("caller's query value", "caller-SECRET-query-6d7e"),
        ("caller's body value", "body-SECRET-payload-8f9a"),
        ("refused malformed body value", "at-SECRET-malformed-1a1a"),
        ("refused wrong-type body value", "rt-SECRET-wrongtype-2b2b"),
        ("refused unknown-field body value", "at-SECRET-unknown-3c3c"),
        ("refused unknown-field body value", "rt-SECRET-unknown-4d4d"),
        ("refused control-character token", "at-SECRET-crlf-5e5e"),
    ]
    .iter()
    .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
    .collect();
    for t in ts_body
        .all_tokens()
        .into_iter()
        .chain(ts_basic.all_tokens())
    {
        secrets.push(("token issued by a fake endpoint".into(), t));
    }
    for t in &session_tokens {
        secrets.push(("session token".into(), t.clone()));
    }
    assert!(
        secrets.iter().any(|(_, t)| t == "at-1-sk-body-client"),
        "the fake issued tokens"
    );

    // The scan sees what it should: the mint answers do carry their token,
    // and the store files hold the (plain) record keys.
    for (label, r, carries) in &seen.responses {
        if let Some(t) = carries {
            assert!(resp_text(r).contains(t.as_str()), "{label}");
        }
    }
    assert!(contains(&raw_store, "u/alice/custom"));

    let mut leaks = Vec::new();
    for (what, secret) in &secrets {
        for form in forms(secret) {
            if logs.contains(&form) {
                leaks.push(format!("{what} {form:?} in the log"));
            }
            if audit_text.contains(&form) {
                leaks.push(format!("{what} {form:?} in the audit log"));
            }
            if contains(&raw_store, &form) {
                leaks.push(format!("{what} {form:?} in the raw store files"));
            }
            for (label, r, carries) in &seen.responses {
                if carries.as_deref() == Some(secret.as_str()) {
                    continue;
                }
                if resp_text(r).contains(&form) {
                    leaks.push(format!("{what} {form:?} in the {label} response"));
                }
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "secrets escaped:\n{}\n\nlog:\n{}",
        leaks.join("\n"),
        logs.lines()
            .filter(|l| secrets.iter().any(|(_, s)| l.contains(s.as_str())))
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    println!(
        "secrets: {} secret values ({} forms) checked against {} log lines, {} responses, the audit log ({} bytes) and {} bytes of store files",
        secrets.len(),
        secrets.iter().map(|(_, s)| forms(s).len()).sum::<usize>(),
        logs.lines().count(),
        seen.responses.len(),
        audit_text.len(),
        raw_store.len()
    );
}

/// The `\x…` bytea literals of a pg_dump, decoded: a plaintext secret in
/// a value would show up here.
fn hex_decode_dump(dump: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(dump);
    let mut out = Vec::new();
    for part in text.split("\\x").skip(1) {
        let hex: String = part.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
        let bytes = hex.as_bytes();
        for pair in bytes.chunks(2) {
            if let Ok(b) = u8::from_str_radix(std::str::from_utf8(pair).unwrap_or("zz"), 16) {
                out.push(b);
            }
        }
        out.push(b'\n');
    }
    out
}
