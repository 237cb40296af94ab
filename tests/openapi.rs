//! docs/openapi.json against the real server: every path, method and status
//! it describes is provoked on a running sidekey, and the answer must have
//! that status, the documented error code (body and `X-Sidekey-Error`), and
//! a body that fits the documented schema, and documented headers (those
//! marked `required` present, values in their schema, those listed in
//! `x-sidekey-absent-headers` absent). A documented status without a
//! way to provoke it here fails the test, so the description cannot promise
//! more than the server does. The `503 store_unavailable` answers come from
//! a second sidekey on PostgreSQL (a throwaway cluster of its own, see
//! tests/support/pg.rs) whose database is stopped. Operations or responses marked
//! `x-sidekey-pending` (defined by the contract, served by a later build)
//! must still answer 404/405 here: once they are served, the mark has to go
//! and a scenario be added.
use sidekey_testkit as support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use http::Method;
use serde_json::{Value, json};
use sha2::Sha256;
use support::token::TokenServer;
use support::upstream::{Recorded, Reply, Upstream};
use support::{InProcess, Options, Resp, send};

fn spec() -> Value {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json")).unwrap();
    serde_json::from_str(&text).expect("docs/openapi.json is JSON")
}

/// Follows a local `$ref` (`#/components/...`).
fn resolve<'a>(root: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let ptr = r.strip_prefix('#').expect("local $ref");
            resolve(
                root,
                root.pointer(ptr)
                    .unwrap_or_else(|| panic!("dangling $ref {r}")),
            )
        }
        None => v,
    }
}

/// The JSON Schema subset the description uses: type (one or a list),
/// required, properties, additionalProperties (schema or false), items,
/// enum, pattern, anyOf, oneOf, $ref.
fn validate(root: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(root, schema);
    for (key, exactly_one) in [("anyOf", false), ("oneOf", true)] {
        if let Some(alts) = schema.get(key).and_then(Value::as_array) {
            let errors: Vec<String> = alts
                .iter()
                .filter_map(|s| validate(root, s, v, at).err())
                .collect();
            let passed = alts.len() - errors.len();
            if passed == 0 || (exactly_one && passed > 1) {
                return Err(format!("{at}: {v} matches {passed} of {key} ({errors:?})"));
            }
        }
    }
    if let (Some(p), Some(s)) = (schema.get("pattern").and_then(Value::as_str), v.as_str()) {
        if !regex::Regex::new(p).unwrap().is_match(s) {
            return Err(format!("{at}: {s:?} does not match {p}"));
        }
    }
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let ok = types.iter().any(|t| match *t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            _ => false,
        });
        if !ok {
            return Err(format!("{at}: {v} is not {types:?}"));
        }
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return Err(format!("{at}: {v} not in {e:?}"));
        }
    }
    if let Some(obj) = v.as_object() {
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let r = r.as_str().unwrap();
            if !obj.contains_key(r) {
                return Err(format!("{at}: required {r} missing in {v}"));
            }
        }
        let props = schema.get("properties").and_then(Value::as_object);
        for (k, val) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => validate(root, s, val, &format!("{at}.{k}"))?,
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        return Err(format!("{at}: unknown field {k}"));
                    }
                    Some(extra) if extra.is_object() => {
                        validate(root, extra, val, &format!("{at}.{k}"))?;
                    }
                    _ => {}
                },
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            validate(root, items, x, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

struct Ctx {
    sk: InProcess,
    up: Upstream,
    tokens: TokenServer,
    pg: StoreDown,
    /// The suite runs on PostgreSQL (`SIDEKEY_TEST_BACKEND=postgres`).
    on_postgres: bool,
}

/// A sidekey on PostgreSQL whose database has been stopped, with what was
/// made while it was up: a session, a connect link opened by a browser,
/// a bound OAuth flow.
struct StoreDown {
    sk: InProcess,
    token: String,
    /// A connect link's path, the browser's cookie and the page's CSRF token.
    link: (String, String, String),
    /// olga's `oauth/start` flow, bound to a browser: its state, the
    /// cookie, and a code the token endpoint will exchange.
    flow: (String, String, &'static str),
    /// Its `upstream_timeout_secs`: store_unavailable must come within it.
    timeout: Duration,
    cluster: support::pg::Cluster,
}

impl StoreDown {
    async fn start(upstream: &str, tokens: &TokenServer) -> StoreDown {
        let token_url = &tokens.url;
        // A cluster of its own: stopping a shared one would break the
        // other tests of this process.
        let cluster = support::pg::Cluster::start_new();
        let db = cluster.new_database();
        let timeout = Duration::from_secs(2);
        let sk = InProcess::start(
            Options::with_providers(&format!(
                "[providers.custom]\nbase_url = \"{upstream}\"\ntoken_url = \"{token_url}\"\n\
                 authorize_url = \"{upstream}/authorize\"\nclient_id = \"test-client\"\n\
                 client_secret = \"test-client-secret\"\n"
            ))
            .server(&format!("upstream_timeout_secs = {}", timeout.as_secs()))
            .store(&format!(
                "backend = \"postgres\"\npostgres_url = \"{}\"",
                cluster.url(&db)
            )),
        )
        .await;
        sk.put_credential("alice", "custom", json!({"access_token": "at-pg"}))
            .await;
        let token = sk.token("alice", &["custom"]).await;
        let r = sk
            .proxy(Method::GET, "/v1/proxy/custom/ok/x", &token, "")
            .await;
        assert_eq!(r.status, 200, "with the database up: {}", r.text());
        let r = sk
            .admin(Method::POST, "/v1/users/alice/connect", Some(json!({})))
            .await;
        assert_eq!(r.status, 201, "{}", r.text());
        let path = path_of(r.json()["connect_url"].as_str().unwrap());
        let link = claimed(&sk, &path).await;
        let r = sk
            .admin(
                Method::POST,
                "/v1/users/olga/oauth/custom/start",
                Some(json!({})),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let (challenge, redirect_uri) = pkce_challenge_from(v["authorize_url"].as_str().unwrap());
        let code = "code-pg";
        tokens.register_code(code, &challenge, &redirect_uri);
        let r = sk
            .agent(
                Method::GET,
                &path_of(v["connect_url"].as_str().unwrap()),
                &[],
                "",
            )
            .await;
        assert_eq!(r.status, 303, "{}", r.text());
        let flow = (v["state"].as_str().unwrap().to_owned(), cookie_of(&r), code);
        cluster.ctl("stop");
        StoreDown {
            sk,
            token,
            link,
            flow,
            timeout,
            cluster,
        }
    }

    /// Runs a request against the stopped store; the answer must come
    /// within `upstream_timeout_secs`.
    /// The flow's callback, as the browser that holds its binding.
    async fn callback(&self) -> Resp {
        let (state, cookie, code) = &self.flow;
        let cookie = format!("__Host-sidekey-connect={cookie}");
        let p = format!("/oauth/custom/callback?code={code}&state={state}");
        self.sk
            .agent(Method::GET, &p, &[("cookie", &cookie)], "")
            .await
    }

    async fn timed(&self, what: &str, req: impl std::future::Future<Output = Resp>) -> Resp {
        let started = Instant::now();
        let r = req.await;
        let took = started.elapsed();
        assert!(
            took < self.timeout,
            "{what} with the store down took {took:?}, over upstream_timeout_secs"
        );
        r
    }
}

/// A form POST from the page, as a browser with (or without) the cookie.
async fn form(sk: &InProcess, path: &str, cookie: Option<&str>, form: &[(&str, &str)]) -> Resp {
    let body: String = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let cookie = cookie.map(|c| format!("__Host-sidekey-connect={c}"));
    let mut h = vec![("content-type", "application/x-www-form-urlencoded")];
    if let Some(c) = &cookie {
        h.push(("cookie", c.as_str()));
    }
    sk.agent(Method::POST, path, &h, body).await
}

/// A link's path claimed by a new browser (first view, Continue, page):
/// (path, cookie, the page's CSRF token).
async fn claimed(sk: &InProcess, path: &str) -> (String, String, String) {
    let r = sk.agent(Method::GET, path, &[], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = form(
        sk,
        &format!("{path}/claim"),
        None,
        &[("csrf", &csrf_of(&r.text()))],
    )
    .await;
    assert_eq!(r.status, 303, "{}", r.text());
    let cookie = cookie_of(&r);
    let c = format!("__Host-sidekey-connect={cookie}");
    let r = sk.agent(Method::GET, path, &[("cookie", &c)], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    (path.to_owned(), cookie, csrf_of(&r.text()))
}

/// The path of an absolute URL sidekey answered (`connect_url`).
fn path_of(url: &str) -> String {
    url::Url::parse(url).unwrap().path().to_owned()
}

/// The binding cookie's value from a Set-Cookie.
fn cookie_of(r: &Resp) -> String {
    let sc = r
        .headers
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no cookie: {} {}", r.status, r.text()));
    let (kv, _) = sc.split_once(';').unwrap_or((sc, ""));
    kv.strip_prefix("__Host-sidekey-connect=")
        .unwrap_or_else(|| panic!("not the binding cookie: {sc}"))
        .to_owned()
}

/// The CSRF token in the page's forms.
fn csrf_of(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("csrf field") + 19;
    html[at..at + html[at..].find('"').unwrap()].to_owned()
}

/// A well-formed ticket no link has.
const NO_SUCH_TICKET: &str = "QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ";

impl Ctx {
    async fn token(&self, providers: &[&str]) -> String {
        self.sk.token("alice", providers).await
    }

    async fn agent(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Resp {
        self.sk.agent(method, path, headers, body.to_owned()).await
    }

    async fn admin_raw(&self, method: Method, path: &str, auth: bool, body: &str) -> Resp {
        let bearer = format!("Bearer {}", self.sk.admin_token);
        let mut headers = vec![("content-type", "application/json")];
        if auth {
            headers.push(("authorization", bearer.as_str()));
        }
        send(
            &self.sk.admin_client,
            method,
            &self.sk.admin_url(path),
            &headers,
            body.to_owned(),
        )
        .await
    }

    async fn admin(&self, method: Method, path: &str, body: Value) -> Resp {
        let b = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        self.admin_raw(method, path, true, &b).await
    }

    /// A connect link for `conny`: the page's path (`/connect/<ticket>`).
    async fn link(&self, body: Value) -> String {
        let r = self
            .admin(Method::POST, "/v1/users/conny/connect", body)
            .await;
        assert_eq!(r.status, 201, "{}", r.text());
        path_of(r.json()["connect_url"].as_str().unwrap())
    }

    /// A link for `custom` opened by a new browser: (path, cookie, csrf).
    async fn opened_link(&self) -> (String, String, String) {
        let path = self.link(json!({"providers": ["custom"]})).await;
        claimed(&self.sk, &path).await
    }

    /// An unclaimed link for `custom` and its first view's CSRF token.
    async fn unclaimed_link(&self) -> (String, String) {
        let path = self.link(json!({"providers": ["custom"]})).await;
        let r = self.agent(Method::GET, &path, &[], "").await;
        assert_eq!(r.status, 200, "{}", r.text());
        let csrf = csrf_of(&r.text());
        (path, csrf)
    }

    /// A connection made on a sidekey with `[connect] confirm = true`,
    /// waiting for the app: that sidekey, and the code.
    async fn pending_connection(&self) -> (InProcess, String) {
        let sk = InProcess::start(Options::with_providers(&format!(
            "[providers.custom]\nbase_url = \"{u}\"\ntoken_url = \"{t}\"\n\
                 authorize_url = \"{u}/authorize\"\nclient_id = \"test-client\"\n\
                 client_secret = \"test-client-secret\"\n[connect]\nconfirm = true\n",
            u = self.up.url,
            t = self.tokens.url,
        )))
        .await;
        let r = sk
            .admin(
                Method::POST,
                "/v1/users/alice/oauth/custom/start",
                Some(json!({"return_to": "https://app.example/settings"})),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let (challenge, redirect_uri) = pkce_challenge_from(v["authorize_url"].as_str().unwrap());
        self.tokens
            .register_code("code-oa-confirm", &challenge, &redirect_uri);
        let r = sk
            .agent(
                Method::GET,
                &path_of(v["connect_url"].as_str().unwrap()),
                &[],
                "",
            )
            .await;
        assert_eq!(r.status, 303, "{}", r.text());
        let cookie = format!("__Host-sidekey-connect={}", cookie_of(&r));
        let state = v["state"].as_str().unwrap();
        let r = sk
            .agent(
                Method::GET,
                &format!("/oauth/custom/callback?code=code-oa-confirm&state={state}"),
                &[("cookie", &cookie)],
                "",
            )
            .await;
        assert_eq!(r.status, 303, "{}", r.text());
        let to = r.headers["location"].to_str().unwrap().to_owned();
        let code = support::query_param(&to, "connect_code").expect("connect_code");
        (sk, code)
    }

    /// A link of `ttl_secs = 60`, then the clock moved past its expiry.
    async fn expired_link(&self) -> String {
        let path = self
            .link(json!({"providers": ["custom"], "ttl_secs": 60}))
            .await;
        self.sk.clock.advance(61);
        path
    }

    async fn form(&self, path: &str, cookie: Option<&str>, form: &[(&str, &str)]) -> Resp {
        self::form(&self.sk, path, cookie, form).await
    }

    /// Admin `oauth/start` for alice and `custom`, with the code `code`
    /// registered at the token endpoint: (state, connect_url's path).
    async fn start_flow(&self, return_to: Option<&str>, code: &str) -> (String, String) {
        let body = match return_to {
            Some(rt) => json!({"return_to": rt}),
            None => json!({}),
        };
        let r = self
            .admin(Method::POST, "/v1/users/alice/oauth/custom/start", body)
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let (challenge, redirect_uri) = pkce_challenge_from(v["authorize_url"].as_str().unwrap());
        self.tokens.register_code(code, &challenge, &redirect_uri);
        (
            v["state"].as_str().unwrap().to_owned(),
            path_of(v["connect_url"].as_str().unwrap()),
        )
    }

    /// `start_flow` whose connect_url this browser opened: (state, cookie).
    async fn bound_flow(&self, return_to: Option<&str>, code: &str) -> (String, String) {
        let (state, path) = self.start_flow(return_to, code).await;
        let r = self.agent(Method::GET, &path, &[], "").await;
        assert_eq!(r.status, 303, "{}", r.text());
        (state, cookie_of(&r))
    }

    async fn callback(&self, code: &str, state: &str, cookie: Option<&str>) -> Resp {
        let cookie = cookie.map(|c| format!("__Host-sidekey-connect={c}"));
        let mut h = vec![];
        if let Some(c) = &cookie {
            h.push(("cookie", c.as_str()));
        }
        let path = format!("/oauth/custom/callback?code={code}&state={state}");
        self.agent(Method::GET, &path, &h, "").await
    }

    /// A proxied call with a fresh session for `custom` (and `other` when asked).
    async fn proxy(&self, method: &Method, path: &str, body: &str) -> Resp {
        let t = self.token(&["custom"]).await;
        self.agent(
            method.clone(),
            path,
            &[("x-sidekey-session", &t), ("x-conversation-id", "conv_oa")],
            body,
        )
        .await
    }
}

fn pkce_challenge_from(url: &str) -> (String, String) {
    let u = url::Url::parse(url).unwrap();
    let get = |k: &str| {
        u.query_pairs()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.into_owned())
            .unwrap()
    };
    (get("code_challenge"), get("redirect_uri"))
}

/// Provokes `status` on `method path` (the spec's path template). None: no
/// scenario is known, which fails the test.
async fn provoke(c: &Ctx, path: &str, method: &Method, status: u16) -> Option<Resp> {
    let m = method.clone();
    let r = match (path, method.as_str(), status) {
        ("/healthz", "GET", 200) => c.agent(m, "/healthz", &[], "").await,
        ("/readyz", "GET", 200) => c.agent(m, "/readyz", &[], "").await,
        ("/metrics", "GET", 200) => c.admin(m, "/metrics", Value::Null).await,
        ("/v1/openapi.json", "GET", 200) => c.admin(m, "/v1/openapi.json", Value::Null).await,
        ("/v1/users", "GET", 200) => c.admin(m, "/v1/users?limit=5", Value::Null).await,
        ("/v1/users", "GET", 400) => c.admin(m, "/v1/users?limit=0", Value::Null).await,
        ("/v1/users/{user}", "GET", 200) => c.admin(m, "/v1/users/alice", Value::Null).await,
        ("/v1/users/{user}", "GET", 400) => c.admin(m, "/v1/users/a%20b", Value::Null).await,
        ("/v1/users/{user}", "GET", 404) => c.admin(m, "/v1/users/nobody", Value::Null).await,
        ("/v1/users/{user}", "PUT", 200) => {
            c.admin(m, "/v1/users/alice", json!({"phone_numbers": ["+15550001111"], "tenant": "acme"}))
                .await
        }
        ("/v1/users/{user}", "PUT", 400) => {
            c.admin(m, "/v1/users/alice", json!({"phone_numbers": ["not a number"]}))
                .await
        }
        ("/v1/users/{user}", "PUT", 409) => {
            c.admin(Method::PUT, "/v1/users/carol", json!({"phone_numbers": ["+15550002222"]}))
                .await;
            c.admin(m, "/v1/users/dave", json!({"phone_numbers": ["+15550002222"]}))
                .await
        }
        ("/v1/users/{user}", "DELETE", 204) => c.admin(m, "/v1/users/erin", Value::Null).await,
        ("/v1/users/{user}/credentials/{provider}", "PUT", 200)
        | ("/v1/tenants/{tenant}/credentials/{provider}", "PUT", 200) => {
            let p = path
                .replace("{user}", "alice")
                .replace("{tenant}", "acme")
                .replace("{provider}", "custom");
            c.admin(m, &p, json!({"access_token": "at-openapi", "expires_in": 3600}))
                .await
        }
        ("/v1/users/{user}/credentials/{provider}", "PUT", 400)
        | ("/v1/tenants/{tenant}/credentials/{provider}", "PUT", 400) => {
            let p = path
                .replace("{user}", "alice")
                .replace("{tenant}", "acme")
                .replace("{provider}", "custom");
            c.admin(m, &p, json!({"acess_token": "typo"})).await
        }
        ("/v1/users/{user}/credentials/{provider}", _, 404)
        | ("/v1/tenants/{tenant}/credentials/{provider}", _, 404) => {
            let p = path
                .replace("{user}", "alice")
                .replace("{tenant}", "acme")
                .replace("{provider}", "dropbox");
            let body = if m == Method::PUT {
                json!({"access_token": "x"})
            } else {
                Value::Null
            };
            c.admin(m, &p, body).await
        }
        ("/v1/users/{user}/credentials/{provider}", "GET", 200)
        | ("/v1/tenants/{tenant}/credentials/{provider}", "GET", 200) => {
            let p = path
                .replace("{user}", "alice")
                .replace("{tenant}", "acme")
                .replace("{provider}", "custom");
            c.admin(Method::PUT, &p, json!({"access_token": "at-openapi"}))
                .await;
            c.admin(m, &p, Value::Null).await
        }
        ("/v1/users/{user}/credentials/{provider}", "DELETE", 204)
        | ("/v1/tenants/{tenant}/credentials/{provider}", "DELETE", 204) => {
            let p = path
                .replace("{user}", "frank")
                .replace("{tenant}", "acme2")
                .replace("{provider}", "custom");
            c.admin(m, &p, Value::Null).await
        }
        ("/v1/users/{user}/credentials", "GET", 200) => {
            c.admin(m, "/v1/users/alice/credentials", Value::Null).await
        }
        ("/v1/tenants/{tenant}/credentials", "GET", 200) => {
            c.admin(m, "/v1/tenants/acme/credentials", Value::Null).await
        }
        ("/v1/users/{user}/oauth/{provider}/start", "POST", 200) => {
            c.admin(m, "/v1/users/alice/oauth/custom/start", json!({"return_to": "https://app.example/settings"}))
                .await
        }
        ("/v1/users/{user}/oauth/{provider}/start", "POST", 400) => {
            c.admin(m, "/v1/users/alice/oauth/plain/start", json!({})).await
        }
        ("/v1/users/{user}/oauth/{provider}/start", "POST", 404) => {
            c.admin(m, "/v1/users/alice/oauth/dropbox/start", json!({})).await
        }
        ("/v1/users/{user}/oauth/{provider}/start", "POST", 503) => {
            c.admin(m, "/v1/users/alice/oauth/noclient/start", json!({})).await
        }
        ("/v1/users/{user}/connect", "POST", 201) => {
            c.admin(
                m,
                "/v1/users/conny/connect",
                json!({"providers": ["custom"], "return_to": "https://app.example/settings", "ttl_secs": 600, "user_label": "Conny at Acme"}),
            )
            .await
        }
        ("/v1/users/{user}/connect", "POST", 400) => {
            // `plain` has no authorize_url: it cannot be connected.
            c.admin(m, "/v1/users/conny/connect", json!({"providers": ["plain"]}))
                .await
        }
        ("/v1/users/{user}/connect", "POST", 503) => {
            let pg = &c.pg;
            pg.timed(path, pg.sk.admin(m, "/v1/users/alice/connect", Some(json!({}))))
                .await
        }
        ("/v1/users/{user}/connect/confirm", "POST", 200) => {
            let (sk, code) = c.pending_connection().await;
            sk.admin(m, "/v1/users/alice/connect/confirm", Some(json!({ "code": code })))
                .await
        }
        ("/v1/users/{user}/connect/confirm", "POST", 400) => {
            c.admin(m, "/v1/users/alice/connect/confirm", json!({})).await
        }
        ("/v1/users/{user}/connect/confirm", "POST", 404) => {
            c.admin(m, "/v1/users/alice/connect/confirm", json!({"code": NO_SUCH_TICKET}))
                .await
        }
        ("/v1/users/{user}/connect/confirm", "POST", 503) => {
            let pg = &c.pg;
            let body = json!({"code": NO_SUCH_TICKET});
            pg.timed(path, pg.sk.admin(m, "/v1/users/alice/connect/confirm", Some(body)))
                .await
        }
        ("/v1/users/{user}/connect", "POST", 404) => {
            c.admin(m, "/v1/users/conny/connect", json!({"providers": ["dropbox"]}))
                .await
        }
        ("/v1/sessions", "POST", 201) => {
            c.admin(m, "/v1/sessions", json!({"user": "alice", "providers": ["custom"], "ttl_secs": 60}))
                .await
        }
        ("/v1/sessions", "POST", 400) => {
            c.admin(m, "/v1/sessions", json!({"user": "alice", "ttl_secs": 0})).await
        }
        ("/v1/sessions", "POST", 404) => {
            c.admin(m, "/v1/sessions", json!({"user": "alice", "providers": ["dropbox"]}))
                .await
        }
        ("/v1/sessions/{session_id}", "GET", 200) => {
            let s = c.sk.session("alice", &["custom"]).await;
            let sid = s["session_id"].as_str().unwrap();
            c.admin(m, &format!("/v1/sessions/{sid}"), Value::Null).await
        }
        ("/v1/sessions/{session_id}", "GET", 404) => {
            c.admin(m, "/v1/sessions/ses_none", Value::Null).await
        }
        ("/v1/sessions/{session_id}", "DELETE", 204) => {
            let s = c.sk.session("alice", &["custom"]).await;
            let sid = s["session_id"].as_str().unwrap();
            c.admin(m, &format!("/v1/sessions/{sid}"), Value::Null).await
        }
        ("/v1/elevenlabs/tools", "GET", 200) => {
            c.admin(m, "/v1/elevenlabs/tools", Value::Null).await
        }
        ("/v1/audit", "GET", 200) => c.admin(m, "/v1/audit?limit=5", Value::Null).await,
        ("/v1/audit", "GET", 400) => c.admin(m, "/v1/audit?limit=0", Value::Null).await,
        ("/v1/admin/backup", "POST", 200) if c.on_postgres => {
            // It copies sled stores (PostgreSQL has pg_dump, and answers
            // 400 here): a sled instance of its own.
            let sled = InProcess::start(
                Options::with_providers("[providers.custom]\nbase_url = \"http://127.0.0.1:1\"\n")
                    .store("backend = \"sled\""),
            )
            .await;
            let out = sled.dir.path().join("backup-openapi");
            sled.admin(m, "/v1/admin/backup", Some(json!({"out": out.to_string_lossy()})))
                .await
        }
        ("/v1/admin/backup", "POST", 200) => {
            let out = c.sk.dir.path().join("backup-openapi");
            c.admin(m, "/v1/admin/backup", json!({"out": out.to_string_lossy()}))
                .await
        }
        ("/v1/admin/backup", "POST", 400) => {
            c.admin(m, "/v1/admin/backup", json!({"out": "relative/dir"})).await
        }

        // ----- agent listener
        ("/v1/proxy/{provider}/{path}", _, 200) => {
            c.admin(Method::PUT, "/v1/users/alice/credentials/custom", json!({"access_token": "at-openapi"}))
                .await;
            c.proxy(method, "/v1/proxy/custom/ok/x", "").await
        }
        ("/v1/proxy/{provider}/{path}", _, 400) => {
            c.proxy(method, "/v1/proxy/custom/ok/%2e%2e/x", "").await
        }
        ("/v1/proxy/{provider}/{path}", _, 401) => {
            c.agent(m, "/v1/proxy/custom/ok/x", &[("x-sidekey-session", "not-a-jwt")], "")
                .await
        }
        ("/v1/proxy/{provider}/{path}", _, 403) => {
            c.proxy(method, "/v1/proxy/other/ok/x", "").await
        }
        ("/v1/proxy/{provider}/{path}", _, 404) => {
            c.proxy(method, "/v1/proxy/dropbox/x", "").await
        }
        ("/v1/proxy/{provider}/{path}", _, 413) => {
            c.proxy(method, "/v1/proxy/custom/ok/x", &"x".repeat(4096)).await
        }
        ("/v1/proxy/{provider}/{path}", _, 424) => {
            let t = c.sk.token("nocred", &["custom"]).await;
            c.agent(m, "/v1/proxy/custom/ok/x", &[("x-sidekey-session", &t)], "")
                .await
        }
        ("/v1/proxy/{provider}/{path}", _, 429) => {
            c.admin(Method::PUT, "/v1/users/alice/credentials/custom", json!({"access_token": "at-openapi"}))
                .await;
            let t = c.token(&["custom"]).await;
            let h = [("x-sidekey-session", t.as_str())];
            c.agent(m.clone(), "/v1/proxy/custom/ok/x", &h, "").await;
            c.agent(m, "/v1/proxy/custom/ok/x", &h, "").await
        }
        ("/v1/proxy/{provider}/{path}", _, 502) => {
            c.admin(Method::PUT, "/v1/users/alice/credentials/dead", json!({"access_token": "at-openapi"}))
                .await;
            let t = c.token(&["dead"]).await;
            c.agent(m, "/v1/proxy/dead/ok/x", &[("x-sidekey-session", &t)], "")
                .await
        }
        ("/v1/proxy/{provider}/{path}", _, 503) => {
            let pg = &c.pg;
            let h = [("x-sidekey-session", pg.token.as_str())];
            pg.timed(path, pg.sk.agent(m, "/v1/proxy/custom/ok/x", &h, ""))
                .await
        }
        ("/v1/proxy/{provider}/{path}", _, 504) => {
            c.admin(Method::PUT, "/v1/users/alice/credentials/custom", json!({"access_token": "at-openapi"}))
                .await;
            c.proxy(method, "/v1/proxy/custom/ok/slow", "").await
        }
        ("/v1/call/{provider}", "POST", 200 | 403 | 404 | 424) => {
            c.admin(Method::PUT, "/v1/users/alice/credentials/custom", json!({"access_token": "at-openapi"}))
                .await;
            let (user, provider) = match status {
                200 | 403 => ("alice", if status == 200 { "custom" } else { "other" }),
                404 => ("alice", "dropbox"),
                _ => ("nocred", "custom"),
            };
            let t = c.sk.token(user, &["custom"]).await;
            let body = json!({"method": "GET", "path": "/ok/call"}).to_string();
            c.agent(m, &format!("/v1/call/{provider}"), &[("x-sidekey-session", &t)], &body)
                .await
        }
        ("/v1/call/{provider}", "POST", 400) => {
            let t = c.token(&["custom"]).await;
            c.agent(m, "/v1/call/custom", &[("x-sidekey-session", &t)], "[1]")
                .await
        }
        ("/v1/call/{provider}", "POST", 401) => {
            c.agent(m, "/v1/call/custom", &[], r#"{"method":"GET","path":"/ok"}"#)
                .await
        }
        ("/v1/tools/{name}", "POST", 200 | 400 | 403 | 404 | 424) => {
            c.admin(Method::PUT, "/v1/users/alice/credentials/custom", json!({"access_token": "at-openapi"}))
                .await;
            let (user, tool, args) = match status {
                200 => ("alice", "ctx_tool", json!({"id": "a"})),
                400 => ("alice", "ctx_tool", json!({})),
                403 => ("alice", "other_tool", json!({})),
                404 => ("alice", "no_such_tool", json!({})),
                _ => ("nocred", "ctx_tool", json!({"id": "a"})),
            };
            let t = c.sk.token(user, &["custom"]).await;
            c.agent(m, &format!("/v1/tools/{tool}"), &[("x-sidekey-session", &t)], &args.to_string())
                .await
        }
        ("/v1/tools/{name}", "POST", 401) => {
            c.agent(m, "/v1/tools/ctx_tool", &[], r#"{"id":"a"}"#).await
        }
        ("/v1/mcp", "POST", 200) => {
            c.agent(m, "/v1/mcp", &[], r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#)
                .await
        }
        ("/v1/mcp", "POST", 202) => {
            c.agent(m, "/v1/mcp", &[], r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
                .await
        }
        ("/v1/mcp", "POST", 400) => c.agent(m, "/v1/mcp", &[], "{nope").await,
        ("/v1/mcp", "GET", 405) => c.agent(m, "/v1/mcp", &[], "").await,
        ("/v1/mcp", "DELETE", 204) => {
            let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
            let r = c.agent(Method::POST, "/v1/mcp", &[], init).await;
            let sid = r.headers["mcp-session-id"].to_str().unwrap().to_owned();
            c.agent(m, "/v1/mcp", &[("mcp-session-id", &sid)], "").await
        }
        ("/v1/mcp", "DELETE", 404) => {
            c.agent(m, "/v1/mcp", &[("mcp-session-id", "never-issued")], "")
                .await
        }
        ("/v1/session/refresh", "POST", 200) => {
            let t = c.token(&["custom"]).await;
            c.agent(m, "/v1/session/refresh", &[("x-sidekey-session", &t)], "{}")
                .await
        }
        ("/v1/session/refresh", "POST", 401) => {
            c.agent(m, "/v1/session/refresh", &[("authorization", "Bearer nope")], "{}")
                .await
        }
        ("/v1/elevenlabs/conversation-init", "POST", 200) => {
            c.agent(
                m,
                "/v1/elevenlabs/conversation-init",
                &[("x-sidekey-init-secret", support::INIT_SECRET)],
                r#"{"caller_id": "+15550001111", "agent_id": "a", "called_number": "+15550009999", "call_sid": "CA1"}"#,
            )
            .await
        }
        ("/v1/elevenlabs/conversation-init", "POST", 401) => {
            c.agent(m, "/v1/elevenlabs/conversation-init", &[], "{}").await
        }
        ("/v1/elevenlabs/post-call", "POST", 200) => {
            let body = r#"{"type":"post_call_transcription","event_timestamp":1,"data":{"conversation_id":"conv_oa_end"}}"#;
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            use hmac::Mac;
            let mut mac =
                hmac::Hmac::<Sha256>::new_from_slice(support::WEBHOOK_SECRET.as_bytes()).unwrap();
            mac.update(format!("{t}.{body}").as_bytes());
            let hex: String = mac
                .finalize()
                .into_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let sig = format!("t={t},v0={hex}");
            c.agent(m, "/v1/elevenlabs/post-call", &[("elevenlabs-signature", &sig)], body)
                .await
        }
        ("/v1/vapi/tools", "POST", 200) => {
            let msg = r#"{"message":{"type":"status-update","status":"in-progress","call":{"id":"vapi_oa"}}}"#;
            c.agent(m, "/v1/vapi/tools", &[("x-vapi-secret", support::WEBHOOK_SECRET)], msg)
                .await
        }
        ("/v1/vapi/tools", "POST", 400) => {
            c.agent(m, "/v1/vapi/tools", &[("x-vapi-secret", support::WEBHOOK_SECRET)], "[1]")
                .await
        }
        ("/v1/vapi/tools", "POST", 401) => c.agent(m, "/v1/vapi/tools", &[], "{}").await,
        ("/v1/vapi/tools" | "/v1/retell/tools/{name}" | "/v1/retell/webhook", "POST", 503) => {
            // Neither platform set up on this instance.
            let bare = InProcess::start(Options::with_providers(
                "[providers.custom]\nbase_url = \"http://127.0.0.1:1\"\n",
            ))
            .await;
            let concrete = path.replace("{name}", "ctx_tool");
            bare.agent(m, &concrete, &[], "{}".to_owned()).await
        }
        ("/v1/vapi/tools", "GET", 200) => c.admin(m, "/v1/vapi/tools", Value::Null).await,
        ("/v1/vapi/tools", "GET", 401) => c.admin_raw(m, "/v1/vapi/tools", false, "").await,
        ("/v1/retell/tools", "GET", 200) => c.admin(m, "/v1/retell/tools", Value::Null).await,
        ("/v1/retell/tools/{name}", "POST", 200) => {
            let t = c.sk.token("alice", &["custom"]).await;
            let body = json!({"name": "ctx_tool", "args": {"id": "a"}, "call": {
                "call_id": "retell_oa", "retell_llm_dynamic_variables": {"sidekey_session": t}}})
            .to_string();
            let sig = retell_signature(&body);
            let r = c
                .agent(m, "/v1/retell/tools/ctx_tool", &[("x-retell-signature", &sig)], &body)
                .await;
            // A refusal is a 200 too: this one must be the upstream's answer.
            assert!(r.headers.get("x-sidekey-error").is_none(), "{}", r.text());
            assert!(r.text().contains("/ok/tool/a"), "{}", r.text());
            r
        }
        ("/v1/retell/tools/{name}", "POST", 401) => {
            c.agent(m, "/v1/retell/tools/ctx_tool", &[("x-retell-signature", "v=1,d=00")], "{}")
                .await
        }
        ("/v1/retell/webhook", "POST", 200) => {
            let body = r#"{"event":"transcript_updated","call":{"call_id":"retell_oa"}}"#;
            let sig = retell_signature(body);
            c.agent(m, "/v1/retell/webhook", &[("x-retell-signature", &sig)], body)
                .await
        }
        ("/v1/retell/webhook", "POST", 401) => {
            c.agent(m, "/v1/retell/webhook", &[], "{}").await
        }
        ("/v1/elevenlabs/post-call", "POST", 401) => {
            c.agent(m, "/v1/elevenlabs/post-call", &[("elevenlabs-signature", "t=1,v0=00")], "{}")
                .await
        }
        ("/oauth/{provider}/callback", "GET", 200) => {
            let (state, cookie) = c.bound_flow(None, "code-oa-200").await;
            c.callback("code-oa-200", &state, Some(&cookie)).await
        }
        ("/oauth/{provider}/callback", "GET", 303) => {
            let (state, cookie) = c
                .bound_flow(Some("https://app.example/settings"), "code-oa-303")
                .await;
            c.callback("code-oa-303", &state, Some(&cookie)).await
        }
        ("/oauth/{provider}/callback", "GET", 400) => {
            c.agent(m, "/oauth/custom/callback?code=x&state=unknown", &[], "").await
        }
        ("/oauth/{provider}/callback", "GET", 403) => {
            // `[oauth] bind_browser` defaults on: the bare authorize_url's
            // callback, in a browser that never opened connect_url.
            let (state, _) = c
                .start_flow(Some("https://app.example/settings"), "code-oa-403")
                .await;
            c.callback("code-oa-403", &state, None).await
        }
        ("/oauth/{provider}/callback", "GET", 503) => {
            let pg = &c.pg;
            pg.timed(path, pg.callback()).await
        }
        ("/oauth/{provider}/callback", "GET", 502) => {
            // A code the token endpoint never issued: the exchange is refused.
            let (state, cookie) = c.bound_flow(None, "code-oa-502").await;
            c.callback("code-oa-never-issued", &state, Some(&cookie)).await
        }

        // ----- the connect page
        ("/connect/{ticket}", "GET", 200) => {
            let path = c.link(json!({"providers": ["custom"]})).await;
            c.agent(m, &path, &[], "").await
        }
        ("/connect/{ticket}", "GET", 303) => {
            let (_, path) = c.start_flow(None, "code-oa-page-303").await;
            c.agent(m, &path, &[], "").await
        }
        ("/connect/{ticket}", "GET", 403) => {
            let (path, _, _) = c.opened_link().await;
            c.agent(m, &path, &[], "").await
        }
        ("/connect/{ticket}", "GET", 404) => {
            c.agent(m, &format!("/connect/{NO_SUCH_TICKET}"), &[], "")
                .await
        }
        ("/connect/{ticket}", "GET", 503) => {
            let pg = &c.pg;
            let (p, cookie, _) = &pg.link;
            let cookie = format!("__Host-sidekey-connect={cookie}");
            pg.timed(path, pg.sk.agent(m, p, &[("cookie", &cookie)], ""))
                .await
        }
        ("/connect/{ticket}", "GET", 410) => {
            let path = c.expired_link().await;
            c.agent(m, &path, &[], "").await
        }
        ("/connect/{ticket}/claim", "POST", _) => match status {
            303 => {
                let (p, csrf) = c.unclaimed_link().await;
                c.form(&format!("{p}/claim"), None, &[("csrf", &csrf)]).await
            }
            400 => {
                let (p, _) = c.unclaimed_link().await;
                let big = "x".repeat(9 * 1024);
                c.form(&format!("{p}/claim"), None, &[("csrf", &big)]).await
            }
            403 => {
                let (p, _) = c.unclaimed_link().await;
                c.form(&format!("{p}/claim"), None, &[("csrf", "forged")]).await
            }
            404 => {
                c.form(&format!("/connect/{NO_SUCH_TICKET}/claim"), None, &[("csrf", "x")])
                    .await
            }
            410 => {
                let p = c.expired_link().await;
                c.form(&format!("{p}/claim"), None, &[("csrf", "x")]).await
            }
            503 => {
                let pg = &c.pg;
                let p = format!("{}/claim", pg.link.0);
                pg.timed(path, form(&pg.sk, &p, None, &[("csrf", "x")])).await
            }
            _ => return None,
        },
        ("/connect/{ticket}/connect" | "/connect/{ticket}/disconnect", "POST", _) => {
            let action = path.rsplit('/').next().unwrap();
            match status {
                303 => {
                    c.admin(Method::PUT, "/v1/users/conny/credentials/custom", json!({"access_token": "at-openapi"}))
                        .await;
                    let (p, cookie, csrf) = c.opened_link().await;
                    c.form(&format!("{p}/{action}"), Some(&cookie), &[("csrf", &csrf), ("provider", "custom")])
                        .await
                }
                400 => {
                    // `other` is configured, but not on this link.
                    let (p, cookie, csrf) = c.opened_link().await;
                    c.form(&format!("{p}/{action}"), Some(&cookie), &[("csrf", &csrf), ("provider", "other")])
                        .await
                }
                403 => {
                    let (p, cookie, _) = c.opened_link().await;
                    c.form(&format!("{p}/{action}"), Some(&cookie), &[("csrf", "forged"), ("provider", "custom")])
                        .await
                }
                404 => {
                    c.form(&format!("/connect/{NO_SUCH_TICKET}/{action}"), None, &[("csrf", "x"), ("provider", "custom")])
                        .await
                }
                503 => {
                    let pg = &c.pg;
                    let (p, cookie, csrf) = &pg.link;
                    let p = format!("{p}/{action}");
                    let f = [("csrf", csrf.as_str()), ("provider", "custom")];
                    pg.timed(path, form(&pg.sk, &p, Some(cookie), &f)).await
                }
                410 => {
                    let p = c.expired_link().await;
                    c.form(&format!("{p}/{action}"), None, &[("csrf", "x"), ("provider", "custom")])
                        .await
                }
                _ => return None,
            }
        }
        ("/connect/assets/style.css", "GET", 200) => {
            c.agent(m, "/connect/assets/style.css", &[], "").await
        }
        // Any admin write: a body over the admin API's 1 MiB.
        (p, "PUT" | "POST", 413)
            if p.starts_with("/v1/users")
                || p.starts_with("/v1/tenants")
                || p == "/v1/sessions"
                || p == "/v1/admin/backup" =>
        {
            let p = p
                .replace("{user}", "alice")
                .replace("{tenant}", "acme")
                .replace("{provider}", "custom");
            let big = format!("{{\"x\": \"{}\"}}", "a".repeat(1 << 20));
            c.admin_raw(m, &p, true, &big).await
        }
        // Any admin operation with an id in its path: a malformed one.
        (p, _, 400) if p.contains("{user}") || p.contains("{tenant}") => {
            let p = p
                .replace("{user}", "a%20b")
                .replace("{tenant}", "a%20b")
                .replace("{provider}", "custom");
            let body = if m == Method::PUT {
                json!({"access_token": "x"})
            } else {
                Value::Null
            };
            c.admin(m, &p, body).await
        }
        _ => return None,
    };
    Some(r)
}

/// `{anything}` → `{}`, a trailing `{path...}` → `{}`, query dropped.
/// `v=<ms>,d=<hex HMAC-SHA256(api key, body + v)>`; the test instance's
/// Retell API key is the webhook secret's file.
fn retell_signature(body: &str) -> String {
    use hmac::Mac;
    let v = (support::unix_now() * 1000).to_string();
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(support::WEBHOOK_SECRET.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    mac.update(v.as_bytes());
    let d: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("v={v},d={d}")
}

fn normalise(path: &str) -> String {
    let path = path.split('?').next().unwrap_or(path);
    let mut out = String::new();
    let mut inside = false;
    for c in path.chars() {
        match c {
            '{' => {
                inside = true;
                out.push_str("{}");
            }
            '}' => inside = false,
            _ if !inside => out.push(c),
            _ => {}
        }
    }
    out
}

/// The API tables (docs/api.md, and the README's short one) and the
/// description list the same API: every route a table names is described,
/// and every described route has a row in docs/api.md.
#[test]
fn documented_routes_are_all_described() {
    let doc = spec();
    let operations = [
        "get", "put", "post", "delete", "patch", "head", "options", "trace",
    ];
    let mut described = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        // A path item also holds `parameters`, `servers`, …: only operations count.
        for m in item.as_object().unwrap().keys() {
            if operations.contains(&m.as_str()) {
                described.insert(format!("{} {}", m.to_uppercase(), normalise(path)));
            }
        }
    }
    let mut in_api_md = BTreeSet::new();
    for (file, min) in [("docs/api.md", 30), ("README.md", 6)] {
        let text =
            std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let mut routes = 0;
        for line in text.lines().filter(|l| l.starts_with("| ")) {
            let Some(cell) = line.split(" | ").next() else {
                continue;
            };
            // Cells look like `| \`GET /v1/users/{user}\`` or `PUT\|GET /…`.
            for code in cell.split('`').skip(1).step_by(2) {
                let Some((methods, path)) = code.split_once(' ') else {
                    continue;
                };
                if !path.starts_with('/') {
                    continue;
                }
                for m in methods.split("\\|") {
                    let ms: Vec<&str> = if m == "ANY" {
                        vec!["GET", "POST", "PUT", "PATCH", "DELETE"]
                    } else {
                        vec![m]
                    };
                    for m in ms {
                        let key = format!("{m} {}", normalise(path));
                        assert!(
                            described.contains(&key),
                            "{file} names {key}, docs/openapi.json does not describe it"
                        );
                        if file == "docs/api.md" {
                            in_api_md.insert(key);
                        }
                        routes += 1;
                    }
                }
            }
        }
        assert!(
            routes >= min,
            "only {routes} routes found in {file}'s tables"
        );
    }
    let missing: Vec<&String> = described.difference(&in_api_md).collect();
    assert!(
        missing.is_empty(),
        "docs/openapi.json describes {missing:?}, docs/api.md's tables do not list them"
    );
}

/// The description is valid OpenAPI 3.1 (checked with the Python
/// openapi-spec-validator where it is installed).
#[test]
fn openapi_is_valid_where_a_validator_is_installed() {
    let have = std::process::Command::new("python3")
        .args(["-c", "import openapi_spec_validator"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("openapi-spec-validator not installed: validity not checked here");
        return;
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import json,sys; from openapi_spec_validator import validate; validate(json.load(open(sys.argv[1])))",
            concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docs/openapi.json is not valid OpenAPI: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn openapi_matches_the_running_server() {
    let doc = spec();
    assert_eq!(doc["openapi"], "3.1.0");
    let up = Upstream::start_with(std::sync::Arc::new(|r: &Recorded| {
        if r.path.ends_with("/slow") {
            Reply::Delay(
                std::time::Duration::from_secs(3),
                Box::new(support::upstream::echo(r)),
            )
        } else {
            support::upstream::echo(r)
        }
    }))
    .await;
    let tokens = TokenServer::start().await;
    let authorize = format!("{}/authorize", up.url);
    let providers = format!(
        "[providers.custom]\nbase_url = \"{u}\"\nallow = [\"/ok/**\"]\ntoken_url = \"{t}\"\nauthorize_url = \"{authorize}\"\nclient_id = \"test-client\"\nclient_secret = \"test-client-secret\"\n\n\
         [providers.other]\nbase_url = \"{u}\"\n\n\
         [providers.dead]\nbase_url = \"http://127.0.0.1:1\"\n\n\
         [providers.plain]\nbase_url = \"{u}\"\n\n\
         [providers.noclient]\nbase_url = \"{u}\"\ntoken_url = \"{t}\"\nauthorize_url = \"{authorize}\"\n\n\
         [tools.ctx_tool]\nprovider = \"custom\"\npath = \"/ok/tool/{{id}}\"\n[tools.ctx_tool.params]\nid = {{ type = \"string\", required = true }}\n\n\
         [tools.other_tool]\nprovider = \"other\"\npath = \"/ok/other\"\n\n\
         [limits]\nper_session_rps = 0.5\nper_session_burst = 1\n\n\
         [vapi]\nsecret_file = \"webhook.secret\"\n\n\
         [retell]\napi_key_file = \"webhook.secret\"\n",
        u = up.url,
        t = tokens.url,
    );
    let opts = Options::with_providers(&providers)
        .server("max_body_bytes = 1024\nupstream_timeout_secs = 1");
    let on_postgres = opts.on_postgres();
    let sk = InProcess::start(opts).await;
    let pg = StoreDown::start(&up.url, &tokens).await;
    let c = Ctx {
        sk,
        up,
        tokens,
        pg,
        on_postgres,
    };
    // The served description is the committed file.
    let r = c.admin(Method::GET, "/v1/openapi.json", Value::Null).await;
    assert_eq!(r.json(), doc);

    let mut checked = 0;
    let mut pending = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let Ok(m) = method.to_uppercase().parse::<Method>() else {
                continue;
            };
            if !["GET", "PUT", "POST", "DELETE", "PATCH"].contains(&m.as_str()) {
                continue;
            }
            let admin = item["servers"][0]["url"]
                .as_str()
                .unwrap()
                .starts_with("http://");
            if let Some(why) = op.get("x-sidekey-pending") {
                // Not served yet: the route must not answer as if it were.
                let concrete = path.replace("{user}", "alice").replace("{ticket}", "t1");
                let r = if admin {
                    c.admin(m.clone(), &concrete, json!({})).await
                } else {
                    c.agent(m.clone(), &concrete, &[], "").await
                };
                assert!(
                    [404, 405].contains(&r.status.as_u16()),
                    "{method} {path} is marked x-sidekey-pending ({why}) but answers {}: remove the mark and add a scenario",
                    r.status
                );
                pending.insert(format!("{} {path}", m));
                continue;
            }
            for (status, resp) in op["responses"].as_object().unwrap() {
                let code: u16 = status.parse().unwrap();
                let resp = resolve(&doc, resp);
                if let Some(why) = resp.get("x-sidekey-pending") {
                    pending.insert(format!("{m} {path} {status} ({})", why.as_str().unwrap()));
                    continue;
                }
                let what = format!("{m} {path} → {status}");
                let r = if code == 401 && admin {
                    let concrete = path
                        .replace("{user}", "alice")
                        .replace("{tenant}", "acme")
                        .replace("{provider}", "custom")
                        .replace("{session_id}", "ses_x");
                    c.admin_raw(m.clone(), &concrete, false, "{}").await
                } else {
                    provoke(&c, path, &m, code).await.unwrap_or_else(|| {
                        panic!("{what}: documented, but no scenario provokes it")
                    })
                };
                assert_eq!(r.status.as_u16(), code, "{what}: {}", r.text());
                for (name, h) in resp
                    .get("headers")
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                {
                    let h = resolve(&doc, h);
                    match r.headers.get(name.as_str()) {
                        None => assert!(
                            !h["required"].as_bool().unwrap_or(false),
                            "{what}: header {name} missing"
                        ),
                        Some(v) => {
                            let v = json!(v.to_str().unwrap());
                            if let Err(e) = validate(&doc, &h["schema"], &v, name) {
                                panic!("{what}: {e}");
                            }
                        }
                    }
                }
                for name in resp
                    .get("x-sidekey-absent-headers")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let name = name.as_str().unwrap();
                    assert!(
                        r.headers.get(name).is_none(),
                        "{what}: {name} must be absent: {:?}",
                        r.headers.get(name)
                    );
                }
                if let Some(codes) = resp.get("x-sidekey-codes").and_then(Value::as_array) {
                    let got = r.error_code();
                    assert!(
                        codes.iter().any(|c| c == &json!(got)),
                        "{what}: error code {got} not documented ({codes:?})"
                    );
                }
                if let Some(content) = resp.get("content").and_then(Value::as_object) {
                    let got_ct = r
                        .headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    // The documented media type the answer is (several for
                    // a negotiated answer such as /metrics).
                    let (ct, media) = content
                        .iter()
                        .find(|(ct, _)| got_ct.starts_with(ct.as_str()))
                        .unwrap_or_else(|| content.iter().next().unwrap());
                    if ct != "*/*" {
                        assert!(
                            got_ct.starts_with(ct.as_str()),
                            "{what}: content-type {got_ct}, documented {ct}"
                        );
                    }
                    if ct == "application/json" {
                        if let Some(schema) = media.get("schema") {
                            if let Err(e) = validate(&doc, schema, &r.json(), "body") {
                                panic!("{what}: {e}");
                            }
                        }
                    }
                }
                checked += 1;
            }
        }
    }
    eprintln!("checked {checked} path/method/status combinations; pending: {pending:#?}");

    // The 503 callback page says the state was not consumed: once the
    // database is back, the same callback completes.
    c.pg.cluster.ctl("start");
    let started = Instant::now();
    loop {
        let r = c.pg.callback().await;
        if r.status != 503 {
            assert_eq!(r.status, 200, "after the outage: {}", r.text());
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "store never back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r =
        c.pg.sk
            .admin(Method::GET, "/v1/users/olga/credentials/custom", None)
            .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(checked > 80, "only {checked} checked");
    assert!(c.up.count() > 0);
}

/// Token shapes seen in the wild (Authlib and requests-oauthlib token
/// dicts, Entra, PHP servers) and hand-built bodies: the request schema
/// the description gives for a credential PUT accepts exactly what the
/// server accepts.
#[tokio::test]
async fn credential_request_schema_accepts_what_the_server_accepts() {
    let root = spec();
    let schema = json!({"$ref": "#/components/schemas/CredentialInput"});
    let up = Upstream::start().await;
    let sk = InProcess::start(Options::with_providers(&support::provider_toml(
        "custom",
        &up.url,
        "inject = \"bearer\"",
    )))
    .await;
    let shapes = [
        (
            json!({"access_token": "a", "token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599}),
            true,
        ),
        (
            json!({"access_token": "a", "token_type": "Bearer", "expires_in": "3599"}),
            true,
        ),
        (
            json!({"access_token": "a", "token_type": "Bearer", "expires_in": 3599.0, "scope": ["a", "b"]}),
            true,
        ),
        (
            json!({"access_token": "a", "token_type": "bearer", "expires_at": 1_900_000_000, "expires_in": 3599, "refresh_token": "r", "id_token": "x"}),
            true,
        ),
        (
            json!({"access_token": "a", "token_type": "Bearer", "scope": "a b", "refresh_token": null}),
            true,
        ),
        (
            json!({"access_token": "a", "expires_in": 60, "scopes": ["x"]}),
            true,
        ),
        (
            json!({"access_token": "a", "scope": "a,b", "connection": {}}),
            true,
        ),
        (json!({"access_token": "a", "refesh_token": "typo"}), false),
        (
            json!({"access_token": "a", "token_type": "Bearer", "expires_in": "soon"}),
            false,
        ),
        (json!({"access_token": "a", "expires_in": true}), false),
        (json!({"access_token": 5}), false),
        (json!({"access_token": "a", "scope": 7}), false),
    ];
    for (i, (body, accepted)) in shapes.iter().enumerate() {
        let r = sk
            .admin(
                Method::PUT,
                &format!("/v1/users/shape{i}/credentials/custom"),
                Some(body.clone()),
            )
            .await;
        let server = r.status == 200 || r.status == 201;
        assert_eq!(
            server,
            *accepted,
            "server on {body}: {} {}",
            r.status,
            r.text()
        );
        let described = validate(&root, &schema, body, "body");
        assert_eq!(
            described.is_ok(),
            *accepted,
            "description on {body}: {described:?}"
        );
    }
}

/// A 405 from the admin API names the methods the path answers.
#[tokio::test]
async fn admin_405_names_the_allowed_methods() {
    let up = Upstream::start().await;
    let sk = InProcess::start(Options::with_providers(&support::provider_toml(
        "custom",
        &up.url,
        "inject = \"bearer\"",
    )))
    .await;
    for (method, path, allow) in [
        (Method::TRACE, "/v1/users", "GET"),
        (Method::PATCH, "/v1/users/alice", "GET, PUT, DELETE"),
        (
            Method::POST,
            "/v1/users/alice/credentials/custom",
            "GET, PUT, DELETE",
        ),
        (Method::GET, "/v1/sessions", "POST"),
        (Method::PUT, "/v1/sessions/abc", "GET, DELETE"),
        (Method::DELETE, "/v1/audit", "GET"),
    ] {
        let r = sk.admin(method.clone(), path, None).await;
        r.assert_error(405, "method_not_allowed");
        assert_eq!(
            r.headers.get("allow").and_then(|v| v.to_str().ok()),
            Some(allow),
            "{method} {path}"
        );
    }
}
