//! Operations: master-key rotation (offline and lazy), session signing key
//! rotation, backups, rate limits, metrics, the audit log and log formats,
//! all against the real binary.
use sidekey_testkit as support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use http::Method;
use serde_json::{Value, json};
use support::upstream::Upstream;
use support::{Options, Sidekey, bin, contains, provider_toml, read_tree, run_cli, snapshot};

// ---------------------------------------------------------------------------
// Helpers

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Writes a fresh random 32-byte key (base64) to `path`.
fn write_key(path: &Path) {
    let mut k = [0u8; 32];
    rand::fill(&mut k[..]);
    std::fs::write(path, format!("{}\n", b64(&k))).unwrap();
}

fn cfg(sk: &Sidekey) -> String {
    sk.config_path().to_string_lossy().into_owned()
}

/// `sidekey <args>` in the test dir, expecting success.
fn cli_ok(dir: &Path, args: &[&str]) -> String {
    let (code, out, err) = run_cli(dir, args, &[], None);
    assert_eq!(code, 0, "sidekey {args:?} failed:\n{out}\n{err}");
    out
}

/// `sidekey <args>` in the test dir, expecting exit 2 with one clear line
/// (`error: ...`) that mentions every word of `mentions`; returns that line.
fn cli_fails(dir: &Path, args: &[&str], mentions: &[&str]) -> String {
    let (code, out, err) = run_cli(dir, args, &[], None);
    assert_eq!(code, 2, "sidekey {args:?} should exit 2:\n{out}\n{err}");
    one_clear_line(&err, mentions)
}

fn one_clear_line(stderr: &str, mentions: &[&str]) -> String {
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "a panic instead of a clear line:\n{stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "exactly one error line expected:\n{stderr}");
    for m in mentions {
        assert!(
            lines[0].contains(m),
            "the error line should mention {m:?}: {}",
            lines[0]
        );
    }
    lines[0].to_owned()
}

/// Runs `sidekey serve` expecting it to refuse to start: exit code and
/// stderr. Fails the test (and kills it) if it is still running after 30 s.
fn serve_refused(dir: &Path, config: &str) -> (i32, String) {
    let mut child = Command::new(bin())
        .args(["serve", "--config", config])
        .current_dir(dir)
        .env_remove("SIDEKEY_CONFIG")
        .env_remove("RUST_LOG")
        .env("SIDEKEY_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("sidekey serve was expected to refuse to start but kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code().unwrap_or(-1), err)
}

fn assert_untouched(before: &BTreeMap<PathBuf, Vec<u8>>, dir: &Path, what: &str) {
    let after = snapshot(dir);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "{what}: store files changed"
    );
    for (k, v) in before {
        assert!(after[k] == *v, "{what}: {} changed", k.display());
    }
}

fn jwt_header(token: &str) -> Value {
    let h = token.split('.').next().unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(h)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// Every credential's metadata for these users, by user.
async fn all_metadata(sk: &Sidekey, users: &[&str]) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for u in users {
        let r = sk
            .admin(Method::GET, &format!("/v1/users/{u}/credentials"), None)
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        out.insert((*u).to_owned(), r.json());
    }
    out
}

/// A proxied call that must succeed with `expected` injected as the bearer.
async fn proxy_ok(sk: &Sidekey, up: &Upstream, token: &str, expected: &str) {
    let r = sk
        .proxy(Method::GET, "/v1/proxy/custom/check", token, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().bearer().as_deref(), Some(expected));
}

fn store_dir(sk: &Sidekey) -> PathBuf {
    sk.path().join("data/sidekey.db")
}

// ---------------------------------------------------------------------------
// (1) rotate-key

#[tokio::test]
async fn rotate_key_reencrypts_and_the_old_key_no_longer_opens_the_store() {
    let up = Upstream::start().await;
    let mut sk = Sidekey::start(
        // sled files are compared and copied byte for byte (the PostgreSQL
        // side of these commands is in tests/cluster.rs).
        Options::with_providers(&provider_toml("custom", &up.url, "")).store("backend = \"sled\""),
    )
    .await;
    let users = ["alice", "bob", "carol"];
    for u in users {
        sk.put_credential(
            u,
            "custom",
            json!({"access_token": format!("tok-{u}-rotate"), "refresh_token": format!("rt-{u}-rotate"),
                   "expires_in": 7200, "scopes": ["read"]}),
        )
        .await;
    }
    let before = all_metadata(&sk, &users).await;
    let alice_session = sk.token("alice", &["custom"]).await;
    proxy_ok(&sk, &up, &alice_session, "tok-alice-rotate").await;
    let dir = sk.path().to_path_buf();
    let config = cfg(&sk);

    // While serving: refused, and the running server is unaffected.
    write_key(&dir.join("new.key"));
    cli_fails(
        &dir,
        &[
            "rotate-key",
            "--config",
            &config,
            "--new-key-file",
            "new.key",
        ],
        &["stop sidekey"],
    );
    proxy_ok(&sk, &up, &alice_session, "tok-alice-rotate").await;

    assert_eq!(sk.stop(), Some(0));
    let store = store_dir(&sk);
    let stopped = snapshot(&store);

    // Bad new keys: exit 2 naming the flag, store untouched.
    cli_fails(
        &dir,
        &[
            "rotate-key",
            "--config",
            &config,
            "--new-key-file",
            "missing.key",
        ],
        &["--new-key-file", "missing.key"],
    );
    std::fs::write(dir.join("bad.key"), "this is not a key\n").unwrap();
    cli_fails(
        &dir,
        &[
            "rotate-key",
            "--config",
            &config,
            "--new-key-file",
            "bad.key",
        ],
        &["--new-key-file"],
    );
    std::fs::write(dir.join("short.key"), b64(&[7u8; 16])).unwrap();
    cli_fails(
        &dir,
        &[
            "rotate-key",
            "--config",
            &config,
            "--new-key-file",
            "short.key",
        ],
        &["--new-key-file", "32 bytes"],
    );
    std::fs::copy(dir.join("data/master.key"), dir.join("same.key")).unwrap();
    cli_fails(
        &dir,
        &[
            "rotate-key",
            "--config",
            &config,
            "--new-key-file",
            "same.key",
        ],
        &["already uses"],
    );
    assert_untouched(&stopped, &store, "failed rotate-key");

    // The rotation itself.
    let out = cli_ok(
        &dir,
        &[
            "rotate-key",
            "--config",
            &config,
            "--new-key-file",
            "new.key",
        ],
    );
    assert!(out.contains("re-encrypted"), "{out}");
    assert!(out.contains("master_key_file"), "{out}");
    let rotated = snapshot(&store);
    let raw = read_tree(&store);
    for u in users {
        assert!(!contains(&raw, &format!("tok-{u}-rotate")));
        assert!(!contains(&raw, &format!("rt-{u}-rotate")));
    }

    // The old key alone no longer opens the store: exit 2, one clear line
    // naming the setting, nothing written.
    let (code, err) = serve_refused(&dir, &config);
    assert_eq!(code, 2, "{err}");
    one_clear_line(&err, &["master_key", "does not match"]);
    assert_untouched(&rotated, &store, "serve with the old key");
    cli_fails(
        &dir,
        &["check-config", "--config", &config],
        &["master_key"],
    );
    assert_untouched(&rotated, &store, "check-config with the old key");

    // Pointed at the new key: everything is there and works.
    sk.opts = sk.opts.clone().store("master_key_file = \"new.key\"");
    sk.restart().await;
    assert_eq!(all_metadata(&sk, &users).await, before);
    proxy_ok(&sk, &up, &alice_session, "tok-alice-rotate").await;
    let bob = sk.token("bob", &["custom"]).await;
    proxy_ok(&sk, &up, &bob, "tok-bob-rotate").await;
    cli_ok(&dir, &["check-config", "--config", &config]);
}

// ---------------------------------------------------------------------------
// (2) lazy rotation with previous_master_key_files

/// The key id each credential record is sealed under, read straight from
/// the stopped store's sled files. No background flusher: the file lock is
/// released as soon as this returns.
fn credential_key_ids(store: &Path, keys: &[&str]) -> Vec<String> {
    let db = sled::Config::new()
        .path(store)
        .flush_every_ms(None)
        .open()
        .unwrap();
    let tree = db.open_tree("credentials").unwrap();
    keys.iter()
        .map(|k| {
            let raw = tree.get(k).unwrap().unwrap();
            sidekey::store::KeyRing::record_key_id(&raw).unwrap().hex()
        })
        .collect()
}

fn key_id(file: &Path) -> String {
    let text = std::fs::read_to_string(file).unwrap();
    sidekey::store::MasterKey::parse(&sidekey::secret::Secret::new(text))
        .unwrap()
        .id()
        .hex()
}

#[tokio::test]
async fn previous_master_keys_open_old_records_and_reseal_them() {
    let up = Upstream::start().await;
    let mut sk = Sidekey::start(
        // sled files are compared and copied byte for byte (the PostgreSQL
        // side of these commands is in tests/cluster.rs).
        Options::with_providers(&provider_toml("custom", &up.url, "")).store("backend = \"sled\""),
    )
    .await;
    for u in ["alice", "bob"] {
        sk.put_credential(
            u,
            "custom",
            json!({"access_token": format!("tok-{u}-lazy")}),
        )
        .await;
    }
    let alice_session = sk.token("alice", &["custom"]).await;
    assert_eq!(sk.stop(), Some(0));
    let dir = sk.path().to_path_buf();
    let config = cfg(&sk);
    let store = store_dir(&sk);
    std::fs::copy(dir.join("data/master.key"), dir.join("old.key")).unwrap();
    write_key(&dir.join("new.key"));
    let (old_id, new_id) = (key_id(&dir.join("old.key")), key_id(&dir.join("new.key")));
    assert_eq!(
        credential_key_ids(&store, &["u/alice/custom", "u/bob/custom"]),
        [old_id.clone(), old_id.clone()]
    );
    let base = sk.opts.clone();

    // New key alone: check-config says the store is sealed under another
    // key and points at previous_master_key_files.
    sk.opts = base.clone().store("master_key_file = \"new.key\"");
    std::fs::write(sk.config_path(), sk.opts.config_text()).unwrap();
    let before = snapshot(&store);
    cli_fails(
        &dir,
        &["check-config", "--config", &config],
        &["master_key", "previous_master_key_files"],
    );
    // A previous key file that does not exist is named.
    sk.opts = base
        .clone()
        .store("master_key_file = \"new.key\"")
        .store("previous_master_key_files = [\"nope.key\"]");
    std::fs::write(sk.config_path(), sk.opts.config_text()).unwrap();
    cli_fails(
        &dir,
        &["check-config", "--config", &config],
        &["store.previous_master_key_files", "nope.key"],
    );
    assert_untouched(&before, &store, "check-config");

    // New key current, old key previous: valid, and everything opens.
    sk.opts = base
        .clone()
        .store("master_key_file = \"new.key\"")
        .store("previous_master_key_files = [\"old.key\"]");
    std::fs::write(sk.config_path(), sk.opts.config_text()).unwrap();
    let out = cli_ok(&dir, &["check-config", "--config", &config]);
    assert!(out.contains("OK"), "{out}");
    sk.restart().await;
    proxy_ok(&sk, &up, &alice_session, "tok-alice-lazy").await;
    let bob = sk.token("bob", &["custom"]).await;
    proxy_ok(&sk, &up, &bob, "tok-bob-lazy").await;
    sk.put_credential("carol", "custom", json!({"access_token": "tok-carol-lazy"}))
        .await;
    assert_eq!(sk.stop(), Some(0));
    // What was read is re-sealed under the new key; new writes use it.
    assert_eq!(
        credential_key_ids(
            &store,
            &["u/alice/custom", "u/bob/custom", "u/carol/custom"]
        ),
        [new_id.clone(), new_id.clone(), new_id.clone()]
    );

    // Finishing the rotation: rotate-key to the (already current) new key
    // re-seals whatever was not read yet and the key check, after which the
    // old key can be dropped from the config.
    let out = cli_ok(
        &dir,
        &[
            "rotate-key",
            "--config",
            &config,
            "--new-key-file",
            "new.key",
        ],
    );
    assert!(out.contains("previous_master_key_files"), "{out}");
    sk.opts = base.clone().store("master_key_file = \"new.key\"");
    std::fs::write(sk.config_path(), sk.opts.config_text()).unwrap();
    cli_ok(&dir, &["check-config", "--config", &config]);
    // Now the old key alone is refused like any wrong key.
    let finished = snapshot(&store);
    std::fs::write(
        sk.config_path(),
        base.clone()
            .store("master_key_file = \"old.key\"")
            .config_text(),
    )
    .unwrap();
    let (code, err) = serve_refused(&dir, &config);
    assert_eq!(code, 2, "{err}");
    one_clear_line(&err, &["master_key"]);
    assert_untouched(&finished, &store, "serve with the old key");
    sk.restart().await;
    proxy_ok(&sk, &up, &alice_session, "tok-alice-lazy").await;
    let carol = sk.token("carol", &["custom"]).await;
    proxy_ok(&sk, &up, &carol, "tok-carol-lazy").await;
}

// ---------------------------------------------------------------------------
// (3) session signing key rotation

#[tokio::test]
async fn signing_key_rotation_keeps_old_tokens_until_the_old_key_is_removed() {
    let up = Upstream::start().await;
    let mut sk = Sidekey::start(Options::with_providers(&provider_toml(
        "custom", &up.url, "",
    )))
    .await;
    sk.put_credential("alice", "custom", json!({"access_token": "tok-alice-jwt"}))
        .await;
    let old_token = sk.token("alice", &["custom"]).await;
    let old_kid = jwt_header(&old_token)["kid"].as_str().unwrap().to_owned();
    proxy_ok(&sk, &up, &old_token, "tok-alice-jwt").await;
    assert_eq!(sk.stop(), Some(0));

    let dir = sk.path().to_path_buf();
    std::fs::rename(dir.join("data/session.key"), dir.join("old-session.key")).unwrap();
    write_key(&dir.join("data/session.key"));
    let base = sk.opts.clone();
    sk.opts = base
        .clone()
        .sessions("previous_signing_key_files = [\"old-session.key\"]");
    sk.restart().await;

    proxy_ok(&sk, &up, &old_token, "tok-alice-jwt").await;
    let new_token = sk.token("alice", &["custom"]).await;
    let h = jwt_header(&new_token);
    let new_kid = h["kid"].as_str().unwrap().to_owned();
    assert_ne!(new_kid, old_kid, "new tokens carry the new key's kid");
    assert_eq!(h["alg"], "HS256");
    proxy_ok(&sk, &up, &new_token, "tok-alice-jwt").await;

    // The old key removed: its tokens stop working, new ones keep working.
    sk.opts = base;
    sk.restart().await;
    let r = sk
        .proxy(Method::GET, "/v1/proxy/custom/check", &old_token, "")
        .await;
    r.assert_error(401, "invalid_session");
    proxy_ok(&sk, &up, &new_token, "tok-alice-jwt").await;
}

// ---------------------------------------------------------------------------
// (4) backup

/// The test config with the admin listener on the address the running
/// instance actually bound (the harness config asks for port 0), as an
/// operator's config would name it.
fn config_naming_admin(sk: &Sidekey) -> String {
    let text = sk.opts.config_text().replacen(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        &format!("[admin]\nlisten = \"{}\"", sk.admin_addr),
        1,
    );
    assert!(text.contains(&sk.admin_addr.to_string()));
    let p = sk.path().join("ops.toml");
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

#[tokio::test]
async fn backups_online_and_offline_are_encrypted_and_serve_the_same_credentials() {
    let up = Upstream::start().await;
    let mut sk = Sidekey::start(
        // sled files are compared and copied byte for byte (the PostgreSQL
        // side of these commands is in tests/cluster.rs).
        Options::with_providers(&provider_toml("custom", &up.url, "")).store("backend = \"sled\""),
    )
    .await;
    let users = ["alice", "bob", "carol", "dave"];
    let mut secrets = Vec::new();
    for u in users {
        let (at, rt) = (
            format!("tok-{u}-backup-a1b2"),
            format!("rt-{u}-backup-c3d4"),
        );
        sk.put_credential(
            u,
            "custom",
            json!({"access_token": at, "refresh_token": rt, "expires_in": 7200, "scopes": ["s1"]}),
        )
        .await;
        secrets.push(at);
        secrets.push(rt);
    }
    let alice_session = sk.token("alice", &["custom"]).await;
    let before = all_metadata(&sk, &users).await;
    let dir = sk.path().to_path_buf();
    let master_key = std::fs::read_to_string(dir.join("data/master.key")).unwrap();

    // Online, with writes still arriving: goes through the admin API.
    let ops = config_naming_admin(&sk);
    let online = dir.join("online-copy");
    let online_s = online.to_string_lossy().into_owned();
    let writer = {
        let (client, url, auth) = (
            sk.admin_client.clone(),
            sk.admin_url("/v1/users/eve/credentials/custom"),
            format!("Bearer {}", sk.admin_token),
        );
        tokio::spawn(async move {
            for i in 0..20 {
                let r = support::send(
                    &client,
                    Method::PUT,
                    &url,
                    &[
                        ("authorization", &auth),
                        ("content-type", "application/json"),
                    ],
                    json!({"access_token": format!("tok-eve-{i}")}).to_string(),
                )
                .await;
                assert_eq!(r.status, 200);
            }
        })
    };
    let (dir2, ops2, online2) = (dir.clone(), ops.clone(), online_s.clone());
    let out = tokio::task::spawn_blocking(move || {
        cli_ok(
            &dir2,
            &["backup", "--config", &ops2, "--out", online2.as_str()],
        )
    })
    .await
    .unwrap();
    assert!(out.contains("running sidekey"), "{out}");
    writer.await.unwrap();
    // Into a non-empty directory: refused (by the server, reported as 2).
    let (dir2, ops2, online2) = (dir.clone(), ops.clone(), online_s.clone());
    tokio::task::spawn_blocking(move || {
        cli_fails(
            &dir2,
            &["backup", "--config", &ops2, "--out", online2.as_str()],
            &["not empty"],
        )
    })
    .await
    .unwrap();

    // Offline, from the stopped store.
    assert_eq!(sk.stop(), Some(0));
    let offline = dir.join("offline-copy");
    let config = cfg(&sk);
    let out = cli_ok(
        &dir,
        &[
            "backup",
            "--config",
            &config,
            "--out",
            offline.to_str().unwrap(),
        ],
    );
    assert!(out.contains("backup written"), "{out}");
    cli_fails(
        &dir,
        &[
            "backup",
            "--config",
            &config,
            "--out",
            offline.to_str().unwrap(),
        ],
        &["not empty"],
    );

    // Neither copy holds a plaintext token or the key.
    for copy in [&online, &offline] {
        let raw = read_tree(copy);
        assert!(!raw.is_empty(), "{} is empty", copy.display());
        for s in &secrets {
            assert!(!contains(&raw, s), "{s} in plaintext in {}", copy.display());
        }
        assert!(!contains(&raw, master_key.trim()));
    }

    // Serving from each copy with the same key: the same credentials, the
    // same decrypted tokens, and the same sessions.
    let base = sk.opts.clone();
    for copy in ["online-copy", "offline-copy"] {
        sk.opts = base.clone().store(&format!("path = \"{copy}\""));
        sk.restart().await;
        assert_eq!(all_metadata(&sk, &users).await, before, "{copy}");
        proxy_ok(&sk, &up, &alice_session, "tok-alice-backup-a1b2").await;
        let dave = sk.token("dave", &["custom"]).await;
        proxy_ok(&sk, &up, &dave, "tok-dave-backup-a1b2").await;
        // The write racing the online backup is there whole or not at all.
        let r = sk
            .admin(Method::GET, "/v1/users/eve/credentials/custom", None)
            .await;
        assert!(r.status == 200 || r.status == 404, "{copy}: {}", r.text());
        assert_eq!(sk.stop(), Some(0));
    }
}

// ---------------------------------------------------------------------------
// (5) rate limits

#[tokio::test]
async fn rate_limits_per_session_and_per_user() {
    let up = Upstream::start().await;
    let mut toml = provider_toml("custom", &up.url, "");
    toml.push_str(
        "[limits]\nper_session_rps = 2\nper_session_burst = 2\nper_user_rps = 1\nper_user_burst = 3\n",
    );
    let sk = Sidekey::start(Options::with_providers(&toml)).await;

    // Buckets refill in real time (2/s per session, 1/s per user): an
    // attempt only counts when it ran faster than a refill. A fresh user
    // gives fresh buckets for the next attempt.
    let mut judged = 0;
    for attempt in 0..5 {
        let user = format!("rl{attempt}");
        sk.put_credential(
            &user,
            "custom",
            json!({"access_token": format!("tok-{user}")}),
        )
        .await;
        let a = sk.token(&user, &["custom"]).await;
        let b = sk.token(&user, &["custom"]).await;
        // Warm the connection so the timed part is only the calls.
        let _ = sk.agent(Method::GET, "/healthz", &[], "").await;
        let t0 = Instant::now();
        let a1 = sk.proxy(Method::GET, "/v1/proxy/custom/x", &a, "").await;
        let a2 = sk.proxy(Method::GET, "/v1/proxy/custom/x", &a, "").await;
        let a3 = sk.proxy(Method::GET, "/v1/proxy/custom/x", &a, "").await;
        let fast_session = t0.elapsed() < Duration::from_millis(450);
        let b1 = sk.proxy(Method::GET, "/v1/proxy/custom/x", &b, "").await;
        let b2 = sk.proxy(Method::GET, "/v1/proxy/custom/x", &b, "").await;
        let fast_user = t0.elapsed() < Duration::from_millis(900);
        assert_eq!(a1.status, 200, "{}", a1.text());
        assert_eq!(a2.status, 200, "{}", a2.text());
        if !(fast_session && fast_user) {
            continue;
        }
        judged += 1;
        // Third immediate call on one session: its bucket (burst 2) is empty.
        a3.assert_error(429, "rate_limited");
        let retry: u64 = a3.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=2).contains(&retry), "Retry-After {retry}");
        // A second session of the same user still has its own burst, but the
        // user's bucket (burst 3) has one call left after a1, a2.
        assert_eq!(b1.status, 200, "{}", b1.text());
        b2.assert_error(429, "rate_limited");
        assert!(b2.headers.contains_key("retry-after"));
        // Another user is not affected.
        let other = format!("rl-other{attempt}");
        sk.put_credential(&other, "custom", json!({"access_token": "tok-other"}))
            .await;
        let o = sk.token(&other, &["custom"]).await;
        let r = sk.proxy(Method::GET, "/v1/proxy/custom/x", &o, "").await;
        assert_eq!(r.status, 200, "{}", r.text());
        break;
    }
    assert!(
        judged > 0,
        "five attempts were all slower than a bucket refill"
    );
    // 429s are counted in the audit log as such.
    let audit = sk.admin(Method::GET, "/v1/audit?limit=100", None).await;
    assert!(
        audit
            .json()
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["status"] == 429 && r["error"] == "rate_limited"),
        "{}",
        audit.text()
    );
}

// ---------------------------------------------------------------------------
// (6) metrics

fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_are_prometheus_text_behind_the_admin_token() {
    let up = Upstream::start().await;
    let ts = support::token::TokenServer::start().await;
    ts.issue_refresh("rt-metrics-alice");
    let toml = provider_toml(
        "custom",
        &up.url,
        &format!(
            "token_url = \"{}\"\nclient_id = \"test-client\"\nclient_secret_env = \"OPS_CLIENT_SECRET\"",
            ts.url
        ),
    );
    let sk = Sidekey::start(
        Options::with_providers(&toml).env("OPS_CLIENT_SECRET", "test-client-secret"),
    )
    .await;
    // alice refreshes once (expires within the skew); bob's refresh token is
    // refused.
    sk.put_credential(
        "alice",
        "custom",
        json!({"access_token": "tok-m-alice", "refresh_token": "rt-metrics-alice", "expires_in": 5}),
    )
    .await;
    sk.put_credential(
        "bob",
        "custom",
        json!({"access_token": "tok-m-bob", "refresh_token": "rt-unknown", "expires_in": 5}),
    )
    .await;
    let a = sk.token("alice", &["custom"]).await;
    let b = sk.token("bob", &["custom"]).await;
    for _ in 0..3 {
        let r = sk.proxy(Method::GET, "/v1/proxy/custom/m", &a, "").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    sk.proxy(Method::GET, "/v1/proxy/custom/m", &b, "")
        .await
        .assert_error(424, "reauth_required");

    // The admin token is required.
    let r = support::send(
        &sk.admin_client,
        Method::GET,
        &sk.admin_url("/metrics"),
        &[],
        "",
    )
    .await;
    r.assert_error(401, "unauthorized");
    let r = support::send(
        &sk.admin_client,
        Method::GET,
        &sk.admin_url("/metrics"),
        &[("authorization", "Bearer not-the-admin-token")],
        "",
    )
    .await;
    r.assert_error(401, "unauthorized");

    // OpenMetrics when asked for (Prometheus' own preference), labelled so.
    let r = support::send(
        &sk.admin_client,
        Method::GET,
        &sk.admin_url("/metrics"),
        &[
            ("authorization", &format!("Bearer {}", sk.admin_token)),
            ("accept", "application/openmetrics-text; version=1.0.0"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    let ct = r.headers["content-type"].to_str().unwrap();
    assert_eq!(
        ct, "application/openmetrics-text; version=1.0.0; charset=utf-8",
        "{ct}"
    );
    let t = r.text();
    let v = |s: &str| metric_value(&t, s).unwrap_or_else(|| panic!("no {s} in\n{t}"));
    assert_eq!(
        v("sidekey_proxy_requests_total{provider=\"custom\",status=\"200\"}"),
        3.0
    );
    assert_eq!(
        v("sidekey_proxy_requests_total{provider=\"custom\",status=\"424\"}"),
        1.0
    );
    assert!(
        t.contains("# TYPE sidekey_upstream_latency_seconds histogram"),
        "{t}"
    );
    assert_eq!(
        v("sidekey_upstream_latency_seconds_count{provider=\"custom\"}"),
        3.0
    );
    assert!(
        t.lines().any(
            |l| l.starts_with("sidekey_upstream_latency_seconds_bucket{")
                && l.contains("le=\"+Inf\"")
                && l.contains("provider=\"custom\"")
                && l.ends_with(" 3")
        ),
        "{t}"
    );
    assert!(v("sidekey_upstream_latency_seconds_sum{provider=\"custom\"}") > 0.0);
    // alice: one refresh (the fake's token then lasts an hour); bob: one
    // refused refresh.
    assert_eq!(
        v("sidekey_refresh_total{provider=\"custom\",outcome=\"refreshed\"}"),
        1.0
    );
    assert_eq!(
        v("sidekey_refresh_total{provider=\"custom\",outcome=\"reauth_required\"}"),
        1.0
    );
    assert_eq!(v("sidekey_sessions_active"), 2.0);
    assert_eq!(v("sidekey_credentials"), 2.0);
    assert!(v("sidekey_store_size_bytes") > 0.0);
    assert!(t.ends_with("# EOF\n"));
    for secret in [
        "tok-m-alice",
        "rt-metrics-alice",
        "at-1-test-client",
        &a,
        &sk.admin_token,
    ] {
        assert!(!t.contains(secret), "{secret} in metrics");
    }
}

// ---------------------------------------------------------------------------
// (7) audit

#[tokio::test]
async fn audit_lists_calls_and_admin_writes_newest_first_without_secrets() {
    let up = Upstream::start().await;
    let sk = Sidekey::start(Options::with_providers(&provider_toml(
        "custom", &up.url, "",
    )))
    .await;
    sk.put_credential(
        "alice",
        "custom",
        json!({"access_token": "tok-audit-alice"}),
    )
    .await;
    sk.put_credential("bob", "custom", json!({"access_token": "tok-audit-bob"}))
        .await;
    let s = sk.session("alice", &["custom"]).await;
    let (alice, alice_sid) = (
        s["token"].as_str().unwrap().to_owned(),
        s["session_id"].as_str().unwrap().to_owned(),
    );
    let bob = sk.token("bob", &["custom"]).await;

    let conv = [("x-conversation-id", "conv-audit-1")];
    let r = sk
        .agent(
            Method::GET,
            "/v1/proxy/custom/things/1?q=query-secret-value",
            &[("x-sidekey-session", &alice), conv[0]],
            "",
        )
        .await;
    assert_eq!(r.status, 200);
    let r = sk
        .agent(
            Method::POST,
            "/v1/proxy/custom/things/2",
            &[
                ("authorization", &format!("Bearer {alice}")),
                ("content-type", "application/json"),
                conv[0],
            ],
            "{\"text\": \"body-secret-value\"}",
        )
        .await;
    assert_eq!(r.status, 200);
    let r = sk
        .proxy(Method::GET, "/v1/proxy/custom/bob/inbox", &bob, "")
        .await;
    assert_eq!(r.status, 200);

    // Without the admin token: 401.
    let r = support::send(
        &sk.admin_client,
        Method::GET,
        &sk.admin_url("/v1/audit"),
        &[],
        "",
    )
    .await;
    r.assert_error(401, "unauthorized");

    let r = sk.admin(Method::GET, "/v1/audit?limit=100", None).await;
    assert_eq!(r.status, 200);
    let text = r.text();
    for secret in [
        "tok-audit-alice",
        "tok-audit-bob",
        "query-secret-value",
        "body-secret-value",
        &alice,
        &bob,
        &sk.admin_token,
    ] {
        assert!(!text.contains(secret), "{secret} in the audit log: {text}");
    }
    let all = r.json().as_array().unwrap().clone();
    // Newest first.
    let times: Vec<i64> = all.iter().map(|r| r["time_ms"].as_i64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
    let paths: Vec<&str> = all.iter().map(|r| r["path"].as_str().unwrap()).collect();
    assert_eq!(
        &paths[..6],
        &[
            "/bob/inbox",
            "/things/2",
            "/things/1",
            "/v1/sessions",
            "/v1/sessions",
            "/v1/users/bob/credentials/custom",
        ],
        "{text}"
    );
    // A proxied call, fully described, without its query string.
    let call = &all[2];
    assert_eq!(call["kind"], "proxy");
    assert_eq!(call["user"], "alice");
    assert_eq!(call["provider"], "custom");
    assert_eq!(call["method"], "GET");
    assert_eq!(call["path"], "/things/1");
    assert_eq!(call["status"], 200);
    assert!(call["duration_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(call["session_id"], alice_sid.as_str());
    assert_eq!(call["conversation_id"], "conv-audit-1");
    let time = call["time"].as_str().unwrap();
    assert!(time.ends_with('Z') && time.contains('T'), "{time}");
    assert_eq!(all[1]["method"], "POST");
    // An admin write.
    let put = all
        .iter()
        .find(|r| r["path"] == "/v1/users/alice/credentials/custom")
        .expect("the admin write is audited");
    assert_eq!(put["kind"], "admin");
    assert_eq!(put["method"], "PUT");
    assert_eq!(put["status"], 200);
    assert_eq!(put["user"], "alice");
    assert_eq!(put["provider"], "custom");

    // User filter and limit.
    let r = sk.admin(Method::GET, "/v1/audit?user=alice", None).await;
    let mine = r.json().as_array().unwrap().clone();
    assert_eq!(mine.len(), 3, "{}", r.text());
    assert!(mine.iter().all(|r| r["user"] == "alice"));
    let r = sk
        .admin(Method::GET, "/v1/audit?user=alice&limit=2", None)
        .await;
    assert_eq!(r.json().as_array().unwrap()[..], mine[..2]);
    let r = sk.admin(Method::GET, "/v1/audit?limit=1", None).await;
    assert_eq!(r.json().as_array().unwrap()[..], all[..1]);
    for bad in ["0", "abc", "100001"] {
        sk.admin(Method::GET, &format!("/v1/audit?limit={bad}"), None)
            .await
            .assert_error(400, "bad_request");
    }
}

/// The paths of a `GET /v1/audit` answer, newest first.
fn audit_paths(r: support::Resp) -> Vec<String> {
    r.json()
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["path"].as_str().unwrap().to_owned())
        .collect()
}

/// Retention when batches hold several records each: calls made at once
/// land in one batch, so trimming removes whole batches and re-seals the
/// newest part of the batch that straddles the limit (on PostgreSQL the
/// whole batches go in one statement).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_retention_trims_multi_record_batches_exactly() {
    let up = Upstream::start().await;
    let mut toml = provider_toml("custom", &up.url, "");
    toml.push_str("[audit]\nmax_records = 5\n");
    let sk = Sidekey::start(Options::with_providers(&toml)).await;
    sk.put_credential("alice", "custom", json!({"access_token": "tok-batches"}))
        .await;
    let a = sk.token("alice", &["custom"]).await;
    let sizes = [3usize, 3, 4, 7];
    for (burst, &n) in sizes.iter().enumerate() {
        let calls = (0..n).map(|i| {
            let (sk, a) = (&sk, &a);
            async move {
                let r = sk
                    .proxy(
                        Method::GET,
                        &format!("/v1/proxy/custom/b{burst}/{i}"),
                        a,
                        "",
                    )
                    .await;
                assert_eq!(r.status, 200);
            }
        });
        futures_util::future::join_all(calls).await;
        // Reading the log writes the burst's records first.
        let got = audit_paths(sk.admin(Method::GET, "/v1/audit?limit=100", None).await);
        // Calls made at once finish in any order, so which of a burst's
        // calls survive a partial trim is not fixed; how many is: the
        // newest five records, newest burst first.
        let mut want = Vec::new();
        let mut room = 5usize;
        for b in (0..=burst).rev() {
            let keep = sizes[b].min(room);
            want.extend(std::iter::repeat_n(format!("b{b}"), keep));
            room -= keep;
        }
        // Older still: the credential write and the session mint.
        want.extend(std::iter::repeat_n("v1".to_string(), room.min(2)));
        let bursts: Vec<String> = got
            .iter()
            .map(|p| p.split('/').nth(1).unwrap().to_owned())
            .collect();
        assert_eq!(bursts, want, "{got:?}");
        let mut unique = got.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), got.len(), "{got:?}");
    }
}

#[tokio::test]
async fn audit_retention_keeps_only_the_newest_records() {
    let up = Upstream::start().await;
    let mut toml = provider_toml("custom", &up.url, "");
    toml.push_str("[audit]\nmax_records = 5\n");
    let mut sk = Sidekey::start(Options::with_providers(&toml)).await;
    sk.put_credential("alice", "custom", json!({"access_token": "tok-ret"}))
        .await;
    let a = sk.token("alice", &["custom"]).await;
    for i in 1..=8 {
        let r = sk
            .proxy(Method::GET, &format!("/v1/proxy/custom/p/{i}"), &a, "")
            .await;
        assert_eq!(r.status, 200);
    }
    let expect = ["/p/8", "/p/7", "/p/6", "/p/5", "/p/4"];
    let r = sk.admin(Method::GET, "/v1/audit?limit=100", None).await;
    assert_eq!(audit_paths(r), expect);
    // Still so after a restart (the trimmed records are gone from disk).
    assert_eq!(sk.stop(), Some(0));
    sk.restart().await;
    let r = sk.admin(Method::GET, "/v1/audit?limit=100", None).await;
    assert_eq!(audit_paths(r), expect);
}

// ---------------------------------------------------------------------------
// (8) log formats

#[tokio::test]
async fn log_format_json_emits_json_lines_and_text_does_not() {
    let up = Upstream::start().await;
    let mut sk = Sidekey::start(Options::with_providers(&provider_toml(
        "custom", &up.url, "",
    )))
    .await;
    sk.put_credential("alice", "custom", json!({"access_token": "tok-log"}))
        .await;
    let a = sk.token("alice", &["custom"]).await;
    let r = sk
        .proxy(Method::GET, "/v1/proxy/custom/logged", &a, "")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(sk.stop(), Some(0));

    // The harness runs `--log-format json`: every line is one JSON object.
    let logs = sk.log_text();
    let lines: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not a JSON line: {l}")))
        .collect();
    assert!(lines.len() >= 3, "{logs}");
    for v in &lines {
        assert!(v["timestamp"].is_string(), "{v}");
        assert!(v["level"].is_string(), "{v}");
    }
    assert!(lines.iter().any(|v| v["message"] == "sidekey ready"));
    let access = lines
        .iter()
        .find(|v| v["path"] == "/logged")
        .expect("an access log line for the call");
    assert_eq!(access["status"], 200);
    assert_eq!(access["provider"], "custom");
    assert_eq!(access["user"], "alice");
    assert!(!logs.contains("tok-log"));

    // `--log-format text`: human lines, not JSON.
    let mut child = Command::new(bin())
        .args(["--log-format", "text", "serve", "--config"])
        .arg(sk.config_path())
        .current_dir(sk.path())
        .env("SIDEKEY_LOG", "info")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let ready = line.contains("sidekey ready");
            if tx.send(line).is_err() || ready {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let ready = loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) if l.contains("sidekey ready") => break Some(l),
            Ok(l) => seen.push(l),
            Err(_) => break None,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let ready = ready.unwrap_or_else(|| panic!("no ready line in text mode:\n{}", seen.join("\n")));
    assert!(serde_json::from_str::<Value>(&ready).is_err(), "{ready}");
    assert!(ready.contains("INFO"), "{ready}");
    for l in &seen {
        assert!(serde_json::from_str::<Value>(l).is_err(), "{l}");
    }
}

#[tokio::test]
async fn metrics_listener_serves_metrics_and_health_without_a_token() {
    let up = Upstream::start().await;
    let sk = Sidekey::start(
        Options::with_providers(&provider_toml("custom", &up.url, ""))
            .admin("metrics_listen = \"127.0.0.1:0\""),
    )
    .await;
    sk.put_credential("mia", "custom", json!({"access_token": "tok-metrics-mia"}))
        .await;
    let t = sk.token("mia", &["custom"]).await;
    assert_eq!(
        sk.proxy(Method::GET, "/v1/proxy/custom/m", &t, "")
            .await
            .status,
        200
    );
    // The ready line names the metrics listener's bound address.
    let ready: Value = sk
        .logs
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == "sidekey ready")
        .expect("ready line");
    let url = ready["metrics"]
        .as_str()
        .expect("metrics address")
        .to_owned();
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with("/metrics"),
        "{url}"
    );
    let base = url.trim_end_matches("/metrics");
    let client = support::plain_client();
    let r = support::send(&client, Method::GET, &url, &[], "").await;
    assert_eq!(r.status, 200);
    assert!(
        r.text()
            .contains("sidekey_proxy_requests_total{provider=\"custom\",status=\"200\"} 1"),
        "{}",
        r.text()
    );
    assert!(!r.text().contains("tok-metrics-mia"));
    for p in ["/healthz", "/readyz"] {
        let r = support::send(&client, Method::GET, &format!("{base}{p}"), &[], "").await;
        assert_eq!(r.status, 200, "{p}");
    }
    // Nothing else is served there: not the admin API, not the proxy.
    let r = support::send(&client, Method::GET, &format!("{base}/v1/audit"), &[], "").await;
    r.assert_error(404, "not_found");
    let r = support::send(
        &client,
        Method::POST,
        &format!("{base}/v1/sessions"),
        &[("authorization", &format!("Bearer {}", sk.admin_token))],
        json!({"user": "mia"}).to_string(),
    )
    .await;
    r.assert_error(404, "not_found");
}
