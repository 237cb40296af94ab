//! The connect page in a real browser (headless Chromium over WebDriver):
//! prefetches burn nothing, open a connect link, Continue, Connect,
//! approve at a fake provider, land back on "Connected", Disconnect (asked
//! first, on the page); the same callback URL opened in a second browser
//! profile is refused and stores nothing. With `[connect] confirm = true`,
//! a link forwarded to someone else stores nothing for the forwarder
//! unless the app confirms.
//!
//! Every state is audited with axe-core, in the light and the dark colour
//! scheme: any violation fails the test. Screenshots (whole page, 1280 and
//! 390 px wide) go to `target/connect-screenshots/`, or to `docs/img/` with
//! `SIDEKEY_SCREENSHOTS=docs` (how the docs' images are made). Without
//! Chromium, or without axe-core (`scripts/install-axe.sh`), the test
//! fails under `CI=true` and skips loudly otherwise.

use sidekey_testkit as support;

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use support::token::TokenServer;
use support::upstream::Upstream;
use support::webdriver::{Browser, Driver, available_or_fail, axe_source};
use support::{InProcess, Options};
use tokio::net::TcpListener;

/// A provider's authorize page: shows what is asked and an Approve button
/// that sends the browser to the callback with a code and the state.
#[derive(Clone)]
struct FakeProvider {
    origin: String,
    /// Callback URLs (with code and state) handed out, newest last.
    issued: Arc<Mutex<Vec<String>>>,
}

const LOGO_SVG: &str = r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 40 40"><rect width="40" height="40" rx="9" fill="#4338ca"/><path d="M11 28 20 10l9 18h-5l-4-9-4 9z" fill="#fff"/></svg>"##;

impl FakeProvider {
    /// Serves HTTPS with sidekey's own generated certificate (Chromium is
    /// told to accept it) on an already-bound listener.
    fn serve(listener: TcpListener, cert_dir: PathBuf, tok: TokenServer) -> FakeProvider {
        let origin = format!(
            "https://localhost:{}",
            listener.local_addr().unwrap().port()
        );
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(cert_dir.join("server.crt"))
                .unwrap()
                .map(Result::unwrap)
                .collect();
        let key = PrivateKeyDer::from_pem_file(cert_dir.join("server.key")).unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let fake = FakeProvider {
            origin,
            issued: Arc::new(Mutex::new(Vec::new())),
        };
        let f = fake.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (f, tok, acceptor) = (f.clone(), tok.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (f, tok) = (f.clone(), tok.clone());
                        async move { Ok::<_, Infallible>(f.handle(&tok, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        fake
    }

    async fn handle(&self, tok: &TokenServer, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let method = req.method().clone();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let q = |src: &[u8], k: &str| {
            url::form_urlencoded::parse(src)
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let html = |s: String| {
            Response::builder()
                .header("content-type", "text/html; charset=utf-8")
                .body(Full::new(Bytes::from(s)))
                .unwrap()
        };
        match (method, path.as_str()) {
            (Method::GET, "/logo.svg") => Response::builder()
                .header("content-type", "image/svg+xml")
                .body(Full::new(Bytes::from(LOGO_SVG)))
                .unwrap(),
            (Method::GET, "/authorize") => {
                let q = |k| q(query.as_bytes(), k);
                let redirect = q("redirect_uri");
                let n = self.issued.lock().unwrap().len() + 1;
                let code = format!("code-browser-{n}");
                tok.register_code(&code, &q("code_challenge"), &redirect);
                let mut cb = url::Url::parse(&redirect).unwrap();
                cb.query_pairs_mut()
                    .append_pair("code", &code)
                    .append_pair("state", &q("state"));
                self.issued.lock().unwrap().push(cb.to_string());
                let e = |s: &str| {
                    s.replace('&', "&amp;")
                        .replace('"', "&quot;")
                        .replace('<', "&lt;")
                };
                html(format!(
                    "<!doctype html><html><head><meta name=viewport content=\"width=device-width\"><title>Fake provider</title></head>\
<body><h1>Fake provider</h1><p>An app asks for access: {scope}</p>\
<form method=\"post\" action=\"/approve\"><input type=hidden name=callback value=\"{cb}\">\
<button id=\"approve\" type=\"submit\">Approve</button></form></body></html>",
                    scope = e(&q("scope")),
                    cb = e(cb.as_str()),
                ))
            }
            // The main app's return_to: where a confirmation code arrives.
            (Method::GET, "/app") => {
                html("<!doctype html><title>App</title><h1>Back in the app</h1>".into())
            }
            (Method::POST, "/approve") => Response::builder()
                .status(302)
                .header("location", q(&body, "callback"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
            _ => Response::builder()
                .status(404)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        }
    }

    fn last_callback(&self) -> String {
        self.issued
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("an authorize visit")
    }
}

fn shot_path(name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if std::env::var("SIDEKEY_SCREENSHOTS").is_ok_and(|v| v == "docs") {
        root.join("docs/img").join(name)
    } else {
        root.join("target/connect-screenshots").join(name)
    }
}

/// Screenshots of the whole page at desktop and at phone width (it stays
/// at phone width afterwards); the phone one also as `connect-{name}.png`,
/// the name the docs and the README show.
async fn shots(b: &Browser<'_>, name: &str) {
    for (w, h) in [(1280, 800), (390, 844)] {
        b.cdp(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": w, "height": h, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
        b.full_screenshot(&shot_path(&format!("connect-{name}-{w}.png")))
            .await;
    }
    b.full_screenshot(&shot_path(&format!("connect-{name}.png")))
        .await;
}

async fn colour_scheme(b: &Browser<'_>, scheme: &str) {
    b.cdp(
        "Emulation.setEmulatedMedia",
        json!({"features": [{"name": "prefers-color-scheme", "value": scheme}]}),
    )
    .await;
}

/// axe-core on every state of the page, in the light and the dark scheme;
/// the counts are printed, and any violation fails the test at the end.
struct Audit {
    axe: Option<String>,
    counts: Vec<(String, usize)>,
    failures: Vec<String>,
}

impl Audit {
    fn new(test: &str) -> Audit {
        Audit {
            axe: axe_source(test),
            counts: Vec::new(),
            failures: Vec::new(),
        }
    }

    async fn check(&mut self, b: &Browser<'_>, state: &str) {
        assert_no_vault_name(state, &b.source().await);
        let Some(axe) = &self.axe else {
            return;
        };
        for scheme in ["light", "dark"] {
            colour_scheme(b, scheme).await;
            let v = b.axe(axe).await;
            let name = format!("{state} ({scheme})");
            if !v.is_empty() {
                self.failures.push(format!(
                    "{name}: {}",
                    serde_json::to_string_pretty(&v).unwrap()
                ));
            }
            self.counts.push((name, v.len()));
        }
        colour_scheme(b, "light").await;
    }

    fn finish(self) {
        if self.axe.is_none() {
            return;
        }
        eprintln!("axe-core violations per state:");
        for (state, n) in &self.counts {
            eprintln!("  {n:>2}  {state}");
        }
        assert!(self.failures.is_empty(), "{}", self.failures.join("\n"));
    }
}

/// End users deal with the app, not with the vault behind it.
fn assert_no_vault_name(what: &str, html: &str) {
    assert!(
        !html.to_ascii_lowercase().contains("sidekey"),
        "{what} names sidekey:\n{html}"
    );
}

/// sidekey with four providers on the fake provider, and the fake.
struct Setup {
    sk: InProcess,
    tok: TokenServer,
    fake: FakeProvider,
    _up: Upstream,
}

async fn setup(connect_extra: &str) -> Setup {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    let provider_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_origin = format!(
        "https://localhost:{}",
        provider_listener.local_addr().unwrap().port()
    );
    let port = support::ports::listen_port();
    let public = format!("https://localhost:{port}");
    // Google, Notion and Dropbox from their presets (so with their
    // logos), all on the fake provider; Slack without a preset (Simple
    // Icons has no Slack logo, the page shows its initial).
    let provider = |name: &str, preset: &str, display: &str, description: &str| {
        format!(
            "[providers.{name}]\n{preset}base_url = \"{up}\"\ntoken_url = \"{tok}\"\n\
             authorize_url = \"{fake_origin}/authorize\"\nclient_id = \"test-client\"\n\
             client_secret = \"test-client-secret\"\nscopes = [\"{name}.read\", \"{name}.write\"]\n\
             display_name = \"{display}\"\ndescription = \"{description}\"\n",
            up = up.url,
            tok = tok.url,
        )
    };
    let toml = [
        provider(
            "google",
            "preset = \"google\"\n",
            "Google Calendar",
            "Reads your calendar and books meetings when you ask.",
        ),
        provider(
            "slack",
            "",
            "Slack",
            "Posts messages to your team's channels for you.",
        ),
        provider(
            "notion",
            "preset = \"notion\"\n",
            "Notion",
            "Finds and updates your notes.",
        ),
        provider(
            "dropbox",
            "preset = \"dropbox\"\n",
            "Dropbox",
            "Saves call notes to your files.",
        ),
        format!(
            "[connect]\napp_name = \"Acme Assistant\"\naccent_color = \"#4338ca\"\nlogo_url = \"{fake_origin}/logo.svg\"\n{connect_extra}\n"
        ),
    ]
    .concat();
    let sk = InProcess::start(
        Options::with_providers(&toml)
            .server(&format!("listen = \"127.0.0.1:{port}\""))
            .server(&format!("public_url = \"{public}\"")),
    )
    .await;
    let fake = FakeProvider::serve(provider_listener, sk.dir.path().join("certs"), tok.clone());
    assert_eq!(fake.origin, fake_origin);
    Setup {
        sk,
        tok,
        fake,
        _up: up,
    }
}

/// The binding cookie as the browser stored it, if any.
async fn binding_cookie(b: &Browser<'_>) -> Option<serde_json::Value> {
    b.cookies()
        .await
        .into_iter()
        .find(|c| c["name"] == "__Host-sidekey-connect")
}

#[tokio::test]
async fn connect_page_in_a_real_browser() {
    if !available_or_fail("connect_page_in_a_real_browser") {
        return;
    }
    let mut audit = Audit::new("connect_page_in_a_real_browser");
    let Setup { sk, tok, fake, .. } = setup("").await;
    let fake_origin = fake.origin.clone();
    sk.put_credential(
        "maya",
        "slack",
        json!({"access_token": "xoxp-SECRET-browser", "refresh_token": "rt-SECRET-browser", "expires_in": 3600}),
    )
    .await;
    sk.put_credential(
        "maya",
        "notion",
        json!({"access_token": "ntn-SECRET-browser", "expires_at": 1_000_000}),
    )
    .await;
    // Dropbox refused the refresh token when the proxy tried to renew it.
    sk.put_credential(
        "maya",
        "dropbox",
        json!({"access_token": "dbx-SECRET-browser", "refresh_token": "rt-SECRET-dead", "expires_at": 1_000_000}),
    )
    .await;
    let session = sk.token("maya", &["dropbox"]).await;
    sk.proxy(Method::GET, "/v1/proxy/dropbox/x", &session, "")
        .await
        .assert_error(424, "reauth_required");
    let r = sk
        .admin(
            Method::POST,
            "/v1/users/maya/connect",
            Some(json!({"return_to": "https://app.example/settings", "user_label": "maya@acme.example in Acme"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let connect_url = r.json()["connect_url"].as_str().unwrap().to_owned();
    let cred = |p: &'static str| {
        let sk = &sk;
        async move {
            sk.admin(
                Method::GET,
                &format!("/v1/users/maya/credentials/{p}"),
                None,
            )
            .await
            .status
            .as_u16()
        }
    };

    // A mail scanner and a link checker look at the link first.
    let path = url::Url::parse(&connect_url).unwrap().path().to_owned();
    for m in [Method::GET, Method::GET, Method::GET, Method::HEAD] {
        let r = sk.agent(m, &path, &[], "").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            r.headers.get("set-cookie").is_none(),
            "a look sets no cookie"
        );
    }

    let driver = Driver::start().await;
    let b1 = driver.browser().await;
    b1.goto(&connect_url).await;
    // The first view: whose accounts, and Continue; no cookie yet.
    let text = b1.text().await;
    for want in [
        "Connect accounts for maya@acme.example in Acme",
        "Continue only if that is you",
        "Continue",
    ] {
        assert!(text.contains(want), "first view lacks {want:?}:\n{text}");
    }
    assert!(
        binding_cookie(&b1).await.is_none(),
        "no cookie before Continue"
    );
    audit.check(&b1, "first view").await;
    shots(&b1, "continue").await;
    b1.click("form[action$=\"/claim\"] button").await;
    let text = b1
        .wait_text("the page after Continue", |t| {
            t.contains("Connect your accounts")
        })
        .await;
    for want in [
        "Connect your accounts",
        "maya@acme.example in Acme. Acme Assistant uses them",
        "Google Calendar",
        "Not connected",
        "Slack",
        "Connected",
        "Notion",
        "Expired",
        "The access Notion granted has run out",
        "Dropbox",
        "Needs reconnecting",
        "Dropbox refused to renew access",
        "Done — back to Acme Assistant",
    ] {
        assert!(text.contains(want), "page lacks {want:?}:\n{text}");
    }
    let source = b1.source().await;
    for secret in [
        "xoxp-SECRET-browser",
        "rt-SECRET-browser",
        "ntn-SECRET-browser",
        "dbx-SECRET-browser",
        "rt-SECRET-dead",
        "test-client-secret",
    ] {
        assert!(!source.contains(secret), "secret on the page");
    }
    // The presets' logos are inline SVG; Slack has its initial.
    for p in ["google", "notion", "dropbox"] {
        let logo = b1
            .attribute(&format!("#provider-{p} .icon.logo svg"), "aria-hidden")
            .await;
        assert_eq!(logo.as_deref(), Some("true"), "{p}'s logo");
    }
    // The binding cookie as the browser stored it.
    let c = binding_cookie(&b1)
        .await
        .expect("the binding cookie is set by Continue");
    assert_eq!(c["httpOnly"], true);
    assert_eq!(c["secure"], true);
    assert_eq!(c["sameSite"], "Lax");
    assert_eq!(c["path"], "/");
    assert!(source.contains("/connect/assets/style.css"));
    // Keyboard: the first Tab stops are the page's own controls.
    let focused = b1.tab_focus_text(1).await;
    assert!(
        focused.to_lowercase().contains("connect"),
        "first Tab focuses the first row's (Re)connect: {focused:?}"
    );
    audit
        .check(
            &b1,
            "page: connected, expired, needs reconnecting, not connected",
        )
        .await;
    shots(&b1, "page").await;
    colour_scheme(&b1, "dark").await;
    b1.full_screenshot(&shot_path("connect-page-dark-390.png"))
        .await;
    colour_scheme(&b1, "light").await;

    // Disconnect asks first, on the page; Cancel changes nothing.
    b1.click("#provider-slack a[href*=\"disconnect=slack\"]")
        .await;
    let text = b1
        .wait_text("the question", |t| t.contains("Disconnect Slack?"))
        .await;
    assert!(
        text.contains("Acme Assistant will no longer be able to use your Slack account"),
        "{text}"
    );
    audit.check(&b1, "disconnect question").await;
    shots(&b1, "disconnect").await;
    b1.click("#confirm-slack a.button").await;
    b1.wait_text("the page again", |t| !t.contains("Disconnect Slack?"))
        .await;
    assert_eq!(cred("slack").await, 200, "Cancel keeps it");

    // Connect → the provider's page → Approve → back on "Connected".
    b1.click("#provider-google button[value=connect]").await;
    b1.wait_url("the provider's authorize page", |u| {
        u.starts_with(&fake_origin)
    })
    .await;
    assert!(b1.text().await.contains("google.read google.write"));
    b1.click("#approve").await;
    let back = b1
        .wait_url("the connect page again", |u| u.contains("connected=google"))
        .await;
    assert!(back.starts_with(&connect_url), "{back}");
    let text = b1.text().await;
    assert!(text.contains("Google Calendar is now connected."), "{text}");
    assert_eq!(cred("google").await, 200, "stored");
    audit.check(&b1, "connected").await;
    shots(&b1, "connected").await;
    let source = b1.source().await;
    for t in tok.all_tokens() {
        assert!(!source.contains(&t), "token on the page");
    }
    assert!(!source.contains("code-browser-1"), "code on the page");

    // Disconnect: the question, then its button (the CSRF-checked POST).
    b1.click("#provider-google a[href*=\"disconnect=google\"]")
        .await;
    b1.wait_text("the question", |t| {
        t.contains("Disconnect Google Calendar?")
    })
    .await;
    assert_eq!(cred("google").await, 200, "asking removes nothing");
    b1.click("#provider-google button[value=disconnect]").await;
    b1.wait_url("the page after Disconnect", |u| {
        u.contains("disconnected=google")
    })
    .await;
    assert!(b1.text().await.contains("Google Calendar was disconnected"));
    assert_eq!(cred("google").await, 404, "gone");
    audit.check(&b1, "disconnected").await;

    // Every error a callback can bring back, as the page words it.
    for code in [
        "access_denied",
        "provider_error",
        "state_expired",
        "invalid_state",
        "invalid_request",
        "invalid_signature",
        "exchange_refused",
        "exchange_failed",
        "bad_connection_value",
        "store_failed",
        "confirm_unavailable",
        "something_new",
    ] {
        b1.goto(&format!("{connect_url}?error={code}&provider=google"))
            .await;
        let text = b1.text().await;
        assert!(text.contains("Google Calendar"), "{code}: {text}");
        audit
            .check(&b1, &format!("error after callback: {code}"))
            .await;
        if code == "access_denied" {
            shots(&b1, "error").await;
        }
    }
    b1.goto(&connect_url).await;

    // Connect again, but the callback URL goes to another browser profile:
    // refused, nothing stored, the state spent.
    b1.click("#provider-google button[value=connect]").await;
    b1.wait_url("the provider's authorize page", |u| {
        u.starts_with(&fake_origin)
    })
    .await;
    let callback = fake.last_callback();
    let b2 = driver.browser().await;
    b2.goto(&callback).await;
    let text = b2.text().await;
    assert!(text.contains("started in another browser"), "{text}");
    assert!(text.contains("Nothing was connected"), "{text}");
    audit
        .check(&b2, "callback refused in another browser")
        .await;
    shots(&b2, "refused").await;
    assert_eq!(cred("google").await, 404, "nothing stored");
    // The connect link itself is no use to the second browser either.
    b2.goto(&connect_url).await;
    let text = b2.text().await;
    assert!(text.contains("already used"), "{text}");
    assert!(text.contains("Back to Acme Assistant"), "{text}");
    audit.check(&b2, "used link").await;
    assert!(
        b2.cookies()
            .await
            .iter()
            .all(|c| c["name"] != "__Host-sidekey-connect"),
        "no binding cookie for the second browser"
    );
    let origin = connect_url.split("/connect/").next().unwrap();
    b2.goto(&format!("{origin}/connect/{}", "Q".repeat(43)))
        .await;
    assert!(b2.text().await.contains("This link is not valid"));
    audit.check(&b2, "unknown link").await;
    // And the first browser cannot finish the spent flow afterwards.
    b1.click("#approve").await;
    b1.wait_url("the callback", |u| u.contains("/oauth/google/callback"))
        .await;
    assert!(b1.text().await.contains("not valid"));
    audit.check(&b1, "callback with a spent state").await;
    assert_eq!(cred("google").await, 404);
    // Past its lifetime the link is expired.
    sk.clock.advance(601);
    b1.goto(&connect_url).await;
    let text = b1.text().await;
    assert!(text.contains("This link has expired"), "{text}");
    assert!(text.contains("Back to Acme Assistant"), "{text}");
    audit.check(&b1, "expired link").await;
    shots(&b1, "expired").await;
    b2.close().await;
    b1.close().await;
    audit.finish();
}

#[tokio::test]
async fn forwarded_link_with_confirm_in_a_real_browser() {
    if !available_or_fail("forwarded_link_with_confirm_in_a_real_browser") {
        return;
    }
    let Setup { sk, fake, .. } = setup("confirm = true").await;
    let app_page = format!("{}/app", fake.origin);
    // The app makes a link for mallory; she forwards it, unopened, to vera.
    let r = sk
        .admin(
            Method::POST,
            "/v1/users/mallory/connect",
            Some(json!({"providers": ["google"], "return_to": app_page, "user_label": "mallory@acme.example"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let connect_url = r.json()["connect_url"].as_str().unwrap().to_owned();

    let driver = Driver::start().await;
    let vera = driver.browser().await;
    vera.goto(&connect_url).await;
    let text = vera.text().await;
    assert!(
        text.contains("Connect accounts for mallory@acme.example"),
        "the page says whose accounts: {text}"
    );
    vera.click("form[action$=\"/claim\"] button").await;
    vera.wait_text("the page after Continue", |t| {
        t.contains("Connect your accounts")
    })
    .await;
    vera.click("#provider-google button[value=connect]").await;
    vera.wait_url("the provider's authorize page", |u| {
        u.starts_with(&fake.origin)
    })
    .await;
    vera.click("#approve").await;
    let back = vera
        .wait_url("the app with a connect_code", |u| {
            u.contains("connect_code=")
        })
        .await;
    assert!(
        back.starts_with(&format!("{app_page}?connect_code=")),
        "{back}"
    );
    let code = url::Url::parse(&back)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "connect_code")
        .map(|(_, v)| v.into_owned())
        .unwrap();
    assert!(vera.text().await.contains("Back in the app"));
    let status = |user: &'static str| {
        let sk = &sk;
        async move {
            sk.admin(
                Method::GET,
                &format!("/v1/users/{user}/credentials/google"),
                None,
            )
            .await
            .status
            .as_u16()
        }
    };
    assert_eq!(status("mallory").await, 404, "nothing stored for mallory");
    // The app has vera logged in, not mallory: its confirm is refused, and
    // the code is spent for mallory too.
    for user in ["vera", "mallory"] {
        let r = sk
            .admin(
                Method::POST,
                &format!("/v1/users/{user}/connect/confirm"),
                Some(json!({ "code": code })),
            )
            .await;
        assert_eq!(r.status, 404, "{user}: {}", r.text());
    }
    assert_eq!(status("mallory").await, 404);
    assert_eq!(status("vera").await, 404);
    vera.close().await;
}
