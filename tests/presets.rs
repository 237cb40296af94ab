//! Provider presets and their quirks against fakes that behave that way:
//! a credential shared by two providers (`credential_from`), Notion's Basic
//! client auth with a JSON token body and its version header, GitHub's
//! fixed headers and tokens without refresh, Salesforce's `instance_url`
//! from the token response, per-connection values given to the admin API
//! and OAuth start, and `sidekey providers`.
use sidekey_testkit as support;

use http::Method;
use serde_json::{Value, json};
use support::token::{Mode, TokenServer, require_valid_token};
use support::upstream::{Reply, Upstream};
use support::{Options, Sidekey, oauth_provider, run_cli};

async fn meta(sk: &Sidekey, user: &str, provider: &str) -> Value {
    let r = sk
        .admin(
            Method::GET,
            &format!("/v1/users/{user}/credentials/{provider}"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

#[tokio::test]
async fn google_sheets_uses_googles_credential_refreshed_once() {
    let tok = TokenServer::start().await;
    tok.issue_refresh("rt-seed");
    let up_g = Upstream::start().await;
    let up_s = Upstream::start().await;
    require_valid_token(&up_g, &tok);
    require_valid_token(&up_s, &tok);
    let cfg = format!(
        "{}[providers.google_sheets]\npreset = \"google_sheets\"\nbase_url = \"{}\"\ncredential_from = \"google\"\nallow = [\"GET /spreadsheets/**\"]\n",
        oauth_provider("google", &up_g.url, &tok.url, "preset = \"google\""),
        up_s.url
    );
    let sk = Sidekey::start(Options::with_providers(&cfg)).await;
    sk.put_credential(
        "alice",
        "google",
        json!({"access_token": "stale", "refresh_token": "rt-seed", "expires_in": 1}),
    )
    .await;
    let s = sk.token("alice", &["google"]).await;

    // Due for refresh: the first call (to sheets) refreshes google's
    // credential once; the next (to google) uses the same new token.
    let r = sk
        .proxy(
            Method::GET,
            "/v1/proxy/google_sheets/spreadsheets/abc",
            &s,
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = sk
        .proxy(Method::GET, "/v1/proxy/google/calendar/v3/x", &s, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tok.calls(), 1);
    assert_eq!(up_s.last().path, "/spreadsheets/abc");
    assert_eq!(up_s.last().bearer(), up_g.last().bearer());
    // Stored under google only.
    assert_eq!(meta(&sk, "alice", "google").await["status"], "active");
    let r = sk
        .admin(
            Method::GET,
            "/v1/users/alice/credentials/google_sheets",
            None,
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.text());

    // A 401 at the sheets host refreshes google's credential, once.
    tok.revoke_access(&up_s.last().bearer().unwrap());
    let r = sk
        .proxy(
            Method::GET,
            "/v1/proxy/google_sheets/spreadsheets/b",
            &s,
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tok.calls(), 2);
    let r = sk
        .proxy(Method::GET, "/v1/proxy/google/calendar/v3/y", &s, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tok.calls(), 2);
    assert_eq!(up_s.last().bearer(), up_g.last().bearer());

    // Sheets keeps its own allow list.
    sk.proxy(Method::GET, "/v1/proxy/google_sheets/other", &s, "")
        .await
        .assert_error(403, "path_not_allowed");
    // The credential is put under google, not under the sharer.
    let r = sk
        .admin(
            Method::PUT,
            "/v1/users/alice/credentials/google_sheets",
            Some(json!({"access_token": "x"})),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    // A session granting only sheets gets sheets, not google.
    let only = sk.token("alice", &["google_sheets"]).await;
    let r = sk
        .proxy(
            Method::GET,
            "/v1/proxy/google_sheets/spreadsheets/c",
            &only,
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    sk.proxy(Method::GET, "/v1/proxy/google/calendar/v3/x", &only, "")
        .await
        .assert_error(403, "provider_not_allowed");
}

#[tokio::test]
async fn notion_basic_auth_json_token_body_rotation_and_version_header() {
    let tok = TokenServer::start().await;
    tok.issue_refresh("rt-seed");
    let up = Upstream::start().await;
    require_valid_token(&up, &tok);
    let cfg = oauth_provider(
        "notion",
        &up.url,
        &tok.url,
        "preset = \"notion\"\nrefresh_cooldown_secs = 0",
    );
    let sk = Sidekey::start(Options::with_providers(&cfg)).await;
    sk.put_credential(
        "alice",
        "notion",
        json!({"access_token": "old", "refresh_token": "rt-seed", "expires_in": 1}),
    )
    .await;
    let s = sk.token("alice", &["notion"]).await;
    let r = sk
        .proxy(Method::GET, "/v1/proxy/notion/users/me", &s, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tok.calls(), 1);
    assert_eq!(
        tok.state.lock().unwrap().last_basic,
        Some(("test-client".into(), "test-client-secret".into()))
    );
    let form = tok.last_form();
    assert_eq!(
        form.get("grant_type").map(String::as_str),
        Some("refresh_token")
    );
    assert!(!form.contains_key("client_secret"), "{form:?}");
    assert_eq!(tok.last_content_type().as_deref(), Some("application/json"));
    assert_eq!(
        up.last().header("notion-version").as_deref(),
        Some("2022-06-28")
    );

    // The client's own version wins, sent once.
    let r = sk
        .agent(
            Method::GET,
            "/v1/proxy/notion/users/me",
            &[("x-sidekey-session", &s), ("notion-version", "2025-09-03")],
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.last();
    let versions: Vec<_> = seen.headers.get_all("notion-version").iter().collect();
    assert_eq!(versions, ["2025-09-03"]);

    // Rotation: rt-seed is spent; the refresh token Notion answered was
    // stored, so a forced refresh works again.
    let r = sk
        .agent(
            Method::POST,
            "/v1/session/refresh",
            &[
                ("x-sidekey-session", &s),
                ("content-type", "application/json"),
            ],
            json!({"provider": "notion"}).to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["providers"]["notion"]["status"],
        "refreshed",
        "{}",
        r.text()
    );
    assert_eq!(tok.calls(), 2);
    assert_eq!(tok.presented("rt-seed"), 1);
}

#[tokio::test]
async fn github_headers_and_tokens_without_refresh() {
    let tok = TokenServer::start().await;
    let up = Upstream::start().await;
    let cfg = oauth_provider("github", &up.url, &tok.url, "preset = \"github\"");
    let sk = Sidekey::start(Options::with_providers(&cfg)).await;
    // An OAuth App token: no refresh token, no expiry.
    sk.put_credential("alice", "github", json!({"access_token": "gho_app"}))
        .await;
    let s = sk.token("alice", &["github"]).await;
    let r = sk.proxy(Method::GET, "/v1/proxy/github/user", &s, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.last();
    assert_eq!(
        seen.header("accept").as_deref(),
        Some("application/vnd.github+json")
    );
    assert_eq!(
        seen.header("x-github-api-version").as_deref(),
        Some("2022-11-28")
    );
    assert_eq!(seen.bearer().as_deref(), Some("gho_app"));
    // A client's Accept wins.
    let r = sk
        .agent(
            Method::GET,
            "/v1/proxy/github/user",
            &[
                ("x-sidekey-session", &s),
                ("accept", "application/vnd.github.raw+json"),
            ],
            "",
        )
        .await;
    assert_eq!(r.status, 200);
    let accepts: Vec<_> = up
        .last()
        .headers
        .get_all("accept")
        .iter()
        .cloned()
        .collect();
    assert_eq!(accepts, ["application/vnd.github.raw+json"]);
    // Revoked: GitHub's 401 goes back as it is, no token call.
    up.set_handler(|_| Reply::Json(401, json!({"message": "Bad credentials"})));
    let r = sk.proxy(Method::GET, "/v1/proxy/github/user", &s, "").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["message"], "Bad credentials");
    assert_eq!(tok.calls(), 0);

    // A GitHub App token refreshed by an answer without a refresh token
    // keeps the one it had.
    up.set_handler(support::upstream::echo);
    tok.set_rotate(false);
    tok.set_no_refresh(true);
    tok.issue_refresh("ghr-seed");
    sk.put_credential(
        "bob",
        "github",
        json!({"access_token": "ghu_old", "refresh_token": "ghr-seed", "expires_in": 1}),
    )
    .await;
    let b = sk.token("bob", &["github"]).await;
    let r = sk.proxy(Method::GET, "/v1/proxy/github/user", &b, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tok.calls(), 1);
    assert_eq!(meta(&sk, "bob", "github").await["has_refresh_token"], true);
    // GitHub's dead refresh token: bad_refresh_token means reconnect.
    tok.set_mode(Mode::Error("bad_refresh_token".into()));
    sk.put_credential(
        "carol",
        "github",
        json!({"access_token": "ghu_c", "refresh_token": "ghr-seed", "expires_at": 1}),
    )
    .await;
    let c = sk.token("carol", &["github"]).await;
    sk.proxy(Method::GET, "/v1/proxy/github/user", &c, "")
        .await
        .assert_error(424, "reauth_required");
    assert_eq!(
        meta(&sk, "carol", "github").await["status"],
        "reauth_required"
    );
}

fn salesforce(tok: &TokenServer) -> String {
    format!(
        "[providers.salesforce]\npreset = \"salesforce\"\ntoken_url = \"{}\"\n\
         client_id = \"test-client\"\nclient_secret = \"test-client-secret\"\n\
         [providers.salesforce.connection.instance_url]\nfrom = \"token\"\n\
         pattern = 'http://127\\.0\\.0\\.1:[0-9]{{1,5}}'\n",
        tok.url
    )
}

#[tokio::test]
async fn salesforce_instance_url_comes_from_the_token_response() {
    let tok = TokenServer::start().await;
    tok.issue_refresh("rt-seed");
    let up = Upstream::start().await;
    tok.set_answer_field("instance_url", json!(up.url));
    let sk = Sidekey::start(Options::with_providers(&salesforce(&tok))).await;

    // Not yet known and not due: nothing to call yet.
    sk.put_credential("alice", "salesforce", json!({"access_token": "00Dx"}))
        .await;
    let s = sk.token("alice", &["salesforce"]).await;
    sk.proxy(Method::GET, "/v1/proxy/salesforce/sobjects", &s, "")
        .await
        .assert_error(424, "credential_missing");
    assert_eq!(up.count(), 0);

    // Due for refresh: the answer's instance_url is stored and used.
    sk.put_credential(
        "alice",
        "salesforce",
        json!({"access_token": "00Dy", "refresh_token": "rt-seed", "expires_in": 1}),
    )
    .await;
    let r = sk
        .proxy(Method::GET, "/v1/proxy/salesforce/sobjects", &s, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().path, "/services/data/v62.0/sobjects");
    assert_eq!(
        meta(&sk, "alice", "salesforce").await["connection"]["instance_url"],
        json!(up.url)
    );

    // A token response as Salesforce sends it, put by the app.
    let m = sk
        .put_credential(
            "bob",
            "salesforce",
            json!({"access_token": "00Dz", "token_type": "Bearer", "instance_url": up.url}),
        )
        .await;
    assert_eq!(m["connection"]["instance_url"], json!(up.url));
    let r = sk
        .admin(
            Method::PUT,
            "/v1/users/bob/credentials/salesforce",
            Some(json!({"access_token": "00Dz", "token_type": "Bearer", "instance_url": "https://evil.example.com"})),
        )
        .await;
    r.assert_error(400, "bad_connection_value");

    // A token endpoint answering a hostile instance_url: nothing stored,
    // the call fails with bad_connection_value.
    tok.issue_refresh("rt-two");
    tok.set_answer_field("instance_url", json!("https://evil.example.com"));
    sk.put_credential(
        "carol",
        "salesforce",
        json!({"access_token": "00Dc", "refresh_token": "rt-two", "expires_in": 1}),
    )
    .await;
    let c = sk.token("carol", &["salesforce"]).await;
    let before = up.count();
    sk.proxy(Method::GET, "/v1/proxy/salesforce/sobjects", &c, "")
        .await
        .assert_error(400, "bad_connection_value");
    assert_eq!(up.count(), before);
    let m = meta(&sk, "carol", "salesforce").await;
    assert_eq!(m["connection"], json!({}));
    assert_eq!(m["has_refresh_token"], true);
}

#[tokio::test]
async fn connection_values_through_the_admin_api_and_oauth_start() {
    let up = Upstream::start().await;
    let cfg = format!(
        "[providers.crm]\nbase_url = \"{}/t/{{tenant}}\"\n\
         [providers.crm.connection.tenant]\nfrom = \"admin\"\npattern = '[a-z0-9-]{{1,20}}'\n\
         [providers.zendesk]\npreset = \"zendesk\"\nclient_id = \"zd-client\"\n\
         [providers.shopify]\npreset = \"shopify\"\nclient_id = \"shop-client\"\n",
        up.url
    );
    let sk = Sidekey::start(Options::with_providers(&cfg)).await;
    let m = sk
        .put_credential(
            "alice",
            "crm",
            json!({"access_token": "t1", "connection": {"tenant": "acme"}}),
        )
        .await;
    assert_eq!(m["connection"], json!({"tenant": "acme"}));
    assert_eq!(
        meta(&sk, "alice", "crm").await["connection"]["tenant"],
        "acme"
    );
    let s = sk.token("alice", &["crm"]).await;
    let r = sk
        .proxy(Method::GET, "/v1/proxy/crm/deals?x=1", &s, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().path, "/t/acme/deals");

    // No value yet: 424.
    sk.put_credential("bob", "crm", json!({"access_token": "t2"}))
        .await;
    let b = sk.token("bob", &["crm"]).await;
    sk.proxy(Method::GET, "/v1/proxy/crm/deals", &b, "")
        .await
        .assert_error(424, "credential_missing");

    let long = "a".repeat(65);
    let hostile = [
        "",
        "evil.com/",
        "a/b",
        "..",
        ".",
        "%2e%2e",
        "a?b",
        "a#b",
        "a@b",
        "A",
        "\u{0430}",
        "a b",
        "a\r\nx",
        &long,
        "[::1]",
        "a:1",
    ];
    for v in hostile {
        let r = sk
            .admin(
                Method::PUT,
                "/v1/users/alice/credentials/crm",
                Some(json!({"access_token": "t3", "connection": {"tenant": v}})),
            )
            .await;
        r.assert_error(400, "bad_connection_value");
    }
    let r = sk
        .admin(
            Method::PUT,
            "/v1/users/alice/credentials/crm",
            Some(json!({"access_token": "t3", "connection": {"region": "eu"}})),
        )
        .await;
    r.assert_error(400, "bad_connection_value");
    let r = sk
        .admin(
            Method::PUT,
            "/v1/users/alice/credentials/crm",
            Some(json!({"access_token": "t3", "connection": {"tenant": 5}})),
        )
        .await;
    assert_eq!(r.status, 400);
    // The stored value is untouched by refused writes.
    assert_eq!(
        meta(&sk, "alice", "crm").await["connection"]["tenant"],
        "acme"
    );

    // OAuth start builds the authorize URL from the user's value.
    let start = |body: Value| {
        let sk = &sk;
        async move {
            sk.admin(
                Method::POST,
                "/v1/users/alice/oauth/zendesk/start",
                Some(body),
            )
            .await
        }
    };
    let r = start(json!({"connection": {"subdomain": "acme"}})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let url = r.json()["authorize_url"].as_str().unwrap().to_owned();
    assert!(
        url.starts_with("https://acme.zendesk.com/oauth/authorizations/new?"),
        "{url}"
    );
    assert!(url.contains("code_challenge="));
    start(json!({})).await.assert_error(400, "bad_request");
    for v in ["evil.com/", "a.b", "x@y", "-a", "ACME", &long] {
        start(json!({"connection": {"subdomain": v}}))
            .await
            .assert_error(400, "bad_connection_value");
    }
    // Shopify: no PKCE in its authorize URL.
    let r = sk
        .admin(
            Method::POST,
            "/v1/users/alice/oauth/shopify/start",
            Some(json!({"connection": {"shop": "acme-store"}})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let url = r.json()["authorize_url"].as_str().unwrap().to_owned();
    assert!(url.starts_with("https://acme-store.myshopify.com/admin/oauth/authorize?"));
    assert!(!url.contains("code_challenge"), "{url}");

    // Connect links take values too, checked the same way.
    let link = |v: &str| {
        let sk = &sk;
        let v = v.to_owned();
        async move {
            sk.admin(
                Method::POST,
                "/v1/users/alice/connect",
                Some(json!({"providers": ["zendesk"], "connection": {"subdomain": v}})),
            )
            .await
        }
    };
    assert_eq!(link("acme").await.status, 201);
    link("a.b").await.assert_error(400, "bad_connection_value");
}

#[tokio::test]
async fn providers_command_prints_every_preset_without_secrets() {
    let mut cfg = String::new();
    for name in [
        "google",
        "gmail",
        "google_sheets",
        "google_drive",
        "microsoft",
        "slack",
        "telegram",
        "notion",
        "hubspot",
        "salesforce",
        "zoom",
        "atlassian",
        "github",
        "linear",
        "airtable",
        "dropbox",
        "calendly",
        "asana",
        "shopify",
        "zendesk",
        "intercom",
        "discord",
        "whatsapp",
        "twilio",
        "stripe",
    ] {
        cfg.push_str(&format!(
            "[providers.{name}]\npreset = \"{name}\"\nclient_id = \"cid-{name}\"\nclient_secret_env = \"SECRET_{}\"\n",
            name.to_uppercase()
        ));
    }
    cfg.push_str("[providers.sheets]\npreset = \"google_sheets\"\ncredential_from = \"google\"\n");
    let opts = Options::with_providers(&cfg);
    let sk = Sidekey::start(opts.clone()).await;
    let mut env = opts.env.clone();
    for name in ["GOOGLE", "NOTION", "SLACK", "ZENDESK"] {
        env.push((
            format!("SECRET_{name}"),
            format!("very-secret-{name}-value"),
        ));
    }
    let cfg_path = sk.config_path();
    let (code, out, err) = run_cli(
        sk.path(),
        &["providers", "--config", cfg_path.to_str().unwrap()],
        &env,
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("very-secret"), "{out}");
    assert!(!out.contains("test-client-secret"));
    let v: Value = serde_json::from_str(&out).unwrap();
    let list = v["providers"].as_array().unwrap();
    assert_eq!(list.len(), 26);
    let get = |n: &str| list.iter().find(|p| p["name"] == n).unwrap().clone();
    let z = get("zendesk");
    assert_eq!(z["base_url"], "https://{subdomain}.zendesk.com/api/v2");
    assert_eq!(z["connection"]["subdomain"]["from"], "user");
    assert_eq!(
        get("salesforce")["connection"]["instance_url"]["from"],
        "token"
    );
    assert_eq!(get("twilio")["inject"]["kind"], "basic");
    assert_eq!(get("shopify")["inject"]["header"], "x-shopify-access-token");
    assert_eq!(get("discord")["inject"]["value"], "Bot {token}");
    assert_eq!(get("slack")["scope_separator"], ",");
    assert_eq!(get("notion")["client_auth"], "basic");
    assert_eq!(get("google")["client_secret_set"], true);
    assert_eq!(get("sheets")["credential_from"], "google");
    assert_eq!(get("telegram")["inject"]["kind"], "path_prefix");
}

/// Shopify's callback signature over the query, as Shopify computes it:
/// every parameter but `hmac`, sorted, form-encoded, HMAC-SHA256 with the
/// app's client secret, in hex.
fn shopify_signed(params: &[(&str, &str)], secret: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut sorted = params.to_vec();
    sorted.sort();
    let mut message = url_encoded(&sorted);
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(message.as_bytes());
    let sig: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    message.push_str("&hmac=");
    message.push_str(&sig);
    message
}

fn url_encoded(params: &[(&str, &str)]) -> String {
    // As URLSearchParams writes it, which is what Shopify signs.
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        q.append_pair(k, v);
    }
    q.finish()
}

/// Starts an admin OAuth flow and answers the authorization code it will
/// be exchanged with, returning the state.
async fn started(
    sk: &Sidekey,
    tok: &TokenServer,
    user: &str,
    provider: &str,
    body: Value,
    code: &str,
) -> String {
    let r = sk
        .admin(
            Method::POST,
            &format!("/v1/users/{user}/oauth/{provider}/start"),
            Some(body),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let url = v["authorize_url"].as_str().unwrap().to_owned();
    let q = |k: &str| {
        url::Url::parse(&url)
            .unwrap()
            .query_pairs()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.into_owned())
    };
    tok.register_code(
        code,
        &q("code_challenge").unwrap_or_default(),
        &q("redirect_uri").unwrap(),
    );
    v["state"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn shopify_callback_signature_is_checked_then_the_code_exchanged_without_pkce() {
    let tok = TokenServer::start().await;
    let up = Upstream::start().await;
    let cfg = format!(
        "{}[oauth]\nbind_browser = false\n",
        oauth_provider("shopify", &up.url, &tok.url, "preset = \"shopify\"")
    );
    let sk = Sidekey::start(Options::with_providers(&cfg)).await;
    let secret = "test-client-secret";
    let shop = json!({"connection": {"shop": "acme-store"}});
    let callback = |query: String| {
        let sk = &sk;
        async move {
            sk.agent(
                Method::GET,
                &format!("/oauth/shopify/callback?{query}"),
                &[],
                "",
            )
            .await
        }
    };

    // Forged answers: unsigned, signed with another secret, a changed
    // parameter, another shop correctly signed, two signatures. Each is
    // refused before any code exchange, and spends its state.
    type Forgery = Box<dyn Fn(&str) -> String>;
    let forged: Vec<Forgery> = vec![
        Box::new(|st| {
            url_encoded(&[
                ("code", "c1"),
                ("shop", "acme-store.myshopify.com"),
                ("state", st),
            ])
        }),
        Box::new(|st| {
            shopify_signed(
                &[
                    ("code", "c1"),
                    ("shop", "acme-store.myshopify.com"),
                    ("state", st),
                    ("timestamp", "1700000000"),
                ],
                "another-secret",
            )
        }),
        Box::new(|st| {
            shopify_signed(
                &[
                    ("code", "c1"),
                    ("shop", "acme-store.myshopify.com"),
                    ("state", st),
                    ("timestamp", "1700000000"),
                ],
                secret,
            )
            .replace("timestamp=1700000000", "timestamp=1700000001")
        }),
        Box::new(|st| {
            shopify_signed(
                &[
                    ("code", "c1"),
                    ("shop", "evil-store.myshopify.com"),
                    ("state", st),
                    ("timestamp", "1700000000"),
                ],
                secret,
            )
        }),
        Box::new(|st| {
            let q = shopify_signed(
                &[
                    ("code", "c1"),
                    ("shop", "acme-store.myshopify.com"),
                    ("state", st),
                ],
                secret,
            );
            format!("hmac=00&{q}")
        }),
    ];
    for (i, f) in forged.iter().enumerate() {
        let st = started(&sk, &tok, "alice", "shopify", shop.clone(), "c1").await;
        let r = callback(f(&st)).await;
        assert_eq!(r.status, 400, "forgery {i}: {}", r.text());
        assert!(r.text().contains("could not be verified"), "{}", r.text());
        assert_eq!(tok.calls(), 0, "forgery {i}: no code exchange");
        // The state was spent by the refused answer.
        let again = shopify_signed(
            &[
                ("code", "c1"),
                ("shop", "acme-store.myshopify.com"),
                ("state", &st),
            ],
            secret,
        );
        assert_eq!(callback(again).await.status, 400);
        assert_eq!(tok.calls(), 0);
    }
    let r = sk
        .admin(Method::GET, "/v1/users/alice/credentials/shopify", None)
        .await;
    assert_eq!(r.status, 404, "nothing stored: {}", r.text());

    // Signed as Shopify signs it: exchanged without a PKCE verifier, the
    // client secret in the body, Shopify's `expiring=1`.
    let st = started(&sk, &tok, "alice", "shopify", shop.clone(), "c-good").await;
    let r = callback(shopify_signed(
        &[
            ("code", "c-good"),
            ("host", "YWRtaW4uc2hvcGlmeS5jb20vc3RvcmUvYWNtZQ"),
            ("shop", "acme-store.myshopify.com"),
            ("state", &st),
            ("timestamp", "1700000000"),
        ],
        secret,
    ))
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tok.calls(), 1);
    let form = tok.last_form();
    assert!(!form.contains_key("code_verifier"), "{form:?}");
    assert_eq!(form.get("client_secret").map(String::as_str), Some(secret));
    assert_eq!(form.get("expiring").map(String::as_str), Some("1"));
    let m = meta(&sk, "alice", "shopify").await;
    assert_eq!(m["status"], "active", "{m}");
    assert_eq!(m["connection"]["shop"], "acme-store", "{m}");
    let s = sk.token("alice", &["shopify"]).await;
    let r = sk
        .proxy(Method::GET, "/v1/proxy/shopify/shop.json", &s, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // In Shopify's own header, the token the exchange issued.
    let sent = up.last().header("x-shopify-access-token").unwrap();
    assert!(tok.is_valid_access(&sent), "{sent}");
    assert!(up.last().bearer().is_none());
}

#[tokio::test]
async fn notion_code_exchange_is_json_with_basic_client_auth() {
    let tok = TokenServer::start().await;
    let up = Upstream::start().await;
    require_valid_token(&up, &tok);
    let cfg = format!(
        "{}[oauth]\nbind_browser = false\n",
        oauth_provider("notion", &up.url, &tok.url, "preset = \"notion\"")
    );
    let sk = Sidekey::start(Options::with_providers(&cfg)).await;
    let st = started(&sk, &tok, "bob", "notion", json!({}), "code-bob").await;
    let r = sk
        .agent(
            Method::GET,
            &format!("/oauth/notion/callback?code=code-bob&state={st}"),
            &[],
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tok.calls(), 1);
    assert_eq!(tok.last_content_type().as_deref(), Some("application/json"));
    assert_eq!(
        tok.last_basic(),
        Some(("test-client".into(), "test-client-secret".into()))
    );
    let form = tok.last_form();
    assert_eq!(
        form.get("grant_type").map(String::as_str),
        Some("authorization_code")
    );
    assert!(!form.contains_key("client_secret"), "{form:?}");
    assert_eq!(meta(&sk, "bob", "notion").await["status"], "active");
}
