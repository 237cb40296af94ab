//! Crash safety: the real binary is SIGKILLed again and again while admin
//! writes and refreshes with rotating refresh tokens are in flight. After
//! every restart:
//!
//! - the store opens (the binary becomes ready),
//! - every admin write that was answered 2xx is there, and nothing rolled
//!   back behind an acknowledged version,
//! - every refreshing credential holds the provider's newest refresh token,
//!   except when the kill fell between the provider's answer and sidekey's
//!   flush (the provider rotated X→Y, sidekey still holds X). Those windows
//!   are detected, counted and reported; they may only ever be one rotation
//!   behind, and they must be rare compared with the refreshes done.
use sidekey_testkit as support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use serde_json::json;
use support::token::TokenServer;
use support::upstream::Upstream;
use support::{Options, Sidekey, TestClient, provider_toml};

const ROUNDS: usize = 20;
/// Refreshing credentials, each with its own fake token endpoint so its
/// chain of rotated refresh tokens is exactly the fake's counter.
const CHAINS: usize = 6;
/// Concurrent proxied callers per chain (they share the single flight).
const CALLERS_PER_CHAIN: usize = 2;
const WRITERS: usize = 4;
/// Refreshing calls every chain completes in a round before the kill may
/// come, so every round has real refresh traffic to interrupt.
const MIN_CALLS_PER_ROUND: usize = 5;
const CLIENT_ID: &str = "test-client";

/// A request that may fail because the server was killed under it.
async fn try_send(
    client: &TestClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: String,
) -> Result<(u16, Bytes), String> {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(15), client.request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

/// Where one refresh chain stands: the refresh token the test seeded last,
/// and the fake's counter at that moment (the next rotation issues
/// `rt-{base+1}-test-client`).
struct Chain {
    seed: String,
    base: u64,
}

fn rotation_number(rt: &str) -> Option<u64> {
    rt.strip_prefix("rt-")?
        .strip_suffix(&format!("-{CLIENT_ID}"))?
        .parse()
        .ok()
}

impl Chain {
    /// The refresh token the provider accepted just before `newest`: the
    /// one a crash between the provider's answer and the flush leaves
    /// behind. `None` when `newest` is the seed itself.
    fn predecessor(&self, newest: &str) -> Option<String> {
        let n = rotation_number(newest)?;
        if n == self.base + 1 {
            Some(self.seed.clone())
        } else {
            Some(format!("rt-{}-{CLIENT_ID}", n - 1))
        }
    }
}

/// The one refresh token the fake accepts now.
fn newest_refresh(ts: &TokenServer) -> String {
    let st = ts.state.lock().unwrap();
    assert_eq!(
        st.valid_refresh.len(),
        1,
        "one live refresh token per chain: {:?}",
        st.valid_refresh
    );
    st.valid_refresh.iter().next().unwrap().clone()
}

/// (Re)connects chain `i`: a new refresh token at the fake (the old one
/// forgotten), stored through the admin API.
async fn seed(sk: &Sidekey, ts: &TokenServer, chains: &mut [Chain], i: usize, tag: &str) {
    let seed = format!("seed-{i}-{tag}");
    let base = {
        let mut st = ts.state.lock().unwrap();
        let base = st
            .valid_refresh
            .iter()
            .filter_map(|t| rotation_number(t))
            .max()
            .unwrap_or(chains.get(i).map(|c| c.base).unwrap_or(0));
        st.valid_refresh.clear();
        st.valid_refresh.insert(seed.clone());
        base
    };
    sk.put_credential(
        &format!("rf{i}"),
        &format!("r{i}"),
        json!({"access_token": format!("at-seed-{i}-{tag}"), "refresh_token": seed, "expires_in": 1}),
    )
    .await;
    if i < chains.len() {
        chains[i] = Chain { seed, base };
    }
}

#[derive(Default)]
struct WriterLog {
    /// Fresh users whose write was acknowledged: user → marker.
    fresh_acked: Vec<(String, String)>,
    /// Versioned user: last acknowledged and last attempted version.
    version_acked: u64,
    version_attempted: u64,
    overwrites_acked: usize,
}

/// Waits until the fakes have seen no new request for a while, so a
/// request that was already in a socket buffer when the server died is
/// accounted for before the chains are judged.
async fn quiesce(fakes: &[TokenServer], up: &Upstream) {
    let total = || fakes.iter().map(TokenServer::calls).sum::<usize>() + up.count();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = total();
    let mut stable_since = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
        let now = total();
        if now != last {
            last = now;
            stable_since = Instant::now();
        } else if stable_since.elapsed() >= Duration::from_millis(200) {
            return;
        }
    }
    panic!("the fakes never went quiet after the kill");
}

/// The highest rotation whose access token (`at-{n}-test-client`) the
/// upstream has received for chain `i` (its requests go to `/c{i}/...`).
fn newest_access_used(up: &Upstream, i: usize) -> Option<u64> {
    let prefix = format!("/c{i}/");
    up.requests()
        .iter()
        .filter(|r| r.path.starts_with(&prefix))
        .filter_map(|r| r.bearer())
        .filter_map(|b| {
            b.strip_prefix("at-")?
                .strip_suffix(&format!("-{CLIENT_ID}"))?
                .parse()
                .ok()
        })
        .max()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_under_writes_and_rotating_refreshes_loses_nothing_acknowledged() {
    let started = Instant::now();
    let up = Upstream::start().await;
    let mut fakes = Vec::new();
    let mut toml = provider_toml("static", &up.url, "");
    for i in 0..CHAINS {
        let ts = TokenServer::start().await;
        // Expired when issued: every proxied call refreshes. (A token that
        // merely lives shorter than the skew is no longer refreshed on
        // every call: the skew is capped at half its lifetime.)
        ts.set_expires_at(Some(1));
        toml.push_str(&provider_toml(
            &format!("r{i}"),
            &up.url,
            &format!(
                "token_url = \"{}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret_env = \"CRASH_CLIENT_SECRET\"\nrefresh_skew_secs = 60",
                ts.url
            ),
        ));
        fakes.push(ts);
    }
    let opts = Options::with_providers(&toml).env("CRASH_CLIENT_SECRET", "test-client-secret");
    let mut sk = Sidekey::start(opts).await;

    let mut chains: Vec<Chain> = (0..CHAINS)
        .map(|_| Chain {
            seed: String::new(),
            base: 0,
        })
        .collect();
    for (i, ts) in fakes.iter().enumerate() {
        seed(&sk, ts, &mut chains, i, "initial").await;
    }
    // Sessions are store records signed with a persistent key: minted once,
    // they must keep working across every crash.
    let mut sessions = Vec::new();
    for i in 0..CHAINS {
        let s = sk
            .session_with(
                json!({"user": format!("rf{i}"), "providers": [format!("r{i}")], "ttl_secs": 3600}),
            )
            .await;
        sessions.push(s["token"].as_str().unwrap().to_owned());
    }

    let mut writer_logs: Vec<WriterLog> = (0..WRITERS).map(|_| WriterLog::default()).collect();
    let mut all_fresh: Vec<(String, String)> = Vec::new();
    let mut windows = 0usize;
    let mut window_rounds = Vec::new();
    let mut live_ok_calls = 0usize;
    let mut probes_ok = 0usize;

    for round in 0..ROUNDS {
        // ---- load: proxied calls that refresh, and admin writes ----------
        let ok_calls: Arc<Vec<AtomicUsize>> =
            Arc::new((0..CHAINS).map(|_| AtomicUsize::new(0)).collect());
        let mut callers = Vec::new();
        for (i, token) in sessions.iter().enumerate() {
            for _ in 0..CALLERS_PER_CHAIN {
                let client = sk.client.clone();
                let url = sk.agent_url(&format!("/v1/proxy/r{i}/c{i}/ping"));
                let token = token.clone();
                let ok_calls = ok_calls.clone();
                callers.push(tokio::spawn(async move {
                    loop {
                        match try_send(
                            &client,
                            Method::GET,
                            &url,
                            &[("x-sidekey-session", &token)],
                            String::new(),
                        )
                        .await
                        {
                            Ok((200, _)) => {
                                ok_calls[i].fetch_add(1, Ordering::Relaxed);
                            }
                            // Nothing crashed yet while an answer arrives:
                            // any refusal here is a real failure.
                            Ok((st, body)) => {
                                return Err(format!(
                                    "r{i}: live call answered {st}: {}",
                                    String::from_utf8_lossy(&body)
                                ));
                            }
                            Err(_) => return Ok(()),
                        }
                    }
                }));
            }
        }
        let mut writers = Vec::new();
        for (t, log) in writer_logs.iter().enumerate() {
            let client = sk.admin_client.clone();
            let base = sk.admin_url("");
            let auth = format!("Bearer {}", sk.admin_token);
            let mut version = log.version_attempted;
            writers.push(tokio::spawn(async move {
                let mut out = WriterLog {
                    version_acked: 0,
                    version_attempted: version,
                    ..Default::default()
                };
                let headers = [
                    ("authorization", auth.as_str()),
                    ("content-type", "application/json"),
                ];
                for seq in 0u64.. {
                    // Alternate: a brand-new user, then an overwrite of this
                    // writer's versioned user.
                    let (user, marker) = if seq % 2 == 0 {
                        (
                            format!("w{round}-{t}-{seq}"),
                            format!("fresh-{round}-{seq}"),
                        )
                    } else {
                        version += 1;
                        out.version_attempted = version;
                        (format!("v{t}"), format!("v{version}"))
                    };
                    let body =
                        json!({"access_token": format!("tok-{user}-{marker}"), "scopes": [marker]})
                            .to_string();
                    let url = format!("{base}/v1/users/{user}/credentials/static");
                    match try_send(&client, Method::PUT, &url, &headers, body).await {
                        Ok((200, _)) => {
                            if seq % 2 == 0 {
                                out.fresh_acked.push((user, marker));
                            } else {
                                out.version_acked = version;
                                out.overwrites_acked += 1;
                            }
                        }
                        Ok((st, b)) => {
                            return Err(format!(
                                "write {user} answered {st}: {}",
                                String::from_utf8_lossy(&b)
                            ));
                        }
                        Err(_) => return Ok(out),
                    }
                }
                unreachable!()
            }));
        }

        // ---- crash at a random moment, once every chain has refreshed a few
        // times this round ---------------------------------------------------
        let deadline = Instant::now() + Duration::from_secs(20);
        while ok_calls
            .iter()
            .any(|c| c.load(Ordering::Relaxed) < MIN_CALLS_PER_ROUND)
        {
            assert!(
                Instant::now() < deadline,
                "round {round}: the load never got going"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let ms = rand::random_range(0..400u64);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        sk.kill9();

        for c in callers {
            tokio::time::timeout(Duration::from_secs(30), c)
                .await
                .expect("caller ends after the kill")
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
        for (t, w) in writers.into_iter().enumerate() {
            let out = tokio::time::timeout(Duration::from_secs(30), w)
                .await
                .expect("writer ends after the kill")
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            let log = &mut writer_logs[t];
            if out.version_acked > 0 {
                log.version_acked = out.version_acked;
            }
            log.version_attempted = out.version_attempted;
            log.overwrites_acked += out.overwrites_acked;
            log.fresh_acked.extend(out.fresh_acked);
        }
        live_ok_calls += ok_calls
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum::<usize>();
        quiesce(&fakes, &up).await;

        // ---- restart: the store must open --------------------------------
        sk.restart().await;
        let r = sk.admin(Method::GET, "/readyz", None).await;
        assert_eq!(r.status, 200, "round {round}: not ready after restart");

        // Every acknowledged write of this round is there.
        for log in &mut writer_logs {
            for (user, marker) in log.fresh_acked.drain(..) {
                let r = sk
                    .admin(
                        Method::GET,
                        &format!("/v1/users/{user}/credentials/static"),
                        None,
                    )
                    .await;
                assert_eq!(
                    r.status,
                    200,
                    "round {round}: acknowledged write of {user} lost: {}",
                    r.text()
                );
                assert_eq!(r.json()["scopes"], json!([marker]), "round {round}: {user}");
                all_fresh.push((user, marker));
            }
        }
        // Versioned users: at least the last acknowledged version, at most
        // the last one attempted (an unanswered write may have landed).
        for (t, log) in writer_logs.iter().enumerate() {
            if log.version_attempted == 0 {
                continue;
            }
            let r = sk
                .admin(
                    Method::GET,
                    &format!("/v1/users/v{t}/credentials/static"),
                    None,
                )
                .await;
            if log.version_acked == 0 {
                assert!(
                    r.status == 200 || r.status == 404,
                    "round {round}: v{t}: {}",
                    r.text()
                );
                continue;
            }
            assert_eq!(r.status, 200, "round {round}: v{t} lost: {}", r.text());
            let stored: u64 = r.json()["scopes"][0]
                .as_str()
                .and_then(|s| s.strip_prefix('v'))
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("v{t}: odd scopes {}", r.text()));
            assert!(
                (log.version_acked..=log.version_attempted).contains(&stored),
                "round {round}: v{t} holds version {stored}, acknowledged {} (attempted {})",
                log.version_acked,
                log.version_attempted
            );
        }

        // ---- every chain: newest refresh token, or a counted window ------
        for i in 0..CHAINS {
            let newest = newest_refresh(&fakes[i]);
            let used = newest_access_used(&up, i);
            let calls_before = fakes[i].calls();
            let r = sk
                .proxy(
                    Method::GET,
                    &format!("/v1/proxy/r{i}/c{i}/probe"),
                    &sessions[i],
                    "",
                )
                .await;
            assert_eq!(
                fakes[i].calls(),
                calls_before + 1,
                "round {round} r{i}: the probe must make exactly one refresh call ({} {})",
                r.status,
                r.text()
            );
            let sent = fakes[i]
                .last_form()
                .get("refresh_token")
                .cloned()
                .unwrap_or_default();
            match r.status.as_u16() {
                200 => {
                    assert_eq!(sent, newest, "round {round} r{i}");
                    probes_ok += 1;
                }
                424 => {
                    r.assert_error(424, "reauth_required");
                    let pred = chains[i].predecessor(&newest);
                    assert_eq!(
                        Some(&sent),
                        pred.as_ref(),
                        "round {round} r{i}: refresh token LOST: sidekey held {sent:?}, the provider's newest is {newest:?}; only the one just before it (a crash between the provider's answer and the flush) is excusable"
                    );
                    // Flushed before use: had the upstream already seen the
                    // access token that came with the newest refresh token,
                    // sidekey would have used it before it was durable.
                    let k = rotation_number(&newest);
                    assert!(
                        k.is_none() || used < k,
                        "round {round} r{i}: the upstream got access token #{used:?} but the refresh token #{k:?} issued with it was not durable"
                    );
                    let meta = sk
                        .admin(
                            Method::GET,
                            &format!("/v1/users/rf{i}/credentials/r{i}"),
                            None,
                        )
                        .await;
                    assert_eq!(meta.json()["status"], "reauth_required");
                    windows += 1;
                    window_rounds.push((round, i));
                    // The user reconnects.
                    seed(&sk, &fakes[i], &mut chains, i, &format!("round{round}")).await;
                    let r = sk
                        .proxy(
                            Method::GET,
                            &format!("/v1/proxy/r{i}/c{i}/after-reconnect"),
                            &sessions[i],
                            "",
                        )
                        .await;
                    assert_eq!(r.status, 200, "round {round} r{i}: {}", r.text());
                }
                other => panic!("round {round} r{i}: probe answered {other}: {}", r.text()),
            }
        }
        up.clear();
    }

    // ---- a last look from a fresh start: every acknowledged write --------
    assert_eq!(sk.stop(), Some(0), "graceful stop after the last round");
    sk.restart().await;
    for (user, marker) in &all_fresh {
        let r = sk
            .admin(
                Method::GET,
                &format!("/v1/users/{user}/credentials/static"),
                None,
            )
            .await;
        assert_eq!(
            r.status,
            200,
            "acknowledged write of {user} lost: {}",
            r.text()
        );
        assert_eq!(r.json()["scopes"], json!([marker]), "{user}");
    }
    let by_round: BTreeMap<usize, usize> =
        window_rounds
            .iter()
            .fold(BTreeMap::new(), |mut m, (round, _)| {
                *m.entry(*round).or_default() += 1;
                m
            });

    let refreshes: usize = fakes.iter().map(TokenServer::calls).sum();
    let versioned: usize = writer_logs.iter().map(|l| l.overwrites_acked).sum();
    let writes_acked = all_fresh.len() + versioned;
    println!(
        "crash: {ROUNDS} rounds of kill -9 in {:.1} s; {writes_acked} acknowledged writes ({} new users, {versioned} overwrites) all present; {refreshes} token-endpoint refresh calls ({live_ok_calls} proxied calls answered 200 under load, {probes_ok} post-crash probes found the newest token); {windows} crash windows (provider rotated, sidekey had not flushed) per round: {by_round:?}",
        started.elapsed().as_secs_f64(),
        all_fresh.len()
    );
    assert!(!all_fresh.is_empty(), "no write was acknowledged at all");
    assert!(live_ok_calls >= ROUNDS * CHAINS * MIN_CALLS_PER_ROUND);
    // At most one window per chain per crash is structural (checked above:
    // only ever the predecessor, and never after its access token was
    // used); overall they must stay rare next to the refreshes done.
    assert!(windows <= ROUNDS * CHAINS);
    assert!(
        windows * 5 <= refreshes,
        "{windows} crash windows for {refreshes} refreshes: the flush-before-use window is too wide"
    );
}

#[test]
fn predecessor_follows_the_fake_counter() {
    let c = Chain {
        seed: "seed-0-x".into(),
        base: 4,
    };
    assert_eq!(
        c.predecessor("rt-5-test-client").as_deref(),
        Some("seed-0-x")
    );
    assert_eq!(
        c.predecessor("rt-9-test-client").as_deref(),
        Some("rt-8-test-client")
    );
    assert_eq!(c.predecessor("seed-0-x"), None);
}
