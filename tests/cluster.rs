//! Several sidekey processes on one PostgreSQL (CONTRACT section 5): real
//! binaries, a real throwaway cluster (tests/support/pg.rs), fake upstream
//! and token endpoint. Each test prints the figures it measured.
use sidekey_testkit as support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::token::require_valid_token;
use support::{oauth_provider, unix_now};

use futures_util::future::join_all;
use http::Method;
use serde_json::{Value, json};
use support::cluster::{replicas, share_secrets};
use support::token::{Mode, TokenServer};
use support::upstream::Upstream;
use support::{Options, Resp, Sidekey, provider_toml, query_param, run_cli};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

// ---------------------------------------------------------------------------

#[tokio::test]
async fn writes_through_one_replica_are_served_by_all() {
    let up = Upstream::start().await;
    let rs = replicas(
        3,
        Options::with_providers(&provider_toml("custom", &up.url, "inject = \"bearer\"")),
    )
    .await;
    let (a, b, c) = (&rs[0], &rs[1], &rs[2]);

    a.put_credential("alice", "custom", json!({"access_token": "tok-alice-1"}))
        .await;
    let m = b
        .admin(Method::GET, "/v1/users/alice/credentials/custom", None)
        .await;
    assert_eq!(m.status, 200, "{}", m.text());
    assert_eq!(m.json()["status"], "active");
    let session = c.token("alice", &["custom"]).await;
    for sk in [a, b, c] {
        let r = sk
            .proxy(Method::GET, "/v1/proxy/custom/me", &session, "")
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(up.last().bearer().as_deref(), Some("tok-alice-1"));
    }

    // A replacement written on B is used by A and C at once (their caches
    // are evicted by B's notification).
    b.put_credential("alice", "custom", json!({"access_token": "tok-alice-2"}))
        .await;
    for sk in [a, c] {
        let start = Instant::now();
        loop {
            let r = sk
                .proxy(Method::GET, "/v1/proxy/custom/me", &session, "")
                .await;
            assert_eq!(r.status, 200);
            if up.last().bearer().as_deref() == Some("tok-alice-2") {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_millis(250),
                "a replica kept serving the replaced credential"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    // Users, phones and tenants too.
    let r = b
        .admin(
            Method::PUT,
            "/v1/users/bob",
            Some(json!({"phone_numbers": ["+15550001111"], "tenant": "acme"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = c
        .admin(
            Method::PUT,
            "/v1/tenants/acme/credentials/custom",
            Some(json!({"access_token": "tok-acme"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = a.admin(Method::GET, "/v1/users/bob", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["tenant"], "acme", "{}", r.text());
    let bob = a.token("bob", &["custom"]).await;
    let r = c.proxy(Method::GET, "/v1/proxy/custom/x", &bob, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().bearer().as_deref(), Some("tok-acme"));

    // A deletion on C is refused everywhere within the propagation bound.
    let r = c
        .admin(Method::DELETE, "/v1/users/alice/credentials/custom", None)
        .await;
    assert_eq!(r.status, 204);
    let deleted_at = Instant::now();
    for sk in [a, b] {
        loop {
            let r = sk
                .proxy(Method::GET, "/v1/proxy/custom/me", &session, "")
                .await;
            if r.status == 424 {
                r.assert_error(424, "credential_missing");
                break;
            }
            assert!(
                deleted_at.elapsed() < Duration::from_millis(250),
                "a deleted credential was still served after 250 ms"
            );
        }
    }
}

#[tokio::test]
async fn a_refresh_storm_over_three_replicas_makes_one_token_call() {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    require_valid_token(&up, &tok);
    tok.issue_refresh("rt-seed");
    let rs = replicas(
        3,
        Options::with_providers(&oauth_provider("custom", &up.url, &tok.url, "")),
    )
    .await;
    rs[0]
        .put_credential(
            "carol",
            "custom",
            json!({"access_token": "at-stale", "refresh_token": "rt-seed", "expires_at": unix_now() - 100}),
        )
        .await;
    let session = rs[1].token("carol", &["custom"]).await;

    let start = Instant::now();
    let results: Vec<Resp> = join_all((0..1000).map(|i| {
        let (sk, session) = (&rs[i % 3], &session);
        async move {
            sk.proxy(
                Method::GET,
                &format!("/v1/proxy/custom/items/{i}"),
                session,
                "",
            )
            .await
        }
    }))
    .await;
    let took = start.elapsed();
    let ok = results.iter().filter(|r| r.status == 200).count();
    for r in &results {
        assert_eq!(r.status, 200, "{}", r.text());
    }
    println!(
        "storm: 1000 calls over 3 replicas, {ok} ok, {} token call(s), {:?}",
        tok.calls(),
        took
    );
    assert_eq!(
        tok.calls(),
        1,
        "1000 calls on 3 replicas must share one token call"
    );
    assert!(
        up.requests()
            .iter()
            .all(|r| r.bearer().as_deref() == Some("at-1-test-client")),
        "every upstream call carries the one new token"
    );
}

#[tokio::test]
async fn a_replica_killed_mid_refresh_is_taken_over_after_its_lease() {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    require_valid_token(&up, &tok);
    tok.issue_refresh("rt-seed");
    // upstream_timeout_secs = 2: a claim's lease is 2 + 5 = 7 s.
    let mut rs = replicas(
        2,
        Options::with_providers(&oauth_provider("custom", &up.url, &tok.url, ""))
            .server("upstream_timeout_secs = 2"),
    )
    .await;
    rs[0]
        .put_credential(
            "dave",
            "custom",
            json!({"access_token": "at-stale", "refresh_token": "rt-seed", "expires_at": unix_now() - 100}),
        )
        .await;
    let session = rs[0].token("dave", &["custom"]).await;

    // A takes the claim and hangs in the token call; then it dies.
    tok.set_mode(Mode::Slow(Duration::from_secs(30)));
    let a_client = rs[0].api.client.clone();
    let a_url = rs[0].agent_url("/v1/proxy/custom/a");
    let s2 = session.clone();
    let hung = tokio::spawn(async move {
        support::send(
            &a_client,
            Method::GET,
            &a_url,
            &[("x-sidekey-session", &s2)],
            "",
        )
        .await
    });
    let wait = Instant::now();
    while tok.calls() == 0 {
        assert!(wait.elapsed() < Duration::from_secs(10), "A never called");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let claimed_at = Instant::now();
    rs[0].kill9();
    hung.abort();
    tok.set_mode(Mode::Ok);

    let r = rs[1]
        .proxy(Method::GET, "/v1/proxy/custom/b", &session, "")
        .await;
    let takeover = claimed_at.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().bearer().as_deref(), Some("at-1-test-client"));
    println!("takeover after kill -9: {takeover:?} (lease 7 s)");
    // A dead holder looks like a live one whose connections were cut: B
    // waits out the lease A confirmed just before its call (7 s), never
    // more than the lease and one poll.
    assert!(
        takeover > Duration::from_secs(6),
        "B took over {takeover:?} after A called: before A's lease lapsed"
    );
    assert!(
        takeover < Duration::from_secs(9),
        "B completed {takeover:?} after A called"
    );
    assert_eq!(tok.calls(), 2, "A's hung call and B's; no third");
}

#[tokio::test]
async fn revocation_on_one_replica_is_refused_by_all_within_250ms() {
    let up = Upstream::start().await;
    let rs = replicas(
        3,
        Options::with_providers(&provider_toml("custom", &up.url, "inject = \"bearer\"")),
    )
    .await;
    rs[0]
        .put_credential("erin", "custom", json!({"access_token": "tok-erin"}))
        .await;
    let mut samples = Vec::new();
    let rounds = 12;
    for round in 0..rounds {
        if round == rounds / 2 {
            // Cut B's LISTEN connection: B must not serve from a cache it
            // can no longer keep true.
            let c = support::pg::cluster();
            let db = rs[1].opts.pg_db.get().unwrap().clone();
            let pid = rs[1].pid().unwrap();
            let killed = c.psql(
                &db,
                &format!(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE application_name LIKE 'sidekey listener {pid}-%'"
                ),
            );
            assert_eq!(killed, "1", "B's listener connection was found and cut");
        }
        let v = rs[0].session("erin", &["custom"]).await;
        let (sid, token) = (
            v["session_id"].as_str().unwrap().to_owned(),
            v["token"].as_str().unwrap().to_owned(),
        );
        // Warm every replica's caches.
        for sk in &rs {
            let r = sk
                .proxy(Method::GET, "/v1/proxy/custom/x", &token, "")
                .await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
        let r = rs[round % 3]
            .admin(Method::DELETE, &format!("/v1/sessions/{sid}"), None)
            .await;
        assert_eq!(r.status, 204);
        let revoked_at = Instant::now();
        for sk in &rs {
            loop {
                let r = sk
                    .proxy(Method::GET, "/v1/proxy/custom/x", &token, "")
                    .await;
                if r.status == 401 {
                    samples.push(revoked_at.elapsed());
                    break;
                }
                assert!(
                    revoked_at.elapsed() < Duration::from_millis(250),
                    "a revoked session still worked after 250 ms (round {round})"
                );
            }
        }
    }
    samples.sort();
    println!(
        "revocation propagation over {} observations: p50 {:?}, p99 {:?}, max {:?}",
        samples.len(),
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples.last().unwrap()
    );
}

#[tokio::test]
async fn conversation_binding_race_across_replicas_has_one_winner() {
    let up = Upstream::start().await;
    let rs = replicas(
        3,
        Options::with_providers(&provider_toml("custom", &up.url, "inject = \"bearer\"")),
    )
    .await;
    rs[0]
        .put_credential("frank", "custom", json!({"access_token": "tok-frank"}))
        .await;
    for round in 0..5 {
        let token = rs[round % 3].token("frank", &["custom"]).await;
        let results = join_all((0..3).map(|i| {
            let (sk, token) = (&rs[i], &token);
            async move {
                let conv = format!("conv-{round}-{i}");
                let r = sk
                    .agent(
                        Method::GET,
                        "/v1/proxy/custom/bind",
                        &[("x-sidekey-session", token), ("x-conversation-id", &conv)],
                        "",
                    )
                    .await;
                (conv, r)
            }
        }))
        .await;
        let winners: Vec<&String> = results
            .iter()
            .filter(|(_, r)| r.status == 200)
            .map(|(c, _)| c)
            .collect();
        assert_eq!(winners.len(), 1, "exactly one conversation binds");
        for (_, r) in results.iter().filter(|(_, r)| r.status != 200) {
            assert_eq!(r.status, 401, "{}", r.text());
        }
    }
}

async fn callback(sk: &Sidekey, code: &str, state: &str) -> Resp {
    let path = format!("/oauth/custom/callback?code={code}&state={state}");
    sk.agent(Method::GET, &path, &[], "").await
}

#[tokio::test]
async fn oauth_started_on_one_replica_completes_on_another_once() {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    require_valid_token(&up, &tok);
    let rs = replicas(
        3,
        Options::with_providers(&format!(
            "{}\n[oauth]\nbind_browser = false\n",
            oauth_provider("custom", &up.url, &tok.url, "")
        )),
    )
    .await;
    let r = rs[0]
        .admin(
            Method::POST,
            "/v1/users/gina/oauth/custom/start",
            Some(json!({"return_to": "https://app.example/settings"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let url = v["authorize_url"].as_str().unwrap();
    let state = v["state"].as_str().unwrap();
    let challenge = query_param(url, "code_challenge").unwrap();
    let redirect = query_param(url, "redirect_uri").unwrap();
    tok.register_code("code-gina", &challenge, &redirect);
    let r = callback(&rs[1], "code-gina", state).await;
    assert_eq!(r.status, 303, "{}", r.text());
    let m = rs[2]
        .admin(Method::GET, "/v1/users/gina/credentials/custom", None)
        .await;
    assert_eq!(m.status, 200, "{}", m.text());
    // A replay on C: the state was consumed cluster-wide.
    tok.register_code("code-gina-2", &challenge, &redirect);
    let r = callback(&rs[2], "code-gina-2", state).await;
    assert!(r.status.is_client_error(), "{} {}", r.status, r.text());
    assert_eq!(tok.calls(), 1, "no exchange on a replayed state");
}

#[tokio::test]
async fn postgres_outage_is_503_then_recovers_without_losing_writes() {
    // Its own cluster: stopping the shared one would fail parallel tests.
    let cluster = support::pg::Cluster::start_new();
    let db = cluster.new_database();
    let url = cluster.url(&db);
    let up = Upstream::start().await;
    let opts = Options::with_providers(&provider_toml("custom", &up.url, "inject = \"bearer\""))
        .server("upstream_timeout_secs = 3")
        .store(&format!("backend = \"postgres\"\npostgres_url = \"{url}\""));
    let rs = replicas(2, opts).await;
    for i in 0..20 {
        rs[i % 2]
            .put_credential(
                &format!("u{i}"),
                "custom",
                json!({"access_token": format!("tok-{i}")}),
            )
            .await;
    }
    let session = rs[0].token("u1", &["custom"]).await;
    let r = rs[1]
        .proxy(Method::GET, "/v1/proxy/custom/x", &session, "")
        .await;
    assert_eq!(r.status, 200);

    cluster.ctl("stop");
    for sk in &rs {
        let start = Instant::now();
        let r = sk
            .proxy(Method::GET, "/v1/proxy/custom/x", &session, "")
            .await;
        let took = start.elapsed();
        r.assert_error(503, "store_unavailable");
        assert!(took < Duration::from_secs(3), "answered in {took:?}");
        let ready = support::send(
            &sk.admin_client,
            Method::GET,
            &sk.admin_url("/readyz"),
            &[],
            "",
        )
        .await;
        assert_eq!(ready.status, 503);
        let w = sk
            .admin(
                Method::PUT,
                "/v1/users/zed/credentials/custom",
                Some(json!({"access_token": "tok-zed"})),
            )
            .await;
        w.assert_error(503, "store_unavailable");
    }

    cluster.ctl("start");
    for sk in &rs {
        let start = Instant::now();
        loop {
            let r = sk
                .proxy(Method::GET, "/v1/proxy/custom/x", &session, "")
                .await;
            if r.status == 200 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "no recovery: {}",
                r.text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!("recovered after restart in {:?}", start.elapsed());
    }
    // Every write acknowledged before the outage is there.
    for i in 0..20 {
        let m = rs[(i + 1) % 2]
            .admin(
                Method::GET,
                &format!("/v1/users/u{i}/credentials/custom"),
                None,
            )
            .await;
        assert_eq!(m.status, 200, "u{i}: {}", m.text());
    }
    // Ready again once the change listener is back (it retries every
    // second at most).
    let start = Instant::now();
    loop {
        let ready = support::send(
            &rs[0].admin_client,
            Method::GET,
            &rs[0].admin_url("/readyz"),
            &[],
            "",
        )
        .await;
        if ready.status == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "never ready again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn migrate_store_copies_a_sled_store_and_can_run_again() {
    let up = Upstream::start().await;
    let providers = provider_toml("custom", &up.url, "inject = \"bearer\"");
    let sled_opts = Options::with_providers(&providers)
        .store("backend = \"sled\"")
        .elevenlabs("init_providers = [\"custom\"]");
    let mut sk = Sidekey::start(sled_opts).await;
    sk.put_credential("hana", "custom", json!({"access_token": "tok-hana"}))
        .await;
    let r = sk
        .admin(
            Method::PUT,
            "/v1/users/hana",
            Some(json!({"phone_numbers": ["+15557654321"], "tenant": "acme"})),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = sk
        .admin(
            Method::PUT,
            "/v1/tenants/acme/credentials/custom",
            Some(json!({"access_token": "tok-acme"})),
        )
        .await;
    assert_eq!(r.status, 200);
    let live = sk.token("hana", &["custom"]).await;
    assert_eq!(sk.stop(), Some(0));

    let pg_opts = Options::with_providers(&providers)
        .elevenlabs("init_providers = [\"custom\"]")
        .postgres();
    std::fs::write(sk.path().join("pg.toml"), pg_opts.config_text()).unwrap();
    for run in 0..2 {
        let (code, out, err) = run_cli(
            sk.path(),
            &[
                "migrate-store",
                "--from",
                "data/sidekey.db",
                "--config",
                "pg.toml",
            ],
            &[],
            None,
        );
        assert_eq!(code, 0, "run {run}: {out}{err}");
        assert!(out.contains("copied"), "{out}");
    }
    let dir = sk.dir.clone();
    drop(sk);
    let pg = Sidekey::start_in(dir, pg_opts).await;
    // The session minted on sled works on PostgreSQL.
    let r = pg
        .proxy(Method::GET, "/v1/proxy/custom/me", &live, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().bearer().as_deref(), Some("tok-hana"));
    let r = pg.admin(Method::GET, "/v1/users/hana", None).await;
    assert_eq!(r.json()["tenant"], "acme");
    let r = pg
        .admin(Method::GET, "/v1/tenants/acme/credentials/custom", None)
        .await;
    assert_eq!(r.status, 200);
    // The phone index works (conversation-init finds the user).
    let r = pg
        .agent(
            Method::POST,
            "/v1/elevenlabs/conversation-init",
            &[
                ("x-sidekey-init-secret", support::INIT_SECRET),
                ("content-type", "application/json"),
            ],
            json!({"caller_id": "+15557654321", "agent_id": "a", "called_number": "+1", "call_sid": "c"})
                .to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["dynamic_variables"]["user_id"], "hana");
}

#[tokio::test]
async fn a_pg_dump_holds_no_plaintext_secret() {
    let up = Upstream::start().await;
    let tok = TokenServer::start().await;
    let rs = replicas(
        1,
        Options::with_providers(&oauth_provider("custom", &up.url, &tok.url, "")),
    )
    .await;
    let sk = &rs[0];
    let secrets = [
        "at-plaintext-canary-0001",
        "rt-plaintext-canary-0002",
        "+15559876543",
    ];
    sk.put_credential(
        "ivy",
        "custom",
        json!({"access_token": secrets[0], "refresh_token": secrets[1], "expires_in": 3600}),
    )
    .await;
    let r = sk
        .admin(
            Method::PUT,
            "/v1/users/ivy",
            Some(json!({"phone_numbers": [secrets[2]]})),
        )
        .await;
    assert_eq!(r.status, 200);
    let session = sk.token("ivy", &["custom"]).await;
    let r = sk
        .admin(
            Method::POST,
            "/v1/users/ivy/oauth/custom/start",
            Some(json!({})),
        )
        .await;
    let state: Value = r.json();
    let state = state["state"].as_str().unwrap_or_default().to_owned();
    let dump = support::pg::cluster().dump(sk.opts.pg_db.get().unwrap());
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    let text = String::from_utf8_lossy(&dump);
    assert!(text.contains("sidekey_kv"), "the dump has the store table");
    for s in secrets
        .iter()
        .copied()
        .chain([session.as_str(), state.as_str()])
    {
        if s.is_empty() {
            continue;
        }
        assert!(!text.contains(s), "plaintext {s:.12}… in pg_dump");
        assert!(!text.contains(&hex(s)), "hex of {s:.12}… in pg_dump");
    }
}

#[tokio::test]
async fn rotate_key_on_postgres_refuses_while_replicas_serve_then_reseals() {
    let up = Upstream::start().await;
    let mut rs = replicas(
        2,
        Options::with_providers(&provider_toml("custom", &up.url, "inject = \"bearer\"")),
    )
    .await;
    rs[0]
        .put_credential("kim", "custom", json!({"access_token": "tok-kim-rotate"}))
        .await;
    let session = rs[1].token("kim", &["custom"]).await;
    let dir = rs[0].path().to_path_buf();
    use base64::Engine;
    let mut key = [0u8; 32];
    key.iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i as u8).wrapping_mul(37).wrapping_add(11));
    std::fs::write(
        dir.join("new.key"),
        base64::engine::general_purpose::STANDARD.encode(key),
    )
    .unwrap();
    let rotate = |dir: &Path| {
        run_cli(
            dir,
            &[
                "rotate-key",
                "--config",
                "config.toml",
                "--new-key-file",
                "new.key",
            ],
            &[],
            None,
        )
    };

    // backup is sled's: on PostgreSQL it points at pg_dump.
    let (code, _, err) = run_cli(
        &dir,
        &["backup", "--config", "config.toml", "--out", "b"],
        &[],
        None,
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("pg_dump"), "{err}");

    // Replicas serving: refused, nothing changed.
    let (code, out, err) = rotate(&dir);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("still serving"), "{err}");

    for sk in &mut rs {
        assert_eq!(sk.stop(), Some(0));
    }
    let (code, out, err) = rotate(&dir);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("re-encrypted"), "{out}");
    // Run again: the rotation is already done.
    let (code, out, err) = rotate(&dir);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("already done"), "{out}");

    // The old key no longer opens the database: exit 2 naming the key.
    let (code, _, err) = run_cli(&dir, &["serve", "--config", "config.toml"], &[], None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("master key"), "{err}");

    // With the new key every record is there, sessions included.
    for sk in &rs {
        std::fs::copy(dir.join("new.key"), sk.path().join("data/master.key")).unwrap();
    }
    let mut rs = rs;
    rs[1].restart().await;
    let r = rs[1]
        .proxy(Method::GET, "/v1/proxy/custom/me", &session, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().bearer().as_deref(), Some("tok-kim-rotate"));
}

#[tokio::test]
async fn three_replicas_starting_together_on_an_empty_database_agree() {
    let up = Upstream::start().await;
    let providers = provider_toml("custom", &up.url, "inject = \"bearer\"");
    // Secrets from a first instance (on a database of its own).
    let seed = Sidekey::start(Options::with_providers(&providers).postgres()).await;
    let empty = Options::with_providers(&providers).postgres();
    let dirs: Vec<_> = (0..3)
        .map(|_| {
            let d = tempfile::tempdir().unwrap();
            share_secrets(seed.path(), d.path());
            Arc::new(d)
        })
        .collect();
    let rs: Vec<Sidekey> = join_all(
        dirs.iter()
            .map(|d| Sidekey::start_in(d.clone(), empty.clone())),
    )
    .await;
    // One schema, one key check, one index key: a phone registered on one
    // replica is found by the others' conversation-init.
    let r = rs[0]
        .admin(
            Method::PUT,
            "/v1/users/lee",
            Some(json!({"phone_numbers": ["+15550003333"]})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    for sk in &rs[1..] {
        let r = sk
            .agent(
                Method::POST,
                "/v1/elevenlabs/conversation-init",
                &[
                    ("x-sidekey-init-secret", support::INIT_SECRET),
                    ("content-type", "application/json"),
                ],
                json!({"caller_id": "+15550003333", "agent_id": "a", "called_number": "+1", "call_sid": "c"})
                    .to_string(),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["dynamic_variables"]["user_id"], "lee");
    }
    let c = support::pg::cluster();
    let db = empty.pg_db.get().unwrap();
    assert_eq!(c.psql(db, "SELECT count(*) FROM sidekey_schema"), "1");
    assert_eq!(c.psql(db, "SELECT version FROM sidekey_schema"), "1");
}

/// `check-config` on PostgreSQL reaches the database as `serve` would and
/// checks the master key against the store's key check, writing nothing:
/// a fresh database is said to be fresh (and stays empty), the key the
/// store was made with passes, another key and an unreachable server fail.
#[tokio::test]
async fn check_config_on_postgres_connects_and_checks_the_key_without_writing() {
    let opts =
        Options::with_providers(&provider_toml("custom", "http://127.0.0.1:9", "")).postgres();
    let db_url = opts.pg_url();
    let db = db_url
        .split("@/")
        .nth(1)
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("config.toml"), opts.config_text()).unwrap();
    let check = |dir: &Path| run_cli(dir, &["check-config", "--config", "config.toml"], &[], None);

    // Fresh: reached, nothing there yet, nothing created.
    let (code, out, err) = check(dir.path());
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("reached; it holds no sidekey store yet"),
        "{err}"
    );
    let tables = support::pg::cluster().psql(
        &db,
        "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'sidekey%'",
    );
    assert_eq!(tables.trim(), "0", "check-config created tables");
    assert!(
        !dir.path().join("data/master.key").exists(),
        "check-config wrote a key"
    );

    // A server makes the store under its key; that key passes.
    let sk = Sidekey::start(opts.clone()).await;
    let key = std::fs::read(sk.dir.path().join("data/master.key")).unwrap();
    std::fs::write(dir.path().join("data/master.key"), &key).unwrap();
    let (code, out, err) = check(dir.path());
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("opens with the configured master key"),
        "{err}"
    );

    // Another key: refused, named as the key's fault.
    let other = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(other.path().join("data")).unwrap();
    std::fs::write(other.path().join("config.toml"), opts.config_text()).unwrap();
    std::fs::write(
        other.path().join("data/master.key"),
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
    )
    .unwrap();
    let (code, out, err) = check(other.path());
    assert_ne!(code, 0, "{out}\n{err}");
    assert!(err.contains("does not match the PostgreSQL store"), "{err}");

    // A second replica given no key (generate_missing on) must not make
    // one: the database was made under another key, so it refuses with
    // the fix and leaves no key file behind.
    let naive = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(naive.path().join("data")).unwrap();
    std::fs::write(naive.path().join("config.toml"), opts.config_text()).unwrap();
    let out = std::process::Command::new("timeout")
        .arg("60")
        .arg(support::bin())
        .args(["serve", "--config", "config.toml"])
        .current_dir(naive.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("already exists (made by another replica)"),
        "{err}"
    );
    assert!(
        !naive.path().join("data/master.key").exists(),
        "a refused replica wrote a key file"
    );
    drop(sk);

    // Nobody listening: said plainly, no panic.
    let gone = opts
        .config_text()
        .replace(&db_url, "postgresql://sidekey@127.0.0.1:9/none");
    std::fs::write(other.path().join("config.toml"), gone).unwrap();
    let (code, out, err) = check(other.path());
    assert_ne!(code, 0, "{out}\n{err}");
    assert!(err.contains("cannot use the PostgreSQL database"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
