//! Criterion micro-benchmarks of the per-request hot path, through the
//! public library API:
//!
//! - `session/verify`: JWT (HS256) check plus the session record read
//!   (sled get + XChaCha20-Poly1305 open + JSON), as `authenticate` does;
//!   `session/jwt_only` and `session/record_only` split it;
//! - `credential/cached`: the decrypted-credential cache hit;
//!   `credential/store_decrypt`: sled get + open + JSON, bypassing the cache;
//! - `inject/*`: `Provider::upstream_uri` + `Provider::inject_headers`;
//! - `check_path/*`: the traversal checks on a proxied path;
//! - `lookup_decrypt_inject`: store lookup + decrypt + injection together
//!   (the issue's ≤ 20 µs p99 target), cached and uncached.
//!
//! `cargo bench --bench hot_path` also prints a per-call latency
//! distribution (p50/p99/p99.9 of single timed calls) for the combined path,
//! since criterion reports means and medians only.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use criterion::Criterion;
use futures_util::FutureExt;
use http::HeaderMap;
use sidekey::clock::Clock;
use sidekey::providers::{Provider, Providers, check_path};
use sidekey::secret::Secret;
use sidekey::session::{SessionAuthority, SessionKeys};
use sidekey::store::{Credential, KeyRing, MasterKey, Owner, Store, StoreOptions};

const USERS: usize = 1000;

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<Store>,
    authority: SessionAuthority,
    token: String,
    sid: String,
    hs_secret: Vec<u8>,
    bearer: Arc<Provider>,
    header: Arc<Provider>,
    query: Arc<Provider>,
    prefix: Arc<Provider>,
}

fn providers() -> Providers {
    let toml = r#"
[providers.bench]
base_url = "https://api.example.com/v1"
inject = "bearer"

[providers.hdr]
base_url = "https://api.example.com"
inject = { header = "X-Api-Key", value = "Token {token}" }

[providers.qry]
base_url = "https://api.example.com"
inject = { query = "key" }

[providers.tg]
preset = "telegram"
"#;
    let cfg = sidekey::config::Config::parse(toml, Path::new("/x/config.toml"), Path::new("/x"))
        .expect("bench config parses");
    Providers::from_config(&cfg).expect("providers resolve")
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(
        Store::open(
            &dir.path().join("db"),
            KeyRing::new(MasterKey::from_bytes(&[7; 32]), vec![]),
            StoreOptions::default(),
        )
        .expect("store opens"),
    );
    let now = Clock::system().now();
    for i in 0..USERS {
        let mut c = Credential {
            access_token: Some(Secret::new(format!(
                "xoxb-{i:06}-0123456789abcdef0123456789"
            ))),
            refresh_token: Some(Secret::new(format!("xoxe-{i:06}-refresh"))),
            expires_at: Some(now + 86_400),
            scopes: vec!["chat:write".into(), "channels:read".into()],
            ..Default::default()
        };
        for p in ["bench", "hdr", "qry", "tg"] {
            store
                .put_credential(&Owner::User(format!("user-{i:06}")), p, &mut c)
                .now_or_never()
                .expect("sled calls do not wait")
                .expect("put");
        }
    }
    let hs_secret = vec![0x5a; 32];
    let key = Secret::new(base64::engine::general_purpose::STANDARD.encode(&hs_secret));
    let authority = SessionAuthority::new(
        SessionKeys::new(&key, &[]).expect("key parses"),
        "sidekey".into(),
        "sidekey-proxy".into(),
        store.clone(),
        Clock::system(),
    );
    let minted = authority
        .mint("user-000042", vec!["bench".into()], 3600, None)
        .now_or_never()
        .expect("sled calls do not wait")
        .expect("mint");
    let ps = providers();
    let get = |n: &str| ps.get(n).expect("provider").clone();
    Fixture {
        token: minted.token.expose().to_owned(),
        sid: minted.sid,
        hs_secret,
        bearer: get("bench"),
        header: get("hdr"),
        query: get("qry"),
        prefix: get("tg"),
        authority,
        store,
        _dir: dir,
    }
}

/// What `proxy::send` does with a credential: URI, then headers.
fn inject(p: &Provider, cred: &Credential, headers: &mut HeaderMap) -> http::Uri {
    let path = check_path("/chat.postMessage").expect("valid path");
    let uri = p
        .upstream_uri(
            &path,
            Some("channel=C123&limit=10"),
            cred.access_token.as_ref(),
        )
        .expect("uri");
    p.inject_headers(headers, cred).expect("inject");
    uri
}

fn benches(c: &mut Criterion, f: &Fixture) {
    let owner = Owner::User("user-000042".into());

    let mut g = c.benchmark_group("session");
    g.bench_function("verify", |b| {
        b.iter(|| {
            f.authority
                .verify(black_box(&f.token))
                .now_or_never()
                .expect("sled calls do not wait")
                .expect("valid")
        })
    });
    g.bench_function("jwt_only", |b| {
        // The same checks `verify` asks of jsonwebtoken, without the store.
        let key = jsonwebtoken::DecodingKey::from_secret(&f.hs_secret);
        b.iter(|| {
            let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
            v.leeway = 0;
            v.set_issuer(&["sidekey"]);
            v.set_audience(&["sidekey-proxy"]);
            jsonwebtoken::decode::<serde_json::Value>(black_box(&f.token), &key, &v).expect("valid")
        })
    });
    g.bench_function("record_only", |b| {
        b.iter(|| {
            f.store
                .session(black_box(&f.sid))
                .now_or_never()
                .expect("sled calls do not wait")
                .expect("ok")
                .expect("found")
        })
    });
    g.finish();

    let mut g = c.benchmark_group("credential");
    let _ = f
        .store
        .credential(&owner, "bench")
        .now_or_never()
        .expect("sled calls do not wait");
    g.bench_function("cached", |b| {
        b.iter(|| {
            f.store
                .credential(black_box(&owner), "bench")
                .now_or_never()
                .expect("sled calls do not wait")
                .expect("ok")
                .expect("found")
        })
    });
    g.bench_function("store_decrypt", |b| {
        b.iter(|| {
            f.store
                .credential_uncached(black_box(&owner), "bench")
                .now_or_never()
                .expect("sled calls do not wait")
                .expect("ok")
                .expect("found")
        })
    });
    g.finish();

    let cred = f
        .store
        .credential_uncached(&owner, "bench")
        .now_or_never()
        .expect("sled calls do not wait")
        .expect("ok")
        .expect("found");
    let mut g = c.benchmark_group("inject");
    for (name, p) in [
        ("bearer", &f.bearer),
        ("header_template", &f.header),
        ("query", &f.query),
        ("path_prefix", &f.prefix),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut h = HeaderMap::new();
                let uri = inject(black_box(p), black_box(&cred), &mut h);
                (uri, h)
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("check_path");
    g.bench_function("plain", |b| {
        b.iter(|| check_path(black_box("/api/chat.postMessage")).expect("ok"))
    });
    g.bench_function("encoded_long", |b| {
        b.iter(|| {
            check_path(black_box(
                "/drive/v3/files/1a2B3c%20d%C3%A9j%C3%A0/permissions/anyone%40example.com/x",
            ))
            .expect("ok")
        })
    });
    g.bench_function("rejected_double_encoded", |b| {
        b.iter(|| check_path(black_box("/a/%252e%252e/b")).unwrap_err())
    });
    g.finish();

    let mut g = c.benchmark_group("lookup_decrypt_inject");
    g.bench_function("cached", |b| {
        b.iter(|| {
            let c = f
                .store
                .credential(&owner, "bench")
                .now_or_never()
                .expect("sled calls do not wait")
                .expect("ok")
                .expect("found");
            let mut h = HeaderMap::new();
            inject(&f.bearer, &c, &mut h)
        })
    });
    g.bench_function("uncached", |b| {
        b.iter(|| {
            let c = f
                .store
                .credential_uncached(&owner, "bench")
                .now_or_never()
                .expect("sled calls do not wait")
                .expect("ok")
                .expect("found");
            let mut h = HeaderMap::new();
            inject(&f.bearer, &c, &mut h)
        })
    });
    g.finish();
}

/// p50/p99/p99.9/max of single timed calls, over users spread across the store.
fn distribution(name: &str, n: usize, mut f: impl FnMut(usize)) {
    for i in 0..n.min(10_000) {
        f(i);
    }
    let mut v: Vec<Duration> = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        f(i);
        v.push(t.elapsed());
    }
    v.sort_unstable();
    let q = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)].as_secs_f64() * 1e6;
    println!(
        "{name:<44} n={n:<7} p50 {:>6.2} µs  p99 {:>6.2} µs  p99.9 {:>6.2} µs  max {:>8.2} µs",
        q(0.5),
        q(0.99),
        q(0.999),
        v[v.len() - 1].as_secs_f64() * 1e6
    );
}

fn main() {
    sidekey::install_crypto_provider();
    let f = fixture();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    benches(&mut c, &f);
    c.final_summary();

    // `cargo test --benches` (and `cargo bench -- --test`) run each
    // benchmark once; the timing table is for `cargo bench` only.
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test" || a == "--list") {
        return;
    }
    println!("\nper-call latency (single timed calls, {USERS} users in the store):");
    let owners: Vec<Owner> = (0..USERS)
        .map(|i| Owner::User(format!("user-{i:06}")))
        .collect();
    distribution("lookup+decrypt+inject (uncached)", 200_000, |i| {
        let c = f
            .store
            .credential_uncached(&owners[i % USERS], "bench")
            .now_or_never()
            .expect("sled calls do not wait")
            .expect("ok")
            .expect("found");
        let mut h = HeaderMap::new();
        black_box(inject(&f.bearer, &c, &mut h));
    });
    distribution("lookup+inject (cache hit)", 200_000, |i| {
        let c = f
            .store
            .credential(&owners[i % USERS], "bench")
            .now_or_never()
            .expect("sled calls do not wait")
            .expect("ok")
            .expect("found");
        let mut h = HeaderMap::new();
        black_box(inject(&f.bearer, &c, &mut h));
    });
    distribution("session verify (JWT + record)", 200_000, |_| {
        black_box(
            f.authority
                .verify(&f.token)
                .now_or_never()
                .expect("sled calls do not wait")
                .expect("valid"),
        );
    });
}
