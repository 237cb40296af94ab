//! Webhooks nobody can starve: unauthenticated post-call bodies share the
//! webhook memory budget fairly (a share per body, a reserve kept for small
//! bodies, a minimum transfer rate), and both ElevenLabs webhooks decide on
//! their headers before reading a byte of the body. Black-box, against the
//! real binary; the slow senders are real slow senders, so real time.
use sidekey_testkit as support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use serde_json::json;
use support::upstream::Upstream;
use support::{Options, Sidekey, WEBHOOK_SECRET, provider_toml, unix_now};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 1 << 20;

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// `t=<t>,v0=<hex>` with hex = HMAC-SHA256(secret, "<t>.<body>").
fn sign(t: i64, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(WEBHOOK_SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={t},v0={hex}")
}

/// What an attacker can send without the secret: a fresh timestamp and a
/// signature that will not verify.
fn fresh_forgery() -> String {
    format!("t={},v0={}", unix_now(), "ab".repeat(32))
}

/// An HTTP/1.1 connection over TLS to the agent listener.
async fn tls_connect(sk: &Sidekey) -> Tls {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(sk.path().join("certs/server.crt"))
        .unwrap()
    {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(sk.agent_addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

/// Sends a request head (nothing of the body).
async fn send_head(sk: &Sidekey, path: &str, headers: &[(&str, String)]) -> Tls {
    let mut tls = tls_connect(sk).await;
    let mut head =
        format!("POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    tls
}

/// The answer's head (status line and headers), if one comes within `wait`.
async fn answer_within(tls: &mut Tls, wait: Duration) -> Option<String> {
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match tls.read(&mut buf).await {
                Ok(n) if n > 0 => {
                    got.extend_from_slice(&buf[..n]);
                    if got.windows(4).any(|w| w == b"\r\n\r\n") {
                        return;
                    }
                }
                _ => return,
            }
        }
    };
    let _ = tokio::time::timeout(wait, read).await;
    (!got.is_empty()).then(|| String::from_utf8_lossy(&got).into_owned())
}

fn status_line(head: &str) -> &str {
    head.lines().next().unwrap_or("")
}

/// How a slow sender ended.
#[derive(Debug)]
enum Sent {
    /// Still sending, no answer: the server is still reading its body.
    Holding,
    /// The server answered (the start of its answer: status line, headers).
    Answered(String),
    /// The connection ended without an answer.
    Closed,
}

/// A sender of a fake-signed post-call: declares `declared` bytes, sends
/// `burst` of them at once, then `chunk` bytes every `every` until told to
/// stop or the server answers.
struct SlowSender {
    burst_sent: tokio::sync::oneshot::Receiver<()>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Sent>,
}

impl SlowSender {
    async fn start(
        sk: &Sidekey,
        declared: Option<usize>,
        burst: usize,
        chunk: usize,
        every: Duration,
    ) -> SlowSender {
        let forged = vec![("ElevenLabs-Signature", fresh_forgery())];
        Self::start_at(
            sk,
            "/v1/elevenlabs/post-call",
            forged,
            declared,
            burst,
            chunk,
            every,
        )
        .await
    }

    /// The same at another webhook, with its own (forged) headers.
    async fn start_at(
        sk: &Sidekey,
        path: &str,
        mut headers: Vec<(&'static str, String)>,
        declared: Option<usize>,
        burst: usize,
        chunk: usize,
        every: Duration,
    ) -> SlowSender {
        match declared {
            Some(n) => headers.push(("Content-Length", n.to_string())),
            None => headers.push(("Transfer-Encoding", "chunked".into())),
        }
        let tls = send_head(sk, path, &headers).await;
        let (burst_tx, burst_sent) = tokio::sync::oneshot::channel();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let chunked = declared.is_none();
        let task = tokio::spawn(async move {
            let (mut rd, mut wr) = tokio::io::split(tls);
            let frame = |n: usize| {
                let mut v = Vec::with_capacity(n + 16);
                if chunked {
                    v.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                }
                v.extend(std::iter::repeat_n(b' ', n));
                if chunked {
                    v.extend_from_slice(b"\r\n");
                }
                v
            };
            let mut answer = Vec::new();
            let mut buf = [0u8; 1024];
            // The burst, watching for an early answer.
            let burst_data = frame(burst);
            tokio::select! {
                r = wr.write_all(&burst_data) => if r.is_err() {
                    return read_answer(&mut rd, &mut answer).await;
                },
                r = rd.read(&mut buf) => return answered(r, &buf),
            }
            let _ = burst_tx.send(());
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = &mut stopped => return Sent::Holding,
                    r = rd.read(&mut buf) => return answered(r, &buf),
                    _ = tick.tick(), if chunk > 0 => {
                        if wr.write_all(&frame(chunk)).await.is_err() {
                            return read_answer(&mut rd, &mut answer).await;
                        }
                    }
                }
            }
        });
        SlowSender {
            burst_sent,
            stop,
            task,
        }
    }

    /// Waits until the burst is written (whatever the server does with it).
    async fn burst_written(&mut self) {
        let _ = (&mut self.burst_sent).await;
    }

    /// How it ended, or that it is still holding.
    async fn finish(self) -> Sent {
        let _ = self.stop.send(());
        self.task.await.unwrap()
    }

    /// Waits (up to `wait`) for the server to answer.
    async fn answer(mut self, wait: Duration) -> Sent {
        // The task ends by itself only when answered or closed.
        match tokio::time::timeout(wait, &mut self.task).await {
            Ok(end) => end.unwrap(),
            Err(_) => self.finish().await,
        }
    }
}

fn answered(r: std::io::Result<usize>, buf: &[u8]) -> Sent {
    match r {
        Ok(n) if n > 0 => Sent::Answered(String::from_utf8_lossy(&buf[..n]).into_owned()),
        _ => Sent::Closed,
    }
}

async fn read_answer(rd: &mut tokio::io::ReadHalf<Tls>, got: &mut Vec<u8>) -> Sent {
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(Duration::from_secs(2), rd.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => {
            got.extend_from_slice(&buf[..n]);
            Sent::Answered(String::from_utf8_lossy(got).into_owned())
        }
        _ => Sent::Closed,
    }
}

/// The resident memory of a process, in bytes (Linux).
fn rss(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kb * 1024
}

/// Waits up to `wait` for the process's resident memory to reach `at_least`;
/// returns what it was when it stopped waiting.
async fn rss_reaches(pid: u32, at_least: usize, wait: Duration) -> usize {
    let t0 = Instant::now();
    loop {
        let now = rss(pid);
        if now >= at_least || t0.elapsed() > wait {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A signed post-call event of exactly `size` bytes (padded in `data`).
fn event_of_size(kind: &str, conv: &str, size: usize) -> Vec<u8> {
    let head = format!(
        r#"{{"type":"{kind}","event_timestamp":{},"data":{{"agent_id":"agent_1","conversation_id":"{conv}","full_audio":""#,
        unix_now()
    );
    let tail = r#""}}"#;
    let pad = size - head.len() - tail.len();
    let mut body = head.into_bytes();
    body.extend(std::iter::repeat_n(b'A', pad));
    body.extend_from_slice(tail.as_bytes());
    assert_eq!(body.len(), size);
    body
}

/// A signed post-call through the ordinary client; its status, answer and
/// how long it took.
async fn genuine_post_call(sk: &Sidekey, body: Vec<u8>) -> (u16, serde_json::Value, Duration) {
    let sig = sign(unix_now(), &body);
    let t0 = Instant::now();
    let r = sk
        .agent(
            Method::POST,
            "/v1/elevenlabs/post-call",
            &[
                ("content-type", "application/json"),
                ("elevenlabs-signature", &sig),
            ],
            Bytes::from(body),
        )
        .await;
    let took = t0.elapsed();
    let v = serde_json::from_slice(&r.body).unwrap_or_else(|_| json!(r.text()));
    (r.status.as_u16(), v, took)
}

async fn start() -> (Upstream, Sidekey) {
    let up = Upstream::start().await;
    let sk = Sidekey::start(Options::with_providers(&provider_toml(
        "custom", &up.url, "",
    )))
    .await;
    sk.put_credential("carol", "custom", json!({"access_token": "tok-carol"}))
        .await;
    (up, sk)
}

/// A session bound to `conv`, checked to work through the proxy.
async fn session_for(sk: &Sidekey, conv: &str) -> String {
    let token = sk
        .session_with(json!({"user": "carol", "providers": ["custom"], "conversation_id": conv}))
        .await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = proxied(sk, &token, conv).await;
    assert_eq!(r.status, 200, "{}", r.text());
    token
}

async fn proxied(sk: &Sidekey, token: &str, conv: &str) -> support::Resp {
    sk.agent(
        Method::GET,
        "/v1/proxy/custom/ping",
        &[("x-sidekey-session", token), ("x-conversation-id", conv)],
        "",
    )
    .await
}

// ---------------------------------------------------------------------------

/// Four unauthenticated senders each declare a 62 MiB body, send 15 MiB of
/// it and keep trickling above the minimum rate: together they hold most
/// of the webhook memory. A genuine signed post-call, small or of 4 MiB,
/// still gets in at once and ends its conversation's session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_senders_cannot_keep_a_signed_post_call_out() {
    let (_up, sk) = start().await;
    let small_conv = session_for(&sk, "conv-small").await;
    let big_conv = session_for(&sk, "conv-big").await;
    let pid = sk.pid().unwrap();
    let before = rss(pid);

    let mut senders = Vec::new();
    for _ in 0..4 {
        senders.push(
            SlowSender::start(
                &sk,
                Some(62 * MIB),
                15 * MIB,
                32 * 1024,
                Duration::from_millis(250),
            )
            .await,
        );
    }
    for s in &mut senders {
        s.burst_written().await;
    }
    // The server has read (and holds) the bursts.
    let held = rss_reaches(pid, before + 50 * MIB, Duration::from_secs(10)).await;

    let (status, v, took) = genuine_post_call(
        &sk,
        event_of_size("post_call_transcription", "conv-small", 2048),
    )
    .await;
    assert_eq!(status, 200, "small signed post-call under load: {v}");
    assert_eq!(v["sessions_revoked"], 1, "{v}");
    assert!(
        took < Duration::from_secs(1),
        "small post-call took {took:?}"
    );
    proxied(&sk, &small_conv, "conv-small")
        .await
        .assert_error(401, "invalid_session");

    let (status, v, took) =
        genuine_post_call(&sk, event_of_size("post_call_audio", "conv-big", 4 * MIB)).await;
    assert_eq!(status, 200, "4 MiB signed post-call under load: {v}");
    assert_eq!(v["sessions_revoked"], 1, "{v}");
    assert!(
        took < Duration::from_secs(1),
        "4 MiB post-call took {took:?}"
    );
    proxied(&sk, &big_conv, "conv-big")
        .await
        .assert_error(401, "invalid_session");

    // The senders were not cut off to make room: each is still being read.
    for (i, s) in senders.into_iter().enumerate() {
        let end = s.finish().await;
        assert!(matches!(end, Sent::Holding), "sender {i}: {end:?}");
    }
    assert!(
        held >= before + 50 * MIB,
        "the senders' bodies were held: resident memory {} MiB before, {} MiB during",
        before / MIB,
        held / MIB
    );
}

/// One body alone may use the whole budget (a long call's audio), but past
/// its share only on loan: when bodies within their share need the memory,
/// it is the one cut off (503), and they go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_past_its_share_gives_way_to_bodies_within_theirs() {
    let (_up, sk) = start().await;
    let conv = session_for(&sk, "conv-long-call").await;
    // No contention: a 40 MiB signed audio event is read and revokes.
    let (status, v, _) = genuine_post_call(
        &sk,
        event_of_size("post_call_audio", "conv-long-call", 40 * MIB),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["sessions_revoked"], 1, "{v}");
    proxied(&sk, &conv, "conv-long-call")
        .await
        .assert_error(401, "invalid_session");

    let mut hog = SlowSender::start(
        &sk,
        Some(62 * MIB),
        40 * MIB,
        32 * 1024,
        Duration::from_millis(250),
    )
    .await;
    hog.burst_written().await;
    // Chunked, without a length: the server sees them grow.
    let mut others = Vec::new();
    for _ in 0..2 {
        let mut s =
            SlowSender::start(&sk, None, 14 * MIB, 32 * 1024, Duration::from_millis(250)).await;
        s.burst_written().await;
        others.push(s);
    }
    let end = hog.answer(Duration::from_secs(5)).await;
    match &end {
        Sent::Answered(head) => assert_eq!(status_line(head), "HTTP/1.1 503 Service Unavailable"),
        other => panic!("the body past its share was not cut off: {other:?}"),
    }
    for (i, s) in others.into_iter().enumerate() {
        let end = s.finish().await;
        assert!(
            matches!(end, Sent::Holding),
            "sender {i} within its share: {end:?}"
        );
    }
}

/// A body arriving slower than `webhook_min_bytes_per_sec` (64 KiB/s) over
/// a window of `webhook_min_rate_grace_secs` (3 s) is cut off with 408 and
/// its memory given back; one above the rate is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_below_the_minimum_rate_is_cut_off() {
    let (_up, sk) = start().await;
    let t0 = Instant::now();
    // Sends 1 KiB and stalls; trickles at 32 KiB/s; sends at 256 KiB/s.
    let stalled = SlowSender::start(&sk, Some(8 * MIB), 1024, 0, Duration::from_secs(3600)).await;
    let slow = SlowSender::start(&sk, None, 1024, 16 * 1024, Duration::from_millis(500)).await;
    let steady = SlowSender::start(&sk, None, 1024, 64 * 1024, Duration::from_millis(250)).await;
    for (what, s) in [("stalled", stalled), ("slow", slow)] {
        let end = s.answer(Duration::from_secs(10)).await;
        let took = t0.elapsed();
        match &end {
            Sent::Answered(head) => {
                assert_eq!(status_line(head), "HTTP/1.1 408 Request Timeout", "{what}");
                // sidekey's own error, in its usual shape.
                assert!(
                    head.to_ascii_lowercase()
                        .contains("x-sidekey-error: request_timeout"),
                    "{what}: {head}"
                );
            }
            other => panic!("{what} sender not cut off: {other:?}"),
        }
        assert!(
            took >= Duration::from_millis(2500),
            "{what} cut off before the grace: {took:?}"
        );
        assert!(
            took < Duration::from_secs(8),
            "{what} cut off late: {took:?}"
        );
    }
    let end = steady.finish().await;
    assert!(
        matches!(end, Sent::Holding),
        "a sender above the rate: {end:?}"
    );
}

/// A missing, malformed or stale signature (post-call) or a missing or
/// wrong init secret (conversation-init) is refused while the client has
/// sent only the request head: nothing of the body is awaited or read. A
/// request that passes the header checks, by contrast, waits for its body.
#[tokio::test]
async fn webhooks_refuse_on_their_headers_before_any_body() {
    let (_up, sk) = start().await;
    let now = unix_now();
    let body = br#"{"type":"post_call_transcription","data":{"conversation_id":"conv-x"}}"#;
    let post_call_cases: Vec<(&str, Option<String>)> = vec![
        ("no signature header", None),
        ("malformed header", Some("garbage".into())),
        ("no timestamp", Some(format!("v0={}", "ab".repeat(32)))),
        ("stale timestamp", Some(sign(now - 31 * 60, body))),
        ("timestamp in the future", Some(sign(now + 31 * 60, body))),
    ];
    for (what, sig) in post_call_cases {
        for expect_continue in [false, true] {
            let mut headers = vec![("Content-Length", body.len().to_string())];
            if let Some(s) = &sig {
                headers.push(("ElevenLabs-Signature", s.clone()));
            }
            if expect_continue {
                headers.push(("Expect", "100-continue".into()));
            }
            let mut tls = send_head(&sk, "/v1/elevenlabs/post-call", &headers).await;
            let head = answer_within(&mut tls, Duration::from_secs(5))
                .await
                .unwrap_or_default();
            assert_eq!(
                status_line(&head),
                "HTTP/1.1 401 Unauthorized",
                "{what} (expect 100-continue: {expect_continue}): refused with the body unsent"
            );
        }
    }

    let init_cases: Vec<(&str, Option<&str>)> = vec![
        ("no init secret", None),
        ("wrong init secret", Some("not-the-init-secret-at-all")),
    ];
    for (what, secret) in init_cases {
        let mut headers = vec![("Content-Length", "100".to_string())];
        if let Some(s) = secret {
            headers.push(("X-Sidekey-Init-Secret", s.to_owned()));
        }
        let mut tls = send_head(&sk, "/v1/elevenlabs/conversation-init", &headers).await;
        let head = answer_within(&mut tls, Duration::from_secs(5))
            .await
            .unwrap_or_default();
        assert_eq!(status_line(&head), "HTTP/1.1 401 Unauthorized", "{what}");
    }

    // Controls: right headers, body not yet sent → the server waits for it,
    // then answers once it arrives.
    let sig = sign(unix_now(), body);
    let mut tls = send_head(
        &sk,
        "/v1/elevenlabs/post-call",
        &[
            ("ElevenLabs-Signature", sig),
            ("Content-Length", body.len().to_string()),
        ],
    )
    .await;
    assert_eq!(
        answer_within(&mut tls, Duration::from_millis(300)).await,
        None
    );
    tls.write_all(body).await.unwrap();
    let head = answer_within(&mut tls, Duration::from_secs(5))
        .await
        .unwrap_or_default();
    assert_eq!(status_line(&head), "HTTP/1.1 200 OK", "{head}");

    let init = br#"{"caller_id":"+15550100"}"#;
    let mut tls = send_head(
        &sk,
        "/v1/elevenlabs/conversation-init",
        &[
            ("X-Sidekey-Init-Secret", support::INIT_SECRET.to_owned()),
            ("Content-Length", init.len().to_string()),
        ],
    )
    .await;
    assert_eq!(
        answer_within(&mut tls, Duration::from_millis(300)).await,
        None
    );
    tls.write_all(init).await.unwrap();
    let head = answer_within(&mut tls, Duration::from_secs(5))
        .await
        .unwrap_or_default();
    assert_eq!(status_line(&head), "HTTP/1.1 200 OK", "{head}");
}

/// Over HTTP/2 too, a body cut off mid-stream gets its answer (a 408 here),
/// never a stream reset in its place.
#[tokio::test]
async fn a_cut_off_http2_body_still_gets_its_answer() {
    use rustls::pki_types::pem::PemObject;
    let (_up, sk) = start().await;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(sk.path().join("certs/server.crt"))
        .unwrap()
    {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(sk.agent_addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (client, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::post(sk.agent_url("/v1/elevenlabs/post-call"))
        .header("elevenlabs-signature", fresh_forgery())
        .body(())
        .unwrap();
    let (resp, mut body) = client.send_request(req, false).unwrap();
    body.send_data(Bytes::from_static(b"{\"type\":"), false)
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("no answer within 10 s");
    match resp {
        Ok(r) => {
            assert_eq!(r.status(), 408);
            assert_eq!(r.headers()["x-sidekey-error"], "request_timeout");
        }
        Err(e) => panic!("the stream was reset instead of answered: {e:?}"),
    }
}

const RETELL_KEY: &str = "key_retell-fairness-test-000001";
const VAPI_HMAC: &str = "vapi-hmac-fairness-test-0000001";

/// `v=<ms>,d=<hex HMAC-SHA256(api key, body + v)>`, as Retell signs.
fn retell_sign(body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let v = (unix_now() * 1000).to_string();
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(RETELL_KEY.as_bytes()).unwrap();
    mac.update(body);
    mac.update(v.as_bytes());
    let d: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("v={v},d={d}")
}

/// Vapi's and Retell's webhooks read their bodies in the same budget:
/// forged slow senders on both hold memory, a genuine signed Retell
/// `call_ended` still gets in and ends its call's session, and a sender
/// below the minimum rate is cut off with 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vapi_and_retell_bodies_share_the_fair_budget() {
    let up = Upstream::start().await;
    let sk = Sidekey::start(
        Options::with_providers(&format!(
            "{}\n[retell]\napi_key_env = \"RETELL_KEY\"\n[vapi]\nhmac_secret_env = \"VAPI_HMAC\"\n",
            provider_toml("custom", &up.url, "")
        ))
        .env("RETELL_KEY", RETELL_KEY)
        .env("VAPI_HMAC", VAPI_HMAC),
    )
    .await;
    sk.put_credential("carol", "custom", json!({"access_token": "tok-carol"}))
        .await;
    let conv = "retell-fair-call";
    let token = session_for(&sk, conv).await;
    let pid = sk.pid().unwrap();
    let before = rss(pid);

    let ms = (unix_now() * 1000).to_string();
    let mut senders = Vec::new();
    for i in 0..4 {
        let (path, headers) = if i % 2 == 0 {
            (
                "/v1/retell/webhook",
                vec![(
                    "X-Retell-Signature",
                    format!("v={ms},d={}", "ab".repeat(32)),
                )],
            )
        } else {
            (
                "/v1/vapi/tools",
                vec![
                    ("x-timestamp", ms.clone()),
                    ("x-signature", "cd".repeat(32)),
                ],
            )
        };
        senders.push(
            SlowSender::start_at(
                &sk,
                path,
                headers,
                Some(62 * MIB),
                15 * MIB,
                32 * 1024,
                Duration::from_millis(250),
            )
            .await,
        );
    }
    for s in &mut senders {
        s.burst_written().await;
    }
    let held = rss_reaches(pid, before + 50 * MIB, Duration::from_secs(10)).await;

    let ended = json!({"event": "call_ended", "call": {"call_id": conv, "call_status": "ended"}})
        .to_string();
    let t0 = Instant::now();
    let r = sk
        .agent(
            Method::POST,
            "/v1/retell/webhook",
            &[
                ("content-type", "application/json"),
                ("x-retell-signature", &retell_sign(ended.as_bytes())),
            ],
            ended.clone(),
        )
        .await;
    let took = t0.elapsed();
    assert_eq!(
        r.status,
        200,
        "signed Retell webhook under load: {}",
        r.text()
    );
    assert_eq!(r.json()["sessions_revoked"], 1, "{}", r.text());
    assert!(took < Duration::from_secs(1), "took {took:?}");
    proxied(&sk, &token, conv)
        .await
        .assert_error(401, "invalid_session");
    for (i, s) in senders.into_iter().enumerate() {
        let end = s.finish().await;
        assert!(matches!(end, Sent::Holding), "sender {i}: {end:?}");
    }
    assert!(held >= before + 50 * MIB, "held {} MiB", held / MIB);

    // Below the minimum rate (1 byte a second): cut off with 408.
    let slow = SlowSender::start_at(
        &sk,
        "/v1/retell/webhook",
        vec![(
            "X-Retell-Signature",
            format!("v={},d={}", unix_now() * 1000, "ab".repeat(32)),
        )],
        Some(MIB),
        16,
        1,
        Duration::from_secs(1),
    )
    .await;
    match slow.answer(Duration::from_secs(30)).await {
        Sent::Answered(head) => assert!(status_line(&head).contains(" 408 "), "{head}"),
        other => panic!("a trickling Retell body was not cut off: {other:?}"),
    }
}
