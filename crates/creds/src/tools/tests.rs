use super::*;
use sidekey_base::config::Config;
use std::path::Path;

fn config(text: &str) -> Config {
    Config::parse(text, Path::new("config.toml"), Path::new(".")).unwrap()
}

const BASE: &str = r#"
[admin]
token_env = "T"
[store]
master_key_env = "K"
[sessions]
signing_key_env = "S"
[providers.google]
preset = "google"
tools = ["*"]
[providers.slack]
preset = "slack"
tools = ["post_message"]
[tools.get_thing]
provider = "google"
method = "GET"
path = "/things/{id}"
[tools.get_thing.params]
id = { type = "string", required = true }
n = { type = "integer", in = "query" }
kind = { type = "string", in = "query", enum = ["a", "b"] }
tags = { type = "array", in = "query" }
"#;

fn catalogue() -> Catalogue {
    let cfg = config(BASE);
    let providers = Providers::from_config(&cfg).unwrap();
    Catalogue::from_config(&cfg, &providers).unwrap()
}

#[test]
fn every_pack_parses() {
    for preset in crate::providers::PRESETS {
        if let Some(text) = pack_text(preset) {
            let pack = parse_pack(preset, text).unwrap_or_else(|e| panic!("{e:?}"));
            assert!(!pack.is_empty());
        }
    }
    assert!(preset_pack("google").len() >= 4);
    assert!(preset_pack("slack").len() >= 4);
    assert!(preset_pack("telegram").len() >= 2);
}

#[test]
fn packs_are_enabled_under_their_provider() {
    let cat = catalogue();
    assert!(cat.get("google_calendar_list_events").is_some());
    assert!(cat.get("google.calendar_list_events").is_some());
    assert_eq!(
        cat.get("calendar_list_events").unwrap().name,
        "google_calendar_list_events"
    );
    assert!(cat.get("slack_post_message").is_some());
    assert!(cat.get("slack_list_channels").is_none(), "not enabled");
}

#[test]
fn a_path_parameter_is_one_segment() {
    let cat = catalogue();
    let t = cat.get("get_thing").unwrap();
    let b = t.build(&json!({"id": "a b#c?d@e"})).unwrap();
    assert_eq!(b.path, "/things/a%20b%23c%3Fd%40e");
    for bad in ["../admin", "..", ".", "%2e%2e", "a/b", "a%2fb", ""] {
        let e = t.build(&json!({ "id": bad })).unwrap_err();
        assert_eq!(e, ArgError::BadSegment("id".into()), "{bad}");
    }
}

#[test]
fn arguments_are_checked_by_name() {
    let cat = catalogue();
    let t = cat.get("get_thing").unwrap();
    assert_eq!(
        t.build(&json!({})).unwrap_err(),
        ArgError::Missing("id".into())
    );
    assert_eq!(
        t.build(&json!({"id": "x", "n": "5"})).unwrap_err().param(),
        Some("n")
    );
    assert!(
        t.build(&json!({"id": "x", "kind": "c"}))
            .unwrap_err()
            .message()
            .contains("`kind` must be one of: a, b")
    );
    assert!(
        t.build(&json!({"id": "x", "path": "/admin"}))
            .unwrap_err()
            .message()
            .contains("`path` is not an argument")
    );
    assert_eq!(t.build(&json!([1])).unwrap_err(), ArgError::NotAnObject);
    let b = t
        .build(&json!({"id": "x", "n": 3, "kind": "a", "tags": ["p q", 2]}))
        .unwrap();
    assert_eq!(b.query.as_deref(), Some("kind=a&n=3&tags=p+q&tags=2"));
    assert!(b.body.is_none());
}

#[test]
fn body_parameters_make_a_json_object() {
    let cat = catalogue();
    let t = cat.get("slack_post_message").unwrap();
    let b = t
        .build(&json!({"channel": "C1", "text": "hi & bye"}))
        .unwrap();
    assert_eq!(b.method, Method::POST);
    assert_eq!(b.path, "/chat.postMessage");
    let body: Value = serde_json::from_slice(&b.body.unwrap()).unwrap();
    assert_eq!(body, json!({"channel": "C1", "text": "hi & bye"}));
    let schema = t.input_schema();
    assert_eq!(schema["required"], json!(["channel", "text"]));
}

#[test]
fn defaults_fill_in() {
    let cat = catalogue();
    let t = cat.get("google_calendar_list_events").unwrap();
    let b = t.build(&json!({})).unwrap();
    assert_eq!(b.path, "/calendar/v3/calendars/primary/events");
    assert!(b.query.unwrap().contains("maxResults=5"));
}

#[test]
fn unknown_pack_tools_are_named() {
    let text = BASE.replace(r#"tools = ["post_message"]"#, r#"tools = ["post_mesage"]"#);
    let cfg = config(&text);
    let providers = Providers::from_config(&cfg).unwrap();
    let e = Catalogue::from_config(&cfg, &providers).unwrap_err();
    assert!(
        e[0].contains("\"post_mesage\" is not a tool of the slack preset"),
        "{e:?}"
    );
}
