use super::*;
use std::path::Path;

fn provider(toml: &str) -> Arc<Provider> {
    let cfg =
        sidekey_base::config::Config::parse(toml, Path::new("/x/c.toml"), Path::new("/x")).unwrap();
    crate::providers::Providers::from_config(&cfg)
        .unwrap()
        .iter()
        .next()
        .unwrap()
        .clone()
}

#[test]
fn slack_nested_user_token() {
    let p = provider("[providers.slack]\npreset = \"slack\"\nuser_scopes = [\"chat:write\"]\n");
    let json = serde_json::json!({
        "ok": true,
        "authed_user": {"id": "U1", "access_token": "xoxp-user", "refresh_token": "xoxe-1", "expires_in": 43200, "scope": "chat:write"}
    });
    let g = parse_grant(&json, &p, 1000).unwrap();
    assert_eq!(g.access_token.expose(), "xoxp-user");
    assert_eq!(g.refresh_token.unwrap().expose(), "xoxe-1");
    assert_eq!(g.expires_at, Some(44200));
}

#[test]
fn standard_grant() {
    let p = provider("[providers.g]\npreset = \"google\"\n");
    let json = serde_json::json!({"access_token": "ya29", "expires_in": "3599", "scope": "a b", "token_type": "Bearer"});
    let g = parse_grant(&json, &p, 1000).unwrap();
    assert_eq!(g.access_token.expose(), "ya29");
    assert!(g.refresh_token.is_none());
    assert_eq!(g.expires_at, Some(4599));
    assert_eq!(g.scopes.unwrap(), vec!["a", "b"]);
    assert!(parse_grant(&serde_json::json!({"token_type": "bearer"}), &p, 0).is_err());
    assert!(matches!(
        parse_grant(
            &serde_json::json!({"access_token": "t", "token_type": "DPoP"}),
            &p,
            0
        ),
        Err(TokenError::Unusable(_))
    ));
}

#[test]
fn codes_are_sanitized() {
    assert_eq!(sanitize_code("invalid_grant"), "invalid_grant");
    assert_eq!(sanitize_code("a\"b<script>"), "abscript");
}
