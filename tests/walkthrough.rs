//! The README's "Walkthrough with curl", run exactly as written: its shell
//! blocks are taken out of README.md and run with bash against the real
//! binary, the shipped config.toml and the demo echo upstream, so the docs
//! cannot drift from the code. Only the ports change (the shipped 8443, 8444
//! and 8099 become free ephemeral ports, in the config and the commands
//! alike), so the test can run next to a developer's own sidekey.

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Fenced blocks of the section that starts with `heading`: (info string, text).
fn blocks(markdown: &str, heading: &str) -> Vec<(String, String)> {
    let start = markdown
        .find(heading)
        .unwrap_or_else(|| panic!("README has no {heading:?} section"));
    let rest = &markdown[start + heading.len()..];
    let end = rest.find("\n## ").unwrap_or(rest.len());
    let end = rest[..end].find("\n### ").unwrap_or(end);
    let mut out = Vec::new();
    let mut cur: Option<(String, String)> = None;
    // Fences may be indented (blocks inside list items); so is their text.
    let mut indent = 0;
    for line in rest[..end].lines() {
        let trimmed = line.trim_start();
        if let Some(info) = trimmed.strip_prefix("```") {
            match cur.take() {
                Some(b) => out.push(b),
                None => {
                    indent = line.len() - trimmed.len();
                    cur = Some((info.trim().to_owned(), String::new()));
                }
            }
        } else if let Some((_, text)) = cur.as_mut() {
            let cut = line.len() - line.trim_start().len();
            text.push_str(&line[cut.min(indent)..]);
            text.push('\n');
        }
    }
    out
}

use sidekey_testkit::ports::listen_port;

/// Every `"key": value` pair with a literal value (string, number, bool,
/// null) in an expected-output comment; `…` stands for "anything" and
/// yields no pair.
fn expected_pairs(text: &str) -> Vec<String> {
    let mut pairs = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'"' {
            i += 1;
            continue;
        }
        let Some(klen) = text[i + 1..].find('"') else {
            break;
        };
        let key = &text[i + 1..i + 1 + klen];
        let mut j = i + 2 + klen;
        while j < b.len() && b[j] == b' ' {
            j += 1;
        }
        if j >= b.len() || b[j] != b':' {
            i += 1 + klen + 1;
            continue;
        }
        j += 1;
        while j < b.len() && b[j] == b' ' {
            j += 1;
        }
        let rest = &text[j..];
        let value = if let Some(s) = rest.strip_prefix('"') {
            s.find('"').map(|n| rest[..n + 2].to_owned())
        } else {
            let n = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '.'))
                .unwrap_or(rest.len());
            let lit = &rest[..n];
            (["true", "false", "null"].contains(&lit)
                || (!lit.is_empty() && lit.bytes().all(|c| c.is_ascii_digit() || c == b'-')))
            .then(|| lit.to_owned())
        };
        match value {
            Some(v) => {
                let len = v.len();
                pairs.push(format!("\"{key}\":{v}"));
                i = j + len;
            }
            None => i = j,
        }
    }
    pairs
}

/// Output as compact JSON where it is JSON, so pairs compare regardless of
/// pretty-printing.
fn compact(out: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(out.trim()) {
        Ok(v) => v.to_string(),
        Err(_) => out.to_owned(),
    }
}

struct Running(Vec<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(dir: &Path, command: &str, out: &str) -> Child {
    Command::new("bash")
        .arg("-c")
        .arg(format!("exec {}", command.trim()))
        .current_dir(dir)
        .env_remove("SIDEKEY_CONFIG")
        .env("SIDEKEY_LOG", "warn")
        .stdout(std::fs::File::create(dir.join(format!("{out}.out"))).unwrap())
        .stderr(std::fs::File::create(dir.join(format!("{out}.err"))).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run bash: {e}"))
}

fn wait_for(port: u16, what: &str, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            let err = std::fs::read_to_string(dir.join(format!("{what}.err"))).unwrap_or_default();
            panic!("{what} did not listen on {port} within 30 s: {err}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn readme_walkthrough_runs_as_written() {
    for tool in ["bash", "curl", "jq"] {
        assert!(
            have(tool),
            "the README walkthrough needs {tool}; install it (Debian: apt-get install {tool})"
        );
    }
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let found = blocks(&readme, "### Walkthrough with curl");
    let sh: Vec<&String> = found
        .iter()
        .filter(|(info, _)| info == "sh")
        .map(|(_, t)| t)
        .collect();
    assert_eq!(
        sh.len(),
        3,
        "expected three sh blocks (serve, echo-upstream, the calls): {found:?}"
    );
    let upstream_expected = found
        .iter()
        .find(|(info, _)| info.is_empty())
        .map(|(_, t)| t.trim().to_owned())
        .expect("a plain block with the echo upstream's output");

    let (agent, admin, echo) = (listen_port(), listen_port(), listen_port());
    let ports = |s: &str| {
        s.replace("8443", &agent.to_string())
            .replace("8444", &admin.to_string())
            .replace("8099", &echo.to_string())
    };
    let dir = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(repo().join("config.toml")).unwrap();
    std::fs::write(dir.path().join("config.toml"), ports(&config)).unwrap();
    std::fs::create_dir_all(dir.path().join("target/release")).unwrap();
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_sidekey"),
        dir.path().join("target/release/sidekey"),
    )
    .unwrap();

    let mut running = Running(Vec::new());
    running.0.push(spawn(dir.path(), &ports(sh[0]), "serve"));
    running.0.push(spawn(dir.path(), &ports(sh[1]), "echo"));
    wait_for(admin, "serve", dir.path());
    wait_for(agent, "serve", dir.path());
    wait_for(echo, "echo", dir.path());

    // Steps start at `# N.`; a marker before each lets the output be split.
    let mut script = String::new();
    let mut steps: Vec<(u32, String)> = Vec::new();
    for line in ports(sh[2]).lines() {
        let t = line.trim_start();
        if let Some(n) = t
            .strip_prefix("# ")
            .and_then(|r| r.split_once('.'))
            .and_then(|(n, _)| n.parse::<u32>().ok())
        {
            script.push_str(&format!("echo '@@step {n}@@'\n"));
            steps.push((n, String::new()));
        }
        if let Some((_, text)) = steps.last_mut() {
            text.push_str(line);
            text.push('\n');
        }
        script.push_str(line);
        script.push('\n');
    }
    assert!(
        steps.len() >= 4,
        "the walkthrough lost its steps: {steps:?}"
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\n{script}"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "walkthrough failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    let mut checked = 0;
    for (n, text) in &steps {
        let marker = format!("@@step {n}@@\n");
        let from = stdout.find(&marker).expect("step marker") + marker.len();
        let to = stdout[from..]
            .find("@@step ")
            .map_or(stdout.len(), |i| from + i);
        let got = compact(&stdout[from..to]);
        // The expected output: `# → …` and the comment lines after it.
        let mut expected = String::new();
        let mut inside = false;
        for l in text.lines() {
            let t = l.trim_start();
            if let Some(e) = t.strip_prefix("# →") {
                inside = true;
                expected.push_str(e);
            } else if inside && t.starts_with('#') {
                expected.push_str(&t[1..]);
            } else {
                inside = false;
            }
            expected.push('\n');
        }
        for pair in expected_pairs(&expected) {
            assert!(
                got.contains(&pair),
                "step {n}: the README promises {pair}, the command printed: {got}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 10, "too few expectations checked ({checked})");
    assert!(
        !stdout.contains("xoxb-demo-7f3e-a1b2"),
        "the token must reach the upstream masked only"
    );

    // The echo upstream printed the line the README shows.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut printed = String::new();
        std::fs::File::open(dir.path().join("echo.out"))
            .unwrap()
            .read_to_string(&mut printed)
            .unwrap();
        if printed.contains(&ports(&upstream_expected)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "echo upstream printed {printed:?}, the README shows {upstream_expected:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // docs/elevenlabs.md's session mint, against the same server.
    let el = std::fs::read_to_string(repo().join("docs/elevenlabs.md")).unwrap();
    let mint = blocks(&el, "## 1. Pass the session at conversation start");
    let (_, cmd) = mint.iter().find(|(i, _)| i == "sh").expect("mint block");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\n{}", ports(cmd)))
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&out.stdout)));
    assert!(v["session_id"].as_str().unwrap().starts_with("ses_"), "{v}");
    assert_eq!(
        v["dynamic_variables"]["secret__sidekey_session"], v["token"],
        "{v}"
    );

    // docs/elevenlabs.md's phone number registration.
    let phones = blocks(&el, "## 3. Inbound phone calls");
    let (_, cmd) = phones.iter().find(|(i, _)| i == "sh").expect("phone block");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\n{}", ports(cmd)))
        .current_dir(dir.path())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(
        v["phone_numbers"],
        serde_json::json!(["+15551234567"]),
        "{v}"
    );
    drop(running);
}

#[test]
fn elevenlabs_doc_rewrite_tool_runs_as_written() {
    let el = std::fs::read_to_string(repo().join("docs/elevenlabs.md")).unwrap();
    let found = blocks(&el, "### Convert an existing tool");
    let (_, cmd) = found
        .iter()
        .find(|(i, _)| i == "sh")
        .expect("rewrite-tool block");
    let (_, expected) = found.iter().find(|(i, _)| i == "json").expect("its output");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(repo().join("config.toml"), dir.path().join("config.toml")).unwrap();
    std::fs::create_dir_all(dir.path().join("target/release")).unwrap();
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_sidekey"),
        dir.path().join("target/release/sidekey"),
    )
    .unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\n{cmd}"))
        .current_dir(dir.path())
        .env_remove("SIDEKEY_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let want: serde_json::Value = serde_json::from_str(expected).unwrap();
    assert_eq!(got, want, "docs/elevenlabs.md promises a different tool");
}

#[test]
fn expected_pairs_reads_compact_and_pretty_json() {
    let p = expected_pairs(
        r#"{"a":1,"b": "x y", "c":…, "d": {"e": null}, "f": "Bearer xoxb-…a1b2", "g": true}"#,
    );
    assert_eq!(
        p,
        [
            r#""a":1"#,
            r#""b":"x y""#,
            r#""e":null"#,
            r#""f":"Bearer xoxb-…a1b2""#,
            r#""g":true"#
        ]
    );
}
