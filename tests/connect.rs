//! The hosted connect page and browser-bound OAuth, over HTTP: admin
//! links, the first view and its Continue claim (prefetches burn nothing),
//! page headers and cookie, ticket expiry and reuse, CSRF, disconnect,
//! callbacks refused in another browser, and the admin `oauth/start`
//! connect_url. tests/connect_confirm.rs covers `[connect] confirm`;
//! tests/connect_browser.rs drives the flow in a real Chromium.

use sidekey_testkit as support;

use http::Method;
use serde_json::json;
use support::connect::*;
use support::{Options, query_param};

#[tokio::test]
async fn admin_link_defaults_and_validation() {
    let fx = start(|o| o).await;
    let r = fx.link("alice", json!({})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    let url = v["connect_url"].as_str().unwrap();
    let ticket = url
        .strip_prefix(&format!("{}/connect/", fx.public))
        .unwrap_or_else(|| panic!("connect_url under public_url: {url}"));
    assert!(ticket.len() >= 22, "at least 128 bits: {ticket}");
    assert!(
        ticket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "URL-safe: {ticket}"
    );
    let exp = v["expires_at"].as_i64().unwrap();
    assert!(
        (exp - fx.sk.clock.now() - 600).abs() <= 2,
        "default ttl 600"
    );
    assert_eq!(
        v["providers"],
        json!(["crm", "custom", "other"]),
        "default: every OAuth-capable provider"
    );
    // Two links never share a ticket, and the store never holds it.
    let r2 = fx.link("alice", json!({})).await;
    assert_ne!(r2.json()["connect_url"], v["connect_url"]);
    fx.sk.app.store.flush().await.unwrap();
    let raw = support::read_tree(&fx.sk.dir.path().join("data"));
    assert!(!support::contains(&raw, ticket), "raw ticket on disk");

    let r = fx
        .link(
            "alice",
            json!({"providers": ["custom"], "ttl_secs": 120, "return_to": RETURN_TO, "user_label": "alice@example.com in Acme"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["providers"], json!(["custom"]));
    assert!((r.json()["expires_at"].as_i64().unwrap() - fx.sk.clock.now() - 120).abs() <= 2);

    fx.link("alice", json!({"providers": ["nope"]}))
        .await
        .assert_error(404, "unknown_provider");
    for bad in [
        json!({"providers": ["plain"]}),
        json!({"providers": []}),
        json!({"ttl_secs": 5}),
        json!({"ttl_secs": 86_401}),
        json!({"return_to": "javascript:alert(1)"}),
        json!({"user_label": "two\nlines"}),
        json!({"user_label": ""}),
        json!({"surprise": true}),
        json!([]),
    ] {
        fx.link("alice", bad.clone())
            .await
            .assert_error(400, "bad_request");
    }
    fx.sk
        .admin(Method::POST, "/v1/users/a%20b/connect", Some(json!({})))
        .await
        .assert_error(400, "bad_request");
}

#[tokio::test]
async fn page_headers_cookie_statuses_and_no_secret() {
    let fx = start(|o| o).await;
    fx.sk
        .put_credential(
            "alice",
            "custom",
            json!({"access_token": "at-SECRET-page-1", "refresh_token": "rt-SECRET-page-1", "expires_in": 3600}),
        )
        .await;
    fx.sk
        .put_credential(
            "bob",
            "other",
            json!({"access_token": "at-SECRET-bob", "expires_in": 3600}),
        )
        .await;
    let path = fx
        .link_path(
            "alice",
            json!({"return_to": RETURN_TO, "user_label": "<b>alice</b> in Acme"}),
        )
        .await;
    let (cookie, r) = fx.claim(&path, None).await;
    assert_hardened(&r);
    let csp = header(&r, "content-security-policy");
    assert!(
        csp.contains("img-src 'self' https://cdn.acme.example"),
        "{csp}"
    );
    assert!(
        csp.contains(
            "form-action 'self' https://*.crm.example https://auth.example.com https://login.other.example"
        ),
        "{csp}"
    );
    let html = r.text();
    for want in [
        "Connect your accounts",
        "&lt;b&gt;alice&lt;/b&gt; in Acme",
        "Acme Calendar",
        "Reads and books &lt;meetings&gt; for you",
        "Connected",
        "Not connected",
        "Reconnect",
        "Disconnect",
        "Done — back to Acme",
        "href=\"https://app.example/settings\"",
        "href=\"/connect/assets/style.css\"",
        "src=\"https://cdn.acme.example/logo.svg\"",
    ] {
        assert!(html.contains(want), "page lacks {want:?}:\n{html}");
    }
    assert!(!html.contains("<b>alice"), "label escaped");
    assert!(!html.contains("<script"), "no script");
    assert!(!html.contains("style=\""), "no inline style");
    assert!(!html.contains("<style"), "no inline style");
    for secret in [
        "at-SECRET-page-1",
        "rt-SECRET-page-1",
        "test-client-secret",
        "at-SECRET-bob",
        cookie.as_str(),
    ] {
        assert!(!html.contains(secret), "page shows a secret");
    }
    // The stylesheet carries the accent colour and a readable text colour.
    let css = fx.get("/connect/assets/style.css", None).await;
    assert_eq!(css.status, 200);
    assert_eq!(header(&css, "content-type"), "text/css; charset=utf-8");
    assert_eq!(header(&css, "x-content-type-options"), "nosniff");
    assert!(
        css.text()
            .contains("--accent: #0f766e; --on-accent: #ffffff")
    );
    assert!(
        css.text().contains(":focus-visible"),
        "keyboard focus styles"
    );

    // The same browser may come back; any other browser may not.
    let again = fx.get(&path, Some(&cookie)).await;
    assert_html(&again, 200);
    no_cookie(&again);
    let other = fx.get(&path, None).await;
    assert_html(&other, 403);
    assert_hardened(&other);
    no_cookie(&other);
    assert!(other.text().contains("already used"), "{}", other.text());
    let forged = "A".repeat(43);
    let other = fx.get(&path, Some(&forged)).await;
    assert_html(&other, 403);
    no_cookie(&other);
    assert!(!other.text().contains("name=\"csrf\""));
}

#[tokio::test]
async fn unknown_and_expired_tickets_set_no_cookie() {
    let fx = start(|o| o).await;
    for path in [
        format!("/connect/{}", "Q".repeat(43)),
        "/connect/short".into(),
        "/connect/%3Cscript%3E".into(),
        format!("/connect/{}/elsewhere", "Q".repeat(43)),
    ] {
        let r = fx.get(&path, None).await;
        assert_html(&r, 404);
        assert_hardened(&r);
        no_cookie(&r);
        assert!(!r.text().contains("<script>"));
    }
    let path = fx.link_path("alice", json!({"ttl_secs": 60})).await;
    let (cookie, opened) = fx.claim(&path, None).await;
    let csrf = csrf_of(&opened.text());
    fx.sk.clock.advance(61);
    for c in [None, Some(cookie.as_str())] {
        let r = fx.get(&path, c).await;
        assert_html(&r, 410);
        no_cookie(&r);
        assert!(r.text().contains("expired"));
    }
    let r = fx
        .post_form(
            &format!("{path}/connect"),
            Some(&cookie),
            &[("csrf", &csrf), ("provider", "custom")],
        )
        .await;
    assert_html(&r, 410);
    // A never-opened link that expired is refused the same way.
    let fresh = fx.link_path("alice", json!({"ttl_secs": 60})).await;
    fx.sk.clock.advance(61);
    let r = fx.get(&fresh, None).await;
    assert_html(&r, 410);
    no_cookie(&r);
}

#[tokio::test]
async fn disconnect_needs_the_binding_and_a_csrf_token() {
    let fx = start(|o| o).await;
    fx.sk
        .put_credential(
            "carol",
            "custom",
            json!({"access_token": "at-SECRET-carol", "refresh_token": "rt-SECRET-carol"}),
        )
        .await;
    let path = fx.link_path("carol", json!({})).await;
    let (cookie, r) = fx.claim(&path, None).await;
    let csrf = csrf_of(&r.text());
    // The first press asks; the question's form is the one that removes.
    let asked = fx
        .get(&format!("{path}?disconnect=custom"), Some(&cookie))
        .await;
    assert!(
        asked
            .text()
            .contains(&format!("action=\"{path}/disconnect\"")),
        "a Disconnect form"
    );
    assert_eq!(csrf_of(&asked.text()), csrf);
    // A second link for the same user, opened by the same browser: its
    // token does not work on the first.
    let path2 = fx.link_path("carol", json!({})).await;
    let csrf2 = csrf_of(&fx.claim(&path2, Some(&cookie)).await.1.text());
    assert_ne!(csrf, csrf2);
    let other_cookie = fx
        .claim(&fx.link_path("eve", json!({})).await, None)
        .await
        .0;

    let disconnect = format!("{path}/disconnect");
    let wrong = "x".repeat(43);
    for (why, c, form) in [
        (
            "no token",
            Some(cookie.as_str()),
            vec![("provider", "custom")],
        ),
        (
            "wrong token",
            Some(cookie.as_str()),
            vec![("csrf", wrong.as_str()), ("provider", "custom")],
        ),
        (
            "another link's token",
            Some(cookie.as_str()),
            vec![("csrf", csrf2.as_str()), ("provider", "custom")],
        ),
        (
            "no cookie",
            None,
            vec![("csrf", csrf.as_str()), ("provider", "custom")],
        ),
        (
            "another browser's cookie",
            Some(other_cookie.as_str()),
            vec![("csrf", csrf.as_str()), ("provider", "custom")],
        ),
    ] {
        let r = fx.post_form(&disconnect, c, &form).await;
        assert_html(&r, 403);
        assert_hardened(&r);
        assert_eq!(fx.cred_status("carol", "custom").await, 200, "{why}: kept");
    }
    let r = fx
        .post_form(
            &disconnect,
            Some(&cookie),
            &[("csrf", &csrf), ("provider", "plain")],
        )
        .await;
    assert_html(&r, 400);
    let r = fx.get(&disconnect, Some(&cookie)).await;
    assert_eq!(r.status, 405, "a GET never changes anything");
    assert_eq!(fx.cred_status("carol", "custom").await, 200);

    let r = fx
        .post_form(
            &disconnect,
            Some(&cookie),
            &[("csrf", &csrf), ("provider", "custom")],
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_hardened(&r);
    assert_eq!(
        location(&r),
        format!("{}{path}?disconnected=custom", fx.public)
    );
    assert_eq!(fx.cred_status("carol", "custom").await, 404, "gone");
    let page = fx
        .get(&format!("{path}?disconnected=custom"), Some(&cookie))
        .await;
    assert_html(&page, 200);
    let html = page.text();
    assert!(html.contains("Acme Calendar was disconnected"), "{html}");
    assert!(!html.contains("Reconnect"), "{html}");
    // The audit names the action, never the ticket.
    fx.sk.app.audit.sync().await;
    let audit = fx
        .sk
        .admin(Method::GET, "/v1/audit?user=carol", None)
        .await
        .text();
    assert!(audit.contains("/connect/{ticket}/disconnect"), "{audit}");
    assert!(!audit.contains(path.trim_start_matches("/connect/")));
}

#[tokio::test]
async fn callback_completes_only_in_the_bound_browser() {
    let fx = start(|o| o).await;
    let path = fx
        .link_path(
            "dana",
            json!({"providers": ["custom"], "return_to": RETURN_TO}),
        )
        .await;
    let (cookie, r) = fx.claim(&path, None).await;
    let csrf = csrf_of(&r.text());
    let start = || async {
        let r = fx
            .post_form(
                &format!("{path}/connect"),
                Some(&cookie),
                &[("csrf", &csrf), ("provider", "custom")],
            )
            .await;
        assert_eq!(r.status, 303, "{}", r.text());
        assert_hardened(&r);
        let url = location(&r);
        assert!(
            url.starts_with("https://auth.example.com/authorize?"),
            "{url}"
        );
        assert_eq!(
            query_param(&url, "redirect_uri").unwrap(),
            format!("{}/oauth/custom/callback", fx.public)
        );
        assert_eq!(query_param(&url, "code_challenge_method").unwrap(), "S256");
        url
    };

    // A Connect form without the CSRF token starts nothing.
    let r = fx
        .post_form(
            &format!("{path}/connect"),
            Some(&cookie),
            &[("provider", "custom")],
        )
        .await;
    assert_html(&r, 403);

    // The authorize URL forwarded to someone else: their browser has no
    // binding cookie, so the callback is refused, nothing is exchanged or
    // stored, and the state is spent.
    let url = start().await;
    let state = query_param(&url, "state").unwrap();
    fx.expect_code(&url, "code-victim");
    let cb = format!("/oauth/custom/callback?code=code-victim&state={state}");
    for c in [None, Some("B".repeat(43))] {
        let r = fx.get(&cb, c.as_deref()).await;
        if c.is_none() {
            assert_html(&r, 403);
            assert_hardened(&r);
            assert!(r.text().contains("another browser"), "{}", r.text());
            assert!(!r.text().contains("code-victim"));
            assert!(r.headers.get("location").is_none(), "not sent to return_to");
        } else {
            // The state was consumed by the refused attempt.
            assert_html(&r, 400);
        }
    }
    assert_eq!(fx.tok.calls(), 0, "no code exchange");
    assert_eq!(
        fx.cred_status("dana", "custom").await,
        404,
        "nothing stored"
    );
    // Even the right browser cannot reuse the spent state.
    let r = fx.get(&cb, Some(&cookie)).await;
    assert_html(&r, 400);
    assert_eq!(fx.tok.calls(), 0);

    // In the bound browser it completes and lands back on the page.
    let url = start().await;
    fx.expect_code(&url, "code-dana");
    let state = query_param(&url, "state").unwrap();
    let r = fx
        .get(
            &format!("/oauth/custom/callback?code=code-dana&state={state}"),
            Some(&cookie),
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_hardened(&r);
    let back = location(&r);
    assert_eq!(back, format!("{}{path}?connected=custom", fx.public));
    assert_eq!(fx.cred_status("dana", "custom").await, 200, "stored");
    let page = fx
        .get(back.strip_prefix(&fx.public).unwrap(), Some(&cookie))
        .await;
    assert_html(&page, 200);
    let html = page.text();
    assert!(html.contains("Acme Calendar is now connected."), "{html}");
    assert!(html.contains("Status: </span>Connected"), "{html}");
    assert!(!html.contains("code-dana"));
    for t in fx.tok.all_tokens() {
        assert!(!html.contains(&t), "token on the page");
    }

    // A provider error comes back to the page in words.
    let url = start().await;
    let state = query_param(&url, "state").unwrap();
    let r = fx
        .get(
            &format!("/oauth/custom/callback?error=access_denied&state={state}"),
            Some(&cookie),
        )
        .await;
    assert_eq!(r.status, 303);
    let back = location(&r);
    assert_eq!(
        back,
        format!("{}{path}?error=access_denied&provider=custom", fx.public)
    );
    let html = fx
        .get(back.strip_prefix(&fx.public).unwrap(), Some(&cookie))
        .await
        .text();
    assert!(html.contains("Access denied"), "{html}");
    assert!(html.contains("role=\"alert\""), "{html}");
    for (q, words) in [
        ("error=state_expired&provider=custom", "The link expired"),
        ("error=exchange_failed&provider=custom", "try again"),
        ("error=%3Cscript%3E&provider=%3Cb%3E", "did not work"),
    ] {
        let html = fx.get(&format!("{path}?{q}"), Some(&cookie)).await.text();
        assert!(html.contains(words), "{q}: {html}");
        assert!(
            !html.contains("<script>") && !html.contains("<b>"),
            "{html}"
        );
    }
}

#[tokio::test]
async fn admin_start_connect_url_binds_the_browser() {
    let fx = start(|o| o).await;
    let fx = &fx;
    let start = |user: &'static str| async move {
        let r = fx
            .sk
            .admin(
                Method::POST,
                &format!("/v1/users/{user}/oauth/custom/start"),
                Some(json!({"return_to": RETURN_TO})),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let authorize = v["authorize_url"].as_str().unwrap().to_owned();
        fx.expect_code(&authorize, &format!("code-{user}"));
        (
            authorize,
            v["state"].as_str().unwrap().to_owned(),
            v["connect_url"].as_str().unwrap().to_owned(),
        )
    };

    // The bare authorize_url no longer completes (bind_browser defaults on).
    let (_, state, _) = start("erin").await;
    let r = fx
        .get(
            &format!("/oauth/custom/callback?code=code-erin&state={state}"),
            None,
        )
        .await;
    assert_html(&r, 403);
    assert_eq!(fx.tok.calls(), 0);
    assert_eq!(fx.cred_status("erin", "custom").await, 404);

    // Through connect_url: binding cookie, then 303 to the provider.
    let (authorize, state, connect_url) = start("frank").await;
    let path = connect_url.strip_prefix(&fx.public).unwrap().to_owned();
    // A HEAD (a link checker) binds nothing, even here.
    let r = fx.call(Method::HEAD, &path, None).await;
    assert_eq!(r.status, 200);
    no_cookie(&r);
    let r = fx.get(&path, None).await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(location(&r), authorize);
    assert_hardened(&r);
    let cookie = binding_cookie(&r);
    // Another browser opening the same link gets nothing.
    let r = fx.get(&path, None).await;
    assert_html(&r, 403);
    no_cookie(&r);
    let r = fx
        .get(
            &format!("/oauth/custom/callback?code=code-frank&state={state}"),
            Some(&cookie),
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(location(&r), RETURN_TO);
    assert_eq!(fx.cred_status("frank", "custom").await, 200);
}

#[tokio::test]
async fn bind_browser_false_lets_the_bare_url_complete_but_not_page_flows() {
    let fx = start(Options::unbound_oauth).await;
    let r = fx
        .sk
        .admin(
            Method::POST,
            "/v1/users/gina/oauth/custom/start",
            Some(json!({})),
        )
        .await;
    let v = r.json();
    assert!(v["connect_url"].is_string(), "still answered: {v}");
    let authorize = v["authorize_url"].as_str().unwrap();
    fx.expect_code(authorize, "code-gina");
    let state = v["state"].as_str().unwrap();
    let r = fx
        .get(
            &format!("/oauth/custom/callback?code=code-gina&state={state}"),
            None,
        )
        .await;
    assert_html(&r, 200);
    assert_eq!(fx.cred_status("gina", "custom").await, 200);

    // A flow started from the page is always bound.
    let path = fx.link_path("hugo", json!({})).await;
    let (cookie, r) = fx.claim(&path, None).await;
    let r = fx
        .post_form(
            &format!("{path}/connect"),
            Some(&cookie),
            &[("csrf", &csrf_of(&r.text())), ("provider", "custom")],
        )
        .await;
    let url = location(&r);
    fx.expect_code(&url, "code-hugo");
    let state = query_param(&url, "state").unwrap();
    let r = fx
        .get(
            &format!("/oauth/custom/callback?code=code-hugo&state={state}"),
            None,
        )
        .await;
    assert_html(&r, 403);
    assert_eq!(fx.cred_status("hugo", "custom").await, 404);
}

#[tokio::test]
async fn prefetch_burns_nothing() {
    let fx = start(|o| o).await;
    let path = fx
        .link_path(
            "ivan",
            json!({"providers": ["custom", "other"], "user_label": "ivan@acme.example"}),
        )
        .await;
    // A mail scanner, a chat preview and a link checker look first.
    let mut csrf = None;
    for _ in 0..3 {
        let r = fx.get(&path, None).await;
        assert_html(&r, 200);
        assert_hardened(&r);
        no_cookie(&r);
        let html = r.text();
        for want in [
            "Connect accounts for ivan@acme.example",
            "Acme Calendar and Other",
            "Continue",
            &format!("action=\"{path}/claim\""),
        ] {
            assert!(html.contains(want), "first view lacks {want:?}:\n{html}");
        }
        assert!(!html.contains("Disconnect"), "no page yet: {html}");
        // The same token each time: it depends on the link alone.
        let c = csrf_of(&html);
        assert_eq!(csrf.get_or_insert(c.clone()), &c);
    }
    let r = fx.call(Method::HEAD, &path, None).await;
    assert_eq!(r.status, 200);
    no_cookie(&r);
    // The real browser still claims it, and then it is its own.
    let (cookie, page) = fx.claim(&path, None).await;
    assert!(
        page.text().contains("Status: </span>Not connected"),
        "{}",
        page.text()
    );
    assert!(page.text().contains("ivan@acme.example"));
    let r = fx.get(&path, None).await;
    assert_html(&r, 403);
    no_cookie(&r);
    assert!(r.text().contains("already used"));
    assert_html(&fx.get(&path, Some(&cookie)).await, 200);

    // Without a label the first view and the page name the user id.
    let path = fx.link_path("user-42", json!({})).await;
    let r = fx.get(&path, None).await;
    assert!(
        r.text().contains("Connect accounts for user-42"),
        "{}",
        r.text()
    );
    let (_, page) = fx.claim(&path, None).await;
    assert!(
        page.text()
            .contains("Connecting accounts for <strong>user-42</strong>"),
        "{}",
        page.text()
    );
}

#[tokio::test]
async fn claim_needs_the_links_csrf_token_and_this_site() {
    let fx = start(|o| o).await;
    let path = fx.link_path("judy", json!({})).await;
    let csrf = csrf_of(&fx.get(&path, None).await.text());
    let other_path = fx.link_path("judy", json!({})).await;
    let other_csrf = csrf_of(&fx.get(&other_path, None).await.text());
    assert_ne!(csrf, other_csrf, "bound to the ticket");
    let claim = format!("{path}/claim");
    let wrong = "x".repeat(43);
    for (why, form, headers) in [
        ("no token", vec![], vec![]),
        ("wrong token", vec![("csrf", wrong.as_str())], vec![]),
        (
            "another link's token",
            vec![("csrf", other_csrf.as_str())],
            vec![],
        ),
        (
            "sent from another site",
            vec![("csrf", csrf.as_str())],
            vec![("sec-fetch-site", "cross-site")],
        ),
        (
            "another origin",
            vec![("csrf", csrf.as_str())],
            vec![("origin", "https://evil.example")],
        ),
    ] {
        let r = fx.post_form_with(&claim, None, &form, &headers).await;
        assert_html(&r, 403);
        assert_hardened(&r);
        no_cookie(&r);
        assert!(r.text().contains("This form has expired"), "{why}");
    }
    let r = fx.get(&claim, None).await;
    assert_eq!(r.status, 405, "a GET never claims");
    no_cookie(&r);
    // Nothing was claimed by any of them.
    let (cookie, _) = fx.claim(&path, None).await;
    // A second browser with the right token is too late.
    let r = fx.post_form(&claim, None, &[("csrf", &csrf)]).await;
    assert_html(&r, 403);
    no_cookie(&r);
    assert!(r.text().contains("already used"));
    let r = fx
        .post_form(&claim, Some(&"B".repeat(43)), &[("csrf", &csrf)])
        .await;
    assert_html(&r, 403);
    no_cookie(&r);
    // The owner pressing Continue again (Back button) just returns.
    let r = fx
        .post_form(&claim, Some(&cookie), &[("csrf", &csrf)])
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(binding_cookie(&r), cookie);
    // Unknown and expired links are refused without a cookie.
    let r = fx
        .post_form(
            &format!("/connect/{}/claim", "Q".repeat(43)),
            None,
            &[("csrf", &csrf)],
        )
        .await;
    assert_html(&r, 404);
    no_cookie(&r);
    fx.sk.clock.advance(601);
    let r = fx
        .post_form(
            &format!("{other_path}/claim"),
            None,
            &[("csrf", &other_csrf)],
        )
        .await;
    assert_html(&r, 410);
    no_cookie(&r);
}

#[tokio::test]
async fn state_at_another_providers_callback_is_refused_without_redirect() {
    let fx = start(|o| o).await;
    // An oauth/start flow: not sent to its return_to.
    let r = fx
        .sk
        .admin(
            Method::POST,
            "/v1/users/tom/oauth/custom/start",
            Some(json!({"return_to": RETURN_TO})),
        )
        .await;
    let v = r.json();
    let bound = fx
        .get(
            v["connect_url"]
                .as_str()
                .unwrap()
                .strip_prefix(&fx.public)
                .unwrap(),
            None,
        )
        .await;
    let cookie = binding_cookie(&bound);
    let state = v["state"].as_str().unwrap();
    let r = fx
        .get(
            &format!("/oauth/other/callback?code=x&state={state}"),
            Some(&cookie),
        )
        .await;
    assert_html(&r, 400);
    assert!(r.headers.get("location").is_none(), "no redirect");
    let r = fx
        .get(
            &format!("/oauth/custom/callback?code=x&state={state}"),
            Some(&cookie),
        )
        .await;
    assert_html(&r, 400);
    assert_eq!(fx.tok.calls(), 0);
    assert_eq!(fx.cred_status("tom", "custom").await, 404);

    // A page flow: its state's return_to is the connect link itself,
    // which must not be handed to whoever holds the state.
    let path = fx
        .link_path(
            "tom",
            json!({"providers": ["custom"], "return_to": RETURN_TO}),
        )
        .await;
    let (cookie, page) = fx.claim(&path, None).await;
    let url = fx.connect(&path, &cookie, &page, "code-tom").await;
    let state = query_param(&url, "state").unwrap();
    for c in [Some(cookie.as_str()), None] {
        let r = fx
            .get(
                &format!("/oauth/other/callback?code=code-tom&state={state}"),
                c,
            )
            .await;
        assert_html(&r, 400);
        assert_hardened(&r);
        assert!(r.headers.get("location").is_none(), "no redirect");
        assert!(
            !r.text().contains(path.trim_start_matches("/connect/")),
            "the ticket is not shown"
        );
    }
    assert_eq!(fx.tok.calls(), 0, "no code exchange");
    // The state was spent at the wrong callback.
    let r = fx
        .get(
            &format!("/oauth/custom/callback?code=code-tom&state={state}"),
            Some(&cookie),
        )
        .await;
    assert_html(&r, 400);
    assert!(r.text().contains("not valid"), "{}", r.text());
    assert_eq!(fx.tok.calls(), 0);
    assert_eq!(fx.cred_status("tom", "custom").await, 404);
}

// ----- the page's words, state by state ----------------------------------------

/// A claimed link for `user` with `custom` and `other`: its path, the
/// browser's cookie and the page's HTML.
async fn opened(fx: &Fx, user: &str) -> (String, String, String) {
    let path = fx
        .link_path(
            user,
            json!({"providers": ["custom", "other"], "return_to": RETURN_TO}),
        )
        .await;
    let (cookie, page) = fx.claim(&path, None).await;
    (path, cookie, page.text())
}

fn has_all(what: &str, html: &str, wants: &[&str]) {
    for w in wants {
        assert!(html.contains(w), "{what} lacks {w:?}:\n{html}");
    }
    assert_no_vault_name(what, html);
}

#[tokio::test]
async fn state_connected_in_words() {
    let fx = start(|o| o).await;
    fx.sk
        .put_credential(
            "cora",
            "custom",
            json!({"access_token": "at-SECRET-cora", "expires_in": 3600}),
        )
        .await;
    let (path, _, html) = opened(&fx, "cora").await;
    let r = row(&html, "custom");
    has_all(
        "connected row",
        &r,
        &[
            "class=\"provider connected\"",
            "<p class=\"status connected\"><span class=\"vh\">Status: </span>Connected</p>",
            "Reconnect<span class=\"vh\"> Acme Calendar</span>",
            &format!("href=\"{path}?disconnect=custom#confirm-custom\""),
        ],
    );
    assert!(!r.contains("class=\"reason\""), "nothing to explain: {r}");
    assert!(
        !r.contains("/disconnect\""),
        "no removing form before asking: {r}"
    );
    has_all(
        "page",
        &html,
        &[
            "Connecting accounts for <strong>cora</strong>. Acme uses them on your behalf",
            "Done — back to Acme",
        ],
    );
}

#[tokio::test]
async fn state_needs_reconnecting_gives_the_reason() {
    let fx = start(|o| o).await;
    fx.refused_refresh("rhea", "custom").await;
    let (_, _, html) = opened(&fx, "rhea").await;
    let r = row(&html, "custom");
    has_all(
        "needs-reconnecting row",
        &r,
        &[
            "class=\"provider reauth\"",
            "Status: </span>Needs reconnecting</p>",
            "<p class=\"reason\">Acme Calendar refused to renew access (it was revoked, or it ran out). Press Reconnect.</p>",
            "Reconnect",
            "Disconnect",
        ],
    );
    for secret in ["at-SECRET-stale", "rt-SECRET-dead", "invalid_grant"] {
        assert!(!html.contains(secret), "{secret} on the page");
    }
}

#[tokio::test]
async fn state_expired_gives_the_reason() {
    let fx = start(|o| o).await;
    fx.sk
        .put_credential(
            "egon",
            "custom",
            json!({"access_token": "at-SECRET-egon", "expires_at": 1_000_000}),
        )
        .await;
    let (_, _, html) = opened(&fx, "egon").await;
    has_all(
        "expired row",
        &row(&html, "custom"),
        &[
            "class=\"provider expired\"",
            "Status: </span>Expired</p>",
            "The access Acme Calendar granted has run out and cannot be renewed by itself. Press Reconnect.",
        ],
    );
}

#[tokio::test]
async fn state_not_connected_offers_connect_only() {
    let fx = start(|o| o).await;
    let (path, _, html) = opened(&fx, "nina").await;
    let r = row(&html, "other");
    has_all(
        "not-connected row",
        &r,
        &[
            "class=\"provider none\"",
            "Status: </span>Not connected</p>",
            &format!("action=\"{path}/connect\""),
            "Connect<span class=\"vh\"> Other</span>",
            // No preset, so no logo: the name's initial.
            "<span class=\"icon\" aria-hidden=\"true\">O</span>",
        ],
    );
    assert!(!r.contains("Disconnect") && !r.contains("Reconnect"), "{r}");
}

#[tokio::test]
async fn disconnect_asks_on_the_page_before_the_post_removes() {
    let fx = start(|o| o).await;
    fx.sk
        .put_credential(
            "dina",
            "custom",
            json!({"access_token": "at-SECRET-dina", "expires_in": 3600}),
        )
        .await;
    let (path, cookie, html) = opened(&fx, "dina").await;
    let csrf = csrf_of(&html);
    // The first press is a GET: it asks, and changes nothing.
    let asked = fx
        .get(&format!("{path}?disconnect=custom"), Some(&cookie))
        .await;
    assert_html(&asked, 200);
    assert_hardened(&asked);
    let r = row(&asked.text(), "custom");
    has_all(
        "the question",
        &r,
        &[
            "id=\"confirm-custom\" role=\"group\" aria-labelledby=\"confirm-custom-q\"",
            "<strong>Disconnect Acme Calendar?</strong> Acme will no longer be able to use your Acme Calendar account until you connect it again.",
            &format!("action=\"{path}/disconnect\""),
            "class=\"danger\" name=\"action\" value=\"disconnect\">Disconnect<span class=\"vh\"> Acme Calendar</span>",
            &format!("href=\"{path}#provider-custom\">Cancel"),
        ],
    );
    assert!(
        !r.contains("Reconnect"),
        "only the question's two answers: {r}"
    );
    assert_eq!(
        fx.cred_status("dina", "custom").await,
        200,
        "asking removes nothing"
    );
    // Only the link's providers with a credential are asked about.
    for q in ["disconnect=other", "disconnect=plain", "disconnect=%3Cb%3E"] {
        let html = fx.get(&format!("{path}?{q}"), Some(&cookie)).await.text();
        assert!(!html.contains("role=\"group\""), "{q}: {html}");
        assert!(!html.contains("<b>"), "{q}");
    }
    // Cancel is the page itself; the question's POST removes it.
    let r = fx
        .post_form(
            &format!("{path}/disconnect"),
            Some(&cookie),
            &[("csrf", &csrf), ("provider", "custom")],
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(fx.cred_status("dina", "custom").await, 404);
}

#[tokio::test]
async fn expired_link_page_names_the_app_and_links_back() {
    let fx = start(|o| o).await;
    let (path, cookie, _) = opened(&fx, "emil").await;
    fx.sk.clock.advance(601);
    let r = fx.get(&path, Some(&cookie)).await;
    assert_html(&r, 410);
    has_all(
        "expired link",
        &r.text(),
        &[
            "<h1>This link has expired</h1>",
            "Connect links last a few minutes. Go back to Acme and open a new one.",
            &format!("<a class=\"button primary\" href=\"{RETURN_TO}\">Back to Acme</a>"),
        ],
    );
}

#[tokio::test]
async fn used_link_page_names_the_app_and_links_back() {
    let fx = start(|o| o).await;
    let (path, ..) = opened(&fx, "ugo").await;
    let r = fx.get(&path, None).await;
    assert_html(&r, 403);
    has_all(
        "used link",
        &r.text(),
        &[
            "<h1>This link was already used</h1>",
            "otherwise ask Acme for a new link.",
            &format!("href=\"{RETURN_TO}\">Back to Acme</a>"),
        ],
    );
}

#[tokio::test]
async fn unknown_link_page_links_to_app_url_or_nowhere() {
    let fx = start(|o| o).await;
    let r = fx.get(&format!("/connect/{}", "Q".repeat(43)), None).await;
    assert_html(&r, 404);
    has_all(
        "unknown link",
        &r.text(),
        &[
            "<h1>This link is not valid</h1>",
            "Check that you opened the whole link, or go back to Acme and open a new one.",
        ],
    );
    assert!(
        !r.text().contains("Back to"),
        "no app_url, no link: {}",
        r.text()
    );
    let fx = start_with("app_url = \"https://acme.example/home\"", |o| o).await;
    let r = fx.get(&format!("/connect/{}", "Q".repeat(43)), None).await;
    assert!(
        r.text().contains(
            "<a class=\"button primary\" href=\"https://acme.example/home\">Back to Acme</a>"
        ),
        "{}",
        r.text()
    );
    // A link's own return_to comes first.
    let (path, ..) = opened(&fx, "uma").await;
    let r = fx.get(&path, None).await;
    assert!(
        r.text()
            .contains(&format!("href=\"{RETURN_TO}\">Back to Acme"))
    );
}

#[tokio::test]
async fn errors_after_the_callback_in_words_for_each_code() {
    let fx = start(|o| o).await;
    let (path, cookie, html) = opened(&fx, "erin").await;
    let csrf = csrf_of(&html);
    // Real callbacks first: each lands on the page with its code.
    let start_flow = || async {
        let r = fx
            .post_form(
                &format!("{path}/connect"),
                Some(&cookie),
                &[("csrf", &csrf), ("provider", "custom")],
            )
            .await;
        assert_eq!(r.status, 303, "{}", r.text());
        query_param(&location(&r), "state").unwrap()
    };
    for (query, code) in [
        ("error=access_denied", "access_denied"),
        ("error=server_error", "provider_error"),
        ("", "invalid_request"),
        ("code=never-issued", "exchange_refused"),
    ] {
        let state = start_flow().await;
        let r = fx
            .get(
                &format!("/oauth/custom/callback?{query}&state={state}"),
                Some(&cookie),
            )
            .await;
        assert_eq!(r.status, 303, "{code}: {}", r.text());
        assert_eq!(
            location(&r),
            format!("{}{path}?error={code}&provider=custom", fx.public)
        );
    }
    let again = "Press Connect to try again.";
    for (code, words) in [
        (
            "access_denied",
            format!("Access denied: Acme Calendar was not allowed access, so nothing was connected. {again}"),
        ),
        (
            "provider_error",
            format!("Acme Calendar reported an error, so nothing was connected. {again}"),
        ),
        (
            "state_expired",
            format!("The link expired: the Acme Calendar sign-in took too long. {again}"),
        ),
        (
            "invalid_state",
            format!("The answer from Acme Calendar was incomplete or already used, so nothing was connected. {again}"),
        ),
        (
            "invalid_request",
            format!("The answer from Acme Calendar was incomplete or already used, so nothing was connected. {again}"),
        ),
        (
            "invalid_signature",
            format!("The answer from Acme Calendar could not be verified, so nothing was connected. {again}"),
        ),
        (
            "exchange_refused",
            format!("Acme Calendar did not accept the sign-in, so nothing was connected. {again}"),
        ),
        (
            "exchange_failed",
            format!("Acme Calendar did not accept the sign-in, so nothing was connected. {again}"),
        ),
        (
            "bad_connection_value",
            "The Acme Calendar account details were not accepted, so nothing was connected. Check them and try again.".into(),
        ),
        (
            "store_failed",
            format!("The Acme Calendar connection could not be saved. {again}"),
        ),
        (
            "confirm_unavailable",
            "This link cannot finish connecting Acme Calendar: it has no way back to Acme. Ask it for a new link.".into(),
        ),
        (
            "something_new",
            "Connecting Acme Calendar did not work. Please try again.".into(),
        ),
    ] {
        let r = fx
            .get(&format!("{path}?error={code}&provider=custom"), Some(&cookie))
            .await;
        assert_html(&r, 200);
        has_all(
            code,
            &r.text(),
            &[&format!("<p class=\"notice err\" role=\"alert\">{words}</p>")],
        );
    }
    assert_eq!(fx.cred_status("erin", "custom").await, 404);
}

#[tokio::test]
async fn callback_pages_name_the_app_and_link_to_app_url() {
    let fx = start_with("app_url = \"https://acme.example/home\"", |o| o).await;
    let r = fx
        .get("/oauth/custom/callback?code=c1&state=bogus-state", None)
        .await;
    assert_html(&r, 400);
    assert_hardened(&r);
    has_all(
        "invalid callback",
        &r.text(),
        &[
            "<h1>This sign-in link is not valid</h1>",
            "Please start connecting again from Acme.",
            "href=\"https://acme.example/home\">Back to Acme</a>",
        ],
    );
    // Refused in another browser: the way back is app_url, never the
    // state's return_to (for a page flow, the connect link itself).
    let (path, cookie, html) = opened(&fx, "bo").await;
    let r = fx
        .post_form(
            &format!("{path}/connect"),
            Some(&cookie),
            &[("csrf", &csrf_of(&html)), ("provider", "custom")],
        )
        .await;
    let state = query_param(&location(&r), "state").unwrap();
    let r = fx
        .get(
            &format!("/oauth/custom/callback?code=c2&state={state}"),
            None,
        )
        .await;
    assert_html(&r, 403);
    has_all(
        "refused callback",
        &r.text(),
        &[
            "another browser",
            "href=\"https://acme.example/home\">Back to Acme</a>",
        ],
    );
    assert!(!r.text().contains(path.trim_start_matches("/connect/")));
}

#[tokio::test]
async fn without_app_name_every_page_says_the_app() {
    let fx = start_unbranded("", |o| o).await;
    let path = fx
        .link_path("tess", json!({"user_label": "tess@example.com in Acme"}))
        .await;
    let first = fx.get(&path, None).await.text();
    has_all(
        "first view",
        &first,
        &[
            "The app asks you to connect",
            "<title>Connect accounts for tess@example.com in Acme</title>",
        ],
    );
    let (cookie, page) = fx.claim(&path, None).await;
    let html = page.text();
    has_all(
        "page",
        &html,
        &[
            "Connecting accounts for <strong>tess@example.com in Acme</strong>. The app uses them on your behalf",
            "<title>Connect your accounts</title>",
            "When you are done, you can close this window.",
        ],
    );
    assert!(!html.contains("class=\"brand\""), "{html}");
    let css = fx.get("/connect/assets/style.css", None).await.text();
    assert!(
        css.contains("--accent: #2563eb; --on-accent: #ffffff"),
        "{css}"
    );
    assert!(css.contains("@media (prefers-color-scheme: dark)"), "{css}");
    assert_no_vault_name("stylesheet", &css);
    let other = fx.get(&path, None).await.text();
    has_all("used link", &other, &["ask the app for a new link"]);
    assert!(!other.contains("Back to"), "no return_to, no app_url");
    let forged = fx
        .post_form(&format!("{path}/claim"), Some(&cookie), &[("csrf", "x")])
        .await;
    assert_html(&forged, 403);
    has_all(
        "form expired",
        &forged.text(),
        &[
            "<h1>This form has expired</h1>",
            "Reload the connect page and try again.",
        ],
    );
    let r = fx
        .get("/oauth/custom/callback?code=c1&state=bogus-state", None)
        .await;
    has_all(
        "callback",
        &r.text(),
        &["Please start connecting again from the app."],
    );
    fx.sk.clock.advance(601);
    let r = fx.get(&path, Some(&cookie)).await;
    has_all(
        "expired",
        &r.text(),
        &["Go back to the app and open a new one."],
    );
}

/// A provider whose URLs need a value from the user (`from = "user"`) asks
/// for it in its Connect form, labelled; the server checks it before any
/// redirect (a bad or missing value comes back as the page's notice) and
/// builds the authorize URL from it.
#[tokio::test]
async fn the_page_asks_for_a_value_the_link_did_not_carry() {
    let fx = start(|o| o).await;
    let path = fx
        .link_path(
            "vera",
            json!({"providers": ["crm", "custom"], "return_to": RETURN_TO}),
        )
        .await;
    let (cookie, page) = fx.claim(&path, None).await;
    let html = page.text();
    let r = row(&html, "crm");
    has_all(
        "crm row",
        &r,
        &[
            "<label class=\"ask\" for=\"ask-crm-tenant\">Your Crm tenant</label>",
            "<input class=\"ask\" id=\"ask-crm-tenant\" name=\"connection.tenant\" required",
        ],
    );
    // A provider without such a field asks nothing.
    assert!(!row(&html, "custom").contains("class=\"ask\""));
    let csrf = csrf_of(&html);
    for bad in ["", "Evil.com/", "a.b", "x@y", "../a", &"a".repeat(21)] {
        let r = fx
            .post_form(
                &format!("{path}/connect"),
                Some(&cookie),
                &[
                    ("csrf", &csrf),
                    ("provider", "crm"),
                    ("connection.tenant", bad),
                ],
            )
            .await;
        assert_eq!(r.status, 303, "{bad:?}: {}", r.text());
        let to = location(&r);
        assert!(
            to.contains("error=bad_connection_value") && to.contains("provider=crm"),
            "{bad:?} → {to}"
        );
    }
    let back = fx
        .get(
            &format!("{path}?error=bad_connection_value&provider=crm"),
            Some(&cookie),
        )
        .await;
    assert!(
        back.text()
            .contains("The Crm account details were not accepted, so nothing was connected."),
        "{}",
        back.text()
    );
    let r = fx
        .post_form(
            &format!("{path}/connect"),
            Some(&cookie),
            &[
                ("csrf", &csrf),
                ("provider", "crm"),
                ("connection.tenant", "acme"),
            ],
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    let to = location(&r);
    assert!(
        to.starts_with("https://acme.crm.example/authorize?"),
        "{to}"
    );
    // A value the link carries is not asked for, and the page cannot
    // override it.
    let path = fx
        .link_path(
            "walt",
            json!({"providers": ["crm"], "connection": {"tenant": "fixed"}, "return_to": RETURN_TO}),
        )
        .await;
    let (cookie, page) = fx.claim(&path, None).await;
    assert!(!row(&page.text(), "crm").contains("class=\"ask\""));
    let r = fx
        .post_form(
            &format!("{path}/connect"),
            Some(&cookie),
            &[
                ("csrf", &csrf_of(&page.text())),
                ("provider", "crm"),
                ("connection.tenant", "other"),
            ],
        )
        .await;
    assert!(
        location(&r).starts_with("https://fixed.crm.example/authorize?"),
        "{}",
        location(&r)
    );
}
