//! Hostile input against both listeners.
//!
//! Most of this file is one table of attacks per group: forged and broken
//! session tokens, path traversal in every encoding, transport-level abuse,
//! malformed admin input, OAuth state games, and forged webhooks. Every case
//! states the answer it must get — sidekey's status and error code (JSON
//! body and `X-Sidekey-Error` header), an HTML page, or the status hyper
//! itself answers with when it refuses a request before sidekey sees it —
//! and every case is also checked against the fake upstream and the fake
//! token endpoint, neither of which may see anything. Each group ends with a
//! control request that *does* reach both, so those checks are not vacuous:
//! the victim credential is expired, so any request that got through would
//! first call the token endpoint and then the upstream.
//!
//! Requests are written as raw bytes (over TLS for the agent listener), so
//! the cases can carry what no well-behaved client would send.
//!
//! The last tests cover slow clients, the connection cap and HTTP/2 abuse
//! (rapid resets, CONTINUATION floods, oversized header lists).
use sidekey_testkit as support;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::unix_now;

use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use ring::signature::Ed25519KeyPair;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use support::token::TokenServer;
use support::upstream::Upstream;
use support::{INIT_SECRET, Options, Resp, Sidekey, WEBHOOK_SECRET, provider_toml, query_param};

/// The victim's stored provider tokens: no answer may ever contain them.
const VICTIM_AT: &str = "tok-alice-access-5f1c0ffee";
const VICTIM_RT: &str = "tok-alice-refresh-9d2beef";
const VICTIM_PHONE: &str = "+15550001111";
/// The allowed path every "would have worked" request uses.
const GOOD_PATH: &str = "/v1/proxy/custom/things";

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn b64d(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .unwrap()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hmac256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap();
    m.update(msg);
    m.finalize().into_bytes().to_vec()
}

// ---------------------------------------------------------------------------
// JWT forging

fn unsigned(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    )
}

fn sign_ed(key: &Ed25519KeyPair, header: &Value, claims: &Value) -> String {
    let m = unsigned(header, claims);
    format!("{m}.{}", b64(key.sign(m.as_bytes()).as_ref()))
}

fn sign_hs(secret: &[u8], header: &Value, claims: &Value) -> String {
    let m = unsigned(header, claims);
    format!("{m}.{}", b64(&hmac256(secret, m.as_bytes())))
}

fn ed_pair(k: &rcgen::KeyPair) -> Ed25519KeyPair {
    Ed25519KeyPair::from_pkcs8_maybe_unchecked(&k.serialize_der()).unwrap()
}

// ---------------------------------------------------------------------------
// Raw HTTP/1.1 over TLS or plain TCP

fn tls_connector(sk: &Sidekey, alpn: &[&[u8]]) -> TlsConnector {
    let ca = std::fs::read(sk.path().join("certs/server.crt")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(cfg))
}

async fn tls_connect(sk: &Sidekey, alpn: &[&[u8]]) -> Result<TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(sk.agent_addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from("localhost").unwrap();
    match tokio::time::timeout(
        Duration::from_secs(15),
        tls_connector(sk, alpn).connect(name, tcp),
    )
    .await
    {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("TLS handshake: {e}")),
        Err(_) => Err("TLS handshake timed out".into()),
    }
}

/// A request with `Host` and `Connection: close`; `Content-Length` when a
/// body is given (or the method usually has one).
fn req(method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n")
        .into_bytes();
    for (k, v) in headers {
        out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// Parses one HTTP/1.x response from `buf`; `None` while incomplete.
fn parse_response(buf: &[u8], eof: bool) -> Option<Resp> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let mut parts = status_line.splitn(3, ' ');
    let version = match parts.next()? {
        "HTTP/1.0" => http::Version::HTTP_10,
        _ => http::Version::HTTP_11,
    };
    let status: u16 = parts.next()?.parse().ok()?;
    let mut headers = HeaderMap::new();
    for l in lines {
        let (k, v) = l.split_once(':')?;
        headers.append(
            HeaderName::from_bytes(k.trim().as_bytes()).ok()?,
            HeaderValue::from_bytes(v.trim().as_bytes()).ok()?,
        );
    }
    let rest = &buf[end + 4..];
    let chunked = headers
        .get("transfer-encoding")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let body: Vec<u8> = if let Some(cl) = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if rest.len() < cl {
            return None;
        }
        rest[..cl].to_vec()
    } else if chunked {
        let mut out = Vec::new();
        let mut i = 0;
        loop {
            let nl = rest[i..].windows(2).position(|w| w == b"\r\n")? + i;
            let size_txt = std::str::from_utf8(&rest[i..nl]).ok()?;
            let size = usize::from_str_radix(size_txt.split(';').next()?.trim(), 16).ok()?;
            i = nl + 2;
            if size == 0 {
                break;
            }
            if rest.len() < i + size + 2 {
                return None;
            }
            out.extend_from_slice(&rest[i..i + size]);
            i += size + 2;
        }
        out
    } else if status < 200 || status == 204 || status == 304 || eof {
        rest.to_vec()
    } else {
        return None;
    };
    Some(Resp {
        status: StatusCode::from_u16(status).ok()?,
        headers,
        body: Bytes::from(body),
        version,
    })
}

/// Reads one response; tolerates the peer closing (with or without TLS
/// close_notify) once the response is complete.
async fn read_response<S: AsyncRead + Unpin>(s: &mut S, limit: Duration) -> Result<Resp, String> {
    let deadline = Instant::now() + limit;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if let Some(r) = parse_response(&buf, false) {
            return Ok(r);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Err(_) => {
                return Err(format!(
                    "no complete response within {limit:?} ({} bytes: {:?})",
                    buf.len(),
                    String::from_utf8_lossy(&buf[..buf.len().min(300)])
                ));
            }
            Ok(Ok(0)) | Ok(Err(_)) => {
                return parse_response(&buf, true).ok_or_else(|| {
                    format!(
                        "connection closed without a complete response ({} bytes: {:?})",
                        buf.len(),
                        String::from_utf8_lossy(&buf[..buf.len().min(300)])
                    )
                });
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn write_then_read<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    bytes: &[u8],
) -> Result<Resp, String> {
    // The server may answer (413, 431) and close before it read everything:
    // a failed write is not the result, the answer is.
    let _ = s.write_all(bytes).await;
    let _ = s.flush().await;
    read_response(s, Duration::from_secs(20)).await
}

async fn raw_agent(sk: &Sidekey, bytes: &[u8]) -> Result<Resp, String> {
    let mut s = tls_connect(sk, &[b"http/1.1"]).await?;
    write_then_read(&mut s, bytes).await
}

async fn raw_admin(sk: &Sidekey, bytes: &[u8]) -> Result<Resp, String> {
    let mut s = TcpStream::connect(sk.admin_addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    write_then_read(&mut s, bytes).await
}

// ---------------------------------------------------------------------------
// The case table

#[derive(Debug, Clone)]
enum Expect {
    /// sidekey's own error: status, JSON `error.code`, `X-Sidekey-Error`.
    Error(u16, &'static str),
    /// An HTML page (OAuth callback) with this status.
    Html(u16),
    /// A 303 whose Location starts with this.
    Redirect(&'static str),
    /// hyper refused the request before sidekey's code ran: this status,
    /// in sidekey's JSON error shape all the same.
    Transport(u16),
}

struct Case {
    name: String,
    admin: bool,
    bytes: Vec<u8>,
    expect: Expect,
    /// Strings the answer (headers and body) must not contain.
    absent: Vec<String>,
}

impl Case {
    fn agent(name: impl Into<String>, bytes: Vec<u8>, expect: Expect) -> Case {
        Case {
            name: name.into(),
            admin: false,
            bytes,
            expect,
            absent: Vec::new(),
        }
    }

    fn admin(name: impl Into<String>, bytes: Vec<u8>, expect: Expect) -> Case {
        Case {
            admin: true,
            ..Case::agent(name, bytes, expect)
        }
    }

    fn absent(mut self, s: &str) -> Case {
        self.absent.push(s.to_owned());
        self
    }
}

fn check(resp: &Resp, expect: &Expect, absent: &[String]) -> Result<(), String> {
    let text = resp.text();
    let status = resp.status.as_u16();
    let header = |n: &str| {
        resp.headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let want_status = match expect {
        Expect::Error(s, _) | Expect::Html(s) | Expect::Transport(s) => *s,
        Expect::Redirect(_) => 303,
    };
    if status != want_status {
        return Err(format!("status {status}, want {want_status}: {text:.300}"));
    }
    match expect {
        Expect::Error(_, code) => {
            let v: Value = serde_json::from_slice(&resp.body)
                .map_err(|_| format!("error body is not JSON: {text:.300}"))?;
            if v["error"]["code"] != *code {
                return Err(format!("error code {}, want {code}", v["error"]["code"]));
            }
            if v["error"]["message"].as_str().is_none_or(str::is_empty) {
                return Err(format!("no error message in {v}"));
            }
            if header("x-sidekey-error").as_deref() != Some(*code) {
                return Err(format!(
                    "X-Sidekey-Error {:?}, want {code}",
                    header("x-sidekey-error")
                ));
            }
            if !header("content-type").is_some_and(|c| c.starts_with("application/json")) {
                return Err(format!("content-type {:?}", header("content-type")));
            }
        }
        Expect::Html(_) => {
            if !header("content-type").is_some_and(|c| c.starts_with("text/html")) {
                return Err(format!("content-type {:?}", header("content-type")));
            }
            if !text.contains("<h1>") {
                return Err(format!("not an error page: {text:.300}"));
            }
        }
        Expect::Redirect(prefix) => {
            let loc = header("location").unwrap_or_default();
            if !loc.starts_with(prefix) {
                return Err(format!("Location {loc:?}, want {prefix}..."));
            }
        }
        Expect::Transport(s) => {
            let code = match s {
                400 => "bad_request",
                414 => "uri_too_long",
                431 => "headers_too_large",
                other => return Err(format!("no error code known for hyper's {other}")),
            };
            let v: Value = serde_json::from_slice(&resp.body)
                .map_err(|_| format!("hyper's refusal has no JSON error body: {text:.300}"))?;
            if v["error"]["code"] != code || header("x-sidekey-error").as_deref() != Some(code) {
                return Err(format!(
                    "hyper's refusal is not sidekey's error {code}: {:?} {v}",
                    header("x-sidekey-error")
                ));
            }
        }
    }
    let mut all = String::new();
    for (k, v) in &resp.headers {
        all.push_str(k.as_str());
        all.push_str(": ");
        all.push_str(&String::from_utf8_lossy(v.as_bytes()));
        all.push('\n');
    }
    all.push_str(&text);
    for a in absent {
        if all.contains(a.as_str()) {
            return Err(format!("the answer contains {a:?}: {all:.400}"));
        }
    }
    Ok(())
}

/// Runs every case; collects every failure and panics once with all of
/// them, so one run shows the whole picture.
async fn run_cases(fx: &Fx, group: &str, cases: Vec<Case>) -> usize {
    let n = cases.len();
    // A request that gets through must refresh first: the token endpoint
    // check is only meaningful while the victim credential is expired.
    assert_eq!(fx.victim_status().await, "expired");
    let mut failures = Vec::new();
    for c in cases {
        let (u0, t0) = (fx.up.count(), fx.ts.calls());
        let res = if c.admin {
            raw_admin(&fx.sk, &c.bytes).await
        } else {
            raw_agent(&fx.sk, &c.bytes).await
        };
        let mut absent = c.absent.clone();
        absent.extend(fx.never.iter().cloned());
        if let Err(e) = res.and_then(|r| check(&r, &c.expect, &absent)) {
            failures.push(format!("[{group}] {}: {e}", c.name));
        }
        if fx.up.count() != u0 {
            failures.push(format!(
                "[{group}] {}: the upstream saw {} request(s): {:?}",
                c.name,
                fx.up.count() - u0,
                fx.up.last().path
            ));
        }
        if fx.ts.calls() != t0 {
            failures.push(format!(
                "[{group}] {}: the token endpoint saw {} call(s)",
                c.name,
                fx.ts.calls() - t0
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {n} {group} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("{group}: {n} cases passed");
    n
}

// ---------------------------------------------------------------------------
// Fixture

struct Fx {
    sk: Sidekey,
    up: Upstream,
    ts: TokenServer,
    /// The session signing key (Ed25519).
    key: rcgen::KeyPair,
    kid: String,
    /// alice's valid session token for `custom`.
    token: String,
    /// Its claims.
    claims: Value,
    /// Secrets no answer may contain.
    never: Vec<String>,
}

impl Fx {
    async fn start() -> Fx {
        Fx::start_with(|o| o).await
    }

    async fn start_with(tune: impl FnOnce(Options) -> Options) -> Fx {
        let up = Upstream::start().await;
        let ts = TokenServer::start().await;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("session-ed25519.pem");
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let providers = format!(
            "{}{}",
            provider_toml(
                "custom",
                &up.url,
                &format!(
                    "token_url = \"{}\"\nauthorize_url = \"http://127.0.0.1:9/authorize\"\n\
                     client_id = \"test-client\"\nclient_secret_env = \"TEST_CLIENT_SECRET\"\n\
                     allow = [\"GET /things\", \"GET /things/**\", \"POST /things\"]",
                    ts.url
                ),
            ),
            provider_toml("other", &up.url, ""),
        );
        let opts = Options::with_providers(&providers)
            .env("TEST_CLIENT_SECRET", "test-client-secret")
            .server("max_body_bytes = 65536")
            .server("max_header_bytes = 16384")
            .sessions("signing_key_file = \"session-ed25519.pem\"");
        let sk = Sidekey::start_in(Arc::new(dir), tune(opts)).await;

        // The victim: an expired credential with a refresh token the token
        // endpoint accepts, so a request that gets through is seen by both.
        ts.issue_refresh(VICTIM_RT);
        sk.put_credential(
            "alice",
            "custom",
            json!({"access_token": VICTIM_AT, "refresh_token": VICTIM_RT, "expires_at": unix_now() - 100}),
        )
        .await;
        let r = sk
            .admin(
                Method::PUT,
                "/v1/users/alice",
                Some(json!({"phone_numbers": [VICTIM_PHONE]})),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let token = sk.token("alice", &["custom"]).await;
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(
            header.alg,
            jsonwebtoken::Algorithm::EdDSA,
            "the configured Ed25519 key signs sessions"
        );
        let kid = header.kid.expect("tokens carry a kid");
        let claims: Value =
            serde_json::from_slice(&b64d(token.split('.').nth(1).unwrap())).unwrap();
        let never = vec![VICTIM_AT.to_owned(), VICTIM_RT.to_owned()];
        Fx {
            sk,
            up,
            ts,
            key,
            kid,
            token,
            claims,
            never,
        }
    }

    /// The status of alice's credential: `expired` until a request gets
    /// through (and refreshes it).
    async fn victim_status(&self) -> String {
        let r = self
            .sk
            .admin(Method::GET, "/v1/users/alice/credentials/custom", None)
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["status"].as_str().unwrap().to_owned()
    }

    fn get(&self, path: &str, token: &str) -> Vec<u8> {
        req("GET", path, &[("X-Sidekey-Session", token)], b"")
    }

    /// The positive control: a well-formed request reaches the token
    /// endpoint (the credential is expired) and then the upstream.
    async fn control(&self) {
        let (u0, t0) = (self.up.count(), self.ts.calls());
        let r = raw_agent(&self.sk, &self.get(GOOD_PATH, &self.token))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "control request: {}", r.text());
        assert_eq!(self.up.count(), u0 + 1, "control reached the upstream");
        assert!(
            self.ts.calls() > t0 || self.victim_status().await == "active",
            "the expired credential was refreshed through the token endpoint"
        );
        assert_eq!(self.victim_status().await, "active");
        assert_ne!(
            self.up.last().bearer().as_deref(),
            Some(VICTIM_AT),
            "the expired token was refreshed before use"
        );
        let h = raw_agent(&self.sk, &req("GET", "/healthz", &[], b""))
            .await
            .unwrap();
        assert_eq!(h.status, 200);
    }
}

// ---------------------------------------------------------------------------
// Group 1: session tokens

#[tokio::test]
async fn hostile_session_tokens() {
    let fx = Fx::start().await;
    let sk = &fx.sk;
    let now = unix_now();
    let real = ed_pair(&fx.key);
    let attacker = ed_pair(&rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap());
    let kid = fx.kid.clone();
    let ed_h = json!({"alg": "EdDSA", "typ": "JWT", "kid": kid});
    let hs_h = json!({"alg": "HS256", "typ": "JWT", "kid": kid});
    let c = fx.claims.clone();
    let with = |k: &str, v: Value| {
        let mut c = c.clone();
        c[k] = v;
        c
    };
    let parts: Vec<&str> = fx.token.split('.').collect();

    // A second session bound to a conversation, one revoked, one whose
    // user is deleted.
    let bound = sk
        .session_with(
            json!({"user": "alice", "providers": ["custom"], "conversation_id": "conv-A"}),
        )
        .await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let revoked = sk.session("alice", &["custom"]).await;
    let r = sk
        .admin(
            Method::DELETE,
            &format!("/v1/sessions/{}", revoked["session_id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(r.status, 204);
    let revoked = revoked["token"].as_str().unwrap().to_owned();
    sk.put_credential("carol", "custom", json!({"access_token": "tok-carol"}))
        .await;
    let carol = sk.token("carol", &["custom"]).await;
    assert_eq!(
        sk.admin(Method::DELETE, "/v1/users/carol", None)
            .await
            .status,
        204
    );

    let pub_raw = fx.key.public_key_raw().to_vec();
    let pub_pem = fx.key.public_key_pem();
    let pub_der = rcgen::PublicKeyData::subject_public_key_info(&fx.key);
    let huge = sign_ed(&real, &ed_h, &with("pad", json!("A".repeat(5000))));
    assert!(huge.len() > 4096);
    let mut flipped = parts[2].as_bytes().to_vec();
    flipped[5] = if flipped[5] == b'A' { b'B' } else { b'A' };
    let flipped = format!(
        "{}.{}.{}",
        parts[0],
        parts[1],
        String::from_utf8(flipped).unwrap()
    );
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(with("sub", json!("bob")).to_string().as_bytes()),
        parts[2]
    );
    let mut no_exp = c.clone();
    no_exp.as_object_mut().unwrap().remove("exp");

    let inv = Expect::Error(401, "invalid_session");
    let tok = |name: &str, t: String| Case::agent(name, fx.get(GOOD_PATH, &t), inv.clone());
    let cases = vec![
        tok(
            "alg none with the real kid",
            format!("{}.", unsigned(&json!({"alg": "none", "kid": kid}), &c)),
        ),
        tok(
            "alg None (case variant)",
            format!("{}.", unsigned(&json!({"alg": "None", "kid": kid}), &c)),
        ),
        tok(
            "alg none without a signature segment",
            unsigned(&json!({"alg": "none", "kid": kid}), &c),
        ),
        tok(
            "HS256 keyed with the Ed25519 public key (raw bytes), real kid",
            sign_hs(&pub_raw, &hs_h, &c),
        ),
        tok(
            "HS256 keyed with the public key PEM, real kid",
            sign_hs(pub_pem.as_bytes(), &hs_h, &c),
        ),
        tok(
            "HS256 keyed with the public key DER (SPKI), real kid",
            sign_hs(&pub_der, &hs_h, &c),
        ),
        tok(
            "EdDSA signed by an attacker's key, real kid",
            sign_ed(&attacker, &ed_h, &c),
        ),
        tok(
            "wrong kid, valid signature",
            sign_ed(
                &real,
                &json!({"alg": "EdDSA", "kid": "ed-0123456789abcdef"}),
                &c,
            ),
        ),
        tok(
            "no kid, valid signature",
            sign_ed(&real, &json!({"alg": "EdDSA", "typ": "JWT"}), &c),
        ),
        tok(
            "kid is a file path",
            sign_hs(
                b"",
                &json!({"alg": "HS256", "kid": "../../data/session.key"}),
                &c,
            ),
        ),
        tok(
            "expired (exp in the past), valid signature",
            sign_ed(
                &real,
                &ed_h,
                &with("exp", json!(now - 10)).tap(|v| v["iat"] = json!(now - 100)),
            ),
        ),
        tok(
            "not yet valid (nbf in the future), valid signature",
            sign_ed(&real, &ed_h, &with("nbf", json!(now + 3600))),
        ),
        tok(
            "issued in the future (iat + 1 h), valid signature",
            sign_ed(&real, &ed_h, &with("iat", json!(now + 3600))),
        ),
        tok(
            "wrong iss, valid signature",
            sign_ed(&real, &ed_h, &with("iss", json!("evil-issuer"))),
        ),
        tok(
            "wrong aud, valid signature",
            sign_ed(&real, &ed_h, &with("aud", json!("someone-else"))),
        ),
        tok(
            "no exp claim, valid signature",
            sign_ed(&real, &ed_h, &no_exp),
        ),
        tok(
            "unknown sid, valid signature",
            sign_ed(
                &real,
                &ed_h,
                &with("sid", json!("ses_00000000000000000000000000000000")),
            ),
        ),
        tok(
            "sub swapped to another user, real sid, valid signature",
            sign_ed(&real, &ed_h, &with("sub", json!("mallory"))),
        ),
        tok(
            "forged conv claim the record does not have",
            sign_ed(&real, &ed_h, &with("conv", json!("conv-forged"))),
        ),
        tok("tampered payload, original signature", tampered),
        tok("tampered signature (one character)", flipped),
        tok("signature stripped", format!("{}.{}.", parts[0], parts[1])),
        tok("revoked session", revoked),
        tok("session of a deleted user", carol),
        tok("huge (> 4 KiB) validly signed token", huge),
        tok("garbage: not a JWT", "not-a-jwt".into()),
        tok("garbage: a.b.c", "a.b.c".into()),
        tok(
            "garbage: five segments (JWE shape)",
            format!("{}.x.y.z", fx.token),
        ),
        tok(
            "garbage: base64 of random bytes",
            format!(
                "{}.{}.{}",
                b64(&[0xff; 40]),
                b64(&[0xfe; 40]),
                b64(&[0; 64])
            ),
        ),
        Case::agent(
            "empty bearer",
            req("GET", GOOD_PATH, &[("Authorization", "Bearer ")], b""),
            inv.clone(),
        ),
        Case::agent(
            "empty X-Sidekey-Session",
            req("GET", GOOD_PATH, &[("X-Sidekey-Session", "")], b""),
            inv.clone(),
        ),
        Case::agent(
            "no token at all",
            req("GET", GOOD_PATH, &[], b""),
            inv.clone(),
        ),
        Case::agent(
            "real token under the Basic scheme",
            req(
                "GET",
                GOOD_PATH,
                &[("Authorization", &format!("Basic {}", fx.token))],
                b"",
            ),
            inv.clone(),
        ),
        Case::agent(
            "real token in the query string only",
            req("GET", &format!("{GOOD_PATH}?token={}", fx.token), &[], b""),
            inv.clone(),
        ),
        Case::agent(
            "garbage X-Sidekey-Session wins over a valid bearer",
            req(
                "GET",
                GOOD_PATH,
                &[
                    ("X-Sidekey-Session", "garbage"),
                    ("Authorization", &format!("Bearer {}", fx.token)),
                ],
                b"",
            ),
            inv.clone(),
        ),
        Case::agent(
            "session bound to another conversation",
            req(
                "GET",
                GOOD_PATH,
                &[
                    ("X-Sidekey-Session", &bound),
                    ("X-Conversation-Id", "conv-B"),
                ],
                b"",
            ),
            Expect::Error(401, "conversation_mismatch"),
        ),
        Case::agent(
            "forged providers claim: the record decides",
            fx.get(
                "/v1/proxy/other/things",
                &sign_ed(&real, &ed_h, &with("providers", json!(["custom", "other"]))),
            ),
            Expect::Error(403, "provider_not_allowed"),
        ),
    ];
    let n = run_cases(&fx, "session tokens", cases).await;
    assert!(n >= 35);
    fx.control().await;
}

/// `Value::tap` for building claims inline.
trait Tap: Sized {
    fn tap(self, f: impl FnOnce(&mut Self)) -> Self;
}

impl Tap for Value {
    fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}

// ---------------------------------------------------------------------------
// Group 2: paths

#[tokio::test]
async fn hostile_paths() {
    let fx = Fx::start().await;
    let bad = Expect::Error(400, "bad_path");
    let p = |name: &str, path: &str| {
        Case::agent(
            format!("{name}: {path}"),
            fx.get(&format!("/v1/proxy/custom{path}"), &fx.token),
            bad.clone(),
        )
    };
    let call = |name: &str, body: Value, expect: Expect| {
        Case::agent(
            format!("tool call: {name}"),
            req(
                "POST",
                "/v1/call/custom",
                &[
                    ("X-Sidekey-Session", &fx.token),
                    ("Content-Type", "application/json"),
                ],
                body.to_string().as_bytes(),
            ),
            expect,
        )
    };
    let cases = vec![
        p("dot-dot", "/things/../admin"),
        p("encoded dot-dot", "/things/%2e%2e/admin"),
        p("mixed-case encoded dot-dot", "/things/%2E%2e/admin"),
        p("half-encoded dot-dot", "/things/.%2e/admin"),
        p("half-encoded dot-dot (other half)", "/things/%2e./admin"),
        p("double-encoded dot-dot", "/things/%252e%252e/admin"),
        p("triple-encoded dot-dot", "/things/%25252e%25252e/admin"),
        p("dot-dot with encoded slash", "/things/..%2fadmin"),
        p(
            "encoded slashes around dot-dots",
            "/things/a%2F..%2F..%2Fadmin",
        ),
        p("encoded slash", "/things/a%2fb"),
        p("double-encoded slash", "/things/a%252fb"),
        p("encoded backslash", "/things/..%5cadmin"),
        p("raw backslash", "/things/..\\admin"),
        p(
            "overlong UTF-8 dots (2 bytes)",
            "/things/%c0%ae%c0%ae/admin",
        ),
        p(
            "overlong UTF-8 dots (3 bytes)",
            "/things/%e0%80%ae%e0%80%ae/admin",
        ),
        p("NUL", "/things/a%00b"),
        p("double-encoded NUL", "/things/a%2500b"),
        p("CR/LF", "/things/a%0d%0aX-Injected:%20yes"),
        p("tab", "/things/x%09y"),
        p("empty segment: //host", "//evil.example/things"),
        p("empty segment inside", "/things//evil.example"),
        p("user@host", "/@evil.example/things"),
        p("encoded user@host", "/%40evil.example/things"),
        p("single dot", "/./things"),
        p("trailing dot-dot", "/things/.."),
        p("dot-dot with path parameter (..;)", "/things/..;/admin"),
        p(
            "encoded dot-dot with path parameter",
            "/things/%2e%2e%3b/admin",
        ),
        Case::agent(
            "absolute URI (another host) in the request line",
            req(
                "GET",
                "https://evil.example/v1/proxy/custom/things",
                &[("X-Sidekey-Session", &fx.token)],
                b"",
            ),
            bad.clone(),
        ),
        Case::agent(
            "absolute URI (this host) in the request line",
            req(
                "GET",
                "http://localhost/v1/proxy/custom/things",
                &[("X-Sidekey-Session", &fx.token)],
                b"",
            ),
            bad.clone(),
        ),
        Case::agent(
            "CONNECT",
            req(
                "CONNECT",
                "evil.example:443",
                &[("X-Sidekey-Session", &fx.token)],
                b"",
            ),
            Expect::Error(405, "method_not_allowed"),
        ),
        Case::agent(
            "raw overlong bytes in the request line",
            {
                let mut b = b"GET /v1/proxy/custom/things/\xc0\xae\xc0\xae/admin HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nX-Sidekey-Session: ".to_vec();
                b.extend_from_slice(fx.token.as_bytes());
                b.extend_from_slice(b"\r\n\r\n");
                b
            },
            Expect::Transport(400),
        ),
        Case::agent(
            "traversal in the provider segment",
            fx.get("/v1/proxy/..%2fcustom/things", &fx.token),
            Expect::Error(404, "unknown_provider"),
        ),
        Case::agent(
            "outside the allow list",
            fx.get("/v1/proxy/custom/admin", &fx.token),
            Expect::Error(403, "path_not_allowed"),
        ),
        Case::agent(
            "method outside the allow list",
            req(
                "DELETE",
                GOOD_PATH,
                &[("X-Sidekey-Session", &fx.token)],
                b"",
            ),
            Expect::Error(403, "path_not_allowed"),
        ),
        call(
            "dot-dot",
            json!({"method": "GET", "path": "/things/../admin"}),
            bad.clone(),
        ),
        call(
            "//host",
            json!({"method": "GET", "path": "//evil.example/things"}),
            bad.clone(),
        ),
        call(
            "absolute URL",
            json!({"method": "GET", "path": "https://evil.example/things"}),
            bad.clone(),
        ),
        call(
            "backslashes",
            json!({"method": "GET", "path": "/things\\..\\admin"}),
            bad.clone(),
        ),
        call(
            "encoded dot-dot",
            json!({"method": "GET", "path": "/things/%2e%2e/admin"}),
            bad.clone(),
        ),
        call(
            "CONNECT method",
            json!({"method": "CONNECT", "path": "/things"}),
            Expect::Error(400, "bad_request"),
        ),
    ];
    let n = run_cases(&fx, "paths", cases).await;
    assert!(n >= 40);
    fx.control().await;
}

// ---------------------------------------------------------------------------
// Group 3: transport-level abuse (sizes, header injection, framing)

fn raw_with_header_line(token: &str, line: &[u8]) -> Vec<u8> {
    let mut b = format!(
        "GET {GOOD_PATH} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nX-Sidekey-Session: {token}\r\n"
    )
    .into_bytes();
    b.extend_from_slice(line);
    b.extend_from_slice(b"\r\n\r\n");
    b
}

#[tokio::test]
async fn hostile_transport() {
    let fx = Fx::start().await;
    let t = fx.token.as_str();
    let post_head = |extra: &str| {
        format!(
            "POST {GOOD_PATH} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nX-Sidekey-Session: {t}\r\n{extra}\r\n"
        )
        .into_bytes()
    };
    let big_header = "a".repeat(20_000);
    let many_headers: Vec<(String, String)> = (0..150)
        .map(|i| (format!("X-Many-{i}"), "v".into()))
        .collect();
    let many_refs: Vec<(&str, &str)> = many_headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain([("X-Sidekey-Session", t)])
        .collect();
    let mut chunked = post_head("Transfer-Encoding: chunked\r\n");
    for _ in 0..25 {
        chunked.extend_from_slice(format!("{:x}\r\n", 4096).as_bytes());
        chunked.extend_from_slice(&[b'x'; 4096]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let mut exact_over = post_head("Content-Length: 65537\r\n");
    exact_over.extend_from_slice(&[b'y'; 65537]);
    let mut bad_chunk = post_head("Transfer-Encoding: chunked\r\n");
    bad_chunk.extend_from_slice(b"zz\r\nhello\r\n0\r\n\r\n");

    let cases = vec![
        Case::agent(
            "one header over max_header_bytes",
            req(
                "GET",
                GOOD_PATH,
                &[("X-Sidekey-Session", t), ("X-Pad", &big_header)],
                b"",
            ),
            Expect::Transport(431),
        ),
        Case::agent(
            "150 headers",
            req("GET", GOOD_PATH, &many_refs, b""),
            Expect::Transport(431),
        ),
        Case::agent(
            "declared body of 10 MB",
            post_head("Content-Length: 10000000\r\n"),
            Expect::Error(413, "body_too_large"),
        ),
        Case::agent(
            "body one byte over max_body_bytes",
            exact_over,
            Expect::Error(413, "body_too_large"),
        ),
        Case::agent(
            "chunked body over max_body_bytes",
            chunked,
            Expect::Error(413, "body_too_large"),
        ),
        Case::agent(
            "malformed chunk size",
            bad_chunk,
            Expect::Error(400, "bad_request"),
        ),
        Case::agent(
            "bare CR in a header value",
            raw_with_header_line(t, b"X-Note: a\rX-Injected: yes"),
            Expect::Transport(400),
        ),
        Case::agent(
            "NUL in a header value",
            raw_with_header_line(t, b"X-Note: a\0b"),
            Expect::Transport(400),
        ),
        Case::agent(
            "DEL in a header value",
            raw_with_header_line(t, b"X-Note: a\x7fb"),
            Expect::Transport(400),
        ),
        Case::agent(
            "obs-fold continuation line",
            raw_with_header_line(t, b"X-Note: a\r\n X-Injected: yes"),
            Expect::Transport(400),
        ),
        Case::agent(
            "space before the colon",
            raw_with_header_line(t, b"X-Note : a"),
            Expect::Transport(400),
        ),
        Case::agent(
            "CR inside a header name",
            raw_with_header_line(t, b"X-No\rte: a"),
            Expect::Transport(400),
        ),
        Case::agent(
            "two different Content-Length values",
            post_head("Content-Length: 3\r\nContent-Length: 4\r\n"),
            Expect::Transport(400),
        ),
        Case::agent(
            "non-numeric Content-Length",
            post_head("Content-Length: abc\r\n"),
            Expect::Transport(400),
        ),
        Case::agent(
            "Transfer-Encoding with chunked not last",
            post_head("Transfer-Encoding: chunked, gzip\r\n"),
            Expect::Transport(400),
        ),
        Case::agent(
            "garbage request line",
            b"GARBAGE\r\n\r\n".to_vec(),
            Expect::Transport(400),
        ),
        Case::agent(
            "conversation id with a control character",
            raw_with_header_line(t, b"X-Conversation-Id: conv\tA"),
            Expect::Error(400, "bad_request"),
        ),
        Case::agent(
            "conversation id of 300 characters",
            req(
                "GET",
                GOOD_PATH,
                &[
                    ("X-Sidekey-Session", t),
                    ("X-Conversation-Id", &"c".repeat(300)),
                ],
                b"",
            ),
            Expect::Error(400, "bad_request"),
        ),
        Case::agent(
            "refresh tool with invalid JSON (no refresh happens)",
            req(
                "POST",
                "/v1/session/refresh",
                &[("X-Sidekey-Session", t)],
                b"{\"provider\": \"CANARY-refresh",
            ),
            Expect::Error(400, "bad_request"),
        )
        .absent("CANARY-refresh"),
        Case::agent(
            "generic tool with invalid JSON",
            req(
                "POST",
                "/v1/call/custom",
                &[("X-Sidekey-Session", t)],
                b"{\"method\": \"GET\", \"path\": \"CANARY-call",
            ),
            Expect::Error(400, "bad_request"),
        )
        .absent("CANARY-call"),
    ];
    let n = run_cases(&fx, "transport", cases).await;
    assert!(n >= 20);
    fx.control().await;
}

/// HTTP/2 carries its own header-size limit (`max_header_bytes` as
/// SETTINGS_MAX_HEADER_LIST_SIZE): an oversized list is refused with 431
/// before sidekey sees it.
#[tokio::test]
async fn h2_oversized_header_list() {
    let fx = Fx::start().await;
    let ca = std::fs::read(fx.sk.path().join("certs/server.crt")).unwrap();
    let h2 = support::client_trusting(&ca, true);
    let pad = "p".repeat(12_000);
    let r = support::send(
        &h2,
        Method::GET,
        &fx.sk.agent_url(GOOD_PATH),
        &[
            ("x-sidekey-session", &fx.token),
            ("x-pad-1", &pad),
            ("x-pad-2", &pad),
        ],
        "",
    )
    .await;
    assert_eq!(r.version, http::Version::HTTP_2);
    assert_eq!(r.status, 431, "{}", r.text());
    assert_eq!(fx.up.count(), 0);
    assert_eq!(fx.ts.calls(), 0);
    fx.control().await;
}

// ---------------------------------------------------------------------------
// Group 4: admin API input

#[tokio::test]
async fn hostile_admin_input() {
    let fx = Fx::start().await;
    let auth = format!("Bearer {}", fx.sk.admin_token);
    let a = |method: &str, path: &str, body: &[u8]| {
        req(
            method,
            path,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            body,
        )
    };
    let br = Expect::Error(400, "bad_request");
    let json_case = |name: &str, method: &str, path: &str, body: &[u8], canary: &str| {
        let c = Case::admin(
            format!("invalid JSON, {method} {path}: {name}"),
            a(method, path, body),
            br.clone(),
        );
        if canary.is_empty() {
            c
        } else {
            c.absent(canary)
        }
    };
    let id_case = |name: &str, method: &str, path: &str, body: Value| {
        Case::admin(
            format!("bad id ({name}): {method} {path}"),
            a(method, path, body.to_string().as_bytes()),
            br.clone(),
        )
    };
    let cred = json!({"access_token": "tok-should-not-be-stored"});
    let long = "u".repeat(129);
    let nested = "[".repeat(10_000);
    let huge = vec![b' '; (1 << 20) + 10];
    let cases = vec![
        json_case(
            "unterminated string",
            "PUT",
            "/v1/users/victim/credentials/custom",
            b"{\"access_token\": \"CANARY-1",
            "CANARY-1",
        ),
        json_case(
            "wrong type",
            "PUT",
            "/v1/users/victim/credentials/custom",
            b"{\"access_token\": 12345}",
            "12345",
        ),
        json_case(
            "array instead of object",
            "PUT",
            "/v1/users/victim/credentials/custom",
            b"[\"CANARY-2\"]",
            "CANARY-2",
        ),
        json_case(
            "array read as a struct by position",
            "POST",
            "/v1/sessions",
            b"[\"victim\", [\"custom\"]]",
            "",
        ),
        json_case(
            "array read as a struct by position",
            "PUT",
            "/v1/users/victim",
            b"[[\"+15551234567\"], \"acme\"]",
            "",
        ),
        json_case(
            "array read as a struct by position",
            "POST",
            "/v1/users/victim/oauth/custom/start",
            b"[\"https://evil.example/\"]",
            "evil.example",
        ),
        json_case(
            "not UTF-8",
            "PUT",
            "/v1/users/victim/credentials/custom",
            b"\xff\xfe{\"access_token\": \"x\"}",
            "",
        ),
        json_case(
            "empty body",
            "PUT",
            "/v1/users/victim/credentials/custom",
            b"",
            "",
        ),
        Case::admin(
            "CR/LF inside the stored token (header injection upstream)",
            a(
                "PUT",
                "/v1/users/victim/credentials/custom",
                br#"{"access_token": "ok\r\nX-Evil: CANARY-3"}"#,
            ),
            br.clone(),
        )
        .absent("CANARY-3"),
        json_case(
            "unterminated",
            "PUT",
            "/v1/users/victim",
            b"{\"phone_numbers\": \"CANARY-4",
            "CANARY-4",
        ),
        json_case(
            "wrong type",
            "PUT",
            "/v1/users/victim",
            b"{\"tenant\": [\"CANARY-5\"]}",
            "CANARY-5",
        ),
        json_case(
            "unterminated",
            "POST",
            "/v1/sessions",
            b"{\"user\": \"CANARY-6\",",
            "CANARY-6",
        ),
        json_case(
            "wrong type",
            "POST",
            "/v1/sessions",
            b"{\"user\": {\"x\": \"CANARY-7\"}, \"providers\": [\"custom\"]}",
            "CANARY-7",
        ),
        json_case(
            "10 000 nested arrays",
            "POST",
            "/v1/sessions",
            nested.as_bytes(),
            "",
        ),
        json_case(
            "unterminated",
            "POST",
            "/v1/users/victim/oauth/custom/start",
            b"{\"return_to\": \"https://CANARY-8",
            "CANARY-8",
        ),
        json_case(
            "wrong type",
            "POST",
            "/v1/users/victim/oauth/custom/start",
            b"{\"return_to\": [\"CANARY-9\"]}",
            "CANARY-9",
        ),
        json_case(
            "unterminated",
            "PUT",
            "/v1/tenants/acme/credentials/custom",
            b"{\"access_token\": \"CANARY-10\"",
            "CANARY-10",
        ),
        json_case(
            "bare word",
            "PUT",
            "/v1/tenants/acme/credentials/custom",
            b"nul",
            "",
        ),
        Case::admin(
            "body over the admin limit",
            a("POST", "/v1/sessions", &huge),
            Expect::Error(413, "body_too_large"),
        ),
        id_case(
            "space",
            "PUT",
            "/v1/users/a%20b/credentials/custom",
            cred.clone(),
        ),
        id_case(
            "slash",
            "PUT",
            "/v1/users/a%2Fb/credentials/custom",
            cred.clone(),
        ),
        id_case(
            "129 characters",
            "PUT",
            &format!("/v1/users/{long}/credentials/custom"),
            cred.clone(),
        ),
        id_case(
            "empty",
            "PUT",
            "/v1/users//credentials/custom",
            cred.clone(),
        ),
        id_case(
            "unicode",
            "PUT",
            "/v1/users/%C3%A9/credentials/custom",
            cred.clone(),
        ),
        id_case(
            "traversal",
            "PUT",
            "/v1/users/..%2Fadmin/credentials/custom",
            cred.clone(),
        ),
        id_case(
            "markup",
            "PUT",
            "/v1/users/%3Cscript%3E",
            json!({"tenant": "acme"}),
        )
        .absent("<script>"),
        id_case(
            "space in the body",
            "POST",
            "/v1/sessions",
            json!({"user": "a b", "providers": ["custom"]}),
        ),
        id_case(
            "129 characters in the body",
            "POST",
            "/v1/sessions",
            json!({"user": long, "providers": ["custom"]}),
        ),
        id_case(
            "empty in the body",
            "POST",
            "/v1/sessions",
            json!({"user": "", "providers": ["custom"]}),
        ),
        id_case(
            "tenant with a space",
            "PUT",
            "/v1/tenants/a%20b/credentials/custom",
            cred.clone(),
        ),
        id_case(
            "tenant with a space in the body",
            "PUT",
            "/v1/users/victim",
            json!({"tenant": "a b"}),
        ),
        id_case(
            "provider with a space",
            "PUT",
            "/v1/users/victim/credentials/cu%20stom",
            cred.clone(),
        ),
        id_case(
            "slash, OAuth start",
            "POST",
            "/v1/users/a%2Fb/oauth/custom/start",
            json!({}),
        ),
        Case::admin(
            "no admin token",
            req(
                "PUT",
                "/v1/users/victim/credentials/custom",
                &[],
                cred.to_string().as_bytes(),
            ),
            Expect::Error(401, "unauthorized"),
        ),
        Case::admin(
            "wrong admin token",
            req(
                "POST",
                "/v1/sessions",
                &[("Authorization", "Bearer not-the-admin-token")],
                json!({"user": "victim", "providers": ["custom"]})
                    .to_string()
                    .as_bytes(),
            ),
            Expect::Error(401, "unauthorized"),
        ),
        Case::admin(
            "a session token is not an admin token",
            req(
                "POST",
                "/v1/sessions",
                &[("Authorization", &format!("Bearer {}", fx.token))],
                json!({"user": "victim", "providers": ["custom"]})
                    .to_string()
                    .as_bytes(),
            ),
            Expect::Error(401, "unauthorized"),
        ),
    ];
    let n = run_cases(&fx, "admin input", cases).await;
    assert!(n >= 30);

    // Nothing was stored by any of them.
    let sk = &fx.sk;
    let r = sk
        .admin(Method::GET, "/v1/users/victim/credentials", None)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!([]), "no credential stored for victim");
    let r = sk.admin(Method::GET, "/v1/users/victim", None).await;
    r.assert_error(404, "not_found");
    let r = sk
        .admin(Method::GET, "/v1/tenants/acme/credentials", None)
        .await;
    assert_eq!(r.json(), json!([]), "no tenant credential stored");
    fx.control().await;
}

// ---------------------------------------------------------------------------
// Group 5: OAuth callbacks

async fn oauth_start(fx: &Fx, user: &str, body: Value) -> (String, String) {
    let r = fx
        .sk
        .admin(
            Method::POST,
            &format!("/v1/users/{user}/oauth/custom/start"),
            Some(body),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let url = v["authorize_url"].as_str().unwrap().to_owned();
    (v["state"].as_str().unwrap().to_owned(), url)
}

#[tokio::test]
async fn hostile_oauth_callbacks() {
    // The flow without a browser binding (tests/connect.rs covers that).
    let fx = Fx::start_with(Options::unbound_oauth).await;
    let sk = &fx.sk;

    // A state used once, successfully: its replay must do nothing.
    let (used, url) = oauth_start(&fx, "olivia", json!({})).await;
    fx.ts.register_code(
        "code-olivia",
        &query_param(&url, "code_challenge").unwrap(),
        &query_param(&url, "redirect_uri").unwrap(),
    );
    let first = raw_agent(
        sk,
        &req(
            "GET",
            &format!("/oauth/custom/callback?code=code-olivia&state={used}"),
            &[],
            b"",
        ),
    )
    .await
    .unwrap();
    assert_eq!(first.status, 200, "first use succeeds: {}", first.text());
    let stored = sk
        .admin(Method::GET, "/v1/users/olivia/credentials/custom", None)
        .await;
    assert_eq!(stored.status, 200);
    let stored = stored.json();

    let (other_provider, _) = oauth_start(&fx, "oscar", json!({})).await;
    let (denied, _) = oauth_start(&fx, "oscar", json!({})).await;
    let (no_code, _) = oauth_start(&fx, "oscar", json!({})).await;
    let (markup_error, _) = oauth_start(&fx, "oscar", json!({})).await;
    let (with_return, _) = oauth_start(
        &fx,
        "oscar",
        json!({"return_to": "https://app.example/settings"}),
    )
    .await;

    let cb = |name: &str, target: String, expect: Expect| {
        Case::agent(name, req("GET", &target, &[], b""), expect)
    };
    let page = Expect::Html(400);
    let cases = vec![
        cb(
            "replayed state (already used)",
            format!("/oauth/custom/callback?code=code-olivia&state={used}"),
            page.clone(),
        ),
        cb(
            "forged state",
            "/oauth/custom/callback?code=c1&state=Zm9yZ2VkLXN0YXRlLXZhbHVlLTEyMzQ1Njc4OTA".into(),
            page.clone(),
        ),
        cb("no state", "/oauth/custom/callback?code=c1".into(), page.clone()),
        cb("empty state", "/oauth/custom/callback?code=c1&state=".into(), page.clone()),
        cb(
            "state made for another provider",
            format!("/oauth/other/callback?code=c1&state={other_provider}"),
            page.clone(),
        ),
        cb(
            "access denied",
            format!("/oauth/custom/callback?error=access_denied&state={denied}"),
            page.clone(),
        ),
        cb(
            "no code",
            format!("/oauth/custom/callback?state={no_code}"),
            page.clone(),
        ),
        cb(
            "markup in the error parameter",
            format!(
                "/oauth/custom/callback?error=%3Cscript%3Ealert(1)%3C/script%3E&state={markup_error}"
            ),
            page.clone(),
        )
        .absent("<script>"),
        cb(
            "markup in the state",
            "/oauth/custom/callback?code=c1&state=%3Cscript%3Ealert(1)%3C/script%3E".into(),
            page.clone(),
        )
        .absent("<script>"),
        cb(
            "unknown provider",
            "/oauth/nope/callback?code=c1&state=abc".into(),
            page.clone(),
        ),
        cb(
            "denied with return_to: redirect carries only the error code",
            format!("/oauth/custom/callback?error=access_denied&state={with_return}"),
            Expect::Redirect("https://app.example/settings?error=access_denied"),
        ),
        Case::agent(
            "POST to the callback",
            req(
                "POST",
                &format!("/oauth/custom/callback?code=c1&state={used}"),
                &[],
                b"",
            ),
            Expect::Error(405, "method_not_allowed"),
        ),
    ];
    let n = run_cases(&fx, "oauth", cases).await;
    assert!(n >= 12);

    // Nothing stored; the replayed state did not touch olivia's credential.
    let r = sk
        .admin(Method::GET, "/v1/users/oscar/credentials", None)
        .await;
    assert_eq!(r.json(), json!([]), "nothing stored for oscar");
    let again = sk
        .admin(Method::GET, "/v1/users/olivia/credentials/custom", None)
        .await
        .json();
    assert_eq!(again, stored, "olivia's credential unchanged by the replay");
    // Every state above was consumed: a second try with a good code fails.
    let (fresh, url) = oauth_start(&fx, "oscar", json!({})).await;
    fx.ts.register_code(
        "code-oscar",
        &query_param(&url, "code_challenge").unwrap(),
        &query_param(&url, "redirect_uri").unwrap(),
    );
    let r = raw_agent(
        sk,
        &req(
            "GET",
            &format!("/oauth/custom/callback?code=code-oscar&state={denied}"),
            &[],
            b"",
        ),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 400, "a consumed state stays consumed");
    let r = raw_agent(
        sk,
        &req(
            "GET",
            &format!("/oauth/custom/callback?code=code-oscar&state={fresh}"),
            &[],
            b"",
        ),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "a fresh state still works: {}", r.text());
    fx.control().await;
}

// ---------------------------------------------------------------------------
// Group 6: webhooks

fn post_call_sig(secret: &str, t: i64, body: &str) -> String {
    format!(
        "t={t},v0={}",
        hex(&hmac256(
            secret.as_bytes(),
            format!("{t}.{body}").as_bytes()
        ))
    )
}

#[tokio::test]
async fn hostile_webhooks() {
    let fx = Fx::start().await;
    let sk = &fx.sk;
    let now = unix_now();
    let victim = sk
        .session_with(
            json!({"user": "alice", "providers": ["custom"], "conversation_id": "conv-victim"}),
        )
        .await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let body =
        json!({"type": "post_call_transcription", "data": {"conversation_id": "conv-victim"}})
            .to_string();
    let other_body =
        json!({"type": "post_call_transcription", "data": {"conversation_id": "conv-other"}})
            .to_string();
    let pc = |name: &str, sig: Option<String>| {
        let mut h: Vec<(&str, &str)> = vec![("Content-Type", "application/json")];
        let sig = sig.unwrap_or_default();
        if !name.starts_with("no signature") {
            h.push(("ElevenLabs-Signature", &sig));
        }
        Case::agent(
            format!("post-call: {name}"),
            req("POST", "/v1/elevenlabs/post-call", &h, body.as_bytes()),
            Expect::Error(401, "invalid_signature"),
        )
    };
    let good_sig = post_call_sig(WEBHOOK_SECRET, now, &body);
    let init_body = json!({"caller_id": VICTIM_PHONE, "agent_id": "a", "called_number": "+15559998888", "call_sid": "CA1"}).to_string();
    let init = |name: &str, headers: &[(&str, &str)]| {
        let mut h = vec![("Content-Type", "application/json")];
        h.extend_from_slice(headers);
        Case::agent(
            format!("conversation-init: {name}"),
            req(
                "POST",
                "/v1/elevenlabs/conversation-init",
                &h,
                init_body.as_bytes(),
            ),
            Expect::Error(401, "unauthorized"),
        )
        .absent("eyJ")
        .absent("secret__sidekey_session")
    };
    let upper = INIT_SECRET.to_ascii_uppercase();
    let short = &INIT_SECRET[..INIT_SECRET.len() - 1];
    let long = format!("{INIT_SECRET}x");
    let bearer = format!("Bearer {INIT_SECRET}");
    let cases = vec![
        pc("no signature header", None),
        pc("garbage", Some("garbage".into())),
        pc("empty", Some(String::new())),
        pc("timestamp only", Some(format!("t={now}"))),
        pc(
            "signature only",
            Some(format!("v0={}", good_sig.split("v0=").nth(1).unwrap())),
        ),
        pc(
            "non-numeric timestamp",
            Some(format!(
                "t=now,v0={}",
                good_sig.split("v0=").nth(1).unwrap()
            )),
        ),
        pc(
            "wrong secret",
            Some(post_call_sig("not-the-webhook-secret", now, &body)),
        ),
        pc(
            "stale timestamp (1 h old, correctly signed)",
            Some(post_call_sig(WEBHOOK_SECRET, now - 3600, &body)),
        ),
        pc(
            "future timestamp (1 h ahead, correctly signed)",
            Some(post_call_sig(WEBHOOK_SECRET, now + 3600, &body)),
        ),
        pc(
            "signature of another body",
            Some(post_call_sig(WEBHOOK_SECRET, now, &other_body)),
        ),
        pc(
            "signature for another timestamp",
            Some(format!(
                "t={},v0={}",
                now - 5,
                good_sig.split("v0=").nth(1).unwrap()
            )),
        ),
        pc(
            "truncated signature",
            Some(good_sig[..good_sig.len() - 1].to_owned()),
        ),
        Case::agent(
            "post-call: right signature under another header name",
            req(
                "POST",
                "/v1/elevenlabs/post-call",
                &[("X-ElevenLabs-Signature", &good_sig)],
                body.as_bytes(),
            ),
            Expect::Error(401, "invalid_signature"),
        ),
        init("no secret", &[]),
        init("wrong secret", &[("X-Sidekey-Init-Secret", "wrong")]),
        init("empty secret", &[("X-Sidekey-Init-Secret", "")]),
        init("upper-cased secret", &[("X-Sidekey-Init-Secret", &upper)]),
        init(
            "secret missing its last character",
            &[("X-Sidekey-Init-Secret", short)],
        ),
        init(
            "secret with an extra character",
            &[("X-Sidekey-Init-Secret", &long)],
        ),
        init("secret as a bearer token", &[("Authorization", &bearer)]),
        init(
            "a session token instead of the secret",
            &[("X-Sidekey-Init-Secret", &victim)],
        ),
    ];
    let n = run_cases(&fx, "webhooks", cases).await;
    assert!(n >= 20);

    // None of the forged post-calls revoked the victim's session ...
    let conv = [
        ("X-Sidekey-Session", victim.as_str()),
        ("X-Conversation-Id", "conv-victim"),
    ];
    let u0 = fx.up.count();
    let r = raw_agent(sk, &req("GET", GOOD_PATH, &conv, b""))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "victim session still works: {}", r.text());
    assert_eq!(fx.up.count(), u0 + 1);
    // ... and the genuine one does (so the cases above tested something).
    let r = raw_agent(
        sk,
        &req(
            "POST",
            "/v1/elevenlabs/post-call",
            &[(
                "ElevenLabs-Signature",
                &post_call_sig(WEBHOOK_SECRET, unix_now(), &body),
            )],
            body.as_bytes(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let r = raw_agent(sk, &req("GET", GOOD_PATH, &conv, b""))
        .await
        .unwrap();
    check(&r, &Expect::Error(401, "invalid_session"), &[]).unwrap();
    // The right init secret does mint a session for the caller.
    let r = raw_agent(
        sk,
        &req(
            "POST",
            "/v1/elevenlabs/conversation-init",
            &[("X-Sidekey-Init-Secret", INIT_SECRET)],
            init_body.as_bytes(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert!(r.json()["dynamic_variables"]["secret__sidekey_session"].is_string());
    fx.control().await;
}

// ---------------------------------------------------------------------------
// Slow clients and the connection cap

/// Waits until the peer closes (EOF or error); returns what was read and how
/// long it took, or `None` if it stayed open for `limit`.
async fn wait_closed<S: AsyncRead + Unpin>(
    s: &mut S,
    limit: Duration,
) -> Option<(Vec<u8>, Duration)> {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some((got, started.elapsed())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn slow_clients_are_disconnected() {
    let fx = Fx::start_with(|o| {
        o.server("header_read_timeout_secs = 1")
            .server("tls_handshake_timeout_secs = 2")
            .server("max_connections = 4")
    })
    .await;
    let sk = &fx.sk;
    let limit = Duration::from_secs(8);

    // Half a request head, then silence.
    let mut s = tls_connect(sk, &[b"http/1.1"]).await.unwrap();
    s.write_all(
        format!(
            "GET {GOOD_PATH} HTTP/1.1\r\nHost: localhost\r\nX-Sidekey-Session: {}",
            fx.token
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    s.flush().await.unwrap();
    let (got, took) = wait_closed(&mut s, limit)
        .await
        .expect("a stalled request head is cut off");
    let text = String::from_utf8_lossy(&got);
    assert!(
        !text.starts_with("HTTP/1.1 200"),
        "a half request is never served: {text}"
    );
    eprintln!("half head: closed after {took:?} ({text:?})");

    // TLS done, then not one byte.
    let mut s = tls_connect(sk, &[b"http/1.1"]).await.unwrap();
    let (_, took) = wait_closed(&mut s, limit)
        .await
        .expect("a connection that never sends a request is cut off");
    eprintln!("silent after TLS: closed after {took:?}");

    // Half of the HTTP/2 preface, then silence.
    let mut s = tls_connect(sk, &[b"h2"]).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    s.flush().await.unwrap();
    let (_, took) = wait_closed(&mut s, limit)
        .await
        .expect("a stalled HTTP/2 preface is cut off");
    eprintln!("half h2 preface: closed after {took:?}");

    // Silent connections cannot pin the connection cap (4 here): as many
    // as the cap are cut off, and a normal client is served after them.
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(tls_connect(sk, &[b"http/1.1"]).await.unwrap());
    }
    let started = Instant::now();
    let r = raw_agent(sk, &req("GET", "/healthz", &[], b""))
        .await
        .expect("served once the silent connections are cut off");
    assert_eq!(r.status, 200);
    eprintln!(
        "served behind 4 silent connections after {:?}",
        started.elapsed()
    );
    drop(silent);

    // TCP only: no ClientHello.
    let mut tcp = TcpStream::connect(sk.agent_addr).await.unwrap();
    let (_, took) = wait_closed(&mut tcp, limit)
        .await
        .expect("a connection that never starts TLS is cut off");
    eprintln!("no TLS: closed after {took:?}");

    // An idle keep-alive connection after one full exchange.
    let mut s = tls_connect(sk, &[b"http/1.1"]).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut s, Duration::from_secs(5)).await.unwrap();
    assert_eq!(r.status, 200);
    let (_, took) = wait_closed(&mut s, limit)
        .await
        .expect("an idle keep-alive connection is closed");
    eprintln!("idle keep-alive: closed after {took:?}");

    // The admin listener too (plain TCP, loopback).
    let mut a = TcpStream::connect(sk.admin_addr).await.unwrap();
    a.write_all(b"GET /healthz HTTP/1.1\r\nHost: loc")
        .await
        .unwrap();
    wait_closed(&mut a, limit)
        .await
        .expect("admin: a stalled request head is cut off");
    let mut a = TcpStream::connect(sk.admin_addr).await.unwrap();
    wait_closed(&mut a, limit)
        .await
        .expect("admin: a connection that never sends a request is cut off");

    assert_eq!(fx.up.count(), 0);
    fx.control().await;
}

async fn hold_connection(sk: &Sidekey) -> TlsStream<TcpStream> {
    let mut s = tls_connect(sk, &[b"http/1.1"]).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut s, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    s
}

#[tokio::test]
async fn connection_cap_holds_and_frees() {
    let fx = Fx::start_with(|o| {
        o.server("max_connections = 8")
            .server("header_read_timeout_secs = 60")
    })
    .await;
    let sk = &fx.sk;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(hold_connection(sk).await);
    }
    // A ninth client is not served while eight connections are open ...
    let connector = tls_connector(sk, &[b"http/1.1"]);
    let addr = sk.agent_addr;
    let ninth = tokio::spawn(async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut s = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        read_response(&mut s, Duration::from_secs(60)).await
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !ninth.is_finished(),
        "the ninth connection was served while the cap of 8 was reached"
    );
    // ... while the admin listener keeps its own slots.
    let r = sk.admin(Method::GET, "/healthz", None).await;
    assert_eq!(r.status, 200);
    // One slot frees: the ninth is served.
    drop(held.pop());
    let r = tokio::time::timeout(Duration::from_secs(15), ninth)
        .await
        .expect("the ninth connection is served once a slot frees")
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200);
    // All slots free: many connections in a row all work.
    drop(held);
    for _ in 0..20 {
        let r = raw_agent(sk, &req("GET", "/healthz", &[], b""))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    fx.control().await;
}

// ---------------------------------------------------------------------------
// HTTP/2 abuse, with hand-written frames

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let n = payload.len();
    let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK integer with a 7-bit prefix (string lengths, no Huffman).
fn hpack_len(n: usize) -> Vec<u8> {
    if n < 127 {
        return vec![n as u8];
    }
    let mut out = vec![127u8];
    let mut rest = n - 127;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
    out
}

/// Literal header field without indexing, new name.
fn hpack_literal(name: &str, value: &str) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend(hpack_len(name.len()));
    out.extend_from_slice(name.as_bytes());
    out.extend(hpack_len(value.len()));
    out.extend_from_slice(value.as_bytes());
    out
}

/// GET `path` on https://localhost.
fn hpack_get(path: &str) -> Vec<u8> {
    // :method GET, :scheme https (static 2 and 7), then :path (4) and
    // :authority (1) as literals with an indexed name.
    let mut out = vec![0x82, 0x87, 0x04];
    out.extend(hpack_len(path.len()));
    out.extend_from_slice(path.as_bytes());
    out.push(0x01);
    out.extend(hpack_len("localhost".len()));
    out.extend_from_slice(b"localhost");
    out
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads frames until GOAWAY or EOF; returns the GOAWAY error code if one
/// came, `Err` if the connection stayed open for `limit`.
async fn h2_until_closed<S: AsyncRead + Unpin>(
    s: &mut S,
    limit: Duration,
) -> Result<Option<u32>, String> {
    let deadline = Instant::now() + limit;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        // Scan complete frames.
        let mut i = 0;
        while buf.len() >= i + 9 {
            let len =
                ((buf[i] as usize) << 16) | ((buf[i + 1] as usize) << 8) | buf[i + 2] as usize;
            if buf.len() < i + 9 + len {
                break;
            }
            if buf[i + 3] == 0x7 && len >= 8 {
                let p = &buf[i + 9..i + 9 + len];
                return Ok(Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]])));
            }
            i += 9 + len;
        }
        buf.drain(..i);
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Err(_) => return Err(format!("connection still open after {limit:?}")),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn h2_connect(sk: &Sidekey) -> TlsStream<TcpStream> {
    let mut s = tls_connect(sk, &[b"h2"]).await.unwrap();
    assert_eq!(
        s.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "the agent listener speaks h2"
    );
    s.write_all(H2_PREFACE).await.unwrap();
    s.write_all(&h2_frame(0x4, 0, 0, &[])).await.unwrap();
    s
}

/// Checks the server is up and proxying, over a fresh h2 connection.
async fn assert_healthy_h2(fx: &Fx) {
    let ca = std::fs::read(fx.sk.path().join("certs/server.crt")).unwrap();
    let h2 = support::client_trusting(&ca, true);
    let r = support::send(&h2, Method::GET, &fx.sk.agent_url("/healthz"), &[], "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.version, http::Version::HTTP_2);
    let u0 = fx.up.count();
    let r = support::send(
        &h2,
        Method::GET,
        &fx.sk.agent_url(GOOD_PATH),
        &[("x-sidekey-session", &fx.token)],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(fx.up.count(), u0 + 1);
}

#[tokio::test]
async fn h2_rapid_reset_flood() {
    let fx = Fx::start().await;
    let mut s = h2_connect(&fx.sk).await;
    let block = hpack_get("/healthz");
    let mut burst = Vec::new();
    for i in 0..2000u32 {
        let id = 2 * i + 1;
        burst.extend(h2_frame(0x1, 0x5, id, &block)); // HEADERS, END_STREAM|END_HEADERS
        burst.extend(h2_frame(0x3, 0, id, &8u32.to_be_bytes())); // RST_STREAM CANCEL
    }
    let _ = s.write_all(&burst).await;
    let _ = s.flush().await;
    let goaway = h2_until_closed(&mut s, Duration::from_secs(15))
        .await
        .expect("the flooding connection is shut down");
    assert_eq!(
        goaway,
        Some(0xb),
        "GOAWAY ENHANCE_YOUR_CALM for a rapid-reset flood"
    );
    assert_healthy_h2(&fx).await;
    fx.control().await;
}

#[tokio::test]
async fn h2_continuation_flood() {
    let fx = Fx::start().await;
    let mut s = h2_connect(&fx.sk).await;
    // HEADERS without END_HEADERS, then CONTINUATION frames that never end.
    let _ = s
        .write_all(&h2_frame(0x1, 0x1, 1, &hpack_get("/healthz")))
        .await;
    let pad = hpack_literal("x-pad", &"p".repeat(8000));
    for _ in 0..200 {
        if s.write_all(&h2_frame(0x9, 0, 1, &pad)).await.is_err() {
            break;
        }
    }
    let _ = s.flush().await;
    let goaway = h2_until_closed(&mut s, Duration::from_secs(15))
        .await
        .expect("the flooding connection is shut down");
    assert_eq!(
        goaway,
        Some(0xb),
        "GOAWAY ENHANCE_YOUR_CALM for a CONTINUATION flood"
    );
    assert_healthy_h2(&fx).await;
    fx.control().await;
}

#[tokio::test]
async fn agent_side_bodies_must_be_json_objects() {
    let up = support::upstream::Upstream::start().await;
    let sk = Sidekey::start(Options::with_providers(&support::provider_toml(
        "custom", &up.url, "",
    )))
    .await;
    sk.put_credential("arr", "custom", json!({"access_token": "tok-array-case"}))
        .await;
    let t = sk.token("arr", &["custom"]).await;
    for (path, body) in [
        ("/v1/call/custom", r#"["GET", "/x"]"#),
        ("/v1/session/refresh", r#"["custom"]"#),
    ] {
        let r = sk.proxy(Method::POST, path, &t, body).await;
        r.assert_error(400, "bad_request");
    }
    let r = sk
        .agent(
            Method::POST,
            "/v1/elevenlabs/conversation-init",
            &[("x-sidekey-init-secret", support::INIT_SECRET)],
            r#"["+15551234567"]"#,
        )
        .await;
    r.assert_error(400, "bad_request");
    assert_eq!(up.count(), 0, "nothing reached the upstream");
}
