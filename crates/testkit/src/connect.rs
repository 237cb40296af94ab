//! The connect page's fixture for tests/connect.rs and
//! tests/connect_confirm.rs: a sidekey whose `public_url` names its real
//! listener, two OAuth providers on a fake token endpoint, and a "browser"
//! made of explicit cookies.

use http::Method;
use serde_json::{Value, json};

use super::token::TokenServer;
use super::upstream::Upstream;
use super::{InProcess, Options, Resp, query_param};

pub const RETURN_TO: &str = "https://app.example/settings";

pub struct Fx {
    pub sk: InProcess,
    pub tok: TokenServer,
    pub up: Upstream,
    pub public: String,
}

/// A sidekey with providers `custom` and `other` (OAuth), `crm` (OAuth, a
/// `{tenant}` the user gives) and `plain` (not).
pub async fn start(tune: impl FnOnce(Options) -> Options) -> Fx {
    start_with("", tune).await
}

/// `start` with more `[connect]` lines (e.g. `confirm = true`).
pub async fn start_with(connect: &str, tune: impl FnOnce(Options) -> Options) -> Fx {
    let branded = format!(
        "app_name = \"Acme\"\naccent_color = \"#0f766e\"\n\
         logo_url = \"https://cdn.acme.example/logo.svg\"\n{connect}"
    );
    start_raw(&branded, tune).await
}

/// Without `app_name`, `accent_color` or `logo_url`: the page's neutral
/// words ("the app"); `connect` is the whole `[connect]` table.
pub async fn start_unbranded(connect: &str, tune: impl FnOnce(Options) -> Options) -> Fx {
    start_raw(connect, tune).await
}

async fn start_raw(connect: &str, tune: impl FnOnce(Options) -> Options) -> Fx {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    // Named in advance, so `public_url` can name the real listener and the
    // redirects sidekey answers can be followed.
    let port = super::ports::listen_port();
    let public = format!("https://localhost:{port}");
    let providers = format!(
        "[providers.custom]\nbase_url = \"{up}\"\ntoken_url = \"{tok}\"\n\
         authorize_url = \"https://auth.example.com/authorize\"\n\
         client_id = \"test-client\"\nclient_secret = \"test-client-secret\"\n\
         display_name = \"Acme Calendar\"\ndescription = \"Reads and books <meetings> for you\"\n\
         [providers.other]\nbase_url = \"{up}\"\ntoken_url = \"{tok}\"\n\
         authorize_url = \"https://login.other.example/oauth\"\n\
         client_id = \"test-client\"\nclient_secret = \"test-client-secret\"\n\
         [providers.crm]\nbase_url = \"{up}/t/{{tenant}}\"\ntoken_url = \"{tok}\"\n\
         authorize_url = \"https://{{tenant}}.crm.example/authorize\"\n\
         client_id = \"test-client\"\nclient_secret = \"test-client-secret\"\n\
         display_name = \"Crm\"\n\
         [providers.crm.connection.tenant]\nfrom = \"user\"\npattern = '[a-z0-9-]{{1,20}}'\n\
         [providers.plain]\nbase_url = \"{up}\"\n\
         [connect]\n{connect}\n",
        up = up.url,
        tok = tok.url
    );
    let opts = Options::with_providers(&providers)
        .server(&format!("listen = \"127.0.0.1:{port}\""))
        .server(&format!("public_url = \"{public}\""));
    let sk = InProcess::start(tune(opts)).await;
    Fx {
        sk,
        tok,
        up,
        public,
    }
}

impl Fx {
    pub async fn link(&self, user: &str, body: Value) -> Resp {
        self.sk
            .admin(
                Method::POST,
                &format!("/v1/users/{user}/connect"),
                Some(body),
            )
            .await
    }

    /// A connect link's path (`/connect/<ticket>`).
    pub async fn link_path(&self, user: &str, body: Value) -> String {
        let r = self.link(user, body).await;
        assert_eq!(r.status, 201, "{}", r.text());
        let url = r.json()["connect_url"].as_str().unwrap().to_owned();
        url.strip_prefix(&self.public).unwrap().to_owned()
    }

    /// A request on the agent listener, as a browser with (or without) a
    /// cookie.
    pub async fn call(&self, method: Method, path: &str, cookie: Option<&str>) -> Resp {
        let c = cookie.map(|c| format!("__Host-sidekey-connect={c}"));
        let mut h = vec![];
        if let Some(c) = &c {
            h.push(("cookie", c.as_str()));
        }
        self.sk.agent(method, path, &h, "").await
    }

    pub async fn get(&self, path: &str, cookie: Option<&str>) -> Resp {
        self.call(Method::GET, path, cookie).await
    }

    pub async fn post_form(&self, path: &str, cookie: Option<&str>, form: &[(&str, &str)]) -> Resp {
        self.post_form_with(path, cookie, form, &[]).await
    }

    /// `post_form` with more request headers.
    pub async fn post_form_with(
        &self,
        path: &str,
        cookie: Option<&str>,
        form: &[(&str, &str)],
        extra: &[(&str, &str)],
    ) -> Resp {
        let body: String = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let c = cookie.map(|c| format!("__Host-sidekey-connect={c}"));
        let mut h = vec![("content-type", "application/x-www-form-urlencoded")];
        if let Some(c) = &c {
            h.push(("cookie", c.as_str()));
        }
        h.extend_from_slice(extra);
        self.sk.agent(Method::POST, path, &h, body).await
    }

    /// What a browser does with a link: the first view (no cookie), then
    /// "Continue" (the claim sets the cookie and sends it to the page),
    /// then the page. `cookie` is the browser's cookie from earlier links.
    /// Answers the cookie and the page.
    pub async fn claim(&self, path: &str, cookie: Option<&str>) -> (String, Resp) {
        let first = self.get(path, cookie).await;
        assert_html(&first, 200);
        assert_hardened(&first);
        no_cookie(&first);
        assert!(first.text().contains("Continue"), "{}", first.text());
        let r = self
            .post_form(
                &format!("{path}/claim"),
                cookie,
                &[("csrf", &csrf_of(&first.text()))],
            )
            .await;
        assert_eq!(r.status, 303, "{}", r.text());
        assert_hardened(&r);
        assert_eq!(location(&r), format!("{}{path}", self.public));
        let c = binding_cookie(&r);
        if let Some(old) = cookie {
            assert_eq!(c, old, "a browser keeps its cookie");
        }
        let page = self.get(path, Some(&c)).await;
        assert_html(&page, 200);
        no_cookie(&page);
        (c, page)
    }

    /// Connect on a claimed page: the provider's authorize URL, with
    /// `code` registered at the token endpoint for it.
    pub async fn connect(&self, path: &str, cookie: &str, page: &Resp, code: &str) -> String {
        let r = self
            .post_form(
                &format!("{path}/connect"),
                Some(cookie),
                &[("csrf", &csrf_of(&page.text())), ("provider", "custom")],
            )
            .await;
        assert_eq!(r.status, 303, "{}", r.text());
        let url = location(&r);
        self.expect_code(&url, code);
        url
    }

    /// Tells the fake token endpoint to accept `code` for the flow behind
    /// `authorize_url` (its PKCE challenge and redirect URI).
    pub fn expect_code(&self, authorize_url: &str, code: &str) {
        self.tok.register_code(
            code,
            &query_param(authorize_url, "code_challenge").unwrap(),
            &query_param(authorize_url, "redirect_uri").unwrap(),
        );
    }

    /// A credential of `user` that needs reconnecting: its access token
    /// expired and the token endpoint refused its refresh token when the
    /// proxy tried to renew it.
    pub async fn refused_refresh(&self, user: &str, provider: &str) {
        self.sk
            .put_credential(
                user,
                provider,
                json!({"access_token": "at-SECRET-stale", "refresh_token": "rt-SECRET-dead", "expires_at": self.sk.clock.now() - 10}),
            )
            .await;
        let token = self.sk.token(user, &[provider]).await;
        self.sk
            .proxy(Method::GET, &format!("/v1/proxy/{provider}/me"), &token, "")
            .await
            .assert_error(424, "reauth_required");
    }

    pub async fn cred_status(&self, user: &str, provider: &str) -> u16 {
        self.sk
            .admin(
                Method::GET,
                &format!("/v1/users/{user}/credentials/{provider}"),
                None,
            )
            .await
            .status
            .as_u16()
    }
}

pub fn header(r: &Resp, name: &str) -> String {
    r.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// The binding cookie's value from Set-Cookie, after checking its attributes.
pub fn binding_cookie(r: &Resp) -> String {
    let sc = header(r, "set-cookie");
    assert!(sc.starts_with("__Host-sidekey-connect="), "{sc:?}");
    let attrs: Vec<String> = sc
        .split(';')
        .skip(1)
        .map(|a| a.trim().to_ascii_lowercase())
        .collect();
    for want in ["secure", "httponly", "samesite=lax", "path=/"] {
        assert!(attrs.iter().any(|a| a == want), "{want} missing: {sc}");
    }
    assert!(
        !attrs.iter().any(|a| a.starts_with("domain")),
        "__Host- cookies carry no Domain: {sc}"
    );
    let v = sc["__Host-sidekey-connect=".len()..]
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    assert!(v.len() >= 43, "cookie value of >= 256 bits: {v}");
    v
}

pub fn no_cookie(r: &Resp) {
    assert!(
        r.headers.get("set-cookie").is_none(),
        "no cookie expected: {:?}",
        r.headers.get("set-cookie")
    );
}

pub fn assert_html(r: &Resp, status: u16) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(header(r, "content-type"), "text/html; charset=utf-8");
}

/// The security headers every connect answer carries.
pub fn assert_hardened(r: &Resp) {
    let csp = header(r, "content-security-policy");
    for part in [
        "default-src 'none'",
        "script-src 'none'",
        "style-src 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ] {
        assert!(csp.contains(part), "CSP lacks {part}: {csp}");
    }
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(header(r, "x-frame-options"), "DENY");
    assert_eq!(header(r, "referrer-policy"), "no-referrer");
    assert_eq!(header(r, "x-content-type-options"), "nosniff");
    assert_eq!(header(r, "cache-control"), "no-store");
    assert!(
        header(r, "strict-transport-security").starts_with("max-age="),
        "HSTS under TLS"
    );
}

/// The first CSRF token in a page's forms.
pub fn csrf_of(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("csrf field") + 19;
    html[at..at + html[at..].find('"').unwrap()].to_owned()
}

pub fn location(r: &Resp) -> String {
    header(r, "location")
}

/// One provider's row of the page (its `<li>` up to the row's end).
pub fn row(html: &str, provider: &str) -> String {
    let at = html
        .find(&format!("id=\"provider-{provider}\""))
        .unwrap_or_else(|| panic!("no row for {provider}:\n{html}"));
    let at = html[..at].rfind("<li").expect("the row's start");
    let end = at + html[at..].find("</li>").expect("the row's end");
    html[at..end].to_owned()
}

/// End users deal with the app, not with the vault behind it: no page they
/// see names it.
pub fn assert_no_vault_name(what: &str, html: &str) {
    assert!(
        !html.to_ascii_lowercase().contains("sidekey"),
        "{what} names sidekey:\n{html}"
    );
}
