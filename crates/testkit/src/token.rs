//! A fake OAuth token endpoint: counts calls, issues and rotates tokens
//! (refresh tokens are single-use when rotating, as at real providers),
//! verifies PKCE, and can be told to fail. With theft detection on it
//! behaves like providers that treat a reused refresh token as stolen
//! (RFC 9700 §4.14.2): the whole chain of tokens issued from it is revoked
//! and the user is logged out. Hooks let a test act at the moment a call
//! arrives and the moment its answer leaves.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

#[derive(Clone, Debug, PartialEq)]
pub enum Mode {
    Ok,
    /// 400 {"error": "invalid_grant"} (or Slack's 200 ok:false invalid_refresh_token).
    InvalidGrant,
    /// 500
    ServerError,
    /// Waits, then answers as `Ok`.
    Slow(Duration),
    /// 400 with this error code.
    Error(String),
}

pub struct State {
    pub mode: Mode,
    pub calls: usize,
    pub grants: Vec<String>,
    /// Rotate refresh tokens (each one works once).
    pub rotate: bool,
    pub expires_in: i64,
    /// Also answer this `expires_at` (unix seconds) when set; sidekey takes
    /// the earlier of the two.
    pub expires_at: Option<i64>,
    pub valid_refresh: HashSet<String>,
    pub valid_access: HashSet<String>,
    counter: u64,
    /// code → (PKCE challenge, redirect_uri)
    codes: HashMap<String, (String, String)>,
    pub last_form: HashMap<String, String>,
    pub last_basic: Option<(String, String)>,
    /// Slack's conventions: `ok` field, errors as 200 ok:false.
    pub slack: bool,
    pub client_id: String,
    pub client_secret: String,
    /// Presentations of each refresh token, counted as calls arrive.
    pub presented: HashMap<String, usize>,
    /// Revoke a refresh token's whole chain when it is presented twice.
    pub theft_detection: bool,
    /// Chains revoked for reuse (by the chain's first refresh token).
    pub revoked_chains: HashSet<String>,
    /// Refresh token → the first refresh token of its chain.
    chain_of: HashMap<String, String>,
    /// Access token → its chain.
    access_chain: HashMap<String, String>,
    hook: Option<tokio::sync::mpsc::UnboundedSender<Hook>>,
    /// The last request's Content-Type (Notion takes a JSON body).
    pub last_content_type: Option<String>,
    /// Extra top-level fields of every successful answer (Salesforce's
    /// `instance_url`).
    pub extra_answer: serde_json::Map<String, Value>,
    /// Never issue a refresh token, not even for a code (GitHub OAuth Apps).
    pub no_refresh: bool,
    /// JWT assertions: jwt-bearer grants and private_key_jwt clients.
    pub jwt: super::jwt::Verifier,
    /// This endpoint's own URL (the `aud` of client assertions).
    pub url: String,
}

/// Where a refresh call is when the hook runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// Received and counted, before any `Mode::Slow` delay.
    Arrived,
    /// The answer is about to be written.
    Answering,
}

/// A refresh call paused at `point`: it goes on once `go` is sent (or
/// dropped).
pub struct Hook {
    pub point: Point,
    pub refresh_token: String,
    pub go: tokio::sync::oneshot::Sender<()>,
}

#[derive(Clone)]
pub struct TokenServer {
    /// `http://127.0.0.1:PORT/token`
    pub url: String,
    pub state: Arc<Mutex<State>>,
}

impl TokenServer {
    pub async fn start() -> TokenServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            mode: Mode::Ok,
            calls: 0,
            grants: Vec::new(),
            rotate: true,
            expires_in: 3600,
            expires_at: None,
            valid_refresh: HashSet::new(),
            valid_access: HashSet::new(),
            counter: 0,
            codes: HashMap::new(),
            last_form: HashMap::new(),
            last_basic: None,
            slack: false,
            client_id: "test-client".into(),
            client_secret: "test-client-secret".into(),
            presented: HashMap::new(),
            theft_detection: false,
            revoked_chains: HashSet::new(),
            chain_of: HashMap::new(),
            access_chain: HashMap::new(),
            hook: None,
            last_content_type: None,
            extra_answer: serde_json::Map::new(),
            no_refresh: false,
            jwt: Default::default(),
            url: format!("http://{addr}/token"),
        }));
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(st, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        TokenServer {
            url: format!("http://{addr}/token"),
            state,
        }
    }

    pub fn calls(&self) -> usize {
        self.state.lock().unwrap().calls
    }

    pub fn set_mode(&self, m: Mode) {
        self.state.lock().unwrap().mode = m;
    }

    pub fn set_rotate(&self, r: bool) {
        self.state.lock().unwrap().rotate = r;
    }

    pub fn set_slack(&self, s: bool) {
        self.state.lock().unwrap().slack = s;
    }

    pub fn set_expires_in(&self, s: i64) {
        self.state.lock().unwrap().expires_in = s;
    }

    pub fn set_expires_at(&self, at: Option<i64>) {
        self.state.lock().unwrap().expires_at = at;
    }

    /// Registers a refresh token the fake will accept (once, if rotating).
    pub fn issue_refresh(&self, rt: &str) {
        self.state.lock().unwrap().valid_refresh.insert(rt.into());
    }

    /// Treat a refresh token presented twice as stolen: revoke its chain.
    pub fn set_theft_detection(&self, on: bool) {
        self.state.lock().unwrap().theft_detection = on;
    }

    /// How many times `rt` was presented.
    pub fn presented(&self, rt: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .presented
            .get(rt)
            .copied()
            .unwrap_or(0)
    }

    /// Refresh tokens presented more than once, with their counts.
    pub fn reused(&self) -> Vec<(String, usize)> {
        let st = self.state.lock().unwrap();
        let mut v: Vec<_> = st
            .presented
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(k, n)| (k.clone(), *n))
            .collect();
        v.sort();
        v
    }

    /// Chains revoked for reuse: users the provider logged out.
    pub fn revoked_chains(&self) -> usize {
        self.state.lock().unwrap().revoked_chains.len()
    }

    /// Every refresh call from now on pauses at each [`Point`] until the
    /// test lets it go.
    pub fn hooks(&self) -> tokio::sync::mpsc::UnboundedReceiver<Hook> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.state.lock().unwrap().hook = Some(tx);
        rx
    }

    /// Registers an access token the fake upstream should accept.
    pub fn issue_access(&self, at: &str) {
        self.state.lock().unwrap().valid_access.insert(at.into());
    }

    pub fn is_valid_access(&self, at: &str) -> bool {
        self.state.lock().unwrap().valid_access.contains(at)
    }

    pub fn revoke_access(&self, at: &str) {
        self.state.lock().unwrap().valid_access.remove(at);
    }

    /// Registers an authorization code for a PKCE challenge and redirect URI
    /// (an empty challenge: a code issued without PKCE).
    pub fn register_code(&self, code: &str, challenge: &str, redirect_uri: &str) {
        self.state
            .lock()
            .unwrap()
            .codes
            .insert(code.into(), (challenge.into(), redirect_uri.into()));
    }

    pub fn last_form(&self) -> HashMap<String, String> {
        self.state.lock().unwrap().last_form.clone()
    }

    pub fn last_basic(&self) -> Option<(String, String)> {
        self.state.lock().unwrap().last_basic.clone()
    }

    /// Every access and refresh token the fake ever issued or accepted, for
    /// secret scans.
    /// Adds a top-level field to every successful answer.
    pub fn set_answer_field(&self, k: &str, v: Value) {
        self.state.lock().unwrap().extra_answer.insert(k.into(), v);
    }

    /// Never issues a refresh token.
    pub fn set_no_refresh(&self, on: bool) {
        self.state.lock().unwrap().no_refresh = on;
    }

    /// Changes what the fake's authorization server trusts and expects.
    pub fn jwt<T>(&self, f: impl FnOnce(&mut super::jwt::Verifier) -> T) -> T {
        f(&mut self.state.lock().unwrap().jwt)
    }

    pub fn last_content_type(&self) -> Option<String> {
        self.state.lock().unwrap().last_content_type.clone()
    }

    pub fn all_tokens(&self) -> Vec<String> {
        let s = self.state.lock().unwrap();
        s.valid_access
            .iter()
            .chain(s.valid_refresh.iter())
            .cloned()
            .chain((1..=s.counter).flat_map(|n| {
                [
                    format!("at-{n}-{}", s.client_id),
                    format!("rt-{n}-{}", s.client_id),
                ]
            }))
            .collect()
    }
}

fn reply(status: u16, v: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())))
        .unwrap()
}

fn error(st: &State, code: &str, status: u16) -> Response<Full<Bytes>> {
    if st.slack {
        reply(200, json!({"ok": false, "error": code}))
    } else {
        reply(
            status,
            json!({"error": code, "error_description": "fake token endpoint says no"}),
        )
    }
}

async fn handle(state: Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let basic = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            s.split_once(':').map(|(a, b)| {
                let d = |x: &str| {
                    url::form_urlencoded::parse(format!("x={x}").as_bytes())
                        .next()
                        .map(|(_, v)| v.into_owned())
                        .unwrap_or_default()
                };
                (d(a), d(b))
            })
        });
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    // A JSON object body (Notion) is read as the same parameters.
    let form: HashMap<String, String> = if content_type.as_deref() == Some("application/json") {
        serde_json::from_slice::<serde_json::Map<String, Value>>(&body)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| v.as_str().map(|v| (k, v.to_owned())))
            .collect()
    } else {
        url::form_urlencoded::parse(&body).into_owned().collect()
    };
    let presented = form
        .get("refresh_token")
        .filter(|_| form.get("grant_type").map(String::as_str) == Some("refresh_token"))
        .cloned();
    let (mode, hook) = {
        let mut st = state.lock().unwrap();
        st.calls += 1;
        st.last_form = form.clone();
        st.last_basic = basic.clone();
        st.last_content_type = content_type.clone();
        st.grants
            .push(form.get("grant_type").cloned().unwrap_or_default());
        if let Some(rt) = &presented {
            let n = st.presented.entry(rt.clone()).or_default();
            *n += 1;
            if *n > 1 && st.theft_detection {
                // Reuse: the provider cannot tell the thief from the user,
                // so every token of the chain dies.
                let chain = st.chain_of.get(rt).cloned().unwrap_or_else(|| rt.clone());
                revoke_chain(&mut st, &chain);
            }
        }
        (st.mode.clone(), st.hook.clone())
    };
    let pause = |point: Point| {
        let hook = hook.clone();
        let rt = presented.clone();
        async move {
            if let (Some(h), Some(rt)) = (hook, rt) {
                let (go, wait) = tokio::sync::oneshot::channel();
                if h.send(Hook {
                    point,
                    refresh_token: rt,
                    go,
                })
                .is_ok()
                {
                    let _ = wait.await;
                }
            }
        }
    };
    pause(Point::Arrived).await;
    match &mode {
        Mode::Slow(d) => tokio::time::sleep(*d).await,
        Mode::ServerError => return reply(500, json!({"error": "server_error"})),
        _ => {}
    }
    let answer = answer(&state, mode, &form, &basic);
    pause(Point::Answering).await;
    answer
}

/// Every token of the chain that started with refresh token `chain` stops
/// working.
fn revoke_chain(st: &mut State, chain: &str) {
    st.revoked_chains.insert(chain.to_owned());
    let dead: Vec<String> = st
        .chain_of
        .iter()
        .filter(|(_, c)| c.as_str() == chain)
        .map(|(rt, _)| rt.clone())
        .chain([chain.to_owned()])
        .collect();
    for rt in dead {
        st.valid_refresh.remove(&rt);
    }
    let dead: Vec<String> = st
        .access_chain
        .iter()
        .filter(|(_, c)| c.as_str() == chain)
        .map(|(at, _)| at.clone())
        .collect();
    for at in dead {
        st.valid_access.remove(&at);
    }
}

fn answer(
    state: &Mutex<State>,
    mode: Mode,
    form: &HashMap<String, String>,
    basic: &Option<(String, String)>,
) -> Response<Full<Bytes>> {
    let mut st = state.lock().unwrap();
    if let Mode::Error(code) = &mode {
        return error(&st, code, 400);
    }
    if mode == Mode::InvalidGrant {
        let code = if st.slack {
            "invalid_refresh_token"
        } else {
            "invalid_grant"
        };
        return error(&st, code, 400);
    }
    let grant = form.get("grant_type").map(String::as_str).unwrap_or("");
    // Client authentication: a signed client assertion, or body or basic
    // (a jwt-bearer grant authenticates by its own assertion).
    let url = st.url.clone();
    match st.jwt.client_assertion(form, &url) {
        Some(Ok(_)) => {}
        Some(Err(_)) => return error(&st, "invalid_client", 401),
        None if grant == super::jwt::JWT_BEARER && basic.is_none() => {}
        None => {
            let (cid, csec) = match &basic {
                Some((a, b)) => (a.clone(), b.clone()),
                None => (
                    form.get("client_id").cloned().unwrap_or_default(),
                    form.get("client_secret").cloned().unwrap_or_default(),
                ),
            };
            if cid != st.client_id || csec != st.client_secret {
                return error(&st, "invalid_client", 401);
            }
        }
    }
    let mut issue_refresh = st.rotate;
    let mut chain = None;
    match grant {
        "refresh_token" => {
            let rt = form.get("refresh_token").cloned().unwrap_or_default();
            chain = Some(st.chain_of.get(&rt).cloned().unwrap_or_else(|| rt.clone()));
            if !st.valid_refresh.contains(&rt) {
                let code = if st.slack {
                    "invalid_refresh_token"
                } else {
                    "invalid_grant"
                };
                return error(&st, code, 400);
            }
            if st.rotate {
                st.valid_refresh.remove(&rt);
            }
        }
        "authorization_code" => {
            let code = form.get("code").cloned().unwrap_or_default();
            let Some((challenge, redirect)) = st.codes.remove(&code) else {
                return error(&st, "invalid_grant", 400);
            };
            // An empty challenge: a provider without PKCE (Shopify), which
            // must then be sent no verifier at all.
            let pkce_ok = match form.get("code_verifier") {
                None => challenge.is_empty(),
                Some(verifier) => {
                    base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .encode(Sha256::digest(verifier.as_bytes()))
                        == challenge
                }
            };
            if !pkce_ok || form.get("redirect_uri") != Some(&redirect) {
                return error(&st, "invalid_grant", 400);
            }
            issue_refresh = true;
        }
        "client_credentials" => {
            issue_refresh = false;
        }
        super::jwt::JWT_BEARER => {
            let assertion = form.get("assertion").cloned().unwrap_or_default();
            if let Err((code, _)) = st.jwt.grant(&assertion) {
                return error(&st, code, 400);
            }
            issue_refresh = false;
        }
        _ => return error(&st, "unsupported_grant_type", 400),
    }
    st.counter += 1;
    let n = st.counter;
    let at = format!("at-{n}-{}", st.client_id);
    st.valid_access.insert(at.clone());
    if let Some(c) = &chain {
        st.access_chain.insert(at.clone(), c.clone());
    }
    let mut v = json!({"access_token": at, "token_type": "Bearer", "expires_in": st.expires_in, "scope": "read write"});
    for (k, x) in st.extra_answer.clone() {
        v[k] = x;
    }
    if issue_refresh && !st.no_refresh {
        let rt = format!("rt-{n}-{}", st.client_id);
        st.valid_refresh.insert(rt.clone());
        if let Some(c) = &chain {
            st.chain_of.insert(rt.clone(), c.clone());
        }
        v["refresh_token"] = json!(rt);
    }
    if let Some(at) = st.expires_at {
        v["expires_at"] = json!(at);
    }
    if st.slack {
        v["ok"] = json!(true);
    }
    reply(200, v)
}

/// The upstream answers 401 unless the bearer token is one `tok` issued
/// (or was told about); on success it echoes the path and body.
pub fn require_valid_token(up: &super::upstream::Upstream, tok: &TokenServer) {
    let t = tok.clone();
    up.set_handler(move |r| match r.bearer() {
        Some(b) if t.is_valid_access(&b) => super::upstream::Reply::Json(
            200,
            json!({"ok": true, "path": r.path, "body": String::from_utf8_lossy(&r.body)}),
        ),
        _ => super::upstream::Reply::Json(401, json!({"error": "invalid_token"})),
    });
}
