//! A small W3C WebDriver client for chromedriver, over the tests' own hyper
//! client (the Rust WebDriver crates bring their own TLS stacks; the tree
//! keeps to ring). Enough for the connect-page tests: sessions with their
//! own profile, navigation, CSS lookups, clicks, text, cookies, screenshots.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use http::Method;
use serde_json::{Value, json};

use super::{TestClient, plain_client, send};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Whether Chromium and chromedriver are installed. Under `CI=true` a
/// missing browser is a failure, not a skip.
pub fn available_or_fail(test: &str) -> bool {
    let ok = Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists();
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!(
                "{test}: {CHROMIUM} or {CHROMEDRIVER} is missing and CI=true; install them with `apt-get install -y chromium chromium-driver` (.ci/run does)"
            );
        }
        eprintln!(
            "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
             !! SKIPPED {test}: {CHROMIUM} / {CHROMEDRIVER} not installed.\n\
             !! apt-get install -y chromium chromium-driver   (CI=true fails here)\n\
             !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
        );
    }
    ok
}

/// A running chromedriver on a loopback port; killed on drop.
pub struct Driver {
    child: Child,
    base: String,
    client: TestClient,
}

impl Driver {
    pub async fn start() -> Driver {
        let port = super::ports::listen_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let d = Driver {
            child,
            base: format!("http://127.0.0.1:{port}"),
            client: plain_client(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = tokio::time::timeout(
                Duration::from_secs(2),
                d.client.request(
                    http::Request::get(format!("{}/status", d.base))
                        .body(http_body_util::Full::new(bytes::Bytes::new()))
                        .unwrap(),
                ),
            )
            .await;
            if matches!(ready, Ok(Ok(r)) if r.status() == 200) {
                return d;
            }
            assert!(Instant::now() < deadline, "chromedriver not ready in 20 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        match self.try_call(method.clone(), path, body).await {
            Ok(v) => v,
            Err(e) => panic!("WebDriver {method} {path}: {e}"),
        }
    }

    /// `call` that reports a WebDriver error instead of failing the test
    /// (a page that is being replaced has stale elements).
    async fn try_call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let r = send(
            &self.client,
            method.clone(),
            &format!("{}{path}", self.base),
            &[("content-type", "application/json")],
            body.map(|b| b.to_string()).unwrap_or_default(),
        )
        .await;
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        if !r.status.is_success() {
            return Err(format!("{} {v}", r.status));
        }
        Ok(v["value"].clone())
    }

    /// A new browser with a fresh profile (its own cookie jar), phone-sized.
    pub async fn browser(&self) -> Browser<'_> {
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--ignore-certificate-errors",
            "--window-size=420,1000",
            "--hide-scrollbars",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([format!("--user-data-dir={}", profile.path().display())])
        .collect::<Vec<_>>();
        let v = self
            .call(
                Method::POST,
                "/session",
                Some(json!({"capabilities": {"alwaysMatch": {
                    "browserName": "chrome",
                    "acceptInsecureCerts": true,
                    "pageLoadStrategy": "normal",
                    "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
                }}})),
            )
            .await;
        Browser {
            driver: self,
            id: v["sessionId"].as_str().expect("session id").to_owned(),
            _profile: profile,
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One browser session.
pub struct Browser<'d> {
    driver: &'d Driver,
    id: String,
    _profile: tempfile::TempDir,
}

impl Browser<'_> {
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        self.driver
            .call(method, &format!("/session/{}{path}", self.id), body)
            .await
    }

    pub async fn goto(&self, url: &str) {
        self.call(Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    pub async fn url(&self) -> String {
        self.call(Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The element's id, failing the test when it is not there.
    pub async fn find(&self, css: &str) -> String {
        let v = self
            .call(
                Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("element {css}: {v}"))
            .to_owned()
    }

    pub async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.call(
            Method::POST,
            &format!("/element/{e}/click"),
            Some(json!({})),
        )
        .await;
    }

    pub async fn attribute(&self, css: &str, name: &str) -> Option<String> {
        let e = self.find(css).await;
        self.call(Method::GET, &format!("/element/{e}/attribute/{name}"), None)
            .await
            .as_str()
            .map(str::to_owned)
    }

    /// The page's rendered text.
    pub async fn text(&self) -> String {
        let e = self.find("body").await;
        self.call(Method::GET, &format!("/element/{e}/text"), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The page's text, or `None` while the page is being replaced.
    async fn try_text(&self) -> Option<String> {
        let path = format!("/session/{}", self.id);
        let find = json!({"using": "css selector", "value": "body"});
        let e = self
            .driver
            .try_call(Method::POST, &format!("{path}/element"), Some(find))
            .await
            .ok()?;
        let e = e[ELEMENT].as_str()?.to_owned();
        let t = self
            .driver
            .try_call(Method::GET, &format!("{path}/element/{e}/text"), None)
            .await
            .ok()?;
        t.as_str().map(str::to_owned)
    }

    pub async fn source(&self) -> String {
        self.call(Method::GET, "/source", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    pub async fn cookies(&self) -> Vec<Value> {
        self.call(Method::GET, "/cookie", None)
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until the current URL satisfies `pred` (navigation after a
    /// click may still be under way).
    pub async fn wait_url(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let u = self.url().await;
            if pred(&u) {
                return u;
            }
            assert!(Instant::now() < deadline, "waited for {what}; at {u}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the page's text satisfies `pred` (a form's answer may
    /// still be loading).
    pub async fn wait_text(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let t = self.try_text().await.unwrap_or_default();
            if pred(&t) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "waited for {what}; page says {t}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends Tab `n` times and returns the focused element's text, to prove
    /// the page is usable from the keyboard.
    pub async fn tab_focus_text(&self, n: usize) -> String {
        let keys: Vec<Value> = (0..n)
            .flat_map(|_| {
                [
                    json!({"type": "keyDown", "value": "\u{E004}"}),
                    json!({"type": "keyUp", "value": "\u{E004}"}),
                ]
            })
            .collect();
        self.call(
            Method::POST,
            "/actions",
            Some(json!({"actions": [{"type": "key", "id": "kb", "actions": keys}]})),
        )
        .await;
        let e = self.call(Method::GET, "/element/active", None).await;
        let id = e[ELEMENT].as_str().unwrap_or_default().to_owned();
        self.call(Method::GET, &format!("/element/{id}/text"), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// A Chrome DevTools command (chromedriver's `goog/cdp/execute`), e.g.
    /// `Emulation.setEmulatedMedia` to show the page in dark mode.
    pub async fn cdp(&self, cmd: &str, params: Value) -> Value {
        self.call(
            Method::POST,
            "/goog/cdp/execute",
            Some(json!({"cmd": cmd, "params": params})),
        )
        .await
    }

    /// Runs axe-core (`axe_js`, the text of `axe.min.js`) on the page and
    /// answers its violations, each as `{id, impact, help, nodes}`. Through
    /// DevTools' `Runtime.evaluate`, which the page's CSP (no script, no
    /// eval) does not stop, so the page is audited as it is served.
    pub async fn axe(&self, axe_js: &str) -> Vec<Value> {
        let expression = format!(
            "{axe_js}\n;window.axe.run(document).then(r => r.violations.map(v => ({{id: v.id, impact: v.impact, \
             help: v.help, nodes: v.nodes.map(n => n.target.join(' ') + ': ' + n.failureSummary)}})))"
        );
        let v = self
            .cdp(
                "Runtime.evaluate",
                json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
            )
            .await;
        match v["result"]["value"].as_array() {
            Some(found) if v.get("exceptionDetails").is_none() => found.clone(),
            _ => vec![json!({"id": "axe-error", "help": v.to_string()})],
        }
    }

    /// Saves a PNG of the whole page, not only the viewport.
    pub async fn full_screenshot(&self, path: &Path) -> PathBuf {
        let m = self.cdp("Page.getLayoutMetrics", json!({})).await;
        let size = &m["cssContentSize"];
        let v = self
            .cdp(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true, "clip": {
                    "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}}),
            )
            .await;
        write_png(path, v["data"].as_str().expect("base64 PNG"))
    }

    /// Saves a PNG of the viewport.
    pub async fn screenshot(&self, path: &Path) -> PathBuf {
        let v = self.call(Method::GET, "/screenshot", None).await;
        write_png(path, v.as_str().expect("base64 PNG"))
    }

    pub async fn close(self) {
        self.driver
            .call(Method::DELETE, &format!("/session/{}", self.id), None)
            .await;
    }
}

fn write_png(path: &Path, b64: &str) -> PathBuf {
    let png = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(path, png).unwrap();
    path.to_path_buf()
}

/// The text of axe-core's `axe.min.js`, for [`Browser::axe`]: at
/// `SIDEKEY_AXE_JS`, else where `scripts/install-axe.sh` puts it
/// (`SIDEKEY_AXE_DIR`, by default `sidekey/axe` in `$XDG_CACHE_HOME` or
/// `~/.cache`), else in the work tree's `node_modules`. Missing, it fails
/// the test under `CI=true` and skips the audit loudly otherwise.
pub fn axe_source(test: &str) -> Option<String> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(p) = env("SIDEKEY_AXE_JS") {
        let p = PathBuf::from(p);
        return Some(
            std::fs::read_to_string(&p)
                .unwrap_or_else(|e| panic!("{test}: SIDEKEY_AXE_JS={}: {e}", p.display())),
        );
    }
    let cache = env("SIDEKEY_AXE_DIR").map(PathBuf::from).or_else(|| {
        env("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|c| c.join("sidekey/axe"))
    });
    let tree = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let found = cache
        .into_iter()
        .chain([tree])
        .map(|d| d.join("node_modules/axe-core/axe.min.js"))
        .find(|p| p.is_file());
    match found {
        Some(p) => Some(std::fs::read_to_string(p).unwrap()),
        None if std::env::var("CI").is_ok_and(|v| v == "true") => panic!(
            "{test}: axe-core is missing and CI=true; install it with scripts/install-axe.sh (scripts/test.sh does)"
        ),
        None => {
            eprintln!(
                "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
                 !! {test}: NO ACCESSIBILITY AUDIT: axe-core not found.\n\
                 !! scripts/install-axe.sh installs it   (CI=true fails here)\n\
                 !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
            );
            None
        }
    }
}
