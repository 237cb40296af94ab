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

#[test]
fn every_preset_resolves_on_its_own() {
    for name in PRESETS {
        let ps = providers(&format!(
            "[providers.{name}]\npreset = \"{name}\"\nclient_id = \"id\"\nclient_secret = \"s3cr3t-value\"\n"
        ));
        let p = ps.get(name).unwrap();
        assert!(!p.display.is_empty(), "{name}");
        assert!(p.base.url.scheme() == "https", "{name}");
        for u in [&p.token_url, &p.authorize_url].into_iter().flatten() {
            assert_eq!(u.scheme(), "https", "{name}");
        }
        // Every placeholder is declared (resolve refuses otherwise), and
        // the description never carries the client secret.
        let d = p.describe().to_string();
        assert!(!d.contains("s3cr3t-value"), "{name}: {d}");
        assert_eq!(p.describe()["name"], *name);
    }
    assert_eq!(PRESETS.len(), 25);
}

#[test]
fn preset_quirks() {
    let ps = providers(
        r#"
[providers.notion]
preset = "notion"
[providers.github]
preset = "github"
[providers.shopify]
preset = "shopify"
[providers.discord]
preset = "discord"
[providers.twilio]
preset = "twilio"
[providers.atlassian]
preset = "atlassian"
[providers.dropbox]
preset = "dropbox"
[providers.notion2]
preset = "notion"
client_auth = "body"
headers = { "Notion-Version" = "2025-09-03" }
"#,
    );
    let n = ps.get("notion").unwrap();
    assert_eq!(n.client_auth, ClientAuth::Basic);
    assert_eq!(n.token_format, TokenFormat::Json);
    assert!(!n.pkce);
    assert_eq!(n.headers[0].0.as_str(), "notion-version");
    let n2 = ps.get("notion2").unwrap();
    assert_eq!(n2.client_auth, ClientAuth::Body);
    assert_eq!(n2.headers.len(), 1);
    assert_eq!(n2.headers[0].1, "2025-09-03");
    let g = ps.get("github").unwrap();
    assert!(g.headers.iter().any(|(k, _)| k == "x-github-api-version"));
    assert!(
        g.conventions
            .reauth_errors
            .contains(&"bad_refresh_token".to_string())
    );
    let s = ps.get("shopify").unwrap();
    assert_eq!(
        s.injected_header().map(|h| h.as_str()),
        Some("x-shopify-access-token")
    );
    assert!(s.token_params.contains(&("expiring".into(), "1".into())));
    let d = ps.get("discord").unwrap();
    let cred = sidekey_vault::Credential {
        access_token: Some(Secret::new("bot-token")),
        ..Default::default()
    };
    let (h, v) = d.credential_header(&cred).unwrap().unwrap();
    assert_eq!(h, http::header::AUTHORIZATION);
    assert_eq!(v, "Bot bot-token");
    assert!(matches!(ps.get("twilio").unwrap().inject, Injection::Basic));
    assert!(
        ps.get("atlassian")
            .unwrap()
            .authorize_params
            .contains(&("audience".into(), "api.atlassian.com".into()))
    );
    assert!(
        ps.get("dropbox")
            .unwrap()
            .authorize_params
            .contains(&("token_access_type".into(), "offline".into()))
    );
}

#[test]
fn config_problems_with_connections_and_shared_credentials() {
    let bad = |toml: &str| {
        let cfg = Config::parse(toml, Path::new("/x/config.toml"), Path::new("/x"));
        match cfg {
            Err(e) => e.join("\n"),
            Ok(cfg) => Providers::from_config(&cfg).unwrap_err().join("\n"),
        }
    };
    assert!(
        bad("[providers.x]\nbase_url = \"https://{tenant}.example.com\"\n")
            .contains("connection.tenant")
    );
    assert!(bad(
        "[providers.x]\nbase_url = \"https://{t}.example.com\"\n[providers.x.connection.t]\nfrom = \"nobody\"\npattern = 'a'\n"
    )
    .contains("from"));
    assert!(bad(
        "[providers.x]\nbase_url = \"https://{t}.example.com\"\n[providers.x.connection.t]\nfrom = \"user\"\npattern = '('\n"
    )
    .contains("pattern"));
    assert!(
        bad("[providers.x]\npreset = \"google_sheets\"\ncredential_from = \"google\"\n")
            .contains("credential_from")
    );
    assert!(bad(
        "[providers.g]\npreset = \"google\"\ncredential_from = \"h\"\n[providers.h]\npreset = \"gmail\"\ncredential_from = \"g\"\n"
    )
    .contains("credential_from"));
    assert!(
        bad("[providers.x]\npreset = \"github\"\nheaders = { Authorization = \"x\" }\n")
            .contains("headers")
    );
}

fn values(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn connection_values_build_urls() {
    let ps = providers(
        r#"
[providers.zendesk]
preset = "zendesk"
[providers.salesforce]
preset = "salesforce"
[providers.twilio]
preset = "twilio"
"#,
    );
    let z = ps.get("zendesk").unwrap();
    let v = values(&[("subdomain", "acme")]);
    z.check_connection(&v).unwrap();
    let b = z.base_for(&v).unwrap();
    assert_eq!(b.origin, "https://acme.zendesk.com");
    assert_eq!(b.path, "/api/v2");
    assert_eq!(
        z.token_url_for(&v).unwrap().unwrap().as_str(),
        "https://acme.zendesk.com/oauth/tokens"
    );
    assert_eq!(
        z.base_for(&values(&[])).unwrap_err(),
        ConnectionError::Missing("subdomain".into())
    );
    let uri = z
        .upstream_uri_at(&b, &check_path("/tickets.json").unwrap(), Some("a=1"), None)
        .unwrap();
    assert_eq!(
        uri.to_string(),
        "https://acme.zendesk.com/api/v2/tickets.json?a=1"
    );

    let s = ps.get("salesforce").unwrap();
    let v = values(&[("instance_url", "https://acme.my.salesforce.com")]);
    let b = s.base_for(&v).unwrap();
    assert_eq!(b.origin, "https://acme.my.salesforce.com");
    assert_eq!(b.path, "/services/data/v62.0");

    let t = ps.get("twilio").unwrap();
    let sid = format!("AC{}", "0123456789abcdef".repeat(2));
    let b = t.base_for(&values(&[("account_sid", &sid)])).unwrap();
    assert_eq!(b.path, format!("/2010-04-01/Accounts/{sid}"));
}

#[test]
fn hostile_connection_values_are_refused() {
    // A permissive pattern, so that the position rules and the URL checks
    // are what refuse; the presets' own patterns refuse all of it too.
    let ps = providers(
        r#"
[providers.host]
base_url = "https://{v}.example.com/api"
[providers.host.connection.v]
from = "user"
pattern = '(?s).*'
[providers.path]
base_url = "https://api.example.com/t/{v}/x"
[providers.path.connection.v]
from = "admin"
pattern = '(?s).*'
[providers.origin]
base_url = "{v}/api"
[providers.origin.connection.v]
from = "token"
pattern = '(?s).*'
[providers.zendesk]
preset = "zendesk"
[providers.salesforce]
preset = "salesforce"
"#,
    );
    let long = "a".repeat(65);
    let hostile: &[&str] = &[
        "",
        "evil.com/",
        "evil.com/x",
        "a.b",
        "evil.com#",
        "evil.com?",
        "x?y=1",
        "%2e",
        "%2e%2e",
        ".",
        "..",
        "a/../b",
        "user@evil.com",
        "@evil.com",
        "a:b@evil.com",
        "#frag",
        "a#b",
        "evil.com:443",
        "a:8080",
        "[::1]",
        "::1",
        "127.0.0.1",
        "\u{0430}cme",
        "ａcme",
        "acme\u{200b}",
        "ACME",
        "a b",
        "a\r\nHost: evil",
        "a\n",
        "a\\b",
        "a%00",
        "\0",
        "-acme",
        "acme-",
        &long,
        "http://evil.com",
        "https://evil.com/x",
        "https://u:p@x.salesforce.com",
        "https://x.salesforce.com.evil.com",
        "https://x.salesforce.com/",
        "https://x.salesforce.com?x",
        "https://X.SALESFORCE.COM",
        "javascript:alert(1)",
        "//evil.com",
        "%65vil",
        "a%2fb",
        "xn--80ak6aa92e",
    ];
    assert!(hostile.len() >= 30);
    let checked = |p: &Provider, v: &str| {
        let m = values(&[(p.connection[0].name.as_str(), v)]);
        p.check_connection(&m).is_ok() && p.base_for(&m).is_ok()
    };
    for name in ["host", "path", "origin", "zendesk", "salesforce"] {
        let p = ps.get(name).unwrap();
        for v in hostile {
            let ok = checked(p, v);
            // A few of these are plain and harmless where they stand (a
            // punycode label in a host; dots, digits or length in a path
            // segment). Nothing else passes anywhere.
            let harmless = match name {
                "host" => *v == "xn--80ak6aa92e",
                "path" => {
                    [
                        "a.b",
                        "127.0.0.1",
                        "xn--80ak6aa92e",
                        "ACME",
                        "-acme",
                        "acme-",
                    ]
                    .contains(v)
                        || *v == long
                }
                "zendesk" => *v == "xn--80ak6aa92e",
                // Any https origin is a well-formed origin: only the
                // pattern (as salesforce's below) can pick the hosts.
                "origin" => *v == "https://x.salesforce.com.evil.com",
                _ => false,
            };
            if harmless {
                continue;
            }
            assert!(!ok, "{name}: {v:?} accepted");
        }
    }
    // Acceptable values still are.
    assert!(checked(ps.get("host").unwrap(), "acme-1"));
    assert!(checked(ps.get("path").unwrap(), "team_1.x"));
    assert!(checked(
        ps.get("origin").unwrap(),
        "https://api.example.org"
    ));
    assert!(checked(
        ps.get("salesforce").unwrap(),
        "https://na40.salesforce.com"
    ));
    // Unknown fields are refused by name.
    assert_eq!(
        ps.get("zendesk")
            .unwrap()
            .check_connection(&values(&[("shop", "x")])),
        Err(ConnectionError::Unknown("shop".into()))
    );
}
