//! `[connect] confirm = true`, over HTTP: a completed callback keeps the
//! credential pending and sends the browser to `return_to?connect_code=`;
//! only the app's `POST /v1/users/{user}/connect/confirm` for the code's
//! user makes it active. A link forwarded before anyone opened it stores
//! nothing for the forwarder; wrong-user, reused and expired codes are 404
//! and store nothing; a pending credential is invisible and never replaces
//! the active one.

use sidekey_testkit as support;

use http::Method;
use serde_json::{Value, json};
use support::connect::*;
use support::query_param;

async fn confirming() -> Fx {
    start_with("confirm = true", |o| o).await
}

/// A page link for `user`, claimed and connected by a browser that did not
/// exist before (the one it was sent to); answers the code from where the
/// callback sent that browser, and the link's path and cookie.
async fn connect_in_new_browser(fx: &Fx, user: &str, code: &str) -> (String, String, String) {
    let path = fx
        .link_path(
            user,
            json!({"providers": ["custom"], "return_to": RETURN_TO, "user_label": format!("{user}@acme.example")}),
        )
        .await;
    let first = fx.get(&path, None).await;
    assert!(
        first
            .text()
            .contains(&format!("Connect accounts for {user}@acme.example")),
        "the first view names whose accounts: {}",
        first.text()
    );
    let (cookie, page) = fx.claim(&path, None).await;
    let url = fx.connect(&path, &cookie, &page, code).await;
    let state = query_param(&url, "state").unwrap();
    let r = fx
        .get(
            &format!("/oauth/custom/callback?code={code}&state={state}"),
            Some(&cookie),
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_hardened(&r);
    let to = location(&r);
    assert!(
        to.starts_with(&format!("{RETURN_TO}?connect_code=")),
        "{to}"
    );
    let connect_code = query_param(&to, "connect_code").unwrap();
    assert!(connect_code.len() >= 43, "256 bits: {connect_code}");
    (connect_code, path, cookie)
}

async fn confirm(fx: &Fx, user: &str, code: &str) -> support::Resp {
    fx.sk
        .admin(
            Method::POST,
            &format!("/v1/users/{user}/connect/confirm"),
            Some(json!({ "code": code })),
        )
        .await
}

/// What the proxy injects for `user` (or its error code).
async fn proxied_token(fx: &Fx, user: &str) -> Result<String, String> {
    let t = fx.sk.token(user, &["custom"]).await;
    let r = fx
        .sk
        .proxy(Method::GET, "/v1/proxy/custom/calendar", &t, "")
        .await;
    if r.status != 200 {
        return Err(r.error_code());
    }
    Ok(fx.up.last().bearer().unwrap_or_default())
}

async fn credentials(fx: &Fx, user: &str) -> Value {
    fx.sk
        .admin(Method::GET, &format!("/v1/users/{user}/credentials"), None)
        .await
        .json()
}

/// Nothing at all for `user`: no GET, no list entry, the proxy has none.
async fn assert_nothing_for(fx: &Fx, user: &str) {
    assert_eq!(fx.cred_status(user, "custom").await, 404, "{user}: GET");
    assert_eq!(credentials(fx, user).await, json!([]), "{user}: list");
    assert_eq!(
        proxied_token(fx, user).await,
        Err("credential_missing".into()),
        "{user}: the proxy"
    );
}

#[tokio::test]
async fn forwarded_link_stores_nothing_for_the_forwarder() {
    let fx = confirming().await;
    // Mallory's app hands her a link; she forwards it unopened to Vera,
    // whose browser claims it and connects Vera's account.
    let (code, path, cookie) = connect_in_new_browser(&fx, "mallory", "code-vera").await;
    assert_eq!(fx.tok.calls(), 1, "the code was exchanged");
    assert_nothing_for(&fx, "mallory").await;
    let page = fx.get(&path, Some(&cookie)).await;
    assert!(
        page.text().contains("Status: </span>Not connected"),
        "{}",
        page.text()
    );
    // Vera's browser lands in the app, where Vera (not Mallory) is logged
    // in: the app confirms for Vera, which is refused, and the code is
    // spent, so Mallory cannot confirm it afterwards either.
    confirm(&fx, "vera", &code)
        .await
        .assert_error(404, "not_found");
    confirm(&fx, "mallory", &code)
        .await
        .assert_error(404, "not_found");
    assert_nothing_for(&fx, "mallory").await;
    assert_nothing_for(&fx, "vera").await;
    // No token or code in the audit.
    fx.sk.app.audit.sync().await;
    let audit = fx.sk.admin(Method::GET, "/v1/audit", None).await.text();
    assert!(!audit.contains(&code), "{audit}");
    for t in fx.tok.all_tokens() {
        assert!(!audit.contains(&t));
    }
}

#[tokio::test]
async fn confirm_for_the_codes_user_makes_it_active_once() {
    let fx = confirming().await;
    let (code, path, cookie) = connect_in_new_browser(&fx, "nina", "code-nina").await;
    assert_nothing_for(&fx, "nina").await;
    let r = confirm(&fx, "nina", &code).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["user"], "nina");
    assert_eq!(v["provider"], "custom");
    assert_eq!(v["status"], "active");
    assert_eq!(v["has_refresh_token"], true);
    assert!(!r.text().contains("at-1-"), "no token: {}", r.text());
    assert_eq!(fx.cred_status("nina", "custom").await, 200);
    let token = proxied_token(&fx, "nina").await.unwrap();
    assert!(token.starts_with("at-1-"), "{token}");
    let page = fx.get(&path, Some(&cookie)).await;
    assert!(page.text().contains("Status: </span>Connected"));
    // The same code again: spent.
    confirm(&fx, "nina", &code)
        .await
        .assert_error(404, "not_found");
    assert_eq!(fx.cred_status("nina", "custom").await, 200, "still there");
}

#[tokio::test]
async fn wrong_user_confirm_burns_the_code() {
    let fx = confirming().await;
    let (code, ..) = connect_in_new_browser(&fx, "oscar", "code-oscar").await;
    confirm(&fx, "someone-else", &code)
        .await
        .assert_error(404, "not_found");
    assert_nothing_for(&fx, "someone-else").await;
    // The right user, too late: the wrong-user attempt spent it.
    confirm(&fx, "oscar", &code)
        .await
        .assert_error(404, "not_found");
    assert_nothing_for(&fx, "oscar").await;
}

#[tokio::test]
async fn pending_credential_is_invisible_and_keeps_the_active_one() {
    let fx = confirming().await;
    fx.sk
        .put_credential(
            "pia",
            "custom",
            json!({"access_token": "at-OLD-pia", "expires_in": 3600}),
        )
        .await;
    let before = fx
        .sk
        .admin(Method::GET, "/v1/users/pia/credentials/custom", None)
        .await
        .json();
    let (code, ..) = connect_in_new_browser(&fx, "pia", "code-pia").await;
    // Nothing of the pending one shows: the metadata, the list and the
    // proxy are those of the credential pia had.
    let now = fx
        .sk
        .admin(Method::GET, "/v1/users/pia/credentials/custom", None)
        .await
        .json();
    assert_eq!(now, before);
    assert_eq!(now["has_refresh_token"], false);
    assert_eq!(credentials(&fx, "pia").await.as_array().unwrap().len(), 1);
    assert_eq!(proxied_token(&fx, "pia").await.unwrap(), "at-OLD-pia");
    // Confirmed, it replaces the old one.
    let r = confirm(&fx, "pia", &code).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["has_refresh_token"], true);
    assert!(
        proxied_token(&fx, "pia")
            .await
            .unwrap()
            .starts_with("at-1-")
    );
}

#[tokio::test]
async fn unconfirmed_codes_expire_and_are_collected() {
    let fx = confirming().await;
    let (first, ..) = connect_in_new_browser(&fx, "quinn", "code-quinn-1").await;
    let (second, ..) = connect_in_new_browser(&fx, "quinn", "code-quinn-2").await;
    // Codes last ten minutes.
    fx.sk.clock.advance(601);
    confirm(&fx, "quinn", &first)
        .await
        .assert_error(404, "not_found");
    assert_nothing_for(&fx, "quinn").await;
    // Garbage collection removes the other expired record, sealed
    // secrets and all.
    let removed = fx
        .sk
        .app
        .store
        .gc_pending_credentials(fx.sk.clock.now())
        .await
        .unwrap();
    assert_eq!(removed, 1);
    confirm(&fx, "quinn", &second)
        .await
        .assert_error(404, "not_found");
    assert_nothing_for(&fx, "quinn").await;
}

#[tokio::test]
async fn admin_start_link_also_waits_for_confirmation() {
    let fx = confirming().await;
    // The code needs somewhere to go.
    fx.sk
        .admin(
            Method::POST,
            "/v1/users/rita/oauth/custom/start",
            Some(json!({})),
        )
        .await
        .assert_error(400, "bad_request");
    fx.link("rita", json!({}))
        .await
        .assert_error(400, "bad_request");

    let r = fx
        .sk
        .admin(
            Method::POST,
            "/v1/users/rita/oauth/custom/start",
            Some(json!({"return_to": "https://app.example/done?tab=accounts"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    fx.expect_code(v["authorize_url"].as_str().unwrap(), "code-rita");
    let path = v["connect_url"]
        .as_str()
        .unwrap()
        .strip_prefix(&fx.public)
        .unwrap()
        .to_owned();
    // Made for the app's immediate redirect: the first GET binds.
    let r = fx.get(&path, None).await;
    assert_eq!(r.status, 303, "{}", r.text());
    let cookie = binding_cookie(&r);
    let state = v["state"].as_str().unwrap();
    let r = fx
        .get(
            &format!("/oauth/custom/callback?code=code-rita&state={state}"),
            Some(&cookie),
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    let to = location(&r);
    assert!(
        to.starts_with("https://app.example/done?tab=accounts&connect_code="),
        "{to}"
    );
    assert_nothing_for(&fx, "rita").await;
    let r = confirm(&fx, "rita", &query_param(&to, "connect_code").unwrap()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(fx.cred_status("rita", "custom").await, 200);
}

#[tokio::test]
async fn confirm_bodies_are_checked() {
    let fx = confirming().await;
    let path = "/v1/users/sam/connect/confirm";
    for bad in [
        json!({}),
        json!({"code": ""}),
        json!({"code": "x", "user": "sam"}),
        json!([]),
    ] {
        fx.sk
            .admin(Method::POST, path, Some(bad))
            .await
            .assert_error(400, "bad_request");
    }
    fx.sk
        .admin(
            Method::POST,
            "/v1/users/a%20b/connect/confirm",
            Some(json!({"code": "x"})),
        )
        .await
        .assert_error(400, "bad_request");
    confirm(&fx, "sam", &"Q".repeat(43))
        .await
        .assert_error(404, "not_found");
    fx.sk
        .admin(Method::GET, path, None)
        .await
        .assert_error(405, "method_not_allowed");
}

#[tokio::test]
async fn page_while_the_apps_confirm_is_pending_in_words() {
    let fx = confirming().await;
    let (code, path, cookie) = connect_in_new_browser(&fx, "polly", "code-polly").await;
    // Until the app confirms, the page shows what is stored: nothing yet,
    // with a Connect button; no word of the vault behind the app.
    let html = fx.get(&path, Some(&cookie)).await.text();
    let r = row(&html, "custom");
    for want in [
        "class=\"provider none\"",
        "Status: </span>Not connected</p>",
        "Connect<span class=\"vh\"> Acme Calendar</span>",
        "Done — back to Acme",
    ] {
        assert!(r.contains(want) || html.contains(want), "{want}:\n{html}");
    }
    assert!(!html.contains(&code), "the code is the app's");
    assert_no_vault_name("page while pending", &html);
    // Confirmed by the app, the same page says Connected.
    assert_eq!(confirm(&fx, "polly", &code).await.status, 200);
    let html = fx.get(&path, Some(&cookie)).await.text();
    assert!(
        row(&html, "custom").contains("Status: </span>Connected</p>"),
        "{html}"
    );
}
