use super::*;
use std::path::Path;

fn providers(toml: &str) -> Providers {
    let cfg = Config::parse(toml, Path::new("/x/config.toml"), Path::new("/x")).unwrap();
    Providers::from_config(&cfg).unwrap()
}

#[test]
fn check_path_accepts_normal_paths() {
    for ok in [
        "",
        "/",
        "/chat.postMessage",
        "/calendar/v3/calendars/primary/events",
        "/a/b/",
        "/files/report%20final.pdf",
        "/users/me%40example.com",
        "/v1/x:y",
    ] {
        assert!(check_path(ok).is_ok(), "{ok}");
    }
    assert_eq!(check_path("/files/a%20b").unwrap().decoded(), "/files/a b");
}

#[test]
fn check_path_refuses_escapes() {
    for bad in [
        "/..",
        "/../etc/passwd",
        "/a/../../b",
        "/a/./b",
        "/%2e%2e/x",
        "/%2E%2E/x",
        "/.%2e/x",
        "/%252e%252e/x",
        "/%25252e%25252e/x",
        "/%2525252e%2525252e/x",
        "/%252525252e%252525252e/x",
        "/a%2fb",
        "/a%2Fb",
        "/a%252fb",
        "/a\\b",
        "/a%5cb",
        "/a%00b",
        "/a%0d%0aHost:%20evil",
        "//evil.com/x",
        "/a//b",
        "/@evil.com",
        "/%40evil.com",
        "/%c0%ae%c0%ae/x",
        "/%e0%80%ae/x",
        "/a/..;/b",
        "/a/%2e%2e%3b/b",
        "/%ff",
        "relative",
        "/a b",
    ] {
        assert!(check_path(bad).is_err(), "{bad} should be refused");
    }
}

#[test]
fn presets_fill_and_keys_override() {
    let ps = providers(
        r#"
[providers.slack]
preset = "slack"
[providers.google]
preset = "google"
base_url = "http://127.0.0.1:9999/google"
[providers.telegram]
preset = "telegram"
"#,
    );
    let s = ps.get("slack").unwrap();
    assert_eq!(s.base.origin, "https://slack.com");
    assert_eq!(s.base.path, "/api");
    assert_eq!(s.display, "Slack");
    assert!(
        s.conventions
            .ok_false_auth_errors
            .contains(&"token_expired")
    );
    let g = ps.get("google").unwrap();
    assert_eq!(g.base.origin, "http://127.0.0.1:9999");
    assert_eq!(g.base.path, "/google");
    assert_eq!(
        g.token_url.as_ref().unwrap().as_str(),
        "https://oauth2.googleapis.com/token"
    );
    assert!(
        g.authorize_params
            .contains(&("access_type".into(), "offline".into()))
    );
    let t = ps.get("telegram").unwrap();
    assert!(matches!(t.inject, Injection::PathPrefix { .. }));
    assert!(!t.can_refresh());
}

#[test]
fn http_only_for_loopback_or_allow_http() {
    let cfg = Config::parse(
        "[providers.x]\nbase_url = \"http://api.example.com\"\n",
        Path::new("/x/c.toml"),
        Path::new("/x"),
    )
    .unwrap();
    let e = Providers::from_config(&cfg).unwrap_err();
    assert!(e[0].contains("allow_http"), "{e:?}");
    let ps = providers("[providers.x]\nbase_url = \"http://api.example.com\"\nallow_http = true\n");
    assert!(ps.get("x").is_some());
    providers("[providers.x]\nbase_url = \"http://localhost:1/\"\n");
    providers("[providers.x]\nbase_url = \"http://[::1]:1/\"\n");
}

#[test]
fn upstream_uri_styles() {
    let ps = providers(
        r#"
[providers.t]
base_url = "https://api.telegram.org"
inject = { path_prefix = "/bot{token}" }
[providers.q]
base_url = "https://maps.example.com/api/"
inject = { query = "key" }
"#,
    );
    let tok = Secret::new("123:ABC");
    let t = ps.get("t").unwrap();
    let path = check_path("/sendMessage").unwrap();
    assert_eq!(
        t.upstream_uri(&path, Some("chat_id=1"), Some(&tok))
            .unwrap()
            .to_string(),
        "https://api.telegram.org/bot123:ABC/sendMessage?chat_id=1"
    );
    let q = ps.get("q").unwrap();
    let path = check_path("/geocode").unwrap();
    let tok = Secret::new("k&y=1");
    assert_eq!(
        q.upstream_uri(&path, Some("key=attacker&a=1"), Some(&tok))
            .unwrap()
            .to_string(),
        "https://maps.example.com/api/geocode?a=1&key=k%26y%3D1"
    );
    assert_eq!(
        q.upstream_uri(&path, None, Some(&tok)).unwrap().to_string(),
        "https://maps.example.com/api/geocode?key=k%26y%3D1"
    );
    // The origin is parsed once, at start; the request's URI carries
    // it with a path that always begins with `/` (a request line needs
    // one, even for the root with only a query).
    let ps = providers(
        "[providers.r]\nbase_url = \"http://[::1]:8080/\"\n[providers.h]\nbase_url = \"http://127.0.0.1:9999\"\n",
    );
    for (name, authority) in [("r", "[::1]:8080"), ("h", "127.0.0.1:9999")] {
        let p = ps.get(name).unwrap();
        assert_eq!(p.base.authority.as_str(), authority);
        for (raw, query, want) in [
            ("", Some("a=1"), "/?a=1"),
            ("", None, "/"),
            ("/x/y", Some("b=2"), "/x/y?b=2"),
        ] {
            let path = check_path(raw).unwrap();
            let u = p.upstream_uri(&path, query, None).unwrap();
            assert_eq!(u.scheme_str(), Some("http"), "{name} {raw}");
            assert_eq!(u.authority().unwrap().as_str(), authority, "{name} {raw}");
            assert_eq!(u.path_and_query().unwrap().as_str(), want, "{name} {raw}");
        }
    }
}

#[test]
fn allow_globs() {
    let ps = providers(
        r#"
[providers.g]
base_url = "https://www.googleapis.com"
allow = ["GET /calendar/v3/**", "POST /chat.postMessage", "/files/*"]
"#,
    );
    let g = ps.get("g").unwrap();
    assert!(g.allows(&Method::GET, "/calendar/v3/calendars/primary/events"));
    assert!(!g.allows(&Method::POST, "/calendar/v3/calendars"));
    assert!(g.allows(&Method::POST, "/chat.postMessage"));
    assert!(!g.allows(&Method::GET, "/chat.postMessage"));
    assert!(g.allows(&Method::DELETE, "/files/a"));
    assert!(!g.allows(&Method::GET, "/files/a/b"));
    assert!(!g.allows(&Method::GET, "/"));
}

#[test]
fn injection_headers() {
    let ps = providers(
        r#"
[providers.h]
base_url = "https://x.example.com"
inject = { header = "X-Api-Key", value = "Token {token}" }
[providers.b]
base_url = "https://x.example.com"
inject = "basic"
"#,
    );
    let cred = sidekey_vault::Credential {
        access_token: Some(Secret::new("abc")),
        username: Some(Secret::new("user")),
        password: Some(Secret::new("pa:ss")),
        ..Default::default()
    };
    let mut h = HeaderMap::new();
    ps.get("h").unwrap().inject_headers(&mut h, &cred).unwrap();
    assert_eq!(h["x-api-key"], "Token abc");
    let mut h = HeaderMap::new();
    ps.get("b").unwrap().inject_headers(&mut h, &cred).unwrap();
    assert_eq!(h["authorization"], "Basic dXNlcjpwYTpzcw==");
    let bad = sidekey_vault::Credential {
        access_token: Some(Secret::new("a\r\nb")),
        ..Default::default()
    };
    let mut h = HeaderMap::new();
    assert_eq!(
        ps.get("h").unwrap().inject_headers(&mut h, &bad),
        Err(InjectError::BadValue)
    );
}
