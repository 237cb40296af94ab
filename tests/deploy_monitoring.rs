//! deploy/grafana-dashboard.json and deploy/prometheus-alerts.yml: the
//! dashboard parses, every metric either file queries is one sidekey really
//! exports (read from a running server's /metrics), and `promtool check
//! rules` accepts the rules (promtool: Debian's `prometheus` package; CI
//! installs it, and the test fails under CI=true without it).
use sidekey_testkit as support;

use std::collections::BTreeSet;
use std::process::Command;

use http::Method;
use serde_json::{Value, json};
use support::token::TokenServer;
use support::upstream::Upstream;
use support::{InProcess, Options, provider_toml};

fn repo_file(rel: &str) -> String {
    std::fs::read_to_string(format!("{}/{rel}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// Every `sidekey_…` token in a text (metric names in PromQL).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("sidekey_") {
        let tail = &rest[i..];
        let n = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..n].to_owned());
        rest = &tail[n..];
    }
    out
}

/// Names a Prometheus server scrapes from this exposition: sample names,
/// and the series names each `# TYPE` line implies.
fn exported(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let mut parts = t.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            match kind {
                "counter" => {
                    names.insert(format!("{}_total", name.trim_end_matches("_total")));
                }
                "histogram" => {
                    for s in ["bucket", "sum", "count"] {
                        names.insert(format!("{name}_{s}"));
                    }
                }
                _ => {
                    names.insert(name.to_owned());
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let n = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..n].to_owned());
        }
    }
    names
}

fn strings(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => {
            out.push_str(s);
            out.push('\n');
        }
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(o) => o.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

#[tokio::test]
async fn dashboard_and_alerts_use_only_exported_metrics() {
    let dashboard: Value = serde_json::from_str(&repo_file("deploy/grafana-dashboard.json"))
        .expect("deploy/grafana-dashboard.json parses");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8);
    for p in panels {
        let targets = p["targets"].as_array().expect("targets");
        assert!(
            targets
                .iter()
                .all(|t| t["expr"].as_str().is_some_and(|e| !e.is_empty())),
            "panel {} has a target without expr",
            p["title"]
        );
    }
    let mut dash_text = String::new();
    strings(&dashboard, &mut dash_text);
    let rules = repo_file("deploy/prometheus-alerts.yml");
    for alert in [
        "SidekeyRefreshFailures",
        "SidekeyReauthRequiredGrowing",
        "SidekeyUpstream5xx",
        "SidekeyUpstreamLatencyP99High",
        "SidekeyStoreUnavailable",
        "SidekeyAuditRecordsDropped",
    ] {
        assert!(
            rules.contains(&format!("alert: {alert}")),
            "{alert} missing"
        );
    }

    // A real server that has proxied a call, refreshed a token and taken a
    // webhook: the metrics as a Prometheus server scrapes them (labelled
    // families appear with their first sample).
    let up = Upstream::start().await;
    let tokens = TokenServer::start().await;
    tokens.issue_refresh("rt-metrics");
    let sk = InProcess::start(Options::with_providers(&provider_toml(
        "custom",
        &up.url,
        &format!(
            "token_url = \"{}\"\nclient_id = \"test-client\"\nclient_secret = \"test-client-secret\"",
            tokens.url
        ),
    )))
    .await;
    sk.put_credential(
        "alice",
        "custom",
        json!({"access_token": "at-metrics", "refresh_token": "rt-metrics", "expires_in": 3600}),
    )
    .await;
    let t = sk.token("alice", &["custom"]).await;
    assert_eq!(
        sk.proxy(Method::GET, "/v1/proxy/custom/x", &t, "")
            .await
            .status,
        200
    );
    let r = sk
        .proxy(Method::POST, "/v1/session/refresh", &t, "{}")
        .await;
    assert_eq!(
        r.json()["providers"]["custom"]["status"],
        "refreshed",
        "{}",
        r.text()
    );
    let r = sk
        .agent(Method::POST, "/v1/elevenlabs/conversation-init", &[], "{}")
        .await;
    assert_eq!(r.status, 401);
    let r = sk.admin(Method::GET, "/metrics", None).await;
    assert_eq!(r.status, 200);
    let have = exported(&r.text());

    for (file, text) in [
        ("deploy/grafana-dashboard.json", dash_text.as_str()),
        ("deploy/prometheus-alerts.yml", rules.as_str()),
    ] {
        let used = metric_names(text);
        assert!(used.len() >= 4, "{file}: {used:?}");
        let missing: Vec<&String> = used.difference(&have).collect();
        assert!(
            missing.is_empty(),
            "{file} queries metrics sidekey does not export: {missing:?}\nexported: {have:?}"
        );
    }
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let found = Command::new("promtool").arg("--version").output().is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is missing under CI (Debian: apt-get install prometheus)"
        );
        eprintln!("promtool not installed: rules not checked by promtool here");
        return;
    }
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(format!(
            "{}/deploy/prometheus-alerts.yml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("6 rules found"));
}

#[test]
fn names_are_read_from_promql_and_expositions() {
    assert_eq!(
        metric_names(
            "histogram_quantile(0.99, sum by (le) (rate(sidekey_a_bucket[5m]))) / sidekey_b"
        ),
        BTreeSet::from(["sidekey_a_bucket".to_owned(), "sidekey_b".to_owned()])
    );
    let e = exported("# TYPE sidekey_refresh counter\n# TYPE sidekey_lat histogram\nsidekey_g 1\n");
    for n in [
        "sidekey_refresh_total",
        "sidekey_lat_bucket",
        "sidekey_lat_count",
        "sidekey_g",
    ] {
        assert!(e.contains(n), "{n}: {e:?}");
    }
}

/// `promtool check metrics` on what a scraper gets, in both formats the
/// server speaks; under CI a missing promtool fails the test.
fn promtool_checks(exposition: &str) -> Option<String> {
    use std::io::Write;
    if Command::new("promtool").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is missing under CI (Debian: apt-get install prometheus)"
        );
        eprintln!("promtool not installed: exposition not checked by promtool here");
        return None;
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool check metrics failed ({:?}):\n{said}\n--- exposition:\n{exposition}",
        out.status.code()
    );
    Some(said)
}

#[tokio::test]
async fn a_fresh_instance_exports_every_dashboard_series_in_prometheus_text_promtool_accepts() {
    let up = Upstream::start().await;
    let sk = support::Sidekey::start(Options::with_providers(&format!(
        "{}{}",
        provider_toml("custom", &up.url, "inject = \"bearer\""),
        provider_toml("crm", &up.url, "inject = \"bearer\"")
    )))
    .await;
    // Nothing has happened yet: no call, no refresh, no webhook.
    let scrape = |accept: Option<&'static str>| {
        let sk = &sk;
        async move {
            let auth = format!("Bearer {}", sk.admin_token);
            let mut headers = vec![("authorization", auth.as_str())];
            headers.extend(accept.map(|a| ("accept", a)));
            support::send(
                &sk.admin_client,
                Method::GET,
                &sk.admin_url("/metrics"),
                &headers,
                "",
            )
            .await
        }
    };
    for accept in [None, Some("text/plain;version=0.0.4"), Some("*/*")] {
        let r = scrape(accept).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.headers["content-type"], "text/plain; version=0.0.4; charset=utf-8",
            "{accept:?}"
        );
        let t = r.text();
        assert!(!t.contains("# EOF"), "{t}");
        promtool_checks(&t);
        for series in [
            "sidekey_refresh_total{provider=\"custom\",outcome=\"refreshed\"} 0",
            "sidekey_refresh_total{provider=\"crm\",outcome=\"failed\"} 0",
            "sidekey_token_endpoint_calls_total{provider=\"crm\"} 0",
            "sidekey_upstream_latency_seconds_count{provider=\"custom\"} 0",
            "sidekey_proxy_requests_total{provider=\"crm\",status=\"200\"} 0",
            "sidekey_webhooks_total{event=\"post_call\",outcome=\"refused\"} 0",
            "sidekey_webhooks_total{event=\"conversation_init\",outcome=\"known_caller\"} 0",
        ] {
            assert!(t.contains(series), "{series} missing from\n{t}");
        }
        // Every series the dashboard and the alerts query exists already.
        let have = exported(&t);
        for file in [
            "deploy/grafana-dashboard.json",
            "deploy/prometheus-alerts.yml",
        ] {
            let text = repo_file(file);
            let mut s = String::new();
            let text = match serde_json::from_str::<Value>(&text) {
                Ok(v) => {
                    strings(&v, &mut s);
                    s
                }
                Err(_) => text,
            };
            let missing: Vec<String> = metric_names(&text)
                .into_iter()
                .filter(|n| !have.contains(n))
                .collect();
            assert!(missing.is_empty(), "{file}: {missing:?} not in\n{t}");
        }
    }
    // OpenMetrics when the scraper prefers it, as Prometheus does.
    let r = scrape(Some(
        "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
    ))
    .await;
    assert_eq!(
        r.headers["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let t = r.text();
    assert!(t.ends_with("# EOF\n"), "{t}");
    assert!(t.contains("# TYPE sidekey_refresh counter\n"), "{t}");
    // A scraper that ranks the text format higher gets it.
    let r = scrape(Some(
        "application/openmetrics-text;q=0.2,text/plain;version=0.0.4;q=0.9",
    ))
    .await;
    assert_eq!(
        r.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
}
