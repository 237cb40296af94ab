use super::*;

fn parse(text: &str) -> Result<Config, Vec<String>> {
    Config::parse(
        text,
        Path::new("/etc/sidekey/config.toml"),
        Path::new("/etc/sidekey"),
    )
}

#[test]
fn defaults_and_relative_paths() {
    let c = parse("").unwrap();
    assert_eq!(c.server.listen.port(), 8443);
    assert_eq!(c.server.public_url, "https://localhost:8443");
    assert_eq!(c.store.path, PathBuf::from("/etc/sidekey/data/sidekey.db"));
    assert_eq!(
        c.store.master_key,
        SecretSource::File(PathBuf::from("/etc/sidekey/data/master.key"))
    );
    assert_eq!(c.sessions.dynamic_variable, "secret__sidekey_session");
    assert_eq!(c.server.max_body_bytes, 1_048_576);
    assert!(!c.store.generate_missing);
}

#[test]
fn unknown_keys_are_errors_with_a_line() {
    let e = parse("[server]\nlisten = \"127.0.0.1:1\"\nlisten_addr = 3\n").unwrap_err();
    assert_eq!(e.len(), 1);
    assert!(e[0].contains("line 3"), "{e:?}");
    assert!(e[0].contains("listen_addr"), "{e:?}");
}

#[test]
fn collects_every_problem() {
    let e = parse(
        "[server]\nlisten = \"nope\"\nmax_body_bytes = 0\n[admin]\nlisten = \"0.0.0.0:9\"\n[sessions]\ndynamic_variable = \"session\"\n",
    )
    .unwrap_err();
    assert!(e.len() >= 4, "{e:?}");
    assert!(e.iter().any(|m| m.contains("[server] listen")));
    assert!(e.iter().any(|m| m.contains("max_body_bytes")));
    assert!(e.iter().any(|m| m.contains("[admin] listen")));
    assert!(e.iter().any(|m| m.contains("secret__")));
}

#[test]
fn unknown_keys_and_type_errors_are_reported_together() {
    let e = parse(
        "[server]\nmax_body_bytes = \"big\"\nlisten_addr = 3\n[store]\ngenerate_missing = \"yes\"\n[providers.x]\nbase_url = \"https://a\"\nscopes = [\n  1,\n]\nbase = 1\n",
    )
    .unwrap_err();
    assert_eq!(e.len(), 5, "{e:?}");
    for (line, what) in [
        ("line 2)", "max_body_bytes"),
        ("line 3)", "listen_addr"),
        ("line 5)", ""),
        ("line 11)", "base"),
    ] {
        assert!(
            e.iter().any(|m| m.contains(line) && m.contains(what)),
            "{line} {what}: {e:?}"
        );
    }
    assert!(
        e.iter()
            .any(|m| m.contains("line 8)") || m.contains("line 9)")),
        "{e:?}"
    );
    assert!(e[0].contains("line 2)"), "file order: {e:?}");
    assert!(
        !e.iter().any(|m| m.contains("big")),
        "values never echoed: {e:?}"
    );
}

#[test]
fn parse_error_does_not_echo_inline_secret() {
    let e =
        parse("[providers.x]\nbase_url = \"https://a\"\nclient_secret = 12345678\n").unwrap_err();
    assert!(!e[0].contains("12345678"), "{e:?}");
}

#[test]
fn connect_theming_and_bind_browser_are_validated() {
    let c = parse("").unwrap();
    assert!(c.oauth.bind_browser, "bound by default");
    assert!(!c.connect.confirm, "no confirmation step by default");
    assert_eq!(c.connect.accent_color, "#2563eb");
    assert!(
        parse("[connect]\nconfirm = true\n")
            .unwrap()
            .connect
            .confirm
    );
    let c = parse(
        "[oauth]\nbind_browser = false\n[connect]\napp_name = \"Acme\"\naccent_color = \"#0F8\"\nlogo_url = \"https://cdn.example/l.svg\"\n",
    )
    .unwrap();
    assert!(!c.oauth.bind_browser);
    assert!(c.warnings.iter().any(|w| w.contains("bind_browser")));
    assert_eq!(c.connect.accent_color, "#00ff88");
    assert_eq!(c.connect.app_name.as_deref(), Some("Acme"));
    let e = parse(
        "[connect]\napp_name = \"a\\nb\"\naccent_color = \"red;}body{x\"\nlogo_url = \"javascript:alert(1)\"\n[providers.x]\nbase_url = \"https://x.example\"\ndescription = \"\"\n",
    )
    .unwrap_err();
    for key in ["app_name", "accent_color", "logo_url", "description"] {
        assert!(e.iter().any(|m| m.contains(key)), "{key}: {e:?}");
    }
    assert!(parse("[connect]\nlogo_url = \"http://cdn.example/l.png\"\n").is_err());
    let e = parse("[connect]\napp_url = \"http://app.example\"\n").unwrap_err();
    assert!(
        e[0].contains("[connect] app_url") && e[0].contains("https://"),
        "{e:?}"
    );
    let c =
        parse("[connect]\napp_url = \"https://app.example/home\"\naccent_color = \"#ffeb3b\"\n");
    let c = c.unwrap().connect;
    assert_eq!(c.app_url.unwrap().as_str(), "https://app.example/home");
    assert_eq!(c.accent_text, "#000000", "black text on yellow");
}

#[test]
fn ids() {
    assert!(valid_id("u1"));
    assert!(valid_id("alice@example.com"));
    assert!(valid_id("a.b:c+d-e_f"));
    assert!(!valid_id(""));
    assert!(!valid_id("a/b"));
    assert!(!valid_id("a b"));
    assert!(!valid_id(&"x".repeat(129)));
    assert!(valid_id(&"x".repeat(128)));
}
