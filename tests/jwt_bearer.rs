//! JWT bearer grants (RFC 7523 §2.1) and private_key_jwt (§2.2), black
//! box: the real binary against a fake token endpoint that verifies every
//! assertion's signature with the public key and checks each claim.
//! Google-style domain-wide delegation (a service-account file, the
//! caller's address as subject, a domain restriction) and a
//! Salesforce-style flow end to end; RS256, ES256 and PS256; client
//! assertions on code exchange, refresh and client credentials; tenant
//! keys through the admin API; every refusal's code; one exchange per
//! subject however many callers; and no key or token in any log, answer
//! or audit record. `SIDEKEY_TEST_BACKEND=postgres` runs it on PostgreSQL
//! (the storm then spans three replicas).
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use http::Method;
use serde_json::{Value, json};
use sidekey_testkit as support;
use support::jwt::{TestKey, service_account_json, sign};
use support::token::{Mode, TokenServer, require_valid_token};
use support::upstream::Upstream;
use support::{Options, Sidekey, query_param, run_cli};

const GOOGLE_AUD: &str = "https://oauth2.googleapis.com/token";
const CALENDAR: &str = "https://www.googleapis.com/auth/calendar.readonly";
const SA_EMAIL: &str = "voice-agent@acme-project.iam.gserviceaccount.com";

/// Keys are made once per test binary: RSA key generation is slow.
fn rsa_key() -> &'static TestKey {
    static K: OnceLock<TestKey> = OnceLock::new();
    K.get_or_init(|| TestKey::rsa(2048))
}

fn rsa_key_b() -> &'static TestKey {
    static K: OnceLock<TestKey> = OnceLock::new();
    K.get_or_init(|| TestKey::rsa(2048))
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string().replace('\\', "/")
}

/// A line from the middle of a PEM: if it appears anywhere, the key leaked.
fn key_marker(k: &TestKey) -> String {
    let lines: Vec<&str> = k.private_pem.lines().collect();
    lines[lines.len() / 2].to_owned()
}

async fn put_user(sk: &Sidekey, user: &str, body: Value) -> Value {
    let r = sk
        .admin(Method::PUT, &format!("/v1/users/{user}"), Some(body))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// A fake Google: a token endpoint that trusts the service account and
/// expects Google's audience and scope claim, and an upstream that takes
/// only tokens it issued.
struct Google {
    tok: TokenServer,
    up: Upstream,
    _dir: tempfile::TempDir,
    config: String,
}

async fn google(extra: &str) -> Google {
    let tok = TokenServer::start().await;
    let up = Upstream::start().await;
    require_valid_token(&up, &tok);
    let key = rsa_key().clone();
    tok.jwt(|v| {
        v.issuers.insert(SA_EMAIL.into(), key.clone());
        v.grant_audience = GOOGLE_AUD.into();
        v.grant_scope = Some(CALENDAR.into());
        v.allowed_subjects = Some(["alice@acme.com".to_owned()].into());
        v.refuse_with = "unauthorized_client".into();
    });
    let dir = tempfile::tempdir().unwrap();
    let sa = service_account_json(&key, SA_EMAIL, &tok.url);
    let sa_path = write(dir.path(), "sa.json", &sa.to_string());
    let config = format!(
        "[providers.google]\npreset = \"google\"\nbase_url = \"{}\"\ngrant = \"jwt_bearer\"\n\
         service_account_file = \"{sa_path}\"\nscopes = [\"{CALENDAR}\"]\n{extra}\n",
        up.url
    );
    Google {
        tok,
        up,
        _dir: dir,
        config,
    }
}

#[tokio::test]
async fn google_domain_wide_delegation_end_to_end() {
    let g = google("jwt_subject_domains = [\"acme.com\"]").await;
    let sk = Sidekey::start(Options::with_providers(&g.config)).await;

    // The user's address is stored, normalised and shown; a bad one is refused.
    let u = put_user(&sk, "alice", json!({"email": "alice@ACME.com"})).await;
    assert_eq!(u["email"], "alice@acme.com");
    let r = sk.admin(Method::GET, "/v1/users/alice", None).await;
    assert_eq!(r.json()["email"], "alice@acme.com");
    sk.admin(
        Method::PUT,
        "/v1/users/alice2",
        Some(json!({"email": "alice@acme.com\r\nBcc: x"})),
    )
    .await
    .assert_error(400, "bad_request");

    let s = sk.token("alice", &["google"]).await;
    let r = sk
        .proxy(
            Method::GET,
            "/v1/proxy/google/calendar/v3/users/me/calendarList",
            &s,
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(g.tok.calls(), 1);
    let form = g.tok.last_form();
    assert_eq!(
        form["grant_type"],
        "urn:ietf:params:oauth:grant-type:jwt-bearer"
    );
    assert!(!form.contains_key("client_secret"));
    let at = g.up.last().bearer().unwrap();
    assert!(g.tok.is_valid_access(&at));
    // The assertion as Google documents it: kid, iss, sub, aud, scope, iat, exp.
    let assertion = &form["assertion"];
    let h = jsonwebtoken::decode_header(assertion).unwrap();
    assert_eq!(h.kid.as_deref(), Some(rsa_key().kid.as_str()));
    assert_eq!(h.alg, jsonwebtoken::Algorithm::RS256);
    let c = jsonwebtoken::dangerous::insecure_decode::<Value>(assertion)
        .unwrap()
        .claims;
    assert_eq!(c["iss"], SA_EMAIL);
    assert_eq!(c["sub"], "alice@acme.com");
    assert_eq!(c["aud"], GOOGLE_AUD);
    assert_eq!(c["scope"], CALENDAR);
    let (iat, exp) = (c["iat"].as_i64().unwrap(), c["exp"].as_i64().unwrap());
    assert!(exp > iat && exp - iat <= 3600);

    // Cached for the subject: no second exchange.
    for _ in 0..3 {
        let r = sk
            .proxy(
                Method::GET,
                "/v1/proxy/google/calendar/v3/users/me/calendarList",
                &s,
                "",
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(g.tok.calls(), 1);
    // The audit record names the subject.
    let audit = sk.audit_of_kind("proxy").await;
    assert!(
        audit.iter().all(|a| a["subject"] == "alice@acme.com"),
        "{audit:?}"
    );

    // Another domain: refused before any token call.
    put_user(&sk, "mallory", json!({"email": "mallory@evil.com"})).await;
    let s = sk.token("mallory", &["google"]).await;
    let r = sk
        .proxy(Method::GET, "/v1/proxy/google/calendar/v3/x", &s, "")
        .await;
    r.assert_error(403, "subject_not_allowed");
    assert_eq!(g.tok.calls(), 1);

    // No address: nothing to act for.
    let s = sk.token("bob", &["google"]).await;
    sk.proxy(Method::GET, "/v1/proxy/google/calendar/v3/x", &s, "")
        .await
        .assert_error(424, "credential_missing");

    // The organisation has not delegated for this user: grant_refused with
    // its sentence, the provider's own text kept back; the refusal is
    // remembered (no second token call).
    put_user(&sk, "carol", json!({"email": "carol@acme.com"})).await;
    let s = sk.token("carol", &["google"]).await;
    for _ in 0..2 {
        let r = sk
            .proxy(Method::GET, "/v1/proxy/google/calendar/v3/x", &s, "")
            .await;
        r.assert_error(424, "grant_refused");
        assert_eq!(
            r.json()["error"]["message"],
            "Your organisation hasn't let me use your Google account."
        );
        assert!(!r.text().contains("fake token endpoint"), "{}", r.text());
        assert!(!r.text().contains("unauthorized_client"), "{}", r.text());
    }
    assert_eq!(g.tok.calls(), 2);
    let audit = sk.audit_of_kind("proxy").await;
    assert!(
        audit
            .iter()
            .any(|a| a["subject"] == "carol@acme.com" && a["error"] == "grant_refused"),
        "{audit:?}"
    );

    // The refresh tool answers for a JWT bearer provider too.
    let s = sk.token("alice", &["google"]).await;
    let r = sk
        .proxy(Method::POST, "/v1/session/refresh", &s, "{}")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        ["refreshed", "active"]
            .contains(&r.json()["providers"]["google"]["status"].as_str().unwrap()),
        "{}",
        r.text()
    );

    // An upstream 401: one new exchange and one replay.
    g.tok.revoke_access(&at);
    let r = sk
        .proxy(
            Method::GET,
            "/v1/proxy/google/calendar/v3/users/me/calendarList",
            &s,
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_ne!(g.up.last().bearer().unwrap(), at);

    // No key, assertion or token anywhere the outside sees.
    let logs = sk.log_text();
    let audit = sk
        .admin(Method::GET, "/v1/audit?limit=1000", None)
        .await
        .text();
    let user = sk.admin(Method::GET, "/v1/users/alice", None).await.text();
    let providers = run_cli(
        sk.path(),
        &["providers", "--config", "config.toml"],
        &[],
        None,
    )
    .1;
    let mut secrets = vec![key_marker(rsa_key())];
    secrets.extend(
        g.tok
            .all_tokens()
            .into_iter()
            .filter(|t| t.starts_with("at-")),
    );
    secrets.extend(g.tok.jwt(|v| v.assertions.clone()));
    for s in &secrets {
        for (what, text) in [
            ("logs", &logs),
            ("audit", &audit),
            ("user", &user),
            ("providers", &providers),
        ] {
            assert!(!text.contains(s.as_str()), "{what} leaks {s}");
        }
    }
    if !sk.opts.on_postgres() {
        let disk = support::read_tree(&sk.path().join("data"));
        for s in &secrets {
            assert!(
                !support::contains(&disk, s),
                "the store holds {s} in the clear"
            );
        }
    }
}

#[tokio::test]
async fn salesforce_style_flow_with_a_pem_key() {
    let tok = TokenServer::start().await;
    let up = Upstream::start().await;
    require_valid_token(&up, &tok);
    tok.set_answer_field("instance_url", json!(up.url));
    let key = rsa_key_b().clone();
    tok.jwt(|v| {
        v.issuers.insert("3MVG9-consumer-key".into(), key.clone());
        v.grant_audience = "https://login.salesforce.com".into();
        v.grant_scope = None;
    });
    let dir = tempfile::tempdir().unwrap();
    // PKCS#1, as `openssl genrsa` writes it.
    let pem = write(dir.path(), "sf.pem", &key.pkcs1_pem());
    let cfg = format!(
        "[providers.salesforce]\npreset = \"salesforce\"\ntoken_url = \"{}\"\ngrant = \"jwt_bearer\"\n\
         client_id = \"3MVG9-consumer-key\"\njwt_key_file = \"{pem}\"\njwt_key_id = \"{}\"\n\
         [providers.salesforce.connection.instance_url]\nfrom = \"token\"\n\
         pattern = 'http://127\\.0\\.0\\.1:[0-9]{{1,5}}'\n",
        tok.url, key.kid
    );
    let sk = Sidekey::start(Options::with_providers(&cfg)).await;
    put_user(&sk, "dana", json!({"email": "dana@acme.com"})).await;
    let s = sk.token("dana", &["salesforce"]).await;
    let r = sk
        .proxy(Method::GET, "/v1/proxy/salesforce/sobjects", &s, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The instance URL came with the token and is where the call went.
    assert_eq!(up.last().path, "/services/data/v62.0/sobjects");
    let c = jsonwebtoken::dangerous::insecure_decode::<Value>(&tok.last_form()["assertion"])
        .unwrap()
        .claims;
    assert_eq!(c["iss"], "3MVG9-consumer-key");
    assert_eq!(c["sub"], "dana@acme.com");
    assert_eq!(c["aud"], "https://login.salesforce.com");
    assert!(c.get("scope").is_none(), "Salesforce takes no scope claim");
    assert!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap() <= 180);
    assert_eq!(tok.jwt(|v| v.exchanges["dana@acme.com"]), 1);
}

#[tokio::test]
async fn rs256_es256_and_ps256_keys_sign_verified_assertions() {
    let tok = TokenServer::start().await;
    let up = Upstream::start().await;
    require_valid_token(&up, &tok);
    let dir = tempfile::tempdir().unwrap();
    let keys = [
        ("rs", rsa_key().clone()),
        ("es", TestKey::ec()),
        ("ps", rsa_key_b().clone().with_alg("PS256")),
    ];
    let mut cfg = String::new();
    for (name, k) in &keys {
        let iss = format!("svc-{name}@example.com");
        let k2 = k.clone();
        tok.jwt(|v| {
            v.issuers.insert(iss.clone(), k2);
            v.grant_audience = tok.url.clone();
            v.grant_scope = Some("read".into());
        });
        let pem = write(dir.path(), &format!("{name}.pem"), &k.private_pem);
        cfg.push_str(&format!(
            "[providers.{name}]\nbase_url = \"{}\"\ntoken_url = \"{}\"\ngrant = \"jwt_bearer\"\n\
             jwt_alg = \"{}\"\njwt_issuer = \"{iss}\"\njwt_key_file = \"{pem}\"\njwt_key_id = \"{}\"\n\
             jwt_subject = \"{{user}}\"\nscopes = [\"read\"]\n\n",
            up.url, tok.url, k.alg, k.kid
        ));
    }
    let sk = Sidekey::start(Options::with_providers(&cfg)).await;
    let s = sk.token("erin", &["rs", "es", "ps"]).await;
    for (name, k) in &keys {
        let r = sk
            .proxy(Method::GET, &format!("/v1/proxy/{name}/items"), &s, "")
            .await;
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        let h = jsonwebtoken::decode_header(&tok.last_form()["assertion"]).unwrap();
        assert_eq!(format!("{:?}", h.alg), k.alg);
    }
    assert_eq!(tok.jwt(|v| v.exchanges["erin"]), 3);
    assert!(tok.jwt(|v| v.refused.clone()).is_empty());
}

/// Posts a jwt-bearer grant straight to the fake.
async fn post_grant(tok: &TokenServer, assertion: &str) -> support::Resp {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", support::jwt::JWT_BEARER)
        .append_pair("assertion", assertion)
        .finish();
    support::send(
        &support::plain_client(),
        Method::POST,
        &tok.url,
        &[("content-type", "application/x-www-form-urlencoded")],
        body,
    )
    .await
}

#[tokio::test]
async fn the_fake_refuses_what_a_real_server_refuses() {
    let tok = TokenServer::start().await;
    let key = rsa_key().clone();
    tok.jwt(|v| {
        v.issuers.insert("svc@example.com".into(), key.clone());
        v.grant_audience = "https://aud.example".into();
        v.client = Some(("test-client".into(), key.clone()));
    });
    let now = support::unix_now();
    let claims = |iat: i64, exp: i64, aud: &str| json!({"iss": "svc@example.com", "sub": "a@example.com", "aud": aud, "iat": iat, "exp": exp});
    // Another key under the trusted key's id: the signature must fail.
    let mut forged = rsa_key_b().clone();
    forged.kid = key.kid.clone();
    // A good one passes, so each refusal below is for its one fault.
    let r = post_grant(
        &tok,
        &sign(&key, &claims(now, now + 60, "https://aud.example")),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    for (why, a) in [
        (
            "expired",
            sign(&key, &claims(now - 600, now - 300, "https://aud.example")),
        ),
        (
            "future iat",
            sign(&key, &claims(now + 600, now + 900, "https://aud.example")),
        ),
        (
            "too long",
            sign(&key, &claims(now, now + 7200, "https://aud.example")),
        ),
        (
            "wrong aud",
            sign(&key, &claims(now, now + 60, "https://other.example")),
        ),
        (
            "other key",
            sign(&forged, &claims(now, now + 60, "https://aud.example")),
        ),
    ] {
        let r = post_grant(&tok, &a).await;
        assert_eq!(r.status, 400, "{why}: {}", r.text());
        assert_eq!(r.json()["error"], "invalid_grant", "{why}");
    }
    // A client assertion used twice is refused the second time.
    let ca = sign(
        &key,
        &json!({"iss": "test-client", "sub": "test-client", "aud": tok.url, "jti": "once",
                "iat": now, "exp": now + 60}),
    );
    let body = |a: &str| {
        url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair("client_id", "test-client")
            .append_pair(
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            )
            .append_pair("client_assertion", a)
            .finish()
    };
    let ct = [("content-type", "application/x-www-form-urlencoded")];
    let client = support::plain_client();
    let r = support::send(&client, Method::POST, &tok.url, &ct, body(&ca)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = support::send(&client, Method::POST, &tok.url, &ct, body(&ca)).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(tok.jwt(|v| v.refused.iter().any(|e| e.contains("jti reused"))));
}

#[tokio::test]
async fn a_wrong_audience_is_a_grant_refused() {
    let g = google("jwt_audience = \"https://wrong.example/token\"").await;
    let sk = Sidekey::start(Options::with_providers(&g.config)).await;
    put_user(&sk, "alice", json!({"email": "alice@acme.com"})).await;
    let s = sk.token("alice", &["google"]).await;
    sk.proxy(Method::GET, "/v1/proxy/google/calendar/v3/x", &s, "")
        .await
        .assert_error(424, "grant_refused");
    assert!(
        g.tok
            .jwt(|v| v.refused.iter().any(|e| e.contains("InvalidAudience"))),
        "{:?}",
        g.tok.jwt(|v| v.refused.clone())
    );
}

#[tokio::test]
async fn private_key_jwt_on_code_exchange_refresh_and_client_credentials() {
    let tok = TokenServer::start().await;
    let up = Upstream::start().await;
    require_valid_token(&up, &tok);
    let key = TestKey::ec();
    tok.jwt(|v| v.client = Some(("test-client".into(), key.clone())));
    let dir = tempfile::tempdir().unwrap();
    let pem = write(dir.path(), "client.pem", &key.private_pem);
    let auth = format!(
        "client_id = \"test-client\"\nclient_auth = \"private_key_jwt\"\njwt_alg = \"ES256\"\n\
         jwt_key_file = \"{pem}\"\njwt_key_id = \"{}\"\n",
        key.kid
    );
    let cfg = format!(
        "[providers.code]\nbase_url = \"{u}\"\ntoken_url = \"{t}\"\n\
         authorize_url = \"https://auth.example.com/authorize\"\n{auth}\n\
         [providers.app]\nbase_url = \"{u}\"\ntoken_url = \"{t}\"\ngrant = \"client_credentials\"\n{auth}\n",
        u = up.url,
        t = tok.url
    );
    let sk = Sidekey::start(Options::with_providers(&cfg).unbound_oauth()).await;

    // Code exchange.
    let r = sk
        .admin(
            Method::POST,
            "/v1/users/fay/oauth/code/start",
            Some(json!({"return_to": "https://app.example/settings"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let url = v["authorize_url"].as_str().unwrap();
    let state = v["state"].as_str().unwrap();
    tok.register_code(
        "code-fay",
        &query_param(url, "code_challenge").unwrap(),
        &query_param(url, "redirect_uri").unwrap(),
    );
    let r = sk
        .agent(
            Method::GET,
            &format!("/oauth/code/callback?code=code-fay&state={state}"),
            &[],
            "",
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    let check = |grant: &str| {
        let f = tok.last_form();
        assert_eq!(f["grant_type"], grant);
        assert!(
            !f.contains_key("client_secret"),
            "{grant}: no secret travels"
        );
        assert!(tok.last_basic().is_none());
        let c = jsonwebtoken::dangerous::insecure_decode::<Value>(&f["client_assertion"])
            .unwrap()
            .claims;
        assert_eq!(c["iss"], "test-client");
        assert_eq!(c["sub"], "test-client");
        assert_eq!(c["aud"], tok.url.as_str());
        assert!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap() <= 300);
        c["jti"].as_str().unwrap().to_owned()
    };
    let jti_1 = check("authorization_code");

    // Refresh (the stored token is due).
    tok.issue_refresh("rt-fay");
    sk.put_credential(
        "fay",
        "code",
        json!({"access_token": "stale", "refresh_token": "rt-fay", "expires_in": 1}),
    )
    .await;
    let s = sk.token("fay", &["code", "app"]).await;
    let r = sk.proxy(Method::GET, "/v1/proxy/code/me", &s, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let jti_2 = check("refresh_token");

    // Client credentials.
    let r = sk.proxy(Method::GET, "/v1/proxy/app/me", &s, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let jti_3 = check("client_credentials");
    assert!(jti_1 != jti_2 && jti_2 != jti_3 && jti_1 != jti_3);
    assert!(tok.jwt(|v| v.refused.clone()).is_empty());
    assert!(!sk.log_text().contains(&key_marker(&key)));
}

#[tokio::test]
async fn tenant_keys_through_the_admin_api() {
    let tok = TokenServer::start().await;
    let up = Upstream::start().await;
    require_valid_token(&up, &tok);
    let (ka, kb) = (rsa_key().clone(), rsa_key_b().clone());
    tok.jwt(|v| {
        v.issuers
            .insert("sa@globex.iam.gserviceaccount.com".into(), ka.clone());
        v.grant_audience = tok.url.clone();
        v.grant_scope = Some("read".into());
    });
    let cfg = format!(
        "[providers.gw]\nbase_url = \"{}\"\ntoken_url = \"{}\"\ngrant = \"jwt_bearer\"\nscopes = [\"read\"]\n",
        up.url, tok.url
    );
    let sk = Sidekey::start(Options::with_providers(&cfg)).await;
    put_user(
        &sk,
        "dave",
        json!({"email": "dave@globex.com", "tenant": "globex"}),
    )
    .await;
    let s = sk.token("dave", &["gw"]).await;
    // No key yet, configured or stored.
    sk.proxy(Method::GET, "/v1/proxy/gw/me", &s, "")
        .await
        .assert_error(424, "credential_missing");

    let put = |body: Value| {
        let sk = &sk;
        async move {
            sk.admin(Method::PUT, "/v1/tenants/globex/credentials/gw", Some(body))
                .await
        }
    };
    let sa = service_account_json(&ka, "sa@globex.iam.gserviceaccount.com", &tok.url);
    let r = put(json!({"service_account": sa})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["key_id"], ka.kid.as_str());
    let got = sk
        .admin(Method::GET, "/v1/tenants/globex/credentials/gw", None)
        .await;
    assert_eq!(got.json()["key_id"], ka.kid.as_str());
    assert_eq!(got.json()["issuer"], "sa@globex.iam.gserviceaccount.com");
    for text in [r.text(), got.text()] {
        assert!(
            !text.contains(&key_marker(&ka)) && !text.contains("PRIVATE KEY"),
            "{text}"
        );
    }
    let r = sk.proxy(Method::GET, "/v1/proxy/gw/me", &s, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let first = up.last().bearer().unwrap();

    // Replaced: the old key is no longer trusted, and the next call
    // exchanges with the new one instead of using the cached token.
    tok.jwt(|v| {
        v.issuers.clear();
        v.issuers.insert("svc2@globex.com".into(), kb.clone());
    });
    let r = put(json!({"jwt_key": {"issuer": "svc2@globex.com", "private_key_pem": kb.private_pem, "key_id": kb.kid}})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["key_id"], kb.kid.as_str());
    let r = sk.proxy(Method::GET, "/v1/proxy/gw/me", &s, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_ne!(up.last().bearer().unwrap(), first);
    assert_eq!(tok.jwt(|v| v.exchanges["dave@globex.com"]), 2);

    // Keys that cannot sign: a clear 400 naming the field.
    let small = TestKey::rsa(1024);
    let cases = [
        (
            json!({"jwt_key": {"issuer": "x@globex.com", "private_key_pem": small.private_pem}}),
            "jwt_key.private_key_pem is an RSA key of 1024 bits",
        ),
        (
            json!({"jwt_key": {"issuer": "x@globex.com", "private_key_pem": kb.public_pem}}),
            "jwt_key.private_key_pem is a public key",
        ),
        (
            json!({"jwt_key": {"issuer": "x@globex.com", "private_key_pem": "hello"}}),
            "jwt_key.private_key_pem is not a PEM private key",
        ),
        (
            json!({"jwt_key": {"private_key_pem": kb.private_pem}}),
            "jwt_key.issuer",
        ),
        (
            json!({"service_account": {"type": "service_account", "private_key": ka.private_pem}}),
            "service_account is not a service-account key: missing field client_email",
        ),
        (
            json!({"service_account": service_account_json(&small, "s@globex.com", &tok.url)}),
            "service_account private_key is an RSA key of 1024 bits",
        ),
        (
            json!({"service_account": service_account_json(&ka, "s@globex.com", "https://elsewhere.example/token")}),
            "service_account.token_uri",
        ),
    ];
    for (body, says) in cases {
        let r = put(body).await;
        r.assert_error(400, "bad_request");
        let m = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(m.contains(says), "{m:?} should say {says:?}");
        assert!(
            !m.contains(&key_marker(&small)) && !m.contains(&key_marker(&kb)),
            "{m}"
        );
    }
    // Only tenants hold keys, and a JWT bearer provider takes no tokens.
    sk.admin(
        Method::PUT,
        "/v1/users/dave/credentials/gw",
        Some(json!({"jwt_key": {"issuer": "x@globex.com", "private_key_pem": kb.private_pem}})),
    )
    .await
    .assert_error(400, "bad_request");
    sk.admin(
        Method::PUT,
        "/v1/users/dave/credentials/gw",
        Some(json!({"access_token": "at-by-hand"})),
    )
    .await
    .assert_error(400, "bad_request");
    let logs = sk.log_text();
    for k in [&ka, &kb, &small] {
        assert!(!logs.contains(&key_marker(k)), "logs leak a private key");
    }
}

#[tokio::test]
async fn bad_configured_keys_stop_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let small = write(dir.path(), "small.pem", &TestKey::rsa(1024).private_pem);
    let public = write(dir.path(), "public.pem", &rsa_key().public_pem);
    let rsa = write(dir.path(), "rsa.pem", &rsa_key().private_pem);
    for (keys, says) in [
        (
            format!("jwt_key_file = \"{small}\"\njwt_issuer = \"a@b.com\""),
            "is an RSA key of 1024 bits",
        ),
        (
            format!("jwt_key_file = \"{public}\"\njwt_issuer = \"a@b.com\""),
            "is a public key",
        ),
        (
            format!("jwt_key_file = \"{rsa}\"\njwt_issuer = \"a@b.com\"\njwt_alg = \"ES256\""),
            "needs a P-256 EC key",
        ),
        (
            format!("jwt_key_file = \"{rsa}\"\njwt_issuer = \"a@b.com\"\njwt_alg = \"HS256\""),
            "jwt_alg",
        ),
        (format!("jwt_key_file = \"{rsa}\""), "needs jwt_issuer"),
        (
            format!(
                "jwt_key_file = \"{rsa}\"\njwt_issuer = \"a@b.com\"\njwt_subject = \"{{name}}\""
            ),
            "jwt_subject",
        ),
    ] {
        let opts = Options::with_providers(&format!(
            "[providers.p]\nbase_url = \"https://api.example.com\"\ntoken_url = \"https://auth.example.com/token\"\ngrant = \"jwt_bearer\"\n{keys}\n"
        ));
        std::fs::write(dir.path().join("config.toml"), opts.config_text()).unwrap();
        let (code, _, err) = run_cli(
            dir.path(),
            &["check-config", "--config", "config.toml"],
            &[],
            None,
        );
        assert_eq!(code, 2, "{keys}: {err}");
        assert!(
            err.contains("[providers.p]") && err.contains(says),
            "{keys}: {err}"
        );
        assert!(!err.contains(&key_marker(rsa_key())), "{err}");
    }
    // A preset that documents no JWT bearer grant refuses it.
    let opts = Options::with_providers(&format!(
        "[providers.s]\npreset = \"slack\"\ngrant = \"jwt_bearer\"\njwt_key_file = \"{rsa}\"\njwt_issuer = \"a@b.com\"\n"
    ));
    std::fs::write(dir.path().join("config.toml"), opts.config_text()).unwrap();
    let (code, _, err) = run_cli(
        dir.path(),
        &["check-config", "--config", "config.toml"],
        &[],
        None,
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("documents no JWT bearer grant"), "{err}");
}

#[tokio::test]
async fn a_storm_makes_one_exchange_per_subject() {
    let g = google("").await;
    let users = ["alice", "amy", "ann", "abe"];
    g.tok.jwt(|v| {
        v.allowed_subjects = Some(users.iter().map(|u| format!("{u}@acme.com")).collect());
    });
    // Each exchange takes a while, so the callers pile up behind it.
    g.tok.set_mode(Mode::Slow(Duration::from_millis(400)));
    let opts = Options::with_providers(&g.config);
    let nodes: Vec<Sidekey> = if opts.on_postgres() {
        support::cluster::replicas(3, opts).await
    } else {
        vec![Sidekey::start(opts).await]
    };
    for u in users {
        put_user(&nodes[0], u, json!({"email": format!("{u}@acme.com")})).await;
    }
    let mut tokens = Vec::new();
    for u in users {
        tokens.push(nodes[0].token(u, &["google"]).await);
    }
    let nodes = Arc::new(nodes);
    let tokens = Arc::new(tokens);
    let statuses: Vec<u16> = futures_util::stream::iter(0..1000usize)
        .map(|i| {
            let nodes = nodes.clone();
            let tokens = tokens.clone();
            async move {
                let n = &nodes[i % nodes.len()];
                n.proxy(
                    Method::GET,
                    "/v1/proxy/google/calendar/v3/x",
                    &tokens[i % tokens.len()],
                    "",
                )
                .await
                .status
                .as_u16()
            }
        })
        .buffer_unordered(200)
        .collect()
        .await;
    assert!(
        statuses.iter().all(|s| *s == 200),
        "{:?}",
        statuses.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );
    let ex = g.tok.jwt(|v| v.exchanges.clone());
    for u in users {
        assert_eq!(ex[&format!("{u}@acme.com")], 1, "{ex:?}");
    }
    assert_eq!(g.tok.calls(), users.len());
}
