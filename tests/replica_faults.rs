//! Replicas under database faults (CONTRACT section 5): the holder of a
//! refresh claim has its connections cut at every point of a slow token
//! call, and a replica's LISTEN backend is stopped (SIGSTOP) while a
//! session is revoked elsewhere. Real binaries on a throwaway PostgreSQL
//! (tests/support/pg.rs), a fake token endpoint that logs users out when a
//! refresh token is reused (tests/support/token.rs).
use sidekey_testkit as support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use serde_json::json;
use support::cluster::replicas;
use support::token::{Mode, Point, TokenServer, require_valid_token};
use support::upstream::Upstream;
use support::{Options, Sidekey, oauth_provider, provider_toml, unix_now};

/// A superuser connection to the replicas' database: what an operator, a
/// pooler restart or a failover does to sidekey's connections.
async fn superuser(opts: &Options) -> Arc<tokio_postgres::Client> {
    let url = support::pg::cluster().url(opts.pg_db.get().unwrap());
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    Arc::new(client)
}

/// The replica (claim owner) holding the refresh claim `key`, if any.
async fn claim_holder(db: &tokio_postgres::Client, key: &str) -> Option<String> {
    db.query_opt(
        "SELECT owner FROM sidekey_claims WHERE k = $1 AND owner IS NOT NULL",
        &[&key],
    )
    .await
    .unwrap()
    .and_then(|r| r.get(0))
}

/// Terminates every connection of replica `owner`: its LISTEN connection
/// and its pooled ones. Returns how many were cut.
async fn cut_connections(db: &tokio_postgres::Client, owner: &str) -> i64 {
    db.query_one(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name IN ('sidekey listener ' || $1, 'sidekey ' || $1)",
        &[&owner],
    )
    .await
    .unwrap()
    .get(0)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum CutAt {
    /// Once the claim is taken, before the token call is sent.
    Claimed,
    /// While the provider is slow to answer.
    TokenCall,
    /// As the provider's answer leaves (the rotated token is being committed).
    Answer,
}

#[tokio::test]
async fn cut_connections_during_a_slow_refresh_never_send_a_refresh_token_twice() {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    require_valid_token(&up, &tok);
    // A provider that logs the user out when a rotated refresh token is
    // presented again, answering slowly.
    tok.set_theft_detection(true);
    tok.set_mode(Mode::Slow(Duration::from_millis(1500)));
    let mut hooks = tok.hooks();
    // upstream_timeout_secs = 3: the lease is 8 s.
    let rs = replicas(
        3,
        Options::with_providers(&oauth_provider("custom", &up.url, &tok.url, ""))
            .server("upstream_timeout_secs = 3"),
    )
    .await;
    let db = superuser(&rs[0].opts).await;
    let plan = [
        CutAt::Claimed,
        CutAt::TokenCall,
        CutAt::Answer,
        CutAt::Claimed,
        CutAt::TokenCall,
        CutAt::Answer,
    ];
    for (n, at) in plan.into_iter().enumerate() {
        let user = format!("lease{n}");
        let seed = format!("rt-seed-{n}");
        let key = format!("refresh:u/{user}/custom");
        tok.issue_refresh(&seed);
        rs[0]
            .put_credential(
                &user,
                "custom",
                json!({"access_token": "at-stale", "refresh_token": seed, "expires_at": unix_now() - 100}),
            )
            .await;
        let session = rs[1].token(&user, &["custom"]).await;
        // Two calls on each replica need the expired token refreshed.
        let callers: Vec<_> = (0..6)
            .map(|i| {
                let client = rs[i % 3].api.client.clone();
                let url = rs[i % 3].agent_url(&format!("/v1/proxy/custom/{user}/{i}"));
                let session = session.clone();
                tokio::spawn(async move {
                    support::send(
                        &client,
                        Method::GET,
                        &url,
                        &[("x-sidekey-session", &session)],
                        "",
                    )
                    .await
                })
            })
            .collect();
        let mut cut = 0;
        if at == CutAt::Claimed {
            let start = Instant::now();
            let holder = loop {
                if let Some(h) = claim_holder(&db, &key).await {
                    break h;
                }
                assert!(start.elapsed() < Duration::from_secs(10), "nobody claimed");
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            for _ in 0..3 {
                cut += cut_connections(&db, &holder).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let mut done = futures_util::future::join_all(callers);
        let results = loop {
            tokio::select! {
                results = &mut done => break results,
                Some(h) = hooks.recv() => {
                    let holder = claim_holder(&db, &key).await;
                    let point = h.point;
                    let here = matches!(
                        (at, point),
                        (CutAt::TokenCall, Point::Arrived)
                            | (CutAt::Answer, Point::Answering)
                    );
                    if let (true, Some(holder)) = (here, holder) {
                        cut += cut_connections(&db, &holder).await;
                        let _ = h.go.send(());
                        // And again while the call runs, or while its
                        // result is being committed.
                        let pauses: &[u64] = if at == CutAt::TokenCall { &[400, 800, 1200] } else { &[0, 2, 5] };
                        for ms in pauses {
                            tokio::time::sleep(Duration::from_millis(*ms)).await;
                            cut += cut_connections(&db, &holder).await;
                        }
                    } else {
                        let _ = h.go.send(());
                    }
                }
            }
        };
        let statuses: Vec<u16> = results
            .into_iter()
            .map(|r| r.unwrap().status.as_u16())
            .collect();
        println!(
            "cut at {at:?}: {cut} connections terminated; callers answered {statuses:?}; {seed} presented {} time(s)",
            tok.presented(&seed)
        );
        assert!(
            cut > 0,
            "{at:?}: the holder's connections were found and cut"
        );
        assert_eq!(
            tok.presented(&seed),
            1,
            "{at:?}: the refresh token was sent exactly once"
        );
        assert!(tok.reused().is_empty(), "{at:?}: reused {:?}", tok.reused());
        assert_eq!(tok.revoked_chains(), 0, "{at:?}: a user was logged out");
        for s in &statuses {
            // A caller whose own database connection was cut under it may
            // be told to retry; none is told to reconnect its account.
            assert!(
                *s == 200 || *s == 503,
                "{at:?}: a caller got {s} (statuses {statuses:?})"
            );
        }
        // The user is still connected, on every replica.
        let m = rs[2]
            .admin(
                Method::GET,
                &format!("/v1/users/{user}/credentials/custom"),
                None,
            )
            .await;
        assert_eq!(m.json()["status"], "active", "{at:?}: {}", m.text());
        for sk in &rs {
            let start = Instant::now();
            loop {
                let r = sk
                    .proxy(Method::GET, "/v1/proxy/custom/after", &session, "")
                    .await;
                if r.status == 200 {
                    break;
                }
                r.assert_error(503, "store_unavailable");
                assert!(
                    start.elapsed() < Duration::from_secs(2),
                    "{at:?}: {}",
                    r.text()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert_eq!(tok.calls(), plan.len(), "one token call per user, no more");
}

/// SIGCONT on drop, so a failing assertion does not leave a stopped
/// PostgreSQL backend behind.
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Stopped {
        support::signal(pid, "STOP");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        support::signal(self.0, "CONT");
    }
}

async fn listener_up(sk: &Sidekey) -> Option<String> {
    let m = sk.admin(Method::GET, "/metrics", None).await;
    m.text()
        .lines()
        .find_map(|l| l.strip_prefix("sidekey_store_listener_up "))
        .map(str::to_owned)
}

#[tokio::test]
async fn a_hung_listener_still_refuses_a_revoked_session_within_a_second() {
    let up = Upstream::start().await;
    let rs = replicas(
        2,
        Options::with_providers(&provider_toml("custom", &up.url, "inject = \"bearer\"")),
    )
    .await;
    let (a, b) = (&rs[0], &rs[1]);
    a.put_credential("olga", "custom", json!({"access_token": "tok-olga"}))
        .await;
    let v = b.session("olga", &["custom"]).await;
    let (sid, token) = (
        v["session_id"].as_str().unwrap().to_owned(),
        v["token"].as_str().unwrap().to_owned(),
    );
    let other = b.token("olga", &["custom"]).await;
    // A has both sessions (and the credential) cached.
    for t in [&token, &other] {
        let r = a.proxy(Method::GET, "/v1/proxy/custom/x", t, "").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }

    // A's LISTEN backend hangs: its connection stays open, nothing arrives.
    let db = superuser(&a.opts).await;
    let pid: i32 = db
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE $1",
            &[&format!("sidekey listener {}-%", a.pid().unwrap())],
        )
        .await
        .unwrap()
        .get(0);
    let stopped = Stopped::new(pid as u32);
    let stopped_at = Instant::now();
    let r = b
        .admin(Method::DELETE, &format!("/v1/sessions/{sid}"), None)
        .await;
    assert_eq!(r.status, 204);
    let revoked_at = Instant::now();
    loop {
        let r = a.proxy(Method::GET, "/v1/proxy/custom/x", &token, "").await;
        if r.status == 401 {
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "a replica whose listener hangs served a revoked session for a second"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = revoked_at.elapsed();
    // The missing heartbeat shows (the listener is replaced only after 3 s
    // without one).
    let up = listener_up(a).await;
    let looked = stopped_at.elapsed();
    assert_eq!(
        up.as_deref(),
        Some("0"),
        "listener_up {looked:?} after the backend stopped"
    );
    // Meanwhile A reads from the database: a live session still works.
    let r = a.proxy(Method::GET, "/v1/proxy/custom/x", &other, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    println!(
        "listener stopped: revoked session refused after {refused:?} (revoked {:?} after the stop)",
        revoked_at - stopped_at
    );
    drop(stopped);
    // A is back on a working listener (a new connection, or the old one
    // resumed) and says so.
    let start = Instant::now();
    while listener_up(a).await.as_deref() != Some("1") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "listener never back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = a.proxy(Method::GET, "/v1/proxy/custom/x", &other, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = a.proxy(Method::GET, "/v1/proxy/custom/x", &token, "").await;
    assert_eq!(r.status, 401, "{}", r.text());
}
