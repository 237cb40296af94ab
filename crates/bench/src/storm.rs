//! The refresh storm: many concurrent requests on one expired token, on
//! one sidekey or spread over replicas on one PostgreSQL.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use serde_json::json;

use crate::cli::Args;
use crate::client::{Admin, build_client, wait_ready};
use crate::load::{Ctx, Target, WorkerOut, finish_case, one, record, snap};
use crate::pg::use_postgres_store;
use crate::procfs::cpu_secs;
use crate::report::Case;
use crate::sidekey_proc::{Ports, Sidekey, free_port, unix_now, write_config};
use crate::upstream::Upstream;

/// N concurrent requests on one expired credential: the first refreshes,
/// the rest wait for it; the token endpoint should see exactly one call.
pub(crate) async fn storm(
    ctx: &Arc<Ctx>,
    admin: &Admin,
    upstream: &Arc<Upstream>,
    roots: &[Vec<u8>],
    args: &Args,
    agent_port: u16,
) -> Result<Case, String> {
    let n = args.refresh_storm;
    let user = "storm-user";
    admin
        .put_credential(
            user,
            "storm",
            json!({
                "access_token": "storm-old-token",
                "refresh_token": "rt-storm-1",
                "expires_at": unix_now() - 60,
            }),
        )
        .await?;
    let token = admin.session(user, &["storm"]).await?;
    // Its own client and connections, opened before the storm so the
    // latencies are of the refresh, not of n TLS handshakes.
    let client = build_client(roots, args.http2);
    let health: Uri = format!("https://127.0.0.1:{agent_port}/healthz")
        .parse()
        .expect("valid uri");
    let mut hs = Vec::new();
    for _ in 0..n {
        let client = client.clone();
        let health = health.clone();
        hs.push(tokio::spawn(async move {
            let req = Request::get(health)
                .body(Full::new(Bytes::new()))
                .expect("valid request");
            if let Ok(r) = client.request(req).await {
                let _ = r.into_body().collect().await;
            }
        }));
    }
    for h in hs {
        let _ = h.await;
    }
    let sctx = Arc::new(Ctx {
        client,
        direct_uri: ctx.direct_uri.clone(),
        via_uri: format!("https://127.0.0.1:{agent_port}/v1/proxy/storm/api/items")
            .parse()
            .expect("valid uri"),
        tool_uri: ctx_uri_placeholder(),
        mcp_uri: ctx_uri_placeholder(),
        jwt_uri: ctx_uri_placeholder(),
        direct_auth: ctx.direct_auth.clone(),
        nginx_uri: None,
        nginx_pids: Vec::new(),
        sessions: vec![HeaderValue::try_from(token).map_err(|e| e.to_string())?],
        sidekey_pid: ctx.sidekey_pid.clone(),
    });
    upstream
        .token_delay_ms
        .store(args.storm_token_delay_ms, Ordering::Relaxed);
    let calls_before = upstream.token_calls.load(Ordering::SeqCst);
    let seen_before = upstream.new_token_seen.load(Ordering::Relaxed);
    let barrier = Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut hs = Vec::with_capacity(n);
    for _ in 0..n {
        let sctx = sctx.clone();
        let barrier = barrier.clone();
        hs.push(tokio::spawn(async move {
            barrier.wait().await;
            let t0 = Instant::now();
            let res = one(&sctx, Target::Via, &sctx.via_uri, 0).await;
            (res, t0.elapsed().as_micros() as u64)
        }));
    }
    let a = snap(&sctx);
    barrier.wait().await;
    let mut w = WorkerOut::new();
    for h in hs {
        if let Ok((res, us)) = h.await {
            record(&mut w, res, us);
        }
    }
    let b = snap(&sctx);
    upstream.token_delay_ms.store(0, Ordering::Relaxed);
    let calls = upstream.token_calls.load(Ordering::SeqCst) - calls_before;
    let seen = upstream.new_token_seen.load(Ordering::Relaxed) - seen_before;
    let mut c = finish_case(&sctx, "storm", Target::Via, n, None, vec![w], a, b);
    c.extra.insert("token_calls".into(), json!(calls));
    c.extra.insert("upstream_saw_new_token".into(), json!(seen));
    c.extra
        .insert("token_delay_ms".into(), json!(args.storm_token_delay_ms));
    Ok(c)
}

/// `--storm-replicas N`: N−1 more sidekey processes on the same database,
/// each in a dir of its own with the first one's master key, session key,
/// admin token and certificate (as replicas of one deployment share them),
/// on ports of their own. Returns them with their agent ports.
pub(crate) async fn start_replicas(
    bin: &Path,
    dir: &Path,
    args: &Args,
    upstream_port: u16,
    url: &str,
    roots: &[Vec<u8>],
) -> Result<Vec<(Sidekey, u16)>, String> {
    let mut v = Vec::new();
    let probe = build_client(roots, false);
    for i in 1..args.storm_replicas {
        let rd = dir.join(format!("replica-{i}"));
        for sub in ["data", "certs"] {
            std::fs::create_dir_all(rd.join(sub)).map_err(|e| e.to_string())?;
        }
        for f in [
            "data/master.key",
            "data/session.key",
            "data/admin.token",
            "certs/server.crt",
            "certs/server.key",
            "upstream.crt",
        ] {
            if dir.join(f).exists() {
                std::fs::copy(dir.join(f), rd.join(f)).map_err(|e| format!("{f}: {e}"))?;
            }
        }
        let ports = Ports {
            agent: free_port(),
            admin: free_port(),
            upstream: upstream_port,
        };
        write_config(&rd, &ports, args).map_err(|e| e.to_string())?;
        use_postgres_store(&rd, url)?;
        let mut sk = Sidekey::spawn(bin, &rd, &args.log, &args.sidekey_env)?;
        let ready: Uri = format!("https://127.0.0.1:{}/readyz", ports.agent)
            .parse()
            .expect("valid uri");
        wait_ready(&probe, &ready, &mut sk).await?;
        v.push((sk, ports.agent));
    }
    Ok(v)
}

/// The refresh storm spread round-robin over sidekey processes on one
/// PostgreSQL (`agent_ports`, the first being the main one): the token
/// endpoint should still see exactly one call cluster-wide.
pub(crate) async fn storm_replicas(
    ctx: &Arc<Ctx>,
    admin: &Admin,
    upstream: &Arc<Upstream>,
    roots: &[Vec<u8>],
    args: &Args,
    agent_ports: &[u16],
    pids: &[String],
) -> Result<Case, String> {
    let n = args.refresh_storm;
    let user = "storm-user";
    admin
        .put_credential(
            user,
            "storm",
            json!({
                "access_token": "storm-old-token",
                "refresh_token": "rt-storm-1",
                "expires_at": unix_now() - 60,
            }),
        )
        .await?;
    let token = admin.session(user, &["storm"]).await?;
    let uris: Vec<Uri> = agent_ports
        .iter()
        .map(|p| {
            format!("https://127.0.0.1:{p}/v1/proxy/storm/api/items")
                .parse()
                .expect("valid uri")
        })
        .collect();
    // Connections to every replica opened first: the latencies are of the
    // refresh, not of n TLS handshakes.
    let client = build_client(roots, args.http2);
    // One accepted request per replica first: a fresh replica closes more
    // than `max_pending_per_ip` (128) not-yet-proven connections from one
    // address, and health probes prove nothing.
    admin
        .put_credential(
            "storm-proof",
            "bench",
            json!({"access_token": "storm-proof-token"}),
        )
        .await?;
    let proof = HeaderValue::try_from(admin.session("storm-proof", &["bench"]).await?)
        .map_err(|e| e.to_string())?;
    let pctx = Ctx {
        client: client.clone(),
        direct_uri: ctx.direct_uri.clone(),
        via_uri: ctx.via_uri.clone(),
        tool_uri: ctx_uri_placeholder(),
        mcp_uri: ctx_uri_placeholder(),
        jwt_uri: ctx_uri_placeholder(),
        direct_auth: ctx.direct_auth.clone(),
        nginx_uri: None,
        nginx_pids: Vec::new(),
        sessions: vec![proof],
        sidekey_pid: ctx.sidekey_pid.clone(),
    };
    for p in agent_ports {
        let uri: Uri = format!("https://127.0.0.1:{p}/v1/proxy/bench/api/items")
            .parse()
            .expect("valid uri");
        one(&pctx, Target::Via, &uri, 0)
            .await
            .map_err(|e| format!("request through replica on port {p} failed: {e}"))?;
    }
    let mut hs = Vec::new();
    for i in 0..n {
        let client = client.clone();
        let health: Uri = format!(
            "https://127.0.0.1:{}/healthz",
            agent_ports[i % agent_ports.len()]
        )
        .parse()
        .expect("valid uri");
        hs.push(tokio::spawn(async move {
            let req = Request::get(health)
                .body(Full::new(Bytes::new()))
                .expect("valid request");
            if let Ok(r) = client.request(req).await {
                let _ = r.into_body().collect().await;
            }
        }));
    }
    for h in hs {
        let _ = h.await;
    }
    let sctx = Arc::new(Ctx {
        client,
        direct_uri: ctx.direct_uri.clone(),
        via_uri: uris[0].clone(),
        tool_uri: ctx_uri_placeholder(),
        mcp_uri: ctx_uri_placeholder(),
        jwt_uri: ctx_uri_placeholder(),
        direct_auth: ctx.direct_auth.clone(),
        nginx_uri: None,
        nginx_pids: Vec::new(),
        sessions: vec![HeaderValue::try_from(token).map_err(|e| e.to_string())?],
        sidekey_pid: ctx.sidekey_pid.clone(),
    });
    upstream
        .token_delay_ms
        .store(args.storm_token_delay_ms, Ordering::Relaxed);
    let calls_before = upstream.token_calls.load(Ordering::SeqCst);
    let seen_before = upstream.new_token_seen.load(Ordering::Relaxed);
    let cpu = || pids.iter().map(|p| cpu_secs(p)).sum::<f64>();
    let barrier = Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut hs = Vec::with_capacity(n);
    for i in 0..n {
        let sctx = sctx.clone();
        let barrier = barrier.clone();
        let uri = uris[i % uris.len()].clone();
        hs.push(tokio::spawn(async move {
            barrier.wait().await;
            let t0 = Instant::now();
            let res = one(&sctx, Target::Via, &uri, 0).await;
            (res, t0.elapsed().as_micros() as u64)
        }));
    }
    let a = snap(&sctx);
    let cpu_a = cpu();
    barrier.wait().await;
    let mut w = WorkerOut::new();
    for h in hs {
        if let Ok((res, us)) = h.await {
            record(&mut w, res, us);
        }
    }
    let b = snap(&sctx);
    let cpu_b = cpu();
    upstream.token_delay_ms.store(0, Ordering::Relaxed);
    let calls = upstream.token_calls.load(Ordering::SeqCst) - calls_before;
    let seen = upstream.new_token_seen.load(Ordering::Relaxed) - seen_before;
    let mut c = finish_case(&sctx, "storm", Target::Via, n, None, vec![w], a, b);
    // CPU of every replica, not only the first.
    c.proxy_cpu_s = cpu_b - cpu_a;
    c.proxy_user_s = f64::NAN;
    c.extra.insert("token_calls".into(), json!(calls));
    c.extra.insert("upstream_saw_new_token".into(), json!(seen));
    c.extra
        .insert("token_delay_ms".into(), json!(args.storm_token_delay_ms));
    c.extra.insert("replicas".into(), json!(agent_ports.len()));
    Ok(c)
}

/// The storms use the proxy path only.
fn ctx_uri_placeholder() -> http::Uri {
    http::Uri::from_static("https://127.0.0.1/unused")
}
